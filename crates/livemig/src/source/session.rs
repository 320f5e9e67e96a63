//! What every phase of the source works with: the call's arguments
//! ([`Session`]) and, once dirty logging is on, the connections and the
//! tracker ([`Tracking`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cancel::CancelToken;
use super::handshake::{Accepted, StateEstimate};
use super::lz4::Lz4Switch;
use super::probe::Prober;
use super::read_count::ReadCounter;
use super::sender::{Pacer, PageSender};
use super::unarmed::Unarmed;
use crate::control::ControlReader;
use crate::error::{MigrationError, Phase};
use crate::memory::MemoryLayout;
use crate::policy::lz4::Lz4Decider;
use crate::policy::MigrationConfig;
use crate::ram::HostRam;
use crate::report::Progress;
use crate::transport::Transport;
use crate::vm::{DirtyTracker, Rearm, SourceVm, VmError};

/// The call: the VM, the settings, the cancel token and the progress
/// callback, and the operator's run state.
pub(super) struct Session<'a, V: SourceVm + ?Sized> {
    /// The VM being migrated.
    pub(super) vm: &'a V,
    /// The settings (validated).
    pub(super) config: &'a MigrationConfig,
    /// Cancellation from another thread.
    pub(super) cancel: &'a CancelToken,
    /// Called after each round and at the switchover.
    pub(super) progress: &'a mut dyn FnMut(&Progress),
    /// The operator's run state, kept from start to end (see
    /// [`SourceVm::is_paused`]): a paused VM is never resumed.
    pub(super) paused: bool,
    /// When the call started.
    pub(super) started: Instant,
    /// Post-copy asked for (`migrate_postcopy`), with its fault connection.
    pub(super) postcopy: Option<super::postcopy::Plan>,
}

/// Dirty logging is on: the connections, the tracker and what the
/// handshake measured.
pub(super) struct Tracking<'a> {
    /// The control connection's writer (and the pages, with one stream).
    pub(super) sender: PageSender<'a>,
    /// One writer per extra page stream (moved to their threads when the
    /// rounds start).
    pub(super) workers: Vec<PageSender<'a>>,
    /// The control connection's reader.
    pub(super) control: ControlReader,
    /// The hypervisor's dirty log.
    pub(super) tracker: Box<dyn DirtyTracker + 'a>,
    /// Every connection, for the paused phase's watchdog.
    pub(super) links: Vec<Box<dyn Transport>>,
    /// The state's cost, measured in the handshake.
    pub(super) estimate: StateEstimate,
    /// How the dirty log works (for the report).
    pub(super) dirty_tracking: String,
    /// From the call to dirty logging on, ms.
    pub(super) setup_ms: f64,
    /// Page streams granted (1 = pages on the control connection).
    pub(super) streams: u32,
    /// Post-copy granted by the destination.
    pub(super) postcopy: bool,
    /// With `postcopy`: the destination arms before the pause
    /// (`PostcopyPrepare`); otherwise the switch arms inside the downtime.
    pub(super) postcopy_prepare: bool,
    /// Set at the switch to post-copy: the pages the destination drops.
    pub(super) discard: Option<crate::bitmap::DirtyBitmap>,
    /// Round 0's bitmap, built in the handshake (taken by round 0).
    pub(super) round0: Option<crate::bitmap::DirtyBitmap>,
    /// The post-copy phase's report, once it ran.
    pub(super) postcopy_report: Option<super::postcopy::PostcopySourceReport>,
    /// The switchover probe, when the destination granted it.
    pub(super) prober: Option<Prober>,
    /// The read count, when the destination granted it.
    pub(super) reads: Option<ReadCounter>,
}

