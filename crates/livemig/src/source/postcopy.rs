//! Post-copy on the source (see `docs/postcopy.md`): [`migrate_postcopy`],
//! when to switch, the switch itself (`PostcopySwitch` instead of the final
//! pages) and, after `Go`, serving requests and pushing the rest.

mod prepare;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use super::precopy::Converged;
use super::sender::wait_with_keepalives;
use super::session::{ms, Session, Tracking};
use super::switchover::{Committed, NotCommitted};
use super::CancelToken;
use crate::bitmap::DirtyBitmap;
use crate::error::{ErrorKind, MigrationError, Phase};
use crate::memory::{MemoryLayout, PAGE_SIZE};
use crate::policy::{ConfigError, Decision, MigrationConfig, RoundEstimate};
use crate::protocol::{
    FrameReader, FrameWriter, Message, MsgKind, PageBatch, PageRequest, PageRun, PostcopyComplete,
    PostcopyPushed, PostcopyResume, PostcopySwitch, ProtocolError,
};
use crate::ram::HostRam;
use crate::report::{Progress, Report, RoundReport};
use crate::transport::Transport;
use crate::vm::SourceVm;

/// Asks a running migration to switch to post-copy after its current
/// round (an operator's "switch now"). Clone it to another thread; the
/// request is checked after every pre-copy round.
#[derive(Debug, Clone, Default)]
pub struct SwitchRequest(Arc<AtomicBool>);

impl SwitchRequest {
    /// A request not made yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Switch after the current round (if post-copy was granted; a
    /// migration without post-copy ignores it).
    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether [`SwitchRequest::request`] was called.
    pub fn is_requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// When to switch to post-copy.
#[derive(Debug, Clone)]
pub struct PostcopyConfig {
    /// Switch after this many pre-copy rounds (0 = pure post-copy: no
    /// round at all), unless pre-copy converged first.
    pub after_rounds: u32,
    /// Also switch when pre-copy is predicted not to converge (see
    /// `switch_now`: two rounds in a row that dirtied more than half of
    /// what they sent, or the policy's cap reached), instead of throttling
    /// the guest, failing or pausing too long. The guest is then never
    /// throttled (auto-converge is not used).
    pub on_non_convergence: bool,
    /// Switch after the round during which this was requested.
    pub request: SwitchRequest,
}

impl Default for PostcopyConfig {
    fn default() -> Self {
        PostcopyConfig {
            after_rounds: u32::MAX,
            on_non_convergence: true,
            request: SwitchRequest::new(),
        }
    }
}

/// What the source's post-copy phase did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PostcopySourceReport {
    /// Why the migration switched.
    pub reason: String,
    /// Pre-copy rounds before the switch.
    pub rounds_before: u32,
    /// Pages the destination dropped at the switch (all sent again).
    pub discard_pages: u64,
    /// Requests answered.
    pub requests: u64,
    /// Pages sent as answers to requests.
    pub requested_pages: u64,
    /// Pages sent by the background push: every page of the discard set
    /// (a requested page is pushed too, unless the push had sent it before;
    /// the destination installs the first copy that arrives).
    pub pushed_pages: u64,
    /// From `Resumed` to `PostcopyComplete`, ms.
    pub switch_to_complete_ms: f64,
    /// Times the post-copy phase continued over new connections.
    pub reconnects: u32,
    /// Pages the destination dropped before the pause (`PostcopyPrepare`;
    /// 0 when the destination does not prepare: then it drops the whole
    /// discard set inside the downtime).
    pub prepared_pages: u64,
    /// From `PostcopyPrepare` to the destination's `PostcopyArmed`, ms
    /// (the guest ran here meanwhile).
    pub prepare_ms: f64,
    /// The destination's arming, as it reported it, ms.
    pub destination_arm_ms: f64,
    /// Pages dirtied between the prepare and the pause: the only ones the
    /// destination drops inside the downtime.
    pub late_discard_pages: u64,
}

