//! The QEMU peer driver (`livemig_suite::qemu`): boots the test guest in two
//! QEMU processes and migrates it over loopback with QMP. Skips (saying why)
//! when `qemu-system-x86_64` or `/dev/kvm` is missing.

mod common;

use std::time::{Duration, Instant};

use livemig_suite::harness::scratch_dir;
use livemig_suite::qemu::{
    qboot_path, qemu_path, qemu_version, write_guest_image, QemuConfig, QemuMigrateParams, QemuVm,
};

#[test]
fn qemu_migrates_the_test_guest() {
    let Some(_kvm) = common::kvm_or_skip("qemu_migrates_the_test_guest") else {
        return;
    };
    let Some(qemu) = qemu_path() else {
        eprintln!(
            "\n*** SKIPPED qemu_migrates_the_test_guest: qemu-system-x86_64 is not installed ***\n"
        );
        return;
    };
    eprintln!("{}", qemu_version(&qemu).expect("qemu --version"));
    let dir = scratch_dir("qemu-test");
    let cfg = QemuConfig {
        qemu,
        kernel: write_guest_image(&dir).expect("guest image"),
        cmdline: std::env::var("QEMU_TEST_CMDLINE")
            .unwrap_or_else(|_| "ws=32 rate=10 hb=500 pattern=rand fresh=1".into()),
        memory_mib: std::env::var("QEMU_TEST_MEM")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256),
        vcpus: 1,
        bios: qboot_path(),
    };
    let mut src = QemuVm::start_source(&dir, "qs", &cfg).expect("source");
    src.wait_ready(Duration::from_secs(30)).expect("READY");
    src.wait_heartbeats(1000, Duration::from_secs(30))
        .expect("heartbeats before");
    assert!(
        src.log()
            .other
            .iter()
            .any(|l| l.starts_with("INFO tsc_khz=")),
        "the guest got our command line: {:?}",
        src.log().other
    );
    let (mut dst, uri) = QemuVm::start_destination(&dir, "qd", &cfg).expect("destination");
    assert!(uri.starts_with("tcp:127.0.0.1:"), "{uri}");
    let t0 = Instant::now();
    let rep = src
        .migrate(
            &uri,
            &QemuMigrateParams {
                downtime_limit_ms: Some(10),
                max_bandwidth: Some(10 << 30),
                ..Default::default()
            },
        )
        .expect("migrate");
    assert_eq!(rep.downtime_limit_ms, 10);
    assert_eq!(rep.max_bandwidth, 10 << 30);
    assert!(rep.ram_transferred > 0, "{:?}", rep.raw);
    // The destination runs the guest on: more heartbeats, more T lines,
    // and the guest's own verifier finds nothing wrong.
    dst.wait_heartbeats(2000, Duration::from_secs(30))
        .expect("destination heartbeats");
    dst.wait_for("a T line", Duration::from_secs(10), |g| {
        !g.tlines.is_empty()
    })
    .expect("T line");
    let last_src = *src.log().heartbeats.last().expect("source heartbeats");
    let first_dst = *dst
        .log()
        .heartbeats
        .first()
        .expect("destination heartbeats");
    assert!(first_dst > last_src, "destination beat after the source");
    assert!(first_dst > t0);
    let dl = dst.log();
    assert!(dl.corrupt.is_empty(), "{:?}", dl.corrupt);
    assert!(src.log().corrupt.is_empty());
    // The destination continues the source's counters (no reboot).
    let t = dl.tlines.last().expect("T line");
    assert!(t.heartbeats > 2000, "counters continue: {t:?}");
    assert!(t.pages_verified > 0, "the verifier ran: {t:?}");
    let ms = |a: Instant, b: Instant| {
        if b >= a {
            (b - a).as_secs_f64() * 1e3
        } else {
            -((a - b).as_secs_f64() * 1e3)
        }
    };
    eprintln!(
        "QEMU: last source beat → completed seen {:.2} ms, completed → first destination beat {:.2} ms",
        ms(last_src, rep.completed_at),
        ms(rep.completed_at, first_dst)
    );
    eprintln!(
        "QEMU: switchover gap {:.2} ms, downtime {} ms, total {} ms, setup {} ms, {} MB sent",
        (first_dst - last_src).as_secs_f64() * 1e3,
        rep.downtime_ms,
        rep.total_ms,
        rep.setup_ms,
        rep.ram_transferred / 1_000_000
    );
    drop(dl);
    drop(src);
    drop(dst);
    let _ = std::fs::remove_dir_all(&dir);
}
