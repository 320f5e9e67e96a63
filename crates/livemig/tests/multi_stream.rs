//! Multi-stream migrations on the software VM: pages spread over several
//! connections, memory identical, and the stream handshake refuses strays.
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use livemig::memory::{MemoryLayout, RegionDesc};
use livemig::protocol::{FrameWriter, MsgKind, StreamHello};
use livemig::report::Progress;
use livemig::testing::fault::{At, Fault, FaultProbe, FaultTransport};
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::{mem, StreamAcceptor, StreamOpener, Transport};
#[cfg(feature = "net")]
use livemig::transport::{Dialer, OwnedAcceptor};
use livemig::vm::SourceVm;
use livemig::{
    migrate, migrate_streams, receive_streams, CancelToken, ErrorKind, Migration, MigrationConfig,
    ReceiveConfig, Reception,
};

mod common;
use common::{
    assert_heard_the_cancel, migrate_with_defaults, running_source, soft_destination, wait_until,
    within, VmFate, WatchedVm,
};

fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![
        RegionDesc {
            guest_addr: 0,
            size: 48 << 20,
        },
        RegionDesc {
            guest_addr: 4 << 30,
            size: 9 << 20,
        },
    ])
    .unwrap()
}

fn busy() -> SoftConfig {
    SoftConfig {
        guest_writers: 2,
        device_writers: 1,
        pages_per_ms: 5,
    }
}

/// Runs a migration over in-memory streams; returns both reports and
/// whether memory ended identical.
fn run_mem(
    src: &SoftVm,
    streams: u32,
    dest_acceptor: bool,
) -> (livemig::Report, livemig::ReceiveReport, bool) {
    run_mem_with(src, streams, dest_acceptor, false, None)
}

/// [`run_mem`] with LZ4 allowed or not and a bandwidth cap (bytes/s).
fn run_mem_with(
    src: &SoftVm,
    streams: u32,
    dest_acceptor: bool,
    compress: bool,
    max_bandwidth: Option<u64>,
) -> (livemig::Report, livemig::ReceiveReport, bool) {
    let (a, b) = mem::pair();
    let (mut opener, mut acceptor) = mem::streams();
    let dest = std::thread::spawn(move || {
        let cfg = ReceiveConfig {
            io_timeout: Duration::from_secs(5),
        };
        let acc: Option<&mut dyn StreamAcceptor> = if dest_acceptor {
            Some(&mut acceptor)
        } else {
            None
        };
        receive_streams(Box::new(b), acc, &cfg, |d| {
            SoftVm::new(&d.layout, &SoftConfig::idle())
        })
    });
    let mc = MigrationConfig {
        streams,
        compress,
        max_bandwidth,
        downtime_limit: Duration::from_millis(200),
        ..Default::default()
    };
    let r = migrate_streams(
        src,
        Box::new(a),
        Some(&mut opener),
        &mc,
        &CancelToken::new(),
        &mut |_| {},
    )
    .expect("migration");
    let (dst, dr) = dest.join().unwrap().expect("destination");
    let same = src.snapshot() == dst.snapshot();
    (r, dr, same)
}

type Destination =
    std::thread::JoinHandle<Result<(SoftVm, livemig::ReceiveReport), livemig::MigrationError>>;

/// A running busy source filled with `seed`, and a destination thread that
/// accepts streams (with `cfg`): returns the source, its control end, the
/// stream opener and the destination's handle.
fn busy_source_and_destination(
    seed: u64,
    cfg: ReceiveConfig,
) -> (Arc<SoftVm>, mem::MemTransport, mem::MemOpener, Destination) {
    let src = running_source(&layout(), &busy(), seed);
    let (a, b) = mem::pair();
    let (opener, mut acceptor) = mem::streams();
    let dest = std::thread::spawn(move || {
        receive_streams(Box::new(b), Some(&mut acceptor), &cfg, |d| {
            SoftVm::new(&d.layout, &SoftConfig::idle())
        })
    });
    (src, a, opener, dest)
}

