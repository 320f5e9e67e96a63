//! A minimal ELF32 (`EM_386`) executable writer: one `PT_LOAD` segment.

/// Size of the ELF32 file header.
pub(crate) const EHDR_SIZE: usize = 52;
/// Size of one ELF32 program header.
pub(crate) const PHDR_SIZE: usize = 32;
/// File offset of the segment contents (page-aligned, so the Multiboot header at the start of the
/// segment is at file offset 0x1000, inside the first 8 KiB).
pub(crate) const SEGMENT_OFFSET: usize = 0x1000;

/// Builds an ELF32 executable with one RWX `PT_LOAD` segment holding `contents` at physical and
/// virtual address `addr`, zero-filled up to `memsz` bytes, entered at `entry`.
pub(crate) fn build(addr: u32, contents: &[u8], memsz: u32, entry: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(SEGMENT_OFFSET + contents.len());
    // e_ident: magic, ELFCLASS32, ELFDATA2LSB, EV_CURRENT, System V ABI, padding.
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 1, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    push16(&mut f, 2); // e_type = ET_EXEC
    push16(&mut f, 3); // e_machine = EM_386
    push32(&mut f, 1); // e_version
    push32(&mut f, entry); // e_entry
    push32(&mut f, EHDR_SIZE as u32); // e_phoff
    push32(&mut f, 0); // e_shoff
    push32(&mut f, 0); // e_flags
    push16(&mut f, EHDR_SIZE as u16); // e_ehsize
    push16(&mut f, PHDR_SIZE as u16); // e_phentsize
    push16(&mut f, 1); // e_phnum
    push16(&mut f, 40); // e_shentsize
    push16(&mut f, 0); // e_shnum
    push16(&mut f, 0); // e_shstrndx
    debug_assert_eq!(f.len(), EHDR_SIZE);
    push32(&mut f, 1); // p_type = PT_LOAD
    push32(&mut f, SEGMENT_OFFSET as u32); // p_offset
    push32(&mut f, addr); // p_vaddr
    push32(&mut f, addr); // p_paddr
    push32(&mut f, contents.len() as u32); // p_filesz
    push32(&mut f, memsz); // p_memsz
    push32(&mut f, 7); // p_flags = R | W | X
    push32(&mut f, 0x1000); // p_align
    f.resize(SEGMENT_OFFSET, 0);
    f.extend_from_slice(contents);
    f
}

fn push16(f: &mut Vec<u8>, v: u16) {
    f.extend_from_slice(&v.to_le_bytes());
}

fn push32(f: &mut Vec<u8>, v: u32) {
    f.extend_from_slice(&v.to_le_bytes());
}
