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

use std::sync::{mpsc, Arc};
use std::time::Duration;

use livemig::memory::{GuestMemory, MemoryLayout};
use livemig::protocol::{ErrorMsg, FrameWriter, HelloReply, MsgKind, Ready};
use livemig::state::Section;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::{mem, Transport};
use livemig::vm::{DestinationVm, VmError};
use livemig::{
    migrate, receive, CancelToken, MigrationConfig, MigrationError, OnLimit, Phase, ReceiveConfig,
    Report,
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
