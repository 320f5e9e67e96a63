//! The VM: KVM with its in-kernel irqchip and PIT (their state is what
//! `livemig_kvm::state::save_vm` saves), one memory slot over [`Ram`], one
//! vCPU on its own thread ([`Vcpu`]).

use kvm_bindings::{kvm_enable_cap, kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use std::sync::Arc;

use livemig_kvm::dirty::{DirtyRing, RingError, Slot};
use livemig_kvm::DirtyMode;

use crate::ram::{Ram, RamError};
use crate::vcpu::Vcpu;

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET`.
const MANUAL_PROTECT_FLAGS: u64 = 1 | 2;

/// Errors creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// A KVM ioctl failed.
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
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

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> MachineError {
    move |e| MachineError::Kvm(what, e)
}

/// The whole VM. Never dropped while the vCPU thread runs: minivmm exits
/// the process instead.
pub struct Machine {
    /// The VM.
    pub vm: VmFd,
    /// Guest memory.
    pub ram: Ram,
    /// Its KVM slot (one), for the dirty tracker.
    pub slots: Vec<Slot>,
    /// The vCPU.
    pub vcpu: Vcpu,
    /// Dirty tracking mode (set when the VM was created).
    pub dirty_mode: DirtyMode,
    /// The vCPU's dirty ring, in `DirtyMode::Ring`.
    pub ring: Option<Arc<DirtyRing>>,
    /// MSRs to save (`KVM_GET_MSR_INDEX_LIST`).
    pub msrs: Vec<u32>,
    /// The vCPU's TSC rate (`KVM_GET_TSC_KHZ`).
    pub tsc_khz: u32,
}

impl Machine {
    /// Creates the VM, `memory` bytes of RAM, its vCPU parked.
    pub fn create(memory: u64, dirty_mode: DirtyMode) -> Result<Machine, MachineError> {
        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        let dirty_mode = match dirty_mode {
            DirtyMode::ManualProtect => {
                let mut cap = kvm_enable_cap {
                    cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    ..Default::default()
                };
                cap.args[0] = MANUAL_PROTECT_FLAGS;
                vm.enable_cap(&cap)
                    .map_err(kvm_err("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)"))?;
                DirtyMode::ManualProtect
            }
            DirtyMode::Ring { entries } => {
                // Before any vCPU exists; 16 bytes per entry.
                let mut cap = kvm_enable_cap {
                    cap: kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
                    ..Default::default()
                };
                cap.args[0] = u64::from(entries) * 16;
                vm.enable_cap(&cap)
                    .map_err(kvm_err("KVM_ENABLE_CAP(DIRTY_LOG_RING_ACQ_REL)"))?;
                dirty_mode
            }
            DirtyMode::Classic => DirtyMode::Classic,
        };
        let ram = Ram::new(memory)?;
        let slot = Slot {
            slot: 0,
            guest_addr: 0,
            size: ram.size(),
            host_addr: ram.host_addr(),
        };
        slot.register(&vm, 0)
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        let fd = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let tsc_khz = fd.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
        let msrs = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        let slots = vec![slot];
        let ring = match dirty_mode {
            DirtyMode::Ring { entries } => Some(Arc::new(DirtyRing::new(
                &vm,
                std::slice::from_ref(&fd),
                entries,
                &slots,
            )?)),
            _ => None,
        };
        let vcpu = Vcpu::spawn(fd, ring.clone()).map_err(MachineError::Thread)?;
        Ok(Machine {
            vm,
            ram,
            slots,
            vcpu,
            dirty_mode,
            ring,
            msrs,
            tsc_khz,
        })
    }
}
