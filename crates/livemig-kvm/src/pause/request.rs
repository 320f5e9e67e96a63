//! Requests a parked vCPU thread runs on the `VcpuFd` it owns: how a VMM
//! whose vCPU fds never leave their threads (Firecracker's shape) still
//! has every vCPU's state saved or restored — in parallel, one vCPU per
//! thread — while the vCPUs are paused.
//!
//! The controller posts one job ([`PauseGate::on_vcpu_threads`]); each
//! thread parked in [`VcpuPauser::before_run_serving`] runs it once on its
//! fd and hands the result back; the controller returns the results in
//! vCPU order once every thread has run it. A thread parked any other way
//! (plain [`VcpuPauser::before_run`], another fd, stopped for good, not
//! attached, gone) cannot run it: the request fails at once, naming that
//! vCPU, instead of waiting.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use kvm_ioctls::VcpuFd;

use super::{Ctl, PauseGate, Shared, Want, Where};
use crate::vcpu::VcpuError;

/// A job for every vCPU thread: called with the vCPU's index and fd.
type Job = Arc<dyn Fn(usize, &VcpuFd) + Send + Sync>;

/// How a vCPU thread is parked, as far as requests are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Serving {
    /// Not parked (running, not attached yet, or gone).
    No,
    /// Parked in plain `before_run`: it has no fd to run a job on.
    NotAsked,
    /// Parked in `before_run_serving` with an fd other than the attached one.
    WrongFd,
    /// Stopped for good (`VcpuPauser::stop`).
    Stopped,
    /// Parked in `before_run_serving` with its own fd.
    Yes,
}

/// The job posted to the parked threads, and who still has to run it.
pub(super) struct Request {
    id: u64,
    job: Job,
    /// Per vCPU: not taken yet.
    todo: Vec<bool>,
    /// Taken or not, not finished yet.
    pending: usize,
    /// The first vCPU whose job panicked.
    panicked: Option<usize>,
}

impl Ctl {
    /// The posted job, if vCPU `index` has not taken it yet.
    pub(super) fn request_for(&self, index: usize) -> Option<(u64, Job)> {
        let r = self.request.as_ref()?;
        r.todo
            .get(index)
            .copied()
            .unwrap_or(false)
            .then(|| (r.id, r.job.clone()))
    }

    /// Why vCPU `index` cannot run a request, if it cannot.
    fn not_serving(&self, index: usize) -> Option<String> {
        let why = match (self.at[index], self.serving[index]) {
            (_, Serving::Yes) => return None,
            (Where::Unattached, _) => "no thread has attached it",
            (Where::Exited, _) => "its thread has detached",
            (_, Serving::NotAsked) => {
                "its thread parked in before_run, which holds no fd: \
                 park with before_run_serving(&fd)"
            }
            (_, Serving::WrongFd) => {
                "its thread parked in before_run_serving with a VcpuFd other than the one it \
                 attached"
            }
            (_, Serving::Stopped) => "it stopped for good",
            (_, Serving::No) => "it is not parked",
        };
        Some(why.to_string())
    }
}

/// vCPU `index`'s thread runs the request `(id, job)` on `fd`, without
/// the lock; counts it done (and wakes the controller when it is the last).
pub(super) fn serve<'a>(
    shared: &'a Shared,
    index: usize,
    mut ctl: MutexGuard<'a, Ctl>,
    (id, job): (u64, Job),
    fd: &VcpuFd,
) -> MutexGuard<'a, Ctl> {
    if let Some(r) = ctl.request.as_mut() {
        r.todo[index] = false;
    }
    drop(ctl);
    let ok = catch_unwind(AssertUnwindSafe(|| job(index, fd))).is_ok();
    drop(job);
    let mut ctl = shared.lock();
    if let Some(r) = ctl.request.as_mut().filter(|r| r.id == id) {
        r.pending -= 1;
        if !ok && r.panicked.is_none() {
            r.panicked = Some(index);
        }
        if r.pending == 0 {
            shared.done_cv.notify_all();
        }
    }
    ctl
}

