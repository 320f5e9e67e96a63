//! Connecting to and listening on [`Endpoint`]s with TLS.

use std::fmt;
use std::time::Duration;

use livemig::transport::{self, Endpoint, Listener, Transport};

use crate::stream::DEFAULT_HANDSHAKE_TIMEOUT;
use crate::{TlsError, TlsIdentity, TlsTransport};

/// Connects to `endpoint` and runs the TLS handshake as the client.
///
/// The server's certificate must chain to the CA of `id` and match the
/// server name ([`TlsIdentity::server_name_for`]: the configured
/// `server_name`, else the host of a `tcp:HOST:PORT` endpoint; a `unix:PATH`
/// endpoint needs a configured `server_name`). `id`'s certificate is
/// presented to the server, and this returns only once the server accepted
/// it, so every refusal surfaces here as [`TlsError::Handshake`].
///
/// `timeout` bounds the TCP connection attempt (as in
/// [`livemig::transport::connect`]) and, separately, the handshake
/// ([`DEFAULT_HANDSHAKE_TIMEOUT`] if `None`).
pub fn connect_tls(
    endpoint: &Endpoint,
    id: &TlsIdentity,
    timeout: Option<Duration>,
) -> Result<Box<dyn Transport>, TlsError> {
    let name = id.server_name_for(endpoint)?;
    let inner = transport::connect(endpoint, timeout)?;
    let t = TlsTransport::client_labelled(
        inner,
        &name,
        id,
        timeout.unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT),
        endpoint.to_string(),
    )?;
    Ok(Box::new(t))
}

/// A listening socket whose connections are TLS servers requiring a client
/// certificate that chains to the CA.
///
/// The handshake runs inside [`TlsListener::accept`], bounded by
/// [`TlsListener::handshake_timeout`] so that a silent client cannot hold
/// the receiver. A failed handshake is returned as an error and the
/// connection dropped; call `accept` again to wait for the next client.
pub struct TlsListener {
    inner: Listener,
    id: TlsIdentity,
    handshake_timeout: Duration,
}

impl fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsListener")
            .field("endpoint", self.inner.local_endpoint())
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}

impl TlsListener {
    /// Starts listening on `endpoint`, as [`livemig::transport::listen`]
    /// does (`tcp:HOST:0` picks a port; a stale Unix socket is replaced).
    pub fn bind(endpoint: &Endpoint, id: &TlsIdentity) -> Result<Self, TlsError> {
        Ok(TlsListener {
            inner: transport::listen(endpoint)?,
            id: id.clone(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        })
    }

    /// The endpoint actually listened on (with the real port for `tcp:…:0`).
    pub fn local_endpoint(&self) -> &Endpoint {
        self.inner.local_endpoint()
    }

    /// How long a client may take to complete the handshake once connected
    /// ([`DEFAULT_HANDSHAKE_TIMEOUT`] unless changed).
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    /// Changes [`TlsListener::handshake_timeout`].
    pub fn set_handshake_timeout(&mut self, timeout: Duration) {
        self.handshake_timeout = timeout;
    }

    /// The receive buffer of each accepted TCP connection, as
    /// [`livemig::transport::Listener::set_receive_buffer`] says (`None`:
    /// the kernel's autotuning).
    pub fn set_receive_buffer(&mut self, bytes: Option<usize>) {
        self.inner.set_receive_buffer(bytes);
    }

    /// Waits for one connection and completes the TLS handshake.
    pub fn accept(&self) -> Result<Box<dyn Transport>, TlsError> {
        let inner = self.inner.accept()?;
        self.handshake(inner)
    }

    /// Waits at most `timeout` for one connection, then completes the
    /// handshake within [`TlsListener::handshake_timeout`]. On expiry of
    /// either the error's [`TlsError::is_timeout`] is true.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Box<dyn Transport>, TlsError> {
        let inner = self.inner.accept_timeout(timeout)?;
        self.handshake(inner)
    }

    fn handshake(&self, inner: Box<dyn Transport>) -> Result<Box<dyn Transport>, TlsError> {
        let t = TlsTransport::server(inner, &self.id, self.handshake_timeout)?;
        Ok(Box::new(t))
    }
}

/// A [`livemig::transport::StreamOpener`] that opens each extra page stream
/// of a multi-stream migration with [`connect_tls`].
#[derive(Clone)]
pub struct TlsDialer {
    /// Where to connect.
    pub endpoint: Endpoint,
    /// Our identity (certificate, key, CA).
    pub id: TlsIdentity,
    /// Connect and handshake timeout, as in [`connect_tls`].
    pub timeout: Option<Duration>,
}

impl fmt::Debug for TlsDialer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsDialer")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl transport::StreamOpener for TlsDialer {
    fn open(&mut self) -> std::io::Result<Box<dyn Transport>> {
        connect_tls(&self.endpoint, &self.id, self.timeout)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// A [`livemig::transport::StreamAcceptor`] owning a [`TlsListener`]; it
/// closes the listener in `close`. A connection that fails the handshake is
/// an error of that accept only (the engine drops it and keeps waiting).
#[derive(Debug)]
pub struct TlsAcceptor(pub Option<TlsListener>);

impl transport::StreamAcceptor for TlsAcceptor {
    fn accept_stream(&mut self, timeout: Duration) -> std::io::Result<Box<dyn Transport>> {
        let l = self.0.as_ref().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotConnected, "the listener is closed")
        })?;
        l.accept_timeout(timeout).map_err(|e| {
            let kind = if e.is_timeout() {
                std::io::ErrorKind::TimedOut
            } else {
                std::io::ErrorKind::ConnectionRefused
            };
            std::io::Error::new(kind, e.to_string())
        })
    }

    fn close(&mut self) {
        self.0 = None;
    }
}
