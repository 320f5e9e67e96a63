//! Generates the guest: prebuilt descriptor tables and page tables, the tiny 32-bit/CPL0 boot
//! code and the CPL3 program, assembled with iced-x86's `CodeAssembler`.

use iced_x86::code_asm::*;

use crate::{
    elf, Error, BSS_START, CODE64_ADDR, DEFAULT_HB_US, DEFAULT_WS_MIB, ENTRY, GDTR_ADDR, GDT_ADDR,
    GEN_TABLE, HEARTBEATS_PER_TLINE, IMAGE_END, INDEX_MUL, KSTACK_TOP, LOAD_ADDR, MAX_CPUS,
    MAX_WS_MIB, PDPT_ADDR, PD_ADDR, PD_COUNT, PML4_ADDR, TRAMPOLINE_IMAGE, TSS_ADDR, USTACK_TOP,
    VARS_ADDR, WS_BASE,
};

/// Multiboot v1 header magic.
pub(crate) const MB_MAGIC: u32 = 0x1BAD_B002;
/// Multiboot header flags: bit 0 (page-align modules) | bit 1 (memory info).
pub(crate) const MB_FLAGS: u32 = 0x3;
/// The value a Multiboot loader leaves in EAX.
pub(crate) const MB_BOOT_EAX: u32 = 0x2BAD_B002;

/// Kernel 64-bit code selector.
pub(crate) const SEL_KCODE: u16 = 0x08;
/// Kernel data selector.
pub(crate) const SEL_KDATA: u16 = 0x10;
/// User data selector (with RPL 3).
pub(crate) const SEL_UDATA: u16 = 0x18 | 3;
/// User 64-bit code selector (with RPL 3).
pub(crate) const SEL_UCODE: u16 = 0x20 | 3;
/// 64-bit TSS selector.
pub(crate) const SEL_TSS: u16 = 0x30;

/// Size of the TSS proper; the I/O permission bitmap follows at this offset.
const TSS_IOMAP_BASE: usize = 0x68;
/// Size of the I/O permission bitmap (65536 ports).
const IOMAP_BYTES: usize = 8192;
/// TSS limit: covers the bitmap and the trailing 0xFF byte.
pub(crate) const TSS_LIMIT: u32 = (TSS_IOMAP_BASE + IOMAP_BYTES) as u32;

/// Control-register values, as in the notes on PVM.
const CR4_VALUE: u32 = 0x620; // PAE | OSFXSR | OSXMMEXCPT
const CR0_VALUE: u32 = 0x8001_0033; // PG | WP | NE | ET | MP | PE
const EFER_MSR: u32 = 0xC000_0080;
const EFER_VALUE: u32 = 0x501; // LME | LMA | SCE
const USER_RFLAGS: i32 = 0x3002; // IOPL 3, reserved bit 1, IF clear

/// PIT input clock (Hz).
const PIT_HZ: u64 = 1_193_182;
/// PIT channel 2 counts for the calibration: ~10 ms (as Linux's `pit_calibrate_tsc`) and ~1 ms.
const PIT_LATCH_LONG: u64 = PIT_HZ / 100;
const PIT_LATCH_SHORT: u64 = PIT_HZ / 1000;
/// Number of PIT measurements of each length; the shortest one is used.
const PIT_TRIES: u32 = 5;
/// Give up PIT calibration after this many TSC ticks (tens of seconds at any real frequency).
const PIT_TIMEOUT_TICKS: u64 = 1 << 36;
/// Clamp for `hb=` and `tsc_khz=` so that `hb * tsc_khz` cannot overflow 64 bits.
const PARAM_MAX: u64 = 1_000_000_000;
/// Seed of the xorshift64 generator for `pattern=rand`.
const PRNG_SEED: u64 = 0x2545_F491_4F6C_DD1D;
const COM1: i32 = 0x3f8;

mod gap;
mod kmode;
mod net;
mod smp;

/// Offsets of the CPL3 program's variables from `VARS_ADDR` (kept in `r15`); an AP's block
/// (`CPU_BLOCKS`) uses the same offsets for its own writer state.
mod var {
    pub const WS_MIB: i32 = 0;
    pub const WS_PAGES: i32 = 8;
    pub const RATE: i32 = 16;
    pub const RATE_MAX: i32 = 24;
    pub const HB_US: i32 = 32;
    pub const PATTERN: i32 = 40;
    pub const TSC_KHZ: i32 = 48;
    pub const PERIOD: i32 = 56;
    pub const NEXT: i32 = 64;
    pub const HEARTBEATS: i32 = 72;
    pub const WRITTEN: i32 = 80;
    pub const VERIFIED: i32 = 88;
    pub const CORRUPT: i32 = 96;
    pub const WCURSOR: i32 = 104;
    pub const VCURSOR: i32 = 112;
    pub const PRNG: i32 = 120;
    pub const BUDGET: i32 = 128;
    pub const MBI: i32 = 136;
    pub const NOW: i32 = 144;
    pub const TCOUNT: i32 = 152;
    /// `fresh=`: non-zero = never verify a generation-0 page.
    pub const FRESH: i32 = 160;
    /// `zero=`: every n-th generation of a page is all zero (0 = never).
    pub const ZERO_N: i32 = 168;
    /// `smp=` (clamped to 1 ..= MAX_CPUS), and the number of CPUs that run (BSP + APs up).
    pub const SMP: i32 = 176;
    pub const CPUS: i32 = 184;
    /// 32-byte scratch buffer for number formatting.
    pub const NUMBUF: i32 = 192;
    /// Console line buffer: bytes in it, and 1 once the line overflowed.
    pub const LINE_LEN: i32 = 224;
    pub const LINE_OVF: i32 = 232;
    /// Frames the network driver received / sent / could not send.
    pub const RX_FRAMES: i32 = 240;
    pub const TX_FRAMES: i32 = 248;
    pub const TX_DROP: i32 = 256;
    /// 1 once the virtio-net driver is up (DRIVER_OK).
    pub const NET_ON: i32 = 264;
    /// `net=` token: 0 absent, 1 parsed, 2 malformed.
    pub const NET_TOKEN: i32 = 272;
    /// virtio-mmio register window address, IRQ (unused: the guest polls).
    pub const NET_BASE: i32 = 280;
    pub const NET_IRQ: i32 = 288;
    /// The guest's IPv4 address, network byte order (dword).
    pub const NET_IP: i32 = 296;
    /// The MAC (6 bytes).
    pub const NET_MAC: i32 = 304;
    /// Negotiated feature bits 0..31.
    pub const NET_FEAT: i32 = 312;
    /// Next avail index of the receive / transmit / control queue (u16).
    pub const RX_AVAIL: i32 = 320;
    pub const TX_AVAIL: i32 = 328;
    pub const CTRL_AVAIL: i32 = 336;
    /// Last used index of the receive queue the driver processed (u16).
    pub const RX_USED: i32 = 344;
    /// Gratuitous ARPs sent for announce requests.
    pub const ANNOUNCES: i32 = 352;
    /// This CPU's part of the working set: first page, end page (exclusive), page count.
    pub const PART_BASE: i32 = 360;
    pub const PART_END: i32 = 368;
    pub const PART_COUNT: i32 = 376;
    /// 0 on the boot processor, `k` on AP `k`.
    pub const CPU_ID: i32 = 384;
    /// AP blocks only: reports written (by the AP) and printed (by the BSP) so far.
    pub const RING_HEAD: i32 = 392;
    pub const RING_TAIL: i32 = 400;
    /// AP blocks only: set to 1 by the BSP once the block is configured.
    pub const GO: i32 = 408;
    /// BSP only: APs that reached CPL3 (each increments it), and the slot counter they take
    /// their block index from (`lock xadd`).
    pub const CPUS_UP: i32 = 416;
    pub const AP_SLOT: i32 = 424;
    /// BSP only: a spinlock the APs hold while they load the shared TSS.
    pub const AP_LOCK: i32 = 432;
    /// BSP only: 1 when the program runs at CPL0 (`cpl0=1`); the APs then stay at CPL0 too.
    pub const KMODE: i32 = 440;
    /// `gap=` (µs; 0 = the stall meter is off), the same in TSC ticks, the TSC of the meter's
    /// previous tick (0 = not armed yet), a stall (ticks) waiting to be printed (0 = none), and
    /// the last stall printed (µs).
    pub const GAP_US: i32 = 448;
    pub const GAP_TICKS: i32 = 456;
    pub const GAP_PREV: i32 = 464;
    pub const GAP_PENDING: i32 = 472;
    pub const GAP_LAST: i32 = 480;
    /// `laps=`: after this many writes per page of its part, a CPU stops writing (0 = never).
    pub const LAPS: i32 = 488;
    /// Console line buffer (`LINE_MAX` bytes and a NUL).
    pub const LINEBUF: i32 = 512;
}

