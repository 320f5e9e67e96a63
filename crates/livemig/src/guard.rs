//! The migration guard: one per source VM, so that operator commands cannot
//! undo the split-brain protection.
//!
//! While a migration of the VM runs, an operator's `pause` or `resume` would
//! race the engine's own (a `resume` during the stop-and-copy lets the guest
//! write pages that are never sent); after the guest committed to the
//! destination, or the outcome became ambiguous, a `resume` would run the
//! guest twice. A [`MigrationGuard`] owns those decisions: route every
//! operator `pause` and `resume` of a VM through its guard, run its
//! migrations with [`crate::Migration::guard`], and all three are refused
//! in those states with a [`GuardError`] naming the state.
//!
//! ```
//! use livemig::guard::{GuardError, GuardState, MigrationGuard};
//! use livemig::memory::{MemoryLayout, RegionDesc};
//! use livemig::testing::soft::{SoftConfig, SoftVm};
//!
//! let layout = MemoryLayout::new(vec![RegionDesc { guest_addr: 0, size: 1 << 20 }]).unwrap();
//! let vm = SoftVm::new(&layout, &SoftConfig::idle()).unwrap();
//! let guard = MigrationGuard::new();
//! guard.resume(&vm).unwrap(); // no migration: allowed
//! assert_eq!(guard.state(), GuardState::Idle);
//! ```

use std::sync::{Mutex, MutexGuard};

use crate::error::{ErrorKind, MigrationError, Phase};
use crate::policy::MigrationConfig;
use crate::report::{Progress, Report};
use crate::source::{CancelToken, Migration};
use crate::transport::{StreamOpener, Transport};
use crate::vm::{SourceVm, VmError};

/// Where the VM stands with respect to migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GuardState {
    /// No migration runs; operator commands pass.
    Idle,
    /// A migration runs; the engine alone pauses and resumes the VM.
    Migrating,
    /// The guest runs on the destination (for good).
    Migrated,
    /// The last migration's outcome is unknown: the guest may run on the
    /// destination (for good: only an operator who checked the destination
    /// may act, outside the guard).
    Ambiguous,
}

impl GuardState {
    /// The state as one lower-case word (`idle`, `migrating`, `migrated`,
    /// `ambiguous`), for status reports.
    pub fn name(self) -> &'static str {
        match self {
            GuardState::Idle => "idle",
            GuardState::Migrating => "migrating",
            GuardState::Migrated => "migrated",
            GuardState::Ambiguous => "ambiguous",
        }
    }
}

/// Why the guard refused a command, or the command's own failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GuardError {
    /// A migration of this VM is running.
    #[error("refused: a migration of this VM is running (the engine pauses and resumes it)")]
    Migrating,
    /// The VM migrated away.
    #[error("refused: this VM migrated away and its guest runs on the destination")]
    Migrated,
    /// The last migration ended ambiguous.
    #[error("refused: the last migration's outcome is unknown and the guest may run on the destination; the source must stay paused")]
    Ambiguous,
    /// Allowed, but the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
}

impl GuardError {
    fn for_state(s: GuardState) -> Option<GuardError> {
        match s {
            GuardState::Idle => None,
            GuardState::Migrating => Some(GuardError::Migrating),
            GuardState::Migrated => Some(GuardError::Migrated),
            GuardState::Ambiguous => Some(GuardError::Ambiguous),
        }
    }
}

/// Serialises operator commands and migrations of one VM. See the
/// [module documentation](self).
#[derive(Debug)]
pub struct MigrationGuard {
    state: Mutex<GuardState>,
}

