//! `Pages` payloads: the page-record layout, [`PageBatch`] (encoding),
//! [`page_records`] (decoding), LZ4 compression, and which stream carries a
//! page ([`stream_of`]).

use super::codec::Cursor;
use super::{ProtocolError, MAX_FRAME_PAYLOAD};
use crate::memory::{MemoryLayout, PAGE_SIZE};

/// Size of a page record header in a `Pages` payload.
pub const PAGE_RECORD_HEADER_LEN: usize = 16;

/// The header of one record in a `Pages` payload, little-endian; `npages`
/// pages of data follow it when `kind` is [`RecordHeader::KIND_DATA`].
/// This type is the only code that knows the record header's byte layout:
/// [`PageBatch`] writes it and [`page_records`] reads it through this type.
///
/// | offset | size | field                                          |
/// |-------:|-----:|------------------------------------------------|
/// | 0      | 8    | `gpa`: guest-physical address, page aligned    |
/// | 8      | 4    | `npages`: number of pages, at least 1          |
/// | 12     | 1    | `kind`: 0 = zero pages, 1 = data follows       |
/// | 13     | 3    | reserved, 0                                    |
///
/// ```
/// use livemig::protocol::RecordHeader;
///
/// let h = RecordHeader::new(0x1000, 2, RecordHeader::KIND_DATA);
/// assert_eq!(h.encode(), [0, 0x10, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0]);
/// assert_eq!(RecordHeader::decode(&h.encode())?, h);
/// # Ok::<(), livemig::protocol::ProtocolError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// Number of pages.
    pub npages: u32,
    /// [`RecordHeader::KIND_ZERO`] or [`RecordHeader::KIND_DATA`] in a valid
    /// record.
    pub kind: u8,
    /// Reserved, zero in a valid record.
    pub reserved: [u8; 3],
}

impl RecordHeader {
    /// `kind` of a record of zero pages (no data follows).
    pub const KIND_ZERO: u8 = 0;
    /// `kind` of a record whose `npages * PAGE_SIZE` bytes of data follow.
    pub const KIND_DATA: u8 = 1;

    /// A header with the reserved bytes zero.
    pub fn new(gpa: u64, npages: u32, kind: u8) -> Self {
        RecordHeader {
            gpa,
            npages,
            kind,
            reserved: [0; 3],
        }
    }

    /// The header's wire bytes.
    pub fn encode(&self) -> [u8; PAGE_RECORD_HEADER_LEN] {
        let mut b = [0u8; PAGE_RECORD_HEADER_LEN];
        b[0..8].copy_from_slice(&self.gpa.to_le_bytes());
        b[8..12].copy_from_slice(&self.npages.to_le_bytes());
        b[12] = self.kind;
        b[13..16].copy_from_slice(&self.reserved);
        b
    }

    /// The fields of the header at the start of `bytes`, unchecked (what
    /// makes a valid record is checked by [`page_records`]); fails only if
    /// `bytes` is shorter than a header.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        RecordHeader::read(&mut Cursor::new("Pages record", bytes))
    }

    /// Reads the fields in wire order, so that a truncated header is
    /// reported at the field it cuts.
    fn read(c: &mut Cursor<'_>) -> Result<Self, ProtocolError> {
        Ok(RecordHeader {
            gpa: c.u64()?,
            npages: c.u32()?,
            kind: c.u8()?,
            reserved: c.array()?,
        })
    }

    /// The address just past the record's pages, if it does not overflow.
    fn end(&self) -> Option<u64> {
        self.gpa.checked_add(u64::from(self.npages) * PAGE_SIZE)
    }

    /// This header extended by `next`, if `next` is of the same kind,
    /// starts where this one ends, and the page count still fits.
    fn merged(&self, next: &RecordHeader) -> Option<RecordHeader> {
        if self.kind != next.kind || self.end() != Some(next.gpa) {
            return None;
        }
        Some(RecordHeader {
            npages: self.npages.checked_add(next.npages)?,
            ..*self
        })
    }
}

pub(super) const PAGE_BYTES: usize = PAGE_SIZE as usize;

/// Whether `addr` is a multiple of [`PAGE_SIZE`] (a power of two).
fn page_aligned(addr: u64) -> bool {
    addr & (PAGE_SIZE - 1) == 0
}

