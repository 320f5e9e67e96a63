//! The typed control messages ([`Message`] and its implementations).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use super::codec::{
    put_count, put_streams, put_string, put_u16, put_u32, put_u64, truncate_text, Cursor,
};
use super::{
    MsgKind, ProtocolError, MAX_NICS, MAX_PROPERTIES, MAX_PROPERTY_LEN, MAX_SECTIONS,
    MAX_STATE_FRAMES, MAX_STREAMS, MAX_TEXT_LEN, MAX_VCPUS, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use crate::local::{LocalIdentity, RegionIdentity};
use crate::memory::{MemoryLayout, RegionDesc, MAX_REGIONS, PAGE_SIZE};
use crate::state::{Section, MAX_SECTION_LEN, MAX_SECTION_NAME};
use crate::vm::{NicInfo, RestoreRehearsal, VmDescription};

/// Magic at the start of a [`Hello`].
pub const HELLO_MAGIC: [u8; 8] = *b"LIVEMIG\0";
/// The property key by which a version-3 [`Hello`] says the source VM is
/// paused (value `"1"`). Keys starting with `livemig.` are the engine's: a
/// VM description may not use them.
pub const PAUSED_PROPERTY: &str = "livemig.paused";
/// The property key by which a [`Hello`] offers post-copy (value `"1"`;
/// see `docs/postcopy.md`). Sent only by a source that may use post-copy,
/// so a source that does not sends the bytes it always sent.
pub const POSTCOPY_PROPERTY: &str = "livemig.postcopy";
/// The property key by which a [`Hello`] that offers post-copy also offers
/// to prepare it before the pause (value `"1"`: `PostcopyPrepare` /
/// `PostcopyArmed`, see `docs/postcopy.md`). A destination that does not
/// know it reads it as an ordinary property and grants plain post-copy.
pub const POSTCOPY_PREPARE_PROPERTY: &str = "livemig.postcopy.prepare";
/// The property key by which a [`Hello`] offers a same-host hand-over
/// (local mode; value: the source host's boot id), with one
/// `livemig.local.<i>` property per memory region (value
/// `dev:ino:offset:len`, see [`RegionIdentity`]). Sent only by
/// `migrate_local`.
pub const LOCAL_PROPERTY: &str = "livemig.local";
/// The property key by which a [`Hello`] offers the switchover probe
/// (value `"1"`: kinds 23–24, `Probe` / `ProbeReply`, see
/// `docs/protocol.md`). A destination that does not know it reads it as an
/// ordinary property and never grants it; the source then sends no probe.
pub const PROBE_PROPERTY: &str = "livemig.probe";
/// The property key by which a [`Hello`] asks the destination for its
/// restore cost (value `"1"`): a destination that knows it answers with
/// [`HelloReply::restore_cost`] when its VM could time a restore. A
/// destination that does not know it reads it as an ordinary property and
/// answers without one; the source then estimates the restore as long as
/// its own save.
pub const RESTORE_COST_PROPERTY: &str = "livemig.restore_cost";

/// The property key by which a [`Hello`] asks for `PagesGather` frames
/// (value `"1"`): page data sent straight from guest memory, each page
/// with its own CRC. A destination that knows them grants them with
/// [`HelloReply::pages_gather`]; one that does not reads the key as an
/// ordinary property and never grants it, and the source then sends the
/// `Pages` frames it always sent.
pub const PAGES_GATHER_PROPERTY: &str = "livemig.pages_gather";

/// The property key by which a [`Hello`] asks whether the destination's
/// VM starts the guest before it wakes the vCPU threads (value `"1"`;
/// [`crate::vm::DestinationVm::started_before_wake`]): a destination that
/// knows it answers with [`HelloReply::started_before_wake`] when its VM
/// says so. A destination that does not know it reads it as an ordinary
/// property and never answers; the source then counts the destination's
/// resume as long as its own.
pub const STARTED_BEFORE_WAKE_PROPERTY: &str = "livemig.started_before_wake";

/// The property key by which a [`Hello`] offers the read count (value
/// `"1"`: kinds 26–27, `ReadQuery` / `ReadCount`, see `docs/protocol.md`):
/// a destination that knows it grants it with [`HelloReply::read_count`]
/// and answers each `ReadQuery`. One that does not reads the key as an
/// ordinary property and never grants it; the source then ends its rounds
/// on its send queue alone, as before.
pub const READ_COUNT_PROPERTY: &str = "livemig.read_count";

/// The byte that grants [`HelloReply::pages_gather`] (after the restore
/// cost if any).
const PAGES_GATHER_TAG: u8 = 6;

/// The byte that says [`HelloReply::started_before_wake`] (after the
/// `PagesGather` grant if any).
const STARTED_BEFORE_WAKE_TAG: u8 = 7;

/// The byte that grants [`HelloReply::read_count`] (last in the reply,
/// after the `started_before_wake` byte if any).
const READ_COUNT_TAG: u8 = 8;

/// The byte that introduces [`HelloReply::restore_cost`] (after the grant
/// byte, if any; distinct from every grant byte): then the rehearsal's save
/// and restore, in µs, each a u64.
const RESTORE_COST_TAG: u8 = 5;

/// The longest save or restore a `HelloReply`'s restore cost may carry
/// (60 s each); a longer one is refused as malformed.
pub const MAX_RESTORE_COST: Duration = Duration::from_secs(60);

/// A message with a typed payload (every kind except `Pages`).
pub trait Message: Sized {
    /// The frame kind carrying this message.
    const KIND: MsgKind;

    /// Appends the encoded payload to `out`. Fails (without a partial frame
    /// ever being sent) if a field exceeds a protocol limit.
    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError>;

    /// Decodes a payload: every field is bounds-checked, trailing bytes are
    /// refused, and allocation is bounded by the payload length.
    fn decode(payload: &[u8]) -> Result<Self, ProtocolError>;

    /// The encoded payload.
    fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let mut v = Vec::new();
        self.encode_into(&mut v)?;
        Ok(v)
    }
}

/// First message (source → destination): protocol versions and the VM shape.
///
/// The prefix `magic, protocol_version, min_protocol_version` is frozen for
/// all versions, so that any two sides can at least negotiate; the rest of
/// the layout belongs to the protocol version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// [`HELLO_MAGIC`].
    pub magic: [u8; 8],
    /// Newest protocol version the sender speaks.
    pub protocol_version: u32,
    /// Oldest protocol version the sender speaks.
    pub min_protocol_version: u32,
    /// The sender's page size (must equal [`PAGE_SIZE`]).
    pub page_size: u32,
    /// The VM to migrate.
    pub desc: VmDescription,
    /// Page streams the source would like to use (1 ..= [`MAX_STREAMS`]);
    /// the destination grants at most this many in [`HelloReply::streams`].
    pub streams: u32,
    /// The source VM was paused (by its operator) when the migration
    /// started: the destination keeps it paused after `Go`.
    pub paused: bool,
    /// The source offers post-copy ([`POSTCOPY_PROPERTY`]).
    pub postcopy: bool,
    /// With `postcopy`: the preparation before the pause is offered too
    /// (the [`POSTCOPY_PREPARE_PROPERTY`]).
    pub postcopy_prepare: bool,
    /// The source asks for a same-host hand-over of the memory it names
    /// ([`LOCAL_PROPERTY`]).
    pub local: Option<LocalIdentity>,
    /// The source offers the switchover probe ([`PROBE_PROPERTY`]).
    pub probe: bool,
    /// The source asks for the destination's restore cost
    /// ([`RESTORE_COST_PROPERTY`]).
    pub restore_cost: bool,
    /// The source asks for `PagesGather` frames
    /// ([`PAGES_GATHER_PROPERTY`]).
    pub pages_gather: bool,
    /// The source asks whether the destination's VM starts the guest
    /// before it wakes the vCPU threads
    /// ([`STARTED_BEFORE_WAKE_PROPERTY`]).
    pub started_before_wake: bool,
    /// The source offers to ask for the destination's read count
    /// ([`READ_COUNT_PROPERTY`]).
    pub read_count: bool,
}

impl Hello {
    /// A `Hello` for this side's versions and page size.
    pub fn new(desc: VmDescription) -> Self {
        Hello {
            magic: HELLO_MAGIC,
            protocol_version: PROTOCOL_VERSION,
            min_protocol_version: MIN_PROTOCOL_VERSION,
            page_size: PAGE_SIZE as u32,
            desc,
            streams: 1,
            paused: false,
            postcopy: false,
            postcopy_prepare: false,
            local: None,
            probe: false,
            restore_cost: false,
            pages_gather: false,
            started_before_wake: false,
            read_count: false,
        }
    }

    /// The protocol version both sides will speak: the newest one in both
    /// ranges.
    pub fn negotiated_version(&self) -> Result<u32, ProtocolError> {
        negotiate(self.min_protocol_version, self.protocol_version)
    }
}

/// The newest version in both `peer_min..=peer_max` and this side's range.
fn negotiate(peer_min: u32, peer_max: u32) -> Result<u32, ProtocolError> {
    let v = peer_max.min(PROTOCOL_VERSION);
    if peer_min > peer_max || v < peer_min || v < MIN_PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion {
            peer_version: peer_max,
            peer_min,
            min: MIN_PROTOCOL_VERSION,
            max: PROTOCOL_VERSION,
        });
    }
    Ok(v)
}

