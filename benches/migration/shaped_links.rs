//! The `shaped_links` group (issue 16, "Real links"): the same guests
//! migrated by refvmm and by QEMU between two network namespaces joined by
//! a shaped link (`livemig_suite::link::ShapedLink`: htb rate limit, delay
//! line for the RTT), in the same run.
//!
//! Per link (1 Gbit/s with 2 ms RTT; 10 Gbit/s with 0.5 ms RTT, full mode
//! only), per guest (idle 1 GiB; 1 GiB with a 256 MiB working set written
//! at ~40 MB/s), per configuration (ours: 1 or 4 page streams, with and
//! without LZ4; QEMU: default, multifd with 4 channels), a fresh source is
//! warmed up on host A (the dirtying guest until it has written its whole
//! working set once, so every run starts from the same steady state) and
//! migrated `runs` times, ping-pong between the hosts. Every destination
//! builds its VM before the source connects (refvmm `receive --memory`,
//! QEMU `-m` with `-incoming`). Every run records total time, engine downtime (QEMU: its own
//! `downtime`), the switchover gap and the noise floor (heartbeats), MB
//! sent, the MB the source's shaped qdisc carried, and rounds.
//!
//! A failed migration is listed (never a number); a failed measurement (no
//! switchover gap, or fewer bytes through the shaped qdisc than the VMM
//! says it sent: the traffic took another path) fails the bench after the
//! summary is written.
//!
//! `LIVEMIG_BENCH_LINKS=0` skips the group, `=only` runs only it;
//! `LIVEMIG_BENCH_LINK_RUNS=N` sets the runs per configuration (default 3,
//! 1 with `LIVEMIG_BENCH_QUICK`, which also keeps only the 1 Gbit/s link);
//! `LIVEMIG_BENCH_QEMU=0` leaves QEMU out.
//! `LIVEMIG_BENCH_LINK_SELECT=a,b,...` runs only the (link, guest,
//! configuration) triples whose "link / guest / configuration" label
//! contains every one of the comma-separated words and none of those
//! written with a leading `!` (for example `10 Gbit,written,1 stream`:
//! both 1-stream configurations of ours, with and without LZ4;
//! `10 Gbit,written,1 stream,!LZ4`: only the one without); each of ours
//! prints its set-up and first-page times, its report's rounds (bytes,
//! time, LZ4 decision and reason) and,
//! with `RUST_LOG=livemig::source::sender=info`, the source's LZ4
//! switches.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use livemig_suite::harness::{log_of, scratch_dir, Vmm};
use livemig_suite::link::{LinkError, ShapedLink, Side};
use livemig_suite::qemu::{
    qboot_path, qemu_path, write_guest_image, QemuConfig, QemuMigrateParams, QemuVm,
};
use serde_json::{json, Value};

use super::{
    ensure_refvmm, fail_loudly, gap_ms, measure_gaps, median, qemu_mode, vcpus_mode, HB_US,
};

/// One shaped link.
struct LinkSpec {
    label: &'static str,
    rate_bps: u64,
    rtt: Duration,
    quick: bool,
}

const LINKS: [LinkSpec; 2] = [
    LinkSpec {
        label: "1 Gbit/s, 2 ms RTT",
        rate_bps: 1_000_000_000,
        rtt: Duration::from_millis(2),
        quick: true,
    },
    LinkSpec {
        label: "10 Gbit/s, 0.5 ms RTT",
        rate_bps: 10_000_000_000,
        rtt: Duration::from_micros(500),
        quick: false,
    },
];

/// One guest.
struct Guest {
    label: &'static str,
    memory_mib: u64,
    ws_mib: u64,
    rate_mbs: u64,
}

const GUESTS: [Guest; 2] = [
    Guest {
        label: "idle 1 GiB",
        memory_mib: 1024,
        ws_mib: 16,
        rate_mbs: 0,
    },
    Guest {
        label: "1 GiB, 256 MiB written at ~40 MB/s",
        memory_mib: 1024,
        ws_mib: 256,
        rate_mbs: 41,
    },
];

