//! Unix stream socket transport.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::Transport;

/// A [`Transport`] over a Unix stream socket.
#[derive(Debug)]
pub struct UnixTransport {
    stream: UnixStream,
    peer: String,
}

impl UnixTransport {
    /// Wraps a connected stream; `path` is the socket path (used in error
    /// messages only).
    pub fn new(stream: UnixStream, path: &Path) -> Self {
        UnixTransport {
            stream,
            peer: format!("unix:{}", path.display()),
        }
    }

    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> io::Result<Self> {
        Ok(Self::new(UnixStream::connect(path)?, path))
    }

    /// The underlying stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }
}

impl Read for UnixTransport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        self.stream.read_vectored(bufs)
    }
}

impl Write for UnixTransport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.stream.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

impl Transport for UnixTransport {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }

    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_write_timeout(timeout)
    }

    fn shutdown(&self) -> io::Result<()> {
        match self.stream.shutdown(Shutdown::Both) {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            r => r,
        }
    }

    fn peer(&self) -> String {
        self.peer.clone()
    }

    fn unacked_bytes(&self) -> Option<u64> {
        super::link_info::unacked_bytes(self.stream.as_raw_fd())
    }

    fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(UnixTransport {
            stream: self.stream.try_clone()?,
            peer: self.peer.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{connect, listen, Endpoint, Transport};
    use crate::testing::transport::*;
    use std::path::PathBuf;

    fn sock_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("livemig-unix-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    fn pair(
        name: &str,
    ) -> (
        super::super::Listener,
        Box<dyn Transport>,
        Box<dyn Transport>,
    ) {
        let ep = Endpoint::Unix(sock_path(name));
        let l = listen(&ep).unwrap();
        assert_eq!(l.local_endpoint(), &ep);
        let c = connect(&ep, None).unwrap();
        let s = l.accept().unwrap();
        assert_eq!(c.peer(), ep.to_string());
        (l, c, s)
    }

    #[test]
    fn unix_carries_64mib() {
        let (_l, a, b) = pair("bulk.sock");
        carries_64mib(a, b);
    }

    #[test]
    fn unix_read_timeout() {
        let (_l, a, b) = pair("rto.sock");
        read_timeout_fires(a, b);
    }

    #[test]
    fn unix_write_timeout() {
        let (_l, a, b) = pair("wto.sock");
        write_timeout_fires(a, b);
    }

    #[test]
    fn unix_shutdown_unblocks_reader() {
        let (_l, a, b) = pair("shut.sock");
        shutdown_unblocks_reader(a, b);
    }

    #[test]
    fn unix_stale_socket_and_cleanup() {
        let path = sock_path("stale.sock");
        let ep = Endpoint::Unix(path.clone());
        // A stale socket file (bound, then the listener vanished without
        // cleanup) is replaced.
        {
            let raw = std::os::unix::net::UnixListener::bind(&path).unwrap();
            drop(raw);
        }
        assert!(path.exists());
        let l = listen(&ep).unwrap();
        // A second listener on a live socket is refused, and does not
        // remove the live one.
        let e = listen(&ep).unwrap_err();
        assert!(e.to_string().contains("listening"), "{e}");
        assert!(path.exists());
        drop(l);
        assert!(!path.exists(), "socket file not removed on drop");

        // A regular file is never removed.
        std::fs::write(&path, b"precious").unwrap();
        let e = listen(&ep).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_file(&path).unwrap();

        // Connecting to nothing fails with the endpoint in the message.
        let e = connect(&ep, None).err().unwrap();
        assert!(e.to_string().contains(&ep.to_string()), "{e}");
    }
}