const NIC_LEN: usize = 6 + 1 + 4;

impl Message for Hello {
    const KIND: MsgKind = MsgKind::Hello;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        const M: &str = "Hello";
        let d = &self.desc;
        if d.vcpus == 0 || d.vcpus > MAX_VCPUS {
            return Err(ProtocolError::Unencodable {
                msg: M,
                reason: format!("{} vCPUs is outside 1..={MAX_VCPUS}", d.vcpus),
            });
        }
        out.extend_from_slice(&self.magic);
        put_u32(out, self.protocol_version);
        put_u32(out, self.min_protocol_version);
        put_u32(out, self.page_size);
        let regions = d.layout.regions();
        put_count(out, M, "regions", regions.len(), MAX_REGIONS)?;
        for r in regions {
            put_u64(out, r.guest_addr);
            put_u64(out, r.size);
        }
        put_u32(out, d.vcpus);
        put_count(out, M, "NICs", d.nics.len(), MAX_NICS)?;
        for nic in &d.nics {
            out.extend_from_slice(&nic.mac);
            match nic.ipv4 {
                Some(ip) => {
                    out.push(1);
                    out.extend_from_slice(&ip);
                }
                None => out.extend_from_slice(&[0; 5]),
            }
        }
        let mut props: Vec<(&str, &str)> = Vec::with_capacity(d.properties.len() + 1);
        for (k, v) in &d.properties {
            if k.starts_with("livemig.") {
                return Err(ProtocolError::Unencodable {
                    msg: M,
                    reason: format!("property key '{k}': the livemig. prefix is reserved"),
                });
            }
            props.push((k, v));
        }
        if self.paused {
            props.push((PAUSED_PROPERTY, "1"));
        }
        if self.postcopy {
            props.push((POSTCOPY_PROPERTY, "1"));
        }
        if self.postcopy_prepare {
            props.push((POSTCOPY_PREPARE_PROPERTY, "1"));
        }
        if self.probe {
            props.push((PROBE_PROPERTY, "1"));
        }
        if self.restore_cost {
            props.push((RESTORE_COST_PROPERTY, "1"));
        }
        if self.pages_gather {
            props.push((PAGES_GATHER_PROPERTY, "1"));
        }
        if self.started_before_wake {
            props.push((STARTED_BEFORE_WAKE_PROPERTY, "1"));
        }
        if self.read_count {
            props.push((READ_COUNT_PROPERTY, "1"));
        }
        let local = local_properties(self.local.as_ref());
        props.extend(local.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        put_count(out, M, "properties", props.len(), MAX_PROPERTIES)?;
        for (k, v) in props {
            if k.is_empty() {
                return Err(ProtocolError::Unencodable {
                    msg: M,
                    reason: "empty property key".to_string(),
                });
            }
            put_string(out, M, &format!("property key '{k}'"), k, MAX_PROPERTY_LEN)?;
            put_string(
                out,
                M,
                &format!("property '{k}' value"),
                v,
                MAX_PROPERTY_LEN,
            )?;
        }
        put_streams(out, M, self.streams)
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("Hello", payload);
        let magic: [u8; 8] = c.array()?;
        if magic != HELLO_MAGIC {
            return Err(ProtocolError::BadHelloMagic { got: magic });
        }
        let protocol_version = c.u32()?;
        let min_protocol_version = c.u32()?;
        // Refuse before parsing a layout that may belong to another version.
        negotiate(min_protocol_version, protocol_version)?;
        let page_size = c.u32()?;
        if u64::from(page_size) != PAGE_SIZE {
            return Err(ProtocolError::PageSizeMismatch {
                peer: page_size,
                ours: PAGE_SIZE,
            });
        }

        let layout = read_layout(&mut c)?;
        let vcpus = read_vcpus(&mut c)?;
        let nics = read_nics(&mut c)?;
        let (properties, mut flags) = read_properties(&mut c)?;
        let streams = c.streams()?;
        // A newer sender may append fields of its own version: they are not
        // ours to read. From our own version (or older), trailing bytes are
        // an error.
        if protocol_version <= PROTOCOL_VERSION {
            c.finish()?;
        }
        Ok(Hello {
            magic,
            protocol_version,
            min_protocol_version,
            page_size,
            desc: VmDescription {
                layout,
                vcpus,
                nics,
                properties,
            },
            streams,
            paused: flags.paused,
            postcopy: flags.postcopy,
            postcopy_prepare: flags.postcopy_prepare,
            local: flags.local()?,
            probe: flags.probe,
            restore_cost: flags.restore_cost,
            pages_gather: flags.pages_gather,
            started_before_wake: flags.started_before_wake,
            read_count: flags.read_count,
        })
    }
}

/// The engine's own flags among a [`Hello`]'s properties.
#[derive(Default)]
struct HelloFlags {
    paused: bool,
    postcopy: bool,
    postcopy_prepare: bool,
    probe: bool,
    restore_cost: bool,
    pages_gather: bool,
    started_before_wake: bool,
    read_count: bool,
    /// [`LOCAL_PROPERTY`]'s value.
    boot_id: Option<String>,
    /// The `livemig.local.<i>` properties, by index.
    local_regions: BTreeMap<usize, RegionIdentity>,
}

impl HelloFlags {
    /// The local hand-over asked for: a boot id and regions `0..n`, or
    /// neither.
    fn local(&mut self) -> Result<Option<LocalIdentity>, ProtocolError> {
        let bad = |reason: String| ProtocolError::Malformed {
            msg: "Hello",
            offset: 0,
            reason,
        };
        let regions = std::mem::take(&mut self.local_regions);
        let Some(boot_id) = self.boot_id.take() else {
            if regions.is_empty() {
                return Ok(None);
            }
            return Err(bad(format!(
                "{LOCAL_PROPERTY}.<i> without {LOCAL_PROPERTY}"
            )));
        };
        if regions.keys().copied().ne(0..regions.len()) {
            return Err(bad(format!("{LOCAL_PROPERTY}.<i> indices are not 0..n")));
        }
        Ok(Some(LocalIdentity {
            boot_id,
            regions: regions.into_values().collect(),
        }))
    }

    /// Takes a `livemig.local` or `livemig.local.<i>` property; false if
    /// `k` is neither.
    fn take_local(&mut self, k: &str, v: &str) -> Result<bool, String> {
        if k == LOCAL_PROPERTY {
            if v.is_empty() || self.boot_id.is_some() {
                return Err(format!("property '{k}' is empty or appears twice"));
            }
            self.boot_id = Some(v.to_string());
            return Ok(true);
        }
        let Some(index) = k
            .strip_prefix(LOCAL_PROPERTY)
            .and_then(|r| r.strip_prefix('.'))
        else {
            return Ok(false);
        };
        let index: usize = index
            .parse()
            .ok()
            .filter(|i| *i < MAX_REGIONS)
            .ok_or_else(|| format!("property '{k}': not a region index"))?;
        let id = RegionIdentity::decode(v).ok_or_else(|| format!("property '{k}' is {v:?}"))?;
        if self.local_regions.insert(index, id).is_some() {
            return Err(format!("property '{k}' appears twice"));
        }
        Ok(true)
    }
}

/// The properties by which a [`Hello`] asks for a local hand-over.
fn local_properties(local: Option<&LocalIdentity>) -> Vec<(String, String)> {
    let Some(l) = local else {
        return Vec::new();
    };
    let mut props = vec![(LOCAL_PROPERTY.to_string(), l.boot_id.clone())];
    for (i, r) in l.regions.iter().enumerate() {
        props.push((format!("{LOCAL_PROPERTY}.{i}"), r.encode()));
    }
    props
}

/// Reads a [`Hello`]'s region count and regions as a valid layout.
fn read_layout(c: &mut Cursor<'_>) -> Result<MemoryLayout, ProtocolError> {
    let at = c.pos;
    let n = c.count("regions", MAX_REGIONS, 16)?;
    let mut regions = Vec::with_capacity(n);
    for _ in 0..n {
        regions.push(RegionDesc {
            guest_addr: c.u64()?,
            size: c.u64()?,
        });
    }
    MemoryLayout::new(regions)
        .map_err(|e| c.malformed_at(at, format!("invalid memory layout: {e}")))
}

/// Reads a [`Hello`]'s vCPU count, `1..=MAX_VCPUS`.
fn read_vcpus(c: &mut Cursor<'_>) -> Result<u32, ProtocolError> {
    let at = c.pos;
    let vcpus = c.u32()?;
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(c.malformed_at(at, format!("{vcpus} vCPUs is outside 1..={MAX_VCPUS}")));
    }
    Ok(vcpus)
}

/// Reads a [`Hello`]'s NIC count and NICs.
fn read_nics(c: &mut Cursor<'_>) -> Result<Vec<NicInfo>, ProtocolError> {
    let n = c.count("NICs", MAX_NICS, NIC_LEN)?;
    let mut nics = Vec::with_capacity(n);
    for i in 0..n {
        let mac: [u8; 6] = c.array()?;
        let has_ip = c.bool(&format!("NIC {i} has_ip"))?;
        let at = c.pos;
        let ip: [u8; 4] = c.array()?;
        if !has_ip && ip != [0; 4] {
            return Err(c.malformed_at(at, format!("NIC {i}: address bytes set without has_ip")));
        }
        nics.push(NicInfo {
            mac,
            ipv4: has_ip.then_some(ip),
        });
    }
    Ok(nics)
}

