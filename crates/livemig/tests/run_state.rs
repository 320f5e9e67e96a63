//! The run state travels: a VM its operator paused migrates paused (the
//! engine never runs it on the source, the destination does not resume
//! it), and a pause that fails at the handshake leaves the source running.
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use livemig::bitmap::DirtyBitmap;
use livemig::memory::{GuestRam, MemoryLayout, RegionDesc};
use livemig::state::Section;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::mem;
use livemig::vm::{DirtyTracker, SourceVm, VcpuThrottle, VmDescription, VmError};
use livemig::{migrate, receive, CancelToken, MigrationConfig, Progress, ReceiveConfig};

fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: 4 << 20,
    }])
    .unwrap()
}

fn busy() -> SoftConfig {
    SoftConfig {
        guest_writers: 1,
        device_writers: 1,
        pages_per_ms: 20,
    }
}

/// The source's writers were stopped by the operator: nothing writes during
/// the whole migration (before, the state probe resumed the VM for the
/// entire pre-copy), and the destination hands the VM back paused (before,
/// it always resumed it).
#[test]
fn a_paused_vm_migrates_paused() {
    let src = SoftVm::new(&layout(), &busy()).unwrap();
    src.fill(3);
    src.start();
    std::thread::sleep(Duration::from_millis(20));
    src.stop(); // the operator pauses it
    let writes = src.writes();
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        receive(Box::new(b), &ReceiveConfig::default(), |d| {
            SoftVm::new(&d.layout, &busy())
        })
    });
    let mut ran = false;
    let report = migrate(
        &src,
        Box::new(a),
        &MigrationConfig::default(),
        &CancelToken::new(),
        &mut |p| {
            if let Progress::Round(_) = p {
                std::thread::sleep(Duration::from_millis(30));
                ran |= src.writes() != writes;
            }
        },
    )
    .expect("migrated");
    assert!(!ran, "the source ran during the migration");
    assert_eq!(src.writes(), writes, "the source ran");
    let (dst, rr) = dest.join().unwrap().expect("received");
    let w = dst.writes();
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(
        dst.writes(),
        w,
        "the destination runs a guest that was paused"
    );
    assert!(!rr.running, "the report says it runs");
    assert!(src.snapshot() == dst.snapshot(), "memory differs");
    eprintln!("{} rounds", report.rounds.len());
}

/// A SoftVm whose first pause fails half-way (the writers are stopped, then
/// an error is returned).
struct FlakyPause {
    vm: SoftVm,
    failed: AtomicBool,
}

impl SourceVm for FlakyPause {
    fn memory(&self) -> &GuestRam {
        SourceVm::memory(&self.vm)
    }
    fn describe(&self) -> Result<VmDescription, VmError> {
        self.vm.describe()
    }
    fn dirty_tracker(&self) -> Result<Box<dyn DirtyTracker + '_>, VmError> {
        self.vm.dirty_tracker()
    }
    fn pause(&self) -> Result<(), VmError> {
        SourceVm::pause(&self.vm)?;
        if !self.failed.swap(true, Ordering::SeqCst) {
            return Err(VmError::Pause("injected: one vCPU did not stop".into()));
        }
        Ok(())
    }
    fn resume(&self) -> Result<(), VmError> {
        SourceVm::resume(&self.vm)
    }
    fn is_paused(&self) -> bool {
        self.vm.is_paused()
    }
    fn save_state(&self) -> Result<Vec<Section>, VmError> {
        self.vm.save_state()
    }
    fn throttle(&self) -> Option<&dyn VcpuThrottle> {
        None
    }
}

#[test]
fn a_failed_pause_at_the_handshake_leaves_the_source_running() {
    let vm = FlakyPause {
        vm: SoftVm::new(&layout(), &busy()).unwrap(),
        failed: AtomicBool::new(false),
    };
    vm.vm.start();
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        receive(Box::new(b), &ReceiveConfig::default(), |d| {
            SoftVm::new(&d.layout, &SoftConfig::idle())
        })
        .map(|_| ())
    });
    let e = migrate(
        &vm,
        Box::new(a),
        &MigrationConfig::default(),
        &CancelToken::new(),
        &mut |_| {},
    )
    .expect_err("the pause failed");
    assert!(e.to_string().contains("did not stop"), "{e}");
    let _ = dest.join();
    let w = vm.vm.writes();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        vm.vm.writes() > w,
        "the source stays paused after a failed pause"
    );
    // Dirty logging is off (it was never started).
    let mut t = vm.vm.dirty_tracker().unwrap();
    let mut bm = DirtyBitmap::new(&layout());
    t.sync(&mut bm).unwrap();
}
