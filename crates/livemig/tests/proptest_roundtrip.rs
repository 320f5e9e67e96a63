//! Property tests: every wire encoding round-trips, and decoding arbitrary
//! bytes never panics.
//!
//! * every message kind (`Hello` with an arbitrary VM description,
//!   `HelloReply`, `RoundEnd`, `State`, `Complete`, `Ready`, `Go`,
//!   `Resumed`, `Error`, `Cancel`), alone and as a framed stream;
//! * page batches: whatever is pushed decodes to the same pages, in order;
//! * the VM description (through `Hello`, and through serde);
//! * `StateWriter` / `StateReader`;
//! * a single flipped bit anywhere in a framed stream is always caught.

use std::collections::BTreeMap;

use proptest::prelude::*;

use livemig::memory::{MemoryLayout, RegionDesc, MAX_REGIONS, PAGE_SIZE};
use livemig::protocol::{
    page_records, Cancel, Complete, ErrorMsg, FrameReader, FrameWriter, Go, Hello, HelloReply,
    Message, MsgKind, PageBatch, Ready, Resumed, RoundEnd, State, MAX_TEXT_LEN,
};
use livemig::state::{Section, StateReader, StateWriter, MAX_SECTION_NAME};
use livemig::vm::{NicInfo, VmDescription};

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

/// Sorted, non-overlapping, page-aligned regions (gaps allowed, adjacent
/// regions too).
fn layout() -> impl Strategy<Value = MemoryLayout> {
    prop::collection::vec((0u64..1 << 24, 1u64..1 << 24), 1..=MAX_REGIONS).prop_map(|v| {
        let mut addr = 0u64;
        let mut regions = Vec::new();
        for (gap, pages) in v {
            addr += gap * PAGE_SIZE;
            regions.push(RegionDesc {
                guest_addr: addr,
                size: pages * PAGE_SIZE,
            });
            addr += pages * PAGE_SIZE;
        }
        MemoryLayout::new(regions).expect("valid by construction")
    })
}

fn nic() -> impl Strategy<Value = NicInfo> {
    (any::<[u8; 6]>(), any::<Option<[u8; 4]>>()).prop_map(|(mac, ipv4)| NicInfo { mac, ipv4 })
}

fn description() -> impl Strategy<Value = VmDescription> {
    (
        layout(),
        1u32..=256,
        prop::collection::vec(nic(), 0..=16),
        prop::collection::btree_map("\\PC{1,60}", "\\PC{0,60}", 0..=64),
    )
        .prop_map(|(layout, vcpus, nics, properties)| VmDescription {
            layout,
            vcpus,
            nics,
            properties,
        })
}

fn sections() -> impl Strategy<Value = Vec<Section>> {
    let name =
        prop::string::string_regex(&format!("[ -~]{{1,{MAX_SECTION_NAME}}}")).expect("regex");
    prop::collection::btree_map(
        name,
        (any::<u32>(), prop::collection::vec(any::<u8>(), 0..1024)),
        0..24,
    )
    .prop_map(|m| {
        m.into_iter()
            .map(|(name, (version, data))| Section::new(name, version, data))
            .collect()
    })
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "\\PC{0,80}",
        1 => "\\PC{1000,2000}",
    ]
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(m: &M) -> Result<Vec<u8>, TestCaseError> {
    let bytes = m.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back = M::decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, m);
    // Trailing bytes are refused, every strict prefix too (spot checks).
    let mut long = bytes.clone();
    long.push(0);
    prop_assert!(M::decode(&long).is_err());
    if !bytes.is_empty() {
        prop_assert!(M::decode(&bytes[..bytes.len() - 1]).is_err());
        prop_assert!(M::decode(&bytes[..bytes.len() / 2]).is_err());
    }
    Ok(bytes)
}

