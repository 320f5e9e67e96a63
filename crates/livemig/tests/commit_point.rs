//! The commit point, end to end on the software VM: after the source has
//! sent `Go`, only a well-formed `Resumed` (the destination runs the guest)
//! or a well-formed `Abandoned` (the destination dropped it and will never
//! run it) is an answer; everything else leaves the source paused with an
//! ambiguous outcome.
//!
//! The malformed answers come from a scripted destination that speaks the
//! protocol by hand; the "will never run" answers come from the real
//! `receive`.
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use livemig::memory::{GuestMemory, MemoryLayout};
use livemig::protocol::{ErrorMsg, FrameWriter, HelloReply, MsgKind, Ready};
use livemig::state::Section;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::{mem, Transport};
use livemig::vm::{DestinationVm, VmError};
use livemig::{
    migrate, receive, CancelToken, ErrorKind, Migration, MigrationConfig, MigrationError, OnLimit,
    Phase, Progress, ReceiveConfig, ReceiveReport, Reception, Report, SOURCE_CANCEL_GRACE,
};

mod common;
use common::{assert_paused, assert_running, hand_destination, one_region, running_source};

const IO: Duration = Duration::from_millis(1000);
const WATCHDOG: Duration = Duration::from_secs(60);

fn layout() -> MemoryLayout {
    one_region(4 << 20)
}

fn config() -> MigrationConfig {
    MigrationConfig {
        downtime_limit: Duration::from_nanos(1),
        max_rounds: 2,
        on_limit: OnLimit::ForceSwitchover,
        io_timeout: IO,
        ..Default::default()
    }
}

fn source(seed: u64) -> Arc<SoftVm> {
    running_source(&layout(), &SoftConfig::busy(), seed)
}

/// Runs `migrate` on `src` against `dest` (given the other end), under a
/// watchdog.
fn run_against<D>(src: &Arc<SoftVm>, dest: D) -> Result<Report, MigrationError>
where
    D: FnOnce(Box<dyn Transport>) + Send + 'static,
{
    run_against_via(src, |t| t, dest)
}

/// Like [`run_against`], the source's end of the connection wrapped by
/// `wrap`.
fn run_against_via<W, D>(src: &Arc<SoftVm>, wrap: W, dest: D) -> Result<Report, MigrationError>
where
    W: FnOnce(Box<dyn Transport>) -> Box<dyn Transport> + Send + 'static,
    D: FnOnce(Box<dyn Transport>) + Send + 'static,
{
    let src = src.clone();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (a, b) = mem::pair();
        let d = std::thread::spawn(move || dest(Box::new(b)));
        let r = migrate(
            &*src,
            wrap(Box::new(a)),
            &config(),
            &CancelToken::new(),
            &mut |_| {},
        );
        d.join().expect("destination thread panicked");
        let _ = tx.send(r);
    });
    rx.recv_timeout(WATCHDOG).expect("the migration hung")
}

/// A destination written by hand: accepts, reads everything up to
/// `Complete`, sends `Ready`, reads `Go`, then lets `answer` reply.
fn scripted(answer: fn(&mut FrameWriter<Box<dyn Transport>>)) -> impl FnOnce(Box<dyn Transport>) {
    move |t: Box<dyn Transport>| {
        let (hello, mut fr, mut fw) = hand_destination(t, Some(Duration::from_secs(10)));
        let reply = HelloReply::accepted(1, [0; 16]);
        assert_eq!(hello.streams, 1);
        fw.send(&reply).unwrap();
        fw.flush().unwrap();
        loop {
            let f = fr.read_frame().unwrap();
            if f.kind == MsgKind::Complete {
                break;
            }
        }
        fw.send(&Ready { restore_us: 1 }).unwrap();
        fw.flush().unwrap();
        let f = fr.read_frame().unwrap();
        assert_eq!(f.kind, MsgKind::Go);
        answer(&mut fw);
        let _ = fw.flush(); // fails after a shutdown
                            // Stay around until the source has read the answer.
        let _ = fr.read_frame();
    }
}

/// Migrates source `seed` against [`scripted`] with `answer` after `Go`:
/// the outcome must be ambiguous, name `needle`, and leave the source
/// paused.
fn ambiguous_after_go(seed: u64, answer: fn(&mut FrameWriter<Box<dyn Transport>>), needle: &str) {
    let src = source(seed);
    let r = run_against(&src, scripted(answer));
    assert_ambiguous(r, &src, needle);
}

