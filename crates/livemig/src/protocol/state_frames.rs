//! The device state's `State` frames, written straight from the sections:
//! only the frames' small headers (the section count, each section's name,
//! version and length) are encoded; each section's data is handed to the
//! writer as it is, gathered with `write_vectored`. The bytes on the wire
//! are those of [`State`]'s encoding, frame by frame
//! ([`super::encoded_state_frames`]).
//!
//! This is the switchover's path (the guest is paused): encoding a state
//! of 64 vCPUs (~460 KB) into a fresh buffer first took 0.2–0.3 ms, most
//! of it the first touch of the buffer's pages, not the copy.

use std::io::Write;

use super::messages::{check_state_frame, check_state_frame_count, pack_state};
use super::{FrameHeader, FrameWriter, MsgKind, ProtocolError, State};
use crate::state::Section;

/// The `State` frames of a device state: the sections packed as
/// [`super::state_frames`] packs them (and refused where it refuses), each
/// frame's headers encoded, the data not copied.
///
/// ```
/// use livemig::protocol::{encoded_state_frames, FrameWriter, StateFrames, MAX_FRAME_PAYLOAD};
/// use livemig::state::Section;
///
/// let sections = vec![Section::new("vcpu.0", 2, vec![7; 4096])];
/// let frames = StateFrames::new(sections.clone(), MAX_FRAME_PAYLOAD)?;
/// // The bytes of the encoded frames, written without copying the data.
/// assert_eq!(frames.encoded(0), encoded_state_frames(sections, MAX_FRAME_PAYLOAD)?[0]);
/// let mut fw = FrameWriter::new(Vec::new());
/// frames.write(&mut fw)?;
/// assert_eq!(fw.bytes_written(), 16 + frames.encoded(0).len() as u64);
/// # Ok::<(), livemig::protocol::ProtocolError>(())
/// ```
#[derive(Debug)]
pub struct StateFrames {
    frames: Vec<Framed>,
}

/// One frame: its sections, their encoded headers and where each ends.
#[derive(Debug)]
struct Framed {
    state: State,
    heads: Vec<u8>,
    cuts: Vec<usize>,
}

impl Framed {
    /// The payload in order: `heads` cut at `cuts`, each section's data
    /// after its header.
    fn parts(&self) -> Vec<&[u8]> {
        let mut parts = Vec::with_capacity(2 * self.cuts.len() + 1);
        let mut at = 0;
        for (s, &cut) in self.state.sections.iter().zip(&self.cuts) {
            parts.push(&self.heads[at..cut]);
            parts.push(s.data.as_slice());
            at = cut;
        }
        if at < self.heads.len() {
            parts.push(&self.heads[at..]);
        }
        parts
    }

    /// The payload's length.
    fn len(&self) -> usize {
        self.heads.len()
            + self
                .state
                .sections
                .iter()
                .map(|s| s.data.len())
                .sum::<usize>()
    }
}

impl StateFrames {
    /// Packs `sections` into `State` frames of at most `max_payload` bytes,
    /// checking everything [`super::state_frames`] checks.
    pub fn new(sections: Vec<Section>, max_payload: usize) -> Result<Self, ProtocolError> {
        let mut frames = Vec::new();
        for state in pack_state(sections, max_payload)? {
            let mut heads = Vec::new();
            let cuts = state.encode_heads(&mut heads)?;
            let f = Framed { state, heads, cuts };
            check_state_frame(&f.state, f.len(), max_payload)?;
            frames.push(f);
        }
        check_state_frame_count(frames.len())?;
        Ok(StateFrames { frames })
    }

    /// How many frames (at least one).
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Always false: an empty state is one frame of no sections.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frame `i`'s payload, encoded (a copy: for tests and measurements;
    /// [`StateFrames::write`] sends without one). Empty past the last frame.
    pub fn encoded(&self, i: usize) -> Vec<u8> {
        self.frames
            .get(i)
            .map_or_else(Vec::new, |f| f.parts().concat())
    }

