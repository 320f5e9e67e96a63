//! A KVM virtual machine: guest memory, in-kernel irqchip and PIT, vCPU
//! threads, dirty tracking and state sections. It implements livemig's
//! [`SourceVm`] and [`DestinationVm`] seams.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use livemig::memory::{GuestMemory, GuestRam, MemoryLayout, RegionDesc};
use livemig::state::{DeviceState, Section, StateError};
use livemig::vm::{
    DestinationVm, DirtyTracker, NicInfo, RestoreRehearsal, SourceVm, VcpuThrottle, VmDescription,
    VmError, VmOp,
};

use crate::cpu::{
    hash_cpuid, host_tsc_khz, properties, set_vcpu_tsc_khz, source_tsc_khz, supported_cpuid,
    CPUID_PROPERTY,
};
use crate::dirty::{turn_off_left_on, DirtyMode, DirtyRing, KvmDirtyTracker, Slot};
use crate::memfd::{allocate_memory, MemoryBackend, MemoryOptions};
use crate::pool::Pool;
use crate::prepared::PreparedVm;
use crate::setup::{create_vcpus, msr_indices};
use crate::state::{
    check_sections, find_section, kvm_section_names, restore_vcpu, restore_vm_before_vcpus,
    restore_vm_last, save_vcpu, save_vm, vcpu_section_name,
};
use crate::vcpu::{ExitHandler, VcpuError, VcpuSet};

/// Start of the PCI hole on x86: RAM beyond this moves above 4 GiB.
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// Where RAM continues after the hole.
pub const HIGH_RAM_START: u64 = 4 << 30;
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 64;
/// The [`VmDescription::properties`] key of the guest's TSC frequency in
/// kHz (decimal), as `KVM_GET_TSC_KHZ` reports it on the source.
pub const TSC_KHZ_PROPERTY: &str = "kvm.tsc_khz";
/// Largest difference between the source's and the destination's TSC
/// frequency, in parts per million of the source's, that is taken as equal:
/// KVM's own default (`kvm.tsc_tolerance_ppm`), below which KVM itself does
/// not scale.
pub const TSC_TOLERANCE_PPM: u64 = 250;

