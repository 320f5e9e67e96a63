//! Guest memory as the engine sees it: the [`GuestMemory`] seam (the
//! regions as guest address, host pointer, length and backing, and the
//! VMM's own dirty bits), and the memory *layout* (region addresses and
//! sizes) exchanged in the handshake.
//!
//! With the default feature `vm-memory`, vm-memory's `GuestMemoryMmap<B>`
//! implements [`GuestMemory`] for the dirty bitmaps of [`VmmBitmap`]:
//! [`SummaryBitmap`] ([`GuestRam`]) and vm-memory's `AtomicBitmap`;
//! the vm-memory version adapted is re-exported as [`crate::vm_memory`].
//! Any other memory (a VMM's own mmap, another vm-memory version) plugs in
//! by implementing [`GuestMemory`] itself.

use std::os::fd::BorrowedFd;

use serde::{Deserialize, Serialize};

#[cfg(feature = "vm-memory")]
mod summary_bitmap;
#[cfg(feature = "vm-memory")]
mod vm_adapter;
#[cfg(feature = "vm-memory")]
pub use summary_bitmap::SummaryBitmap;
#[cfg(feature = "vm-memory")]
pub use vm_adapter::{allocate, GuestRam, VmmBitmap};

/// Size of a guest page as the engine counts it: the unit of dirty
/// tracking, of the dirty bitmaps and of transfer (the wire format's page).
///
/// It is fixed at 4 KiB whatever the host's page size
/// ([`host_page_size`]): a host page of 16 or 64 KiB is several engine
/// pages. Where the host page matters, the engine asks for it: reading
/// `/proc/self/pagemap` (one entry per host page), dropping pages with
/// `madvise` (which fails on an unaligned range, and the engine then writes
/// zeros instead), and the vm-memory adapter (whose `AtomicBitmap` counts
/// host pages). Region addresses, sizes and host pointers must be multiples
/// of 4 KiB ([`HostRegionError`] otherwise).
pub const PAGE_SIZE: u64 = 4096;

/// The host's page size (`sysconf(_SC_PAGESIZE)`), or [`PAGE_SIZE`] if the
/// system does not say.
pub fn host_page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n)
        .ok()
        .filter(|n| *n > 0)
        .unwrap_or(PAGE_SIZE)
}

/// How a region's host mapping is backed. The engine uses it to learn,
/// without reading them, which pages read as zero (round 0 skips them) and
/// how to make a destination's memory read as zero before the first page
/// arrives. Saying [`Backing::Other`] is always correct, only slower.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Backing<'a> {
    /// A private anonymous mapping (`MAP_PRIVATE | MAP_ANONYMOUS`): a page
    /// that is neither present nor swapped (`/proc/self/pagemap`) was never
    /// touched and reads as zero; `MADV_DONTNEED` makes a page read as zero.
    /// Where `/proc/self/pagemap` cannot be read, every page is read.
    PrivateAnonymous,
    /// A file mapped `MAP_SHARED` (memfd, shmem, hugetlbfs, a file): the
    /// file's holes (`SEEK_DATA`/`SEEK_HOLE`) read as zero whether or not
    /// this process ever mapped the page, and punching a hole
    /// (`FALLOC_FL_PUNCH_HOLE`) makes a range read as zero.
    SharedFile {
        /// The file. The engine calls `lseek` (`SEEK_DATA`/`SEEK_HOLE`)
        /// and `fallocate` on it; it moves the descriptor's offset, so the
        /// VMM must not use that offset (`pread`/`pwrite` are fine).
        fd: BorrowedFd<'a>,
        /// The file offset mapped at the region's first byte.
        offset: u64,
    },
    /// Anything else (a `MAP_PRIVATE` file mapping, whose unfaulted pages
    /// read the file; shared anonymous memory; memory the VMM does not
    /// want the engine to reason about): every page is read, and a
    /// destination's memory is zeroed by writing zeros.
    Other,
}

/// One region of guest memory as the host sees it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct HostRegion<'a> {
    /// Guest-physical address of the first byte.
    pub guest_addr: u64,
    /// Host address of the first byte.
    pub host: *mut u8,
    /// Length in bytes.
    pub len: u64,
    /// How the host mapping is backed.
    pub backing: Backing<'a>,
}

impl<'a> HostRegion<'a> {
    /// A region of `len` bytes at guest-physical `guest_addr`, mapped at
    /// `host`. Building one is safe; handing it to the engine is what the
    /// [`GuestMemory`] implementation vouches for.
    pub fn new(guest_addr: u64, host: *mut u8, len: u64, backing: Backing<'a>) -> Self {
        HostRegion {
            guest_addr,
            host,
            len,
            backing,
        }
    }

    /// The region's guest-physical range as a layout entry.
    pub fn desc(&self) -> RegionDesc {
        RegionDesc {
            guest_addr: self.guest_addr,
            size: self.len,
        }
    }
}

