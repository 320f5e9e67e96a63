//! The reference VMM's machine: a KvmVm, the COM1 UART, the virtio-net NICs,
//! the I/O bus, and the Multiboot entry state; as a migration source
//! ([`Machine`] is the engine's `SourceVm`) and as a destination
//! ([`DestMachine`], the engine's `DestinationVm`). Everything here uses only the public APIs of
//! `livemig` and `livemig-kvm`.

use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_segment;
use livemig::state::DeviceState;
use livemig::vm::NicInfo;
use livemig_kvm::serial::{SerialDevice, SerialOutput, COM1_IRQ, COM1_PORT};
use livemig_kvm::{DirtyMode, ExitHandler, KvmVm, MemoryOptions, SharedDevice, VmConfig};
use livemig_virtio::{NetCounters, VirtioNet, MMIO_WINDOW};

use livemig::memory::GuestMemory;
use livemig::state::Section;
use livemig::vm::{DirtyTracker, SourceVm, VcpuThrottle, VmDescription, VmError};
use vm_memory::{Bytes, GuestAddress};

use crate::multiboot::{LoadedKernel, BOOTLOADER_MAGIC};
use crate::{console_server, net};

use crate::net::{VIRTIO_NET_BASE, VIRTIO_NET_GSI, VIRTIO_NET_STRIDE};

/// Port I/O and MMIO dispatch: COM1, the virtio-net windows, everything
/// else ignored.
pub struct Bus {
    serial: Arc<Mutex<SerialDevice>>,
    nics: Vec<Arc<Mutex<VirtioNet>>>,
}

impl Bus {
    /// The NIC whose window holds `addr`, and the offset in it.
    fn nic(&self, addr: u64, len: usize) -> Option<(&Arc<Mutex<VirtioNet>>, u64)> {
        let rel = addr.checked_sub(VIRTIO_NET_BASE)?;
        let i = usize::try_from(rel / VIRTIO_NET_STRIDE).ok()?;
        let off = rel % VIRTIO_NET_STRIDE;
        if off.checked_add(len as u64)? > MMIO_WINDOW {
            return None;
        }
        self.nics.get(i).map(|n| (n, off))
    }
}