/// Reads a [`Hello`]'s properties: the description's, and the engine's
/// reserved flags ([`PAUSED_PROPERTY`], [`POSTCOPY_PROPERTY`]).
fn read_properties(
    c: &mut Cursor<'_>,
) -> Result<(BTreeMap<String, String>, HelloFlags), ProtocolError> {
    let n = c.count("properties", MAX_PROPERTIES, 4)?;
    let mut properties = BTreeMap::new();
    let mut flags = HelloFlags::default();
    for i in 0..n {
        let at = c.pos;
        let k = c.string(&format!("property {i} key"), MAX_PROPERTY_LEN)?;
        if k.is_empty() {
            return Err(c.malformed_at(at, format!("property {i} has an empty key")));
        }
        let v = c.string(&format!("property '{k}' value"), MAX_PROPERTY_LEN)?;
        if flags
            .take_local(&k, &v)
            .map_err(|r| c.malformed_at(at, r))?
        {
            continue;
        }
        let flag = match k.as_str() {
            PAUSED_PROPERTY => Some(&mut flags.paused),
            POSTCOPY_PROPERTY => Some(&mut flags.postcopy),
            POSTCOPY_PREPARE_PROPERTY => Some(&mut flags.postcopy_prepare),
            PROBE_PROPERTY => Some(&mut flags.probe),
            RESTORE_COST_PROPERTY => Some(&mut flags.restore_cost),
            PAGES_GATHER_PROPERTY => Some(&mut flags.pages_gather),
            STARTED_BEFORE_WAKE_PROPERTY => Some(&mut flags.started_before_wake),
            READ_COUNT_PROPERTY => Some(&mut flags.read_count),
            _ => None,
        };
        let Some(flag) = flag else {
            if properties.contains_key(&k) {
                return Err(c.malformed_at(at, format!("property '{k}' appears twice")));
            }
            properties.insert(k, v);
            continue;
        };
        if *flag {
            return Err(c.malformed_at(at, format!("property '{k}' appears twice")));
        }
        if v != "1" {
            return Err(c.malformed_at(at, format!("property '{k}' is {v:?}, not \"1\"")));
        }
        *flag = true;
    }
    Ok((properties, flags))
}

/// Reply to [`Hello`] (destination → source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    /// Whether the destination accepts the migration.
    pub accepted: bool,
    /// Why not (or empty). Cut to [`MAX_TEXT_LEN`] bytes when encoded.
    pub reason: String,
    /// Page streams granted (1 ..= the [`Hello::streams`] asked for). With
    /// 1, pages travel on the control connection; with N > 1 the source
    /// opens N more connections, each starting with a [`StreamHello`]
    /// carrying [`HelloReply::token`], and pages travel only on those.
    pub streams: u32,
    /// Random token the extra streams must present (all zero when
    /// `streams == 1`).
    pub token: [u8; 16],
    /// The protocol version the destination chose for the rest of the
    /// migration (the newest in both ranges); 0 in a refusal.
    pub version: u32,
    /// Post-copy granted (only to a source that offered it, in version 3
    /// and later: one more byte after `version`, `1`; `3` with
    /// `postcopy_prepare`).
    pub postcopy: bool,
    /// With `postcopy`: the preparation before the pause granted too (only
    /// to a source that offered it: the grant byte is `3` instead of `1`).
    pub postcopy_prepare: bool,
    /// A local hand-over granted (only to a source that asked for one, in
    /// version 3 and later: one more byte after `version`, `2`).
    pub local: bool,
    /// The switchover probe granted (only to a source that offered it, in
    /// version 3 and later: one more byte after `version`, `4`; never
    /// together with the other grants in this build).
    pub probe: bool,
    /// How long the destination's VM took to save its own state and to
    /// restore exactly that, timed in the handshake
    /// ([`crate::vm::DestinationVm::rehearse_restore`]): only to a source
    /// that asked for it ([`Hello::restore_cost`]), in version 3 and later,
    /// after the grant byte (if any): the byte `5`, then the save and the
    /// restore in µs, each a u64 (each at most [`MAX_RESTORE_COST`]).
    /// `None` when not measured.
    pub restore_cost: Option<RestoreRehearsal>,
    /// `PagesGather` frames granted: only to a source that asked for them
    /// ([`Hello::pages_gather`]), in version 3 and later, after the restore
    /// cost (if any): the byte `6`.
    pub pages_gather: bool,
    /// The destination's VM starts the guest before it wakes the vCPU
    /// threads ([`crate::vm::DestinationVm::started_before_wake`]): its
    /// resume from `Go` to the start, which ends the downtime, does not
    /// grow with the vCPUs. Only to a source that asked
    /// ([`Hello::started_before_wake`]), in version 3 and later, after
    /// the `PagesGather` grant (if any): the byte `7`. Absent (`false`)
    /// from a VM that does not say so and from a destination that does not
    /// know the question.
    pub started_before_wake: bool,
    /// The read count granted: the destination answers each `ReadQuery`
    /// with a `ReadCount`. Only to a source that offered it
    /// ([`Hello::read_count`]), in version 3 and later, as the last byte
    /// of the reply: `8`.
    pub read_count: bool,
}

impl HelloReply {
    /// A refusal with `reason`.
    pub fn refused(reason: String) -> Self {
        HelloReply {
            accepted: false,
            reason,
            streams: 1,
            token: [0; 16],
            version: 0,
            postcopy: false,
            postcopy_prepare: false,
            local: false,
            probe: false,
            restore_cost: None,
            pages_gather: false,
            started_before_wake: false,
            read_count: false,
        }
    }

    /// An acceptance of `streams` page streams with `token`, speaking this
    /// side's [`PROTOCOL_VERSION`].
    pub fn accepted(streams: u32, token: [u8; 16]) -> Self {
        HelloReply {
            accepted: true,
            reason: String::new(),
            streams,
            token,
            version: PROTOCOL_VERSION,
            postcopy: false,
            postcopy_prepare: false,
            local: false,
            probe: false,
            restore_cost: None,
            pages_gather: false,
            started_before_wake: false,
            read_count: false,
        }
    }
}

impl Message for HelloReply {
    const KIND: MsgKind = MsgKind::HelloReply;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        out.push(u8::from(self.accepted));
        put_string(
            out,
            "HelloReply",
            "reason",
            truncate_text(&self.reason, MAX_TEXT_LEN),
            MAX_TEXT_LEN,
        )?;
        put_streams(out, "HelloReply", self.streams)?;
        out.extend_from_slice(&self.token);
        // Version 2 (a source that speaks nothing newer) has no version
        // field; a refusal (version 0) has none either.
        if self.version >= 3 {
            put_u32(out, self.version);
            if self.postcopy && self.postcopy_prepare {
                out.push(3);
            } else if self.postcopy {
                out.push(1);
            } else if self.local {
                out.push(2);
            } else if self.probe {
                out.push(4);
            }
            if let Some(r) = self.restore_cost {
                let too_long = [r.save, r.restore]
                    .into_iter()
                    .find(|d| *d > MAX_RESTORE_COST);
                if let Some(d) = too_long {
                    return Err(ProtocolError::Unencodable {
                        msg: "HelloReply",
                        reason: format!("restore cost {d:?} is over {MAX_RESTORE_COST:?}"),
                    });
                }
                out.push(RESTORE_COST_TAG);
                put_u64(out, r.save.as_micros() as u64);
                put_u64(out, r.restore.as_micros() as u64);
            }
            if self.pages_gather {
                out.push(PAGES_GATHER_TAG);
            }
            if self.started_before_wake {
                out.push(STARTED_BEFORE_WAKE_TAG);
            }
            if self.read_count {
                out.push(READ_COUNT_TAG);
            }
        }
        Ok(())
    }

    /// `accepted` and `reason` are frozen for every version: a refusal is
    /// readable whatever follows them (it may come from a destination that
    /// speaks none of this side's versions).
    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("HelloReply", payload);
        let accepted = c.bool("accepted")?;
        let reason = c.string("reason", MAX_TEXT_LEN)?;
        if !accepted {
            return Ok(HelloReply::refused(reason));
        }
        let streams = c.streams()?;
        let token: [u8; 16] = c.array()?;
        // A version-2 destination's reply ends here.
        let at = c.pos;
        let version = if c.left() == 0 { 2 } else { c.u32()? };
        if version < 3 && c.pos != at {
            return Err(c.malformed_at(at, format!("version {version} in a version-3 field")));
        }
        // Only a source that offered post-copy gets this byte (docs/postcopy.md).
        // Present only when granted, as a 1: any other byte is left to
        // `finish`, which refuses it as trailing.
        // The same byte is `2` for a local hand-over granted (only to a
        // source that asked for one).
        let grant = if version >= 3 {
            c.data.get(c.pos).copied()
        } else {
            None
        };
        // `3`: post-copy with its preparation (only to a source that offered
        // that too).
        let postcopy_prepare = grant == Some(3);
        let (postcopy, local) = (grant == Some(1) || postcopy_prepare, grant == Some(2));
        // `4`: the switchover probe (only to a source that offered it).
        let probe = grant == Some(4);
        if postcopy || local || probe {
            c.pos += 1;
        }
        let restore_cost = if version >= 3 {
            read_restore_cost(&mut c)?
        } else {
            None
        };
        // Only a source that asked gets this byte; any other is left to
        // `finish`, which refuses it as trailing.
        let pages_gather = version >= 3 && c.data.get(c.pos) == Some(&PAGES_GATHER_TAG);
        c.pos += usize::from(pages_gather);
        // The same: only to a source that asked, last.
        let started_before_wake =
            version >= 3 && c.data.get(c.pos) == Some(&STARTED_BEFORE_WAKE_TAG);
        c.pos += usize::from(started_before_wake);
        // The same: only to a source that offered it, last.
        let read_count = version >= 3 && c.data.get(c.pos) == Some(&READ_COUNT_TAG);
        c.pos += usize::from(read_count);
        c.finish()?;
        Ok(HelloReply {
            accepted,
            reason,
            streams,
            token,
            version,
            postcopy,
            postcopy_prepare,
            local,
            probe,
            restore_cost,
            pages_gather,
            started_before_wake,
            read_count,
        })
    }
}

