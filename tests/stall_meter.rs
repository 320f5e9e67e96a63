//! The test guest's stall meter (`gap=`) on real KVM: a pause of the VM and a migration's
//! switchover each show as a `GAP` line measured with the guest's own TSC, at least as long as
//! the time the guest was really stopped. The benchmarks report the switchover gap from it
//! (issue 16: a gap free of the serial reader's scheduling delay).

mod common;

use std::time::{Duration, Instant};

use livemig_suite::harness::{log_of, migrate, scratch_dir, start_destination, start_source};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// The guest's TSC rate is calibrated against the PIT (or read from KVM); allow this much
/// error in its microseconds.
const CLOCK_SLACK: f64 = 0.9;

#[test]
fn a_pause_shows_as_one_gap_at_least_as_long() {
    let Some(_kvm) = common::kvm_or_skip("stall_meter pause") else {
        return;
    };
    let dir = scratch_dir("gap-pause");
    let mut vm = start_source(&dir, "gap", "128M", 1, "ws=16 rate=0 hb=200 gap=20000").unwrap();
    vm.wait_ready(T).unwrap();
    vm.wait_heartbeats(500, T).unwrap();
    let r = vm.api(&json!({"cmd":"pause"}), |_| {}).unwrap();
    assert_eq!(r["result"], "ok", "{r}");
    let paused = Instant::now();
    std::thread::sleep(Duration::from_millis(150));
    let r = vm.api(&json!({"cmd":"resume"}), |_| {}).unwrap();
    let held = paused.elapsed();
    assert_eq!(r["result"], "ok", "{r}");
    vm.wait_for("a GAP line after the pause", T, |g| {
        g.gaps.iter().any(|(at, _)| *at > paused)
    })
    .unwrap();
    let log = log_of(&vm);
    let (_, gap) = *log.gaps.iter().find(|(at, _)| *at > paused).unwrap();
    // The guest was stopped from the pause's reply to the resume request at least.
    assert!(
        gap.as_secs_f64() >= (held.as_secs_f64() - 0.01) * CLOCK_SLACK,
        "the guest measured {gap:?} for a pause of at least {held:?}; all gaps {:?}",
        log.gaps
    );
    assert!(gap < Duration::from_secs(10), "{gap:?}");
}

#[test]
fn a_switchover_shows_on_the_destination_at_least_as_long_as_the_blackout() {
    let Some(_kvm) = common::kvm_or_skip("stall_meter switchover") else {
        return;
    };
    let dir = scratch_dir("gap-switch");
    let mut src = start_source(&dir, "src", "256M", 1, "ws=16 rate=0 hb=200 gap=300").unwrap();
    src.wait_ready(T).unwrap();
    src.wait_heartbeats(500, T).unwrap();
    let (mut dst, ep) = start_destination(&dir, "dst", &[]).unwrap();
    let report = migrate(&src, &ep, json!({"downtime_limit_ms": 20})).unwrap();
    assert_eq!(report["status"], "completed", "{report}");
    dst.wait_heartbeats(100, T).unwrap();
    dst.wait_for("the switchover's GAP line", T, |g| !g.gaps.is_empty())
        .unwrap();
    let gap = log_of(&dst).gaps[0].1;
    // From the final dirty sync to the restored state the guest certainly did not run.
    let b = &report["downtime_breakdown"];
    let stopped_ms: f64 = [
        "final_sync_ms",
        "final_memory_ms",
        "state_save_ms",
        "state_transfer_ms",
    ]
    .iter()
    .map(|k| b[*k].as_f64().unwrap_or_else(|| panic!("{k} in {b}")))
    .sum();
    assert!(
        gap.as_secs_f64() * 1e3 >= stopped_ms * CLOCK_SLACK,
        "the destination's guest measured {gap:?}, the engine stopped it for at least {stopped_ms:.3} ms: {report}"
    );
    common::assert_no_corruption(&src, &dst, "stall meter");
    eprintln!(
        "guest-measured switchover gap {:.3} ms; engine downtime {} ms, breakdown {b}",
        gap.as_secs_f64() * 1e3,
        report["downtime_ms"]
    );
}
