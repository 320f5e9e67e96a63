//! The migration wire protocol: framing, message kinds and payload encodings.
//!
//! # Frames
//!
//! Every message travels as one frame: a 16-byte header, all little-endian,
//! followed by `len` payload bytes.
//!
//! | offset | size | field                                               |
//! |-------:|-----:|-----------------------------------------------------|
//! | 0      | 2    | `magic` = [`FRAME_MAGIC`] (0x4C4D, bytes `4D 4C`)   |
//! | 2      | 1    | `kind` ([`MsgKind`])                                |
//! | 3      | 1    | `flags` (0)                                         |
//! | 4      | 4    | `seq`: frame counter per direction, starting at 0  |
//! | 8      | 4    | `len`: payload length                               |
//! | 12     | 4    | `crc`: CRC-32C over header bytes 0..12, then payload |
//!
//! [`FrameReader`] treats its input as hostile: it checks magic, flags, kind
//! and the length limit before it touches the payload (and never allocates
//! for a length over its limit), then the CRC, then the sequence number (so
//! a dropped or duplicated frame is reported as such, and corruption as
//! corruption).
//!
//! # Conversation
//!
//! ```text
//! source                                   destination
//! Hello                 ──────────────▶
//!                       ◀──────────────    HelloReply
//! (Pages* RoundEnd)*    ──────────────▶
//! Pages* RoundEnd State* Complete ─────▶
//!                       ◀──────────────    Ready
//! Go                    ──────────────▶
//!                       ◀──────────────    Resumed
//! ```
//!
//! Either side may send [`ErrorMsg`] (and the source [`Cancel`]) instead of
//! its next message.
//!
//! # Payloads
//!
//! Every message except `Pages` is a type implementing [`Message`]; their
//! decoders bounds-check everything, refuse trailing bytes, and allocate at
//! most in proportion to the payload. `Pages` is encoded with [`PageBatch`]
//! and decoded without copying by [`page_records`].

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::{self, IoSlice, Read, Write};

use crate::memory::{MemoryLayout, RegionDesc, MAX_REGIONS, PAGE_SIZE};
use crate::state::{Section, MAX_SECTION_LEN, MAX_SECTION_NAME};
use crate::vm::{NicInfo, VmDescription};

/// Frame magic, `"LM"` read as a little-endian `u16` (on the wire: `4D 4C`).
pub const FRAME_MAGIC: u16 = 0x4C4D;
/// Size of a frame header in bytes.
pub const FRAME_HEADER_LEN: usize = 16;
/// Default (and largest useful) payload size of one frame.
pub const MAX_FRAME_PAYLOAD: usize = 8 << 20;

/// Magic at the start of a [`Hello`].
pub const HELLO_MAGIC: [u8; 8] = *b"LIVEMIG\0";
/// The newest protocol version this side speaks.
///
/// Version 3 added [`HelloReply::version`] (the version the destination
/// chose; a version-2 reply has no such field), [`Hello::paused`] (the
/// source VM's run state, carried as the reserved property
/// [`PAUSED_PROPERTY`] so that the `Hello` layout is version 2's),
/// [`MsgKind::Abandoned`], several `State` frames, and the rule that a
/// `Hello` of a newer version only appends fields (a receiver ignores what
/// follows the fields of its own newest version when the sender's version
/// is newer).
/// Version 2 added multiple page streams ([`Hello::streams`],
/// [`HelloReply::streams`], [`StreamHello`]) and [`MsgKind::Keepalive`].
///
/// This side still speaks version 2 with a peer that speaks no newer one
/// (release 0.1.0): as a destination it leaves out the reply's version and
/// answers a failure after `Ready` with `Error` instead of `Abandoned`; as
/// a source it refuses, before any page, to migrate a paused VM or a state
/// that needs more than one `State` frame to such a destination.
pub const PROTOCOL_VERSION: u32 = 3;
/// The oldest protocol version this side speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 2;
/// The property key by which a version-3 [`Hello`] says the source VM is
/// paused (value `"1"`). Keys starting with `livemig.` are the engine's: a
/// VM description may not use them.
pub const PAUSED_PROPERTY: &str = "livemig.paused";
/// Most page streams one migration may use.
pub const MAX_STREAMS: u32 = 16;

/// Most vCPUs a [`Hello`] may describe.
pub const MAX_VCPUS: u32 = 256;
/// Most NICs a [`Hello`] may describe.
pub const MAX_NICS: usize = 16;
/// Most properties a [`Hello`] may carry.
pub const MAX_PROPERTIES: usize = 64;
/// Longest property key or value, in bytes.
pub const MAX_PROPERTY_LEN: usize = 256;
/// Longest human-readable text (reasons, error messages), in bytes.
pub const MAX_TEXT_LEN: usize = 4096;
/// Most sections one [`State`] message may carry.
pub const MAX_SECTIONS: usize = 4096;
/// Size of a page record header in a `Pages` payload.
pub const PAGE_RECORD_HEADER_LEN: usize = 16;

const PAGE_BYTES: usize = PAGE_SIZE as usize;

/// Whether `addr` is a multiple of [`PAGE_SIZE`] (a power of two).
fn page_aligned(addr: u64) -> bool {
    addr & (PAGE_SIZE - 1) == 0
}

/// Errors of the wire protocol: I/O, framing, and malformed payloads.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// An I/O error without frame context (for example on flush).
    #[error("I/O error: {0}")]
    Io(#[source] io::Error),
    /// Reading a frame failed.
    #[error("frame {frame}: reading the {part}: {source}")]
    Read {
        /// Sequence number of the frame being read.
        frame: u32,
        /// `"header"` or `"payload"`.
        part: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Writing a frame failed.
    #[error("frame {frame}: writing: {source}")]
    Write {
        /// Sequence number of the frame being written.
        frame: u32,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The peer closed the connection.
    #[error("frame {frame}: connection closed by the peer after {got} of {wanted} {part} bytes")]
    Eof {
        /// Sequence number of the frame being read.
        frame: u32,
        /// `"header"` or `"payload"`.
        part: &'static str,
        /// Bytes of `part` received.
        got: usize,
        /// Bytes of `part` expected.
        wanted: usize,
    },
    /// A previous error left the frame stream in an unknown position.
    #[error("frame stream unusable after an earlier error (at frame {frame})")]
    Broken {
        /// Sequence number of the frame where the stream broke.
        frame: u32,
    },
    /// The frame header does not start with [`FRAME_MAGIC`].
    #[error("frame {frame}: bad magic 0x{got:04x} (expected 0x{FRAME_MAGIC:04x}); not a livemig stream or out of sync")]
    BadFrameMagic {
        /// Sequence number the frame should have had.
        frame: u32,
        /// The magic found.
        got: u16,
    },
    /// Reserved flags are set.
    #[error("frame {frame}: unknown flags 0x{flags:02x}")]
    BadFlags {
        /// Sequence number the frame should have had.
        frame: u32,
        /// The flags found.
        flags: u8,
    },
    /// The message kind is unknown.
    #[error("frame {frame}: unknown message kind {kind}")]
    UnknownKind {
        /// Sequence number the frame should have had.
        frame: u32,
        /// The kind byte found.
        kind: u8,
    },
    /// The payload is longer than the configured limit.
    #[error("frame {frame}: payload length {len} exceeds limit {limit}")]
    PayloadTooLarge {
        /// Sequence number of the frame.
        frame: u32,
        /// The payload length.
        len: u64,
        /// The limit.
        limit: usize,
    },
    /// The CRC does not match.
    #[error("frame {frame}: crc mismatch (got 0x{got:08x}, computed 0x{computed:08x})")]
    CrcMismatch {
        /// Sequence number the frame should have had.
        frame: u32,
        /// CRC in the header.
        got: u32,
        /// CRC computed over the frame.
        computed: u32,
    },
    /// A frame was dropped, duplicated or reordered.
    #[error("unexpected frame seq {got}, expected {expected}")]
    BadSeq {
        /// Sequence number in the frame.
        got: u32,
        /// Sequence number expected.
        expected: u32,
    },
    /// A well-formed frame of a kind not valid at this point of the conversation.
    #[error("frame {frame}: unexpected {got} message while expecting {expected}")]
    Unexpected {
        /// Sequence number of the frame.
        frame: u32,
        /// Kind received.
        got: MsgKind,
        /// What was expected instead.
        expected: String,
    },
    /// A payload ends before a field.
    #[error("{msg}: truncated at offset {offset} (needs {wanted} more bytes, {left} left)")]
    Truncated {
        /// The message (or record) being decoded.
        msg: &'static str,
        /// Offset of the field in the payload.
        offset: usize,
        /// Bytes the field needs.
        wanted: usize,
        /// Bytes left in the payload.
        left: usize,
    },
    /// A payload has bytes after its last field.
    #[error("{msg}: {count} trailing bytes at offset {offset}")]
    TrailingBytes {
        /// The message being decoded.
        msg: &'static str,
        /// Offset of the first trailing byte.
        offset: usize,
        /// Number of trailing bytes.
        count: usize,
    },
    /// A payload field has an invalid value.
    #[error("{msg} at offset {offset}: {reason}")]
    Malformed {
        /// The message (or record) being decoded.
        msg: &'static str,
        /// Offset of the field in the payload.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
    /// A message cannot be encoded (a field exceeds a protocol limit).
    #[error("cannot encode {msg}: {reason}")]
    Unencodable {
        /// The message being encoded.
        msg: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The [`Hello`] does not start with [`HELLO_MAGIC`].
    #[error(
        "Hello: bad magic {got:02x?} (expected \"LIVEMIG\\0\"); the peer is not a livemig source"
    )]
    BadHelloMagic {
        /// The magic found.
        got: [u8; 8],
    },
    /// The peer's protocol versions do not overlap with ours.
    #[error("unsupported protocol version {peer_version} (peer speaks {peer_min}..={peer_version}, this side speaks {min}..={max})")]
    UnsupportedVersion {
        /// Newest version the peer speaks.
        peer_version: u32,
        /// Oldest version the peer speaks.
        peer_min: u32,
        /// Oldest version this side speaks.
        min: u32,
        /// Newest version this side speaks.
        max: u32,
    },
    /// The peer uses a different page size.
    #[error("peer page size {peer} differs from this side's {ours}")]
    PageSizeMismatch {
        /// The peer's page size.
        peer: u32,
        /// Ours ([`PAGE_SIZE`]).
        ours: u64,
    },
    /// A page record lies outside guest memory (or crosses a region end).
    #[error("pages 0x{gpa:x}+{npages} outside guest memory")]
    PagesOutsideMemory {
        /// First guest-physical address.
        gpa: u64,
        /// Number of pages.
        npages: u32,
    },
}

fn io_is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

fn io_is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof
    )
}

impl ProtocolError {
    /// Whether this is a read or write timeout. A [`FrameReader`] stays
    /// usable after a read timeout (the next call resumes the partial frame);
    /// a [`FrameWriter`] does not.
    pub fn is_timeout(&self) -> bool {
        match self {
            ProtocolError::Io(e)
            | ProtocolError::Read { source: e, .. }
            | ProtocolError::Write { source: e, .. } => io_is_timeout(e),
            _ => false,
        }
    }

    /// Whether the peer went away (EOF, reset, broken pipe).
    pub fn is_disconnect(&self) -> bool {
        match self {
            ProtocolError::Eof { .. } => true,
            ProtocolError::Io(e)
            | ProtocolError::Read { source: e, .. }
            | ProtocolError::Write { source: e, .. } => io_is_disconnect(e),
            _ => false,
        }
    }

    /// Whether the peer closed the connection cleanly between two frames.
    pub fn is_clean_eof(&self) -> bool {
        matches!(
            self,
            ProtocolError::Eof {
                part: "header",
                got: 0,
                ..
            }
        )
    }
}

/// The kind of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MsgKind {
    /// Source → destination: versions and the VM description ([`Hello`]).
    Hello = 1,
    /// Destination → source: accepted or refused ([`HelloReply`]).
    HelloReply = 2,
    /// Source → destination: guest pages ([`PageBatch`], [`page_records`]).
    Pages = 3,
    /// Source → destination: end of a copy round ([`RoundEnd`]).
    RoundEnd = 4,
    /// Source → destination: device state sections ([`State`]).
    State = 5,
    /// Source → destination: all memory and state sent ([`Complete`]).
    Complete = 6,
    /// Destination → source: state restored, VM not yet running ([`Ready`]).
    Ready = 7,
    /// Source → destination: switchover committed; the source will not
    /// resume the VM any more ([`Go`]).
    Go = 8,
    /// Destination → source: vCPUs running ([`Resumed`]).
    Resumed = 9,
    /// Either side: the migration failed ([`ErrorMsg`]).
    Error = 10,
    /// Source → destination: the migration is cancelled ([`Cancel`]).
    Cancel = 11,
    /// Either direction, any stream: nothing to say, still alive (empty
    /// payload). Sent on a stream that has been idle for a while so the
    /// peer's read timeout only fires on a dead peer.
    Keepalive = 12,
    /// Source → destination, first frame of an extra page stream
    /// ([`StreamHello`]).
    StreamHello = 13,
    /// Source → destination: a `Pages` payload compressed with LZ4 (block
    /// format): `u32` length of the uncompressed payload (at most
    /// [`MAX_FRAME_PAYLOAD`]), then the block ([`compress_pages`],
    /// [`decompress_pages`]).
    PagesLz4 = 14,
    /// Destination → source, only after `Ready`: the destination has
    /// dropped the VM and will never run it (it timed out waiting for `Go`,
    /// or its resume failed), so the source may safely resume
    /// ([`Abandoned`]). Any failure of the destination after `Ready` is
    /// reported with this kind instead of `Error`.
    Abandoned = 15,
}

