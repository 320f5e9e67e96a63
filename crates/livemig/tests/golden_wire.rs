//! Golden wire fixtures: the exact bytes of every message of protocol
//! version 3, of version 2's `Hello` and `HelloReply` (release v0.1.0 speaks
//! version 2 and this build still speaks it with that release), and of one
//! page frame with its 16-byte header.
//!
//! Every fixture is checked both ways: the bytes decode to the expected
//! value, and the value encodes to exactly the bytes. The next protocol
//! version keeps these fixtures unchanged to prove it still reads this one;
//! a failure here means the wire format changed.
//!
//! The fixtures were written from the layouts in the protocol docs (a
//! script independent of the encoder under test, with its own CRC-32C) and
//! compared with what release v0.1.0 encodes for the same values: every
//! message that exists in version 2 (Hello and HelloReply at version 2,
//! HelloReply's refusal, StreamHello, RoundEnd, State, Ready, Resumed,
//! Error) and the page frame are byte for byte what v0.1.0 sends.
//!
//! Fixture syntax: hex digits, whitespace ignored, `#` starts a comment that
//! runs to the end of the line, and `XX*N` is the byte `XX` repeated `N`
//! times. Multi-byte fields are little-endian.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::IoSlice;

use livemig::memory::{MemoryLayout, RegionDesc};
use livemig::protocol::{
    compress_pages, decompress_pages, gather_payload, page_records, Abandoned, Cancel, Complete,
    ErrorMsg, FrameHeader, FrameReader, FrameWriter, GatherMeta, Go, Hello, HelloReply, Keepalive,
    Message, MsgKind, PageBatch, PageRecord, Ready, RecordHeader, Resumed, RoundEnd, State,
    StreamHello, FRAME_HEADER_LEN, HELLO_MAGIC,
};
use livemig::state::Section;
use livemig::vm::{NicInfo, VmDescription};

const HELLO_V3: &str = r#"
    4c4956454d494700              # magic "LIVEMIG\0"
    03000000                      # protocol_version 3
    02000000                      # min_protocol_version 2
    00100000                      # page_size 4096
    02000000                      # 2 regions
    0000000000000000              #   guest_addr 0x0
    00000a0000000000              #   size 0xa0000
    0000100000000000              #   guest_addr 0x100000
    0000000400000000              #   size 64 MiB
    02000000                      # 2 vCPUs
    01000000                      # 1 NIC
    525400123456                  #   mac 52:54:00:12:34:56
    01                            #   has_ip
    0a000002                      #   ipv4 10.0.0.2
    02000000                      # 2 properties
    0700                          #   length 7
    6d616368696e65                #   key "machine"
    0600                          #   length 6
    726566766d6d                  #   value "refvmm"
    0e00                          #   length 14
    6c6976656d69672e706175736564  #   key "livemig.paused"
    0100                          #   length 1
    31                            #   value "1"
    02000000                      # streams 2
"#;

// HELLO_V2: 100 bytes
const HELLO_V2: &str = r#"
    4c4956454d494700  # magic "LIVEMIG\0"
    02000000          # protocol_version 2
    02000000          # min_protocol_version 2
    00100000          # page_size 4096
    02000000          # 2 regions
    0000000000000000  #   guest_addr 0x0
    00000a0000000000  #   size 0xa0000
    0000100000000000  #   guest_addr 0x100000
    0000000400000000  #   size 64 MiB
    02000000          # 2 vCPUs
    01000000          # 1 NIC
    525400123456      #   mac 52:54:00:12:34:56
    01                #   has_ip
    0a000002          #   ipv4 10.0.0.2
    01000000          # 1 properties
    0700              #   length 7
    6d616368696e65    #   key "machine"
    0600              #   length 6
    726566766d6d      #   value "refvmm"
    02000000          # streams 2
"#;

// HELLO_REPLY_V3: 27 bytes
const HELLO_REPLY_V3: &str = r#"
    01                                # accepted
    0000                              # reason: length 0
    02000000                          # streams 2
    000102030405060708090a0b0c0d0e0f  # token
    03000000                          # version 3
"#;

// HELLO_REPLY_POSTCOPY: 28 bytes (a version-3 reply granting post-copy to
// a source that offered it; docs/postcopy.md)
const HELLO_REPLY_POSTCOPY: &str = r#"
    01                                # accepted
    0000                              # reason: length 0
    01000000                          # streams 1
    000102030405060708090a0b0c0d0e0f  # token
    03000000                          # version 3
    01                                # postcopy granted
"#;

