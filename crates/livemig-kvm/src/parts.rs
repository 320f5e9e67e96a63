//! [`KvmParts`]: the KVM side of the engine's seams for a VMM that owns
//! its guest memory and runs its own vCPU threads — everything
//! `SourceVm`/`DestinationVm` need except memory and dirty tracking, built
//! from the same pieces as [`crate::KvmVm`] ([`crate::pause`],
//! [`crate::state`], [`crate::cpu`]).
//!
//! The VMM keeps its VM and vCPUs here and its vCPU threads follow the
//! pause protocol through [`KvmParts::gate`]; each seam method is then one
//! line:
//!
//! ```ignore
//! impl SourceVm for MyVmm {
//!     fn memory(&self) -> &GuestRam { &self.ram }
//!     fn describe(&self) -> Result<VmDescription, VmError> {
//!         Ok(self.kvm.describe(MemoryLayout::of(&self.ram).map_err(/* … */)?, vec![]))
//!     }
//!     fn dirty_tracker(&self) -> Result<Box<dyn DirtyTracker + '_>, VmError> {
//!         Ok(Box::new(KvmDirtyTracker::new(self.kvm.vm(), &self.slots, self.mode, None)))
//!     }
//!     fn pause(&self) -> Result<(), VmError> { self.kvm.pause() }   // + stop device writers
//!     fn resume(&self) -> Result<(), VmError> { self.kvm.resume() }
//!     fn is_paused(&self) -> bool { self.kvm.is_paused() }
//!     fn save_state(&self) -> Result<Vec<Section>, VmError> { self.kvm.save_state(&[&self.uart]) }
//!     fn throttle(&self) -> Option<&dyn VcpuThrottle> { Some(&self.kvm) }
//! }
//! impl DestinationVm for MyVmm {
//!     fn memory(&self) -> &GuestRam { &self.ram }
//!     fn restore_state(&mut self, s: &[Section]) -> Result<(), VmError> {
//!         self.kvm.restore_state(s, &mut [&mut self.uart])
//!     }
//!     fn resume(&mut self) -> Result<(), VmError> { self.kvm.resume() }
//! }
//! ```
//!
//! On the destination, call [`KvmParts::check_incoming`] in the closure
//! passed to `livemig::receive` (besides checking the memory layout).
//!
//! **Two ways to hold the vCPU fds.** [`KvmParts::new`] keeps each
//! `VcpuFd` in an `Arc<Mutex<_>>` its thread locks around `KVM_RUN`;
//! state is saved and restored from the migration thread through the
//! lock. [`KvmParts::with_vcpu_threads`] keeps none: each vCPU thread owns
//! its fd (Firecracker's shape) and parks in
//! [`crate::pause::VcpuPauser::before_run_serving`], and the same methods
//! (`save_state`, `restore_state`, `check_incoming`) run each vCPU's part
//! on its own thread, all at once, through
//! [`PauseGate::on_vcpu_threads`] (see [`threads`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use livemig::memory::MemoryLayout;
use livemig::state::{DeviceState, Section, StateError};
use livemig::vm::{NicInfo, VcpuThrottle, VmDescription, VmError, VmOp};

use crate::cpu::{adopt_tsc_khz, hash_cpuid, properties, supported_cpuid};
use crate::pause::PauseGate;
use crate::setup::msr_indices;
use crate::state::{restore_all, save_all};
use crate::vm::{check_properties, KvmVmError, TscPlan};

pub mod threads;

/// Where the vCPU fds are.
enum Vcpus {
    /// Each in a mutex shared with its thread ([`KvmParts::new`]).
    Shared(Vec<Arc<Mutex<VcpuFd>>>),
    /// This many, each owned by its thread ([`KvmParts::with_vcpu_threads`]).
    OnThreads(usize),
}

/// A KVM VM's fd, its vCPUs (each shared with the VMM's vCPU thread, or
/// owned by it), the [`PauseGate`] those threads follow, and what saving
/// and describing the VM needs (MSR list, CPUID hash, TSC rate).
pub struct KvmParts {
    vm: VmFd,
    vcpus: Vcpus,
    gate: PauseGate,
    msrs: Arc<[u32]>,
    cpuid_hash: u64,
    tsc_khz: u32,
}

