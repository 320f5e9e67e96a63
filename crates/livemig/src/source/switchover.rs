//! The switchover: stop-and-copy ([`Converged::stop_and_copy`] → [`Paused`])
//! and the commit point ([`Paused::commit`] → [`Committed`], or the
//! ambiguous outcome).

use std::time::Instant;

use super::cancel::CancelToken;
use super::precopy::{Converged, PrecopySummary};
use super::probe::Prober;
use super::read_count::ReadCounter;
use super::rounds::merge_vmm_writes;
use super::session::{Session, Tracking};
use crate::bitmap::DirtyBitmap;
use crate::commit::{commit, Commit};
use crate::control::{unexpected, ControlReader, ControlWriter};
use crate::deadline::PauseDeadline;
use crate::error::{ErrorKind, MigrationError, Phase};
use crate::protocol::{Go, Message, MsgKind, Ready, Resumed, StateFrames, MAX_FRAME_PAYLOAD};
use crate::report::Progress;
use crate::state::Section;
use crate::vm::SourceVm;

/// When each step of the stop-and-copy ended (in this order).
pub(super) struct SwitchTimes {
    /// Before the VM was paused.
    pub(super) pause: Instant,
    pub(super) paused: Instant,
    pub(super) saved: Instant,
    pub(super) synced: Instant,
    pub(super) mem: Instant,
    pub(super) ready: Instant,
}

/// What the stop-and-copy sent, for the report.
pub(super) struct Copied {
    /// Pages sent while paused (data and zero).
    pub(super) final_pages: u64,
    /// Of the final copy, the time spent in LZ4 (summed over the page
    /// streams).
    pub(super) final_lz4: std::time::Duration,
    /// Bytes of the state sections' data.
    pub(super) state_bytes: u64,
    /// `State` frames the state took.
    pub(super) state_frames: u32,
}

/// The VM is paused, everything is sent and the destination is `Ready`.
/// Only [`Paused::commit`] goes on from here.
pub(super) struct Paused {
    deadline: PauseDeadline,
    /// Pre-copy's measurements.
    pub(super) summary: PrecopySummary,
    pub(super) times: SwitchTimes,
    pub(super) copied: Copied,
    /// The destination's `Ready` (its restore time).
    pub(super) ready: Ready,
}

/// The destination runs the guest.
pub(super) struct Committed {
    /// Everything up to `Go`.
    pub(super) paused: Paused,
    /// The destination's answer (its resume time).
    pub(super) resumed: Resumed,
    /// When it arrived.
    pub(super) done: Instant,
}

/// Why the source did not commit.
pub(super) enum NotCommitted {
    /// Before `Go`, or the destination answered `Abandoned`: the source
    /// keeps the guest and runs it again.
    Kept(MigrationError),
    /// After `Go`, no confirmation: the guest may be running on the
    /// destination, so the source stays paused.
    Ambiguous(MigrationError),
}

impl From<MigrationError> for NotCommitted {
    fn from(e: MigrationError) -> Self {
        NotCommitted::Kept(e)
    }
}

impl Converged {
    /// Pauses the VM and sends what is left: from the pause to `Go` the
    /// guest runs nowhere, bounded by `max_pause` (an error after the
    /// deadline fired says so).
    pub(super) fn stop_and_copy<V: SourceVm + ?Sized>(
        self,
        s: &mut Session<'_, V>,
        t: &mut Tracking<'_>,
    ) -> Result<Paused, MigrationError> {
        let pause = Instant::now();
        s.vm.pause()
            .map_err(|e| MigrationError::new(Phase::FinalMemory, e))?;
        let links = t.links.iter().filter_map(|l| l.try_clone().ok()).collect();
        let deadline = PauseDeadline::arm(s.config.max_pause, links);
        match copy(s, t, self.bitmap, pause) {
            Ok((times, copied, ready)) => Ok(Paused {
                deadline,
                summary: self.summary,
                times,
                copied,
                ready,
            }),
            Err(e) if deadline.expired() => Err(deadline_error(&deadline, e.phase)),
            Err(e) => Err(e),
        }
    }
}

/// The paused part before the commit point, in this order: save the state,
/// the final dirty sync (the hypervisor's log and the VMM's bitmap, so it
/// includes what the save itself wrote), the last dirty pages, the state
/// frames, `Complete`, and the destination's `Ready`.
fn copy<V: SourceVm + ?Sized>(
    s: &mut Session<'_, V>,
    t: &mut Tracking<'_>,
    mut bitmap: DirtyBitmap,
    pause: Instant,
) -> Result<(SwitchTimes, Copied, Ready), MigrationError> {
    let fm = Phase::FinalMemory;
    let paused = Instant::now();
    // Save the state first: a device whose save writes guest memory
    // through the VMM's tracked path (vm-memory) does so now, and the final
    // sync below picks that page up with the rest (saved after the final
    // pages, such a write was lost).
    let sections =
        s.vm.save_state()
            .map_err(|e| MigrationError::new(Phase::State, e))?;
    let saved = Instant::now();
    t.tracker
        .sync(&mut bitmap)
        .map_err(|e| MigrationError::new(fm, e))?;
    merge_vmm_writes(s.vm, &mut bitmap);
    let synced = Instant::now();
    (s.progress)(&Progress::Paused {
        remaining_pages: bitmap.count(),
    });
    let (final_pages, final_lz4) = if super::postcopy::switched(s) {
        (super::postcopy::switch(s, t, &bitmap)?, Default::default())
    } else {
        final_memory(t, &bitmap)?
    };
    let mem = Instant::now();
    let (state_bytes, state_frames) = send_state(&mut t.sender.fw, sections)?;
    let ready = recv_ready(
        &mut t.control,
        t.prober.as_mut(),
        t.reads.as_mut(),
        Phase::Completion,
    )?;
    // The last moment before `Go`: a write since the final sync would be
    // missing on the destination.
    super::quiet::check(s.vm, &bitmap)?;
    let times = SwitchTimes {
        pause,
        paused,
        saved,
        synced,
        mem,
        ready: Instant::now(),
    };
    let copied = Copied {
        final_pages,
        final_lz4,
        state_bytes,
        state_frames,
    };
    Ok((times, copied, ready))
}

