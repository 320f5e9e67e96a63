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

/// What to do when the round or time cap is reached before convergence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
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
    /// as the transport goes).
    pub max_bandwidth: Option<u64>,
    /// Most pre-copy rounds (round 0, the full pass, included).
    pub max_rounds: u32,
    /// Longest pre-copy phase before the [`MigrationConfig::on_limit`] rule applies.
    pub max_precopy_time: Duration,
    /// What happens when a cap is reached.
    pub on_limit: OnLimit,
    /// Timeout of every blocking read of a reply (handshake, acknowledgements)
    /// and of every frame on the destination.
    pub io_timeout: Duration,
    /// Pages per `Pages` frame (the staging buffer is this many pages).
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
    /// Ceiling, percent (at most 99).
    pub throttle_max: u32,
    /// Page streams (1 ..= [`crate::protocol::MAX_STREAMS`]). With more
    /// than one, [`crate::source::migrate_streams`] opens that many extra
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
    /// destination's restore and resume (see `run_source`).
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
