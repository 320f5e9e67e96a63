//! Frames: the 16-byte header, [`FrameWriter`] and [`FrameReader`].

use std::fmt;
use std::io::{self, IoSlice, Read, Write};

use super::{gather_meta_len, Message, MsgKind, ProtocolError, MAX_FRAME_PAYLOAD};

/// Frame magic, `"LM"` read as a little-endian `u16` (on the wire: `4D 4C`).
pub const FRAME_MAGIC: u16 = 0x4C4D;
/// Size of a frame header in bytes.
pub const FRAME_HEADER_LEN: usize = 16;
/// Header bytes the CRC covers (everything before the `crc` field).
const CRC_COVERS: usize = 12;

/// The 16-byte frame header, field by field as on the wire (see the table in
/// the [module docs](super)). This type is the only code that knows the
/// header's byte layout: [`FrameWriter`] and [`FrameReader`] go through it.
///
/// [`FrameHeader::decode`] maps any 16 bytes to fields without judging them;
/// [`FrameHeader::check`] then says whether they make a valid header.
///
/// ```
/// use livemig::protocol::{FrameHeader, MsgKind, FRAME_MAGIC};
///
/// let payload = b"\x01";
/// let h = FrameHeader::new(MsgKind::Go, 7, &[payload]);
/// let bytes = h.encode();
/// assert_eq!(&bytes[..2], &FRAME_MAGIC.to_le_bytes());
/// assert_eq!(FrameHeader::decode(&bytes), h);
/// assert_eq!(h.crc, h.compute_crc(&[payload]));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Bytes 0..2: [`FRAME_MAGIC`] in a valid header.
    pub magic: u16,
    /// Byte 2: the [`MsgKind`] as its wire byte (maybe unknown).
    pub kind: u8,
    /// Byte 3: reserved flags, 0 in a valid header.
    pub flags: u8,
    /// Bytes 4..8: the frame counter of this direction, starting at 0.
    pub seq: u32,
    /// Bytes 8..12: payload length.
    pub len: u32,
    /// Bytes 12..16: CRC-32C over header bytes 0..12, then the payload.
    pub crc: u32,
}

impl FrameHeader {
    /// The header of a frame of `kind` with sequence number `seq` whose
    /// payload is the concatenation of `parts`: magic and flags set, length
    /// and CRC computed. The payload length must fit in a `u32` (a
    /// [`FrameWriter`] checks its limit, at most `u32::MAX`, first); a longer
    /// one is recorded as `u32::MAX`.
    pub fn new(kind: MsgKind, seq: u32, parts: &[&[u8]]) -> Self {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut h = FrameHeader {
            magic: FRAME_MAGIC,
            kind: kind as u8,
            flags: 0,
            seq,
            len: u32::try_from(len).unwrap_or(u32::MAX),
            crc: 0,
        };
        h.crc = h.compute_crc(parts);
        h
    }

