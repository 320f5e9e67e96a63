//! Page data sent straight from guest memory (`PagesGather` frames,
//! `MigrationConfig::zero_copy`), on the software VM over the in-memory
//! transport:
//!
//! * a page the guest changes between the source's page CRC and the write
//!   arrives torn, is not installed, is sent again, and the destination
//!   ends with exactly the paused source's memory;
//! * a page corrupted on the wire and never sent again fails the migration
//!   before the commit point, naming the pages; the source keeps running;
//! * a destination that does not grant the frames (an older one), and a
//!   source that does not ask for them, migrate with `Pages` frames.
//!
//! Between the two sides runs a relay that reads every frame and writes it
//! on, so that a test can count the kinds, change one frame, or take the
//! grant out of the reply.

mod common;

use std::io::{self, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use livemig::error::PeerError;
use livemig::memory::{MemoryLayout, RegionDesc};
use livemig::protocol::{crc_covered, gather_payload, HelloReply, Message, MsgKind};
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::{mem, Transport};
use livemig::vm::SourceVm;
use livemig::{ErrorKind, Migration, MigrationConfig, MigrationError, ReceiveReport, Reception};

/// 4 MiB at guest address 0.
fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: 4 << 20,
    }])
    .unwrap()
}

/// Three pre-copy rounds, then the switchover whatever the estimate.
fn config(zero_copy: bool) -> MigrationConfig {
    MigrationConfig {
        downtime_limit: Duration::from_secs(5),
        max_rounds: 3,
        io_timeout: Duration::from_secs(5),
        batch_pages: 64,
        zero_copy,
        // Compressed frames are copies: zero-copy sends raw pages only.
        compress: false,
        ..Default::default()
    }
}

/// An idle soft VM (no writers), every page filled, running.
fn idle_source() -> Arc<SoftVm> {
    let vm = SoftVm::new(&layout(), &SoftConfig::idle()).unwrap();
    vm.fill(11);
    vm.start();
    Arc::new(vm)
}

/// What a relay does to the frames it carries.
#[derive(Default)]
struct Edits {
    /// Source → destination frames by kind byte.
    kinds: Mutex<Vec<(u8, u64)>>,
    /// Take the `PagesGather` grant out of the `HelloReply` (an older
    /// destination).
    strip_grant: bool,
    /// Flip a byte of the first data page of the first `PagesGather` frame
    /// (the page's CRC, covered by the frame CRC, is left as it was).
    corrupt_first_gather: bool,
    /// The guest-physical address of the page corrupted.
    corrupted: Mutex<Option<u64>>,
}

impl Edits {
    fn count(&self, kind: MsgKind) -> u64 {
        let k = self.kinds.lock().unwrap();
        k.iter()
            .find(|(b, _)| *b == kind as u8)
            .map_or(0, |(_, n)| *n)
    }

    fn seen(&self, kind: MsgKind) {
        let mut k = self.kinds.lock().unwrap();
        match k.iter_mut().find(|(b, _)| *b == kind as u8) {
            Some((_, n)) => *n += 1,
            None => k.push((kind as u8, 1)),
        }
    }
}

/// What the relay does to the frames it carries, per [`Edits`]
/// (`upstream`: source → destination).
fn edit(edits: Arc<Edits>, upstream: bool) -> common::FrameEdit {
    let mut corrupted = false;
    Box::new(move |kind, payload| {
        if upstream {
            edits.seen(kind);
        }
        if kind == MsgKind::HelloReply && edits.strip_grant {
            let mut r = HelloReply::decode(payload).unwrap();
            r.pages_gather = false;
            *payload = r.encode().unwrap();
        }
        if kind == MsgKind::PagesGather && edits.corrupt_first_gather && !corrupted {
            let covered = crc_covered(kind, payload).len();
            let g = gather_payload(payload).unwrap();
            let gpa = g.records().iter().find(|r| r.data.is_some()).unwrap().gpa;
            *edits.corrupted.lock().unwrap() = Some(gpa);
            payload[covered + 100] ^= 0x5a;
            corrupted = true;
        }
    })
}

/// A relay with `edits` between a source end and a destination end;
/// returns the source's end.
fn relayed(dest_end: mem::MemTransport, edits: &Arc<Edits>) -> mem::MemTransport {
    common::relayed(
        dest_end,
        edit(edits.clone(), true),
        edit(edits.clone(), false),
    )
}