// HELLO_REPLY_LOCAL: 28 bytes (a version-3 reply granting a local
// hand-over to a source that asked for one; docs/protocol.md)
const HELLO_REPLY_LOCAL: &str = r#"
    01                                # accepted
    0000                              # reason: length 0
    01000000                          # streams 1
    000102030405060708090a0b0c0d0e0f  # token
    03000000                          # version 3
    02                                # local hand-over granted
"#;

// HELLO_REPLY_PROBE: 28 bytes (a version-3 reply granting the switchover
// probe to a source that offered it; docs/protocol.md)
const HELLO_REPLY_PROBE: &str = r#"
    01                                # accepted
    0000                              # reason: length 0
    01000000                          # streams 1
    000102030405060708090a0b0c0d0e0f  # token
    03000000                          # version 3
    04                                # switchover probe granted
"#;

// HELLO_REPLY_RESTORE_COST: 45 bytes (a version-3 reply granting the
// switchover probe and carrying the destination's rehearsed save, 1234 µs,
// and restore, 4321 µs, to a source that asked for it; docs/protocol.md)
const HELLO_REPLY_RESTORE_COST: &str = r#"
    01                                # accepted
    0000                              # reason: length 0
    01000000                          # streams 1
    000102030405060708090a0b0c0d0e0f  # token
    03000000                          # version 3
    04                                # switchover probe granted
    05                                # restore cost follows
    d204000000000000                  # save 1234 µs
    e110000000000000                  # restore 4321 µs
"#;

// HELLO_V3_RESTORE_COST: HELLO_V3 asking for the restore cost (one more
// property, `livemig.restore_cost` = "1")
const HELLO_V3_RESTORE_COST: &str = r#"
    4c4956454d494700              # magic "LIVEMIG\0"
    03000000                      # protocol_version 3
    02000000                      # min_protocol_version 2
    00100000                      # page_size 4096
    02000000                      # 2 regions
    0000000000000000              #   guest_addr 0x0
    00000a0000000000              #   size 0xa0000
    0000100000000000              #   guest_addr 0x100000
    0000000400000000              #   size 64 MiB
    02000000                      # 2 vCPUs
    01000000                      # 1 NIC
    525400123456                  #   mac 52:54:00:12:34:56
    01                            #   has_ip
    0a000002                      #   ipv4 10.0.0.2
    02000000                      # 2 properties
    0700                          #   length 7
    6d616368696e65                #   key "machine"
    0600                          #   length 6
    726566766d6d                  #   value "refvmm"
    1400                          #   length 20
    6c6976656d69672e726573746f72655f636f7374  # key "livemig.restore_cost"
    0100                          #   length 1
    31                            #   value "1"
    02000000                      # streams 2
"#;

// HELLO_V3_STARTED_BEFORE_WAKE: HELLO_V3 asking whether the destination
// starts the guest before it wakes the vCPU threads (one more property,
// `livemig.started_before_wake` = "1")
const HELLO_V3_STARTED_BEFORE_WAKE: &str = r#"
    4c4956454d494700              # magic "LIVEMIG\0"
    03000000                      # protocol_version 3
    02000000                      # min_protocol_version 2
    00100000                      # page_size 4096
    02000000                      # 2 regions
    0000000000000000              #   guest_addr 0x0
    00000a0000000000              #   size 0xa0000
    0000100000000000              #   guest_addr 0x100000
    0000000400000000              #   size 64 MiB
    02000000                      # 2 vCPUs
    01000000                      # 1 NIC
    525400123456                  #   mac 52:54:00:12:34:56
    01                            #   has_ip
    0a000002                      #   ipv4 10.0.0.2
    02000000                      # 2 properties
    0700                          #   length 7
    6d616368696e65                #   key "machine"
    0600                          #   length 6
    726566766d6d                  #   value "refvmm"
    1b00                          #   length 27
    6c6976656d69672e737461727465645f6265666f72655f77616b65  # key "livemig.started_before_wake"
    0100                          #   length 1
    31                            #   value "1"
    02000000                      # streams 2
"#;

// HELLO_REPLY_STARTED_BEFORE_WAKE: 46 bytes (a version-3 reply carrying
// the restore cost, granting PagesGather and saying that the destination
// starts the guest before it wakes the vCPU threads, to a source that
// asked for all three; docs/protocol.md)
const HELLO_REPLY_STARTED_BEFORE_WAKE: &str = r#"
    01                                # accepted
    0000                              # reason: length 0
    01000000                          # streams 1
    000102030405060708090a0b0c0d0e0f  # token
    03000000                          # version 3
    05                                # restore cost follows
    d204000000000000                  # save 1234 µs
    e110000000000000                  # restore 4321 µs
    06                                # PagesGather granted
    07                                # started before the vCPUs wake
