//! The pause protocol for vCPU threads, as a reusable piece: a
//! [`PauseGate`] (the controller's side: pause, resume, close) and one
//! [`VcpuPauser`] per vCPU thread (the loop's side).
//!
//! [`crate::vcpu::VcpuSet`] (and so [`crate::KvmVm`]) runs its threads on
//! it; a VMM with its own vCPU loop uses it the same way. The protocol:
//!
//! 1. **Request.** [`PauseGate::pause`] marks the gate paused, then kicks
//!    every attached thread that is not parked: a real-time signal
//!    ([`kick_signal`]) whose handler sets `kvm_run.immediate_exit` of the
//!    vCPU attached on that thread. A kick that lands between the loop's
//!    check and its entry into `KVM_RUN` is therefore not lost: that
//!    `KVM_RUN` returns `EINTR` at once.
//! 2. **Complete.** KVM finishes the instruction behind a `KVM_EXIT_IO` or
//!    `KVM_EXIT_MMIO` only on the *next* `KVM_RUN` (an `in` or MMIO read
//!    gets its data into the registers then; string I/O advances
//!    RSI/RDI/RCX then). So a thread whose last `KVM_RUN` returned an exit
//!    does not park yet: [`VcpuPauser::before_run`] arms `immediate_exit`
//!    and lets it re-enter once — KVM completes the instruction without
//!    running the guest and returns `EINTR`. If that re-entry returns
//!    another exit instead (the next piece of a string instruction), the
//!    loop handles it as usual and re-enters again.
//! 3. **Park.** Only after a `KVM_RUN` that returned `EINTR` (or before
//!    the first one) does `before_run` park the thread, and the pause
//!    counts it as acknowledged. While parked the thread holds nothing of
//!    the vCPU: another thread may save or restore its state.
//! 4. **Acknowledge.** `pause` returns once every attached vCPU is parked
//!    (or has stopped for good, [`VcpuPauser::stop`]); it kicks the ones
//!    still running again every millisecond (a safety net only), and gives
//!    up after the gate's timeout ([`VcpuError::PauseTimeout`]).
//! 5. **Resume.** [`PauseGate::resume`] wakes the parked threads and
//!    returns; each woken thread re-enters `KVM_RUN` as soon as it runs.
//!    (A migration's destination sends its acknowledgement before this
//!    wake-up, `DestinationVm::resume_then`, so a woken thread that takes
//!    the CPU holds nothing up.)
//!
//! The loop calls two methods around each `KVM_RUN`:
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//! use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
//! use livemig_kvm::pause::PauseGate;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = Kvm::new()?;
//! let vm = kvm.create_vm()?;
//! let fd = Arc::new(Mutex::new(vm.create_vcpu(0)?));
//! let gate = PauseGate::new(1)?; // starts paused
//! let (g, f) = (gate.clone(), fd.clone());
//! std::thread::spawn(move || {
//!     // SAFETY: `f` keeps the VcpuFd (and its kvm_run page) alive for as
//!     // long as this thread, and `pauser` is dropped before it.
//!     let Ok(mut pauser) = (unsafe { g.attach(0, &mut f.lock().unwrap()) }) else { return };
//!     while pauser.before_run() {          // parks while paused; false: gate closed
//!         let mut vcpu = f.lock().unwrap(); // free while parked: state save/restore use it
//!         let exit = vcpu.run();
//!         pauser.after_run(&exit);           // EINTR: the pending exit is complete
//!         match exit {
//!             Ok(VcpuExit::IoIn(_, data)) => data.fill(0xff),
//!             Ok(VcpuExit::Hlt) | Ok(VcpuExit::Shutdown) => {
//!                 pauser.stop("guest stopped".into());
//!                 return;
//!             }
//!             _ => {}
//!         }
//!     }
//! });
//! gate.pause()?; // the thread attached and parked: set the vCPU's registers
//! gate.resume();
//! // … later, before saving state:
//! gate.pause()?;
//! # Ok(()) }
//! ```

mod request;

use std::cell::Cell;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::vcpu::VcpuError;

/// How long a pause waits for the kicked threads before it kicks the ones
/// still running again.
const KICK_INTERVAL: Duration = Duration::from_millis(1);

