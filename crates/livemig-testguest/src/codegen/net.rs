//! The CPL3 program's serial console (line input on COM1) and its minimal virtio-net driver
//! (virtio-mmio version 2, polled: ARP and ICMP echo replies, gratuitous ARP on the announce
//! request). See the crate docs for the protocol.

use iced_x86::code_asm::*;

use super::{print_char, print_str, print_sum, v, var, Labels, COM1};
use crate::{
    Error, CONSOLE_LINE_MAX, NET_BUF_SIZE, NET_CTRLQ, NET_CTRL_BUF, NET_CTRL_SIZE, NET_MEM,
    NET_MEM_END, NET_RXQ, NET_RX_BUFS, NET_RX_SIZE, NET_TXQ, NET_TX_BUFS, NET_TX_SIZE, PD_COUNT,
};

/// virtio-mmio register offsets.
mod reg {
    pub const MAGIC: i32 = 0x000;
    pub const VERSION: i32 = 0x004;
    pub const DEVICE_ID: i32 = 0x008;
    pub const DEVICE_FEATURES: i32 = 0x010;
    pub const DEVICE_FEATURES_SEL: i32 = 0x014;
    pub const DRIVER_FEATURES: i32 = 0x020;
    pub const DRIVER_FEATURES_SEL: i32 = 0x024;
    pub const QUEUE_SEL: i32 = 0x030;
    pub const QUEUE_NUM_MAX: i32 = 0x034;
    pub const QUEUE_NUM: i32 = 0x038;
    pub const QUEUE_READY: i32 = 0x044;
    pub const QUEUE_NOTIFY: i32 = 0x050;
    pub const STATUS: i32 = 0x070;
    pub const QUEUE_DESC_LOW: i32 = 0x080;
    pub const QUEUE_DESC_HIGH: i32 = 0x084;
    pub const QUEUE_DRIVER_LOW: i32 = 0x090;
    pub const QUEUE_DRIVER_HIGH: i32 = 0x094;
    pub const QUEUE_DEVICE_LOW: i32 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: i32 = 0x0a4;
    /// Config space: `mac[6]`, then `status: u16`.
    pub const CONFIG_MAC: i32 = 0x100;
    pub const CONFIG_STATUS: i32 = 0x106;
}

const VIRTIO_MAGIC: i32 = 0x7472_6976;
/// Device status bits.
const S_ACKNOWLEDGE: i32 = 1;
const S_DRIVER: i32 = 2;
const S_DRIVER_OK: i32 = 4;
const S_FEATURES_OK: i32 = 8;
const S_FAILED: i32 = 0x80;
/// Feature bits 0..31 the driver accepts: MAC, STATUS, CTRL_VQ, GUEST_ANNOUNCE.
const F_MAC: i32 = 1 << 5;
const F_STATUS: i32 = 1 << 16;
const F_CTRL_VQ: i32 = 1 << 17;
const F_GUEST_ANNOUNCE: i32 = 1 << 21;
const WANT_FEATURES: i32 = F_MAC | F_STATUS | F_CTRL_VQ | F_GUEST_ANNOUNCE;
/// Config `status` bit: the device asks for an announce.
const NET_S_ANNOUNCE: i32 = 2;
/// Descriptor flags.
const VRING_DESC_F_NEXT: i32 = 1;
const VRING_DESC_F_WRITE: i32 = 2;
/// Used ring flag: the device does not need notifications.
const VRING_USED_F_NO_NOTIFY: i32 = 1;
/// Offsets of the available and used rings from a queue's descriptor table.
const AVAIL: i32 = 0x1000;
const USED: i32 = 0x2000;
/// Size of `virtio_net_hdr_v1`.
const HDR: i32 = 12;
/// Shortest Ethernet frame (without FCS); shorter replies are zero-padded.
const ETH_MIN: i32 = 60;
/// `log2(NET_BUF_SIZE)`.
const BUF_SHIFT: i32 = 11;
/// A bad device never makes one poll process more than this many used entries.
const RX_BATCH: i32 = NET_RX_SIZE as i32;

/// Labels of the console and network code.
#[derive(Clone, Copy)]
pub(super) struct NetLabels {
    pub console_poll: CodeLabel,
    pub parse_net: CodeLabel,
    pub k_net: CodeLabel,
    net_init: CodeLabel,
    net_rx: CodeLabel,
    net_config: CodeLabel,
    handle_frame: CodeLabel,
    tx_alloc: CodeLabel,
    tx_send: CodeLabel,
    setup_queue: CodeLabel,
    put_hex2: CodeLabel,
    put_ip: CodeLabel,
    k_mmio: CodeLabel,
    k_ip: CodeLabel,
    k_status: CodeLabel,
    s_status: CodeLabel,
    s_written: CodeLabel,
    s_verified: CodeLabel,
    s_corrupt: CodeLabel,
    s_rx: CodeLabel,
    s_tx: CodeLabel,
    s_unknown: CodeLabel,
    s_toolong: CodeLabel,
    s_net_up: CodeLabel,
    s_ip: CodeLabel,
    s_garp: CodeLabel,
    s_err_token: CodeLabel,
    s_err_magic: CodeLabel,
    s_err_version: CodeLabel,
    s_err_device: CodeLabel,
    s_err_features: CodeLabel,
    s_err_queue: CodeLabel,
}

impl NetLabels {
    pub(super) fn new(a: &mut CodeAssembler) -> Self {
        NetLabels {
            console_poll: a.create_label(),
            parse_net: a.create_label(),
            k_net: a.create_label(),
            net_init: a.create_label(),
            net_rx: a.create_label(),
            net_config: a.create_label(),
            handle_frame: a.create_label(),
            tx_alloc: a.create_label(),
            tx_send: a.create_label(),
            setup_queue: a.create_label(),
            put_hex2: a.create_label(),
            put_ip: a.create_label(),
            k_mmio: a.create_label(),
            k_ip: a.create_label(),
            k_status: a.create_label(),
            s_status: a.create_label(),
            s_written: a.create_label(),
            s_verified: a.create_label(),
            s_corrupt: a.create_label(),
            s_rx: a.create_label(),
            s_tx: a.create_label(),
            s_unknown: a.create_label(),
            s_toolong: a.create_label(),
            s_net_up: a.create_label(),
            s_ip: a.create_label(),
            s_garp: a.create_label(),
            s_err_token: a.create_label(),
            s_err_magic: a.create_label(),
            s_err_version: a.create_label(),
            s_err_device: a.create_label(),
            s_err_features: a.create_label(),
            s_err_queue: a.create_label(),
        }
    }
}

