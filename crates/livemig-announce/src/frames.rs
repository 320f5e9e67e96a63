//! Self-announce frames: QEMU's RARP announce, the gratuitous ARP, the IPv6
//! unsolicited neighbour advertisement, and a parser for all three.
//!
//! RARP and gratuitous ARP are 60 bytes: the minimum Ethernet frame without
//! its FCS (the NIC or the kernel adds that), zero-padded after the 42 bytes
//! of header and payload. The neighbour advertisement is 86 bytes and needs
//! no padding.
//!
//! * RARP, as QEMU's `announce_self_create()`: broadcast destination, source
//!   = the guest MAC, ethertype 0x8035, hardware type 1 (Ethernet), protocol
//!   type 0x0800 (IPv4), lengths 6 and 4, opcode 3 (reverse request), sender
//!   and target hardware address = the guest MAC, sender and target protocol
//!   address = 0.0.0.0.
//! * Gratuitous ARP, as Linux sends it when an address comes up or a
//!   virtio-net guest is asked to announce itself (`arp_notify`), which is the
//!   RFC 5227 "ARP Announcement": broadcast destination, ethertype 0x0806,
//!   opcode 1 (request), sender hardware address = the guest MAC, target
//!   hardware address 00:00:00:00:00:00, sender and target protocol address =
//!   the guest's IPv4 address.
//! * Unsolicited neighbour advertisement (RFC 4861 section 7.2.6), as Linux
//!   sends it for `ndisc_notify` when an IPv6 address moves: Ethernet
//!   destination 33:33:00:00:00:01, ethertype 0x86DD; IPv6 from the guest's
//!   address to the all-nodes group ff02::1, hop limit 255; ICMPv6 type 136,
//!   code 0, flags Override only (not Router, not Solicited), target = the
//!   guest's address, one target link-layer address option (type 2, length
//!   one unit of 8 bytes) carrying the guest MAC. Receivers that have a
//!   neighbour entry for the address replace its link-layer address (the
//!   Override flag) and mark it STALE; receivers without one ignore it
//!   (RFC 4861 section 7.2.5).

use std::fmt::Write as _;

/// Length of an announce frame: the Ethernet minimum without FCS.
pub const FRAME_LEN: usize = 60;
/// Length of the Ethernet header and the ARP/RARP payload, before padding.
pub const ARP_FRAME_LEN: usize = 42;
/// Ethertype of ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// Ethertype of RARP.
pub const ETH_P_RARP: u16 = 0x8035;
/// ARP hardware type of Ethernet.
pub const ARP_HTYPE_ETH: u16 = 1;
/// ARP protocol type of IPv4.
pub const ARP_PTYPE_IP: u16 = 0x0800;
/// ARP opcode: request.
pub const ARP_OP_REQUEST: u16 = 1;
/// ARP opcode: reply.
pub const ARP_OP_REPLY: u16 = 2;
/// RARP opcode: reverse request (what QEMU announces with).
pub const ARP_OP_REQUEST_REV: u16 = 3;

/// Length of the unsolicited neighbour advertisement frame: Ethernet (14),
/// IPv6 header (40), ICMPv6 neighbour advertisement (24) and one target
/// link-layer address option (8).
pub const NA_FRAME_LEN: usize = 86;
/// Ethertype of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// IPv6 next-header value of ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;
/// ICMPv6 type of a neighbour advertisement.
pub const ICMPV6_NEIGHBOUR_ADVERT: u8 = 136;
/// Neighbour advertisement flag: the sender is a router.
pub const NA_FLAG_ROUTER: u8 = 0x80;
/// Neighbour advertisement flag: the advertisement answers a solicitation.
pub const NA_FLAG_SOLICITED: u8 = 0x40;
/// Neighbour advertisement flag: replace a cached link-layer address.
pub const NA_FLAG_OVERRIDE: u8 = 0x20;
/// Neighbour discovery option type: target link-layer address.
pub const ND_OPT_TARGET_LLADDR: u8 = 2;
/// The all-nodes link-local multicast group ff02::1.
pub const ALL_NODES: [u8; 16] = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// The Ethernet multicast address of ff02::1 (RFC 2464: 33:33 + the last
/// 32 bits of the group).
pub const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
/// Length of the ICMPv6 message of a neighbour advertisement with one
/// target link-layer address option.
const NA_ICMP_LEN: usize = 32;
/// Where the IPv6 header starts in an Ethernet frame.
const IP6_AT: usize = 14;
/// Where the ICMPv6 message starts in an Ethernet frame.
const ICMP6_AT: usize = IP6_AT + 40;

