//! CPU features and the guest's TSC, for a VMM that creates its own vCPUs:
//! the CPUID a vCPU gets, the properties a source puts into its
//! [`VmDescription`] (`kvm.cpuid`, [`TSC_KHZ_PROPERTY`], `kvm.irqchip`),
//! and the TSC-rate steps of a destination. [`crate::KvmVm`] uses the same
//! functions; [`crate::check_properties`] checks what
//! [`describe_properties`] wrote.
//!
//! ```no_run
//! use kvm_ioctls::Kvm;
//! use livemig_kvm::cpu;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = Kvm::new()?;
//! let vm = kvm.create_vm()?;
//! let supported = cpu::supported_cpuid(&kvm)?;
//! let vcpu = vm.create_vcpu(0)?;
//! vcpu.set_cpuid2(&cpu::vcpu_cpuid(&supported, 0))?;
//! // the source's SourceVm::describe:
//! let properties = cpu::describe_properties(&supported, &vcpu)?;
//! # let _ = properties; Ok(()) }
//! ```

use std::collections::BTreeMap;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use livemig::vm::{VmDescription, VmError, VmOp};

use crate::vm::{check_tsc_khz, TscPlan, TSC_KHZ_PROPERTY};

/// The [`VmDescription::properties`] key of the hash of the source host's
/// supported CPUID ([`hash_cpuid`], 16 hex digits).
pub const CPUID_PROPERTY: &str = "kvm.cpuid";
/// The [`VmDescription::properties`] key naming the in-kernel devices
/// whose state the `vm.*` sections carry.
pub const IRQCHIP_PROPERTY: &str = "kvm.irqchip";

/// `KVM_GET_SUPPORTED_CPUID` with room for every entry.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, kvm_ioctls::Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
}

/// The CPUID for vCPU `id`: `supported` with its initial APIC id (leaf 1
/// EBX bits 31..24) and x2APIC id (leaves 0xb and 0x1f EDX) set to `id`.
pub fn vcpu_cpuid(supported: &CpuId, id: u32) -> CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24),
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
    c
}

/// A hash of a supported CPUID (FNV-1a over every entry): equal on hosts
/// with the same CPU features and KVM version. What depends on the host
/// CPU the ioctl ran on (initial APIC ids in leaf 1 EBX, x2APIC ids in
/// leaves 0xb/0x1f EDX) is left out.
pub fn hash_cpuid(c: &CpuId) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for e in c.as_slice() {
        let ebx = if e.function == 1 {
            e.ebx & 0xffff
        } else {
            e.ebx
        };
        let edx = if e.function == 0xb || e.function == 0x1f {
            0
        } else {
            e.edx
        };
        for v in [e.function, e.index, e.flags, e.eax, ebx, e.ecx, edx] {
            for b in v.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    h
}

/// The KVM properties of a source VM's description: [`CPUID_PROPERTY`]
/// from `cpuid_hash`, [`IRQCHIP_PROPERTY`] (`pic+ioapic+pit2`) and, unless
/// `tsc_khz` is 0 (unknown), [`TSC_KHZ_PROPERTY`].
pub fn properties(cpuid_hash: u64, tsc_khz: u32) -> BTreeMap<String, String> {
    let mut p = BTreeMap::new();
    p.insert(CPUID_PROPERTY.to_string(), format!("{cpuid_hash:016x}"));
    p.insert(IRQCHIP_PROPERTY.to_string(), "pic+ioapic+pit2".to_string());
    if tsc_khz != 0 {
        p.insert(TSC_KHZ_PROPERTY.to_string(), tsc_khz.to_string());
    }
    p
}

/// [`properties`] of a VM whose vCPUs got `supported` (see
/// [`vcpu_cpuid`]), with the TSC rate read from `vcpu`
/// (`KVM_GET_TSC_KHZ`; call it while the vCPU is not in `KVM_RUN`, e.g.
/// when the VM is created, and keep the result).
pub fn describe_properties(
    supported: &CpuId,
    vcpu: &VcpuFd,
) -> Result<BTreeMap<String, String>, kvm_ioctls::Error> {
    Ok(properties(hash_cpuid(supported), vcpu.get_tsc_khz()?))
}

/// The source's TSC frequency from its description; `None` from a source
/// that does not send it (versions before it did: accepted, with a warning,
/// so a release can still take over from the one before).
pub fn source_tsc_khz(desc: &VmDescription) -> Result<Option<u32>, VmError> {
    let Some(v) = desc.properties.get(TSC_KHZ_PROPERTY) else {
        log::warn!(
            "the source did not describe its TSC frequency ({TSC_KHZ_PROPERTY}); \
             assuming this host's"
        );
        return Ok(None);
    };
    v.parse().map(Some).map_err(|_| {
        VmError::Incompatible(format!(
            "source's TSC frequency {TSC_KHZ_PROPERTY}={v:?} is not a number of kHz"
        ))
    })
}

/// This host's TSC frequency as KVM gives it to a new vCPU (asked of a
/// throwaway VM: `KVM_GET_TSC_KHZ` is a vCPU ioctl).
pub fn host_tsc_khz(kvm: &Kvm) -> Result<u32, VmError> {
    let create = |op: &str, e: kvm_ioctls::Error| VmError::failed(VmOp::Create, op, e);
    let vm = kvm
        .create_vm()
        .map_err(|e| create("KVM_CREATE_VM (probing the TSC frequency)", e))?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| create("KVM_CREATE_VCPU (probing the TSC frequency)", e))?;
    vcpu.get_tsc_khz().map_err(|e| create("KVM_GET_TSC_KHZ", e))
}

