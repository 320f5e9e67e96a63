//! The virtio-net device: queues 0 = receiveq, 1 = transmitq, 2 = controlq.
//!
//! [`VirtioNet`] is the handle a VMM holds: it dispatches MMIO accesses
//! ([`VirtioNet::mmio_read`], [`VirtioNet::mmio_write`]), runs the receive
//! thread, pauses and resumes the device for migration, and migrates its
//! state as the section `virtio-net.<index>` ([`DeviceState`]).
//!
//! * Transmit: processed synchronously on `QueueNotify(1)`, on the vCPU
//!   thread that made the access.
//! * Receive: a thread polls the backend with a short timeout; each frame is
//!   written (12-byte `virtio_net_hdr_v1`, `num_buffers = 1`, then the frame)
//!   into the next posted receive buffer. Without a posted buffer, or before
//!   the driver is ready, the frame is read and dropped (counted).
//! * Control: `VIRTIO_NET_CTRL_ANNOUNCE_ACK` clears the announce status bit
//!   and is answered `VIRTIO_NET_OK`; everything else `VIRTIO_NET_ERR`.
//!
//! Every guest-memory access happens with the device lock held, and only
//! while the device runs: [`VirtioNet::pause`] takes the lock, so when it
//! returns nothing will read or write guest memory (or read the backend)
//! until [`VirtioNet::resume`].

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_ERR, VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_OK,
    VIRTIO_NET_S_ANNOUNCE, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use livemig::memory::GuestRam;
use livemig::state::{DeviceState, StateError, StateReader, StateWriter};

use crate::backend::FrameBackend;
use crate::mmio::{
    MmioTransport, QueueContext, QueueEvents, VirtioDevice, FEATURE_VERSION_1, MMIO_WINDOW,
};

/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Index of the control queue.
pub const CTRL_QUEUE: usize = 2;
/// `QueueNumMax` of every queue.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Size of `virtio_net_hdr_v1` (with `num_buffers`).
pub const NET_HDR_LEN: usize = 12;
/// Largest frame the device transmits or receives (a jumbo frame; the
/// contract's guest uses at most 1514 bytes).
pub const MAX_FRAME: usize = 9216;
/// Version of the `virtio-net.<i>` state section.
pub const SECTION_VERSION: u32 = 1;
/// Oldest section version restore reads.
pub const MIN_SECTION_VERSION: u32 = 1;
/// How long the receive thread waits for a frame before looking at its
/// stop/pause flags again.
const RX_POLL: Duration = Duration::from_millis(20);
/// Frames the receive thread handles per lock acquisition.
const RX_BATCH: usize = 32;
/// Longest control command accepted (class, command, data).
const MAX_CTRL: usize = 64;

/// Features offered: `VERSION_1`, `MAC`, `STATUS`, `CTRL_VQ`, `GUEST_ANNOUNCE`.
pub const NET_FEATURES: u64 = FEATURE_VERSION_1
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_STATUS)
    | (1 << VIRTIO_NET_F_CTRL_VQ)
    | (1 << VIRTIO_NET_F_GUEST_ANNOUNCE);
const LINK_UP: u16 = VIRTIO_NET_S_LINK_UP as u16;
const ANNOUNCE: u16 = VIRTIO_NET_S_ANNOUNCE as u16;
const CONFIG_LEN: usize = 8;

/// Frame counters of one NIC. Those marked *migrated* are part of the
/// device state and continue on the destination; the others describe this
/// host's backend only.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames read from the backend (delivered, dropped or discarded); not migrated.
    pub backend_rx: AtomicU64,
    /// Of those, frames whose destination MAC is the device's; not migrated.
    pub backend_rx_to_mac: AtomicU64,
    /// Frames written into the guest's receive buffers (migrated).
    pub rx_delivered: AtomicU64,
    /// Frames dropped: no receive buffer posted, driver not ready, or a
    /// buffer too small (migrated).
    pub rx_dropped: AtomicU64,
    /// Frames the guest transmitted to the backend (migrated).
    pub tx_frames: AtomicU64,
    /// Transmit chains dropped: malformed, too long, or the backend failed
    /// (not migrated).
    pub tx_dropped: AtomicU64,
}

