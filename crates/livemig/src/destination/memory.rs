//! The memory phase: where pages go ([`PageSink`]) and the readers of the
//! control connection and of each page stream.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::bitmap::DirtyBitmap;
use crate::control::{unexpected, ControlReader, ControlWriter};
use crate::error::InternalError;
use crate::error::{ErrorKind, MigrationError, PeerError, Phase};
use crate::memory::{MemoryLayout, PAGE_SIZE};
use crate::protocol::{
    decompress_pages, page_records, stream_of, FrameReader, Message, MsgKind, PageRecord,
    PostcopyPrepare, Probe, ProbeReply, ProtocolError, ReadCount, ReadQuery, RoundEnd, State,
    MAX_STATE_FRAMES, STREAM_CHUNK_PAGES,
};
use crate::ram::HostRam;
use crate::report::ReceiveProgress;
use crate::state::Section;
use crate::transport::Transport;

use super::fill::Fill;

/// Whether migrations read `Pages` frames straight into guest memory.
/// Off: measured end to end on a quiet machine (`cargo bench --bench
/// engine`, one stream, 512 MiB, the same binary with and without,
/// 2026-12-02), the direct path was *slower* into 4 KiB-page memory —
/// 433–476 against 340–357 ms into fresh memory, 460 against 371 ms into
/// populated memory — and equal into THP memory (289 against 293 ms),
/// although the receive path alone, without a socket, is 30 % faster. Why
/// (reads into guest pages from the socket against one copy in user space)
/// is not known; until it is, the buffered path stays.
pub(crate) const DIRECT_PAGES: bool = false;

/// Where one connection's pages go: guest memory, with the bookkeeping of
/// which pages received data (the fresh memory is zero, so a zero marker for
/// a page never written costs nothing and must not touch, i.e. allocate, the
/// page) and a buffer for decompressing `PagesLz4` frames.
///
/// `Pages` frames are read straight into guest memory when `direct` is set
/// (see `destination::direct`); `PagesLz4` frames, and `Pages` frames read
/// whole, go through [`PageSink::apply`]. `direct` is off in every
/// migration ([`DIRECT_PAGES`]); the tests exercise both paths.
pub(super) struct PageSink<'a> {
    pub(super) layout: &'a MemoryLayout,
    pub(super) ram: &'a HostRam<'a>,
    pub(super) written: DirtyBitmap,
    /// Data pages and zero markers applied.
    pub(super) pages: u64,
    pub(super) zero: u64,
    pub(super) scratch: Vec<u8>,
    /// `Some((index, streams))`: every record must belong to that page
    /// stream (see [`stream_of`]).
    pub(super) stream: Option<(u32, u32)>,
    /// Whether to take `Pages` frames straight into guest memory.
    pub(super) direct: bool,
    /// The `Pages` frame being read into guest memory.
    pub(super) rx: Option<super::direct::Streamed>,
    /// Pages this sink never wrote are filled by `UFFDIO_COPY` (see
    /// `destination::fill`; then `direct` stays off).
    pub(super) fill: Option<&'a Fill>,
    /// Whether `PagesGather` frames were granted (others are refused).
    pub(super) gather: bool,
    /// Pages whose last copy arrived torn (a `PagesGather` page that failed
    /// its CRC) and was not installed: each must be followed by an intact
    /// copy before memory is complete (`destination::gather`).
    pub(super) torn: DirtyBitmap,
    /// Torn pages received (each time one arrived torn).
    pub(super) torn_pages: u64,
    /// Which pages of the `PagesGather` record being applied are intact.
    pub(super) intact: Vec<bool>,
}

impl<'a> PageSink<'a> {
    pub(super) fn new(
        layout: &'a MemoryLayout,
        ram: &'a HostRam<'a>,
        stream: Option<(u32, u32)>,
        fill: Option<&'a Fill>,
    ) -> Self {
        PageSink {
            layout,
            ram,
            written: DirtyBitmap::new(layout),
            pages: 0,
            zero: 0,
            scratch: Vec::new(),
            stream,
            direct: DIRECT_PAGES && fill.is_none(),
            rx: None,
            fill,
            gather: false,
            torn: DirtyBitmap::new(layout),
            torn_pages: 0,
            intact: Vec::new(),
        }
    }

