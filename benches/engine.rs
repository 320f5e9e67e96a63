//! The engine alone, without KVM: a software VM (`livemig::testing::soft::SoftVm`)
//! migrated over loopback TCP between two threads of this process, to
//! measure the transfer path (copy, checksum, send, receive, write) against
//! the physical limits measured in the same run.
//!
//! `cargo bench --bench engine` (about two minutes). Scenarios:
//! * `streams-N`: round 0 of a 512 MiB VM whose pages are all non-zero and
//!   incompressible, over N page streams, into fresh destination memory;
//! * `streams-N-thp`: into fresh destination memory advised for transparent
//!   huge pages (`livemig_kvm::thp::advise` with `Thp::On`, an opt-in: the
//!   default `Thp::Host` gives no advice): the kernel faults in 2 MiB at a
//!   time.
//!
//! There is no scenario into pre-populated destination memory: the
//! destination scrubs its memory to zero in the handshake (dropping pages
//! populated before it), so such a scenario measured fresh memory again;
//! the fresh-memory fill (below) is what makes pages arrive without a
//! fault instead.
//! * `cap200-{plain,lz4}-{text,random}`: a 200 MiB/s `max_bandwidth` cap
//!   (a slow link), without and with LZ4, on compressible ("text": repeated
//!   structure) and incompressible memory;
//! * `{lz4,plain}-text-uncapped`: compressible memory on uncapped loopback,
//!   LZ4 allowed and not (the link is not the bottleneck there: what
//!   allowing LZ4 costs).
//!
//! `LIVEMIG_BENCH_FILL=off` turns the destination's fresh-memory fill
//! (`Reception::fresh_fill`, `UFFDIO_COPY`) off, to measure the same
//! binary both ways; `LIVEMIG_BENCH_BATCH=N` sends N pages per frame
//! (`MigrationConfig::batch_pages`, default 256); `LIVEMIG_BENCH_ZC=on`
//! sends `PagesGather` frames straight from guest memory instead of
//! copied `Pages` frames (`MigrationConfig::zero_copy`, default off;
//! `LIVEMIG_BENCH_ZC=off` the default).
//!
//! criterion "times" round 0 (through `iter_custom`); the bench also writes
//! `target/livemig-bench/engine.md` with the rates as a share of the
//! loopback TCP bandwidth, the memcpy bandwidth and the fresh-memory fault
//! rate, all measured at start, and the CPU time each migration took (the
//! whole process, and the destination's main thread, `getrusage`): on a
//! busy machine round 0's wall time mostly measures the other load, the
//! CPU time much less so.
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use livemig::memory::{MemoryLayout, RegionDesc};
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::{self, Dialer, Endpoint, OwnedAcceptor};
use livemig::{migrate_streams, CancelToken, MigrationConfig, Reception};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const MIB: u64 = 512;

#[derive(Clone, Copy, PartialEq)]
enum Content {
    Random,
    Text,
}

fn source(content: Content) -> SoftVm {
    let layout = MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: MIB << 20,
    }])
    .expect("layout");
    let vm = SoftVm::new(&layout, &SoftConfig::idle()).expect("soft VM");
    match content {
        Content::Random => vm.fill(11),
        Content::Text => {
            // Repeated structure, a little different on every page.
            let mut page = [0u8; 4096];
            for p in 0..(MIB << 20) / 4096 {
                for (i, c) in page.chunks_exact_mut(64).enumerate() {
                    let line = format!("{:<63}\n", format!("page {p:08} line {i:02} lorem ipsum"));
                    c.copy_from_slice(&line.as_bytes()[..64]);
                }
                if let Some(ram) = vm.ram() {
                    let _ = ram.write_slice(&page, GuestAddress(p * 4096));
                }
            }
        }
    }
    vm.start();
    vm
}

fn populate(vm: &SoftVm, layout: &MemoryLayout) {
    for r in layout.regions() {
        let host = vm
            .ram()
            .map(|m| m.get_host_address(GuestAddress(r.guest_addr)));
        if let Some(Ok(p)) = host {
            // SAFETY: p .. p + size is this region's own mapping.
            unsafe { libc::madvise(p.cast(), r.size as usize, libc::MADV_POPULATE_WRITE) };
        }
    }
}

/// The destination's memory before the first page arrives.
#[derive(Clone, Copy, PartialEq)]
enum Dest {
    /// Fresh anonymous memory, 4 KiB pages.
    Fresh,
    /// Fresh, advised for transparent huge pages.
    Thp,
}

fn advise_thp(vm: &SoftVm) {
    if let Some(ram) = vm.ram() {
        if let Err(e) = livemig_kvm::thp::advise(ram, livemig_kvm::Thp::On) {
            eprintln!("MADV_HUGEPAGE refused: {e}");
        }
    }
}

/// Whether the destination fills fresh memory by `UFFDIO_COPY`
/// (`Reception::fresh_fill`): on unless `LIVEMIG_BENCH_FILL=off`, for
/// measuring the same binary both ways.
fn fresh_fill() -> bool {
    std::env::var("LIVEMIG_BENCH_FILL").map_or(true, |v| v != "off")
}

