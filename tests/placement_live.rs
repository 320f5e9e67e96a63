//! Placement from live facts (issue 19): the source measures its guest's
//! dirty rate (`dirty-rate`), host agents answer capacity queries and
//! start receivers, `refvmm migrate --to auto` falls back to the
//! next-ranked host and always says what happened, and `refvmm evacuate`
//! moves every VM it can. Everything on loopback.

mod common;

#[path = "../crates/livemig-tls/tests/common/mod.rs"]
mod pki;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use livemig_suite::harness::{
    api_request, log_of, migrate, refvmm_path, scratch_dir, start_destination, start_source_with,
    Vmm,
};
use serde_json::{json, Value};

/// A `refvmm agent` on a free loopback port. Dropping it quits every guest
/// its receivers took (they outlive the agent by design) and stops it.
struct Agent {
    child: Child,
    endpoint: String,
}

impl Agent {
    fn start(dir: &Path, name: &str, extra: &[&str]) -> Agent {
        let mut child = Command::new(refvmm_path())
            .args(["agent", "--listen", "tcp:127.0.0.1:0", "--name", name])
            .arg("--work-dir")
            .arg(dir.join(name))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn refvmm agent");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let first = lines.next().expect("agent stderr").unwrap();
        let endpoint = first
            .strip_prefix("refvmm agent: answering on ")
            .unwrap_or_else(|| panic!("agent said: {first}"))
            .trim_end_matches(" (mutual TLS)")
            .to_string();
        std::thread::spawn(move || lines.for_each(drop));
        Agent { child, endpoint }
    }

