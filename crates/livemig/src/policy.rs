//! Migration settings and the convergence policy.
//!
//! After every pre-copy round the source estimates the downtime a switchover
//! would cause now ([`RoundEstimate::expected_downtime`]): the time to send
//! the bytes still dirty, the device state and what is still queued on the
//! link ([`LinkMeter::transfer_time`]), plus the time the device state took
//! when it was measured at setup (pause, save, resume; the restore as the
//! destination timed it, or as long as the save; the state's framing for
//! the wire and the destination's read and decode of its frames), plus the
//! latest round's dirty-log sync (the final sync) and the final copy's
//! fixed cost (the latest round's end beyond its bytes at the link's rate),
//! plus one and a half round trips of the link (`Ready` comes back, `Go`
//! reaches the destination). The report shows these parts
//! ([`crate::report::ExpectedBreakdown`]). When the estimate is
//! within [`MigrationConfig::downtime_limit`], the source stops the VM and
//! sends the rest.
//!
//! The link's bandwidth is measured only on rounds that carried at least
//! [`MIN_SAMPLE_BYTES`]: a round of a few pages takes the time of its fixed
//! costs (scanning the bitmap, re-arming, the round's frames), and bytes
//! over that time say nothing about the link.

use std::time::Duration;

use serde::Serialize;

pub mod lz4;
pub mod polish;

/// The default downtime limit: 20 ms.
///
/// Operators judge a migration by what they see: a ping every 20 ms should
/// lose at most one reply, a remote-desktop stream should not stutter. 20 ms
/// keeps the blackout below one such interval, and on a loopback or 10 Gb/s
/// link it still allows tens of megabytes of residual dirty memory, so
/// ordinary guests converge in a few rounds. (QEMU's 300 ms default is from a
/// time of 1 Gb/s links.)
pub const DEFAULT_DOWNTIME_LIMIT: Duration = Duration::from_millis(20);

/// The default [`MigrationConfig::max_pause`]: 10 s.
///
/// Far above any downtime a converged migration causes (milliseconds), so
/// it only fires when something is stuck; short enough that a stuck
/// switchover costs the guest seconds, not the minutes of a TCP timeout.
pub const DEFAULT_MAX_PAUSE: Duration = Duration::from_secs(10);

/// What to do when the round or time cap is reached before convergence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum OnLimit {
    /// Give up: the source keeps running as before and the call returns an
    /// error. The safe default: the operator asked for a short blackout.
    Fail,
    /// Switch over anyway, accepting a longer downtime.
    ForceSwitchover,
}

