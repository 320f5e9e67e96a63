//! Several writers (`smp=`): the application processors' start-up code (a 16-bit trampoline
//! and a short 64-bit CPL0 entry), their CPL3 loop, the boot processor's INIT-SIPI-SIPI
//! sequence through the local APIC, the partition of the working set, and the boot
//! processor's side of the shared counters (sums for `T`/`STATUS`, `CPU` lines, printing the
//! APs' corruption reports). See the crate docs ("Several CPUs").

use iced_x86::code_asm::*;

use super::{
    advance_next, print_char, print_str, print_var, rdtsc64, string, v, var, Labels, CR0_VALUE,
    CR4_VALUE, EFER_MSR, EFER_VALUE, PRNG_SEED, SEL_KCODE, SEL_KDATA, SEL_TSS, SEL_UCODE,
    SEL_UDATA, USER_RFLAGS,
};
use crate::{
    Error, AP_TRAMPOLINE, CORRUPT_RING_ENTRIES, CORRUPT_RING_OFFSET, CPU_BLOCKS, CPU_BLOCK_SIZE,
    GDTR_ADDR, GDT_ADDR, INDEX_MUL, LAPIC_BASE, PML4_ADDR, TRAMPOLINE_IMAGE, TRAMPOLINE_SIZE,
    VARS_ADDR,
};

/// Offset in the trampoline of its copy of the GDT pseudo-descriptor.
pub(crate) const TR_GDTR: usize = 0x40;
/// Offset in the trampoline of the far pointer (`u32` offset, `u16` selector) to the APs'
/// 64-bit entry.
pub(crate) const TR_FARPTR: usize = 0x48;
/// Local APIC registers: interrupt command register, low and high dword.
pub(crate) const APIC_ICR_LOW: i32 = 0x300;
pub(crate) const APIC_ICR_HIGH: i32 = 0x310;
/// ICR low dword of an INIT IPI: destination shorthand "all excluding self" (0xC0000), level
/// assert (0x4000), edge, delivery mode INIT (0x500). Measured on PVM (kernel 6.18): an INIT
/// sent to a physical destination (ICR high `1 << 24`, low `0x4500`; the AP's APIC ID reads 1)
/// never reached the AP (it stayed `KVM_MP_STATE_UNINITIALIZED` at `F000:FFF0`), while the same
/// IPIs with this shorthand start it. So every AP of the VM is started, and those beyond
/// `smp - 1` park.
pub(crate) const ICR_INIT: u32 = 0xC_4500;
/// ICR low dword of a start-up IPI (without the vector): all excluding self, level assert,
/// delivery mode STARTUP (0x600).
pub(crate) const ICR_STARTUP: u32 = 0xC_4600;
/// The start-up IPI's vector: the APs start at `vector * 4096`.
pub(crate) const SIPI_VECTOR: u32 = (AP_TRAMPOLINE >> 12) as u32;
/// How long the boot processor waits (µs) after the INIT, after the first SIPI and after the
/// second SIPI for the APs to reach CPL3.
const INIT_WAIT_US: i32 = 100;
const FIRST_SIPI_WAIT_US: i32 = 100_000;
const SECOND_SIPI_WAIT_US: i32 = 1_000_000;

/// Labels of the SMP code and its strings.
#[derive(Clone, Copy)]
pub(super) struct SmpLabels {
    pub start_aps: CodeLabel,
    pub partition: CodeLabel,
    pub sum_var: CodeLabel,
    pub drain: CodeLabel,
    pub cpu_lines: CodeLabel,
    pub report_ap: CodeLabel,
    pub k_fresh: CodeLabel,
    pub k_zero: CodeLabel,
    pub k_laps: CodeLabel,
    pub k_smp: CodeLabel,
    pub s_info_fresh: CodeLabel,
    pub s_info_zero: CodeLabel,
    pub s_info_smp: CodeLabel,
    pub s_smp: CodeLabel,
    send_ipi: CodeLabel,
    wait_up: CodeLabel,
    s_err_smp: CodeLabel,
    s_err_smp2: CodeLabel,
    s_err_smp3: CodeLabel,
    s_cpu: CodeLabel,
    s_cpu_written: CodeLabel,
    s_cpu_verified: CodeLabel,
    s_cpu_corrupt: CodeLabel,
}

