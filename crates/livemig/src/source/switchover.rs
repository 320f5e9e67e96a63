//! Stop-and-copy: the paused part before the commit point.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{cancel::CancelToken, expect, rounds::merge_vmm_writes, sender::PageSender};
use crate::bitmap::DirtyBitmap;
use crate::error::{MigrationError, Phase};
use crate::policy::MigrationConfig;
use crate::protocol::{state_frames, FrameReader, Message, MsgKind, Ready, MAX_FRAME_PAYLOAD};
use crate::report::{Progress, Report};
use crate::transport::Transport;
use crate::vm::{DirtyTracker, SourceVm};

/// When each step of the stop-and-copy ended (in this order).
pub(super) struct SwitchTimes {
    pub(super) paused: Instant,
    pub(super) saved: Instant,
    pub(super) synced: Instant,
    pub(super) mem: Instant,
    pub(super) ready: Instant,
}

/// The paused part before the commit point, in this order: save the state,
/// the final dirty sync (the hypervisor's log and the VMM's bitmap, so it
/// includes what the save itself wrote), the last dirty pages, the state
/// frames, `Complete`, and the destination's `Ready`. The VM is paused.
#[allow(clippy::too_many_arguments)]
pub(super) fn stop_and_copy<V: SourceVm + ?Sized>(
    vm: &V,
    tracker: &mut (dyn DirtyTracker + '_),
    sender: &mut PageSender<'_>,
    fr: &mut FrameReader<Box<dyn Transport>>,
    config: &MigrationConfig,
    progress: &mut dyn FnMut(&Progress),
    report: &mut Report,
    mut bitmap: DirtyBitmap,
) -> Result<(SwitchTimes, Ready), MigrationError> {
    let fm = Phase::FinalMemory;
    let st = Phase::State;
    let paused = Instant::now();
    // Save the state first: a device whose save writes guest memory
    // through the VMM's tracked path (vm-memory) does so now, and the final
    // sync below picks that page up with the rest (saved after the final
    // pages, such a write was lost).
    let sections = vm.save_state().map_err(|e| MigrationError::new(st, e))?;
    let saved = Instant::now();
    tracker
        .sync(&mut bitmap)
        .map_err(|e| MigrationError::new(fm, e))?;
    merge_vmm_writes(vm, &mut bitmap);
    let synced = Instant::now();
    progress(&Progress::Paused {
        remaining_pages: bitmap.count(),
    });
    let before = sender.counts;
    // The bandwidth cap protects the guest's network while it runs; while
    // it is paused every millisecond is downtime (QEMU lifts its limit at
    // completion too).
    sender.pacer.lifted.store(true, Ordering::SeqCst);
    // Paused: no need to re-arm the log, nothing is writing.
    sender.send_bitmap(&bitmap, None, &CancelToken::new(), fm)?;
    // One barrier: every stream flushes and ends with `Complete`.
    sender.end_round(fm, true)?;
    report.final_pages = sender.counts.pages - before.pages + sender.counts.zero - before.zero;
    let mem = Instant::now();

    report.state_bytes = sections.iter().map(|s| s.data.len() as u64).sum();
    let frames =
        state_frames(sections, MAX_FRAME_PAYLOAD).map_err(|e| MigrationError::new(st, e))?;
    report.state_frames = frames.len() as u32;
    let fw = &mut sender.fw;
    for state in &frames {
        fw.send(state).map_err(|e| MigrationError::new(st, e))?;
    }
    fw.write_frame(MsgKind::Complete, &[])
        .map_err(|e| MigrationError::new(st, e))?;
    fw.flush().map_err(|e| MigrationError::new(st, e))?;
    let ready = Ready::decode(&expect(
        fr,
        MsgKind::Ready,
        Phase::Completion,
        config.io_timeout,
    )?)
    .map_err(|e| MigrationError::new(Phase::Completion, e))?;
    let times = SwitchTimes {
        paused,
        synced,
        mem,
        saved,
        ready: Instant::now(),
    };
    Ok((times, ready))
}
