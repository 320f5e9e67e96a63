//! A Multiboot v1 kernel loader, behaving as QEMU's `-kernel` does for
//! Multiboot images.
//!
//! [`load`] finds the Multiboot header (magic `0x1BADB002`, 4-byte aligned,
//! within the first 8 KiB of the image), loads the kernel either through the
//! header's a.out kludge (flags bit 16) or as a 32-bit ELF executable, and
//! builds the Multiboot information structure in low memory: memory sizes,
//! the command line, a memory map and the boot loader name.
//!
//! Every offset and size taken from the image is bounds-checked against the
//! image and every load range against guest memory, so a malformed image
//! gives a [`MultibootError`], never a panic. All writes go through
//! vm-memory's [`Bytes`] methods, so they are recorded in the dirty bitmap.
//!
//! # Machine state at the entry point
//!
//! The loader only fills guest memory. Before running the vCPU the VMM must
//! set the state the Multiboot specification (section 3.2) promises:
//!
//! * 32-bit protected mode with paging off: `CR0 = PE | ET` (`0x11`),
//!   `CR3`/`CR4`/`EFER` zero;
//! * `CS`: flat 4 GiB code segment, base 0, limit `0xffff_ffff`, type `0xb`
//!   (execute/read, accessed), `s = 1`, `present = 1`, `dpl = 0`, `db = 1`,
//!   `g = 1`, selector for example `0x08`;
//! * `DS`, `ES`, `FS`, `GS`, `SS`: flat 4 GiB data segments, base 0, limit
//!   `0xffff_ffff`, type `0x3` (read/write, accessed), `s = 1`,
//!   `present = 1`, `db = 1`, `g = 1`, selector for example `0x10`;
//! * `EFLAGS = 0x2` (interrupts off, bit 1 reserved set);
//! * `EAX = 0x2BADB002` ([`BOOTLOADER_MAGIC`]);
//! * `EBX = ` [`LoadedKernel::info_addr`] (physical address of the info
//!   structure);
//! * `EIP = ` [`LoadedKernel::entry`];
//! * `ESP` undefined: the kernel sets up its own stack.
//!
//! # Low-memory layout
//!
//! The information structure and everything it points to live in
//! `[0x9000, 0xb000)`: the structure at `0x9000`, the boot loader name at
//! `0x9080`, the memory map from `0x9100` and the command line at `0xa000`.
//! A kernel segment overlapping that area is refused.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion};

use livemig::memory::GuestRam;

/// The value the boot loader leaves in `EAX` at the kernel entry point.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;

/// The Multiboot v1 header magic.
const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// The header must start within this many bytes of the image.
const SEARCH_LEN: usize = 8192;
/// Header flags bits 0-15 are required features; these are the ones we know:
/// 0 (page-align modules: we load none), 1 (memory info: always given),
/// 2 (video mode: ignored, as QEMU does).
const KNOWN_REQUIRED_FLAGS: u32 = 0b111;
/// Mask of the required-feature flag bits.
const REQUIRED_FLAGS_MASK: u32 = 0xffff;
/// Header flag: the video mode fields are valid (ignored).
const FLAG_VIDEO_MODE: u32 = 1 << 2;
/// Header flag: the a.out kludge address fields are valid.
const FLAG_AOUT_KLUDGE: u32 = 1 << 16;

/// Info flag: `mem_lower` / `mem_upper` are valid.
const INFO_MEM: u32 = 1 << 0;
/// Info flag: `cmdline` is valid.
const INFO_CMDLINE: u32 = 1 << 2;
/// Info flag: `mmap_length` / `mmap_addr` are valid.
const INFO_MMAP: u32 = 1 << 6;
/// Info flag: `boot_loader_name` is valid.
const INFO_BOOT_LOADER_NAME: u32 = 1 << 9;

/// Where the information structure goes.
const INFO_ADDR: u64 = 0x9000;
/// Size of the Multiboot v1 information structure (up to the framebuffer fields).
const INFO_SIZE: usize = 116;
/// Where the boot loader name goes.
const LOADER_NAME_ADDR: u64 = 0x9080;
/// The boot loader name, NUL-terminated.
const LOADER_NAME: &[u8] = b"livemig-refvmm\0";
/// Where the memory map goes.
const MMAP_ADDR: u64 = 0x9100;
/// Where the command line goes (and where the memory map must end).
const CMDLINE_ADDR: u64 = 0xa000;
/// End of the area holding the information structure and its data.
const INFO_AREA_END: u64 = 0xb000;
/// Longest command line accepted, without its terminating NUL.
const MAX_CMDLINE: usize = 4095;
/// Size of one memory map entry, including its leading `size` field.
const MMAP_ENTRY_SIZE: u64 = 24;
/// Most memory map entries that fit between [`MMAP_ADDR`] and [`CMDLINE_ADDR`].
const MAX_MMAP_ENTRIES: usize = ((CMDLINE_ADDR - MMAP_ADDR) / MMAP_ENTRY_SIZE) as usize;

