//! Fault injection through every phase of a migration, in both directions,
//! on the software VM over the in-memory transport.
//!
//! Every case wraps the source's transport (faults travel source →
//! destination) or the destination's (destination → source) in a
//! [`FaultTransport`] that drops the connection, flips a byte, truncates a
//! frame, stalls, duplicates a frame or silences the link at a chosen frame,
//! and then checks what the protocol promises:
//!
//! * before the commit point (`Go`): the source returns an error that is not
//!   ambiguous, its guest keeps running (its writers keep writing), dirty
//!   logging is off again, and the destination returns an error naming the
//!   phase and the reason;
//! * after it: the source reports an ambiguous outcome and stays paused; the
//!   destination either runs the guest (it got `Go`) or dropped it;
//! * harmless faults (a short stall, a duplicate nobody reads) change nothing;
//! * in every case a new attempt afterwards succeeds and the destination's
//!   memory is identical to the source's.
//!
//! Every attempt runs under a watchdog: a hang fails the test instead of
//! blocking the suite, and short I/O timeouts keep each case quick.

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use livemig::bitmap::DirtyBitmap;
use livemig::memory::{MemoryLayout, RegionDesc};
use livemig::protocol::MsgKind;
use livemig::soft::{SoftConfig, SoftVm};
use livemig::transport::fault::{At, Fault, FaultProbe, FaultSpec, FaultTransport};
use livemig::transport::{mem, Transport};
use livemig::vm::{SourceVm, VmError};
use livemig::{
    migrate, receive, CancelToken, MigrationConfig, MigrationError, OnLimit, Phase, ReceiveConfig,
    ReceiveReport, Report,
};

/// I/O timeout of both sides.
const IO: Duration = Duration::from_millis(1000);
/// A stall the peer must notice (longer than its timeout).
const LONG_STALL: Duration = Duration::from_millis(2500);
/// A stall the peer must tolerate.
const SHORT_STALL: Duration = Duration::from_millis(150);
/// No attempt may take longer than this.
const WATCHDOG: Duration = Duration::from_secs(60);

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

fn busy() -> SoftConfig {
    SoftConfig {
        guest_writers: 1,
        device_writers: 1,
        pages_per_ms: 20,
    }
}

fn idle() -> SoftConfig {
    SoftConfig {
        guest_writers: 0,
        device_writers: 0,
        pages_per_ms: 0,
    }
}

/// Exactly three pre-copy rounds, then a forced switchover: the frame
/// sequence is the same in every attempt (`RoundEnd` 0, 1, 2, then the final
/// memory, `State`, `Complete`).
fn config() -> MigrationConfig {
    MigrationConfig {
        downtime_limit: Duration::from_nanos(1),
        max_rounds: 3,
        on_limit: OnLimit::ForceSwitchover,
        io_timeout: IO,
        batch_pages: 64,
        ..Default::default()
    }
}

/// A running source VM with data in every page.
fn source(seed: u64) -> Arc<SoftVm> {
    let vm = SoftVm::new(&layout(), &busy()).unwrap();
    vm.fill(seed);
    vm.start();
    Arc::new(vm)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Wrap the source's transport: source → destination bytes.
    Source,
    /// Wrap the destination's transport: destination → source bytes.
    Destination,
}

struct Attempt {
    src: Result<Report, MigrationError>,
    dst: Result<(SoftVm, ReceiveReport), MigrationError>,
    probes: Vec<FaultProbe>,
}

