//! The switchover probe end to end on the software VM: negotiated in the
//! handshake (`Hello` property `livemig.probe`, grant byte 4), answered by
//! the destination's control reader, counted in the expected downtime; a
//! peer without it (a destination that does not grant it, as release 0.1.0
//! does; a source that does not offer it) migrates exactly as before.
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

#[allow(dead_code)]
#[path = "../../../fuzz/src/lib.rs"]
mod harness;

use std::time::Duration;

use livemig::protocol::{
    FrameReader, FrameWriter, Hello, HelloReply, Message, MsgKind, Probe, ProbeReply, Ready,
    Resumed,
};
use livemig::testing::fault::{At, Fault, FaultTransport};
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::{mem, Transport};
use livemig::vm::SourceVm;
use livemig::{migrate, CancelToken, ErrorKind, MigrationConfig, ReceiveConfig, Report};

mod common;
use common::{hand_destination, one_region, soft_destination};

const IO: Duration = Duration::from_secs(5);

/// The source's ends of its connection, played by hand.
type Reader = FrameReader<Box<dyn Transport>>;
type Writer = FrameWriter<Box<dyn Transport>>;

/// The thread of [`soft_destination`].
type DestinationThread =
    std::thread::JoinHandle<Result<(SoftVm, livemig::ReceiveReport), livemig::MigrationError>>;

fn receive_config() -> ReceiveConfig {
    ReceiveConfig { io_timeout: IO }
}

fn config() -> MigrationConfig {
    MigrationConfig {
        // Wide enough that the idle guest switches over after round 0
        // whatever the probe measures (and the probe waits that long).
        downtime_limit: Duration::from_secs(2),
        io_timeout: IO,
        switchover_probe: Some(true),
        ..Default::default()
    }
}

fn idle_source() -> SoftVm {
    let vm = SoftVm::new(&one_region(4 << 20), &SoftConfig::idle()).unwrap();
    vm.fill(7);
    vm.start();
    vm
}

fn run(vm: &SoftVm, t: Box<dyn Transport>, config: &MigrationConfig) -> Report {
    migrate(vm, t, config, &CancelToken::new(), &mut |_| {}).expect("migrates")
}

/// A destination on the software VM, and a source played by hand: sends
/// `hello`, reads the `HelloReply` (checked to be one) and hands back the
/// destination's thread, both ends of the source's connection and the
/// reply.
fn scripted_source(hello: &Hello) -> (DestinationThread, Reader, Writer, HelloReply) {
    let (a, b) = mem::pair();
    let dest = soft_destination(b, receive_config());
    let t: Box<dyn Transport> = Box::new(a);
    let mut rx = t.try_clone().unwrap();
    rx.set_read_timeout(Some(IO)).unwrap();
    let mut fr = FrameReader::new(rx);
    let mut fw = FrameWriter::new(t);
    fw.send(hello).unwrap();
    fw.flush().unwrap();
    let f = fr.read_frame().unwrap();
    assert_eq!(f.kind, MsgKind::HelloReply);
    let reply = HelloReply::decode(f.payload).unwrap();
    (dest, fr, fw, reply)
}

/// Both sides of this build: the probe is granted, every round has its
/// measurements, and the source sent probes (three unpadded and one of
/// the state's size per round).
#[test]
fn the_probe_is_negotiated_measured_and_reported() {
    let vm = idle_source();
    let (a, b) = mem::pair();
    let (a, probe) = FaultTransport::with_plan(Box::new(a), vec![]);
    let dest = soft_destination(b, receive_config());
    let report = run(&vm, Box::new(a), &config());
    let (dvm, _) = dest.join().unwrap().expect("the destination runs it");
    assert_eq!(dvm.snapshot(), vm.snapshot(), "memory arrived");
    assert!(!report.rounds.is_empty());
    for r in &report.rounds {
        assert!(r.probe_hop_ms.is_some(), "round {}: no probe", r.round);
        assert!(r.probe_state_burst_ms.is_some(), "round {}", r.round);
    }
    let probes: Vec<_> = probe
        .frames()
        .into_iter()
        .filter(|f| f.kind == Some(MsgKind::Probe))
        .collect();
    assert_eq!(probes.len(), 4 * report.rounds.len());
    // The padded one carries the state's bytes (more than the 24 bytes of
    // an empty probe's frame).
    assert!(probes.iter().any(|f| f.len > 16 + 8));
    let json = report.to_json();
    assert!(json.contains("probe_hop_ms"), "{json}");
}