/// Reads [`HelloReply::restore_cost`] if its tag byte comes next (any other
/// byte is left to `finish`, which refuses it as trailing).
fn read_restore_cost(c: &mut Cursor<'_>) -> Result<Option<RestoreRehearsal>, ProtocolError> {
    if c.data.get(c.pos) != Some(&RESTORE_COST_TAG) {
        return Ok(None);
    }
    c.pos += 1;
    let save = read_cost_micros(c)?;
    let restore = read_cost_micros(c)?;
    Ok(Some(RestoreRehearsal { save, restore }))
}

/// One time of the restore cost: µs as a u64, at most [`MAX_RESTORE_COST`].
fn read_cost_micros(c: &mut Cursor<'_>) -> Result<Duration, ProtocolError> {
    let at = c.pos;
    let cost = Duration::from_micros(c.u64()?);
    if cost > MAX_RESTORE_COST {
        return Err(c.malformed_at(
            at,
            format!("restore cost {cost:?} is over {MAX_RESTORE_COST:?}"),
        ));
    }
    Ok(cost)
}

/// First frame of an extra page stream (source → destination): which
/// migration it belongs to and which stream it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHello {
    /// [`HelloReply::token`] of the migration.
    pub token: [u8; 16],
    /// Stream index, `0 .. HelloReply::streams`.
    pub index: u32,
}

impl Message for StreamHello {
    const KIND: MsgKind = MsgKind::StreamHello;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        out.extend_from_slice(&self.token);
        put_u32(out, self.index);
        Ok(())
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("StreamHello", payload);
        let token: [u8; 16] = c.array()?;
        let at = c.pos;
        let index = c.u32()?;
        if index >= MAX_STREAMS {
            return Err(c.malformed_at(at, format!("stream index {index} >= {MAX_STREAMS}")));
        }
        c.finish()?;
        Ok(StreamHello { token, index })
    }
}

/// End of a memory copy round (source → destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundEnd {
    /// Round number (0 = the full first pass).
    pub round: u32,
    /// Pages sent in this round (data and zero).
    pub pages: u64,
}

impl Message for RoundEnd {
    const KIND: MsgKind = MsgKind::RoundEnd;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        put_u32(out, self.round);
        put_u64(out, self.pages);
        Ok(())
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("RoundEnd", payload);
        let round = c.u32()?;
        let pages = c.u64()?;
        c.finish()?;
        Ok(RoundEnd { round, pages })
    }
}

/// Device state (source → destination).
///
/// One `State` frame holds at most [`MAX_FRAME_PAYLOAD`](super::MAX_FRAME_PAYLOAD) bytes; a VM with more
/// state sends several `State` messages ([`state_frames`]; at most
/// [`MAX_STATE_FRAMES`]), and section names must be unique across all of
/// them (the destination checks).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    /// The sections, names unique.
    pub sections: Vec<Section>,
}

/// Packs `sections` into as few `State` messages as fit in frames of
/// `max_payload` bytes (in order), checking everything the encoder and the
/// destination check: valid and unique names, sections of at most
/// [`MAX_SECTION_LEN`], at most [`MAX_SECTIONS`] per frame and
/// [`MAX_STATE_FRAMES`] frames. The source packs its state the same way
/// with [`super::StateFrames`], which shares the packing and the checks
/// (at the handshake, on the measured state: a state that cannot be sent
/// is refused before any page; and at the switchover).
pub fn state_frames(
    sections: Vec<Section>,
    max_payload: usize,
) -> Result<Vec<State>, ProtocolError> {
    let frames = pack_state(sections, max_payload)?;
    for f in &frames {
        check_state_frame(f, f.encode()?.len(), max_payload)?;
    }
    check_state_frame_count(frames.len())?;
    Ok(frames)
}

/// [`state_frames`], encoded: the payload of each `State` frame, each
/// encoded once into its own buffer. The switchover does not copy: it
/// writes the same bytes from the sections ([`super::StateFrames`]).
pub fn encoded_state_frames(
    sections: Vec<Section>,
    max_payload: usize,
) -> Result<Vec<Vec<u8>>, ProtocolError> {
    let frames = pack_state(sections, max_payload)?;
    let mut encoded = Vec::with_capacity(frames.len());
    for f in &frames {
        let bytes = f.encode()?;
        check_state_frame(f, bytes.len(), max_payload)?;
        encoded.push(bytes);
    }
    check_state_frame_count(encoded.len())?;
    Ok(encoded)
}

/// Groups `sections` (names unique) into `State` messages in order, a new
/// one whenever the next section would not fit in `max_payload` bytes or
/// the message holds [`MAX_SECTIONS`]; at least one message.
pub(super) fn pack_state(
    sections: Vec<Section>,
    max_payload: usize,
) -> Result<Vec<State>, ProtocolError> {
    let mut seen = HashSet::with_capacity(sections.len());
    for s in &sections {
        if !seen.insert(s.name.clone()) {
            return Err(ProtocolError::Unencodable {
                msg: "State",
                reason: format!("section '{}' appears twice", s.name),
            });
        }
    }
    let mut frames: Vec<State> = Vec::new();
    let mut size = usize::MAX; // of the last frame
    for s in sections {
        let len = 2 + s.name.len() + 4 + 4 + s.data.len();
        let last_full = frames
            .last()
            .is_none_or(|f| size + len > max_payload || f.sections.len() >= MAX_SECTIONS);
        if last_full {
            frames.push(State::default());
            size = 4;
        }
        size += len;
        if let Some(f) = frames.last_mut() {
            f.sections.push(s);
        }
    }
    if frames.is_empty() {
        frames.push(State::default());
    }
    Ok(frames)
}

/// A `State` message of `encoded` bytes must fit in `max_payload`.
pub(super) fn check_state_frame(
    f: &State,
    encoded: usize,
    max_payload: usize,
) -> Result<(), ProtocolError> {
    if encoded <= max_payload {
        return Ok(());
    }
    let first = f.sections.first().map_or("", |s| s.name.as_str());
    Err(ProtocolError::Unencodable {
        msg: "State",
        reason: format!(
            "section '{first}' needs a frame of {encoded} bytes, more than the limit of {max_payload}"
        ),
    })
}

/// At most [`MAX_STATE_FRAMES`] `State` messages.
pub(super) fn check_state_frame_count(frames: usize) -> Result<(), ProtocolError> {
    if frames <= MAX_STATE_FRAMES {
        return Ok(());
    }
    Err(ProtocolError::Unencodable {
        msg: "State",
        reason: format!(
            "the state needs {frames} frames, more than the limit of {MAX_STATE_FRAMES}"
        ),
    })
}

fn check_section_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty section name".to_string());
    }
    if name.len() > MAX_SECTION_NAME {
        return Err(format!(
            "section name of {} bytes exceeds the limit of {MAX_SECTION_NAME}",
            name.len()
        ));
    }
    if let Some(b) = name.bytes().find(|b| !(0x20..=0x7e).contains(b)) {
        return Err(format!(
            "section name {:?} contains byte 0x{b:02x} (only printable ASCII is allowed)",
            name.escape_default().to_string()
        ));
    }
    Ok(())
}

