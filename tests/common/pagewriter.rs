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

use kvm_bindings::{kvm_mp_state, kvm_regs, kvm_segment, kvm_sregs, KVM_MP_STATE_RUNNABLE};
use livemig_kvm::{DirtyMode, ExitHandler, KvmVm, VmConfig};
use vm_memory::{Bytes, GuestAddress};

/// GDT (as the notes' working CPL3 setup).
const GDT: u64 = 0x1000;
/// 64-bit TSS (zeroed; only needed to be valid).
const TSS: u64 = 0x2000;
/// PML4; PDPT at +0x1000; `MAPPED_GIB` page directories after it.
const PML4: u64 = 0x3000;
/// GiB of guest-physical space the page tables map (0..5 GiB: RAM below
/// the 3 GiB hole and the first GiB above 4 GiB).
const MAPPED_GIB: u64 = 5;
/// The guest program.
const CODE: u64 = 0x10000;
/// The guest writes its pages from here on.
pub const WRITE_BASE: u64 = 16 << 20;
/// The continuous fresh-page writer ([`FRESH_PROGRAM`]).
const FRESH_CODE: u64 = 0x10100;
/// Where the second region of the x86 layout starts (RAM above the hole).
pub const HIGH_BASE: u64 = 4 << 30;
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

/// The continuous writer each vCPU of [`PageWriter::start_fresh`] runs,
/// for ever (until paused):
///
/// ```text
/// outer: mov r9, rdi; mov r10, rcx        ; cursor, pages left
/// inner: mov [r9], rax; mov [r9+r8], rax  ; one qword in each region
///        mov r11, rdx                     ; delay loop (rdx >= 1)
/// delay: dec r11; jnz delay
///        add r9, rsi; dec r10; jnz inner  ; next page
///        inc rax; jmp outer               ; next pass, new value
/// ```
///
/// The first pass writes every page for the first time; later passes
/// rewrite them with a value one higher.
const FRESH_PROGRAM: [u8; 34] = [
    0x49, 0x89, 0xF9, // mov r9, rdi
    0x49, 0x89, 0xCA, // mov r10, rcx
    0x49, 0x89, 0x01, // inner: mov [r9], rax
    0x4B, 0x89, 0x04, 0x01, // mov [r9+r8], rax
    0x49, 0x89, 0xD3, // mov r11, rdx
    0x49, 0xFF, 0xCB, // delay: dec r11
    0x75, 0xFB, // jnz delay
    0x49, 0x01, 0xF1, // add r9, rsi
    0x49, 0xFF, 0xCA, // dec r10
    0x75, 0xE9, // jnz inner
    0x48, 0xFF, 0xC0, // inc rax
    0xEB, 0xDE, // jmp outer
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

/// A vCPU's special registers for 64-bit mode at CPL3 with the writer's GDT, TSS and
/// page tables.
fn cpl3_sregs(mut s: kvm_sregs) -> kvm_sregs {
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
    s
}

impl PageWriter {
    /// A VM of `memory` bytes with one vCPU, parked. The guest maps (and
    /// writes) only the first 3 GiB.
    pub fn new(memory: u64, mode: DirtyMode) -> PageWriter {
        Self::with_vcpus(memory, 1, mode)
    }

    /// A VM of `memory` bytes with `vcpus` vCPUs, each set up for 64-bit
    /// CPL3 with the same page tables, parked. The guest maps 0..5 GiB with
    /// 2 MiB pages (RAM below 3 GiB and from 4 GiB on).
    pub fn with_vcpus(memory: u64, vcpus: u32, mode: DirtyMode) -> PageWriter {
        Self::with_vcpus_thp(memory, vcpus, mode, livemig_kvm::Thp::default())
    }

    /// [`PageWriter::with_vcpus`] with guest memory given the transparent
    /// huge page advice `thp`.
    pub fn with_vcpus_thp(
        memory: u64,
        vcpus: u32,
        mode: DirtyMode,
        thp: livemig_kvm::Thp,
    ) -> PageWriter {
        assert!(memory > WRITE_BASE);
        let done = Arc::new(Done::default());
        let vm = KvmVm::create_with_backend(
            &VmConfig {
                memory,
                vcpus,
                nics: vec![],
                dirty_mode: Some(mode),
            },
            livemig_kvm::MemoryOptions {
                backend: livemig_kvm::MemoryBackend::Anonymous,
                thp,
            },
            done.clone(),
            vec![],
        )
        .expect("create VM");
        let mem = vm.ram();
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
        for g in 0..MAPPED_GIB {
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
        mem.write_slice(&FRESH_PROGRAM, GuestAddress(FRESH_CODE))
            .unwrap();
        for v in 0..vcpus as usize {
            vm.with_vcpu(v, |fd| {
                let s = cpl3_sregs(fd.get_sregs().unwrap());
                fd.set_sregs(&s).unwrap();
                // With the in-kernel irqchip an AP waits for INIT/SIPI:
                // make every vCPU runnable at once.
                fd.set_mp_state(kvm_mp_state {
                    mp_state: KVM_MP_STATE_RUNNABLE,
                })
                .unwrap();
            })
            .unwrap();
        }
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

    /// Starts every vCPU writing pages of its own for the first time,
    /// continuously (see [`FRESH_PROGRAM`]): vCPU `i` owns the `pages` pages
    /// from `WRITE_BASE + i * pages * 4096` in region 0 and, with `high`,
    /// as many from `HIGH_BASE + i * pages * 4096` in region 1 (written
    /// page by page alternately). Between pages it spins `delay` loop
    /// iterations. Returns with the vCPUs running; pause them with
    /// `vm.pause_vcpus()`.
    pub fn start_fresh(&self, pages: u64, delay: u64, high: bool) {
        let n = self.vm.vcpus().len() as u64;
        assert!(WRITE_BASE + n * pages * 4096 <= (3 << 30));
        for i in 0..n {
            let low = WRITE_BASE + i * pages * 4096;
            let r8 = if high {
                HIGH_BASE + i * pages * 4096 - low
            } else {
                0
            };
            self.vm
                .with_vcpu(i as usize, |fd| {
                    fd.set_regs(&kvm_regs {
                        rip: FRESH_CODE,
                        rflags: 0x2,
                        rdi: low,
                        r8,
                        rcx: pages,
                        rsi: 4096,
                        rdx: delay.max(1),
                        rax: Self::fresh_value(i as usize, 0),
                        ..Default::default()
                    })
                    .unwrap()
                })
                .unwrap();
        }
        self.vm.resume_vcpus();
    }

    /// The qword vCPU `vcpu` writes in its pass `pass` (0 = first writes).
    pub fn fresh_value(vcpu: usize, pass: u64) -> u64 {
        (0xA5 << 56) | ((vcpu as u64 + 1) << 48) | (pass + 1)
    }

    /// Which vCPU of [`PageWriter::start_fresh`]`(pages, ..)` owns `page`
    /// of `region` (0: below the hole, 1: from `HIGH_BASE`), if any.
    pub fn fresh_owner(region: usize, page: u64, pages: u64, vcpus: usize) -> Option<usize> {
        let first = if region == 0 { WRITE_BASE / 4096 } else { 0 };
        let i = page.checked_sub(first)? / pages;
        (i < vcpus as u64).then_some(i as usize)
    }
}
