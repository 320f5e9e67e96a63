//! The post-copy messages (kinds 16–22, only sent once both sides agreed on
//! post-copy in the handshake; 21–22 only when the destination also granted
//! the preparation; see `docs/postcopy.md`).

use super::codec::{put_count, put_u32, put_u64, Cursor};
use super::{Message, MsgKind, ProtocolError};
use crate::memory::MemoryLayout;

/// Most runs one [`PostcopySwitch`] may carry (a fully fragmented 64 GiB
/// guest has 8 Mi runs; more than that is not a bitmap of this engine's).
pub const MAX_DISCARD_RUNS: usize = 1 << 23;
/// Most pages one [`PageRequest`] may ask for.
pub const MAX_REQUEST_PAGES: u32 = 64;

/// A run of pages inside one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// Region index, in layout order.
    pub region: u32,
    /// First page, counted from the region's start.
    pub first_page: u64,
    /// Pages in the run (at least 1).
    pub npages: u64,
}

impl PageRun {
    /// Checks the run against `layout`: a known region, at least one page,
    /// and every page inside the region.
    pub fn check(&self, layout: &MemoryLayout) -> Result<(), ProtocolError> {
        let pages = layout
            .regions()
            .get(self.region as usize)
            .map(|r| r.pages())
            .unwrap_or(0);
        let end = self.first_page.checked_add(self.npages);
        if self.npages == 0 || end.is_none_or(|e| e > pages) {
            return Err(ProtocolError::Malformed {
                msg: "PageRun",
                offset: 0,
                reason: format!(
                    "pages {}+{} of region {} are outside the memory layout",
                    self.first_page, self.npages, self.region
                ),
            });
        }
        Ok(())
    }
}

/// Source → destination: the guest switches to post-copy. The destination
/// drops the pages of `discard` (their content there is stale or was never
/// sent) and gets each of them again, on demand or pushed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PostcopySwitch {
    /// The pages to drop, sorted by (region, page), non-overlapping.
    pub discard: Vec<PageRun>,
}

/// Source → destination, before the source pauses (only when the
/// destination granted the preparation): the pages the destination does
/// not have (dirtied since sent, or never sent) as the running source sees
/// them now. The destination drops them, arms its installer and answers
/// [`PostcopyArmed`]; no `Pages` frame follows (the next memory frame is
/// the [`PostcopySwitch`] with the pages dirtied since).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PostcopyPrepare {
    /// The pages to drop, sorted by (region, page), non-overlapping.
    pub discard: Vec<PageRun>,
}

/// Destination → source: the pages of the [`PostcopyPrepare`] are dropped
/// and the installer is armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PostcopyArmed {
    /// How long arming took on the destination, µs.
    pub arm_us: u64,
}

impl Message for PostcopyPrepare {
    const KIND: MsgKind = MsgKind::PostcopyPrepare;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        put_runs(out, "PostcopyPrepare", &self.discard)
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        Ok(PostcopyPrepare {
            discard: read_runs("PostcopyPrepare", payload)?,
        })
    }
}

impl Message for PostcopyArmed {
    const KIND: MsgKind = MsgKind::PostcopyArmed;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        put_u64(out, self.arm_us);
        Ok(())
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("PostcopyArmed", payload);
        let arm_us = c.u64()?;
        c.finish()?;
        Ok(PostcopyArmed { arm_us })
    }
}

/// Destination → source, first frame of a new control connection after the
/// previous one broke during post-copy: the pages of the discard set still
/// missing here (the source pushes them again).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PostcopyResume {
    /// The missing pages, sorted by (region, page), non-overlapping.
    pub missing: Vec<PageRun>,
}

const RUN_LEN: usize = 4 + 8 + 8;

fn put_runs(out: &mut Vec<u8>, msg: &'static str, runs: &[PageRun]) -> Result<(), ProtocolError> {
    put_count(out, msg, "runs", runs.len(), MAX_DISCARD_RUNS)?;
    for r in runs {
        put_u32(out, r.region);
        put_u64(out, r.first_page);
        put_u64(out, r.npages);
    }
    Ok(())
}

