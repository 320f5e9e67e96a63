//! A minimal KVM guest for dirty-tracking tests and measurements: one vCPU
//! started directly in 64-bit long mode at CPL3 (native speed under PVM)
//! that writes one qword into each of `count` pages, `stride` bytes apart,
//! then signals the host with an MMIO write and spins until paused.
//!
//! The page tables have their accessed bits preset, and the dirty bits of
//! the 2 MiB pages the guest writes to (but not of the first 2 MiB, which
//! holds the code and tables and is only read: a dirty guest PTE lets KVM's
//! shadow MMU map a page writable on a read, and log it). So the guest
//! writes no memory but the pages it is told to: a dirty tracker must report
//! exactly those.
#![allow(dead_code)]

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_segment};
use livemig_kvm::{DirtyMode, ExitHandler, KvmVm, VmConfig};
use vm_memory::{Bytes, GuestAddress};

/// GDT (as the notes' working CPL3 setup).
const GDT: u64 = 0x1000;
/// 64-bit TSS (zeroed; only needed to be valid).
const TSS: u64 = 0x2000;
/// PML4; PDPT at +0x1000; four page directories after it (0..4 GiB).
const PML4: u64 = 0x3000;
/// The guest program.
const CODE: u64 = 0x10000;
/// The guest writes its pages from here on.
pub const WRITE_BASE: u64 = 16 << 20;
/// An unmapped guest-physical address (in the 3–4 GiB hole): an MMIO exit.
const DONE_ADDR: u64 = 0xE000_0000;

/// `test rcx,rcx; jz done; loop: mov [rdi],rax; add rdi,rsi; dec rcx;
/// jnz loop; done: mov [rbx],al; jmp $`.
const PROGRAM: [u8; 20] = [
    0x48, 0x85, 0xC9, // test rcx, rcx
    0x74, 0x0B, // jz +11
    0x48, 0x89, 0x07, // mov [rdi], rax
    0x48, 0x01, 0xF7, // add rdi, rsi
    0x48, 0xFF, 0xC9, // dec rcx
    0x75, 0xF5, // jnz -11
    0x88, 0x03, // mov [rbx], al
    0xEB, 0xFE, // jmp $
];

#[derive(Default)]
struct Done {
    count: Mutex<u64>,
    cv: Condvar,
}

impl ExitHandler for Done {
    fn pio_read(&self, _: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&self, _: u16, _: &[u8]) {}
    fn mmio_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, addr: u64, _: &[u8]) {
        if addr == DONE_ADDR {
            *self.count.lock().unwrap() += 1;
            self.cv.notify_all();
        }
    }
}

/// The VM and its page-writing program.
pub struct PageWriter {
    /// The VM (for its tracker and memory).
    pub vm: KvmVm,
    done: Arc<Done>,
}

fn seg(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
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
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl PageWriter {
    /// A VM of `memory` bytes with one vCPU, parked. The guest maps (and
    /// writes) only the first 3 GiB.
    pub fn new(memory: u64, mode: DirtyMode) -> PageWriter {
        assert!(memory > WRITE_BASE);
        let done = Arc::new(Done::default());
        let vm = KvmVm::create(
            &VmConfig {
                memory,
                vcpus: 1,
                nics: vec![],
                dirty_mode: Some(mode),
            },
            done.clone(),
            vec![],
        )
        .expect("create VM");
        let mem = livemig::vm::SourceVm::memory(&vm);
        let gdt: [u64; 8] = [
            0,
            0x00af_9a00_0000_ffff,
            0x00cf_9200_0000_ffff,
            0x00cf_f200_0000_ffff,
            0x00af_fa00_0000_ffff,
            0,
            // 64-bit TSS at TSS, limit 0x67, busy (0x8b).
            0x0000_8b00_0000_0067 | ((TSS & 0xff_ffff) << 16) | ((TSS >> 24) << 56),
            TSS >> 32,
        ];
        for (i, d) in gdt.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(GDT + 8 * i as u64)).unwrap();
        }
        // P | RW | US | A at the upper levels; + D | PS for 2 MiB leaves.
        let pdpt = PML4 + 0x1000;
        mem.write_obj(pdpt | 0x27, GuestAddress(PML4)).unwrap();
        for g in 0..4u64 {
            let pd = pdpt + 0x1000 * (g + 1);
            mem.write_obj(pd | 0x27, GuestAddress(pdpt + 8 * g))
                .unwrap();
            for e in 0..512u64 {
                let phys = (g << 30) | (e << 21);
                // The first 2 MiB (tables, code) are only read: keep their
                // D bit clear, or KVM's shadow MMU maps them writable on a
                // read and logs them dirty.
                let flags = if phys == 0 { 0xA7 } else { 0xE7 };
                mem.write_obj(phys | flags, GuestAddress(pd + 8 * e))
                    .unwrap();
            }
        }
        mem.write_slice(&PROGRAM, GuestAddress(CODE)).unwrap();
        vm.with_vcpu(0, |fd| {
            let mut s = fd.get_sregs().unwrap();
            s.cs = seg(0x23, 0xb, 1, 0);
            let data = seg(0x1b, 0x3, 0, 1);
            (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
            s.tr = kvm_segment {
                base: TSS,
                limit: 0x67,
                selector: 0x30,
                type_: 0xb,
                present: 1,
                dpl: 0,
                db: 0,
                s: 0,
                l: 0,
                g: 0,
                avl: 0,
                unusable: 0,
                padding: 0,
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
        })
        .unwrap();
        PageWriter { vm, done }
    }

    /// Runs the program once: writes `count` pages, `stride` pages apart,
    /// the first at `WRITE_BASE + first * 4096`, and returns how long it took
    /// (from resume to the guest's done signal). The VM is paused afterwards.
    pub fn write_pages(&self, first: u64, count: u64, stride: u64) -> Duration {
        assert!(WRITE_BASE + (first + count.saturating_sub(1) * stride) * 4096 < (3 << 30));
        let before = *self.done.count.lock().unwrap();
        self.vm
            .with_vcpu(0, |fd| {
                fd.set_regs(&kvm_regs {
                    rip: CODE,
                    rflags: 0x2,
                    rsp: 0,
                    rdi: WRITE_BASE + first * 4096,
                    rcx: count,
                    rsi: stride * 4096,
                    rax: 0x5a5a_5a5a_0000_0000 | count,
                    rbx: DONE_ADDR,
                    ..Default::default()
                })
                .unwrap()
            })
            .unwrap();
        let t0 = Instant::now();
        self.vm.resume_vcpus();
        let mut n = self.done.count.lock().unwrap();
        while *n == before {
            let (g, to) = self
                .done
                .cv
                .wait_timeout(n, Duration::from_secs(60))
                .unwrap();
            n = g;
            if to.timed_out() {
                panic!(
                    "guest did not finish writing {count} pages: {:?}",
                    self.vm.vcpus().fatal()
                );
            }
        }
        let took = t0.elapsed();
        drop(n);
        self.vm.pause_vcpus().unwrap();
        took
    }

    /// The guest page numbers (region 0) that `write_pages(first, count,
    /// stride)` writes.
    pub fn pages(first: u64, count: u64, stride: u64) -> Vec<u64> {
        (0..count)
            .map(|k| WRITE_BASE / 4096 + first + k * stride)
            .collect()
    }
}