    /// Applies one `Pages` or `PagesLz4` frame `read_frame_into` returned:
    /// the end of one streamed into guest memory, or one read whole.
    pub(super) fn complete(&mut self, kind: MsgKind, payload: &[u8]) -> Result<(), ErrorKind> {
        match self.rx.take() {
            Some(rx) => rx.finish(),
            None => self.apply(kind, payload),
        }
    }

    /// Applies one `Pages` or `PagesLz4` frame read whole.
    pub(super) fn apply(&mut self, kind: MsgKind, payload: &[u8]) -> Result<(), ErrorKind> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let r = if kind == MsgKind::PagesLz4 {
            decompress_pages(payload, &mut scratch)
                .map_err(ErrorKind::from)
                .and_then(|_| self.apply_records(&scratch))
        } else if kind == MsgKind::PagesGather {
            self.apply_gather(payload)
        } else {
            self.apply_records(payload)
        };
        self.scratch = scratch;
        r
    }

    pub(super) fn apply_records(&mut self, payload: &[u8]) -> Result<(), ErrorKind> {
        for rec in page_records(payload) {
            let rec = rec?;
            let (region, page) = self.place(rec.gpa, rec.npages)?;
            match rec.data {
                Some(data) => {
                    self.write_data(region, page, data).map_err(|e| match e {
                        Some(e) => InternalError::Fill(e).into(),
                        None => outside(rec.gpa, rec.npages),
                    })?;
                    self.take_data(region, page, rec.npages);
                }
                None => self.apply_zero(region, page, rec.gpa, rec.npages)?,
            }
        }
        Ok(())
    }

    /// Writes a placed data record's pages: runs of pages this sink never
    /// wrote through the fill where there is one (they are not present:
    /// only [`Fill::copy`] may touch them), the others (and every page
    /// without a fill) by a plain copy. `Err(None)` if out of bounds,
    /// `Err(Some(_))` if the fill failed.
    pub(super) fn write_data(
        &self,
        region: usize,
        page: u64,
        data: &[u8],
    ) -> Result<(), Option<std::io::Error>> {
        let plain = |p: u64, d: &[u8]| self.ram.write_pages(region, p, d).then_some(()).ok_or(None);
        let Some(fill) = self.fill else {
            return plain(page, data);
        };
        let n = data.len() as u64 / PAGE_SIZE;
        let mut at = 0;
        while at < n {
            let written = self.written.is_set(region, page + at);
            let mut end = at + 1;
            while end < n && self.written.is_set(region, page + end) == written {
                end += 1;
            }
            let fresh = !written;
            let d = &data[(at * PAGE_SIZE) as usize..(end * PAGE_SIZE) as usize];
            if !(fresh && fill.copy(self.ram, region, page + at, d).map_err(Some)?) {
                plain(page + at, d)?;
            }
            at = end;
        }
        Ok(())
    }

    /// Where the record's pages lie (region, first page), checked against
    /// the layout and, on a page stream, against the stream they belong to.
    pub(super) fn place(&self, gpa: u64, npages: u32) -> Result<(usize, u64), ErrorKind> {
        let rec = PageRecord {
            gpa,
            npages,
            data: None,
        };
        let (region, page) = rec.check(self.layout)?;
        if let Some((index, streams)) = self.stream {
            let last = page + u64::from(npages).saturating_sub(1);
            if page / STREAM_CHUNK_PAGES != last / STREAM_CHUNK_PAGES
                || stream_of(self.layout, region, page, streams) != index
            {
                return Err(PeerError::WrongStream { gpa, npages, index }.into());
            }
        }
        Ok((region, page))
    }

    /// Counts a placed data record's pages as written.
    pub(super) fn take_data(&mut self, region: usize, page: u64, npages: u32) {
        let n = u64::from(npages);
        self.pages += n;
        self.written.set_range(region, page, n);
        self.torn.clear_range(region, page, n);
    }

    /// Applies a placed zero record: zeroes the pages that received data.
    pub(super) fn apply_zero(
        &mut self,
        region: usize,
        page: u64,
        gpa: u64,
        npages: u32,
    ) -> Result<(), ErrorKind> {
        let n = u64::from(npages);
        self.zero += n;
        let mut ok = true;
        for p in page..page + n {
            if self.written.is_set(region, p) {
                ok &= self.ram.zero_pages(region, p, 1);
                self.written.unset(region, p);
            }
            self.torn.unset(region, p);
        }
        if !ok {
            return Err(outside(gpa, npages));
        }
        Ok(())
    }
}

