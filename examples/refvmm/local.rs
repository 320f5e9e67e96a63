//! The same-host hand-over (`migrate --local`, `upgrade`): before the
//! engine's handshake, the source passes its guest memory's memfds and its
//! NICs' TAP descriptors over the Unix socket (`SCM_RIGHTS`, one message:
//! [`Handover`] as JSON, then the descriptors: the regions' in layout order,
//! then the NICs'). The destination maps the memfds `MAP_SHARED` as its
//! guest memory and runs the engine in local mode: no page is copied.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use livemig::memory::{GuestRam, MemoryLayout, RegionDesc};
use livemig::transport::{StreamAcceptor, Transport, UnixTransport};
use livemig_kvm::fdpass::{recv_fds, send_fds};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::net::NetBackend;
use crate::vmm::Machine;

/// The version of [`Handover`] this build writes and reads.
pub const HANDOVER_VERSION: u32 = 1;

/// The largest [`Handover`] payload a destination reads.
const MAX_HANDOVER: usize = 64 << 10;

/// The message that carries the descriptors.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Handover {
    /// [`HANDOVER_VERSION`].
    pub version: u32,
    /// One per guest memory region (and per memfd, in this order).
    pub regions: Vec<RegionFd>,
    /// One per NIC (and per TAP descriptor after the memfds, in this order).
    pub nics: Vec<NicFd>,
}

/// A region and where its memfd maps it.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegionFd {
    pub guest_addr: u64,
    pub size: u64,
    /// File offset of the region's first byte.
    pub offset: u64,
}

/// A NIC whose TAP descriptor travels.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NicFd {
    /// The `--net` spec it was opened with (TAP name, MAC, addresses).
    pub spec: String,
}

/// Each region's memfd and offset, or why the memory cannot be handed over.
fn memory_files(ram: &GuestRam) -> Result<Vec<(BorrowedFd<'_>, RegionFd)>, String> {
    ram.iter()
        .map(|r| match r.file_offset() {
            Some(fo) if r.flags() & libc::MAP_SHARED != 0 => Ok((
                fo.file().as_fd(),
                RegionFd {
                    guest_addr: r.start_addr().0,
                    size: r.len(),
                    offset: fo.start(),
                },
            )),
            _ => Err(
                "--local needs guest memory another process can map: start the VMM with \
                 --memory-backend memfd (this one has private anonymous memory)"
                    .to_string(),
            ),
        })
        .collect()
}

/// Refuses a hand-over of memory that cannot be shared (before anything is
/// sent).
pub fn check_shareable(m: &Machine) -> Result<(), String> {
    memory_files(m.vm.ram()).map(|_| ())
}

/// Sends the memfds and TAP descriptors of `m` on `sock`.
pub fn send_handover(sock: &UnixStream, m: &Machine) -> Result<(), String> {
    let files = memory_files(m.vm.ram())?;
    let mut fds: Vec<BorrowedFd<'_>> = files.iter().map(|(fd, _)| *fd).collect();
    fds.extend(m.nets.iter().map(NetBackend::fd));
    let msg = Handover {
        version: HANDOVER_VERSION,
        regions: files.into_iter().map(|(_, r)| r).collect(),
        nics: m.nets.iter().map(|n| NicFd { spec: n.spec() }).collect(),
    };
    let payload = serde_json::to_vec(&msg).map_err(|e| e.to_string())?;
    send_fds(sock, &payload, &fds).map_err(|e| format!("passing the descriptors: {e}"))
}

/// What a destination received: its guest memory (the source's, mapped)
/// and its NICs (the source's TAPs).
pub struct Received {
    pub memory: GuestRam,
    pub nets: Vec<NetBackend>,
}

/// Receives the descriptors on `sock` and maps the memory.
pub fn recv_handover(sock: &UnixStream) -> Result<Received, String> {
    let (payload, fds) =
        recv_fds(sock, MAX_HANDOVER).map_err(|e| format!("receiving the descriptors: {e}"))?;
    let msg: Handover =
        serde_json::from_slice(&payload).map_err(|e| format!("bad hand-over header: {e}"))?;
    if msg.version != HANDOVER_VERSION {
        return Err(format!(
            "hand-over header version {} (this build reads {HANDOVER_VERSION})",
            msg.version
        ));
    }
    if fds.len() != msg.regions.len() + msg.nics.len() {
        return Err(format!(
            "{} descriptors for {} regions and {} NICs",
            fds.len(),
            msg.regions.len(),
            msg.nics.len()
        ));
    }
    let mut fds = fds.into_iter();
    let layout = MemoryLayout::new(
        msg.regions
            .iter()
            .map(|r| RegionDesc {
                guest_addr: r.guest_addr,
                size: r.size,
            })
            .collect(),
    )
    .map_err(|e| format!("hand-over layout: {e}"))?;
    let files: Vec<(File, u64)> = msg
        .regions
        .iter()
        .zip(fds.by_ref())
        .map(|(r, fd)| (File::from(fd), r.offset))
        .collect();
    let memory = livemig_kvm::memfd::map_shared(&layout, files).map_err(|e| e.to_string())?;
    let nets = msg
        .nics
        .iter()
        .zip(fds)
        .map(|(n, fd)| NetBackend::from_fd(&n.spec, fd))
        .collect::<Result<_, _>>()?;
    Ok(Received { memory, nets })
}

