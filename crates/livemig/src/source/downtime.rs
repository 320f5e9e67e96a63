//! Where the downtime ends: the destination starts the guest. The source
//! never sees that moment; it places it on its own clock from what it
//! did see (see [`GuestStart::downtime`]).
//!
//! Before 2026-12-03 (session 4) the downtime ended when the source read `Resumed`.
//! That read comes one way back after the start and whenever the source's
//! thread gets a CPU: on the 2-core test host the source reported 3.3–4.7
//! ms in 4 of 10 runs whose guest measured its whole gap at 0.83–1.04 ms
//! (docs/benchmarks.md, "Where the downtime ends").

use std::time::{Duration, Instant};

/// What the source saw of the switchover's last messages.
pub(super) struct GuestStart {
    /// When the VM was paused.
    pub(super) pause: Instant,
    /// When the state went out (its first `State` frame was handed to
    /// the control connection).
    pub(super) state_sent: Instant,
    /// When `Ready` was read (and the last check before `Go` done): `Go`
    /// goes out now.
    pub(super) ready: Instant,
    /// When `Resumed` was read.
    pub(super) done: Instant,
    /// The destination's restore, between the state and `Ready` (its
    /// clock).
    pub(super) restore: Duration,
    /// The destination's resume, between `Go` and its vCPUs starting
    /// (its clock).
    pub(super) resume: Duration,
    /// The control connection's round trip as its transport measured it
    /// (`None` where it cannot tell).
    pub(super) round_trip: Option<Duration>,
}

impl GuestStart {
    /// `Go`'s way to the destination: half the shortest round trip the
    /// control connection showed — the transport's own, the state's
    /// (state sent → `Ready` read, without the destination's restore) and
    /// the acknowledgement's (`Go` → `Resumed` read, without the
    /// destination's resume). Each counts both ways and whatever kept the
    /// reading thread from running, so the shortest is the closest.
    pub(super) fn go_hop(&self) -> Duration {
        let state = (self.ready - self.state_sent).saturating_sub(self.restore);
        let ack = (self.done - self.ready).saturating_sub(self.resume);
        let known = self.round_trip.filter(|r| !r.is_zero());
        let shortest = known.map_or(state.min(ack), |r| r.min(state).min(ack));
        shortest / 2
    }

    /// Pause → the destination's vCPUs started, on the source's clock:
    /// pause → `Ready` read, `Go`'s way there ([`GuestStart::go_hop`])
    /// and the destination's resume. At most [`GuestStart::acknowledged`]
    /// (the acknowledgement's round trip holds `Go`'s way and the resume).
    pub(super) fn downtime(&self) -> Duration {
        (self.ready - self.pause) + self.go_hop() + self.resume.min(self.done - self.ready)
    }

    /// Pause → `Resumed` read: the downtime plus the acknowledgement's way
    /// back and the source's own wake-up.
    pub(super) fn acknowledged(&self) -> Duration {
        self.done - self.pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A switchover at `t0`: paused 0, state sent at 2 ms, `Ready` read at
    /// 5 ms (restore 1 ms), `Resumed` read at `done_ms` (resume 1 ms).
    fn start(done_ms: u64, round_trip: Option<Duration>) -> GuestStart {
        let t0 = Instant::now();
        GuestStart {
            pause: t0,
            state_sent: t0 + 2 * MS,
            ready: t0 + 5 * MS,
            done: t0 + Duration::from_millis(done_ms),
            restore: MS,
            resume: MS,
            round_trip,
        }
    }

    #[test]
    fn a_late_acknowledgement_stays_out_of_the_downtime() {
        // State round 3 − 1 = 2 ms, ack round 100 − 5 − 1 = 94 ms: Go took ~1 ms.
        let s = start(100, None);
        assert_eq!(s.go_hop(), MS);
        assert_eq!(s.downtime(), 5 * MS + MS + MS);
        assert_eq!(s.acknowledged(), 100 * MS);
    }

    #[test]
    fn the_shortest_round_trip_places_go() {
        // The transport's 0.4 ms is shorter than the state's 2 ms and the ack's 3 ms.
        let s = start(9, Some(Duration::from_micros(400)));
        assert_eq!(s.go_hop(), Duration::from_micros(200));
        // Without it, the ack's round (9 − 5 − 1 = 3 ms) is longer than the state's.
        assert_eq!(start(9, None).go_hop(), MS);
        // A zero round trip means "cannot tell", not "instant".
        assert_eq!(start(9, Some(Duration::ZERO)).go_hop(), MS);
    }

    #[test]
    fn the_downtime_never_exceeds_the_acknowledgement() {
        for done in [5, 6, 7, 8, 50] {
            let s = start(done, Some(10 * MS));
            assert!(s.downtime() <= s.acknowledged(), "done at {done} ms");
        }
    }
}
