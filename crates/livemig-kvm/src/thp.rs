//! Transparent huge pages (THP) for guest memory: the advice given to the
//! kernel for every region that is not hugetlb ([`Thp`]), and what the
//! host's THP settings make of it ([`host_gives_huge`]).
//!
//! `madvise(MADV_HUGEPAGE)` (the default, as QEMU and Cloud Hypervisor do
//! for anonymous guest RAM) lets the kernel back each aligned 2 MiB of the
//! region with one huge page: a first touch faults in and zeroes 2 MiB at
//! once instead of 512 faults of 4 KiB (a migration destination filling
//! fresh memory: `MADV_POPULATE_WRITE` of 256–512 MiB measured 1.4 against
//! 9.6 GB/s on a quiet development host, 0.2–0.8 against 2.2–4.4 GB/s on a
//! loaded one — but see docs/benchmarks.md, issue 16: inside a VM whose
//! balloon returns freed memory to its host, a huge page that was handed
//! back is slower to fault in than 4 KiB pages), and KVM can map it with
//! large pages. The price: memory follows what the guest touched at 2 MiB
//! granularity — a guest touching one byte per 2 MiB holds 2 MiB per touch,
//! not 4 KiB. [`Thp::Off`] keeps 4 KiB pages.
//!
//! Post-copy (livemig-uffd) works on advised memory: its `arm` drops every
//! missing page (`MADV_DONTNEED` splits a huge page), so a missing page
//! inside a huge page that was filled before the switchover still faults.
//!
//! The advice never fails a VM: where the host has no THP (the kernel built
//! without it, or its setting `never`), or shared memory without shmem THP
//! (`shmem_enabled` `never`, the common default: a memfd stays in 4 KiB
//! pages), the memory is ordinary pages and the reason is logged.

use std::str::FromStr;

use livemig::memory::GuestRam;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Where the host's THP settings are.
const SYSFS: &str = "/sys/kernel/mm/transparent_hugepage";

/// Transparent huge pages for guest memory that is not hugetlb.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Thp {
    /// No advice (the default): the host's THP setting decides — huge
    /// pages only where it is `always` (`enabled` for anonymous memory,
    /// `shmem_enabled` `always`, `within_size` or `force` for a memfd).
    /// Measured on this project's development host (a VM whose balloon
    /// reports free memory to its host), advising huge pages made real
    /// migrations slower (docs/benchmarks.md, issue 16), so nothing is
    /// advised unless asked.
    #[default]
    Host,
    /// `madvise(MADV_HUGEPAGE)` every region (what QEMU and Cloud
    /// Hypervisor do by default): 2 MiB pages where the host's setting is
    /// `always` or `madvise`/`advise`.
    On,
    /// `madvise(MADV_NOHUGEPAGE)` every region: 4 KiB pages even where the
    /// host's setting is `always` — memory that follows what the guest
    /// touched page by page.
    Off,
}

impl FromStr for Thp {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(Thp::Host),
            "on" => Ok(Thp::On),
            "off" => Ok(Thp::Off),
            other => Err(format!("'{other}': expected host, on or off")),
        }
    }
}

impl std::fmt::Display for Thp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Thp::Host => "host",
            Thp::On => "on",
            Thp::Off => "off",
        })
    }
}

/// The kind of memory a THP setting is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Private anonymous memory (the host's `enabled`).
    Anonymous,
    /// Shared memory, a memfd (the host's `shmem_enabled`).
    Shmem,
}

/// The host's THP setting for `sharing` at the 2 MiB size, as the kernel
/// names it (`always`, `madvise`, `never`, ...; `within_size`, `advise`,
/// `deny`, `force` for shared memory), or `None` where the kernel has no
/// THP. A per-size setting (`hugepages-2048kB/`) other than `inherit` wins
/// over the top-level one.
pub fn host_setting(sharing: Sharing) -> Option<String> {
    let file = match sharing {
        Sharing::Anonymous => "enabled",
        Sharing::Shmem => "shmem_enabled",
    };
    let per_size = read_choice(&format!("{SYSFS}/hugepages-2048kB/{file}"));
    match per_size {
        Some(s) if s != "inherit" => Some(s),
        _ => read_choice(&format!("{SYSFS}/{file}")),
    }
}