/// The strings of the console and network code.
pub(super) fn strings(a: &mut CodeAssembler, n: &mut NetLabels) -> Result<(), Error> {
    use super::string;
    string(a, &mut n.k_net, b"net=")?;
    string(a, &mut n.k_mmio, b"mmio:")?;
    string(a, &mut n.k_ip, b",ip=")?;
    string(a, &mut n.k_status, b"status")?;
    string(a, &mut n.s_status, b"\nSTATUS hb=")?;
    string(a, &mut n.s_written, b" written=")?;
    string(a, &mut n.s_verified, b" verified=")?;
    string(a, &mut n.s_corrupt, b" corrupt=")?;
    string(a, &mut n.s_rx, b" rx=")?;
    string(a, &mut n.s_tx, b" tx=")?;
    string(a, &mut n.s_unknown, b"\n? ")?;
    string(a, &mut n.s_toolong, b"\n? (line too long)\n")?;
    string(a, &mut n.s_net_up, b"NET up mac=")?;
    string(a, &mut n.s_ip, b" ip=")?;
    string(a, &mut n.s_garp, b"\nNET announce\n")?;
    string(
        a,
        &mut n.s_err_token,
        b"ERROR net bad token (want net=mmio:<addr>:<irq>,ip=<a.b.c.d>)\n",
    )?;
    string(
        a,
        &mut n.s_err_magic,
        b"ERROR net no virtio-mmio device (bad magic)\n",
    )?;
    string(
        a,
        &mut n.s_err_version,
        b"ERROR net virtio-mmio version is not 2\n",
    )?;
    string(
        a,
        &mut n.s_err_device,
        b"ERROR net device is not a network card\n",
    )?;
    string(
        a,
        &mut n.s_err_features,
        b"ERROR net feature negotiation failed\n",
    )?;
    string(a, &mut n.s_err_queue, b"ERROR net queue setup failed\n")?;
    Ok(())
}

/// At init: brings the driver up if a well-formed `net=` token was given.
pub(super) fn init_if_configured(a: &mut CodeAssembler, l: &Labels) -> Result<(), Error> {
    let mut skip = a.create_label();
    let mut good = a.create_label();
    a.cmp(v(var::NET_TOKEN), 0)?;
    a.je(skip)?;
    a.cmp(v(var::NET_TOKEN), 1)?;
    a.je(good)?;
    print_str(a, l, l.n.s_err_token)?;
    a.jmp(skip)?;
    a.set_label(&mut good)?;
    a.call(l.n.net_init)?;
    a.set_label(&mut skip)?;
    a.nop()?;
    Ok(())
}

/// Main loop, every iteration: one flag test without a NIC; with one, one memory read of the
/// receive queue's used index (and the receive path if it moved).
pub(super) fn poll_rx(a: &mut CodeAssembler, l: &Labels) -> Result<(), Error> {
    let mut none = a.create_label();
    a.cmp(v(var::NET_ON), 0)?;
    a.je(none)?;
    a.mov(rax, NET_RXQ + USED as u64 + 2)?;
    a.mov(ax, word_ptr(rax))?;
    a.cmp(ax, word_ptr(r15 + var::RX_USED))?;
    a.je(none)?;
    a.call(l.n.net_rx)?;
    a.set_label(&mut none)?;
    a.nop()?;
    Ok(())
}

/// Once per heartbeat with a NIC: the announce request in the config `status`.
pub(super) fn poll_config(a: &mut CodeAssembler, l: &Labels) -> Result<(), Error> {
    let mut none = a.create_label();
    a.cmp(v(var::NET_ON), 0)?;
    a.je(none)?;
    a.call(l.n.net_config)?;
    a.set_label(&mut none)?;
    a.nop()?;
    Ok(())
}

/// Stores the 6-byte MAC of the guest at `[dst]` (clobbers eax).
fn put_my_mac(
    a: &mut CodeAssembler,
    dst: AsmMemoryOperand,
    dst4: AsmMemoryOperand,
) -> Result<(), Error> {
    a.mov(eax, dword_ptr(r15 + var::NET_MAC))?;
    a.mov(dst, eax)?;
    a.mov(ax, word_ptr(r15 + (var::NET_MAC + 4)))?;
    a.mov(dst4, ax)?;
    Ok(())
}

/// Copies 6 bytes from `src`/`src4` to `dst`/`dst4` (clobbers eax).
fn copy_mac(
    a: &mut CodeAssembler,
    dst: AsmMemoryOperand,
    dst4: AsmMemoryOperand,
    src: AsmMemoryOperand,
    src4: AsmMemoryOperand,
) -> Result<(), Error> {
    a.mov(eax, src)?;
    a.mov(dst, eax)?;
    a.mov(ax, src4)?;
    a.mov(dst4, ax)?;
    Ok(())
}

/// Emits the subroutines.
pub(super) fn subroutines(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), Error> {
    console(a, l)?;
    parse_net(a, l)?;
    helpers(a, l)?;
    init(a, l)?;
    rx(a, l)?;
    frame(a, l)?;
    tx(a, l)?;
    config(a, l)?;
    Ok(())
}

