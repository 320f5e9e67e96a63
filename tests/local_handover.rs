//! The same-host hand-over between two refvmm processes (issue 18):
//! `migrate --local` passes the memfd guest memory and the TAP descriptors
//! over a Unix socket, no page is copied, and the guest (dirtying memory,
//! writing pages for the first time) goes on with no CORRUPT page;
//! `refvmm upgrade` does the same to a new process that takes the API
//! socket path over; `--local` with memory that cannot be shared is refused.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use livemig_suite::harness::{
    api_request, blackout, log_of, migrate, refvmm_path, scratch_dir, start_source_with, GuestLog,
    Vmm,
};
use serde_json::json;

const CMDLINE: &str = "ws=32 rate=20 pattern=rand fresh=1";

/// `refvmm receive --listen unix:<dir>/<name>.h` with its API socket.
fn start_local_destination(dir: &Path, name: &str) -> (Vmm, String) {
    let api = dir.join(format!("{name}.sock"));
    let to = format!("unix:{}", dir.join(format!("{name}.h")).display());
    let args: Vec<String> = vec![
        "receive".into(),
        "--listen".into(),
        to.clone(),
        "--api-socket".into(),
        api.to_string_lossy().into_owned(),
    ];
    let mut v = Vmm::spawn(name, &args, api).unwrap();
    assert_eq!(v.listen_endpoint(Duration::from_secs(20)).unwrap(), to);
    (v, to)
}

#[test]
fn a_dirtying_guest_is_handed_over_without_copying_a_page() {
    let Some(_kvm) = common::kvm_or_skip("a_dirtying_guest_is_handed_over_without_copying_a_page")
    else {
        return;
    };
    let dir = scratch_dir("local");
    let mut src = start_source_with(
        &dir,
        "src",
        "256M",
        1,
        CMDLINE,
        &["--memory-backend", "memfd"],
    )
    .unwrap();
    src.wait_ready(Duration::from_secs(30)).unwrap();
    src.wait_heartbeats(500, Duration::from_secs(30)).unwrap();
    let (mut dst, to) = start_local_destination(&dir, "dst");
    let t0 = Instant::now();
    let report = migrate(&src, &to, json!({"local": true})).unwrap_or_else(|e| {
        panic!(
            "local hand-over: {e}\nsource:\n{}\ndestination:\n{}",
            src.stderr(),
            dst.stderr()
        )
    });
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(report["pages_sent"], 0, "{report}");
    assert_eq!(report["final_pages"], 0, "{report}");
    assert_eq!(report["rounds"], json!([]), "{report}");
    assert!(
        src.wait_exit(Duration::from_secs(10)).is_some(),
        "the old VMM exits"
    );
    dst.wait_api(Duration::from_secs(10)).unwrap();
    dst.wait_heartbeats(1000, Duration::from_secs(30)).unwrap();
    let status = dst.query_status(Duration::from_secs(10)).unwrap();
    common::assert_no_corruption(&src, &dst, "local hand-over");
    assert_eq!(status.corrupt, 0, "{status:?}");
    assert!(status.pages_written > 0, "{status:?}");
    // Measured, not asserted: the guest's own view of the switchover.
    let gap = blackout(&log_of(&src), &log_of(&dst), t0).map(|b| b.switchover_gap);
    eprintln!(
        "local hand-over: 0 pages sent, 0 CORRUPT; downtime {} ms ({}); guest-observed switchover gap {gap:?}",
        report["downtime_ms"], report["downtime_breakdown"]
    );
    let _ = dst.api(&json!({"cmd": "quit"}), |_| {});
    let _ = std::fs::remove_dir_all(dir);
}

