//! KVM dirty-page tracking: the classic `KVM_GET_DIRTY_LOG` (harvest and
//! re-protect in one call), the manual-protect mode
//! (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`), where `KVM_GET_DIRTY_LOG` only reads
//! and `KVM_CLEAR_DIRTY_LOG` re-protects a chunk just before it is sent, and
//! the dirty ring (`KVM_CAP_DIRTY_LOG_RING`), where KVM pushes each newly
//! dirtied page into a per-vCPU ring shared with us ([`DirtyRing`]).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_gfn, kvm_userspace_memory_region, KVM_DIRTY_LOG_PAGE_OFFSET,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use livemig::bitmap::DirtyBitmap;
use livemig::vm::{DirtyTracker, Rearm, VmError, VmOp};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};

mod ioctls {
    #![allow(missing_docs)]
    use kvm_bindings::{kvm_clear_dirty_log, KVMIO};
    use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};
    // kvm-ioctls has no wrapper for KVM_CLEAR_DIRTY_LOG (_IOWR(KVMIO, 0xc0))
    // nor for KVM_RESET_DIRTY_RINGS (_IO(KVMIO, 0xc7)).
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}
use ioctls::{KVM_CLEAR_DIRTY_LOG, KVM_RESET_DIRTY_RINGS};

/// Flag of a ring entry KVM has filled (`KVM_DIRTY_GFN_F_DIRTY`).
const GFN_F_DIRTY: u32 = 1;
/// Flag userspace sets on an entry it has harvested (`KVM_DIRTY_GFN_F_RESET`).
const GFN_F_RESET: u32 = 2;
/// Page size of the host (and of the ring's mmap offset unit).
const HOST_PAGE: usize = 4096;
/// Default ring size in entries (64 KiB of ring per vCPU). Measured (see
/// `docs/benchmarks.md`, "Dirty tracking"): the size barely changes the
/// total harvest cost, but a vCPU whose ring fills stops for one harvest of
/// the whole ring — about 0.16 ms at 4096 entries, 2.5 ms at 65536 — so
/// the smaller ring keeps each guest-visible stall short.
pub const DEFAULT_RING_ENTRIES: u32 = 4096;

/// How dirty pages are tracked.
///
/// Which wins when (measured on this project's 2-core PVM machine; numbers
/// in `docs/benchmarks.md`, "Dirty tracking"):
///
/// - **Ring** wins when guest memory is large and few pages change per
///   round: a sync costs 20–40 ns per dirtied page and nothing per GiB (idle
///   16 GiB guest: 0.001 ms per sync, against 0.3–0.4 ms for the bitmap
///   modes, whose fixed cost grows with memory size).
/// - **Manual-protect** wins at the start of a migration: turning tracking
///   on costs 0.1 ms instead of write-protecting all memory at once (7.7 ms
///   per touched GiB for classic and ring); the protection is done chunk by
///   chunk while round 0 sends. It is the slowest per round when the dirty
///   pages are scattered (one `KVM_CLEAR_DIRTY_LOG` per 1024-page chunk:
///   0.6 ms at 1 % of 1 GiB, against 0.13 ms classic, 0.2 ms ring).
/// - **Classic** is cheapest per round on a guest of a few GiB, but pays
///   the whole-memory write-protect at start and a fixed cost per GiB on
///   every sync.
///
/// The guest's cost per first write after re-arming is the same in every
/// mode (2.5–2.9 µs here, against 0.02 µs untracked). The engine does not
/// switch automatically: the ring must be enabled before any vCPU exists,
/// long before the workload of a migration is known, and the measured
/// differences are a few milliseconds per migration at these sizes. `None`
/// in [`crate::VmConfig::dirty_mode`] means manual-protect; choose
/// [`DirtyMode::Ring`] for guests of many GiB that mostly sit idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyMode {
    /// `KVM_GET_DIRTY_LOG` harvests and write-protects the whole slot at once.
    Classic,
    /// Manual protect: harvest without protecting, then `KVM_CLEAR_DIRTY_LOG`
    /// each chunk just before sending it (the guest pays for write faults
    /// only on pages already sent).
    ManualProtect,
    /// The dirty ring (`KVM_CAP_DIRTY_LOG_RING`, or `_ACQ_REL` where
    /// offered): KVM pushes every newly dirtied page of a vCPU into that
    /// vCPU's ring of `entries` slots (a power of two, at least 256, at most
    /// what KVM offers: 65536 here). A sync harvests every ring and re-arms
    /// the harvested pages with `KVM_RESET_DIRTY_RINGS`; its cost follows
    /// the number of dirtied pages, not the size of guest memory.
    ///
    /// Must be chosen when the VM is created (before any vCPU exists); with
    /// the ring on, `KVM_GET_DIRTY_LOG` is refused by KVM. A vCPU whose ring
    /// fills up exits with `KVM_EXIT_DIRTY_RING_FULL`; its thread then
    /// harvests all rings itself into a pending bitmap (under the same lock
    /// as a sync) and re-enters, so no entry is lost and nobody spins
    /// waiting for the migration thread.
    ///
    /// `KVM_RESET_DIRTY_RINGS` is always called with every blockable signal
    /// blocked: with a signal pending, KVM (6.18 here) stops the reset
    /// early, returns success, and leaves pages writable without a ring
    /// entry — later writes to them were lost (issue 12). Should a reset
    /// stop early anyway, its pages are reported dirty by every later sync
    /// (see `DirtyRing::reset`).
    Ring {
        /// Entries per vCPU ring (16 bytes each).
        entries: u32,
    },
}

