//! `--net tap=<IFNAME>,mac=<MAC>[,ip=<IPv4>][,ip6=<IPv6>]...`: a NIC backed
//! by a TAP device. NIC i is a virtio-net device (`livemig-virtio`) at
//! `0xd000_0000 + i * 0x1000`, GSI `5 + i`; the TAP also carries the
//! post-migration announce (RARP, gratuitous ARP for the IPv4 address, an
//! unsolicited neighbour advertisement for each IPv6 address).
//!
//! The IPv4 address travels in the engine's NIC list ([`NicInfo`]); the
//! IPv6 addresses travel as VM description properties
//! `net.<mac>.ipv6` = comma-separated addresses ([`ipv6_properties`]), which
//! the engine carries without reading them, so the handshake's encoding is
//! unchanged and a destination of an older release simply ignores them.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use livemig::vm::NicInfo;
use livemig_announce::{
    announce_from, format_mac, open_tap, parse_mac, AnnounceHandle, Nic, Schedule, TapSender,
};

/// A NIC: its TAP (kept open for the VM's lifetime) and addresses.
pub struct NetBackend {
    /// TAP interface name.
    pub tap: String,
    /// Guest MAC.
    pub mac: [u8; 6],
    /// Guest IPv4, if known.
    pub ip: Option<[u8; 4]>,
    /// Guest IPv6 addresses, if known.
    pub ip6: Vec<[u8; 16]>,
    fd: OwnedFd,
}

/// Guest-physical address of NIC 0's virtio-mmio window.
pub const VIRTIO_NET_BASE: u64 = 0xd000_0000;
/// Distance between the windows of consecutive NICs.
pub const VIRTIO_NET_STRIDE: u64 = 0x1000;
/// GSI of NIC 0 (NIC i uses `VIRTIO_NET_GSI + i`).
pub const VIRTIO_NET_GSI: u32 = 5;
/// At most this many NICs (GSIs 5..=20 of the IOAPIC's 24).
pub const MAX_NICS: usize = 16;

/// Longest `net.<mac>.ipv6` property value (the engine's limit on a
/// property value, `livemig::protocol::MAX_PROPERTY_LEN`).
const MAX_IPV6_PROPERTY_LEN: usize = 256;

/// A parsed `--net` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// TAP interface name.
    pub tap: String,
    /// Guest MAC.
    pub mac: [u8; 6],
    /// Guest IPv4, if given.
    pub ip: Option<[u8; 4]>,
    /// Guest IPv6 addresses (`ip6=` may be repeated), in the order given.
    pub ip6: Vec<[u8; 16]>,
}

/// Parses one `ip6=` value: a unicast IPv6 address (not multicast, not
/// `::`, which no neighbour advertisement may name as its target).
fn parse_ip6(spec: &str, v: &str) -> Result<[u8; 16], String> {
    let a: Ipv6Addr = v
        .parse()
        .map_err(|_| format!("--net '{spec}': bad IPv6 '{v}'"))?;
    if a.is_multicast() || a.is_unspecified() {
        return Err(format!(
            "--net '{spec}': IPv6 '{v}' is not a unicast address"
        ));
    }
    Ok(a.octets())
}

/// Parses a `--net` value.
pub fn parse_spec(spec: &str) -> Result<NetSpec, String> {
    let mut tap = None;
    let mut mac = None;
    let mut ip = None;
    let mut ip6 = Vec::new();
    for part in spec.split(',') {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            format!("--net '{spec}': expected tap=<IFNAME>,mac=<MAC>[,ip=<IPv4>][,ip6=<IPv6>]...")
        })?;
        match k {
            "tap" if !v.is_empty() && v.len() < 16 => tap = Some(v.to_string()),
            "tap" => return Err(format!("--net '{spec}': interface name must be 1-15 bytes")),
            "mac" => {
                mac = Some(parse_mac(v).ok_or_else(|| format!("--net '{spec}': bad MAC '{v}'"))?)
            }
            "ip" => {
                let a: std::net::Ipv4Addr = v
                    .parse()
                    .map_err(|_| format!("--net '{spec}': bad IPv4 '{v}'"))?;
                ip = Some(a.octets());
            }
            "ip6" => {
                let a = parse_ip6(spec, v)?;
                if !ip6.contains(&a) {
                    ip6.push(a);
                }
            }
            _ => return Err(format!("--net '{spec}': unknown key '{k}'")),
        }
    }
    let (Some(tap), Some(mac)) = (tap, mac) else {
        return Err(format!("--net '{spec}': tap= and mac= are required"));
    };
    if ipv6_value(&ip6).len() > MAX_IPV6_PROPERTY_LEN {
        return Err(format!(
            "--net '{spec}': too many IPv6 addresses (together more than \
             {MAX_IPV6_PROPERTY_LEN} characters, what the migration stream carries)"
        ));
    }
    Ok(NetSpec { tap, mac, ip, ip6 })
}

/// The VM description property that carries a NIC's IPv6 addresses.
pub fn ipv6_property_key(mac: &[u8; 6]) -> String {
    format!("net.{}.ipv6", format_mac(mac))
}

