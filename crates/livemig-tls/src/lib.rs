//! # livemig-tls — mutual TLS for livemig transports
//!
//! Without encryption, anyone on the path of a migration reads all guest
//! memory and can inject pages or device state (see `docs/security.md`).
//! This crate wraps livemig's TCP and Unix socket transports in TLS 1.3
//! ([rustls], `ring` provider, blocking I/O, no async runtime) with
//! **mutual** authentication: both sides present a certificate, and both
//! require the peer's certificate to chain to the same CA.
//!
//! * [`TlsConfig`] names the PEM files; [`TlsIdentity::load`] checks and
//!   loads them.
//! * [`connect_tls`] connects to an [`Endpoint`] (the source side);
//!   [`TlsListener`] listens and accepts (the destination side). Both return
//!   a `Box<dyn Transport>` for [`livemig::Migration`] / [`livemig::Reception`],
//!   only after the handshake succeeded on both ends.
//! * [`TlsTransport`] runs TLS over any other connected
//!   [`Transport`](livemig::transport::Transport).
//!
//! ```no_run
//! use livemig::transport::Endpoint;
//! use livemig_tls::{connect_tls, TlsConfig, TlsListener};
//! use std::time::Duration;
//!
//! let id = TlsConfig {
//!     cert_chain: "/etc/livemig/host.crt".into(),
//!     key: "/etc/livemig/host.key".into(),
//!     ca: "/etc/livemig/ca.crt".into(),
//!     server_name: None,
//! }
//! .load()?;
//!
//! // Destination: accept one authenticated source, then `livemig::Reception`.
//! let listener = TlsListener::bind(&"tcp:0.0.0.0:4444".parse::<Endpoint>()?, &id)?;
//! let from_source = listener.accept()?;
//!
//! // Source: connect, then `livemig::Migration`. The destination's certificate
//! // must be valid for "dest.example".
//! let ep: Endpoint = "tcp:dest.example:4444".parse()?;
//! let to_destination = connect_tls(&ep, &id, Some(Duration::from_secs(10)))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [rustls]: https://docs.rs/rustls
//! [`Endpoint`]: livemig::transport::Endpoint
#![deny(missing_docs)]

mod error;
mod identity;
mod net;
mod stream;

pub use error::TlsError;
pub use identity::{TlsConfig, TlsIdentity};
pub use net::{connect_tls, TlsAcceptor, TlsDialer, TlsListener};
pub use stream::{TlsTransport, DEFAULT_HANDSHAKE_TIMEOUT};
