//! The source side: handshake → pre-copy rounds → stop-and-copy → state →
//! completion. See [`migrate`].

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::bitmap::DirtyBitmap;
use crate::commit::{commit, Commit};
use crate::deadline::PauseDeadline;
use crate::error::{ErrorKind, MigrationError, Phase};
use crate::memory::{MemoryLayout, PAGE_SIZE};
use crate::policy::{decide, Decision, MigrationConfig, RoundEstimate, Throttle};
use crate::protocol::{
    compress_pages, state_frames, stream_of, ErrorMsg, FrameReader, FrameWriter, Go, Hello,
    HelloReply, Message, MsgKind, PageBatch, ProtocolError, Ready, RoundEnd, StreamHello,
    MAX_FRAME_PAYLOAD, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, STREAM_CHUNK_PAGES,
};
use crate::ram::HostRam;
use crate::report::{Progress, Report, RoundReport, Status};
use crate::transport::{StreamOpener, Transport};
use crate::vm::{DirtyTracker, SourceVm, VcpuThrottle};

/// Auto-converge's worker: parks the vCPUs for `pct / (100 - pct)` of each
/// 10 ms slice of running time (QEMU's cpu-throttle timing).
#[derive(Default)]
struct Throttler {
    pct: AtomicU32,
    stop: AtomicBool,
    exited: AtomicBool,
}

impl Throttler {
    const SLICE: Duration = Duration::from_millis(10);

