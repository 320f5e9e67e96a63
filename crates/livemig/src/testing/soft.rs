//! A software VM: guest memory plus writer threads, with dirty tracking
//! through bitmaps. It implements [`SourceVm`] and [`DestinationVm`], so the
//! engine can be exercised (and embedded, for experiments) without KVM.
//!
//! Writers play two roles: "guest" writers store straight into the host
//! mapping and record the page in the VM's own dirty log (what KVM's dirty
//! log does for a real guest), and "device" writers write the way a VMM's
//! device emulation does: through vm-memory, whose
//! [`vm_memory::bitmap::AtomicBitmap`] records the page, when the memory is
//! vm-memory's ([`SoftVm::with_memory`]); into the host mapping, recorded
//! in the soft VM's own device log, for any other [`GuestMemory`]
//! ([`SoftVm::with_guest_memory`]). Either way the engine learns of them
//! only through [`GuestMemory::take_vmm_dirty`], and must merge them or lose
//! writes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress};

use crate::bitmap::DirtyBitmap;
use crate::memory::{allocate, GuestMemory, GuestRam, HostRegion, MemoryLayout, PAGE_SIZE};
use crate::state::{Section, StateError, StateReader, StateWriter};
use crate::vm::{
    DestinationVm, DirtyTracker, Rearm, SourceVm, VcpuThrottle, VmDescription, VmError,
};

/// How the software VM's writers behave.
#[derive(Debug, Clone)]
pub struct SoftConfig {
    /// Threads writing like a guest (dirty log).
    pub guest_writers: usize,
    /// Threads writing like a device (through vm-memory).
    pub device_writers: usize,
    /// Pages each writer dirties per millisecond (0 = as fast as possible).
    pub pages_per_ms: u64,
}

impl SoftConfig {
    /// No writers at all: the memory changes only when the test changes it.
    pub fn idle() -> Self {
        SoftConfig {
            guest_writers: 0,
            device_writers: 0,
            pages_per_ms: 0,
        }
    }

    /// One guest writer and one device writer, each dirtying 20 pages per
    /// millisecond.
    pub fn busy() -> Self {
        SoftConfig {
            guest_writers: 1,
            device_writers: 1,
            pages_per_ms: 20,
        }
    }
}

impl Default for SoftConfig {
    fn default() -> Self {
        SoftConfig {
            guest_writers: 1,
            device_writers: 1,
            pages_per_ms: 50,
        }
    }
}

/// Which dirty-log semantics the software VM's "hypervisor" models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SoftTracking {
    /// A bitmap harvested and re-armed in one step (KVM's classic
    /// `KVM_GET_DIRTY_LOG`): every write after `start` is logged.
    #[default]
    Bitmap,
    /// KVM's manual-protect mode with `KVM_DIRTY_LOG_INITIALLY_SET`,
    /// exactly: at `start` every page's dirty bit is set and *no* page is
    /// write-protected, so writes go unrecorded until the engine clears (and
    /// thereby write-protects) the page; `sync` reads the bits without
    /// clearing them; a write to a protected page sets its bit and lifts the
    /// protection (the write fault). The check-and-store of a write and a
    /// `rearm` exclude each other, as KVM's `mmu_lock` makes them.
    ManualProtect,
}

struct Ctl {
    run: bool,
    exit: bool,
    parked: usize,
}

struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    /// The "hypervisor" dirty log, one AtomicBitmap per region.
    log: Vec<AtomicBitmap>,
    /// Manual-protect model: the write-protected pages, one bitmap per
    /// region (unused in [`SoftTracking::Bitmap`]).
    protected: Vec<AtomicBitmap>,
    /// Manual-protect model: writers hold it shared around check-and-store,
    /// `rearm` holds it exclusively (KVM's mmu_lock).
    mmu: RwLock<()>,
    tracking: SoftTracking,
    logging: AtomicBool,
    writes: AtomicU64,
    /// Manual-protect model: pages re-armed so far (bits cleared).
    rearmed: AtomicU64,
    /// Writer PRNG states, part of the migrated state.
    seeds: Mutex<Vec<u64>>,
}

