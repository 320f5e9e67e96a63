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
