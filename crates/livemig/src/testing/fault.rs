//! A fault-injecting [`Transport`] wrapper, for testing what the engine does
//! when the connection misbehaves.
//!
//! [`FaultTransport`] wraps any transport and passes reads through untouched.
//! The bytes *written* through it go to the wrapped transport, except at the
//! points where a [`Fault`] is planned: there the connection can be dropped,
//! a byte flipped, a frame truncated or duplicated, the writer stalled, or
//! the link silenced. Wrapping the source's transport faults the
//! source → destination direction; wrapping the destination's faults the
//! other one.
//!
//! Points are given as an [`At`]: a byte offset of the outgoing stream, or an
//! offset into a frame chosen by index, by kind, or as the frame following
//! one of a kind. The wrapper follows the frame boundaries of the outgoing
//! stream (each header read with [`crate::protocol::FrameHeader`], the one
//! owner of the 16-byte layout) and holds each header back until it is complete, so a
//! fault planned at the start of a frame strikes before any of its bytes
//! leave.
//!
//! ```
//! use livemig::protocol::MsgKind;
//! use livemig::testing::fault::{At, Fault, FaultTransport};
//! use livemig::transport::{mem, Transport};
//!
//! let (a, _b) = mem::pair();
//! // Drop the connection right before the first `Pages` frame.
//! let (t, probe) = FaultTransport::new(Box::new(a), Fault::Drop.at(At::kind(MsgKind::Pages, 0)));
//! let _boxed: Box<dyn Transport> = Box::new(t);
//! assert!(probe.fired().is_empty());
//! ```
//!
//! All clones ([`Transport::try_clone`]) share one outgoing stream position
//! and one fault plan; the [`FaultProbe`] tells which faults fired and which
//! frames went out.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::protocol::{FrameHeader, MsgKind, FRAME_HEADER_LEN};
use crate::transport::Transport;

const HDR: usize = FRAME_HEADER_LEN;
/// How often a stall checks whether the connection was shut down.
const STALL_POLL: Duration = Duration::from_millis(5);

/// Where a fault strikes, in the bytes written through a [`FaultTransport`].
///
/// Offsets count from 0. An offset past the end of the chosen frame lands in
/// the frames after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// At this offset of the outgoing byte stream.
    Byte(u64),
    /// At `offset` bytes into the frame with this index (frames written so
    /// far through this wrapper; for a protocol stream, the frame's `seq`).
    Frame {
        /// Index of the frame.
        index: u32,
        /// Byte offset into the frame (0 = the first header byte).
        offset: u64,
    },
    /// At `offset` bytes into the `nth` (0-based) frame of `kind`.
    Kind {
        /// The frame kind.
        kind: MsgKind,
        /// Which frame of that kind.
        nth: u32,
        /// Byte offset into the frame.
        offset: u64,
    },
    /// At `offset` bytes into the frame written right after the `nth` frame
    /// of `kind` (for example the first frame of round 1 follows
    /// `RoundEnd` number 0).
    After {
        /// The kind of the preceding frame.
        kind: MsgKind,
        /// Which frame of that kind.
        nth: u32,
        /// Byte offset into the following frame.
        offset: u64,
    },
}

impl At {
    /// The start of the frame with index `index`.
    pub fn frame(index: u32) -> Self {
        At::Frame { index, offset: 0 }
    }

    /// The start of the `nth` frame of `kind`.
    pub fn kind(kind: MsgKind, nth: u32) -> Self {
        At::Kind {
            kind,
            nth,
            offset: 0,
        }
    }

    /// The start of the frame following the `nth` frame of `kind`.
    pub fn after(kind: MsgKind, nth: u32) -> Self {
        At::After {
            kind,
            nth,
            offset: 0,
        }
    }

    /// The same point moved to `offset` bytes into the frame (for
    /// [`At::Byte`], `offset` bytes further into the stream).
    pub fn offset(self, offset: u64) -> Self {
        match self {
            At::Byte(b) => At::Byte(b.saturating_add(offset)),
            At::Frame { index, .. } => At::Frame { index, offset },
            At::Kind { kind, nth, .. } => At::Kind { kind, nth, offset },
            At::After { kind, nth, .. } => At::After { kind, nth, offset },
        }
    }
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            At::Byte(b) => write!(f, "byte {b}"),
            At::Frame { index, offset } => write!(f, "frame #{index} +{offset}"),
            At::Kind { kind, nth, offset } => write!(f, "{kind} #{nth} +{offset}"),
            At::After { kind, nth, offset } => {
                write!(f, "the frame after {kind} #{nth} +{offset}")
            }
        }
    }
}

