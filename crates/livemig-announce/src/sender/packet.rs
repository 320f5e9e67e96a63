//! Sending on a named interface through an `AF_PACKET` raw socket.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{interface_name, FrameSender, SendError};

/// Sends frames on a network interface through an `AF_PACKET`, `SOCK_RAW`
/// socket bound to it.
///
/// The socket is bound with protocol 0, so it never receives anything. It
/// belongs to the network namespace of the thread that created it.
/// Opening needs `CAP_NET_RAW`.
#[derive(Debug)]
pub struct PacketSender {
    fd: OwnedFd,
    interface: String,
    ifindex: u32,
}

/// A `sockaddr_ll` for `ifindex`, protocol `protocol` (host order) and
/// destination `dest`.
fn link_address(ifindex: u32, protocol: u16, dest: Option<&[u8]>) -> libc::sockaddr_ll {
    // SAFETY: `sockaddr_ll` is a plain C struct of integers and a byte array:
    // all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as libc::c_ushort;
    addr.sll_protocol = protocol.to_be();
    addr.sll_ifindex = libc::c_int::try_from(ifindex).unwrap_or(0);
    if let Some(dest) = dest {
        let len = dest.len().min(addr.sll_addr.len());
        addr.sll_addr[..len].copy_from_slice(&dest[..len]);
        addr.sll_halen = u8::try_from(len).unwrap_or(0);
    }
    addr
}

impl PacketSender {
    /// Open a raw socket bound to the interface `interface` (in the calling
    /// thread's network namespace).
    pub fn new(interface: &str) -> Result<Self, SendError> {
        let cname = interface_name(interface)?;
        // SAFETY: `cname` is a valid NUL-terminated string for the call.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            let source = io::Error::last_os_error();
            return Err(match source.raw_os_error() {
                Some(libc::ENODEV) | Some(libc::ENXIO) => SendError::InterfaceNotFound {
                    name: interface.to_string(),
                },
                _ => SendError::Setup {
                    what: format!("looking up interface {interface:?}"),
                    source,
                },
            });
        }
        // SAFETY: plain socket(2) call; the result is checked below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(SendError::Setup {
                what: format!("opening an AF_PACKET socket for interface {interface:?}"),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let addr = link_address(ifindex, 0, None);
        // SAFETY: `addr` is a valid `sockaddr_ll` and the length passed is its
        // size.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if ret < 0 {
            return Err(SendError::Setup {
                what: format!("binding an AF_PACKET socket to interface {interface:?}"),
                source: io::Error::last_os_error(),
            });
        }
        Ok(PacketSender {
            fd,
            interface: interface.to_string(),
            ifindex,
        })
    }

    /// The interface's name.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// The interface's index (at the time the sender was opened).
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }
}

impl FrameSender for PacketSender {
    fn send(&mut self, frame: &[u8]) -> Result<(), SendError> {
        // Give the kernel the ethertype and destination explicitly, so the
        // skb's protocol is right on every kernel version.
        let protocol = frame
            .get(12..14)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .unwrap_or(0);
        let addr = link_address(self.ifindex, protocol, frame.get(0..6));
        super::send_all(
            frame.len(),
            || self.describe(),
            || {
                // SAFETY: `frame` is valid for reads of `frame.len()` bytes, `addr`
                // is a valid `sockaddr_ll` of the size given, and `self.fd` is an
                // open socket owned by this sender.
                unsafe {
                    libc::sendto(
                        self.fd.as_raw_fd(),
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                        (&addr as *const libc::sockaddr_ll).cast(),
                        mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                    )
                }
            },
        )
    }

    fn describe(&self) -> String {
        format!("interface {:?} (AF_PACKET)", self.interface)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_interface_is_named() {
        let err = PacketSender::new("lmnosuch0").unwrap_err();
        assert!(
            matches!(&err, SendError::InterfaceNotFound { name } if name == "lmnosuch0"),
            "{err}"
        );
        assert!(err.to_string().contains("lmnosuch0"));
    }

    #[test]
    fn invalid_name_is_refused() {
        assert!(matches!(
            PacketSender::new("bad/name"),
            Err(SendError::InvalidName { .. })
        ));
    }

    #[test]
    fn address_layout() {
        let a = link_address(7, 0x8035, Some(&[0xff; 6]));
        assert_eq!(a.sll_family, libc::AF_PACKET as u16);
        assert_eq!(a.sll_ifindex, 7);
        assert_eq!(u16::from_be(a.sll_protocol), 0x8035);
        assert_eq!(a.sll_halen, 6);
        assert_eq!(&a.sll_addr[..6], &[0xff; 6]);
    }
}
