//! A self-verifying Multiboot v1 test guest for live-migration tests.
//!
//! [`image()`] generates (with iced-x86's `CodeAssembler`, no prebuilt blobs) a small ELF32
//! (`EM_386`) Multiboot v1 kernel. Booted by QEMU's `-kernel` or by any VMM that implements the
//! Multiboot v1 ELF boot protocol, it switches to 64-bit long mode, drops to CPL3 and then keeps
//! rewriting and re-verifying a working set of memory pages while printing a heartbeat on COM1.
//! Every page carries a deterministic pattern derived from its page number and a per-page
//! generation counter ([`expected_qword`]), so the guest itself notices when a migration lost or
//! corrupted a page, and a host-side tool notices a stalled guest from the heartbeat gaps
//! ([`OutputParser`], [`HeartbeatStats`]).
//!
//! # Boot
//!
//! The image has one `PT_LOAD` segment at physical 1 MiB (`p_paddr == p_vaddr`, file-backed up to
//! [`BSS_START`], zero-filled (`p_memsz > p_filesz`) up to [`IMAGE_END`]). The Multiboot header
//! (magic `0x1BADB002`, flags `0x3` = page-align | memory info, no a.out kludge) is the first 12
//! bytes of the segment, at file offset 0x1000. The entry point ([`ENTRY`]) expects the Multiboot
//! hand-off state (32-bit protected mode, paging off, `EAX = 0x2BADB002`, `EBX` = physical address
//! of the Multiboot info structure); with any other `EAX` it spins forever.
//!
//! The code that runs in 32-bit mode or at CPL0 (which PVM emulates instruction by instruction) is
//! about 25 instructions: the GDT, the 64-bit TSS (with an all-zero I/O permission bitmap so CPL3
//! may use `in`/`out`) and the page tables are prebuilt data in the image. The boot code loads the
//! GDT, sets `CR4 = 0x620`, `CR3`, `EFER = 0x501`, `CR0 = 0x80010033`, far-jumps to 64-bit code,
//! loads the data selectors and the task register (`0x30`) and `iretq`s to CPL3 (`CS = 0x23`,
//! `SS = 0x1B`, `RFLAGS = 0x3002`, interrupts stay off). Everything else runs at CPL3, natively under
//! PVM. Without `smp=` (or with `smp=1`) application processors are never started (no INIT/SIPI
//! is sent), so a VM may have any number of vCPUs; with `smp=<n>` see "Several CPUs" below.
//!
//! # Memory map (guest-physical, identity-mapped with 2 MiB pages, U/S|R/W|P at every level)
//!
//! | range | contents |
//! |---|---|
//! | `0x8000 .. 0x8080` | only with `smp=` above 1: the AP start-up code ([`AP_TRAMPOLINE`]), copied here by the boot processor before it starts the APs |
//! | `0x100000` | Multiboot header (12 bytes), then the 32-bit entry code at [`ENTRY`] (`0x100010`) |
//! | `0x100100` | GDT (8 entries: null, `0x08` kernel code64, `0x10` kernel data, `0x18` user data, `0x20` user code64, `0x28` unused, `0x30` 64-bit TSS, 16 bytes), `0x100140` GDTR |
//! | `0x100200 .. 0x100280` | the AP start-up code as stored in the image ([`TRAMPOLINE_IMAGE`]) |
//! | `0x101000 .. 0x108000` | 64-bit code ([`CODE64_ADDR`]): the CPL0 trampoline, the CPL3 program, its strings |
//! | `0x108000 .. 0x10a069` | 64-bit TSS ([`TSS_ADDR`]): `rsp0` = [`KSTACK_TOP`], iomap base `0x68`, 8192 zero bytes, `0xFF`; limit `0x2068` |
//! | `0x10b000` | PML4 ([`PML4_ADDR`]); `0x10c000` PDPT; `0x10d000 .. 0x115000` 8 page directories: identity map of `0 .. 8 GiB` |
//! | `0x115000 .. 0x116000` | CPL0 stack (zero-filled, top [`KSTACK_TOP`]) |
//! | `0x116000 .. 0x11e000` | CPL3 stack (zero-filled, top [`USTACK_TOP`]) |
//! | `0x11e000 .. 0x11f000` | CPL3 variables ([`VARS_ADDR`]) |
//! | `0x11f000 .. 0x13d000` | 15 AP blocks of 8 KiB ([`CPU_BLOCKS`]): AP `k`'s variables, its corruption report ring at `+0x400`, its stack (top at the block's end); [`IMAGE_END`] = `0x13d000` |
//! | `0x200000 .. 0x240000` | only with `net=`: the virtio-net driver's queues and buffers ([`NET_MEM`] .. [`NET_MEM_END`], see below) |
//! | `0x800000 .. 0xc00000` | generation table ([`GEN_TABLE`]): one `u32` per working-set page |
//! | `0x1000000 ..` | working set ([`WS_BASE`]): page `n` at `WS_BASE + n * 4096`, `ws` MiB |
//!
//! The VMM must place the Multiboot info structure and the command line below [`GEN_TABLE`]
//! (QEMU puts them right after the image), and must hand over RAM that reads as zero from
//! [`GEN_TABLE`] upwards (any VMM using anonymous memory does): the guest does not clear the
//! generation table or the working set, a page whose generation is 0 must read as all zero.
//!
//! # Command line (Multiboot `cmdline`, space-separated `key=value`, unknown tokens ignored)
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `ws=<MiB>` | working-set size in MiB (1 ..= 4096, must fit: `16 MiB + ws <= mem_upper + 1 MiB`) | 16 |
//! | `rate=<n>` | pages written per heartbeat period; `0` = idle (only verify); `rate=max` = write continuously | 0 |
//! | `hb=<µs>` | heartbeat period in microseconds | 1000 |
//! | `pattern=seq\|rand` | page choice for writes: a cursor going round the working set (each CPU's part, with `smp=`), or xorshift64 modulo the page count | seq |
//! | `tsc_khz=<n>` | TSC frequency in kHz; absent or 0: calibrated with PIT channel 2 (see below) | (calibrate) |
//! | `fresh=0\|1` | `1`: the verifier never reads a page whose generation is 0 (never written), so the first write to each page is its first touch, as a page a real guest clears for the first time (any non-zero value counts as 1) | 0 |
//! | `zero=<n>` | every `n`-th write of a page (generations `n`, `2n`, ...) writes it all zero, and the verifier expects all zero for those generations ([`generation_is_zero`]); `0` = never | 0 |
//! | `laps=<n>` | each CPU stops writing once it has written `n` times as many pages as its part of the working set holds (with `pattern=seq`, `n` full laps: every page written `n` times); from then on it only verifies, as a guest that allocated its memory and now idles; `0` = never stop | 0 |
//! | `cpl0=1` | the program runs at CPL0 (kernel mode) instead of CPL3, on every CPU (see "Kernel mode") | CPL3 |
//! | `smp=<n>` | number of CPUs that write and verify: the boot processor and `n - 1` application processors (clamped to 1 ..= [`MAX_CPUS`]), each on its own part of the working set ([`cpu_pages`]) | 1 |
//! | `gap=<µs>` | the stall meter: print `GAP <µs>` when more than this many microseconds pass between two iterations of the boot processor's main loop (see "Stall meter"); `0` = off | 0 |
//! | `net=mmio:<addr>:<irq>,ip=<a.b.c.d>` | a virtio-net device (virtio-mmio version 2) at guest-physical `<addr>` (`0x` hex or decimal, 4-aligned, at least [`NET_MEM_END`], below 8 GiB); `<irq>` is parsed and unused (the guest polls); the guest's IPv4 address (see "Network") | no network |
//!
//! See [`GuestConfig::cmdline`] to build one.
//!
//! Without `tsc_khz`, the guest measures the TSC ticks of PIT channel 2 counting down in mode 0
//! (ports 0x61/0x42/0x43, as Linux's `pit_calibrate_tsc`) from ~10 ms and from ~1 ms, the
//! shortest of 5 runs of each (a host stall only lengthens a run), and uses the difference,
//! which cancels the fixed latency of the I/O exits. This takes about 55 ms. Note that on PVM
//! `KVM_GET_TSC_KHZ` answered 2445404 while the TSC really ran at ~2596100 kHz (measured against
//! `CLOCK_MONOTONIC`): pass a measured value, or let the guest calibrate.
//!
//! # Serial protocol (COM1, port 0x3f8, one `out` per byte)
//!
//! - `INFO tsc_khz=<n> hb=<µs> pattern=<seq|rand> fresh=<0|1> zero=<n> smp=<n> cpl=<0|3>` —
//!   once, the effective settings and the privilege level the program runs at (read from CS)
//!   (an [`Event::Other`] line for the parser).
//! - `SMP cpus=<n>` — once, before `READY`, with `smp=` above 1: how many CPUs write (the boot
//!   processor and the APs that reached CPL3); preceded by `ERROR smp <n> of <smp> cpus
//!   started` if fewer than `smp` came up.
//! - `READY ws=<MiB> rate=<n|max>` — once, when the main loop starts ([`Event::Ready`]).
//! - `.` — one byte per heartbeat period ([`Event::Heartbeat`]).
//! - `\nT <heartbeats> <pages_written> <pages_verified> <corrupt>\n` — after every 1000th
//!   heartbeat, decimal counters since boot ([`Event::Tline`]), summed over all CPUs.
//! - `\nCORRUPT page=<n> got=<16 hex digits> want=<16 hex digits>\n` — the first mismatching qword
//!   of a page found by the verifier ([`Event::Corrupt`]); the page is then rewritten with its
//!   expected contents, so one damage is reported once. A page an AP found is printed by the
//!   boot processor at its next heartbeat.
//! - `ERROR ws=<n> does not fit` / `ERROR PIT calibration failed` — fatal; the guest then spins.
//! - `\nSTATUS hb=<n> written=<n> verified=<n> corrupt=<n> rx=<n> tx=<n>\n` — the answer to a
//!   `status` line typed on the console ([`Event::Status`]); `rx`/`tx` count the frames the
//!   network driver received and sent (0 without `net=`); `written`, `verified` and `corrupt`
//!   are summed over all CPUs. With more than one CPU running, it is followed by one
//!   `CPU <k> written=<n> verified=<n> corrupt=<n>` line per CPU, `k = 0` the boot processor
//!   ([`Event::Cpu`]).
//! - `\n? <line>\n` — the answer to any other non-empty console line (bytes outside printable
//!   ASCII shown as `?`); `\n? (line too long)\n` for a line longer than
//!   [`CONSOLE_LINE_MAX`] bytes, which is discarded.
//! - `NET up mac=<xx:xx:xx:xx:xx:xx> ip=<a.b.c.d>` — once, before `READY`, when the network
//!   driver is up; `ERROR net <reason>` instead if the token is malformed or the device cannot
//!   be driven (the guest then runs on without a network).
//! - `\nNET announce\n` — the device asked for an announce; the guest sent a gratuitous ARP.
//! - `\nGAP <µs>\n` — with `gap=`: a stall of the boot processor's main loop longer than
//!   `gap=` ([`Event::Gap`]; see "Stall meter").
//!
//! # Console input
//!
//! Once per heartbeat the guest polls COM1's line status register (port `0x3fd`, bit 0) and
//! reads what waits in the receive FIFO (at most 64 bytes per heartbeat, two port reads each)
//! into a [`CONSOLE_LINE_MAX`]-byte line buffer. `\r` or `\n` ends a line; `status` is
//! answered with the `STATUS` line above, other non-empty lines with `? <line>`; input is not
//! echoed. The UART's interrupts stay disabled (IER = 0): the guest never takes interrupts.
//!
//! # Network (with `net=`)
//!
//! A minimal polled virtio-net driver (virtio 1.x over virtio-mmio version 2, split queues).
//! Initialisation, before `READY`, as in the virtio spec (3.1.1): check `MagicValue`,
//! `Version` = 2 and `DeviceID` = 1; reset, ACKNOWLEDGE, DRIVER; accept `VERSION_1` (required),
//! `MAC` (required), `STATUS`, `CTRL_VQ`, `GUEST_ANNOUNCE` if offered; FEATURES_OK (re-read);
//! clear its memory; set up queue 0 (receive, [`NET_RX_SIZE`] entries), 1 (transmit,
//! [`NET_TX_SIZE`]) and, with `CTRL_VQ`, 2 (control, [`NET_CTRL_SIZE`]); read the MAC from
//! config space; post all receive buffers (one 2048-byte device-writable descriptor each) and
//! notify queue 0; DRIVER_OK. A failure after the device answered sets FAILED. All register
//! accesses are 32-bit (config space: 8/16-bit).
//!
//! Every main-loop iteration (about a microsecond) reads the receive queue's used index, one
//! memory read; when it moved, the guest handles the new frames (at most one queue's worth per
//! pass), re-posts each buffer at once and notifies queue 0 unless the device set
//! `VRING_USED_F_NO_NOTIFY`. It answers:
//! - an ARP request (Ethernet/IPv4) for its address, with an ARP reply — except a gratuitous
//!   one (sender IP = its own address, e.g. the VMM's announce on its behalf that was queued at
//!   a destination's TAP before the guest ran there): answering that would teach the switch a
//!   port the announce did not choose;
//! - an IPv4 ICMP echo request (type 8, code 0, not fragmented, lengths consistent with the
//!   frame) to its address, with an echo reply: the request copied, MACs and IPs swapped,
//!   type 0, the ICMP checksum updated incrementally (RFC 1624); the TTL is kept, so the IP
//!   checksum stays valid.
//!
//! Everything else is counted (`rx`) and dropped. Replies go out through the transmit queue
//! (header all zeros, one descriptor, frames padded to 60 bytes) with a notify of queue 1; a
//! transmit buffer is reused once the used ring shows the device is done with it (if all are
//! in flight, the reply is dropped). Once per heartbeat, when `CTRL_VQ` and `GUEST_ANNOUNCE`
//! were negotiated, the guest reads the config `status`; if `VIRTIO_NET_S_ANNOUNCE` is set (and
//! no earlier ack is still with the device) it sends one gratuitous ARP (broadcast ARP request,
//! sender and target IP its own) and acks on the control queue (`class` 3, `cmd` 0, then a
//! device-writable `ack` byte). Per frame the guest runs a few hundred instructions plus one or
//! two MMIO exits (the notifies).
//!
//! The driver's state (ring indices, counters) lives in guest memory, so it migrates with the
//! guest; the device's state migrates in the VMM's device section.
//!
//! # Main loop
//!
//! With `period = hb * tsc_khz / 1000` TSC ticks: when `rdtsc >= next` the guest prints a heartbeat
//! (and every 1000th time a `T` line), advances `next` by one period (or to `now + period` if it
//! fell behind: missed beats are skipped, not replayed) and refills its write budget to `rate`
//! pages, prints the APs' queued corruption reports, then polls the console and (with a NIC)
//! the announce request. Every iteration first checks the NIC's receive queue (see "Network").
//! Otherwise it writes one page while the budget lasts (`gen[p] += 1`, then all 512 qwords =
//! [`expected_content`]`(p, gen[p], i, zero)`: the pattern [`expected_qword`], or all zero for a
//! zero generation), else it verifies the next page of its part round-robin: it reads
//! `gen[p]`; with `fresh=1` a page at generation 0 is skipped without being read (and not
//! counted); otherwise all 512 qwords are compared with [`expected_content`]. Each step handles
//! one page (about a microsecond natively), so heartbeats are accurate to a few µs.
//!
//! # Stall meter (`gap=<µs>`)
//!
//! The boot processor reads the TSC at the top of every main-loop iteration and after every
//! byte it writes to the serial port; when more than `gap=` microseconds (converted with
//! `tsc_khz`) passed between two such reads, it prints `GAP <µs>`, the elapsed time, at the
//! top of the next iteration (one stall waits to be printed at a time: of several seen
//! before that print, the longest). A pause of the VM, a host stall and a migration's switchover (it
//! starts on the source and ends on the destination) each show as one `GAP` line: for a
//! switchover, the destination's first line, printed before its first heartbeat. It is the
//! blackout as the guest's own clock saw it, without the delay with which a host tool reads
//! the serial port, and without the up-to-one-heartbeat uncertainty of heartbeat stamps. It
//! assumes the TSC runs on across the stall (guest TSC = host TSC on one host; across hosts
//! only with synchronised TSCs). Because the TSC is read around every port write, a stall
//! inside a print is measured like any other and the prints themselves never add up to a
//! false stall; the longest stretch between two reads without a stall is one iteration (a
//! page verified or written, or a heartbeat's console and network polls), so `gap=` must be
//! above that (a few hundred µs is safe at CPL3; at CPL0, where an iteration verifying a page
//! takes milliseconds in the emulator, much more). The boot's own output is not measured.
//!
//! # Kernel mode (`cpl0=1`)
//!
//! Before its `iretq`, the boot processor's CPL0 code scans the command line for the whole
//! token `cpl0=1` (about seven instructions per byte). If it is there, the boot processor
//! jumps to the same program at CPL0 instead (kernel code and data selectors `0x08`/`0x10`,
//! `rsp` = [`USTACK_TOP`]); the program records that in its variables, and each AP's CPL0
//! entry then jumps to the AP program at CPL0 instead of its `iretq`. Everything else is the
//! same program, so pages are written and verified and heartbeats printed as at CPL3 — but
//! under PVM every instruction now runs in KVM's instruction emulator (about 1 µs each): one
//! page write or verify takes a few milliseconds, so heartbeats come only every few
//! milliseconds and a `rate=` above a few pages per heartbeat cannot be met. With an `hb=`
//! shorter than one page write the write budget is refilled before it is spent and the
//! verifier never runs (`rate=1` with the default `hb=1000` verifies nothing): give it an
//! `hb=` of tens of milliseconds (the tests use `hb=20000`). This is the mode real guest
//! kernels run in on such hosts.
//!
//! # Several CPUs (`smp=<n>`)
//!
//! After the `INFO` line the boot processor (BSP) copies the AP start-up code to
//! [`AP_TRAMPOLINE`] and, through its local APIC's interrupt command register at
//! [`LAPIC_BASE`]` + 0x300` (written at CPL3; KVM's in-kernel LAPIC handles it), sends an INIT,
//! waits 100 µs, sends a start-up IPI (vector `AP_TRAMPOLINE >> 12` = 8), waits up to 100 ms for
//! `n - 1` APs to reach CPL3, then sends a second start-up IPI and waits up to 1 s more. The
//! IPIs use the destination shorthand "all excluding self": measured on PVM (kernel 6.18), an
//! INIT sent to a physical destination (ICR high `1 << 24`, low `0x4500`; the AP's APIC ID
//! reads 1) never reached the AP (it stayed `KVM_MP_STATE_UNINITIALIZED` at `F000:FFF0`),
//! while the shorthand starts it. So every AP of the VM starts; those beyond `n - 1` halt at
//! CPL0 with interrupts off (`KVM_MP_STATE_HALTED`), for good.
//!
//! An AP starts in real mode at `0x0800:0000`; 13 instructions (emulated under PVM) load the
//! GDT, set CR4, CR3, EFER and CR0 (protection and paging at once, straight into IA-32e mode)
//! and far-jump through a 16:32 pointer to its 64-bit CPL0 entry in the 64-bit code. There
//! (about 30 instructions, emulated too) it loads the data selectors; under a spinlock it clears
//! the busy bit of the shared TSS descriptor and loads the task register (the APs share the
//! BSP's TSS: nothing ever switches stacks through it, interrupts stay off); takes a slot with
//! `lock xadd` (AP `k` = slot `k - 1` uses the block `CPU_BLOCKS + (k - 1) * CPU_BLOCK_SIZE`);
//! and `iretq`s to CPL3 (`CS = 0x23`, `RFLAGS = 0x3002`) with its stack at the end of its block
//! (never a 32-bit protected-mode `IRET`). At CPL3 it increments a counter the BSP waits on and
//! spins until the BSP has filled its block.
//!
//! Just before `READY` the BSP gives CPU `k` of the `c` that came up ([`cpu_pages`]) the pages
//! `k * pages / c .. (k + 1) * pages / c` (the BSP is CPU 0), copies `rate`, `hb` (as the TSC
//! period), `pattern`, `fresh` and `zero` into each AP's block (its xorshift seed is
//! `0x2545F4914F6CDD1D ^ k * INDEX_MUL`) and lets the APs go. Each AP then runs the BSP's loop
//! without its output: per heartbeat period it writes `rate` pages of its part (or writes
//! continuously with `rate=max`), and verifies its part round-robin otherwise, with the same
//! write and verify code. Each page is written and verified by one CPU only. An AP counts its
//! own `written`/`verified`/`corrupt` in its block and queues each corruption report (page,
//! got, want) in a 32-entry ring in its block (waiting while the ring is full); the BSP sums
//! the counters for `T` and `STATUS` and prints the queued reports once per heartbeat.
//!
//! Under QEMU the guest boots with `-kernel` as before (the image is still one `PT_LOAD`
//! segment; only its zero-filled part grew). With `-smp <n>` and `smp=<n>` it would start the
//! APs the same way (the INIT resets whatever state the firmware left them in); that was not
//! run here (no QEMU on the machine where this was written).