/// The soft VM's memory: vm-memory's, or any other [`GuestMemory`] plus
/// the soft VM's own log of its device writes.
struct SoftMemory {
    inner: Inner,
    /// Host address of each region's first byte (the mappings live as long
    /// as `inner`).
    bases: Vec<usize>,
    /// [`Inner::Other`]: the device writers' pages, one bitmap (4 KiB
    /// pages) per region.
    device_log: Vec<AtomicBitmap>,
}

enum Inner {
    VmMemory(GuestRam),
    Other(Box<dyn GuestMemory>),
}

impl SoftMemory {
    fn dyn_mem(&self) -> &dyn GuestMemory {
        match &self.inner {
            Inner::VmMemory(m) => m,
            Inner::Other(m) => &**m,
        }
    }

    /// A device (VMM) write of `data` at byte `offset` of `region`: through
    /// vm-memory, or into the mapping and the device log.
    fn device_write(&self, layout: &MemoryLayout, region: usize, offset: u64, data: &[u8]) {
        let Some(r) = layout.regions().get(region) else {
            return;
        };
        if offset.saturating_add(data.len() as u64) > r.size {
            return;
        }
        match &self.inner {
            Inner::VmMemory(m) => {
                let _ = m.write_slice(data, GuestAddress(r.guest_addr + offset));
            }
            Inner::Other(_) => {
                let dst = (self.bases[region] + offset as usize) as *mut u8;
                // SAFETY: offset + len <= the region's size (checked above),
                // inside a mapping the GuestMemory keeps mapped while `self`
                // lives; racing writers store whole words of their own.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
                self.device_log[region].set_addr_range(offset as usize, data.len());
            }
        }
    }
}

// SAFETY: delegates to the wrapped memory, which made the same promises.
unsafe impl GuestMemory for SoftMemory {
    fn regions(&self) -> Vec<HostRegion<'_>> {
        self.dyn_mem().regions()
    }

    fn take_vmm_dirty(&self, region: usize, words: &mut [u64]) {
        self.dyn_mem().take_vmm_dirty(region, words);
        if let Some(log) = self.device_log.get(region) {
            for (w, b) in words.iter_mut().zip(log.get_and_reset()) {
                *w |= b;
            }
        }
    }
}

