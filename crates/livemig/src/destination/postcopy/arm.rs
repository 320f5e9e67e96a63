//! Arming the installer: on `PostcopyPrepare` while the source still runs
//! the guest (then the `PostcopySwitch` only adds the pages dirtied since),
//! or, with a source that does not prepare, on `PostcopySwitch` inside the
//! downtime.

use std::time::Instant;

use super::{PostcopyError, PostcopyMemory};
use crate::bitmap::DirtyBitmap;
use crate::control::{self, ControlWriter};
use crate::error::{ErrorKind, MigrationError, Phase};
use crate::memory::MemoryLayout;
use crate::protocol::{PageRun, PostcopyArmed, PostcopyPrepare, PostcopySwitch};
use crate::vm::VmError;

/// The installer, armed: the pages it makes missing (the discard set) and
/// what arming cost.
pub(super) struct Armed {
    pub(super) pager: Box<dyn PostcopyMemory>,
    /// Every page the source will send again.
    pub(super) discard: DirtyBitmap,
    /// [`PostcopyMemory::arm`], ms.
    pub(super) arm_ms: f64,
    /// Armed on `PostcopyPrepare`, before the source paused.
    pub(super) prepared: bool,
    /// Pages the `PostcopySwitch` added after a prepare, and how long
    /// dropping them took (ms; inside the downtime).
    pub(super) late_pages: u64,
    pub(super) late_ms: f64,
}

pub(super) fn vm_error(e: PostcopyError) -> VmError {
    VmError::failed(crate::vm::VmOp::Resume, "post-copy memory", e)
}

/// The installer for `vm`, armed with `discard`; how long arming took.
fn build_and_arm<V, P>(
    vm: &V,
    layout: &MemoryLayout,
    discard: &DirtyBitmap,
    pager: P,
    phase: Phase,
) -> Result<(Box<dyn PostcopyMemory>, f64), MigrationError>
where
    P: FnOnce(&V, &MemoryLayout) -> Result<Box<dyn PostcopyMemory>, VmError>,
{
    let pager = pager(vm, layout).map_err(|e| MigrationError::new(phase, e))?;
    let armed = Instant::now();
    pager
        .arm(discard)
        .map_err(|e| MigrationError::new(phase, vm_error(e)))?;
    Ok((pager, crate::destination::ms(armed.elapsed())))
}

/// `PostcopyPrepare` (the source still runs the guest and waits): builds
/// the installer for `vm`, arms it with the pages the source has not sent,
/// and answers `PostcopyArmed`.
pub(super) fn prepare<V, P>(
    fw: &mut ControlWriter,
    vm: &V,
    layout: &MemoryLayout,
    prep: &PostcopyPrepare,
    pager: P,
) -> Result<Armed, MigrationError>
where
    P: FnOnce(&V, &MemoryLayout) -> Result<Box<dyn PostcopyMemory>, VmError>,
{
    let fm = Phase::FinalMemory;
    let discard = runs_bitmap(layout, &prep.discard);
    let (pager, arm_ms) = build_and_arm(vm, layout, &discard, pager, fm)?;
    let arm_us = (arm_ms * 1000.0) as u64;
    control::send(fw, &PostcopyArmed { arm_us }, fm)?;
    Ok(Armed {
        pager,
        discard,
        arm_ms,
        prepared: true,
        late_pages: 0,
        late_ms: 0.0,
    })
}

/// `PostcopySwitch` after a prepare (the source is paused): the pages it
/// names that are not missing yet are dropped too; the discard set is the
/// union.
pub(super) fn late_discard(
    mut armed: Armed,
    layout: &MemoryLayout,
    switch: &PostcopySwitch,
) -> Result<Armed, MigrationError> {
    let mut late = runs_bitmap(layout, &switch.discard);
    late.and_not(&armed.discard);
    let t = Instant::now();
    armed
        .pager
        .discard(&late)
        .map_err(|e| MigrationError::new(Phase::FinalMemory, vm_error(e)))?;
    armed.late_ms = crate::destination::ms(t.elapsed());
    armed.late_pages = late.count();
    for region in 0..late.num_regions() {
        armed.discard.or_words(region, late.words(region));
    }
    Ok(armed)
}

/// `PostcopySwitch` without a prepare (refused unless post-copy was
/// granted): builds the installer for `vm` and arms every page the source
/// has not sent, inside the downtime.
pub(super) fn arm<V, P>(
    granted: bool,
    vm: &V,
    layout: &MemoryLayout,
    switch: &PostcopySwitch,
    pager: P,
) -> Result<Armed, MigrationError>
where
    P: FnOnce(&V, &MemoryLayout) -> Result<Box<dyn PostcopyMemory>, VmError>,
{
    let fm = Phase::FinalMemory;
    if !granted {
        let e = ErrorKind::Unexpected {
            got: "PostcopySwitch".into(),
            expected: "Pages, RoundEnd, State or Complete (post-copy was not granted)",
        };
        return Err(MigrationError::new(fm, e));
    }
    let discard = runs_bitmap(layout, &switch.discard);
    let (pager, arm_ms) = build_and_arm(vm, layout, &discard, pager, fm)?;
    Ok(Armed {
        pager,
        discard,
        arm_ms,
        prepared: false,
        late_pages: 0,
        late_ms: 0.0,
    })
}

/// Runs as a bitmap (they were checked against the layout when their frame
/// arrived).
fn runs_bitmap(layout: &MemoryLayout, runs: &[PageRun]) -> DirtyBitmap {
    let mut b = DirtyBitmap::new(layout);
    for r in runs {
        b.set_range(r.region as usize, r.first_page, r.npages);
    }
    b
}
