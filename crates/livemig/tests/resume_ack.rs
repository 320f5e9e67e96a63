//! The destination's `Resumed` acknowledgement goes out from
//! `DestinationVm::resume_then`'s `started` callback: a VM that wakes its
//! vCPUs after `started` has the end of the source's downtime on the wire
//! before any vCPU thread competes with the engine's thread for a CPU. A VM
//! that keeps the trait's default (resume, then `started`) acknowledges after
//! its resume, as before.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Mutex;
use std::time::Duration;

use livemig::memory::{GuestMemory, MemoryLayout, RegionDesc};
use livemig::state::Section;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::mem;
use livemig::vm::{DestinationVm, VmError};
use livemig::{Migration, Reception};

/// How long the destination's resume waits to see the source finish.
const WAIT: Duration = Duration::from_secs(20);

fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: 1 << 20,
    }])
    .expect("layout")
}

/// A soft destination whose `resume_then` calls `started` and then, before
/// it "wakes its vCPUs", waits for the source's migration to return: it can
/// only return if the acknowledgement went out from `started`.
struct WakesAfterStarted {
    vm: SoftVm,
    source_done: Mutex<Receiver<()>>,
    /// Whether the source finished while this resume still held the vCPUs.
    saw_source_finish: Sender<bool>,
}

impl DestinationVm for WakesAfterStarted {
    fn memory(&self) -> &dyn GuestMemory {
        self.vm.memory()
    }

    fn restore_state(&mut self, sections: &[Section]) -> Result<(), VmError> {
        self.vm.restore_state(sections)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.vm.resume()
    }

    fn resume_then(&mut self, started: &mut dyn FnMut()) -> Result<(), VmError> {
        started();
        let done = self
            .source_done
            .lock()
            .expect("lock")
            .recv_timeout(WAIT)
            .is_ok();
        self.saw_source_finish.send(done).expect("report");
        self.vm.resume()
    }
}

#[test]
fn the_acknowledgement_goes_out_before_the_vcpus_wake() {
    let src = SoftVm::new(&layout(), &SoftConfig::idle()).expect("source VM");
    src.fill(3);
    src.start();
    let (a, b) = mem::pair();
    let (done_tx, done_rx) = mpsc::channel();
    let (saw_tx, saw_rx) = mpsc::channel();
    let dest = std::thread::spawn(move || {
        Reception::new(Box::new(b)).run(move |desc| {
            Ok(WakesAfterStarted {
                vm: SoftVm::new(&desc.layout, &SoftConfig::idle())?,
                source_done: Mutex::new(done_rx),
                saw_source_finish: saw_tx,
            })
        })
    });
    let report = Migration::new(&src).run(Box::new(a));
    // Tell the destination's resume (if it still waits) and let it go on.
    let _ = done_tx.send(());
    let report = report.expect("the source completes while the destination's vCPUs still wait");
    let (dst, _) = dest.join().expect("destination thread").expect("received");
    assert!(
        saw_rx.recv_timeout(WAIT).expect("the resume ran"),
        "the source did not finish within {WAIT:?} of the destination's `started`: the \
         acknowledgement did not go out from it"
    );
    assert_eq!(src.snapshot(), dst.vm.snapshot(), "memory arrived");
    assert!(report.downtime_ms > 0.0, "{}", report.to_json());
}

/// The trait's default keeps the old order: `started` after `resume`.
struct DefaultOrder {
    vm: SoftVm,
    log: Sender<&'static str>,
}

impl DestinationVm for DefaultOrder {
    fn memory(&self) -> &dyn GuestMemory {
        self.vm.memory()
    }

    fn restore_state(&mut self, sections: &[Section]) -> Result<(), VmError> {
        self.vm.restore_state(sections)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.log.send("resume").expect("log");
        self.vm.resume()
    }
}

#[test]
fn the_default_acknowledges_after_the_resume() {
    let src = SoftVm::new(&layout(), &SoftConfig::idle()).expect("source VM");
    src.fill(5);
    src.start();
    let (a, b) = mem::pair();
    let (log_tx, log_rx) = mpsc::channel();
    let dest = std::thread::spawn(move || {
        Reception::new(Box::new(b)).run(move |desc| {
            Ok(DefaultOrder {
                vm: SoftVm::new(&desc.layout, &SoftConfig::idle())?,
                log: log_tx,
            })
        })
    });
    Migration::new(&src)
        .run(Box::new(a))
        .expect("the migration completes");
    let (dst, _) = dest.join().expect("destination thread").expect("received");
    assert_eq!(log_rx.try_iter().collect::<Vec<_>>(), vec!["resume"]);
    assert_eq!(src.snapshot(), dst.vm.snapshot(), "memory arrived");
}