/// A software VM.
pub struct SoftVm {
    memory: Arc<SoftMemory>,
    layout: MemoryLayout,
    shared: Arc<Shared>,
    writers: Vec<JoinHandle<()>>,
    nwriters: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SoftVm {
    /// A paused software VM with `layout` (fresh private anonymous memory)
    /// and writers per `config`, tracked like KVM's classic dirty log.
    pub fn new(layout: &MemoryLayout, config: &SoftConfig) -> Result<Self, VmError> {
        let memory = allocate(layout).map_err(|e| VmError::Create(e.to_string()))?;
        Self::with_memory(memory, config, SoftTracking::Bitmap)
    }

    /// A paused software VM over vm-memory `memory` (any backing:
    /// anonymous, memfd, a file), with writers per `config` and dirty
    /// tracking per `tracking`. Device writers write through vm-memory.
    pub fn with_memory(
        memory: GuestRam,
        config: &SoftConfig,
        tracking: SoftTracking,
    ) -> Result<Self, VmError> {
        Self::build(Inner::VmMemory(memory), config, tracking)
    }

    /// A paused software VM over any [`GuestMemory`] (for example a VMM's
    /// own mapping, without vm-memory). Device writers store into the
    /// mapping and record the page in the soft VM's own device log, which
    /// the soft VM's [`GuestMemory::take_vmm_dirty`] adds to whatever
    /// `memory` itself reports.
    pub fn with_guest_memory(
        memory: Box<dyn GuestMemory>,
        config: &SoftConfig,
        tracking: SoftTracking,
    ) -> Result<Self, VmError> {
        Self::build(Inner::Other(memory), config, tracking)
    }

    /// The layout of `inner` and each region's host address (refused
    /// unless 4 KiB aligned).
    fn describe_memory(inner: &Inner) -> Result<(MemoryLayout, Vec<usize>), VmError> {
        let create = |e: String| VmError::Create(e);
        let mem: &dyn GuestMemory = match inner {
            Inner::VmMemory(m) => m,
            Inner::Other(m) => &**m,
        };
        let regions = mem.regions();
        if let Some(r) = regions
            .iter()
            .find(|r| !(r.host as u64).is_multiple_of(PAGE_SIZE))
        {
            return Err(create(format!(
                "host address {:p} is not 4 KiB aligned",
                r.host
            )));
        }
        let bases: Vec<usize> = regions.iter().map(|r| r.host as usize).collect();
        let layout = MemoryLayout::of(mem).map_err(|e| create(e.to_string()))?;
        Ok((layout, bases))
    }

    fn build(inner: Inner, config: &SoftConfig, tracking: SoftTracking) -> Result<Self, VmError> {
        let (layout, bases) = Self::describe_memory(&inner)?;
        let layout = &layout;
        let bitmaps = || -> Vec<AtomicBitmap> {
            layout
                .regions()
                .iter()
                .map(|r| {
                    AtomicBitmap::new(
                        r.size as usize,
                        std::num::NonZeroUsize::MIN.saturating_add(PAGE_SIZE as usize - 1),
                    )
                })
                .collect()
        };
        let log = bitmaps();
        let device_log = match inner {
            Inner::VmMemory(_) => Vec::new(),
            Inner::Other(_) => bitmaps(),
        };
        let memory = Arc::new(SoftMemory {
            inner,
            bases,
            device_log,
        });
        let n = config.guest_writers + config.device_writers;
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                run: false,
                exit: false,
                parked: 0,
            }),
            cv: Condvar::new(),
            log,
            protected: bitmaps(),
            mmu: RwLock::new(()),
            tracking,
            logging: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            rearmed: AtomicU64::new(0),
            seeds: Mutex::new(
                (0..n as u64)
                    .map(|i| 0x9E37_79B9_7F4A_7C15 ^ (i + 1))
                    .collect(),
            ),
        });
        let mut writers = Vec::new();
        for i in 0..n {
            let device = i >= config.guest_writers;
            let shared = shared.clone();
            let memory = memory.clone();
            let layout = layout.clone();
            let rate = config.pages_per_ms;
            writers.push(std::thread::spawn(move || {
                writer(i, device, rate, &memory, &layout, &shared)
            }));
        }
        let vm = SoftVm {
            memory,
            layout: layout.clone(),
            shared,
            writers,
            nwriters: n,
        };
        vm.wait_parked();
        Ok(vm)
    }

    fn wait_parked(&self) {
        let mut c = lock(&self.shared.ctl);
        while c.parked < self.nwriters {
            c = self.shared.cv.wait(c).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Starts (or continues) the writers.
    pub fn start(&self) {
        lock(&self.shared.ctl).run = true;
        self.shared.cv.notify_all();
    }

    /// Stops the writers and waits until they are parked.
    pub fn stop(&self) {
        lock(&self.shared.ctl).run = false;
        self.wait_parked();
    }

    /// Total writes so far (all writers).
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::SeqCst)
    }

    /// Pages the engine re-armed so far ([`SoftTracking::ManualProtect`]:
    /// each page whose bit a `rearm` cleared, as `KVM_CLEAR_DIRTY_LOG`
    /// write-protects it; 0 in [`SoftTracking::Bitmap`]).
    pub fn rearmed_pages(&self) -> u64 {
        self.shared.rearmed.load(Ordering::SeqCst)
    }

    /// Whether the writers write again within `limit` (polled every 5 ms):
    /// true if they run, false if no write came by `limit`.
    pub fn writes_within(&self, limit: Duration) -> bool {
        let w = self.writes();
        let deadline = Instant::now() + limit;
        while self.writes() == w {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Whether the writers make no write at all during `d` (this call
    /// sleeps `d`): true if they are stopped.
    pub fn writes_none_during(&self, d: Duration) -> bool {
        let w = self.writes();
        std::thread::sleep(d);
        self.writes() == w
    }

    /// The guest memory, if it is vm-memory's ([`SoftVm::with_memory`]).
    pub fn ram(&self) -> Option<&GuestRam> {
        match &self.memory.inner {
            Inner::VmMemory(m) => Some(m),
            Inner::Other(_) => None,
        }
    }

    /// The layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// Stores `value` at guest address `addr` (8-byte aligned) the way a
    /// vCPU would: straight into the host mapping, logged by the VM's own
    /// dirty log per its [`SoftTracking`] mode (not by vm-memory's bitmap).
    /// For tests that need the guest to write known pages, for example
    /// [`check_dirty_tracker`](super::dirty::check_dirty_tracker).
    pub fn write_as_guest(&self, addr: u64, value: u64) -> Result<(), VmError> {
        let page = addr - addr % PAGE_SIZE;
        let (region, _) = self
            .layout
            .locate(page, 1)
            .filter(|_| addr.is_multiple_of(8))
            .ok_or_else(|| VmError::DirtyLog(format!("no aligned guest word at {addr:#x}")))?;
        let offset = addr - self.layout.regions()[region].guest_addr;
        let host = self.memory.bases[region] + offset as usize;
        guest_store(&self.shared, region, offset, host as *mut u64, value);
        Ok(())
    }

    /// Fills every page with non-zero bytes derived from `seed` (so that a
    /// migration has real data to move), as device writes (through
    /// vm-memory, or recorded in the device log).
    pub fn fill(&self, seed: u64) {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for (i, r) in self.layout.regions().iter().enumerate() {
            for p in 0..r.pages() {
                let v =
                    (seed ^ (r.guest_addr + p * PAGE_SIZE)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                for (i, c) in page.chunks_exact_mut(8).enumerate() {
                    c.copy_from_slice(&(v.wrapping_add(i as u64)).to_le_bytes());
                }
                self.memory
                    .device_write(&self.layout, i, p * PAGE_SIZE, &page);
            }
        }
    }

    /// A copy of all guest memory (for comparisons in tests).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.layout.total_bytes() as usize);
        for (r, base) in self.layout.regions().iter().zip(&self.memory.bases) {
            let start = out.len();
            out.resize(start + r.size as usize, 0);
            // SAFETY: the region is `size` bytes mapped at `base` while
            // the memory lives (the GuestMemory contract); `out` has room.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    *base as *const u8,
                    out[start..].as_mut_ptr(),
                    r.size as usize,
                )
            };
        }
        out
    }
}

