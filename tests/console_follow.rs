//! A console that follows the guest: `refvmm console PATH` stays attached
//! across five ping-pong migrations (each destination given the same
//! `--console unix:PATH`) while a typist sends lines the whole time, and
//! the session loses and repeats nothing, in either direction:
//!
//! * output: what the client printed is, byte for byte, the concatenation
//!   of what the guest wrote on each VMM (every VMM also copies the guest's
//!   output to its stdout, which the harness captures);
//! * input: every line typed is answered exactly once, in order
//!   (`status` → a `STATUS` line, `q<n>` → `? q<n>`).

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use livemig_suite::harness::{migrate, scratch_dir, ConsoleClient, GuestLog, Vmm};
use serde_json::json;

const T: Duration = Duration::from_secs(30);
const MIGRATIONS: usize = 5;

fn vmm(dir: &Path, name: &str, console: &Path, args: &[&str]) -> Vmm {
    let api = dir.join(format!("{name}.sock"));
    let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    a.extend([
        "--console".to_string(),
        format!("unix:{}", console.display()),
        "--api-socket".to_string(),
        api.to_string_lossy().into_owned(),
    ]);
    Vmm::spawn(name, &a, api).unwrap()
}

/// The line typed as number `i`: every third a `status`.
fn line(i: usize) -> String {
    if i.is_multiple_of(3) {
        "status".to_string()
    } else {
        format!("q{i}")
    }
}

#[test]
fn console_session_follows_five_ping_pong_migrations() {
    let test = "console_session_follows_five_ping_pong_migrations";
    let Some(_kvm) = common::kvm_or_skip(test) else {
        return;
    };
    let dir = scratch_dir("console-follow");
    let path = dir.join("guest.console");
    let mut vmms = vec![vmm(
        &dir,
        "vm0",
        &path,
        &[
            "run",
            "--memory",
            "128M",
            "--kernel",
            "builtin:testguest",
            "--cmdline",
            "ws=16 rate=20",
        ],
    )];
    vmms[0].wait_api(T).unwrap();
    vmms[0].wait_ready(T).unwrap();

    let mut client = ConsoleClient::attach(&path, true).unwrap();
    client
        .wait_for("READY through the console", T, |g| g.ready)
        .unwrap();

    // The typist: one line every 5 ms until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let typed = Arc::new(AtomicUsize::new(0));
    let mut stdin = client.stdin.take().unwrap();
    let typist = {
        let (stop, typed) = (stop.clone(), typed.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                stdin
                    .write_all(format!("{}\n", line(i)).as_bytes())
                    .and_then(|()| stdin.flush())
                    .expect("typing into the console client");
                i += 1;
                typed.store(i, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
            stdin
        })
    };

    for n in 1..=MIGRATIONS {
        let name = format!("vm{n}");
        let mut dst = vmm(
            &dir,
            &name,
            &path,
            &["receive", "--listen", "tcp:127.0.0.1:0"],
        );
        let ep = dst.listen_endpoint(T).unwrap();
        let src = vmms.last_mut().unwrap();
        let report = migrate(src, &ep, json!({})).unwrap_or_else(|e| panic!("migration {n}: {e}"));
        assert_eq!(report["status"], "completed");
        assert!(src.wait_exit(T).is_some_and(|s| s.success()));
        dst.wait_heartbeats(100, T).unwrap();
        vmms.push(dst);
        let answered = log_of_client(&client);
        eprintln!("after migration {n}: {answered} lines answered through the console");
    }

    // Stop typing; every line typed gets its answer.
    stop.store(true, Ordering::SeqCst);
    let _stdin = typist.join().unwrap();
    let typed = typed.load(Ordering::SeqCst);
    // (If some never comes, the comparisons below say which.)
    let _ = client.wait_for("an answer to every typed line", T, |g| {
        answers(g).len() >= typed
    });

    // End the session: the last VMM quits, the client is told and exits.
    let last = vmms.last().unwrap();
    let r = last.api(&json!({"cmd": "quit"}), |_| {}).unwrap();
    assert_eq!(r["result"], "ok");
    let status = client.wait_exit(T).expect("the client did not exit");
    assert!(status.success(), "{status}: {}", client.stderr());
    assert!(
        client.stderr().contains("the VMM exits"),
        "{}",
        client.stderr()
    );

    // What each VMM's guest wrote, in migration order (each VMM's readers
    // are joined when it is dropped).
    let logs: Vec<_> = vmms.drain(..).map(|v| v.log.clone()).collect();
    let mut written = Vec::new();
    for l in &logs {
        let l = l.lock().unwrap();
        assert!(l.corrupt.is_empty(), "{:?}", l.corrupt);
        written.extend_from_slice(&l.raw);
    }
    let c = client.log.lock().unwrap();
    eprintln!(
        "{typed} lines typed across {MIGRATIONS} migrations; the client printed {} bytes, the VMMs {} ({})",
        c.raw.len(),
        written.len(),
        logs.iter()
            .map(|l| l.lock().unwrap().raw.len().to_string())
            .collect::<Vec<_>>()
            .join(" + ")
    );
    assert!(
        c.raw == written,
        "console output differs from what the guest wrote: first difference at byte {:?} of {} / {}",
        c.raw.iter().zip(&written).position(|(a, b)| a != b),
        c.raw.len(),
        written.len()
    );

    // Input: each typed line answered exactly once, in order.
    let got = answers(&c);
    let want: Vec<String> = (0..typed)
        .map(|i| match line(i).as_str() {
            "status" => "STATUS".to_string(),
            q => format!("? {q}"),
        })
        .collect();
    assert_eq!(got, want, "answers differ from the lines typed");
    // The STATUS answers come from one guest whose counters never go back
    // (two lines held during a switchover are answered in one heartbeat).
    assert!(c
        .status
        .windows(2)
        .all(|w| w[1].heartbeats >= w[0].heartbeats));
    assert!(c.status.last().unwrap().heartbeats > c.status[0].heartbeats);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The answers in the order printed: `STATUS` for a STATUS line, the line
/// itself for a `? ...` line.
fn answers(g: &GuestLog) -> Vec<String> {
    String::from_utf8_lossy(&g.raw)
        .split(['\n', '.'])
        .filter_map(|l| {
            let l = l.trim_end_matches('\r');
            if l.starts_with("STATUS ") {
                Some("STATUS".to_string())
            } else if l.starts_with("? ") {
                Some(l.to_string())
            } else {
                None
            }
        })
        .collect()
}

fn log_of_client(c: &ConsoleClient) -> usize {
    answers(&c.log.lock().unwrap()).len()
}
