//! The run state travels: a VM its operator paused migrates paused (the
//! engine never runs it on the source, the destination does not resume
//! it), and a pause that fails at the handshake leaves the source running.
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use livemig::bitmap::DirtyBitmap;
use livemig::memory::MemoryLayout;
use livemig::testing::hooked::HookedVm;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::mem;
use livemig::vm::{SourceVm, VmError};
use livemig::{migrate, receive, CancelToken, MigrationConfig, Progress, ReceiveConfig};

mod common;
use common::{migrate_with_defaults, one_region, soft_destination};

fn layout() -> MemoryLayout {
    one_region(4 << 20)
}

/// The source's writers were stopped by the operator: nothing writes during
/// the whole migration (before, the state probe resumed the VM for the
/// entire pre-copy), and the destination hands the VM back paused (before,
/// it always resumed it).
#[test]
fn a_paused_vm_migrates_paused() {
    let src = SoftVm::new(&layout(), &SoftConfig::busy()).unwrap();
    src.fill(3);
    src.start();
    std::thread::sleep(Duration::from_millis(20));
    src.stop(); // the operator pauses it
    let writes = src.writes();
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        receive(Box::new(b), &ReceiveConfig::default(), |d| {
            SoftVm::new(&d.layout, &SoftConfig::busy())
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

#[test]
fn a_failed_pause_at_the_handshake_leaves_the_source_running() {
    // The first pause fails half-way: the writers are stopped, then an
    // error is returned.
    let failed = AtomicBool::new(false);
    let vm = HookedVm::new(SoftVm::new(&layout(), &SoftConfig::busy()).unwrap())
        .on_pause(|vm| {
            SourceVm::pause(vm)?;
            if !failed.swap(true, Ordering::SeqCst) {
                return Err(VmError::Pause("injected: one vCPU did not stop".into()));
            }
            Ok(())
        })
        .without_throttle();
    vm.vm().start();
    let (a, b) = mem::pair();
    let dest = soft_destination(b, ReceiveConfig::default());
    let e = migrate_with_defaults(&vm, a).expect_err("the pause failed");
    assert!(e.to_string().contains("did not stop"), "{e}");
    let _ = dest.join();
    let w = vm.vm().writes();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        vm.vm().writes() > w,
        "the source stays paused after a failed pause"
    );
    // Dirty logging is off (it was never started).
    let mut t = vm.vm().dirty_tracker().unwrap();
    let mut bm = DirtyBitmap::new(&layout());
    t.sync(&mut bm).unwrap();
}