/// The page stream (`0 .. streams`) that carries page `page` of region
/// `region` when a migration uses `streams` page streams.
///
/// Memory is cut into chunks of [`STREAM_CHUNK_PAGES`] pages, numbered
/// across the regions in layout order; chunk `n` travels on stream
/// `n % streams`. A page therefore always travels on the same stream, so
/// its newer copies (later rounds) can never overtake older ones.
pub fn stream_of(layout: &MemoryLayout, region: usize, page: u64, streams: u32) -> u32 {
    if streams <= 1 {
        return 0;
    }
    let before: u64 = layout
        .regions()
        .iter()
        .take(region)
        .map(|r| r.pages().div_ceil(STREAM_CHUNK_PAGES))
        .sum();
    ((before + page / STREAM_CHUNK_PAGES) % u64::from(streams)) as u32
}

/// Compresses a `Pages` payload into `out` (cleared first) as a
/// [`MsgKind::PagesLz4`](super::MsgKind::PagesLz4) payload.
pub fn compress_pages(pages: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let n = compress_pages_into(pages, out);
    out.truncate(n);
}

/// Compresses a `Pages` payload into `out` as a
/// [`MsgKind::PagesLz4`](super::MsgKind::PagesLz4) payload and returns its
/// length: the payload is `out[..n]`, what follows is left over. `out`
/// only grows (zero-filled as it does, to the largest output a payload of
/// this size may need); a buffer reused frame after frame is not cleared
/// and zero-filled again for every frame, as [`compress_pages`] does.
pub fn compress_pages_into(pages: &[u8], out: &mut Vec<u8>) -> usize {
    const LEN: usize = 4;
    let need = LEN + lz4_flex::block::get_maximum_output_size(pages.len());
    if out.len() < need {
        out.resize(need, 0);
    }
    out[..LEN].copy_from_slice(&(pages.len() as u32).to_le_bytes());
    match lz4_flex::block::compress_into(pages, &mut out[LEN..need]) {
        Ok(n) => LEN + n,
        // Cannot happen with a buffer of the maximum size; send it raw-sized
        // garbage-free anyway: an empty block decodes to a length mismatch.
        Err(_) => LEN,
    }
}

/// Decompresses a [`MsgKind::PagesLz4`](super::MsgKind::PagesLz4) payload into `out` (cleared first);
/// the claimed size is checked against [`MAX_FRAME_PAYLOAD`] before anything
/// is allocated, and the block must decode to exactly that size.
pub fn decompress_pages(payload: &[u8], out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let mut c = Cursor::new("PagesLz4", payload);
    let at = c.pos;
    let len = c.u32()? as usize;
    if len > MAX_FRAME_PAYLOAD {
        return Err(c.malformed_at(
            at,
            format!("uncompressed size {len} exceeds {MAX_FRAME_PAYLOAD}"),
        ));
    }
    let block = &payload[4..];
    out.clear();
    out.resize(len, 0);
    match lz4_flex::block::decompress_into(block, out) {
        Ok(n) if n == len => Ok(()),
        Ok(n) => Err(c.malformed_at(4, format!("block decodes to {n} bytes, {len} claimed"))),
        Err(e) => Err(c.malformed_at(4, format!("bad LZ4 block: {e}"))),
    }
}

/// Pages per chunk for [`stream_of`].
pub const STREAM_CHUNK_PAGES: u64 = 1024;

/// One record of a `Pages` payload: `npages` pages at `gpa`, either all zero
/// (`data == None`) or with their contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRecord<'a> {
    /// Guest-physical address of the first page (page aligned).
    pub gpa: u64,
    /// Number of pages (at least 1).
    pub npages: u32,
    /// `npages * PAGE_SIZE` bytes of page data, or `None` for zero pages.
    pub data: Option<&'a [u8]>,
}

impl PageRecord<'_> {
    /// Length of the record's range in bytes.
    pub fn len_bytes(&self) -> u64 {
        u64::from(self.npages) * PAGE_SIZE
    }

    /// Checks that the record lies inside one region of `layout`; returns
    /// the region index and the first page's index within that region.
    pub fn check(&self, layout: &MemoryLayout) -> Result<(usize, u64), ProtocolError> {
        layout
            .locate(self.gpa, u64::from(self.npages))
            .ok_or(ProtocolError::PagesOutsideMemory {
                gpa: self.gpa,
                npages: self.npages,
            })
    }
}