/// What happens at the point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The connection is shut down (both directions, like a reset): the
    /// write reaching the point fails, every later write fails, and the peer
    /// sees end-of-file. Bytes before the point were passed on; whether the
    /// peer reads those still in flight depends on the wrapped transport
    /// (the in-memory pipe, like a reset TCP connection, discards them).
    Drop,
    /// The byte at the point is XORed with this mask; everything else passes.
    Flip(u8),
    /// The frame containing the point is cut there: its remaining bytes are
    /// discarded (the writer is told they were sent); later frames pass.
    Truncate,
    /// The writer is held at the point for this long (cut short if the
    /// transport is shut down), then carries on.
    Stall(Duration),
    /// The frame containing the point is sent twice, the copy (byte for
    /// byte the frame as written) right after the original.
    Duplicate,
    /// The link goes silent: the bytes from the point on are discarded while
    /// writes keep succeeding, so only timeouts can tell.
    Blackhole,
}

impl Fault {
    /// This fault at `at`.
    pub fn at(self, at: At) -> FaultSpec {
        FaultSpec { at, fault: self }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Drop => write!(f, "drop"),
            Fault::Flip(m) => write!(f, "flip 0x{m:02x}"),
            Fault::Truncate => write!(f, "truncate"),
            Fault::Stall(d) => write!(f, "stall {d:?}"),
            Fault::Duplicate => write!(f, "duplicate"),
            Fault::Blackhole => write!(f, "blackhole"),
        }
    }
}

/// A planned fault: what and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultSpec {
    /// Where.
    pub at: At,
    /// What.
    pub fault: Fault,
}

impl fmt::Display for FaultSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.fault, self.at)
    }
}

/// A fault that struck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fired {
    /// The plan.
    pub spec: FaultSpec,
    /// Offset of the outgoing stream where it struck.
    pub offset: u64,
    /// Index of the frame it struck in.
    pub frame: u32,
    /// That frame's kind, if the kind byte is a known one.
    pub kind: Option<MsgKind>,
    /// Byte offset into that frame.
    pub frame_offset: u64,
}

impl fmt::Display for Fired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind.map_or("unknown", MsgKind::name);
        write!(
            f,
            "{} struck at stream offset {} = frame #{} ({kind}) +{}",
            self.spec.fault, self.offset, self.frame, self.frame_offset
        )
    }
}

/// One frame that went (or was meant to go) out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    /// Index of the frame.
    pub index: u32,
    /// Its kind, if the kind byte is a known one.
    pub kind: Option<MsgKind>,
    /// Header plus payload, in bytes.
    pub len: u64,
    /// Stream offset of its first byte.
    pub start: u64,
}

struct Planned {
    spec: FaultSpec,
    /// Stream offset, once known.
    point: Option<u64>,
    fired: bool,
}

/// What the probe reads. Kept apart from [`State`] so that the probe can
/// look while a writer stalls (holding the state lock).
#[derive(Default)]
struct Records {
    /// Fired faults, by plan index.
    fired: Vec<(usize, Fired)>,
    frames: Vec<FrameInfo>,
    /// Bytes handed in by the writer.
    written: u64,
    /// Bytes actually passed to the wrapped transport.
    forwarded: u64,
}

struct State {
    plan: Vec<Planned>,
    /// Offset of the next byte the writer hands in.
    pos: u64,
    /// The current frame.
    frame_index: u32,
    frame_start: u64,
    hdr: [u8; HDR],
    hdr_have: usize,
    /// Header plus payload of the current frame, once its header is complete.
    frame_len: u64,
    frame_kind: Option<MsgKind>,
    /// Frames seen per kind byte.
    kind_counts: [u32; 256],
    /// Kind byte and per-kind number of the previous frame.
    prev: Option<(u8, u32)>,
    /// The rest of the current frame is discarded.
    truncating: bool,
    /// Everything from now on is discarded.
    silent: bool,
    /// The connection was dropped.
    dead: bool,
    /// A copy of the current frame, to send again when it is complete.
    dup: Option<Vec<u8>>,
    records: Arc<Mutex<Records>>,
}

