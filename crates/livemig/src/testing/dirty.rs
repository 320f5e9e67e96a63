//! A conformance check for [`DirtyTracker`] implementations.
//!
//! [`check_dirty_tracker`] drives a tracker through the sequence the engine
//! uses (start, write, sync, re-arm in chunks, write again, stop) while the
//! caller's guest writes known pages, and checks what every `sync` reports
//! against what was written. Every tracker runs the same check: the three
//! KVM modes (`tests/dirty_tracking.rs`, on a real VM) and the software VM's
//! two modes.
//!
//! The contract checked, step by step:
//! 1. `start`, write run 1, `sync`: every written page is reported. A
//!    [`Rearm::OnSync`] tracker reports exactly those pages; a
//!    [`Rearm::BeforeRead`] one may report more (KVM's manual-protect mode
//!    with `KVM_DIRTY_LOG_INITIALLY_SET` reports every page at the first
//!    sync).
//! 2. With `BeforeRead`: `rearm` every page reported, in chunks of
//!    [`CLEAR_CHUNK_PAGES`] (100: deliberately not a multiple of 64, so a
//!    tracker working on aligned blocks must round and mask itself). Then a
//!    `sync` with no write in between reports nothing.
//! 3. Write run 2 (overlapping run 1), `sync`: exactly run 2 is reported.
//! 4. With `BeforeRead`: `rearm` (with step 3's bitmap) only the pages of
//!    a range covering about the first half of the window, starting and
//!    ending off any 64-page boundary. Write run 3 over the whole window,
//!    `sync`: every page of run 3 is reported (in particular those written
//!    after they were re-armed), every page of run 2 outside the re-armed
//!    range is still reported (re-arming a page outside the range asked
//!    for would lose a write the engine has not read), and nothing outside
//!    runs 2 and 3 (a page of run 2 that was re-armed and not written again
//!    may or may not be reported). With `OnSync`: exactly run 3.
//! 5. `stop` succeeds.
//!
//! The writes must be the guest's own stores (a vCPU's, or the software
//! VM's [`SoftVm::write_as_guest`](super::soft::SoftVm::write_as_guest)):
//! writes through vm-memory are the VMM's and are tracked by its bitmap, not
//! by the tracker under test.
//!
//! ```
//! use livemig::memory::{MemoryLayout, RegionDesc};
//! use livemig::testing::dirty::{check_dirty_tracker, PageRun, PageWindow};
//! use livemig::testing::soft::{SoftConfig, SoftTracking, SoftVm};
//! use livemig::vm::SourceVm;
//!
//! let layout = MemoryLayout::new(vec![RegionDesc { guest_addr: 0, size: 4 << 20 }])?;
//! let memory = livemig::memory::allocate(&layout)?;
//! let vm = SoftVm::with_memory(memory, &SoftConfig::idle(), SoftTracking::ManualProtect)?;
//! let mut tracker = vm.dirty_tracker()?;
//! let window = PageWindow { region: 0, first: 64, pages: 512 };
//! check_dirty_tracker(&mut *tracker, &layout, window, &mut |run: &PageRun| {
//!     for page in run.pages() {
//!         vm.write_as_guest(page * 4096, page).map_err(|e| e.to_string())?;
//!     }
//!     Ok(())
//! })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeSet;
use std::fmt;

use crate::bitmap::DirtyBitmap;
use crate::memory::MemoryLayout;
use crate::vm::{DirtyTracker, Rearm, VmError};

/// Pages re-armed per `rearm` call: not a multiple of 64, so that the
/// check exercises a tracker's own rounding (KVM's `KVM_CLEAR_DIRTY_LOG`
/// takes 64-page-aligned blocks).
pub const CLEAR_CHUNK_PAGES: u64 = 100;

/// The pages of one region the check may have the guest write: pages
/// `first .. first + pages` of region `region`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageWindow {
    /// Index of the region in the layout.
    pub region: usize,
    /// First page (page number within the region).
    pub first: u64,
    /// Number of pages; at least [`PageWindow::MIN_PAGES`].
    pub pages: u64,
}

impl PageWindow {
    /// The smallest window the check accepts.
    pub const MIN_PAGES: u64 = 4 * CLEAR_CHUNK_PAGES;
}

/// `count` pages of region `region`, `stride` pages apart, from page
/// `first`: one batch of guest writes the check asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// Index of the region in the layout.
    pub region: usize,
    /// The first page written (page number within the region).
    pub first: u64,
    /// How many pages.
    pub count: u64,
    /// The distance between two written pages, in pages (at least 1).
    pub stride: u64,
}

