//! Whether the kernel would back a mapping with transparent huge pages:
//! its `VmFlags` in `/proc/self/smaps` (`hg`: advised `MADV_HUGEPAGE`,
//! `nh`: `MADV_NOHUGEPAGE`) against the host's setting
//! (`/sys/kernel/mm/transparent_hugepage/enabled`, `shmem_enabled` for
//! shared memory).

use std::fs::File;
use std::io::{BufRead, BufReader};

const SYSFS: &str = "/sys/kernel/mm/transparent_hugepage";

/// Whether the mapping holding host address `addr` (a shared file if
/// `shared`) takes transparent huge pages; false where it cannot be told.
pub(super) fn expects_huge_pages(addr: usize, shared: bool) -> bool {
    let setting = if shared { "shmem_enabled" } else { "enabled" };
    let Ok(host) = std::fs::read_to_string(format!("{SYSFS}/{setting}")) else {
        return false;
    };
    let Some(chosen) = selected(&host) else {
        return false;
    };
    let (always, advised) = match chosen {
        "always" | "within_size" | "force" => (true, true),
        "madvise" | "advise" => (false, true),
        _ => return false,
    };
    let Some(flags) = vm_flags(addr) else {
        return false;
    };
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    !has("nh") && (always || (advised && has("hg")))
}

/// The bracketed choice of a sysfs setting (`always [madvise] never`).
fn selected(setting: &str) -> Option<&str> {
    let start = setting.find('[')? + 1;
    let end = start + setting[start..].find(']')?;
    Some(&setting[start..end])
}

/// The `VmFlags` line of the mapping holding `addr` in `/proc/self/smaps`
/// (read only up to that mapping: the kernel walks each mapping's pages as
/// it is read).
fn vm_flags(addr: usize) -> Option<String> {
    let smaps = BufReader::new(File::open("/proc/self/smaps").ok()?);
    let mut inside = false;
    for line in smaps.lines() {
        let line = line.ok()?;
        if let Some((start, end)) = range_of(&line) {
            if inside {
                return None; // the mapping had no VmFlags line
            }
            inside = (start..end).contains(&addr);
            if start > addr {
                return None;
            }
        } else if inside {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                return Some(flags.to_string());
            }
        }
    }
    None
}

/// The address range of a mapping's header line (`start-end perms ...`).
fn range_of(line: &str) -> Option<(usize, usize)> {
    let (range, _) = line.split_once(' ')?;
    let (a, b) = range.split_once('-')?;
    let a = usize::from_str_radix(a, 16).ok()?;
    let b = usize::from_str_radix(b, 16).ok()?;
    Some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advice_is_read_back_from_smaps() {
        let len = 4 << 20;
        // SAFETY: a new private anonymous mapping; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let addr = p as usize + 4096;
        assert!(vm_flags(addr).is_some_and(|f| !f.contains("hg")));
        // SAFETY: advice on our own mapping.
        assert_eq!(unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) }, 0);
        assert!(vm_flags(addr).is_some_and(|f| f.split_whitespace().any(|x| x == "hg")));
        let host = std::fs::read_to_string(format!("{SYSFS}/enabled")).unwrap_or_default();
        let want = matches!(selected(&host), Some("always" | "madvise"));
        assert_eq!(expects_huge_pages(addr, false), want, "host: {host}");
        // SAFETY: advice on our own mapping.
        assert_eq!(unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) }, 0);
        assert!(!expects_huge_pages(addr, false));
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(p, len) };
        assert_eq!(selected("always [madvise] never"), Some("madvise"));
        assert_eq!(selected("never"), None);
    }
}
