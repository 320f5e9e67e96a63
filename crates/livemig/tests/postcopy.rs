//! Post-copy end to end on the software VM (docs/postcopy.md): the
//! destination runs from the state, a "vCPU" reading a missing page blocks
//! until the page it requested is installed, the rest is pushed, and every
//! byte is checked against the paused source.
// The free post-copy reception functions (deprecated wrappers of
// `Reception::postcopy`) stay tested here for the release that keeps them.
#![allow(deprecated)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use livemig::destination::postcopy::{receive_postcopy_resumable, PostcopyMemory};
use livemig::memory::{GuestMemory, MemoryLayout, RegionDesc, PAGE_SIZE};
use livemig::protocol::MsgKind;
use livemig::source::postcopy::{PostcopyConfig, Reconnect, SwitchRequest};
use livemig::state::Section;
use livemig::testing::fault::{At, Fault, FaultTransport};
use livemig::testing::postcopy::SoftPager;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::{mem, Transport};
use livemig::vm::{DestinationVm, SourceVm, VmError};
use livemig::{
    ErrorKind, Migration, MigrationConfig, MigrationError, Phase, Progress, ReceiveConfig,
    ReceiveReport, Report,
};

fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![
        RegionDesc {
            guest_addr: 0,
            size: 8 << 20,
        },
        RegionDesc {
            guest_addr: 4 << 30,
            size: 1 << 20,
        },
    ])
    .unwrap()
}

type Slot = Arc<Mutex<Option<Arc<SoftPager>>>>;

/// The destination VM: a soft VM whose `resume` first lets a "vCPU" touch
/// the last page of region 0 and returns only once that fault was taken by
/// the page server (so at least one page is requested, whatever the
/// timing: nothing is installed before `Resumed`).
struct Dest {
    vm: SoftVm,
    slot: Slot,
    vcpu: Vcpu,
}

/// The destination's "vCPU": which page it read and what it got (`None`:
/// still missing after `patience`). Outlives the VM (shared with the test).
#[derive(Clone)]
struct Vcpu {
    patience: Duration,
    read: Arc<Mutex<Option<(usize, u64)>>>,
    got: Arc<Mutex<Option<Option<Vec<u8>>>>>,
    done: Arc<std::sync::Barrier>,
    /// The source's `Progress::Postcopy` reasons (test bookkeeping).
    switches: Arc<Mutex<Vec<String>>>,
    /// Requests the switch when round 1 ends (test bookkeeping).
    ask_in_round_1: Option<SwitchRequest>,
    /// The second pair of connections, for a resumed migration.
    reconnect: Arc<Mutex<Option<NewPair>>>,
    /// A device whose restore reads guest memory (a virtio queue, say):
    /// `restore_state` reads the last missing page through the installer
    /// and records the page and what it got (`None`: nothing in time).
    restore_read: Option<RestoreRead>,
    /// The destination's installer, once built (shared with the test).
    pager: Slot,
}

/// A page (region, page) and its bytes if they came in time.
type PageRead = ((usize, u64), Option<Vec<u8>>);

/// What a restore read: the page, and its bytes if they came in time.
type RestoreRead = Arc<Mutex<Option<PageRead>>>;

type Pair = (Box<dyn Transport>, Box<dyn Transport>);

/// Connected (control, fault) pairs for both ends.
struct NewPair {
    src: Pair,
    dst: Pair,
}

impl NewPair {
    fn new() -> Self {
        let (a, b) = mem::pair();
        let (fa, fb) = mem::pair();
        NewPair {
            src: (Box::new(a), Box::new(fa)),
            dst: (Box::new(b), Box::new(fb)),
        }
    }
}

impl Vcpu {
    fn new(patience: Duration) -> Self {
        Vcpu {
            patience,
            read: Arc::default(),
            got: Arc::default(),
            done: Arc::new(std::sync::Barrier::new(2)),
            switches: Arc::default(),
            ask_in_round_1: None,
            reconnect: Arc::default(),
            restore_read: None,
            pager: Slot::default(),
        }
    }

    /// Waits for the read to finish; the page and what it read (`None`: no
    /// page was missing at the resume, so none was read).
    fn result(&self) -> Option<PageRead> {
        // `resume` names the page (or none) before it starts the read.
        let read = (*self.read.lock().unwrap())?;
        self.done.wait();
        Some((read, self.got.lock().unwrap().take().expect("a result")))
    }
}

