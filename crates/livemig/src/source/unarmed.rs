//! Memory the guest never populated is never re-armed: a
//! [`Rearm::BeforeRead`] tracker wrapped so that chunks nothing was ever
//! written to cost one scan for populated memory per sync, not one re-arm
//! each (KVM's `KVM_CLEAR_DIRTY_LOG`, ~1 ms per 256 MiB on a shadow-paging
//! host: ~250 ms per round 0 of an untouched 61 GiB slot).
//!
//! Why this is correct. A [`Rearm::BeforeRead`] tracker leaves a page it
//! reported unarmed until [`DirtyTracker::rearm`], and after
//! [`DirtyTracker::start`] every page is in that state (KVM's manual protect
//! with `INITIALLY_SET`: every bit set, nothing write-protected), so every
//! `sync` reports a page that was never re-armed (or, without
//! `INITIALLY_SET`, reports it once written). A chunk ([`CHUNK_PAGES`]) none
//! of whose pages was ever re-armed (here: *unarmed*) was therefore never
//! read by the engine — pages are read only after their re-arm — so the
//! destination holds zeros for it (it scrubbed its memory). After each
//! inner `sync`, [`Unarmed`] asks which pages of the unarmed chunks are
//! populated ([`HostRam::populated_ranges`]):
//!
//! * a chunk with none reads as zero now: its pages are taken out of the
//!   bitmap and the chunk stays unarmed, so a page written after the scan
//!   is reported again by the next `sync` (the final one runs paused, so its
//!   scan is exact);
//! * a chunk with some is armed whole, then scanned again, and exactly its
//!   populated pages are put in the bitmap: a page not populated at the
//!   second scan reads as zero (the destination's value) and any write
//!   after the arm is logged.
//!
//! The engine's own re-arms ([`DirtyTracker::rearm`], just before it reads
//! a chunk) mark a chunk armed when they re-arm every page of it (round 0
//! does, for the chunks holding data).
//!
//! A region none of whose pages is populated when tracking starts is not
//! tracked by the inner tracker at all ([`DirtyTracker::start_regions`]):
//! every chunk of it is unarmed, so the scan alone watches it, and its
//! tracking starts ([`DirtyTracker::start_region`]) just before the first
//! re-arm of any of its pages — which makes every page of it reported and
//! unarmed, the state the argument above starts from. An idle guest's
//! untouched memory thus costs the hypervisor nothing: no dirty logging
//! turned on and off for it, no log read at each sync.
//!
//! Only regions whose scan is cheap ([`HostRam::scans_cheaply`]: private
//! anonymous memory and Linux 6.7's `PAGEMAP_SCAN`) are tracked here, since
//! the scan runs at every sync, the final one included; round 0 re-arms the
//! others whole, as before.
//!
//! [`CHUNK_PAGES`]: super::CHUNK_PAGES

use super::CHUNK_PAGES;
use crate::bitmap::DirtyBitmap;
use crate::memory::MemoryLayout;
use crate::ram::HostRam;
use crate::vm::{DirtyTracker, Rearm, VmError};

/// A [`Rearm::BeforeRead`] tracker that never re-arms memory the guest
/// never populated (see the module docs).
pub(super) struct Unarmed<'a> {
    inner: Box<dyn DirtyTracker + 'a>,
    ram: HostRam<'a>,
    /// Per region, per chunk: no page of it was ever re-armed.
    unarmed: Vec<Vec<bool>>,
    /// Per region: the inner tracker tracks it (see the module docs).
    started: Vec<bool>,
    /// All clear between calls: the pages [`Unarmed::arm`] re-arms.
    scratch: DirtyBitmap,
    /// Time spent in populated-page scans during the current `sync`.
    scanning: std::time::Duration,
}

impl<'a> Unarmed<'a> {
    /// Wraps `inner` (a [`Rearm::BeforeRead`] tracker, not started yet)
    /// over `ram` with `layout`.
    pub(super) fn new(
        inner: Box<dyn DirtyTracker + 'a>,
        ram: HostRam<'a>,
        layout: &MemoryLayout,
    ) -> Self {
        let scratch = DirtyBitmap::new(layout);
        // A region the scan would cost a step per page of is not tracked
        // here: round 0 re-arms it whole (see `untouched_chunks`).
        let unarmed: Vec<Vec<bool>> = (0..scratch.num_regions())
            .map(|r| {
                let chunks = scratch.region_pages(r).div_ceil(CHUNK_PAGES) as usize;
                vec![ram.scans_cheaply(r); chunks]
            })
            .collect();
        let started = vec![true; unarmed.len()];
        Unarmed {
            inner,
            ram,
            unarmed,
            started,
            scratch,
            scanning: std::time::Duration::ZERO,
        }
    }

    /// Whether the inner tracker must track `region` from the start: unless
    /// every chunk of it is unarmed and none of its pages is populated.
    fn needs_tracking(&self, region: usize) -> bool {
        let pages = self.scratch.region_pages(region);
        !self.unarmed[region].iter().all(|u| *u)
            || !self.ram.populated_ranges(region, 0, pages).is_empty()
    }

