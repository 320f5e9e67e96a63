//! Direct access to guest RAM through the host mappings a
//! [`GuestMemory`] hands out, for the engine's bulk copies.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
#[cfg(feature = "test-util")]
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::memory::{
    host_page_size, Backing, GuestMemory, HostRegionError, MemoryLayout, PAGE_SIZE,
};

/// How the engine learns which pages of a region read as zero without
/// reading them (see [`Backing`]).
#[derive(Debug, Clone, Copy)]
enum ZeroKnowledge<'a> {
    /// Private anonymous memory: `/proc/self/pagemap` (a Linux fact about
    /// this kind of mapping only); `None` where it cannot be read.
    Pagemap,
    /// A shared file: its holes.
    FileHoles { fd: BorrowedFd<'a>, offset: u64 },
    /// Nothing: every page may hold data.
    Nothing,
}

/// `PAGEMAP_SCAN` ioctls this process made (that succeeded), through every [`HostRam`]: what
/// the scans for populated memory cost, counted for tests
/// (`livemig::testing::pagemap_scans`).
#[cfg(feature = "test-util")]
static PAGEMAP_SCANS: AtomicU64 = AtomicU64::new(0);

/// Sets to `value` the flags of `flags` (one per chunk of `chunk_pages`
/// pages, the first at page `base`) of the chunks that pages
/// `first..first + n` touch (`n` > 0; flags past the end are left out).
pub(crate) fn mark_chunks(
    flags: &mut [bool],
    base: u64,
    chunk_pages: u64,
    (first, n): (u64, u64),
    value: bool,
) {
    let (a, b) = (
        (first - base) / chunk_pages,
        (first + n - 1 - base) / chunk_pages,
    );
    for f in flags.iter_mut().take(b as usize + 1).skip(a as usize) {
        *f = value;
    }
}

/// `PAGEMAP_SCAN` ioctls this process has made so far (see [`PAGEMAP_SCANS`]).
#[cfg(feature = "test-util")]
pub(crate) fn pagemap_scans() -> u64 {
    PAGEMAP_SCANS.load(Ordering::Relaxed)
}

/// Host view of one guest region.
#[derive(Debug, Clone, Copy)]
struct Mapped<'a> {
    ptr: *mut u8,
    pages: u64,
    zero: ZeroKnowledge<'a>,
}

/// Host pointers to every region of a guest memory object, in layout order.
///
/// Guest memory is shared with running vCPUs: reads here may observe bytes
/// the guest is changing at that very moment. That is inherent to pre-copy
/// and harmless, because every page written after its dirty bit was cleared
/// is sent again; the engine never relies on a page being stable while the
/// VM runs.
#[derive(Clone)]
pub(crate) struct HostRam<'a> {
    regions: Vec<Mapped<'a>>,
    /// `/proc/self/pagemap`, if a region is private anonymous memory and
    /// the file can be read.
    pagemap: Option<Arc<File>>,
    /// The host's page size (pagemap has one entry per host page).
    host_page: u64,
}

// SAFETY: the pointers refer to mappings the `GuestMemory` borrowed for 'a
// keeps mapped (its `# Safety` contract); HostRam only copies into or out of
// them, never hands out references.
unsafe impl Send for HostRam<'_> {}
// SAFETY: all accesses are raw copies into or out of the mappings; several
// threads may copy disjoint pages at once (the multi-stream receiver writes
// each page from exactly one stream thread), and concurrent reads of pages
// the guest is writing are the pre-copy race described above.
unsafe impl Sync for HostRam<'_> {}

impl<'a> HostRam<'a> {
    /// Resolves the host mappings of `mem`, which must have exactly the
    /// regions of `layout`, each 4 KiB aligned on the host.
    pub fn new(mem: &'a dyn GuestMemory, layout: &MemoryLayout) -> Result<Self, HostRegionError> {
        let have = mem.regions();
        let want = layout.regions();
        if have.len() != want.len() {
            return Err(HostRegionError::RegionCount {
                have: have.len(),
                want: want.len(),
            });
        }
        let mut regions = Vec::with_capacity(have.len());
        for (index, (h, w)) in have.iter().zip(want).enumerate() {
            if h.guest_addr != w.guest_addr || h.len != w.size {
                return Err(HostRegionError::Mismatch {
                    index,
                    have_addr: h.guest_addr,
                    have_len: h.len,
                    want_addr: w.guest_addr,
                    want_len: w.size,
                });
            }
            if h.host.is_null() || !(h.host as u64).is_multiple_of(PAGE_SIZE) {
                let host = h.host as usize;
                return Err(HostRegionError::Unaligned { index, host });
            }
            let zero = match h.backing {
                Backing::PrivateAnonymous => ZeroKnowledge::Pagemap,
                Backing::SharedFile { fd, offset } => ZeroKnowledge::FileHoles { fd, offset },
                _ => ZeroKnowledge::Nothing,
            };
            regions.push(Mapped {
                ptr: h.host,
                pages: w.pages(),
                zero,
            });
        }
        let anonymous = regions
            .iter()
            .any(|r| matches!(r.zero, ZeroKnowledge::Pagemap));
        let pagemap = if anonymous { open_pagemap() } else { None };
        Ok(HostRam {
            regions,
            pagemap,
            host_page: host_page_size(),
        })
    }

