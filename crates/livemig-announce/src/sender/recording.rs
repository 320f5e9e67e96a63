//! A sender that records what it is given, for tests.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use super::{FrameSender, SendError};

/// One frame given to a [`RecordingSender`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// When `send` was called.
    pub at: Instant,
    /// The frame.
    pub frame: Vec<u8>,
}

/// Records every frame with the time it was sent into a shared log; can also
/// be made to fail every send, to test error handling.
#[derive(Debug, Clone)]
pub struct RecordingSender {
    name: String,
    log: Arc<Mutex<Vec<Recorded>>>,
    fail_with: Option<i32>,
}

impl RecordingSender {
    /// A sender called `name` that records and succeeds.
    pub fn new(name: impl Into<String>) -> Self {
        RecordingSender {
            name: name.into(),
            log: Arc::new(Mutex::new(Vec::new())),
            fail_with: None,
        }
    }

    /// A sender called `name` that fails every send with the OS error
    /// `errno` (e.g. `libc::ENETDOWN`), recording nothing.
    pub fn failing(name: impl Into<String>, errno: i32) -> Self {
        RecordingSender {
            fail_with: Some(errno),
            ..Self::new(name)
        }
    }

    /// The shared log (keep it before giving the sender away).
    pub fn log(&self) -> Arc<Mutex<Vec<Recorded>>> {
        Arc::clone(&self.log)
    }

    /// A copy of what was recorded so far.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl FrameSender for RecordingSender {
    fn send(&mut self, frame: &[u8]) -> Result<(), SendError> {
        if let Some(errno) = self.fail_with {
            return Err(SendError::Send {
                target: self.describe(),
                source: io::Error::from_raw_os_error(errno),
            });
        }
        let entry = Recorded {
            at: Instant::now(),
            frame: frame.to_vec(),
        };
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(entry);
        Ok(())
    }

    fn describe(&self) -> String {
        format!("recording {:?}", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_fails() {
        let mut ok = RecordingSender::new("a");
        let log = ok.log();
        ok.send(&[1, 2, 3]).unwrap();
        assert_eq!(log.lock().unwrap()[0].frame, vec![1, 2, 3]);
        assert_eq!(ok.recorded().len(), 1);

        let mut bad = RecordingSender::failing("b", libc::EPERM);
        let err = bad.send(&[0]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        assert!(bad.recorded().is_empty());
        assert_eq!(bad.describe(), "recording \"b\"");
    }
}