impl PageRun {
    /// The page numbers (within the region) of the run, in order.
    pub fn pages(&self) -> impl Iterator<Item = u64> {
        let (first, stride) = (self.first, self.stride);
        (0..self.count).map(move |k| first + k * stride)
    }

    fn set(&self) -> BTreeSet<(usize, u64)> {
        self.pages().map(|p| (self.region, p)).collect()
    }
}

/// A way to make the guest write pages: called with each run the check
/// needs written, it returns once the guest has stored to every page of the
/// run at least once (and, for a VM with vCPUs, with the vCPUs stopped).
pub type WritePages<'a> = dyn FnMut(&PageRun) -> Result<(), String> + 'a;

/// How a tracker failed the check.
#[derive(Debug, thiserror::Error)]
pub enum TrackerCheckError {
    /// The window does not fit the layout or is too small.
    #[error("bad window {window:?}: {reason}")]
    Window {
        /// The window given.
        window: PageWindow,
        /// What is wrong with it.
        reason: String,
    },
    /// A tracker call failed.
    #[error("{step}: the tracker failed")]
    Tracker {
        /// The step of the check.
        step: &'static str,
        /// The tracker's error.
        #[source]
        source: VmError,
    },
    /// The page writer failed.
    #[error("{step}: writing pages failed: {reason}")]
    Writer {
        /// The step of the check.
        step: &'static str,
        /// The writer's message.
        reason: String,
    },
    /// A `sync` reported the wrong pages.
    #[error("{step}: {mismatch}")]
    Contract {
        /// The step of the check.
        step: &'static str,
        /// Which pages were missing or unexpected.
        mismatch: Mismatch,
    },
}

/// Pages a `sync` should have reported but did not, and pages it reported
/// but should not have, as (region, page) pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Written (and required) pages the sync did not report.
    pub missing: Vec<(usize, u64)>,
    /// Reported pages outside what the step allows.
    pub unexpected: Vec<(usize, u64)>,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let first = |v: &[(usize, u64)]| v.iter().take(8).copied().collect::<Vec<_>>();
        write!(
            f,
            "{} pages missing (first {:?}), {} unexpected (first {:?})",
            self.missing.len(),
            first(&self.missing),
            self.unexpected.len(),
            first(&self.unexpected)
        )
    }
}

/// Runs the dirty-tracker contract (see the [module docs](self)) against
/// `tracker`, a fresh tracker that has not been started, over `layout`;
/// `write` makes the guest write pages inside `window`, and nothing else may
/// write guest memory as the guest while the check runs. Returns the first
/// violation.
pub fn check_dirty_tracker(
    tracker: &mut dyn DirtyTracker,
    layout: &MemoryLayout,
    window: PageWindow,
    write: &mut WritePages<'_>,
) -> Result<(), TrackerCheckError> {
    check_window(layout, window)?;
    let mut c = Check {
        tracker,
        layout,
        window,
        write,
    };
    c.call("start", |t| t.start())?;
    let run1 = c.run(1, 3);
    let first = c.write_and_sync("first sync after start", &run1)?;
    let manual = c.tracker.rearm_mode() == Rearm::BeforeRead;
    let allowed = if manual { None } else { Some(&run1.set()) };
    expect("first sync after start", &first, &run1.set(), allowed)?;

    if manual {
        c.clear_chunks("re-arming everything", &bitmap_of(layout, &first), None)?;
    }
    let idle = c.sync("sync with nothing written")?;
    expect(
        "sync with nothing written",
        &idle,
        &BTreeSet::new(),
        Some(&BTreeSet::new()),
    )?;

    let run2 = c.run(0, 5);
    let second = c.write_and_sync("second write", &run2)?;
    expect("second write", &second, &run2.set(), Some(&run2.set()))?;

    let half = c.first_half();
    if manual {
        c.clear_chunks("partial re-arm", &bitmap_of(layout, &second), Some(half))?;
    }
    let run3 = c.run(2, 7);
    let third = c.write_and_sync("write after a partial re-arm", &run3)?;
    let (required, allowed) = if manual {
        let kept = run2.pages().filter(|p| *p < half.0 || *p >= half.1);
        let kept: BTreeSet<_> = kept.map(|p| (run2.region, p)).collect();
        let required = run3.set().union(&kept).copied().collect();
        (required, run2.set().union(&run3.set()).copied().collect())
    } else {
        (run3.set(), run3.set())
    };
    expect(
        "write after a partial re-arm",
        &third,
        &required,
        Some(&allowed),
    )?;
    c.call("stop", |t| t.stop())
}