/// Whether memory of `sharing` advised with `thp` gets huge pages on this
/// host (where the kernel can find free 2 MiB pages: it falls back to
/// 4 KiB pages silently where it cannot).
pub fn host_gives_huge(sharing: Sharing, thp: Thp) -> bool {
    let Some(setting) = host_setting(sharing) else {
        return false;
    };
    gives_huge(&setting, thp)
}

/// [`host_gives_huge`] for a setting already read.
fn gives_huge(setting: &str, thp: Thp) -> bool {
    match (thp, setting) {
        (Thp::Off, _) => false,
        (Thp::Host, "always" | "within_size" | "force") => true,
        (Thp::Host, _) => false,
        // `force` ignores the advice, `always` and `within_size` do not
        // need it (and `MADV_NOHUGEPAGE`, Off, refuses them).
        (Thp::On, "always" | "madvise" | "advise" | "within_size" | "force") => true,
        (Thp::On, _) => false,
    }
}

/// The bracketed choice of a sysfs setting (`always [madvise] never`).
fn read_choice(path: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_string())
}

/// Gives every region of `memory` the advice of `thp`. A refused advice
/// (a kernel without THP: `EINVAL`) is returned as the error, the memory
/// is left as it was and stays usable: callers log it and go on.
pub fn advise(memory: &GuestRam, thp: Thp) -> std::io::Result<()> {
    let advice = match thp {
        Thp::Host => return Ok(()),
        Thp::On => libc::MADV_HUGEPAGE,
        Thp::Off => libc::MADV_NOHUGEPAGE,
    };
    for r in memory.iter() {
        let host = memory
            .get_host_address(r.start_addr())
            .map_err(std::io::Error::other)?;
        let len = usize::try_from(r.len()).map_err(std::io::Error::other)?;
        // SAFETY: host .. host + len is this region's own mapping (vm-memory
        // maps each region whole); the advice only changes how the kernel
        // backs pages not yet faulted in, never their contents.
        let rc = unsafe { libc::madvise(host.cast(), len, advice) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_on_and_off() {
        for t in [Thp::Host, Thp::On, Thp::Off] {
            assert_eq!(t.to_string().parse::<Thp>().unwrap(), t);
        }
        assert_eq!(Thp::default(), Thp::Host);
        assert!("yes"
            .parse::<Thp>()
            .unwrap_err()
            .contains("host, on or off"));
    }

    #[test]
    fn which_settings_honour_the_advice() {
        for s in ["always", "madvise", "advise", "within_size", "force"] {
            assert!(gives_huge(s, Thp::On), "{s}");
            assert!(!gives_huge(s, Thp::Off), "{s}");
        }
        for s in ["never", "deny", "inherit"] {
            assert!(!gives_huge(s, Thp::On), "{s}");
        }
        // No advice: only the settings that need none.
        for s in ["always", "within_size", "force"] {
            assert!(gives_huge(s, Thp::Host), "{s}");
        }
        for s in ["madvise", "advise", "never", "deny"] {
            assert!(!gives_huge(s, Thp::Host), "{s}");
        }
    }

    #[test]
    fn reads_the_bracketed_choice() {
        let dir = std::env::temp_dir().join(format!("livemig-thp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("enabled");
        std::fs::write(&f, "always [madvise] never\n").unwrap();
        assert_eq!(read_choice(f.to_str().unwrap()).as_deref(), Some("madvise"));
        std::fs::write(&f, "no brackets\n").unwrap();
        assert_eq!(read_choice(f.to_str().unwrap()), None);
        std::fs::remove_dir_all(&dir).unwrap();
        // This host's settings, for the log of a test run.
        eprintln!(
            "host THP: anonymous {:?}, shmem {:?}",
            host_setting(Sharing::Anonymous),
            host_setting(Sharing::Shmem)
        );
    }
}