/// Who migrates, and how.
#[derive(Clone, Copy)]
enum Peer {
    Ours { streams: u32, compress: bool },
    Qemu { multifd: Option<u32> },
}

/// The configurations, A-B-B-A-like so that a change in load hits both.
const CONFIGS: [(&str, Peer); 6] = [
    (
        "ours, 1 stream",
        Peer::Ours {
            streams: 1,
            compress: false,
        },
    ),
    ("QEMU", Peer::Qemu { multifd: None }),
    (
        "ours, 4 streams",
        Peer::Ours {
            streams: 4,
            compress: false,
        },
    ),
    ("QEMU, multifd 4", Peer::Qemu { multifd: Some(4) }),
    (
        "ours, 1 stream, LZ4",
        Peer::Ours {
            streams: 1,
            compress: true,
        },
    ),
    (
        "ours, 4 streams, LZ4",
        Peer::Ours {
            streams: 4,
            compress: true,
        },
    ),
];

/// The downtime limit of every run, both VMMs: the engine's default.
const LIMIT_MS: u64 = 20;

/// QEMU's `max-bandwidth`: uncapped (1 TiB/s), as in the loopback comparison.
const QEMU_MAX_BANDWIDTH: u64 = 1 << 40;

/// The figures of one successful run.
#[derive(Clone, Copy)]
struct Figures {
    total_ms: f64,
    downtime_ms: f64,
    switchover_gap_ms: f64,
    noise_floor_ms: f64,
    mb_sent: f64,
    link_mb: f64,
    rounds: f64,
}

/// Why a run has no figures.
#[derive(Clone)]
enum Failure {
    /// The migration failed (the VMM said so): listed, not a number.
    Migration(String),
    /// The migration completed but could not be measured: fails the bench.
    Measurement(String),
}

#[derive(Clone)]
struct LinkSample {
    link: &'static str,
    guest: &'static str,
    config: &'static str,
    outcome: Result<Figures, Failure>,
}

static SAMPLES: Mutex<Vec<LinkSample>> = Mutex::new(Vec::new());
/// Per link: what one TCP stream reached over it, and a TCP handshake.
static LINK_FACTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// `LIVEMIG_BENCH_LINKS`: unset/`1` = run, `0` = skip, `only` = only this group.
pub(super) fn links_mode() -> &'static str {
    match std::env::var("LIVEMIG_BENCH_LINKS").as_deref() {
        Ok("0") | Ok("off") => "off",
        Ok("only") => "only",
        _ => "on",
    }
}

fn quick() -> bool {
    std::env::var_os("LIVEMIG_BENCH_QUICK").is_some()
}