impl DestinationVm for Dest {
    fn memory(&self) -> &dyn GuestMemory {
        DestinationVm::memory(&self.vm)
    }
    fn restore_state(&mut self, sections: &[Section]) -> Result<(), VmError> {
        if let Some(record) = &self.vcpu.restore_read {
            let pager = self
                .slot
                .lock()
                .unwrap()
                .clone()
                .expect("armed before restore");
            let at = pager.last_missing().expect("a page to come");
            let got = pager.read(at.0, at.1, Duration::from_secs(5));
            let arrived = got.is_some();
            *record.lock().unwrap() = Some((at, got));
            if !arrived {
                return Err(VmError::Create(format!(
                    "the device's restore waited in vain for page {} of region {}",
                    at.1, at.0
                )));
            }
        }
        self.vm.restore_state(sections)
    }
    fn resume(&mut self) -> Result<(), VmError> {
        let pager = self.slot.lock().unwrap().clone().expect("armed before Go");
        let Some((region, page)) = pager.last_missing() else {
            // Nothing left to fault on: the switchover's discard set is
            // empty when the writer threads did not run between the last
            // round and the pause (a loaded host). The "vCPU" reads nothing
            // (`Vcpu::result` is `None`) and `check` has no faulted page to
            // compare; tests that need one force a dirty page at the pause
            // (`recording_armed_at_pause`).
            return self.vm.resume();
        };
        *self.vcpu.read.lock().unwrap() = Some((region, page));
        let p = pager.clone();
        let vcpu = self.vcpu.clone();
        std::thread::spawn(move || {
            let got = p.read(region, page, vcpu.patience);
            *vcpu.got.lock().unwrap() = Some(got);
            vcpu.done.wait();
        });
        while pager.faulted_reads() == 0 || pager.pending_faults() > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.vm.resume()
    }
}

fn pager_into(
    slot: Slot,
) -> impl FnOnce(&Dest, &MemoryLayout) -> Result<Box<dyn PostcopyMemory>, VmError> {
    move |vm, layout| {
        let p = SoftPager::new(DestinationVm::memory(&vm.vm), layout);
        *slot.lock().unwrap() = Some(p.clone());
        Ok(Box::new(p))
    }
}

struct Outcome {
    report: Report,
    received: ReceiveReport,
    dest: Dest,
    vcpu: Vcpu,
}

fn migrate(src: &SoftVm, pc: PostcopyConfig, config: &MigrationConfig) -> Outcome {
    let mut vcpu = Vcpu::new(Duration::from_secs(30));
    vcpu.ask_in_round_1 =
        Some(pc.request.clone()).filter(|_| pc.after_rounds == u32::MAX && !pc.on_non_convergence);
    let (dest, report) = migrate_with(src, pc, config, &vcpu, |t| t, |t| t);
    let report = report.expect("source");
    let (dest, received) = dest.expect("destination");
    Outcome {
        report,
        received,
        dest,
        vcpu,
    }
}

/// A migration whose source control connection and destination fault
/// connection go through `src_control` and `dst_fault`.
/// Pure post-copy: the switch before the first round, never on a
/// prediction.
fn pure() -> PostcopyConfig {
    PostcopyConfig {
        after_rounds: 0,
        on_non_convergence: false,
        ..Default::default()
    }
}

/// Wraps a connection so that it breaks (`Fault::Drop`: shut down like a
/// reset) right before the `n`-th frame of `kind` (counted from 0).
fn drop_frame(kind: MsgKind, n: u32) -> impl FnOnce(Box<dyn Transport>) -> Box<dyn Transport> {
    move |t| {
        let (t, _) = FaultTransport::new(t, Fault::Drop.at(At::kind(kind, n)));
        Box::new(t)
    }
}

fn migrate_with<V: SourceVm + ?Sized>(
    src: &V,
    pc: PostcopyConfig,
    config: &MigrationConfig,
    vcpu: &Vcpu,
    src_control: impl FnOnce(Box<dyn Transport>) -> Box<dyn Transport>,
    dst_fault: impl FnOnce(Box<dyn Transport>) -> Box<dyn Transport> + Send + 'static,
) -> (
    Result<(Dest, ReceiveReport), MigrationError>,
    Result<Report, MigrationError>,
) {
    let wraps = Wraps {
        src_control,
        dst_control: |t| t,
        dst_fault,
    };
    migrate_wrapped(src, pc, config, vcpu, wraps)
}

