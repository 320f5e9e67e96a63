//! The pre-copy rounds, up to the switchover decision.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{
    cancel::CancelToken, ms, rounds::merge_vmm_writes, sender::PageSender,
    switchover::stop_and_copy, throttle::Throttler,
};
use crate::bitmap::DirtyBitmap;
use crate::commit::{commit, Commit};
use crate::deadline::PauseDeadline;
use crate::error::{ErrorKind, MigrationError, Phase};
use crate::memory::PAGE_SIZE;
use crate::policy::{decide, Decision, MigrationConfig, RoundEstimate, Throttle};
use crate::protocol::{FrameReader, Go, RoundEnd};
use crate::report::{Progress, Report, RoundReport};
use crate::transport::Transport;
use crate::vm::{DirtyTracker, SourceVm};

#[allow(clippy::too_many_arguments)]
pub(super) fn precopy_and_switch<V: SourceVm + ?Sized>(
    vm: &V,
    tracker: &mut (dyn DirtyTracker + '_),
    sender: &mut PageSender<'_>,
    fr: &mut FrameReader<Box<dyn Transport>>,
    config: &MigrationConfig,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
    report: &mut Report,
    state_time: Duration,
    state_bytes: u64,
    throttler: &Throttler,
    links: &[Box<dyn Transport>],
) -> Result<(), MigrationError> {
    let layout = sender.layout.clone();
    let mut throttle = Throttle::default();
    let precopy_start = Instant::now();
    // Discard VMM writes recorded before tracking started: round 0 sends
    // everything anyway.
    let mut scratch = DirtyBitmap::new(&layout);
    merge_vmm_writes(vm, &mut scratch);

    // Round 0: every page, except those that certainly read as zero
    // ([`HostRam::populated`], asked per chunk after its re-arm): the
    // destination scrubbed its memory to zero in the handshake.
    let mut bitmap = DirtyBitmap::new(&layout);
    bitmap.set_all();

    let mut round = 0u32;
    let mut total_sent = 0u64;
    let mut total_time = Duration::ZERO;
    let forced;
    loop {
        let phase = Phase::Precopy(round);
        let t0 = Instant::now();
        let before = sender.counts;
        let clear = tracker.needs_clear();
        sender.skip_zero = round == 0;
        sender.skip_untouched = round == 0 && config.skip_untouched;
        let skipped_before = sender.skipped;
        sender.clear_time = Duration::ZERO;
        sender.send_bitmap(
            &bitmap,
            if clear { Some(&mut *tracker) } else { None },
            cancel,
            phase,
        )?;
        sender.end_round(phase, false)?;
        sender.skip_zero = false;
        sender.skip_untouched = false;
        let end = RoundEnd {
            round,
            pages: sender.counts.pages - before.pages,
        };
        sender
            .fw
            .send(&end)
            .map_err(|e| MigrationError::new(phase, e))?;
        let dur = t0.elapsed();
        bitmap.clear();
        tracker
            .sync(&mut bitmap)
            .map_err(|e| MigrationError::new(phase, e))?;
        merge_vmm_writes(vm, &mut bitmap);
        let dirty = bitmap.count();
        let secs = dur.as_secs_f64().max(1e-6);
        let bytes = sender.counts.bytes - before.bytes;
        // Sending time: the round minus re-arming the dirty log (a round 0
        // of a mostly idle guest is nearly all re-arming; counting it as
        // transfer time made the link look slow and an idle guest "not
        // converge" under load).
        let sending = dur
            .saturating_sub(sender.clear_time)
            .max(Duration::from_micros(50));
        let bandwidth = bytes as f64 / sending.as_secs_f64();
        // Bandwidth estimate: all bytes sent so far over all sending time,
        // so a tiny round (dominated by fixed costs) cannot drag it down.
        total_sent += bytes;
        total_time += sending;
        let est = RoundEstimate {
            remaining_bytes: dirty * PAGE_SIZE,
            bandwidth: total_sent as f64 / total_time.as_secs_f64().max(1e-6),
            state_time,
            state_bytes,
        };
        let dirtied = dirty * PAGE_SIZE;
        let pct = if round > 0 {
            throttle.after_round(config, dirtied, bytes)
        } else {
            0
        };
        if pct != throttler.pct.load(Ordering::SeqCst) {
            log::info!("auto-converge: throttling vCPUs to {pct} %");
            throttler.pct.store(pct, Ordering::SeqCst);
        }
        if let Some(m) = report.throttle_max_pct.as_mut() {
            *m = (*m).max(pct);
        }
        let rr = RoundReport {
            round,
            pages: sender.counts.pages - before.pages,
            zero_pages: sender.counts.zero - before.zero + sender.skipped - skipped_before,
            bytes,
            duration_ms: ms(dur),
            dirty_pages_after: dirty,
            dirty_rate_mbps: (dirty * PAGE_SIZE) as f64 / secs / 1e6,
            bandwidth_mbps: bandwidth / 1e6,
            expected_downtime_ms: ms(est.expected_downtime()),
            throttle_pct: pct,
        };
        log::info!("{rr}");
        progress(&Progress::Round(rr.clone()));
        report.rounds.push(rr);
        report.expected_downtime_ms = ms(est.expected_downtime());
        if cancel.is_cancelled() {
            return Err(MigrationError::new(phase, ErrorKind::Cancelled));
        }
        match decide(config, round, precopy_start.elapsed(), &est) {
            Decision::Continue => round += 1,
            Decision::Switchover => {
                forced = false;
                break;
            }
            Decision::ForceSwitchover => {
                forced = true;
                break;
            }
            Decision::GiveUp => {
                return Err(MigrationError::new(
                    phase,
                    ErrorKind::NotConverged {
                        rounds: round + 1,
                        expected_ms: ms(est.expected_downtime()),
                        limit_ms: ms(config.downtime_limit),
                    },
                ))
            }
        }
    }
    report.forced = forced;
    report.pages_sent = sender.counts.pages;
    report.zero_pages = sender.counts.zero + sender.skipped;

    // Stop-and-copy: stop throttling first so it cannot race the pause.
    throttler.finish(true);
    let t_pause = Instant::now();
    vm.pause()
        .map_err(|e| MigrationError::new(Phase::FinalMemory, e))?;
    // From here to `Go` the guest runs nowhere: bounded by `max_pause`.
    let deadline = PauseDeadline::arm(
        config.max_pause,
        links.iter().filter_map(|l| l.try_clone().ok()).collect(),
    );
    let expired = |e: MigrationError| {
        if deadline.expired() {
            MigrationError::new(
                e.phase,
                ErrorKind::PauseDeadline {
                    limit: deadline.limit(),
                    paused: deadline.paused_for(),
                },
            )
        } else {
            e
        }
    };
    let (t, ready) = stop_and_copy(vm, tracker, sender, fr, config, progress, report, bitmap)
        .map_err(expired)?;
    if cancel.is_cancelled() {
        return Err(MigrationError::new(Phase::Completion, ErrorKind::Cancelled));
    }

    // Commit: from here on only the destination's `Abandoned` lets the
    // source run the guest again (see `commit`).
    let cp = Phase::Completion;
    if !deadline.disarm() {
        let kind = ErrorKind::PauseDeadline {
            limit: deadline.limit(),
            paused: deadline.paused_for(),
        };
        return Err(MigrationError::new(cp, kind));
    }
    let answer_wait = config.io_timeout.saturating_mul(2);
    let resumed = match commit(&mut sender.fw, fr, &Go, answer_wait) {
        Commit::Committed(r) => r,
        Commit::Abandoned(why) => return Err(MigrationError::new(cp, ErrorKind::Abandoned(why))),
        Commit::Ambiguous(why) => return Err(MigrationError::new(cp, ErrorKind::Ambiguous(why))),
    };
    let t_done = Instant::now();

    report.pages_sent = sender.counts.pages;
    report.zero_pages = sender.counts.zero + sender.skipped;
    report.downtime_ms = ms(t_done - t_pause);
    let b = &mut report.downtime_breakdown;
    b.pause_ms = ms(t.paused - t_pause);
    b.state_save_ms = ms(t.saved - t.paused);
    b.final_sync_ms = ms(t.synced - t.saved);
    b.final_memory_ms = ms(t.mem - t.synced);
    b.state_transfer_ms = ms(t.ready - t.mem);
    b.dest_restore_ms = ready.restore_us as f64 / 1000.0;
    b.resume_ack_ms = ms(t_done - t.ready);
    b.dest_resume_ms = resumed.resume_us as f64 / 1000.0;
    progress(&Progress::Completed {
        downtime_ms: report.downtime_ms,
    });
    Ok(())
}
