//! Whether LZ4 compression of page frames pays, window by window
//! ([`MigrationConfig::compress`](super::MigrationConfig::compress)).
//!
//! Each connection's sender keeps one [`Lz4Decider`]. After every window
//! of page data ([`LinkWindow`]) it asks the decider whether LZ4 is to be
//! on for the next frames; the answer carries its reason
//! ([`Lz4Verdict`]), which the round's report shows
//! ([`crate::report::RoundReport::lz4`]).

use serde::Serialize;

use super::{LinkWindow, COMPRESS_SAMPLE, MIN_SAMPLE_BYTES};

/// A window whose sender waited for the link at least this share of its
/// time had the link as its bottleneck.
const LINK_BOUND: f64 = 0.5;

/// How much faster LZ4 must have made the page data move, measured while
/// on, to stay on.
const LZ4_MARGIN: f64 = 1.1;

/// How much faster LZ4 is expected to make the page data move, from a
/// window sent raw, before it goes on: the expectation is rough (samples
/// are a frame's start; the host's other work changes both rates), and a
/// wrong "on" costs a window of compression at LZ4's rate. Over 10 Gbit/s
/// on a busy host (load 4), windows of 410 MB/s with LZ4 sampled at
/// 0.55 GB/s to 0.43 expected 1.2 times the link's rate; compressing, LZ4
/// ran at 0.3 GB/s and the pages moved at 130 MB/s.
const LZ4_ON_MARGIN: f64 = 1.5;

/// While LZ4 is off, the share of the sender's time its samples may take
/// (2 %): one frame in as many as keep LZ4's time, at its measured rate,
/// within this share of the latest window's time per byte.
pub const SAMPLE_BUDGET: f64 = 0.02;

/// While LZ4 is off, a sampled frame has only its first this many bytes
/// (256 KiB) compressed: enough to measure LZ4's rate and ratio, a quarter
/// of a default frame's cost.
pub const SAMPLE_BYTES: usize = 256 << 10;

/// The fewest frames per sample while off: 1024 (with 1 MiB frames, one
/// sample per GiB of page data).
pub const MAX_SAMPLE_EVERY: u64 = 1024;

/// The windows sent raw whose rates make the link's: the highest of the
/// latest this many.
const RECENT: usize = 4;

/// The most paying windows in a row that a held-off LZ4 may need.
const MAX_HOLD: u32 = 64;

/// Why LZ4 is on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Lz4Reason {
    /// No window has decided yet: off on a link of unknown speed (the
    /// first window measures), on under a bandwidth cap.
    Starting,
    /// On: the sender waited for the link, and LZ4 with the sender's own
    /// work is expected to move the page data faster than the link did
    /// (by `LZ4_ON_MARGIN`, 1.5).
    Pays,
    /// On: while compressing, the page data moved faster than the link's
    /// known rate (by `LZ4_MARGIN`), or the sender waited for the link and
    /// no rate is known to compare with.
    PaidWhileOn,
    /// Off: the sender waited for the link less than half the window: the
    /// link has room, LZ4 would only add work.
    NotLinkBound,
    /// Off: the pages do not shrink by an eighth.
    Incompressible,
    /// Off: the sender waited for the link, but LZ4 with the sender's own
    /// work is not expected to be faster than the link (by
    /// `LZ4_ON_MARGIN`, 1.5).
    LinkFasterThanLz4,
    /// Off: while compressing, the page data moved no faster than the
    /// link's known rate (by `LZ4_MARGIN`), or no rate was known and the
    /// sender did not wait for the link (off measures it).
    DidNotPay,
    /// Off: the window says LZ4 would pay, but it was switched off not
    /// long ago because it did not: it stays off until as many windows in
    /// a row say so as the tries that failed made necessary (1, 2, 4, …).
    HeldOff,
}