/// What [`migrate_wrapped`] puts around each connection.
struct Wraps<S, C, F> {
    /// The source's end of the control connection.
    src_control: S,
    /// The destination's end of the control connection.
    dst_control: C,
    /// The destination's end of the fault connection.
    dst_fault: F,
}

fn migrate_wrapped<V: SourceVm + ?Sized>(
    src: &V,
    pc: PostcopyConfig,
    config: &MigrationConfig,
    vcpu: &Vcpu,
    wraps: Wraps<
        impl FnOnce(Box<dyn Transport>) -> Box<dyn Transport>,
        impl FnOnce(Box<dyn Transport>) -> Box<dyn Transport>,
        impl FnOnce(Box<dyn Transport>) -> Box<dyn Transport> + Send + 'static,
    >,
) -> (
    Result<(Dest, ReceiveReport), MigrationError>,
    Result<Report, MigrationError>,
) {
    let Wraps {
        src_control,
        dst_control,
        dst_fault,
    } = wraps;
    let (a, b) = mem::pair();
    let (fa, fb) = mem::pair();
    let fb = dst_fault(Box::new(fb));
    let b = dst_control(Box::new(b));
    let a = src_control(Box::new(a));
    let slot = vcpu.pager.clone();
    let pager = pager_into(slot.clone());
    let dst_vcpu = vcpu.clone();
    let (src_pair, mut dst_next) = match vcpu.reconnect.lock().unwrap().take() {
        Some(p) => (Some(p.src), Some(p.dst)),
        None => (None, None),
    };
    let src_next = src_pair.map(|p| {
        let mut p = Some(p);
        Box::new(move || p.take()) as Reconnect
    });
    let dest = std::thread::spawn(move || {
        receive_postcopy_resumable(
            b,
            fb,
            &ReceiveConfig::default(),
            |desc| {
                Ok(Dest {
                    vm: SoftVm::new(&desc.layout, &SoftConfig::idle())?,
                    slot,
                    vcpu: dst_vcpu,
                })
            },
            pager,
            &mut || dst_next.take(),
        )
    });
    let mut m = Migration::new(src)
        .config(config.clone())
        .postcopy(Box::new(fa), pc)
        .progress(|p: &Progress| {
            if let Progress::Postcopy { reason } = p {
                vcpu.switches.lock().unwrap().push(reason.clone());
            }
            // An operator asking during round 1 (the second round).
            if let (Progress::Round(rr), Some(req)) = (p, &vcpu.ask_in_round_1) {
                if rr.round == 1 {
                    req.request();
                }
            }
        });
    if let Some(next) = src_next {
        m = m.postcopy_reconnect(next);
    }
    let report = m.run(a);
    (dest.join().unwrap(), report)
}

/// Every byte on the destination is the paused source's, including the
/// page the "vCPU" read while it was missing.
fn check(src: &SoftVm, o: Outcome) {
    o.dest.vm.stop();
    let want = src.snapshot();
    assert!(o.dest.vm.snapshot() == want, "destination memory differs");
    let Some(((region, page), read)) = o.vcpu.result() else {
        return;
    };
    let at = (layout().regions()[..region]
        .iter()
        .map(|r| r.size)
        .sum::<u64>()
        + page * PAGE_SIZE) as usize;
    let got = read.expect("the vCPU's page arrived");
    assert!(
        got[..] == want[at..at + PAGE_SIZE as usize],
        "the faulted page differs"
    );
}

#[test]
fn pure_postcopy_serves_a_fault_and_pushes_the_rest() {
    let src = SoftVm::new(&layout(), &SoftConfig::default()).unwrap();
    src.fill(7);
    src.start();
    let pc = pure();
    let o = migrate(&src, pc, &MigrationConfig::default());
    let rp = o.report.postcopy.clone().expect("switched to post-copy");
    assert_eq!(rp.rounds_before, 0);
    assert!(o.report.rounds.is_empty());
    let total = layout().total_bytes() / PAGE_SIZE;
    assert_eq!(rp.discard_pages, total);
    assert_eq!(
        rp.pushed_pages, total,
        "the push alone sends every page: {rp:?}"
    );
    assert!(rp.requested_pages >= 1, "{rp:?}");
    let st = o.received.postcopy.clone().expect("destination stats");
    assert!(st.faults >= 1, "{st:?}");
    assert_eq!(st.discard_pages, total);
    assert_eq!(
        st.requested_pages + st.pushed_pages,
        total,
        "each page installed once"
    );
    assert!(st.fault_latency.max_us >= st.fault_latency.median_us);
    // A fault was waited for; the wall-clock figure is the union of the
    // intervals whose sum is `blocked_ms`, so never more.
    assert!(st.blocked_wall_ms > 0.0, "{st:?}");
    assert!(st.blocked_wall_ms <= st.blocked_ms, "{st:?}");
    check(&src, o);
}