#![warn(missing_docs)]

mod codegen;
mod elf;
mod parser;

use std::sync::OnceLock;

pub use parser::{Event, Gap, HeartbeatStats, OutputParser, MAX_LINE};

/// Guest-physical address where the image is loaded (the start of its only `PT_LOAD` segment).
pub const LOAD_ADDR: u64 = 0x10_0000;
/// Guest-physical address of the 32-bit entry point (the ELF `e_entry`).
pub const ENTRY: u64 = LOAD_ADDR + 0x10;
/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = LOAD_ADDR + 0x100;
/// Guest-physical address of the 6-byte GDT pseudo-descriptor loaded by `lgdt`.
pub const GDTR_ADDR: u64 = LOAD_ADDR + 0x140;
/// Guest-physical address of the 64-bit code (CPL0 trampoline and CPL3 program).
pub const CODE64_ADDR: u64 = 0x10_1000;
/// Guest-physical address of the 64-bit TSS (with its I/O permission bitmap).
pub const TSS_ADDR: u64 = 0x10_8000;
/// Guest-physical address of the PML4 (the value loaded into CR3).
pub const PML4_ADDR: u64 = 0x10_b000;
/// Guest-physical address of the PDPT.
pub const PDPT_ADDR: u64 = 0x10_c000;
/// Guest-physical address of the first of the page directories (2 MiB pages).
pub const PD_ADDR: u64 = 0x10_d000;
/// Number of page directories: the identity map covers `PD_COUNT` GiB.
pub const PD_COUNT: u64 = 8;
/// End of the file-backed part of the segment; zero-filled (bss) from here to [`IMAGE_END`].
pub const BSS_START: u64 = PD_ADDR + PD_COUNT * 0x1000;
/// Top (initial `rsp`, and `TSS.rsp0`) of the CPL0 stack.
pub const KSTACK_TOP: u64 = BSS_START + 0x1000;
/// Top (initial `rsp`) of the CPL3 stack.
pub const USTACK_TOP: u64 = KSTACK_TOP + 0x8000;
/// Guest-physical address of the CPL3 program's variables (one page).
pub const VARS_ADDR: u64 = USTACK_TOP;
/// Guest-physical address of the first application processor's block (with `smp=`): AP `k`
/// (`1 ..` [`MAX_CPUS`]) uses `CPU_BLOCKS + (k - 1) * CPU_BLOCK_SIZE` for its variables (the
/// same offsets as the boot processor's at [`VARS_ADDR`]), its report ring and its stack.
pub const CPU_BLOCKS: u64 = VARS_ADDR + 0x1000;
/// Size of one application processor's block; its stack top is the block's end.
pub const CPU_BLOCK_SIZE: u64 = 0x2000;
/// Most vCPUs the guest drives (`smp=` is clamped to this).
pub const MAX_CPUS: u64 = 16;
/// Offset in an AP's block of its ring of corruption reports ([`CORRUPT_RING_ENTRIES`] entries
/// of three qwords: page, got, want), which the boot processor prints.
pub const CORRUPT_RING_OFFSET: u64 = 0x400;
/// Entries in an AP's corruption report ring.
pub const CORRUPT_RING_ENTRIES: u64 = 32;
/// End of the loaded segment (`p_paddr + p_memsz`).
pub const IMAGE_END: u64 = CPU_BLOCKS + (MAX_CPUS - 1) * CPU_BLOCK_SIZE;
/// Where the 16-bit AP start-up code is kept in the image (file-backed, [`TRAMPOLINE_SIZE`]
/// bytes); the boot processor copies it to [`AP_TRAMPOLINE`] before it starts the APs.
pub const TRAMPOLINE_IMAGE: u64 = LOAD_ADDR + 0x200;
/// Size of the AP start-up code block (code, then its GDTR copy and far pointer).
pub const TRAMPOLINE_SIZE: u64 = 0x80;
/// Guest-physical address the APs start at (real mode, `CS:IP = 0x0800:0000`): the
/// start-up IPI's vector is `AP_TRAMPOLINE >> 12`.
pub const AP_TRAMPOLINE: u64 = 0x8000;
/// Guest-physical base of the local APIC (its MMIO page), used to send INIT and SIPI.
pub const LAPIC_BASE: u64 = 0xfee0_0000;

