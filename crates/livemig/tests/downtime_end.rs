//! The downtime ends when the destination starts the guest, not when the
//! source happens to read the destination's `Resumed`.
//!
//! On a busy host the source's thread that waits for `Resumed` may wake
//! milliseconds after the destination's vCPUs already run (measured on the
//! 2-core test host: an engine downtime of 3.3–4.7 ms in 4 of 10 runs whose
//! guest measured its own gap at 0.83–1.04 ms, docs/benchmarks.md). That
//! time is not the guest's: the report's `downtime_ms` places the start on
//! the source's clock (pause → `Ready`, `Go`'s way there, the
//! destination's resume) and keeps the wait for the acknowledgement apart
//! (`acknowledged_ms`).

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use livemig::memory::GuestMemory;
use livemig::state::Section;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::{mem, Transport};
use livemig::vm::{DestinationVm, VmError};
use livemig::{Migration, Reception, Report};

mod common;
use common::{one_region, running_source};

/// How late the source's thread reads `Resumed`.
const LATE: Duration = Duration::from_millis(1500);

/// The source's end of the link: once the destination has started the
/// guest, the next read that returns data returns `LATE` later (the
/// source's thread was not scheduled in time), once.
struct LateReader {
    inner: Box<dyn Transport>,
    started: Arc<AtomicBool>,
    delayed: Arc<AtomicBool>,
}

impl Read for LateReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0
            && self.started.load(Ordering::SeqCst)
            && !self.delayed.swap(true, Ordering::SeqCst)
        {
            std::thread::sleep(LATE);
        }
        Ok(n)
    }
}

impl Write for LateReader {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Transport for LateReader {
    fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.inner.set_read_timeout(t)
    }

    fn set_write_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.inner.set_write_timeout(t)
    }

    fn shutdown(&self) -> io::Result<()> {
        self.inner.shutdown()
    }

    fn peer(&self) -> String {
        "late reader".into()
    }

    fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(LateReader {
            inner: self.inner.try_clone()?,
            started: self.started.clone(),
            delayed: self.delayed.clone(),
        }))
    }
}

/// A soft destination that says when its guest starts (before the engine
/// sends `Resumed` from `started`).
struct Starts {
    vm: SoftVm,
    started: Arc<AtomicBool>,
}

impl DestinationVm for Starts {
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
        self.started.store(true, Ordering::SeqCst);
        started();
        self.vm.resume()
    }
}

/// Migrates an idle soft guest whose source reads `Resumed` `LATE` after
/// the destination started it.
fn migrate_with_a_late_source() -> (Report, Arc<SoftVm>, SoftVm) {
    let src = running_source(&one_region(1 << 20), &SoftConfig::idle(), 7);
    let (a, b) = mem::pair();
    let started = Arc::new(AtomicBool::new(false));
    let link = LateReader {
        inner: Box::new(a),
        started: started.clone(),
        delayed: Arc::new(AtomicBool::new(false)),
    };
    let dest = std::thread::spawn(move || {
        Reception::new(Box::new(b)).run(move |desc| {
            Ok(Starts {
                vm: SoftVm::new(&desc.layout, &SoftConfig::idle())?,
                started,
            })
        })
    });
    let report = Migration::new(&*src)
        .run(Box::new(link))
        .expect("the migration completes");
    let (dst, _) = dest.join().expect("destination thread").expect("received");
    (report, src, dst.vm)
}

#[test]
fn a_late_read_of_the_acknowledgement_is_not_downtime() {
    let (report, src, dst) = migrate_with_a_late_source();
    assert_eq!(src.snapshot(), dst.snapshot(), "memory arrived");
    let late = LATE.as_secs_f64() * 1e3;
    assert!(
        report.downtime_ms < late,
        "downtime {:.1} ms counts the source's late read of `Resumed` ({late} ms after the \
         destination started the guest): {}",
        report.downtime_ms,
        report.to_json()
    );
}

#[test]
fn the_late_read_is_in_the_acknowledgement_and_the_parts_add_up() {
    let (report, _, _) = migrate_with_a_late_source();
    let late = LATE.as_secs_f64() * 1e3;
    assert!(
        report.acknowledged_ms >= late && report.acknowledged_ms >= report.downtime_ms,
        "acknowledged {:.1} ms: the source read `Resumed` at least {late} ms after the pause: {}",
        report.acknowledged_ms,
        report.to_json()
    );
    let b = &report.downtime_breakdown;
    let parts = b.total_ms();
    assert!(
        (parts - report.downtime_ms).abs() < 0.01,
        "the parts add up to {parts:.3} ms, the downtime is {:.3} ms: {}",
        report.downtime_ms,
        report.to_json()
    );
    assert!(
        b.go_hop_ms <= b.resume_ack_ms,
        "Go's way ({:.3} ms) is longer than its round trip ({:.3} ms)",
        b.go_hop_ms,
        b.resume_ack_ms
    );
}
