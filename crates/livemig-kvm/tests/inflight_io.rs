//! In-flight port I/O and MMIO at a pause (issue 13, item 4).
//!
//! KVM completes a port-I/O or MMIO exit only on the *next* `KVM_RUN`: an
//! `in` or MMIO read gets its data into the guest's registers then (and
//! string I/O advances RSI/RDI/RCX then). A vCPU parked right after handling
//! such an exit has registers that still point at (or before) the access, so
//! a state saved there makes the destination repeat it: the byte the source
//! UART handed out is lost, a register write lands twice.
//!
//! Each test runs a tiny real-mode guest (its code runs in KVM's instruction
//! emulator here, as a guest kernel's would) whose every loop iteration is a
//! device access, with an exit handler that takes a while per access (so
//! nearly every pause lands while the vCPU thread is in the handler, between
//! the exit and the next `KVM_RUN`). The VM is paused, its state saved and
//! restored into a fresh VM over and over; the device sees the whole run
//! across all the VMs and checks that the stream is exactly the sequence:
//! nothing repeated, nothing lost, in both directions.
//!
//! On this project's machines (PVM) the reads are what a premature park
//! breaks: an `in` from the UART and an MMIO read lost a value before the
//! fix. The `out` streams passed even then, because PVM's emulator finishes
//! an `out` (and an MMIO write) before it exits to userspace; on hardware
//! KVM a guest's `out` takes the fast port-I/O path, which moves RIP past
//! the instruction only on the next `KVM_RUN`, and these tests catch the
//! repeated byte there.
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

mod common;
use common::kvm_or_skip;

use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kvm_bindings::{kvm_regs, kvm_segment};
use livemig::vm::{DestinationVm, SourceVm};
use livemig_kvm::serial::{SerialDevice, SerialOutput, COM1_PORT, COM1_PORT_COUNT};
use livemig_kvm::{ExitHandler, KvmVm, SharedDevice, VmConfig};
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM: 512 KiB, so the real-mode address 0x80000 is not RAM (MMIO).
const MEMORY: u64 = 512 << 10;
/// Where the program is loaded (CS = 0).
const CODE: u64 = 0x1000;
/// MMIO register the guest reads the next value of a counter from.
const MMIO_IN: u64 = 0x8_0000;
/// MMIO register the guest echoes what it read to.
const MMIO_ECHO: u64 = 0x8_0004;
/// Save/restore hops per test (the issue asks for 20 or more).
const HOPS: usize = 30;
/// How long each VM runs the guest before it is paused.
const RUN: Duration = Duration::from_millis(3);
/// Time the exit handler takes per access: a slow device, so the pause
/// nearly always finds the vCPU thread between an exit and its `KVM_RUN`.
const HANDLER_DELAY: Duration = Duration::from_micros(100);

/// `mov dx, 0x3f8; l: out dx, al; inc al; jmp l` — a byte counter to the
/// UART's transmit register, as fast as the guest can.
const UART_STREAM: [u8; 8] = [0xBA, 0xF8, 0x03, 0xEE, 0xFE, 0xC0, 0xEB, 0xFB];

/// `l: mov dx, 0x3fd; in al, dx; test al, 1; jz l; mov dx, 0x3f8; in al, dx;
/// out dx, al; jmp l` — polls the line status, reads each received byte and
/// echoes it to the transmit register.
const UART_ECHO: [u8; 15] = [
    0xBA, 0xFD, 0x03, 0xEC, 0xA8, 0x01, 0x74, 0xF8, 0xBA, 0xF8, 0x03, 0xEC, 0xEE, 0xEB, 0xF1,
];

/// With DS = 0x8000: `l: mov eax, [0]; mov [4], eax; jmp l` — reads a
/// counter register over MMIO and writes it back to an echo register.
const MMIO_ECHO_PROG: [u8; 10] = [0x66, 0xA1, 0x00, 0x00, 0x66, 0xA3, 0x04, 0x00, 0xEB, 0xF6];

/// 64-bit, CPL3: `mov dx, 0x3f8; l: out dx, al; inc al; jmp l` (user-mode
/// code runs natively here, and its `out` takes KVM's fast port-I/O path
/// rather than the instruction emulator).
const UART_STREAM_CPL3: [u8; 9] = [0x66, 0xBA, 0xF8, 0x03, 0xEE, 0xFE, 0xC0, 0xEB, 0xFB];