/// Iterates over the records of a `Pages` payload without copying; see
/// [`page_records`]. Stops after the first error.
#[derive(Debug, Clone)]
pub struct PageRecords<'a> {
    payload: &'a [u8],
    pos: usize,
    failed: bool,
}

/// Decodes a `Pages` payload record by record, without copying page data.
///
/// Each record is checked for a page-aligned `gpa`, `npages >= 1`, a known
/// kind, zero reserved bytes, no address overflow, and data that fits in the
/// payload. Whether the pages lie in guest memory is checked by
/// [`PageRecord::check`].
pub fn page_records(payload: &[u8]) -> PageRecords<'_> {
    PageRecords {
        payload,
        pos: 0,
        failed: false,
    }
}

impl<'a> PageRecords<'a> {
    fn next_record(&mut self) -> Result<PageRecord<'a>, ProtocolError> {
        let at = self.pos;
        let hdr_end = at
            .saturating_add(PAGE_RECORD_HEADER_LEN)
            .min(self.payload.len());
        let hdr = self.payload.get(at..hdr_end).unwrap_or_default();
        let left = self.payload.len() - hdr_end;
        let (h, data_len) = check_record(hdr, at, left)?;
        let data = data_len.map(|n| &self.payload[hdr_end..hdr_end + n]);
        self.pos = hdr_end + data_len.unwrap_or(0);
        Ok(PageRecord {
            gpa: h.gpa,
            npages: h.npages,
            data,
        })
    }
}

/// Checks one record header of a `Pages` payload, as [`page_records`]
/// does: `hdr` holds the header's bytes (fewer than
/// [`PAGE_RECORD_HEADER_LEN`] only where the payload ends inside the
/// header), `at` is its offset in the payload, `left` the payload bytes
/// after it. Returns the header and, for a data record, the length of its
/// data (which fits in `left`). Errors name offsets in the whole payload,
/// so that a payload checked record by record as it arrives
/// (`destination::memory`) fails exactly like one checked in one piece.
pub(crate) fn check_record(
    hdr: &[u8],
    at: usize,
    left: usize,
) -> Result<(RecordHeader, Option<usize>), ProtocolError> {
    check_record_at0(hdr, left).map_err(|e| shift(e, at))
}

/// [`check_record`] for a header at offset 0.
fn check_record_at0(
    hdr: &[u8],
    left: usize,
) -> Result<(RecordHeader, Option<usize>), ProtocolError> {
    let mut c = Cursor::new("Pages record", hdr);
    let h = RecordHeader::read(&mut c)?;
    let RecordHeader {
        gpa,
        npages,
        kind,
        reserved,
    } = h;
    if reserved != [0; 3] {
        return Err(c.malformed_at(0, format!("reserved bytes {reserved:02x?} are not zero")));
    }
    if !page_aligned(gpa) {
        return Err(c.malformed_at(0, format!("address 0x{gpa:x} is not page aligned")));
    }
    if npages == 0 {
        return Err(c.malformed_at(0, "zero pages"));
    }
    let len = u64::from(npages) * PAGE_SIZE;
    if gpa.checked_add(len).is_none() {
        return Err(c.malformed_at(
            0,
            format!("pages 0x{gpa:x}+{npages} wrap around the address space"),
        ));
    }
    match kind {
        RecordHeader::KIND_ZERO => Ok((h, None)),
        RecordHeader::KIND_DATA => {
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > left {
                return Err(c.malformed_at(
                    0,
                    format!(
                        "data runs past end of frame ({npages} pages need {len} bytes, {left} left)"
                    ),
                ));
            }
            Ok((h, Some(len)))
        }
        k => Err(c.malformed_at(0, format!("unknown record kind {k}"))),
    }
}

/// `e` with its payload offset moved on by `at`.
fn shift(e: ProtocolError, at: usize) -> ProtocolError {
    match e {
        ProtocolError::Malformed {
            msg,
            offset,
            reason,
        } => ProtocolError::Malformed {
            msg,
            offset: offset + at,
            reason,
        },
        ProtocolError::Truncated {
            msg,
            offset,
            wanted,
            left,
        } => ProtocolError::Truncated {
            msg,
            offset: offset + at,
            wanted,
            left,
        },
        e => e,
    }
}

