//! The destination's end: restore the state → `Ready` → wait for `Go` →
//! resume → `Resumed`. The VM runs only after the state restored cleanly
//! *and* the source committed with `Go`.

use std::time::{Duration, Instant};

use super::Link;
use crate::control;
use crate::error::{ErrorKind, MigrationError, Phase};
use crate::protocol::{Go, Ready, Resumed};
use crate::source::CancelToken;
use crate::state::Section;
use crate::vm::DestinationVm;

/// How long the restore and the resume took.
pub(super) struct Timings {
    pub(super) restore: Duration,
    pub(super) resume: Duration,
}

/// Restores `sections` into `vm`, says `Ready`, and on `Go` resumes it
/// (unless `running` is false: the source VM was paused by its operator)
/// and says `Resumed`.
pub(super) fn commit<V: DestinationVm>(
    vm: &mut V,
    link: &mut Link,
    sections: &[Section],
    running: bool,
    cancel: &CancelToken,
) -> Result<Timings, MigrationError> {
    let t = Instant::now();
    vm.restore_state(sections)
        .map_err(|e| MigrationError::new(Phase::State, e))?;
    let restore = t.elapsed();
    let cp = Phase::Completion;
    let ready = Ready {
        restore_us: restore.as_micros() as u64,
    };
    control::send(&mut link.fw, &ready, cp)?;
    link.control.recv::<Go>(cp)?;
    // Committed: from here a cancel is ignored. One that came first shut
    // the connections down, so `Resumed` could not be sent: the VM must
    // not run (the source, without an answer to `Go`, stays paused).
    if !cancel.commit() {
        return Err(MigrationError::new(cp, ErrorKind::Cancelled));
    }
    let t = Instant::now();
    if running {
        vm.resume().map_err(|e| MigrationError::new(cp, e))?;
    }
    let resume = t.elapsed();
    // The guest runs here now. If the acknowledgement cannot be sent the
    // source stays paused (it committed with Go), so keep running.
    let resumed = Resumed {
        resume_us: resume.as_micros() as u64,
    };
    if let Err(e) = control::send(&mut link.fw, &resumed, cp) {
        log::warn!("guest resumed but the acknowledgement could not be sent: {e}");
    }
    Ok(Timings { restore, resume })
}