impl SmpLabels {
    pub(super) fn new(a: &mut CodeAssembler) -> Self {
        SmpLabels {
            start_aps: a.create_label(),
            partition: a.create_label(),
            sum_var: a.create_label(),
            drain: a.create_label(),
            cpu_lines: a.create_label(),
            report_ap: a.create_label(),
            k_fresh: a.create_label(),
            k_zero: a.create_label(),
            k_laps: a.create_label(),
            k_smp: a.create_label(),
            s_info_fresh: a.create_label(),
            s_info_zero: a.create_label(),
            s_info_smp: a.create_label(),
            s_smp: a.create_label(),
            send_ipi: a.create_label(),
            wait_up: a.create_label(),
            s_err_smp: a.create_label(),
            s_err_smp2: a.create_label(),
            s_err_smp3: a.create_label(),
            s_cpu: a.create_label(),
            s_cpu_written: a.create_label(),
            s_cpu_verified: a.create_label(),
            s_cpu_corrupt: a.create_label(),
        }
    }
}

/// The SMP strings.
pub(super) fn strings(a: &mut CodeAssembler, s: &mut SmpLabels) -> Result<(), Error> {
    string(a, &mut s.k_fresh, b"fresh=")?;
    string(a, &mut s.k_zero, b"zero=")?;
    string(a, &mut s.k_laps, b"laps=")?;
    string(a, &mut s.k_smp, b"smp=")?;
    string(a, &mut s.s_info_fresh, b" fresh=")?;
    string(a, &mut s.s_info_zero, b" zero=")?;
    string(a, &mut s.s_info_smp, b" smp=")?;
    string(a, &mut s.s_smp, b"SMP cpus=")?;
    string(a, &mut s.s_err_smp, b"ERROR smp ")?;
    string(a, &mut s.s_err_smp2, b" of ")?;
    string(a, &mut s.s_err_smp3, b" cpus started\n")?;
    string(a, &mut s.s_cpu, b"CPU ")?;
    string(a, &mut s.s_cpu_written, b" written=")?;
    string(a, &mut s.s_cpu_verified, b" verified=")?;
    string(a, &mut s.s_cpu_corrupt, b" corrupt=")?;
    Ok(())
}

/// The 16-bit AP start-up code, [`TRAMPOLINE_SIZE`] bytes to run at [`AP_TRAMPOLINE`] (real
/// mode, `CS = AP_TRAMPOLINE >> 4`, `IP = 0`, the other segments based at 0): load the GDT,
/// set CR4 (PAE), CR3, EFER (LME) and CR0 (PE and PG at once: straight into IA-32e mode) and
/// far-jump through a pointer to the 64-bit CPL0 entry at `ap_entry`. Followed by its data:
/// a copy of the GDTR at [`TR_GDTR`], the far pointer at [`TR_FARPTR`].
pub(crate) fn trampoline(ap_entry: u64) -> Result<Vec<u8>, Error> {
    let mut a = CodeAssembler::new(16)?;
    a.cli()?;
    a.lgdt(ptr(AP_TRAMPOLINE + TR_GDTR as u64))?;
    a.mov(eax, CR4_VALUE)?;
    a.mov(cr4, eax)?;
    a.mov(eax, PML4_ADDR as u32)?;
    a.mov(cr3, eax)?;
    a.mov(ecx, EFER_MSR)?;
    a.mov(eax, EFER_VALUE)?;
    a.xor(edx, edx)?;
    a.wrmsr()?;
    a.mov(eax, CR0_VALUE)?;
    a.mov(cr0, eax)?;
    a.jmp(fword_ptr(AP_TRAMPOLINE + TR_FARPTR as u64))?;
    let mut t = a.assemble(AP_TRAMPOLINE)?;
    if t.len() > TR_GDTR {
        return Err(Error::Layout {
            what: "AP trampoline code",
            size: t.len(),
            room: TR_GDTR,
        });
    }
    let gdt_limit = (GDTR_ADDR - GDT_ADDR - 1) as u16;
    t.resize(TR_GDTR, 0);
    t.extend_from_slice(&gdt_limit.to_le_bytes());
    t.extend_from_slice(&(GDT_ADDR as u32).to_le_bytes());
    t.resize(TR_FARPTR, 0);
    let entry = u32::try_from(ap_entry).map_err(|_| Error::Layout {
        what: "AP 64-bit entry address",
        size: usize::MAX,
        room: u32::MAX as usize,
    })?;
    t.extend_from_slice(&entry.to_le_bytes());
    t.extend_from_slice(&SEL_KCODE.to_le_bytes());
    t.resize(TRAMPOLINE_SIZE as usize, 0);
    Ok(t)
}