"#;

// HELLO_V3_READ_COUNT: HELLO_V3 offering the read count (one more
// property, `livemig.read_count` = "1")
const HELLO_V3_READ_COUNT: &str = r#"
    4c4956454d494700              # magic "LIVEMIG\0"
    03000000                      # protocol_version 3
    02000000                      # min_protocol_version 2
    00100000                      # page_size 4096
    02000000                      # 2 regions
    0000000000000000              #   guest_addr 0x0
    00000a0000000000              #   size 0xa0000
    0000100000000000              #   guest_addr 0x100000
    0000000400000000              #   size 64 MiB
    02000000                      # 2 vCPUs
    01000000                      # 1 NIC
    525400123456                  #   mac 52:54:00:12:34:56
    01                            #   has_ip
    0a000002                      #   ipv4 10.0.0.2
    02000000                      # 2 properties
    0700                          #   length 7
    6d616368696e65                #   key "machine"
    0600                          #   length 6
    726566766d6d                  #   value "refvmm"
    1200                          #   length 18
    6c6976656d69672e726561645f636f756e74  # key "livemig.read_count"
    0100                          #   length 1
    31                            #   value "1"
    02000000                      # streams 2
"#;

// HELLO_REPLY_READ_COUNT: 29 bytes (a version-3 reply that says the
// destination starts the guest before it wakes the vCPU threads and
// grants the read count, to a source that asked for both;
// docs/protocol.md)
const HELLO_REPLY_READ_COUNT: &str = r#"
    01                                # accepted
    0000                              # reason: length 0
    01000000                          # streams 1
    000102030405060708090a0b0c0d0e0f  # token
    03000000                          # version 3
    07                                # started before the vCPUs wake
    08                                # read count granted
"#;

// READ_QUERY: the source's question 5, and its answer (1 MiB + 2 read)
const READ_QUERY: &str = r#"
    05000000                          # id 5
"#;
const READ_COUNT: &str = r#"
    05000000                          # id 5
    0200100000000000                  # bytes 0x100002
"#;

// PROBE: a probe with 3 padding bytes, and its answer
const PROBE: &str = r#"
    05000000                          # id 5
    03000000                          # pad 3
    000000                            # the padding
"#;
const PROBE_REPLY: &str = r#"
    05000000                          # id 5
    03000000                          # pad 3
"#;

// HELLO_V3_POSTCOPY_PREPARE: a version-3 Hello offering post-copy and its
// preparation before the pause (docs/postcopy.md, "Negotiation")
const HELLO_V3_POSTCOPY_PREPARE: &str = r#"
    4c4956454d494700                  # magic "LIVEMIG\0"
    03000000                          # protocol_version 3
    02000000                          # min_protocol_version 2
    00100000                          # page_size 4096
    02000000                          # 2 regions
    0000000000000000                  #   guest_addr 0x0
    00000a0000000000                  #   size 0xa0000
    0000100000000000                  #   guest_addr 0x100000
    0000000400000000                  #   size 64 MiB
    02000000                          # 2 vCPUs
    01000000                          # 1 NIC
    525400123456                      #   mac 52:54:00:12:34:56
    01                                #   has_ip
    0a000002                          #   ipv4 10.0.0.2
    03000000                          # 3 properties
    0700                              #   length 7
    6d616368696e65                    #   key "machine"
    0600                              #   length 6
    726566766d6d                      #   value "refvmm"
    1000                              #   length 16
    6c6976656d69672e706f7374636f7079  #   key "livemig.postcopy"
    0100                              #   length 1
    31                                #   value "1"
    1800                              #   length 24
    6c6976656d69672e706f7374636f7079  #   key "livemig.postcopy
    2e70726570617265                  #        .prepare"
    0100                              #   length 1
    31                                #   value "1"
    01000000                          # streams 1
"#;

// HELLO_REPLY_POSTCOPY_PREPARE: 28 bytes (a version-3 reply granting
// post-copy and its preparation to a source that offered both)
const HELLO_REPLY_POSTCOPY_PREPARE: &str = r#"
    01                                # accepted
    0000                              # reason: length 0
    01000000                          # streams 1
    000102030405060708090a0b0c0d0e0f  # token
    03000000                          # version 3
    03                                # post-copy with preparation granted
"#;

// POSTCOPY_PREPARE: 44 bytes
const POSTCOPY_PREPARE: &str = r#"
    02000000                          # 2 runs
    00000000                          #   region 0
    0500000000000000                  #   first_page 5
    0300000000000000                  #   npages 3
    01000000                          #   region 1
    0001000000000000                  #   first_page 256
    1000000000000000                  #   npages 16