/// Default for [`PauseGate::pause`]'s timeout.
pub const DEFAULT_PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The signal used to kick vCPU threads out of `KVM_RUN` (`SIGRTMIN`).
/// [`PauseGate::new`] installs its handler; nothing else in the process
/// may use this signal.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

thread_local! {
    // The kvm_run page of the vCPU attached on this thread, for the signal
    // handler. `const` initialisation: no lazy init or destructor, so
    // touching it from a signal handler is async-signal-safe.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN_PTR.with(|p| {
        let ptr = p.get();
        if !ptr.is_null() {
            // SAFETY: the pointer is the kvm_run mmap of the VcpuFd attached
            // on this thread; `PauseGate::attach`'s contract keeps it mapped
            // until the VcpuPauser is dropped, which clears the pointer.
            unsafe { std::ptr::write_volatile(&mut (*ptr).immediate_exit, 1) };
        }
    });
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
    /// No thread has attached for this vCPU yet.
    Unattached,
    /// Running (or on its way in or out of `KVM_RUN`), on this thread.
    Running(libc::pthread_t),
    /// Parked (a thread stopped for good stays parked).
    Parked,
    /// The thread has detached (its pauser was dropped).
    Exited,
}

struct Ctl {
    want: Want,
    at: Vec<Where>,
    parked: usize,
    exited: usize,
    fatal: Option<(usize, String)>,
    /// Times a parked thread woke up and found it still had to stay
    /// parked (a wake-up meant for someone else).
    idle_wakeups: u64,
    /// Per vCPU: how its thread is parked, for [`PauseGate::on_vcpu_threads`].
    serving: Vec<request::Serving>,
    /// The request parked threads are asked to run, if any.
    request: Option<request::Request>,
    /// Identifies requests (the last one handed out).
    last_request: u64,
    /// Counts [`PauseGate::resume`]s: a request that saw it change ran on
    /// threads that did not all stay parked.
    resumes: u64,
}

impl Ctl {
    /// Every vCPU is parked or gone.
    fn all_parked(&self) -> bool {
        self.parked + self.exited >= self.at.len()
    }
}

/// The control block and its two condition variables: the vCPU threads
/// wait on `run_cv` for a change of `want`, the controller waits on
/// `done_cv` for the threads. Two, so that a thread that parks wakes only
/// the controller, never the threads already parked (with one shared
/// variable each park woke every earlier one: n²/2 wake-ups per pause).
struct Shared {
    ctl: Mutex<Ctl>,
    run_cv: Condvar,
    done_cv: Condvar,
    /// Held by [`PauseGate::on_vcpu_threads`]: one request at a time.
    requests: Mutex<()>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        // A poisoned lock only means another thread panicked while holding
        // it; the plain-data control block is still consistent.
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The controller's side of the pause protocol for `n` vCPU threads (see
/// the [module documentation](self)). Cloning shares the gate.
///
/// A gate starts paused: each vCPU thread parks in its first
/// [`VcpuPauser::before_run`] until [`PauseGate::resume`].
#[derive(Clone)]
pub struct PauseGate {
    shared: Arc<Shared>,
    timeout: Duration,
}

impl PauseGate {
    /// A paused gate for `vcpus` vCPU threads; installs the kick signal's
    /// handler ([`kick_signal`]).
    pub fn new(vcpus: usize) -> Result<Self, VcpuError> {
        register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal)?;
        Ok(PauseGate {
            shared: Arc::new(Shared {
                ctl: Mutex::new(Ctl {
                    want: Want::Pause,
                    at: vec![Where::Unattached; vcpus],
                    parked: 0,
                    exited: 0,
                    fatal: None,
                    idle_wakeups: 0,
                    serving: vec![request::Serving::No; vcpus],
                    request: None,
                    last_request: 0,
                    resumes: 0,
                }),
                run_cv: Condvar::new(),
                done_cv: Condvar::new(),
                requests: Mutex::new(()),
            }),
            timeout: DEFAULT_PAUSE_TIMEOUT,
        })
    }

    /// The same gate with another pause timeout (default
    /// [`DEFAULT_PAUSE_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Number of vCPUs.
    pub fn len(&self) -> usize {
        self.shared.lock().at.len()
    }

