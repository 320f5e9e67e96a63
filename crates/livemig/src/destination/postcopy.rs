//! Post-copy on the destination (see `docs/postcopy.md`): the page
//! installer seam ([`PostcopyMemory`]), [`receive_postcopy`], and the page
//! server that runs while the guest already runs here.
//!
//! The engine stays free of Linux-only requirements: a userfaultfd
//! installer lives in the `livemig-uffd` crate; `livemig::testing` has a
//! software one whose "vCPUs" block on a condition variable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

mod arm;

use arm::Armed;

use super::{handshake, memory, ms, Link, ReceiveConfig, ReceiveProgress, ReceiveReport};
use crate::bitmap::DirtyBitmap;
use crate::control::{self, unexpected};
use crate::error::{ErrorKind, MigrationError, Phase};
use crate::memory::{MemoryLayout, PAGE_SIZE};
use crate::protocol::{
    decompress_pages, page_records, FrameReader, FrameWriter, MsgKind, PageRequest, PageRun,
    PostcopyComplete, PostcopyResume, Resumed,
};
use crate::state::Section;
use crate::transport::{StreamAcceptor, Transport};
use crate::vm::{DestinationVm, VmDescription, VmError};

/// A failure of a [`PostcopyMemory`].
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    /// A system call failed.
    #[error("{op}: {source}")]
    Os {
        /// What was called.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Anything else (a page outside memory, an unexpected event).
    #[error("{0}")]
    Other(String),
}

/// Guest memory whose missing pages fault until the engine installs them:
/// the destination's half of post-copy. Pages are named by region (in
/// layout order) and page index inside the region.
pub trait PostcopyMemory: Send + Sync {
    /// Makes exactly the pages of `missing` fault on access until they are
    /// installed; every other page keeps its contents (or reads as zero if
    /// it never had any) and never faults. Called once, before the guest
    /// runs.
    fn arm(&self, missing: &DirtyBitmap) -> Result<(), PostcopyError>;
    /// After [`PostcopyMemory::arm`], before the guest runs: makes the
    /// pages of `more` fault too (their contents here are stale: they are
    /// dropped), as if they had been in `arm`'s set. Pages of `more` that
    /// are missing already stay missing. Called at most once, when the
    /// source prepared the switch (`PostcopyPrepare`) and then paused.
    fn discard(&self, more: &DirtyBitmap) -> Result<(), PostcopyError>;
    /// Waits at most `timeout` for an access to a missing page; returns
    /// `(region, page)`. May return a page that was installed since (the
    /// engine then calls [`PostcopyMemory::wake`]).
    fn next_fault(&self, timeout: Duration) -> Result<Option<(usize, u64)>, PostcopyError>;
    /// Installs `data` (whole pages) at `page` of `region` atomically and
    /// wakes everyone waiting for those pages. The engine installs each
    /// missing page exactly once.
    fn install(&self, region: usize, page: u64, data: &[u8]) -> Result<(), PostcopyError>;
    /// Installs `npages` zero pages at `page` of `region`, like `install`.
    fn install_zero(&self, region: usize, page: u64, npages: u64) -> Result<(), PostcopyError>;
    /// Wakes whoever waits on a page that is present already (a fault that
    /// raced with its installation).
    fn wake(&self, region: usize, page: u64) -> Result<(), PostcopyError>;
}

impl<T: PostcopyMemory + ?Sized> PostcopyMemory for Arc<T> {
    fn arm(&self, missing: &DirtyBitmap) -> Result<(), PostcopyError> {
        (**self).arm(missing)
    }
    fn discard(&self, more: &DirtyBitmap) -> Result<(), PostcopyError> {
        (**self).discard(more)
    }
    fn next_fault(&self, timeout: Duration) -> Result<Option<(usize, u64)>, PostcopyError> {
        (**self).next_fault(timeout)
    }
    fn install(&self, region: usize, page: u64, data: &[u8]) -> Result<(), PostcopyError> {
        (**self).install(region, page, data)
    }
    fn install_zero(&self, region: usize, page: u64, npages: u64) -> Result<(), PostcopyError> {
        (**self).install_zero(region, page, npages)
    }
    fn wake(&self, region: usize, page: u64) -> Result<(), PostcopyError> {
        (**self).wake(region, page)
    }
}

/// Median, 99th percentile and maximum, µs.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    /// Median.
    pub median_us: u64,
    /// 99th percentile (nearest rank).
    pub p99_us: u64,
    /// Maximum.
    pub max_us: u64,
}

impl LatencySummary {
    /// The summary of `samples` (all zero when empty).
    pub fn of(mut samples: Vec<u64>) -> Self {
        if samples.is_empty() {
            return LatencySummary::default();
        }
        samples.sort_unstable();
        let n = samples.len();
        let p99 = (n * 99).div_ceil(100).clamp(1, n) - 1;
        LatencySummary {
            median_us: samples[n / 2],
            p99_us: samples[p99],
            max_us: samples[n - 1],
        }
    }
}

