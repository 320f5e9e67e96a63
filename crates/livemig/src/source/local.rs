//! The same-host hand-over on the source ([`migrate_local`]): the memory is
//! shared with the destination, so only the state travels. See
//! `docs/protocol.md`, "Local hand-over".

use std::time::{Duration, Instant};

use super::downtime::GuestStart;
use super::session::ms;
use super::CancelToken;
use crate::commit::{commit, Commit};
use crate::control::{self, ControlReader, ControlWriter};
use crate::deadline::PauseDeadline;
use crate::error::{ErrorKind, MigrationError, Phase};
use crate::local::LocalIdentity;
use crate::policy::{ConfigError, MigrationConfig};
use crate::protocol::{Go, Hello, HelloReply, Ready};
use crate::report::{DowntimeBreakdown, Progress, Report, Status};
use crate::transport::Transport;
use crate::vm::SourceVm;

/// What the dirty-tracking note of a local hand-over's report says.
pub const LOCAL_TRACKING_NOTE: &str = "none (local hand-over: memory shared, no page sent)";

/// Hands `vm` over to a destination on the same host that maps the same
/// guest memory, over `transport`:
/// `Migration::new(vm).config(..).cancel(..).progress(..).local().run(transport)`.
///
/// Kept for one release so that callers keep compiling; use
/// [`Migration::local`](crate::Migration::local), which says what the
/// hand-over needs and does.
#[deprecated(
    since = "0.2.0",
    note = "use livemig::Migration::new(vm).local()...run(transport)"
)]
pub fn migrate_local<V: SourceVm + ?Sized>(
    vm: &V,
    transport: Box<dyn Transport>,
    config: &MigrationConfig,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, MigrationError> {
    crate::Migration::new(vm)
        .config(config.clone())
        .cancel(cancel.clone())
        .progress(progress)
        .local()
        .run(transport)
}

/// The hand-over ([`crate::Migration::local`]), with settings that
/// [`crate::Migration::checked_config`] passed.
pub(super) fn migrate_local_checked<V: SourceVm + ?Sized>(
    vm: &V,
    transport: Box<dyn Transport>,
    config: &MigrationConfig,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, MigrationError> {
    let started = Instant::now();
    let hs = Phase::Handshake;
    if cancel.is_cancelled() {
        return Err(MigrationError::new(hs, ErrorKind::Cancelled));
    }
    let desc = vm.describe().map_err(|e| MigrationError::new(hs, e))?;
    let identity = LocalIdentity::of(vm.memory()).map_err(|e| MigrationError::new(hs, e))?;
    let memory_bytes = desc.layout.total_bytes();
    cancel.attach(transport.try_clone().ok());
    let paused = vm.is_paused();
    let mut hello = Hello::new(desc);
    hello.paused = paused;
    hello.local = Some(identity);
    let round_trip = transport.round_trip();
    let result = run(vm, transport, hello, config, cancel, progress);
    cancel.detach_all();
    let (times, ready, resumed_us, state) = result.map_err(|e| super::failed(e, cancel))?;
    let start = GuestStart {
        pause: times.pause,
        state_sent: times.saved,
        ready: times.ready,
        done: times.done,
        restore: Duration::from_micros(ready.restore_us),
        resume: Duration::from_micros(resumed_us),
        round_trip,
    };
    let downtime_ms = ms(start.downtime());
    progress(&Progress::Completed { downtime_ms });
    Ok(Report {
        status: Status::Completed,
        total_ms: ms(started.elapsed()),
        setup_ms: ms(times.pause - started),
        downtime_ms,
        acknowledged_ms: ms(start.acknowledged()),
        downtime_breakdown: DowntimeBreakdown {
            pause_ms: ms(times.paused - times.pause),
            state_save_ms: ms(times.saved - times.paused),
            state_transfer_ms: ms(times.ready - times.saved),
            dest_restore_ms: ready.restore_us as f64 / 1000.0,
            resume_ack_ms: ms(times.done - times.ready),
            go_hop_ms: ms(start.go_hop()),
            dest_resume_ms: resumed_us as f64 / 1000.0,
            ..DowntimeBreakdown::default()
        },
        bytes_sent: state.2,
        state_bytes: state.0,
        state_frames: state.1,
        dirty_tracking: LOCAL_TRACKING_NOTE.to_string(),
        throttle_max_pct: None,
        ..Report::new(memory_bytes, ms(config.downtime_limit))
    })
}

/// The settings (nothing is sent before).
pub(super) fn check_config(config: &MigrationConfig) -> Result<(), MigrationError> {
    let hs = Phase::Handshake;
    config.validate().map_err(|e| MigrationError::new(hs, e))?;
    if config.streams > 1 {
        let e = ConfigError {
            field: "streams",
            value: config.streams.to_string(),
            rule: "a local hand-over sends no pages: one connection".into(),
        };
        return Err(MigrationError::new(hs, e));
    }
    Ok(())
}

/// When each step ended.
struct Times {
    pause: Instant,
    paused: Instant,
    saved: Instant,
    ready: Instant,
    done: Instant,
}

/// State bytes, `State` frames, bytes written.
type StateSent = (u64, u32, u64);

/// Handshake, pause, state, commit.
fn run<V: SourceVm + ?Sized>(
    vm: &V,
    transport: Box<dyn Transport>,
    hello: Hello,
    config: &MigrationConfig,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Times, Ready, u64, StateSent), MigrationError> {
    let paused = hello.paused;
    let (mut control, mut fw) = control::open(transport, config.io_timeout)?;
    let links: Vec<Box<dyn Transport>> = fw.get_ref().try_clone().ok().into_iter().collect();
    handshake(&mut control, &mut fw, &hello)?;
    progress(&Progress::Accepted);
    let pause = Instant::now();
    if !paused {
        if let Err(e) = vm.pause() {
            // A pause that failed half-way may have stopped some vCPUs.
            if let Err(re) = vm.resume() {
                log::error!("resuming the source after a failed pause: {re}");
            }
            let e = MigrationError::new(Phase::State, e);
            control::send_failure(&mut fw, &e, false);
            return Err(e);
        }
    }
    let deadline = PauseDeadline::arm(config.max_pause, links);
    progress(&Progress::Paused { remaining_pages: 0 });
    let r = switchover(vm, &mut control, &mut fw, &deadline, cancel, pause, config);
    match r {
        Ok(done) => Ok(done),
        Err((e, true)) => Err(e),
        Err((e, false)) => {
            if !paused {
                if let Err(re) = vm.resume() {
                    log::error!("resuming the source after a failed hand-over: {re}");
                }
            }
            control::send_failure(&mut fw, &e, false);
            Err(e)
        }
    }
}

/// `Hello` and a `HelloReply` that grants the hand-over (anything else is
/// refused here, before the VM is paused).
fn handshake(
    control: &mut ControlReader,
    fw: &mut ControlWriter,
    hello: &Hello,
) -> Result<(), MigrationError> {
    let hs = Phase::Handshake;
    fw.send(hello).map_err(|e| MigrationError::new(hs, e))?;
    let reply: HelloReply = control.recv(hs)?;
    super::handshake::check_reply(&reply, 1)?;
    if !reply.local || reply.postcopy {
        let why = "the destination did not grant a local hand-over (it is not a local \
                   receiver of this build: a remote migration must be asked for as such)";
        let e = MigrationError::new(hs, ErrorKind::Refused(why.into()));
        control::send_failure(fw, &e, false);
        return Err(e);
    }
    Ok(())
}

/// The paused part: save, send the state, `Ready`, `Go`. The error's flag
/// says whether the outcome is ambiguous (the source must stay paused).
fn switchover<V: SourceVm + ?Sized>(
    vm: &V,
    control: &mut ControlReader,
    fw: &mut ControlWriter,
    deadline: &PauseDeadline,
    cancel: &CancelToken,
    pause: Instant,
    config: &MigrationConfig,
) -> Result<(Times, Ready, u64, StateSent), (MigrationError, bool)> {
    let kept = |e| (e, false);
    let deadline_error = |phase| {
        let kind = ErrorKind::PauseDeadline {
            limit: deadline.limit(),
            paused: deadline.paused_for(),
        };
        (MigrationError::new(phase, kind), false)
    };
    // An I/O error after the deadline fired is the deadline (it shut the
    // connection down).
    let expired = |e: MigrationError| {
        if deadline.expired() {
            deadline_error(e.phase)
        } else {
            (e, false)
        }
    };
    let paused = Instant::now();
    let sections = vm
        .save_state()
        .map_err(|e| kept(MigrationError::new(Phase::State, e)))?;
    let saved = Instant::now();
    let (state_bytes, frames) = super::switchover::send_state(fw, sections).map_err(expired)?;
    let ready: Ready = control.recv(Phase::Completion).map_err(expired)?;
    let ready_at = Instant::now();
    let cp = Phase::Completion;
    if cancel.is_cancelled() {
        return Err(kept(MigrationError::new(cp, ErrorKind::Cancelled)));
    }
    if !deadline.disarm() {
        return Err(deadline_error(cp));
    }
    let answer_wait = config.io_timeout.saturating_mul(2);
    let resumed = match commit(fw, control, &Go, answer_wait) {
        Commit::Committed(r) => r,
        Commit::Abandoned(why) => {
            return Err(kept(MigrationError::new(cp, ErrorKind::Abandoned(why))))
        }
        Commit::Ambiguous(why) => {
            return Err((MigrationError::new(cp, ErrorKind::Ambiguous(why)), true))
        }
    };
    let times = Times {
        pause,
        paused,
        saved,
        ready: ready_at,
        done: Instant::now(),
    };
    let bytes = fw.bytes_written();
    Ok((
        times,
        ready,
        resumed.resume_us,
        (state_bytes, frames, bytes),
    ))
}
