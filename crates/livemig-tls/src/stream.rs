//! [`TlsTransport`]: one TLS session over any [`Transport`], shared by all
//! its handles.
//!
//! # Concurrency
//!
//! The rustls session is a state machine behind a mutex that is only held
//! while records are encrypted or decrypted, never across blocking I/O.
//! Socket I/O goes through two handles of the inner transport, one for
//! reading and one for writing, each behind its own mutex. So one thread can
//! block reading (waiting for an acknowledgement, with a read timeout) while
//! another writes pages, as the [`Transport`] contract allows; two readers
//! (or two writers) take turns. Lock order: reader, writer, session.
//!
//! Output that the reading side produces (an alert after a bad record, the
//! answer to a key update) is sent by the reader when no writer is active,
//! otherwise by the active writer before it returns.
//!
//! [`Transport::shutdown`] goes straight to a third handle of the inner
//! transport, without waiting for any lock, so it always unblocks a blocked
//! reader or writer.

use std::io::{self, IoSlice, Read, Write};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use livemig::transport::{Transport, TransportError};
use rustls::pki_types::ServerName;
use rustls::{AlertDescription, ClientConnection, Connection, ServerConnection};

use crate::identity::ALPN;
use crate::{TlsError, TlsIdentity};

/// Handshake timeout used when none is given.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Ciphertext read from the inner transport per call.
const READ_CHUNK: usize = 64 << 10;

/// How long dropping the last handle may block sending `close_notify`.
const CLOSE_NOTIFY_TIMEOUT: Duration = Duration::from_millis(100);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn check_timeout(t: Option<Duration>) -> io::Result<()> {
    if t == Some(Duration::ZERO) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cannot set a zero duration timeout",
        ));
    }
    Ok(())
}

/// A TLS 1.3 connection with mutual authentication, implementing
/// [`Transport`].
///
/// Made by [`crate::connect_tls`] and [`crate::TlsListener`], or directly
/// over any connected [`Transport`] with [`TlsTransport::client`] and
/// [`TlsTransport::server`]. The handshake is complete when a
/// `TlsTransport` exists: both certificates were verified.
///
/// Every [`Transport::try_clone`] handle uses the same TLS session; reads and
/// writes may proceed concurrently from different handles (see the module
/// documentation). Timeouts are shared by all handles. A read timeout loses
/// nothing: the next read continues where the stream was. After a write
/// error or write timeout the stream must be abandoned, as with any
/// transport.
///
/// Dropping the last handle sends a TLS `close_notify`, so the peer reads a
/// clean end-of-file; an end-of-file without it (the connection was cut or
/// [`Transport::shutdown`]) reads as an error of kind
/// [`io::ErrorKind::UnexpectedEof`].
pub struct TlsTransport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TlsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTransport")
            .field("peer", &self.shared.peer)
            .finish_non_exhaustive()
    }
}

struct RxHalf {
    io: Box<dyn Transport>,
    /// Ciphertext read but not yet handed to the session: `buf[start..end]`.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Timeout generation applied to `io`.
    timeout_gen: u64,
    /// A fatal TLS error seen before: every later read fails with it.
    failed: Option<String>,
}

struct TxHalf {
    io: Box<dyn Transport>,
    /// Ciphertext taken from the session, not yet written.
    out: Vec<u8>,
    /// Timeout generation applied to `io`.
    timeout_gen: u64,
}

#[derive(Default)]
struct Timeouts {
    read: Option<Duration>,
    read_gen: u64,
    write: Option<Duration>,
    write_gen: u64,
}

struct Shared {
    peer: String,
    session: Mutex<Connection>,
    rx: Mutex<RxHalf>,
    tx: Mutex<TxHalf>,
    /// For shutdown and the link's send queue and round trip; never held
    /// across blocking I/O.
    ctl: Mutex<Box<dyn Transport>>,
    timeouts: Mutex<Timeouts>,
    /// The session holds output that the reading side produced.
    tx_wanted: AtomicBool,
}