impl Message for PostcopyResume {
    const KIND: MsgKind = MsgKind::PostcopyResume;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        put_runs(out, "PostcopyResume", &self.missing)
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        Ok(PostcopyResume {
            missing: read_runs("PostcopyResume", payload)?,
        })
    }
}

impl Message for PostcopySwitch {
    const KIND: MsgKind = MsgKind::PostcopySwitch;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        put_runs(out, "PostcopySwitch", &self.discard)
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        Ok(PostcopySwitch {
            discard: read_runs("PostcopySwitch", payload)?,
        })
    }
}

/// Reads runs that are non-empty, sorted and disjoint.
fn read_runs(msg: &'static str, payload: &[u8]) -> Result<Vec<PageRun>, ProtocolError> {
    {
        let mut c = Cursor::new(msg, payload);
        let n = c.count("runs", MAX_DISCARD_RUNS, RUN_LEN)?;
        let mut discard = Vec::with_capacity(n);
        let mut prev: Option<(u32, u64)> = None; // region, end page
        for _ in 0..n {
            let at = c.pos;
            let run = PageRun {
                region: c.u32()?,
                first_page: c.u64()?,
                npages: c.u64()?,
            };
            let end = run.first_page.checked_add(run.npages);
            let ordered = match prev {
                Some((region, prev_end)) => {
                    run.region > region || (run.region == region && run.first_page >= prev_end)
                }
                None => true,
            };
            let (true, Some(end), true) = (run.npages > 0, end, ordered) else {
                return Err(c.malformed_at(at, "runs must be non-empty, sorted and disjoint"));
            };
            prev = Some((run.region, end));
            discard.push(run);
        }
        c.finish()?;
        Ok(discard)
    }
}

/// Destination → source, on the fault connection: the guest touched a page
/// it does not have yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// Region index.
    pub region: u32,
    /// First page, counted from the region's start.
    pub page: u64,
    /// Pages wanted, 1..=[`MAX_REQUEST_PAGES`].
    pub npages: u32,
}

impl Message for PageRequest {
    const KIND: MsgKind = MsgKind::PageRequest;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        if self.npages == 0 || self.npages > MAX_REQUEST_PAGES {
            return Err(ProtocolError::Unencodable {
                msg: "PageRequest",
                reason: format!("{} pages is outside 1..={MAX_REQUEST_PAGES}", self.npages),
            });
        }
        put_u32(out, self.region);
        put_u64(out, self.page);
        put_u32(out, self.npages);
        Ok(())
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("PageRequest", payload);
        let region = c.u32()?;
        let page = c.u64()?;
        let at = c.pos;
        let npages = c.u32()?;
        if npages == 0 || npages > MAX_REQUEST_PAGES {
            let why = format!("{npages} pages is outside 1..={MAX_REQUEST_PAGES}");
            return Err(c.malformed_at(at, why));
        }
        c.finish()?;
        Ok(PageRequest {
            region,
            page,
            npages,
        })
    }
}

/// Source → destination: every page of the discard set was sent at least
/// once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostcopyPushed {
    /// Pages the source sent after the switch (pushed and requested).
    pub pages: u64,
}

/// Destination → source: every page of the discard set is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostcopyComplete {
    /// Pages installed after the switch.
    pub pages: u64,
}

macro_rules! count_message {
    ($t:ident, $kind:expr, $name:literal) => {
        impl Message for $t {
            const KIND: MsgKind = $kind;

            fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
                put_u64(out, self.pages);
                Ok(())
            }

            fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
                let mut c = Cursor::new($name, payload);
                let pages = c.u64()?;
                c.finish()?;
                Ok($t { pages })
            }
        }
    };
}

