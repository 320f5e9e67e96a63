//! The socket transports (feature `net`, on by default): TCP and Unix
//! stream sockets addressed as an [`Endpoint`], [`connect`] and
//! [`listen`], and the [`Dialer`] / [`OwnedAcceptor`] page-stream helpers
//! over them. The engine itself never uses this module: it sees only
//! [`Transport`]. Without the feature (`--no-default-features`) the crate
//! has no socket code at all; bring your own [`Transport`] (or use
//! [`super::duplex::DuplexTransport`]).
//!
//! ```no_run
//! use livemig::transport::{self, Endpoint};
//! use std::time::Duration;
//!
//! let ep: Endpoint = "tcp:127.0.0.1:0".parse()?;
//! let listener = transport::listen(&ep)?;
//! let real = listener.local_endpoint().clone(); // tcp:127.0.0.1:<port>
//! let client = transport::connect(&real, Some(Duration::from_secs(5)))?;
//! let server = listener.accept()?;
//! # Ok::<(), transport::TransportError>(())
//! ```

use std::fmt;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use super::{StreamAcceptor, StreamOpener, TcpTransport, Transport, TransportError, UnixTransport};

/// A [`StreamOpener`] that connects to an [`Endpoint`].
#[derive(Debug, Clone)]
pub struct Dialer {
    /// Where to connect.
    pub endpoint: Endpoint,
    /// Connection timeout (see [`connect`]).
    pub timeout: Option<Duration>,
}

impl StreamOpener for Dialer {
    fn open(&mut self) -> io::Result<Box<dyn Transport>> {
        connect(&self.endpoint, self.timeout).map_err(|e| io::Error::other(e.to_string()))
    }
}

impl StreamAcceptor for Listener {
    fn accept_stream(&mut self, timeout: Duration) -> io::Result<Box<dyn Transport>> {
        self.accept_timeout(timeout).map_err(|e| {
            let kind = if e.is_timeout() {
                io::ErrorKind::TimedOut
            } else {
                io::ErrorKind::Other
            };
            io::Error::new(kind, e.to_string())
        })
    }
}

/// A [`StreamAcceptor`] that owns a [`Listener`] and closes it in
/// [`StreamAcceptor::close`].
#[derive(Debug)]
pub struct OwnedAcceptor(pub Option<Listener>);

impl StreamAcceptor for OwnedAcceptor {
    fn accept_stream(&mut self, timeout: Duration) -> io::Result<Box<dyn Transport>> {
        match self.0.as_mut() {
            Some(l) => l.accept_stream(timeout),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the listener is closed",
            )),
        }
    }

    fn close(&mut self) {
        self.0 = None;
    }
}

const ENDPOINT_FORMS: &str = "expected tcp:HOST:PORT or unix:PATH";

/// Where to connect or listen: `tcp:HOST:PORT` or `unix:PATH`.
///
/// `HOST` is a name, an IPv4 address, or an IPv6 address in brackets
/// (`tcp:[::1]:4444`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Endpoint {
    /// TCP; the string is `host:port` (port validated on parsing).
    Tcp(String),
    /// A Unix stream socket at a filesystem path.
    Unix(PathBuf),
}