/// A snapshot of [`NetCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    /// See [`NetCounters::backend_rx`].
    pub backend_rx: u64,
    /// See [`NetCounters::backend_rx_to_mac`].
    pub backend_rx_to_mac: u64,
    /// See [`NetCounters::rx_delivered`].
    pub rx_delivered: u64,
    /// See [`NetCounters::rx_dropped`].
    pub rx_dropped: u64,
    /// See [`NetCounters::tx_frames`].
    pub tx_frames: u64,
    /// See [`NetCounters::tx_dropped`].
    pub tx_dropped: u64,
}

impl NetCounters {
    /// Reads every counter.
    pub fn snapshot(&self) -> NetStats {
        NetStats {
            backend_rx: self.backend_rx.load(Ordering::Relaxed),
            backend_rx_to_mac: self.backend_rx_to_mac.load(Ordering::Relaxed),
            rx_delivered: self.rx_delivered.load(Ordering::Relaxed),
            rx_dropped: self.rx_dropped.load(Ordering::Relaxed),
            tx_frames: self.tx_frames.load(Ordering::Relaxed),
            tx_dropped: self.tx_dropped.load(Ordering::Relaxed),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The device model behind the transport.
pub struct NetDevice {
    mac: [u8; 6],
    status: u16,
    backend: Box<dyn FrameBackend>,
    counters: Arc<NetCounters>,
    tx_buf: Vec<u8>,
}

impl NetDevice {
    fn new(mac: [u8; 6], backend: Box<dyn FrameBackend>, counters: Arc<NetCounters>) -> Self {
        NetDevice {
            mac,
            status: LINK_UP,
            backend,
            counters,
            tx_buf: Vec::with_capacity(NET_HDR_LEN + MAX_FRAME),
        }
    }

    /// Transmits every available chain of the transmit queue.
    fn process_tx(&mut self, ctx: &mut QueueContext<'_>) -> QueueEvents {
        let mut ev = QueueEvents::default();
        let Some(q) = ctx.queues.get_mut(TX_QUEUE) else {
            return ev;
        };
        // Bounded: a driver racing new buffers in cannot keep us here.
        for _ in 0..usize::from(q.size()).saturating_mul(2) {
            let Some(chain) = q.pop_descriptor_chain(ctx.mem) else {
                break;
            };
            let head = chain.head_index();
            self.tx_buf.clear();
            let mut ok = true;
            // virtio-queue ends a chain that loops or points past the table
            // silently: a last descriptor that still says NEXT marks it.
            let mut dangling = true;
            for d in chain {
                dangling = d.has_next();
                let len = d.len() as usize;
                if d.is_write_only() || self.tx_buf.len() + len > NET_HDR_LEN + MAX_FRAME {
                    ok = false;
                    break;
                }
                let start = self.tx_buf.len();
                self.tx_buf.resize(start + len, 0);
                if ctx
                    .mem
                    .read_slice(&mut self.tx_buf[start..], d.addr())
                    .is_err()
                {
                    ok = false;
                    break;
                }
            }
            if ok && !dangling && self.tx_buf.len() > NET_HDR_LEN {
                match self.backend.send(&self.tx_buf[NET_HDR_LEN..]) {
                    Ok(()) => bump(&self.counters.tx_frames),
                    Err(e) => {
                        log::debug!("virtio-net: transmit: {e}");
                        bump(&self.counters.tx_dropped);
                    }
                }
            } else {
                log::debug!("virtio-net: malformed transmit chain at head {head}: dropped");
                bump(&self.counters.tx_dropped);
            }
            // A head index past the table cannot be returned; the rest of
            // the ring is still processed.
            match q.add_used(ctx.mem, head, 0) {
                Ok(()) => ev.used = true,
                Err(e) => log::debug!("virtio-net: transmit used ring: {e}"),
            }
        }
        ev
    }

    /// Answers every available chain of the control queue.
    fn process_ctrl(&mut self, ctx: &mut QueueContext<'_>) -> QueueEvents {
        let mut ev = QueueEvents::default();
        let Some(q) = ctx.queues.get_mut(CTRL_QUEUE) else {
            return ev;
        };
        for _ in 0..usize::from(q.size()).saturating_mul(2) {
            let Some(chain) = q.pop_descriptor_chain(ctx.mem) else {
                break;
            };
            let head = chain.head_index();
            let mut cmd = Vec::new();
            let mut ack_at: Option<GuestAddress> = None;
            let mut ok = true;
            let mut dangling = true;
            for d in chain {
                dangling = d.has_next();
                if d.is_write_only() {
                    if ack_at.is_none() && d.len() >= 1 {
                        ack_at = Some(d.addr());
                    }
                    continue;
                }
                let len = d.len() as usize;
                if ack_at.is_some() || cmd.len() + len > MAX_CTRL {
                    ok = false;
                    break;
                }
                let start = cmd.len();
                cmd.resize(start + len, 0);
                if ctx.mem.read_slice(&mut cmd[start..], d.addr()).is_err() {
                    ok = false;
                    break;
                }
            }
            let ack = if ok
                && !dangling
                && cmd.len() == 2
                && u32::from(cmd[0]) == VIRTIO_NET_CTRL_ANNOUNCE
                && u32::from(cmd[1]) == VIRTIO_NET_CTRL_ANNOUNCE_ACK
                && ctx.driver_features & (1 << VIRTIO_NET_F_GUEST_ANNOUNCE) != 0
            {
                if self.status & ANNOUNCE != 0 {
                    self.status &= !ANNOUNCE;
                    ev.config_changed = true;
                }
                VIRTIO_NET_OK as u8
            } else {
                log::debug!("virtio-net: control command {cmd:02x?} refused");
                VIRTIO_NET_ERR as u8
            };
            let written = match ack_at {
                Some(a) if ctx.mem.write_obj(ack, a).is_ok() => 1,
                _ => 0,
            };
            match q.add_used(ctx.mem, head, written) {
                Ok(()) => ev.used = true,
                Err(e) => log::debug!("virtio-net: control used ring: {e}"),
            }
        }
        ev
    }

    /// Writes one received frame into the next receive buffer. Returns
    /// whether it was delivered.
    fn deliver(&mut self, frame: &[u8], ctx: &mut QueueContext<'_>) -> (bool, QueueEvents) {
        let mut ev = QueueEvents::default();
        let Some(q) = ctx.queues.get_mut(RX_QUEUE) else {
            return (false, ev);
        };
        if !q.ready() {
            return (false, ev);
        }
        let Some(chain) = q.pop_descriptor_chain(ctx.mem) else {
            return (false, ev);
        };
        let head = chain.head_index();
        let mut hdr = [0u8; NET_HDR_LEN];
        hdr[10] = 1; // num_buffers, little endian
        let total = NET_HDR_LEN + frame.len();
        let mut off = 0usize;
        let mut failed = false;
        for d in chain.writable() {
            if off == total {
                break;
            }
            let n = (d.len() as usize).min(total - off);
            let mut addr = d.addr();
            // The part of the header still to write, then the frame.
            let mut written = 0;
            while written < n {
                let pos = off + written;
                let (src, take) = if pos < NET_HDR_LEN {
                    (&hdr[pos..], (NET_HDR_LEN - pos).min(n - written))
                } else {
                    (&frame[pos - NET_HDR_LEN..], n - written)
                };
                if ctx.mem.write_slice(&src[..take], addr).is_err() {
                    failed = true;
                    break;
                }
                addr = GuestAddress(addr.0.wrapping_add(take as u64));
                written += take;
            }
            if failed {
                break;
            }
            off += n;
        }
        let delivered = !failed && off == total;
        let used_len = if delivered { total as u32 } else { 0 };
        match q.add_used(ctx.mem, head, used_len) {
            Ok(()) => ev.used = true,
            Err(e) => log::warn!("virtio-net: receive used ring: {e}"),
        }
        (delivered, ev)
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn device_features(&self) -> u64 {
        NET_FEATURES
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX_SIZE; 3]
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        let mut cfg = [0u8; CONFIG_LEN];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..].copy_from_slice(&self.status.to_le_bytes());
        if let Some(src) = cfg.get(offset..offset + data.len()) {
            data.copy_from_slice(src);
        }
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn write_config(&mut self, offset: usize, _data: &[u8]) -> bool {
        // MAC and status are read-only for a VERSION_1 driver.
        log::debug!("virtio-net: config write at {offset:#x}: ignored");
        false
    }

    fn process_queue(&mut self, index: usize, ctx: &mut QueueContext<'_>) -> QueueEvents {
        match index {
            TX_QUEUE => self.process_tx(ctx),
            CTRL_QUEUE => self.process_ctrl(ctx),
            // New receive buffers: the receive thread uses them for the next
            // frame; frames are never held back waiting for buffers.
            _ => QueueEvents::default(),
        }
    }

    fn reset(&mut self) {
        self.status = LINK_UP;
    }
}

/// Whether the device may touch guest memory and the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// Nothing is read or written (migration, or not started yet); frames
    /// stay queued in the backend.
    Paused,
    /// Normal operation.
    Running,
    /// The guest has migrated away: frames are read from the backend and
    /// counted as dropped; guest memory is never touched again.
    Discarding,
}

struct Inner {
    transport: MmioTransport<NetDevice>,
    run: Run,
    /// Queues notified while paused, processed on resume (bit per queue).
    pending: u32,
    /// Set by a state restore: what the backend holds was queued before
    /// the restored guest ran here, and is dropped on the next resume.
    stale_backend: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    wake: Condvar,
    stop: AtomicBool,
    counters: Arc<NetCounters>,
    /// The backend's pollable descriptor. The backend lives inside `inner`
    /// for as long as `Shared` does, so the descriptor stays open while the
    /// receive thread (which holds an `Arc<Shared>`) polls it.
    fd: RawFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Errors creating a device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The interrupt eventfd could not be created.
    #[error("virtio-net {index}: interrupt eventfd: {source}")]
    EventFd {
        /// Device index.
        index: usize,
        /// OS error.
        source: io::Error,
    },
    /// The receive thread could not be started.
    #[error("virtio-net {index}: receive thread: {source}")]
    Thread {
        /// Device index.
        index: usize,
        /// OS error.
        source: io::Error,
    },
}

/// A virtio-net device on virtio-mmio, with its receive thread.
///
/// Created paused: call [`VirtioNet::attach_memory`] once the guest memory
/// exists, then [`VirtioNet::resume`] when the guest runs.
pub struct VirtioNet {
    index: usize,
    mac: [u8; 6],
    irq: Arc<EventFd>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VirtioNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioNet")
            .field("index", &self.index)
            .field("mac", &self.mac)
            .finish_non_exhaustive()
    }
}

impl VirtioNet {
    /// Device number `index` (it names the state section `virtio-net.<index>`)
    /// with MAC `mac`, exchanging frames with `backend`.
    pub fn new(
        index: usize,
        mac: [u8; 6],
        backend: Box<dyn FrameBackend>,
    ) -> Result<Self, NetError> {
        let irq = Arc::new(
            EventFd::new(EFD_NONBLOCK).map_err(|source| NetError::EventFd { index, source })?,
        );
        let counters = Arc::new(NetCounters::default());
        let fd = backend.poll_fd().as_raw_fd();
        let device = NetDevice::new(mac, backend, counters.clone());
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                transport: MmioTransport::new(device, irq.clone()),
                run: Run::Paused,
                pending: 0,
                stale_backend: false,
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            counters,
            fd,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("virtio-net{index}-rx"))
            .spawn(move || rx_loop(&s, mac))
            .map_err(|source| NetError::Thread { index, source })?;
        Ok(VirtioNet {
            index,
            mac,
            irq,
            shared,
            thread: Some(thread),
        })
    }

