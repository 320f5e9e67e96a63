//! `--pid-file`: the pid of the VMM that runs the guest, for supervisors
//! (systemd's `PIDFile=`, scripts). Written whole (a temporary file renamed
//! over the path), so a reader sees the old pid or the new one, never a
//! part; removed by a VMM only while it still names that VMM.

use std::path::Path;

/// Writes `pid` to `path` (atomically: `path.<our pid>.tmp`, renamed).
pub fn write(path: &Path, pid: u32) -> Result<(), String> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{pid}\n"))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("writing the pid file {}: {e}", path.display())
        })
}

/// The pid `path` names, if it names one.
pub fn read(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Removes `path` if it names this process (after an upgrade it names the
/// new VMM, which owns it from then on).
pub fn remove_if_ours(path: &Path) {
    if read(path) == Some(std::process::id()) {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_read_and_removed_only_while_ours() {
        let dir = std::env::temp_dir().join(format!("refvmm-pidfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("vm.pid");
        write(&p, std::process::id()).unwrap();
        assert_eq!(read(&p), Some(std::process::id()));
        remove_if_ours(&p);
        assert!(!p.exists());
        write(&p, 1).unwrap();
        remove_if_ours(&p);
        assert_eq!(read(&p), Some(1), "another VMM's pid file stays");
        let e = write(&dir.join("missing/vm.pid"), 1).unwrap_err();
        assert!(e.contains("missing/vm.pid"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