/// CPU time (user + system) used so far by this process (`RUSAGE_SELF`)
/// or by the calling thread (`RUSAGE_THREAD`).
fn cpu_time(who: libc::c_int) -> Duration {
    // SAFETY: `getrusage` writes one `rusage` into the zeroed value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `ru` outlives the call.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// What one migration cost: the source's report, the CPU time of the
/// whole process (both sides) and of the destination's main thread (which
/// reads the pages of a one-stream migration).
struct Cost {
    report: livemig::Report,
    cpu: Duration,
    dest_cpu: Duration,
    /// The source's calling thread (which sends every page of a
    /// one-stream migration; with page streams, their threads send).
    src_cpu: Duration,
}

/// Pages per `Pages` frame (`MigrationConfig::batch_pages`) from
/// `LIVEMIG_BENCH_BATCH`, for measuring other frame sizes with the same
/// binary; unset: the default.
fn batch_pages() -> Option<u32> {
    std::env::var("LIVEMIG_BENCH_BATCH").ok()?.parse().ok()
}

/// One migration; returns the source's report.
fn migrate_once(
    src: &SoftVm,
    streams: u32,
    dest_memory: Dest,
    cap: Option<u64>,
    compress: bool,
) -> Cost {
    let cpu0 = cpu_time(libc::RUSAGE_SELF);
    let listener =
        transport::listen(&"tcp:127.0.0.1:0".parse::<Endpoint>().expect("ep")).expect("listen");
    let ep = listener.local_endpoint().clone();
    let dest = std::thread::spawn(move || {
        let cpu0 = cpu_time(libc::RUSAGE_THREAD);
        let t = listener.accept().expect("accept");
        let acc = OwnedAcceptor(Some(listener));
        Reception::new(t)
            .accept_streams(acc)
            .fresh_fill(fresh_fill())
            .run(|d| {
                let vm = SoftVm::new(&d.layout, &SoftConfig::idle())?;
                match dest_memory {
                    Dest::Fresh => {}
                    Dest::Thp => advise_thp(&vm),
                }
                Ok(vm)
            })
            .map(|(vm, r)| {
                drop(vm);
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| {
                    eprintln!(
                        "fresh-memory fill {}: {} of {} data pages by UFFDIO_COPY",
                        if fresh_fill() { "on" } else { "off" },
                        r.filled_pages,
                        r.pages
                    )
                });
            })
            .map(|()| cpu_time(libc::RUSAGE_THREAD).saturating_sub(cpu0))
    });
    let t = transport::connect(&ep, Some(Duration::from_secs(5))).expect("connect");
    let mut dialer = Dialer {
        endpoint: ep,
        timeout: Some(Duration::from_secs(5)),
    };
    let mut cfg = MigrationConfig {
        streams,
        compress,
        max_bandwidth: cap,
        downtime_limit: Duration::from_millis(200),
        ..Default::default()
    };
    if let Some(n) = batch_pages() {
        cfg.batch_pages = n;
    }
    if let Ok(v) = std::env::var("LIVEMIG_BENCH_ZC") {
        cfg.zero_copy = v == "on";
    }
    let src_cpu0 = cpu_time(libc::RUSAGE_THREAD);
    let r = migrate_streams(
        src,
        t,
        Some(&mut dialer),
        &cfg,
        &CancelToken::new(),
        &mut |_| {},
    )
    .expect("migration");
    let src_cpu = cpu_time(libc::RUSAGE_THREAD).saturating_sub(src_cpu0);
    let dest_cpu = dest.join().expect("destination thread").expect("receive");
    // The source is paused after a successful migration; run it again.
    use livemig::vm::SourceVm;
    let _ = src.resume();
    Cost {
        report: r,
        cpu: cpu_time(libc::RUSAGE_SELF).saturating_sub(cpu0),
        dest_cpu,
        src_cpu,
    }
}

/// The rate of `MADV_POPULATE_WRITE` into fresh memory, 4 KiB pages or
/// (`thp`) advised for transparent huge pages.
fn fault_rate(thp: bool) -> f64 {
    let layout = MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: MIB << 20,
    }])
    .expect("layout");
    let vm = SoftVm::new(&layout, &SoftConfig::idle()).expect("vm");
    if thp {
        advise_thp(&vm);
    }
    let t = Instant::now();
    populate(&vm, &layout);
    (MIB << 20) as f64 / t.elapsed().as_secs_f64()
}

struct Row {
    name: String,
    round0_ms: Vec<f64>,
    /// Per migration: CPU ms of the process, and of the destination's
    /// main thread.
    cpu_ms: Vec<f64>,
    dest_cpu_ms: Vec<f64>,
    /// CPU ms of the source's calling thread.
    src_cpu_ms: Vec<f64>,
    bytes: u64,
    pages: u64,
}