/// Whether the first bytes waiting on `sock` are a hand-over (a descriptor
/// count, at most 253) rather than an engine frame (magic `LM`). Waits at
/// most `timeout` for them.
pub fn is_handover(sock: &UnixStream, timeout: Duration) -> Result<bool, String> {
    sock.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut b = [0u8; 4];
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: `b` is a writable 4-byte buffer; MSG_PEEK leaves the
        // bytes (and any descriptors riding on them) queued.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                b.as_mut_ptr().cast(),
                b.len(),
                libc::MSG_PEEK | libc::MSG_WAITALL,
            )
        };
        if n == 4 {
            break;
        }
        if n == 0 {
            return Err("the peer closed the connection".into());
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("reading the first bytes: {e}"));
            }
        }
        if Instant::now() > deadline {
            return Err("the peer sent nothing".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    sock.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(u32::from_le_bytes(b) as usize <= livemig_kvm::fdpass::MAX_FDS)
}

/// A Unix listener of `receive`, bound here (not by the engine) so that
/// the first connection can be looked at; it also accepts a migration's
/// page streams. Removes its socket file when dropped.
pub struct UnixAcceptor {
    listener: Option<UnixListener>,
    path: PathBuf,
}

impl UnixAcceptor {
    /// Binds `path` (an existing socket nobody listens on is replaced).
    pub fn bind(path: &Path) -> Result<Self, String> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(format!("{} is in use", path.display()));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| format!("listening on {}: {e}", path.display()))?;
        Ok(UnixAcceptor {
            listener: Some(listener),
            path: path.to_path_buf(),
        })
    }

    /// Waits for one connection.
    pub fn accept(&self) -> Result<UnixStream, String> {
        let l = self.listener.as_ref().ok_or("the listener is closed")?;
        l.accept()
            .map(|(s, _)| s)
            .map_err(|e| format!("accepting on {}: {e}", self.path.display()))
    }

    /// A connection as the engine's transport.
    pub fn transport(&self, s: UnixStream) -> Box<dyn Transport> {
        Box::new(UnixTransport::new(s, &self.path))
    }
}

impl StreamAcceptor for UnixAcceptor {
    fn accept_stream(&mut self, timeout: Duration) -> std::io::Result<Box<dyn Transport>> {
        let l = self.listener.as_ref().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotConnected, "the listener is closed")
        })?;
        l.set_nonblocking(true)?;
        let deadline = Instant::now() + timeout;
        let r = loop {
            match l.accept() {
                Ok((s, _)) => break Ok(s),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        break Err(std::io::ErrorKind::TimedOut.into());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => break Err(e),
            }
        };
        l.set_nonblocking(false)?;
        let s = r?;
        s.set_nonblocking(false)?;
        Ok(self.transport(s))
    }

    fn close(&mut self) {
        self.listener = None;
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for UnixAcceptor {
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(len: u64) -> File {
        // SAFETY: a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"handover-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nothing else owns.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    fn send(msg: &Handover, files: &[&File]) -> Result<Received, String> {
        let (a, b) = UnixStream::pair().unwrap();
        let payload = serde_json::to_vec(msg).unwrap();
        let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
        send_fds(&a, &payload, &fds).unwrap();
        assert!(is_handover(&b, Duration::from_secs(1)).unwrap());
        recv_handover(&b)
    }

    fn one_region(version: u32) -> Handover {
        Handover {
            version,
            regions: vec![RegionFd {
                guest_addr: 0,
                size: 1 << 20,
                offset: 0,
            }],
            nics: Vec::new(),
        }
    }

    #[test]
    fn the_memory_arrives_mapped_and_shared() {
        let f = memfd(1 << 20);
        std::os::unix::fs::FileExt::write_all_at(&f, &0xfeed_u64.to_le_bytes(), 4096).unwrap();
        let got = send(&one_region(HANDOVER_VERSION), &[&f]).unwrap();
        use vm_memory::Bytes;
        let v: u64 = got.memory.read_obj(vm_memory::GuestAddress(4096)).unwrap();
        assert_eq!(v, 0xfeed, "the destination sees the source's bytes");
        got.memory
            .write_obj(7u64, vm_memory::GuestAddress(8192))
            .unwrap();
        let mut b = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 8192).unwrap();
        assert_eq!(u64::from_le_bytes(b), 7, "one memory, not a copy");
    }

    #[test]
    fn another_version_or_fd_count_is_refused() {
        let f = memfd(1 << 20);
        let e = send(&one_region(2), &[&f]).err().unwrap();
        assert!(e.contains("version 2"), "{e}");
        let e = send(&one_region(HANDOVER_VERSION), &[&f, &f])
            .err()
            .unwrap();
        assert!(e.contains("2 descriptors for 1 regions"), "{e}");
        let small = memfd(4096);
        let e = send(&one_region(HANDOVER_VERSION), &[&small])
            .err()
            .unwrap();
        assert!(e.contains("the file has 4096 bytes"), "{e}");
    }

    #[test]
    fn an_engine_frame_is_not_a_handover() {
        let (mut a, b) = UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut a, &[0x4d, 0x4c, 1, 0]).unwrap();
        assert!(!is_handover(&b, Duration::from_secs(1)).unwrap());
    }
}
