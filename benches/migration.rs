//! Live-migration benchmarks on real KVM: guest-observed switchover gap and
//! blackout, engine downtime and its breakdown, total time, bytes, rounds —
//! next to the physical limits (memcpy and loopback TCP bandwidth) measured
//! in the same run.
//!
//! `cargo bench --bench migration` (full: 8 minutes on 2 mostly quiet cores,
//! 12 when busy, of which 2.5–4.5 are the QEMU side by side);
//! `LIVEMIG_BENCH_QUICK=1 cargo bench --bench migration` (a few scenarios).
//!
//! When `qemu-system-x86_64` is installed (or `$QEMU` names it), the same
//! run also migrates the same guest image between two QEMU processes and
//! compares (see `docs/benchmarks.md`). `LIVEMIG_BENCH_QEMU=0` skips that,
//! `LIVEMIG_BENCH_QEMU=only` runs only that; `LIVEMIG_BENCH_QEMU_RUNS=N`
//! sets the runs per (scenario, limit, VMM) (default 5, quick mode 3),
//! `LIVEMIG_BENCH_QEMU_SCENARIOS=idle-1G,written1G-64G` runs only those,
//! `LIVEMIG_BENCH_KEEP=<dir>` keeps refvmm's reports there.
//!
//! The vCPU scenario migrates an idle 512 MiB guest with 1, 8, 32 and 64
//! vCPUs (5 runs each, quick mode 3, `LIVEMIG_BENCH_VCPU_RUNS=N` sets it)
//! and prints the engine's downtime, its estimate and both broken down per
//! part; `LIVEMIG_BENCH_VCPUS=0` skips it, `LIVEMIG_BENCH_VCPUS=only` runs
//! only it.
//!
//! The shaped-links group (`benches/migration/shaped_links.rs`) migrates
//! an idle and a dirtying guest, refvmm and QEMU, between two network
//! namespaces joined by a shaped link (1 Gbit/s with 2 ms RTT, 10 Gbit/s
//! with 0.5 ms RTT); `LIVEMIG_BENCH_LINKS=0` skips it, `=only` runs only
//! it, `LIVEMIG_BENCH_LINK_RUNS=N` sets its runs per configuration.
//!
//! A failed measurement never becomes a number: a run whose heartbeats
//! cannot tell the switchover gap (a side without heartbeats, the
//! destination's first heartbeat arriving before the source's last, no
//! noise floor) or whose migration failed stops the criterion scenarios
//! (summary written, then a panic: criterion cannot leave an iteration out)
//! and is left out of every median and listed under "Failed runs" in the
//! side by side and the vCPU table.
//! Results: criterion's report (the timed value is the **switchover gap** as
//! the guest's heartbeats show it, not wall time), plus
//! `target/livemig-bench/summary.{md,json}` and `downtime-vs-dirty-rate.svg`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use livemig_suite::harness::{
    guest_switchover_gap, log_of, migrate, refvmm_path, scratch_dir, start_destination,
    start_source, switchover_gaps, GuestLog, SwitchoverGaps as Gaps, Vmm,
};
use livemig_suite::qemu::{
    qboot_path, qemu_path, qemu_version, write_guest_image, QemuConfig, QemuMigrateParams, QemuVm,
};
use serde_json::{json, Value};

#[path = "migration/shaped_links.rs"]
mod shaped_links;
use shaped_links::{bench_shaped_links, links_mode};

#[derive(Clone)]
struct Scenario {
    name: &'static str,
    memory: &'static str,
    ws_mib: u64,
    /// Target dirty rate, MB/s (0 = idle).
    rate_mbs: u64,
    pattern: &'static str,
    transport: &'static str,
    max_bandwidth_mib: Option<u64>,
    downtime_limit_ms: u64,
    /// Page streams (`migrate --streams`).
    streams: u32,
    quick: bool,
}

const HB_US: u64 = 200;
/// The side by side's guests report stalls of their main loop above this
/// (`gap=`): the switchover's is the guest-measured gap.
const GAP_US: u64 = 200;

fn scenarios() -> Vec<Scenario> {
    let s = |name, memory, ws_mib, rate_mbs, pattern, quick| Scenario {
        name,
        memory,
        ws_mib,
        rate_mbs,
        pattern,
        transport: "tcp",
        max_bandwidth_mib: None,
        downtime_limit_ms: 10,
        streams: 1,
        quick,
    };
    let mut v = vec![
        s("idle-256M", "256M", 16, 0, "seq", true),
        s("idle-1G", "1G", 16, 0, "seq", true),
        s("idle-4G", "4G", 16, 0, "seq", false),
        s("ws256-50MBs-seq", "1G", 256, 50, "seq", false),
        s("ws256-200MBs-seq", "1G", 256, 200, "seq", true),
        s("ws256-800MBs-seq", "1G", 256, 800, "seq", false),
        s("ws256-50MBs-rand", "1G", 256, 50, "rand", false),
        s("ws256-200MBs-rand", "1G", 256, 200, "rand", false),
        s("ws256-800MBs-rand", "1G", 256, 800, "rand", false),
    ];
    let mut unix = s("ws256-200MBs-seq-unix", "1G", 256, 200, "seq", false);
    unix.transport = "unix";
    v.push(unix);
    let mut two = s("ws256-200MBs-seq-2streams", "1G", 256, 200, "seq", false);
    two.streams = 2;
    v.push(two);
    let mut capped = s(
        "above-bandwidth-200MBs-cap100MiB",
        "1G",
        256,
        200,
        "seq",
        false,
    );
    capped.max_bandwidth_mib = Some(100);
    v.push(capped);
    v
}

/// One measured migration.
#[derive(Clone, Default)]
struct Sample {
    ok: bool,
    error: String,
    switchover_gap_ms: f64,
    blackout_ms: f64,
    noise_floor_ms: f64,
    report: Value,
}

static RESULTS: Mutex<Vec<(String, Sample)>> = Mutex::new(Vec::new());