#[test]
fn hybrid_switches_after_the_rounds_asked_for() {
    let src = SoftVm::new(&layout(), &SoftConfig::default()).unwrap();
    src.fill(3);
    src.start();
    let pc = PostcopyConfig {
        after_rounds: 2,
        on_non_convergence: false,
        ..Default::default()
    };
    // A limit pre-copy cannot meet with writers running: it would go on.
    let config = MigrationConfig {
        downtime_limit: Duration::from_nanos(1),
        ..Default::default()
    };
    let o = migrate(&src, pc, &config);
    let rp = o.report.postcopy.clone().expect("switched to post-copy");
    assert_eq!(rp.rounds_before, 2, "{rp:?}");
    assert_eq!(o.report.rounds.len(), 2);
    assert!(rp.reason.contains("after 2"), "{}", rp.reason);
    let st = o.received.postcopy.clone().expect("destination stats");
    assert_eq!(st.discard_pages, rp.discard_pages);
    assert!(st.faults >= 1, "{st:?}");
    check(&src, o);
}

#[test]
fn a_broken_link_during_postcopy_leaves_missing_pages_missing() {
    let src = SoftVm::new(&layout(), &SoftConfig::default()).unwrap();
    src.fill(5);
    src.start();
    let pc = pure();
    let vcpu = Vcpu::new(Duration::from_millis(300));
    // The control connection drops before the third pushed frame (pages
    // 0..512 arrived, the rest never); the destination's first request is
    // lost too, so the "vCPU"'s page (the last one) cannot arrive.
    let cut_push = drop_frame(MsgKind::Pages, 2);
    let cut_requests = drop_frame(MsgKind::PageRequest, 0);
    let (dest, report) = migrate_with(
        &src,
        pc,
        &MigrationConfig::default(),
        &vcpu,
        cut_push,
        cut_requests,
    );
    let e = report.expect_err("the source cannot finish");
    assert_eq!(e.phase, Phase::Postcopy, "{e}");
    assert!(
        matches!(e.kind, ErrorKind::PostcopyInterrupted { missing, .. } if missing > 0),
        "{e}"
    );
    let e = match dest {
        Ok(_) => panic!("the destination cannot finish"),
        Err(e) => e,
    };
    assert_eq!(e.phase, Phase::Postcopy, "{e}");
    assert!(
        matches!(e.kind, ErrorKind::PostcopyInterrupted { missing, .. } if missing > 0),
        "{e}"
    );
    // The source keeps the guest paused (it runs on the destination) and
    // does not write its memory any more.
    assert!(SourceVm::is_paused(&src));
    let writes = src.writes();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(src.writes(), writes);
    // The destination's "vCPU" waited for its page and never got one: no
    // zero page, no stale page (its fault was lost and the push broke off
    // before reaching it).
    let (_, got) = vcpu.result().expect("a page was missing at the resume");
    assert!(got.is_none(), "a missing page was read");
}

#[test]
fn a_guest_that_outdirties_the_link_switches_instead_of_being_throttled() {
    // Writers as fast as they can over 9 MiB, a link capped at 32 MiB/s:
    // every round finds nearly all memory dirty again.
    let config = SoftConfig {
        guest_writers: 1,
        device_writers: 1,
        pages_per_ms: 0,
    };
    let src = SoftVm::new(&layout(), &config).unwrap();
    src.fill(9);
    src.start();
    let pc = PostcopyConfig::default(); // no round count: only the rule
    let config = MigrationConfig {
        max_bandwidth: Some(32 << 20),
        ..Default::default()
    };
    let o = migrate(&src, pc, &config);
    let rp = o.report.postcopy.clone().expect("switched to post-copy");
    assert!(rp.reason.contains("does not converge"), "{}", rp.reason);
    let said = o.vcpu.switches.lock().unwrap().clone();
    assert_eq!(said, vec![rp.reason.clone()], "the progress says why, once");
    // Round 0, then two rounds with strikes.
    assert_eq!(rp.rounds_before, 3, "{rp:?}");
    assert_eq!(o.report.throttle_max_pct, Some(0), "never throttled");
    check(&src, o);
}