    fn page_ptr(&self, region: usize, page: u64) -> Option<*mut u8> {
        let r = self.regions.get(region)?;
        (page < r.pages).then(|| {
            // SAFETY: page < pages, so the offset stays inside the mapping.
            unsafe { r.ptr.add((page * PAGE_SIZE) as usize) }
        })
    }

    /// Whether a page is all zero (reads the page once, a word at a time;
    /// most non-zero pages are recognised at the first word).
    pub fn is_zero(&self, region: usize, page: u64) -> bool {
        let Some(p) = self.page_ptr(region, page) else {
            return false;
        };
        let words = (PAGE_SIZE / 8) as usize;
        let p = p as *const u64;
        let mut acc = 0u64;
        for chunk in 0..words / 8 {
            for i in 0..8 {
                // SAFETY: inside the page; the mapping is 8-byte aligned.
                acc |= unsafe { std::ptr::read_volatile(p.add(chunk * 8 + i)) };
            }
            if acc != 0 {
                return false;
            }
        }
        true
    }

    /// Copies `npages` pages starting at `page` into `dst` (which must be
    /// exactly that long). Returns false if the range is out of bounds.
    pub fn read_pages(&self, region: usize, page: u64, dst: &mut [u8]) -> bool {
        let npages = dst.len() as u64 / PAGE_SIZE;
        let Some(r) = self.regions.get(region) else {
            return false;
        };
        if !(dst.len() as u64).is_multiple_of(PAGE_SIZE)
            || page.checked_add(npages).is_none_or(|e| e > r.pages)
        {
            return false;
        }
        let Some(src) = self.page_ptr(region, page) else {
            return false;
        };
        // SAFETY: bounds checked above; dst is a distinct host buffer.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        true
    }

    /// Copies `src` into guest memory at `page`. Returns false if out of bounds.
    pub fn write_pages(&self, region: usize, page: u64, src: &[u8]) -> bool {
        let npages = src.len() as u64 / PAGE_SIZE;
        let Some(r) = self.regions.get(region) else {
            return false;
        };
        if !(src.len() as u64).is_multiple_of(PAGE_SIZE)
            || page.checked_add(npages).is_none_or(|e| e > r.pages)
        {
            return false;
        }
        let Some(dst) = self.page_ptr(region, page) else {
            return false;
        };
        // SAFETY: bounds checked above; the destination VM is not running.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        true
    }