    /// The header's wire bytes.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[0..2].copy_from_slice(&self.magic.to_le_bytes());
        b[2] = self.kind;
        b[3] = self.flags;
        b[4..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..16].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// The fields of any 16 bytes, unchecked (`decode(&h.encode()) == h`
    /// and `decode(b).encode() == *b`).
    pub fn decode(b: &[u8; FRAME_HEADER_LEN]) -> Self {
        FrameHeader {
            magic: u16::from_le_bytes([b[0], b[1]]),
            kind: b[2],
            flags: b[3],
            seq: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            crc: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    /// The CRC a frame with this header (its `crc` field aside) and the
    /// payload `parts` must carry.
    pub fn compute_crc(&self, parts: &[&[u8]]) -> u32 {
        let bytes = self.encode();
        parts
            .iter()
            .fold(crc32c::crc32c(&bytes[..CRC_COVERS]), |crc, p| {
                crc32c::crc32c_append(crc, p)
            })
    }

    /// Checks what can be checked before the payload arrives, in this order:
    /// magic, flags, kind, and the length against `max_payload`; returns the
    /// kind and the payload length. `frame` is the sequence number the frame
    /// should have, for the error. (The CRC and `seq` are checked by
    /// [`FrameReader`] once the payload is in.)
    pub fn check(&self, frame: u32, max_payload: usize) -> Result<(MsgKind, usize), ProtocolError> {
        if self.magic != FRAME_MAGIC {
            return Err(ProtocolError::BadFrameMagic {
                frame,
                got: self.magic,
            });
        }
        if self.flags != 0 {
            return Err(ProtocolError::BadFlags {
                frame,
                flags: self.flags,
            });
        }
        let kind = MsgKind::from_u8(self.kind).ok_or(ProtocolError::UnknownKind {
            frame,
            kind: self.kind,
        })?;
        let len = usize::try_from(self.len).unwrap_or(usize::MAX);
        if len > max_payload {
            return Err(ProtocolError::PayloadTooLarge {
                frame,
                len: u64::from(self.len),
                limit: max_payload,
            });
        }
        Ok((kind, len))
    }
}

/// Payload bytes a frame's CRC covers: all of them, except in a
/// `PagesGather` frame, whose CRC covers only the metadata
/// ([`gather_meta_len`]).
pub fn crc_covered(kind: MsgKind, payload: &[u8]) -> &[u8] {
    match kind {
        MsgKind::PagesGather => &payload[..gather_meta_len(payload)],
        _ => payload,
    }
}

/// Parts of a frame whose slices [`FrameWriter::write_frame`] keeps on the
/// stack (more are collected into a `Vec`).
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
        let len: usize = parts.iter().map(|p| p.len()).sum();
        self.check_next(len)?;
        // `len <= max_payload <= u32::MAX` was checked above.
        let header = FrameHeader::new(kind, self.seq, parts).encode();
        let written = write_all_gather(&mut self.inner, &header, parts);
        self.account(written, len)
    }

    /// Refuses the next frame, of `len` payload bytes, if the writer broke
    /// earlier or the payload is over the limit.
    fn check_next(&self, len: usize) -> Result<(), ProtocolError> {
        if self.broken {
            return Err(ProtocolError::Broken { frame: self.seq });
        }
        if len > self.max_payload {
            return Err(ProtocolError::PayloadTooLarge {
                frame: self.seq,
                len: len as u64,
                limit: self.max_payload,
            });
        }
        Ok(())
    }

