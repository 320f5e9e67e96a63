//! Guest memory as real guests and real VMMs have it, on the software VM
//! (no KVM needed): pages written for the first time while the migration
//! runs (a booting or allocating guest), KVM's manual-protect dirty log with
//! `INITIALLY_SET` modelled exactly, memory that is not private anonymous
//! (memfd, a private file mapping whose pages were never faulted in), a
//! destination whose memory is not zero before `receive`, and regions that
//! touch with no gap between them.
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::time::Duration;

use livemig::memory::SummaryBitmap;
use livemig::memory::{allocate, GuestRam, MemoryLayout, RegionDesc, PAGE_SIZE};
use livemig::testing::soft::{SoftConfig, SoftTracking, SoftVm};
use livemig::transport::mem;
use livemig::{
    migrate, migrate_streams, receive, receive_streams, CancelToken, MigrationConfig, ReceiveConfig,
};
use vm_memory::bitmap::NewBitmap;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

fn region(guest_addr: u64, mib: u64) -> RegionDesc {
    RegionDesc {
        guest_addr,
        size: mib << 20,
    }
}

/// Guest writers that keep touching never-touched pages: a few thousand
/// pages per second each, spread over all of memory.
fn fresh_writers() -> SoftConfig {
    SoftConfig {
        guest_writers: 2,
        device_writers: 1,
        pages_per_ms: 20,
    }
}

/// Receives into a destination built by `make`; returns it once migrated.
fn receive_with(
    b: mem::MemTransport,
    make: impl FnOnce(&MemoryLayout) -> SoftVm + Send + 'static,
) -> std::thread::JoinHandle<Result<SoftVm, livemig::MigrationError>> {
    std::thread::spawn(move || {
        let cfg = ReceiveConfig {
            io_timeout: Duration::from_secs(10),
        };
        receive(Box::new(b), &cfg, |desc| Ok(make(&desc.layout))).map(|(vm, _)| vm)
    })
}

fn idle_destination(layout: &MemoryLayout) -> SoftVm {
    SoftVm::new(layout, &SoftConfig::idle()).expect("destination VM")
}

/// Migrates a running `src` into a destination built by `make`, then
/// compares every byte (the source is paused after a successful
/// migration, so its memory no longer changes).
fn migrate_and_compare(
    src: &SoftVm,
    config: &MigrationConfig,
    make: impl FnOnce(&MemoryLayout) -> SoftVm + Send + 'static,
    what: &str,
) -> livemig::Report {
    let (a, b) = mem::pair();
    let dest = receive_with(b, make);
    let report = migrate(src, Box::new(a), config, &CancelToken::new(), &mut |_| {})
        .unwrap_or_else(|e| panic!("{what}: migration failed: {e}"));
    let dst = dest
        .join()
        .expect("receiver thread")
        .unwrap_or_else(|e| panic!("{what}: receive failed: {e}"));
    assert_same_memory(src, &dst, what);
    report
}

/// Panics naming the first differing pages, and how many differ.
fn assert_same_memory(src: &SoftVm, dst: &SoftVm, what: &str) {
    let (a, b) = (src.snapshot(), dst.snapshot());
    assert_eq!(a.len(), b.len(), "{what}: memory sizes differ");
    let page = PAGE_SIZE as usize;
    let bad: Vec<usize> = (0..a.len() / page)
        .filter(|p| a[p * page..(p + 1) * page] != b[p * page..(p + 1) * page])
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} pages differ on the destination (first {:?}); zero there: {}",
        bad.len(),
        a.len() / page,
        &bad[..bad.len().min(8)],
        bad.iter()
            .filter(|p| b[*p * page..(*p + 1) * page].iter().all(|x| *x == 0))
            .count()
    );
}

fn manual(layout: &MemoryLayout, cfg: &SoftConfig) -> SoftVm {
    let ram = allocate(layout).expect("memory");
    SoftVm::with_memory(ram, cfg, SoftTracking::ManualProtect).expect("source VM")
}