/// Guest-physical start of the virtio-net driver's memory (virtqueues and buffers), used only
/// with a `net=` token; see the crate docs.
pub const NET_MEM: u64 = 0x20_0000;
/// Receive queue (queue 0): descriptor table; its available ring is at `+0x1000`, its used
/// ring at `+0x2000`.
pub const NET_RXQ: u64 = NET_MEM;
/// Transmit queue (queue 1), laid out as [`NET_RXQ`].
pub const NET_TXQ: u64 = NET_MEM + 0x3000;
/// Control queue (queue 2), laid out as [`NET_RXQ`].
pub const NET_CTRLQ: u64 = NET_MEM + 0x6000;
/// The control request (`class`, `cmd`) at this address, its `ack` byte at `+0x10`.
pub const NET_CTRL_BUF: u64 = NET_MEM + 0x9000;
/// Receive buffers: [`NET_RX_SIZE`] of [`NET_BUF_SIZE`] bytes, descriptor `i` at
/// `NET_RX_BUFS + i * NET_BUF_SIZE`.
pub const NET_RX_BUFS: u64 = NET_MEM + 0x1_0000;
/// Transmit buffers: [`NET_TX_SIZE`] of [`NET_BUF_SIZE`] bytes.
pub const NET_TX_BUFS: u64 = NET_RX_BUFS + NET_RX_SIZE * NET_BUF_SIZE;
/// End of the driver's memory.
pub const NET_MEM_END: u64 = NET_TX_BUFS + NET_TX_SIZE * NET_BUF_SIZE;
/// Size of one receive or transmit buffer (12-byte `virtio_net_hdr_v1`, then the frame).
pub const NET_BUF_SIZE: u64 = 2048;
/// Receive queue size (all buffers stay posted).
pub const NET_RX_SIZE: u64 = 64;
/// Transmit queue size.
pub const NET_TX_SIZE: u64 = 32;
/// Control queue size.
pub const NET_CTRL_SIZE: u64 = 4;
/// Longest console line the guest keeps; longer lines are discarded.
pub const CONSOLE_LINE_MAX: u64 = 64;