/// One migration of `src` to a fresh destination (with writers per
/// `dest_cfg`), with `faults` injected, under the watchdog.
fn attempt(src: &Arc<SoftVm>, faults: &[(Side, FaultSpec)], dest_cfg: SoftConfig) -> Attempt {
    let src = src.clone();
    let plan = faults.to_vec();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (a, b) = mem::pair();
        let mut a: Box<dyn Transport> = Box::new(a);
        let mut b: Box<dyn Transport> = Box::new(b);
        let mut probes = Vec::new();
        for side in [Side::Source, Side::Destination] {
            let specs: Vec<_> = plan
                .iter()
                .filter(|(s, _)| *s == side)
                .map(|(_, f)| *f)
                .collect();
            if specs.is_empty() {
                continue;
            }
            let t = match side {
                Side::Source => &mut a,
                Side::Destination => &mut b,
            };
            let inner = std::mem::replace(t, Box::new(mem::pair().0));
            let (w, p) = FaultTransport::with_plan(inner, specs);
            *t = Box::new(w);
            probes.push(p);
        }
        let want = src.layout().clone();
        let dest = std::thread::spawn(move || {
            receive(b, &ReceiveConfig { io_timeout: IO }, |d| {
                if d.layout != want {
                    return Err(VmError::Incompatible("unexpected layout".into()));
                }
                SoftVm::new(&d.layout, &dest_cfg)
            })
        });
        let r = migrate(&*src, a, &config(), &CancelToken::new(), &mut |_| {});
        let d = dest.join().expect("destination thread panicked");
        let _ = tx.send(Attempt {
            src: r,
            dst: d,
            probes,
        });
    });
    let t0 = Instant::now();
    match rx.recv_timeout(WATCHDOG) {
        Ok(a) => a,
        Err(e) => panic!(
            "migration attempt with {faults:?} did not finish ({e:?} after {:?})",
            t0.elapsed()
        ),
    }
}

/// The VM's writers make progress.
fn assert_running(vm: &SoftVm, what: &str) {
    let w = vm.writes();
    let deadline = Instant::now() + Duration::from_secs(5);
    while vm.writes() == w {
        assert!(Instant::now() < deadline, "{what}: writers stopped");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The VM's writers stay stopped.
fn assert_paused(vm: &SoftVm, what: &str) {
    let w = vm.writes();
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(vm.writes(), w, "{what}: writers run");
}

/// Collects what the VM's dirty log records while its writers (which must
/// be running) make `writes` more writes.
fn logged_while_writing(vm: &SoftVm, writes: u64) -> u64 {
    let mut t = vm.dirty_tracker().unwrap();
    let mut bm = DirtyBitmap::new(vm.layout());
    t.sync(&mut bm).unwrap();
    bm.clear();
    let w = vm.writes();
    let deadline = Instant::now() + Duration::from_secs(5);
    while vm.writes() < w + writes {
        assert!(Instant::now() < deadline, "writers stopped");
        std::thread::sleep(Duration::from_millis(2));
    }
    t.sync(&mut bm).unwrap();
    bm.count()
}

/// Dirty logging is off: the guest writers' stores are not logged any more.
fn assert_logging_off(vm: &SoftVm, what: &str) {
    let n = logged_while_writing(vm, 200);
    assert_eq!(n, 0, "{what}: dirty logging still on ({n} pages logged)");
}

/// A migration without faults succeeds and the memory is identical.
fn assert_retry_succeeds(src: &Arc<SoftVm>, what: &str) {
    let a = attempt(src, &[], idle());
    if let Err(e) = &a.src {
        panic!("{what}: the retry failed on the source: {e}");
    }
    let (dst, _) = a
        .dst
        .unwrap_or_else(|e| panic!("{what}: the retry failed on the destination: {e}"));
    // The source is paused after a successful migration and the destination
    // has no writers: both memories are final.
    assert!(
        src.snapshot() == dst.snapshot(),
        "{what}: memory differs after the retry"
    );
}

/// What a faulted attempt must end in.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Fails before the commit point: the source keeps its guest; the
    /// destination fails in a phase from `first` to `last` with a message
    /// containing one of `reasons`.
    Fails {
        first: Phase,
        last: Phase,
        reasons: &'static [&'static str],
    },
    /// Fails after `Go`: the source is ambiguous and stays paused; the
    /// destination runs the guest (`runs`) or failed.
    Ambiguous { runs: bool },
    /// Nothing visible happens.
    Succeeds,
}

/// Fails with the destination in exactly `phase`.
fn fails_in(phase: Phase, reasons: &'static [&'static str]) -> Expect {
    Expect::Fails {
        first: phase,
        last: phase,
        reasons,
    }
}

/// The phases in the order a migration goes through them.
fn rank(p: Phase) -> u64 {
    match p {
        Phase::Handshake => 0,
        Phase::Precopy(n) => 1 + u64::from(n),
        Phase::FinalMemory => 1 << 40,
        Phase::State => (1 << 40) + 1,
        Phase::Completion => (1 << 40) + 2,
    }
}

const CLOSED: &str = "connection closed by the peer";
const TIMEOUT: &str = "timed out";
const CRC: &str = "crc mismatch";
const SEQ: &str = "unexpected frame seq";
const REMOTE: &str = "peer reported an error";
const BAD_MAGIC: &str = "bad magic";