    /// Starts the inner tracker's tracking of `region` if it was left out.
    fn ensure_started(&mut self, region: usize) -> Result<(), VmError> {
        if let Some(s) = self.started.get_mut(region).filter(|s| !**s) {
            self.inner.start_region(region)?;
            *s = true;
            log::debug!("dirty tracking of region {region} started: it holds data now");
        }
        Ok(())
    }

    /// Pages `(first, end)` of chunk `c` of `region`.
    fn span(&self, region: usize, c: usize) -> (u64, u64) {
        let first = c as u64 * CHUNK_PAGES;
        let end = (first + CHUNK_PAGES).min(self.scratch.region_pages(region));
        (first, end)
    }

    /// Re-arms every page of chunk `c` of `region` and marks it armed.
    fn arm(&mut self, region: usize, c: usize) -> Result<(), VmError> {
        self.ensure_started(region)?;
        let (first, end) = self.span(region, c);
        self.scratch.set_range(region, first, end - first);
        let r = self.inner.rearm(region, first, end - first, &self.scratch);
        self.scratch.clear_range(region, first, end - first);
        r?;
        self.unarmed[region][c] = false;
        Ok(())
    }

    /// After an inner `sync` into `bitmap`: the unarmed chunks of `region`
    /// from `c0` up to `c1` (all unarmed), sorted out as the module docs
    /// say.
    fn settle_run(
        &mut self,
        bitmap: &mut DirtyBitmap,
        region: usize,
        c0: usize,
        c1: usize,
    ) -> Result<(), VmError> {
        let (first, _) = self.span(region, c0);
        let (_, end) = self.span(region, c1 - 1);
        let mut has_data = vec![false; c1 - c0];
        let t0 = std::time::Instant::now();
        let populated = self.ram.populated_ranges(region, first, end);
        self.scanning += t0.elapsed();
        for (p, n) in populated {
            let (a, b) = (
                (p / CHUNK_PAGES) as usize,
                ((p + n - 1) / CHUNK_PAGES) as usize,
            );
            for d in has_data.iter_mut().take(b + 1 - c0).skip(a - c0) {
                *d = true;
            }
        }
        bitmap.clear_range(region, first, end - first);
        for (i, _) in has_data.iter().enumerate().filter(|(_, d)| **d) {
            let c = c0 + i;
            self.arm(region, c)?;
            let (f, e) = self.span(region, c);
            for (p, n) in self.ram.populated_ranges(region, f, e) {
                bitmap.set_range(region, p, n);
            }
        }
        Ok(())
    }

    /// Sorts out every run of unarmed chunks after an inner `sync`.
    fn settle(&mut self, bitmap: &mut DirtyBitmap) -> Result<(), VmError> {
        for region in 0..self.unarmed.len() {
            let n = self.unarmed[region].len();
            let mut c = 0;
            while c < n {
                if !self.unarmed[region][c] {
                    c += 1;
                    continue;
                }
                let c0 = c;
                while c < n && self.unarmed[region][c] {
                    c += 1;
                }
                self.settle_run(bitmap, region, c0, c)?;
            }
        }
        Ok(())
    }
}

impl DirtyTracker for Unarmed<'_> {
    fn start(&mut self) -> Result<(), VmError> {
        // A page populated after this scan is found by a sync's scan, which
        // starts its region before re-arming it.
        let started: Vec<bool> = (0..self.unarmed.len())
            .map(|r| self.needs_tracking(r))
            .collect();
        self.inner.start_regions(&started)?;
        self.started = started;
        Ok(())
    }

    fn sync(&mut self, bitmap: &mut DirtyBitmap) -> Result<(), VmError> {
        let t0 = std::time::Instant::now();
        self.inner.sync(bitmap)?;
        let t1 = std::time::Instant::now();
        self.scanning = std::time::Duration::ZERO;
        let r = self.settle(bitmap);
        log::debug!(
            "sync {:.2} ms, unarmed chunks sorted out in {:.2} ms (populated-page scans {:.2} ms)",
            (t1 - t0).as_secs_f64() * 1000.0,
            t1.elapsed().as_secs_f64() * 1000.0,
            self.scanning.as_secs_f64() * 1000.0
        );
        r
    }

    fn rearm_mode(&self) -> Rearm {
        self.inner.rearm_mode()
    }

    fn rearm(
        &mut self,
        region: usize,
        first_page: u64,
        npages: u64,
        dirty: &DirtyBitmap,
    ) -> Result<(), VmError> {
        self.ensure_started(region)?;
        self.inner.rearm(region, first_page, npages, dirty)?;
        let Some(chunks) = self.unarmed.get(region) else {
            return Ok(());
        };
        let end = first_page.saturating_add(npages);
        let armed: Vec<usize> = (first_page.div_ceil(CHUNK_PAGES) as usize..chunks.len())
            .take_while(|&c| self.span(region, c).1 <= end)
            .filter(|&c| {
                let (f, e) = self.span(region, c);
                chunks[c] && dirty.count_in(region, f, e) == e - f
            })
            .collect();
        for c in armed {
            self.unarmed[region][c] = false;
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), VmError> {
        self.inner.stop()
    }

    fn stop_migrated(&mut self) -> Result<(), VmError> {
        self.inner.stop_migrated()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}