fn assert_ambiguous(r: Result<Report, MigrationError>, src: &SoftVm, needle: &str) {
    let e = r.expect_err("the source must not report success");
    eprintln!("source: {e}");
    assert!(e.is_ambiguous(), "not ambiguous: {e}");
    assert_eq!(e.phase, Phase::Completion, "{e}");
    assert!(e.to_string().contains(needle), "expected '{needle}': {e}");
    assert_paused(src, needle);
}

/// A `Resumed` frame (valid frame, right kind) whose payload does not
/// decode. The source used to treat it as an ordinary protocol error and
/// resume its guest, while the destination (which sent a `Resumed`) may run
/// it.
#[test]
fn malformed_resumed_is_ambiguous_and_the_source_stays_paused() {
    ambiguous_after_go(
        1,
        |fw| fw.write_frame(MsgKind::Resumed, &[&[1, 2, 3]]).unwrap(),
        "malformed Resumed",
    );
}

/// An `Error` after `Go`: the destination may have started the guest
/// before it failed.
#[test]
fn error_after_go_is_ambiguous() {
    ambiguous_after_go(
        2,
        |fw| {
            fw.send(&ErrorMsg::new("completion", "something broke"))
                .unwrap()
        },
        "something broke",
    );
}

/// Some other frame where `Resumed` belongs.
#[test]
fn another_frame_after_go_is_ambiguous() {
    ambiguous_after_go(
        3,
        |fw| fw.write_frame(MsgKind::Ready, &[&[0; 8]]).unwrap(),
        "unexpected Ready",
    );
}

/// The connection drops right after `Go` was read.
#[test]
fn dropped_connection_after_go_is_ambiguous() {
    ambiguous_after_go(
        4,
        |fw| {
            fw.get_ref().shutdown().unwrap();
        },
        "outcome unknown",
    );
}

/// A destination VM whose resume fails (and so never runs).
struct FailingResume(SoftVm);

impl DestinationVm for FailingResume {
    fn memory(&self) -> &dyn GuestMemory {
        DestinationVm::memory(&self.0)
    }

    fn restore_state(&mut self, sections: &[Section]) -> Result<(), VmError> {
        self.0.restore_state(sections)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        Err(VmError::Resume("injected: the vCPUs cannot start".into()))
    }
}

fn assert_abandoned(r: Result<Report, MigrationError>, src: &SoftVm, needle: &str) {
    let e = r.expect_err("the source must not report success");
    eprintln!("source: {e}");
    assert!(
        !e.is_ambiguous(),
        "ambiguous, but the destination said it never runs: {e}"
    );
    assert!(e.to_string().contains("will never run"), "{e}");
    assert!(e.to_string().contains(needle), "expected '{needle}': {e}");
    assert_running(src, needle);
}

/// The destination's resume fails after `Go`: it knows the guest will never
/// run there, says so, and the source runs the guest again.
#[test]
fn destination_resume_failure_resumes_the_source() {
    let src = source(5);
    let (dtx, drx) = mpsc::channel();
    let r = run_against(&src, move |t| {
        let want = layout();
        let r = receive(t, &ReceiveConfig { io_timeout: IO }, |d| {
            assert_eq!(d.layout, want);
            SoftVm::new(&d.layout, &SoftConfig::idle()).map(FailingResume)
        });
        let _ = dtx.send(r.map(|_| ()));
    });
    let de = drx.recv().unwrap().expect_err("the destination must fail");
    assert_eq!(de.phase, Phase::Completion, "{de}");
    assert_abandoned(r, &src, "cannot start");
}

