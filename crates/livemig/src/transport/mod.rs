//! Transports: an ordered, reliable byte stream between the two sides.
//!
//! The engine only sees the [`Transport`] trait, never a socket. This module
//! provides these implementations:
//!
//! * `TcpTransport` — TCP (with `TCP_NODELAY`), addressed as `tcp:HOST:PORT`
//!   (feature `net`, on by default);
//! * `UnixTransport` — Unix stream sockets, addressed as `unix:PATH`
//!   (feature `net`);
//! * [`mem::MemTransport`] — an in-memory pipe for tests ([`mem::pair`]);
//! * [`duplex::DuplexTransport`] — any reader/writer pair plus a way to
//!   abort them (RDMA, vsock, a QUIC stream): the adapter keeps the
//!   timeouts, clones and shutdown the trait asks for, so such a link need
//!   not pretend to be a socket.
//!
//! With the `net` feature, `connect` and `listen` turn an `Endpoint`
//! (`tcp:HOST:PORT` or `unix:PATH`) into a connected `Box<dyn Transport>`
//! on either side, and `Dialer` / `OwnedAcceptor` open and accept page
//! streams over them (all re-exported here from the `net` module).
//! Without it (`cargo build -p livemig --no-default-features`) none of
//! them exist and the crate contains no socket code.

use std::io;
use std::time::Duration;

pub mod duplex;
#[cfg(feature = "net")]
mod link_info;
pub mod mem;
#[cfg(feature = "net")]
pub mod net;
#[cfg(feature = "net")]
mod tcp;
#[cfg(feature = "net")]
mod unix;

#[cfg(feature = "net")]
pub use net::{connect, listen, Dialer, Endpoint, Listener, OwnedAcceptor, DEFAULT_RECEIVE_BUFFER};
#[cfg(feature = "net")]
pub use tcp::TcpTransport;
#[cfg(feature = "net")]
pub use unix::UnixTransport;

/// An ordered, reliable, bidirectional byte stream.
///
/// Reads and writes follow the usual [`std::io::Read`] / [`std::io::Write`]
/// contracts. Implementations must be cheap to [`Transport::try_clone`] so
/// that one thread can read (acknowledgements, cancel requests) while another
/// writes (pages).
pub trait Transport: io::Read + io::Write + Send {
    /// Timeout for blocking reads (`None` = block forever). A timed-out read
    /// returns an error of kind [`io::ErrorKind::TimedOut`] or
    /// [`io::ErrorKind::WouldBlock`].
    ///
    /// Like a socket option, the timeout may be shared by all clones of the
    /// connection. A zero duration is rejected with `InvalidInput`.
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;

    /// Timeout for blocking writes (`None` = block forever). A timed-out write
    /// returns an error of kind [`io::ErrorKind::TimedOut`] or
    /// [`io::ErrorKind::WouldBlock`]; how much of the buffer was written is
    /// then unknown, so the stream should be abandoned.
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;

    /// Closes both directions so that a blocked read or write on any clone
    /// returns (reads see end-of-file, writes fail). Used to cancel.
    fn shutdown(&self) -> io::Result<()>;

    /// Human-readable description of the peer for error messages, for
    /// example `tcp:127.0.0.1:4444`.
    fn peer(&self) -> String;

    /// A second handle to the same connection.
    fn try_clone(&self) -> io::Result<Box<dyn Transport>>;

    /// Bytes written on this connection that the peer has not yet
    /// acknowledged (still queued on this host or on the link), if the
    /// transport can tell; `None` (the default) if it cannot.
    ///
    /// Pre-copy waits, bounded, for them to drain at the end of every
    /// round and counts what is left in the expected downtime
    /// (docs/architecture.md, "Slow links"). TCP and Unix sockets report
    /// their send queue (`SIOCOUTQ`).
    fn unacked_bytes(&self) -> Option<u64> {
        None
    }

    /// The connection's round-trip time as the transport measured it, if
    /// it can tell; `None` (the default) if it cannot. The expected
    /// downtime counts one and a half of them (`Ready` comes back one
    /// round trip after the state; `Go` reaches the destination half of
    /// one later), and the report places `Go`'s way with it
    /// ([`crate::report::DowntimeBreakdown::go_hop_ms`]). TCP reports the
    /// kernel's smoothed RTT (`TCP_INFO`).
    fn round_trip(&self) -> Option<Duration> {
        None
    }
}