/// Long-mode layout of [`Machine::load_cpl3`]: GDT, TSS (with an I/O
/// permission bitmap that allows every port: CPL3 `in`/`out` need it here,
/// IOPL is ignored), and a PML4 → PDPT → PD mapping the first 2 MiB.
const GDT: u64 = 0x1000;
const TSS: u64 = 0x2000;
const TSS_LIMIT: u64 = 0x68 + 8192;
const PML4: u64 = 0x8000;
/// Where [`Machine::load_cpl3`] loads its program.
const CODE64: u64 = 0x10000;

/// A `Write` into a buffer shared by every VM of a test (the serial line).
#[derive(Clone, Default)]
struct Line(Arc<Mutex<Vec<u8>>>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Line {
    fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

/// An MMIO device outside the VMs: hands out 0, 1, 2, … on reads of
/// [`MMIO_IN`] and records the writes to [`MMIO_ECHO`].
#[derive(Default)]
struct Counter {
    next: AtomicU32,
    echoed: Mutex<Vec<u32>>,
}

/// The exit handler of one VM: COM1 (that VM's UART) and the shared counter.
struct Bus {
    serial: Arc<Mutex<SerialDevice>>,
    counter: Arc<Counter>,
    delay: Duration,
}

impl Bus {
    fn wait(&self) {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
    }
}

impl ExitHandler for Bus {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.wait();
        data.fill(0xff);
        if (COM1_PORT..COM1_PORT + COM1_PORT_COUNT).contains(&port) {
            data[0] = self
                .serial
                .lock()
                .unwrap()
                .pio_read((port - COM1_PORT) as u8);
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.wait();
        if (COM1_PORT..COM1_PORT + COM1_PORT_COUNT).contains(&port) {
            self.serial
                .lock()
                .unwrap()
                .pio_write((port - COM1_PORT) as u8, data[0]);
        }
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.wait();
        data.fill(0xff);
        if addr == MMIO_IN && data.len() == 4 {
            let v = self.counter.next.fetch_add(1, Ordering::SeqCst);
            data.copy_from_slice(&v.to_le_bytes());
        }
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.wait();
        if addr == MMIO_ECHO {
            if let Ok(b) = <[u8; 4]>::try_from(data) {
                self.counter
                    .echoed
                    .lock()
                    .unwrap()
                    .push(u32::from_le_bytes(b));
            }
        }
    }
}

/// A VM with its UART (writing to `line`) and the shared counter, paused.
struct Machine {
    vm: KvmVm,
    serial: Arc<Mutex<SerialDevice>>,
}

impl Machine {
    fn new(line: &Line, counter: &Arc<Counter>) -> Machine {
        Machine::with_delay(line, counter, HANDLER_DELAY)
    }

    /// Like [`Machine::new`] with an exit handler taking `delay` per access.
    fn with_delay(line: &Line, counter: &Arc<Counter>, delay: Duration) -> Machine {
        let serial = Arc::new(Mutex::new(
            SerialDevice::new(SerialOutput::Writer(Box::new(line.clone()))).unwrap(),
        ));
        let bus = Arc::new(Bus {
            serial: serial.clone(),
            counter: counter.clone(),
            delay,
        });
        let device: SharedDevice = serial.clone();
        let vm = KvmVm::create(
            &VmConfig {
                memory: MEMORY,
                vcpus: 1,
                nics: vec![],
                dirty_mode: None,
            },
            bus,
            vec![device],
        )
        .expect("create VM");
        Machine { vm, serial }
    }

    /// Loads `program` at [`CODE`] and points vCPU 0 at it (real mode,
    /// CS = 0, DS = 0x8000).
    fn load(&self, program: &[u8]) {
        self.vm
            .ram()
            .write_slice(program, GuestAddress(CODE))
            .unwrap();
        self.vm
            .with_vcpu(0, |fd| {
                let mut s = fd.get_sregs().unwrap();
                s.cs.base = 0;
                s.cs.selector = 0;
                s.ds.base = 0x8_0000;
                s.ds.selector = 0x8000;
                fd.set_sregs(&s).unwrap();
                fd.set_regs(&kvm_regs {
                    rip: CODE,
                    rflags: 0x2,
                    ..Default::default()
                })
                .unwrap();
            })
            .unwrap();
    }

    /// Loads `program` at [`CODE64`] and starts vCPU 0 on it in 64-bit mode
    /// at CPL3 (the working setup of docs' KVM notes).
    fn load_cpl3(&self, program: &[u8]) {
        let mem = self.vm.ram();
        mem.write_slice(program, GuestAddress(CODE64)).unwrap();
        let tss_desc = 0x0000_8b00_0000_0000
            | (TSS_LIMIT & 0xffff)
            | ((TSS & 0xff_ffff) << 16)
            | (((TSS_LIMIT >> 16) & 0xf) << 48)
            | ((TSS >> 24 & 0xff) << 56);
        let gdt: [u64; 8] = [
            0,
            0x00af_9a00_0000_ffff,
            0x00cf_9200_0000_ffff,
            0x00cf_f200_0000_ffff,
            0x00af_fa00_0000_ffff,
            0,
            tss_desc,
            TSS >> 32,
        ];
        for (i, d) in gdt.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(GDT + 8 * i as u64)).unwrap();
        }
        // I/O map base right after the 0x68-byte TSS; the bitmap is zero
        // (every port allowed) and ends with the required 0xff byte.
        mem.write_obj(0x68u16, GuestAddress(TSS + 0x66)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(TSS + TSS_LIMIT))
            .unwrap();
        // P | RW | US | A (+ D | PS for the 2 MiB leaf at 0).
        mem.write_obj((PML4 + 0x1000) | 0x27, GuestAddress(PML4))
            .unwrap();
        mem.write_obj((PML4 + 0x2000) | 0x27, GuestAddress(PML4 + 0x1000))
            .unwrap();
        mem.write_obj(0xE7u64, GuestAddress(PML4 + 0x2000)).unwrap();
        self.vm
            .with_vcpu(0, |fd| {
                let mut s = fd.get_sregs().unwrap();
                s.cs = user_segment(0x23, 0xb, 1, 0);
                let data = user_segment(0x1b, 0x3, 0, 1);
                (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
                s.tr = kvm_segment {
                    base: TSS,
                    limit: TSS_LIMIT as u32,
                    selector: 0x30,
                    type_: 0xb,
                    present: 1,
                    ..Default::default()
                };
                s.ldt.unusable = 1;
                s.gdt.base = GDT;
                s.gdt.limit = 8 * 8 - 1;
                s.idt.base = 0;
                s.idt.limit = 0;
                s.cr0 = 0x8001_0033;
                s.cr3 = PML4;
                s.cr4 = 0x620;
                s.efer = 0x501;
                fd.set_sregs(&s).unwrap();
                fd.set_regs(&kvm_regs {
                    rip: CODE64,
                    rflags: 0x2,
                    ..Default::default()
                })
                .unwrap();
            })
            .unwrap();
    }

    /// Pauses this VM, saves its state and restores it (with a copy of its
    /// memory) into a fresh VM, which is returned paused.
    fn hop(self, line: &Line, counter: &Arc<Counter>) -> Machine {
        SourceVm::pause(&self.vm).unwrap();
        assert_no_fatal(&self.vm);
        let sections = self.vm.save_state().expect("save state");
        let mut next = Machine::new(line, counter);
        let mut ram = vec![0u8; MEMORY as usize];
        self.vm.ram().read_slice(&mut ram, GuestAddress(0)).unwrap();
        next.vm.ram().write_slice(&ram, GuestAddress(0)).unwrap();
        drop(self);
        next.vm.restore_state(&sections).expect("restore state");
        next
    }

    /// Fills the UART's receive FIFO from `input`, starting at `*sent`.
    fn feed(&self, input: &[u8], sent: &mut usize) {
        let mut s = self.serial.lock().unwrap();
        let n = s.fifo_capacity().min(input.len() - *sent);
        s.enqueue_input(&input[*sent..*sent + n]).unwrap();
        *sent += n;
    }

    /// Bytes waiting in the UART's receive FIFO.
    fn unread(&self) -> usize {
        64 - self.serial.lock().unwrap().fifo_capacity()
    }
}

fn user_segment(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db,
        s: 1,
        l,
        g: 1,
        ..Default::default()
    }
}