    /// The interrupt eventfd, to register as an irqfd for the device's GSI.
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq
    }

    /// The device's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The frame counters.
    pub fn counters(&self) -> &Arc<NetCounters> {
        &self.shared.counters
    }

    /// Gives the device the guest memory (before the guest runs or a restore).
    pub fn attach_memory(&self, mem: GuestRam) {
        self.shared.lock().transport.attach_memory(mem);
    }

    /// Handles a guest read at `offset` in the device's window.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > MMIO_WINDOW)
        {
            data.fill(0);
            return;
        }
        self.shared.lock().transport.read(offset, data);
    }

    /// Handles a guest write at `offset` in the device's window. A queue
    /// notification arriving while the device is paused is remembered and
    /// processed on [`VirtioNet::resume`].
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > MMIO_WINDOW)
        {
            return;
        }
        let mut g = self.shared.lock();
        if offset == 0x050 && g.run != Run::Running {
            if g.run == Run::Paused {
                if let Some(q) = <[u8; 4]>::try_from(data)
                    .ok()
                    .map(u32::from_le_bytes)
                    .filter(|&q| q < 32)
                {
                    g.pending |= 1 << q;
                }
            }
            return;
        }
        g.transport.write(offset, data);
    }

    /// Stops the device: when this returns, the device reads and writes no
    /// guest memory and reads no frames until [`VirtioNet::resume`].
    pub fn pause(&self) {
        self.shared.lock().run = Run::Paused;
    }

    /// Lets the device run again, first processing queue notifications the
    /// guest made while it was paused.
    ///
    /// The first resume after a state restore (an incoming migration) first
    /// drops the frames already queued on the backend: they are flooded
    /// copies of traffic the source handled, or arrived before the guest
    /// ran here, and handing them to the guest late would make it answer
    /// stale requests from the new port (an ARP reply that moves a bridge's
    /// entry without any announce, a duplicate echo reply). They are counted
    /// as received and dropped.
    pub fn resume(&self) {
        let mut g = self.shared.lock();
        if std::mem::take(&mut g.stale_backend) {
            let n = self.drain_backend(&mut g);
            if n > 0 {
                log::info!(
                    "virtio-net {}: dropped {n} frame(s) queued before the restored guest ran",
                    livemig_announce::format_mac(&self.mac)
                );
            }
        }
        g.run = Run::Running;
        let pending = std::mem::take(&mut g.pending);
        for q in 0..32u32 {
            if pending & (1 << q) != 0 {
                g.transport.write(0x050, &q.to_le_bytes());
            }
        }
        drop(g);
        self.shared.wake.notify_all();
    }

    /// Keeps the frames queued on the backend for the guest at the next
    /// resume, instead of dropping them (see [`VirtioNet::resume`]): for a
    /// same-host hand-over, where the backend is the source's own TAP and
    /// what it holds arrived for this guest while it was paused.
    pub fn keep_queued_frames(&self) {
        self.shared.lock().stale_backend = false;
    }

    /// Reads and drops every frame already queued on the backend (counted
    /// as received and dropped) and returns how many there were — for a
    /// source whose guest has migrated away, before it exits.
    pub fn drop_queued(&self) -> u64 {
        let mut g = self.shared.lock();
        self.drain_backend(&mut g)
    }

    fn drain_backend(&self, g: &mut Inner) -> u64 {
        let mac = self.mac;
        let mut buf = vec![0u8; MAX_FRAME + 1];
        let mut n = 0;
        while let Ok(Some(len)) = g.transport.device_mut().backend.recv(&mut buf) {
            let c = &self.shared.counters;
            bump(&c.backend_rx);
            if len >= 6 && buf[..6] == mac {
                bump(&c.backend_rx_to_mac);
            }
            bump(&c.rx_dropped);
            n += 1;
        }
        n
    }

    /// The guest has migrated away for good: from now on frames arriving on
    /// the backend are read and counted as dropped, and guest memory is
    /// never touched again.
    pub fn discard(&self) {
        self.shared.lock().run = Run::Discarding;
        self.shared.wake.notify_all();
    }

    /// Asks the guest driver to announce itself (`VIRTIO_NET_S_ANNOUNCE`, a
    /// configuration-generation bump and a configuration interrupt), if it
    /// negotiated `VIRTIO_NET_F_GUEST_ANNOUNCE` and reached `DRIVER_OK`.
    /// Returns whether the request was made.
    pub fn announce(&self) -> bool {
        let mut g = self.shared.lock();
        let t = &mut g.transport;
        if !t.is_active() || t.driver_features() & (1 << VIRTIO_NET_F_GUEST_ANNOUNCE) == 0 {
            return false;
        }
        t.device_mut().status |= ANNOUNCE;
        t.notify_config_change();
        true
    }

    /// The device status register and whether the announce bit is set
    /// (diagnostics and tests).
    pub fn status(&self) -> (u32, bool) {
        let g = self.shared.lock();
        (
            g.transport.status(),
            g.transport.device().status & ANNOUNCE != 0,
        )
    }

    /// The device's next available and next used index of queue `i`
    /// (diagnostics and tests).
    pub fn queue_indices(&self, i: usize) -> Option<(u16, u16)> {
        let g = self.shared.lock();
        g.transport
            .queues()
            .get(i)
            .map(|q: &Queue| (q.next_avail(), q.next_used()))
    }

    fn section(&self) -> String {
        format!("virtio-net.{}", self.index)
    }
}

