//! A small virtio-net driver, written from the virtio 1.2 spec, drives the
//! device through its MMIO registers and guest memory.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use livemig::memory::GuestRam;
use livemig::state::{DeviceState, Section, StateError};
use livemig_virtio::{PairBackend, VirtioNet};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const MEM_SIZE: usize = 16 << 20;

// Registers.
const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEV_FEATURES: u64 = 0x010;
const DEV_FEATURES_SEL: u64 = 0x014;
const DRV_FEATURES: u64 = 0x020;
const DRV_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const ISR: u64 = 0x060;
const ISR_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const DESC_LO: u64 = 0x080;
const DESC_HI: u64 = 0x084;
const AVAIL_LO: u64 = 0x090;
const AVAIL_HI: u64 = 0x094;
const USED_LO: u64 = 0x0a0;
const USED_HI: u64 = 0x0a4;
const GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

const S_ACK: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 0x40;

const F_VERSION_1: u64 = 1 << 32;
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const F_CTRL_VQ: u64 = 1 << 17;
const F_GUEST_ANNOUNCE: u64 = 1 << 21;
const ALL: u64 = F_VERSION_1 | F_MAC | F_STATUS | F_CTRL_VQ | F_GUEST_ANNOUNCE;

const D_NEXT: u16 = 1;
const D_WRITE: u16 = 2;

const QSIZE: u16 = 16;
const BUF: u64 = 2048;

fn ring_base(q: u64) -> u64 {
    0x20_0000 + q * 0x1_0000
}
fn desc_addr(q: u64) -> u64 {
    ring_base(q)
}
fn avail_addr(q: u64) -> u64 {
    ring_base(q) + 0x1000
}
fn used_addr(q: u64) -> u64 {
    ring_base(q) + 0x2000
}
fn buf_addr(q: u64, d: u16) -> u64 {
    0x40_0000 + q * 0x10_0000 + u64::from(d) * BUF
}