fn runs() -> usize {
    std::env::var("LIVEMIG_BENCH_LINK_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(if quick() { 1 } else { 3 })
}

/// `LIVEMIG_BENCH_LINK_SELECT`: the words a configuration's label must all
/// contain (none: every configuration).
fn selected(spec: &LinkSpec, g: &Guest, config: &str) -> bool {
    let label = format!("{} / {} / {config}", spec.label, g.label);
    std::env::var("LIVEMIG_BENCH_LINK_SELECT").map_or(true, |words| {
        words
            .split(',')
            .filter(|w| !w.is_empty())
            .all(|w| match w.strip_prefix('!') {
                Some(not) => !label.contains(not),
                None => label.contains(w),
            })
    })
}

fn cmdline(g: &Guest, tsc_khz: Option<u64>) -> String {
    let per_hb = (g.rate_mbs as f64 * 1e6 / 4096.0 * HB_US as f64 / 1e6).round() as u64;
    let mut c = format!("ws={} rate={per_hb} hb={HB_US} pattern=seq", g.ws_mib);
    if let Some(k) = tsc_khz {
        c.push_str(&format!(" tsc_khz={k}"));
    }
    c
}

fn warm_heartbeats(g: &Guest) -> usize {
    let ms = if g.rate_mbs > 0 { 3000 } else { 500 };
    ms * (1000 / HB_US as usize)
}

/// Whether a dirtying guest has written its whole working set once (its
/// last `T` line), so that every run of every configuration migrates the
/// same steady state: a guest still on its first lap has touched more
/// memory the later a run starts (sessions 5–8 compared 130 MB against
/// 183 MB). An idle guest has nothing to write.
fn working_set_written(g: &Guest, log: &livemig_suite::harness::GuestLog) -> bool {
    g.rate_mbs == 0
        || log
            .tlines
            .last()
            .is_some_and(|t| t.pages_written >= g.ws_mib * 256)
}

/// How long a guest may take to write its working set once (256 MiB at
/// ~40 MB/s: ~6.5 s).
const WRITE_TIMEOUT: Duration = Duration::from_secs(120);

/// The criterion group function (not a criterion benchmark: a handful of
/// runs per configuration, listed in the summary).
pub(super) fn bench_shaped_links(_c: &mut criterion::Criterion) {
    if links_mode() == "off" || qemu_mode() == "only" || vcpus_mode() == "only" {
        eprintln!("*** SKIPPED shaped links: LIVEMIG_BENCH_LINKS=0, or another group's =only ***");
        return;
    }
    if !livemig_kvm::kvm_available() {
        eprintln!("*** SKIPPED shaped links: /dev/kvm is not available ***");
        return;
    }
    let qemu = if qemu_mode() == "off" {
        eprintln!("*** shaped links: QEMU left out (LIVEMIG_BENCH_QEMU=0) ***");
        None
    } else {
        let q = qemu_path();
        if q.is_none() {
            eprintln!("*** shaped links: QEMU left out: qemu-system-x86_64 is not installed ***");
        }
        q
    };
    ensure_refvmm();
    let started = Instant::now();
    for spec in LINKS.iter().filter(|l| !quick() || l.quick) {
        let any = GUESTS
            .iter()
            .any(|g| CONFIGS.iter().any(|(c, _)| selected(spec, g, c)));
        if !any {
            continue;
        }
        let link = match ShapedLink::new("bench", spec.rate_bps, spec.rtt) {
            Ok(l) => l,
            Err(LinkError::Unavailable(why)) => {
                eprintln!("*** SKIPPED shaped links: they need {why} ***");
                return;
            }
            Err(e) => fail_loudly(&format!("shaped link {}: {e}", spec.label)),
        };
        record_link_facts(spec, &link);
        for g in &GUESTS {
            let mut tsc_khz = None;
            for (config, peer) in CONFIGS {
                if !selected(spec, g, config) {
                    continue;
                }
                match peer {
                    Peer::Ours { streams, compress } => {
                        let t = ours(spec, &link, g, config, streams, compress);
                        tsc_khz = tsc_khz.or(t);
                    }
                    Peer::Qemu { multifd } => {
                        if let Some(q) = &qemu {
                            theirs(spec, &link, g, config, q, multifd, tsc_khz);
                        }
                    }
                }
            }
        }
    }
    eprintln!("shaped links took {:.0} s", started.elapsed().as_secs_f64());
    let bad: Vec<String> = SAMPLES
        .lock()
        .unwrap()
        .iter()
        .filter_map(|s| match &s.outcome {
            Err(Failure::Measurement(e)) => {
                Some(format!("{} / {} / {}: {e}", s.link, s.guest, s.config))
            }
            _ => None,
        })
        .collect();
    if !bad.is_empty() {
        fail_loudly(&format!("shaped links: {}", bad.join("; ")));
    }
}

/// Measures what one TCP stream gets over the link (half a second's worth
/// at the rate, 32–256 MB) and a handshake; a failure fails the bench.
fn record_link_facts(spec: &LinkSpec, link: &ShapedLink) {
    let bytes = (spec.rate_bps / 16).clamp(32_000_000, 256_000_000);
    let rate = link
        .tcp_throughput(Side::A, bytes)
        .unwrap_or_else(|e| fail_loudly(&format!("{}: link throughput: {e}", spec.label)));
    let hs = link
        .connect_time(Side::A)
        .unwrap_or_else(|e| fail_loudly(&format!("{}: TCP handshake: {e}", spec.label)));
    let line = format!(
        "{}: one TCP stream reached {:.0} MB/s ({:.0} % of the rate) over {:.0} MB; a TCP connect took {:.2} ms; queue {} KiB per direction",
        spec.label,
        rate / 1e6,
        rate * 8.0 / spec.rate_bps as f64 * 100.0,
        bytes as f64 / 1e6,
        hs.as_secs_f64() * 1e3,
        link.queue_limit_bytes >> 10
    );
    eprintln!("{line}");
    LINK_FACTS.lock().unwrap().push(line);
}

fn record(spec: &LinkSpec, g: &Guest, config: &'static str, outcome: Result<Figures, Failure>) {
    match &outcome {
        Ok(f) => eprintln!(
            "{} / {} / {config}: total {:.0} ms, downtime {:.2} ms, gap {:.2} ms (noise floor {:.2}), {:.0} MB sent, {:.0} MB on the link, {} rounds",
            spec.label, g.label, f.total_ms, f.downtime_ms, f.switchover_gap_ms, f.noise_floor_ms, f.mb_sent, f.link_mb, f.rounds
        ),
        Err(Failure::Migration(e)) => {
            eprintln!("*** {} / {} / {config}: migration FAILED: {e}", spec.label, g.label)
        }
        Err(Failure::Measurement(e)) => {
            eprintln!("*** {} / {} / {config}: measurement FAILED: {e}", spec.label, g.label)
        }
    }
    SAMPLES.lock().unwrap().push(LinkSample {
        link: spec.label,
        guest: g.label,
        config,
        outcome,
    });
}

/// The bytes the shaped qdisc on `side` carried since `before`; a
/// measurement failure when fewer than `sent` (the traffic went elsewhere).
fn link_bytes(link: &ShapedLink, side: Side, before: u64, sent: f64) -> Result<f64, Failure> {
    let after = link
        .qdisc_stats(side)
        .map_err(|e| Failure::Measurement(e.to_string()))?;
    let carried = after.bytes.saturating_sub(before) as f64;
    if carried < sent {
        return Err(Failure::Measurement(format!(
            "the shaped qdisc carried {carried:.0} bytes, the VMM sent {sent:.0}: the migration did not cross the link"
        )));
    }
    Ok(carried / 1e6)
}

fn qdisc_bytes(link: &ShapedLink, side: Side) -> Result<u64, Failure> {
    link.qdisc_stats(side)
        .map(|q| q.bytes)
        .map_err(|e| Failure::Measurement(e.to_string()))
}

/// The gaps of a run from both guests' heartbeats.
fn gaps(
    src: &livemig_suite::harness::GuestLog,
    dst: &livemig_suite::harness::GuestLog,
    t0: Instant,
    t1: Instant,
) -> Result<(f64, f64), Failure> {
    if !(src.corrupt.is_empty() && dst.corrupt.is_empty()) {
        fail_loudly(&format!(
            "the guest saw corruption: {:?} {:?}",
            src.corrupt, dst.corrupt
        ));
    }
    measure_gaps(src, dst, t0, t1)
        .map(|g| (gap_ms(g.switchover_gap), gap_ms(g.noise_floor)))
        .map_err(Failure::Measurement)
}

/// refvmm's runs of one configuration; returns the TSC frequency its guest
/// reported (for QEMU's guest to beat at the same period).
fn ours(
    spec: &LinkSpec,
    link: &ShapedLink,
    g: &Guest,
    config: &'static str,
    streams: u32,
    compress: bool,
) -> Option<u64> {
    let dir = scratch_dir("links-ours");
    let mem = format!("{}M", g.memory_mib);
    let cmd = cmdline(g, None);
    let args = [
        "run",
        "--memory",
        &mem,
        "--kernel",
        "builtin:testguest",
        "--cmdline",
        &cmd,
    ];
    let started = link.refvmm(Side::A, &dir, "s0", &args).and_then(|mut v| {
        v.wait_api(Duration::from_secs(20))?;
        v.wait_ready(Duration::from_secs(60))?;
        v.wait_heartbeats(warm_heartbeats(g), Duration::from_secs(60))?;
        v.wait_for("the working set written", WRITE_TIMEOUT, |l| {
            working_set_written(g, l)
        })?;
        Ok(v)
    });
    let mut src = match started {
        Ok(v) => v,
        Err(e) => fail_loudly(&format!(
            "{} / {} / {config}: source: {e}",
            spec.label, g.label
        )),
    };
    let tsc_khz = log_of(&src).tsc_khz();
    let mut side = Side::A;
    for n in 1..=runs() {
        let how = OursRun {
            memory: &mem,
            streams,
            compress,
        };
        let (next, outcome) = ours_once(link, &dir, src, side, n, &how);
        if outcome.is_ok() {
            side = side.other();
        }
        src = next;
        record(spec, g, config, outcome);
    }
    drop(src);
    let _ = std::fs::remove_dir_all(&dir);
    tsc_khz
}

/// How refvmm migrates in one configuration.
struct OursRun<'a> {
    /// The guest's memory size, given to the destination (`receive
    /// --memory`) as QEMU's destination is given `-m`: both build their VM
    /// before the migration arrives, as an operator's agent does
    /// (`prepare-receive`).
    memory: &'a str,
    streams: u32,
    compress: bool,
}