/// `console_poll`: reads what waits in the UART (at most 64 bytes per call) into the line
/// buffer and answers complete lines. Clobbers rax, rcx, rdx, rsi, rdi, r8, r12, r13.
fn console(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), Error> {
    let mut top = a.create_label();
    let mut done = a.create_label();
    let mut eol = a.create_label();
    let mut store = a.create_label();
    let mut next = a.create_label();
    let mut not_long = a.create_label();
    let mut not_status = a.create_label();
    let mut echo = a.create_label();
    let mut echo_done = a.create_label();
    let mut printable = a.create_label();
    let mut bad = a.create_label();
    let mut reset = a.create_label();
    a.set_label(&mut l.n.console_poll)?;
    a.mov(r8d, 64u32)?;
    a.set_label(&mut top)?;
    a.mov(edx, (COM1 + 5) as u32)?;
    a.in_(al, dx)?;
    a.test(al, 1)?; // LSR bit 0: data ready
    a.jz(done)?;
    a.mov(edx, COM1 as u32)?;
    a.in_(al, dx)?;
    a.cmp(al, i32::from(b'\r'))?;
    a.je(eol)?;
    a.cmp(al, i32::from(b'\n'))?;
    a.je(eol)?;
    a.mov(rcx, v(var::LINE_LEN))?;
    a.cmp(rcx, CONSOLE_LINE_MAX as i32)?;
    a.jb(store)?;
    a.mov(v(var::LINE_OVF), 1)?;
    a.jmp(next)?;
    a.set_label(&mut store)?;
    a.mov(byte_ptr(r15 + rcx + var::LINEBUF), al)?;
    a.inc(v(var::LINE_LEN))?;
    a.jmp(next)?;

    // A complete line: too long, empty, `status`, or anything else.
    a.set_label(&mut eol)?;
    a.cmp(v(var::LINE_OVF), 0)?;
    a.je(not_long)?;
    print_str(a, l, l.n.s_toolong)?;
    a.jmp(reset)?;
    a.set_label(&mut not_long)?;
    a.mov(rcx, v(var::LINE_LEN))?;
    a.test(rcx, rcx)?;
    a.jz(reset)?;
    a.mov(byte_ptr(r15 + rcx + var::LINEBUF), 0)?;
    a.lea(rsi, ptr(r15 + var::LINEBUF))?;
    a.lea(rdi, ptr(l.n.k_status))?;
    a.call(l.match_key)?;
    a.test(eax, eax)?;
    a.jz(not_status)?;
    a.cmp(byte_ptr(rsi), 0)?;
    a.jne(not_status)?;
    // STATUS hb=<n> written=<n> verified=<n> corrupt=<n> rx=<n> tx=<n>
    for (s, off) in [
        (l.n.s_status, var::HEARTBEATS),
        (l.n.s_written, var::WRITTEN),
        (l.n.s_verified, var::VERIFIED),
        (l.n.s_corrupt, var::CORRUPT),
        (l.n.s_rx, var::RX_FRAMES),
        (l.n.s_tx, var::TX_FRAMES),
    ] {
        print_str(a, l, s)?;
        if [var::WRITTEN, var::VERIFIED, var::CORRUPT].contains(&off) {
            print_sum(a, l, off)?;
        } else {
            a.mov(rax, v(off))?;
            a.call(l.put_dec)?;
        }
    }
    print_char(a, l, b'\n')?;
    // With several CPUs, one `CPU <k> ...` line each.
    a.call(l.s.cpu_lines)?;
    a.jmp(reset)?;
    // `? <line>`, with bytes outside printable ASCII shown as `?`.
    a.set_label(&mut not_status)?;
    print_str(a, l, l.n.s_unknown)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut echo)?;
    a.cmp(rcx, v(var::LINE_LEN))?;
    a.jae(echo_done)?;
    a.mov(al, byte_ptr(r15 + rcx + var::LINEBUF))?;
    a.cmp(al, 0x20)?;
    a.jb(bad)?;
    a.cmp(al, 0x7e)?;
    a.jbe(printable)?;
    a.set_label(&mut bad)?;
    a.mov(al, i32::from(b'?'))?;
    a.set_label(&mut printable)?;
    a.call(l.putc)?; // clobbers dx only
    a.inc(rcx)?;
    a.jmp(echo)?;
    a.set_label(&mut echo_done)?;
    print_char(a, l, b'\n')?;
    a.set_label(&mut reset)?;
    a.mov(v(var::LINE_LEN), 0)?;
    a.mov(v(var::LINE_OVF), 0)?;
    a.set_label(&mut next)?;
    a.dec(r8d)?;
    a.jnz(top)?;
    a.set_label(&mut done)?;
    a.ret()?;
    Ok(())
}