/// The Multiboot v1 header (12 bytes).
pub(crate) fn multiboot_header() -> [u8; 12] {
    let checksum = 0u32.wrapping_sub(MB_MAGIC).wrapping_sub(MB_FLAGS);
    let mut h = [0u8; 12];
    h[0..4].copy_from_slice(&MB_MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&MB_FLAGS.to_le_bytes());
    h[8..12].copy_from_slice(&checksum.to_le_bytes());
    h
}

/// Encodes a (16-byte) system segment descriptor for a 64-bit TSS.
fn tss_descriptor(base: u64, limit: u32) -> [u64; 2] {
    let limit = u64::from(limit);
    let lo = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [lo, base >> 32]
}

/// The GDT: null, kernel code64, kernel data, user data, user code64, unused, 64-bit TSS.
pub(crate) fn gdt() -> [u64; 8] {
    let tss = tss_descriptor(TSS_ADDR, TSS_LIMIT);
    [
        0,
        0x00af_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00cf_f200_0000_ffff,
        0x00af_fa00_0000_ffff,
        0,
        tss[0],
        tss[1],
    ]
}

/// The 64-bit TSS followed by its I/O permission bitmap (all ports allowed) and the 0xFF byte.
pub(crate) fn tss() -> Vec<u8> {
    let mut t = vec![0u8; TSS_IOMAP_BASE + IOMAP_BYTES + 1];
    t[4..12].copy_from_slice(&KSTACK_TOP.to_le_bytes()); // rsp0
    t[0x66..0x68].copy_from_slice(&(TSS_IOMAP_BASE as u16).to_le_bytes());
    t[TSS_IOMAP_BASE + IOMAP_BYTES] = 0xff;
    t
}

/// PML4, PDPT and `PD_COUNT` page directories identity-mapping `0 .. PD_COUNT GiB` with 2 MiB
/// pages, user-accessible and writable at every level.
pub(crate) fn page_tables() -> Vec<u8> {
    const P_RW_US: u64 = 0x7;
    const PS: u64 = 0x80;
    let mut t = vec![0u8; (2 + PD_COUNT as usize) * 0x1000];
    let mut put = |addr: u64, v: u64| {
        let off = (addr - PML4_ADDR) as usize;
        t[off..off + 8].copy_from_slice(&v.to_le_bytes());
    };
    put(PML4_ADDR, PDPT_ADDR | P_RW_US);
    for i in 0..PD_COUNT {
        let pd = PD_ADDR + i * 0x1000;
        put(PDPT_ADDR + i * 8, pd | P_RW_US);
        for j in 0..512 {
            put(pd + j * 8, (((i << 9) | j) << 21) | PS | P_RW_US);
        }
    }
    t
}

/// The 32-bit entry code (assembled for `ENTRY`): check EAX, load the GDT, enable PAE, load CR3,
/// set EFER, enable paging and far-jump to the 64-bit code.
pub(crate) fn boot32() -> Result<Vec<u8>, Error> {
    let mut a = CodeAssembler::new(32)?;
    let mut spin = a.create_label();
    a.cmp(eax, MB_BOOT_EAX)?;
    a.jne(spin)?;
    a.lgdt(ptr(GDTR_ADDR))?;
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
    a.jmp_far(SEL_KCODE, CODE64_ADDR as u32)?;
    a.set_label(&mut spin)?;
    a.pause()?;
    a.jmp(spin)?;
    Ok(a.assemble(ENTRY)?)
}

/// Reads the 64-bit TSC into `rax` (clobbers `rdx`).
fn rdtsc64(a: &mut CodeAssembler) -> Result<(), Error> {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    Ok(())
}

/// Emits a NUL-terminated string under a fresh label.
fn string(a: &mut CodeAssembler, label: &mut CodeLabel, s: &[u8]) -> Result<(), Error> {
    a.set_label(label)?;
    let mut bytes = s.to_vec();
    bytes.push(0);
    a.db(&bytes)?;
    Ok(())
}

/// Labels of the CPL3 program's subroutines and strings.
#[derive(Clone, Copy)]
struct Labels {
    putc: CodeLabel,
    puts: CodeLabel,
    put_dec: CodeLabel,
    put_hex: CodeLabel,
    parse_dec: CodeLabel,
    match_key: CodeLabel,
    calibrate: CodeLabel,
    pit_measure: CodeLabel,
    fill_page: CodeLabel,
    fill_gen: CodeLabel,
    zero_gen: CodeLabel,
    write_page: CodeLabel,
    verify_page: CodeLabel,
    report_corrupt: CodeLabel,
    halt: CodeLabel,
    k_ws: CodeLabel,
    k_rate: CodeLabel,
    k_hb: CodeLabel,
    k_pattern: CodeLabel,
    k_tsc: CodeLabel,
    s_max: CodeLabel,
    s_seq: CodeLabel,
    s_rand: CodeLabel,
    s_err_ws: CodeLabel,
    s_err_ws2: CodeLabel,
    s_err_pit: CodeLabel,
    s_info: CodeLabel,
    s_info_hb: CodeLabel,
    s_info_pat: CodeLabel,
    s_info_cpl: CodeLabel,
    s_ready: CodeLabel,
    s_ready_rate: CodeLabel,
    s_corrupt: CodeLabel,
    s_got: CodeLabel,
    s_want: CodeLabel,
    n: net::NetLabels,
    s: smp::SmpLabels,
    g: gap::GapLabels,
}

impl Labels {
    fn new(a: &mut CodeAssembler) -> Self {
        Labels {
            putc: a.create_label(),
            puts: a.create_label(),
            put_dec: a.create_label(),
            put_hex: a.create_label(),
            parse_dec: a.create_label(),
            match_key: a.create_label(),
            calibrate: a.create_label(),
            pit_measure: a.create_label(),
            fill_page: a.create_label(),
            fill_gen: a.create_label(),
            zero_gen: a.create_label(),
            write_page: a.create_label(),
            verify_page: a.create_label(),
            report_corrupt: a.create_label(),
            halt: a.create_label(),
            k_ws: a.create_label(),
            k_rate: a.create_label(),
            k_hb: a.create_label(),
            k_pattern: a.create_label(),
            k_tsc: a.create_label(),
            s_max: a.create_label(),
            s_seq: a.create_label(),
            s_rand: a.create_label(),
            s_err_ws: a.create_label(),
            s_err_ws2: a.create_label(),
            s_err_pit: a.create_label(),
            s_info: a.create_label(),
            s_info_hb: a.create_label(),
            s_info_pat: a.create_label(),
            s_info_cpl: a.create_label(),
            s_ready: a.create_label(),
            s_ready_rate: a.create_label(),
            s_corrupt: a.create_label(),
            s_got: a.create_label(),
            s_want: a.create_label(),
            n: net::NetLabels::new(a),
            s: smp::SmpLabels::new(a),
            g: gap::GapLabels::new(a),
        }
    }
}

/// `[r15 + off]`, a qword variable of the CPL3 program.
fn v(off: i32) -> AsmMemoryOperand {
    qword_ptr(r15 + off)
}

/// Prints the NUL-terminated string at `label`.
fn print_str(a: &mut CodeAssembler, l: &Labels, label: CodeLabel) -> Result<(), Error> {
    a.lea(rsi, ptr(label))?;
    a.call(l.puts)?;
    Ok(())
}

/// Prints one byte.
fn print_char(a: &mut CodeAssembler, l: &Labels, c: u8) -> Result<(), Error> {
    a.mov(al, i32::from(c))?;
    a.call(l.putc)?;
    Ok(())
}

/// Prints the decimal value of a counter summed over all running CPUs.
fn print_sum(a: &mut CodeAssembler, l: &Labels, off: i32) -> Result<(), Error> {
    a.mov(esi, off as u32)?;
    a.call(l.s.sum_var)?;
    a.call(l.put_dec)?;
    Ok(())
}

/// Prints the decimal value of a variable.
fn print_var(a: &mut CodeAssembler, l: &Labels, off: i32) -> Result<(), Error> {
    a.mov(rax, v(off))?;
    a.call(l.put_dec)?;
    Ok(())
}

/// The assembled 64-bit part.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct Code64 {
    /// Machine code followed by the string data, to be placed at `CODE64_ADDR`.
    pub bytes: Vec<u8>,
    /// Offset of the CPL3 program's first instruction (the end of the CPL0 code).
    pub user_entry: usize,
    /// Offset of the APs' 64-bit CPL0 entry (after the boot processor's CPL0 code, before
    /// `user_entry`); the AP trampoline far-jumps here.
    pub ap_entry: usize,
    /// Offset of the APs' CPL3 program (inside the CPL3 part).
    pub ap_user: usize,
    /// Offset where the instructions end and the string data starts.
    pub data_start: usize,
}

