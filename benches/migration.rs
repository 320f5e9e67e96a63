//! Live-migration benchmarks on real KVM: guest-observed switchover gap and
//! blackout, engine downtime and its breakdown, total time, bytes, rounds —
//! next to the physical limits (memcpy and loopback TCP bandwidth) measured
//! in the same run.
//!
//! `cargo bench --bench migration` (full: about 10 minutes on 2 cores);
//! `LIVEMIG_BENCH_QUICK=1 cargo bench --bench migration` (a few scenarios).
//! Results: criterion's report (the timed value is the **switchover gap** as
//! the guest's heartbeats show it, not wall time), plus
//! `target/livemig-bench/summary.{md,json}` and `downtime-vs-dirty-rate.svg`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use livemig_suite::harness::{
    largest_gap_in, log_of, migrate, refvmm_path, scratch_dir, start_destination, start_source, Vmm,
};
use serde_json::{json, Value};

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
    quick: bool,
}

const HB_US: u64 = 200;

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
            s.ok = true;
            s.report = report;
            let _ = dst.wait_heartbeats(2000, Duration::from_secs(30));
            let sl = log_of(&src);
            let dl = log_of(&dst);
            let last_src = sl.heartbeats.last().copied().unwrap_or(t0);
            let first_dst = dl.heartbeats.first().copied().unwrap_or(t1);
            s.switchover_gap_ms = gap_ms(first_dst.saturating_duration_since(last_src));
            let mut all: Vec<Instant> = sl
                .heartbeats
                .iter()
                .chain(dl.heartbeats.iter())
                .copied()
                .collect();
            all.sort();
            s.blackout_ms = gap_ms(largest_gap_in(&all, t0, t1 + Duration::from_millis(50)));
            let span = (t1 - t0).max(Duration::from_millis(200));
            s.noise_floor_ms = gap_ms(largest_gap_in(
                &sl.heartbeats,
                t0.checked_sub(span).unwrap_or(t0),
                t0,
            ));
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
    if !refvmm_path().exists() {
        // `cargo bench` does not build examples.
        let st = std::process::Command::new(env!("CARGO"))
            .args(["build", "--release", "--example", "refvmm"])
            .status()
            .expect("cargo build");
        assert!(st.success());
    }
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
                    total += Duration::from_secs_f64(s.switchover_gap_ms.max(0.0) / 1e3);
                    if !s.ok {
                        eprintln!("{}: migration failed: {}", sc.name, s.error);
                    }
                    RESULTS.lock().unwrap().push((sc.name.to_string(), s));
                }
                total
            })
        });
        drop(holder);
        let _ = std::fs::remove_dir_all(&dir);
    }
    g.finish();
    write_summary();
}

fn memcpy_gbs() -> f64 {
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    dst.copy_from_slice(&src);
    let t = Instant::now();
    for _ in 0..4 {
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
    }
    (4 * n) as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn tcp_gbs() -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let total: usize = 2 << 30;
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < total {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let buf = vec![7u8; 1 << 20];
    let t = Instant::now();
    let mut sent = 0;
    while sent < total {
        s.write_all(&buf).unwrap();
        sent += buf.len();
    }
    drop(s);
    h.join().unwrap();
    total as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
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
    md.push_str("| scenario | runs (ok) | switchover gap ms (median) | blackout ms (median / max) | noise floor ms | engine downtime ms | breakdown (sync / mem / state save / state xfer / restore / ack) ms | total ms | rounds | MB sent | dirty rate MB/s | rate vs loopback |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
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
            "breakdown_ms": [f(&|s| b(s, "final_sync_ms")), f(&|s| b(s, "final_memory_ms")), f(&|s| b(s, "state_save_ms")), f(&|s| b(s, "state_transfer_ms")), f(&|s| b(s, "dest_restore_ms")), f(&|s| b(s, "resume_ack_ms"))],
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
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("livemig-bench");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("summary.md"), &md);
    let _ = std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(
            &json!({"memcpy_gbs": memcpy, "loopback_tcp_gbs": tcp, "scenarios": rows}),
        )
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

criterion_group!(benches, bench_scenarios);
criterion_main!(benches);
