//! # livemig — pre-copy live migration for Rust VMMs
//!
//! `livemig` moves a running virtual machine from one host (the *source*) to
//! another (the *destination*) while the guest keeps running: memory is copied
//! in iterative rounds while dirty tracking records what the guest changes,
//! then the VM is paused for a short stop-and-copy of the remaining dirty pages
//! and the device state, and resumed on the destination.
//!
//! The engine knows nothing about KVM, sockets or a particular VMM. It works
//! through a handful of seams:
//!
//! * [`vm::SourceVm`] / [`vm::DestinationVm`] — the VM being migrated (guest
//!   memory as a vm-memory [`memory::GuestRam`], pause/resume, state sections);
//! * [`vm::DirtyTracker`] — the hypervisor's dirty log (the engine merges the
//!   VMM's own writes, recorded by vm-memory's bitmap, into every round);
//! * [`state::DeviceState`] — one versioned state section per device;
//! * [`transport::Transport`] — an ordered, reliable byte stream (TCP, Unix
//!   socket, in-memory pipe, or anything else implementing the trait).
//!
//! The `livemig-kvm` crate implements the VM seams for real KVM guests.
//!
//! With the `test-util` feature (for tests, benchmarks and experiments, not
//! for production: its helpers panic on failure) the `testing` module adds
//! a software VM (memory plus writer threads, so the engine runs without
//! `/dev/kvm`), a fault-injecting transport and conformance checks for
//! transports and dirty trackers.
#![deny(missing_docs)]

pub mod bitmap;
mod commit;
mod deadline;
pub mod destination;
pub mod error;
pub mod guard;
pub mod memory;
pub mod policy;
pub mod protocol;
mod ram;
pub mod report;
pub mod source;
pub mod state;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod transport;
pub mod vm;

pub use destination::{receive, receive_streams, ReceiveConfig, ReceiveReport};
pub use error::{ErrorKind, MigrationError, Phase};
pub use guard::{GuardError, GuardState, MigrationGuard};
pub use policy::{MigrationConfig, OnLimit};
pub use report::{Progress, Report};
pub use source::{migrate, migrate_streams, CancelToken};