"#;

// POSTCOPY_ARMED: 8 bytes
const POSTCOPY_ARMED: &str = r#"
    1879000000000000                  # arm_us 31000
"#;

// PAGE_REQUEST: 16 bytes
const PAGE_REQUEST: &str = r#"
    01000000                          # region 1
    2a00000000000000                  # page 42
    01000000                          # npages 1
"#;

// HELLO_REPLY_V2: 23 bytes
const HELLO_REPLY_V2: &str = r#"
    01                                # accepted
    0000                              # reason: length 0
    02000000                          # streams 2
    000102030405060708090a0b0c0d0e0f  # token (a version-2 reply ends here)
"#;

// HELLO_REPLY_REFUSED: 30 bytes
const HELLO_REPLY_REFUSED: &str = r#"
    00                                # refused
    0700                              # length 7
    6e6f20726f6f6d                    # "no room"
    01000000                          # streams 1
    00000000000000000000000000000000  # token (zero)
"#;

// STREAM_HELLO: 20 bytes
const STREAM_HELLO: &str = r#"
    000102030405060708090a0b0c0d0e0f  # token
    01000000                          # index 1
"#;

// ROUND_END: 12 bytes
const ROUND_END: &str = r#"
    03000000          # round 3
    0200000001000000  # pages 0x1_0000_0002
"#;

// STATE: 39 bytes
const STATE: &str = r#"
    02000000      # 2 sections
    0600          #   name length 6
    766370752e30  #   name "vcpu.0"
    01000000      #   version 1
    03000000      #   data length 3
    010203        #   data
    0600          #   name length 6
    73657269616c  #   name "serial"
    02000000      #   version 2
    00000000      #   data length 0
"#;

// READY: 8 bytes
const READY: &str = r#"
    d204000000000000  # restore_us 1234
"#;

// RESUMED: 8 bytes
const RESUMED: &str = r#"
    6300000000000000  # resume_us 99
"#;

// ERROR: 14 bytes
const ERROR: &str = r#"
    0600          # length 6
    6d656d6f7279  # "memory"
    0400          # length 4
    626f6f6d      # "boom"
"#;

// ABANDONED: 30 bytes
const ABANDONED: &str = r#"
    0a00                              # length 10
    636f6d706c6574696f6e              # "completion"
    1000                              # length 16
    6e6f20476f2077697468696e20313073  # "no Go within 10s"
"#;

// PAGE_STREAM: 4160 bytes: a Keepalive frame, then the page frame
const PAGE_STREAM: &str = r#"
    4d4c              # frame 0: magic
    0c                #   kind 12 (Keepalive)
    00                #   flags
    00000000          #   seq 0
    00000000          #   len 0
    66cc2bd9          #   crc32c
    4d4c              # frame 1: magic
    03                #   kind 3 (Pages)
    00                #   flags
    01000000          #   seq 1
    20100000          #   len 4128
    ba9728c6          #   crc32c
    0000000000000000  #   record: gpa 0x0
    02000000          #     npages 2
    00                #     kind 0 (zero pages)
    000000            #     reserved
    0020000000000000  #   record: gpa 0x2000
    01000000          #     npages 1
    01                #     kind 1 (data)
    000000            #     reserved
    5a*4096           #     data: 4096 bytes of 0x5a
"#;

// PAGES_GATHER: the records of PAGE_STREAM's page frame as a PagesGather
// frame (seq 0): 4156 bytes. The frame CRC covers the header's first 12
// bytes and the 44 bytes of metadata; the data page has its own CRC.
const PAGES_GATHER: &str = r#"
    4d4c              # magic
    19                # kind 25 (PagesGather)
    00                # flags
    00000000          # seq 0
    2c100000          # len 4140
    78322693          # crc32c of header[0..12] + metadata
    02000000          # 2 records
    01000000          # 1 data page
    0000000000000000  # record: gpa 0x0
    02000000          #   npages 2
    00                #   kind 0 (zero pages)
    000000            #   reserved
    0020000000000000  # record: gpa 0x2000
    01000000          #   npages 1
    01                #   kind 1 (data)
    000000            #   reserved
    498cf137          # crc32c of the data page
    5a*4096           # data: 4096 bytes of 0x5a
"#;

// PAGES_LZ4: the page frame's payload (PAGE_STREAM from offset 32) as a
// PagesLz4 payload, as release v0.1.0's compressor wrote it. Only decoding is
// pinned: any LZ4 block that decodes to the same payload is valid on the
// wire, so a different compressor may write other bytes.
const PAGES_LZ4: &str = r#"
    20100000  # uncompressed length 4128
    13000100130208002200200900130104  # LZ4 block
    001f5a0100ffffffffffffffffffffff
    fffffffff5605a5a5a5a5a5a