    /// The host bytes of `npages` pages at `page`, for reading page data
    /// from a connection straight into guest memory; `None` if out of
    /// bounds.
    ///
    /// # Safety
    ///
    /// Nothing else may access these pages (no other slice, no copy into or
    /// out of them, no running vCPU) while the returned slice lives.
    // A mutable slice from `&self` is this function's purpose: guest
    // memory is not owned by HostRam, and exclusivity is the caller's
    // promise above.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn pages_mut(&self, region: usize, page: u64, npages: u64) -> Option<&mut [u8]> {
        let r = self.regions.get(region)?;
        if page.checked_add(npages).is_none_or(|e| e > r.pages) {
            return None;
        }
        let dst = self.page_ptr(region, page)?;
        let len = usize::try_from(npages * PAGE_SIZE).ok()?;
        // SAFETY: bounds checked above, inside a mapping that lives for
        // 'a; exclusive access is the caller's promise.
        Some(unsafe { std::slice::from_raw_parts_mut(dst, len) })
    }

    /// The host bytes of `npages` pages at `page` as a shared slice, for
    /// sending them without a copy (a checksum, then the kernel's copy into
    /// a socket); `None` if out of bounds.
    ///
    /// # Safety
    ///
    /// The guest (or the VMM) may write these pages while the slice lives:
    /// the pre-copy race the type's docs describe. The caller must hand the
    /// slice only to code that reads its bytes without relying on two reads
    /// agreeing (a checksum, a copy, the kernel's `writev`), and must drop
    /// it before the memory can go away (within the migration that
    /// borrowed it).
    pub unsafe fn guest_bytes(&self, region: usize, page: u64, npages: u64) -> Option<&[u8]> {
        let r = self.regions.get(region)?;
        if page.checked_add(npages).is_none_or(|e| e > r.pages) {
            return None;
        }
        let src = self.page_ptr(region, page)?;
        let len = usize::try_from(npages * PAGE_SIZE).ok()?;
        // SAFETY: bounds checked above, inside a mapping that lives for
        // 'a; that its bytes may change under the slice is the caller's
        // promise above (readers that tolerate it).
        Some(unsafe { std::slice::from_raw_parts(src, len) })
    }

    #[cfg(feature = "uffd-fill")]
    /// The host address of `npages` pages at `page` of `region`, if they
    /// lie inside it.
    pub fn host_pages(&self, region: usize, page: u64, npages: u64) -> Option<*mut u8> {
        let r = self.regions.get(region)?;
        if page.checked_add(npages).is_none_or(|e| e > r.pages) {
            return None;
        }
        self.page_ptr(region, page)
    }

    #[cfg(feature = "uffd-fill")]
    /// Whether `region` is a shared file ([`Backing::SharedFile`]).
    pub fn is_shared_file(&self, region: usize) -> bool {
        self.regions
            .get(region)
            .is_some_and(|r| matches!(r.zero, ZeroKnowledge::FileHoles { .. }))
    }

    #[cfg(feature = "uffd-fill")]
    /// The host mapping of `region` (address, bytes) where its backing lets
    /// the destination fill never-written pages with `UFFDIO_COPY`
    /// (`destination::fill`): private anonymous memory, or a shared file
    /// that is not hugetlbfs (whose pages are copied a huge page at a
    /// time), on a host whose pages are [`PAGE_SIZE`] bytes.
    pub fn fillable(&self, region: usize) -> Option<(*mut u8, usize)> {
        let r = self.regions.get(region)?;
        if self.host_page != PAGE_SIZE {
            return None;
        }
        let ok = match r.zero {
            ZeroKnowledge::Pagemap => true,
            ZeroKnowledge::FileHoles { fd, .. } => !on_hugetlbfs(fd),
            ZeroKnowledge::Nothing => false,
        };
        let len = usize::try_from(r.pages * PAGE_SIZE).ok()?;
        ok.then_some((r.ptr, len))
    }

    /// Zeroes `npages` pages at `page`. Returns false if out of bounds.
    pub fn zero_pages(&self, region: usize, page: u64, npages: u64) -> bool {
        let Some(r) = self.regions.get(region) else {
            return false;
        };
        if page.checked_add(npages).is_none_or(|e| e > r.pages) {
            return false;
        }
        let Some(dst) = self.page_ptr(region, page) else {
            return false;
        };
        // SAFETY: bounds checked above; the destination VM is not running.
        unsafe { std::ptr::write_bytes(dst, 0, (npages * PAGE_SIZE) as usize) };
        true
    }

    /// Marks in `out` (one bool per page of `first .. first + out.len()`)
    /// the pages of `region` that may hold non-zero data; pages left
    /// unmarked certainly read as zero (see [`Backing`] for how that is
    /// known). Marks every page where nothing is known.
    ///
    /// The answer is about this instant: a page first written afterwards is
    /// not marked, so in manual-protect mode the chunk must already be
    /// re-armed (cleared) when this is called.
    pub fn populated(&self, region: usize, first: u64, out: &mut [bool]) {
        out.fill(true);
        let Some(r) = self.regions.get(region) else {
            return;
        };
        let n = out.len() as u64;
        if first.checked_add(n).is_none_or(|e| e > r.pages) {
            return;
        }
        match r.zero {
            ZeroKnowledge::Pagemap => {
                if let Some(pm) = &self.pagemap {
                    let first_addr = r.ptr as u64 + first * PAGE_SIZE;
                    if pagemap_present(pm, self.host_page, first_addr, out).is_err() {
                        out.fill(true);
                    }
                }
            }
            ZeroKnowledge::FileHoles { fd, offset } => {
                let start = offset + first * PAGE_SIZE;
                if file_data(fd, start, out).is_err() {
                    out.fill(true);
                }
            }
            ZeroKnowledge::Nothing => {}
        }
    }

    /// The page ranges `(first, n)` of `first .. end` of `region` that may
    /// hold non-zero data, in address order; the pages between them
    /// certainly read as zero (the same knowledge as
    /// [`HostRam::populated`], and the same "about this instant" rule; with
    /// `PAGEMAP_SCAN`, pages mapped to the kernel's shared zero page — read
    /// but never written — also count as certainly zero).
    ///
    /// Costs what the backing's index of populated memory costs, not one
    /// step per page: private anonymous memory asks the kernel's
    /// `PAGEMAP_SCAN` (Linux 6.7+; it skips unpopulated page tables whole)
    /// and falls back to reading `/proc/self/pagemap` entry by entry; a
    /// shared file asks for its data ranges (`SEEK_DATA`/`SEEK_HOLE`).
    /// Where nothing is known the whole range is returned.
    pub fn populated_ranges(&self, region: usize, first: u64, end: u64) -> Vec<(u64, u64)> {
        let Some(r) = self.regions.get(region) else {
            return Vec::new();
        };
        let end = end.min(r.pages);
        if first >= end {
            return Vec::new();
        }
        let all = vec![(first, end - first)];
        match r.zero {
            ZeroKnowledge::Pagemap => {
                let Some(pm) = &self.pagemap else {
                    return all;
                };
                let start = r.ptr as u64 + first * PAGE_SIZE;
                match pagemap_scan(pm, self.host_page, start, end - first) {
                    Ok(ranges) => ranges.into_iter().map(|(p, n)| (first + p, n)).collect(),
                    Err(e) => {
                        log::debug!("PAGEMAP_SCAN: {e}; reading pagemap entries");
                        self.ranges_from_flags(region, first, end)
                    }
                }
            }
            ZeroKnowledge::FileHoles { .. } => self.ranges_from_flags(region, first, end),
            ZeroKnowledge::Nothing => all,
        }
    }

    /// Whether [`HostRam::populated_ranges`] over `region` costs what the
    /// region's populated memory costs — the kernel's `PAGEMAP_SCAN` over
    /// private anonymous memory (probed here) — rather than a step per page.
    pub fn scans_cheaply(&self, region: usize) -> bool {
        let Some(r) = self.regions.get(region) else {
            return false;
        };
        match (r.zero, &self.pagemap) {
            (ZeroKnowledge::Pagemap, Some(pm)) => {
                pagemap_scan(pm, self.host_page, r.ptr as u64, 1).is_ok()
            }
            _ => false,
        }
    }

    /// Per chunk of `chunk_pages` pages of `region` (the last one may be
    /// shorter): whether it holds a page [`HostRam::populated_ranges`]
    /// would return, from one pass of the kernel's `PAGEMAP_SCAN` over the
    /// whole region, so the answer costs what the region's populated memory
    /// costs, not its size. `None` where the region is not indexed that
    /// cheaply ([`HostRam::scans_cheaply`]) or the scan failed. The same
    /// "about this instant" rule as [`HostRam::populated`].
    pub fn populated_chunks(&self, region: usize, chunk_pages: u64) -> Option<Vec<bool>> {
        let r = self.regions.get(region)?;
        let pm = match (r.zero, &self.pagemap) {
            (ZeroKnowledge::Pagemap, Some(pm)) => pm,
            _ => return None,
        };
        let chunk_pages = chunk_pages.max(1);
        let mut out = vec![false; r.pages.div_ceil(chunk_pages) as usize];
        let scanned = pagemap_scan_each(pm, self.host_page, r.ptr as u64, r.pages, |p, n| {
            mark_chunks(&mut out, 0, chunk_pages, (p, n), true)
        });
        match scanned {
            Ok(()) => Some(out),
            Err(e) => {
                log::debug!("PAGEMAP_SCAN of region {region}: {e}; scanned a block at a time");
                None
            }
        }
    }

    /// [`HostRam::populated_ranges`] through [`HostRam::populated`], a
    /// chunk of flags at a time.
    fn ranges_from_flags(&self, region: usize, first: u64, end: u64) -> Vec<(u64, u64)> {
        const STEP: u64 = 64 * 1024;
        let mut flags = Vec::new();
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut at = first;
        while at < end {
            let n = (end - at).min(STEP);
            flags.clear();
            flags.resize(n as usize, false);
            self.populated(region, at, &mut flags);
            for (i, _) in flags.iter().enumerate().filter(|(_, f)| **f) {
                let p = at + i as u64;
                match out.last_mut() {
                    Some((f, m)) if *f + *m == p => *m += 1,
                    _ => out.push((p, 1)),
                }
            }
            at += n;
        }
        out
    }

    /// Makes every page of every region read as zero, cheaply where the
    /// backing allows: private anonymous memory's populated pages are
    /// dropped (`MADV_DONTNEED`, if the region is whole host pages; the
    /// pages `PAGEMAP_SCAN` finds, or all of them), a shared
    /// file's range is punched out
    /// (`FALLOC_FL_PUNCH_HOLE`), anything else is overwritten with zeros.
    /// Only for memory no vCPU runs on (the destination before the guest
    /// exists there). Returns the regions that had to be overwritten.
    pub fn scrub(&self) -> usize {
        let mut written = 0;
        for r in &self.regions {
            let len = (r.pages * PAGE_SIZE) as usize;
            let dropped = match r.zero {
                // SAFETY: ptr..ptr+len is private anonymous memory (the
                // GuestMemory contract); dropping its pages makes them read
                // as zero, which is the point. Only whole host pages: the
                // kernel would round a shorter length up, past the region.
                ZeroKnowledge::Pagemap if self.host_aligned(r.ptr, len) => {
                    self.drop_populated(r, len)
                }
                ZeroKnowledge::Pagemap => false,
                ZeroKnowledge::FileHoles { fd, offset } => {
                    // SAFETY: fallocate on a descriptor the guest memory
                    // keeps open; the range is the region's own.
                    unsafe {
                        libc::fallocate(
                            fd.as_raw_fd(),
                            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                            offset as libc::off_t,
                            len as libc::off_t,
                        ) == 0
                    }
                }
                ZeroKnowledge::Nothing => false,
            };
            if !dropped {
                // SAFETY: the whole region is one writable mapping (the
                // GuestMemory contract); nothing runs on this memory yet.
                unsafe { std::ptr::write_bytes(r.ptr, 0, len) };
                written += 1;
            }
        }
        written
    }
}

