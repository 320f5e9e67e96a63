//! Self-announce frames: QEMU's RARP announce, the gratuitous ARP, and a
//! parser for both.
//!
//! Both frames are 60 bytes: the minimum Ethernet frame without its FCS (the
//! NIC or the kernel adds that), zero-padded after the 42 bytes of header and
//! payload.
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

/// What kind of announce a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AnnounceKind {
    /// A RARP reverse request (QEMU's self-announce).
    Rarp,
    /// A gratuitous ARP (request or reply whose sender and target IPv4
    /// addresses are equal).
    Garp,
}

impl std::fmt::Display for AnnounceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AnnounceKind::Rarp => f.write_str("RARP"),
            AnnounceKind::Garp => f.write_str("gratuitous ARP"),
        }
    }
}

/// A parsed announce frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announce {
    /// RARP or gratuitous ARP.
    pub kind: AnnounceKind,
    /// The announced MAC address (the ARP sender hardware address).
    pub mac: [u8; 6],
    /// The announced IPv4 address (`None` for RARP).
    pub ip: Option<[u8; 4]>,
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
/// same (a gratuitous ARP). Anything else gives `None`.
pub fn parse_announce(frame: &[u8]) -> Option<Announce> {
    if frame.len() < ARP_FRAME_LEN {
        return None;
    }
    let ethertype = be16(frame, 12)?;
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
        }),
        (ETH_P_ARP, ARP_OP_REQUEST | ARP_OP_REPLY) if spa == tpa && spa != [0; 4] => {
            Some(Announce {
                kind: AnnounceKind::Garp,
                mac,
                ip: Some(spa),
            })
        }
        _ => None,
    }
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
                ip: None
            })
        );
        assert_eq!(
            parse_announce(&garp_frame(&MAC, &[10, 0, 0, 7])),
            Some(Announce {
                kind: AnnounceKind::Garp,
                mac: MAC,
                ip: Some([10, 0, 0, 7])
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