/// `parse_net`: rsi = the text after `net=`. Parses `mmio:<addr>:<irq>,ip=<a.b.c.d>` into
/// NET_BASE, NET_IRQ and NET_IP and sets NET_TOKEN to 1, or to 2 if it is malformed (or the
/// address is not a 4-aligned address the guest maps). Leaves rsi inside the token.
/// Clobbers rax, rcx, rdx, rdi, r8, r9.
fn parse_net(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), Error> {
    let mut bad = a.create_label();
    let mut dec = a.create_label();
    let mut have = a.create_label();
    let mut hex = a.create_label();
    let mut hex_digit = a.create_label();
    let mut hex_lower = a.create_label();
    let mut octet = a.create_label();
    let mut dot = a.create_label();
    a.set_label(&mut l.n.parse_net)?;
    a.mov(v(var::NET_TOKEN), 2)?;
    a.lea(rdi, ptr(l.n.k_mmio))?;
    a.call(l.match_key)?;
    a.test(eax, eax)?;
    a.jz(bad)?;
    // <addr>: 0x<hex> or decimal, at least one digit, at most 16 hex digits.
    a.mov(r8, rsi)?;
    a.cmp(word_ptr(rsi), 0x7830)?; // "0x"
    a.jne(dec)?;
    a.add(rsi, 2)?;
    a.mov(r8, rsi)?;
    a.xor(eax, eax)?;
    a.set_label(&mut hex)?;
    a.movzx(ecx, byte_ptr(rsi))?;
    a.sub(ecx, i32::from(b'0'))?;
    a.cmp(ecx, 9)?;
    a.jbe(hex_digit)?;
    a.movzx(ecx, byte_ptr(rsi))?;
    a.or(ecx, 0x20)?; // lower case
    a.sub(ecx, i32::from(b'a'))?;
    a.cmp(ecx, 5)?;
    a.ja(have)?;
    a.set_label(&mut hex_lower)?;
    a.add(ecx, 10)?;
    a.set_label(&mut hex_digit)?;
    a.shl(rax, 4)?;
    a.or(rax, rcx)?;
    a.inc(rsi)?;
    a.mov(rcx, rsi)?;
    a.sub(rcx, r8)?;
    a.cmp(rcx, 16)?;
    a.ja(bad)?;
    a.jmp(hex)?;
    a.set_label(&mut dec)?;
    a.call(l.parse_dec)?;
    a.set_label(&mut have)?;
    a.cmp(rsi, r8)?;
    a.je(bad)?; // no digits
    a.test(al, 3)?;
    a.jnz(bad)?;
    a.mov(rcx, (PD_COUNT << 30) - 0x1000)?;
    a.cmp(rax, rcx)?;
    a.ja(bad)?;
    // The window must not be the driver's own memory or below it (that is RAM).
    a.cmp(rax, NET_MEM_END as i32)?;
    a.jb(bad)?;
    a.mov(v(var::NET_BASE), rax)?;
    // :<irq>
    a.cmp(byte_ptr(rsi), i32::from(b':'))?;
    a.jne(bad)?;
    a.inc(rsi)?;
    a.mov(r8, rsi)?;
    a.call(l.parse_dec)?;
    a.cmp(rsi, r8)?;
    a.je(bad)?;
    a.mov(v(var::NET_IRQ), rax)?;
    // ,ip=<a.b.c.d>
    a.lea(rdi, ptr(l.n.k_ip))?;
    a.call(l.match_key)?;
    a.test(eax, eax)?;
    a.jz(bad)?;
    a.xor(r9d, r9d)?; // octet index
    a.set_label(&mut octet)?;
    a.mov(r8, rsi)?;
    a.call(l.parse_dec)?;
    a.cmp(rsi, r8)?;
    a.je(bad)?;
    a.mov(rcx, rsi)?;
    a.sub(rcx, r8)?;
    a.cmp(rcx, 3)?;
    a.ja(bad)?;
    a.cmp(rax, 255)?;
    a.ja(bad)?;
    a.mov(byte_ptr(r15 + r9 + var::NET_IP), al)?;
    a.inc(r9d)?;
    a.cmp(r9d, 4)?;
    a.je(dot)?;
    a.cmp(byte_ptr(rsi), i32::from(b'.'))?;
    a.jne(bad)?;
    a.inc(rsi)?;
    a.jmp(octet)?;
    a.set_label(&mut dot)?;
    // The token must end here.
    a.cmp(byte_ptr(rsi), 0x20)?;
    a.ja(bad)?;
    a.mov(v(var::NET_TOKEN), 1)?;
    a.set_label(&mut bad)?;
    a.ret()?;
    Ok(())
}

/// `put_hex2` (al = byte, two lowercase hex digits; clobbers rax, rcx, rdx) and `put_ip`
/// (the guest's IPv4 address in dotted decimal; clobbers rax, rcx, rdx, rsi, r8).
fn helpers(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), Error> {
    {
        let mut digit = a.create_label();
        let mut top = a.create_label();
        a.set_label(&mut l.n.put_hex2)?;
        a.movzx(ecx, al)?;
        a.shl(ecx, 24)?;
        a.mov(r8d, 2u32)?;
        a.set_label(&mut top)?;
        a.rol(ecx, 4)?;
        a.mov(eax, ecx)?;
        a.and(eax, 15)?;
        a.cmp(al, 10)?;
        a.jb(digit)?;
        a.add(al, i32::from(b'a' - 10 - b'0'))?;
        a.set_label(&mut digit)?;
        a.add(al, i32::from(b'0'))?;
        a.call(l.putc)?;
        a.dec(r8d)?;
        a.jnz(top)?;
        a.ret()?;
    }
    {
        let mut top = a.create_label();
        let mut last = a.create_label();
        a.set_label(&mut l.n.put_ip)?;
        a.xor(r8d, r8d)?;
        a.set_label(&mut top)?;
        a.movzx(eax, byte_ptr(r15 + r8 + var::NET_IP))?;
        a.push(r8)?;
        a.call(l.put_dec)?;
        a.pop(r8)?;
        a.inc(r8d)?;
        a.cmp(r8d, 4)?;
        a.je(last)?;
        a.mov(al, i32::from(b'.'))?;
        a.call(l.putc)?;
        a.jmp(top)?;
        a.set_label(&mut last)?;
        a.ret()?;
    }
    Ok(())
}

