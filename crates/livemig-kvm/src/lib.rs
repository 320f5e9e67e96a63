//! # livemig-kvm — the KVM backend for livemig
//!
//! [`KvmVm`] is a KVM virtual machine built on kvm-ioctls: guest memory as a
//! vm-memory `GuestMemoryMmap` with dirty bitmaps, an in-kernel irqchip and
//! PIT, one thread per vCPU with an explicit [`vcpu::VcpuSet::pause`] /
//! [`vcpu::VcpuSet::resume`], KVM dirty logging (classic, manual-protect
//! with chunked `KVM_CLEAR_DIRTY_LOG`, or the per-vCPU dirty ring), and every piece of vCPU, VM-wide and
//! device state as versioned livemig sections. It implements
//! [`livemig::vm::SourceVm`] and [`livemig::vm::DestinationVm`].
//!
//! A VMM that owns its guest memory and runs its own vCPU loop uses the
//! pieces [`KvmVm`] is built from instead (docs/embedding.md, "Your own
//! vCPU loop"): [`setup`] (VM, dirty-tracking mode, vCPUs), [`pause`] (the
//! pause protocol its vCPU threads follow), [`state`] (vCPU state for a
//! `VcpuFd` it owns, VM-wide state for a `VmFd`, the restore order),
//! [`cpu`] (CPUID, TSC and the description's properties), [`dirty`]
//! (tracking over its `VmFd` and slots), or all of them behind
//! [`parts::KvmParts`].
#![deny(missing_docs)]

mod affinity;
pub mod cpu;
pub mod dirty;
pub mod fdpass;
pub mod memfd;
pub mod parts;
pub mod pause;
mod pool;
pub mod prepared;
pub mod serial;
pub mod setup;
pub mod state;
pub mod thp;
pub mod vcpu;
pub mod vm;

pub use dirty::DirtyMode;
pub use memfd::{MemoryBackend, MemoryOptions};
pub use prepared::PreparedVm;
pub use thp::Thp;
pub use vcpu::ExitHandler;
pub use vm::{
    check_compatible, check_properties, check_tsc_khz, x86_layout, KvmVm, KvmVmError, SharedDevice,
    TscPlan, VmConfig, TSC_KHZ_PROPERTY,
};

/// Whether `/dev/kvm` can be opened on this machine.
pub fn kvm_available() -> bool {
    kvm_ioctls::Kvm::new().is_ok()
}

/// For this crate's unit tests: true if KVM is there; otherwise says loudly
/// that `test` is skipped, or panics where `LIVEMIG_REQUIRE_KVM` is set (CI).
#[cfg(test)]
pub(crate) fn kvm_or_skip(test: &str) -> bool {
    if kvm_available() {
        return true;
    }
    if std::env::var_os("LIVEMIG_REQUIRE_KVM").is_some() {
        panic!("{test}: /dev/kvm is not available but LIVEMIG_REQUIRE_KVM is set");
    }
    eprintln!("\n*** SKIPPED {test}: /dev/kvm is not available on this machine ***\n");
    false
}