/// Everything that tunes a migration.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationConfig {
    /// Longest acceptable downtime (source paused → destination running).
    pub downtime_limit: Duration,
    /// Bandwidth cap for memory pages, in bytes per second (`None` = as fast
    /// as the transport goes); at least one page per second per stream.
    /// It caps the whole migration: the control connection and every page
    /// stream share one budget (a stream with nothing to send leaves its
    /// share to the others), and post-copy's background push is paced by
    /// it too (not its answers to page requests). Lifted at the pause: the
    /// final copy goes as fast as it can.
    pub max_bandwidth: Option<u64>,
    /// Most pre-copy rounds (round 0, the full pass, included).
    pub max_rounds: u32,
    /// Longest pre-copy phase before the [`MigrationConfig::on_limit`] rule applies.
    pub max_precopy_time: Duration,
    /// What happens when a cap is reached.
    pub on_limit: OnLimit,
    /// Timeout of every blocking read of a reply (handshake, acknowledgements)
    /// and of every write on every connection of the migration (a peer that
    /// stops reading cannot block the source for longer).
    pub io_timeout: Duration,
    /// Longest the source may stay paused before it commits with `Go`: the
    /// final pages, the state and the wait for `Ready` must all fit. When it
    /// passes, every connection is shut down, the source resumes its guest
    /// and the error ([`crate::ErrorKind::PauseDeadline`]) says how long the
    /// guest was paused. (After `Go` the wait for `Resumed` is bounded by
    /// [`MigrationConfig::io_timeout`] and ends ambiguous.)
    pub max_pause: Duration,
    /// Pages per `Pages` frame (the staging buffer is this many pages),
    /// 1 ..= [`MAX_BATCH_PAGES`].
    pub batch_pages: u32,
    /// Auto-converge: when the guest dirties memory faster than half the
    /// transfer rate for two rounds in a row, throttle its vCPUs, starting at
    /// `throttle_initial` percent and adding `throttle_increment` each round
    /// the condition still holds, up to `throttle_max` (QEMU's cpu-throttle
    /// scheme: 20 % + 10 %).
    pub auto_converge: bool,
    /// First throttle step, percent of CPU time taken from the guest.
    pub throttle_initial: u32,
    /// Increment per round, percent.
    pub throttle_increment: u32,
    /// Ceiling, percent (at most 99; the three throttle settings must be in
    /// 0..=99).
    pub throttle_max: u32,
    /// Page streams (1 ..= [`crate::protocol::MAX_STREAMS`]). With more
    /// than one, the opener given to [`crate::Migration::streams`] (which
    /// sets this count too, and is the only way to supply an opener; a
    /// count above 1 without one is refused) opens that many extra
    /// connections and spreads each round's pages over them (one sender
    /// thread each; a page always travels on the same stream), so that one
    /// core's copy speed is not the limit. The destination may grant fewer.
    /// Default 1: everything on the one connection.
    pub streams: u32,
    /// Allow LZ4 compression of page frames (for slow links; a frame that
    /// does not shrink by an eighth is sent as it is). Every connection
    /// decides after each 8 MiB of page data it sent, within a round or
    /// over several short ones, whether LZ4 is on for the next
    /// ([`lz4::Lz4Decider`]: on when the sender waited for the link and
    /// LZ4 with the sender's own work is expected to move the pages faster
    /// than the link did, and while compressing does; off when the link
    /// has room, the pages do not shrink, or compressing did not pay, with
    /// retries damped). It starts off (on under
    /// [`MigrationConfig::max_bandwidth`]); while off, the start of a frame
    /// now and then is compressed to measure (within 2 % of the sender's
    /// time) and the frame sent raw. Each round's decision, its reason and
    /// the compression time are in its report
    /// ([`crate::report::RoundReport::lz4`]). On by default (since
    /// 2026-12-03: over a shaped 1 Gbit/s link with one stream it cut the
    /// total in 10 of 10 paired runs, to 0.57–0.92×; over 10 Gbit/s and
    /// loopback it stays off and its samples cost ~1–2 % of round 0's
    /// sender time; docs/benchmarks.md, "LZ4 on by default"). Set it to
    /// `false` to never compress.
    pub compress: bool,
    /// Round 0 leaves out pages that certainly read as zero without reading
    /// them: in private anonymous memory the pages `/proc/self/pagemap`
    /// shows neither present nor swapped, in memory mapped shared from a
    /// file (memfd, shmem, hugetlbfs) the file's holes. Other memory is read
    /// in full. Default on. Turn it off when guest memory is filled behind
    /// the kernel's back, for example served by a userfaultfd handler on
    /// first access: such a page looks untouched but is not zero.
    pub skip_untouched: bool,
    /// Offer the switchover probe in the handshake: `Some(true)` always,
    /// `Some(false)` never, `None` (the default) exactly where the control
    /// connection's transport cannot tell its round trip
    /// ([`crate::transport::Transport::round_trip`] is `None`: Unix
    /// sockets, in-memory pairs, and every transport that does not
    /// implement it — a VMM's own vsock or RDMA link, say). Where the
    /// destination grants it (this build's copying destination, protocol
    /// version 3), the source times after each pre-copy round the control
    /// connection's round trip through both engines (`Probe` →
    /// `ProbeReply`, answered by the destination's control reader as `Go`
    /// will be) and the burst of as many bytes as the state, and counts
    /// those instead of the transport's round trip in the expected
    /// downtime ([`RoundEstimate::probe`]). A destination that does not
    /// grant it (release 0.1.0, post-copy, a local hand-over) gets no
    /// probe and the estimate is the one without it. Not on by default
    /// where the transport knows its round trip (TCP): there the estimate
    /// with it was no closer to the actual downtime than without
    /// (docs/benchmarks.md, "The switchover probe").
    pub switchover_probe: Option<bool>,
    /// Extra pre-copy rounds once the expected downtime fits
    /// [`MigrationConfig::downtime_limit`] (the most a guest may be paused,
    /// not a target): while the guest dirties memory at most half as fast
    /// as the link carries it, one more round is run when it is expected
    /// to cut the downtime by at least [`polish::POLISH_MIN_GAIN`] and by a
    /// quarter ([`polish::another_round`]), at most this many times and
    /// within [`MigrationConfig::max_rounds`] and
    /// [`MigrationConfig::max_precopy_time`]. Each such round costs about
    /// the expected downtime's memory part in total time. Default 3; 0
    /// switches over at the first round whose estimate fits the limit.
    pub polish_rounds: u32,
    /// Send page data straight from guest memory (`PagesGather` frames,
    /// gathered with `write_vectored`) instead of copying it into a frame
    /// buffer first, where the destination grants it (this build's copying
    /// destination does; release 0.1.0 and earlier builds do not, and get
    /// `Pages` frames). Each data page then carries its own CRC: a page the
    /// guest changes between its CRC and the send arrives torn, is not
    /// installed, and is sent again (the guest's write dirtied it); a page
    /// still torn when memory is complete fails the migration before the
    /// commit point. LZ4-compressed frames (and the frames sampled for LZ4)
    /// are copied as before. Not with post-copy (a source that offers it
    /// asks for no `PagesGather`). Default off: on this project's machine
    /// it saved no measurable CPU (the copy's cost was reading guest memory
    /// from DRAM, which the page CRCs now pay; docs/benchmarks.md,
    /// "Zero-copy page sends").
    pub zero_copy: bool,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            downtime_limit: DEFAULT_DOWNTIME_LIMIT,
            max_bandwidth: None,
            max_rounds: 30,
            max_precopy_time: Duration::from_secs(120),
            on_limit: OnLimit::Fail,
            io_timeout: Duration::from_secs(10),
            max_pause: DEFAULT_MAX_PAUSE,
            batch_pages: 256,
            auto_converge: true,
            throttle_initial: 20,
            throttle_increment: 10,
            throttle_max: 99,
            streams: 1,
            compress: true,
            skip_untouched: true,
            switchover_probe: None,
            polish_rounds: 3,
            zero_copy: false,
        }
    }
}