fn memory() -> GuestRam {
    GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

struct Driver {
    nic: VirtioNet,
    mem: GuestRam,
    net: UnixDatagram,
    /// Per queue: next free descriptor slot and the driver's avail idx.
    next_desc: [u16; 3],
    avail_idx: [u16; 3],
    /// Per queue: the last used idx the driver consumed.
    seen_used: [u16; 3],
}

impl Driver {
    fn new() -> Driver {
        let mem = memory();
        let (backend, net) = PairBackend::new().unwrap();
        net.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let nic = VirtioNet::new(0, MAC, Box::new(backend)).unwrap();
        nic.attach_memory(mem.clone());
        nic.resume();
        Driver {
            nic,
            mem,
            net,
            next_desc: [0; 3],
            avail_idx: [0; 3],
            seen_used: [0; 3],
        }
    }

    fn w(&self, off: u64, v: u32) {
        self.nic.mmio_write(off, &v.to_le_bytes());
    }
    fn r(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.nic.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn status(&self) -> u32 {
        self.r(STATUS)
    }

    /// Spec 3.1.1 up to FEATURES_OK; returns whether FEATURES_OK stuck.
    fn negotiate(&self, features: u64) -> bool {
        self.w(STATUS, 0);
        self.w(STATUS, S_ACK);
        self.w(STATUS, S_ACK | S_DRIVER);
        self.w(DRV_FEATURES_SEL, 0);
        self.w(DRV_FEATURES, features as u32);
        self.w(DRV_FEATURES_SEL, 1);
        self.w(DRV_FEATURES, (features >> 32) as u32);
        self.w(STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        self.status() & S_FEATURES_OK != 0
    }

    fn setup_queue(&self, q: u32) {
        self.setup_queue_at(
            q,
            QSIZE as u32,
            desc_addr(q.into()),
            avail_addr(q.into()),
            used_addr(q.into()),
        );
    }

    fn setup_queue_at(&self, q: u32, size: u32, desc: u64, avail: u64, used: u64) {
        self.w(QUEUE_SEL, q);
        self.w(QUEUE_NUM, size);
        self.w(DESC_LO, desc as u32);
        self.w(DESC_HI, (desc >> 32) as u32);
        self.w(AVAIL_LO, avail as u32);
        self.w(AVAIL_HI, (avail >> 32) as u32);
        self.w(USED_LO, used as u32);
        self.w(USED_HI, (used >> 32) as u32);
        self.w(QUEUE_READY, 1);
    }

    /// Full init with all features and three queues, DRIVER_OK.
    fn init(&mut self) {
        assert!(self.negotiate(ALL));
        for q in 0..3 {
            self.setup_queue(q);
            assert_eq!(self.r(QUEUE_READY), 1, "queue {q} ready");
        }
        self.w(STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        assert_eq!(
            self.status(),
            S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
        );
    }

    fn write_desc(&self, q: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(desc_addr(q) + u64::from(i) * 16);
        self.mem.write_obj(addr, a).unwrap();
        self.mem.write_obj(len, a.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, a.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, a.unchecked_add(14)).unwrap();
    }

    /// Makes descriptor `head` available on queue `q` (without notifying).
    fn make_avail(&mut self, q: usize, head: u16) {
        let qa = q as u64;
        let slot = self.avail_idx[q] % QSIZE;
        self.mem
            .write_obj(head, GuestAddress(avail_addr(qa) + 4 + 2 * u64::from(slot)))
            .unwrap();
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(avail_addr(qa) + 2))
            .unwrap();
    }

    fn alloc_desc(&mut self, q: usize) -> u16 {
        let d = self.next_desc[q];
        self.next_desc[q] = (d + 1) % QSIZE;
        d
    }

    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let d = self.alloc_desc(0);
            self.write_desc(0, d, buf_addr(0, d), BUF as u32, D_WRITE, 0);
            self.make_avail(0, d);
        }
        self.w(QUEUE_NOTIFY, 0);
    }

    /// Queues a frame on the transmit queue (header + frame in one
    /// descriptor); notifies if `notify`.
    fn queue_tx(&mut self, frame: &[u8], notify: bool) -> u16 {
        let d = self.alloc_desc(1);
        let mut b = vec![0u8; 12];
        b.extend_from_slice(frame);
        self.mem
            .write_slice(&b, GuestAddress(buf_addr(1, d)))
            .unwrap();
        self.write_desc(1, d, buf_addr(1, d), b.len() as u32, 0, 0);
        self.make_avail(1, d);
        if notify {
            self.w(QUEUE_NOTIFY, 1);
        }
        d
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(used_addr(q as u64) + 2))
            .unwrap()
    }

    /// The used element at ring position `pos`: (id, len).
    fn used_elem(&self, q: usize, pos: u16) -> (u32, u32) {
        let a = used_addr(q as u64) + 4 + 8 * u64::from(pos % QSIZE);
        (
            self.mem.read_obj(GuestAddress(a)).unwrap(),
            self.mem.read_obj(GuestAddress(a + 4)).unwrap(),
        )
    }

    /// Waits for the next used element of `q`.
    fn next_used(&mut self, q: usize) -> (u32, u32) {
        let t0 = Instant::now();
        let mut spins = 0u32;
        while self.used_idx(q) == self.seen_used[q] {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "no used buffer on queue {q}"
            );
            spins += 1;
            if spins < 10_000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let e = self.used_elem(q, self.seen_used[q]);
        self.seen_used[q] = self.seen_used[q].wrapping_add(1);
        e
    }

    fn read_buf(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    fn config_status(&self) -> u16 {
        let mut b = [0u8; 2];
        self.nic.mmio_read(CONFIG + 6, &mut b);
        u16::from_le_bytes(b)
    }

    /// Sends an announce ack on the control queue; returns the ack byte.
    fn ctrl(&mut self, cmd: &[u8]) -> u8 {
        let d0 = self.alloc_desc(2);
        let d1 = self.alloc_desc(2);
        let a0 = buf_addr(2, d0);
        let a1 = buf_addr(2, d1);
        self.mem.write_slice(cmd, GuestAddress(a0)).unwrap();
        self.mem.write_obj(0xaau8, GuestAddress(a1)).unwrap();
        self.write_desc(2, d0, a0, cmd.len() as u32, D_NEXT, d1);
        self.write_desc(2, d1, a1, 1, D_WRITE, 0);
        self.make_avail(2, d0);
        self.w(QUEUE_NOTIFY, 2);
        let (id, len) = self.next_used(2);
        assert_eq!((id, len), (u32::from(d0), 1));
        self.mem.read_obj(GuestAddress(a1)).unwrap()
    }
}

fn frame(tag: u8, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&MAC);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, tag]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    for (i, b) in f.iter_mut().enumerate().skip(14) {
        *b = tag ^ (i as u8);
    }
    f
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(5), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn identification_and_negotiation() {
    let d = Driver::new();
    assert_eq!(d.r(MAGIC), 0x7472_6976);
    assert_eq!(d.r(VERSION), 2);
    assert_eq!(d.r(DEVICE_ID), 1);
    d.w(DEV_FEATURES_SEL, 0);
    let lo = u64::from(d.r(DEV_FEATURES));
    d.w(DEV_FEATURES_SEL, 1);
    let hi = u64::from(d.r(DEV_FEATURES));
    assert_eq!(lo | hi << 32, ALL);
    d.w(QUEUE_SEL, 0);
    assert_eq!(d.r(QUEUE_NUM_MAX), 256);
    d.w(QUEUE_SEL, 3);
    assert_eq!(d.r(QUEUE_NUM_MAX), 0, "no queue 3");
    let mut mac = [0u8; 6];
    d.nic.mmio_read(CONFIG, &mut mac);
    assert_eq!(mac, MAC);
    assert_eq!(d.config_status(), 1, "link up");
    // Without VERSION_1, or with a feature not offered, FEATURES_OK is refused.
    assert!(!d.negotiate(F_MAC));
    assert!(!d.negotiate(ALL | 1 << 0));
    assert!(d.negotiate(F_VERSION_1 | F_MAC));
    // DRIVER_OK without FEATURES_OK is refused.
    d.w(STATUS, 0);
    d.w(STATUS, S_ACK | S_DRIVER | S_DRIVER_OK);
    assert_eq!(d.status() & S_DRIVER_OK, 0);
    // Bits cannot be cleared except by a reset; features are frozen after
    // FEATURES_OK; queue registers are frozen after DRIVER_OK.
    let mut d = Driver::new();
    d.init();
    d.w(STATUS, S_ACK);
    assert_eq!(d.status(), S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    d.w(DRV_FEATURES_SEL, 0);
    d.w(DRV_FEATURES, 0);
    d.w(QUEUE_SEL, 0);
    d.w(QUEUE_NUM, 4);
    d.w(DESC_LO, 0x1000);
    d.w(QUEUE_READY, 0);
    assert_eq!(d.r(QUEUE_NUM), u32::from(QSIZE));
    assert_eq!(u64::from(d.r(DESC_LO)), desc_addr(0));
    assert_eq!(d.r(QUEUE_READY), 1);
    d.post_rx(1);
    d.net.send(&frame(9, 60)).unwrap();
    assert_eq!(d.next_used(0), (0, 72), "still fully working");
    // A reset stops everything; the device then drops frames.
    d.w(STATUS, 0);
    assert_eq!((d.status(), d.r(QUEUE_READY), d.r(ISR)), (0, 0, 0));
    d.net.send(&frame(10, 60)).unwrap();
    wait_for("dropped after reset", || {
        d.nic.counters().snapshot().rx_dropped == 1
    });
}

#[test]
fn transmit_reaches_the_backend() {
    let mut d = Driver::new();
    d.init();
    let f = frame(1, 60);
    let head = d.queue_tx(&f, true);
    let mut buf = [0u8; 2048];
    let n = d.net.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &f[..], "frame without the header");
    assert_eq!(d.next_used(1), (u32::from(head), 0));
    assert_eq!(d.r(ISR) & 1, 1, "used-buffer interrupt");
    assert!(d.nic.irq_evt().read().unwrap() >= 1);
    d.w(ISR_ACK, 1);
    assert_eq!(d.r(ISR) & 1, 0);
    assert_eq!(d.nic.counters().snapshot().tx_frames, 1);
}