impl Drop for VirtioNet {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The receive thread: waits while paused, polls the backend, and hands
/// frames to the guest (or drops them), all guest-memory work under the lock.
fn rx_loop(shared: &Shared, mac: [u8; 6]) {
    let mut buf = vec![0u8; MAX_FRAME + 1];
    while !shared.stop.load(Ordering::Relaxed) {
        {
            let g = shared.lock();
            if g.run == Run::Paused {
                let _ = shared
                    .wake
                    .wait_timeout(g, RX_POLL)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
        }
        let mut pfd = libc::pollfd {
            fd: shared.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid `pollfd` for the duration of the call; the
        // descriptor stays open while `shared` lives (see `Shared::fd`).
        let r = unsafe { libc::poll(&mut pfd, 1, RX_POLL.as_millis() as libc::c_int) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                log::warn!("virtio-net: poll: {e}");
                std::thread::sleep(RX_POLL);
            }
            continue;
        }
        if r == 0 {
            continue;
        }
        if pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
            && pfd.revents & libc::POLLIN == 0
        {
            log::warn!("virtio-net: backend poll events {:#x}", pfd.revents);
            std::thread::sleep(RX_POLL);
            continue;
        }
        let mut g = shared.lock();
        let mut failed = false;
        for _ in 0..RX_BATCH {
            if g.run == Run::Paused {
                break;
            }
            let n = match g.transport.device_mut().backend.recv(&mut buf) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    log::warn!("virtio-net: receive: {e}");
                    failed = true;
                    break;
                }
            };
            let c = &shared.counters;
            bump(&c.backend_rx);
            if n >= 6 && buf[..6] == mac {
                bump(&c.backend_rx_to_mac);
            }
            let frame = &buf[..n];
            let delivered = g.run == Run::Running
                && n <= MAX_FRAME
                && g.transport
                    .with_queues(|dev, ctx| dev.deliver(frame, ctx))
                    .unwrap_or(false);
            bump(if delivered {
                &c.rx_delivered
            } else {
                &c.rx_dropped
            });
        }
        drop(g);
        if failed {
            // A backend in error stays readable: do not spin on it.
            std::thread::sleep(RX_POLL);
        }
    }
}

