//! Auto-converge: parking the vCPUs for part of each time slice.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::vm::VcpuThrottle;

/// Auto-converge's worker: parks the vCPUs for `pct / (100 - pct)` of each
/// 10 ms slice of running time (QEMU's cpu-throttle timing).
#[derive(Default)]
pub(super) struct Throttler {
    pub(super) pct: AtomicU32,
    pub(super) stop: AtomicBool,
    pub(super) exited: AtomicBool,
}

impl Throttler {
    pub(super) const SLICE: Duration = Duration::from_millis(10);

    /// Starts throttling `target` on a thread of `scope` (with no target,
    /// or no thread, there is nothing to stop later).
    pub(super) fn spawn<'scope>(
        &'scope self,
        scope: &'scope std::thread::Scope<'scope, '_>,
        target: Option<&'scope dyn VcpuThrottle>,
    ) {
        let Some(target) = target else {
            self.exited.store(true, Ordering::SeqCst);
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("livemig-throttle".into())
            .spawn_scoped(scope, move || self.run(target));
        if let Err(e) = spawned {
            log::warn!("auto-converge unavailable: {e}");
            self.exited.store(true, Ordering::SeqCst);
        }
    }

    pub(super) fn run(&self, vcpus: &dyn VcpuThrottle) {
        while !self.stop.load(Ordering::SeqCst) {
            let pct = self.pct.load(Ordering::SeqCst).min(99);
            if pct == 0 {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let off = Self::SLICE * pct / (100 - pct);
            if let Err(e) = vcpus.pause_vcpus() {
                log::warn!("auto-converge: pausing vCPUs: {e}");
                break;
            }
            let until = Instant::now() + off;
            while Instant::now() < until && !self.stop.load(Ordering::SeqCst) {
                std::thread::sleep((until - Instant::now()).min(Duration::from_millis(2)));
            }
            if let Err(e) = vcpus.resume_vcpus() {
                log::error!("auto-converge: resuming vCPUs: {e}");
                break;
            }
            std::thread::sleep(Self::SLICE);
        }
        self.exited.store(true, Ordering::SeqCst);
    }

    /// Stops throttling; returns once the vCPUs are no longer held.
    pub(super) fn finish(&self, running: bool) {
        self.stop.store(true, Ordering::SeqCst);
        while running && !self.exited.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}
