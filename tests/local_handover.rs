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

/// Kills, when the test ends however it ends, every process started with
/// an argument under `dir` (the VMMs of this test: an upgraded one whose
/// pid the test never learned, after a failed upgrade, too). Declared
/// after the source `Vmm`, so that it runs before the source's drop,
/// whose serial reader such a VMM would keep waiting.
struct ReapDir(std::path::PathBuf);

impl Drop for ReapDir {
    fn drop(&mut self) {
        // The dir's entries, not the dir's name: another test's dir may
        // start with it (`...-4` and `...-41`).
        let _ = Command::new("pkill")
            .arg("-KILL")
            .arg("-f")
            .arg(format!("{}/", self.0.display()))
            .status();
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
    let _reap = ReapDir(dir.clone());
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

/// The VMM `upgrade` starts repeats how the old one was started: a guest
/// handed to a `receive` with non-default settings (no announce, another
/// I/O timeout, classic dirty log, a console socket) keeps them across an
/// upgrade. Behaviour first: with `--no-announce` the new VMM must not ask
/// the guest to announce itself either (it did before the settings were
/// carried); then the new VMM's `status` names the same settings.
#[test]
fn upgrade_carries_the_vmm_settings() {
    const TEST: &str = "upgrade_carries_the_vmm_settings";
    let Some(_kvm) = common::kvm_or_skip(TEST) else {
        return;
    };
    if !common::netns::prerequisites(TEST) {
        return;
    }
    let net = common::netns::Bridge::new("lmS", "s", None).unwrap();
    let dir = scratch_dir("upgrade-settings");
    let netspec = "tap=lmps,mac=52:54:00:4c:4d:07,ip=10.78.0.2";
    let mut src = net.vmm(
        &dir,
        "src",
        &[
            "run",
            "--memory",
            "128M",
            "--kernel",
            "builtin:testguest",
            "--cmdline",
            "ws=8 rate=10",
            "--memory-backend",
            "memfd",
            "--net",
            netspec,
        ],
    );
    let _reap = ReapDir(dir.clone());
    src.wait_ready(Duration::from_secs(30)).unwrap();
    src.wait_heartbeats(200, Duration::from_secs(30)).unwrap();
    // The VMM to upgrade: a `receive` with settings other than the defaults.
    let to = format!("unix:{}", dir.join("mid.h").display());
    let console = format!("unix:{}", dir.join("vm.console").display());
    let mut mid = net.vmm(
        &dir,
        "mid",
        &[
            "receive",
            "--listen",
            &to,
            "--io-timeout",
            "33",
            "--no-announce",
            "--dirty-log",
            "classic",
            "--memory-backend",
            "memfd",
            "--console",
            &console,
        ],
    );
    assert_eq!(mid.listen_endpoint(Duration::from_secs(20)).unwrap(), to);
    let report = migrate(&src, &to, json!({"local": true})).unwrap();
    assert_eq!(report["status"], "completed", "{report}");
    mid.wait_api(Duration::from_secs(10)).unwrap();
    let before = mid.heartbeat_count();
    mid.wait_heartbeats(before + 300, Duration::from_secs(30))
        .unwrap();
    let announced = |v: &Vmm| log_of(v).other.iter().any(|l| l == "NET announce");
    assert!(!announced(&mid), "--no-announce is obeyed at the hand-over");
    let old = api_request(&mid.api, &json!({"cmd": "status"}), |_| {}).unwrap();
    let out = Command::new(refvmm_path())
        .arg("upgrade")
        .arg("--api-socket")
        .arg(&mid.api)
        .arg("--binary")
        .arg(refvmm_path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let st = api_request(&mid.api, &json!({"cmd": "status"}), |_| {});
    let mut new = KillPid(
        st.as_ref()
            .ok()
            .and_then(|v| v["pid"].as_u64())
            .map(|p| p as u32),
    );
    assert!(out.status.success(), "upgrade: {stderr}\n{}", mid.stderr());
    let st = st.unwrap();
    assert_ne!(st["pid"], old["pid"], "{st}");
    // The new VMM writes the guest's output to the old one's stdout.
    let before = mid.heartbeat_count();
    wait_log(&mid, "500 heartbeats from the new VMM", |g| {
        g.heartbeats.len() >= before + 500
    });
    assert!(
        !announced(&mid),
        "the upgraded VMM asked the guest to announce itself: --no-announce was not carried\n{}",
        mid.stderr()
    );
    assert!(log_of(&mid).corrupt.is_empty());
    let settings = &st["settings"];
    assert_eq!(settings, &old["settings"], "{st}\nold: {old}");
    assert_eq!(settings["io_timeout"], 33, "{st}");
    assert_eq!(settings["no_announce"], true, "{st}");
    assert_eq!(settings["dirty_log"], "classic", "{st}");
    assert_eq!(settings["console"], console.as_str(), "{st}");
    assert_eq!(settings["memory_backend"], "memfd", "{st}");
    let r = api_request(&mid.api, &json!({"cmd": "quit"}), |_| {});
    assert!(r.is_ok(), "{r:?}");
    new.0 = None;
    let _ = src.api(&json!({"cmd": "quit"}), |_| {});
    let _ = std::fs::remove_dir_all(dir);
}

/// The session of `pid` (getsid).
fn session_of(pid: u32) -> i32 {
    // SAFETY: getsid(2) reads a process attribute; no memory is involved.
    unsafe { libc::getsid(pid as libc::pid_t) }
}

/// What a supervisor sees across an upgrade: the pid file names the new
/// VMM by the time the old one has exited (systemd's `PIDFile=` re-reads
/// it then), and the new VMM is in a session of its own, so a signal to
/// the old VMM's session or process group (a terminal's hang-up or Ctrl-C,
/// the kill of a job) does not reach it.
#[test]
fn upgrade_hands_the_pid_file_to_a_detached_vmm() {
    const TEST: &str = "upgrade_hands_the_pid_file_to_a_detached_vmm";
    let Some(_kvm) = common::kvm_or_skip(TEST) else {
        return;
    };
    let dir = scratch_dir("upgrade-pid");
    let pid_file = dir.join("vm.pid");
    let pid_arg = pid_file.to_string_lossy().into_owned();
    let mut src = start_source_with(
        &dir,
        "src",
        "64M",
        1,
        "ws=8 rate=10",
        &["--memory-backend", "memfd", "--pid-file", &pid_arg],
    )
    .unwrap();
    let _reap = ReapDir(dir.clone());
    src.wait_ready(Duration::from_secs(30)).unwrap();
    src.wait_heartbeats(200, Duration::from_secs(30)).unwrap();
    let old_pid = src.pid();
    let pid_in_file = || {
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
    };
    assert_eq!(pid_in_file(), Some(old_pid), "run writes its pid");
    let out = Command::new(refvmm_path())
        .arg("upgrade")
        .arg("--api-socket")
        .arg(&src.api)
        .arg("--binary")
        .arg(refvmm_path())
        .output()
        .unwrap();
    let st = api_request(&src.api, &json!({"cmd": "status"}), |_| {});
    let new_pid = st
        .as_ref()
        .ok()
        .and_then(|v| v["pid"].as_u64())
        .map(|p| p as u32);
    let mut new = KillPid(new_pid);
    assert!(
        out.status.success(),
        "upgrade: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        src.stderr()
    );
    let new_pid = new_pid.unwrap();
    assert_ne!(new_pid, old_pid);
    assert!(
        src.wait_exit(Duration::from_secs(10)).is_some(),
        "the old VMM exits"
    );
    assert_eq!(
        pid_in_file(),
        Some(new_pid),
        "when the old VMM has exited, the pid file names the new one"
    );
    let (sid, ours) = (session_of(new_pid), session_of(0));
    assert_eq!(
        sid, new_pid as i32,
        "the new VMM leads a session of its own (ours: {ours})"
    );
    // The new VMM goes on; at its end it removes the pid file it owns.
    let before = src.heartbeat_count();
    wait_log(&src, "200 heartbeats from the new VMM", |g| {
        g.heartbeats.len() >= before + 200
    });
    let r = api_request(&src.api, &json!({"cmd": "quit"}), |_| {});
    assert!(r.is_ok(), "{r:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !pid_file.exists(),
        "the new VMM removes its pid file at exit"
    );
    new.0 = None;
    let _ = std::fs::remove_dir_all(dir);
}

/// `HugePages_Free` of /proc/meminfo.
fn free_huge_pages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:")?.trim().parse().ok())
        .unwrap_or(0)
}

/// `--memory-backend memfd,hugetlb` asking for more huge pages than the
/// host has free fails at start with the numbers and the way out, instead
/// of falling back to ordinary pages or dying of SIGBUS later.
#[test]
fn hugetlb_without_enough_huge_pages_is_a_clear_error() {
    const TEST: &str = "hugetlb_without_enough_huge_pages_is_a_clear_error";
    let Some(_kvm) = common::kvm_or_skip(TEST) else {
        return;
    };
    let mib = (free_huge_pages() + 16) * 2;
    let out = Command::new(refvmm_path())
        .args(["run", "--memory", &format!("{mib}M")])
        .args(["--kernel", "builtin:testguest", "--serial", "none"])
        .args(["--memory-backend", "memfd,hugetlb"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("huge pages"), "{stderr}");
    assert!(stderr.contains("free"), "{stderr}");
    assert!(stderr.contains("/proc/sys/vm/nr_hugepages"), "{stderr}");
}

/// A guest in huge pages (`memfd,hugetlb`) is handed over by `upgrade`
/// (the new VMM maps the same hugetlb memfd) and then migrated over TCP to
/// a hugetlb destination, dirtying memory and writing fresh pages, with no
/// CORRUPT page. Skipped loudly where the host has too few huge pages
/// (`echo 200 > /proc/sys/vm/nr_hugepages` is enough).
#[test]
fn a_hugetlb_guest_is_upgraded_and_migrated() {
    const TEST: &str = "a_hugetlb_guest_is_upgraded_and_migrated";
    let Some(_kvm) = common::kvm_or_skip(TEST) else {
        return;
    };
    // Two 128 MiB guests (source, TCP destination), in 2 MiB pages.
    if free_huge_pages() < 2 * 64 {
        eprintln!(
            "\n*** SKIPPED {TEST}: {} huge pages free, 128 needed (echo 200 > /proc/sys/vm/nr_hugepages) ***\n",
            free_huge_pages()
        );
        return;
    }
    let dir = scratch_dir("hugetlb");
    let mut src = start_source_with(
        &dir,
        "src",
        "128M",
        1,
        CMDLINE,
        &["--memory-backend", "memfd,hugetlb"],
    )
    .unwrap();
    let _reap = ReapDir(dir.clone());
    src.wait_ready(Duration::from_secs(30)).unwrap();
    src.wait_heartbeats(500, Duration::from_secs(30)).unwrap();
    let st = api_request(&src.api, &json!({"cmd": "status"}), |_| {}).unwrap();
    assert_eq!(st["huge_pages"], true, "{st}");
    let out = Command::new(refvmm_path())
        .arg("upgrade")
        .arg("--api-socket")
        .arg(&src.api)
        .arg("--binary")
        .arg(refvmm_path())
        .output()
        .unwrap();
    let st = api_request(&src.api, &json!({"cmd": "status"}), |_| {});
    let mut new = KillPid(
        st.as_ref()
            .ok()
            .and_then(|v| v["pid"].as_u64())
            .map(|p| p as u32),
    );
    assert!(
        out.status.success(),
        "upgrade: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        src.stderr()
    );
    let st = st.unwrap();
    assert_eq!(
        st["huge_pages"], true,
        "the new VMM maps the hugetlb memfd: {st}"
    );
    assert_eq!(st["settings"]["memory_backend"], "memfd,hugetlb", "{st}");
    let before = src.heartbeat_count();
    wait_log(&src, "500 heartbeats from the new VMM", |g| {
        g.heartbeats.len() >= before + 500
    });
    // The upgraded VMM migrates the guest over TCP into huge pages again.
    let (mut dst, to) = livemig_suite::harness::start_destination(
        &dir,
        "dst",
        &["--memory-backend", "memfd,hugetlb"],
    )
    .unwrap();
    let report = migrate(&src, &to, json!({}))
        .unwrap_or_else(|e| panic!("TCP migration from the upgraded VMM: {e}\n{}", dst.stderr()));
    assert_eq!(report["status"], "completed", "{report}");
    new.0 = None;
    dst.wait_api(Duration::from_secs(10)).unwrap();
    let dst_st = api_request(&dst.api, &json!({"cmd": "status"}), |_| {}).unwrap();
    assert_eq!(dst_st["huge_pages"], true, "{dst_st}");
    dst.wait_heartbeats(1000, Duration::from_secs(30)).unwrap();
    let status = dst.query_status(Duration::from_secs(10)).unwrap();
    assert_eq!(status.corrupt, 0, "{status:?}");
    common::assert_no_corruption(&src, &dst, "hugetlb upgrade + TCP migration");
    eprintln!(
        "hugetlb: upgraded, then TCP: {} pages sent, {} zero, downtime {} ms",
        report["pages_sent"], report["zero_pages"], report["downtime_ms"]
    );
    let _ = dst.api(&json!({"cmd": "quit"}), |_| {});
    let _ = std::fs::remove_dir_all(dir);
}