struct Shared {
    state: Mutex<State>,
    records: Arc<Mutex<Records>>,
    /// The plan as given.
    plan: Vec<FaultSpec>,
    /// Set by [`Transport::shutdown`]; cuts stalls short.
    closed: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn injected_reset() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        "connection dropped by an injected fault",
    )
}

/// A [`Transport`] that injects the planned faults into the bytes written
/// through it. See the [module documentation](self).
pub struct FaultTransport {
    inner: Box<dyn Transport>,
    shared: Arc<Shared>,
}

impl fmt::Debug for FaultTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultTransport")
            .field("peer", &self.inner.peer())
            .finish()
    }
}

/// Tells what a [`FaultTransport`] did (shared with all its clones).
#[derive(Clone)]
pub struct FaultProbe {
    shared: Arc<Shared>,
}

impl fmt::Debug for FaultProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProbe")
            .field("fired", &self.fired())
            .finish()
    }
}

impl FaultProbe {
    /// The faults that struck so far, in plan order.
    ///
    /// Never blocks on a writer, not even one that is stalled.
    pub fn fired(&self) -> Vec<Fired> {
        let mut v = lock(&self.shared.records).fired.clone();
        v.sort_by_key(|(k, _)| *k);
        v.into_iter().map(|(_, f)| f).collect()
    }

    /// The planned faults that have not struck (yet).
    pub fn pending(&self) -> Vec<FaultSpec> {
        let r = lock(&self.shared.records);
        self.shared
            .plan
            .iter()
            .enumerate()
            .filter(|(k, _)| !r.fired.iter().any(|(j, _)| j == k))
            .map(|(_, s)| *s)
            .collect()
    }

    /// Every frame whose header was written so far.
    pub fn frames(&self) -> Vec<FrameInfo> {
        lock(&self.shared.records).frames.clone()
    }

    /// Bytes the writer handed in so far.
    pub fn bytes_written(&self) -> u64 {
        lock(&self.shared.records).written
    }

    /// Bytes actually passed to the wrapped transport (duplicates included,
    /// discarded bytes excluded).
    pub fn bytes_forwarded(&self) -> u64 {
        lock(&self.shared.records).forwarded
    }
}

impl FaultTransport {
    /// Wraps `inner` with one planned fault.
    pub fn new(inner: Box<dyn Transport>, spec: FaultSpec) -> (Self, FaultProbe) {
        Self::with_plan(inner, vec![spec])
    }

    /// Wraps `inner` with any number of planned faults (none: the wrapper
    /// only records frames).
    pub fn with_plan(inner: Box<dyn Transport>, plan: Vec<FaultSpec>) -> (Self, FaultProbe) {
        let records = Arc::new(Mutex::new(Records::default()));
        let specs = plan.clone();
        let plan = plan
            .into_iter()
            .map(|spec| Planned {
                spec,
                point: match spec.at {
                    At::Byte(b) => Some(b),
                    _ => None,
                },
                fired: false,
            })
            .collect();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                plan,
                pos: 0,
                frame_index: 0,
                frame_start: 0,
                hdr: [0; HDR],
                hdr_have: 0,
                frame_len: 0,
                frame_kind: None,
                kind_counts: [0; 256],
                prev: None,
                truncating: false,
                silent: false,
                dead: false,
                dup: None,
                records: records.clone(),
            }),
            records,
            plan: specs,
            closed: AtomicBool::new(false),
        });
        let probe = FaultProbe {
            shared: shared.clone(),
        };
        (FaultTransport { inner, shared }, probe)
    }
}

