//! `cpl0=1`: the guest's program runs at CPL0 (kernel mode, as a real guest kernel's code does)
//! instead of CPL3. Under PVM that code runs in KVM's instruction emulator, which is what the
//! mode is for: a migration test of a guest that is mid-emulation when it is paused.

use iced_x86::code_asm::*;

use crate::Error;

/// `cpl0` as a little-endian dword, and `=1` as a word.
const KEY: u32 = u32::from_le_bytes(*b"cpl0");
const VALUE: u32 = u16::from_le_bytes(*b"=1") as u32;

/// The boot processor's CPL0 scan of the Multiboot command line for the token `cpl0=1` (a
/// whole token: at the start or after a byte `<= ' '`, and followed by one). `rdi` = the
/// Multiboot info; falls through when the token is there, else jumps to `to_user`. About
/// seven emulated instructions per command-line byte. Clobbers eax, ecx, esi.
pub(super) fn scan_cmdline(a: &mut CodeAssembler, to_user: CodeLabel) -> Result<(), Error> {
    let (mut scan, mut next, mut found) = (a.create_label(), a.create_label(), a.create_label());
    a.test(byte_ptr(rdi), 4)?; // flags bit 2: cmdline valid
    a.jz(to_user)?;
    a.mov(esi, dword_ptr(rdi + 16))?;
    a.test(esi, esi)?;
    a.jz(to_user)?;
    a.mov(ecx, 0x20u32)?; // the byte before the first one: a separator
    a.set_label(&mut scan)?;
    a.cmp(cl, 0x20)?;
    a.ja(next)?;
    a.cmp(dword_ptr(rsi), KEY)?;
    a.jne(next)?;
    a.cmp(word_ptr(rsi + 4), VALUE)?;
    a.jne(next)?;
    a.cmp(byte_ptr(rsi + 6), 0x20)?;
    a.jbe(found)?;
    a.set_label(&mut next)?;
    a.mov(cl, byte_ptr(rsi))?;
    a.test(cl, cl)?;
    a.jz(to_user)?;
    a.inc(rsi)?;
    a.jmp(scan)?;
    a.set_label(&mut found)?;
    Ok(())
}

/// Sets `KMODE` (at `[r15 + kmode]`) to 1 when the program runs at CPL0. Clobbers rax.
pub(super) fn record(a: &mut CodeAssembler, kmode: i32) -> Result<(), Error> {
    a.xor(eax, eax)?;
    a.mov(ax, cs)?;
    a.test(al, 3)?;
    a.setz(al)?;
    a.movzx(eax, al)?;
    a.mov(qword_ptr(r15 + kmode), rax)?;
    Ok(())
}

/// Loads `rax` with the privilege level the program runs at (CS's low two bits).
pub(super) fn current_cpl(a: &mut CodeAssembler) -> Result<(), Error> {
    a.xor(eax, eax)?;
    a.mov(ax, cs)?;
    a.and(eax, 3)?;
    Ok(())
}