/// Migrates `src` over `control` to `dest` with two page streams from
/// `opener` (and the source's `io_timeout`, if given): both sides must
/// succeed over two streams, memory identical.
fn migrate_over_two_streams(
    src: &SoftVm,
    control: mem::MemTransport,
    opener: &mut dyn StreamOpener,
    dest: Destination,
    io_timeout: Option<Duration>,
) {
    let defaults = MigrationConfig::default();
    let mc = MigrationConfig {
        streams: 2,
        downtime_limit: Duration::from_millis(200),
        io_timeout: io_timeout.unwrap_or(defaults.io_timeout),
        ..defaults
    };
    let r = migrate_streams(
        src,
        Box::new(control),
        Some(opener),
        &mc,
        &CancelToken::new(),
        &mut |_| {},
    )
    .expect("migration");
    let (dst, _) = dest.join().unwrap().expect("destination");
    assert_eq!(r.streams, 2);
    assert_eq!(src.snapshot(), dst.snapshot());
}

#[test]
fn four_streams_busy_vm_memory_identical() {
    let src = running_source(&layout(), &busy(), 3);
    std::thread::sleep(Duration::from_millis(30));
    let (r, dr, same) = run_mem(&src, 4, true);
    assert!(same, "memory differs after a 4-stream migration");
    assert_eq!(r.streams, 4);
    assert_eq!(dr.streams, 4);
    assert!(src.writes() > 0);
    // Every data page the source counted arrived (on some stream).
    assert_eq!(r.pages_sent, dr.pages, "{r:?}");
    println!("{}", r.to_json());
}

/// With page streams, each round ends when the destination has read what
/// the source wrote on every connection (the read count): the
/// destination's count of the streams' bytes and the control connection's
/// must add up to the source's, or every round would wait out its bound
/// and report the difference as unread.
#[test]
fn every_round_ends_read_on_every_stream() {
    let src = running_source(&layout(), &busy(), 9);
    std::thread::sleep(Duration::from_millis(30));
    let (r, _, same) = run_mem(&src, 4, true);
    assert!(same, "memory differs after a 4-stream migration");
    assert!(!r.rounds.is_empty());
    for round in &r.rounds {
        let unread = round.unread_bytes.expect("the read count is granted");
        assert!(
            unread <= livemig::policy::DRAIN_BYTES,
            "round {}: {unread} bytes unread: {}",
            round.round,
            r.to_json()
        );
    }
}

#[test]
fn destination_without_acceptor_grants_one_stream() {
    let src = running_source(&layout(), &busy(), 4);
    let (r, dr, same) = run_mem(&src, 3, false);
    assert!(same);
    assert_eq!(r.streams, 1);
    assert_eq!(dr.streams, 1);
}

#[test]
fn streams_without_opener_is_a_clear_error() {
    let src = SoftVm::new(&layout(), &SoftConfig::idle()).unwrap();
    src.start();
    let (a, _b) = mem::pair();
    let mc = MigrationConfig {
        streams: 2,
        ..Default::default()
    };
    let e = migrate(&src, Box::new(a), &mc, &CancelToken::new(), &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("StreamOpener"), "{e}");
    // A setting that does not fit the call is a configuration error a
    // caller can match on (it was a catch-all `Invalid(String)`).
    assert!(matches!(e.kind, ErrorKind::Config(_)), "{e}");
    let mc = MigrationConfig {
        streams: 99,
        ..Default::default()
    };
    let (a, _b) = mem::pair();
    let e = migrate(&src, Box::new(a), &mc, &CancelToken::new(), &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("streams = 99"), "{e}");
    assert!(matches!(e.kind, ErrorKind::Config(_)), "{e}");
}

/// An opener that first connects a stranger (wrong token) and a duplicate
/// of stream 0, then the real streams: the destination drops the strays.
struct StrayFirst {
    inner: mem::MemOpener,
    strays: u32,
}

impl StreamOpener for StrayFirst {
    fn open(&mut self) -> std::io::Result<Box<dyn Transport>> {
        while self.strays > 0 {
            self.strays -= 1;
            let t = self.inner.open()?;
            let mut w = FrameWriter::new(t);
            let h = StreamHello {
                token: [0xAA; 16],
                index: 0,
            };
            w.send(&h).unwrap();
            w.flush().unwrap();
            // Keep it open: the destination must drop it, not wait on it.
            std::mem::forget(w);
        }
        self.inner.open()
    }
}