fn locked(fd: &Mutex<VcpuFd>) -> MutexGuard<'_, VcpuFd> {
    // A poisoned lock only means a vCPU thread panicked; the fd is fine.
    fd.lock().unwrap_or_else(|e| e.into_inner())
}

impl KvmParts {
    /// Takes `vm` and its vCPUs (created with [`crate::setup`] or
    /// equivalent: the host's supported CPUID, in-kernel irqchip and PIT),
    /// reads the MSR list and vCPU 0's TSC rate, and creates a paused
    /// [`PauseGate`] for them. Start one thread per vCPU that attaches to
    /// [`KvmParts::gate`] with its fd from [`KvmParts::vcpu`].
    pub fn new(kvm: &Kvm, vm: VmFd, vcpus: Vec<VcpuFd>) -> Result<Self, KvmVmError> {
        let mut parts = Self::with_vcpu_threads(kvm, vm, &vcpus)?;
        parts.vcpus = Vcpus::Shared(vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect());
        Ok(parts)
    }

    /// Like [`KvmParts::new`] for a VMM whose vCPU threads own their fds:
    /// reads what it needs from `vcpus` (their count, vCPU 0's TSC rate)
    /// and keeps none of them. Move each fd into its thread, which
    /// attaches to [`KvmParts::gate`] with it and parks with
    /// [`crate::pause::VcpuPauser::before_run_serving`]`(&fd)`: the state
    /// methods then run on those threads ([`threads`]), and fail naming a
    /// vCPU whose thread parks any other way.
    ///
    /// ```no_run
    /// use kvm_ioctls::{Kvm, VcpuExit};
    /// use livemig_kvm::{parts::KvmParts, setup};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let kvm = Kvm::new()?;
    /// let vm = setup::create_vm(&kvm)?;
    /// let fds = setup::create_vcpus(&kvm, &vm, 2)?;
    /// let parts = KvmParts::with_vcpu_threads(&kvm, vm, &fds)?;
    /// for (i, mut fd) in fds.into_iter().enumerate() {
    ///     let gate = parts.gate().clone();
    ///     std::thread::spawn(move || {
    ///         // SAFETY: `fd` outlives `pauser`, both dropped on this thread.
    ///         let Ok(mut pauser) = (unsafe { gate.attach(i, &mut fd) }) else { return };
    ///         while pauser.before_run_serving(&fd) { // parked: runs the gate's requests on fd
    ///             let exit = fd.run();
    ///             pauser.after_run(&exit);
    ///             match exit { /* port I/O, MMIO, … */ _ => {} }
    ///         }
    ///     });
    /// }
    /// // The gate starts paused: the state methods run on the threads now.
    /// let sections = parts.save_state(&[])?;
    /// # let _ = sections; Ok(()) }
    /// ```
    pub fn with_vcpu_threads(kvm: &Kvm, vm: VmFd, vcpus: &[VcpuFd]) -> Result<Self, KvmVmError> {
        let kvm_err = |op| move |source| KvmVmError::Kvm { op, source };
        let cpuid = supported_cpuid(kvm).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let tsc_khz = match vcpus.first() {
            Some(fd) => fd.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?,
            None => return Err(KvmVmError::Config("no vCPUs".into())),
        };
        Ok(KvmParts {
            vm,
            gate: PauseGate::new(vcpus.len())?,
            vcpus: Vcpus::OnThreads(vcpus.len()),
            msrs: msr_indices(kvm)?.into(),
            cpuid_hash: hash_cpuid(&cpuid),
            tsc_khz,
        })
    }

    /// The VM fd (memory slots, irqfds, the dirty tracker).
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// vCPU `index`'s fd. Its thread locks it around each `KVM_RUN` and
    /// not while parked; everyone else locks it only while paused. `None`
    /// for parts made with [`KvmParts::with_vcpu_threads`] (the threads
    /// have the fds: reach them with [`PauseGate::on_vcpu_threads`]).
    pub fn vcpu(&self, index: usize) -> Option<&Arc<Mutex<VcpuFd>>> {
        match &self.vcpus {
            Vcpus::Shared(v) => v.get(index),
            Vcpus::OnThreads(_) => None,
        }
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        match &self.vcpus {
            Vcpus::Shared(v) => v.len(),
            Vcpus::OnThreads(n) => *n,
        }
    }