/// A registered memory slot.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    /// KVM slot number (= region index).
    pub slot: u32,
    /// Guest-physical address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the mapping.
    pub host_addr: u64,
}

impl Slot {
    fn region(&self, flags: u32) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: self.slot,
            flags,
            guest_phys_addr: self.guest_addr,
            memory_size: self.size,
            userspace_addr: self.host_addr,
        }
    }

    /// Registers (or re-registers) the slot with `flags`.
    pub fn register(&self, vm: &VmFd, flags: u32) -> Result<(), kvm_ioctls::Error> {
        let region = self.region(flags);
        // SAFETY: host_addr..host_addr+size is a mapping owned by the VM's
        // GuestRam, which outlives the VmFd's use of the slot.
        unsafe { vm.set_user_memory_region(region) }
    }
}

/// Errors of the dirty ring.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// `entries` is not a power of two within what KVM accepts.
    #[error("dirty ring of {entries} entries: must be a power of two from {min} to {max}")]
    Size {
        /// Requested entries.
        entries: u32,
        /// Smallest accepted.
        min: u32,
        /// Largest accepted (what KVM offers).
        max: u32,
    },
    /// Mapping a vCPU's ring failed.
    #[error("mapping the dirty ring of vCPU {vcpu}: {source}")]
    Map {
        /// The vCPU.
        vcpu: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// Duplicating the VM fd failed.
    #[error("duplicating the VM fd for the dirty ring: {0}")]
    Dup(#[source] std::io::Error),
    /// `KVM_RESET_DIRTY_RINGS` failed.
    #[error("KVM_RESET_DIRTY_RINGS: {0}")]
    Reset(#[source] std::io::Error),
    /// `KVM_RESET_DIRTY_RINGS` kept resetting nothing while harvested
    /// entries were left: the ring cannot be re-armed.
    #[error("KVM_RESET_DIRTY_RINGS reset nothing {RESET_STALL_LIMIT} times with {0} harvested entries left")]
    ResetIncomplete(u64),
    /// KVM put entries in a ring that name no page of guest memory: the
    /// dirty pages they stood for are unknown, so tracking cannot be trusted.
    #[error("{0} dirty-ring entries named a slot or page outside guest memory")]
    Invalid(u64),
}

impl From<RingError> for VmError {
    fn from(e: RingError) -> Self {
        VmError::failed(VmOp::DirtyLog, "dirty ring", e)
    }
}

/// The smallest ring KVM accepts (one host page of 16-byte entries).
pub const MIN_RING_ENTRIES: u32 = (HOST_PAGE / std::mem::size_of::<kvm_dirty_gfn>()) as u32;

/// Checks a ring size against KVM's rules; `max_bytes` is what
/// `KVM_CHECK_EXTENSION(KVM_CAP_DIRTY_LOG_RING)` answered.
pub fn check_ring_entries(entries: u32, max_bytes: u64) -> Result<(), RingError> {
    let max = (max_bytes / std::mem::size_of::<kvm_dirty_gfn>() as u64).min(u64::from(u32::MAX));
    let max = max as u32;
    if !entries.is_power_of_two() || entries < MIN_RING_ENTRIES || entries > max {
        return Err(RingError::Size {
            entries,
            min: MIN_RING_ENTRIES,
            max,
        });
    }
    Ok(())
}

/// Consecutive `KVM_RESET_DIRTY_RINGS` calls that reset nothing while
/// entries are left before giving up.
const RESET_STALL_LIMIT: u32 = 100;

/// Blocks every blockable signal on this thread until dropped (then
/// restores the previous mask; a signal that arrived meanwhile is
/// delivered then).
struct SignalsBlocked {
    old: libc::sigset_t,
}

impl SignalsBlocked {
    fn new() -> SignalsBlocked {
        // SAFETY: sigset_t is plain data; sigfillset initialises `all`,
        // pthread_sigmask only writes `old`. Neither can fail with these
        // arguments (SIGKILL and SIGSTOP are silently left unblocked).
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
            SignalsBlocked { old }
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in new(); `old` is initialised.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// One vCPU's ring, mapped from its fd.
struct RingMap {
    ptr: *mut kvm_dirty_gfn,
    entries: u32,
}

impl RingMap {
    fn entry(&self, index: u32) -> *mut kvm_dirty_gfn {
        // `entries` is a power of two; the mask keeps the index in the ring.
        let i = (index & (self.entries - 1)) as usize;
        // SAFETY: i < entries, and the mapping holds `entries` entries.
        unsafe { self.ptr.add(i) }
    }
}

impl Drop for RingMap {
    fn drop(&mut self) {
        let len = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: ptr/len are exactly the mapping created in DirtyRing::new,
        // unmapped only here.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, len) };
    }
}

/// Pages harvested but not yet handed to a sync: one bitmap per region,
/// plus a summary bit per bitmap word, so handing them over costs time in
/// proportion to the pages dirtied, not to the size of guest memory.
struct Pending {
    pages: Vec<u64>,
    words: Vec<Vec<u64>>,
    summary: Vec<Vec<u64>>,
}

impl Pending {
    fn new(pages: impl Iterator<Item = u64>) -> Pending {
        let pages: Vec<u64> = pages.collect();
        let words: Vec<Vec<u64>> = pages
            .iter()
            .map(|p| vec![0u64; p.div_ceil(64) as usize])
            .collect();
        let summary = words
            .iter()
            .map(|w| vec![0u64; w.len().div_ceil(64)])
            .collect();
        Pending {
            pages,
            words,
            summary,
        }
    }

    fn set(&mut self, region: usize, page: u64) {
        if self.pages.get(region).is_none_or(|n| page >= *n) {
            return;
        }
        let w = (page / 64) as usize;
        if let Some(word) = self.words.get_mut(region).and_then(|r| r.get_mut(w)) {
            *word |= 1u64 << (page % 64);
            if let Some(s) = self.summary.get_mut(region).and_then(|r| r.get_mut(w / 64)) {
                *s |= 1u64 << (w % 64);
            }
        }
    }

    /// Empties the pending set, handing each page to `f(region, page)`.
    fn drain(&mut self, mut f: impl FnMut(usize, u64)) {
        for (r, (words, summary)) in self.words.iter_mut().zip(&mut self.summary).enumerate() {
            for (si, s) in summary.iter_mut().enumerate() {
                let mut sbits = std::mem::take(s);
                while sbits != 0 {
                    let w = si * 64 + sbits.trailing_zeros() as usize;
                    sbits &= sbits - 1;
                    let mut bits = words.get_mut(w).map_or(0, std::mem::take);
                    while bits != 0 {
                        f(r, w as u64 * 64 + u64::from(bits.trailing_zeros()));
                        bits &= bits - 1;
                    }
                }
            }
        }
    }
}

/// Harvest state, behind the ring's lock.
struct RingInner {
    /// Next entry to look at, per vCPU (free-running, like KVM's indices).
    next: Vec<u32>,
    /// Pages harvested but not yet handed to a sync.
    pending: Pending,
    /// Entries that named no page of guest memory since the last sync.
    invalid: u64,
    /// Entries marked harvested that `KVM_RESET_DIRTY_RINGS` has not reset
    /// yet (it failed, or stopped early): reset them on the next harvest
    /// even if that finds nothing new.
    unreset: u64,
    /// The pages of the entries taken by the harvest in progress (so they
    /// can be made sticky if their reset stops early).
    batch: Vec<(usize, u64)>,
    /// Pages whose write protection may have been lost (a reset that
    /// stopped early): reported dirty by every sync until tracking restarts.
    sticky: Vec<(usize, u64)>,
}

/// The dirty rings of a VM's vCPUs, harvested by the tracker's sync and by a
/// vCPU thread whose ring is full.
///
/// Memory ordering: an entry's `flags` is loaded with `Acquire` (so `slot`
/// and `offset` written by KVM before it set `DIRTY` are visible) and set to
/// `RESET` with `Release` after they were read (so KVM, which reads `flags`
/// with acquire in `KVM_RESET_DIRTY_RINGS`, never reuses an entry we are
/// still reading). That is the `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` contract;
/// on x86 the plain `KVM_CAP_DIRTY_LOG_RING` is the same in practice.
pub struct DirtyRing {
    vm: File,
    rings: Vec<RingMap>,
    /// (KVM slot id, pages) per region, in layout order.
    slots: Vec<(u32, u64)>,
    inner: Mutex<RingInner>,
    ring_full_exits: AtomicU64,
    ring_full_ns: AtomicU64,
    harvested: AtomicU64,
    early_resets: AtomicU64,
}

// SAFETY: the raw ring pointers are only dereferenced through atomics (flags)
// and volatile reads (slot, offset) while `inner` is locked; the mappings live
// as long as the DirtyRing.
unsafe impl Send for DirtyRing {}
// SAFETY: see Send; every access to the shared rings is under `inner`.
unsafe impl Sync for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of every vCPU in `vcpus` (each created after the VM
    /// enabled the ring with `entries` entries) over the VM's `slots`.
    pub fn new(
        vm: &VmFd,
        vcpus: &[VcpuFd],
        entries: u32,
        slots: &[Slot],
    ) -> Result<DirtyRing, RingError> {
        if !entries.is_power_of_two() || entries < MIN_RING_ENTRIES {
            return Err(RingError::Size {
                entries,
                min: MIN_RING_ENTRIES,
                max: entries.max(MIN_RING_ENTRIES),
            });
        }
        // SAFETY: dup of a valid fd we borrow; the result is checked and
        // then owned by the File.
        let fd = unsafe { libc::dup(vm.as_raw_fd()) };
        if fd < 0 {
            return Err(RingError::Dup(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let vm = unsafe { File::from_raw_fd(fd) };
        let len = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        let mut rings = Vec::with_capacity(vcpus.len());
        for (i, v) in vcpus.iter().enumerate() {
            // SAFETY: a shared read-write mapping of the vCPU fd at KVM's
            // documented ring offset; KVM checks the length against the ring
            // size. The result is checked before use.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    v.as_raw_fd(),
                    (KVM_DIRTY_LOG_PAGE_OFFSET as usize * HOST_PAGE) as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(RingError::Map {
                    vcpu: i,
                    source: std::io::Error::last_os_error(),
                });
            }
            rings.push(RingMap {
                ptr: p as *mut kvm_dirty_gfn,
                entries,
            });
        }
        let slots: Vec<(u32, u64)> = slots.iter().map(|s| (s.slot, s.size / 4096)).collect();
        let pending = Pending::new(slots.iter().map(|(_, pages)| *pages));
        Ok(DirtyRing {
            vm,
            inner: Mutex::new(RingInner {
                next: vec![0; rings.len()],
                pending,
                invalid: 0,
                unreset: 0,
                batch: Vec::new(),
                sticky: Vec::new(),
            }),
            rings,
            slots,
            ring_full_exits: AtomicU64::new(0),
            ring_full_ns: AtomicU64::new(0),
            harvested: AtomicU64::new(0),
            early_resets: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, RingInner> {
        // Poisoning only means a harvester panicked; the indices and bits
        // are plain data and stay usable (at worst one entry is seen twice).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Entries per vCPU ring.
    pub fn entries(&self) -> u32 {
        self.rings.first().map_or(0, |r| r.entries)
    }

    /// How many `KVM_EXIT_DIRTY_RING_FULL` exits the vCPUs handled.
    pub fn ring_full_exits(&self) -> u64 {
        self.ring_full_exits.load(Ordering::Relaxed)
    }

    /// Time the vCPU threads spent harvesting on ring-full exits (the
    /// guest's vCPU is stopped meanwhile).
    pub fn ring_full_time(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.ring_full_ns.load(Ordering::Relaxed))
    }

    /// How many `KVM_RESET_DIRTY_RINGS` calls stopped before resetting
    /// every harvested entry, or failed (see `DirtyRing::reset`; 0 unless
    /// a signal that cannot be blocked interrupted one).
    pub fn early_resets(&self) -> u64 {
        self.early_resets.load(Ordering::Relaxed)
    }

    /// How many ring entries were harvested in total.
    pub fn harvested(&self) -> u64 {
        self.harvested.load(Ordering::Relaxed)
    }

    /// Moves every filled entry of every ring into the pending bitmap, marks
    /// them harvested and lets KVM re-arm them. Returns the entries taken.
    fn harvest(&self, inner: &mut RingInner) -> Result<u64, RingError> {
        inner.batch.clear();
        let taken = collect(&self.rings, &self.slots, inner);
        self.harvested.fetch_add(taken, Ordering::Relaxed);
        inner.unreset += taken;
        self.reset(inner)?;
        Ok(taken)
    }

    /// `KVM_RESET_DIRTY_RINGS` until every entry marked harvested is reset.
    ///
    /// KVM stops a reset early when the calling thread has a signal pending
    /// and returns how many entries it did reset, not an error (measured on
    /// 6.18; see `tests/dirty_tracking.rs`,
    /// `a_signal_during_ring_reset_loses_nothing`). The entries it did not
    /// reach stay un-reset (their pages writable and unlogged), and the
    /// pages of the batch it was coalescing are taken off the ring without
    /// being write-protected again — a later write to them is never logged.
    /// Our threads do get signals (every pause kicks the vCPU threads,
    /// which harvest on ring-full exits), so every blockable signal is
    /// blocked for the duration of the ioctl (a kick arriving meanwhile is
    /// delivered right after, and still ends the next `KVM_RUN`). If a reset
    /// stops early anyway (a signal that cannot be blocked), the pages of
    /// this harvest become sticky — reported dirty by every sync until
    /// tracking restarts, so the final copy, made with the vCPUs paused,
    /// sends their last contents — and the reset is repeated. A failed
    /// reset makes them sticky too; EINTR is retried, any other error
    /// returned.
    fn reset(&self, inner: &mut RingInner) -> Result<(), RingError> {
        let mut stalls = 0;
        while inner.unreset > 0 {
            let ret = {
                let _blocked = SignalsBlocked::new();
                // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; the fd is
                // our dup of the VM fd.
                unsafe { ioctl(&self.vm, KVM_RESET_DIRTY_RINGS()) }
            };
            if ret < 0 {
                // Whatever KVM did before failing, the pages of this
                // harvest may have lost their protection.
                let e = std::io::Error::last_os_error();
                self.early_resets.fetch_add(1, Ordering::Relaxed);
                make_sticky(inner);
                if e.raw_os_error() == Some(libc::EINTR) {
                    after_reset(inner, 0, &mut stalls)?;
                    continue;
                }
                return Err(RingError::Reset(e));
            }
            let done = u64::try_from(ret).unwrap_or(0);
            if done < inner.unreset {
                self.early_resets.fetch_add(1, Ordering::Relaxed);
            }
            after_reset(inner, done, &mut stalls)?;
        }
        Ok(())
    }

    /// Called by a vCPU thread on `KVM_EXIT_DIRTY_RING_FULL`: harvests every
    /// ring into the pending bitmap (the next sync picks the pages up) so
    /// the vCPU can re-enter at once. Returns the entries taken.
    pub fn on_ring_full(&self) -> Result<u64, RingError> {
        let t0 = std::time::Instant::now();
        self.ring_full_exits.fetch_add(1, Ordering::Relaxed);
        let r = {
            let mut inner = self.lock();
            self.harvest(&mut inner)
        };
        let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.ring_full_ns.fetch_add(ns, Ordering::Relaxed);
        r
    }

    /// Harvests every ring and ORs all pages dirtied since the previous
    /// sync (including those harvested on ring-full exits) into `bitmap`.
    pub fn sync(&self, bitmap: &mut DirtyBitmap) -> Result<(), RingError> {
        let mut inner = self.lock();
        self.harvest(&mut inner)?;
        let invalid = std::mem::take(&mut inner.invalid);
        inner.pending.drain(|r, p| bitmap.set(r, p));
        for &(r, p) in &inner.sticky {
            bitmap.set(r, p);
        }
        if invalid > 0 {
            return Err(RingError::Invalid(invalid));
        }
        Ok(())
    }

    /// Harvests and throws away everything in the rings (when tracking
    /// starts or stops).
    pub fn discard(&self) -> Result<(), RingError> {
        let mut inner = self.lock();
        self.harvest(&mut inner)?;
        inner.invalid = 0;
        inner.pending.drain(|_, _| {});
        // Logging is turned off after a discard (stop) or was off before it
        // (start): turning it on again write-protects every page.
        inner.sticky.clear();
        Ok(())
    }
}

/// Accounts for a `KVM_RESET_DIRTY_RINGS` that reset `done` entries. If
/// it stopped before `inner.unreset` were reset, the pages of the harvest
/// in progress become sticky (see [`DirtyRing::reset`]); `stalls` counts
/// consecutive calls that reset nothing, and too many are an error.
fn after_reset(inner: &mut RingInner, done: u64, stalls: &mut u32) -> Result<(), RingError> {
    if done >= inner.unreset {
        inner.unreset = 0;
        return Ok(());
    }
    inner.unreset -= done;
    log::warn!(
        "dirty ring: KVM_RESET_DIRTY_RINGS stopped early ({done} reset, {} left); \
         {} pages will be reported dirty until tracking restarts",
        inner.unreset,
        inner.batch.len()
    );
    make_sticky(inner);
    *stalls = if done == 0 { *stalls + 1 } else { 0 };
    if *stalls >= RESET_STALL_LIMIT {
        return Err(RingError::ResetIncomplete(inner.unreset));
    }
    Ok(())
}

/// Moves the pages of the harvest in progress into the sticky set.
fn make_sticky(inner: &mut RingInner) {
    let batch = std::mem::take(&mut inner.batch);
    inner.sticky.extend(batch);
    inner.sticky.sort_unstable();
    inner.sticky.dedup();
}

/// Takes every filled entry of every ring (marking each harvested) into
/// `inner.pending`; entries naming no page of `slots` ((KVM slot id, pages)
/// per region) are counted in `inner.invalid`. Returns the entries taken.
fn collect(rings: &[RingMap], slots: &[(u32, u64)], inner: &mut RingInner) -> u64 {
    let mut taken = 0u64;
    for (ring, next) in rings.iter().zip(inner.next.iter_mut()) {
        // At most one lap: a ring never holds more than `entries`
        // un-reset entries, whatever the flags say.
        for _ in 0..ring.entries {
            let e = ring.entry(*next);
            // SAFETY: `e` points into the live mapping; `flags` is the
            // first u32 of the 16-byte-aligned entry, so it is aligned
            // for AtomicU32, and KVM only accesses it atomically too.
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).flags)) };
            if flags.load(Ordering::Acquire) & GFN_F_DIRTY == 0 {
                break;
            }
            // SAFETY: in-bounds reads of plain fields KVM wrote before
            // it released DIRTY; volatile because the memory is shared.
            let (slot, offset) = unsafe {
                (
                    std::ptr::read_volatile(std::ptr::addr_of!((*e).slot)),
                    std::ptr::read_volatile(std::ptr::addr_of!((*e).offset)),
                )
            };
            flags.store(GFN_F_RESET, Ordering::Release);
            *next = next.wrapping_add(1);
            taken += 1;
            // The slot field is (address space << 16) | slot id; we only
            // use address space 0 (no SMM), so any higher bit is invalid.
            let region = slots
                .iter()
                .position(|(id, pages)| slot == *id && offset < *pages);
            match region {
                Some(r) => {
                    inner.pending.set(r, offset);
                    inner.batch.push((r, offset));
                }
                None => {
                    log::error!(
                        "dirty ring: entry for slot {slot:#x} page {offset} is outside guest memory"
                    );
                    inner.invalid += 1;
                }
            }
        }
    }
    taken
}

/// The KVM dirty tracker over a VM's slots (slot `i` is the layout's region
/// `i`).
///
/// KVM's dirty log counts pages of 4 KiB on x86-64 (the only architecture
/// this crate supports), the engine's page. In manual-protect mode it is a
/// [`Rearm::BeforeRead`] tracker: `KVM_CLEAR_DIRTY_LOG` takes 64-page
/// blocks, so [`DirtyTracker::rearm`] rounds each range out to whole blocks
/// and masks the pages outside it; any range may be asked for.
pub struct KvmDirtyTracker<'a> {
    vm: &'a VmFd,
    slots: &'a [Slot],
    mode: DirtyMode,
    ring: Option<&'a DirtyRing>,
    active: bool,
    /// Per slot: dirty logging is on (see [`DirtyTracker::start_regions`]).
    on: Vec<bool>,
    scratch: Vec<u64>,
    /// Set when [`DirtyTracker::stop_migrated`] left logging on (see
    /// [`KvmDirtyTracker::with_left_on`]).
    left_on: Option<&'a AtomicBool>,
}

impl<'a> KvmDirtyTracker<'a> {
    /// A tracker (not yet started). `ring` is required in
    /// [`DirtyMode::Ring`] and ignored otherwise.
    pub fn new(
        vm: &'a VmFd,
        slots: &'a [Slot],
        mode: DirtyMode,
        ring: Option<&'a DirtyRing>,
    ) -> Self {
        KvmDirtyTracker {
            vm,
            slots,
            mode,
            ring,
            active: false,
            on: vec![false; slots.len()],
            scratch: Vec::new(),
            left_on: None,
        }
    }

    /// Lets [`DirtyTracker::stop_migrated`] leave dirty logging on, for the
    /// VM's teardown, and records that in `flag`: whoever runs the vCPUs
    /// again must first call [`turn_off_left_on`] with it (`KvmVm` does),
    /// and so does [`DirtyTracker::start`] here. Without a flag,
    /// `stop_migrated` turns logging off like `stop`.
    pub fn with_left_on(mut self, flag: &'a AtomicBool) -> Self {
        self.left_on = Some(flag);
        self
    }

    fn ring(&self) -> Result<Option<&'a DirtyRing>, VmError> {
        match (self.mode, self.ring) {
            (DirtyMode::Ring { .. }, None) => Err(VmError::DirtyLog(
                "dirty-ring mode without mapped rings".into(),
            )),
            (DirtyMode::Ring { .. }, Some(r)) => Ok(Some(r)),
            _ => Ok(None),
        }
    }

    /// Turns logging on or off for slot `i` (if it is not already).
    fn set_slot(&mut self, i: usize, on: bool) -> Result<(), VmError> {
        match (self.slots.get(i), self.on.get(i)) {
            (Some(s), Some(now)) if *now != on => {
                set_slot_logging(self.vm, s, on)?;
                self.on[i] = on;
                Ok(())
            }
            (Some(_), Some(_)) => Ok(()),
            _ => Err(VmError::DirtyLog(format!("no region {i}"))),
        }
    }
}

/// Turns dirty logging on or off for every slot.
fn set_logging(vm: &VmFd, slots: &[Slot], on: bool) -> Result<(), VmError> {
    for s in slots {
        set_slot_logging(vm, s, on)?;
    }
    Ok(())
}

/// Turns dirty logging on or off for one slot (re-registering it with the
/// flags it has is a no-op in KVM).
fn set_slot_logging(vm: &VmFd, s: &Slot, on: bool) -> Result<(), VmError> {
    let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
    let t0 = std::time::Instant::now();
    let r = s.register(vm, flags);
    log::debug!(
        "dirty logging {} for slot {} ({} MiB) in {:.2} ms",
        if on { "on" } else { "off" },
        s.slot,
        s.size >> 20,
        t0.elapsed().as_secs_f64() * 1000.0
    );
    r.map_err(|e| {
        let on = if on { "on" } else { "off" };
        let context = format!("KVM_SET_USER_MEMORY_REGION slot {} (logging {on})", s.slot);
        VmError::failed(VmOp::DirtyLog, context, e)
    })
}

/// Turns dirty logging off for `slots` (and empties the `ring`) if a
/// completed migration left it on ([`DirtyTracker::stop_migrated`] of a
/// tracker made [`KvmDirtyTracker::with_left_on`] `flag`), so that the VM
/// runs, or a new tracker starts, as before the migration. Nothing to do
/// (and no ioctl) otherwise; on error the flag stays set.
pub fn turn_off_left_on(
    vm: &VmFd,
    slots: &[Slot],
    ring: Option<&DirtyRing>,
    flag: &AtomicBool,
) -> Result<(), VmError> {
    if !flag.load(Ordering::SeqCst) {
        return Ok(());
    }
    set_logging(vm, slots, false)?;
    if let Some(r) = ring {
        r.discard()?;
    }
    flag.store(false, Ordering::SeqCst);
    log::info!("dirty logging left on by a completed migration: turned off");
    Ok(())
}

impl DirtyTracker for KvmDirtyTracker<'_> {
    fn start(&mut self) -> Result<(), VmError> {
        self.start_regions(&vec![true; self.slots.len()])
    }

    /// In manual-protect mode only the slots marked; the others start with
    /// [`DirtyTracker::start_region`]. The ring and the classic log track
    /// every slot (the engine asks this only of `BeforeRead` trackers).
    fn start_regions(&mut self, regions: &[bool]) -> Result<(), VmError> {
        if let Some(flag) = self.left_on {
            // Left on by a completed migration: off first, so that turning
            // it on starts from a fresh log (every page dirty again in
            // manual-protect mode).
            turn_off_left_on(self.vm, self.slots, self.ring, flag)?;
        }
        if let Some(r) = self.ring()? {
            // Leftovers of an earlier session are not news.
            r.discard()?;
        }
        self.active = true;
        let manual = self.mode == DirtyMode::ManualProtect;
        for i in 0..self.slots.len() {
            if !manual || regions.get(i).copied().unwrap_or(true) {
                self.set_slot(i, true)?;
            }
        }
        // In manual-protect mode with KVM_DIRTY_LOG_INITIALLY_SET every page
        // starts dirty and unprotected; the engine clears each chunk before
        // reading it and never clears memory the guest never populated (it
        // stays reported dirty: livemig's `source/unarmed.rs`), so no extra
        // work here.
        Ok(())
    }

    fn start_region(&mut self, region: usize) -> Result<(), VmError> {
        if !self.active {
            return Err(VmError::DirtyLog(format!(
                "start_region {region} before start"
            )));
        }
        self.set_slot(region, true)
    }

    fn sync(&mut self, bitmap: &mut DirtyBitmap) -> Result<(), VmError> {
        if let Some(r) = self.ring()? {
            return Ok(r.sync(bitmap)?);
        }
        // A slot whose logging is off has no log (and nothing to report).
        let on = &self.on;
        for (i, s) in self.slots.iter().enumerate().filter(|(i, _)| on[*i]) {
            let words = self
                .vm
                .get_dirty_log(s.slot, s.size as usize)
                .map_err(|e| {
                    VmError::failed(
                        VmOp::DirtyLog,
                        format!("KVM_GET_DIRTY_LOG slot {}", s.slot),
                        e,
                    )
                })?;
            bitmap.or_words(i, &words);
        }
        Ok(())
    }

    fn rearm_mode(&self) -> Rearm {
        if self.mode == DirtyMode::ManualProtect {
            Rearm::BeforeRead
        } else {
            Rearm::OnSync
        }
    }

    fn rearm(
        &mut self,
        region: usize,
        first_page: u64,
        npages: u64,
        bitmap: &DirtyBitmap,
    ) -> Result<(), VmError> {
        if self.mode != DirtyMode::ManualProtect {
            return Ok(());
        }
        let slot = self
            .slots
            .get(region)
            .ok_or_else(|| VmError::DirtyLog(format!("rearm: no region {region}")))?;
        let slot_pages = slot.size / 4096;
        let end = first_page.saturating_add(npages).min(slot_pages);
        if first_page >= end {
            return Ok(());
        }
        if !self.on[region] {
            return Err(VmError::DirtyLog(format!(
                "rearm of region {region}, whose tracking has not started"
            )));
        }
        // KVM_CLEAR_DIRTY_LOG takes a 64-page-aligned first page and a
        // multiple of 64 pages (unless the range ends the slot): round the
        // range out to whole bitmap words and mask the pages outside
        // `first_page..end` out of them, so exactly the pages asked for are
        // re-armed.
        let (w0, w1) = ((first_page / 64) as usize, end.div_ceil(64) as usize);
        let words = bitmap.words(region);
        self.scratch.clear();
        self.scratch
            .extend_from_slice(words.get(w0..w1.min(words.len())).unwrap_or(&[]));
        self.scratch.resize(w1 - w0, 0);
        if let Some(w) = self.scratch.first_mut() {
            *w &= u64::MAX << (first_page % 64);
        }
        if let Some(w) = self.scratch.last_mut().filter(|_| end % 64 != 0) {
            *w &= (1u64 << (end % 64)) - 1;
        }
        if self.scratch.iter().all(|w| *w == 0) {
            return Ok(());
        }
        let first_page = w0 as u64 * 64;
        let num_pages = (w1 as u64 * 64).min(slot_pages) - first_page;
        let mut arg = kvm_clear_dirty_log {
            slot: slot.slot,
            num_pages: num_pages as u32,
            first_page,
            ..Default::default()
        };
        arg.__bindgen_anon_1.dirty_bitmap = self.scratch.as_mut_ptr() as *mut libc::c_void;
        // SAFETY: `arg` points at `scratch`, which holds num_pages bits
        // (rounded up to whole words) and lives across the call; KVM only
        // reads it.
        let ret = unsafe { ioctl_with_ref(self.vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
        if ret < 0 {
            return Err(VmError::failed(
                VmOp::DirtyLog,
                format!(
                    "KVM_CLEAR_DIRTY_LOG slot {} pages {first_page}+{num_pages}",
                    slot.slot
                ),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), VmError> {
        if self.active {
            self.active = false;
            for i in 0..self.slots.len() {
                self.set_slot(i, false)?;
            }
            if let Some(r) = self.ring()? {
                // Drain what was pushed before logging went off, so no vCPU
                // finds its ring full later.
                r.discard()?;
            }
        }
        Ok(())
    }

    /// With a flag ([`KvmDirtyTracker::with_left_on`]): leaves logging
    /// on and sets the flag (turning it off walks the whole slot in KVM:
    /// 47 ms for 61 GiB on this project's shadow-paging host, for a VM that
    /// never runs again); without one, like `stop`.
    fn stop_migrated(&mut self) -> Result<(), VmError> {
        match self.left_on {
            Some(flag) if self.active => {
                self.active = false;
                flag.store(true, Ordering::SeqCst);
                Ok(())
            }
            _ => self.stop(),
        }
    }

    fn describe(&self) -> String {
        match self.mode {
            DirtyMode::Classic => "get-dirty-log".into(),
            DirtyMode::ManualProtect => "manual-protect, chunked clear".into(),
            DirtyMode::Ring { entries } => format!("dirty ring, {entries} entries per vCPU"),
        }
    }
}

impl Drop for KvmDirtyTracker<'_> {
    fn drop(&mut self) {
        if self.active {
            if let Err(e) = self.stop() {
                log::error!("turning dirty logging off: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring failure reaches the engine as a `VmError` whose source is the
    /// `RingError` itself (issue 14: sources kept, not flattened).
    #[test]
    fn a_ring_error_keeps_its_source() {
        let e: VmError = RingError::Reset(std::io::Error::from_raw_os_error(libc::EFAULT)).into();
        let source = std::error::Error::source(&e).expect("the VmError has a source");
        let ring = source
            .downcast_ref::<RingError>()
            .expect("the source is the RingError");
        let io = std::error::Error::source(ring).expect("the RingError keeps the OS error");
        assert_eq!(
            io.downcast_ref::<std::io::Error>()
                .and_then(|e| e.raw_os_error()),
            Some(libc::EFAULT)
        );
    }

    /// A ring in anonymous memory (RingMap's Drop unmaps it).
    fn fake_ring(entries: u32) -> RingMap {
        let len = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: a fresh private anonymous mapping, checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        RingMap {
            ptr: p as *mut kvm_dirty_gfn,
            entries,
        }
    }

    fn push(ring: &RingMap, index: u32, slot: u32, offset: u64) {
        // SAFETY: in-bounds entry of the test's own mapping.
        unsafe {
            *ring.entry(index) = kvm_dirty_gfn {
                flags: GFN_F_DIRTY,
                slot,
                offset,
            }
        };
    }

    #[test]
    fn entries_outside_guest_memory_are_counted_not_used() {
        let ring = fake_ring(256);
        let slots = [(0u32, 100u64), (1, 50)];
        push(&ring, 0, 0, 5);
        push(&ring, 1, 1, 3);
        push(&ring, 2, 7, 0); // no such slot
        push(&ring, 3, 0, 100); // past the slot's end
        push(&ring, 4, 1 << 16, 2); // address space 1 (SMM): not ours
        push(&ring, 5, 1, u64::MAX);
        push(&ring, 6, 0, 99);
        let rings = [ring];
        let mut inner = inner_for(&slots);
        assert_eq!(collect(&rings, &slots, &mut inner), 7);
        assert_eq!(inner.invalid, 4);
        assert_eq!(inner.next, vec![7]);
        for i in 0..7 {
            // SAFETY: in-bounds entry of the test's own mapping.
            assert_eq!(unsafe { (*rings[0].entry(i)).flags }, GFN_F_RESET);
        }
        let mut got = Vec::new();
        inner.pending.drain(|r, p| got.push((r, p)));
        assert_eq!(got, vec![(0, 5), (0, 99), (1, 3)]);
        // Nothing new: nothing taken, harvested entries are not re-read.
        assert_eq!(collect(&rings, &slots, &mut inner), 0);
        // The free-running index wraps around the ring.
        inner.next[0] = u32::MAX;
        push(&rings[0], u32::MAX, 0, 1);
        push(&rings[0], 0, 0, 2);
        assert_eq!(collect(&rings, &slots, &mut inner), 2);
        assert_eq!(inner.next, vec![1]);
    }

    fn inner_for(slots: &[(u32, u64)]) -> RingInner {
        RingInner {
            next: vec![0],
            pending: Pending::new(slots.iter().map(|s| s.1)),
            invalid: 0,
            unreset: 0,
            batch: Vec::new(),
            sticky: Vec::new(),
        }
    }

    #[test]
    fn a_reset_that_stops_early_makes_the_harvest_sticky() {
        let ring = fake_ring(256);
        let slots = [(0u32, 100u64), (1, 50)];
        push(&ring, 0, 0, 5);
        push(&ring, 1, 1, 3);
        push(&ring, 2, 0, 7);
        let rings = [ring];
        let mut inner = inner_for(&slots);
        inner.unreset = collect(&rings, &slots, &mut inner);
        assert_eq!(inner.batch, vec![(0, 5), (1, 3), (0, 7)]);
        let mut stalls = 0;
        // The whole batch reset: nothing sticky.
        let mut full = inner_for(&slots);
        full.unreset = 3;
        full.batch = inner.batch.clone();
        after_reset(&mut full, 3, &mut stalls).unwrap();
        assert_eq!((full.unreset, full.sticky.len()), (0, 0));
        // One of three reset: the rest is owed, and every page of the
        // batch is sticky (KVM may have dropped any of them unprotected).
        after_reset(&mut inner, 1, &mut stalls).unwrap();
        assert_eq!(inner.unreset, 2);
        assert_eq!(inner.sticky, vec![(0, 5), (0, 7), (1, 3)]);
        // Resetting nothing, again and again: an error, not a spin.
        let mut r = Ok(());
        for _ in 0..RESET_STALL_LIMIT {
            r = after_reset(&mut inner, 0, &mut stalls);
            if r.is_err() {
                break;
            }
        }
        assert!(matches!(r, Err(RingError::ResetIncomplete(2))), "{r:?}");
        // The harvested pages are pending for the next sync as well.
        let mut got = Vec::new();
        inner.pending.drain(|r, p| got.push((r, p)));
        assert_eq!(got, vec![(0, 5), (0, 7), (1, 3)]);
    }

    #[test]
    fn pending_hands_over_exactly_what_was_set_once() {
        let mut p = Pending::new([100u64, 70_000].into_iter());
        let set = [
            (0, 0),
            (0, 63),
            (0, 64),
            (0, 99),
            (1, 4095),
            (1, 4096),
            (1, 69_999),
        ];
        for (r, pg) in set {
            p.set(r, pg);
            p.set(r, pg);
        }
        // Out of range: ignored, never a panic.
        p.set(0, 100);
        p.set(2, 0);
        p.set(1, 1 << 40);
        let mut got = Vec::new();
        p.drain(|r, pg| got.push((r, pg)));
        assert_eq!(got, set);
        let mut again = Vec::new();
        p.drain(|r, pg| again.push((r, pg)));
        assert!(again.is_empty());
    }

    #[test]
    fn ring_sizes_follow_kvm_rules() {
        assert!(check_ring_entries(4096, 1 << 20).is_ok());
        assert!(check_ring_entries(65536, 1 << 20).is_ok());
        assert!(check_ring_entries(256, 1 << 20).is_ok());
        for bad in [0, 128, 255, 1000, 131_072] {
            assert!(check_ring_entries(bad, 1 << 20).is_err(), "{bad}");
        }
    }
}