/// Most pages per `Pages` frame ([`MigrationConfig::batch_pages`]): 4 MiB
/// of data, so that a frame with its record headers stays well inside
/// [`crate::protocol::MAX_FRAME_PAYLOAD`].
pub const MAX_BATCH_PAGES: u32 = 1024;

/// Longest accepted timeout or limit (`io_timeout`, `max_pause`,
/// `downtime_limit`, `max_precopy_time`): one day. Longer values are
/// refused rather than overflowing a deadline computation.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// A setting refused where it enters (by [`MigrationConfig::validate`] or
/// [`crate::ReceiveConfig::validate`]), before anything is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting {field} = {value}: {rule}")]
#[non_exhaustive]
pub struct ConfigError {
    /// The field.
    pub field: &'static str,
    /// Its value, as given.
    pub value: String,
    /// What it must be.
    pub rule: String,
}

fn invalid(
    field: &'static str,
    value: impl std::fmt::Debug,
    rule: impl Into<String>,
) -> ConfigError {
    ConfigError {
        field,
        value: format!("{value:?}"),
        rule: rule.into(),
    }
}

/// Checks a timeout: more than zero, at most [`MAX_DURATION`].
pub(crate) fn check_timeout(field: &'static str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() || d > MAX_DURATION {
        return Err(invalid(
            field,
            d,
            format!("must be more than 0 and at most {MAX_DURATION:?}"),
        ));
    }
    Ok(())
}

impl MigrationConfig {
    /// Checks every setting; [`crate::Migration::run`] calls it before it
    /// touches the VM or sends anything,
    /// so a bad setting is a clear error, never a panic or a failure in the
    /// middle of a round.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_timeout("io_timeout", self.io_timeout)?;
        check_timeout("max_pause", self.max_pause)?;
        if self.downtime_limit > MAX_DURATION {
            return Err(invalid(
                "downtime_limit",
                self.downtime_limit,
                format!("must be at most {MAX_DURATION:?}"),
            ));
        }
        if self.max_precopy_time.is_zero() || self.max_precopy_time > MAX_DURATION {
            return Err(invalid(
                "max_precopy_time",
                self.max_precopy_time,
                format!("must be more than 0 and at most {MAX_DURATION:?}"),
            ));
        }
        if self.max_rounds == 0 {
            return Err(invalid(
                "max_rounds",
                self.max_rounds,
                "must be at least 1 (round 0 is the full pass)",
            ));
        }
        if self.batch_pages == 0 || self.batch_pages > MAX_BATCH_PAGES {
            return Err(invalid(
                "batch_pages",
                self.batch_pages,
                format!("must be in 1..={MAX_BATCH_PAGES}"),
            ));
        }
        let max_streams = crate::protocol::MAX_STREAMS;
        if self.streams == 0 || self.streams > max_streams {
            return Err(invalid(
                "streams",
                self.streams,
                format!("must be in 1..={max_streams}"),
            ));
        }
        if let Some(b) = self.max_bandwidth {
            // The rule dates from when each page stream had its own equal
            // share of the cap (they share one budget now); kept, so that a
            // configuration accepted before is accepted now and vice versa.
            let min = crate::memory::PAGE_SIZE * u64::from(self.streams);
            if b < min {
                return Err(invalid("max_bandwidth", b, format!("must be None (no cap) or at least {min} bytes/s (one page per second per stream)")));
            }
        }
        for (field, v) in [
            ("throttle_initial", self.throttle_initial),
            ("throttle_increment", self.throttle_increment),
            ("throttle_max", self.throttle_max),
        ] {
            if v > 99 {
                return Err(invalid(field, v, "must be a percentage in 0..=99"));
            }
        }
        Ok(())
    }
}

/// Auto-converge bookkeeping: decides the throttle after each round.
#[derive(Debug, Default, Clone)]
pub struct Throttle {
    /// Current throttle, percent.
    pub pct: u32,
    strikes: u32,
}

impl Throttle {
    /// Updates the throttle after a round in which the guest dirtied
    /// `dirtied_bytes` while `sent_bytes` went out; returns the new percentage.
    pub fn after_round(
        &mut self,
        config: &MigrationConfig,
        dirtied_bytes: u64,
        sent_bytes: u64,
    ) -> u32 {
        if !config.auto_converge {
            return 0;
        }
        if dirtied_bytes.saturating_mul(2) > sent_bytes {
            self.strikes += 1;
        } else {
            self.strikes = 0;
        }
        if self.strikes >= 2 {
            let max = config.throttle_max.min(99);
            self.pct = if self.pct == 0 {
                config.throttle_initial.min(max)
            } else {
                (self.pct + config.throttle_increment).min(max)
            };
        }
        self.pct
    }
}

