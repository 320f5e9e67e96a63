//! Fuzz harness for livemig.
//!
//! Shared by the cargo-fuzz targets in `fuzz/fuzz_targets/` (one line each)
//! and by the ordinary test `crates/livemig/tests/corpus_replay.rs`, which
//! includes this file as a module and replays every file of `fuzz/corpus/`
//! through [`run`], so an input that once crashed a target stays fixed.
//!
//! Every target panics (= a crash for libFuzzer, a failure for the test) only
//! when livemig misbehaves: a panic inside livemig, a decoded message that
//! does not survive a re-encode, a frame returned with a bad checksum, or a
//! receiver that writes guest memory it was not told to write.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use livemig::memory::{GuestRam, MemoryLayout, RegionDesc, PAGE_SIZE};
use livemig::protocol::{
    page_records, Cancel, Complete, ErrorMsg, FrameReader, FrameWriter, Go, Hello, HelloReply,
    Message, MsgKind, PayloadSink, ProtocolError, Ready, Resumed, RoundEnd, State,
    FRAME_HEADER_LEN,
};
use livemig::state::{Section, StateReader, StateWriter};
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::Transport;
use livemig::vm::{VmDescription, VmError};
use livemig::{MigrationError, ReceiveConfig, ReceiveReport, Reception};
use vm_memory::{Bytes, GuestAddress};

/// The fuzz targets, by name (the names of `fuzz/fuzz_targets/*.rs` and of
/// the directories under `fuzz/corpus/`).
pub const TARGETS: &[&str] = &[
    "frame_reader",
    "decode_hello",
    "decode_state",
    "page_records",
    "decode_messages",
    "receive_raw",
    "receive_frames",
    "decompress_pages",
];

/// Runs `data` through the target `name`; false if there is no such target.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "frame_reader" => frame_reader(data),
        "decode_hello" => decode_hello(data),
        "decode_state" => decode_state(data),
        "page_records" => page_records_target(data),
        "decode_messages" => decode_messages(data),
        "receive_raw" => receive_raw(data),
        "receive_frames" => receive_frames(data),
        "decompress_pages" => decompress_pages_target(data),
        _ => return false,
    }
    true
}

// ---------------------------------------------------------------------------
// The fixed destination
// ---------------------------------------------------------------------------

/// Start of the second region of [`layout`].
pub const REGION1: u64 = 0x10_0000;

/// The destination's memory: 16 pages at 0 and 4 pages at 1 MiB.
pub fn layout() -> MemoryLayout {
    let regions = vec![
        RegionDesc {
            guest_addr: 0,
            size: 16 * PAGE_SIZE,
        },
        RegionDesc {
            guest_addr: REGION1,
            size: 4 * PAGE_SIZE,
        },
    ];
    MemoryLayout::new(regions).unwrap_or_else(|e| panic!("fixed layout: {e}"))
}

/// What a source of [`layout`] says in its `Hello`.
pub fn description() -> VmDescription {
    VmDescription {
        layout: layout(),
        vcpus: 1,
        nics: Vec::new(),
        properties: BTreeMap::from([("soft.version".to_string(), "1".to_string())]),
    }
}

/// The state section a [`SoftVm`] restores (no writers, no writes).
pub fn soft_section() -> Section {
    let mut w = StateWriter::new();
    w.u64(0).u32(0);
    Section::new("soft.writers", 1, w.finish())
}

// ---------------------------------------------------------------------------
// A transport that serves a script and discards writes
// ---------------------------------------------------------------------------

struct Script {
    data: Vec<u8>,
    pos: usize,
    closed: bool,
    written: u64,
}

/// A [`Transport`] whose reads serve fixed bytes (then end-of-file) and whose
/// writes are counted and discarded. Reads return at most [`ScriptTransport::CHUNK`]
/// bytes, so frames arrive in pieces. Clones share the position.
#[derive(Clone)]
pub struct ScriptTransport {
    inner: Arc<Mutex<Script>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ScriptTransport {
    /// Largest read.
    pub const CHUNK: usize = 4099;

    /// A transport serving `data`.
    pub fn new(data: Vec<u8>) -> Self {
        ScriptTransport {
            inner: Arc::new(Mutex::new(Script {
                data,
                pos: 0,
                closed: false,
                written: 0,
            })),
        }
    }

    /// Bytes written to it (and discarded) so far.
    pub fn written(&self) -> u64 {
        lock(&self.inner).written
    }
}

impl Read for ScriptTransport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = lock(&self.inner);
        if s.closed {
            return Ok(0);
        }
        let n = buf.len().min(s.data.len() - s.pos).min(Self::CHUNK);
        buf[..n].copy_from_slice(&s.data[s.pos..s.pos + n]);
        s.pos += n;
        Ok(n)
    }
}