    /// The gate the vCPU threads follow (see [`crate::pause`]).
    pub fn gate(&self) -> &PauseGate {
        &self.gate
    }

    /// The guest's TSC rate in kHz, read when these parts were made (or
    /// set by [`KvmParts::check_incoming`]).
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// The VM's description for the handshake: `layout` (from the VMM's
    /// memory), the vCPU count, `nics`, and the KVM properties
    /// ([`crate::cpu::properties`]).
    pub fn describe(&self, layout: MemoryLayout, nics: Vec<NicInfo>) -> VmDescription {
        VmDescription {
            layout,
            vcpus: self.vcpu_count() as u32,
            nics,
            properties: self.properties(),
        }
    }

    /// The KVM properties of [`KvmParts::describe`].
    pub fn properties(&self) -> BTreeMap<String, String> {
        properties(self.cpuid_hash, self.tsc_khz)
    }

    /// For a destination, in the closure passed to `livemig::receive`:
    /// refuses a source with another vCPU count, other CPU features or a
    /// TSC rate this host cannot give ([`check_properties`]), and scales
    /// the vCPUs' TSC to the source's where KVM can
    /// ([`crate::cpu::adopt_tsc_khz`]). The memory layout is the VMM's to
    /// check (`livemig::vm::check_layout`).
    pub fn check_incoming(&mut self, desc: &VmDescription) -> Result<TscPlan, VmError> {
        let n = self.vcpu_count();
        if desc.vcpus as usize != n {
            return Err(VmError::Incompatible(format!(
                "vCPU count differs: source {}, destination {n}",
                desc.vcpus
            )));
        }
        check_properties(desc)?;
        let plan = match &self.vcpus {
            Vcpus::Shared(v) => {
                let fds: Vec<_> = v.iter().map(|v| locked(v)).collect();
                let refs: Vec<&VcpuFd> = fds.iter().map(|g| &**g).collect();
                adopt_tsc_khz(&self.vm, &refs, self.tsc_khz, desc)?
            }
            Vcpus::OnThreads(_) => {
                threads::adopt_tsc_khz(&self.gate, &self.vm, self.tsc_khz, desc)?
            }
        };
        if let TscPlan::Scale(khz) = plan {
            self.tsc_khz = khz;
        }
        Ok(plan)
    }

    /// Pauses every vCPU thread ([`PauseGate::pause`]): returns once each
    /// is parked with no exit pending.
    pub fn pause(&self) -> Result<(), VmError> {
        self.gate
            .pause()
            .map_err(|e| VmError::failed(VmOp::Pause, "parking the vCPUs", e))
    }

    /// Lets the vCPU threads run; refused if a vCPU stopped for good.
    pub fn resume(&self) -> Result<(), VmError> {
        self.resume_then(&mut || {})
    }

    /// [`KvmParts::resume`], calling `started` once nothing can fail any
    /// more, right before the vCPU threads are woken: what a VMM's
    /// `DestinationVm::resume_then` needs, so that the engine's `Resumed`
    /// is on its way before any vCPU thread competes for a CPU.
    pub fn resume_then(&self, started: &mut dyn FnMut()) -> Result<(), VmError> {
        if let Some(e) = self.gate.fatal() {
            return Err(VmError::failed(VmOp::Resume, "a vCPU stopped for good", e));
        }
        started();
        self.gate.resume();
        Ok(())
    }

    /// Whether the vCPUs are held parked.
    pub fn is_paused(&self) -> bool {
        !self.gate.is_running()
    }