impl State {
    /// Checks the message as [`Message::encode_into`] does (at most
    /// [`MAX_SECTIONS`] sections, valid and unique names, sections of at
    /// most [`MAX_SECTION_LEN`]) and appends its bytes *except the
    /// sections' data* to `heads`: the section count, then each section's
    /// header (name length, name, version, data length). Returns, per
    /// section, where its header ends in `heads` (counted from where this
    /// call began): the encoded message is `heads` with each section's
    /// data put in at its cut.
    pub(super) fn encode_heads(&self, heads: &mut Vec<u8>) -> Result<Vec<usize>, ProtocolError> {
        const M: &str = "State";
        let start = heads.len();
        put_count(heads, M, "sections", self.sections.len(), MAX_SECTIONS)?;
        let mut seen = HashSet::with_capacity(self.sections.len());
        let mut cuts = Vec::with_capacity(self.sections.len());
        for s in &self.sections {
            check_section_name(&s.name)
                .map_err(|reason| ProtocolError::Unencodable { msg: M, reason })?;
            if !seen.insert(s.name.as_str()) {
                return Err(ProtocolError::Unencodable {
                    msg: M,
                    reason: format!("section '{}' appears twice", s.name),
                });
            }
            if s.data.len() > MAX_SECTION_LEN {
                return Err(ProtocolError::Unencodable {
                    msg: M,
                    reason: format!(
                        "section '{}' is {} bytes, limit {MAX_SECTION_LEN}",
                        s.name,
                        s.data.len()
                    ),
                });
            }
            // Both lengths were bounded above.
            put_u16(heads, s.name.len() as u16);
            heads.extend_from_slice(s.name.as_bytes());
            put_u32(heads, s.version);
            put_u32(heads, s.data.len() as u32);
            cuts.push(heads.len() - start);
        }
        Ok(cuts)
    }
}

impl Message for State {
    const KIND: MsgKind = MsgKind::State;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let mut heads = Vec::new();
        let cuts = self.encode_heads(&mut heads)?;
        let mut at = 0;
        for (s, &cut) in self.sections.iter().zip(&cuts) {
            out.extend_from_slice(&heads[at..cut]);
            out.extend_from_slice(&s.data);
            at = cut;
        }
        out.extend_from_slice(&heads[at..]);
        Ok(())
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("State", payload);
        // Smallest section: name length, 1-byte name, version, data length.
        let n = c.count("sections", MAX_SECTIONS, 2 + 1 + 4 + 4)?;
        let mut sections: Vec<Section> = Vec::with_capacity(n);
        let mut seen = HashSet::with_capacity(n);
        for i in 0..n {
            let at = c.pos;
            let name_len = usize::from(c.u16()?);
            if name_len > MAX_SECTION_NAME {
                return Err(c.malformed_at(
                    at,
                    format!(
                        "section {i}: name of {name_len} bytes exceeds the limit of {MAX_SECTION_NAME}"
                    ),
                ));
            }
            let name_bytes = c.bytes(name_len)?;
            // Printable ASCII is valid UTF-8, so one check covers both.
            let name = match std::str::from_utf8(name_bytes) {
                Ok(n) if check_section_name(n).is_ok() => n,
                _ => {
                    return Err(c.malformed_at(
                        at + 2,
                        format!(
                            "section {i}: name \"{}\" is not 1..={MAX_SECTION_NAME} printable ASCII bytes",
                            name_bytes.escape_ascii()
                        ),
                    ))
                }
            };
            if !seen.insert(name) {
                return Err(c.malformed_at(at, format!("section '{name}' appears twice")));
            }
            let version = c.u32()?;
            let len_at = c.pos;
            let len = usize::try_from(c.u32()?).unwrap_or(usize::MAX);
            if len > MAX_SECTION_LEN {
                return Err(c.malformed_at(
                    len_at,
                    format!(
                        "section '{name}' (version {version}): length {len} exceeds the limit of {MAX_SECTION_LEN}"
                    ),
                ));
            }
            if len > c.left() {
                return Err(c.malformed_at(
                    len_at,
                    format!(
                        "section '{name}' (version {version}): length {len} runs past the end of the frame ({} bytes left)",
                        c.left()
                    ),
                ));
            }
            let data = c.bytes(len)?.to_vec();
            sections.push(Section::new(name, version, data));
        }
        c.finish()?;
        Ok(State { sections })
    }
}

macro_rules! empty_message {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct $name;

        impl Message for $name {
            const KIND: MsgKind = MsgKind::$name;

            fn encode_into(&self, _out: &mut Vec<u8>) -> Result<(), ProtocolError> {
                Ok(())
            }

            fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
                Cursor::new(stringify!($name), payload).finish()?;
                Ok($name)
            }
        }
    };
}

empty_message!(
    /// All memory and state have been sent (source → destination). Empty payload.
    Complete
);
empty_message!(
    /// The source commits the switchover and will not resume the VM itself
    /// any more (source → destination). Empty payload.
    Go
);
empty_message!(
    /// The source cancels the migration (source → destination). Empty payload.
    Cancel
);
empty_message!(
    /// Still alive, nothing to say (any stream, either direction). Empty payload.
    Keepalive
);

/// State restored, VM not yet running (destination → source).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ready {
    /// Time the destination spent restoring state, in µs.
    pub restore_us: u64,
}

impl Message for Ready {
    const KIND: MsgKind = MsgKind::Ready;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        put_u64(out, self.restore_us);
        Ok(())
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("Ready", payload);
        let restore_us = c.u64()?;
        c.finish()?;
        Ok(Ready { restore_us })
    }
}

/// vCPUs running on the destination (destination → source).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resumed {
    /// Time from receiving `Go` to the vCPUs running, in µs.
    pub resume_us: u64,
}

impl Message for Resumed {
    const KIND: MsgKind = MsgKind::Resumed;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        put_u64(out, self.resume_us);
        Ok(())
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("Resumed", payload);
        let resume_us = c.u64()?;
        c.finish()?;
        Ok(Resumed { resume_us })
    }
}

/// The sender failed (either direction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMsg {
    /// The phase that failed (for example `"memory"`, `"restore"`).
    /// Cut to [`MAX_TEXT_LEN`] bytes when encoded.
    pub phase: String,
    /// What went wrong. Cut to [`MAX_TEXT_LEN`] bytes when encoded.
    pub message: String,
}

impl ErrorMsg {
    /// Builds an error message.
    pub fn new(phase: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorMsg {
            phase: phase.into(),
            message: message.into(),
        }
    }
}

impl Message for ErrorMsg {
    const KIND: MsgKind = MsgKind::Error;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        const M: &str = "Error";
        put_string(
            out,
            M,
            "phase",
            truncate_text(&self.phase, MAX_TEXT_LEN),
            MAX_TEXT_LEN,
        )?;
        put_string(
            out,
            M,
            "message",
            truncate_text(&self.message, MAX_TEXT_LEN),
            MAX_TEXT_LEN,
        )
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut c = Cursor::new("Error", payload);
        let phase = c.string("phase", MAX_TEXT_LEN)?;
        let message = c.string("message", MAX_TEXT_LEN)?;
        c.finish()?;
        Ok(ErrorMsg { phase, message })
    }
}

/// The destination gave the migration up after `Ready` and will never run
/// the VM (destination → source). Same layout as [`ErrorMsg`].
///
/// Unlike an `Error` after `Go` (which leaves the outcome ambiguous), this
/// is the destination's promise that the guest runs nowhere but on the
/// source: the source resumes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abandoned(pub ErrorMsg);

