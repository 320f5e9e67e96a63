//! A software VM: guest memory plus writer threads, with dirty tracking
//! through bitmaps. It implements [`SourceVm`] and [`DestinationVm`], so the
//! engine can be exercised (and embedded, for experiments) without KVM.
//!
//! Writers play two roles: "guest" writers store straight into the host
//! mapping and record the page in the VM's own dirty log (what KVM's dirty
//! log does for a real guest), and "device" writers write through vm-memory,
//! whose [`vm_memory::bitmap::AtomicBitmap`] records the page (what a VMM's
//! device emulation does). The engine must merge both or lose writes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::bitmap::DirtyBitmap;
use crate::memory::{allocate, GuestRam, MemoryLayout, PAGE_SIZE};
use crate::state::{Section, StateError, StateReader, StateWriter};
use crate::vm::{DestinationVm, DirtyTracker, SourceVm, VcpuThrottle, VmDescription, VmError};

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
    logging: AtomicBool,
    writes: AtomicU64,
    /// Writer PRNG states, part of the migrated state.
    seeds: Mutex<Vec<u64>>,
}

/// A software VM.
pub struct SoftVm {
    memory: Arc<GuestRam>,
    layout: MemoryLayout,
    shared: Arc<Shared>,
    writers: Vec<JoinHandle<()>>,
    nwriters: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SoftVm {
    /// A paused software VM with `layout` and writers per `config`.
    pub fn new(layout: &MemoryLayout, config: &SoftConfig) -> Result<Self, VmError> {
        let memory = Arc::new(allocate(layout).map_err(|e| VmError::Create(e.to_string()))?);
        let log = layout
            .regions()
            .iter()
            .map(|r| {
                AtomicBitmap::new(
                    r.size as usize,
                    std::num::NonZeroUsize::MIN.saturating_add(PAGE_SIZE as usize - 1),
                )
            })
            .collect();
        let n = config.guest_writers + config.device_writers;
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                run: false,
                exit: false,
                parked: 0,
            }),
            cv: Condvar::new(),
            log,
            logging: AtomicBool::new(false),
            writes: AtomicU64::new(0),
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

    /// The guest memory.
    pub fn ram(&self) -> &GuestRam {
        &self.memory
    }

    /// The layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// Fills every page with non-zero bytes derived from `seed` (so that a
    /// migration has real data to move), through vm-memory.
    pub fn fill(&self, seed: u64) {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for r in self.layout.regions() {
            for p in 0..r.pages() {
                let v =
                    (seed ^ (r.guest_addr + p * PAGE_SIZE)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                for (i, c) in page.chunks_exact_mut(8).enumerate() {
                    c.copy_from_slice(&(v.wrapping_add(i as u64)).to_le_bytes());
                }
                let _ = self
                    .memory
                    .write_slice(&page, GuestAddress(r.guest_addr + p * PAGE_SIZE));
            }
        }
    }

    /// A copy of all guest memory (for comparisons in tests).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.layout.total_bytes() as usize);
        for r in self.layout.regions() {
            let mut buf = vec![0u8; r.size as usize];
            if self
                .memory
                .read_slice(&mut buf, GuestAddress(r.guest_addr))
                .is_err()
            {
                buf.clear();
            }
            out.extend_from_slice(&buf);
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
    memory: &GuestRam,
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
        let addr = GuestAddress(r.guest_addr + offset);
        if device {
            // Through vm-memory: its AtomicBitmap records the page.
            let _ = memory.write_obj(seed, addr);
        } else if let Ok(host) = memory.get_host_address(addr) {
            // Like a guest store: straight into memory, logged by the "hypervisor".
            // SAFETY: `addr` lies inside region `region` (offset < size),
            // so `host` points at 8 valid, 8-byte aligned bytes of the mapping.
            unsafe { std::ptr::write_volatile(host as *mut u64, seed) };
            if shared.logging.load(Ordering::SeqCst) {
                shared.log[region].set_addr_range(offset as usize, 8);
            }
        }
        shared.writes.fetch_add(1, Ordering::SeqCst);
        burst += 1;
        if pages_per_ms > 0 && burst >= pages_per_ms {
            burst = 0;
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The software VM's dirty log.
struct SoftTracker<'a> {
    vm: &'a SoftVm,
}

impl DirtyTracker for SoftTracker<'_> {
    fn start(&mut self) -> Result<(), VmError> {
        for l in &self.vm.shared.log {
            l.reset();
        }
        self.vm.shared.logging.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn sync(&mut self, bitmap: &mut DirtyBitmap) -> Result<(), VmError> {
        for (i, l) in self.vm.shared.log.iter().enumerate() {
            bitmap.or_words(i, &l.get_and_reset());
        }
        Ok(())
    }

    fn needs_clear(&self) -> bool {
        false
    }

    fn clear(&mut self, _: usize, _: u64, _: u64, _: &DirtyBitmap) -> Result<(), VmError> {
        // Harvesting with get_and_reset re-arms the log already.
        Ok(())
    }

    fn stop(&mut self) -> Result<(), VmError> {
        self.vm.shared.logging.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn describe(&self) -> String {
        "software bitmap".into()
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
    fn memory(&self) -> &GuestRam {
        &self.memory
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
    fn memory(&self) -> &GuestRam {
        &self.memory
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
