//! The control connection, as both sides use it.
//!
//! Every control message either side reads goes through [`ControlReader`]:
//! a peer's `Error` frame becomes [`ErrorKind::Remote`], a read timeout
//! becomes [`ErrorKind::Timeout`] and a frame of another kind becomes
//! [`ErrorKind::Unexpected`] here and nowhere else. Sending is one
//! [`send`] (the message, then a flush).

use std::time::Duration;

use crate::error::{ErrorKind, MigrationError, Phase};
use crate::protocol::{
    Abandoned, ErrorMsg, Frame, FrameReader, FrameWriter, Message, MsgKind, PayloadSink,
    ProtocolError,
};
use crate::transport::Transport;

/// The writing half of a control connection.
pub(crate) type ControlWriter = FrameWriter<Box<dyn Transport>>;

/// The reading half of a control connection, with the read timeout it was
/// set up with (for the error that names it).
pub(crate) struct ControlReader {
    fr: FrameReader<Box<dyn Transport>>,
    timeout: Duration,
}

/// Splits `transport` into the control connection's reader and writer, both
/// with `timeout` on every blocking read and write.
pub(crate) fn open(
    transport: Box<dyn Transport>,
    timeout: Duration,
) -> Result<(ControlReader, ControlWriter), MigrationError> {
    let io = |e| MigrationError::new(Phase::Handshake, ProtocolError::Io(e));
    let mut rx = transport.try_clone().map_err(io)?;
    rx.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut transport = transport;
    transport.set_write_timeout(Some(timeout)).map_err(io)?;
    let reader = ControlReader {
        fr: FrameReader::new(rx),
        timeout,
    };
    Ok((reader, FrameWriter::new(transport)))
}

/// Sends `msg` and flushes it.
pub(crate) fn send<M: Message>(
    fw: &mut ControlWriter,
    msg: &M,
    phase: Phase,
) -> Result<(), MigrationError> {
    fw.send(msg)
        .and_then(|_| fw.flush())
        .map_err(|e| MigrationError::new(phase, e))
}

/// Tells the peer why this side gives up (best effort): an `Error` frame,
/// or with `abandoned` an `Abandoned` one (the VM is gone for good).
pub(crate) fn send_failure(fw: &mut ControlWriter, e: &MigrationError, abandoned: bool) {
    let msg = ErrorMsg {
        phase: e.phase.to_string(),
        message: e.kind.to_string(),
    };
    let _ = if abandoned {
        fw.send(&Abandoned(msg))
    } else {
        fw.send(&msg)
    };
    let _ = fw.flush();
}

impl ControlReader {
    /// Reads the next frame that is not an `Error`: a peer's `Error` frame
    /// and a timeout (waiting for `expected`) become errors in `phase`.
    pub(crate) fn next(
        &mut self,
        phase: Phase,
        expected: &'static str,
    ) -> Result<Frame<'_>, MigrationError> {
        let timeout = self.timeout;
        judge(self.fr.read_frame(), phase, expected, timeout)
    }

    /// [`ControlReader::next`], with the payload of the frames `sink`
    /// accepts read into it ([`FrameReader::read_frame_into`]).
    pub(crate) fn next_into(
        &mut self,
        phase: Phase,
        expected: &'static str,
        sink: &mut dyn PayloadSink,
    ) -> Result<Frame<'_>, MigrationError> {
        let timeout = self.timeout;
        judge(self.fr.read_frame_into(sink), phase, expected, timeout)
    }

    /// Reads the next message, which must be an `M`.
    pub(crate) fn recv<M: Message>(&mut self, phase: Phase) -> Result<M, MigrationError> {
        let want = M::KIND;
        let f = self.next(phase, want.name())?;
        if f.kind != want {
            return Err(unexpected(f.kind, want.name(), phase));
        }
        M::decode(f.payload).map_err(|e| MigrationError::new(phase, e))
    }

    /// After a failure that broke the connection: the peer's own reason, if
    /// it sent one within `wait`.
    pub(crate) fn peer_reason(&mut self, phase: Phase, wait: Duration) -> Option<MigrationError> {
        let _ = self.fr.get_mut().set_read_timeout(Some(wait));
        self.timeout = wait;
        match self.next(phase, "the peer's reason") {
            Err(
                e @ MigrationError {
                    kind: ErrorKind::Remote { .. },
                    ..
                },
            ) => Some(e),
            _ => None,
        }
    }

    /// Sets the read timeout (for the next reads, and their errors).
    pub(crate) fn set_timeout(&mut self, timeout: Duration) -> Result<(), ProtocolError> {
        self.fr
            .get_mut()
            .set_read_timeout(Some(timeout))
            .map_err(ProtocolError::Io)?;
        self.timeout = timeout;
        Ok(())
    }

    /// The read timeout in force.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Bytes read so far.
    pub(crate) fn bytes_read(&self) -> u64 {
        self.fr.bytes_read()
    }

    /// The connection itself (to clone a handle that can shut it down).
    pub(crate) fn transport(&self) -> &dyn Transport {
        &**self.fr.get_ref()
    }
}