#[test]
fn receive_fills_a_posted_buffer_with_the_header() {
    let mut d = Driver::new();
    d.init();
    d.post_rx(2);
    // Forget the driver's own writes: what is dirty next is the device's.
    let mem = d.mem.clone();
    let bitmap = || vm_memory::MmapRegion::bitmap(mem.find_region(GuestAddress(0)).unwrap());
    bitmap().reset();
    assert!(!bitmap().dirty_at(buf_addr(0, 0) as usize));
    let f = frame(2, 1514);
    d.net.send(&f).unwrap();
    let (id, len) = d.next_used(0);
    assert_eq!((id, len as usize), (0, 12 + f.len()));
    let got = d.read_buf(buf_addr(0, 0), 12 + f.len());
    assert_eq!(
        &got[..12],
        &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        "hdr, num_buffers=1"
    );
    assert_eq!(&got[12..], &f[..]);
    // The device's write is in vm-memory's dirty bitmap.
    assert!(bitmap().dirty_at(buf_addr(0, 0) as usize));
    assert!(bitmap().dirty_at(used_addr(0) as usize));
    assert_eq!(d.r(ISR) & 1, 1);
    let s = d.nic.counters().snapshot();
    assert_eq!(
        (s.rx_delivered, s.backend_rx, s.backend_rx_to_mac),
        (1, 1, 1)
    );
}

