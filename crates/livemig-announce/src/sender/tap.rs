//! Sending through a TAP device's file descriptor.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use super::{interface_name, FrameSender, SendError};

/// The clone device that creates and attaches TAP devices.
const TUN_DEVICE: &str = "/dev/net/tun";

/// What a TAP file descriptor expects in front of each Ethernet frame.
///
/// A VMM's virtio-net backend usually opens its TAP with `IFF_VNET_HDR`
/// (offloads), in which case every write starts with a `virtio_net_hdr`; an
/// all-zero header means "no offload, checksum complete", which is right for
/// the announce frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TapFraming {
    /// The device was opened without `IFF_NO_PI`: each frame starts with a
    /// 4-byte `struct tun_pi` (flags, then the ethertype).
    pub packet_info: bool,
    /// The device was opened with `IFF_VNET_HDR`: length of the
    /// `virtio_net_hdr` written (zeroed) before each frame (10 or 12 bytes,
    /// `TUNSETVNETHDRSZ`); zero otherwise.
    pub vnet_hdr_len: usize,
}

impl TapFraming {
    /// `IFF_NO_PI` without `IFF_VNET_HDR`: the bare Ethernet frame.
    pub const PLAIN: TapFraming = TapFraming {
        packet_info: false,
        vnet_hdr_len: 0,
    };

    /// Bytes written before the frame.
    pub fn header_len(&self) -> usize {
        if self.packet_info {
            4 + self.vnet_hdr_len
        } else {
            self.vnet_hdr_len
        }
    }
}

/// A zeroed `struct ifreq`.
fn empty_ifreq() -> libc::ifreq {
    // SAFETY: `ifreq` is a plain C struct of a byte array and a union of
    // integers, arrays and a pointer: the all-zero bit pattern is a valid
    // value of every field.
    unsafe { std::mem::zeroed() }
}

/// The interface name stored in an `ifreq`.
fn ifreq_name(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Open `/dev/net/tun` and attach it to the TAP device `name`
/// (`IFF_TAP | IFF_NO_PI`), creating the device if it does not exist.
///
/// The device lives in the caller's network namespace and, unless it was made
/// persistent, goes away when the last descriptor attached to it is closed.
/// Creating a device needs `CAP_NET_ADMIN`.
pub fn open_tap(name: &str) -> Result<OwnedFd, SendError> {
    let cname = interface_name(name)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_DEVICE)
        .map_err(|source| SendError::Setup {
            what: format!("opening {TUN_DEVICE} for tap {name:?}"),
            source,
        })?;
    let fd = OwnedFd::from(file);

    let mut ifr = empty_ifreq();
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(cname.as_bytes()) {
        *dst = src as libc::c_char;
    }
    // The flags are a C short; both values fit.
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: `fd` is an open /dev/net/tun descriptor and TUNSETIFF reads and
    // writes a `struct ifreq`, which `ifr` is, for the duration of the call.
    let ret = unsafe { ioctl_with_mut_ref(&fd, libc::TUNSETIFF, &mut ifr) };
    if ret < 0 {
        return Err(SendError::Setup {
            what: format!("TUNSETIFF for tap {name:?}"),
            source: io::Error::last_os_error(),
        });
    }
    Ok(fd)
}

/// Sends frames by writing them to a TAP device's file descriptor.
///
/// The frame enters the host's network stack as if the guest had sent it
/// (a bridge learns the guest MAC on the TAP's port). Writes of whole frames
/// to a TAP are atomic, so the descriptor can be shared with a virtio-net
/// backend that keeps using it.
#[derive(Debug)]
pub struct TapSender {
    fd: OwnedFd,
    name: String,
    framing: TapFraming,
    buf: Vec<u8>,
}

impl TapSender {
    /// A sender on an attached TAP descriptor, finding the device name and
    /// its framing (`IFF_NO_PI`, `IFF_VNET_HDR` and its size) from the
    /// descriptor itself (`TUNGETIFF`, `TUNGETVNETHDRSZ`).
    pub fn new(fd: OwnedFd) -> Result<Self, SendError> {
        let raw = fd.as_raw_fd();
        let mut ifr = empty_ifreq();
        // SAFETY: TUNGETIFF writes a `struct ifreq`, which `ifr` is; on a
        // descriptor that is not a TUN/TAP the kernel fails the call without
        // touching it.
        let ret = unsafe { ioctl_with_mut_ref(&fd, libc::TUNGETIFF, &mut ifr) };
        if ret < 0 {
            return Err(SendError::Setup {
                what: format!("TUNGETIFF on fd {raw} (not an attached TAP descriptor?)"),
                source: io::Error::last_os_error(),
            });
        }
        let name = ifreq_name(&ifr);
        // SAFETY: TUNGETIFF filled the flags member of the union.
        let flags = libc::c_int::from(unsafe { ifr.ifr_ifru.ifru_flags }) & 0xffff;
        if flags & libc::IFF_TAP == 0 {
            return Err(SendError::NotATap {
                target: format!("tun {name:?}"),
            });
        }
        let mut framing = TapFraming {
            packet_info: flags & libc::IFF_NO_PI == 0,
            vnet_hdr_len: 0,
        };
        if flags & libc::IFF_VNET_HDR != 0 {
            let mut size: libc::c_int = 0;
            // SAFETY: TUNGETVNETHDRSZ writes one int, which `size` is.
            let ret = unsafe { ioctl_with_mut_ref(&fd, libc::TUNGETVNETHDRSZ, &mut size) };
            if ret < 0 {
                return Err(SendError::Setup {
                    what: format!("TUNGETVNETHDRSZ on tap {name:?}"),
                    source: io::Error::last_os_error(),
                });
            }
            framing.vnet_hdr_len = usize::try_from(size).unwrap_or(0);
        }
        Ok(Self::with_framing(fd, name, framing))
    }

