//! Direct access to guest RAM through the host mappings, for the engine's
//! bulk copies (vm-memory's per-access checks would dominate at GB/s).

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::{GuestAddress, GuestMemoryBackend as _};

use crate::memory::{GuestRam, MemoryLayout, PAGE_SIZE};

/// Host view of one guest region.
#[derive(Debug, Clone, Copy)]
struct HostRegion {
    ptr: *mut u8,
    pages: u64,
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
            regions.push(HostRegion {
                ptr,
                pages: r.pages(),
            });
        }
        Some(HostRam { _mem: mem, regions })
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

    /// Marks in `out` (one bool per page) the pages of `region` that exist in
    /// the host (present or swapped, from /proc/self/pagemap). Pages of an
    /// anonymous mapping that were never touched are neither, and read as
    /// zero. Returns None if pagemap cannot be read (then assume all exist).
    pub fn populated(&self, region: usize) -> Option<Vec<bool>> {
        let r = self.regions.get(region)?;
        let f = File::open("/proc/self/pagemap").ok()?;
        let host_page = 4096u64;
        let first = r.ptr as u64 / host_page;
        let n = r.pages;
        let mut out = vec![false; n as usize];
        let mut buf = vec![0u8; 8 * 8192];
        let mut done = 0u64;
        while done < n {
            let count = (n - done).min(8192);
            let bytes = &mut buf[..(count * 8) as usize];
            f.read_exact_at(bytes, (first + done) * 8).ok()?;
            for (i, e) in bytes.chunks_exact(8).enumerate() {
                let mut a = [0u8; 8];
                a.copy_from_slice(e);
                let v = u64::from_le_bytes(a);
                // bit 63: present, bit 62: swapped.
                out[(done as usize) + i] = v & (3 << 62) != 0;
            }
            done += count;
        }
        Some(out)
    }
}