/// Migrates `src` with `config` through a relay with `edits`; returns the
/// source's and the destination's results.
fn migrate(
    src: &SoftVm,
    config: MigrationConfig,
    transport: Box<dyn Transport>,
    dest_end: mem::MemTransport,
) -> (
    Result<livemig::Report, MigrationError>,
    Result<(SoftVm, ReceiveReport), MigrationError>,
) {
    let dest = std::thread::spawn(move || {
        Reception::new(Box::new(dest_end)).run(|d| SoftVm::new(&d.layout, &SoftConfig::idle()))
    });
    let report = Migration::new(src).config(config).run(transport);
    (report, dest.join().unwrap())
}

/// A transport that, in the first gather write of a `PagesGather` frame,
/// changes a data page of that frame as the guest would (dirtying it)
/// before passing the write on: the page's bytes then differ from the CRC
/// the source computed for it.
struct Tearing {
    inner: Box<dyn Transport>,
    vm: Arc<SoftVm>,
    torn: Arc<AtomicBool>,
    /// The guest-physical address written.
    at: Arc<AtomicU64>,
}

impl Read for Tearing {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for Tearing {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // The frame header is the first slice of a frame's first write;
        // byte 2 is the kind. Its data pages follow the metadata (slices 1
        // and 2): page 0 of the first data record is the slice after them.
        let gather = bufs.len() > 3
            && bufs[0].len() == 16
            && bufs[0][2] == MsgKind::PagesGather as u8
            && !self.torn.load(Ordering::SeqCst);
        if gather {
            let meta = [&bufs[1][..], &bufs[2][..]].concat();
            let payload = [meta, vec![0; 4096 * data_pages(&bufs[1])]].concat();
            let g = gather_payload(&payload).unwrap();
            let gpa = g.records().iter().find(|r| r.data.is_some()).unwrap().gpa;
            let now = u64::from_le_bytes(bufs[3][..8].try_into().unwrap());
            self.vm.write_as_guest(gpa, !now).unwrap();
            self.at.store(gpa, Ordering::SeqCst);
            self.torn.store(true, Ordering::SeqCst);
        }
        self.inner.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The data-page count in a `PagesGather` head.
fn data_pages(head: &[u8]) -> usize {
    u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize
}

impl Transport for Tearing {
    fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.inner.set_read_timeout(t)
    }
    fn set_write_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.inner.set_write_timeout(t)
    }
    fn shutdown(&self) -> io::Result<()> {
        self.inner.shutdown()
    }
    fn peer(&self) -> String {
        self.inner.peer()
    }
    fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(Tearing {
            inner: self.inner.try_clone()?,
            vm: self.vm.clone(),
            torn: self.torn.clone(),
            at: self.at.clone(),
        }))
    }
}

/// A page the guest changes between its CRC and the kernel's copy arrives
/// torn and is not installed; the guest's write dirtied it, so it is sent
/// again, and the destination's memory ends identical to the paused
/// source's. (Before `PagesGather`, the frame CRC covered guest memory:
/// such a tear failed the whole frame, and the migration.)
#[test]
fn a_page_torn_by_a_guest_write_is_sent_again() {
    let src = idle_source();
    let edits = Arc::new(Edits::default());
    let (a, b) = mem::pair();
    let torn = Arc::new(AtomicBool::new(false));
    let at = Arc::new(AtomicU64::new(u64::MAX));
    let t = Tearing {
        inner: Box::new(relayed(b, &edits)),
        vm: src.clone(),
        torn: torn.clone(),
        at: at.clone(),
    };
    let (report, dest) = migrate(&src, config(true), Box::new(t), a);
    let report = report.expect("migrated");
    let (dst, rr) = dest.expect("received");
    assert!(torn.load(Ordering::SeqCst), "no PagesGather frame was torn");
    assert_eq!(rr.torn_pages, 1, "{rr:?}");
    assert!(edits.count(MsgKind::PagesGather) > 0);
    assert_eq!(edits.count(MsgKind::Pages), 0);
    assert!(src.is_paused());
    assert!(
        src.snapshot() == dst.snapshot(),
        "memory differs after migration (torn page at 0x{:x}); {}",
        at.load(Ordering::SeqCst),
        report.to_json()
    );
}

/// A page corrupted on the way (its page CRC fails) and never sent again
/// (the guest does not write it): the destination refuses at `Complete`,
/// before the commit point, naming the page; the source's guest runs on.
#[test]
fn a_page_corrupted_on_the_wire_fails_before_the_commit() {
    let src = idle_source();
    let edits = Arc::new(Edits {
        corrupt_first_gather: true,
        ..Default::default()
    });
    let (a, b) = mem::pair();
    let t = relayed(b, &edits);
    let (report, dest) = migrate(&src, config(true), Box::new(t), a);
    let gpa = edits
        .corrupted
        .lock()
        .unwrap()
        .expect("a frame was corrupted");
    let e = dest.map(|_| ()).expect_err("the destination refused");
    match &e.kind {
        ErrorKind::Peer(PeerError::TornPages { pages, first }) => {
            assert_eq!((*pages, *first), (1, gpa), "{e}");
        }
        other => panic!("not TornPages: {other:?} ({e})"),
    }
    assert!(e.to_string().contains("1 page(s)"), "{e}");
    let se = report.expect_err("the source failed");
    assert!(!se.is_ambiguous(), "{se}");
    assert!(!src.is_paused(), "the source's guest must run on");
}