impl Message for Abandoned {
    const KIND: MsgKind = MsgKind::Abandoned;

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        self.0.encode_into(out)
    }

    fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        ErrorMsg::decode(payload).map(Abandoned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::test_support::layout;
    use std::fmt;

    fn sections(n: usize, len: usize) -> Vec<Section> {
        (0..n)
            .map(|i| Section {
                name: format!("dev{i}"),
                version: 1,
                data: vec![i as u8; len],
            })
            .collect()
    }

    #[test]
    fn encoded_state_frames_are_the_state_frames_encoded() {
        // 10 sections of 1014 bytes each on the wire, frames of at most
        // 3000: two per frame, 5 frames.
        let frames = state_frames(sections(10, 1000), 3000).unwrap();
        let encoded = encoded_state_frames(sections(10, 1000), 3000).unwrap();
        assert_eq!(frames.len(), 5);
        let again: Vec<Vec<u8>> = frames.iter().map(|f| f.encode().unwrap()).collect();
        assert_eq!(encoded, again);
        assert!(encoded.iter().all(|e| e.len() <= 3000));
        let back: Vec<Section> = encoded
            .iter()
            .flat_map(|e| State::decode(e).unwrap().sections)
            .collect();
        assert_eq!(back, sections(10, 1000));
    }

    #[test]
    fn encoded_state_frames_refuse_what_state_frames_refuse() {
        let mut dup = sections(2, 10);
        dup[1].name = dup[0].name.clone();
        let too_big = sections(1, 5000);
        for (input, max) in [(dup, 3000), (too_big, 3000)] {
            let a = state_frames(input.clone(), max).unwrap_err().to_string();
            let b = encoded_state_frames(input, max).unwrap_err().to_string();
            assert_eq!(a, b);
        }
    }

    fn desc() -> VmDescription {
        let mut properties = BTreeMap::new();
        properties.insert("cpu.vendor".to_string(), "GenuineIntel".to_string());
        properties.insert("machine".to_string(), "refvmm-ü".to_string());
        VmDescription {
            layout: layout(),
            vcpus: 4,
            nics: vec![
                NicInfo {
                    mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                    ipv4: Some([10, 0, 0, 2]),
                },
                NicInfo {
                    mac: [0x52, 0x54, 0, 0x12, 0x34, 0x57],
                    ipv4: None,
                },
            ],
            properties,
        }
    }

    fn state() -> State {
        State {
            sections: vec![
                Section::new("vcpu.0.regs", 1, vec![1, 2, 3, 4]),
                Section::new("irqchip", 3, vec![]),
                Section::new("serial.com1", 2, (0..=255).collect()),
            ],
        }
    }

    fn round_trip<M: Message + PartialEq + fmt::Debug>(m: &M) -> Vec<u8> {
        let bytes = m.encode().unwrap();
        assert_eq!(&M::decode(&bytes).unwrap(), m);
        bytes
    }

    /// Every strict prefix fails, trailing garbage fails, the whole succeeds.
    fn check_hostile<M: Message + fmt::Debug>(bytes: &[u8]) {
        check_hostile_except::<M>(bytes, &[]);
    }

    /// [`check_hostile`], except that the prefixes of the lengths in
    /// `valid` are whole messages of an older version.
    fn check_hostile_except<M: Message + fmt::Debug>(bytes: &[u8], valid: &[usize]) {
        for cut in 0..bytes.len() {
            if valid.contains(&cut) {
                M::decode(&bytes[..cut]).unwrap();
                continue;
            }
            assert!(
                M::decode(&bytes[..cut]).is_err(),
                "{}: prefix of {cut}/{} bytes accepted",
                M::KIND,
                bytes.len()
            );
        }
        let mut long = bytes.to_vec();
        long.push(0);
        let e = M::decode(&long).unwrap_err();
        assert!(
            matches!(e, ProtocolError::TrailingBytes { count: 1, .. }),
            "{}: {e}",
            M::KIND
        );
        M::decode(bytes).unwrap();
    }

    fn all_messages() -> Vec<(MsgKind, Vec<u8>)> {
        vec![
            (MsgKind::Hello, round_trip(&Hello::new(desc()))),
            (
                MsgKind::HelloReply,
                round_trip(&HelloReply {
                    accepted: false,
                    reason: "no room für you".into(),
                    streams: 1,
                    token: [0; 16],
                    version: 0,
                    postcopy: false,
                    postcopy_prepare: false,
                    local: false,
                    probe: false,
                    restore_cost: None,
                    pages_gather: false,
                    started_before_wake: false,
                    read_count: false,
                }),
            ),
            (
                MsgKind::RoundEnd,
                round_trip(&RoundEnd {
                    round: 3,
                    pages: 123_456_789_012,
                }),
            ),
            (MsgKind::State, round_trip(&state())),
            (MsgKind::Complete, round_trip(&Complete)),
            (MsgKind::Ready, round_trip(&Ready { restore_us: 1234 })),
            (MsgKind::Go, round_trip(&Go)),
            (MsgKind::Resumed, round_trip(&Resumed { resume_us: 99 })),
            (
                MsgKind::Error,
                round_trip(&ErrorMsg::new("restore", "section 'x': version 9")),
            ),
            (MsgKind::Cancel, round_trip(&Cancel)),
            (MsgKind::Keepalive, round_trip(&Keepalive)),
            (
                MsgKind::Abandoned,
                round_trip(&Abandoned(ErrorMsg::new("completion", "no Go within 10s"))),
            ),
            (
                MsgKind::StreamHello,
                round_trip(&StreamHello {
                    token: [7; 16],
                    index: 3,
                }),
            ),
        ]
    }

    #[test]
    fn round_trip_every_message() {
        let msgs = all_messages();
        // All but Pages, PagesLz4, PagesGather, the seven post-copy kinds,
        // the two probe kinds and the two read-count kinds (their round
        // trips are in protocol/pages_gather.rs, protocol/postcopy.rs,
        // protocol/probe.rs and protocol/read_count.rs).
        assert_eq!(msgs.len(), MsgKind::ALL.len() - 14);
        round_trip(&HelloReply {
            accepted: true,
            reason: String::new(),
            streams: 1,
            token: [0; 16],
            version: PROTOCOL_VERSION,
            postcopy: false,
            postcopy_prepare: false,
            local: false,
            probe: false,
            restore_cost: None,
            pages_gather: true,
            started_before_wake: false,
            read_count: false,
        });
        round_trip(&State::default());
        let mut d = desc();
        d.nics.clear();
        d.properties.clear();
        round_trip(&Hello::new(d));
        for k in MsgKind::ALL {
            assert_eq!(MsgKind::from_u8(k as u8), Some(k));
        }
        assert_eq!(MsgKind::from_u8(0), None);
        assert_eq!(MsgKind::from_u8(28), None);
    }

    #[test]
    fn decoders_reject_truncation_and_trailing_bytes() {
        check_hostile::<Hello>(&Hello::new(desc()).encode().unwrap());
        let v3 = HelloReply {
            accepted: true,
            reason: "ok".into(),
            streams: 1,
            token: [0; 16],
            version: PROTOCOL_VERSION,
            postcopy: false,
            postcopy_prepare: false,
            local: false,
            probe: false,
            restore_cost: None,
            pages_gather: false,
            started_before_wake: false,
            read_count: false,
        }
        .encode()
        .unwrap();
        // Without its last field it is a version-2 (release 0.1.0) reply.
        check_hostile_except::<HelloReply>(&v3, &[v3.len() - 4]);
        let v2 = HelloReply::decode(&v3[..v3.len() - 4]).unwrap();
        assert_eq!(v2.version, 2);
        assert_eq!(v2.encode().unwrap(), &v3[..v3.len() - 4]);
        // A version field that says 2 (or less) is malformed.
        let mut low = v3[..v3.len() - 4].to_vec();
        low.extend_from_slice(&2u32.to_le_bytes());
        assert!(HelloReply::decode(&low).is_err());
        // A paused source is said with the reserved property, which never
        // reaches the description; a description may not use the prefix.
        let mut h = Hello::new(desc());
        h.paused = true;
        let got = Hello::decode(&h.encode().unwrap()).unwrap();
        assert!(got.paused);
        assert_eq!(got.desc, desc());
        check_hostile::<Hello>(&h.encode().unwrap());
        let mut d = desc();
        d.properties.insert(PAUSED_PROPERTY.into(), "1".into());
        assert!(Hello::new(d).encode().is_err());
        // A local hand-over: the boot id and one identity per region, as
        // reserved properties that never reach the description.
        let mut h = Hello::new(desc());
        let region = RegionIdentity {
            dev: 7,
            ino: 99,
            offset: 4096,
            len: 8192,
        };
        h.local = Some(LocalIdentity {
            boot_id: "b00t".into(),
            regions: vec![region, region],
        });
        let got = Hello::decode(&h.encode().unwrap()).unwrap();
        assert_eq!(got.local, h.local);
        assert_eq!(got.desc, desc());
        check_hostile::<Hello>(&h.encode().unwrap());
        let mut r = HelloReply::accepted(1, [0; 16]);
        r.local = true;
        assert_eq!(HelloReply::decode(&r.encode().unwrap()).unwrap(), r);
        check_hostile::<RoundEnd>(&RoundEnd { round: 1, pages: 2 }.encode().unwrap());
        check_hostile::<State>(&state().encode().unwrap());
        check_hostile::<Complete>(&[]);
        check_hostile::<Go>(&[]);
        check_hostile::<Cancel>(&[]);
        check_hostile::<Keepalive>(&[]);
        check_hostile::<StreamHello>(
            &StreamHello {
                token: [1; 16],
                index: 2,
            }
            .encode()
            .unwrap(),
        );
        check_hostile::<Ready>(&Ready { restore_us: 5 }.encode().unwrap());
        check_hostile::<Resumed>(&Resumed { resume_us: 5 }.encode().unwrap());
        check_hostile::<ErrorMsg>(&ErrorMsg::new("memory", "boom").encode().unwrap());
        let e = Go::decode(&[1]).unwrap_err();
        assert_eq!(e.to_string(), "Go: 1 trailing bytes at offset 0");
    }

    #[test]
    fn hello_wrong_magic_is_refused() {
        let good = Hello::new(desc()).encode().unwrap();
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            Hello::decode(&bad),
            Err(ProtocolError::BadHelloMagic { .. })
        ));
    }

    #[test]
    fn hello_versions_negotiate_down_or_are_refused() {
        let mut h = Hello::new(desc());
        h.protocol_version = 7;
        h.min_protocol_version = 7;
        let e = Hello::decode(&h.encode().unwrap()).unwrap_err();
        assert!(
            matches!(
                e,
                ProtocolError::UnsupportedVersion {
                    peer_version: 7,
                    peer_min: 7,
                    min: 2,
                    max: 3
                }
            ),
            "{e}"
        );
        let s = e.to_string();
        assert!(s.contains("unsupported protocol version 7"), "{s}");
        assert!(s.contains("this side speaks 2..=3"), "{s}");

        // A newer peer that still speaks version 3 negotiates down, and
        // the fields it appends for its own version are not read.
        h.min_protocol_version = 3;
        let mut next = h.encode().unwrap();
        let got = Hello::decode(&next).unwrap();
        assert_eq!(got.negotiated_version().unwrap(), 3);
        next.extend_from_slice(b"future fields");
        let got = Hello::decode(&next).unwrap();
        assert_eq!(got.negotiated_version().unwrap(), 3);
        // From a peer of this version, trailing bytes are refused.
        let mut same = Hello::new(desc()).encode().unwrap();
        same.push(0);
        assert!(Hello::decode(&same).is_err());

        // Version 1 is refused; version 2 (release 0.1.0) is spoken.
        h.protocol_version = 1;
        h.min_protocol_version = 1;
        assert!(Hello::decode(&h.encode().unwrap()).is_err());
        h.protocol_version = 2;
        h.min_protocol_version = 2;
        assert_eq!(
            Hello::decode(&h.encode().unwrap())
                .unwrap()
                .negotiated_version()
                .unwrap(),
            2
        );

        // Version 0 / inverted ranges are refused.
        let mut h = Hello::new(desc());
        h.protocol_version = 0;
        h.min_protocol_version = 0;
        assert!(matches!(
            Hello::decode(&h.encode().unwrap()),
            Err(ProtocolError::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn hello_stream_count_and_page_size_are_checked() {
        // Stream counts outside 1..=MAX_STREAMS are refused both ways.
        let mut h = Hello::new(desc());
        h.streams = MAX_STREAMS + 1;
        assert!(h.encode().is_err());
        let mut raw = Hello::new(desc()).encode().unwrap();
        let n = raw.len();
        raw[n - 4..n].copy_from_slice(&0u32.to_le_bytes());
        assert!(Hello::decode(&raw)
            .unwrap_err()
            .to_string()
            .contains("streams"));

        let mut h = Hello::new(desc());
        h.page_size = 65536;
        assert!(matches!(
            Hello::decode(&h.encode().unwrap()),
            Err(ProtocolError::PageSizeMismatch { peer: 65536, .. })
        ));
    }

    /// Offsets of the Hello fields after the fixed prefix, for `desc()`.
    fn hello_offsets() -> (usize, usize, usize, usize) {
        let regions_at = 8 + 4 + 4 + 4;
        let vcpus_at = regions_at + 4 + 2 * 16;
        let nics_at = vcpus_at + 4;
        let props_at = nics_at + 4 + 2 * NIC_LEN;
        (regions_at, vcpus_at, nics_at, props_at)
    }

    #[test]
    fn hello_rejects_bad_fields() {
        let good = Hello::new(desc()).encode().unwrap();
        let (regions_at, vcpus_at, nics_at, props_at) = hello_offsets();
        let patch = |at: usize, bytes: &[u8]| {
            let mut b = good.clone();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            Hello::decode(&b).unwrap_err().to_string()
        };
        // Huge region count fails fast.
        let e = patch(regions_at, &u32::MAX.to_le_bytes());
        assert!(e.contains("exceeds the limit of 64"), "{e}");
        // Overlapping regions: second region starts at 0.
        let e = patch(regions_at + 4 + 16, &0u64.to_le_bytes());
        assert!(e.contains("invalid memory layout"), "{e}");
        // Unaligned region.
        let e = patch(regions_at + 4, &1u64.to_le_bytes());
        assert!(e.contains("not page aligned"), "{e}");
        assert!(patch(vcpus_at, &0u32.to_le_bytes()).contains("0 vCPUs"));
        assert!(patch(vcpus_at, &257u32.to_le_bytes()).contains("257 vCPUs"));
        assert!(patch(nics_at, &17u32.to_le_bytes()).contains("17 NICs"));
        // has_ip = 2.
        assert!(patch(nics_at + 4 + 6, &[2]).contains("not a boolean"));
        // IP bytes without has_ip (second NIC has none).
        assert!(patch(nics_at + 4 + NIC_LEN + 7, &[1]).contains("without has_ip"));
        assert!(patch(props_at, &65u32.to_le_bytes()).contains("65 properties"));
        // Key length over the limit.
        assert!(patch(props_at + 4, &300u16.to_le_bytes()).contains("limit 256"));
        // Bad UTF-8 in the first key ("cpu.vendor").
        let e = patch(props_at + 4 + 2, &[0xff]);
        assert!(e.contains("not valid UTF-8"), "{e}");
        // Duplicate key: rename "machine" (7 bytes) to "cpu.ven" — not a
        // duplicate; build one explicitly instead.
        let mut b = good[..props_at].to_vec();
        b.extend_from_slice(&2u32.to_le_bytes());
        for _ in 0..2 {
            b.extend_from_slice(&1u16.to_le_bytes());
            b.push(b'k');
            b.extend_from_slice(&0u16.to_le_bytes());
        }
        let e = Hello::decode(&b).unwrap_err().to_string();
        assert!(e.contains("'k' appears twice"), "{e}");
        // Empty key.
        let mut b = good[..props_at].to_vec();
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&[0, 0, 0, 0]);
        let e = Hello::decode(&b).unwrap_err().to_string();
        assert!(e.contains("empty key"), "{e}");
    }

    #[test]
    fn encoders_refuse_what_decoders_would_reject() {
        let mut d = desc();
        d.vcpus = 0;
        assert!(Hello::new(d).encode().is_err());
        let mut d = desc();
        d.properties.insert("x".repeat(300), "v".into());
        assert!(Hello::new(d).encode().is_err());
        let mut d = desc();
        d.nics = vec![d.nics[0].clone(); 17];
        assert!(Hello::new(d).encode().is_err());
        let mut d = desc();
        d.properties.insert(String::new(), "v".into());
        assert!(Hello::new(d).encode().is_err());

        for bad in [
            State {
                sections: vec![Section::new("a", 1, vec![]), Section::new("a", 2, vec![])],
            },
            State {
                sections: vec![Section::new("", 1, vec![])],
            },
            State {
                sections: vec![Section::new("tab\there", 1, vec![])],
            },
            State {
                sections: vec![Section::new("x".repeat(65), 1, vec![])],
            },
            State {
                sections: vec![Section::new("big", 1, vec![0; MAX_SECTION_LEN + 1])],
            },
        ] {
            assert!(bad.encode().is_err(), "{bad:?}");
        }

        // Long texts are cut at a character boundary, not refused.
        let long = "é".repeat(3000); // 6000 bytes
        let m = ErrorMsg::new(long.clone(), long.clone());
        let got = ErrorMsg::decode(&m.encode().unwrap()).unwrap();
        assert_eq!(got.message.len(), MAX_TEXT_LEN);
        assert!(long.starts_with(&got.message));
        let r = HelloReply {
            accepted: false,
            reason: long,
            streams: 1,
            token: [0; 16],
            version: 0,
            postcopy: false,
            postcopy_prepare: false,
            local: false,
            probe: false,
            restore_cost: None,
            pages_gather: false,
            started_before_wake: false,
            read_count: false,
        };
        assert_eq!(
            HelloReply::decode(&r.encode().unwrap())
                .unwrap()
                .reason
                .len(),
            MAX_TEXT_LEN
        );
    }

    #[test]
    fn the_restore_cost_round_trips_after_any_grant_and_is_bounded() {
        let us = Duration::from_micros;
        let mut r = HelloReply::accepted(1, [0; 16]);
        r.restore_cost = Some(RestoreRehearsal {
            save: us(1234),
            restore: us(4321),
        });
        for (probe, postcopy, local) in [
            (false, false, false),
            (true, false, false),
            (false, true, false),
            (false, false, true),
        ] {
            r.probe = probe;
            r.postcopy = postcopy;
            r.local = local;
            let back = HelloReply::decode(&r.encode().unwrap()).unwrap();
            assert_eq!(back, r);
        }
        r.probe = false;
        r.postcopy = false;
        r.local = false;
        // Version 2 has no room for it: not encoded, not read.
        let mut v2 = r.clone();
        v2.version = 2;
        let back = HelloReply::decode(&v2.encode().unwrap()).unwrap();
        assert_eq!(back.restore_cost, None);
        // Either time over the bound: not encoded, and refused when read.
        let over = MAX_RESTORE_COST + us(1);
        let ok = MAX_RESTORE_COST.as_micros() as u64;
        for (save, restore) in [(over, us(1)), (us(1), over)] {
            r.restore_cost = Some(RestoreRehearsal { save, restore });
            assert!(r.encode().is_err());
        }
        for (save, restore) in [(ok + 1, 1), (1, ok + 1)] {
            let mut b = HelloReply::accepted(1, [0; 16]).encode().unwrap();
            b.push(RESTORE_COST_TAG);
            b.extend_from_slice(&save.to_le_bytes());
            b.extend_from_slice(&restore.to_le_bytes());
            let e = HelloReply::decode(&b).unwrap_err().to_string();
            assert!(e.contains("restore cost"), "{e}");
        }
        // Cut short (in either time), or followed by anything: refused.
        let mut b = HelloReply::accepted(1, [0; 16]).encode().unwrap();
        b.push(RESTORE_COST_TAG);
        b.extend_from_slice(&[1, 2, 3]);
        assert!(HelloReply::decode(&b).is_err());
        b.extend_from_slice(&[0; 5]);
        assert!(HelloReply::decode(&b).is_err());
        b.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]);
        let back = HelloReply::decode(&b).unwrap();
        assert_eq!(
            back.restore_cost,
            Some(RestoreRehearsal {
                save: us(0x030201),
                restore: us(2)
            })
        );
        b.push(0);
        assert!(HelloReply::decode(&b).is_err());
    }

    #[test]
    fn the_restore_cost_request_is_a_flag() {
        let mut h = Hello::new(desc());
        h.restore_cost = true;
        let back = Hello::decode(&h.encode().unwrap()).unwrap();
        assert!(back.restore_cost);
        assert!(!back.desc.properties.contains_key(RESTORE_COST_PROPERTY));
        h.restore_cost = false;
        assert!(!Hello::decode(&h.encode().unwrap()).unwrap().restore_cost);
    }

    #[test]
    fn the_started_before_wake_answer_round_trips_last_and_is_strict() {
        let us = Duration::from_micros;
        let mut r = HelloReply::accepted(1, [0; 16]);
        r.started_before_wake = true;
        // After any grant byte, the restore cost and the PagesGather grant.
        for (probe, postcopy, local, cost, gather) in [
            (false, false, false, false, false),
            (true, false, false, false, false),
            (false, true, false, false, false),
            (false, false, true, false, false),
            (false, false, false, true, false),
            (false, false, false, false, true),
            (true, false, false, true, true),
        ] {
            r.probe = probe;
            r.postcopy = postcopy;
            r.local = local;
            r.restore_cost = cost.then_some(RestoreRehearsal {
                save: us(12),
                restore: us(34),
            });
            r.pages_gather = gather;
            let b = r.encode().unwrap();
            assert_eq!(b.last(), Some(&STARTED_BEFORE_WAKE_TAG));
            assert_eq!(HelloReply::decode(&b).unwrap(), r);
        }
        // Not said: no byte.
        let mut unsaid = r.clone();
        unsaid.started_before_wake = false;
        let (b, ub) = (r.encode().unwrap(), unsaid.encode().unwrap());
        assert_eq!(b[..b.len() - 1], ub[..]);
        assert!(!HelloReply::decode(&ub).unwrap().started_before_wake);
        let plain = HelloReply::accepted(1, [0; 16]).encode().unwrap();
        // Twice, before the PagesGather grant, or followed by anything:
        // refused (trailing bytes).
        for bad in [
            vec![STARTED_BEFORE_WAKE_TAG, STARTED_BEFORE_WAKE_TAG],
            vec![STARTED_BEFORE_WAKE_TAG, PAGES_GATHER_TAG],
            vec![STARTED_BEFORE_WAKE_TAG, 0],
            vec![9],
        ] {
            let mut b = plain.clone();
            b.extend_from_slice(&bad);
            let e = HelloReply::decode(&b).unwrap_err().to_string();
            assert!(e.contains("trailing"), "{bad:?}: {e}");
        }
        // Version 2 has no room for it: not encoded, not read.
        let mut v2 = HelloReply::accepted(1, [0; 16]);
        v2.version = 2;
        v2.started_before_wake = true;
        let back = HelloReply::decode(&v2.encode().unwrap()).unwrap();
        assert_eq!(back.version, 2);
        assert!(!back.started_before_wake);
        // A refusal carries nothing after its reason.
        let mut no = HelloReply::refused("no".into());
        no.started_before_wake = true;
        assert!(
            !HelloReply::decode(&no.encode().unwrap())
                .unwrap()
                .started_before_wake
        );
    }

    #[test]
    fn the_read_count_grant_round_trips_last_and_is_strict() {
        let mut r = HelloReply::accepted(2, [0; 16]);
        r.read_count = true;
        // After any grant byte, the PagesGather grant and started_before_wake.
        for (probe, gather, wake) in [
            (false, false, false),
            (true, false, false),
            (false, true, false),
            (false, false, true),
            (true, true, true),
        ] {
            r.probe = probe;
            r.pages_gather = gather;
            r.started_before_wake = wake;
            let b = r.encode().unwrap();
            assert_eq!(b.last(), Some(&READ_COUNT_TAG));
            assert_eq!(HelloReply::decode(&b).unwrap(), r);
        }
        let mut ungranted = r.clone();
        ungranted.read_count = false;
        let (b, ub) = (r.encode().unwrap(), ungranted.encode().unwrap());
        assert_eq!(b[..b.len() - 1], ub[..]);
        assert!(!HelloReply::decode(&ub).unwrap().read_count);
        let plain = HelloReply::accepted(1, [0; 16]).encode().unwrap();
        // Twice, before started_before_wake, or followed by anything:
        // refused (trailing bytes).
        for bad in [
            vec![READ_COUNT_TAG, READ_COUNT_TAG],
            vec![READ_COUNT_TAG, STARTED_BEFORE_WAKE_TAG],
            vec![READ_COUNT_TAG, 0],
        ] {
            let mut b = plain.clone();
            b.extend_from_slice(&bad);
            let e = HelloReply::decode(&b).unwrap_err().to_string();
            assert!(e.contains("trailing"), "{bad:?}: {e}");
        }
        // Version 2 has no room for it.
        let mut v2 = HelloReply::accepted(1, [0; 16]);
        v2.version = 2;
        v2.read_count = true;
        assert!(
            !HelloReply::decode(&v2.encode().unwrap())
                .unwrap()
                .read_count
        );
    }

    #[test]
    fn the_read_count_offer_is_a_flag() {
        let mut h = Hello::new(desc());
        h.read_count = true;
        let back = Hello::decode(&h.encode().unwrap()).unwrap();
        assert!(back.read_count);
        assert!(!back.desc.properties.contains_key(READ_COUNT_PROPERTY));
        h.read_count = false;
        assert!(!Hello::decode(&h.encode().unwrap()).unwrap().read_count);
    }

    #[test]
    fn the_started_before_wake_question_is_a_flag() {
        let mut h = Hello::new(desc());
        h.started_before_wake = true;
        let back = Hello::decode(&h.encode().unwrap()).unwrap();
        assert!(back.started_before_wake);
        let key = STARTED_BEFORE_WAKE_PROPERTY;
        assert!(!back.desc.properties.contains_key(key));
        h.started_before_wake = false;
        let back = Hello::decode(&h.encode().unwrap()).unwrap();
        assert!(!back.started_before_wake);
        // A description may not carry it as its own property.
        let mut d = desc();
        d.properties.insert(key.to_string(), "1".to_string());
        assert!(Hello::new(d).encode().is_err());
    }

    #[test]
    fn state_rejects_hostile_input() {
        let t0 = std::time::Instant::now();
        // 4 billion sections: refused by the count check, nothing allocated.
        let e = State::decode(&u32::MAX.to_le_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("exceeds the limit of 4096"), "{e}");
        // 4096 sections claimed, 10 bytes present.
        let mut b = 4096u32.to_le_bytes().to_vec();
        b.extend_from_slice(&[0; 10]);
        let e = State::decode(&b).unwrap_err().to_string();
        assert!(e.contains("only 10 are left"), "{e}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(1));

        let section = |name: &[u8], version: u32, len: u32, data: &[u8]| {
            let mut v = (name.len() as u16).to_le_bytes().to_vec();
            v.extend_from_slice(name);
            v.extend_from_slice(&version.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
            v.extend_from_slice(data);
            v
        };
        let msg = |secs: &[Vec<u8>]| {
            let mut v = (secs.len() as u32).to_le_bytes().to_vec();
            for s in secs {
                v.extend_from_slice(s);
            }
            State::decode(&v).unwrap_err().to_string()
        };
        let e = msg(&[section(b"a", 1, 0, &[]), section(b"a", 2, 0, &[])]);
        assert!(e.contains("section 'a' appears twice"), "{e}");
        let e = msg(&[section(b"x", 4, u32::MAX, &[])]);
        assert!(
            e.contains("section 'x' (version 4): length 4294967295 exceeds"),
            "{e}"
        );
        let e = msg(&[section(b"x", 4, 100, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])]);
        assert!(e.contains("runs past the end of the frame"), "{e}");
        let e = msg(&[section(&[0xc3, 0x28], 1, 0, &[0; 2])]);
        assert!(e.contains("printable ASCII"), "{e}");
        let e = msg(&[section(b"new\nline", 1, 0, &[])]);
        assert!(e.contains("printable ASCII"), "{e}");
        let e = msg(&[section(&[b'n'; 65], 1, 0, &[])]);
        assert!(e.contains("65 bytes exceeds"), "{e}");
        let e = msg(&[section(b"", 1, 0, &[0])]);
        assert!(e.contains("printable ASCII"), "{e}");
    }

    #[test]
    fn text_rejects_bad_utf8_and_oversize() {
        let mut b = vec![0u8];
        b.extend_from_slice(&2u16.to_le_bytes());
        b.extend_from_slice(&[0xff, 0xfe]);
        let e = HelloReply::decode(&b).unwrap_err().to_string();
        assert!(e.contains("reason is not valid UTF-8"), "{e}");
        let mut b = 4097u16.to_le_bytes().to_vec();
        b.extend_from_slice(&[b'a'; 4097]);
        b.extend_from_slice(&0u16.to_le_bytes());
        let e = ErrorMsg::decode(&b).unwrap_err().to_string();
        assert!(e.contains("phase is 4097 bytes, limit 4096"), "{e}");
        // accepted must be 0 or 1.
        let e = HelloReply::decode(&[2, 0, 0]).unwrap_err().to_string();
        assert!(e.contains("not a boolean"), "{e}");
    }
}
