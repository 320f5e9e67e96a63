//! `PagesGather` payloads: pages sent straight from guest memory.
//!
//! A `Pages` frame's CRC covers its whole payload, page data included. A
//! sender that writes page data from guest memory while the guest runs
//! (no copy into a buffer first) cannot promise that: the guest may change
//! a page between the CRC and the kernel's copy. A `PagesGather` frame
//! therefore splits the two: the frame CRC covers the header and the
//! *metadata* (which pages, of which kind, and one CRC-32C per data page);
//! each data page is covered by its own CRC. A receiver can always trust
//! the metadata of a frame that passed its CRC, and tell exactly which
//! pages were torn by a guest write.
//!
//! | offset              | size          | field                                          |
//! |--------------------:|--------------:|------------------------------------------------|
//! | 0                   | 4             | `records`: number of record headers            |
//! | 4                   | 4             | `data_pages`: pages of data in the frame       |
//! | 8                   | 16 × records  | record headers ([`RecordHeader`], as in `Pages`) |
//! | 8 + 16 × records    | 4 × data_pages | CRC-32C of each data page, in record order    |
//! | [`meta_len`](gather_meta_len) | 4096 × data_pages | the data pages, in record order  |
//!
//! The frame CRC covers the frame header's bytes 0..12 and the payload's
//! first `8 + 16 × records + 4 × data_pages` bytes.

use super::codec::{put_u32, Cursor};
use super::pages::{check_record, PAGE_BYTES};
use super::{ProtocolError, RecordHeader, PAGE_RECORD_HEADER_LEN};

/// Bytes before the record headers of a `PagesGather` payload.
pub const GATHER_HEAD_LEN: usize = 8;
/// Bytes of one data page's CRC in a `PagesGather` payload.
const PAGE_CRC_LEN: usize = 4;

/// How many payload bytes the frame CRC of a `PagesGather` frame covers:
/// its metadata, as its first 8 bytes count it, or the whole payload where
/// those bytes are missing or count more than it holds (such a frame then
/// fails its CRC or, if it passes, [`gather_payload`]).
pub fn gather_meta_len(payload: &[u8]) -> usize {
    let n = |at: usize| {
        payload
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(|b: [u8; 4]| u32::from_le_bytes(b) as usize)
    };
    match (n(0), n(4)) {
        (Some(records), Some(data)) => meta_len(records, data)
            .filter(|m| *m <= payload.len())
            .unwrap_or(payload.len()),
        _ => payload.len(),
    }
}

/// The metadata length for `records` headers and `data` data pages, if it
/// does not overflow.
fn meta_len(records: usize, data: usize) -> Option<usize> {
    records
        .checked_mul(PAGE_RECORD_HEADER_LEN)?
        .checked_add(data.checked_mul(PAGE_CRC_LEN)?)?
        .checked_add(GATHER_HEAD_LEN)
}

/// The metadata of a `PagesGather` payload being built: record headers and
/// one CRC per data page. The page data is not here: the sender writes it
/// from guest memory, in the order the records were pushed.
///
/// ```
/// use livemig::protocol::{gather_payload, GatherMeta};
///
/// let page = vec![7u8; 4096];
/// let mut m = GatherMeta::default();
/// m.push_zero(0, 3)?;
/// m.push_data(0x8000, &page)?;
/// let [head, crcs] = m.parts();
/// let payload = [head, crcs, &page[..]].concat();
/// let g = gather_payload(&payload)?;
/// assert_eq!(g.records().len(), 2);
/// assert!(g.records()[1].data.unwrap().intact(0));
/// # Ok::<(), livemig::protocol::ProtocolError>(())
/// ```
#[derive(Debug, Clone)]
pub struct GatherMeta {
    /// The 8-byte head (filled in by [`GatherMeta::parts`]), then the
    /// record headers.
    head: Vec<u8>,
    crcs: Vec<u8>,
    records: u32,
    data_pages: u32,
    zero_pages: u64,
}

impl Default for GatherMeta {
    fn default() -> Self {
        GatherMeta {
            head: vec![0; GATHER_HEAD_LEN],
            crcs: Vec::new(),
            records: 0,
            data_pages: 0,
            zero_pages: 0,
        }
    }
}

