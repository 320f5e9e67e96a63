//! Release-to-release compatibility (issue 18): a running, memory-dirtying
//! guest live-migrated from the previous release's refvmm to the current
//! build, and from the current build back to the previous release, over TCP
//! and over a Unix socket, with 0 CORRUPT; over TCP also with 2 vCPUs (one
//! parked), 4 page streams and compression.
//!
//! The previous release is v0.1.0 = commit 103a41c (see
//! `.ci/build-prev-refvmm`, which builds it). These tests are `#[ignore]`d
//! because they need that binary: `bash .ci/compat` builds it and runs them
//! (a step of `.ci/run`); by hand:
//!
//! ```sh
//! LIVEMIG_PREV_REFVMM=$(bash .ci/build-prev-refvmm) \
//!     cargo test --test compat -- --ignored
//! ```
//!
//! The guest is the test guest of whichever side boots it, with options both
//! releases know (`ws=`, `rate=`, `pattern=`).

mod common;

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use livemig_suite::harness::{blackout, log_of, migrate, refvmm_path, scratch_dir, Blackout, Vmm};
use serde_json::{json, Value};

/// The previous release, for messages.
const PREV: &str = "v0.1.0 (103a41c)";

/// Options both releases' test guests understand.
const CMDLINE: &str = "ws=32 rate=20 pattern=rand";

/// Which refvmm runs a side of the migration.
#[derive(Clone, Copy)]
enum Release {
    /// The previous release, built by `.ci/build-prev-refvmm`.
    Prev,
    /// This tree.
    Current,
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Release::Prev => write!(f, "previous release {PREV}"),
            Release::Current => write!(f, "current build"),
        }
    }
}

impl Release {
    fn binary(self) -> PathBuf {
        match self {
            Release::Current => refvmm_path(),
            Release::Prev => match std::env::var_os("LIVEMIG_PREV_REFVMM") {
                Some(p) => PathBuf::from(p),
                None => panic!(
                    "LIVEMIG_PREV_REFVMM is not set: build the previous release with \
                     `bash .ci/build-prev-refvmm` (it prints the binary's path) and set it, \
                     or run `bash .ci/compat`"
                ),
            },
        }
    }

    fn spawn(self, name: &str, args: &[String], api: PathBuf) -> Vmm {
        let bin = self.binary();
        assert!(
            bin.exists(),
            "{self}: refvmm binary {} does not exist",
            bin.display()
        );
        Vmm::spawn_binary(name, &bin, &[], args, api).unwrap_or_else(|e| panic!("{self}: {e}"))
    }
}

#[derive(Clone, Copy)]
enum Transport {
    Tcp,
    Unix,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "TCP",
            Transport::Unix => "a Unix socket",
        })
    }
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Both VMMs' stderr, for failure messages.
fn stderrs(src: &Vmm, dst: &Vmm) -> String {
    format!(
        "--- source stderr ---\n{}--- destination stderr ---\n{}",
        src.stderr(),
        dst.stderr()
    )
}

/// Boots the test guest on `from`, migrates it to `to` over `transport`
/// while it dirties memory, and checks that it carries on there with 0
/// CORRUPT. Every failure names the direction.
/// How the migration runs, beyond the defaults.
#[derive(Clone, Copy)]
struct Options {
    /// vCPUs (the test guest without `smp=` leaves the others parked).
    vcpus: u32,
    /// Page streams asked for (`migrate` API `streams`).
    streams: u32,
    /// LZ4-compressed page frames.
    compress: bool,
}

const PLAIN: Options = Options {
    vcpus: 1,
    streams: 1,
    compress: false,
};

/// Every option both releases have, at once.
const EVERYTHING: Options = Options {
    vcpus: 2,
    streams: 4,
    compress: true,
};

impl fmt::Display for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} vCPU(s), {} page stream(s)", self.vcpus, self.streams)?;
        if self.compress {
            f.write_str(", compressed")?;
        }
        Ok(())
    }
}

fn migrate_across(from: Release, to: Release, transport: Transport) {
    migrate_with(from, to, transport, PLAIN);
}

