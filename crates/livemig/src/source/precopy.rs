//! Pre-copy: round 0 sends every page, each later round the pages dirtied
//! during the one before, until the policy decides to switch over. Ends in
//! [`Converged`].

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::cancel::CancelToken;
use super::rounds::merge_vmm_writes;
use super::session::{ms, Session, Tracking};
use super::throttle::Throttler;
use crate::bitmap::DirtyBitmap;
use crate::error::{ErrorKind, MigrationError, Phase};
use crate::memory::{MemoryLayout, PAGE_SIZE};
use crate::policy::{
    decide, polish, CompressionSample, Decision, LinkMeter, MigrationConfig, ProbeTimes,
    RoundEstimate, Throttle, DRAIN_BYTES,
};
use crate::protocol::RoundEnd;
use crate::report::{ExpectedBreakdown, Progress, RoundReport};
use crate::transport::Transport;
use crate::vm::{Rearm, SourceVm};

/// The policy decided to switch over.
pub(super) struct Converged {
    /// The pages dirtied since the last round: the stop-and-copy sends them.
    pub(super) bitmap: DirtyBitmap,
    /// What the rounds measured.
    pub(super) summary: PrecopySummary,
}

/// What pre-copy measured, for the report.
#[derive(Debug, Default)]
pub(super) struct PrecopySummary {
    /// One entry per round.
    pub(super) rounds: Vec<RoundReport>,
    /// Whether a cap forced the switchover.
    pub(super) forced: bool,
    /// The downtime expected after the last round, ms.
    pub(super) expected_downtime_ms: f64,
    /// Its parts.
    pub(super) expected: ExpectedBreakdown,
    /// The highest vCPU throttle applied, percent.
    pub(super) throttle_max_pct: u32,
}

/// What one round sent, and how long it took.
struct Sent {
    pages: u64,
    zero: u64,
    bytes: u64,
    duration: Duration,
    /// The round minus re-arming the dirty log.
    sending: Duration,
    /// Bytes the destination had not received after the round's wait: not
    /// read by its engine when it answered the read count, else not
    /// acknowledged by its kernel.
    queued: u64,
    /// What the destination's read count said it had not read (`None`:
    /// not granted).
    unread: Option<u64>,
    /// Whether LZ4 was on when the round began or any of its page frames
    /// went compressed, and what LZ4 did.
    compressed: bool,
    lz4: CompressionSample,
    /// The dirty-log sync after the round (the hypervisor's log and the
    /// VMM's writes): the final sync is estimated as long.
    sync: Duration,
    /// The round's end: every stream flushed (and, with page streams, the
    /// barrier where each says it is done) and `RoundEnd` written, without
    /// the time LZ4 took meanwhile. The final copy ends with the same
    /// barrier (each stream ending with `Complete`); its fixed cost is
    /// estimated from this ([`Precopy::account`]).
    end: Duration,
    /// Bytes the round's end accounted: the frame it flushed, and with page
    /// streams everything they sent in the round (their counts come back at
    /// the barrier).
    end_bytes: u64,
}

/// The rounds' running state.
struct Precopy {
    round: u32,
    start: Instant,
    throttle: Throttle,
    /// The bandwidth estimate.
    link: LinkMeter,
    /// The smallest round-trip time the control connection reported.
    round_trip: Option<Duration>,
    /// Rounds run after the estimate fitted the limit.
    polished: u32,
    summary: PrecopySummary,
}

