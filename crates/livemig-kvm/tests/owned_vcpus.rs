//! A VMM whose vCPU threads own their `VcpuFd`s (Firecracker's shape): no
//! other thread can reach a vCPU, so its state is saved and restored on
//! its own thread while parked (`VcpuPauser::before_run_serving`,
//! `PauseGate::on_vcpu_threads`, `KvmParts::with_vcpu_threads`).
//!
//! The VMM here is test-sized: anonymous guest memory it maps itself, two
//! vCPUs, each thread owning its fd, and a 64-bit CPL3 guest loop per vCPU
//! (native speed here) that counts in RAX and stores each count into one
//! of 256 pages of its own megabyte: page `n % 256` holds `n`. Memory and
//! registers then check each other: after a state round trip or a
//! migration, every page must hold the last count the registers say was
//! stored there — a lost dirty page, a stale register or a vCPU restored
//! from another's state breaks that.

mod common;
use common::kvm_or_skip;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_mp_state, kvm_regs, kvm_segment, KVM_EXIT_DIRTY_RING_FULL};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use livemig::memory::{Backing, GuestMemory, HostRegion, MemoryLayout};
use livemig::state::Section;
use livemig::vm::{DestinationVm, DirtyTracker, SourceVm, VcpuThrottle, VmDescription, VmError};
use livemig::{Migration, MigrationConfig, OnLimit, Reception};
use livemig_kvm::dirty::{DirtyRing, KvmDirtyTracker, Slot};
use livemig_kvm::parts::KvmParts;
use livemig_kvm::{setup, DirtyMode};

const MEMORY: u64 = 4 << 20;
const VCPUS: usize = 2;
const GDT: u64 = 0x1000;
const TSS: u64 = 0x2000;
const TSS_LIMIT: u64 = 0x68 + 8192;
const PML4: u64 = 0x8000;
const CODE: u64 = 0x10000;
/// vCPU `i` writes the megabyte at `AREA + i * 1 MiB`.
const AREA: u64 = 1 << 20;
const PAGES: u64 = 256;

/// `l: inc rax; mov rcx, rax; and rcx, 0xff; shl rcx, 12;
/// mov [rdi + rcx], rax; jmp l`.
const LOOP: [u8; 23] = [
    0x48, 0xFF, 0xC0, // inc rax
    0x48, 0x89, 0xC1, // mov rcx, rax
    0x48, 0x81, 0xE1, 0xFF, 0x00, 0x00, 0x00, // and rcx, 0xff
    0x48, 0xC1, 0xE1, 0x0C, // shl rcx, 12
    0x48, 0x89, 0x04, 0x0F, // mov [rdi + rcx], rax
    0xEB, 0xE9, // jmp l
];
/// RIPs at which the last `inc rax` has been stored: the loop's start and
/// its `jmp`.
const STORED_AT: [u64; 2] = [CODE, CODE + 21];

/// Guest memory: a private anonymous mapping.
struct Ram {
    ptr: *mut u8,
}

// SAFETY: plain memory; the raw pointer is only an address.
unsafe impl Send for Ram {}
// SAFETY: as above.
unsafe impl Sync for Ram {}

impl Ram {
    fn new() -> Ram {
        // SAFETY: a fresh anonymous mapping; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEMORY as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap");
        Ram { ptr: ptr.cast() }
    }

    fn write(&self, gpa: u64, data: &[u8]) {
        assert!(gpa + data.len() as u64 <= MEMORY);
        // SAFETY: inside the mapping (checked).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(gpa as usize), data.len())
        };
    }

    fn read_u64(&self, gpa: u64) -> u64 {
        assert!(gpa + 8 <= MEMORY);
        // SAFETY: inside the mapping; the guest may be writing it, hence
        // the volatile read (tests read only paused guests).
        unsafe { std::ptr::read_volatile(self.ptr.add(gpa as usize).cast::<u64>()) }
    }

    fn copy_from(&self, other: &Ram) {
        // SAFETY: two distinct mappings of MEMORY bytes.
        unsafe { std::ptr::copy_nonoverlapping(other.ptr, self.ptr, MEMORY as usize) };
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: our mapping; the VM using it is gone (field order of Vmm).
        unsafe { libc::munmap(self.ptr.cast(), MEMORY as usize) };
    }
}