fn gap_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The guest-observed figures of one migration that ran from `t0` (request
/// sent) to `t1` (the VMM said it completed), the same for refvmm and QEMU;
/// an error (never a number) when the heartbeats cannot tell them.
fn measure_gaps(sl: &GuestLog, dl: &GuestLog, t0: Instant, t1: Instant) -> Result<Gaps, String> {
    switchover_gaps(&sl.heartbeats, &dl.heartbeats, t0, t1)
        .map_err(|e| format!("measurement failed: {e}"))
}

/// Runs one migration of `src`, returns the new source (the destination).
fn one_migration(sc: &Scenario, dir: &std::path::Path, src: Vmm, n: usize) -> (Vmm, Sample) {
    let (mut dst, ep) = if sc.transport == "unix" {
        let path = dir.join(format!("mig{n}.sock"));
        let ep = format!("unix:{}", path.display());
        let api = dir.join(format!("d{n}.sock"));
        let args: Vec<String> = [
            "receive",
            "--listen",
            &ep,
            "--api-socket",
            &api.to_string_lossy(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut v = Vmm::spawn(&format!("d{n}"), &args, api).expect("spawn receiver");
        let ep = v
            .listen_endpoint(Duration::from_secs(20))
            .expect("endpoint");
        (v, ep)
    } else {
        start_destination(dir, &format!("d{n}"), &[]).expect("spawn receiver")
    };
    let mut extra = json!({"downtime_limit_ms": sc.downtime_limit_ms});
    if sc.streams > 1 {
        extra["streams"] = json!(sc.streams);
    }
    if let Some(b) = sc.max_bandwidth_mib {
        extra["max_bandwidth_mib"] = json!(b);
        extra["force"] = json!(true);
        extra["max_rounds"] = json!(10);
    }
    let t0 = Instant::now();
    let r = migrate(&src, &ep, extra);
    let t1 = Instant::now();
    let mut s = Sample::default();
    match r {
        Ok(report) => {
            s.report = report;
            let waited = dst.wait_heartbeats(2000, Duration::from_secs(30));
            let sl = log_of(&src);
            let dl = log_of(&dst);
            match waited.and_then(|_| measure_gaps(&sl, &dl, t0, t1)) {
                Ok(g) => {
                    s.ok = true;
                    s.switchover_gap_ms = gap_ms(g.switchover_gap);
                    s.blackout_ms = gap_ms(g.blackout);
                    s.noise_floor_ms = gap_ms(g.noise_floor);
                }
                Err(e) => s.error = e,
            }
            let bad: Vec<String> = sl
                .corrupt
                .iter()
                .chain(dl.corrupt.iter())
                .cloned()
                .collect();
            assert!(
                bad.is_empty(),
                "{}: the guest saw corruption: {bad:?}",
                sc.name
            );
            drop(sl);
            drop(dl);
            drop(src);
            (dst, s)
        }
        Err(e) => {
            s.error = e.to_string();
            drop(dst);
            (src, s)
        }
    }
}

fn cmdline(sc: &Scenario) -> String {
    let pages_per_s = sc.rate_mbs as f64 * 1e6 / 4096.0;
    let per_hb = (pages_per_s * HB_US as f64 / 1e6).round() as u64;
    format!(
        "ws={} rate={} hb={HB_US} pattern={}",
        sc.ws_mib, per_hb, sc.pattern
    )
}

fn bench_scenarios(c: &mut Criterion) {
    if !livemig_kvm::kvm_available() {
        eprintln!("*** SKIPPED migration benches: /dev/kvm is not available ***");
        return;
    }
    if qemu_mode() == "only" || vcpus_mode() == "only" || links_mode() == "only" {
        eprintln!(
            "*** SKIPPED refvmm scenarios: LIVEMIG_BENCH_QEMU=only, LIVEMIG_BENCH_VCPUS=only or LIVEMIG_BENCH_LINKS=only ***"
        );
        return;
    }
    ensure_refvmm();
    let quick = std::env::var_os("LIVEMIG_BENCH_QUICK").is_some();
    let mut g = c.benchmark_group("switchover_gap");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_millis(1));
    for sc in scenarios().into_iter().filter(|s| !quick || s.quick) {
        let dir = scratch_dir("bench");
        let mut src = start_source(&dir, "s0", sc.memory, 1, &cmdline(&sc)).expect("source");
        src.wait_ready(Duration::from_secs(60)).expect("READY");
        // Let the working set fill before measuring.
        let warm = if sc.rate_mbs > 0 { 3000 } else { 500 };
        src.wait_heartbeats(warm * (1000 / HB_US as usize), Duration::from_secs(60))
            .expect("warm-up");
        let mut holder = Some(src);
        let mut n = 0;
        g.bench_function(sc.name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    let src = holder.take().expect("source VM");
                    let (next, s) = one_migration(&sc, &dir, src, n);
                    holder = Some(next);
                    let (ok, gap, error) = (s.ok, s.switchover_gap_ms, s.error.clone());
                    RESULTS.lock().unwrap().push((sc.name.to_string(), s));
                    if !ok {
                        // Criterion cannot leave an iteration out: a failed
                        // run must not become a time in its statistics.
                        fail_loudly(&format!("{}: run {n}: {error}", sc.name));
                    }
                    total += Duration::from_secs_f64(gap / 1e3);
                }
                total
            })
        });
        drop(holder);
        let _ = std::fs::remove_dir_all(&dir);
    }
    g.finish();
}

/// Stops the bench on a failed measurement: writes the summary so far
/// (which lists the failure) and panics with `what`.
fn fail_loudly(what: &str) -> ! {
    eprintln!("*** FAILED MEASUREMENT: {what}");
    write_summary();
    panic!("failed measurement (not entered into any median): {what}");
}

// ---------------------------------------------------------------------------
// Downtime against the vCPU count: an idle 512 MiB guest with 1, 8, 32 and
// 64 vCPUs (the test guest starts no AP without `smp=`, so all but vCPU 0
// wait for a SIPI inside KVM_RUN, as an idle SMP guest's parked APs do).
// ---------------------------------------------------------------------------

/// vCPU counts of the scenario.
const VCPU_COUNTS: [u32; 4] = [1, 8, 32, 64];

/// One migration of the vCPU scenario.
#[derive(Clone)]
struct VcpuSample {
    vcpus: u32,
    /// The engine's report, or why the run (or its measurement) failed.
    outcome: Result<(Value, Gaps), String>,
}

static VCPU_RESULTS: Mutex<Vec<VcpuSample>> = Mutex::new(Vec::new());

/// `LIVEMIG_BENCH_VCPUS`: unset/`1` = run the vCPU scenario, `0` = skip it,
/// `only` = run only it.
fn vcpus_mode() -> &'static str {
    match std::env::var("LIVEMIG_BENCH_VCPUS").as_deref() {
        Ok("0") | Ok("off") => "off",
        Ok("only") => "only",
        _ => "on",
    }
}

