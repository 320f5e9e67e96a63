//! The paused phase's deadline on the source.
//!
//! From the pause to `Go` the guest runs nowhere, and every step (final
//! pages, state, waiting for `Ready`) could block on a peer or a network that
//! stopped moving. [`PauseDeadline::arm`] starts a watchdog at the pause:
//! when [`crate::MigrationConfig::max_pause`] passes before
//! [`PauseDeadline::disarm`] (called right before `Go` is written), it shuts
//! every connection of the migration down, so whatever blocks fails at once
//! and the source resumes its guest (nothing was committed).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::transport::Transport;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watch {
    Armed,
    /// `Go` may go out: the watchdog stands down.
    Disarmed,
    /// The deadline passed first: the connections were shut down.
    Expired,
}

struct Shared {
    watch: Mutex<Watch>,
    cv: Condvar,
}

fn lock(m: &Mutex<Watch>) -> MutexGuard<'_, Watch> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running watchdog over the paused phase. Dropping it disarms it.
pub(crate) struct PauseDeadline {
    shared: Arc<Shared>,
    armed_at: Instant,
    limit: Duration,
}

impl PauseDeadline {
    /// Starts the watchdog: after `limit`, unless disarmed, `links` are shut
    /// down. If the watchdog thread cannot start, the connections are shut
    /// down at once (no deadline, no pause).
    pub(crate) fn arm(limit: Duration, links: Vec<Box<dyn Transport>>) -> Self {
        let shared = Arc::new(Shared {
            watch: Mutex::new(Watch::Armed),
            cv: Condvar::new(),
        });
        let armed_at = Instant::now();
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("livemig-pause-deadline".into())
            .spawn(move || watch(&s, armed_at, limit, &links));
        if let Err(e) = spawned {
            log::error!("cannot start the paused-phase watchdog ({e}); giving up the switchover");
            *lock(&shared.watch) = Watch::Expired;
        }
        PauseDeadline {
            shared,
            armed_at,
            limit,
        }
    }

    /// Stops the watchdog before `Go`. Returns false if the deadline passed
    /// first: then `Go` must not be sent.
    pub(crate) fn disarm(&self) -> bool {
        let mut w = lock(&self.shared.watch);
        if *w == Watch::Armed {
            *w = Watch::Disarmed;
            self.shared.cv.notify_all();
        }
        *w == Watch::Disarmed
    }

    /// Whether the deadline passed (and the connections were shut down).
    pub(crate) fn expired(&self) -> bool {
        *lock(&self.shared.watch) == Watch::Expired
    }

    /// How long since the pause.
    pub(crate) fn paused_for(&self) -> Duration {
        self.armed_at.elapsed()
    }

    /// The deadline.
    pub(crate) fn limit(&self) -> Duration {
        self.limit
    }
}

impl Drop for PauseDeadline {
    fn drop(&mut self) {
        self.disarm();
    }
}

fn watch(s: &Shared, armed_at: Instant, limit: Duration, links: &[Box<dyn Transport>]) {
    let deadline = armed_at.checked_add(limit);
    let mut w = lock(&s.watch);
    while *w == Watch::Armed {
        let left = deadline.map_or(Duration::from_secs(3600), |d| {
            d.saturating_duration_since(Instant::now())
        });
        if left.is_zero() {
            *w = Watch::Expired;
            drop(w);
            log::warn!("paused for {limit:?} without reaching Go: shutting the migration down");
            for l in links {
                let _ = l.shutdown();
            }
            return;
        }
        w =
            s.cv.wait_timeout(w, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::mem;
    use std::io::Read;

    #[test]
    fn expiry_shuts_the_links_down() {
        let (a, b) = mem::pair();
        let mut reader: Box<dyn Transport> = Box::new(b);
        let d = PauseDeadline::arm(Duration::from_millis(20), vec![Box::new(a)]);
        // Blocks until the watchdog shuts the pipe down (EOF).
        let mut buf = [0u8; 1];
        assert_eq!(reader.read(&mut buf).unwrap(), 0);
        assert!(d.expired());
        assert!(!d.disarm());
        assert!(d.paused_for() >= d.limit());
    }

    #[test]
    fn disarmed_in_time_leaves_the_links_alone() {
        let (a, b) = mem::pair();
        let d = PauseDeadline::arm(Duration::from_secs(3600), vec![Box::new(a.clone())]);
        assert!(d.disarm());
        assert!(!d.expired());
        let mut r: Box<dyn Transport> = Box::new(b);
        r.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut buf = [0u8; 1];
        let e = r.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        drop(a);
    }
}