"#;

/// The bytes of a fixture (see the module docs for the syntax).
fn hex(fixture: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in fixture.lines() {
        let code = line.split('#').next().unwrap_or("");
        for token in code.split_whitespace() {
            let (digits, times) = match token.split_once('*') {
                Some((d, n)) => (d, n.parse::<usize>().expect("repeat count")),
                None => (token, 1),
            };
            assert!(digits.len() % 2 == 0, "odd hex token {token:?}");
            let bytes: Vec<u8> = (0..digits.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).expect("hex digit"))
                .collect();
            for _ in 0..times {
                out.extend_from_slice(&bytes);
            }
        }
    }
    out
}

/// `bytes` as hex, so that a mismatch shows where the bytes differ.
fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The fixture decodes to `value`, and `value` encodes to the fixture.
fn check<M: Message + PartialEq + Debug>(fixture: &str, value: &M) {
    let bytes = hex(fixture);
    let decoded = M::decode(&bytes)
        .unwrap_or_else(|e| panic!("{}: the fixture does not decode: {e}", M::KIND));
    assert_eq!(&decoded, value, "{}: decoded value", M::KIND);
    let encoded = value
        .encode()
        .unwrap_or_else(|e| panic!("{}: the value does not encode: {e}", M::KIND));
    assert_eq!(to_hex(&encoded), to_hex(&bytes), "{}: encoding", M::KIND);
}

const TOKEN: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

fn desc() -> VmDescription {
    let layout = MemoryLayout::new(vec![
        RegionDesc {
            guest_addr: 0,
            size: 0xa0000,
        },
        RegionDesc {
            guest_addr: 0x100000,
            size: 64 << 20,
        },
    ])
    .expect("layout");
    VmDescription {
        layout,
        vcpus: 2,
        nics: vec![NicInfo {
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            ipv4: Some([10, 0, 0, 2]),
        }],
        properties: BTreeMap::from([("machine".to_string(), "refvmm".to_string())]),
    }
}

/// A `Hello` with explicit versions (not this build's constants, which a
/// later version changes).
fn hello(protocol_version: u32, paused: bool) -> Hello {
    Hello {
        magic: HELLO_MAGIC,
        protocol_version,
        min_protocol_version: 2,
        page_size: 4096,
        desc: desc(),
        streams: 2,
        paused,
        postcopy: false,
        postcopy_prepare: false,
        local: None,
        probe: false,
        restore_cost: false,
        pages_gather: false,
        started_before_wake: false,
        read_count: false,
    }
}

#[test]
fn kind_bytes() {
    use MsgKind::*;
    let table = [
        (Hello, 1),
        (HelloReply, 2),
        (Pages, 3),
        (RoundEnd, 4),
        (State, 5),
        (Complete, 6),
        (Ready, 7),
        (Go, 8),
        (Resumed, 9),
        (Error, 10),
        (Cancel, 11),
        (Keepalive, 12),
        (StreamHello, 13),
        (PagesLz4, 14),
        (Abandoned, 15),
        (PostcopySwitch, 16),
        (PageRequest, 17),
        (PostcopyPushed, 18),
        (PostcopyComplete, 19),
        (PostcopyResume, 20),
        (PostcopyPrepare, 21),
        (PostcopyArmed, 22),
        (Probe, 23),
        (ProbeReply, 24),
        (PagesGather, 25),
        (ReadQuery, 26),
        (ReadCount, 27),
    ];
    assert_eq!(table.len(), MsgKind::ALL.len());
    for (kind, byte) in table {
        assert_eq!(kind as u8, byte, "{kind}");
        assert_eq!(MsgKind::from_u8(byte), Some(kind), "{byte}");
    }
}

#[test]
fn hello_v3() {
    check(HELLO_V3, &hello(3, true));
    let got = Hello::decode(&hex(HELLO_V3)).expect("decodes");
    assert_eq!(got.negotiated_version().expect("negotiates"), 3);
}

#[test]
fn hello_v2() {
    check(HELLO_V2, &hello(2, false));
    let got = Hello::decode(&hex(HELLO_V2)).expect("decodes");
    assert_eq!(got.negotiated_version().expect("negotiates"), 2);
}

#[test]
fn hello_reply_v3() {
    check(
        HELLO_REPLY_V3,
        &HelloReply {
            accepted: true,
            reason: String::new(),
            streams: 2,
            token: TOKEN,
            version: 3,
            postcopy: false,
            postcopy_prepare: false,
            local: false,
            probe: false,
            restore_cost: None,
            pages_gather: false,
            started_before_wake: false,
            read_count: false,
        },
    );
}