#[test]
fn frames_without_buffers_are_dropped_and_counted() {
    let mut d = Driver::new();
    d.init();
    d.net.send(&frame(3, 100)).unwrap();
    wait_for("drop counted", || {
        d.nic.counters().snapshot().rx_dropped == 1
    });
    d.post_rx(1);
    d.net.send(&frame(4, 100)).unwrap();
    let (id, _) = d.next_used(0);
    assert_eq!(id, 0);
    assert_eq!(d.read_buf(buf_addr(0, 0) + 12 + 20, 1), vec![4 ^ 20]);
}

#[test]
fn announce_and_its_ack() {
    let mut d = Driver::new();
    // Before DRIVER_OK: no announce.
    assert!(!d.nic.announce());
    d.init();
    let gen0 = d.r(GENERATION);
    let _ = d.nic.irq_evt().read();
    assert!(d.nic.announce());
    assert_eq!(d.config_status(), 3, "link up + announce");
    assert_eq!(d.r(GENERATION), gen0 + 1);
    assert_eq!(d.r(ISR) & 2, 2, "config interrupt");
    assert!(d.nic.irq_evt().read().unwrap() >= 1);
    // An unknown command is refused and leaves the bit.
    assert_eq!(d.ctrl(&[0, 0]), 1, "VIRTIO_NET_ERR");
    assert_eq!(d.config_status(), 3);
    assert_eq!(d.ctrl(&[3, 0]), 0, "VIRTIO_NET_OK");
    assert_eq!(d.config_status(), 1, "announce cleared");
    assert!(d.r(GENERATION) > gen0 + 1);
    // Without GUEST_ANNOUNCE negotiated the device does not ask.
    let mut e = Driver::new();
    assert!(e.negotiate(F_VERSION_1 | F_MAC | F_CTRL_VQ));
    for q in 0..3 {
        e.setup_queue(q);
    }
    e.w(STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    assert!(!e.nic.announce());
    assert_eq!(e.ctrl(&[3, 0]), 1);
}

#[test]
fn bad_queue_setup_sets_needs_reset() {
    let d = Driver::new();
    assert!(d.negotiate(ALL));
    d.setup_queue_at(0, 3, desc_addr(0), avail_addr(0), used_addr(0));
    assert_ne!(d.status() & S_NEEDS_RESET, 0, "size 3");
    assert_eq!(d.r(ISR) & 2, 2);
    // Reset clears it.
    assert!(d.negotiate(ALL));
    assert_eq!(d.status() & S_NEEDS_RESET, 0);
    d.setup_queue_at(0, 512, desc_addr(0), avail_addr(0), used_addr(0));
    assert_ne!(d.status() & S_NEEDS_RESET, 0, "size over max");
    assert!(d.negotiate(ALL));
    d.setup_queue_at(0, 16, MEM_SIZE as u64 - 8, avail_addr(0), used_addr(0));
    assert_ne!(d.status() & S_NEEDS_RESET, 0, "desc table past memory");
    assert_eq!(d.r(QUEUE_READY), 0);
    assert!(d.negotiate(ALL));
    d.setup_queue_at(0, 16, desc_addr(0), avail_addr(0), 1 << 40);
    assert_ne!(d.status() & S_NEEDS_RESET, 0, "used ring far outside");
    // A ready queue can be disabled (and reconfigured) before DRIVER_OK.
    assert!(d.negotiate(ALL));
    d.setup_queue(0);
    assert_eq!(d.r(QUEUE_READY), 1);
    d.w(QUEUE_READY, 0);
    assert_eq!(d.r(QUEUE_READY), 0);
    d.w(QUEUE_NUM, 8);
    assert_eq!(d.r(QUEUE_NUM), 8);
    d.w(QUEUE_READY, 1);
    assert_eq!(d.r(QUEUE_READY), 1);
    assert_eq!(d.status() & S_NEEDS_RESET, 0);
    d.setup_queue_at(0, 16, desc_addr(0) + 1, avail_addr(0), used_addr(0));
    assert_eq!(
        d.status() & S_NEEDS_RESET,
        0,
        "ready queue: registers ignored"
    );
    d.w(QUEUE_READY, 0);
    d.setup_queue_at(0, 16, desc_addr(0) + 1, avail_addr(0), used_addr(0));
    assert_ne!(d.status() & S_NEEDS_RESET, 0, "misaligned");
    // A device that needs a reset does nothing on DRIVER_OK + notify.
    d.w(STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    d.w(QUEUE_NOTIFY, 1);
}

#[test]
fn hostile_register_traffic_does_not_panic() {
    let d = Driver::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..200_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x >> 8) % 0x210;
        let v = (x >> 20) as u32;
        let len = [1usize, 2, 4, 8, 3][(x % 5) as usize];
        let bytes = (u64::from(v) | u64::from(v) << 32).to_le_bytes();
        if x & 0x100 != 0 {
            d.nic.mmio_write(off, &bytes[..len]);
        } else {
            let mut b = vec![0u8; len];
            d.nic.mmio_read(off, &mut b);
        }
    }
    // Offsets past the window are ignored.
    d.nic.mmio_write(u64::MAX - 1, &[1, 2, 3, 4]);
    let mut b = [0xffu8; 4];
    d.nic.mmio_read(0x1ff, &mut b);
    assert_eq!(b, [0; 4]);
}

