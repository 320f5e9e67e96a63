//! The memory phase: where pages go ([`PageSink`]) and the readers of the
//! control connection and of each page stream.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::bitmap::DirtyBitmap;
use crate::error::{ErrorKind, MigrationError, PeerError, Phase};
use crate::memory::MemoryLayout;
use crate::protocol::{
    decompress_pages, page_records, stream_of, ErrorMsg, FrameReader, Message, MsgKind, RoundEnd,
    State, MAX_STATE_FRAMES, STREAM_CHUNK_PAGES,
};
use crate::ram::HostRam;
use crate::state::Section;
use crate::transport::Transport;

use super::ReceiveReport;

/// Where one connection's pages go: guest memory, with the bookkeeping of
/// which pages received data (the fresh memory is zero, so a zero marker for
/// a page never written costs nothing and must not touch, i.e. allocate, the
/// page) and a buffer for decompressing `PagesLz4` frames.
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
}

impl<'a> PageSink<'a> {
    pub(super) fn new(
        layout: &'a MemoryLayout,
        ram: &'a HostRam<'a>,
        stream: Option<(u32, u32)>,
    ) -> Self {
        PageSink {
            layout,
            ram,
            written: DirtyBitmap::new(layout),
            pages: 0,
            zero: 0,
            scratch: Vec::new(),
            stream,
        }
    }

    /// Applies one `Pages` or `PagesLz4` frame.
    pub(super) fn apply(&mut self, kind: MsgKind, payload: &[u8]) -> Result<(), ErrorKind> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let r = if kind == MsgKind::PagesLz4 {
            decompress_pages(payload, &mut scratch)
                .map_err(ErrorKind::from)
                .and_then(|_| self.apply_records(&scratch))
        } else {
            self.apply_records(payload)
        };
        self.scratch = scratch;
        r
    }

    pub(super) fn apply_records(&mut self, payload: &[u8]) -> Result<(), ErrorKind> {
        let (layout, ram) = (self.layout, self.ram);
        for rec in page_records(payload) {
            let rec = rec?;
            let (region, page) = rec.check(layout)?;
            let n = u64::from(rec.npages);
            if let Some((index, streams)) = self.stream {
                let last = page + n.saturating_sub(1);
                if page / STREAM_CHUNK_PAGES != last / STREAM_CHUNK_PAGES
                    || stream_of(layout, region, page, streams) != index
                {
                    return Err(PeerError::WrongStream {
                        gpa: rec.gpa,
                        npages: rec.npages,
                        index,
                    }
                    .into());
                }
            }
            let ok = match rec.data {
                Some(data) => {
                    self.pages += n;
                    self.written.set_range(region, page, n);
                    ram.write_pages(region, page, data)
                }
                None => {
                    self.zero += n;
                    let mut ok = true;
                    for p in page..page + n {
                        if self.written.is_set(region, p) {
                            ok &= ram.zero_pages(region, p, 1);
                            self.written.unset(region, p);
                        }
                    }
                    ok
                }
            };
            if !ok {
                return Err(PeerError::OutsideMemory {
                    gpa: rec.gpa,
                    npages: rec.npages,
                }
                .into());
            }
        }
        Ok(())
    }
}

/// What the page-stream threads share with the control loop.
pub(super) struct StreamShared {
    /// The first failure of any stream.
    pub(super) error: Mutex<Option<(u32, ErrorKind)>>,
    /// Set when the control loop gives up (stream threads stop).
    pub(super) abort: AtomicBool,
}

