//! Cancelling a running migration from another thread (either side).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

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
/// ([`Transport::shutdown`]) so that a blocked read or write returns at
/// once. Use one token per migration: once cancelled it stays cancelled.
#[derive(Clone, Default)]
pub struct CancelToken {
    flag: Arc<AtomicBool>,
    inner: Arc<Mutex<Links>>,
}

#[derive(Default)]
struct Links {
    transports: Vec<Box<dyn Transport>>,
    /// The destination heard `Go`: cancels are ignored from now on.
    committed: bool,
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
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests cancellation; a blocked read or write on the migration's
    /// connections is interrupted. Ignored (the flag stays clear) once a
    /// destination is committed.
    pub fn cancel(&self) {
        let g = self.links();
        if g.committed {
            log::info!("cancel ignored: the destination heard Go and runs the guest");
            return;
        }
        self.flag.store(true, Ordering::SeqCst);
        for t in g.transports.iter() {
            let _ = t.shutdown();
        }
    }

    /// Whether cancellation was requested (and not ignored).
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
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
        true
    }

    /// The migration is over: forget its connections.
    pub(crate) fn detach_all(&self) {
        let mut g = self.links();
        g.transports.clear();
        g.committed = false;
    }
}