#[test]
fn an_operator_request_switches_after_the_current_round() {
    let src = SoftVm::new(&layout(), &SoftConfig::default()).unwrap();
    src.fill(4);
    src.start();
    // No round count, no automatic rule: only the request (made by the
    // progress callback when round 1 ends) switches.
    let pc = PostcopyConfig {
        on_non_convergence: false,
        ..Default::default()
    };
    let config = MigrationConfig {
        downtime_limit: Duration::from_nanos(1),
        ..Default::default()
    };
    let o = migrate(&src, pc, &config);
    let rp = o.report.postcopy.clone().expect("switched to post-copy");
    assert_eq!(rp.rounds_before, 2, "{rp:?}");
    assert!(
        rp.reason.contains("requested during the migration"),
        "{}",
        rp.reason
    );
    check(&src, o);
}

#[test]
fn a_broken_fault_connection_costs_latency_not_completion() {
    let src = SoftVm::new(&layout(), &SoftConfig::default()).unwrap();
    src.fill(6);
    src.start();
    let pc = pure();
    let vcpu = Vcpu::new(Duration::from_secs(30));
    // The destination's first request never leaves: its fault connection
    // drops. The push still brings the page the "vCPU" waits for.
    let cut_requests = drop_frame(MsgKind::PageRequest, 0);
    let (dest, report) = migrate_with(
        &src,
        pc,
        &MigrationConfig::default(),
        &vcpu,
        |t| t,
        cut_requests,
    );
    let report = report.expect("source");
    let (dest, received) = dest.expect("destination");
    let rp = report.postcopy.clone().expect("post-copy");
    assert_eq!(rp.requested_pages, 0, "{rp:?}");
    let st = received.postcopy.clone().expect("stats");
    assert_eq!(st.requested_pages, 0);
    assert_eq!(st.pushed_pages, st.discard_pages);
    check(
        &src,
        Outcome {
            report,
            received,
            dest,
            vcpu,
        },
    );
}

#[test]
fn a_broken_link_during_postcopy_resumes_on_new_connections() {
    let src = SoftVm::new(&layout(), &SoftConfig::default()).unwrap();
    src.fill(8);
    src.start();
    let pc = pure();
    let vcpu = Vcpu::new(Duration::from_secs(30));
    *vcpu.reconnect.lock().unwrap() = Some(NewPair::new());
    // As in the test above: the push breaks off after two frames and the
    // first request is lost; then both sides continue on a new pair.
    let cut_push = drop_frame(MsgKind::Pages, 2);
    let cut_requests = drop_frame(MsgKind::PageRequest, 0);
    let (dest, report) = migrate_with(
        &src,
        pc,
        &MigrationConfig::default(),
        &vcpu,
        cut_push,
        cut_requests,
    );
    let report = report.expect("source");
    let (dest, received) = dest.expect("destination");
    let rp = report.postcopy.clone().expect("post-copy");
    assert_eq!(rp.reconnects, 1, "{rp:?}");
    let st = received.postcopy.clone().expect("stats");
    assert_eq!(
        st.requested_pages + st.pushed_pages,
        st.discard_pages,
        "{st:?}"
    );
    check(
        &src,
        Outcome {
            report,
            received,
            dest,
            vcpu,
        },
    );
}

