//! The destination side: handshake → memory → state → `Ready` → `Go` →
//! resume → `Resumed`. See [`receive`].
//!
//! The stream is hostile until proven otherwise: every frame is checked
//! (length bound before allocation, sequence number, crc32c), every page
//! range is checked against the memory layout before a byte is written, and
//! the VM is only resumed after the state restored cleanly *and* the source
//! committed with `Go`. On any error the VM is dropped without ever running.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bitmap::DirtyBitmap;
use crate::error::{ErrorKind, MigrationError, Phase};
use crate::memory::MemoryLayout;
use crate::protocol::{
    decompress_pages, page_records, stream_of, Abandoned, ErrorMsg, FrameReader, FrameWriter,
    Hello, HelloReply, Message, MsgKind, ProtocolError, Ready, Resumed, RoundEnd, State,
    StreamHello, MAX_STATE_FRAMES, MAX_STREAMS, PROTOCOL_VERSION, STREAM_CHUNK_PAGES,
};
use crate::ram::HostRam;
use crate::state::Section;
use crate::transport::{StreamAcceptor, Transport};
use crate::vm::{check_layout, DestinationVm, VmDescription, VmError};

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
/// Each extra connection must start with a [`StreamHello`] carrying the
/// random token sent in the [`HelloReply`] (connections that do not are
/// dropped); all must arrive within [`ReceiveConfig::io_timeout`].
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
    let hs = Phase::Handshake;
    config.validate().map_err(|e| MigrationError::new(hs, e))?;
    let mut rx = transport
        .try_clone()
        .map_err(|e| MigrationError::new(hs, ProtocolError::Io(e)))?;
    rx.set_read_timeout(Some(config.io_timeout))
        .map_err(|e| MigrationError::new(hs, ProtocolError::Io(e)))?;
    let mut transport = transport;
    transport
        .set_write_timeout(Some(config.io_timeout))
        .map_err(|e| MigrationError::new(hs, ProtocolError::Io(e)))?;
    let mut fr = FrameReader::new(rx);
    let mut fw = FrameWriter::new(transport);
    let mut phase = hs;
    let mut version = PROTOCOL_VERSION;
    let result = run_destination(
        &mut fr,
        &mut fw,
        acceptor,
        config,
        create,
        &mut phase,
        &mut version,
    );
    if let Err(e) = &result {
        // Tell the source why (best effort), unless the source itself failed.
        if !matches!(e.kind, ErrorKind::Remote { .. } | ErrorKind::Cancelled) {
            let msg = ErrorMsg {
                phase: e.phase.to_string(),
                message: e.kind.to_string(),
            };
            // In the completion phase (`Ready` sent or being sent) the source
            // may have sent `Go` already: say that the VM is gone for good
            // (it was dropped when `run_destination` returned), so that the
            // source resumes instead of staying paused as ambiguous.
            // A version-2 source knows no `Abandoned`: it gets the `Error`.
            let _ = if e.phase == Phase::Completion && version >= 3 {
                fw.send(&Abandoned(msg))
            } else {
                fw.send(&msg)
            };
            let _ = fw.flush();
        }
        log::warn!("{e}");
    }
    result
}

