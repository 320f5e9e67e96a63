//! minivmm's one vCPU: a thread running `KVM_RUN` in a loop, a tiny serial
//! port in its exit handler, and a pause that follows docs/embedding.md's
//! rule: a vCPU asked to park right after an I/O or MMIO exit first
//! re-enters `KVM_RUN` with `immediate_exit = 1`, so KVM completes the
//! instruction, and parks only after that `KVM_RUN` returned `EINTR`.

use std::io::Write;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;
use kvm_ioctls::{VcpuExit, VcpuFd};
use livemig_kvm::dirty::DirtyRing;

/// The kick signal (a real-time signal nothing else here uses).
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

/// `kvm_run.immediate_exit` of the (only) vCPU, for the signal handler.
static IMMEDIATE_EXIT: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn on_kick(_: libc::c_int) {
    let p = IMMEDIATE_EXIT.load(Ordering::SeqCst);
    if !p.is_null() {
        // SAFETY: p points into the vCPU's kvm_run mapping, which lives as
        // long as the process (the VcpuFd is never dropped); a one-byte
        // volatile store is async-signal-safe.
        unsafe { p.write_volatile(1) };
    }
}

/// Installs the kick handler (without `SA_RESTART`: `KVM_RUN` must return).
fn install_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a plain handler and an empty mask is
    // valid; the handler only does an atomic load and a volatile store.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[derive(Default)]
struct State {
    /// The owner wants the vCPU to run.
    run: bool,
    /// The vCPU thread is parked (out of KVM_RUN, nothing pending).
    parked: bool,
}

struct Control {
    state: Mutex<State>,
    cv: Condvar,
    /// Mirror of `!state.run`, read by the vCPU loop before each KVM_RUN.
    stop: AtomicBool,
}

/// The vCPU thread and its controls. Created parked.
pub struct Vcpu {
    /// The vCPU. The thread holds the lock while it runs the guest and
    /// releases it while parked: lock it only while paused.
    pub fd: Arc<Mutex<VcpuFd>>,
    ctl: Arc<Control>,
    thread: libc::pthread_t,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Vcpu {
    /// Starts the vCPU thread, parked.
    pub fn spawn(mut fd: VcpuFd, ring: Option<Arc<DirtyRing>>) -> std::io::Result<Vcpu> {
        install_handler()?;
        IMMEDIATE_EXIT.store(&mut fd.get_kvm_run().immediate_exit, Ordering::SeqCst);
        let fd = Arc::new(Mutex::new(fd));
        let ctl = Arc::new(Control {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            stop: AtomicBool::new(true),
        });
        let (f, c) = (fd.clone(), ctl.clone());
        let handle = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || vcpu_thread(&f, &c, ring.as_deref()))?;
        let thread = handle.as_pthread_t();
        Ok(Vcpu { fd, ctl, thread })
    }

    /// Parks the vCPU; returns once it is parked with no exit pending.
    pub fn pause(&self) {
        let mut st = lock(&self.ctl.state);
        st.run = false;
        self.ctl.stop.store(true, Ordering::SeqCst);
        while !st.parked {
            // SAFETY: the thread never exits (the process does), so its
            // pthread_t stays valid; the handler is installed.
            unsafe { libc::pthread_kill(self.thread, kick_signal()) };
            st = self
                .ctl
                .cv
                .wait_timeout(st, Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets the vCPU run.
    pub fn resume(&self) {
        let mut st = lock(&self.ctl.state);
        st.run = true;
        self.ctl.stop.store(false, Ordering::SeqCst);
        self.ctl.cv.notify_all();
    }

    /// Whether the vCPU is held parked.
    pub fn is_paused(&self) -> bool {
        !lock(&self.ctl.state).run
    }
}

/// The vCPU thread: runs the guest; a guest error ends the process.
fn vcpu_thread(fd: &Mutex<VcpuFd>, ctl: &Control, ring: Option<&DirtyRing>) {
    if let Err(e) = run_loop(fd, ctl, ring) {
        eprintln!("minivmm: vCPU stopped: {e}");
        std::process::exit(2);
    }
}

fn run_loop(fd: &Mutex<VcpuFd>, ctl: &Control, ring: Option<&DirtyRing>) -> Result<(), String> {
    loop {
        park(ctl);
        let mut vcpu = lock(fd);
        // `pending`: the last exit was I/O or MMIO, which KVM completes only
        // on the next KVM_RUN.
        let mut pending = false;
        loop {
            vcpu.set_kvm_immediate_exit(0);
            // The kicker sets `stop` before it signals, and the handler sets
            // immediate_exit: a kick after this check makes KVM_RUN return.
            if ctl.stop.load(Ordering::SeqCst) {
                break;
            }
            pending = step(&mut vcpu, ring)?;
        }
        if pending {
            vcpu.set_kvm_immediate_exit(1);
            while step(&mut vcpu, ring)? {}
            vcpu.set_kvm_immediate_exit(0);
        }
    }
}

/// One `KVM_RUN` and its exit. Returns whether the exit left an
/// instruction for the next `KVM_RUN` to complete.
fn step(vcpu: &mut VcpuFd, ring: Option<&DirtyRing>) -> Result<bool, String> {
    match vcpu.run() {
        Ok(VcpuExit::IoOut(port, data)) => {
            serial_out(port, data);
            Ok(true)
        }
        Ok(VcpuExit::IoIn(port, data)) => {
            serial_in(port, data);
            Ok(true)
        }
        Ok(VcpuExit::MmioRead(_, data)) => {
            data.fill(0);
            Ok(true)
        }
        Ok(VcpuExit::MmioWrite(..)) => Ok(true),
        // Raised before entering the guest: nothing to complete. Harvest
        // into the ring's pending bitmap (the next sync reports it).
        Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => match ring {
            Some(r) => r.on_ring_full().map(|_| false).map_err(|e| e.to_string()),
            None => Err("KVM_EXIT_DIRTY_RING_FULL without a ring".into()),
        },
        Ok(other) => Err(format!("unexpected exit {other:?}")),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(false),
        Err(e) => Err(format!("KVM_RUN: {e}")),
    }
}

/// Blocks while the owner wants the vCPU stopped, saying so.
fn park(ctl: &Control) {
    let mut st = lock(&ctl.state);
    st.parked = true;
    ctl.cv.notify_all();
    while !st.run {
        st = ctl.cv.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    st.parked = false;
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
