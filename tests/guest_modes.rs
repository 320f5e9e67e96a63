//! The test guest's real-guest memory modes on real KVM (issue 12): `fresh=1` (a page's first
//! write is its first touch; the verifier never reads a never-written page), `zero=<n>` (pages
//! that become all zero again are verified as zero) and `smp=<n>` (application processors write
//! and verify their own part of the working set). Each test shows the mode is real and that the
//! checker fires in it: the VMM changes a page behind the guest's back and exactly that page is
//! reported.

mod common;

use std::time::Duration;

use livemig_suite::harness::{log_of, migrate, scratch_dir, start_destination, start_source, Vmm};
use livemig_testguest::{expected_qword, GEN_TABLE, WS_BASE};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// The VMM writes `value` at byte `offset` of working-set page `page`.
fn poke(vm: &Vmm, page: u64, offset: u64, value: u64) {
    let gpa = WS_BASE + page * 4096 + offset;
    let r = vm
        .api(
            &json!({"cmd":"write-memory","gpa": gpa, "value": value}),
            |_| {},
        )
        .unwrap();
    assert_eq!(r["result"], "ok", "{r}");
}

/// `len` bytes of guest memory at `gpa`, read by the VMM.
fn peek(vm: &Vmm, gpa: u64, len: usize) -> Vec<u8> {
    let r = vm
        .api(&json!({"cmd":"read-memory","gpa": gpa, "len": len}), |_| {})
        .unwrap();
    assert_eq!(r["result"], "ok", "{r}");
    let hex = r["hex"].as_str().unwrap();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// The generation the guest recorded for working-set page `page` (0 = never written).
fn generation(vm: &Vmm, page: u64) -> u32 {
    let b = peek(vm, GEN_TABLE + 4 * page, 4);
    u32::from_le_bytes(b.try_into().unwrap())
}

/// The host address of guest-physical 0 in the VMM process `pid`: the start of its only
/// anonymous mapping of exactly `bytes` (the guest RAM below the MMIO hole).
fn guest_ram_base(pid: u32, bytes: u64) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let found: Vec<u64> = maps
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (a, b) = f.next()?.split_once('-')?;
            let (a, b) = (
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            );
            // Anonymous: no path after the inode.
            (b - a == bytes && f.nth(4).is_none()).then_some(a)
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "guest RAM mapping of {bytes} bytes:\n{maps}"
    );
    found[0]
}

/// Whether the host page behind guest-physical `gpa` is present (or swapped) in the VMM's page
/// tables, from /proc/<pid>/pagemap: a page the guest never touched is not.
fn host_page_present(pid: u32, ram_base: u64, gpa: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(format!("/proc/{pid}/pagemap")).unwrap();
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, (ram_base + gpa) / 4096 * 8)
        .unwrap();
    u64::from_le_bytes(e) & (3 << 62) != 0
}