/// Gives a new (control, fault) pair of connections to the same
/// destination after the previous pair broke during post-copy, or `None` to
/// give up (it decides how long to try: dial with retries until a deadline,
/// say).
pub type Reconnect = Box<dyn FnMut() -> Option<(Box<dyn Transport>, Box<dyn Transport>)>>;

/// Post-copy asked for by the call.
pub(super) struct Plan {
    config: PostcopyConfig,
    fault: Mutex<Option<Box<dyn Transport>>>,
    reconnect: Mutex<Option<Reconnect>>,
    reason: Mutex<Option<(String, u32)>>,
    /// The destination armed before the pause, and the late pages the
    /// switch named.
    prepared: Mutex<Option<(prepare::Prepared, u64)>>,
}

/// Like [`crate::migrate`], offering post-copy; `fault` is a second
/// connection to the same destination (`receive_postcopy`'s `fault`),
/// used for page requests and their answers only. The same as
/// `Migration::new(vm).config(..).cancel(..).progress(..)
/// .postcopy(fault, postcopy).run(transport)`; a resumable post-copy adds
/// [`crate::Migration::postcopy_reconnect`].
///
/// A destination that does not grant post-copy gets a pre-copy migration.
/// Once switched, the guest runs on the destination from `Go` on; an error
/// after that ([`ErrorKind::PostcopyInterrupted`]) leaves the source VM
/// paused with its memory intact.
pub fn migrate_postcopy<V: SourceVm + ?Sized>(
    vm: &V,
    transport: Box<dyn Transport>,
    fault: Box<dyn Transport>,
    postcopy: &PostcopyConfig,
    config: &MigrationConfig,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, MigrationError> {
    super::Migration::new(vm)
        .config(config.clone())
        .cancel(cancel.clone())
        .progress(progress)
        .postcopy(fault, postcopy.clone())
        .run(transport)
}

impl Plan {
    /// Post-copy as `config` says, with page requests on `fault`.
    pub(super) fn new(fault: Box<dyn Transport>, config: PostcopyConfig) -> Plan {
        Plan {
            config,
            fault: Mutex::new(Some(fault)),
            reconnect: Mutex::new(None),
            reason: Mutex::new(None),
            prepared: Mutex::new(None),
        }
    }

    /// Continues over new connections from `reconnect` after a break.
    pub(super) fn set_reconnect(&mut self, reconnect: Reconnect) {
        *self.reconnect.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(reconnect);
    }
}

/// Post-copy uses one page stream in this build.
pub(super) fn check_streams(streams: u32) -> Result<(), MigrationError> {
    if streams > 1 {
        let e = ConfigError {
            field: "streams",
            value: streams.to_string(),
            rule: "post-copy uses one page stream in this build".into(),
        };
        return Err(MigrationError::new(Phase::Handshake, e));
    }
    Ok(())
}

/// Whether `Hello` offers post-copy: asked for, and the VM is running (a
/// VM its operator paused has nothing to gain).
pub(super) fn offer<V: SourceVm + ?Sized>(s: &Session<'_, V>) -> bool {
    s.postcopy.is_some() && !s.paused
}

/// A grant is only valid for an offer.
pub(super) fn check_grant(offered: bool, granted: bool) -> Result<(), MigrationError> {
    if granted && !offered {
        let e = ErrorKind::Unexpected {
            got: "a post-copy grant".into(),
            expected: "HelloReply without post-copy (it was not offered)",
        };
        return Err(MigrationError::new(Phase::Handshake, e));
    }
    Ok(())
}

fn decide_switch<V: SourceVm + ?Sized>(
    s: &mut Session<'_, V>,
    reason: String,
    rounds: u32,
) -> bool {
    log::info!("switching to post-copy: {reason}");
    (s.progress)(&Progress::Postcopy {
        reason: reason.clone(),
    });
    if let Some(plan) = &s.postcopy {
        *plan.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some((reason, rounds));
    }
    true
}

/// Whether the migration decided to switch to post-copy (the switchover
/// then sends `PostcopySwitch` instead of the final pages).
pub(super) fn switched<V: SourceVm + ?Sized>(s: &Session<'_, V>) -> bool {
    s.postcopy
        .as_ref()
        .is_some_and(|p| lock(&p.reason).is_some())
}

/// Pure post-copy: granted and asked for after 0 rounds.
pub(super) fn pure<V: SourceVm + ?Sized>(s: &mut Session<'_, V>, t: &Tracking<'_>) -> bool {
    let pure = s
        .postcopy
        .as_ref()
        .is_some_and(|plan| t.postcopy && plan.config.after_rounds == 0);
    pure && decide_switch(s, "pure post-copy (asked for)".into(), 0)
}

/// Whether post-copy replaces auto-converge: granted, and asked to switch
/// on non-convergence. The guest is then never throttled.
pub(super) fn replaces_throttle<V: SourceVm + ?Sized>(
    s: &Session<'_, V>,
    t: &Tracking<'_>,
) -> bool {
    t.postcopy
        && s.postcopy
            .as_ref()
            .is_some_and(|p| p.config.on_non_convergence)
}

/// Rounds after the full pass in which the guest dirtied more than half of
/// what the round sent (auto-converge's own "strike"), counted back from
/// the last round while they follow each other.
fn strikes(rounds: &[RoundReport]) -> usize {
    rounds
        .iter()
        .skip(1)
        .rev()
        .take_while(|r| (r.dirty_pages_after * PAGE_SIZE).saturating_mul(2) > r.bytes)
        .count()
}

/// After the last pre-copy round of `rounds`: switch to post-copy now?
/// Never when pre-copy converged (`decision` is a switchover within the
/// limit). Otherwise: when the operator's round count is reached; and, with
/// [`PostcopyConfig::on_non_convergence`], when pre-copy is predicted not
/// to converge — two rounds in a row dirtied more than half of what they
/// sent (where auto-converge would start throttling) — or when the policy
/// gives up or would force a switchover over the limit.
pub(super) fn switch_now<V: SourceVm + ?Sized>(
    s: &mut Session<'_, V>,
    t: &Tracking<'_>,
    rounds: &[RoundReport],
    decision: &Decision,
    est: &RoundEstimate,
) -> bool {
    let Some(plan) = s.postcopy.as_ref().filter(|_| t.postcopy) else {
        return false;
    };
    let (after_rounds, auto) = (plan.config.after_rounds, plan.config.on_non_convergence);
    let asked = plan.config.request.is_requested();
    let n = rounds.len() as u32;
    let over = || {
        format!(
            "expected downtime {:.1} ms > limit {:.1} ms after {n} round(s)",
            ms(est.expected_downtime()),
            ms(s.config.downtime_limit)
        )
    };
    match decision {
        Decision::Switchover => false,
        _ if n >= after_rounds => {
            decide_switch(s, format!("asked for after {n} pre-copy round(s)"), n)
        }
        _ if asked => decide_switch(
            s,
            format!("requested during the migration, after {n} pre-copy round(s)"),
            n,
        ),
        _ if auto && strikes(rounds) >= 2 => {
            let why = format!(
                "pre-copy does not converge: the guest dirtied more than half of what the \
                 last two rounds sent; {}",
                over()
            );
            decide_switch(s, why, n)
        }
        Decision::GiveUp | Decision::ForceSwitchover if auto => {
            let why = format!("pre-copy reached its cap without converging: {}", over());
            decide_switch(s, why, n)
        }
        _ => false,
    }
}

/// The switch, while paused: `PostcopySwitch` instead of the final pages,
/// with the pages still to come (`bitmap`) — after a prepare, only those
/// the destination has not dropped yet. Returns the pages sent (none).
pub(super) fn switch<V: SourceVm + ?Sized>(
    s: &Session<'_, V>,
    t: &mut Tracking<'_>,
    bitmap: &DirtyBitmap,
) -> Result<u64, MigrationError> {
    let prepared = s.postcopy.as_ref().map(|p| lock(&p.prepared));
    let discard = match prepared {
        Some(mut guard) => match guard.as_mut() {
            Some((p, late)) => {
                let (runs, pages) = prepare::late_runs(bitmap, p);
                *late = pages;
                runs
            }
            None => prepare::runs_of(bitmap),
        },
        None => prepare::runs_of(bitmap),
    };
    let fm = Phase::FinalMemory;
    let fw = &mut t.sender.fw;
    fw.send(&PostcopySwitch { discard })
        .and_then(|_| fw.flush())
        .map_err(|e| MigrationError::new(fm, e))?;
    t.discard = Some(bitmap.clone());
    Ok(0)
}

/// The switch and everything after it, with the fault connection's
/// request server running from before the pause to the end: the
/// destination may need pages before `Go` (a device whose restore reads
/// guest memory), and the paused source's memory is final, so answering
/// then is safe.
pub(super) fn switch_and_serve<V: SourceVm + ?Sized>(
    s: &mut Session<'_, V>,
    t: &mut Tracking<'_>,
    converged: Converged,
) -> Result<Committed, NotCommitted> {
    let hs = Phase::FinalMemory;
    let no_fault = || MigrationError::new(hs, ErrorKind::Internal(internal("no fault connection")));
    let fault = s
        .postcopy
        .as_ref()
        .and_then(|p| lock(&p.fault).take())
        .ok_or_else(no_fault)?;
    let io = |e: std::io::Error| MigrationError::new(hs, ProtocolError::Io(e));
    let fault_rx = fault.try_clone().map_err(io)?;
    let stopper = fault.try_clone().map_err(io)?;
    let closer = fault.try_clone().map_err(io)?;
    let ram = t.sender.ram.clone();
    let layout = t.sender.layout.clone();
    let shared = Shared::new(&ram, &layout);
    std::thread::scope(|scope| {
        let server = scope.spawn(|| shared.answer(FrameReader::new(fault_rx), fault));
        let r = (|| {
            let mut converged = converged;
            if t.postcopy_prepare {
                let p = prepare::prepare(s, t, &mut converged.bitmap)?;
                if let Some(plan) = &s.postcopy {
                    *lock(&plan.prepared) = Some((p, 0));
                }
            }
            let paused = converged.stop_and_copy(s, t)?;
            let committed = paused.commit(s, t)?;
            // The guest runs on the destination from here; any failure
            // leaves the source paused with its memory intact.
            after_commit(s, t, &shared, (server, stopper)).map_err(NotCommitted::Ambiguous)?;
            Ok(committed)
        })();
        // A failure before `Go` leaves the request server running: stop it.
        shared.stop.store(true, Ordering::SeqCst);
        let _ = closer.shutdown();
        r
    })
}

fn internal(why: &str) -> crate::error::InternalError {
    crate::error::InternalError::Postcopy(why.into())
}

/// The request server of the first fault connection, and a handle to
/// shut that connection down.
type FirstServer<'scope> = (
    std::thread::ScopedJoinHandle<'scope, Result<(), String>>,
    Box<dyn Transport>,
);

