//! `refvmm` — the livemig reference VMM.
//!
//! A tiny KVM VMM that boots Multiboot v1 kernels with a COM1 serial console
//! (guest output on stdout, stdin forwarded to the guest as console input),
//! and migrates them live with livemig:
//!
//! ```text
//! refvmm run --memory 512M --kernel builtin:testguest --cmdline "ws=64 rate=100" --api-socket /tmp/a.sock
//! refvmm receive --listen tcp:127.0.0.1:4444 --api-socket /tmp/b.sock
//! refvmm migrate --api-socket /tmp/a.sock --to tcp:127.0.0.1:4444
//! refvmm demo          # all of the above on one machine, with a report
//! refvmm console /tmp/a.console   # with run/receive --console unix:/tmp/a.console
//! refvmm agent --listen tcp:0.0.0.0:7070      # on every host: capacity + receivers
//! refvmm migrate --api-socket /tmp/a.sock --to auto --agents tcp:node-b:7070,tcp:node-c:7070
//! refvmm evacuate --api-sockets /tmp/a.sock,/tmp/c.sock --agents tcp:node-b:7070
//! refvmm migrate --api-socket /tmp/a.sock --local --to unix:/tmp/h.sock   # same host, memfd memory
//! refvmm upgrade --api-socket /tmp/a.sock --binary ./refvmm-new
//! refvmm guest-image --out guest.elf
//! ```
//!
//! It uses only the public APIs of `livemig`, `livemig-kvm` and
//! `livemig-testguest`.
//!
//! `main` only dispatches: the options are in `cli.rs`, `run` in `run.rs`,
//! `receive` and the migration driver in `migration.rs`, the `migrate`
//! client in `migrate_client.rs`.

// The crate itself is in root.rs, shared with the unit-test target
// (units.rs): see the `[[test]]` refvmm-units in Cargo.toml.
include!("root.rs");