/// What the destination measured during post-copy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PostcopyStats {
    /// Pages the source said to drop at the switch (to be installed).
    pub discard_pages: u64,
    /// Faults on missing pages that were requested from the source (a
    /// second fault on a page already requested is not counted).
    pub faults: u64,
    /// Pages installed from the source's answers to requests.
    pub requested_pages: u64,
    /// Pages installed from the background push.
    pub pushed_pages: u64,
    /// From a fault being read to its page being installed.
    pub fault_latency: LatencySummary,
    /// The sum of those latencies, ms: one interval per requested page,
    /// from the page server reading its first fault to its installation.
    /// A page several threads wait on counts once; threads waiting on
    /// different pages at the same time count each. Not QEMU's
    /// `postcopy-blocktime` (the time during which *all* vCPUs were blocked
    /// at once) nor its per-vCPU blocktime: the faulting thread is not
    /// known here.
    pub blocked_ms: f64,
    /// Wall-clock time during which at least one requested page was
    /// awaited, ms: the union of the intervals summed in `blocked_ms`
    /// (`blocked_wall_ms <= blocked_ms`). With one thread faulting it is
    /// that thread's blocked time; it counts faults of VMM threads (device
    /// emulation) as well as vCPUs'.
    pub blocked_wall_ms: f64,
    /// From the resume to the last page installed, ms.
    pub switch_to_last_page_ms: f64,
    /// [`PostcopyMemory::arm`], ms: before the source paused when
    /// `prepared`, otherwise inside the downtime (between the source's
    /// pause and `Go`).
    pub arm_ms: f64,
    /// The source prepared the switch (`PostcopyPrepare`): the installer
    /// was armed while the guest still ran on the source.
    pub prepared: bool,
    /// After a prepare: pages the source dirtied between the prepare and
    /// its pause, dropped at `PostcopySwitch` ([`PostcopyMemory::discard`]).
    pub late_discard_pages: u64,
    /// Dropping them, ms (inside the downtime).
    pub late_discard_ms: f64,
}

/// Like [`crate::receive`], and grants post-copy to a source that offers
/// it. `fault` is the second connection of the migration (the source's
/// `migrate_postcopy` opened it): requests and their answers only.
///
/// When the source switches to post-copy, `pager` is called with the VM to
/// get its memory's page installer; the pages still to come are made
/// missing ([`PostcopyMemory::arm`]) before the state is restored, and the
/// VM is resumed after `Go` while they arrive. `receive_postcopy` returns
/// once every page is installed (the VM has been running since `Go`).
/// If the source does not switch, this is a plain pre-copy `receive`.
///
/// A failure after `Go` returns [`ErrorKind::PostcopyInterrupted`]; it
/// drops the VM, then leaks the installer (it is never closed: closing a
/// userfaultfd lets a thread still waiting on a missing page read it as
/// zero). Pages that never arrived were never installed, so nothing read a
/// wrong page. [`receive_postcopy_resumable`] continues over new
/// connections instead.
///
/// Kept for one release so that callers keep compiling; use
/// [`crate::Reception::postcopy`], which also takes a cancel token and a
/// progress callback.
#[deprecated(
    since = "0.2.0",
    note = "use livemig::Reception::new(transport).postcopy(fault, pager)...run(create)"
)]
pub fn receive_postcopy<V, F, P>(
    transport: Box<dyn Transport>,
    fault: Box<dyn Transport>,
    config: &ReceiveConfig,
    create: F,
    pager: P,
) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
    P: FnOnce(&V, &MemoryLayout) -> Result<Box<dyn PostcopyMemory>, VmError>,
{
    legacy(transport, fault, None, config, create, pager, &mut || None)
}

/// What the deprecated functions run: no cancel, no progress.
fn legacy<V, F, P>(
    transport: Box<dyn Transport>,
    fault: Box<dyn Transport>,
    acceptor: Option<&mut dyn StreamAcceptor>,
    config: &ReceiveConfig,
    create: F,
    pager: P,
    reconnect: &mut Reconnect<'_>,
) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
    P: FnOnce(&V, &MemoryLayout) -> Result<Box<dyn PostcopyMemory>, VmError>,
{
    let call = super::Call {
        config,
        cancel: &crate::source::CancelToken::new(),
        progress: &mut |_| {},
        fill: true,
    };
    receive_inner(transport, fault, acceptor, call, create, pager, reconnect)
}