/// Rounds that sent fewer bytes than this (1 MiB) are not bandwidth
/// samples: their time is mostly fixed costs (QEMU likewise measures over
/// iterations of at least 100 ms).
pub const MIN_SAMPLE_BYTES: u64 = 1 << 20;

/// At the end of each round the source waits, bounded, until the
/// connections hold at most this many unacknowledged bytes (64 KiB; only
/// with transports that report them, see
/// [`crate::transport::Transport::unacked_bytes`]).
pub const DRAIN_BYTES: u64 = 64 << 10;

/// The link as pre-copy measured it: the bandwidth of the latest round that
/// carried at least [`MIN_SAMPLE_BYTES`], and what every round cost.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct LinkMeter {
    /// Bytes per second of the latest round of at least
    /// [`MIN_SAMPLE_BYTES`], if there was one.
    sample: Option<f64>,
    /// All bytes and all time of every round (a lower bound of the rate).
    total_bytes: u64,
    total_time: Duration,
    /// How long the latest round took.
    last_round: Duration,
    /// The bytes the latest round sent, and the bytes of every page it
    /// handled (sent as data, or found zero; at least `last_bytes`).
    last_bytes: u64,
    last_handled: u64,
}

impl LinkMeter {
    /// Accounts a round that sent `bytes` in `time` (until they were
    /// delivered, where the transport tells).
    pub fn record(&mut self, bytes: u64, time: Duration) {
        self.record_round(bytes, bytes, time);
    }

    /// [`LinkMeter::record`] for a round that also handled pages it did
    /// not send as data (zero pages): `handled` is the bytes of every page
    /// it looked at and sent (data or zero), so that a small payload is
    /// charged its share of the round ([`LinkMeter::transfer_time`]).
    pub fn record_round(&mut self, bytes: u64, handled: u64, time: Duration) {
        let time = time.max(Duration::from_micros(1));
        self.last_bytes = bytes;
        self.last_handled = handled.max(bytes);
        self.total_bytes = self.total_bytes.saturating_add(bytes);
        self.total_time += time;
        self.last_round = time;
        if bytes >= MIN_SAMPLE_BYTES {
            self.sample = Some(bytes as f64 / time.as_secs_f64());
        }
    }

    /// The measured bandwidth, bytes per second: the latest sample, or
    /// before any, all bytes over all time (a lower bound); 0 when nothing
    /// was sent.
    pub fn bandwidth(&self) -> f64 {
        self.sample
            .unwrap_or_else(|| self.total_bytes as f64 / self.total_time.as_secs_f64().max(1e-9))
    }

    /// Whether a round carried enough to measure the link.
    pub fn measured(&self) -> bool {
        self.sample.is_some()
    }

    /// How long sending `bytes` should take: at the sampled bandwidth; with
    /// no sample yet, a payload below [`MIN_SAMPLE_BYTES`] costs what the
    /// latest round cost (one more round of the same kind: fixed costs
    /// dominate) without the share of it that went to pages it found zero:
    /// the round's time times the larger of the payload and the round's
    /// sent bytes, over the bytes of every page it handled
    /// ([`LinkMeter::record_round`]; at most the whole round). Round 0 of an
    /// idle 1 GiB guest looks at every page and finds ~262 000 of them zero
    /// in ~5 ms; charging all of that to the last few pages made the
    /// expected downtime several times the actual. A larger payload costs
    /// its bytes at the lower bound
    /// ([`LinkMeter::bandwidth`]; "very long" when nothing was sent, so
    /// the next round measures).
    pub fn transfer_time(&self, bytes: u64) -> Duration {
        if bytes == 0 {
            return Duration::ZERO;
        }
        if self.sample.is_none() && bytes < MIN_SAMPLE_BYTES {
            let data = bytes.max(self.last_bytes);
            let share = data as f64 / self.last_handled.max(data) as f64;
            return self.last_round.mul_f64(share);
        }
        let bw = self.bandwidth().max(1.0);
        Duration::from_secs_f64((bytes as f64 / bw).min(1.0e6))
    }
}

/// While compression is off ([`MigrationConfig::compress`] set), one page
/// frame in this many at most has its start compressed to measure (and is
/// sent raw): until LZ4 and a window were measured; then as rarely as
/// [`lz4::Lz4Decider::sample_every`] says.
pub const COMPRESS_SAMPLE: u64 = 8;

/// What LZ4 did to the page frames it was given in a round (every frame
/// while compression was on, the samples while off).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct CompressionSample {
    /// Bytes given to LZ4.
    pub raw_bytes: u64,
    /// What they became.
    pub packed_bytes: u64,
    /// Compression time, summed over the page streams.
    pub time: Duration,
}

