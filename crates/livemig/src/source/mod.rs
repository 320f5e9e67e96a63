//! The source side, in the order of the protocol (see
//! `docs/architecture.md`). See [`Migration`].
//!
//! Each phase is a file, and a function or method that takes the result of
//! the one before and returns its own:
//!
//! * `handshake.rs`: `Hello` → `HelloReply`, the page streams, the state
//!   measured → `Accepted`, `StateEstimate`;
//! * `session.rs`: dirty logging on → `Tracking`;
//! * `precopy.rs`: the rounds (`rounds.rs` walks a bitmap and re-arms the
//!   dirty log; `sender.rs` writes one connection, `streams.rs` runs the
//!   page-stream threads, `throttle.rs` auto-converge) → `Converged`;
//! * `switchover.rs`: `stop_and_copy` → `Paused`, then `Paused::commit`
//!   → `Committed`, or the ambiguous outcome (only there, from
//!   `crate::commit`, which sends `Go`).
//!
//! The report is assembled once, from what they return; on any other
//! error one fail-safe hands the guest back to the source.

use std::time::Instant;

use crate::error::{ErrorKind, MigrationError, Phase};
use crate::policy::{ConfigError, MigrationConfig};
use crate::protocol::STREAM_CHUNK_PAGES;
use crate::report::{DowntimeBreakdown, Progress, Report, Status};
use crate::transport::{StreamOpener, Transport};
use crate::vm::{SourceVm, VmDescription};

mod builder;
mod cancel;
mod downtime;
mod gather;
mod handshake;
pub mod local;
pub(crate) mod lz4;
pub mod postcopy;
mod precopy;
mod probe;
mod quiet;
mod read_count;
mod rounds;
mod sender;
mod session;
mod streams;
mod switchover;
mod throttle;
mod unarmed;

pub use builder::Migration;
pub use cancel::{CancelToken, SOURCE_CANCEL_GRACE};
use session::{ms, Session, Tracking};
use switchover::{Committed, NotCommitted};
use throttle::Throttler;

/// Pages per dirty-log chunk: with a [`Rearm::BeforeRead`] tracker each
/// chunk's dirty pages are re-armed ([`DirtyTracker::rearm`]) just before
/// they are read.
///
/// [`Rearm::BeforeRead`]: crate::vm::Rearm::BeforeRead
/// [`DirtyTracker::rearm`]: crate::vm::DirtyTracker::rearm
pub const CHUNK_PAGES: u64 = STREAM_CHUNK_PAGES;

