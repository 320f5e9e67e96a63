//! One connection's page writer: batching, zero pages, compression, the
//! bandwidth cap and keepalives.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::cancel::CancelToken;
use super::gather::GatherFrame;
use super::lz4::Lz4Switch;
use super::streams::StreamPool;
use crate::memory::{MemoryLayout, PAGE_SIZE};
use crate::policy::lz4::{Lz4Decider, SAMPLE_BYTES};
use crate::policy::{CompressionSample, LinkWindow, MigrationConfig};
use crate::protocol::{compress_pages_into, FrameWriter, MsgKind, PageBatch, ProtocolError};
use crate::ram::HostRam;
use crate::transport::Transport;

/// The bandwidth cap ([`MigrationConfig::max_bandwidth`]): one budget for
/// the whole migration, shared by the writers of every connection (the
/// control connection's and each page stream's clone the same [`Pacer`]),
/// so that all of them together stay within the cap and a stream with
/// nothing to send leaves its share to the others.
///
/// Each writer accounts the bytes it just wrote ([`Pacer::account`]) and
/// then waits the time returned: until the link, sending at the cap since
/// the budget began, would have carried every byte accounted so far by
/// any writer. Time nobody sent in is credit for at most [`PACER_CREDIT`]:
/// after an idle stretch the writers may burst that much, no more.
#[derive(Clone)]
pub(super) struct Pacer {
    budget: Arc<Budget>,
}

/// What the writers sharing a [`Pacer`] share.
struct Budget {
    /// Bytes per second; `None` (or 0): no cap.
    rate: Option<u64>,
    /// When the link, at `rate`, has carried every byte accounted so far.
    paid_until: Mutex<Instant>,
    /// Set when the cap no longer applies (the final copy, while paused).
    lifted: AtomicBool,
}

/// How long a budget remembers time nobody sent in (a burst after an idle
/// stretch carries at most this much time of the cap).
pub(super) const PACER_CREDIT: Duration = Duration::from_secs(1);

impl Pacer {
    /// A budget of `rate` bytes/s (`None`: no cap) that begins now.
    pub(super) fn new(rate: Option<u64>) -> Self {
        Pacer {
            budget: Arc::new(Budget {
                rate: rate.filter(|r| *r > 0),
                paid_until: Mutex::new(Instant::now()),
                lifted: AtomicBool::new(false),
            }),
        }
    }

    /// Lifts the cap for every writer sharing it, for good.
    pub(super) fn lift(&self) {
        self.budget.lifted.store(true, Ordering::SeqCst);
    }

    /// Accounts `bytes` just sent by one of the writers; returns how long
    /// that writer is to wait before sending more (it waits sending
    /// keepalives, see [`wait_with_keepalives`]). Zero without a cap or
    /// once it is lifted.
    pub(super) fn account(&self, bytes: u64) -> Duration {
        let Some(rate) = self.budget.rate else {
            return Duration::ZERO;
        };
        if self.budget.lifted.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let mut paid = self
            .budget
            .paid_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let from = match now.checked_sub(PACER_CREDIT) {
            Some(oldest) => (*paid).max(oldest),
            None => *paid,
        };
        *paid = from + Duration::from_secs_f64(bytes as f64 / rate as f64);
        paid.saturating_duration_since(now)
    }
}

/// Waits `wait` (for the bandwidth cap), writing a `Keepalive` on `fw`
/// whenever `every` passed without one and more is left to wait: a slow
/// cap never keeps the peer's read timeout waiting. Returns early, with
/// nothing written then, once `stop` says so (looked at every
/// [`STOP_POLL`]). Returns whether it wrote any keepalive.
pub(super) fn wait_with_keepalives(
    fw: &mut FrameWriter<Box<dyn Transport>>,
    wait: Duration,
    every: Duration,
    stop: &dyn Fn() -> bool,
) -> Result<bool, ProtocolError> {
    let until = Instant::now() + wait;
    let mut quiet_since = Instant::now();
    let mut wrote = false;
    loop {
        let now = Instant::now();
        if now >= until || stop() {
            return Ok(wrote);
        }
        let alive_at = quiet_since + every;
        std::thread::sleep(
            until
                .min(alive_at)
                .saturating_duration_since(now)
                .min(STOP_POLL),
        );
        let now = Instant::now();
        if now < until && now >= alive_at {
            fw.write_frame(MsgKind::Keepalive, &[])?;
            fw.flush()?;
            quiet_since = now;
            wrote = true;
        }
    }
}

