//! Every wait of the source is bounded: a destination that stops reading
//! (a partitioned network looks the same to the sender) cannot hold the
//! source, and above all not while its guest is paused.
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use livemig::memory::{MemoryLayout, RegionDesc};
use livemig::protocol::{FrameReader, FrameWriter, HelloReply, MsgKind};
use livemig::testing::fault::{At, Fault, FaultTransport};
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::{mem, Transport};
use livemig::{
    migrate, receive, CancelToken, ErrorKind, MigrationConfig, MigrationError, OnLimit,
    ReceiveConfig, Report,
};

fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: 16 << 20,
    }])
    .unwrap()
}

fn source(seed: u64) -> Arc<SoftVm> {
    let vm = SoftVm::new(
        &layout(),
        &SoftConfig {
            guest_writers: 1,
            device_writers: 1,
            pages_per_ms: 20,
        },
    )
    .unwrap();
    vm.fill(seed);
    vm.start();
    Arc::new(vm)
}

fn assert_running(vm: &SoftVm, what: &str) {
    let w = vm.writes();
    let deadline = Instant::now() + Duration::from_secs(5);
    while vm.writes() == w {
        assert!(
            Instant::now() < deadline,
            "{what}: the source's writers stopped"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `f` on a thread; panics if it takes longer than `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("still blocked after {limit:?}"))
}

/// A destination that accepts, then never reads again: the source's page
/// writes fill the pipe and block. The write timeout (`io_timeout`) ends
/// them; the source keeps its guest. (Before writes were bounded, the
/// source blocked here forever.)
#[test]
fn a_destination_that_stops_reading_cannot_block_the_source() {
    let src = source(1);
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let s2 = src.clone();
    let r: Result<Report, MigrationError> = within(Duration::from_secs(30), move || {
        let (a, b) = mem::pair();
        let dest = std::thread::spawn(move || {
            let t: Box<dyn Transport> = Box::new(b);
            let mut fr = FrameReader::new(t.try_clone().unwrap());
            let mut fw = FrameWriter::new(t);
            assert_eq!(fr.read_frame().unwrap().kind, MsgKind::Hello);
            fw.send(&HelloReply::accepted(1, [0; 16])).unwrap();
            fw.flush().unwrap();
            // Stop reading; keep the connection open.
            let _ = stop_rx.recv_timeout(Duration::from_secs(60));
        });
        let cfg = MigrationConfig {
            io_timeout: Duration::from_millis(500),
            ..Default::default()
        };
        let r = migrate(&*s2, Box::new(a), &cfg, &CancelToken::new(), &mut |_| {});
        let _ = stop_tx.send(());
        dest.join().unwrap();
        r
    });
    let e = r.expect_err("the migration cannot succeed");
    eprintln!("source: {e}");
    assert!(!e.is_ambiguous(), "{e}");
    assert!(e.to_string().contains("timed out"), "{e}");
    assert_running(&src, "after the write timeout");
}

/// The destination stops taking bytes while the source is paused (the
/// first write of the final copy never completes; io timeouts are far
/// away): `max_pause` ends the paused phase, the source resumes its guest,
/// and the error says how long the guest was paused.
#[test]
fn a_partition_during_the_final_copy_resumes_the_source_after_max_pause() {
    let src = source(2);
    let max_pause = Duration::from_millis(800);
    let s2 = src.clone();
    let started = Instant::now();
    let (r, d) = within(Duration::from_secs(60), move || {
        let (a, b) = mem::pair();
        // Two rounds, then the final copy: its first frame follows
        // RoundEnd #1. The stall holds that write like a full socket buffer
        // of a peer that stopped reading; only a shutdown cuts it short.
        let (a, probe) = FaultTransport::new(
            Box::new(a),
            Fault::Stall(Duration::from_secs(40)).at(At::after(MsgKind::RoundEnd, 1)),
        );
        let dest = std::thread::spawn(move || {
            receive(
                Box::new(b),
                &ReceiveConfig {
                    io_timeout: Duration::from_secs(30),
                },
                |d| SoftVm::new(&d.layout, &SoftConfig::idle()),
            )
            .map(|_| ())
        });
        let cfg = MigrationConfig {
            downtime_limit: Duration::from_nanos(1),
            max_rounds: 2,
            on_limit: OnLimit::ForceSwitchover,
            io_timeout: Duration::from_secs(30),
            max_pause,
            ..Default::default()
        };
        let r = migrate(&*s2, Box::new(a), &cfg, &CancelToken::new(), &mut |_| {});
        assert_eq!(probe.fired().len(), 1, "the stall did not strike");
        (r, dest.join().unwrap())
    });
    let e = r.expect_err("the migration cannot succeed");
    eprintln!("source: {e}");
    assert!(d.is_err(), "the destination cannot succeed");
    assert!(!e.is_ambiguous(), "{e}");
    match e.kind {
        ErrorKind::PauseDeadline { limit, paused } => {
            assert_eq!(limit, max_pause);
            assert!(paused >= max_pause, "{e}");
        }
        _ => panic!("expected the paused-phase deadline: {e}"),
    }
    // Neither the 40 s stall nor the 30 s I/O timeouts were waited for.
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
    assert_running(&src, "after the paused-phase deadline");
}