/// Runs one faulted attempt on a fresh source and checks `expect`, then a
/// clean retry.
fn case(seed: u64, faults: &[(Side, FaultSpec)], expect: Expect) {
    let what = format!("{faults:?}");
    let src = source(seed);
    // Let the writers dirty some memory first.
    std::thread::sleep(Duration::from_millis(10));
    let a = attempt(&src, faults, busy());
    let fired: Vec<_> = a.probes.iter().flat_map(|p| p.fired()).collect();
    assert_eq!(
        fired.len(),
        faults.len(),
        "{what}: not every fault struck: {fired:?}"
    );
    for f in &fired {
        eprintln!("{what}: {f}");
    }
    match expect {
        Expect::Fails {
            first,
            last,
            reasons,
        } => {
            let se = match &a.src {
                Ok(_) => panic!("{what}: the source succeeded"),
                Err(e) => e,
            };
            let de = match &a.dst {
                Ok(_) => panic!("{what}: the destination succeeded (source: {se})"),
                Err(e) => e,
            };
            eprintln!("{what}:\n  source: {se}\n  destination: {de}");
            assert!(!se.is_ambiguous(), "{what}: {se}");
            assert!(
                (rank(first)..=rank(last)).contains(&rank(de.phase)),
                "{what}: destination failed in {} (expected {first:?}..={last:?}): {de}",
                de.phase
            );
            let msg = de.to_string();
            assert!(
                msg.contains(&de.phase.to_string()),
                "{what}: the message does not name the phase: {msg}"
            );
            assert!(
                reasons.iter().any(|r| msg.contains(r)),
                "{what}: destination error lacks a reason among {reasons:?}: {msg}"
            );
            assert_running(&src, &what);
            assert_logging_off(&src, &what);
        }
        Expect::Ambiguous { runs } => {
            let se = match &a.src {
                Ok(_) => panic!("{what}: the source succeeded"),
                Err(e) => e,
            };
            eprintln!("{what}:\n  source: {se}");
            assert!(se.is_ambiguous(), "{what}: not ambiguous: {se}");
            assert_eq!(se.phase, Phase::Completion, "{what}: {se}");
            // The source must not resume by itself.
            assert_paused(&src, &what);
            match (&a.dst, runs) {
                (Ok((dst, _)), true) => assert_running(dst, &format!("{what}: destination")),
                (Err(de), false) => {
                    eprintln!("  destination: {de}");
                    assert_eq!(de.phase, Phase::Completion, "{what}: {de}");
                }
                (Ok(_), false) => panic!("{what}: the destination runs the guest"),
                (Err(de), true) => panic!("{what}: the destination failed: {de}"),
            }
            // The operator decides to resume the source; logging is off.
            src.resume().unwrap();
            assert_logging_off(&src, &what);
        }
        Expect::Succeeds => {
            if let Err(e) = &a.src {
                panic!("{what}: the source failed: {e}");
            }
            let (dst, _) = a
                .dst
                .as_ref()
                .unwrap_or_else(|e| panic!("{what}: the destination failed: {e}"));
            assert_running(dst, &what);
            assert_paused(&src, &what);
            src.resume().unwrap();
            assert_logging_off(&src, &what);
        }
    }
    drop(a);
    assert_retry_succeeds(&src, &what);
}

/// The faults tried at every point: (fault, offset into the frame).
/// `trunc` is where a truncation cuts (inside the payload if there is one).
fn faults_at(at: At, trunc: u64) -> [(Fault, At); 7] {
    [
        (Fault::Drop, at),
        // The crc field of the header.
        (Fault::Flip(0x20), at.offset(12)),
        (Fault::Truncate, at.offset(trunc)),
        (Fault::Stall(LONG_STALL), at),
        (Fault::Stall(SHORT_STALL), at),
        (Fault::Duplicate, at),
        (Fault::Blackhole, at),
    ]
}

/// Runs the seven faults at `at` on `side`; `expect` maps each fault to its
/// expected outcome.
fn point(seed: u64, side: Side, at: At, trunc: u64, expect: impl Fn(Fault) -> Expect) {
    point_with(seed, &[], side, at, trunc, expect);
}