/// Manual-protect with `INITIALLY_SET`: no page is write-protected until
/// the engine clears it, so a page first written after the engine decided
/// which pages exist, but before it cleared that page's chunk, is logged
/// nowhere. Every page born during the migration must arrive.
#[test]
fn manual_protect_pages_born_during_round_0_arrive() {
    let layout = MemoryLayout::new(vec![region(0, 256), region(4 << 30, 64)]).unwrap();
    for run in 0..3 {
        let src = manual(&layout, &fresh_writers());
        src.start();
        // Let the writers run a moment: some pages exist, most are unborn.
        std::thread::sleep(Duration::from_millis(5));
        let report = migrate_and_compare(
            &src,
            &MigrationConfig::default(),
            idle_destination,
            &format!("manual-protect run {run}"),
        );
        assert!(report.dirty_tracking.contains("manual-protect"));
    }
}

/// The same over several of round 0's 256 MiB blocks, most of whose
/// chunks hold nothing when their block is scanned: such chunks are left
/// out of round 0 whole, so a page born in one after its block was
/// re-armed must arrive with a later round (and one born before, with
/// round 0).
#[test]
fn manual_protect_pages_born_in_skipped_chunks_arrive() {
    let layout = MemoryLayout::new(vec![region(0, 1024), region(4 << 30, 64)]).unwrap();
    for run in 0..2 {
        let src = manual(&layout, &fresh_writers());
        src.start();
        std::thread::sleep(Duration::from_millis(5));
        let report = migrate_and_compare(
            &src,
            &MigrationConfig::default(),
            idle_destination,
            &format!("manual-protect, 1 GiB, run {run}"),
        );
        assert!(report.zero_pages > 0, "untouched chunks were left out");
    }
}

/// An idle guest with a few pages written, in memory spanning several of
/// round 0's blocks: the chunks without data are left out of round 0 and
/// their dirty log is never re-armed (each re-arm is a `KVM_CLEAR_DIRTY_LOG`
/// KVM pays for per page), yet round 1 finds nothing to send: manual
/// protect's `INITIALLY_SET` reports every page of them dirty at every
/// sync, and the engine takes out those that are not populated.
#[test]
fn manual_protect_untouched_chunks_are_not_rearmed() {
    let layout = MemoryLayout::new(vec![region(0, 1024), region(4 << 30, 64)]).unwrap();
    let src = manual(&layout, &SoftConfig::idle());
    let ram = src.ram().expect("vm-memory");
    let written = [0u64, 1, 5000, 100_000, 262_143];
    for p in written {
        use vm_memory::Bytes;
        ram.write_obj(p | 0x55, GuestAddress(p * PAGE_SIZE))
            .unwrap();
    }
    src.start();
    let report = migrate_and_compare(
        &src,
        &MigrationConfig::default(),
        idle_destination,
        "manual-protect, idle, sparse",
    );
    assert_eq!(report.rounds[0].pages, 5, "{:?}", report.rounds[0]);
    assert_eq!(
        report.rounds[0].dirty_pages_after, 0,
        "{:?}",
        report.rounds[0]
    );
    // The 4 chunks holding the 5 pages, at most (1024 pages each), of the
    // 278 528 pages of memory.
    assert!(
        src.rearmed_pages() <= 4 * 1024,
        "{} pages re-armed for {} pages written in 4 chunks",
        src.rearmed_pages(),
        written.len()
    );
}

/// Pages written for the first time only after a round, each in a chunk
/// round 0 left out (and did not re-arm): every one must arrive — those
/// the next round's sync finds and the one the final (paused) sync finds.
#[test]
fn manual_protect_pages_born_after_a_round_in_unarmed_chunks_arrive() {
    let layout = MemoryLayout::new(vec![region(0, 1024), region(4 << 30, 64)]).unwrap();
    let src = manual(&layout, &SoftConfig::idle());
    src.start();
    // A page in a chunk of its own, of each region in turn.
    let fresh = |i: u64| match i % 2 {
        0 => ((37 + 3 * i) % 250) * 1024 * PAGE_SIZE + 8 * (i % 512),
        _ => (4 << 30) + (1 + i % 15) * 1024 * PAGE_SIZE + 8,
    };
    let mut born = 0u64;
    let (a, b) = mem::pair();
    let dest = receive_with(b, idle_destination);
    let report = migrate(
        &src,
        Box::new(a),
        &MigrationConfig::default(),
        &CancelToken::new(),
        &mut |p| {
            if matches!(p, livemig::Progress::Round(_)) {
                // After the round's sync, before the next one.
                for _ in 0..3 {
                    src.write_as_guest(fresh(born), 0xB0B0 + born).unwrap();
                    born += 1;
                }
            }
        },
    )
    .unwrap_or_else(|e| panic!("migration failed: {e}"));
    let dst = dest.join().expect("receiver thread").expect("receive");
    assert!(born >= 3, "{born} pages written");
    assert_eq!(report.rounds[0].pages, 0, "{:?}", report.rounds[0]);
    assert_same_memory(&src, &dst, "pages born after a round");
}

