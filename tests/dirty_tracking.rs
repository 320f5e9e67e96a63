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
use livemig::testing::dirty::{check_dirty_tracker, PageRun, PageWindow};
use livemig::vm::{DirtyTracker, Rearm, SourceVm};
use livemig_kvm::{DirtyMode, Thp};
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
    if t.rearm_mode() != Rearm::BeforeRead {
        return;
    }
    let pages = with.region_pages(0);
    let mut c = 0;
    while c < pages {
        let n = 4096.min(pages - c);
        t.rearm(0, c, n, with).unwrap();
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

/// The shared dirty-tracker contract (`livemig::testing::check_dirty_tracker`,
/// which the software VM's tracker runs too) in each KVM mode, with the
/// guest writing the pages the check asks for.
#[test]
fn every_mode_passes_the_dirty_tracker_check() {
    let Some(_kvm) = common::kvm_or_skip("every_mode_passes_the_dirty_tracker_check") else {
        return;
    };
    let base = pagewriter::WRITE_BASE / 4096;
    let window = PageWindow {
        region: 0,
        first: base,
        pages: 1024,
    };
    for mode in [
        DirtyMode::Classic,
        DirtyMode::ManualProtect,
        DirtyMode::Ring { entries: 4096 },
    ] {
        let w = PageWriter::new(MEM, mode);
        let layout = MemoryLayout::of(w.vm.memory()).unwrap();
        let mut t = w.vm.kvm_dirty_tracker();
        check_dirty_tracker(&mut t, &layout, window, &mut |run: &PageRun| {
            if run.region != 0 || run.first < base {
                return Err(format!("{run:?} is outside the guest's window"));
            }
            w.write_pages(run.first - base, run.count, run.stride);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{mode:?} ({}): {e}", t.describe()));
        eprintln!("{mode:?}: passes the dirty-tracker check");
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

// ---------------------------------------------------------------------
// An SMP guest writing pages for the first time while a migration runs,
// with the migration modelled exactly as the engine runs it, per mode.
// ---------------------------------------------------------------------

/// Guest memory of the SMP runs: all of region 0 (3 GiB, below the hole)
/// and 256 MiB in region 1 (from 4 GiB). Untouched memory costs nothing.
const SMP_MEM: u64 = (3 << 30) + (256 << 20);
/// Pages each vCPU owns in each region (128 MiB): more than it can write
/// for the first time during one run, so every round sees first writes.
const SMP_PAGES: u64 = 32768;
/// Spin-loop iterations between two pages of a vCPU (about 1 cycle
/// each): keeps each vCPU near 5000 first writes a second, so the run's
/// copying stays short on this 2-core machine.
const SMP_DELAY: u64 = 20_000;
/// Pre-copy rounds after round 0.
const SMP_ROUNDS: u32 = 4;
/// First writes each vCPU must make while tracking runs.
const SMP_MIN_FRESH: u64 = 1000;
/// Longest pre-copy phase while waiting for `SMP_MIN_FRESH`.
const SMP_MAX_PRECOPY: Duration = Duration::from_secs(10);
/// Time the guest runs between two rounds.
const SMP_ROUND_GAP: Duration = Duration::from_millis(60);

/// Which pages of `pages` host pages from `ptr` exist (present or swapped,
/// from /proc/self/pagemap): an anonymous page that is neither was never
/// touched and reads as zero. The engine's round-0 skip decides the same.
fn populated(ptr: *const u8, pages: u64) -> Vec<bool> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
    let first = ptr as u64 / 4096;
    let mut buf = vec![0u8; (pages * 8) as usize];
    f.read_exact_at(&mut buf, first * 8).expect("read pagemap");
    buf.chunks_exact(8)
        .map(|e| u64::from_le_bytes(e.try_into().unwrap()) & (3 << 62) != 0)
        .collect()
}

/// Private anonymous memory of one region's size: the destination.
struct Anon {
    ptr: *mut u8,
    len: usize,
}

impl Anon {
    fn new(len: usize) -> Anon {
        // SAFETY: a fresh private anonymous mapping, checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Anon {
            ptr: p as *mut u8,
            len,
        }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in new().
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// Guest memory (host mapping) and the destination's copy of it.
struct Mirror {
    guest: Vec<(*mut u8, u64)>,
    dest: Vec<Anon>,
}

impl Mirror {
    fn new(w: &PageWriter) -> Mirror {
        let guest: Vec<(*mut u8, u64)> =
            w.vm.memory()
                .regions()
                .iter()
                .map(|r| (r.host, r.len / 4096))
                .collect();
        let dest = guest
            .iter()
            .map(|(_, n)| Anon::new((n * 4096) as usize))
            .collect();
        Mirror { guest, dest }
    }

    /// "Sends" a page: copies it from guest memory into the destination.
    fn copy(&self, region: usize, page: u64) {
        let (g, n) = self.guest[region];
        assert!(page < n);
        let off = (page * 4096) as usize;
        // SAFETY: in bounds of both mappings (same size); the guest may be
        // writing the page meanwhile, which is exactly what a migration
        // reads (the dirty log catches the write).
        unsafe { std::ptr::copy_nonoverlapping(g.add(off), self.dest[region].ptr.add(off), 4096) };
    }

    /// Copies the pages of `bitmap` in `region`'s chunk `first..end`.
    fn copy_set(&self, bitmap: &DirtyBitmap, region: usize, first: u64, end: u64) {
        for run in bitmap.runs_in(region, first, end, u64::MAX) {
            for p in run.first_page..run.first_page + run.npages {
                self.copy(region, p);
            }
        }
    }

    /// Round 0 as the engine runs it, per 1024-page chunk: in manual-protect
    /// mode re-arm the chunk first (all-ones mask: `INITIALLY_SET` left every
    /// page dirty and unprotected), then decide which pages exist (pagemap),
    /// then copy those. Clear before decide: a page first written after the
    /// decision is then caught by the dirty log.
    fn round0(&self, t: &mut dyn DirtyTracker, layout: &MemoryLayout) {
        let mut all = DirtyBitmap::new(layout);
        all.set_all();
        for (region, &(g, pages)) in self.guest.iter().enumerate() {
            let mut chunk = 0;
            while chunk < pages {
                let end = (chunk + CHUNK).min(pages);
                if t.rearm_mode() == Rearm::BeforeRead {
                    t.rearm(region, chunk, end - chunk, &all).unwrap();
                }
                // SAFETY: chunk < pages: inside the region's mapping.
                let exist = populated(unsafe { g.add((chunk * 4096) as usize) }, end - chunk);
                for (i, e) in exist.iter().enumerate() {
                    if *e {
                        self.copy(region, chunk + i as u64);
                    }
                }
                chunk = end;
            }
        }
    }

    /// A pre-copy round (or, with `clear` false, the final copy) as the
    /// engine sends one: per chunk holding dirty pages, re-arm those pages
    /// (manual-protect), then copy them.
    fn send(&self, t: &mut dyn DirtyTracker, bitmap: &DirtyBitmap, clear: bool) {
        for region in 0..bitmap.num_regions() {
            let pages = bitmap.region_pages(region);
            let mut chunk = 0;
            while chunk < pages {
                let end = (chunk + CHUNK).min(pages);
                if bitmap.any_in(region, chunk, end) {
                    if clear && t.rearm_mode() == Rearm::BeforeRead {
                        t.rearm(region, chunk, end - chunk, bitmap).unwrap();
                    }
                    self.copy_set(bitmap, region, chunk, end);
                }
                chunk = end;
            }
        }
    }

    /// Every page whose destination copy differs from guest memory (pages
    /// that exist in neither are zero in both).
    fn differences(&self) -> Vec<(usize, u64)> {
        let mut out = Vec::new();
        for (region, &(g, pages)) in self.guest.iter().enumerate() {
            let d = self.dest[region].ptr;
            let eg = populated(g, pages);
            let ed = populated(d, pages);
            for p in 0..pages {
                if !eg[p as usize] && !ed[p as usize] {
                    continue;
                }
                let off = (p * 4096) as usize;
                // SAFETY: in bounds of both mappings; the guest is paused.
                let same = unsafe {
                    std::slice::from_raw_parts(g.add(off), 4096)
                        == std::slice::from_raw_parts(d.add(off), 4096)
                };
                if !same {
                    out.push((region, p));
                }
            }
        }
        out
    }

    /// Pages that exist in guest memory, per region.
    fn existing(&self) -> Vec<Vec<bool>> {
        self.guest.iter().map(|&(g, n)| populated(g, n)).collect()
    }
}

/// The engine's chunk (`STREAM_CHUNK_PAGES`): the unit of clear and send.
const CHUNK: u64 = livemig::protocol::STREAM_CHUNK_PAGES;

/// Host threads that spin (the host under load) until dropped.
struct Spinners {
    stop: std::sync::Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Spinners {
    fn start(n: usize) -> Spinners {
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Spinners { stop, threads }
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What one modelled migration saw.
#[derive(Debug)]
struct SmpRun {
    /// Pages whose destination copy differs from the guest, per owner
    /// (vCPU index; the last entry: pages no vCPU owns).
    lost: Vec<u64>,
    /// First few lost pages (region, page).
    first_lost: Vec<(usize, u64)>,
    /// Pages each vCPU wrote for the first time while tracking ran.
    fresh: Vec<u64>,
    /// Ring-full exits (ring mode).
    ring_full: u64,
    /// A vCPU thread that stopped with an error.
    fatal: Option<String>,
}

/// Auto-converge as the engine runs it (`Throttler`): pause every vCPU,
/// hold it a few milliseconds, resume, run 10 ms, until `stop`. Every
/// pause kicks each vCPU thread with a signal, wherever it is.
fn throttle_vcpus(w: &PageWriter, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        w.vm.pause_vcpus().unwrap();
        std::thread::sleep(Duration::from_millis(3));
        w.vm.resume_vcpus();
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Pages per vCPU that exist in `after` but not in `before` (per region
/// and page, from [`Mirror::existing`]): its first writes in between.
fn fresh_since(before: &[Vec<bool>], after: &[Vec<bool>], pages: u64, vcpus: usize) -> Vec<u64> {
    let mut fresh = vec![0u64; vcpus];
    for (r, (b, a)) in before.iter().zip(after).enumerate() {
        for (p, (b, a)) in b.iter().zip(a).enumerate() {
            if *a && !*b {
                if let Some(o) = PageWriter::fresh_owner(r, p as u64, pages, vcpus) {
                    fresh[o] += 1;
                }
            }
        }
    }
    fresh
}

/// The conditions of one modelled migration.
#[derive(Debug, Clone, Copy)]
struct SmpCase {
    /// A name for the log.
    name: &'static str,
    /// Two host threads spin meanwhile (the host's two CPUs are busy
    /// beside the vCPUs).
    load: bool,
    /// Auto-converge pauses the vCPUs every ~13 ms ([`throttle_vcpus`]).
    throttle: bool,
    /// Pages each vCPU owns per region.
    pages: u64,
    /// Spin-loop iterations between two pages.
    delay: u64,
}

/// The cases every mode runs: first writes all along (idle, loaded,
/// loaded and throttled); and a small range written at full speed, so each
/// vCPU also rewrites its pages many times in one run, on a loaded host
/// with auto-converge kicking the vCPUs — a page whose re-arming was lost
/// shows up as a lost rewrite.
const SMP_CASES: [SmpCase; 4] = [
    SmpCase {
        name: "idle",
        load: false,
        throttle: false,
        pages: SMP_PAGES,
        delay: SMP_DELAY,
    },
    SmpCase {
        name: "loaded",
        load: true,
        throttle: false,
        pages: SMP_PAGES,
        delay: SMP_DELAY,
    },
    SmpCase {
        name: "loaded+throttled",
        load: true,
        throttle: true,
        pages: SMP_PAGES,
        delay: SMP_DELAY,
    },
    SmpCase {
        name: "rewrites, loaded+throttled",
        load: true,
        throttle: true,
        pages: 4096,
        delay: 1,
    },
];

/// One migration of a 2-vCPU guest whose vCPUs write pages of their own
/// for the first time all along, modelled as the engine runs it: start
/// tracking; round 0 (see [`Mirror::round0`]); `SMP_ROUNDS` or more rounds
/// of sync + copy; pause; final sync + copy; compare.
fn smp_migration(mode: DirtyMode, case: &SmpCase, thp: Thp) -> SmpRun {
    const VCPUS: usize = 2;
    let w = PageWriter::with_vcpus_thp(SMP_MEM, VCPUS as u32, mode, thp);
    let layout = MemoryLayout::of(w.vm.memory()).unwrap();
    assert_eq!(layout.regions().len(), 2, "two regions");
    let m = Mirror::new(&w);
    let spin = case.load.then(|| Spinners::start(2));
    let pages = case.pages;
    w.start_fresh(pages, case.delay, true);
    // The guest is already writing when tracking starts.
    std::thread::sleep(Duration::from_millis(20));
    let before = m.existing();
    let mut t = w.vm.kvm_dirty_tracker();
    t.start().unwrap();
    m.round0(&mut t, &layout);
    let mut bitmap = DirtyBitmap::new(&layout);
    t.sync(&mut bitmap).unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        if case.throttle {
            s.spawn(|| throttle_vcpus(&w, &stop));
        }
        // At least SMP_ROUNDS rounds, and more (up to SMP_MAX_PRECOPY)
        // until both vCPUs wrote SMP_MIN_FRESH pages for the first time
        // while tracking ran: a starved vCPU on a busy host must not turn
        // the run into one that tests nothing.
        let t0 = Instant::now();
        let mut round = 0;
        loop {
            std::thread::sleep(SMP_ROUND_GAP);
            m.send(&mut t, &bitmap, true);
            bitmap.clear();
            t.sync(&mut bitmap).unwrap();
            round += 1;
            if round >= SMP_ROUNDS
                && (t0.elapsed() > SMP_MAX_PRECOPY
                    || fresh_since(&before, &m.existing(), pages, VCPUS)
                        .iter()
                        .all(|f| *f >= SMP_MIN_FRESH))
            {
                break;
            }
        }
        stop.store(true, Ordering::SeqCst);
    });
    // Stop-and-copy: the last round's dirty pages plus what the final sync
    // finds, without re-arming.
    w.vm.pause_vcpus().unwrap();
    t.sync(&mut bitmap).unwrap();
    m.send(&mut t, &bitmap, false);
    drop(spin);
    let diffs = m.differences();
    let after = m.existing();
    t.stop().unwrap();
    let mut lost = vec![0u64; VCPUS + 1];
    for &(r, p) in &diffs {
        let owner = PageWriter::fresh_owner(r, p, pages, VCPUS).unwrap_or(VCPUS);
        lost[owner] += 1;
    }
    let fresh = fresh_since(&before, &after, pages, VCPUS);
    SmpRun {
        fatal: w.vm.vcpus().fatal().map(|e| e.to_string()),
        lost,
        first_lost: diffs.into_iter().take(8).collect(),
        fresh,
        ring_full: w.vm.dirty_ring().map_or(0, |r| r.ring_full_exits()),
    }
}

/// Runs `smp_migration` `runs` times per case of [`SMP_CASES`] (only the
/// one named by `LIVEMIG_SMP_CASE`, if set) and panics with the losses if
/// any run lost a page or a vCPU thread failed. Guest memory in 4 KiB
/// pages (`Thp::Off`): the host then populates each page at its first
/// write, which is what the pagemap check of first writes sees.
fn smp_runs(mode: DirtyMode, runs: usize) {
    smp_runs_with(mode, runs, Thp::Off)
}

/// [`smp_runs`] with guest memory advised `thp`. With THP the host
/// populates 2 MiB at a guest's first write to any page of it, so the
/// pagemap sees first writes per huge page: the `rewrites` case (16 MiB per
/// vCPU, all populated before tracking starts) has none to check and is
/// left out.
fn smp_runs_with(mode: DirtyMode, runs: usize, thp: Thp) {
    let mut failures = Vec::new();
    let only = std::env::var("LIVEMIG_SMP_CASE").ok();
    for case in SMP_CASES
        .iter()
        .filter(|c| only.as_deref().is_none_or(|o| o == c.name))
        .filter(|c| thp == Thp::Off || c.pages >= SMP_PAGES)
    {
        let what = case.name;
        for i in 0..runs {
            let t0 = Instant::now();
            let r = smp_migration(mode, case, thp);
            let lost: u64 = r.lost.iter().sum();
            eprintln!(
                "{mode:?} {what} run {i}: lost {lost} {:?} (per vCPU, other), fresh pages written while tracking {:?}, ring-full exits {}, vCPU error {:?}, {:?}",
                r.lost,
                r.fresh,
                r.ring_full,
                r.fatal,
                t0.elapsed()
            );
            // The run must exercise what it claims: both vCPUs wrote many
            // pages for the first time while tracking ran.
            assert!(
                r.fresh.iter().all(|f| *f >= SMP_MIN_FRESH),
                "{mode:?}: too few first writes during tracking: {:?}",
                r.fresh
            );
            if lost > 0 {
                failures.push(format!(
                    "{what} run {i}: {lost} pages lost {:?} (first {:?})",
                    r.lost, r.first_lost
                ));
            }
            if let Some(e) = r.fatal {
                failures.push(format!("{what} run {i}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{mode:?}: {failures:#?}");
}

#[test]
fn smp_first_writes_survive_classic() {
    let Some(_kvm) = common::kvm_or_skip("smp_first_writes_survive_classic") else {
        return;
    };
    smp_runs(DirtyMode::Classic, 1);
}

#[test]
fn smp_first_writes_survive_manual_protect() {
    let Some(_kvm) = common::kvm_or_skip("smp_first_writes_survive_manual_protect") else {
        return;
    };
    smp_runs(DirtyMode::ManualProtect, 1);
}

/// The SMP first-write runs on guest memory advised for transparent huge
/// pages (livemig-kvm's default), in every mode.
#[test]
fn smp_first_writes_survive_every_mode_with_thp() {
    let Some(_kvm) = common::kvm_or_skip("smp_first_writes_survive_every_mode_with_thp") else {
        return;
    };
    for mode in [
        DirtyMode::Classic,
        DirtyMode::ManualProtect,
        DirtyMode::Ring {
            entries: livemig_kvm::dirty::DEFAULT_RING_ENTRIES,
        },
    ] {
        smp_runs_with(mode, 1, Thp::On);
    }
}

#[test]
fn smp_first_writes_survive_ring() {
    let Some(_kvm) = common::kvm_or_skip("smp_first_writes_survive_ring") else {
        return;
    };
    smp_runs(
        DirtyMode::Ring {
            entries: livemig_kvm::dirty::DEFAULT_RING_ENTRIES,
        },
        1,
    );
}

/// The soak: `LIVEMIG_SMP_RUNS` (default 20) runs per mode and case of
/// [`SMP_CASES`]. `LIVEMIG_SMP_MODE` picks one mode (`ring`: 4096 entries,
/// `ring256`, `ring65536`, `classic`, `manual`; default: ring, classic and
/// manual-protect in turn), `LIVEMIG_SMP_CASE` one case by name.
#[test]
#[ignore]
fn smp_first_writes_soak() {
    let Some(_kvm) = common::kvm_or_skip("smp_first_writes_soak") else {
        return;
    };
    let runs = std::env::var("LIVEMIG_SMP_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let modes: Vec<DirtyMode> = match std::env::var("LIVEMIG_SMP_MODE").as_deref() {
        Ok("ring") => vec![DirtyMode::Ring { entries: 4096 }],
        Ok("ring256") => vec![DirtyMode::Ring { entries: 256 }],
        Ok("ring65536") => vec![DirtyMode::Ring { entries: 65536 }],
        Ok("classic") => vec![DirtyMode::Classic],
        Ok("manual") => vec![DirtyMode::ManualProtect],
        _ => vec![
            DirtyMode::Ring { entries: 4096 },
            DirtyMode::Classic,
            DirtyMode::ManualProtect,
        ],
    };
    for mode in modes {
        smp_runs(mode, runs);
    }
}

/// A signal that reaches the thread resetting the rings must not cost a
/// page. Measured on this machine's kernel (6.18): with a signal pending,
/// `KVM_RESET_DIRTY_RINGS` stops early and returns the (smaller) number of
/// entries it reset, not an error; the entries it did not reach stay
/// un-reset, their pages writable and unlogged. Calling it again until every
/// harvested entry is reset is not enough either: each interruption drops
/// the pages of the batch KVM was coalescing (they are taken off the ring
/// but never write-protected again; 418 of 60000 pages in one run), so a
/// later write to them is never reported. The vCPU threads get a signal at
/// every pause (auto-converge pauses every 10 ms) while they may be
/// harvesting a full ring. Here the syncing thread is showered with the
/// vCPU kick signal while it resets 60000 entries; then the guest rewrites
/// every page and the next sync must report every one of them, and no
/// reset may have been cut short.
#[test]
fn a_signal_during_ring_reset_loses_nothing() {
    let Some(_kvm) = common::kvm_or_skip("a_signal_during_ring_reset_loses_nothing") else {
        return;
    };
    const PAGES: u64 = 60000;
    let w = PageWriter::new(MEM * 2, DirtyMode::Ring { entries: 65536 });
    let layout = MemoryLayout::of(w.vm.memory()).unwrap();
    let want: BTreeSet<u64> = PageWriter::pages(0, PAGES, 1).into_iter().collect();
    let mut t = w.vm.kvm_dirty_tracker();
    t.start().unwrap();
    let mut interrupted = 0;
    for attempt in 0..5 {
        w.write_pages(0, PAGES, 1);
        // Reset the ~60000 entries while another thread keeps kicking us.
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as usize;
        let stop = AtomicBool::new(false);
        let kicks = std::sync::atomic::AtomicU64::new(0);
        let mut b = DirtyBitmap::new(&layout);
        let r = std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    // SAFETY: `me` is this test's thread, alive until the
                    // scope ends; the kick signal's handler is installed
                    // (by the VM's vCPU set) and does nothing on a thread
                    // without a vCPU.
                    unsafe {
                        libc::pthread_kill(me as libc::pthread_t, livemig_kvm::vcpu::kick_signal())
                    };
                    kicks.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_micros(5));
                }
            });
            while kicks.load(Ordering::SeqCst) < 3 {
                std::thread::yield_now();
            }
            let r = t.sync(&mut b);
            stop.store(true, Ordering::SeqCst);
            r
        });
        if let Err(e) = r {
            interrupted += 1;
            eprintln!("attempt {attempt}: sync failed: {e}");
            t.sync(&mut b).unwrap();
        }
        assert_same(&set_of(&b), &want, &format!("attempt {attempt}: harvest"));
        // Every page must be armed again: a rewrite of each is reported.
        w.write_pages(0, PAGES, 1);
        let mut b2 = DirtyBitmap::new(&layout);
        t.sync(&mut b2).unwrap();
        assert_same(
            &set_of(&b2),
            &want,
            &format!("attempt {attempt}: rewrite after a showered reset"),
        );
    }
    assert_eq!(interrupted, 0, "a sync failed {interrupted} times");
    // Not only no page lost: no reset was cut short at all (the signals
    // were blocked; the sticky fallback for resets that stop early anyway
    // is covered by the unit tests of dirty.rs).
    let ring = w.vm.dirty_ring().expect("ring mode");
    assert_eq!(
        ring.early_resets(),
        0,
        "KVM_RESET_DIRTY_RINGS stopped early"
    );
    t.stop().unwrap();
}

/// Whether KVM holds a dirty log for `slot` (logging on): KVM_GET_DIRTY_LOG
/// fails on a slot whose logging is off.
fn logging_on(w: &PageWriter, slot: u32, size: u64) -> bool {
    w.vm.vm_fd().get_dirty_log(slot, size as usize).is_ok()
}

/// Issue 16: after a completed migration (`stop_migrated`) the KVM tracker
/// leaves dirty logging on, for the VM's teardown; the VM turns it off
/// before its vCPUs run again, and so does a new tracker before it
/// starts. `stop` (a failed or cancelled migration) turns it off at once.
#[test]
fn logging_left_on_by_a_completed_migration_is_off_before_the_guest_runs() {
    let Some(_kvm) = common::kvm_or_skip("logging_left_on_by_a_completed_migration") else {
        return;
    };
    let w = PageWriter::new(MEM, DirtyMode::ManualProtect);
    assert!(!logging_on(&w, 0, MEM));
    // A failed migration: off at once.
    let mut t = w.vm.kvm_dirty_tracker();
    t.start().unwrap();
    assert!(logging_on(&w, 0, MEM));
    t.stop().unwrap();
    drop(t);
    assert!(!logging_on(&w, 0, MEM) && !w.vm.dirty_logging_left_on());
    // A completed one: left on, until the vCPUs run again.
    let mut t = w.vm.kvm_dirty_tracker();
    t.start().unwrap();
    t.stop_migrated().unwrap();
    drop(t);
    assert!(logging_on(&w, 0, MEM) && w.vm.dirty_logging_left_on());
    SourceVm::resume(&w.vm).unwrap();
    assert!(!logging_on(&w, 0, MEM) && !w.vm.dirty_logging_left_on());
    SourceVm::pause(&w.vm).unwrap();
    // Left on, then a new tracker: it starts from a fresh log (every page
    // reported again in manual-protect mode), and its stop turns it off.
    let layout = MemoryLayout::of(w.vm.memory()).unwrap();
    let mut t = w.vm.kvm_dirty_tracker();
    t.start().unwrap();
    let mut all = DirtyBitmap::new(&layout);
    all.set_all();
    clear_all(&mut t, &all);
    t.stop_migrated().unwrap();
    drop(t);
    let mut t = w.vm.kvm_dirty_tracker();
    t.start().unwrap();
    assert!(!w.vm.dirty_logging_left_on());
    let mut b = DirtyBitmap::new(&layout);
    t.sync(&mut b).unwrap();
    assert_eq!(b.count(), MEM / 4096, "a fresh log reports every page");
    t.stop().unwrap();
    drop(t);
    assert!(!logging_on(&w, 0, MEM));
    // A tracker made without the VM's flag turns logging off either way.
    let slots = [livemig_kvm::dirty::Slot {
        slot: 0,
        guest_addr: 0,
        size: MEM,
        host_addr: w.vm.memory().regions()[0].host as u64,
    }];
    let mut t = livemig_kvm::dirty::KvmDirtyTracker::new(
        w.vm.vm_fd(),
        &slots,
        DirtyMode::ManualProtect,
        None,
    );
    t.start().unwrap();
    t.stop_migrated().unwrap();
    assert!(!logging_on(&w, 0, MEM));
}

/// Issue 16: a manual-protect tracker started for some slots only turns
/// logging on for those; `start_region` adds one (every page of it
/// reported, as at a start), and `stop` turns off exactly what is on.
#[test]
fn start_regions_turns_logging_on_for_the_slots_asked_only() {
    let Some(_kvm) = common::kvm_or_skip("start_regions_turns_logging_on") else {
        return;
    };
    let mem = (3 << 30) + (64 << 20);
    let high = 64u64 << 20;
    let w = PageWriter::new(mem, DirtyMode::ManualProtect);
    let layout = MemoryLayout::of(w.vm.memory()).unwrap();
    let mut t = w.vm.kvm_dirty_tracker();
    t.start_regions(&[true, false]).unwrap();
    assert!(logging_on(&w, 0, 3 << 30) && !logging_on(&w, 1, high));
    let mut b = DirtyBitmap::new(&layout);
    t.sync(&mut b).unwrap();
    assert_eq!(b.count(), (3u64 << 30) / 4096, "region 1 reports nothing");
    let mut all = DirtyBitmap::new(&layout);
    all.set_all();
    assert!(t.rearm(1, 0, 64, &all).is_err(), "region 1 is not tracked");
    t.start_region(1).unwrap();
    assert!(logging_on(&w, 1, high));
    let mut b = DirtyBitmap::new(&layout);
    t.sync(&mut b).unwrap();
    assert_eq!(b.count_in(1, 0, high / 4096), high / 4096);
    t.rearm(1, 0, high / 4096, &all).unwrap();
    t.stop().unwrap();
    assert!(!logging_on(&w, 0, 3 << 30) && !logging_on(&w, 1, high));
}