#[test]
fn a_slow_push_keeps_the_destination_listening() {
    // 2 MiB of data at 1 MiB/s: the pacer waits about a second after the
    // first 1 MiB frame, longer than both sides' 300 ms I/O timeout.
    let small = MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: 2 << 20,
    }])
    .unwrap();
    let src = SoftVm::new(&small, &SoftConfig::idle()).unwrap();
    src.fill(2);
    src.start(); // running (no writers): a paused VM is never offered post-copy
    let timeout = Duration::from_millis(300);
    let (a, b) = mem::pair();
    let (fa, fb) = mem::pair();
    let dest = std::thread::spawn(move || {
        receive_postcopy_resumable(
            Box::new(b),
            Box::new(fb),
            &ReceiveConfig {
                io_timeout: timeout,
            },
            |desc| SoftVm::new(&desc.layout, &SoftConfig::idle()),
            |vm: &SoftVm, layout: &MemoryLayout| {
                let p = SoftPager::new(DestinationVm::memory(vm), layout);
                Ok(Box::new(p) as Box<dyn PostcopyMemory>)
            },
            &mut || None,
        )
    });
    let pc = pure();
    let config = MigrationConfig {
        io_timeout: timeout,
        max_bandwidth: Some(1 << 20),
        ..Default::default()
    };
    let report = Migration::new(&src)
        .config(config)
        .postcopy(Box::new(fa), pc)
        .run(Box::new(a))
        .expect("source");
    assert!(report.postcopy.is_some(), "switched to post-copy");
    let (dst, _) = dest.join().unwrap().expect("destination");
    dst.stop();
    assert!(dst.snapshot() == src.snapshot());
}

#[test]
fn a_restore_that_reads_guest_memory_gets_its_page_before_go() {
    let src = SoftVm::new(&layout(), &SoftConfig::default()).unwrap();
    src.fill(6);
    src.start();
    let pc = pure();
    let mut vcpu = Vcpu::new(Duration::from_secs(30));
    let record = Arc::new(Mutex::new(None));
    vcpu.restore_read = Some(record.clone());
    let (dest, report) = migrate_with(&src, pc, &MigrationConfig::default(), &vcpu, |t| t, |t| t);
    let (dest, received) = dest.expect("destination");
    let report = report.expect("source");
    let o = Outcome {
        report,
        received,
        dest,
        vcpu,
    };
    // The page the restore read is the paused source's.
    let ((region, page), got) = record.lock().unwrap().take().expect("restore read");
    let got = got.expect("the restore's page arrived");
    let want = src.snapshot();
    let at = (layout().regions()[..region]
        .iter()
        .map(|r| r.size)
        .sum::<u64>()
        + page * PAGE_SIZE) as usize;
    assert!(
        got[..] == want[at..at + PAGE_SIZE as usize],
        "the restore's page differs"
    );
    check(&src, o);
}

/// At each of the source's pauses, whether the destination's installer
/// was armed by then.
type ArmedAtPause = Arc<Mutex<Vec<bool>>>;

/// A running soft source filled from `seed` that records [`ArmedAtPause`],
/// and a destination vCPU.
fn recording_armed_at_pause(
    seed: u64,
) -> (
    livemig::testing::hooked::HookedVm<'static, SoftVm>,
    Vcpu,
    ArmedAtPause,
) {
    let soft = SoftVm::new(&layout(), &SoftConfig::default()).unwrap();
    soft.fill(seed);
    soft.start();
    let vcpu = Vcpu::new(Duration::from_secs(30));
    let slot = vcpu.pager.clone();
    let armed_at_pause: ArmedAtPause = Arc::default();
    let seen = armed_at_pause.clone();
    let src = livemig::testing::hooked::HookedVm::new(soft).on_pause(move |vm| {
        let armed = slot.lock().unwrap().as_ref().is_some_and(|p| p.armed());
        seen.lock().unwrap().push(armed);
        // A page written at every pause: the switchover's discard set is
        // never empty, however little the writer threads ran since the last
        // round (on a loaded host, nothing: then no page was left for the
        // destination's vCPU to fault on and `Dest::resume` found none).
        vm.write_as_guest((4 << 30) + 5 * PAGE_SIZE, 0x9A05_E000 ^ seed)?;
        SourceVm::pause(vm)
    });
    (src, vcpu, armed_at_pause)
}