#[test]
fn stray_connections_are_dropped() {
    let (src, a, opener, dest) = busy_source_and_destination(5, ReceiveConfig::default());
    let mut stray = StrayFirst {
        inner: opener,
        strays: 2,
    };
    migrate_over_two_streams(&src, a, &mut stray, dest, None);
}

/// A stream that dies mid-transfer fails the migration before switchover on
/// both sides, naming the stream; the source keeps running.
#[test]
fn a_broken_stream_fails_safely() {
    struct Breaking {
        inner: mem::MemOpener,
        n: u32,
    }
    impl StreamOpener for Breaking {
        fn open(&mut self) -> std::io::Result<Box<dyn Transport>> {
            self.n += 1;
            let t = self.inner.open()?;
            if self.n == 2 {
                let k = t.try_clone()?;
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(30));
                    let _ = k.shutdown();
                });
            }
            Ok(t)
        }
    }
    let (src, a, opener, dest) = busy_source_and_destination(6, ReceiveConfig::default());
    let mc = MigrationConfig {
        streams: 3,
        // Never converges: keeps sending until the stream breaks.
        downtime_limit: Duration::from_nanos(1),
        max_rounds: 1000,
        max_bandwidth: Some(100 << 20),
        ..Default::default()
    };
    let e = migrate_streams(
        &*src,
        Box::new(a),
        Some(&mut Breaking {
            inner: opener,
            n: 0,
        }),
        &mc,
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(!e.is_ambiguous());
    assert!(
        matches!(e.kind, ErrorKind::Stream { .. } | ErrorKind::Remote { .. }),
        "{e}"
    );
    let de = dest.join().unwrap().err().expect("destination must fail");
    println!("source: {e}\ndestination: {de}");
    // The source runs on: its writers keep writing.
    assert!(
        src.writes_within(Duration::from_secs(5)),
        "source VM not running after a failed migration"
    );
}

