//! Where the device's frames go: the [`FrameBackend`] trait, a TAP backend
//! and an in-memory (Unix datagram socket pair) backend for tests.
//!
//! Frames are plain Ethernet frames without any header (the TAP is opened
//! with `IFF_TAP | IFF_NO_PI` and without `IFF_VNET_HDR`); the device adds
//! and strips the virtio-net header itself.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixDatagram;

/// A source and sink of Ethernet frames.
pub trait FrameBackend: Send {
    /// Sends one whole frame (without FCS).
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Receives one frame into `buf` without blocking: `Ok(None)` when no
    /// frame is waiting. A frame longer than `buf` is truncated.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// A descriptor that polls readable when a frame is waiting.
    fn poll_fd(&self) -> BorrowedFd<'_>;
}

/// Sets `O_NONBLOCK` on `fd` (and on every descriptor sharing its open file
/// description).
fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor we borrow for the call; no memory is
    // passed to the kernel.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with an integer flag set on the same borrowed
    // descriptor; no memory is passed to the kernel.
    if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// A TAP device's descriptor (`IFF_TAP | IFF_NO_PI`), switched to
/// non-blocking mode.
///
/// `O_NONBLOCK` is a property of the open file description, so descriptors
/// duplicated from this one (the announce sender's) are non-blocking too;
/// writes to a TAP do not block in practice (its send buffer is unlimited
/// by default).
#[derive(Debug)]
pub struct TapBackend {
    file: File,
}

impl TapBackend {
    /// Opens (or creates) the TAP `name` with [`livemig_announce::open_tap`].
    pub fn open(name: &str) -> io::Result<Self> {
        let fd = livemig_announce::open_tap(name).map_err(io::Error::other)?;
        Self::from_fd(fd)
    }

    /// Uses an already attached TAP descriptor (it must have been opened
    /// with `IFF_NO_PI` and without `IFF_VNET_HDR`).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(fd.as_fd())?;
        Ok(TapBackend {
            file: File::from(fd),
        })
    }
}

impl FrameBackend for TapBackend {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let n = retry(|| self.file.write(frame))?;
        if n != frame.len() {
            return Err(io::Error::other(format!(
                "short write to the TAP: {n} of {} bytes",
                frame.len()
            )));
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match retry(|| self.file.read(buf)) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// One end of a Unix datagram socket pair: every datagram is one frame.
/// The other end (returned by [`PairBackend::new`]) plays the network.
#[derive(Debug)]
pub struct PairBackend {
    sock: UnixDatagram,
}

impl PairBackend {
    /// A backend and the network's end of the pair (blocking).
    pub fn new() -> io::Result<(Self, UnixDatagram)> {
        let (a, b) = UnixDatagram::pair()?;
        a.set_nonblocking(true)?;
        Ok((PairBackend { sock: a }, b))
    }
}

impl FrameBackend for PairBackend {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let n = retry(|| self.sock.send(frame))?;
        if n != frame.len() {
            return Err(io::Error::other("short datagram send"));
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match retry(|| self.sock.recv(buf)) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_carries_whole_frames_and_never_blocks() {
        let (mut b, net) = PairBackend::new().unwrap();
        let mut buf = [0u8; 64];
        assert!(b.recv(&mut buf).unwrap().is_none());
        net.send(&[1, 2, 3]).unwrap();
        net.send(&[4; 10]).unwrap();
        assert_eq!(b.recv(&mut buf).unwrap(), Some(3));
        assert_eq!(&buf[..3], &[1, 2, 3]);
        assert_eq!(b.recv(&mut buf).unwrap(), Some(10));
        assert!(b.recv(&mut buf).unwrap().is_none());
        b.send(&[9; 60]).unwrap();
        let n = net.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[9; 60]);
    }
}
