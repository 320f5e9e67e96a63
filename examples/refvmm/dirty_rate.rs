//! The API `dirty-rate` request: how fast the guest dirties its memory now,
//! measured through the KVM dirty log over a short window, as QEMU's
//! `calc-dirty-rate` does (its `dirty-bitmap` mode).
//!
//! The measurement starts a dirty tracker of its own, arms every page,
//! sleeps the window, syncs once, counts the distinct pages written, and
//! stops the tracker (dirty logging off again). It holds the VM's
//! [`MigrationMonitor`] for its duration: a migration cannot start while it
//! runs, and it is refused while a migration runs, so the two never share
//! KVM's dirty log. A later migration starts its own tracker from scratch
//! (KVM allocates a fresh dirty bitmap when logging is turned on again).
//!
//! What it counts: the pages the guest's vCPUs wrote (the KVM dirty log),
//! each at most once per window. Writes of the VMM itself into guest memory
//! (virtio-net receive) are not counted. A guest that rewrites a small
//! working set shows its working set per window, not its write bandwidth:
//! the rate is `distinct pages x 4 KiB / window`, which is what pre-copy
//! has to resend.

use std::time::{Duration, Instant};

use livemig::bitmap::DirtyBitmap;
use livemig::memory::MemoryLayout;
use livemig::vm::{DirtyTracker, Rearm, SourceVm};
use serde_json::{json, Value};

use crate::monitor::MigrationMonitor;
use crate::vmm::Machine;

/// Default measuring window, ms.
pub const DEFAULT_WINDOW_MS: u64 = 500;
/// Longest window accepted, ms.
pub const MAX_WINDOW_MS: u64 = 60_000;

/// One measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DirtyRate {
    /// Distinct pages written during the window.
    pub pages: u64,
    /// The window as measured (from arming the pages to the sync).
    pub window: Duration,
    /// Guest memory, bytes.
    pub memory_bytes: u64,
}

impl DirtyRate {
    /// MiB/s (2^20 bytes per second).
    pub fn mib_per_s(&self) -> f64 {
        let secs = self.window.as_secs_f64().max(1e-9);
        self.pages as f64 * 4096.0 / f64::from(1u32 << 20) / secs
    }

    /// The API reply.
    pub fn to_json(self, mode: &str) -> Value {
        json!({
            "result": "ok",
            "dirty-rate-mib-s": self.mib_per_s(),
            "dirty-pages": self.pages,
            "window-ms": self.window.as_secs_f64() * 1e3,
            "page-size": 4096,
            "memory": self.memory_bytes,
            "mode": mode,
        })
    }
}

/// Why a measurement was not made.
#[derive(Debug, thiserror::Error)]
pub enum DirtyRateError {
    /// A migration (or another measurement) runs, or the guest left.
    #[error("{0}")]
    Busy(String),
    /// The window is out of range.
    #[error("window-ms {0} is outside 1..={MAX_WINDOW_MS}")]
    Window(u64),
    /// The dirty log failed.
    #[error("dirty log: {0}")]
    Tracker(String),
}

/// Arms every page: in manual-protect mode KVM starts with every page
/// dirty and unprotected, so re-protect them all; in the other modes the
/// first sync takes what was logged before the window (nothing, or the
/// writes since `start`).
fn arm(t: &mut dyn DirtyTracker, bitmap: &mut DirtyBitmap) -> Result<(), DirtyRateError> {
    let e = |e: livemig::vm::VmError| DirtyRateError::Tracker(e.to_string());
    if t.rearm_mode() == Rearm::BeforeRead {
        bitmap.set_all();
        for r in 0..bitmap.num_regions() {
            t.rearm(r, 0, bitmap.region_pages(r), bitmap).map_err(e)?;
        }
    } else {
        t.sync(bitmap).map_err(e)?;
    }
    bitmap.clear();
    Ok(())
}

/// Measures the guest's dirty rate over `window`.
pub fn measure(
    m: &Machine,
    monitor: &MigrationMonitor,
    window: Duration,
) -> Result<DirtyRate, DirtyRateError> {
    let ms = window.as_millis() as u64;
    if ms == 0 || ms > MAX_WINDOW_MS {
        return Err(DirtyRateError::Window(ms));
    }
    m.guard
        .check()
        .map_err(|e| DirtyRateError::Busy(e.to_string()))?;
    let _held = monitor
        .begin_measure()
        .map_err(|e| DirtyRateError::Busy(e.to_string()))?;
    let mem = SourceVm::memory(m);
    let layout = MemoryLayout::of(mem).map_err(|e| DirtyRateError::Tracker(e.to_string()))?;
    let mut bitmap = DirtyBitmap::new(&layout);
    let e = |e: livemig::vm::VmError| DirtyRateError::Tracker(e.to_string());
    let mut t = m.dirty_tracker().map_err(e)?;
    t.start().map_err(e)?;
    let r = (|| {
        arm(&mut *t, &mut bitmap)?;
        let t0 = Instant::now();
        std::thread::sleep(window);
        t.sync(&mut bitmap).map_err(e)?;
        Ok(DirtyRate {
            pages: bitmap.count(),
            window: t0.elapsed(),
            memory_bytes: layout.total_bytes(),
        })
    })();
    // Logging off whatever happened: a later migration starts afresh.
    let stopped = t.stop().map_err(e);
    let rate = r?;
    stopped?;
    Ok(rate)
}

/// The API request: `{"cmd":"dirty-rate","window-ms":N}`.
pub fn request(req: &Value, m: &Machine, monitor: &MigrationMonitor) -> Value {
    let ms = req["window-ms"].as_u64().unwrap_or(DEFAULT_WINDOW_MS);
    let mode = m.dirty_tracker().map(|t| t.describe()).unwrap_or_default();
    match measure(m, monitor, Duration::from_millis(ms)) {
        Ok(r) => r.to_json(&mode),
        Err(e) => json!({"result":"error","error":e.to_string()}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_distinct_pages_over_the_window() {
        let r = DirtyRate {
            pages: 2560,
            window: Duration::from_millis(500),
            memory_bytes: 64 << 20,
        };
        // 2560 pages x 4 KiB = 10 MiB in 0.5 s.
        assert!((r.mib_per_s() - 20.0).abs() < 1e-9);
        assert_eq!(r.to_json("x")["dirty-pages"], 2560);
    }
}
