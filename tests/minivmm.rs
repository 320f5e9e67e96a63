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
/// with dirty tracking `mode`, and checks that it carried on intact.
fn migrate(mode: &str, tracker: &str, cmdline: &str, what: &str) {
    let Some(_kvm) = common::kvm_or_skip(what) else {
        return;
    };
    let dir = scratch_dir("minivmm");
    let ep = format!("unix:{}", dir.join("migration.sock").display());
    let dst = spawn("dst", &dir, &["receive", "--listen", &ep]);
    assert!(
        dst.wait_stderr("minivmm: listening on", WAIT),
        "{what}: destination never listened; stderr:\n{}",
        dst.stderr()
    );
    let args = [
        "run",
        "--cmdline",
        cmdline,
        "--dirty-log",
        mode,
        "--migrate-to",
        &ep,
        "--downtime-limit-ms",
        "50",
    ];
    let mut src = spawn("src", &dir, &args);
    src.wait_ready(WAIT).unwrap();
    src.wait_for("a T line", WAIT, |g| !g.tlines.is_empty())
        .unwrap();
    // A line on stdin starts the migration.
    src.console_write("migrate\n").unwrap();
    let st = src.wait_exit(WAIT).unwrap_or_else(|| {
        panic!(
            "{what}: the source did not exit; its stderr:\n{}\ndestination stderr:\n{}",
            src.stderr(),
            dst.stderr()
        )
    });
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
    let (s, d) = (log_of(&src), log_of(&dst));
    assert!(
        s.corrupt.is_empty(),
        "{what}: source CORRUPT {:?}",
        s.corrupt
    );
    assert!(
        d.corrupt.is_empty(),
        "{what}: destination CORRUPT {:?}",
        d.corrupt
    );
    assert!(!d.ready, "{what}: the destination guest rebooted (READY)");
    let (first, second) = (d.tlines[0], d.tlines[1]);
    assert!(
        first.heartbeats > last_src.heartbeats && first.pages_written >= last_src.pages_written,
        "{what}: counters did not continue: source {last_src:?}, destination {first:?}"
    );
    assert!(
        second.pages_verified > first.pages_verified,
        "{what}: the destination guest stopped verifying: {first:?} then {second:?}"
    );
    if cmdline.contains("rate=10") {
        assert!(
            second.pages_written > first.pages_written,
            "{what}: the destination guest stopped writing: {first:?} then {second:?}"
        );
    }
    eprintln!(
        "{what}: downtime {} ms, {} rounds",
        report["downtime_ms"],
        report["rounds"].as_array().map_or(0, Vec::len)
    );
}

const IDLE: &str = "ws=32";
const DIRTY: &str = "ws=32 rate=10 fresh=1";

#[test]
fn minivmm_idle_classic() {
    migrate("classic", "get-dirty-log", IDLE, "minivmm_idle_classic");
}

#[test]
fn minivmm_dirtying_classic() {
    migrate(
        "classic",
        "get-dirty-log",
        DIRTY,
        "minivmm_dirtying_classic",
    );
}

#[test]
fn minivmm_idle_manual_protect() {
    migrate(
        "manual",
        "manual-protect, chunked clear",
        IDLE,
        "minivmm_idle_manual_protect",
    );
}

#[test]
fn minivmm_dirtying_manual_protect() {
    migrate(
        "manual",
        "manual-protect, chunked clear",
        DIRTY,
        "minivmm_dirtying_manual_protect",
    );
}

#[test]
fn minivmm_idle_ring() {
    migrate(
        "ring",
        "dirty ring, 4096 entries per vCPU",
        IDLE,
        "minivmm_idle_ring",
    );
}

#[test]
fn minivmm_dirtying_ring() {
    migrate(
        "ring",
        "dirty ring, 4096 entries per vCPU",
        DIRTY,
        "minivmm_dirtying_ring",
    );
}