/// Migrates `vm` over `transport`: `Migration::new(vm).config(..)
/// .cancel(..).progress(..).run(transport)`.
///
/// Kept for one release so that callers keep compiling; use
/// [`Migration`], which also takes page streams, a guard, and progress
/// without a `&mut` closure. [`MigrationConfig::streams`] must be 1 here.
#[deprecated(
    since = "0.2.0",
    note = "use livemig::Migration::new(vm)...run(transport)"
)]
pub fn migrate<V: SourceVm + ?Sized>(
    vm: &V,
    transport: Box<dyn Transport>,
    config: &MigrationConfig,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, MigrationError> {
    Migration::new(vm)
        .config(config.clone())
        .cancel(cancel.clone())
        .progress(progress)
        .run(transport)
}

/// Like [`migrate`], with [`MigrationConfig::streams`] page streams opened
/// through `opener`: `Migration::new(vm).config(..).streams(n, opener)..`.
///
/// Kept for one release so that callers keep compiling; use [`Migration`].
#[deprecated(
    since = "0.2.0",
    note = "use livemig::Migration::new(vm).streams(n, opener)...run(transport)"
)]
pub fn migrate_streams<V: SourceVm + ?Sized>(
    vm: &V,
    transport: Box<dyn Transport>,
    opener: Option<&mut dyn StreamOpener>,
    config: &MigrationConfig,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, MigrationError> {
    let m = Migration::new(vm)
        .config(config.clone())
        .cancel(cancel.clone())
        .progress(progress);
    match opener {
        Some(o) => m.streams(config.streams, o).run(transport),
        None => m.run(transport),
    }
}

/// The migration, with settings that [`Migration::checked_config`] passed,
/// and with post-copy when `postcopy` is set.
fn migrate_checked<V: SourceVm + ?Sized>(
    vm: &V,
    transport: Box<dyn Transport>,
    opener: Option<&mut dyn StreamOpener>,
    postcopy: Option<postcopy::Plan>,
    config: &MigrationConfig,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, MigrationError> {
    let started = Instant::now();
    if cancel.is_cancelled() {
        return Err(MigrationError::new(Phase::Handshake, ErrorKind::Cancelled));
    }
    let desc = vm
        .describe()
        .map_err(|e| MigrationError::new(Phase::Handshake, e))?;
    // A cancel lets the migration stop by itself first, so that the
    // destination hears why (`tell_destination`'s `Error` frame).
    cancel.set_grace(SOURCE_CANCEL_GRACE);
    cancel.attach(transport.try_clone().ok());
    let mut s = Session {
        vm,
        config,
        cancel,
        progress,
        paused: vm.is_paused(),
        started,
        postcopy,
    };
    let result = run(&mut s, transport, opener, desc);
    cancel.detach_all();
    result.map_err(|e| failed(e, cancel))
}

/// A failed migration, as the caller sees it (logged), with a cancel
/// named as the cause ([`as_cancelled`]).
pub(super) fn failed(e: MigrationError, cancel: &CancelToken) -> MigrationError {
    let e = as_cancelled(e, cancel);
    log::warn!("{e}");
    e
}

/// A cancelled migration's error is the cancel, whatever error it caused
/// (a sender stopped by it, a transport it shut down) — unless the outcome
/// is ambiguous, which stays so.
fn as_cancelled(mut e: MigrationError, cancel: &CancelToken) -> MigrationError {
    if cancel.is_cancelled() && !e.is_ambiguous() {
        e.kind = ErrorKind::Cancelled;
    }
    e
}

/// The phases, in order. Errors before dirty logging is on leave nothing
/// to undo; after, unless the outcome is ambiguous, [`tell_destination`]
/// says why, dirty logging goes off and [`fail_safe`] hands the guest back
/// to the source.
fn run<V: SourceVm + ?Sized>(
    s: &mut Session<'_, V>,
    transport: Box<dyn Transport>,
    opener: Option<&mut dyn StreamOpener>,
    desc: VmDescription,
) -> Result<Report, MigrationError> {
    let layout = desc.layout.clone();
    let accepted = handshake::handshake(s, transport, opener, desc)?;
    let estimate = handshake::estimate_state(s, &accepted)?;
    let mut t = Tracking::start(s, accepted, estimate, &layout)?;
    let outcome = match transfer(s, &mut t) {
        // The destination hears why first: turning the dirty log off can
        // take the hypervisor longer than a cancel's grace period.
        Err(NotCommitted::Kept(e)) => Err(NotCommitted::Kept(tell_destination(s, &mut t, e))),
        outcome => outcome,
    };
    // Only a completed migration may leave the log to the VM's teardown:
    // after any other outcome the source may run the guest again.
    let bytes_sent = t.stop(outcome.is_ok());
    match outcome {
        Ok(committed) => {
            let mut report = assemble(s, &t, committed, layout.total_bytes(), bytes_sent);
            report.postcopy = t.postcopy_report.take();
            Ok(report)
        }
        Err(NotCommitted::Ambiguous(e)) => Err(e),
        Err(NotCommitted::Kept(e)) => Err(fail_safe(s, &mut t, e)),
    }
}

/// Pre-copy, stop-and-copy and the commit, with the page-stream threads
/// and the auto-converge throttle running.
fn transfer<V: SourceVm + ?Sized>(
    s: &mut Session<'_, V>,
    t: &mut Tracking<'_>,
) -> Result<Committed, NotCommitted> {
    let throttler = Throttler::default();
    // An operator-paused VM is never throttled (the throttler resumes the
    // vCPUs it parked) — nor does it dirty memory.
    let target = if s.config.auto_converge && !s.paused {
        s.vm.throttle()
    } else {
        None
    };
    std::thread::scope(|scope| {
        let workers = std::mem::take(&mut t.workers);
        if !workers.is_empty() {
            t.sender.pool = Some(streams::spawn(scope, workers)?);
        }
        throttler.spawn(scope, target);
        let r = phases(s, t, &throttler);
        throttler.finish(true);
        t.sender.stop_streams();
        r
    })
}

/// The protocol, phase by phase.
fn phases<V: SourceVm + ?Sized>(
    s: &mut Session<'_, V>,
    t: &mut Tracking<'_>,
    throttler: &Throttler,
) -> Result<Committed, NotCommitted> {
    let converged = precopy::precopy(s, t, throttler)?;
    // Stop throttling first so it cannot race the pause.
    throttler.finish(true);
    if postcopy::switched(s) {
        // Requests are answered from the switch on, before `Go` too.
        return postcopy::switch_and_serve(s, t, converged);
    }
    let paused = converged.stop_and_copy(s, t)?;
    let committed = paused.commit(s, t)?;
    Ok(committed)
}

/// The source keeps the guest: tells the destination why (on the control
/// connection, every page sender stopped already), and returns the error
/// as the caller sees it.
fn tell_destination<V: SourceVm + ?Sized>(
    s: &Session<'_, V>,
    t: &mut Tracking<'_>,
    e: MigrationError,
) -> MigrationError {
    // The destination hears the reason: "cancelled", not the I/O error of
    // the sender the cancel stopped.
    let e = as_cancelled(e, s.cancel);
    crate::control::send_failure(&mut t.sender.fw, &e, false);
    e
}

/// After [`tell_destination`] and with dirty logging off: the source runs
/// the guest again, in the run state the operator left it in (or, when
/// the connection broke, fetches the destination's own reason if it sent
/// one).
fn fail_safe<V: SourceVm + ?Sized>(
    s: &Session<'_, V>,
    t: &mut Tracking<'_>,
    e: MigrationError,
) -> MigrationError {
    if !s.paused {
        if let Err(re) = s.vm.resume() {
            log::error!("resuming the source after a failed migration: {re}");
        }
    }
    match &e.kind {
        ErrorKind::Protocol(pe) if pe.is_disconnect() => {
            let wait = std::time::Duration::from_millis(200);
            t.control.peer_reason(e.phase, wait).unwrap_or(e)
        }
        _ => e,
    }
}

/// The report, from what the phases returned.
fn assemble<V: SourceVm + ?Sized>(
    s: &mut Session<'_, V>,
    t: &Tracking<'_>,
    c: Committed,
    memory_bytes: u64,
    bytes_sent: u64,
) -> Report {
    let p = &c.paused;
    let start = guest_start(&c, t);
    let downtime_ms = ms(start.downtime());
    (s.progress)(&Progress::Completed { downtime_ms });
    let config = s.config;
    let counts = t.sender.counts;
    let throttled = !config.auto_converge || (s.vm.throttle().is_some() && !s.paused);
    Report {
        status: Status::Completed,
        total_ms: ms(s.started.elapsed()),
        setup_ms: t.setup_ms,
        first_page_ms: t
            .sender
            .first_page
            .map_or(0.0, |f| ms(f.saturating_duration_since(s.started))),
        downtime_ms,
        acknowledged_ms: ms(start.acknowledged()),
        downtime_breakdown: breakdown(&c, &start),
        forced: p.summary.forced,
        expected_downtime_ms: p.summary.expected_downtime_ms,
        expected_breakdown: p.summary.expected.clone(),
        rounds: p.summary.rounds.clone(),
        final_pages: p.copied.final_pages,
        bytes_sent,
        pages_sent: counts.pages,
        zero_pages: counts.zero + t.sender.skipped,
        state_bytes: p.copied.state_bytes,
        state_frames: p.copied.state_frames,
        dirty_tracking: t.dirty_tracking.clone(),
        streams: t.streams,
        zero_copy: t.sender.sends_gathered(),
        throttle_max_pct: throttled.then_some(p.summary.throttle_max_pct),
        ..Report::new(memory_bytes, ms(config.downtime_limit))
    }
}

/// What the source saw of the destination's start.
fn guest_start(c: &Committed, t: &Tracking<'_>) -> downtime::GuestStart {
    let times = &c.paused.times;
    downtime::GuestStart {
        pause: times.pause,
        state_sent: times.mem,
        ready: times.ready,
        done: c.done,
        restore: std::time::Duration::from_micros(c.paused.ready.restore_us),
        resume: std::time::Duration::from_micros(c.resumed.resume_us),
        round_trip: t.links.first().and_then(|l| l.round_trip()),
    }
}

/// Where the downtime went.
fn breakdown(c: &Committed, start: &downtime::GuestStart) -> DowntimeBreakdown {
    let t = &c.paused.times;
    DowntimeBreakdown {
        pause_ms: ms(t.paused - t.pause),
        state_save_ms: ms(t.saved - t.paused),
        final_sync_ms: ms(t.synced - t.saved),
        final_memory_ms: ms(t.mem - t.synced),
        final_memory_lz4_ms: ms(c.paused.copied.final_lz4),
        state_transfer_ms: ms(t.ready - t.mem),
        dest_restore_ms: c.paused.ready.restore_us as f64 / 1000.0,
        resume_ack_ms: ms(c.done - t.ready),
        go_hop_ms: ms(start.go_hop()),
        dest_resume_ms: c.resumed.resume_us as f64 / 1000.0,
    }
}

/// `streams` page streams need a [`StreamOpener`]: a setting that does not
/// fit the call.
fn needs_opener(streams: u32) -> ConfigError {
    ConfigError {
        field: "streams",
        value: streams.to_string(),
        rule: "needs a StreamOpener (set both with Migration::streams(n, opener))".into(),
    }
}
