//! Set-ups several of this crate's integration tests share (each test
//! file uses some of them).
#![allow(dead_code)]

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use livemig::memory::{MemoryLayout, RegionDesc};
use livemig::protocol::{FrameReader, FrameWriter, Hello, Message, MsgKind};
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::mem::MemAcceptor;
use livemig::transport::Transport;
use livemig::vm::SourceVm;
// Some helpers keep exercising the deprecated 0.1 entry points.
#[allow(deprecated)]
use livemig::{
    migrate, receive, CancelToken, MigrationConfig, MigrationError, ReceiveConfig, ReceiveReport,
    Reception, Report,
};

/// One region of `size` bytes at guest address 0.
pub fn one_region(size: u64) -> MemoryLayout {
    MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size,
    }])
    .unwrap()
}

/// A soft VM with writers per `config`, every page filled from `seed`,
/// its writers started.
pub fn started_source(layout: &MemoryLayout, config: &SoftConfig, seed: u64) -> SoftVm {
    let vm = SoftVm::new(layout, config).unwrap();
    vm.fill(seed);
    vm.start();
    vm
}

/// [`started_source`], shared.
pub fn running_source(layout: &MemoryLayout, config: &SoftConfig, seed: u64) -> Arc<SoftVm> {
    Arc::new(started_source(layout, config, seed))
}

/// `receive` on a thread, over `t`, with `config`, into an idle soft VM of
/// the source's layout.
#[allow(deprecated)]
pub fn soft_destination(
    t: impl Transport + 'static,
    config: ReceiveConfig,
) -> JoinHandle<Result<(SoftVm, ReceiveReport), MigrationError>> {
    std::thread::spawn(move || {
        receive(Box::new(t), &config, |d| {
            SoftVm::new(&d.layout, &SoftConfig::idle())
        })
    })
}

/// A `Reception` on a thread, over `t`, taking page streams from
/// `acceptor`, into an idle soft VM of the source's layout.
pub fn soft_destination_with_streams(
    t: impl Transport + 'static,
    acceptor: MemAcceptor,
) -> JoinHandle<Result<(SoftVm, ReceiveReport), MigrationError>> {
    std::thread::spawn(move || {
        Reception::new(Box::new(t))
            .accept_streams(acceptor)
            .run(|d| SoftVm::new(&d.layout, &SoftConfig::idle()))
    })
}

/// `migrate` of `vm` over `t` with the default configuration, no
/// cancellation and no progress callback.
#[allow(deprecated)]
pub fn migrate_with_defaults<V: SourceVm + ?Sized>(
    vm: &V,
    t: impl Transport + 'static,
) -> Result<Report, MigrationError> {
    migrate(
        vm,
        Box::new(t),
        &MigrationConfig::default(),
        &CancelToken::new(),
        &mut |_| {},
    )
}

/// The end of a destination written by hand.
pub type HandReader = FrameReader<Box<dyn Transport>>;
/// The other end of a destination written by hand.
pub type HandWriter = FrameWriter<Box<dyn Transport>>;

/// A destination written by hand, over `t` (reads time out after
/// `read_timeout`, or never): reads the source's first frame, which must
/// be a well-formed `Hello`, and returns it with the reader and writer.
pub fn hand_destination(
    t: Box<dyn Transport>,
    read_timeout: Option<Duration>,
) -> (Hello, HandReader, HandWriter) {
    let mut rx = t.try_clone().unwrap();
    rx.set_read_timeout(read_timeout).unwrap();
    let mut fr = FrameReader::new(rx);
    let fw = FrameWriter::new(t);
    let f = fr.read_frame().unwrap();
    assert_eq!(f.kind, MsgKind::Hello);
    let hello = Hello::decode(f.payload).unwrap();
    (hello, fr, fw)
}

/// The source's writers make progress (they write again within 5 s).
pub fn assert_running(vm: &SoftVm, what: &str) {
    assert!(
        vm.writes_within(Duration::from_secs(5)),
        "{what}: the source's writers stopped"
    );
}

/// The source's writers stay stopped (no write for 200 ms).
pub fn assert_paused(vm: &SoftVm, what: &str) {
    assert!(
        vm.writes_none_during(Duration::from_millis(200)),
        "{what}: the source's writers run"
    );
}
