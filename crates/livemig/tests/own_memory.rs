//! Guest memory that is not vm-memory's: a VMM's own mappings, handed to
//! the engine through `livemig::memory::GuestMemory` alone, migrated by the
//! software VM while its guest and device writers run, every byte checked.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::time::Duration;

use livemig::memory::{Backing, GuestMemory, HostRegion, MemoryLayout};
use livemig::testing::soft::{SoftConfig, SoftTracking, SoftVm};
use livemig::transport::mem;
use livemig::vm::SourceVm;
use livemig::{Migration, MigrationConfig, ReceiveConfig, Reception};

/// How a test region is mapped.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// `MAP_PRIVATE | MAP_ANONYMOUS`, said to be private anonymous.
    Anonymous,
    /// `MAP_PRIVATE | MAP_ANONYMOUS`, but described as [`Backing::Other`]
    /// (the engine must then read and zero every page itself).
    Opaque,
    /// A memfd mapped `MAP_SHARED`.
    Memfd,
}

/// One mmap'd region, unmapped on drop.
struct Region {
    guest_addr: u64,
    ptr: *mut u8,
    len: u64,
    kind: Kind,
    file: Option<File>,
}

/// A VMM's own guest memory: plain mmaps, no vm-memory anywhere.
struct OwnMemory(Vec<Region>);

// SAFETY: the struct owns its mappings; nothing about them is thread-bound.
unsafe impl Send for OwnMemory {}
// SAFETY: as above; `&self` only hands out the addresses.
unsafe impl Sync for OwnMemory {}

impl OwnMemory {
    fn new(regions: &[(u64, u64, Kind)]) -> OwnMemory {
        OwnMemory(
            regions
                .iter()
                .map(|&(a, l, k)| Region::map(a, l, k))
                .collect(),
        )
    }

    /// Writes `byte` over every byte (what a destination might hold
    /// before a migration: the engine must not rely on it being zero).
    fn poison(&self, byte: u8) {
        for r in &self.0 {
            // SAFETY: the whole mapping, which `self` owns.
            unsafe { std::ptr::write_bytes(r.ptr, byte, r.len as usize) };
        }
    }
}

impl Region {
    fn map(guest_addr: u64, len: u64, kind: Kind) -> Region {
        let file = matches!(kind, Kind::Memfd).then(|| {
            // SAFETY: a NUL-terminated name; the result is checked.
            let fd = unsafe { libc::memfd_create(c"own-memory".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0, "memfd_create");
            // SAFETY: a fresh descriptor nothing else owns.
            let f = unsafe { File::from_raw_fd(fd) };
            f.set_len(len).unwrap();
            f
        });
        let (flags, fd) = match &file {
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a new mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_NORESERVE,
                fd,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap");
        Region {
            guest_addr,
            ptr: ptr.cast(),
            len,
            kind,
            file,
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: exactly what mmap returned; the engine's borrow is over.
        unsafe { libc::munmap(self.ptr.cast(), self.len as usize) };
    }
}

// SAFETY: every region is a live read-write mapping owned by `self` (so
// mapped as long as it is borrowed), page aligned (mmap), sorted by guest
// address (the tests list them so), the memfd kept open by the region.
unsafe impl GuestMemory for OwnMemory {
    fn regions(&self) -> Vec<HostRegion<'_>> {
        self.0
            .iter()
            .map(|r| {
                let backing = match (r.kind, &r.file) {
                    (Kind::Anonymous, _) => Backing::PrivateAnonymous,
                    (Kind::Memfd, Some(f)) => Backing::SharedFile {
                        fd: f.as_fd(),
                        offset: 0,
                    },
                    _ => Backing::Other,
                };
                HostRegion::new(r.guest_addr, r.ptr, r.len, backing)
            })
            .collect()
    }

    /// Nothing: this memory has no accessors of its own, so no VMM write
    /// bypasses the soft VM, whose device writers are in its own log.
    fn take_vmm_dirty(&self, _region: usize, _words: &mut [u64]) {}
}

const REGIONS: [(u64, u64, Kind); 3] = [
    (0, 8 << 20, Kind::Anonymous),
    (1 << 30, 4 << 20, Kind::Opaque),
    (4 << 30, 4 << 20, Kind::Memfd),
];

fn migrate_own_memory(tracking: SoftTracking) {
    let writers = SoftConfig {
        guest_writers: 2,
        device_writers: 1,
        pages_per_ms: 5,
    };
    let src = SoftVm::with_guest_memory(Box::new(OwnMemory::new(&REGIONS)), &writers, tracking)
        .expect("source VM");
    let layout = MemoryLayout::of(src.memory()).unwrap();
    assert_eq!(layout.regions().len(), 3);
    // Data in part of each region only: the rest must arrive as zero over
    // the destination's poisoned memory.
    for (i, r) in layout.regions().iter().enumerate() {
        for p in (0..r.pages()).step_by(3 + i) {
            src.write_as_guest(r.guest_addr + p * 4096 + 16, p | 1 << 40)
                .unwrap();
        }
    }
    src.start();
    std::thread::sleep(Duration::from_millis(30));

    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        let cfg = ReceiveConfig {
            io_timeout: Duration::from_secs(5),
        };
        Reception::new(Box::new(b))
            .config(cfg)
            .run(|desc| {
                let own = OwnMemory::new(&REGIONS);
                own.poison(0xA5);
                let vm = SoftVm::with_guest_memory(Box::new(own), &SoftConfig::idle(), tracking)?;
                assert_eq!(desc.layout, *vm.layout());
                Ok(vm)
            })
            .map(|(vm, _)| vm)
    });
    let config = MigrationConfig {
        downtime_limit: Duration::from_millis(200),
        ..Default::default()
    };
    let before = src.writes();
    Migration::new(&src)
        .config(config)
        .run(Box::new(a))
        .expect("migration");
    let dst = dest.join().unwrap().expect("destination");
    assert!(
        src.writes() > before,
        "the writers ran during the migration"
    );
    let (want, got) = (src.snapshot(), dst.snapshot());
    assert_eq!(want.len(), got.len());
    let differ = want.iter().zip(&got).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "{differ} bytes differ after migration");
}

#[test]
fn own_memory_migrates_byte_for_byte_with_a_bitmap_log() {
    migrate_own_memory(SoftTracking::Bitmap);
}

#[test]
fn own_memory_migrates_byte_for_byte_in_manual_protect() {
    migrate_own_memory(SoftTracking::ManualProtect);
}

#[test]
fn memory_that_differs_from_its_description_is_refused() {
    // A destination whose memory has two of the three regions.
    let src = SoftVm::with_guest_memory(
        Box::new(OwnMemory::new(&REGIONS)),
        &SoftConfig::idle(),
        SoftTracking::Bitmap,
    )
    .unwrap();
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        Reception::new(Box::new(b))
            .run(|_| {
                let own = OwnMemory::new(&REGIONS[..2]);
                SoftVm::with_guest_memory(Box::new(own), &SoftConfig::idle(), SoftTracking::Bitmap)
            })
            .map(|_| ())
    });
    let e = Migration::new(&src).run(Box::new(a)).unwrap_err();
    assert!(e.to_string().contains("memory layout differs"), "{e}");
    assert!(dest.join().unwrap().is_err());
}
