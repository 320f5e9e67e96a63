//! The LZ4 switch every page stream of a migration shares: whether page
//! frames are compressed now, the latest decision and its reason, and what
//! changed since the last round's report.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::policy::lz4::Lz4Verdict;
use crate::report::Lz4RoundReport;

/// Whether LZ4 is on for every sender of a migration, switched by the
/// senders' deciders ([`crate::policy::lz4::Lz4Decider`]).
pub(super) struct Lz4Switch {
    on: AtomicBool,
    /// Whether senders may compress a frame's start to measure while LZ4
    /// is off (until the final copy: paused, nothing is decided any more).
    sampling: AtomicBool,
    state: Mutex<Decisions>,
}

/// The decisions since the last round's report.
struct Decisions {
    /// The latest decision (the initial one before any window decided).
    verdict: Lz4Verdict,
    /// Windows that decided since the last report.
    decided: u32,
    /// Of those, the ones that switched LZ4.
    switches: u32,
}

impl Lz4Switch {
    /// A switch set as `initial` says, off whatever it says unless
    /// compression is `allowed`.
    pub(super) fn new(allowed: bool, initial: Lz4Verdict) -> Self {
        Lz4Switch {
            on: AtomicBool::new(allowed && initial.on),
            sampling: AtomicBool::new(true),
            state: Mutex::new(Decisions {
                verdict: initial,
                decided: 0,
                switches: 0,
            }),
        }
    }

    /// Whether page frames are to be compressed now.
    pub(super) fn is_on(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }

    /// Whether a sender may sample a frame while LZ4 is off.
    pub(super) fn samples(&self) -> bool {
        self.sampling.load(Ordering::SeqCst)
    }

    /// No more samples, for every sender: the guest is paused and the
    /// decision stands as it is (LZ4 on stays on).
    pub(super) fn stop_sampling(&self) {
        self.sampling.store(false, Ordering::SeqCst);
    }

    /// Records a window's decision and sets the switch as it says; returns
    /// whether that changed it.
    pub(super) fn apply(&self, v: Lz4Verdict) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let switched = self.on.swap(v.on, Ordering::SeqCst) != v.on;
        s.verdict = v;
        s.decided += 1;
        s.switches += u32::from(switched);
        switched
    }

    /// The decision in force and what was decided since the last call,
    /// for a round's report (`compress_ms`: the round's compression time).
    pub(super) fn take_round(&self, compress_ms: f64) -> Lz4RoundReport {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let r = Lz4RoundReport {
            on: self.is_on(),
            reason: s.verdict.reason,
            decisions: s.decided,
            switches: s.switches,
            compress_ms,
        };
        s.decided = 0;
        s.switches = 0;
        r
    }
}
