//! Settings are validated where they enter: every out-of-range value is a
//! clear error naming the field, returned before anything is sent, with the
//! source VM running as before -- never a panic, a hang, or a failure in the
//! middle of a round.
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

use std::time::{Duration, Instant};

use livemig::memory::{MemoryLayout, RegionDesc};
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::{mem, Transport};
use livemig::vm::SourceVm;
use livemig::{migrate, receive, CancelToken, ErrorKind, MigrationConfig, Phase, ReceiveConfig};

fn vm() -> SoftVm {
    let layout = MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: 1 << 20,
    }])
    .unwrap();
    let vm = SoftVm::new(&layout, &SoftConfig::default()).unwrap();
    vm.fill(1);
    vm.start();
    vm
}

fn refused(field: &str, cfg: MigrationConfig) {
    let vm = vm();
    let (a, b) = mem::pair();
    let t0 = Instant::now();
    let r = std::thread::scope(|s| {
        // A destination: it must see the source hang up without a frame.
        let d = s.spawn(move || {
            receive(Box::new(b), &ReceiveConfig::default(), |d| {
                SoftVm::new(&d.layout, &SoftConfig::idle())
            })
            .map(|_| ())
        });
        let r = migrate(&vm, Box::new(a), &cfg, &CancelToken::new(), &mut |_| {});
        let d = d.join().unwrap();
        (r, d)
    });
    let e = r.0.expect_err(field);
    eprintln!("{field}: {e}");
    assert!(matches!(e.kind, ErrorKind::Config(_)), "{field}: {e}");
    assert_eq!(e.phase, Phase::Handshake);
    assert!(e.to_string().contains(field), "{e}");
    assert!(
        r.1.is_err(),
        "{field}: the destination received a migration"
    );
    assert!(!vm.is_paused(), "{field}: the source does not run");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "{field}: took {:?}",
        t0.elapsed()
    );
}

#[test]
fn bad_settings_are_refused_before_anything_is_sent() {
    let d = MigrationConfig::default;
    refused(
        "batch_pages",
        MigrationConfig {
            batch_pages: 0,
            ..d()
        },
    );
    refused(
        "batch_pages",
        MigrationConfig {
            batch_pages: u32::MAX,
            ..d()
        },
    );
    refused(
        "io_timeout",
        MigrationConfig {
            io_timeout: Duration::MAX,
            ..d()
        },
    );
    refused(
        "io_timeout",
        MigrationConfig {
            io_timeout: Duration::ZERO,
            ..d()
        },
    );
    refused(
        "max_pause",
        MigrationConfig {
            max_pause: Duration::MAX,
            ..d()
        },
    );
    refused(
        "downtime_limit",
        MigrationConfig {
            downtime_limit: Duration::MAX,
            ..d()
        },
    );
    refused(
        "max_precopy_time",
        MigrationConfig {
            max_precopy_time: Duration::MAX,
            ..d()
        },
    );
    refused(
        "max_bandwidth",
        MigrationConfig {
            max_bandwidth: Some(0),
            ..d()
        },
    );
    refused(
        "max_bandwidth",
        MigrationConfig {
            max_bandwidth: Some(4096),
            streams: 2,
            ..d()
        },
    );
    refused(
        "max_rounds",
        MigrationConfig {
            max_rounds: 0,
            ..d()
        },
    );
    refused("streams", MigrationConfig { streams: 0, ..d() });
    refused("streams", MigrationConfig { streams: 17, ..d() });
    refused(
        "throttle_increment",
        MigrationConfig {
            throttle_increment: u32::MAX,
            ..d()
        },
    );
    refused(
        "throttle_max",
        MigrationConfig {
            throttle_max: 100,
            ..d()
        },
    );
}

#[test]
fn bad_receive_settings_are_refused() {
    for t in [Duration::ZERO, Duration::MAX] {
        let (_a, b) = mem::pair();
        let b: Box<dyn Transport> = Box::new(b);
        let e = receive(b, &ReceiveConfig { io_timeout: t }, |d| {
            SoftVm::new(&d.layout, &SoftConfig::idle())
        })
        .map(|_| ())
        .expect_err("refused");
        assert!(matches!(e.kind, ErrorKind::Config(_)), "{e}");
        assert!(e.to_string().contains("io_timeout"), "{e}");
    }
}
