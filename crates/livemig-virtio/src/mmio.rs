//! The virtio-mmio transport, version 2 ("modern"), generic over a
//! [`VirtioDevice`].
//!
//! [`MmioTransport`] emulates the register window (virtio 1.2, section 4.2.2):
//! identification registers, feature negotiation through the selector
//! registers, the device status state machine, queue setup with validation,
//! notifications, the interrupt status / acknowledge pair and the config
//! generation counter. The device-specific part (config space, what a
//! notification does) is the [`VirtioDevice`].
//!
//! Nothing the guest writes is trusted: an invalid queue size or a ring that
//! is misaligned or not inside guest memory sets `DEVICE_NEEDS_RESET` (and
//! raises a configuration interrupt); writes at the wrong time (features after
//! `FEATURES_OK`, queue registers after `DRIVER_OK`, clearing status bits
//! without a reset) are ignored. Nothing here panics on guest input.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use livemig::memory::GuestRam;
use livemig::state::{StateError, StateReader, StateWriter};

/// `MagicValue`: "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// `Version` of the transport (2 = modern, no legacy registers).
pub const MMIO_VERSION: u32 = 2;
/// `VendorID` reported ("QEMU", as many VMMs do).
pub const MMIO_VENDOR_ID: u32 = 0x554d_4551;
/// Size of the register window a device occupies (registers and config space).
pub const MMIO_WINDOW: u64 = 0x200;
/// Offset of the device-specific configuration space.
pub const MMIO_CONFIG_OFFSET: u64 = 0x100;

// Register offsets (virtio 1.2, table 4.1).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;

/// Status bits this transport knows.
pub const STATUS_ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
/// Status: the driver knows how to drive the device.
pub const STATUS_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
/// Status: the driver is ready.
pub const STATUS_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
/// Status: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
/// Status: the device hit an unrecoverable error (set by the device).
pub const STATUS_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
/// Status: the driver gave up.
pub const STATUS_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const STATUS_KNOWN: u32 = STATUS_ACKNOWLEDGE
    | STATUS_DRIVER
    | STATUS_DRIVER_OK
    | STATUS_FEATURES_OK
    | STATUS_NEEDS_RESET
    | STATUS_FAILED;

/// Interrupt status bit: a used buffer was added.
pub const INT_VRING: u32 = VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = VIRTIO_MMIO_INT_CONFIG;
const INT_KNOWN: u32 = INT_VRING | INT_CONFIG;

/// `VIRTIO_F_VERSION_1` as a feature mask.
pub const FEATURE_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

/// What processing a queue produced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueEvents {
    /// Used buffers were added: raise the used-buffer interrupt.
    pub used: bool,
    /// The driver changed the device configuration (for example acked an
    /// announce): bump the configuration generation, no interrupt.
    pub config_changed: bool,
}

/// What a device sees while it processes a queue.
pub struct QueueContext<'a> {
    /// Guest memory (every write through it is dirty-tracked).
    pub mem: &'a GuestRam,
    /// All queues of the device, indexed like the device numbers them.
    pub queues: &'a mut [Queue],
    /// The features the driver accepted.
    pub driver_features: u64,
}

/// The device-specific half of a virtio device behind [`MmioTransport`].
pub trait VirtioDevice: Send {
    /// The virtio device ID (1 = network).
    fn device_type(&self) -> u32;
    /// The features the device offers.
    fn device_features(&self) -> u64;
    /// `QueueNumMax` of each queue (a power of two, at most 32768); the
    /// length is the number of queues (at most 255).
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads `data.len()` bytes of config space at `offset`. The caller
    /// guarantees the access is inside [`VirtioDevice::config_len`].
    fn read_config(&self, offset: usize, data: &mut [u8]);
    /// Length of the config space.
    fn config_len(&self) -> usize;
    /// The driver wrote config space (the caller guarantees the bounds).
    /// Returns whether the configuration changed.
    fn write_config(&mut self, offset: usize, data: &[u8]) -> bool;
    /// The driver notified queue `index` (a valid, ready queue; the driver
    /// reached `DRIVER_OK`).
    fn process_queue(&mut self, index: usize, ctx: &mut QueueContext<'_>) -> QueueEvents;
    /// The driver reset the device: forget the driver-visible state.
    fn reset(&mut self);
}

/// The virtio-mmio register file around a device.
pub struct MmioTransport<D> {
    device: D,
    mem: Option<GuestRam>,
    irq: Arc<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    interrupt_status: u32,
    config_generation: u32,
}

/// The transport's part of the migrated state, decoded and validated.
struct CommonState {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    queues: Vec<Queue>,
}

/// Builds the queues of a device. A maximum size the virtio-queue crate
/// refuses (zero, not a power of two, over 32768) is a bug of the device
/// model: it is logged and the queue left out (a restore then fails the
/// queue-count check rather than misplacing state).
fn new_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .filter_map(|&m| match Queue::new(m) {
            Ok(q) => Some(q),
            Err(e) => {
                log::error!("virtio: queue max size {m} refused: {e}");
                None
            }
        })
        .collect()
}

