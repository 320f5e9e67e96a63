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
//!   memory as a [`memory::GuestMemory`], pause/resume, state sections);
//! * [`memory::GuestMemory`] — the regions as (guest address, host pointer,
//!   length, backing) and the VMM's own dirty bits; implemented for
//!   vm-memory's `GuestMemoryMmap<SummaryBitmap>` ([`memory::GuestRam`]) and
//!   `GuestMemoryMmap<AtomicBitmap>` (default feature `vm-memory`, that
//!   version re-exported as `vm_memory`);
//! * [`vm::DirtyTracker`] — the hypervisor's dirty log (the engine merges the
//!   VMM's own writes, from [`memory::GuestMemory::take_vmm_dirty`], into
//!   every round);
//! * [`state::DeviceState`] — one versioned state section per device;
//! * [`transport::Transport`] — an ordered, reliable byte stream (TCP or
//!   Unix socket with the default feature `net`, an in-memory pipe, any
//!   reader/writer pair through [`transport::duplex`], or anything else
//!   implementing the trait).
//!
//! The `livemig-kvm` crate implements the VM seams for real KVM guests.
//!
//! One entry point per side, each a builder: [`Migration`] on the source
//! (`Migration::new(&vm).config(..).streams(n, opener).cancel(token)
//! .progress(|p| ..).run(transport)`) and [`Reception`] on the destination
//! (`Reception::new(transport).config(..).accept_streams(acceptor)
//! .cancel(token).progress(|p| ..).run(|desc| build_vm(desc))`). The
//! functions `migrate`, `migrate_streams`, `receive` and `receive_streams`
//! of release 0.1 remain, deprecated, as thin wrappers over them.
//!
//! With the `test-util` feature (for tests, benchmarks and experiments, not
//! for production: its helpers panic on failure) the `testing` module adds
//! a software VM (memory plus writer threads, so the engine runs without
//! `/dev/kvm`), a fault-injecting transport and conformance checks for
//! transports and dirty trackers.
//!
//! # Example
//!
//! A migration between two threads of one process, with the software VM
//! (`testing::soft::SoftVm`, feature `test-util`; this crate's own doctests
//! enable it, elsewhere the example is shown but not compiled). A KVM VMM
//! passes its `livemig_kvm::KvmVm`, or its own wrapper that also pauses its
//! devices, instead: the calls are the same. Over a network the transports
//! come from `transport::connect` on the source and
//! `transport::listen(..)?.accept()` on the destination (TCP or Unix
//! sockets, default feature `net`), or from the embedder's own
//! [`transport::Transport`].
//!
#![cfg_attr(feature = "test-util", doc = "```")]
#![cfg_attr(not(feature = "test-util"), doc = "```ignore")]
//! use std::time::Duration;
//!
//! use livemig::memory::{MemoryLayout, RegionDesc};
//! use livemig::report::Progress;
//! use livemig::testing::soft::{SoftConfig, SoftVm};
//! use livemig::transport::mem;
//! use livemig::{CancelToken, Migration, MigrationConfig, Reception};
//!
//! let layout = MemoryLayout::new(vec![RegionDesc { guest_addr: 0, size: 16 << 20 }])?;
//!
//! // The running source VM: two writer threads dirty its memory.
//! let config = SoftConfig { guest_writers: 1, device_writers: 1, pages_per_ms: 5 };
//! let source = SoftVm::new(&layout, &config)?;
//! source.fill(42);
//! source.start();
//!
//! // A connected pair of transports (an in-memory pipe here).
//! let (to_destination, from_source) = mem::pair();
//!
//! // The destination builds its VM from the source's description (or
//! // refuses with `VmError::Incompatible`), restores it and returns it
//! // running.
//! let destination = std::thread::spawn(move || {
//!     Reception::new(Box::new(from_source)).run(|desc| {
//!         SoftVm::new(&desc.layout, &SoftConfig::idle())
//!     })
//! });
//!
//! // The source: a 20 ms downtime limit, progress after every round;
//! // `cancel.cancel()` from another thread aborts safely.
//! let config = MigrationConfig {
//!     downtime_limit: Duration::from_millis(20),
//!     ..Default::default()
//! };
//! let cancel = CancelToken::new();
//! let report = Migration::new(&source)
//!     .config(config)
//!     .cancel(cancel.clone())
//!     .progress(|p: &Progress| {
//!         if let Progress::Round(round) = p {
//!             eprintln!("{round}");
//!         }
//!     })
//!     .run(Box::new(to_destination))?;
//! let (guest, received) = destination.join().expect("destination thread")?;
//!
//! // The guest now runs on the destination; the source stays paused.
//! assert!(received.running);
//! guest.stop();
//! assert_eq!(guest.snapshot(), source.snapshot());
//! println!(
//!     "migrated {} MiB in {} rounds, downtime {:.2} ms",
//!     report.memory_bytes >> 20,
//!     report.rounds.len(),
//!     report.downtime_ms
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod bitmap;
mod commit;
mod control;
mod deadline;
pub mod destination;
pub mod error;
pub mod guard;
pub mod local;
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

/// The vm-memory version [`memory::GuestRam`] adapts (feature `vm-memory`).
/// A VMM on this version can hand its `GuestMemoryMmap<SummaryBitmap>` or
/// `GuestMemoryMmap<AtomicBitmap>` to the engine as it is; one on another version (or with its own memory)
/// implements [`memory::GuestMemory`].
#[cfg(feature = "vm-memory")]
pub use vm_memory;

#[allow(deprecated)]
pub use destination::{receive, receive_streams};
pub use destination::{ReceiveConfig, ReceiveReport, Reception};
pub use error::{ErrorKind, MigrationError, Phase};
pub use guard::{GuardError, GuardState, MigrationGuard};
pub use policy::{MigrationConfig, OnLimit};
pub use report::{Progress, ReceiveProgress, Report};
#[allow(deprecated)]
pub use source::{migrate, migrate_streams};
pub use source::{CancelToken, Migration, SOURCE_CANCEL_GRACE};