impl FromStr for Endpoint {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| TransportError::InvalidEndpoint(reason);
        let Some((scheme, rest)) = s.split_once(':') else {
            return Err(bad(format!(
                "'{s}' has no transport prefix; {ENDPOINT_FORMS}"
            )));
        };
        match scheme {
            "tcp" => {
                let Some((host, port)) = rest.rsplit_once(':') else {
                    return Err(bad(format!("'{s}': missing port; expected tcp:HOST:PORT")));
                };
                if host.is_empty() {
                    return Err(bad(format!("'{s}': missing host; expected tcp:HOST:PORT")));
                }
                if port.parse::<u16>().is_err() {
                    return Err(bad(format!(
                        "'{s}': invalid port '{port}' (expected 0..=65535)"
                    )));
                }
                if let Some(inner) = host.strip_prefix('[') {
                    let ok = inner
                        .strip_suffix(']')
                        .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
                    if !ok {
                        return Err(bad(format!("'{s}': invalid IPv6 address '{host}'")));
                    }
                } else if host.contains(':') {
                    return Err(bad(format!(
                        "'{s}': IPv6 addresses must be in brackets, e.g. tcp:[::1]:4444"
                    )));
                } else if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(bad(format!("'{s}': invalid host '{host}'")));
                }
                Ok(Endpoint::Tcp(rest.to_string()))
            }
            "unix" => {
                if rest.is_empty() {
                    return Err(bad(format!("'{s}': empty path; expected unix:PATH")));
                }
                if rest.contains('\0') {
                    return Err(bad(format!("'{s}': path contains a NUL byte")));
                }
                Ok(Endpoint::Unix(PathBuf::from(rest)))
            }
            other => Err(bad(format!(
                "unknown transport '{other}:'; {ENDPOINT_FORMS}"
            ))),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "tcp:{addr}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Connects to `endpoint`. `timeout` bounds the TCP connection attempt (per
/// resolved address; name resolution itself is not bounded); Unix sockets
/// connect immediately or fail.
pub fn connect(
    endpoint: &Endpoint,
    timeout: Option<Duration>,
) -> Result<Box<dyn Transport>, TransportError> {
    let connect_err = |source| TransportError::Connect {
        endpoint: endpoint.to_string(),
        source,
    };
    match endpoint {
        Endpoint::Tcp(addr) => {
            let t = TcpTransport::connect(addr, timeout).map_err(connect_err)?;
            Ok(Box::new(t))
        }
        Endpoint::Unix(path) => {
            let t = UnixTransport::connect(path).map_err(connect_err)?;
            Ok(Box::new(t))
        }
    }
}

/// Starts listening on `endpoint`.
///
/// For `tcp:HOST:0` the OS picks a port; [`Listener::local_endpoint`] reports
/// it. For `unix:PATH` a stale socket file (one nobody listens on) is
/// removed first; a live socket or a file that is not a socket is an error.
/// The socket file is removed again when the listener is dropped.
pub fn listen(endpoint: &Endpoint) -> Result<Listener, TransportError> {
    let listen_err = |source| TransportError::Listen {
        endpoint: endpoint.to_string(),
        source,
    };
    match endpoint {
        Endpoint::Tcp(addr) => {
            let listener = TcpListener::bind(addr.as_str()).map_err(listen_err)?;
            let local = listener.local_addr().map_err(listen_err)?;
            Ok(Listener {
                endpoint: Endpoint::Tcp(local.to_string()),
                inner: ListenerInner::Tcp(listener),
                receive_buffer: Some(DEFAULT_RECEIVE_BUFFER),
            })
        }
        Endpoint::Unix(path) => {
            remove_stale_socket(path).map_err(listen_err)?;
            let listener = UnixListener::bind(path).map_err(listen_err)?;
            let id = std::fs::symlink_metadata(path)
                .ok()
                .map(|m| (m.dev(), m.ino()));
            Ok(Listener {
                endpoint: endpoint.clone(),
                inner: ListenerInner::Unix {
                    listener,
                    path: path.clone(),
                    id,
                },
                receive_buffer: Some(DEFAULT_RECEIVE_BUFFER),
            })
        }
    }
}

/// Removes `path` if it is a Unix socket nobody is listening on.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !md.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another process is listening on {}", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::debug!("removing stale socket {}", path.display());
            std::fs::remove_file(path)
        }
        Err(e) => Err(e),
    }
}

enum ListenerInner {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// Device and inode of the socket file we created, so that drop only
        /// removes our own file.
        id: Option<(u64, u64)>,
    },
}

