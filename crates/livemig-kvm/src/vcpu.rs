//! vCPU threads and the pause/resume controller.
//!
//! Each vCPU runs `KVM_RUN` in a loop on its own thread. [`VcpuSet::pause`]
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

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_run, KVM_EXIT_DIRTY_RING_FULL};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::dirty::DirtyRing;

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
    Signal(vmm_sys_util::errno::Error),
    /// Spawning a vCPU thread failed.
    #[error("spawning vCPU thread {0}: {1}")]
    Spawn(usize, std::io::Error),
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Exit,
}

struct Ctl {
    want: Want,
    parked: usize,
    exited: usize,
    fatal: Option<(usize, String)>,
}

struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        // A poisoned lock only means another thread panicked while holding
        // it; the plain-data control block is still consistent.
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }
}

thread_local! {
    // The kvm_run page of the vCPU on this thread, for the signal handler.
    // `const` initialisation: no lazy init or destructor, so touching it
    // from a signal handler is async-signal-safe.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN_PTR.with(|p| {
        let ptr = p.get();
        if !ptr.is_null() {
            // SAFETY: the pointer is the kvm_run mmap of the VcpuFd owned by
            // this thread's VcpuSet entry; it stays mapped until the thread
            // exits, and the thread clears the pointer before that.
            unsafe { std::ptr::write_volatile(&mut (*ptr).immediate_exit, 1) };
        }
    });
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

struct VcpuThread(JoinHandle<()>);

// SAFETY: the pthread_t comes from a JoinHandle we own and have not joined,
// so it is valid for as long as the VcpuThread exists.
unsafe impl Killable for VcpuThread {
    fn pthread_handle(&self) -> libc::pthread_t {
        use std::os::unix::thread::JoinHandleExt;
        self.0.as_pthread_t()
    }
}

/// A set of vCPUs, each on its own thread, that start parked.
pub struct VcpuSet {
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    threads: Vec<VcpuThread>,
    shared: Arc<Shared>,
    pause_timeout: Duration,
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
        register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal)?;
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                want: Want::Pause,
                parked: 0,
                exited: 0,
                fatal: None,
            }),
            cv: Condvar::new(),
        });
        let vcpus: Vec<_> = vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect();
        let mut set = VcpuSet {
            vcpus: vcpus.clone(),
            threads: Vec::new(),
            shared: shared.clone(),
            pause_timeout: Duration::from_secs(5),
        };
        for (index, vcpu) in vcpus.into_iter().enumerate() {
            let shared = shared.clone();
            let handler = handler.clone();
            let ring = ring.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu_loop(index, vcpu, shared, handler, ring))
                .map_err(|e| VcpuError::Spawn(index, e))?;
            set.threads.push(VcpuThread(t));
        }
        // Wait until every thread has parked once, so that state set by the
        // caller is never raced by a first KVM_RUN.
        set.wait_parked()?;
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

    /// Whether the vCPUs are currently asked to run.
    pub fn is_running(&self) -> bool {
        self.shared.lock().want == Want::Run
    }

    /// The first fatal vCPU exit, if any (guest shutdown, internal error).
    pub fn fatal(&self) -> Option<VcpuError> {
        self.shared
            .lock()
            .fatal
            .clone()
            .map(|(index, reason)| VcpuError::Fatal { index, reason })
    }

    /// Blocks until a vCPU stops with a fatal exit or the set is dropped.
    pub fn wait_fatal(&self, timeout: Duration) -> Option<VcpuError> {
        let ctl = self.shared.lock();
        let (ctl, _) = self
            .shared
            .cv
            .wait_timeout_while(ctl, timeout, |c| c.fatal.is_none())
            .unwrap_or_else(|e| e.into_inner());
        ctl.fatal
            .clone()
            .map(|(index, reason)| VcpuError::Fatal { index, reason })
    }

    /// Pauses every vCPU: returns once each has left `KVM_RUN` and parked.
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.shared.lock().want = Want::Pause;
        self.wait_parked()
    }

    fn wait_parked(&self) -> Result<(), VcpuError> {
        let n = self.vcpus.len();
        let deadline = Instant::now() + self.pause_timeout;
        let mut ctl = self.shared.lock();
        while ctl.parked + ctl.exited < n {
            drop(ctl);
            for t in &self.threads {
                // A failed kick only means the thread already exited.
                let _ = t.kill(kick_signal());
            }
            ctl = self.shared.lock();
            if ctl.parked + ctl.exited >= n {
                break;
            }
            let (c, _) = self
                .shared
                .cv
                .wait_timeout(ctl, Duration::from_micros(500))
                .unwrap_or_else(|e| e.into_inner());
            ctl = c;
            if Instant::now() > deadline {
                return Err(VcpuError::PauseTimeout(self.pause_timeout));
            }
        }
        Ok(())
    }

    /// Lets every vCPU run again.
    pub fn resume(&self) {
        let mut ctl = self.shared.lock();
        if ctl.want != Want::Exit {
            ctl.want = Want::Run;
        }
        self.shared.cv.notify_all();
    }
}

