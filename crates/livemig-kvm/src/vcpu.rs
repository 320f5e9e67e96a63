//! vCPU threads and the pause/resume controller.
//!
//! Each vCPU runs `KVM_RUN` in a loop on its own thread, following the
//! pause protocol of [`crate::pause`] (the same [`PauseGate`] a VMM with
//! its own vCPU loop uses). [`VcpuSet::pause`]
//! asks every thread to park and kicks it out of `KVM_RUN` with a signal
//! (the signal handler sets `immediate_exit` in the thread's `kvm_run`
//! page, so a kick that races with the entry into `KVM_RUN` is never lost);
//! it returns only once every vCPU is parked. While parked a vCPU's
//! [`VcpuFd`] is free, and the state code locks it to save or restore
//! registers. [`VcpuSet::resume`] lets the threads run again.
//!
//! A vCPU parks only after a `KVM_RUN` that returned `EINTR` (or before its
//! first one), never right after an exit: KVM finishes a port-I/O or MMIO
//! exit's instruction only on the next `KVM_RUN` (an `in` or MMIO read gets
//! its data into the registers then; string I/O advances RSI/RDI/RCX then),
//! so state saved there would make the destination repeat the access — a
//! UART byte written twice, a byte read on the source lost. A thread asked
//! to pause after an exit therefore re-enters `KVM_RUN` once with
//! `immediate_exit` set: KVM completes the instruction without running the
//! guest and returns `EINTR`, and the thread parks. Any exit that re-entry
//! returns (the next piece of a string instruction) is handled as usual
//! first. This applies to every park: a migration pause, the throttle, a
//! pause before saving state. A VMM with its own vCPU loop must follow the
//! same rule (see docs/embedding.md).
//!
//! With a dirty ring ([`crate::dirty::DirtyRing`]) a vCPU whose ring is
//! full exits with `KVM_EXIT_DIRTY_RING_FULL`; its thread harvests all rings
//! itself (under the ring's lock, the same one a tracker sync takes) and
//! re-enters. It does not wait for the migration thread: a sync may be a
//! whole pre-copy round away, and a stalled vCPU would be a guest-visible
//! blackout. Nothing spins: each harvest frees the ring, and if a harvest
//! ever frees nothing while KVM keeps saying "full", the vCPU stops with a
//! fatal error after a few tries instead of looping.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::dirty::DirtyRing;
use crate::pause::{PauseGate, VcpuPauser};

pub use crate::pause::kick_signal;

/// Consecutive ring-full exits whose harvest freed nothing before the vCPU
/// gives up (KVM would otherwise bounce it out of `KVM_RUN` forever).
const RING_FULL_NO_PROGRESS_LIMIT: u32 = 100;

/// Port-I/O and MMIO handler the VMM provides for exits the kernel does not
/// handle. Unclaimed accesses should be ignored (reads return all ones).
pub trait ExitHandler: Send + Sync {
    /// A guest `in` from `port`; fill `data`.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// A guest `out` to `port`.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// A guest MMIO read at `addr`; fill `data`.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// A guest MMIO write at `addr`.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// Errors of the vCPU controller.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// Installing the kick signal handler failed.
    #[error("installing the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// Spawning a vCPU thread failed.
    #[error("spawning vCPU thread {0}: {1}")]
    Spawn(usize, #[source] std::io::Error),
    /// A thread could not attach to a [`PauseGate`].
    #[error("attaching vCPU {0} to the pause gate: {1}")]
    Attach(usize, String),
    /// A vCPU stopped with a fatal exit (shutdown, internal error, failed entry).
    #[error("vCPU {index} stopped: {reason}")]
    Fatal {
        /// The vCPU.
        index: usize,
        /// What happened.
        reason: String,
    },
    /// Pausing did not complete in time.
    #[error("vCPUs did not park within {0:?}")]
    PauseTimeout(Duration),
    /// A request for the vCPU threads ([`PauseGate::on_vcpu_threads`])
    /// while the gate lets them run or is closed.
    #[error("the vCPUs are not paused: pause them before running a request on their threads")]
    NotPaused,
    /// A vCPU's thread cannot run a request on its fd.
    #[error("vCPU {index} cannot run a request on its thread: {reason}")]
    NotServing {
        /// The vCPU.
        index: usize,
        /// Why (how its thread is parked, or that it is not).
        reason: String,
    },
    /// A vCPU thread did not finish a request in time.
    #[error("the vCPU threads did not finish a request within {0:?}")]
    RequestTimeout(Duration),
    /// A request panicked on a vCPU's thread.
    #[error("a request panicked on vCPU {0}'s thread")]
    RequestPanicked(usize),
    /// The gate was resumed while a request ran: its results are not all
    /// from one pause.
    #[error("the vCPUs were resumed while a request ran on their threads")]
    ResumedDuringRequest,
}

/// A set of vCPUs, each on its own thread, that start parked. The threads
/// follow the pause protocol through a [`PauseGate`].
pub struct VcpuSet {
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    threads: Vec<JoinHandle<()>>,
    gate: PauseGate,
}

impl VcpuSet {
    /// Spawns one thread per vCPU. The vCPUs start *paused*: set their
    /// initial state, then call [`VcpuSet::resume`].
    pub fn spawn(vcpus: Vec<VcpuFd>, handler: Arc<dyn ExitHandler>) -> Result<Self, VcpuError> {
        Self::spawn_with_ring(vcpus, handler, None)
    }