/// `net_init`: the virtio 1.x driver initialisation (spec 3.1.1) on the virtio-mmio window at
/// NET_BASE: check the device, negotiate features, set up the queues, post every receive
/// buffer, DRIVER_OK, print `NET up mac=<mac> ip=<ip>`. On failure prints `ERROR net ...`,
/// sets FAILED (if the device answered) and leaves the network off.
/// Clobbers rax, rbx, rcx, rdx, rsi, rdi, r8 - r11.
fn init(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), Error> {
    let mut err_magic = a.create_label();
    let mut err_version = a.create_label();
    let mut err_device = a.create_label();
    let mut err_features = a.create_label();
    let mut err_queue = a.create_label();
    let mut failed = a.create_label();
    let mut no_ctrl = a.create_label();
    let mut rx_desc = a.create_label();
    let mut tx_desc = a.create_label();
    let mut mac = a.create_label();
    let mut mac_sep = a.create_label();
    let mut mac_done = a.create_label();
    a.set_label(&mut l.n.net_init)?;
    a.mov(rbx, v(var::NET_BASE))?;
    a.cmp(dword_ptr(rbx + reg::MAGIC), VIRTIO_MAGIC)?;
    a.jne(err_magic)?;
    a.cmp(dword_ptr(rbx + reg::VERSION), 2)?;
    a.jne(err_version)?;
    a.cmp(dword_ptr(rbx + reg::DEVICE_ID), 1)?;
    a.jne(err_device)?;
    a.mov(dword_ptr(rbx + reg::STATUS), 0)?; // reset
    a.mov(dword_ptr(rbx + reg::STATUS), S_ACKNOWLEDGE)?;
    a.mov(dword_ptr(rbx + reg::STATUS), S_ACKNOWLEDGE | S_DRIVER)?;
    // Features 32..63: VERSION_1 (bit 32) is required.
    a.mov(dword_ptr(rbx + reg::DEVICE_FEATURES_SEL), 1)?;
    a.test(dword_ptr(rbx + reg::DEVICE_FEATURES), 1)?;
    a.jz(err_features)?;
    // Features 0..31: MAC required, STATUS / CTRL_VQ / GUEST_ANNOUNCE if offered.
    a.mov(dword_ptr(rbx + reg::DEVICE_FEATURES_SEL), 0)?;
    a.mov(eax, dword_ptr(rbx + reg::DEVICE_FEATURES))?;
    a.and(eax, WANT_FEATURES)?;
    a.test(eax, F_MAC)?;
    a.jz(err_features)?;
    a.mov(v(var::NET_FEAT), rax)?;
    a.mov(dword_ptr(rbx + reg::DRIVER_FEATURES_SEL), 0)?;
    a.mov(dword_ptr(rbx + reg::DRIVER_FEATURES), eax)?;
    a.mov(dword_ptr(rbx + reg::DRIVER_FEATURES_SEL), 1)?;
    a.mov(dword_ptr(rbx + reg::DRIVER_FEATURES), 1)?;
    a.mov(
        dword_ptr(rbx + reg::STATUS),
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK,
    )?;
    a.test(dword_ptr(rbx + reg::STATUS), S_FEATURES_OK)?;
    a.jz(err_features)?;

    // Clear the driver's memory, then build the descriptor tables.
    a.mov(rdi, NET_MEM)?;
    a.mov(ecx, ((NET_MEM_END - NET_MEM) / 8) as u32)?;
    a.xor(eax, eax)?;
    a.rep().stosq()?;
    // Receive: descriptor i = buffer i, device-writable; all of them in the available ring.
    a.mov(rdi, NET_RXQ)?;
    a.mov(rdx, NET_RX_BUFS)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut rx_desc)?;
    a.mov(rax, rcx)?;
    a.shl(rax, 4)?;
    a.mov(qword_ptr(rdi + rax), rdx)?;
    a.mov(dword_ptr(rdi + rax + 8), NET_BUF_SIZE as i32)?;
    a.mov(word_ptr(rdi + rax + 12), VRING_DESC_F_WRITE)?;
    a.mov(word_ptr(rdi + rcx * 2 + (AVAIL + 4)), cx)?;
    a.add(rdx, NET_BUF_SIZE as i32)?;
    a.inc(ecx)?;
    a.cmp(ecx, NET_RX_SIZE as i32)?;
    a.jb(rx_desc)?;
    a.mov(word_ptr(rdi + (AVAIL + 2)), cx)?;
    a.mov(v(var::RX_AVAIL), rcx)?;
    a.mov(v(var::RX_USED), 0)?;
    // Transmit: descriptor i = buffer i (length set per frame).
    a.mov(rdi, NET_TXQ)?;
    a.mov(rdx, NET_TX_BUFS)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut tx_desc)?;
    a.mov(rax, rcx)?;
    a.shl(rax, 4)?;
    a.mov(qword_ptr(rdi + rax), rdx)?;
    a.add(rdx, NET_BUF_SIZE as i32)?;
    a.inc(ecx)?;
    a.cmp(ecx, NET_TX_SIZE as i32)?;
    a.jb(tx_desc)?;
    a.mov(v(var::TX_AVAIL), 0)?;
    // Control: descriptor 0 = the request (class, cmd), chained to descriptor 1 = the ack.
    a.mov(rdi, NET_CTRLQ)?;
    a.mov(rax, NET_CTRL_BUF)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(dword_ptr(rdi + 8), 2)?;
    a.mov(word_ptr(rdi + 12), VRING_DESC_F_NEXT)?;
    a.mov(word_ptr(rdi + 14), 1)?;
    a.add(rax, 0x10)?;
    a.mov(qword_ptr(rdi + 16), rax)?;
    a.mov(dword_ptr(rdi + 24), 1)?;
    a.mov(word_ptr(rdi + 28), VRING_DESC_F_WRITE)?;
    a.mov(v(var::CTRL_AVAIL), 0)?;

    for (q, base, size) in [
        (0, NET_RXQ, NET_RX_SIZE),
        (1, NET_TXQ, NET_TX_SIZE),
        (2, NET_CTRLQ, NET_CTRL_SIZE),
    ] {
        if q == 2 {
            a.test(v(var::NET_FEAT), F_CTRL_VQ)?;
            a.jz(no_ctrl)?;
        }
        a.mov(ecx, q as u32)?;
        a.mov(edx, size as u32)?;
        a.mov(r8, base)?;
        a.call(l.n.setup_queue)?;
        a.test(eax, eax)?;
        a.jz(err_queue)?;
    }
    a.set_label(&mut no_ctrl)?;

    // The MAC from config space (byte accesses).
    for i in 0..6 {
        a.mov(al, byte_ptr(rbx + (reg::CONFIG_MAC + i)))?;
        a.mov(byte_ptr(r15 + (var::NET_MAC + i)), al)?;
    }
    a.mov(dword_ptr(rbx + reg::QUEUE_NOTIFY), 0)?; // receive buffers posted
    a.mov(
        dword_ptr(rbx + reg::STATUS),
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    )?;
    a.mov(v(var::NET_ON), 1)?;

    // NET up mac=<xx:..> ip=<a.b.c.d>
    print_str(a, l, l.n.s_net_up)?;
    a.xor(r9d, r9d)?;
    a.set_label(&mut mac)?;
    a.mov(al, byte_ptr(r15 + r9 + var::NET_MAC))?;
    a.call(l.n.put_hex2)?;
    a.inc(r9d)?;
    a.cmp(r9d, 6)?;
    a.je(mac_done)?;
    a.set_label(&mut mac_sep)?;
    print_char(a, l, b':')?;
    a.jmp(mac)?;
    a.set_label(&mut mac_done)?;
    print_str(a, l, l.n.s_ip)?;
    a.call(l.n.put_ip)?;
    print_char(a, l, b'\n')?;
    a.ret()?;

    for (label, s, device_answered) in [
        (&mut err_magic, l.n.s_err_magic, false),
        (&mut err_version, l.n.s_err_version, false),
        (&mut err_device, l.n.s_err_device, false),
        (&mut err_features, l.n.s_err_features, true),
        (&mut err_queue, l.n.s_err_queue, true),
    ] {
        a.set_label(label)?;
        if device_answered {
            a.mov(dword_ptr(rbx + reg::STATUS), S_FAILED)?;
        }
        print_str(a, l, s)?;
        a.jmp(failed)?;
    }
    a.set_label(&mut failed)?;
    a.mov(v(var::NET_ON), 0)?;
    a.ret()?;

    // setup_queue: ecx = queue, edx = size, r8 = descriptor table (available ring at +0x1000,
    // used ring at +0x2000), rbx = window. Returns eax = 1, or 0 if the queue is too small.
    {
        let mut small = a.create_label();
        a.set_label(&mut l.n.setup_queue)?;
        a.mov(dword_ptr(rbx + reg::QUEUE_SEL), ecx)?;
        a.cmp(dword_ptr(rbx + reg::QUEUE_NUM_MAX), edx)?;
        a.jb(small)?;
        a.mov(dword_ptr(rbx + reg::QUEUE_NUM), edx)?;
        for (lo, hi, off) in [
            (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, 0),
            (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, AVAIL),
            (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, USED),
        ] {
            a.lea(rax, ptr(r8 + off))?;
            a.mov(dword_ptr(rbx + lo), eax)?;
            a.shr(rax, 32)?;
            a.mov(dword_ptr(rbx + hi), eax)?;
        }
        a.mov(dword_ptr(rbx + reg::QUEUE_READY), 1)?;
        a.mov(eax, 1u32)?;
        a.ret()?;
        a.set_label(&mut small)?;
        a.xor(eax, eax)?;
        a.ret()?;
    }
    Ok(())
}