/// Like [`receive_postcopy`], and grants page streams (accepted from
/// `acceptor`, as [`crate::receive_streams`] does) to a source that asks
/// for them — such a source does not use post-copy (`migrate_postcopy`
/// refuses streams), so one call serves both kinds of source.
///
/// Kept for one release so that callers keep compiling; use
/// [`crate::Reception::postcopy`] with
/// [`crate::Reception::accept_streams`].
#[deprecated(
    since = "0.2.0",
    note = "use livemig::Reception::new(transport).postcopy(fault, pager).accept_streams(acceptor)...run(create)"
)]
pub fn receive_postcopy_streams<V, F, P>(
    transport: Box<dyn Transport>,
    fault: Box<dyn Transport>,
    acceptor: Option<&mut dyn StreamAcceptor>,
    config: &ReceiveConfig,
    create: F,
    pager: P,
) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
    P: FnOnce(&V, &MemoryLayout) -> Result<Box<dyn PostcopyMemory>, VmError>,
{
    legacy(
        transport,
        fault,
        acceptor,
        config,
        create,
        pager,
        &mut || None,
    )
}

/// Gives a new (control, fault) pair of connections from the same source
/// after the previous pair broke during post-copy, or `None` to give up
/// (it decides how long to wait: accept with a deadline, say).
pub type Reconnect<'a> = dyn FnMut() -> Option<(Box<dyn Transport>, Box<dyn Transport>)> + 'a;

/// Like [`receive_postcopy`]; when a connection breaks after `Go`, calls
/// `reconnect` for a new pair and continues: it sends the pages still
/// missing ([`PostcopyResume`]) as the first frame of the new control
/// connection and asks again for the pages vCPUs wait for. The pages
/// installed so far stay; the vCPUs keep waiting meanwhile.
///
/// Kept for one release so that callers keep compiling; use
/// [`crate::Reception::postcopy`] with
/// [`crate::Reception::postcopy_reconnect`].
#[deprecated(
    since = "0.2.0",
    note = "use livemig::Reception::new(transport).postcopy(fault, pager).postcopy_reconnect(r)...run(create)"
)]
pub fn receive_postcopy_resumable<V, F, P>(
    transport: Box<dyn Transport>,
    fault: Box<dyn Transport>,
    config: &ReceiveConfig,
    create: F,
    pager: P,
    reconnect: &mut Reconnect<'_>,
) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
    P: FnOnce(&V, &MemoryLayout) -> Result<Box<dyn PostcopyMemory>, VmError>,
{
    legacy(transport, fault, None, config, create, pager, reconnect)
}

/// The post-copy reception ([`crate::Reception::postcopy`]): the settings,
/// cancel token and progress callback in `call`.
pub(super) fn receive_inner<V, F, P>(
    transport: Box<dyn Transport>,
    fault: Box<dyn Transport>,
    acceptor: Option<&mut dyn StreamAcceptor>,
    call: super::Call<'_>,
    create: F,
    pager: P,
    reconnect: &mut Reconnect<'_>,
) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
    P: FnOnce(&V, &MemoryLayout) -> Result<Box<dyn PostcopyMemory>, VmError>,
{
    let (config, cancel) = (call.config, call.cancel);
    super::on_checked_link(transport, config, cancel, |link| {
        run(link, fault, acceptor, call, create, pager, reconnect)
    })
}

fn run<V, F, P>(
    link: &mut Link,
    fault: Box<dyn Transport>,
    acceptor: Option<&mut dyn StreamAcceptor>,
    mut call: super::Call<'_>,
    create: F,
    pager: P,
    reconnect: &mut Reconnect<'_>,
) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
    P: FnOnce(&V, &MemoryLayout) -> Result<Box<dyn PostcopyMemory>, VmError>,
{
    let started = Instant::now();
    let (config, cancel) = (call.config, call.cancel);
    // A cancel before `Ready` breaks the fault connection too.
    cancel.attach(fault.try_clone().ok());
    let Precopied {
        mut vm,
        layout,
        received,
        running,
        prepared,
        mut pager,
    } = precopy_part(link, acceptor, &mut call, create, pager)?;
    let mut report = report_of(&received, link, running);
    let Some(switch) = received.switch.as_ref() else {
        let times = super::commit::commit(&mut vm, link, &received.sections, running, cancel)?;
        (call.progress)(&ReceiveProgress::Completed { running });
        report.restore_ms = ms(times.restore);
        report.resume_ms = ms(times.resume);
        report.bytes = link.control.bytes_read();
        report.total_ms = ms(started.elapsed());
        return Ok((vm, report));
    };
    let armed = match (prepared, pager.take()) {
        (Some(a), _) => arm::late_discard(a, &layout, switch)?,
        (None, Some(p)) => arm::arm(link.postcopy, &vm, &layout, switch, p)?,
        (None, None) => return Err(twice("PostcopySwitch")),
    };
    // The page server runs from here, before the restore: a device whose
    // restore reads guest memory (a virtio queue) faults on a missing page
    // like a vCPU does, and the source answers requests from the switch on.
    let mut restore_ms = 0.0;
    let server = Server::new(&layout, &*armed.pager, armed.discard, running);
    let progress = &mut *call.progress;
    let stats = server.run_with(
        link,
        fault,
        config,
        reconnect,
        progress,
        |link: &mut Link| {
            let (restored, resumed) =
                restore_and_go(&mut vm, link, &received.sections, running, cancel)?;
            restore_ms = restored;
            Ok(resumed)
        },
    );
    drop(server);
    report.restore_ms = restore_ms;
    let stats = match stats {
        Ok(s) => s,
        Err(e) => {
            abandon(vm, armed.pager);
            return Err(e);
        }
    };
    report.resume_ms = stats.1;
    report.postcopy = Some(PostcopyStats {
        arm_ms: armed.arm_ms,
        prepared: armed.prepared,
        late_discard_pages: armed.late_pages,
        late_discard_ms: armed.late_ms,
        ..stats.0
    });
    report.bytes = link.control.bytes_read();
    report.total_ms = ms(started.elapsed());
    (call.progress)(&ReceiveProgress::Completed { running });
    Ok((vm, report))
}