impl Write for ScriptTransport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = lock(&self.inner);
        if s.closed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        s.written += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for ScriptTransport {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if timeout == Some(Duration::ZERO) {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        Ok(())
    }

    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }

    fn shutdown(&self) -> io::Result<()> {
        lock(&self.inner).closed = true;
        Ok(())
    }

    fn peer(&self) -> String {
        "script".to_string()
    }

    fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(self.clone()))
    }
}

// ---------------------------------------------------------------------------
// Building streams
// ---------------------------------------------------------------------------

/// Frames `(kind, payload)` as a writer would send them (seq from 0).
pub fn frames(list: &[(MsgKind, Vec<u8>)]) -> Vec<u8> {
    let mut fw = FrameWriter::new(Vec::new());
    for (kind, payload) in list {
        if let Err(e) = fw.write_frame(*kind, &[payload]) {
            panic!("framing {kind}: {e}");
        }
    }
    fw.into_inner()
}

fn encode<M: Message>(m: &M) -> Vec<u8> {
    m.encode()
        .unwrap_or_else(|e| panic!("encoding {}: {e}", M::KIND))
}

/// A page record: `npages` pages at `gpa` of `kind` (0 zero, 1 data, or
/// anything), with `data` appended as it is.
pub fn record(gpa: u64, npages: u32, kind: u8, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&gpa.to_le_bytes());
    v.extend_from_slice(&npages.to_le_bytes());
    v.extend_from_slice(&[kind, 0, 0, 0]);
    v.extend_from_slice(data);
    v
}

/// `n` pages filled with `byte`.
pub fn pages(n: usize, byte: u8) -> Vec<u8> {
    vec![byte; n * PAGE_SIZE as usize]
}

/// The frames of a complete, valid migration of [`layout`]: Hello, two
/// rounds of pages (data and zero records in both regions), State,
/// Complete, Go.
pub fn valid_frames() -> Vec<(MsgKind, Vec<u8>)> {
    let mut p0 = record(0, 2, 1, &pages(2, 0x11));
    p0.extend(record(5 * PAGE_SIZE, 1, 0, &[]));
    p0.extend(record(REGION1 + PAGE_SIZE, 3, 1, &pages(3, 0x22)));
    let mut p1 = record(PAGE_SIZE, 1, 0, &[]);
    p1.extend(record(15 * PAGE_SIZE, 1, 1, &pages(1, 0x33)));
    vec![
        (MsgKind::Hello, encode(&Hello::new(description()))),
        (MsgKind::Pages, p0),
        (MsgKind::RoundEnd, encode(&RoundEnd { round: 0, pages: 5 })),
        (MsgKind::Pages, p1),
        (MsgKind::RoundEnd, encode(&RoundEnd { round: 1, pages: 1 })),
        (
            MsgKind::State,
            encode(&State {
                sections: vec![soft_section()],
            }),
        ),
        (MsgKind::Complete, Vec::new()),
        (MsgKind::Go, Vec::new()),
    ]
}

/// [`valid_frames`] as a byte stream.
pub fn valid_stream() -> Vec<u8> {
    frames(&valid_frames())
}

/// Turns a compact script into a frame stream, so that the fuzzer reaches
/// the receiver's deep paths without having to compute checksums.
///
/// The script is a sequence of operations `op u8, len u16, payload[len]`
/// (a short tail is taken as it is). `op & 0x0f` is the frame kind byte and
/// `op >> 4` the mode:
///
/// * 0..=11: a frame with the payload, correct seq and crc;
/// * 12: the same with a corrupted crc;
/// * 13: the same with a sequence number one too high;
/// * 14: the payload as raw bytes, no frame;
/// * 15: a template: kind 1, the valid `Hello` (offering the switchover
///   probe when `payload[0]` is odd); kind 0, a `Probe` frame (kind byte
///   23) with id `payload[0]` and `payload[1]` zero padding bytes (a
///   non-zero `payload[2]` makes the last padding byte that value); kind 5, a `State` with one
///   `soft.writers` section of version `payload[0]` and data `payload[1..]`;
///   kind 3, a `Pages` frame from 4-byte records `page, npages, kind, fill`
///   (page bit 7 selects the second region; data records carry `npages`
///   pages of `fill`, at most 32); other kinds, an empty frame.
pub fn frames_from_script(script: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut seq = 0u32;
    let mut i = 0usize;
    while i < script.len() {
        let op = script[i];
        i += 1;
        let len = match script.get(i..i + 2) {
            Some(b) => usize::from(u16::from_le_bytes([b[0], b[1]])),
            None => 0,
        };
        i = (i + 2).min(script.len());
        let end = i.saturating_add(len).min(script.len());
        let payload = &script[i..end];
        i = end;
        let kind = op & 0x0f;
        let mode = op >> 4;
        let body: Vec<u8> = match mode {
            14 => {
                out.extend_from_slice(payload);
                continue;
            }
            15 => template(kind, payload),
            _ => payload.to_vec(),
        };
        let frame_seq = if mode == 13 { seq.wrapping_add(1) } else { seq };
        let mut header = [0u8; FRAME_HEADER_LEN];
        header[0..2].copy_from_slice(&livemig::protocol::FRAME_MAGIC.to_le_bytes());
        header[2] = if mode == 15 && kind == 0 {
            MsgKind::Probe as u8
        } else {
            kind
        };
        header[4..8].copy_from_slice(&frame_seq.to_le_bytes());
        header[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
        let mut crc = crc32c_software(&header[..12], &body);
        if mode == 12 {
            crc ^= 1;
        }
        header[12..16].copy_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&body);
        seq = seq.wrapping_add(1);
    }
    out
}