/// The error of a record that does not fit in guest memory.
pub(super) fn outside(gpa: u64, npages: u32) -> ErrorKind {
    PeerError::OutsideMemory { gpa, npages }.into()
}

/// What the page-stream threads share with the control loop.
pub(super) struct StreamShared<'f> {
    /// The first failure of any stream.
    pub(super) error: Mutex<Option<(u32, ErrorKind)>>,
    /// Set when the control loop gives up (stream threads stop).
    pub(super) abort: AtomicBool,
    /// The fresh-memory fill, if on.
    pub(super) fill: Option<&'f Fill>,
    /// `PagesGather` frames granted.
    pub(super) gather: bool,
    /// Bytes of whole frames the page streams read and applied, all
    /// together (for the read count).
    pub(super) read: AtomicU64,
}

/// One page stream: applies pages until `Complete`.
pub(super) fn stream_reader(
    index: u32,
    streams: u32,
    mut fr: FrameReader<Box<dyn Transport>>,
    layout: &MemoryLayout,
    ram: &HostRam<'_>,
    shared: &StreamShared<'_>,
    control: Option<Box<dyn Transport>>,
) -> StreamCounts {
    let mut sink = PageSink::new(layout, ram, Some((index, streams)), shared.fill);
    sink.gather = shared.gather;
    let mut counted = 0;
    // The source closed this stream between two frames.
    let mut closed = false;
    let r: Result<(), ErrorKind> = loop {
        let read = fr.bytes_read();
        shared.read.fetch_add(read - counted, Ordering::SeqCst);
        counted = read;
        if shared.abort.load(Ordering::SeqCst) {
            break Ok(());
        }
        let f = match fr.read_frame_into(&mut sink) {
            Ok(f) => f,
            Err(e) => {
                closed = e.is_clean_eof();
                break Err(e.into());
            }
        };
        match f.kind {
            MsgKind::Pages | MsgKind::PagesLz4 | MsgKind::PagesGather => {
                if let Err(e) = sink.complete(f.kind, f.payload) {
                    break Err(e);
                }
            }
            MsgKind::Keepalive => {}
            MsgKind::Complete => break sink.check_torn(),
            other => {
                break Err(ErrorKind::Unexpected {
                    got: format!("{other:?}"),
                    expected: "Pages, Keepalive or Complete",
                })
            }
        }
    };
    // A stream the control loop stopped (it gave up first and shut the
    // streams down) did not fail: its read error is that shutdown.
    match r {
        Err(kind) if !shared.abort.load(Ordering::SeqCst) => {
            shared.fail(index, kind);
            // Wake the control loop up — unless the source closed this
            // stream between two frames: a source that gives up does so
            // after it sent its reason on the control connection (or by
            // going away, which ends that connection too), and a shutdown
            // now could lose the reason not yet read there.
            if let Some(c) = control.filter(|_| !closed) {
                let _ = c.shutdown();
            }
        }
        _ => {}
    }
    StreamCounts {
        pages: sink.pages,
        zero: sink.zero,
        bytes: fr.bytes_read(),
        torn: sink.torn_pages,
    }
}

/// What one page stream received ([`stream_reader`]).
pub(super) struct StreamCounts {
    pages: u64,
    zero: u64,
    bytes: u64,
    torn: u64,
}

/// What the memory phase received.
#[derive(Debug, Default)]
pub(super) struct Received {
    /// The state sections, complete.
    pub(super) sections: Vec<Section>,
    /// Data pages and zero markers applied, on every connection.
    pub(super) pages: u64,
    pub(super) zero: u64,
    /// Bytes read on the page streams (the control connection's are
    /// counted at the end).
    pub(super) stream_bytes: u64,
    /// Rounds announced by the source.
    pub(super) rounds: u32,
    /// The source switched to post-copy: the pages to drop
    /// (`destination::postcopy`; refused unless post-copy was granted).
    pub(super) switch: Option<crate::protocol::PostcopySwitch>,
    /// Pages installed by `UFFDIO_COPY` (`destination::fill`).
    pub(super) filled: u64,
    /// `PagesGather` pages that arrived torn (each later sent again intact).
    pub(super) torn: u64,
}

/// What the destination does with a `PostcopyPrepare` (drop the pages,
/// arm the installer, answer `PostcopyArmed`); `None` where post-copy's
/// preparation was not granted (the frame is then refused).
pub(super) type OnPrepare<'h> =
    Option<&'h mut dyn FnMut(&PostcopyPrepare) -> Result<(), MigrationError>>;