/// The report's counts from the pre-copy part.
fn report_of(received: &memory::Received, link: &Link, running: bool) -> ReceiveReport {
    ReceiveReport {
        pages: received.pages,
        zero_pages: received.zero,
        rounds: received.rounds,
        streams: link.granted,
        version: link.version,
        running,
        filled_pages: received.filled,
        ..ReceiveReport::default()
    }
}

/// Under the page server: restores the state, answers `Ready`, waits for
/// `Go` (a cancel until `Go` was read abandons the migration and the source
/// resumes; from `Go` on it is ignored) and resumes the guest. Returns the
/// restore time (ms) and the resume time.
fn restore_and_go<V: DestinationVm>(
    vm: &mut V,
    link: &mut Link,
    sections: &[Section],
    running: bool,
    cancel: &crate::source::CancelToken,
) -> Result<(f64, Duration), MigrationError> {
    let t = Instant::now();
    vm.restore_state(sections)
        .map_err(|e| MigrationError::new(Phase::State, e))?;
    let restored = t.elapsed();
    super::commit::ready_then_go(link, restored, cancel)?;
    let t = Instant::now();
    if running {
        vm.resume()
            .map_err(|e| MigrationError::new(Phase::Completion, e))?;
    }
    Ok((ms(restored), t.elapsed()))
}

/// What the pre-copy part left: the VM, its memory's layout, the pages and
/// state received, and the installer — armed already when the source asked
/// for it before pausing (`PostcopyPrepare`), else still to be made.
struct Precopied<V, P> {
    vm: V,
    layout: MemoryLayout,
    received: memory::Received,
    running: bool,
    prepared: Option<Armed>,
    pager: Option<P>,
}

/// The hello, the VM, the handshake's reply and the pre-copy rounds (with
/// the early arming on `PostcopyPrepare` where granted), up to the switch
/// or the final state.
fn precopy_part<V, F, P>(
    link: &mut Link,
    acceptor: Option<&mut dyn StreamAcceptor>,
    call: &mut super::Call<'_>,
    create: F,
    pager: P,
) -> Result<Precopied<V, P>, MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
    P: FnOnce(&V, &MemoryLayout) -> Result<Box<dyn PostcopyMemory>, VmError>,
{
    let (config, cancel) = (call.config, call.cancel);
    let hello = handshake::read_hello(link)?;
    link.postcopy = hello.postcopy;
    link.postcopy_prepare = hello.postcopy && hello.postcopy_prepare;
    let layout = hello.desc.layout.clone();
    let vm = handshake::create_vm(&mut link.fw, &hello.desc, create)?;
    let mut pager = Some(pager);
    let mut prepared: Option<Armed> = None;
    let ram = handshake::prepare_memory(&mut link.fw, &vm, &layout, hello.local.as_ref())?;
    (call.progress)(&ReceiveProgress::Accepted {
        memory_bytes: layout.total_bytes(),
        vcpus: hello.desc.vcpus,
        streams_asked: hello.streams,
    });
    let readers = handshake::reply(link, acceptor, hello.streams, config.io_timeout, cancel)?;
    for r in &readers {
        cancel.attach(r.get_ref().try_clone().ok());
    }
    let granted = link.postcopy && link.postcopy_prepare && link.version >= 3;
    let fw = &mut link.fw;
    let mut hook = |p: &crate::protocol::PostcopyPrepare| {
        let pager = pager.take().ok_or_else(|| twice("PostcopyPrepare"))?;
        prepared = Some(arm::prepare(fw, &vm, &layout, p, pager)?);
        Ok(())
    };
    let on_prepare: memory::OnPrepare<'_> = if granted { Some(&mut hook) } else { None };
    let received = memory::receive(
        &mut link.control,
        readers,
        &layout,
        &ram,
        memory::Hooks {
            on_prepare,
            answers: None,
            progress: &mut *call.progress,
        },
        memory::Intake {
            fresh_fill: call.fill,
            ..Default::default()
        },
    )?;
    drop(ram);
    Ok(Precopied {
        vm,
        layout,
        received,
        running: !hello.paused,
        prepared,
        pager,
    })
}

