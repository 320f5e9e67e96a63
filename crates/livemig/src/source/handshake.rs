//! Handshake-time checks: what an old peer cannot do, and measuring the state.

use std::time::{Duration, Instant};

use crate::error::{ErrorKind, MigrationError, Phase};
use crate::vm::SourceVm;

/// What a destination that speaks only protocol version 2 (release 0.1.0)
/// cannot do, refused before any page: keep a paused VM paused (it would
/// resume it), and read a state of several `State` frames.
pub(super) fn check_old_peer(
    version: u32,
    paused: bool,
    state_frames: usize,
) -> Result<(), MigrationError> {
    if version >= 3 {
        return Ok(());
    }
    let why = if paused {
        "the VM is paused, and a destination speaking protocol version 2 would resume it"
            .to_string()
    } else if state_frames > 1 {
        format!(
            "the device state needs {state_frames} State frames; a destination speaking \
             protocol version 2 reads one"
        )
    } else {
        return Ok(());
    };
    Err(MigrationError::new(
        Phase::Handshake,
        ErrorKind::Refused(why),
    ))
}

/// Measures the state before any page is sent: a short pause now tells
/// what the switchover costs beyond memory, and proves the state can be
/// saved before anything is committed.
///
/// The estimate: the pause latency capped at 2 ms (one slow pause under
/// host load must not make the policy believe every switchover costs that
/// much and never converge), the save, the destination's restore (taken as
/// long as the save: it issues the same state calls in reverse) and the
/// destination's resume (taken as long as this resume: as many vCPUs to
/// wake). A measurement over a quarter of `limit` is repeated (twice at
/// most) and the smallest kept, for the same reason. The state's bytes are
/// added at the measured bandwidth each round.
///
/// A VM the operator paused is only saved (never resumed). If pausing a
/// running VM fails, it is resumed (a pause that failed half-way may have
/// stopped some vCPUs), so it runs as before.
pub(super) fn measure_state<V: SourceVm + ?Sized>(
    vm: &V,
    paused: bool,
    limit: Duration,
) -> Result<(Duration, Vec<crate::state::Section>), MigrationError> {
    let hs = Phase::Handshake;
    if paused {
        let t = Instant::now();
        let sections = vm.save_state().map_err(|e| MigrationError::new(hs, e))?;
        return Ok((t.elapsed(), sections));
    }
    let mut state_time = Duration::MAX;
    let mut sections = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        if let Err(e) = vm.pause() {
            if let Err(re) = vm.resume() {
                log::error!("resuming the source after a failed pause: {re}");
            }
            return Err(MigrationError::new(hs, e));
        }
        let t_paused = Instant::now();
        let saved = vm.save_state();
        let t_saved = Instant::now();
        let resumed = vm.resume();
        let t_resumed = Instant::now();
        let this = (t_paused - t).min(Duration::from_millis(2))
            + 2 * (t_saved - t_paused)
            + (t_resumed - t_saved);
        state_time = state_time.min(this);
        sections = saved.map_err(|e| MigrationError::new(hs, e))?;
        resumed.map_err(|e| MigrationError::new(hs, e))?;
        if state_time <= limit / 4 {
            break;
        }
    }
    Ok((state_time, sections))
}