/// `net_rx`: processes the receive queue's new used entries (at most one queue's worth),
/// answers what needs an answer, re-posts each buffer, and notifies the device if it wants
/// notifications. Clobbers rax, rbx, rcx, rdx, rsi, rdi, r8 - r12.
fn rx(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), Error> {
    let mut top = a.create_label();
    let mut done = a.create_label();
    let mut bad_id = a.create_label();
    let mut no_notify = a.create_label();
    a.set_label(&mut l.n.net_rx)?;
    a.mov(r12d, RX_BATCH as u32)?;
    a.set_label(&mut top)?;
    a.mov(rbx, NET_RXQ)?;
    a.mov(ax, word_ptr(rbx + (USED + 2)))?;
    a.cmp(ax, word_ptr(r15 + var::RX_USED))?;
    a.je(done)?;
    a.movzx(edx, word_ptr(r15 + var::RX_USED))?;
    a.and(edx, (NET_RX_SIZE - 1) as i32)?;
    a.mov(r8d, dword_ptr(rbx + rdx * 8 + (USED + 4)))?; // id
    a.mov(r9d, dword_ptr(rbx + rdx * 8 + (USED + 8)))?; // len
    a.inc(word_ptr(r15 + var::RX_USED))?;
    a.cmp(r8d, NET_RX_SIZE as i32)?;
    a.jae(bad_id)?;
    a.inc(v(var::RX_FRAMES))?;
    a.push(r8)?;
    a.call(l.n.handle_frame)?;
    a.pop(r8)?;
    // Re-post the buffer.
    a.mov(rbx, NET_RXQ)?;
    a.movzx(ecx, word_ptr(r15 + var::RX_AVAIL))?;
    a.mov(edx, ecx)?;
    a.and(edx, (NET_RX_SIZE - 1) as i32)?;
    a.mov(word_ptr(rbx + rdx * 2 + (AVAIL + 4)), r8w)?;
    a.inc(ecx)?;
    a.mov(word_ptr(rbx + (AVAIL + 2)), cx)?;
    a.mov(word_ptr(r15 + var::RX_AVAIL), cx)?;
    a.set_label(&mut bad_id)?;
    a.dec(r12d)?;
    a.jnz(top)?;
    a.set_label(&mut done)?;
    a.mov(rbx, NET_RXQ)?;
    a.test(word_ptr(rbx + USED), VRING_USED_F_NO_NOTIFY)?;
    a.jnz(no_notify)?;
    a.mov(rax, v(var::NET_BASE))?;
    a.mov(dword_ptr(rax + reg::QUEUE_NOTIFY), 0)?;
    a.set_label(&mut no_notify)?;
    a.ret()?;
    Ok(())
}