/// After `Resumed`: serves requests and pushes every page of the discard
/// set, until the destination confirms it has them all.
fn after_commit<V: SourceVm + ?Sized>(
    s: &Session<'_, V>,
    t: &mut Tracking<'_>,
    shared: &Shared<'_>,
    first: FirstServer<'_>,
) -> Result<(), MigrationError> {
    let (Some(discard), Some(plan)) = (t.discard.take(), s.postcopy.as_ref()) else {
        let _ = first.1.shutdown();
        return Ok(());
    };
    let (reason, rounds_before) = lock(&plan.reason).take().unwrap_or_default();
    let started = Instant::now();
    let mut reconnect = lock(&plan.reconnect).take();
    let mut report = serve(
        t,
        shared,
        discard,
        first,
        &mut reconnect,
        s.config.io_timeout,
    )?;
    report.reason = reason;
    report.rounds_before = rounds_before;
    if let Some((p, late)) = lock(&plan.prepared).take() {
        report.prepared_pages = p.set.count();
        report.prepare_ms = p.prepare_ms;
        report.destination_arm_ms = p.arm_us as f64 / 1000.0;
        report.late_discard_pages = late;
    }
    report.switch_to_complete_ms = ms(started.elapsed());
    t.postcopy_report = Some(report);
    Ok(())
}