impl GatherMeta {
    fn push_record(&mut self, h: RecordHeader) -> Result<(), ProtocolError> {
        let ok = h.npages > 0
            && h.gpa.is_multiple_of(PAGE_BYTES as u64)
            && h.gpa
                .checked_add(u64::from(h.npages) * PAGE_BYTES as u64)
                .is_some();
        if !ok {
            return Err(ProtocolError::Unencodable {
                msg: "PagesGather",
                reason: format!("bad page range 0x{:x}+{}", h.gpa, h.npages),
            });
        }
        self.head.extend_from_slice(&h.encode());
        self.records += 1;
        Ok(())
    }

    /// Adds a record of `npages` zero pages at `gpa`.
    pub fn push_zero(&mut self, gpa: u64, npages: u32) -> Result<(), ProtocolError> {
        self.push_record(RecordHeader::new(gpa, npages, RecordHeader::KIND_ZERO))?;
        self.zero_pages += u64::from(npages);
        Ok(())
    }

    /// Adds a record of the pages in `data` (whole pages) at `gpa`, with
    /// the CRC of each page as `data` reads now. The sender must then
    /// write `data`'s pages, in push order, after the metadata; where they
    /// changed in between, the receiver finds those pages torn.
    pub fn push_data(&mut self, gpa: u64, data: &[u8]) -> Result<(), ProtocolError> {
        let npages = data.len() / PAGE_BYTES;
        if !data.len().is_multiple_of(PAGE_BYTES) || npages > u32::MAX as usize {
            return Err(ProtocolError::Unencodable {
                msg: "PagesGather",
                reason: format!("{} bytes of data at 0x{gpa:x}", data.len()),
            });
        }
        self.push_record(RecordHeader::new(
            gpa,
            npages as u32,
            RecordHeader::KIND_DATA,
        ))?;
        for page in data.chunks_exact(PAGE_BYTES) {
            put_u32(&mut self.crcs, crc32c::crc32c(page));
        }
        self.data_pages += npages as u32;
        Ok(())
    }

    /// The metadata as two slices to send first (the frame CRC covers
    /// exactly these): the head with the record headers, and the page CRCs.
    pub fn parts(&mut self) -> [&[u8]; 2] {
        self.head[0..4].copy_from_slice(&self.records.to_le_bytes());
        self.head[4..8].copy_from_slice(&self.data_pages.to_le_bytes());
        [&self.head, &self.crcs]
    }

    /// Metadata bytes ([`gather_meta_len`] of the finished payload).
    pub fn len_bytes(&self) -> usize {
        self.head.len() + self.crcs.len()
    }

    /// Data pages pushed.
    pub fn data_pages(&self) -> u64 {
        u64::from(self.data_pages)
    }

    /// Zero pages pushed.
    pub fn zero_pages(&self) -> u64 {
        self.zero_pages
    }

    /// Whether no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Empties the metadata, keeping its buffers.
    pub fn clear(&mut self) {
        self.head.truncate(GATHER_HEAD_LEN);
        self.crcs.clear();
        self.records = 0;
        self.data_pages = 0;
        self.zero_pages = 0;
    }
}

/// A decoded `PagesGather` payload whose metadata is checked: see
/// [`gather_payload`].
#[derive(Debug, Clone)]
pub struct GatherPayload<'a> {
    records: Vec<GatherRecord<'a>>,
}

impl<'a> GatherPayload<'a> {
    /// The records, in order.
    pub fn records(&self) -> &[GatherRecord<'a>] {
        &self.records
    }
}

/// One record of a `PagesGather` payload: `npages` pages at `gpa`, zero
/// (`data == None`) or with their data and CRCs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatherRecord<'a> {
    /// Guest-physical address of the first page (page aligned).
    pub gpa: u64,
    /// Number of pages (at least 1).
    pub npages: u32,
    /// The pages' data, `None` for zero pages.
    pub data: Option<GatherData<'a>>,
}

/// The data of one record of a `PagesGather` payload, with its pages' CRCs
/// (which the frame CRC covered; the data is covered only by them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatherData<'a> {
    bytes: &'a [u8],
    crcs: &'a [u8],
}