/// `handle_frame`: r8 = receive descriptor id (< queue size), r9 = bytes the device wrote.
/// Answers an ARP request for the guest's address and an ICMP echo request to it; ignores
/// everything else. Clobbers rax, rcx, rdx, rsi, rdi, r8 - r11.
fn frame(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), Error> {
    let mut ignore = a.create_label();
    let mut arp = a.create_label();
    let mut ipv4 = a.create_label();
    a.set_label(&mut l.n.handle_frame)?;
    a.cmp(r9d, HDR + 14)?;
    a.jb(ignore)?;
    a.cmp(r9d, NET_BUF_SIZE as i32)?;
    a.ja(ignore)?;
    a.sub(r9d, HDR)?; // frame length
    a.shl(r8, BUF_SHIFT)?;
    a.mov(rsi, NET_RX_BUFS + HDR as u64)?;
    a.add(rsi, r8)?; // the frame
    a.movzx(eax, word_ptr(rsi + 12))?; // EtherType (big endian)
    a.cmp(eax, 0x0608)?;
    a.je(arp)?;
    a.cmp(eax, 0x0008)?;
    a.je(ipv4)?;
    a.set_label(&mut ignore)?;
    a.ret()?;

    // ARP request (Ethernet, IPv4) for our address, from another address → ARP reply.
    a.set_label(&mut arp)?;
    a.cmp(r9d, 42)?;
    a.jb(ignore)?;
    a.cmp(dword_ptr(rsi + 14), 0x0008_0100)?; // htype 1, ptype 0x0800
    a.jne(ignore)?;
    a.cmp(dword_ptr(rsi + 18), 0x0100_0406)?; // hlen 6, plen 4, oper 1
    a.jne(ignore)?;
    a.mov(eax, dword_ptr(r15 + var::NET_IP))?;
    a.cmp(eax, dword_ptr(rsi + 38))?;
    a.jne(ignore)?;
    // A gratuitous ARP for our address (sender IP = ours: e.g. the VMM's announce on our
    // behalf, queued at a destination's TAP before we ran there) is news, not a question:
    // answering it would move the switch's idea of where we are.
    a.cmp(eax, dword_ptr(rsi + 28))?;
    a.je(ignore)?;
    a.call(l.n.tx_alloc)?;
    a.jc(ignore)?;
    copy_mac(
        a,
        dword_ptr(rdi),
        word_ptr(rdi + 4),
        dword_ptr(rsi + 22),
        word_ptr(rsi + 26),
    )?;
    put_my_mac(a, dword_ptr(rdi + 6), word_ptr(rdi + 10))?;
    a.mov(word_ptr(rdi + 12), 0x0608)?;
    a.mov(dword_ptr(rdi + 14), 0x0008_0100)?;
    a.mov(dword_ptr(rdi + 18), 0x0200_0406)?; // oper 2
    put_my_mac(a, dword_ptr(rdi + 22), word_ptr(rdi + 26))?;
    a.mov(eax, dword_ptr(r15 + var::NET_IP))?;
    a.mov(dword_ptr(rdi + 28), eax)?;
    copy_mac(
        a,
        dword_ptr(rdi + 32),
        word_ptr(rdi + 36),
        dword_ptr(rsi + 22),
        word_ptr(rsi + 26),
    )?;
    a.mov(eax, dword_ptr(rsi + 28))?;
    a.mov(dword_ptr(rdi + 38), eax)?;
    a.mov(ecx, 42u32)?;
    a.jmp(l.n.tx_send)?;

    // IPv4 ICMP echo request to our address, not fragmented → echo reply (same TTL, so the IP
    // checksum does not change; the ICMP checksum is updated incrementally, RFC 1624).
    a.set_label(&mut ipv4)?;
    a.cmp(r9d, 14 + 20 + 8)?;
    a.jb(ignore)?;
    a.movzx(eax, byte_ptr(rsi + 14))?;
    a.mov(r10d, eax)?;
    a.shr(eax, 4)?;
    a.cmp(eax, 4)?;
    a.jne(ignore)?;
    a.and(r10d, 15)?;
    a.cmp(r10d, 5)?;
    a.jb(ignore)?;
    a.shl(r10d, 2)?; // IP header length
    a.cmp(byte_ptr(rsi + 23), 1)?; // ICMP
    a.jne(ignore)?;
    a.mov(eax, dword_ptr(r15 + var::NET_IP))?;
    a.cmp(eax, dword_ptr(rsi + 30))?;
    a.jne(ignore)?;
    a.test(word_ptr(rsi + 20), 0xff3f)?; // MF, fragment offset
    a.jnz(ignore)?;
    a.movzx(edx, word_ptr(rsi + 16))?;
    a.rol(dx, 8)?; // IP total length
    a.lea(eax, ptr(r10 + 8))?;
    a.cmp(edx, eax)?;
    a.jb(ignore)?;
    a.add(edx, 14)?; // frame length to send
    a.cmp(edx, r9d)?;
    a.ja(ignore)?;
    a.lea(r11, ptr(rsi + r10 + 14))?; // ICMP header
    a.cmp(word_ptr(r11), 0x0008)?; // type 8, code 0
    a.jne(ignore)?;
    a.call(l.n.tx_alloc)?;
    a.jc(ignore)?;
    a.push(rdi)?;
    a.push(rsi)?;
    a.mov(ecx, edx)?;
    a.rep().movsb()?;
    a.pop(rsi)?;
    a.pop(rdi)?;
    copy_mac(
        a,
        dword_ptr(rdi),
        word_ptr(rdi + 4),
        dword_ptr(rsi + 6),
        word_ptr(rsi + 10),
    )?;
    put_my_mac(a, dword_ptr(rdi + 6), word_ptr(rdi + 10))?;
    a.mov(eax, dword_ptr(rsi + 26))?;
    a.mov(dword_ptr(rdi + 30), eax)?;
    a.mov(eax, dword_ptr(rsi + 30))?;
    a.mov(dword_ptr(rdi + 26), eax)?;
    a.lea(r11, ptr(rdi + r10 + 14))?;
    a.mov(byte_ptr(r11), 0)?; // echo reply
                              // HC' = ~(~HC + ~m + m') with m = 0x0800 (type 8, code 0) and m' = 0, in the byte order
                              // of memory (one's complement sums do not depend on it): ~m = 0xfff7 little endian.
    a.movzx(eax, word_ptr(r11 + 2))?;
    a.not(eax)?;
    a.and(eax, 0xffff)?;
    a.add(eax, 0xfff7)?;
    for _ in 0..2 {
        a.mov(r8d, eax)?;
        a.shr(r8d, 16)?;
        a.and(eax, 0xffff)?;
        a.add(eax, r8d)?;
    }
    a.not(eax)?;
    a.mov(word_ptr(r11 + 2), ax)?;
    a.mov(ecx, edx)?;
    a.jmp(l.n.tx_send)?;
    Ok(())
}