/// Guest-physical address of the per-page generation table: one little-endian `u32` per
/// working-set page (page `n` at `GEN_TABLE + 4 * n`); 0 means "never written".
pub const GEN_TABLE: u64 = 0x80_0000;
/// Guest-physical address of working-set page 0; page `n` is at `WS_BASE + n * 4096`.
pub const WS_BASE: u64 = 0x100_0000;
/// Size of a working-set page in bytes.
pub const PAGE_SIZE: u64 = 4096;
/// Largest accepted working set, in MiB (1 Mi pages; the generation table holds 1 Mi entries).
pub const MAX_WS_MIB: u64 = 4096;
/// Default working-set size in MiB (`ws=`).
pub const DEFAULT_WS_MIB: u64 = 16;
/// Default heartbeat period in microseconds (`hb=`).
pub const DEFAULT_HB_US: u64 = 1000;
/// A `T` line is printed after every `HEARTBEATS_PER_TLINE` heartbeats.
pub const HEARTBEATS_PER_TLINE: u64 = 1000;
/// Multiplier of the qword index in [`expected_qword`].
pub const INDEX_MUL: u64 = 0x9E37_79B9_7F4A_7C15;

// The memory map is consistent (checked at compile time).
const _: () = {
    assert!(ENTRY < GDT_ADDR && GDTR_ADDR >= GDT_ADDR + 64 && GDTR_ADDR + 6 <= CODE64_ADDR);
    assert!(CODE64_ADDR < TSS_ADDR && TSS_ADDR + 0x68 + 8192 < PML4_ADDR);
    assert!(PDPT_ADDR == PML4_ADDR + 0x1000 && PD_ADDR == PDPT_ADDR + 0x1000);
    assert!(IMAGE_END <= NET_MEM && NET_MEM_END <= GEN_TABLE);
    assert!(GDTR_ADDR + 6 <= TRAMPOLINE_IMAGE && TRAMPOLINE_IMAGE + TRAMPOLINE_SIZE <= CODE64_ADDR);
    assert!(AP_TRAMPOLINE.is_multiple_of(4096) && AP_TRAMPOLINE + TRAMPOLINE_SIZE <= 0x9000);
    assert!(CORRUPT_RING_OFFSET + 24 * CORRUPT_RING_ENTRIES <= CPU_BLOCK_SIZE / 2);
    assert!(CPU_BLOCK_SIZE.is_power_of_two() && CORRUPT_RING_ENTRIES.is_power_of_two());
    assert!(NET_RX_BUFS >= NET_CTRL_BUF + 0x1000);
    assert!(NET_RX_SIZE.is_power_of_two() && NET_TX_SIZE.is_power_of_two());
    assert!(NET_CTRL_SIZE.is_power_of_two() && NET_BUF_SIZE == 2048);
    assert!(GEN_TABLE + 4 * (MAX_WS_MIB << 8) <= WS_BASE);
    assert!(WS_BASE + (MAX_WS_MIB << 20) <= PD_COUNT << 30);
};

