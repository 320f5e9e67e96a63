//! One `PagesGather` frame being built: its metadata (record headers and a
//! CRC per data page, [`GatherMeta`]) and where its page data lies in guest
//! memory. Written with one gather write: the frame header, the metadata,
//! then the pages straight from guest memory, never copied by this side.
//!
//! The page CRCs are computed when a page is pushed; the kernel copies the
//! page when the frame is written. A guest write in between makes the page
//! arrive torn: the destination does not install it, and the page, dirtied
//! by that write after its dirty bit was harvested, is sent again
//! (`destination::gather`).

use std::io::IoSlice;

use crate::protocol::{FrameWriter, GatherMeta, MsgKind, ProtocolError};
use crate::ram::HostRam;
use crate::transport::Transport;

/// The pages of one data record: region, first page, page count.
#[derive(Debug, Clone, Copy)]
struct Piece {
    region: usize,
    page: u64,
    npages: u64,
}

/// A `PagesGather` frame being built (see the module docs).
#[derive(Debug, Default)]
pub(super) struct GatherFrame {
    meta: GatherMeta,
    pieces: Vec<Piece>,
}

impl GatherFrame {
    /// Adds `npages` zero pages at `gpa`.
    pub(super) fn push_zero(&mut self, gpa: u64, npages: u32) -> Result<(), ProtocolError> {
        self.meta.push_zero(gpa, npages)
    }

    /// Adds pages `page..page + npages` of `region` (at `gpa`) with their
    /// CRCs as guest memory holds them now.
    pub(super) fn push_data(
        &mut self,
        ram: &HostRam<'_>,
        region: usize,
        page: u64,
        npages: u64,
        gpa: u64,
    ) -> Result<(), ProtocolError> {
        let outside = || ProtocolError::PagesOutsideMemory {
            gpa,
            npages: npages as u32,
        };
        // SAFETY: the slice is only checksummed here (a guest write during
        // that makes the page arrive torn, which the protocol expects) and
        // dropped before this returns.
        let data = unsafe { ram.guest_bytes(region, page, npages) }.ok_or_else(outside)?;
        self.meta.push_data(gpa, data)?;
        self.pieces.push(Piece {
            region,
            page,
            npages,
        });
        Ok(())
    }

    /// Writes the frame on `fw` (the pages from `ram`, which must be the
    /// memory the pushes read) and empties it.
    pub(super) fn write(
        &mut self,
        fw: &mut FrameWriter<Box<dyn Transport>>,
        ram: &HostRam<'_>,
    ) -> Result<(), ProtocolError> {
        let mut data = Vec::with_capacity(self.pieces.len());
        for p in &self.pieces {
            // SAFETY: the slices are only handed to the kernel's copy (or a
            // transport's), which tolerates bytes changing under it: a page
            // changed since its CRC arrives torn and is sent again. They are
            // dropped before this returns.
            let bytes = unsafe { ram.guest_bytes(p.region, p.page, p.npages) };
            let bytes = bytes.ok_or(ProtocolError::PagesOutsideMemory {
                gpa: 0,
                npages: p.npages as u32,
            })?;
            data.push(IoSlice::new(bytes));
        }
        let r = fw.write_frame_split(MsgKind::PagesGather, &self.meta.parts(), &data);
        self.clear();
        r
    }

    /// Data pages in the frame.
    pub(super) fn data_pages(&self) -> u64 {
        self.meta.data_pages()
    }

    /// Payload bytes of the frame as it stands.
    pub(super) fn len_bytes(&self) -> u64 {
        self.meta.len_bytes() as u64 + self.data_pages() * crate::memory::PAGE_SIZE
    }

    /// Whether nothing was pushed.
    pub(super) fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    /// Empties the frame, keeping its buffers.
    pub(super) fn clear(&mut self) {
        self.meta.clear();
        self.pieces.clear();
    }
}