/// Memory map type: usable RAM.
const MMAP_AVAILABLE: u32 = 1;
/// Memory map type: reserved.
const MMAP_RESERVED: u32 = 2;
/// End of conventional low memory reported usable.
const LOW_USABLE_END: u64 = 0x9fc00;
/// End of low memory (start of the VGA hole).
const LOW_MEM_END: u64 = 0xa0000;
/// Start of the BIOS area reported reserved.
const BIOS_START: u64 = 0xf0000;
/// Start of high memory.
const HIGH_MEM_START: u64 = 0x10_0000;
/// `mem_lower`, in KiB.
const MEM_LOWER_KIB: u32 = 640;

/// ELF: size of the ELF32 file header.
const ELF32_EHDR_SIZE: usize = 52;
/// ELF: size of one ELF32 program header.
const ELF32_PHDR_SIZE: usize = 32;
/// ELF: `EI_CLASS` value of a 32-bit image.
const ELFCLASS32: u8 = 1;
/// ELF: `EI_CLASS` value of a 64-bit image.
const ELFCLASS64: u8 = 2;
/// ELF: `EI_DATA` value of a little-endian image.
const ELFDATA2LSB: u8 = 1;
/// ELF: executable file type.
const ET_EXEC: u16 = 2;
/// ELF: Intel 80386 machine.
const EM_386: u16 = 3;
/// ELF: loadable segment.
const PT_LOAD: u32 = 1;
/// ELF: executable segment flag.
const PF_X: u32 = 1;

/// Size of the zero buffer used to clear bss.
const ZERO_CHUNK: usize = 64 * 1024;

/// Errors loading a Multiboot kernel.
#[derive(Debug, thiserror::Error)]
pub enum MultibootError {
    /// No Multiboot header in the image.
    #[error("no Multiboot v1 header (magic 0x1BADB002) in the first 8 KiB")]
    NotMultiboot,
    /// A header magic was found but its checksum is wrong.
    #[error(
        "Multiboot header at file offset {offset:#x}: checksum {checksum:#010x} is wrong for \
         flags {flags:#010x} (magic + flags + checksum must be 0 mod 2^32)"
    )]
    BadChecksum {
        /// File offset of the header.
        offset: usize,
        /// The header's flags.
        flags: u32,
        /// The header's checksum.
        checksum: u32,
    },
    /// The header requires features this loader does not provide.
    #[error(
        "Multiboot header flags {flags:#010x} require unsupported features (unknown required \
         bits {unknown:#06x})"
    )]
    UnsupportedFlags {
        /// The header's flags.
        flags: u32,
        /// The required bits (0-15) this loader does not know.
        unknown: u32,
    },
    /// The a.out kludge address fields are inconsistent.
    #[error("invalid Multiboot a.out kludge header: {reason}")]
    BadAoutHeader {
        /// What is wrong.
        reason: String,
    },
    /// The image ends before something it describes.
    #[error("truncated kernel image: {what}")]
    Truncated {
        /// What is cut off.
        what: String,
    },
    /// Without the a.out kludge the image must be a 32-bit ELF.
    #[error(
        "not an ELF32 image, and the Multiboot header does not set the a.out kludge (flags bit 16)"
    )]
    NotElf32,
    /// A 64-bit ELF without the a.out kludge.
    #[error("ELF64 images are not Multiboot v1 kernels; give a 32-bit ELF")]
    Elf64,
    /// An ELF32 image this loader cannot load.
    #[error("unsupported ELF image: {reason}")]
    UnsupportedElf {
        /// What is unsupported.
        reason: String,
    },
    /// A kernel segment lies (partly) outside guest memory.
    #[error("kernel segment {start:#x}-{end:#x} does not fit in guest memory (size {mem:#x})")]
    DoesNotFit {
        /// First guest-physical byte of the segment.
        start: u64,
        /// One past the last guest-physical byte of the segment.
        end: u64,
        /// Total guest memory size in bytes.
        mem: u64,
    },
    /// A kernel segment overlaps the area holding the Multiboot information.
    #[error(
        "kernel segment {start:#x}-{end:#x} overlaps the Multiboot info area \
         {INFO_ADDR:#x}-{INFO_AREA_END:#x}"
    )]
    InfoOverlap {
        /// First guest-physical byte of the segment.
        start: u64,
        /// One past the last guest-physical byte of the segment.
        end: u64,
    },
    /// Guest memory does not cover the low 640 KiB.
    #[error(
        "guest memory does not cover low memory 0x0-{LOW_MEM_END:#x} needed for the Multiboot info"
    )]
    NoLowMemory,
    /// Too many guest memory regions for the memory map area.
    #[error("{entries} memory map entries do not fit in the Multiboot info area (at most {max})")]
    TooManyRegions {
        /// Entries needed.
        entries: usize,
        /// Entries that fit.
        max: usize,
    },
    /// The command line is too long.
    #[error("kernel command line is {len} bytes long; at most {max} are supported")]
    CmdlineTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Writing guest memory failed.
    #[error("writing guest memory: {0}")]
    Memory(#[from] GuestMemoryError),
}

/// Result of a successful [`load`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Guest-physical entry point (the initial `EIP`).
    pub entry: u32,
    /// Guest-physical address of the Multiboot information structure (the initial `EBX`).
    pub info_addr: u32,
    /// Highest guest-physical byte the kernel occupies (including bss), plus one.
    pub kernel_end: u64,
}

/// One range to load: `data` copied to `addr`, then zeroes up to `mem_size`.
struct Segment<'a> {
    addr: u64,
    data: &'a [u8],
    mem_size: u64,
}