/// Waits (30 s at most) until the guest's serial log satisfies `pred`,
/// whether or not the process the harness started still runs.
fn wait_log(v: &Vmm, what: &str, pred: impl Fn(&GuestLog) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pred(&log_of(v)) {
        assert!(Instant::now() < deadline, "no {what} within 30 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills the upgraded VMM (a child of the old one, not of the test) when
/// the test ends, however it ends.
struct KillPid(Option<u32>);

impl Drop for KillPid {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill(2) on a pid; no memory is involved.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

#[test]
fn upgrade_keeps_the_api_socket_and_the_guest() {
    let Some(_kvm) = common::kvm_or_skip("upgrade_keeps_the_api_socket_and_the_guest") else {
        return;
    };
    let dir = scratch_dir("upgrade");
    let mut src = start_source_with(
        &dir,
        "src",
        "256M",
        1,
        CMDLINE,
        &["--memory-backend", "memfd"],
    )
    .unwrap();
    src.wait_ready(Duration::from_secs(30)).unwrap();
    src.wait_heartbeats(500, Duration::from_secs(30)).unwrap();
    let old_pid = src.pid();
    // A new binary that never takes the guest (it exits at once): the
    // upgrade fails before anything is committed and the old VMM keeps
    // the guest and the socket.
    let out = Command::new(refvmm_path())
        .arg("upgrade")
        .arg("--api-socket")
        .arg(&src.api)
        .arg("--binary")
        .arg("/bin/true")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the new VMM exited before listening"),
        "{stderr}"
    );
    let st = api_request(&src.api, &json!({"cmd": "status"}), |_| {}).unwrap();
    assert_eq!(st["pid"], json!(old_pid), "{st}");
    assert_eq!(st["running"], true, "{st}");
    src.wait_heartbeats(100, Duration::from_secs(30)).unwrap();
    let out = Command::new(refvmm_path())
        .arg("upgrade")
        .arg("--api-socket")
        .arg(&src.api)
        .arg("--binary")
        .arg(refvmm_path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let st = api_request(&src.api, &json!({"cmd": "status"}), |_| {});
    let mut new = KillPid(
        st.as_ref()
            .ok()
            .and_then(|v| v["pid"].as_u64())
            .map(|p| p as u32),
    );
    assert!(
        out.status.success(),
        "upgrade: {stderr}\nold VMM:\n{}",
        src.stderr()
    );
    let st = st.unwrap();
    assert_eq!(st["result"], "ok", "{st}");
    assert_ne!(st["pid"], json!(old_pid), "the old VMM still answers: {st}");
    assert_eq!(st["running"], true, "{st}");
    assert_eq!(st["migration"], "idle", "{st}");
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"), "{st}");
    assert!(
        src.wait_exit(Duration::from_secs(10)).is_some(),
        "the old VMM exits"
    );
    // The new VMM writes the guest's serial output where the old one did
    // (it inherited its standard output) and reads its console input; the
    // harness's process (the old VMM) is gone, so the log is polled.
    let before = src.heartbeat_count();
    wait_log(&src, "500 heartbeats from the new VMM", |g| {
        g.heartbeats.len() >= before + 500
    });
    let seen = src.status_count();
    src.console_write("status\n").unwrap();
    wait_log(&src, "a STATUS line from the new VMM", |g| {
        g.status.len() > seen
    });
    let status = log_of(&src).status[seen];
    assert_eq!(status.corrupt, 0, "{status:?}");
    assert!(
        log_of(&src).corrupt.is_empty(),
        "{:?}",
        log_of(&src).corrupt
    );
    // The guest did not start over: its own heartbeat count (in STATUS)
    // goes on from before the upgrade, and READY (printed once, at boot)
    // came only once.
    assert!(
        status.heartbeats >= (before + 500) as u64,
        "the guest's count restarted: {status:?}"
    );
    let raw = String::from_utf8_lossy(&log_of(&src).raw).into_owned();
    assert_eq!(raw.matches("READY").count(), 1, "the guest rebooted");
    eprintln!("upgrade: {stderr}");
    // The new VMM answers on the same path; quit it (the pipes it holds
    // are the test's).
    let r = api_request(&src.api, &json!({"cmd": "quit"}), |_| {});
    assert!(r.is_ok(), "{r:?}");
    new.0 = None;
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn local_without_shareable_memory_is_refused() {
    let Some(_kvm) = common::kvm_or_skip("local_without_shareable_memory_is_refused") else {
        return;
    };
    let dir = scratch_dir("local-refused");
    // Private anonymous memory (the default backend).
    let mut src = start_source_with(&dir, "src", "64M", 1, "ws=8 rate=10", &[]).unwrap();
    src.wait_ready(Duration::from_secs(30)).unwrap();
    src.wait_heartbeats(200, Duration::from_secs(30)).unwrap();
    let (mut dst, to) = start_local_destination(&dir, "dst");
    let e = migrate(&src, &to, json!({"local": true})).unwrap_err();
    let msg = e["error"].as_str().unwrap_or_default();
    assert!(msg.contains("--memory-backend memfd"), "{e}");
    assert_eq!(e["status"], "failed", "{e}");
    // The guest goes on on the source; the destination still waits.
    let before = src.heartbeat_count();
    src.wait_heartbeats(before + 200, Duration::from_secs(30))
        .unwrap();
    assert!(dst.is_running(), "{}", dst.stderr());
    // The same through the command line, with a clear message.
    let out = Command::new(refvmm_path())
        .args(["migrate", "--local", "--to", &to, "--api-socket"])
        .arg(&src.api)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--memory-backend memfd"), "{stderr}");
    let _ = src.api(&json!({"cmd": "quit"}), |_| {});
    let _ = std::fs::remove_dir_all(dir);
}