/// [`point`] with `extra` faults planned in every case.
fn point_with(
    seed: u64,
    extra: &[(Side, FaultSpec)],
    side: Side,
    at: At,
    trunc: u64,
    expect: impl Fn(Fault) -> Expect,
) {
    for (i, (fault, at)) in faults_at(at, trunc).into_iter().enumerate() {
        let mut faults = extra.to_vec();
        faults.push((side, fault.at(at)));
        case(seed + i as u64, &faults, expect(fault));
    }
}

// ---------------------------------------------------------------------------
// Source → destination
// ---------------------------------------------------------------------------
//
// A drop is a reset: the in-memory pipe, like a reset TCP connection, loses
// the bytes still in flight, so the destination may fail a few frames (or
// rounds) before the point, in the phase it had reached.

fn is_short(f: Fault) -> bool {
    f == Fault::Stall(SHORT_STALL)
}

#[test]
fn source_side_handshake() {
    let hs = Phase::Handshake;
    point(
        100,
        Side::Source,
        At::kind(MsgKind::Hello, 0),
        17,
        |f| match f {
            _ if is_short(f) => Expect::Succeeds,
            Fault::Drop => fails_in(hs, &[CLOSED]),
            Fault::Flip(_) => fails_in(hs, &[CRC]),
            Fault::Stall(_) => fails_in(hs, &[TIMEOUT]),
            // Both sides wait one timeout; whoever gives up first decides
            // whether the destination sees a timeout or the source hanging up.
            Fault::Truncate | Fault::Blackhole => fails_in(hs, &[TIMEOUT, CLOSED]),
            // The copy arrives where the first Pages frame should be.
            Fault::Duplicate => fails_in(Phase::Precopy(0), &[SEQ]),
        },
    );
}

/// Faults in the frames of a memory copy: `phase` is where the destination
/// fails, `drop_from` the earliest phase a drop may leave it in. A truncated
/// frame is completed by the frames after it (crc mismatch) or waits for
/// bytes that never come (timeout).
fn copy_expect(drop_from: Phase, phase: Phase) -> impl Fn(Fault) -> Expect {
    move |f| match f {
        _ if is_short(f) => Expect::Succeeds,
        Fault::Drop => Expect::Fails {
            first: drop_from,
            last: phase,
            reasons: &[CLOSED],
        },
        Fault::Flip(_) => fails_in(phase, &[CRC]),
        Fault::Truncate => fails_in(phase, &[CRC, BAD_MAGIC, TIMEOUT]),
        Fault::Stall(_) => fails_in(phase, &[TIMEOUT]),
        // The source sends on into the void, then waits one timeout for
        // Ready and hangs up: about when the destination's timeout fires.
        Fault::Blackhole => fails_in(phase, &[TIMEOUT, CLOSED]),
        Fault::Duplicate => fails_in(phase, &[SEQ]),
    }
}

#[test]
fn source_side_round_0() {
    // The third Pages frame of the full pass; truncated in the middle of
    // its page data.
    let at = At::kind(MsgKind::Pages, 2);
    let p0 = Phase::Precopy(0);
    point(200, Side::Source, at, 16 + 5000, copy_expect(p0, p0));
}

#[test]
fn source_side_later_round() {
    // The first frame of round 1 (it follows RoundEnd 0).
    let at = At::after(MsgKind::RoundEnd, 0);
    let expect = copy_expect(Phase::Precopy(0), Phase::Precopy(1));
    point(300, Side::Source, at, 17, expect);
}

#[test]
fn source_side_final_memory() {
    // The first frame after the last RoundEnd: the source is paused and
    // sends its last dirty pages. The destination cannot tell the final
    // pages from another round (no frame marks the pause), so it names
    // "pre-copy round 3".
    //
    // Round 2 is short; a harmless stall at its end lets the writers dirty
    // pages for the final copy.
    let at = At::after(MsgKind::RoundEnd, 2);
    let slow = [(
        Side::Source,
        Fault::Stall(Duration::from_millis(30)).at(At::kind(MsgKind::RoundEnd, 2)),
    )];
    let src = source(1);
    std::thread::sleep(Duration::from_millis(10));
    let probe = [slow[0], (Side::Source, Fault::Flip(0).at(at))];
    let a = attempt(&src, &probe, idle());
    assert!(a.src.is_ok() && a.dst.is_ok());
    let kind = a.probes[0].fired()[1].kind;
    assert_eq!(
        kind,
        Some(MsgKind::Pages),
        "no dirty page left for the final copy"
    );
    let expect = copy_expect(Phase::Precopy(0), Phase::Precopy(3));
    point_with(400, &slow, Side::Source, at, 17, expect);
}

