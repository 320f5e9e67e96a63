//! `Pages` frames read straight into guest memory: [`PageSink`] as a
//! [`PayloadSink`].
//!
//! The frame reader hands the sink each piece of the payload as it arrives:
//! record headers go into a 16-byte buffer and are checked (the same
//! checks, in the same order, with the same errors as a payload read whole:
//! [`check_record`], then [`PageSink::place`]); the page data of a record
//! that passed them is read by the transport's `read()` directly into the
//! guest pages the record names, with no copy through a frame buffer. A
//! record that fails stops the sink: the reader discards (but still
//! checksums) the rest of the frame, a corrupted frame is reported as a CRC
//! mismatch, and an intact one with the record's error, as before.
//!
//! **Unverified bytes in guest memory.** The frame's CRC can only be
//! checked once all of it has arrived, so the pages of a corrupted or
//! malformed frame may already hold its unverified bytes (or have been
//! zeroed by its zero records) when the frame fails. That is acceptable
//! only because any such failure fails the migration, and the destination
//! of a failed migration never runs its guest: pages written here are
//! never used unless every frame checked out. (Post-copy's installer, which
//! serves faults of a running guest, keeps reading frames whole:
//! `destination::postcopy`.)

use super::memory::{outside, PageSink};
use crate::error::ErrorKind;
use crate::memory::PAGE_SIZE;
use crate::protocol::{check_record, MsgKind, PayloadSink, PAGE_RECORD_HEADER_LEN};

/// The progress of one `Pages` frame read into guest memory.
#[derive(Debug)]
pub(super) struct Streamed {
    /// The payload's length and the bytes of it seen so far.
    len: usize,
    pos: usize,
    /// The record header being read.
    hdr: [u8; PAGE_RECORD_HEADER_LEN],
    hdr_have: usize,
    /// The data record being read.
    data: Option<DataRun>,
    /// The first failure (the rest of the frame is discarded).
    error: Option<ErrorKind>,
}

/// A data record whose pages are being read: where they go and how much
/// of them has arrived.
#[derive(Debug, Clone, Copy)]
struct DataRun {
    region: usize,
    page: u64,
    gpa: u64,
    npages: u32,
    done: usize,
}

impl DataRun {
    fn bytes(&self) -> usize {
        // At most the frame's length (checked by `check_record`).
        (u64::from(self.npages) * PAGE_SIZE) as usize
    }
}

impl Streamed {
    /// The frame's outcome, once the reader returned it (its CRC and
    /// sequence number checked): the first failure, or a record header the
    /// payload cut short, fails it as it would fail a payload read whole.
    pub(super) fn finish(self) -> Result<(), ErrorKind> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.hdr_have > 0 {
            let at = self.pos - self.hdr_have;
            check_record(&self.hdr[..self.hdr_have], at, 0)?;
        }
        Ok(())
    }
}

impl PageSink<'_> {
    /// A complete record header: check it, place it, and apply it (zero
    /// records) or prepare to read its data.
    fn on_header(&mut self) {
        let Some(rx) = self.rx.as_mut() else {
            return;
        };
        rx.hdr_have = 0;
        let at = rx.pos - PAGE_RECORD_HEADER_LEN;
        let (h, data_len) = match check_record(&rx.hdr, at, rx.len - rx.pos) {
            Ok(r) => r,
            Err(e) => {
                rx.error = Some(e.into());
                return;
            }
        };
        let r = self.place(h.gpa, h.npages).and_then(|(region, page)| {
            if data_len.is_none() {
                return self
                    .apply_zero(region, page, h.gpa, h.npages)
                    .map(|()| None);
            }
            self.take_data(region, page, h.npages);
            Ok(Some(DataRun {
                region,
                page,
                gpa: h.gpa,
                npages: h.npages,
                done: 0,
            }))
        });
        if let Some(rx) = self.rx.as_mut() {
            match r {
                Ok(run) => rx.data = run,
                Err(e) => rx.error = Some(e),
            }
        }
    }
}

