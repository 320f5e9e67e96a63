//! The [`GuestMemory`] adapter for vm-memory (the version re-exported as
//! [`crate::vm_memory`]): `GuestMemoryMmap<AtomicBitmap>`, whose bitmap
//! records the writes the VMM makes through vm-memory.

use std::os::fd::AsFd;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use super::{Backing, GuestMemory, HostRegion, MemoryLayout, PAGE_SIZE};

/// Guest memory with vm-memory's dirty bitmap enabled: every write the VMM
/// makes through vm-memory (device emulation, loaders) marks its pages
/// dirty, and the engine drains those marks
/// ([`GuestMemory::take_vmm_dirty`]) into each round's dirty set.
pub type GuestRam = vm_memory::GuestMemoryMmap<AtomicBitmap>;

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

/// The backing, from the flags and file offset the region was mapped with.
fn backing(r: &GuestRegionMmap<AtomicBitmap>) -> Backing<'_> {
    let flags = r.flags();
    match r.file_offset() {
        None if flags & libc::MAP_ANONYMOUS != 0 && flags & libc::MAP_SHARED == 0 => {
            Backing::PrivateAnonymous
        }
        Some(fo) if flags & libc::MAP_SHARED != 0 => Backing::SharedFile {
            fd: fo.file().as_fd(),
            offset: fo.start(),
        },
        _ => Backing::Other,
    }
}

/// ORs a vm-memory bitmap's words into `words` (4 KiB pages). vm-memory's
/// `AtomicBitmap::with_len` counts host pages (`sysconf`), so on a host
/// with larger pages each bit stands for several engine pages; a bitmap
/// whose granularity is not a whole number of engine pages marks every page.
fn or_bitmap(bitmap: &AtomicBitmap, region_len: u64, words: &mut [u64]) {
    let bits = bitmap.get_and_reset();
    let nbits = bitmap.len() as u64;
    if nbits == region_len / PAGE_SIZE {
        for (w, b) in words.iter_mut().zip(&bits) {
            *w |= *b;
        }
        return;
    }
    if nbits == 0 || !region_len.is_multiple_of(nbits * PAGE_SIZE) {
        words.iter_mut().for_each(|w| *w = u64::MAX);
        return;
    }
    let per_bit = region_len / (nbits * PAGE_SIZE);
    let set = |bit: u64| {
        bits.get((bit / 64) as usize)
            .is_some_and(|w| w & (1 << (bit % 64)) != 0)
    };
    for bit in (0..nbits).filter(|b| set(*b)) {
        for p in bit * per_bit..(bit + 1) * per_bit {
            if let Some(w) = words.get_mut((p / 64) as usize) {
                *w |= 1 << (p % 64);
            }
        }
    }
}

// SAFETY: vm-memory's regions are mappings owned by the `GuestMemoryMmap`
// (or, for a region built `with_raw_mmap_pointer`, by whoever built it, who
// promised vm-memory the mapping outlives the region); they are fixed for
// the object's lifetime, sorted by address (vm-memory refuses unsorted
// or overlapping regions) and readable and writable (vm-memory maps them
// `PROT_READ | PROT_WRITE`). The backing comes from the flags and file
// offset the region was mapped with, and the `FileOffset` keeps the file
// open as long as the region lives.
unsafe impl GuestMemory for GuestRam {
    fn regions(&self) -> Vec<HostRegion<'_>> {
        self.iter()
            .map(|r| HostRegion::new(r.start_addr().0, r.as_ptr(), r.len(), backing(r)))
            .collect()
    }

    fn take_vmm_dirty(&self, region: usize, words: &mut [u64]) {
        if let Some(r) = self.iter().nth(region) {
            or_bitmap(vm_memory::MmapRegion::bitmap(r), r.len(), words);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroUsize;
    use vm_memory::bitmap::Bitmap;

    #[test]
    fn larger_host_pages_mark_every_engine_page_they_cover() {
        let len = 64 * PAGE_SIZE;
        let bm = AtomicBitmap::new(len as usize, NonZeroUsize::new(16 * 1024).unwrap());
        bm.mark_dirty(5 * 4096, 1); // host page 1 = engine pages 4..8
        let mut words = [0u64];
        or_bitmap(&bm, len, &mut words);
        assert_eq!(words[0], 0xf0);
        or_bitmap(&bm, len, &mut words);
        assert_eq!(words[0], 0xf0, "drained");
    }

    #[test]
    fn regions_are_sorted_and_drain_the_bitmap() {
        use vm_memory::{Bytes, GuestAddress};
        let l = MemoryLayout::new(vec![
            super::super::RegionDesc {
                guest_addr: 0,
                size: 16 * PAGE_SIZE,
            },
            super::super::RegionDesc {
                guest_addr: 1 << 20,
                size: 128 * PAGE_SIZE,
            },
        ])
        .unwrap();
        let m = allocate(&l).unwrap();
        let r = m.regions();
        assert_eq!(r.len(), 2);
        assert!(matches!(r[1].backing, Backing::PrivateAnonymous));
        m.write_obj(7u64, GuestAddress((1 << 20) + 65 * 4096))
            .unwrap();
        let mut words = [0u64; 2];
        m.take_vmm_dirty(1, &mut words);
        assert_eq!(words, [0, 2]);
        let mut words = [0u64; 2];
        m.take_vmm_dirty(1, &mut words);
        assert_eq!(words, [0, 0]);
    }
}