/// One decision: on or off, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Lz4Verdict {
    /// Whether LZ4 is to be on for the next frames.
    pub on: bool,
    /// Why.
    pub reason: Lz4Reason,
}

/// One connection's LZ4 decisions, window after window.
///
/// LZ4 starts off on a link of unknown speed (one frame in
/// [`COMPRESS_SAMPLE`] is compressed to measure, and sent raw) and on
/// under a bandwidth cap. After each window ([`Lz4Decider::decide`]):
/// * off, and the sender waited for the link less than half the window:
///   off ([`Lz4Reason::NotLinkBound`]): the link has room, and LZ4 would
///   add work to the sender, the bottleneck. No sample is needed.
/// * off and link-bound: LZ4 is expected to pay when the sender,
///   compressing, would move the page data faster than the link's rate by
///   `LZ4_ON_MARGIN` (1.5): per byte of page data it would spend its own work
///   (the window's time neither waiting nor compressing) and LZ4's time
///   (a write's time counts as waiting for the link, which the sender
///   overlaps with compressing the next frame), and the link would still
///   need the compressed bytes' time. Where a write's time was in fact
///   spent copying into the transport, this is too hopeful: the next
///   window, compressing, shows it ([`Lz4Reason::DidNotPay`]). LZ4's rate
///   and ratio are the window's samples', or the latest measured when the
///   window has none.
/// * on: it paid if the page data moved faster than the link's known rate
///   by `LZ4_MARGIN` (with no rate known: if the sender waited for the
///   link); otherwise off ([`Lz4Reason::DidNotPay`]), whatever the sender
///   waited for (it may be the destination behind the link).
/// * pages that do not shrink by an eighth: off.
///
/// The link's rate is the highest page-data rate of the latest 4 windows
/// sent raw, whether the sender waited for the link or not (a window that
/// did not wait shows the link carries at least that much): one slow
/// window (the destination or the host busy for a moment) does not make a
/// fast link look slow enough for LZ4. With none yet, the bandwidth cap
/// if there is one.
///
/// Samples: while off, the first [`SAMPLE_BYTES`] of one frame in
/// [`Lz4Decider::sample_every`] are compressed to measure (the frame is
/// sent raw): one in [`COMPRESS_SAMPLE`] until
/// LZ4 was measured, then as few as keep its time within
/// [`SAMPLE_BUDGET`] of the sender's (at 10 Gbit/s LZ4 compressed the
/// benchmark guest's pages at ~0.3 GB/s: one frame in 8 cost ~15 % of the
/// round).
///
/// Hysteresis: each time LZ4 went off because it did not pay, the paying
/// windows in a row needed before it goes on again double (1, 2, 4, … up
/// to 64; [`Lz4Reason::HeldOff`] meanwhile), so a link about as fast as
/// LZ4 does not flip it every window.
#[derive(Debug, Clone)]
pub struct Lz4Decider {
    /// The link's rate (page-data bytes/s): the highest of `recent`, the
    /// bandwidth cap before any.
    link_rate: Option<f64>,
    /// Page-data rates of the latest windows sent raw (0: none yet).
    recent: [f64; RECENT],
    /// Where the next goes in `recent`.
    next: usize,
    /// LZ4's time per byte and its ratio, as last sampled.
    lz4: Option<(f64, f64)>,
    /// The latest window's time per byte of page data.
    window_per_byte: Option<f64>,
    /// Paying windows in a row needed before LZ4 goes on.
    hold: u32,
    /// Paying windows in a row so far.
    streak: u32,
    /// Page streams whose compression shares the host's CPU with this
    /// connection's (1: this one alone).
    streams: u32,
}

impl Lz4Decider {
    /// A decider that knows the link's rate is at most `cap` bytes/s (the
    /// bandwidth cap, [`super::MigrationConfig::max_bandwidth`]), if any.
    pub fn new(cap: Option<u64>) -> Self {
        Lz4Decider {
            link_rate: cap.map(|r| r as f64),
            recent: [0.0; RECENT],
            next: 0,
            lz4: None,
            window_per_byte: None,
            hold: 1,
            streak: 0,
            streams: 1,
        }
    }