impl Default for MigrationGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl MigrationGuard {
    /// A guard for a VM that has not migrated.
    pub fn new() -> Self {
        MigrationGuard {
            state: Mutex::new(GuardState::Idle),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GuardState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current state.
    pub fn state(&self) -> GuardState {
        *self.lock()
    }

    /// `Ok` when operator commands are allowed now (no migration running,
    /// none committed or ambiguous).
    pub fn check(&self) -> Result<(), GuardError> {
        GuardError::for_state(self.state()).map_or(Ok(()), Err)
    }

    /// The operator pauses the VM (refused unless [`GuardState::Idle`]).
    /// A migration cannot start while this runs.
    pub fn pause<V: SourceVm + ?Sized>(&self, vm: &V) -> Result<(), GuardError> {
        let s = self.lock();
        if let Some(e) = GuardError::for_state(*s) {
            return Err(e);
        }
        vm.pause()?;
        Ok(())
    }

    /// The operator resumes the VM (refused unless [`GuardState::Idle`]).
    pub fn resume<V: SourceVm + ?Sized>(&self, vm: &V) -> Result<(), GuardError> {
        let s = self.lock();
        if let Some(e) = GuardError::for_state(*s) {
            return Err(e);
        }
        vm.resume()?;
        Ok(())
    }

    /// Enters [`GuardState::Migrating`], or refuses (in the handshake
    /// phase, [`ErrorKind::Guard`]) unless [`GuardState::Idle`].
    pub(crate) fn enter(&self) -> Result<(), MigrationError> {
        let mut s = self.lock();
        if let Some(e) = GuardError::for_state(*s) {
            return Err(MigrationError::new(Phase::Handshake, ErrorKind::Guard(e)));
        }
        *s = GuardState::Migrating;
        Ok(())
    }

    /// Leaves [`GuardState::Migrating`] after a migration that returned `r`.
    pub(crate) fn leave<T>(&self, r: &Result<T, MigrationError>) {
        *self.lock() = match r {
            Ok(_) => GuardState::Migrated,
            // Ambiguous, or the guest ran on the destination (post-copy):
            // never resume it here.
            Err(e) if e.source_must_stay_paused() => GuardState::Ambiguous,
            Err(_) => GuardState::Idle,
        };
    }

    /// A migration of `vm` under the guard: refused (in the handshake
    /// phase, [`ErrorKind::Guard`]) unless [`GuardState::Idle`]; while it
    /// runs the state is [`GuardState::Migrating`]; afterwards it is
    /// [`GuardState::Migrated`] on success, [`GuardState::Ambiguous`] if the
    /// error [`MigrationError::is_ambiguous`], and `Idle` again otherwise
    /// (the source kept its guest).
    ///
    /// Kept for one release; use `Migration::new(vm).guard(&guard)`.
    #[deprecated(
        since = "0.2.0",
        note = "use livemig::Migration::new(vm).guard(&guard).streams(n, opener)...run(transport)"
    )]
    pub fn migrate_streams<V: SourceVm + ?Sized>(
        &self,
        vm: &V,
        transport: Box<dyn Transport>,
        opener: Option<&mut dyn StreamOpener>,
        config: &MigrationConfig,
        cancel: &CancelToken,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Report, MigrationError> {
        let m = Migration::new(vm)
            .guard(self)
            .config(config.clone())
            .cancel(cancel.clone())
            .progress(progress);
        match opener {
            Some(o) => m.streams(config.streams, o).run(transport),
            None => m.run(transport),
        }
    }

    /// The same-host hand-over under the guard, with the same states as
    /// [`MigrationGuard::migrate_streams`].
    ///
    /// Kept for one release; use `Migration::new(vm).guard(&guard).local()`.
    #[deprecated(
        since = "0.2.0",
        note = "use livemig::Migration::new(vm).guard(&guard).local()...run(transport)"
    )]
    pub fn migrate_local<V: SourceVm + ?Sized>(
        &self,
        vm: &V,
        transport: Box<dyn Transport>,
        config: &MigrationConfig,
        cancel: &CancelToken,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Report, MigrationError> {
        Migration::new(vm)
            .guard(self)
            .config(config.clone())
            .cancel(cancel.clone())
            .progress(progress)
            .local()
            .run(transport)
    }

    /// A migration under the guard (see [`MigrationGuard::migrate_streams`]).
    ///
    /// Kept for one release; use `Migration::new(vm).guard(&guard)`.
    #[deprecated(
        since = "0.2.0",
        note = "use livemig::Migration::new(vm).guard(&guard)...run(transport)"
    )]
    pub fn migrate<V: SourceVm + ?Sized>(
        &self,
        vm: &V,
        transport: Box<dyn Transport>,
        config: &MigrationConfig,
        cancel: &CancelToken,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Report, MigrationError> {
        Migration::new(vm)
            .guard(self)
            .config(config.clone())
            .cancel(cancel.clone())
            .progress(progress)
            .run(transport)
    }
}