/// One connection's window of page frames, for [`lz4::Lz4Decider::decide`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkWindow {
    /// Page-frame bytes written, as sent.
    pub wire_bytes: u64,
    /// The page data they carried (before compression).
    pub raw_bytes: u64,
    /// The window's wall time.
    pub time: Duration,
    /// Of `time`, spent waiting for the link: inside writes of page
    /// frames (a full socket buffer blocks them) and in the bandwidth
    /// cap's pauses.
    pub blocked: Duration,
    /// Whether LZ4 was on for the window's frames.
    pub compressing: bool,
    /// What LZ4 did (every frame while on, the samples while off).
    pub lz4: CompressionSample,
}

/// Whether LZ4 should be on after one window `w`, given the link's rate
/// as last measured (`link_rate`): a [`lz4::Lz4Decider`] that knows only
/// that rate decides once (without its hysteresis, which needs the windows
/// before); the second value is the link's rate, updated. `None`: the
/// window says nothing.
#[deprecated(note = "use policy::lz4::Lz4Decider, which keeps its state from window to window")]
pub fn lz4_pays_in_window(w: &LinkWindow, link_rate: Option<f64>) -> (Option<bool>, Option<f64>) {
    let mut d = lz4::Lz4Decider::knowing(link_rate);
    let v = d.decide(w);
    (v.map(|v| v.on), d.link_rate())
}

/// The inputs to one convergence decision.
#[derive(Debug, Clone, Copy)]
pub struct RoundEstimate {
    /// Dirty bytes that would have to be sent while paused.
    pub remaining_bytes: u64,
    /// Bytes already sent but not yet acknowledged by the destination (0
    /// where the transport cannot tell): the final copy queues behind them.
    pub queued_bytes: u64,
    /// The link's bandwidth and the rounds' cost.
    pub link: LinkMeter,
    /// The link's round-trip time (zero where the transport cannot tell).
    pub round_trip: Duration,
    /// Measured switchover overhead beyond memory and messages: pause,
    /// state save, the final dirty-log sync, the final copy's fixed cost,
    /// the state's framing and the destination's read and decode of it,
    /// the destination's restore and resume. The engine measures the
    /// pause, save and resume in the handshake
    /// (`source::handshake::measure_state`), frames the state saved there
    /// and runs the destination's decode on those frames
    /// (`source::handshake::time_state_frames`), takes the restore as the
    /// destination timed it there (as long as the save when it did not),
    /// the sync as long as the latest round's and the final copy's fixed
    /// cost as the latest round's end less the bytes that end waited for at
    /// the link's rate.
    pub state_time: Duration,
    /// Bytes of state to send while paused.
    pub state_bytes: u64,
    /// What the switchover probe measured after this round (`None`
    /// without a probe, or when its answers did not come in time).
    pub probe: Option<ProbeTimes>,
}

/// What the switchover probe measured on the control connection before
/// the switchover (see [`MigrationConfig::switchover_probe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProbeTimes {
    /// One hop of the control connection through both engines' threads
    /// and the transport: the median of a few `Probe` → `ProbeReply`
    /// round trips without padding (a round trip, despite the name). The
    /// downtime holds one and a half beyond the destination's work:
    /// `Complete` → `Ready` (beyond the restore) and `Go`'s way there
    /// (before the resume; the downtime ends when the destination starts
    /// the guest, not when `Resumed` is back).
    pub hop: Duration,
    /// The state's bytes in one burst to the (not yet running)
    /// destination: the round trip of a `Probe` padded to the state's
    /// wire size, minus [`ProbeTimes::hop`] (zero if shorter).
    pub state_burst: Duration,
}

impl RoundEstimate {
    /// Expected downtime if the switchover happened now.
    ///
    /// Without a probe: the remaining, state and queued bytes over the
    /// link ([`LinkMeter::transfer_time`]), the state's own time, and one
    /// and a half round trips of the transport (the final data reaches the
    /// destination and `Ready` comes back; `Go` reaches the destination,
    /// which then starts the guest — the downtime ends there, see
    /// [`crate::Report::downtime_ms`]).
    ///
    /// With a probe: the remaining and queued bytes over the link, the
    /// state's own time, the state's measured burst and one and a half
    /// measured hops (each at least the transport's round trip) in place
    /// of the state's bytes at the link's rate and the round trips.
    pub fn expected_downtime(&self) -> Duration {
        self.transfer_part() + self.state_time + self.round_trip_part()
    }

    /// The bytes' part of [`RoundEstimate::expected_downtime`]: the
    /// remaining and queued bytes over the link, plus the state's bytes
    /// over the link (without a probe) or the probe's measured state burst.
    pub fn transfer_part(&self) -> Duration {
        let bytes = self.remaining_bytes.saturating_add(self.queued_bytes);
        match self.probe {
            None => self
                .link
                .transfer_time(bytes.saturating_add(self.state_bytes)),
            Some(p) => self.link.transfer_time(bytes) + p.state_burst,
        }
    }

