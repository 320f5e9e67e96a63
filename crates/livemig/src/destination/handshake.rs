//! The destination's handshake: `Hello` ([`read_hello`]), the VM built for
//! it ([`create_vm`]), its memory scrubbed ([`prepare_memory`]), then
//! `HelloReply` and the extra page streams ([`reply`]). Anything refused
//! here is refused with a `HelloReply` that says why.

use std::time::{Duration, Instant};

use super::{ms, Link};
use crate::control::{unexpected, ControlWriter};
use crate::error::{ErrorKind, MigrationError, Phase};
use crate::local::LocalIdentity;
use crate::memory::MemoryLayout;
use crate::protocol::{
    FrameReader, Hello, HelloReply, Message, MsgKind, ProtocolError, StreamHello, MAX_RESTORE_COST,
    MAX_STREAMS,
};
use crate::ram::HostRam;
use crate::source::CancelToken;
use crate::transport::{StreamAcceptor, Transport};
use crate::vm::{check_layout, DestinationVm, RestoreRehearsal, VmDescription, VmError};

/// Refuses the migration: a `HelloReply` with `reason` (best effort), and
/// the error.
pub(super) fn refuse(fw: &mut ControlWriter, reason: String) -> MigrationError {
    let _ = fw.send(&HelloReply::refused(reason.clone()));
    let _ = fw.flush();
    MigrationError::new(Phase::Handshake, ErrorKind::Refused(reason))
}

/// Reads `Hello` and negotiates the version (recorded in `link`).
pub(super) fn read_hello(link: &mut Link) -> Result<Hello, MigrationError> {
    let hs = Phase::Handshake;
    let f = link.control.next(hs, "Hello")?;
    if f.kind != MsgKind::Hello {
        return Err(unexpected(f.kind, "Hello", hs));
    }
    let hello = Hello::decode(f.payload);
    let hello = hello.map_err(|e| refuse(&mut link.fw, e.to_string()))?;
    let version = hello.negotiated_version();
    link.version = version.map_err(|e| refuse(&mut link.fw, e.to_string()))?;
    Ok(hello)
}

/// Builds the (paused) VM for `desc` and checks its memory matches.
pub(super) fn create_vm<V, F>(
    fw: &mut ControlWriter,
    desc: &VmDescription,
    create: F,
) -> Result<V, MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
{
    let t0 = Instant::now();
    let vm = create(desc).map_err(|e| refuse(fw, e.to_string()))?;
    log::debug!("destination VM created in {:.2} ms", ms(t0.elapsed()));
    check_layout(vm.memory(), desc).map_err(|e| refuse(fw, e.to_string()))?;
    Ok(vm)
}

/// How many times the destination rehearses its restore
/// ([`rehearse_restore`]).
const REHEARSALS: u32 = 3;

/// Times the VM's save and restore of its own state
/// ([`DestinationVm::rehearse_restore`], [`REHEARSALS`] times, or once for
/// a VM that cannot tell) for a source that asked, and keeps the fastest
/// save and the fastest restore: the source keeps the fastest of its own
/// state measurements too, and a single rehearsal may be slow for reasons
/// the switchover does not share (a thread pool started on first use, a
/// restore that lost its CPU). A VM that cannot restore its own state is
/// refused now, before any page. Times over [`MAX_RESTORE_COST`] are sent
/// as that.
pub(super) fn rehearse_restore<V: DestinationVm>(
    fw: &mut ControlWriter,
    vm: &mut V,
) -> Result<Option<RestoreRehearsal>, MigrationError> {
    let mut best: Option<RestoreRehearsal> = None;
    for _ in 0..REHEARSALS {
        let rehearsal = vm.rehearse_restore().map_err(|e| {
            refuse(
                fw,
                format!("this destination's VM cannot restore its own state: {e}"),
            )
        })?;
        let Some(r) = rehearsal else { break };
        log::debug!(
            "restore rehearsed: save {:.3} ms, restore {:.3} ms",
            ms(r.save),
            ms(r.restore)
        );
        best = Some(best.map_or(r, |b| RestoreRehearsal {
            save: b.save.min(r.save),
            restore: b.restore.min(r.restore),
        }));
    }
    Ok(best.map(|r| RestoreRehearsal {
        save: r.save.min(MAX_RESTORE_COST),
        restore: r.restore.min(MAX_RESTORE_COST),
    }))
}

