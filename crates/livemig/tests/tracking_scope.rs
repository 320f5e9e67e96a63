//! How much of the hypervisor's dirty tracking a migration turns on, and
//! how it ends (issue 16, "cost that follows touched memory"):
//!
//! * a completed migration ends with [`DirtyTracker::stop_migrated`] (the
//!   tracker may leave its log to the VM's teardown), a failed one with
//!   [`DirtyTracker::stop`], after which the source runs as before;
//! * with a manual-protect tracker, a region no page of which is populated
//!   is left out of [`DirtyTracker::start_regions`] and started
//!   ([`DirtyTracker::start_region`]) only before its first re-arm, and a
//!   guest write into it during the migration still arrives.
//!
//! The soft VM's tracker tracks every region whatever it is asked; the
//! [`Scoped`] wrapper here behaves as KVM does instead: a region not
//! started reports nothing, and re-arming it is an error.
// The shared set-ups (`common`) use the 0.1 entry points.
#![allow(deprecated)]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use livemig::bitmap::DirtyBitmap;
use livemig::memory::{allocate, GuestMemory, MemoryLayout, RegionDesc, PAGE_SIZE};
use livemig::state::Section;
use livemig::testing::soft::{SoftConfig, SoftTracking, SoftVm};
use livemig::transport::mem;
use livemig::vm::{DirtyTracker, Rearm, SourceVm, VcpuThrottle, VmDescription, VmError};
use livemig::{Migration, ReceiveConfig};

use common::soft_destination;

/// Where region 1 starts.
const HIGH: u64 = 4 << 30;

/// 8 MiB at 0 and 16 MiB at 4 GiB.
fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![
        RegionDesc {
            guest_addr: 0,
            size: 8 << 20,
        },
        RegionDesc {
            guest_addr: HIGH,
            size: 16 << 20,
        },
    ])
    .unwrap()
}

/// A manual-protect soft VM with a few pages of region 0 written, region
/// 1 untouched.
fn source() -> SoftVm {
    let vm = SoftVm::with_memory(
        allocate(&layout()).unwrap(),
        &SoftConfig::idle(),
        SoftTracking::ManualProtect,
    )
    .unwrap();
    for p in 0..20u64 {
        vm.write_as_guest(p * 7 * PAGE_SIZE, 0xA000 + p).unwrap();
    }
    vm
}

/// What the engine asked of the tracker, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Start,
    StartRegions(Vec<bool>),
    StartRegion(usize),
    Stop,
    StopMigrated,
}

/// The source: `vm` with its tracker wrapped in [`Scoped`]; with
/// `fail_save` every save after the first (the handshake measures the
/// state with one) fails; on the `write_at_sync`-th sync (1 = the first)
/// the guest writes a page of region 1.
struct Source {
    vm: SoftVm,
    calls: Mutex<Vec<Call>>,
    syncs: AtomicU32,
    saves: AtomicU32,
    write_at_sync: u32,
    fail_save: bool,
}

impl Source {
    fn new(write_at_sync: u32, fail_save: bool) -> Source {
        Source {
            vm: source(),
            calls: Mutex::new(Vec::new()),
            syncs: AtomicU32::new(0),
            saves: AtomicU32::new(0),
            write_at_sync,
            fail_save,
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn record(&self, c: Call) {
        self.calls.lock().unwrap().push(c);
    }
}

/// The soft VM's tracker, scoped like KVM's: regions not started report
/// nothing and may not be re-armed.
struct Scoped<'a> {
    inner: Box<dyn DirtyTracker + 'a>,
    src: &'a Source,
    started: Vec<bool>,
}

impl DirtyTracker for Scoped<'_> {
    fn start(&mut self) -> Result<(), VmError> {
        self.src.record(Call::Start);
        self.started.iter_mut().for_each(|s| *s = true);
        self.inner.start()
    }

    fn start_regions(&mut self, regions: &[bool]) -> Result<(), VmError> {
        self.src.record(Call::StartRegions(regions.to_vec()));
        self.started = regions.to_vec();
        self.inner.start()
    }

    fn start_region(&mut self, region: usize) -> Result<(), VmError> {
        self.src.record(Call::StartRegion(region));
        self.started[region] = true;
        Ok(())
    }

