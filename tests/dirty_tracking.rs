//! The KVM dirty trackers on a real VM: classic, manual-protect and the
//! dirty ring report exactly the pages the guest wrote; a full ring loses
//! nothing; a migration with the ring arrives intact.

mod common;
#[path = "common/pagewriter.rs"]
mod pagewriter;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use livemig::bitmap::DirtyBitmap;
use livemig::memory::MemoryLayout;
use livemig::vm::{DirtyTracker, SourceVm};
use livemig_kvm::DirtyMode;
use livemig_suite::harness::{log_of, migrate, refvmm_path, scratch_dir, start_destination, Vmm};
use pagewriter::PageWriter;
use serde_json::json;

const MEM: u64 = 256 << 20;

/// Panics, compactly, unless `got == want`.
fn assert_same(got: &BTreeSet<u64>, want: &BTreeSet<u64>, what: &str) {
    if got != want {
        let extra: Vec<_> = got.difference(want).take(10).collect();
        let missing: Vec<_> = want.difference(got).take(10).collect();
        panic!(
            "{what}: got {} pages, want {}; extra {} (first {extra:?}), missing {} (first {missing:?})",
            got.len(),
            want.len(),
            got.difference(want).count(),
            want.difference(got).count()
        );
    }
}

fn set_of(b: &DirtyBitmap) -> BTreeSet<u64> {
    let mut s = BTreeSet::new();
    for r in 0..b.num_regions() {
        assert_eq!(r, 0, "one region below 3 GiB");
        for p in 0..b.region_pages(r) {
            if b.is_set(r, p) {
                s.insert(p);
            }
        }
    }
    s
}

/// Re-arms every page in manual-protect mode, chunk by chunk as the engine
/// does (no-op in the other modes).
fn clear_all(t: &mut dyn DirtyTracker, with: &DirtyBitmap) {
    if !t.needs_clear() {
        return;
    }
    let pages = with.region_pages(0);
    let mut c = 0;
    while c < pages {
        let n = 4096.min(pages - c);
        t.clear(0, c, n, with).unwrap();
        c += n;
    }
}

/// Two write rounds with different page sets; returns what each sync saw.
fn two_rounds(mode: DirtyMode) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let w = PageWriter::new(MEM, mode);
    let layout = MemoryLayout::of(w.vm.memory()).unwrap();
    let mut t = w.vm.kvm_dirty_tracker();
    t.start().unwrap();
    // Round 0: everything (manual-protect starts with all pages dirty);
    // re-arm it all.
    let mut b = DirtyBitmap::new(&layout);
    t.sync(&mut b).unwrap();
    let mut all = DirtyBitmap::new(&layout);
    all.set_all();
    clear_all(&mut t, &all);

    w.write_pages(0, 1000, 3);
    let mut b1 = DirtyBitmap::new(&layout);
    t.sync(&mut b1).unwrap();
    clear_all(&mut t, &b1);

    // Overlaps round 1 (every 15th page) and adds new pages.
    w.write_pages(0, 1000, 5);
    let mut b2 = DirtyBitmap::new(&layout);
    t.sync(&mut b2).unwrap();
    clear_all(&mut t, &b2);
    t.stop().unwrap();
    (set_of(&b1), set_of(&b2))
}

#[test]
fn every_mode_reports_exactly_the_written_pages() {
    let Some(_kvm) = common::kvm_or_skip("every_mode_reports_exactly_the_written_pages") else {
        return;
    };
    let want1: BTreeSet<u64> = PageWriter::pages(0, 1000, 3).into_iter().collect();
    let want2: BTreeSet<u64> = PageWriter::pages(0, 1000, 5).into_iter().collect();
    for mode in [
        DirtyMode::ManualProtect,
        DirtyMode::Classic,
        DirtyMode::Ring { entries: 4096 },
        DirtyMode::Ring { entries: 65536 },
    ] {
        let (got1, got2) = two_rounds(mode);
        assert_same(&got1, &want1, &format!("{mode:?} round 1"));
        assert_same(&got2, &want2, &format!("{mode:?} round 2"));
        eprintln!(
            "{mode:?}: exactly the {} + {} written pages",
            got1.len(),
            got2.len()
        );
    }
}

#[test]
fn full_ring_loses_nothing() {
    let Some(_kvm) = common::kvm_or_skip("full_ring_loses_nothing") else {
        return;
    };
    // The smallest ring (256 entries, full at 256 - KVM's reserve): 20000
    // pages fill it about a hundred times.
    let w = PageWriter::new(MEM, DirtyMode::Ring { entries: 256 });
    let ring = w.vm.dirty_ring().expect("ring mode");
    let layout = MemoryLayout::of(w.vm.memory()).unwrap();
    let mut t = w.vm.kvm_dirty_tracker();
    t.start().unwrap();
    let took = w.write_pages(0, 20000, 1);
    let mut b = DirtyBitmap::new(&layout);
    t.sync(&mut b).unwrap();
    let want: BTreeSet<u64> = PageWriter::pages(0, 20000, 1).into_iter().collect();
    assert_same(&set_of(&b), &want, "256-entry ring");
    let exits = ring.ring_full_exits();
    eprintln!(
        "20000 pages through a 256-entry ring: {exits} ring-full exits, {} entries harvested, guest took {took:?}",
        ring.harvested()
    );
    assert!(
        exits >= 20000 / 256,
        "the ring never filled up: {exits} exits"
    );

    // Again, with the migration thread syncing concurrently with the
    // vCPU's own ring-full harvests: the union of all syncs is exact.
    let before = ring.ring_full_exits();
    let stop = AtomicBool::new(false);
    let got = std::thread::scope(|s| {
        let syncer = s.spawn(|| {
            let mut acc = DirtyBitmap::new(&layout);
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                t.sync(&mut acc).unwrap();
                n += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            t.sync(&mut acc).unwrap();
            (acc, n, t)
        });
        w.write_pages(30000, 20000, 1);
        stop.store(true, Ordering::SeqCst);
        syncer.join().unwrap()
    });
    let (acc, syncs, mut t) = got;
    let want: BTreeSet<u64> = PageWriter::pages(30000, 20000, 1).into_iter().collect();
    assert_same(&set_of(&acc), &want, "256-entry ring, concurrent syncs");
    eprintln!(
        "concurrent: {syncs} syncs, {} more ring-full exits",
        ring.ring_full_exits() - before
    );
    t.stop().unwrap();
}