/// The VM's memory, every page reading as zero: the source leaves out
/// pages that read as zero there, whatever the VMM put in them here.
///
/// Refused instead when the source asked for a local hand-over (`local`)
/// and this memory is backed by one of the source's own files: scrubbing
/// it would destroy the running guest's memory.
pub(super) fn prepare_memory<'a, V: DestinationVm>(
    fw: &mut ControlWriter,
    vm: &'a V,
    layout: &MemoryLayout,
    local: Option<&LocalIdentity>,
) -> Result<HostRam<'a>, MigrationError> {
    if local.is_some_and(|l| l.shares_file_with(vm.memory())) {
        let why = "this destination's memory is the source's own guest memory (the same \
                   shared file), and it copies memory, which would overwrite it: \
                   a local hand-over must be received as one (receive_local)";
        return Err(refuse(fw, why.to_string()));
    }
    let ram = HostRam::new(vm.memory(), layout).map_err(|e| {
        let why = format!("destination memory cannot be used: {e}");
        refuse(fw, why)
    })?;
    let t_scrub = Instant::now();
    let written = ram.scrub();
    log::debug!(
        "destination memory scrubbed in {:.2} ms",
        ms(t_scrub.elapsed())
    );
    if written > 0 {
        log::warn!(
            "zeroed {written} region(s) of destination memory by writing ({:.1} ms): \
             their backing cannot drop pages",
            ms(t_scrub.elapsed())
        );
    }
    Ok(ram)
}

/// Accepts: `HelloReply` with the streams granted (one without an
/// acceptor), then the extra page streams. Returns their readers (none
/// with one stream).
pub(super) fn reply(
    link: &mut Link,
    acceptor: Option<&mut dyn StreamAcceptor>,
    asked: u32,
    timeout: Duration,
    cancel: &CancelToken,
) -> Result<Vec<FrameReader<Box<dyn Transport>>>, MigrationError> {
    let streams = if acceptor.is_some() {
        asked.clamp(1, MAX_STREAMS)
    } else {
        1
    };
    let token = if streams > 1 { random_token() } else { [0; 16] };
    // The newest version in both ranges (`Hello::decode` refused ranges
    // that do not overlap): 3, or 2 with a source of release 0.1.0.
    let mut reply = HelloReply::accepted(streams, token);
    reply.version = link.version;
    // Granted only in version 3 or later (the byte follows `version`).
    reply.postcopy = link.postcopy && link.version >= 3;
    reply.postcopy_prepare = reply.postcopy && link.postcopy_prepare;
    // The same byte: never together with post-copy (whose reception does
    // not answer probes) in this build.
    link.probe = link.probe && link.version >= 3 && !reply.postcopy;
    reply.probe = link.probe;
    reply.restore_cost = link.restore_cost.filter(|_| link.version >= 3);
    reply.pages_gather = link.pages_gather;
    reply.started_before_wake = link.started_before_wake;
    // Not with post-copy either (its reception answers no question).
    link.read_count = link.read_count && link.version >= 3 && !reply.postcopy;
    reply.read_count = link.read_count;
    link.granted = streams;
    crate::control::send(&mut link.fw, &reply, Phase::Handshake)?;
    match acceptor {
        Some(a) if streams > 1 => {
            let r = accept_streams(a, streams, token, timeout, cancel);
            a.close();
            r
        }
        Some(a) => {
            a.close();
            Ok(Vec::new())
        }
        None => Ok(Vec::new()),
    }
}

/// Random bytes for the stream token (from the kernel; never fails in
/// practice, and the token only keeps stray connections out — TLS is what
/// keeps attackers out).
pub(super) fn random_token() -> [u8; 16] {
    use std::io::Read;
    let mut t = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut t))
        .is_ok();
    if !ok {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let x = now ^ (u128::from(std::process::id()) << 64);
        t = x.to_le_bytes();
    }
    t
}