fn assert_no_fatal(vm: &KvmVm) {
    if let Some(e) = vm.vcpus().fatal() {
        panic!("the guest stopped: {e}");
    }
}

/// The first index where `got` is not `want`'s prefix, with some context.
fn first_difference<T: PartialEq + std::fmt::Debug>(got: &[T], want: &[T]) -> Option<String> {
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let lo = i.saturating_sub(3);
    Some(format!(
        "at index {i}: got {:?}…, expected {:?}…",
        &got[lo..(i + 4).min(got.len())],
        &want[lo..(i + 4).min(want.len())]
    ))
}

/// Runs `program` through [`HOPS`] save/restore hops, feeding `input` to
/// the UART; returns the last machine, paused, and how many input bytes
/// were queued in the UARTs.
fn run_hops(
    load: impl FnOnce(&Machine),
    line: &Line,
    counter: &Arc<Counter>,
    input: &[u8],
) -> (Machine, usize) {
    let mut m = Machine::new(line, counter);
    load(&m);
    let mut sent = 0;
    for _ in 0..HOPS {
        m.feed(input, &mut sent);
        m.vm.resume_vcpus();
        std::thread::sleep(RUN);
        m = m.hop(line, counter);
    }
    SourceVm::pause(&m.vm).unwrap();
    assert_no_fatal(&m.vm);
    (m, sent)
}

