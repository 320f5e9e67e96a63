//! Direct access to guest RAM through the host mappings, for the engine's
//! bulk copies (vm-memory's per-access checks would dominate at GB/s).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _};

use crate::memory::{GuestRam, MemoryLayout, PAGE_SIZE};

/// How a region's host mapping is backed, which decides how the engine
/// may learn that a page it never read is zero.
///
/// - [`Backing::PrivateAnonymous`]: a page that is neither present nor
///   swapped (`/proc/self/pagemap`) was never touched and reads as zero.
/// - [`Backing::SharedFile`] (memfd, shmem, hugetlbfs or another file
///   mapped `MAP_SHARED`): the file's holes (`SEEK_DATA`/`SEEK_HOLE`) read
///   as zero, whether or not this process ever mapped the page; pagemap is
///   no guide (pages written through another mapping, swapped shmem).
/// - [`Backing::Other`] (a `MAP_PRIVATE` file mapping, whose unfaulted
///   pages read the file; shared anonymous memory): nothing is known, every
///   page must be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backing {
    PrivateAnonymous,
    SharedFile { fd: RawFd, offset: u64 },
    Other,
}

impl Backing {
    fn of(r: &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>) -> Backing {
        let flags = r.flags();
        match r.file_offset() {
            None if flags & libc::MAP_ANONYMOUS != 0 && flags & libc::MAP_SHARED == 0 => {
                Backing::PrivateAnonymous
            }
            Some(fo) if flags & libc::MAP_SHARED != 0 => Backing::SharedFile {
                fd: fo.file().as_raw_fd(),
                offset: fo.start(),
            },
            _ => Backing::Other,
        }
    }
}

/// Host view of one guest region.
#[derive(Debug, Clone, Copy)]
struct HostRegion {
    ptr: *mut u8,
    pages: u64,
    backing: Backing,
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
    _mem: &'a GuestRam,
    regions: Vec<HostRegion>,
    /// `/proc/self/pagemap`, if it can be read.
    pagemap: Option<Arc<File>>,
}

// SAFETY: the pointers refer to mappings owned by `_mem`, which outlives this
// value; HostRam only hands out copies, never references that escape it.
unsafe impl Send for HostRam<'_> {}
// SAFETY: all accesses are raw copies into or out of the mappings; several
// threads may copy disjoint pages at once (the multi-stream receiver writes
// each page from exactly one stream thread), and concurrent reads of pages
// the guest is writing are the pre-copy race described above.
unsafe impl Sync for HostRam<'_> {}

impl<'a> HostRam<'a> {
    /// Resolves the host mappings for `layout` in `mem`.
    pub fn new(mem: &'a GuestRam, layout: &MemoryLayout) -> Option<Self> {
        let mut regions = Vec::new();
        for r in layout.regions() {
            let ptr = mem.get_host_address(GuestAddress(r.guest_addr)).ok()?;
            // The whole region must be one contiguous mapping.
            let last = mem.get_host_address(GuestAddress(r.end() - 1)).ok()?;
            if last as usize != ptr as usize + (r.size as usize - 1) {
                return None;
            }
            let host = mem.find_region(GuestAddress(r.guest_addr))?;
            // The mapping's start is the region's start (one mapping per
            // region was checked above); a file offset applies from there.
            let backing = match Backing::of(host) {
                Backing::SharedFile { fd, offset } => Backing::SharedFile {
                    fd,
                    offset: offset + (r.guest_addr - host.start_addr().0),
                },
                b => b,
            };
            regions.push(HostRegion {
                ptr,
                pages: r.pages(),
                backing,
            });
        }
        let pagemap = File::open("/proc/self/pagemap").ok().map(Arc::new);
        Some(HostRam {
            _mem: mem,
            regions,
            pagemap,
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
        match r.backing {
            Backing::PrivateAnonymous => {
                if let Some(pm) = &self.pagemap {
                    let first_host = r.ptr as u64 / PAGE_SIZE + first;
                    if pagemap_present(pm, first_host, out).is_err() {
                        out.fill(true);
                    }
                }
            }
            Backing::SharedFile { fd, offset } => {
                let start = offset + first * PAGE_SIZE;
                if file_data(fd, start, out).is_err() {
                    out.fill(true);
                }
            }
            Backing::Other => {}
        }
    }

    /// Makes every page of every region read as zero, cheaply where the
    /// backing allows: private anonymous memory is dropped
    /// (`MADV_DONTNEED`), a shared file's range is punched out
    /// (`FALLOC_FL_PUNCH_HOLE`), anything else is overwritten with zeros.
    /// Only for memory no vCPU runs on (the destination before the guest
    /// exists there). Returns the regions that had to be overwritten.
    pub fn scrub(&self) -> usize {
        let mut written = 0;
        for r in &self.regions {
            let len = (r.pages * PAGE_SIZE) as usize;
            let dropped = match r.backing {
                // SAFETY: ptr..ptr+len is one private anonymous mapping
                // owned by the guest memory object; dropping its pages
                // makes them read as zero, which is the point.
                Backing::PrivateAnonymous => unsafe {
                    libc::madvise(r.ptr as *mut libc::c_void, len, libc::MADV_DONTNEED) == 0
                },
                Backing::SharedFile { fd, offset } => {
                    // SAFETY: fallocate on a descriptor the guest memory
                    // object keeps open; the range is the region's own.
                    unsafe {
                        libc::fallocate(
                            fd,
                            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                            offset as libc::off_t,
                            len as libc::off_t,
                        ) == 0
                    }
                }
                Backing::Other => false,
            };
            if !dropped {
                // SAFETY: the whole region is one writable mapping (checked
                // in `new`); nothing runs on this memory yet.
                unsafe { std::ptr::write_bytes(r.ptr, 0, len) };
                written += 1;
            }
        }
        written
    }
}

/// Reads `/proc/self/pagemap` for `out.len()` host pages from `first_host`:
/// true where a page is present or swapped.
fn pagemap_present(pm: &File, first_host: u64, out: &mut [bool]) -> std::io::Result<()> {
    let mut buf = [0u8; 8 * 1024];
    for (c, chunk) in out.chunks_mut(1024).enumerate() {
        let bytes = &mut buf[..chunk.len() * 8];
        pm.read_exact_at(bytes, (first_host + c as u64 * 1024) * 8)?;
        for (o, e) in chunk.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut a = [0u8; 8];
            a.copy_from_slice(e);
            // bit 63: present, bit 62: swapped.
            *o = u64::from_le_bytes(a) & (3 << 62) != 0;
        }
    }
    Ok(())
}

/// Marks the pages of `out` (from byte `start` of the file) that hold data
/// in the file (`SEEK_DATA`/`SEEK_HOLE`); holes read as zero.
fn file_data(fd: RawFd, start: u64, out: &mut [bool]) -> std::io::Result<()> {
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
    use std::os::fd::FromRawFd;

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
        file_data(f.as_raw_fd(), 2 * PAGE_SIZE, &mut out).unwrap();
        let got: Vec<usize> = (0..60).filter(|i| out[*i]).collect();
        assert_eq!(got, vec![3, 4]); // pages 5 and 6, from page 2; page 63 is past the end
    }

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
        assert_eq!(ram.scrub(), 0);
        assert!(ram.is_zero(0, 7));
    }
}
