//! The reference VMM and the test guest on real KVM (issue: foundation).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use livemig_suite::harness::{log_of, refvmm_path, scratch_dir, start_destination, start_source};
use livemig_testguest::WS_BASE;
use serde_json::json;

#[test]
fn boots_test_guest_heartbeats_and_counters() {
    let Some(_kvm) = common::kvm_or_skip("boots_test_guest_heartbeats_and_counters") else {
        return;
    };
    let dir = scratch_dir("boot");
    let mut vm = start_source(&dir, "boot", "256M", 1, "ws=16 rate=20 hb=1000").unwrap();
    vm.wait_ready(Duration::from_secs(30)).unwrap();
    vm.wait_for("two T lines", Duration::from_secs(30), |g| {
        g.tlines.len() >= 2
    })
    .unwrap();
    let g = log_of(&vm);
    let t = &g.tlines;
    assert!(t[1].heartbeats > t[0].heartbeats, "{:?}", t);
    assert!(t[1].pages_written > t[0].pages_written, "{:?}", t);
    assert!(t[1].pages_verified > t[0].pages_verified, "{:?}", t);
    assert_eq!(t[1].corrupt, 0);
    assert!(g.corrupt.is_empty(), "{:?}", g.corrupt);
    // Heartbeats never faster than the requested 1 ms (missed beats are
    // skipped, never burst): over the 1000 beats between the two T lines
    // the mean interval is at least half of it. How much longer it is
    // depends on the machine's load: printed, not asserted.
    let span = t[1].at - t[0].at;
    let mean = span / 1000;
    assert!(
        mean > Duration::from_micros(500),
        "mean heartbeat interval {mean:?}"
    );
    eprintln!("boot: mean heartbeat interval {mean:?}");
}

#[test]
fn checker_reports_a_page_changed_behind_the_guests_back() {
    let Some(_kvm) = common::kvm_or_skip("checker_reports_a_page_changed_behind_the_guests_back")
    else {
        return;
    };
    let dir = scratch_dir("corrupt");
    let mut vm = start_source(&dir, "corrupt", "128M", 1, "ws=16 rate=0 hb=1000").unwrap();
    vm.wait_ready(Duration::from_secs(30)).unwrap();
    vm.wait_heartbeats(100, Duration::from_secs(30)).unwrap();
    assert!(log_of(&vm).corrupt.is_empty());
    // Page 1234 was never written by the guest: it must read as zero.
    let page = 1234u64;
    let r = vm
        .api(&json!({"cmd":"write-memory","gpa": WS_BASE + page * 4096 + 64, "value": 0xdead_beef_u64}), |_| {})
        .unwrap();
    assert_eq!(r["result"], "ok", "{r}");
    vm.wait_for("CORRUPT", Duration::from_secs(30), |g| {
        !g.corrupt.is_empty()
    })
    .unwrap();
    // Let the verifier go round the working set a few more times.
    vm.wait_heartbeats(300, Duration::from_secs(30)).unwrap();
    let g = log_of(&vm);
    assert_eq!(g.corrupt_pages, vec![page], "{:?}", g.corrupt);
    assert!(
        g.corrupt[0].contains("got=00000000deadbeef"),
        "{:?}",
        g.corrupt
    );
}

#[test]
fn pause_resume_makes_a_gap_and_heartbeats_continue() {
    let Some(_kvm) = common::kvm_or_skip("pause_resume_makes_a_gap_and_heartbeats_continue") else {
        return;
    };
    let dir = scratch_dir("pause");
    let mut vm = start_source(&dir, "pause", "128M", 1, "ws=16 rate=10 hb=1000").unwrap();
    vm.wait_ready(Duration::from_secs(30)).unwrap();
    vm.wait_heartbeats(200, Duration::from_secs(30)).unwrap();
    assert_eq!(
        vm.api(&json!({"cmd":"pause"}), |_| {}).unwrap()["result"],
        "ok"
    );
    let paused_at = Instant::now();
    let during = vm.heartbeat_count();
    std::thread::sleep(Duration::from_millis(200));
    let after_pause = vm.heartbeat_count();
    assert!(
        after_pause <= during + 1,
        "heartbeats continued while paused"
    );
    assert_eq!(
        vm.api(&json!({"cmd":"resume"}), |_| {}).unwrap()["result"],
        "ok"
    );
    vm.wait_heartbeats(200, Duration::from_secs(30)).unwrap();
    let g = log_of(&vm);
    let gap = g
        .heartbeats
        .windows(2)
        .filter(|w| w[1] >= paused_at)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap();
    assert!(gap >= Duration::from_millis(190), "largest gap {gap:?}");
    assert!(g.corrupt.is_empty(), "{:?}", g.corrupt);
    eprintln!("pause: gap {gap:?}");
}