/// One refvmm migration from `side` to the other; returns the VM that
/// runs the guest afterwards and the run's figures.
fn ours_once(
    link: &ShapedLink,
    dir: &Path,
    src: Vmm,
    side: Side,
    n: usize,
    how: &OursRun,
) -> (Vmm, Result<Figures, Failure>) {
    let (streams, compress) = (how.streams, how.compress);
    let to = side.other();
    let listen = format!("tcp:{}:0", link.addr(to));
    let args = ["receive", "--listen", &listen, "--memory", how.memory];
    let dst = link
        .refvmm(to, dir, &format!("d{n}"), &args)
        .and_then(|mut v| v.listen_endpoint(Duration::from_secs(20)).map(|ep| (v, ep)));
    let (mut dst, ep) = match dst {
        Ok(x) => x,
        Err(e) => return (src, Err(Failure::Migration(format!("destination: {e}")))),
    };
    let before = match qdisc_bytes(link, side) {
        Ok(b) => b,
        Err(e) => return (src, Err(e)),
    };
    let mut extra = json!({ "downtime_limit_ms": LIMIT_MS, "compress": compress });
    if streams > 1 {
        extra["streams"] = json!(streams);
    }
    let t0 = Instant::now();
    let r = livemig_suite::harness::migrate(&src, &ep, extra);
    let t1 = Instant::now();
    let rep = match r {
        Ok(rep) => rep,
        Err(e) => return (src, Err(Failure::Migration(e.to_string()))),
    };
    let num = |k: &str| rep[k].as_f64().unwrap_or(f64::NAN);
    if std::env::var_os("LIVEMIG_BENCH_LINK_SELECT").is_some() {
        // Where the time outside the rounds went (set-up: handshake, the
        // destination's VM and memory, the state measurement).
        eprintln!(
            "  setup {:.1} ms, first page {:.1} ms",
            num("setup_ms"),
            num("first_page_ms")
        );
        for r in rep["rounds"].as_array().into_iter().flatten() {
            eprintln!("  round {r}");
        }
        // With RUST_LOG=livemig=info: the source's LZ4 switches.
        for l in src.stderr().lines().filter(|l| l.contains("LZ4 ")) {
            eprintln!("  {l}");
        }
    }
    let outcome = dst
        .wait_heartbeats(2000, Duration::from_secs(30))
        .map_err(Failure::Measurement)
        .and_then(|_| gaps(&log_of(&src), &log_of(&dst), t0, t1))
        .and_then(|(gap, noise)| {
            let sent = num("bytes_sent");
            Ok(Figures {
                total_ms: num("total_ms"),
                downtime_ms: num("downtime_ms"),
                switchover_gap_ms: gap,
                noise_floor_ms: noise,
                mb_sent: sent / 1e6,
                link_mb: link_bytes(link, side, before, sent)?,
                rounds: rep["rounds"].as_array().map_or(0, |x| x.len()) as f64,
            })
        });
    (dst, outcome)
}