    /// Whether the gate has no vCPUs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Attaches the calling thread as vCPU `index`'s thread, running `fd`.
    ///
    /// # Errors
    /// [`VcpuError::Attach`] if `index` is out of range or already
    /// attached, or this thread already has a vCPU attached.
    ///
    /// # Safety
    /// The kick signal's handler writes into `fd`'s `kvm_run` page from
    /// now until the returned [`VcpuPauser`] is dropped: `fd` must not be
    /// dropped before the pauser, and the pauser must be dropped on this
    /// thread before the thread ends (the gate signals the thread by its
    /// id until then). The pauser cannot leave the thread (it is not
    /// `Send`); do not `mem::forget` it.
    pub unsafe fn attach(&self, index: usize, fd: &mut VcpuFd) -> Result<VcpuPauser, VcpuError> {
        let raw = fd.as_raw_fd();
        // SAFETY: forwarded to the caller (see above).
        let mut pauser = unsafe { self.attach_raw(index, fd.get_kvm_run()) }?;
        pauser.fd = Some(raw);
        Ok(pauser)
    }

    /// [`PauseGate::attach`] with the `kvm_run` page given directly (the
    /// unit tests use a plain structure instead of a vCPU's).
    ///
    /// # Safety
    /// As [`PauseGate::attach`], for the memory `run` points to.
    unsafe fn attach_raw(&self, index: usize, run: *mut kvm_run) -> Result<VcpuPauser, VcpuError> {
        let refuse = |why: String| Err(VcpuError::Attach(index, why));
        if !KVM_RUN_PTR.with(Cell::get).is_null() {
            return refuse("this thread already runs a vCPU".into());
        }
        let mut ctl = self.shared.lock();
        match ctl.at.get(index) {
            None => return refuse(format!("the gate has {} vCPUs", ctl.at.len())),
            Some(Where::Unattached) => {}
            Some(_) => return refuse("already attached".into()),
        }
        // SAFETY: pthread_self has no preconditions.
        ctl.at[index] = Where::Running(unsafe { libc::pthread_self() });
        drop(ctl);
        KVM_RUN_PTR.with(|p| p.set(run));
        Ok(VcpuPauser {
            shared: self.shared.clone(),
            index,
            run,
            fd: None,
            completed: true,
            _not_send: PhantomData,
        })
    }

    /// Pauses every vCPU: returns once each has parked with no exit
    /// pending (or stopped for good). Kicks the ones still running every
    /// millisecond; fails after the gate's timeout.
    pub fn pause(&self) -> Result<(), VcpuError> {
        {
            let mut ctl = self.shared.lock();
            if ctl.want == Want::Run {
                ctl.want = Want::Pause;
            }
        }
        self.wait_parked()
    }

