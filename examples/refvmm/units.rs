//! The unit tests of `refvmm` (the CLI, the API, carried settings), as a
//! test target of their own: `cargo test --workspace` runs them, and still
//! builds the example itself, which the end-to-end tests run. (`test = true`
//! on the example would build it only as a test harness.)

include!("root.rs");