// SAFETY: one region, the whole private anonymous mapping, page-aligned,
// mapped as long as `Ram` lives; only vCPUs write it.
unsafe impl GuestMemory for Ram {
    fn regions(&self) -> Vec<HostRegion<'_>> {
        vec![HostRegion::new(
            0,
            self.ptr,
            MEMORY,
            Backing::PrivateAnonymous,
        )]
    }
    /// Only the vCPUs write guest memory.
    fn take_vmm_dirty(&self, _region: usize, _words: &mut [u64]) {}
}

/// The test's VMM: memory, KVM parts without vCPU fds, one thread per vCPU
/// owning its fd. Its threads are never joined (they park for good when
/// dropped: the gate is closed).
struct Vmm {
    parts: KvmParts,
    slots: Vec<Slot>,
    mode: DirtyMode,
    ring: Option<Arc<DirtyRing>>,
    threads: Vec<JoinHandle<Result<(), String>>>,
    ram: Ram,
}

impl Vmm {
    fn new(wanted: DirtyMode) -> Vmm {
        let kvm = Kvm::new().unwrap();
        let vm = setup::create_vm(&kvm).unwrap();
        let mode = setup::enable_dirty_mode(&vm, wanted).unwrap();
        let ram = Ram::new();
        let slot = Slot {
            slot: 0,
            guest_addr: 0,
            size: MEMORY,
            host_addr: ram.ptr as u64,
        };
        slot.register(&vm, 0).unwrap();
        let slots = vec![slot];
        let fds = setup::create_vcpus(&kvm, &vm, VCPUS as u32).unwrap();
        let ring = match mode {
            DirtyMode::Ring { entries } => Some(Arc::new(
                DirtyRing::new(&vm, &fds, entries, &slots).unwrap(),
            )),
            _ => None,
        };
        let parts = KvmParts::with_vcpu_threads(&kvm, vm, &fds).unwrap();
        assert!(parts.vcpu(0).is_none(), "the parts keep no vCPU fd");
        let threads = fds
            .into_iter()
            .enumerate()
            .map(|(i, fd)| {
                let (gate, ring) = (parts.gate().clone(), ring.clone());
                std::thread::spawn(move || vcpu_thread(i, fd, gate, ring))
            })
            .collect();
        Vmm {
            parts,
            slots,
            mode,
            ring,
            threads,
            ram,
        }
    }

    /// Page tables, GDT, TSS and the loop in memory; each vCPU set up on
    /// its own thread (the gate starts paused).
    fn load(&self) {
        self.ram.write(CODE, &LOOP);
        for (i, d) in gdt().iter().enumerate() {
            self.ram.write(GDT + 8 * i as u64, &d.to_le_bytes());
        }
        self.ram
            .write(PML4, &((PML4 + 0x1000) | 0x27).to_le_bytes());
        self.ram
            .write(PML4 + 0x1000, &((PML4 + 0x2000) | 0x27).to_le_bytes());
        self.ram.write(PML4 + 0x2000, &0xE7u64.to_le_bytes());
        self.ram
            .write(PML4 + 0x2008, &(0x20_0000u64 | 0xE7).to_le_bytes());
        let set = self.parts.gate().on_vcpu_threads(start_cpl3);
        for r in set.expect("set up the vCPUs on their threads") {
            r.unwrap();
        }
    }

    /// Each vCPU's (RAX, RIP), read on its thread (the vCPUs are paused).
    fn counters(&self) -> Vec<(u64, u64)> {
        self.parts
            .gate()
            .on_vcpu_threads(|_, fd| fd.get_regs().map(|r| (r.rax, r.rip)))
            .expect("read the registers on the vCPU threads")
            .into_iter()
            .map(|r| r.unwrap())
            .collect()
    }

    /// Checks that each vCPU's pages hold exactly the counts its registers
    /// say it stored; returns the counters.
    fn check_memory(&self, what: &str) -> Vec<u64> {
        self.assert_running_threads(what);
        let mut out = Vec::new();
        for (i, (rax, rip)) in self.counters().into_iter().enumerate() {
            let stored = if STORED_AT.contains(&rip) {
                rax
            } else {
                rax - 1
            };
            assert!(stored > PAGES, "{what}: vCPU {i} counted only to {stored}");
            for k in 0..PAGES {
                let want = stored - ((stored - k) % PAGES);
                let got = self.ram.read_u64(AREA * (1 + i as u64) + k * 4096);
                assert_eq!(
                    got, want,
                    "{what}: vCPU {i} (count {stored}, rip {rip:#x}) page {k} holds {got}, not {want}"
                );
            }
            out.push(stored);
        }
        out
    }