/// The APs' 64-bit CPL0 entry (emulated under PVM: short). Loads the data selectors; under a
/// spinlock (the APs start at once), clears the shared TSS descriptor's busy bit and loads the
/// task register (the APs share the boot processor's TSS, which is safe because nothing ever
/// switches stacks through it); takes a slot with `lock xadd`; and `iretq`s to `ap_user` at
/// CPL3 with `rdi` = its block and `rsp` = the block's end. An AP whose slot is not below
/// `SMP - 1` halts (interrupts off: for good).
pub(super) fn ap_cpl0(
    a: &mut CodeAssembler,
    ap_entry: &mut CodeLabel,
    ap_user: CodeLabel,
) -> Result<(), Error> {
    let mut park = a.create_label();
    let mut spin = a.create_label();
    a.set_label(ap_entry)?;
    a.mov(eax, u32::from(SEL_KDATA))?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(edi, VARS_ADDR as u32)?;
    a.set_label(&mut spin)?;
    a.lock().bts(dword_ptr(rdi + var::AP_LOCK), 0)?;
    a.jc(spin)?;
    a.mov(esi, GDT_ADDR as u32)?;
    a.and(byte_ptr(rsi + (i32::from(SEL_TSS) + 5)), 0xfd)?;
    a.mov(eax, u32::from(SEL_TSS))?;
    a.ltr(ax)?;
    a.mov(dword_ptr(rdi + var::AP_LOCK), 0)?;
    a.mov(eax, 1u32)?;
    a.lock().xadd(dword_ptr(rdi + var::AP_SLOT), eax)?;
    a.inc(eax)?;
    a.cmp(eax, dword_ptr(rdi + var::SMP))?;
    a.jae(park)?;
    a.dec(eax)?;
    a.shl(eax, CPU_BLOCK_SIZE.trailing_zeros())?;
    a.add(eax, CPU_BLOCKS as i32)?;
    a.mov(edi, eax)?;
    a.lea(rsp, ptr(rdi + CPU_BLOCK_SIZE as i32))?;
    // With `cpl0=1` the AP stays at CPL0 too.
    a.cmp(dword_ptr(VARS_ADDR + var::KMODE as u64), 0)?;
    a.jne(ap_user)?;
    a.mov(rax, rsp)?;
    a.push(i32::from(SEL_UDATA))?;
    a.push(rax)?;
    a.push(USER_RFLAGS)?;
    a.push(i32::from(SEL_UCODE))?;
    a.lea(rax, ptr(ap_user))?;
    a.push(rax)?;
    a.iretq()?;
    a.set_label(&mut park)?;
    a.hlt()?;
    a.jmp(park)?;
    Ok(())
}

/// The APs' CPL3 program: announce itself (`lock inc CPUS_UP`), wait for the boot processor to
/// configure its block, then write and verify its part of the working set with the same rate
/// and heartbeat period as the boot processor (it prints nothing; corruption goes to its ring).
pub(super) fn ap_program(
    a: &mut CodeAssembler,
    l: &Labels,
    ap_user: &mut CodeLabel,
) -> Result<(), Error> {
    let mut wait = a.create_label();
    let mut top = a.create_label();
    let mut write = a.create_label();
    let mut verify = a.create_label();
    let mut beat = a.create_label();
    a.set_label(ap_user)?;
    a.mov(r15, rdi)?;
    a.mov(rax, VARS_ADDR)?;
    a.lock().inc(qword_ptr(rax + var::CPUS_UP))?;
    a.set_label(&mut wait)?;
    a.pause()?;
    a.cmp(v(var::GO), 0)?;
    a.je(wait)?;
    rdtsc64(a)?;
    a.add(rax, v(var::PERIOD))?;
    a.mov(v(var::NEXT), rax)?;

    a.set_label(&mut top)?;
    rdtsc64(a)?;
    a.cmp(rax, v(var::NEXT))?;
    a.jae(beat)?;
    a.cmp(v(var::RATE_MAX), 0)?;
    a.jne(write)?;
    a.cmp(v(var::BUDGET), 0)?;
    a.je(verify)?;
    a.dec(v(var::BUDGET))?;
    a.set_label(&mut write)?;
    a.call(l.write_page)?;
    a.jmp(top)?;
    a.set_label(&mut verify)?;
    a.call(l.verify_page)?;
    a.jmp(top)?;
    a.set_label(&mut beat)?;
    a.mov(v(var::NOW), rax)?;
    advance_next(a)?;
    a.mov(rax, v(var::RATE))?;
    a.mov(v(var::BUDGET), rax)?;
    a.jmp(top)?;
    Ok(())
}