/// Errors creating or driving a KVM VM.
#[derive(Debug, thiserror::Error)]
pub enum KvmVmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{op}: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The configuration is invalid.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// Allocating guest memory failed.
    #[error("allocating guest memory: {0}")]
    Memory(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// A vCPU error.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Setting up the dirty ring failed.
    #[error(transparent)]
    Ring(#[from] crate::dirty::RingError),
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmVmError {
    move |source| KvmVmError::Kvm { op, source }
}

/// A device registered with the VM for state save/restore.
pub type SharedDevice = Arc<Mutex<dyn DeviceState + Send>>;

/// How to build a VM.
#[derive(Clone)]
pub struct VmConfig {
    /// Guest memory in bytes (a multiple of 4 KiB).
    pub memory: u64,
    /// Number of vCPUs (1..=[`MAX_VCPUS`]).
    pub vcpus: u32,
    /// The VM's NICs (announced after migration).
    pub nics: Vec<NicInfo>,
    /// Dirty-tracking mode; `None` picks manual-protect where KVM offers it.
    pub dirty_mode: Option<DirtyMode>,
}

/// The standard x86 layout for `bytes` of RAM: below 3 GiB in one region,
/// the rest above 4 GiB.
pub fn x86_layout(bytes: u64) -> Result<MemoryLayout, KvmVmError> {
    if bytes == 0 || !bytes.is_multiple_of(4096) {
        return Err(KvmVmError::Config(format!(
            "memory size {bytes} must be a non-zero multiple of 4 KiB"
        )));
    }
    let mut regions = vec![RegionDesc {
        guest_addr: 0,
        size: bytes.min(MMIO_HOLE_START),
    }];
    if bytes > MMIO_HOLE_START {
        regions.push(RegionDesc {
            guest_addr: HIGH_RAM_START,
            size: bytes - MMIO_HOLE_START,
        });
    }
    MemoryLayout::new(regions).map_err(|e| KvmVmError::Config(e.to_string()))
}

/// A KVM VM with its vCPU threads.
pub struct KvmVm {
    kvm: Kvm,
    vm: VmFd,
    memory: GuestRam,
    slots: Vec<Slot>,
    vcpus: VcpuSet,
    devices: Vec<SharedDevice>,
    dirty_mode: DirtyMode,
    ring: Option<Arc<DirtyRing>>,
    nics: Vec<NicInfo>,
    cpuid_hash: u64,
    /// The guest's TSC frequency in kHz (0: KVM could not say), read before
    /// the vCPU threads start (a running vCPU's fd is locked inside
    /// `KVM_RUN`) and updated by [`KvmVm::adopt_tsc_khz`].
    tsc_khz: AtomicU32,
    /// Helpers that save or restore the vCPUs' state beside the calling
    /// thread: one fewer than the host's CPUs (each vCPU's ioctls are CPU
    /// work in the kernel, so a thread per vCPU only adds thread start-up
    /// and contention), sharing the vCPUs by claiming (see [`Pool`]).
    state_pool: Pool,
    /// The vCPUs' MSR list, shared with the state helpers.
    msr_list: Arc<Vec<u32>>,
    /// A completed outgoing migration left dirty logging on (see
    /// [`DirtyTracker::stop_migrated`]): turned off before the vCPUs run
    /// again or a new tracker starts.
    dirty_left_on: AtomicBool,
}

impl KvmVm {
    /// Creates a VM with in-kernel irqchip and PIT, guest memory for
    /// `config.memory` (private anonymous, advised for transparent huge
    /// pages: [`KvmVm::create_with_backend`] chooses), and paused vCPU threads whose exits go to `handler`.
    /// `devices` are saved and restored with the VM.
    pub fn create(
        config: &VmConfig,
        handler: Arc<dyn ExitHandler>,
        devices: Vec<SharedDevice>,
    ) -> Result<Self, KvmVmError> {
        Self::create_with_backend(config, MemoryBackend::Anonymous, handler, devices)
    }

    /// Like [`KvmVm::create`], with guest memory built as `memory` says: a
    /// [`MemoryBackend`] (advised for transparent huge pages), or
    /// [`MemoryOptions`] with the THP advice chosen (see [`crate::memfd`]
    /// and [`crate::thp`]).
    pub fn create_with_backend(
        config: &VmConfig,
        memory: impl Into<MemoryOptions>,
        handler: Arc<dyn ExitHandler>,
        devices: Vec<SharedDevice>,
    ) -> Result<Self, KvmVmError> {
        check_vcpus(config)?;
        let layout = x86_layout(config.memory)?;
        let options = memory.into();
        let (memory, pages) =
            allocate_memory(&layout, options).map_err(|e| KvmVmError::Memory(e.into()))?;
        log::info!(
            "guest memory: {}, THP {}: {pages:?} pages",
            options.backend,
            options.thp
        );
        Self::create_with_memory(config, memory, handler, devices)
    }

    /// Like [`KvmVm::create`], over `memory` the caller built (for a
    /// same-host hand-over: the source's memfds, mapped shared, see
    /// [`crate::memfd::map_shared`]). Its layout must be
    /// [`x86_layout`]`(config.memory)`'s; the memory is not written.
    pub fn create_with_memory(
        config: &VmConfig,
        memory: GuestRam,
        handler: Arc<dyn ExitHandler>,
        devices: Vec<SharedDevice>,
    ) -> Result<Self, KvmVmError> {
        check_vcpus(config)?;
        let prepared = PreparedVm::with_memory(config.memory, memory, config.dirty_mode)?;
        Self::create_prepared(config, prepared, handler, devices)
    }

    /// Like [`KvmVm::create`], on a VM made ahead ([`PreparedVm`]: its
    /// memory already registered). Its memory must be `config.memory`
    /// bytes and made for the dirty mode `config` asks for.
    pub fn create_prepared(
        config: &VmConfig,
        prepared: PreparedVm,
        handler: Arc<dyn ExitHandler>,
        devices: Vec<SharedDevice>,
    ) -> Result<Self, KvmVmError> {
        check_vcpus(config)?;
        if prepared.bytes != config.memory {
            return Err(KvmVmError::Config(format!(
                "the prepared VM has {} bytes of memory, not {}",
                prepared.bytes, config.memory
            )));
        }
        if config.dirty_mode != prepared.asked {
            return Err(KvmVmError::Config(format!(
                "the prepared VM was made for dirty mode {:?}, not {:?}",
                prepared.asked, config.dirty_mode
            )));
        }
        let PreparedVm {
            kvm,
            vm,
            memory,
            slots,
            dirty_mode,
            ..
        } = prepared;
        let t0 = std::time::Instant::now();
        let cpuid = supported_cpuid(&kvm).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let cpuid_hash = hash_cpuid(&cpuid);
        let t_cpuid = t0.elapsed();
        let fds = create_vcpus(&kvm, &vm, config.vcpus)?;
        let t_vcpus = t0.elapsed();
        let msr_indices = msr_indices(&kvm)?;
        let tsc_khz = match fds.first().map(VcpuFd::get_tsc_khz) {
            Some(Ok(khz)) => khz,
            Some(Err(e)) => {
                log::warn!(
                    "KVM_GET_TSC_KHZ: {e}; the VM's description will not carry its TSC frequency"
                );
                0
            }
            None => 0,
        };
        let ring = match dirty_mode {
            DirtyMode::Ring { entries } => {
                Some(Arc::new(DirtyRing::new(&vm, &fds, entries, &slots)?))
            }
            _ => None,
        };
        let t_ring = t0.elapsed();
        let vcpus = VcpuSet::spawn_with_ring(fds, handler, ring.clone())?;
        log::debug!(
            "prepared VM completed in {:.2} ms: CPUID by {:.2} ms, vCPUs created by {:.2} ms, \
             MSR list and rings by {:.2} ms, then the vCPU threads",
            ms(t0.elapsed()),
            ms(t_cpuid),
            ms(t_vcpus),
            ms(t_ring),
        );
        Ok(KvmVm {
            kvm,
            vm,
            memory,
            slots,
            vcpus,
            devices,
            dirty_mode,
            ring,
            nics: config.nics.clone(),
            cpuid_hash,
            tsc_khz: AtomicU32::new(tsc_khz),
            state_pool: Pool::new(std::thread::available_parallelism().map_or(1, |n| n.get()) - 1),
            msr_list: Arc::new(msr_indices),
            dirty_left_on: AtomicBool::new(false),
        })
    }

    /// Guest memory as vm-memory's `GuestMemoryMmap` (the version
    /// `livemig::vm_memory` re-exports): load a kernel and let devices
    /// write through it, so their writes are in its dirty bitmap, which the
    /// engine drains ([`GuestMemory::take_vmm_dirty`]).
    pub fn ram(&self) -> &GuestRam {
        &self.memory
    }

    /// The KVM VM file descriptor (to register irqfds, ioeventfds, ...).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The vCPU set.
    pub fn vcpus(&self) -> &VcpuSet {
        &self.vcpus
    }

    /// The dirty-tracking mode in use.
    pub fn dirty_mode(&self) -> DirtyMode {
        self.dirty_mode
    }

    /// The vCPUs' dirty rings, in [`DirtyMode::Ring`].
    pub fn dirty_ring(&self) -> Option<&DirtyRing> {
        self.ring.as_deref()
    }

    /// A dirty tracker over all of guest memory (the same one
    /// [`SourceVm::dirty_tracker`] returns, with its concrete type).
    ///
    /// After a completed migration it leaves dirty logging on
    /// ([`DirtyTracker::stop_migrated`]); the VM turns it off before its
    /// vCPUs run again ([`KvmVm::resume_vcpus`], [`SourceVm::resume`]) and
    /// a new tracker turns it off before it starts. Dropping the VM frees
    /// it with the memory slots.
    pub fn kvm_dirty_tracker(&self) -> KvmDirtyTracker<'_> {
        KvmDirtyTracker::new(&self.vm, &self.slots, self.dirty_mode, self.ring.as_deref())
            .with_left_on(&self.dirty_left_on)
    }

    /// Whether a completed migration left dirty logging on (it is turned
    /// off before the vCPUs run again).
    pub fn dirty_logging_left_on(&self) -> bool {
        self.dirty_left_on.load(Ordering::SeqCst)
    }

    /// Turns off the dirty logging a completed migration left on, before
    /// the vCPUs run again.
    fn logging_off_if_left_on(&self) -> Result<(), VmError> {
        turn_off_left_on(
            &self.vm,
            &self.slots,
            self.ring.as_deref(),
            &self.dirty_left_on,
        )
    }

    /// The guest's TSC frequency in kHz as KVM reported it when the VM was
    /// created (the host's, unless [`KvmVm::adopt_tsc_khz`] scaled it).
    /// Does not touch the vCPUs, so it answers while they run.
    pub fn tsc_khz(&self) -> Result<u32, KvmVmError> {
        match self.tsc_khz.load(Ordering::Relaxed) {
            0 => Err(KvmVmError::Config(
                "KVM_GET_TSC_KHZ failed when the VM was created".into(),
            )),
            khz => Ok(khz),
        }
    }

    /// Gives this (destination) VM the TSC frequency of the source VM
    /// described by `desc`, so the guest's clock keeps its rate.
    ///
    /// Call it on a VM created for an incoming migration, before its state
    /// is restored (in the closure passed to `livemig::Reception::run`, after
    /// [`check_properties`]). Equal rates (within [`TSC_TOLERANCE_PPM`])
    /// need nothing. Otherwise, where KVM offers `KVM_CAP_TSC_CONTROL`,
    /// every vCPU is set to the source's rate with `KVM_SET_TSC_KHZ` (and
    /// read back); where it does not, the VM is refused with
    /// [`VmError::Incompatible`] naming both rates. The vCPUs must be
    /// paused (they are until the engine resumes the VM).
    pub fn adopt_tsc_khz(&self, desc: &VmDescription) -> Result<TscPlan, VmError> {
        let Some(source) = source_tsc_khz(desc)? else {
            return Ok(TscPlan::Matches);
        };
        let ours = self
            .tsc_khz()
            .map_err(|e| VmError::failed(VmOp::Incompatible, "this host's TSC frequency", e))?;
        let can_scale = self.vm.check_extension(Cap::TscControl);
        let plan = check_tsc_khz(source, ours, can_scale)?;
        if let TscPlan::Scale(khz) = plan {
            self.set_tsc_khz(khz)?;
        }
        Ok(plan)
    }

    /// Sets every (paused) vCPU's TSC frequency and checks that it took.
    fn set_tsc_khz(&self, khz: u32) -> Result<(), VmError> {
        for i in 0..self.vcpus.len() {
            self.with_vcpu(i, |fd| set_vcpu_tsc_khz(fd, khz))
                .map_err(|e| VmError::failed(VmOp::Incompatible, format!("vCPU {i}"), e))??;
        }
        self.tsc_khz.store(khz, Ordering::Relaxed);
        Ok(())
    }

    /// Whether the vCPUs are held parked: paused through
    /// [`KvmVm::pause_vcpus`], [`SourceVm::pause`] or the throttle, or
    /// created and not resumed yet. It does not say who paused them (an
    /// operator, the engine's stop-and-copy or auto-converge): a caller that
    /// needs to know whether the operator paused the VM must read it before
    /// pausing the VM itself. A VM whose vCPU stopped fatally is not
    /// "paused" here (see [`VcpuSet::fatal`](crate::vcpu::VcpuSet::fatal)).
    pub fn is_paused(&self) -> bool {
        !self.vcpus.is_running()
    }

    /// Runs `f` on vCPU `index`'s fd. The VM must be paused.
    pub fn with_vcpu<R>(
        &self,
        index: usize,
        f: impl FnOnce(&VcpuFd) -> R,
    ) -> Result<R, KvmVmError> {
        if self.vcpus.is_running() {
            return Err(KvmVmError::Config(
                "vCPU access while running; pause first".into(),
            ));
        }
        let v = self
            .vcpus
            .vcpu(index)
            .ok_or_else(|| KvmVmError::Config(format!("no vCPU {index}")))?;
        let fd = v.lock().unwrap_or_else(|e| e.into_inner());
        Ok(f(&fd))
    }

    /// Runs `f` on every vCPU's fd (the vCPUs must be paused) and returns
    /// the results in vCPU order: on the calling thread and the state
    /// helpers, each taking the next vCPU until none is left (a helper that
    /// is slow to get a CPU leaves its share to the caller).
    fn on_each_vcpu<R: Send + 'static>(
        &self,
        f: impl Fn(usize, &VcpuFd) -> R + Send + Sync + 'static,
    ) -> Vec<R> {
        let fds: Vec<Arc<Mutex<VcpuFd>>> = (0..self.vcpus.len())
            .filter_map(|i| self.vcpus.vcpu(i).cloned())
            .collect();
        self.state_pool.run(fds.len(), move |i| {
            let fd = fds[i].lock().unwrap_or_else(|e| e.into_inner());
            f(i, &fd)
        })
    }

    /// Threads [`KvmVm`] uses to save or restore vCPU state at once (the
    /// caller and its helpers).
    pub fn state_workers(&self) -> usize {
        self.state_pool.helpers() + 1
    }

    /// Pauses every vCPU.
    pub fn pause_vcpus(&self) -> Result<(), KvmVmError> {
        Ok(self.vcpus.pause()?)
    }

    /// Resumes every vCPU (turning off first the dirty logging a completed
    /// migration left on; should that fail, the guest runs with it, only
    /// slower, and the error is logged).
    pub fn resume_vcpus(&self) {
        if let Err(e) = self.logging_off_if_left_on() {
            log::error!("turning dirty logging off before resuming: {e}");
        }
        self.vcpus.resume()
    }

    /// Blocks until a vCPU stops fatally (guest shutdown), up to `timeout`.
    pub fn wait_fatal(&self, timeout: Duration) -> Option<VcpuError> {
        self.vcpus.wait_fatal(timeout)
    }

    fn properties(&self) -> BTreeMap<String, String> {
        properties(self.cpuid_hash, self.tsc_khz.load(Ordering::Relaxed))
    }
}