impl MsgKind {
    /// Every kind, in wire order.
    pub const ALL: [MsgKind; 15] = [
        MsgKind::Hello,
        MsgKind::HelloReply,
        MsgKind::Pages,
        MsgKind::RoundEnd,
        MsgKind::State,
        MsgKind::Complete,
        MsgKind::Ready,
        MsgKind::Go,
        MsgKind::Resumed,
        MsgKind::Error,
        MsgKind::Cancel,
        MsgKind::Keepalive,
        MsgKind::StreamHello,
        MsgKind::PagesLz4,
        MsgKind::Abandoned,
    ];

    /// The kind for a wire byte, if known.
    pub fn from_u8(v: u8) -> Option<MsgKind> {
        let i = usize::from(v).checked_sub(1)?;
        MsgKind::ALL.get(i).copied()
    }

    /// The message name.
    pub fn name(self) -> &'static str {
        match self {
            MsgKind::Hello => "Hello",
            MsgKind::HelloReply => "HelloReply",
            MsgKind::Pages => "Pages",
            MsgKind::RoundEnd => "RoundEnd",
            MsgKind::State => "State",
            MsgKind::Complete => "Complete",
            MsgKind::Ready => "Ready",
            MsgKind::Go => "Go",
            MsgKind::Resumed => "Resumed",
            MsgKind::Error => "Error",
            MsgKind::Cancel => "Cancel",
            MsgKind::Keepalive => "Keepalive",
            MsgKind::StreamHello => "StreamHello",
            MsgKind::PagesLz4 => "PagesLz4",
            MsgKind::Abandoned => "Abandoned",
        }
    }
}

impl fmt::Display for MsgKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------

/// Most slices handed to one `write_vectored` call.
const MAX_IOV: usize = 8;

/// Writes frames to a byte stream.
///
/// Any error leaves the stream at an unknown position, so the writer refuses
/// further frames afterwards ([`ProtocolError::Broken`]).
pub struct FrameWriter<W: Write> {
    inner: W,
    seq: u32,
    bytes_written: u64,
    max_payload: usize,
    broken: bool,
    scratch: Vec<u8>,
}

impl<W: Write> fmt::Debug for FrameWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameWriter")
            .field("seq", &self.seq)
            .field("bytes_written", &self.bytes_written)
            .field("max_payload", &self.max_payload)
            .field("broken", &self.broken)
            .finish()
    }
}

impl<W: Write> FrameWriter<W> {
    /// A writer whose first frame has sequence number 0.
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            seq: 0,
            bytes_written: 0,
            max_payload: MAX_FRAME_PAYLOAD,
            broken: false,
            scratch: Vec::new(),
        }
    }

    /// Sets the largest payload this writer sends (default
    /// [`MAX_FRAME_PAYLOAD`]; capped at `u32::MAX`). Should match the peer's
    /// reader limit.
    pub fn with_max_payload(mut self, max: usize) -> Self {
        self.max_payload = max.min(u32::MAX as usize);
        self
    }

    /// The largest payload this writer sends.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Writes one frame whose payload is the concatenation of `parts`.
    ///
    /// The parts are written as they are (gathered with `write_vectored`),
    /// never copied into a frame buffer.
    pub fn write_frame(&mut self, kind: MsgKind, parts: &[&[u8]]) -> Result<(), ProtocolError> {
        if self.broken {
            return Err(ProtocolError::Broken { frame: self.seq });
        }
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > self.max_payload {
            return Err(ProtocolError::PayloadTooLarge {
                frame: self.seq,
                len: len as u64,
                limit: self.max_payload,
            });
        }
        let mut header = [0u8; FRAME_HEADER_LEN];
        header[0..2].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        header[2] = kind as u8;
        header[3] = 0;
        header[4..8].copy_from_slice(&self.seq.to_le_bytes());
        // `len <= max_payload <= u32::MAX` was checked above.
        header[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        let mut crc = crc32c::crc32c(&header[..12]);
        for p in parts {
            crc = crc32c::crc32c_append(crc, p);
        }
        header[12..16].copy_from_slice(&crc.to_le_bytes());

        if let Err(source) = write_all_gather(&mut self.inner, &header, parts) {
            self.broken = true;
            return Err(ProtocolError::Write {
                frame: self.seq,
                source,
            });
        }
        self.bytes_written += (FRAME_HEADER_LEN + len) as u64;
        self.seq = self.seq.wrapping_add(1);
        Ok(())
    }

    /// Encodes `msg` (into a reused buffer) and writes it as one frame.
    pub fn send<M: Message>(&mut self, msg: &M) -> Result<(), ProtocolError> {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let r = msg
            .encode_into(&mut scratch)
            .and_then(|()| self.write_frame(M::KIND, &[&scratch]));
        // Keep small buffers for reuse; give back big ones.
        if scratch.capacity() <= 64 << 10 {
            self.scratch = scratch;
        }
        r
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> Result<(), ProtocolError> {
        self.inner.flush().map_err(|source| {
            self.broken = true;
            ProtocolError::Write {
                frame: self.seq,
                source,
            }
        })
    }

    /// Sequence number of the next frame (= frames written so far, modulo 2³²).
    pub fn seq(&self) -> u32 {
        self.seq
    }

    /// Bytes written so far, headers included.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The underlying writer (writing to it directly corrupts the stream).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Returns the underlying writer.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// Writes `header` followed by every part, gathering up to [`MAX_IOV`]
/// slices per `write_vectored` call and handling short writes.
fn write_all_gather<W: Write>(w: &mut W, header: &[u8], parts: &[&[u8]]) -> io::Result<()> {
    // The remaining pieces: the current one (possibly partly written) and the
    // index of the next one.
    let piece = |i: usize| -> &[u8] {
        if i == 0 {
            header
        } else {
            parts[i - 1]
        }
    };
    let count = parts.len() + 1;
    let mut idx = 0usize;
    let mut off = 0usize;
    while idx < count {
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        let mut n_iov = 0;
        let mut j = idx;
        while j < count && n_iov < MAX_IOV {
            let p = piece(j);
            let p = if j == idx { &p[off..] } else { p };
            if !p.is_empty() {
                iov[n_iov] = IoSlice::new(p);
                n_iov += 1;
            }
            j += 1;
        }
        if n_iov == 0 {
            break;
        }
        let mut n = match w.write_vectored(&iov[..n_iov]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "failed to write the whole frame",
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // Advance past `n` bytes.
        while n > 0 && idx < count {
            let left = piece(idx).len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
        // Skip empty pieces.
        while idx < count && piece(idx).len() == off {
            idx += 1;
            off = 0;
        }
    }
    Ok(())
}

/// A frame read by [`FrameReader::read_frame`], borrowing the reader's buffer.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// The message kind.
    pub kind: MsgKind,
    /// The frame's sequence number.
    pub seq: u32,
    /// The payload (CRC already checked).
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// Decodes the payload as `M`, failing with
    /// [`ProtocolError::Unexpected`] if the frame is of another kind.
    pub fn decode<M: Message>(&self) -> Result<M, ProtocolError> {
        self.expect(M::KIND)?;
        M::decode(self.payload)
    }

    /// Fails with [`ProtocolError::Unexpected`] unless the frame is `kind`.
    pub fn expect(&self, kind: MsgKind) -> Result<(), ProtocolError> {
        if self.kind != kind {
            return Err(self.unexpected(kind.name()));
        }
        Ok(())
    }

    /// A [`ProtocolError::Unexpected`] for this frame.
    pub fn unexpected(&self, expected: impl Into<String>) -> ProtocolError {
        ProtocolError::Unexpected {
            frame: self.seq,
            got: self.kind,
            expected: expected.into(),
        }
    }
}

#[derive(Clone, Copy)]
struct Header {
    kind: MsgKind,
    seq: u32,
    len: usize,
    crc: u32,
}

/// Reads and checks frames from a byte stream.
///
/// One payload buffer is reused for every frame; it grows to the largest
/// payload seen and never beyond the configured limit.
///
/// A read timeout ([`ProtocolError::is_timeout`]) leaves the reader usable:
/// the next call continues the partly read frame. Any other error makes the
/// reader refuse further reads ([`ProtocolError::Broken`]).
pub struct FrameReader<R: Read> {
    inner: R,
    max_payload: usize,
    next_seq: u32,
    bytes_read: u64,
    buf: Vec<u8>,
    hdr: [u8; FRAME_HEADER_LEN],
    hdr_have: usize,
    header: Option<Header>,
    payload_have: usize,
    broken: bool,
}

impl<R: Read> fmt::Debug for FrameReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameReader")
            .field("next_seq", &self.next_seq)
            .field("bytes_read", &self.bytes_read)
            .field("max_payload", &self.max_payload)
            .field("broken", &self.broken)
            .finish()
    }
}

/// Outcome of filling a buffer.
enum Fill {
    Done,
    Eof(usize),
}

/// Reads into `buf[*have..]` until full; `*have` tracks progress across
/// timeouts.
fn fill<R: Read>(r: &mut R, buf: &mut [u8], have: &mut usize, total: &mut u64) -> io::Result<Fill> {
    while *have < buf.len() {
        match r.read(&mut buf[*have..]) {
            Ok(0) => return Ok(Fill::Eof(*have)),
            Ok(n) => {
                *have += n;
                *total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Fill::Done)
}

impl<R: Read> FrameReader<R> {
    /// A reader expecting sequence number 0 first, with payload limit
    /// [`MAX_FRAME_PAYLOAD`].
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            max_payload: MAX_FRAME_PAYLOAD,
            next_seq: 0,
            bytes_read: 0,
            buf: Vec::new(),
            hdr: [0; FRAME_HEADER_LEN],
            hdr_have: 0,
            header: None,
            payload_have: 0,
            broken: false,
        }
    }

    /// Sets the largest payload accepted (capped at `u32::MAX`).
    pub fn with_max_payload(mut self, max: usize) -> Self {
        self.max_payload = max.min(u32::MAX as usize);
        self
    }

    /// The largest payload accepted.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Reads the next frame and checks it completely.
    pub fn read_frame(&mut self) -> Result<Frame<'_>, ProtocolError> {
        if self.broken {
            return Err(ProtocolError::Broken {
                frame: self.next_seq,
            });
        }
        match self.read_frame_inner() {
            Ok(h) => Ok(Frame {
                kind: h.kind,
                seq: h.seq,
                payload: self.buf.get(..h.len).unwrap_or_default(),
            }),
            Err(e) => {
                if !e.is_timeout() {
                    self.broken = true;
                }
                Err(e)
            }
        }
    }

    fn read_frame_inner(&mut self) -> Result<Header, ProtocolError> {
        let frame = self.next_seq;
        let read_err = |part, source| ProtocolError::Read {
            frame,
            part,
            source,
        };
        let header = match self.header {
            Some(h) => h,
            None => {
                let r = fill(
                    &mut self.inner,
                    &mut self.hdr,
                    &mut self.hdr_have,
                    &mut self.bytes_read,
                );
                match r.map_err(|e| read_err("header", e))? {
                    Fill::Done => {}
                    Fill::Eof(got) => {
                        return Err(ProtocolError::Eof {
                            frame,
                            part: "header",
                            got,
                            wanted: FRAME_HEADER_LEN,
                        })
                    }
                }
                let h = self.parse_header()?;
                if self.buf.len() < h.len {
                    self.buf.resize(h.len, 0);
                }
                self.header = Some(h);
                self.payload_have = 0;
                h
            }
        };
        let payload = self.buf.get_mut(..header.len).unwrap_or_default();
        let r = fill(
            &mut self.inner,
            payload,
            &mut self.payload_have,
            &mut self.bytes_read,
        );
        match r.map_err(|e| read_err("payload", e))? {
            Fill::Done => {}
            Fill::Eof(got) => {
                return Err(ProtocolError::Eof {
                    frame,
                    part: "payload",
                    got,
                    wanted: header.len,
                })
            }
        }
        // The frame is complete; whatever happens next, start afresh.
        self.header = None;
        self.hdr_have = 0;
        self.payload_have = 0;
        let payload = self.buf.get(..header.len).unwrap_or_default();
        let computed = crc32c::crc32c_append(crc32c::crc32c(&self.hdr[..12]), payload);
        if computed != header.crc {
            return Err(ProtocolError::CrcMismatch {
                frame,
                got: header.crc,
                computed,
            });
        }
        if header.seq != frame {
            return Err(ProtocolError::BadSeq {
                got: header.seq,
                expected: frame,
            });
        }
        self.next_seq = self.next_seq.wrapping_add(1);
        Ok(header)
    }

    /// Validates the header in `self.hdr` (everything but seq and crc).
    fn parse_header(&self) -> Result<Header, ProtocolError> {
        let frame = self.next_seq;
        let h = &self.hdr;
        let magic = u16::from_le_bytes([h[0], h[1]]);
        if magic != FRAME_MAGIC {
            return Err(ProtocolError::BadFrameMagic { frame, got: magic });
        }
        if h[3] != 0 {
            return Err(ProtocolError::BadFlags { frame, flags: h[3] });
        }
        let kind =
            MsgKind::from_u8(h[2]).ok_or(ProtocolError::UnknownKind { frame, kind: h[2] })?;
        let seq = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        let crc = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
        if len_usize > self.max_payload {
            return Err(ProtocolError::PayloadTooLarge {
                frame,
                len: u64::from(len),
                limit: self.max_payload,
            });
        }
        Ok(Header {
            kind,
            seq,
            len: len_usize,
            crc,
        })
    }

    /// Sequence number expected for the next frame (= frames read so far,
    /// modulo 2³²).
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    /// Bytes read so far, headers included.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The underlying reader (reading from it directly corrupts the stream).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Returns the underlying reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

// ---------------------------------------------------------------------------
// Payload helpers
// ---------------------------------------------------------------------------

/// A bounds-checked little-endian reader over a payload.
struct Cursor<'a> {
    msg: &'static str,
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(msg: &'static str, data: &'a [u8]) -> Self {
        Cursor { msg, data, pos: 0 }
    }

    fn left(&self) -> usize {
        self.data.len() - self.pos
    }

    /// A page-stream count, `1..=MAX_STREAMS`.
    fn streams(&mut self) -> Result<u32, ProtocolError> {
        let at = self.pos;
        let streams = self.u32()?;
        if streams == 0 || streams > MAX_STREAMS {
            return Err(self.malformed_at(
                at,
                format!("{streams} streams is outside 1..={MAX_STREAMS}"),
            ));
        }
        Ok(streams)
    }

    fn malformed_at(&self, offset: usize, reason: impl Into<String>) -> ProtocolError {
        ProtocolError::Malformed {
            msg: self.msg,
            offset,
            reason: reason.into(),
        }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if n > self.left() {
            return Err(ProtocolError::Truncated {
                msg: self.msg,
                offset: self.pos,
                wanted: n,
                left: self.left(),
            });
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn bool(&mut self, what: &str) -> Result<bool, ProtocolError> {
        let at = self.pos;
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.malformed_at(at, format!("{what}: {v} is not a boolean (0 or 1)"))),
        }
    }

    /// Reads a count and checks it against `max` and against the bytes left
    /// (each element needs at least `min_elem` bytes), so that a bogus count
    /// fails before anything is allocated for it.
    fn count(&mut self, what: &str, max: usize, min_elem: usize) -> Result<usize, ProtocolError> {
        let at = self.pos;
        let n = self.u32()?;
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n > max {
            return Err(self.malformed_at(at, format!("{n} {what} exceeds the limit of {max}")));
        }
        if n.saturating_mul(min_elem) > self.left() {
            return Err(self.malformed_at(
                at,
                format!(
                    "{n} {what} need at least {} bytes but only {} are left",
                    n.saturating_mul(min_elem),
                    self.left()
                ),
            ));
        }
        Ok(n)
    }

    /// Reads a `u16`-length-prefixed UTF-8 string of at most `max` bytes.
    fn string(&mut self, what: &str, max: usize) -> Result<String, ProtocolError> {
        let at = self.pos;
        let len = usize::from(self.u16()?);
        if len > max {
            return Err(self.malformed_at(at, format!("{what} is {len} bytes, limit {max}")));
        }
        let bytes = self.bytes(len)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => Err(self.malformed_at(at + 2, format!("{what} is not valid UTF-8: {e}"))),
        }
    }

    fn finish(self) -> Result<(), ProtocolError> {
        if self.pos != self.data.len() {
            return Err(ProtocolError::TrailingBytes {
                msg: self.msg,
                offset: self.pos,
                count: self.left(),
            });
        }
        Ok(())
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Writes a page-stream count (`Hello::streams`, `HelloReply::streams`),
/// refusing one outside `1..=MAX_STREAMS`.
fn put_streams(out: &mut Vec<u8>, msg: &'static str, streams: u32) -> Result<(), ProtocolError> {
    if streams == 0 || streams > MAX_STREAMS {
        return Err(ProtocolError::Unencodable {
            msg,
            reason: format!("{streams} streams is outside 1..={MAX_STREAMS}"),
        });
    }
    put_u32(out, streams);
    Ok(())
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Writes a `u16`-length-prefixed string, refusing more than `max` bytes.
fn put_string(
    out: &mut Vec<u8>,
    msg: &'static str,
    what: &str,
    s: &str,
    max: usize,
) -> Result<(), ProtocolError> {
    let len = u16::try_from(s.len())
        .ok()
        .filter(|&l| usize::from(l) <= max)
        .ok_or_else(|| ProtocolError::Unencodable {
            msg,
            reason: format!("{what} is {} bytes, limit {max}", s.len()),
        })?;
    put_u16(out, len);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Writes a `u32` count, refusing more than `max` elements.
fn put_count(
    out: &mut Vec<u8>,
    msg: &'static str,
    what: &str,
    n: usize,
    max: usize,
) -> Result<(), ProtocolError> {
    let v =
        u32::try_from(n)
            .ok()
            .filter(|_| n <= max)
            .ok_or_else(|| ProtocolError::Unencodable {
                msg,
                reason: format!("{n} {what} exceeds the limit of {max}"),
            })?;
    put_u32(out, v);
    Ok(())
}

/// `s` cut to at most `max` bytes at a character boundary.
fn truncate_text(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------

/// A message with a typed payload (every kind except `Pages`).
pub trait Message: Sized {
    /// The frame kind carrying this message.
    const KIND: MsgKind;

    /// Appends the encoded payload to `out`. Fails (without a partial frame
    /// ever being sent) if a field exceeds a protocol limit.
    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError>;

    /// Decodes a payload: every field is bounds-checked, trailing bytes are
    /// refused, and allocation is bounded by the payload length.
    fn decode(payload: &[u8]) -> Result<Self, ProtocolError>;

    /// The encoded payload.
    fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let mut v = Vec::new();
        self.encode_into(&mut v)?;
        Ok(v)
    }
}

/// First message (source → destination): protocol versions and the VM shape.
///
/// The prefix `magic, protocol_version, min_protocol_version` is frozen for
/// all versions, so that any two sides can at least negotiate; the rest of
/// the layout belongs to the protocol version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// [`HELLO_MAGIC`].
    pub magic: [u8; 8],
    /// Newest protocol version the sender speaks.
    pub protocol_version: u32,
    /// Oldest protocol version the sender speaks.
    pub min_protocol_version: u32,
    /// The sender's page size (must equal [`PAGE_SIZE`]).
    pub page_size: u32,
    /// The VM to migrate.
    pub desc: VmDescription,
    /// Page streams the source would like to use (1 ..= [`MAX_STREAMS`]);
    /// the destination grants at most this many in [`HelloReply::streams`].
    pub streams: u32,
    /// The source VM was paused (by its operator) when the migration
    /// started: the destination keeps it paused after `Go`.
    pub paused: bool,
}

impl Hello {
    /// A `Hello` for this side's versions and page size.
    pub fn new(desc: VmDescription) -> Self {
        Hello {
            magic: HELLO_MAGIC,
            protocol_version: PROTOCOL_VERSION,
            min_protocol_version: MIN_PROTOCOL_VERSION,
            page_size: PAGE_SIZE as u32,
            desc,
            streams: 1,
            paused: false,
        }
    }

    /// The protocol version both sides will speak: the newest one in both
    /// ranges.
    pub fn negotiated_version(&self) -> Result<u32, ProtocolError> {
        negotiate(self.min_protocol_version, self.protocol_version)
    }
}

/// The newest version in both `peer_min..=peer_max` and this side's range.
fn negotiate(peer_min: u32, peer_max: u32) -> Result<u32, ProtocolError> {
    let v = peer_max.min(PROTOCOL_VERSION);
    if peer_min > peer_max || v < peer_min || v < MIN_PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion {
            peer_version: peer_max,
            peer_min,
            min: MIN_PROTOCOL_VERSION,
            max: PROTOCOL_VERSION,
        });
    }
    Ok(v)
}