/// CRC-32C (Castagnoli: reflected, polynomial 0x82F63B78, init and xorout
/// 0xffffffff) of `a` then `b`: an implementation independent of the one
/// livemig uses, table driven.
pub fn crc32c_software(a: &[u8], b: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                let mask = (c & 1).wrapping_neg();
                c = (c >> 1) ^ (0x82F6_3B78 & mask);
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &byte in a.iter().chain(b) {
        crc = table[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

fn template(kind: u8, payload: &[u8]) -> Vec<u8> {
    match kind {
        1 => {
            let mut h = Hello::new(description());
            h.probe = payload.first().is_some_and(|b| b & 1 == 1);
            encode(&h)
        }
        0 => {
            let id = payload.first().copied().map_or(0, u32::from);
            let pad = payload.get(1).copied().map_or(0, u32::from);
            let mut v = encode(&livemig::protocol::Probe { id, pad });
            if let (Some(&b), true) = (payload.get(2), pad > 0) {
                if let Some(last) = v.last_mut() {
                    *last = b;
                }
            }
            v
        }
        5 => {
            let version = payload.first().copied().map_or(1, u32::from);
            let data = payload.get(1..).unwrap_or_default().to_vec();
            let s = State {
                sections: vec![Section::new("soft.writers", version, data)],
            };
            encode(&s)
        }
        3 => {
            let mut v = Vec::new();
            for r in payload.chunks_exact(4) {
                let (page, npages, kind, fill) = (r[0], r[1], r[2], r[3]);
                let gpa = if page & 0x80 != 0 {
                    REGION1 + u64::from(page & 0x7f) * PAGE_SIZE
                } else {
                    u64::from(page) * PAGE_SIZE
                };
                let data = if kind == 1 {
                    pages(usize::from(npages.min(32)), fill)
                } else {
                    Vec::new()
                };
                v.extend(record(gpa, u32::from(npages), kind, &data));
            }
            v
        }
        _ => Vec::new(),
    }
}

// ---------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------

/// A reader over `data` that returns at most `max` bytes per call and fails
/// with a timeout every `every` calls (0 = never).
struct Chunky<'a> {
    data: &'a [u8],
    pos: usize,
    max: usize,
    every: u32,
    calls: u32,
}

impl<'a> Chunky<'a> {
    /// `data` in reads of 1 byte to 32 KiB (`mode`'s low 4 bits) with a
    /// timeout every n-th call (its high 4 bits; never on every call: no
    /// progress at all).
    fn new(data: &'a [u8], mode: u8) -> Self {
        Chunky {
            data,
            pos: 0,
            max: 1 << (mode & 0x0f),
            every: match mode >> 4 {
                1 => 2,
                n => u32::from(n),
            },
            calls: 0,
        }
    }
}

impl Read for Chunky<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.calls += 1;
        if self.calls.checked_rem(self.every) == Some(0) {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let n = buf.len().min(self.max).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// What a reader produced: each frame's kind, seq and payload, then the
/// final error's text.
fn read_all<R: Read>(
    fr: &mut FrameReader<R>,
    retry_timeouts: bool,
) -> (Vec<(MsgKind, u32, Vec<u8>)>, String) {
    let mut got = Vec::new();
    let mut timeouts = 0u32;
    let max = fr.max_payload();
    loop {
        match fr.read_frame() {
            Ok(f) => {
                assert_eq!(f.seq, got.len() as u32, "frame seq");
                assert!(f.payload.len() <= max, "payload over the limit");
                got.push((f.kind, f.seq, f.payload.to_vec()));
            }
            Err(e) if e.is_timeout() && retry_timeouts && timeouts < 1_000_000 => {
                timeouts += 1;
            }
            Err(e) => {
                assert!(!e.is_timeout(), "timeout without timeouts: {e}");
                // A failed reader stays failed.
                let again = fr.read_frame().map(|f| f.kind);
                assert!(
                    matches!(again, Err(ProtocolError::Broken { .. })),
                    "reader usable after {e}: {again:?}"
                );
                return (got, e.to_string());
            }
        }
    }
}

/// Payload limit of the readers in [`frame_reader`] (small, so that a
/// header claiming the protocol's 8 MiB does not cost a large allocation
/// per run; the limit check itself is the same).
const FUZZ_MAX_PAYLOAD: usize = 1 << 16;

/// `FrameReader` over arbitrary bytes: every frame it returns has a valid
/// header, crc and seq (checked against an independent parser), a failed
/// reader stays failed, and reading in pieces with timeouts in between
/// yields exactly what reading in one go yields.
pub fn frame_reader(data: &[u8]) {
    let (mode, data) = match data.split_first() {
        Some((m, d)) => (*m, d),
        None => return,
    };
    let mut plain = FrameReader::new(data).with_max_payload(FUZZ_MAX_PAYLOAD);
    let (frames, err) = read_all(&mut plain, false);
    assert!(plain.bytes_read() <= data.len() as u64);
    // Independent check of every frame returned.
    let mut off = 0usize;
    for (kind, seq, payload) in &frames {
        let h = &data[off..off + FRAME_HEADER_LEN];
        assert_eq!(h[0..2], livemig::protocol::FRAME_MAGIC.to_le_bytes());
        assert_eq!(h[2], *kind as u8);
        assert_eq!(h[3], 0);
        assert_eq!(u32::from_le_bytes([h[4], h[5], h[6], h[7]]), *seq);
        assert_eq!(
            u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize,
            payload.len()
        );
        let crc = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        assert_eq!(crc, crc32c_software(&h[..12], payload), "crc");
        assert_eq!(
            &data[off + FRAME_HEADER_LEN..off + FRAME_HEADER_LEN + payload.len()],
            &payload[..]
        );
        off += FRAME_HEADER_LEN + payload.len();
    }
    // The same bytes in pieces, with timeouts in between.
    let mut pieces = FrameReader::new(Chunky::new(data, mode)).with_max_payload(FUZZ_MAX_PAYLOAD);
    let (frames2, err2) = read_all(&mut pieces, true);
    assert_eq!(frames, frames2, "frames differ when read in pieces");
    assert_eq!(err, err2, "errors differ when read in pieces");
    // The same pieces, with `Pages` payloads read into a sink (as the
    // destination reads them into guest memory) in slices of odd sizes.
    let mut sunk = FrameReader::new(Chunky::new(data, mode)).with_max_payload(FUZZ_MAX_PAYLOAD);
    let (frames3, err3) = read_all_into(&mut sunk, usize::from(mode % 13) + 1);
    assert_eq!(frames, frames3, "frames differ when read into a sink");
    assert_eq!(err, err3, "errors differ when read into a sink");
}

/// A [`PayloadSink`] that takes `Pages` payloads in slices of at most
/// `step` bytes.
struct Collect {
    step: usize,
    got: Vec<u8>,
    open: bool,
    slice: Vec<u8>,
}

impl PayloadSink for Collect {
    fn begin(&mut self, kind: MsgKind, _len: usize) -> bool {
        self.open = kind == MsgKind::Pages;
        self.got.clear();
        self.open
    }
    fn next_buf(&mut self, left: usize) -> Option<&mut [u8]> {
        self.slice.resize(self.step.min(left), 0);
        Some(&mut self.slice)
    }
    fn advance(&mut self, n: usize) {
        self.got.extend_from_slice(&self.slice[..n]);
    }
}

/// [`read_all`] (retrying timeouts) through [`FrameReader::read_frame_into`].
fn read_all_into<R: Read>(
    fr: &mut FrameReader<R>,
    step: usize,
) -> (Vec<(MsgKind, u32, Vec<u8>)>, String) {
    let mut sink = Collect {
        step,
        got: Vec::new(),
        open: false,
        slice: Vec::new(),
    };
    let mut got = Vec::new();
    let mut timeouts = 0u32;
    loop {
        match fr.read_frame_into(&mut sink) {
            Ok(f) => {
                let payload = if sink.open {
                    assert!(f.payload.is_empty(), "streamed frame with a payload");
                    sink.open = false;
                    std::mem::take(&mut sink.got)
                } else {
                    f.payload.to_vec()
                };
                got.push((f.kind, f.seq, payload));
            }
            Err(e) if e.is_timeout() && timeouts < 1_000_000 => timeouts += 1,
            Err(e) => {
                let again = fr.read_frame_into(&mut sink).map(|f| f.kind);
                assert!(
                    matches!(again, Err(ProtocolError::Broken { .. })),
                    "reader usable after {e}: {again:?}"
                );
                return (got, e.to_string());
            }
        }
    }
}

/// Decoded, re-encoded and decoded again: the same message.
fn round_trip<M: Message + PartialEq + std::fmt::Debug>(payload: &[u8]) -> Option<M> {
    let m = M::decode(payload).ok()?;
    let again = match m.encode() {
        Ok(b) => b,
        Err(e) => panic!("{}: decoded {m:?} but cannot encode it: {e}", M::KIND),
    };
    match M::decode(&again) {
        Ok(m2) => assert_eq!(m, m2, "{}: re-encoding changed the message", M::KIND),
        Err(e) => panic!("{}: re-encoded {m:?} does not decode: {e}", M::KIND),
    }
    Some(m)
}

/// `Hello::decode` over arbitrary bytes.
pub fn decode_hello(data: &[u8]) {
    if let Some(h) = round_trip::<Hello>(data) {
        // A decoded Hello always has a version this side speaks.
        assert!(h.negotiated_version().is_ok());
        assert!(h.desc.vcpus >= 1);
    }
}

/// `State::decode` over arbitrary bytes; every section's data is then read
/// with a [`StateReader`] in a pattern taken from the data.
pub fn decode_state(data: &[u8]) {
    let Some(s) = round_trip::<State>(data) else {
        return;
    };
    for sec in &s.sections {
        assert!(sec.data.len() <= livemig::state::MAX_SECTION_LEN);
        let mut r = StateReader::new(&sec.name, &sec.data);
        for (i, op) in sec.data.iter().enumerate().take(64) {
            let ok = match op % 5 {
                0 => r.u8().is_ok(),
                1 => r.u16().is_ok(),
                2 => r.u32().is_ok(),
                3 => r.u64().is_ok(),
                _ => r.bytes(i).is_ok(),
            };
            if !ok {
                break;
            }
        }
        let _ = r.finish();
    }
}

/// `page_records` over arbitrary bytes: records are well formed, the
/// iterator stops after the first error, `check` agrees with the layout,
/// and a batch rebuilt from the records describes the same pages.
pub fn page_records_target(data: &[u8]) {
    let layout = layout();
    let mut recs = Vec::new();
    let mut it = page_records(data);
    let mut failed = false;
    for r in it.by_ref() {
        match r {
            Ok(rec) => {
                assert!(!failed);
                assert_eq!(rec.gpa % PAGE_SIZE, 0);
                assert!(rec.npages >= 1);
                if let Some(d) = rec.data {
                    assert_eq!(d.len() as u64, rec.len_bytes());
                }
                match rec.check(&layout) {
                    Ok((region, page)) => {
                        let r = layout.regions()[region];
                        assert!(rec.gpa >= r.guest_addr);
                        assert!(rec.gpa + rec.len_bytes() <= r.end());
                        assert_eq!(page, (rec.gpa - r.guest_addr) / PAGE_SIZE);
                    }
                    Err(_) => assert!(layout.locate(rec.gpa, u64::from(rec.npages)).is_none()),
                }
                recs.push(rec);
            }
            Err(_) => failed = true,
        }
    }
    assert!(it.next().is_none(), "iterator not fused");
    // Rebuild (only small ones: a zero record may name 2^32 pages).
    let total: u64 = recs.iter().map(|r| u64::from(r.npages)).sum();
    if failed || total > 256 {
        return;
    }
    let mut batch = livemig::protocol::PageBatch::with_capacity(data.len());
    for r in &recs {
        let pushed = match r.data {
            Some(d) => batch.push_data(r.gpa, r.npages, d),
            None => batch.push_zero(r.gpa, r.npages),
        };
        if let Err(e) = pushed {
            panic!("a decoded record cannot be encoded again: {e}");
        }
    }
    let expand = |bytes: &[u8]| -> Vec<(u64, Option<Vec<u8>>)> {
        let mut v = Vec::new();
        for r in page_records(bytes) {
            let r = r.unwrap_or_else(|e| panic!("rebuilt batch does not decode: {e}"));
            for p in 0..u64::from(r.npages) {
                let page = r.data.map(|d| {
                    let o = (p * PAGE_SIZE) as usize;
                    d[o..o + PAGE_SIZE as usize].to_vec()
                });
                v.push((r.gpa + p * PAGE_SIZE, page));
            }
        }
        v
    };
    assert_eq!(expand(data), expand(batch.as_bytes()));
}

/// Every other decoder: the first byte picks the message, the rest is the
/// payload.
pub fn decode_messages(data: &[u8]) {
    let Some((k, payload)) = data.split_first() else {
        return;
    };
    match k % 13 {
        0 => drop(round_trip::<HelloReply>(payload)),
        1 => drop(round_trip::<RoundEnd>(payload)),
        2 => drop(round_trip::<Complete>(payload)),
        3 => drop(round_trip::<Ready>(payload)),
        4 => drop(round_trip::<Go>(payload)),
        5 => drop(round_trip::<Resumed>(payload)),
        6 => drop(round_trip::<ErrorMsg>(payload)),
        7 => drop(round_trip::<Cancel>(payload)),
        8 => decode_hello(payload),
        9 => decode_state(payload),
        10 => drop(round_trip::<livemig::protocol::Probe>(payload)),
        11 => drop(round_trip::<livemig::protocol::ProbeReply>(payload)),
        _ => page_records_target(payload),
    }
}

/// What [`receive_stream`] saw.
#[derive(Debug)]
pub struct Received {
    /// What `receive` returned (the VM itself is dropped).
    pub result: Result<ReceiveReport, MigrationError>,
    /// Whether the VM was created (the handshake passed).
    pub created: bool,
    /// Bytes the receiver wrote back.
    pub replied: u64,
}

/// Feeds `stream` to `livemig::Reception` with a [`SoftVm`] factory for
/// [`layout`] (anything else is refused), then checks the destination's
/// memory byte for byte against a model of what the stream may write.
pub fn receive_stream(stream: &[u8]) -> Received {
    let t = ScriptTransport::new(stream.to_vec());
    let probe = t.clone();
    let slot: Arc<Mutex<Option<GuestRam>>> = Arc::new(Mutex::new(None));
    let keep = slot.clone();
    let cfg = ReceiveConfig {
        io_timeout: Duration::from_secs(1),
    };
    let idle = SoftConfig::idle();
    let result = Reception::new(Box::new(t))
        .config(cfg)
        .run(move |desc| {
            if desc.layout != layout() {
                return Err(VmError::Incompatible(format!(
                    "this destination hosts {:?}, not {:?}",
                    layout().regions(),
                    desc.layout.regions()
                )));
            }
            let vm = SoftVm::new(&desc.layout, &idle)?;
            *lock(&keep) = vm.ram().cloned();
            Ok(vm)
        })
        .map(|(_vm, report)| report);
    let ram = lock(&slot).take();
    if let Some(ram) = &ram {
        check_memory(stream, ram, result.is_ok());
    }
    Received {
        result,
        created: ram.is_some(),
        replied: probe.written(),
    }
}

/// Replays what the receiver does with memory on a model (one byte vector
/// per region) and compares it with the real memory: every page must hold
/// exactly what the stream put there, and every other page must be zero.
///
/// Where the receiver reads `Pages` frames straight into guest memory and
/// checks their CRC at the end
/// ([`livemig::testing::PAGES_READ_INTO_GUEST_MEMORY`]), the pages the
/// failing frame's records name (those that passed the record checks) may
/// hold anything when the run failed (`ok` false): the destination of a
/// failed migration never runs. Where it reads frames whole first, a frame
/// that fails writes nothing, and every page is checked.
fn check_memory(stream: &[u8], ram: &GuestRam, ok: bool) {
    let layout = layout();
    let mut model: Vec<Vec<u8>> = layout
        .regions()
        .iter()
        .map(|r| vec![0u8; r.size as usize])
        .collect();
    // Per region and page: may hold anything.
    let mut wild: Vec<Vec<bool>> = layout
        .regions()
        .iter()
        .map(|r| vec![false; r.pages() as usize])
        .collect();
    let mut fr = FrameReader::new(stream);
    // The Hello was accepted (the VM exists); the probe was granted if it
    // offered it.
    let probe = fr
        .read_frame()
        .ok()
        .and_then(|f| Hello::decode(f.payload).ok())
        .is_some_and(|h| h.probe);
    let mut states = 0;
    loop {
        let at = fr.bytes_read() as usize;
        let Ok(f) = fr.read_frame() else {
            if !ok && livemig::testing::PAGES_READ_INTO_GUEST_MEMORY {
                mark_wild(&layout, failed_frame_payload(stream, at), &mut wild);
            }
            break;
        };
        let good = match f.kind {
            MsgKind::Pages => apply_model(&layout, f.payload, &mut model),
            MsgKind::RoundEnd => RoundEnd::decode(f.payload).is_ok(),
            MsgKind::Probe => {
                probe && states == 0 && livemig::protocol::Probe::decode(f.payload).is_ok()
            }
            MsgKind::State => {
                states += 1;
                states <= 1 && State::decode(f.payload).is_ok()
            }
            _ => false,
        };
        if !good {
            break;
        }
    }
    for (i, r) in layout.regions().iter().enumerate() {
        let mut got = vec![0u8; r.size as usize];
        if let Err(e) = ram.read_slice(&mut got, GuestAddress(r.guest_addr)) {
            panic!("reading region {i}: {e}");
        }
        let differs = got
            .chunks(PAGE_SIZE as usize)
            .zip(model[i].chunks(PAGE_SIZE as usize))
            .enumerate()
            .position(|(p, (a, b))| a != b && !wild[i][p]);
        if let Some(page) = differs {
            panic!(
                "guest memory differs from what the stream wrote: region {i} page {page} (gpa 0x{:x})",
                r.guest_addr + page as u64 * PAGE_SIZE
            );
        }
    }
}

/// Applies a `Pages` payload's records to the model, up to the first bad
/// one; whether all were good.
fn apply_model(layout: &MemoryLayout, payload: &[u8], model: &mut [Vec<u8>]) -> bool {
    for rec in page_records(payload) {
        let Ok(rec) = rec else { return false };
        let Ok((region, page)) = rec.check(layout) else {
            return false;
        };
        let at = (page * PAGE_SIZE) as usize;
        let len = rec.len_bytes() as usize;
        match rec.data {
            Some(d) => model[region][at..at + len].copy_from_slice(d),
            None => model[region][at..at + len].fill(0),
        }
    }
    true
}

/// The payload of the `Pages` frame at `at` in `stream` that failed, as
/// long as its header says (the bytes the stream lacks read as zero), or
/// nothing if it is not a `Pages` frame.
fn failed_frame_payload(stream: &[u8], at: usize) -> Vec<u8> {
    let Some(h) = stream.get(at..at + FRAME_HEADER_LEN) else {
        return Vec::new();
    };
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
    if h[2] != MsgKind::Pages as u8 || len > livemig::protocol::MAX_FRAME_PAYLOAD {
        return Vec::new();
    }
    let start = at + FRAME_HEADER_LEN;
    let have = stream.len().saturating_sub(start).min(len);
    let mut payload = stream[start..start + have].to_vec();
    payload.resize(len, 0);
    payload
}

/// Marks the pages every well-formed record of `payload` names (up to the
/// first bad one) as possibly holding anything.
fn mark_wild(layout: &MemoryLayout, payload: Vec<u8>, wild: &mut [Vec<bool>]) {
    for rec in page_records(&payload) {
        let Ok(rec) = rec else { return };
        let Ok((region, page)) = rec.check(layout) else {
            return;
        };
        for p in page..page + u64::from(rec.npages) {
            wild[region][p as usize] = true;
        }
    }
}

/// The whole receiver over an arbitrary byte stream.
pub fn receive_raw(data: &[u8]) {
    let r = receive_stream(data);
    if r.result.is_ok() {
        assert!(r.created);
    }
}

/// The whole receiver over a stream built by [`frames_from_script`].
pub fn receive_frames(data: &[u8]) {
    let stream = frames_from_script(data);
    let r = receive_stream(&stream);
    if r.result.is_ok() {
        assert!(r.created);
    }
}

// ---------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------

/// Starting inputs for every target: `(target, name, bytes)`.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let valid = valid_frames();
    let stream = valid_stream();
    out.push((
        "frame_reader",
        "valid".to_string(),
        [&[0x27u8][..], &stream].concat(),
    ));
    out.push(("receive_raw", "valid".to_string(), stream.clone()));
    // A stream cut after every frame.
    let mut off = 0;
    for (i, (_, p)) in valid.iter().enumerate() {
        off += FRAME_HEADER_LEN + p.len();
        if i + 1 < valid.len() {
            out.push(("receive_raw", format!("cut-{i}"), stream[..off].to_vec()));
        }
    }
    for (kind, payload) in &valid {
        match kind {
            MsgKind::Hello => out.push(("decode_hello", "valid".into(), payload.clone())),
            MsgKind::State => out.push(("decode_state", "valid".into(), payload.clone())),
            MsgKind::Pages => out.push((
                "page_records",
                format!("valid-{}", payload.len()),
                payload.clone(),
            )),
            _ => {}
        }
    }
    let mut full = description();
    full.nics.push(livemig::vm::NicInfo {
        mac: [0x52, 0x54, 0, 1, 2, 3],
        ipv4: Some([10, 0, 0, 2]),
    });
    full.properties
        .insert("kvm.cpuid".into(), "0123abcd".into());
    out.push(("decode_hello", "nics".into(), encode(&Hello::new(full))));
    let msgs: Vec<(u8, Vec<u8>)> = vec![
        (0, encode(&HelloReply::refused("memory differs".into()))),
        (1, encode(&RoundEnd { round: 3, pages: 7 })),
        (2, Vec::new()),
        (3, encode(&Ready { restore_us: 1234 })),
        (4, Vec::new()),
        (5, encode(&Resumed { resume_us: 99 })),
        (6, encode(&ErrorMsg::new("completion", "restore failed"))),
        (7, Vec::new()),
    ];
    for (k, p) in msgs {
        out.push((
            "decode_messages",
            format!("kind-{k}"),
            [&[k][..], &p].concat(),
        ));
    }
    // Scripts: the valid migration, built from templates.
    let op = |mode: u8, kind: u8, payload: &[u8]| -> Vec<u8> {
        let mut v = vec![(mode << 4) | kind];
        v.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        v.extend_from_slice(payload);
        v
    };
    let round0 = encode(&RoundEnd { round: 0, pages: 3 });
    let mut state = vec![1u8];
    state.extend_from_slice(&soft_section().data);
    let script = [
        op(15, 1, &[]),
        op(15, 3, &[0, 2, 1, 0xaa, 0x81, 1, 1, 0xbb, 4, 1, 0, 0]),
        op(0, 4, &round0),
        op(15, 5, &state),
        op(0, 6, &[]),
        op(0, 8, &[]),
    ]
    .concat();
    out.push(("receive_frames", "valid".into(), script));
    // The same with the switchover probe offered and two probes answered
    // (one padded) between the rounds.
    let round1 = encode(&RoundEnd { round: 1, pages: 1 });
    let script = [
        op(15, 1, &[1]),
        op(15, 3, &[0, 2, 1, 0xaa, 0x81, 1, 1, 0xbb, 4, 1, 0, 0]),
        op(0, 4, &round0),
        op(15, 0, &[0, 0]),
        op(15, 0, &[1, 200]),
        op(15, 3, &[7, 1, 1, 0xcc]),
        op(0, 4, &round1),
        op(15, 5, &state),
        op(0, 6, &[]),
        op(0, 8, &[]),
    ]
    .concat();
    out.push(("receive_frames", "probed".into(), script));
    // A compressed Pages payload (as PagesLz4 carries), and one whose
    // claimed size is wrong.
    if let Some((_, pages)) = valid.iter().find(|(k, _)| *k == MsgKind::Pages) {
        let mut z = Vec::new();
        livemig::protocol::compress_pages(pages, &mut z);
        out.push(("decompress_pages", "valid".into(), z.clone()));
        if z.len() >= 4 {
            z[0] ^= 1;
            out.push(("decompress_pages", "wrong-size".into(), z));
        }
    }
    out
}

/// `PagesLz4` payloads: [`decompress_pages`] never panics, never produces
/// more than the claimed size (at most the frame limit), and what it accepts
/// round-trips through [`compress_pages`]; the decoded payload then goes
/// through the page-record checks.
pub fn decompress_pages_target(data: &[u8]) {
    use livemig::protocol::{compress_pages, decompress_pages, MAX_FRAME_PAYLOAD};
    let mut out = Vec::new();
    if decompress_pages(data, &mut out).is_ok() {
        assert!(out.len() <= MAX_FRAME_PAYLOAD);
        let claimed = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        assert_eq!(out.len(), claimed);
        let mut z = Vec::new();
        compress_pages(&out, &mut z);
        let mut back = Vec::new();
        decompress_pages(&z, &mut back).expect("own compression must decode");
        assert_eq!(back, out);
        page_records_target(&out);
    }
    // Compressing arbitrary bytes always decodes back to them.
    let mut z = Vec::new();
    compress_pages(data, &mut z);
    let mut back = Vec::new();
    decompress_pages(&z, &mut back).expect("own compression must decode");
    assert_eq!(back, data);
}