/// Random bytes for the stream token (from the kernel; never fails in
/// practice, and the token only keeps stray connections out — TLS is what
/// keeps attackers out).
fn random_token() -> [u8; 16] {
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

/// Accepts the `n` page streams of a migration.
fn accept_streams(
    acceptor: &mut dyn StreamAcceptor,
    n: u32,
    token: [u8; 16],
    timeout: Duration,
) -> Result<Vec<FrameReader<Box<dyn Transport>>>, MigrationError> {
    let hs = Phase::Handshake;
    let deadline = Instant::now() + timeout;
    let mut slots: Vec<Option<FrameReader<Box<dyn Transport>>>> = (0..n).map(|_| None).collect();
    let mut have = 0;
    while have < n {
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
        let mut t = match acceptor.accept_stream(left) {
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
        let peer = t.peer();
        // A connection gets a short time to say who it is, so a stray that
        // sends nothing cannot hold the real streams off.
        let hello_wait = left.min(STREAM_HELLO_TIMEOUT).max(Duration::from_millis(1));
        if let Err(e) = t.set_read_timeout(Some(hello_wait)) {
            log::warn!("page stream from {peer}: {e}; dropped");
            continue;
        }
        let mut r = FrameReader::new(t);
        let hello = match r.read_frame() {
            Ok(f) if f.kind == MsgKind::StreamHello => StreamHello::decode(f.payload),
            Ok(f) => {
                log::warn!(
                    "connection from {peer} sent {:?} instead of StreamHello; dropped",
                    f.kind
                );
                continue;
            }
            Err(e) => {
                log::warn!("connection from {peer}: {e}; dropped");
                continue;
            }
        };
        match hello {
            Ok(h) if h.token == token && h.index < n => {
                let slot = &mut slots[h.index as usize];
                if slot.is_some() {
                    log::warn!("page stream {} from {peer} a second time; dropped", h.index);
                    continue;
                }
                if let Err(e) = r.get_mut().set_read_timeout(Some(timeout)) {
                    return Err(MigrationError::new(hs, ProtocolError::Io(e)));
                }
                *slot = Some(r);
                have += 1;
            }
            Ok(h) => log::warn!(
                "connection from {peer}: wrong token or stream index {} (of {n}); dropped",
                h.index
            ),
            Err(e) => log::warn!("connection from {peer}: {e}; dropped"),
        }
    }
    Ok(slots.into_iter().flatten().collect())
}

/// Where one connection's pages go: guest memory, with the bookkeeping of
/// which pages received data (the fresh memory is zero, so a zero marker for
/// a page never written costs nothing and must not touch, i.e. allocate, the
/// page) and a buffer for decompressing `PagesLz4` frames.
struct PageSink<'a> {
    layout: &'a MemoryLayout,
    ram: &'a HostRam<'a>,
    written: DirtyBitmap,
    /// Data pages and zero markers applied.
    pages: u64,
    zero: u64,
    scratch: Vec<u8>,
    /// `Some((index, streams))`: every record must belong to that page
    /// stream (see [`stream_of`]).
    stream: Option<(u32, u32)>,
}

impl<'a> PageSink<'a> {
    fn new(layout: &'a MemoryLayout, ram: &'a HostRam<'a>, stream: Option<(u32, u32)>) -> Self {
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
    fn apply(&mut self, kind: MsgKind, payload: &[u8]) -> Result<(), ErrorKind> {
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

    fn apply_records(&mut self, payload: &[u8]) -> Result<(), ErrorKind> {
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
                    return Err(ErrorKind::Invalid(format!(
                        "pages 0x{:x}+{} do not belong to page stream {index}",
                        rec.gpa, rec.npages
                    )));
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
                return Err(ErrorKind::Invalid(format!(
                    "pages 0x{:x}+{} do not fit guest memory",
                    rec.gpa, rec.npages
                )));
            }
        }
        Ok(())
    }
}

/// What the page-stream threads share with the control loop.
struct StreamShared {
    /// The first failure of any stream.
    error: Mutex<Option<(u32, ErrorKind)>>,
    /// Set when the control loop gives up (stream threads stop).
    abort: AtomicBool,
}

/// One page stream: applies pages until `Complete`.
fn stream_reader(
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

fn run_destination<V, F>(
    fr: &mut FrameReader<Box<dyn Transport>>,
    fw: &mut FrameWriter<Box<dyn Transport>>,
    acceptor: Option<&mut dyn StreamAcceptor>,
    config: &ReceiveConfig,
    create: F,
    phase: &mut Phase,
    chosen: &mut u32,
) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
{
    let started = Instant::now();
    let mut report = ReceiveReport::default();
    let hs = Phase::Handshake;

    let f = fr.read_frame().map_err(|e| MigrationError::new(hs, e))?;
    if f.kind != MsgKind::Hello {
        return Err(MigrationError::new(
            hs,
            ErrorKind::Unexpected {
                got: format!("{:?}", f.kind),
                expected: "Hello",
            },
        ));
    }
    let refuse = |fw: &mut FrameWriter<Box<dyn Transport>>, reason: String| {
        let r = HelloReply::refused(reason.clone());
        let _ = fw.send(&r);
        let _ = fw.flush();
        MigrationError::new(hs, ErrorKind::Refused(reason))
    };
    let hello = match Hello::decode(f.payload) {
        Ok(h) => h,
        Err(e) => return Err(refuse(fw, e.to_string())),
    };
    let version = match hello.negotiated_version() {
        Ok(v) => v,
        Err(e) => return Err(refuse(fw, e.to_string())),
    };
    report.version = version;
    *chosen = version;
    report.running = !hello.paused;
    let desc = hello.desc;
    let mut vm = match create(&desc) {
        Ok(vm) => vm,
        Err(e) => return Err(refuse(fw, e.to_string())),
    };
    if let Err(e) = check_layout(vm.memory(), &desc) {
        return Err(refuse(fw, e.to_string()));
    }
    let layout = desc.layout.clone();
    let ram = HostRam::new(vm.memory(), &layout).ok_or_else(|| {
        refuse(
            fw,
            "destination memory is not one mapping per region".into(),
        )
    })?;
    // The source leaves out pages that read as zero there: make every page
    // here read as zero first, whatever the VMM put in it before.
    let t_scrub = Instant::now();
    match ram.scrub() {
        Ok(0) => {}
        Ok(n) => log::warn!(
            "zeroed {n} region(s) of destination memory by writing ({:.1} ms): \
             their backing cannot drop pages",
            ms(t_scrub.elapsed())
        ),
        Err(e) => return Err(refuse(fw, format!("cannot zero destination memory: {e}"))),
    }
    let streams = if acceptor.is_some() {
        hello.streams.clamp(1, MAX_STREAMS)
    } else {
        1
    };
    let token = if streams > 1 { random_token() } else { [0; 16] };
    // The newest version in both ranges (`Hello::decode` refused ranges
    // that do not overlap): 3, or 2 with a source of release 0.1.0.
    let mut reply = HelloReply::accepted(streams, token);
    reply.version = version;
    fw.send(&reply)
        .and_then(|_| fw.flush())
        .map_err(|e| MigrationError::new(hs, e))?;
    report.streams = streams;
    let readers = match acceptor {
        Some(a) if streams > 1 => {
            let r = accept_streams(a, streams, token, config.io_timeout);
            a.close();
            r?
        }
        Some(a) => {
            a.close();
            Vec::new()
        }
        None => Vec::new(),
    };
    let control = fr
        .get_ref()
        .try_clone()
        .map_err(|e| MigrationError::new(hs, ProtocolError::Io(e)))?;
    let shared = StreamShared {
        error: Mutex::new(None),
        abort: AtomicBool::new(false),
    };
    let stream_handles: Vec<Box<dyn Transport>> = readers
        .iter()
        .filter_map(|r| r.get_ref().try_clone().ok())
        .collect();
    let ram_ref = &ram;
    let layout_ref = &layout;
    let shared_ref = &shared;
    let outcome = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (i, r) in readers.into_iter().enumerate() {
            let control_clone = control.try_clone().ok();
            let h = std::thread::Builder::new()
                .name(format!("livemig-rx{i}"))
                .spawn_scoped(s, move || {
                    stream_reader(
                        i as u32,
                        streams,
                        r,
                        layout_ref,
                        ram_ref,
                        shared_ref,
                        control_clone,
                    )
                });
            match h {
                Ok(h) => handles.push(h),
                Err(e) => {
                    shared.abort.store(true, Ordering::SeqCst);
                    for t in &stream_handles {
                        let _ = t.shutdown();
                    }
                    return Err(MigrationError::new(
                        hs,
                        ErrorKind::Invalid(format!("cannot start page stream thread: {e}")),
                    ));
                }
            }
        }
        let r = receive_memory(fr, &layout, &ram, &mut report, phase);
        if r.is_err() {
            shared.abort.store(true, Ordering::SeqCst);
            for t in &stream_handles {
                let _ = t.shutdown();
            }
        }
        for h in handles {
            match h.join() {
                Ok((pages, zero, bytes)) => {
                    report.pages += pages;
                    report.zero_pages += zero;
                    report.bytes += bytes;
                }
                Err(_) => {
                    if let Ok(mut g) = shared.error.lock() {
                        g.get_or_insert((
                            u32::MAX,
                            ErrorKind::Invalid("page stream thread panicked".into()),
                        ));
                    }
                }
            }
        }
        // A stream's failure is the real cause of whatever the control
        // connection saw (the stream shut it down).
        if let Some((index, kind)) = shared.error.lock().ok().and_then(|mut g| g.take()) {
            return Err(MigrationError::new(
                *phase,
                ErrorKind::Stream {
                    index,
                    source: Box::new(kind),
                },
            ));
        }
        r
    });
    let sections = outcome?;

    // Restore, then wait for the source's commitment before running.
    *phase = Phase::State;
    let t = Instant::now();
    vm.restore_state(&sections)
        .map_err(|e| MigrationError::new(Phase::State, e))?;
    let restore = t.elapsed();
    report.restore_ms = ms(restore);
    *phase = Phase::Completion;
    let cp = Phase::Completion;
    fw.send(&Ready {
        restore_us: restore.as_micros() as u64,
    })
    .and_then(|_| fw.flush())
    .map_err(|e| MigrationError::new(cp, e))?;
    let f = fr.read_frame().map_err(|e| MigrationError::new(cp, e))?;
    match f.kind {
        MsgKind::Go => {}
        MsgKind::Error => {
            let m = ErrorMsg::decode(f.payload).map_err(|e| MigrationError::new(cp, e))?;
            return Err(MigrationError::new(
                cp,
                ErrorKind::Remote {
                    phase: m.phase,
                    message: m.message,
                },
            ));
        }
        other => {
            return Err(MigrationError::new(
                cp,
                ErrorKind::Unexpected {
                    got: format!("{other:?}"),
                    expected: "Go",
                },
            ))
        }
    }
    let t = Instant::now();
    if report.running {
        vm.resume().map_err(|e| MigrationError::new(cp, e))?;
    }
    let resume = t.elapsed();
    report.resume_ms = ms(resume);
    // The guest runs here now. If the acknowledgement cannot be sent the
    // source stays paused (it committed with Go), so keep running.
    if let Err(e) = fw
        .send(&Resumed {
            resume_us: resume.as_micros() as u64,
        })
        .and_then(|_| fw.flush())
    {
        log::warn!("guest resumed but the acknowledgement could not be sent: {e}");
    }
    report.bytes += fr.bytes_read();
    report.total_ms = ms(started.elapsed());
    Ok((vm, report))
}

/// The control connection's part of the memory phase: pages (when they
/// travel here), round ends, the state; returns the state sections at
/// `Complete`.
fn receive_memory(
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
                    break Err(MigrationError::new(
                        *phase,
                        ErrorKind::Invalid(
                            "pages on the control connection of a multi-stream migration".into(),
                        ),
                    ));
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
                        ErrorKind::Invalid(format!("more than {MAX_STATE_FRAMES} State frames")),
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
                        ErrorKind::Invalid(format!(
                            "section '{}' appears in two State frames",
                            dup.name
                        )),
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
    sections.ok_or_else(|| {
        MigrationError::new(
            Phase::State,
            ErrorKind::Invalid("Complete before any State".into()),
        )
    })
}