impl State {
    /// The current frame's header is complete: learn its length and kind,
    /// resolve the frame-relative points that refer to it, and start a copy
    /// if it is to be duplicated.
    fn header_complete(&mut self) {
        let header = FrameHeader::decode(&self.hdr);
        let kind_byte = header.kind;
        self.frame_len = HDR as u64 + u64::from(header.len);
        self.frame_kind = MsgKind::from_u8(kind_byte);
        let nth = self.kind_counts[usize::from(kind_byte)];
        self.kind_counts[usize::from(kind_byte)] = nth.saturating_add(1);
        let start = self.frame_start;
        let index = self.frame_index;
        let prev = self.prev;
        for p in self.plan.iter_mut().filter(|p| p.point.is_none()) {
            let hit = match p.spec.at {
                At::Byte(_) => None,
                At::Frame { index: i, offset } => (i == index).then_some(offset),
                At::Kind {
                    kind,
                    nth: n,
                    offset,
                } => (kind as u8 == kind_byte && n == nth).then_some(offset),
                At::After {
                    kind,
                    nth: n,
                    offset,
                } => (prev == Some((kind as u8, n))).then_some(offset),
            };
            if let Some(offset) = hit {
                p.point = Some(start.saturating_add(offset));
            }
        }
        self.prev = Some((kind_byte, nth));
        lock(&self.records).frames.push(FrameInfo {
            index,
            kind: self.frame_kind,
            len: self.frame_len,
            start,
        });
        let end = start.saturating_add(self.frame_len);
        let duplicate = self.plan.iter().any(|p| {
            !p.fired
                && p.spec.fault == Fault::Duplicate
                && p.point.is_some_and(|x| x >= start && x < end)
        });
        self.dup = duplicate.then(|| {
            let mut v = Vec::with_capacity(usize::try_from(self.frame_len).unwrap_or(0));
            v.extend_from_slice(&self.hdr);
            v
        });
    }

    fn fire(&mut self, k: usize, offset: u64) -> Fault {
        let fired = Fired {
            spec: self.plan[k].spec,
            offset,
            frame: self.frame_index,
            kind: self.frame_kind,
            frame_offset: offset - self.frame_start,
        };
        log::info!("fault injection: {fired}");
        self.plan[k].fired = true;
        lock(&self.records).fired.push((k, fired));
        self.plan[k].spec.fault
    }

    /// Passes `data`, the bytes at stream offsets `start..`, all inside the
    /// current frame, to `inner`, applying the faults due in that range.
    fn forward(
        &mut self,
        inner: &mut dyn Transport,
        closed: &AtomicBool,
        data: &[u8],
        start: u64,
    ) -> io::Result<()> {
        if let Some(d) = self.dup.as_mut() {
            // The header is already in the copy.
            if start >= self.frame_start + HDR as u64 {
                d.extend_from_slice(data);
            }
        }
        let mut i = 0usize;
        while i < data.len() {
            let off = start + i as u64;
            let mut mask = 0u8;
            for k in 0..self.plan.len() {
                if self.plan[k].fired || self.plan[k].point != Some(off) {
                    continue;
                }
                match self.fire(k, off) {
                    Fault::Drop => {
                        self.dead = true;
                        let _ = inner.shutdown();
                        return Err(injected_reset());
                    }
                    Fault::Flip(m) => mask ^= m,
                    Fault::Truncate => self.truncating = true,
                    Fault::Stall(d) => stall(d, closed),
                    // Sent again when the frame is complete.
                    Fault::Duplicate => {}
                    Fault::Blackhole => self.silent = true,
                }
            }
            // Up to the next planned point, or one byte if it is flipped.
            let end = if mask != 0 {
                i + 1
            } else {
                let next = self
                    .plan
                    .iter()
                    .filter(|p| !p.fired)
                    .filter_map(|p| p.point)
                    .filter(|&x| x > off)
                    .min()
                    .map_or(data.len() as u64, |x| x - start);
                usize::try_from(next).map_or(data.len(), |n| n.min(data.len()))
            };
            let chunk = &data[i..end];
            if !(self.silent || self.truncating) {
                if mask != 0 {
                    inner.write_all(&[chunk[0] ^ mask])?;
                } else {
                    inner.write_all(chunk)?;
                }
                lock(&self.records).forwarded += chunk.len() as u64;
            }
            i = end;
        }
        Ok(())
    }

    /// Ends the current frame if all its bytes went through.
    fn maybe_end_frame(&mut self, inner: &mut dyn Transport) -> io::Result<()> {
        if self.hdr_have < HDR || self.pos < self.frame_start.saturating_add(self.frame_len) {
            return Ok(());
        }
        if let Some(copy) = self.dup.take() {
            if !self.silent {
                inner.write_all(&copy)?;
                lock(&self.records).forwarded += copy.len() as u64;
            }
        }
        self.frame_index = self.frame_index.wrapping_add(1);
        self.frame_start = self.pos;
        self.hdr_have = 0;
        self.frame_len = 0;
        self.frame_kind = None;
        self.truncating = false;
        Ok(())
    }
}