    fn assert_running_threads(&self, what: &str) {
        if let Some(e) = self.parts.gate().fatal() {
            panic!("{what}: a vCPU stopped: {e}");
        }
        assert!(
            self.threads.iter().all(|t| !t.is_finished()),
            "{what}: a vCPU thread ended"
        );
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        assert!(self.parts.gate().close(Duration::from_secs(5)));
        for t in self.threads.drain(..) {
            if let Err(e) = t.join().expect("vCPU thread") {
                if !std::thread::panicking() {
                    panic!("vCPU thread: {e}");
                }
            }
        }
    }
}

/// A vCPU thread that owns its fd, as a Firecracker-style VMM's does.
fn vcpu_thread(
    i: usize,
    mut fd: VcpuFd,
    gate: livemig_kvm::pause::PauseGate,
    ring: Option<Arc<DirtyRing>>,
) -> Result<(), String> {
    // SAFETY: `fd` outlives `pauser`; both are dropped on this thread.
    let mut pauser = unsafe { gate.attach(i, &mut fd) }.map_err(|e| e.to_string())?;
    while pauser.before_run_serving(&fd) {
        let exit = fd.run();
        pauser.after_run(&exit);
        match exit {
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => match &ring {
                Some(r) => {
                    r.on_ring_full().map_err(|e| e.to_string())?;
                }
                None => return Err("ring full without a ring".into()),
            },
            Ok(other) => {
                let why = format!("vCPU {i}: unexpected exit {other:?}");
                pauser.stop(why.clone());
                return Err(why);
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(format!("vCPU {i}: KVM_RUN: {e}")),
        }
    }
    Ok(())
}

fn gdt() -> [u64; 8] {
    let tss = 0x0000_8b00_0000_0000
        | (TSS_LIMIT & 0xffff)
        | ((TSS & 0xff_ffff) << 16)
        | (((TSS_LIMIT >> 16) & 0xf) << 48)
        | ((TSS >> 24 & 0xff) << 56);
    [
        0,
        0x00af_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00cf_f200_0000_ffff,
        0x00af_fa00_0000_ffff,
        0,
        tss,
        TSS >> 32,
    ]
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

/// vCPU `i` at the loop, 64-bit CPL3, counting from 0 into its megabyte.
fn start_cpl3(i: usize, fd: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut s = fd.get_sregs()?;
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
    (s.gdt.base, s.gdt.limit) = (GDT, 8 * 8 - 1);
    (s.idt.base, s.idt.limit) = (0, 0);
    (s.cr0, s.cr3, s.cr4, s.efer) = (0x8001_0033, PML4, 0x620, 0x501);
    fd.set_sregs(&s)?;
    fd.set_regs(&kvm_regs {
        rip: CODE,
        rdi: AREA * (1 + i as u64),
        rflags: 0x2,
        ..Default::default()
    })?;
    // An application processor waits for INIT/SIPI until told otherwise.
    fd.set_mp_state(kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
    })
}

impl SourceVm for Vmm {
    fn memory(&self) -> &dyn GuestMemory {
        &self.ram
    }
    fn describe(&self) -> Result<VmDescription, VmError> {
        let layout =
            MemoryLayout::of(&self.ram).map_err(|e| VmError::Incompatible(e.to_string()))?;
        Ok(self.parts.describe(layout, vec![]))
    }
    fn dirty_tracker(&self) -> Result<Box<dyn DirtyTracker + '_>, VmError> {
        let ring = self.ring.as_deref();
        let vm = self.parts.vm();
        Ok(Box::new(KvmDirtyTracker::new(
            vm,
            &self.slots,
            self.mode,
            ring,
        )))
    }
    fn pause(&self) -> Result<(), VmError> {
        self.parts.pause()
    }
    fn resume(&self) -> Result<(), VmError> {
        self.parts.resume()
    }
    fn is_paused(&self) -> bool {
        self.parts.is_paused()
    }
    fn save_state(&self) -> Result<Vec<Section>, VmError> {
        self.parts.save_state(&[])
    }
    fn throttle(&self) -> Option<&dyn VcpuThrottle> {
        Some(&self.parts)
    }
}