#[test]
#[cfg(feature = "net")]
fn tcp_streams_end_to_end() {
    let src = running_source(&layout(), &busy(), 7);
    let listener = livemig::transport::listen(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let ep = listener.local_endpoint().clone();
    let dest = std::thread::spawn(move || {
        let t = listener.accept().unwrap();
        let mut acc = OwnedAcceptor(Some(listener));
        let r = receive_streams(t, Some(&mut acc), &ReceiveConfig::default(), |d| {
            SoftVm::new(&d.layout, &SoftConfig::idle())
        });
        // The listener was closed once the streams were in.
        assert!(acc.0.is_none());
        r
    });
    let t = livemig::transport::connect(&ep, Some(Duration::from_secs(5))).unwrap();
    let mut dialer = Dialer {
        endpoint: ep.clone(),
        timeout: Some(Duration::from_secs(5)),
    };
    let mc = MigrationConfig {
        streams: 3,
        downtime_limit: Duration::from_millis(200),
        ..Default::default()
    };
    let r = migrate_streams(
        &*src,
        t,
        Some(&mut dialer),
        &mc,
        &CancelToken::new(),
        &mut |_| {},
    )
    .expect("migration");
    let (dst, dr) = dest.join().unwrap().expect("destination");
    assert_eq!(r.streams, 3);
    assert_eq!(src.snapshot(), dst.snapshot());
    assert!(
        dr.bytes >= r.bytes_sent - 64,
        "{} vs {}",
        dr.bytes,
        r.bytes_sent
    );
    // A second connection after the migration is refused (listener closed).
    assert!(livemig::transport::connect(&ep, Some(Duration::from_secs(1))).is_err());
}

#[test]
fn plain_receive_still_works_with_one_stream() {
    let src = SoftVm::new(&layout(), &SoftConfig::idle()).unwrap();
    src.fill(8);
    src.start();
    let (a, b) = mem::pair();
    let dest = soft_destination(b, ReceiveConfig::default());
    let r = migrate_with_defaults(&src, a).unwrap();
    let (dst, _) = dest.join().unwrap().unwrap();
    assert_eq!(r.streams, 1);
    assert_eq!(src.snapshot(), dst.snapshot());
    let _ = std::io::stdout().flush();
}

/// LZ4-compressed page frames, on one stream and on three: memory identical,
/// and fewer bytes on the wire for compressible memory. The compressing run
/// is capped at 16 MiB/s, a link LZ4 beats many times over on these pages,
/// so the adaptive policy keeps it on; uncapped, on this in-memory link
/// LZ4 itself is the bottleneck and its first window turns it off (until
/// its windows decided, they never did on pages this compressible).
#[test]
fn compressed_pages_memory_identical() {
    for streams in [1, 3] {
        let src = SoftVm::new(&layout(), &busy()).unwrap();
        // Compressible content: a repeating pattern in every page.
        use vm_memory::{Bytes, GuestAddress};
        for p in 0..(48u64 << 20) / 4096 {
            let v = [(p % 251) as u8; 4096];
            src.ram()
                .expect("vm-memory")
                .write_slice(&v, GuestAddress(p * 4096))
                .unwrap();
        }
        src.start();
        let (plain, _, same) = run_mem_with(&src, streams, true, false, None);
        assert!(same);
        drop(src);
        let src = SoftVm::new(&layout(), &busy()).unwrap();
        for p in 0..(48u64 << 20) / 4096 {
            let v = [(p % 251) as u8; 4096];
            src.ram()
                .expect("vm-memory")
                .write_slice(&v, GuestAddress(p * 4096))
                .unwrap();
        }
        src.start();
        let (z, dr, same) = run_mem_with(&src, streams, true, true, Some(16 << 20));
        assert!(same, "memory differs with compression ({streams} streams)");
        assert_eq!(z.pages_sent, dr.pages);
        assert!(
            z.bytes_sent * 4 < plain.bytes_sent,
            "{streams} streams: compressed {} vs plain {} bytes",
            z.bytes_sent,
            plain.bytes_sent
        );
        println!(
            "{streams} stream(s): {} bytes plain, {} compressed",
            plain.bytes_sent, z.bytes_sent
        );
    }
}

/// A stray connection that connects first and sends nothing (kept open):
/// the destination gives each connection a short time to say `StreamHello`
/// (`STREAM_HELLO_TIMEOUT`), so the stray cannot hold the real streams off
/// until the stream deadline (`io_timeout`, here 4 s) passes.
#[test]
fn a_silent_stray_cannot_hold_off_the_streams() {
    struct SilentFirst {
        inner: mem::MemOpener,
        stray: Option<Box<dyn Transport>>,
        done: bool,
    }
    impl StreamOpener for SilentFirst {
        fn open(&mut self) -> std::io::Result<Box<dyn Transport>> {
            if !self.done {
                self.done = true;
                // Connects, never writes, stays open.
                self.stray = Some(self.inner.open()?);
            }
            self.inner.open()
        }
    }
    let (src, a, opener, dest) = busy_source_and_destination(
        11,
        ReceiveConfig {
            io_timeout: Duration::from_secs(4),
        },
    );
    let mut opener = SilentFirst {
        inner: opener,
        stray: None,
        done: false,
    };
    migrate_over_two_streams(&src, a, &mut opener, dest, Some(Duration::from_secs(4)));
}

/// A stream opener that records the bytes written on every stream it
/// opened ([`FaultTransport`] without faults).
struct Counting {
    inner: mem::MemOpener,
    probes: Arc<std::sync::Mutex<Vec<FaultProbe>>>,
}

impl StreamOpener for Counting {
    fn open(&mut self) -> std::io::Result<Box<dyn Transport>> {
        let (t, probe) = FaultTransport::with_plan(self.inner.open()?, Vec::new());
        self.probes.lock().unwrap().push(probe);
        Ok(Box::new(t))
    }
}

/// An operator cancels a migration over four page streams in the middle of
/// round 0 (8 MiB of a filled 57 MiB guest sent, capped at 16 MiB/s): the
/// source stops every page sender, keeps its guest as it was (running,
/// memory untouched) and fails `Cancelled`; the destination hears why (the
/// source's `Error` "cancelled", not a broken page stream) and runs
/// nothing. Both return within a bound. (The source VM has no writers, so
/// that its memory can be compared byte for byte; its run state is what a
/// pause or a throttle would change.)
#[test]
fn a_source_cancel_in_round_0_over_four_streams_tells_the_destination() {
    let src = Arc::new(SoftVm::new(&layout(), &SoftConfig::idle()).unwrap());
    src.fill(12);
    src.start();
    let before = src.snapshot();
    let (a, b) = mem::pair();
    let (opener, acceptor) = mem::streams();
    let fate = VmFate::default();
    let (dest_tx, dest_rx) = std::sync::mpsc::channel();
    let dest_fate = fate.clone();
    std::thread::spawn(move || {
        let r = Reception::new(Box::new(b))
            .accept_streams(acceptor)
            .run(|d| WatchedVm::new(&d.layout, &dest_fate))
            .map(|(_, report)| report);
        let _ = dest_tx.send(r);
    });
    let probes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let opener = Counting {
        inner: opener,
        probes: probes.clone(),
    };
    let cancel = CancelToken::new();
    let rounds = Arc::new(AtomicU32::new(0));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let (src2, c2, r2) = (src.clone(), cancel.clone(), rounds.clone());
    std::thread::spawn(move || {
        let mc = MigrationConfig {
            max_bandwidth: Some(16 << 20),
            ..Default::default()
        };
        let r = Migration::new(&*src2)
            .config(mc)
            .streams(4, opener)
            .cancel(c2)
            .progress(move |p| {
                if let Progress::Round(_) = p {
                    r2.fetch_add(1, Ordering::SeqCst);
                }
            })
            .run(Box::new(a));
        let _ = done_tx.send(r);
    });
    let on_streams = || -> u64 {
        probes
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.bytes_written())
            .sum()
    };
    wait_until(Duration::from_secs(30), "8 MiB on the page streams", || {
        on_streams() >= 8 << 20
    });
    assert_eq!(
        rounds.load(Ordering::SeqCst),
        0,
        "round 0 ended before the cancel"
    );
    assert_eq!(probes.lock().unwrap().len(), 4, "four page streams");
    let t0 = std::time::Instant::now();
    cancel.cancel();
    let limit = Duration::from_secs(30);
    let e = within(&done_rx, limit, "the cancelled source").expect_err("the source completed");
    let took = t0.elapsed();
    assert!(matches!(e.kind, ErrorKind::Cancelled), "source: {e}");
    assert!(!e.is_ambiguous(), "source: {e}");
    assert!(!src.is_paused(), "the source's guest does not run again");
    assert!(
        src.snapshot() == before,
        "the migration changed the source's memory"
    );
    let de = within(&dest_rx, limit, "the destination").expect_err("the destination completed");
    assert_heard_the_cancel(&de, took);
    fate.assert_nothing_runs("a cancel over four streams");
    println!("source: {e}\ndestination: {de}");
}

