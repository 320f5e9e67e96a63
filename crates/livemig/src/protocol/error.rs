//! [`ProtocolError`]: everything that can go wrong reading or writing the
//! wire protocol.

use std::io;

use super::{MsgKind, FRAME_MAGIC};

/// Errors of the wire protocol: I/O, framing, and malformed payloads.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// The [`Hello`](super::Hello) does not start with [`HELLO_MAGIC`](super::HELLO_MAGIC).
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
        /// Ours ([`PAGE_SIZE`](crate::memory::PAGE_SIZE)).
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
    /// Whether this is a read or write timeout. A [`FrameReader`](super::FrameReader) stays
    /// usable after a read timeout (the next call resumes the partial frame);
    /// a [`FrameWriter`](super::FrameWriter) does not.
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