/// `Ready`, after the late answers still on their way (the probe's and
/// the read count's: the destination answers each question when it reads
/// it, before the `Complete` sent after it).
pub(super) fn recv_ready(
    control: &mut ControlReader,
    mut prober: Option<&mut Prober>,
    mut reads: Option<&mut ReadCounter>,
    phase: Phase,
) -> Result<Ready, MigrationError> {
    loop {
        let f = control.next(phase, "Ready")?;
        if f.kind == MsgKind::Ready {
            return Ready::decode(f.payload).map_err(|e| MigrationError::new(phase, e));
        }
        let late = match (f.kind, prober.as_deref_mut(), reads.as_deref_mut()) {
            (MsgKind::ProbeReply, Some(p), _) => p.take_late_frame(&f, phase)?,
            (MsgKind::ReadCount, _, Some(r)) => r.take_late(&f, phase)?,
            _ => false,
        };
        if !late {
            return Err(unexpected(f.kind, "Ready", phase));
        }
    }
}

/// Sends the last dirty pages; every stream ends with `Complete`. Returns
/// the pages sent (data and zero) and the time spent in LZ4.
fn final_memory(
    t: &mut Tracking<'_>,
    bitmap: &DirtyBitmap,
) -> Result<(u64, std::time::Duration), MigrationError> {
    let fm = Phase::FinalMemory;
    let sender = &mut t.sender;
    let before = sender.counts;
    // The bandwidth cap protects the guest's network while it runs; while
    // it is paused every millisecond is downtime (QEMU lifts its limit at
    // completion too).
    sender.pacer.lift();
    // Nor does LZ4 measure any more (its samples serve later decisions;
    // there are none): it compresses only if it is on.
    sender.lz4_on.stop_sampling();
    // Paused: no need to re-arm the log, nothing is writing.
    sender.send_bitmap(bitmap, None, &CancelToken::new(), fm)?;
    // One barrier: every stream flushes and ends with `Complete`.
    sender.end_round(fm, true)?;
    let c = sender.counts.since(&before);
    Ok((c.pages + c.zero, std::time::Duration::from_nanos(c.lz4_ns)))
}

/// Sends the state frames and `Complete` on `fw` (the control connection);
/// returns the sections' data bytes and the number of frames. The
/// sections' data is written as it is ([`StateFrames`]), not copied into
/// an encoded frame first. The local hand-over sends its state with this
/// too.
pub(super) fn send_state(
    fw: &mut ControlWriter,
    sections: Vec<Section>,
) -> Result<(u64, u32), MigrationError> {
    let st = Phase::State;
    let frames =
        StateFrames::new(sections, MAX_FRAME_PAYLOAD).map_err(|e| MigrationError::new(st, e))?;
    frames
        .write(fw)
        .and_then(|_| fw.write_frame(MsgKind::Complete, &[]))
        .and_then(|_| fw.flush())
        .map_err(|e| MigrationError::new(st, e))?;
    Ok((frames.data_bytes(), frames.len() as u32))
}

impl Paused {
    /// The commit point: sends `Go` ([`crate::commit::commit`], the only
    /// function that can make the outcome ambiguous) unless the migration
    /// was cancelled or the pause deadline fired first. From `Go` on only
    /// the destination's `Abandoned` lets the source run the guest again.
    pub(super) fn commit<V: SourceVm + ?Sized>(
        self,
        s: &Session<'_, V>,
        t: &mut Tracking<'_>,
    ) -> Result<Committed, NotCommitted> {
        let cp = Phase::Completion;
        if s.cancel.is_cancelled() {
            return Err(MigrationError::new(cp, ErrorKind::Cancelled).into());
        }
        if !self.deadline.disarm() {
            return Err(deadline_error(&self.deadline, cp).into());
        }
        let answer_wait = s.config.io_timeout.saturating_mul(2);
        match commit(&mut t.sender.fw, &mut t.control, &Go, answer_wait) {
            Commit::Committed(resumed) => Ok(Committed {
                paused: self,
                resumed,
                done: Instant::now(),
            }),
            Commit::Abandoned(why) => {
                Err(MigrationError::new(cp, ErrorKind::Abandoned(why)).into())
            }
            Commit::Ambiguous(why) => Err(NotCommitted::Ambiguous(MigrationError::new(
                cp,
                ErrorKind::Ambiguous(why),
            ))),
        }
    }
}

/// The pause outlasted `max_pause`.
fn deadline_error(deadline: &PauseDeadline, phase: Phase) -> MigrationError {
    let kind = ErrorKind::PauseDeadline {
        limit: deadline.limit(),
        paused: deadline.paused_for(),
    };
    MigrationError::new(phase, kind)
}
