//! The migration report (built as the migration runs) and progress events.

use serde::Serialize;

/// One pre-copy round.
#[derive(Debug, Clone, Default, Serialize)]
#[non_exhaustive]
pub struct RoundReport {
    /// Round number (0 = the full pass).
    pub round: u32,
    /// Pages sent with their data.
    pub pages: u64,
    /// Pages sent as zero markers (or skipped as never touched in round 0).
    pub zero_pages: u64,
    /// Bytes written to the transport in this round.
    pub bytes: u64,
    /// Duration of the round, ms.
    pub duration_ms: f64,
    /// Pages found dirty after the round (to send next).
    pub dirty_pages_after: u64,
    /// Guest dirty rate during the round, MB/s (10^6 bytes).
    pub dirty_rate_mbps: f64,
    /// Transfer rate of the round, MB/s.
    pub bandwidth_mbps: f64,
    /// Expected downtime if switching over after this round, ms.
    pub expected_downtime_ms: f64,
    /// vCPU throttle (auto-converge) in force after this round, percent.
    pub throttle_pct: u32,
    /// Whether LZ4 was on for this round's page frames when it began, or
    /// switched on within it (with [`crate::MigrationConfig::compress`]:
    /// decided from every 8 MiB of page data a connection sends, over one
    /// round or several; see [`crate::policy::lz4::Lz4Decider`]; the decision
    /// and its reason are in [`RoundReport::lz4`]).
    pub compressed: bool,
    /// Page-frame bytes given to LZ4 in this round (every frame while it
    /// was on; while off, the start of a frame now and then, to measure:
    /// see [`crate::policy::lz4::Lz4Decider::sample_every`]).
    pub lz4_input_bytes: u64,
    /// What LZ4 made of [`RoundReport::lz4_input_bytes`].
    pub lz4_output_bytes: u64,
    /// LZ4's decision in force at the end of this round and why, and
    /// what was decided within it (`None` when compression is not allowed,
    /// [`crate::MigrationConfig::compress`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lz4: Option<Lz4RoundReport>,
    /// The switchover probe after this round (see
    /// [`crate::MigrationConfig::switchover_probe`]): one hop of the control
    /// connection through both engines, ms — the median of three `Probe` →
    /// `ProbeReply` round trips, counted one and a half times in
    /// [`RoundReport::expected_downtime_ms`] (its counterparts in the
    /// switchover: `state_transfer_ms − dest_restore_ms` without the
    /// state's burst, and `go_hop_ms`). `None` without a
    /// probe (not granted, or no answer in time: the estimate is then the
    /// one without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_hop_ms: Option<f64>,
    /// The state's burst the probe measured, ms: the round trip of a probe
    /// padded to the state's wire size, minus the hop (counted once in the
    /// expected downtime instead of the state's bytes at the link's rate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_state_burst_ms: Option<f64>,
    /// Bytes of this round (and earlier ones) that the destination's engine
    /// had not read when the round ended, as the destination answered the
    /// read count (`ReadQuery` → `ReadCount`; the round waits, at most the
    /// keepalive interval, until at most [`crate::policy::DRAIN_BYTES`]
    /// are left; without an answer in time, everything written since the
    /// latest answer). They count in [`RoundReport::expected_downtime_ms`].
    /// `None` where the destination did not grant the read count (an
    /// older destination, or post-copy): the round then ends on the send
    /// queue alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unread_bytes: Option<u64>,
}

/// LZ4 in one pre-copy round ([`RoundReport::lz4`]): the decision in force
/// when the round ended and its reason, the windows of page data that
/// decided within the round (each connection decides after every 8 MiB of
/// page data it sent, so a short round may decide nothing and keep the
/// previous decision) and how many of them switched LZ4 on or off.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Lz4RoundReport {
    /// Whether LZ4 was on when the round ended.
    pub on: bool,
    /// Why (the reason of the latest decision; see
    /// [`crate::policy::lz4::Lz4Decider`]).
    pub reason: crate::policy::lz4::Lz4Reason,
    /// Windows that decided within the round.
    pub decisions: u32,
    /// Of those, the ones that switched LZ4 on or off.
    pub switches: u32,
    /// Time spent compressing in the round (every frame while on, the
    /// samples while off), summed over the page streams, ms.
    pub compress_ms: f64,
}