impl HostRam<'_> {
    /// Drops (`MADV_DONTNEED`) the pages of private anonymous region `r`
    /// (`len` bytes, whole host pages) that are populated — every page of
    /// it where the kernel cannot say which (no `PAGEMAP_SCAN`). Dropping
    /// memory never touched is not free: the kernel walks the range, and
    /// for memory registered with KVM so does KVM's MMU notifier (over its
    /// per-page metadata on a shadow-paging host: 10–43 ms for 61 GiB
    /// measured here). True if every `madvise` succeeded.
    fn drop_populated(&self, r: &Mapped<'_>, len: usize) -> bool {
        let scanned = self
            .pagemap
            .as_ref()
            .and_then(|pm| pagemap_scan(pm, self.host_page, r.ptr as u64, r.pages).ok());
        let ranges = scanned.unwrap_or_else(|| vec![(0, r.pages)]);
        ranges.iter().all(|&(p, n)| {
            let start = p * PAGE_SIZE / self.host_page * self.host_page;
            let end = ((p + n) * PAGE_SIZE).div_ceil(self.host_page) * self.host_page;
            let end = end.min(len as u64);
            // SAFETY: start..end lies inside the region (clipped to `len`),
            // which is private anonymous memory (the GuestMemory contract)
            // in whole host pages; dropping its pages makes them read as
            // zero, which is the point.
            unsafe {
                libc::madvise(
                    r.ptr.add(start as usize) as *mut libc::c_void,
                    (end - start) as usize,
                    libc::MADV_DONTNEED,
                ) == 0
            }
        })
    }

    /// Whether `ptr .. ptr + len` is whole host pages.
    fn host_aligned(&self, ptr: *mut u8, len: usize) -> bool {
        (ptr as u64).is_multiple_of(self.host_page) && (len as u64).is_multiple_of(self.host_page)
    }
}

