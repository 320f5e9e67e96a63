//! Console input: the process's standard input goes to the guest's COM1
//! receive FIFO, on `run` and on `receive` (there only once the migrated UART
//! is restored: the forwarder starts with the running machine, and until then
//! typed bytes wait in the stdin pipe). With `--console unix:PATH` standard
//! input is not forwarded: the console socket is the input
//! ([`crate::console_server`]).
//!
//! Bytes are queued only as far as the FIFO has room (the rest is retried
//! every millisecond while the guest drains it), and never while the machine
//! is paused for a migration: they are held until it resumes, so none is put
//! into a UART whose state was already saved. Bytes still held when the guest
//! has migrated away are dropped with that console.

use std::io::{ErrorKind, Read};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::vmm::Machine;

/// Bytes read from standard input at a time (the UART FIFO holds 64).
const CHUNK: usize = 64;
/// Wait before retrying when the FIFO is full or the machine is paused.
const RETRY: Duration = Duration::from_millis(1);

/// Starts the thread that forwards standard input to `machine`'s UART until
/// end of file (or until the machine is gone).
pub fn forward_stdin(machine: &Arc<Machine>) {
    let weak = Arc::downgrade(machine);
    let spawned = std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || pump(std::io::stdin(), &weak));
    if let Err(e) = spawned {
        eprintln!("refvmm: console input disabled: {e}");
    }
}

fn pump(mut input: impl Read, machine: &Weak<Machine>) {
    let mut buf = [0u8; CHUNK];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("console input: {e}");
                return;
            }
        };
        let mut off = 0;
        while off < n {
            let Some(m) = machine.upgrade() else { return };
            match m.console_input(&buf[off..n]) {
                Ok(k) => off += k,
                Err(e) => {
                    log::warn!("console input: {e}");
                    return;
                }
            }
            drop(m);
            if off < n {
                std::thread::sleep(RETRY);
            }
        }
    }
}
