//! Post-copy between two refvmm processes on real KVM (issue 17): the test
//! guest with 2 vCPUs in fresh-page and random-write mode after one pre-copy
//! round, pure post-copy, and the link dropped during post-copy.
//! Every test checks the guest: 0 CORRUPT on both sides, and on success the
//! guest keeps heartbeating on the destination.

mod common;
use common::proxy::Proxy;

use std::time::{Duration, Instant};

use livemig_suite::harness::{log_of, migrate, scratch_dir, start_destination, start_source, Vmm};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

/// The destination's post-copy statistics (its stderr line).
fn dest_stats(dst: &Vmm) -> Value {
    let err = dst.stderr();
    let line = err
        .lines()
        .find_map(|l| l.strip_prefix("refvmm: post-copy: "))
        .unwrap_or_else(|| panic!("no post-copy line on the destination:\n{err}"));
    serde_json::from_str(line).unwrap()
}

/// Starts the source with `cmdline` on 2 vCPUs and waits for its first T
/// line.
fn source(dir: &std::path::Path, cmdline: &str) -> Vmm {
    let mut src = start_source(dir, "src", "256M", 2, cmdline).unwrap();
    src.wait_ready(T).unwrap();
    src.wait_for("a T line", T, |g| !g.tlines.is_empty())
        .unwrap();
    src
}

/// Migrates with `opts`, then checks what every successful post-copy must
/// show; returns (source report, destination statistics).
fn postcopy_once(cmdline: &str, opts: Value, what: &str) -> (Value, Value) {
    let dir = scratch_dir("pc");
    let src = source(&dir, cmdline);
    let (mut dst, ep) = start_destination(&dir, "dst", &[]).unwrap();
    let report = migrate(&src, &ep, opts).unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut src = src;
    let st = src
        .wait_exit(Duration::from_secs(10))
        .expect("source exits");
    assert!(st.success(), "{what}: source exit {st}");
    dst.wait_for("a T line on the destination", T, |g| !g.tlines.is_empty())
        .unwrap();
    // Two T lines: the guest wrote and verified pages here.
    dst.wait_for("two T lines on the destination", T, |g| g.tlines.len() >= 2)
        .unwrap();
    common::assert_no_corruption(&src, &dst, what);
    {
        let (s, d) = (log_of(&src), log_of(&dst));
        let (last, first) = (s.tlines.last().unwrap(), d.tlines.first().unwrap());
        assert!(
            first.heartbeats > last.heartbeats && first.pages_written >= last.pages_written,
            "{what}: counters did not continue: {last:?} then {first:?}"
        );
        assert!(
            d.tlines.last().unwrap().pages_verified > first.pages_verified,
            "{what}: the destination verified nothing"
        );
    }
    let pc = &report["postcopy"];
    assert!(
        pc.is_object(),
        "{what}: no post-copy in the report: {report}"
    );
    let stats = dest_stats(&dst);
    // Every page of the discard set arrived, once.
    assert_eq!(
        stats["requested_pages"].as_u64().unwrap() + stats["pushed_pages"].as_u64().unwrap(),
        stats["discard_pages"].as_u64().unwrap(),
        "{what}: {stats}"
    );
    eprintln!(
        "{what}: reason {:?}; downtime {} ms {}, total {} ms; destination {stats}",
        pc["reason"], report["downtime_ms"], report["downtime_breakdown"], report["total_ms"]
    );
    let _ = std::fs::remove_dir_all(dir);
    (report, stats)
}

#[test]
fn postcopy_after_one_round_fresh_pages_two_vcpus() {
    let Some(_kvm) = common::kvm_or_skip("postcopy_after_one_round_fresh_pages_two_vcpus") else {
        return;
    };
    // A downtime limit pre-copy cannot meet after one round: it switches.
    let (report, _) = postcopy_once(
        "ws=64 rate=20 pattern=seq fresh=1 smp=2",
        json!({"postcopy_after_rounds": 1, "downtime_limit_ms": 1}),
        "post-copy after 1 round, fresh=1, 2 vCPUs",
    );
    assert_eq!(report["postcopy"]["rounds_before"], 1);
}