impl Drop for SoftVm {
    fn drop(&mut self) {
        lock(&self.shared.ctl).exit = true;
        self.shared.cv.notify_all();
        for w in self.writers.drain(..) {
            let _ = w.join();
        }
    }
}

fn writer(
    index: usize,
    device: bool,
    pages_per_ms: u64,
    memory: &SoftMemory,
    layout: &MemoryLayout,
    shared: &Shared,
) {
    let total_pages = layout.total_pages().max(1);
    let mut burst = 0u64;
    loop {
        {
            let mut c = lock(&shared.ctl);
            if !c.run || c.exit {
                c.parked += 1;
                shared.cv.notify_all();
                while !c.run && !c.exit {
                    c = shared.cv.wait(c).unwrap_or_else(|e| e.into_inner());
                }
                c.parked -= 1;
                if c.exit {
                    return;
                }
            }
        }
        let seed = {
            let mut s = lock(&shared.seeds);
            let Some(x) = s.get_mut(index) else { return };
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            *x
        };
        // Pick a page, then a word in it; the value encodes the writer and seed.
        let mut page = seed % total_pages;
        let mut region = 0;
        for (i, r) in layout.regions().iter().enumerate() {
            if page < r.pages() {
                region = i;
                break;
            }
            page -= r.pages();
        }
        let r = layout.regions()[region];
        let offset = page * PAGE_SIZE + ((seed >> 40) % (PAGE_SIZE / 8)) * 8;
        if device {
            // As the VMM: vm-memory's AtomicBitmap or the device log
            // records the page.
            memory.device_write(layout, region, offset, &seed.to_le_bytes());
        } else if offset < r.size {
            let host = memory.bases[region] + offset as usize;
            guest_store(shared, region, offset, host as *mut u64, seed);
        }
        shared.writes.fetch_add(1, Ordering::SeqCst);
        burst += 1;
        if pages_per_ms > 0 && burst >= pages_per_ms {
            burst = 0;
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A guest store of `value` at `host` (byte `offset` of `region`), logged
/// the way the VM's tracking mode logs it.
fn guest_store(shared: &Shared, region: usize, offset: u64, host: *mut u64, value: u64) {
    let store = || {
        // SAFETY: the callers pass a host address inside region `region`
        // (offset < size), 8-byte aligned, of a mapping that outlives them.
        unsafe { std::ptr::write_volatile(host, value) }
    };
    match shared.tracking {
        SoftTracking::Bitmap => {
            store();
            if shared.logging.load(Ordering::SeqCst) {
                shared.log[region].set_addr_range(offset as usize, 8);
            }
        }
        SoftTracking::ManualProtect => {
            let _mmu = shared.mmu.read().unwrap_or_else(|e| e.into_inner());
            let prot = &shared.protected[region];
            if shared.logging.load(Ordering::SeqCst) && prot.is_addr_set(offset as usize) {
                // The write fault: log the page, lift the protection.
                shared.log[region].set_addr_range(offset as usize, 8);
                prot.reset_addr_range(offset as usize, 8);
            }
            store();
        }
    }
}

/// The software VM's dirty log.
struct SoftTracker<'a> {
    vm: &'a SoftVm,
}

impl SoftTracker<'_> {
    fn manual(&self) -> bool {
        self.vm.shared.tracking == SoftTracking::ManualProtect
    }
}

impl DirtyTracker for SoftTracker<'_> {
    fn start(&mut self) -> Result<(), VmError> {
        let sh = &self.vm.shared;
        let _mmu = sh.mmu.write().unwrap_or_else(|e| e.into_inner());
        for ((l, p), r) in sh
            .log
            .iter()
            .zip(&sh.protected)
            .zip(self.vm.layout.regions())
        {
            p.reset();
            if self.manual() {
                // INITIALLY_SET: every page dirty, none protected.
                l.set_addr_range(0, r.size as usize);
            } else {
                l.reset();
            }
        }
        sh.logging.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn sync(&mut self, bitmap: &mut DirtyBitmap) -> Result<(), VmError> {
        for (i, l) in self.vm.shared.log.iter().enumerate() {
            if self.manual() {
                // Manual-protect: reading does not clear (KVM_GET_DIRTY_LOG).
                let words: Vec<u64> = (0..bitmap.region_pages(i))
                    .step_by(64)
                    .map(|p| {
                        (0..64u64)
                            .filter(|b| l.is_bit_set((p + b) as usize))
                            .fold(0, |w, b| w | 1 << b)
                    })
                    .collect();
                bitmap.or_words(i, &words);
            } else {
                bitmap.or_words(i, &l.get_and_reset());
            }
        }
        Ok(())
    }

    fn rearm_mode(&self) -> Rearm {
        if self.manual() {
            Rearm::BeforeRead
        } else {
            // Harvesting with get_and_reset re-arms the log already.
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
        if !self.manual() {
            return Ok(());
        }
        let sh = &self.vm.shared;
        let (Some(log), Some(prot)) = (sh.log.get(region), sh.protected.get(region)) else {
            return Err(VmError::DirtyLog(format!("clear: no region {region}")));
        };
        let _mmu = sh.mmu.write().unwrap_or_else(|e| e.into_inner());
        let end = (first_page + npages).min(bitmap.region_pages(region));
        let mut n = 0;
        for p in first_page..end {
            if bitmap.is_set(region, p) {
                // KVM_CLEAR_DIRTY_LOG: clear the bit, write-protect the page.
                let addr = (p * PAGE_SIZE) as usize;
                log.reset_addr_range(addr, 1);
                prot.set_addr_range(addr, 1);
                n += 1;
            }
        }
        sh.rearmed.fetch_add(n, Ordering::SeqCst);
        Ok(())
    }

    fn stop(&mut self) -> Result<(), VmError> {
        self.vm.shared.logging.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn describe(&self) -> String {
        match self.vm.shared.tracking {
            SoftTracking::Bitmap => "software bitmap".into(),
            SoftTracking::ManualProtect => "software manual-protect (initially set)".into(),
        }
    }
}

const SECTION: &str = "soft.writers";

impl SoftVm {
    fn save(&self) -> Section {
        let seeds = lock(&self.shared.seeds);
        let mut w = StateWriter::new();
        w.u64(self.writes()).u32(seeds.len() as u32);
        for s in seeds.iter() {
            w.u64(*s);
        }
        Section::new(SECTION, 1, w.finish())
    }
}

impl SourceVm for SoftVm {
    fn memory(&self) -> &dyn GuestMemory {
        &*self.memory
    }

    fn describe(&self) -> Result<VmDescription, VmError> {
        Ok(VmDescription {
            layout: self.layout.clone(),
            vcpus: self.nwriters.max(1) as u32,
            nics: Vec::new(),
            properties: [("soft.version".to_string(), "1".to_string())].into(),
        })
    }

    fn dirty_tracker(&self) -> Result<Box<dyn DirtyTracker + '_>, VmError> {
        Ok(Box::new(SoftTracker { vm: self }))
    }

    fn pause(&self) -> Result<(), VmError> {
        self.stop();
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        self.start();
        Ok(())
    }

    fn is_paused(&self) -> bool {
        !lock(&self.shared.ctl).run
    }

    fn save_state(&self) -> Result<Vec<Section>, VmError> {
        if lock(&self.shared.ctl).run {
            return Err(VmError::Pause("save_state while running".into()));
        }
        Ok(vec![self.save()])
    }

    fn throttle(&self) -> Option<&dyn VcpuThrottle> {
        Some(self)
    }
}

/// The soft VM's "vCPUs" are its writer threads.
impl VcpuThrottle for SoftVm {
    fn pause_vcpus(&self) -> Result<(), VmError> {
        self.stop();
        Ok(())
    }

    fn resume_vcpus(&self) -> Result<(), VmError> {
        self.start();
        Ok(())
    }
}

impl DestinationVm for SoftVm {
    fn memory(&self) -> &dyn GuestMemory {
        &*self.memory
    }

    fn restore_state(&mut self, sections: &[Section]) -> Result<(), VmError> {
        let mut found = false;
        for s in sections {
            if s.name != SECTION {
                return Err(StateError::Unknown(s.name.clone()).into());
            }
            if s.version != 1 {
                return Err(StateError::UnsupportedVersion {
                    name: s.name.clone(),
                    got: s.version,
                    min: 1,
                    max: 1,
                }
                .into());
            }
            let mut r = StateReader::new(SECTION, &s.data);
            let writes = r.u64()?;
            let n = r.u32()? as usize;
            if n > 1024 {
                return Err(StateError::Malformed {
                    name: SECTION.into(),
                    reason: format!("{n} writers"),
                }
                .into());
            }
            let mut seeds = Vec::with_capacity(n);
            for _ in 0..n {
                seeds.push(r.u64()?);
            }
            r.finish()?;
            let mut mine = lock(&self.shared.seeds);
            for (d, s) in mine.iter_mut().zip(seeds) {
                *d = s;
            }
            self.shared.writes.store(writes, Ordering::SeqCst);
            found = true;
        }
        if !found {
            return Err(StateError::Missing(SECTION.into()).into());
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.start();
        Ok(())
    }
}