#[test]
fn hello_reply_granting_postcopy() {
    check(
        HELLO_REPLY_POSTCOPY,
        &HelloReply {
            accepted: true,
            reason: String::new(),
            streams: 1,
            token: TOKEN,
            version: 3,
            postcopy: true,
            postcopy_prepare: false,
            local: false,
            probe: false,
            restore_cost: None,
            pages_gather: false,
            started_before_wake: false,
            read_count: false,
        },
    );
}

#[test]
fn hello_reply_granting_a_local_hand_over() {
    check(
        HELLO_REPLY_LOCAL,
        &HelloReply {
            accepted: true,
            reason: String::new(),
            streams: 1,
            token: TOKEN,
            version: 3,
            postcopy: false,
            postcopy_prepare: false,
            local: true,
            probe: false,
            restore_cost: None,
            pages_gather: false,
            started_before_wake: false,
            read_count: false,
        },
    );
}

#[test]
fn hello_reply_granting_the_probe_and_the_probe_messages() {
    check(
        HELLO_REPLY_PROBE,
        &HelloReply {
            accepted: true,
            reason: String::new(),
            streams: 1,
            token: TOKEN,
            version: 3,
            postcopy: false,
            postcopy_prepare: false,
            local: false,
            probe: true,
            restore_cost: None,
            pages_gather: false,
            started_before_wake: false,
            read_count: false,
        },
    );
    check(PROBE, &livemig::protocol::Probe { id: 5, pad: 3 });
    check(
        PROBE_REPLY,
        &livemig::protocol::ProbeReply { id: 5, pad: 3 },
    );
}

#[test]
fn hello_asking_for_the_restore_cost_and_a_reply_carrying_it() {
    let mut h = hello(3, false);
    h.restore_cost = true;
    check(HELLO_V3_RESTORE_COST, &h);
    check(
        HELLO_REPLY_RESTORE_COST,
        &HelloReply {
            accepted: true,
            reason: String::new(),
            streams: 1,
            token: TOKEN,
            version: 3,
            postcopy: false,
            postcopy_prepare: false,
            local: false,
            probe: true,
            restore_cost: Some(livemig::vm::RestoreRehearsal {
                save: std::time::Duration::from_micros(1234),
                restore: std::time::Duration::from_micros(4321),
            }),
            pages_gather: false,
            started_before_wake: false,
            read_count: false,
        },
    );
}

#[test]
fn hello_asking_whether_the_guest_starts_before_the_wake_and_a_reply_saying_so() {
    let mut h = hello(3, false);
    h.started_before_wake = true;
    check(HELLO_V3_STARTED_BEFORE_WAKE, &h);
    check(
        HELLO_REPLY_STARTED_BEFORE_WAKE,
        &HelloReply {
            accepted: true,
            reason: String::new(),
            streams: 1,
            token: TOKEN,
            version: 3,
            postcopy: false,
            postcopy_prepare: false,
            local: false,
            probe: false,
            restore_cost: Some(livemig::vm::RestoreRehearsal {
                save: std::time::Duration::from_micros(1234),
                restore: std::time::Duration::from_micros(4321),
            }),
            pages_gather: true,
            started_before_wake: true,
            read_count: false,
        },
    );
    // Only as the last byte: twice, or before the PagesGather grant, is
    // refused.
    let mut bytes = hex(HELLO_REPLY_V3);
    bytes.extend_from_slice(&[7, 7]);
    assert!(HelloReply::decode(&bytes).is_err());
    let mut bytes = hex(HELLO_REPLY_V3);
    bytes.extend_from_slice(&[7, 6]);
    assert!(HelloReply::decode(&bytes).is_err());
}

#[test]
fn hello_offering_the_read_count_and_a_reply_granting_it() {
    let mut h = hello(3, false);
    h.read_count = true;
    check(HELLO_V3_READ_COUNT, &h);
    check(
        HELLO_REPLY_READ_COUNT,
        &HelloReply {
            accepted: true,
            reason: String::new(),
            streams: 1,
            token: TOKEN,
            version: 3,
            postcopy: false,
            postcopy_prepare: false,
            local: false,
            probe: false,
            restore_cost: None,
            pages_gather: false,
            started_before_wake: true,
            read_count: true,
        },
    );
    check(READ_QUERY, &livemig::protocol::ReadQuery { id: 5 });
    check(
        READ_COUNT,
        &livemig::protocol::ReadCount {
            id: 5,
            bytes: 0x10_0002,
        },
    );
    // Only as the last byte: twice, or before started_before_wake, is
    // refused.
    let mut bytes = hex(HELLO_REPLY_V3);
    bytes.extend_from_slice(&[8, 8]);
    assert!(HelloReply::decode(&bytes).is_err());
    let mut bytes = hex(HELLO_REPLY_V3);
    bytes.extend_from_slice(&[8, 7]);
    assert!(HelloReply::decode(&bytes).is_err());
}