/// Runs the rounds until the policy says switch over (or gives up).
pub(super) fn precopy<V: SourceVm + ?Sized>(
    s: &mut Session<'_, V>,
    t: &mut Tracking<'_>,
    throttler: &Throttler,
) -> Result<Converged, MigrationError> {
    let start = Instant::now();
    let layout = t.sender.layout.clone();
    // The VMM's writes recorded before the handshake were dropped there
    // (round 0 sends every page that may hold data anyway); the handshake
    // built round 0's bitmap while the destination made its VM.
    let mut bitmap = t
        .round0
        .take()
        .filter(|b| b.num_regions() == layout.regions().len())
        .unwrap_or_else(|| first_round_pages(&layout));
    log::debug!(
        "set-up: round 0 starts at {:.2} ms (bitmap built: {:.2} ms)",
        super::session::ms(s.started.elapsed()),
        super::session::ms(start.elapsed())
    );
    if super::postcopy::pure(s, t) {
        // Pure post-copy: no round; every page is requested or pushed.
        return Ok(Converged {
            bitmap,
            summary: PrecopySummary::default(),
        });
    }
    let mut p = Precopy {
        round: 0,
        start,
        throttle: Throttle::default(),
        link: LinkMeter::default(),
        // Before any page: the link's round trip without a queue.
        round_trip: round_trip(&t.links),
        polished: 0,
        summary: PrecopySummary::default(),
    };
    loop {
        let phase = Phase::Precopy(p.round);
        let mut sent = send_round(s, t, &bitmap, p.round)?;
        t.sender.first_page.get_or_insert_with(Instant::now);
        bitmap.clear();
        let t_sync = Instant::now();
        t.tracker
            .sync(&mut bitmap)
            .map_err(|e| MigrationError::new(phase, e))?;
        merge_vmm_writes(s.vm, &mut bitmap);
        sent.sync = t_sync.elapsed();
        let probe = match t.prober.as_mut() {
            Some(pr) => {
                let mut reads_late = |f: &crate::protocol::Frame<'_>| match t.reads.as_mut() {
                    Some(r) => r.take_late(f, phase),
                    None => Ok(false),
                };
                pr.measure_with(&mut t.sender.fw, &mut t.control, phase, &mut reads_late)?
            }
            None => None,
        };
        let est = p.account(s, t, throttler, &sent, bitmap.count(), probe);
        if s.cancel.is_cancelled() {
            return Err(MigrationError::new(phase, ErrorKind::Cancelled));
        }
        let decision = decide(s.config, p.round, p.start.elapsed(), &est);
        if super::postcopy::switch_now(s, t, &p.summary.rounds, &decision, &est) {
            return Ok(p.converged(bitmap, false));
        }
        match decision {
            Decision::Continue => p.round += 1,
            Decision::Switchover if p.polish(s.config, &est) => p.round += 1,
            Decision::Switchover => return Ok(p.converged(bitmap, false)),
            Decision::ForceSwitchover => return Ok(p.converged(bitmap, true)),
            Decision::GiveUp => return Err(not_converged(s, p.round, &est)),
        }
    }
}

/// Round 0: every page, except those that certainly read as zero
/// ([`crate::ram::HostRam::populated`], asked per chunk after its re-arm):
/// the destination scrubbed its memory to zero in the handshake.
fn first_round_pages(layout: &MemoryLayout) -> DirtyBitmap {
    let mut bitmap = DirtyBitmap::new(layout);
    bitmap.set_all();
    bitmap
}

