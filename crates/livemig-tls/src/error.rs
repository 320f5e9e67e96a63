//! Errors of the TLS layer.

use std::io;
use std::path::PathBuf;

use livemig::transport::TransportError;

/// Errors loading a TLS identity or setting up a TLS connection.
///
/// Errors on an established connection are plain [`io::Error`]s from
/// `Read` / `Write`; TLS failures there (a corrupted or forged record, an
/// alert from the peer) have kind [`io::ErrorKind::InvalidData`].
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read the {what} file {}: {source}", path.display())]
    ReadFile {
        /// Which file: "certificate chain", "private key" or "CA".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A PEM file was read but its content is unusable.
    #[error("invalid {what} file {}: {reason}", path.display())]
    InvalidFile {
        /// Which file: "certificate chain", "private key" or "CA".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The files are individually valid but do not form a usable identity
    /// (for example the key does not belong to the certificate).
    #[error("invalid TLS identity: {0}")]
    InvalidIdentity(String),
    /// The name to check the server's certificate against is missing or
    /// invalid.
    #[error("TLS server name for {endpoint}: {reason}")]
    ServerName {
        /// The endpoint being connected to.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// Connecting, listening or accepting failed below TLS.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The TLS handshake failed: the peer's certificate was refused, the peer
    /// refused ours, the peer is not speaking TLS, or it timed out.
    #[error("TLS handshake with {peer} failed: {source}")]
    Handshake {
        /// The peer, for example `tcp:127.0.0.1:4444`.
        peer: String,
        /// What went wrong; kind [`io::ErrorKind::InvalidData`] for TLS
        /// errors, [`io::ErrorKind::TimedOut`] when the peer did not answer
        /// in time.
        #[source]
        source: io::Error,
    },
}

impl TlsError {
    /// Whether the error is a timeout (connecting, accepting or the
    /// handshake took too long).
    pub fn is_timeout(&self) -> bool {
        match self {
            TlsError::Transport(e) => e.is_timeout(),
            TlsError::Handshake { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            _ => false,
        }
    }
}