    fn wait_parked(&self) -> Result<(), VcpuError> {
        let deadline = Instant::now() + self.timeout;
        let mut ctl = self.shared.lock();
        while !ctl.all_parked() {
            if Instant::now() > deadline {
                return Err(VcpuError::PauseTimeout(self.timeout));
            }
            kick_running(&ctl);
            ctl = self
                .shared
                .done_cv
                .wait_timeout_while(ctl, KICK_INTERVAL, |c| !c.all_parked())
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets every vCPU run again. Returns at once: the threads leave their
    /// park as the scheduler runs them. A closed gate stays closed.
    pub fn resume(&self) {
        {
            let mut ctl = self.shared.lock();
            if ctl.want == Want::Exit {
                return;
            }
            ctl.want = Want::Run;
            ctl.resumes += 1;
        }
        self.shared.run_cv.notify_all();
    }

    /// Whether the vCPUs are asked to run (false: paused or closed).
    pub fn is_running(&self) -> bool {
        self.shared.lock().want == Want::Run
    }

    /// Ends the loops: every [`VcpuPauser::before_run`] returns `false`
    /// from now on (a thread with an exit pending completes it first).
    /// Kicks the threads still running and waits up to `timeout` until
    /// every attached one has detached; returns whether they all did.
    pub fn close(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut ctl = self.shared.lock();
        ctl.want = Want::Exit;
        self.shared.run_cv.notify_all();
        let gone = |c: &Ctl| {
            c.at.iter()
                .all(|w| matches!(w, Where::Exited | Where::Unattached))
        };
        while !gone(&ctl) {
            let now = Instant::now();
            if now > deadline {
                return false;
            }
            kick_running(&ctl);
            ctl = self
                .shared
                .done_cv
                .wait_timeout(ctl, KICK_INTERVAL.min(deadline - now))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// The first vCPU that stopped for good ([`VcpuPauser::stop`]), if any.
    pub fn fatal(&self) -> Option<VcpuError> {
        self.shared
            .lock()
            .fatal
            .clone()
            .map(|(index, reason)| VcpuError::Fatal { index, reason })
    }

    /// Blocks until a vCPU stops for good, up to `timeout`.
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

    /// Wake-ups of parked threads that had to stay parked (test hook).
    #[cfg(test)]
    pub(crate) fn idle_wakeups(&self) -> u64 {
        self.shared.lock().idle_wakeups
    }
}

/// Kicks every thread that is attached and not parked. Called with the
/// lock held: a thread detaches only under it, so each id is of a live
/// thread.
fn kick_running(ctl: &Ctl) {
    for w in &ctl.at {
        if let Where::Running(thread) = *w {
            // SAFETY: the thread is attached (it detaches under the lock we
            // hold), so its pthread_t is valid; the handler is installed.
            // A failure can only mean the thread is exiting.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }
}

/// The vCPU thread's side of the pause protocol (see the
/// [module documentation](self)): call [`VcpuPauser::before_run`] before
/// every `KVM_RUN` and [`VcpuPauser::after_run`] right after it. Dropping it
/// detaches the thread. Not `Send`: it belongs to the thread that attached.
pub struct VcpuPauser {
    shared: Arc<Shared>,
    index: usize,
    run: *mut kvm_run,
    /// The descriptor of the `VcpuFd` attached ([`PauseGate::attach`]).
    fd: Option<RawFd>,
    /// The last `KVM_RUN` returned `EINTR`/`EAGAIN` (or there was none):
    /// KVM has finished every instruction it exited for.
    completed: bool,
    _not_send: PhantomData<*mut ()>,
}

impl VcpuPauser {
    /// Call before each `KVM_RUN`, holding nothing the controller needs
    /// (in particular not the vCPU's fd lock, if it has one).
    ///
    /// While a pause is wanted: if the last `KVM_RUN` returned an exit,
    /// arms `immediate_exit` and returns `true` (re-enter, so KVM completes
    /// the instruction without running the guest); otherwise parks until
    /// resumed. Returns `false` once the gate is closed: end the loop.
    pub fn before_run(&mut self) -> bool {
        self.before_run_with(request::Serving::NotAsked, None)
    }

    /// [`VcpuPauser::before_run`] for a thread that owns its vCPU's fd
    /// (no other thread can reach it): while parked, the thread also runs
    /// the gate's requests on `fd` ([`PauseGate::on_vcpu_threads`]: saving
    /// or restoring this vCPU's state). `fd` must be the one attached; a
    /// thread that parks with another serves nothing, and requests fail
    /// naming it.
    pub fn before_run_serving(&mut self, fd: &VcpuFd) -> bool {
        if self.fd == Some(fd.as_raw_fd()) {
            self.before_run_with(request::Serving::Yes, Some(fd))
        } else {
            self.before_run_with(request::Serving::WrongFd, None)
        }
    }

    fn before_run_with(&mut self, serving: request::Serving, fd: Option<&VcpuFd>) -> bool {
        let mut ctl = self.shared.lock();
        if ctl.want != Want::Run && !self.completed {
            drop(ctl);
            self.set_immediate_exit(1);
            return true;
        }
        if ctl.want != Want::Run {
            ctl = park(&self.shared, self.index, ctl, serving, fd);
            if ctl.want == Want::Exit {
                return false;
            }
            drop(ctl);
        }
        self.completed = false;
        true
    }

    /// Call with the result of each `KVM_RUN`: an `EINTR` (or `EAGAIN`)
    /// means KVM finished any pending instruction; `immediate_exit` is
    /// cleared again.
    pub fn after_run(&mut self, result: &Result<VcpuExit<'_>, kvm_ioctls::Error>) {
        if let Err(e) = result {
            if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN {
                self.set_immediate_exit(0);
                self.completed = true;
            }
        }
    }

    /// The vCPU stopped for good (guest shutdown, internal error): records
    /// `reason` ([`PauseGate::fatal`]), counts the vCPU as parked so that
    /// pauses still complete, and blocks until the gate is closed.
    pub fn stop(&mut self, reason: String) {
        let mut ctl = self.shared.lock();
        if ctl.fatal.is_none() {
            ctl.fatal = Some((self.index, reason));
        }
        ctl.parked += 1;
        ctl.at[self.index] = Where::Parked;
        ctl.serving[self.index] = request::Serving::Stopped;
        self.shared.done_cv.notify_all();
        while ctl.want != Want::Exit {
            ctl = self
                .shared
                .run_cv
                .wait(ctl)
                .unwrap_or_else(|e| e.into_inner());
        }
        ctl.parked -= 1;
        ctl.serving[self.index] = request::Serving::No;
        // SAFETY: pthread_self has no preconditions.
        ctl.at[self.index] = Where::Running(unsafe { libc::pthread_self() });
    }

    fn set_immediate_exit(&self, value: u8) {
        // SAFETY: `run` is the attached vCPU's kvm_run page, mapped until
        // this pauser is dropped (attach's contract); the signal handler
        // writes the same byte, volatile as here.
        unsafe { std::ptr::write_volatile(&mut (*self.run).immediate_exit, value) };
    }
}

/// Parks until the gate is resumed or closed; the thread counts as
/// parked meanwhile. With `fd`, it runs each request posted for it
/// (before it leaves, too: a request never waits for a thread that
/// left).
fn park<'a>(
    shared: &'a Shared,
    index: usize,
    mut ctl: MutexGuard<'a, Ctl>,
    serving: request::Serving,
    fd: Option<&VcpuFd>,
) -> MutexGuard<'a, Ctl> {
    let running = ctl.at[index];
    ctl.parked += 1;
    ctl.at[index] = Where::Parked;
    ctl.serving[index] = serving;
    // Only the last thread to park wakes the controller.
    if ctl.all_parked() {
        shared.done_cv.notify_all();
    }
    loop {
        if let Some(fd) = fd {
            if let Some(job) = ctl.request_for(index) {
                ctl = request::serve(shared, index, ctl, job, fd);
                continue;
            }
        }
        if ctl.want != Want::Pause {
            break;
        }
        ctl = shared.run_cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
        let for_me = fd.is_some() && ctl.request_for(index).is_some();
        if ctl.want == Want::Pause && !for_me {
            ctl.idle_wakeups += 1;
        }
    }
    ctl.parked -= 1;
    ctl.at[index] = running;
    ctl.serving[index] = request::Serving::No;
    ctl
}

impl Drop for VcpuPauser {
    fn drop(&mut self) {
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        let mut ctl = self.shared.lock();
        if ctl.at[self.index] == Where::Parked {
            ctl.parked -= 1;
        }
        ctl.exited += 1;
        ctl.at[self.index] = Where::Exited;
        self.shared.done_cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A fake `KVM_RUN` over a plain `kvm_run`: with `immediate_exit` set
    /// it completes the pending instruction and returns `EINTR`; otherwise
    /// it "runs the guest" (waits for `immediate_exit`, which only the kick
    /// signal's handler sets) or, when `io` is set, returns an I/O exit
    /// at once, leaving the instruction pending as KVM does.
    struct FakeVcpu {
        run: Box<kvm_run>,
        pending: bool,
        log: Arc<Mutex<Vec<&'static str>>>,
    }

    impl FakeVcpu {
        fn immediate_exit(&self) -> u8 {
            // SAFETY: a plain field of our own structure, read volatile
            // because the signal handler writes it.
            unsafe { std::ptr::read_volatile(&self.run.immediate_exit) }
        }

        fn run(&mut self, io: bool) -> Result<VcpuExit<'static>, kvm_ioctls::Error> {
            if self.pending {
                self.pending = false;
                self.log.lock().unwrap().push("completed");
            }
            loop {
                if self.immediate_exit() != 0 {
                    return Err(kvm_ioctls::Error::new(libc::EINTR));
                }
                if io {
                    self.pending = true;
                    self.log.lock().unwrap().push("io exit");
                    return Ok(VcpuExit::IoOut(0x3f8, &[]));
                }
                std::thread::yield_now();
            }
        }
    }

    /// A pause that finds the loop right after an I/O exit returns only
    /// after the loop re-entered with `immediate_exit` set and the fake KVM
    /// completed the instruction; a pause of a loop inside "KVM_RUN" kicks
    /// it out with the signal; a closed gate ends the loop.
    #[test]
    fn a_pending_exit_is_completed_before_the_vcpu_parks() {
        let gate = PauseGate::new(1).expect("gate");
        let at_exit = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (g, a, l) = (gate.clone(), at_exit.clone(), log.clone());
        let vcpu = std::thread::spawn(move || {
            let mut v = FakeVcpu {
                run: Box::default(),
                pending: false,
                log: l,
            };
            let ptr: *mut kvm_run = &mut *v.run;
            // SAFETY: `v.run` lives until the end of this closure, after
            // `pauser` is dropped.
            let mut pauser = unsafe { g.attach_raw(0, ptr) }.expect("attach");
            let mut steps = 0;
            while pauser.before_run() {
                // The first run exits for I/O and then waits (as if the
                // handler took a while) until the test pauses.
                let io = steps == 0;
                let r = v.run(io);
                pauser.after_run(&r);
                if io {
                    a.store(true, Ordering::SeqCst);
                    while g.is_running() {
                        std::thread::yield_now();
                    }
                }
                steps += 1;
            }
            drop(pauser);
        });
        gate.pause().expect("first park");
        gate.resume();
        while !at_exit.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        // The loop sits after its I/O exit: the pause must complete it.
        gate.pause().expect("pause after an exit");
        assert_eq!(
            *log.lock().unwrap(),
            ["io exit", "completed"],
            "the pause returned before the pending exit was completed"
        );
        gate.resume();
        std::thread::sleep(Duration::from_millis(5));
        // Now the loop is inside the fake KVM_RUN: only a kick gets it out.
        gate.pause().expect("pause while running");
        assert!(gate.close(Duration::from_secs(5)), "the loop ended");
        vcpu.join().expect("vCPU thread");
        assert_eq!(*log.lock().unwrap(), ["io exit", "completed"]);
        assert!(gate.fatal().is_none());
    }

    /// A vCPU that stopped for good counts as parked: pauses complete, and
    /// the reason is kept.
    #[test]
    fn a_stopped_vcpu_does_not_block_pauses() {
        let gate = PauseGate::new(1).expect("gate");
        let g = gate.clone();
        let vcpu = std::thread::spawn(move || {
            let mut run = Box::<kvm_run>::default();
            // SAFETY: `run` outlives `pauser` (declared after it, so
            // dropped first).
            let mut pauser = unsafe { g.attach_raw(0, &mut *run) }.expect("attach");
            if pauser.before_run() {
                pauser.stop("shutdown".into());
            }
        });
        gate.resume();
        assert!(gate.wait_fatal(Duration::from_secs(5)).is_some());
        gate.pause().expect("pause with a stopped vCPU");
        assert!(gate.fatal().unwrap().to_string().contains("shutdown"));
        assert!(gate.close(Duration::from_secs(5)));
        vcpu.join().expect("vCPU thread");
    }

    #[test]
    fn attaching_twice_is_refused() {
        let gate = PauseGate::new(1).expect("gate");
        let mut run = Box::<kvm_run>::default();
        // SAFETY: `run` outlives the pauser, dropped at the end of the test.
        let p = unsafe { gate.attach_raw(0, &mut *run) }.expect("attach");
        let g = gate.clone();
        let other = std::thread::spawn(move || {
            let mut run = Box::<kvm_run>::default();
            // SAFETY: as above; the call fails before storing anything.
            let e = unsafe { g.attach_raw(0, &mut *run) }.err();
            // SAFETY: as above.
            let e2 = unsafe { g.attach_raw(1, &mut *run) }.err();
            (e.map(|e| e.to_string()), e2.map(|e| e.to_string()))
        });
        let (e, e2) = other.join().expect("thread");
        assert!(e.unwrap().contains("already attached"));
        assert!(e2.unwrap().contains("1 vCPUs"));
        drop(p);
    }
}