/// The expensive part of the switch (the destination dropping the pages
/// still to come and registering its memory with the installer) happens
/// while the guest still runs on the source, not inside the downtime: the
/// installer is armed when the source pauses.
#[test]
fn the_destination_arms_before_the_source_pauses() {
    let (src, vcpu, armed_at_pause) = recording_armed_at_pause(4);
    let pc = PostcopyConfig {
        after_rounds: 2,
        on_non_convergence: false,
        ..Default::default()
    };
    let config = MigrationConfig {
        downtime_limit: Duration::from_nanos(1),
        ..Default::default()
    };
    let (dest, report) = migrate_with(&src, pc, &config, &vcpu, |t| t, |t| t);
    let (dest, received) = dest.expect("destination");
    let report = report.expect("source");
    // The handshake pauses to measure the state; the last pause is the
    // switchover's.
    let pauses = armed_at_pause.lock().unwrap().clone();
    assert_eq!(
        pauses.last(),
        Some(&true),
        "the switchover's pause came after the destination armed: {pauses:?}"
    );
    let rp = report.postcopy.clone().expect("switched to post-copy");
    let st = received.postcopy.clone().expect("destination stats");
    assert!(st.prepared, "{st:?}");
    assert_eq!(st.discard_pages, rp.discard_pages);
    assert_eq!(
        rp.prepared_pages + rp.late_discard_pages,
        rp.discard_pages,
        "{rp:?}"
    );
    assert_eq!(st.late_discard_pages, rp.late_discard_pages);
    let o = Outcome {
        report,
        received,
        dest,
        vcpu,
    };
    check(src.vm(), o);
}

/// A page the guest writes after the prepare (between the destination's
/// arming and the pause) is named by the switch: the destination drops its
/// stale copy and gets the new one.
#[test]
fn a_page_dirtied_after_the_prepare_is_dropped_at_the_switch() {
    let soft = SoftVm::new(&layout(), &SoftConfig::idle()).unwrap();
    soft.fill(8);
    soft.start();
    let vcpu = Vcpu::new(Duration::from_secs(30));
    let slot = vcpu.pager.clone();
    let late_addr = (4 << 30) + 3 * PAGE_SIZE;
    let src = livemig::testing::hooked::HookedVm::new(soft).on_pause(move |vm| {
        // The handshake's pauses come before the installer exists.
        if slot.lock().unwrap().as_ref().is_some_and(|p| p.armed()) {
            vm.write_as_guest(late_addr, 0x5EED_F1A7)?;
        }
        SourceVm::pause(vm)
    });
    let pc = PostcopyConfig {
        after_rounds: 2,
        on_non_convergence: false,
        ..Default::default()
    };
    let config = MigrationConfig {
        downtime_limit: Duration::from_nanos(1),
        ..Default::default()
    };
    let (dest, report) = migrate_with(&src, pc, &config, &vcpu, |t| t, |t| t);
    let (dest, received) = dest.expect("destination");
    let report = report.expect("source");
    let rp = report.postcopy.clone().expect("switched to post-copy");
    let st = received.postcopy.clone().expect("destination stats");
    // An idle guest: nothing to drop at the prepare, one page at the switch.
    assert_eq!(
        (rp.prepared_pages, rp.late_discard_pages, rp.discard_pages),
        (0, 1, 1),
        "{rp:?}"
    );
    assert!(st.prepared, "{st:?}");
    assert_eq!((st.late_discard_pages, st.discard_pages), (1, 1), "{st:?}");
    let o = Outcome {
        report,
        received,
        dest,
        vcpu,
    };
    // The vCPU reads the last missing page: the late one, with its new value.
    assert_eq!(o.vcpu.read.lock().unwrap().clone(), Some((1, 3)));
    check(src.vm(), o);
}

/// A destination of an older build (it grants post-copy without the
/// preparation: grant byte `1`), simulated by rewriting its `HelloReply` on
/// the way to the source: the source falls back to the old order (the
/// destination arms inside the downtime) and the migration is correct.
#[test]
fn a_destination_that_does_not_prepare_gets_the_old_order() {
    let (src, vcpu, armed_at_pause) = recording_armed_at_pause(9);
    let pc = PostcopyConfig {
        after_rounds: 1,
        on_non_convergence: false,
        ..Default::default()
    };
    let config = MigrationConfig {
        downtime_limit: Duration::from_nanos(1),
        ..Default::default()
    };
    let (dest, report) = migrate_with(&src, pc, &config, &vcpu, without_prepare_grant, |t| t);
    let (dest, received) =
        dest.unwrap_or_else(|e| panic!("destination: {e:?}; source: {:?}", report.as_ref().err()));
    let report = report.expect("source");
    let rp = report.postcopy.clone().expect("switched to post-copy");
    let st = received.postcopy.clone().expect("destination stats");
    assert_eq!(armed_at_pause.lock().unwrap().last(), Some(&false));
    assert_eq!((rp.prepared_pages, rp.late_discard_pages), (0, 0), "{rp:?}");
    assert!(!st.prepared, "{st:?}");
    assert_eq!(st.discard_pages, rp.discard_pages);
    let o = Outcome {
        report,
        received,
        dest,
        vcpu,
    };
    check(src.vm(), o);
}