impl<'a> Iterator for PageRecords<'a> {
    type Item = Result<PageRecord<'a>, ProtocolError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.payload.len() {
            return None;
        }
        let r = self.next_record();
        if r.is_err() {
            self.failed = true;
        }
        Some(r)
    }
}

impl std::iter::FusedIterator for PageRecords<'_> {}

/// Builds a `Pages` payload. Adjacent pushes of the same kind with
/// contiguous addresses are merged into one record.
///
/// ```
/// use livemig::protocol::{page_records, PageBatch};
/// use livemig::memory::PAGE_SIZE;
///
/// let mut batch = PageBatch::with_capacity(1 << 20);
/// batch.push_zero(0, 4)?;
/// batch.push_data_with(0x10000, 1, |dst| {
///     dst.fill(0xaa); // copy the guest page here
///     Ok::<(), livemig::protocol::ProtocolError>(())
/// })?;
/// assert_eq!((batch.zero_pages(), batch.data_pages()), (4, 1));
/// let recs: Vec<_> = page_records(batch.as_bytes()).collect::<Result<_, _>>()?;
/// assert_eq!(recs.len(), 2);
/// # Ok::<(), livemig::protocol::ProtocolError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct PageBatch {
    /// The payload is `buf[..used]`; the bytes after it are left from
    /// earlier payloads (kept so that the next one's page data need not be
    /// zeroed before it is copied in: see [`PageBatch::push_data_over`]).
    buf: Vec<u8>,
    used: usize,
    data_pages: u64,
    zero_pages: u64,
    /// Offset of the last record header and the header as written there
    /// (for merging).
    last: Option<(usize, RecordHeader)>,
}

impl PageBatch {
    /// An empty batch with room for `bytes` bytes of payload.
    pub fn with_capacity(bytes: usize) -> Self {
        PageBatch {
            buf: Vec::with_capacity(bytes),
            ..Default::default()
        }
    }

    /// Payload bytes a record of `npages` data pages adds at most.
    pub const fn data_record_len(npages: u32) -> usize {
        PAGE_RECORD_HEADER_LEN + npages as usize * PAGE_BYTES
    }

    fn check_range(gpa: u64, npages: u32) -> Result<(), ProtocolError> {
        let ok = npages > 0
            && page_aligned(gpa)
            && gpa.checked_add(u64::from(npages) * PAGE_SIZE).is_some();
        if !ok {
            return Err(ProtocolError::Unencodable {
                msg: "Pages",
                reason: format!("bad page range 0x{gpa:x}+{npages}"),
            });
        }
        Ok(())
    }

    /// Ends the current record: the next push starts a new one even if its
    /// pages follow on. A sender calls it where a memory region ends, since
    /// a record must lie inside one region (two regions may touch).
    pub fn end_record(&mut self) {
        self.last = None;
    }

    /// Appends a record (or extends the last one); returns the offset where
    /// page data for it must go.
    fn push_record(&mut self, gpa: u64, npages: u32, kind: u8) -> usize {
        let new = RecordHeader::new(gpa, npages, kind);
        if let Some((off, last)) = self.last {
            if let Some(merged) = last.merged(&new) {
                self.rewrite_header(off, merged);
                self.last = Some((off, merged));
                return self.used;
            }
        }
        let off = self.grow(PAGE_RECORD_HEADER_LEN);
        self.last = Some((off, new));
        self.rewrite_header(off, new);
        self.used
    }

    /// Makes the payload `n` bytes longer; returns where the new bytes
    /// begin. They hold whatever an earlier payload left there (zero where
    /// the buffer grows): the caller overwrites them.
    fn grow(&mut self, n: usize) -> usize {
        let start = self.used;
        self.used += n;
        if self.buf.len() < self.used {
            self.buf.resize(self.used, 0);
        }
        start
    }

    /// Overwrites the record header at `off` (one this batch wrote).
    fn rewrite_header(&mut self, off: usize, header: RecordHeader) {
        if let Some(dst) = self.buf.get_mut(off..off + PAGE_RECORD_HEADER_LEN) {
            dst.copy_from_slice(&header.encode());
        }
    }