/// The 64-bit code (assembled for `CODE64_ADDR`): the CPL0 trampoline, then the CPL3 program.
pub(crate) fn code64() -> Result<Code64, Error> {
    let mut a = CodeAssembler::new(64)?;
    let l = Labels::new(&mut a);
    let mut user_entry = a.create_label();
    let mut ap_entry = a.create_label();
    let mut ap_user = a.create_label();

    // ---- CPL0 (emulated under PVM: keep it short) ----
    a.mov(eax, u32::from(SEL_KDATA))?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(eax, u32::from(SEL_TSS))?;
    a.ltr(ax)?;
    a.mov(esp, KSTACK_TOP as u32)?;
    a.mov(edi, ebx)?; // Multiboot info pointer, zero-extended
                      // `cpl0=1` on the command line: run the program at CPL0 (kernel mode) instead.
    let mut to_user = a.create_label();
    kmode::scan_cmdline(&mut a, to_user)?;
    a.mov(esp, USTACK_TOP as u32)?;
    a.jmp(user_entry)?;
    a.set_label(&mut to_user)?;
    a.push(i32::from(SEL_UDATA))?;
    a.push(USTACK_TOP as i32)?;
    a.push(USER_RFLAGS)?;
    a.push(i32::from(SEL_UCODE))?;
    a.lea(rax, ptr(user_entry))?;
    a.push(rax)?;
    a.iretq()?;
    // The APs' CPL0 entry (emulated too; see smp.rs).
    smp::ap_cpl0(&mut a, &mut ap_entry, ap_user)?;

    // ---- CPL3 ----
    a.set_label(&mut user_entry)?;
    init_and_parse(&mut a, &l)?;
    validate_and_setup(&mut a, &l)?;
    main_loop(&mut a, &l)?;
    smp::ap_program(&mut a, &l, &mut ap_user)?;
    subroutines(&mut a, &l)?;
    let data = strings(&mut a, l)?;
    let r = a.assemble_options(
        CODE64_ADDR,
        iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    Ok(Code64 {
        user_entry: (r.label_ip(&user_entry)? - CODE64_ADDR) as usize,
        ap_entry: (r.label_ip(&ap_entry)? - CODE64_ADDR) as usize,
        ap_user: (r.label_ip(&ap_user)? - CODE64_ADDR) as usize,
        data_start: (r.label_ip(&data)? - CODE64_ADDR) as usize,
        bytes: r.inner.code_buffer,
    })
}

/// Clears the variables, sets the defaults and parses the Multiboot command line.
fn init_and_parse(a: &mut CodeAssembler, l: &Labels) -> Result<(), Error> {
    a.mov(rbx, rdi)?;
    a.mov(r15, VARS_ADDR)?;
    a.mov(rdi, r15)?;
    a.xor(eax, eax)?;
    a.mov(ecx, 512u32)?;
    a.rep().stosq()?;
    a.mov(v(var::MBI), rbx)?;
    a.mov(v(var::WS_MIB), DEFAULT_WS_MIB as i32)?;
    a.mov(v(var::HB_US), DEFAULT_HB_US as i32)?;
    a.mov(v(var::TCOUNT), HEARTBEATS_PER_TLINE as i32)?;
    a.mov(v(var::SMP), 1)?;
    a.mov(v(var::CPUS), 1)?;
    kmode::record(a, var::KMODE)?;
    a.mov(rax, PRNG_SEED)?;
    a.mov(v(var::PRNG), rax)?;

    let mut done = a.create_label();
    let mut tok_loop = a.create_label();
    let mut tok_start = a.create_label();
    let mut tok_skip = a.create_label();
    let mut not_ws = a.create_label();
    let mut not_rate = a.create_label();
    let mut rate_num = a.create_label();
    let mut not_hb = a.create_label();
    let mut not_pattern = a.create_label();
    let mut not_rand = a.create_label();
    let mut not_tsc = a.create_label();

    a.test(dword_ptr(rbx), 4)?; // flags bit 2: cmdline valid
    a.jz(done)?;
    a.mov(esi, dword_ptr(rbx + 16))?;
    a.test(rsi, rsi)?;
    a.jz(done)?;

    // Skip separators (any byte <= ' ' other than NUL).
    a.set_label(&mut tok_loop)?;
    a.mov(al, byte_ptr(rsi))?;
    a.test(al, al)?;
    a.jz(done)?;
    a.cmp(al, 0x20)?;
    a.ja(tok_start)?;
    a.inc(rsi)?;
    a.jmp(tok_loop)?;

    a.set_label(&mut tok_start)?;
    // ws=
    a.lea(rdi, ptr(l.k_ws))?;
    a.call(l.match_key)?;
    a.test(eax, eax)?;
    a.jz(not_ws)?;
    a.call(l.parse_dec)?;
    a.mov(v(var::WS_MIB), rax)?;
    a.jmp(tok_skip)?;
    // rate=
    a.set_label(&mut not_ws)?;
    a.lea(rdi, ptr(l.k_rate))?;
    a.call(l.match_key)?;
    a.test(eax, eax)?;
    a.jz(not_rate)?;
    a.lea(rdi, ptr(l.s_max))?;
    a.call(l.match_key)?;
    a.test(eax, eax)?;
    a.jz(rate_num)?;
    a.mov(v(var::RATE_MAX), 1)?;
    a.jmp(tok_skip)?;
    a.set_label(&mut rate_num)?;
    a.call(l.parse_dec)?;
    a.mov(v(var::RATE), rax)?;
    a.mov(v(var::RATE_MAX), 0)?;
    a.jmp(tok_skip)?;
    // hb=
    a.set_label(&mut not_rate)?;
    a.lea(rdi, ptr(l.k_hb))?;
    a.call(l.match_key)?;
    a.test(eax, eax)?;
    a.jz(not_hb)?;
    a.call(l.parse_dec)?;
    a.mov(v(var::HB_US), rax)?;
    a.jmp(tok_skip)?;
    // pattern=
    a.set_label(&mut not_hb)?;
    a.lea(rdi, ptr(l.k_pattern))?;
    a.call(l.match_key)?;
    a.test(eax, eax)?;
    a.jz(not_pattern)?;
    a.lea(rdi, ptr(l.s_rand))?;
    a.call(l.match_key)?;
    a.test(eax, eax)?;
    a.jz(not_rand)?;
    a.mov(v(var::PATTERN), 1)?;
    a.jmp(tok_skip)?;
    a.set_label(&mut not_rand)?;
    a.lea(rdi, ptr(l.s_seq))?;
    a.call(l.match_key)?;
    a.test(eax, eax)?;
    a.jz(tok_skip)?;
    a.mov(v(var::PATTERN), 0)?;
    a.jmp(tok_skip)?;
    // tsc_khz=
    a.set_label(&mut not_pattern)?;
    a.lea(rdi, ptr(l.k_tsc))?;
    a.call(l.match_key)?;
    a.test(eax, eax)?;
    a.jz(not_tsc)?;
    a.call(l.parse_dec)?;
    a.mov(v(var::TSC_KHZ), rax)?;
    a.jmp(tok_skip)?;
    // fresh=, zero=, smp=
    a.set_label(&mut not_tsc)?;
    for (key, off) in [
        (l.s.k_fresh, var::FRESH),
        (l.s.k_zero, var::ZERO_N),
        (l.s.k_laps, var::LAPS),
        (l.s.k_smp, var::SMP),
        (l.g.k_gap, var::GAP_US),
    ] {
        let mut next = a.create_label();
        a.lea(rdi, ptr(key))?;
        a.call(l.match_key)?;
        a.test(eax, eax)?;
        a.jz(next)?;
        a.call(l.parse_dec)?;
        a.mov(v(off), rax)?;
        a.jmp(tok_skip)?;
        a.set_label(&mut next)?;
    }
    // net=
    a.lea(rdi, ptr(l.n.k_net))?;
    a.call(l.match_key)?;
    a.test(eax, eax)?;
    a.jz(tok_skip)?;
    a.call(l.n.parse_net)?;
    // Skip the rest of the token.
    a.set_label(&mut tok_skip)?;
    a.mov(al, byte_ptr(rsi))?;
    a.cmp(al, 0x20)?;
    a.jbe(tok_loop)?;
    a.inc(rsi)?;
    a.jmp(tok_skip)?;

    a.set_label(&mut done)?;
    Ok(())
}

/// Clamps `var` to `PARAM_MAX`.
fn clamp_param(a: &mut CodeAssembler, off: i32) -> Result<(), Error> {
    let mut ok = a.create_label();
    a.mov(rax, PARAM_MAX)?;
    a.cmp(v(off), rax)?;
    a.jbe(ok)?;
    a.mov(v(off), rax)?;
    a.set_label(&mut ok)?;
    a.nop()?;
    Ok(())
}

/// Checks the working set, calibrates the TSC if needed, computes the period, prints the INFO
/// and READY lines and initialises the main loop's state.
fn validate_and_setup(a: &mut CodeAssembler, l: &Labels) -> Result<(), Error> {
    let mut ws_error = a.create_label();
    let mut ws_ok = a.create_label();
    let mut tsc_ok = a.create_label();
    let mut period_ok = a.create_label();
    let mut pat_done = a.create_label();
    let mut rate_num = a.create_label();
    let mut rate_done = a.create_label();

    a.mov(rax, v(var::WS_MIB))?;
    a.test(rax, rax)?;
    a.jz(ws_error)?;
    a.cmp(rax, MAX_WS_MIB as i32)?;
    a.ja(ws_error)?;
    a.mov(rbx, v(var::MBI))?;
    a.test(dword_ptr(rbx), 1)?; // flags bit 0: mem_lower/mem_upper valid
    a.jz(ws_ok)?;
    a.shl(rax, 10)?;
    a.add(rax, ((WS_BASE >> 10) as i32) - 1024)?; // KiB needed above 1 MiB
    a.mov(ecx, dword_ptr(rbx + 8))?; // mem_upper (KiB above 1 MiB)
    a.cmp(rax, rcx)?;
    a.jbe(ws_ok)?;

    a.set_label(&mut ws_error)?;
    print_str(a, l, l.s_err_ws)?;
    print_var(a, l, var::WS_MIB)?;
    print_str(a, l, l.s_err_ws2)?;
    a.jmp(l.halt)?;

    a.set_label(&mut ws_ok)?;
    a.mov(rax, v(var::WS_MIB))?;
    a.shl(rax, 8)?;
    a.mov(v(var::WS_PAGES), rax)?;

    clamp_param(a, var::HB_US)?;
    clamp_param(a, var::TSC_KHZ)?;
    clamp_param(a, var::ZERO_N)?;
    // smp= to 1 ..= MAX_CPUS; fresh= to 0 or 1.
    let (mut smp_low, mut smp_ok) = (a.create_label(), a.create_label());
    a.cmp(v(var::SMP), 1)?;
    a.jb(smp_low)?;
    a.cmp(v(var::SMP), MAX_CPUS as i32)?;
    a.jbe(smp_ok)?;
    a.mov(v(var::SMP), MAX_CPUS as i32)?;
    a.jmp(smp_ok)?;
    a.set_label(&mut smp_low)?;
    a.mov(v(var::SMP), 1)?;
    a.set_label(&mut smp_ok)?;
    a.xor(eax, eax)?;
    a.cmp(v(var::FRESH), 0)?;
    a.setne(al)?;
    a.mov(v(var::FRESH), rax)?;
    a.cmp(v(var::TSC_KHZ), 0)?;
    a.jne(tsc_ok)?;
    a.call(l.calibrate)?;
    a.set_label(&mut tsc_ok)?;
    a.mov(rax, v(var::HB_US))?;
    a.mul(v(var::TSC_KHZ))?;
    a.mov(ecx, 1000u32)?;
    a.div(rcx)?;
    a.test(rax, rax)?;
    a.jnz(period_ok)?;
    a.inc(eax)?;
    a.set_label(&mut period_ok)?;
    a.mov(v(var::PERIOD), rax)?;
    gap::setup(a)?;

    // INFO tsc_khz=<n> hb=<n> pattern=<seq|rand>
    print_str(a, l, l.s_info)?;
    print_var(a, l, var::TSC_KHZ)?;
    print_str(a, l, l.s_info_hb)?;
    print_var(a, l, var::HB_US)?;
    print_str(a, l, l.s_info_pat)?;
    a.lea(rsi, ptr(l.s_seq))?;
    a.cmp(v(var::PATTERN), 0)?;
    a.je(pat_done)?;
    a.lea(rsi, ptr(l.s_rand))?;
    a.set_label(&mut pat_done)?;
    a.call(l.puts)?;
    for (label, off) in [
        (l.s.s_info_fresh, var::FRESH),
        (l.s.s_info_zero, var::ZERO_N),
        (l.s.s_info_smp, var::SMP),
    ] {
        print_str(a, l, label)?;
        print_var(a, l, off)?;
    }
    print_str(a, l, l.s_info_cpl)?;
    kmode::current_cpl(a)?;
    a.call(l.put_dec)?;
    print_char(a, l, b'\n')?;

    // The application processors, with smp= above 1 (prints `SMP cpus=<n>`).
    let mut up_done = a.create_label();
    a.cmp(v(var::SMP), 1)?;
    a.jbe(up_done)?;
    a.call(l.s.start_aps)?;
    print_str(a, l, l.s.s_smp)?;
    print_var(a, l, var::CPUS)?;
    print_char(a, l, b'\n')?;
    a.set_label(&mut up_done)?;

    // The network driver, if `net=` was given (prints `NET up ...` or `ERROR net ...`).
    net::init_if_configured(a, l)?;

    // READY ws=<n> rate=<n|max>
    print_str(a, l, l.s_ready)?;
    print_var(a, l, var::WS_MIB)?;
    print_str(a, l, l.s_ready_rate)?;
    a.cmp(v(var::RATE_MAX), 0)?;
    a.je(rate_num)?;
    print_str(a, l, l.s_max)?;
    a.jmp(rate_done)?;
    a.set_label(&mut rate_num)?;
    print_var(a, l, var::RATE)?;
    a.set_label(&mut rate_done)?;
    print_char(a, l, b'\n')?;

    // Every CPU's part of the working set; the APs start writing.
    a.call(l.s.partition)?;
    a.mov(rax, v(var::RATE))?;
    a.mov(v(var::BUDGET), rax)?;
    rdtsc64(a)?;
    a.add(rax, v(var::PERIOD))?;
    a.mov(v(var::NEXT), rax)?;
    gap::arm(a)?;
    Ok(())
}

/// Advances NEXT by one PERIOD, or to NOW + PERIOD if that is already past (missed beats are
/// skipped, not replayed). Clobbers rax.
fn advance_next(a: &mut CodeAssembler) -> Result<(), Error> {
    let mut next_ok = a.create_label();
    a.mov(rax, v(var::NEXT))?;
    a.add(rax, v(var::PERIOD))?;
    a.cmp(rax, v(var::NOW))?;
    a.ja(next_ok)?;
    a.mov(rax, v(var::NOW))?;
    a.add(rax, v(var::PERIOD))?;
    a.set_label(&mut next_ok)?;
    a.mov(v(var::NEXT), rax)?;
    Ok(())
}

/// The main loop: heartbeat when due, else write a page while the budget lasts, else verify one.
fn main_loop(a: &mut CodeAssembler, l: &Labels) -> Result<(), Error> {
    let mut top = a.create_label();
    let mut write = a.create_label();
    let mut verify = a.create_label();
    let mut beat = a.create_label();
    let mut no_tline = a.create_label();

    a.set_label(&mut top)?;
    net::poll_rx(a, l)?;
    rdtsc64(a)?;
    gap::check(a, l)?;
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
    print_char(a, l, b'.')?;
    a.inc(v(var::HEARTBEATS))?;
    a.dec(v(var::TCOUNT))?;
    a.jnz(no_tline)?;
    a.mov(v(var::TCOUNT), HEARTBEATS_PER_TLINE as i32)?;
    print_char(a, l, b'\n')?;
    print_char(a, l, b'T')?;
    print_char(a, l, b' ')?;
    print_var(a, l, var::HEARTBEATS)?;
    for off in [var::WRITTEN, var::VERIFIED, var::CORRUPT] {
        print_char(a, l, b' ')?;
        print_sum(a, l, off)?;
    }
    print_char(a, l, b'\n')?;
    a.set_label(&mut no_tline)?;
    advance_next(a)?;
    a.mov(rax, v(var::RATE))?;
    a.mov(v(var::BUDGET), rax)?;
    // The APs' corruption reports, printed here (the BSP owns the serial port).
    a.call(l.s.drain)?;
    // Once per heartbeat: console input, and the NIC's announce request.
    a.call(l.n.console_poll)?;
    net::poll_config(a, l)?;
    a.jmp(top)?;
    Ok(())
}

/// Advances the cursor variable at `off` round this CPU's part of the working set; its old
/// value goes to `dst`.
fn advance_cursor(a: &mut CodeAssembler, off: i32, dst: AsmRegister64) -> Result<(), Error> {
    let mut ok = a.create_label();
    a.mov(rax, v(off))?;
    a.mov(dst, rax)?;
    a.inc(rax)?;
    a.cmp(rax, v(var::PART_END))?;
    a.jb(ok)?;
    a.mov(rax, v(var::PART_BASE))?;
    a.set_label(&mut ok)?;
    a.mov(v(off), rax)?;
    Ok(())
}

/// Loads `rdi` with the address of working-set page `r12`.
fn page_addr(a: &mut CodeAssembler) -> Result<(), Error> {
    a.mov(rdi, r12)?;
    a.shl(rdi, 12)?;
    a.add(rdi, WS_BASE as i32)?;
    Ok(())
}

/// The subroutines of the CPL3 program.
fn subroutines(a: &mut CodeAssembler, l: &Labels) -> Result<(), Error> {
    let mut l2 = *l;
    let l = &mut l2;

    // halt: spin forever.
    a.set_label(&mut l.halt)?;
    a.pause()?;
    a.jmp(l.halt)?;

    // putc: al = byte. Clobbers dx.
    a.set_label(&mut l.putc)?;
    a.mov(edx, COM1 as u32)?;
    a.out(dx, al)?;
    a.jmp(l.g.tick)?;
    gap::subroutine(a, l)?;

    // puts: rsi = NUL-terminated string. Clobbers rax, rdx, rsi.
    {
        let mut done = a.create_label();
        a.set_label(&mut l.puts)?;
        a.mov(al, byte_ptr(rsi))?;
        a.test(al, al)?;
        a.jz(done)?;
        a.call(l.putc)?;
        a.inc(rsi)?;
        a.jmp(l.puts)?;
        a.set_label(&mut done)?;
        a.ret()?;
    }

    // put_dec: rax = value, printed in decimal. Clobbers rax, rcx, rdx, rsi.
    {
        let mut top = a.create_label();
        a.set_label(&mut l.put_dec)?;
        a.lea(rsi, ptr(r15 + (var::NUMBUF + 31)))?;
        a.mov(byte_ptr(rsi), 0)?;
        a.mov(ecx, 10u32)?;
        a.set_label(&mut top)?;
        a.xor(edx, edx)?;
        a.div(rcx)?;
        a.add(dl, b'0' as i32)?;
        a.dec(rsi)?;
        a.mov(byte_ptr(rsi), dl)?;
        a.test(rax, rax)?;
        a.jnz(top)?;
        a.jmp(l.puts)?;
    }

    // put_hex: rax = value, printed as 16 lowercase hex digits. Clobbers rax, rcx, rdx, rdi.
    {
        let mut top = a.create_label();
        let mut digit = a.create_label();
        a.set_label(&mut l.put_hex)?;
        a.mov(rdi, rax)?;
        a.mov(ecx, 16u32)?;
        a.set_label(&mut top)?;
        a.rol(rdi, 4)?;
        a.mov(eax, edi)?;
        a.and(eax, 15)?;
        a.cmp(al, 10)?;
        a.jb(digit)?;
        a.add(al, i32::from(b'a' - 10 - b'0'))?;
        a.set_label(&mut digit)?;
        a.add(al, i32::from(b'0'))?;
        a.call(l.putc)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.ret()?;
    }

    // parse_dec: rsi = digits; returns rax = value, rsi past the digits. Clobbers rcx.
    {
        let mut top = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut l.parse_dec)?;
        a.xor(eax, eax)?;
        a.set_label(&mut top)?;
        a.movzx(ecx, byte_ptr(rsi))?;
        a.sub(ecx, i32::from(b'0'))?;
        a.cmp(ecx, 9)?;
        a.ja(done)?;
        a.lea(rax, ptr(rax + rax * 4))?;
        a.add(rax, rax)?;
        a.add(rax, rcx)?;
        a.inc(rsi)?;
        a.jmp(top)?;
        a.set_label(&mut done)?;
        a.ret()?;
    }

    // match_key: rsi = text, rdi = NUL-terminated key. If the text starts with the key, returns
    // eax = 1 and rsi past the key, else eax = 0 and rsi unchanged. Clobbers rdx, rdi.
    {
        let mut top = a.create_label();
        let mut matched = a.create_label();
        let mut nomatch = a.create_label();
        a.set_label(&mut l.match_key)?;
        a.mov(rdx, rsi)?;
        a.set_label(&mut top)?;
        a.mov(al, byte_ptr(rdi))?;
        a.test(al, al)?;
        a.jz(matched)?;
        a.cmp(al, byte_ptr(rdx))?;
        a.jne(nomatch)?;
        a.inc(rdi)?;
        a.inc(rdx)?;
        a.jmp(top)?;
        a.set_label(&mut matched)?;
        a.mov(rsi, rdx)?;
        a.mov(eax, 1u32)?;
        a.ret()?;
        a.set_label(&mut nomatch)?;
        a.xor(eax, eax)?;
        a.ret()?;
    }

    // pit_measure: esi = PIT channel 2 count. Runs PIT channel 2 in mode 0 from that count to
    // terminal count (as Linux's pit_calibrate_tsc) PIT_TRIES times; returns in rax the
    // shortest TSC delta (a host stall can only lengthen a measurement).
    // Clobbers rax, rcx, rdx, r8, r9, r10.
    {
        let mut again = a.create_label();
        let mut wait = a.create_label();
        let mut done = a.create_label();
        let mut not_min = a.create_label();
        a.set_label(&mut l.pit_measure)?;
        a.mov(r9d, PIT_TRIES)?;
        a.mov(r10, u64::MAX)?;
        a.in_(al, 0x61)?;
        a.and(al, 0xfc)?; // speaker data off, gate off ...
        a.or(al, 1)?; // ... gate on
        a.out(0x61, al)?;
        a.set_label(&mut again)?;
        a.mov(al, 0xb0)?; // channel 2, lobyte/hibyte, mode 0, binary
        a.out(0x43, al)?;
        a.mov(eax, esi)?;
        a.out(0x42, al)?;
        a.mov(al, ah)?;
        a.out(0x42, al)?; // counting starts here
        rdtsc64(a)?;
        a.mov(r8, rax)?;
        a.set_label(&mut wait)?;
        a.in_(al, 0x61)?;
        a.test(al, 0x20)?; // channel 2 output: high at terminal count
        a.jnz(done)?;
        rdtsc64(a)?;
        a.sub(rax, r8)?;
        a.mov(rcx, PIT_TIMEOUT_TICKS)?;
        a.cmp(rax, rcx)?;
        a.jb(wait)?;
        print_str(a, l, l.s_err_pit)?;
        a.jmp(l.halt)?;
        a.set_label(&mut done)?;
        rdtsc64(a)?;
        a.sub(rax, r8)?;
        a.cmp(rax, r10)?;
        a.jae(not_min)?;
        a.mov(r10, rax)?;
        a.set_label(&mut not_min)?;
        a.dec(r9d)?;
        a.jnz(again)?;
        a.mov(rax, r10)?;
        a.ret()?;
    }

    // calibrate: TSC kHz from the difference of a long and a short PIT measurement, which
    // cancels the fixed latency of starting the count and of seeing it end. Stores TSC_KHZ.
    // Clobbers rax, rcx, rdx, rsi, r8 - r11.
    {
        a.set_label(&mut l.calibrate)?;
        a.mov(esi, PIT_LATCH_SHORT as u32)?;
        a.call(l.pit_measure)?;
        a.mov(r11, rax)?;
        a.mov(esi, PIT_LATCH_LONG as u32)?;
        a.call(l.pit_measure)?;
        a.sub(rax, r11)?;
        a.mov(ecx, PIT_HZ as u32)?;
        a.mul(rcx)?;
        a.mov(ecx, ((PIT_LATCH_LONG - PIT_LATCH_SHORT) * 1000) as u32)?;
        a.div(rcx)?;
        a.mov(v(var::TSC_KHZ), rax)?;
        a.ret()?;
    }

    // fill_page: r12 = page, r13 = generation (non-zero, zero-extended): writes all 512
    // qwords. Clobbers rax, rcx, rdx, rdi, r8, r9.
    {
        let mut top = a.create_label();
        a.set_label(&mut l.fill_page)?;
        page_addr(a)?;
        a.mov(rax, r12)?;
        a.shl(rax, 32)?;
        a.or(rax, r13)?;
        a.xor(edx, edx)?;
        a.mov(r8, INDEX_MUL)?;
        a.mov(ecx, 256u32)?;
        a.set_label(&mut top)?;
        a.mov(r9, rdx)?;
        a.xor(r9, rax)?;
        a.mov(qword_ptr(rdi), r9)?;
        a.add(rdx, r8)?;
        a.mov(r9, rdx)?;
        a.xor(r9, rax)?;
        a.mov(qword_ptr(rdi + 8), r9)?;
        a.add(rdx, r8)?;
        a.add(rdi, 16)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.ret()?;
    }

    // zero_gen: r13d = generation; returns eax = 1 if its contents are all zero (generation 0,
    // or a multiple of ZERO_N when that is set), else 0. Clobbers rcx, rdx.
    {
        let (mut yes, mut no) = (a.create_label(), a.create_label());
        a.set_label(&mut l.zero_gen)?;
        a.test(r13d, r13d)?;
        a.jz(yes)?;
        a.mov(rcx, v(var::ZERO_N))?;
        a.test(rcx, rcx)?;
        a.jz(no)?;
        a.mov(eax, r13d)?;
        a.xor(edx, edx)?;
        a.div(rcx)?;
        a.test(rdx, rdx)?;
        a.jz(yes)?;
        a.set_label(&mut no)?;
        a.xor(eax, eax)?;
        a.ret()?;
        a.set_label(&mut yes)?;
        a.mov(eax, 1u32)?;
        a.ret()?;
    }

    // fill_gen: r12 = page, r13 = generation: writes the page's contents for that generation
    // (all zero, or the pattern). Clobbers rax, rcx, rdx, rdi, r8, r9.
    {
        let mut pattern = a.create_label();
        a.set_label(&mut l.fill_gen)?;
        a.call(l.zero_gen)?;
        a.test(eax, eax)?;
        a.jz(pattern)?;
        page_addr(a)?;
        a.xor(eax, eax)?;
        a.mov(ecx, 512u32)?;
        a.rep().stosq()?;
        a.ret()?;
        a.set_label(&mut pattern)?;
        a.jmp(l.fill_page)?;
    }

    // report_corrupt: prints `CORRUPT page=<r12> got=<r10> want=<r11>`. Clobbers rax, rcx,
    // rdx, rsi, rdi.
    {
        a.set_label(&mut l.report_corrupt)?;
        print_str(a, l, l.s_corrupt)?;
        a.mov(rax, r12)?;
        a.call(l.put_dec)?;
        print_str(a, l, l.s_got)?;
        a.mov(rax, r10)?;
        a.call(l.put_hex)?;
        print_str(a, l, l.s_want)?;
        a.mov(rax, r11)?;
        a.call(l.put_hex)?;
        print_char(a, l, b'\n')?;
        a.ret()?;
    }

    // write_page: picks a page of this CPU's part, bumps its generation, fills it. Clobbers
    // rax, rcx, rdx, rdi, r8, r9, r12, r13.
    {
        let mut rand = a.create_label();
        let mut have = a.create_label();
        let mut gen_ok = a.create_label();
        a.set_label(&mut l.write_page)?;
        a.cmp(v(var::PATTERN), 0)?;
        a.jne(rand)?;
        advance_cursor(a, var::WCURSOR, r12)?;
        a.jmp(have)?;
        a.set_label(&mut rand)?;
        a.mov(rax, v(var::PRNG))?;
        for (shift, left) in [(13, true), (7, false), (17, true)] {
            a.mov(rdx, rax)?;
            if left {
                a.shl(rdx, shift)?;
            } else {
                a.shr(rdx, shift)?;
            }
            a.xor(rax, rdx)?;
        }
        a.mov(v(var::PRNG), rax)?;
        a.xor(edx, edx)?;
        a.div(v(var::PART_COUNT))?;
        a.add(rdx, v(var::PART_BASE))?;
        a.mov(r12, rdx)?;
        a.set_label(&mut have)?;
        a.mov(rcx, GEN_TABLE)?;
        a.mov(eax, dword_ptr(r12 * 4 + rcx))?;
        a.inc(eax)?;
        a.jnz(gen_ok)?;
        a.inc(eax)?; // skip generation 0 (never written) on wrap-around
        a.set_label(&mut gen_ok)?;
        a.mov(dword_ptr(r12 * 4 + rcx), eax)?;
        a.mov(r13d, eax)?;
        a.call(l.fill_gen)?;
        a.inc(v(var::WRITTEN))?;
        // laps=: once this CPU wrote LAPS × its part's page count, it writes no more (rate 0:
        // it only verifies from now on).
        let mut go_on = a.create_label();
        a.mov(rax, v(var::LAPS))?;
        a.test(rax, rax)?;
        a.jz(go_on)?;
        a.imul_2(rax, v(var::PART_COUNT))?;
        a.cmp(v(var::WRITTEN), rax)?;
        a.jb(go_on)?;
        a.mov(v(var::RATE), 0)?;
        a.mov(v(var::RATE_MAX), 0)?;
        a.mov(v(var::BUDGET), 0)?;
        a.set_label(&mut go_on)?;
        a.ret()?;
    }

    // verify_page: checks the next page of this CPU's part round-robin (with FRESH, a page
    // never written is skipped without being read); reports the first mismatch (the BSP
    // prints it, an AP queues it for the BSP) and repairs the page.
    // Clobbers rax, rcx, rdx, rsi, rdi, r8 - r14.
    {
        let mut zero = a.create_label();
        let mut pat_loop = a.create_label();
        let mut zero_loop = a.create_label();
        let mut done = a.create_label();
        let mut skip = a.create_label();
        let mut bad_pat = a.create_label();
        let mut bad_zero = a.create_label();
        let mut report = a.create_label();
        let mut queue = a.create_label();
        let mut repair = a.create_label();
        let mut read = a.create_label();
        a.set_label(&mut l.verify_page)?;
        advance_cursor(a, var::VCURSOR, r12)?;
        a.mov(rcx, GEN_TABLE)?;
        a.mov(r13d, dword_ptr(r12 * 4 + rcx))?;
        a.test(r13d, r13d)?;
        a.jnz(read)?;
        a.cmp(v(var::FRESH), 0)?;
        a.jne(skip)?;
        a.set_label(&mut read)?;
        a.call(l.zero_gen)?;
        page_addr(a)?;
        a.mov(r14, rdi)?;
        a.test(eax, eax)?;
        a.jnz(zero)?;
        a.mov(rax, r12)?;
        a.shl(rax, 32)?;
        a.or(rax, r13)?;
        a.xor(edx, edx)?;
        a.mov(r8, INDEX_MUL)?;
        a.mov(ecx, 512u32)?;
        a.set_label(&mut pat_loop)?;
        a.mov(r9, rdx)?;
        a.xor(r9, rax)?;
        a.cmp(qword_ptr(rdi), r9)?;
        a.jne(bad_pat)?;
        a.add(rdx, r8)?;
        a.add(rdi, 8)?;
        a.dec(ecx)?;
        a.jnz(pat_loop)?;
        a.jmp(done)?;

        a.set_label(&mut zero)?;
        a.mov(ecx, 512u32)?;
        a.set_label(&mut zero_loop)?;
        a.cmp(qword_ptr(rdi), 0)?;
        a.jne(bad_zero)?;
        a.add(rdi, 8)?;
        a.dec(ecx)?;
        a.jnz(zero_loop)?;

        a.set_label(&mut done)?;
        a.inc(v(var::VERIFIED))?;
        a.set_label(&mut skip)?;
        a.ret()?;

        a.set_label(&mut bad_pat)?;
        a.mov(r10, qword_ptr(rdi))?;
        a.mov(r11, r9)?;
        a.jmp(report)?;
        a.set_label(&mut bad_zero)?;
        a.mov(r10, qword_ptr(rdi))?;
        a.xor(r11d, r11d)?;
        a.set_label(&mut report)?;
        a.cmp(v(var::CPU_ID), 0)?;
        a.jne(queue)?;
        a.call(l.report_corrupt)?;
        a.jmp(repair)?;
        a.set_label(&mut queue)?;
        a.call(l.s.report_ap)?;
        a.set_label(&mut repair)?;
        a.inc(v(var::CORRUPT))?;
        // Repair, so that the same damage is reported once.
        a.call(l.fill_gen)?;
        a.jmp(done)?;
    }
    smp::subroutines(a, l)?;
    net::subroutines(a, l)?;
    Ok(())
}

