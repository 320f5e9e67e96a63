//! Cancelling a running migration from another thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::transport::Transport;

/// Cancels a running migration from another thread.
///
/// Cancelling before the switchover leaves the source running as before.
#[derive(Clone, Default)]
pub struct CancelToken {
    flag: Arc<AtomicBool>,
    transports: Arc<Mutex<Vec<Box<dyn Transport>>>>,
}

impl CancelToken {
    /// A fresh token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests cancellation; a blocked read or write on the migration's
    /// transport is interrupted.
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
        if let Ok(g) = self.transports.lock() {
            for t in g.iter() {
                let _ = t.shutdown();
            }
        }
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Adds a connection to shut down on cancel.
    pub(super) fn attach(&self, t: Option<Box<dyn Transport>>) {
        if let Ok(mut g) = self.transports.lock() {
            g.extend(t);
        }
        if self.is_cancelled() {
            self.cancel();
        }
    }

    pub(super) fn detach_all(&self) {
        if let Ok(mut g) = self.transports.lock() {
            g.clear();
        }
    }
}
