//! The switchover probe (when the destination granted it): after each
//! pre-copy round the source times the control connection's hop through
//! both engines — `Probe` → `ProbeReply`, which the destination's control
//! reader answers as it will answer `Go` with `Resumed` — and a burst of
//! as many bytes as the state, so that the expected downtime counts what
//! the switchover's messages really cost ([`crate::policy::ProbeTimes`]).
//!
//! Every wait is bounded: an answer that does not come within the wait
//! leaves the round with the estimate without a probe (never a failed
//! migration); its probe is remembered and its late answer, when it comes,
//! is read and dropped (here, or before `Ready`). An answer to no
//! outstanding probe, or with another padding length, is a protocol error.

use std::time::{Duration, Instant};

use super::read_count::LateFrames;
use crate::control::{unexpected, ControlReader, ControlWriter};
use crate::error::{ErrorKind, MigrationError, PeerError, Phase};
use crate::policy::ProbeTimes;
use crate::protocol::{Frame, Message, MsgKind, Probe, ProbeReply, MAX_PROBE_PAD};

/// Unpadded round trips per measurement (their median is the hop).
const HOPS: usize = 3;
/// Probes whose answer may still be missing; with more the destination is
/// not answering and the source stops probing.
const MAX_LATE: usize = 4;

/// The source's half of the probe.
#[derive(Debug)]
pub(super) struct Prober {
    next_id: u32,
    /// Probes sent whose answer did not come in time: (id, pad).
    late: Vec<(u32, u32)>,
    /// Padding of the burst probe: the state's wire size (capped).
    pad: u32,
    /// Longest wait for one answer.
    wait: Duration,
}

impl Prober {
    /// A prober whose burst carries `state_bytes` (at most
    /// [`MAX_PROBE_PAD`]) and which waits at most `wait` for an answer.
    pub(super) fn new(state_bytes: u64, wait: Duration) -> Self {
        Prober {
            next_id: 0,
            late: Vec::new(),
            pad: state_bytes.min(u64::from(MAX_PROBE_PAD)) as u32,
            wait,
        }
    }

    /// [`HOPS`] unpadded probes and one padded to the state's size; `None`
    /// when an answer did not come within the wait (or too many are
    /// missing already).
    #[cfg(test)]
    pub(super) fn measure(
        &mut self,
        fw: &mut ControlWriter,
        control: &mut ControlReader,
        phase: Phase,
    ) -> Result<Option<ProbeTimes>, MigrationError> {
        self.measure_with(fw, control, phase, &mut |_| Ok(false))
    }

    /// [`Prober::measure`], with `other` consuming the late answers of
    /// other questions (the read count's) read meanwhile.
    pub(super) fn measure_with(
        &mut self,
        fw: &mut ControlWriter,
        control: &mut ControlReader,
        phase: Phase,
        other: LateFrames<'_>,
    ) -> Result<Option<ProbeTimes>, MigrationError> {
        if self.late.len() >= MAX_LATE {
            return Ok(None);
        }
        let restore = control.timeout();
        let r = self.measure_all(fw, control, phase, other);
        control
            .set_timeout(restore)
            .map_err(|e| MigrationError::new(phase, e))?;
        r
    }

    fn measure_all(
        &mut self,
        fw: &mut ControlWriter,
        control: &mut ControlReader,
        phase: Phase,
        other: LateFrames<'_>,
    ) -> Result<Option<ProbeTimes>, MigrationError> {
        let mut hops = [Duration::ZERO; HOPS];
        for h in &mut hops {
            match self.exchange(fw, control, 0, phase, other)? {
                Some(d) => *h = d,
                None => return Ok(None),
            }
        }
        hops.sort();
        let hop = hops[HOPS / 2];
        let Some(burst) = self.exchange(fw, control, self.pad, phase, other)? else {
            return Ok(None);
        };
        Ok(Some(ProbeTimes {
            hop,
            state_burst: burst.saturating_sub(hop),
        }))
    }