/// The CPL3 program's strings. Returns the label of the first one.
fn strings(a: &mut CodeAssembler, mut l: Labels) -> Result<CodeLabel, Error> {
    string(a, &mut l.k_ws, b"ws=")?;
    string(a, &mut l.k_rate, b"rate=")?;
    string(a, &mut l.k_hb, b"hb=")?;
    string(a, &mut l.k_pattern, b"pattern=")?;
    string(a, &mut l.k_tsc, b"tsc_khz=")?;
    string(a, &mut l.s_max, b"max")?;
    string(a, &mut l.s_seq, b"seq")?;
    string(a, &mut l.s_rand, b"rand")?;
    string(a, &mut l.s_err_ws, b"ERROR ws=")?;
    string(a, &mut l.s_err_ws2, b" does not fit\n")?;
    string(a, &mut l.s_err_pit, b"ERROR PIT calibration failed\n")?;
    string(a, &mut l.s_info, b"INFO tsc_khz=")?;
    string(a, &mut l.s_info_hb, b" hb=")?;
    string(a, &mut l.s_info_pat, b" pattern=")?;
    string(a, &mut l.s_info_cpl, b" cpl=")?;
    string(a, &mut l.s_ready, b"READY ws=")?;
    string(a, &mut l.s_ready_rate, b" rate=")?;
    string(a, &mut l.s_corrupt, b"\nCORRUPT page=")?;
    string(a, &mut l.s_got, b" got=")?;
    string(a, &mut l.s_want, b" want=")?;
    net::strings(a, &mut l.n)?;
    smp::strings(a, &mut l.s)?;
    gap::strings(a, &mut l.g)?;
    Ok(l.k_ws)
}