impl Shared {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut rx = lock(&self.rx);
        if let Some(msg) = &rx.failed {
            return Err(io::Error::new(io::ErrorKind::InvalidData, msg.clone()));
        }
        loop {
            if let Some(result) = self.decrypt(&mut rx, buf) {
                return result;
            }
            // Nothing decrypted and no ciphertext left: read more, without
            // holding the session.
            let gen = {
                let t = lock(&self.timeouts);
                (t.read_gen != rx.timeout_gen).then_some((t.read, t.read_gen))
            };
            if let Some((timeout, gen)) = gen {
                rx.io.set_read_timeout(timeout)?;
                rx.timeout_gen = gen;
            }
            let rx = &mut *rx;
            let n = loop {
                match rx.io.read(&mut rx.buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r?,
                }
            };
            rx.start = 0;
            rx.end = n;
            if n == 0 {
                // End of file: the session decides whether it was clean
                // (after close_notify) or a truncation.
                lock(&self.session).read_tls(&mut io::empty())?;
            }
        }
    }

    /// Hands buffered ciphertext to the session until plaintext, end of
    /// file or an error comes out; `None` when more ciphertext is needed.
    fn decrypt(&self, rx: &mut RxHalf, buf: &mut [u8]) -> Option<io::Result<usize>> {
        let mut session = lock(&self.session);
        let mut wants_write = false;
        let result = loop {
            match session.reader().read(buf) {
                Ok(n) => break Some(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    break Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection ended without a TLS close_notify \
                         (the peer stopped or the connection was cut)",
                    )))
                }
                Err(e) => break Some(Err(e)),
            }
            if rx.start == rx.end {
                break None;
            }
            let mut pending = &rx.buf[rx.start..rx.end];
            match session.read_tls(&mut pending) {
                // After close_notify the session takes nothing more.
                Ok(0) => rx.start = rx.end,
                Ok(n) => rx.start += n,
                Err(e) => break Some(Err(e)),
            }
            if let Err(e) = session.process_new_packets() {
                wants_write = session.wants_write();
                let msg = format!("TLS error: {}", describe(&e));
                rx.failed = Some(msg.clone());
                break Some(Err(io::Error::new(io::ErrorKind::InvalidData, msg)));
            }
            wants_write |= session.wants_write();
        };
        drop(session);
        if wants_write {
            self.send_for_reader();
        }
        result
    }

    /// Sends output the reading side produced, unless a writer is active
    /// (it sends it before returning). Best effort.
    fn send_for_reader(&self) {
        self.tx_wanted.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.send_wanted();
    }

    /// Sends reader-produced output if any is flagged and no writer holds
    /// the writing half.
    fn send_wanted(&self) {
        while self.tx_wanted.load(Ordering::SeqCst) {
            let mut tx = match self.tx.try_lock() {
                Ok(tx) => tx,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                // The holder checks the flag after unlocking.
                Err(TryLockError::WouldBlock) => return,
            };
            if let Err(e) = self.send_queued(&mut tx) {
                log::debug!("TLS to {}: sending protocol output: {e}", self.peer);
                self.tx_wanted.store(false, Ordering::SeqCst);
            }
            drop(tx);
            fence(Ordering::SeqCst);
        }
    }

    /// Writes everything the session has queued, until it has nothing more.
    fn send_queued(&self, tx: &mut TxHalf) -> io::Result<()> {
        loop {
            self.tx_wanted.store(false, Ordering::SeqCst);
            {
                let mut session = lock(&self.session);
                while session.wants_write() {
                    session.write_tls(&mut tx.out)?;
                }
            }
            if tx.out.is_empty() {
                return Ok(());
            }
            let gen = {
                let t = lock(&self.timeouts);
                (t.write_gen != tx.timeout_gen).then_some((t.write, t.write_gen))
            };
            if let Some((timeout, gen)) = gen {
                tx.io.set_write_timeout(timeout)?;
                tx.timeout_gen = gen;
            }
            let mut done = 0;
            while done < tx.out.len() {
                match tx.io.write(&tx.out[done..]) {
                    Ok(0) => {
                        tx.out.drain(..done);
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        // Keep the unsent tail: records must stay whole.
                        tx.out.drain(..done);
                        return Err(e);
                    }
                }
            }
            tx.out.clear();
        }
    }

    /// Encrypts with `f` and sends the records.
    fn write_with(
        &self,
        f: impl FnOnce(&mut Connection) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let result = {
            let mut tx = lock(&self.tx);
            let n = f(&mut lock(&self.session));
            match n {
                Ok(n) => self.send_queued(&mut tx).map(|()| n),
                Err(e) => Err(e),
            }
        };
        fence(Ordering::SeqCst);
        self.send_wanted();
        result
    }

    fn flush(&self) -> io::Result<()> {
        let result = {
            let mut tx = lock(&self.tx);
            self.send_queued(&mut tx).and_then(|()| tx.io.flush())
        };
        fence(Ordering::SeqCst);
        self.send_wanted();
        result
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Last handle gone: tell the peer this is a clean end of stream.
        let session = self
            .session
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        let tx = self.tx.get_mut().unwrap_or_else(PoisonError::into_inner);
        session.send_close_notify();
        while session.wants_write() {
            if session.write_tls(&mut tx.out).is_err() {
                break;
            }
        }
        if tx.io.set_write_timeout(Some(CLOSE_NOTIFY_TIMEOUT)).is_ok() {
            let _ = tx.io.write_all(&tx.out);
            let _ = tx.io.flush();
        }
    }
}