fn bench_vcpus(_c: &mut Criterion) {
    if vcpus_mode() == "off" || links_mode() == "only" || qemu_mode() == "only" {
        eprintln!(
            "*** SKIPPED vCPU scenario: LIVEMIG_BENCH_VCPUS=0, LIVEMIG_BENCH_LINKS=only or LIVEMIG_BENCH_QEMU=only ***"
        );
        return;
    }
    if !livemig_kvm::kvm_available() {
        eprintln!("*** SKIPPED vCPU scenario: /dev/kvm is not available ***");
        return;
    }
    ensure_refvmm();
    let quick = std::env::var_os("LIVEMIG_BENCH_QUICK").is_some();
    let runs = std::env::var("LIVEMIG_BENCH_VCPU_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 3 } else { 5 });
    let cmdline = format!("ws=16 rate=0 hb={HB_US}");
    for vcpus in VCPU_COUNTS {
        let dir = scratch_dir("vcpus");
        let mut src = match start_source(&dir, "s0", "512M", vcpus, &cmdline).and_then(|mut v| {
            v.wait_ready(Duration::from_secs(60))?;
            v.wait_heartbeats(500 * (1000 / HB_US as usize), Duration::from_secs(60))?;
            Ok(v)
        }) {
            Ok(v) => v,
            Err(e) => fail_loudly(&format!("{vcpus} vCPUs: source: {e}")),
        };
        for n in 1..=runs {
            let (mut dst, ep) = start_destination(&dir, &format!("d{n}"), &[])
                .unwrap_or_else(|e| fail_loudly(&format!("{vcpus} vCPUs: destination: {e}")));
            let t0 = Instant::now();
            let r = migrate(&src, &ep, json!({}));
            let t1 = Instant::now();
            let outcome = match r {
                Ok(rep) => {
                    let waited = dst.wait_heartbeats(2000, Duration::from_secs(30));
                    let g = {
                        let (sl, dl) = (log_of(&src), log_of(&dst));
                        waited.and_then(|_| measure_gaps(&sl, &dl, t0, t1))
                    };
                    src = dst;
                    g.map(|g| (rep, g))
                }
                Err(e) => Err(e.to_string()),
            };
            match &outcome {
                Ok((rep, g)) => eprintln!(
                    "{vcpus} vCPUs run {n}: downtime {:.2} ms (expected {:.2}), gap {:.2} ms, noise floor {:.2} ms, breakdown {}, expected breakdown {}",
                    rep["downtime_ms"].as_f64().unwrap_or(f64::NAN),
                    rep["expected_downtime_ms"].as_f64().unwrap_or(f64::NAN),
                    gap_ms(g.switchover_gap),
                    gap_ms(g.noise_floor),
                    rep["downtime_breakdown"],
                    rep["expected_breakdown"]
                ),
                Err(e) => eprintln!("*** {vcpus} vCPUs run {n}: FAILED: {e}"),
            }
            VCPU_RESULTS
                .lock()
                .unwrap()
                .push(VcpuSample { vcpus, outcome });
        }
        drop(src);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The vCPU table (markdown): medians of the successful runs per vCPU
/// count; failed runs are counted and listed, never entered.
fn vcpu_summary() -> Option<String> {
    let results = VCPU_RESULTS.lock().unwrap().clone();
    if results.is_empty() {
        return None;
    }
    let parts = [
        "pause_ms",
        "final_sync_ms",
        "final_memory_ms",
        "state_save_ms",
        "state_transfer_ms",
        "dest_restore_ms",
        "go_hop_ms",
        "dest_resume_ms",
        "resume_ack_ms",
    ];
    let mut md = format!(
        "### Downtime against vCPUs\n\nIdle 512 MiB guest (`ws=16 rate=0 hb={HB_US}`, no `smp=`: vCPU 0 runs, the others wait for a SIPI), loopback TCP, default 20 ms limit; medians of the successful runs. `state_transfer` includes `dest_restore`; the downtime ends when the destination starts the guest (`go_hop` + `dest_resume` after the state; `resume_ack` is `Go` → the source read `Resumed`, beside it).\n\n| vCPUs | runs (ok) | engine downtime ms | expected ms | expected / actual | expected within 25 % | switchover gap ms | noise floor ms | state KB | {} |\n|---|---|---|---|---|---|---|---|{}\n",
        parts.map(|p| p.trim_end_matches("_ms")).join(" | "),
        "---|".repeat(parts.len() + 1)
    );
    let mut failed = Vec::new();
    for vcpus in VCPU_COUNTS {
        let all: Vec<&VcpuSample> = results.iter().filter(|s| s.vcpus == vcpus).collect();
        if all.is_empty() {
            continue;
        }
        let ok: Vec<&(Value, Gaps)> = all.iter().filter_map(|s| s.outcome.as_ref().ok()).collect();
        failed.extend(all.iter().filter_map(|s| {
            s.outcome
                .as_ref()
                .err()
                .map(|e| format!("* {vcpus} vCPUs: {e}"))
        }));
        let m = |f: &dyn Fn(&(Value, Gaps)) -> f64| median(ok.iter().map(|x| f(x)).collect());
        let num = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        let down = m(&|x| num(&x.0["downtime_ms"]));
        let exp = m(&|x| num(&x.0["expected_downtime_ms"]));
        let ratio_of =
            |x: &(Value, Gaps)| num(&x.0["expected_downtime_ms"]) / num(&x.0["downtime_ms"]);
        let ratio = m(&ratio_of);
        let within = ok
            .iter()
            .filter(|x| (ratio_of(x) - 1.0).abs() <= 0.25)
            .count();
        let cols: Vec<String> = parts
            .iter()
            .map(|p| format!("{:.2}", m(&|x| num(&x.0["downtime_breakdown"][*p]))))
            .collect();
        md.push_str(&format!(
            "| {vcpus} | {} ({}) | {down:.2} | {exp:.2} | {ratio:.2} | {within}/{} | {:.2} | {:.2} | {:.0} | {} |\n",
            all.len(),
            ok.len(),
            ok.len(),
            m(&|x| gap_ms(x.1.switchover_gap)),
            m(&|x| gap_ms(x.1.noise_floor)),
            m(&|x| num(&x.0["state_bytes"]) / 1e3),
            cols.join(" | ")
        ));
    }
    if !failed.is_empty() {
        md.push_str("\nFailed runs (not in any median):\n");
        for f in failed {
            md.push_str(&f);
            md.push('\n');
        }
    }
    Some(md)
}

/// Builds the refvmm example (`cargo bench` does not build examples), every
/// time: cargo does nothing when it is up to date, and a binary left from an
/// older checkout would otherwise be measured silently. With `REFVMM=` set,
/// that binary is used as it is.
fn ensure_refvmm() {
    if std::env::var_os("REFVMM").is_some() {
        return;
    }
    let st = std::process::Command::new(env!("CARGO"))
        .args(["build", "--release", "--example", "refvmm"])
        .status()
        .expect("cargo build");
    assert!(
        st.success(),
        "cargo build --release --example refvmm failed"
    );
    assert!(refvmm_path().exists(), "no refvmm at {:?}", refvmm_path());
}

fn memcpy_gbs() -> f64 {
    livemig_suite::limits::memcpy_rate(256 << 20) / 1e9
}

fn tcp_gbs() -> f64 {
    livemig_suite::limits::loopback_tcp_rate(2 << 30) / 1e9
}

/// The median of the figures that are there (NaN = not measured), or NaN.
fn median(v: Vec<f64>) -> f64 {
    let mut v: Vec<f64> = v.into_iter().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn write_summary() {
    let memcpy = memcpy_gbs();
    let tcp = tcp_gbs();
    let results = RESULTS.lock().unwrap().clone();
    let mut names: Vec<String> = results.iter().map(|(n, _)| n.clone()).collect();
    names.dedup();
    let mut md = String::new();
    md.push_str(&format!(
        "Physical limits measured in this run: memcpy {memcpy:.1} GB/s (256 MiB buffers), loopback TCP {tcp:.2} GB/s (one stream).\n\n"
    ));
    md.push_str("| scenario | runs (ok) | switchover gap ms (median) | blackout ms (median / max) | noise floor ms | engine downtime ms | breakdown (sync / mem / state save / state xfer / restore / go + resume) ms | total ms | rounds | MB sent | dirty rate MB/s | rate vs loopback |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let mut rows = Vec::new();
    for n in &names {
        let all: Vec<&Sample> = results
            .iter()
            .filter(|(m, _)| m == n)
            .map(|(_, s)| s)
            .collect();
        let ok: Vec<&Sample> = all.iter().copied().filter(|s| s.ok).collect();
        let f = |sel: &dyn Fn(&Sample) -> f64| median(ok.iter().map(|s| sel(s)).collect());
        let r = |s: &Sample, k: &str| s.report[k].as_f64().unwrap_or(f64::NAN);
        let b = |s: &Sample, k: &str| {
            s.report["downtime_breakdown"][k]
                .as_f64()
                .unwrap_or(f64::NAN)
        };
        let bw = |s: &Sample| {
            let rounds = s.report["rounds"].as_array().cloned().unwrap_or_default();
            let bytes: f64 = rounds
                .iter()
                .map(|x| x["bytes"].as_f64().unwrap_or(0.0))
                .sum();
            let ms: f64 = rounds
                .iter()
                .map(|x| x["duration_ms"].as_f64().unwrap_or(0.0))
                .sum();
            if ms > 0.0 {
                bytes / (ms / 1e3) / 1e9
            } else {
                f64::NAN
            }
        };
        let dirty = |s: &Sample| {
            s.report["rounds"]
                .as_array()
                .and_then(|r| r.last())
                .and_then(|x| x["dirty_rate_mbps"].as_f64())
                .unwrap_or(f64::NAN)
        };
        let row = json!({
            "scenario": n, "runs": all.len(), "ok": ok.len(),
            "switchover_gap_ms": f(&|s| s.switchover_gap_ms),
            "blackout_ms": f(&|s| s.blackout_ms),
            "blackout_max_ms": ok.iter().map(|s| s.blackout_ms).fold(0.0, f64::max),
            "noise_floor_ms": f(&|s| s.noise_floor_ms),
            "downtime_ms": f(&|s| r(s, "downtime_ms")),
            "total_ms": f(&|s| r(s, "total_ms")),
            "rounds": f(&|s| s.report["rounds"].as_array().map_or(0, |x| x.len()) as f64),
            "mb_sent": f(&|s| r(s, "bytes_sent") / 1e6),
            "dirty_rate_mbps": f(&dirty),
            "transfer_gbs": f(&bw),
            "breakdown_ms": [f(&|s| b(s, "final_sync_ms")), f(&|s| b(s, "final_memory_ms")), f(&|s| b(s, "state_save_ms")), f(&|s| b(s, "state_transfer_ms")), f(&|s| b(s, "dest_restore_ms")), f(&|s| b(s, "go_hop_ms") + b(s, "dest_resume_ms"))],
            "errors": all.iter().filter(|s| !s.ok).map(|s| s.error.clone()).collect::<Vec<_>>(),
        });
        let bd = row["breakdown_ms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| format!("{:.2}", x.as_f64().unwrap_or(f64::NAN)))
            .collect::<Vec<_>>()
            .join(" / ");
        md.push_str(&format!(
            "| {} | {} ({}) | {:.2} | {:.2} / {:.2} | {:.2} | {:.2} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} % |\n",
            n, row["runs"], row["ok"],
            row["switchover_gap_ms"].as_f64().unwrap_or(f64::NAN),
            row["blackout_ms"].as_f64().unwrap_or(f64::NAN),
            row["blackout_max_ms"].as_f64().unwrap_or(f64::NAN),
            row["noise_floor_ms"].as_f64().unwrap_or(f64::NAN),
            row["downtime_ms"].as_f64().unwrap_or(f64::NAN),
            bd,
            row["total_ms"].as_f64().unwrap_or(f64::NAN),
            row["rounds"].as_f64().unwrap_or(f64::NAN),
            row["mb_sent"].as_f64().unwrap_or(f64::NAN),
            row["dirty_rate_mbps"].as_f64().unwrap_or(f64::NAN),
            row["transfer_gbs"].as_f64().unwrap_or(f64::NAN) / tcp * 100.0,
        ));
        rows.push(row);
    }
    if names.is_empty() {
        md.push_str("(refvmm scenarios not run in this invocation)\n");
    }
    let cmp = cmp_summary();
    if let Some((cmd, _)) = &cmp {
        md.push('\n');
        md.push_str(cmd);
    }
    if let Some(v) = vcpu_summary() {
        md.push('\n');
        md.push_str(&v);
    }
    let links = shaped_links::summary();
    if let Some((l, _)) = &links {
        md.push('\n');
        md.push_str(l);
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("livemig-bench");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("summary.md"), &md);
    let _ = std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&json!({
            "memcpy_gbs": memcpy,
            "loopback_tcp_gbs": tcp,
            "scenarios": rows,
            "qemu_side_by_side": cmp.map(|(_, r)| json!({
                "qemu": QEMU_INFO.lock().unwrap().clone(),
                "heartbeat_us": HB_US,
                "qemu_max_bandwidth": QEMU_MAX_BANDWIDTH,
                "rows": r,
            })),
            "shaped_links": links.map(|(_, r)| r),
        }))
        .unwrap_or_default(),
    );
    let _ = std::fs::write(out.join("downtime-vs-dirty-rate.svg"), svg(&results));
    println!("\n{md}\nwritten to {}", out.display());
}

/// A small scatter plot: switchover gap (y) against the measured dirty rate (x).
fn svg(results: &[(String, Sample)]) -> String {
    let pts: Vec<(f64, f64)> = results
        .iter()
        .filter(|(_, s)| s.ok)
        .map(|(_, s)| {
            let d = s.report["rounds"]
                .as_array()
                .and_then(|r| r.last())
                .and_then(|x| x["dirty_rate_mbps"].as_f64())
                .unwrap_or(0.0);
            (d, s.switchover_gap_ms)
        })
        .collect();
    let maxx = pts.iter().map(|p| p.0).fold(1.0, f64::max);
    let maxy = pts.iter().map(|p| p.1).fold(1.0, f64::max);
    let mut s = String::from("<svg xmlns='http://www.w3.org/2000/svg' width='640' height='400'><rect width='640' height='400' fill='white'/>");
    s.push_str("<line x1='60' y1='360' x2='620' y2='360' stroke='black'/><line x1='60' y1='20' x2='60' y2='360' stroke='black'/>");
    s.push_str(&format!("<text x='300' y='395' font-size='12'>dirty rate, MB/s (max {maxx:.0})</text><text x='5' y='15' font-size='12'>switchover gap, ms (max {maxy:.1})</text>"));
    for (x, y) in pts {
        s.push_str(&format!(
            "<circle cx='{:.1}' cy='{:.1}' r='3' fill='steelblue'/>",
            60.0 + x / maxx * 560.0,
            360.0 - y / maxy * 340.0
        ));
    }
    s.push_str("</svg>");
    s
}

// ---------------------------------------------------------------------------
// The peer, side by side: the same guest image migrated by QEMU and by refvmm
// in the same run, at the same downtime limit and each at its default.
// ---------------------------------------------------------------------------

/// One side-by-side scenario (the performance issue's QEMU orientation set).
struct CmpScenario {
    name: &'static str,
    memory_mib: u64,
    ws_mib: u64,
    rate_mbs: u64,
    /// The guest writes its working set once, as fast as it can, and then
    /// only verifies it (`rate=max laps=1 fresh=1`), and `rate_mbs` is
    /// unused. The runs of every scenario with a working set start once
    /// every page of it is written; every destination VMM makes its VM
    /// before the source connects (QEMU's always does).
    written: bool,
    quick: bool,
}

fn cmp_scenarios() -> Vec<CmpScenario> {
    let c = |name, memory_mib, ws_mib, rate_mbs, quick| CmpScenario {
        name,
        memory_mib,
        ws_mib,
        rate_mbs,
        written: false,
        quick,
    };
    let all = vec![
        c("idle-1G", 1024, 16, 0, true),
        c("idle-4G", 4096, 16, 0, false),
        c("ws256-100MBs", 1024, 256, 100, true),
        // 1 GiB working set needs 16 MiB + 1 GiB of RAM above 1 MiB.
        c("ws1G-1GBs", 1536, 1024, 1000, false),
        // Issue 16's "idle 64 GiB guest with 1 GiB touched", written.
        CmpScenario {
            written: true,
            ..c("written1G-64G", 65536, 1024, 0, false)
        },
    ];
    // `LIVEMIG_BENCH_QEMU_SCENARIOS=a,b`: only those.
    match std::env::var("LIVEMIG_BENCH_QEMU_SCENARIOS") {
        Ok(only) => all
            .into_iter()
            .filter(|s| only.split(',').any(|n| n == s.name))
            .collect(),
        Err(_) => all,
    }
}

/// A downtime-limit setting: both at the same limit, or each at its default.
#[derive(Clone, Copy)]
struct CmpLimit {
    label: &'static str,
    /// refvmm's `downtime_limit_ms`; `None` = the engine's default (20 ms).
    ours_ms: Option<u64>,
    /// QEMU's `downtime-limit`; `None` = QEMU's default (300 ms).
    qemu_ms: Option<u64>,
}

const CMP_LIMITS: [CmpLimit; 2] = [
    CmpLimit {
        label: "same limit (10 ms)",
        ours_ms: Some(10),
        qemu_ms: Some(10),
    },
    CmpLimit {
        label: "defaults (ours 20 ms, QEMU 300 ms)",
        ours_ms: None,
        qemu_ms: None,
    },
];

/// QEMU's `max-bandwidth` in every run: effectively unlimited (1 TiB/s), as
/// refvmm has no cap by default and libvirt lifts QEMU's 128 MiB/s default.
const QEMU_MAX_BANDWIDTH: u64 = 1 << 40;

/// One side-by-side migration.
#[derive(Clone, Default)]
struct CmpSample {
    ok: bool,
    error: String,
    switchover_gap_ms: f64,
    /// The switchover as the guest's own TSC saw it (its `GAP` line).
    guest_gap_ms: f64,
    blackout_ms: f64,
    noise_floor_ms: f64,
    total_ms: f64,
    downtime_ms: f64,
    mb_sent: f64,
    rounds: f64,
    /// Set-up before pages move: QEMU's `setup-time`, our report's
    /// `setup_ms`.
    setup_ms: f64,
    corrupt: usize,
}

impl CmpSample {
    /// Takes the gaps of a completed migration, or marks the run failed
    /// (it then stays out of every median and is listed under "Failed runs").
    fn apply(&mut self, gaps: Result<(Gaps, Duration), String>) {
        match gaps {
            Ok((g, guest)) => {
                self.ok = true;
                self.guest_gap_ms = gap_ms(guest);
                self.switchover_gap_ms = gap_ms(g.switchover_gap);
                self.blackout_ms = gap_ms(g.blackout);
                self.noise_floor_ms = gap_ms(g.noise_floor);
            }
            Err(e) => self.error = e,
        }
    }
}

/// Picks one figure out of a sample.
type Field = fn(&CmpSample) -> f64;

/// (scenario, limit label, "ours" | "qemu") → samples.
type CmpKey = (String, &'static str, &'static str);

static CMP: Mutex<Vec<(CmpKey, CmpSample)>> = Mutex::new(Vec::new());
static QEMU_INFO: Mutex<Option<String>> = Mutex::new(None);

fn cmp_cmdline(sc: &CmpScenario, tsc_khz: Option<u64>) -> String {
    let per_hb = (sc.rate_mbs as f64 * 1e6 / 4096.0 * HB_US as f64 / 1e6).round() as u64;
    let rate = if sc.written {
        "max laps=1 fresh=1".to_string()
    } else {
        per_hb.to_string()
    };
    let mut c = format!(
        "ws={} rate={rate} hb={HB_US} pattern=seq gap={GAP_US}",
        sc.ws_mib
    );
    if let Some(k) = tsc_khz {
        c.push_str(&format!(" tsc_khz={k}"));
    }
    c
}

/// Both kinds of switchover gap of a side-by-side run: the heartbeats'
/// (stamped by the bench's serial readers) and the guest's own (`GAP`).
fn cmp_gaps(
    sl: &GuestLog,
    dl: &GuestLog,
    t0: Instant,
    t1: Instant,
) -> Result<(Gaps, Duration), String> {
    let g = measure_gaps(sl, dl, t0, t1)?;
    let guest = guest_switchover_gap(dl).map_err(|e| format!("measurement failed: {e}"))?;
    Ok((g, guest))
}

fn cmp_warm_heartbeats(sc: &CmpScenario) -> usize {
    let ms = if sc.rate_mbs > 0 { 3000 } else { 500 };
    ms * (1000 / HB_US as usize)
}

/// Whether a `written` or dirtying scenario's guest wrote its whole working
/// set at least once (its last `T` line says so), so that every run starts
/// from the same steady state; always true for the idle ones.
fn cmp_written(sc: &CmpScenario, g: &GuestLog) -> bool {
    (!sc.written && sc.rate_mbs == 0)
        || g.tlines
            .last()
            .is_some_and(|t| t.pages_written >= sc.ws_mib * 256)
}

/// How long a `written` scenario's guest may take to write its working set.
const CMP_WRITE_TIMEOUT: Duration = Duration::from_secs(180);

/// `LIVEMIG_BENCH_QEMU`: unset/`1` = run the comparison when QEMU is
/// installed, `0` = never, `only` = only the comparison.
fn qemu_mode() -> &'static str {
    match std::env::var("LIVEMIG_BENCH_QEMU").as_deref() {
        Ok("0") | Ok("off") => "off",
        Ok("only") => "only",
        _ => "on",
    }
}

fn cmp_runs() -> usize {
    let quick = std::env::var_os("LIVEMIG_BENCH_QUICK").is_some();
    std::env::var("LIVEMIG_BENCH_QEMU_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(if quick { 3 } else { 5 })
}

fn cmp_record(sc: &CmpScenario, lim: &CmpLimit, vmm: &'static str, s: CmpSample) {
    if !s.ok {
        eprintln!(
            "{} [{}] {vmm}: migration failed: {}",
            sc.name, lim.label, s.error
        );
    } else {
        eprintln!(
            "{} [{}] {vmm}: gap {:.2} ms, blackout {:.2} ms, total {:.0} ms, downtime {:.2} ms, \
             set-up {:.1} ms, {:.0} MB in {} rounds",
            sc.name,
            lim.label,
            s.switchover_gap_ms,
            s.blackout_ms,
            s.total_ms,
            s.downtime_ms,
            s.setup_ms,
            s.mb_sent,
            s.rounds
        );
    }
    CMP.lock()
        .unwrap()
        .push(((sc.name.to_string(), lim.label, vmm), s));
}

/// refvmm's runs of one scenario at `limits`; returns the TSC frequency it
/// passed the guest, for QEMU to pass the same.
fn cmp_ours(sc: &CmpScenario, runs: usize, limits: &[CmpLimit]) -> Option<u64> {
    let dir = scratch_dir("cmp-ours");
    let mem = format!("{}M", sc.memory_mib);
    let mut src = match start_source(&dir, "s0", &mem, 1, &cmp_cmdline(sc, None)) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{}: refvmm source: {e}", sc.name);
            return None;
        }
    };
    if let Err(e) = src
        .wait_ready(Duration::from_secs(60))
        .and_then(|_| src.wait_heartbeats(cmp_warm_heartbeats(sc), Duration::from_secs(60)))
        .and_then(|_| {
            src.wait_for("the working set written", CMP_WRITE_TIMEOUT, |g| {
                cmp_written(sc, g)
            })
        })
    {
        eprintln!("{}: refvmm warm-up: {e}", sc.name);
        return None;
    }
    let tsc_khz = log_of(&src).tsc_khz();
    let mut n = 0;
    for lim in limits {
        for _ in 0..runs {
            n += 1;
            // The destination's VM is built before the migration arrives,
            // as QEMU's (`-m` with `-incoming`) and as an operator's agent
            // does it (`prepare-receive`).
            let prepare = ["--memory", mem.as_str()];
            let (mut dst, ep) = match start_destination(&dir, &format!("d{n}"), &prepare) {
                Ok(x) => x,
                Err(e) => {
                    cmp_record(
                        sc,
                        lim,
                        "ours",
                        CmpSample {
                            error: e,
                            ..Default::default()
                        },
                    );
                    continue;
                }
            };
            let extra = match lim.ours_ms {
                Some(ms) => json!({ "downtime_limit_ms": ms }),
                None => json!({}),
            };
            let t0 = Instant::now();
            let r = migrate(&src, &ep, extra);
            let t1 = Instant::now();
            let mut s = CmpSample::default();
            match r {
                Ok(rep) => {
                    let waited = dst.wait_heartbeats(2000, Duration::from_secs(30));
                    {
                        let sl = log_of(&src);
                        let dl = log_of(&dst);
                        s.apply(waited.and_then(|_| cmp_gaps(&sl, &dl, t0, t1)));
                        s.corrupt = sl.corrupt.len() + dl.corrupt.len();
                    }
                    s.total_ms = rep["total_ms"].as_f64().unwrap_or(f64::NAN);
                    s.downtime_ms = rep["downtime_ms"].as_f64().unwrap_or(f64::NAN);
                    s.mb_sent = rep["bytes_sent"].as_f64().unwrap_or(f64::NAN) / 1e6;
                    s.rounds = rep["rounds"].as_array().map_or(0, |x| x.len()) as f64;
                    s.setup_ms = rep["setup_ms"].as_f64().unwrap_or(f64::NAN);
                    keep_report(
                        &format!("{}-{}-{n}", sc.name, lim.ours_ms.unwrap_or(20)),
                        &rep,
                    );
                    assert_eq!(s.corrupt, 0, "{}: the guest saw corruption", sc.name);
                    src = dst;
                }
                Err(e) => {
                    s.error = e.to_string();
                    drop(dst);
                }
            }
            cmp_record(sc, lim, "ours", s);
        }
    }
    drop(src);
    let _ = std::fs::remove_dir_all(&dir);
    tsc_khz
}

/// With `LIVEMIG_BENCH_KEEP=<dir>`, writes refvmm's migration report to
/// `<dir>/<name>.json` (per-round figures the summary leaves out).
fn keep_report(name: &str, rep: &Value) {
    if let Some(dir) = std::env::var_os("LIVEMIG_BENCH_KEEP") {
        let p = std::path::Path::new(&dir).join(format!("{name}.json"));
        if let Err(e) = std::fs::write(&p, rep.to_string()) {
            eprintln!("LIVEMIG_BENCH_KEEP: {}: {e}", p.display());
        }
    }
}

/// QEMU's runs of one scenario at `limits`.
fn cmp_qemu(
    sc: &CmpScenario,
    runs: usize,
    limits: &[CmpLimit],
    qemu: &std::path::Path,
    tsc_khz: Option<u64>,
) {
    let dir = scratch_dir("cmp-qemu");
    let kernel = match write_guest_image(&dir) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("{}: {e}", sc.name);
            return;
        }
    };
    let cfg = QemuConfig {
        qemu: qemu.to_path_buf(),
        kernel,
        cmdline: cmp_cmdline(sc, tsc_khz),
        memory_mib: sc.memory_mib,
        vcpus: 1,
        bios: qboot_path(),
    };
    let mut src = match QemuVm::start_source(&dir, "qs0", &cfg) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{}: QEMU source: {e}", sc.name);
            return;
        }
    };
    if let Err(e) = src
        .wait_ready(Duration::from_secs(60))
        .and_then(|_| src.wait_heartbeats(cmp_warm_heartbeats(sc), Duration::from_secs(60)))
        .and_then(|_| {
            src.wait_for("the working set written", CMP_WRITE_TIMEOUT, |g| {
                cmp_written(sc, g)
            })
        })
    {
        eprintln!("{}: QEMU warm-up: {e}", sc.name);
        return;
    }
    let mut n = 0;
    for lim in limits {
        for _ in 0..runs {
            n += 1;
            let (mut dst, uri) = match QemuVm::start_destination(&dir, &format!("qd{n}"), &cfg) {
                Ok(x) => x,
                Err(e) => {
                    cmp_record(
                        sc,
                        lim,
                        "qemu",
                        CmpSample {
                            error: e,
                            ..Default::default()
                        },
                    );
                    continue;
                }
            };
            let params = QemuMigrateParams {
                // Always set explicitly: an earlier run on this source may have changed it.
                downtime_limit_ms: Some(lim.qemu_ms.unwrap_or(300)),
                max_bandwidth: Some(QEMU_MAX_BANDWIDTH),
                timeout: Duration::from_secs(30),
                ..Default::default()
            };
            let t0 = Instant::now();
            let r = src.migrate(&uri, &params);
            let mut s = CmpSample::default();
            match r {
                Ok(rep) => {
                    let t1 = rep.completed_at;
                    let waited = dst.wait_heartbeats(2000, Duration::from_secs(30));
                    {
                        let sl = src.log();
                        let dl = dst.log();
                        s.apply(waited.and_then(|_| cmp_gaps(&sl, &dl, t0, t1)));
                        s.corrupt = sl.corrupt.len() + dl.corrupt.len();
                        if s.corrupt > 0 {
                            eprintln!(
                                "*** {}: the guest saw corruption under QEMU: {:?} {:?}",
                                sc.name, sl.corrupt, dl.corrupt
                            );
                        }
                    }
                    s.total_ms = rep.total_ms;
                    s.downtime_ms = rep.downtime_ms;
                    s.mb_sent = rep.ram_transferred as f64 / 1e6;
                    s.rounds = rep.dirty_sync_count as f64;
                    s.setup_ms = rep.setup_ms;
                    src = dst;
                }
                Err(e) => {
                    s.error = e;
                    drop(dst);
                }
            }
            cmp_record(sc, lim, "qemu", s);
        }
    }
    drop(src);
    let _ = std::fs::remove_dir_all(&dir);
}

