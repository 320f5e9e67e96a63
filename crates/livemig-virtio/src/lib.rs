//! # livemig-virtio — a migratable virtio-net device on virtio-mmio
//!
//! * [`mmio`] — the virtio-mmio version 2 transport ([`MmioTransport`]),
//!   generic over a [`VirtioDevice`]: registers, status state machine,
//!   feature negotiation, queue setup validation, interrupt status and the
//!   configuration generation;
//! * [`net`] — the virtio-net device ([`VirtioNet`]): transmit on
//!   notification, a receive thread, the control queue's announce
//!   acknowledgement, [`VirtioNet::announce`], pause/resume for migration,
//!   and its complete state as the section `virtio-net.<i>`
//!   ([`livemig::state::DeviceState`]);
//! * [`backend`] — where frames go: [`FrameBackend`], [`TapBackend`],
//!   and [`PairBackend`] (a socket pair, for tests).
//!
//! The split rings come from rust-vmm's `virtio-queue` 0.18 (which uses the
//! same `vm-memory` 0.18 as livemig), the constants from `virtio-bindings`.
//! Every write into guest memory goes through vm-memory on
//! [`livemig::memory::GuestRam`], so the pages are marked in its dirty
//! bitmap and migrated. Interrupts are signalled on an `EventFd` the VMM
//! registers as an irqfd.
//!
//! ```no_run
//! use livemig_virtio::{PairBackend, VirtioNet};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let mem: livemig::memory::GuestRam = unimplemented!();
//! let (backend, _network) = PairBackend::new()?;
//! let nic = VirtioNet::new(0, [0x52, 0x54, 0, 0, 0, 1], Box::new(backend))?;
//! nic.attach_memory(mem);
//! // vm_fd.register_irqfd(nic.irq_evt(), 5)?; then route MMIO exits in
//! // 0xd000_0000..+0x200 to nic.mmio_read / nic.mmio_write.
//! nic.resume();
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod backend;
pub mod mmio;
pub mod net;

pub use backend::{FrameBackend, PairBackend, TapBackend};
pub use mmio::{MmioTransport, QueueContext, QueueEvents, VirtioDevice, MMIO_WINDOW};
pub use net::{NetCounters, NetError, NetStats, VirtioNet};