fn bench(c: &mut Criterion) {
    let lo = livemig_suite::limits::loopback_tcp_rate(1 << 30);
    let mc = livemig_suite::limits::memcpy_rate((MIB << 20) as usize);
    let fr = fault_rate(false);
    let fr_thp = fault_rate(true);
    eprintln!(
        "limits: loopback TCP {:.2} GB/s, memcpy {:.1} GB/s, fresh-memory faults {:.2} GB/s \
         ({:.2} GB/s advised for THP)",
        lo / 1e9,
        mc / 1e9,
        fr / 1e9,
        fr_thp / 1e9
    );
    let mut rows: Vec<Row> = Vec::new();
    let mut g = c.benchmark_group("engine");
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(5));
    let random = source(Content::Random);
    let text = source(Content::Text);
    type Case = (&'static str, Content, u32, Dest, Option<u64>, bool);
    let cases: Vec<Case> = vec![
        ("streams-1", Content::Random, 1, Dest::Fresh, None, false),
        ("streams-2", Content::Random, 2, Dest::Fresh, None, false),
        ("streams-4", Content::Random, 4, Dest::Fresh, None, false),
        ("streams-1-thp", Content::Random, 1, Dest::Thp, None, false),
        ("streams-2-thp", Content::Random, 2, Dest::Thp, None, false),
        (
            "cap200-plain-text",
            Content::Text,
            1,
            Dest::Fresh,
            Some(200 << 20),
            false,
        ),
        (
            "cap200-lz4-text",
            Content::Text,
            1,
            Dest::Fresh,
            Some(200 << 20),
            true,
        ),
        (
            "cap200-plain-random",
            Content::Random,
            1,
            Dest::Fresh,
            Some(200 << 20),
            false,
        ),
        (
            "cap200-lz4-random",
            Content::Random,
            1,
            Dest::Fresh,
            Some(200 << 20),
            true,
        ),
        (
            "lz4-text-uncapped",
            Content::Text,
            1,
            Dest::Fresh,
            None,
            true,
        ),
        (
            "plain-text-uncapped",
            Content::Text,
            1,
            Dest::Fresh,
            None,
            false,
        ),
    ];
    for (name, content, streams, dest_memory, cap, compress) in cases {
        let vm = if content == Content::Text {
            &text
        } else {
            &random
        };
        let mut row = Row {
            name: name.to_string(),
            round0_ms: Vec::new(),
            cpu_ms: Vec::new(),
            dest_cpu_ms: Vec::new(),
            src_cpu_ms: Vec::new(),
            bytes: 0,
            pages: 0,
        };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let c = migrate_once(vm, streams, dest_memory, cap, compress);
                    row.cpu_ms.push(c.cpu.as_secs_f64() * 1000.0);
                    row.dest_cpu_ms.push(c.dest_cpu.as_secs_f64() * 1000.0);
                    row.src_cpu_ms.push(c.src_cpu.as_secs_f64() * 1000.0);
                    let r0 = &c.report.rounds[0];
                    let d = Duration::from_secs_f64(r0.duration_ms / 1000.0);
                    row.round0_ms.push(r0.duration_ms);
                    row.bytes = r0.bytes;
                    row.pages = r0.pages;
                    total += d;
                }
                total
            })
        });
        rows.push(row);
    }
    g.finish();

    let mut md = format!(
        "Limits measured in this run: loopback TCP {:.2} GB/s (one stream), memcpy {:.1} GB/s ({MIB} MiB buffers), \
         fresh-memory population {:.2} GB/s (`MADV_POPULATE_WRITE` of {MIB} MiB; {:.2} GB/s advised for THP).\n\n\
         | scenario | runs | round 0 ms (median) | page data GB/s | share of loopback | wire MB | wire/data | CPU ms per migration (median; destination thread) | source thread CPU ms (median) |\n|---|---|---|---|---|---|---|---|---|\n",
        lo / 1e9,
        mc / 1e9,
        fr / 1e9,
        fr_thp / 1e9
    );
    for r in rows.iter().filter(|r| !r.round0_ms.is_empty()) {
        let v = &r.round0_ms;
        let med = median(v);
        let data = r.pages as f64 * 4096.0;
        let rate = data / (med / 1000.0).max(1e-9);
        md.push_str(&format!(
            "| {} | {} | {:.1} | {:.2} | {:.0} % | {:.0} | {:.2} | {:.0} ({:.0}) | {:.0} |\n",
            r.name,
            v.len(),
            med,
            rate / 1e9,
            100.0 * rate / lo,
            r.bytes as f64 / 1e6,
            r.bytes as f64 / data.max(1.0),
            median(&r.cpu_ms),
            median(&r.dest_cpu_ms),
            median(&r.src_cpu_ms)
        ));
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/livemig-bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("engine.md"), &md);
    eprintln!("\n{md}");
}

/// The median of `v` (the upper one of an even count; 0 if empty).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

criterion_group!(benches, bench);
criterion_main!(benches);
