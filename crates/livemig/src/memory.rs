//! Guest memory as the engine sees it: a vm-memory `GuestMemoryMmap` whose
//! regions carry an [`AtomicBitmap`] recording the VMM's own writes, and the
//! memory *layout* (region addresses and sizes) exchanged in the handshake.

use serde::{Deserialize, Serialize};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Size of a guest page, the unit of dirty tracking and transfer.
pub const PAGE_SIZE: u64 = 4096;

/// Guest memory with vm-memory's dirty bitmap enabled: every write the VMM
/// makes through vm-memory (device emulation, loaders) marks its pages dirty,
/// and the engine merges those marks into each round's dirty set.
pub type GuestRam = vm_memory::GuestMemoryMmap<AtomicBitmap>;

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

    /// The layout of an existing guest memory object.
    pub fn of(mem: &GuestRam) -> Result<Self, LayoutError> {
        let mut regions: Vec<RegionDesc> = mem
            .iter()
            .map(|r| RegionDesc {
                guest_addr: r.start_addr().0,
                size: r.len(),
            })
            .collect();
        regions.sort_by_key(|r| r.guest_addr);
        Self::new(regions)
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

/// Creates guest memory with dirty bitmaps for a layout (anonymous, private
/// mappings: pages the guest never touches cost nothing).
pub fn allocate(layout: &MemoryLayout) -> Result<GuestRam, vm_memory::mmap::FromRangesError> {
    let ranges: Vec<(vm_memory::GuestAddress, usize)> = layout
        .regions()
        .iter()
        .map(|r| (vm_memory::GuestAddress(r.guest_addr), r.size as usize))
        .collect();
    GuestRam::from_ranges(&ranges)
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

    #[test]
    fn allocate_matches_layout() {
        let l = MemoryLayout::new(vec![rd(0, 16 * 4096), rd(0x100000, 4096)]).unwrap();
        let m = allocate(&l).unwrap();
        assert_eq!(MemoryLayout::of(&m).unwrap(), l);
    }
}