/// Errors from building the guest image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// iced-x86 refused to assemble an instruction or to encode a code block.
    #[error("assembling the guest code failed: {0}")]
    Assemble(#[from] iced_x86::IcedError),
    /// A generated part does not fit in the room the memory map gives it.
    #[error("guest layout: {what} is {size:#x} bytes, only {room:#x} available")]
    Layout {
        /// Which part of the image.
        what: &'static str,
        /// Its generated size in bytes.
        size: usize,
        /// The room the memory map has for it.
        room: usize,
    },
}

/// The value the guest writes into qword `index` (0..512) of working-set page `page` at
/// generation `gen`. Generation 0 means "never written": such a page must read as all zero.
#[must_use]
pub fn expected_qword(page: u64, gen: u32, index: usize) -> u64 {
    ((page << 32) | u64::from(gen)) ^ (index as u64).wrapping_mul(INDEX_MUL)
}

/// Whether generation `gen` of a page is all zero: generation 0 (never written), and, with
/// `zero=<n>` (`zero_every = n > 0`), every generation that is a multiple of `n` (the `n`-th,
/// `2n`-th, ... write of the page writes it all zero).
#[must_use]
pub fn generation_is_zero(gen: u32, zero_every: u32) -> bool {
    gen == 0 || (zero_every != 0 && gen.is_multiple_of(zero_every))
}

