//! The VM: KVM with its in-kernel irqchip and PIT, one memory slot over
//! [`Ram`], one vCPU on its own thread, which owns its fd (`vcpu.rs`),
//! built from livemig-kvm's separate pieces (`setup`,
//! `parts::KvmParts::with_vcpu_threads`).

use std::sync::Arc;

use kvm_ioctls::Kvm;
use livemig_kvm::dirty::{DirtyRing, RingError, Slot};
use livemig_kvm::parts::KvmParts;
use livemig_kvm::{setup, DirtyMode, KvmVmError};

use crate::ram::{Ram, RamError};

/// Errors creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// A KVM ioctl or setup step failed.
    #[error(transparent)]
    Kvm(#[from] KvmVmError),
    /// Registering guest memory failed.
    #[error("KVM_SET_USER_MEMORY_REGION: {0}")]
    Slot(kvm_ioctls::Error),
    /// Guest memory.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// Mapping the dirty ring failed.
    #[error("dirty ring: {0}")]
    Ring(#[from] RingError),
    /// Starting the vCPU thread failed.
    #[error("starting the vCPU thread: {0}")]
    Thread(std::io::Error),
}

/// The whole VM. Never dropped while the vCPU thread runs: minivmm exits
/// the process instead.
pub struct Machine {
    /// The VM fd, the vCPU, its pause gate, state and description.
    pub kvm: KvmParts,
    /// Guest memory.
    pub ram: Ram,
    /// Its KVM slot (one), for the dirty tracker.
    pub slots: Vec<Slot>,
    /// Dirty tracking mode (set when the VM was created).
    pub dirty_mode: DirtyMode,
    /// The vCPU's dirty ring, in `DirtyMode::Ring`.
    pub ring: Option<Arc<DirtyRing>>,
}

impl Machine {
    /// Creates the VM, `memory` bytes of RAM, its vCPU parked.
    pub fn create(memory: u64, dirty_mode: DirtyMode) -> Result<Machine, MachineError> {
        let kvm = Kvm::new().map_err(KvmVmError::OpenKvm)?;
        let vm = setup::create_vm(&kvm)?;
        let dirty_mode = setup::enable_dirty_mode(&vm, dirty_mode)?;
        let ram = Ram::new(memory)?;
        let slot = Slot {
            slot: 0,
            guest_addr: 0,
            size: ram.size(),
            host_addr: ram.host_addr(),
        };
        slot.register(&vm, 0).map_err(MachineError::Slot)?;
        let slots = vec![slot];
        let fds = setup::create_vcpus(&kvm, &vm, 1)?;
        let ring = match dirty_mode {
            DirtyMode::Ring { entries } => {
                Some(Arc::new(DirtyRing::new(&vm, &fds, entries, &slots)?))
            }
            _ => None,
        };
        let parts = KvmParts::with_vcpu_threads(&kvm, vm, &fds)?;
        for fd in fds {
            crate::vcpu::spawn(fd, parts.gate().clone(), ring.clone())
                .map_err(MachineError::Thread)?;
        }
        Ok(Machine {
            kvm: parts,
            ram,
            slots,
            dirty_mode,
            ring,
        })
    }
}