/// What to load and where to start.
struct Plan<'a> {
    entry: u32,
    segments: Vec<Segment<'a>>,
}

/// Loads the Multiboot v1 kernel `image` into `mem` and builds the Multiboot
/// information structure with command line `cmdline`.
///
/// See the module documentation for the vCPU state the caller must set
/// before running the guest.
pub fn load(mem: &GuestRam, image: &[u8], cmdline: &str) -> Result<LoadedKernel, MultibootError> {
    if cmdline.len() > MAX_CMDLINE {
        return Err(MultibootError::CmdlineTooLong {
            len: cmdline.len(),
            max: MAX_CMDLINE,
        });
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(MultibootError::CmdlineNul);
    }
    if !mem.check_range(GuestAddress(0), LOW_MEM_END as usize) {
        return Err(MultibootError::NoLowMemory);
    }

    let (offset, flags) = find_header(image)?;
    let unknown = flags & REQUIRED_FLAGS_MASK & !KNOWN_REQUIRED_FLAGS;
    if unknown != 0 {
        return Err(MultibootError::UnsupportedFlags { flags, unknown });
    }
    if flags & FLAG_VIDEO_MODE != 0 {
        log::debug!("multiboot: kernel asks for a video mode; ignored (text console only)");
    }

    let plan = if flags & FLAG_AOUT_KLUDGE != 0 {
        plan_aout(image, offset)?
    } else {
        plan_elf(image)?
    };

    let mem_size: u64 = mem.iter().map(|r| r.len()).sum();
    let mut kernel_end = 0u64;
    for seg in plan.segments.iter().filter(|s| s.mem_size > 0) {
        // Both operands come from u32 fields, so this cannot overflow.
        let end = seg.addr + seg.mem_size;
        let fits = usize::try_from(seg.mem_size)
            .map(|len| mem.check_range(GuestAddress(seg.addr), len))
            .unwrap_or(false);
        if !fits {
            return Err(MultibootError::DoesNotFit {
                start: seg.addr,
                end,
                mem: mem_size,
            });
        }
        if seg.addr < INFO_AREA_END && end > INFO_ADDR {
            return Err(MultibootError::InfoOverlap {
                start: seg.addr,
                end,
            });
        }
        kernel_end = kernel_end.max(end);
    }

    let mmap = memory_map(mem)?;

    for seg in plan.segments.iter().filter(|s| s.mem_size > 0) {
        mem.write_slice(seg.data, GuestAddress(seg.addr))?;
        zero(
            mem,
            seg.addr + seg.data.len() as u64,
            seg.mem_size - seg.data.len() as u64,
        )?;
    }

    write_info(mem, cmdline, &mmap)?;

    Ok(LoadedKernel {
        entry: plan.entry,
        info_addr: INFO_ADDR as u32,
        kernel_end,
    })
}

/// Reads a little-endian `u16` at `off`, naming `what` if it is out of the image.
fn le16(image: &[u8], off: usize, what: &str) -> Result<u16, MultibootError> {
    let b = field(image, off, 2, what)?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

/// Reads a little-endian `u32` at `off`, naming `what` if it is out of the image.
fn le32(image: &[u8], off: usize, what: &str) -> Result<u32, MultibootError> {
    let b = field(image, off, 4, what)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The `len` bytes at `off`, or a truncation error naming `what`.
fn field<'a>(
    image: &'a [u8],
    off: usize,
    len: usize,
    what: &str,
) -> Result<&'a [u8], MultibootError> {
    off.checked_add(len)
        .and_then(|end| image.get(off..end))
        .ok_or_else(|| MultibootError::Truncated {
            what: format!(
                "{what} (file offset {off:#x}, {len:#x} bytes) is past the end of the {:#x}-byte file",
                image.len()
            ),
        })
}

/// Finds the first valid Multiboot header; returns its offset and flags.
fn find_header(image: &[u8]) -> Result<(usize, u32), MultibootError> {
    let limit = image.len().min(SEARCH_LEN);
    let mut bad_checksum = None;
    let mut off = 0usize;
    while off + 12 <= limit {
        let word =
            |o: usize| u32::from_le_bytes([image[o], image[o + 1], image[o + 2], image[o + 3]]);
        if word(off) == HEADER_MAGIC {
            let flags = word(off + 4);
            let checksum = word(off + 8);
            if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) == 0 {
                return Ok((off, flags));
            }
            // Like QEMU, keep looking: the magic may occur by chance in code.
            bad_checksum.get_or_insert(MultibootError::BadChecksum {
                offset: off,
                flags,
                checksum,
            });
        }
        off += 4;
    }
    Err(bad_checksum.unwrap_or(MultibootError::NotMultiboot))
}

