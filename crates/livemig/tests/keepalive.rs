//! A bandwidth cap never makes the source silent for longer than the
//! destination's read timeout: the pacer sleeps in slices and sends a
//! `Keepalive` between them, in single-stream mode (pages and control on
//! one connection) as with several page streams.
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

use std::time::Duration;

use livemig::memory::PAGE_SIZE;
use livemig::protocol::MsgKind;
use livemig::testing::fault::FaultTransport;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::{mem, Transport};
use livemig::{migrate, CancelToken, MigrationConfig, OnLimit, ReceiveConfig};

mod common;
use common::{one_region, soft_destination};

/// 64 pages at 16 pages per second: each 32-page frame makes the pacer
/// wait about 2 s, twice the destination's 1 s read timeout.
#[test]
fn a_slow_bandwidth_cap_keeps_the_destination_alive() {
    let layout = one_region(64 * PAGE_SIZE);
    let src = SoftVm::new(&layout, &SoftConfig::idle()).unwrap();
    src.fill(4);
    let (a, b) = mem::pair();
    let (a, probe) = FaultTransport::with_plan(Box::new(a), vec![]);
    let a: Box<dyn Transport> = Box::new(a);
    let dest = soft_destination(
        b,
        ReceiveConfig {
            io_timeout: Duration::from_secs(1),
        },
    );
    let cfg = MigrationConfig {
        max_bandwidth: Some(16 * PAGE_SIZE),
        batch_pages: 32,
        max_rounds: 1,
        on_limit: OnLimit::ForceSwitchover,
        io_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    migrate(&src, a, &cfg, &CancelToken::new(), &mut |_| {}).expect("migrated");
    let (dst, _) = dest
        .join()
        .unwrap()
        .expect("the destination did not time out");
    assert!(src.snapshot() == dst.snapshot());
    let keepalives = probe
        .frames()
        .iter()
        .filter(|f| f.kind == Some(MsgKind::Keepalive))
        .count();
    assert!(keepalives >= 2, "{keepalives} keepalives");
}