/// Guest memory as the engine needs it: where each region is mapped on the
/// host and how it is backed, and the pages the VMM itself wrote.
///
/// The engine reads guest memory (source) and writes it (destination)
/// through the host pointers directly, in bulk, from its own threads; it
/// never goes through the VMM's accessors. The guest's own writes are
/// reported by a [`DirtyTracker`](crate::vm::DirtyTracker); the VMM's writes
/// (device emulation, loaders: anything that writes guest memory without a
/// vCPU) are reported by [`GuestMemory::take_vmm_dirty`].
///
/// # Safety
///
/// The engine dereferences the host pointers, so an implementation
/// promises, for as long as the `&self` borrow the engine holds lasts:
///
/// - every region returned by [`GuestMemory::regions`] is `len` bytes of
///   readable and writable memory mapped at `host`, which is neither
///   unmapped, nor remapped, nor made read-only meanwhile (the engine
///   writes to it on the destination, and may read it from several threads
///   at once);
/// - `host` and `len` are multiples of [`PAGE_SIZE`] (checked by the engine
///   too), and the regions do not overlap, neither in guest-physical nor in
///   host addresses;
/// - [`GuestMemory::regions`] returns the same regions, in the same order,
///   sorted by guest address, every time it is called;
/// - a [`Backing::SharedFile`] descriptor stays open and is the file
///   mapped there, at that offset; a region said to be
///   [`Backing::PrivateAnonymous`] is such a mapping (the engine drops its
///   pages with `MADV_DONTNEED` on the destination).
///
/// Concurrent writes by running vCPUs or devices are expected (pre-copy
/// reads pages the guest is changing; the dirty bits make up for it); they
/// are not a breach of this contract.
pub unsafe trait GuestMemory: Send + Sync {
    /// The regions, sorted by guest-physical address.
    fn regions(&self) -> Vec<HostRegion<'_>>;

    /// ORs into `words` every 4 KiB page of region `region` (its index in
    /// [`GuestMemory::regions`]) that the VMM itself wrote since the
    /// previous call, and forgets them: bit `p % 64` of word `p / 64` is
    /// page `p` of the region ([`PAGE_SIZE`] pages, whatever the host's
    /// page size). `words` has one word per 64 pages of the region.
    ///
    /// The engine calls it when dirty tracking starts (to forget older
    /// writes), after every dirty-log sync and after the final pause.
    ///
    /// A VMM whose devices never write guest memory, or which reports
    /// their writes through its [`DirtyTracker`](crate::vm::DirtyTracker)
    /// instead, leaves `words` alone; it must say why in its
    /// implementation, since a write reported by neither is lost.
    fn take_vmm_dirty(&self, region: usize, words: &mut [u64]);

    /// The same as [`GuestMemory::take_vmm_dirty`], handing each word with
    /// a written page to `f` as (word index, bits) instead of ORing all of
    /// the region's words into a buffer; the engine calls this one.
    ///
    /// The default calls [`GuestMemory::take_vmm_dirty`] with a buffer of
    /// the region's size. An implementation whose record of writes is
    /// sparse (vm-memory's adapter with [`SummaryBitmap`]) overrides it so
    /// that a take costs what was written, not the region's size.
    fn take_vmm_dirty_words(&self, region: usize, f: &mut dyn FnMut(usize, u64)) {
        let Some(r) = self.regions().into_iter().nth(region) else {
            return;
        };
        let mut words = vec![0; r.len.div_ceil(PAGE_SIZE * 64) as usize];
        self.take_vmm_dirty(region, &mut words);
        for (i, w) in words.into_iter().enumerate().filter(|(_, w)| *w != 0) {
            f(i, w);
        }
    }
}

/// Why a [`GuestMemory`] cannot be used for a layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostRegionError {
    /// The memory has a different number of regions than the layout.
    #[error("guest memory has {have} regions, the layout {want}")]
    RegionCount {
        /// Regions of the memory.
        have: usize,
        /// Regions of the layout.
        want: usize,
    },
    /// A region differs from the layout's.
    #[error("region {index} is 0x{have_addr:x}+0x{have_len:x}, the layout says 0x{want_addr:x}+0x{want_len:x}")]
    Mismatch {
        /// Index of the region.
        index: usize,
        /// The memory's guest address and length.
        have_addr: u64,
        /// (length)
        have_len: u64,
        /// The layout's guest address and size.
        want_addr: u64,
        /// (size)
        want_len: u64,
    },
    /// A host pointer is null or not a multiple of [`PAGE_SIZE`].
    #[error("region {index}: host address {host:#x} is not 4 KiB aligned")]
    Unaligned {
        /// Index of the region.
        index: usize,
        /// The host address.
        host: usize,
    },
}

/// One contiguous region of guest-physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionDesc {
    /// Guest-physical start address (page aligned).
    pub guest_addr: u64,
    /// Size in bytes (a multiple of [`PAGE_SIZE`]).
    pub size: u64,
}

impl RegionDesc {
    /// Number of pages in the region.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// One past the last guest-physical address of the region.
    pub fn end(&self) -> u64 {
        self.guest_addr.saturating_add(self.size)
    }
}