impl SourceVm for KvmVm {
    fn memory(&self) -> &dyn GuestMemory {
        &self.memory
    }

    fn describe(&self) -> Result<VmDescription, VmError> {
        Ok(VmDescription {
            layout: MemoryLayout::of(&self.memory)
                .map_err(|e| VmError::failed(VmOp::Incompatible, "guest memory layout", e))?,
            vcpus: self.vcpus.len() as u32,
            nics: self.nics.clone(),
            properties: self.properties(),
        })
    }

    fn dirty_tracker(&self) -> Result<Box<dyn DirtyTracker + '_>, VmError> {
        Ok(Box::new(self.kvm_dirty_tracker()))
    }

    fn pause(&self) -> Result<(), VmError> {
        self.vcpus
            .pause()
            .map_err(|e| VmError::failed(VmOp::Pause, "parking the vCPUs", e))
    }

    fn resume(&self) -> Result<(), VmError> {
        if let Some(e) = self.vcpus.fatal() {
            return Err(VmError::failed(VmOp::Resume, "a vCPU stopped for good", e));
        }
        self.logging_off_if_left_on()?;
        self.vcpus.resume();
        Ok(())
    }

    fn is_paused(&self) -> bool {
        KvmVm::is_paused(self)
    }

    fn save_state(&self) -> Result<Vec<Section>, VmError> {
        if self.vcpus.is_running() {
            return Err(VmError::Pause(
                "save_state called while the vCPUs run".into(),
            ));
        }
        // Each vCPU's ioctls are independent: spread them over the CPUs.
        let msrs = self.msr_list.clone();
        let mut sections = Vec::with_capacity(self.vcpus.len() + 3 + self.devices.len());
        for r in self.on_each_vcpu(move |i, fd| save_vcpu(i, fd, &msrs)) {
            sections.push(r?);
        }
        sections.extend(save_vm(&self.vm)?);
        for d in &self.devices {
            let d = d.lock().unwrap_or_else(|e| e.into_inner());
            sections.push(d.save_section()?);
        }
        Ok(sections)
    }

    fn throttle(&self) -> Option<&dyn VcpuThrottle> {
        Some(self)
    }
}

