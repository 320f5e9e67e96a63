//! Passing file descriptors between processes over a Unix stream socket
//! (`SCM_RIGHTS`), for a same-host hand-over (issue 18): guest memory
//! memfds and TAP fds travel to the new VMM instead of their contents.
//! Not wired into migration yet.
//!
//! One message is an 8-byte header — fd count u32, payload length u32,
//! little-endian — then the payload; the descriptors ride on the header's
//! bytes (one `sendmsg`). The receiver reads exactly the header with room
//! for at most [`MAX_FDS`] descriptors, checks that the count it got is the
//! count announced and that the payload fits its limit (before
//! allocating), then reads the payload. Received descriptors are owned
//! ([`OwnedFd`]: closed on drop, also on every error path) and marked
//! close-on-exec right after `recvmsg` (another thread forking and exec'ing
//! in that instant would inherit them: vmm-sys-util's `recvmsg` does not
//! pass `MSG_CMSG_CLOEXEC`).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Most descriptors in one message (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

const HEADER: usize = 8;

/// Failures sending or receiving descriptors.
#[derive(Debug, thiserror::Error)]
pub enum FdPassError {
    /// More than [`MAX_FDS`] descriptors, or a payload over 4 GiB.
    #[error("message too large: {0}")]
    TooLarge(String),
    /// The socket failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The peer closed the connection before a whole message arrived.
    #[error("peer closed the connection")]
    Closed,
    /// The header announced a different number of descriptors than arrived.
    #[error("announced {announced} descriptors, received {received}")]
    FdCount {
        /// From the header.
        announced: u32,
        /// Attached to it.
        received: usize,
    },
    /// The payload is longer than the receiver accepts.
    #[error("payload of {len} bytes exceeds the limit of {limit}")]
    PayloadLimit {
        /// From the header.
        len: u32,
        /// The receiver's limit.
        limit: usize,
    },
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> FdPassError {
    move |source| FdPassError::Io { op, source }
}

/// Sends `payload` with `fds` attached as one message.
pub fn send_fds(
    sock: &UnixStream,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), FdPassError> {
    if fds.len() > MAX_FDS {
        return Err(FdPassError::TooLarge(format!(
            "{} descriptors (at most {MAX_FDS})",
            fds.len()
        )));
    }
    let len = u32::try_from(payload.len())
        .map_err(|_| FdPassError::TooLarge(format!("{} payload bytes", payload.len())))?;
    let mut header = [0u8; HEADER];
    header[..4].copy_from_slice(&(fds.len() as u32).to_le_bytes());
    header[4..].copy_from_slice(&len.to_le_bytes());
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = sock
        .send_with_fds(&[&header[..]], &raw)
        .map_err(|e| FdPassError::Io {
            op: "sendmsg",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
    // The descriptors went with the first byte; the rest is plain data.
    let mut w = sock;
    w.write_all(&header[sent..])
        .and_then(|()| w.write_all(payload))
        .map_err(io("write"))
}

/// Receives one message: its payload (at most `max_payload` bytes) and its
/// descriptors (close-on-exec).
pub fn recv_fds(
    sock: &UnixStream,
    max_payload: usize,
) -> Result<(Vec<u8>, Vec<OwnedFd>), FdPassError> {
    let mut header = [0u8; HEADER];
    let mut raw = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER,
    }];
    // SAFETY: the iovec points at `header`, which lives and is exclusively
    // borrowed for the call; any bytes may be written there.
    let (n, nfds) =
        unsafe { sock.recv_with_fds(&mut iov, &mut raw) }.map_err(|e| FdPassError::Io {
            op: "recvmsg",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
    let fds: Vec<OwnedFd> = raw[..nfds]
        .iter()
        // SAFETY: recvmsg installed these descriptors in this process and
        // nothing else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    for fd in &fds {
        set_cloexec(fd)?;
    }
    if n == 0 {
        return Err(FdPassError::Closed);
    }
    let mut r = sock;
    r.read_exact(&mut header[n..]).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FdPassError::Closed,
        _ => FdPassError::Io {
            op: "read",
            source: e,
        },
    })?;
    let announced = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if announced as usize != fds.len() {
        return Err(FdPassError::FdCount {
            announced,
            received: fds.len(),
        });
    }
    if len as usize > max_payload {
        return Err(FdPassError::PayloadLimit {
            len,
            limit: max_payload,
        });
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FdPassError::Closed,
        _ => FdPassError::Io {
            op: "read",
            source: e,
        },
    })?;
    Ok((payload, fds))
}

