//! Post-copy recovery between two refvmm processes on real KVM (issue 17):
//! the link breaks while the guest already runs on the destination with
//! pages missing; the source reconnects by itself (twice), or after its retries ran
//! out on `refvmm migrate --resume`, and the migration completes with 0
//! CORRUPT. A source killed during post-copy cannot be saved: the
//! destination says so.

mod common;
use common::proxy::Proxy;

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livemig_suite::harness::{
    api_request, largest_gap, log_of, refvmm_path, scratch_dir, start_destination, start_source,
    Vmm,
};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);
/// A working set of 128 MiB: the guest is still fetching it when the link
/// breaks (early), so its vCPUs wait during the outage.
const GUEST: &str = "ws=128 rate=20 pattern=rand fresh=1 smp=2";

/// A post-copy migration under way through a proxy: the source, the
/// destination, the proxy, and the thread waiting for the migration's
/// result (with the event names it saw).
struct UnderWay {
    dir: std::path::PathBuf,
    src: Vmm,
    dst: Vmm,
    proxy: Proxy,
    mig: JoinHandle<(Result<Value, String>, Vec<String>)>,
}

/// Starts pure post-copy (about 128 MiB of data at 8 MiB/s: seconds of
/// push) through a proxy and returns once the guest runs on the
/// destination.
fn start_postcopy(tag: &str, extra: Value, dst_args: &[&str]) -> UnderWay {
    let dir = scratch_dir(tag);
    let mut src = start_source(&dir, "src", "256M", 2, GUEST).unwrap();
    src.wait_ready(T).unwrap();
    src.wait_for("a T line", T, |g| !g.tlines.is_empty())
        .unwrap();
    let (mut dst, ep) = start_destination(&dir, "dst", dst_args).unwrap();
    let proxy = Proxy::start(&ep);
    let mut req =
        json!({"cmd":"migrate","to":proxy.endpoint,"postcopy":true,"max_bandwidth_mib":8});
    for (k, v) in extra.as_object().unwrap() {
        req[k] = v.clone();
    }
    let api = src.api.clone();
    let mig = std::thread::spawn(move || {
        let mut events = Vec::new();
        let r = api_request(&api, &req, |e| {
            events.push(e["event"].as_str().unwrap_or("").to_string())
        });
        (r, events)
    });
    // On failure, the source's side too (a migration that ended in round 0
    // once in CI says only "connection closed by the peer" on this side).
    if let Err(e) = dst.wait_for("heartbeats on the destination", T, |g| {
        g.heartbeats.len() > 2
    }) {
        panic!("{e}\nsource's stderr:\n{}", src.stderr());
    }
    UnderWay {
        dir,
        src,
        dst,
        proxy,
        mig,
    }
}

