//! Guest memory in memfds (`refvmm --memory-backend memfd`, issue 18): a
//! remote (TCP) migration of a memfd-backed guest that writes pages for the
//! first time during the migration (`fresh=1`) leaves the destination's
//! memory identical to the source's and the guest sees no CORRUPT page —
//! from memfd to memfd, from memfd to anonymous memory, and from anonymous
//! memory to memfd.

mod common;

use std::time::Duration;

use livemig_suite::harness::{
    log_of, migrate, scratch_dir, start_destination, start_source_with, Vmm,
};
use serde_json::{json, Value};

const CMDLINE: &str = "ws=32 rate=20 pattern=rand fresh=1";

fn backend_args(memfd: bool) -> Vec<&'static str> {
    if memfd {
        vec!["--memory-backend", "memfd"]
    } else {
        vec![]
    }
}

/// Whether the process maps a memfd made for guest memory.
fn maps_guest_memfd(v: &Vmm) -> bool {
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", v.pid())).unwrap_or_default();
    maps.lines().any(|l| l.contains("/memfd:livemig-guest-ram"))
}

fn hashes(v: &Vmm) -> Value {
    let r = v.api(&json!({"cmd": "memory-hash"}), |_| {}).unwrap();
    assert_eq!(r["result"], "ok", "{r}");
    r["regions"].clone()
}

fn name(memfd: bool) -> &'static str {
    if memfd {
        "memfd"
    } else {
        "anonymous"
    }
}

/// Migrates a dirtying, page-creating guest from a source with `src_memfd`
/// memory to a destination with `dst_memfd` memory over TCP; both paused
/// after the final round, their memory must hash the same, and the resumed
/// guest must find no CORRUPT page.
fn migrate_backends(src_memfd: bool, dst_memfd: bool) {
    let what = format!("{} -> {} over TCP", name(src_memfd), name(dst_memfd));
    let dir = scratch_dir("memfd");
    let mut src =
        start_source_with(&dir, "src", "256M", 1, CMDLINE, &backend_args(src_memfd)).unwrap();
    assert_eq!(
        maps_guest_memfd(&src),
        src_memfd,
        "{what}: the source's guest memory is not what was asked for"
    );
    src.wait_ready(Duration::from_secs(30)).unwrap();
    src.wait_heartbeats(500, Duration::from_secs(30)).unwrap();
    let mut dst_args = backend_args(dst_memfd);
    dst_args.push("--start-paused");
    let (mut dst, ep) = start_destination(&dir, "dst", &dst_args).unwrap();
    let report = migrate(
        &src,
        &ep,
        json!({"keep_source": true, "downtime_limit_ms": 50}),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{what}: {e}\nsource:\n{}\ndestination:\n{}",
            src.stderr(),
            dst.stderr()
        )
    });
    assert_eq!(report["status"], "completed", "{what}: {report}");
    dst.wait_api(Duration::from_secs(10)).unwrap();
    assert_eq!(
        maps_guest_memfd(&dst),
        dst_memfd,
        "{what}: the destination's guest memory is not what was asked for"
    );
    assert_eq!(
        hashes(&src),
        hashes(&dst),
        "{what}: memory differs between source and destination"
    );
    let r = dst.api(&json!({"cmd": "resume"}), |_| {}).unwrap();
    assert_eq!(r["result"], "ok", "{r}");
    dst.wait_heartbeats(1000, Duration::from_secs(30)).unwrap();
    let status = dst.query_status(Duration::from_secs(10)).unwrap();
    assert!(
        log_of(&dst).corrupt.is_empty(),
        "{what}: destination CORRUPT {:?}",
        log_of(&dst).corrupt
    );
    assert_eq!(status.corrupt, 0, "{what}: {status:?}");
    assert!(!log_of(&dst).ready, "{what}: the guest rebooted");
    eprintln!(
        "{what}: 0 CORRUPT, memory identical; downtime {} ms ({}), {} pages sent",
        report["downtime_ms"], report["downtime_breakdown"], report["pages_sent"]
    );
    let _ = src.api(&json!({"cmd": "quit"}), |_| {});
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn memfd_to_memfd_over_tcp() {
    let Some(_kvm) = common::kvm_or_skip("memfd_to_memfd_over_tcp") else {
        return;
    };
    migrate_backends(true, true);
}

#[test]
fn memfd_to_anonymous_over_tcp() {
    let Some(_kvm) = common::kvm_or_skip("memfd_to_anonymous_over_tcp") else {
        return;
    };
    migrate_backends(true, false);
}

#[test]
fn anonymous_to_memfd_over_tcp() {
    let Some(_kvm) = common::kvm_or_skip("anonymous_to_memfd_over_tcp") else {
        return;
    };
    migrate_backends(false, true);
}
