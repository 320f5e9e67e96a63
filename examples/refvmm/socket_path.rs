//! A listening Unix socket at a path that a VMM on the same host can take
//! over (the API socket and the console socket): `run` binds the path;
//! `receive` binds beside it and renames its socket over the path when the
//! guest resumes there, before the source learns that the migration
//! completed. The source removes the path at exit only if it still names
//! its own socket; since the new VMM's rename happened before, the source
//! never removes the new VMM's socket.

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// A listening socket bound at (or, before [`Listener::take_over`], beside)
/// its path. Removes its socket file when dropped, if the file is still
/// this socket (another VMM may have taken the path over).
pub struct Listener {
    listener: UnixListener,
    /// What the socket is, for errors ("API socket", "console socket").
    what: &'static str,
    path: PathBuf,
    /// While waiting to take over `path` (on `receive`): where it is bound.
    tmp: Option<PathBuf>,
    /// (device, inode) of the socket file.
    id: (u64, u64),
}

/// Device and inode of the file at `path`.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Removes `path` if it is still the file `id` (device, inode): another
/// VMM may have renamed its own socket over it.
pub fn remove_if_ours(path: &Path, id: (u64, u64)) {
    if file_id(path) == Some(id) {
        let _ = std::fs::remove_file(path);
    }
}

impl Listener {
    fn bind_at(
        what: &'static str,
        at: &Path,
        path: &Path,
        tmp: Option<PathBuf>,
    ) -> Result<Self, String> {
        let listener =
            UnixListener::bind(at).map_err(|e| format!("{what} {}: {e}", at.display()))?;
        let id = file_id(at).ok_or_else(|| format!("{what} {} vanished", at.display()))?;
        Ok(Listener {
            listener,
            what,
            path: path.to_path_buf(),
            tmp,
            id,
        })
    }

    /// Binds `path`. A stale socket file there is replaced; one somebody
    /// listens on is refused.
    pub fn bind(what: &'static str, path: &Path) -> Result<Self, String> {
        Self::bind_if_free(what, path)?
            .ok_or_else(|| format!("{what} {} is in use", path.display()))
    }

    /// [`Listener::bind`], or `None` when somebody listens on `path`.
    pub fn bind_if_free(what: &'static str, path: &Path) -> Result<Option<Self>, String> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Ok(None);
            }
            let _ = std::fs::remove_file(path);
        }
        Self::bind_at(what, path, path, None).map(Some)
    }

    /// Binds a temporary socket next to `path` (`PATH.<pid>.new`), to be
    /// renamed over `path` by [`Listener::take_over`] when the guest runs
    /// here.
    pub fn bind_for_takeover(what: &'static str, path: &Path) -> Result<Self, String> {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{}.new", std::process::id()));
        let tmp = PathBuf::from(name);
        let _ = std::fs::remove_file(&tmp);
        Self::bind_at(what, &tmp, path, Some(tmp.clone()))
    }

    /// Makes `path` name this socket (atomically: a client connecting to
    /// `path` reaches either the old VMM or this one). Does nothing for a
    /// socket bound at `path` or already taken over.
    pub fn take_over(&mut self) -> Result<(), String> {
        let Some(tmp) = self.tmp.take() else {
            return Ok(());
        };
        std::fs::rename(&tmp, &self.path).map_err(|e| {
            self.tmp = Some(tmp.clone());
            format!(
                "{}: renaming {} to {}: {e}",
                self.what,
                tmp.display(),
                self.path.display()
            )
        })
    }

    /// Where the socket file is now (beside the path until taken over)
    /// and its identity (device, inode).
    pub fn bound_file(&self) -> (PathBuf, (u64, u64)) {
        (self.bound_at().to_path_buf(), self.id)
    }

    fn bound_at(&self) -> &Path {
        self.tmp.as_deref().unwrap_or(&self.path)
    }

    /// The path this socket serves (or will, once taken over).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A second handle on the listening socket, for an accepting thread.
    pub fn try_clone(&self) -> Result<UnixListener, String> {
        self.listener
            .try_clone()
            .map_err(|e| format!("{} {}: {e}", self.what, self.path.display()))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        remove_if_ours(self.bound_at(), self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takeover_renames_and_only_the_owner_unlinks() {
        let dir = std::env::temp_dir().join(format!("refvmm-socket-path-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("c.sock");
        let old = Listener::bind("test socket", &path).unwrap();
        let e = Listener::bind("test socket", &path).err().unwrap();
        assert!(e.contains("in use"), "{e}");
        let mut new = Listener::bind_for_takeover("test socket", &path).unwrap();
        new.take_over().unwrap();
        assert!(UnixStream::connect(&path).is_ok());
        // The old VMM exits: the path is the new one's now and stays.
        drop(old);
        assert_eq!(file_id(&path), Some(new.id));
        drop(new);
        assert!(!path.exists());
        // A takeover that never happened leaves nothing behind.
        let pending = Listener::bind_for_takeover("test socket", &path).unwrap();
        let tmp = pending.tmp.clone().unwrap();
        assert!(tmp.exists());
        drop(pending);
        assert!(!tmp.exists() && !path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
