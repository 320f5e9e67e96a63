//! Creating a KVM VM from the pieces [`crate::KvmVm`] uses, for a VMM that
//! keeps its own memory and vCPU threads: the VM with the in-kernel devices
//! whose state [`crate::state::save_vm`] saves, the dirty-tracking mode a
//! [`crate::dirty::KvmDirtyTracker`] needs turned on before any vCPU
//! exists, and vCPUs with their CPUID.
//!
//! ```no_run
//! use kvm_ioctls::Kvm;
//! use livemig_kvm::{setup, DirtyMode};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = Kvm::new()?;
//! let vm = setup::create_vm(&kvm)?;
//! let mode = setup::enable_dirty_mode(&vm, DirtyMode::ManualProtect)?; // before any vCPU
//! // … register memory slots (livemig_kvm::dirty::Slot::register) …
//! let vcpus = setup::create_vcpus(&kvm, &vm, 2)?;
//! # let _ = (mode, vcpus); Ok(()) }
//! ```

use kvm_bindings::{kvm_enable_cap, kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::cpu::{supported_cpuid, vcpu_cpuid};
use crate::dirty::{check_ring_entries, DirtyMode};
use crate::vm::KvmVmError;

/// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)` flag: the dirty log
/// is re-protected only by `KVM_CLEAR_DIRTY_LOG`, not by
/// `KVM_GET_DIRTY_LOG`.
pub const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: u64 = 1;
/// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)` flag: a new slot's
/// bitmap starts all set, so the guest pays no write-protect fault before
/// the first clear.
pub const KVM_DIRTY_LOG_INITIALLY_SET: u64 = 2;
/// Where [`create_vm`] puts the TSS KVM needs on Intel (three pages below
/// 4 GiB, above the usual BIOS area).
pub const TSS_ADDRESS: usize = 0xfffb_d000;

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmVmError {
    move |source| KvmVmError::Kvm { op, source }
}

/// A new VM with the TSS address set, an in-kernel irqchip (PIC, IOAPIC,
/// a LAPIC per vCPU) and PIT2: the devices whose state the `vm.*`
/// sections carry.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, KvmVmError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

/// Turns on the dirty-tracking mode `wanted` on `vm` — before any vCPU
/// exists (the ring must be) — and returns the mode KVM granted, to pass
/// to [`crate::dirty::KvmDirtyTracker::new`]:
///
/// * [`DirtyMode::Classic`]: nothing to enable.
/// * [`DirtyMode::ManualProtect`]: `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with
///   [`KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`] (and
///   [`KVM_DIRTY_LOG_INITIALLY_SET`] where offered); where KVM does not
///   offer the capability, `Classic` is returned (and logged).
/// * [`DirtyMode::Ring`]: `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` (or the plain
///   ring) sized for `entries`; an error where KVM offers neither or the
///   size is not allowed. Map the rings afterwards with
///   [`crate::dirty::DirtyRing::new`], and harvest on
///   `KVM_EXIT_DIRTY_RING_FULL` in the vCPU loop
///   ([`crate::dirty::DirtyRing::on_ring_full`]).
pub fn enable_dirty_mode(vm: &VmFd, wanted: DirtyMode) -> Result<DirtyMode, KvmVmError> {
    match wanted {
        DirtyMode::Classic => Ok(DirtyMode::Classic),
        DirtyMode::ManualProtect => enable_manual_protect(vm),
        DirtyMode::Ring { entries } => enable_ring(vm, entries).map(|()| wanted),
    }
}

fn enable_manual_protect(vm: &VmFd) -> Result<DirtyMode, KvmVmError> {
    let cap_id = kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
    let supported = vm.check_extension_raw(u64::from(cap_id));
    if supported <= 0 {
        log::info!("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not offered; using the classic dirty log");
        return Ok(DirtyMode::Classic);
    }
    let mut flags = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
    if supported as u64 & KVM_DIRTY_LOG_INITIALLY_SET != 0 {
        flags |= KVM_DIRTY_LOG_INITIALLY_SET;
    }
    let mut cap = kvm_enable_cap {
        cap: cap_id,
        ..Default::default()
    };
    cap.args[0] = flags;
    vm.enable_cap(&cap)
        .map_err(kvm_err("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)"))?;
    Ok(DirtyMode::ManualProtect)
}

fn enable_ring(vm: &VmFd, entries: u32) -> Result<(), KvmVmError> {
    // Prefer the ACQ_REL flavour (same ABI, ordering spelled out).
    let acq_rel = kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL;
    let plain = kvm_bindings::KVM_CAP_DIRTY_LOG_RING;
    let (cap_id, max_bytes) = match vm.check_extension_raw(u64::from(acq_rel)) {
        n if n > 0 => (acq_rel, n),
        _ => (plain, vm.check_extension_raw(u64::from(plain))),
    };
    if max_bytes <= 0 {
        return Err(KvmVmError::Config(
            "dirty ring requested but KVM does not offer KVM_CAP_DIRTY_LOG_RING".into(),
        ));
    }
    check_ring_entries(entries, max_bytes as u64)?;
    let mut cap = kvm_enable_cap {
        cap: cap_id,
        ..Default::default()
    };
    // 16 bytes (one kvm_dirty_gfn) per entry.
    cap.args[0] = u64::from(entries) * 16;
    vm.enable_cap(&cap)
        .map_err(kvm_err("KVM_ENABLE_CAP(DIRTY_LOG_RING)"))
}

/// Creates vCPUs `0..count`, each with the host's supported CPUID and its
/// own APIC id ([`vcpu_cpuid`]).
pub fn create_vcpus(kvm: &Kvm, vm: &VmFd, count: u32) -> Result<Vec<VcpuFd>, KvmVmError> {
    let supported = supported_cpuid(kvm).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    (0..count)
        .map(|id| {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&vcpu_cpuid(&supported, id))
                .map_err(kvm_err("KVM_SET_CPUID2"))?;
            Ok(fd)
        })
        .collect()
}

/// The MSRs a vCPU's state includes (`KVM_GET_MSR_INDEX_LIST`), for
/// [`crate::state::VcpuState::save`].
pub fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>, KvmVmError> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec())
}

/// Whether KVM offers `KVM_PRE_FAULT_MEMORY` on `vm`
/// (`KVM_CAP_PRE_FAULT_MEMORY`): building the stage-2 mappings of guest
/// memory before the guest touches it. x86 KVM offers it only with
/// two-dimensional paging (EPT/NPT); a shadow-paging MMU such as PVM's
/// builds its mappings from the guest's own page tables as the guest runs,
/// and answers no (measured on this project's hosts, 2026-12-02).
pub fn pre_fault_memory_supported(vm: &VmFd) -> bool {
    let cap = kvm_bindings::KVM_CAP_PRE_FAULT_MEMORY as std::os::raw::c_ulong;
    vm.check_extension_raw(cap) > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reports whether this host's KVM pre-faults memory (no assertion:
    /// it depends on the host's MMU).
    #[test]
    fn reports_pre_fault_memory() {
        if !crate::kvm_or_skip("reports_pre_fault_memory") {
            return;
        }
        let kvm = Kvm::new().unwrap();
        let vm = create_vm(&kvm).unwrap();
        eprintln!(
            "KVM_CAP_PRE_FAULT_MEMORY on this host: {}",
            pre_fault_memory_supported(&vm)
        );
    }
}