/// `got` (what the guest produced over `over`) is a prefix of `want` and
/// longer than `min`: nothing repeated, nothing lost. `what` names `got`,
/// `expected` names `want`, in the failure message.
fn assert_exact_prefix<T: PartialEq + std::fmt::Debug>(
    got: &[T],
    want: &[T],
    min: usize,
    (what, expected, over): (&str, &str, &str),
) {
    assert!(
        got.len() > min,
        "{what}: only {} items over {over}",
        got.len()
    );
    if let Some(d) = first_difference(got, want) {
        panic!(
            "{what} is not {expected} ({} items over {over}): {d}",
            got.len()
        );
    }
}

/// `out` is the guest's counter 0, 1, 2, … (mod 256), longer than one byte
/// per hop: nothing repeated, nothing lost.
fn assert_counter_sequence(out: &[u8]) {
    let want: Vec<u8> = (0..out.len()).map(|i| i as u8).collect();
    assert_exact_prefix(
        out,
        &want,
        HOPS,
        (
            "the UART output",
            "the guest's counter sequence",
            &format!("{HOPS} save/restore hops"),
        ),
    );
}

/// Every byte that left the UART (`queued` fed, `unread` still in the
/// UART) reached the guest: it was echoed, or it is the one byte the guest
/// read and has not written back yet.
fn assert_every_input_byte_reached_the_guest(queued: usize, unread: usize, echoed: usize) {
    let read_by_guest = queued - unread;
    assert!(
        read_by_guest >= echoed && read_by_guest - echoed <= 1,
        "{read_by_guest} bytes left the UART but the guest echoed {echoed}"
    );
}

/// Skips (returns `None`) without KVM; otherwise takes the KVM lock and
/// gives a fresh line and MMIO counter.
fn kvm_test(name: &str) -> Option<(MutexGuard<'static, ()>, Line, Arc<Counter>)> {
    let g = kvm_or_skip(name)?;
    Some((g, Line::default(), Arc::new(Counter::default())))
}

#[test]
fn uart_output_is_never_repeated_across_save_restore() {
    let Some((_g, line, counter)) = kvm_test("uart_output_is_never_repeated_across_save_restore")
    else {
        return;
    };
    let (_m, _) = run_hops(|m| m.load(&UART_STREAM), &line, &counter, &[]);
    assert_counter_sequence(&line.bytes());
}

#[test]
fn user_mode_uart_output_is_never_repeated_across_save_restore() {
    let Some((_g, line, counter)) =
        kvm_test("user_mode_uart_output_is_never_repeated_across_save_restore")
    else {
        return;
    };
    let _m = run_hops(|m| m.load_cpl3(&UART_STREAM_CPL3), &line, &counter, &[]);
    assert_counter_sequence(&line.bytes());
}

#[test]
fn uart_input_is_never_lost_across_save_restore() {
    let Some((_g, line, counter)) = kvm_test("uart_input_is_never_lost_across_save_restore") else {
        return;
    };
    let input: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    let (m, queued) = run_hops(|m| m.load(&UART_ECHO), &line, &counter, &input);
    let echoed = line.bytes();
    assert_exact_prefix(
        &echoed,
        &input,
        HOPS,
        (
            "the guest's echo",
            "the input",
            &format!("{HOPS} save/restore hops"),
        ),
    );
    assert_every_input_byte_reached_the_guest(queued, m.unread(), echoed.len());
}

