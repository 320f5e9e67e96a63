//! [`Reception`]: the one entry point of the destination side.

use crate::error::MigrationError;
use crate::report::ReceiveProgress;
use crate::source::CancelToken;
use crate::transport::{StreamAcceptor, Transport};
use crate::vm::{DestinationVm, VmDescription, VmError};

use super::{ReceiveConfig, ReceiveReport};

/// A progress callback.
type Callback<'a> = Box<dyn FnMut(&ReceiveProgress) + 'a>;

/// One incoming migration: the settings, then [`run`](Reception::run)
/// with the function that builds the VM.
///
/// ```text
/// Reception::new(transport)        // the control connection from the source
///     .config(cfg)                 // ReceiveConfig (default: ReceiveConfig::default())
///     .accept_streams(acceptor)    // optional: grant page streams, accepted here
///     .cancel(token.clone())       // optional: cancel from another thread
///     .progress(|p| log(p))        // optional: events (never while the guest is paused)
///     .run(|desc| make_vm(desc))?  // blocks; (VM, ReceiveReport)
/// ```
///
/// `create` in [`run`](Reception::run) is called with the source's
/// [`VmDescription`] once the handshake passed the protocol checks; it
/// builds the (paused) VM or refuses with a [`VmError`] whose message is
/// sent back to the source. The VM is returned running — or paused,
/// without [`DestinationVm::resume`] having been called, when the source
/// VM was paused when its migration started
/// ([`ReceiveReport::running`]); on error it has been dropped without
/// running.
///
/// # Cancel
///
/// A [`CancelToken::cancel`] before the destination read the source's `Go`
/// drops the VM (it never ran) and fails with
/// [`crate::ErrorKind::Cancelled`]; the source keeps its guest. Until the
/// state is restored, the cancel shuts the connections down (the source
/// sees them break); while page streams are being accepted the acceptor
/// is asked in slices of at most 100 ms, and a cancel is seen between two.
/// From `Ready` on the connections stay up: the wait for `Go` looks at the
/// token every 100 ms, and a cancelled destination answers `Abandoned`, so
/// that a source that already sent `Go` resumes its guest instead of
/// staying paused as ambiguous. Once `Go` was read the migration is
/// committed and a cancel is ignored: the source was told to stop its
/// guest, so dropping this VM would lose it.
///
/// # Progress
///
/// The callback runs on the calling thread and never while the guest is
/// paused; see [`ReceiveProgress`] for when each event arrives.
#[cfg_attr(feature = "test-util", doc = include_str!("../doc/receive.md"))]
#[must_use = "a Reception does nothing until run"]
pub struct Reception<'a> {
    transport: Box<dyn Transport>,
    config: ReceiveConfig,
    acceptor: Option<Box<dyn StreamAcceptor + 'a>>,
    cancel: CancelToken,
    progress: Option<Callback<'a>>,
}

impl<'a> Reception<'a> {
    /// A reception on `transport` (the control connection) with the
    /// default settings, granting one page stream, no cancel token and no
    /// progress callback.
    pub fn new(transport: Box<dyn Transport>) -> Self {
        Reception {
            transport,
            config: ReceiveConfig::default(),
            acceptor: None,
            cancel: CancelToken::new(),
            progress: None,
        }
    }

    /// The settings.
    pub fn config(mut self, config: ReceiveConfig) -> Self {
        self.config = config;
        self
    }

    /// Grants a source's request for several page streams and accepts them
    /// through `acceptor` (a [`crate::transport::OwnedAcceptor`],
    /// `livemig_tls::TlsAcceptor`, or your own). Without it one stream is
    /// granted (everything on the control connection).
    ///
    /// Each extra connection must start with a
    /// [`StreamHello`](crate::protocol::StreamHello) carrying the random
    /// token sent in the [`HelloReply`](crate::protocol::HelloReply)
    /// (connections that do not are dropped); all must arrive within
    /// [`ReceiveConfig::io_timeout`]. `acceptor.close()` is called once
    /// they are all there (or right after the handshake when one stream
    /// suffices).
    pub fn accept_streams(mut self, acceptor: impl StreamAcceptor + 'a) -> Self {
        self.acceptor = Some(Box::new(acceptor));
        self
    }

    /// Cancels the reception when `token` (or a clone) is cancelled from
    /// another thread, until `Go` (see the type's documentation).
    pub fn cancel(mut self, token: CancelToken) -> Self {
        self.cancel = token;
        self
    }

    /// Calls `progress` with each [`ReceiveProgress`] event.
    pub fn progress(mut self, progress: impl FnMut(&ReceiveProgress) + 'a) -> Self {
        self.progress = Some(Box::new(progress));
        self
    }

    /// Receives the migration. Blocks until the guest runs here (or
    /// failed).
    pub fn run<V, F>(mut self, create: F) -> Result<(V, ReceiveReport), MigrationError>
    where
        V: DestinationVm,
        F: FnOnce(&VmDescription) -> Result<V, VmError>,
    {
        let acceptor = self
            .acceptor
            .as_mut()
            .map(|a| &mut **a as &mut dyn StreamAcceptor);
        let mut no_progress = |_: &ReceiveProgress| {};
        let progress: &mut dyn FnMut(&ReceiveProgress) = match self.progress.as_mut() {
            Some(p) => &mut **p,
            None => &mut no_progress,
        };
        let call = super::Call {
            config: &self.config,
            cancel: &self.cancel,
            progress,
        };
        super::receive_checked(self.transport, acceptor, call, create)
    }
}