const BROADCAST: [u8; 6] = [0xff; 6];

/// Write the Ethernet header and the fixed ARP header fields.
fn arp_header(buf: &mut [u8; FRAME_LEN], mac: &[u8; 6], ethertype: u16, opcode: u16) {
    buf[0..6].copy_from_slice(&BROADCAST);
    buf[6..12].copy_from_slice(mac);
    buf[12..14].copy_from_slice(&ethertype.to_be_bytes());
    buf[14..16].copy_from_slice(&ARP_HTYPE_ETH.to_be_bytes());
    buf[16..18].copy_from_slice(&ARP_PTYPE_IP.to_be_bytes());
    buf[18] = 6;
    buf[19] = 4;
    buf[20..22].copy_from_slice(&opcode.to_be_bytes());
}

/// The RARP self-announce for `mac`, byte for byte as QEMU sends it.
pub fn rarp_frame(mac: &[u8; 6]) -> [u8; FRAME_LEN] {
    let mut buf = [0u8; FRAME_LEN];
    arp_header(&mut buf, mac, ETH_P_RARP, ARP_OP_REQUEST_REV);
    // Sender hardware address; the sender protocol address (28..32) stays 0.0.0.0.
    buf[22..28].copy_from_slice(mac);
    // Target hardware address; the target protocol address (38..42) stays
    // 0.0.0.0 and the padding (42..60) zero.
    buf[32..38].copy_from_slice(mac);
    buf
}

/// The gratuitous ARP (an RFC 5227 ARP announcement) for `mac` owning `ipv4`.
pub fn garp_frame(mac: &[u8; 6], ipv4: &[u8; 4]) -> [u8; FRAME_LEN] {
    let mut buf = [0u8; FRAME_LEN];
    arp_header(&mut buf, mac, ETH_P_ARP, ARP_OP_REQUEST);
    // Sender hardware and protocol addresses.
    buf[22..28].copy_from_slice(mac);
    buf[28..32].copy_from_slice(ipv4);
    // The target hardware address (32..38) stays 00:00:00:00:00:00 (RFC 5227
    // says it is ignored and should be zero; Linux sends zero).
    buf[38..42].copy_from_slice(ipv4);
    buf
}

