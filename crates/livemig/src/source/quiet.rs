//! The check that the paused VM stayed quiet: after the final dirty sync,
//! nothing may write guest memory on the source, or the destination runs
//! with an older copy of that page. KVM's dirty log sees only the vCPUs'
//! writes, which the pause stopped; a device or VMM thread that
//! [`SourceVm::pause`] did not stop shows in the VMM's own dirty bits
//! ([`GuestMemory::take_vmm_dirty`]). Checked just before `Go`, so a
//! violation fails the migration while the source can still resume.
//!
//! [`GuestMemory::take_vmm_dirty`]: crate::memory::GuestMemory::take_vmm_dirty

use crate::bitmap::DirtyBitmap;
use crate::error::{ErrorKind, MigrationError, Phase};
use crate::vm::SourceVm;

/// Pages the VMM wrote since the final sync: how many, and the first
/// (region, page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LateWrites {
    pub(super) pages: u64,
    pub(super) region: u32,
    pub(super) page: u64,
}

/// The VMM's writes since the last [`take_vmm_dirty`] (the final sync's),
/// over the regions of `layout` (any bitmap of the migration's layout).
///
/// [`take_vmm_dirty`]: crate::memory::GuestMemory::take_vmm_dirty
pub(super) fn late_writes<V: SourceVm + ?Sized>(
    vm: &V,
    layout: &DirtyBitmap,
) -> Option<LateWrites> {
    let mem = vm.memory();
    let mut words = Vec::new();
    let mut late: Option<LateWrites> = None;
    for region in 0..layout.num_regions() {
        words.clear();
        words.resize(layout.region_pages(region).div_ceil(64) as usize, 0);
        mem.take_vmm_dirty(region, &mut words);
        let pages: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        if pages == 0 {
            continue;
        }
        match late.as_mut() {
            Some(l) => l.pages += pages,
            None => {
                let (i, w) = words.iter().enumerate().find(|(_, w)| **w != 0)?;
                late = Some(LateWrites {
                    pages,
                    region: region as u32,
                    page: i as u64 * 64 + u64::from(w.trailing_zeros()),
                });
            }
        }
    }
    late
}

/// Fails, in the completion phase (before `Go`), when the VMM wrote guest
/// memory after the final sync.
pub(super) fn check<V: SourceVm + ?Sized>(
    vm: &V,
    layout: &DirtyBitmap,
) -> Result<(), MigrationError> {
    match late_writes(vm, layout) {
        None => Ok(()),
        Some(l) => Err(MigrationError::new(
            Phase::Completion,
            ErrorKind::WrittenWhilePaused {
                pages: l.pages,
                region: l.region,
                page: l.page,
            },
        )),
    }
}
