//! The destination side: handshake → memory → state → `Ready` → `Go` →
//! resume → `Resumed`. See [`Reception`].
//!
//! One file per phase: `handshake.rs` (`Hello`, the VM built and its
//! memory scrubbed, `HelloReply`, the page streams), `memory.rs` (pages on
//! every connection, round ends and the state on the control one, until
//! `Complete`; pages never written there go in by `UFFDIO_COPY` through
//! `fill.rs` while that phase lasts), `commit.rs` (restore → `Ready` →
//! `Go` → resume → `Resumed`). Control messages are read through
//! `crate::control`.
//!
//! The stream is hostile until proven otherwise: every frame is checked
//! (length bound before allocation, sequence number, crc32c), every page
//! range is checked against the memory layout before a byte is written, and
//! the VM is only resumed after the state restored cleanly *and* the source
//! committed with `Go`. On any error the VM is dropped without ever running.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::control::{self, ControlReader, ControlWriter};
use crate::error::{ErrorKind, MigrationError, Phase};
use crate::protocol::PROTOCOL_VERSION;
use crate::report::ReceiveProgress;
use crate::source::CancelToken;
use crate::transport::{StreamAcceptor, Transport};
use crate::vm::{DestinationVm, VmDescription, VmError};

mod builder;
mod commit;
mod direct;
mod fill;
mod gather;
mod handshake;
pub mod local;
mod memory;
#[cfg(any(test, feature = "test-util"))]
pub(crate) use memory::DIRECT_PAGES;
pub mod postcopy;

pub use builder::{Pager, Reception};
pub use handshake::STREAM_HELLO_TIMEOUT;

/// What the destination saw.
#[derive(Debug, Clone, Default, Serialize)]
#[non_exhaustive]
pub struct ReceiveReport {
    /// Pages received with data.
    pub pages: u64,
    /// Zero-page markers received.
    pub zero_pages: u64,
    /// Bytes read from the transport.
    pub bytes: u64,
    /// Rounds announced by the source.
    pub rounds: u32,
    /// Page streams used (1 = pages on the control connection).
    pub streams: u32,
    /// Time to restore the state, ms.
    pub restore_ms: f64,
    /// Time to resume the vCPUs, ms.
    pub resume_ms: f64,
    /// From the handshake to the resume, ms.
    pub total_ms: f64,
    /// The protocol version spoken.
    pub version: u32,
    /// Whether the VM was resumed: false when the source VM was paused
    /// (by its operator) when the migration started; the VM is then
    /// returned paused and [`DestinationVm::resume`] was not called.
    pub running: bool,
    /// Pages written into fresh memory by `UFFDIO_COPY`
    /// ([`Reception::fresh_fill`]); 0 where the fill was off or
    /// unavailable.
    pub filled_pages: u64,
    /// Pages of `PagesGather` frames that arrived torn (the guest changed
    /// them while the source sent them) and were not installed; each was
    /// installed from a later, intact copy
    /// ([`MigrationConfig::zero_copy`](crate::MigrationConfig::zero_copy)).
    pub torn_pages: u64,
    /// The post-copy phase's measurements, when the migration used it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<postcopy::PostcopyStats>,
}

/// Destination settings.
#[derive(Debug, Clone)]
pub struct ReceiveConfig {
    /// Timeout of every blocking read and write (the source sends
    /// continuously during rounds, or a keepalive at least every second, so
    /// a silent source for this long is a dead source). It also bounds the
    /// wait for `Go` after `Ready`: then the destination drops the VM and
    /// answers `Abandoned`.
    pub io_timeout: Duration,
}

impl ReceiveConfig {
    /// Checks the settings ([`Reception::run`] calls it before reading
    /// anything):
    /// `io_timeout` must be more than 0 and at most
    /// [`crate::policy::MAX_DURATION`].
    pub fn validate(&self) -> Result<(), crate::policy::ConfigError> {
        crate::policy::check_timeout("io_timeout", self.io_timeout)
    }
}