impl Read for TlsTransport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.shared.read(buf)
    }
}

impl Write for TlsTransport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.shared.write_with(|s| s.writer().write(buf))
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        self.shared.write_with(|s| s.writer().write_vectored(bufs))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.shared.flush()
    }
}

impl Transport for TlsTransport {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        check_timeout(timeout)?;
        let mut t = lock(&self.shared.timeouts);
        t.read = timeout;
        t.read_gen += 1;
        Ok(())
    }

    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        check_timeout(timeout)?;
        let mut t = lock(&self.shared.timeouts);
        t.write = timeout;
        t.write_gen += 1;
        Ok(())
    }

    fn shutdown(&self) -> io::Result<()> {
        lock(&self.shared.ctl).shutdown()
    }

    fn peer(&self) -> String {
        self.shared.peer.clone()
    }

    fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(TlsTransport {
            shared: Arc::clone(&self.shared),
        }))
    }

    /// The underlying connection's (records written by a flush are on
    /// it; nothing stays in the session after a flush).
    fn unacked_bytes(&self) -> Option<u64> {
        lock(&self.shared.ctl).unacked_bytes()
    }

    fn round_trip(&self) -> Option<Duration> {
        lock(&self.shared.ctl).round_trip()
    }
}

fn handshake_err(peer: &str, source: io::Error) -> TlsError {
    TlsError::Handshake {
        peer: peer.to_string(),
        source,
    }
}

/// Whether an alert says the sender refused our certificate.
fn is_certificate_alert(a: &AlertDescription) -> bool {
    matches!(
        a,
        AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::CertificateRequired
    )
}

/// A TLS error on an established connection, with a hint at the usual
/// cause.
fn describe(e: &rustls::Error) -> String {
    match e {
        rustls::Error::DecryptError => {
            format!("{e} (the data was corrupted or tampered with in transit)")
        }
        _ => e.to_string(),
    }
}

/// A TLS error from the handshake, with a hint at the usual cause.
fn explain(e: rustls::Error, we_are_client: bool) -> io::Error {
    let (us, them) = if we_are_client {
        ("client", "server")
    } else {
        ("server", "client")
    };
    let msg = match &e {
        rustls::Error::AlertReceived(a) if is_certificate_alert(a) => {
            format!("the {them} refused our {us} certificate ({e})")
        }
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
            format!("{e} (the {them}'s certificate is not signed by our CA)")
        }
        rustls::Error::NoCertificatesPresented => {
            format!("the {them} sent no certificate; one signed by our CA is required")
        }
        rustls::Error::NoApplicationProtocol => {
            format!("{e} (the {them} is not a livemig TLS endpoint)")
        }
        rustls::Error::InvalidMessage(_) => format!("{e} (is the {them} speaking TLS?)"),
        _ => describe(&e),
    };
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Drives the handshake to completion within `timeout`. A client also waits
/// for the server's first session ticket, which TLS 1.3 servers send only
/// after verifying the client's certificate and Finished: so a refused
/// client certificate fails here, not at the first read.
fn handshake(
    session: &mut Connection,
    io: &mut Box<dyn Transport>,
    timeout: Duration,
) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    let timed_out = || {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer from the peer within {timeout:?}"),
        )
    };
    let remaining = || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(timed_out())
        } else {
            Ok(left)
        }
    };
    let we_are_client = matches!(session, Connection::Client(_));
    loop {
        if session.wants_write() {
            io.set_write_timeout(Some(remaining()?))?;
            while session.wants_write() {
                match session.write_tls(io) {
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock) => {
                        return Err(timed_out())
                    }
                    r => r?,
                };
            }
        }
        let done = !session.is_handshaking()
            && match &*session {
                Connection::Client(c) => c.tls13_tickets_received() > 0,
                Connection::Server(_) => true,
            };
        if done {
            break;
        }
        io.set_read_timeout(Some(remaining()?))?;
        let n = match session.read_tls(io) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out())
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection",
            ));
        }
        if let Err(e) = session.process_new_packets() {
            // Send our alert, best effort.
            while session.wants_write() {
                if session.write_tls(io).is_err() {
                    break;
                }
            }
            return Err(explain(e, we_are_client));
        }
    }
    if session.alpn_protocol() != Some(ALPN) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the peer did not agree on the 'livemig' ALPN protocol",
        ));
    }
    io.set_read_timeout(None)?;
    io.set_write_timeout(None)?;
    Ok(())
}