#[test]
fn mmio_reads_and_writes_happen_once_across_save_restore() {
    let Some((_g, line, counter)) =
        kvm_test("mmio_reads_and_writes_happen_once_across_save_restore")
    else {
        return;
    };
    let (_m, _) = run_hops(|m| m.load(&MMIO_ECHO_PROG), &line, &counter, &[]);
    let echoed = counter.echoed.lock().unwrap().clone();
    let handed_out = counter.next.load(Ordering::SeqCst) as usize;
    let want: Vec<u32> = (0..echoed.len() as u32).collect();
    assert_exact_prefix(
        &echoed,
        &want,
        HOPS,
        (
            "the MMIO echo",
            "the counter sequence",
            &format!("{HOPS} save/restore hops"),
        ),
    );
    assert!(
        handed_out - echoed.len() <= 1,
        "the device handed out {handed_out} values but the guest echoed {}",
        echoed.len()
    );
}

/// Migrates `m` with the engine (both ends in this process, over the
/// in-memory transport) into a fresh machine, which is returned running.
fn migrate_once(m: &Machine, line: &Line, counter: &Arc<Counter>) -> Machine {
    let next = Machine::new(line, counter);
    let serial = next.serial.clone();
    let (to_dest, from_source) = livemig::transport::mem::pair();
    let dest = std::thread::spawn(move || {
        livemig::receive(
            Box::new(from_source),
            &livemig::ReceiveConfig::default(),
            move |_desc| Ok(next.vm),
        )
    });
    let report = livemig::migrate(
        &m.vm,
        Box::new(to_dest),
        &livemig::MigrationConfig::default(),
        &livemig::CancelToken::new(),
        &mut |_| {},
    );
    let received = dest.join().expect("destination thread");
    report.expect("migration");
    let (vm, _) = received.expect("receive");
    Machine { vm, serial }
}

#[test]
fn uart_stream_survives_engine_migrations_exactly() {
    let Some((_g, line, counter)) = kvm_test("uart_stream_survives_engine_migrations_exactly")
    else {
        return;
    };
    let input: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    let mut m = Machine::new(&line, &counter);
    m.load(&UART_ECHO);
    let mut queued = 0;
    m.feed(&input, &mut queued);
    m.vm.resume_vcpus();
    for _ in 0..20 {
        std::thread::sleep(RUN);
        let next = migrate_once(&m, &line, &counter);
        assert_no_fatal(&m.vm);
        drop(m);
        m = next;
        m.feed(&input, &mut queued);
    }
    std::thread::sleep(RUN);
    SourceVm::pause(&m.vm).unwrap();
    assert_no_fatal(&m.vm);
    let echoed = line.bytes();
    assert_exact_prefix(
        &echoed,
        &input,
        20,
        ("the guest's echo", "the input", "20 migrations"),
    );
    assert_every_input_byte_reached_the_guest(queued, m.unread(), echoed.len());
}

/// Loads a guest program into a machine.
type Loader = fn(&Machine);

/// `jmp $` in 64-bit user mode: a guest that never exits.
const SPIN_CPL3: [u8; 2] = [0xEB, 0xFE];

/// Pause latency (`SourceVm::pause` until every vCPU is parked) of a
/// spinning guest and of guests streaming to the UART with an instant exit
/// handler, printed as median and maximum over 300 pauses. A measurement,
/// not a test: `cargo test -p livemig-kvm --test inflight_io -- --ignored
/// --nocapture pause_latency`.
#[test]
#[ignore]
fn pause_latency() {
    let Some(_g) = kvm_or_skip("pause_latency") else {
        return;
    };
    let loads: [(&str, Loader); 4] = [
        ("spin, 64-bit CPL3", |m| m.load_cpl3(&SPIN_CPL3)),
        ("UART out, 64-bit CPL3", |m| m.load_cpl3(&UART_STREAM_CPL3)),
        ("UART out, real mode", |m| m.load(&UART_STREAM)),
        ("MMIO read+write, real mode", |m| m.load(&MMIO_ECHO_PROG)),
    ];
    for (name, load) in loads {
        let line = Line::default();
        let counter = Arc::new(Counter::default());
        let m = Machine::with_delay(&line, &counter, Duration::ZERO);
        load(&m);
        let mut took = Vec::new();
        for _ in 0..300 {
            m.vm.resume_vcpus();
            std::thread::sleep(Duration::from_micros(500));
            let t = std::time::Instant::now();
            SourceVm::pause(&m.vm).unwrap();
            took.push(t.elapsed());
        }
        assert_no_fatal(&m.vm);
        took.sort();
        eprintln!(
            "pause latency, {name}: median {:?}, p90 {:?}, max {:?} ({} bytes / {} MMIO values streamed)",
            took[took.len() / 2],
            took[took.len() * 9 / 10],
            took[took.len() - 1],
            line.bytes().len(),
            counter.echoed.lock().unwrap().len()
        );
    }
}