fn check_window(layout: &MemoryLayout, w: PageWindow) -> Result<(), TrackerCheckError> {
    let bad = |reason: String| TrackerCheckError::Window { window: w, reason };
    let Some(region) = layout.regions().get(w.region) else {
        return Err(bad(format!(
            "the layout has {} regions",
            layout.regions().len()
        )));
    };
    if w.pages < PageWindow::MIN_PAGES {
        return Err(bad(format!("fewer than {} pages", PageWindow::MIN_PAGES)));
    }
    if w.first.saturating_add(w.pages) > region.pages() {
        return Err(bad(format!("the region has {} pages", region.pages())));
    }
    Ok(())
}

struct Check<'a, 'w> {
    tracker: &'a mut dyn DirtyTracker,
    layout: &'a MemoryLayout,
    window: PageWindow,
    write: &'a mut WritePages<'w>,
}

impl Check<'_, '_> {
    /// A run spread over the whole window: every `stride`-th page from
    /// `offset`.
    fn run(&self, offset: u64, stride: u64) -> PageRun {
        PageRun {
            region: self.window.region,
            first: self.window.first + offset,
            count: (self.window.pages - offset).div_ceil(stride),
            stride,
        }
    }

    /// A page range covering about the first half of the window, starting
    /// and ending off any 64-page boundary.
    fn first_half(&self) -> (u64, u64) {
        let off64 = |p: u64| if p.is_multiple_of(64) { p + 3 } else { p };
        let start = off64(self.window.first + 3);
        let end = off64(self.window.first + self.window.pages / 2);
        (start, end)
    }

    fn call(
        &mut self,
        step: &'static str,
        f: impl FnOnce(&mut dyn DirtyTracker) -> Result<(), VmError>,
    ) -> Result<(), TrackerCheckError> {
        f(&mut *self.tracker).map_err(|source| TrackerCheckError::Tracker { step, source })
    }

    fn sync(&mut self, step: &'static str) -> Result<BTreeSet<(usize, u64)>, TrackerCheckError> {
        let mut b = DirtyBitmap::new(self.layout);
        self.call(step, |t| t.sync(&mut b))?;
        Ok(set_of(&b))
    }

    fn write_and_sync(
        &mut self,
        step: &'static str,
        run: &PageRun,
    ) -> Result<BTreeSet<(usize, u64)>, TrackerCheckError> {
        (self.write)(run).map_err(|reason| TrackerCheckError::Writer { step, reason })?;
        self.sync(step)
    }

    /// Re-arms the pages set in `bitmap`, chunk by chunk, in every region
    /// (`only`: just those pages of the window's region).
    fn clear_chunks(
        &mut self,
        step: &'static str,
        bitmap: &DirtyBitmap,
        only: Option<(u64, u64)>,
    ) -> Result<(), TrackerCheckError> {
        for region in 0..bitmap.num_regions() {
            let (start, end) = match only {
                Some(range) if region == self.window.region => range,
                Some(_) => continue,
                None => (0, bitmap.region_pages(region)),
            };
            let end = end.min(bitmap.region_pages(region));
            let mut chunk = start;
            while chunk < end {
                let n = CLEAR_CHUNK_PAGES.min(end - chunk);
                self.call(step, |t| t.rearm(region, chunk, n, bitmap))?;
                chunk += n;
            }
        }
        Ok(())
    }
}

/// Fails unless `required ⊆ got` and (if given) `got ⊆ allowed`.
fn expect(
    step: &'static str,
    got: &BTreeSet<(usize, u64)>,
    required: &BTreeSet<(usize, u64)>,
    allowed: Option<&BTreeSet<(usize, u64)>>,
) -> Result<(), TrackerCheckError> {
    let missing: Vec<_> = required.difference(got).copied().collect();
    let unexpected: Vec<_> = match allowed {
        Some(a) => got.difference(a).copied().collect(),
        None => Vec::new(),
    };
    if missing.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
    Err(TrackerCheckError::Contract {
        step,
        mismatch: Mismatch {
            missing,
            unexpected,
        },
    })
}

fn set_of(b: &DirtyBitmap) -> BTreeSet<(usize, u64)> {
    let mut s = BTreeSet::new();
    for r in 0..b.num_regions() {
        for (w, word) in b.words(r).iter().enumerate() {
            for bit in (0..64).filter(|bit| word & (1 << bit) != 0) {
                s.insert((r, w as u64 * 64 + bit));
            }
        }
    }
    s
}