const NIC_LEN: usize = 6 + 1 + 4;

impl Message for Hello {
    const KIND: MsgKind = MsgKind::Hello;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        const M: &str = "Hello";
        let d = &self.desc;
        if d.vcpus == 0 || d.vcpus > MAX_VCPUS {
            return Err(ProtocolError::Unencodable {
                msg: M,
                reason: format!("{} vCPUs is outside 1..={MAX_VCPUS}", d.vcpus),
            });
        }
        out.extend_from_slice(&self.magic);
        put_u32(out, self.protocol_version);
        put_u32(out, self.min_protocol_version);
        put_u32(out, self.page_size);
        let regions = d.layout.regions();
        put_count(out, M, "regions", regions.len(), MAX_REGIONS)?;
        for r in regions {
            put_u64(out, r.guest_addr);
            put_u64(out, r.size);
        }
        put_u32(out, d.vcpus);
        put_count(out, M, "NICs", d.nics.len(), MAX_NICS)?;
        for nic in &d.nics {
            out.extend_from_slice(&nic.mac);
            match nic.ipv4 {
                Some(ip) => {
                    out.push(1);
                    out.extend_from_slice(&ip);
                }
                None => out.extend_from_slice(&[0; 5]),
            }
        }
        let mut props: Vec<(&str, &str)> = Vec::with_capacity(d.properties.len() + 1);
        for (k, v) in &d.properties {
            if k.starts_with("livemig.") {
                return Err(ProtocolError::Unencodable {
                    msg: M,
                    reason: format!("property key '{k}': the livemig. prefix is reserved"),
                });
            }
            props.push((k, v));
        }
        if self.paused {
            props.push((PAUSED_PROPERTY, "1"));
        }
        put_count(out, M, "properties", props.len(), MAX_PROPERTIES)?;
        for (k, v) in props {
            if k.is_empty() {
                return Err(ProtocolError::Unencodable {
                    msg: M,
                    reason: "empty property key".to_string(),
                });
            }
            put_string(out, M, &format!("property key '{k}'"), k, MAX_PROPERTY_LEN)?;
            put_string(
                out,
                M,
                &format!("property '{k}' value"),
                v,
                MAX_PROPERTY_LEN,
            )?;
        }
        put_streams(out, M, self.streams)
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("Hello", payload);
        let magic: [u8; 8] = c.array()?;
        if magic != HELLO_MAGIC {
            return Err(ProtocolError::BadHelloMagic { got: magic });
        }
        let protocol_version = c.u32()?;
        let min_protocol_version = c.u32()?;
        // Refuse before parsing a layout that may belong to another version.
        negotiate(min_protocol_version, protocol_version)?;
        let page_size = c.u32()?;
        if u64::from(page_size) != PAGE_SIZE {
            return Err(ProtocolError::PageSizeMismatch {
                peer: page_size,
                ours: PAGE_SIZE,
            });
        }

        let at = c.pos;
        let n = c.count("regions", MAX_REGIONS, 16)?;
        let mut regions = Vec::with_capacity(n);
        for _ in 0..n {
            regions.push(RegionDesc {
                guest_addr: c.u64()?,
                size: c.u64()?,
            });
        }
        let layout = MemoryLayout::new(regions)
            .map_err(|e| c.malformed_at(at, format!("invalid memory layout: {e}")))?;

