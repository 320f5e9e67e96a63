//! The [`GuestMemory`] adapter for vm-memory (the version re-exported as
//! [`crate::vm_memory`]): `GuestMemoryMmap<B>` for a dirty bitmap `B` the
//! engine can drain ([`VmmBitmap`]: [`SummaryBitmap`] or vm-memory's
//! `AtomicBitmap`), which records the writes the VMM makes through
//! vm-memory.

use std::os::fd::AsFd;

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use super::{Backing, GuestMemory, HostRegion, MemoryLayout, SummaryBitmap, PAGE_SIZE};

/// Guest memory with a dirty bitmap: every write the VMM makes through
/// vm-memory (device emulation, loaders) marks its pages dirty, and the
/// engine drains those marks ([`GuestMemory::take_vmm_dirty_words`]) into
/// each round's dirty set.
///
/// The bitmap is [`SummaryBitmap`], whose take visits only what was
/// written: vm-memory's `AtomicBitmap` (which `GuestRam` named in 0.1.0) swaps every word of the region at every take, milliseconds per
/// take at 64 GiB, some of them inside the downtime. A VMM that keeps
/// `GuestMemoryMmap<AtomicBitmap>` can still hand it to the engine: it
/// implements [`GuestMemory`] too.
pub type GuestRam = vm_memory::GuestMemoryMmap<SummaryBitmap>;

/// A vm-memory dirty bitmap the [`GuestMemory`] adapter can drain.
pub trait VmmBitmap: Bitmap + Send + Sync {
    /// Hands every word (64 pages of [`PAGE_SIZE`]) of a `region_len`-byte
    /// region with a page written since the previous call to `f`, as
    /// (word index, bits), and forgets those writes.
    fn take_words(&self, region_len: u64, f: &mut dyn FnMut(usize, u64));
}

impl VmmBitmap for SummaryBitmap {
    fn take_words(&self, _region_len: u64, f: &mut dyn FnMut(usize, u64)) {
        self.take(f);
    }
}

impl VmmBitmap for AtomicBitmap {
    /// Swaps every word of the bitmap (vm-memory's `get_and_reset`).
    fn take_words(&self, region_len: u64, f: &mut dyn FnMut(usize, u64)) {
        let mut words = vec![0; region_len.div_ceil(PAGE_SIZE * 64) as usize];
        or_bitmap(self, region_len, &mut words);
        for (i, w) in words.into_iter().enumerate().filter(|(_, w)| *w != 0) {
            f(i, w);
        }
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

/// The backing, from the flags and file offset the region was mapped with.
fn backing<B: Bitmap>(r: &GuestRegionMmap<B>) -> Backing<'_> {
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
unsafe impl<B: VmmBitmap> GuestMemory for vm_memory::GuestMemoryMmap<B> {
    fn regions(&self) -> Vec<HostRegion<'_>> {
        self.iter()
            .map(|r| HostRegion::new(r.start_addr().0, r.as_ptr(), r.len(), backing(r)))
            .collect()
    }

    fn take_vmm_dirty(&self, region: usize, words: &mut [u64]) {
        self.take_vmm_dirty_words(region, &mut |i, bits| {
            if let Some(w) = words.get_mut(i) {
                *w |= bits;
            }
        });
    }

    fn take_vmm_dirty_words(&self, region: usize, f: &mut dyn FnMut(usize, u64)) {
        if let Some(r) = self.iter().nth(region) {
            vm_memory::MmapRegion::bitmap(r).take_words(r.len(), f);
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

    /// The pages `take_vmm_dirty_words` hands out for region 0.
    fn taken<M: GuestMemory>(m: &M) -> Vec<u64> {
        let mut pages = Vec::new();
        m.take_vmm_dirty_words(0, &mut |w, mut bits| {
            while bits != 0 {
                pages.push(w as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        });
        pages
    }

    #[test]
    fn every_vm_memory_write_path_marks_the_summary_bitmap() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileMemory};
        let m = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 30)]).unwrap();
        let page = |p: u64| GuestAddress(p * PAGE_SIZE);
        m.write_obj(1u32, page(3)).unwrap();
        m.write_slice(&[1; 8192], GuestAddress(10 * PAGE_SIZE + 100))
            .unwrap(); // pages 10..=12
        assert_eq!(m.write(&[2; 5], page(70_000)).unwrap(), 5);
        let r = m.find_region(GuestAddress(0)).unwrap();
        let vs = r.as_volatile_slice().unwrap();
        vs.get_slice(200_000 * PAGE_SIZE as usize, 16)
            .unwrap()
            .copy_from(&[3u8; 16]);
        vs.write_obj(4u64, 5000 * PAGE_SIZE as usize).unwrap();
        vm_memory::MmapRegion::bitmap(r).mark_dirty(262_143 * PAGE_SIZE as usize, 1);
        let _: u64 = m.read_obj(page(9)).unwrap(); // reads mark nothing
        assert_eq!(taken(&m), [3, 10, 11, 12, 5000, 70_000, 200_000, 262_143]);
        assert_eq!(taken(&m), [] as [u64; 0], "the take reset them");
        m.write_obj(1u8, page(4)).unwrap();
        let mut words = vec![0u64; 4096];
        m.take_vmm_dirty(0, &mut words);
        assert_eq!(
            (words[0], words.iter().filter(|w| **w != 0).count()),
            (1 << 4, 1)
        );
    }

    #[test]
    fn atomic_bitmap_memory_still_implements_guest_memory() {
        use vm_memory::{Bytes, GuestAddress};
        let m =
            vm_memory::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 4 << 20)])
                .unwrap();
        assert_eq!(m.regions().len(), 1);
        m.write_obj(1u16, GuestAddress(700 * PAGE_SIZE)).unwrap();
        assert_eq!(taken(&m), [700]);
        assert_eq!(taken(&m), [] as [u64; 0]);
    }
}