/// `fd77::2,fe80::2`: the addresses in their canonical text form.
fn ipv6_value(addrs: &[[u8; 16]]) -> String {
    addrs
        .iter()
        .map(|a| Ipv6Addr::from(*a).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The `net.<mac>.ipv6` properties the source adds to its VM description,
/// one per NIC that has IPv6 addresses.
pub fn ipv6_properties(nets: &[NetBackend]) -> BTreeMap<String, String> {
    nets.iter()
        .filter(|n| !n.ip6.is_empty())
        .map(|n| (ipv6_property_key(&n.mac), ipv6_value(&n.ip6)))
        .collect()
}

/// The IPv6 addresses the source gave for the NIC `mac` (none if it sent no
/// such property).
pub fn ipv6_from_properties(
    props: &BTreeMap<String, String>,
    mac: &[u8; 6],
) -> Result<Vec<[u8; 16]>, String> {
    let key = ipv6_property_key(mac);
    let Some(value) = props.get(&key) else {
        return Ok(Vec::new());
    };
    value
        .split(',')
        .map(|a| {
            a.parse::<Ipv6Addr>().map(|a| a.octets()).map_err(|_| {
                format!("the source's {key}={value:?} is not a list of IPv6 addresses")
            })
        })
        .collect()
}

/// Takes each NIC's IPv6 addresses from the source's description where this
/// destination's `--net` gave none; refuses a NIC whose `--net` gave a
/// different set than the source (the announce would tell the network
/// about addresses the guest does not have).
pub fn reconcile_ipv6(
    props: &BTreeMap<String, String>,
    nets: &mut [NetBackend],
) -> Result<(), String> {
    for n in nets.iter_mut() {
        let theirs = ipv6_from_properties(props, &n.mac)?;
        let same =
            |a: &[[u8; 16]], b: &[[u8; 16]]| a.len() == b.len() && a.iter().all(|x| b.contains(x));
        if n.ip6.is_empty() {
            n.ip6 = theirs;
        } else if !theirs.is_empty() && !same(&theirs, &n.ip6) {
            return Err(format!(
                "NIC {}: the source says IPv6 [{}], --net says [{}]",
                format_mac(&n.mac),
                ipv6_value(&theirs),
                ipv6_value(&n.ip6)
            ));
        }
    }
    Ok(())
}

impl NetBackend {
    /// Opens (or creates) the TAP named in `spec`.
    pub fn open(spec: &str) -> Result<Self, String> {
        let NetSpec { tap, mac, ip, ip6 } = parse_spec(spec)?;
        let fd = open_tap(&tap).map_err(|e| format!("--net {spec}: {e}"))?;
        Ok(NetBackend {
            tap,
            mac,
            ip,
            ip6,
            fd,
        })
    }

    /// A NIC on a TAP descriptor received from another VMM (a same-host
    /// hand-over), described by that VMM's `spec` (see [`NetBackend::spec`]).
    pub fn from_fd(spec: &str, fd: OwnedFd) -> Result<Self, String> {
        let NetSpec { tap, mac, ip, ip6 } = parse_spec(spec)?;
        Ok(NetBackend {
            tap,
            mac,
            ip,
            ip6,
            fd,
        })
    }

    /// The `--net` value that describes this NIC now.
    pub fn spec(&self) -> String {
        let mut s = format!("tap={},mac={}", self.tap, format_mac(&self.mac));
        if let Some(ip) = self.ip {
            s.push_str(&format!(",ip={}", std::net::Ipv4Addr::from(ip)));
        }
        for a in &self.ip6 {
            s.push_str(&format!(",ip6={}", Ipv6Addr::from(*a)));
        }
        s
    }

    /// The TAP descriptor (to pass to another VMM).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The virtio-net device number `index` on this TAP (a duplicate of the
    /// TAP descriptor: the announce keeps using the original).
    pub fn device(&self, index: usize) -> Result<livemig_virtio::VirtioNet, String> {
        let fd = self
            .fd
            .try_clone()
            .map_err(|e| format!("NIC {index} ({}): {e}", self.tap))?;
        let backend = livemig_virtio::TapBackend::from_fd(fd)
            .map_err(|e| format!("NIC {index} ({}): {e}", self.tap))?;
        livemig_virtio::VirtioNet::new(index, self.mac, Box::new(backend))
            .map_err(|e| e.to_string())
    }

    /// What the migration stream carries for this NIC.
    pub fn info(&self) -> NicInfo {
        NicInfo {
            mac: self.mac,
            ipv4: self.ip,
        }
    }
}

/// The guest command line with `net=mmio:0xd0000000:5,ip=<ip>` appended
/// for NIC 0 when it has an IPv4 address and `cmdline` has no `net=` token.
pub fn with_net_token(cmdline: &str, nic0_ip: Option<[u8; 4]>) -> String {
    match nic0_ip {
        Some(ip) if !cmdline.split_whitespace().any(|w| w.starts_with("net=")) => format!(
            "{cmdline} net=mmio:{VIRTIO_NET_BASE:#x}:{VIRTIO_NET_GSI},ip={}",
            std::net::Ipv4Addr::from(ip)
        )
        .trim()
        .to_string(),
        _ => cmdline.to_string(),
    }
}

/// Checks the stream's NICs against this destination's `--net` flags and
/// takes the IPv4 addresses from the stream where the flags gave none.
pub fn reconcile(stream: &[NicInfo], nets: &mut [NetBackend]) -> Result<(), String> {
    let fmt = |m: &[u8; 6]| format_mac(m);
    if stream.len() != nets.len() || stream.iter().zip(nets.iter()).any(|(s, n)| s.mac != n.mac) {
        return Err(format!(
            "NICs differ: the source has [{}], this destination was given --net [{}]",
            stream
                .iter()
                .map(|n| fmt(&n.mac))
                .collect::<Vec<_>>()
                .join(", "),
            nets.iter()
                .map(|n| format!("{}={}", n.tap, fmt(&n.mac)))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for (s, n) in stream.iter().zip(nets.iter_mut()) {
        match (s.ipv4, n.ip) {
            (Some(a), Some(b)) if a != b => {
                return Err(format!(
                    "NIC {}: the source says IPv4 {}, --net says {}",
                    fmt(&n.mac),
                    std::net::Ipv4Addr::from(a),
                    std::net::Ipv4Addr::from(b)
                ))
            }
            (Some(a), None) => n.ip = Some(a),
            _ => {}
        }
    }
    Ok(())
}

/// Starts announcing every NIC on its own TAP, on `schedule`, counted from
/// `resumed_at`. Never blocks; the announce thread gets its own copies of the
/// TAP descriptors (the VMM keeps its own, so the TAPs stay up).
pub fn start_announce(
    nets: &[NetBackend],
    schedule: &Schedule,
    resumed_at: Instant,
) -> Result<AnnounceHandle, String> {
    let mut nics = Vec::new();
    for n in nets {
        let sender =
            TapSender::dup_from(n.fd.as_fd()).map_err(|e| format!("announce on {}: {e}", n.tap))?;
        let mut nic = Nic::new(n.mac, Box::new(sender));
        if let Some(ip) = n.ip {
            nic = nic.with_ipv4(ip);
        }
        for ip6 in &n.ip6 {
            nic = nic.with_ipv6(*ip6);
        }
        nics.push(nic);
    }
    Ok(announce_from(nics, schedule, resumed_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_token_is_added_only_when_missing_and_known() {
        assert_eq!(
            with_net_token("ws=16", Some([10, 99, 0, 2])),
            "ws=16 net=mmio:0xd0000000:5,ip=10.99.0.2"
        );
        assert_eq!(
            with_net_token("", Some([10, 0, 0, 1])),
            "net=mmio:0xd0000000:5,ip=10.0.0.1"
        );
        assert_eq!(
            with_net_token("net=mmio:1:2,ip=1.2.3.4 ws=1", Some([10, 0, 0, 1])),
            "net=mmio:1:2,ip=1.2.3.4 ws=1"
        );
        assert_eq!(with_net_token("ws=16", None), "ws=16");
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];

    #[test]
    fn ip6_is_parsed_and_checked() {
        let s =
            parse_spec("tap=t0,mac=52:54:00:00:00:01,ip6=fd77::2,ip6=FE80::2,ip6=fd77::2").unwrap();
        assert_eq!(s.ip6.len(), 2);
        assert_eq!(ipv6_value(&s.ip6), "fd77::2,fe80::2");
        for bad in ["ip6=ff02::1", "ip6=::", "ip6=10.0.0.1", "ip6="] {
            let e = parse_spec(&format!("tap=t0,mac=52:54:00:00:00:01,{bad}")).unwrap_err();
            assert!(e.contains("IPv6"), "{bad}: {e}");
        }
        let many = (0..8)
            .map(|i| format!("ip6=fd77:1234:5678:9abc:def0:1234:5678:{i:x}"))
            .collect::<Vec<_>>()
            .join(",");
        let e = parse_spec(&format!("tap=t0,mac=52:54:00:00:00:01,{many}")).unwrap_err();
        assert!(e.contains("too many IPv6"), "{e}");
    }

    #[test]
    fn ipv6_properties_round_trip() {
        let mut props = BTreeMap::new();
        props.insert(ipv6_property_key(&MAC), "fd77::2,fe80::2".to_string());
        assert_eq!(ipv6_property_key(&MAC), "net.52:54:00:00:00:01.ipv6");
        let got = ipv6_from_properties(&props, &MAC).unwrap();
        assert_eq!(ipv6_value(&got), "fd77::2,fe80::2");
        assert!(ipv6_from_properties(&props, &[0; 6]).unwrap().is_empty());
        props.insert(ipv6_property_key(&MAC), "fd77::2,nope".to_string());
        assert!(ipv6_from_properties(&props, &MAC).is_err());
    }
}