    fn run(&self, vcpus: &dyn VcpuThrottle) {
        while !self.stop.load(Ordering::SeqCst) {
            let pct = self.pct.load(Ordering::SeqCst).min(99);
            if pct == 0 {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let off = Self::SLICE * pct / (100 - pct);
            if let Err(e) = vcpus.pause_vcpus() {
                log::warn!("auto-converge: pausing vCPUs: {e}");
                break;
            }
            let until = Instant::now() + off;
            while Instant::now() < until && !self.stop.load(Ordering::SeqCst) {
                std::thread::sleep((until - Instant::now()).min(Duration::from_millis(2)));
            }
            if let Err(e) = vcpus.resume_vcpus() {
                log::error!("auto-converge: resuming vCPUs: {e}");
                break;
            }
            std::thread::sleep(Self::SLICE);
        }
        self.exited.store(true, Ordering::SeqCst);
    }

    /// Stops throttling; returns once the vCPUs are no longer held.
    fn finish(&self, running: bool) {
        self.stop.store(true, Ordering::SeqCst);
        while running && !self.exited.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// Pages per dirty-log chunk: in manual-protect mode each chunk is
/// re-protected (`clear`) just before its pages are read.
pub const CHUNK_PAGES: u64 = STREAM_CHUNK_PAGES;

/// Cancels a running migration from another thread.
///
/// Cancelling before the switchover leaves the source running as before.
#[derive(Clone, Default)]
pub struct CancelToken {
    flag: Arc<AtomicBool>,
    transports: Arc<Mutex<Vec<Box<dyn Transport>>>>,
}

impl CancelToken {
    /// A fresh token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests cancellation; a blocked read or write on the migration's
    /// transport is interrupted.
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
        if let Ok(g) = self.transports.lock() {
            for t in g.iter() {
                let _ = t.shutdown();
            }
        }
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Adds a connection to shut down on cancel.
    fn attach(&self, t: Option<Box<dyn Transport>>) {
        if let Ok(mut g) = self.transports.lock() {
            g.extend(t);
        }
        if self.is_cancelled() {
            self.cancel();
        }
    }

    fn detach_all(&self) {
        if let Ok(mut g) = self.transports.lock() {
            g.clear();
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Simple pacing for `max_bandwidth`.
struct Pacer {
    rate: Option<u64>,
    start: Instant,
    bytes: u64,
    /// Shared by all streams: set when the cap no longer applies.
    lifted: Arc<AtomicBool>,
}

impl Pacer {
    fn new(rate: Option<u64>, lifted: Arc<AtomicBool>) -> Self {
        Pacer {
            rate,
            start: Instant::now(),
            bytes: 0,
            lifted,
        }
    }

    /// Accounts `bytes` just sent; returns how long to wait before sending
    /// more (the caller waits, sending keepalives, see
    /// [`PageSender::pace`]).
    fn account(&mut self, bytes: u64) -> Duration {
        let Some(rate) = self.rate.filter(|r| *r > 0) else {
            return Duration::ZERO;
        };
        if self.lifted.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        self.bytes += bytes;
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        due.saturating_sub(self.start.elapsed())
    }

    /// After the wait: keep the window short so bursts after idle periods
    /// stay bounded.
    fn rewind(&mut self) {
        if self.start.elapsed() > Duration::from_secs(1) {
            self.start = Instant::now();
            self.bytes = 0;
        }
    }
}

#[derive(Default, Clone, Copy, Debug)]
struct Counts {
    pages: u64,
    zero: u64,
    bytes: u64,
}

impl Counts {
    fn add(&mut self, c: Counts) {
        self.pages += c.pages;
        self.zero += c.zero;
        self.bytes += c.bytes;
    }
}

struct PageSender<'a> {
    fw: FrameWriter<Box<dyn Transport>>,
    batch: PageBatch,
    batch_pages: u64,
    ram: HostRam<'a>,
    layout: MemoryLayout,
    pacer: Pacer,
    counts: Counts,
    /// Round 0: the destination's memory is fresh (zero), so zero pages are
    /// counted but not sent at all.
    skip_zero: bool,
    /// Round 0: pages that certainly read as zero ([`HostRam::populated`])
    /// are not read at all (the destination's memory is zero too).
    skip_untouched: bool,
    /// Pages left out that way.
    skipped: u64,
    /// The extra page streams, when there are several.
    pool: Option<StreamPool>,
    /// When the control connection last carried a frame (keepalives while
    /// the pages go elsewhere).
    last_control: Instant,
    /// Compression buffer, when compressing.
    lz4: Option<Vec<u8>>,
    /// Time spent re-arming the dirty log (not sending) in this round.
    clear_time: Duration,
    /// Longest this connection stays silent ([`keepalive_every`]).
    alive_every: Duration,
}

/// Longest a connection stays silent before a keepalive goes out; shorter
/// with a short `io_timeout` (see [`keepalive_every`]).
const KEEPALIVE: Duration = Duration::from_secs(1);

/// How often a silent connection sends a keepalive: [`KEEPALIVE`], or a
/// quarter of `io_timeout` if that is shorter (the destination is expected
/// to use a read timeout no shorter than the source's `io_timeout`).
fn keepalive_every(io_timeout: Duration) -> Duration {
    KEEPALIVE.min(io_timeout / 4).max(Duration::from_millis(1))
}

/// Work for one page-stream thread.
enum Job {
    /// Send these runs `(first_page, npages)` of `region`.
    Runs {
        region: usize,
        runs: Vec<(u64, u64)>,
        skip_zero: bool,
    },
    /// Flush what is buffered, then report the counts since the last report.
    Flush,
    /// Flush, send `Complete` on the stream, report, and exit.
    Finish,
}

/// The page-stream threads of a multi-stream migration.
struct StreamPool {
    jobs: Vec<crossbeam_channel::Sender<Job>>,
    done: Vec<crossbeam_channel::Receiver<Result<Counts, ProtocolError>>>,
    /// Set once a stream has failed (its thread then drops further work).
    failed: Arc<AtomicBool>,
    /// Index of the stream that failed first (`u32::MAX`: none).
    first_failed: Arc<AtomicU32>,
}

impl StreamPool {
    fn dispatch(&self, index: u32, job: Job) -> Result<(), MigrationError> {
        self.jobs
            .get(index as usize)
            .and_then(|tx| tx.send(job).ok())
            .ok_or_else(|| {
                MigrationError::new(
                    Phase::Handshake,
                    ErrorKind::Invalid(format!("page stream {index} is gone")),
                )
            })
    }

    /// Sends `job` (Flush or Finish) to every stream and collects the counts;
    /// `alive` is called at least every `every` while it waits (the
    /// control connection's keepalive: a paced stream may take long).
    fn barrier(
        &self,
        finish: bool,
        phase: Phase,
        every: Duration,
        alive: &mut dyn FnMut() -> Result<(), ProtocolError>,
    ) -> Result<Counts, MigrationError> {
        for (i, tx) in self.jobs.iter().enumerate() {
            let job = if finish { Job::Finish } else { Job::Flush };
            if tx.send(job).is_err() {
                return Err(MigrationError::new(
                    phase,
                    ErrorKind::Stream {
                        index: i as u32,
                        source: Box::new(ErrorKind::Invalid("sender thread exited".into())),
                    },
                ));
            }
        }
        let mut total = Counts::default();
        let mut errors = Vec::new();
        for (i, rx) in self.done.iter().enumerate() {
            let got = loop {
                match rx.recv_timeout(every) {
                    Ok(r) => break Ok(r),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                        alive().map_err(|e| MigrationError::new(phase, e))?;
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break Err(()),
                }
            };
            match got {
                Ok(Ok(c)) => total.add(c),
                Ok(Err(e)) => errors.push((i, ErrorKind::Protocol(e))),
                Err(()) => errors.push((i, ErrorKind::Invalid("sender thread exited".into()))),
            }
        }
        // Name the stream that failed first, not the ones that broke after.
        let first = self.first_failed.load(Ordering::SeqCst) as usize;
        let pick = errors.iter().position(|(i, _)| *i == first).unwrap_or(0);
        let first_err = (!errors.is_empty()).then(|| errors.swap_remove(pick));
        match first_err {
            None => Ok(total),
            Some((i, kind)) => Err(MigrationError::new(
                phase,
                ErrorKind::Stream {
                    index: i as u32,
                    source: Box::new(kind),
                },
            )),
        }
    }
}

/// One page-stream thread: sends what it is given on its own connection.
fn stream_worker(
    index: u32,
    mut sender: PageSender<'_>,
    jobs: crossbeam_channel::Receiver<Job>,
    done: crossbeam_channel::Sender<Result<Counts, ProtocolError>>,
    failed: &AtomicBool,
    first_failed: &AtomicU32,
) {
    let fail = |e: ProtocolError| {
        if !failed.swap(true, Ordering::SeqCst) {
            first_failed.store(index, Ordering::SeqCst);
        }
        e
    };
    let mut error: Option<ProtocolError> = None;
    let mut reported = Counts::default();
    loop {
        let job = match jobs.recv_timeout(sender.alive_every) {
            Ok(j) => j,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if error.is_none() {
                    let r = sender
                        .fw
                        .write_frame(MsgKind::Keepalive, &[])
                        .and_then(|_| sender.fw.flush());
                    if let Err(e) = r {
                        error = Some(fail(e));
                    }
                }
                continue;
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        };
        let finish = matches!(job, Job::Finish);
        match job {
            Job::Runs {
                region,
                runs,
                skip_zero,
            } => {
                if error.is_none() {
                    sender.skip_zero = skip_zero;
                    for (first, n) in runs {
                        if let Err(e) = sender.send_run(region, first, n) {
                            error = Some(fail(e));
                            break;
                        }
                    }
                }
            }
            Job::Flush | Job::Finish => {
                if error.is_none() {
                    let mut r = sender.flush();
                    if finish {
                        r = r.and_then(|_| sender.fw.write_frame(MsgKind::Complete, &[]));
                    }
                    if let Err(e) = r.and_then(|_| sender.fw.flush()) {
                        error = Some(fail(e));
                    }
                }
                let reply = match error.take() {
                    Some(e) => {
                        // Report once; later barriers see the thread gone.
                        let _ = done.send(Err(e));
                        return;
                    }
                    None => {
                        let c = sender.counts;
                        let delta = Counts {
                            pages: c.pages - reported.pages,
                            zero: c.zero - reported.zero,
                            bytes: c.bytes - reported.bytes,
                        };
                        reported = c;
                        Ok(delta)
                    }
                };
                if done.send(reply).is_err() || finish {
                    return;
                }
            }
        }
    }
}

impl PageSender<'_> {
    fn flush(&mut self) -> Result<(), ProtocolError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let before = self.fw.bytes_written();
        let raw = self.batch.as_bytes();
        match self.lz4.as_mut() {
            Some(buf) => {
                compress_pages(raw, buf);
                // Keep it only if it saves at least an eighth.
                if buf.len() < raw.len() - raw.len() / 8 {
                    self.fw.write_frame(MsgKind::PagesLz4, &[buf])?;
                } else {
                    self.fw.write_frame(MsgKind::Pages, &[raw])?;
                }
            }
            None => self.fw.write_frame(MsgKind::Pages, &[raw])?,
        }
        let n = self.fw.bytes_written() - before;
        self.counts.bytes += n;
        self.batch.clear();
        self.last_control = Instant::now();
        let wait = self.pacer.account(n);
        self.pace(wait)
    }

    /// Waits `wait` for the bandwidth cap, in slices of at most
    /// the keepalive interval, with a `Keepalive` on this connection after each
    /// slice that leaves more to wait: a slow cap never keeps the peer's
    /// read timeout waiting.
    fn pace(&mut self, wait: Duration) -> Result<(), ProtocolError> {
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(self.alive_every));
            if Instant::now() < until {
                self.fw.write_frame(MsgKind::Keepalive, &[])?;
                self.fw.flush()?;
                self.last_control = Instant::now();
            }
        }
        self.pacer.rewind();
        Ok(())
    }

    fn gpa(&self, region: usize, page: u64) -> u64 {
        self.layout.regions()[region].guest_addr + page * PAGE_SIZE
    }

    /// Sends pages `first..first+npages` of `region`, zero pages as markers.
    fn send_run(&mut self, region: usize, first: u64, npages: u64) -> Result<(), ProtocolError> {
        // Never merge with a record of the previous run: it may end exactly
        // where this region begins.
        self.batch.end_record();
        let mut p = first;
        let end = first + npages;
        while p < end {
            let zero = self.ram.is_zero(region, p);
            let mut q = p + 1;
            while q < end && q - p < self.batch_pages && self.ram.is_zero(region, q) == zero {
                q += 1;
            }
            let n = q - p;
            let gpa = self.gpa(region, p);
            if zero {
                if !self.skip_zero {
                    self.batch.push_zero(gpa, n as u32)?;
                }
                self.counts.zero += n;
            } else {
                let ram = &self.ram;
                self.batch.push_data_with(gpa, n as u32, |dst| {
                    if ram.read_pages(region, p, dst) {
                        Ok(())
                    } else {
                        Err(ProtocolError::PagesOutsideMemory {
                            gpa,
                            npages: n as u32,
                        })
                    }
                })?;
                self.counts.pages += n;
            }
            if self.batch.data_pages() >= self.batch_pages
                || self.batch.len_bytes() as u64 >= self.batch_pages * PAGE_SIZE
            {
                self.flush()?;
            }
            p = q;
        }
        Ok(())
    }

    /// Sends every page set in `bitmap`, chunk by chunk; in manual-protect
    /// mode each chunk is re-armed in `tracker` just before it is read.
    ///
    /// With [`PageSender::skip_untouched`] set (round 0), each chunk's pages
    /// are then narrowed to those that may hold data ([`HostRam::populated`])
    /// — after the re-arm, so a page first written between the two is
    /// either seen as populated here or logged dirty for the next round.
    ///
    /// Pages may still be buffered (here or in the stream threads) when this
    /// returns: [`PageSender::end_round`] flushes and accounts them.
    fn send_bitmap(
        &mut self,
        bitmap: &DirtyBitmap,
        mut tracker: Option<&mut (dyn DirtyTracker + '_)>,
        cancel: &CancelToken,
        phase: Phase,
    ) -> Result<(), MigrationError> {
        let mut populated = Vec::new();
        for region in 0..bitmap.num_regions() {
            let pages = bitmap.region_pages(region);
            let mut chunk = 0;
            while chunk < pages {
                // Keep the connection (the control one, or the only one)
                // alive through long stretches of clearing or of pages
                // that travel on other streams.
                self.keepalive()
                    .map_err(|e| MigrationError::new(phase, e))?;
                let end = (chunk + CHUNK_PAGES).min(pages);
                if !bitmap.any_in(region, chunk, end) {
                    chunk = end;
                    continue;
                }
                if cancel.is_cancelled() {
                    return Err(MigrationError::new(phase, ErrorKind::Cancelled));
                }
                if let Some(t) = tracker.as_deref_mut() {
                    let t0 = Instant::now();
                    t.clear(region, chunk, end - chunk, bitmap)
                        .map_err(|e| MigrationError::new(phase, e))?;
                    self.clear_time += t0.elapsed();
                }
                let mut runs: Vec<(u64, u64)> = bitmap
                    .runs_in(region, chunk, end, u64::MAX)
                    .map(|r| (r.first_page, r.npages))
                    .collect();
                if self.skip_untouched {
                    populated.resize((end - chunk) as usize, false);
                    self.ram.populated(region, chunk, &mut populated);
                    let before: u64 = runs.iter().map(|r| r.1).sum();
                    runs = narrow_runs(&runs, chunk, &populated);
                    self.skipped += before - runs.iter().map(|r| r.1).sum::<u64>();
                }
                if !runs.is_empty() {
                    self.dispatch(region, chunk, runs, phase)?;
                }
                chunk = end;
            }
        }
        Ok(())
    }

    /// Sends the runs of one chunk: on a page stream, or right here.
    fn dispatch(
        &mut self,
        region: usize,
        chunk: u64,
        runs: Vec<(u64, u64)>,
        phase: Phase,
    ) -> Result<(), MigrationError> {
        if let Some(pool) = &self.pool {
            let streams = pool.jobs.len() as u32;
            let index = stream_of(&self.layout, region, chunk, streams);
            let job = Job::Runs {
                region,
                runs,
                skip_zero: self.skip_zero,
            };
            if pool.dispatch(index, job).is_err() || pool.failed.load(Ordering::SeqCst) {
                // The barrier at the end of the round names the stream and why.
                return Ok(());
            }
        } else {
            for (first, n) in runs {
                self.send_run(region, first, n)
                    .map_err(|e| MigrationError::new(phase, e))?;
            }
        }
        Ok(())
    }

    /// Flushes this round's pages (on every stream) and accounts them. With
    /// `last`, every stream also ends with `Complete` (the final copy).
    fn end_round(&mut self, phase: Phase, last: bool) -> Result<(), MigrationError> {
        self.flush().map_err(|e| MigrationError::new(phase, e))?;
        if let Some(pool) = &self.pool {
            let (fw, last_control) = (&mut self.fw, &mut self.last_control);
            let mut alive = || {
                fw.write_frame(MsgKind::Keepalive, &[])?;
                fw.flush()?;
                *last_control = Instant::now();
                Ok(())
            };
            let c = pool.barrier(last, phase, self.alive_every, &mut alive)?;
            self.counts.add(c);
        }
        Ok(())
    }

    /// A keepalive on this connection if it has been quiet for
    /// the keepalive interval (with page streams its pages travel elsewhere; alone,
    /// re-arming the dirty log of a large idle region can take a while).
    fn keepalive(&mut self) -> Result<(), ProtocolError> {
        if self.last_control.elapsed() >= self.alive_every {
            self.fw.write_frame(MsgKind::Keepalive, &[])?;
            self.fw.flush()?;
            self.last_control = Instant::now();
        }
        Ok(())
    }
}

#[cfg(test)]
#[test]
fn narrow_runs_keeps_marked_pages_as_maximal_runs() {
    let keep = [true, false, true, true, false, false, true, true];
    // Pages 100..108 with base 100; runs (100, 3) and (104, 4).
    assert_eq!(
        narrow_runs(&[(100, 3), (104, 4)], 100, &keep),
        vec![(100, 1), (102, 1), (106, 2)]
    );
    assert!(narrow_runs(&[(101, 1)], 100, &keep).is_empty());
}

/// The parts of `runs` (pages `(first, n)`) whose pages are marked in
/// `keep` (indexed from page `base`).
fn narrow_runs(runs: &[(u64, u64)], base: u64, keep: &[bool]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(first, n) in runs {
        for p in first..first + n {
            if !keep.get((p - base) as usize).copied().unwrap_or(true) {
                continue;
            }
            match out.last_mut() {
                Some((f, m)) if *f + *m == p => *m += 1,
                _ => out.push((p, 1)),
            }
        }
    }
    out
}

/// Merges the VMM's own writes (vm-memory's bitmap) into `bitmap`.
fn merge_vmm_writes<V: SourceVm + ?Sized>(vm: &V, bitmap: &mut DirtyBitmap) {
    let mut regions: Vec<_> = vm.memory().iter().collect();
    regions.sort_by_key(|r| r.start_addr());
    for (i, r) in regions.into_iter().enumerate() {
        let words = vm_memory::MmapRegion::bitmap(r).get_and_reset();
        bitmap.or_words(i, &words);
    }
}

/// Reads the next frame, turning a peer `Error` frame into an error.
/// `timeout` is the read timeout set on `fr`, for the error message.
fn expect(
    fr: &mut FrameReader<Box<dyn Transport>>,
    want: MsgKind,
    phase: Phase,
    timeout: Duration,
) -> Result<Vec<u8>, MigrationError> {
    let f = fr.read_frame().map_err(|e| {
        if e.is_timeout() {
            MigrationError::new(
                phase,
                ErrorKind::Timeout {
                    waiting_for: want.name(),
                    after: timeout,
                },
            )
        } else {
            MigrationError::new(phase, e)
        }
    })?;
    if f.kind == want {
        return Ok(f.payload.to_vec());
    }
    if f.kind == MsgKind::Error {
        let e = ErrorMsg::decode(f.payload).map_err(|e| MigrationError::new(phase, e))?;
        return Err(MigrationError::new(
            phase,
            ErrorKind::Remote {
                phase: e.phase,
                message: e.message,
            },
        ));
    }
    Err(MigrationError::new(
        phase,
        ErrorKind::Unexpected {
            got: format!("{:?}", f.kind),
            expected: want.name(),
        },
    ))
}

/// Migrates `vm` over `transport`.
///
/// Runs on the calling thread while the VM's own threads keep running the
/// guest. On success the guest runs on the destination and the source VM is
/// left paused (the caller tears it down). On any error before the
/// switchover the source VM is running again and dirty logging is off; the
/// error names the phase. If the error [`MigrationError::is_ambiguous`], the
/// destination may be running the guest: the source stays paused.
///
/// `progress` is called after each round and at the switchover.
///
/// Everything travels on `transport`; [`MigrationConfig::streams`] must be 1
/// (see [`migrate_streams`]).
pub fn migrate<V: SourceVm + ?Sized>(
    vm: &V,
    transport: Box<dyn Transport>,
    config: &MigrationConfig,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, MigrationError> {
    migrate_streams(vm, transport, None, config, cancel, progress)
}

/// Like [`migrate`], with [`MigrationConfig::streams`] page streams opened
/// through `opener` (the control exchange stays on `transport`).
///
/// The destination may grant fewer streams than asked for (a destination
/// called without a [`crate::transport::StreamAcceptor`] grants one); with
/// one, `opener` is not used.
pub fn migrate_streams<V: SourceVm + ?Sized>(
    vm: &V,
    transport: Box<dyn Transport>,
    opener: Option<&mut dyn StreamOpener>,
    config: &MigrationConfig,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, MigrationError> {
    let started = Instant::now();
    let desc = vm
        .describe()
        .map_err(|e| MigrationError::new(Phase::Handshake, e))?;
    let layout = desc.layout.clone();
    let mut report = Report::new(layout.total_bytes(), ms(config.downtime_limit));
    cancel.attach(transport.try_clone().ok());
    // The operator's run state, kept from start to end (see
    // `SourceVm::is_paused`).
    let paused = vm.is_paused();
    let result = if let Err(e) = config.validate() {
        Err(MigrationError::new(Phase::Handshake, e))
    } else if config.streams > 1 && opener.is_none() {
        Err(MigrationError::new(
            Phase::Handshake,
            ErrorKind::Invalid(format!(
                "streams = {} needs a StreamOpener (use migrate_streams)",
                config.streams
            )),
        ))
    } else {
        run_source(
            vm,
            transport,
            opener,
            config,
            cancel,
            progress,
            &mut report,
            started,
            desc,
            paused,
        )
    };
    cancel.detach_all();
    report.total_ms = ms(started.elapsed());
    match result {
        Ok(()) => {
            report.status = Status::Completed;
            Ok(report)
        }
        Err(mut e) => {
            // A cancel shuts the transport down; the I/O error it causes is
            // the cancel, not a failure.
            if cancel.is_cancelled() && !e.is_ambiguous() {
                e.kind = ErrorKind::Cancelled;
            }
            report.status = if matches!(e.kind, ErrorKind::Cancelled) {
                Status::Cancelled
            } else {
                Status::Failed
            };
            report.error = Some(e.to_string());
            log::warn!("{e}");
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_source<V: SourceVm + ?Sized>(
    vm: &V,
    transport: Box<dyn Transport>,
    opener: Option<&mut dyn StreamOpener>,
    config: &MigrationConfig,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
    report: &mut Report,
    started: Instant,
    desc: crate::vm::VmDescription,
    paused: bool,
) -> Result<(), MigrationError> {
    let hs = Phase::Handshake;
    let layout = desc.layout.clone();
    let mut rx = transport
        .try_clone()
        .map_err(|e| MigrationError::new(hs, ProtocolError::Io(e)))?;
    rx.set_read_timeout(Some(config.io_timeout))
        .map_err(|e| MigrationError::new(hs, ProtocolError::Io(e)))?;
    let mut transport = transport;
    transport
        .set_write_timeout(Some(config.io_timeout))
        .map_err(|e| MigrationError::new(hs, ProtocolError::Io(e)))?;
    // Every connection, for the paused phase's watchdog.
    let mut links: Vec<Box<dyn Transport>> = Vec::new();
    links.extend(transport.try_clone().ok());
    let mut fr = FrameReader::new(rx);
    let mut fw = FrameWriter::new(transport);

    // Handshake: refuse before a single page is sent.
    let mut hello = Hello::new(desc);
    hello.streams = config.streams;
    hello.paused = paused;
    fw.send(&hello).map_err(|e| MigrationError::new(hs, e))?;
    let reply = HelloReply::decode(&expect(
        &mut fr,
        MsgKind::HelloReply,
        hs,
        config.io_timeout,
    )?)
    .map_err(|e| MigrationError::new(hs, e))?;
    if !reply.accepted {
        return Err(MigrationError::new(hs, ErrorKind::Refused(reply.reason)));
    }
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&reply.version) {
        return Err(MigrationError::new(
            hs,
            ErrorKind::Invalid(format!(
                "the destination chose protocol version {}; this side speaks \
                 {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}",
                reply.version
            )),
        ));
    }
    if reply.streams > config.streams {
        return Err(MigrationError::new(
            hs,
            ErrorKind::Invalid(format!(
                "the destination granted {} streams, {} were asked for",
                reply.streams, config.streams
            )),
        ));
    }
    // Open the extra page streams (only when more than one was granted).
    let mut streams: Vec<FrameWriter<Box<dyn Transport>>> = Vec::new();
    if reply.streams > 1 {
        let Some(opener) = opener else {
            return Err(MigrationError::new(
                hs,
                ErrorKind::Invalid("no StreamOpener for the granted streams".into()),
            ));
        };
        for index in 0..reply.streams {
            let stream_err = |kind: ErrorKind| {
                MigrationError::new(
                    hs,
                    ErrorKind::Stream {
                        index,
                        source: Box::new(kind),
                    },
                )
            };
            let mut t = opener
                .open()
                .map_err(|e| stream_err(ProtocolError::Io(e).into()))?;
            t.set_write_timeout(Some(config.io_timeout))
                .map_err(|e| stream_err(ProtocolError::Io(e).into()))?;
            cancel.attach(t.try_clone().ok());
            links.extend(t.try_clone().ok());
            let mut w = FrameWriter::new(t);
            w.send(&StreamHello {
                token: reply.token,
                index,
            })
            .and_then(|_| w.flush())
            .map_err(|e| stream_err(e.into()))?;
            streams.push(w);
        }
    }
    report.streams = reply.streams;
    progress(&Progress::Accepted);

    // Measure the state (see `measure_state`).
    let (state_time, sections) = measure_state(vm, paused, config.downtime_limit)?;
    // A state that cannot travel is refused now, not after the pause.
    let frames = state_frames(sections.clone(), MAX_FRAME_PAYLOAD)
        .map_err(|e| MigrationError::new(hs, e))?;
    report.state_frames = frames.len() as u32;
    check_old_peer(reply.version, paused, frames.len())?;
    let state_bytes: u64 = sections
        .iter()
        .map(|s| s.data.len() as u64 + s.name.len() as u64 + 16)
        .sum();
    report.state_bytes = state_bytes;

    let ram = HostRam::new(vm.memory(), &layout).ok_or_else(|| {
        MigrationError::new(
            hs,
            ErrorKind::Invalid("guest memory is not one mapping per region".into()),
        )
    })?;
    let mut tracker = vm.dirty_tracker().map_err(|e| MigrationError::new(hs, e))?;
    report.dirty_tracking = tracker.describe();
    let lifted = Arc::new(AtomicBool::new(false));
    let new_sender = |fw, ram, rate| PageSender {
        fw,
        batch: PageBatch::with_capacity(
            (config.batch_pages.max(1) as usize) * PAGE_SIZE as usize + 4096,
        ),
        batch_pages: u64::from(config.batch_pages.max(1)),
        ram,
        layout: layout.clone(),
        pacer: Pacer::new(rate, lifted.clone()),
        counts: Counts::default(),
        skip_zero: true,
        skip_untouched: false,
        skipped: 0,
        pool: None,
        last_control: Instant::now(),
        lz4: config.compress.then(Vec::new),
        clear_time: Duration::ZERO,
        alive_every: keepalive_every(config.io_timeout),
    };
    let nstreams = streams.len() as u64;
    let per_stream_rate = config.max_bandwidth.map(|r| (r / nstreams.max(1)).max(1));
    let workers: Vec<PageSender<'_>> = streams
        .into_iter()
        .map(|w| new_sender(w, ram.clone(), per_stream_rate))
        .collect();
    let mut sender = new_sender(fw, ram, config.max_bandwidth);
    tracker.start().map_err(|e| MigrationError::new(hs, e))?;
    report.setup_ms = ms(started.elapsed());

    let throttler = Throttler::default();
    // An operator-paused VM is never throttled (the throttler resumes the
    // vCPUs it parked) — nor does it dirty memory.
    let throttle_target = if config.auto_converge && !paused {
        vm.throttle()
    } else {
        None
    };
    if config.auto_converge && throttle_target.is_none() {
        report.throttle_max_pct = None;
    }
    let failed = Arc::new(AtomicBool::new(false));
    let first_failed = Arc::new(AtomicU32::new(u32::MAX));
    let mut stream_bytes = 0u64;
    let outcome = std::thread::scope(|s| {
        if !workers.is_empty() {
            let mut pool = StreamPool {
                jobs: Vec::new(),
                done: Vec::new(),
                failed: failed.clone(),
                first_failed: first_failed.clone(),
            };
            for (i, w) in workers.into_iter().enumerate() {
                let (jtx, jrx) = crossbeam_channel::bounded(4);
                let (dtx, drx) = crossbeam_channel::bounded(1);
                let failed = &*failed;
                let first_failed = &*first_failed;
                let spawned = std::thread::Builder::new()
                    .name(format!("livemig-stream{i}"))
                    .spawn_scoped(s, move || {
                        stream_worker(i as u32, w, jrx, dtx, failed, first_failed)
                    });
                if let Err(e) = spawned {
                    return Err(MigrationError::new(
                        hs,
                        ErrorKind::Invalid(format!("cannot start page stream thread: {e}")),
                    ));
                }
                pool.jobs.push(jtx);
                pool.done.push(drx);
            }
            sender.pool = Some(pool);
        }
        if let Some(t) = throttle_target {
            let th = &throttler;
            let spawned = std::thread::Builder::new()
                .name("livemig-throttle".into())
                .spawn_scoped(s, move || th.run(t));
            if let Err(e) = spawned {
                log::warn!("auto-converge unavailable: {e}");
                throttler.exited.store(true, Ordering::SeqCst);
            }
        } else {
            throttler.exited.store(true, Ordering::SeqCst);
        }
        let r = precopy_and_switch(
            vm,
            &mut *tracker,
            &mut sender,
            &mut fr,
            config,
            cancel,
            progress,
            report,
            state_time,
            state_bytes,
            &throttler,
            &links,
        );
        throttler.finish(true);
        // Stop the stream threads (on success they have already finished).
        if let Some(pool) = sender.pool.take() {
            drop(pool.jobs);
            for rx in &pool.done {
                while rx.recv().is_ok() {}
            }
        }
        stream_bytes = sender.counts.bytes;
        r
    });
    let committed = matches!(&outcome, Ok(())) || matches!(&outcome, Err(e) if e.is_ambiguous());
    if let Err(e) = tracker.stop() {
        log::error!("stopping dirty logging: {e}");
    }
    report.bytes_sent = if nstreams > 0 {
        // Pages went over the streams; add the control connection's bytes.
        stream_bytes + sender.fw.bytes_written()
    } else {
        sender.fw.bytes_written()
    };
    if let Err(e) = &outcome {
        if !committed {
            // Fail safe: the source keeps the guest, in the run state the
            // operator left it in.
            if !paused {
                if let Err(re) = vm.resume() {
                    log::error!("resuming the source after a failed migration: {re}");
                }
            }
            let msg = ErrorMsg {
                phase: e.phase.to_string(),
                message: e.kind.to_string(),
            };
            let _ = sender.fw.send(&msg);
            // A peer-side failure usually shows up here as a broken pipe;
            // fetch the peer's own reason if it sent one.
            if let ErrorKind::Protocol(pe) = &e.kind {
                if pe.is_disconnect() {
                    let _ = fr
                        .get_mut()
                        .set_read_timeout(Some(Duration::from_millis(200)));
                    if let Ok(f) = fr.read_frame() {
                        if f.kind == MsgKind::Error {
                            if let Ok(m) = ErrorMsg::decode(f.payload) {
                                return Err(MigrationError::new(
                                    e.phase,
                                    ErrorKind::Remote {
                                        phase: m.phase,
                                        message: m.message,
                                    },
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    outcome
}

#[allow(clippy::too_many_arguments)]
fn precopy_and_switch<V: SourceVm + ?Sized>(
    vm: &V,
    tracker: &mut (dyn DirtyTracker + '_),
    sender: &mut PageSender<'_>,
    fr: &mut FrameReader<Box<dyn Transport>>,
    config: &MigrationConfig,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
    report: &mut Report,
    state_time: Duration,
    state_bytes: u64,
    throttler: &Throttler,
    links: &[Box<dyn Transport>],
) -> Result<(), MigrationError> {
    let layout = sender.layout.clone();
    let mut throttle = Throttle::default();
    let precopy_start = Instant::now();
    // Discard VMM writes recorded before tracking started: round 0 sends
    // everything anyway.
    let mut scratch = DirtyBitmap::new(&layout);
    merge_vmm_writes(vm, &mut scratch);

    // Round 0: every page, except those that certainly read as zero
    // ([`HostRam::populated`], asked per chunk after its re-arm): the
    // destination scrubbed its memory to zero in the handshake.
    let mut bitmap = DirtyBitmap::new(&layout);
    bitmap.set_all();

    let mut round = 0u32;
    let mut total_sent = 0u64;
    let mut total_time = Duration::ZERO;
    let forced;
    loop {
        let phase = Phase::Precopy(round);
        let t0 = Instant::now();
        let before = sender.counts;
        let clear = tracker.needs_clear();
        sender.skip_zero = round == 0;
        sender.skip_untouched = round == 0 && config.skip_untouched;
        let skipped_before = sender.skipped;
        sender.clear_time = Duration::ZERO;
        sender.send_bitmap(
            &bitmap,
            if clear { Some(&mut *tracker) } else { None },
            cancel,
            phase,
        )?;
        sender.end_round(phase, false)?;
        sender.skip_zero = false;
        sender.skip_untouched = false;
        let end = RoundEnd {
            round,
            pages: sender.counts.pages - before.pages,
        };
        sender
            .fw
            .send(&end)
            .map_err(|e| MigrationError::new(phase, e))?;
        let dur = t0.elapsed();
        bitmap.clear();
        tracker
            .sync(&mut bitmap)
            .map_err(|e| MigrationError::new(phase, e))?;
        merge_vmm_writes(vm, &mut bitmap);
        let dirty = bitmap.count();
        let secs = dur.as_secs_f64().max(1e-6);
        let bytes = sender.counts.bytes - before.bytes;
        // Sending time: the round minus re-arming the dirty log (a round 0
        // of a mostly idle guest is nearly all re-arming; counting it as
        // transfer time made the link look slow and an idle guest "not
        // converge" under load).
        let sending = dur
            .saturating_sub(sender.clear_time)
            .max(Duration::from_micros(50));
        let bandwidth = bytes as f64 / sending.as_secs_f64();
        // Bandwidth estimate: all bytes sent so far over all sending time,
        // so a tiny round (dominated by fixed costs) cannot drag it down.
        total_sent += bytes;
        total_time += sending;
        let est = RoundEstimate {
            remaining_bytes: dirty * PAGE_SIZE,
            bandwidth: total_sent as f64 / total_time.as_secs_f64().max(1e-6),
            state_time,
            state_bytes,
        };
        let dirtied = dirty * PAGE_SIZE;
        let pct = if round > 0 {
            throttle.after_round(config, dirtied, bytes)
        } else {
            0
        };
        if pct != throttler.pct.load(Ordering::SeqCst) {
            log::info!("auto-converge: throttling vCPUs to {pct} %");
            throttler.pct.store(pct, Ordering::SeqCst);
        }
        if let Some(m) = report.throttle_max_pct.as_mut() {
            *m = (*m).max(pct);
        }
        let rr = RoundReport {
            round,
            pages: sender.counts.pages - before.pages,
            zero_pages: sender.counts.zero - before.zero + sender.skipped - skipped_before,
            bytes,
            duration_ms: ms(dur),
            dirty_pages_after: dirty,
            dirty_rate_mbps: (dirty * PAGE_SIZE) as f64 / secs / 1e6,
            bandwidth_mbps: bandwidth / 1e6,
            expected_downtime_ms: ms(est.expected_downtime()),
            throttle_pct: pct,
        };
        log::info!("{rr}");
        progress(&Progress::Round(rr.clone()));
        report.rounds.push(rr);
        report.expected_downtime_ms = ms(est.expected_downtime());
        if cancel.is_cancelled() {
            return Err(MigrationError::new(phase, ErrorKind::Cancelled));
        }
        match decide(config, round, precopy_start.elapsed(), &est) {
            Decision::Continue => round += 1,
            Decision::Switchover => {
                forced = false;
                break;
            }
            Decision::ForceSwitchover => {
                forced = true;
                break;
            }
            Decision::GiveUp => {
                return Err(MigrationError::new(
                    phase,
                    ErrorKind::NotConverged {
                        rounds: round + 1,
                        expected_ms: ms(est.expected_downtime()),
                        limit_ms: ms(config.downtime_limit),
                    },
                ))
            }
        }
    }
    report.forced = forced;
    report.pages_sent = sender.counts.pages;
    report.zero_pages = sender.counts.zero + sender.skipped;

    // Stop-and-copy: stop throttling first so it cannot race the pause.
    throttler.finish(true);
    let t_pause = Instant::now();
    vm.pause()
        .map_err(|e| MigrationError::new(Phase::FinalMemory, e))?;
    // From here to `Go` the guest runs nowhere: bounded by `max_pause`.
    let deadline = PauseDeadline::arm(
        config.max_pause,
        links.iter().filter_map(|l| l.try_clone().ok()).collect(),
    );
    let expired = |e: MigrationError| {
        if deadline.expired() {
            MigrationError::new(
                e.phase,
                ErrorKind::PauseDeadline {
                    limit: deadline.limit(),
                    paused: deadline.paused_for(),
                },
            )
        } else {
            e
        }
    };
    let (t, ready) = stop_and_copy(vm, tracker, sender, fr, config, progress, report, bitmap)
        .map_err(expired)?;
    if cancel.is_cancelled() {
        return Err(MigrationError::new(Phase::Completion, ErrorKind::Cancelled));
    }

    // Commit: from here on only the destination's `Abandoned` lets the
    // source run the guest again (see `commit`).
    let cp = Phase::Completion;
    if !deadline.disarm() {
        let kind = ErrorKind::PauseDeadline {
            limit: deadline.limit(),
            paused: deadline.paused_for(),
        };
        return Err(MigrationError::new(cp, kind));
    }
    let answer_wait = config.io_timeout.saturating_mul(2);
    let resumed = match commit(&mut sender.fw, fr, &Go, answer_wait) {
        Commit::Committed(r) => r,
        Commit::Abandoned(why) => return Err(MigrationError::new(cp, ErrorKind::Abandoned(why))),
        Commit::Ambiguous(why) => return Err(MigrationError::new(cp, ErrorKind::Ambiguous(why))),
    };
    let t_done = Instant::now();

    report.pages_sent = sender.counts.pages;
    report.zero_pages = sender.counts.zero + sender.skipped;
    report.downtime_ms = ms(t_done - t_pause);
    let b = &mut report.downtime_breakdown;
    b.pause_ms = ms(t.paused - t_pause);
    b.state_save_ms = ms(t.saved - t.paused);
    b.final_sync_ms = ms(t.synced - t.saved);
    b.final_memory_ms = ms(t.mem - t.synced);
    b.state_transfer_ms = ms(t.ready - t.mem);
    b.dest_restore_ms = ready.restore_us as f64 / 1000.0;
    b.resume_ack_ms = ms(t_done - t.ready);
    b.dest_resume_ms = resumed.resume_us as f64 / 1000.0;
    progress(&Progress::Completed {
        downtime_ms: report.downtime_ms,
    });
    Ok(())
}

/// When each step of the stop-and-copy ended (in this order).
struct SwitchTimes {
    paused: Instant,
    saved: Instant,
    synced: Instant,
    mem: Instant,
    ready: Instant,
}

/// The paused part before the commit point, in this order: save the state,
/// the final dirty sync (the hypervisor's log and the VMM's bitmap, so it
/// includes what the save itself wrote), the last dirty pages, the state
/// frames, `Complete`, and the destination's `Ready`. The VM is paused.
#[allow(clippy::too_many_arguments)]
fn stop_and_copy<V: SourceVm + ?Sized>(
    vm: &V,
    tracker: &mut (dyn DirtyTracker + '_),
    sender: &mut PageSender<'_>,
    fr: &mut FrameReader<Box<dyn Transport>>,
    config: &MigrationConfig,
    progress: &mut dyn FnMut(&Progress),
    report: &mut Report,
    mut bitmap: DirtyBitmap,
) -> Result<(SwitchTimes, Ready), MigrationError> {
    let fm = Phase::FinalMemory;
    let st = Phase::State;
    let paused = Instant::now();
    // Save the state first: a device whose save writes guest memory
    // through the VMM's tracked path (vm-memory) does so now, and the final
    // sync below picks that page up with the rest (saved after the final
    // pages, such a write was lost).
    let sections = vm.save_state().map_err(|e| MigrationError::new(st, e))?;
    let saved = Instant::now();
    tracker
        .sync(&mut bitmap)
        .map_err(|e| MigrationError::new(fm, e))?;
    merge_vmm_writes(vm, &mut bitmap);
    let synced = Instant::now();
    progress(&Progress::Paused {
        remaining_pages: bitmap.count(),
    });
    let before = sender.counts;
    // The bandwidth cap protects the guest's network while it runs; while
    // it is paused every millisecond is downtime (QEMU lifts its limit at
    // completion too).
    sender.pacer.lifted.store(true, Ordering::SeqCst);
    // Paused: no need to re-arm the log, nothing is writing.
    sender.send_bitmap(&bitmap, None, &CancelToken::new(), fm)?;
    // One barrier: every stream flushes and ends with `Complete`.
    sender.end_round(fm, true)?;
    report.final_pages = sender.counts.pages - before.pages + sender.counts.zero - before.zero;
    let mem = Instant::now();

    report.state_bytes = sections.iter().map(|s| s.data.len() as u64).sum();
    let frames =
        state_frames(sections, MAX_FRAME_PAYLOAD).map_err(|e| MigrationError::new(st, e))?;
    report.state_frames = frames.len() as u32;
    let fw = &mut sender.fw;
    for state in &frames {
        fw.send(state).map_err(|e| MigrationError::new(st, e))?;
    }
    fw.write_frame(MsgKind::Complete, &[])
        .map_err(|e| MigrationError::new(st, e))?;
    fw.flush().map_err(|e| MigrationError::new(st, e))?;
    let ready = Ready::decode(&expect(
        fr,
        MsgKind::Ready,
        Phase::Completion,
        config.io_timeout,
    )?)
    .map_err(|e| MigrationError::new(Phase::Completion, e))?;
    let times = SwitchTimes {
        paused,
        synced,
        mem,
        saved,
        ready: Instant::now(),
    };
    Ok((times, ready))
}

/// What a destination that speaks only protocol version 2 (release 0.1.0)
/// cannot do, refused before any page: keep a paused VM paused (it would
/// resume it), and read a state of several `State` frames.
fn check_old_peer(version: u32, paused: bool, state_frames: usize) -> Result<(), MigrationError> {
    if version >= 3 {
        return Ok(());
    }
    let why = if paused {
        "the VM is paused, and a destination speaking protocol version 2 would resume it"
            .to_string()
    } else if state_frames > 1 {
        format!(
            "the device state needs {state_frames} State frames; a destination speaking \
             protocol version 2 reads one"
        )
    } else {
        return Ok(());
    };
    Err(MigrationError::new(
        Phase::Handshake,
        ErrorKind::Refused(why),
    ))
}

/// Measures the state before any page is sent: a short pause now tells
/// what the switchover costs beyond memory, and proves the state can be
/// saved before anything is committed.
///
/// The estimate: the pause latency capped at 2 ms (one slow pause under
/// host load must not make the policy believe every switchover costs that
/// much and never converge), the save, the destination's restore (taken as
/// long as the save: it issues the same state calls in reverse) and the
/// destination's resume (taken as long as this resume: as many vCPUs to
/// wake). A measurement over a quarter of `limit` is repeated (twice at
/// most) and the smallest kept, for the same reason. The state's bytes are
/// added at the measured bandwidth each round.
///
/// A VM the operator paused is only saved (never resumed). If pausing a
/// running VM fails, it is resumed (a pause that failed half-way may have
/// stopped some vCPUs), so it runs as before.
fn measure_state<V: SourceVm + ?Sized>(
    vm: &V,
    paused: bool,
    limit: Duration,
) -> Result<(Duration, Vec<crate::state::Section>), MigrationError> {
    let hs = Phase::Handshake;
    if paused {
        let t = Instant::now();
        let sections = vm.save_state().map_err(|e| MigrationError::new(hs, e))?;
        return Ok((t.elapsed(), sections));
    }
    let mut state_time = Duration::MAX;
    let mut sections = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        if let Err(e) = vm.pause() {
            if let Err(re) = vm.resume() {
                log::error!("resuming the source after a failed pause: {re}");
            }
            return Err(MigrationError::new(hs, e));
        }
        let t_paused = Instant::now();
        let saved = vm.save_state();
        let t_saved = Instant::now();
        let resumed = vm.resume();
        let t_resumed = Instant::now();
        let this = (t_paused - t).min(Duration::from_millis(2))
            + 2 * (t_saved - t_paused)
            + (t_resumed - t_saved);
        state_time = state_time.min(this);
        sections = saved.map_err(|e| MigrationError::new(hs, e))?;
        resumed.map_err(|e| MigrationError::new(hs, e))?;
        if state_time <= limit / 4 {
            break;
        }
    }
    Ok((state_time, sections))
}
