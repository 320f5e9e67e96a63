//! When to announce: QEMU's announce timer.
//!
//! QEMU (`net/announce.c`) sends the first round as soon as the guest runs
//! on the destination, then re-arms its timer after each round with
//!
//! ```text
//! delay = initial + (rounds - rounds_left - 1) * step    (capped at max)
//! ```
//!
//! where `rounds_left` counts the rounds still to send after the one just
//! sent. The gap after the k-th round (k = 1, 2, ...) is therefore
//! `min(initial + (k - 1) * step, max)`. With QEMU's defaults (`announce-rounds`
//! 5, `announce-initial` 50 ms, `announce-step` 100 ms, `announce-max` 550 ms)
//! the rounds go out 0, 50, 200, 450 and 800 ms after resume.

use std::time::Duration;

/// Errors of [`Schedule::validate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// More rounds than QEMU accepts.
    #[error("announce rounds {rounds} exceeds the limit of {limit}")]
    TooManyRounds {
        /// The configured number of rounds.
        rounds: u32,
        /// The limit.
        limit: u32,
    },
    /// A delay parameter out of QEMU's range.
    #[error("announce {name} of {value_ms} ms is outside {min_ms}..={max_ms} ms")]
    OutOfRange {
        /// Which parameter (`initial_delay`, `step` or `max`).
        name: &'static str,
        /// The configured value, ms.
        value_ms: u128,
        /// The smallest accepted value, ms.
        min_ms: u128,
        /// The largest accepted value, ms.
        max_ms: u128,
    },
}

/// The announce schedule: QEMU's `announce-rounds`, `announce-initial`,
/// `announce-step` and `announce-max` parameters.
///
/// Serialized with the durations in whole milliseconds, as QEMU's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    /// Number of rounds (each round sends every frame once on every NIC).
    /// Zero disables the announce.
    pub rounds: u32,
    /// Gap between the first and the second round.
    #[serde(with = "duration_ms")]
    pub initial_delay: Duration,
    /// How much each further gap grows.
    #[serde(with = "duration_ms")]
    pub step: Duration,
    /// The largest gap.
    #[serde(with = "duration_ms")]
    pub max: Duration,
}

impl Default for Schedule {
    /// QEMU's defaults: 5 rounds, initial 50 ms, step 100 ms, max 550 ms.
    fn default() -> Self {
        Schedule {
            rounds: 5,
            initial_delay: Duration::from_millis(50),
            step: Duration::from_millis(100),
            max: Duration::from_millis(550),
        }
    }
}

impl Schedule {
    /// QEMU's limit on `announce-rounds`.
    pub const MAX_ROUNDS: u32 = 1000;
    /// QEMU's limit on `announce-initial` and `announce-max`.
    pub const MAX_DELAY: Duration = Duration::from_secs(100);
    /// QEMU's limit on `announce-step`.
    pub const MAX_STEP: Duration = Duration::from_secs(10);

    /// A schedule that sends nothing.
    pub fn disabled() -> Self {
        Schedule {
            rounds: 0,
            ..Schedule::default()
        }
    }

    /// The gap between round `k` (1-based) and round `k + 1`, as QEMU's
    /// `qemu_announce_timer_step()` computes it.
    fn gap_after(&self, k: u32) -> Duration {
        let growth = self.step.checked_mul(k.saturating_sub(1));
        match growth.and_then(|g| self.initial_delay.checked_add(g)) {
            Some(gap) if gap <= self.max => gap,
            _ => self.max,
        }
    }

    /// When each round goes out, measured from the moment the guest resumed:
    /// one entry per round, the first always zero.
    pub fn offsets(&self) -> Vec<Duration> {
        let mut offsets = Vec::with_capacity(self.rounds as usize);
        let mut at = Duration::ZERO;
        for k in 0..self.rounds {
            if k > 0 {
                at = at.saturating_add(self.gap_after(k));
            }
            offsets.push(at);
        }
        offsets
    }

    /// When the last round goes out (zero for an empty schedule).
    pub fn duration(&self) -> Duration {
        self.offsets().last().copied().unwrap_or(Duration::ZERO)
    }

    /// Check the parameters against the ranges QEMU accepts for them
    /// (`announce-rounds` ≤ 1000, `announce-initial` and `announce-max`
    /// ≤ 100 s, `announce-step` in 1 ms..=10 s).
    ///
    /// [`offsets`](Self::offsets) works for any value; this is for a VMM that
    /// takes the schedule from its user.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        if self.rounds > Self::MAX_ROUNDS {
            return Err(ScheduleError::TooManyRounds {
                rounds: self.rounds,
                limit: Self::MAX_ROUNDS,
            });
        }
        let check = |name, value: Duration, min: Duration, max: Duration| {
            if value < min || value > max {
                Err(ScheduleError::OutOfRange {
                    name,
                    value_ms: value.as_millis(),
                    min_ms: min.as_millis(),
                    max_ms: max.as_millis(),
                })
            } else {
                Ok(())
            }
        };
        check(
            "initial_delay",
            self.initial_delay,
            Duration::ZERO,
            Self::MAX_DELAY,
        )?;
        check("max", self.max, Duration::ZERO, Self::MAX_DELAY)?;
        check("step", self.step, Duration::from_millis(1), Self::MAX_STEP)
    }
}

/// Serde helper: a [`Duration`] as whole milliseconds.
mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(u64::try_from(value.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().copied().map(Duration::from_millis).collect()
    }

    #[test]
    fn default_matches_qemu() {
        assert_eq!(Schedule::default().offsets(), ms(&[0, 50, 200, 450, 800]));
        assert_eq!(Schedule::default().duration(), Duration::from_millis(800));
        assert_eq!(Schedule::default().validate(), Ok(()));
    }

    #[test]
    fn gaps_are_capped_at_max() {
        let s = Schedule {
            rounds: 8,
            ..Schedule::default()
        };
        // Gaps 50, 150, 250, 350, 450, 550, 550 (650 capped).
        assert_eq!(s.offsets(), ms(&[0, 50, 200, 450, 800, 1250, 1800, 2350]));
        let s = Schedule {
            rounds: 3,
            initial_delay: Duration::from_millis(700),
            ..Schedule::default()
        };
        // The initial gap alone is above max: QEMU uses max.
        assert_eq!(s.offsets(), ms(&[0, 550, 1100]));
    }

    #[test]
    fn edge_cases() {
        assert!(Schedule::disabled().offsets().is_empty());
        assert_eq!(Schedule::disabled().duration(), Duration::ZERO);
        let one = Schedule {
            rounds: 1,
            ..Schedule::default()
        };
        assert_eq!(one.offsets(), ms(&[0]));
        let huge = Schedule {
            rounds: 3,
            initial_delay: Duration::MAX,
            step: Duration::MAX,
            max: Duration::MAX,
        };
        // No overflow panic: offsets saturate.
        assert_eq!(huge.offsets().len(), 3);
    }

    #[test]
    fn validation() {
        let s = Schedule {
            rounds: 1001,
            ..Schedule::default()
        };
        assert!(matches!(
            s.validate(),
            Err(ScheduleError::TooManyRounds { rounds: 1001, .. })
        ));
        let s = Schedule {
            step: Duration::ZERO,
            ..Schedule::default()
        };
        assert!(matches!(
            s.validate(),
            Err(ScheduleError::OutOfRange { name: "step", .. })
        ));
        let s = Schedule {
            max: Duration::from_secs(101),
            ..Schedule::default()
        };
        assert!(matches!(
            s.validate(),
            Err(ScheduleError::OutOfRange { name: "max", .. })
        ));
    }
}