/// What the memory phase calls out to ([`receive`]).
pub(super) struct Hooks<'h> {
    /// Post-copy's preparation ([`OnPrepare`]).
    pub(super) on_prepare: OnPrepare<'h>,
    /// Where the questions granted in [`Intake`] are answered.
    pub(super) answers: Option<&'h mut ControlWriter>,
    /// The reception's progress callback (`RoundReceived`).
    pub(super) progress: &'h mut dyn FnMut(&ReceiveProgress),
}

/// How the memory phase takes pages ([`receive`]).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Intake {
    /// Fill fresh memory by `UFFDIO_COPY` (`destination::fill`).
    pub(super) fresh_fill: bool,
    /// `PagesGather` frames granted (refused otherwise).
    pub(super) gather: bool,
    /// The switchover probe granted: each `Probe` is answered.
    pub(super) probe: bool,
    /// The read count granted: each `ReadQuery` is answered.
    pub(super) read_count: bool,
}

/// The memory phase: pages on every connection, round ends and the state
/// on the control one, until `Complete`. A failing page stream stops the
/// others and is named as the cause — unless the source said why it gave
/// up (an `Error` frame on the control connection: that reason is
/// returned), or the control loop failed first (its error is returned; the
/// streams it stopped did not fail). Each round end is reported to
/// `hooks.progress`. With `hooks.answers`, the questions granted
/// in `intake` are answered on it: each `ReadQuery` with the bytes of whole
/// frames read so far on every connection. With `probe` (the switchover probe
/// granted) each `Probe` is answered on it at once. A page that arrived
/// torn and was not sent again intact fails it at `Complete`.
pub(super) fn receive(
    control: &mut ControlReader,
    readers: Vec<FrameReader<Box<dyn Transport>>>,
    layout: &MemoryLayout,
    ram: &HostRam<'_>,
    hooks: Hooks<'_>,
    intake: Intake,
) -> Result<Received, MigrationError> {
    let fresh_fill = intake.fresh_fill;
    let streams = readers.len().max(1) as u32;
    // Registered after the scrub, released when this returns (or unwinds):
    // before the state is restored and the guest can run.
    let fill = if fresh_fill {
        Fill::new(ram, layout.regions().len())
    } else {
        None
    };
    let fill = fill.as_ref();
    let shared = StreamShared {
        error: Mutex::new(None),
        abort: AtomicBool::new(false),
        fill,
        gather: intake.gather,
        read: AtomicU64::new(0),
    };
    let handles: Vec<Box<dyn Transport>> = readers
        .iter()
        .filter_map(|r| r.get_ref().try_clone().ok())
        .collect();
    let stop = || {
        shared.abort.store(true, Ordering::SeqCst);
        for t in &handles {
            let _ = t.shutdown();
        }
    };
    std::thread::scope(|s| {
        let mut threads = Vec::new();
        for (i, r) in readers.into_iter().enumerate() {
            let wake = control.transport().try_clone().ok();
            let (shared, index) = (&shared, i as u32);
            let spawned = std::thread::Builder::new()
                .name(format!("livemig-rx{i}"))
                .spawn_scoped(s, move || {
                    stream_reader(index, streams, r, layout, ram, shared, wake)
                });
            match spawned {
                Ok(h) => threads.push(h),
                Err(source) => {
                    stop();
                    let what = "page stream";
                    let e = InternalError::Spawn { what, source };
                    return Err(MigrationError::new(Phase::Handshake, e));
                }
            }
        }
        let mut cl = ControlLoop::new(layout, ram, streams, fill);
        cl.sink.gather = intake.gather;
        cl.probe = intake.probe;
        cl.read_count = intake.read_count.then_some(&shared.read);
        cl.streams_read = Some(&shared.read);
        let r = cl.run(control, hooks);
        if r.is_err() {
            stop();
        }
        let mut got = cl.received();
        for h in threads {
            match h.join() {
                Ok(c) => {
                    got.pages += c.pages;
                    got.zero += c.zero;
                    got.stream_bytes += c.bytes;
                    got.torn += c.torn;
                }
                Err(_) => shared.fail(u32::MAX, InternalError::Panicked.into()),
            }
        }
        // The source's own reason (its `Error` frame) is the cause of
        // whatever its page streams did after it gave up (it closes them
        // once it has said why).
        let r = match r {
            Err(e) if matches!(e.kind, ErrorKind::Remote { .. }) => return Err(e),
            r => r,
        };
        // Otherwise a stream's failure is the real cause of whatever the
        // control connection saw (the stream shut it down).
        if let Some((index, kind)) = shared.error.lock().ok().and_then(|mut g| g.take()) {
            let source = Box::new(kind);
            return Err(MigrationError::new(
                cl.phase,
                ErrorKind::Stream { index, source },
            ));
        }
        got.sections = r?;
        got.switch = cl.switch.take();
        got.filled = fill.map_or(0, Fill::filled);
        Ok(got)
    })
}

