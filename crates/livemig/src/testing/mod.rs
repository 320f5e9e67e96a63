//! Test equipment, behind the `test-util` feature: a software VM
//! ([`soft`]), a delegating source VM with hooks ([`hooked`]), a
//! fault-injecting transport ([`fault`]) and conformance
//! checks for transports ([`transport`]) and dirty trackers ([`dirty`]).
//! Not for production use: the transport checks panic on failure, and the
//! software VM's "guest" is a set of writer threads.
//!
//! Enable it for tests only:
//!
//! ```toml
//! [dev-dependencies]
//! livemig = { version = "0.1", features = ["test-util"] }
//! ```

pub mod dirty;
pub mod fault;
pub mod hooked;
pub mod postcopy;
pub mod soft;
pub mod transport;

pub use dirty::check_dirty_tracker;

/// `PAGEMAP_SCAN` ioctls this process has made so far: the engine's scans
/// for populated memory (round 0, the syncs of never-armed memory, the
/// destination's scrub). Process-wide: compare counts in a test binary that
/// runs one migration at a time.
pub fn pagemap_scans() -> u64 {
    crate::ram::pagemap_scans()
}

/// Whether a destination reads `Pages` frames straight into guest memory
/// (then a frame that fails its CRC may have written some of the pages its
/// records name before the failure is seen) or whole into a buffer first
/// (then a failed frame writes nothing). For checks of a failed
/// reception's memory, such as the fuzz harness's.
pub const PAGES_READ_INTO_GUEST_MEMORY: bool = crate::destination::DIRECT_PAGES;