/// Plans an a.out-kludge load from the header at `offset`.
fn plan_aout(image: &[u8], offset: usize) -> Result<Plan<'_>, MultibootError> {
    let what = "Multiboot a.out kludge address fields";
    let header_addr = le32(image, offset + 12, what)?;
    let load_addr = le32(image, offset + 16, what)?;
    let load_end_addr = le32(image, offset + 20, what)?;
    let bss_end_addr = le32(image, offset + 24, what)?;
    let entry = le32(image, offset + 28, what)?;
    let bad = |reason: String| MultibootError::BadAoutHeader { reason };

    let delta = header_addr.checked_sub(load_addr).ok_or_else(|| {
        bad(format!(
            "header_addr {header_addr:#x} is below load_addr {load_addr:#x}"
        ))
    })?;
    let text_offset = offset.checked_sub(delta as usize).ok_or_else(|| {
        bad(format!(
            "header_addr {header_addr:#x} - load_addr {load_addr:#x} is more than the header's \
             file offset {offset:#x}"
        ))
    })?;
    let load_size = if load_end_addr != 0 {
        let size = load_end_addr.checked_sub(load_addr).ok_or_else(|| {
            bad(format!(
                "load_end_addr {load_end_addr:#x} is below load_addr {load_addr:#x}"
            ))
        })?;
        size as usize
    } else {
        image.len() - text_offset
    };
    let load_end = u64::from(load_addr) + load_size as u64;
    if load_end > 1 << 32 {
        return Err(bad(format!(
            "{load_size:#x} bytes at {load_addr:#x} go past 4 GiB"
        )));
    }
    let data = field(
        image,
        text_offset,
        load_size,
        "a.out kludge text+data (load_addr..load_end_addr)",
    )?;
    let mem_size = if bss_end_addr != 0 {
        if u64::from(bss_end_addr) < load_end {
            return Err(bad(format!(
                "bss_end_addr {bss_end_addr:#x} is below the end of the loaded data {load_end:#x}"
            )));
        }
        u64::from(bss_end_addr - load_addr)
    } else {
        load_size as u64
    };
    if mem_size == 0 {
        return Err(bad("nothing to load (empty text and no bss)".to_string()));
    }
    Ok(Plan {
        entry,
        segments: vec![Segment {
            addr: u64::from(load_addr),
            data,
            mem_size,
        }],
    })
}

/// Plans an ELF32 load (every `PT_LOAD` at its physical address).
fn plan_elf(image: &[u8]) -> Result<Plan<'_>, MultibootError> {
    let ident = field(image, 0, 16, "ELF identification").map_err(|_| MultibootError::NotElf32)?;
    if &ident[0..4] != b"\x7fELF" {
        return Err(MultibootError::NotElf32);
    }
    match ident[4] {
        ELFCLASS32 => {}
        ELFCLASS64 => return Err(MultibootError::Elf64),
        _ => return Err(MultibootError::NotElf32),
    }
    let unsupported = |reason: String| MultibootError::UnsupportedElf { reason };
    if ident[5] != ELFDATA2LSB {
        return Err(unsupported(format!(
            "EI_DATA {} is not little-endian (1)",
            ident[5]
        )));
    }
    field(image, 0, ELF32_EHDR_SIZE, "ELF header")?;
    let e_type = le16(image, 16, "ELF header")?;
    let e_machine = le16(image, 18, "ELF header")?;
    let e_entry = le32(image, 24, "ELF header")?;
    let e_phoff = le32(image, 28, "ELF header")?;
    let e_phentsize = le16(image, 42, "ELF header")?;
    let e_phnum = le16(image, 44, "ELF header")?;
    if e_type != ET_EXEC {
        return Err(unsupported(format!(
            "e_type {e_type} is not ET_EXEC ({ET_EXEC})"
        )));
    }
    if e_machine != EM_386 {
        return Err(unsupported(format!(
            "e_machine {e_machine} is not EM_386 ({EM_386})"
        )));
    }
    if e_phnum == 0 {
        return Err(unsupported("no program headers".to_string()));
    }
    if usize::from(e_phentsize) != ELF32_PHDR_SIZE {
        return Err(unsupported(format!(
            "e_phentsize {e_phentsize} is not {ELF32_PHDR_SIZE}"
        )));
    }
    let ph_table_len = usize::from(e_phnum) * ELF32_PHDR_SIZE;
    let phdrs = field(
        image,
        e_phoff as usize,
        ph_table_len,
        "program header table",
    )?;

    let mut entry = e_entry;
    let mut segments = Vec::new();
    for (i, ph) in phdrs.chunks_exact(ELF32_PHDR_SIZE).enumerate() {
        let w = |o: usize| u32::from_le_bytes([ph[o], ph[o + 1], ph[o + 2], ph[o + 3]]);
        let (p_type, p_offset, p_vaddr, p_paddr) = (w(0), w(4), w(8), w(12));
        let (p_filesz, p_memsz, p_flags) = (w(16), w(20), w(24));
        if p_type != PT_LOAD {
            continue;
        }
        if p_filesz > p_memsz {
            return Err(unsupported(format!(
                "PT_LOAD segment {i}: p_filesz {p_filesz:#x} is larger than p_memsz {p_memsz:#x}"
            )));
        }
        let data = field(
            image,
            p_offset as usize,
            p_filesz as usize,
            &format!("PT_LOAD segment {i} data"),
        )?;
        // As QEMU does: e_entry is a virtual address; when the executable
        // segment holding it is linked at a different physical address,
        // translate it.
        if p_flags & PF_X != 0
            && p_vaddr != p_paddr
            && e_entry >= p_vaddr
            && u64::from(e_entry) < u64::from(p_vaddr) + u64::from(p_filesz)
        {
            entry = (e_entry - p_vaddr).checked_add(p_paddr).ok_or_else(|| {
                unsupported(format!(
                    "entry point {e_entry:#x} translates past 4 GiB through segment {i}"
                ))
            })?;
        }
        segments.push(Segment {
            addr: u64::from(p_paddr),
            data,
            mem_size: u64::from(p_memsz),
        });
    }
    if segments.iter().all(|s| s.mem_size == 0) {
        return Err(unsupported(
            "no PT_LOAD segment with a non-zero size".to_string(),
        ));
    }
    Ok(Plan { entry, segments })
}