/// The unsolicited neighbour advertisement for `mac` owning the IPv6 address
/// `ipv6`, sent from that address to ff02::1 (see the module documentation
/// for every field).
pub fn na_frame(mac: &[u8; 6], ipv6: &[u8; 16]) -> [u8; NA_FRAME_LEN] {
    let mut buf = [0u8; NA_FRAME_LEN];
    buf[0..6].copy_from_slice(&ALL_NODES_MAC);
    buf[6..12].copy_from_slice(mac);
    buf[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    // IPv6: version 6, traffic class 0, flow label 0.
    buf[IP6_AT] = 0x60;
    buf[IP6_AT + 4..IP6_AT + 6].copy_from_slice(&(NA_ICMP_LEN as u16).to_be_bytes());
    buf[IP6_AT + 6] = IPPROTO_ICMPV6;
    buf[IP6_AT + 7] = 255;
    buf[IP6_AT + 8..IP6_AT + 24].copy_from_slice(ipv6);
    buf[IP6_AT + 24..IP6_AT + 40].copy_from_slice(&ALL_NODES);
    // ICMPv6: type, code 0, checksum (below), flags and 3 reserved bytes.
    buf[ICMP6_AT] = ICMPV6_NEIGHBOUR_ADVERT;
    buf[ICMP6_AT + 4] = NA_FLAG_OVERRIDE;
    buf[ICMP6_AT + 8..ICMP6_AT + 24].copy_from_slice(ipv6);
    buf[ICMP6_AT + 24] = ND_OPT_TARGET_LLADDR;
    buf[ICMP6_AT + 25] = 1; // in units of 8 bytes
    buf[ICMP6_AT + 26..ICMP6_AT + 32].copy_from_slice(mac);
    let sum = icmpv6_checksum(ipv6, &ALL_NODES, &buf[ICMP6_AT..]);
    buf[ICMP6_AT + 2..ICMP6_AT + 4].copy_from_slice(&sum.to_be_bytes());
    buf
}

/// The ICMPv6 checksum (RFC 4443 section 2.3) of `message`, whose checksum
/// field must be zero, sent from `src` to `dst`: the one's complement of the
/// one's complement sum over the IPv6 pseudo-header and the message.
pub fn icmpv6_checksum(src: &[u8; 16], dst: &[u8; 16], message: &[u8]) -> u16 {
    let len = u32::try_from(message.len()).unwrap_or(u32::MAX);
    let mut sum = ones_sum(0, src);
    sum = ones_sum(sum, dst);
    sum = ones_sum(sum, &len.to_be_bytes());
    sum = ones_sum(sum, &[0, 0, 0, IPPROTO_ICMPV6]);
    sum = ones_sum(sum, message);
    !fold(sum)
}

/// Adds `bytes` (big-endian 16-bit words, an odd last byte padded with
/// zero) to the running sum.
fn ones_sum(mut sum: u64, bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds the carries of a one's complement sum into 16 bits.
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves at most 16 bits.
    sum as u16
}

/// What kind of announce a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AnnounceKind {
    /// A RARP reverse request (QEMU's self-announce).
    Rarp,
    /// A gratuitous ARP (request or reply whose sender and target IPv4
    /// addresses are equal).
    Garp,
    /// An IPv6 unsolicited neighbour advertisement (Override set,
    /// Solicited clear, with the target link-layer address option).
    UnsolicitedNa,
}

impl std::fmt::Display for AnnounceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AnnounceKind::Rarp => f.write_str("RARP"),
            AnnounceKind::Garp => f.write_str("gratuitous ARP"),
            AnnounceKind::UnsolicitedNa => f.write_str("unsolicited neighbour advertisement"),
        }
    }
}

/// A parsed announce frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announce {
    /// RARP or gratuitous ARP.
    pub kind: AnnounceKind,
    /// The announced MAC address (the ARP sender hardware address; for a
    /// neighbour advertisement the target link-layer address option).
    pub mac: [u8; 6],
    /// The announced IPv4 address (`None` for RARP and IPv6).
    pub ip: Option<[u8; 4]>,
    /// The announced IPv6 address (the neighbour advertisement's target;
    /// `None` for RARP and ARP).
    pub ipv6: Option<[u8; 16]>,
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    let bytes = frame.get(at..at + 2)?;
    Some(u16::from_be_bytes([bytes[0], bytes[1]]))
}

fn array<const N: usize>(frame: &[u8], at: usize) -> Option<[u8; N]> {
    frame.get(at..at + N)?.try_into().ok()
}

