//! Walking a dirty bitmap chunk by chunk, re-arming the dirty log before
//! each chunk is read.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{cancel::CancelToken, sender::PageSender, streams::Job, CHUNK_PAGES};
use crate::bitmap::DirtyBitmap;
use crate::error::{ErrorKind, MigrationError, Phase};
use crate::protocol::{stream_of, MsgKind};
use crate::vm::{DirtyTracker, SourceVm};

impl PageSender<'_> {
    /// Sends every page set in `bitmap`, chunk by chunk; with a `tracker`
    /// ([`Rearm::BeforeRead`](crate::vm::Rearm::BeforeRead)) each chunk's
    /// pages are re-armed just before they are read.
    ///
    /// With [`PageSender::skip_untouched`] set (round 0), each chunk's pages
    /// are then narrowed to those that may hold data ([`HostRam::populated`])
    /// — after the re-arm, so a page first written between the two is
    /// either seen as populated here or logged dirty for the next round.
    ///
    /// Pages may still be buffered (here or in the stream threads) when this
    /// returns: [`PageSender::end_round`] flushes and accounts them.
    pub(super) fn send_bitmap(
        &mut self,
        bitmap: &DirtyBitmap,
        mut tracker: Option<&mut (dyn DirtyTracker + '_)>,
        cancel: &CancelToken,
        phase: Phase,
    ) -> Result<(), MigrationError> {
        let mut populated = Vec::new();
        for region in 0..bitmap.num_regions() {
            let pages = bitmap.region_pages(region);
            let mut chunk = 0;
            while chunk < pages {
                // Keep the connection (the control one, or the only one)
                // alive through long stretches of clearing or of pages
                // that travel on other streams.
                self.keepalive()
                    .map_err(|e| MigrationError::new(phase, e))?;
                let end = (chunk + CHUNK_PAGES).min(pages);
                if !bitmap.any_in(region, chunk, end) {
                    chunk = end;
                    continue;
                }
                if cancel.is_cancelled() {
                    return Err(MigrationError::new(phase, ErrorKind::Cancelled));
                }
                if let Some(t) = tracker.as_deref_mut() {
                    let t0 = Instant::now();
                    t.rearm(region, chunk, end - chunk, bitmap)
                        .map_err(|e| MigrationError::new(phase, e))?;
                    self.clear_time += t0.elapsed();
                }
                let mut runs: Vec<(u64, u64)> = bitmap
                    .runs_in(region, chunk, end, u64::MAX)
                    .map(|r| (r.first_page, r.npages))
                    .collect();
                if self.skip_untouched {
                    populated.resize((end - chunk) as usize, false);
                    self.ram.populated(region, chunk, &mut populated);
                    let before: u64 = runs.iter().map(|r| r.1).sum();
                    runs = narrow_runs(&runs, chunk, &populated);
                    self.skipped += before - runs.iter().map(|r| r.1).sum::<u64>();
                }
                if !runs.is_empty() {
                    self.dispatch(region, chunk, runs, phase)?;
                }
                chunk = end;
            }
        }
        Ok(())
    }

    /// Sends the runs of one chunk: on a page stream, or right here.
    pub(super) fn dispatch(
        &mut self,
        region: usize,
        chunk: u64,
        runs: Vec<(u64, u64)>,
        phase: Phase,
    ) -> Result<(), MigrationError> {
        self.first_page.get_or_insert_with(Instant::now);
        if let Some(pool) = &self.pool {
            let streams = pool.jobs.len() as u32;
            let index = stream_of(&self.layout, region, chunk, streams);
            let job = Job::Runs {
                region,
                runs,
                skip_zero: self.skip_zero,
            };
            if pool.dispatch(index, job).is_err() || pool.failed.load(Ordering::SeqCst) {
                // The barrier at the end of the round names the stream and why.
                return Ok(());
            }
        } else {
            for (first, n) in runs {
                self.send_run(region, first, n)
                    .map_err(|e| MigrationError::new(phase, e))?;
            }
        }
        Ok(())
    }

    /// Flushes this round's pages (on every stream) and accounts them. With
    /// `last`, every stream also ends with `Complete` (the final copy).
    pub(super) fn end_round(&mut self, phase: Phase, last: bool) -> Result<(), MigrationError> {
        self.flush().map_err(|e| MigrationError::new(phase, e))?;
        if let Some(pool) = &self.pool {
            let (fw, last_control) = (&mut self.fw, &mut self.last_control);
            let mut alive = || {
                fw.write_frame(MsgKind::Keepalive, &[])?;
                fw.flush()?;
                *last_control = Instant::now();
                Ok(())
            };
            let c = pool.barrier(last, phase, self.alive_every, &mut alive)?;
            self.counts.add(c);
        }
        Ok(())
    }
}

#[cfg(test)]
#[test]
pub(super) fn narrow_runs_keeps_marked_pages_as_maximal_runs() {
    let keep = [true, false, true, true, false, false, true, true];
    // Pages 100..108 with base 100; runs (100, 3) and (104, 4).
    assert_eq!(
        narrow_runs(&[(100, 3), (104, 4)], 100, &keep),
        vec![(100, 1), (102, 1), (106, 2)]
    );
    assert!(narrow_runs(&[(101, 1)], 100, &keep).is_empty());
}

/// The parts of `runs` (pages `(first, n)`) whose pages are marked in
/// `keep` (indexed from page `base`).
pub(super) fn narrow_runs(runs: &[(u64, u64)], base: u64, keep: &[bool]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(first, n) in runs {
        for p in first..first + n {
            if !keep.get((p - base) as usize).copied().unwrap_or(true) {
                continue;
            }
            match out.last_mut() {
                Some((f, m)) if *f + *m == p => *m += 1,
                _ => out.push((p, 1)),
            }
        }
    }
    out
}

/// Merges the VMM's own writes ([`GuestMemory::take_vmm_dirty`]) into
/// `bitmap`.
///
/// [`GuestMemory::take_vmm_dirty`]: crate::memory::GuestMemory::take_vmm_dirty
pub(super) fn merge_vmm_writes<V: SourceVm + ?Sized>(vm: &V, bitmap: &mut DirtyBitmap) {
    let mem = vm.memory();
    let mut words = Vec::new();
    for region in 0..bitmap.num_regions() {
        words.clear();
        words.resize(bitmap.region_pages(region).div_ceil(64) as usize, 0);
        mem.take_vmm_dirty(region, &mut words);
        bitmap.or_words(region, &words);
    }
}