        let at = c.pos;
        let vcpus = c.u32()?;
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(c.malformed_at(at, format!("{vcpus} vCPUs is outside 1..={MAX_VCPUS}")));
        }

        let n = c.count("NICs", MAX_NICS, NIC_LEN)?;
        let mut nics = Vec::with_capacity(n);
        for i in 0..n {
            let mac: [u8; 6] = c.array()?;
            let has_ip = c.bool(&format!("NIC {i} has_ip"))?;
            let at = c.pos;
            let ip: [u8; 4] = c.array()?;
            if !has_ip && ip != [0; 4] {
                return Err(
                    c.malformed_at(at, format!("NIC {i}: address bytes set without has_ip"))
                );
            }
            nics.push(NicInfo {
                mac,
                ipv4: has_ip.then_some(ip),
            });
        }

        let n = c.count("properties", MAX_PROPERTIES, 4)?;
        let mut properties = BTreeMap::new();
        let mut paused = false;
        for i in 0..n {
            let at = c.pos;
            let k = c.string(&format!("property {i} key"), MAX_PROPERTY_LEN)?;
            if k.is_empty() {
                return Err(c.malformed_at(at, format!("property {i} has an empty key")));
            }
            let v = c.string(&format!("property '{k}' value"), MAX_PROPERTY_LEN)?;
            if properties.contains_key(&k) || (k == PAUSED_PROPERTY && paused) {
                return Err(c.malformed_at(at, format!("property '{k}' appears twice")));
            }
            if k == PAUSED_PROPERTY {
                if v != "1" {
                    return Err(c.malformed_at(at, format!("property '{k}' is {v:?}, not \"1\"")));
                }
                paused = true;
                continue;
            }
            properties.insert(k, v);
        }
        let streams = c.streams()?;
        // A newer sender may append fields of its own version: they are not
        // ours to read. From our own version (or older), trailing bytes are
        // an error.
        if protocol_version <= PROTOCOL_VERSION {
            c.finish()?;
        }
        Ok(Hello {
            magic,
            protocol_version,
            min_protocol_version,
            page_size,
            desc: VmDescription {
                layout,
                vcpus,
                nics,
                properties,
            },
            streams,
            paused,
        })
    }
}

/// Reply to [`Hello`] (destination → source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    /// Whether the destination accepts the migration.
    pub accepted: bool,
    /// Why not (or empty). Cut to [`MAX_TEXT_LEN`] bytes when encoded.
    pub reason: String,
    /// Page streams granted (1 ..= the [`Hello::streams`] asked for). With
    /// 1, pages travel on the control connection; with N > 1 the source
    /// opens N more connections, each starting with a [`StreamHello`]
    /// carrying [`HelloReply::token`], and pages travel only on those.
    pub streams: u32,
    /// Random token the extra streams must present (all zero when
    /// `streams == 1`).
    pub token: [u8; 16],
    /// The protocol version the destination chose for the rest of the
    /// migration (the newest in both ranges); 0 in a refusal.
    pub version: u32,
}

impl HelloReply {
    /// A refusal with `reason`.
    pub fn refused(reason: String) -> Self {
        HelloReply {
            accepted: false,
            reason,
            streams: 1,
            token: [0; 16],
            version: 0,
        }
    }

    /// An acceptance of `streams` page streams with `token`, speaking this
    /// side's [`PROTOCOL_VERSION`].
    pub fn accepted(streams: u32, token: [u8; 16]) -> Self {
        HelloReply {
            accepted: true,
            reason: String::new(),
            streams,
            token,
            version: PROTOCOL_VERSION,
        }
    }
}

impl Message for HelloReply {
    const KIND: MsgKind = MsgKind::HelloReply;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        out.push(u8::from(self.accepted));
        put_string(
            out,
            "HelloReply",
            "reason",
            truncate_text(&self.reason, MAX_TEXT_LEN),
            MAX_TEXT_LEN,
        )?;
        put_streams(out, "HelloReply", self.streams)?;
        out.extend_from_slice(&self.token);
        // Version 2 (a source that speaks nothing newer) has no version
        // field; a refusal (version 0) has none either.
        if self.version >= 3 {
            put_u32(out, self.version);
        }
        Ok(())
    }

    /// `accepted` and `reason` are frozen for every version: a refusal is
    /// readable whatever follows them (it may come from a destination that
    /// speaks none of this side's versions).
    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("HelloReply", payload);
        let accepted = c.bool("accepted")?;
        let reason = c.string("reason", MAX_TEXT_LEN)?;
        if !accepted {
            return Ok(HelloReply::refused(reason));
        }
        let streams = c.streams()?;
        let token: [u8; 16] = c.array()?;
        // A version-2 destination's reply ends here.
        let at = c.pos;
        let version = if c.left() == 0 { 2 } else { c.u32()? };
        if version < 3 && c.pos != at {
            return Err(c.malformed_at(at, format!("version {version} in a version-3 field")));
        }
        c.finish()?;
        Ok(HelloReply {
            accepted,
            reason,
            streams,
            token,
            version,
        })
    }
}

/// First frame of an extra page stream (source → destination): which
/// migration it belongs to and which stream it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHello {
    /// [`HelloReply::token`] of the migration.
    pub token: [u8; 16],
    /// Stream index, `0 .. HelloReply::streams`.
    pub index: u32,
}

impl Message for StreamHello {
    const KIND: MsgKind = MsgKind::StreamHello;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        out.extend_from_slice(&self.token);
        put_u32(out, self.index);
        Ok(())
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("StreamHello", payload);
        let token: [u8; 16] = c.array()?;
        let at = c.pos;
        let index = c.u32()?;
        if index >= MAX_STREAMS {
            return Err(c.malformed_at(at, format!("stream index {index} >= {MAX_STREAMS}")));
        }
        c.finish()?;
        Ok(StreamHello { token, index })
    }
}

/// The page stream (`0 .. streams`) that carries page `page` of region
/// `region` when a migration uses `streams` page streams.
///
/// Memory is cut into chunks of [`STREAM_CHUNK_PAGES`] pages, numbered
/// across the regions in layout order; chunk `n` travels on stream
/// `n % streams`. A page therefore always travels on the same stream, so
/// its newer copies (later rounds) can never overtake older ones.
pub fn stream_of(layout: &MemoryLayout, region: usize, page: u64, streams: u32) -> u32 {
    if streams <= 1 {
        return 0;
    }
    let before: u64 = layout
        .regions()
        .iter()
        .take(region)
        .map(|r| r.pages().div_ceil(STREAM_CHUNK_PAGES))
        .sum();
    ((before + page / STREAM_CHUNK_PAGES) % u64::from(streams)) as u32
}

/// Compresses a `Pages` payload into `out` (cleared first) as a
/// [`MsgKind::PagesLz4`] payload.
pub fn compress_pages(pages: &[u8], out: &mut Vec<u8>) {
    out.clear();
    put_u32(out, pages.len() as u32);
    let start = out.len();
    out.resize(
        start + lz4_flex::block::get_maximum_output_size(pages.len()),
        0,
    );
    match lz4_flex::block::compress_into(pages, &mut out[start..]) {
        Ok(n) => out.truncate(start + n),
        // Cannot happen with a buffer of the maximum size; send it raw-sized
        // garbage-free anyway: an empty block decodes to a length mismatch.
        Err(_) => out.truncate(start),
    }
}

/// Decompresses a [`MsgKind::PagesLz4`] payload into `out` (cleared first);
/// the claimed size is checked against [`MAX_FRAME_PAYLOAD`] before anything
/// is allocated, and the block must decode to exactly that size.
pub fn decompress_pages(payload: &[u8], out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let mut c = Cursor::new("PagesLz4", payload);
    let at = c.pos;
    let len = c.u32()? as usize;
    if len > MAX_FRAME_PAYLOAD {
        return Err(c.malformed_at(
            at,
            format!("uncompressed size {len} exceeds {MAX_FRAME_PAYLOAD}"),
        ));
    }
    let block = &payload[4..];
    out.clear();
    out.resize(len, 0);
    match lz4_flex::block::decompress_into(block, out) {
        Ok(n) if n == len => Ok(()),
        Ok(n) => Err(c.malformed_at(4, format!("block decodes to {n} bytes, {len} claimed"))),
        Err(e) => Err(c.malformed_at(4, format!("bad LZ4 block: {e}"))),
    }
}

/// Pages per chunk for [`stream_of`].
pub const STREAM_CHUNK_PAGES: u64 = 1024;

/// End of a memory copy round (source → destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundEnd {
    /// Round number (0 = the full first pass).
    pub round: u32,
    /// Pages sent in this round (data and zero).
    pub pages: u64,
}

impl Message for RoundEnd {
    const KIND: MsgKind = MsgKind::RoundEnd;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        put_u32(out, self.round);
        put_u64(out, self.pages);
        Ok(())
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("RoundEnd", payload);
        let round = c.u32()?;
        let pages = c.u64()?;
        c.finish()?;
        Ok(RoundEnd { round, pages })
    }
}

/// Device state (source → destination).
///
/// One `State` frame holds at most [`MAX_FRAME_PAYLOAD`] bytes; a VM with more
/// state sends several `State` messages ([`state_frames`]; at most
/// [`MAX_STATE_FRAMES`]), and section names must be unique across all of
/// them (the destination checks).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    /// The sections, names unique.
    pub sections: Vec<Section>,
}

/// Most `State` frames in one migration (so at most 16 × 8 MiB of state).
pub const MAX_STATE_FRAMES: usize = 16;

/// Packs `sections` into as few `State` messages as fit in frames of
/// `max_payload` bytes (in order), checking everything the encoder and the
/// destination check: valid and unique names, sections of at most
/// [`MAX_SECTION_LEN`], at most [`MAX_SECTIONS`] per frame and
/// [`MAX_STATE_FRAMES`] frames. The source calls it at the handshake (on the
/// measured state: a state that cannot be sent is refused before any page)
/// and again at the switchover.
pub fn state_frames(
    sections: Vec<Section>,
    max_payload: usize,
) -> Result<Vec<State>, ProtocolError> {
    const M: &str = "State";
    let mut seen = HashSet::with_capacity(sections.len());
    for s in &sections {
        if !seen.insert(s.name.clone()) {
            return Err(ProtocolError::Unencodable {
                msg: M,
                reason: format!("section '{}' appears twice", s.name),
            });
        }
    }
    let mut frames: Vec<State> = Vec::new();
    let mut size = usize::MAX; // of the last frame
    for s in sections {
        let len = 2 + s.name.len() + 4 + 4 + s.data.len();
        let last_full = frames
            .last()
            .is_none_or(|f| size + len > max_payload || f.sections.len() >= MAX_SECTIONS);
        if last_full {
            frames.push(State::default());
            size = 4;
        }
        size += len;
        if let Some(f) = frames.last_mut() {
            f.sections.push(s);
        }
    }
    if frames.is_empty() {
        frames.push(State::default());
    }
    for f in &frames {
        let n = f.encode()?.len();
        if n > max_payload {
            return Err(ProtocolError::Unencodable {
                msg: M,
                reason: format!(
                    "section '{}' needs a frame of {n} bytes, more than the limit of {max_payload}",
                    f.sections[0].name
                ),
            });
        }
    }
    if frames.len() > MAX_STATE_FRAMES {
        return Err(ProtocolError::Unencodable {
            msg: M,
            reason: format!(
                "the state needs {} frames, more than the limit of {MAX_STATE_FRAMES}",
                frames.len()
            ),
        });
    }
    Ok(frames)
}

fn check_section_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty section name".to_string());
    }
    if name.len() > MAX_SECTION_NAME {
        return Err(format!(
            "section name of {} bytes exceeds the limit of {MAX_SECTION_NAME}",
            name.len()
        ));
    }
    if let Some(b) = name.bytes().find(|b| !(0x20..=0x7e).contains(b)) {
        return Err(format!(
            "section name {:?} contains byte 0x{b:02x} (only printable ASCII is allowed)",
            name.escape_default().to_string()
        ));
    }
    Ok(())
}

impl Message for State {
    const KIND: MsgKind = MsgKind::State;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        const M: &str = "State";
        put_count(out, M, "sections", self.sections.len(), MAX_SECTIONS)?;
        let mut seen = HashSet::with_capacity(self.sections.len());
        for s in &self.sections {
            check_section_name(&s.name)
                .map_err(|reason| ProtocolError::Unencodable { msg: M, reason })?;
            if !seen.insert(s.name.as_str()) {
                return Err(ProtocolError::Unencodable {
                    msg: M,
                    reason: format!("section '{}' appears twice", s.name),
                });
            }
            if s.data.len() > MAX_SECTION_LEN {
                return Err(ProtocolError::Unencodable {
                    msg: M,
                    reason: format!(
                        "section '{}' is {} bytes, limit {MAX_SECTION_LEN}",
                        s.name,
                        s.data.len()
                    ),
                });
            }
            // Both lengths were bounded above.
            put_u16(out, s.name.len() as u16);
            out.extend_from_slice(s.name.as_bytes());
            put_u32(out, s.version);
            put_u32(out, s.data.len() as u32);
            out.extend_from_slice(&s.data);
        }
        Ok(())
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("State", payload);
        // Smallest section: name length, 1-byte name, version, data length.
        let n = c.count("sections", MAX_SECTIONS, 2 + 1 + 4 + 4)?;
        let mut sections: Vec<Section> = Vec::with_capacity(n);
        let mut seen = HashSet::with_capacity(n);
        for i in 0..n {
            let at = c.pos;
            let name_len = usize::from(c.u16()?);
            if name_len > MAX_SECTION_NAME {
                return Err(c.malformed_at(
                    at,
                    format!(
                        "section {i}: name of {name_len} bytes exceeds the limit of {MAX_SECTION_NAME}"
                    ),
                ));
            }
            let name_bytes = c.bytes(name_len)?;
            // Printable ASCII is valid UTF-8, so one check covers both.
            let name = match std::str::from_utf8(name_bytes) {
                Ok(n) if check_section_name(n).is_ok() => n,
                _ => {
                    return Err(c.malformed_at(
                        at + 2,
                        format!(
                            "section {i}: name \"{}\" is not 1..={MAX_SECTION_NAME} printable ASCII bytes",
                            name_bytes.escape_ascii()
                        ),
                    ))
                }
            };
            if !seen.insert(name) {
                return Err(c.malformed_at(at, format!("section '{name}' appears twice")));
            }
            let version = c.u32()?;
            let len_at = c.pos;
            let len = usize::try_from(c.u32()?).unwrap_or(usize::MAX);
            if len > MAX_SECTION_LEN {
                return Err(c.malformed_at(
                    len_at,
                    format!(
                        "section '{name}' (version {version}): length {len} exceeds the limit of {MAX_SECTION_LEN}"
                    ),
                ));
            }
            if len > c.left() {
                return Err(c.malformed_at(
                    len_at,
                    format!(
                        "section '{name}' (version {version}): length {len} runs past the end of the frame ({} bytes left)",
                        c.left()
                    ),
                ));
            }
            let data = c.bytes(len)?.to_vec();
            sections.push(Section::new(name, version, data));
        }
        c.finish()?;
        Ok(State { sections })
    }
}

