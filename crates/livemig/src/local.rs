//! The same-host hand-over ("local mode"): what identifies the guest
//! memory both processes share, and the check that they do.
//!
//! In local mode the destination maps the very memory the source runs the
//! guest in (a memfd or another shared file, passed as a descriptor), so no
//! page is copied. The source says, in its `Hello`, which host it runs on
//! (the kernel's boot id) and which file backs each region (device, inode,
//! offset, length of its [`Backing::SharedFile`]); the destination compares
//! that with its own memory and refuses anything else: another host,
//! another file, or memory that cannot be shared. See `docs/protocol.md`,
//! "Local hand-over".

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::memory::{Backing, GuestMemory};

/// Where the kernel publishes this boot's random id.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// What identifies the file behind one region of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionIdentity {
    /// `st_dev` of the file.
    pub dev: u64,
    /// `st_ino` of the file.
    pub ino: u64,
    /// The file offset mapped at the region's first byte.
    pub offset: u64,
    /// The region's length in bytes.
    pub len: u64,
}

impl RegionIdentity {
    /// The wire form: `dev:ino:offset:len`, decimal.
    pub fn encode(&self) -> String {
        format!("{}:{}:{}:{}", self.dev, self.ino, self.offset, self.len)
    }

    /// Parses [`RegionIdentity::encode`]'s form.
    pub fn decode(s: &str) -> Option<Self> {
        let mut it = s.split(':').map(|p| p.parse::<u64>().ok());
        let id = RegionIdentity {
            dev: it.next()??,
            ino: it.next()??,
            offset: it.next()??,
            len: it.next()??,
        };
        it.next().is_none().then_some(id)
    }
}

/// The host and the shared files of a guest's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalIdentity {
    /// The host's boot id ([`BOOT_ID_PATH`]): equal on both sides only on
    /// the same host, in the same boot.
    pub boot_id: String,
    /// One entry per region, in layout order.
    pub regions: Vec<RegionIdentity>,
}

/// Why memory cannot be handed over locally.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum LocalError {
    /// A region is not a shared file mapping: nothing another process
    /// could map.
    #[error("region {index} is {what} memory, which another process cannot map: a local hand-over needs shared file memory (memfd)")]
    NotShared {
        /// The region's index.
        index: usize,
        /// Its backing ("private anonymous", "unspecified").
        what: &'static str,
    },
    /// `fstat` of a region's file failed.
    #[error("region {index}: fstat of its file failed: {errno}")]
    Stat {
        /// The region's index.
        index: usize,
        /// The OS error.
        errno: String,
    },
    /// The boot id could not be read.
    #[error("cannot read the host's boot id ({BOOT_ID_PATH}): {0}")]
    BootId(String),
    /// The two processes run on different hosts (or boots).
    #[error("the source runs on another host (boot id {source_id}, this host {here}): a local hand-over is for one host only")]
    DifferentHost {
        /// The source's boot id.
        source_id: String,
        /// This host's.
        here: String,
    },
    /// The sides have different numbers of regions.
    #[error("the source shares {source_n} region(s), this side has {here}")]
    RegionCount {
        /// The source's regions.
        source_n: usize,
        /// This side's.
        here: usize,
    },
    /// A region is backed by another file (or another part of it).
    #[error("region {index} is not the source's memory: the source's is file {source_id:?}, this side's {here:?} (dev, inode, offset, length)")]
    DifferentFile {
        /// The region's index.
        index: usize,
        /// What the source said.
        source_id: RegionIdentity,
        /// What this side has.
        here: RegionIdentity,
    },
}

impl LocalIdentity {
    /// The identity of `mem` on this host: refused unless every region is
    /// a [`Backing::SharedFile`].
    pub fn of(mem: &dyn GuestMemory) -> Result<Self, LocalError> {
        let regions = regions_of(mem)?;
        Ok(LocalIdentity {
            boot_id: boot_id()?,
            regions,
        })
    }

    /// Checks that `mem` (this side's memory) is the memory this identity
    /// (the source's) names, on this host.
    pub fn check(&self, mem: &dyn GuestMemory) -> Result<(), LocalError> {
        let here = boot_id()?;
        if here != self.boot_id {
            return Err(LocalError::DifferentHost {
                source_id: self.boot_id.clone(),
                here,
            });
        }
        let mine = regions_of(mem)?;
        if mine.len() != self.regions.len() {
            return Err(LocalError::RegionCount {
                source_n: self.regions.len(),
                here: mine.len(),
            });
        }
        for (index, (s, h)) in self.regions.iter().zip(&mine).enumerate() {
            if s != h {
                return Err(LocalError::DifferentFile {
                    index,
                    source_id: *s,
                    here: *h,
                });
            }
        }
        Ok(())
    }

    /// Whether any region of `mem` is backed by one of the files this
    /// identity names (whatever the offsets): such memory is the source's
    /// own guest memory, which a copying destination would destroy.
    pub fn shares_file_with(&self, mem: &dyn GuestMemory) -> bool {
        mem.regions().iter().any(|r| match r.backing {
            Backing::SharedFile { fd, .. } => stat(fd)
                .is_ok_and(|(dev, ino)| self.regions.iter().any(|s| s.dev == dev && s.ino == ino)),
            _ => false,
        })
    }
}

/// The identity of each region of `mem`.
fn regions_of(mem: &dyn GuestMemory) -> Result<Vec<RegionIdentity>, LocalError> {
    mem.regions()
        .iter()
        .enumerate()
        .map(|(index, r)| match r.backing {
            Backing::SharedFile { fd, offset } => {
                let (dev, ino) = stat(fd).map_err(|e| LocalError::Stat {
                    index,
                    errno: e.to_string(),
                })?;
                Ok(RegionIdentity {
                    dev,
                    ino,
                    offset,
                    len: r.len,
                })
            }
            Backing::PrivateAnonymous => Err(LocalError::NotShared {
                index,
                what: "private anonymous",
            }),
            _ => Err(LocalError::NotShared {
                index,
                what: "unspecified (Backing::Other)",
            }),
        })
        .collect()
}

/// `st_dev` and `st_ino` of `fd`.
fn stat(fd: BorrowedFd<'_>) -> std::io::Result<(u64, u64)> {
    // SAFETY: a zeroed `stat` is a valid out-buffer; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the borrow; `st` is a valid buffer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.st_dev, st.st_ino))
}

/// This host's boot id, trimmed.
pub fn boot_id() -> Result<String, LocalError> {
    std::fs::read_to_string(BOOT_ID_PATH)
        .map(|s| s.trim().to_string())
        .map_err(|e| LocalError::BootId(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_identity_round_trips_and_refuses_junk() {
        let id = RegionIdentity {
            dev: 5,
            ino: u64::MAX,
            offset: 4096,
            len: 1 << 30,
        };
        assert_eq!(RegionIdentity::decode(&id.encode()), Some(id));
        for bad in ["", "1:2:3", "1:2:3:4:5", "a:2:3:4", "1:2:3:-4"] {
            assert_eq!(RegionIdentity::decode(bad), None, "{bad}");
        }
    }
}