impl ExitHandler for Bus {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if (COM1_PORT..COM1_PORT + 8).contains(&port) && data.len() == 1 {
            let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
            data[0] = s.pio_read((port - COM1_PORT) as u8);
        } else {
            log::debug!("ignored in from port 0x{port:x} ({} bytes)", data.len());
            data.fill(0xff);
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        if (COM1_PORT..COM1_PORT + 8).contains(&port) && data.len() == 1 {
            let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
            s.pio_write((port - COM1_PORT) as u8, data[0]);
        } else {
            log::debug!("ignored out to port 0x{port:x}: {data:02x?}");
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if let Some((nic, off)) = self.nic(addr, data.len()) {
            nic.lock()
                .unwrap_or_else(|e| e.into_inner())
                .mmio_read(off, data);
            return;
        }
        log::debug!("ignored MMIO read at 0x{addr:x} ({} bytes)", data.len());
        data.fill(0xff);
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((nic, off)) = self.nic(addr, data.len()) {
            nic.lock()
                .unwrap_or_else(|e| e.into_inner())
                .mmio_write(off, data);
            return;
        }
        log::debug!("ignored MMIO write at 0x{addr:x}: {data:02x?}");
    }
}

/// A running (or paused) machine.
pub struct Machine {
    /// The VM (the COM1 UART is one of its devices).
    pub vm: KvmVm,
    /// The NICs (TAP backends).
    pub nets: Vec<crate::net::NetBackend>,
    /// The virtio-net devices, one per NIC, in `--net` order.
    pub nics: Vec<Arc<Mutex<VirtioNet>>>,
    /// Their frame counters (readable without the device lock).
    pub nic_counters: Vec<Arc<NetCounters>>,
    /// Set while the machine is paused for migration: the VMM's own writes
    /// into guest memory (the API's `write-memory`, standing in for device
    /// emulation) are refused then, so none can slip in after the final
    /// dirty sync.
    devices_stopped: Mutex<bool>,
    /// The COM1 UART (also reached through the bus), for console input.
    serial: Arc<Mutex<SerialDevice>>,
    /// The console socket's output log (`--console`), told when the guest
    /// migrates away.
    console: Option<Arc<crate::console_server::ConsoleLog>>,
    /// Every API `pause`, `resume` and `migrate` goes through this: refused
    /// while a migration runs and for good after one committed or became
    /// ambiguous.
    pub guard: livemig::MigrationGuard,
}

/// What a machine is built from.
pub struct MachineConfig {
    pub memory: u64,
    pub vcpus: u32,
    pub serial: SerialOutput,
    pub nets: Vec<crate::net::NetBackend>,
    pub dirty_mode: Option<DirtyMode>,
    /// With `--console`: the guest's output also goes to this log.
    pub console: Option<Arc<crate::console_server::ConsoleLog>>,
    /// Backend and transparent-huge-page advice of the guest memory.
    pub memory_options: MemoryOptions,
    /// Guest memory made elsewhere (a same-host hand-over: the source's
    /// memfds, mapped shared) instead of `memory_options`'; given the same
    /// THP advice.
    pub shared_memory: Option<livemig::memory::GuestRam>,
    /// The KVM VM with its memory registered, made ahead (`receive
    /// --memory`: before the source connects); used instead of
    /// `memory_options`' when `shared_memory` is `None`.
    pub prepared: Option<livemig_kvm::PreparedVm>,
}

impl Machine {
    /// Creates the VM (paused) with its UART wired to IRQ 4 and NIC i
    /// (virtio-net, paused too) at `0xd000_0000 + i * 0x1000` on GSI `5 + i`.
    pub fn create(cfg: MachineConfig) -> Result<Self, String> {
        if cfg.nets.len() > crate::net::MAX_NICS {
            return Err(format!(
                "{} NICs: at most {} are supported",
                cfg.nets.len(),
                crate::net::MAX_NICS
            ));
        }
        let output = match &cfg.console {
            Some(log) => crate::console_server::teed_output(cfg.serial, log.clone())
                .map_err(|e| format!("serial output: {e}"))?,
            None => cfg.serial,
        };
        let serial = Arc::new(Mutex::new(
            SerialDevice::new(output).map_err(|e| format!("serial output: {e}"))?,
        ));
        let mut nics = Vec::new();
        for (i, n) in cfg.nets.iter().enumerate() {
            nics.push(Arc::new(Mutex::new(n.device(i)?)));
        }
        let nic_counters = nics
            .iter()
            .map(|n| {
                n.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .counters()
                    .clone()
            })
            .collect();
        let bus = Arc::new(Bus {
            serial: serial.clone(),
            nics: nics.clone(),
        });
        let mut devices: Vec<SharedDevice> =
            vec![serial.clone() as Arc<Mutex<dyn DeviceState + Send>>];
        devices.extend(
            nics.iter()
                .map(|n| n.clone() as Arc<Mutex<dyn DeviceState + Send>>),
        );
        let vm_config = VmConfig {
            memory: cfg.memory,
            vcpus: cfg.vcpus,
            nics: cfg.nets.iter().map(|n| n.info()).collect::<Vec<NicInfo>>(),
            dirty_mode: cfg.dirty_mode,
        };
        let vm = match (cfg.shared_memory, cfg.prepared) {
            (Some(mem), _) => {
                if let Err(e) = livemig_kvm::thp::advise(&mem, cfg.memory_options.thp) {
                    log::warn!("shared guest memory: THP advice refused ({e})");
                }
                KvmVm::create_with_memory(&vm_config, mem, bus, devices)
            }
            (None, Some(p)) => KvmVm::create_prepared(&vm_config, p, bus, devices),
            (None, None) => {
                KvmVm::create_with_backend(&vm_config, cfg.memory_options, bus, devices)
            }
        }
        .map_err(|e| e.to_string())?;
        {
            let s = serial.lock().unwrap_or_else(|e| e.into_inner());
            vm.vm_fd()
                .register_irqfd(s.irq_evt(), COM1_IRQ)
                .map_err(|e| format!("KVM_IRQFD for COM1: {e}"))?;
        }
        for (i, n) in nics.iter().enumerate() {
            let n = n.lock().unwrap_or_else(|e| e.into_inner());
            n.attach_memory(vm.ram().clone());
            let gsi = VIRTIO_NET_GSI + i as u32;
            vm.vm_fd()
                .register_irqfd(n.irq_evt(), gsi)
                .map_err(|e| format!("KVM_IRQFD for NIC {i} (GSI {gsi}): {e}"))?;
        }
        Ok(Machine {
            vm,
            nets: cfg.nets,
            nics,
            nic_counters,
            devices_stopped: Mutex::new(false),
            serial,
            console: cfg.console,
            guard: livemig::MigrationGuard::new(),
        })
    }

    /// Queues console input in the UART's receive FIFO, as much as fits;
    /// returns how many bytes were taken (0 while the FIFO is full or the
    /// machine is paused for migration: the device state may already be
    /// saved then, so the bytes must wait).
    pub fn console_input(&self, bytes: &[u8]) -> Result<usize, String> {
        let stopped = self
            .devices_stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *stopped {
            return Ok(0);
        }
        let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let k = bytes.len().min(s.fifo_capacity());
        if k > 0 {
            s.enqueue_input(&bytes[..k]).map_err(|e| e.to_string())?;
        }
        Ok(k)
    }