macro_rules! empty_message {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct $name;

        impl Message for $name {
            const KIND: MsgKind = MsgKind::$name;

            fn encode_into(&self, _out: &mut Vec<u8>) -> Result<(), ProtocolError> {
                Ok(())
            }

            fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
                Cursor::new(stringify!($name), payload).finish()?;
                Ok($name)
            }
        }
    };
}

empty_message!(
    /// All memory and state have been sent (source → destination). Empty payload.
    Complete
);
empty_message!(
    /// The source commits the switchover and will not resume the VM itself
    /// any more (source → destination). Empty payload.
    Go
);
empty_message!(
    /// The source cancels the migration (source → destination). Empty payload.
    Cancel
);
empty_message!(
    /// Still alive, nothing to say (any stream, either direction). Empty payload.
    Keepalive
);

/// State restored, VM not yet running (destination → source).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ready {
    /// Time the destination spent restoring state, in µs.
    pub restore_us: u64,
}

impl Message for Ready {
    const KIND: MsgKind = MsgKind::Ready;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        put_u64(out, self.restore_us);
        Ok(())
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("Ready", payload);
        let restore_us = c.u64()?;
        c.finish()?;
        Ok(Ready { restore_us })
    }
}

/// vCPUs running on the destination (destination → source).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resumed {
    /// Time from receiving `Go` to the vCPUs running, in µs.
    pub resume_us: u64,
}

impl Message for Resumed {
    const KIND: MsgKind = MsgKind::Resumed;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        put_u64(out, self.resume_us);
        Ok(())
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("Resumed", payload);
        let resume_us = c.u64()?;
        c.finish()?;
        Ok(Resumed { resume_us })
    }
}

/// The sender failed (either direction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMsg {
    /// The phase that failed (for example `"memory"`, `"restore"`).
    /// Cut to [`MAX_TEXT_LEN`] bytes when encoded.
    pub phase: String,
    /// What went wrong. Cut to [`MAX_TEXT_LEN`] bytes when encoded.
    pub message: String,
}

impl ErrorMsg {
    /// Builds an error message.
    pub fn new(phase: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorMsg {
            phase: phase.into(),
            message: message.into(),
        }
    }
}

impl Message for ErrorMsg {
    const KIND: MsgKind = MsgKind::Error;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        const M: &str = "Error";
        put_string(
            out,
            M,
            "phase",
            truncate_text(&self.phase, MAX_TEXT_LEN),
            MAX_TEXT_LEN,
        )?;
        put_string(
            out,
            M,
            "message",
            truncate_text(&self.message, MAX_TEXT_LEN),
            MAX_TEXT_LEN,
        )
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("Error", payload);
        let phase = c.string("phase", MAX_TEXT_LEN)?;
        let message = c.string("message", MAX_TEXT_LEN)?;
        c.finish()?;
        Ok(ErrorMsg { phase, message })
    }
}

/// The destination gave the migration up after `Ready` and will never run
/// the VM (destination → source). Same layout as [`ErrorMsg`].
///
/// Unlike an `Error` after `Go` (which leaves the outcome ambiguous), this
/// is the destination's promise that the guest runs nowhere but on the
/// source: the source resumes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abandoned(pub ErrorMsg);

impl Message for Abandoned {
    const KIND: MsgKind = MsgKind::Abandoned;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        self.0.encode_into(out)
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        ErrorMsg::decode(payload).map(Abandoned)
    }
}

// ---------------------------------------------------------------------------
// Pages
// ---------------------------------------------------------------------------

const PAGE_KIND_ZERO: u8 = 0;
const PAGE_KIND_DATA: u8 = 1;

/// One record of a `Pages` payload: `npages` pages at `gpa`, either all zero
/// (`data == None`) or with their contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRecord<'a> {
    /// Guest-physical address of the first page (page aligned).
    pub gpa: u64,
    /// Number of pages (at least 1).
    pub npages: u32,
    /// `npages * PAGE_SIZE` bytes of page data, or `None` for zero pages.
    pub data: Option<&'a [u8]>,
}

impl PageRecord<'_> {
    /// Length of the record's range in bytes.
    pub fn len_bytes(&self) -> u64 {
        u64::from(self.npages) * PAGE_SIZE
    }

    /// Checks that the record lies inside one region of `layout`; returns
    /// the region index and the first page's index within that region.
    pub fn check(&self, layout: &MemoryLayout) -> Result<(usize, u64), ProtocolError> {
        layout
            .locate(self.gpa, u64::from(self.npages))
            .ok_or(ProtocolError::PagesOutsideMemory {
                gpa: self.gpa,
                npages: self.npages,
            })
    }
}

/// Iterates over the records of a `Pages` payload without copying; see
/// [`page_records`]. Stops after the first error.
#[derive(Debug, Clone)]
pub struct PageRecords<'a> {
    payload: &'a [u8],
    pos: usize,
    failed: bool,
}

/// Decodes a `Pages` payload record by record, without copying page data.
///
/// Each record is checked for a page-aligned `gpa`, `npages >= 1`, a known
/// kind, zero reserved bytes, no address overflow, and data that fits in the
/// payload. Whether the pages lie in guest memory is checked by
/// [`PageRecord::check`].
pub fn page_records(payload: &[u8]) -> PageRecords<'_> {
    PageRecords {
        payload,
        pos: 0,
        failed: false,
    }
}

impl<'a> PageRecords<'a> {
    fn next_record(&mut self) -> Result<PageRecord<'a>, ProtocolError> {
        const M: &str = "Pages record";
        let at = self.pos;
        let mut c = Cursor {
            msg: M,
            data: self.payload,
            pos: at,
        };
        let gpa = c.u64()?;
        let npages = c.u32()?;
        let kind = c.u8()?;
        let reserved: [u8; 3] = c.array()?;
        if reserved != [0; 3] {
            return Err(c.malformed_at(at, format!("reserved bytes {reserved:02x?} are not zero")));
        }
        if !page_aligned(gpa) {
            return Err(c.malformed_at(at, format!("address 0x{gpa:x} is not page aligned")));
        }
        if npages == 0 {
            return Err(c.malformed_at(at, "zero pages"));
        }
        let len = u64::from(npages) * PAGE_SIZE;
        if gpa.checked_add(len).is_none() {
            return Err(c.malformed_at(
                at,
                format!("pages 0x{gpa:x}+{npages} wrap around the address space"),
            ));
        }
        let data = match kind {
            PAGE_KIND_ZERO => None,
            PAGE_KIND_DATA => {
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                if len > c.left() {
                    return Err(c.malformed_at(
                        at,
                        format!(
                            "data runs past end of frame ({npages} pages need {len} bytes, {} left)",
                            c.left()
                        ),
                    ));
                }
                Some(c.bytes(len)?)
            }
            k => return Err(c.malformed_at(at, format!("unknown record kind {k}"))),
        };
        self.pos = c.pos;
        Ok(PageRecord { gpa, npages, data })
    }
}

impl<'a> Iterator for PageRecords<'a> {
    type Item = Result<PageRecord<'a>, ProtocolError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.payload.len() {
            return None;
        }
        let r = self.next_record();
        if r.is_err() {
            self.failed = true;
        }
        Some(r)
    }
}

impl std::iter::FusedIterator for PageRecords<'_> {}

/// Builds a `Pages` payload. Adjacent pushes of the same kind with
/// contiguous addresses are merged into one record.
///
/// ```
/// use livemig::protocol::{page_records, PageBatch};
/// use livemig::memory::PAGE_SIZE;
///
/// let mut batch = PageBatch::with_capacity(1 << 20);
/// batch.push_zero(0, 4)?;
/// batch.push_data_with(0x10000, 1, |dst| {
///     dst.fill(0xaa); // copy the guest page here
///     Ok::<(), livemig::protocol::ProtocolError>(())
/// })?;
/// assert_eq!((batch.zero_pages(), batch.data_pages()), (4, 1));
/// let recs: Vec<_> = page_records(batch.as_bytes()).collect::<Result<_, _>>()?;
/// assert_eq!(recs.len(), 2);
/// # Ok::<(), livemig::protocol::ProtocolError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct PageBatch {
    buf: Vec<u8>,
    data_pages: u64,
    zero_pages: u64,
    /// Offset of the last record header, its kind, and the address just
    /// past its pages (for merging).
    last: Option<(usize, u8, u64)>,
}

impl PageBatch {
    /// An empty batch with room for `bytes` bytes of payload.
    pub fn with_capacity(bytes: usize) -> Self {
        PageBatch {
            buf: Vec::with_capacity(bytes),
            ..Default::default()
        }
    }

    /// Payload bytes a record of `npages` data pages adds at most.
    pub const fn data_record_len(npages: u32) -> usize {
        PAGE_RECORD_HEADER_LEN + npages as usize * PAGE_BYTES
    }

    fn check_range(gpa: u64, npages: u32) -> Result<(), ProtocolError> {
        let ok = npages > 0
            && page_aligned(gpa)
            && gpa.checked_add(u64::from(npages) * PAGE_SIZE).is_some();
        if !ok {
            return Err(ProtocolError::Unencodable {
                msg: "Pages",
                reason: format!("bad page range 0x{gpa:x}+{npages}"),
            });
        }
        Ok(())
    }

    /// Ends the current record: the next push starts a new one even if its
    /// pages follow on. A sender calls it where a memory region ends, since
    /// a record must lie inside one region (two regions may touch).
    pub fn end_record(&mut self) {
        self.last = None;
    }

    /// Appends a record (or extends the last one); returns the offset where
    /// page data for it must go.
    fn push_record(&mut self, gpa: u64, npages: u32, kind: u8) -> usize {
        let end = gpa + u64::from(npages) * PAGE_SIZE;
        if let Some((off, k, last_end)) = self.last {
            if k == kind && last_end == gpa {
                let mut n = [0u8; 4];
                n.copy_from_slice(&self.buf[off + 8..off + 12]);
                if let Some(total) = u32::from_le_bytes(n).checked_add(npages) {
                    self.buf[off + 8..off + 12].copy_from_slice(&total.to_le_bytes());
                    self.last = Some((off, k, end));
                    return self.buf.len();
                }
            }
        }
        let off = self.buf.len();
        put_u64(&mut self.buf, gpa);
        put_u32(&mut self.buf, npages);
        self.buf.extend_from_slice(&[kind, 0, 0, 0]);
        self.last = Some((off, kind, end));
        self.buf.len()
    }

    /// Adds `npages` zero pages at `gpa` (no page data is sent).
    pub fn push_zero(&mut self, gpa: u64, npages: u32) -> Result<(), ProtocolError> {
        Self::check_range(gpa, npages)?;
        self.push_record(gpa, npages, PAGE_KIND_ZERO);
        self.zero_pages += u64::from(npages);
        Ok(())
    }

    /// Adds `npages` pages at `gpa`: reserves `npages * PAGE_SIZE` bytes in
    /// the batch and lets `fill` copy the page contents into them directly.
    /// If `fill` fails the batch is left as it was before the call.
    pub fn push_data_with<E, F>(&mut self, gpa: u64, npages: u32, fill: F) -> Result<(), E>
    where
        E: From<ProtocolError>,
        F: FnOnce(&mut [u8]) -> Result<(), E>,
    {
        Self::check_range(gpa, npages)?;
        let saved_len = self.buf.len();
        let saved_last = self.last;
        let saved_npages = saved_last.and_then(|(off, _, _)| {
            let mut n = [0u8; 4];
            n.copy_from_slice(self.buf.get(off + 8..off + 12)?);
            Some(n)
        });
        let start = self.push_record(gpa, npages, PAGE_KIND_DATA);
        let len = npages as usize * PAGE_BYTES;
        self.buf.resize(start + len, 0);
        match fill(&mut self.buf[start..start + len]) {
            Ok(()) => {
                self.data_pages += u64::from(npages);
                Ok(())
            }
            Err(e) => {
                self.buf.truncate(saved_len);
                self.last = saved_last;
                if let (Some((off, _, _)), Some(n)) = (saved_last, saved_npages) {
                    self.buf[off + 8..off + 12].copy_from_slice(&n);
                }
                Err(e)
            }
        }
    }

