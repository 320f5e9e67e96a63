//! Rounds that end once the destination has *read* them (when the
//! destination granted the read count: `ReadQuery` → `ReadCount`).
//!
//! The source's send queue (`SIOCOUTQ`) shows what the destination's
//! kernel has not acknowledged; the kernel acknowledges what it takes into
//! its receive buffer, which can hold megabytes the destination's engine
//! has not read yet. A round that ended on the send queue alone could
//! leave those megabytes ahead of the final copy and the state
//! (docs/benchmarks.md, "Session of 2026-12-03 (6)"). With the read count
//! the source asks, after the round, how many bytes the destination's
//! engine has read on every connection, until all but
//! [`DRAIN_BYTES`] of what the source wrote are read or the round's wait
//! (the keepalive interval) is over.
//!
//! Every wait is bounded: a question whose answer did not come in time is
//! remembered, and its answer, when it comes, is read and dropped (here,
//! by the probe's reads or before `Ready`). An answer to no question is a
//! protocol error.

use std::time::{Duration, Instant};

use super::cancel::CancelToken;
use crate::control::{unexpected, ControlReader, ControlWriter};
use crate::error::{ErrorKind, MigrationError, PeerError, Phase};
use crate::policy::DRAIN_BYTES;
use crate::protocol::{Frame, Message, MsgKind, ReadCount, ReadQuery};

/// Between two questions while the destination is still reading (with
/// page streams, the control connection's answer can come before the
/// streams are read).
const ASK_EVERY: Duration = Duration::from_micros(500);