/// A destination that does not grant `PagesGather` (an older one: the
/// grant taken out of its reply) gets `Pages` frames, and so does one from
/// a source that does not ask (`zero_copy` off, as an older source); both
/// migrate. With both sides of this build, only `PagesGather` frames. The
/// report says whether page data went straight from guest memory.
#[test]
fn older_peers_get_pages_frames() {
    for (zero_copy, strip_grant, gather) in [
        (true, true, false),
        (false, false, false),
        (true, false, true),
    ] {
        let src = idle_source();
        let edits = Arc::new(Edits {
            strip_grant,
            ..Default::default()
        });
        let (a, b) = mem::pair();
        let t = relayed(b, &edits);
        let (report, dest) = migrate(&src, config(zero_copy), Box::new(t), a);
        let what = format!("zero_copy {zero_copy}, grant stripped {strip_grant}");
        let report = report.unwrap_or_else(|e| panic!("{what}: {e}"));
        let (dst, _) = dest.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(report.zero_copy, gather, "{what}: the report says");
        assert_eq!(edits.count(MsgKind::PagesGather) > 0, gather, "{what}");
        assert_eq!(edits.count(MsgKind::Pages) > 0, !gather, "{what}");
        assert!(src.snapshot() == dst.snapshot(), "{what}: memory differs");
    }
}

/// A guest writing all along, `PagesGather` frames on one and on two page
/// streams, with LZ4 allowed (compressed frames are copied) and under a
/// bandwidth cap (every frame paced): the destination ends with the
/// paused source's memory in every combination.
#[test]
fn streams_lz4_and_the_cap_keep_working() {
    let cases = [
        (1, false, None),
        (2, false, None),
        (1, true, None),
        (2, true, None),
        (1, false, Some(64 << 20)),
        (2, false, Some(64 << 20)),
    ];
    for (streams, compress, cap) in cases {
        let what = format!("streams {streams}, compress {compress}, cap {cap:?}");
        let src = SoftVm::new(&layout(), &SoftConfig::busy()).unwrap();
        src.fill(5);
        src.start();
        let (a, b) = mem::pair();
        let (opener, acceptor) = mem::streams();
        let dest = common::soft_destination_with_streams(b, acceptor);
        let cfg = MigrationConfig {
            compress,
            max_bandwidth: cap,
            ..config(true)
        };
        let mut m = Migration::new(&src).config(cfg);
        if streams > 1 {
            m = m.streams(streams, opener);
        }
        let report = m.run(Box::new(a)).unwrap_or_else(|e| panic!("{what}: {e}"));
        let (dst, rr) = dest
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(rr.streams, streams, "{what}");
        assert!(!report.rounds.is_empty(), "{what}: {}", report.to_json());
        assert!(src.is_paused(), "{what}");
        assert!(src.snapshot() == dst.snapshot(), "{what}: memory differs");
    }
}

/// The largest frames (`batch_pages` 1024): a frame holding 1022 pages
/// when a run of 1024 more comes (two zero pages at the end of a chunk,
/// whose neighbours end one run and begin the next) must not grow past
/// the 8 MiB frame limit; each page's crc makes `PagesGather` metadata 4
/// bytes a page longer than `Pages`'.
#[test]
fn the_largest_frames_stay_within_the_limit() {
    let layout = MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: 16 << 20,
    }])
    .unwrap();
    let src = SoftVm::new(&layout, &SoftConfig::idle()).unwrap();
    src.fill(3);
    for word in 0..1024 {
        src.write_as_guest(1022 * 4096 + word * 8, 0).unwrap();
    }
    src.start();
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        Reception::new(Box::new(b)).run(|d| SoftVm::new(&d.layout, &SoftConfig::idle()))
    });
    let cfg = MigrationConfig {
        batch_pages: 1024,
        ..config(true)
    };
    let report = Migration::new(&src).config(cfg).run(Box::new(a));
    report.expect("migrated");
    let (dst, _) = dest.join().unwrap().expect("received");
    assert!(src.snapshot() == dst.snapshot(), "memory differs");
}
