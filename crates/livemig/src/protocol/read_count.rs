//! The read count (kinds 26–27, only sent once the destination granted it
//! in the handshake; see `docs/protocol.md`, "The read count"): the source
//! asks how many bytes the destination's engine has read, on every
//! connection, so that a round ends when its pages have been *read*, not
//! only taken into the destination's receive buffer (which its kernel
//! acknowledges, and which can hold megabytes the source's send queue no
//! longer shows).

use super::codec::{put_u32, put_u64, Cursor};
use super::{Message, MsgKind, ProtocolError};

/// Source → destination, control connection: answer with a [`ReadCount`]
/// carrying the same `id`. The payload is `id u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadQuery {
    /// The question's number (the source's count of questions, from 0).
    pub id: u32,
}

/// Destination → source, control connection: the answer to the
/// [`ReadQuery`] with this `id`. The payload is `id u32, bytes u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadCount {
    /// The [`ReadQuery::id`] answered.
    pub id: u32,
    /// Bytes of whole frames the destination's engine had read when it
    /// read the question, on the control connection (the question
    /// included) and on every page stream, since each connection opened.
    pub bytes: u64,
}

impl Message for ReadQuery {
    const KIND: MsgKind = MsgKind::ReadQuery;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        put_u32(out, self.id);
        Ok(())
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("ReadQuery", payload);
        let id = c.u32()?;
        c.finish()?;
        Ok(ReadQuery { id })
    }
}

impl Message for ReadCount {
    const KIND: MsgKind = MsgKind::ReadCount;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        put_u32(out, self.id);
        put_u64(out, self.bytes);
        Ok(())
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("ReadCount", payload);
        let id = c.u32()?;
        let bytes = c.u64()?;
        c.finish()?;
        Ok(ReadCount { id, bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_counts_round_trip_and_are_strict() {
        let q = ReadQuery { id: 7 };
        let b = q.encode().unwrap();
        assert_eq!(b, [7, 0, 0, 0]);
        assert_eq!(ReadQuery::decode(&b).unwrap(), q);
        let r = ReadCount {
            id: 3,
            bytes: 0x0102_0304_0506_0708,
        };
        let rb = r.encode().unwrap();
        assert_eq!(rb, [3, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(ReadCount::decode(&rb).unwrap(), r);
        for cut in 0..b.len() {
            assert!(ReadQuery::decode(&b[..cut]).is_err(), "{cut}");
        }
        for cut in 0..rb.len() {
            assert!(ReadCount::decode(&rb[..cut]).is_err(), "{cut}");
        }
        let mut long = rb.clone();
        long.push(0);
        assert!(matches!(
            ReadCount::decode(&long),
            Err(ProtocolError::TrailingBytes { count: 1, .. })
        ));
        let mut long = b.clone();
        long.push(0);
        assert!(ReadQuery::decode(&long).is_err());
    }
}