impl Transport for Box<dyn Transport> {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        (**self).set_read_timeout(timeout)
    }

    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        (**self).set_write_timeout(timeout)
    }

    fn shutdown(&self) -> io::Result<()> {
        (**self).shutdown()
    }

    fn peer(&self) -> String {
        (**self).peer()
    }

    fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
        (**self).try_clone()
    }

    fn unacked_bytes(&self) -> Option<u64> {
        (**self).unacked_bytes()
    }

    fn round_trip(&self) -> Option<Duration> {
        (**self).round_trip()
    }
}

/// Opens the extra page streams of a multi-stream migration (source side).
///
/// See [`crate::MigrationConfig::streams`]. `Dialer` (feature `net`) opens
/// them with `connect`; a VMM with its own transport (TLS, say) implements this for
/// it.
pub trait StreamOpener: Send {
    /// Opens one more connection to the destination.
    fn open(&mut self) -> io::Result<Box<dyn Transport>>;
}

/// Accepts the extra page streams of a multi-stream migration (destination
/// side). `Listener` and `OwnedAcceptor` (feature `net`) implement it.
pub trait StreamAcceptor: Send {
    /// Waits at most `timeout` for the next connection.
    fn accept_stream(&mut self, timeout: Duration) -> io::Result<Box<dyn Transport>>;

    /// Called once every stream the migration needs has been accepted (or
    /// none is needed): stop accepting, so that another connection attempt
    /// during this migration is refused. The default does nothing.
    fn close(&mut self) {}
}

impl<T: StreamOpener + ?Sized> StreamOpener for &mut T {
    fn open(&mut self) -> io::Result<Box<dyn Transport>> {
        (**self).open()
    }
}

impl<T: StreamOpener + ?Sized> StreamOpener for Box<T> {
    fn open(&mut self) -> io::Result<Box<dyn Transport>> {
        (**self).open()
    }
}

impl<T: StreamAcceptor + ?Sized> StreamAcceptor for &mut T {
    fn accept_stream(&mut self, timeout: Duration) -> io::Result<Box<dyn Transport>> {
        (**self).accept_stream(timeout)
    }

    fn close(&mut self) {
        (**self).close()
    }
}

impl<T: StreamAcceptor + ?Sized> StreamAcceptor for Box<T> {
    fn accept_stream(&mut self, timeout: Duration) -> io::Result<Box<dyn Transport>> {
        (**self).accept_stream(timeout)
    }

    fn close(&mut self) {
        (**self).close()
    }
}

/// Errors setting up a transport. Errors on an established connection are
/// plain [`io::Error`]s from `Read` / `Write`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The endpoint string is not `tcp:HOST:PORT` or `unix:PATH`.
    #[error("{0}")]
    InvalidEndpoint(String),
    /// Connecting failed (refused, unreachable, timed out, name resolution).
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        /// The endpoint, as a URI.
        endpoint: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Binding or listening failed.
    #[error("cannot listen on {endpoint}: {source}")]
    Listen {
        /// The endpoint, as a URI.
        endpoint: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Accepting a connection failed (or timed out).
    #[error("accepting a connection on {endpoint} failed: {source}")]
    Accept {
        /// The listening endpoint, as a URI.
        endpoint: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Configuring a connected socket failed.
    #[error("configuring the connection to {peer}: {what}: {source}")]
    Setup {
        /// The peer.
        peer: String,
        /// What was being configured.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl TransportError {
    /// Whether the error is a timeout (connect or accept timed out).
    pub fn is_timeout(&self) -> bool {
        match self {
            TransportError::InvalidEndpoint(_) => false,
            TransportError::Connect { source, .. }
            | TransportError::Listen { source, .. }
            | TransportError::Accept { source, .. }
            | TransportError::Setup { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxed_transport_forwards() {
        use std::io::{Read, Write};

        fn takes<T: Transport>(t: &mut T) -> String {
            t.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
            t.peer()
        }

        let (a, b) = mem::pair();
        let mut a: Box<dyn Transport> = Box::new(a);
        let mut b: Box<dyn Transport> = Box::new(b);
        // Generic code accepts a Box<dyn Transport> as a Transport.
        assert!(takes(&mut a).starts_with("mem:"));
        let mut c = b.try_clone().unwrap();
        a.write_all(b"xyz").unwrap();
        let mut buf = [0u8; 3];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"xyz");
        Transport::shutdown(&b).unwrap();
        assert_eq!(a.read(&mut buf).unwrap(), 0);
        b.set_write_timeout(None).unwrap();
    }
}