    /// Like [`VcpuSet::spawn`], for a VM with dirty rings: the threads
    /// harvest `ring` on `KVM_EXIT_DIRTY_RING_FULL`.
    pub fn spawn_with_ring(
        vcpus: Vec<VcpuFd>,
        handler: Arc<dyn ExitHandler>,
        ring: Option<Arc<DirtyRing>>,
    ) -> Result<Self, VcpuError> {
        let gate = PauseGate::new(vcpus.len())?;
        let vcpus: Vec<_> = vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect();
        let mut set = VcpuSet {
            vcpus: vcpus.clone(),
            threads: Vec::new(),
            gate: gate.clone(),
        };
        for (index, vcpu) in vcpus.into_iter().enumerate() {
            let gate = gate.clone();
            let handler = handler.clone();
            let ring = ring.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu_thread(index, vcpu, gate, handler, ring))
                .map_err(|e| VcpuError::Spawn(index, e))?;
            set.threads.push(t);
        }
        // Wait until every thread has parked once, so that state set by the
        // caller is never raced by a first KVM_RUN.
        set.gate.pause()?;
        Ok(set)
    }

    /// Number of vCPUs.
    pub fn len(&self) -> usize {
        self.vcpus.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.vcpus.is_empty()
    }

    /// The vCPU file descriptors. Lock one only while the set is paused;
    /// while running, its thread holds the lock inside `KVM_RUN`.
    pub fn vcpu(&self, index: usize) -> Option<&Arc<Mutex<VcpuFd>>> {
        self.vcpus.get(index)
    }

    /// The pause gate the threads follow.
    pub fn gate(&self) -> &PauseGate {
        &self.gate
    }

    /// Wake-ups of parked threads that had to stay parked (test hook).
    #[cfg(test)]
    pub(crate) fn idle_wakeups(&self) -> u64 {
        self.gate.idle_wakeups()
    }

    /// Whether the vCPUs are currently asked to run.
    pub fn is_running(&self) -> bool {
        self.gate.is_running()
    }

    /// The first fatal vCPU exit, if any (guest shutdown, internal error).
    pub fn fatal(&self) -> Option<VcpuError> {
        self.gate.fatal()
    }

    /// Blocks until a vCPU stops with a fatal exit or the set is dropped.
    pub fn wait_fatal(&self, timeout: Duration) -> Option<VcpuError> {
        self.gate.wait_fatal(timeout)
    }

    /// Pauses every vCPU: returns once each has left `KVM_RUN` and parked.
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.gate.pause()
    }

    /// Lets every vCPU run again. It returns at once: the threads leave
    /// their park as the scheduler runs them. (Waiting for all of them was
    /// tried: on a loaded 2-core host the last of 8–32 threads, mostly APs
    /// waiting for a SIPI that the guest does not wait for, took up to
    /// 12–42 ms to be scheduled, while the guest's own heartbeat resumed
    /// after 2–17 ms.)
    pub fn resume(&self) {
        self.gate.resume()
    }
}