/// QEMU's runs of one configuration.
fn theirs(
    spec: &LinkSpec,
    link: &ShapedLink,
    g: &Guest,
    config: &'static str,
    qemu: &Path,
    multifd: Option<u32>,
    tsc_khz: Option<u64>,
) {
    let dir = scratch_dir("links-qemu");
    let cfg = match write_guest_image(&dir) {
        Ok(kernel) => QemuConfig {
            qemu: qemu.to_path_buf(),
            kernel,
            cmdline: cmdline(g, tsc_khz),
            memory_mib: g.memory_mib,
            vcpus: 1,
            bios: qboot_path(),
        },
        Err(e) => fail_loudly(&format!("{config}: {e}")),
    };
    let started =
        QemuVm::start_source_in(&dir, "qs0", &cfg, &link.exec_prefix(Side::A)).and_then(|mut v| {
            v.wait_ready(Duration::from_secs(60))?;
            v.wait_heartbeats(warm_heartbeats(g), Duration::from_secs(60))?;
            v.wait_for("the working set written", WRITE_TIMEOUT, |l| {
                working_set_written(g, l)
            })?;
            Ok(v)
        });
    let mut src = match started {
        Ok(v) => v,
        Err(e) => fail_loudly(&format!(
            "{} / {} / {config}: QEMU source: {e}",
            spec.label, g.label
        )),
    };
    let mut side = Side::A;
    for n in 1..=runs() {
        let (next, outcome) = theirs_once(link, &dir, &cfg, src, side, n, multifd);
        if outcome.is_ok() {
            side = side.other();
        }
        src = next;
        record(spec, g, config, outcome);
    }
    drop(src);
    let _ = std::fs::remove_dir_all(&dir);
}