#[test]
fn source_side_state() {
    // The State frame. The destination learns it is in the state phase
    // once the State frame was read; a fault inside that frame is reported
    // in the phase before it (the final copy, "pre-copy round 3").
    let p3 = Phase::Precopy(3);
    point(
        500,
        Side::Source,
        At::kind(MsgKind::State, 0),
        17,
        |f| match f {
            // The copy arrives where Complete should be.
            Fault::Duplicate => fails_in(Phase::State, &[SEQ]),
            other => copy_expect(Phase::Precopy(0), p3)(other),
        },
    );
}

#[test]
fn source_side_complete() {
    // The Complete frame (empty): the last frame before the source waits
    // for Ready. Truncating it (in its header) leaves the destination
    // waiting for the rest.
    let st = Phase::State;
    point(
        600,
        Side::Source,
        At::kind(MsgKind::Complete, 0),
        8,
        |f| match f {
            _ if is_short(f) => Expect::Succeeds,
            Fault::Drop => Expect::Fails {
                first: Phase::Precopy(0),
                last: st,
                reasons: &[CLOSED],
            },
            Fault::Flip(_) => fails_in(st, &[CRC]),
            // Both sides time out; the source's Error frame (or its hanging up)
            // may come first. After a truncation, the Error frame's bytes may
            // complete the cut header with a nonsense length.
            Fault::Truncate | Fault::Blackhole | Fault::Stall(_) => {
                fails_in(st, &[TIMEOUT, REMOTE, CLOSED])
            }
            // The destination restores, sends Ready, and finds the copy where Go
            // should be: it drops the VM. The source has sent Go by then.
            Fault::Duplicate => Expect::Ambiguous { runs: false },
        },
    );
}

#[test]
fn source_side_go() {
    // Go, the commit: once the source tries to send it, any failure is
    // ambiguous and the source stays paused.
    point(
        700,
        Side::Source,
        At::kind(MsgKind::Go, 0),
        8,
        |f| match f {
            _ if is_short(f) => Expect::Succeeds,
            // The destination resumes on the first Go and never reads the copy.
            Fault::Duplicate => Expect::Succeeds,
            _ => Expect::Ambiguous { runs: false },
        },
    );
}

// ---------------------------------------------------------------------------
// Destination → source
// ---------------------------------------------------------------------------

#[test]
fn destination_side_handshake() {
    let at = At::kind(MsgKind::HelloReply, 0);
    point(800, Side::Destination, at, 17, |f| match f {
        _ if is_short(f) => Expect::Succeeds,
        Fault::Drop => fails_in(Phase::Handshake, &["writing"]),
        // The source gives up in its handshake and hangs up (or the
        // destination times out first: both wait one timeout).
        Fault::Flip(_) => fails_in(Phase::Precopy(0), &[CLOSED]),
        Fault::Truncate | Fault::Blackhole => fails_in(Phase::Precopy(0), &[CLOSED, TIMEOUT]),
        // The destination finds the source gone when the stall ends.
        Fault::Stall(_) => fails_in(Phase::Handshake, &["writing"]),
        // The source reads the copy where Ready should be (it is there
        // already when the source looks), before Go, and tells the
        // destination, which may still be sending Ready.
        Fault::Duplicate => fails_in(Phase::Completion, &[REMOTE, "writing"]),
    });
}

#[test]
fn destination_side_ready() {
    let cp = Phase::Completion;
    point(
        900,
        Side::Destination,
        At::kind(MsgKind::Ready, 0),
        17,
        |f| match f {
            _ if is_short(f) => Expect::Succeeds,
            Fault::Drop => fails_in(cp, &["writing"]),
            // The source gives up before Go, resumes and tells the destination.
            Fault::Flip(_) | Fault::Truncate | Fault::Blackhole => {
                fails_in(cp, &[REMOTE, CLOSED, TIMEOUT])
            }
            Fault::Stall(_) => fails_in(cp, &["writing", REMOTE, CLOSED]),
            // The source sends Go on the first Ready, then reads the copy where
            // Resumed should be; the destination runs the guest.
            Fault::Duplicate => Expect::Ambiguous { runs: true },
        },
    );
}