impl Drop for VcpuSet {
    fn drop(&mut self) {
        self.shared.lock().want = Want::Exit;
        self.shared.cv.notify_all();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let done = {
                let c = self.shared.lock();
                c.exited >= self.vcpus.len()
            };
            if done || Instant::now() > deadline {
                break;
            }
            for t in &self.threads {
                let _ = t.kill(kick_signal());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        for t in self.threads.drain(..) {
            if t.0.is_finished() {
                let _ = t.0.join();
            }
        }
    }
}

fn vcpu_loop(
    index: usize,
    vcpu: Arc<Mutex<VcpuFd>>,
    shared: Arc<Shared>,
    handler: Arc<dyn ExitHandler>,
    ring: Option<Arc<DirtyRing>>,
) {
    let mut no_progress = 0u32;
    // Whether the last KVM_RUN returned EINTR/EAGAIN (or there was none
    // yet): only then has KVM finished every instruction it exited for, and
    // only then may the thread park (see `park_or_complete`).
    let mut completed = true;
    {
        let mut fd = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        let ptr: *mut kvm_run = fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(ptr));
    }
    loop {
        let mut fd = match park_or_complete(&vcpu, &shared, completed) {
            Some(fd) => fd,
            None => break,
        };
        completed = false;
        let fatal = match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                handler.pio_write(port, data);
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                handler.pio_read(port, data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                handler.mmio_read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                handler.mmio_write(addr, data);
                None
            }
            Ok(VcpuExit::Hlt) => {
                drop(fd);
                std::thread::sleep(Duration::from_micros(100));
                continue;
            }
            Ok(VcpuExit::Shutdown) => Some("guest shutdown (triple fault?)".to_string()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                Some(format!("KVM_EXIT_FAIL_ENTRY reason 0x{reason:x} cpu {cpu}"))
            }
            Ok(VcpuExit::InternalError) => Some("KVM_EXIT_INTERNAL_ERROR".to_string()),
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(format!("system event {kind}")),
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => match ring.as_deref() {
                None => Some("KVM_EXIT_DIRTY_RING_FULL without a dirty ring".to_string()),
                Some(r) => match r.on_ring_full() {
                    Err(e) => Some(format!("harvesting the full dirty ring: {e}")),
                    Ok(0) => {
                        // Someone else harvested between the exit and our
                        // lock (fine), or KVM says full while the rings are
                        // empty (a bug): yield, and give up if it persists.
                        no_progress += 1;
                        if no_progress >= RING_FULL_NO_PROGRESS_LIMIT {
                            Some(format!(
                                "KVM_EXIT_DIRTY_RING_FULL {no_progress} times with nothing to harvest"
                            ))
                        } else {
                            drop(fd);
                            std::thread::sleep(Duration::from_micros(50));
                            continue;
                        }
                    }
                    Ok(_) => {
                        no_progress = 0;
                        None
                    }
                },
            },
            Ok(other) => {
                log::debug!("vcpu{index}: ignored exit {other:?}");
                None
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                completed = true;
                None
            }
            Err(e) => Some(format!("KVM_RUN failed: {e}")),
        };
        drop(fd);
        if let Some(reason) = fatal {
            log::error!("vcpu{index}: {reason}");
            let mut ctl = shared.lock();
            if ctl.fatal.is_none() {
                ctl.fatal = Some((index, reason));
            }
            // Park for good: the VM is dead, but pause/drop still work.
            ctl.parked += 1;
            shared.cv.notify_all();
            while ctl.want != Want::Exit {
                ctl = shared.cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
            }
            ctl.parked -= 1;
            break;
        }
    }
    KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    let mut ctl = shared.lock();
    ctl.exited += 1;
    shared.cv.notify_all();
}

/// Parks the calling vCPU thread while the set is paused, and returns its
/// locked fd for the next `KVM_RUN` (or `None` when the set is dropped).
///
/// The rule (KVM's API documentation, `KVM_EXIT_IO`/`KVM_EXIT_MMIO` and
/// `immediate_exit`): an exit to userspace is finished by the kernel only on
/// the next `KVM_RUN`. An `in` or MMIO read gets its data into the guest's
/// registers then, string I/O advances RSI/RDI/RCX then, and until then the
/// registers KVM reports may still point at the instruction. So a vCPU whose
/// last `KVM_RUN` returned an exit (`completed == false`) must not park yet:
/// when a pause is wanted it re-enters `KVM_RUN` once with `immediate_exit`
/// set — KVM completes the pending instruction without running the guest
/// and returns `EINTR` — and parks only after that. The exit handling in
/// [`vcpu_loop`] hands any further exit such a re-entry returns (the next
/// piece of a string instruction) to the handler as usual.
fn park_or_complete<'a>(
    vcpu: &'a Mutex<VcpuFd>,
    shared: &Shared,
    completed: bool,
) -> Option<MutexGuard<'a, VcpuFd>> {
    let mut ctl = shared.lock();
    if ctl.want != Want::Run && !completed {
        drop(ctl);
        let mut fd = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        fd.set_kvm_immediate_exit(1);
        return Some(fd);
    }
    if ctl.want != Want::Run {
        ctl.parked += 1;
        shared.cv.notify_all();
        while ctl.want == Want::Pause {
            ctl = shared.cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
        }
        ctl.parked -= 1;
        if ctl.want == Want::Exit {
            return None;
        }
    }
    drop(ctl);
    Some(vcpu.lock().unwrap_or_else(|e| e.into_inner()))
}