impl Default for ReceiveConfig {
    fn default() -> Self {
        ReceiveConfig {
            io_timeout: Duration::from_secs(10),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Receives one migration from `transport`:
/// `Reception::new(transport).config(..).run(create)`.
///
/// Kept for one release so that callers keep compiling; use
/// [`Reception`], which also takes an acceptor for page streams, a cancel
/// token and a progress callback. A source asking for several page streams
/// is granted one (everything on `transport`).
#[deprecated(
    since = "0.2.0",
    note = "use livemig::Reception::new(transport)...run(create)"
)]
pub fn receive<V, F>(
    transport: Box<dyn Transport>,
    config: &ReceiveConfig,
    create: F,
) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
{
    Reception::new(transport).config(config.clone()).run(create)
}

/// Like [`receive`], granting a source's request for several page streams
/// and accepting them through `acceptor`:
/// `Reception::new(transport).accept_streams(acceptor)..`.
///
/// Kept for one release so that callers keep compiling; use [`Reception`].
#[deprecated(
    since = "0.2.0",
    note = "use livemig::Reception::new(transport).accept_streams(acceptor)...run(create)"
)]
pub fn receive_streams<V, F>(
    transport: Box<dyn Transport>,
    acceptor: Option<&mut dyn StreamAcceptor>,
    config: &ReceiveConfig,
    create: F,
) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
{
    let r = Reception::new(transport).config(config.clone());
    match acceptor {
        Some(a) => r.accept_streams(a).run(create),
        None => r.run(create),
    }
}

/// What [`Reception::run`] passes along besides the transport, the
/// acceptor and `create`.
pub(super) struct Call<'c> {
    pub(super) config: &'c ReceiveConfig,
    pub(super) cancel: &'c CancelToken,
    pub(super) progress: &'c mut dyn FnMut(&ReceiveProgress),
    /// Fill fresh memory by `UFFDIO_COPY` ([`Reception::fresh_fill`]).
    pub(super) fill: bool,
}

/// The reception: checks the settings, runs the phases, and on error tells
/// the source why.
fn receive_checked<V, F>(
    transport: Box<dyn Transport>,
    acceptor: Option<&mut dyn StreamAcceptor>,
    call: Call<'_>,
    create: F,
) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
{
    let (config, cancel) = (call.config, call.cancel);
    on_checked_link(transport, config, cancel, |link| {
        run(link, acceptor, call, create)
    })
}

/// What every mode of [`Reception::run`] does around its phases: checks
/// the settings and the cancel token, lets a cancel shut `transport` down
/// (until `Ready`: see `commit`), and runs `body` on the control
/// connection ([`on_link`]).
pub(super) fn on_checked_link<T>(
    transport: Box<dyn Transport>,
    config: &ReceiveConfig,
    cancel: &CancelToken,
    body: impl FnOnce(&mut Link) -> Result<T, MigrationError>,
) -> Result<T, MigrationError> {
    let hs = Phase::Handshake;
    config.validate().map_err(|e| MigrationError::new(hs, e))?;
    if cancel.is_cancelled() {
        return Err(MigrationError::new(hs, ErrorKind::Cancelled));
    }
    cancel.attach(transport.try_clone().ok());
    let result = on_link(transport, config.io_timeout, cancel, body);
    cancel.detach_all();
    result
}

/// Opens the control connection (reads time out after `io_timeout`) and
/// runs `body` on it; a failure is named and reported to the source as
/// [`fail`] says. Every entry point of the destination goes through here.
pub(super) fn on_link<T>(
    transport: Box<dyn Transport>,
    io_timeout: Duration,
    cancel: &CancelToken,
    body: impl FnOnce(&mut Link) -> Result<T, MigrationError>,
) -> Result<T, MigrationError> {
    let (control, fw) = control::open(transport, io_timeout)?;
    let mut link = Link {
        control,
        fw,
        version: PROTOCOL_VERSION,
        granted: 1,
        postcopy: false,
        postcopy_prepare: false,
        probe: false,
        restore_cost: None,
        pages_gather: false,
        started_before_wake: false,
        read_count: false,
    };
    body(&mut link).map_err(|e| fail(&mut link, e, cancel))
}

/// A failed reception: a cancel is named as such, and the source is told
/// why (best effort) unless it failed itself.
fn fail(link: &mut Link, mut e: MigrationError, cancel: &CancelToken) -> MigrationError {
    if cancel.is_cancelled() {
        e.kind = ErrorKind::Cancelled;
    }
    // A cancel before `Ready` broke the connections (nothing to say); one
    // after (the completion phase) did not, and the source must hear
    // `Abandoned` to resume its guest instead of staying paused.
    let cancelled_early = matches!(e.kind, ErrorKind::Cancelled) && e.phase != Phase::Completion;
    if !matches!(e.kind, ErrorKind::Remote { .. }) && !cancelled_early {
        // In the completion phase (`Ready` sent or being sent) the source
        // may have sent `Go` already: say that the VM is gone for good
        // (it was dropped when `run` returned), so that the source
        // resumes instead of staying paused as ambiguous. A version-2
        // source knows no `Abandoned`: it gets the `Error`.
        let abandoned = e.phase == Phase::Completion && link.version >= 3;
        control::send_failure(&mut link.fw, &e, abandoned);
    }
    log::warn!("{e}");
    e
}

