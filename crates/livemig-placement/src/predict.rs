//! The predicted migration: pre-copy rounds, total time and downtime, from
//! the VM's memory, its dirty rate and the link's bandwidth.
//!
//! The model is the one the engine's convergence policy works with
//! (`livemig::policy`): round 0 sends all of memory; while a round of `x`
//! MiB takes `x / B` seconds, the guest dirties `D * x / B` MiB (at most all
//! of memory), which the next round sends. After a round, when what is left
//! would take at most the downtime limit to send, the source pauses the
//! guest and sends it: that is the downtime. Otherwise another round, up to
//! `max_rounds` rounds; then the migration does not converge (the engine
//! gives up, or switches over anyway with `--force`, with the downtime of
//! the last round's leftover).
//!
//! Not modelled: auto-converge throttling (which lowers `D` after slow
//! rounds), compression, zero pages (skipped, so real round 0 is shorter),
//! the device state and the fixed pause/resume cost (milliseconds), and the
//! engine's polish rounds (`MigrationConfig::polish_rounds`: up to 3 more
//! rounds once the leftover fits the limit, each run only when it is
//! expected to cut the downtime by at least 1 ms and a quarter). So the
//! time is an upper bound for a guest whose dirty rate stays as measured
//! (but for the few milliseconds polish rounds add), and the downtime is the
//! one the engine would have without polish rounds: a slowly dirtying
//! guest's actual downtime can be several times lower.
//!
//! The score's `migration_time` term uses the closed form `M / (B - D)`
//! (infinitely many rounds; [`crate::score::migration_time_s`]), which
//! bounds the sum of the rounds computed here.

use serde::{Deserialize, Serialize};

/// The engine limits the prediction follows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictLimits {
    /// The downtime limit, ms (the engine's default is 20).
    pub downtime_limit_ms: f64,
    /// Most pre-copy rounds (the engine's default is 30).
    pub max_rounds: u32,
}

impl Default for PredictLimits {
    fn default() -> Self {
        PredictLimits {
            downtime_limit_ms: 20.0,
            max_rounds: 30,
        }
    }
}

/// What a migration is predicted to do.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prediction {
    /// Pre-copy rounds before the switchover (1 = the full pass only).
    pub rounds: u32,
    /// Whether the leftover got within the downtime limit by `max_rounds`.
    pub converges: bool,
    /// Seconds from the start to the guest running on the destination.
    pub total_s: f64,
    /// The pause, ms: the last leftover at the link's bandwidth.
    pub downtime_ms: f64,
}

/// Predicts the migration of `memory_mib` MiB dirtied at `dirty_mib_s`
/// over a link of `bandwidth_mib_s` (all > 0 except the dirty rate).
pub fn predict(
    memory_mib: f64,
    dirty_mib_s: f64,
    bandwidth_mib_s: f64,
    limits: &PredictLimits,
) -> Prediction {
    let b = bandwidth_mib_s.max(1e-9);
    let d = dirty_mib_s.max(0.0);
    let mut left = memory_mib.max(0.0);
    let mut total = 0.0;
    let max_rounds = limits.max_rounds.max(1);
    for round in 1..=max_rounds {
        let t = left / b;
        total += t;
        left = (d * t).min(memory_mib);
        let downtime_ms = left / b * 1e3;
        if downtime_ms <= limits.downtime_limit_ms {
            return Prediction {
                rounds: round,
                converges: true,
                total_s: total + left / b,
                downtime_ms,
            };
        }
    }
    Prediction {
        rounds: max_rounds,
        converges: false,
        total_s: total + left / b,
        downtime_ms: left / b * 1e3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_guest_needs_one_round_and_no_downtime() {
        let p = predict(1024.0, 0.0, 1024.0, &PredictLimits::default());
        assert_eq!(p.rounds, 1);
        assert!(p.converges);
        assert_eq!(p.downtime_ms, 0.0);
        assert!((p.total_s - 1.0).abs() < 1e-12);
    }

    #[test]
    fn rounds_shrink_geometrically_until_the_limit() {
        // 1000 MiB at 100 MiB/s, dirtied at 50 MiB/s: rounds of 10 s, 5 s,
        // 2.5 s, ... until the leftover takes <= 20 ms.
        let p = predict(1000.0, 50.0, 100.0, &PredictLimits::default());
        assert!(p.converges);
        // Leftover after round n is 1000 / 2^n MiB; 10 * 2^-n s <= 0.02 s
        // first at n = 9.
        assert_eq!(p.rounds, 9);
        assert!(p.downtime_ms <= 20.0 && p.downtime_ms > 10.0, "{p:?}");
        // The closed form M / (B - D) = 20 s bounds the total.
        assert!(p.total_s < 20.0 && p.total_s > 19.9, "{p:?}");
    }

    #[test]
    fn a_guest_dirtying_faster_than_the_link_does_not_converge() {
        let p = predict(1000.0, 200.0, 100.0, &PredictLimits::default());
        assert!(!p.converges);
        assert_eq!(p.rounds, 30);
        // The leftover is capped at all of memory: 10 s of downtime.
        assert!((p.downtime_ms - 10_000.0).abs() < 1e-6, "{p:?}");
    }
}