/// Every page is installed, then the destination's `PostcopyComplete`
/// cannot be sent (its control connection breaks right before it): the
/// guest is whole on the destination, which succeeds with a warning; the
/// source, which never hears it, keeps its copy paused and stops writing.
#[test]
fn a_lost_completion_acknowledgement_leaves_a_whole_destination() {
    let src = SoftVm::new(&layout(), &SoftConfig::default()).unwrap();
    src.fill(11);
    src.start();
    let vcpu = Vcpu::new(Duration::from_secs(30));
    let wraps = Wraps {
        src_control: |t| t,
        dst_control: drop_frame(MsgKind::PostcopyComplete, 0),
        dst_fault: |t| t,
    };
    let (dest, report) = migrate_wrapped(&src, pure(), &MigrationConfig::default(), &vcpu, wraps);
    let (dest, received) = dest.unwrap_or_else(|e| {
        panic!(
            "destination: {e}; source: {:?}",
            report.as_ref().map(|_| "Ok")
        )
    });
    assert!(received.postcopy.is_some(), "switched to post-copy");
    // The source never heard that the pages were installed.
    let e = report.expect_err("the source cannot know the destination finished");
    assert_eq!(e.phase, Phase::Postcopy, "{e}");
    assert!(SourceVm::is_paused(&src));
    let writes = src.writes();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(src.writes(), writes);
    dest.vm.stop();
    assert!(
        dest.vm.snapshot() == src.snapshot(),
        "destination memory differs"
    );
}

/// The source's control connection through a proxy that passes every
/// frame, except that the destination's `HelloReply` loses its grant of the
/// preparation (what an older destination sends).
fn without_prepare_grant(to_dst: Box<dyn Transport>) -> Box<dyn Transport> {
    use livemig::protocol::{FrameReader, FrameWriter, HelloReply, Message};
    let (src_end, proxy) = mem::pair();
    let (mut up_rx, mut up_tx) = (proxy.try_clone().unwrap(), to_dst.try_clone().unwrap());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut up_rx, &mut up_tx);
        let _ = up_tx.shutdown();
    });
    std::thread::spawn(move || {
        let mut fr = FrameReader::new(to_dst);
        let mut fw = FrameWriter::new(Box::new(proxy) as Box<dyn Transport>);
        while let Ok(f) = fr.read_frame() {
            let sent = if f.kind == MsgKind::HelloReply {
                let mut reply = HelloReply::decode(f.payload).unwrap();
                assert!(reply.postcopy_prepare, "a new destination grants it");
                reply.postcopy_prepare = false;
                fw.send(&reply)
            } else {
                fw.write_frame(f.kind, &[f.payload])
            };
            if sent.and_then(|_| fw.flush()).is_err() {
                break;
            }
        }
        let _ = fw.get_ref().shutdown();
    });
    Box::new(src_end)
}

/// Post-copy uses one page stream: asking for two with it is refused at
/// the API, before anything is sent (no `Hello` on the control connection,
/// no stream opened), and the source guest keeps running.
#[test]
fn page_streams_with_postcopy_are_refused_before_anything_is_sent() {
    use std::io::Read;
    let src = SoftVm::new(&layout(), &SoftConfig::default()).unwrap();
    src.start();
    for pc in [pure(), PostcopyConfig::default()] {
        let (a, mut b) = mem::pair();
        let (fa, _fb) = mem::pair();
        let (opener, mut acceptor) = mem::streams();
        let e = Migration::new(&src)
            .postcopy(Box::new(fa), pc)
            .streams(2, opener)
            .run(Box::new(a))
            .expect_err("refused");
        let ErrorKind::Config(c) = &e.kind else {
            panic!("not a configuration error: {e}");
        };
        assert_eq!(c.field, "streams", "{e}");
        assert!(e.to_string().contains("one page stream"), "{e}");
        assert_eq!(e.phase, Phase::Handshake);
        assert!(!e.is_ambiguous());
        let mut buf = [0u8; 16];
        assert_eq!(b.read(&mut buf).unwrap(), 0, "something was sent");
        use livemig::transport::StreamAcceptor;
        assert!(acceptor.accept_stream(Duration::from_millis(50)).is_err());
        assert!(!src.is_paused());
    }
}
