//! Rounds after the estimate first fits the limit
//! ([`MigrationConfig::polish_rounds`](super::MigrationConfig::polish_rounds)):
//! the downtime limit is the most a guest may be paused, not a target, so
//! when one more short round is expected to cut the downtime by a real
//! amount it is run before the switchover.

use std::time::Duration;

use super::RoundEstimate;

/// The least cut in expected downtime that pays for one more round: below
/// it, the round's own fixed costs (a dirty sync, the round's end) and the
/// host's scheduling noise are of the same size.
pub const POLISH_MIN_GAIN: Duration = Duration::from_millis(1);

/// After a round whose estimate fits the limit, with the guest dirtying
/// `dirty_rate` bytes per second (the pages found dirty after the round
/// over the round's time): the expected downtime after one more round, if
/// that round pays; `None` if it does not.
///
/// The next round sends what is dirty now (and what is still queued) at
/// the link's measured rate; meanwhile the guest dirties `dirty_rate`
/// times that long (an upper bound: rewrites of a page count once). The
/// round pays when the link is measured, the guest dirties at most half as
/// fast as the link carries (so the dirty set at least halves each round,
/// and auto-converge, which acts above that, is not woken), and the
/// expected downtime falls by at least [`POLISH_MIN_GAIN`] and by at least
/// a quarter.
///
/// ```
/// use std::time::Duration;
/// use livemig::policy::{polish::another_round, LinkMeter, RoundEstimate};
///
/// let mut link = LinkMeter::default();
/// link.record(100_000_000, Duration::from_millis(100)); // 1 GB/s
/// let est = RoundEstimate {
///     remaining_bytes: 8_000_000, // 8 ms at 1 GB/s
///     queued_bytes: 0,
///     link,
///     round_trip: Duration::ZERO,
///     state_time: Duration::from_millis(1),
///     state_bytes: 0,
///     probe: None,
/// };
/// // 9 ms now; at 100 MB/s, 8 ms of sending dirties 0.8 MB: 1.8 ms after.
/// let after = another_round(&est, 100e6).expect("pays");
/// assert!(after < Duration::from_millis(2));
/// // A guest dirtying as fast as the link carries gains nothing.
/// assert_eq!(another_round(&est, 1e9), None);
/// ```
pub fn another_round(est: &RoundEstimate, dirty_rate: f64) -> Option<Duration> {
    let bandwidth = est.link.bandwidth();
    if !est.link.measured() || !dirty_rate.is_finite() || dirty_rate < 0.0 {
        return None;
    }
    if dirty_rate * 2.0 > bandwidth {
        return None;
    }
    let now = est.expected_downtime();
    let sending = est
        .link
        .transfer_time(est.remaining_bytes.saturating_add(est.queued_bytes));
    let next = RoundEstimate {
        remaining_bytes: (dirty_rate * sending.as_secs_f64()) as u64,
        queued_bytes: 0,
        ..*est
    };
    let after = next.expected_downtime();
    let gain = now.saturating_sub(after);
    (gain >= POLISH_MIN_GAIN && gain * 4 >= now).then_some(after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::LinkMeter;

    fn estimate(remaining_bytes: u64, link: LinkMeter) -> RoundEstimate {
        RoundEstimate {
            remaining_bytes,
            queued_bytes: 0,
            link,
            round_trip: Duration::from_micros(50),
            state_time: Duration::from_micros(500),
            state_bytes: 10_000,
            probe: None,
        }
    }

    fn gigabyte_link() -> LinkMeter {
        let mut m = LinkMeter::default();
        m.record(100_000_000, Duration::from_millis(100));
        m
    }

    #[test]
    fn a_slowly_dirtying_guest_gets_a_round_that_cuts_the_downtime() {
        // 5 MB left (5 ms), 100 MB/s: the next round leaves ~0.5 MB.
        let est = estimate(5_000_000, gigabyte_link());
        let after = another_round(&est, 100e6).expect("pays");
        let now = est.expected_downtime();
        assert!(after * 2 < now, "{after:?} vs {now:?}");
    }

    #[test]
    fn an_idle_guest_gets_none() {
        // The downtime is the state's fixed cost: nothing to cut.
        let est = estimate(40_960, gigabyte_link());
        assert_eq!(another_round(&est, 1e6), None);
        assert_eq!(another_round(&estimate(0, gigabyte_link()), 0.0), None);
    }

    #[test]
    fn a_guest_dirtying_over_half_the_link_gets_none() {
        let est = estimate(5_000_000, gigabyte_link());
        assert_eq!(another_round(&est, 600e6), None);
    }

    #[test]
    fn an_unmeasured_link_or_a_bad_rate_gets_none() {
        let est = estimate(5_000_000, LinkMeter::default());
        assert_eq!(another_round(&est, 1e6), None);
        let est = estimate(5_000_000, gigabyte_link());
        assert_eq!(another_round(&est, f64::NAN), None);
        assert_eq!(another_round(&est, -1.0), None);
    }

    #[test]
    fn a_cut_below_the_minimum_gets_none() {
        // 0.8 MB left: 0.8 ms of memory, at most that much to cut.
        let est = estimate(800_000, gigabyte_link());
        assert_eq!(another_round(&est, 10e6), None);
    }
}