impl PayloadSink for PageSink<'_> {
    fn begin(&mut self, kind: MsgKind, len: usize) -> bool {
        if kind != MsgKind::Pages || !self.direct {
            return false;
        }
        self.rx = Some(Streamed {
            len,
            pos: 0,
            hdr: [0; PAGE_RECORD_HEADER_LEN],
            hdr_have: 0,
            data: None,
            error: None,
        });
        true
    }

    fn next_buf(&mut self, _left: usize) -> Option<&mut [u8]> {
        let ram = self.ram;
        let rx = self.rx.as_mut()?;
        if rx.error.is_some() {
            return None;
        }
        let Some(run) = rx.data else {
            return rx.hdr.get_mut(rx.hdr_have..);
        };
        // SAFETY: the destination's guest is not running, and nothing else
        // touches these pages while the reader fills them: they belong to
        // this connection alone (`place` checked the record against this
        // page stream, and the control connection takes pages directly only
        // when it is the one connection and the memory is not armed for
        // post-copy), and the slice lives only until the read returns.
        let pages = unsafe { ram.pages_mut(run.region, run.page, u64::from(run.npages)) };
        match pages {
            Some(p) => p.get_mut(run.done..),
            None => {
                rx.error = Some(outside(run.gpa, run.npages));
                None
            }
        }
    }

    fn advance(&mut self, n: usize) {
        let Some(rx) = self.rx.as_mut() else {
            return;
        };
        rx.pos += n;
        if let Some(run) = rx.data.as_mut() {
            run.done += n;
            if run.done >= run.bytes() {
                rx.data = None;
            }
            return;
        }
        rx.hdr_have += n;
        if rx.hdr_have == PAGE_RECORD_HEADER_LEN {
            self.on_header();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{self, Read};

    use proptest::prelude::*;

    use super::*;
    use crate::memory::{allocate, MemoryLayout, RegionDesc};
    use crate::protocol::{FrameReader, FrameWriter, RecordHeader};
    use crate::ram::HostRam;

    fn layout() -> MemoryLayout {
        MemoryLayout::new(vec![
            RegionDesc {
                guest_addr: 0,
                size: 16 * PAGE_SIZE,
            },
            RegionDesc {
                guest_addr: 0x100000,
                size: 32 * PAGE_SIZE,
            },
        ])
        .unwrap()
    }

    /// At most `max` bytes per read, a timeout every `every` calls (0 =
    /// never).
    struct Chunky {
        data: Vec<u8>,
        pos: usize,
        max: usize,
        every: u32,
        calls: u32,
    }

    impl Read for Chunky {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls.checked_rem(self.every) == Some(0) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.max).min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    /// Receives `stream` into fresh memory, `Pages` frames read straight
    /// into it (`direct`) or whole; returns each frame's outcome and the
    /// memory.
    fn receive(stream: &[u8], direct: bool, max: usize, every: u32) -> (Vec<String>, Vec<u8>) {
        let l = layout();
        let mem = allocate(&l).unwrap();
        let ram = HostRam::new(&mem, &l).unwrap();
        let mut sink = PageSink::new(&l, &ram, None, None);
        sink.direct = direct;
        let mut fr = FrameReader::new(Chunky {
            data: stream.to_vec(),
            pos: 0,
            max,
            every,
            calls: 0,
        });
        let mut out = Vec::new();
        loop {
            match fr.read_frame_into(&mut sink) {
                Ok(f) => {
                    let r = sink.complete(f.kind, f.payload);
                    out.push(format!("{r:?}"));
                    if r.is_err() {
                        break;
                    }
                }
                Err(e) if e.is_timeout() => {}
                Err(e) => {
                    out.push(e.to_string());
                    break;
                }
            }
        }
        let mut bytes = Vec::new();
        for r in 0..l.regions().len() {
            let pages = l.regions()[r].pages();
            let mut b = vec![0u8; (pages * PAGE_SIZE) as usize];
            assert!(ram.read_pages(r, 0, &mut b));
            bytes.extend(b);
        }
        (out, bytes)
    }

    /// A `Pages` payload: records (data when `fill` is not 0), and the
    /// offsets of their headers.
    fn payload(recs: &[(u64, u32, u8)]) -> (Vec<u8>, Vec<usize>) {
        let mut p = Vec::new();
        let mut headers = Vec::new();
        for &(gpa, npages, fill) in recs {
            let kind = if fill == 0 {
                RecordHeader::KIND_ZERO
            } else {
                RecordHeader::KIND_DATA
            };
            headers.push(p.len());
            p.extend(RecordHeader::new(gpa, npages, kind).encode());
            if fill != 0 {
                p.extend(vec![fill; npages as usize * PAGE_SIZE as usize]);
            }
        }
        (p, headers)
    }

    fn frames(payloads: &[Vec<u8>]) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new());
        for p in payloads {
            w.write_frame(MsgKind::Pages, &[p]).unwrap();
        }
        w.into_inner()
    }

    fn record() -> impl Strategy<Value = (u64, u32, u8)> {
        // Mostly inside the layout, sometimes across or outside it.
        let gpa = prop_oneof![
            (0u64..20).prop_map(|p| p * PAGE_SIZE),
            (0u64..36).prop_map(|p| 0x100000 + p * PAGE_SIZE),
        ];
        (gpa, 1u32..5, any::<u8>())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Read straight into memory or whole, in pieces and with timeouts:
        /// the same outcome frame by frame, and the same memory when every
        /// frame passed.
        #[test]
        fn direct_and_buffered_agree(
            payloads in prop::collection::vec(prop::collection::vec(record(), 0..6), 1..4),
            flip in prop::option::of((0u8..3, any::<prop::sample::Index>(), 0u8..8)),
            tail in prop::collection::vec(any::<u8>(), 0..20),
            cut in prop::option::of(any::<prop::sample::Index>()),
            max in 1usize..9000,
            every in 0u32..4,
        ) {
            let mut built: Vec<(Vec<u8>, Vec<usize>)> =
                payloads.iter().map(|r| payload(r)).collect();
            // Trailing bytes: a record header cut short, or more records.
            if let Some(last) = built.last_mut() {
                last.0.extend_from_slice(&tail);
            }
            let mut payloads: Vec<Vec<u8>> = built.iter().map(|b| b.0.clone()).collect();
            let mut stream = frames(&payloads);
            match flip {
                // A well-framed payload with a bad record header.
                Some((0, i, bit)) => {
                    let (last, headers) = built.last().unwrap();
                    if !headers.is_empty() {
                        let at = headers[i.index(headers.len())] + i.index(16);
                        let mut p = last.clone();
                        p[at] ^= 1 << bit;
                        *payloads.last_mut().unwrap() = p;
                        stream = frames(&payloads);
                    }
                }
                // A well-framed payload with any byte changed.
                Some((1, i, bit)) => {
                    let last = payloads.last_mut().unwrap();
                    if !last.is_empty() {
                        let at = i.index(last.len());
                        last[at] ^= 1 << bit;
                        stream = frames(&payloads);
                    }
                }
                // A corrupted frame.
                Some((_, i, bit)) => {
                    let at = i.index(stream.len());
                    stream[at] ^= 1 << bit;
                }
                None => {}
            }
            if let Some(c) = cut {
                stream.truncate(c.index(stream.len() + 1));
            }
            let every = if every == 1 { 2 } else { every };
            let (a, mem_a) = receive(&stream, false, usize::MAX, 0);
            let (b, mem_b) = receive(&stream, true, max, every);
            prop_assert_eq!(&a, &b);
            let clean = a.iter().take(a.len() - 1).all(|o| o == "Ok(())")
                && a.last().is_some_and(|e| e.contains("connection closed by the peer after 0 of 16"));
            if clean {
                prop_assert!(mem_a == mem_b, "memory differs");
            }
        }
    }

    #[test]
    fn bad_record_then_good_crc_and_next_frame() {
        // Frame 0: a good record, then one outside memory, then data that
        // is discarded; frame 1 is never read (the caller stops).
        let (p0, _) = payload(&[(0, 1, 7), (0x800000, 1, 9), (PAGE_SIZE, 1, 8)]);
        let stream = frames(&[p0]);
        let (out, mem) = receive(&stream, true, 100, 3);
        assert_eq!(out.len(), 1);
        assert!(out[0].contains("PagesOutsideMemory"), "{out:?}");
        // Applied before the bad record (as when read whole).
        assert!(mem[..PAGE_SIZE as usize].iter().all(|&b| b == 7));
        assert!(mem[PAGE_SIZE as usize..2 * PAGE_SIZE as usize]
            .iter()
            .all(|&b| b == 0));

        // The same frame corrupted in its discarded tail: a CRC mismatch.
        let mut bad = stream.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        let (out, _) = receive(&bad, true, 100, 3);
        assert!(
            out[0].starts_with("frame 0: crc mismatch (got 0x"),
            "{out:?}"
        );
    }
    /// The receive path alone, without a socket: `Pages` frames of 64
    /// pages (512 MiB of data) from memory into guest memory, read whole
    /// then copied (before issue 16) or read straight in, alternately, 10
    /// times each into memory already populated, then 3 times each into
    /// fresh memory; prints the rates. Not a check (no timing asserts):
    /// `cargo test --release -p livemig --lib -- --ignored receive_path_rate --nocapture`.
    #[test]
    #[ignore]
    fn receive_path_rate() {
        const PAGES: u64 = 128 * 1024;
        let l = MemoryLayout::new(vec![RegionDesc {
            guest_addr: 0,
            size: PAGES * PAGE_SIZE,
        }])
        .unwrap();
        let mut w = FrameWriter::new(Vec::new());
        let data: Vec<u8> = (0..64 * PAGE_SIZE as usize)
            .map(|i| (i * 7) as u8)
            .collect();
        for f in 0..PAGES / 64 {
            let mut p = RecordHeader::new(f * 64 * PAGE_SIZE, 64, RecordHeader::KIND_DATA)
                .encode()
                .to_vec();
            p.extend_from_slice(&data);
            w.write_frame(MsgKind::Pages, &[&p]).unwrap();
        }
        let stream = w.into_inner();
        let populated = allocate(&l).unwrap();
        for round in 0..27 {
            let direct = round % 2 == 0;
            let fresh = round >= 21;
            let new_mem = fresh.then(|| allocate(&l).unwrap());
            let mem = new_mem.as_ref().unwrap_or(&populated);
            let ram = HostRam::new(mem, &l).unwrap();
            let mut sink = PageSink::new(&l, &ram, None, None);
            sink.direct = direct;
            let mut fr = FrameReader::new(&stream[..]);
            let t = std::time::Instant::now();
            for _ in 0..PAGES / 64 {
                let f = fr.read_frame_into(&mut sink).unwrap();
                let (kind, payload) = (f.kind, f.payload);
                sink.complete(kind, payload).unwrap();
            }
            let s = t.elapsed().as_secs_f64();
            let what = if direct { "direct" } else { "whole+copy" };
            let first = if fresh || round == 0 {
                " (fresh memory)"
            } else {
                ""
            };
            println!(
                "{what}: {:.2} GB/s{first}",
                (PAGES * PAGE_SIZE) as f64 / s / 1e9
            );
        }
    }
}
