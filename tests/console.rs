//! The operator's other check: the test guest answers a line typed on its
//! serial console (refvmm forwards stdin to the UART), and after a live
//! migration the same line typed on the destination's console is answered
//! by the same guest, with its counters further on: the UART's receive path
//! and state survived the move.

mod common;

use std::time::Duration;

use livemig_suite::harness::{log_of, migrate, scratch_dir, start_destination, start_source};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

#[test]
fn console_status_answered_before_and_after_migration() {
    let Some(_kvm) = common::kvm_or_skip("console_status_answered_before_and_after_migration")
    else {
        return;
    };
    let dir = scratch_dir("console");
    let mut src = start_source(&dir, "src", "256M", 1, "ws=32 rate=20").unwrap();
    src.wait_ready(T).unwrap();
    src.wait_heartbeats(50, T).unwrap();

    // A line the guest does not know is echoed back as `? <line>`; an
    // overlong one is discarded; neither disturbs the heartbeat or the
    // next command.
    src.console_write("hello\n").unwrap();
    src.wait_for("the '? hello' answer", T, |g| {
        g.other.iter().any(|l| l == "? hello")
    })
    .unwrap();
    src.console_write(&format!("{}\r", "x".repeat(300)))
        .unwrap();
    src.wait_for("the overlong-line answer", T, |g| {
        g.other.iter().any(|l| l == "? (line too long)")
    })
    .unwrap();

    let s1 = src.query_status(T).unwrap();
    eprintln!("source STATUS: {s1:?}");
    assert!(s1.heartbeats >= 50, "{s1:?}");
    assert!(s1.pages_written > 0 && s1.pages_verified > 0, "{s1:?}");
    assert_eq!((s1.corrupt, s1.rx, s1.tx), (0, 0, 0), "{s1:?}");
    // Typed again a little later: the counters move.
    src.wait_heartbeats(20, T).unwrap();
    let s2 = src.query_status(T).unwrap();
    assert!(s2.heartbeats > s1.heartbeats && s2.pages_written > s1.pages_written);

    // Typed while the machine is paused: held (not put into a UART whose
    // state a migration may already have saved) and answered after resume.
    let r = src.api(&json!({"cmd": "pause"}), |_| {}).unwrap();
    assert_eq!(r["result"], "ok", "{r}");
    let seen = src.status_count();
    src.console_write("status\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(src.status_count(), seen, "answered while paused?");
    let r = src.api(&json!({"cmd": "resume"}), |_| {}).unwrap();
    assert_eq!(r["result"], "ok", "{r}");
    let s3 = src.wait_status(seen, T).unwrap();
    assert!(s3.heartbeats > s2.heartbeats, "{s3:?}");
    let s2 = s3;

    let (mut dst, ep) = start_destination(&dir, "dst", &[]).unwrap();
    // Typed on the destination's console before the guest is there: it
    // waits (in the pipe) and is answered once the guest runs there.
    dst.console_write("status\n").unwrap();
    let report = migrate(&src, &ep, json!({"downtime_limit_ms": 50})).unwrap();
    assert_eq!(report["status"], "completed");
    assert!(src
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    let early = dst.wait_status(0, T).unwrap();
    eprintln!("destination STATUS (typed before the switchover): {early:?}");
    assert!(early.heartbeats > s2.heartbeats, "{early:?} vs {s2:?}");

    dst.wait_heartbeats(50, T).unwrap();
    let d1 = dst.query_status(T).unwrap();
    eprintln!("destination STATUS: {d1:?}");
    assert!(
        d1.heartbeats > early.heartbeats
            && d1.pages_written > s2.pages_written
            && d1.pages_verified > s2.pages_verified,
        "counters continue: source {s2:?} destination {d1:?}"
    );
    assert_eq!(d1.corrupt, 0);
    {
        let s = log_of(&src);
        let d = log_of(&dst);
        assert!(
            s.corrupt.is_empty() && d.corrupt.is_empty(),
            "{:?} {:?}",
            s.corrupt,
            d.corrupt
        );
        assert!(!d.ready, "the destination guest rebooted");
        assert_eq!(s.status.len(), 3, "one answer per line typed on the source");
        assert_eq!(
            d.status.len(),
            2,
            "one answer per line typed on the destination"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