/// How often a wait for the bandwidth cap looks at whether the migration
/// was cancelled.
const STOP_POLL: Duration = Duration::from_millis(10);

#[derive(Default, Clone, Copy, Debug)]
pub(super) struct Counts {
    pub(super) pages: u64,
    pub(super) zero: u64,
    pub(super) bytes: u64,
    /// Page-frame bytes given to LZ4 (every frame while compression is
    /// on, the samples while it is off), what they became,
    /// and the time it took, ns.
    pub(super) lz4_raw: u64,
    pub(super) lz4_packed: u64,
    pub(super) lz4_ns: u64,
    /// Page frames sent LZ4-compressed.
    pub(super) lz4_frames: u64,
    /// Time spent waiting for the link, ns: inside writes of page frames
    /// and in the bandwidth cap's pauses.
    pub(super) blocked_ns: u64,
}

impl Counts {
    pub(super) fn add(&mut self, c: Counts) {
        self.pages += c.pages;
        self.zero += c.zero;
        self.bytes += c.bytes;
        self.lz4_raw += c.lz4_raw;
        self.lz4_packed += c.lz4_packed;
        self.lz4_ns += c.lz4_ns;
        self.lz4_frames += c.lz4_frames;
        self.blocked_ns += c.blocked_ns;
    }

    /// What has been counted since `earlier`.
    pub(super) fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            pages: self.pages - earlier.pages,
            zero: self.zero - earlier.zero,
            bytes: self.bytes - earlier.bytes,
            lz4_raw: self.lz4_raw - earlier.lz4_raw,
            lz4_packed: self.lz4_packed - earlier.lz4_packed,
            lz4_ns: self.lz4_ns - earlier.lz4_ns,
            lz4_frames: self.lz4_frames - earlier.lz4_frames,
            blocked_ns: self.blocked_ns - earlier.blocked_ns,
        }
    }
}

pub(super) struct PageSender<'a> {
    pub(super) fw: FrameWriter<Box<dyn Transport>>,
    pub(super) batch: PageBatch,
    /// `PagesGather` frames, when granted ([`MigrationConfig::zero_copy`]):
    /// the frame being built.
    gather: Option<GatherFrame>,
    /// Whether the frame being built copies its pages into `batch` (no
    /// `PagesGather` granted, or a frame LZ4 will compress or sample).
    copy_frame: bool,
    pub(super) batch_pages: u64,
    pub(super) ram: HostRam<'a>,
    pub(super) layout: MemoryLayout,
    pub(super) pacer: Pacer,
    pub(super) counts: Counts,
    /// Round 0: the destination's memory is fresh (zero), so zero pages are
    /// counted but not sent at all.
    pub(super) skip_zero: bool,
    /// Round 0: pages that certainly read as zero ([`HostRam::populated`])
    /// are not read at all (the destination's memory is zero too).
    pub(super) skip_untouched: bool,
    /// Pages left out that way.
    pub(super) skipped: u64,
    /// The extra page streams, when there are several.
    pub(super) pool: Option<StreamPool>,
    /// When the control connection last carried a frame (keepalives while
    /// the pages go elsewhere).
    pub(super) last_control: Instant,
    /// Compression buffer, when compression is allowed
    /// ([`MigrationConfig::compress`]).
    pub(super) lz4: Option<Vec<u8>>,
    /// Whether page frames are compressed now: decided by each connection
    /// from its windows of page frames (shared by every stream).
    pub(super) lz4_on: Arc<Lz4Switch>,
    /// Page frames written (one in [`Lz4Decider::sample_every`] is
    /// compressed to measure while compression is off).
    frames: u64,
    /// Time spent re-arming the dirty log (not sending) in this round.
    pub(super) clear_time: Duration,
    /// Longest this connection stays silent ([`keepalive_every`]).
    pub(super) alive_every: Duration,
    /// When the first page was handed to a connection (the report's
    /// `first_page_ms`).
    pub(super) first_page: Option<Instant>,
    /// The page frames since this sender last looked at whether LZ4 pays.
    pub(super) lz4_window: Option<Lz4Window>,
    /// This connection's LZ4 decisions; it starts knowing the bandwidth
    /// cap if there is one: uncompressed, page data cannot move faster
    /// than the cap (all connections share it).
    lz4_decider: Lz4Decider,
    /// Whether this connection's windows decide (with page streams, only
    /// the first stream's do).
    lz4_decides: bool,
    /// Stop after the frame being written once this is cancelled
    /// ([`PageSender::stop_on`]).
    stop: Option<CancelToken>,
}

