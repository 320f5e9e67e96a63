//! Where guest memory comes from: private anonymous mappings (the default),
//! or memfd-backed shared mappings that another process can be handed as
//! file descriptors (issue 18: a same-host hand-over needs no copy).
//!
//! A memfd region is built as a vm-memory `GuestRegionMmap` with a
//! `FileOffset`, mapped `MAP_SHARED`, so the engine sees its backing
//! (`livemig::ram`'s `Backing::SharedFile`: the file's holes read as zero,
//! and a destination zeroes it by punching holes). `memfd` is ordinary
//! (4 KiB) pages; `memfd,hugetlb` is huge pages (`MFD_HUGETLB`, 2 MiB),
//! reserved when the memory is mapped, or a [`MemfdError::HugePages`] that
//! says how many the host has free and how to reserve more — never a
//! silent fall-back to ordinary pages, and never huge pages nobody asked
//! for (an operator reserves them for the VMs that ask).
//!
//! Anonymous and plain memfd memory is advised for transparent huge pages
//! on request ([`Thp::On`]; by default the host's setting decides, [`Thp::Host`]; see [`crate::thp`]); [`MemoryOptions::thp`]
//! turns that off.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::str::FromStr;
use std::sync::Arc;

use livemig::memory::SummaryBitmap;
use livemig::memory::{allocate, GuestRam, MemoryLayout};
use vm_memory::bitmap::NewBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

use crate::thp::{self, Sharing, Thp};

/// Huge page size tried with `MFD_HUGETLB` (the x86 default).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// The kind of mapping guest memory lives in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MemoryBackend {
    /// Private anonymous mappings: pages the guest never touches cost nothing.
    #[default]
    Anonymous,
    /// One memfd per region, mapped `MAP_SHARED`, ordinary pages.
    Memfd,
    /// One hugetlb memfd per region (`MFD_HUGETLB`, [`HUGE_PAGE_SIZE`]
    /// pages), mapped `MAP_SHARED`; every region must be a multiple of
    /// [`HUGE_PAGE_SIZE`] and the host must have enough huge pages free.
    MemfdHugetlb,
}

impl FromStr for MemoryBackend {
    type Err = MemfdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "anonymous" => Ok(MemoryBackend::Anonymous),
            "memfd" => Ok(MemoryBackend::Memfd),
            "memfd,hugetlb" => Ok(MemoryBackend::MemfdHugetlb),
            other => Err(MemfdError::UnknownBackend(other.to_string())),
        }
    }
}

impl std::fmt::Display for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemoryBackend::Anonymous => "anonymous",
            MemoryBackend::Memfd => "memfd",
            MemoryBackend::MemfdHugetlb => "memfd,hugetlb",
        })
    }
}

/// How [`allocate_memory`] builds guest memory: the backend, and the
/// transparent-huge-page advice for a backend that is not hugetlb. A
/// [`MemoryBackend`] alone is these options with the default advice
/// ([`Thp::Host`]: no advice).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryOptions {
    /// Where the memory comes from.
    pub backend: MemoryBackend,
    /// Transparent huge pages for [`MemoryBackend::Anonymous`] and
    /// [`MemoryBackend::Memfd`] (ignored for hugetlb, which is huge pages
    /// already). Default [`Thp::Host`] (no advice).
    pub thp: Thp,
}

impl From<MemoryBackend> for MemoryOptions {
    fn from(backend: MemoryBackend) -> Self {
        MemoryOptions {
            backend,
            thp: Thp::default(),
        }
    }
}

/// What [`allocate_memory`] built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// Anonymous memory, or a memfd of ordinary pages (no THP advice, or a
    /// host whose THP setting ignores it).
    Small,
    /// Anonymous memory, or a memfd, advised for transparent huge pages on
    /// a host whose setting honours the advice: 2 MiB pages wherever the
    /// kernel finds them free (4 KiB where it does not).
    Transparent,
    /// A hugetlb memfd ([`HUGE_PAGE_SIZE`] pages).
    Huge,
}