/// Sleeps for `d`, or until `closed` is set.
fn stall(d: Duration, closed: &AtomicBool) {
    let deadline = Instant::now() + d;
    loop {
        if closed.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        std::thread::sleep(STALL_POLL.min(deadline - now));
    }
}

impl Read for FaultTransport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for FaultTransport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let shared = self.shared.clone();
        let mut st = lock(&shared.state);
        if st.dead {
            return Err(injected_reset());
        }
        let inner = &mut *self.inner;
        if st.hdr_have < HDR {
            // Hold the header back until it is complete.
            let have = st.hdr_have;
            let k = (HDR - have).min(buf.len());
            st.hdr[have..have + k].copy_from_slice(&buf[..k]);
            st.hdr_have += k;
            st.pos += k as u64;
            lock(&shared.records).written = st.pos;
            if st.hdr_have == HDR {
                st.header_complete();
                let hdr = st.hdr;
                let start = st.frame_start;
                st.forward(inner, &shared.closed, &hdr, start)?;
                st.maybe_end_frame(inner)?;
            }
            return Ok(k);
        }
        let left = st
            .frame_start
            .saturating_add(st.frame_len)
            .saturating_sub(st.pos);
        let k = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        let start = st.pos;
        st.forward(inner, &shared.closed, &buf[..k], start)?;
        st.pos += k as u64;
        lock(&shared.records).written = st.pos;
        st.maybe_end_frame(inner)?;
        Ok(k)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match bufs.iter().find(|b| !b.is_empty()) {
            Some(b) => self.write(b),
            None => Ok(0),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if lock(&self.shared.state).dead {
            return Err(injected_reset());
        }
        self.inner.flush()
    }
}