    fn try_ask(&self, req: &Value) -> Result<Value, String> {
        let addr = self.endpoint.strip_prefix("tcp:").ok_or("not tcp")?;
        let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        s.write_all(format!("{req}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))
    }

    fn ask(&self, req: &Value) -> Value {
        self.try_ask(req).unwrap()
    }

    /// The receivers that hold a guest, once there are `n` of them (at
    /// most 10 s): the agent learns that a receiver got its guest from the
    /// receiver's stderr, on a thread of its own, so its capacity may lag
    /// the source's "completed" by a moment.
    fn running_once(&self, n: usize) -> Vec<Value> {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let running = self.running();
            if running.len() == n || std::time::Instant::now() >= until {
                return running;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The receivers that hold a guest now.
    fn running(&self) -> Vec<Value> {
        let cap = self.ask(&json!({"cmd":"capacity"}));
        cap["incoming"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["state"] == "running")
            .cloned()
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(cap) = self.try_ask(&json!({"cmd":"capacity"})) {
            for r in cap["incoming"].as_array().into_iter().flatten() {
                let api = PathBuf::from(r["api_socket"].as_str().unwrap_or(""));
                let _ = api_request(&api, &json!({"cmd":"quit"}), |_| {});
            }
        }
        // SIGTERM: the agent stops the receivers still waiting.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn refvmm(args: &[&str]) -> Output {
    Command::new(refvmm_path())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run refvmm")
}

fn source(dir: &Path, name: &str, cmdline: &str, extra: &[&str]) -> Vmm {
    let mut v = start_source_with(dir, name, "64M", 1, cmdline, extra).unwrap();
    v.wait_ready(Duration::from_secs(30)).unwrap();
    v.wait_heartbeats(50, Duration::from_secs(30)).unwrap();
    v
}

#[test]
fn dirty_rate_counts_the_written_pages_in_every_mode_and_a_migration_follows() {
    let Some(_kvm) = common::kvm_or_skip(
        "dirty_rate_counts_the_written_pages_in_every_mode_and_a_migration_follows",
    ) else {
        return;
    };
    let dir = scratch_dir("dirtyrate");
    for mode in ["manual", "classic", "ring"] {
        // The guest rewrites an 8 MiB working set (2048 pages) of its
        // 64 MiB (16384 pages).
        let src = source(
            &dir,
            &format!("src-{mode}"),
            "ws=8 rate=20",
            &["--dirty-log", mode],
        );
        let r = src
            .api(&json!({"cmd":"dirty-rate","window-ms":400}), |_| {})
            .unwrap();
        assert_eq!(r["result"], "ok", "{mode}: {r}");
        let pages = r["dirty-pages"].as_u64().unwrap();
        // Written pages are counted, and only those: a tracker that was not
        // armed (manual mode starts all-dirty) would report all 16384.
        assert!(pages > 100 && pages < 4096, "{mode}: {r}");
        assert!(r["dirty-rate-mib-s"].as_f64().unwrap() > 0.0, "{mode}: {r}");

        // A migration cannot start while a measurement runs.
        let api = src.api.clone();
        let long = std::thread::spawn(move || {
            api_request(&api, &json!({"cmd":"dirty-rate","window-ms":1500}), |_| {})
        });
        std::thread::sleep(Duration::from_millis(300));
        let err = migrate(&src, "tcp:127.0.0.1:1", json!({})).unwrap_err();
        assert!(
            err["error"].as_str().unwrap_or("").contains("dirty-rate"),
            "{mode}: {err}"
        );
        assert_eq!(long.join().unwrap().unwrap()["result"], "ok");

        // The measurement left the dirty log as a migration needs it: the
        // guest moves intact.
        let (mut dst, ep) =
            start_destination(&dir, &format!("dst-{mode}"), &["--dirty-log", mode]).unwrap();
        let report = migrate(&src, &ep, json!({})).unwrap();
        assert_eq!(report["status"], "completed", "{mode}");
        dst.wait_heartbeats(200, Duration::from_secs(30)).unwrap();
        common::assert_no_corruption(&src, &dst, mode);
        let _ = dst.api(&json!({"cmd":"quit"}), |_| {});
    }
}

fn hosts_file(dir: &Path, hosts: &Value) -> PathBuf {
    let p = dir.join("hosts.json");
    std::fs::write(&p, hosts.to_string()).unwrap();
    p
}

#[test]
fn auto_says_not_migrated_with_every_reason_then_falls_back_to_the_next_host() {
    let Some(_kvm) = common::kvm_or_skip(
        "auto_says_not_migrated_with_every_reason_then_falls_back_to_the_next_host",
    ) else {
        return;
    };
    let dir = scratch_dir("autofallback");
    // 64 MiB + 4 KiB: the receiver must get exactly this size (the
    // handshake refuses another), and the hosts count 65 MiB.
    let mut src = start_source_with(&dir, "web1", "65540K", 1, "ws=4 rate=5", &[]).unwrap();
    src.wait_ready(Duration::from_secs(30)).unwrap();
    let a = Agent::start(&dir, "hostA", &["--memory-mib", "4096", "--maintenance"]);
    let b = Agent::start(&dir, "hostB", &["--memory-mib", "512"]);
    // `ghost`: a stale hosts-file entry that looks best (idle, all memory
    // free) but whose receiver is gone; hostA is asked through its agent.
    let ghost = json!({"name":"ghost","migration_address":"tcp:127.0.0.1:1",
        "memory_total_mib":65536,"memory_free_mib":65536,"cpus":64,"cpu_load":0.0,
        "link_bandwidth_mib_s":1100});
    let entry_a = json!({"name":"hostA","migration_address":"tcp:127.0.0.1:2",
        "memory_total_mib":1,"memory_free_mib":1,"cpus":1,"cpu_load":0.0,
        "link_bandwidth_mib_s":1000,"agent":a.endpoint});
    let hosts = hosts_file(&dir, &json!([ghost, entry_a]));
    let api = src.api.to_string_lossy().into_owned();
    let hp = hosts.to_string_lossy().into_owned();
    let args = [
        "migrate",
        "--api-socket",
        &api,
        "--to",
        "auto",
        "--hosts",
        &hp,
        "--agents",
        &b.endpoint,
    ];

    // 1. hostA in maintenance, hostB too small, ghost unreachable: not
    // migrated, exit 1, every host's reason, the guest runs on.
    let out = refvmm(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty());
    assert!(err.contains("dirty rate"), "{err}");
    assert!(err.contains("predicted: "), "{err}");
    assert!(
        err.contains("not migrated: VM `web1` stays on the source"),
        "{err}"
    );
    assert!(err.contains("hostA: excluded: maintenance"), "{err}");
    assert!(
        err.contains("hostB: excluded: memory: needs 1089 MiB free"),
        "{err}"
    );
    assert!(
        err.contains("ghost: ") && err.contains("connecting to tcp:127.0.0.1:1"),
        "{err}"
    );
    let st = src.api(&json!({"cmd":"status"}), |_| {}).unwrap();
    assert_eq!(
        (st["migration"].as_str(), st["running"].as_bool()),
        (Some("idle"), Some(true))
    );

    // 2. hostA leaves maintenance: ghost ranks first and fails, hostA
    // takes the guest; every step is said.
    a.ask(&json!({"cmd":"set-maintenance","on":false}));
    let out = refvmm(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["status"], "completed");
    assert!(err.contains("agent ") && err.contains("(live)"), "{err}");
    assert!(err.contains("attempt 1/2: host `ghost`"), "{err}");
    assert!(
        err.contains("host `ghost` failed before the switchover"),
        "{err}"
    );
    assert!(err.contains("attempt 2/2: host `hostA`"), "{err}");
    assert!(
        err.contains("migrated to `hostA` (ranked #2 of 2 eligible"),
        "{err}"
    );
    assert!(err.contains("tried after `ghost` failed"), "{err}");
    // The guest runs in the receiver hostA's agent started, intact.
    let running = a.running_once(1);
    assert_eq!(running.len(), 1, "{running:?}");
    let rx_api = PathBuf::from(running[0]["api_socket"].as_str().unwrap());
    let st = api_request(&rx_api, &json!({"cmd":"status"}), |_| {}).unwrap();
    assert_eq!(st["running"], true, "{st}");
    assert!(log_of(&src).corrupt.is_empty());
    // hostA's capacity counts the guest now.
    let cap = a.ask(&json!({"cmd":"capacity"}));
    assert_eq!(cap["host"]["memory_free_mib"], 4096 - 65, "{cap}");
    assert_eq!(cap["host"]["vcpus_allocated"], 1, "{cap}");
}

#[test]
fn evacuate_moves_every_vm_that_fits_and_leaves_the_rest_running() {
    let Some(_kvm) =
        common::kvm_or_skip("evacuate_moves_every_vm_that_fits_and_leaves_the_rest_running")
    else {
        return;
    };
    let dir = scratch_dir("evacuate");
    // Five 64 MiB guests dirtying memory ever faster; two hosts with room
    // for two each (1152 MiB: 64 + 1024 headroom fits twice, not thrice).
    let cmdlines = [
        "ws=1 rate=0",
        "ws=2 rate=1",
        "ws=4 rate=2",
        "ws=8 rate=5",
        "ws=24 rate=40",
    ];
    let vms: Vec<Vmm> = cmdlines
        .iter()
        .enumerate()
        .map(|(i, c)| source(&dir, &format!("vm{i}"), c, &[]))
        .collect();
    let a = Agent::start(&dir, "hostA", &["--memory-mib", "1152"]);
    let b = Agent::start(&dir, "hostB", &["--memory-mib", "1152"]);
    let sockets: Vec<String> = vms
        .iter()
        .map(|v| v.api.to_string_lossy().into_owned())
        .collect();
    let sockets = sockets.join(",");
    let agents = format!("{},{}", a.endpoint, b.endpoint);
    let out = refvmm(&[
        "evacuate",
        "--api-sockets",
        &sockets,
        "--agents",
        &agents,
        "--parallel",
        "2",
        "--dirty-rate-window-ms",
        "300",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert_eq!(out.status.code(), Some(1), "one VM cannot move: {err}");
    assert!(err.contains("evacuation summary"), "{err}");
    assert!(err.contains("4 of 5 VMs moved"), "{err}");
    // The one left is the one predicted slowest (it dirties the most), and
    // it says why: no host has room any more.
    let left = err
        .lines()
        .find(|l| l.contains("not moved (left running)"))
        .unwrap_or_else(|| panic!("no row for the VM left: {err}"));
    assert!(left.contains("vm4"), "{left}");
    assert!(left.contains("memory: needs 1088 MiB free"), "{left}");
    let st = vms[4].api(&json!({"cmd":"status"}), |_| {}).unwrap();
    assert_eq!(
        (st["migration"].as_str(), st["running"].as_bool()),
        (Some("idle"), Some(true))
    );
    // Capacity was updated as VMs landed: two on each host.
    assert_eq!(a.running_once(2).len(), 2, "{err}");
    assert_eq!(b.running_once(2).len(), 2, "{err}");
    for v in &vms[..4] {
        let st = v.api(&json!({"cmd":"status"}), |_| {});
        assert!(st.is_err() || st.unwrap()["migration"] == "migrated");
    }
    for v in &vms {
        assert!(log_of(v).corrupt.is_empty(), "{}", v.name);
    }
}

#[test]
fn an_agent_over_tls_answers_only_clients_of_its_ca() {
    let dir = scratch_dir("agenttls");
    let ours = pki::Pki::new("agent-ours");
    let theirs = pki::Pki::new("agent-theirs");
    let cfg = ours.host("agent");
    let (c, k, ca) = (
        cfg.cert_chain.to_string_lossy().into_owned(),
        cfg.key.to_string_lossy().into_owned(),
        cfg.ca.to_string_lossy().into_owned(),
    );
    let agent = Agent::start(
        &dir,
        "hostT",
        &[
            "--tls-cert",
            &c,
            "--tls-key",
            &k,
            "--tls-ca",
            &ca,
            "--memory-mib",
            "2048",
        ],
    );
    let ep: livemig::transport::Endpoint = agent.endpoint.parse().unwrap();
    let ask = |id: &livemig_tls::TlsIdentity| -> Result<Value, String> {
        let mut t = livemig_tls::connect_tls(&ep, id, Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        t.write_all(b"{\"cmd\":\"capacity\"}\n")
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(t)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))
    };
    let v = ask(&ours.identity("client")).unwrap();
    assert_eq!(v["host"]["name"], "hostT", "{v}");
    assert_eq!(v["host"]["memory_free_mib"], 2048, "{v}");
    assert_eq!(v["accepting"], true, "{v}");
    assert!(ask(&theirs.identity("stranger")).is_err());
    // The agent still answers after refusing a stranger.
    assert_eq!(ask(&ours.identity("client")).unwrap()["result"], "ok");
}

/// `refvmm <args>` running, its stderr collected.
struct Running {
    child: Child,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Running {
    fn spawn(args: &[&str]) -> Running {
        let mut child = Command::new(refvmm_path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn refvmm");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (pipe, buf) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for l in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut b = buf.lock().unwrap_or_else(|e| e.into_inner());
                b.push_str(&l);
                b.push('\n');
            }
        });
        Running { child, stderr }
    }

    fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn wait_stderr(&mut self, needle: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !self.stderr().contains(needle) {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "exited before '{needle}':\n{}",
                self.stderr()
            );
            assert!(std::time::Instant::now() < deadline, "{}", self.stderr());
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn ctrl_c_during_auto_cancels_and_tries_no_other_host() {
    let Some(_kvm) = common::kvm_or_skip("ctrl_c_during_auto_cancels_and_tries_no_other_host")
    else {
        return;
    };
    let dir = scratch_dir("autoctrlc");
    let mut src = start_source_with(&dir, "db1", "256M", 1, "ws=16 rate=10", &[]).unwrap();
    src.wait_ready(Duration::from_secs(30)).unwrap();
    src.wait_heartbeats(50, Duration::from_secs(30)).unwrap();
    let a = Agent::start(&dir, "hostA", &["--memory-mib", "4096"]);
    let b = Agent::start(&dir, "hostB", &["--memory-mib", "4096"]);
    let api = src.api.to_string_lossy().into_owned();
    let agents = format!("{},{}", a.endpoint, b.endpoint);
    // 10 MiB/s: the first round alone takes seconds.
    let mut c = Running::spawn(&[
        "migrate",
        "--api-socket",
        &api,
        "--to",
        "auto",
        "--agents",
        &agents,
        "--max-bandwidth",
        "10",
    ]);
    c.wait_stderr("accepted");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(c.child.id() as i32, libc::SIGINT) };
    let st = c.child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let err = c.stderr();
    assert_eq!(st.code(), Some(4), "{err}");
    assert_eq!(err.matches("refvmm: attempt ").count(), 1, "{err}");
    assert!(err.contains("no other host is tried"), "{err}");
    assert!(
        err.contains("not migrated: VM `db1` stays on the source"),
        "{err}"
    );
    assert!(err.contains("not tried: no other host is tried"), "{err}");
    let s = src.api(&json!({"cmd":"status"}), |_| {}).unwrap();
    assert_eq!(
        (s["migration"].as_str(), s["running"].as_bool()),
        (Some("idle"), Some(true))
    );
    src.wait_heartbeats(300, Duration::from_secs(30)).unwrap();
    assert!(log_of(&src).corrupt.is_empty());
    // The receiver prepared for the cancelled attempt is gone, on both.
    for ag in [&a, &b] {
        let cap = ag.ask(&json!({"cmd":"capacity"}));
        assert_eq!(cap["incoming"], json!([]), "{cap}");
        assert_eq!(cap["host"]["memory_free_mib"], 4096, "{cap}");
    }
}

/// The pid of the process whose command line contains `needle` (a path
/// only that process was given), if any.
fn pid_with_arg(needle: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args = String::from_utf8_lossy(&cmdline);
        args.split('\0').any(|a| a == needle).then_some(pid)
    })
}

/// Whether `pid` is gone or a zombie.
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z')),
    }
}

/// A receiver the agent started must stop on SIGTERM like any process: the
/// agent waits for its own stop signals with them blocked, and a blocked
/// mask is inherited across exec — the receiver must not inherit it.
#[test]
fn a_receiver_started_by_the_agent_stops_on_sigterm() {
    let Some(_kvm) = common::kvm_or_skip("a_receiver_started_by_the_agent_stops_on_sigterm") else {
        return;
    };
    let dir = scratch_dir("agentsigterm");
    let agent = Agent::start(&dir, "hostS", &["--memory-mib", "512"]);
    let r = agent.ask(&json!({"cmd":"prepare-receive","vm":"v","memory_mib":64,"vcpus":1}));
    assert_eq!(r["result"], "ok", "{r}");
    let api = r["api_socket"].as_str().expect("the receiver's API socket");
    let rx = pid_with_arg(api).unwrap_or_else(|| panic!("no process was started with {api}"));
    let status = std::fs::read_to_string(format!("/proc/{rx}/status")).unwrap();
    let blocked = status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(
        blocked & (1 << (libc::SIGTERM - 1)),
        0,
        "the receiver starts with SIGTERM blocked (SigBlk {blocked:#x})"
    );
    // SAFETY: kill(2) on a pid we just read; at worst it is gone (ESRCH).
    unsafe { libc::kill(rx as i32, libc::SIGTERM) };
    let gone = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        exited(rx)
    });
    assert!(gone, "the receiver {rx} ignored SIGTERM for 10 s");
}
