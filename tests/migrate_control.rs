//! Progress and cancel of a running migration, from any API client
//! (issue 19): Ctrl-C on `refvmm migrate`, a client that vanishes, a
//! progress query and a cancel from a second client.
//!
//! Every migration here is bandwidth-capped so that it is still in pre-copy
//! when the test acts: the guest's working set alone takes seconds at the
//! cap, and the test acts as soon as the engine reports the handshake done.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livemig_suite::harness::{
    log_of, migrate, refvmm_path, scratch_dir, start_destination, start_source, Vmm,
};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// A source with a heartbeating, page-writing guest, and a destination.
fn source_and_destination(tag: &str) -> (std::path::PathBuf, Vmm, Vmm, String) {
    let dir = scratch_dir(tag);
    let mut src = start_source(&dir, "src", "256M", 1, "ws=16 rate=10").unwrap();
    src.wait_ready(Duration::from_secs(30)).unwrap();
    src.wait_for("a T line", Duration::from_secs(30), |g| {
        !g.tlines.is_empty()
    })
    .unwrap();
    let (dst, ep) = start_destination(&dir, "dst", &[]).unwrap();
    (dir, src, dst, ep)
}

/// After a cancelled migration: the source still has the guest, running and
/// uncorrupted, and no migration runs; the destination gave up.
/// The destination heard why the source stopped (its `Error`
/// "cancelled"), not just a closed connection.
fn assert_destination_heard_the_cancel(src: &Vmm, dst: &Vmm) {
    let derr = dst.stderr();
    assert!(
        derr.contains("peer reported an error") && derr.contains(": cancelled"),
        "the destination does not say the source cancelled: {derr}\nsource: {}",
        src.stderr()
    );
}

fn assert_guest_stayed(src: &mut Vmm, dst: &mut Vmm, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let s = src.api(&json!({"cmd":"status"}), |_| {}).unwrap();
        if s["migration"] != "migrating" || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        status["migration"], "idle",
        "{what}: source status {status}"
    );
    assert_eq!(status["running"], true, "{what}: source status {status}");
    src.wait_heartbeats(300, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let g = log_of(src);
    assert!(g.corrupt.is_empty(), "{what}: CORRUPT {:?}", g.corrupt);
    drop(g);
    let st = dst
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{what}: the destination did not give up"));
    assert!(!st.success(), "{what}: destination exit {st}");
    assert!(
        log_of(dst).tlines.is_empty(),
        "{what}: the guest ran on the destination"
    );
}

/// `refvmm <args>` with stderr captured line by line.
struct Client {
    child: Child,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
}

impl Client {
    fn spawn(args: &[&str]) -> Client {
        let mut child = Command::new(refvmm_path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn refvmm client");
        let stderr = Arc::new(Mutex::new(String::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let pipe = |r: Box<dyn Read + Send>, buf: Arc<Mutex<String>>| {
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    let mut b = buf.lock().unwrap_or_else(|e| e.into_inner());
                    b.push_str(&line);
                    b.push('\n');
                }
            });
        };
        pipe(Box::new(child.stderr.take().unwrap()), stderr.clone());
        pipe(Box::new(child.stdout.take().unwrap()), stdout.clone());
        Client {
            child,
            stderr,
            stdout,
        }
    }

    fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn stdout(&self) -> String {
        self.stdout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn wait_stderr(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.stderr().contains(needle) {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("client exited ({st}) before '{needle}':\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "no '{needle}' from the client:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                // Let the pipes drain.
                std::thread::sleep(Duration::from_millis(50));
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("client still running:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let r = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(r, 0, "kill: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn api_path(v: &Vmm) -> String {
    v.api.to_string_lossy().into_owned()
}

#[test]
fn ctrl_c_on_migrate_cancels_and_the_guest_stays_on_the_source() {
    let Some(_kvm) = common::kvm_or_skip("ctrl_c_on_migrate_cancels") else {
        return;
    };
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let (dir, mut src, mut dst, ep) = source_and_destination("ctrlc");
        let api = api_path(&src);
        let mut client = Client::spawn(&[
            "migrate",
            "--api-socket",
            &api,
            "--to",
            &ep,
            "--max-bandwidth",
            "10",
        ]);
        client.wait_stderr("accepted", Duration::from_secs(30));
        client.signal(sig);
        let st = client.wait(Duration::from_secs(30));
        let err = client.stderr();
        eprintln!("client after signal {sig}:\n{err}");
        assert_eq!(st.code(), Some(4), "signal {sig}: client exit {st}:\n{err}");
        assert!(
            err.contains("cancelled") && err.contains("stays on the source"),
            "signal {sig}: {err}"
        );
        assert!(client.stdout().is_empty(), "no report on stdout");
        assert_guest_stayed(&mut src, &mut dst, "after Ctrl-C");
        // The source's own record of the migration says who cancelled it.
        let q = src.api(&json!({"cmd":"migrate-status"}), |_| {}).unwrap();
        assert_eq!(q["status"], "cancelled", "{q}");
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Sends `migrate` on a raw connection, waits for the engine's `accepted`
/// event, and returns the connection.
fn start_raw_migrate(api: &Path, ep: &str, extra: Value) -> (UnixStream, BufReader<UnixStream>) {
    let mut c = UnixStream::connect(api).unwrap();
    let mut req = json!({"cmd":"migrate","to":ep,"max_bandwidth_mib":10});
    for (k, v) in extra.as_object().unwrap() {
        req[k] = v.clone();
    }
    c.write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "API closed");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert!(v.get("result").is_none(), "migration ended early: {v}");
        if v["event"] == "accepted" {
            return (c, r);
        }
    }
}

#[test]
fn a_vanished_client_cancels_the_migration() {
    let Some(_kvm) = common::kvm_or_skip("a_vanished_client_cancels_the_migration") else {
        return;
    };
    let (dir, mut src, mut dst, ep) = source_and_destination("vanish");
    let (c, r) = start_raw_migrate(&src.api, &ep, json!({}));
    // Gone without a word.
    drop(r);
    drop(c);
    assert_guest_stayed(&mut src, &mut dst, "after the client vanished");
    let q = src.api(&json!({"cmd":"migrate-status"}), |_| {}).unwrap();
    assert_eq!(q["status"], "cancelled", "{q}");
    assert!(
        q["error-desc"].as_str().unwrap_or("").contains("went away"),
        "{q}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn progress_from_a_second_client_then_cancel_from_a_third() {
    let Some(_kvm) = common::kvm_or_skip("progress_from_a_second_client") else {
        return;
    };
    let (dir, mut src, mut dst, ep) = source_and_destination("progress");
    let idle = src.api(&json!({"cmd":"migrate-status"}), |_| {}).unwrap();
    assert_eq!(idle["result"], "ok", "{idle}");
    assert_eq!(idle["status"], "none", "{idle}");
    let api = src.api.clone();
    let first = std::thread::spawn({
        let ep = ep.clone();
        move || {
            let mut events = Vec::new();
            let r = livemig_suite::harness::api_request(
                &api,
                &json!({"cmd":"migrate","to":ep,"max_bandwidth_mib":10}),
                |e| events.push(e.clone()),
            );
            (r, events)
        }
    });
    // Poll from a second client until a pre-copy round has finished (the
    // dirty rate and the expected downtime are known then) and bytes flow.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen_transfer: Vec<u64> = Vec::new();
    let q = loop {
        let q = src.api(&json!({"cmd":"migrate-status"}), |_| {}).unwrap();
        assert_eq!(q["result"], "ok", "{q}");
        if q["status"] == "active" {
            seen_transfer.push(q["ram"]["transferred"].as_u64().unwrap());
            if q["round"].as_u64().unwrap() >= 1 && seen_transfer.len() >= 2 {
                break q;
            }
        }
        assert!(
            Instant::now() < deadline,
            "never active with a round done: {q}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("progress: {q}");
    assert_eq!(q["phase"], "pre-copy", "{q}");
    let ram = &q["ram"];
    let total = ram["total"].as_u64().unwrap();
    assert_eq!(total, 256 * MIB, "{q}");
    let transferred = ram["transferred"].as_u64().unwrap();
    // Round 0 sent the touched part of memory: more than the guest's
    // 16 MiB working set, less than all of memory.
    assert!(transferred > 8 * MIB && transferred < total, "{q}");
    assert!(ram["remaining"].as_u64().unwrap() <= total, "{q}");
    assert!(
        seen_transfer.windows(2).all(|w| w[1] >= w[0]),
        "transferred went backwards: {seen_transfer:?}"
    );
    // The guest writes 10 pages per 1 ms heartbeat: a dirty rate exists.
    assert!(ram["dirty-pages-rate"].as_f64().unwrap() > 0.0, "{q}");
    assert!(ram["dirty-sync-count"].as_u64().unwrap() >= 1, "{q}");
    // Throughput under the 10 MiB/s cap (megabits per second, as QEMU).
    let mbps = ram["mbps"].as_f64().unwrap();
    assert!(mbps > 0.0 && mbps < 2.0 * 10.0 * 8.0 * 1.048_576, "{q}");
    assert!(q["expected-downtime"].as_f64().unwrap() > 0.0, "{q}");
    assert!(q["total-time"].as_f64().unwrap() > 0.0, "{q}");
    assert_eq!(q["max-bandwidth"], 10 * MIB, "{q}");
    // A third client (the CLI) reads it too, then cancels.
    let mut st = Client::spawn(&["migrate-status", "--api-socket", &api_path(&src)]);
    assert!(
        st.wait(Duration::from_secs(10)).success(),
        "{}",
        st.stderr()
    );
    let cli: Value = serde_json::from_str(&st.stdout()).unwrap();
    assert_eq!(cli["status"], "active", "{cli}");
    let mut cancel = Client::spawn(&["migrate-cancel", "--api-socket", &api_path(&src)]);
    let cst = cancel.wait(Duration::from_secs(10));
    assert!(cst.success(), "migrate-cancel: {cst}: {}", cancel.stderr());
    let (r, events) = first.join().unwrap();
    let r = r.unwrap();
    assert_eq!(r["result"], "error", "{r}");
    assert_eq!(r["status"], "cancelled", "{r}");
    assert!(events.iter().any(|e| e["event"] == "round"), "{events:?}");
    assert_guest_stayed(&mut src, &mut dst, "after a cancel from another client");
    assert_destination_heard_the_cancel(&src, &dst);
    let q = src.api(&json!({"cmd":"migrate-status"}), |_| {}).unwrap();
    assert_eq!(q["status"], "cancelled", "{q}");
    // Nothing left to cancel: the CLI says so and fails.
    let mut again = Client::spawn(&["migrate-cancel", "--api-socket", &api_path(&src)]);
    let ast = again.wait(Duration::from_secs(10));
    assert_eq!(ast.code(), Some(1), "{}", again.stderr());
    assert!(
        again.stderr().contains("no migration"),
        "{}",
        again.stderr()
    );
    // The guest can still migrate afterwards, to a fresh destination.
    let (mut dst2, ep2) = start_destination(&dir, "dst2", &[]).unwrap();
    let report = migrate(&src, &ep2, json!({})).unwrap();
    assert_eq!(report["status"], "completed");
    dst2.wait_heartbeats(100, Duration::from_secs(30)).unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// An operator cancels a migration over four page streams in the middle of
/// round 0: `refvmm migrate --streams 4` (capped at 10 MiB/s) runs, and
/// once `migrate-status` says 8 MiB went out in round 0, `refvmm
/// migrate-cancel` from another terminal. The client exits 4 (cancelled),
/// the guest runs on at the source uncorrupted, and the destination says
/// that the source cancelled (not a broken page stream) and never ran the
/// guest. Until session 9 (2026-12-04) its message was `page stream N: ...
/// connection closed by the peer`.
#[test]
fn a_cancel_in_round_0_over_four_page_streams() {
    let Some(_kvm) = common::kvm_or_skip("a_cancel_in_round_0_over_four_page_streams") else {
        return;
    };
    let (dir, mut src, mut dst, ep) = source_and_destination("cancel-streams");
    let api = api_path(&src);
    let mut client = Client::spawn(&[
        "migrate",
        "--api-socket",
        &api,
        "--to",
        &ep,
        "--max-bandwidth",
        "10",
        "--streams",
        "4",
    ]);
    client.wait_stderr("accepted", Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(60);
    let q = loop {
        let q = src.api(&json!({"cmd":"migrate-status"}), |_| {}).unwrap();
        assert_eq!(q["status"], "active", "not in pre-copy: {q}");
        assert_eq!(q["round"], 0, "round 0 ended before 8 MiB went out: {q}");
        if q["ram"]["transferred"].as_u64().unwrap() >= 8 * MIB {
            break q;
        }
        assert!(Instant::now() < deadline, "8 MiB not sent: {q}");
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("cancelling at: {q}");
    let mut cancel = Client::spawn(&["migrate-cancel", "--api-socket", &api]);
    let cst = cancel.wait(Duration::from_secs(10));
    assert!(cst.success(), "migrate-cancel: {cst}: {}", cancel.stderr());
    let st = client.wait(Duration::from_secs(30));
    let err = client.stderr();
    assert_eq!(st.code(), Some(4), "client exit {st}:\n{err}");
    assert!(err.contains("stays on the source"), "{err}");
    assert_guest_stayed(&mut src, &mut dst, "after a cancel over four page streams");
    assert_destination_heard_the_cancel(&src, &dst);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_client_gone_during_the_switchover_does_not_stop_it_and_the_source_exits() {
    let Some(_kvm) = common::kvm_or_skip("a_client_gone_during_the_switchover") else {
        return;
    };
    let (dir, mut src, mut dst, ep) = source_and_destination("vanish-late");
    // One capped round, then a forced switchover.
    let (c, mut r) = start_raw_migrate(&src.api, &ep, json!({"max_rounds":1,"force":true}));
    let mut line = String::new();
    loop {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "API closed");
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["event"] == "paused" || v.get("result").is_some() {
            assert_eq!(v["event"], "paused", "{v}");
            break;
        }
    }
    drop(r);
    drop(c);
    // Too late to cancel: the guest moves, and the source, its guest gone,
    // exits 0 although nobody heard its reply.
    let st = src
        .wait_exit(Duration::from_secs(30))
        .expect("the source exits after the guest left");
    assert!(st.success(), "source exit {st}:\n{}", src.stderr());
    dst.wait_heartbeats(300, Duration::from_secs(30)).unwrap();
    assert!(log_of(&dst).corrupt.is_empty());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_cancel_pipelined_behind_the_migrate_request_is_not_lost() {
    let Some(_kvm) = common::kvm_or_skip("a_cancel_pipelined_behind_the_migrate_request") else {
        return;
    };
    let (dir, mut src, mut dst, ep) = source_and_destination("pipelined");
    let mut c = UnixStream::connect(&src.api).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    // Both lines in one write: the server reads them together.
    let req = json!({"cmd":"migrate","to":ep,"max_bandwidth_mib":10});
    let cancel = json!({"cmd":"migrate-cancel","reason":"test"});
    c.write_all(format!("{req}\n{cancel}\n").as_bytes())
        .unwrap();
    let mut result = None;
    for line in BufReader::new(c).lines() {
        let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if v.get("result").is_some() {
            result = Some(v);
            break;
        }
    }
    let r = result.expect("a result");
    assert_eq!(r["status"], "cancelled", "{r}");
    assert!(
        r["cancelled_by"].as_str().unwrap_or("").contains("test"),
        "{r}"
    );
    assert_guest_stayed(&mut src, &mut dst, "after a pipelined cancel");
    let _ = std::fs::remove_dir_all(dir);
}
