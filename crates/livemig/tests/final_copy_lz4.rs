//! LZ4 in the final copy. While LZ4 is allowed but off, a pre-copy
//! sender compresses the start of a frame now and then to measure
//! (`policy::lz4::Lz4Decider::sample_every`); that measurement only serves
//! later decisions, so the final copy — the guest paused, every
//! millisecond downtime, no decision after it — must not pay for it. The
//! report shows what LZ4 cost in the final copy
//! (`DowntimeBreakdown::final_memory_lz4_ms`).

use std::time::Duration;

use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::mem;
use livemig::{Migration, MigrationConfig, OnLimit, Reception};

mod common;
use common::{one_region, running_source};

#[test]
fn the_final_copy_does_not_sample_lz4() {
    // A writer dirtying pages as fast as it can: the final copy has many
    // frames of a few pages each.
    let writer = SoftConfig {
        guest_writers: 1,
        device_writers: 0,
        pages_per_ms: 0,
    };
    let src = running_source(&one_region(8 << 20), &writer, 5);
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        Reception::new(Box::new(b)).run(|d| SoftVm::new(&d.layout, &SoftConfig::idle()))
    });
    let config = MigrationConfig {
        compress: true,
        batch_pages: 4,
        max_rounds: 1,
        downtime_limit: Duration::from_micros(1),
        on_limit: OnLimit::ForceSwitchover,
        ..Default::default()
    };
    let report = Migration::new(&*src)
        .config(config)
        .run(Box::new(a))
        .expect("migrated");
    let (dst, _) = dest.join().expect("destination thread").expect("received");
    assert_eq!(src.snapshot(), dst.snapshot(), "memory arrived");
    let round = report.rounds.last().expect("a round");
    let lz4 = round.lz4.expect("LZ4 allowed: reported");
    assert!(
        !lz4.on,
        "precondition: LZ4 stayed off on an in-memory link: {}",
        report.to_json()
    );
    assert!(
        report.final_pages >= 64,
        "precondition: a final copy of many frames ({} pages): {}",
        report.final_pages,
        report.to_json()
    );
    assert_eq!(
        report.downtime_breakdown.final_memory_lz4_ms,
        0.0,
        "LZ4 off, yet the final copy compressed (samples): {}",
        report.to_json()
    );
}