/// A failure after `Go`: the guest ran here and pages are missing. The VM
/// goes first (its vCPUs stop), and the installer is never closed (leaked:
/// its userfaultfd stays open until the process exits). Closing a
/// userfaultfd wakes every thread blocked on a missing page, and the page
/// then faults in as zero: a vCPU not stopped yet, or a VMM thread, would
/// run on it.
fn abandon<V>(vm: V, pager: Box<dyn PostcopyMemory>) {
    drop(vm);
    std::mem::forget(pager);
}

/// At most how often the push loop reports the pages installed
/// ([`ReceiveProgress::PostcopyInstalled`]) while some are missing.
const INSTALLED_EVERY: Duration = Duration::from_millis(100);

/// The progress callback of the reception.
type OnProgress<'p> = &'p mut dyn FnMut(&ReceiveProgress);

/// What the page server's threads share.
struct Server<'a> {
    layout: &'a MemoryLayout,
    pager: &'a dyn PostcopyMemory,
    discard: DirtyBitmap,
    /// Whether the guest runs here after `Go` (said in
    /// [`ReceiveProgress::PostcopyActive`]).
    running: bool,
    /// Bytes read on control connections that broke (replaced by
    /// `reconnect`).
    earlier_bytes: AtomicU64,
    /// Bytes read on the fault connections.
    fault_bytes: AtomicU64,
    st: Mutex<ServerState>,
    all_in: Condvar,
}

#[derive(Default)]
struct ServerState {
    /// Pages of the discard set claimed for installation (installed, or
    /// being installed by one thread).
    installed: Option<DirtyBitmap>,
    missing: u64,
    requested: HashMap<(usize, u64), Instant>,
    latencies: Vec<u64>,
    /// (fault read, page installed) of every requested page.
    waits: Vec<(Instant, Instant)>,
    faults: u64,
    requested_pages: u64,
    pushed_pages: u64,
    last_install: Option<Instant>,
    error: Option<String>,
}