/// Sends the pages of `bitmap` (re-arming the dirty log chunk by chunk in
/// manual-clear mode), flushes every stream and ends the round with
/// `RoundEnd`.
fn send_round<V: SourceVm + ?Sized>(
    s: &mut Session<'_, V>,
    t: &mut Tracking<'_>,
    bitmap: &DirtyBitmap,
    round: u32,
) -> Result<Sent, MigrationError> {
    let phase = Phase::Precopy(round);
    let t0 = Instant::now();
    let sender = &mut t.sender;
    let before = sender.counts;
    let skipped_before = sender.skipped;
    sender.skip_zero = round == 0;
    sender.skip_untouched = round == 0 && s.config.skip_untouched;
    sender.clear_time = Duration::ZERO;
    let compressed = sender.lz4.is_some() && sender.lz4_on.is_on();
    let tracker = if t.tracker.rearm_mode() == Rearm::BeforeRead {
        Some(&mut *t.tracker)
    } else {
        None
    };
    sender.send_bitmap(bitmap, tracker, s.cancel, phase)?;
    let t_end = Instant::now();
    let before_end = sender.counts;
    sender.end_round(phase, false)?;
    let ended = sender.counts.since(&before_end);
    let end_bytes = ended.bytes;
    // LZ4 while the last frames were flushed: a sample, which the final
    // copy does not take (`Lz4Switch::stop_sampling`), or compressing
    // pages, which their bytes at the link's rate stand for. (With page
    // streams the barrier brings the streams' counts of the whole round,
    // compressed in parallel: nothing of it is the end's.)
    let end_lz4 = match sender.pool {
        None => Duration::from_nanos(ended.lz4_ns),
        Some(_) => Duration::ZERO,
    };
    sender.pause_lz4_window();
    sender.skip_zero = false;
    sender.skip_untouched = false;
    let pages = sender.counts.pages - before.pages;
    let c = sender.counts.since(&before);
    let lz4 = CompressionSample {
        raw_bytes: c.lz4_raw,
        packed_bytes: c.lz4_packed,
        time: Duration::from_nanos(c.lz4_ns),
    };
    sender
        .fw
        .send(&RoundEnd { round, pages })
        .map_err(|e| MigrationError::new(phase, e))?;
    let end = t_end.elapsed().saturating_sub(end_lz4);
    let zero = sender.counts.zero - before.zero + sender.skipped - skipped_before;
    let bytes = sender.counts.bytes - before.bytes;
    let clear_time = sender.clear_time;
    let (queued, unread) = wait_until_arrived(s, t, phase)?;
    let duration = t0.elapsed();
    Ok(Sent {
        pages,
        zero,
        bytes,
        duration,
        // Sending time: the round minus re-arming the dirty log (a round 0
        // of a mostly idle guest is nearly all re-arming; counting it as
        // transfer time made the link look slow and an idle guest "not
        // converge" under load). It includes the drain: the bandwidth is
        // what reached the destination.
        sending: duration
            .saturating_sub(clear_time)
            .max(Duration::from_micros(50)),
        queued,
        unread,
        compressed: compressed || c.lz4_frames > 0,
        lz4,
        sync: Duration::ZERO,
        end,
        end_bytes,
    })
}

/// The end of a round: waits, at most the keepalive interval in all, until
/// the destination's engine has read all but [`DRAIN_BYTES`] of what was
/// written (when the read count was granted) and its kernel has
/// acknowledged all but that ([`drain`]). Returns the larger of what was
/// not read and not acknowledged then, and what the read count said
/// (`None`: not granted; without an answer in time, everything since its
/// latest answer counts as not read, so that no switchover is decided on
/// bytes the destination has not confirmed).
fn wait_until_arrived<V: SourceVm + ?Sized>(
    s: &mut Session<'_, V>,
    t: &mut Tracking<'_>,
    phase: Phase,
) -> Result<(u64, Option<u64>), MigrationError> {
    let until = Instant::now() + t.sender.alive_every;
    let written = t.bytes_written();
    let Some(reads) = t.reads.as_mut() else {
        return Ok((drain(&t.links, until, s.cancel), None));
    };
    let mut probe_late = |f: &crate::protocol::Frame<'_>| match t.prober.as_mut() {
        Some(p) => p.take_late_frame(f, phase),
        None => Ok(false),
    };
    let unread = reads.wait(
        &mut t.sender.fw,
        &mut t.control,
        written,
        until,
        s.cancel,
        phase,
        &mut probe_late,
    )?;
    let queued = drain(&t.links, until, s.cancel);
    Ok((queued.max(unread), Some(unread)))
}