    /// After writing a frame of `len` payload bytes: counts it, or marks
    /// the writer broken (part of a frame may be on the wire).
    fn account(&mut self, written: std::io::Result<()>, len: usize) -> Result<(), ProtocolError> {
        if let Err(source) = written {
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

    /// Writes one frame whose payload is `covered` followed by `rest`, with
    /// a CRC over the header and `covered` only (as a `PagesGather` frame
    /// carries it: `covered` is its metadata, `rest` the page data, which
    /// the frame CRC does not cover). Every slice is written as it is, in
    /// as few `write_vectored` calls as the writer takes
    /// ([`write_all_vectored`]); nothing is copied.
    pub fn write_frame_split(
        &mut self,
        kind: MsgKind,
        covered: &[&[u8]],
        rest: &[IoSlice<'_>],
    ) -> Result<(), ProtocolError> {
        let head: usize = covered.iter().map(|p| p.len()).sum();
        let len = head + rest.iter().map(|p| p.len()).sum::<usize>();
        self.check_next(len)?;
        let mut h = FrameHeader::new(kind, self.seq, covered);
        // `len <= max_payload <= u32::MAX` was checked above.
        h.len = len as u32;
        h.crc = h.compute_crc(covered);
        let header = h.encode();
        let mut iov = Vec::with_capacity(1 + covered.len() + rest.len());
        iov.push(IoSlice::new(&header));
        iov.extend(covered.iter().map(|p| IoSlice::new(p)));
        iov.extend_from_slice(rest);
        let written = write_all_vectored(&mut self.inner, &mut iov);
        self.account(written, len)
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

/// Writes `header` followed by every part ([`write_all_vectored`]); the
/// slices of a frame of fewer than [`MAX_IOV`] parts stay on the stack.
fn write_all_gather<W: Write>(w: &mut W, header: &[u8], parts: &[&[u8]]) -> io::Result<()> {
    let slices = std::iter::once(header)
        .chain(parts.iter().copied())
        .map(IoSlice::new);
    if parts.len() < MAX_IOV {
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        let n = iov.iter_mut().zip(slices).map(|(d, s)| *d = s).count();
        write_all_vectored(w, &mut iov[..n])
    } else {
        write_all_vectored(w, &mut slices.collect::<Vec<_>>())
    }
}

/// Most slices handed to one `write_vectored` call by
/// [`write_all_vectored`] (Linux's `IOV_MAX`).
const MAX_GATHER_IOV: usize = 1024;

/// Writes every byte of `bufs`, in order: `write_vectored` with at most
/// 1024 slices (Linux's `IOV_MAX`) at a time, continuing after short writes
/// ([`IoSlice::advance_slices`]) and retrying on `Interrupted`; a write of
/// 0 bytes with bytes left fails with `WriteZero`. (`Write::write_all_vectored`
/// is not stable; std's default `write_vectored` writes only the first
/// non-empty slice, which this handles too, one call per slice.)
pub fn write_all_vectored<W: Write + ?Sized>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let take = bufs.len().min(MAX_GATHER_IOV);
        match w.write_vectored(&bufs[..take]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "failed to write the whole frame",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
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

/// Takes the payload of some frames as it arrives, instead of the reader's
/// buffer: see [`FrameReader::read_frame_into`].
///
/// The reader asks the sink for the slice the next bytes go into
/// ([`PayloadSink::next_buf`]), reads into it and reports how many bytes
/// arrived ([`PayloadSink::advance`]); the bytes are therefore *not* yet
/// covered by a checked CRC when the sink gets them. A sink must treat them
/// as untrusted until the read call returns the frame (the CRC is checked
/// at its end), and must be able to discard what it did with them when the
/// frame fails instead.
pub trait PayloadSink {
    /// Whether to take the payload of this frame (`kind`, `len` bytes),
    /// whose header passed every check and whose sequence number is the
    /// expected one. Called once per frame, before any payload byte.
    fn begin(&mut self, kind: MsgKind, len: usize) -> bool;

    /// The slice the next payload bytes go into: non-empty and at most
    /// `left` (the payload bytes still to come, at least 1) long; or `None`
    /// if the sink has failed and wants the rest of the payload discarded
    /// (the reader still reads and checksums it, so that a corrupted frame
    /// is reported as such).
    fn next_buf(&mut self, left: usize) -> Option<&mut [u8]>;

    /// `n` bytes (at least 1) arrived in the slice [`PayloadSink::next_buf`]
    /// returned last.
    fn advance(&mut self, n: usize);
}

/// The sink of [`FrameReader::read_frame`]: takes nothing.
struct NoSink;

impl PayloadSink for NoSink {
    fn begin(&mut self, _: MsgKind, _: usize) -> bool {
        false
    }
    fn next_buf(&mut self, _: usize) -> Option<&mut [u8]> {
        None
    }
    fn advance(&mut self, _: usize) {}
}

/// Where the payload of the frame being read goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dest {
    /// The reader's buffer.
    Buffer,
    /// The sink, with the CRC so far.
    Sink(u32),
    /// The sink failed: discarded, with the CRC so far.
    Discard(u32),
}

/// A header that passed [`FrameHeader::check`], with what the check returned.
#[derive(Clone, Copy)]
struct Header {
    raw: FrameHeader,
    kind: MsgKind,
    len: usize,
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
    dest: Dest,
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
            dest: Dest::Buffer,
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
        if self.dest != Dest::Buffer && self.header.is_some() {
            // A frame streamed into a sink cannot be resumed without it.
            self.broken = true;
        }
        self.read_frame_into(&mut NoSink)
    }

    /// Reads the next frame and checks it completely, like
    /// [`FrameReader::read_frame`], except that the payload of a frame
    /// `sink` accepts ([`PayloadSink::begin`]) is read straight into the
    /// slices the sink hands out, with no copy through the reader's
    /// buffer. The CRC is computed over exactly the bytes read, as they
    /// arrive, and checked at the end of the frame, as is every other
    /// check: such a frame is returned with an empty payload once it has
    /// passed them all; until then, what the sink received is unverified.
    ///
    /// After a read timeout, the next call must pass the same sink: it
    /// continues the frame where the timeout left it.
    pub fn read_frame_into<S: PayloadSink + ?Sized>(
        &mut self,
        sink: &mut S,
    ) -> Result<Frame<'_>, ProtocolError> {
        if self.broken {
            return Err(ProtocolError::Broken {
                frame: self.next_seq,
            });
        }
        match self.read_frame_inner(sink) {
            Ok((h, streamed)) => Ok(Frame {
                kind: h.kind,
                seq: h.raw.seq,
                payload: if streamed {
                    &[]
                } else {
                    self.buf.get(..h.len).unwrap_or_default()
                },
            }),
            Err(e) => {
                if !e.is_timeout() {
                    self.broken = true;
                }
                Err(e)
            }
        }
    }

    /// The frame's header and whether its payload went to `sink`.
    fn read_frame_inner<S: PayloadSink + ?Sized>(
        &mut self,
        sink: &mut S,
    ) -> Result<(Header, bool), ProtocolError> {
        let frame = self.next_seq;
        let header = match self.header {
            Some(h) => h,
            None => {
                let h = self.read_header()?;
                // A frame out of sequence is read whole, so that it fails
                // (crc first, then seq) as it always did.
                // A frame whose CRC does not cover its whole payload is
                // never streamed: the streamed CRC covers every byte.
                let whole = h.kind != MsgKind::PagesGather;
                self.dest = if whole && h.raw.seq == frame && sink.begin(h.kind, h.len) {
                    Dest::Sink(crc32c::crc32c(&self.hdr[..CRC_COVERS]))
                } else {
                    Dest::Buffer
                };
                if self.dest == Dest::Buffer && self.buf.len() < h.len {
                    self.buf.resize(h.len, 0);
                }
                self.header = Some(h);
                self.payload_have = 0;
                h
            }
        };
        if self.dest == Dest::Buffer {
            self.fill_payload(header.len)?;
        } else {
            self.stream_payload(header.len, sink)?;
        }
        // The frame is complete; whatever happens next, start afresh.
        self.header = None;
        self.hdr_have = 0;
        self.payload_have = 0;
        let dest = std::mem::replace(&mut self.dest, Dest::Buffer);
        let computed = match dest {
            Dest::Buffer => {
                let payload = self.buf.get(..header.len).unwrap_or_default();
                header.raw.compute_crc(&[crc_covered(header.kind, payload)])
            }
            Dest::Sink(crc) | Dest::Discard(crc) => crc,
        };
        if computed != header.raw.crc {
            return Err(ProtocolError::CrcMismatch {
                frame,
                got: header.raw.crc,
                computed,
            });
        }
        if header.raw.seq != frame {
            return Err(ProtocolError::BadSeq {
                got: header.raw.seq,
                expected: frame,
            });
        }
        self.next_seq = self.next_seq.wrapping_add(1);
        Ok((header, dest != Dest::Buffer))
    }

    /// Reads (the rest of) the header and checks it.
    fn read_header(&mut self) -> Result<Header, ProtocolError> {
        let frame = self.next_seq;
        let r = fill(
            &mut self.inner,
            &mut self.hdr,
            &mut self.hdr_have,
            &mut self.bytes_read,
        );
        match r.map_err(|source| ProtocolError::Read {
            frame,
            part: "header",
            source,
        })? {
            Fill::Done => self.parse_header(),
            Fill::Eof(got) => Err(ProtocolError::Eof {
                frame,
                part: "header",
                got,
                wanted: FRAME_HEADER_LEN,
            }),
        }
    }

    /// Reads (the rest of) a `len`-byte payload into the buffer.
    fn fill_payload(&mut self, len: usize) -> Result<(), ProtocolError> {
        let frame = self.next_seq;
        let payload = self.buf.get_mut(..len).unwrap_or_default();
        let r = fill(
            &mut self.inner,
            payload,
            &mut self.payload_have,
            &mut self.bytes_read,
        );
        match r.map_err(|source| ProtocolError::Read {
            frame,
            part: "payload",
            source,
        })? {
            Fill::Done => Ok(()),
            Fill::Eof(got) => Err(ProtocolError::Eof {
                frame,
                part: "payload",
                got,
                wanted: len,
            }),
        }
    }

    /// Reads (the rest of) a `len`-byte payload into `sink`, or discards
    /// it once the sink has failed, updating the CRC in `self.dest` with
    /// every byte read.
    fn stream_payload<S: PayloadSink + ?Sized>(
        &mut self,
        len: usize,
        sink: &mut S,
    ) -> Result<(), ProtocolError> {
        /// Most bytes discarded per read.
        const DISCARD_CHUNK: usize = 64 << 10;
        while self.payload_have < len {
            let left = len - self.payload_have;
            let n = match self.dest {
                Dest::Sink(crc) => match sink.next_buf(left) {
                    Some(b) if !b.is_empty() => {
                        let end = b.len().min(left);
                        let b = &mut b[..end];
                        let n = self.read_payload(len, b)?;
                        self.dest = Dest::Sink(crc32c::crc32c_append(crc, &b[..n]));
                        sink.advance(n);
                        n
                    }
                    // A failed sink (an empty slice would read as the end
                    // of the stream: treated as a failure too).
                    _ => {
                        self.dest = Dest::Discard(crc);
                        continue;
                    }
                },
                Dest::Discard(crc) => {
                    let mut buf = std::mem::take(&mut self.buf);
                    let chunk = left.min(DISCARD_CHUNK);
                    if buf.len() < chunk {
                        buf.resize(chunk, 0);
                    }
                    let r = self.read_payload(len, &mut buf[..chunk]);
                    if let Ok(n) = r {
                        self.dest = Dest::Discard(crc32c::crc32c_append(crc, &buf[..n]));
                    }
                    self.buf = buf;
                    r?
                }
                Dest::Buffer => return Ok(()),
            };
            self.payload_have += n;
        }
        Ok(())
    }

    /// One read of payload bytes into `buf` (non-empty); the end of the
    /// stream is an error.
    fn read_payload(&mut self, len: usize, buf: &mut [u8]) -> Result<usize, ProtocolError> {
        let frame = self.next_seq;
        loop {
            match self.inner.read(buf) {
                Ok(0) => {
                    return Err(ProtocolError::Eof {
                        frame,
                        part: "payload",
                        got: self.payload_have,
                        wanted: len,
                    })
                }
                Ok(n) => {
                    let n = n.min(buf.len());
                    self.bytes_read += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(ProtocolError::Read {
                        frame,
                        part: "payload",
                        source,
                    })
                }
            }
        }
    }

    /// Decodes and checks the header in `self.hdr` (everything but seq and crc).
    fn parse_header(&self) -> Result<Header, ProtocolError> {
        let raw = FrameHeader::decode(&self.hdr);
        let (kind, len) = raw.check(self.next_seq, self.max_payload)?;
        Ok(Header { raw, kind, len })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::PAGE_SIZE;
    use crate::protocol::pages::PAGE_BYTES;
    use crate::protocol::test_support::layout;
    use crate::protocol::{page_records, Complete, Go, PageBatch, Ready, Resumed, RoundEnd};
    use crate::transport::{self, Transport};

    /// A writer that takes at most 3 bytes a call through `write` only
    /// (std's default `write_vectored`: the first non-empty slice), fails
    /// its first call with `Interrupted`, and then ends after `cap` bytes.
    struct Stingy {
        out: Vec<u8>,
        interrupted: bool,
        cap: usize,
    }

    impl Write for Stingy {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if !self.interrupted {
                self.interrupted = true;
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = buf.len().min(3).min(self.cap - self.out.len());
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Every byte of every slice arrives, in order, through short writes,
    /// an interruption, empty slices and more slices than one call takes;
    /// a writer that stops taking bytes fails with `WriteZero`.
    #[test]
    fn write_all_vectored_writes_everything_in_order() {
        let parts: Vec<Vec<u8>> = (0..1500u32)
            .map(|i| (0..(i % 5) as u8).map(|b| b ^ i as u8).collect())
            .collect();
        let want = parts.concat();
        let mut w = Stingy {
            out: Vec::new(),
            interrupted: false,
            cap: usize::MAX,
        };
        let mut iov: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        write_all_vectored(&mut w, &mut iov).unwrap();
        assert_eq!(w.out, want);
        let mut short = Stingy {
            out: Vec::new(),
            interrupted: true,
            cap: 10,
        };
        let mut iov: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let e = write_all_vectored(&mut short, &mut iov).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WriteZero);
        assert_eq!(short.out, want[..10]);
    }

    #[test]
    fn frame_header_owns_the_layout() {
        let h = FrameHeader {
            magic: FRAME_MAGIC,
            kind: MsgKind::Ready as u8,
            flags: 0,
            seq: 0x0102_0304,
            len: 0x0a0b_0c0d,
            crc: 0xdead_beef,
        };
        // Written out by hand, as the module docs' table says.
        let wire = [
            0x4d, 0x4c, 7, 0, 4, 3, 2, 1, 0x0d, 0x0c, 0x0b, 0x0a, 0xef, 0xbe, 0xad, 0xde,
        ];
        assert_eq!(h.encode(), wire);
        assert_eq!(FrameHeader::decode(&wire), h);
        for b in [
            [0u8; 16],
            [0xff; 16],
            std::array::from_fn(|i| (i as u8) * 17),
        ] {
            assert_eq!(FrameHeader::decode(&b).encode(), b);
        }

        // new(): length and CRC over header bytes 0..12, then the payload.
        let h = FrameHeader::new(MsgKind::Pages, 5, &[b"ab", b"", b"cd"]);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&h.encode()[..12]), b"abcd");
        assert_eq!(
            (h.magic, h.flags, h.seq, h.len, h.crc),
            (FRAME_MAGIC, 0, 5, 4, crc)
        );
        assert_eq!(h.check(5, 4).unwrap(), (MsgKind::Pages, 4));
        assert!(matches!(
            h.check(5, 3),
            Err(ProtocolError::PayloadTooLarge {
                frame: 5,
                len: 4,
                limit: 3
            })
        ));
        // Magic before flags before kind before length.
        let bad = FrameHeader {
            magic: 0,
            flags: 1,
            kind: 0,
            len: u32::MAX,
            ..h
        };
        assert!(matches!(
            bad.check(0, 0),
            Err(ProtocolError::BadFrameMagic { .. })
        ));
        let bad = FrameHeader {
            magic: FRAME_MAGIC,
            ..bad
        };
        assert!(matches!(
            bad.check(0, 0),
            Err(ProtocolError::BadFlags { flags: 1, .. })
        ));
        let bad = FrameHeader { flags: 0, ..bad };
        assert!(matches!(
            bad.check(0, 0),
            Err(ProtocolError::UnknownKind { kind: 0, .. })
        ));

        // What a FrameWriter writes is this header, then the payload.
        let bytes = frames_bytes(&[(MsgKind::Go, b""), (MsgKind::Pages, b"abcd")]);
        let second = FrameHeader::new(MsgKind::Pages, 1, &[b"abcd"]).encode();
        assert_eq!(&bytes[FRAME_HEADER_LEN..2 * FRAME_HEADER_LEN], &second[..]);
    }

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

    /// Takes `Pages` payloads, 3 bytes per slice.
    #[derive(Default)]
    struct Threes {
        got: Vec<u8>,
        slice: [u8; 3],
        begun: Vec<(MsgKind, usize)>,
    }
    impl PayloadSink for Threes {
        fn begin(&mut self, kind: MsgKind, len: usize) -> bool {
            self.begun.push((kind, len));
            kind == MsgKind::Pages
        }
        fn next_buf(&mut self, _left: usize) -> Option<&mut [u8]> {
            Some(&mut self.slice)
        }
        fn advance(&mut self, n: usize) {
            self.got.extend_from_slice(&self.slice[..n]);
        }
    }

    #[test]
    fn reader_streams_into_a_sink() {
        let payload: Vec<u8> = (0..100u8).collect();
        let bytes = frames_bytes(&[
            (MsgKind::Pages, &payload),
            (MsgKind::Cancel, b"x"),
            (MsgKind::Pages, &payload),
        ]);
        let mut r = FrameReader::new(Stutter {
            data: bytes.clone(),
            pos: 0,
            tick: false,
        });
        let mut sink = Threes::default();
        let mut got = Vec::new();
        loop {
            match r.read_frame_into(&mut sink) {
                Ok(f) => got.push((f.kind, f.payload.to_vec())),
                Err(e) if e.is_timeout() => {}
                Err(e) => {
                    assert!(e.is_clean_eof(), "{e}");
                    break;
                }
            }
        }
        // Pages payloads went to the sink (each byte once), the rest not.
        assert_eq!(
            got,
            vec![
                (MsgKind::Pages, vec![]),
                (MsgKind::Cancel, b"x".to_vec()),
                (MsgKind::Pages, vec![])
            ]
        );
        assert_eq!(sink.got, [&payload[..], &payload[..]].concat());
        assert_eq!(r.bytes_read() as usize, bytes.len());

        // A corrupted payload is a CRC mismatch, after the sink saw it.
        let mut bad = bytes.clone();
        bad[FRAME_HEADER_LEN + 50] ^= 4;
        let mut sink = Threes::default();
        let e = FrameReader::new(&bad[..])
            .read_frame_into(&mut sink)
            .unwrap_err();
        assert!(e.to_string().starts_with("frame 0: crc mismatch"), "{e}");
        assert_eq!(sink.got.len(), 100);

        // A frame out of sequence is not offered to the sink.
        let mut r = FrameReader::new(&bytes[FRAME_HEADER_LEN + 100..]);
        let mut sink = Threes::default();
        let e = r.read_frame_into(&mut sink).unwrap_err();
        assert!(matches!(
            e,
            ProtocolError::BadSeq {
                got: 1,
                expected: 0
            }
        ));
        assert!(sink.begun.is_empty());
    }

    #[test]
    fn streamed_frame_cannot_resume_without_its_sink() {
        let bytes = frames_bytes(&[(MsgKind::Pages, &[5; 10])]);
        let mut r = FrameReader::new(Stutter {
            data: bytes,
            pos: 0,
            tick: false,
        });
        let mut sink = Threes::default();
        // Until some of the payload is in.
        while sink.got.is_empty() {
            let e = r.read_frame_into(&mut sink).unwrap_err();
            assert!(e.is_timeout(), "{e}");
        }
        assert!(matches!(
            r.read_frame(),
            Err(ProtocolError::Broken { frame: 0 })
        ));
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