#[cfg(feature = "uffd-fill")]
/// Whether `fd` is a file on hugetlbfs (`fstatfs`); false where it
/// cannot be told.
fn on_hugetlbfs(fd: BorrowedFd<'_>) -> bool {
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs on a descriptor the guest memory keeps open, into a
    // struct that lives across the call.
    let rc = unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) };
    rc == 0 && st.f_type as i64 == HUGETLBFS_MAGIC
}

/// `/proc/self/pagemap`, or `None` (logged once per session) where it
/// cannot be read: round 0 then reads every page of anonymous memory.
fn open_pagemap() -> Option<Arc<File>> {
    match File::open("/proc/self/pagemap") {
        Ok(f) => Some(Arc::new(f)),
        Err(e) => {
            log::info!("/proc/self/pagemap: {e}; round 0 reads every page");
            None
        }
    }
}

/// Reads `/proc/self/pagemap` for the `out.len()` engine pages from host
/// address `first_addr`: true where the host page holding the engine page
/// is present or swapped. Pagemap has one entry per host page of
/// `host_page` bytes (several engine pages share one on a 16 or 64 KiB
/// host).
fn pagemap_present(
    pm: &File,
    host_page: u64,
    first_addr: u64,
    out: &mut [bool],
) -> std::io::Result<()> {
    const ENTRIES: u64 = 1024;
    let mut buf = [0u8; 8 * ENTRIES as usize];
    let last = (first_addr + out.len() as u64 * PAGE_SIZE).saturating_sub(1) / host_page;
    // Entries `base .. base + have` are in `buf`.
    let (mut base, mut have) = (0u64, 0u64);
    for (i, o) in out.iter_mut().enumerate() {
        let entry = (first_addr + i as u64 * PAGE_SIZE) / host_page;
        if have == 0 || entry >= base + have {
            base = entry;
            have = (last + 1 - entry).min(ENTRIES);
            pm.read_exact_at(&mut buf[..(have * 8) as usize], base * 8)?;
        }
        let at = ((entry - base) * 8) as usize;
        let mut a = [0u8; 8];
        a.copy_from_slice(&buf[at..at + 8]);
        // bit 63: present, bit 62: swapped.
        *o = u64::from_le_bytes(a) & (3 << 62) != 0;
    }
    Ok(())
}

