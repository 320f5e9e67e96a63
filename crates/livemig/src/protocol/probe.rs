//! The switchover probe (kinds 23–24, only sent once the destination
//! granted it in the handshake; see `docs/protocol.md`, "The switchover
//! probe"): a request the destination's control reader answers at once,
//! so that the source times, before it pauses, the hops the switchover's
//! `Complete` → `Ready` and `Go` → `Resumed` will take through both
//! engines' threads and the transport, and the state's burst.

use super::codec::{put_u32, Cursor};
use super::{Message, MsgKind, ProtocolError, MAX_FRAME_PAYLOAD};

/// Most padding bytes one [`Probe`] may carry (it fits one frame).
pub const MAX_PROBE_PAD: u32 = (MAX_FRAME_PAYLOAD - 8) as u32;

/// Source → destination: answer with a [`ProbeReply`] carrying the same
/// `id` and `pad`. The payload is `id u32, pad u32`, then `pad` zero bytes
/// (as many as the state the switchover will send, to time its burst).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Probe {
    /// The request's number (the source's count of probes, from 0).
    pub id: u32,
    /// Zero bytes following the header (at most [`MAX_PROBE_PAD`]).
    pub pad: u32,
}

/// Destination → source: the answer to the [`Probe`] with this `id`, whose
/// `pad` zero bytes were all read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProbeReply {
    /// The [`Probe::id`] answered.
    pub id: u32,
    /// Its [`Probe::pad`].
    pub pad: u32,
}

fn check_pad(msg: &'static str, pad: u32) -> Result<(), ProtocolError> {
    if pad > MAX_PROBE_PAD {
        return Err(ProtocolError::Unencodable {
            msg,
            reason: format!("{pad} padding bytes (at most {MAX_PROBE_PAD})"),
        });
    }
    Ok(())
}

/// The id and padding length both messages begin with; the length is
/// checked against [`MAX_PROBE_PAD`].
fn id_and_pad(c: &mut Cursor<'_>) -> Result<(u32, u32), ProtocolError> {
    let id = c.u32()?;
    let at = c.pos;
    let pad = c.u32()?;
    if pad > MAX_PROBE_PAD {
        return Err(c.malformed_at(at, format!("{pad} padding bytes (at most {MAX_PROBE_PAD})")));
    }
    Ok((id, pad))
}

impl Message for Probe {
    const KIND: MsgKind = MsgKind::Probe;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        check_pad("Probe", self.pad)?;
        put_u32(out, self.id);
        put_u32(out, self.pad);
        out.resize(out.len() + self.pad as usize, 0);
        Ok(())
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("Probe", payload);
        let (id, pad) = id_and_pad(&mut c)?;
        let at = c.pos;
        let bytes = c.bytes(pad as usize)?;
        if let Some(i) = bytes.iter().position(|b| *b != 0) {
            return Err(c.malformed_at(at + i, "a padding byte that is not zero"));
        }
        c.finish()?;
        Ok(Probe { id, pad })
    }
}

impl Message for ProbeReply {
    const KIND: MsgKind = MsgKind::ProbeReply;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        check_pad("ProbeReply", self.pad)?;
        put_u32(out, self.id);
        put_u32(out, self.pad);
        Ok(())
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("ProbeReply", payload);
        let (id, pad) = id_and_pad(&mut c)?;
        c.finish()?;
        Ok(ProbeReply { id, pad })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<M: Message + PartialEq + std::fmt::Debug>(m: &M) -> Vec<u8> {
        let bytes = m.encode().unwrap();
        assert_eq!(&M::decode(&bytes).unwrap(), m);
        bytes
    }

    #[test]
    fn probes_round_trip() {
        let b = round_trip(&Probe { id: 7, pad: 0 });
        assert_eq!(b, [7, 0, 0, 0, 0, 0, 0, 0]);
        let b = round_trip(&Probe { id: 1, pad: 4096 });
        assert_eq!(b.len(), 8 + 4096);
        round_trip(&Probe {
            id: u32::MAX,
            pad: MAX_PROBE_PAD,
        });
        let b = round_trip(&ProbeReply { id: 3, pad: 9 });
        assert_eq!(b, [3, 0, 0, 0, 9, 0, 0, 0]);
    }

    #[test]
    fn malformed_probes_are_refused() {
        let ok = Probe { id: 1, pad: 16 }.encode().unwrap();
        // Every truncation, and a byte more.
        for cut in 0..ok.len() {
            assert!(Probe::decode(&ok[..cut]).is_err(), "{cut}");
        }
        let mut long = ok.clone();
        long.push(0);
        assert!(matches!(
            Probe::decode(&long),
            Err(ProtocolError::TrailingBytes { count: 1, .. })
        ));
        // A padding byte that is not zero.
        let mut dirty = ok.clone();
        dirty[8 + 5] = 1;
        let e = Probe::decode(&dirty).unwrap_err();
        assert!(e.to_string().contains("not zero"), "{e}");
        // A padding length over the limit is refused before it is read.
        let mut huge = 1u32.to_le_bytes().to_vec();
        huge.extend_from_slice(&(MAX_PROBE_PAD + 1).to_le_bytes());
        assert!(Probe::decode(&huge).is_err());
        assert!(ProbeReply::decode(&huge).is_err());
        assert!(Probe {
            id: 0,
            pad: MAX_PROBE_PAD + 1
        }
        .encode()
        .is_err());
        assert!(ProbeReply {
            id: 0,
            pad: MAX_PROBE_PAD + 1
        }
        .encode()
        .is_err());
        let r = ProbeReply { id: 1, pad: 2 }.encode().unwrap();
        for cut in 0..r.len() {
            assert!(ProbeReply::decode(&r[..cut]).is_err(), "{cut}");
        }
        let mut long = r.clone();
        long.push(0);
        assert!(ProbeReply::decode(&long).is_err());
    }
}
