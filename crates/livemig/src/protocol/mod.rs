//! The migration wire protocol: framing, message kinds and payload encodings.
//!
//! # Frames
//!
//! Every message travels as one frame: a 16-byte header, all little-endian,
//! followed by `len` payload bytes.
//!
//! | offset | size | field                                               |
//! |-------:|-----:|-----------------------------------------------------|
//! | 0      | 2    | `magic` = [`FRAME_MAGIC`] (0x4C4D, bytes `4D 4C`)   |
//! | 2      | 1    | `kind` ([`MsgKind`])                                |
//! | 3      | 1    | `flags` (0)                                         |
//! | 4      | 4    | `seq`: frame counter per direction, starting at 0  |
//! | 8      | 4    | `len`: payload length                               |
//! | 12     | 4    | `crc`: CRC-32C over header bytes 0..12, then payload |
//!
//! [`FrameHeader`] is the one owner of this layout.
//!
//! [`FrameReader`] treats its input as hostile: it checks magic, flags, kind
//! and the length limit before it touches the payload (and never allocates
//! for a length over its limit), then the CRC, then the sequence number (so
//! a dropped or duplicated frame is reported as such, and corruption as
//! corruption).
//!
//! # Conversation
//!
//! ```text
//! source                                   destination
//! Hello                 ──────────────▶
//!                       ◀──────────────    HelloReply
//! (Pages* RoundEnd)*    ──────────────▶
//! Pages* RoundEnd State* Complete ─────▶
//!                       ◀──────────────    Ready
//! Go                    ──────────────▶
//!                       ◀──────────────    Resumed
//! ```
//!
//! Either side may send [`ErrorMsg`] (and the source [`Cancel`]) instead of
//! its next message.
//!
//! # Payloads
//!
//! Every message except `Pages` is a type implementing [`Message`]; their
//! decoders bounds-check everything, refuse trailing bytes, and allocate at
//! most in proportion to the payload. `Pages` is encoded with [`PageBatch`]
//! and decoded without copying by [`page_records`]; [`RecordHeader`] owns
//! the layout of its records.

// Where things live: kind.rs (MsgKind), error.rs (ProtocolError), frame.rs
// (FrameHeader, FrameWriter, FrameReader), codec.rs (the bounds-checked
// Cursor and the put_* writers every encoder uses), messages.rs (Message
// and every control message), pages.rs (RecordHeader, PageBatch,
// page_records, LZ4, stream_of). crates/livemig/tests/golden_wire.rs pins
// the bytes of every message of PROTOCOL_VERSION 3.
mod codec;
mod error;
mod frame;
mod kind;
mod messages;
mod pages;
mod pages_gather;
mod postcopy;
mod probe;
mod read_count;
mod state_frames;
#[cfg(test)]
mod test_support;

pub use error::ProtocolError;
pub use frame::{
    crc_covered, write_all_vectored, Frame, FrameHeader, FrameReader, FrameWriter, PayloadSink,
    FRAME_HEADER_LEN, FRAME_MAGIC,
};
pub use kind::MsgKind;
pub use messages::{
    encoded_state_frames, state_frames, Abandoned, Cancel, Complete, ErrorMsg, Go, Hello,
    HelloReply, Keepalive, Message, Ready, Resumed, RoundEnd, State, StreamHello, HELLO_MAGIC,
    LOCAL_PROPERTY, MAX_RESTORE_COST, PAGES_GATHER_PROPERTY, PAUSED_PROPERTY,
    POSTCOPY_PREPARE_PROPERTY, POSTCOPY_PROPERTY, PROBE_PROPERTY, READ_COUNT_PROPERTY,
    RESTORE_COST_PROPERTY, STARTED_BEFORE_WAKE_PROPERTY,
};
pub(crate) use pages::check_record;
pub use pages::{
    compress_pages, compress_pages_into, decompress_pages, page_records, stream_of, PageBatch,
    PageRecord, PageRecords, RecordHeader, PAGE_RECORD_HEADER_LEN, STREAM_CHUNK_PAGES,
};
pub use pages_gather::{
    gather_meta_len, gather_payload, GatherData, GatherMeta, GatherPayload, GatherRecord,
    GATHER_HEAD_LEN,
};
pub use postcopy::{
    PageRequest, PageRun, PostcopyArmed, PostcopyComplete, PostcopyPrepare, PostcopyPushed,
    PostcopyResume, PostcopySwitch, MAX_DISCARD_RUNS, MAX_REQUEST_PAGES,
};
pub use probe::{Probe, ProbeReply, MAX_PROBE_PAD};
pub use read_count::{ReadCount, ReadQuery};
pub use state_frames::StateFrames;

/// Default (and largest useful) payload size of one frame.
pub const MAX_FRAME_PAYLOAD: usize = 8 << 20;

/// The newest protocol version this side speaks.
///
/// Version 3 added [`HelloReply::version`] (the version the destination
/// chose; a version-2 reply has no such field), [`Hello::paused`] (the
/// source VM's run state, carried as the reserved property
/// [`PAUSED_PROPERTY`] so that the `Hello` layout is version 2's),
/// [`MsgKind::Abandoned`], several `State` frames, and the rule that a
/// `Hello` of a newer version only appends fields (a receiver ignores what
/// follows the fields of its own newest version when the sender's version
/// is newer).
/// Version 2 added multiple page streams ([`Hello::streams`],
/// [`HelloReply::streams`], [`StreamHello`]) and [`MsgKind::Keepalive`].
///
/// This side still speaks version 2 with a peer that speaks no newer one
/// (release 0.1.0): as a destination it leaves out the reply's version and
/// answers a failure after `Ready` with `Error` instead of `Abandoned`; as
/// a source it refuses, before any page, to migrate a paused VM or a state
/// that needs more than one `State` frame to such a destination.
///
/// The exact bytes of every version-3 message, of version 2's `Hello` and
/// `HelloReply`, and of a page frame are fixtures in
/// `crates/livemig/tests/golden_wire.rs`: a new version keeps them passing
/// to show that it still reads this one.
pub const PROTOCOL_VERSION: u32 = 3;
/// The oldest protocol version this side speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 2;
/// Most page streams one migration may use.
pub const MAX_STREAMS: u32 = 16;

/// Most vCPUs a [`Hello`] may describe.
pub const MAX_VCPUS: u32 = 256;
/// Most NICs a [`Hello`] may describe.
pub const MAX_NICS: usize = 16;
/// Most properties a [`Hello`] may carry.
pub const MAX_PROPERTIES: usize = 64;
/// Longest property key or value, in bytes.
pub const MAX_PROPERTY_LEN: usize = 256;
/// Longest human-readable text (reasons, error messages), in bytes.
pub const MAX_TEXT_LEN: usize = 4096;
/// Most sections one [`State`] message may carry.
pub const MAX_SECTIONS: usize = 4096;
/// Most `State` frames in one migration (so at most 16 × 8 MiB of state).
pub const MAX_STATE_FRAMES: usize = 16;
