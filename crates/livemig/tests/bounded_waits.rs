//! Every wait of the source is bounded: a destination that stops reading
//! (a partitioned network looks the same to the sender) cannot hold the
//! source, and above all not while its guest is paused.
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use livemig::protocol::{HelloReply, MsgKind};
use livemig::testing::fault::{At, Fault, FaultTransport};
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::mem;
use livemig::{
    migrate, CancelToken, ErrorKind, MigrationConfig, MigrationError, OnLimit, ReceiveConfig,
    Report,
};

mod common;
use common::{assert_running, hand_destination, one_region, running_source, soft_destination};

fn source(seed: u64) -> Arc<SoftVm> {
    running_source(&one_region(16 << 20), &SoftConfig::busy(), seed)
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
            let (_, _fr, mut fw) = hand_destination(Box::new(b), None);
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
        // Two rounds, then the final copy: its first frame follows round
        // 1's question of the read count (`ReadQuery` #1; one per round:
        // the destination answers once it has read the round). The stall
        // holds that write like a full socket buffer of a peer that stopped
        // reading; only a shutdown cuts it short.
        let (a, probe) = FaultTransport::new(
            Box::new(a),
            Fault::Stall(Duration::from_secs(40)).at(At::after(MsgKind::ReadQuery, 1)),
        );
        let dest = soft_destination(
            b,
            ReceiveConfig {
                io_timeout: Duration::from_secs(30),
            },
        );
        let cfg = MigrationConfig {
            downtime_limit: Duration::from_nanos(1),
            max_rounds: 2,
            on_limit: OnLimit::ForceSwitchover,
            io_timeout: Duration::from_secs(30),
            max_pause,
            // No probe frames between RoundEnd #1 and the final copy.
            switchover_probe: Some(false),
            ..Default::default()
        };
        let r = migrate(&*s2, Box::new(a), &cfg, &CancelToken::new(), &mut |_| {});
        assert_eq!(probe.fired().len(), 1, "the stall did not strike");
        (r, dest.join().unwrap().map(|_| ()))
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