#[test]
fn hello_offering_postcopy_with_its_preparation() {
    let mut h = hello(3, false);
    h.streams = 1;
    h.postcopy = true;
    h.postcopy_prepare = true;
    check(HELLO_V3_POSTCOPY_PREPARE, &h);
}

#[test]
fn hello_reply_granting_postcopy_with_its_preparation() {
    check(
        HELLO_REPLY_POSTCOPY_PREPARE,
        &HelloReply {
            accepted: true,
            reason: String::new(),
            streams: 1,
            token: TOKEN,
            version: 3,
            postcopy: true,
            postcopy_prepare: true,
            local: false,
            probe: false,
            restore_cost: None,
            pages_gather: false,
            started_before_wake: false,
            read_count: false,
        },
    );
}

#[test]
fn postcopy_prepare() {
    use livemig::protocol::{PageRun, PostcopyPrepare};
    check(
        POSTCOPY_PREPARE,
        &PostcopyPrepare {
            discard: vec![
                PageRun {
                    region: 0,
                    first_page: 5,
                    npages: 3,
                },
                PageRun {
                    region: 1,
                    first_page: 256,
                    npages: 16,
                },
            ],
        },
    );
}

#[test]
fn postcopy_armed() {
    check(
        POSTCOPY_ARMED,
        &livemig::protocol::PostcopyArmed { arm_us: 31_000 },
    );
}

#[test]
fn page_request() {
    check(
        PAGE_REQUEST,
        &livemig::protocol::PageRequest {
            region: 1,
            page: 42,
            npages: 1,
        },
    );
}

#[test]
fn hello_reply_v2() {
    check(
        HELLO_REPLY_V2,
        &HelloReply {
            accepted: true,
            reason: String::new(),
            streams: 2,
            token: TOKEN,
            version: 2,
            postcopy: false,
            postcopy_prepare: false,
            local: false,
            probe: false,
            restore_cost: None,
            pages_gather: false,
            started_before_wake: false,
            read_count: false,
        },
    );
}

#[test]
fn hello_reply_refused() {
    check(HELLO_REPLY_REFUSED, &HelloReply::refused("no room".into()));
}

#[test]
fn stream_hello() {
    check(
        STREAM_HELLO,
        &StreamHello {
            token: TOKEN,
            index: 1,
        },
    );
}

#[test]
fn round_end() {
    check(
        ROUND_END,
        &RoundEnd {
            round: 3,
            pages: 0x1_0000_0002,
        },
    );
}

#[test]
fn state() {
    check(
        STATE,
        &State {
            sections: vec![
                Section::new("vcpu.0", 1, vec![1, 2, 3]),
                Section::new("serial", 2, vec![]),
            ],
        },
    );
}

#[test]
fn ready_and_resumed() {
    check(READY, &Ready { restore_us: 1234 });
    check(RESUMED, &Resumed { resume_us: 99 });
}

#[test]
fn error_and_abandoned() {
    check(ERROR, &ErrorMsg::new("memory", "boom"));
    check(
        ABANDONED,
        &Abandoned(ErrorMsg::new("completion", "no Go within 10s")),
    );
}

#[test]
fn empty_messages() {
    check("", &Complete);
    check("", &Go);
    check("", &Cancel);
    check("", &Keepalive);
}

/// The records of the page frame.
fn page_records_value() -> Vec<PageRecord<'static>> {
    static DATA: [u8; 4096] = [0x5a; 4096];
    vec![
        PageRecord {
            gpa: 0,
            npages: 2,
            data: None,
        },
        PageRecord {
            gpa: 0x2000,
            npages: 1,
            data: Some(&DATA),
        },
    ]
}