    /// Adds `npages` zero pages at `gpa` (no page data is sent).
    pub fn push_zero(&mut self, gpa: u64, npages: u32) -> Result<(), ProtocolError> {
        Self::check_range(gpa, npages)?;
        self.push_record(gpa, npages, RecordHeader::KIND_ZERO);
        self.zero_pages += u64::from(npages);
        Ok(())
    }

    /// Adds `npages` pages at `gpa`: reserves `npages * PAGE_SIZE` bytes in
    /// the batch, zeroed, and lets `fill` copy the page contents into them
    /// directly. If `fill` fails the batch is left as it was before the
    /// call.
    pub fn push_data_with<E, F>(&mut self, gpa: u64, npages: u32, fill: F) -> Result<(), E>
    where
        E: From<ProtocolError>,
        F: FnOnce(&mut [u8]) -> Result<(), E>,
    {
        self.push_data_over(gpa, npages, |dst: &mut [u8]| {
            dst.fill(0);
            fill(dst)
        })
    }

    /// [`PageBatch::push_data_with`] without zeroing the reserved bytes
    /// first: `fill` gets them as an earlier payload of this batch left
    /// them and must overwrite every one (a sender copying whole guest
    /// pages does). Zeroing them cost the source about a tenth of its CPU
    /// time in round 0 (a profile of `cargo bench --bench engine`,
    /// 2026-12-03).
    pub(crate) fn push_data_over<E, F>(&mut self, gpa: u64, npages: u32, fill: F) -> Result<(), E>
    where
        E: From<ProtocolError>,
        F: FnOnce(&mut [u8]) -> Result<(), E>,
    {
        Self::check_range(gpa, npages)?;
        let saved_len = self.used;
        let saved_last = self.last;
        self.push_record(gpa, npages, RecordHeader::KIND_DATA);
        let len = npages as usize * PAGE_BYTES;
        let start = self.grow(len);
        match fill(&mut self.buf[start..start + len]) {
            Ok(()) => {
                self.data_pages += u64::from(npages);
                Ok(())
            }
            Err(e) => {
                self.used = saved_len;
                self.last = saved_last;
                if let Some((off, header)) = saved_last {
                    // A merge may have grown it.
                    self.rewrite_header(off, header);
                }
                Err(e)
            }
        }
    }

    /// Adds `npages` pages at `gpa` copied from `data` (`npages * PAGE_SIZE`
    /// bytes).
    pub fn push_data(&mut self, gpa: u64, npages: u32, data: &[u8]) -> Result<(), ProtocolError> {
        if data.len() as u64 != u64::from(npages) * PAGE_SIZE {
            return Err(ProtocolError::Unencodable {
                msg: "Pages",
                reason: format!(
                    "{} bytes of data for {npages} pages at 0x{gpa:x}",
                    data.len()
                ),
            });
        }
        self.push_data_with(gpa, npages, |dst: &mut [u8]| {
            dst.copy_from_slice(data);
            Ok(())
        })
    }

    /// Payload length in bytes.
    pub fn len_bytes(&self) -> usize {
        self.used
    }

    /// Whether no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// Empties the batch, keeping its buffer.
    pub fn clear(&mut self) {
        self.used = 0;
        self.data_pages = 0;
        self.zero_pages = 0;
        self.last = None;
    }