/// Failures building guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemfdError {
    /// Not `anonymous`, `memfd` or `memfd,hugetlb`.
    #[error("memory backend '{0}': expected anonymous, memfd or memfd,hugetlb")]
    UnknownBackend(String),
    /// Huge pages asked for, and the host cannot give them.
    #[error(
        "huge pages: the guest memory needs {needed} huge pages of 2 MiB and the host has \
         {free} free (HugePages_Free in /proc/meminfo; {why}); reserve more with \
         `echo N > /proc/sys/vm/nr_hugepages` (N = the pages this host's guests need in all), \
         or use --memory-backend memfd"
    )]
    HugePages {
        /// Huge pages the memory needs.
        needed: u64,
        /// Huge pages the host had free.
        free: u64,
        /// What failed.
        why: String,
    },
    /// A region that is not whole huge pages.
    #[error(
        "huge pages: region 0x{guest_addr:x}+0x{size:x} is not a multiple of 2 MiB (give the \
         guest a memory size in whole 2 MiB, or use --memory-backend memfd)"
    )]
    NotHugeAligned {
        /// The region's guest-physical start.
        guest_addr: u64,
        /// Its size.
        size: u64,
    },
    /// `memfd_create` failed.
    #[error("memfd_create: {0}")]
    Create(#[source] std::io::Error),
    /// Sizing the memfd failed.
    #[error("sizing the memfd to {size} bytes: {source}")]
    Truncate {
        /// Requested size.
        size: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// Mapping a region failed.
    #[error("mapping guest memory: {0}")]
    Map(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

/// Guest memory for `layout` as `options` say (a [`MemoryBackend`] alone:
/// that backend, advised for transparent huge pages): [`PageKind::Huge`]
/// exactly for [`MemoryBackend::MemfdHugetlb`], which fails (no fall-back)
/// where the host has too few huge pages free or a region is not whole
/// huge pages; [`PageKind::Transparent`] where THP advice was given and the
/// host's setting honours it. The THP advice itself never fails the
/// allocation (a host without THP: ordinary pages, logged).
pub fn allocate_memory(
    layout: &MemoryLayout,
    options: impl Into<MemoryOptions>,
) -> Result<(GuestRam, PageKind), MemfdError> {
    let MemoryOptions { backend, thp } = options.into();
    match backend {
        MemoryBackend::Anonymous => {
            let mem = allocate(layout).map_err(|e| MemfdError::Map(e.into()))?;
            let kind = advise(&mem, thp, Sharing::Anonymous);
            Ok((mem, kind))
        }
        MemoryBackend::Memfd => {
            let mem = memfd_memory(layout, PageKind::Small)?;
            let kind = advise(&mem, thp, Sharing::Shmem);
            Ok((mem, kind))
        }
        MemoryBackend::MemfdHugetlb => {
            let mut needed = 0;
            for r in layout.regions() {
                if !r.size.is_multiple_of(HUGE_PAGE_SIZE)
                    || !r.guest_addr.is_multiple_of(HUGE_PAGE_SIZE)
                {
                    return Err(MemfdError::NotHugeAligned {
                        guest_addr: r.guest_addr,
                        size: r.size,
                    });
                }
                needed += r.size / HUGE_PAGE_SIZE;
            }
            let short = |why: String| MemfdError::HugePages {
                needed,
                free: free_huge_pages(),
                why,
            };
            match memfd_memory(layout, PageKind::Huge) {
                Ok(m) => Ok((m, PageKind::Huge)),
                // No huge pages at all: memfd_create or the mapping's
                // reservation fails (ENOMEM, EINVAL where none are
                // configured).
                Err(e @ (MemfdError::Create(_) | MemfdError::Map(_))) => Err(short(e.to_string())),
                Err(e) => Err(e),
            }
        }
    }
}

/// Gives `mem` the advice of `thp`; what the host makes of it. A refused
/// advice is logged, never an error: the memory works in 4 KiB pages.
fn advise(mem: &GuestRam, thp: Thp, sharing: Sharing) -> PageKind {
    if let Err(e) = thp::advise(mem, thp) {
        log::warn!("guest memory: THP advice {thp} refused ({e}); 4 KiB pages");
        return PageKind::Small;
    }
    if thp::host_gives_huge(sharing, thp) {
        return PageKind::Transparent;
    }
    if thp == Thp::On {
        log::info!(
            "guest memory: THP advised, but the host's {sharing:?} THP setting is {:?}: 4 KiB pages",
            thp::host_setting(sharing)
        );
    }
    PageKind::Small
}

/// `HugePages_Free` of `/proc/meminfo` (0 where it cannot be read).
pub fn free_huge_pages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:")?.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether `file` is on hugetlbfs (a `MFD_HUGETLB` memfd).
pub fn is_hugetlb(file: &File) -> bool {
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs on an open descriptor writes one statfs into `st`.
    let r = unsafe { libc::fstatfs(std::os::fd::AsRawFd::as_raw_fd(file), &mut st) };
    r == 0 && st.f_type == libc::HUGETLBFS_MAGIC
}

/// One memfd per region of `layout`, mapped shared.
fn memfd_memory(layout: &MemoryLayout, kind: PageKind) -> Result<GuestRam, MemfdError> {
    let mut regions = Vec::new();
    for r in layout.regions() {
        let file = memfd(c"livemig-guest-ram", kind)?;
        file.set_len(r.size)
            .map_err(|source| MemfdError::Truncate {
                size: r.size,
                source,
            })?;
        // Hugetlb: no MAP_NORESERVE, so a shortage of huge pages fails
        // here (ENOMEM) instead of as a SIGBUS at the guest's first touch.
        let flags = match kind {
            PageKind::Huge => libc::MAP_SHARED,
            PageKind::Small | PageKind::Transparent => libc::MAP_SHARED | libc::MAP_NORESERVE,
        };
        let size = usize::try_from(r.size).map_err(|e| MemfdError::Map(e.into()))?;
        let mapping = MmapRegionBuilder::new_with_bitmap(size, SummaryBitmap::with_len(size))
            .with_file_offset(FileOffset::from_arc(Arc::new(file), 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_hugetlbfs(kind == PageKind::Huge)
            .build()
            .map_err(|e| MemfdError::Map(e.into()))?;
        let region =
            GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr)).ok_or_else(|| {
                MemfdError::Map(format!("no guest region at 0x{:x}", r.guest_addr).into())
            })?;
        regions.push(region);
    }
    GuestRam::from_regions(regions).map_err(|e| MemfdError::Map(e.into()))
}

/// Guest memory over files another process shares (a same-host
/// hand-over: the memfds the source VMM passed), one file per region of
/// `layout`, each mapped `MAP_SHARED` from offset `offsets[i]`. Nothing is
/// written: the memory holds the running guest.
pub fn map_shared(layout: &MemoryLayout, files: Vec<(File, u64)>) -> Result<GuestRam, MemfdError> {
    if files.len() != layout.regions().len() {
        return Err(MemfdError::Map(
            format!(
                "{} files for {} regions",
                files.len(),
                layout.regions().len()
            )
            .into(),
        ));
    }
    let mut regions = Vec::new();
    for (r, (file, offset)) in layout.regions().iter().zip(files) {
        let have = file
            .metadata()
            .map_err(|e| MemfdError::Map(e.into()))?
            .len();
        if offset.checked_add(r.size).is_none_or(|end| end > have) {
            return Err(MemfdError::Map(
                format!(
                    "region 0x{:x}+0x{:x}: the file has {have} bytes (offset {offset})",
                    r.guest_addr, r.size
                )
                .into(),
            ));
        }
        let size = usize::try_from(r.size).map_err(|e| MemfdError::Map(e.into()))?;
        let huge = is_hugetlb(&file);
        let mapping = MmapRegionBuilder::new_with_bitmap(size, SummaryBitmap::with_len(size))
            .with_file_offset(FileOffset::from_arc(Arc::new(file), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .with_hugetlbfs(huge)
            .build()
            .map_err(|e| MemfdError::Map(e.into()))?;
        let region =
            GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr)).ok_or_else(|| {
                MemfdError::Map(format!("no guest region at 0x{:x}", r.guest_addr).into())
            })?;
        regions.push(region);
    }
    GuestRam::from_regions(regions).map_err(|e| MemfdError::Map(e.into()))
}

fn memfd(name: &CStr, kind: PageKind) -> Result<File, MemfdError> {
    let mut flags = libc::MFD_CLOEXEC;
    if kind == PageKind::Huge {
        flags |= libc::MFD_HUGETLB;
    }
    // SAFETY: name is a valid NUL-terminated string; the call has no other
    // memory effects.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(MemfdError::Create(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just created and is owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemig::memory::RegionDesc;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    fn layout(regions: &[(u64, u64)]) -> MemoryLayout {
        MemoryLayout::new(
            regions
                .iter()
                .map(|&(guest_addr, size)| RegionDesc { guest_addr, size })
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn parses_backends() {
        assert_eq!(
            "memfd".parse::<MemoryBackend>().unwrap(),
            MemoryBackend::Memfd
        );
        assert_eq!(
            "anonymous".parse::<MemoryBackend>().unwrap(),
            MemoryBackend::Anonymous
        );
        let e = "shm".parse::<MemoryBackend>().unwrap_err();
        assert!(
            e.to_string()
                .contains("expected anonymous, memfd or memfd,hugetlb"),
            "{e}"
        );
    }

    /// Every region is a shared mapping of a memfd of its size, and what is
    /// written through guest memory is in the file.
    #[test]
    fn memfd_regions_are_shared_file_mappings() {
        let l = layout(&[(0, 4 << 20), (8 << 20, 1 << 20)]);
        let (mem, _kind) = allocate_memory(&l, MemoryBackend::Memfd).unwrap();
        assert_eq!(mem.num_regions(), 2);
        for r in mem.iter() {
            let fo = r.file_offset().expect("a memfd region has a file");
            assert_eq!(fo.start(), 0);
            assert_eq!(fo.file().metadata().unwrap().len(), r.len());
            assert_ne!(r.flags() & libc::MAP_SHARED, 0);
            let link = std::fs::read_link(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(fo.file())
            ))
            .unwrap();
            assert!(
                link.to_string_lossy()
                    .starts_with("/memfd:livemig-guest-ram"),
                "{link:?}"
            );
        }
        mem.write_obj(0xdead_beef_u64, GuestAddress((8 << 20) + 4096))
            .unwrap();
        let r = mem.iter().nth(1).unwrap();
        let mut buf = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(r.file_offset().unwrap().file(), &mut buf, 4096)
            .unwrap();
        assert_eq!(u64::from_ne_bytes(buf), 0xdead_beef);
    }

    /// `memfd` is never hugetlb, whatever the host has free; advised for
    /// THP it is transparent huge pages exactly where the host's
    /// `shmem_enabled` honours the advice (not on a `never` host, the
    /// common default), and never fails for it.
    #[test]
    fn plain_memfd_is_small_pages() {
        let shmem_thp = thp::host_gives_huge(Sharing::Shmem, Thp::On);
        for l in [layout(&[(0, 4096 * 3)]), layout(&[(0, 8 << 20)])] {
            let on = MemoryOptions {
                backend: MemoryBackend::Memfd,
                thp: Thp::On,
            };
            let (mem, kind) = allocate_memory(&l, on).unwrap();
            let want = if shmem_thp {
                PageKind::Transparent
            } else {
                PageKind::Small
            };
            assert_eq!(
                kind,
                want,
                "shmem THP {:?}",
                thp::host_setting(Sharing::Shmem)
            );
            let off = MemoryOptions {
                backend: MemoryBackend::Memfd,
                thp: Thp::Off,
            };
            assert_eq!(allocate_memory(&l, off).unwrap().1, PageKind::Small);
            assert!(mem.iter().all(|r| r.file_offset().is_some()));
            assert!(mem
                .iter()
                .all(|r| !is_hugetlb(r.file_offset().unwrap().file())));
        }
    }

    /// `memfd,hugetlb`: huge pages, every page usable (never a mapping whose
    /// first touch raises SIGBUS: every page is written here), or — where
    /// the host has too few free — an error that says so; never ordinary
    /// pages. A region that is not whole huge pages is refused.
    #[test]
    fn hugetlb_is_huge_pages_or_a_clear_error() {
        let size = 8u64 << 20;
        let l = layout(&[(0, size)]);
        match allocate_memory(&l, MemoryBackend::MemfdHugetlb) {
            Ok((mem, kind)) => {
                assert_eq!(kind, PageKind::Huge);
                let r = mem.iter().next().unwrap();
                assert!(is_hugetlb(r.file_offset().unwrap().file()));
                for page in (0..size).step_by(4096) {
                    mem.write_obj(page, GuestAddress(page)).unwrap();
                }
                eprintln!("8 MiB hugetlb memfd: huge pages");
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    matches!(e, MemfdError::HugePages { needed: 4, .. }),
                    "{msg}"
                );
                assert!(msg.contains("/proc/sys/vm/nr_hugepages"), "{msg}");
                eprintln!("8 MiB hugetlb memfd refused: {msg}");
            }
        }
        let e = allocate_memory(&layout(&[(0, 3 << 20)]), MemoryBackend::MemfdHugetlb)
            .err()
            .unwrap();
        assert!(matches!(e, MemfdError::NotHugeAligned { .. }), "{e}");
        assert_eq!(
            "memfd,hugetlb"
                .parse::<MemoryBackend>()
                .unwrap()
                .to_string(),
            "memfd,hugetlb"
        );
    }

    #[test]
    fn anonymous_has_no_file() {
        let (mem, kind) =
            allocate_memory(&layout(&[(0, 1 << 20)]), MemoryBackend::Anonymous).unwrap();
        // The default advice ([`Thp::Host`]): huge pages only where the host
        // gives them unasked.
        let thp_here = thp::host_gives_huge(Sharing::Anonymous, Thp::default());
        assert_eq!(kind == PageKind::Transparent, thp_here);
        assert!(mem.iter().all(|r| r.file_offset().is_none()));
    }

    /// The `/proc/self/smaps` lines of the mapping holding `addr`.
    fn smaps_of(addr: usize) -> Vec<String> {
        let text = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut out = Vec::new();
        let mut inside = false;
        for line in text.lines() {
            let head = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = head.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = a <= addr && addr < b;
                    continue;
                }
            }
            if inside {
                out.push(line.to_string());
            }
        }
        out
    }

    fn smaps_field(lines: &[String], name: &str) -> String {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {lines:?}"))
            .trim()
            .to_string()
    }

    /// Anonymous memory is advised `MADV_HUGEPAGE` by default and
    /// `MADV_NOHUGEPAGE` with [`Thp::Off`] (the mapping's `VmFlags` `hg` /
    /// `nh`); where the host honours the advice, writing every page of an
    /// 8 MiB region makes it huge pages, and with `Off` never.
    #[test]
    fn anonymous_memory_is_thp_advised_unless_turned_off() {
        let size = 8u64 << 20;
        for thp in [Thp::On, Thp::Off] {
            let options = MemoryOptions {
                backend: MemoryBackend::Anonymous,
                thp,
            };
            let (mem, _) = allocate_memory(&layout(&[(0, size)]), options).unwrap();
            for page in (0..size).step_by(4096) {
                mem.write_obj(1u8, GuestAddress(page)).unwrap();
            }
            let host = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
            let lines = smaps_of(host);
            let flags = smaps_field(&lines, "VmFlags:");
            let huge_kb: u64 = smaps_field(&lines, "AnonHugePages:")
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap();
            let flag = if thp == Thp::On { "hg" } else { "nh" };
            assert!(
                flags.split_whitespace().any(|f| f == flag),
                "{thp}: {flags}"
            );
            if thp == Thp::Off {
                assert_eq!(huge_kb, 0, "THP off");
            } else if thp::host_gives_huge(Sharing::Anonymous, thp) {
                assert!(
                    huge_kb >= 2048,
                    "THP on, host honours it: {huge_kb} kB huge"
                );
            }
            eprintln!("{thp}: {huge_kb} kB of 8 MiB in huge pages");
        }
    }
}