impl VcpuThrottle for KvmVm {
    fn pause_vcpus(&self) -> Result<(), VmError> {
        self.vcpus
            .pause()
            .map_err(|e| VmError::failed(VmOp::Pause, "parking the vCPUs (throttle)", e))
    }

    fn resume_vcpus(&self) -> Result<(), VmError> {
        self.logging_off_if_left_on()?;
        self.vcpus.resume();
        Ok(())
    }
}

impl DestinationVm for KvmVm {
    fn memory(&self) -> &dyn GuestMemory {
        &self.memory
    }

    fn restore_state(&mut self, sections: &[Section]) -> Result<(), VmError> {
        if self.vcpus.is_running() {
            return Err(VmError::State(StateError::Malformed {
                name: "vm".into(),
                reason: "restore while running".into(),
            }));
        }
        // The same steps as `state::restore_all`, with the vCPUs spread
        // over the state helpers.
        let mut expected = kvm_section_names(self.vcpus.len());
        for d in &self.devices {
            expected.push(d.lock().unwrap_or_else(|e| e.into_inner()).section_name());
        }
        check_sections(sections, &expected)?;
        restore_vm_before_vcpus(&self.vm, sections)?;
        let mut mine: Vec<Section> = Vec::with_capacity(self.vcpus.len());
        for i in 0..self.vcpus.len() {
            mine.push(find_section(sections, &vcpu_section_name(i))?.clone());
        }
        let mine = Arc::new(mine);
        let restored = self.on_each_vcpu(move |i, fd| restore_vcpu(fd, &mine[i]));
        for r in restored {
            r?;
        }
        for d in &self.devices {
            let mut d = d.lock().unwrap_or_else(|e| e.into_inner());
            let name = d.section_name();
            d.restore_section(find_section(sections, &name)?)?;
        }
        Ok(restore_vm_last(&self.vm, sections)?)
    }

