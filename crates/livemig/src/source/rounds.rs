//! Walking a dirty bitmap chunk by chunk, re-arming the dirty log before
//! each chunk is read.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{cancel::CancelToken, sender::PageSender, streams::Job, CHUNK_PAGES};
use crate::bitmap::DirtyBitmap;
use crate::error::{ErrorKind, MigrationError, Phase};
use crate::protocol::{stream_of, MsgKind};
use crate::ram::mark_chunks;
use crate::vm::{DirtyTracker, SourceVm};

/// Round 0 walks the bitmap a block of this many pages (256 MiB) at a
/// time; a region the kernel does not index cheaply is re-armed and
/// scanned for populated memory a block at a time, before its chunks (see
/// [`PageSender::send_bitmap`]).
pub(super) const BLOCK_PAGES: u64 = 64 * CHUNK_PAGES;

impl PageSender<'_> {
    /// Sends every page set in `bitmap`, chunk by chunk; with a `tracker`
    /// ([`Rearm::BeforeRead`](crate::vm::Rearm::BeforeRead)) each chunk's
    /// pages are re-armed just before they are read.
    ///
    /// With [`PageSender::skip_untouched`] set (round 0), each region is
    /// scanned once for memory that may hold data
    /// ([`HostRam::populated_chunks`]: the kernel's index of populated
    /// memory, whose cost follows what the guest touched) and the chunks
    /// without any are left out whole, *not re-armed* (see
    /// `untouched_chunks`); each other chunk is re-armed and its pages
    /// narrowed to those that may hold data ([`HostRam::populated`]) —
    /// after its re-arm, so a page first written between the two is either
    /// seen as populated here or logged dirty for the next round (a page
    /// first written in a left-out chunk after the scan stays reported: it
    /// was never re-armed). Round 0 thus costs one scan per region plus work
    /// in proportion to the chunks that hold data. A region whose scan
    /// costs a step per page ([`HostRam::scans_cheaply`]) is re-armed and
    /// scanned a block of [`BLOCK_PAGES`] at a time, the re-arm before the
    /// block's scan, instead: it is not left to `unarmed.rs`, which scans at
    /// every sync.
    ///
    /// Pages may still be buffered (here or in the stream threads) when this
    /// returns: [`PageSender::end_round`] flushes and accounts them.
    ///
    /// [`HostRam::populated`]: crate::ram::HostRam::populated
    /// [`HostRam::populated_chunks`]: crate::ram::HostRam::populated_chunks
    /// [`HostRam::scans_cheaply`]: crate::ram::HostRam::scans_cheaply
    pub(super) fn send_bitmap(
        &mut self,
        bitmap: &DirtyBitmap,
        mut tracker: Option<&mut (dyn DirtyTracker + '_)>,
        cancel: &CancelToken,
        phase: Phase,
    ) -> Result<(), MigrationError> {
        let mut populated = Vec::new();
        let (t_all, mut t_scans) = (Instant::now(), std::time::Duration::ZERO);
        for region in 0..bitmap.num_regions() {
            let pages = bitmap.region_pages(region);
            // A region `unarmed.rs` does not track (its scan would cost a
            // step per page) is re-armed a block at a time in round 0, so
            // that its untouched chunks are armed too.
            let rearm_blocks = self.skip_untouched && !self.ram.scans_cheaply(region);
            // Any other region in round 0: one scan of the whole region
            // for the chunks that hold data, not one per block.
            let t_scan = Instant::now();
            let chunk_map = (self.skip_untouched && !rearm_blocks)
                .then(|| self.ram.populated_chunks(region, CHUNK_PAGES))
                .flatten();
            t_scans += t_scan.elapsed();
            let mut block = 0;
            while block < pages {
                let end = (block + BLOCK_PAGES).min(pages);
                if !bitmap.any_in(region, block, end) {
                    // Nothing to send or re-arm: one pass over the block's
                    // words instead of a check (and a keepalive look) per
                    // chunk — a mostly clean 64 GiB bitmap is 16 K chunks.
                    block = end;
                    continue;
                }
                // Round 0: one scan for populated memory per block, so the
                // chunks nothing was ever written to cost nothing more
                // (see `untouched_chunks`).
                if rearm_blocks && bitmap.any_in(region, block, end) {
                    if let Some(t) = tracker.as_deref_mut() {
                        // Before the scan: a page written after the re-arm
                        // is then seen by the scan or logged.
                        let t0 = Instant::now();
                        let r = t.rearm(region, block, end - block, bitmap);
                        self.clear_time += t0.elapsed();
                        r.map_err(|e| MigrationError::new(phase, e))?;
                    }
                }
                let t_scan = Instant::now();
                let skip = match &chunk_map {
                    Some(map) => untouched_in(map, block, end),
                    None => self.untouched_chunks(bitmap, region, block, end),
                };
                t_scans += t_scan.elapsed();
                if !skip.is_empty() && skip.iter().all(|s| *s) {
                    // No chunk of the block holds data: one count for all.
                    self.skipped += bitmap.count_in(region, block, end);
                    block = end;
                    continue;
                }
                if self.first_page.is_none() {
                    log::debug!(
                        "round 0: block {block} of region {region} scanned in {:.2} ms",
                        t_scan.elapsed().as_secs_f64() * 1000.0
                    );
                }
                let mut chunk = block;
                while chunk < end {
                    let chunk_end = (chunk + CHUNK_PAGES).min(end);
                    let i = ((chunk - block) / CHUNK_PAGES) as usize;
                    if skip.get(i).copied().unwrap_or(false) {
                        self.skipped += bitmap.count_in(region, chunk, chunk_end);
                    } else {
                        self.send_chunk(
                            bitmap,
                            tracker.as_deref_mut(),
                            &mut populated,
                            (region, chunk, chunk_end),
                            cancel,
                            phase,
                        )?;
                    }
                    chunk = chunk_end;
                }
                block = end;
            }
        }
        log::debug!(
            "pages handed out in {:.2} ms, of which scans for populated memory {:.2} ms, \
             re-arming the dirty log {:.2} ms",
            t_all.elapsed().as_secs_f64() * 1000.0,
            t_scans.as_secs_f64() * 1000.0,
            self.clear_time.as_secs_f64() * 1000.0
        );
        Ok(())
    }

    /// With [`PageSender::skip_untouched`] (round 0), in a region scanned
    /// a block at a time: asks which pages of
    /// `block..end` of `region` may hold data
    /// ([`HostRam::populated_ranges`]); returns, per chunk of the block,
    /// whether it holds none. Such a chunk is left out of this round and
    /// not re-armed: it reads as zero (the destination's value) now, and a
    /// page written after the scan is reported by the next sync — by a
    /// [`Rearm::OnSync`] tracker because tracking started before this
    /// round, by a [`Rearm::BeforeRead`] one because a page never re-armed
    /// stays reported (`unarmed.rs` keeps such chunks out of later rounds
    /// until they hold data). Without `skip_untouched`: nothing skipped.
    ///
    /// [`HostRam::populated_ranges`]: crate::ram::HostRam::populated_ranges
    /// [`HostRam::scans_cheaply`]: crate::ram::HostRam::scans_cheaply
    /// [`Rearm::OnSync`]: crate::vm::Rearm::OnSync
    /// [`Rearm::BeforeRead`]: crate::vm::Rearm::BeforeRead
    fn untouched_chunks(
        &mut self,
        bitmap: &DirtyBitmap,
        region: usize,
        block: u64,
        end: u64,
    ) -> Vec<bool> {
        if !self.skip_untouched || !bitmap.any_in(region, block, end) {
            return Vec::new();
        }
        let mut skip = vec![true; (end - block).div_ceil(CHUNK_PAGES) as usize];
        for range in self.ram.populated_ranges(region, block, end) {
            mark_chunks(&mut skip, block, CHUNK_PAGES, range, false);
        }
        skip
    }

    /// Sends the pages of `bitmap` in `span` = (region, `chunk..end`) (one
    /// chunk): re-armed first with a `tracker`, narrowed to the populated
    /// ones in round 0.
    fn send_chunk(
        &mut self,
        bitmap: &DirtyBitmap,
        tracker: Option<&mut (dyn DirtyTracker + '_)>,
        populated: &mut Vec<bool>,
        span: (usize, u64, u64),
        cancel: &CancelToken,
        phase: Phase,
    ) -> Result<(), MigrationError> {
        let (region, chunk, end) = span;
        // Keep the connection (the control one, or the only one) alive
        // through long stretches of clearing or of pages that travel on
        // other streams.
        self.keepalive()
            .map_err(|e| MigrationError::new(phase, e))?;
        if !bitmap.any_in(region, chunk, end) {
            return Ok(());
        }
        if cancel.is_cancelled() {
            return Err(MigrationError::new(phase, ErrorKind::Cancelled));
        }
        if let Some(t) = tracker {
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
            populated.clear();
            populated.resize((end - chunk) as usize, false);
            self.ram.populated(region, chunk, populated);
            let before: u64 = runs.iter().map(|r| r.1).sum();
            runs = narrow_runs(&runs, chunk, populated);
            self.skipped += before - runs.iter().map(|r| r.1).sum::<u64>();
        }
        if !runs.is_empty() {
            self.dispatch(region, chunk, runs, phase)?;
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

/// Per chunk of `block..end`: whether `map` (one flag per chunk of the
/// region, [`HostRam::populated_chunks`]) says it holds no data.
///
/// [`HostRam::populated_chunks`]: crate::ram::HostRam::populated_chunks
fn untouched_in(map: &[bool], block: u64, end: u64) -> Vec<bool> {
    let (c0, c1) = (block / CHUNK_PAGES, end.div_ceil(CHUNK_PAGES));
    (c0..c1)
        .map(|c| !map.get(c as usize).copied().unwrap_or(true))
        .collect()
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
    let t0 = Instant::now();
    take_vmm_writes(vm, bitmap.num_regions(), |region, word, bits| {
        bitmap.or_word(region, word, bits)
    });
    log::debug!(
        "the VMM's writes merged in {:.2} ms",
        t0.elapsed().as_secs_f64() * 1000.0
    );
}

/// Takes the VMM's own writes since the previous take
/// ([`GuestMemory::take_vmm_dirty_words`]) from the first `regions`
/// regions and hands each word with a written page to `f` as
/// (region, word index, bits).
///
/// [`GuestMemory::take_vmm_dirty_words`]: crate::memory::GuestMemory::take_vmm_dirty_words
pub(super) fn take_vmm_writes<V: SourceVm + ?Sized>(
    vm: &V,
    regions: usize,
    mut f: impl FnMut(usize, usize, u64),
) {
    let mem = vm.memory();
    for region in 0..regions {
        mem.take_vmm_dirty_words(region, &mut |word, bits| f(region, word, bits));
    }
}