#[test]
fn ring_is_refused_at_a_size_kvm_does_not_take() {
    let Some(_kvm) = common::kvm_or_skip("ring_is_refused_at_a_size_kvm_does_not_take") else {
        return;
    };
    for entries in [100, 128, 1 << 20] {
        let e = livemig_kvm::KvmVm::create(
            &livemig_kvm::VmConfig {
                memory: 64 << 20,
                vcpus: 1,
                nics: vec![],
                dirty_mode: Some(DirtyMode::Ring { entries }),
            },
            std::sync::Arc::new(NoDevices),
            vec![],
        )
        .err()
        .unwrap_or_else(|| panic!("{entries} entries accepted"));
        assert!(e.to_string().contains("power of two"), "{e}");
    }
}

struct NoDevices;
impl livemig_kvm::ExitHandler for NoDevices {
    fn pio_read(&self, _: u16, d: &mut [u8]) {
        d.fill(0xff)
    }
    fn pio_write(&self, _: u16, _: &[u8]) {}
    fn mmio_read(&self, _: u64, d: &mut [u8]) {
        d.fill(0xff)
    }
    fn mmio_write(&self, _: u64, _: &[u8]) {}
}

#[test]
fn refvmm_rejects_a_bad_ring_size() {
    for bad in ["ring:100", "ring:x", "rings"] {
        let out = std::process::Command::new(refvmm_path())
            .args([
                "run",
                "--memory",
                "64M",
                "--kernel",
                "builtin:testguest",
                "--serial",
                "none",
                "--dirty-log",
                bad,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains("--dirty-log"), "{bad}: {err}");
    }
}

#[test]
fn migrate_with_the_dirty_ring() {
    let Some(_kvm) = common::kvm_or_skip("migrate_with_the_dirty_ring") else {
        return;
    };
    let dir = scratch_dir("ring-mig");
    let api = dir.join("src.sock");
    // A small ring and a guest dirtying ~200 MB/s: the vCPU's ring fills
    // many times per round.
    let args: Vec<String> = [
        "run",
        "--memory",
        "256M",
        "--kernel",
        "builtin:testguest",
        "--cmdline",
        "ws=64 rate=50 pattern=rand fresh=1",
        "--dirty-log",
        "ring:1024",
        "--api-socket",
        &api.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut src = Vmm::spawn("src", &args, api).unwrap();
    src.wait_api(Duration::from_secs(20)).unwrap();
    src.wait_ready(Duration::from_secs(30)).unwrap();
    src.wait_for("a T line", Duration::from_secs(30), |g| {
        !g.tlines.is_empty()
    })
    .unwrap();
    let (mut dst, ep) = start_destination(&dir, "dst", &[]).unwrap();
    let t0 = Instant::now();
    let report = migrate(&src, &ep, json!({"downtime_limit_ms": 50})).unwrap();
    assert_eq!(report["status"], "completed", "{report}");
    let tracking = report["dirty_tracking"].as_str().unwrap_or_default();
    assert!(tracking.contains("ring"), "{report}");
    let st = src
        .wait_exit(Duration::from_secs(10))
        .expect("source exits");
    assert!(st.success(), "source exit {st}");
    dst.wait_for("a T line", Duration::from_secs(30), |g| {
        !g.tlines.is_empty()
    })
    .unwrap();
    dst.wait_heartbeats(500, Duration::from_secs(30)).unwrap();
    let s = log_of(&src);
    let d = log_of(&dst);
    assert!(s.corrupt.is_empty(), "source CORRUPT {:?}", s.corrupt);
    assert!(d.corrupt.is_empty(), "destination CORRUPT {:?}", d.corrupt);
    assert!(!d.ready, "the destination guest rebooted");
    let last = s.tlines.last().unwrap();
    let first = d.tlines.first().unwrap();
    assert!(
        first.pages_written >= last.pages_written && first.heartbeats > last.heartbeats,
        "counters did not continue: {last:?} -> {first:?}"
    );
    eprintln!(
        "ring migration: {tracking}; downtime {} ms, total {} ms, rounds {}, {:?} since start",
        report["downtime_ms"],
        report["total_ms"],
        report["rounds"].as_array().map_or(0, |r| r.len()),
        t0.elapsed()
    );
    let _ = std::fs::remove_dir_all(dir);
}
