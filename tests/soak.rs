//! Long soak: 100 ping-pong migrations of a guest dirtying memory on both of
//! its 2 vCPUs (`fresh=1 smp=2 zero=5`), each hop's source tracking with the
//! next dirty-tracking mode (manual-protect, classic, ring), checking
//! the guest (no CORRUPT, counters continue) and the VMM processes' memory
//! and file descriptors across iterations. Ignored by default:
//! `cargo test --release --test soak -- --ignored --nocapture`.

mod common;

use std::time::{Duration, Instant};

use livemig_suite::harness::{log_of, migrate, scratch_dir, start_destination, start_source};
use serde_json::json;

fn proc_stat(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss_kb, fds)
}

#[test]
#[ignore]
fn soak_100_ping_pong_two_vcpus() {
    let Some(_kvm) = common::kvm_or_skip("soak_100_ping_pong_two_vcpus") else {
        return;
    };
    let hops: usize = std::env::var("LIVEMIG_SOAK_HOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let dir = scratch_dir("soak");
    let mut cur = start_source(
        &dir,
        "vm0",
        "512M",
        2,
        "ws=128 rate=10 pattern=rand fresh=1 smp=2 zero=5",
    )
    .unwrap();
    cur.wait_ready(Duration::from_secs(30)).unwrap();
    cur.wait_for("a T line", Duration::from_secs(30), |g| {
        !g.tlines.is_empty()
    })
    .unwrap();
    let mut samples = Vec::new();
    let started = Instant::now();
    let mut downtimes = Vec::new();
    for hop in 1..=hops {
        // The next hop's source tracks with the next mode: manual, classic, ring.
        let mode = ["manual", "classic", "ring"][hop % 3];
        let (mut next, ep) =
            start_destination(&dir, &format!("vm{hop}"), &["--dirty-log", mode]).unwrap();
        let r = migrate(&cur, &ep, json!({"downtime_limit_ms": 50})).unwrap_or_else(|e| {
            std::thread::sleep(Duration::from_millis(500));
            panic!(
                "hop {hop}: {e}\nsource stderr:\n{}\ndestination stderr:\n{}",
                cur.stderr(),
                next.stderr()
            )
        });
        downtimes.push(r["downtime_ms"].as_f64().unwrap_or(f64::NAN));
        next.wait_for("a T line", Duration::from_secs(30), |g| {
            !g.tlines.is_empty()
        })
        .unwrap();
        {
            let a = log_of(&cur);
            let b = log_of(&next);
            assert!(
                a.corrupt.is_empty() && b.corrupt.is_empty(),
                "hop {hop}: {:?} {:?}",
                a.corrupt,
                b.corrupt
            );
            assert!(!b.ready, "hop {hop}: guest rebooted");
            assert!(
                b.tlines[0].heartbeats > a.tlines.last().map_or(0, |t| t.heartbeats),
                "hop {hop}: counters reset"
            );
        }
        samples.push(proc_stat(next.pid()));
        cur = next;
    }
    // The guest's own memory fills the destination's RSS until its working
    // set has been touched everywhere; compare from hop 10 on (VMM growth).
    let base = samples.len().min(10) - 1;
    let (rss0, fd0) = samples[base];
    let (rss1, fd1) = *samples.last().unwrap();
    downtimes.sort_by(|a, b| a.partial_cmp(b).unwrap());
    eprintln!(
        "soak: {hops} hops in {:.0} s; destination VMM after migration (hop {} vs last): RSS {rss0} kB -> {rss1} kB, fds {fd0} -> {fd1}; first hop RSS {} kB; downtime median {:.2} ms, max {:.2} ms",
        started.elapsed().as_secs_f64(),
        base + 1,
        samples[0].0,
        downtimes[downtimes.len() / 2],
        downtimes[downtimes.len() - 1]
    );
    assert_eq!(fd0, fd1, "file descriptors grew across hops: {samples:?}");
    assert!(rss1 < rss0 + 16 * 1024, "RSS grew across hops: {samples:?}");
}