/// The destination gives up waiting for `Go` (the source's `Go` is late):
/// it drops the VM and says so; when the late `Go` goes out the source reads
/// that answer and runs the guest again instead of staying paused.
#[test]
fn destination_timing_out_before_go_resumes_the_source() {
    use livemig::testing::fault::{At, Fault, FaultTransport};
    let src = source(6);
    let (dtx, drx) = mpsc::channel();
    let r = run_against_via(
        &src,
        |a| {
            let (a, _probe) =
                FaultTransport::new(a, Fault::Stall(IO * 3).at(At::kind(MsgKind::Go, 0)));
            Box::new(a)
        },
        move |b| {
            let r = receive(b, &ReceiveConfig { io_timeout: IO }, |d| {
                SoftVm::new(&d.layout, &SoftConfig::idle())
            });
            let _ = dtx.send(r.map(|_| ()));
        },
    );
    let de = drx
        .recv()
        .unwrap()
        .expect_err("the destination must give up");
    assert_eq!(de.phase, Phase::Completion, "{de}");
    assert!(de.to_string().contains("timed out"), "{de}");
    assert_abandoned(r, &src, "timed out");
}

/// A destination soft VM that records whether its guest was started, and
/// runs `before_resume` first (on `Go`, before the guest starts).
struct Watched {
    vm: SoftVm,
    resumed: Arc<AtomicBool>,
    before_resume: Option<Box<dyn FnOnce() + Send>>,
}

impl DestinationVm for Watched {
    fn memory(&self) -> &dyn GuestMemory {
        DestinationVm::memory(&self.vm)
    }

    fn restore_state(&mut self, sections: &[Section]) -> Result<(), VmError> {
        self.vm.restore_state(sections)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        if let Some(f) = self.before_resume.take() {
            f();
        }
        self.resumed.store(true, Ordering::SeqCst);
        DestinationVm::resume(&mut self.vm)
    }
}

/// When a cancel was asked for (set by whoever cancels).
type CancelledAt = Arc<Mutex<Option<Instant>>>;

/// What both sides of a migration whose source was cancelled returned:
/// the source's result and how long after the cancel it returned (an
/// upper bound on when it stopped), the destination's result and whether
/// its guest was started.
struct Outcome {
    source: Result<Report, MigrationError>,
    source_took: Duration,
    destination: Result<ReceiveReport, MigrationError>,
    started_there: bool,
}

/// Migrates a busy source `src` (cancel token `cancel`, `progress` as its
/// callback) to a destination whose VM runs `before_resume` on `Go`; both
/// sides under the watchdog. Whoever cancels records when in `at`.
fn migrate_and_cancel(
    src: &Arc<SoftVm>,
    cancel: &CancelToken,
    at: &CancelledAt,
    progress: impl FnMut(&Progress) + Send + 'static,
    before_resume: impl FnOnce(Box<dyn Transport>) + Send + 'static,
) -> Outcome {
    let (a, b) = mem::pair();
    let resumed = Arc::new(AtomicBool::new(false));
    let (dtx, drx) = mpsc::channel();
    let r2 = resumed.clone();
    std::thread::spawn(move || {
        let cut = b.try_clone().expect("clone the destination's end");
        let r = Reception::new(Box::new(b))
            .config(ReceiveConfig { io_timeout: IO })
            .run(move |d| {
                let vm = SoftVm::new(&d.layout, &SoftConfig::idle())?;
                let before_resume: Box<dyn FnOnce() + Send> = Box::new(move || before_resume(cut));
                Ok(Watched {
                    vm,
                    resumed: r2,
                    before_resume: Some(before_resume),
                })
            })
            .map(|(_, report)| report);
        let _ = dtx.send(r);
    });
    let (stx, srx) = mpsc::channel();
    let (src2, c2, at2) = (src.clone(), cancel.clone(), at.clone());
    std::thread::spawn(move || {
        let r = Migration::new(&*src2)
            .config(config())
            .cancel(c2)
            .progress(progress)
            .run(Box::new(a));
        let took = at2.lock().unwrap().map(|t| t.elapsed());
        let _ = stx.send((r, took));
    });
    let (source, took) = srx.recv_timeout(WATCHDOG).expect("the source hung");
    let destination = drx.recv_timeout(WATCHDOG).expect("the destination hung");
    Outcome {
        source,
        source_took: took.expect("the migration ended before the cancel"),
        destination,
        started_there: resumed.load(Ordering::SeqCst),
    }
}

