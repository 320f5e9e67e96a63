//! The commit point of the source: `Go`, then the destination's answer.
//!
//! Once the source has *tried* to write `Go`, the destination may run the
//! guest. From then on exactly three outcomes exist, and only one of them
//! lets the source run the guest again:
//!
//! * a well-formed `Resumed`: the destination has the guest ([`Commit::Committed`]);
//! * a well-formed `Abandoned`: the destination promises it dropped the VM
//!   and will never run it ([`Commit::Abandoned`]); the source may resume;
//! * anything else ([`Commit::Ambiguous`]): a `Resumed` whose payload does not
//!   decode, an `Error`, any other frame, a timeout, a dropped connection, a
//!   failed write of `Go` itself. The guest may be running there: the source
//!   must stay paused.

use std::time::Duration;

use crate::control::{ControlReader, ControlWriter};
use crate::error::{Abandonment, ErrorKind, MigrationError, Phase, Unconfirmed};
use crate::protocol::{Abandoned, Go, Message, MsgKind, Resumed};

/// What the destination answered to `Go`.
#[derive(Debug)]
pub(crate) enum Commit {
    /// The destination confirmed the switchover.
    Committed(Resumed),
    /// The destination dropped the VM and will never run it (its phase and
    /// reason).
    Abandoned(Abandonment),
    /// The outcome is unknown; why.
    Ambiguous(Unconfirmed),
}

/// Sends `go` and waits at most `timeout` for the answer.
///
/// The caller passes twice its `io_timeout`: a destination with the same
/// timeout that gave up waiting for `Go` (it started waiting before the
/// source did) has answered `Abandoned` by then.
///
/// Even when writing `Go` fails, the answer is read: a destination that gave
/// up (and said so with `Abandoned`) before `Go` reached it may have closed
/// the connection already.
pub(crate) fn commit(
    fw: &mut ControlWriter,
    control: &mut ControlReader,
    go: &Go,
    timeout: Duration,
) -> Commit {
    let sent = fw.send(go).and_then(|_| fw.flush());
    if let Err(e) = control.set_timeout(timeout) {
        return Commit::Ambiguous(Unconfirmed::CannotWait(e));
    }
    let answer = read_answer(control);
    match (answer, sent) {
        // A definite answer wins: the destination saw `Go` (or gave up).
        (c @ (Commit::Committed(_) | Commit::Abandoned(_)), _) => c,
        (Commit::Ambiguous(why), Err(e)) => Commit::Ambiguous(Unconfirmed::GoNotSent {
            go: e,
            then: Box::new(why),
        }),
        (c, Ok(())) => c,
    }
}

/// Reads one frame and classifies it.
fn read_answer(control: &mut ControlReader) -> Commit {
    let f = match control.next(Phase::Completion, "Resumed") {
        Ok(f) => f,
        Err(e) => return Commit::Ambiguous(describe(e)),
    };
    match f.kind {
        MsgKind::Resumed => match Resumed::decode(f.payload) {
            Ok(r) => Commit::Committed(r),
            Err(e) => Commit::Ambiguous(Unconfirmed::MalformedResumed(e)),
        },
        MsgKind::Abandoned => match Abandoned::decode(f.payload) {
            Ok(Abandoned(m)) => Commit::Abandoned(Abandonment {
                phase: m.phase,
                message: m.message,
            }),
            Err(e) => Commit::Ambiguous(Unconfirmed::MalformedAbandoned(e)),
        },
        other => Commit::Ambiguous(Unconfirmed::UnexpectedFrame(other)),
    }
}