#[test]
fn destination_side_resumed() {
    let at = At::kind(MsgKind::Resumed, 0);
    point(1000, Side::Destination, at, 17, |f| match f {
        _ if is_short(f) => Expect::Succeeds,
        Fault::Duplicate => Expect::Succeeds,
        // The guest runs on the destination; the source cannot know.
        _ => Expect::Ambiguous { runs: true },
    });
}

// ---------------------------------------------------------------------------
// The two moments around the commit point, spelled out
// ---------------------------------------------------------------------------

/// The connection dies after the destination resumed the guest, before the
/// source heard `Resumed`: the source must report an ambiguous outcome and
/// stay paused; the destination runs the guest.
#[test]
fn connection_dies_before_resumed_is_ambiguous_and_source_stays_paused() {
    let src = source(42);
    std::thread::sleep(Duration::from_millis(10));
    let spec = Fault::Drop.at(At::kind(MsgKind::Resumed, 0));
    let a = attempt(&src, &[(Side::Destination, spec)], busy());
    assert_eq!(a.probes[0].fired().len(), 1);
    let e = a.src.expect_err("the source must fail");
    assert!(e.is_ambiguous(), "{e}");
    assert_eq!(e.phase, Phase::Completion);
    assert!(e.to_string().contains("outcome unknown"), "{e}");
    let (dst, report) = a.dst.expect("the destination runs the guest");
    assert!(report.resume_ms >= 0.0);
    assert_running(&dst, "destination");
    // The source never resumes by itself.
    assert_paused(&src, "source");
    std::thread::sleep(Duration::from_millis(200));
    assert_paused(&src, "source");
    drop(dst);
    src.resume().unwrap();
    assert_logging_off(&src, "after the ambiguous outcome");
    assert_retry_succeeds(&src, "after the ambiguous outcome");
}

/// The connection dies after the destination sent `Ready` and before `Go`
/// arrives (both directions go silent): the destination drops the VM, the
/// source resumes, and the outcome is not ambiguous.
#[test]
fn connection_dies_after_ready_before_go() {
    let src = source(43);
    std::thread::sleep(Duration::from_millis(10));
    let faults = [
        (
            Side::Destination,
            Fault::Blackhole.at(At::kind(MsgKind::Ready, 0)),
        ),
        (
            Side::Source,
            Fault::Blackhole.at(At::after(MsgKind::Complete, 0)),
        ),
    ];
    let a = attempt(&src, &faults, busy());
    let fired: Vec<_> = a.probes.iter().flat_map(|p| p.fired()).collect();
    assert_eq!(fired.len(), 2, "{fired:?}");
    let e = a.src.expect_err("the source must fail");
    assert!(!e.is_ambiguous(), "{e}");
    assert_eq!(e.phase, Phase::Completion, "{e}");
    let de = a.dst.err().expect("the destination must drop the VM");
    assert_eq!(de.phase, Phase::Completion, "{de}");
    // It times out waiting for Go, or sees the source hang up after the
    // source's own timeout.
    let msg = de.to_string();
    assert!(msg.contains(TIMEOUT) || msg.contains(CLOSED), "{de}");
    assert_running(&src, "source");
    assert_logging_off(&src, "source");
    assert_retry_succeeds(&src, "after a lost Go");
}

/// The dirty-log check used above does see an active log (so a pass of
/// `assert_logging_off` means something).
#[test]
fn logging_check_sees_an_active_log() {
    let src = source(44);
    let mut t = src.dirty_tracker().unwrap();
    t.start().unwrap();
    assert!(logged_while_writing(&src, 200) > 0);
    t.stop().unwrap();
    assert_logging_off(&src, "after stop");
}

/// Several faults at once: a flipped byte in round 0 that the destination
/// catches, and a drop that never gets to strike.
#[test]
fn first_fault_wins() {
    let src = source(45);
    let faults = [
        (
            Side::Source,
            Fault::Flip(0x01).at(At::kind(MsgKind::Pages, 1).offset(100)),
        ),
        (Side::Source, Fault::Drop.at(At::kind(MsgKind::State, 0))),
    ];
    let a = attempt(&src, &faults, busy());
    assert_eq!(a.probes[0].fired().len(), 1);
    assert_eq!(a.probes[0].pending().len(), 1);
    let de = a.dst.err().expect("destination");
    assert_eq!(de.phase, Phase::Precopy(0));
    assert!(de.to_string().contains(CRC), "{de}");
    assert!(a.src.is_err());
    assert_running(&src, "source");
    assert_retry_succeeds(&src, "after two faults");
}
