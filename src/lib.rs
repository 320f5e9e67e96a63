//! Support code shared by the reference VMM's `demo` command, the end-to-end
//! tests and the benchmarks: spawning `refvmm` processes, timestamping the
//! guest's serial output as it arrives, and driving migrations through the
//! API socket.

pub mod demo;
pub mod harness;
pub mod limits;
pub mod link;
pub mod qemu;
