//! The console socket's wire format (`--console unix:PATH`, `refvmm
//! console PATH`).
//!
//! Both directions carry frames: one type byte, the payload length as a
//! little-endian `u32`, then the payload (at most [`MAX_PAYLOAD`] bytes).
//!
//! | type | direction | payload | meaning |
//! |---|---|---|---|
//! | `A` | client → VMM | `u64` offset | attach; first frame of every connection. The offset is where the guest's output should start, counted in bytes the guest wrote *on this VMM* ([`FROM_NOW`]: only what it writes from now on) |
//! | `I` | client → VMM | bytes | console input (typed bytes) |
//! | `W` | VMM → client | `u64` start, `u64` lost | attached; output follows from offset `start`; `lost` bytes before it were no longer kept |
//! | `O` | VMM → client | bytes | guest output |
//! | `K` | VMM → client | `u64` | input acknowledgement: bytes of this connection's input now in the guest's UART |
//! | `M` | VMM → client | `u64` | the guest migrated away: all of its output here was sent before this frame; the `u64` is the final acknowledgement (input beyond it never reached the guest here). Reattach to the same path with offset 0 |
//! | `E` | VMM → client | UTF-8 text | the session ends (the VMM exits, or another client attached); the reason |

use std::io::{self, Read, Write};

/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The attach offset meaning "only output written from now on".
pub const FROM_NOW: u64 = u64::MAX;

/// One console frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Client: attach, output from this offset (or [`FROM_NOW`]).
    Attach(u64),
    /// Client: typed bytes.
    Input(Vec<u8>),
    /// VMM: attached; output starts at `start`, `lost` bytes were dropped.
    Welcome {
        /// Offset of the first output byte that follows.
        start: u64,
        /// Bytes between the requested offset and `start` no longer kept.
        lost: u64,
    },
    /// VMM: guest output.
    Output(Vec<u8>),
    /// VMM: input bytes of this connection taken by the guest's UART so far.
    Ack(u64),
    /// VMM: the guest left; final input acknowledgement.
    Moved(u64),
    /// VMM: the session ends, with the reason.
    End(String),
}

/// What can be wrong with a frame.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The socket failed.
    #[error("console socket: {0}")]
    Io(#[from] io::Error),
    /// An unknown frame type.
    #[error("console protocol: unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// A payload over [`MAX_PAYLOAD`].
    #[error("console protocol: frame of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLong(usize),
    /// A payload of the wrong size for its type.
    #[error("console protocol: frame type {kind:?} with a {len}-byte payload")]
    BadLength {
        /// The frame type.
        kind: char,
        /// Its payload length.
        len: usize,
    },
}

fn u64_at(p: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[at..at + 8]);
    u64::from_le_bytes(b)
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Attach(_) => b'A',
            Frame::Input(_) => b'I',
            Frame::Welcome { .. } => b'W',
            Frame::Output(_) => b'O',
            Frame::Ack(_) => b'K',
            Frame::Moved(_) => b'M',
            Frame::End(_) => b'E',
        }
    }

    fn payload(&self) -> Vec<u8> {
        match self {
            Frame::Attach(n) | Frame::Ack(n) | Frame::Moved(n) => n.to_le_bytes().to_vec(),
            Frame::Welcome { start, lost } => {
                let mut p = start.to_le_bytes().to_vec();
                p.extend_from_slice(&lost.to_le_bytes());
                p
            }
            Frame::Input(b) | Frame::Output(b) => b.clone(),
            Frame::End(s) => s.as_bytes().to_vec(),
        }
    }

    /// The frame's bytes. Payloads over [`MAX_PAYLOAD`] are refused.
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let payload = self.payload();
        if payload.len() > MAX_PAYLOAD {
            return Err(ProtoError::TooLong(payload.len()));
        }
        let mut out = Vec::with_capacity(5 + payload.len());
        out.push(self.kind());
        // At most MAX_PAYLOAD, so it fits.
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Writes the frame.
    pub fn write_to(&self, w: &mut impl Write) -> Result<(), ProtoError> {
        w.write_all(&self.encode()?)?;
        Ok(())
    }

    fn decode(kind: u8, p: &[u8]) -> Result<Frame, ProtoError> {
        let want = |n: usize| {
            if p.len() == n {
                Ok(())
            } else {
                Err(ProtoError::BadLength {
                    kind: char::from(kind),
                    len: p.len(),
                })
            }
        };
        Ok(match kind {
            b'A' => want(8).map(|()| Frame::Attach(u64_at(p, 0)))?,
            b'K' => want(8).map(|()| Frame::Ack(u64_at(p, 0)))?,
            b'M' => want(8).map(|()| Frame::Moved(u64_at(p, 0)))?,
            b'W' => want(16).map(|()| Frame::Welcome {
                start: u64_at(p, 0),
                lost: u64_at(p, 8),
            })?,
            b'I' => Frame::Input(p.to_vec()),
            b'O' => Frame::Output(p.to_vec()),
            b'E' => Frame::End(String::from_utf8_lossy(p).into_owned()),
            other => return Err(ProtoError::UnknownType(other)),
        })
    }
}

/// Reassembles frames from a byte stream read in arbitrary pieces.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// Adds bytes read from the socket.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > MAX_PAYLOAD {
            return Err(ProtoError::TooLong(len));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        let frame = Frame::decode(self.buf[0], &self.buf[5..5 + len]);
        self.buf.drain(..5 + len);
        frame.map(Some)
    }

    /// Reads from `r` once (honouring its timeout) and buffers what came.
    /// Returns `Ok(false)` at end of file; a timeout is `Ok(true)`.
    pub fn fill(&mut self, r: &mut impl Read) -> Result<bool, ProtoError> {
        let mut chunk = [0u8; 16 * 1024];
        match r.read(&mut chunk) {
            Ok(0) => Ok(false),
            Ok(n) => {
                self.push(&chunk[..n]);
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(true)
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_round_trips_in_pieces() {
        let frames = vec![
            Frame::Attach(FROM_NOW),
            Frame::Input(b"status\n".to_vec()),
            Frame::Welcome { start: 7, lost: 3 },
            Frame::Output(vec![0, 1, 2, 255]),
            Frame::Ack(42),
            Frame::Moved(43),
            Frame::End("bye".into()),
            Frame::Output(Vec::new()),
        ];
        let bytes: Vec<u8> = frames.iter().flat_map(|f| f.encode().unwrap()).collect();
        for piece in [1, 3, 5, 64] {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for chunk in bytes.chunks(piece) {
                d.push(chunk);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "pieces of {piece}");
        }
    }

    #[test]
    fn bad_frames_are_refused() {
        let mut d = Decoder::default();
        d.push(&[b'Z', 0, 0, 0, 0]);
        assert!(matches!(d.next_frame(), Err(ProtoError::UnknownType(b'Z'))));
        let mut d = Decoder::default();
        d.push(&[b'O', 0xff, 0xff, 0xff, 0x7f]);
        assert!(matches!(d.next_frame(), Err(ProtoError::TooLong(_))));
        let mut d = Decoder::default();
        d.push(&[b'K', 2, 0, 0, 0, 1, 2]);
        assert!(matches!(
            d.next_frame(),
            Err(ProtoError::BadLength { kind: 'K', len: 2 })
        ));
        assert!(Frame::Input(vec![0; MAX_PAYLOAD + 1]).encode().is_err());
    }
}