/// Errors about memory layouts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayoutError {
    /// A region start or size is not a multiple of the page size.
    #[error("region {index} (0x{guest_addr:x}+0x{size:x}) is not page aligned")]
    Unaligned {
        /// Index of the region.
        index: usize,
        /// Its start.
        guest_addr: u64,
        /// Its size.
        size: u64,
    },
    /// Regions overlap, are out of order, are empty, or wrap around.
    #[error("region {index} overlaps, is empty, wraps, or is out of order")]
    Overlap {
        /// Index of the offending region.
        index: usize,
    },
    /// More regions than the engine accepts.
    #[error("{0} regions is more than the limit of {MAX_REGIONS}")]
    TooManyRegions(usize),
}

/// The most regions a layout may have (bounds what a receiver allocates).
pub const MAX_REGIONS: usize = 64;

/// The guest-physical memory layout: sorted, non-overlapping, page-aligned
/// regions. Both sides must agree on it exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    regions: Vec<RegionDesc>,
}

impl MemoryLayout {
    /// Validates and builds a layout.
    pub fn new(regions: Vec<RegionDesc>) -> Result<Self, LayoutError> {
        if regions.len() > MAX_REGIONS {
            return Err(LayoutError::TooManyRegions(regions.len()));
        }
        let mut prev_end = 0u64;
        for (index, r) in regions.iter().enumerate() {
            if r.guest_addr % PAGE_SIZE != 0 || r.size % PAGE_SIZE != 0 {
                return Err(LayoutError::Unaligned {
                    index,
                    guest_addr: r.guest_addr,
                    size: r.size,
                });
            }
            if r.size == 0
                || r.guest_addr.checked_add(r.size).is_none()
                || (index > 0 && r.guest_addr < prev_end)
            {
                return Err(LayoutError::Overlap { index });
            }
            prev_end = r.end();
        }
        Ok(MemoryLayout { regions })
    }

    /// The layout of an existing guest memory object (its regions must be
    /// sorted by address, as [`GuestMemory::regions`] promises).
    pub fn of(mem: &dyn GuestMemory) -> Result<Self, LayoutError> {
        Self::new(mem.regions().iter().map(HostRegion::desc).collect())
    }

    /// The regions, sorted by address.
    pub fn regions(&self) -> &[RegionDesc] {
        &self.regions
    }

    /// Total bytes of guest memory.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Total pages of guest memory.
    pub fn total_pages(&self) -> u64 {
        self.total_bytes() / PAGE_SIZE
    }

    /// Checks that `[guest_addr, guest_addr + npages * PAGE_SIZE)` lies inside
    /// one region and is page aligned; returns the region index and the page
    /// index within that region.
    pub fn locate(&self, guest_addr: u64, npages: u64) -> Option<(usize, u64)> {
        if !guest_addr.is_multiple_of(PAGE_SIZE) || npages == 0 {
            return None;
        }
        let len = npages.checked_mul(PAGE_SIZE)?;
        let end = guest_addr.checked_add(len)?;
        let idx = self
            .regions
            .iter()
            .position(|r| guest_addr >= r.guest_addr && end <= r.end())?;
        Some((idx, (guest_addr - self.regions[idx].guest_addr) / PAGE_SIZE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(a: u64, s: u64) -> RegionDesc {
        RegionDesc {
            guest_addr: a,
            size: s,
        }
    }

    #[test]
    fn layout_validation() {
        assert!(MemoryLayout::new(vec![rd(0, 4096), rd(8192, 4096)]).is_ok());
        assert!(matches!(
            MemoryLayout::new(vec![rd(1, 4096)]),
            Err(LayoutError::Unaligned { .. })
        ));
        assert!(matches!(
            MemoryLayout::new(vec![rd(0, 8192), rd(4096, 4096)]),
            Err(LayoutError::Overlap { index: 1 })
        ));
        assert!(matches!(
            MemoryLayout::new(vec![rd(0, 0)]),
            Err(LayoutError::Overlap { index: 0 })
        ));
        assert!(matches!(
            MemoryLayout::new(vec![rd(u64::MAX - 4095, 8192)]),
            Err(LayoutError::Unaligned { .. }) | Err(LayoutError::Overlap { .. })
        ));
    }

    #[test]
    fn locate_bounds() {
        let l = MemoryLayout::new(vec![rd(0, 4 * 4096), rd(0x10000, 2 * 4096)]).unwrap();
        assert_eq!(l.locate(0, 4), Some((0, 0)));
        assert_eq!(l.locate(4096, 3), Some((0, 1)));
        assert_eq!(l.locate(4096, 4), None);
        assert_eq!(l.locate(0x10000 + 4096, 1), Some((1, 1)));
        assert_eq!(l.locate(0x10000 + 4096, 2), None);
        assert_eq!(l.locate(0x8000, 1), None);
        assert_eq!(l.locate(12, 1), None);
        assert_eq!(l.locate(u64::MAX - 4095, u64::MAX), None);
        assert_eq!(l.total_pages(), 6);
    }

    #[cfg(feature = "vm-memory")]
    #[test]
    fn allocate_matches_layout() {
        let l = MemoryLayout::new(vec![rd(0, 16 * 4096), rd(0x100000, 4096)]).unwrap();
        let m = allocate(&l).unwrap();
        assert_eq!(MemoryLayout::of(&m).unwrap(), l);
    }
}