/// Why no answer came.
fn describe(e: MigrationError) -> Unconfirmed {
    match e.kind {
        ErrorKind::Timeout { after, .. } => Unconfirmed::NoAnswer(after),
        ErrorKind::Remote { phase, message } => Unconfirmed::RemoteError { phase, message },
        other => Unconfirmed::Read(Box::new(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control;
    use crate::protocol::{ErrorMsg, FrameWriter};
    use crate::transport::{mem, Transport};

    type Reader = ControlReader;
    type Writer = FrameWriter<Box<dyn Transport>>;

    /// The source's ends, and the peer's writer (`Go` lands in its buffer;
    /// the mem pipe holds 16 chunks, so nothing blocks).
    fn ends() -> (Writer, Reader, Writer, Box<dyn Transport>) {
        let (a, b) = mem::pair();
        let (rx, fw) = control::open(Box::new(a), Duration::from_secs(5)).unwrap();
        let b: Box<dyn Transport> = Box::new(b);
        let peer_rx = b.try_clone().unwrap();
        (fw, rx, FrameWriter::new(b), peer_rx)
    }

    fn run(answer: impl FnOnce(&mut Writer)) -> Commit {
        let (mut fw, mut fr, mut peer, _keep) = ends();
        answer(&mut peer);
        commit(&mut fw, &mut fr, &Go, Duration::from_secs(5))
    }

    #[test]
    fn resumed_commits() {
        let c = run(|p| p.send(&Resumed { resume_us: 7 }).unwrap());
        assert!(
            matches!(c, Commit::Committed(Resumed { resume_us: 7 })),
            "{c:?}"
        );
    }

    #[test]
    fn malformed_resumed_is_ambiguous() {
        let c = run(|p| p.write_frame(MsgKind::Resumed, &[&[1, 2, 3]]).unwrap());
        assert!(
            matches!(&c, Commit::Ambiguous(Unconfirmed::MalformedResumed(_))),
            "{c:?}"
        );
    }

    #[test]
    fn error_after_go_is_ambiguous() {
        let c = run(|p| p.send(&ErrorMsg::new("completion", "boom")).unwrap());
        assert!(
            matches!(&c, Commit::Ambiguous(Unconfirmed::RemoteError { phase, message })
                if phase == "completion" && message == "boom"),
            "{c:?}"
        );
    }

    #[test]
    fn abandoned_lets_the_source_resume() {
        let c = run(|p| {
            p.send(&Abandoned(ErrorMsg::new("completion", "no Go")))
                .unwrap()
        });
        assert!(
            matches!(&c, Commit::Abandoned(a) if a.phase == "completion" && a.message == "no Go"),
            "{c:?}"
        );
    }

    #[test]
    fn malformed_abandoned_is_ambiguous() {
        let c = run(|p| p.write_frame(MsgKind::Abandoned, &[&[9]]).unwrap());
        assert!(
            matches!(c, Commit::Ambiguous(Unconfirmed::MalformedAbandoned(_))),
            "{c:?}"
        );
    }

    #[test]
    fn other_frames_are_ambiguous() {
        let c = run(|p| p.write_frame(MsgKind::Keepalive, &[]).unwrap());
        assert!(
            matches!(
                c,
                Commit::Ambiguous(Unconfirmed::UnexpectedFrame(MsgKind::Keepalive))
            ),
            "{c:?}"
        );
    }

    #[test]
    fn dropped_connection_is_ambiguous() {
        let (mut fw, mut fr, peer, keep) = ends();
        drop((peer, keep));
        let c = commit(&mut fw, &mut fr, &Go, Duration::from_secs(5));
        assert!(
            matches!(&c, Commit::Ambiguous(Unconfirmed::GoNotSent { .. })),
            "{c:?}"
        );
    }

    #[test]
    fn abandoned_wins_over_a_failed_go() {
        // The destination gave up, said so and hung up before Go arrived.
        let (mut fw, mut fr, mut peer, keep) = ends();
        peer.send(&Abandoned(ErrorMsg::new("completion", "timed out")))
            .unwrap();
        drop((peer, keep));
        let c = commit(&mut fw, &mut fr, &Go, Duration::from_secs(5));
        assert!(matches!(c, Commit::Abandoned(_)), "{c:?}");
    }

    /// The structured reasons keep the text they had as strings.
    #[test]
    fn reasons_read_as_before() {
        let c = run(|p| p.write_frame(MsgKind::Keepalive, &[]).unwrap());
        let Commit::Ambiguous(why) = c else {
            panic!("{c:?}")
        };
        assert_eq!(
            why.to_string(),
            "an unexpected Keepalive frame instead of Resumed"
        );
        let a = Abandonment {
            phase: "completion".into(),
            message: "no Go".into(),
        };
        assert_eq!(a.to_string(), "completion: no Go");
    }

    #[test]
    fn silence_is_ambiguous() {
        let (mut fw, mut fr, _peer, _keep) = ends();
        fr.set_timeout(Duration::from_millis(20)).unwrap();
        let c = commit(&mut fw, &mut fr, &Go, Duration::from_millis(20));
        assert!(
            matches!(&c, Commit::Ambiguous(Unconfirmed::NoAnswer(_))),
            "{c:?}"
        );
    }
}
