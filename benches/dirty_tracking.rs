//! Dirty tracking on real KVM, mode against mode: classic `KVM_GET_DIRTY_LOG`,
//! manual-protect (`GET` + chunked `KVM_CLEAR_DIRTY_LOG`) and the dirty ring
//! (4096 and 65536 entries).
//!
//! `cargo bench --bench dirty_tracking` (about a minute on 2 cores);
//! `LIVEMIG_DIRTY_BENCH_MIB=<MiB>` changes the guest size (default 1024),
//! `LIVEMIG_DIRTY_BENCH_REPS=<n>` the repetitions (default 5; medians are
//! printed; 0 skips this part). No criterion: each number is one labeled host-side measurement.
//!
//! The guest is the CPL3 page writer of the tests (native speed under PVM):
//! it writes one qword per page, as fast as it can, to a set of pages chosen
//! per measurement. For each mode:
//! - **start**: `DirtyTracker::start` (turning logging on for every slot);
//!   for manual-protect also the round-0 re-arm (every 1024-page chunk
//!   cleared once, which the engine spreads over round 0).
//! - **write**: µs per page for the guest to write pages after they were
//!   re-armed (every first write faults), next to the same writes with
//!   tracking off: the guest's slowdown.
//! - **sync 0 %**: a sync when nothing was written (the fixed cost).
//! - **sync 1 % / 50 %**: harvesting after the guest wrote 1 % / 50 % of
//!   guest memory (guest paused), and for manual-protect the re-arm of those
//!   pages (the engine does it chunk by chunk while sending).
//!
//! Then the same modes in real migrations (refvmm processes, loopback TCP,
//! the built-in test guest with 200 µs heartbeats, 10 ms downtime limit):
//! an idle 1 GiB guest and a 256 MiB working set dirtied at ~200 MB/s, each
//! migrated `LIVEMIG_DIRTY_BENCH_MIGRATIONS` times (default 3) along a chain
//! of VMs that all use the mode; switchover gap, blackout (largest heartbeat
//! gap during the migration), engine downtime and final-sync time, total
//! time and rounds (medians). `LIVEMIG_DIRTY_BENCH_MIGRATIONS=0` skips it;
//! `LIVEMIG_DIRTY_BENCH_ONLY=<words,...>` keeps the scenarios and the modes
//! whose name contains one of the words (e.g. `ws256,manual,ring`).
//!
//! Results: stdout and `target/livemig-bench/dirty-tracking.md`.

#[path = "../tests/common/pagewriter.rs"]
mod pagewriter;

use std::time::{Duration, Instant};

use livemig::bitmap::DirtyBitmap;
use livemig::memory::MemoryLayout;
use livemig::vm::{DirtyTracker, SourceVm};
use livemig_kvm::DirtyMode;
use livemig_suite::harness::{
    largest_gap_in, log_of, migrate, refvmm_path, scratch_dir, switchover_gaps, Vmm,
};
use pagewriter::{PageWriter, WRITE_BASE};
use serde_json::{json, Value};