    /// Saves this not-yet-running VM's state (vCPUs, VM-wide, devices),
    /// timing the save, and times restoring exactly that: the same ioctls
    /// on the same helpers as the switchover's save and restore, loading
    /// the values the VM already has (no guest memory is written; the
    /// switchover's restore loads the source's state over them).
    fn rehearse_restore(&mut self) -> Result<Option<RestoreRehearsal>, VmError> {
        let t = Instant::now();
        let sections = SourceVm::save_state(self)?;
        let save = t.elapsed();
        let t = Instant::now();
        DestinationVm::restore_state(self, &sections)?;
        Ok(Some(RestoreRehearsal {
            save,
            restore: t.elapsed(),
        }))
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.resume_then(&mut || {})
    }

    /// Turns dirty logging off if still on (the only step that can fail),
    /// calls `started`, then wakes the vCPU threads (which cannot fail):
    /// the engine's `Resumed` is on its way before any vCPU thread competes
    /// with the engine's thread for a CPU.
    fn resume_then(&mut self, started: &mut dyn FnMut()) -> Result<(), VmError> {
        self.logging_off_if_left_on()?;
        started();
        self.vcpus.resume();
        Ok(())
    }

    /// `true`: before `started`, [`KvmVm::resume_then`] only checks that
    /// dirty logging is off (a destination never turns it on); the vCPU
    /// threads are woken after it.
    fn started_before_wake(&self) -> bool {
        true
    }
}

