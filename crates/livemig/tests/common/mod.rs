//! Set-ups several of this crate's integration tests share (each test
//! file uses some of them).
#![allow(dead_code)]

use std::io::IoSlice;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use livemig::memory::{MemoryLayout, RegionDesc};
use livemig::protocol::{crc_covered, FrameReader, FrameWriter, Hello, Message, MsgKind};
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::mem::{self, MemAcceptor, MemTransport};
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

/// What a relay may do to a frame it carries: `edit(kind, payload)` may
/// change the payload before it goes on.
pub type FrameEdit = Box<dyn FnMut(MsgKind, &mut Vec<u8>) + Send>;

/// Relays frames from `from` to `to` until either end closes (then drops
/// its ends, as the peers would), passing each through `edit` first. The
/// frame is written anew (its CRC over what `edit` left in the part the
/// CRC covers, `crc_covered`), so an edit past that part reaches the peer
/// as it would from the wire.
pub fn relay_frames(from: Box<dyn Transport>, to: Box<dyn Transport>, mut edit: FrameEdit) {
    let mut fr = FrameReader::new(from);
    let mut fw = FrameWriter::new(to);
    while let Ok(f) = fr.read_frame() {
        let mut payload = f.payload.to_vec();
        edit(f.kind, &mut payload);
        let (head, rest) = payload.split_at(crc_covered(f.kind, &payload).len());
        if fw
            .write_frame_split(f.kind, &[head], &[IoSlice::new(rest)])
            .is_err()
        {
            break;
        }
    }
}

/// Puts a relay ([`relay_frames`]) between a new source end and
/// `dest_end`: frames to the destination pass `up`, frames back pass
/// `down`. Returns the source's end.
pub fn relayed(dest_end: MemTransport, up: FrameEdit, down: FrameEdit) -> MemTransport {
    let (src_end, relay_src) = mem::pair();
    let up_from: Box<dyn Transport> = Box::new(relay_src);
    let down_to = up_from.try_clone().expect("clone the relay's source end");
    let up_to: Box<dyn Transport> = Box::new(dest_end);
    let down_from = up_to
        .try_clone()
        .expect("clone the relay's destination end");
    std::thread::spawn(move || relay_frames(up_from, up_to, up));
    std::thread::spawn(move || relay_frames(down_from, down_to, down));
    src_end
}

/// What became of a VM a destination built ([`WatchedVm`]): whether it
/// was ever resumed, and whether it was dropped. Clones share it.
#[derive(Clone, Default, Debug)]
pub struct VmFate {
    built: Arc<std::sync::atomic::AtomicBool>,
    resumed: Arc<std::sync::atomic::AtomicBool>,
    dropped: Arc<std::sync::atomic::AtomicBool>,
}

impl VmFate {
    /// Whether the destination built its VM.
    pub fn built(&self) -> bool {
        self.built.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether that VM's vCPUs were ever started.
    pub fn resumed(&self) -> bool {
        self.resumed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether that VM was dropped.
    pub fn dropped(&self) -> bool {
        self.dropped.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// No VM runs on the destination: it was built (the migration got that
    /// far), never resumed, and dropped.
    pub fn assert_nothing_runs(&self, what: &str) {
        assert!(self.built(), "{what}: the destination never built its VM");
        assert!(!self.resumed(), "{what}: the destination ran the guest");
        assert!(self.dropped(), "{what}: the destination kept its VM");
    }
}

/// An idle soft VM as a destination builds it, recording its fate.
pub struct WatchedVm {
    pub vm: SoftVm,
    fate: VmFate,
}

impl WatchedVm {
    /// An idle soft VM of `layout` whose fate `fate` records.
    pub fn new(layout: &MemoryLayout, fate: &VmFate) -> Result<Self, livemig::vm::VmError> {
        let vm = SoftVm::new(layout, &SoftConfig::idle())?;
        fate.built.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(WatchedVm {
            vm,
            fate: fate.clone(),
        })
    }
}

impl livemig::vm::DestinationVm for WatchedVm {
    fn memory(&self) -> &dyn livemig::memory::GuestMemory {
        livemig::vm::DestinationVm::memory(&self.vm)
    }

    fn restore_state(
        &mut self,
        sections: &[livemig::state::Section],
    ) -> Result<(), livemig::vm::VmError> {
        livemig::vm::DestinationVm::restore_state(&mut self.vm, sections)
    }

    fn resume(&mut self) -> Result<(), livemig::vm::VmError> {
        self.fate
            .resumed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        livemig::vm::DestinationVm::resume(&mut self.vm)
    }
}

impl Drop for WatchedVm {
    fn drop(&mut self) {
        self.fate
            .dropped
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What `rx` brings within `limit`; fails naming `what` if nothing comes
/// (a side that hangs) or its sender is gone (a thread that panicked).
pub fn within<T>(rx: &std::sync::mpsc::Receiver<T>, limit: Duration, what: &str) -> T {
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what} did not return within {limit:?}")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            panic!("{what} ended without a result (its thread panicked)")
        }
    }
}

/// Waits until `cond` holds, looking every 2 ms for at most `limit`;
/// fails naming `what` if it never does.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The destination of a migration its source cancelled failed with the
/// source's reason, `ErrorKind::Remote` "cancelled" — which is what it
/// hears whenever the source stopped by itself. The token shuts the
/// connections down only if the source has not stopped
/// [`livemig::SOURCE_CANCEL_GRACE`] after the cancel; so when the source
/// took longer than that from the cancel to its return (`source_took`:
/// an upper bound, measured from before the cancel), the destination may
/// instead have seen its connections close, and only that it failed is
/// asserted (the caller asserts that nothing runs there).
pub fn assert_heard_the_cancel(de: &MigrationError, source_took: Duration) {
    match &de.kind {
        livemig::ErrorKind::Remote { message, .. } if message == "cancelled" => {}
        _ if source_took >= livemig::SOURCE_CANCEL_GRACE => {
            eprintln!(
                "the source took {source_took:?} to stop (a loaded host): the token shut the \
                 connections down, and the destination saw: {de}"
            );
        }
        _ => panic!(
            "the destination did not hear that the source cancelled (the source stopped \
             {source_took:?} after the cancel): {de}"
        ),
    }
}