impl StreamShared<'_> {
    /// Records the first failure.
    fn fail(&self, index: u32, kind: ErrorKind) {
        if let Ok(mut g) = self.error.lock() {
            g.get_or_insert((index, kind));
        }
    }
}

/// The control connection's part of the memory phase: pages (when they
/// travel here), round ends, the state.
struct ControlLoop<'a> {
    sink: PageSink<'a>,
    phase: Phase,
    streams: u32,
    rounds: u32,
    sections: Option<Vec<Section>>,
    state_frames: usize,
    switch: Option<crate::protocol::PostcopySwitch>,
    /// A `PostcopyPrepare` arrived: the memory is armed, so no `Pages`
    /// may follow and the phase must end with a `PostcopySwitch`.
    prepared: bool,
    /// The switchover probe granted: each `Probe` is answered.
    probe: bool,
    /// The read count granted: each `ReadQuery` is answered with this
    /// connection's bytes read and these, the page streams'.
    read_count: Option<&'a AtomicU64>,
    /// Bytes of whole frames the page streams have read, for
    /// [`ReceiveProgress::RoundReceived`].
    streams_read: Option<&'a AtomicU64>,
}

impl<'a> ControlLoop<'a> {
    fn new(
        layout: &'a MemoryLayout,
        ram: &'a HostRam<'a>,
        streams: u32,
        fill: Option<&'a Fill>,
    ) -> Self {
        ControlLoop {
            sink: PageSink::new(layout, ram, None, fill),
            phase: Phase::Precopy(0),
            streams,
            rounds: 0,
            sections: None,
            state_frames: 0,
            switch: None,
            prepared: false,
            probe: false,
            read_count: None,
            streams_read: None,
        }
    }

