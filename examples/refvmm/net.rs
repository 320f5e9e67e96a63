//! `--net tap=<IFNAME>,mac=<MAC>[,ip=<IPv4>]`: a NIC backed by a TAP device.
//! NIC i is a virtio-net device (`livemig-virtio`) at
//! `0xd000_0000 + i * 0x1000`, GSI `5 + i`; the TAP also carries the
//! post-migration announce (RARP + gratuitous ARP).

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

/// A parsed `--net` value: TAP name, MAC, optional IPv4.
pub type NetSpec = (String, [u8; 6], Option<[u8; 4]>);

/// Parses a `--net` value.
pub fn parse_spec(spec: &str) -> Result<NetSpec, String> {
    let mut tap = None;
    let mut mac = None;
    let mut ip = None;
    for part in spec.split(',') {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            format!("--net '{spec}': expected tap=<IFNAME>,mac=<MAC>[,ip=<IPv4>]")
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
            _ => return Err(format!("--net '{spec}': unknown key '{k}'")),
        }
    }
    match (tap, mac) {
        (Some(t), Some(m)) => Ok((t, m, ip)),
        _ => Err(format!("--net '{spec}': tap= and mac= are required")),
    }
}

impl NetBackend {
    /// Opens (or creates) the TAP named in `spec`.
    pub fn open(spec: &str) -> Result<Self, String> {
        let (tap, mac, ip) = parse_spec(spec)?;
        let fd = open_tap(&tap).map_err(|e| format!("--net {spec}: {e}"))?;
        Ok(NetBackend { tap, mac, ip, fd })
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
}