    /// The encoded payload, to send with
    /// `writer.write_frame(MsgKind::Pages, &[batch.as_bytes()])`.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.used).unwrap_or_default()
    }

    /// Pages with data in the batch.
    pub fn data_pages(&self) -> u64 {
        self.data_pages
    }

    /// Zero pages in the batch.
    pub fn zero_pages(&self) -> u64 {
        self.zero_pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::test_support::layout;

    #[test]
    fn lz4_pages_round_trip_and_hostile_blocks() {
        let mut raw = Vec::new();
        for i in 0..20_000u32 {
            raw.extend_from_slice(&(i / 7).to_le_bytes());
        }
        let mut z = Vec::new();
        compress_pages(&raw, &mut z);
        assert!(z.len() < raw.len() / 2, "{} of {}", z.len(), raw.len());
        // Into a buffer left over from a larger, different payload: the
        // same bytes, whatever follows them.
        let mut reused = vec![0xa5; 4 * raw.len()];
        let n = compress_pages_into(&raw, &mut reused);
        assert_eq!(reused[..n], z[..]);
        assert_eq!(reused.len(), 4 * raw.len(), "a large enough buffer is kept");
        let mut back = Vec::new();
        decompress_pages(&z, &mut back).unwrap();
        assert_eq!(back, raw);
        // A size claim over the frame limit is refused before allocating.
        let mut big = z.clone();
        big[..4].copy_from_slice(&(MAX_FRAME_PAYLOAD as u32 + 1).to_le_bytes());
        let e = decompress_pages(&big, &mut back).unwrap_err().to_string();
        assert!(e.contains("exceeds"), "{e}");
        // A claim that does not match the block, a damaged block, truncation.
        let mut lie = z.clone();
        lie[..4].copy_from_slice(&(raw.len() as u32 - 1).to_le_bytes());
        assert!(decompress_pages(&lie, &mut back).is_err());
        let mut bad = z.clone();
        let n = bad.len();
        bad[n / 2] ^= 0xff;
        bad[n - 1] ^= 0xff;
        let _ = decompress_pages(&bad, &mut back); // must not panic
        for cut in [0, 3, 4, 5, z.len() / 2, z.len() - 1] {
            assert!(decompress_pages(&z[..cut], &mut back).is_err(), "cut {cut}");
        }
    }

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_BYTES]
    }

    #[test]
    fn page_batch_round_trip_and_merging() {
        let mut b = PageBatch::with_capacity(1 << 20);
        assert!(b.is_empty());
        b.push_zero(0, 2).unwrap();
        b.push_zero(0x2000, 3).unwrap(); // merged
        b.push_data(0x5000, 1, &page(1)).unwrap();
        b.push_data_with(0x6000, 2, |dst: &mut [u8]| {
            assert_eq!(dst.len(), 2 * PAGE_BYTES);
            dst[..PAGE_BYTES].fill(2);
            dst[PAGE_BYTES..].fill(3);
            Ok::<(), ProtocolError>(())
        })
        .unwrap(); // merged with the previous data record
        b.push_data(0x100000, 1, &page(4)).unwrap(); // not contiguous
        b.push_zero(0x101000, 1).unwrap(); // other kind
        assert_eq!(b.zero_pages(), 6);
        assert_eq!(b.data_pages(), 4);
        assert_eq!(b.len_bytes(), 4 * PAGE_RECORD_HEADER_LEN + 4 * PAGE_BYTES);

        let recs: Vec<_> = page_records(b.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(recs.len(), 4);
        assert_eq!((recs[0].gpa, recs[0].npages, recs[0].data), (0, 5, None));
        assert_eq!((recs[1].gpa, recs[1].npages), (0x5000, 3));
        let d = recs[1].data.unwrap();
        assert_eq!(d.len(), 3 * PAGE_BYTES);
        assert!(d[..PAGE_BYTES].iter().all(|&x| x == 1));
        assert!(d[PAGE_BYTES..2 * PAGE_BYTES].iter().all(|&x| x == 2));
        assert!(d[2 * PAGE_BYTES..].iter().all(|&x| x == 3));
        assert_eq!(recs[2].data.unwrap(), &page(4)[..]);
        assert_eq!(
            (recs[3].gpa, recs[3].npages, recs[3].data),
            (0x101000, 1, None)
        );

        let l = layout();
        assert_eq!(recs[0].check(&l).unwrap(), (0, 0));
        assert_eq!(recs[2].check(&l).unwrap(), (1, 0));
        let out = PageRecord {
            gpa: 0x9f000,
            npages: 2,
            data: None,
        };
        assert_eq!(
            out.check(&l).unwrap_err().to_string(),
            "pages 0x9f000+2 outside guest memory"
        );

        // A failing fill leaves the batch untouched (also a merge candidate).
        let before = b.as_bytes().to_vec();
        let r: Result<(), ProtocolError> = b.push_data_with(0x102000, 1, |_| {
            Err(ProtocolError::Unencodable {
                msg: "test",
                reason: "boom".into(),
            })
        });
        assert!(r.is_err());
        let r: Result<(), ProtocolError> = b.push_data_with(0x101000, 1, |_| {
            Err(ProtocolError::Unencodable {
                msg: "test",
                reason: "boom".into(),
            })
        });
        assert!(r.is_err());
        assert_eq!(b.as_bytes(), &before[..]);
        assert_eq!(b.data_pages(), 4);

        // Bad pushes.
        assert!(b.push_zero(1, 1).is_err());
        assert!(b.push_zero(0, 0).is_err());
        assert!(b.push_zero(u64::MAX - 4095, 2).is_err());
        assert!(b.push_data(0, 1, &[0; 10]).is_err());

        b.clear();
        assert!(b.is_empty());
        assert_eq!((b.data_pages(), b.zero_pages()), (0, 0));
        assert_eq!(page_records(b.as_bytes()).count(), 0);
    }

    /// A batch reused after `clear` holds the old payload's bytes past its
    /// end: `as_bytes` never shows them, a failed fill gives the room back,
    /// and `push_data_with` still hands its closure zeroed bytes.
    #[test]
    fn a_reused_batch_shows_only_its_payload() {
        let mut b = PageBatch::with_capacity(0);
        b.push_data(0, 2, &[page(0xaa), page(0xbb)].concat())
            .unwrap();
        b.clear();
        b.push_data_over(0x8000, 1, |dst: &mut [u8]| {
            assert!(dst.iter().all(|&x| x == 0xaa), "old bytes are left there");
            dst.fill(0x55);
            Ok::<(), ProtocolError>(())
        })
        .unwrap();
        let r: Result<(), ProtocolError> = b.push_data_over(0x20000, 1, |dst| {
            dst[0] = 1;
            Err(ProtocolError::Unencodable {
                msg: "test",
                reason: "boom".into(),
            })
        });
        assert!(r.is_err());
        assert_eq!(b.len_bytes(), PAGE_RECORD_HEADER_LEN + PAGE_BYTES);
        b.push_data_with(0x30000, 1, |dst: &mut [u8]| {
            assert!(dst.iter().all(|&x| x == 0), "push_data_with zeroes");
            dst[7] = 9;
            Ok::<(), ProtocolError>(())
        })
        .unwrap();
        b.push_zero(0x40000, 1).unwrap();
        let recs: Vec<_> = page_records(b.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!((recs[0].gpa, recs[0].data), (0x8000, Some(&page(0x55)[..])));
        let mut want = page(0);
        want[7] = 9;
        assert_eq!((recs[1].gpa, recs[1].data), (0x30000, Some(&want[..])));
        assert_eq!((recs[2].gpa, recs[2].data), (0x40000, None));
        assert_eq!(
            b.len_bytes(),
            3 * PAGE_RECORD_HEADER_LEN + 2 * PAGE_BYTES,
            "nothing past the payload"
        );
    }

    /// The rate of building `Pages` payloads of 256 pages (1 MiB) from
    /// 512 MiB of memory, the reserved bytes zeroed first
    /// (`push_data_with`, before 2026-12-03) or not (`push_data_over`),
    /// alternately, 5 times each; prints the rates. Not a check (no timing
    /// asserts): `cargo test --release -p livemig --lib -- --ignored
    /// batch_build_rate --nocapture`.
    #[test]
    #[ignore]
    fn batch_build_rate() {
        const PAGES: usize = 128 * 1024;
        const BATCH: usize = 256;
        let mem: Vec<u8> = (0..PAGES * PAGE_BYTES).map(|i| (i * 7) as u8).collect();
        let mut b = PageBatch::with_capacity(BATCH * PAGE_BYTES + 4096);
        for round in 0..10 {
            let zeroed = round % 2 == 0;
            let t = std::time::Instant::now();
            let mut crc = 0;
            for (i, chunk) in mem.chunks(BATCH * PAGE_BYTES).enumerate() {
                let gpa = (i * BATCH * PAGE_BYTES) as u64;
                let copy = |dst: &mut [u8]| {
                    dst.copy_from_slice(chunk);
                    Ok::<(), ProtocolError>(())
                };
                if zeroed {
                    b.push_data_with(gpa, BATCH as u32, copy).unwrap();
                } else {
                    b.push_data_over(gpa, BATCH as u32, copy).unwrap();
                }
                crc ^= b.as_bytes()[PAGE_RECORD_HEADER_LEN];
                b.clear();
            }
            let s = t.elapsed().as_secs_f64();
            let what = if zeroed { "zeroed first" } else { "not zeroed" };
            let gbs = mem.len() as f64 / s / 1e9;
            println!("{what}: {gbs:.2} GB/s ({crc})");
        }
    }

    fn rec(gpa: u64, npages: u32, kind: u8, reserved: [u8; 3]) -> Vec<u8> {
        let mut v = gpa.to_le_bytes().to_vec();
        v.extend_from_slice(&npages.to_le_bytes());
        v.push(kind);
        v.extend_from_slice(&reserved);
        v
    }

    #[test]
    fn record_header_owns_the_layout() {
        // The test's own encoding (rec) and the type agree, both ways.
        let h = RecordHeader::new(0x1234_5000, 7, RecordHeader::KIND_DATA);
        assert_eq!(h.encode().to_vec(), rec(0x1234_5000, 7, 1, [0; 3]));
        let odd = rec(u64::MAX, u32::MAX, 9, [1, 2, 3]);
        let got = RecordHeader::decode(&odd).unwrap();
        assert_eq!(
            got,
            RecordHeader {
                gpa: u64::MAX,
                npages: u32::MAX,
                kind: 9,
                reserved: [1, 2, 3]
            }
        );
        assert_eq!(got.encode().to_vec(), odd);
        // A short header is cut at the field it ends in.
        let e = RecordHeader::decode(&odd[..10]).unwrap_err().to_string();
        assert_eq!(
            e,
            "Pages record: truncated at offset 8 (needs 4 more bytes, 2 left)"
        );
        // What a PageBatch writes, including a merged record's count.
        let mut b = PageBatch::default();
        b.push_zero(0x2000, 1).unwrap();
        b.push_zero(0x3000, 2).unwrap();
        b.push_data(0x8000, 1, &page(5)).unwrap();
        let want = [
            RecordHeader::new(0x2000, 3, RecordHeader::KIND_ZERO)
                .encode()
                .to_vec(),
            RecordHeader::new(0x8000, 1, RecordHeader::KIND_DATA)
                .encode()
                .to_vec(),
            page(5),
        ]
        .concat();
        assert_eq!(b.as_bytes(), &want[..]);
    }

    fn first_err(payload: &[u8]) -> String {
        let mut it = page_records(payload);
        loop {
            match it.next() {
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    assert!(it.next().is_none(), "iterator continues after an error");
                    return e.to_string();
                }
                None => panic!("no error"),
            }
        }
    }

    #[test]
    fn page_records_reject_hostile_input() {
        let mut b = PageBatch::default();
        b.push_zero(0, 1).unwrap();
        b.push_data(0x3000, 1, &page(9)).unwrap();
        b.push_zero(0x10000, 7).unwrap();
        let good = b.as_bytes().to_vec();
        // Every strict prefix fails somewhere (except record boundaries,
        // which are valid shorter batches).
        let boundaries = [0, 16, 16 + 16 + PAGE_BYTES, good.len()];
        for cut in 0..good.len() {
            let r: Result<Vec<_>, _> = page_records(&good[..cut]).collect();
            assert_eq!(r.is_ok(), boundaries.contains(&cut), "cut {cut}");
        }

        let e = first_err(&[good.clone(), rec(0x1001, 1, 0, [0; 3])].concat());
        assert!(e.contains("not page aligned"), "{e}");
        assert!(
            e.starts_with(&format!("Pages record at offset {}", good.len())),
            "{e}"
        );
        assert!(first_err(&rec(0, 0, 0, [0; 3])).contains("zero pages"));
        assert!(first_err(&rec(0, 1, 2, [0; 3])).contains("unknown record kind 2"));
        assert!(first_err(&rec(0, 1, 0, [0, 1, 0])).contains("reserved"));
        assert!(first_err(&rec(u64::MAX - 4095, 2, 0, [0; 3])).contains("wrap"));
        let e = first_err(&rec(0, u32::MAX, 1, [0; 3]));
        assert!(
            e.starts_with("Pages record at offset 0: data runs past end of frame"),
            "{e}"
        );
        let mut short = rec(0x4000, 2, 1, [0; 3]);
        short.extend_from_slice(&page(1));
        let e = first_err(&[good.clone(), short].concat());
        assert!(e.contains("data runs past end of frame"), "{e}");
    }
}