fn reg_u32(data: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(data).ok().map(u32::from_le_bytes)
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`; interrupts are signalled on `irq`.
    pub fn new(device: D, irq: Arc<EventFd>) -> Self {
        let queues = new_queues(device.queue_max_sizes());
        MmioTransport {
            device,
            mem: None,
            irq,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            interrupt_status: 0,
            config_generation: 0,
        }
    }

    /// Gives the transport the guest memory its queues live in. Until then
    /// no queue can become ready.
    pub fn attach_memory(&mut self, mem: GuestRam) {
        self.mem = Some(mem);
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The interrupt status register.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// The configuration generation.
    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    /// Whether the driver finished initialisation and the device is healthy.
    pub fn is_active(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_NEEDS_RESET == 0
    }

    /// Runs `f` with the device and the queue context (for device work that
    /// does not come from a notification, for example received frames).
    /// Returns `None` without calling `f` unless the device is active and
    /// memory is attached. Raises the used-buffer interrupt if `f` says so.
    pub fn with_queues<R>(
        &mut self,
        f: impl FnOnce(&mut D, &mut QueueContext<'_>) -> (R, QueueEvents),
    ) -> Option<R> {
        if !self.is_active() {
            return None;
        }
        let mem = self.mem.as_ref()?;
        let mut ctx = QueueContext {
            mem,
            queues: &mut self.queues,
            driver_features: self.driver_features,
        };
        let (r, ev) = f(&mut self.device, &mut ctx);
        self.apply(ev);
        Some(r)
    }

    fn apply(&mut self, ev: QueueEvents) {
        if ev.config_changed {
            self.config_generation = self.config_generation.wrapping_add(1);
        }
        if ev.used {
            self.raise(INT_VRING);
        }
    }

    fn raise(&mut self, bit: u32) {
        self.interrupt_status |= bit;
        if let Err(e) = self.irq.write(1) {
            log::warn!("virtio: signalling the interrupt eventfd: {e}");
        }
    }

    /// The device changed its configuration on its own (for example the
    /// announce request): bumps the generation and raises the configuration
    /// interrupt.
    pub fn notify_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.raise(INT_CONFIG);
    }

    /// Marks the device broken until the driver resets it (virtio 1.2,
    /// 2.1.2: `DEVICE_NEEDS_RESET` plus a configuration interrupt).
    fn needs_reset(&mut self, why: &str) {
        log::warn!("virtio: device needs reset: {why}");
        if self.status & STATUS_NEEDS_RESET == 0 {
            self.status |= STATUS_NEEDS_RESET;
            self.notify_config_change();
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::try_from(self.queue_sel).ok()?)
    }

    /// The selected queue if its registers may be written now: features
    /// negotiated, driver not yet OK, queue not ready.
    fn configurable_queue(&mut self) -> Option<&mut Queue> {
        if self.status & STATUS_FEATURES_OK == 0
            || self.status & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET | STATUS_FAILED) != 0
        {
            log::debug!(
                "virtio: queue register written in status {:#x}: ignored",
                self.status
            );
            return None;
        }
        let q = self.queues.get_mut(usize::try_from(self.queue_sel).ok()?)?;
        if q.ready() {
            log::debug!("virtio: queue register written while the queue is ready: ignored");
            return None;
        }
        Some(q)
    }

    /// Handles a guest read at `offset` inside the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= MMIO_CONFIG_OFFSET {
            self.read_config(offset - MMIO_CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 {
            log::debug!(
                "virtio: {}-byte register read at {offset:#x}: reads as 0",
                data.len()
            );
            return;
        }
        let q = self.selected_queue();
        let v: u32 = match offset {
            REG_MAGIC => MMIO_MAGIC,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => MMIO_VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_NUM => q.map_or(0, |q| u32::from(q.size())),
            REG_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            REG_QUEUE_DESC_LOW => q.map_or(0, |q| q.desc_table() as u32),
            REG_QUEUE_DESC_HIGH => q.map_or(0, |q| (q.desc_table() >> 32) as u32),
            REG_QUEUE_DRIVER_LOW => q.map_or(0, |q| q.avail_ring() as u32),
            REG_QUEUE_DRIVER_HIGH => q.map_or(0, |q| (q.avail_ring() >> 32) as u32),
            REG_QUEUE_DEVICE_LOW => q.map_or(0, |q| q.used_ring() as u32),
            REG_QUEUE_DEVICE_HIGH => q.map_or(0, |q| (q.used_ring() >> 32) as u32),
            REG_INTERRUPT_STATUS => self.interrupt_status,
            REG_STATUS => self.status,
            // No shared memory regions: length -1 means "does not exist".
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                log::debug!("virtio: read of unknown register {offset:#x}");
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let len = self.device.config_len();
        match usize::try_from(offset) {
            Ok(o) if o.checked_add(data.len()).is_some_and(|e| e <= len) => {
                self.device.read_config(o, data)
            }
            _ => log::debug!(
                "virtio: config read of {} bytes at {offset:#x} outside the {len}-byte config",
                data.len()
            ),
        }
    }

    /// Handles a guest write at `offset` inside the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= MMIO_CONFIG_OFFSET {
            let len = self.device.config_len();
            match usize::try_from(offset - MMIO_CONFIG_OFFSET) {
                Ok(o) if o.checked_add(data.len()).is_some_and(|e| e <= len) => {
                    if self.device.write_config(o, data) {
                        self.config_generation = self.config_generation.wrapping_add(1);
                    }
                }
                _ => log::debug!("virtio: config write outside the config space: ignored"),
            }
            return;
        }
        let Some(v) = reg_u32(data) else {
            log::debug!(
                "virtio: {}-byte register write at {offset:#x}: ignored",
                data.len()
            );
            return;
        };
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => self.write_driver_features(v),
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => {
                if let Some(q) = self.configurable_queue() {
                    if q.try_set_size(u16::try_from(v).unwrap_or(0)).is_err() {
                        self.needs_reset(&format!("queue size {v} is invalid"));
                    }
                }
            }
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH => {
                if let Some(q) = self.configurable_queue() {
                    let a = merge(q.desc_table(), offset == REG_QUEUE_DESC_HIGH, v);
                    if q.try_set_desc_table_address(GuestAddress(a)).is_err() {
                        self.needs_reset(&format!("descriptor table {a:#x} is misaligned"));
                    }
                }
            }
            REG_QUEUE_DRIVER_LOW | REG_QUEUE_DRIVER_HIGH => {
                if let Some(q) = self.configurable_queue() {
                    let a = merge(q.avail_ring(), offset == REG_QUEUE_DRIVER_HIGH, v);
                    if q.try_set_avail_ring_address(GuestAddress(a)).is_err() {
                        self.needs_reset(&format!("available ring {a:#x} is misaligned"));
                    }
                }
            }
            REG_QUEUE_DEVICE_LOW | REG_QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.configurable_queue() {
                    let a = merge(q.used_ring(), offset == REG_QUEUE_DEVICE_HIGH, v);
                    if q.try_set_used_ring_address(GuestAddress(a)).is_err() {
                        self.needs_reset(&format!("used ring {a:#x} is misaligned"));
                    }
                }
            }
            REG_QUEUE_READY => self.write_queue_ready(v),
            REG_QUEUE_NOTIFY => self.notify(v),
            REG_INTERRUPT_ACK => self.interrupt_status &= !v,
            REG_STATUS => self.write_status(v),
            _ => {
                log::debug!("virtio: write of {v:#x} to read-only or unknown register {offset:#x}")
            }
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & STATUS_DRIVER == 0 || self.status & STATUS_FEATURES_OK != 0 {
            log::debug!(
                "virtio: driver features written in status {:#x}: ignored",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
            s => log::debug!("virtio: driver features page {s} written: ignored"),
        }
    }

    fn write_queue_ready(&mut self, v: u32) {
        if v == 0 {
            // Disabling a queue is allowed until DRIVER_OK.
            if self.status & STATUS_DRIVER_OK == 0 {
                if let Some(q) = usize::try_from(self.queue_sel)
                    .ok()
                    .and_then(|i| self.queues.get_mut(i))
                {
                    q.set_ready(false);
                }
            }
            return;
        }
        let Some(mem) = self.mem.clone() else {
            self.needs_reset("queue enabled before guest memory was attached");
            return;
        };
        let Some(q) = self.configurable_queue() else {
            return;
        };
        q.set_ready(true);
        let why = if q.avail_ring() == 0 || q.used_ring() == 0 {
            Some("a ring is at guest address 0")
        } else if !q.is_valid(&mem) {
            Some("a ring is not inside guest memory")
        } else {
            None
        };
        if let Some(why) = why {
            q.set_ready(false);
            self.needs_reset(why);
        }
    }

    fn notify(&mut self, v: u32) {
        let Ok(index) = usize::try_from(v) else {
            return;
        };
        if !self.is_active() {
            log::debug!(
                "virtio: notify of queue {v} in status {:#x}: ignored",
                self.status
            );
            return;
        }
        if !self.queues.get(index).is_some_and(|q| q.ready()) {
            log::debug!("virtio: notify of queue {v}, which is not ready: ignored");
            return;
        }
        let Some(mem) = self.mem.as_ref() else {
            return;
        };
        let mut ctx = QueueContext {
            mem,
            queues: &mut self.queues,
            driver_features: self.driver_features,
        };
        let ev = self.device.process_queue(index, &mut ctx);
        self.apply(ev);
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver cannot set NEEDS_RESET, and cannot clear bits except by
        // writing 0.
        let mut new = (v & STATUS_KNOWN & !STATUS_NEEDS_RESET) | (self.status & STATUS_NEEDS_RESET);
        if self.status & !new != 0 {
            log::debug!(
                "virtio: status {v:#x} would clear bits of {:#x}: ignored",
                self.status
            );
            return;
        }
        let added = new & !self.status;
        if added & STATUS_FEATURES_OK != 0 {
            let offered = self.device.device_features();
            if new & STATUS_DRIVER == 0
                || self.driver_features & !offered != 0
                || self.driver_features & FEATURE_VERSION_1 == 0
            {
                log::debug!(
                    "virtio: FEATURES_OK refused for driver features {:#x} (offered {offered:#x})",
                    self.driver_features
                );
                new &= !STATUS_FEATURES_OK;
            }
        }
        if added & STATUS_DRIVER_OK != 0 && new & STATUS_FEATURES_OK == 0 {
            log::debug!("virtio: DRIVER_OK without FEATURES_OK: ignored");
            new &= !STATUS_DRIVER_OK;
        }
        self.status = new;
    }

    /// Appends the transport state (layout in `docs/virtio-net.md`).
    pub fn save(&self, w: &mut StateWriter) {
        w.u32(self.status)
            .u32(self.device_features_sel)
            .u32(self.driver_features_sel)
            .u64(self.driver_features)
            .u32(self.queue_sel)
            .u32(self.interrupt_status)
            .u32(self.config_generation)
            .u8(u8::try_from(self.queues.len()).unwrap_or(u8::MAX));
        for q in &self.queues {
            w.u16(q.size())
                .u8(u8::from(q.ready()))
                .u64(q.desc_table())
                .u64(q.avail_ring())
                .u64(q.used_ring())
                .u16(q.next_avail())
                .u16(q.next_used());
        }
    }

    /// Decodes and validates the transport state without changing anything.
    fn decode(&self, name: &str, r: &mut StateReader<'_>) -> Result<CommonState, StateError> {
        let bad = |reason: String| StateError::Malformed {
            name: name.to_string(),
            reason,
        };
        let status = r.u32()?;
        let device_features_sel = r.u32()?;
        let driver_features_sel = r.u32()?;
        let driver_features = r.u64()?;
        let queue_sel = r.u32()?;
        let interrupt_status = r.u32()?;
        let config_generation = r.u32()?;
        let nq = usize::from(r.u8()?);
        if status & !STATUS_KNOWN != 0 {
            return Err(bad(format!("status {status:#x} has unknown bits")));
        }
        if status & STATUS_DRIVER_OK != 0 && status & STATUS_FEATURES_OK == 0 {
            return Err(bad(format!(
                "status {status:#x}: DRIVER_OK without FEATURES_OK"
            )));
        }
        let offered = self.device.device_features();
        if driver_features & !offered != 0 {
            return Err(bad(format!(
                "driver features {driver_features:#x} were not offered ({offered:#x})"
            )));
        }
        if status & STATUS_FEATURES_OK != 0 && driver_features & FEATURE_VERSION_1 == 0 {
            return Err(bad("FEATURES_OK without VIRTIO_F_VERSION_1".into()));
        }
        if interrupt_status & !INT_KNOWN != 0 {
            return Err(bad(format!(
                "interrupt status {interrupt_status:#x} has unknown bits"
            )));
        }
        let max_sizes = self.device.queue_max_sizes();
        if nq != max_sizes.len() || nq != self.queues.len() {
            return Err(bad(format!(
                "{nq} queues, this device has {}",
                max_sizes.len()
            )));
        }
        let mem = self
            .mem
            .as_ref()
            .ok_or_else(|| bad("restore before guest memory was attached to the device".into()))?;
        let mut queues = Vec::with_capacity(nq);
        for (i, &max_size) in max_sizes.iter().enumerate() {
            let size = r.u16()?;
            let ready = match r.u8()? {
                0 => false,
                1 => true,
                x => return Err(bad(format!("queue {i}: ready flag {x}"))),
            };
            let st = QueueState {
                max_size,
                size,
                ready,
                desc_table: r.u64()?,
                avail_ring: r.u64()?,
                used_ring: r.u64()?,
                next_avail: r.u16()?,
                next_used: r.u16()?,
                event_idx_enabled: false,
            };
            let in_flight = st.next_avail.wrapping_sub(st.next_used);
            let q = Queue::try_from(st).map_err(|e| {
                bad(format!(
                    "queue {i}: size {size} (max {max_size}) or ring alignment invalid: {e}"
                ))
            })?;
            if in_flight > size {
                return Err(bad(format!(
                    "queue {i}: {in_flight} descriptors in flight, more than the size {size}"
                )));
            }
            if ready && (q.avail_ring() == 0 || q.used_ring() == 0 || !q.is_valid(mem)) {
                return Err(bad(format!(
                    "queue {i}: rings (desc {:#x}, avail {:#x}, used {:#x}, size {size}) are not inside guest memory",
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring()
                )));
            }
            queues.push(q);
        }
        Ok(CommonState {
            status,
            device_features_sel,
            driver_features_sel,
            driver_features,
            queue_sel,
            interrupt_status,
            config_generation,
            queues,
        })
    }

    /// Decodes and validates the transport state; `commit` applies it.
    /// Split so a device can validate its own part before anything changes.
    pub fn decode_state(
        &self,
        name: &str,
        r: &mut StateReader<'_>,
    ) -> Result<DecodedTransport, StateError> {
        self.decode(name, r).map(DecodedTransport)
    }

    /// Applies a decoded state; re-raises a pending interrupt.
    pub fn commit_state(&mut self, s: DecodedTransport) {
        let s = s.0;
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        self.queues = s.queues;
        if self.interrupt_status != 0 {
            if let Err(e) = self.irq.write(1) {
                log::warn!("virtio: signalling the interrupt eventfd: {e}");
            }
        }
    }

    /// The queues (for tests and diagnostics).
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }
}

/// A validated transport state, ready to be committed.
pub struct DecodedTransport(CommonState);

/// Replaces the low or high half of a 64-bit address.
fn merge(old: u64, high: bool, v: u32) -> u64 {
    if high {
        (old & 0xffff_ffff) | (u64::from(v) << 32)
    } else {
        (old & !0xffff_ffff) | u64::from(v)
    }
}