fn bench_qemu_side_by_side(_c: &mut Criterion) {
    if qemu_mode() == "off" || vcpus_mode() == "only" || links_mode() == "only" {
        eprintln!(
            "*** SKIPPED QEMU side-by-side: LIVEMIG_BENCH_QEMU=0, LIVEMIG_BENCH_VCPUS=only or LIVEMIG_BENCH_LINKS=only ***"
        );
        return;
    }
    if !livemig_kvm::kvm_available() {
        eprintln!("*** SKIPPED QEMU side-by-side: /dev/kvm is not available ***");
        return;
    }
    let Some(qemu) = qemu_path() else {
        eprintln!(
            "*** SKIPPED QEMU side-by-side: qemu-system-x86_64 is not installed (or $QEMU does not exist) ***"
        );
        return;
    };
    let version = match qemu_version(&qemu) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("*** SKIPPED QEMU side-by-side: {e} ***");
            return;
        }
    };
    ensure_refvmm();
    *QEMU_INFO.lock().unwrap() = Some(format!(
        "{version} ({}), BIOS {}",
        qemu.display(),
        qboot_path().map_or("SeaBIOS (default)".into(), |p| p.display().to_string())
    ));
    let quick = std::env::var_os("LIVEMIG_BENCH_QUICK").is_some();
    let runs = cmp_runs();
    let started = Instant::now();
    for sc in cmp_scenarios().iter().filter(|s| !quick || s.quick) {
        // A-B-B-A order (ours at the same limit, QEMU at both, ours at its
        // default), so a change in the machine's load hits both VMMs alike.
        let [same, dflt] = CMP_LIMITS;
        let tsc = cmp_ours(sc, runs, &[same]);
        if tsc.is_none() {
            eprintln!(
                "{}: no tsc_khz from refvmm's guest; QEMU's guest calibrates its own",
                sc.name
            );
        }
        cmp_qemu(sc, runs, &CMP_LIMITS, &qemu, tsc);
        cmp_ours(sc, runs, &[dflt]);
    }
    eprintln!(
        "QEMU side-by-side took {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

/// Pages moved per second once set up: MB sent over (total − set-up).
/// Below 50 MB sent (an idle guest) the figure says nothing about the
/// transfer path and is left out (NaN).
fn transfer_mbs(s: &CmpSample) -> f64 {
    let moving_ms = s.total_ms - s.setup_ms;
    if s.mb_sent < 50.0 || moving_ms.is_nan() || moving_ms <= 0.0 {
        return f64::NAN;
    }
    s.mb_sent / (moving_ms / 1e3)
}

/// "ours / QEMU / ratio" of two transfer rates, or "–" without both.
fn rate((a, b): (f64, f64)) -> String {
    if a.is_nan() || b.is_nan() {
        return "–".into();
    }
    format!("{a:.0} / {b:.0} / {:.2}", a / b)
}

/// The side-by-side table (markdown) and rows (JSON), medians of the ok runs.
fn cmp_summary() -> Option<(String, Vec<Value>)> {
    let info = QEMU_INFO.lock().unwrap().clone()?;
    let results = CMP.lock().unwrap().clone();
    let mut md = format!(
        "### QEMU side by side\n\nPeer: {info}. Same guest image and command line (heartbeat {HB_US} µs), loopback TCP, 1 vCPU; QEMU `max-bandwidth` {} GiB/s (uncapped) in every run; medians of the successful runs; ratio = ours / QEMU (below 1: we are better). The switchover gap is the heartbeats' as the bench's serial readers stamp them (it includes the readers' own scheduling delay and up to one heartbeat period); the guest-measured gap is the guest's own (`gap={GAP_US}`: its TSC from its last main-loop iteration on the source to its first on the destination; a run without it fails).\n\n",
        QEMU_MAX_BANDWIDTH >> 30
    );
    md.push_str("| scenario | limit | runs ok (ours / QEMU) | switchover gap ms (ours / QEMU / ratio) | guest-measured gap ms (ours / QEMU / ratio) | guest gap − downtime ms (ours) | blackout ms (ours / QEMU / ratio) | total ms (ours / QEMU / ratio) | downtime ms, self-reported (ours / QEMU / ratio) | noise floor ms (ours / QEMU) | MB sent (ours / QEMU) | transfer MB/s (ours / QEMU / ratio, above 1: we are faster) | rounds (ours) / dirty syncs (QEMU) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let mut rows = Vec::new();
    for sc in cmp_scenarios() {
        for lim in &CMP_LIMITS {
            let pick = |vmm: &str| -> (usize, usize, Vec<CmpSample>, Vec<String>) {
                let all: Vec<&CmpSample> = results
                    .iter()
                    .filter(|((n, l, v), _)| n == sc.name && *l == lim.label && *v == vmm)
                    .map(|(_, s)| s)
                    .collect();
                let ok: Vec<CmpSample> =
                    all.iter().filter(|s| s.ok).map(|s| (*s).clone()).collect();
                let errs = all
                    .iter()
                    .filter(|s| !s.ok)
                    .map(|s| s.error.clone())
                    .collect();
                (all.len(), ok.len(), ok, errs)
            };
            let (on, ook, o, oerr) = pick("ours");
            let (qn, qok, q, qerr) = pick("qemu");
            if on + qn == 0 {
                continue;
            }
            let m = |v: &[CmpSample], f: Field| median(v.iter().map(f).collect());
            let fields: [(&str, Field); 10] = [
                ("switchover_gap_ms", |s| s.switchover_gap_ms),
                ("guest_gap_ms", |s| s.guest_gap_ms),
                ("guest_gap_minus_downtime_ms", |s| {
                    s.guest_gap_ms - s.downtime_ms
                }),
                ("blackout_ms", |s| s.blackout_ms),
                ("total_ms", |s| s.total_ms),
                ("downtime_ms", |s| s.downtime_ms),
                ("noise_floor_ms", |s| s.noise_floor_ms),
                ("mb_sent", |s| s.mb_sent),
                ("rounds", |s| s.rounds),
                ("transfer_mbs", transfer_mbs),
            ];
            let mut row = json!({
                "scenario": sc.name, "limit": lim.label,
                "ours_limit_ms": lim.ours_ms.unwrap_or(20), "qemu_limit_ms": lim.qemu_ms.unwrap_or(300),
                "ours_runs": on, "ours_ok": ook, "qemu_runs": qn, "qemu_ok": qok,
                "ours_errors": oerr, "qemu_errors": qerr,
                "qemu_corrupt_runs": q.iter().filter(|s| s.corrupt > 0).count(),
                "qemu_setup_ms": m(&q, |s| s.setup_ms),
            });
            let mut v = std::collections::HashMap::new();
            for (k, f) in fields {
                let (a, b) = (m(&o, f), m(&q, f));
                row[format!("ours_{k}")] = json!(a);
                row[format!("qemu_{k}")] = json!(b);
                row[format!("ratio_{k}")] = json!(a / b);
                v.insert(k, (a, b));
            }
            let tri = |k: &str| {
                let (a, b) = v[k];
                format!("{a:.2} / {b:.2} / {:.2}", a / b)
            };
            let (nf_o, nf_q) = v["noise_floor_ms"];
            let (mb_o, mb_q) = v["mb_sent"];
            let (r_o, r_q) = v["rounds"];
            md.push_str(&format!(
                "| {} | {} | {on} ({ook}) / {qn} ({qok}) | {} | {} | {:.2} | {} | {} | {} | {nf_o:.2} / {nf_q:.2} | {mb_o:.0} / {mb_q:.0} | {} | {r_o:.0} / {r_q:.0} |\n",
                sc.name,
                lim.label,
                tri("switchover_gap_ms"),
                tri("guest_gap_ms"),
                v["guest_gap_minus_downtime_ms"].0,
                tri("blackout_ms"),
                tri("total_ms"),
                tri("downtime_ms"),
                rate(v["transfer_mbs"]),
            ));
            rows.push(row);
        }
    }
    let errs: Vec<String> = results
        .iter()
        .filter(|(_, s)| !s.ok)
        .map(|((n, l, v), s)| format!("* {n} [{l}] {v}: {}", s.error.lines().next().unwrap_or("")))
        .collect();
    if !errs.is_empty() {
        md.push_str("\nFailed runs:\n");
        for e in errs {
            md.push_str(&e);
            md.push('\n');
        }
    }
    Some((md, rows))
}

fn write_all_summaries(_c: &mut Criterion) {
    if RESULTS.lock().unwrap().is_empty()
        && CMP.lock().unwrap().is_empty()
        && VCPU_RESULTS.lock().unwrap().is_empty()
        && !shaped_links::has_results()
    {
        return;
    }
    write_summary();
}

criterion_group!(
    benches,
    bench_scenarios,
    bench_qemu_side_by_side,
    bench_vcpus,
    bench_shaped_links,
    write_all_summaries
);
criterion_main!(benches);