    /// The same decider for one of several page streams that all carry
    /// pages and would all compress at once, `streams` of them on each
    /// core (the engine passes the streams over the host's cores, rounded
    /// up): the link's rate it sees is its own share, and LZ4's rate it
    /// measures is counted as shared by that many. Over 10 Gbit/s with 4
    /// streams on 2 cores, each stream's own share made LZ4 look 4 times as
    /// fast as it was.
    pub fn for_streams(mut self, streams: u32) -> Self {
        self.streams = streams.max(1);
        self
    }

    /// A decider that knows the link's rate is `link_rate` bytes/s.
    pub(crate) fn knowing(link_rate: Option<f64>) -> Self {
        Lz4Decider {
            link_rate,
            ..Lz4Decider::new(None)
        }
    }

    /// The decision before any window: on under a bandwidth cap (the link
    /// is known to be at most that fast), off otherwise.
    pub fn initial(&self) -> Lz4Verdict {
        Lz4Verdict {
            on: self.link_rate.is_some(),
            reason: Lz4Reason::Starting,
        }
    }

    /// While LZ4 is off, one page frame in this many is compressed anyway
    /// (and sent raw), to measure: [`COMPRESS_SAMPLE`] before LZ4 and a
    /// window were measured; then as many that LZ4's time per byte over
    /// that many is [`SAMPLE_BUDGET`] of the latest window's time per byte
    /// (at least [`COMPRESS_SAMPLE`], at most [`MAX_SAMPLE_EVERY`]).
    pub fn sample_every(&self) -> u64 {
        match (self.lz4, self.window_per_byte) {
            (Some((lz4, _)), Some(window)) if window > 0.0 => {
                let n = (lz4 / (SAMPLE_BUDGET * window)).ceil();
                (n.min(MAX_SAMPLE_EVERY as f64) as u64).max(COMPRESS_SAMPLE)
            }
            _ => COMPRESS_SAMPLE,
        }
    }

    /// The link's rate as last measured, page-data bytes/s.
    pub fn link_rate(&self) -> Option<f64> {
        self.link_rate
    }

    /// The decision after window `w`; `None`: the window says nothing
    /// (less than [`MIN_SAMPLE_BYTES`] of page data, or a link-bound
    /// window while off with no frame sampled).
    pub fn decide(&mut self, w: &LinkWindow) -> Option<Lz4Verdict> {
        let secs = w.time.as_secs_f64();
        if w.raw_bytes < MIN_SAMPLE_BYTES || secs <= 0.0 {
            return None;
        }
        let link_bound = w.blocked.as_secs_f64() >= LINK_BOUND * secs;
        self.window_per_byte = Some(secs / w.raw_bytes as f64);
        if w.lz4.raw_bytes > 0 {
            let per_byte = w.lz4.time.as_secs_f64() / w.lz4.raw_bytes as f64;
            let ratio = w.lz4.packed_bytes as f64 / w.lz4.raw_bytes as f64;
            self.lz4 = Some((per_byte, ratio));
        }
        let verdict = |on, reason| Some(Lz4Verdict { on, reason });
        let rate = w.raw_bytes as f64 / secs;
        if !w.compressing {
            self.recent[self.next] = rate;
            self.next = (self.next + 1) % RECENT;
            self.link_rate = Some(self.recent.iter().copied().fold(rate, f64::max));
        }
        if !w.compressing && !link_bound {
            self.streak = 0;
            return verdict(false, Lz4Reason::NotLinkBound);
        }
        let (lz4_per_byte, ratio) = self.lz4?;
        if ratio > 7.0 / 8.0 {
            self.streak = 0;
            return verdict(false, Lz4Reason::Incompressible);
        }
        if w.compressing {
            let paid = match self.link_rate {
                Some(link) => rate > LZ4_MARGIN * link,
                None => link_bound,
            };
            if paid {
                return verdict(true, Lz4Reason::PaidWhileOn);
            }
            self.hold = (self.hold * 2).min(MAX_HOLD);
            self.streak = 0;
            return verdict(false, Lz4Reason::DidNotPay);
        }
        let link = self.link_rate.unwrap_or(rate);
        let expected = expected_rate_on(w, lz4_per_byte * f64::from(self.streams), ratio);
        if expected <= LZ4_ON_MARGIN * link {
            self.streak = 0;
            return verdict(false, Lz4Reason::LinkFasterThanLz4);
        }
        self.streak += 1;
        if self.streak < self.hold {
            return verdict(false, Lz4Reason::HeldOff);
        }
        self.streak = 0;
        verdict(true, Lz4Reason::Pays)
    }
}