    fn sync(&mut self, bitmap: &mut DirtyBitmap) -> Result<(), VmError> {
        let n = self.src.syncs.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.src.write_at_sync {
            self.src.vm.write_as_guest(HIGH + 5 * PAGE_SIZE, 0xBEEF)?;
        }
        let mut all = DirtyBitmap::new(&layout());
        self.inner.sync(&mut all)?;
        for (r, started) in self.started.iter().enumerate() {
            if *started {
                bitmap.or_words(r, all.words(r));
            }
        }
        Ok(())
    }

    fn rearm_mode(&self) -> Rearm {
        self.inner.rearm_mode()
    }

    fn rearm(&mut self, region: usize, first: u64, n: u64, d: &DirtyBitmap) -> Result<(), VmError> {
        if !self.started[region] {
            return Err(VmError::DirtyLog(format!(
                "rearm of region {region}, not started"
            )));
        }
        self.inner.rearm(region, first, n, d)
    }

    fn stop(&mut self) -> Result<(), VmError> {
        self.src.record(Call::Stop);
        self.inner.stop()
    }

    fn stop_migrated(&mut self) -> Result<(), VmError> {
        self.src.record(Call::StopMigrated);
        self.inner.stop()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

impl SourceVm for Source {
    fn memory(&self) -> &dyn GuestMemory {
        self.vm.memory()
    }
    fn describe(&self) -> Result<VmDescription, VmError> {
        SourceVm::describe(&self.vm)
    }
    fn dirty_tracker(&self) -> Result<Box<dyn DirtyTracker + '_>, VmError> {
        Ok(Box::new(Scoped {
            inner: self.vm.dirty_tracker()?,
            src: self,
            started: vec![true; 2],
        }))
    }
    fn pause(&self) -> Result<(), VmError> {
        SourceVm::pause(&self.vm)
    }
    fn resume(&self) -> Result<(), VmError> {
        SourceVm::resume(&self.vm)
    }
    fn is_paused(&self) -> bool {
        self.vm.is_paused()
    }
    fn save_state(&self) -> Result<Vec<Section>, VmError> {
        if self.fail_save && self.saves.fetch_add(1, Ordering::SeqCst) > 0 {
            return Err(VmError::State(livemig::state::StateError::Malformed {
                name: "test".into(),
                reason: "injected".into(),
            }));
        }
        self.vm.save_state()
    }
    fn throttle(&self) -> Option<&dyn VcpuThrottle> {
        None
    }
}

/// Migrates `src` into a soft destination; the source's result and the
/// destination VM (if it completed).
fn migrate(
    src: &Source,
) -> (
    Result<livemig::Report, livemig::MigrationError>,
    Option<SoftVm>,
) {
    let (a, b) = mem::pair();
    let dest = soft_destination(
        b,
        ReceiveConfig {
            io_timeout: Duration::from_secs(5),
        },
    );
    let r = Migration::new(src).run(Box::new(a));
    let d = dest.join().unwrap().ok().map(|(vm, _)| vm);
    (r, d)
}

#[test]
fn an_untouched_region_is_never_tracked_and_a_completed_migration_ends_with_stop_migrated() {
    let src = Source::new(0, false);
    let (r, dst) = migrate(&src);
    r.expect("migration");
    assert_eq!(src.vm.snapshot(), dst.expect("destination").snapshot());
    assert_eq!(
        src.calls(),
        vec![Call::StartRegions(vec![true, false]), Call::StopMigrated]
    );
}

#[test]
fn a_write_into_an_untracked_region_starts_it_and_arrives() {
    // The first sync ends round 0: the page is written after round 0's
    // scan of region 1 and before that sync's scan.
    for at in [1, 2] {
        let src = Source::new(at, false);
        let (r, dst) = migrate(&src);
        r.expect("migration");
        let dst = dst.expect("destination");
        assert_eq!(src.vm.snapshot(), dst.snapshot(), "write at sync {at}");
        let calls = src.calls();
        assert_eq!(calls.first(), Some(&Call::StartRegions(vec![true, false])));
        assert!(
            calls.contains(&Call::StartRegion(1)),
            "sync {at}: {calls:?}"
        );
        assert_eq!(calls.last(), Some(&Call::StopMigrated));
    }
}

#[test]
fn a_failed_migration_ends_with_stop_and_the_source_runs_as_before() {
    let src = Source::new(0, true);
    src.vm.start();
    let (r, dst) = migrate(&src);
    assert!(r.is_err() && dst.is_none());
    assert!(!r.unwrap_err().is_ambiguous());
    assert_eq!(
        src.calls(),
        vec![Call::StartRegions(vec![true, false]), Call::Stop]
    );
    assert!(!src.vm.is_paused(), "the source runs again");
}