    /// Reads until `Complete`; returns the state sections.
    fn run(
        &mut self,
        control: &mut ControlReader,
        hooks: Hooks<'_>,
    ) -> Result<Vec<Section>, MigrationError> {
        let Hooks {
            mut on_prepare,
            mut answers,
            progress,
        } = hooks;
        const EXPECTED: &str = "Pages, RoundEnd, State or Complete";
        loop {
            // Pages could go straight into guest memory only where this is
            // the one connection and the memory is not armed for post-copy
            // (other `Pages` are read whole, to be refused below).
            self.sink.direct =
                DIRECT_PAGES && self.streams <= 1 && !self.prepared && self.sink.fill.is_none();
            let f = control.next_into(self.phase, EXPECTED, &mut self.sink)?;
            let at = |e: ErrorKind| MigrationError::new(self.phase, e);
            match f.kind {
                MsgKind::Pages | MsgKind::PagesLz4 | MsgKind::PagesGather if self.prepared => {
                    // Writing into armed memory would fault on a dropped
                    // page (and nothing serves faults yet).
                    let e = ErrorKind::Unexpected {
                        got: format!("{} after PostcopyPrepare", f.kind),
                        expected: "PostcopySwitch",
                    };
                    return Err(at(e));
                }
                MsgKind::PostcopyPrepare if !self.prepared && self.switch.is_none() => {
                    let Some(hook) = on_prepare.as_mut() else {
                        return Err(unexpected(f.kind, EXPECTED, self.phase));
                    };
                    let p = PostcopyPrepare::decode(f.payload).map_err(|e| at(e.into()))?;
                    for run in &p.discard {
                        run.check(self.sink.layout).map_err(|e| at(e.into()))?;
                    }
                    self.prepared = true;
                    // Post-copy arms its own userfaultfd on this memory.
                    if let Some(fill) = self.sink.fill {
                        let e = |e| at(InternalError::Fill(e).into());
                        fill.release().map_err(e)?;
                    }
                    hook(&p)?;
                }
                MsgKind::Pages | MsgKind::PagesLz4 | MsgKind::PagesGather => {
                    if self.streams > 1 {
                        return Err(at(PeerError::PagesOnControl.into()));
                    }
                    self.sink.complete(f.kind, f.payload).map_err(at)?;
                }
                MsgKind::RoundEnd => {
                    let r = RoundEnd::decode(f.payload).map_err(|e| at(e.into()))?;
                    self.rounds = r.round.saturating_add(1);
                    self.phase = Phase::Precopy(self.rounds);
                    let streams = self.streams_read.map_or(0, |n| n.load(Ordering::SeqCst));
                    progress(&ReceiveProgress::RoundReceived {
                        round: r.round,
                        bytes: control.bytes_read() + streams,
                    });
                }
                MsgKind::Keepalive => {}
                MsgKind::Probe if self.probe && answers.is_some() && self.sections.is_none() => {
                    let p = Probe::decode(f.payload).map_err(|e| at(e.into()))?;
                    if let Some(fw) = answers.as_deref_mut() {
                        let reply = ProbeReply {
                            id: p.id,
                            pad: p.pad,
                        };
                        crate::control::send(fw, &reply, self.phase)?;
                    }
                }
                MsgKind::ReadQuery if answers.is_some() && self.sections.is_none() => {
                    let Some(streams_read) = self.read_count else {
                        return Err(unexpected(f.kind, EXPECTED, self.phase));
                    };
                    let q = ReadQuery::decode(f.payload).map_err(|e| at(e.into()))?;
                    let bytes = control.bytes_read() + streams_read.load(Ordering::SeqCst);
                    if let Some(fw) = answers.as_deref_mut() {
                        let reply = ReadCount { id: q.id, bytes };
                        crate::control::send(fw, &reply, self.phase)?;
                    }
                }
                MsgKind::State => {
                    self.phase = Phase::State;
                    let state = State::decode(f.payload);
                    self.add_state(state)?;
                }
                MsgKind::PostcopySwitch if self.switch.is_none() => {
                    let sw = crate::protocol::PostcopySwitch::decode(f.payload);
                    let sw = sw.map_err(|e| at(e.into()))?;
                    for run in &sw.discard {
                        run.check(self.sink.layout).map_err(|e| at(e.into()))?;
                    }
                    self.switch = Some(sw);
                    self.phase = Phase::FinalMemory;
                }
                MsgKind::Complete if self.prepared && self.switch.is_none() => {
                    let e = ErrorKind::Unexpected {
                        got: "Complete after PostcopyPrepare".into(),
                        expected: "PostcopySwitch",
                    };
                    return Err(at(e));
                }
                MsgKind::Complete => {
                    self.sink.check_torn().map_err(at)?;
                    break;
                }
                MsgKind::Cancel => return Err(at(ErrorKind::Cancelled)),
                other => return Err(unexpected(other, EXPECTED, self.phase)),
            }
        }
        let none = || MigrationError::new(Phase::State, PeerError::NoState);
        self.sections.take().ok_or_else(none)
    }

    /// One `State` frame (see [`add_state`]).
    fn add_state(&mut self, state: Result<State, ProtocolError>) -> Result<(), MigrationError> {
        add_state(&mut self.sections, &mut self.state_frames, state)
    }

    /// The counts so far (the sections are returned by [`Self::run`]).
    fn received(&self) -> Received {
        Received {
            pages: self.sink.pages,
            zero: self.sink.zero,
            rounds: self.rounds,
            torn: self.sink.torn_pages,
            ..Received::default()
        }
    }
}

/// One `State` frame into `sections`: at most [`MAX_STATE_FRAMES`] (counted
/// in `frames`), each section once.
pub(super) fn add_state(
    sections: &mut Option<Vec<Section>>,
    frames: &mut usize,
    state: Result<State, ProtocolError>,
) -> Result<(), MigrationError> {
    let st = Phase::State;
    *frames += 1;
    if *frames > MAX_STATE_FRAMES {
        let e = PeerError::TooManyStateFrames {
            max: MAX_STATE_FRAMES,
        };
        return Err(MigrationError::new(st, e));
    }
    let more = state.map_err(|e| MigrationError::new(st, e))?.sections;
    let all = sections.get_or_insert_with(Vec::new);
    if let Some(dup) = more.iter().find(|m| all.iter().any(|s| s.name == m.name)) {
        let e = PeerError::DuplicateSection(dup.name.clone());
        return Err(MigrationError::new(st, e));
    }
    all.extend(more);
    Ok(())
}
