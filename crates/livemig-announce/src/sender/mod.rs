//! Where announce frames go: the [`FrameSender`] trait and its
//! implementations.
//!
//! * [`TapSender`] writes to a TAP device's file descriptor — the one a VMM's
//!   virtio-net backend already holds — so the frame enters the host network
//!   stack exactly as a frame sent by the guest would;
//! * [`PacketSender`] sends on a named interface through an `AF_PACKET` raw
//!   socket (macvtap, SR-IOV representors, or any interface the VMM does not
//!   hold a TAP for);
//! * [`RecordingSender`] records frames with their send time, for tests.
//!
//! A VMM with another backend (vhost-user, a userspace switch) implements
//! [`FrameSender`] itself.

use std::ffi::CString;
use std::io;

mod packet;
mod recording;
mod tap;

pub use packet::PacketSender;
pub use recording::{Recorded, RecordingSender};
pub use tap::{open_tap, TapFraming, TapSender};

/// Errors opening a sender or sending a frame.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Setting up a sender failed (opening a device or socket, an ioctl).
    #[error("{what}: {source}")]
    Setup {
        /// What was being done, naming the device or interface.
        what: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// No network interface has this name (in the caller's namespace).
    #[error("network interface {name:?} not found")]
    InterfaceNotFound {
        /// The interface name.
        name: String,
    },
    /// The name cannot be a Linux network interface name.
    #[error("invalid network interface name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// The file descriptor is a TUN (layer 3) device, which cannot carry
    /// Ethernet frames.
    #[error("{target} is a TUN device, not a TAP: it cannot carry Ethernet frames")]
    NotATap {
        /// The device.
        target: String,
    },
    /// Writing or sending the frame failed (interface down, permission, ...).
    #[error("sending on {target}: {source}")]
    Send {
        /// The sender's description.
        target: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// The device took only part of the frame.
    #[error("sending on {target}: short write of {written} of {len} bytes")]
    ShortWrite {
        /// The sender's description.
        target: String,
        /// Bytes written.
        written: usize,
        /// Bytes that should have been written.
        len: usize,
    },
    /// A failure reported by a sender implemented outside this crate.
    #[error("sending on {target}: {message}")]
    Other {
        /// The sender's description.
        target: String,
        /// What went wrong.
        message: String,
    },
}

impl SendError {
    /// The OS error number behind this error, if any (e.g. `ENETDOWN`,
    /// `EPERM`).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            SendError::Setup { source, .. } | SendError::Send { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }
}

/// Something that can put an Ethernet frame on a guest NIC's network.
///
/// `send` gets a complete Ethernet frame without FCS (60 bytes for RARP and
/// gratuitous ARP, 86 for a neighbour advertisement); the sender adds whatever framing its device needs.
pub trait FrameSender: Send {
    /// Send one frame.
    fn send(&mut self, frame: &[u8]) -> Result<(), SendError>;
    /// A short description for reports and logs, e.g. `tap "vm0-eth0"`.
    fn describe(&self) -> String;
}

impl<T: FrameSender + ?Sized> FrameSender for Box<T> {
    fn send(&mut self, frame: &[u8]) -> Result<(), SendError> {
        (**self).send(frame)
    }

    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// Check `name` the way the kernel's `dev_valid_name()` does and turn it into
/// a C string.
/// Runs a one-shot write-like `syscall` of `len` bytes: retries on EINTR,
/// and turns a failure or a short write into a [`SendError`] naming `target`.
pub(crate) fn send_all(
    len: usize,
    target: impl Fn() -> String,
    mut syscall: impl FnMut() -> isize,
) -> Result<(), SendError> {
    loop {
        let n = syscall();
        if n < 0 {
            let source = std::io::Error::last_os_error();
            if source.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(SendError::Send {
                target: target(),
                source,
            });
        }
        let written = n.unsigned_abs();
        if written != len {
            return Err(SendError::ShortWrite {
                target: target(),
                written,
                len,
            });
        }
        return Ok(());
    }
}

pub(crate) fn interface_name(name: &str) -> Result<CString, SendError> {
    let invalid = |reason| SendError::InvalidName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err(invalid("longer than 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(invalid("reserved"));
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        return Err(invalid("contains '/', ':', NUL or whitespace"));
    }
    CString::new(name).map_err(|_| invalid("contains NUL"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        assert!(interface_name("eth0").is_ok());
        assert!(interface_name("a23456789012345").is_ok());
        for bad in [
            "",
            "a234567890123456",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\0b",
        ] {
            assert!(
                matches!(interface_name(bad), Err(SendError::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn os_error_is_exposed() {
        let e = SendError::Send {
            target: "x".into(),
            source: io::Error::from_raw_os_error(libc::ENETDOWN),
        };
        assert_eq!(e.raw_os_error(), Some(libc::ENETDOWN));
        assert!(e.to_string().starts_with("sending on x: "));
        assert_eq!(
            SendError::InterfaceNotFound { name: "y".into() }.raw_os_error(),
            None
        );
    }
}