/// The value qword `index` of working-set page `page` holds at generation `gen` under
/// `zero=<zero_every>` (0: off): 0 for a zero generation ([`generation_is_zero`]), else
/// [`expected_qword`].
#[must_use]
pub fn expected_content(page: u64, gen: u32, index: usize, zero_every: u32) -> u64 {
    if generation_is_zero(gen, zero_every) {
        0
    } else {
        expected_qword(page, gen, index)
    }
}

/// The pages CPU `cpu` of `cpus` writes and verifies with `smp=`: `cpu * pages / cpus ..
/// (cpu + 1) * pages / cpus` (the boot processor is CPU 0).
#[must_use]
pub fn cpu_pages(cpu: u64, cpus: u64, pages: u64) -> std::ops::Range<u64> {
    cpu * pages / cpus..(cpu + 1) * pages / cpus
}

/// Builds the guest's ELF32 Multiboot image (see the crate docs for its layout). The image is
/// built once per process and cached; each call returns a copy.
///
/// # Errors
///
/// [`Error`] if code generation fails, which would be a bug in this crate.
pub fn image() -> Result<Vec<u8>, Error> {
    static CACHE: OnceLock<Vec<u8>> = OnceLock::new();
    if let Some(img) = CACHE.get() {
        return Ok(img.clone());
    }
    let img = codegen::build_image()?;
    Ok(CACHE.get_or_init(|| img).clone())
}

