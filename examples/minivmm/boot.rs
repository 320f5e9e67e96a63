//! A minimal Multiboot v1 loader: enough for an ELF32 kernel whose
//! `PT_LOAD` segments lie in RAM (the test guest). It copies each segment's
//! file bytes to its physical address (the rest of the segment is left as
//! the fresh memfd gives it: zero), writes the Multiboot information
//! structure (memory sizes and command line only) below 64 KiB, and sets the
//! boot vCPU to the Multiboot hand-off state.

use kvm_bindings::kvm_segment;
use kvm_ioctls::VcpuFd;

use crate::ram::{Ram, RamError};

/// `EAX` at the kernel's entry.
const BOOTLOADER_MAGIC: u64 = 0x2BAD_B002;
/// Where the Multiboot information structure goes.
const INFO_ADDR: u64 = 0x9000;
/// Where the command line goes (NUL-terminated, at most `MAX_CMDLINE` bytes).
const CMDLINE_ADDR: u64 = 0xa000;
const MAX_CMDLINE: usize = 4095;
/// Info flags: bit 0 mem_lower/mem_upper, bit 2 cmdline.
const INFO_FLAGS: u32 = 1 | 4;
const PT_LOAD: u32 = 1;

/// Errors loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The image is not a little-endian ELF32 executable we can load.
    #[error("kernel image: {0}")]
    Image(String),
    /// Writing guest memory failed (segment outside RAM).
    #[error(transparent)]
    Memory(#[from] RamError),
    /// Setting the vCPU registers failed.
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, BootError> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| BootError::Image(format!("truncated at {off}")))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BootError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| BootError::Image(format!("truncated at {off}")))
}

/// Loads `image` into `mem` with `cmdline`; returns the entry point.
pub fn load(mem: &Ram, image: &[u8], cmdline: &str, ram_size: u64) -> Result<u32, BootError> {
    if image.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 1, 1][..]) {
        return Err(BootError::Image("not a little-endian ELF32 file".into()));
    }
    let entry = u32_at(image, 24)?;
    let phoff = u32_at(image, 28)? as usize;
    let phentsize = usize::from(u16_at(image, 42)?);
    for i in 0..usize::from(u16_at(image, 44)?) {
        let ph = phoff + i * phentsize;
        if u32_at(image, ph)? != PT_LOAD {
            continue;
        }
        let (offset, paddr) = (u32_at(image, ph + 4)? as usize, u32_at(image, ph + 12)?);
        let filesz = u32_at(image, ph + 16)? as usize;
        let bytes = image
            .get(offset..offset + filesz)
            .ok_or_else(|| BootError::Image(format!("segment {i} outside the file")))?;
        let at = u64::from(paddr);
        mem.write(at, bytes)?;
    }
    write_info(mem, cmdline, ram_size)?;
    Ok(entry)
}

fn write_info(mem: &Ram, cmdline: &str, ram_size: u64) -> Result<(), BootError> {
    let mut cmd = cmdline.as_bytes()[..cmdline.len().min(MAX_CMDLINE)].to_vec();
    cmd.push(0);
    let mem_upper_kib = (ram_size.saturating_sub(1 << 20) >> 10) as u32;
    let mut info = [0u8; 20];
    for (i, v) in [INFO_FLAGS, 640, mem_upper_kib, 0, CMDLINE_ADDR as u32]
        .iter()
        .enumerate()
    {
        info[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    mem.write(CMDLINE_ADDR, &cmd)?;
    Ok(mem.write(INFO_ADDR, &info)?)
}

/// Sets `fd` to the Multiboot hand-off state: flat 32-bit protected mode,
/// paging off, `EAX` = magic, `EBX` = the info structure, `EIP` = `entry`.
pub fn set_entry_state(fd: &VcpuFd, entry: u32) -> Result<(), BootError> {
    let mut sregs = fd
        .get_sregs()
        .map_err(|e| BootError::Kvm("KVM_GET_SREGS", e))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb,
        present: 1,
        s: 1,
        db: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        ..code
    };
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer) = (0x11, 0, 0, 0);
    fd.set_sregs(&sregs)
        .map_err(|e| BootError::Kvm("KVM_SET_SREGS", e))?;
    let mut regs = fd
        .get_regs()
        .map_err(|e| BootError::Kvm("KVM_GET_REGS", e))?;
    regs.rip = u64::from(entry);
    regs.rax = BOOTLOADER_MAGIC;
    regs.rbx = INFO_ADDR;
    regs.rflags = 0x2;
    fd.set_regs(&regs)
        .map_err(|e| BootError::Kvm("KVM_SET_REGS", e))
}