    /// The messages' part of [`RoundEstimate::expected_downtime`]: one and
    /// a half round trips of the transport (`Complete` → `Ready`, then
    /// `Go`'s way), or with a probe one and a half measured hops (each at
    /// least the transport's round trip).
    pub fn round_trip_part(&self) -> Duration {
        let one = match self.probe {
            None => self.round_trip,
            Some(p) => p.hop.max(self.round_trip),
        };
        one + one / 2
    }
}

/// The decision after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Run another pre-copy round.
    Continue,
    /// Converged: stop and copy.
    Switchover,
    /// A cap was reached and the policy says to switch over anyway.
    ForceSwitchover,
    /// A cap was reached and the policy says to give up.
    GiveUp,
}

/// Decides what to do after round `round` (0-based) given the estimate.
pub fn decide(
    config: &MigrationConfig,
    round: u32,
    elapsed: Duration,
    est: &RoundEstimate,
) -> Decision {
    if est.expected_downtime() <= config.downtime_limit {
        return Decision::Switchover;
    }
    if round + 1 >= config.max_rounds || elapsed >= config.max_precopy_time {
        return match config.on_limit {
            OnLimit::Fail => Decision::GiveUp,
            OnLimit::ForceSwitchover => Decision::ForceSwitchover,
        };
    }
    Decision::Continue
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link measured at 1 GB/s (a 10 MB round in 10 ms).
    fn gigabyte_link() -> LinkMeter {
        let mut m = LinkMeter::default();
        m.record(10_000_000, Duration::from_millis(10));
        m
    }

    fn est(bytes: u64) -> RoundEstimate {
        RoundEstimate {
            remaining_bytes: bytes,
            queued_bytes: 0,
            link: gigabyte_link(),
            round_trip: Duration::ZERO,
            state_time: Duration::from_millis(1),
            state_bytes: 0,
            probe: None,
        }
    }

    fn close(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) < Duration::from_micros(10)
    }

    #[test]
    fn near_empty_rounds_do_not_measure_the_link() {
        let mut m = gigabyte_link();
        // A round of three pages that took 2 ms of fixed costs: not a
        // sample (3 pages / 2 ms would be 6 MB/s).
        m.record(3 * 4096, Duration::from_millis(2));
        assert!(m.measured());
        assert!((m.bandwidth() - 1e9).abs() < 1.0);
        assert!(close(
            m.transfer_time(20_000_000),
            Duration::from_millis(20)
        ));
        // A later full round is the new sample.
        m.record(2 << 20, Duration::from_millis(4));
        assert!((m.bandwidth() - f64::from(2 << 20) / 0.004).abs() < 1.0);
    }

    #[test]
    fn an_unmeasured_link_costs_a_small_payload_one_round() {
        // An idle guest: round 0 sent nothing at all.
        let mut m = LinkMeter::default();
        m.record(0, Duration::from_micros(300));
        assert!(!m.measured());
        assert_eq!(m.bandwidth(), 0.0);
        assert_eq!(m.transfer_time(0), Duration::ZERO);
        // The state (a few KB) costs one more such round, not KB / (0 B/s).
        assert_eq!(m.transfer_time(9000), Duration::from_micros(300));
        let e = RoundEstimate {
            remaining_bytes: 0,
            queued_bytes: 0,
            link: m,
            round_trip: Duration::ZERO,
            state_time: Duration::from_millis(1),
            state_bytes: 40,
            probe: None,
        };
        let c = MigrationConfig::default();
        assert_eq!(decide(&c, 0, Duration::ZERO, &e), Decision::Switchover);
        // A payload of a sample's size or more on an unmeasured link is
        // not guessed: at the lower bound it is far over the limit.
        assert!(m.transfer_time(MIN_SAMPLE_BYTES) > Duration::from_secs(1000));
        // Rounds of a few pages: the lower bound (all bytes over all time).
        m.record(8192, Duration::from_micros(100));
        assert!(!m.measured());
        let lower = 8192.0 / 400e-6;
        assert!((m.bandwidth() - lower).abs() < 1e-3 * lower);
        assert!(close(
            m.transfer_time(2 << 20),
            Duration::from_secs_f64(f64::from(2 << 20) / lower)
        ));
        assert_eq!(m.transfer_time(4096), Duration::from_micros(100));
    }

    #[test]
    fn a_small_payload_costs_its_share_of_a_round_of_zero_pages() {
        // Round 0 of an idle 1 GiB guest: every page looked at, 19 sent as
        // data (80 KB), the rest zero, in 5 ms.
        let mut m = LinkMeter::default();
        m.record_round(80_000, 1 << 30, Duration::from_millis(5));
        assert!(!m.measured());
        // The final copy of two pages and 9 KB of state: the round without
        // its zero pages (80 KB of 1 GiB: ~0.4 µs), not its whole 5 ms.
        let t = m.transfer_time(2 * 4096 + 9000);
        assert!(t < Duration::from_micros(1), "{t:?}");
        let t = m.transfer_time(800_000);
        assert!(close(
            t,
            Duration::from_millis(5).mul_f64(800_000.0 / f64::from(1 << 30))
        ));
        // A round of a few pages only (fixed costs): one more such round.
        m.record_round(8192, 8192, Duration::from_micros(300));
        assert_eq!(m.transfer_time(4096), Duration::from_micros(300));
        assert_eq!(m.transfer_time(9000), Duration::from_micros(300));
    }

    #[test]
    fn queued_bytes_and_round_trips_count() {
        let c = MigrationConfig::default();
        // 5 MB dirty at 1 GB/s: 5 ms + 1 ms state.
        let mut e = est(5_000_000);
        assert!(close(e.expected_downtime(), Duration::from_millis(6)));
        assert_eq!(decide(&c, 1, Duration::ZERO, &e), Decision::Switchover);
        // 16 MB still queued on the link: the final pages wait behind them.
        e.queued_bytes = 16_000_000;
        assert!(close(e.expected_downtime(), Duration::from_millis(22)));
        assert_eq!(decide(&c, 1, Duration::ZERO, &e), Decision::Continue);
        // Nothing queued, but a 10 ms round trip: Ready waits one, Go
        // half of one (the guest starts before Resumed comes back).
        e.queued_bytes = 0;
        e.round_trip = Duration::from_millis(10);
        assert!(close(e.expected_downtime(), Duration::from_millis(21)));
        assert_eq!(decide(&c, 1, Duration::ZERO, &e), Decision::Continue);
    }

    #[test]
    fn a_probe_replaces_the_round_trips_and_the_state_bytes() {
        let c = MigrationConfig::default();
        // 5 MB dirty at 1 GB/s, 1 ms state, 4 MB of state (4 ms at the
        // link's rate), a 2 ms round trip: 5 + 4 + 1 + 3 = 13 ms.
        let mut e = est(5_000_000);
        e.state_bytes = 4_000_000;
        e.round_trip = Duration::from_millis(2);
        assert!(close(e.expected_downtime(), Duration::from_millis(13)));
        // Measured: each hop 4 ms, the state's burst 2 ms: 5 + 1 + 6 + 2.
        e.probe = Some(ProbeTimes {
            hop: Duration::from_millis(4),
            state_burst: Duration::from_millis(2),
        });
        assert!(close(e.expected_downtime(), Duration::from_millis(14)));
        // A transport that says its round trip is longer than the hop
        // measured: the longer one.
        e.round_trip = Duration::from_millis(6);
        assert!(close(e.expected_downtime(), Duration::from_millis(17)));
        e.round_trip = Duration::from_millis(1);
        // Hops slower than the limit allows: keep going.
        e.probe = Some(ProbeTimes {
            hop: Duration::from_millis(10),
            state_burst: Duration::ZERO,
        });
        assert!(close(e.expected_downtime(), Duration::from_millis(21)));
        assert_eq!(decide(&c, 1, Duration::ZERO, &e), Decision::Continue);
    }

    #[test]
    fn converges_within_limit() {
        let c = MigrationConfig::default();
        // 10 MB at 1 GB/s = 10 ms + 1 ms state: within 20 ms.
        assert_eq!(
            decide(&c, 1, Duration::ZERO, &est(10_000_000)),
            Decision::Switchover
        );
        // 100 MB = 100 ms: keep going.
        assert_eq!(
            decide(&c, 1, Duration::ZERO, &est(100_000_000)),
            Decision::Continue
        );
    }

    #[test]
    #[allow(deprecated)]
    fn lz4_pays_in_window_when_the_link_is_the_bottleneck() {
        let mb = |n: u64| n * 1_000_000;
        let ms = Duration::from_millis;
        // LZ4 at 250 MB/s to 40 %.
        let lz4 = |raw: u64| CompressionSample {
            raw_bytes: raw,
            packed_bytes: raw * 2 / 5,
            time: Duration::from_secs_f64(raw as f64 / 250e6),
        };
        // Off on a 118 MB/s link that blocked the sender: on, and the
        // link's rate learnt.
        let off_slow = LinkWindow {
            wire_bytes: mb(118),
            raw_bytes: mb(118),
            time: ms(1000),
            blocked: ms(800),
            compressing: false,
            lz4: lz4(mb(15)),
        };
        assert_eq!(
            lz4_pays_in_window(&off_slow, None),
            (Some(true), Some(118e6))
        );
        // Off on a 1 GB/s link: LZ4 is slower than the link: off.
        let off_fast = LinkWindow {
            wire_bytes: mb(1000),
            raw_bytes: mb(1000),
            lz4: lz4(mb(125)),
            ..off_slow
        };
        assert_eq!(lz4_pays_in_window(&off_fast, None).0, Some(false));
        // Off and never waiting for the link: nothing LZ4 would relieve.
        let off_cpu = LinkWindow {
            blocked: ms(100),
            ..off_slow
        };
        // (Such a window shows the link carries at least its rate.)
        assert_eq!(
            lz4_pays_in_window(&off_cpu, None),
            (Some(false), Some(118e6))
        );
        // On and the link still the bottleneck: stays on.
        let on_slow = LinkWindow {
            wire_bytes: mb(118),
            raw_bytes: mb(295),
            compressing: true,
            lz4: lz4(mb(295)),
            ..off_slow
        };
        assert_eq!(lz4_pays_in_window(&on_slow, None).0, Some(true));
        // On and LZ4 the bottleneck (250 MB/s of page data, the link
        // idle half the time): stays on against a 118 MB/s link, goes off
        // against a 1 GB/s one, and off to measure with no link known.
        let on_cpu = LinkWindow {
            wire_bytes: mb(100),
            raw_bytes: mb(250),
            blocked: ms(50),
            compressing: true,
            lz4: lz4(mb(250)),
            ..off_slow
        };
        assert_eq!(lz4_pays_in_window(&on_cpu, Some(118e6)).0, Some(true));
        assert_eq!(lz4_pays_in_window(&on_cpu, Some(1e9)).0, Some(false));
        assert_eq!(lz4_pays_in_window(&on_cpu, None).0, Some(false));
        // Pages that do not shrink by an eighth: off, whatever the link.
        let random = LinkWindow {
            lz4: CompressionSample {
                packed_bytes: mb(15),
                ..lz4(mb(15))
            },
            ..off_slow
        };
        assert_eq!(lz4_pays_in_window(&random, None).0, Some(false));
        // Too little measured: no decision, the link rate kept. (What
        // counts is the page data measured: a window of 118 MB of pages
        // that went out as 4 KiB decides, see
        // `lz4_window_of_pages_that_shrink_tenfold_decides`.)
        let tiny = LinkWindow {
            wire_bytes: 4096,
            raw_bytes: 4096,
            ..off_slow
        };
        assert_eq!(lz4_pays_in_window(&tiny, Some(5.0)), (None, Some(5.0)));
    }

    /// A sender's 8 MiB window (`LZ4_WINDOW_BYTES`) of pages that LZ4
    /// shrinks 10:1 puts well under [`MIN_SAMPLE_BYTES`] on the wire; the
    /// window measured 8 MiB of page data all the same and must decide.
    #[test]
    #[allow(deprecated)]
    fn lz4_window_of_pages_that_shrink_tenfold_decides() {
        let raw = 8 << 20;
        let ms = Duration::from_millis;
        // LZ4 at 1 GB/s to a tenth, on a link that never kept the sender
        // waiting: LZ4 is the bottleneck.
        let on_cpu = LinkWindow {
            wire_bytes: raw / 10,
            raw_bytes: raw,
            time: ms(9),
            blocked: ms(1),
            compressing: true,
            lz4: CompressionSample {
                raw_bytes: raw,
                packed_bytes: raw / 10,
                time: ms(8),
            },
        };
        assert!(on_cpu.wire_bytes < MIN_SAMPLE_BYTES);
        // No link rate known: off, which measures it.
        assert_eq!(lz4_pays_in_window(&on_cpu, None), (Some(false), None));
        // A link known to be slower than what LZ4 reached: stays on.
        assert_eq!(
            lz4_pays_in_window(&on_cpu, Some(100e6)),
            (Some(true), Some(100e6))
        );
        // Link-bound while compressing: stays on; the link's rate is not
        // learnt from compressed frames.
        let on_slow = LinkWindow {
            blocked: ms(8),
            ..on_cpu
        };
        assert_eq!(lz4_pays_in_window(&on_slow, None), (Some(true), None));
    }

    #[test]
    fn throttle_steps_like_qemu() {
        let c = MigrationConfig::default();
        let mut t = Throttle::default();
        assert_eq!(t.after_round(&c, 100, 100), 0); // first strike
        assert_eq!(t.after_round(&c, 100, 100), 20);
        assert_eq!(t.after_round(&c, 100, 100), 30);
        assert_eq!(t.after_round(&c, 10, 100), 30); // keeps, strikes reset
        assert_eq!(t.after_round(&c, 100, 100), 30);
        assert_eq!(t.after_round(&c, 100, 100), 40);
        for _ in 0..20 {
            t.after_round(&c, 100, 100);
        }
        assert_eq!(t.pct, 99);
        let off = MigrationConfig {
            auto_converge: false,
            ..Default::default()
        };
        assert_eq!(Throttle::default().after_round(&off, 100, 1), 0);
    }

    #[test]
    fn state_time_counts() {
        let c = MigrationConfig::default();
        let mut e = est(0);
        e.state_time = Duration::from_millis(25);
        assert_eq!(decide(&c, 1, Duration::ZERO, &e), Decision::Continue);
    }

    #[test]
    fn caps_follow_policy() {
        let mut c = MigrationConfig {
            max_rounds: 3,
            ..Default::default()
        };
        let e = est(1 << 40);
        assert_eq!(decide(&c, 1, Duration::ZERO, &e), Decision::Continue);
        assert_eq!(decide(&c, 2, Duration::ZERO, &e), Decision::GiveUp);
        c.on_limit = OnLimit::ForceSwitchover;
        assert_eq!(decide(&c, 2, Duration::ZERO, &e), Decision::ForceSwitchover);
        assert_eq!(
            decide(&c, 0, Duration::from_secs(1000), &e),
            Decision::ForceSwitchover
        );
    }
}