/// Loads `dst` with the block of CPU `r12` (the boot processor's variables for 0).
fn block_of_r12(a: &mut CodeAssembler, dst: AsmRegister64) -> Result<(), Error> {
    let mut have = a.create_label();
    a.mov(dst, r15)?;
    a.test(r12, r12)?;
    a.jz(have)?;
    a.lea(dst, ptr(r12 - 1))?;
    a.shl(dst, CPU_BLOCK_SIZE.trailing_zeros())?;
    a.add(dst, CPU_BLOCKS as i32)?;
    a.set_label(&mut have)?;
    Ok(())
}

/// The SMP subroutines.
pub(super) fn subroutines(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), Error> {
    start_aps(a, l)?;
    partition(a, l)?;
    counters(a, l)?;
    reports(a, l)?;
    Ok(())
}

/// `start_aps` (BSP, `SMP > 1`): copies the trampoline below 1 MiB, sends INIT, waits 100 µs,
/// sends a SIPI, and waits up to 100 ms for `SMP - 1` APs to reach CPL3; then a second SIPI
/// and up to another second. If fewer came up it prints `ERROR smp <n> of <SMP> cpus
/// started`. Sets CPUS to 1 + the APs up. `send_ipi`: eax = ICR low dword. `wait_up`: eax =
/// µs; returns eax = 1 once `CPUS_UP >= SMP - 1`, 0 at the timeout.
/// Clobbers rax, rcx, rdx, rsi, rdi, r8.
fn start_aps(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), Error> {
    let s = &mut l.s;
    let mut done = a.create_label();
    a.set_label(&mut s.start_aps)?;
    a.mov(esi, TRAMPOLINE_IMAGE as u32)?;
    a.mov(edi, AP_TRAMPOLINE as u32)?;
    a.mov(ecx, TRAMPOLINE_SIZE as u32)?;
    a.rep().movsb()?;
    a.mov(eax, ICR_INIT)?;
    a.call(s.send_ipi)?;
    a.mov(eax, INIT_WAIT_US as u32)?;
    a.call(s.wait_up)?;
    for wait in [FIRST_SIPI_WAIT_US, SECOND_SIPI_WAIT_US] {
        a.mov(eax, ICR_STARTUP | SIPI_VECTOR)?;
        a.call(s.send_ipi)?;
        a.mov(eax, wait as u32)?;
        a.call(s.wait_up)?;
        a.test(eax, eax)?;
        a.jnz(done)?;
    }
    let (e1, e2) = (s.s_err_smp, s.s_err_smp2);
    print_str(a, l, e1)?;
    a.mov(rax, v(var::CPUS_UP))?;
    a.inc(rax)?;
    a.call(l.put_dec)?;
    print_str(a, l, e2)?;
    print_var(a, l, var::SMP)?;
    print_str(a, l, l.s.s_err_smp3)?;
    a.set_label(&mut done)?;
    a.mov(rax, v(var::CPUS_UP))?;
    a.inc(rax)?;
    a.mov(v(var::CPUS), rax)?;
    a.ret()?;

    let s = &mut l.s;
    a.set_label(&mut s.send_ipi)?;
    a.mov(rdi, LAPIC_BASE)?;
    a.mov(dword_ptr(rdi + APIC_ICR_HIGH), 0)?;
    a.mov(dword_ptr(rdi + APIC_ICR_LOW), eax)?;
    a.ret()?;

    let mut poll = a.create_label();
    let mut yes = a.create_label();
    a.set_label(&mut s.wait_up)?;
    a.mul(v(var::TSC_KHZ))?;
    a.mov(ecx, 1000u32)?;
    a.div(rcx)?;
    a.mov(r8, rax)?;
    rdtsc64(a)?;
    a.add(r8, rax)?;
    a.set_label(&mut poll)?;
    a.mov(rax, v(var::CPUS_UP))?;
    a.inc(rax)?;
    a.cmp(rax, v(var::SMP))?;
    a.jae(yes)?;
    a.pause()?;
    rdtsc64(a)?;
    a.cmp(rax, r8)?;
    a.jb(poll)?;
    a.xor(eax, eax)?;
    a.ret()?;
    a.set_label(&mut yes)?;
    a.mov(eax, 1u32)?;
    a.ret()?;
    Ok(())
}

