//! Live migration between two processes of examples/minivmm, the second VMM
//! that embeds livemig through its public API only (issue 15): its own
//! memfd memory, single-vCPU loop and serial port. In each dirty-tracking
//! mode minivmm offers, an idle guest (which verifies every page, written or
//! not) and a dirtying one (`ws=32 rate=10 fresh=1`) move and carry on with
//! no `CORRUPT` line and with their counters continuing.
//!
//! The binary is `target/<profile>/examples/minivmm` (`cargo test` builds
//! the examples; with `cargo test --test minivmm` build it first:
//! `cargo build --example minivmm`), or `$MINIVMM`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use livemig_suite::harness::{log_of, scratch_dir, Vmm};

const WAIT: Duration = Duration::from_secs(60);

fn minivmm_path() -> PathBuf {
    if let Some(p) = std::env::var_os("MINIVMM") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join("examples").join("minivmm");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --example minivmm` (or `cargo test`, which builds the examples)",
        p.display()
    );
    p
}

fn spawn(name: &str, dir: &std::path::Path, args: &[&str]) -> Vmm {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    Vmm::spawn_binary(
        name,
        &minivmm_path(),
        &[],
        &args,
        dir.join(format!("{name}.unused")),
    )
    .unwrap()
}

/// The report a source prints after a successful migration.
fn source_report(src: &Vmm) -> serde_json::Value {
    let err = src.stderr();
    let line = err
        .lines()
        .find_map(|l| l.strip_prefix("minivmm: migrated: "))
        .unwrap_or_else(|| panic!("no report from the source; stderr:\n{err}"));
    serde_json::from_str(line).unwrap()
}

/// Migrates a guest started with `cmdline` from one minivmm to another
/// with dirty tracking `mode` (minivmm's `--dirty-log` and its options), and
/// checks that it carried on intact and that the engine used `tracker`.
/// Returns the source's stderr.
fn migrate(mode: &[&str], tracker: &str, cmdline: &str, what: &str) -> String {
    let Some(_kvm) = common::kvm_or_skip(what) else {
        return String::new();
    };
    let dir = scratch_dir("minivmm");
    let ep = format!("unix:{}", dir.join("migration.sock").display());
    let dst = spawn("dst", &dir, &["receive", "--listen", &ep]);
    assert!(
        dst.wait_stderr("minivmm: listening on", WAIT),
        "{what}: destination never listened; stderr:\n{}",
        dst.stderr()
    );
    let mut args = vec!["run", "--cmdline", cmdline, "--dirty-log"];
    args.extend_from_slice(mode);
    args.extend_from_slice(&[
        "--migrate-to",
        &ep,
        "--downtime-limit-ms",
        "50",
        // Slows round 0 down (about 0.3 s for 32 MiB), so the dirtying
        // guest dirties pages the tracker must report.
        "--max-bandwidth",
        "100",
    ]);
    let mut src = spawn("src", &dir, &args);
    src.wait_ready(WAIT).unwrap();
    src.wait_for("a T line", WAIT, |g| !g.tlines.is_empty())
        .unwrap();
    // A line on stdin starts the migration.
    src.console_write("migrate\n").unwrap();
    // A source whose migration failed keeps running its guest: stop
    // waiting as soon as it says so.
    let deadline = std::time::Instant::now() + WAIT;
    let st = loop {
        if let Some(st) = src.wait_exit(Duration::from_millis(100)) {
            break st;
        }
        let failed = src.stderr().contains("minivmm: migration failed");
        assert!(
            !failed && std::time::Instant::now() < deadline,
            "{what}: the source did not hand the guest over; its stderr:\n{}\ndestination stderr:\n{}",
            src.stderr(),
            dst.stderr()
        );
    };
    assert!(
        st.success(),
        "{what}: source exit {st}; stderr:\n{}",
        src.stderr()
    );
    let report = source_report(&src);
    assert_eq!(report["status"], "completed", "{what}: {report}");
    assert_eq!(report["dirty_tracking"], tracker, "{what}: {report}");

    let mut dst = dst;
    let last_src = *log_of(&src).tlines.last().expect("source T line");
    dst.wait_for("two T lines", WAIT, |g| g.tlines.len() >= 2)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    common::assert_no_corruption(&src, &dst, what);
    let (s, d) = (log_of(&src), log_of(&dst));
    let (first, second) = (d.tlines[0], d.tlines[1]);
    assert!(
        first.heartbeats > last_src.heartbeats && first.pages_written >= last_src.pages_written,
        "{what}: counters did not continue: source {last_src:?}, destination {first:?}"
    );
    // Exact continuity: every heartbeat prints one `.` and counts one, so
    // the source's dots plus the destination's dots before its first `T`
    // line are that line's count. Memory or vCPU state older than the
    // pause (a lost dirty page, a lost register) or a repeated `out` of a
    // dot (the pause rule broken) changes the sum.
    let (src_dots, dst_dots) = (dots(&s.raw, None), dots(&d.raw, Some(b"\nT ")));
    assert_eq!(
        src_dots + dst_dots,
        first.heartbeats,
        "{what}: heartbeats did not continue exactly: {src_dots} on the source, {dst_dots} on the \
         destination before its first T line {first:?}"
    );
    assert!(
        second.pages_verified > first.pages_verified,
        "{what}: the destination guest stopped verifying: {first:?} then {second:?}"
    );
    let rounds = report["rounds"].as_array().map_or(0, Vec::len);
    if cmdline.contains("rate=10") {
        assert!(
            second.pages_written > first.pages_written,
            "{what}: the destination guest stopped writing: {first:?} then {second:?}"
        );
    }
    eprintln!(
        "{what}: downtime {} ms, {rounds} rounds, {} final pages",
        report["downtime_ms"], report["final_pages"]
    );
    src.stderr()
}

/// The heartbeat dots in a guest's output, up to the first `until`.
fn dots(raw: &[u8], until: Option<&[u8]>) -> u64 {
    let end = until
        .and_then(|u| raw.windows(u.len()).position(|w| w == u))
        .unwrap_or(raw.len());
    raw[..end].iter().filter(|b| **b == b'.').count() as u64
}

const IDLE: &str = "ws=32";
const DIRTY: &str = "ws=32 rate=10 fresh=1";
const CLASSIC: &[&str] = &["classic"];
const MANUAL: &[&str] = &["manual"];
/// The smallest ring, so the dirtying guest (10 pages per heartbeat, for
/// the whole migration) fills it: the vCPU loop's
/// `KVM_EXIT_DIRTY_RING_FULL` path runs.
const RING: &[&str] = &["ring", "--ring-entries", "256"];
const RING_TRACKER: &str = "dirty ring, 256 entries per vCPU";

#[test]
fn minivmm_idle_classic() {
    migrate(CLASSIC, "get-dirty-log", IDLE, "minivmm_idle_classic");
}

#[test]
fn minivmm_dirtying_classic() {
    migrate(CLASSIC, "get-dirty-log", DIRTY, "minivmm_dirtying_classic");
}

#[test]
fn minivmm_idle_manual_protect() {
    let what = "minivmm_idle_manual_protect";
    migrate(MANUAL, "manual-protect, chunked clear", IDLE, what);
}

#[test]
fn minivmm_dirtying_manual_protect() {
    let what = "minivmm_dirtying_manual_protect";
    migrate(MANUAL, "manual-protect, chunked clear", DIRTY, what);
}

#[test]
fn minivmm_idle_ring() {
    migrate(RING, RING_TRACKER, IDLE, "minivmm_idle_ring");
}

#[test]
fn minivmm_dirtying_ring() {
    let err = migrate(RING, RING_TRACKER, DIRTY, "minivmm_dirtying_ring");
    if err.is_empty() {
        return; // skipped: no KVM
    }
    let exits: u64 = err
        .lines()
        .find_map(|l| l.strip_prefix("minivmm: dirty ring full exits: "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no ring-full count; stderr:\n{err}"));
    assert!(exits > 0, "the dirty ring never filled; stderr:\n{err}");
}

/// A destination with another memory size refuses in the handshake; the
/// source's guest keeps running there, intact.
#[test]
fn minivmm_refuses_other_memory_size() {
    let what = "minivmm_refuses_other_memory_size";
    let Some(_kvm) = common::kvm_or_skip(what) else {
        return;
    };
    let dir = scratch_dir("minivmm");
    let ep = format!("unix:{}", dir.join("migration.sock").display());
    let mut dst = spawn("dst", &dir, &["receive", "--listen", &ep, "--memory", "64"]);
    assert!(
        dst.wait_stderr("minivmm: listening on", WAIT),
        "{}",
        dst.stderr()
    );
    let args = ["run", "--cmdline", DIRTY, "--migrate-to", &ep];
    let mut src = spawn("src", &dir, &args);
    src.wait_ready(WAIT).unwrap();
    src.console_write("migrate\n").unwrap();
    assert!(
        src.wait_stderr("minivmm: migration failed", WAIT),
        "{what}: {}",
        src.stderr()
    );
    let err = src.stderr();
    assert!(err.contains("memory layout differs"), "{what}: {err}");
    let st = dst.wait_exit(WAIT).expect("the destination exits");
    assert_eq!(st.code(), Some(1), "{what}: {}", dst.stderr());
    // The source's guest runs on: two more T lines, nothing corrupt.
    let seen = log_of(&src).tlines.len();
    src.wait_for("two more T lines", WAIT, |g| g.tlines.len() >= seen + 2)
        .unwrap();
    let s = log_of(&src);
    assert!(s.corrupt.is_empty(), "{what}: CORRUPT {:?}", s.corrupt);
    let n = s.tlines.len();
    assert!(s.tlines[n - 1].pages_written > s.tlines[n - 2].pages_written);
}
