//! Placement at cluster scale: choosing a destination among 10,000 hosts.
//!
//! `cargo bench --bench placement` (under a minute; no KVM needed).
//! Measures `choose_destination` (filter, score, rank and explain all
//! 10,000 hosts), `evaluate` on 1,000 hosts, and parsing a 10,000-host
//! JSON document. Results are recorded in docs/placement.md.

use std::collections::BTreeSet;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use livemig_placement::{choose_destination, evaluate, parse_hosts, Host, PlacementConfig, Vm};

/// A deterministic cluster of `n` hosts: mixed sizes, loads, links and
/// labels; about 2% in maintenance, some lacking `avx2`.
fn cluster(n: usize) -> Vec<Host> {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |m: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % m
    };
    let all: BTreeSet<String> = ["aes", "avx2", "avx512f"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let old: BTreeSet<String> = ["aes", "sse4_2"].iter().map(|s| s.to_string()).collect();
    (0..n)
        .map(|i| {
            let total = 65_536 * (1 + next(4));
            Host {
                name: format!("host-{i:05}"),
                migration_address: format!("tcp:10.{}.{}.1:4444", i / 256, i % 256),
                memory_total_mib: total,
                memory_free_mib: total * next(1001) / 1000,
                cpus: 16 * (1 + next(4) as u32),
                cpu_load: next(640) as f64 / 10.0,
                vcpus_allocated: next(200) as u32,
                cpu_model: "EPYC 7543".to_string(),
                cpu_features: if next(10) == 0 {
                    old.clone()
                } else {
                    all.clone()
                },
                link_bandwidth_mib_s: 500 + next(2000),
                labels: [
                    format!("rack:r{}", next(40)),
                    format!("group:g{}", next(100)),
                ]
                .into_iter()
                .collect(),
                maintenance: next(50) == 0,
                agent: None,
            }
        })
        .collect()
}

fn vm() -> Vm {
    Vm {
        name: "bench".to_string(),
        memory_mib: 16_384,
        vcpus: 8,
        required_cpu_features: ["aes", "avx2"].iter().map(|s| s.to_string()).collect(),
        dirty_rate_mib_s: 200,
        anti_affinity: ["group:g7".to_string()].into_iter().collect(),
        current_host: "host-00000".to_string(),
    }
}

fn bench_placement(c: &mut Criterion) {
    let cfg = PlacementConfig::default();
    let vm = vm();
    let hosts = cluster(10_000);
    let small = cluster(1_000);
    let json = serde_json::to_string(&hosts).unwrap_or_default();

    c.bench_function("choose_destination/10000 hosts", |b| {
        b.iter(|| choose_destination(black_box(&hosts), black_box(&vm), &cfg))
    });
    c.bench_function("evaluate/1000 hosts", |b| {
        b.iter(|| evaluate(black_box(&small), black_box(&vm), &cfg))
    });
    c.bench_function("parse_hosts/10000 hosts", |b| {
        b.iter(|| parse_hosts(black_box(&json), "bench"))
    });
}

criterion_group!(benches, bench_placement);
criterion_main!(benches);