/// The expected downtime counts the measured hop: a destination whose
/// every frame after `HelloReply` is held 25 ms (its probe answers, and
/// later its `Ready` and `Resumed`) makes the expected downtime at least
/// the one and a half hops the downtime holds (`Ready`'s round trip, then
/// `Go`'s way; `Resumed` comes back after the destination started the
/// guest). Without the probe the expectation knew nothing of them (it
/// failed before the probe).
#[test]
fn the_expected_downtime_includes_the_measured_hop() {
    const HOLD: Duration = Duration::from_millis(25);
    let vm = idle_source();
    let (a, b) = mem::pair();
    let plan = (1..=24)
        .map(|i| Fault::Stall(HOLD).at(At::frame(i)))
        .collect();
    let (b, _probe) = FaultTransport::with_plan(Box::new(b), plan);
    let dest = std::thread::spawn(move || {
        livemig::receive(b_box(b), &receive_config(), |d| {
            SoftVm::new(&d.layout, &SoftConfig::idle())
        })
    });
    let report = run(&vm, Box::new(a), &config());
    dest.join().unwrap().expect("the destination runs it");
    let expected = report.expected_downtime_ms;
    assert!(
        expected >= 1.5 * HOLD.as_secs_f64() * 1000.0,
        "expected downtime {expected:.2} ms, actual {:.2} ms: the held answers are not in it",
        report.downtime_ms
    );
}

fn b_box(t: FaultTransport) -> Box<dyn Transport> {
    Box::new(t)
}

/// A destination that does not grant the probe (as release 0.1.0's, or a
/// build without it): the source sends no `Probe` and migrates as before.
/// Written by hand: it refuses a `Probe` frame outright.
#[test]
fn a_destination_without_the_probe_gets_none() {
    let vm = idle_source();
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        let (hello, mut fr, mut fw) = hand_destination(Box::new(b), Some(IO));
        assert!(hello.probe, "the source offers the probe");
        fw.send(&HelloReply::accepted(1, [0; 16])).unwrap();
        fw.flush().unwrap();
        loop {
            let f = fr.read_frame().unwrap();
            assert_ne!(f.kind, MsgKind::Probe, "a probe that was not granted");
            if f.kind == MsgKind::Complete {
                break;
            }
        }
        fw.send(&Ready { restore_us: 1 }).unwrap();
        fw.flush().unwrap();
        assert_eq!(fr.read_frame().unwrap().kind, MsgKind::Go);
        fw.send(&Resumed { resume_us: 1 }).unwrap();
        fw.flush().unwrap();
    });
    let report = run(&vm, Box::new(a), &config());
    dest.join().unwrap();
    assert!(report.rounds.iter().all(|r| r.probe_hop_ms.is_none()));
    assert!(!report.to_json().contains("probe_hop_ms"));
}

/// A source that does not offer the probe (as release 0.1.0's, or this
/// build with `switchover_probe` off): the destination does not grant it,
/// no `Probe` travels, and the migration completes.
#[test]
fn a_source_without_the_probe_migrates_as_before() {
    let vm = idle_source();
    let (a, b) = mem::pair();
    let (a, probe) = FaultTransport::with_plan(Box::new(a), vec![]);
    let (b, dprobe) = FaultTransport::with_plan(Box::new(b), vec![]);
    let dest = std::thread::spawn(move || {
        livemig::receive(b_box(b), &receive_config(), |d| {
            SoftVm::new(&d.layout, &SoftConfig::idle())
        })
    });
    let c = MigrationConfig {
        switchover_probe: Some(false),
        ..config()
    };
    let report = run(&vm, Box::new(a), &c);
    dest.join().unwrap().expect("the destination runs it");
    assert!(report.rounds.iter().all(|r| r.probe_hop_ms.is_none()));
    assert!(probe
        .frames()
        .iter()
        .all(|f| f.kind != Some(MsgKind::Probe)));
    // Besides the answers to the read count (its own grant, since
    // 2026-12-03 (7)).
    let kinds: Vec<_> = (dprobe.frames().iter())
        .filter_map(|f| f.kind)
        .filter(|k| *k != MsgKind::ReadCount)
        .collect();
    assert_eq!(
        kinds,
        [MsgKind::HelloReply, MsgKind::Ready, MsgKind::Resumed],
        "the destination's frames are the ones it always sent"
    );
}