/// Checks that a destination built with `config` can host the VM described
/// by `desc` (layout, vCPU count, CPU features).
pub fn check_compatible(desc: &VmDescription, config: &VmConfig) -> Result<(), VmError> {
    let layout = x86_layout(config.memory)
        .map_err(|e| VmError::failed(VmOp::Incompatible, "this destination's memory size", e))?;
    if layout != desc.layout {
        return Err(VmError::Incompatible(format!(
            "memory differs: source has {} MiB in {:?}, this destination is configured for {} MiB in {:?}",
            desc.layout.total_bytes() >> 20,
            desc.layout.regions(),
            layout.total_bytes() >> 20,
            layout.regions()
        )));
    }
    if desc.vcpus != config.vcpus {
        return Err(VmError::Incompatible(format!(
            "vCPU count differs: source {}, destination {}",
            desc.vcpus, config.vcpus
        )));
    }
    Ok(())
}

/// Checks the source's KVM properties against this host's: the CPU
/// features (`kvm.cpuid`) must be equal, and the guest's TSC frequency
/// ([`TSC_KHZ_PROPERTY`]) must be this host's (within
/// [`TSC_TOLERANCE_PPM`]) unless this host's KVM can scale a guest's TSC
/// (`KVM_CAP_TSC_CONTROL`); then the VMM must call
/// [`KvmVm::adopt_tsc_khz`] on the VM it creates. Run it in the closure
/// passed to `livemig::Reception::run`, so a mismatch is refused in the handshake,
/// before any page is sent.
pub fn check_properties(desc: &VmDescription) -> Result<(), VmError> {
    let kvm = Kvm::new().map_err(|e| VmError::failed(VmOp::Create, "opening /dev/kvm", e))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmError::failed(VmOp::Create, "KVM_GET_SUPPORTED_CPUID", e))?;
    let ours = format!("{:016x}", hash_cpuid(&cpuid));
    match desc.properties.get(CPUID_PROPERTY) {
        Some(theirs) if *theirs == ours => {}
        Some(theirs) => {
            return Err(VmError::Incompatible(format!(
                "CPU features differ (source CPUID hash {theirs}, destination {ours})"
            )))
        }
        None => {
            return Err(VmError::Incompatible(
                "source did not describe its CPU features (kvm.cpuid)".into(),
            ))
        }
    }
    let Some(source) = source_tsc_khz(desc)? else {
        return Ok(());
    };
    let host = host_tsc_khz(&kvm)?;
    check_tsc_khz(source, host, kvm.check_extension(Cap::TscControl)).map(|_| ())
}