/// `partition` (BSP): gives CPU `k` of CPUS the pages `k * WS_PAGES / CPUS .. (k + 1) *
/// WS_PAGES / CPUS` (its PART_* and cursors), copies the settings into each AP's block (its
/// PRNG seeded with `PRNG_SEED ^ k * INDEX_MUL`), then sets each AP's GO.
/// Clobbers rax, rcx, rdx, rdi, r8, r12.
fn partition(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), Error> {
    let mut top = a.create_label();
    let mut next = a.create_label();
    let mut go = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut l.s.partition)?;
    a.xor(r12d, r12d)?;
    a.set_label(&mut top)?;
    block_of_r12(a, rdi)?;
    a.mov(rax, r12)?;
    a.mul(v(var::WS_PAGES))?;
    a.div(v(var::CPUS))?;
    a.mov(r8, rax)?;
    for off in [var::PART_BASE, var::WCURSOR, var::VCURSOR] {
        a.mov(qword_ptr(rdi + off), r8)?;
    }
    a.lea(rax, ptr(r12 + 1))?;
    a.mul(v(var::WS_PAGES))?;
    a.div(v(var::CPUS))?;
    a.mov(qword_ptr(rdi + var::PART_END), rax)?;
    a.sub(rax, r8)?;
    a.mov(qword_ptr(rdi + var::PART_COUNT), rax)?;
    a.test(r12, r12)?;
    a.jz(next)?;
    for off in [
        var::RATE,
        var::RATE_MAX,
        var::PATTERN,
        var::PERIOD,
        var::TSC_KHZ,
        var::FRESH,
        var::ZERO_N,
        var::LAPS,
        var::CPUS,
    ] {
        a.mov(rax, v(off))?;
        a.mov(qword_ptr(rdi + off), rax)?;
    }
    a.mov(rax, v(var::RATE))?;
    a.mov(qword_ptr(rdi + var::BUDGET), rax)?;
    a.mov(qword_ptr(rdi + var::CPU_ID), r12)?;
    a.mov(rax, INDEX_MUL)?;
    a.mul(r12)?;
    a.mov(rdx, PRNG_SEED)?;
    a.xor(rax, rdx)?;
    a.mov(qword_ptr(rdi + var::PRNG), rax)?;
    a.set_label(&mut next)?;
    a.inc(r12)?;
    a.cmp(r12, v(var::CPUS))?;
    a.jb(top)?;
    // The blocks are complete: let the APs go (x86 stores are seen in order).
    a.mov(rcx, v(var::CPUS))?;
    a.dec(rcx)?;
    a.jz(done)?;
    a.mov(edi, CPU_BLOCKS as u32)?;
    a.set_label(&mut go)?;
    a.mov(qword_ptr(rdi + var::GO), 1)?;
    a.add(rdi, CPU_BLOCK_SIZE as i32)?;
    a.dec(rcx)?;
    a.jnz(go)?;
    a.set_label(&mut done)?;
    a.ret()?;
    Ok(())
}