impl<'a> Server<'a> {
    fn new(
        layout: &'a MemoryLayout,
        pager: &'a dyn PostcopyMemory,
        discard: DirtyBitmap,
        running: bool,
    ) -> Self {
        let st = ServerState {
            installed: Some(DirtyBitmap::new(layout)),
            missing: discard.count(),
            ..ServerState::default()
        };
        Server {
            layout,
            pager,
            discard,
            running,
            earlier_bytes: AtomicU64::new(0),
            fault_bytes: AtomicU64::new(0),
            st: Mutex::new(st),
            all_in: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ServerState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, why: String) {
        let mut st = self.lock();
        st.error.get_or_insert(why);
        drop(st);
        self.all_in.notify_all();
    }

    /// Starts the fault threads, restores and resumes the VM (`resume`:
    /// restore, `Ready`, `Go`, resume), answers `Resumed` and installs
    /// pages until all are in; when a connection breaks after that,
    /// continues over the pair `reconnect` gives (if any). Reports
    /// [`ReceiveProgress::PostcopyActive`] and
    /// [`ReceiveProgress::PostcopyInstalled`] to `progress` (on this
    /// thread).
    fn run_with<R>(
        &self,
        link: &mut Link,
        fault: Box<dyn Transport>,
        config: &ReceiveConfig,
        reconnect: &mut Reconnect<'_>,
        progress: OnProgress<'_>,
        resume: R,
    ) -> Result<(PostcopyStats, f64), MigrationError>
    where
        R: FnOnce(&mut Link) -> Result<Duration, MigrationError>,
    {
        let mut fault = fault;
        let mut resume = Some(resume);
        let mut took = None;
        loop {
            let e = match self.attempt(link, fault, config, &mut resume, &mut took, progress) {
                Ok(()) => {
                    let (resumed_at, took) = took.unwrap_or((Instant::now(), Duration::ZERO));
                    return Ok((self.stats(resumed_at), ms(took)));
                }
                // Before `Go` (restore, Ready, Go): a plain failure.
                Err(e) if took.is_none() => return Err(e),
                Err(e) if e.phase == Phase::Completion || self.lock().error.is_some() => {
                    return Err(self.interrupted(e))
                }
                Err(e) => e,
            };
            let Some((control, next_fault)) = reconnect() else {
                return Err(self.interrupted(e));
            };
            log::warn!("post-copy: {e}; continuing on new connections");
            let (reader, writer) =
                control::open(control, config.io_timeout).map_err(|e| self.interrupted(e))?;
            let broken = link.control.bytes_read();
            self.earlier_bytes.fetch_add(broken, Ordering::SeqCst);
            link.control = reader;
            link.fw = writer;
            let resume_msg = PostcopyResume {
                missing: self.missing_runs(),
            };
            control::send(&mut link.fw, &resume_msg, Phase::Postcopy)
                .map_err(|e| self.interrupted(e))?;
            fault = next_fault;
        }
    }

    /// One pair of connections: the fault threads, the resume (the first
    /// time), then the push until every page is in.
    fn attempt<R>(
        &self,
        link: &mut Link,
        fault: Box<dyn Transport>,
        config: &ReceiveConfig,
        resume: &mut Option<R>,
        took: &mut Option<(Instant, Duration)>,
        progress: OnProgress<'_>,
    ) -> Result<(), MigrationError>
    where
        R: FnOnce(&mut Link) -> Result<Duration, MigrationError>,
    {
        let pc = Phase::Postcopy;
        let io = |e: std::io::Error| MigrationError::new(pc, crate::protocol::ProtocolError::Io(e));
        let fault_rx = fault.try_clone().map_err(io)?;
        let stopper = fault.try_clone().map_err(io)?;
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| self.fault_loop(FrameWriter::new(fault), &stop));
            scope.spawn(|| self.answer_loop(FrameReader::new(fault_rx), &stop));
            let mut r = Ok(());
            if let Some(resume) = resume.take() {
                r = resume(link).map(|t| {
                    *took = Some((Instant::now(), t));
                    let resumed = Resumed {
                        resume_us: t.as_micros() as u64,
                    };
                    if let Err(e) = control::send(&mut link.fw, &resumed, Phase::Completion) {
                        log::warn!("guest resumed but the acknowledgement could not be sent: {e}");
                    }
                    let missing_pages = self.lock().missing;
                    progress(&ReceiveProgress::PostcopyActive {
                        running: self.running,
                        missing_pages,
                    });
                });
            }
            let r = r.and_then(|()| {
                let pages = self.push_loop(link, config.io_timeout, progress)?;
                // Every page is installed: the guest is whole here whatever
                // becomes of the acknowledgement (a source that read it may
                // close the connection before this side's flush returns).
                if let Err(e) = control::send(&mut link.fw, &PostcopyComplete { pages }, pc) {
                    log::warn!(
                        "post-copy complete ({pages} pages installed) but the acknowledgement \
                         could not be sent: {e}"
                    );
                }
                Ok(())
            });
            stop.store(true, Ordering::SeqCst);
            let _ = stopper.shutdown();
            r
        })
    }

    /// The pages of the discard set not installed, as runs.
    fn missing_runs(&self) -> Vec<PageRun> {
        let st = self.lock();
        let mut runs = Vec::new();
        let Some(installed) = st.installed.as_ref() else {
            return runs;
        };
        for region in 0..self.discard.num_regions() {
            let end = self.discard.region_pages(region);
            let mut page = 0;
            while page < end {
                if !self.discard.is_set(region, page) || installed.is_set(region, page) {
                    page += 1;
                    continue;
                }
                let first = page;
                while page < end
                    && self.discard.is_set(region, page)
                    && !installed.is_set(region, page)
                {
                    page += 1;
                }
                runs.push(PageRun {
                    region: region as u32,
                    first_page: first,
                    npages: page - first,
                });
            }
        }
        runs
    }

    /// An error after `Go`, with how much is missing.
    fn interrupted(&self, e: MigrationError) -> MigrationError {
        if e.phase == Phase::Completion {
            return e;
        }
        let missing = self.lock().missing;
        let why = e.to_string();
        MigrationError::new(
            Phase::Postcopy,
            ErrorKind::PostcopyInterrupted { missing, why },
        )
    }

    /// The control connection: pushed pages until `PostcopyPushed`, then
    /// waits for the last answers. Returns the pages installed. Reports
    /// the pages installed after the first frame, then at most every
    /// [`INSTALLED_EVERY`] while some are missing, and once all are in.
    fn push_loop(
        &self,
        link: &mut Link,
        wait: Duration,
        progress: OnProgress<'_>,
    ) -> Result<u64, MigrationError> {
        let pc = Phase::Postcopy;
        const EXPECTED: &str = "Pages or PostcopyPushed";
        let mut scratch = Vec::new();
        let mut reported: Option<Instant> = None;
        loop {
            if let Some(why) = self.lock().error.clone() {
                return Err(MigrationError::new(pc, ErrorKind::Internal(internal(why))));
            }
            let f = link.control.next(pc, EXPECTED)?;
            match f.kind {
                MsgKind::Pages => self.apply(f.payload, false),
                MsgKind::PagesLz4 => decompress_pages(f.payload, &mut scratch)
                    .map_err(|e| e.to_string())
                    .and_then(|_| self.apply(&scratch, false)),
                MsgKind::Keepalive => Ok(()),
                MsgKind::PostcopyPushed => break,
                other => return Err(unexpected(other, EXPECTED, pc)),
            }
            .map_err(|why| MigrationError::new(pc, ErrorKind::Internal(internal(why))))?;
            self.follow(link, &mut *progress, &mut reported);
        }
        // Every page was sent; answers to requests may still be on the way.
        let deadline = Instant::now() + wait;
        let mut st = self.lock();
        while st.missing > 0 && st.error.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let e = ErrorKind::Timeout {
                    waiting_for: "the last post-copy pages",
                    after: wait,
                };
                return Err(MigrationError::new(pc, e));
            }
            st = self
                .all_in
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if let Some(why) = st.error.clone() {
            return Err(MigrationError::new(pc, ErrorKind::Internal(internal(why))));
        }
        let all_in = self.installed_event(&st, link);
        let pages = st.requested_pages + st.pushed_pages;
        drop(st);
        progress(&all_in);
        Ok(pages)
    }

    /// A [`ReceiveProgress::PostcopyInstalled`] while pages are missing,
    /// unless one was reported (at `reported`) less than
    /// [`INSTALLED_EVERY`] ago.
    fn follow(&self, link: &Link, progress: OnProgress<'_>, reported: &mut Option<Instant>) {
        if reported.is_some_and(|t| t.elapsed() < INSTALLED_EVERY) {
            return;
        }
        let st = self.lock();
        if st.missing == 0 {
            return;
        }
        let event = self.installed_event(&st, link);
        drop(st);
        *reported = Some(Instant::now());
        progress(&event);
    }

    /// The pages installed and missing now, and the bytes read so far.
    fn installed_event(&self, st: &ServerState, link: &Link) -> ReceiveProgress {
        let bytes = self.earlier_bytes.load(Ordering::SeqCst)
            + link.control.bytes_read()
            + self.fault_bytes.load(Ordering::SeqCst);
        ReceiveProgress::PostcopyInstalled {
            installed_pages: st.requested_pages + st.pushed_pages,
            missing_pages: st.missing,
            bytes,
        }
    }

    /// Faults → requests on the fault connection. Requests made on an
    /// earlier connection and not answered yet are made again first (the
    /// vCPUs waiting for them raise no new fault).
    fn fault_loop(&self, mut fw: FrameWriter<Box<dyn Transport>>, stop: &AtomicBool) {
        let outstanding: Vec<(usize, u64)> = self.lock().requested.keys().copied().collect();
        for (region, page) in outstanding {
            let req = PageRequest {
                region: region as u32,
                page,
                npages: 1,
            };
            if fw.send(&req).and_then(|_| fw.flush()).is_err() {
                return;
            }
        }
        while !stop.load(Ordering::SeqCst) {
            let (region, page) = match self.pager.next_fault(Duration::from_millis(50)) {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(e) => return self.fail(format!("reading faults: {e}")),
            };
            if region >= self.discard.num_regions() || page >= self.discard.region_pages(region) {
                return self.fail(format!("a fault outside guest memory: {region}/{page}"));
            }
            let mut st = self.lock();
            let claimed = st
                .installed
                .as_ref()
                .is_some_and(|b| b.is_set(region, page));
            if !self.discard.is_set(region, page) || claimed {
                drop(st);
                if let Err(e) = self.pager.wake(region, page) {
                    return self.fail(format!("waking a fault: {e}"));
                }
                continue;
            }
            if st.requested.contains_key(&(region, page)) {
                continue;
            }
            st.requested.insert((region, page), Instant::now());
            st.faults += 1;
            drop(st);
            let req = PageRequest {
                region: region as u32,
                page,
                npages: 1,
            };
            if let Err(e) = fw.send(&req).and_then(|_| fw.flush()) {
                if !stop.load(Ordering::SeqCst) {
                    // The push still brings every page: a broken fault
                    // connection only costs latency.
                    log::warn!("post-copy fault connection: {e}; waiting for the push");
                }
                return;
            }
        }
    }

    /// Answers to requests, from the fault connection.
    fn answer_loop(&self, mut fr: FrameReader<Box<dyn Transport>>, stop: &AtomicBool) {
        let mut counted = 0;
        loop {
            let f = match fr.read_frame() {
                Ok(f) => f,
                Err(e) => {
                    if !stop.load(Ordering::SeqCst) {
                        log::warn!("post-copy fault connection: {e}; waiting for the push");
                    }
                    return;
                }
            };
            let r = match f.kind {
                MsgKind::Pages => self.apply(f.payload, true),
                MsgKind::Keepalive => Ok(()),
                other => Err(format!("unexpected {other} frame on the fault connection")),
            };
            let read = fr.bytes_read();
            self.fault_bytes
                .fetch_add(read.saturating_sub(counted), Ordering::SeqCst);
            counted = read;
            if let Err(why) = r {
                return self.fail(why);
            }
        }
    }

    /// Installs the pages of a `Pages` payload that belong to the discard
    /// set and are not installed yet (each exactly once).
    fn apply(&self, payload: &[u8], answered: bool) -> Result<(), String> {
        for rec in page_records(payload) {
            let rec = rec.map_err(|e| e.to_string())?;
            let (region, first) = rec.check(self.layout).map_err(|e| e.to_string())?;
            let runs = self.claim(region, first, u64::from(rec.npages));
            for (page, n) in runs {
                let r = match rec.data {
                    Some(data) => {
                        let off = ((page - first) * PAGE_SIZE) as usize;
                        let len = (n * PAGE_SIZE) as usize;
                        self.pager.install(region, page, &data[off..off + len])
                    }
                    None => self.pager.install_zero(region, page, n),
                };
                r.map_err(|e| format!("installing pages {page}+{n} of region {region}: {e}"))?;
                self.installed(region, page, n, answered);
            }
        }
        Ok(())
    }

    /// Claims the pages of `first..first + n` that are in the discard set
    /// and not claimed yet; returns them as runs.
    fn claim(&self, region: usize, first: u64, n: u64) -> Vec<(u64, u64)> {
        let mut st = self.lock();
        let Some(installed) = st.installed.as_mut() else {
            return Vec::new();
        };
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for p in first..first + n {
            if !self.discard.is_set(region, p) || installed.is_set(region, p) {
                continue;
            }
            installed.set(region, p);
            match runs.last_mut() {
                Some((f, m)) if *f + *m == p => *m += 1,
                _ => runs.push((p, 1)),
            }
        }
        runs
    }

    /// Accounts pages just installed.
    fn installed(&self, region: usize, page: u64, n: u64, answered: bool) {
        let now = Instant::now();
        let mut st = self.lock();
        for p in page..page + n {
            if let Some(t) = st.requested.remove(&(region, p)) {
                st.latencies.push(now.duration_since(t).as_micros() as u64);
                st.waits.push((t, now));
            }
        }
        if answered {
            st.requested_pages += n;
        } else {
            st.pushed_pages += n;
        }
        st.missing -= n;
        st.last_install = Some(now);
        if st.missing == 0 {
            drop(st);
            self.all_in.notify_all();
        }
    }

    fn stats(&self, resumed_at: Instant) -> PostcopyStats {
        let st = self.lock();
        // From the same instants as the union (not the µs-truncated
        // latencies), so that the union is never more than the sum.
        let blocked: Duration = st.waits.iter().map(|(a, b)| *b - *a).sum();
        PostcopyStats {
            discard_pages: self.discard.count(),
            faults: st.faults,
            requested_pages: st.requested_pages,
            pushed_pages: st.pushed_pages,
            fault_latency: LatencySummary::of(st.latencies.clone()),
            blocked_ms: ms(blocked),
            blocked_wall_ms: ms(union_of(st.waits.clone())),
            switch_to_last_page_ms: st
                .last_install
                .map(|t| ms(t.saturating_duration_since(resumed_at)))
                .unwrap_or(0.0),
            ..PostcopyStats::default()
        }
    }
}

