//! [`MsgKind`]: the kind byte of a frame.

use std::fmt;

/// The kind of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MsgKind {
    /// Source → destination: versions and the VM description ([`Hello`](super::Hello)).
    Hello = 1,
    /// Destination → source: accepted or refused ([`HelloReply`](super::HelloReply)).
    HelloReply = 2,
    /// Source → destination: guest pages ([`PageBatch`](super::PageBatch), [`page_records`](super::page_records)).
    Pages = 3,
    /// Source → destination: end of a copy round ([`RoundEnd`](super::RoundEnd)).
    RoundEnd = 4,
    /// Source → destination: device state sections ([`State`](super::State)).
    State = 5,
    /// Source → destination: all memory and state sent ([`Complete`](super::Complete)).
    Complete = 6,
    /// Destination → source: state restored, VM not yet running ([`Ready`](super::Ready)).
    Ready = 7,
    /// Source → destination: switchover committed; the source will not
    /// resume the VM any more ([`Go`](super::Go)).
    Go = 8,
    /// Destination → source: vCPUs running ([`Resumed`](super::Resumed)).
    Resumed = 9,
    /// Either side: the migration failed ([`ErrorMsg`](super::ErrorMsg)).
    Error = 10,
    /// Source → destination: the migration is cancelled ([`Cancel`](super::Cancel)).
    Cancel = 11,
    /// Either direction, any stream: nothing to say, still alive (empty
    /// payload). Sent on a stream that has been idle for a while so the
    /// peer's read timeout only fires on a dead peer.
    Keepalive = 12,
    /// Source → destination, first frame of an extra page stream
    /// ([`StreamHello`](super::StreamHello)).
    StreamHello = 13,
    /// Source → destination: a `Pages` payload compressed with LZ4 (block
    /// format): `u32` length of the uncompressed payload (at most
    /// [`MAX_FRAME_PAYLOAD`](super::MAX_FRAME_PAYLOAD)), then the block ([`compress_pages`](super::compress_pages),
    /// [`decompress_pages`](super::decompress_pages)).
    PagesLz4 = 14,
    /// Destination → source, only after `Ready`: the destination has
    /// dropped the VM and will never run it (it timed out waiting for `Go`,
    /// or its resume failed), so the source may safely resume
    /// ([`Abandoned`](super::Abandoned)). Any failure of the destination after `Ready` is
    /// reported with this kind instead of `Error`.
    Abandoned = 15,
    /// Source → destination, control connection, only when post-copy was
    /// granted: the guest switches to post-copy; the pages to drop
    /// ([`PostcopySwitch`](super::PostcopySwitch)).
    PostcopySwitch = 16,
    /// Destination → source, fault connection: the guest needs these pages
    /// now ([`PageRequest`](super::PageRequest)).
    PageRequest = 17,
    /// Source → destination: every page of the switch's discard set was sent
    /// ([`PostcopyPushed`](super::PostcopyPushed)).
    PostcopyPushed = 18,
    /// Destination → source: every page of the discard set is installed
    /// ([`PostcopyComplete`](super::PostcopyComplete)).
    PostcopyComplete = 19,
    /// Destination → source, first frame of a new control connection after
    /// the old one broke during post-copy: the pages still missing
    /// ([`PostcopyResume`](super::PostcopyResume)).
    PostcopyResume = 20,
    /// Source → destination, control connection, only when post-copy was
    /// granted with preparation: before the source pauses, the pages to
    /// drop now and arm the installer for
    /// ([`PostcopyPrepare`](super::PostcopyPrepare)).
    PostcopyPrepare = 21,
    /// Destination → source: the pages of the `PostcopyPrepare` are
    /// dropped and the installer armed ([`PostcopyArmed`](super::PostcopyArmed)).
    PostcopyArmed = 22,
    /// Source → destination, control connection, only when the switchover
    /// probe was granted: a request the destination answers at once
    /// ([`Probe`](super::Probe)), timing the control connection's hop
    /// through both engines before the switchover.
    Probe = 23,
    /// Destination → source: the answer to a [`Probe`](super::Probe)
    /// ([`ProbeReply`](super::ProbeReply)).
    ProbeReply = 24,
    /// Source → destination, only when granted (`Hello` property
    /// `livemig.pages_gather`): guest pages sent straight from guest
    /// memory; the frame CRC covers the header and the page metadata, each
    /// data page has a CRC of its own
    /// ([`gather_payload`](super::gather_payload)).
    PagesGather = 25,
    /// Source → destination, control connection, only when the read count
    /// was granted (`Hello` property `livemig.read_count`): how many bytes
    /// has the destination's engine read ([`ReadQuery`](super::ReadQuery))?
    ReadQuery = 26,
    /// Destination → source: the answer to a [`ReadQuery`](super::ReadQuery)
    /// ([`ReadCount`](super::ReadCount)).
    ReadCount = 27,
}

