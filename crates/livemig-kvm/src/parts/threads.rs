//! State work for vCPUs whose fds stay on their own threads
//! (Firecracker's shape): each vCPU's part runs on its thread, parked in
//! [`crate::pause::VcpuPauser::before_run_serving`], all at once, through
//! [`PauseGate::on_vcpu_threads`]; the VM-wide and device parts run on the
//! caller's thread. The same sections, in the same order, as
//! [`crate::state::save_all`] and [`crate::state::restore_all`], so a
//! source of one shape migrates to a destination of the other.
//!
//! [`crate::parts::KvmParts`] made with
//! [`crate::parts::KvmParts::with_vcpu_threads`] calls these; a VMM that
//! does not use `KvmParts` can call them with its own gate and `VmFd`.

use std::sync::Arc;

use kvm_ioctls::{Cap, VmFd};
use livemig::state::{DeviceState, Section};
use livemig::vm::{VmDescription, VmError, VmOp};

use crate::cpu::{set_vcpu_tsc_khz, source_tsc_khz};
use crate::pause::PauseGate;
use crate::state::{
    check_sections, find_section, kvm_section_names, restore_vcpu, restore_vm_before_vcpus,
    restore_vm_last, save_vcpu, save_vm, vcpu_section_name,
};
use crate::vcpu::VcpuError;
use crate::vm::{check_tsc_khz, TscPlan};

fn on_threads(what: &str, e: VcpuError) -> VmError {
    VmError::failed(VmOp::State, format!("{what} on the vCPU threads"), e)
}

/// Every vCPU's section (each saved on its own thread, `msr_indices` as
/// in [`crate::state::VcpuState::save`]), then the VM-wide sections of
/// `vm`, then each device's: what [`crate::state::save_all`] writes. The
/// gate must be paused (the engine's `SourceVm::pause` did that).
pub fn save_all(
    gate: &PauseGate,
    vm: &VmFd,
    msr_indices: &Arc<[u32]>,
    devices: &[&dyn DeviceState],
) -> Result<Vec<Section>, VmError> {
    let msrs = msr_indices.clone();
    let saved = gate
        .on_vcpu_threads(move |i, fd| save_vcpu(i, fd, &msrs))
        .map_err(|e| on_threads("saving the vCPUs", e))?;
    let mut sections = Vec::with_capacity(saved.len() + 3 + devices.len());
    for s in saved {
        sections.push(s?);
    }
    sections.extend(save_vm(vm)?);
    for d in devices {
        sections.push(d.save_section()?);
    }
    Ok(sections)
}

/// Restores what [`save_all`] (or [`crate::state::save_all`]) saved into
/// a fresh VM of `vcpus` vCPUs whose threads are parked, in KVM's order:
/// every section claimed and none missing, irqchip and PIT, the vCPUs
/// (each on its own thread), the devices, the clock last.
pub fn restore_all(
    gate: &PauseGate,
    vm: &VmFd,
    vcpus: usize,
    devices: &mut [&mut dyn DeviceState],
    sections: &[Section],
) -> Result<(), VmError> {
    let mut expected = kvm_section_names(vcpus);
    expected.extend(devices.iter().map(|d| d.section_name()));
    check_sections(sections, &expected)?;
    restore_vm_before_vcpus(vm, sections)?;
    let mine = (0..vcpus)
        .map(|i| find_section(sections, &vcpu_section_name(i)).cloned())
        .collect::<Result<Vec<Section>, _>>()?;
    let mine = Arc::new(mine);
    let restored = gate
        .on_vcpu_threads(move |i, fd| match mine.get(i) {
            Some(s) => restore_vcpu(fd, s),
            None => Err(livemig::state::StateError::Missing(vcpu_section_name(i))),
        })
        .map_err(|e| on_threads("restoring the vCPUs", e))?;
    for r in restored {
        r?;
    }
    for d in devices.iter_mut() {
        d.restore_section(find_section(sections, &d.section_name())?)?;
    }
    Ok(restore_vm_last(vm, sections)?)
}

/// [`crate::cpu::adopt_tsc_khz`] for vCPUs on their threads: nothing when
/// the source's rate (from `desc`) matches `ours`, `KVM_SET_TSC_KHZ` on
/// every vCPU (each on its thread) where KVM can scale, otherwise
/// [`VmError::Incompatible`] naming both rates.
pub fn adopt_tsc_khz(
    gate: &PauseGate,
    vm: &VmFd,
    ours: u32,
    desc: &VmDescription,
) -> Result<TscPlan, VmError> {
    let Some(source) = source_tsc_khz(desc)? else {
        return Ok(TscPlan::Matches);
    };
    let plan = check_tsc_khz(source, ours, vm.check_extension(Cap::TscControl))?;
    if let TscPlan::Scale(khz) = plan {
        let set = gate
            .on_vcpu_threads(move |_, fd| set_vcpu_tsc_khz(fd, khz))
            .map_err(|e| VmError::failed(VmOp::Incompatible, "KVM_SET_TSC_KHZ", e))?;
        for r in set {
            r?;
        }
    }
    Ok(plan)
}
