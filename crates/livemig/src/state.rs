//! Versioned state sections and the device-state seam.
//!
//! Everything that is not guest memory travels as [`Section`]s: a name (for
//! example `vcpu.0.regs`, `irqchip`, `serial.com1`), a version, and opaque
//! bytes. A receiver refuses a section whose version it does not know, with an
//! error that names the section and both versions (like QEMU's
//! `version_id` / `minimum_version_id`).

/// Longest section name accepted on the wire.
pub const MAX_SECTION_NAME: usize = 64;
/// Largest single section accepted on the wire (bytes).
pub const MAX_SECTION_LEN: usize = 1 << 20;

/// One named, versioned blob of state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Unique name within the migration stream, ASCII, at most [`MAX_SECTION_NAME`] bytes.
    pub name: String,
    /// Format version of `data`.
    pub version: u32,
    /// The encoded state.
    pub data: Vec<u8>,
}

impl Section {
    /// Builds a section.
    pub fn new(name: impl Into<String>, version: u32, data: Vec<u8>) -> Self {
        Section {
            name: name.into(),
            version,
            data,
        }
    }
}

/// Errors saving or restoring state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The receiver does not know this section version.
    #[error("section '{name}': version {got} is not supported (this side reads {min}..={max})")]
    UnsupportedVersion {
        /// Section name.
        name: String,
        /// Version found in the stream.
        got: u32,
        /// Oldest version this side reads.
        min: u32,
        /// Newest version this side reads.
        max: u32,
    },
    /// A section the receiver needs is missing.
    #[error("section '{0}' is missing from the stream")]
    Missing(String),
    /// A section nobody on this side claims.
    #[error("section '{0}' is unknown to this side")]
    Unknown(String),
    /// The section's bytes are malformed.
    #[error("section '{name}': {reason}")]
    Malformed {
        /// Section name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The hypervisor refused to save or load the state.
    #[error("section '{name}': {op} failed: {source}")]
    Hypervisor {
        /// Section name.
        name: String,
        /// The operation (for example `KVM_SET_SREGS`).
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A device whose state migrates as one section.
///
/// Every method is required: a device that forgets to implement restore
/// does not compile, rather than silently dropping its state.
pub trait DeviceState {
    /// The section name, unique within the VM (for example `serial.com1`).
    fn section_name(&self) -> String;
    /// The version [`DeviceState::save`] writes.
    fn section_version(&self) -> u32;
    /// The oldest version [`DeviceState::restore`] still reads.
    fn min_section_version(&self) -> u32;
    /// Serializes the device state. Called with the VM paused.
    fn save(&self) -> Result<Vec<u8>, StateError>;
    /// Loads state written by `save` of a version in
    /// `min_section_version()..=section_version()`. Called before the VM runs.
    fn restore(&mut self, version: u32, data: &[u8]) -> Result<(), StateError>;

    /// Saves into a [`Section`].
    fn save_section(&self) -> Result<Section, StateError> {
        Ok(Section::new(
            self.section_name(),
            self.section_version(),
            self.save()?,
        ))
    }

    /// Checks the version and restores from a [`Section`].
    fn restore_section(&mut self, s: &Section) -> Result<(), StateError> {
        let (min, max) = (self.min_section_version(), self.section_version());
        if s.version < min || s.version > max {
            return Err(StateError::UnsupportedVersion {
                name: s.name.clone(),
                got: s.version,
                min,
                max,
            });
        }
        self.restore(s.version, &s.data)
    }
}

/// A little-endian reader over a section's bytes that never panics: every
/// read is bounds-checked and reports the section name on failure.
pub struct StateReader<'a> {
    name: &'a str,
    data: &'a [u8],
    pos: usize,
}

impl<'a> StateReader<'a> {
    /// Reads `data` belonging to section `name`.
    pub fn new(name: &'a str, data: &'a [u8]) -> Self {
        StateReader { name, data, pos: 0 }
    }

    fn err(&self, reason: impl Into<String>) -> StateError {
        StateError::Malformed {
            name: self.name.to_string(),
            reason: reason.into(),
        }
    }

    /// Reads `n` raw bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| self.err(format!("truncated at byte {} (wanted {n} more)", self.pos)))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// Reads a fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    /// Reads a `u8`.
    pub fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.array::<1>()?[0])
    }
    /// Reads a little-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    /// Reads a little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    /// Reads a little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Fails unless every byte was consumed (trailing garbage is an error).
    pub fn finish(self) -> Result<(), StateError> {
        if self.pos != self.data.len() {
            return Err(self.err(format!(
                "{} trailing bytes after the end of the state",
                self.data.len() - self.pos
            )));
        }
        Ok(())
    }
}

/// Little-endian writer, the counterpart of [`StateReader`].
#[derive(Default)]
pub struct StateWriter {
    buf: Vec<u8>,
}

impl StateWriter {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }
    /// Appends raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }
    /// Appends a `u8`.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes(&[v])
    }
    /// Appends a little-endian `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// Appends a little-endian `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// Appends a little-endian `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// The encoded bytes.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dev(u32);
    impl DeviceState for Dev {
        fn section_name(&self) -> String {
            "dev".into()
        }
        fn section_version(&self) -> u32 {
            2
        }
        fn min_section_version(&self) -> u32 {
            1
        }
        fn save(&self) -> Result<Vec<u8>, StateError> {
            let mut w = StateWriter::new();
            w.u32(self.0);
            Ok(w.finish())
        }
        fn restore(&mut self, _v: u32, data: &[u8]) -> Result<(), StateError> {
            let mut r = StateReader::new("dev", data);
            self.0 = r.u32()?;
            r.finish()
        }
    }

    #[test]
    fn round_trip_and_versions() {
        let s = Dev(7).save_section().unwrap();
        let mut d = Dev(0);
        d.restore_section(&s).unwrap();
        assert_eq!(d.0, 7);
        let future = Section::new("dev", 3, s.data.clone());
        let e = d.restore_section(&future).unwrap_err();
        assert!(e.to_string().contains("version 3 is not supported"), "{e}");
        let mut bad = s.clone();
        bad.data.push(0);
        assert!(d
            .restore_section(&bad)
            .unwrap_err()
            .to_string()
            .contains("trailing"));
        bad.data.truncate(2);
        assert!(d
            .restore_section(&bad)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
    }
}