/// A frame of kind `got` arrived while `expected` was.
pub(crate) fn unexpected(got: MsgKind, expected: &'static str, phase: Phase) -> MigrationError {
    MigrationError::new(
        phase,
        ErrorKind::Unexpected {
            got: format!("{got:?}"),
            expected,
        },
    )
}

/// What [`ControlReader::next`] makes of a read: a peer's `Error` frame
/// and a timeout (waiting for `expected`) become errors in `phase`.
fn judge<'f>(
    read: Result<Frame<'f>, ProtocolError>,
    phase: Phase,
    expected: &'static str,
    timeout: Duration,
) -> Result<Frame<'f>, MigrationError> {
    let f = read.map_err(|e| {
        let kind = if e.is_timeout() {
            ErrorKind::Timeout {
                waiting_for: expected,
                after: timeout,
            }
        } else {
            ErrorKind::Protocol(e)
        };
        MigrationError::new(phase, kind)
    })?;
    if f.kind != MsgKind::Error {
        return Ok(f);
    }
    let m = ErrorMsg::decode(f.payload).map_err(|e| MigrationError::new(phase, e))?;
    Err(MigrationError::new(
        phase,
        ErrorKind::Remote {
            phase: m.phase,
            message: m.message,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Ready, Resumed};
    use crate::transport::mem;

    /// This side's reader, and the peer's writer.
    fn ends(timeout: Duration) -> (ControlReader, ControlWriter, Box<dyn Transport>) {
        let (a, b) = mem::pair();
        let (rx, _fw) = open(Box::new(a), timeout).unwrap();
        let b: Box<dyn Transport> = Box::new(b);
        let keep = b.try_clone().unwrap();
        (rx, FrameWriter::new(b), keep)
    }

    #[test]
    fn the_message_asked_for_is_decoded() {
        let (mut rx, mut peer, _keep) = ends(Duration::from_secs(5));
        peer.send(&Ready { restore_us: 3 }).unwrap();
        let r: Ready = rx.recv(Phase::Completion).unwrap();
        assert_eq!(r.restore_us, 3);
    }

    #[test]
    fn a_peer_error_frame_is_remote() {
        let (mut rx, mut peer, _keep) = ends(Duration::from_secs(5));
        peer.send(&ErrorMsg::new("state", "boom")).unwrap();
        let e = rx.recv::<Ready>(Phase::Completion).unwrap_err();
        assert_eq!(e.phase, Phase::Completion);
        assert!(
            matches!(&e.kind, ErrorKind::Remote { phase, message } if phase == "state" && message == "boom"),
            "{e}"
        );
    }

    #[test]
    fn another_kind_is_unexpected() {
        let (mut rx, mut peer, _keep) = ends(Duration::from_secs(5));
        peer.send(&Resumed { resume_us: 1 }).unwrap();
        let e = rx.recv::<Ready>(Phase::Completion).unwrap_err();
        assert!(
            matches!(&e.kind, ErrorKind::Unexpected { expected: "Ready", got } if got == "Resumed"),
            "{e}"
        );
    }

    #[test]
    fn silence_is_a_timeout() {
        let (mut rx, _peer, _keep) = ends(Duration::from_millis(20));
        let e = rx.recv::<Ready>(Phase::Handshake).unwrap_err();
        assert!(
            matches!(e.kind, ErrorKind::Timeout { waiting_for: "Ready", after } if after == Duration::from_millis(20)),
            "{e}"
        );
        assert!(e.to_string().contains("timed out"), "{e}");
    }
}