/// Copies `bytes` into the segment image `seg` (which starts at `LOAD_ADDR`) at `addr`,
/// checking that it stays below `limit`.
fn place(
    seg: &mut [u8],
    what: &'static str,
    addr: u64,
    limit: u64,
    bytes: &[u8],
) -> Result<(), Error> {
    let room = (limit - addr) as usize;
    if bytes.len() > room {
        return Err(Error::Layout {
            what,
            size: bytes.len(),
            room,
        });
    }
    let off = (addr - LOAD_ADDR) as usize;
    seg[off..off + bytes.len()].copy_from_slice(bytes);
    Ok(())
}

/// Builds the whole ELF image.
pub(crate) fn build_image() -> Result<Vec<u8>, Error> {
    let mut seg = vec![0u8; (BSS_START - LOAD_ADDR) as usize];
    place(
        &mut seg,
        "Multiboot header",
        LOAD_ADDR,
        ENTRY,
        &multiboot_header(),
    )?;
    place(&mut seg, "32-bit boot code", ENTRY, GDT_ADDR, &boot32()?)?;
    let gdt: Vec<u8> = gdt().iter().flat_map(|d| d.to_le_bytes()).collect();
    place(&mut seg, "GDT", GDT_ADDR, GDTR_ADDR, &gdt)?;
    let mut gdtr = Vec::with_capacity(6);
    gdtr.extend_from_slice(&((gdt.len() - 1) as u16).to_le_bytes());
    gdtr.extend_from_slice(&(GDT_ADDR as u32).to_le_bytes());
    place(&mut seg, "GDTR", GDTR_ADDR, CODE64_ADDR, &gdtr)?;
    let code = code64()?;
    let ap_entry = CODE64_ADDR + code.ap_entry as u64;
    place(
        &mut seg,
        "AP trampoline",
        TRAMPOLINE_IMAGE,
        CODE64_ADDR,
        &smp::trampoline(ap_entry)?,
    )?;
    place(&mut seg, "64-bit code", CODE64_ADDR, TSS_ADDR, &code.bytes)?;
    place(&mut seg, "TSS", TSS_ADDR, PML4_ADDR, &tss())?;
    place(
        &mut seg,
        "page tables",
        PML4_ADDR,
        BSS_START,
        &page_tables(),
    )?;
    Ok(elf::build(
        LOAD_ADDR as u32,
        &seg,
        (IMAGE_END - LOAD_ADDR) as u32,
        ENTRY as u32,
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind};

    use super::*;

    /// Decodes all of `bytes`, asserting that every instruction is valid and that the last one
    /// ends exactly at the end.
    fn decode_all(bitness: u32, ip: u64, bytes: &[u8]) -> Vec<Instruction> {
        let mut d = Decoder::with_ip(bitness, bytes, ip, DecoderOptions::NONE);
        let mut v = Vec::new();
        while d.can_decode() {
            let i = d.decode();
            assert!(!i.is_invalid(), "invalid instruction at {:#x}", i.ip());
            v.push(i);
        }
        assert_eq!(v.last().map(|i| i.next_ip()), Some(ip + bytes.len() as u64));
        v
    }

    fn uses_control_register(i: &Instruction) -> bool {
        (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Register && i.op_register(n).is_cr())
    }

    #[test]
    fn boot32_decodes_and_is_minimal() {
        let code = boot32().expect("boot32");
        let ins = decode_all(32, ENTRY, &code);
        let m: Vec<Mnemonic> = ins.iter().map(Instruction::mnemonic).collect();
        use Mnemonic::*;
        assert_eq!(
            m,
            [Cmp, Jne, Lgdt, Mov, Mov, Mov, Mov, Mov, Mov, Xor, Wrmsr, Mov, Mov, Jmp, Pause, Jmp]
        );
        assert_eq!(ins[0].immediate32(), MB_BOOT_EAX);
        assert_eq!(ins[1].near_branch_target(), ins[14].ip());
        assert_eq!(ins[2].memory_displacement32(), GDTR_ADDR as u32);
        assert_eq!(ins[3].immediate32(), CR4_VALUE);
        assert_eq!(ins[4].op0_register(), iced_x86::Register::CR4);
        assert_eq!(ins[5].immediate32(), PML4_ADDR as u32);
        assert_eq!(ins[6].op0_register(), iced_x86::Register::CR3);
        assert_eq!(ins[7].immediate32(), EFER_MSR);
        assert_eq!(ins[8].immediate32(), EFER_VALUE);
        assert_eq!(ins[11].immediate32(), CR0_VALUE);
        assert_eq!(ins[12].op0_register(), iced_x86::Register::CR0);
        assert_eq!(ins[13].code(), Code::Jmp_ptr1632);
        assert_eq!(ins[13].far_branch_selector(), SEL_KCODE);
        assert_eq!(u64::from(ins[13].far_branch32()), CODE64_ADDR);
        assert_eq!(ins[15].near_branch_target(), ins[14].ip());
        assert!(ENTRY + code.len() as u64 <= GDT_ADDR);
    }

    #[test]
    fn code64_decodes_and_cpl3_part_is_unprivileged() {
        let c = code64().expect("code64");
        assert!(c.user_entry < c.data_start && c.data_start < c.bytes.len());
        let ins = decode_all(64, CODE64_ADDR, &c.bytes[..c.data_start]);
        let user = CODE64_ADDR + c.user_entry as u64;
        let data = CODE64_ADDR + c.data_start as u64;
        let end = CODE64_ADDR + c.bytes.len() as u64;

        let ap_entry = CODE64_ADDR + c.ap_entry as u64;
        let ap_user = CODE64_ADDR + c.ap_user as u64;
        assert!(ap_entry < user && user < ap_user && ap_user < data);

        // The BSP's CPL0 part: short (the `cpl0=1` scan, then the jump to the program at
        // CPL0 or the iretq to CPL3).
        let cpl0: Vec<&Instruction> = ins.iter().filter(|i| i.ip() < ap_entry).collect();
        assert!(cpl0.len() <= 40, "{} CPL0 instructions", cpl0.len());
        assert_eq!(cpl0.last().map(|i| i.code()), Some(Code::Iretq));
        assert!(cpl0.iter().any(|i| i.mnemonic() == Mnemonic::Ltr));
        assert!(ins.iter().any(|i| i.ip() == user));
        // The APs' CPL0 entry: short too; a locked TSS load, a locked slot, an iretq to CPL3,
        // and the halt loop for APs beyond smp - 1.
        let ap0: Vec<&Instruction> = ins
            .iter()
            .filter(|i| (ap_entry..user).contains(&i.ip()))
            .collect();
        assert!(ap0.len() <= 34, "{} AP CPL0 instructions", ap0.len());
        let m: Vec<Mnemonic> = ap0.iter().map(|i| i.mnemonic()).collect();
        for want in [Mnemonic::Ltr, Mnemonic::Iretq, Mnemonic::Hlt] {
            assert!(m.contains(&want), "{want:?} in {m:?}");
        }
        assert!(ap0
            .iter()
            .any(|i| i.mnemonic() == Mnemonic::Bts && i.has_lock_prefix()));
        assert!(ap0
            .iter()
            .any(|i| i.mnemonic() == Mnemonic::Xadd && i.has_lock_prefix()));
        assert!(ins.iter().any(|i| i.ip() == ap_user));

        // Branches land on instruction boundaries of the code; RIP-relative operands point at
        // the string data (or, for the lea of the user entry, at the CPL3 code).
        let starts: HashSet<u64> = ins.iter().map(Instruction::ip).collect();
        let branches = ins
            .iter()
            .filter(|i| i.op0_kind() == OpKind::NearBranch64)
            .count();
        assert!(branches > 50, "{branches} branches");
        for i in &ins {
            if i.op0_kind() == OpKind::NearBranch64 {
                assert!(
                    starts.contains(&i.near_branch_target()),
                    "branch at {:#x} to {:#x}",
                    i.ip(),
                    i.near_branch_target()
                );
            }
            if i.is_ip_rel_memory_operand() {
                let t = i.ip_rel_memory_address();
                assert!(
                    (data..end).contains(&t) || t == user || t == ap_user,
                    "rip-relative operand at {:#x} -> {t:#x}",
                    i.ip()
                );
            }
        }

        // Nothing after the iretq may need CPL0.
        for i in ins.iter().filter(|i| i.ip() >= user) {
            use Mnemonic::*;
            assert!(
                !matches!(
                    i.mnemonic(),
                    Lgdt | Lidt
                        | Ltr
                        | Lldt
                        | Wrmsr
                        | Rdmsr
                        | Hlt
                        | Cli
                        | Sti
                        | Iretq
                        | Invlpg
                        | Swapgs
                        | Sysretq
                        | Syscall
                        | Int
                        | Int3
                ) && !uses_control_register(i),
                "privileged instruction at CPL3: {:#x} {:?}",
                i.ip(),
                i.mnemonic()
            );
        }
        let count = |m: Mnemonic| ins.iter().filter(|i| i.mnemonic() == m).count();
        assert!(count(Mnemonic::Out) >= 5, "serial and PIT output");
        assert!(count(Mnemonic::In) >= 4, "PIT and COM1 input");
        assert!(count(Mnemonic::Rdtsc) >= 3);
        assert!(ins
            .iter()
            .all(|i| i.ip() >= user || i.mnemonic() != Mnemonic::Out));

        // The protocol strings are in the data part.
        let strings = &c.bytes[c.data_start..];
        for s in [
            &b"READY ws=\0"[..],
            b" rate=\0",
            b"\nCORRUPT page=\0",
            b" got=\0",
            b" want=\0",
            b"ERROR ws=\0",
            b" does not fit\n\0",
            b"INFO tsc_khz=\0",
            b"tsc_khz=\0",
            b"pattern=\0",
            b"net=\0",
            b"mmio:\0",
            b",ip=\0",
            b"status\0",
            b"\nSTATUS hb=\0",
            b" rx=\0",
            b" tx=\0",
            b"NET up mac=\0",
            b"\nNET announce\n\0",
        ] {
            assert!(strings.windows(s.len()).any(|w| w == s), "{s:?}");
        }
        assert!(CODE64_ADDR + c.bytes.len() as u64 <= TSS_ADDR);
    }

    /// Every 32-bit access the network driver makes to the virtio-mmio window goes through a
    /// register that holds the window address loaded from NET_BASE; the protocol needs 32-bit
    /// accesses to registers and allows 8/16-bit ones to config space (offset 0x100 and up).
    #[test]
    fn virtio_register_accesses_have_the_right_width() {
        use iced_x86::{MemorySize, Register};
        let c = code64().expect("code64");
        let ins = decode_all(64, CODE64_ADDR, &c.bytes[..c.data_start]);
        let mut regs = 0;
        let mut config = 0;
        for i in &ins {
            // Register accesses are `[rbx + reg]` (net_init, net_config) or `[rax + 0x50]`
            // (notifies) with a displacement below 0x200, never RIP-relative or indexed.
            let mem = (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory);
            if !mem || i.memory_index() != Register::None || i.is_ip_rel_memory_operand() {
                continue;
            }
            let d = i.memory_displacement64();
            let window = (i.memory_base() == Register::RBX && d < 0x200 && d != 0)
                || (i.memory_base() == Register::RAX && d == 0x50);
            if !window || i.mnemonic() == Mnemonic::Lea {
                continue;
            }
            if d >= 0x100 {
                config += 1;
                assert!(
                    matches!(i.memory_size(), MemorySize::UInt8 | MemorySize::UInt16),
                    "config access at {:#x}: {:?}",
                    i.ip(),
                    i.memory_size()
                );
            } else {
                regs += 1;
                assert!(
                    matches!(i.memory_size(), MemorySize::UInt32 | MemorySize::Int32),
                    "register access at {:#x} ({:?}, offset {d:#x}): {:?}",
                    i.ip(),
                    i.mnemonic(),
                    i.memory_size()
                );
            }
        }
        assert!(regs > 30, "{regs} register accesses");
        assert_eq!(config, 7, "6 MAC bytes and the status word");
    }

    /// The AP trampoline: real-mode code that goes straight to long mode and far-jumps, through
    /// its own pointer, to the APs' CPL0 entry; its data (GDTR copy, far pointer) in place.
    #[test]
    fn ap_trampoline_decodes_and_points_at_the_ap_entry() {
        use crate::{AP_TRAMPOLINE, TRAMPOLINE_SIZE};
        let c = code64().expect("code64");
        let entry = CODE64_ADDR + c.ap_entry as u64;
        let t = smp::trampoline(entry).expect("trampoline");
        assert_eq!(t.len() as u64, TRAMPOLINE_SIZE);
        let code_len = t[..smp::TR_GDTR]
            .iter()
            .rposition(|&b| b != 0)
            .expect("code")
            + 1;
        let ins = decode_all(16, AP_TRAMPOLINE, &t[..code_len]);
        use Mnemonic::*;
        let m: Vec<Mnemonic> = ins.iter().map(Instruction::mnemonic).collect();
        assert_eq!(
            m,
            [Cli, Lgdt, Mov, Mov, Mov, Mov, Mov, Mov, Xor, Wrmsr, Mov, Mov, Jmp]
        );
        assert_eq!(
            u64::from(ins[1].memory_displacement32()),
            AP_TRAMPOLINE + smp::TR_GDTR as u64
        );
        assert_eq!(ins[2].immediate32(), CR4_VALUE);
        assert_eq!(ins[4].immediate32(), PML4_ADDR as u32);
        assert_eq!(ins[7].immediate32(), EFER_VALUE);
        assert_eq!(ins[10].immediate32(), CR0_VALUE);
        assert_eq!(
            ins[12].code(),
            Code::Jmp_m1632,
            "far jump through a 16:32 pointer"
        );
        assert_eq!(
            u64::from(ins[12].memory_displacement32()),
            AP_TRAMPOLINE + smp::TR_FARPTR as u64
        );
        let g = smp::TR_GDTR;
        assert_eq!(u16::from_le_bytes([t[g], t[g + 1]]), 63);
        assert_eq!(
            u64::from(u32::from_le_bytes(t[g + 2..g + 6].try_into().expect("4"))),
            GDT_ADDR
        );
        let f = smp::TR_FARPTR;
        assert_eq!(
            u64::from(u32::from_le_bytes(t[f..f + 4].try_into().expect("4"))),
            entry
        );
        assert_eq!(u16::from_le_bytes([t[f + 4], t[f + 5]]), SEL_KCODE);
        // The start-up IPI's vector points at the trampoline; the IPIs use the shorthand.
        assert_eq!(u64::from(smp::SIPI_VECTOR) << 12, AP_TRAMPOLINE);
        assert_eq!(smp::ICR_INIT & 0xC_0700, 0xC_0500);
        assert_eq!(smp::ICR_STARTUP & 0xC_0700, 0xC_0600);
        // The image carries the trampoline where the BSP copies it from.
        let img = crate::image().expect("image");
        let off = 0x1000 + (crate::TRAMPOLINE_IMAGE - LOAD_ADDR) as usize;
        assert_eq!(&img[off..off + t.len()], &t[..]);
    }

    #[test]
    fn multiboot_header_checksum() {
        let h = multiboot_header();
        let w = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        assert_eq!(w(0), 0x1BAD_B002);
        assert_eq!(w(4), 0x3);
        assert_eq!(w(0).wrapping_add(w(4)).wrapping_add(w(8)), 0);
    }

    #[test]
    fn gdt_entries() {
        let g = gdt();
        assert_eq!(g[0], 0);
        assert_eq!(g[(SEL_KCODE >> 3) as usize], 0x00af_9a00_0000_ffff);
        assert_eq!(g[(SEL_KDATA >> 3) as usize], 0x00cf_9200_0000_ffff);
        assert_eq!(g[(SEL_UDATA >> 3) as usize], 0x00cf_f200_0000_ffff);
        assert_eq!(g[(SEL_UCODE >> 3) as usize], 0x00af_fa00_0000_ffff);
        let t = (SEL_TSS >> 3) as usize;
        let (lo, hi) = (g[t], g[t + 1]);
        let base = ((lo >> 16) & 0xff_ffff) | (((lo >> 56) & 0xff) << 24) | (hi << 32);
        let limit = (lo & 0xffff) | (((lo >> 48) & 0xf) << 16);
        assert_eq!(base, TSS_ADDR);
        assert_eq!(limit, 0x68 + 8192);
        assert_eq!(
            (lo >> 40) & 0xff,
            0x89,
            "present, DPL 0, available 64-bit TSS"
        );
        assert_eq!((lo >> 52) & 0xf, 0, "byte granularity");
    }

    #[test]
    fn tss_layout() {
        let t = tss();
        assert_eq!(t.len(), 0x68 + 8192 + 1);
        assert_eq!(
            u64::from_le_bytes(t[4..12].try_into().expect("8")),
            KSTACK_TOP
        );
        assert_eq!(u16::from_le_bytes([t[0x66], t[0x67]]), 0x68);
        assert!(t[0x68..0x68 + 8192].iter().all(|&b| b == 0));
        assert_eq!(t[0x68 + 8192], 0xff);
    }

    #[test]
    fn page_tables_identity_map() {
        let t = page_tables();
        let e = |addr: u64| {
            let o = (addr - PML4_ADDR) as usize;
            u64::from_le_bytes(t[o..o + 8].try_into().expect("8"))
        };
        assert_eq!(e(PML4_ADDR), PDPT_ADDR | 7);
        assert_eq!(e(PML4_ADDR + 8), 0);
        for gib in 0..PD_COUNT {
            assert_eq!(e(PDPT_ADDR + gib * 8), (PD_ADDR + gib * 0x1000) | 7);
        }
        assert_eq!(e(PDPT_ADDR + PD_COUNT * 8), 0);
        // Translate a few addresses through the tables.
        for addr in [
            0u64,
            0x10_0000,
            WS_BASE + 12345 * 4096,
            (3 << 30) + 0x20_0000,
            (PD_COUNT << 30) - 1,
        ] {
            let pdpte = e(PDPT_ADDR + ((addr >> 30) & 511) * 8);
            let pde = e((pdpte & !0xfff) + ((addr >> 21) & 511) * 8);
            assert_eq!(pde & 0x87, 0x87, "2 MiB page, U/S, R/W, P");
            assert_eq!((pde & !0x1f_ffff & !(1 << 63)) | (addr & 0x1f_ffff), addr);
        }
    }
}