impl PauseGate {
    /// Runs `f(index, fd)` on every vCPU thread, each on its own vCPU's fd,
    /// all at once, while the gate is paused; returns the results in vCPU
    /// order. This is how a VMM whose vCPU threads own their fds saves or
    /// restores vCPU state (what [`crate::parts::KvmParts`] does for
    /// parts made with [`crate::parts::KvmParts::with_vcpu_threads`]).
    ///
    /// Every thread must park in [`VcpuPauser::before_run_serving`](super::VcpuPauser::before_run_serving) with
    /// the fd it attached. First waits (up to the gate's timeout) until
    /// every vCPU is attached and parked.
    ///
    /// # Errors
    /// [`VcpuError::NotPaused`] if the gate lets the vCPUs run or is
    /// closed; [`VcpuError::PauseTimeout`] if a vCPU does not park;
    /// [`VcpuError::NotServing`] if a vCPU's thread cannot run it (none
    /// runs it then); [`VcpuError::RequestTimeout`] if a thread does not
    /// finish within the gate's timeout; [`VcpuError::RequestPanicked`];
    /// [`VcpuError::ResumedDuringRequest`] if the gate was resumed before
    /// every thread had run it (its results are not of one paused VM).
    pub fn on_vcpu_threads<R: Send + 'static>(
        &self,
        f: impl Fn(usize, &VcpuFd) -> R + Send + Sync + 'static,
    ) -> Result<Vec<R>, VcpuError> {
        let _one_at_a_time = self
            .shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if self.shared.lock().want != Want::Pause {
            return Err(VcpuError::NotPaused);
        }
        self.wait_parked()?;
        let n = self.len();
        let results: Arc<Mutex<Vec<Option<R>>>> =
            Arc::new(Mutex::new((0..n).map(|_| None).collect()));
        let out = results.clone();
        let job: Job = Arc::new(move |i, fd| {
            let r = f(i, fd);
            let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = out.get_mut(i) {
                *slot = Some(r);
            }
        });
        self.post_and_wait(job, n)?;
        let mut results = results.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *results)
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.ok_or(VcpuError::RequestPanicked(i)))
            .collect()
    }

    /// Posts `job` to the `n` parked threads and waits until each has run
    /// it (see [`PauseGate::on_vcpu_threads`] for the errors).
    fn post_and_wait(&self, job: Job, n: usize) -> Result<(), VcpuError> {
        let mut ctl = self.shared.lock();
        if ctl.want != Want::Pause {
            return Err(VcpuError::NotPaused);
        }
        if let Some((index, reason)) = (0..n).find_map(|i| ctl.not_serving(i).map(|r| (i, r))) {
            return Err(VcpuError::NotServing { index, reason });
        }
        let resumes = ctl.resumes;
        ctl.last_request += 1;
        let id = ctl.last_request;
        ctl.request = Some(Request {
            id,
            job,
            todo: vec![true; n],
            pending: n,
            panicked: None,
        });
        self.shared.run_cv.notify_all();
        let deadline = Instant::now() + self.timeout;
        while ctl.request.as_ref().is_some_and(|r| r.pending > 0) {
            let now = Instant::now();
            if now >= deadline {
                ctl.request = None;
                return Err(VcpuError::RequestTimeout(self.timeout));
            }
            ctl = self
                .shared
                .done_cv
                .wait_timeout(ctl, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let panicked = ctl.request.take().and_then(|r| r.panicked);
        if let Some(index) = panicked {
            return Err(VcpuError::RequestPanicked(index));
        }
        if ctl.resumes != resumes {
            return Err(VcpuError::ResumedDuringRequest);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;
    use std::sync::mpsc;
    use std::thread::ThreadId;
    use std::time::Duration;

    /// How the test's vCPU threads park.
    #[derive(Clone, Copy)]
    enum Park {
        Serving,
        Plain,
        /// `before_run_serving` with another vCPU's fd.
        WrongFd,
    }

    /// `n` vCPUs (never run: the gate stays paused), each moved into its
    /// own thread, which attaches and parks as `how`; returns the gate and
    /// each thread's id.
    fn threads(
        n: usize,
        how: Park,
    ) -> (PauseGate, Vec<ThreadId>, Vec<std::thread::JoinHandle<()>>) {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let gate = PauseGate::new(n).unwrap();
        let (tx, rx) = mpsc::channel();
        let mut joins = Vec::new();
        for i in 0..n {
            let mut fd = vm.create_vcpu(i as u64).unwrap();
            let other = vm.create_vcpu(100 + i as u64).unwrap();
            let (g, tx) = (gate.clone(), tx.clone());
            joins.push(std::thread::spawn(move || {
                // SAFETY: `fd` lives until the end of this closure, after
                // `pauser`, which is dropped on this thread.
                let mut pauser = unsafe { g.attach(i, &mut fd) }.unwrap();
                tx.send((i, std::thread::current().id())).unwrap();
                loop {
                    let go_on = match how {
                        Park::Serving => pauser.before_run_serving(&fd),
                        Park::Plain => pauser.before_run(),
                        Park::WrongFd => pauser.before_run_serving(&other),
                    };
                    if !go_on {
                        break;
                    }
                    // "KVM_RUN" (the gate was resumed): a kicked run that
                    // returned EINTR, without entering this empty VM.
                    std::thread::sleep(Duration::from_millis(1));
                    pauser.after_run(&Err(kvm_ioctls::Error::new(libc::EINTR)));
                }
                drop(pauser);
            }));
        }
        let mut ids = vec![None; n];
        for _ in 0..n {
            let (i, id) = rx.recv().unwrap();
            ids[i] = Some(id);
        }
        (gate, ids.into_iter().map(Option::unwrap).collect(), joins)
    }

    fn close(gate: PauseGate, joins: Vec<std::thread::JoinHandle<()>>) {
        assert!(gate.close(Duration::from_secs(5)));
        for j in joins {
            j.join().unwrap();
        }
    }

    /// Each vCPU's job runs on the thread that owns its fd, on that fd, and
    /// the results come back in vCPU order; a second request works too.
    #[test]
    fn each_job_runs_on_the_owning_thread() {
        if !crate::kvm_or_skip("each_job_runs_on_the_owning_thread") {
            return;
        }
        let (gate, ids, joins) = threads(2, Park::Serving);
        let set = gate.on_vcpu_threads(|i, fd: &VcpuFd| {
            let mut regs = fd.get_regs().unwrap();
            regs.rbx = 0x1000 + i as u64;
            fd.set_regs(&regs).unwrap();
            std::thread::current().id()
        });
        assert_eq!(set.unwrap(), ids, "a job ran on another thread");
        let got = gate.on_vcpu_threads(|_, fd: &VcpuFd| fd.get_regs().unwrap().rbx);
        assert_eq!(got.unwrap(), vec![0x1000, 0x1001]);
        close(gate, joins);
    }

    /// A request is refused while the vCPUs may run, and when a thread
    /// parks without its fd; the error names the vCPU and the cause.
    #[test]
    fn requests_that_cannot_be_served_are_refused() {
        if !crate::kvm_or_skip("requests_that_cannot_be_served_are_refused") {
            return;
        }
        let (gate, _, joins) = threads(1, Park::Plain);
        let e = gate.on_vcpu_threads(|_, _| ()).unwrap_err();
        assert!(
            matches!(&e, VcpuError::NotServing { index: 0, reason } if reason.contains("before_run_serving")),
            "{e}"
        );
        gate.resume();
        let e = gate.on_vcpu_threads(|_, _| ()).unwrap_err();
        assert!(matches!(e, VcpuError::NotPaused), "{e}");
        close(gate, joins);

        let (gate, _, joins) = threads(1, Park::WrongFd);
        let e = gate.on_vcpu_threads(|_, _| ()).unwrap_err();
        assert!(
            e.to_string().contains("other than the one it attached"),
            "{e}"
        );
        close(gate, joins);
    }

    /// A job that panics fails the request, naming the vCPU; the thread
    /// stays parked and serves the next request.
    #[test]
    fn a_panicking_job_fails_the_request_only() {
        if !crate::kvm_or_skip("a_panicking_job_fails_the_request_only") {
            return;
        }
        let (gate, _, joins) = threads(2, Park::Serving);
        let e = gate
            .on_vcpu_threads(|i, _| assert!(i != 1, "job for vCPU 1"))
            .unwrap_err();
        assert!(matches!(e, VcpuError::RequestPanicked(1)), "{e}");
        assert_eq!(gate.on_vcpu_threads(|i, _| i).unwrap(), vec![0, 1]);
        close(gate, joins);
    }
}
