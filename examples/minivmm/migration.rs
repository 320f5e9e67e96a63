//! All of minivmm's migration glue: the engine's two VM seams for
//! [`Machine`], and the calls into `livemig`. (docs/embedding.md, "A second
//! VMM", counts these lines.)

use std::collections::BTreeMap;

use livemig::memory::{GuestRam, MemoryLayout};
use livemig::state::{Section, StateError};
use livemig::transport::Endpoint;
use livemig::vm::{DestinationVm, DirtyTracker, SourceVm, VcpuThrottle, VmDescription, VmError};
use livemig::{
    Migration, MigrationConfig, MigrationError, Progress, ReceiveReport, Reception, Report,
};
use livemig_kvm::dirty::KvmDirtyTracker;
use livemig_kvm::state::{restore_vcpu, restore_vm_section, save_vcpu, save_vm};
use livemig_kvm::{check_tsc_khz, DirtyMode, TSC_KHZ_PROPERTY};

use crate::machine::Machine;

impl SourceVm for Machine {
    fn memory(&self) -> &GuestRam {
        &self.ram.guest
    }

    fn describe(&self) -> Result<VmDescription, VmError> {
        let layout =
            MemoryLayout::of(&self.ram.guest).map_err(|e| VmError::Incompatible(e.to_string()))?;
        let properties = BTreeMap::from([(TSC_KHZ_PROPERTY.to_string(), self.tsc_khz.to_string())]);
        Ok(VmDescription {
            layout,
            vcpus: 1,
            nics: vec![],
            properties,
        })
    }

    fn dirty_tracker(&self) -> Result<Box<dyn DirtyTracker + '_>, VmError> {
        Ok(Box::new(KvmDirtyTracker::new(
            &self.vm,
            &self.slots,
            self.dirty_mode,
            self.ring.as_deref(),
        )))
    }

    fn pause(&self) -> Result<(), VmError> {
        self.vcpu.pause();
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        self.vcpu.resume();
        Ok(())
    }

    fn is_paused(&self) -> bool {
        self.vcpu.is_paused()
    }

    fn save_state(&self) -> Result<Vec<Section>, VmError> {
        let vcpu = self
            .vcpu
            .fd
            .lock()
            .map_err(|_| VmError::Pause("vCPU lock poisoned".into()))?;
        let mut sections = save_vm(&self.vm)?;
        sections.push(save_vcpu(0, &vcpu, &self.msrs)?);
        Ok(sections)
    }

    fn throttle(&self) -> Option<&dyn VcpuThrottle> {
        None
    }
}

impl DestinationVm for Machine {
    fn memory(&self) -> &GuestRam {
        &self.ram.guest
    }

    fn restore_state(&mut self, sections: &[Section]) -> Result<(), VmError> {
        let find = |name: &str| {
            sections
                .iter()
                .find(|s| s.name == name)
                .ok_or(StateError::Missing(name.into()))
        };
        if let Some(s) = sections
            .iter()
            .find(|s| !["vm.irqchip", "vm.pit", "vm.clock", "vcpu.0"].contains(&s.name.as_str()))
        {
            return Err(StateError::Unknown(s.name.clone()).into());
        }
        // The irqchip before the LAPIC, the clock last.
        restore_vm_section(&self.vm, find("vm.irqchip")?)?;
        restore_vm_section(&self.vm, find("vm.pit")?)?;
        let vcpu = self
            .vcpu
            .fd
            .lock()
            .map_err(|_| VmError::Create("vCPU lock poisoned".into()))?;
        restore_vcpu(&vcpu, find("vcpu.0")?)?;
        Ok(restore_vm_section(&self.vm, find("vm.clock")?)?)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.vcpu.resume();
        Ok(())
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
        let khz = desc
            .properties
            .get(TSC_KHZ_PROPERTY)
            .and_then(|k| k.parse().ok());
        let m = Machine::create(memory, DirtyMode::Classic)
            .map_err(|e| VmError::Create(e.to_string()))?;
        check_tsc_khz(
            khz.ok_or_else(|| VmError::Incompatible("no TSC rate".into()))?,
            m.tsc_khz,
            false,
        )?;
        if desc.vcpus != 1 {
            return Err(VmError::Incompatible(format!(
                "{} vCPUs, minivmm has 1",
                desc.vcpus
            )));
        }
        livemig::vm::check_layout(&m.ram.guest, desc)?;
        Ok(m)
    })
}
