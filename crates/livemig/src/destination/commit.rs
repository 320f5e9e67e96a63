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

/// How often the wait for `Go` looks at the cancel token.
const GO_SLICE: Duration = Duration::from_millis(100);

/// Waits for `Go` for at most the control connection's timeout, in
/// slices, failing `Cancelled` as soon as `cancel` is cancelled.
fn wait_for_go(link: &mut Link, cancel: &CancelToken) -> Result<(), MigrationError> {
    let cp = Phase::Completion;
    let limit = link.control.timeout();
    let deadline = Instant::now() + limit;
    let slice = |now: Instant| deadline.saturating_duration_since(now).min(GO_SLICE);
    let restore = |link: &mut Link| link.control.set_timeout(limit);
    loop {
        if cancel.is_cancelled() {
            let _ = restore(link);
            return Err(MigrationError::new(cp, ErrorKind::Cancelled));
        }
        let left = slice(Instant::now());
        if left.is_zero() {
            let _ = restore(link);
            let kind = ErrorKind::Timeout {
                waiting_for: "Go",
                after: limit,
            };
            return Err(MigrationError::new(cp, kind));
        }
        link.control
            .set_timeout(left)
            .map_err(|e| MigrationError::new(cp, e))?;
        match link.control.recv::<Go>(cp) {
            Ok(_) => {
                restore(link).map_err(|e| MigrationError::new(cp, e))?;
                return Ok(());
            }
            // A timed-out read keeps the partial frame: try again.
            Err(MigrationError {
                kind: ErrorKind::Timeout { .. },
                ..
            }) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Says `Ready` (the state restored in `restore`) and waits for `Go`;
/// returns once the destination is committed. A cancel from here on no
/// longer breaks the connections, and one that came before `Go` was read
/// fails with [`ErrorKind::Cancelled`] in the completion phase, which
/// makes the failure path answer `Abandoned` (the VM never runs, the
/// source resumes). Once this returned, a cancel is ignored.
pub(super) fn ready_then_go(
    link: &mut Link,
    restore: Duration,
    cancel: &CancelToken,
) -> Result<(), MigrationError> {
    let cp = Phase::Completion;
    let ready = Ready {
        restore_us: restore.as_micros() as u64,
    };
    // From `Ready` on the source may send `Go` at any moment: a cancel
    // must not break the connection any more (the source, without an
    // answer to `Go`, would stay paused as ambiguous) but only be noticed,
    // so that the failure path can answer `Abandoned`.
    cancel.detach_all();
    if cancel.is_cancelled() {
        return Err(MigrationError::new(cp, ErrorKind::Cancelled));
    }
    control::send(&mut link.fw, &ready, cp)?;
    wait_for_go(link, cancel)?;
    // Committed: from here a cancel is ignored. One that came first makes
    // this side answer `Abandoned` (the VM never runs; the source resumes).
    if !cancel.commit() {
        return Err(MigrationError::new(cp, ErrorKind::Cancelled));
    }
    Ok(())
}

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
    ready_then_go(link, restore, cancel)?;
    let cp = Phase::Completion;
    let t = Instant::now();
    let mut resume = Duration::ZERO;
    // From here the guest runs (or is about to, infallibly: see
    // `DestinationVm::resume_then`). If the acknowledgement cannot be sent
    // the source stays paused (it committed with Go), so keep running.
    let mut acknowledge = || {
        resume = t.elapsed();
        let resumed = Resumed {
            resume_us: resume.as_micros() as u64,
        };
        if let Err(e) = control::send(&mut link.fw, &resumed, cp) {
            log::warn!("guest resumed but the acknowledgement could not be sent: {e}");
        }
    };
    if running {
        vm.resume_then(&mut acknowledge)
            .map_err(|e| MigrationError::new(cp, e))?;
    } else {
        acknowledge();
    }
    Ok(Timings { restore, resume })
}