fn set_cloexec(fd: &OwnedFd) -> Result<(), FdPassError> {
    // SAFETY: F_GETFD/F_SETFD on a descriptor this process owns; no memory
    // is passed.
    let ok = unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFD);
        flags >= 0 && libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags | libc::FD_CLOEXEC) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(io("fcntl(FD_CLOEXEC)")(std::io::Error::last_os_error()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    fn memfd(content: &[u8]) -> File {
        // SAFETY: a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"fdpass-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: just created, owned by nothing else.
        let f = unsafe { File::from_raw_fd(fd) };
        f.write_all_at(content, 0).unwrap();
        f
    }

    fn is_cloexec(fd: &OwnedFd) -> bool {
        // SAFETY: F_GETFD on an owned descriptor.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) & libc::FD_CLOEXEC != 0 }
    }

    /// The received descriptors are the same open files: what one side
    /// writes, the other reads.
    #[test]
    fn memfds_travel_and_share_their_file() {
        let (a, b) = UnixStream::pair().unwrap();
        let m1 = memfd(b"first");
        let m2 = memfd(b"second");
        send_fds(&a, b"regions", &[m1.as_fd(), m2.as_fd()]).unwrap();
        let (payload, fds) = recv_fds(&b, 1024).unwrap();
        assert_eq!(payload, b"regions");
        assert_eq!(fds.len(), 2);
        assert!(fds.iter().all(is_cloexec));
        let mut got = [0u8; 6];
        let r2 = File::from(fds.into_iter().nth(1).unwrap());
        r2.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(&got, b"second");
        r2.write_all_at(b"SECOND", 0).unwrap();
        m2.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(&got, b"SECOND");
    }

    /// Messages keep their boundaries and their own descriptors, with or
    /// without any.
    #[test]
    fn consecutive_messages_stay_apart() {
        let (a, b) = UnixStream::pair().unwrap();
        let m = memfd(b"x");
        send_fds(&a, b"", &[]).unwrap();
        send_fds(&a, b"one", &[m.as_fd()]).unwrap();
        send_fds(&a, &[7u8; 100_000], &[]).unwrap();
        let (p, f) = recv_fds(&b, 1 << 20).unwrap();
        assert!(p.is_empty() && f.is_empty());
        let (p, f) = recv_fds(&b, 1 << 20).unwrap();
        assert_eq!((p.as_slice(), f.len()), (&b"one"[..], 1));
        let (p, f) = recv_fds(&b, 1 << 20).unwrap();
        assert_eq!((p.len(), f.len()), (100_000, 0));
    }

    #[test]
    fn a_payload_over_the_limit_is_refused_before_allocating() {
        let (a, b) = UnixStream::pair().unwrap();
        send_fds(&a, &[0u8; 64], &[]).unwrap();
        let e = recv_fds(&b, 63).unwrap_err();
        assert!(
            matches!(e, FdPassError::PayloadLimit { len: 64, limit: 63 }),
            "{e}"
        );
    }

    /// A header that announces more descriptors than came with it is
    /// refused (and the ones that came are closed with the error).
    #[test]
    fn a_wrong_descriptor_count_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let m = memfd(b"x");
        let mut header = [0u8; HEADER];
        header[..4].copy_from_slice(&2u32.to_le_bytes());
        a.send_with_fds(&[&header[..]], &[m.as_raw_fd()]).unwrap();
        let e = recv_fds(&b, 16).unwrap_err();
        assert!(
            matches!(
                e,
                FdPassError::FdCount {
                    announced: 2,
                    received: 1
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_closed_peer_is_reported() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(matches!(recv_fds(&b, 16), Err(FdPassError::Closed)));
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&[1, 0, 0]).unwrap();
        drop(a);
        assert!(matches!(recv_fds(&b, 16), Err(FdPassError::Closed)));
    }

    #[test]
    fn too_many_descriptors_are_refused_by_the_sender() {
        let (a, _b) = UnixStream::pair().unwrap();
        let m = memfd(b"x");
        let fds = vec![m.as_fd(); MAX_FDS + 1];
        assert!(matches!(
            send_fds(&a, b"", &fds),
            Err(FdPassError::TooLarge(_))
        ));
    }
}