/// How long an accepted page-stream connection may take to send its
/// `StreamHello` (the source sends it right after connecting) before it is
/// dropped as a stray.
pub const STREAM_HELLO_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest single wait for a page-stream connection: a cancel is seen
/// within this.
const ACCEPT_SLICE: Duration = Duration::from_millis(100);

/// Accepts the `n` page streams of a migration (until they are all there,
/// `timeout` passed, or `cancel` was cancelled).
pub(super) fn accept_streams(
    acceptor: &mut dyn StreamAcceptor,
    n: u32,
    token: [u8; 16],
    timeout: Duration,
    cancel: &CancelToken,
) -> Result<Vec<FrameReader<Box<dyn Transport>>>, MigrationError> {
    let hs = Phase::Handshake;
    let deadline = Instant::now() + timeout;
    let mut slots: Vec<Option<FrameReader<Box<dyn Transport>>>> = (0..n).map(|_| None).collect();
    let mut have = 0;
    while have < n {
        if cancel.is_cancelled() {
            return Err(MigrationError::new(hs, ErrorKind::Cancelled));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(MigrationError::new(
                hs,
                ErrorKind::Timeout {
                    waiting_for: "page stream connections",
                    after: timeout,
                },
            ));
        }
        // In slices, so that a cancel is seen while no connection comes.
        let t = match acceptor.accept_stream(left.min(ACCEPT_SLICE)) {
            Ok(t) => t,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                ) =>
            {
                continue; // the deadline check above reports it
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                // One bad connection (say, a failed TLS handshake): keep waiting.
                log::warn!("refused a page stream connection: {e}");
                continue;
            }
            Err(e) => return Err(MigrationError::new(hs, ProtocolError::Io(e))),
        };
        let Some((index, mut r)) = identify(t, left, token, n) else {
            continue;
        };
        let slot = &mut slots[index as usize];
        if slot.is_some() {
            let peer = r.get_ref().peer();
            log::warn!("page stream {index} from {peer} a second time; dropped");
            continue;
        }
        if let Err(e) = r.get_mut().set_read_timeout(Some(timeout)) {
            return Err(MigrationError::new(hs, ProtocolError::Io(e)));
        }
        *slot = Some(r);
        have += 1;
    }
    Ok(slots.into_iter().flatten().collect())
}

/// Reads a new connection's `StreamHello` (waiting at most `left`, and at
/// most [`STREAM_HELLO_TIMEOUT`], so a stray that sends nothing cannot hold
/// the real streams off): its stream index if it carries `token` and an
/// index below `n`; otherwise the connection is logged and dropped.
fn identify(
    mut t: Box<dyn Transport>,
    left: Duration,
    token: [u8; 16],
    n: u32,
) -> Option<(u32, FrameReader<Box<dyn Transport>>)> {
    let peer = t.peer();
    let hello_wait = left.min(STREAM_HELLO_TIMEOUT).max(Duration::from_millis(1));
    if let Err(e) = t.set_read_timeout(Some(hello_wait)) {
        log::warn!("page stream from {peer}: {e}; dropped");
        return None;
    }
    let mut r = FrameReader::new(t);
    let hello = match r.read_frame() {
        Ok(f) if f.kind == MsgKind::StreamHello => StreamHello::decode(f.payload),
        Ok(f) => {
            let kind = f.kind;
            log::warn!("connection from {peer} sent {kind:?} instead of StreamHello; dropped");
            return None;
        }
        Err(e) => {
            log::warn!("connection from {peer}: {e}; dropped");
            return None;
        }
    };
    match hello {
        Ok(h) if h.token == token && h.index < n => Some((h.index, r)),
        Ok(h) => {
            let index = h.index;
            log::warn!(
                "connection from {peer}: wrong token or stream index {index} (of {n}); dropped"
            );
            None
        }
        Err(e) => {
            log::warn!("connection from {peer}: {e}; dropped");
            None
        }
    }
}