/// `struct pm_scan_arg` of `<linux/fs.h>` (Linux 6.7+).
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region` of `<linux/fs.h>`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = (3 << 30)
    | ((std::mem::size_of::<PmScanArg>() as libc::c_ulong) << 16)
    | ((b'f' as libc::c_ulong) << 8)
    | 16;
/// `PAGE_IS_PRESENT`, `PAGE_IS_SWAPPED` and `PAGE_IS_PFNZERO` (mapped to
/// the shared zero page).
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
const PAGE_IS_PFNZERO: u64 = 1 << 5;

/// The ranges of the `npages` engine pages from host address `start`
/// whose host pages are present (and not the shared zero page: a page only
/// ever read reads as zero) or swapped, as `(first, n)` in engine
/// pages from `start`, through the `PAGEMAP_SCAN` ioctl on `pm`.
fn pagemap_scan(
    pm: &File,
    host_page: u64,
    start: u64,
    npages: u64,
) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    pagemap_scan_each(pm, host_page, start, npages, |p, n| match out.last_mut() {
        Some((f, m)) if *f + *m >= p => *m = (*m).max(p + n - *f),
        _ => out.push((p, n)),
    })?;
    Ok(out)
}

/// Hands `f` the ranges [`pagemap_scan`] returns, `(first, n)` in engine
/// pages from `start`, in address order (adjacent ones not merged), as the
/// kernel reports them: nothing is kept here, however many there are.
fn pagemap_scan_each(
    pm: &File,
    host_page: u64,
    start: u64,
    npages: u64,
    mut f: impl FnMut(u64, u64),
) -> std::io::Result<()> {
    let end = start + npages * PAGE_SIZE;
    // The scan works in host pages: widen to whole host pages, clip back.
    let (wide_start, wide_end) = (
        start / host_page * host_page,
        end.div_ceil(host_page) * host_page,
    );
    let mut vec = [PageRegion::default(); 256];
    let mut at = wide_start;
    while at < wide_end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: at,
            end: wide_end,
            vec: vec.as_mut_ptr() as u64,
            vec_len: vec.len() as u64,
            // Inverted and required: the zero-page bit must be clear.
            category_inverted: PAGE_IS_PFNZERO,
            category_mask: PAGE_IS_PFNZERO,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            ..PmScanArg::default()
        };
        // SAFETY: PAGEMAP_SCAN on our own /proc/self/pagemap; `arg` is a
        // valid pm_scan_arg whose `vec` points at `vec.len()` page_region
        // entries that live across the call; the kernel only reads the
        // page tables of the range and writes `vec` and `arg.walk_end`.
        let n = unsafe { libc::ioctl(pm.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        #[cfg(feature = "test-util")]
        PAGEMAP_SCANS.fetch_add(1, Ordering::Relaxed);
        for r in vec.iter().take(n as usize) {
            let (a, b) = (r.start.max(start), r.end.min(end));
            if a >= b {
                continue;
            }
            let (p, q) = ((a - start) / PAGE_SIZE, (b - start).div_ceil(PAGE_SIZE));
            f(p, q - p);
        }
        if arg.walk_end <= at {
            return Err(std::io::Error::other("PAGEMAP_SCAN made no progress"));
        }
        at = arg.walk_end;
    }
    Ok(())
}

/// Marks the pages of `out` (from byte `start` of the file) that hold data
/// in the file (`SEEK_DATA`/`SEEK_HOLE`); holes read as zero.
fn file_data(fd: BorrowedFd<'_>, start: u64, out: &mut [bool]) -> std::io::Result<()> {
    let fd = fd.as_raw_fd();
    out.fill(false);
    let end = start + out.len() as u64 * PAGE_SIZE;
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek on a descriptor the guest memory keeps open; it
        // only moves that descriptor's offset, which nothing else uses.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(()); // no data past `pos`
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= end {
            return Ok(());
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = (hole as u64).min(end);
        let p0 = (data - start) / PAGE_SIZE;
        let p1 = (hole - start).div_ceil(PAGE_SIZE);
        for o in out.iter_mut().take(p1 as usize).skip(p0 as usize) {
            *o = true;
        }
        pos = hole.max(data + 1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::fd::{AsFd, FromRawFd};

    #[test]
    fn file_data_marks_exactly_the_pages_with_data() {
        // SAFETY: memfd_create with a NUL-terminated name; checked below.
        let fd = unsafe { libc::memfd_create(c"ram-test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        let mut f = unsafe { File::from_raw_fd(fd) };
        f.set_len(64 * PAGE_SIZE).unwrap();
        for p in [0u64, 5, 6, 63] {
            f.seek(SeekFrom::Start(p * PAGE_SIZE + 100)).unwrap();
            f.write_all(&[1]).unwrap();
        }
        let mut out = vec![false; 60];
        file_data(f.as_fd(), 2 * PAGE_SIZE, &mut out).unwrap();
        let got: Vec<usize> = (0..60).filter(|i| out[*i]).collect();
        assert_eq!(got, vec![3, 4]); // pages 5 and 6, from page 2; page 63 is past the end
    }

    /// A region described by hand: `(guest_addr, host, len)`.
    type Raw = (u64, *mut u8, u64);

    /// Memory described by hand.
    struct Described(Vec<Raw>);
    // SAFETY: test-only; the regions are never dereferenced, only checked.
    unsafe impl Send for Described {}
    // SAFETY: as above.
    unsafe impl Sync for Described {}
    // SAFETY: HostRam::new refuses these before any access (the test).
    unsafe impl GuestMemory for Described {
        fn regions(&self) -> Vec<crate::memory::HostRegion<'_>> {
            let other = Backing::Other;
            let r =
                |&(a, h, l): &(u64, *mut u8, u64)| crate::memory::HostRegion::new(a, h, l, other);
            self.0.iter().map(r).collect()
        }
        fn take_vmm_dirty(&self, _: usize, _: &mut [u64]) {}
    }

    #[test]
    fn memory_that_does_not_fit_the_layout_is_refused_by_name() {
        let layout = MemoryLayout::new(vec![crate::memory::RegionDesc {
            guest_addr: 0x10000,
            size: 4 * PAGE_SIZE,
        }])
        .unwrap();
        let host = 0x7f00_0000_0000usize as *mut u8;
        let len = 4 * PAGE_SIZE;
        let cases: [(Vec<Raw>, HostRegionError); 4] = [
            (vec![], HostRegionError::RegionCount { have: 0, want: 1 }),
            (
                vec![(0x10000, host, len), (0x20000, host, len)],
                HostRegionError::RegionCount { have: 2, want: 1 },
            ),
            (
                vec![(0x10000, host, len - PAGE_SIZE)],
                HostRegionError::Mismatch {
                    index: 0,
                    have_addr: 0x10000,
                    have_len: len - PAGE_SIZE,
                    want_addr: 0x10000,
                    want_len: len,
                },
            ),
            (
                vec![(0x10000, host.wrapping_add(8), len)],
                HostRegionError::Unaligned {
                    index: 0,
                    host: host as usize + 8,
                },
            ),
        ];
        for (regions, want) in cases {
            let mem = Described(regions);
            assert_eq!(HostRam::new(&mem, &layout).err(), Some(want));
        }
    }

    #[cfg(feature = "vm-memory")]
    #[test]
    fn pagemap_is_read_across_its_buffer_and_an_unreadable_one_means_read_all() {
        let pages = 2100;
        let layout = MemoryLayout::new(vec![crate::memory::RegionDesc {
            guest_addr: 0,
            size: pages * PAGE_SIZE,
        }])
        .unwrap();
        let mem = crate::memory::allocate(&layout).unwrap();
        let mut ram = HostRam::new(&mem, &layout).unwrap();
        let written = [0u64, 1023, 1024, 1025, 2047, 2099];
        for p in written {
            assert!(ram.write_pages(0, p, &[1u8; PAGE_SIZE as usize]));
        }
        let mut out = vec![false; pages as usize];
        ram.populated(0, 0, &mut out);
        let got: Vec<u64> = (0..pages).filter(|i| out[*i as usize]).collect();
        assert_eq!(got, written);
        let mut out = vec![false; 100];
        ram.populated(0, 1000, &mut out);
        let got: Vec<u64> = (0..100).filter(|i| out[*i as usize]).collect();
        assert_eq!(got, vec![23, 24, 25]);
        ram.pagemap = None;
        ram.populated(0, 0, &mut out);
        assert!(out.iter().all(|b| *b), "without pagemap every page is read");
    }

    /// `populated_ranges` (PAGEMAP_SCAN, and its pagemap fallback) says
    /// exactly what `populated` says, for sub-ranges that cut runs.
    #[cfg(feature = "vm-memory")]
    #[test]
    fn pages_only_read_are_not_populated_for_the_scan() {
        let layout = MemoryLayout::new(vec![crate::memory::RegionDesc {
            guest_addr: 0,
            size: 64 * PAGE_SIZE,
        }])
        .unwrap();
        let mem = crate::memory::allocate(&layout).unwrap();
        let ram = HostRam::new(&mem, &layout).unwrap();
        let mut buf = [0u8; PAGE_SIZE as usize];
        // Read (the kernel maps its zero page), then written.
        for p in [3u64, 4, 9, 40] {
            assert!(ram.read_pages(0, p, &mut buf));
        }
        assert!(ram.write_pages(0, 4, &[1u8; PAGE_SIZE as usize]));
        assert!(ram.write_pages(0, 41, &[2u8; PAGE_SIZE as usize]));
        let mut flags = [false; 64];
        ram.populated(0, 0, &mut flags);
        assert!(flags[3] && flags[4], "pagemap entries count read pages");
        if ram.scans_cheaply(0) {
            assert_eq!(ram.populated_ranges(0, 0, 64), vec![(4, 1), (41, 1)]);
        }
    }

    /// Whether the host gives anonymous memory transparent huge pages when
    /// it is advised (`enabled` `always` or `madvise`).
    #[cfg(feature = "vm-memory")]
    fn host_thp() -> bool {
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|s| s.contains("[always]") || s.contains("[madvise]"))
    }

    /// Memory advised `MADV_HUGEPAGE` (livemig-kvm's default): a read of a
    /// never-written huge page maps the kernel's huge zero page, which the
    /// scan leaves out where the kernel flags it `PAGE_IS_PFNZERO` (Linux
    /// 6.18 does) and reports whole otherwise (older kernels: read, all
    /// zero, never wrong); one written page populates its whole 2 MiB,
    /// whose other pages read as zero (round 0 sends them as zero pages);
    /// scrub drops it all.
    #[cfg(feature = "vm-memory")]
    #[test]
    fn a_thp_region_scans_read_huge_pages_as_zero_and_written_ones_whole() {
        const HUGE: u64 = 512;
        let pages = 4 * HUGE;
        let layout = MemoryLayout::new(vec![crate::memory::RegionDesc {
            guest_addr: 0,
            size: pages * PAGE_SIZE,
        }])
        .unwrap();
        let mem = crate::memory::allocate(&layout).unwrap();
        let base = mem.regions()[0].host;
        if !(base as u64).is_multiple_of(HUGE * PAGE_SIZE) || !host_thp() {
            eprintln!("*** SKIPPED: no THP here (or an unaligned mapping) ***");
            return;
        }
        // SAFETY: the region's own mapping; advice changes no contents.
        let rc = unsafe {
            libc::madvise(
                base.cast(),
                (pages * PAGE_SIZE) as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        assert_eq!(rc, 0);
        let ram = HostRam::new(&mem, &layout).unwrap();
        let mut buf = [0u8; PAGE_SIZE as usize];
        assert!(ram.read_pages(0, 3, &mut buf)); // huge page 0: read only
        assert!(ram.write_pages(0, HUGE + 88, &[7u8; PAGE_SIZE as usize])); // huge page 1
        assert!(ram.read_pages(0, 3 * HUGE + 1, &mut buf)); // huge page 3: read only
        if !ram.scans_cheaply(0) {
            eprintln!("*** SKIPPED: no PAGEMAP_SCAN here ***");
            return;
        }
        let got = ram.populated_ranges(0, 0, pages);
        let written = (HUGE, HUGE);
        let flagged = vec![written];
        let unflagged = vec![(0, 2 * HUGE), (3 * HUGE, HUGE)];
        assert!(
            got == flagged || got == unflagged,
            "a written huge page is scanned whole, read ones never alone: {got:?}"
        );
        eprintln!(
            "huge zero page {} by PAGEMAP_SCAN",
            if got == flagged {
                "left out"
            } else {
                "reported"
            }
        );
        for p in (HUGE..2 * HUGE).filter(|p| *p != HUGE + 88) {
            assert!(ram.is_zero(0, p), "page {p}");
        }
        assert!(!ram.is_zero(0, HUGE + 88));
        // A sub-range that cuts the huge page.
        assert_eq!(
            ram.populated_ranges(0, HUGE + 500, HUGE + 600),
            vec![(HUGE + 500, 12)]
        );
        assert_eq!(ram.scrub(), 0);
        assert!(ram.populated_ranges(0, 0, pages).is_empty());
        assert!(ram.is_zero(0, HUGE + 88));
    }

    #[test]
    fn populated_ranges_match_the_page_by_page_answer() {
        let pages = 3 * 512 + 77;
        let layout = MemoryLayout::new(vec![crate::memory::RegionDesc {
            guest_addr: 0,
            size: pages * PAGE_SIZE,
        }])
        .unwrap();
        let mem = crate::memory::allocate(&layout).unwrap();
        let ram = HostRam::new(&mem, &layout).unwrap();
        for p in [0u64, 1, 2, 511, 512, 700, 701, 1023, 1535, pages - 1] {
            assert!(ram.write_pages(0, p, &[3u8; PAGE_SIZE as usize]));
        }
        let flags_to_ranges = |first: u64, end: u64| {
            let mut f = vec![false; (end - first) as usize];
            ram.populated(0, first, &mut f);
            let mut out: Vec<(u64, u64)> = Vec::new();
            for p in (first..end).filter(|p| f[(p - first) as usize]) {
                match out.last_mut() {
                    Some((a, n)) if *a + *n == p => *n += 1,
                    _ => out.push((p, 1)),
                }
            }
            out
        };
        for (first, end) in [(0, pages), (1, 701), (2, 3), (600, 1600), (1536, pages)] {
            let want = flags_to_ranges(first, end);
            assert_eq!(ram.populated_ranges(0, first, end), want, "{first}..{end}");
            assert_eq!(ram.ranges_from_flags(0, first, end), want, "{first}..{end}");
        }
        let pm = ram.pagemap.as_deref().expect("pagemap");
        let base = mem.regions()[0].host as u64;
        if let Err(e) = pagemap_scan(pm, ram.host_page, base, pages) {
            eprintln!("PAGEMAP_SCAN unavailable here ({e}): only the fallback was checked");
        }
        assert_eq!(ram.populated_ranges(0, 0, 3), vec![(0, 3)]);
        assert!(ram.populated_ranges(0, 3, 511).is_empty());
        assert!(ram.populated_ranges(1, 0, 10).is_empty(), "no such region");
    }

    #[cfg(feature = "vm-memory")]
    #[test]
    fn untouched_anonymous_pages_are_not_populated_and_scrub_zeroes() {
        let layout = MemoryLayout::new(vec![crate::memory::RegionDesc {
            guest_addr: 0,
            size: 64 * PAGE_SIZE,
        }])
        .unwrap();
        let mem = crate::memory::allocate(&layout).unwrap();
        let ram = HostRam::new(&mem, &layout).unwrap();
        assert!(ram.write_pages(0, 7, &[9u8; PAGE_SIZE as usize]));
        let mut out = vec![true; 64];
        ram.populated(0, 0, &mut out);
        let got: Vec<usize> = (0..64).filter(|i| out[*i]).collect();
        assert_eq!(got, vec![7]);
        for p in [30, 31, 63] {
            assert!(ram.write_pages(0, p, &[p as u8; PAGE_SIZE as usize]));
        }
        // Only the populated pages are dropped (one `madvise` per run).
        assert_eq!(ram.scrub(), 0);
        assert!(ram.populated_ranges(0, 0, 64).is_empty());
        for p in 0..64 {
            assert!(ram.is_zero(0, p), "page {p}");
        }
    }

    /// A hugetlb memfd (2 MiB pages) as `SharedFile` memory: hugetlbfs
    /// reports the whole file as data (`SEEK_DATA` finds no hole), so every
    /// page counts as populated — read, never wrongly skipped — and
    /// punching a hole (scrub: whole huge pages; `zero_pages` writes) makes
    /// pages read as zero. Skipped where the host has no free huge pages.
    #[cfg(feature = "vm-memory")]
    #[test]
    fn hugetlb_memfd_pages_are_all_populated_and_scrub_zeroes() {
        use crate::memory::SummaryBitmap;
        use std::sync::Arc;
        use vm_memory::bitmap::NewBitmap;
        use vm_memory::mmap::MmapRegionBuilder;
        use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};
        const SIZE: u64 = 4 << 20;
        // SAFETY: memfd_create with a NUL-terminated name; checked below.
        let fd = unsafe {
            libc::memfd_create(c"ram-huge".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_HUGETLB)
        };
        // SAFETY: a fresh descriptor nobody else owns (if any).
        let f = (fd >= 0).then(|| unsafe { File::from_raw_fd(fd) });
        let built = f.and_then(|f| {
            f.set_len(SIZE).ok()?;
            MmapRegionBuilder::new_with_bitmap(
                SIZE as usize,
                SummaryBitmap::with_len(SIZE as usize),
            )
            .with_file_offset(FileOffset::from_arc(Arc::new(f), 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .with_hugetlbfs(true)
            .build()
            .ok()
        });
        let Some(mapping) = built else {
            eprintln!("*** SKIPPED: no free huge pages (hugetlb memfd) ***");
            return;
        };
        let region = GuestRegionMmap::new(mapping, GuestAddress(0)).unwrap();
        let mem = crate::memory::GuestRam::from_regions(vec![region]).unwrap();
        let layout = MemoryLayout::new(vec![crate::memory::RegionDesc {
            guest_addr: 0,
            size: SIZE,
        }])
        .unwrap();
        let ram = HostRam::new(&mem, &layout).unwrap();
        let pages = SIZE / PAGE_SIZE;
        assert!(ram.write_pages(0, 7, &[9u8; PAGE_SIZE as usize]));
        assert!(ram.write_pages(0, 600, &[3u8; PAGE_SIZE as usize]));
        let mut out = vec![false; pages as usize];
        ram.populated(0, 0, &mut out);
        assert!(out[7] && out[600], "a written page is never skipped");
        assert_eq!(ram.populated_ranges(0, 0, pages), vec![(0, pages)]);
        assert!(ram.zero_pages(0, 600, 1));
        assert!(ram.is_zero(0, 600) && !ram.is_zero(0, 7));
        assert_eq!(ram.scrub(), 0, "punched, not overwritten");
        assert!(ram.is_zero(0, 7));
    }
}
