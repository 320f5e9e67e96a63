//! Which CPUs a thread may run on: the vCPU state helpers (`pool.rs`) are
//! kept off their caller's CPU, where the scheduler's wake-up placement
//! would queue them behind the caller while another CPU idles.

/// The calling thread's id.
pub(crate) fn current_tid() -> libc::pid_t {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// The CPUs the calling thread may run on.
pub(crate) fn own_cpus() -> Option<libc::cpu_set_t> {
    // SAFETY: an all-zero cpu_set_t is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a cpu_set_t of the size passed, written by the call.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    (r == 0).then_some(set)
}

/// CPUs a `cpu_set_t` holds.
pub(crate) const CPU_SETSIZE: usize = 8 * std::mem::size_of::<libc::cpu_set_t>();

/// How many CPUs `set` holds.
pub(crate) fn cpu_count(set: &libc::cpu_set_t) -> u32 {
    // SAFETY: reads only the set, a valid cpu_set_t.
    let n = unsafe { libc::CPU_COUNT(set) };
    u32::try_from(n).unwrap_or(0)
}

/// Lets thread `tid` run on `cpus` except `cpu`; whether it was set (not
/// when that leaves no CPU, or the call failed).
pub(crate) fn keep_off(tid: libc::pid_t, mut set: libc::cpu_set_t, cpu: usize) -> bool {
    if cpu >= CPU_SETSIZE {
        return false;
    }
    // SAFETY: `cpu` is within the set (checked above).
    unsafe { libc::CPU_CLR(cpu, &mut set) };
    if cpu_count(&set) == 0 {
        return false;
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; the call
    // only reads it.
    unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 }
}

/// The CPU the calling thread runs on now.
pub(crate) fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu takes no arguments and only returns a value.
    usize::try_from(unsafe { libc::sched_getcpu() }).ok()
}