/// The end of a round on a slow or deep link: waits, until `until` at
/// most, until the connections that can tell
/// ([`Transport::unacked_bytes`]) hold at most [`DRAIN_BYTES`] that the
/// destination has not acknowledged, so that the dirty pages are counted
/// and the switchover decided when the round's pages have arrived, and the
/// final copy does not queue behind them. Returns what is still
/// unacknowledged then (0 where no transport tells).
fn drain(links: &[Box<dyn Transport>], until: Instant, cancel: &CancelToken) -> u64 {
    loop {
        let queued: u64 = links.iter().filter_map(|l| l.unacked_bytes()).sum();
        if queued <= DRAIN_BYTES || cancel.is_cancelled() || Instant::now() >= until {
            return queued;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// The control connection's round-trip time, if its transport tells.
fn round_trip(links: &[Box<dyn Transport>]) -> Option<Duration> {
    links.first().and_then(|l| l.round_trip())
}

impl Precopy {
    /// Accounts a round with `dirty` pages found after it: the estimate,
    /// the throttle, the round's report (logged and passed to `progress`).
    fn account<V: SourceVm + ?Sized>(
        &mut self,
        s: &mut Session<'_, V>,
        t: &Tracking<'_>,
        throttler: &Throttler,
        sent: &Sent,
        dirty: u64,
        probe: Option<ProbeTimes>,
    ) -> RoundEstimate {
        // Bandwidth: measured on rounds that carried enough to fill the
        // link (a round of a few pages is mostly fixed costs).
        let handled = (sent.pages + sent.zero) * PAGE_SIZE;
        self.link.record_round(sent.bytes, handled, sent.sending);
        let barrier = final_barrier(sent.end, sent.end_bytes, &self.link);
        // The round trip: the smallest seen (a queue inflates it).
        self.round_trip = match (self.round_trip, round_trip(&t.links)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let est = RoundEstimate {
            remaining_bytes: dirty * PAGE_SIZE,
            queued_bytes: sent.queued,
            link: self.link,
            round_trip: self.round_trip.unwrap_or_default(),
            state_time: t.estimate.parts.total() + sent.sync + barrier,
            state_bytes: t.estimate.wire_bytes,
            probe,
        };
        let expected = expected_breakdown(&est, &t.estimate.parts, sent.sync, barrier);
        // With post-copy standing in for auto-converge, the guest is never
        // throttled: a non-converging pre-copy switches instead.
        let pct = if self.round > 0 && !super::postcopy::replaces_throttle(s, t) {
            self.throttle
                .after_round(s.config, dirty * PAGE_SIZE, sent.bytes)
        } else {
            0
        };
        if pct != throttler.pct.load(Ordering::SeqCst) {
            log::info!("auto-converge: throttling vCPUs to {pct} %");
            throttler.pct.store(pct, Ordering::SeqCst);
        }
        let secs = sent.duration.as_secs_f64().max(1e-6);
        let rr = RoundReport {
            round: self.round,
            pages: sent.pages,
            zero_pages: sent.zero,
            bytes: sent.bytes,
            duration_ms: ms(sent.duration),
            dirty_pages_after: dirty,
            dirty_rate_mbps: (dirty * PAGE_SIZE) as f64 / secs / 1e6,
            bandwidth_mbps: sent.bytes as f64 / sent.sending.as_secs_f64() / 1e6,
            expected_downtime_ms: ms(est.expected_downtime()),
            throttle_pct: pct,
            compressed: sent.compressed,
            lz4_input_bytes: sent.lz4.raw_bytes,
            lz4_output_bytes: sent.lz4.packed_bytes,
            lz4: t
                .sender
                .lz4
                .is_some()
                .then(|| t.sender.lz4_on.take_round(ms(sent.lz4.time))),
            probe_hop_ms: probe.map(|p| ms(p.hop)),
            probe_state_burst_ms: probe.map(|p| ms(p.state_burst)),
            unread_bytes: sent.unread,
        };
        log::info!("{rr}");
        (s.progress)(&Progress::Round(rr.clone()));
        let summary = &mut self.summary;
        summary.throttle_max_pct = summary.throttle_max_pct.max(pct);
        summary.expected_downtime_ms = rr.expected_downtime_ms;
        summary.expected = expected;
        summary.rounds.push(rr);
        est
    }

    /// The estimate fits the limit: whether to run one more round anyway
    /// ([`MigrationConfig::polish_rounds`], [`polish::another_round`]).
    fn polish(&mut self, config: &MigrationConfig, est: &RoundEstimate) -> bool {
        if self.polished >= config.polish_rounds
            || self.round + 1 >= config.max_rounds
            || self.start.elapsed() >= config.max_precopy_time
        {
            return false;
        }
        let rate = self
            .summary
            .rounds
            .last()
            .map_or(f64::NAN, |r| r.dirty_rate_mbps * 1e6);
        let Some(after) = polish::another_round(est, rate) else {
            return false;
        };
        self.polished += 1;
        log::info!(
            "round {}: the expected downtime {:.2} ms fits the limit; one more round \
             is expected to bring it to {:.2} ms",
            self.round,
            ms(est.expected_downtime()),
            ms(after)
        );
        true
    }

    fn converged(mut self, bitmap: DirtyBitmap, forced: bool) -> Converged {
        self.summary.forced = forced;
        Converged {
            bitmap,
            summary: self.summary,
        }
    }
}

/// The parts of `est`'s expected downtime: `parts` (the handshake's state
/// measurement), the round's dirty-log `sync` and the final copy's fixed
/// cost (`barrier`) are in its `state_time`.
fn expected_breakdown(
    est: &RoundEstimate,
    parts: &super::handshake::StateParts,
    sync: Duration,
    barrier: Duration,
) -> ExpectedBreakdown {
    ExpectedBreakdown {
        pause_ms: ms(parts.pause),
        state_save_ms: ms(parts.save),
        final_sync_ms: ms(sync),
        final_barrier_ms: ms(barrier),
        transfer_ms: ms(est.transfer_part()),
        state_encode_ms: ms(parts.encode),
        state_decode_ms: ms(parts.decode),
        dest_restore_ms: ms(parts.restore),
        dest_restore_measured: parts.restore_measured,
        dest_rehearsal_save_ms: parts.rehearsal.map_or(0.0, |r| ms(r.save)),
        dest_rehearsal_restore_ms: parts.rehearsal.map_or(0.0, |r| ms(r.restore)),
        dest_resume_ms: ms(parts.resume),
        dest_started_before_wake: parts.started_before_wake,
        round_trips_ms: ms(est.round_trip_part()),
    }
}

/// The final copy's fixed cost, from a round's `end` (see [`Sent::end`])
/// that accounted `end_bytes`: the end beyond those bytes at `link`'s rate
/// (the final copy's own bytes are in the transfer part); zero if the
/// bytes alone take as long.
fn final_barrier(end: Duration, end_bytes: u64, link: &LinkMeter) -> Duration {
    end.saturating_sub(link.transfer_time(end_bytes))
}

/// The policy gave up after `round`.
fn not_converged<V: SourceVm + ?Sized>(
    s: &Session<'_, V>,
    round: u32,
    est: &RoundEstimate,
) -> MigrationError {
    MigrationError::new(
        Phase::Precopy(round),
        ErrorKind::NotConverged {
            rounds: round + 1,
            expected_ms: ms(est.expected_downtime()),
            limit_ms: ms(s.config.downtime_limit),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link measured at 1 GB/s.
    fn gigabyte_link() -> LinkMeter {
        let mut link = LinkMeter::default();
        link.record(10_000_000, Duration::from_millis(10));
        link
    }

    #[test]
    fn the_final_barrier_is_the_round_s_end_beyond_its_bytes() {
        let link = gigabyte_link();
        let us = Duration::from_micros;
        // An end that flushed nothing: all of it is fixed cost.
        assert_eq!(final_barrier(us(80), 0, &link), us(80));
        // 1 MB flushed at 1 GB/s is 1 ms of a 1.2 ms end.
        let b = final_barrier(us(1200), 1_000_000, &link);
        assert!(b.abs_diff(us(200)) < us(1), "{b:?}");
        // A capped link's end that only waited for its bytes: nothing.
        assert_eq!(final_barrier(us(900), 1_000_000, &link), Duration::ZERO);
    }
}