/// What a frame read while waiting for something else was to the read
/// count: its late answer (consumed), or not its business.
pub(super) type LateFrames<'a> = &'a mut dyn FnMut(&Frame<'_>) -> Result<bool, MigrationError>;

/// The source's half of the read count.
#[derive(Debug, Default)]
pub(super) struct ReadCounter {
    next_id: u32,
    /// Questions whose answer did not come in time.
    late: Vec<u32>,
    /// The largest count the destination answered so far.
    read: u64,
}

impl ReadCounter {
    /// A counter that asked nothing yet.
    pub(super) fn new() -> Self {
        Self::default()
    }

    /// Asks until the destination has read all but [`DRAIN_BYTES`] of the
    /// `written` bytes the source wrote on every connection, `until`
    /// passes or `cancel` fires. Returns what it had not read by its
    /// latest answer: `written` minus the largest count it answered so
    /// far (late answers included), so that without an answer in time
    /// everything since is counted as not read. `other` consumes the late
    /// answers of other questions (the switchover probe's).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn wait(
        &mut self,
        fw: &mut ControlWriter,
        control: &mut ControlReader,
        written: u64,
        until: Instant,
        cancel: &CancelToken,
        phase: Phase,
        other: LateFrames<'_>,
    ) -> Result<u64, MigrationError> {
        let restore = control.timeout();
        let r = self.ask_until_read(fw, control, written, until, cancel, phase, other);
        control
            .set_timeout(restore)
            .map_err(|e| MigrationError::new(phase, e))?;
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn ask_until_read(
        &mut self,
        fw: &mut ControlWriter,
        control: &mut ControlReader,
        written: u64,
        until: Instant,
        cancel: &CancelToken,
        phase: Phase,
        other: LateFrames<'_>,
    ) -> Result<u64, MigrationError> {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            crate::control::send(fw, &ReadQuery { id }, phase)?;
            if !self.answer(control, id, until, phase, other)? {
                self.late.push(id);
                log::info!("read count {id}: no answer in time");
                return Ok(self.unread(written));
            }
            let unread = self.unread(written);
            if unread <= DRAIN_BYTES || cancel.is_cancelled() || Instant::now() >= until {
                return Ok(unread);
            }
            std::thread::sleep(ASK_EVERY.min(until.saturating_duration_since(Instant::now())));
        }
    }

    /// `written` minus the largest count answered.
    fn unread(&self, written: u64) -> u64 {
        written.saturating_sub(self.read)
    }

    /// Reads until the answer to `id` (`true`) or `until` (`false`).
    fn answer(
        &mut self,
        control: &mut ControlReader,
        id: u32,
        until: Instant,
        phase: Phase,
        other: LateFrames<'_>,
    ) -> Result<bool, MigrationError> {
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            control
                .set_timeout(left)
                .map_err(|e| MigrationError::new(phase, e))?;
            let f = match control.next(phase, "ReadCount") {
                Ok(f) => f,
                // A timed-out read keeps the partial frame: the deadline
                // above decides.
                Err(MigrationError {
                    kind: ErrorKind::Timeout { .. },
                    ..
                }) => continue,
                Err(e) => return Err(e),
            };
            match f.kind {
                MsgKind::ReadCount => {
                    let r =
                        ReadCount::decode(f.payload).map_err(|e| MigrationError::new(phase, e))?;
                    if r.id == id {
                        self.read = self.read.max(r.bytes);
                        return Ok(true);
                    }
                    self.take(&r, id, phase)?;
                }
                MsgKind::Keepalive => {}
                kind => {
                    if !other(&f)? {
                        return Err(unexpected(kind, "ReadCount", phase));
                    }
                }
            }
        }
    }

    /// `r` answers a question given up on (no longer waited for; its
    /// count still counts); otherwise a protocol error (`want` is the
    /// question waiting, `u32::MAX` for none).
    fn take(&mut self, r: &ReadCount, want: u32, phase: Phase) -> Result<(), MigrationError> {
        match self.late.iter().position(|l| *l == r.id) {
            Some(i) => {
                self.late.remove(i);
                self.read = self.read.max(r.bytes);
                Ok(())
            }
            None => {
                let e = PeerError::ReadCount { id: r.id, want };
                Err(MigrationError::new(phase, e))
            }
        }
    }

    /// Whether `f`, read while waiting for something else, is the late
    /// answer to a question given up on (then it is consumed); a
    /// `ReadCount` that answers no question is a protocol error.
    pub(super) fn take_late(
        &mut self,
        f: &Frame<'_>,
        phase: Phase,
    ) -> Result<bool, MigrationError> {
        if f.kind != MsgKind::ReadCount {
            return Ok(false);
        }
        let r = ReadCount::decode(f.payload).map_err(|e| MigrationError::new(phase, e))?;
        self.take(&r, u32::MAX, phase)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control;
    use crate::protocol::FrameWriter;
    use crate::transport::{mem, Transport};

    type DestEnds = (
        FrameWriter<Box<dyn Transport>>,
        crate::protocol::FrameReader<Box<dyn Transport>>,
    );

    /// A source's control connection and the destination's ends of it.
    fn pair() -> (ControlWriter, ControlReader, DestEnds) {
        let (a, b) = mem::pair();
        let (r, w) = control::open(Box::new(a), Duration::from_secs(5)).unwrap();
        let b: Box<dyn Transport> = Box::new(b);
        let dr = crate::protocol::FrameReader::new(b.try_clone().unwrap());
        (w, r, (FrameWriter::new(b), dr))
    }

    fn none(_: &Frame<'_>) -> Result<bool, MigrationError> {
        Ok(false)
    }

    #[test]
    fn asks_again_until_the_destination_has_read_what_was_written() {
        let (mut fw, mut cr, (mut dw, mut dr)) = pair();
        // The destination answers 1 MB, then 2 MB, then everything.
        let dest = std::thread::spawn(move || {
            for bytes in [1_000_000, 2_000_000, 5_000_000] {
                let f = dr.read_frame().unwrap();
                let q = ReadQuery::decode(f.payload).unwrap();
                dw.send(&ReadCount { id: q.id, bytes }).unwrap();
                dw.flush().unwrap();
            }
        });
        let mut rc = ReadCounter::new();
        let until = Instant::now() + Duration::from_secs(5);
        let c = CancelToken::new();
        let unread = rc
            .wait(
                &mut fw,
                &mut cr,
                5_000_000,
                until,
                &c,
                Phase::Precopy(0),
                &mut none,
            )
            .unwrap();
        assert_eq!(unread, 0);
        assert_eq!(rc.next_id, 3, "three questions");
        dest.join().unwrap();
    }

    #[test]
    fn a_late_answer_is_remembered_counted_and_dropped_later() {
        let (mut fw, mut cr, (mut dw, mut dr)) = pair();
        let mut rc = ReadCounter::new();
        let c = CancelToken::new();
        // No answer within 20 ms: everything written counts as not read.
        let until = Instant::now() + Duration::from_millis(20);
        let unread = rc
            .wait(
                &mut fw,
                &mut cr,
                4096,
                until,
                &c,
                Phase::Precopy(0),
                &mut none,
            )
            .unwrap();
        assert_eq!(unread, 4096);
        assert_eq!(rc.late, [0]);
        // The late answer, then the next question's.
        let f = dr.read_frame().unwrap();
        assert_eq!(ReadQuery::decode(f.payload).unwrap().id, 0);
        dw.send(&ReadCount { id: 0, bytes: 4000 }).unwrap();
        dw.flush().unwrap();
        let dest = std::thread::spawn(move || {
            let f = dr.read_frame().unwrap();
            let q = ReadQuery::decode(f.payload).unwrap();
            dw.send(&ReadCount {
                id: q.id,
                bytes: 9000,
            })
            .unwrap();
            dw.flush().unwrap();
            (dw, dr)
        });
        let until = Instant::now() + Duration::from_secs(5);
        let unread = rc
            .wait(
                &mut fw,
                &mut cr,
                9000,
                until,
                &c,
                Phase::Precopy(1),
                &mut none,
            )
            .unwrap();
        assert_eq!(unread, 0);
        assert!(rc.late.is_empty());
        // The late answer's count counted (4000 of 4096, then 9000 of 9000).
        assert_eq!(rc.read, 9000);
        let (mut dw, _dr) = dest.join().unwrap();
        // An answer to no question: refused.
        dw.send(&ReadCount { id: 77, bytes: 1 }).unwrap();
        dw.flush().unwrap();
        let f = cr.next(Phase::Completion, "Ready").unwrap();
        let e = rc.take_late(&f, Phase::Completion).unwrap_err();
        assert!(
            matches!(e.kind, ErrorKind::Peer(PeerError::ReadCount { id: 77, .. })),
            "{e}"
        );
    }

    #[test]
    fn other_frames_go_to_their_owner_or_are_refused() {
        let (mut fw, mut cr, (mut dw, mut dr)) = pair();
        let dest = std::thread::spawn(move || {
            let f = dr.read_frame().unwrap();
            let q = ReadQuery::decode(f.payload).unwrap();
            // A late probe answer first (the probe's business), then ours.
            dw.send(&crate::protocol::ProbeReply { id: 0, pad: 0 })
                .unwrap();
            dw.send(&ReadCount {
                id: q.id,
                bytes: 10,
            })
            .unwrap();
            dw.flush().unwrap();
            let f = dr.read_frame().unwrap();
            let _ = ReadQuery::decode(f.payload).unwrap();
            dw.send(&crate::protocol::Go).unwrap();
            dw.flush().unwrap();
        });
        let mut rc = ReadCounter::new();
        let c = CancelToken::new();
        let until = Instant::now() + Duration::from_secs(5);
        let mut probes = 0;
        let mut probe = |f: &Frame<'_>| -> Result<bool, MigrationError> {
            probes += 1;
            Ok(f.kind == MsgKind::ProbeReply)
        };
        let unread = rc
            .wait(
                &mut fw,
                &mut cr,
                10,
                until,
                &c,
                Phase::Precopy(0),
                &mut probe,
            )
            .unwrap();
        assert_eq!((unread, probes), (0, 1));
        let e = rc
            .wait(
                &mut fw,
                &mut cr,
                20,
                until,
                &c,
                Phase::Precopy(1),
                &mut none,
            )
            .unwrap_err();
        assert!(e.to_string().contains("Go"), "{e}");
        dest.join().unwrap();
    }
}