/// Where the downtime went (ms, on the source's clock unless said).
/// [`Report::downtime_ms`] is `pause_ms + state_save_ms + final_sync_ms +
/// final_memory_ms + state_transfer_ms + go_hop_ms + dest_resume_ms`
/// (`state_transfer_ms` holds `dest_restore_ms`).
#[derive(Debug, Clone, Default, Serialize)]
#[non_exhaustive]
pub struct DowntimeBreakdown {
    /// Pausing the vCPUs.
    pub pause_ms: f64,
    /// Final dirty-log sync.
    pub final_sync_ms: f64,
    /// Sending the last dirty pages.
    pub final_memory_ms: f64,
    /// Of `final_memory_ms`, the time spent in LZ4 (compressing the last
    /// page frames while LZ4 is on; summed over the page streams, which
    /// compress in parallel).
    pub final_memory_lz4_ms: f64,
    /// Saving vCPU, VM and device state.
    pub state_save_ms: f64,
    /// Sending the state until the destination reported it restored.
    pub state_transfer_ms: f64,
    /// Restoring state on the destination (destination clock).
    pub dest_restore_ms: f64,
    /// From `Go` until the source read the destination's `Resumed` (not
    /// part of [`Report::downtime_ms`], which ends when the destination
    /// starts the guest: `go_hop_ms` and `dest_resume_ms` are its share of
    /// this).
    pub resume_ack_ms: f64,
    /// `Go`'s way to the destination as the source places it: half the
    /// shortest round trip the control connection showed (the transport's
    /// own, the state's without the restore, the acknowledgement's without
    /// the resume).
    pub go_hop_ms: f64,
    /// Resuming on the destination (destination clock).
    pub dest_resume_ms: f64,
}

/// What the expected downtime ([`Report::expected_downtime_ms`]) was made
/// of, part by part (ms), as estimated after the last pre-copy round: set
/// beside [`DowntimeBreakdown`], it shows which part the estimate missed.
/// The parts add up to the expected downtime.
#[derive(Debug, Clone, Default, Serialize)]
#[non_exhaustive]
pub struct ExpectedBreakdown {
    /// Pausing the vCPUs, as the handshake's state measurement paused them
    /// (at most 2 ms).
    pub pause_ms: f64,
    /// Saving the state, as the handshake measured it.
    pub state_save_ms: f64,
    /// The final dirty-log sync: as long as the last round's sync.
    pub final_sync_ms: f64,
    /// The final copy's fixed cost beyond its pages' bytes (its
    /// counterpart: [`DowntimeBreakdown::final_memory_ms`] less the last
    /// pages at the link's rate): as long as the last round's end (every
    /// stream flushed, the page streams' barrier, `RoundEnd` written) less
    /// the bytes that end accounted at the link's measured rate (with page
    /// streams these are all the bytes they sent in the round, so this is
    /// what the barrier took beyond them; 0 if nothing).
    pub final_barrier_ms: f64,
    /// The bytes: the remaining pages, the bytes still queued and the
    /// state at the link's measured rate (with the switchover probe: the
    /// state's measured burst instead of its bytes).
    pub transfer_ms: f64,
    /// Framing the state for the wire (the `State` frames' headers and
    /// CRCs), as the source timed it on the state saved in the handshake.
    /// With [`ExpectedBreakdown::state_decode_ms`], the state's bytes in
    /// [`ExpectedBreakdown::transfer_ms`] and the first round trip (`Complete` → `Ready`),
    /// the counterpart of [`DowntimeBreakdown::state_transfer_ms`] less
    /// [`DowntimeBreakdown::dest_restore_ms`].
    pub state_encode_ms: f64,
    /// The destination's read and decode of the `State` frames: the source
    /// runs the destination's code (a fresh buffer filled with each frame,
    /// its CRC, the decode into sections) on its own frames in the
    /// handshake and counts as long.
    pub state_decode_ms: f64,
    /// The destination's restore: when
    /// [`ExpectedBreakdown::dest_restore_measured`], the destination's
    /// rehearsed restore (the fastest of its rehearsals), else as long as
    /// the save.
    pub dest_restore_ms: f64,
    /// Whether [`ExpectedBreakdown::dest_restore_ms`] is the destination's
    /// rehearsed restore.
    pub dest_restore_measured: bool,
    /// The destination's rehearsed save (0 when it sent none).
    pub dest_rehearsal_save_ms: f64,
    /// The destination's rehearsed restore (0 when it sent none).
    pub dest_rehearsal_restore_ms: f64,
    /// The destination's resume (`Go` → its guest started): 0 when
    /// [`ExpectedBreakdown::dest_started_before_wake`], else as long as the
    /// source's resume in the handshake's measurement.
    pub dest_resume_ms: f64,
    /// Whether the destination said its VM starts the guest before it
    /// wakes the vCPU threads (`HelloReply`, to a source that asked), so
    /// that its resume is counted as 0.
    pub dest_started_before_wake: bool,
    /// One and a half round trips of the link (`Complete` → `Ready`, then
    /// `Go`'s way to the destination), or with the switchover probe one
    /// and a half measured hops.
    pub round_trips_ms: f64,
}

