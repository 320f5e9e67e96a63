//! minivmm's one vCPU: a thread that owns its `VcpuFd` (no other thread
//! can reach it) running `KVM_RUN` in a loop, with a tiny serial port in
//! its exit handler. It follows the pause protocol (docs/embedding.md)
//! through livemig-kvm's `PauseGate`: `before_run_serving` parks it while
//! paused and, parked, runs the gate's requests on its fd (setting the
//! boot registers, saving and restoring state for a migration); after an
//! I/O or MMIO exit it first re-enters `KVM_RUN` with `immediate_exit = 1`
//! so KVM completes the instruction.

use std::io::Write;
use std::sync::Arc;

use kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;
use kvm_ioctls::{VcpuExit, VcpuFd};
use livemig_kvm::dirty::DirtyRing;
use livemig_kvm::pause::{PauseGate, VcpuPauser};

/// Starts the vCPU thread with its fd; it parks until the gate is resumed.
pub fn spawn(fd: VcpuFd, gate: PauseGate, ring: Option<Arc<DirtyRing>>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("vcpu0".into())
        .spawn(move || {
            if let Err(e) = vcpu_thread(fd, &gate, ring.as_deref()) {
                eprintln!("minivmm: vCPU stopped: {e}");
                std::process::exit(2);
            }
        })?;
    Ok(())
}

/// The vCPU thread: runs the guest until a guest error (which ends the
/// process; minivmm never closes the gate).
fn vcpu_thread(mut fd: VcpuFd, gate: &PauseGate, ring: Option<&DirtyRing>) -> Result<(), String> {
    // SAFETY: `fd` outlives `pauser` (declared before it), and both are
    // dropped on this thread.
    let mut pauser = unsafe { gate.attach(0, &mut fd) }.map_err(|e| e.to_string())?;
    while pauser.before_run_serving(&fd) {
        step(&mut fd, &mut pauser, ring)?;
    }
    Ok(())
}

/// One `KVM_RUN` and its exit.
fn step(
    vcpu: &mut VcpuFd,
    pauser: &mut VcpuPauser,
    ring: Option<&DirtyRing>,
) -> Result<(), String> {
    let exit = vcpu.run();
    pauser.after_run(&exit);
    match exit {
        Ok(VcpuExit::IoOut(port, data)) => serial_out(port, data),
        Ok(VcpuExit::IoIn(port, data)) => serial_in(port, data),
        Ok(VcpuExit::MmioRead(_, data)) => data.fill(0),
        Ok(VcpuExit::MmioWrite(..)) => {}
        // Harvest into the ring's pending bitmap (the next sync reports it).
        Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => match ring {
            Some(r) => return r.on_ring_full().map(|_| ()).map_err(|e| e.to_string()),
            None => return Err("KVM_EXIT_DIRTY_RING_FULL without a ring".into()),
        },
        Ok(other) => return Err(format!("unexpected exit {other:?}")),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
        Err(e) => return Err(format!("KVM_RUN: {e}")),
    }
    Ok(())
}

/// COM1 data port and line status register.
const COM1: u16 = 0x3f8;
const COM1_LSR: u16 = COM1 + 5;
/// LSR: transmitter holding register and transmitter empty, no input.
const LSR_IDLE: u8 = 0x60;

/// The serial port, output only: each byte written to COM1's data port goes
/// straight to stdout (no buffering, so a reader can timestamp it).
fn serial_out(port: u16, data: &[u8]) {
    if port == COM1 {
        let mut out = std::io::stdout().lock();
        // stdout is line-buffered by Rust: flush every byte. A closed
        // stdout only loses the guest's output.
        let _ = out.write_all(data).and_then(|_| out.flush());
    }
}

fn serial_in(port: u16, data: &mut [u8]) {
    data.fill(if port == COM1_LSR { LSR_IDLE } else { 0xff });
}