/// Page data (bytes of the pages, before compression) a sender writes
/// between two looks at whether LZ4 pays: a long round on a slow link
/// (round 0 above all) need not run to its end before the policy may
/// decide, and rounds shorter than this add up to one window.
pub(super) const LZ4_WINDOW_BYTES: u64 = 8 << 20;

/// Where a sender's current [`LZ4_WINDOW_BYTES`] window began. A window
/// may span rounds; the time between them (the dirty-log sync, the
/// convergence decision, the drain) is not the link's and is left out.
pub(super) struct Lz4Window {
    start: Instant,
    base: Counts,
    /// Whether LZ4 was on then.
    on: bool,
    /// Time between rounds, left out of the window's time.
    idle: Duration,
    /// Set when a round ended with this window open.
    idle_since: Option<Instant>,
}

impl Lz4Window {
    /// The window's time spent in rounds.
    fn busy(&self) -> Duration {
        let idle = self.idle + self.idle_since.map_or(Duration::ZERO, |t| t.elapsed());
        self.start.elapsed().saturating_sub(idle)
    }
}

impl<'a> PageSender<'a> {
    /// A writer of the pages of `ram` (laid out as `layout`) on `fw`,
    /// paced by `pacer` (the migration's one bandwidth budget); with
    /// `gather` (`PagesGather` granted), pages not compressed go straight
    /// from guest memory.
    pub(super) fn new(
        fw: FrameWriter<Box<dyn Transport>>,
        ram: HostRam<'a>,
        layout: &MemoryLayout,
        pacer: Pacer,
        lz4_on: Arc<Lz4Switch>,
        config: &MigrationConfig,
        gather: bool,
    ) -> Self {
        let batch_pages = config.batch_pages.max(1);
        PageSender {
            fw,
            gather: gather.then(GatherFrame::default),
            copy_frame: true,
            batch: PageBatch::with_capacity(batch_pages as usize * PAGE_SIZE as usize + 4096),
            batch_pages: u64::from(batch_pages),
            layout: layout.clone(),
            ram,
            pacer,
            counts: Counts::default(),
            skip_zero: true,
            skip_untouched: false,
            skipped: 0,
            pool: None,
            last_control: Instant::now(),
            lz4: config.compress.then(Vec::new),
            lz4_on,
            frames: 0,
            clear_time: Duration::ZERO,
            alive_every: keepalive_every(config.io_timeout),
            first_page: None,
            lz4_window: None,
            lz4_decider: Lz4Decider::new(config.max_bandwidth),
            lz4_decides: true,
            stop: None,
        }
    }

    /// Sets whether this connection's windows decide whether LZ4 is on,
    /// for all of `streams` page streams.
    pub(super) fn deciding_lz4(mut self, decides: bool, streams: u32) -> Self {
        self.lz4_decides = decides;
        self.lz4_decider = self.lz4_decider.for_streams(streams);
        self
    }