impl DowntimeBreakdown {
    /// The parts that make up [`Report::downtime_ms`], added: pause, state
    /// save, final sync, final memory, state transfer (which holds the
    /// destination's restore), `Go`'s way and the destination's resume.
    /// `resume_ack_ms` and the parts' own parts (`dest_restore_ms`,
    /// `final_memory_lz4_ms`) are not added again.
    ///
    /// ```
    /// let b = livemig::report::DowntimeBreakdown::default();
    /// assert_eq!(b.total_ms(), 0.0);
    /// ```
    pub fn total_ms(&self) -> f64 {
        self.pause_ms
            + self.state_save_ms
            + self.final_sync_ms
            + self.final_memory_ms
            + self.state_transfer_ms
            + self.go_hop_ms
            + self.dest_resume_ms
    }
}

impl ExpectedBreakdown {
    /// The parts that make up [`Report::expected_downtime_ms`], added (the
    /// rehearsal's figures, from which `dest_restore_ms` was scaled, are
    /// not added).
    ///
    /// ```
    /// let e = livemig::report::ExpectedBreakdown::default();
    /// assert_eq!(e.total_ms(), 0.0);
    /// ```
    pub fn total_ms(&self) -> f64 {
        self.pause_ms
            + self.state_save_ms
            + self.final_sync_ms
            + self.final_barrier_ms
            + self.transfer_ms
            + self.state_encode_ms
            + self.state_decode_ms
            + self.dest_restore_ms
            + self.dest_resume_ms
            + self.round_trips_ms
    }
}

/// The outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Status {
    /// The guest runs on the destination.
    Completed,
    /// The migration failed; the source kept the guest.
    Failed,
    /// Cancelled; the source kept the guest.
    Cancelled,
}