/// A frame corrupted on the control connection of a migration with page
/// streams: the destination fails with that corruption (and tells the
/// source), not with the page streams it shut down itself once it gave up.
#[test]
fn a_control_failure_is_not_blamed_on_the_streams_it_stopped() {
    let (src, a, opener, dest) = busy_source_and_destination(13, ReceiveConfig::default());
    // The payload of the first `RoundEnd`: its CRC no longer matches.
    let flip = Fault::Flip(0x01).at(At::kind(MsgKind::RoundEnd, 0).offset(20));
    let (control, probe) = FaultTransport::new(Box::new(a), flip);
    let mc = MigrationConfig {
        streams: 4,
        ..Default::default()
    };
    let e = Migration::new(&*src)
        .config(mc)
        .streams(4, opener)
        .run(Box::new(control))
        .expect_err("a corrupted control frame");
    assert_eq!(probe.fired().len(), 1, "the flip did not strike");
    let de = dest
        .join()
        .unwrap()
        .err()
        .expect("the destination must fail");
    println!("source: {e}\ndestination: {de}");
    assert!(
        matches!(&de.kind, ErrorKind::Protocol(p) if p.to_string().contains("crc mismatch")),
        "the destination blames something else than the corrupted frame: {de}"
    );
    assert!(e.to_string().contains("crc mismatch"), "source: {e}");
    common::assert_running(&src, "after a corrupted control frame");
}
