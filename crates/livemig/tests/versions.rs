//! Version negotiation across versions: a peer speaking the next protocol
//! version (range `PROTOCOL_VERSION ..= PROTOCOL_VERSION + 1`, with fields of
//! its own appended to its `Hello`) migrates with this build, which chooses
//! `PROTOCOL_VERSION` and says so in `HelloReply::version`; a destination
//! that chooses a version this source does not speak is refused clearly.
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

#[allow(dead_code)]
#[path = "../../../fuzz/src/lib.rs"]
mod harness;

use std::time::Duration;

use livemig::protocol::{
    FrameReader, FrameWriter, Hello, HelloReply, Message, MsgKind, Resumed, PROTOCOL_VERSION,
};
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::{mem, Transport};
use livemig::ReceiveConfig;

mod common;
use common::{hand_destination, migrate_with_defaults, soft_destination};

/// A source of the next version: its Hello offers `PROTOCOL_VERSION ..=
/// PROTOCOL_VERSION + 1` and carries 12 bytes of a field this build does
/// not know; after the reply it speaks the version the destination chose.
#[test]
fn a_next_version_source_migrates_to_this_destination() {
    let (a, b) = mem::pair();
    let dest = soft_destination(
        b,
        ReceiveConfig {
            io_timeout: Duration::from_secs(5),
        },
    );
    let t: Box<dyn Transport> = Box::new(a);
    let mut rx = t.try_clone().unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut fr = FrameReader::new(rx);
    let mut fw = FrameWriter::new(t);

    let mut hello = Hello::new(harness::description());
    hello.protocol_version = PROTOCOL_VERSION + 1;
    hello.min_protocol_version = PROTOCOL_VERSION;
    let mut payload = hello.encode().unwrap();
    payload.extend_from_slice(b"next-version");
    fw.write_frame(MsgKind::Hello, &[&payload]).unwrap();
    fw.flush().unwrap();
    let f = fr.read_frame().unwrap();
    assert_eq!(f.kind, MsgKind::HelloReply);
    let reply = HelloReply::decode(f.payload).unwrap();
    assert!(reply.accepted, "{}", reply.reason);
    assert_eq!(reply.version, PROTOCOL_VERSION, "the chosen version");

    // The rest of a valid migration, in the chosen version.
    let frames = harness::valid_frames();
    let go = frames.len() - 1;
    for (kind, payload) in &frames[1..go] {
        fw.write_frame(*kind, &[payload]).unwrap();
    }
    fw.flush().unwrap();
    assert_eq!(fr.read_frame().unwrap().kind, MsgKind::Ready);
    let (kind, payload) = &frames[go];
    assert_eq!(*kind, MsgKind::Go);
    fw.write_frame(*kind, &[payload]).unwrap();
    fw.flush().unwrap();
    let f = fr.read_frame().unwrap();
    assert_eq!(f.kind, MsgKind::Resumed);
    Resumed::decode(f.payload).unwrap();
    let (_vm, report) = dest
        .join()
        .unwrap()
        .expect("the destination runs the guest");
    assert_eq!(report.version, PROTOCOL_VERSION);
    assert!(report.running);
}

/// A destination that (wrongly) claims a version outside this source's
/// range: the source refuses in the handshake, naming both, and keeps its
/// guest.
#[test]
fn a_reply_choosing_an_unknown_version_is_refused() {
    let layout = harness::layout();
    let vm = SoftVm::new(&layout, &SoftConfig::idle()).unwrap();
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        let (_, mut fr, mut fw) = hand_destination(Box::new(b), None);
        let mut reply = HelloReply::accepted(1, [0; 16]);
        reply.version = PROTOCOL_VERSION + 1;
        fw.send(&reply).unwrap();
        fw.flush().unwrap();
        let _ = fr.read_frame();
    });
    vm.start();
    let e = migrate_with_defaults(&vm, a).expect_err("refused");
    dest.join().unwrap();
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("chose protocol version {}", PROTOCOL_VERSION + 1)),
        "{msg}"
    );
    assert!(
        !livemig::vm::SourceVm::is_paused(&vm),
        "the source must run"
    );
}