/// The `PagesGather` frame: read and decoded, every page intact; written
/// by `GatherMeta` and `write_frame_split` to the same bytes; a changed
/// data byte tears that page only, a changed metadata byte fails the frame.
#[test]
fn pages_gather_frame() {
    let stream = hex(PAGES_GATHER);
    let mut r = FrameReader::new(&stream[..]);
    let f = r.read_frame().expect("frame");
    assert_eq!(
        (f.kind, f.seq, f.payload.len()),
        (MsgKind::PagesGather, 0, 4140)
    );
    let g = gather_payload(f.payload).expect("payload");
    let recs = g.records();
    assert_eq!((recs.len(), recs[0].gpa, recs[0].npages), (2, 0, 2));
    assert!(recs[0].data.is_none());
    let d = recs[1].data.expect("data");
    assert_eq!((recs[1].gpa, recs[1].npages), (0x2000, 1));
    assert!(d.intact(0) && d.page(0) == [0x5a; 4096]);

    let mut m = GatherMeta::default();
    m.push_zero(0, 2).expect("zero");
    m.push_data(0x2000, &[0x5a; 4096]).expect("data");
    let mut w = FrameWriter::new(Vec::new());
    let data = [0x5a; 4096];
    w.write_frame_split(MsgKind::PagesGather, &m.parts(), &[IoSlice::new(&data)])
        .expect("write");
    assert_eq!(to_hex(&w.into_inner()), to_hex(&stream));

    let mut torn = stream.clone();
    let n = torn.len();
    torn[n - 1] ^= 1;
    let mut r = FrameReader::new(&torn[..]);
    let f = r
        .read_frame()
        .expect("the frame CRC does not cover page data");
    let g = gather_payload(f.payload).expect("payload");
    assert!(!g.records()[1].data.expect("data").intact(0));
    let mut bad = stream.clone();
    bad[FRAME_HEADER_LEN + 8] ^= 1;
    let e = FrameReader::new(&bad[..])
        .read_frame()
        .expect_err("metadata");
    assert!(e.to_string().contains("crc mismatch"), "{e}");
}

#[test]
fn hello_reply_granting_pages_gather() {
    let mut bytes = hex(HELLO_REPLY_V3);
    bytes.push(6);
    let r = HelloReply::decode(&bytes).expect("decodes");
    assert!(r.pages_gather);
    assert_eq!(r.encode().expect("encodes"), bytes);
    // After it, only the byte 7 (started before the wake): not itself.
    bytes.push(6);
    assert!(HelloReply::decode(&bytes).is_err());
}

#[test]
fn page_frame() {
    let stream = hex(PAGE_STREAM);
    let payload = &stream[2 * FRAME_HEADER_LEN..];

    // Decoding: two frames, the second one's records.
    let mut r = FrameReader::new(&stream[..]);
    let f = r.read_frame().expect("frame 0");
    assert_eq!((f.kind, f.seq, f.payload.len()), (MsgKind::Keepalive, 0, 0));
    let f = r.read_frame().expect("frame 1");
    assert_eq!((f.kind, f.seq), (MsgKind::Pages, 1));
    assert_eq!(f.payload, payload);
    let records: Vec<_> = page_records(f.payload)
        .collect::<Result<_, _>>()
        .expect("records");
    assert_eq!(records, page_records_value());
    assert!(r.read_frame().expect_err("end").is_clean_eof());

    // The header and record types read the same fields.
    let header: [u8; FRAME_HEADER_LEN] = stream[16..32].try_into().expect("16 bytes");
    let h = FrameHeader::decode(&header);
    assert_eq!((h.kind, h.flags, h.seq, h.len), (3, 0, 1, 4128));
    assert_eq!(h.check(1, 8 << 20).expect("valid"), (MsgKind::Pages, 4128));
    assert_eq!(
        RecordHeader::decode(&payload[16..]).expect("record"),
        RecordHeader::new(0x2000, 1, RecordHeader::KIND_DATA)
    );

    // Encoding: the same values written by a PageBatch and a FrameWriter.
    let mut batch = PageBatch::with_capacity(payload.len());
    for rec in page_records_value() {
        match rec.data {
            None => batch.push_zero(rec.gpa, rec.npages),
            Some(data) => batch.push_data(rec.gpa, rec.npages, data),
        }
        .expect("push");
    }
    let mut w = FrameWriter::new(Vec::new());
    w.send(&Keepalive).expect("keepalive");
    w.write_frame(MsgKind::Pages, &[batch.as_bytes()])
        .expect("pages");
    assert_eq!(to_hex(&w.into_inner()), to_hex(&stream));
}

#[test]
fn pages_lz4() {
    let stream = hex(PAGE_STREAM);
    let mut out = Vec::new();
    decompress_pages(&hex(PAGES_LZ4), &mut out).expect("decompresses");
    assert_eq!(to_hex(&out), to_hex(&stream[2 * FRAME_HEADER_LEN..]));
    // This build's compressor writes a block that decodes the same way.
    let mut z = Vec::new();
    compress_pages(&out, &mut z);
    let mut back = Vec::new();
    decompress_pages(&z, &mut back).expect("round trip");
    assert_eq!(back, out);
}
