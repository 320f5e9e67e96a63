//! [`Reception`]: the one entry point of the destination side.

use crate::error::{MigrationError, Phase};
use crate::memory::{GuestMemory, MemoryLayout};
use crate::policy::ConfigError;
use crate::report::ReceiveProgress;
use crate::source::CancelToken;
use crate::transport::{StreamAcceptor, Transport};
use crate::vm::{DestinationVm, VmDescription, VmError};

use super::postcopy::{PostcopyMemory, Reconnect};
use super::{ReceiveConfig, ReceiveReport};

/// A progress callback.
type Callback<'a> = Box<dyn FnMut(&ReceiveProgress) + 'a>;

/// Builds the post-copy page installer for the new VM's memory (given to
/// [`Reception::postcopy`]); called once, when the source switches to
/// post-copy, before the state is restored.
pub type Pager<'a> =
    dyn FnOnce(&dyn GuestMemory, &MemoryLayout) -> Result<Box<dyn PostcopyMemory>, VmError> + 'a;

/// What [`Reception::postcopy`] set.
struct PostcopyPlan<'a> {
    fault: Box<dyn Transport>,
    pager: Box<Pager<'a>>,
    reconnect: Option<Box<Reconnect<'a>>>,
}

/// What kind of reception [`Reception::run`] runs.
enum Mode<'a> {
    /// Memory copied (pre-copy), the default.
    Copy,
    /// Memory copied, and post-copy granted to a source that offers it.
    Postcopy(PostcopyPlan<'a>),
    /// The same-host hand-over: the memory is the source's, only the state
    /// travels.
    Local,
}