/// Writes `len` zero bytes at `addr`.
fn zero(mem: &GuestRam, mut addr: u64, mut len: u64) -> Result<(), MultibootError> {
    if len == 0 {
        return Ok(());
    }
    let buf = vec![0u8; usize::try_from(len).map_or(ZERO_CHUNK, |l| l.min(ZERO_CHUNK))];
    while len > 0 {
        let n = usize::try_from(len).map_or(buf.len(), |l| l.min(buf.len()));
        mem.write_slice(&buf[..n], GuestAddress(addr))?;
        addr += n as u64;
        len -= n as u64;
    }
    Ok(())
}

/// One memory map entry: base, length, type.
type MmapEntry = (u64, u64, u32);

/// Builds the memory map: fixed low-memory entries, then usable RAM above 1 MiB.
fn memory_map(mem: &GuestRam) -> Result<Vec<MmapEntry>, MultibootError> {
    let mut map = vec![
        (0, LOW_USABLE_END, MMAP_AVAILABLE),
        (LOW_USABLE_END, LOW_MEM_END - LOW_USABLE_END, MMAP_RESERVED),
        (BIOS_START, HIGH_MEM_START - BIOS_START, MMAP_RESERVED),
    ];
    for r in mem.iter() {
        let start = r.start_addr().0.max(HIGH_MEM_START);
        let end = r.start_addr().0.saturating_add(r.len());
        if end > start {
            map.push((start, end - start, MMAP_AVAILABLE));
        }
    }
    if map.len() > MAX_MMAP_ENTRIES {
        return Err(MultibootError::TooManyRegions {
            entries: map.len(),
            max: MAX_MMAP_ENTRIES,
        });
    }
    Ok(map)
}

/// KiB of contiguous RAM starting at 1 MiB.
fn mem_upper_kib(mem: &GuestRam) -> u32 {
    let mut end = HIGH_MEM_START;
    // Regions are sorted and do not overlap, so one pass follows the chain.
    for r in mem.iter() {
        let start = r.start_addr().0;
        let r_end = start.saturating_add(r.len());
        if start <= end && r_end > end {
            end = r_end;
        }
    }
    u32::try_from((end - HIGH_MEM_START) / 1024).unwrap_or(u32::MAX)
}