/// The control connection and the protocol version negotiated on it.
pub(super) struct Link {
    control: ControlReader,
    fw: ControlWriter,
    /// The version chosen in the handshake (until then, the newest).
    version: u32,
    /// Page streams granted (1 = pages on the control connection).
    granted: u32,
    /// Post-copy granted (only by `postcopy::receive_postcopy`, to a source
    /// that offered it).
    postcopy: bool,
    /// With `postcopy`: the source offered to prepare the switch before its
    /// pause (`PostcopyPrepare`), and it is granted.
    postcopy_prepare: bool,
    /// The switchover probe offered by the source and granted (only by
    /// the copying reception without post-copy: its control reader answers
    /// each `Probe`).
    probe: bool,
    /// The VM's save and restore, timed in the handshake for a source that
    /// asked ([`DestinationVm::rehearse_restore`]); sent in `HelloReply`.
    restore_cost: Option<crate::vm::RestoreRehearsal>,
    /// `PagesGather` frames asked for by the source and granted (only by
    /// the copying reception without post-copy).
    pages_gather: bool,
    /// The source asked whether the VM starts the guest before it wakes
    /// the vCPU threads, and it does
    /// ([`DestinationVm::started_before_wake`]): said in `HelloReply` (only
    /// by the copying reception, whose switchover resumes through
    /// `resume_then`).
    started_before_wake: bool,
    /// The read count offered by the source and granted (only by the
    /// copying reception without post-copy: its control loop answers each
    /// `ReadQuery`).
    read_count: bool,
}

/// The phases, in order: handshake, memory and state, restore and commit.
/// On error the VM is dropped here, without ever running.
fn run<V, F>(
    link: &mut Link,
    acceptor: Option<&mut dyn StreamAcceptor>,
    call: Call<'_>,
    create: F,
) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
{
    let started = Instant::now();
    let hello = handshake::read_hello(link)?;
    link.probe = hello.probe;
    link.read_count = hello.read_count && link.version >= 3;
    link.pages_gather = hello.pages_gather && link.version >= 3;
    let layout = hello.desc.layout.clone();
    let mut vm = handshake::create_vm(&mut link.fw, &hello.desc, create)?;
    if hello.restore_cost && link.version >= 3 {
        link.restore_cost = handshake::rehearse_restore(&mut link.fw, &mut vm)?;
    }
    link.started_before_wake =
        hello.started_before_wake && link.version >= 3 && vm.started_before_wake();
    let received = {
        let ram = handshake::prepare_memory(&mut link.fw, &vm, &layout, hello.local.as_ref())?;
        (call.progress)(&ReceiveProgress::Accepted {
            memory_bytes: layout.total_bytes(),
            vcpus: hello.desc.vcpus,
            streams_asked: hello.streams,
        });
        let timeout = call.config.io_timeout;
        let readers = handshake::reply(link, acceptor, hello.streams, timeout, call.cancel)?;
        for r in &readers {
            call.cancel.attach(r.get_ref().try_clone().ok());
        }
        let answers = (link.probe || link.read_count).then_some(&mut link.fw);
        memory::receive(
            &mut link.control,
            readers,
            &layout,
            &ram,
            memory::Hooks {
                on_prepare: None,
                answers,
                progress: &mut *call.progress,
            },
            memory::Intake {
                fresh_fill: call.fill,
                gather: link.pages_gather,
                probe: link.probe,
                read_count: link.read_count,
            },
        )?
    };
    if received.switch.is_some() {
        let e = ErrorKind::Unexpected {
            got: "PostcopySwitch".into(),
            expected: "Pages, RoundEnd, State or Complete (post-copy was not granted)",
        };
        return Err(MigrationError::new(Phase::FinalMemory, e));
    }
    let running = !hello.paused;
    let times = commit::commit(&mut vm, link, &received.sections, running, call.cancel)?;
    (call.progress)(&ReceiveProgress::Completed { running });
    let report = ReceiveReport {
        pages: received.pages,
        zero_pages: received.zero,
        bytes: received.stream_bytes + link.control.bytes_read(),
        rounds: received.rounds,
        streams: link.granted,
        restore_ms: ms(times.restore),
        resume_ms: ms(times.resume),
        total_ms: ms(started.elapsed()),
        version: link.version,
        running,
        filled_pages: received.filled,
        torn_pages: received.torn,
        postcopy: None,
    };
    Ok((vm, report))
}