count_message!(PostcopyPushed, MsgKind::PostcopyPushed, "PostcopyPushed");
count_message!(
    PostcopyComplete,
    MsgKind::PostcopyComplete,
    "PostcopyComplete"
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RegionDesc;

    fn round_trip<M: Message + PartialEq + std::fmt::Debug>(m: &M) {
        let bytes = m.encode().unwrap();
        assert_eq!(&M::decode(&bytes).unwrap(), m);
        for cut in 0..bytes.len() {
            assert!(M::decode(&bytes[..cut]).is_err(), "truncated at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(M::decode(&long).is_err(), "trailing byte");
    }

    fn run(region: u32, first_page: u64, npages: u64) -> PageRun {
        PageRun {
            region,
            first_page,
            npages,
        }
    }

    #[test]
    fn every_postcopy_message_round_trips() {
        round_trip(&PostcopySwitch {
            discard: vec![run(0, 0, 3), run(0, 10, 1), run(1, 0, 7)],
        });
        round_trip(&PostcopySwitch::default());
        round_trip(&PostcopyResume {
            missing: vec![run(0, 4, 2), run(2, 0, 1)],
        });
        round_trip(&PageRequest {
            region: 1,
            page: 77,
            npages: 1,
        });
        round_trip(&PostcopyPushed { pages: 9 });
        round_trip(&PostcopyComplete { pages: 9 });
        round_trip(&PostcopyPrepare {
            discard: vec![run(0, 1, 2), run(1, 5, 9)],
        });
        round_trip(&PostcopyPrepare::default());
        round_trip(&PostcopyArmed { arm_us: 31_000 });
    }

    #[test]
    fn hello_offers_and_reply_grants_postcopy() {
        use crate::protocol::{Hello, HelloReply};
        use crate::vm::VmDescription;
        let layout = MemoryLayout::new(vec![RegionDesc {
            guest_addr: 0,
            size: 4096,
        }])
        .unwrap();
        let desc = VmDescription {
            layout,
            vcpus: 1,
            nics: Vec::new(),
            properties: Default::default(),
        };
        let plain = Hello::new(desc.clone());
        let mut offer = plain.clone();
        offer.postcopy = true;
        let (plain_bytes, offer_bytes) = (plain.encode().unwrap(), offer.encode().unwrap());
        assert_ne!(plain_bytes, offer_bytes);
        assert!(!Hello::decode(&plain_bytes).unwrap().postcopy);
        let got = Hello::decode(&offer_bytes).unwrap();
        assert!(got.postcopy && got.desc.properties.is_empty(), "{got:?}");
        let mut reply = HelloReply::accepted(1, [3; 16]);
        reply.postcopy = true;
        let bytes = reply.encode().unwrap();
        assert_eq!(HelloReply::decode(&bytes).unwrap(), reply);
        reply.postcopy = false;
        let shorter = reply.encode().unwrap();
        assert_eq!(shorter.len() + 1, bytes.len());
        assert!(!HelloReply::decode(&shorter).unwrap().postcopy);
    }

    #[test]
    fn discard_runs_must_be_sorted_disjoint_and_non_empty() {
        for bad in [
            vec![run(0, 5, 3), run(0, 7, 1)], // overlap
            vec![run(1, 0, 1), run(0, 9, 1)], // unsorted regions
            vec![run(0, 0, 0)],               // empty
            vec![run(0, u64::MAX, 2)],        // wraps
        ] {
            let bytes = PostcopySwitch {
                discard: bad.clone(),
            }
            .encode()
            .unwrap();
            assert!(PostcopySwitch::decode(&bytes).is_err(), "{bad:?}");
            assert!(PostcopyPrepare::decode(&bytes).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_request_asks_for_1_to_64_pages() {
        for npages in [0, MAX_REQUEST_PAGES + 1] {
            let r = PageRequest {
                region: 0,
                page: 0,
                npages,
            };
            assert!(r.encode().is_err());
            let mut bytes = Vec::new();
            put_u32(&mut bytes, 0);
            put_u64(&mut bytes, 0);
            put_u32(&mut bytes, npages);
            assert!(PageRequest::decode(&bytes).is_err());
        }
    }

    #[test]
    fn runs_are_checked_against_the_layout() {
        let layout = MemoryLayout::new(vec![RegionDesc {
            guest_addr: 0,
            size: 16 * 4096,
        }])
        .unwrap();
        assert!(run(0, 0, 16).check(&layout).is_ok());
        assert!(run(0, 15, 2).check(&layout).is_err());
        assert!(run(1, 0, 1).check(&layout).is_err());
        assert!(run(0, u64::MAX, 1).check(&layout).is_err());
    }
}