    /// A sender on a duplicate of `fd` (e.g. the descriptor a virtio-net
    /// backend keeps using); see [`TapSender::new`].
    pub fn dup_from(fd: BorrowedFd<'_>) -> Result<Self, SendError> {
        let raw = fd.as_raw_fd();
        let owned = fd.try_clone_to_owned().map_err(|source| SendError::Setup {
            what: format!("duplicating TAP fd {raw}"),
            source,
        })?;
        Self::new(owned)
    }

    /// Open (or create) the TAP device `name` with [`open_tap`] and send on it.
    pub fn open(name: &str) -> Result<Self, SendError> {
        Self::new(open_tap(name)?)
    }

    /// A sender with the framing given rather than detected (for descriptors
    /// on which `TUNGETIFF` is not available).
    pub fn with_framing(fd: OwnedFd, name: impl Into<String>, framing: TapFraming) -> Self {
        TapSender {
            fd,
            name: name.into(),
            framing,
            buf: Vec::new(),
        }
    }

    /// The TAP device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The framing written before each frame.
    pub fn framing(&self) -> TapFraming {
        self.framing
    }

    /// Give the descriptor back.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl FrameSender for TapSender {
    fn send(&mut self, frame: &[u8]) -> Result<(), SendError> {
        self.buf.clear();
        if self.framing.packet_info {
            // struct tun_pi: flags 0, then the ethertype (big endian).
            self.buf.extend_from_slice(&[0, 0]);
            self.buf
                .extend_from_slice(frame.get(12..14).unwrap_or(&[0, 0]));
        }
        self.buf
            .resize(self.buf.len() + self.framing.vnet_hdr_len, 0);
        self.buf.extend_from_slice(frame);
        let (fd, buf) = (self.fd.as_raw_fd(), &self.buf);
        super::send_all(
            buf.len(),
            || self.describe(),
            || {
                // SAFETY: `buf` is valid for reads of `buf.len()` bytes and `fd`
                // is an open descriptor owned by this sender.
                unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) }
            },
        )
    }

    fn describe(&self) -> String {
        format!("tap {:?}", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn framing_lengths() {
        assert_eq!(TapFraming::PLAIN.header_len(), 0);
        let vnet = TapFraming {
            packet_info: false,
            vnet_hdr_len: 12,
        };
        assert_eq!(vnet.header_len(), 12);
        let both = TapFraming {
            packet_info: true,
            vnet_hdr_len: 10,
        };
        assert_eq!(both.header_len(), 14);
    }

    /// Framing is written in front of the frame (checked on a socket pair,
    /// which stands in for the TAP descriptor).
    #[test]
    fn writes_header_then_frame() {
        let frame = crate::frames::rarp_frame(&[2, 0, 0, 0, 0, 1]);
        for framing in [
            TapFraming::PLAIN,
            TapFraming {
                packet_info: false,
                vnet_hdr_len: 12,
            },
            TapFraming {
                packet_info: true,
                vnet_hdr_len: 10,
            },
        ] {
            let (a, mut b) = UnixStream::pair().unwrap();
            let mut sender = TapSender::with_framing(OwnedFd::from(a), "pair", framing);
            sender.send(&frame).unwrap();
            drop(sender);
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            let header = framing.header_len();
            assert_eq!(got.len(), header + 60);
            if framing.packet_info {
                assert_eq!(&got[..4], &[0, 0, 0x80, 0x35]);
                assert!(got[4..header].iter().all(|&b| b == 0));
            } else {
                assert!(got[..header].iter().all(|&b| b == 0));
            }
            assert_eq!(&got[header..], &frame[..]);
        }
    }

    #[test]
    fn non_tap_fd_is_refused() {
        let (a, _b) = UnixStream::pair().unwrap();
        let err = TapSender::new(OwnedFd::from(a)).unwrap_err();
        assert!(matches!(err, SendError::Setup { .. }), "{err}");
        assert!(err.to_string().contains("TUNGETIFF"), "{err}");
    }

    #[test]
    fn write_errors_name_the_tap() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut sender = TapSender::with_framing(OwnedFd::from(a), "gone", TapFraming::PLAIN);
        // SIGPIPE is ignored by the Rust runtime, so the write fails with EPIPE.
        let err = sender.send(&[0u8; 60]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
        assert!(err.to_string().contains("tap \"gone\""), "{err}");
    }

    #[test]
    fn open_tap_rejects_bad_names() {
        assert!(matches!(
            open_tap("much-too-long-name"),
            Err(SendError::InvalidName { .. })
        ));
    }
}