/// Recognise a self-announce frame (from a capture, a TAP, or a test sender).
///
/// Accepts frames of at least 42 bytes (captures may strip the padding):
/// a RARP reverse request (opcode 3) with Ethernet/IPv4 address types, or an
/// ARP request or reply whose sender and target protocol addresses are the
/// same (a gratuitous ARP), or an unsolicited neighbour advertisement (see
/// [`parse_na`]). Anything else gives `None`.
pub fn parse_announce(frame: &[u8]) -> Option<Announce> {
    if frame.len() < ARP_FRAME_LEN {
        return None;
    }
    let ethertype = be16(frame, 12)?;
    if ethertype == ETH_P_IPV6 {
        return parse_na(frame);
    }
    if be16(frame, 14)? != ARP_HTYPE_ETH
        || be16(frame, 16)? != ARP_PTYPE_IP
        || frame[18] != 6
        || frame[19] != 4
    {
        return None;
    }
    let opcode = be16(frame, 20)?;
    let mac: [u8; 6] = array(frame, 22)?;
    let spa: [u8; 4] = array(frame, 28)?;
    let tpa: [u8; 4] = array(frame, 38)?;
    match (ethertype, opcode) {
        (ETH_P_RARP, ARP_OP_REQUEST_REV) => Some(Announce {
            kind: AnnounceKind::Rarp,
            mac,
            ip: None,
            ipv6: None,
        }),
        (ETH_P_ARP, ARP_OP_REQUEST | ARP_OP_REPLY) if spa == tpa && spa != [0; 4] => {
            Some(Announce {
                kind: AnnounceKind::Garp,
                mac,
                ip: Some(spa),
                ipv6: None,
            })
        }
        _ => None,
    }
}

/// Recognise an unsolicited neighbour advertisement as a receiver would
/// accept it (RFC 4861 section 7.1.2): IPv6 carrying ICMPv6 type 136 code 0
/// with hop limit 255, a correct checksum, the Solicited flag clear, a
/// non-multicast target, and a target link-layer address option of 6
/// bytes (its address is the announced MAC). Anything else gives `None`.
pub fn parse_na(frame: &[u8]) -> Option<Announce> {
    if be16(frame, 12)? != ETH_P_IPV6 || frame.get(IP6_AT)? >> 4 != 6 {
        return None;
    }
    let payload = usize::from(be16(frame, IP6_AT + 4)?);
    let icmp = frame.get(ICMP6_AT..ICMP6_AT.checked_add(payload)?)?;
    if frame[IP6_AT + 6] != IPPROTO_ICMPV6 || frame[IP6_AT + 7] != 255 || icmp.len() < 24 {
        return None;
    }
    let src: [u8; 16] = array(frame, IP6_AT + 8)?;
    let dst: [u8; 16] = array(frame, IP6_AT + 24)?;
    if icmp[0] != ICMPV6_NEIGHBOUR_ADVERT || icmp[1] != 0 || icmp[4] & NA_FLAG_SOLICITED != 0 {
        return None;
    }
    let mut zeroed = icmp.to_vec();
    zeroed[2..4].fill(0);
    if icmpv6_checksum(&src, &dst, &zeroed).to_be_bytes() != [icmp[2], icmp[3]] {
        return None;
    }
    let target: [u8; 16] = array(icmp, 8)?;
    if target[0] == 0xff {
        return None;
    }
    Some(Announce {
        kind: AnnounceKind::UnsolicitedNa,
        mac: target_lladdr(&icmp[24..])?,
        ip: None,
        ipv6: Some(target),
    })
}

/// The 6-byte target link-layer address in a list of neighbour discovery
/// options, if there is exactly such an option and every option is well
/// formed (a zero length is invalid).
fn target_lladdr(mut options: &[u8]) -> Option<[u8; 6]> {
    let mut found = None;
    while !options.is_empty() {
        let len = usize::from(*options.get(1)?) * 8;
        if len == 0 || len > options.len() {
            return None;
        }
        if options[0] == ND_OPT_TARGET_LLADDR && len == 8 {
            found = Some(array(options, 2)?);
        }
        options = &options[len..];
    }
    found
}