/// Sets one (not running) vCPU's TSC frequency with `KVM_SET_TSC_KHZ` and
/// checks, by reading it back, that it took.
pub fn set_vcpu_tsc_khz(fd: &VcpuFd, khz: u32) -> Result<(), VmError> {
    let refused = |e: kvm_ioctls::Error| {
        VmError::failed(VmOp::Incompatible, format!("KVM_SET_TSC_KHZ({khz})"), e)
    };
    fd.set_tsc_khz(khz).map_err(refused)?;
    let got = fd.get_tsc_khz().map_err(refused)?;
    check_tsc_khz(khz, got, false).map(|_| ())
}

/// Gives a destination VM (`vm`, its vCPUs `vcpus`, not running, whose
/// rate is `ours` kHz) the TSC rate of the source described by `desc`:
/// nothing when the rates match, `KVM_SET_TSC_KHZ` on every vCPU where
/// KVM can scale (`KVM_CAP_TSC_CONTROL`), otherwise
/// [`VmError::Incompatible`] naming both rates. Call it before the state
/// is restored (what [`crate::KvmVm::adopt_tsc_khz`] does).
pub fn adopt_tsc_khz(
    vm: &VmFd,
    vcpus: &[&VcpuFd],
    ours: u32,
    desc: &VmDescription,
) -> Result<TscPlan, VmError> {
    let Some(source) = source_tsc_khz(desc)? else {
        return Ok(TscPlan::Matches);
    };
    let plan = check_tsc_khz(source, ours, vm.check_extension(Cap::TscControl))?;
    if let TscPlan::Scale(khz) = plan {
        for fd in vcpus {
            set_vcpu_tsc_khz(fd, khz)?;
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_vcpu_gets_its_own_apic_id_and_the_same_hash() {
        if !crate::kvm_or_skip("each_vcpu_gets_its_own_apic_id_and_the_same_hash") {
            return;
        }
        let kvm = Kvm::new().unwrap();
        let supported = supported_cpuid(&kvm).unwrap();
        let three = vcpu_cpuid(&supported, 3);
        let leaf1 = three.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!(hash_cpuid(&three), hash_cpuid(&supported));
        let p = properties(hash_cpuid(&supported), 0);
        assert!(!p.contains_key(TSC_KHZ_PROPERTY));
        assert_eq!(p[CPUID_PROPERTY].len(), 16);
    }
}