/// Any one message, encoded: (kind, payload).
fn any_message() -> impl Strategy<Value = (MsgKind, Vec<u8>)> {
    let enc = |k: MsgKind, r: Result<Vec<u8>, livemig::protocol::ProtocolError>| {
        (k, r.expect("encodable"))
    };
    prop_oneof![
        description().prop_map(move |d| enc(MsgKind::Hello, Hello::new(d).encode())),
        (any::<bool>(), "\\PC{0,40}").prop_map(move |(accepted, reason)| enc(
            MsgKind::HelloReply,
            HelloReply {
                accepted,
                reason,
                streams: 1,
                token: [0; 16],
                version: if accepted {
                    livemig::protocol::PROTOCOL_VERSION
                } else {
                    0
                },
                postcopy: false,
                postcopy_prepare: false,
                local: false,
                probe: false,
                restore_cost: None,
                pages_gather: false,
                started_before_wake: false,
                read_count: false,
            }
            .encode()
        )),
        (any::<u32>(), any::<u64>()).prop_map(move |(round, pages)| enc(
            MsgKind::RoundEnd,
            RoundEnd { round, pages }.encode()
        )),
        sections().prop_map(move |sections| enc(MsgKind::State, State { sections }.encode())),
        Just((MsgKind::Complete, Vec::new())),
        any::<u64>().prop_map(move |restore_us| enc(MsgKind::Ready, Ready { restore_us }.encode())),
        Just((MsgKind::Go, Vec::new())),
        any::<u64>()
            .prop_map(move |resume_us| enc(MsgKind::Resumed, Resumed { resume_us }.encode())),
        ("\\PC{0,20}", "\\PC{0,80}")
            .prop_map(move |(p, m)| enc(MsgKind::Error, ErrorMsg::new(p, m).encode())),
        Just((MsgKind::Cancel, Vec::new())),
        prop::collection::vec(any::<u8>(), 0..3000).prop_map(|p| (MsgKind::Pages, p)),
    ]
}

fn frames(list: &[(MsgKind, Vec<u8>)]) -> Vec<u8> {
    let mut fw = FrameWriter::new(Vec::new());
    for (k, p) in list {
        fw.write_frame(*k, &[p]).expect("frame");
    }
    fw.into_inner()
}

#[derive(Debug, Clone)]
enum Op {
    U8(u8),
    U16(u16),
    U32(u32),
    U64(u64),
    Bytes(Vec<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        any::<u8>().prop_map(Op::U8),
        any::<u16>().prop_map(Op::U16),
        any::<u32>().prop_map(Op::U32),
        any::<u64>().prop_map(Op::U64),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Op::Bytes),
    ]
}

/// Reads `ops` back from `r`; the first failure is returned as Err.
fn read_ops(r: &mut StateReader<'_>, ops: &[Op]) -> Result<Vec<Op>, String> {
    let mut out = Vec::new();
    for o in ops {
        let e = |e: livemig::state::StateError| e.to_string();
        out.push(match o {
            Op::U8(_) => Op::U8(r.u8().map_err(e)?),
            Op::U16(_) => Op::U16(r.u16().map_err(e)?),
            Op::U32(_) => Op::U32(r.u32().map_err(e)?),
            Op::U64(_) => Op::U64(r.u64().map_err(e)?),
            Op::Bytes(b) => Op::Bytes(r.bytes(b.len()).map_err(e)?.to_vec()),
        });
    }
    Ok(out)
}

fn same(a: &[Op], b: &[Op]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| match (x, y) {
            (Op::U8(x), Op::U8(y)) => x == y,
            (Op::U16(x), Op::U16(y)) => x == y,
            (Op::U32(x), Op::U32(y)) => x == y,
            (Op::U64(x), Op::U64(y)) => x == y,
            (Op::Bytes(x), Op::Bytes(y)) => x == y,
            _ => false,
        })
}

/// A page batch operation: `npages` pages at page `page`, data (with
/// contents derived from `fill`) or zero.
#[derive(Debug, Clone, Copy)]
struct Push {
    page: u64,
    npages: u32,
    data: bool,
    fill: u8,
}

