//! Preparing the switch to post-copy while the guest still runs here
//! (`PostcopyPrepare` → `PostcopyArmed`), so that the destination's
//! expensive arming (dropping the pages still to come, registering its
//! memory with the installer) happens before the pause, not inside the
//! downtime. The switch itself then only names the pages dirtied since.

use std::time::Instant;

use super::super::rounds::merge_vmm_writes;
use super::super::session::{ms, Session, Tracking};
use crate::bitmap::DirtyBitmap;
use crate::error::{MigrationError, Phase};
use crate::protocol::{PageRun, PostcopyArmed, PostcopyPrepare};
use crate::vm::SourceVm;

/// A prepare the destination acknowledged.
#[derive(Debug, Clone)]
pub(super) struct Prepared {
    /// The pages the destination dropped before the pause.
    pub(super) set: DirtyBitmap,
    /// From sending `PostcopyPrepare` to `PostcopyArmed`, ms (the guest
    /// ran here meanwhile).
    pub(super) prepare_ms: f64,
    /// The destination's arming, µs (its `PostcopyArmed`).
    pub(super) arm_us: u64,
}

/// Before the pause, with the guest running: one more dirty sync into
/// `bitmap` (the pages the destination does not have: dirtied since sent,
/// or never sent), `PostcopyPrepare` with them, and the destination's
/// `PostcopyArmed`. No page is sent after this: the stop-and-copy's final
/// sync adds to `bitmap` what the guest dirties meanwhile, and the switch
/// names only those (see [`late_runs`]).
pub(super) fn prepare<V: SourceVm + ?Sized>(
    s: &Session<'_, V>,
    t: &mut Tracking<'_>,
    bitmap: &mut DirtyBitmap,
) -> Result<Prepared, MigrationError> {
    let fm = Phase::FinalMemory;
    t.tracker
        .sync(bitmap)
        .map_err(|e| MigrationError::new(fm, e))?;
    merge_vmm_writes(s.vm, bitmap);
    let started = Instant::now();
    let fw = &mut t.sender.fw;
    let prep = PostcopyPrepare {
        discard: runs_of(bitmap),
    };
    fw.send(&prep)
        .and_then(|_| fw.flush())
        .map_err(|e| MigrationError::new(fm, e))?;
    let armed: PostcopyArmed = t.control.recv(fm)?;
    let prepared = Prepared {
        set: bitmap.clone(),
        prepare_ms: ms(started.elapsed()),
        arm_us: armed.arm_us,
    };
    log::info!(
        "post-copy prepared: the destination dropped {} page(s) and armed in {:.1} ms \
         ({:.1} ms round trip) while the guest ran here",
        prepared.set.count(),
        armed.arm_us as f64 / 1000.0,
        prepared.prepare_ms
    );
    Ok(prepared)
}

/// The runs of `final_set` the destination has not dropped at the prepare
/// (the pages dirtied between the prepare's sync and the pause), and how
/// many pages they hold.
pub(super) fn late_runs(final_set: &DirtyBitmap, prepared: &Prepared) -> (Vec<PageRun>, u64) {
    let mut late = final_set.clone();
    late.and_not(&prepared.set);
    (runs_of(&late), late.count())
}

/// Every run of set pages, in (region, page) order.
pub(super) fn runs_of(bitmap: &DirtyBitmap) -> Vec<PageRun> {
    let mut runs = Vec::new();
    for region in 0..bitmap.num_regions() {
        let end = bitmap.region_pages(region);
        for r in bitmap.runs_in(region, 0, end, u64::MAX) {
            runs.push(PageRun {
                region: region as u32,
                first_page: r.first_page,
                npages: r.npages,
            });
        }
    }
    runs
}