/// Waits until the guest has written working-set page `page`.
fn wait_written(vm: &Vmm, page: u64) {
    let t0 = std::time::Instant::now();
    while generation(vm, page) == 0 {
        assert!(t0.elapsed() < T, "page {page} never written");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn fresh_mode_never_reads_an_unwritten_page_and_reports_a_zeroed_written_one() {
    let Some(_kvm) = common::kvm_or_skip("fresh_mode") else {
        return;
    };
    let dir = scratch_dir("fresh");
    // 1 page per 1 ms heartbeat, in order: page 3000 is not written for ~3 s.
    let mut vm = start_source(&dir, "fresh", "128M", 1, "ws=16 rate=1 fresh=1").unwrap();
    vm.wait_ready(T).unwrap();
    assert!(
        log_of(&vm).other.iter().any(|l| l.contains(" fresh=1 ")),
        "{:?}",
        log_of(&vm).other
    );
    vm.wait_heartbeats(100, T).unwrap();
    assert_eq!(generation(&vm, 3000), 0, "page 3000 written already");
    wait_written(&vm, 10);
    assert_eq!(generation(&vm, 10), 1);
    // The mode is real: the unwritten page was never touched (not even read), the written
    // one is there (checked before the VMM itself touches either).
    let ram = guest_ram_base(vm.pid(), 128 << 20);
    assert!(!host_page_present(vm.pid(), ram, WS_BASE + 3000 * 4096));
    assert!(host_page_present(vm.pid(), ram, WS_BASE + 10 * 4096));
    // Garbage in a never-written page: the verifier does not read it (without fresh=1 it
    // is reported at once: tests/vmm.rs checker_reports_a_page_changed_behind_the_guests_back).
    poke(&vm, 3000, 64, 0xdead_beef);
    // A page the guest wrote, zeroed behind its back (its first qword, the rest stays).
    poke(&vm, 10, 0, 0);
    vm.wait_for("CORRUPT", T, |g| !g.corrupt.is_empty())
        .unwrap();
    vm.wait_heartbeats(300, T).unwrap();
    assert_eq!(
        generation(&vm, 3000),
        0,
        "page 3000 written during the test"
    );
    let g = log_of(&vm);
    assert_eq!(g.corrupt_pages, vec![10], "{:?}", g.corrupt);
    let want = format!(
        "got=0000000000000000 want={:016x}",
        expected_qword(10, 1, 0)
    );
    assert!(g.corrupt[0].ends_with(&want), "{:?}", g.corrupt);
}

#[test]
fn zero_mode_verifies_pages_written_all_zero() {
    let Some(_kvm) = common::kvm_or_skip("zero_mode") else {
        return;
    };
    let dir = scratch_dir("zero");
    // zero=1: every write of a page writes it all zero.
    let mut vm = start_source(&dir, "zero", "128M", 1, "ws=16 rate=1 fresh=1 zero=1").unwrap();
    vm.wait_ready(T).unwrap();
    vm.wait_heartbeats(100, T).unwrap();
    wait_written(&vm, 20);
    assert_eq!(generation(&vm, 20), 1);
    assert!(
        peek(&vm, WS_BASE + 20 * 4096, 4096).iter().all(|&b| b == 0),
        "a zero generation is all zero"
    );
    assert!(log_of(&vm).corrupt.is_empty());
    // A stale non-zero qword in a page that became zero (as a lost zero marker would leave).
    poke(&vm, 20, 8, expected_qword(20, 1, 1));
    vm.wait_for("CORRUPT", T, |g| !g.corrupt.is_empty())
        .unwrap();
    vm.wait_heartbeats(300, T).unwrap();
    let g = log_of(&vm);
    assert_eq!(g.corrupt_pages, vec![20], "{:?}", g.corrupt);
    let want = format!(
        "got={:016x} want=0000000000000000",
        expected_qword(20, 1, 1)
    );
    assert!(g.corrupt[0].ends_with(&want), "{:?}", g.corrupt);
}

#[test]
fn smp_mode_an_application_processor_writes_and_checks_its_part() {
    let Some(_kvm) = common::kvm_or_skip("smp_mode") else {
        return;
    };
    let dir = scratch_dir("smp2");
    // 4096 pages: the BSP owns 0..2048, the AP 2048..4096; each writes 1 page per 1 ms.
    let mut vm = start_source(&dir, "smp", "128M", 2, "ws=16 rate=1 fresh=1 smp=2").unwrap();
    vm.wait_ready(T).unwrap();
    assert!(
        log_of(&vm).other.iter().any(|l| l == "SMP cpus=2"),
        "{:?}",
        log_of(&vm).other
    );
    let r = vm.api(&json!({"cmd":"vcpu-regs"}), |_| {}).unwrap();
    let v = r["vcpus"].as_array().unwrap();
    assert_eq!(v[1]["cs"], "0x23", "the AP runs at CPL3: {r}");
    vm.wait_heartbeats(100, T).unwrap();
    let first = vm.query_status(T).unwrap();
    vm.wait_for("two CPU lines", T, |g| g.cpus.len() >= 2)
        .unwrap();
    vm.wait_heartbeats(100, T).unwrap();
    let second = vm.query_status(T).unwrap();
    vm.wait_for("four CPU lines", T, |g| g.cpus.len() >= 4)
        .unwrap();
    {
        let g = log_of(&vm);
        let (a, b) = (&g.cpus[..2], &g.cpus[2..4]);
        assert_eq!((a[0].cpu, a[1].cpu, b[0].cpu, b[1].cpu), (0, 1, 0, 1));
        assert!(b[1].pages_written > a[1].pages_written, "{:?}", g.cpus);
        assert!(b[1].pages_verified > a[1].pages_verified, "{:?}", g.cpus);
        // STATUS is the sum of the CPUs' counters, read before the CPU lines that follow it
        // and after the ones before it. The AP keeps writing while the BSP prints, so STATUS
        // lies between the two sums; it counts the AP's pages, so it exceeds the BSP's own.
        // (No bound on how far apart they are: that is a matter of scheduling, not of the guest.)
        let before = a[0].pages_written + a[1].pages_written;
        let after = b[0].pages_written + b[1].pages_written;
        assert!(
            (before..=after).contains(&second.pages_written),
            "{second:?} {:?}",
            g.cpus
        );
        assert!(
            second.pages_written > b[0].pages_written,
            "{second:?} {:?}",
            g.cpus
        );
        assert!(second.pages_written > first.pages_written);
    }
    wait_written(&vm, 2050);
    assert_eq!(generation(&vm, 2050), 1);
    assert_eq!(generation(&vm, 4000), 0, "page 4000 written already");
    // The AP honours fresh=1 too: its unwritten page was never touched.
    let ram = guest_ram_base(vm.pid(), 128 << 20);
    assert!(!host_page_present(vm.pid(), ram, WS_BASE + 4000 * 4096));
    assert!(host_page_present(vm.pid(), ram, WS_BASE + 2050 * 4096));
    // Garbage in the AP's unwritten page 4000 (not read: fresh=1) and in its written page 2050.
    poke(&vm, 4000, 64, 0xdead_beef);
    poke(&vm, 2050, 64, 0xdead_beef);
    vm.wait_for("CORRUPT", T, |g| !g.corrupt.is_empty())
        .unwrap();
    vm.wait_heartbeats(300, T).unwrap();
    let third = vm.query_status(T).unwrap();
    vm.wait_for("six CPU lines", T, |g| g.cpus.len() >= 6)
        .unwrap();
    let g = log_of(&vm);
    assert_eq!(g.corrupt_pages, vec![2050], "{:?}", g.corrupt);
    let want = format!(
        "got=00000000deadbeef want={:016x}",
        expected_qword(2050, 1, 8)
    );
    assert!(g.corrupt[0].ends_with(&want), "{:?}", g.corrupt);
    // Found by the AP, printed by the BSP, counted in the sums.
    assert_eq!(third.corrupt, 1, "{third:?}");
    assert_eq!(
        (g.cpus[4].corrupt, g.cpus[5].corrupt),
        (0, 1),
        "{:?}",
        g.cpus
    );
    eprintln!(
        "smp: CPU 0 wrote {} pages, CPU 1 {} (status written={})",
        g.cpus[4].pages_written, g.cpus[5].pages_written, third.pages_written
    );
}

#[test]
fn cpl0_mode_keeps_every_cpus_loop_in_kernel_mode_and_still_checks_pages() {
    let Some(_kvm) = common::kvm_or_skip("cpl0_mode") else {
        return;
    };
    let dir = scratch_dir("cpl0");
    // Under PVM every instruction at CPL0 is emulated: one page write or verify takes
    // milliseconds, so the pace is slow but the checks are the same.
    let mut vm = start_source(
        &dir,
        "cpl0",
        "128M",
        2,
        "ws=16 rate=1 hb=20000 fresh=1 smp=2 cpl0=1",
    )
    .unwrap();
    vm.wait_ready(T).unwrap();
    let info = log_of(&vm).other.clone();
    assert!(
        info.iter()
            .any(|l| l.starts_with("INFO ") && l.ends_with(" smp=2 cpl=0")),
        "{info:?}"
    );
    assert!(info.iter().any(|l| l == "SMP cpus=2"), "{info:?}");
    // Both CPUs' loops run with the kernel code selector (CPL0), not 0x23.
    let r = vm.api(&json!({"cmd":"vcpu-regs"}), |_| {}).unwrap();
    let v = r["vcpus"].as_array().unwrap();
    assert_eq!(
        (&v[0]["cs"], &v[1]["cs"]),
        (&json!("0x8"), &json!("0x8")),
        "{r}"
    );
    vm.wait_heartbeats(20, T).unwrap();
    // Each CPU writes and verifies its own part (BSP 0..2048, AP 2048..4096).
    wait_written(&vm, 3);
    wait_written(&vm, 2051);
    poke(&vm, 3, 64, 0xdead_beef);
    poke(&vm, 2051, 64, 0xdead_beef);
    vm.wait_for("two CORRUPT lines", T, |g| g.corrupt.len() >= 2)
        .unwrap();
    let status = vm.query_status(T).unwrap();
    let g = log_of(&vm);
    let mut pages = g.corrupt_pages.clone();
    pages.sort_unstable();
    assert_eq!(pages, vec![3, 2051], "{:?}", g.corrupt);
    assert_eq!(status.corrupt, 2, "{status:?}");
    assert!(status.pages_verified > 0, "{status:?}");
    let r = vm.api(&json!({"cmd":"vcpu-regs"}), |_| {}).unwrap();
    assert_eq!(r["vcpus"][0]["cs"], "0x8", "{r}");
    eprintln!("cpl0: {} heartbeats, status {status:?}", g.heartbeats.len());
}

#[test]
fn cpl0_needs_the_whole_token() {
    let Some(_kvm) = common::kvm_or_skip("cpl0_token") else {
        return;
    };
    let dir = scratch_dir("cpl0tok");
    // Neither a longer key, nor a longer value, nor another value selects kernel mode.
    let mut vm = start_source(&dir, "cpl3", "64M", 1, "xcpl0=1 cpl0=10 cpl0=0 ws=16").unwrap();
    vm.wait_ready(T).unwrap();
    let info = log_of(&vm).other.clone();
    assert!(
        info.iter()
            .any(|l| l.starts_with("INFO ") && l.ends_with(" cpl=3")),
        "{info:?}"
    );
    let r = vm.api(&json!({"cmd":"vcpu-regs"}), |_| {}).unwrap();
    assert_eq!(r["vcpus"][0]["cs"], "0x23", "{r}");
}

/// A guest whose loops run in kernel mode (on PVM: in KVM's instruction emulator, mid-emulation
/// when it is paused) moves intact: on the destination both CPUs go on at CPL0, writing and
/// verifying, and no page reads back wrong. Prints the engine's downtime breakdown.
#[test]
fn cpl0_guest_migrates_intact() {
    let Some(_kvm) = common::kvm_or_skip("cpl0_migrates") else {
        return;
    };
    let dir = scratch_dir("cpl0mig");
    let mut src = start_source(
        &dir,
        "src",
        "1G",
        2,
        "ws=16 rate=1 hb=20000 fresh=1 smp=2 cpl0=1",
    )
    .unwrap();
    src.wait_ready(T).unwrap();
    src.wait_heartbeats(50, T).unwrap();
    let before = src.query_status(T).unwrap();
    let (mut dst, ep) = start_destination(&dir, "dst", &[]).unwrap();
    let report = migrate(&src, &ep, json!({"downtime_limit_ms": 10})).unwrap();
    assert_eq!(report["status"], "completed", "{report}");
    assert!(src.wait_exit(T).is_some_and(|st| st.success()));
    let r = dst.api(&json!({"cmd":"vcpu-regs"}), |_| {}).unwrap();
    let v = r["vcpus"].as_array().unwrap();
    assert_eq!(
        (&v[0]["cs"], &v[1]["cs"]),
        (&json!("0x8"), &json!("0x8")),
        "{r}"
    );
    dst.wait_heartbeats(100, T).unwrap();
    let after = dst.query_status(T).unwrap();
    assert!(
        after.pages_written > before.pages_written,
        "{before:?} {after:?}"
    );
    assert!(
        after.pages_verified > before.pages_verified,
        "{before:?} {after:?}"
    );
    assert_eq!(after.corrupt, 0, "{after:?}");
    common::assert_no_corruption(&src, &dst, "cpl0 guest");
    eprintln!(
        "cpl0 migration: downtime {} ms (expected {}), breakdown {}",
        report["downtime_ms"], report["expected_downtime_ms"], report["downtime_breakdown"]
    );
}

#[test]
fn laps_mode_writes_every_page_that_many_times_then_only_verifies() {
    let Some(_kvm) = common::kvm_or_skip("laps_mode") else {
        return;
    };
    let dir = scratch_dir("laps");
    // 4096 pages on two CPUs (2048 each), written as fast as they can, two laps: then the guest
    // idles, as one that allocated its memory and now only reads it.
    let mut vm = start_source(
        &dir,
        "laps",
        "128M",
        2,
        "ws=16 rate=max laps=2 fresh=1 smp=2",
    )
    .unwrap();
    vm.wait_ready(T).unwrap();
    vm.wait_pages_written(2 * 4096, T).unwrap();
    let first = vm.query_status(T).unwrap();
    assert_eq!(first.pages_written, 2 * 4096, "{first:?}");
    vm.wait_heartbeats(300, T).unwrap();
    let second = vm.query_status(T).unwrap();
    assert_eq!(
        second.pages_written,
        2 * 4096,
        "writes after the laps: {second:?}"
    );
    assert!(
        second.pages_verified > first.pages_verified,
        "the verifier runs once the writes stop: {first:?} {second:?}"
    );
    for page in [0, 1000, 2047, 2048, 3000, 4095] {
        assert_eq!(generation(&vm, page), 2, "page {page}");
    }
    // The checker still fires on a page of the second CPU.
    poke(&vm, 3000, 64, 0xdead_beef);
    vm.wait_for("CORRUPT", T, |g| !g.corrupt.is_empty())
        .unwrap();
    let g = log_of(&vm);
    assert_eq!(g.corrupt_pages, vec![3000], "{:?}", g.corrupt);
    let want = format!(
        "got=00000000deadbeef want={:016x}",
        expected_qword(3000, 2, 8)
    );
    assert!(g.corrupt[0].ends_with(&want), "{:?}", g.corrupt);
}