/// The receive buffer a [`Listener`] gives every TCP connection it accepts
/// (1 MiB; [`Listener::set_receive_buffer`] changes it).
///
/// The source ends a pre-copy round when its send queues are nearly empty
/// ([`Transport::unacked_bytes`]) and counts what is left in the expected
/// downtime, but bytes the destination's kernel took into its receive
/// buffer count as acknowledged. Left to itself the kernel grows that
/// buffer while the reader keeps up (to `net.ipv4.tcp_rmem`'s maximum, 32
/// MiB on this project's host), and a destination that then falls behind
/// holds tens of MB the source never sees: in a 64 GiB guest's migration
/// the state waited 21.6 ms behind round 0's pages on the destination (~25
/// MB at the rate they moved), a downtime of 22 ms against a 10 ms limit
/// (expected 1.3 ms). Bounded, the backlog
/// stays in the source's send queue, where the source waits for it. 1 MiB
/// carries 10 Gbit/s over a round trip of up to ~0.8 ms (the kernel
/// doubles the value; its own overhead takes part of that).
pub const DEFAULT_RECEIVE_BUFFER: usize = 1 << 20;

/// A listening socket from [`listen`].
pub struct Listener {
    endpoint: Endpoint,
    inner: ListenerInner,
    /// `SO_RCVBUF` for accepted TCP connections (`None`: the kernel's
    /// autotuning).
    receive_buffer: Option<usize>,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// How often [`Listener::accept_timeout`] polls.
const ACCEPT_POLL: Duration = Duration::from_millis(5);

impl Listener {
    /// The endpoint actually listened on (with the real port for `tcp:…:0`).
    pub fn local_endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The receive buffer each accepted TCP connection gets
    /// ([`DEFAULT_RECEIVE_BUFFER`] unless changed; `None`: the kernel's
    /// autotuning, for a link whose bandwidth × round trip needs more —
    /// then a destination that falls behind can hide a backlog from the
    /// source's send queue, which only a source and destination that
    /// negotiated the read count see: protocol.md, "The read count"). Unix
    /// sockets are not touched: their send queue already counts what the
    /// peer has not read.
    pub fn set_receive_buffer(&mut self, bytes: Option<usize>) {
        self.receive_buffer = bytes;
    }

    fn accept_err(&self, source: io::Error) -> TransportError {
        TransportError::Accept {
            endpoint: self.endpoint.to_string(),
            source,
        }
    }

    /// Waits for one connection.
    pub fn accept(&self) -> Result<Box<dyn Transport>, TransportError> {
        match &self.inner {
            ListenerInner::Tcp(l) => {
                let (stream, _) = l.accept().map_err(|e| self.accept_err(e))?;
                self.wrap_tcp(stream)
            }
            ListenerInner::Unix { listener, path, .. } => {
                let (stream, _) = listener.accept().map_err(|e| self.accept_err(e))?;
                Ok(Box::new(UnixTransport::new(stream, path)))
            }
        }
    }