/// The same with the classic (harvest-and-protect) log: the reference.
#[test]
fn classic_pages_born_during_round_0_arrive() {
    let layout = MemoryLayout::new(vec![region(0, 256), region(4 << 30, 64)]).unwrap();
    let src = SoftVm::new(&layout, &fresh_writers()).unwrap();
    src.start();
    std::thread::sleep(Duration::from_millis(5));
    migrate_and_compare(
        &src,
        &MigrationConfig::default(),
        idle_destination,
        "classic",
    );
}

/// A memfd of `mib` MiB whose pages 1, 3, 5 … hold non-zero bytes written
/// through the file, never through the guest mapping.
fn memfd_with_data(mib: u64) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is checked.
    let fd = unsafe { libc::memfd_create(c"livemig-test".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.set_len(mib << 20).unwrap();
    write_odd_pages(&mut f, mib);
    f
}

fn write_odd_pages(f: &mut File, mib: u64) {
    use std::io::{Seek, SeekFrom};
    let pages = (mib << 20) / PAGE_SIZE;
    for p in (1..pages).step_by(2) {
        f.seek(SeekFrom::Start(p * PAGE_SIZE)).unwrap();
        f.write_all(&[(p as u8) | 1; 64]).unwrap();
    }
}

fn file_region(addr: u64, size: usize, file: File, flags: i32) -> GuestRegionMmap<SummaryBitmap> {
    let mapping =
        vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(size, SummaryBitmap::with_len(size))
            .with_file_offset(FileOffset::new(file, 0))
            .with_mmap_flags(flags | libc::MAP_NORESERVE)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .build()
            .expect("mmap");
    let mapping: MmapRegion<SummaryBitmap> = mapping;
    GuestRegionMmap::new(mapping, GuestAddress(addr)).expect("region")
}

/// Memory that is not private anonymous: a memfd (shared) region with data
/// the guest never touched through its mapping, and a private mapping of a
/// file whose pages were never faulted in (memory restored from a snapshot
/// file). "Not present in this process" does not mean zero there.
#[test]
fn memory_not_private_anonymous_arrives_whole() {
    let mut snapshot = tempfile_in_tmp();
    snapshot.set_len(16 << 20).unwrap();
    write_odd_pages(&mut snapshot, 16);
    let ram = GuestRam::from_regions(vec![
        file_region(0, 32 << 20, memfd_with_data(32), libc::MAP_SHARED),
        file_region(1 << 30, 16 << 20, snapshot, libc::MAP_PRIVATE),
    ])
    .unwrap();
    for tracking in [SoftTracking::Bitmap, SoftTracking::ManualProtect] {
        let src = SoftVm::with_memory(ram.clone(), &fresh_writers(), tracking).unwrap();
        src.start();
        migrate_and_compare(
            &src,
            &MigrationConfig::default(),
            idle_destination,
            &format!("memfd + private file mapping, {tracking:?}"),
        );
    }
}

/// An unlinked file on /tmp (a real filesystem with page cache, as a
/// snapshot file would be).
fn tempfile_in_tmp() -> File {
    let path = std::env::temp_dir().join(format!("livemig-snap-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}

/// A destination whose memory is not zero before `receive` (a pooled or
/// prefaulted buffer, firmware tables written first): the guest must still
/// see exactly the source's memory, including the pages the source never
/// touched (which are zero there).
#[test]
fn destination_memory_not_zero_before_receive() {
    let layout = MemoryLayout::new(vec![region(0, 64), region(4 << 30, 8)]).unwrap();
    for tracking in [SoftTracking::Bitmap, SoftTracking::ManualProtect] {
        let ram = allocate(&layout).unwrap();
        let src = SoftVm::with_memory(ram, &fresh_writers(), tracking).unwrap();
        src.start();
        migrate_and_compare(
            &src,
            &MigrationConfig::default(),
            |layout| {
                let dst = idle_destination(layout);
                dst.fill(0xdead_beef);
                dst
            },
            &format!("dirty destination, {tracking:?}"),
        );
    }
}

/// A memfd-backed destination that already holds data (a reused memfd).
#[test]
fn reused_memfd_destination_is_scrubbed() {
    let layout = MemoryLayout::new(vec![region(0, 32)]).unwrap();
    let src = SoftVm::new(&layout, &fresh_writers()).unwrap();
    src.start();
    migrate_and_compare(
        &src,
        &MigrationConfig::default(),
        |_| {
            let ram = GuestRam::from_regions(vec![file_region(
                0,
                32 << 20,
                memfd_with_data(32),
                libc::MAP_SHARED,
            )])
            .unwrap();
            SoftVm::with_memory(ram, &SoftConfig::idle(), SoftTracking::Bitmap).unwrap()
        },
        "reused memfd destination",
    );
}

/// Two regions with no gap between them (guest RAM split at a boundary the
/// VMM chose, as below/above a PCI hole that is not there).
#[test]
fn touching_regions_one_stream() {
    let layout = MemoryLayout::new(vec![region(0, 16), region(16 << 20, 16)]).unwrap();
    let src = SoftVm::new(&layout, &SoftConfig::default()).unwrap();
    src.fill(7);
    src.start();
    migrate_and_compare(
        &src,
        &MigrationConfig::default(),
        idle_destination,
        "touching regions",
    );
}

#[test]
fn touching_regions_four_streams() {
    use livemig::transport::{StreamAcceptor, StreamOpener};
    let layout = MemoryLayout::new(vec![region(0, 16), region(16 << 20, 16)]).unwrap();
    let src = SoftVm::new(&layout, &SoftConfig::default()).unwrap();
    src.fill(7);
    src.start();
    let (a, b) = mem::pair();
    let (mut opener, mut acceptor) = mem::streams();
    let dest = std::thread::spawn(move || {
        let cfg = ReceiveConfig {
            io_timeout: Duration::from_secs(10),
        };
        let acc: &mut dyn StreamAcceptor = &mut acceptor;
        receive_streams(Box::new(b), Some(acc), &cfg, |d| {
            Ok(idle_destination(&d.layout))
        })
        .map(|(vm, _)| vm)
    });
    let config = MigrationConfig {
        streams: 4,
        ..Default::default()
    };
    let op: &mut dyn StreamOpener = &mut opener;
    let r = migrate_streams(
        &src,
        Box::new(a),
        Some(op),
        &config,
        &CancelToken::new(),
        &mut |_| {},
    );
    r.expect("migration");
    let dst = dest.join().unwrap().expect("receive");
    assert_same_memory(&src, &dst, "touching regions, 4 streams");
}

/// A soft VM whose "guest" writes a page for the first time, each in a
/// chunk nothing was written to before, at the moments a first write can be
/// lost: right after dirty logging is turned on (between the set-up and
/// round 0), before and after every re-arm (round 0's scan of a block has
/// passed some of these chunks then), and before and after every dirty sync
/// (after the sync, before the engine looks for populated memory). Never
/// while the VM is paused.
struct FreshWriter<'a> {
    vm: &'a SoftVm,
    /// The fresh chunks, in the order they are written.
    chunks: Vec<u64>,
    born: std::sync::atomic::AtomicUsize,
}

impl FreshWriter<'_> {
    /// Writes the next fresh page (page 5 of the next unused chunk), if
    /// any is left and the VM runs.
    fn write_one(&self) {
        use std::sync::atomic::Ordering;
        if self.vm.is_paused() {
            return;
        }
        let i = self.born.fetch_add(1, Ordering::SeqCst);
        let Some(chunk) = self.chunks.get(i) else {
            return;
        };
        let addr = chunk * 1024 * PAGE_SIZE + 5 * PAGE_SIZE + 8;
        self.vm
            .write_as_guest(addr, 0xF00D_0000 + i as u64)
            .unwrap();
    }
}

use livemig::bitmap::DirtyBitmap;
use livemig::vm::{DirtyTracker, Rearm, SourceVm, VcpuThrottle, VmDescription, VmError};

struct FreshTracker<'a> {
    inner: Box<dyn DirtyTracker + 'a>,
    w: &'a FreshWriter<'a>,
}

impl DirtyTracker for FreshTracker<'_> {
    fn start(&mut self) -> Result<(), VmError> {
        self.inner.start()?;
        for _ in 0..3 {
            self.w.write_one();
        }
        Ok(())
    }
    fn sync(&mut self, bitmap: &mut DirtyBitmap) -> Result<(), VmError> {
        self.w.write_one();
        self.inner.sync(bitmap)?;
        self.w.write_one();
        Ok(())
    }
    fn rearm_mode(&self) -> Rearm {
        self.inner.rearm_mode()
    }
    fn rearm(&mut self, region: usize, first: u64, n: u64, d: &DirtyBitmap) -> Result<(), VmError> {
        self.w.write_one();
        self.inner.rearm(region, first, n, d)?;
        self.w.write_one();
        Ok(())
    }
    fn stop(&mut self) -> Result<(), VmError> {
        self.inner.stop()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

impl SourceVm for FreshWriter<'_> {
    fn memory(&self) -> &dyn livemig::memory::GuestMemory {
        self.vm.memory()
    }
    fn describe(&self) -> Result<VmDescription, VmError> {
        SourceVm::describe(self.vm)
    }
    fn dirty_tracker(&self) -> Result<Box<dyn DirtyTracker + '_>, VmError> {
        let inner = self.vm.dirty_tracker()?;
        Ok(Box::new(FreshTracker { inner, w: self }))
    }
    fn pause(&self) -> Result<(), VmError> {
        SourceVm::pause(self.vm)
    }
    fn resume(&self) -> Result<(), VmError> {
        SourceVm::resume(self.vm)
    }
    fn is_paused(&self) -> bool {
        self.vm.is_paused()
    }
    fn save_state(&self) -> Result<Vec<livemig::state::Section>, VmError> {
        self.vm.save_state()
    }
    fn throttle(&self) -> Option<&dyn VcpuThrottle> {
        None
    }
}

