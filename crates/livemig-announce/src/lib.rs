//! # livemig-announce — telling the network where a migrated guest now lives
//!
//! After a live migration the guest runs on a new host, but the switches of
//! the network still send its traffic to the old host's port until they see a
//! frame from the guest's MAC address on the new one. QEMU solves this by
//! sending a few *self-announce* frames from the destination right after the
//! guest resumes; this crate does the same for any Rust VMM, byte-for-byte
//! compatible with QEMU so existing switches, bridges and capture tools treat
//! both alike:
//!
//! * [`frames`] — the RARP self-announce exactly as QEMU builds it, the
//!   gratuitous ARP (RFC 5227 announcement) used when the guest's IPv4
//!   address is known, the IPv6 unsolicited neighbour advertisement (RFC
//!   4861) for each IPv6 address it is given, and a parser for captures and
//!   tests;
//! * [`schedule`] — when to send: QEMU's `announce-*` parameters (5 rounds,
//!   frames at 0, 50, 200, 450 and 800 ms after resume by default);
//! * [`sender`] — where to send: the [`sender::FrameSender`] trait with a TAP
//!   file descriptor sender (what a virtio-net backend already holds), an
//!   `AF_PACKET` raw-socket sender bound to a named interface, and a
//!   recording sender for tests;
//! * [`announcer`] — [`announce`] runs the schedule for every NIC of the VM
//!   on a background thread and returns at once; the
//!   [`AnnounceHandle`] gives back an [`AnnounceReport`] with per-NIC counts
//!   and every error (send errors never fail a migration: they are reported).
//!
//! ```no_run
//! use livemig_announce::{announce, Nic, Schedule, TapSender};
//! # fn main() -> Result<(), livemig_announce::SendError> {
//! # let tap_fd: std::os::fd::OwnedFd = livemig_announce::open_tap("tap0")?;
//! // After the destination's vCPUs run again:
//! let nic = Nic::new([0x52, 0x54, 0x00, 0x12, 0x34, 0x56], Box::new(TapSender::new(tap_fd)?))
//!     .with_ipv4([192, 168, 10, 2]);
//! let handle = announce(vec![nic], &Schedule::default());
//! // ... later, for the migration report:
//! let report = handle.join();
//! println!("{} frames sent, {} errors", report.frames_sent(), report.errors.len());
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod announcer;
pub mod frames;
pub mod schedule;
pub mod sender;

pub use announcer::{
    announce, announce_from, AnnounceFailure, AnnounceHandle, AnnounceReport, Nic, NicReport,
};
pub use frames::{
    format_mac, garp_frame, icmpv6_checksum, na_frame, parse_announce, parse_mac, parse_na,
    rarp_frame, Announce, AnnounceKind,
};
pub use schedule::{Schedule, ScheduleError};
pub use sender::{
    open_tap, FrameSender, PacketSender, Recorded, RecordingSender, SendError, TapFraming,
    TapSender,
};