/// One QEMU migration from `side` to the other.
fn theirs_once(
    link: &ShapedLink,
    dir: &Path,
    cfg: &QemuConfig,
    mut src: QemuVm,
    side: Side,
    n: usize,
    multifd: Option<u32>,
) -> (QemuVm, Result<Figures, Failure>) {
    let to = side.other();
    let dst = QemuVm::start_destination_on(
        dir,
        &format!("qd{n}"),
        cfg,
        &link.exec_prefix(to),
        link.addr(to),
        multifd,
    );
    let (mut dst, uri) = match dst {
        Ok(x) => x,
        Err(e) => return (src, Err(Failure::Migration(format!("destination: {e}")))),
    };
    let before = match qdisc_bytes(link, side) {
        Ok(b) => b,
        Err(e) => return (src, Err(e)),
    };
    let params = QemuMigrateParams {
        downtime_limit_ms: Some(LIMIT_MS),
        max_bandwidth: Some(QEMU_MAX_BANDWIDTH),
        multifd_channels: multifd,
        timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let t0 = Instant::now();
    let rep = match src.migrate(&uri, &params) {
        Ok(r) => r,
        Err(e) => return (src, Err(Failure::Migration(e))),
    };
    let outcome = dst
        .wait_heartbeats(2000, Duration::from_secs(30))
        .map_err(Failure::Measurement)
        .and_then(|_| gaps(&src.log(), &dst.log(), t0, rep.completed_at))
        .and_then(|(gap, noise)| {
            let sent = rep.ram_transferred as f64;
            Ok(Figures {
                total_ms: rep.total_ms,
                downtime_ms: rep.downtime_ms,
                switchover_gap_ms: gap,
                noise_floor_ms: noise,
                mb_sent: sent / 1e6,
                link_mb: link_bytes(link, side, before, sent)?,
                rounds: rep.dirty_sync_count as f64,
            })
        });
    (dst, outcome)
}

/// Whether the group recorded anything.
pub(super) fn has_results() -> bool {
    !SAMPLES.lock().unwrap().is_empty()
}

/// The group's table (markdown) and rows (JSON): medians of the successful
/// runs; failed runs are counted and listed, never entered.
pub(super) fn summary() -> Option<(String, Vec<Value>)> {
    let samples = SAMPLES.lock().unwrap().clone();
    if samples.is_empty() {
        return None;
    }
    let mut md = format!(
        "### Shaped links\n\nTwo network namespaces as two hosts, joined by a shaped link (htb rate limit on each side's egress, a delay line in the bench process for the RTT; see `src/link.rs`). Same guest image and command line for both VMMs (heartbeat {HB_US} µs), 1 vCPU, downtime limit {LIMIT_MS} ms for both, QEMU `max-bandwidth` uncapped; medians of the successful runs. \"total / QEMU\" divides by QEMU's default configuration on the same link and guest. Downtime: ours is the engine's (pause → destination resumed); QEMU's is its own `downtime` (not the same measure; the switchover gap is the comparable one). MB on the link: what the source's shaped qdisc carried during the migration.\n\n"
    );
    for f in LINK_FACTS.lock().unwrap().iter() {
        md.push_str(&format!("* {f}\n"));
    }
    md.push_str("\n| link | guest | VMM | runs (ok) | total ms | total / QEMU | downtime ms | switchover gap ms | noise floor ms | MB sent | MB on the link | rounds (QEMU: dirty syncs) |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for spec in &LINKS {
        for g in &GUESTS {
            let ok_of = |config: &str| -> Vec<Figures> {
                samples
                    .iter()
                    .filter(|s| s.link == spec.label && s.guest == g.label && s.config == config)
                    .filter_map(|s| s.outcome.as_ref().ok().copied())
                    .collect()
            };
            let qemu_total = median(ok_of("QEMU").iter().map(|f| f.total_ms).collect());
            for (config, _) in CONFIGS {
                let all: Vec<&LinkSample> = samples
                    .iter()
                    .filter(|s| s.link == spec.label && s.guest == g.label && s.config == config)
                    .collect();
                if all.is_empty() {
                    continue;
                }
                failed.extend(all.iter().filter_map(|s| match &s.outcome {
                    Err(Failure::Migration(e)) | Err(Failure::Measurement(e)) => Some(format!(
                        "* {} / {} / {config}: {}",
                        spec.label,
                        g.label,
                        e.lines().next().unwrap_or("")
                    )),
                    Ok(_) => None,
                }));
                let ok = ok_of(config);
                let m = |f: fn(&Figures) -> f64| median(ok.iter().map(f).collect());
                let total = m(|f| f.total_ms);
                let row = json!({
                    "link": spec.label, "guest": g.label, "config": config,
                    "runs": all.len(), "ok": ok.len(),
                    "total_ms": total, "total_vs_qemu": total / qemu_total,
                    "downtime_ms": m(|f| f.downtime_ms),
                    "switchover_gap_ms": m(|f| f.switchover_gap_ms),
                    "noise_floor_ms": m(|f| f.noise_floor_ms),
                    "mb_sent": m(|f| f.mb_sent), "link_mb": m(|f| f.link_mb),
                    "rounds": m(|f| f.rounds),
                });
                md.push_str(&format!(
                    "| {} | {} | {config} | {} ({}) | {total:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} |\n",
                    spec.label,
                    g.label,
                    all.len(),
                    ok.len(),
                    total / qemu_total,
                    m(|f| f.downtime_ms),
                    m(|f| f.switchover_gap_ms),
                    m(|f| f.noise_floor_ms),
                    m(|f| f.mb_sent),
                    m(|f| f.link_mb),
                    m(|f| f.rounds),
                ));
                rows.push(row);
            }
        }
    }
    if !failed.is_empty() {
        md.push_str("\nFailed runs (not in any median):\n");
        for f in failed {
            md.push_str(&f);
            md.push('\n');
        }
    }
    Some((md, rows))
}