    fn each_nic(&self, f: impl Fn(&VirtioNet)) {
        for n in &self.nics {
            f(&n.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }

    /// Starts the devices, then the vCPUs.
    pub fn start(&self) {
        self.each_nic(VirtioNet::resume);
        self.vm.resume_vcpus();
    }

    /// Drops the frames queued on the NICs' TAPs (see
    /// [`VirtioNet::drop_queued`]); returns how many.
    pub fn drop_queued_frames(&self) -> u64 {
        self.nics
            .iter()
            .map(|n| n.lock().unwrap_or_else(|e| e.into_inner()).drop_queued())
            .sum()
    }

    /// After a completed outgoing migration: the NICs stop touching guest
    /// memory for good and only count (and drop) what still arrives on
    /// this host's TAPs.
    pub fn migrated_away(&self) {
        self.each_nic(VirtioNet::discard);
        // Its output here is final: console clients get the rest and follow.
        if let Some(c) = &self.console {
            c.guest_left();
        }
    }

    /// After a completed local hand-over: the new VMM on this host runs the
    /// guest on the same memory and TAPs, so the NICs stay paused (reading
    /// a TAP now would steal the new VMM's frames) and nothing here touches
    /// guest memory again.
    pub fn handed_over(&self) {
        if let Some(c) = &self.console {
            c.guest_left();
        }
    }

    /// Asks each NIC's guest driver to announce itself (virtio-net
    /// `GUEST_ANNOUNCE`); returns how many drivers were asked.
    pub fn guest_announce(&self) -> usize {
        self.nics
            .iter()
            .filter(|n| n.lock().unwrap_or_else(|e| e.into_inner()).announce())
            .count()
    }

    /// A VMM-side ("device") write of `value` at `gpa` through vm-memory, so
    /// it is recorded in the dirty bitmap. Refused while paused.
    pub fn device_write(&self, gpa: u64, value: u64) -> Result<(), String> {
        let stopped = self
            .devices_stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *stopped {
            return Err("the VM is paused: device writes are stopped".into());
        }
        self.vm
            .ram()
            .write_obj(value, GuestAddress(gpa))
            .map_err(|e| format!("write at 0x{gpa:x}: {e}"))
    }

    /// Sets the boot processor to the Multiboot entry state.
    pub fn set_multiboot_entry(&self, k: &LoadedKernel) -> Result<(), String> {
        self.vm
            .with_vcpu(0, |fd| -> Result<(), String> {
                let mut sregs = fd.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
                let code = kvm_segment {
                    base: 0,
                    limit: 0xffff_ffff,
                    selector: 0x08,
                    type_: 0xb,
                    present: 1,
                    dpl: 0,
                    db: 1,
                    s: 1,
                    l: 0,
                    g: 1,
                    avl: 0,
                    unusable: 0,
                    padding: 0,
                };
                let data = kvm_segment {
                    selector: 0x10,
                    type_: 0x3,
                    ..code
                };
                sregs.cs = code;
                sregs.ds = data;
                sregs.es = data;
                sregs.fs = data;
                sregs.gs = data;
                sregs.ss = data;
                sregs.cr0 = 0x11;
                sregs.cr3 = 0;
                sregs.cr4 = 0;
                sregs.efer = 0;
                fd.set_sregs(&sregs)
                    .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
                let mut regs = fd.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
                regs.rip = u64::from(k.entry);
                regs.rax = u64::from(BOOTLOADER_MAGIC);
                regs.rbx = u64::from(k.info_addr);
                regs.rflags = 0x2;
                fd.set_regs(&regs)
                    .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
                Ok(())
            })
            .map_err(|e| e.to_string())?
    }
}

/// The source seam: the KVM VM plus this VMM's devices. Pausing stops the
/// vCPUs *and* the VMM's own writers, which is what every embedding VMM must
/// do for its device threads.
impl SourceVm for Machine {
    fn memory(&self) -> &dyn GuestMemory {
        SourceVm::memory(&self.vm)
    }
    fn describe(&self) -> Result<VmDescription, VmError> {
        // The NICs' IPv6 addresses ride along as `net.<mac>.ipv6`
        // properties (the engine's NIC list has IPv4 only).
        let mut desc = self.vm.describe()?;
        desc.properties
            .extend(crate::net::ipv6_properties(&self.nets));
        Ok(desc)
    }
    fn dirty_tracker(&self) -> Result<Box<dyn DirtyTracker + '_>, VmError> {
        self.vm.dirty_tracker()
    }
    fn pause(&self) -> Result<(), VmError> {
        let mut stopped = self
            .devices_stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *stopped = true;
        let r = SourceVm::pause(&self.vm);
        if r.is_err() {
            *stopped = false;
            return r;
        }
        // vCPUs first (no new notifications), then the NICs: when this
        // returns no device writes guest memory, so the final dirty sync
        // sees everything.
        self.each_nic(VirtioNet::pause);
        Ok(())
    }
    fn resume(&self) -> Result<(), VmError> {
        let mut stopped = self
            .devices_stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.each_nic(VirtioNet::resume);
        SourceVm::resume(&self.vm)?;
        *stopped = false;
        Ok(())
    }
    fn is_paused(&self) -> bool {
        self.vm.is_paused()
    }
    fn save_state(&self) -> Result<Vec<Section>, VmError> {
        self.vm.save_state()
    }
    fn throttle(&self) -> Option<&dyn VcpuThrottle> {
        // Throttling parks the vCPUs only; the VMM's devices keep running.
        self.vm.throttle()
    }
}

/// The destination machine, as the engine's DestinationVm (optionally
/// left paused after the switchover).
pub struct DestMachine {
    pub machine: Machine,
    pub start_paused: bool,
    /// Announce the NICs (VMM RARP/GARP and the guest announce) as soon as
    /// the guest runs.
    pub announce: bool,
    /// The console socket, to take over its path when the guest resumes.
    pub console: Option<(
        crate::socket_path::Listener,
        Arc<console_server::ConsoleLog>,
    )>,
    /// A local hand-over's API socket, to take over its path when the
    /// guest resumes.
    pub api: Option<crate::api::ApiSocket>,
    /// A same-host hand-over: the TAPs are the source's, and the frames
    /// queued on them arrived for this guest during the pause (kept).
    pub local: bool,
}

impl DestMachine {
    /// The announce, started the moment the vCPUs run (every millisecond
    /// before it, the network still delivers to the old port).
    fn start_announce(&self) {
        let resumed_at = std::time::Instant::now();
        let m = &self.machine;
        if m.nets.is_empty() {
            return;
        }
        match net::start_announce(&m.nets, &livemig_announce::Schedule::default(), resumed_at) {
            Ok(h) => {
                std::thread::spawn(move || {
                    let r = h.join();
                    eprintln!(
                        "refvmm: announce report: {}",
                        serde_json::to_string(&r).unwrap_or_default()
                    );
                });
            }
            Err(e) => eprintln!("refvmm: announce failed to start: {e}"),
        }
        // Ask the guest's drivers to announce themselves too.
        let n = m.guest_announce();
        if n > 0 {
            eprintln!("refvmm: asked {n} guest NIC driver(s) to announce");
        }
    }
}

impl livemig::vm::DestinationVm for DestMachine {
    fn memory(&self) -> &dyn livemig::memory::GuestMemory {
        livemig::vm::DestinationVm::memory(&self.machine.vm)
    }
    fn restore_state(&mut self, sections: &[livemig::state::Section]) -> Result<(), VmError> {
        self.machine.vm.restore_state(sections)
    }
    fn rehearse_restore(&mut self) -> Result<Option<livemig::vm::RestoreRehearsal>, VmError> {
        self.machine.vm.rehearse_restore()
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.resume_then(&mut || {})
    }
    /// Nothing here fails: `started` (the engine's `Resumed` to the source)
    /// goes right before the vCPUs are woken, so a vCPU thread that takes
    /// the CPU first holds nothing up.
    fn resume_then(&mut self, started: &mut dyn FnMut()) -> Result<(), VmError> {
        // The console and API paths are this VMM's from now on, before the
        // source learns that the migration completed (tells its clients,
        // and removes its paths at exit if they still name its sockets).
        let console = self.console.as_mut().map(|(l, _)| l);
        let api = self.api.as_mut().map(|a| &mut a.listener);
        for listener in console.into_iter().chain(api) {
            if let Err(e) = listener.take_over() {
                eprintln!("refvmm: {e}");
            }
        }
        if self.start_paused {
            started();
            return Ok(());
        }
        // The NICs drop what reached this host's TAPs before the guest ran
        // here (`VirtioNet::resume` after a restore) — except after a local
        // hand-over, whose TAPs are the source's: what they hold is the
        // guest's traffic of the pause.
        if self.local {
            self.machine.each_nic(VirtioNet::keep_queued_frames);
        }
        started();
        self.machine.start();
        if self.announce {
            self.start_announce();
        }
        Ok(())
    }

    /// `true`: before `started`, `resume_then` only renames the console
    /// and API sockets into place and sets a flag per NIC; the vCPU
    /// threads are woken after it.
    fn started_before_wake(&self) -> bool {
        true
    }
}