    /// Stops the page-stream threads, if any (on success they have
    /// finished already).
    pub(super) fn stop_streams(&mut self) {
        if let Some(pool) = self.pool.take() {
            drop(pool.jobs);
            for rx in &pool.done {
                while rx.recv().is_ok() {}
            }
        }
    }
}

/// Longest a connection stays silent before a keepalive goes out; shorter
/// with a short `io_timeout` (see [`keepalive_every`]).
pub(super) const KEEPALIVE: Duration = Duration::from_secs(1);

/// How often a silent connection sends a keepalive: [`KEEPALIVE`], or a
/// quarter of `io_timeout` if that is shorter (the destination is expected
/// to use a read timeout no shorter than the source's `io_timeout`).
pub(super) fn keepalive_every(io_timeout: Duration) -> Duration {
    KEEPALIVE.min(io_timeout / 4).max(Duration::from_millis(1))
}

impl PageSender<'_> {
    /// Whether page data goes straight from guest memory (`PagesGather`
    /// granted; frames LZ4 takes are still copied).
    pub(super) fn sends_gathered(&self) -> bool {
        self.gather.is_some()
    }

    /// Whether a frame is being built.
    fn frame_empty(&self) -> bool {
        self.batch.is_empty() && self.gather.as_ref().is_none_or(GatherFrame::is_empty)
    }

    /// Before a push: at the start of a frame, chooses whether it copies
    /// its pages (see [`PageSender::copy_frame`]).
    fn start_frame(&mut self) {
        if self.frame_empty() {
            let lz4 = self.lz4.is_some() && self.lz4_takes_next(self.lz4_on.is_on());
            self.copy_frame = self.gather.is_none() || lz4;
        }
    }

    /// Whether the next page frame goes through LZ4: every frame while it
    /// is `on`, else the deciding connection's samples (none once the
    /// final copy began, [`Lz4Switch::stop_sampling`]).
    fn lz4_takes_next(&self, on: bool) -> bool {
        on || (self.lz4_decides
            && self.lz4_on.samples()
            && self.frames.is_multiple_of(self.lz4_decider.sample_every()))
    }

    /// The most pages the next run may add: [`PageSender::batch_pages`],
    /// or what a `PagesGather` frame being built has room for (its page
    /// crcs make it 4 bytes a page longer than a `Pages` frame, which two
    /// runs of nearly `batch_pages` each could otherwise push past the
    /// frame limit).
    fn run_room(&self) -> u64 {
        match &self.gather {
            Some(g) if !self.copy_frame && !g.is_empty() => {
                self.batch_pages.saturating_sub(g.data_pages()).max(1)
            }
            _ => self.batch_pages,
        }
    }

    /// The frame being built: data pages and payload bytes.
    fn frame_size(&self) -> (u64, u64) {
        match &self.gather {
            Some(g) if !self.copy_frame => (g.data_pages(), g.len_bytes()),
            _ => (self.batch.data_pages(), self.batch.len_bytes() as u64),
        }
    }

    pub(super) fn flush(&mut self) -> Result<(), ProtocolError> {
        if self.frame_empty() {
            return Ok(());
        }
        let before = self.fw.bytes_written();
        let on = self.lz4_on.is_on();
        match &mut self.lz4_window {
            Some(w) => {
                if let Some(t) = w.idle_since.take() {
                    w.idle += t.elapsed();
                }
            }
            None if self.lz4.is_some() => {
                self.lz4_window = Some(Lz4Window {
                    start: Instant::now(),
                    base: self.counts,
                    on,
                    idle: Duration::ZERO,
                    idle_since: None,
                });
            }
            None => {}
        }
        let compressed = match self.gather.as_mut().filter(|g| !g.is_empty()) {
            Some(g) => {
                self.frames += 1;
                let t0 = Instant::now();
                g.write(&mut self.fw, &self.ram)?;
                self.counts.blocked_ns += t0.elapsed().as_nanos() as u64;
                false
            }
            None => self.write_batch(on)?,
        };
        self.counts.lz4_frames += u64::from(compressed);
        let n = self.fw.bytes_written() - before;
        self.counts.bytes += n;
        self.last_control = Instant::now();
        let wait = self.pacer.account(n);
        self.counts.blocked_ns += wait.as_nanos() as u64;
        self.pace(wait)?;
        self.look_at_lz4();
        Ok(())
    }

    /// Writes the copied frame in `batch` (LZ4-compressed where `on` and it
    /// pays) and empties it; returns whether it went compressed.
    fn write_batch(&mut self, on: bool) -> Result<bool, ProtocolError> {
        let raw = self.batch.as_bytes();
        let sample = self.lz4_takes_next(on);
        self.frames += 1;
        let packed = match self.lz4.as_mut().filter(|_| sample) {
            Some(buf) => {
                // While off, a sample measures LZ4 on the frame's start.
                let input = if on {
                    raw
                } else {
                    &raw[..raw.len().min(SAMPLE_BYTES)]
                };
                let t0 = Instant::now();
                let n = compress_pages_into(input, buf);
                self.counts.lz4_ns += t0.elapsed().as_nanos() as u64;
                self.counts.lz4_raw += input.len() as u64;
                self.counts.lz4_packed += n as u64;
                Some(n)
            }
            None => None,
        };
        // Keep it only if it saves at least an eighth.
        let compressed = on && packed.is_some_and(|n| n < raw.len() - raw.len() / 8);
        let (kind, payload) = match (&self.lz4, packed) {
            (Some(buf), Some(n)) if compressed => (MsgKind::PagesLz4, &buf[..n]),
            _ => (MsgKind::Pages, raw),
        };
        let t0 = Instant::now();
        self.fw.write_frame(kind, &[payload])?;
        self.counts.blocked_ns += t0.elapsed().as_nanos() as u64;
        self.batch.clear();
        Ok(compressed)
    }

    /// The round ended (its frames are written): the time until this
    /// connection's next page frame does not count in its LZ4 window.
    pub(super) fn pause_lz4_window(&mut self) {
        if let Some(w) = &mut self.lz4_window {
            w.idle_since.get_or_insert_with(Instant::now);
        }
    }

    /// Once [`LZ4_WINDOW_BYTES`] of page data went out since the window
    /// began: whether LZ4 pays on this connection ([`Lz4Decider::decide`]),
    /// switching it for every stream if not as it is. A window in which
    /// another stream switched is dropped undecided.
    fn look_at_lz4(&mut self) {
        let Some(w) = self.lz4_window.take() else {
            return;
        };
        let c = self.counts.since(&w.base);
        if c.pages * PAGE_SIZE < LZ4_WINDOW_BYTES {
            self.lz4_window = Some(w);
            return;
        }
        // Nor once the guest is paused (`Lz4Switch::stop_sampling`): the
        // decision stands, and a window that completed in the final copy
        // (blocked writes on a loaded host read as a slow link) turned LZ4
        // on in the middle of it (tests/final_copy_lz4.rs failed so, once,
        // under the full test run's load).
        if !self.lz4_decides || !self.lz4_on.samples() || self.lz4_on.is_on() != w.on {
            return;
        }
        let window = LinkWindow {
            wire_bytes: c.bytes,
            raw_bytes: c.pages * PAGE_SIZE,
            time: w.busy(),
            blocked: Duration::from_nanos(c.blocked_ns),
            compressing: w.on,
            lz4: CompressionSample {
                raw_bytes: c.lz4_raw,
                packed_bytes: c.lz4_packed,
                time: Duration::from_nanos(c.lz4_ns),
            },
        };
        if let Some(v) = self.lz4_decider.decide(&window) {
            if self.lz4_on.apply(v) {
                log::info!(
                    "LZ4 {} ({:?}) within the round: {window:?}",
                    if v.on { "on" } else { "off" },
                    v.reason
                );
            }
        }
    }

    /// Waits `wait` for the bandwidth cap, sending keepalives on this
    /// connection meanwhile ([`wait_with_keepalives`]).
    pub(super) fn pace(&mut self, wait: Duration) -> Result<(), ProtocolError> {
        let cancel = self.stop.as_ref();
        let stop = || cancel.is_some_and(CancelToken::is_cancelled);
        if wait_with_keepalives(&mut self.fw, wait, self.alive_every, &stop)? {
            self.last_control = Instant::now();
        }
        if stop() {
            return Err(ProtocolError::Io(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "cancelled",
            )));
        }
        Ok(())
    }

    /// Stops this sender after the page frame it is writing once `cancel`
    /// is cancelled (its next frame fails with an `Interrupted` I/O error),
    /// so that a cancelled migration can still tell the destination why
    /// (the cancel shuts the connections down only after
    /// [`super::SOURCE_CANCEL_GRACE`]).
    pub(super) fn stop_on(mut self, cancel: &CancelToken) -> Self {
        self.stop = Some(cancel.clone());
        self
    }

    pub(super) fn gpa(&self, region: usize, page: u64) -> u64 {
        self.layout.regions()[region].guest_addr + page * PAGE_SIZE
    }

    /// Sends pages `first..first+npages` of `region`, zero pages as markers.
    pub(super) fn send_run(
        &mut self,
        region: usize,
        first: u64,
        npages: u64,
    ) -> Result<(), ProtocolError> {
        // Never merge with a record of the previous run: it may end exactly
        // where this region begins.
        self.batch.end_record();
        let mut p = first;
        let end = first + npages;
        while p < end {
            let zero = self.ram.is_zero(region, p);
            let room = self.run_room();
            let mut q = p + 1;
            while q < end && q - p < room && self.ram.is_zero(region, q) == zero {
                q += 1;
            }
            let n = q - p;
            let gpa = self.gpa(region, p);
            if !(zero && self.skip_zero) {
                self.start_frame();
            }
            let gather = self.gather.as_mut().filter(|_| !self.copy_frame);
            if let Some(g) = gather {
                if !zero {
                    g.push_data(&self.ram, region, p, n, gpa)?;
                    self.counts.pages += n;
                } else if !self.skip_zero {
                    g.push_zero(gpa, n as u32)?;
                }
                self.counts.zero += if zero { n } else { 0 };
            } else if zero {
                if !self.skip_zero {
                    self.batch.push_zero(gpa, n as u32)?;
                }
                self.counts.zero += n;
            } else {
                let ram = &self.ram;
                self.batch.push_data_over(gpa, n as u32, |dst| {
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
            let (data_pages, bytes) = self.frame_size();
            if data_pages >= self.batch_pages || bytes >= self.batch_pages * PAGE_SIZE {
                self.flush()?;
            }
            p = q;
        }
        Ok(())
    }

    /// A keepalive on this connection if it has been quiet for
    /// the keepalive interval (with page streams its pages travel elsewhere; alone,
    /// re-arming the dirty log of a large idle region can take a while).
    pub(super) fn keepalive(&mut self) -> Result<(), ProtocolError> {
        if self.last_control.elapsed() >= self.alive_every {
            self.fw.write_frame(MsgKind::Keepalive, &[])?;
            self.fw.flush()?;
            self.last_control = Instant::now();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every clone of a [`Pacer`] draws on one budget: what one writer
    /// sent makes the next writer wait too, and lifting it lifts it for
    /// all. (Bounds are loose: only the waits computed are compared, a
    /// stalled test thread can only make them shorter.)
    #[test]
    fn clones_of_a_pacer_share_one_budget() {
        let rate = 1 << 20;
        let a = Pacer::new(Some(rate));
        let b = a.clone();
        let half = Duration::from_millis(500);
        // No credit at the start: half a second's bytes wait about that.
        let wa = a.account(rate / 2);
        assert!(wa <= half && wa > half / 2, "{wa:?}");
        // The other writer queues behind them: about a second in all
        // (with a budget of its own, half a second).
        let wb = b.account(rate / 2);
        assert!(wb <= 2 * half && wb > half + half / 2, "{wb:?}");
        a.lift();
        assert_eq!(b.account(rate), Duration::ZERO);
        assert_eq!(Pacer::new(None).account(rate), Duration::ZERO);
    }
}