impl TlsTransport {
    /// Runs the client side of the handshake over a connected `inner`
    /// transport, checking the server's certificate against `server_name`
    /// (a DNS name or an IP address) and the CA of `id`, and presenting
    /// `id`'s certificate. `timeout` bounds the whole handshake.
    pub fn client(
        inner: Box<dyn Transport>,
        server_name: &str,
        id: &TlsIdentity,
        timeout: Duration,
    ) -> Result<Self, TlsError> {
        let label = inner.peer();
        Self::client_labelled(inner, server_name, id, timeout, label)
    }

    pub(crate) fn client_labelled(
        inner: Box<dyn Transport>,
        server_name: &str,
        id: &TlsIdentity,
        timeout: Duration,
        label: String,
    ) -> Result<Self, TlsError> {
        let name =
            ServerName::try_from(server_name.to_string()).map_err(|e| TlsError::ServerName {
                endpoint: label.clone(),
                reason: format!("'{server_name}' is not a valid DNS name or IP address: {e}"),
            })?;
        let session = ClientConnection::new(id.client.clone(), name)
            .map_err(|e| handshake_err(&label, io::Error::new(io::ErrorKind::InvalidData, e)))?;
        Self::establish(inner, session.into(), label, timeout)
    }

    /// Runs the server side of the handshake over a connected `inner`
    /// transport, requiring a client certificate that chains to the CA of
    /// `id`, and presenting `id`'s certificate. `timeout` bounds the whole
    /// handshake.
    pub fn server(
        inner: Box<dyn Transport>,
        id: &TlsIdentity,
        timeout: Duration,
    ) -> Result<Self, TlsError> {
        let label = inner.peer();
        let session = ServerConnection::new(id.server.clone())
            .map_err(|e| handshake_err(&label, io::Error::new(io::ErrorKind::InvalidData, e)))?;
        Self::establish(inner, session.into(), label, timeout)
    }

    fn establish(
        mut inner: Box<dyn Transport>,
        mut session: Connection,
        label: String,
        timeout: Duration,
    ) -> Result<Self, TlsError> {
        handshake(&mut session, &mut inner, timeout).map_err(|e| handshake_err(&label, e))?;
        if let Some(suite) = session.negotiated_cipher_suite() {
            log::debug!("TLS with {label}: {:?}", suite.suite());
        }
        let clone = |what| {
            inner.try_clone().map_err(|source| {
                TlsError::Transport(TransportError::Setup {
                    peer: label.clone(),
                    what,
                    source,
                })
            })
        };
        let rx = clone("cloning the reading handle")?;
        let tx = clone("cloning the writing handle")?;
        let peer = format!("{} (TLS)", inner.peer());
        Ok(TlsTransport {
            shared: Arc::new(Shared {
                peer,
                session: Mutex::new(session),
                rx: Mutex::new(RxHalf {
                    io: rx,
                    buf: vec![0u8; READ_CHUNK].into_boxed_slice(),
                    start: 0,
                    end: 0,
                    timeout_gen: 0,
                    failed: None,
                }),
                tx: Mutex::new(TxHalf {
                    io: tx,
                    out: Vec::new(),
                    timeout_gen: 0,
                }),
                ctl: Mutex::new(inner),
                timeouts: Mutex::new(Timeouts::default()),
                tx_wanted: AtomicBool::new(false),
            }),
        })
    }
}