/// How many pages the guest writes per heartbeat period (`rate=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rate {
    /// Write this many pages after each heartbeat, then verify until the next one (0 = idle).
    Pages(u64),
    /// Write pages continuously, as fast as the vCPU can (`rate=max`); never verify.
    Max,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rate::Pages(n) => write!(f, "{n}"),
            Rate::Max => f.write_str("max"),
        }
    }
}

/// How the guest picks the next page to write (`pattern=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Pattern {
    /// A cursor going round the working set.
    #[default]
    Seq,
    /// xorshift64 (fixed seed) modulo the number of pages.
    Rand,
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pattern::Seq => "seq",
            Pattern::Rand => "rand",
        })
    }
}

/// The guest's settings, as passed on its Multiboot command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GuestConfig {
    /// Working-set size in MiB (`ws=`).
    pub ws_mib: u64,
    /// Write rate (`rate=`).
    pub rate: Rate,
    /// Heartbeat period in microseconds (`hb=`).
    pub hb_us: u64,
    /// Page choice for writes (`pattern=`).
    pub pattern: Pattern,
    /// TSC frequency in kHz (`tsc_khz=`); `None` lets the guest calibrate it with the PIT.
    pub tsc_khz: Option<u64>,
    /// `fresh=1`: the verifier never reads a page that was never written (generation 0), so
    /// each page's first write is its first touch.
    pub fresh: bool,
    /// `zero=<n>`: every `n`-th write of a page writes it all zero; 0 = never.
    pub zero_every: u32,
    /// `smp=<n>`: number of CPUs that write and verify (the boot processor and `n - 1`
    /// application processors, each on its own part of the working set); 1 = the boot
    /// processor alone.
    pub smp: u32,
    /// `cpl0=1`: the program runs at CPL0 (kernel mode) instead of CPL3.
    pub cpl0: bool,
    /// `gap=<µs>`: the stall meter's threshold (0 = off; see "Stall meter").
    pub gap_us: u64,
    /// `laps=<n>`: each CPU stops writing after `n` × its part's page count writes (with
    /// [`Pattern::Seq`], `n` full laps of its part) and only verifies from then on; 0 = never.
    pub laps: u32,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            ws_mib: DEFAULT_WS_MIB,
            rate: Rate::Pages(0),
            hb_us: DEFAULT_HB_US,
            pattern: Pattern::Seq,
            tsc_khz: None,
            fresh: false,
            zero_every: 0,
            smp: 1,
            cpl0: false,
            gap_us: 0,
            laps: 0,
        }
    }
}

