//! All of minivmm's migration glue: the engine's two VM seams for
//! [`Machine`], and the calls into `livemig`. (docs/embedding.md, "A second
//! VMM", counts these lines.)

use livemig::memory::{GuestMemory, MemoryLayout};
use livemig::state::Section;
use livemig::transport::Endpoint;
use livemig::vm::{DestinationVm, DirtyTracker, SourceVm, VcpuThrottle, VmDescription, VmError};
use livemig::{
    Migration, MigrationConfig, MigrationError, Progress, ReceiveReport, Reception, Report,
};
use livemig_kvm::dirty::KvmDirtyTracker;
use livemig_kvm::DirtyMode;

use crate::machine::Machine;

impl SourceVm for Machine {
    fn memory(&self) -> &dyn GuestMemory {
        &self.ram
    }

    fn describe(&self) -> Result<VmDescription, VmError> {
        let layout =
            MemoryLayout::of(&self.ram).map_err(|e| VmError::Incompatible(e.to_string()))?;
        Ok(self.kvm.describe(layout, vec![]))
    }

    fn dirty_tracker(&self) -> Result<Box<dyn DirtyTracker + '_>, VmError> {
        let ring = self.ring.as_deref();
        let tracker = KvmDirtyTracker::new(self.kvm.vm(), &self.slots, self.dirty_mode, ring);
        Ok(Box::new(tracker))
    }

    // minivmm's only device writer is the vCPU (its serial port writes no
    // guest memory), so parking the vCPU stops every writer.
    fn pause(&self) -> Result<(), VmError> {
        self.kvm.pause()
    }

    fn resume(&self) -> Result<(), VmError> {
        self.kvm.resume()
    }

    fn is_paused(&self) -> bool {
        self.kvm.is_paused()
    }

    fn save_state(&self) -> Result<Vec<Section>, VmError> {
        self.kvm.save_state(&[])
    }

    fn throttle(&self) -> Option<&dyn VcpuThrottle> {
        Some(&self.kvm)
    }
}

impl DestinationVm for Machine {
    fn memory(&self) -> &dyn GuestMemory {
        &self.ram
    }

    fn restore_state(&mut self, sections: &[Section]) -> Result<(), VmError> {
        self.kvm.restore_state(sections, &mut [])
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.kvm.resume()
    }

    fn resume_then(&mut self, started: &mut dyn FnMut()) -> Result<(), VmError> {
        self.kvm.resume_then(started)
    }

    /// `true`: `KvmParts::resume_then` checks that no vCPU stopped for
    /// good, calls `started`, then wakes the vCPU.
    fn started_before_wake(&self) -> bool {
        true
    }
}

/// Sends the running guest to `to`. On success the guest runs there.
pub fn migrate_to(
    m: &Machine,
    to: &Endpoint,
    config: &MigrationConfig,
) -> Result<Report, MigrationError> {
    let t = livemig::transport::connect(to, None)?;
    Migration::new(m)
        .config(config.clone())
        .progress(|p: &Progress| eprintln!("minivmm: {p:?}"))
        .run(t)
}

/// Receives a guest on `listen` into a new VM with `memory` bytes of RAM;
/// returns it running.
pub fn receive_on(
    listen: &Endpoint,
    memory: u64,
) -> Result<(Machine, ReceiveReport), MigrationError> {
    let l = livemig::transport::listen(listen)?;
    eprintln!("minivmm: listening on {}", l.local_endpoint());
    Reception::new(l.accept()?).run(|desc| {
        let mut m = Machine::create(memory, DirtyMode::Classic)
            .map_err(|e| VmError::Create(e.to_string()))?;
        livemig::vm::check_layout(&m.ram, desc)?;
        m.kvm.check_incoming(desc)?;
        Ok(m)
    })
}