impl DestinationVm for Vmm {
    fn memory(&self) -> &dyn GuestMemory {
        &self.ram
    }
    fn restore_state(&mut self, sections: &[Section]) -> Result<(), VmError> {
        self.parts.restore_state(sections, &mut [])
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.parts.resume()
    }
}

/// Lets `vmm` run for a while, then pauses it.
fn run_for(vmm: &Vmm, t: Duration) {
    vmm.parts.resume().unwrap();
    std::thread::sleep(t);
    vmm.parts.pause().unwrap();
}

/// A running guest's state, saved on the source's vCPU threads and
/// restored (with its memory) on a second VMM's, continues there: the
/// registers arrive on the right vCPU, memory and registers agree, and the
/// counters go on from where they were.
#[test]
fn state_round_trips_through_the_owning_threads() {
    let Some(_kvm) = kvm_or_skip("state_round_trips_through_the_owning_threads") else {
        return;
    };
    let src = Vmm::new(DirtyMode::Classic);
    src.load();
    run_for(&src, Duration::from_millis(50));
    let before = src.check_memory("source");
    let sections = src.parts.save_state(&[]).expect("save on the vCPU threads");
    assert_eq!(sections.len(), VCPUS + 3);

    let dst = Vmm::new(DirtyMode::Classic);
    dst.ram.copy_from(&src.ram);
    dst.parts
        .restore_state(&sections, &mut [])
        .expect("restore on the vCPU threads");
    drop(src);
    let restored = dst.check_memory("restored, not run yet");
    assert_eq!(restored, before, "the counters moved or changed vCPU");
    run_for(&dst, Duration::from_millis(50));
    let after = dst.check_memory("restored and run");
    for i in 0..VCPUS {
        assert!(
            after[i] > before[i],
            "vCPU {i} did not go on: {before:?} then {after:?}"
        );
    }
}

/// The engine migrates the running guest between two such VMMs over the
/// in-memory transport, in every dirty-tracking mode: `save_state`,
/// `check_incoming` and `restore_state` all run on the vCPU threads.
fn migrate(mode: DirtyMode, what: &str) {
    let Some(_kvm) = kvm_or_skip(what) else {
        return;
    };
    let src = Vmm::new(mode);
    src.load();
    src.parts.resume().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let (a, b) = livemig::transport::mem::pair();
    let receiving = std::thread::spawn(move || {
        Reception::new(Box::new(b)).run(|desc| {
            let mut vmm = Vmm::new(mode);
            livemig::vm::check_layout(&vmm.ram, desc)?;
            vmm.parts.check_incoming(desc)?;
            Ok(vmm)
        })
    });
    let config = MigrationConfig {
        // Both vCPUs rewrite their 256 pages all the time: this guest does
        // not converge, so the switchover is forced after a few rounds.
        max_rounds: 3,
        on_limit: OnLimit::ForceSwitchover,
        ..Default::default()
    };
    let report = Migration::new(&src)
        .config(config)
        .run(Box::new(a))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let (dst, _) = receiving
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(src.is_paused(), "{what}: the source runs on");
    let at_pause = src.check_memory("source after the switchover");
    assert!(report.pages_sent > 0, "{what}: {report:?}");
    drop(src);
    dst.parts.pause().unwrap();
    let there = dst.check_memory("destination");
    for i in 0..VCPUS {
        assert!(there[i] >= at_pause[i], "{what}: vCPU {i} went back");
    }
    run_for(&dst, Duration::from_millis(20));
    let later = dst.check_memory("destination, later");
    for i in 0..VCPUS {
        assert!(later[i] > there[i], "{what}: vCPU {i} stopped counting");
    }
}

#[test]
fn migration_with_owned_vcpus_classic() {
    migrate(DirtyMode::Classic, "migration_with_owned_vcpus_classic");
}

#[test]
fn migration_with_owned_vcpus_manual_protect() {
    let what = "migration_with_owned_vcpus_manual_protect";
    migrate(DirtyMode::ManualProtect, what);
}

#[test]
fn migration_with_owned_vcpus_ring() {
    let what = "migration_with_owned_vcpus_ring";
    migrate(DirtyMode::Ring { entries: 256 }, what);
}