fn push() -> impl Strategy<Value = Push> {
    // Small page numbers so that neighbours (and merges) are common.
    (0u64..64, 1u32..6, any::<bool>(), any::<u8>()).prop_map(|(page, npages, data, fill)| Push {
        page,
        npages,
        data,
        fill,
    })
}

fn page_bytes(fill: u8, i: u32) -> Vec<u8> {
    (0..PAGE_SIZE as usize)
        .map(|j| fill ^ (i as u8) ^ (j as u8).rotate_left(3))
        .collect()
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn hello_and_description_round_trip(d in description()) {
        let hello = Hello::new(d.clone());
        round_trip(&hello)?;
        prop_assert_eq!(hello.negotiated_version().ok(), Some(livemig::protocol::PROTOCOL_VERSION));
        // The description through serde (reports, the API socket).
        let json = serde_json::to_string(&d).expect("serialize");
        let back: VmDescription = serde_json::from_str(&json).expect("deserialize");
        prop_assert_eq!(back, d);
    }

    #[test]
    fn layout_checks_agree_with_locate(l in layout(), gpa_page in 0u64..1 << 30, n in 1u64..64) {
        let gpa = gpa_page * PAGE_SIZE;
        match l.locate(gpa, n) {
            Some((i, page)) => {
                let r = l.regions()[i];
                prop_assert!(gpa >= r.guest_addr && gpa + n * PAGE_SIZE <= r.end());
                prop_assert_eq!(page, (gpa - r.guest_addr) / PAGE_SIZE);
            }
            None => {
                let inside = l.regions().iter().any(|r| gpa >= r.guest_addr && gpa + n * PAGE_SIZE <= r.end());
                prop_assert!(!inside);
            }
        }
        prop_assert_eq!(l.total_pages() * PAGE_SIZE, l.total_bytes());
    }

    #[test]
    fn hello_reply_round_trip(accepted in any::<bool>(), reason in text()) {
        let version = if accepted { livemig::protocol::PROTOCOL_VERSION } else { 0 };
        let m = HelloReply { accepted, reason, streams: 1, token: [0; 16], version, postcopy: false, postcopy_prepare: false, local: false, probe: false, restore_cost: None, pages_gather: false, started_before_wake: false, read_count: false };
        if m.reason.len() <= MAX_TEXT_LEN && accepted {
            round_trip(&m)?;
        } else if m.reason.len() <= MAX_TEXT_LEN {
            // A refusal is read up to its reason, whatever follows (it may
            // come from a destination of another version).
            let bytes = m.encode().expect("encode");
            prop_assert_eq!(&HelloReply::decode(&bytes).expect("decode"), &m);
            let mut long = bytes.clone();
            long.push(0);
            prop_assert_eq!(&HelloReply::decode(&long).expect("decode"), &m);
        } else {
            // Cut at a character boundary, never refused.
            let back = HelloReply::decode(&m.encode().expect("encode")).expect("decode");
            prop_assert!(back.reason.len() <= MAX_TEXT_LEN);
            prop_assert!(m.reason.starts_with(&back.reason));
        }
    }

    #[test]
    fn error_round_trip(phase in text(), message in text()) {
        let m = ErrorMsg::new(phase, message);
        let back = ErrorMsg::decode(&m.encode().expect("encode")).expect("decode");
        prop_assert!(back.phase.len() <= MAX_TEXT_LEN && back.message.len() <= MAX_TEXT_LEN);
        prop_assert!(m.phase.starts_with(&back.phase) && m.message.starts_with(&back.message));
        if m.phase.len() <= MAX_TEXT_LEN && m.message.len() <= MAX_TEXT_LEN {
            round_trip(&m)?;
        }
    }

    #[test]
    fn small_messages_round_trip(a in any::<u32>(), b in any::<u64>()) {
        round_trip(&RoundEnd { round: a, pages: b })?;
        prop_assert_eq!(round_trip(&Ready { restore_us: b })?.len(), 8);
        prop_assert_eq!(round_trip(&Resumed { resume_us: b })?.len(), 8);
        prop_assert!(round_trip(&Complete)?.is_empty());
        prop_assert!(round_trip(&Go)?.is_empty());
        prop_assert!(round_trip(&Cancel)?.is_empty());
    }

    #[test]
    fn state_round_trip(s in sections()) {
        round_trip(&State { sections: s })?;
    }

    #[test]
    fn framed_streams_round_trip(msgs in prop::collection::vec(any_message(), 0..12)) {
        let bytes = frames(&msgs);
        let mut fr = FrameReader::new(&bytes[..]);
        for (i, (k, p)) in msgs.iter().enumerate() {
            let f = fr.read_frame().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(f.kind, *k);
            prop_assert_eq!(f.seq, i as u32);
            prop_assert_eq!(f.payload, &p[..]);
        }
        let end = fr.read_frame().map(|_| ()).map_err(|e| e.is_clean_eof());
        prop_assert_eq!(end, Err(true));
        prop_assert_eq!(fr.bytes_read(), bytes.len() as u64);
    }

    #[test]
    fn a_flipped_bit_is_always_caught(
        msgs in prop::collection::vec(any_message(), 1..6),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let mut bytes = frames(&msgs);
        let i = at.index(bytes.len());
        bytes[i] ^= 1 << bit;
        let mut fr = FrameReader::new(&bytes[..]);
        let mut failed = false;
        for _ in 0..msgs.len() {
            if fr.read_frame().is_err() {
                failed = true;
                break;
            }
        }
        prop_assert!(failed, "bit {} of byte {} flipped unnoticed", bit, i);
    }

    #[test]
    fn page_batches_round_trip(pushes in prop::collection::vec(push(), 0..24)) {
        let mut batch = PageBatch::with_capacity(1 << 20);
        let mut want: Vec<(u64, Option<Vec<u8>>)> = Vec::new();
        let (mut data_pages, mut zero_pages) = (0u64, 0u64);
        for p in &pushes {
            let gpa = p.page * PAGE_SIZE;
            if p.data {
                let mut data = Vec::new();
                for i in 0..p.npages {
                    let pg = page_bytes(p.fill, i);
                    want.push((gpa + u64::from(i) * PAGE_SIZE, Some(pg.clone())));
                    data.extend(pg);
                }
                if p.fill % 2 == 0 {
                    batch.push_data(gpa, p.npages, &data).expect("push_data");
                } else {
                    batch
                        .push_data_with(gpa, p.npages, |dst: &mut [u8]| {
                            dst.copy_from_slice(&data);
                            Ok::<(), livemig::protocol::ProtocolError>(())
                        })
                        .expect("push_data_with");
                }
                data_pages += u64::from(p.npages);
            } else {
                for i in 0..p.npages {
                    want.push((gpa + u64::from(i) * PAGE_SIZE, None));
                }
                batch.push_zero(gpa, p.npages).expect("push_zero");
                zero_pages += u64::from(p.npages);
            }
        }
        prop_assert_eq!(batch.data_pages(), data_pages);
        prop_assert_eq!(batch.zero_pages(), zero_pages);
        prop_assert_eq!(batch.is_empty(), pushes.is_empty());
        let mut got = Vec::new();
        let mut records = 0usize;
        for r in page_records(batch.as_bytes()) {
            let r = r.map_err(|e| TestCaseError::fail(e.to_string()))?;
            records += 1;
            for i in 0..u64::from(r.npages) {
                let page = r.data.map(|d| {
                    let o = (i * PAGE_SIZE) as usize;
                    d[o..o + PAGE_SIZE as usize].to_vec()
                });
                got.push((r.gpa + i * PAGE_SIZE, page));
            }
        }
        prop_assert!(records <= pushes.len());
        prop_assert!(got == want, "batch decodes to other pages");
        // A failing fill leaves the batch as it was.
        let before = batch.as_bytes().to_vec();
        let r = batch.push_data_with(0, 1, |_dst: &mut [u8]| {
            Err(livemig::protocol::ProtocolError::Unencodable { msg: "test", reason: "no".into() })
        });
        prop_assert!(r.is_err());
        prop_assert_eq!(batch.as_bytes(), &before[..]);
        batch.clear();
        prop_assert!(batch.is_empty() && batch.data_pages() == 0 && batch.zero_pages() == 0);
    }

    #[test]
    fn state_writer_reader_round_trip(ops in prop::collection::vec(op(), 0..40), extra in 1usize..4) {
        let mut w = StateWriter::new();
        for o in &ops {
            match o {
                Op::U8(v) => w.u8(*v),
                Op::U16(v) => w.u16(*v),
                Op::U32(v) => w.u32(*v),
                Op::U64(v) => w.u64(*v),
                Op::Bytes(b) => w.bytes(b),
            };
        }
        let bytes = w.finish();
        let mut r = StateReader::new("prop", &bytes);
        let back = read_ops(&mut r, &ops).map_err(TestCaseError::fail)?;
        prop_assert!(same(&back, &ops));
        r.finish().map_err(|e| TestCaseError::fail(e.to_string()))?;
        // Trailing bytes are refused by finish.
        let mut long = bytes.clone();
        long.extend(std::iter::repeat_n(0u8, extra));
        let mut r = StateReader::new("prop", &long);
        read_ops(&mut r, &ops).map_err(TestCaseError::fail)?;
        let e = r.finish().expect_err("trailing bytes accepted");
        prop_assert!(e.to_string().contains("prop"), "{}", e);
        // Missing bytes: reading fails somewhere, naming the section.
        if !bytes.is_empty() {
            let short = &bytes[..bytes.len() - extra.min(bytes.len())];
            let mut r = StateReader::new("prop", short);
            let e = read_ops(&mut r, &ops).expect_err("truncated state read");
            prop_assert!(e.contains("prop") && e.contains("truncated"), "{}", e);
        }
    }

    #[test]
    fn decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Hello::decode(&bytes);
        let _ = HelloReply::decode(&bytes);
        let _ = RoundEnd::decode(&bytes);
        let _ = State::decode(&bytes);
        let _ = Ready::decode(&bytes);
        let _ = Resumed::decode(&bytes);
        let _ = ErrorMsg::decode(&bytes);
        let _ = Complete::decode(&bytes);
        for r in page_records(&bytes) {
            if r.is_err() {
                break;
            }
        }
        let mut fr = FrameReader::new(&bytes[..]);
        while fr.read_frame().is_ok() {}
    }
}

/// The property keys of a description are a map: duplicates cannot be
/// encoded, and a decoder refuses them (checked on a hand-made payload).
#[test]
fn duplicate_property_refused() {
    let d = VmDescription {
        layout: MemoryLayout::new(vec![RegionDesc {
            guest_addr: 0,
            size: PAGE_SIZE,
        }])
        .unwrap(),
        vcpus: 1,
        nics: vec![],
        properties: BTreeMap::from([("a".to_string(), "1".to_string())]),
    };
    let mut bytes = Hello::new(d).encode().unwrap();
    // Take off the trailing stream count, set the properties count
    // 1 -> 2, add the same pair again, put it back.
    let streams = bytes.split_off(bytes.len() - 4);
    let pair = [1u8, 0, b'a', 1, 0, b'1'];
    let n = bytes.len();
    bytes[n - 10..n - 6].copy_from_slice(&2u32.to_le_bytes());
    bytes.extend_from_slice(&pair);
    bytes.extend_from_slice(&streams);
    let e = Hello::decode(&bytes).unwrap_err();
    assert!(e.to_string().contains("appears twice"), "{e}");
}