impl MsgKind {
    /// Every kind, in wire order.
    pub const ALL: [MsgKind; 27] = [
        MsgKind::Hello,
        MsgKind::HelloReply,
        MsgKind::Pages,
        MsgKind::RoundEnd,
        MsgKind::State,
        MsgKind::Complete,
        MsgKind::Ready,
        MsgKind::Go,
        MsgKind::Resumed,
        MsgKind::Error,
        MsgKind::Cancel,
        MsgKind::Keepalive,
        MsgKind::StreamHello,
        MsgKind::PagesLz4,
        MsgKind::Abandoned,
        MsgKind::PostcopySwitch,
        MsgKind::PageRequest,
        MsgKind::PostcopyPushed,
        MsgKind::PostcopyComplete,
        MsgKind::PostcopyResume,
        MsgKind::PostcopyPrepare,
        MsgKind::PostcopyArmed,
        MsgKind::Probe,
        MsgKind::ProbeReply,
        MsgKind::PagesGather,
        MsgKind::ReadQuery,
        MsgKind::ReadCount,
    ];

    /// The kind for a wire byte, if known.
    pub fn from_u8(v: u8) -> Option<MsgKind> {
        let i = usize::from(v).checked_sub(1)?;
        MsgKind::ALL.get(i).copied()
    }

    /// The message name.
    pub fn name(self) -> &'static str {
        match self {
            MsgKind::Hello => "Hello",
            MsgKind::HelloReply => "HelloReply",
            MsgKind::Pages => "Pages",
            MsgKind::RoundEnd => "RoundEnd",
            MsgKind::State => "State",
            MsgKind::Complete => "Complete",
            MsgKind::Ready => "Ready",
            MsgKind::Go => "Go",
            MsgKind::Resumed => "Resumed",
            MsgKind::Error => "Error",
            MsgKind::Cancel => "Cancel",
            MsgKind::Keepalive => "Keepalive",
            MsgKind::StreamHello => "StreamHello",
            MsgKind::PagesLz4 => "PagesLz4",
            MsgKind::Abandoned => "Abandoned",
            MsgKind::PostcopySwitch => "PostcopySwitch",
            MsgKind::PageRequest => "PageRequest",
            MsgKind::PostcopyPushed => "PostcopyPushed",
            MsgKind::PostcopyComplete => "PostcopyComplete",
            MsgKind::PostcopyResume => "PostcopyResume",
            MsgKind::PostcopyPrepare => "PostcopyPrepare",
            MsgKind::PostcopyArmed => "PostcopyArmed",
            MsgKind::Probe => "Probe",
            MsgKind::ProbeReply => "ProbeReply",
            MsgKind::PagesGather => "PagesGather",
            MsgKind::ReadQuery => "ReadQuery",
            MsgKind::ReadCount => "ReadCount",
        }
    }
}

impl fmt::Display for MsgKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
