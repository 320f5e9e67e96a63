//! The bounds-checked little-endian payload reader ([`Cursor`]) and the
//! matching `put_*` writers every message encoder uses.

use super::{ProtocolError, MAX_STREAMS};

/// A bounds-checked little-endian reader over a payload.
pub(super) struct Cursor<'a> {
    pub(super) msg: &'static str,
    pub(super) data: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(msg: &'static str, data: &'a [u8]) -> Self {
        Cursor { msg, data, pos: 0 }
    }

    pub(super) fn left(&self) -> usize {
        self.data.len() - self.pos
    }

    /// A page-stream count, `1..=MAX_STREAMS`.
    pub(super) fn streams(&mut self) -> Result<u32, ProtocolError> {
        let at = self.pos;
        let streams = self.u32()?;
        if streams == 0 || streams > MAX_STREAMS {
            return Err(self.malformed_at(
                at,
                format!("{streams} streams is outside 1..={MAX_STREAMS}"),
            ));
        }
        Ok(streams)
    }

    pub(super) fn malformed_at(&self, offset: usize, reason: impl Into<String>) -> ProtocolError {
        ProtocolError::Malformed {
            msg: self.msg,
            offset,
            reason: reason.into(),
        }
    }

    pub(super) fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if n > self.left() {
            return Err(ProtocolError::Truncated {
                msg: self.msg,
                offset: self.pos,
                wanted: n,
                left: self.left(),
            });
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub(super) fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>()?[0])
    }

    pub(super) fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(super) fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(super) fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(super) fn bool(&mut self, what: &str) -> Result<bool, ProtocolError> {
        let at = self.pos;
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.malformed_at(at, format!("{what}: {v} is not a boolean (0 or 1)"))),
        }
    }

    /// Reads a count and checks it against `max` and against the bytes left
    /// (each element needs at least `min_elem` bytes), so that a bogus count
    /// fails before anything is allocated for it.
    pub(super) fn count(
        &mut self,
        what: &str,
        max: usize,
        min_elem: usize,
    ) -> Result<usize, ProtocolError> {
        let at = self.pos;
        let n = self.u32()?;
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n > max {
            return Err(self.malformed_at(at, format!("{n} {what} exceeds the limit of {max}")));
        }
        if n.saturating_mul(min_elem) > self.left() {
            return Err(self.malformed_at(
                at,
                format!(
                    "{n} {what} need at least {} bytes but only {} are left",
                    n.saturating_mul(min_elem),
                    self.left()
                ),
            ));
        }
        Ok(n)
    }

    /// Reads a `u16`-length-prefixed UTF-8 string of at most `max` bytes.
    pub(super) fn string(&mut self, what: &str, max: usize) -> Result<String, ProtocolError> {
        let at = self.pos;
        let len = usize::from(self.u16()?);
        if len > max {
            return Err(self.malformed_at(at, format!("{what} is {len} bytes, limit {max}")));
        }
        let bytes = self.bytes(len)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => Err(self.malformed_at(at + 2, format!("{what} is not valid UTF-8: {e}"))),
        }
    }

    pub(super) fn finish(self) -> Result<(), ProtocolError> {
        if self.pos != self.data.len() {
            return Err(ProtocolError::TrailingBytes {
                msg: self.msg,
                offset: self.pos,
                count: self.left(),
            });
        }
        Ok(())
    }
}

pub(super) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(super) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Writes a page-stream count (`Hello::streams`, `HelloReply::streams`),
/// refusing one outside `1..=MAX_STREAMS`.
pub(super) fn put_streams(
    out: &mut Vec<u8>,
    msg: &'static str,
    streams: u32,
) -> Result<(), ProtocolError> {
    if streams == 0 || streams > MAX_STREAMS {
        return Err(ProtocolError::Unencodable {
            msg,
            reason: format!("{streams} streams is outside 1..={MAX_STREAMS}"),
        });
    }
    put_u32(out, streams);
    Ok(())
}

pub(super) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Writes a `u16`-length-prefixed string, refusing more than `max` bytes.
pub(super) fn put_string(
    out: &mut Vec<u8>,
    msg: &'static str,
    what: &str,
    s: &str,
    max: usize,
) -> Result<(), ProtocolError> {
    let len = u16::try_from(s.len())
        .ok()
        .filter(|&l| usize::from(l) <= max)
        .ok_or_else(|| ProtocolError::Unencodable {
            msg,
            reason: format!("{what} is {} bytes, limit {max}", s.len()),
        })?;
    put_u16(out, len);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Writes a `u32` count, refusing more than `max` elements.
pub(super) fn put_count(
    out: &mut Vec<u8>,
    msg: &'static str,
    what: &str,
    n: usize,
    max: usize,
) -> Result<(), ProtocolError> {
    let v =
        u32::try_from(n)
            .ok()
            .filter(|_| n <= max)
            .ok_or_else(|| ProtocolError::Unencodable {
                msg,
                reason: format!("{n} {what} exceeds the limit of {max}"),
            })?;
    put_u32(out, v);
    Ok(())
}

/// `s` cut to at most `max` bytes at a character boundary.
pub(super) fn truncate_text(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