fn migrate_with(from: Release, to: Release, transport: Transport, opts: Options) {
    let what = format!("{from} -> {to} over {transport}, {opts}");
    let dir = scratch_dir("compat");
    let src_api = dir.join("src.sock");
    let mut src = from.spawn(
        "src",
        &strings(&[
            "run",
            "--memory",
            "256M",
            "--kernel",
            "builtin:testguest",
            "--cmdline",
            CMDLINE,
            "--vcpus",
            &opts.vcpus.to_string(),
            "--api-socket",
            &src_api.to_string_lossy(),
        ]),
        src_api,
    );
    src.wait_api(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{what}: source: {e}"));
    src.wait_ready(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{what}: source: {e}"));
    src.wait_for("a T line", Duration::from_secs(30), |g| {
        !g.tlines.is_empty()
    })
    .unwrap_or_else(|e| panic!("{what}: source: {e}"));

    let listen = match transport {
        Transport::Tcp => "tcp:127.0.0.1:0".to_string(),
        Transport::Unix => format!("unix:{}", dir.join("migrate.sock").display()),
    };
    let dst_api = dir.join("dst.sock");
    let mut dst = to.spawn(
        "dst",
        &strings(&[
            "receive",
            "--listen",
            &listen,
            "--api-socket",
            &dst_api.to_string_lossy(),
        ]),
        dst_api,
    );
    let ep = dst
        .listen_endpoint(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{what}: destination: {e}"));

    let t0 = Instant::now();
    let report = match migrate(
        &src,
        &ep,
        json!({
            "downtime_limit_ms": 50,
            "streams": opts.streams,
            "compress": opts.compress,
        }),
    ) {
        Ok(r) => r,
        Err(e) => panic!(
            "{what}: MIGRATION FAILED in phase {}: {}\n{}",
            e["phase"],
            e["error"],
            stderrs(&src, &dst)
        ),
    };
    assert_eq!(
        report["status"],
        "completed",
        "{what}: report {report}\n{}",
        stderrs(&src, &dst)
    );
    assert_eq!(
        report["streams"], opts.streams,
        "{what}: the page streams used (the source's report) are not the ones asked for: {report}"
    );
    let st = src.wait_exit(Duration::from_secs(10));
    assert!(
        st.is_some_and(|s| s.success()),
        "{what}: the source did not exit 0 after the hand-over ({st:?})\n{}",
        stderrs(&src, &dst)
    );
    dst.wait_for(
        "a T line on the destination",
        Duration::from_secs(30),
        |g| !g.tlines.is_empty(),
    )
    .unwrap_or_else(|e| panic!("{what}: the guest does not run on the destination: {e}"));
    dst.wait_heartbeats(500, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = dst
        .query_status(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{what}: no STATUS answer on the destination: {e}"));

    check_continuation(&src, &dst, &what);
    assert_eq!(
        status.corrupt, 0,
        "{what}: the guest counted CORRUPT pages: {status:?}"
    );
    let b = blackout(&log_of(&src), &log_of(&dst), t0);
    print_result(&what, &report, b);
    let _ = std::fs::remove_dir_all(dir);
}

/// No CORRUPT on either side, no reboot, counters continued.
fn check_continuation(src: &Vmm, dst: &Vmm, what: &str) {
    common::assert_no_corruption(src, dst, what);
    let s = log_of(src);
    let d = log_of(dst);
    let (Some(last_src), Some(first_dst)) = (s.tlines.last(), d.tlines.first()) else {
        panic!("{what}: missing T lines");
    };
    assert!(
        first_dst.heartbeats > last_src.heartbeats
            && first_dst.pages_written >= last_src.pages_written,
        "{what}: the guest's counters did not continue: source {last_src:?} destination {first_dst:?}"
    );
}

fn print_result(what: &str, report: &Value, b: Option<Blackout>) {
    eprintln!(
        "{what}: ok, 0 CORRUPT; downtime {} ms, total {} ms, switchover gap {}",
        report["downtime_ms"],
        report["total_ms"],
        b.map_or("?".into(), |b| format!(
            "{:.2} ms",
            b.switchover_gap.as_secs_f64() * 1e3
        ))
    );
}

#[test]
#[ignore = "needs the previous release's refvmm: bash .ci/compat"]
fn prev_to_current_over_tcp() {
    let Some(_kvm) = common::kvm_or_skip("prev_to_current_over_tcp") else {
        return;
    };
    migrate_across(Release::Prev, Release::Current, Transport::Tcp);
}

#[test]
#[ignore = "needs the previous release's refvmm: bash .ci/compat"]
fn current_to_prev_over_tcp() {
    let Some(_kvm) = common::kvm_or_skip("current_to_prev_over_tcp") else {
        return;
    };
    migrate_across(Release::Current, Release::Prev, Transport::Tcp);
}

#[test]
#[ignore = "needs the previous release's refvmm: bash .ci/compat"]
fn prev_to_current_over_unix_socket() {
    let Some(_kvm) = common::kvm_or_skip("prev_to_current_over_unix_socket") else {
        return;
    };
    migrate_across(Release::Prev, Release::Current, Transport::Unix);
}

#[test]
#[ignore = "needs the previous release's refvmm: bash .ci/compat"]
fn current_to_prev_over_unix_socket() {
    let Some(_kvm) = common::kvm_or_skip("current_to_prev_over_unix_socket") else {
        return;
    };
    migrate_across(Release::Current, Release::Prev, Transport::Unix);
}

#[test]
#[ignore = "needs the previous release's refvmm: bash .ci/compat"]
fn prev_to_current_with_every_option_both_have() {
    let Some(_kvm) = common::kvm_or_skip("prev_to_current_with_every_option_both_have") else {
        return;
    };
    migrate_with(Release::Prev, Release::Current, Transport::Tcp, EVERYTHING);
}

#[test]
#[ignore = "needs the previous release's refvmm: bash .ci/compat"]
fn current_to_prev_with_every_option_both_have() {
    let Some(_kvm) = common::kvm_or_skip("current_to_prev_with_every_option_both_have") else {
        return;
    };
    migrate_with(Release::Current, Release::Prev, Transport::Tcp, EVERYTHING);
}