/// One page stream: applies pages until `Complete`.
pub(super) fn stream_reader(
    index: u32,
    streams: u32,
    mut fr: FrameReader<Box<dyn Transport>>,
    layout: &MemoryLayout,
    ram: &HostRam<'_>,
    shared: &StreamShared,
    control: Option<Box<dyn Transport>>,
) -> (u64, u64, u64) {
    let mut sink = PageSink::new(layout, ram, Some((index, streams)));
    let r: Result<(), ErrorKind> = loop {
        if shared.abort.load(Ordering::SeqCst) {
            break Ok(());
        }
        let f = match fr.read_frame() {
            Ok(f) => f,
            Err(e) => break Err(e.into()),
        };
        match f.kind {
            MsgKind::Pages | MsgKind::PagesLz4 => {
                if let Err(e) = sink.apply(f.kind, f.payload) {
                    break Err(e);
                }
            }
            MsgKind::Keepalive => {}
            MsgKind::Complete => break Ok(()),
            other => {
                break Err(ErrorKind::Unexpected {
                    got: format!("{other:?}"),
                    expected: "Pages, Keepalive or Complete",
                })
            }
        }
    };
    if let Err(kind) = r {
        if let Ok(mut g) = shared.error.lock() {
            g.get_or_insert((index, kind));
        }
        // Wake the control loop up.
        if let Some(c) = control {
            let _ = c.shutdown();
        }
    }
    (sink.pages, sink.zero, fr.bytes_read())
}

/// The control connection's part of the memory phase: pages (when they
/// travel here), round ends, the state; returns the state sections at
/// `Complete`.
pub(super) fn receive_memory(
    fr: &mut FrameReader<Box<dyn Transport>>,
    layout: &MemoryLayout,
    ram: &HostRam<'_>,
    report: &mut ReceiveReport,
    phase: &mut Phase,
) -> Result<Vec<Section>, MigrationError> {
    let mut sink = PageSink::new(layout, ram, None);
    *phase = Phase::Precopy(0);
    let mut sections: Option<Vec<Section>> = None;
    let mut state_frames = 0usize;
    let r = loop {
        let f = match fr.read_frame() {
            Ok(f) => f,
            Err(e) => break Err(MigrationError::new(*phase, e)),
        };
        match f.kind {
            MsgKind::Pages | MsgKind::PagesLz4 => {
                if report.streams > 1 {
                    break Err(MigrationError::new(*phase, PeerError::PagesOnControl));
                }
                if let Err(e) = sink.apply(f.kind, f.payload) {
                    break Err(MigrationError::new(*phase, e));
                }
            }
            MsgKind::RoundEnd => {
                let r = match RoundEnd::decode(f.payload) {
                    Ok(r) => r,
                    Err(e) => break Err(MigrationError::new(*phase, e)),
                };
                report.rounds = r.round.saturating_add(1);
                *phase = Phase::Precopy(r.round.saturating_add(1));
            }
            MsgKind::Keepalive => {}
            MsgKind::State => {
                *phase = Phase::State;
                state_frames += 1;
                if state_frames > MAX_STATE_FRAMES {
                    break Err(MigrationError::new(
                        *phase,
                        PeerError::TooManyStateFrames {
                            max: MAX_STATE_FRAMES,
                        },
                    ));
                }
                let more = match State::decode(f.payload) {
                    Ok(s) => s.sections,
                    Err(e) => break Err(MigrationError::new(*phase, e)),
                };
                let all = sections.get_or_insert_with(Vec::new);
                if let Some(dup) = more.iter().find(|m| all.iter().any(|s| s.name == m.name)) {
                    break Err(MigrationError::new(
                        *phase,
                        PeerError::DuplicateSection(dup.name.clone()),
                    ));
                }
                all.extend(more);
            }
            MsgKind::Complete => break Ok(()),
            MsgKind::Error => {
                break Err(match ErrorMsg::decode(f.payload) {
                    Ok(m) => MigrationError::new(
                        *phase,
                        ErrorKind::Remote {
                            phase: m.phase,
                            message: m.message,
                        },
                    ),
                    Err(e) => MigrationError::new(*phase, e),
                })
            }
            MsgKind::Cancel => break Err(MigrationError::new(*phase, ErrorKind::Cancelled)),
            other => {
                break Err(MigrationError::new(
                    *phase,
                    ErrorKind::Unexpected {
                        got: format!("{other:?}"),
                        expected: "Pages, RoundEnd, State or Complete",
                    },
                ))
            }
        }
    };
    report.pages += sink.pages;
    report.zero_pages += sink.zero;
    r?;
    sections.ok_or_else(|| MigrationError::new(Phase::State, PeerError::NoState))
}