impl Transport for FaultTransport {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.inner.set_read_timeout(timeout)
    }

    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.inner.set_write_timeout(timeout)
    }

    fn shutdown(&self) -> io::Result<()> {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.inner.shutdown()
    }

    fn peer(&self) -> String {
        format!("fault:{}", self.inner.peer())
    }

    fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(FaultTransport {
            inner: self.inner.try_clone()?,
            shared: self.shared.clone(),
        }))
    }

    fn unacked_bytes(&self) -> Option<u64> {
        self.inner.unacked_bytes()
    }

    fn round_trip(&self) -> Option<Duration> {
        self.inner.round_trip()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FrameReader, FrameWriter, ProtocolError};
    use crate::transport::mem;

    /// Writes `n` frames (kinds cycling Pages, RoundEnd) of `len` payload
    /// bytes through a wrapper with `plan`; returns what the peer read and
    /// the probe.
    fn run(plan: Vec<FaultSpec>, n: u32, len: usize) -> (Vec<u8>, FaultProbe) {
        let (a, mut b) = mem::pair();
        let (t, probe) = FaultTransport::with_plan(Box::new(a), plan);
        let mut fw = FrameWriter::new(Box::new(t) as Box<dyn Transport>);
        for i in 0..n {
            let kind = if i % 2 == 0 {
                MsgKind::Pages
            } else {
                MsgKind::RoundEnd
            };
            let payload = vec![i as u8; len];
            if fw.write_frame(kind, &[&payload]).is_err() {
                break;
            }
        }
        drop(fw);
        let mut got = Vec::new();
        let _ = b.read_to_end(&mut got);
        (got, probe)
    }

    fn clean(n: u32, len: usize) -> Vec<u8> {
        run(vec![], n, len).0
    }

    #[test]
    fn no_fault_passes_everything_and_logs_frames() {
        let (got, probe) = run(vec![], 5, 100);
        assert_eq!(got.len(), 5 * 116);
        let frames = probe.frames();
        assert_eq!(frames.len(), 5);
        assert_eq!(frames[3].kind, Some(MsgKind::RoundEnd));
        assert_eq!(frames[3].start, 3 * 116);
        assert_eq!(probe.bytes_forwarded(), 5 * 116);
        let mut fr = FrameReader::new(&got[..]);
        for _ in 0..5 {
            fr.read_frame().unwrap();
        }
    }

    #[test]
    fn flip_at_byte_and_in_frame() {
        let base = clean(4, 50);
        let (got, probe) = run(vec![Fault::Flip(0x01).at(At::Byte(70))], 4, 50);
        let mut want = base.clone();
        want[70] ^= 1;
        assert_eq!(got, want);
        let f = probe.fired()[0];
        assert_eq!((f.frame, f.frame_offset, f.offset), (1, 4, 70));
        let at = At::kind(MsgKind::Pages, 1).offset(20);
        let (got, _) = run(vec![Fault::Flip(0x80).at(at)], 4, 50);
        let mut want = base;
        want[2 * 66 + 20] ^= 0x80;
        assert_eq!(got, want);
    }

    #[test]
    fn drop_before_a_frame_passes_exactly_the_frames_before() {
        let (got, probe) = run(vec![Fault::Drop.at(At::frame(2))], 4, 10);
        // The peer may see less (a reset loses data in flight), never more.
        assert!(got.len() <= 2 * 26, "{}", got.len());
        assert_eq!(probe.fired()[0].frame, 2);
        assert_eq!(probe.bytes_forwarded(), 2 * 26);
    }

    #[test]
    fn truncate_cuts_one_frame_and_desyncs() {
        let base = clean(3, 40);
        let at = At::kind(MsgKind::RoundEnd, 0).offset(20);
        let (got, _) = run(vec![Fault::Truncate.at(at)], 3, 40);
        let mut want = base[..56 + 20].to_vec();
        want.extend_from_slice(&base[112..]);
        assert_eq!(got, want);
        let mut fr = FrameReader::new(&got[..]);
        fr.read_frame().unwrap();
        assert!(fr.read_frame().is_err());
    }

    #[test]
    fn duplicate_repeats_the_frame_and_reader_sees_bad_seq() {
        let base = clean(3, 30);
        let (got, probe) = run(vec![Fault::Duplicate.at(At::frame(1).offset(17))], 3, 30);
        let mut want = base[..92].to_vec();
        want.extend_from_slice(&base[46..92]);
        want.extend_from_slice(&base[92..]);
        assert_eq!(got, want);
        assert_eq!(probe.fired()[0].frame, 1);
        let mut fr = FrameReader::new(&got[..]);
        fr.read_frame().unwrap();
        fr.read_frame().unwrap();
        let e = fr.read_frame().unwrap_err();
        assert!(
            matches!(
                e,
                ProtocolError::BadSeq {
                    got: 1,
                    expected: 2
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn after_and_blackhole() {
        let base = clean(5, 8);
        // Silence from the frame after RoundEnd #0 (frame 2) on.
        let (got, probe) = run(
            vec![Fault::Blackhole.at(At::after(MsgKind::RoundEnd, 0))],
            5,
            8,
        );
        assert_eq!(got, base[..48]);
        assert_eq!(probe.fired()[0].kind, Some(MsgKind::Pages));
        assert_eq!(probe.fired()[0].frame, 2);
        assert_eq!(probe.bytes_written(), 5 * 24);
    }

    #[test]
    fn stall_delays_and_is_cut_short_by_shutdown() {
        let t0 = Instant::now();
        let (got, _) = run(
            vec![Fault::Stall(Duration::from_millis(100)).at(At::frame(1))],
            2,
            4,
        );
        assert!(t0.elapsed() >= Duration::from_millis(90));
        assert_eq!(got.len(), 40);

        let (a, _b) = mem::pair();
        let (t, probe) = FaultTransport::new(
            Box::new(a),
            Fault::Stall(Duration::from_secs(60)).at(At::Byte(0)),
        );
        let closer = t.try_clone().unwrap();
        let h = std::thread::spawn(move || {
            let mut t = t;
            let t0 = Instant::now();
            let _ = t.write_all(&[0u8; 16]);
            t0.elapsed()
        });
        while probe.fired().is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        closer.shutdown().unwrap();
        assert!(h.join().unwrap() < Duration::from_secs(10));
    }

    #[test]
    fn several_faults_and_pending() {
        let plan = vec![
            Fault::Flip(1).at(At::frame(0).offset(16)),
            Fault::Flip(2).at(At::frame(0).offset(16)),
            Fault::Drop.at(At::frame(9)),
        ];
        let base = clean(2, 4);
        let (got, probe) = run(plan, 2, 4);
        let mut want = base;
        want[16] ^= 3;
        assert_eq!(got, want);
        assert_eq!(probe.fired().len(), 2);
        assert_eq!(probe.pending(), vec![Fault::Drop.at(At::frame(9))]);
    }
}