/// Writes the command line, boot loader name, memory map and info structure.
fn write_info(mem: &GuestRam, cmdline: &str, mmap: &[MmapEntry]) -> Result<(), MultibootError> {
    let mut cmd = Vec::with_capacity(cmdline.len() + 1);
    cmd.extend_from_slice(cmdline.as_bytes());
    cmd.push(0);
    mem.write_slice(&cmd, GuestAddress(CMDLINE_ADDR))?;
    mem.write_slice(LOADER_NAME, GuestAddress(LOADER_NAME_ADDR))?;

    let mut addr = MMAP_ADDR;
    for &(base, len, kind) in mmap {
        mem.write_obj((MMAP_ENTRY_SIZE as u32 - 4).to_le(), GuestAddress(addr))?;
        mem.write_obj(base.to_le(), GuestAddress(addr + 4))?;
        mem.write_obj(len.to_le(), GuestAddress(addr + 12))?;
        mem.write_obj(kind.to_le(), GuestAddress(addr + 20))?;
        addr += MMAP_ENTRY_SIZE;
    }

    let mut info = [0u8; INFO_SIZE];
    let mut put = |off: usize, v: u32| info[off..off + 4].copy_from_slice(&v.to_le_bytes());
    put(
        0,
        INFO_MEM | INFO_CMDLINE | INFO_MMAP | INFO_BOOT_LOADER_NAME,
    );
    put(4, MEM_LOWER_KIB);
    put(8, mem_upper_kib(mem));
    put(16, CMDLINE_ADDR as u32);
    put(44, (mmap.len() as u64 * MMAP_ENTRY_SIZE) as u32);
    put(48, MMAP_ADDR as u32);
    put(64, LOADER_NAME_ADDR as u32);
    mem.write_slice(&info, GuestAddress(INFO_ADDR))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const MIB: usize = 1 << 20;

    fn ram(size: usize) -> GuestRam {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    fn mb_header(flags: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&HEADER_MAGIC.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&(0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags)).to_le_bytes());
        h
    }

    fn put32(v: &mut [u8], off: usize, x: u32) {
        v[off..off + 4].copy_from_slice(&x.to_le_bytes());
    }
    fn put16(v: &mut [u8], off: usize, x: u16) {
        v[off..off + 2].copy_from_slice(&x.to_le_bytes());
    }

    /// (paddr, vaddr, file bytes, memsz, flags)
    type Seg = (u32, u32, Vec<u8>, u32, u32);

    /// An ELF32 executable: ehdr, phdrs, multiboot header, then segment data.
    fn elf32(entry: u32, segs: &[Seg]) -> Vec<u8> {
        // The Multiboot header right after the ELF header, then the
        // program headers, so that every prefix cuts something different.
        let phoff = ELF32_EHDR_SIZE + 12;
        let mut img = vec![0u8; phoff + segs.len() * ELF32_PHDR_SIZE];
        img[0..4].copy_from_slice(b"\x7fELF");
        img[4] = ELFCLASS32;
        img[5] = ELFDATA2LSB;
        img[6] = 1;
        put16(&mut img, 16, ET_EXEC);
        put16(&mut img, 18, EM_386);
        put32(&mut img, 20, 1);
        put32(&mut img, 24, entry);
        put32(&mut img, 28, phoff as u32);
        put16(&mut img, 40, ELF32_EHDR_SIZE as u16);
        put16(&mut img, 42, ELF32_PHDR_SIZE as u16);
        put16(&mut img, 44, segs.len() as u16);
        img[ELF32_EHDR_SIZE..phoff].copy_from_slice(&mb_header(0x3));
        for (i, (paddr, vaddr, data, memsz, flags)) in segs.iter().enumerate() {
            let off = img.len();
            img.extend_from_slice(data);
            let p = phoff + i * ELF32_PHDR_SIZE;
            put32(&mut img, p, PT_LOAD);
            put32(&mut img, p + 4, off as u32);
            put32(&mut img, p + 8, *vaddr);
            put32(&mut img, p + 12, *paddr);
            put32(&mut img, p + 16, data.len() as u32);
            put32(&mut img, p + 20, *memsz);
            put32(&mut img, p + 24, *flags);
            put32(&mut img, p + 28, 0x1000);
        }
        img
    }

    fn two_segment_elf() -> Vec<u8> {
        let text: Vec<u8> = (0..200u8).collect();
        let data = vec![0xAB; 64];
        elf32(
            0x10_0010,
            &[
                (0x10_0000, 0x10_0000, text, 200, 5),
                (0x20_0000, 0x20_0000, data, 0x1000, 6),
            ],
        )
    }

    fn read_u32(mem: &GuestRam, addr: u64) -> u32 {
        mem.read_obj::<u32>(GuestAddress(addr)).unwrap()
    }
    fn read_u64(mem: &GuestRam, addr: u64) -> u64 {
        mem.read_obj::<u64>(GuestAddress(addr)).unwrap()
    }
    fn read_cstr(mem: &GuestRam, addr: u64) -> String {
        let mut s = Vec::new();
        let mut a = addr;
        loop {
            let b: u8 = mem.read_obj(GuestAddress(a)).unwrap();
            if b == 0 {
                break;
            }
            s.push(b);
            a += 1;
        }
        String::from_utf8(s).unwrap()
    }

    #[test]
    fn loads_elf32_with_bss_and_builds_info() {
        let mem = ram(16 * MIB);
        // Dirty the bss area first so zeroing is observable.
        mem.write_slice(&[0xFF; 0x1000], GuestAddress(0x20_0000))
            .unwrap();
        let k = load(&mem, &two_segment_elf(), "console=ttyS0 quiet").unwrap();
        assert_eq!(k.entry, 0x10_0010);
        assert_eq!(k.info_addr, 0x9000);
        assert_eq!(k.kernel_end, 0x20_1000);

        let mut text = [0u8; 200];
        mem.read_slice(&mut text, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(text.to_vec(), (0..200u8).collect::<Vec<_>>());
        let mut data = vec![0u8; 0x1000];
        mem.read_slice(&mut data, GuestAddress(0x20_0000)).unwrap();
        assert!(data[..64].iter().all(|&b| b == 0xAB));
        assert!(data[64..].iter().all(|&b| b == 0), "bss not zeroed");

        let info = u64::from(k.info_addr);
        assert_eq!(
            read_u32(&mem, info),
            (1 << 0) | (1 << 2) | (1 << 6) | (1 << 9)
        );
        assert_eq!(read_u32(&mem, info + 4), 640);
        assert_eq!(read_u32(&mem, info + 8), 15 * 1024);
        assert_eq!(
            read_cstr(&mem, u64::from(read_u32(&mem, info + 16))),
            "console=ttyS0 quiet"
        );
        assert_eq!(read_u32(&mem, info + 20), 0, "mods_count");
        assert_eq!(
            read_cstr(&mem, u64::from(read_u32(&mem, info + 64))),
            "livemig-refvmm"
        );

        let mmap_len = read_u32(&mem, info + 44);
        let mmap_addr = u64::from(read_u32(&mem, info + 48));
        assert_eq!(mmap_len, 4 * 24);
        let mut entries = Vec::new();
        let mut a = mmap_addr;
        while a < mmap_addr + u64::from(mmap_len) {
            let size = read_u32(&mem, a);
            assert_eq!(size, 20);
            entries.push((
                read_u64(&mem, a + 4),
                read_u64(&mem, a + 12),
                read_u32(&mem, a + 20),
            ));
            a += u64::from(size) + 4;
        }
        assert_eq!(
            entries,
            vec![
                (0, 0x9fc00, 1),
                (0x9fc00, 0x400, 2),
                (0xf0000, 0x10000, 2),
                (0x10_0000, 15 * MIB as u64, 1),
            ]
        );
    }

    #[test]
    fn mmap_and_mem_upper_follow_regions() {
        let mem: GuestRam = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 2 * MIB),
            (GuestAddress(2 * MIB as u64), MIB),
            (GuestAddress(8 * MIB as u64), MIB),
        ])
        .unwrap();
        let k = load(&mem, &two_segment_elf(), "").unwrap();
        let info = u64::from(k.info_addr);
        // Contiguous from 1 MiB: [1 MiB, 3 MiB).
        assert_eq!(read_u32(&mem, info + 8), 2 * 1024);
        assert_eq!(read_u32(&mem, info + 44), 6 * 24);
        let base = u64::from(read_u32(&mem, info + 48));
        let e = |i: u64| {
            (
                read_u64(&mem, base + i * 24 + 4),
                read_u64(&mem, base + i * 24 + 12),
            )
        };
        assert_eq!(e(3), (0x10_0000, 0x10_0000));
        assert_eq!(e(4), (0x20_0000, 0x10_0000));
        assert_eq!(e(5), (0x80_0000, 0x10_0000));
        assert_eq!(read_cstr(&mem, u64::from(read_u32(&mem, info + 16))), "");
    }

    #[test]
    fn elf_entry_is_translated_like_qemu() {
        // Higher-half kernel: linked at 0xC010_0000, loaded at 1 MiB.
        let img = elf32(
            0xC010_0004,
            &[(0x10_0000, 0xC010_0000, vec![0x90; 16], 16, 5)],
        );
        let k = load(&ram(16 * MIB), &img, "").unwrap();
        assert_eq!(k.entry, 0x10_0004);
    }

    /// An a.out kludge image: 16 bytes of padding, the header at offset 16,
    /// then the code. Linked so that file offset 0 loads at 0x100000.
    fn aout_image(load_end: u32, bss_end: u32) -> Vec<u8> {
        let mut img = vec![0xEE; 16];
        img.extend_from_slice(&mb_header(FLAG_AOUT_KLUDGE | 0x2));
        for v in [0x10_0010, 0x10_0000, load_end, bss_end, 0x10_0030] {
            img.extend_from_slice(&u32::to_le_bytes(v));
        }
        img.extend((0..32u8).map(|b| b ^ 0x5A));
        img
    }

    #[test]
    fn loads_aout_kludge() {
        let mem = ram(16 * MIB);
        mem.write_slice(&[0xFF; 0x100], GuestAddress(0x10_0000))
            .unwrap();
        let img = aout_image(0, 0x10_0100);
        let k = load(&mem, &img, "x").unwrap();
        assert_eq!(k.entry, 0x10_0030);
        assert_eq!(k.kernel_end, 0x10_0100);
        let mut got = vec![0u8; 0x100];
        mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&got[..img.len()], &img[..]);
        assert!(got[img.len()..].iter().all(|&b| b == 0), "bss not zeroed");

        // load_end_addr limits what is loaded; no bss.
        let mem = ram(16 * MIB);
        mem.write_slice(&[0xFF; 0x100], GuestAddress(0x10_0000))
            .unwrap();
        let k = load(&mem, &aout_image(0x10_0020, 0), "").unwrap();
        assert_eq!(k.kernel_end, 0x10_0020);
        let b: u8 = mem.read_obj(GuestAddress(0x10_0020)).unwrap();
        assert_eq!(b, 0xFF, "loaded past load_end_addr");

        // Inconsistent addresses.
        let e = load(&ram(16 * MIB), &aout_image(0x10_0020, 0x10_0010), "").unwrap_err();
        assert!(matches!(e, MultibootError::BadAoutHeader { .. }), "{e}");
        let e = load(&ram(16 * MIB), &aout_image(0x10_1000, 0), "").unwrap_err();
        assert!(matches!(e, MultibootError::Truncated { .. }), "{e}");
    }

    #[test]
    fn refuses_elf64() {
        let mut img = two_segment_elf();
        img[4] = ELFCLASS64;
        let e = load(&ram(16 * MIB), &img, "").unwrap_err();
        assert!(matches!(e, MultibootError::Elf64));
        assert_eq!(
            e.to_string(),
            "ELF64 images are not Multiboot v1 kernels; give a 32-bit ELF"
        );
    }

    #[test]
    fn truncated_elf_errors_at_every_prefix() {
        let img = two_segment_elf();
        for len in 0..img.len() {
            let mem = ram(4 * MIB);
            let e = load(&mem, &img[..len], "").unwrap_err();
            assert!(
                matches!(
                    e,
                    MultibootError::Truncated { .. }
                        | MultibootError::NotMultiboot
                        | MultibootError::NotElf32
                ),
                "prefix {len}: {e}"
            );
        }
        let e = load(&ram(4 * MIB), &img[..img.len() - 1], "").unwrap_err();
        assert!(e.to_string().contains("PT_LOAD segment 1 data"), "{e}");
        let e = load(&ram(4 * MIB), &img[..100], "").unwrap_err();
        assert!(e.to_string().contains("program header table"), "{e}");
        let e = load(&ram(4 * MIB), &img[..140], "").unwrap_err();
        assert!(e.to_string().contains("PT_LOAD segment 0 data"), "{e}");
        assert!(load(&ram(4 * MIB), &img, "").is_ok());
    }

    #[test]
    fn garbage_never_panics() {
        // Corrupt every byte of a valid image in turn (keeping the header valid or not).
        let img = two_segment_elf();
        let mem = ram(4 * MIB);
        for i in 0..img.len() {
            for v in [0x00, 0xFF, 0x80] {
                let mut bad = img.clone();
                bad[i] = v;
                let _ = load(&mem, &bad, "");
            }
        }
    }

    #[test]
    fn bad_checksum_and_no_header() {
        let mut img = two_segment_elf();
        let off = ELF32_EHDR_SIZE;
        img[off + 8] ^= 1;
        let e = load(&ram(4 * MIB), &img, "").unwrap_err();
        assert!(
            matches!(e, MultibootError::BadChecksum { offset, .. } if offset == off),
            "{e}"
        );

        let e = load(&ram(4 * MIB), &[0u8; 9000], "").unwrap_err();
        assert!(matches!(e, MultibootError::NotMultiboot));
        assert_eq!(
            e.to_string(),
            "no Multiboot v1 header (magic 0x1BADB002) in the first 8 KiB"
        );

        // A header past the first 8 KiB does not count.
        let mut far = vec![0u8; 8192];
        far.extend_from_slice(&mb_header(0));
        assert!(matches!(
            load(&ram(4 * MIB), &far, "").unwrap_err(),
            MultibootError::NotMultiboot
        ));

        // A header that is not 4-byte aligned does not count.
        let mut unaligned = vec![0u8; 2];
        unaligned.extend_from_slice(&mb_header(0));
        assert!(matches!(
            load(&ram(4 * MIB), &unaligned, "").unwrap_err(),
            MultibootError::NotMultiboot
        ));
    }

    #[test]
    fn refuses_unknown_required_flags_and_non_elf() {
        let mut img = mb_header(1 << 3);
        img.extend_from_slice(&[0; 64]);
        let e = load(&ram(4 * MIB), &img, "").unwrap_err();
        assert!(
            matches!(e, MultibootError::UnsupportedFlags { unknown: 8, .. }),
            "{e}"
        );

        let mut img = mb_header(0x7);
        img.extend_from_slice(&[0; 64]);
        let e = load(&ram(4 * MIB), &img, "").unwrap_err();
        assert!(matches!(e, MultibootError::NotElf32), "{e}");
    }

    #[test]
    fn segment_beyond_memory_is_refused() {
        let img = elf32(
            0x100_0000,
            &[(0xF00_0000, 0xF00_0000, vec![1; 16], 0x100, 5)],
        );
        let e = load(&ram(16 * MIB), &img, "").unwrap_err();
        assert!(matches!(
            e,
            MultibootError::DoesNotFit {
                start: 0xF00_0000,
                end: 0xF00_0100,
                ..
            }
        ));
        assert_eq!(
            e.to_string(),
            "kernel segment 0xf000000-0xf000100 does not fit in guest memory (size 0x1000000)"
        );
        // Straddling the end of memory.
        let img = elf32(0, &[(0xFF_F000, 0xFF_F000, vec![1; 16], 0x2000, 5)]);
        assert!(matches!(
            load(&ram(16 * MIB), &img, "").unwrap_err(),
            MultibootError::DoesNotFit { .. }
        ));
        // Near 4 GiB: no overflow.
        let img = elf32(
            0,
            &[(0xFFFF_FFF0, 0xFFFF_FFF0, vec![1; 16], 0xFFFF_FFFF, 5)],
        );
        assert!(matches!(
            load(&ram(16 * MIB), &img, "").unwrap_err(),
            MultibootError::DoesNotFit { .. }
        ));
    }

    #[test]
    fn segment_over_info_area_is_refused() {
        let img = elf32(0x8000, &[(0x8000, 0x8000, vec![1; 16], 0x2000, 5)]);
        let e = load(&ram(16 * MIB), &img, "").unwrap_err();
        assert!(matches!(e, MultibootError::InfoOverlap { .. }), "{e}");
    }

    #[test]
    fn cmdline_limits() {
        let mem = ram(16 * MIB);
        let long = "a".repeat(4096);
        let e = load(&mem, &two_segment_elf(), &long).unwrap_err();
        assert!(
            matches!(
                e,
                MultibootError::CmdlineTooLong {
                    len: 4096,
                    max: 4095
                }
            ),
            "{e}"
        );
        let max = "b".repeat(4095);
        let k = load(&mem, &two_segment_elf(), &max).unwrap();
        let addr = u64::from(read_u32(&mem, u64::from(k.info_addr) + 16));
        assert_eq!(read_cstr(&mem, addr), max);
        assert!(matches!(
            load(&mem, &two_segment_elf(), "a\0b").unwrap_err(),
            MultibootError::CmdlineNul
        ));
    }

    #[test]
    fn needs_low_memory() {
        let mem: GuestRam =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10_0000), 4 * MIB)]).unwrap();
        assert!(matches!(
            load(&mem, &two_segment_elf(), "").unwrap_err(),
            MultibootError::NoLowMemory
        ));
    }
}
