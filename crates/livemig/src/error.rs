//! Migration errors: what went wrong, and in which phase.

use std::fmt;

use crate::protocol::ProtocolError;
use crate::transport::TransportError;
use crate::vm::VmError;

/// The phase a migration was in when something went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Connecting, handshake, and measuring the state size.
    Handshake,
    /// Pre-copy round `n` (0 = the full pass).
    Precopy(u32),
    /// The VM is paused; the last dirty pages are being sent.
    FinalMemory,
    /// Saving, sending or restoring vCPU, VM and device state.
    State,
    /// The completion exchange (`Ready`, `Go`, `Resumed`).
    Completion,
    /// After `Go` in a post-copy migration: the guest runs on the
    /// destination while its remaining pages are requested and pushed.
    Postcopy,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Handshake => write!(f, "handshake"),
            Phase::Precopy(n) => write!(f, "pre-copy round {n}"),
            Phase::FinalMemory => write!(f, "final memory (stop-and-copy)"),
            Phase::State => write!(f, "device state"),
            Phase::Completion => write!(f, "completion"),
            Phase::Postcopy => write!(f, "post-copy"),
        }
    }
}

/// What went wrong.
///
/// Two questions most callers ask have methods: whether the link failed
/// ([`ErrorKind::is_link_failure`]: connecting, or the connection broke or
/// went silent) or the peer misbehaved ([`ErrorKind::is_peer_fault`]:
/// what it sent is malformed or not valid at this point).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Setting the connection up failed (connecting, listening, accepting,
    /// an endpoint that does not parse): nothing was sent. A
    /// [`TransportError`] converts into a [`MigrationError`] in the
    /// handshake phase with `?`.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Reading, writing or decoding the stream failed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The VM implementation failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The destination refused the migration in the handshake.
    #[error("destination refused: {0}")]
    Refused(String),
    /// The peer reported an error.
    #[error("peer reported an error in its {phase} phase: {message}")]
    Remote {
        /// The peer's phase.
        phase: String,
        /// The peer's message.
        message: String,
    },
    /// A frame arrived that is not valid at this point.
    #[error("unexpected {got} frame (expected {expected})")]
    Unexpected {
        /// What arrived.
        got: String,
        /// What was expected.
        expected: &'static str,
    },
    /// The peer broke the protocol: what it sent is well framed but not
    /// valid here (e.g. pages outside memory).
    #[error("invalid stream: {0}")]
    Peer(#[from] PeerError),
    /// A failure on this side that is neither the VM's nor the peer's
    /// (e.g. a thread could not be started).
    #[error("internal failure: {0}")]
    Internal(#[from] InternalError),
    /// The peer did not answer in time.
    #[error("timed out: no {waiting_for} from the peer within {after:?}")]
    Timeout {
        /// What was expected.
        waiting_for: &'static str,
        /// The timeout.
        after: std::time::Duration,
    },
    /// Post-copy stopped before every page reached the destination. The
    /// guest runs on the destination and part of its memory is still only
    /// on the source: the source keeps its VM paused with its memory intact,
    /// the destination's vCPUs that touch a missing page wait for it
    /// (docs/postcopy.md).
    #[error("post-copy interrupted with {missing} page(s) not yet on the destination: {why}")]
    PostcopyInterrupted {
        /// Pages of the discard set not installed (destination) or not sent
        /// (source).
        missing: u64,
        /// What broke.
        why: String,
    },
    /// The migration was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// Something went wrong on one of the extra page streams of a
    /// multi-stream migration.
    #[error("page stream {index}: {source}")]
    Stream {
        /// Stream index (`0 ..` streams).
        index: u32,
        /// What went wrong there.
        source: Box<ErrorKind>,
    },
    /// Pre-copy did not converge within the caps and the policy is to fail.
    #[error("did not converge: after {rounds} rounds the expected downtime is {expected_ms:.1} ms (limit {limit_ms:.1} ms)")]
    NotConverged {
        /// Rounds run.
        rounds: u32,
        /// Expected downtime at the end, ms.
        expected_ms: f64,
        /// The limit, ms.
        limit_ms: f64,
    },
    /// A setting is out of range, or the settings do not fit the call
    /// (nothing was sent).
    #[error(transparent)]
    Config(#[from] crate::policy::ConfigError),
    /// The guest memory cannot be handed over locally (refused before
    /// anything was sent, or by the destination in the handshake).
    #[error("local hand-over: {0}")]
    Local(#[from] crate::local::LocalError),
    /// The VM's [`crate::guard::MigrationGuard`] refused the migration.
    #[error(transparent)]
    Guard(#[from] crate::guard::GuardError),
    /// The paused phase outlasted [`crate::MigrationConfig::max_pause`]
    /// before `Go`: the source gave up and resumed its guest.
    #[error("the guest was paused for {paused:?} without reaching the commit point (limit {limit:?}); the source resumed it")]
    PauseDeadline {
        /// The limit.
        limit: std::time::Duration,
        /// How long the guest was paused when the source gave up.
        paused: std::time::Duration,
    },
    /// Guest memory was written on the source while the VM was paused,
    /// after the final dirty sync: something [`crate::vm::SourceVm::pause`]
    /// did not stop (a device, a VMM thread) wrote it through the VMM's
    /// tracked path, and the destination would run with an older copy of
    /// those pages. Checked just before `Go`: the source resumed its guest.
    #[error("guest memory was written while the VM was paused: {pages} page(s) after the final dirty sync, the first page {page} of region {region}; SourceVm::pause must stop every device that writes guest memory (the source resumed its guest)")]
    WrittenWhilePaused {
        /// Pages written after the final sync.
        pages: u64,
        /// The region of the first one.
        region: u32,
        /// Its page index in that region (4 KiB pages).
        page: u64,
    },
    /// The destination answered `Go` with `Abandoned`: it dropped the VM
    /// and will never run it, so the source resumed the guest.
    #[error("the destination gave the guest up after Go and will never run it ({0}); the source runs the guest again")]
    Abandoned(Abandonment),
    /// The source sent `Go` but never heard that the destination runs the
    /// guest. The guest may be running there: the source must not resume it.
    #[error("switchover outcome unknown: the destination was told to run the guest but did not confirm ({0}); the source stays paused to avoid running the guest twice")]
    Ambiguous(Unconfirmed),
}

/// Why the destination gave the guest up after `Go`, as its `Abandoned`
/// frame says: where (its phase) and what happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{phase}: {message}")]
pub struct Abandonment {
    /// The destination's phase when it gave up (for example `completion`).
    pub phase: String,
    /// The destination's reason.
    pub message: String,
}

/// Why the source does not know whether the destination runs the guest
/// (see [`ErrorKind::Ambiguous`]): what happened after it tried to send `Go`.
#[derive(Debug, thiserror::Error)]
pub enum Unconfirmed {
    /// The source could not set the timeout of its wait for the answer.
    #[error("cannot wait for the answer to Go: {0}")]
    CannotWait(#[source] ProtocolError),
    /// No answer came within the wait.
    #[error("no Resumed within {0:?}")]
    NoAnswer(std::time::Duration),
    /// The destination answered with an `Error` frame.
    #[error("the destination reported an error after Go, in its {phase} phase: {message}")]
    RemoteError {
        /// The destination's phase.
        phase: String,
        /// The destination's message.
        message: String,
    },
    /// Reading the answer failed (for example the connection dropped).
    #[error(transparent)]
    Read(Box<ErrorKind>),
    /// A `Resumed` frame whose payload does not decode.
    #[error("a malformed Resumed frame: {0}")]
    MalformedResumed(#[source] ProtocolError),
    /// An `Abandoned` frame whose payload does not decode.
    #[error("a malformed Abandoned frame: {0}")]
    MalformedAbandoned(#[source] ProtocolError),
    /// Another kind of frame where `Resumed` belongs.
    #[error("an unexpected {0} frame instead of Resumed")]
    UnexpectedFrame(crate::protocol::MsgKind),
    /// Writing `Go` failed, and then no definite answer came either.
    #[error("sending Go failed ({go}); then {then}")]
    GoNotSent {
        /// Why writing `Go` failed.
        #[source]
        go: ProtocolError,
        /// What happened while waiting for the answer.
        then: Box<Unconfirmed>,
    },
}

impl ErrorKind {
    /// Whether the link failed: a transport could not be set up, the
    /// connection broke (end of file, reset, any I/O error) or the peer
    /// went silent past a timeout — on the control connection or on a page
    /// stream. Not a misbehaving peer, a refusal or a local failure.
    pub fn is_link_failure(&self) -> bool {
        match self {
            ErrorKind::Transport(_) | ErrorKind::Timeout { .. } => true,
            ErrorKind::Protocol(p) => matches!(
                p,
                ProtocolError::Io(_)
                    | ProtocolError::Read { .. }
                    | ProtocolError::Write { .. }
                    | ProtocolError::Eof { .. }
                    | ProtocolError::Broken { .. }
            ),
            ErrorKind::Stream { source, .. } => source.is_link_failure(),
            _ => false,
        }
    }

    /// Whether the peer misbehaved: it sent something malformed (a bad
    /// frame, checksum, sequence number or payload) or well formed but not
    /// valid at this point ([`ErrorKind::Unexpected`], [`ErrorKind::Peer`]).
    /// A peer's own reported failure ([`ErrorKind::Remote`]) or refusal is
    /// not a fault.
    pub fn is_peer_fault(&self) -> bool {
        match self {
            ErrorKind::Unexpected { .. } | ErrorKind::Peer(_) => true,
            ErrorKind::Protocol(_) => !self.is_link_failure(),
            ErrorKind::Stream { source, .. } => source.is_peer_fault(),
            _ => false,
        }
    }
}

/// A migration error: the phase and what went wrong.
#[derive(Debug, thiserror::Error)]
#[error("migration failed in {phase}: {kind}")]
pub struct MigrationError {
    /// Where.
    pub phase: Phase,
    /// What.
    #[source]
    pub kind: ErrorKind,
}

impl MigrationError {
    /// Builds an error.
    pub fn new(phase: Phase, kind: impl Into<ErrorKind>) -> Self {
        MigrationError {
            phase,
            kind: kind.into(),
        }
    }

    /// Whether the source must stay paused (the guest may run elsewhere).
    pub fn is_ambiguous(&self) -> bool {
        matches!(self.kind, ErrorKind::Ambiguous(_))
    }

    /// Whether the source must never resume the guest after this error:
    /// the outcome is ambiguous ([`MigrationError::is_ambiguous`]), or a
    /// post-copy broke after `Go` ([`ErrorKind::PostcopyInterrupted`]: the
    /// guest ran on the destination). The engine leaves the source paused
    /// in both cases.
    pub fn source_must_stay_paused(&self) -> bool {
        self.is_ambiguous() || matches!(self.kind, ErrorKind::PostcopyInterrupted { .. })
    }

    /// See [`ErrorKind::is_link_failure`].
    pub fn is_link_failure(&self) -> bool {
        self.kind.is_link_failure()
    }

    /// See [`ErrorKind::is_peer_fault`].
    pub fn is_peer_fault(&self) -> bool {
        self.kind.is_peer_fault()
    }
}

/// Setting up a connection failed: a [`MigrationError`] in the handshake
/// phase (nothing was sent), so that an embedder's
/// `transport::connect(..)?` and `Migration::run(..)?` share one error type.
impl From<TransportError> for MigrationError {
    fn from(e: TransportError) -> Self {
        MigrationError::new(Phase::Handshake, e)
    }
}

/// What a misbehaving peer sent: well-framed, but not valid at this point.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The destination chose a protocol version this side does not speak.
    #[error("the destination chose protocol version {chosen}; this side speaks {min}..={max}")]
    Version {
        /// The version chosen.
        chosen: u32,
        /// The oldest version this side speaks.
        min: u32,
        /// The newest version this side speaks.
        max: u32,
    },
    /// The destination granted more page streams than were asked for.
    #[error("the destination granted {granted} streams, {asked} were asked for")]
    TooManyStreams {
        /// Streams granted.
        granted: u32,
        /// Streams asked for.
        asked: u32,
    },
    /// A page record on a page stream that does not own its pages.
    #[error("pages 0x{gpa:x}+{npages} do not belong to page stream {index}")]
    WrongStream {
        /// First guest-physical address.
        gpa: u64,
        /// Pages.
        npages: u32,
        /// The stream the record arrived on.
        index: u32,
    },
    /// A page record outside guest memory.
    #[error("pages 0x{gpa:x}+{npages} do not fit guest memory")]
    OutsideMemory {
        /// First guest-physical address.
        gpa: u64,
        /// Pages.
        npages: u32,
    },
    /// Pages on the control connection of a multi-stream migration.
    #[error("pages on the control connection of a multi-stream migration")]
    PagesOnControl,
    /// More `State` frames than the protocol allows.
    #[error("more than {max} State frames")]
    TooManyStateFrames {
        /// The limit.
        max: usize,
    },
    /// A state section sent twice.
    #[error("section '{0}' appears in two State frames")]
    DuplicateSection(String),
    /// `Complete` before any `State` frame.
    #[error("Complete before any State")]
    NoState,
    /// A `ProbeReply` that answers no probe waiting for one, or with
    /// another padding length than the probe's.
    #[error(
        "a ProbeReply for probe {id} with {pad} padding bytes; probe {want} with {want_pad} \
         (or an earlier unanswered one) was expected"
    )]
    ProbeReply {
        /// The id answered.
        id: u32,
        /// The padding length answered.
        pad: u32,
        /// The probe waiting for its answer.
        want: u32,
        /// Its padding length.
        want_pad: u32,
    },
    /// A probe the destination answered without having granted probes.
    #[error("a switchover probe was granted but not offered")]
    ProbeNotOffered,
    /// The destination sent its restore cost to a source that did not ask
    /// for it.
    #[error("the destination sent a restore cost that was not asked for")]
    RestoreCostNotAsked,
    /// The destination granted `PagesGather` frames to a source that did
    /// not ask for them.
    #[error("the destination granted PagesGather frames that were not asked for")]
    PagesGatherNotAsked,
    /// The destination said its VM starts the guest before it wakes the
    /// vCPU threads to a source that did not ask.
    #[error(
        "the destination said its VM starts the guest before waking the vCPUs, which was not asked"
    )]
    StartedBeforeWakeNotAsked,
    /// The destination granted the read count (`ReadQuery` / `ReadCount`)
    /// to a source that did not offer it.
    #[error("the destination granted the read count, which was not offered")]
    ReadCountNotOffered,
    /// A `ReadCount` that answers no question asked (or asked and given up
    /// on).
    #[error("a ReadCount for question {id}; question {want} (or an earlier unanswered one) was expected")]
    ReadCount {
        /// The id answered.
        id: u32,
        /// The question waiting for its answer (`u32::MAX`: none).
        want: u32,
    },
    /// Pages of `PagesGather` frames failed their page CRC and no intact
    /// copy followed before memory was complete. A page the guest changed
    /// while the source sent it is always sent again; one that never is
    /// was corrupted on the way (or the source is broken). Reported before
    /// the commit point: nothing of it was installed.
    #[error(
        "{pages} page(s) failed their page CRC and were never sent again intact \
         (the first at 0x{first:x}): page data corrupted on the way"
    )]
    TornPages {
        /// Pages still without an intact copy.
        pages: u64,
        /// Guest-physical address of the first of them.
        first: u64,
    },
}

/// A failure inside this side of the migration, not caused by the VM or the
/// peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InternalError {
    /// A worker thread could not be started.
    #[error("cannot start {what} thread")]
    Spawn {
        /// Which thread.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A page-stream thread exited before it was asked to.
    #[error("page stream {0} is gone")]
    StreamGone(u32),
    /// The post-copy page server failed (installing a page, reading
    /// faults, a bad frame on the fault connection).
    #[error("post-copy page server: {0}")]
    Postcopy(String),
    /// A page-stream thread exited before it reported.
    #[error("sender thread exited")]
    Exited,
    /// A page-stream thread panicked.
    #[error("page stream thread panicked")]
    Panicked,
    /// The fresh-memory fill (`UFFDIO_COPY`, see
    /// [`crate::Reception::fresh_fill`]) failed and its memory could not be
    /// released for plain copies.
    #[error("fresh-memory fill: {0}")]
    Fill(#[source] std::io::Error),
}
