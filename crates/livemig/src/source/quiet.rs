//! The check that the paused VM stayed quiet: after the final dirty sync,
//! nothing may write guest memory on the source, or the destination runs
//! with an older copy of that page. KVM's dirty log sees only the vCPUs'
//! writes, which the pause stopped; a device or VMM thread that
//! [`SourceVm::pause`] did not stop shows in the VMM's own dirty bits
//! ([`GuestMemory::take_vmm_dirty`]). Checked just before `Go`, so a
//! violation fails the migration while the source can still resume.
//!
//! [`GuestMemory::take_vmm_dirty`]: crate::memory::GuestMemory::take_vmm_dirty

use super::rounds::take_vmm_writes;
use crate::bitmap::DirtyBitmap;
use crate::error::{ErrorKind, MigrationError, Phase};
use crate::vm::SourceVm;

/// Fails, in the completion phase (before `Go`), when the VMM wrote guest
/// memory since the final sync's take, over the regions of `layout` (any
/// bitmap of the migration's layout); the error names how many pages and
/// the first one.
pub(super) fn check<V: SourceVm + ?Sized>(
    vm: &V,
    layout: &DirtyBitmap,
) -> Result<(), MigrationError> {
    let mut pages = 0u64;
    let mut first: Option<(u32, u64)> = None;
    take_vmm_writes(vm, layout.num_regions(), |region, word, bits| {
        pages += u64::from(bits.count_ones());
        let page = word as u64 * 64 + u64::from(bits.trailing_zeros());
        first.get_or_insert((region as u32, page));
    });
    match first {
        None => Ok(()),
        Some((region, page)) => Err(MigrationError::new(
            Phase::Completion,
            ErrorKind::WrittenWhilePaused {
                pages,
                region,
                page,
            },
        )),
    }
}