    /// One probe with `pad` bytes: its round trip, or `None` after the
    /// wait (the probe is then remembered as late).
    fn exchange(
        &mut self,
        fw: &mut ControlWriter,
        control: &mut ControlReader,
        pad: u32,
        phase: Phase,
        other: LateFrames<'_>,
    ) -> Result<Option<Duration>, MigrationError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let t0 = Instant::now();
        crate::control::send(fw, &Probe { id, pad }, phase)?;
        let deadline = t0 + self.wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.late.push((id, pad));
                log::info!("switchover probe {id}: no answer within {:?}", self.wait);
                return Ok(None);
            }
            control
                .set_timeout(left)
                .map_err(|e| MigrationError::new(phase, e))?;
            let f = match control.next(phase, "ProbeReply") {
                Ok(f) => f,
                // A timed-out read keeps the partial frame: the loop's
                // deadline decides.
                Err(MigrationError {
                    kind: ErrorKind::Timeout { .. },
                    ..
                }) => continue,
                Err(e) => return Err(e),
            };
            match f.kind {
                MsgKind::ProbeReply => {
                    let r =
                        ProbeReply::decode(f.payload).map_err(|e| MigrationError::new(phase, e))?;
                    if r.id == id && r.pad == pad {
                        return Ok(Some(t0.elapsed()));
                    }
                    self.take_late(&r, (id, pad), phase)?;
                }
                MsgKind::Keepalive => {}
                kind => {
                    if !other(&f)? {
                        return Err(unexpected(kind, "ProbeReply", phase));
                    }
                }
            }
        }
    }

    /// Whether `f`, read while waiting for something else, is the late
    /// answer to a probe given up on (then it is consumed); a `ProbeReply`
    /// that answers no probe is a protocol error.
    pub(super) fn take_late_frame(
        &mut self,
        f: &Frame<'_>,
        phase: Phase,
    ) -> Result<bool, MigrationError> {
        if f.kind != MsgKind::ProbeReply {
            return Ok(false);
        }
        let r = ProbeReply::decode(f.payload).map_err(|e| MigrationError::new(phase, e))?;
        let want = self.late.first().copied().unwrap_or((u32::MAX, 0));
        self.take_late(&r, want, phase)?;
        Ok(true)
    }

    /// `r` answers a late probe (which is then no longer waited for);
    /// otherwise it is a protocol error (`want` is the probe waiting).
    fn take_late(
        &mut self,
        r: &ProbeReply,
        want: (u32, u32),
        phase: Phase,
    ) -> Result<(), MigrationError> {
        match self.late.iter().position(|l| *l == (r.id, r.pad)) {
            Some(i) => {
                self.late.remove(i);
                Ok(())
            }
            None => {
                let e = PeerError::ProbeReply {
                    id: r.id,
                    pad: r.pad,
                    want: want.0,
                    want_pad: want.1,
                };
                Err(MigrationError::new(phase, e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control;
    use crate::protocol::{FrameWriter, Ready};
    use crate::transport::{mem, Transport};

    /// The source's ends, the peer's writer, and the peer's reader.
    fn ends() -> (
        ControlWriter,
        ControlReader,
        ControlWriter,
        crate::protocol::FrameReader<Box<dyn Transport>>,
    ) {
        let (a, b) = mem::pair();
        let (rx, fw) = control::open(Box::new(a), Duration::from_secs(5)).unwrap();
        let b: Box<dyn Transport> = Box::new(b);
        let peer_rx = crate::protocol::FrameReader::new(b.try_clone().unwrap());
        (fw, rx, FrameWriter::new(b), peer_rx)
    }

    #[test]
    fn answers_are_timed_and_checked() {
        let (mut fw, mut rx, mut peer, mut peer_rx) = ends();
        let mut p = Prober::new(100, Duration::from_secs(5));
        // The peer answers each probe as it comes (the mem pipe buffers, so
        // all four answers can be written up front).
        for id in 0..3 {
            peer.send(&ProbeReply { id, pad: 0 }).unwrap();
        }
        peer.send(&ProbeReply { id: 3, pad: 100 }).unwrap();
        peer.flush().unwrap();
        let t = p.measure(&mut fw, &mut rx, Phase::Precopy(0)).unwrap();
        assert!(t.is_some());
        // What the source sent: three unpadded probes and one of 100 bytes.
        for id in 0..4 {
            let f = peer_rx.read_frame().unwrap();
            assert_eq!(f.kind, MsgKind::Probe);
            let probe = Probe::decode(f.payload).unwrap();
            assert_eq!(probe.id, id);
            assert_eq!(probe.pad, if id == 3 { 100 } else { 0 });
        }
        // The timeout in force before is back.
        assert_eq!(rx.timeout(), Duration::from_secs(5));
    }

    #[test]
    fn a_wrong_answer_is_a_protocol_error() {
        for (id, pad) in [(9, 0), (0, 1)] {
            let (mut fw, mut rx, mut peer, _peer_rx) = ends();
            let mut p = Prober::new(100, Duration::from_secs(5));
            peer.send(&ProbeReply { id, pad }).unwrap();
            let e = p.measure(&mut fw, &mut rx, Phase::Precopy(0)).unwrap_err();
            assert!(
                matches!(e.kind, ErrorKind::Peer(PeerError::ProbeReply { .. })),
                "{e}"
            );
        }
        // A malformed answer, and another kind.
        let (mut fw, mut rx, mut peer, _peer_rx) = ends();
        peer.write_frame(MsgKind::ProbeReply, &[&[1, 2, 3]])
            .unwrap();
        peer.flush().unwrap();
        let mut p = Prober::new(0, Duration::from_secs(5));
        assert!(p.measure(&mut fw, &mut rx, Phase::Precopy(0)).is_err());
        let (mut fw, mut rx, mut peer, _peer_rx) = ends();
        peer.send(&Ready { restore_us: 1 }).unwrap();
        let mut p = Prober::new(0, Duration::from_secs(5));
        let e = p.measure(&mut fw, &mut rx, Phase::Precopy(0)).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::Unexpected { .. }), "{e}");
    }

    #[test]
    fn silence_is_no_measurement_and_the_late_answer_is_dropped() {
        let (mut fw, mut rx, mut peer, _peer_rx) = ends();
        let mut p = Prober::new(0, Duration::from_millis(20));
        // No answer: no measurement, no error, the timeout restored.
        let t = p.measure(&mut fw, &mut rx, Phase::Precopy(0)).unwrap();
        assert_eq!(t, None);
        assert_eq!(rx.timeout(), Duration::from_secs(5));
        assert_eq!(p.late, vec![(0, 0)]);
        // Its answer comes later, then the next probe's.
        peer.send(&ProbeReply { id: 0, pad: 0 }).unwrap();
        for id in 1..4 {
            peer.send(&ProbeReply { id, pad: 0 }).unwrap();
        }
        peer.send(&ProbeReply { id: 4, pad: 0 }).unwrap();
        let t = p.measure(&mut fw, &mut rx, Phase::Precopy(1)).unwrap();
        assert!(t.is_some());
        assert!(p.late.is_empty());
        // A late answer before Ready is dropped; an answer to nothing is not.
        let mut p = Prober::new(0, Duration::from_millis(20));
        assert_eq!(
            p.measure(&mut fw, &mut rx, Phase::Precopy(0)).unwrap(),
            None
        );
        peer.send(&ProbeReply { id: 0, pad: 0 }).unwrap();
        peer.send(&Ready { restore_us: 7 }).unwrap();
        let r =
            super::super::switchover::recv_ready(&mut rx, Some(&mut p), None, Phase::Completion)
                .unwrap();
        assert_eq!(r.restore_us, 7);
        peer.send(&ProbeReply { id: 0, pad: 0 }).unwrap();
        assert!(super::super::switchover::recv_ready(
            &mut rx,
            Some(&mut p),
            None,
            Phase::Completion
        )
        .is_err());
    }

    #[test]
    fn too_many_missing_answers_stop_the_probe() {
        let (mut fw, mut rx, _peer, mut peer_rx) = ends();
        let mut p = Prober::new(0, Duration::from_millis(5));
        for _ in 0..MAX_LATE {
            assert_eq!(
                p.measure(&mut fw, &mut rx, Phase::Precopy(0)).unwrap(),
                None
            );
        }
        assert_eq!(
            p.measure(&mut fw, &mut rx, Phase::Precopy(0)).unwrap(),
            None
        );
        // One probe per try, none after the last.
        for _ in 0..MAX_LATE {
            assert_eq!(peer_rx.read_frame().unwrap().kind, MsgKind::Probe);
        }
        peer_rx
            .get_mut()
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        assert!(peer_rx.read_frame().is_err());
    }
}
