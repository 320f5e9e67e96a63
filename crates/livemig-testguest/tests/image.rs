//! Layout of the generated ELF/Multiboot image, checked through the public API only (what a
//! VMM's loader relies on).

use livemig_testguest::*;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

struct Segment {
    offset: usize,
    paddr: u64,
    filesz: usize,
    memsz: usize,
}

impl Segment {
    /// File offset of guest-physical address `addr` (which must be file-backed).
    fn file_offset(&self, addr: u64) -> usize {
        assert!(addr >= self.paddr && addr < self.paddr + self.filesz as u64);
        self.offset + (addr - self.paddr) as usize
    }
}

fn load_segments(img: &[u8]) -> Vec<Segment> {
    let phoff = u32_at(img, 28) as usize;
    let phnum = u16_at(img, 44) as usize;
    (0..phnum)
        .map(|i| phoff + i * 32)
        .filter(|&p| u32_at(img, p) == 1)
        .map(|p| {
            assert_eq!(
                u32_at(img, p + 8),
                u32_at(img, p + 12),
                "p_vaddr == p_paddr"
            );
            Segment {
                offset: u32_at(img, p + 4) as usize,
                paddr: u64::from(u32_at(img, p + 12)),
                filesz: u32_at(img, p + 16) as usize,
                memsz: u32_at(img, p + 20) as usize,
            }
        })
        .collect()
}

// Stacks and variables are in the zero-filled part, below the generation table.
const _: () = assert!(
    BSS_START < KSTACK_TOP
        && KSTACK_TOP < USTACK_TOP
        && VARS_ADDR + 4096 <= IMAGE_END
        && IMAGE_END <= GEN_TABLE
);

#[test]
fn elf_header() {
    let img = image().expect("image");
    assert_eq!(&img[0..4], b"\x7fELF");
    assert_eq!(img[4], 1, "ELFCLASS32");
    assert_eq!(img[5], 1, "little endian");
    assert_eq!(u16_at(&img, 16), 2, "ET_EXEC");
    assert_eq!(u16_at(&img, 18), 3, "EM_386");
    assert_eq!(u32_at(&img, 20), 1);
    assert_eq!(u64::from(u32_at(&img, 24)), ENTRY);
    assert_eq!(u16_at(&img, 42), 32, "e_phentsize");
    let segs = load_segments(&img);
    assert_eq!(segs.len(), 1);
    let s = &segs[0];
    assert_eq!(s.paddr, LOAD_ADDR);
    assert_eq!(s.paddr + s.filesz as u64, BSS_START);
    assert_eq!(s.paddr + s.memsz as u64, IMAGE_END);
    assert!(s.memsz >= s.filesz);
    assert_eq!(s.offset % 4096, 0);
    assert_eq!(s.offset + s.filesz, img.len());
    assert!((s.paddr..s.paddr + s.filesz as u64).contains(&ENTRY));
}

#[test]
fn multiboot_header() {
    let img = image().expect("image");
    let hits: Vec<usize> = (0..8192.min(img.len()) - 12)
        .step_by(4)
        .filter(|&o| u32_at(&img, o) == 0x1BAD_B002)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "exactly one Multiboot header in the first 8 KiB"
    );
    let o = hits[0];
    let flags = u32_at(&img, o + 4);
    assert_eq!(flags, 0x3, "page-align | memory info");
    assert_eq!(flags & 0x1_0000, 0, "no a.out kludge");
    assert_eq!(
        0x1BAD_B002u32
            .wrapping_add(flags)
            .wrapping_add(u32_at(&img, o + 8)),
        0
    );
    // It is the start of the loaded segment.
    let s = &load_segments(&img)[0];
    assert_eq!(o, s.offset);
}

#[test]
fn prebuilt_tables_are_where_the_constants_say() {
    let img = image().expect("image");
    let s = &load_segments(&img)[0];
    // GDTR: limit 63, base GDT_ADDR; GDT entries.
    let gdtr = s.file_offset(GDTR_ADDR);
    assert_eq!(u16_at(&img, gdtr), 63);
    assert_eq!(u64::from(u32_at(&img, gdtr + 2)), GDT_ADDR);
    let gdt = s.file_offset(GDT_ADDR);
    assert_eq!(u64_at(&img, gdt + 0x08), 0x00af_9a00_0000_ffff);
    assert_eq!(u64_at(&img, gdt + 0x10), 0x00cf_9200_0000_ffff);
    assert_eq!(u64_at(&img, gdt + 0x18), 0x00cf_f200_0000_ffff);
    assert_eq!(u64_at(&img, gdt + 0x20), 0x00af_fa00_0000_ffff);
    assert_eq!((u64_at(&img, gdt + 0x30) >> 40) & 0xff, 0x89);
    // TSS: rsp0, I/O bitmap base, closing 0xFF.
    let tss = s.file_offset(TSS_ADDR);
    assert_eq!(u64_at(&img, tss + 4), KSTACK_TOP);
    assert_eq!(u16_at(&img, tss + 0x66), 0x68);
    assert_eq!(img[tss + 0x68 + 8192], 0xff);
    // Page tables.
    let pml4 = s.file_offset(PML4_ADDR);
    assert_eq!(u64_at(&img, pml4), PDPT_ADDR | 7);
    let pd = s.file_offset(PD_ADDR);
    assert_eq!(u64_at(&img, pd + 8 * 8), (8 << 21) | 0x87);
}

#[test]
fn image_is_deterministic() {
    assert_eq!(image().expect("image"), image().expect("image"));
}