impl<'a> GatherData<'a> {
    /// All the record's pages (`npages * PAGE_SIZE` bytes), unverified.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Page `i`'s bytes, unverified.
    pub fn page(&self, i: usize) -> &'a [u8] {
        self.bytes
            .get(i * PAGE_BYTES..(i + 1) * PAGE_BYTES)
            .unwrap_or_default()
    }

    /// Whether page `i` arrived as the sender checksummed it.
    pub fn intact(&self, i: usize) -> bool {
        let want = self
            .crcs
            .get(i * PAGE_CRC_LEN..(i + 1) * PAGE_CRC_LEN)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes);
        let page = self.page(i);
        !page.is_empty() && want == Some(crc32c::crc32c(page))
    }
}

/// Decodes a `PagesGather` payload (whose frame CRC, over the metadata,
/// passed): every record header is checked as in a `Pages` payload, and the
/// counts must match the records and the payload's length exactly. The
/// page data is not judged here: see [`GatherData::intact`].
pub fn gather_payload(payload: &[u8]) -> Result<GatherPayload<'_>, ProtocolError> {
    let mut c = Cursor::new("PagesGather", payload);
    let records = c.u32()? as usize;
    let data_pages = c.u32()? as usize;
    let meta = meta_len(records, data_pages).filter(|m| *m <= payload.len());
    let Some(meta) = meta else {
        let why = format!("{records} records and {data_pages} data pages do not fit the payload");
        return Err(c.malformed_at(0, why));
    };
    let data_len = payload.len() - meta;
    if data_pages.checked_mul(PAGE_BYTES) != Some(data_len) {
        let why = format!("{data_pages} data pages, {data_len} bytes of data");
        return Err(c.malformed_at(4, why));
    }
    let crc_at = GATHER_HEAD_LEN + records * PAGE_RECORD_HEADER_LEN;
    let (crcs, data) = (&payload[crc_at..meta], &payload[meta..]);
    let mut out = Vec::with_capacity(records);
    let mut used = 0usize; // data pages taken by the records so far
    for i in 0..records {
        let at = GATHER_HEAD_LEN + i * PAGE_RECORD_HEADER_LEN;
        let hdr = &payload[at..at + PAGE_RECORD_HEADER_LEN];
        let left = data_len - used * PAGE_BYTES;
        let (h, len) = check_record(hdr, at, left)?;
        let data = len.map(|len| {
            let n = len / PAGE_BYTES;
            let d = GatherData {
                bytes: &data[used * PAGE_BYTES..used * PAGE_BYTES + len],
                crcs: &crcs[used * PAGE_CRC_LEN..(used + n) * PAGE_CRC_LEN],
            };
            used += n;
            d
        });
        out.push(GatherRecord {
            gpa: h.gpa,
            npages: h.npages,
            data,
        });
    }
    if used != data_pages {
        let why = format!("records hold {used} data pages, {data_pages} counted");
        return Err(c.malformed_at(4, why));
    }
    Ok(GatherPayload { records: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_BYTES]
    }

    fn payload(m: &mut GatherMeta, data: &[u8]) -> Vec<u8> {
        let [h, c] = m.parts();
        [h, c, data].concat()
    }

    #[test]
    fn round_trip_and_torn_pages() {
        let mut m = GatherMeta::default();
        m.push_zero(0, 2).unwrap();
        let data = [page(1), page(2)].concat();
        m.push_data(0x5000, &data).unwrap();
        m.push_data(0x9000, &page(3)).unwrap();
        assert_eq!((m.zero_pages(), m.data_pages()), (2, 3));
        let all = [data.clone(), page(3)].concat();
        let mut p = payload(&mut m, &all);
        assert_eq!(gather_meta_len(&p), m.len_bytes());
        assert_eq!(m.len_bytes(), 8 + 3 * 16 + 3 * 4);
        let g = gather_payload(&p).unwrap();
        let r = g.records();
        assert_eq!((r[0].gpa, r[0].npages, r[0].data), (0, 2, None));
        let d = r[1].data.unwrap();
        assert_eq!((r[1].gpa, r[1].npages, d.bytes()), (0x5000, 2, &data[..]));
        assert!(d.intact(0) && d.intact(1));
        assert_eq!(r[2].data.unwrap().page(0), &page(3)[..]);
        // One byte of the second page changes: only that page is torn.
        let at = m.len_bytes() + PAGE_BYTES + 17;
        p[at] ^= 1;
        let g = gather_payload(&p).unwrap();
        let d = g.records()[1].data.unwrap();
        assert!(d.intact(0) && !d.intact(1));
        assert!(g.records()[2].data.unwrap().intact(0));
        m.clear();
        assert!(m.is_empty());
        assert_eq!(payload(&mut m, &[]), vec![0; 8]);
    }

    #[test]
    fn hostile_metadata_is_refused() {
        let mut m = GatherMeta::default();
        m.push_data(0x1000, &page(1)).unwrap();
        let good = payload(&mut m, &page(1));
        // Counts that do not match the records or the length.
        for (at, v) in [(0, 2u32), (4, 2), (4, 0), (0, u32::MAX), (4, u32::MAX)] {
            let mut p = good.clone();
            p[at..at + 4].copy_from_slice(&v.to_le_bytes());
            assert!(gather_payload(&p).is_err(), "{at} {v}");
            // The CRC then covers the whole payload or a wrong prefix.
            assert!(gather_meta_len(&p) <= p.len());
        }
        // A bad record header is reported at its offset.
        let mut p = good.clone();
        p[8] = 1; // gpa 0x1001
        let e = gather_payload(&p).unwrap_err().to_string();
        assert!(
            e.contains("offset 8") && e.contains("not page aligned"),
            "{e}"
        );
        // Truncated anywhere.
        for cut in 0..good.len() {
            assert!(gather_payload(&good[..cut]).is_err(), "cut {cut}");
        }
        assert_eq!(gather_meta_len(&good[..3]), 3);
        assert!(m.push_data(0, &[0; 10]).is_err());
        assert!(m.push_zero(1, 1).is_err());
        assert!(m.push_zero(0, 0).is_err());
    }

    /// The source's per-page work over 512 MiB (beyond any cache), 1 MiB
    /// frames, 5 times each, alternately: the copying path (copy into a
    /// frame buffer, one CRC over it) and the gather path (one CRC per page
    /// over guest memory; the kernel's copy comes after either); prints
    /// the rates. Not a check (no timing asserts): `cargo test --release
    /// -p livemig --lib -- --ignored gather_crc_rate --nocapture`.
    #[test]
    #[ignore]
    fn gather_crc_rate() {
        const PAGES: usize = 128 * 1024;
        const FRAME: usize = 256 * PAGE_BYTES;
        let mem: Vec<u8> = (0..PAGES * PAGE_BYTES)
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        let mut buf = vec![0u8; FRAME];
        for round in 0..10 {
            let t = std::time::Instant::now();
            let mut x = 0u32;
            let what = if round % 2 == 0 {
                for chunk in mem.chunks(FRAME) {
                    buf.copy_from_slice(chunk);
                    x ^= crc32c::crc32c(&buf);
                }
                "copy + one CRC per frame"
            } else {
                for page in mem.chunks(PAGE_BYTES) {
                    x ^= crc32c::crc32c(page);
                }
                "one CRC per page, no copy"
            };
            let gbs = mem.len() as f64 / t.elapsed().as_secs_f64() / 1e9;
            println!("{what}: {gbs:.2} GB/s ({x})");
        }
        // The same, memory in cache: per-page calls against one call.
        let hot = &mem[..FRAME];
        for round in 0..6 {
            let t = std::time::Instant::now();
            let mut x = 0u32;
            for _ in 0..512 {
                if round % 2 == 0 {
                    x ^= crc32c::crc32c(hot);
                } else {
                    for page in hot.chunks(PAGE_BYTES) {
                        x ^= crc32c::crc32c(page);
                    }
                }
            }
            let gbs = (512 * FRAME) as f64 / t.elapsed().as_secs_f64() / 1e9;
            let what = if round % 2 == 0 {
                "in cache, one CRC per frame"
            } else {
                "in cache, one CRC per page"
            };
            println!("{what}: {gbs:.2} GB/s ({x})");
        }
    }
}
