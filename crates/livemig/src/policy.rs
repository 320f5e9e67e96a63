//! Migration settings and the convergence policy.
//!
//! After every pre-copy round the source estimates the downtime a switchover
//! would cause now: the bytes still dirty divided by the bandwidth measured
//! in the last round, plus the time the device state took when it was
//! measured at setup (pause, save, resume), plus that state's transfer time.
//! When the estimate is within [`MigrationConfig::downtime_limit`], the
//! source stops the VM and sends the rest.

use std::time::Duration;

use serde::Serialize;

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
    /// Lifted at the pause: the final copy goes as fast as it can.
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
    /// Compress page frames with LZ4 (for slow links; a frame that does not
    /// shrink is sent as it is). Off by default: on a fast link the
    /// compression costs more time than the bytes it saves.
    pub compress: bool,
    /// Round 0 leaves out pages that certainly read as zero without reading
    /// them: in private anonymous memory the pages `/proc/self/pagemap`
    /// shows neither present nor swapped, in memory mapped shared from a
    /// file (memfd, shmem, hugetlbfs) the file's holes. Other memory is read
    /// in full. Default on. Turn it off when guest memory is filled behind
    /// the kernel's back, for example served by a userfaultfd handler on
    /// first access: such a page looks untouched but is not zero.
    pub skip_untouched: bool,
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
            compress: false,
            skip_untouched: true,
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
            // Each page stream gets an equal share; every share must be at
            // least a page per second.
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

/// The inputs to one convergence decision.
#[derive(Debug, Clone, Copy)]
pub struct RoundEstimate {
    /// Dirty bytes that would have to be sent while paused.
    pub remaining_bytes: u64,
    /// Bandwidth measured in the last round, bytes per second.
    pub bandwidth: f64,
    /// Measured switchover overhead beyond memory: pause, state save, the
    /// destination's restore and resume (see `source::handshake::measure_state`).
    pub state_time: Duration,
    /// Bytes of state to send while paused.
    pub state_bytes: u64,
}

impl RoundEstimate {
    /// Expected downtime if the switchover happened now.
    pub fn expected_downtime(&self) -> Duration {
        let bw = self.bandwidth.max(1.0);
        let secs = (self.remaining_bytes + self.state_bytes) as f64 / bw;
        Duration::from_secs_f64(secs.min(1.0e6)) + self.state_time
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

    fn est(bytes: u64) -> RoundEstimate {
        RoundEstimate {
            remaining_bytes: bytes,
            bandwidth: 1e9,
            state_time: Duration::from_millis(1),
            state_bytes: 0,
        }
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