fn interrupted(missing: u64, why: String) -> MigrationError {
    MigrationError::new(
        Phase::Postcopy,
        ErrorKind::PostcopyInterrupted { missing, why },
    )
}

/// What the request server and the pusher share.
struct Shared<'r> {
    ram: &'r HostRam<'r>,
    layout: &'r MemoryLayout,
    /// Pages of the discard set the push has not sent yet.
    unsent: Mutex<DirtyBitmap>,
    /// Where the last request was (the push continues from there: pages
    /// near a fault are likely next).
    hint: Mutex<Option<(usize, u64)>>,
    stop: AtomicBool,
    requests: Mutex<(u64, u64)>,
}

impl<'r> Shared<'r> {
    fn new(ram: &'r HostRam<'r>, layout: &'r MemoryLayout) -> Self {
        Shared {
            ram,
            layout,
            unsent: Mutex::new(DirtyBitmap::new(layout)),
            hint: Mutex::new(None),
            stop: AtomicBool::new(false),
            requests: Mutex::new((0, 0)),
        }
    }
}

fn serve(
    t: &mut Tracking<'_>,
    shared: &Shared<'_>,
    discard: DirtyBitmap,
    first: FirstServer<'_>,
    reconnect: &mut Option<Reconnect>,
    io_timeout: std::time::Duration,
) -> Result<PostcopySourceReport, MigrationError> {
    let layout = t.sender.layout.clone();
    let discard_pages = discard.count();
    *lock(&shared.unsent) = discard;
    let mut pushed_pages = 0;
    let mut reconnects = 0;
    let mut first = Some(first);
    let mut fault = None;
    loop {
        let r = match (first.take(), fault.take()) {
            (Some((server, stopper)), _) => {
                shared.attempt_first(t, server, stopper, &mut pushed_pages)
            }
            (None, Some(f)) => shared.attempt(t, f, &mut pushed_pages),
            (None, None) => Err("no fault connection".into()),
        };
        let why = match r {
            Ok(()) => break,
            Err(why) => why,
        };
        let missing = lock(&shared.unsent).count();
        let Some((control, next_fault)) = reconnect.as_mut().and_then(|r| r()) else {
            return Err(interrupted(missing, why));
        };
        log::warn!("post-copy: {why}; continuing on new connections");
        reconnects += 1;
        let (reader, writer) = crate::control::open(control, io_timeout)
            .map_err(|e| interrupted(missing, e.to_string()))?;
        t.control = reader;
        t.sender.fw = writer;
        let resume: PostcopyResume = t
            .control
            .recv(Phase::Postcopy)
            .map_err(|e| interrupted(missing, e.to_string()))?;
        let mut unsent = DirtyBitmap::new(&layout);
        for run in &resume.missing {
            run.check(&layout)
                .map_err(|e| interrupted(missing, e.to_string()))?;
            unsent.set_range(run.region as usize, run.first_page, run.npages);
        }
        *lock(&shared.unsent) = unsent;
        fault = Some(next_fault);
    }
    let (requests, requested_pages) = *lock(&shared.requests);
    Ok(PostcopySourceReport {
        discard_pages,
        requests,
        requested_pages,
        pushed_pages,
        reconnects,
        ..PostcopySourceReport::default()
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Pages per pushed frame (1 MiB).
const PUSH_PAGES: u64 = 256;

impl Shared<'_> {
    /// The first pair of connections: the request server runs already
    /// (since the switch); the push, until the destination has every page
    /// (`Ok`) or a connection broke.
    fn attempt_first(
        &self,
        t: &mut Tracking<'_>,
        server: std::thread::ScopedJoinHandle<'_, Result<(), String>>,
        stopper: Box<dyn Transport>,
        pushed: &mut u64,
    ) -> Result<(), String> {
        self.push_while_serving(t, server, &*stopper, pushed)
    }

    /// Pushes the pages while `server` answers requests; then stops the
    /// server (shutting its connection down through `stopper`) and returns
    /// the first failure of either.
    fn push_while_serving(
        &self,
        t: &mut Tracking<'_>,
        server: std::thread::ScopedJoinHandle<'_, Result<(), String>>,
        stopper: &dyn Transport,
        pushed: &mut u64,
    ) -> Result<(), String> {
        let r = self.push(t, pushed);
        self.stop.store(true, Ordering::SeqCst);
        let _ = stopper.shutdown();
        match (r, server.join()) {
            (Ok(()), Ok(Ok(()))) => Ok(()),
            (Err(e), _) => Err(e),
            (_, Ok(Err(why))) => Err(why),
            (_, Err(_)) => Err("the request server panicked".into()),
        }
    }

    /// One pair of connections: the request server and the push, until
    /// the destination has every page (`Ok`) or a connection broke.
    fn attempt(
        &self,
        t: &mut Tracking<'_>,
        fault: Box<dyn Transport>,
        pushed: &mut u64,
    ) -> Result<(), String> {
        let fault_rx = fault.try_clone().map_err(|e| e.to_string())?;
        let stopper = fault.try_clone().map_err(|e| e.to_string())?;
        self.stop.store(false, Ordering::SeqCst);
        std::thread::scope(|scope| {
            let server = scope.spawn(|| self.answer(FrameReader::new(fault_rx), fault));
            self.push_while_serving(t, server, &*stopper, pushed)
        })
    }

    /// The fault connection: each request answered at once.
    fn answer(
        &self,
        mut fr: FrameReader<Box<dyn Transport>>,
        fault: Box<dyn Transport>,
    ) -> Result<(), String> {
        let mut fw = FrameWriter::new(fault);
        let mut batch = PageBatch::with_capacity(PageBatch::data_record_len(64));
        loop {
            let f = match fr.read_frame() {
                Ok(f) => f,
                Err(_) if self.stop.load(Ordering::SeqCst) => return Ok(()),
                Err(e) => {
                    // The push still sends every page: a broken fault
                    // connection costs latency, not correctness.
                    log::warn!("post-copy fault connection: {e}; pushing the rest");
                    return Ok(());
                }
            };
            let req = match f.kind {
                MsgKind::PageRequest => {
                    PageRequest::decode(f.payload).map_err(|e| e.to_string())?
                }
                MsgKind::Keepalive => continue,
                other => return Err(format!("unexpected {other} frame on the fault connection")),
            };
            let (region, page, n) = (req.region as usize, req.page, u64::from(req.npages));
            PageRun {
                region: req.region,
                first_page: page,
                npages: n,
            }
            .check(self.layout)
            .map_err(|e| e.to_string())?;
            batch.clear();
            self.fill(&mut batch, region, page, n)
                .map_err(|e| e.to_string())?;
            let sent = fw
                .write_frame(MsgKind::Pages, &[batch.as_bytes()])
                .and_then(|_| fw.flush());
            if let Err(e) = sent {
                log::warn!("post-copy fault connection: {e}; pushing the rest");
                return Ok(());
            }
            // The push still sends these pages (the destination installs
            // the first copy): the push alone delivers every page, so an
            // answer lost with a broken fault connection costs latency,
            // never completion. It continues from here.
            *lock(&self.hint) = Some((region, page));
            let mut r = lock(&self.requests);
            r.0 += 1;
            r.1 += n;
        }
    }

    /// Appends pages `page..page + n` of `region` to `batch`: zero pages
    /// as markers, the others with their contents.
    fn fill(
        &self,
        batch: &mut PageBatch,
        region: usize,
        page: u64,
        n: u64,
    ) -> Result<(), ProtocolError> {
        let base = self.layout.regions()[region].guest_addr;
        for p in page..page + n {
            let gpa = base + p * PAGE_SIZE;
            if self.ram.is_zero(region, p) {
                batch.push_zero(gpa, 1)?;
            } else {
                batch.push_data_over(gpa, 1, |dst| {
                    if self.ram.read_pages(region, p, dst) {
                        Ok(())
                    } else {
                        Err(ProtocolError::Unencodable {
                            msg: "Pages",
                            reason: format!("page {p} of region {region} is outside memory"),
                        })
                    }
                })?;
            }
        }
        batch.end_record();
        Ok(())
    }

    /// The next run of unsent pages (at most [`PUSH_PAGES`]), from the last
    /// request's neighbourhood or else from `cursor`; marks it sent.
    fn next_run(&self, cursor: &mut (usize, u64)) -> Option<(usize, u64, u64)> {
        if let Some(h) = lock(&self.hint).take() {
            *cursor = h;
        }
        let mut unsent = lock(&self.unsent);
        let regions = unsent.num_regions();
        // Two passes: from the cursor to the end, then from the start.
        for pass in 0..2 {
            let from_region = if pass == 0 { cursor.0 } else { 0 };
            for region in from_region..regions {
                let end = unsent.region_pages(region);
                let first = if pass == 0 && region == cursor.0 {
                    cursor.1.min(end)
                } else {
                    0
                };
                let run = unsent.runs_in(region, first, end, PUSH_PAGES).next();
                if let Some(r) = run {
                    for p in r.first_page..r.first_page + r.npages {
                        unsent.unset(region, p);
                    }
                    *cursor = (region, r.first_page + r.npages);
                    return Some((region, r.first_page, r.npages));
                }
            }
        }
        None
    }

    /// The control connection: every unsent page, then `PostcopyPushed`,
    /// then the destination's `PostcopyComplete`. Returns the pages pushed.
    fn push(&self, t: &mut Tracking<'_>, pushed: &mut u64) -> Result<(), String> {
        let alive_every = t.sender.alive_every;
        let (fw, pacer) = (&mut t.sender.fw, &t.sender.pacer);
        let mut batch = PageBatch::with_capacity(PageBatch::data_record_len(PUSH_PAGES as u32));
        let mut cursor = (0, 0);
        while let Some((region, page, n)) = self.next_run(&mut cursor) {
            batch.clear();
            self.fill(&mut batch, region, page, n)
                .map_err(|e| e.to_string())?;
            fw.write_frame(MsgKind::Pages, &[batch.as_bytes()])
                .and_then(|_| fw.flush())
                .map_err(|e| e.to_string())?;
            *pushed += n;
            // `max_bandwidth` caps the push too (the guest's network is
            // shared while it runs on the destination): the migration's
            // one budget, with keepalives while it waits (the destination
            // reads with its I/O timeout). Answers are not paced: they are
            // few and a vCPU waits for each.
            let wait = pacer.account(batch.len_bytes() as u64);
            wait_with_keepalives(fw, wait, alive_every, &|| false).map_err(|e| e.to_string())?;
        }
        let (_, requested) = *lock(&self.requests);
        fw.send(&PostcopyPushed {
            pages: *pushed + requested,
        })
        .and_then(|_| fw.flush())
        .map_err(|e| e.to_string())?;
        let done: PostcopyComplete = t.control.recv(Phase::Postcopy).map_err(|e| e.to_string())?;
        log::info!(
            "post-copy complete: the destination installed {} pages",
            done.pages
        );
        Ok(())
    }
}