/// The migration report, QMP `query-migrate`-like.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Report {
    /// Outcome.
    pub status: Status,
    /// Total time from the call to the end, ms.
    pub total_ms: f64,
    /// Handshake and state measurement, until dirty logging is on, ms.
    pub setup_ms: f64,
    /// From the call to the first page handed to a connection (or, when
    /// round 0 sent no page at all, to its end; 0 without a pre-copy
    /// round), ms: the set-up plus round 0's scan for the first page worth
    /// sending.
    pub first_page_ms: f64,
    /// Source pause → the destination started the guest's vCPUs, ms, on the
    /// source's clock: pause → `Ready` read, `Go`'s way to the destination
    /// and the destination's resume ([`DowntimeBreakdown`]). The source's
    /// later read of `Resumed` is [`Report::acknowledged_ms`].
    pub downtime_ms: f64,
    /// Source pause → the source read the destination's `Resumed`, ms (what
    /// `downtime_ms` was before 2026-12-03, session 4): the downtime plus the
    /// acknowledgement's way back and however late the source's thread got
    /// a CPU, while the guest already ran on the destination.
    pub acknowledged_ms: f64,
    /// The downtime limit in force, ms.
    pub downtime_limit_ms: f64,
    /// The downtime the policy expected at switchover, ms.
    pub expected_downtime_ms: f64,
    /// Breakdown of the downtime.
    pub downtime_breakdown: DowntimeBreakdown,
    /// Breakdown of the expected downtime.
    pub expected_breakdown: ExpectedBreakdown,
    /// Whether the switchover was forced by a cap.
    pub forced: bool,
    /// Pre-copy rounds.
    pub rounds: Vec<RoundReport>,
    /// Pages sent in the stop-and-copy phase.
    pub final_pages: u64,
    /// Total bytes written to the transport.
    pub bytes_sent: u64,
    /// Total pages sent with data.
    pub pages_sent: u64,
    /// Total zero pages (markers, or skipped in round 0).
    pub zero_pages: u64,
    /// Guest memory size, bytes.
    pub memory_bytes: u64,
    /// Bytes of state sections.
    pub state_bytes: u64,
    /// `State` frames the device state took (several when it is larger
    /// than one frame).
    pub state_frames: u32,
    /// Dirty-tracking note (e.g. whether manual clear was used).
    pub dirty_tracking: String,
    /// Page streams used (1 = pages on the control connection).
    pub streams: u32,
    /// Whether page data went straight from guest memory
    /// ([`MigrationConfig::zero_copy`](crate::MigrationConfig::zero_copy)
    /// asked for it and the destination granted `PagesGather` frames);
    /// false when not asked, and when asked but not granted.
    pub zero_copy: bool,
    /// Highest vCPU throttle applied by auto-converge, percent (0 = none;
    /// `None` = the VM cannot be throttled).
    pub throttle_max_pct: Option<u32>,
    /// The error, if any.
    pub error: Option<String>,
    /// The post-copy phase, when the migration switched to post-copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<crate::source::postcopy::PostcopySourceReport>,
}

impl Report {
    /// A report with nothing measured yet.
    pub fn new(memory_bytes: u64, downtime_limit_ms: f64) -> Self {
        Report {
            status: Status::Failed,
            total_ms: 0.0,
            setup_ms: 0.0,
            first_page_ms: 0.0,
            downtime_ms: 0.0,
            acknowledged_ms: 0.0,
            downtime_limit_ms,
            expected_downtime_ms: 0.0,
            downtime_breakdown: DowntimeBreakdown::default(),
            expected_breakdown: ExpectedBreakdown::default(),
            forced: false,
            rounds: Vec::new(),
            final_pages: 0,
            bytes_sent: 0,
            pages_sent: 0,
            zero_pages: 0,
            memory_bytes,
            state_bytes: 0,
            state_frames: 0,
            dirty_tracking: String::new(),
            streams: 1,
            zero_copy: false,
            throttle_max_pct: Some(0),
            error: None,
            postcopy: None,
        }
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// Progress events, delivered to the callback given to the source.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Progress {
    /// The destination accepted the handshake.
    Accepted,
    /// A pre-copy round finished.
    Round(RoundReport),
    /// The VM was paused for the stop-and-copy.
    Paused {
        /// Dirty pages to send while paused.
        remaining_pages: u64,
    },
    /// The migration switches to post-copy (the VM pauses next; the
    /// destination runs it after `Go` while its memory arrives).
    Postcopy {
        /// Why (asked for, or pre-copy predicted not to converge).
        reason: String,
    },
    /// The destination runs the guest.
    Completed {
        /// Downtime, ms.
        downtime_ms: f64,
    },
}

impl std::fmt::Display for RoundReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "round {}: {} pages ({} zero) in {:.1} ms, {:.0} MB/s{}{}; dirty rate {:.0} MB/s, {} pages left, expected downtime {:.1} ms{}",
            self.round,
            self.pages,
            self.zero_pages,
            self.duration_ms,
            self.bandwidth_mbps,
            if self.compressed { " LZ4" } else { "" },
            match self.lz4 {
                Some(l) => format!(
                    " (LZ4 {} now: {:?}, {} switches)",
                    if l.on { "on" } else { "off" },
                    l.reason,
                    l.switches
                ),
                None => String::new(),
            },
            self.dirty_rate_mbps,
            self.dirty_pages_after,
            self.expected_downtime_ms,
            match (self.probe_hop_ms, self.probe_state_burst_ms) {
                (Some(h), Some(b)) => format!(" (probe: hop {h:.2} ms, state burst {b:.2} ms)"),
                _ => String::new(),
            }
        )
    }
}