    /// The CRC that frame `i`'s header carries when it is the writer's
    /// frame `seq` (the writer computes it as it writes; a measurement of
    /// the switchover's work calls this). 0 past the last frame.
    pub fn crc(&self, i: usize, seq: u32) -> u32 {
        self.frames
            .get(i)
            .map_or(0, |f| FrameHeader::new(MsgKind::State, seq, &f.parts()).crc)
    }

    /// Writes every frame on `fw`, in order, the sections' data gathered
    /// as it is.
    pub fn write<W: Write>(&self, fw: &mut FrameWriter<W>) -> Result<(), ProtocolError> {
        for f in &self.frames {
            fw.write_frame(MsgKind::State, &f.parts())?;
        }
        Ok(())
    }

    /// The sections' data bytes.
    pub fn data_bytes(&self) -> u64 {
        self.frames
            .iter()
            .flat_map(|f| &f.state.sections)
            .map(|s| s.data.len() as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{encoded_state_frames, state_frames, FrameReader, Message};

    fn sections(n: usize, len: usize) -> Vec<Section> {
        (0..n)
            .map(|i| Section::new(format!("dev{i}"), i as u32, vec![i as u8; len + i]))
            .collect()
    }

    #[test]
    fn the_frames_are_the_state_encoded() {
        // Sections of 1014+ bytes on the wire, frames of at most 3000.
        for input in [sections(10, 1000), sections(1, 0), Vec::new()] {
            let want = encoded_state_frames(input.clone(), 3000).unwrap();
            let frames = StateFrames::new(input.clone(), 3000).unwrap();
            assert_eq!(frames.len(), want.len());
            assert!(!frames.is_empty());
            let got: Vec<Vec<u8>> = (0..frames.len()).map(|i| frames.encoded(i)).collect();
            assert_eq!(got, want);
            let data: usize = input.iter().map(|s| s.data.len()).sum();
            assert_eq!(frames.data_bytes(), data as u64);
        }
    }

    #[test]
    fn written_frames_read_back_as_the_sections() {
        let input = sections(10, 1000);
        let frames = StateFrames::new(input.clone(), 3000).unwrap();
        let mut fw = FrameWriter::new(Vec::new());
        fw.write_frame(MsgKind::Keepalive, &[]).unwrap();
        let crcs: Vec<u32> = (0..frames.len())
            .map(|i| frames.crc(i, 1 + i as u32))
            .collect();
        frames.write(&mut fw).unwrap();
        let bytes = fw.into_inner();
        let mut fr = FrameReader::new(bytes.as_slice());
        assert_eq!(fr.read_frame().unwrap().kind, MsgKind::Keepalive);
        let mut back = Vec::new();
        for crc in crcs {
            let f = fr.read_frame().unwrap();
            assert_eq!(f.kind, MsgKind::State);
            let header = FrameHeader::new(MsgKind::State, f.seq, &[f.payload]);
            assert_eq!(header.crc, crc);
            back.extend(State::decode(f.payload).unwrap().sections);
        }
        assert_eq!(back, input);
    }

    #[test]
    fn refuses_what_state_frames_refuses() {
        let mut dup = sections(2, 10);
        dup[1].name = dup[0].name.clone();
        let mut bad_name = sections(1, 10);
        bad_name[0].name = "tab\there".into();
        for (input, max) in [(dup, 3000), (sections(1, 5000), 3000), (bad_name, 3000)] {
            let a = state_frames(input.clone(), max).unwrap_err().to_string();
            let b = StateFrames::new(input, max).unwrap_err().to_string();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn an_encoded_state_is_the_same_through_heads() {
        let s = State {
            sections: sections(3, 7),
        };
        let mut heads = Vec::new();
        let cuts = s.encode_heads(&mut heads).unwrap();
        assert_eq!(cuts.len(), 3);
        let f = Framed {
            state: s.clone(),
            heads,
            cuts,
        };
        assert_eq!(f.parts().concat(), s.encode().unwrap());
        assert_eq!(f.len(), s.encode().unwrap().len());
    }
}
