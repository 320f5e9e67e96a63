//! What a migration costs against the guest's size (issue 16, "cost that
//! follows touched memory"): the same touched memory in a small and in a
//! large, sparse soft VM. Measurements, not assertions on time: the test
//! is ignored by default and prints its numbers; run it with
//!
//! ```text
//! cargo test --release -p livemig --test guest_size_cost -- --ignored --nocapture
//! ```
//!
//! `LIVEMIG_COST_SIZES` (GiB, comma separated, default `2,64`) and
//! `LIVEMIG_COST_TOUCHED` (MiB, default 256) change the sizes.
// The plain `migrate`/`receive` calls, whether or not the builders have
// replaced them yet: a measurement, not an API example.
#![allow(deprecated)]

use std::time::{Duration, Instant};

use livemig::memory::{allocate, MemoryLayout, RegionDesc};
use livemig::testing::soft::{SoftConfig, SoftTracking, SoftVm};
use livemig::transport::mem;
use livemig::{migrate, receive, CancelToken, MigrationConfig, ReceiveConfig};
use vm_memory::{Bytes, GuestAddress};

fn env_list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// One migration of a `gib` GiB soft VM with the first `touched_mib` MiB
/// written; prints the report's timings and the destination's.
fn one(gib: u64, touched_mib: u64, tracking: SoftTracking) {
    let layout = MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: gib << 30,
    }])
    .unwrap();
    let t_alloc = Instant::now();
    let src =
        SoftVm::with_memory(allocate(&layout).unwrap(), &SoftConfig::idle(), tracking).unwrap();
    let ram = src.ram().unwrap();
    let page = [0x5au8; 4096];
    for p in 0..(touched_mib << 20) / 4096 {
        ram.write_slice(&page, GuestAddress(p * 4096)).unwrap();
    }
    let alloc_ms = t_alloc.elapsed().as_secs_f64() * 1e3;
    src.start();
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        let cfg = ReceiveConfig {
            io_timeout: Duration::from_secs(30),
        };
        receive(Box::new(b), &cfg, |d| {
            SoftVm::new(&d.layout, &SoftConfig::idle())
        })
        .map(|(_, r)| r)
    });
    let r = migrate(
        &src,
        Box::new(a),
        &MigrationConfig::default(),
        &CancelToken::new(),
        &mut |_| {},
    )
    .expect("migration");
    let d = dest.join().unwrap().expect("destination");
    let r0 = r.rounds.first().map_or(0.0, |r| r.duration_ms);
    println!(
        "{gib:>3} GiB, {touched_mib} MiB touched, {tracking:?}: total {:.1} ms, set-up {:.1} ms, \
         first page {:.1} ms, round 0 {r0:.1} ms, rounds {}, downtime {:.2} ms \
         (final sync {:.2} ms); destination {:?} (source set-up incl. {alloc_ms:.0} ms fill not counted)",
        r.total_ms,
        r.setup_ms,
        r.first_page_ms,
        r.rounds.len(),
        r.downtime_ms,
        r.downtime_breakdown.final_sync_ms,
        d,
    );
}

#[test]
#[ignore = "a measurement: prints numbers, run by hand with --ignored --nocapture"]
fn cost_against_guest_size() {
    let touched = env_list("LIVEMIG_COST_TOUCHED", "256")[0];
    for gib in env_list("LIVEMIG_COST_SIZES", "2,64") {
        for tracking in [SoftTracking::ManualProtect, SoftTracking::Bitmap] {
            one(gib, touched, tracking);
        }
    }
}
