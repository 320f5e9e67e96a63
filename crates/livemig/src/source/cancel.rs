//! Cancelling a running migration from another thread (either side).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::transport::Transport;

/// Cancels a running migration from another thread, on either side.
///
/// * On the source ([`crate::Migration::cancel`]): a cancel before the
///   switchover leaves the source VM running as before, with dirty logging
///   off. After `Go` the outcome is decided by the destination's answer (a
///   cancel then cannot undo the commit; the error stays ambiguous if the
///   answer does not arrive).
/// * On the destination ([`crate::Reception::cancel`]): a cancel before the
///   destination heard `Go` drops the new VM without ever running it (and
///   the source keeps its guest); once `Go` has been read the destination
///   is committed and a cancel is ignored (the source was told to stop its
///   guest, so dropping this one would lose the guest).
///
/// A cancel shuts the migration's connections down
/// ([`Transport::shutdown`]) so that a blocked read or write returns. On
/// the destination and in a same-host hand-over that happens at once. On
/// the source of a migration over a transport it happens only if
/// the migration has not ended [`SOURCE_CANCEL_GRACE`] after the cancel:
/// in that time the source normally sees the cancel between two frames
/// (each page stream's sender too), tells the destination why (an `Error`
/// frame, "cancelled", on the control connection once every page sender
/// stopped: the destination then reports [`crate::ErrorKind::Remote`]
/// instead of a closed connection), turns dirty logging off, hands the
/// guest back and closes the connections itself. A read or write blocked
/// longer (a stalled link) is interrupted by the shutdown; the destination
/// then sees the connection close. Use one token per migration: once
/// cancelled it stays cancelled.
#[derive(Clone, Default)]
pub struct CancelToken {
    flag: Arc<AtomicBool>,
    inner: Arc<Shared>,
}

/// How long a source's cancel leaves the migration to stop by itself (and
/// tell the destination) before it shuts the connections down.
pub const SOURCE_CANCEL_GRACE: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Shared {
    links: Mutex<Links>,
    /// Signalled when the connections are forgotten (the migration ended
    /// or the destination committed).
    detached: Condvar,
}

#[derive(Default)]
struct Links {
    transports: Vec<Box<dyn Transport>>,
    /// The destination heard `Go`: cancels are ignored from now on.
    committed: bool,
    /// Set by a source: how long a cancel waits for the migration to stop
    /// before it shuts the connections down (`None`: at once).
    grace: Option<Duration>,
}

fn shut_down(transports: &[Box<dyn Transport>]) {
    for t in transports {
        let _ = t.shutdown();
    }
}

impl std::fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelToken")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl CancelToken {
    /// A fresh token.
    pub fn new() -> Self {
        Self::default()
    }

    fn links(&self) -> MutexGuard<'_, Links> {
        self.inner.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests cancellation; a blocked read or write on the migration's
    /// connections is interrupted (on a source after
    /// [`SOURCE_CANCEL_GRACE`], unless the migration stopped first). Returns
    /// at once. Ignored (the flag stays clear) once a destination is
    /// committed.
    pub fn cancel(&self) {
        let g = self.links();
        if g.committed {
            log::info!("cancel ignored: the destination heard Go and runs the guest");
            return;
        }
        self.flag.store(true, Ordering::SeqCst);
        match g.grace {
            Some(grace) if !g.transports.is_empty() => {
                drop(g);
                self.shut_down_after(grace);
            }
            _ => shut_down(&g.transports),
        }
    }

    /// Shuts the connections down once `grace` has passed, on a thread of
    /// its own, unless the migration forgot them first ([`Self::detach_all`]).
    fn shut_down_after(&self, grace: Duration) {
        let token = self.clone();
        let spawned = std::thread::Builder::new()
            .name("livemig-cancel".into())
            .spawn(move || {
                let g = token.links();
                let (g, _) = token
                    .inner
                    .detached
                    .wait_timeout_while(g, grace, |l| !l.transports.is_empty())
                    .unwrap_or_else(|e| e.into_inner());
                if !g.transports.is_empty() {
                    log::warn!(
                        "cancel: the migration did not stop within {grace:?}; shutting its connections down"
                    );
                }
                shut_down(&g.transports);
            });
        if let Err(e) = spawned {
            log::warn!("cancel: no thread for the grace period ({e}); shutting down at once");
            shut_down(&self.links().transports);
        }
    }

    /// Whether cancellation was requested (and not ignored).
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// A source's token: a cancel leaves the migration `grace` to stop and
    /// tell the destination before it shuts the connections down.
    pub(crate) fn set_grace(&self, grace: Duration) {
        self.links().grace = Some(grace);
    }

    /// Adds a connection to shut down on cancel (at once if the token is
    /// already cancelled).
    pub(crate) fn attach(&self, t: Option<Box<dyn Transport>>) {
        let mut g = self.links();
        if self.is_cancelled() {
            if let Some(t) = &t {
                let _ = t.shutdown();
            }
        }
        g.transports.extend(t);
    }

    /// The destination heard `Go`: from now on a cancel is ignored. Returns
    /// false if the token was cancelled first (then the connections are
    /// already shut down and the VM must not run).
    pub(crate) fn commit(&self) -> bool {
        let mut g = self.links();
        if self.is_cancelled() {
            return false;
        }
        g.committed = true;
        g.transports.clear();
        self.inner.detached.notify_all();
        true
    }

    /// The migration is over: forget its connections.
    pub(crate) fn detach_all(&self) {
        let mut g = self.links();
        g.transports.clear();
        g.committed = false;
        self.inner.detached.notify_all();
    }
}