/// `tx_alloc`: the next transmit buffer, if the device has given it back. Returns CF clear and
/// rdi = where the frame goes (after the zeroed header), or CF set (and counts a drop).
/// Clobbers rax, rcx, rdi. `tx_send`: rdi as returned by `tx_alloc`, ecx = frame length
/// (zero-padded to 60): queues it and notifies the device. Clobbers rax, rcx, rdx, rdi,
/// r8, r9.
fn tx(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), Error> {
    {
        let mut full = a.create_label();
        a.set_label(&mut l.n.tx_alloc)?;
        a.mov(rdi, NET_TXQ)?;
        a.mov(ax, word_ptr(r15 + var::TX_AVAIL))?;
        a.sub(ax, word_ptr(rdi + (USED + 2)))?;
        a.cmp(ax, NET_TX_SIZE as i32)?;
        a.jae(full)?;
        a.movzx(ecx, word_ptr(r15 + var::TX_AVAIL))?;
        a.and(ecx, (NET_TX_SIZE - 1) as i32)?;
        a.shl(ecx, BUF_SHIFT)?;
        a.mov(rdi, NET_TX_BUFS)?;
        a.add(rdi, rcx)?;
        a.mov(qword_ptr(rdi), 0)?;
        a.mov(dword_ptr(rdi + 8), 0)?;
        a.add(rdi, HDR)?;
        a.clc()?;
        a.ret()?;
        a.set_label(&mut full)?;
        a.inc(v(var::TX_DROP))?;
        a.stc()?;
        a.ret()?;
    }
    {
        let mut long = a.create_label();
        a.set_label(&mut l.n.tx_send)?;
        a.cmp(ecx, ETH_MIN)?;
        a.jae(long)?;
        a.push(rdi)?;
        a.add(rdi, rcx)?;
        a.neg(ecx)?;
        a.add(ecx, ETH_MIN)?;
        a.xor(eax, eax)?;
        a.rep().stosb()?;
        a.pop(rdi)?;
        a.mov(ecx, ETH_MIN as u32)?;
        a.set_label(&mut long)?;
        a.mov(r8, NET_TXQ)?;
        a.movzx(eax, word_ptr(r15 + var::TX_AVAIL))?;
        a.mov(edx, eax)?;
        a.and(edx, (NET_TX_SIZE - 1) as i32)?;
        a.mov(r9d, edx)?;
        a.shl(r9d, 4)?;
        a.add(ecx, HDR)?;
        a.mov(dword_ptr(r8 + r9 + 8), ecx)?;
        a.mov(word_ptr(r8 + rdx * 2 + (AVAIL + 4)), dx)?;
        a.inc(eax)?;
        a.mov(word_ptr(r8 + (AVAIL + 2)), ax)?;
        a.mov(word_ptr(r15 + var::TX_AVAIL), ax)?;
        a.mov(rax, v(var::NET_BASE))?;
        a.mov(dword_ptr(rax + reg::QUEUE_NOTIFY), 1)?;
        a.inc(v(var::TX_FRAMES))?;
        a.ret()?;
    }
    Ok(())
}

/// `net_config`: if GUEST_ANNOUNCE was negotiated (with the control queue) and the device
/// sets the announce bit in the config `status`, and no announce ack is still in flight:
/// sends one gratuitous ARP and acks on the control queue (`VIRTIO_NET_CTRL_ANNOUNCE`,
/// `ACK`). Clobbers rax, rbx, rcx, rdx, rdi, r8, r9.
fn config(a: &mut CodeAssembler, l: &mut Labels) -> Result<(), Error> {
    let mut done = a.create_label();
    a.set_label(&mut l.n.net_config)?;
    a.mov(rax, v(var::NET_FEAT))?;
    a.and(eax, F_CTRL_VQ | F_GUEST_ANNOUNCE)?;
    a.cmp(eax, F_CTRL_VQ | F_GUEST_ANNOUNCE)?;
    a.jne(done)?;
    a.mov(rbx, v(var::NET_BASE))?;
    a.movzx(eax, word_ptr(rbx + reg::CONFIG_STATUS))?;
    a.test(eax, NET_S_ANNOUNCE)?;
    a.jz(done)?;
    a.mov(rdi, NET_CTRLQ)?;
    a.mov(ax, word_ptr(rdi + (USED + 2)))?;
    a.cmp(ax, word_ptr(r15 + var::CTRL_AVAIL))?;
    a.jne(done)?; // the previous ack is still with the device
    a.call(l.n.tx_alloc)?;
    a.jc(done)?; // no transmit buffer: try again at the next heartbeat
                 // Gratuitous ARP: broadcast ARP request, sender = target = our address.
    a.mov(dword_ptr(rdi), -1)?;
    a.mov(word_ptr(rdi + 4), -1)?;
    put_my_mac(a, dword_ptr(rdi + 6), word_ptr(rdi + 10))?;
    a.mov(word_ptr(rdi + 12), 0x0608)?;
    a.mov(dword_ptr(rdi + 14), 0x0008_0100)?;
    a.mov(dword_ptr(rdi + 18), 0x0100_0406)?;
    put_my_mac(a, dword_ptr(rdi + 22), word_ptr(rdi + 26))?;
    a.mov(eax, dword_ptr(r15 + var::NET_IP))?;
    a.mov(dword_ptr(rdi + 28), eax)?;
    a.mov(dword_ptr(rdi + 32), 0)?;
    a.mov(word_ptr(rdi + 36), 0)?;
    a.mov(dword_ptr(rdi + 38), eax)?;
    a.mov(ecx, 42u32)?;
    a.call(l.n.tx_send)?;
    // The ack: [class 3, cmd 0] then the device-writable ack byte.
    a.mov(rdi, NET_CTRL_BUF)?;
    a.mov(word_ptr(rdi), 0x0003)?;
    a.mov(byte_ptr(rdi + 0x10), 0xff)?;
    a.mov(rdi, NET_CTRLQ)?;
    a.movzx(eax, word_ptr(r15 + var::CTRL_AVAIL))?;
    a.mov(edx, eax)?;
    a.and(edx, (NET_CTRL_SIZE - 1) as i32)?;
    a.mov(word_ptr(rdi + rdx * 2 + (AVAIL + 4)), 0)?;
    a.inc(eax)?;
    a.mov(word_ptr(rdi + (AVAIL + 2)), ax)?;
    a.mov(word_ptr(r15 + var::CTRL_AVAIL), ax)?;
    a.mov(dword_ptr(rbx + reg::QUEUE_NOTIFY), 2)?;
    a.inc(v(var::ANNOUNCES))?;
    print_str(a, l, l.n.s_garp)?;
    a.set_label(&mut done)?;
    a.ret()?;
    Ok(())
}