/// The page-data rate a sender that was off in window `w` (link-bound,
/// LZ4 measured at `lz4_per_byte` seconds per byte) is expected to reach
/// compressing to `ratio`: per byte its own work (the window's time
/// neither waiting nor compressing samples) and LZ4's time; at most the
/// link's rate over the ratio.
fn expected_rate_on(w: &LinkWindow, lz4_per_byte: f64, ratio: f64) -> f64 {
    let raw = w.raw_bytes as f64;
    let secs = w.time.as_secs_f64();
    let blocked = w.blocked.as_secs_f64().min(secs);
    let lz4 = w.lz4.time.as_secs_f64().min(secs - blocked);
    let own = (secs - blocked - lz4) / raw;
    let per_byte = own + lz4_per_byte;
    let link = raw / secs;
    (1.0 / per_byte.max(1e-15)).min(link / ratio)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::CompressionSample;

    const MB: u64 = 1_000_000;

    /// A window of `raw` bytes of page data sent as they are (LZ4 off) in
    /// `secs`, waiting for the link `blocked` of it, with `sampled` bytes
    /// compressed to `ratio` at `lz4_rate` bytes/s to measure.
    fn off_window(
        raw: u64,
        secs: f64,
        blocked: f64,
        sampled: u64,
        ratio: f64,
        lz4_rate: f64,
    ) -> LinkWindow {
        LinkWindow {
            wire_bytes: raw,
            raw_bytes: raw,
            time: Duration::from_secs_f64(secs),
            blocked: Duration::from_secs_f64(blocked),
            compressing: false,
            lz4: CompressionSample {
                raw_bytes: sampled,
                packed_bytes: (sampled as f64 * ratio) as u64,
                time: Duration::from_secs_f64(sampled as f64 / lz4_rate),
            },
        }
    }

    /// Compression starts off on a link of unknown speed: the first
    /// window measures (one frame in [`Lz4Decider::sample_every`]) and
    /// decides; starting on cost a whole window of compression where the
    /// link is faster than LZ4 (10 Gbit/s: 186 → 295 ms).
    #[test]
    fn starts_off_on_a_link_of_unknown_speed() {
        let d = Lz4Decider::new(None);
        assert_eq!(
            d.initial(),
            Lz4Verdict {
                on: false,
                reason: Lz4Reason::Starting
            }
        );
        // With a bandwidth cap the link is known to be at most that fast:
        // on, and the first window compares what it reached with the cap.
        assert!(Lz4Decider::new(Some(64 * MB)).initial().on);
    }

    /// A link that waits for the sender less than LZ4 and the sender's own
    /// work together would: LZ4 alone (1.25 GB/s) is faster than the link
    /// (1 GB/s), but the sender also spends 0.35 s per GB reading and
    /// writing pages, so compressing it would move 0.87 GB/s. Never on,
    /// however many such windows.
    #[test]
    fn a_link_faster_than_the_compressing_sender_never_turns_it_on() {
        let mut d = Lz4Decider::new(None);
        // 1000 MB in 1 s; 0.55 s waiting for the link; 125 MB sampled in
        // 0.1 s at 1.25 GB/s to half their size.
        let w = off_window(1000 * MB, 1.0, 0.55, 125 * MB, 0.5, 1.25e9);
        for _ in 0..20 {
            let v = d.decide(&w).expect("a full window decides");
            assert!(!v.on, "{v:?}");
            assert_eq!(v.reason, Lz4Reason::LinkFasterThanLz4);
        }
        // The same window on a 118 MB/s link (8.5 times as long, waiting
        // for the link nearly all of it): on.
        let slow = off_window(1000 * MB, 8.5, 8.05, 125 * MB, 0.5, 1.25e9);
        let mut d = Lz4Decider::new(None);
        assert_eq!(d.decide(&slow).map(|v| v.on), Some(true));
    }

    /// One slow window on a fast link (the destination busy for a
    /// moment): the sender waited for the link and page data moved at only
    /// 100 MB/s, where LZ4 (0.3 GB/s to 0.57) is expected to move 175 MB/s;
    /// but the windows before carried 700 MB/s. Off (before: on, and the
    /// next window compressed 8 MiB at 0.3 GB/s).
    #[test]
    fn one_slow_window_on_a_fast_link_does_not_turn_it_on() {
        let mut d = Lz4Decider::new(None);
        let fast = off_window(700 * MB, 1.0, 0.3, 10 * MB, 0.57, 0.3e9);
        for _ in 0..3 {
            assert!(!d.decide(&fast).expect("decides").on);
        }
        let slow = off_window(100 * MB, 1.0, 0.9, 10 * MB, 0.57, 0.3e9);
        let v = d.decide(&slow).expect("decides");
        assert_eq!((v.on, v.reason), (false, Lz4Reason::LinkFasterThanLz4));
        // On a link that is that slow window after window: on.
        let mut d = Lz4Decider::new(None);
        assert_eq!(d.decide(&slow).map(|v| v.on), Some(true));
        // A link LZ4 is expected to beat by less than 1.5 times (250 MB/s
        // against 277): off.
        let close = off_window(250 * MB, 1.0, 0.9, 10 * MB, 0.57, 0.3e9);
        assert_eq!(d.decide(&close).map(|v| v.on), Some(false));
    }

    /// With 4 page streams, the deciding stream's window carries a quarter
    /// of the link (here 100 MB/s of a 400 MB/s link); LZ4 at 0.3 GB/s is
    /// shared by the 4 streams' compression: off. Alone on a 100 MB/s
    /// link: on.
    #[test]
    fn streams_share_lz4s_rate() {
        let share = off_window(100 * MB, 1.0, 0.9, 10 * MB, 0.57, 0.3e9);
        let mut d = Lz4Decider::new(None).for_streams(4);
        let v = d.decide(&share).expect("decides");
        assert_eq!((v.on, v.reason), (false, Lz4Reason::LinkFasterThanLz4));
        let mut d = Lz4Decider::new(None);
        assert_eq!(d.decide(&share).map(|v| v.on), Some(true));
    }

    /// A sender that never waited for the link: the link has room, LZ4
    /// would only add work. Off, without any sample needed.
    #[test]
    fn a_sender_that_never_waits_for_the_link_does_not_compress() {
        let mut d = Lz4Decider::new(None);
        let w = off_window(700 * MB, 1.0, 0.1, 0, 0.5, 1e9);
        let v = d.decide(&w).expect("decides without samples");
        assert_eq!((v.on, v.reason), (false, Lz4Reason::NotLinkBound));
    }

    /// Samples cost the sender LZ4's time: one frame in 8 at LZ4's
    /// 0.3 GB/s against a window of 0.7 GB/s was ~5 % of its time (15 %
    /// measured over 10 Gbit/s). Once LZ4 and a window were measured, it
    /// samples as rarely as keeps them within [`SAMPLE_BUDGET`]; a window
    /// without samples decides with the latest measured.
    #[test]
    fn samples_stay_within_their_budget() {
        let mut d = Lz4Decider::new(None);
        assert_eq!(d.sample_every(), COMPRESS_SAMPLE);
        // 700 MB in 1 s, 87.5 MB of it sampled at 0.3 GB/s to 0.57.
        let w = off_window(700 * MB, 1.0, 0.1, 87 * MB, 0.57, 0.3e9);
        assert!(!d.decide(&w).expect("decides").on);
        let every = d.sample_every();
        // LZ4's 3.3 ns per byte over `every` frames is at most 2 % of the
        // window's 1.43 ns per byte.
        let cost = (1.0 / 0.3e9) / every as f64;
        assert!(cost <= SAMPLE_BUDGET * (1.0 / 0.7e9), "one in {every}");
        assert!(every > 100 && every <= MAX_SAMPLE_EVERY, "one in {every}");
        // Now link-bound on a slow link, no frame sampled: the latest
        // measurement decides (LZ4 at 0.3 GB/s to 0.57 beats 100 MB/s),
        // once the fast window is no longer among the latest 4.
        let slow = off_window(100 * MB, 1.0, 0.9, 0, 0.57, 0.3e9);
        for _ in 0..3 {
            let v = d.decide(&slow).expect("decides");
            assert_eq!((v.on, v.reason), (false, Lz4Reason::LinkFasterThanLz4));
        }
        assert_eq!(
            d.decide(&slow),
            Some(Lz4Verdict {
                on: true,
                reason: Lz4Reason::Pays
            })
        );
        // With nothing ever sampled a link-bound window cannot decide.
        let mut fresh = Lz4Decider::new(None);
        assert_eq!(fresh.decide(&slow), None);
    }

    /// A link about as fast as LZ4: turning it on looks worth it from the
    /// samples, but compressing does not move the pages faster than the
    /// link did, whether the sender then waits for LZ4 (not link-bound) or
    /// for something behind the link, the destination say (link-bound:
    /// before, such a window kept LZ4 on for good). Each failed try
    /// doubles the paying windows needed before the next: over 16 windows
    /// at most 6 switches (before: a switch in every window, or on for
    /// good).
    #[test]
    fn a_flapping_decision_is_damped() {
        // Off: 300 MB/s, link-bound, LZ4 at 1 GB/s to half: looks paying.
        let off_pays = off_window(300 * MB, 1.0, 0.8, 37 * MB, 0.5, 1e9);
        for blocked_ms in [300, 800] {
            // On: the page data moved at 300 MB/s again, not 1.1 times
            // the link.
            let on_fails = LinkWindow {
                wire_bytes: 150 * MB,
                raw_bytes: 300 * MB,
                time: Duration::from_secs(1),
                blocked: Duration::from_millis(blocked_ms),
                compressing: true,
                lz4: CompressionSample {
                    raw_bytes: 300 * MB,
                    packed_bytes: 150 * MB,
                    time: Duration::from_millis(300),
                },
            };
            let mut d = Lz4Decider::new(None);
            let mut on = d.initial().on;
            let (mut switches, mut held, mut offs) = (0, 0, 0);
            for _ in 0..16 {
                let w = if on { &on_fails } else { &off_pays };
                let v = d.decide(w).expect("decides");
                switches += u32::from(v.on != on);
                held += u32::from(v.reason == Lz4Reason::HeldOff);
                offs += u32::from(on && !v.on);
                on = v.on;
            }
            let what =
                format!("blocked {blocked_ms} ms: {switches} switches, {offs} offs, {held} held");
            assert!(offs >= 1, "never switched off: {what}");
            assert!(switches <= 6, "{what}");
            assert!(held >= 8, "{what}");
        }
    }
}