/// Fresh writes into memory round 0 leaves out (chunks never written, so
/// never re-armed in manual-protect mode) at every moment a write can be
/// lost ([`FreshWriter`]): after tracking starts and before round 0, during
/// round 0 (around each re-arm, after the scan of some of these chunks),
/// and around every later sync. Every page must arrive, in both soft
/// tracking modes.
#[test]
fn fresh_writes_into_skipped_chunks_at_every_step_arrive() {
    let layout = MemoryLayout::new(vec![region(0, 1024), region(4 << 30, 64)]).unwrap();
    // Region 0 has 256 chunks of 1024 pages, 64 per block of round 0;
    // page 0 of each block's first chunk holds data (so round 0 re-arms).
    let chunks: Vec<u64> = (0..256u64)
        .map(|i| (i * 37 + 11) % 256)
        .filter(|c| c % 64 != 0)
        .collect();
    for tracking in [SoftTracking::ManualProtect, SoftTracking::Bitmap] {
        {
            let ram = allocate(&layout).expect("memory");
            let vm = SoftVm::with_memory(ram, &SoftConfig::idle(), tracking).unwrap();
            for block in 0..4u64 {
                vm.write_as_guest(block * 65536 * PAGE_SIZE, 0xDA7A + block)
                    .unwrap();
            }
            vm.start();
            let w = FreshWriter {
                vm: &vm,
                chunks: chunks.clone(),
                born: Default::default(),
            };
            let what = format!("{tracking:?}");
            let config = MigrationConfig::default();
            let (a, b) = mem::pair();
            let dest = receive_with(b, idle_destination);
            migrate(&w, Box::new(a), &config, &CancelToken::new(), &mut |_| {})
                .unwrap_or_else(|e| panic!("{what}: migration failed: {e}"));
            let dst = dest.join().expect("receiver thread").expect("receive");
            let born = w.born.load(std::sync::atomic::Ordering::SeqCst);
            // Three after the start, one or more around the syncs (and re-arms).
            assert!(born >= 4, "{what}: only {born} fresh writes");
            assert_same_memory(&vm, &dst, &what);
        }
    }
}