impl<'a> Tracking<'a> {
    /// Builds the page writers and turns dirty logging on.
    pub(super) fn start<V: SourceVm + ?Sized>(
        s: &Session<'a, V>,
        accepted: Accepted,
        estimate: StateEstimate,
        layout: &MemoryLayout,
    ) -> Result<Self, MigrationError> {
        let hs = Phase::Handshake;
        let config = s.config;
        let ram = HostRam::new(s.vm.memory(), layout).map_err(|e| {
            let why = format!("guest memory does not match its description: {e}");
            MigrationError::new(hs, VmError::Incompatible(why))
        })?;
        let mut tracker =
            s.vm.dirty_tracker()
                .map_err(|e| MigrationError::new(hs, e))?;
        if config.skip_untouched && tracker.rearm_mode() == Rearm::BeforeRead {
            // Memory the guest never populated is never re-armed.
            tracker = Box::new(Unarmed::new(tracker, ram.clone(), layout));
        }
        let dirty_tracking = tracker.describe();
        // One budget for every connection: the cap is the whole
        // migration's, and a stream with nothing to send leaves its share
        // to the others.
        let pacer = Pacer::new(config.max_bandwidth);
        // Compression, when allowed, starts as the decider says; every
        // window of page data decides again.
        let first = Lz4Decider::new(config.max_bandwidth).initial();
        let lz4_on = Arc::new(Lz4Switch::new(config.compress, first));
        let gather = accepted.pages_gather;
        let new = |fw| {
            let (pacer, lz4_on) = (pacer.clone(), lz4_on.clone());
            PageSender::new(fw, ram.clone(), layout, pacer, lz4_on, config, gather)
                .stop_on(s.cancel)
        };
        // With page streams, the first decides for all (one decider, one
        // hysteresis; each stream deciding on its share tried LZ4 four
        // times as often with 4 streams).
        // The streams' compression shares the host's cores: as many
        // streams as cores compress at once.
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let n = accepted.streams.len().div_ceil(cores).max(1) as u32;
        let workers = (accepted.streams.into_iter().enumerate())
            .map(|(i, fw)| new(fw).deciding_lz4(i == 0, n))
            .collect();
        let sender = new(accepted.fw);
        // An answer slower than the whole downtime limit is no hop the
        // switchover could afford: the round keeps the estimate without.
        let wait = config.downtime_limit.min(config.io_timeout);
        let prober = accepted
            .probe
            .then(|| Prober::new(estimate.wire_bytes, wait));
        let t_start = Instant::now();
        tracker.start().map_err(|e| MigrationError::new(hs, e))?;
        log::debug!(
            "set-up: dirty logging on at {:.2} ms (turning it on: {:.2} ms)",
            ms(s.started.elapsed()),
            ms(t_start.elapsed())
        );
        Ok(Tracking {
            sender,
            workers,
            control: accepted.control,
            tracker,
            links: accepted.links,
            estimate,
            dirty_tracking,
            setup_ms: ms(s.started.elapsed()),
            streams: accepted.granted,
            postcopy: accepted.postcopy,
            postcopy_prepare: accepted.postcopy_prepare,
            discard: None,
            postcopy_report: None,
            round0: Some(accepted.round0),
            prober,
            reads: accepted.read_count.then(ReadCounter::new),
        })
    }

    /// Turns dirty logging off — or, after a completed migration
    /// (`migrated`), lets the tracker leave that to the VM's teardown
    /// ([`DirtyTracker::stop_migrated`]); returns the bytes written on
    /// every connection.
    pub(super) fn stop(&mut self, migrated: bool) -> u64 {
        let t0 = Instant::now();
        let r = if migrated {
            self.tracker.stop_migrated()
        } else {
            self.tracker.stop()
        };
        if let Err(e) = r {
            log::error!("stopping dirty logging: {e}");
        }
        log::debug!(
            "dirty tracking stopped (migrated: {migrated}) in {:.2} ms",
            ms(t0.elapsed())
        );
        self.bytes_written()
    }

    /// Bytes written on every connection so far (the page streams' as of
    /// their last barrier).
    pub(super) fn bytes_written(&self) -> u64 {
        // With page streams their bytes are counted in the sender's counts
        // (the barriers collect them); add the control connection's.
        if self.streams > 1 {
            self.sender.counts.bytes + self.sender.fw.bytes_written()
        } else {
            self.sender.fw.bytes_written()
        }
    }
}

/// A duration in ms.
pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