impl Drop for VcpuSet {
    fn drop(&mut self) {
        self.gate.close(Duration::from_secs(2));
        for t in self.threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// A vCPU thread: attaches to the gate, runs the loop, detaches.
fn vcpu_thread(
    index: usize,
    vcpu: Arc<Mutex<VcpuFd>>,
    gate: PauseGate,
    handler: Arc<dyn ExitHandler>,
    ring: Option<Arc<DirtyRing>>,
) {
    let attached = {
        let mut fd = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: `vcpu` (an Arc this thread holds until it ends) keeps
        // the VcpuFd and its kvm_run page alive; the pauser is dropped at
        // the end of this function, on this thread, before `vcpu`.
        unsafe { gate.attach(index, &mut fd) }
    };
    let mut pauser = match attached {
        Ok(p) => p,
        Err(e) => {
            // The gate never sees this vCPU park: pauses time out.
            log::error!("vcpu{index}: {e}");
            return;
        }
    };
    if let Some(reason) = vcpu_loop(index, &vcpu, &mut pauser, &*handler, ring.as_deref()) {
        log::error!("vcpu{index}: {reason}");
        // Park for good: the VM is dead, but pause/drop still work.
        pauser.stop(reason);
    }
}

/// Runs the vCPU until the gate is closed (`None`) or a fatal exit
/// (`Some(reason)`).
fn vcpu_loop(
    index: usize,
    vcpu: &Mutex<VcpuFd>,
    pauser: &mut VcpuPauser,
    handler: &dyn ExitHandler,
    ring: Option<&DirtyRing>,
) -> Option<String> {
    let mut no_progress = 0u32;
    while pauser.before_run() {
        let mut fd = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        let exit = fd.run();
        pauser.after_run(&exit);
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => handler.pio_write(port, data),
            Ok(VcpuExit::IoIn(port, data)) => handler.pio_read(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => handler.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => handler.mmio_write(addr, data),
            Ok(VcpuExit::Hlt) => {
                drop(fd);
                std::thread::sleep(Duration::from_micros(100));
            }
            Ok(VcpuExit::Shutdown) => return Some("guest shutdown (triple fault?)".to_string()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Some(format!("KVM_EXIT_FAIL_ENTRY reason 0x{reason:x} cpu {cpu}"))
            }
            Ok(VcpuExit::InternalError) => return Some("KVM_EXIT_INTERNAL_ERROR".to_string()),
            Ok(VcpuExit::SystemEvent(kind, _)) => return Some(format!("system event {kind}")),
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => {
                drop(fd);
                if let Some(reason) = ring_full(ring, &mut no_progress) {
                    return Some(reason);
                }
            }
            Ok(other) => log::debug!("vcpu{index}: ignored exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Some(format!("KVM_RUN failed: {e}")),
        }
    }
    None
}

/// Handles `KVM_EXIT_DIRTY_RING_FULL`: harvests the rings on this thread.
/// `None` to run on; `Some(reason)` when the vCPU must stop.
fn ring_full(ring: Option<&DirtyRing>, no_progress: &mut u32) -> Option<String> {
    let Some(r) = ring else {
        return Some("KVM_EXIT_DIRTY_RING_FULL without a dirty ring".to_string());
    };
    match r.on_ring_full() {
        Err(e) => Some(format!("harvesting the full dirty ring: {e}")),
        Ok(0) => {
            // Someone else harvested between the exit and our lock (fine),
            // or KVM says full while the rings are empty (a bug): yield, and
            // give up if it persists.
            *no_progress += 1;
            if *no_progress >= RING_FULL_NO_PROGRESS_LIMIT {
                return Some(format!(
                    "KVM_EXIT_DIRTY_RING_FULL {no_progress} times with nothing to harvest"
                ));
            }
            std::thread::sleep(Duration::from_micros(50));
            None
        }
        Ok(_) => {
            *no_progress = 0;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kvm_bindings::kvm_regs;
    use vm_memory::{Bytes, GuestAddress};

    use super::ExitHandler;
    use crate::vm::{KvmVm, VmConfig};

    struct NoDevices;

    impl ExitHandler for NoDevices {
        fn pio_read(&self, _: u16, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn pio_write(&self, _: u16, _: &[u8]) {}
        fn mmio_read(&self, _: u64, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn mmio_write(&self, _: u64, _: &[u8]) {}
    }

    /// A VM of `n` vCPUs: vCPU 0 runs `hlt; jmp $-3` in real mode (it
    /// sleeps in the in-kernel LAPIC's halt until kicked), the others wait
    /// for a SIPI inside `KVM_RUN`, as an idle SMP guest's parked APs do.
    fn idle_vm(n: u32) -> Option<KvmVm> {
        if !crate::kvm_or_skip("a vcpu.rs test's idle VM") {
            return None;
        }
        let cfg = VmConfig {
            memory: 2 << 20,
            vcpus: n,
            nics: vec![],
            dirty_mode: None,
        };
        let vm = KvmVm::create(&cfg, Arc::new(NoDevices), vec![]).expect("create VM");
        vm.ram()
            .write_slice(&[0xf4, 0xeb, 0xfd], GuestAddress(0x1000))
            .expect("load");
        vm.with_vcpu(0, |fd| {
            let mut s = fd.get_sregs().expect("sregs");
            s.cs.base = 0;
            s.cs.selector = 0;
            fd.set_sregs(&s).expect("set sregs");
            fd.set_regs(&kvm_regs {
                rip: 0x1000,
                rflags: 0x2,
                ..Default::default()
            })
            .expect("set regs");
        })
        .expect("vCPU 0");
        Some(vm)
    }

    /// Parking one vCPU must not wake the ones already parked: with one
    /// shared condition variable every park woke all earlier ones (n²/2
    /// wake-ups per pause on a 2-core host, most of a 32-vCPU pause).
    #[test]
    fn parking_does_not_wake_the_parked() {
        let Some(vm) = idle_vm(32) else { return };
        for _ in 0..5 {
            vm.resume_vcpus();
            std::thread::sleep(std::time::Duration::from_millis(5));
            vm.pause_vcpus().expect("pause");
        }
        assert!(vm.wait_fatal(std::time::Duration::ZERO).is_none());
        let idle = vm.vcpus().idle_wakeups();
        // A few signal-interrupted waits may happen; a herd is hundreds.
        assert!(
            idle < 32,
            "{idle} wake-ups of parked vCPU threads that had to stay parked in 5 pauses of 32 vCPUs"
        );
    }
}