/// The destination's side of a source that probes without the grant, and
/// of malformed probes: each is a protocol error, the VM never runs.
#[test]
fn the_destination_refuses_probes_not_granted_or_malformed() {
    // Hello without the offer, then a Probe.
    let no_offer = Hello::new(harness::description());
    // Hello with the offer, then a Probe with a non-zero padding byte.
    let mut offer = Hello::new(harness::description());
    offer.probe = true;
    let mut dirty = Probe { id: 0, pad: 4 }.encode().unwrap();
    dirty[9] = 1;
    for (hello, probe) in [
        (no_offer, Probe { id: 0, pad: 0 }.encode().unwrap()),
        (offer, dirty),
    ] {
        let (dest, _fr, mut fw, reply) = scripted_source(&hello);
        assert!(reply.accepted);
        assert_eq!(reply.probe, hello.probe, "granted exactly when offered");
        fw.write_frame(MsgKind::Probe, &[&probe]).unwrap();
        fw.flush().unwrap();
        let Err(e) = dest.join().unwrap() else {
            panic!(
                "a probe {} was accepted",
                if hello.probe {
                    "with a dirty pad"
                } else {
                    "not granted"
                }
            )
        };
        assert!(
            matches!(
                e.kind,
                ErrorKind::Unexpected { .. } | ErrorKind::Protocol(_)
            ),
            "{e}"
        );
    }
}

/// With the offer, the destination answers each probe with its id and
/// padding length, and goes on to migrate.
#[test]
fn the_destination_answers_each_probe() {
    let frames = harness::valid_frames();
    let mut hello = Hello::new(harness::description());
    hello.probe = true;
    let (dest, mut fr, mut fw, reply) = scripted_source(&hello);
    assert!(reply.accepted && reply.probe);
    let go = frames.len() - 1;
    for (i, (kind, payload)) in frames[1..go].iter().enumerate() {
        fw.write_frame(*kind, &[payload]).unwrap();
        if *kind == MsgKind::RoundEnd {
            let p = Probe {
                id: i as u32,
                pad: 1000 * i as u32,
            };
            fw.send(&p).unwrap();
            fw.flush().unwrap();
            let f = fr.read_frame().unwrap();
            assert_eq!(f.kind, MsgKind::ProbeReply);
            let r = ProbeReply::decode(f.payload).unwrap();
            assert_eq!((r.id, r.pad), (p.id, p.pad));
        }
    }
    fw.flush().unwrap();
    assert_eq!(fr.read_frame().unwrap().kind, MsgKind::Ready);
    let (kind, payload) = &frames[go];
    fw.write_frame(*kind, &[payload]).unwrap();
    fw.flush().unwrap();
    assert_eq!(fr.read_frame().unwrap().kind, MsgKind::Resumed);
    let (_vm, report) = dest.join().unwrap().expect("runs");
    assert!(report.running);
}

/// An answer later than the wait (the downtime limit): the round keeps
/// the estimate without the probe, the migration goes on and completes,
/// and the late answer (read before `Ready`) is dropped.
#[test]
fn a_late_answer_neither_hangs_nor_fails_the_migration() {
    let vm = idle_source();
    let (a, b) = mem::pair();
    // Frame 2 of the destination (after `HelloReply` and round 0's
    // `ReadCount`): the first ProbeReply, held 300 ms.
    let hold = Fault::Stall(Duration::from_millis(300)).at(At::frame(2));
    let (b, dprobe) = FaultTransport::new(Box::new(b), hold);
    let dest = std::thread::spawn(move || {
        livemig::receive(b_box(b), &receive_config(), |d| {
            SoftVm::new(&d.layout, &SoftConfig::idle())
        })
    });
    let c = MigrationConfig {
        downtime_limit: Duration::from_millis(100),
        ..config()
    };
    let report = run(&vm, Box::new(a), &c);
    dest.join().unwrap().expect("the destination runs it");
    assert_eq!(dprobe.fired().len(), 1);
    assert_eq!(dprobe.fired()[0].kind, Some(MsgKind::ProbeReply));
    assert_eq!(report.rounds[0].probe_hop_ms, None, "no answer in time");
}

