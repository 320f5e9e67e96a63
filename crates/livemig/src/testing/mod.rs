//! Test equipment: a software VM, a fault-injecting transport and
//! conformance checks for the seams' implementations.

pub mod fault;
pub mod soft;
#[cfg(any(test, feature = "test-util"))]
pub mod transport;