    /// Every vCPU's, the VM-wide and `devices`' sections
    /// ([`crate::state::save_all`]). Refused while the vCPUs run. With
    /// [`KvmParts::with_vcpu_threads`], each vCPU is saved on its thread
    /// ([`threads::save_all`]).
    pub fn save_state(&self, devices: &[&dyn DeviceState]) -> Result<Vec<Section>, VmError> {
        if self.gate.is_running() {
            return Err(VmError::Pause(
                "save_state called while the vCPUs run".into(),
            ));
        }
        match &self.vcpus {
            Vcpus::Shared(v) => {
                let fds: Vec<_> = v.iter().map(|v| locked(v)).collect();
                let refs: Vec<&VcpuFd> = fds.iter().map(|g| &**g).collect();
                Ok(save_all(&self.vm, &refs, &self.msrs, devices)?)
            }
            Vcpus::OnThreads(_) => threads::save_all(&self.gate, &self.vm, &self.msrs, devices),
        }
    }

    /// Restores what [`KvmParts::save_state`] saved, in KVM's order
    /// ([`crate::state::restore_all`]). Refused while the vCPUs run. With
    /// [`KvmParts::with_vcpu_threads`], each vCPU is restored on its
    /// thread ([`threads::restore_all`]).
    pub fn restore_state(
        &self,
        sections: &[Section],
        devices: &mut [&mut dyn DeviceState],
    ) -> Result<(), VmError> {
        if self.gate.is_running() {
            return Err(VmError::State(StateError::Malformed {
                name: "vm".into(),
                reason: "restore while running".into(),
            }));
        }
        match &self.vcpus {
            Vcpus::Shared(v) => {
                let fds: Vec<_> = v.iter().map(|v| locked(v)).collect();
                let refs: Vec<&VcpuFd> = fds.iter().map(|g| &**g).collect();
                Ok(restore_all(&self.vm, &refs, devices, sections)?)
            }
            Vcpus::OnThreads(n) => {
                threads::restore_all(&self.gate, &self.vm, *n, devices, sections)
            }
        }
    }
}

/// Auto-converge parks and releases the vCPU threads through the gate.
impl VcpuThrottle for KvmParts {
    fn pause_vcpus(&self) -> Result<(), VmError> {
        self.pause()
    }

    fn resume_vcpus(&self) -> Result<(), VmError> {
        self.gate.resume();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::setup::{create_vcpus, create_vm};
    use crate::vm::x86_layout;

    fn parts(kvm: &Kvm, vcpus: u32) -> KvmParts {
        let vm = create_vm(kvm).unwrap();
        let fds = create_vcpus(kvm, &vm, vcpus).unwrap();
        KvmParts::new(kvm, vm, fds).unwrap()
    }

    /// What one `KvmParts` saves (no vCPU thread has run: the gate starts
    /// paused) restores into another after `check_incoming` accepted its
    /// description; a description with another vCPU count is refused.
    #[test]
    fn state_moves_between_two_parts() {
        if !crate::kvm_or_skip("state_moves_between_two_parts") {
            return;
        }
        let kvm = Kvm::new().unwrap();
        let src = parts(&kvm, 2);
        let mut regs = locked(src.vcpu(1).unwrap()).get_regs().unwrap();
        regs.rdx = 0xabcd;
        locked(src.vcpu(1).unwrap()).set_regs(&regs).unwrap();
        let desc = src.describe(x86_layout(2 << 20).unwrap(), vec![]);
        assert_eq!(desc.vcpus, 2);
        let sections = src.save_state(&[]).unwrap();

        let mut dst = parts(&kvm, 2);
        dst.check_incoming(&desc).expect("same host, same shape");
        dst.restore_state(&sections, &mut []).unwrap();
        assert_eq!(locked(dst.vcpu(1).unwrap()).get_regs().unwrap().rdx, 0xabcd);

        let e = parts(&kvm, 1).check_incoming(&desc).unwrap_err();
        assert!(e.to_string().contains("vCPU count differs"), "{e}");
    }

    /// State is refused while the gate lets the vCPUs run.
    #[test]
    fn state_is_refused_while_running() {
        if !crate::kvm_or_skip("state_is_refused_while_running") {
            return;
        }
        let kvm = Kvm::new().unwrap();
        let p = parts(&kvm, 1);
        p.gate().resume();
        assert!(!p.is_paused());
        assert!(p.save_state(&[]).is_err());
        assert!(p.restore_state(&[], &mut []).is_err());
    }
}