/// `52:54:00:12:34:56` form of a MAC address.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let mut s = String::with_capacity(17);
    for (i, b) in mac.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parse `52:54:00:12:34:56` (or with `-` separators) into a MAC address.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split([':', '-']);
    for byte in mac.iter_mut() {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    #[test]
    fn rarp_is_byte_exact() {
        #[rustfmt::skip]
        let expected: [u8; 60] = [
            // Ethernet: broadcast destination, guest source, ethertype RARP
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56,
            0x80, 0x35,
            // htype 1, ptype 0x0800, hlen 6, plen 4, opcode 3
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x03,
            // sender MAC, sender IP 0.0.0.0
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x00, 0x00, 0x00, 0x00,
            // target MAC, target IP 0.0.0.0
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x00, 0x00, 0x00, 0x00,
            // 18 bytes of padding
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(rarp_frame(&MAC), expected);
    }

    #[test]
    fn garp_is_byte_exact() {
        #[rustfmt::skip]
        let expected: [u8; 60] = [
            // Ethernet: broadcast destination, guest source, ethertype ARP
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56,
            0x08, 0x06,
            // htype 1, ptype 0x0800, hlen 6, plen 4, opcode 1 (request)
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01,
            // sender MAC, sender IP 192.168.10.2
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0xc0, 0xa8, 0x0a, 0x02,
            // target MAC 00:00:00:00:00:00, target IP 192.168.10.2
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc0, 0xa8, 0x0a, 0x02,
            // 18 bytes of padding
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(garp_frame(&MAC, &[192, 168, 10, 2]), expected);
    }

    #[test]
    fn parse_round_trips() {
        assert_eq!(
            parse_announce(&rarp_frame(&MAC)),
            Some(Announce {
                kind: AnnounceKind::Rarp,
                mac: MAC,
                ip: None,
                ipv6: None,
            })
        );
        assert_eq!(
            parse_announce(&garp_frame(&MAC, &[10, 0, 0, 7])),
            Some(Announce {
                kind: AnnounceKind::Garp,
                mac: MAC,
                ip: Some([10, 0, 0, 7]),
                ipv6: None,
            })
        );
        // Without padding, as some captures give it.
        assert!(parse_announce(&rarp_frame(&MAC)[..42]).is_some());
    }

    #[test]
    fn parse_rejects_other_frames() {
        assert_eq!(parse_announce(&[]), None);
        assert_eq!(parse_announce(&rarp_frame(&MAC)[..41]), None);
        // An ordinary ARP request (sender IP != target IP).
        let mut who_has = garp_frame(&MAC, &[10, 0, 0, 7]);
        who_has[41] = 1;
        assert_eq!(parse_announce(&who_has), None);
        // An ARP probe (sender IP 0.0.0.0) is not an announce.
        assert_eq!(parse_announce(&garp_frame(&MAC, &[0, 0, 0, 0])), None);
        // RARP reply (opcode 4).
        let mut reply = rarp_frame(&MAC);
        reply[21] = 4;
        assert_eq!(parse_announce(&reply), None);
        // IPv4 ethertype.
        let mut ip = rarp_frame(&MAC);
        ip[12..14].copy_from_slice(&[0x08, 0x00]);
        assert_eq!(parse_announce(&ip), None);
        // Wrong hardware length.
        let mut hlen = rarp_frame(&MAC);
        hlen[18] = 8;
        assert_eq!(parse_announce(&hlen), None);
    }

    #[test]
    fn gratuitous_reply_is_recognised() {
        let mut reply = garp_frame(&MAC, &[10, 0, 0, 7]);
        reply[21] = 2;
        assert_eq!(
            parse_announce(&reply).map(|a| a.kind),
            Some(AnnounceKind::Garp)
        );
    }

    /// 2001:db8::2
    const IP6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    #[test]
    fn na_is_byte_exact() {
        // The checksum 0x746d was computed outside this crate (a Python
        // one's complement sum over the RFC 2460 pseudo-header and the
        // ICMPv6 message), not with `icmpv6_checksum`.
        #[rustfmt::skip]
        let expected: [u8; NA_FRAME_LEN] = [
            // Ethernet: 33:33:00:00:00:01 (ff02::1), guest source, ethertype IPv6
            0x33, 0x33, 0x00, 0x00, 0x00, 0x01,
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56,
            0x86, 0xdd,
            // IPv6: version 6, class 0, flow 0; payload 32; next header 58; hop limit 255
            0x60, 0x00, 0x00, 0x00, 0x00, 0x20, 58, 255,
            // source 2001:db8::2
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2,
            // destination ff02::1
            0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
            // ICMPv6: type 136, code 0, checksum
            136, 0, 0x74, 0x6d,
            // flags: Override only; reserved
            0x20, 0x00, 0x00, 0x00,
            // target 2001:db8::2
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2,
            // option 2 (target link-layer address), length 1 (8 bytes), the MAC
            2, 1, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56,
        ];
        assert_eq!(na_frame(&MAC, &IP6), expected);
    }

    /// The receiver's check (RFC 1071): the one's complement sum over the
    /// pseudo-header and the message *with* its checksum is 0xffff. Written
    /// out here, independently of `icmpv6_checksum`.
    fn checksum_verifies(frame: &[u8]) -> bool {
        let icmp = &frame[54..];
        let mut data = Vec::new();
        data.extend_from_slice(&frame[22..38]);
        data.extend_from_slice(&frame[38..54]);
        data.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
        data.extend_from_slice(&[0, 0, 0, 58]);
        data.extend_from_slice(icmp);
        let mut sum: u32 = 0;
        for pair in data.chunks(2) {
            sum += (u32::from(pair[0]) << 8) | u32::from(*pair.get(1).unwrap_or(&0));
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum == 0xffff
    }

    #[test]
    fn na_checksum_verifies_for_other_addresses() {
        let link_local = [
            0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x50, 0x54, 0, 0xff, 0xfe, 0x12, 0x34, 0x56,
        ];
        let high = [0xff; 16];
        for (mac, ip) in [
            (MAC, IP6),
            (MAC, link_local),
            ([0xfe; 6], high),
            ([0; 6], [0; 16]),
        ] {
            let frame = na_frame(&mac, &ip);
            assert!(checksum_verifies(&frame), "{frame:02x?}");
            let mut bad = frame;
            bad[70] ^= 1;
            assert!(!checksum_verifies(&bad));
        }
    }

    #[test]
    fn na_parses_and_bad_ones_are_refused() {
        let frame = na_frame(&MAC, &IP6);
        assert_eq!(
            parse_announce(&frame),
            Some(Announce {
                kind: AnnounceKind::UnsolicitedNa,
                mac: MAC,
                ip: None,
                ipv6: Some(IP6),
            })
        );
        let changed = |at: usize, value: u8| {
            let mut f = frame;
            f[at] = value;
            parse_announce(&f)
        };
        // Hop limit other than 255 (a router forwarded it).
        assert_eq!(changed(21, 64), None);
        // Not ICMPv6; not an NA; code not 0.
        assert_eq!(changed(20, 17), None);
        assert_eq!(changed(54, 135), None);
        assert_eq!(changed(55, 1), None);
        // A wrong checksum.
        assert_eq!(changed(57, frame[57] ^ 0xff), None);
        // Solicited flag set (the checksum no longer matches either; both
        // refuse it).
        assert_eq!(changed(58, NA_FLAG_SOLICITED | NA_FLAG_OVERRIDE), None);
        // An option of length 0.
        assert_eq!(changed(79, 0), None);
        // Truncated.
        assert_eq!(parse_announce(&frame[..80]), None);
    }

    #[test]
    fn mac_text() {
        assert_eq!(format_mac(&MAC), "52:54:00:12:34:56");
        assert_eq!(parse_mac("52:54:00:12:34:56"), Some(MAC));
        assert_eq!(parse_mac("52-54-00-12-34-56"), Some(MAC));
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:56:78"), None);
        assert_eq!(parse_mac("52:54:00:12:34:5g"), None);
        assert_eq!(parse_mac("52:54:00:12:34:"), None);
        assert_eq!(parse_mac("52:54:00:12:34:567"), None);
    }
}