    /// Waits at most `timeout` for one connection; on expiry the error's
    /// [`TransportError::is_timeout`] is true.
    ///
    /// Polls a non-blocking socket every few milliseconds; do not call
    /// [`Listener::accept`] from another thread at the same time.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Box<dyn Transport>, TransportError> {
        self.set_nonblocking(true).map_err(|e| self.accept_err(e))?;
        let result = self.poll_accept(timeout);
        let restore = self.set_nonblocking(false);
        let t = result?;
        restore.map_err(|e| self.accept_err(e))?;
        Ok(t)
    }

    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match &self.inner {
            ListenerInner::Tcp(l) => l.set_nonblocking(on),
            ListenerInner::Unix { listener, .. } => listener.set_nonblocking(on),
        }
    }

    fn poll_accept(&self, timeout: Duration) -> Result<Box<dyn Transport>, TransportError> {
        let deadline = Instant::now() + timeout;
        loop {
            let r: io::Result<Box<dyn Transport>> = match &self.inner {
                ListenerInner::Tcp(l) => match l.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).map_err(|e| self.accept_err(e))?;
                        return self.wrap_tcp(s);
                    }
                    Err(e) => Err(e),
                },
                ListenerInner::Unix { listener, path, .. } => match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).map_err(|e| self.accept_err(e))?;
                        return Ok(Box::new(UnixTransport::new(s, path)));
                    }
                    Err(e) => Err(e),
                },
            };
            match r {
                Ok(t) => return Ok(t),
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(self.accept_err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no connection within {timeout:?}"),
                        )));
                    }
                    std::thread::sleep(ACCEPT_POLL.min(deadline - now));
                }
                Err(e) => return Err(self.accept_err(e)),
            }
        }
    }

    fn wrap_tcp(&self, stream: std::net::TcpStream) -> Result<Box<dyn Transport>, TransportError> {
        let setup = |what, source| TransportError::Setup {
            peer: format!("a client of {}", self.endpoint),
            what,
            source,
        };
        let t = TcpTransport::new(stream).map_err(|e| setup("TCP_NODELAY", e))?;
        if let Some(bytes) = self.receive_buffer {
            t.set_receive_buffer(bytes)
                .map_err(|e| setup("SO_RCVBUF", e))?;
        }
        Ok(Box::new(t))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenerInner::Unix { path, id, .. } = &self.inner {
            // Only remove the file if it is still the socket we bound (someone
            // may have replaced it since).
            let ours = std::fs::symlink_metadata(path)
                .map(|m| m.file_type().is_socket() && Some((m.dev(), m.ino())) == *id)
                .unwrap_or(false);
            if ours {
                if let Err(e) = std::fs::remove_file(path) {
                    log::warn!("cannot remove socket {}: {e}", path.display());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_round_trips() {
        for s in [
            "tcp:127.0.0.1:4444",
            "tcp:localhost:0",
            "tcp:[::1]:65535",
            "tcp:host.example:80",
            "unix:/run/livemig.sock",
            "unix:relative/path with spaces.sock",
            "unix:/tmp/a:b",
        ] {
            let ep: Endpoint = s.parse().unwrap();
            assert_eq!(ep.to_string(), s);
            assert_eq!(ep.to_string().parse::<Endpoint>().unwrap(), ep);
        }
        assert_eq!(
            "tcp:10.0.0.1:7".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("10.0.0.1:7".into())
        );
        assert_eq!(
            "unix:/x".parse::<Endpoint>().unwrap(),
            Endpoint::Unix(PathBuf::from("/x"))
        );
    }

    #[test]
    fn endpoint_rejects_junk() {
        let err = |s: &str| s.parse::<Endpoint>().unwrap_err().to_string();
        assert_eq!(
            err("foo:bar"),
            "unknown transport 'foo:'; expected tcp:HOST:PORT or unix:PATH"
        );
        assert!(err("127.0.0.1:4444").contains("unknown transport '127.0.0.1:'"));
        assert!(err("tcp4444").contains("no transport prefix"));
        assert!(err("").contains("no transport prefix"));
        assert!(err("TCP:a:1").contains("unknown transport"));
        assert!(err("tcp:").contains("missing port"));
        assert!(err("tcp:host").contains("missing port"));
        assert!(err("tcp::80").contains("missing host"));
        assert!(err("tcp:host:").contains("invalid port ''"));
        assert!(err("tcp:host:65536").contains("invalid port '65536'"));
        assert!(err("tcp:host:-1").contains("invalid port"));
        assert!(err("tcp:host:http").contains("invalid port"));
        assert!(err("tcp:::1:80").contains("brackets"));
        assert!(err("tcp:[::1:80").contains("invalid IPv6"));
        assert!(err("tcp:[nope]:80").contains("invalid IPv6"));
        assert!(err("tcp:a b:80").contains("invalid host"));
        assert!(err("unix:").contains("empty path"));
        assert!(err("unix:/a\0b").contains("NUL"));
    }
}