/// Progress events of the destination, delivered to the callback given to
/// [`crate::Reception::progress`].
///
/// `Accepted` comes before the destination answers the source's `Hello`
/// (so before the source can send a page, let alone pause),
/// `RoundReceived` after each pre-copy round (the source may pause its
/// guest right after the last one: a slow callback can then add to the
/// downtime), `Completed` after the destination told the source that the
/// guest runs here. After a switch to post-copy the guest runs here from
/// `PostcopyActive` on, `PostcopyInstalled` follows the pages arriving,
/// and `Completed` comes once every page is in.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ReceiveProgress {
    /// The VM was built for the source's description and its memory
    /// cleared; the acceptance is about to be sent.
    Accepted {
        /// Guest memory, bytes.
        memory_bytes: u64,
        /// vCPUs.
        vcpus: u32,
        /// Page streams the source asked for.
        streams_asked: u32,
    },
    /// The source ended a pre-copy round (its `RoundEnd` was read; with
    /// several page streams some of the round's pages may still be on
    /// their way): what an operator of the destination can follow while
    /// the guest still runs on the source. Delivered on the thread that reads the
    /// migration, as the source's next round (or its pause) proceeds:
    /// keep the callback short.
    RoundReceived {
        /// The round (0 for the first).
        round: u32,
        /// Bytes of whole frames read so far on every connection of the
        /// migration (its pages, compressed or not, and the frames around
        /// them).
        bytes: u64,
    },
    /// Post-copy ([`crate::Reception::postcopy`]): the source committed
    /// (`Go`), the VM was resumed here (or left paused, `running: false`,
    /// when the source VM had been paused by its operator) and `Resumed`
    /// was sent, while `missing_pages` pages are still to come (from the
    /// source's push and its answers to faults). Delivered once, on the
    /// calling thread, right after `Resumed` was sent and before any
    /// [`ReceiveProgress::PostcopyInstalled`]; [`ReceiveProgress::Completed`]
    /// follows once every page is in.
    PostcopyActive {
        /// Whether the guest runs here now.
        running: bool,
        /// Pages missing at the resume (the switch's discard set, less the
        /// pages installed while the state was restored).
        missing_pages: u64,
    },
    /// Post-copy, after [`ReceiveProgress::PostcopyActive`]: pages are
    /// being installed while the guest runs here. Delivered on the calling
    /// thread (which reads the source's push on the control connection)
    /// after a frame of the push (pages or a keepalive) is read: after the
    /// first one, then at most once every 100 ms while pages are missing,
    /// and exactly once more when every page is in (`missing_pages` 0),
    /// before [`ReceiveProgress::Completed`]. After a broken connection was
    /// replaced ([`crate::Reception::postcopy_reconnect`]) the events go on
    /// from the new connection's first frame, counts carrying on. Keep the
    /// callback short: the push is not read meanwhile.
    PostcopyInstalled {
        /// Pages installed since the switch (pushed or answered to a
        /// fault).
        installed_pages: u64,
        /// Pages still missing.
        missing_pages: u64,
        /// Bytes of whole frames read so far on every connection of the
        /// migration (the pre-copy part's included; after a broken
        /// connection, what the broken ones had read included).
        bytes: u64,
    },
    /// The source committed (`Go`) and the VM was resumed (or left paused,
    /// `running: false`, when the source VM had been paused by its
    /// operator); `Resumed` was sent. After a switch to post-copy: every
    /// page is installed too.
    Completed {
        /// Whether the guest runs here now.
        running: bool,
    },
}