/// What a destination must do about the source's TSC frequency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TscPlan {
    /// The rates are equal within [`TSC_TOLERANCE_PPM`]: nothing.
    Matches,
    /// Set the destination's vCPUs to this rate (kHz) with `KVM_SET_TSC_KHZ`.
    Scale(u32),
}

/// Decides what to do about a guest TSC of `source_khz` on a destination
/// whose vCPUs run at `dest_khz`, where `can_scale` says whether the
/// destination's KVM can scale a guest's TSC (`KVM_CAP_TSC_CONTROL`).
///
/// Rates within [`TSC_TOLERANCE_PPM`] of the source's match; other rates
/// need scaling, and without it the migration is refused: the guest
/// calibrated its clock to the source's rate and would see time run at
/// `dest / source` times the real speed.
pub fn check_tsc_khz(source_khz: u32, dest_khz: u32, can_scale: bool) -> Result<TscPlan, VmError> {
    if source_khz == 0 {
        return Err(VmError::Incompatible(
            "the source's TSC frequency is 0 kHz".into(),
        ));
    }
    let diff = u64::from(source_khz.abs_diff(dest_khz));
    if diff * 1_000_000 <= TSC_TOLERANCE_PPM * u64::from(source_khz) {
        return Ok(TscPlan::Matches);
    }
    if can_scale {
        return Ok(TscPlan::Scale(source_khz));
    }
    Err(VmError::Incompatible(format!(
        "TSC frequency differs: source {source_khz} kHz, destination {dest_khz} kHz \
         (more than {TSC_TOLERANCE_PPM} ppm apart), and this host's KVM cannot scale a \
         guest's TSC (no KVM_CAP_TSC_CONTROL): the guest's clock would run at the wrong rate"
    )))
}

/// A vCPU count `KvmVm` can make: 1 ..= [`MAX_VCPUS`].
fn check_vcpus(config: &VmConfig) -> Result<(), KvmVmError> {
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(KvmVmError::Config(format!(
            "{} vCPUs: must be between 1 and {MAX_VCPUS}",
            config.vcpus
        )));
    }
    Ok(())
}