impl DeviceState for VirtioNet {
    fn section_name(&self) -> String {
        self.section()
    }

    fn section_version(&self) -> u32 {
        SECTION_VERSION
    }

    fn min_section_version(&self) -> u32 {
        MIN_SECTION_VERSION
    }

    /// Version 1: the transport state (see `docs/virtio-net.md`), then the
    /// MAC (6 bytes), the config status (u16) and the migrated counters
    /// (rx delivered, rx dropped, tx frames; u64 each).
    fn save(&self) -> Result<Vec<u8>, StateError> {
        let g = self.shared.lock();
        let mut w = StateWriter::new();
        g.transport.save(&mut w);
        let dev = g.transport.device();
        let c = &self.shared.counters;
        w.bytes(&dev.mac)
            .u16(dev.status)
            .u64(c.rx_delivered.load(Ordering::Relaxed))
            .u64(c.rx_dropped.load(Ordering::Relaxed))
            .u64(c.tx_frames.load(Ordering::Relaxed));
        Ok(w.finish())
    }

    /// Validates everything, then applies it; on error the device is
    /// unchanged. Refuses a state whose MAC is not this device's.
    fn restore(&mut self, version: u32, data: &[u8]) -> Result<(), StateError> {
        let name = self.section();
        if !(MIN_SECTION_VERSION..=SECTION_VERSION).contains(&version) {
            return Err(StateError::UnsupportedVersion {
                name,
                got: version,
                min: MIN_SECTION_VERSION,
                max: SECTION_VERSION,
            });
        }
        let bad = |reason: String| StateError::Malformed {
            name: name.clone(),
            reason,
        };
        let mut g = self.shared.lock();
        let mut r = StateReader::new(&name, data);
        let common = g.transport.decode_state(&name, &mut r)?;
        let mac: [u8; 6] = r.array()?;
        let status = r.u16()?;
        let rx_delivered = r.u64()?;
        let rx_dropped = r.u64()?;
        let tx_frames = r.u64()?;
        r.finish()?;
        if mac != self.mac {
            return Err(bad(format!(
                "the state is for MAC {}, this device has {}",
                livemig_announce::format_mac(&mac),
                livemig_announce::format_mac(&self.mac)
            )));
        }
        if status & !(LINK_UP | ANNOUNCE) != 0 || status & LINK_UP == 0 {
            return Err(bad(format!("config status {status:#x} is invalid")));
        }
        g.transport.commit_state(common);
        g.transport.device_mut().status = status;
        g.stale_backend = true;
        let c = &self.shared.counters;
        c.rx_delivered.store(rx_delivered, Ordering::Relaxed);
        c.rx_dropped.store(rx_dropped, Ordering::Relaxed);
        c.tx_frames.store(tx_frames, Ordering::Relaxed);
        Ok(())
    }
}