/// An operator's cancel while the source is paused for the stop-and-copy
/// (here: from the `Paused` event, before the last pages, the state and
/// `Go`): the source runs its guest again and fails `Cancelled`, not
/// ambiguous; the destination hears why and never starts the guest.
#[test]
fn a_source_cancel_during_the_stop_and_copy_keeps_the_guest_on_the_source() {
    let src = source(7);
    let cancel = CancelToken::new();
    let at = CancelledAt::default();
    let (c2, at2) = (cancel.clone(), at.clone());
    let o = migrate_and_cancel(
        &src,
        &cancel,
        &at,
        move |p| {
            if let Progress::Paused { .. } = p {
                *at2.lock().unwrap() = Some(Instant::now());
                c2.cancel();
            }
        },
        |_| {},
    );
    let e = o
        .source
        .expect_err("a migration cancelled before Go completed");
    let de = o.destination.expect_err("the destination completed");
    println!(
        "source: {e} ({:?} after the cancel)\ndestination: {de}",
        o.source_took
    );
    assert!(matches!(e.kind, ErrorKind::Cancelled), "source: {e}");
    assert!(!e.is_ambiguous(), "source: {e}");
    assert_running(&src, "a cancel during the stop-and-copy");
    assert!(!o.started_there, "the destination started the guest too");
    match &de.kind {
        ErrorKind::Remote { message, .. } if message == "cancelled" => {}
        _ if o.source_took >= SOURCE_CANCEL_GRACE => {}
        _ => panic!("the destination did not hear that the source cancelled: {de}"),
    }
}

/// An operator's cancel after the commit point (here: from the
/// destination's resume, which runs once it read `Go`) cannot undo it: the
/// guest runs on the destination, and only there. The destination answers
/// at once; the source completes — or, if its token shut the connection
/// down before it read the answer (the source took longer than
/// `SOURCE_CANCEL_GRACE`), stays paused with an ambiguous outcome.
#[test]
fn a_source_cancel_after_go_leaves_the_guest_on_the_destination() {
    let src = source(8);
    let cancel = CancelToken::new();
    let at = CancelledAt::default();
    let (c2, at2) = (cancel.clone(), at.clone());
    let o = migrate_and_cancel(
        &src,
        &cancel,
        &at,
        |_| {},
        move |_| {
            *at2.lock().unwrap() = Some(Instant::now());
            c2.cancel();
        },
    );
    let received = o.destination.expect("the destination runs the guest");
    assert!(received.running && o.started_there);
    match o.source {
        Ok(report) => assert_eq!(report.status, livemig::report::Status::Completed),
        Err(e) if e.is_ambiguous() && o.source_took >= SOURCE_CANCEL_GRACE => {
            eprintln!("source: {e} ({:?} after the cancel)", o.source_took)
        }
        Err(e) => panic!(
            "a cancel after Go: source {e} ({:?} after it)",
            o.source_took
        ),
    }
    assert_paused(&src, "a cancel after Go");
}

/// As [`a_source_cancel_after_go_leaves_the_guest_on_the_destination`],
/// with a destination that answers only once the source's token has shut
/// the connection down (`SOURCE_CANCEL_GRACE` after the cancel): the answer
/// never reaches the source, which stays paused with an ambiguous outcome
/// (as `CancelToken` says: a cancel after `Go` cannot undo it); the guest
/// runs on the destination only.
#[test]
fn a_source_cancel_after_go_that_cuts_the_answer_is_ambiguous() {
    let src = source(9);
    let cancel = CancelToken::new();
    let at = CancelledAt::default();
    let (c2, at2) = (cancel.clone(), at.clone());
    let o = migrate_and_cancel(
        &src,
        &cancel,
        &at,
        |_| {},
        move |mut cut| {
            *at2.lock().unwrap() = Some(Instant::now());
            c2.cancel();
            // After `Go` the source sends nothing: this read returns when the
            // token shuts the connection down.
            cut.set_read_timeout(Some(WATCHDOG)).unwrap();
            let got = std::io::Read::read(&mut cut, &mut [0u8; 1]);
            assert!(
                matches!(got, Ok(0)),
                "the connection was not shut down: {got:?}"
            );
        },
    );
    let received = o.destination.expect("the destination runs the guest");
    assert!(received.running && o.started_there);
    let e = o
        .source
        .expect_err("the source heard Resumed on a shut connection");
    println!("source: {e}");
    assert!(e.is_ambiguous(), "a cancel after Go: {e}");
    assert_eq!(e.phase, Phase::Completion, "{e}");
    assert_paused(&src, "a cancel after Go");
}