#[test]
fn hostile_descriptor_chains_do_not_panic() {
    let mut d = Driver::new();
    d.init();
    // A chain that loops on itself.
    d.write_desc(1, 0, buf_addr(1, 0), 64, D_NEXT, 0);
    d.make_avail(1, 0);
    // A descriptor outside guest memory.
    d.write_desc(1, 1, 1 << 40, 64, 0, 0);
    d.make_avail(1, 1);
    // A huge length.
    d.write_desc(1, 2, buf_addr(1, 2), u32::MAX, 0, 0);
    d.make_avail(1, 2);
    // A chain pointing at a descriptor index past the table.
    d.write_desc(1, 3, buf_addr(1, 3), 64, D_NEXT, 999);
    d.make_avail(1, 3);
    // A head index past the table.
    d.make_avail(1, 1000);
    // A write-only descriptor on the transmit queue.
    d.write_desc(1, 4, buf_addr(1, 4), 64, D_WRITE, 0);
    d.make_avail(1, 4);
    d.w(QUEUE_NOTIFY, 1);
    let s = d.nic.counters().snapshot();
    assert_eq!(s.tx_frames, 0, "nothing valid was sent: {s:?}");
    assert!(s.tx_dropped >= 4, "{s:?}");
    // An avail index far ahead of the device (more than the queue size).
    d.mem
        .write_obj(
            d.avail_idx[1].wrapping_add(1000),
            GuestAddress(avail_addr(1) + 2),
        )
        .unwrap();
    d.w(QUEUE_NOTIFY, 1);
    // RX into a buffer too small, and one outside memory.
    d.write_desc(0, 0, buf_addr(0, 0), 20, D_WRITE, 0);
    d.make_avail(0, 0);
    d.write_desc(0, 1, 1 << 40, 2048, D_WRITE, 0);
    d.make_avail(0, 1);
    d.w(QUEUE_NOTIFY, 0);
    d.net.send(&frame(5, 200)).unwrap();
    d.net.send(&frame(6, 200)).unwrap();
    assert_eq!(d.next_used(0), (0, 0), "too small: returned empty");
    assert_eq!(d.next_used(0), (1, 0), "outside memory: returned empty");
    wait_for("both dropped", || {
        d.nic.counters().snapshot().rx_dropped == 2
    });
    // Still works after all that.
    d.next_desc[0] = 2;
    d.post_rx(1);
    d.net.send(&frame(7, 64)).unwrap();
    assert_eq!(d.next_used(0), (2, 76));
}