/// One incoming migration: the settings, then [`run`](Reception::run)
/// with the function that builds the VM.
///
/// ```text
/// Reception::new(transport)        // the control connection from the source
///     .config(cfg)                 // ReceiveConfig (default: ReceiveConfig::default())
///     .accept_streams(acceptor)    // optional: grant page streams, accepted here
///     .postcopy(fault, pager)      // optional: grant post-copy (or .local(): same-host hand-over)
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
    mode: Mode<'a>,
    /// Both `postcopy` and `local` were asked for (refused by `run`).
    conflict: bool,
    /// See [`Reception::fresh_fill`].
    fill: bool,
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
            mode: Mode::Copy,
            conflict: false,
            fill: true,
        }
    }

    /// The settings.
    pub fn config(mut self, config: ReceiveConfig) -> Self {
        self.config = config;
        self
    }

    /// Grants a source's request for several page streams and accepts them
    /// through `acceptor` (a `transport::OwnedAcceptor` (feature `net`),
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

    /// Whether pages the destination never wrote are installed with
    /// `UFFDIO_COPY` (on by default; Linux, feature `uffd-fill`): the page
    /// arrives with its data in one step instead of the kernel faulting in
    /// and zeroing fresh memory that the copy then overwrites. Used for
    /// regions that are private anonymous memory or a shared file (not
    /// hugetlbfs), through a userfaultfd registered after the memory was
    /// scrubbed and released at the end of the memory phase, before the
    /// state is restored, on success and on every failure
    /// ([`ReceiveReport::filled_pages`] counts the pages). Where
    /// userfaultfd is unavailable pages are copied plainly.
    ///
    /// While it is on, a thread of the VMM that reads or writes a guest
    /// page not received yet during the memory phase waits until that page
    /// arrives or the memory phase ends (kernel accesses, such as KVM's,
    /// fail with `EFAULT` instead); the VM is not running then, so a VMM
    /// has no reason to. Pages filled this way are 4 KiB pages even in
    /// memory advised for transparent huge pages (khugepaged may merge
    /// them later). Post-copy arms its own userfaultfd on the same memory:
    /// the fill is released first.
    pub fn fresh_fill(mut self, on: bool) -> Self {
        self.fill = on;
        self
    }

    /// Calls `progress` with each [`ReceiveProgress`] event.
    pub fn progress(mut self, progress: impl FnMut(&ReceiveProgress) + 'a) -> Self {
        self.progress = Some(Box::new(progress));
        self
    }

    /// Grants post-copy (`docs/postcopy.md`) to a source that offers it:
    /// `fault` is the second connection of the migration (the source's
    /// [`crate::Migration::postcopy`] opened it), for page requests and
    /// their answers only. When the source switches, `pager` is called
    /// with the new VM's memory and the layout for its page installer (a
    /// `livemig_uffd` userfaultfd pager, say); the pages still to come are
    /// made missing before the state is restored, the VM resumes after
    /// `Go`, and [`run`](Reception::run) returns once every page is in
    /// (with [`ReceiveReport::postcopy`]). A source that does not switch
    /// gets a plain pre-copy reception (`pager` is not called), and one
    /// that asks for page streams (which rules post-copy out) gets them
    /// when [`Reception::accept_streams`] is set.
    ///
    /// A failure after `Go` is [`crate::ErrorKind::PostcopyInterrupted`]
    /// (the VM is dropped, the installer leaked: see
    /// [`postcopy`](super::postcopy)) unless
    /// [`Reception::postcopy_reconnect`] continues on new connections.
    /// Cannot be combined with [`Reception::local`].
    pub fn postcopy(
        mut self,
        fault: Box<dyn Transport>,
        pager: impl FnOnce(&dyn GuestMemory, &MemoryLayout) -> Result<Box<dyn PostcopyMemory>, VmError>
            + 'a,
    ) -> Self {
        self.conflict |= matches!(self.mode, Mode::Local);
        self.mode = Mode::Postcopy(PostcopyPlan {
            fault,
            pager: Box::new(pager),
            reconnect: None,
        });
        self
    }

    /// With [`Reception::postcopy`]: when a connection breaks after `Go`,
    /// `reconnect` gives a new (control, fault) pair from the same source
    /// (or `None` to give up; it decides how long to wait) and the copy
    /// continues: the pages installed so far stay, the vCPUs waiting for a
    /// page keep waiting. Without `postcopy` this does nothing.
    pub fn postcopy_reconnect(
        mut self,
        reconnect: impl FnMut() -> Option<(Box<dyn Transport>, Box<dyn Transport>)> + 'a,
    ) -> Self {
        if let Mode::Postcopy(plan) = &mut self.mode {
            plan.reconnect = Some(Box::new(reconnect));
        }
        self
    }

    /// Takes over a guest from a source on the same host
    /// ([`crate::Migration::local`] there) whose memory the VM built by
    /// `create` maps: the same shared files (memfds), at the same offsets,
    /// as the source's `Hello` names them. No page is ever written here;
    /// only the state travels. Refused in the handshake (with the reason
    /// sent back): a source that does not ask for a local hand-over, one
    /// on another host, and a VM whose memory is not the source's. Any
    /// failure before `Go` leaves the guest running on the source.
    ///
    /// An acceptor given with [`Reception::accept_streams`] is not used
    /// (one connection). Cannot be combined with [`Reception::postcopy`].
    pub fn local(mut self) -> Self {
        self.conflict |= matches!(self.mode, Mode::Postcopy(_));
        self.mode = Mode::Local;
        self
    }

    /// Receives the migration. Blocks until the guest runs here (or
    /// failed).
    pub fn run<V, F>(mut self, create: F) -> Result<(V, ReceiveReport), MigrationError>
    where
        V: DestinationVm,
        F: FnOnce(&VmDescription) -> Result<V, VmError>,
    {
        if self.conflict {
            let e = ConfigError {
                field: "mode",
                value: "postcopy and local".into(),
                rule: "a local hand-over copies no memory: choose one of Reception::postcopy \
                       and Reception::local"
                    .into(),
            };
            return Err(MigrationError::new(Phase::Handshake, e));
        }
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
            fill: self.fill,
        };
        match self.mode {
            Mode::Copy => super::receive_checked(self.transport, acceptor, call, create),
            Mode::Local => super::local::receive(self.transport, call, create),
            Mode::Postcopy(plan) => {
                let pager = plan.pager;
                let pager = move |vm: &V, layout: &MemoryLayout| pager(vm.memory(), layout);
                let mut never = || None;
                let mut given = plan.reconnect;
                let reconnect: &mut Reconnect<'_> = match given.as_mut() {
                    Some(r) => &mut **r,
                    None => &mut never,
                };
                super::postcopy::receive_inner(
                    self.transport,
                    plan.fault,
                    acceptor,
                    call,
                    create,
                    pager,
                    reconnect,
                )
            }
        }
    }
}