/// A corrupted answer fails the migration before the pause: the source
/// keeps running, the outcome is not ambiguous.
#[test]
fn a_corrupted_answer_fails_before_the_pause() {
    let vm = idle_source();
    let (a, b) = mem::pair();
    let (b, dprobe) = FaultTransport::new(
        Box::new(b),
        Fault::Flip(0x40).at(At::kind(MsgKind::ProbeReply, 1).offset(17)),
    );
    let dest = std::thread::spawn(move || {
        livemig::receive(b_box(b), &receive_config(), |d| {
            SoftVm::new(&d.layout, &SoftConfig::idle())
        })
    });
    let e = migrate(
        &vm,
        Box::new(a),
        &config(),
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        dest.join().unwrap().is_err(),
        "the destination must not run it"
    );
    assert_eq!(dprobe.fired().len(), 1);
    assert!(!e.is_ambiguous(), "{e}");
    assert!(matches!(e.phase, livemig::Phase::Precopy(_)), "{e}");
    assert!(!vm.is_paused(), "the source must run");
}

/// A grant the source did not ask for is refused in the handshake, and the
/// source keeps running.
#[test]
fn a_probe_grant_not_offered_is_refused() {
    let vm = idle_source();
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        let (hello, mut fr, mut fw) = hand_destination(Box::new(b), Some(IO));
        assert!(!hello.probe);
        let mut reply = HelloReply::accepted(1, [0; 16]);
        reply.probe = true;
        fw.send(&reply).unwrap();
        fw.flush().unwrap();
        let _ = fr.read_frame();
    });
    let c = MigrationConfig {
        switchover_probe: Some(false),
        ..config()
    };
    let e = migrate(&vm, Box::new(a), &c, &CancelToken::new(), &mut |_| {}).unwrap_err();
    dest.join().unwrap();
    assert!(e.to_string().contains("not offered"), "{e}");
    assert!(!vm.is_paused(), "the source must run");
}

/// The `Probe` frames among those a fault transport saw written.
fn probes_sent(frames: &[livemig::testing::fault::FrameInfo]) -> usize {
    frames
        .iter()
        .filter(|f| f.kind == Some(MsgKind::Probe))
        .count()
}

/// By default (`switchover_probe: None`) the source offers the probe
/// exactly where the control connection's transport cannot tell its round
/// trip: an in-memory pair (no `round_trip`) is probed, loopback TCP
/// (`TCP_INFO`'s smoothed RTT) is not.
#[test]
fn by_default_only_a_transport_without_a_round_trip_is_probed() {
    let default = MigrationConfig {
        io_timeout: IO,
        ..Default::default()
    };
    assert_eq!(default.switchover_probe, None);

    let vm = idle_source();
    let (a, b) = mem::pair();
    assert!(a.round_trip().is_none());
    let (a, probe) = FaultTransport::with_plan(Box::new(a), vec![]);
    let dest = soft_destination(b, receive_config());
    let report = run(&vm, Box::new(a), &default);
    dest.join().unwrap().expect("the destination runs it");
    assert_eq!(probes_sent(&probe.frames()), 4 * report.rounds.len());

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dest = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let t = livemig::transport::TcpTransport::new(s).unwrap();
        livemig::receive(Box::new(t), &receive_config(), |d| {
            SoftVm::new(&d.layout, &SoftConfig::idle())
        })
    });
    let tcp = livemig::transport::TcpTransport::connect(&addr, Some(IO)).unwrap();
    assert!(tcp.round_trip().is_some(), "TCP reports its round trip");
    let (tcp, probe) = FaultTransport::with_plan(Box::new(tcp), vec![]);
    let vm = idle_source();
    let report = run(&vm, Box::new(tcp), &default);
    dest.join().unwrap().expect("the destination runs it");
    assert_eq!(probes_sent(&probe.frames()), 0);
    assert!(report.rounds.iter().all(|r| r.probe_hop_ms.is_none()));
}