#[test]
fn postcopy_after_one_round_random_writes_two_vcpus() {
    let Some(_kvm) = common::kvm_or_skip("postcopy_after_one_round_random_writes_two_vcpus") else {
        return;
    };
    let (report, _) = postcopy_once(
        "ws=64 rate=20 pattern=rand fresh=1 smp=2",
        json!({"postcopy_after_rounds": 1, "downtime_limit_ms": 1}),
        "post-copy after 1 round, random writes, 2 vCPUs",
    );
    assert_eq!(report["postcopy"]["rounds_before"], 1);
}

#[test]
fn pure_postcopy_two_vcpus() {
    let Some(_kvm) = common::kvm_or_skip("pure_postcopy_two_vcpus") else {
        return;
    };
    let (report, stats) = postcopy_once(
        "ws=64 rate=20 pattern=rand fresh=1 smp=2",
        json!({"postcopy": true}),
        "pure post-copy, 2 vCPUs",
    );
    assert_eq!(report["postcopy"]["rounds_before"], 0);
    assert!(stats["discard_pages"].as_u64().unwrap() > 0);
}

/// The link breaks while the guest already runs on the destination and
/// pages are still missing, and nobody resumes: the source does not retry
/// (`postcopy_retry_for` 0) and gives up on `migrate-cancel`, the
/// destination gives up after its `--postcopy-resume-timeout`. Both sides
/// report the loss, the source stays paused (it must not resume the guest)
/// and no vCPU ever read a wrong or zero page. (The resume itself:
/// tests/postcopy_resume.rs.)
#[test]
fn link_dropped_during_postcopy_reports_the_loss_without_corruption() {
    let Some(_kvm) = common::kvm_or_skip("link_dropped_during_postcopy") else {
        return;
    };
    let dir = scratch_dir("pc-cut");
    let mut src = source(&dir, "ws=64 rate=20 pattern=rand fresh=1 smp=2");
    let (mut dst, ep) =
        start_destination(&dir, "dst", &["--postcopy-resume-timeout", "1"]).unwrap();
    let proxy = Proxy::start(&ep);
    // Pure post-copy of ~64 MiB of data at 8 MiB/s: about 8 s of push.
    let to = proxy.endpoint.clone();
    let mig = {
        let api = src.api.clone();
        std::thread::spawn(move || {
            livemig_suite::harness::api_request(
                &api,
                &json!({"cmd":"migrate","to":to,"postcopy":true,"max_bandwidth_mib":8,
                        "postcopy_retry_for":0}),
                |_| {},
            )
        })
    };
    // The guest runs on the destination: post-copy is under way.
    dst.wait_for("heartbeats on the destination", T, |g| {
        g.heartbeats.len() > 20
    })
    .unwrap();
    let cut_at = Instant::now();
    proxy.cut();
    // The source waits for a resume until an operator gives up.
    let api = src.api.clone();
    let give_up = || {
        livemig_suite::harness::api_request(&api, &json!({"cmd":"migrate-cancel"}), |_| {}).unwrap()
    };
    let t0 = Instant::now();
    while give_up()["status"] != "giving-up" {
        assert!(t0.elapsed() < T, "the source never waited for a resume");
        std::thread::sleep(Duration::from_millis(100));
    }
    let reply = mig.join().unwrap().unwrap();
    assert_eq!(reply["status"], "postcopy-interrupted", "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("post-copy interrupted"),
        "{reply}"
    );
    // The source exits without resuming (exit 3), the destination fails.
    let st = src
        .wait_exit(Duration::from_secs(10))
        .expect("source exits");
    assert_eq!(st.code(), Some(3), "source exit {st}");
    let st = dst
        .wait_exit(Duration::from_secs(30))
        .expect("destination exits");
    assert!(!st.success(), "destination exit {st}");
    let err = dst.stderr();
    assert!(err.contains("post-copy interrupted"), "{err}");
    common::assert_no_corruption(&src, &dst, "link dropped during post-copy");
    eprintln!(
        "link dropped {:.0} ms into post-copy; destination: {}",
        cut_at.elapsed().as_secs_f64() * 1e3,
        err.lines()
            .rev()
            .find(|l| l.contains("interrupted"))
            .unwrap_or("")
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// An operator's `migrate-postcopy` (from a second API client) switches a
/// migration started with `--postcopy-on-request`, which pre-copy alone
/// would not finish (a 1 ms downtime limit with a writing guest).
#[test]
fn an_api_request_switches_a_running_migration_to_postcopy() {
    let Some(_kvm) = common::kvm_or_skip("an_api_request_switches_a_running_migration") else {
        return;
    };
    let dir = scratch_dir("pc-req");
    let mut src = source(&dir, "ws=64 rate=20 pattern=rand fresh=1 smp=2");
    let (mut dst, ep) = start_destination(&dir, "dst", &[]).unwrap();
    // Refused while no migration runs.
    let r = src.api(&json!({"cmd":"migrate-postcopy"}), |_| {}).unwrap();
    assert_eq!(r["result"], "error", "{r}");
    let api = src.api.clone();
    let mig = std::thread::spawn(move || {
        livemig_suite::harness::api_request(
            &api,
            &json!({"cmd":"migrate","to":ep,"postcopy_on_request":true,
                    "downtime_limit_ms":1,"max_bandwidth_mib":64}),
            |_| {},
        )
    });
    let t = Instant::now();
    loop {
        let st = src.api(&json!({"cmd":"migrate-status"}), |_| {}).unwrap();
        if st["status"] == "active" && st["round"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(t.elapsed() < T, "the migration never reached round 1: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = src.api(&json!({"cmd":"migrate-postcopy"}), |_| {}).unwrap();
    assert_eq!(r["status"], "switching", "{r}");
    let reply = mig.join().unwrap().unwrap();
    assert_eq!(reply["result"], "ok", "{reply}");
    let reason = reply["report"]["postcopy"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("requested during the migration"),
        "{reason}"
    );
    let _ = src.wait_exit(Duration::from_secs(10));
    dst.wait_for("two T lines on the destination", T, |g| g.tlines.len() >= 2)
        .unwrap();
    common::assert_no_corruption(&src, &dst, "switch on request");
    let _ = std::fs::remove_dir_all(dir);
}

/// A destination whose guest memory is a shared memfd does not grant
/// post-copy (the userfaultfd installer takes anonymous memory only): a
/// source asking for pure post-copy migrates by pre-copy instead.
#[test]
fn a_memfd_destination_gets_a_precopy_migration() {
    let Some(_kvm) = common::kvm_or_skip("a_memfd_destination_gets_a_precopy_migration") else {
        return;
    };
    let dir = scratch_dir("pc-memfd");
    let src = source(&dir, "ws=64 rate=20 pattern=rand fresh=1 smp=2");
    let (mut dst, ep) = start_destination(&dir, "dst", &["--memory-backend", "memfd"]).unwrap();
    let report = migrate(&src, &ep, json!({"postcopy": true})).unwrap();
    assert_eq!(report["status"], "completed", "{report}");
    assert!(report["postcopy"].is_null(), "{report}");
    assert!(!report["rounds"].as_array().unwrap().is_empty(), "{report}");
    dst.wait_for("two T lines on the destination", T, |g| g.tlines.len() >= 2)
        .unwrap();
    assert!(
        dst.stderr().contains("post-copy not granted"),
        "{}",
        dst.stderr()
    );
    common::assert_no_corruption(&src, &dst, "memfd destination");
    let _ = std::fs::remove_dir_all(dir);
}
