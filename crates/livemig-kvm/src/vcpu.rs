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

/// How long a pause waits for the kicked threads before it kicks the ones
/// still running again.
const KICK_INTERVAL: Duration = Duration::from_millis(1);

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

/// Where one vCPU thread is, as the controller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Where {
    /// Running (or on its way in or out of `KVM_RUN`).
    Running,
    /// Parked (a thread stopped by a fatal exit stays parked for good).
    Parked,
    /// The thread has ended.
    Exited,
}

struct Ctl {
    want: Want,
    /// Each thread's place, by vCPU index: a pause kicks only the threads
    /// that are not parked yet.
    at: Vec<Where>,
    parked: usize,
    exited: usize,
    fatal: Option<(usize, String)>,
    /// Times a parked thread woke up and found it still had to stay
    /// parked (a wake-up meant for someone else).
    idle_wakeups: u64,
}

impl Ctl {
    /// Every thread is parked or gone.
    fn all_parked(&self) -> bool {
        self.parked + self.exited >= self.at.len()
    }
}

/// The control block and its two condition variables: the vCPU threads
/// wait on `run_cv` for a change of `want`, the controller (pause,
/// `wait_fatal`) waits on `done_cv` for the threads. Two, so that a thread
/// that parks wakes only the controller, never the threads already parked
/// (with one shared variable each park woke every earlier one: n²/2
/// wake-ups per pause).
struct Shared {
    ctl: Mutex<Ctl>,
    run_cv: Condvar,
    done_cv: Condvar,
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
                at: vec![Where::Running; vcpus.len()],
                parked: 0,
                exited: 0,
                fatal: None,
                idle_wakeups: 0,
            }),
            run_cv: Condvar::new(),
            done_cv: Condvar::new(),
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

    /// Wake-ups of parked threads that had to stay parked (test hook).
    #[cfg(test)]
    pub(crate) fn idle_wakeups(&self) -> u64 {
        self.shared.lock().idle_wakeups
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
            .done_cv
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

    /// Kicks every thread that has not parked yet and waits until all
    /// have; kicks the stragglers again every [`KICK_INTERVAL`] (a kick is
    /// never lost — the handler sets `immediate_exit` — so this is only a
    /// safety net).
    fn wait_parked(&self) -> Result<(), VcpuError> {
        let deadline = Instant::now() + self.pause_timeout;
        let mut ctl = self.shared.lock();
        let mut kick = Vec::with_capacity(self.threads.len());
        while !ctl.all_parked() {
            if Instant::now() > deadline {
                return Err(VcpuError::PauseTimeout(self.pause_timeout));
            }
            kick.clear();
            kick.extend(
                ctl.at
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| **w == Where::Running)
                    .map(|(i, _)| i),
            );
            drop(ctl);
            for &i in &kick {
                if let Some(t) = self.threads.get(i) {
                    // A failed kick only means the thread just exited.
                    let _ = t.kill(kick_signal());
                }
            }
            ctl = self.shared.lock();
            ctl = self
                .shared
                .done_cv
                .wait_timeout_while(ctl, KICK_INTERVAL, |c| !c.all_parked())
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets every vCPU run again. It returns at once: the threads leave
    /// their park as the scheduler runs them. (Waiting for all of them was
    /// tried: on a loaded 2-core host the last of 8–32 threads, mostly APs
    /// waiting for a SIPI that the guest does not wait for, took up to
    /// 12–42 ms to be scheduled, while the guest's own heartbeat resumed
    /// after 2–17 ms.)
    pub fn resume(&self) {
        {
            let mut ctl = self.shared.lock();
            if ctl.want == Want::Exit {
                return;
            }
            ctl.want = Want::Run;
        }
        self.shared.run_cv.notify_all();
    }
}

impl Drop for VcpuSet {
    fn drop(&mut self) {
        self.shared.lock().want = Want::Exit;
        self.shared.run_cv.notify_all();
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
        let mut fd = match park_or_complete(index, &vcpu, &shared, completed) {
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
            ctl.at[index] = Where::Parked;
            shared.done_cv.notify_all();
            while ctl.want != Want::Exit {
                ctl = shared.run_cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
            }
            ctl.parked -= 1;
            break;
        }
    }
    KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    let mut ctl = shared.lock();
    ctl.exited += 1;
    ctl.at[index] = Where::Exited;
    shared.done_cv.notify_all();
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
    index: usize,
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
        ctl.at[index] = Where::Parked;
        // Only the last thread to park wakes the controller.
        if ctl.all_parked() {
            shared.done_cv.notify_all();
        }
        while ctl.want == Want::Pause {
            ctl = shared.run_cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
            if ctl.want == Want::Pause {
                ctl.idle_wakeups += 1;
            }
        }
        ctl.parked -= 1;
        ctl.at[index] = Where::Running;
        if ctl.want == Want::Exit {
            return None;
        }
    }
    drop(ctl);
    Some(vcpu.lock().unwrap_or_else(|e| e.into_inner()))
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