/// The total length of the union of `spans` (start, end).
fn union_of(mut spans: Vec<(Instant, Instant)>) -> Duration {
    spans.sort_unstable();
    let mut total = Duration::ZERO;
    let mut open: Option<(Instant, Instant)> = None;
    for (a, b) in spans {
        open = match open {
            Some((s, e)) if a <= e => Some((s, e.max(b))),
            Some((s, e)) => {
                total += e - s;
                Some((a, b))
            }
            None => Some((a, b)),
        };
    }
    total + open.map_or(Duration::ZERO, |(s, e)| e - s)
}

/// The installer was built already (a second switch or prepare).
fn twice(what: &str) -> MigrationError {
    let why = format!("{what}: the post-copy installer was built already");
    MigrationError::new(Phase::FinalMemory, ErrorKind::Internal(internal(why)))
}

fn internal(why: String) -> crate::error::InternalError {
    crate::error::InternalError::Postcopy(why)
}

#[cfg(test)]
mod tests {
    use super::{union_of, LatencySummary};
    use std::time::{Duration, Instant};

    #[test]
    fn the_wall_clock_blocked_time_counts_overlapping_waits_once() {
        let z = Instant::now();
        let at = |ms: u64| z + Duration::from_millis(ms);
        assert_eq!(union_of(Vec::new()), Duration::ZERO);
        // 0..10 and 5..12 overlap (12 ms), 20..21 apart, 30..31 inside
        // 30..40: 12 + 1 + 10 = 23 ms where the sum would be 33.
        let spans = vec![
            (at(20), at(21)),
            (at(5), at(12)),
            (at(30), at(40)),
            (at(0), at(10)),
            (at(30), at(31)),
        ];
        assert_eq!(union_of(spans), Duration::from_millis(23));
    }

    #[test]
    fn latency_summary_uses_nearest_rank() {
        assert_eq!(LatencySummary::of(Vec::new()), LatencySummary::default());
        let s = LatencySummary::of((1..=100).rev().collect());
        assert_eq!((s.median_us, s.p99_us, s.max_us), (51, 99, 100));
        let s = LatencySummary::of(vec![7]);
        assert_eq!((s.median_us, s.p99_us, s.max_us), (7, 7, 7));
    }
}