/// The source's `migrate-status` until `pred` holds for it.
fn wait_status(src: &Vmm, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let s = api_request(&src.api, &json!({"cmd":"migrate-status"}), |_| {}).unwrap();
        if pred(&s) {
            return s;
        }
        assert!(t0.elapsed() < T, "{what}: last status {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The migration completed after `events`: the guest carries on on the
/// destination with every page right.
fn assert_completed(mut w: UnderWay, what: &str, cut_at: Instant, breaks: u64) {
    let (reply, events) = w.mig.join().unwrap();
    let reply = reply.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(reply["result"], "ok", "{what}: {reply}");
    let pc = &reply["report"]["postcopy"];
    assert_eq!(pc["reconnects"], breaks, "{what}: {pc}");
    assert!(
        events.iter().any(|e| e == "postcopy-interrupted")
            && events.iter().any(|e| e == "postcopy-resumed"),
        "{what}: events {events:?}"
    );
    let st = w
        .src
        .wait_exit(Duration::from_secs(10))
        .expect("source exits");
    assert!(st.success(), "{what}: source exit {st}");
    w.dst
        .wait_for("two T lines on the destination", T, |g| g.tlines.len() >= 2)
        .unwrap();
    let err = w.dst.stderr();
    assert!(
        err.matches("post-copy interrupted, waiting for resume")
            .count() as u64
            == breaks
            && err.matches("post-copy resumed").count() as u64 == breaks,
        "{what}: {err}"
    );
    common::assert_no_corruption(&w.src, &w.dst, what);
    {
        let d = log_of(&w.dst);
        let (first, last) = (d.tlines.first().unwrap(), d.tlines.last().unwrap());
        assert!(
            last.pages_verified > first.pages_verified,
            "{what}: the destination verified nothing"
        );
    }
    let gap = largest_gap(&log_of(&w.dst), cut_at, Instant::now());
    eprintln!(
        "{what}: source report post-copy {pc}; largest destination heartbeat gap since the cut \
         {:.0} ms (a vCPU that touches a missing page waits until the resume; printed, not asserted)",
        gap.as_secs_f64() * 1e3
    );
    let _ = std::fs::remove_dir_all(&w.dir);
}

#[test]
fn link_dropped_during_postcopy_the_source_reconnects_and_completes() {
    let Some(_kvm) = common::kvm_or_skip("link_dropped_the_source_reconnects") else {
        return;
    };
    // 4 MiB/s: the push still runs after the first resume.
    let opts = json!({"postcopy_retry_for": 60, "max_bandwidth_mib": 4});
    let w = start_postcopy("pcr-retry", opts, &[]);
    let cut_at = Instant::now();
    // Twice: a break of the resumed copy is recovered the same way.
    for n in 1..=2u64 {
        w.proxy.cut();
        // While the link is down the source retries (the proxy drops
        // every attempt) and says so.
        let s = wait_status(&w.src, "reconnecting", |s| {
            s["status"] == "postcopy-recover"
        });
        assert!(
            s["postcopy-recovery"]
                .as_str()
                .unwrap()
                .contains("post-copy interrupted"),
            "{s}"
        );
        std::thread::sleep(Duration::from_secs(1));
        w.proxy.heal();
        wait_status(&w.src, "resumed", |s| {
            s["postcopy-resumes"] == n && s["status"] == "device"
        });
    }
    assert_completed(w, "link dropped twice, automatic reconnect", cut_at, 2);
}

#[test]
fn after_the_retries_ran_out_migrate_resume_completes_the_migration() {
    let Some(_kvm) = common::kvm_or_skip("migrate_resume_completes") else {
        return;
    };
    let w = start_postcopy("pcr-resume", json!({"postcopy_retry_for": 1}), &[]);
    let cut_at = Instant::now();
    w.proxy.cut();
    let s = wait_status(&w.src, "waiting for resume", |s| {
        s["status"] == "postcopy-paused"
    });
    assert!(
        s["postcopy-recovery"]
            .as_str()
            .unwrap()
            .contains("post-copy interrupted, waiting for resume"),
        "{s}"
    );
    // Nothing reconnects by itself now, even with the link back.
    w.proxy.heal();
    std::thread::sleep(Duration::from_secs(2));
    let s = api_request(&w.src.api, &json!({"cmd":"migrate-status"}), |_| {}).unwrap();
    assert_eq!(s["status"], "postcopy-paused", "{s}");
    let out = std::process::Command::new(refvmm_path())
        .arg("migrate")
        .arg("--api-socket")
        .arg(&w.src.api)
        .args(["--to", &w.proxy.endpoint, "--resume"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "migrate --resume: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second one has nothing to resume once the copy goes on again
    // (or the source has already exited).
    let again = api_request(&w.src.api, &json!({"cmd":"migrate-resume"}), |_| {});
    if let Ok(v) = again {
        assert_eq!(v["result"], "error", "{v}");
    }
    assert_completed(
        w,
        "link dropped, retries ran out, migrate --resume",
        cut_at,
        1,
    );
}

#[test]
fn source_killed_during_postcopy_the_destination_reports_the_loss() {
    let Some(_kvm) = common::kvm_or_skip("source_killed_during_postcopy") else {
        return;
    };
    let mut w = start_postcopy("pcr-kill", json!({}), &["--postcopy-resume-timeout", "2"]);
    w.src.kill();
    let st = w
        .dst
        .wait_exit(Duration::from_secs(30))
        .expect("the destination gives up after its resume timeout");
    assert!(!st.success(), "destination exit {st}");
    let err = w.dst.stderr();
    assert!(err.contains("waiting for resume"), "{err}");
    assert!(
        err.contains("post-copy interrupted with") && err.contains("not yet on the destination"),
        "{err}"
    );
    let d = log_of(&w.dst);
    assert!(
        d.corrupt.is_empty(),
        "CORRUPT on the destination: {:?}",
        d.corrupt
    );
    drop(d);
    let _ = w.mig.join();
    let _ = std::fs::remove_dir_all(&w.dir);
}