fn save(nic: &VirtioNet) -> Section {
    nic.save_section().unwrap()
}

/// A fresh device on `mem` with the same MAC, paused, restored from `s`.
fn restored(
    mem: &GuestRam,
    s: &Section,
    mac: [u8; 6],
) -> (VirtioNet, UnixDatagram, Result<(), StateError>) {
    let (backend, net) = PairBackend::new().unwrap();
    net.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut nic = VirtioNet::new(0, mac, Box::new(backend)).unwrap();
    nic.attach_memory(mem.clone());
    let r = nic.restore_section(s);
    (nic, net, r)
}

fn copy_memory(mem: &GuestRam) -> GuestRam {
    let dst = memory();
    let mut buf = vec![0u8; MEM_SIZE];
    mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
    dst.write_slice(&buf, GuestAddress(0)).unwrap();
    dst
}

#[test]
fn state_round_trip_is_identical_and_versions_are_checked() {
    let mut d = Driver::new();
    d.init();
    d.post_rx(3);
    d.queue_tx(&frame(8, 60), true);
    d.net.recv(&mut [0u8; 2048]).unwrap();
    d.nic.announce();
    d.nic.pause();
    let s1 = save(&d.nic);
    assert_eq!(s1.name, "virtio-net.0");
    assert_eq!(s1.version, 1);
    assert_eq!(s1.data.len(), 158, "layout of docs/virtio-net.md");
    let (nic2, _net2, r) = restored(&d.mem, &s1, MAC);
    r.unwrap();
    assert_eq!(save(&nic2), s1, "save -> restore -> save is identical");
    assert_eq!(nic2.status(), d.nic.status());

    // A future version is refused, naming the section and version.
    let future = Section::new("virtio-net.0", 2, s1.data.clone());
    let (_n, _x, r) = restored(&d.mem, &future, MAC);
    let e = r.unwrap_err();
    assert!(
        matches!(e, StateError::UnsupportedVersion { got: 2, .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains("virtio-net.0") && e.to_string().contains("version 2"),
        "{e}"
    );

    // Another MAC is refused.
    let (_n, _x, r) = restored(&d.mem, &s1, [2, 0, 0, 0, 0, 1]);
    assert!(r.unwrap_err().to_string().contains("MAC"));

    // Truncations, trailing bytes and corrupted fields are refused and
    // leave the device as it was.
    let (mut fresh, _x, _) = restored(&d.mem, &Section::new("x", 1, vec![]), MAC);
    let before = save(&fresh);
    for len in 0..s1.data.len() {
        assert!(
            fresh.restore(1, &s1.data[..len]).is_err(),
            "truncated at {len}"
        );
    }
    let mut t = s1.data.clone();
    t.push(0);
    assert!(fresh.restore(1, &t).is_err());
    // status (offset 0): unknown bits.
    let mut t = s1.data.clone();
    t[0] |= 0x20;
    assert!(fresh.restore(1, &t).is_err());
    // driver features (offset 12): a feature not offered.
    let mut t = s1.data.clone();
    t[12] |= 1;
    assert!(fresh.restore(1, &t).is_err());
    // queue count (offset 32).
    let mut t = s1.data.clone();
    t[32] = 4;
    assert!(fresh.restore(1, &t).is_err());
    // queue 0 size (offset 33): not a power of two; then over the max.
    let mut t = s1.data.clone();
    t[33..35].copy_from_slice(&3u16.to_le_bytes());
    assert!(fresh.restore(1, &t).is_err());
    t[33..35].copy_from_slice(&512u16.to_le_bytes());
    assert!(fresh.restore(1, &t).is_err());
    // queue 0 used ring (offset 33+2+1+16): outside memory.
    let mut t = s1.data.clone();
    t[52..60].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(fresh
        .restore(1, &t)
        .unwrap_err()
        .to_string()
        .contains("not inside guest memory"));
    // Arbitrary bytes never panic.
    for len in 0..200usize {
        let data: Vec<u8> = (0..len).map(|i| (i * 31 + len * 7) as u8).collect();
        let _ = fresh.restore(1, &data);
    }
    assert_eq!(save(&fresh), before, "unchanged after refused restores");
}

#[test]
fn in_flight_state_migrates_without_loss_or_repeat() {
    let mut d = Driver::new();
    d.init();
    // Four receive buffers posted; one frame delivered before migration.
    d.post_rx(4);
    d.net.send(&frame(10, 100)).unwrap();
    assert_eq!(d.next_used(0).0, 0);
    // Two transmit chains: one sent, one made available but not yet notified.
    d.queue_tx(&frame(11, 60), true);
    let mut buf = [0u8; 2048];
    d.net.recv(&mut buf).unwrap();
    assert_eq!(d.next_used(1).0, 0);
    let pending_tx = d.queue_tx(&frame(12, 60), false);

    // Pause: frames arriving now stay in the backend.
    d.nic.pause();
    d.net.send(&frame(13, 100)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(d.used_idx(0), 1, "nothing delivered while paused");
    assert_eq!(
        d.nic.counters().snapshot().backend_rx,
        1,
        "nothing read while paused"
    );
    let s = save(&d.nic);
    assert_eq!(d.nic.queue_indices(0), Some((1, 1)));
    assert_eq!(d.nic.queue_indices(1), Some((1, 1)));

    // The destination: a copy of memory and a fresh device.
    let mem2 = copy_memory(&d.mem);
    let (nic2, net2, r) = restored(&mem2, &s, MAC);
    r.unwrap();
    nic2.resume();
    let mut d2 = Driver {
        nic: nic2,
        mem: mem2,
        net: net2,
        next_desc: d.next_desc,
        avail_idx: d.avail_idx,
        seen_used: d.seen_used,
    };
    // The pending transmit goes out exactly once, on the destination.
    d2.w(QUEUE_NOTIFY, 1);
    let n = d2.net.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &frame(12, 60)[..]);
    assert_eq!(d2.next_used(1), (u32::from(pending_tx), 0));
    d2.w(QUEUE_NOTIFY, 1);
    d2.net.set_nonblocking(true).unwrap();
    assert!(d2.net.recv(&mut buf).is_err(), "sent only once");
    // Received frames use the remaining buffers 1, 2, 3 in order.
    for (k, tag) in [(1u32, 20u8), (2, 21), (3, 22)] {
        d2.net.send(&frame(tag, 100)).unwrap();
        let (id, len) = d2.next_used(0);
        assert_eq!((id, len), (k, 112));
        assert_eq!(
            d2.read_buf(buf_addr(0, k as u16) + 12, 100),
            frame(tag, 100)
        );
    }
    assert_eq!(d2.nic.queue_indices(0), Some((4, 4)));
    // The counters continued.
    assert_eq!(d2.nic.counters().snapshot().rx_delivered, 4);
    assert_eq!(d2.nic.counters().snapshot().tx_frames, 2);

    // The source, resumed (migration failed), still has the frame that
    // arrived while it was paused and delivers it now.
    d.nic.resume();
    assert_eq!(d.next_used(0).0, 1);
    assert_eq!(d.read_buf(buf_addr(0, 1) + 12, 100), frame(13, 100));
}

/// On an incoming migration, what the backend queued before the restored
/// guest ran is dropped (counted) at the first resume; later frames and a
/// plain pause/resume deliver as usual.
#[test]
fn frames_queued_before_a_restored_guest_runs_are_dropped() {
    let mut d = Driver::new();
    d.init();
    d.post_rx(4);
    d.nic.pause();
    let s = save(&d.nic);
    let mem2 = copy_memory(&d.mem);
    let (nic2, net2, r) = restored(&mem2, &s, MAC);
    r.unwrap();
    // Flooded to the destination's TAP while the source still had the guest.
    net2.send(&frame(30, 100)).unwrap();
    net2.send(&frame(31, 100)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let before = nic2.counters().snapshot().rx_dropped;
    nic2.resume();
    let mut d2 = Driver {
        nic: nic2,
        mem: mem2,
        net: net2,
        next_desc: d.next_desc,
        avail_idx: d.avail_idx,
        seen_used: d.seen_used,
    };
    let st = d2.nic.counters().snapshot();
    assert_eq!(st.rx_dropped, before + 2, "the stale frames are counted");
    assert_eq!(d2.used_idx(0), 0, "no stale frame reached the guest");
    // A frame after the switchover arrives in the first buffer.
    d2.net.send(&frame(32, 100)).unwrap();
    let (id, len) = d2.next_used(0);
    assert_eq!((id, len), (0, 112));
    assert_eq!(d2.read_buf(buf_addr(0, 0) + 12, 100), frame(32, 100));
    // A later pause/resume (not a restore) keeps what is queued.
    d2.nic.pause();
    d2.net.send(&frame(33, 100)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    d2.nic.resume();
    let (id, _) = d2.next_used(0);
    assert_eq!(id, 1);
    assert_eq!(d2.read_buf(buf_addr(0, 1) + 12, 100), frame(33, 100));
}

#[test]
fn notify_while_paused_runs_on_resume_and_discard_never_touches_memory() {
    let mut d = Driver::new();
    d.init();
    d.nic.pause();
    d.queue_tx(&frame(30, 60), true);
    assert_eq!(d.used_idx(1), 0, "not processed while paused");
    d.nic.resume();
    assert_eq!(d.used_idx(1), 1, "processed on resume");
    let mut buf = [0u8; 2048];
    d.net.recv(&mut buf).unwrap();

    d.post_rx(2);
    d.nic.pause();
    d.nic.discard();
    d.net.send(&frame(31, 100)).unwrap();
    wait_for("discarded frame counted", || {
        d.nic.counters().snapshot().backend_rx == 1
    });
    assert_eq!(d.used_idx(0), 0, "discarding device wrote nothing");
    assert_eq!(d.nic.counters().snapshot().rx_dropped, 1);
}

#[test]
fn measured_frame_rates() {
    // Prints numbers only (no timing assertions): transmit through the
    // synchronous notify path, and receive through the device thread.
    let mut d = Driver::new();
    d.init();
    let f = frame(40, 1514);
    let n = 20_000u32;
    let t0 = Instant::now();
    let mut buf = [0u8; 2048];
    for i in 0..n {
        d.queue_tx(&f, true);
        d.net.recv(&mut buf).unwrap();
        assert_eq!(d.next_used(1).0, u32::from((i % u32::from(QSIZE)) as u16));
    }
    let tx = t0.elapsed();
    d.next_desc[0] = 0;
    let t0 = Instant::now();
    let mut delivered = 0u32;
    while delivered < n {
        d.post_rx(usize::from(QSIZE) / 2);
        for _ in 0..QSIZE / 2 {
            d.net.send(&f).unwrap();
        }
        for _ in 0..QSIZE / 2 {
            d.next_used(0);
            delivered += 1;
        }
    }
    let rx = t0.elapsed();
    assert_eq!(d.nic.counters().snapshot().rx_dropped, 0);
    eprintln!(
        "virtio-net: tx {:.1} us/frame (notify per frame, 1514 B), rx {:.1} us/frame (batches of {})",
        tx.as_secs_f64() * 1e6 / f64::from(n),
        rx.as_secs_f64() * 1e6 / f64::from(n),
        QSIZE / 2
    );
}
