//! `PagesGather` frames into guest memory: pages that passed their page
//! CRC are installed, torn ones are not and stay owed until an intact copy
//! follows ([`PageSink::torn`]).
//!
//! A torn page is what a guest write between the source's CRC and its send
//! looks like. The write came after the source harvested the page's dirty
//! bit (the source reads a page only after that), so the dirty log holds
//! it and the page is sent again, in a later round or in the final copy;
//! that copy clears it. A page still torn at `Complete` was not torn by a
//! write but corrupted on the way: the migration fails there, before the
//! commit point, naming it ([`PeerError::TornPages`]).

use super::memory::{outside, PageSink};
use crate::error::{ErrorKind, InternalError, PeerError};
use crate::memory::PAGE_SIZE;
use crate::protocol::{gather_payload, GatherData, MsgKind};

impl PageSink<'_> {
    /// Applies a `PagesGather` payload whose frame CRC (over its metadata)
    /// passed; refused where they were not granted.
    pub(super) fn apply_gather(&mut self, payload: &[u8]) -> Result<(), ErrorKind> {
        if !self.gather {
            return Err(ErrorKind::Unexpected {
                got: format!("{} (not granted)", MsgKind::PagesGather),
                expected: "Pages or PagesLz4",
            });
        }
        let g = gather_payload(payload)?;
        for rec in g.records() {
            let (region, page) = self.place(rec.gpa, rec.npages)?;
            match rec.data {
                Some(data) => self.apply_gathered(region, page, rec.gpa, rec.npages, &data)?,
                None => self.apply_zero(region, page, rec.gpa, rec.npages)?,
            }
        }
        Ok(())
    }

    /// Installs the intact runs of a placed data record; marks the torn
    /// pages owed.
    fn apply_gathered(
        &mut self,
        region: usize,
        page: u64,
        gpa: u64,
        npages: u32,
        data: &GatherData<'_>,
    ) -> Result<(), ErrorKind> {
        let mut intact = std::mem::take(&mut self.intact);
        intact.clear();
        intact.extend((0..npages as usize).map(|i| data.intact(i)));
        let mut r = Ok(());
        let mut at = 0;
        while at < intact.len() && r.is_ok() {
            let good = intact[at];
            let end = intact[at..]
                .iter()
                .position(|g| *g != good)
                .map_or(intact.len(), |n| at + n);
            let (p, n) = (page + at as u64, (end - at) as u32);
            if good {
                let bytes = &data.bytes()[at * PAGE_SIZE as usize..end * PAGE_SIZE as usize];
                r = self.install(region, p, n, bytes).map_err(|e| match e {
                    Some(e) => InternalError::Fill(e).into(),
                    None => outside(gpa, npages),
                });
            } else {
                self.torn.set_range(region, p, u64::from(n));
                self.torn_pages += u64::from(n);
            }
            at = end;
        }
        self.intact = intact;
        r
    }

    /// Writes `n` verified pages at `page` and counts them (which clears
    /// them from the owed pages).
    fn install(
        &mut self,
        region: usize,
        page: u64,
        n: u32,
        bytes: &[u8],
    ) -> Result<(), Option<std::io::Error>> {
        self.write_data(region, page, bytes)?;
        self.take_data(region, page, n);
        Ok(())
    }

    /// Fails if any page is still owed an intact copy (at `Complete`).
    pub(super) fn check_torn(&self) -> Result<(), ErrorKind> {
        let Some(first) = self.torn.runs(1).next() else {
            return Ok(());
        };
        let base = self.layout.regions()[first.region].guest_addr;
        Err(PeerError::TornPages {
            pages: self.torn.count(),
            first: base + first.first_page * PAGE_SIZE,
        }
        .into())
    }
}
