//! The destination side: handshake → memory → state → `Ready` → `Go` →
//! resume → `Resumed`. See [`receive`].
//!
//! One file per phase: `handshake.rs` (`Hello`, the VM built and its
//! memory scrubbed, `HelloReply`, the page streams), `memory.rs` (pages on
//! every connection, round ends and the state on the control one, until
//! `Complete`), `commit.rs` (restore → `Ready` → `Go` → resume →
//! `Resumed`). Control messages are read through `crate::control`.
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
use crate::transport::{StreamAcceptor, Transport};
use crate::vm::{DestinationVm, VmDescription, VmError};

mod commit;
mod handshake;
pub mod local;
mod memory;
pub mod postcopy;

pub use handshake::STREAM_HELLO_TIMEOUT;

/// What the destination saw.
#[derive(Debug, Clone, Default, Serialize)]
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
    /// Checks the settings (`receive` calls it before reading anything):
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

/// Receives one migration from `transport`.
///
/// `create` is called with the source's [`VmDescription`] once the handshake
/// passed the protocol checks; it builds the (paused) destination VM or
/// refuses with a [`VmError`] whose message is sent back to the source. The
/// VM is returned running — or paused, without [`DestinationVm::resume`]
/// having been called, when the source VM was paused when its migration
/// started ([`ReceiveReport::running`]); on error it has been dropped
/// without running.
///
/// A source asking for several page streams is granted one (everything on
/// `transport`); see [`receive_streams`].
#[cfg_attr(feature = "test-util", doc = include_str!("../doc/receive.md"))]
pub fn receive<V, F>(
    transport: Box<dyn Transport>,
    config: &ReceiveConfig,
    create: F,
) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
{
    receive_streams(transport, None, config, create)
}

/// Like [`receive`], granting a source's request for several page streams
/// and accepting them through `acceptor`.
///
/// Each extra connection must start with a
/// [`StreamHello`](crate::protocol::StreamHello) carrying the
/// random token sent in the [`HelloReply`](crate::protocol::HelloReply)
/// (connections that do not are dropped); all must arrive within
/// [`ReceiveConfig::io_timeout`].
/// `acceptor.close()` is called once they are all there (or right after the
/// handshake when one stream suffices).
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
    config
        .validate()
        .map_err(|e| MigrationError::new(Phase::Handshake, e))?;
    let (control, fw) = control::open(transport, config.io_timeout)?;
    let mut link = Link {
        control,
        fw,
        version: PROTOCOL_VERSION,
        granted: 1,
        postcopy: false,
    };
    let result = run(&mut link, acceptor, config, create);
    if let Err(e) = &result {
        // Tell the source why (best effort), unless the source itself failed.
        if !matches!(e.kind, ErrorKind::Remote { .. } | ErrorKind::Cancelled) {
            // In the completion phase (`Ready` sent or being sent) the source
            // may have sent `Go` already: say that the VM is gone for good
            // (it was dropped when `run` returned), so that the source
            // resumes instead of staying paused as ambiguous. A version-2
            // source knows no `Abandoned`: it gets the `Error`.
            let abandoned = e.phase == Phase::Completion && link.version >= 3;
            control::send_failure(&mut link.fw, e, abandoned);
        }
        log::warn!("{e}");
    }
    result
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
}

/// The phases, in order: handshake, memory and state, restore and commit.
/// On error the VM is dropped here, without ever running.
fn run<V, F>(
    link: &mut Link,
    acceptor: Option<&mut dyn StreamAcceptor>,
    config: &ReceiveConfig,
    create: F,
) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
{
    let started = Instant::now();
    let hello = handshake::read_hello(link)?;
    let layout = hello.desc.layout.clone();
    let mut vm = handshake::create_vm(&mut link.fw, &hello.desc, create)?;
    let received = {
        let ram = handshake::prepare_memory(&mut link.fw, &vm, &layout, hello.local.as_ref())?;
        let readers = handshake::reply(link, acceptor, hello.streams, config.io_timeout)?;
        memory::receive(&mut link.control, readers, &layout, &ram)?
    };
    if received.switch.is_some() {
        let e = ErrorKind::Unexpected {
            got: "PostcopySwitch".into(),
            expected: "Pages, RoundEnd, State or Complete (post-copy was not granted)",
        };
        return Err(MigrationError::new(Phase::FinalMemory, e));
    }
    let running = !hello.paused;
    let times = commit::commit(&mut vm, link, &received.sections, running)?;
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
        postcopy: None,
    };
    Ok((vm, report))
}
