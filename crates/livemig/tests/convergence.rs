//! Convergence with the default configuration where the rounds carry
//! (almost) nothing: an idle guest must switch over after its first round,
//! with an expected downtime within the limit, not give up because a round
//! of a few bytes "measured" a bandwidth of a few bytes per second.

use std::time::Duration;

use livemig::memory::{MemoryLayout, RegionDesc};
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::mem;
use livemig::{Migration, MigrationConfig, Reception, Report};

fn layout(mib: u64) -> MemoryLayout {
    MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: mib << 20,
    }])
    .expect("layout")
}

/// Migrates `src` with the default configuration to an idle soft VM;
/// returns the source's report (the migration must complete) and the
/// destination VM.
fn migrate_defaults(src: &SoftVm) -> (Report, SoftVm) {
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        Reception::new(Box::new(b)).run(|desc| SoftVm::new(&desc.layout, &SoftConfig::idle()))
    });
    let r = Migration::new(src).run(Box::new(a));
    let (dst, _) = dest.join().expect("destination thread").expect("received");
    (
        r.expect("the migration completes with the default configuration"),
        dst,
    )
}

fn assert_within_limit(report: &Report) {
    let limit = MigrationConfig::default().downtime_limit.as_secs_f64() * 1e3;
    assert!(!report.forced, "forced switchover: {}", report.to_json());
    assert!(
        report.expected_downtime_ms <= limit,
        "expected downtime {:.2} ms over the {limit} ms limit: {}",
        report.expected_downtime_ms,
        report.to_json()
    );
    for r in &report.rounds {
        assert!(
            r.expected_downtime_ms.is_finite(),
            "round {}: {}",
            r.round,
            r.expected_downtime_ms
        );
    }
}

/// An idle 8 MiB guest that never touched its memory: round 0 sends no
/// page at all. It converges after that round.
#[test]
fn idle_untouched_guest_converges_with_defaults() {
    let src = SoftVm::new(&layout(8), &SoftConfig::idle()).expect("source VM");
    src.start();
    let (report, dst) = migrate_defaults(&src);
    assert_within_limit(&report);
    assert_eq!(report.rounds.len(), 1, "{}", report.to_json());
    assert_eq!(src.snapshot(), dst.snapshot());
}

/// An idle guest with a handful of written pages: the rounds carry a few
/// pages, a few KiB over a round's fixed costs.
#[test]
fn idle_guest_with_a_few_pages_converges_with_defaults() {
    let src = SoftVm::new(&layout(8), &SoftConfig::idle()).expect("source VM");
    for i in 0..3u64 {
        src.write_as_guest(i * 3 * 4096 + 8, 0x5eed + i)
            .expect("guest write");
    }
    src.start();
    let (report, dst) = migrate_defaults(&src);
    assert_within_limit(&report);
    assert!(report.pages_sent >= 3, "{}", report.to_json());
    assert_eq!(src.snapshot(), dst.snapshot());
}

/// A guest whose writers dirty a few pages per millisecond: every round
/// carries a few pages. It converges within the default round limit.
#[test]
fn lightly_written_guest_converges_with_defaults() {
    let cfg = SoftConfig {
        guest_writers: 1,
        device_writers: 0,
        pages_per_ms: 1,
    };
    let src = SoftVm::new(&layout(8), &cfg).expect("source VM");
    src.start();
    std::thread::sleep(Duration::from_millis(5));
    let (report, _dst) = migrate_defaults(&src);
    assert_within_limit(&report);
}