fn bitmap_of(layout: &MemoryLayout, pages: &BTreeSet<(usize, u64)>) -> DirtyBitmap {
    let mut b = DirtyBitmap::new(layout);
    for &(r, p) in pages {
        b.set(r, p);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{allocate, RegionDesc, PAGE_SIZE};
    use crate::testing::soft::{SoftConfig, SoftTracking, SoftVm};
    use crate::vm::SourceVm;

    fn layout() -> MemoryLayout {
        MemoryLayout::new(vec![
            RegionDesc {
                guest_addr: 0,
                size: 2 << 20,
            },
            RegionDesc {
                guest_addr: 1 << 30,
                size: 4 << 20,
            },
        ])
        .unwrap()
    }

    fn check_soft(tracking: SoftTracking) -> Result<(), TrackerCheckError> {
        let layout = layout();
        let vm =
            SoftVm::with_memory(allocate(&layout).unwrap(), &SoftConfig::idle(), tracking).unwrap();
        let mut t = vm.dirty_tracker().unwrap();
        let window = PageWindow {
            region: 1,
            first: 100,
            pages: 700,
        };
        let base = layout.regions()[1].guest_addr;
        check_dirty_tracker(&mut *t, &layout, window, &mut |run: &PageRun| {
            for p in run.pages() {
                vm.write_as_guest(base + p * PAGE_SIZE + 8, p)
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })
    }

    #[test]
    fn the_soft_tracker_conforms_in_both_modes() {
        check_soft(SoftTracking::Bitmap).unwrap();
        check_soft(SoftTracking::ManualProtect).unwrap();
    }

    /// Runs the check on `t` (a tracker of `vm`) over the first 512 pages
    /// of region 0, the guest writing through `vm`: it must fail at the
    /// second write, every one of that step's 103 pages missing and none
    /// unexpected.
    fn assert_misses_the_second_write(t: &mut dyn DirtyTracker, vm: &SoftVm) {
        let window = PageWindow {
            region: 0,
            first: 0,
            pages: 512,
        };
        let e = check_dirty_tracker(t, vm.layout(), window, &mut |run: &PageRun| {
            for p in run.pages() {
                vm.write_as_guest(p * PAGE_SIZE, p)
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })
        .unwrap_err();
        assert!(
            matches!(
                &e,
                TrackerCheckError::Contract { step: "second write", mismatch }
                    if mismatch.missing.len() == 103 && mismatch.unexpected.is_empty()
            ),
            "{e}"
        );
    }

    /// A tracker that forgets: it reports nothing after the first sync.
    struct Forgetful<'a>(Box<dyn DirtyTracker + 'a>, u32);

    impl DirtyTracker for Forgetful<'_> {
        fn start(&mut self) -> Result<(), VmError> {
            self.0.start()
        }
        fn sync(&mut self, bitmap: &mut DirtyBitmap) -> Result<(), VmError> {
            self.1 += 1;
            if self.1 > 1 {
                let mut scratch = DirtyBitmap::new(&layout());
                return self.0.sync(&mut scratch);
            }
            self.0.sync(bitmap)
        }
        fn rearm_mode(&self) -> Rearm {
            self.0.rearm_mode()
        }
        fn rearm(
            &mut self,
            region: usize,
            first_page: u64,
            npages: u64,
            bitmap: &DirtyBitmap,
        ) -> Result<(), VmError> {
            self.0.rearm(region, first_page, npages, bitmap)
        }
        fn stop(&mut self) -> Result<(), VmError> {
            self.0.stop()
        }
        fn describe(&self) -> String {
            "forgetful".into()
        }
    }

    #[test]
    fn a_tracker_that_loses_writes_fails_the_check() {
        let layout = layout();
        let vm = SoftVm::new(&layout, &SoftConfig::idle()).unwrap();
        let mut t = Forgetful(vm.dirty_tracker().unwrap(), 0);
        assert_misses_the_second_write(&mut t, &vm);
    }

    /// A manual-protect tracker whose `rearm` does not re-arm: pages
    /// written after their chunk was cleared are never reported.
    struct ClearWithoutRearm<'a> {
        inner: Box<dyn DirtyTracker + 'a>,
        cleared: Vec<(usize, u64, u64)>,
    }

    impl DirtyTracker for ClearWithoutRearm<'_> {
        fn start(&mut self) -> Result<(), VmError> {
            self.inner.start()
        }
        fn sync(&mut self, bitmap: &mut DirtyBitmap) -> Result<(), VmError> {
            let mut all = DirtyBitmap::new(&layout());
            self.inner.sync(&mut all)?;
            for &(r, first, n) in &self.cleared {
                for p in first..first + n {
                    all.unset(r, p);
                }
            }
            for r in 0..all.num_regions() {
                bitmap.or_words(r, all.words(r));
            }
            Ok(())
        }
        fn rearm_mode(&self) -> Rearm {
            Rearm::BeforeRead
        }
        fn rearm(
            &mut self,
            region: usize,
            first_page: u64,
            npages: u64,
            bitmap: &DirtyBitmap,
        ) -> Result<(), VmError> {
            self.cleared.push((region, first_page, npages));
            self.inner.rearm(region, first_page, npages, bitmap)
        }
        fn stop(&mut self) -> Result<(), VmError> {
            self.inner.stop()
        }
        fn describe(&self) -> String {
            "clear without re-arm".into()
        }
    }

    #[test]
    fn a_tracker_that_loses_writes_after_a_clear_fails_the_check() {
        let layout = layout();
        let vm = SoftVm::with_memory(
            allocate(&layout).unwrap(),
            &SoftConfig::idle(),
            SoftTracking::ManualProtect,
        )
        .unwrap();
        let mut t = ClearWithoutRearm {
            inner: vm.dirty_tracker().unwrap(),
            cleared: Vec::new(),
        };
        assert_misses_the_second_write(&mut t, &vm);
    }

    /// A manual-protect tracker that rounds each re-arm out to 64-page
    /// blocks without masking: it re-arms pages outside the range asked
    /// for, losing their dirty bits.
    struct OverArming<'a>(Box<dyn DirtyTracker + 'a>);

    impl DirtyTracker for OverArming<'_> {
        fn start(&mut self) -> Result<(), VmError> {
            self.0.start()
        }
        fn sync(&mut self, bitmap: &mut DirtyBitmap) -> Result<(), VmError> {
            self.0.sync(bitmap)
        }
        fn rearm_mode(&self) -> Rearm {
            self.0.rearm_mode()
        }
        fn rearm(
            &mut self,
            region: usize,
            first_page: u64,
            npages: u64,
            bitmap: &DirtyBitmap,
        ) -> Result<(), VmError> {
            let start = first_page / 64 * 64;
            let end = (first_page + npages).div_ceil(64) * 64;
            self.0.rearm(region, start, end - start, bitmap)
        }
        fn stop(&mut self) -> Result<(), VmError> {
            self.0.stop()
        }
        fn describe(&self) -> String {
            "over-arming".into()
        }
    }

    #[test]
    fn a_tracker_that_rearms_outside_the_range_fails_the_check() {
        let layout = layout();
        let vm = SoftVm::with_memory(
            allocate(&layout).unwrap(),
            &SoftConfig::idle(),
            SoftTracking::ManualProtect,
        )
        .unwrap();
        let mut t = OverArming(vm.dirty_tracker().unwrap());
        let window = PageWindow {
            region: 0,
            first: 0,
            pages: 512,
        };
        let e = check_dirty_tracker(&mut t, &layout, window, &mut |run: &PageRun| {
            for p in run.pages() {
                vm.write_as_guest(p * PAGE_SIZE, p)
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })
        .unwrap_err();
        assert!(
            matches!(
                &e,
                TrackerCheckError::Contract { step: "write after a partial re-arm", mismatch }
                    if !mismatch.missing.is_empty() && mismatch.unexpected.is_empty()
            ),
            "{e}"
        );
    }

    #[test]
    fn a_window_outside_the_layout_is_refused() {
        let layout = layout();
        let vm = SoftVm::new(&layout, &SoftConfig::idle()).unwrap();
        let mut t = vm.dirty_tracker().unwrap();
        for window in [
            PageWindow {
                region: 2,
                first: 0,
                pages: 512,
            },
            PageWindow {
                region: 0,
                first: 1,
                pages: 512,
            },
            PageWindow {
                region: 1,
                first: 0,
                pages: 10,
            },
        ] {
            let e = check_dirty_tracker(&mut *t, &layout, window, &mut |_: &PageRun| Ok(()))
                .unwrap_err();
            assert!(matches!(e, TrackerCheckError::Window { .. }), "{e}");
        }
    }
}