/// `sum_var` (BSP): esi = a counter's offset; returns in rax its sum over the CPUS blocks.
/// Clobbers rcx, rdi.
/// `cpu_lines` (BSP, with CPUS > 1): prints `CPU <k> written=<n> verified=<n> corrupt=<n>`
/// for every CPU. Clobbers rax, rcx, rdx, rsi, rdi, r12, r13.
fn counters(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), Error> {
    let mut top = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut l.s.sum_var)?;
    a.mov(rax, qword_ptr(r15 + rsi))?;
    a.mov(rcx, v(var::CPUS))?;
    a.dec(rcx)?;
    a.jz(done)?;
    a.mov(edi, CPU_BLOCKS as u32)?;
    a.set_label(&mut top)?;
    a.add(rax, qword_ptr(rdi + rsi))?;
    a.add(rdi, CPU_BLOCK_SIZE as i32)?;
    a.dec(rcx)?;
    a.jnz(top)?;
    a.set_label(&mut done)?;
    a.ret()?;

    let mut line = a.create_label();
    let mut out = a.create_label();
    a.set_label(&mut l.s.cpu_lines)?;
    a.cmp(v(var::CPUS), 1)?;
    a.jbe(out)?;
    a.xor(r12d, r12d)?;
    a.set_label(&mut line)?;
    block_of_r12(a, r13)?;
    let s = l.s;
    print_str(a, l, s.s_cpu)?;
    a.mov(rax, r12)?;
    a.call(l.put_dec)?;
    for (label, off) in [
        (s.s_cpu_written, var::WRITTEN),
        (s.s_cpu_verified, var::VERIFIED),
        (s.s_cpu_corrupt, var::CORRUPT),
    ] {
        print_str(a, l, label)?;
        a.mov(rax, qword_ptr(r13 + off))?;
        a.call(l.put_dec)?;
    }
    print_char(a, l, b'\n')?;
    a.inc(r12)?;
    a.cmp(r12, v(var::CPUS))?;
    a.jb(line)?;
    a.set_label(&mut out)?;
    a.ret()?;
    Ok(())
}

/// `report_ap` (AP): queues a corruption report (r12 = page, r10 = got, r11 = want) in its
/// ring, waiting while the ring is full. Clobbers rax.
/// `drain` (BSP, every heartbeat): prints every queued report of every AP as a `CORRUPT`
/// line. Clobbers rax, rcx, rdx, rsi, rdi, r10 - r14.
fn reports(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), Error> {
    let ring = CORRUPT_RING_OFFSET as i32;
    let wait = l.s.report_ap;
    let mut room = a.create_label();
    a.set_label(&mut l.s.report_ap)?;
    a.mov(rax, v(var::RING_HEAD))?;
    a.sub(rax, v(var::RING_TAIL))?;
    a.cmp(rax, CORRUPT_RING_ENTRIES as i32)?;
    a.jb(room)?;
    a.pause()?;
    a.jmp(wait)?;
    a.set_label(&mut room)?;
    a.mov(rax, v(var::RING_HEAD))?;
    a.and(eax, (CORRUPT_RING_ENTRIES - 1) as i32)?;
    a.imul_3(eax, eax, 24)?;
    a.mov(qword_ptr(r15 + rax + ring), r12)?;
    a.mov(qword_ptr(r15 + rax + (ring + 8)), r10)?;
    a.mov(qword_ptr(r15 + rax + (ring + 16)), r11)?;
    a.inc(v(var::RING_HEAD))?;
    a.ret()?;

    let mut entry = a.create_label();
    let mut next = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut l.s.drain)?;
    a.mov(r13, v(var::CPUS))?;
    a.dec(r13)?;
    a.jz(done)?;
    a.mov(r14d, CPU_BLOCKS as u32)?;
    a.set_label(&mut entry)?;
    a.mov(rax, qword_ptr(r14 + var::RING_TAIL))?;
    a.cmp(rax, qword_ptr(r14 + var::RING_HEAD))?;
    a.je(next)?;
    a.and(eax, (CORRUPT_RING_ENTRIES - 1) as i32)?;
    a.imul_3(eax, eax, 24)?;
    a.mov(r12, qword_ptr(r14 + rax + ring))?;
    a.mov(r10, qword_ptr(r14 + rax + (ring + 8)))?;
    a.mov(r11, qword_ptr(r14 + rax + (ring + 16)))?;
    a.call(l.report_corrupt)?;
    a.inc(qword_ptr(r14 + var::RING_TAIL))?;
    a.jmp(entry)?;
    a.set_label(&mut next)?;
    a.add(r14, CPU_BLOCK_SIZE as i32)?;
    a.dec(r13)?;
    a.jnz(entry)?;
    a.set_label(&mut done)?;
    a.ret()?;
    Ok(())
}