/// Milliseconds, for the debug log.
fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{hash_cpuid, host_tsc_khz};

    fn desc(props: &[(&str, &str)]) -> VmDescription {
        VmDescription {
            layout: x86_layout(64 << 20).unwrap(),
            vcpus: 1,
            nics: vec![],
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn layout_and_vcpus_must_match() {
        let cfg = VmConfig {
            memory: 64 << 20,
            vcpus: 1,
            nics: vec![],
            dirty_mode: None,
        };
        assert!(check_compatible(&desc(&[]), &cfg).is_ok());
        let e = check_compatible(
            &desc(&[]),
            &VmConfig {
                memory: 128 << 20,
                ..cfg.clone()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("memory differs"), "{e}");
        let e = check_compatible(&desc(&[]), &VmConfig { vcpus: 2, ..cfg }).unwrap_err();
        assert!(e.to_string().contains("vCPU count differs"), "{e}");
    }

    #[test]
    fn foreign_cpu_features_are_refused() {
        if !crate::kvm_or_skip("foreign_cpu_features_are_refused") {
            return;
        }
        let e = check_properties(&desc(&[("kvm.cpuid", "0123456789abcdef")])).unwrap_err();
        assert!(e.to_string().contains("CPU features differ"), "{e}");
        let e = check_properties(&desc(&[])).unwrap_err();
        assert!(e.to_string().contains("kvm.cpuid"), "{e}");
    }

    #[test]
    fn tsc_rates_within_the_tolerance_match() {
        assert_eq!(
            check_tsc_khz(2_445_404, 2_445_404, false).unwrap(),
            TscPlan::Matches
        );
        // 250 ppm of 2 445 404 kHz is 611 kHz.
        assert_eq!(
            check_tsc_khz(2_445_404, 2_446_015, false).unwrap(),
            TscPlan::Matches
        );
        assert_eq!(
            check_tsc_khz(2_445_404, 2_444_793, false).unwrap(),
            TscPlan::Matches
        );
    }

    #[test]
    fn other_tsc_rates_are_scaled_or_refused() {
        assert_eq!(
            check_tsc_khz(2_445_404, 2_446_016, true).unwrap(),
            TscPlan::Scale(2_445_404)
        );
        assert_eq!(
            check_tsc_khz(2_000_000, 3_000_000, true).unwrap(),
            TscPlan::Scale(2_000_000)
        );
        let e = check_tsc_khz(2_445_404, 2_446_016, false).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, VmError::Incompatible(_)), "{msg}");
        for want in ["source 2445404 kHz", "destination 2446016 kHz", "TSC"] {
            assert!(msg.contains(want), "{want:?} missing from: {msg}");
        }
        assert!(check_tsc_khz(0, 2_445_404, true).is_err());
    }

    /// This host's description of itself, as a source on it would send.
    fn host_desc(kvm: &Kvm) -> BTreeMap<String, String> {
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let mut p = BTreeMap::new();
        p.insert(
            "kvm.cpuid".to_string(),
            format!("{:016x}", hash_cpuid(&cpuid)),
        );
        p.insert(
            TSC_KHZ_PROPERTY.to_string(),
            host_tsc_khz(kvm).unwrap().to_string(),
        );
        p
    }

    #[test]
    fn a_foreign_tsc_rate_is_refused_unless_kvm_can_scale() {
        if !crate::kvm_or_skip("a_foreign_tsc_rate_is_refused_unless_kvm_can_scale") {
            return;
        }
        let kvm = Kvm::new().unwrap();
        let mut d = desc(&[]);
        d.properties = host_desc(&kvm);
        check_properties(&d).expect("this host's own description");
        let host = host_tsc_khz(&kvm).unwrap();
        let foreign = host / 2;
        d.properties
            .insert(TSC_KHZ_PROPERTY.to_string(), foreign.to_string());
        let r = check_properties(&d);
        if kvm.check_extension(Cap::TscControl) {
            r.expect("KVM can scale the TSC: accepted");
        } else {
            let msg = r.unwrap_err().to_string();
            for want in [
                format!("source {foreign} kHz"),
                format!("destination {host} kHz"),
            ] {
                assert!(msg.contains(&want), "{want:?} missing from: {msg}");
            }
        }
        // A source from before the rate was sent: accepted (with a warning).
        d.properties.remove(TSC_KHZ_PROPERTY);
        check_properties(&d).expect("a source that does not send its TSC rate");
        d.properties
            .insert(TSC_KHZ_PROPERTY.to_string(), "fast".to_string());
        let e = check_properties(&d).unwrap_err();
        assert!(e.to_string().contains("not a number"), "{e}");
    }
}