    /// Adds `npages` pages at `gpa` copied from `data` (`npages * PAGE_SIZE`
    /// bytes).
    pub fn push_data(&mut self, gpa: u64, npages: u32, data: &[u8]) -> Result<(), ProtocolError> {
        if data.len() as u64 != u64::from(npages) * PAGE_SIZE {
            return Err(ProtocolError::Unencodable {
                msg: "Pages",
                reason: format!(
                    "{} bytes of data for {npages} pages at 0x{gpa:x}",
                    data.len()
                ),
            });
        }
        self.push_data_with(gpa, npages, |dst: &mut [u8]| {
            dst.copy_from_slice(data);
            Ok(())
        })
    }

    /// Payload length in bytes.
    pub fn len_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Whether no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Empties the batch, keeping its buffer.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.data_pages = 0;
        self.zero_pages = 0;
        self.last = None;
    }

    /// The encoded payload, to send with
    /// `writer.write_frame(MsgKind::Pages, &[batch.as_bytes()])`.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Pages with data in the batch.
    pub fn data_pages(&self) -> u64 {
        self.data_pages
    }

    /// Zero pages in the batch.
    pub fn zero_pages(&self) -> u64 {
        self.zero_pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{self, Transport};

    fn layout() -> MemoryLayout {
        MemoryLayout::new(vec![
            RegionDesc {
                guest_addr: 0,
                size: 0xa0000,
            },
            RegionDesc {
                guest_addr: 0x100000,
                size: 64 << 20,
            },
        ])
        .unwrap()
    }

    fn desc() -> VmDescription {
        let mut properties = BTreeMap::new();
        properties.insert("cpu.vendor".to_string(), "GenuineIntel".to_string());
        properties.insert("machine".to_string(), "refvmm-ü".to_string());
        VmDescription {
            layout: layout(),
            vcpus: 4,
            nics: vec![
                NicInfo {
                    mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                    ipv4: Some([10, 0, 0, 2]),
                },
                NicInfo {
                    mac: [0x52, 0x54, 0, 0x12, 0x34, 0x57],
                    ipv4: None,
                },
            ],
            properties,
        }
    }

    fn state() -> State {
        State {
            sections: vec![
                Section::new("vcpu.0.regs", 1, vec![1, 2, 3, 4]),
                Section::new("irqchip", 3, vec![]),
                Section::new("serial.com1", 2, (0..=255).collect()),
            ],
        }
    }

    fn round_trip<M: Message + PartialEq + fmt::Debug>(m: &M) -> Vec<u8> {
        let bytes = m.encode().unwrap();
        assert_eq!(&M::decode(&bytes).unwrap(), m);
        bytes
    }

    /// Every strict prefix fails, trailing garbage fails, the whole succeeds.
    fn check_hostile<M: Message + fmt::Debug>(bytes: &[u8]) {
        check_hostile_except::<M>(bytes, &[]);
    }

    /// [`check_hostile`], except that the prefixes of the lengths in
    /// `valid` are whole messages of an older version.
    fn check_hostile_except<M: Message + fmt::Debug>(bytes: &[u8], valid: &[usize]) {
        for cut in 0..bytes.len() {
            if valid.contains(&cut) {
                M::decode(&bytes[..cut]).unwrap();
                continue;
            }
            assert!(
                M::decode(&bytes[..cut]).is_err(),
                "{}: prefix of {cut}/{} bytes accepted",
                M::KIND,
                bytes.len()
            );
        }
        let mut long = bytes.to_vec();
        long.push(0);
        let e = M::decode(&long).unwrap_err();
        assert!(
            matches!(e, ProtocolError::TrailingBytes { count: 1, .. }),
            "{}: {e}",
            M::KIND
        );
        M::decode(bytes).unwrap();
    }

    fn all_messages() -> Vec<(MsgKind, Vec<u8>)> {
        vec![
            (MsgKind::Hello, round_trip(&Hello::new(desc()))),
            (
                MsgKind::HelloReply,
                round_trip(&HelloReply {
                    accepted: false,
                    reason: "no room für you".into(),
                    streams: 1,
                    token: [0; 16],
                    version: 0,
                }),
            ),
            (
                MsgKind::RoundEnd,
                round_trip(&RoundEnd {
                    round: 3,
                    pages: 123_456_789_012,
                }),
            ),
            (MsgKind::State, round_trip(&state())),
            (MsgKind::Complete, round_trip(&Complete)),
            (MsgKind::Ready, round_trip(&Ready { restore_us: 1234 })),
            (MsgKind::Go, round_trip(&Go)),
            (MsgKind::Resumed, round_trip(&Resumed { resume_us: 99 })),
            (
                MsgKind::Error,
                round_trip(&ErrorMsg::new("restore", "section 'x': version 9")),
            ),
            (MsgKind::Cancel, round_trip(&Cancel)),
            (MsgKind::Keepalive, round_trip(&Keepalive)),
            (
                MsgKind::Abandoned,
                round_trip(&Abandoned(ErrorMsg::new("completion", "no Go within 10s"))),
            ),
            (
                MsgKind::StreamHello,
                round_trip(&StreamHello {
                    token: [7; 16],
                    index: 3,
                }),
            ),
        ]
    }

    #[test]
    fn round_trip_every_message() {
        let msgs = all_messages();
        assert_eq!(msgs.len(), MsgKind::ALL.len() - 2); // all but Pages, PagesLz4
        round_trip(&HelloReply {
            accepted: true,
            reason: String::new(),
            streams: 1,
            token: [0; 16],
            version: PROTOCOL_VERSION,
        });
        round_trip(&State::default());
        let mut d = desc();
        d.nics.clear();
        d.properties.clear();
        round_trip(&Hello::new(d));
        for k in MsgKind::ALL {
            assert_eq!(MsgKind::from_u8(k as u8), Some(k));
        }
        assert_eq!(MsgKind::from_u8(0), None);
        assert_eq!(MsgKind::from_u8(16), None);
    }

    #[test]
    fn decoders_reject_truncation_and_trailing_bytes() {
        check_hostile::<Hello>(&Hello::new(desc()).encode().unwrap());
        let v3 = HelloReply {
            accepted: true,
            reason: "ok".into(),
            streams: 1,
            token: [0; 16],
            version: PROTOCOL_VERSION,
        }
        .encode()
        .unwrap();
        // Without its last field it is a version-2 (release 0.1.0) reply.
        check_hostile_except::<HelloReply>(&v3, &[v3.len() - 4]);
        let v2 = HelloReply::decode(&v3[..v3.len() - 4]).unwrap();
        assert_eq!(v2.version, 2);
        assert_eq!(v2.encode().unwrap(), &v3[..v3.len() - 4]);
        // A version field that says 2 (or less) is malformed.
        let mut low = v3[..v3.len() - 4].to_vec();
        low.extend_from_slice(&2u32.to_le_bytes());
        assert!(HelloReply::decode(&low).is_err());
        // A paused source is said with the reserved property, which never
        // reaches the description; a description may not use the prefix.
        let mut h = Hello::new(desc());
        h.paused = true;
        let got = Hello::decode(&h.encode().unwrap()).unwrap();
        assert!(got.paused);
        assert_eq!(got.desc, desc());
        check_hostile::<Hello>(&h.encode().unwrap());
        let mut d = desc();
        d.properties.insert(PAUSED_PROPERTY.into(), "1".into());
        assert!(Hello::new(d).encode().is_err());
        check_hostile::<RoundEnd>(&RoundEnd { round: 1, pages: 2 }.encode().unwrap());
        check_hostile::<State>(&state().encode().unwrap());
        check_hostile::<Complete>(&[]);
        check_hostile::<Go>(&[]);
        check_hostile::<Cancel>(&[]);
        check_hostile::<Keepalive>(&[]);
        check_hostile::<StreamHello>(
            &StreamHello {
                token: [1; 16],
                index: 2,
            }
            .encode()
            .unwrap(),
        );
        check_hostile::<Ready>(&Ready { restore_us: 5 }.encode().unwrap());
        check_hostile::<Resumed>(&Resumed { resume_us: 5 }.encode().unwrap());
        check_hostile::<ErrorMsg>(&ErrorMsg::new("memory", "boom").encode().unwrap());
        let e = Go::decode(&[1]).unwrap_err();
        assert_eq!(e.to_string(), "Go: 1 trailing bytes at offset 0");
    }

    #[test]
    fn lz4_pages_round_trip_and_hostile_blocks() {
        let mut raw = Vec::new();
        for i in 0..20_000u32 {
            raw.extend_from_slice(&(i / 7).to_le_bytes());
        }
        let mut z = Vec::new();
        compress_pages(&raw, &mut z);
        assert!(z.len() < raw.len() / 2, "{} of {}", z.len(), raw.len());
        let mut back = Vec::new();
        decompress_pages(&z, &mut back).unwrap();
        assert_eq!(back, raw);
        // A size claim over the frame limit is refused before allocating.
        let mut big = z.clone();
        big[..4].copy_from_slice(&(MAX_FRAME_PAYLOAD as u32 + 1).to_le_bytes());
        let e = decompress_pages(&big, &mut back).unwrap_err().to_string();
        assert!(e.contains("exceeds"), "{e}");
        // A claim that does not match the block, a damaged block, truncation.
        let mut lie = z.clone();
        lie[..4].copy_from_slice(&(raw.len() as u32 - 1).to_le_bytes());
        assert!(decompress_pages(&lie, &mut back).is_err());
        let mut bad = z.clone();
        let n = bad.len();
        bad[n / 2] ^= 0xff;
        bad[n - 1] ^= 0xff;
        let _ = decompress_pages(&bad, &mut back); // must not panic
        for cut in [0, 3, 4, 5, z.len() / 2, z.len() - 1] {
            assert!(decompress_pages(&z[..cut], &mut back).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn hello_wrong_magic_and_versions() {
        let good = Hello::new(desc()).encode().unwrap();
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            Hello::decode(&bad),
            Err(ProtocolError::BadHelloMagic { .. })
        ));

        let mut h = Hello::new(desc());
        h.protocol_version = 7;
        h.min_protocol_version = 7;
        let e = Hello::decode(&h.encode().unwrap()).unwrap_err();
        assert!(
            matches!(
                e,
                ProtocolError::UnsupportedVersion {
                    peer_version: 7,
                    peer_min: 7,
                    min: 2,
                    max: 3
                }
            ),
            "{e}"
        );
        let s = e.to_string();
        assert!(s.contains("unsupported protocol version 7"), "{s}");
        assert!(s.contains("this side speaks 2..=3"), "{s}");

        // A newer peer that still speaks version 3 negotiates down, and
        // the fields it appends for its own version are not read.
        h.min_protocol_version = 3;
        let mut next = h.encode().unwrap();
        let got = Hello::decode(&next).unwrap();
        assert_eq!(got.negotiated_version().unwrap(), 3);
        next.extend_from_slice(b"future fields");
        let got = Hello::decode(&next).unwrap();
        assert_eq!(got.negotiated_version().unwrap(), 3);
        // From a peer of this version, trailing bytes are refused.
        let mut same = Hello::new(desc()).encode().unwrap();
        same.push(0);
        assert!(Hello::decode(&same).is_err());

        // Version 1 is refused; version 2 (release 0.1.0) is spoken.
        h.protocol_version = 1;
        h.min_protocol_version = 1;
        assert!(Hello::decode(&h.encode().unwrap()).is_err());
        h.protocol_version = 2;
        h.min_protocol_version = 2;
        assert_eq!(
            Hello::decode(&h.encode().unwrap())
                .unwrap()
                .negotiated_version()
                .unwrap(),
            2
        );

        // Stream counts outside 1..=MAX_STREAMS are refused both ways.
        let mut h = Hello::new(desc());
        h.streams = MAX_STREAMS + 1;
        assert!(h.encode().is_err());
        let mut raw = Hello::new(desc()).encode().unwrap();
        let n = raw.len();
        raw[n - 4..n].copy_from_slice(&0u32.to_le_bytes());
        assert!(Hello::decode(&raw)
            .unwrap_err()
            .to_string()
            .contains("streams"));

        // Version 0 / inverted ranges are refused.
        h.streams = 1;
        h.protocol_version = 0;
        h.min_protocol_version = 0;
        assert!(matches!(
            Hello::decode(&h.encode().unwrap()),
            Err(ProtocolError::UnsupportedVersion { .. })
        ));

        let mut h = Hello::new(desc());
        h.page_size = 65536;
        assert!(matches!(
            Hello::decode(&h.encode().unwrap()),
            Err(ProtocolError::PageSizeMismatch { peer: 65536, .. })
        ));
    }

    /// Offsets of the Hello fields after the fixed prefix, for `desc()`.
    fn hello_offsets() -> (usize, usize, usize, usize) {
        let regions_at = 8 + 4 + 4 + 4;
        let vcpus_at = regions_at + 4 + 2 * 16;
        let nics_at = vcpus_at + 4;
        let props_at = nics_at + 4 + 2 * NIC_LEN;
        (regions_at, vcpus_at, nics_at, props_at)
    }

    #[test]
    fn hello_rejects_bad_fields() {
        let good = Hello::new(desc()).encode().unwrap();
        let (regions_at, vcpus_at, nics_at, props_at) = hello_offsets();
        let patch = |at: usize, bytes: &[u8]| {
            let mut b = good.clone();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            Hello::decode(&b).unwrap_err().to_string()
        };
        // Huge region count fails fast.
        let e = patch(regions_at, &u32::MAX.to_le_bytes());
        assert!(e.contains("exceeds the limit of 64"), "{e}");
        // Overlapping regions: second region starts at 0.
        let e = patch(regions_at + 4 + 16, &0u64.to_le_bytes());
        assert!(e.contains("invalid memory layout"), "{e}");
        // Unaligned region.
        let e = patch(regions_at + 4, &1u64.to_le_bytes());
        assert!(e.contains("not page aligned"), "{e}");
        assert!(patch(vcpus_at, &0u32.to_le_bytes()).contains("0 vCPUs"));
        assert!(patch(vcpus_at, &257u32.to_le_bytes()).contains("257 vCPUs"));
        assert!(patch(nics_at, &17u32.to_le_bytes()).contains("17 NICs"));
        // has_ip = 2.
        assert!(patch(nics_at + 4 + 6, &[2]).contains("not a boolean"));
        // IP bytes without has_ip (second NIC has none).
        assert!(patch(nics_at + 4 + NIC_LEN + 7, &[1]).contains("without has_ip"));
        assert!(patch(props_at, &65u32.to_le_bytes()).contains("65 properties"));
        // Key length over the limit.
        assert!(patch(props_at + 4, &300u16.to_le_bytes()).contains("limit 256"));
        // Bad UTF-8 in the first key ("cpu.vendor").
        let e = patch(props_at + 4 + 2, &[0xff]);
        assert!(e.contains("not valid UTF-8"), "{e}");
        // Duplicate key: rename "machine" (7 bytes) to "cpu.ven" — not a
        // duplicate; build one explicitly instead.
        let mut b = good[..props_at].to_vec();
        b.extend_from_slice(&2u32.to_le_bytes());
        for _ in 0..2 {
            b.extend_from_slice(&1u16.to_le_bytes());
            b.push(b'k');
            b.extend_from_slice(&0u16.to_le_bytes());
        }
        let e = Hello::decode(&b).unwrap_err().to_string();
        assert!(e.contains("'k' appears twice"), "{e}");
        // Empty key.
        let mut b = good[..props_at].to_vec();
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&[0, 0, 0, 0]);
        let e = Hello::decode(&b).unwrap_err().to_string();
        assert!(e.contains("empty key"), "{e}");
    }

    #[test]
    fn encoders_refuse_what_decoders_would_reject() {
        let mut d = desc();
        d.vcpus = 0;
        assert!(Hello::new(d).encode().is_err());
        let mut d = desc();
        d.properties.insert("x".repeat(300), "v".into());
        assert!(Hello::new(d).encode().is_err());
        let mut d = desc();
        d.nics = vec![d.nics[0].clone(); 17];
        assert!(Hello::new(d).encode().is_err());
        let mut d = desc();
        d.properties.insert(String::new(), "v".into());
        assert!(Hello::new(d).encode().is_err());

        for bad in [
            State {
                sections: vec![Section::new("a", 1, vec![]), Section::new("a", 2, vec![])],
            },
            State {
                sections: vec![Section::new("", 1, vec![])],
            },
            State {
                sections: vec![Section::new("tab\there", 1, vec![])],
            },
            State {
                sections: vec![Section::new("x".repeat(65), 1, vec![])],
            },
            State {
                sections: vec![Section::new("big", 1, vec![0; MAX_SECTION_LEN + 1])],
            },
        ] {
            assert!(bad.encode().is_err(), "{bad:?}");
        }

        // Long texts are cut at a character boundary, not refused.
        let long = "é".repeat(3000); // 6000 bytes
        let m = ErrorMsg::new(long.clone(), long.clone());
        let got = ErrorMsg::decode(&m.encode().unwrap()).unwrap();
        assert_eq!(got.message.len(), MAX_TEXT_LEN);
        assert!(long.starts_with(&got.message));
        let r = HelloReply {
            accepted: false,
            reason: long,
            streams: 1,
            token: [0; 16],
            version: 0,
        };
        assert_eq!(
            HelloReply::decode(&r.encode().unwrap())
                .unwrap()
                .reason
                .len(),
            MAX_TEXT_LEN
        );
    }

    #[test]
    fn state_rejects_hostile_input() {
        let t0 = std::time::Instant::now();
        // 4 billion sections: refused by the count check, nothing allocated.
        let e = State::decode(&u32::MAX.to_le_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("exceeds the limit of 4096"), "{e}");
        // 4096 sections claimed, 10 bytes present.
        let mut b = 4096u32.to_le_bytes().to_vec();
        b.extend_from_slice(&[0; 10]);
        let e = State::decode(&b).unwrap_err().to_string();
        assert!(e.contains("only 10 are left"), "{e}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(1));

        let section = |name: &[u8], version: u32, len: u32, data: &[u8]| {
            let mut v = (name.len() as u16).to_le_bytes().to_vec();
            v.extend_from_slice(name);
            v.extend_from_slice(&version.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
            v.extend_from_slice(data);
            v
        };
        let msg = |secs: &[Vec<u8>]| {
            let mut v = (secs.len() as u32).to_le_bytes().to_vec();
            for s in secs {
                v.extend_from_slice(s);
            }
            State::decode(&v).unwrap_err().to_string()
        };
        let e = msg(&[section(b"a", 1, 0, &[]), section(b"a", 2, 0, &[])]);
        assert!(e.contains("section 'a' appears twice"), "{e}");
        let e = msg(&[section(b"x", 4, u32::MAX, &[])]);
        assert!(
            e.contains("section 'x' (version 4): length 4294967295 exceeds"),
            "{e}"
        );
        let e = msg(&[section(b"x", 4, 100, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])]);
        assert!(e.contains("runs past the end of the frame"), "{e}");
        let e = msg(&[section(&[0xc3, 0x28], 1, 0, &[0; 2])]);
        assert!(e.contains("printable ASCII"), "{e}");
        let e = msg(&[section(b"new\nline", 1, 0, &[])]);
        assert!(e.contains("printable ASCII"), "{e}");
        let e = msg(&[section(&[b'n'; 65], 1, 0, &[])]);
        assert!(e.contains("65 bytes exceeds"), "{e}");
        let e = msg(&[section(b"", 1, 0, &[0])]);
        assert!(e.contains("printable ASCII"), "{e}");
    }

    #[test]
    fn text_rejects_bad_utf8_and_oversize() {
        let mut b = vec![0u8];
        b.extend_from_slice(&2u16.to_le_bytes());
        b.extend_from_slice(&[0xff, 0xfe]);
        let e = HelloReply::decode(&b).unwrap_err().to_string();
        assert!(e.contains("reason is not valid UTF-8"), "{e}");
        let mut b = 4097u16.to_le_bytes().to_vec();
        b.extend_from_slice(&[b'a'; 4097]);
        b.extend_from_slice(&0u16.to_le_bytes());
        let e = ErrorMsg::decode(&b).unwrap_err().to_string();
        assert!(e.contains("phase is 4097 bytes, limit 4096"), "{e}");
        // accepted must be 0 or 1.
        let e = HelloReply::decode(&[2, 0, 0]).unwrap_err().to_string();
        assert!(e.contains("not a boolean"), "{e}");
    }

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_BYTES]
    }

    #[test]
    fn page_batch_round_trip_and_merging() {
        let mut b = PageBatch::with_capacity(1 << 20);
        assert!(b.is_empty());
        b.push_zero(0, 2).unwrap();
        b.push_zero(0x2000, 3).unwrap(); // merged
        b.push_data(0x5000, 1, &page(1)).unwrap();
        b.push_data_with(0x6000, 2, |dst: &mut [u8]| {
            assert_eq!(dst.len(), 2 * PAGE_BYTES);
            dst[..PAGE_BYTES].fill(2);
            dst[PAGE_BYTES..].fill(3);
            Ok::<(), ProtocolError>(())
        })
        .unwrap(); // merged with the previous data record
        b.push_data(0x100000, 1, &page(4)).unwrap(); // not contiguous
        b.push_zero(0x101000, 1).unwrap(); // other kind
        assert_eq!(b.zero_pages(), 6);
        assert_eq!(b.data_pages(), 4);
        assert_eq!(b.len_bytes(), 4 * PAGE_RECORD_HEADER_LEN + 4 * PAGE_BYTES);

        let recs: Vec<_> = page_records(b.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(recs.len(), 4);
        assert_eq!((recs[0].gpa, recs[0].npages, recs[0].data), (0, 5, None));
        assert_eq!((recs[1].gpa, recs[1].npages), (0x5000, 3));
        let d = recs[1].data.unwrap();
        assert_eq!(d.len(), 3 * PAGE_BYTES);
        assert!(d[..PAGE_BYTES].iter().all(|&x| x == 1));
        assert!(d[PAGE_BYTES..2 * PAGE_BYTES].iter().all(|&x| x == 2));
        assert!(d[2 * PAGE_BYTES..].iter().all(|&x| x == 3));
        assert_eq!(recs[2].data.unwrap(), &page(4)[..]);
        assert_eq!(
            (recs[3].gpa, recs[3].npages, recs[3].data),
            (0x101000, 1, None)
        );

        let l = layout();
        assert_eq!(recs[0].check(&l).unwrap(), (0, 0));
        assert_eq!(recs[2].check(&l).unwrap(), (1, 0));
        let out = PageRecord {
            gpa: 0x9f000,
            npages: 2,
            data: None,
        };
        assert_eq!(
            out.check(&l).unwrap_err().to_string(),
            "pages 0x9f000+2 outside guest memory"
        );

        // A failing fill leaves the batch untouched (also a merge candidate).
        let before = b.as_bytes().to_vec();
        let r: Result<(), ProtocolError> = b.push_data_with(0x102000, 1, |_| {
            Err(ProtocolError::Unencodable {
                msg: "test",
                reason: "boom".into(),
            })
        });
        assert!(r.is_err());
        let r: Result<(), ProtocolError> = b.push_data_with(0x101000, 1, |_| {
            Err(ProtocolError::Unencodable {
                msg: "test",
                reason: "boom".into(),
            })
        });
        assert!(r.is_err());
        assert_eq!(b.as_bytes(), &before[..]);
        assert_eq!(b.data_pages(), 4);

        // Bad pushes.
        assert!(b.push_zero(1, 1).is_err());
        assert!(b.push_zero(0, 0).is_err());
        assert!(b.push_zero(u64::MAX - 4095, 2).is_err());
        assert!(b.push_data(0, 1, &[0; 10]).is_err());

        b.clear();
        assert!(b.is_empty());
        assert_eq!((b.data_pages(), b.zero_pages()), (0, 0));
        assert_eq!(page_records(b.as_bytes()).count(), 0);
    }

    fn rec(gpa: u64, npages: u32, kind: u8, reserved: [u8; 3]) -> Vec<u8> {
        let mut v = gpa.to_le_bytes().to_vec();
        v.extend_from_slice(&npages.to_le_bytes());
        v.push(kind);
        v.extend_from_slice(&reserved);
        v
    }

    fn first_err(payload: &[u8]) -> String {
        let mut it = page_records(payload);
        loop {
            match it.next() {
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    assert!(it.next().is_none(), "iterator continues after an error");
                    return e.to_string();
                }
                None => panic!("no error"),
            }
        }
    }

    #[test]
    fn page_records_reject_hostile_input() {
        let mut b = PageBatch::default();
        b.push_zero(0, 1).unwrap();
        b.push_data(0x3000, 1, &page(9)).unwrap();
        b.push_zero(0x10000, 7).unwrap();
        let good = b.as_bytes().to_vec();
        // Every strict prefix fails somewhere (except record boundaries,
        // which are valid shorter batches).
        let boundaries = [0, 16, 16 + 16 + PAGE_BYTES, good.len()];
        for cut in 0..good.len() {
            let r: Result<Vec<_>, _> = page_records(&good[..cut]).collect();
            assert_eq!(r.is_ok(), boundaries.contains(&cut), "cut {cut}");
        }

        let e = first_err(&[good.clone(), rec(0x1001, 1, 0, [0; 3])].concat());
        assert!(e.contains("not page aligned"), "{e}");
        assert!(
            e.starts_with(&format!("Pages record at offset {}", good.len())),
            "{e}"
        );
        assert!(first_err(&rec(0, 0, 0, [0; 3])).contains("zero pages"));
        assert!(first_err(&rec(0, 1, 2, [0; 3])).contains("unknown record kind 2"));
        assert!(first_err(&rec(0, 1, 0, [0, 1, 0])).contains("reserved"));
        assert!(first_err(&rec(u64::MAX - 4095, 2, 0, [0; 3])).contains("wrap"));
        let e = first_err(&rec(0, u32::MAX, 1, [0; 3]));
        assert!(
            e.starts_with("Pages record at offset 0: data runs past end of frame"),
            "{e}"
        );
        let mut short = rec(0x4000, 2, 1, [0; 3]);
        short.extend_from_slice(&page(1));
        let e = first_err(&[good.clone(), short].concat());
        assert!(e.contains("data runs past end of frame"), "{e}");
    }

    // -- framing ---------------------------------------------------------

    fn frames_bytes(frames: &[(MsgKind, &[u8])]) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new());
        for (k, p) in frames {
            w.write_frame(*k, &[p]).unwrap();
        }
        assert_eq!(w.bytes_written() as usize, w.get_ref().len());
        w.into_inner()
    }

    #[test]
    fn frames_round_trip_with_parts() {
        let mut w = FrameWriter::new(Vec::new());
        w.write_frame(MsgKind::Pages, &[b"ab", b"", b"cdef", &[9; 100]])
            .unwrap();
        w.send(&RoundEnd { round: 0, pages: 1 }).unwrap();
        w.send(&Complete).unwrap();
        assert_eq!(w.seq(), 3);
        let bytes = w.into_inner();
        // Magic on the wire.
        assert_eq!(&bytes[..2], &[0x4d, 0x4c]);
        let mut r = FrameReader::new(&bytes[..]);
        let f = r.read_frame().unwrap();
        assert_eq!((f.kind, f.seq), (MsgKind::Pages, 0));
        assert_eq!(&f.payload[..6], b"abcdef");
        assert_eq!(f.payload.len(), 106);
        let f = r.read_frame().unwrap();
        assert_eq!(
            f.decode::<RoundEnd>().unwrap(),
            RoundEnd { round: 0, pages: 1 }
        );
        let e = f.decode::<Ready>().unwrap_err().to_string();
        assert_eq!(
            e,
            "frame 1: unexpected RoundEnd message while expecting Ready"
        );
        let f = r.read_frame().unwrap();
        f.decode::<Complete>().unwrap();
        assert_eq!(r.bytes_read() as usize, bytes.len());
        let e = r.read_frame().unwrap_err();
        assert!(e.is_clean_eof() && e.is_disconnect(), "{e}");
    }

    #[test]
    fn write_all_gather_handles_short_writes() {
        /// Accepts at most 3 bytes per call, from the first slice only.
        struct Trickle(Vec<u8>);
        impl Write for Trickle {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                let n = buf.len().min(3);
                self.0.extend_from_slice(&buf[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let parts: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; usize::from(i % 5)]).collect();
        let refs: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
        let mut w = FrameWriter::new(Trickle(Vec::new()));
        w.write_frame(MsgKind::Pages, &refs).unwrap();
        let bytes = w.into_inner().0;
        let mut r = FrameReader::new(&bytes[..]);
        let f = r.read_frame().unwrap();
        assert_eq!(f.payload, &parts.concat()[..]);

        // Gathering writer (Vec) with more parts than MAX_IOV.
        let mut w = FrameWriter::new(Vec::new());
        w.write_frame(MsgKind::Pages, &refs).unwrap();
        assert_eq!(w.into_inner(), bytes);
    }

    #[test]
    fn reader_rejects_every_bit_flip() {
        let payload = RoundEnd {
            round: 7,
            pages: 0x0102_0304,
        }
        .encode()
        .unwrap();
        let good = frames_bytes(&[(MsgKind::RoundEnd, &payload)]);
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut b = good.clone();
                b[i] ^= 1 << bit;
                let mut r = FrameReader::new(&b[..]);
                let e = r.read_frame().err();
                assert!(e.is_some(), "flip of byte {i} bit {bit} accepted");
                // And the reader refuses to continue.
                assert!(matches!(r.read_frame(), Err(ProtocolError::Broken { .. })));
            }
        }
        let mut b = good.clone();
        b[20] ^= 1;
        let e = FrameReader::new(&b[..])
            .read_frame()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("frame 0: crc mismatch (got 0x"), "{e}");
        let mut b = good.clone();
        b[0] ^= 1;
        let e = FrameReader::new(&b[..])
            .read_frame()
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad magic"), "{e}");
        let mut b = good.clone();
        b[2] = 0;
        let e = FrameReader::new(&b[..])
            .read_frame()
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown message kind 0"), "{e}");
        let mut b = good;
        b[3] = 1;
        let e = FrameReader::new(&b[..])
            .read_frame()
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown flags"), "{e}");
    }

    #[test]
    fn reader_rejects_truncated_frames() {
        let good = frames_bytes(&[(MsgKind::Error, b"\x00\x00\x00\x00")]);
        for cut in 0..good.len() {
            let e = FrameReader::new(&good[..cut]).read_frame().unwrap_err();
            assert!(e.is_disconnect(), "{e}");
            assert_eq!(e.is_clean_eof(), cut == 0, "{e}");
        }
        let e = FrameReader::new(&good[..4]).read_frame().unwrap_err();
        assert_eq!(
            e.to_string(),
            "frame 0: connection closed by the peer after 4 of 16 header bytes"
        );
        let e = FrameReader::new(&good[..18]).read_frame().unwrap_err();
        assert_eq!(
            e.to_string(),
            "frame 0: connection closed by the peer after 2 of 4 payload bytes"
        );
    }

    #[test]
    fn reader_rejects_wrong_seq() {
        let a = frames_bytes(&[(MsgKind::Go, b""), (MsgKind::Go, b""), (MsgKind::Go, b"")]);
        let frame = |i: usize| &a[i * FRAME_HEADER_LEN..(i + 1) * FRAME_HEADER_LEN];
        // Dropped frame: 0, 2.
        let dropped = [frame(0), frame(2)].concat();
        let mut r = FrameReader::new(&dropped[..]);
        r.read_frame().unwrap();
        let e = r.read_frame().unwrap_err();
        assert_eq!(e.to_string(), "unexpected frame seq 2, expected 1");
        // Duplicated frame: 0, 1, 1.
        let dup = [frame(0), frame(1), frame(1)].concat();
        let mut r = FrameReader::new(&dup[..]);
        r.read_frame().unwrap();
        r.read_frame().unwrap();
        assert!(matches!(
            r.read_frame(),
            Err(ProtocolError::BadSeq {
                got: 1,
                expected: 2
            })
        ));
    }

    /// A reader that counts how much it was asked for.
    struct Endless {
        header: Vec<u8>,
        pos: usize,
    }
    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.pos < self.header.len() {
                let n = buf.len().min(self.header.len() - self.pos);
                buf[..n].copy_from_slice(&self.header[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            panic!("reader read past the header of an oversized frame");
        }
    }

    #[test]
    fn reader_rejects_oversized_len_before_allocating() {
        let mut h = frames_bytes(&[(MsgKind::Pages, b"")]);
        h[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut r = FrameReader::new(Endless { header: h, pos: 0 });
        let e = r.read_frame().unwrap_err();
        assert_eq!(
            e.to_string(),
            "frame 0: payload length 4294967295 exceeds limit 8388608"
        );
        assert_eq!(r.buf.capacity(), 0);

        // A configured smaller limit is honoured by both sides.
        let mut w = FrameWriter::new(Vec::new()).with_max_payload(10);
        assert!(matches!(
            w.write_frame(MsgKind::Pages, &[&[0; 11]]),
            Err(ProtocolError::PayloadTooLarge {
                len: 11,
                limit: 10,
                ..
            })
        ));
        w.write_frame(MsgKind::Pages, &[&[0; 10]]).unwrap();
        let bytes = frames_bytes(&[(MsgKind::Pages, &[0; 11])]);
        let mut r = FrameReader::new(&bytes[..]).with_max_payload(10);
        assert!(matches!(
            r.read_frame(),
            Err(ProtocolError::PayloadTooLarge {
                len: 11,
                limit: 10,
                ..
            })
        ));
    }

    /// Delivers bytes one at a time, timing out between them.
    struct Stutter {
        data: Vec<u8>,
        pos: usize,
        tick: bool,
    }
    impl Read for Stutter {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.tick = !self.tick;
            if self.tick {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "not yet"));
            }
            if self.pos == self.data.len() || buf.is_empty() {
                return Ok(0);
            }
            buf[0] = self.data[self.pos];
            self.pos += 1;
            Ok(1)
        }
    }

    #[test]
    fn reader_resumes_after_timeouts() {
        let bytes = frames_bytes(&[
            (MsgKind::Ready, &Ready { restore_us: 77 }.encode().unwrap()),
            (MsgKind::Cancel, b""),
        ]);
        let mut r = FrameReader::new(Stutter {
            data: bytes,
            pos: 0,
            tick: false,
        });
        let mut got = Vec::new();
        let mut timeouts = 0;
        loop {
            match r.read_frame() {
                Ok(f) => got.push(f.kind),
                Err(e) if e.is_timeout() => timeouts += 1,
                Err(e) => {
                    assert!(e.is_clean_eof(), "{e}");
                    break;
                }
            }
        }
        assert_eq!(got, vec![MsgKind::Ready, MsgKind::Cancel]);
        assert!(timeouts > 30);
    }

    #[test]
    fn writer_refuses_after_error() {
        struct Fails;
        impl Write for Fails {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::BrokenPipe, "gone"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w = FrameWriter::new(Fails);
        let e = w.send(&Go).unwrap_err();
        assert!(e.is_disconnect(), "{e}");
        assert_eq!(e.to_string(), "frame 0: writing: gone");
        assert!(matches!(
            w.send(&Go),
            Err(ProtocolError::Broken { frame: 0 })
        ));
    }

    #[test]
    fn thousand_frames_through_mem_transport() {
        let (a, b) = transport::mem::pair();
        let writer = std::thread::spawn(move || {
            let mut w = FrameWriter::new(a);
            let mut batch = PageBatch::with_capacity(64 * PAGE_BYTES);
            for i in 0..1000u32 {
                if i % 10 == 9 {
                    w.send(&RoundEnd {
                        round: i / 10,
                        pages: u64::from(i),
                    })
                    .unwrap();
                    continue;
                }
                batch.clear();
                let n = i % 17 + 1;
                for p in 0..n {
                    let gpa = 0x100000 + u64::from((i % 200) * 64 + p * 2) * PAGE_SIZE;
                    batch
                        .push_data_with(gpa, 1, |dst: &mut [u8]| {
                            dst.fill((i + p) as u8);
                            dst[..4].copy_from_slice(&i.to_le_bytes());
                            Ok::<(), ProtocolError>(())
                        })
                        .unwrap();
                    batch.push_zero(gpa + PAGE_SIZE, 1).unwrap();
                }
                w.write_frame(MsgKind::Pages, &[batch.as_bytes()]).unwrap();
            }
            w.send(&Complete).unwrap();
            w.bytes_written()
        });
        let mut r = FrameReader::new(b);
        let l = layout();
        for i in 0..1000u32 {
            let f = r.read_frame().unwrap();
            assert_eq!(f.seq, i);
            if i % 10 == 9 {
                let re = f.decode::<RoundEnd>().unwrap();
                assert_eq!(re.round, i / 10);
                continue;
            }
            f.expect(MsgKind::Pages).unwrap();
            let mut data = 0;
            for (j, rec) in page_records(f.payload).enumerate() {
                let rec = rec.unwrap();
                rec.check(&l).unwrap();
                let p = (j / 2) as u32;
                if let Some(d) = rec.data {
                    data += 1;
                    assert_eq!(&d[..4], &i.to_le_bytes());
                    assert!(d[4..].iter().all(|&x| x == (i + p) as u8));
                } else {
                    assert_eq!(rec.npages, 1);
                }
            }
            assert_eq!(data, i % 17 + 1);
        }
        r.read_frame().unwrap().decode::<Complete>().unwrap();
        let written = writer.join().unwrap();
        assert_eq!(written, r.bytes_read());
        let e = r.read_frame().unwrap_err();
        assert!(e.is_clean_eof(), "{e}");
    }

    #[test]
    fn mem_transport_timeout_is_resumable() {
        let (a, mut b) = transport::mem::pair();
        b.set_read_timeout(Some(std::time::Duration::from_millis(20)))
            .unwrap();
        let mut r = FrameReader::new(b);
        let e = r.read_frame().unwrap_err();
        assert!(e.is_timeout(), "{e}");
        let mut w = FrameWriter::new(a);
        w.send(&Resumed { resume_us: 5 }).unwrap();
        assert_eq!(
            r.read_frame()
                .unwrap()
                .decode::<Resumed>()
                .unwrap()
                .resume_us,
            5
        );
    }
}