impl GuestConfig {
    /// The Multiboot command line for these settings, e.g.
    /// `ws=64 rate=100 hb=1000 pattern=seq tsc_khz=2445404 fresh=1 zero=4 smp=2 cpl0=1 gap=500`
    /// (`tsc_khz`, `fresh`, `zero`, `smp`, `cpl0`, `gap` and `laps` only when they differ from the
    /// guest's default).
    #[must_use]
    pub fn cmdline(&self) -> String {
        let mut s = format!(
            "ws={} rate={} hb={} pattern={}",
            self.ws_mib, self.rate, self.hb_us, self.pattern
        );
        if let Some(khz) = self.tsc_khz {
            s.push_str(&format!(" tsc_khz={khz}"));
        }
        if self.fresh {
            s.push_str(" fresh=1");
        }
        if self.zero_every != 0 {
            s.push_str(&format!(" zero={}", self.zero_every));
        }
        if self.smp > 1 {
            s.push_str(&format!(" smp={}", self.smp));
        }
        if self.cpl0 {
            s.push_str(" cpl0=1");
        }
        if self.gap_us != 0 {
            s.push_str(&format!(" gap={}", self.gap_us));
        }
        if self.laps != 0 {
            s.push_str(&format!(" laps={}", self.laps));
        }
        s
    }

    /// The pages CPU `cpu` writes and verifies ([`cpu_pages`] with `smp` CPUs).
    #[must_use]
    pub fn cpu_pages(&self, cpu: u64) -> std::ops::Range<u64> {
        cpu_pages(cpu, u64::from(self.smp.max(1)), self.ws_pages())
    }

    /// Number of working-set pages.
    #[must_use]
    pub fn ws_pages(&self) -> u64 {
        self.ws_mib * (1 << 20) / PAGE_SIZE
    }

    /// Guest RAM in bytes that the working set needs (everything below `WS_BASE + ws`).
    #[must_use]
    pub fn min_ram_bytes(&self) -> u64 {
        WS_BASE + self.ws_mib * (1 << 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_qword_formula() {
        assert_eq!(expected_qword(0, 0, 0), 0);
        assert_eq!(expected_qword(3, 7, 0), (3 << 32) | 7);
        assert_eq!(expected_qword(3, 7, 1), ((3 << 32) | 7) ^ INDEX_MUL);
        assert_eq!(
            expected_qword(1, 1, 511),
            ((1 << 32) | 1) ^ 511u64.wrapping_mul(INDEX_MUL)
        );
    }

    #[test]
    fn zero_generations() {
        assert!(generation_is_zero(0, 0));
        assert!(!generation_is_zero(1, 0));
        assert!(!generation_is_zero(3, 4));
        assert!(generation_is_zero(4, 4));
        assert!(generation_is_zero(8, 4));
        assert!(generation_is_zero(5, 1));
        assert_eq!(expected_content(7, 4, 3, 4), 0);
        assert_eq!(expected_content(7, 5, 3, 4), expected_qword(7, 5, 3));
        assert_eq!(expected_content(7, 0, 3, 0), 0);
    }

    #[test]
    fn cpu_parts_cover_the_working_set_once() {
        for (cpus, pages) in [(1, 256), (2, 4096), (3, 4096), (16, 256), (5, 1000)] {
            let mut next = 0;
            for cpu in 0..cpus {
                let r = cpu_pages(cpu, cpus, pages);
                assert_eq!(r.start, next);
                assert!(r.end > r.start);
                next = r.end;
            }
            assert_eq!(next, pages);
        }
    }

    #[test]
    fn cmdline() {
        let c = GuestConfig {
            ws_mib: 64,
            rate: Rate::Max,
            hb_us: 500,
            pattern: Pattern::Rand,
            tsc_khz: Some(2_445_404),
            ..GuestConfig::default()
        };
        assert_eq!(
            c.cmdline(),
            "ws=64 rate=max hb=500 pattern=rand tsc_khz=2445404"
        );
        let c = GuestConfig {
            fresh: true,
            zero_every: 4,
            smp: 2,
            ..c
        };
        assert_eq!(
            c.cmdline(),
            "ws=64 rate=max hb=500 pattern=rand tsc_khz=2445404 fresh=1 zero=4 smp=2"
        );
        assert!(GuestConfig { cpl0: true, ..c }
            .cmdline()
            .ends_with(" smp=2 cpl0=1"));
        assert!(GuestConfig { gap_us: 500, ..c }
            .cmdline()
            .ends_with(" smp=2 gap=500"));
        assert!(GuestConfig { laps: 1, ..c }
            .cmdline()
            .ends_with(" smp=2 laps=1"));
        assert_eq!(c.cpu_pages(0), 0..8192);
        assert_eq!(c.cpu_pages(1), 8192..16384);
        assert_eq!(
            GuestConfig::default().cmdline(),
            "ws=16 rate=0 hb=1000 pattern=seq"
        );
        assert_eq!(GuestConfig::default().ws_pages(), 4096);
    }
}