#[derive(Default)]
struct Samples {
    start_ms: Vec<f64>,
    rearm0_ms: Vec<f64>,
    write_untracked_us: Vec<f64>,
    write_tracked_us: Vec<f64>,
    sync0_ms: Vec<f64>,
    sync1_ms: Vec<f64>,
    rearm1_ms: Vec<f64>,
    sync50_ms: Vec<f64>,
    rearm50_ms: Vec<f64>,
    ring_full_exits: Vec<f64>,
    ring_full_ms: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Re-arms (manual-protect) the pages set in `with`, 1024-page chunks.
fn rearm(t: &mut dyn DirtyTracker, with: &DirtyBitmap) -> Duration {
    let t0 = Instant::now();
    if t.rearm_mode() == livemig::vm::Rearm::BeforeRead {
        for r in 0..with.num_regions() {
            let pages = with.region_pages(r);
            let mut c = 0;
            while c < pages {
                let n = 1024.min(pages - c);
                if with.any_in(r, c, c + n) {
                    t.rearm(r, c, n, with).unwrap();
                }
                c += n;
            }
        }
    }
    t0.elapsed()
}

fn measure(mode: DirtyMode, mem: u64, reps: usize) -> Samples {
    let w = PageWriter::new(mem, mode);
    let layout = MemoryLayout::of(w.vm.memory()).unwrap();
    let total = mem / 4096;
    let avail = (mem - WRITE_BASE) / 4096;
    let half = total / 2;
    let one = total / 100;
    assert!(half * 2 <= avail + 8192, "guest too small");
    // Touch every page once (first touch ~10 µs each, not what we measure).
    w.write_pages(0, avail, 1);
    let mut s = Samples::default();
    let mut all = DirtyBitmap::new(&layout);
    all.set_all();
    for _ in 0..reps {
        // Untracked: the same writes as the tracked 50 % run. The first
        // pass after tracking stopped still faults (KVM leaves the pages
        // write-protected when logging goes off): measure the second.
        w.write_pages(0, half.min(avail / 2), 2);
        let d = w.write_pages(0, half.min(avail / 2), 2);
        s.write_untracked_us
            .push(d.as_secs_f64() * 1e6 / half.min(avail / 2) as f64);

        let mut t = w.vm.kvm_dirty_tracker();
        let t0 = Instant::now();
        t.start().unwrap();
        s.start_ms.push(ms(t0.elapsed()));
        let mut b = DirtyBitmap::new(&layout);
        t.sync(&mut b).unwrap();
        s.rearm0_ms.push(ms(rearm(&mut t, &all)));

        let exits0 = w.vm.dirty_ring().map_or(0, |r| r.ring_full_exits());
        let full0 =
            w.vm.dirty_ring()
                .map_or(Duration::ZERO, |r| r.ring_full_time());
        let n = half.min(avail / 2);
        let d = w.write_pages(0, n, 2);
        s.write_tracked_us.push(d.as_secs_f64() * 1e6 / n as f64);
        let exits = w.vm.dirty_ring().map_or(0, |r| r.ring_full_exits()) - exits0;
        s.ring_full_exits.push(exits as f64);
        let full =
            w.vm.dirty_ring()
                .map_or(Duration::ZERO, |r| r.ring_full_time())
                - full0;
        s.ring_full_ms.push(ms(full));
        let mut b = DirtyBitmap::new(&layout);
        let t0 = Instant::now();
        t.sync(&mut b).unwrap();
        s.sync50_ms.push(ms(t0.elapsed()));
        assert_eq!(b.count(), n, "{mode:?}: 50 % sync");
        s.rearm50_ms.push(ms(rearm(&mut t, &b)));

        w.write_pages(1, one, avail / one - 1);
        let mut b = DirtyBitmap::new(&layout);
        let t0 = Instant::now();
        t.sync(&mut b).unwrap();
        s.sync1_ms.push(ms(t0.elapsed()));
        assert_eq!(b.count(), one, "{mode:?}: 1 % sync");
        s.rearm1_ms.push(ms(rearm(&mut t, &b)));

        // Nothing written: the fixed cost of a sync.
        let mut b = DirtyBitmap::new(&layout);
        let t0 = Instant::now();
        t.sync(&mut b).unwrap();
        s.sync0_ms.push(ms(t0.elapsed()));
        assert_eq!(b.count(), 0, "{mode:?}: idle sync");
        t.stop().unwrap();
    }
    s
}

const HB_US: u64 = 200;

/// Spawns refvmm; a `run` waits for its API socket (a `receive` opens its
/// socket only once it holds a guest).
fn spawn(dir: &std::path::Path, name: &str, args: &[&str]) -> Vmm {
    let api = dir.join(format!("{name}.sock"));
    let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    a.push("--api-socket".into());
    a.push(api.to_string_lossy().into_owned());
    let mut v = Vmm::spawn(name, &a, api).expect("spawn refvmm");
    if args.first() == Some(&"run") {
        v.wait_api(Duration::from_secs(30)).expect("API socket");
    }
    v
}

#[derive(Default)]
struct MigSamples {
    switchover_ms: Vec<f64>,
    blackout_ms: Vec<f64>,
    blackout_at_ms: Vec<f64>,
    noise_ms: Vec<f64>,
    downtime_ms: Vec<f64>,
    final_sync_ms: Vec<f64>,
    total_ms: Vec<f64>,
    rounds: Vec<f64>,
    failed: usize,
}

/// Migrates a guest `n` times along a chain of refvmm processes that all
/// track with `mode` (a `--dirty-log` value).
fn migrations(mode: &str, memory: &str, cmdline: &str, warm_hb: usize, n: usize) -> MigSamples {
    let dir = scratch_dir("dirtybench");
    let mut s = MigSamples::default();
    let mut src = spawn(
        &dir,
        "s0",
        &[
            "run",
            "--memory",
            memory,
            "--kernel",
            "builtin:testguest",
            "--cmdline",
            cmdline,
            "--dirty-log",
            mode,
        ],
    );
    src.wait_ready(Duration::from_secs(60)).expect("READY");
    src.wait_heartbeats(warm_hb, Duration::from_secs(60))
        .expect("warm-up");
    for i in 0..n {
        let mut dst = spawn(
            &dir,
            &format!("d{i}"),
            &[
                "receive",
                "--listen",
                "tcp:127.0.0.1:0",
                "--dirty-log",
                mode,
            ],
        );
        let ep = dst
            .listen_endpoint(Duration::from_secs(20))
            .expect("endpoint");
        let t0 = Instant::now();
        let r = migrate(&src, &ep, json!({"downtime_limit_ms": 10}));
        let t1 = Instant::now();
        let report: Value = match r {
            Ok(v) => v,
            Err(e) => {
                eprintln!("{mode} {memory} {cmdline}: migration failed: {e}");
                s.failed += 1;
                continue;
            }
        };
        dst.wait_heartbeats(2000, Duration::from_secs(30))
            .expect("destination heartbeats");
        {
            let sl = log_of(&src);
            let dl = log_of(&dst);
            assert!(
                sl.corrupt.is_empty() && dl.corrupt.is_empty(),
                "{mode}: CORRUPT {:?} {:?}",
                sl.corrupt,
                dl.corrupt
            );
            // A gap the heartbeats cannot tell (a late reader, a side
            // without heartbeats) is a failed run, never a number.
            let gaps = match switchover_gaps(&sl.heartbeats, &dl.heartbeats, t0, t1) {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("*** {mode} {memory} {cmdline}: measurement failed: {e}");
                    s.failed += 1;
                    drop((sl, dl));
                    drop(src);
                    src = dst;
                    let _ = src.wait_api(Duration::from_secs(10));
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
            };
            s.switchover_ms.push(ms(gaps.switchover_gap));
            let mut all: Vec<Instant> = sl
                .heartbeats
                .iter()
                .chain(dl.heartbeats.iter())
                .copied()
                .collect();
            all.sort();
            s.blackout_ms
                .push(ms(largest_gap_in(&all, t0, t1 + Duration::from_millis(50))));
            // When the largest gap began, after the migrate request.
            let end = t1 + Duration::from_millis(50);
            let w: Vec<Instant> = all
                .iter()
                .copied()
                .filter(|t| *t >= t0 && *t <= end)
                .collect();
            if let Some(p) = w.windows(2).max_by_key(|p| p[1] - p[0]) {
                s.blackout_at_ms.push(ms(p[0] - t0));
            }
            s.noise_ms.push(ms(gaps.noise_floor));
        }
        let f = |k: &str| report[k].as_f64().unwrap_or(f64::NAN);
        s.downtime_ms.push(f("downtime_ms"));
        s.total_ms.push(f("total_ms"));
        s.final_sync_ms.push(
            report["downtime_breakdown"]["final_sync_ms"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
        s.rounds
            .push(report["rounds"].as_array().map_or(0, |r| r.len()) as f64);
        drop(src);
        src = dst;
        let _ = src.wait_api(Duration::from_secs(10));
        // Let the destination settle (and measure its noise floor) before
        // it migrates on.
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(src);
    let _ = std::fs::remove_dir_all(&dir);
    s
}

fn migration_part(md: &mut String, n: usize) {
    if n == 0 {
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
    let per_hb = (200e6 / 4096.0 * HB_US as f64 / 1e6).round() as u64;
    let busy = format!("ws=256 rate={per_hb} hb={HB_US} pattern=seq");
    let idle = format!("ws=16 rate=0 hb={HB_US}");
    let scenarios = [
        ("idle 1 GiB", "1G", idle.as_str(), 2500),
        ("ws256 ~200 MB/s seq, 1 GiB", "1G", busy.as_str(), 15000),
    ];
    md.push_str(&format!(
        "\nMigrations (loopback TCP, 10 ms limit, heartbeat {HB_US} µs), medians of {n}\n\n\
         | scenario | mode | switchover gap ms | blackout ms | blackout began at ms (each run) | noise floor ms | engine downtime ms | final sync ms | total ms | rounds | failed |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n"
    ));
    let only = std::env::var("LIVEMIG_DIRTY_BENCH_ONLY").unwrap_or_default();
    let picked = |what: &str| only.is_empty() || only.split(',').any(|o| what.contains(o));
    for (name, memory, cmdline, warm) in scenarios.into_iter().filter(|s| picked(s.0)) {
        for mode in ["classic", "manual", "ring:4096", "ring:65536"]
            .into_iter()
            .filter(|m| picked(m))
        {
            let s = migrations(mode, memory, cmdline, warm, n);
            let line = format!(
                "| {name} | {mode} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {:.3} | {:.0} | {:.0} | {} |\n",
                median(&s.switchover_ms),
                median(&s.blackout_ms),
                s.blackout_at_ms
                    .iter()
                    .map(|v| format!("{v:.0}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                median(&s.noise_ms),
                median(&s.downtime_ms),
                median(&s.final_sync_ms),
                median(&s.total_ms),
                median(&s.rounds),
                s.failed
            );
            eprint!("{line}");
            md.push_str(&line);
        }
    }
}

/// Start and idle-sync cost of each mode for an idle guest of `mib` MiB
/// (never run, nothing resident): what a sync costs when nothing changed.
fn fixed_costs(md: &mut String, sizes: &[u64], modes: &[(&str, DirtyMode)]) {
    md.push_str(
        "\nFixed costs by guest size (guest idle, memory untouched; medians of 5)\n\n\
         | guest | mode | start ms | round-0 re-arm ms | sync 0 % ms |\n|---|---|---|---|---|\n",
    );
    for &mib in sizes {
        for (name, mode) in modes {
            let w = PageWriter::new(mib << 20, *mode);
            let layout = MemoryLayout::of(w.vm.memory()).unwrap();
            let mut all = DirtyBitmap::new(&layout);
            all.set_all();
            let (mut st, mut re, mut sy) = (vec![], vec![], vec![]);
            for _ in 0..5 {
                let mut t = w.vm.kvm_dirty_tracker();
                let t0 = Instant::now();
                t.start().unwrap();
                st.push(ms(t0.elapsed()));
                let mut b = DirtyBitmap::new(&layout);
                t.sync(&mut b).unwrap();
                re.push(ms(rearm(&mut t, &all)));
                let mut b = DirtyBitmap::new(&layout);
                let t0 = Instant::now();
                t.sync(&mut b).unwrap();
                sy.push(ms(t0.elapsed()));
                assert_eq!(b.count(), 0);
                t.stop().unwrap();
            }
            let line = format!(
                "| {} GiB | {name} | {:.2} | {:.2} | {:.3} |\n",
                mib >> 10,
                median(&st),
                median(&re),
                median(&sy)
            );
            eprint!("{line}");
            md.push_str(&line);
        }
    }
}

fn main() {
    // `cargo bench` passes --bench; a filter argument selects nothing here.
    if !livemig_kvm::kvm_available() {
        eprintln!("*** dirty_tracking bench SKIPPED: /dev/kvm is not available ***");
        return;
    }
    let mib: u64 = std::env::var("LIVEMIG_DIRTY_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let reps: usize = std::env::var("LIVEMIG_DIRTY_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mem = mib << 20;
    let modes = [
        ("classic", DirtyMode::Classic),
        ("manual-protect", DirtyMode::ManualProtect),
        ("ring 4096", DirtyMode::Ring { entries: 4096 }),
        ("ring 65536", DirtyMode::Ring { entries: 65536 }),
    ];
    let mut md = format!(
        "Dirty tracking, {mib} MiB guest, 1 vCPU at CPL3, medians of {reps}; \
         \"1 %\" = {} pages, \"50 %\" = {} pages\n\n\
         | mode | start ms | round-0 re-arm ms | write µs/page untracked | write µs/page tracked | ring-full exits (50 % write) | harvest on ring-full ms | sync 0 % ms | sync 1 % ms | re-arm 1 % ms | sync 50 % ms | re-arm 50 % ms |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        (mem >> 12) / 100,
        ((mem >> 12) / 2).min(((mem - WRITE_BASE) >> 12) / 2),
    );
    for (name, mode) in modes.into_iter().filter(|_| reps > 0) {
        let s = measure(mode, mem, reps);
        let line = format!(
            "| {name} | {:.2} | {:.2} | {:.3} | {:.2} | {:.0} | {:.2} | {:.3} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            median(&s.start_ms),
            median(&s.rearm0_ms),
            median(&s.write_untracked_us),
            median(&s.write_tracked_us),
            median(&s.ring_full_exits),
            median(&s.ring_full_ms),
            median(&s.sync0_ms),
            median(&s.sync1_ms),
            median(&s.rearm1_ms),
            median(&s.sync50_ms),
            median(&s.rearm50_ms),
        );
        eprint!("{line}");
        md.push_str(&line);
    }
    if reps > 0 {
        fixed_costs(&mut md, &[1024, 4096, 16384], &modes);
    }
    let migs: usize = std::env::var("LIVEMIG_DIRTY_BENCH_MIGRATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    migration_part(&mut md, migs);
    println!("{md}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("livemig-bench");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("dirty-tracking.md"), &md);
}