#[test]
fn two_vcpus_boot_with_the_ap_parked() {
    let Some(_kvm) = common::kvm_or_skip("two_vcpus_boot_with_the_ap_parked") else {
        return;
    };
    let dir = scratch_dir("smp");
    let mut vm = start_source(&dir, "smp", "128M", 2, "ws=16 rate=10 hb=1000").unwrap();
    vm.wait_ready(Duration::from_secs(30)).unwrap();
    vm.wait_heartbeats(500, Duration::from_secs(30)).unwrap();
    let r = vm.api(&json!({"cmd":"vcpu-regs"}), |_| {}).unwrap();
    let v = r["vcpus"].as_array().unwrap();
    assert_eq!(v.len(), 2);
    // KVM_MP_STATE_RUNNABLE = 0 for the BSP; the AP waits for INIT/SIPI
    // (UNINITIALIZED = 1 or INIT_RECEIVED = 2).
    assert_eq!(v[0]["mp_state"], 0, "{r}");
    assert_ne!(v[1]["mp_state"], 0, "{r}");
    vm.wait_heartbeats(200, Duration::from_secs(30)).unwrap();
    assert!(log_of(&vm).corrupt.is_empty());
}

fn refvmm(args: &[&str]) -> (i32, String) {
    let out = Command::new(refvmm_path())
        .args(args)
        .output()
        .expect("run refvmm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_usage_error(args: &[&str], needle: &str) {
    let (code, err) = refvmm(args);
    assert_eq!(code, 2, "{args:?}: exit {code}, stderr: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: want a one-line error, got: {err}"
    );
    assert!(err.contains(needle), "{args:?}: '{needle}' not in: {err}");
}

#[test]
fn bad_input_is_a_clear_error_with_exit_code_2() {
    // These need no KVM: the kernel and the options are checked first.
    let dir = scratch_dir("badinput");
    let not_mb = dir.join("not-multiboot.bin");
    std::fs::write(&not_mb, vec![0x90u8; 64 * 1024]).unwrap();
    let img = livemig_testguest::image().unwrap();
    let truncated = dir.join("truncated.elf");
    std::fs::write(&truncated, &img[..img.len() / 3]).unwrap();
    let s = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let (nm, tr) = (s(&not_mb), s(&truncated));
    assert_usage_error(
        &[
            "run", "--memory", "64M", "--kernel", &nm, "--serial", "none",
        ],
        "Multiboot",
    );
    assert_usage_error(
        &[
            "run", "--memory", "64M", "--kernel", &tr, "--serial", "none",
        ],
        "truncated",
    );
    // The test guest loads at 1 MiB and needs ~1.1 MiB: 1 MiB of RAM is too small.
    assert_usage_error(
        &[
            "run",
            "--memory",
            "1M",
            "--kernel",
            "builtin:testguest",
            "--serial",
            "none",
        ],
        "does not fit",
    );
    assert_usage_error(
        &["run", "--memory", "0", "--kernel", "builtin:testguest"],
        "greater than 0",
    );
    assert_usage_error(
        &[
            "run",
            "--memory",
            "64M",
            "--kernel",
            "/nonexistent/kernel.elf",
        ],
        "cannot read kernel",
    );
    assert_usage_error(
        &["run", "--memory", "64Q", "--kernel", "builtin:testguest"],
        "suffix",
    );
    assert_usage_error(
        &[
            "run",
            "--memory",
            "64M",
            "--kernel",
            "builtin:testguest",
            "--serial",
            "tty",
        ],
        "--serial",
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn guest_image_is_written() {
    let dir = scratch_dir("image");
    let out = dir.join("guest.elf");
    let (code, err) = refvmm(&["guest-image", "--out", &out.to_string_lossy()]);
    assert_eq!(code, 0, "{err}");
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(bytes, livemig_testguest::image().unwrap());
    assert_eq!(&bytes[..4], b"\x7fELF");
    let _ = std::fs::remove_dir_all(dir);
}

/// refvmm's API refuses `resume`, `pause` and `migrate` while a migration
/// runs and for good after it succeeded (the engine's `MigrationGuard`):
/// a `resume` sent when the source reports it is paused for the
/// stop-and-copy, a second `migrate` while the first waits in its
/// handshake, and all three after the success.
#[test]
fn api_refuses_commands_during_and_after_a_migration() {
    let Some(_kvm) = common::kvm_or_skip("api_refuses_commands_during_and_after_a_migration")
    else {
        return;
    };
    let dir = scratch_dir("guard");
    let mut src = start_source(&dir, "src", "128M", 1, "ws=16 rate=20 hb=1000").unwrap();
    src.wait_ready(Duration::from_secs(30)).unwrap();
    let refused = |r: &serde_json::Value, what: &str| {
        assert_eq!(r["result"], "error", "{what}: {r}");
        assert!(
            r["error"].as_str().unwrap_or("").contains("refused: "),
            "{what}: {r}"
        );
    };

    // A "destination" that accepts and never answers: the first migration
    // waits in its handshake (10 s io_timeout) while we try a second one.
    let hold = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hold_ep = format!("tcp:{}", hold.local_addr().unwrap());
    let src_ref = &src;
    std::thread::scope(|s| {
        let first = s.spawn(|| src_ref.api(&json!({"cmd":"migrate","to": hold_ep}), |_| {}));
        let (conn, _) = hold.accept().unwrap();
        // Wait until the first request is inside the engine.
        let deadline = Instant::now() + Duration::from_secs(10);
        while src_ref.api(&json!({"cmd":"status"}), |_| {}).unwrap()["migration"] != "migrating" {
            assert!(
                Instant::now() < deadline,
                "the first migration did not start"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let r = src_ref
            .api(&json!({"cmd":"migrate","to": hold_ep}), |_| {})
            .unwrap();
        refused(&r, "a second migrate");
        let r = src_ref.api(&json!({"cmd":"pause"}), |_| {}).unwrap();
        refused(&r, "pause during a migration");
        drop(conn);
        let r = first.join().unwrap().unwrap();
        assert_eq!(r["result"], "error", "{r}");
    });
    // That one failed safely: commands pass again.
    let r = src.api(&json!({"cmd":"pause"}), |_| {}).unwrap();
    assert_eq!(r["result"], "ok", "{r}");
    let r = src.api(&json!({"cmd":"resume"}), |_| {}).unwrap();
    assert_eq!(r["result"], "ok", "{r}");

    // A resume sent when the source says it paused for the stop-and-copy
    // (it may be handled after the switchover: refused either way).
    let (dst, ep) = start_destination(&dir, "dst", &[]).unwrap();
    let mut during = None;
    let r = src
        .api(
            &json!({"cmd":"migrate","to": ep, "keep_source": true}),
            |ev| {
                if ev["event"] == "paused" && during.is_none() {
                    during = Some(src_ref.api(&json!({"cmd":"resume"}), |_| {}).unwrap());
                }
            },
        )
        .unwrap();
    assert_eq!(r["result"], "ok", "{r}");
    refused(
        &during.expect("no paused event"),
        "resume during stop-and-copy",
    );
    for cmd in ["resume", "pause"] {
        let r = src.api(&json!({"cmd": cmd}), |_| {}).unwrap();
        refused(&r, &format!("{cmd} after the success"));
    }
    let r = src.api(&json!({"cmd":"migrate","to": ep}), |_| {}).unwrap();
    refused(&r, "migrate after the success");
    drop(dst);
}
