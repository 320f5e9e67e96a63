//! TCP transport.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::Duration;

use super::Transport;

/// A [`Transport`] over a TCP connection, with `TCP_NODELAY` set (frames are
/// written whole, so Nagle's algorithm would only add latency to small
/// messages such as acknowledgements).
#[derive(Debug)]
pub struct TcpTransport {
    stream: TcpStream,
    peer: String,
}

impl TcpTransport {
    /// Wraps a connected stream and sets `TCP_NODELAY`.
    pub fn new(stream: TcpStream) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        let peer = match stream.peer_addr() {
            Ok(a) => format!("tcp:{a}"),
            Err(_) => "tcp:<unknown peer>".to_string(),
        };
        Ok(TcpTransport { stream, peer })
    }

    /// Connects to `addr` (`host:port`), trying every address it resolves to.
    /// `timeout` bounds each connection attempt.
    pub fn connect(addr: &str, timeout: Option<Duration>) -> io::Result<Self> {
        let stream = match timeout {
            None => TcpStream::connect(addr)?,
            Some(t) => {
                let mut last = None;
                let mut found = None;
                for a in addr.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, t) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                match (found, last) {
                    (Some(s), _) => s,
                    (None, Some(e)) => return Err(e),
                    (None, None) => {
                        return Err(io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("'{addr}' resolves to no address"),
                        ))
                    }
                }
            }
        };
        Self::new(stream)
    }

    /// The underlying stream.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Fixes the socket's receive buffer at `bytes` (`SO_RCVBUF`; the
    /// kernel doubles the value for its bookkeeping and stops growing the
    /// buffer by itself). What the kernel has taken into this buffer counts
    /// as acknowledged on the peer's side, where
    /// [`Transport::unacked_bytes`] no longer sees it: a bounded buffer keeps
    /// a reader that falls behind from hiding a backlog there (see
    /// [`super::DEFAULT_RECEIVE_BUFFER`]).
    pub fn set_receive_buffer(&self, bytes: usize) -> io::Result<()> {
        let n = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: SO_RCVBUF reads one int through the pointer, which points
        // to `n` (alive for the call) with its size; a bad fd or value makes
        // the call fail, nothing else.
        let r = unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&n as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Read for TcpTransport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        self.stream.read_vectored(bufs)
    }
}

impl Write for TcpTransport {
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

impl Transport for TcpTransport {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }

    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_write_timeout(timeout)
    }

    fn shutdown(&self) -> io::Result<()> {
        match self.stream.shutdown(Shutdown::Both) {
            // Already shut down or reset by the peer: nothing left to close.
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

    fn round_trip(&self) -> Option<Duration> {
        super::link_info::tcp_round_trip(self.stream.as_raw_fd())
    }

    fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(TcpTransport {
            stream: self.stream.try_clone()?,
            peer: self.peer.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{connect, listen, Endpoint};
    use crate::testing::transport::*;
    use std::time::Duration;

    fn pair() -> (Box<dyn super::Transport>, Box<dyn super::Transport>) {
        let l = listen(&"tcp:127.0.0.1:0".parse::<Endpoint>().unwrap()).unwrap();
        let ep = l.local_endpoint().clone();
        match &ep {
            Endpoint::Tcp(a) => assert!(!a.ends_with(":0"), "{a}"),
            other => panic!("{other}"),
        }
        let c = connect(&ep, Some(Duration::from_secs(5))).unwrap();
        let s = l.accept().unwrap();
        assert!(c.peer().starts_with("tcp:127.0.0.1:"), "{}", c.peer());
        (c, s)
    }

    #[test]
    fn tcp_carries_64mib() {
        let (a, b) = pair();
        carries_64mib(a, b);
    }

    #[test]
    fn tcp_read_timeout() {
        let (a, b) = pair();
        read_timeout_fires(a, b);
    }

    #[test]
    fn tcp_write_timeout() {
        let (a, b) = pair();
        write_timeout_fires(a, b);
    }

    #[test]
    fn tcp_shutdown_unblocks_reader() {
        let (a, b) = pair();
        shutdown_unblocks_reader(a, b);
    }

    #[test]
    fn tcp_connect_refused_and_timeout() {
        // Grab a free port, then close it: connecting is refused.
        let l = listen(&"tcp:127.0.0.1:0".parse::<Endpoint>().unwrap()).unwrap();
        let ep = l.local_endpoint().clone();
        drop(l);
        let e = connect(&ep, Some(Duration::from_secs(2))).err().unwrap();
        assert!(e.to_string().contains(&ep.to_string()), "{e}");
    }

    #[test]
    fn tcp_accept_timeout() {
        let l = listen(&"tcp:127.0.0.1:0".parse::<Endpoint>().unwrap()).unwrap();
        let e = l.accept_timeout(Duration::from_millis(30)).err().unwrap();
        assert!(e.is_timeout(), "{e}");
        let ep = l.local_endpoint().clone();
        let t = std::thread::spawn(move || connect(&ep, None).unwrap());
        let mut s = l.accept_timeout(Duration::from_secs(5)).unwrap();
        let mut c = t.join().unwrap();
        // The accepted socket is blocking again.
        use std::io::{Read, Write};
        c.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
    }
}
