//! A software post-copy page installer ([`SoftPager`]): a
//! [`PostcopyMemory`] whose "vCPUs" read guest pages through
//! [`SoftPager::read`], which blocks on a missing page (recording the fault)
//! until the engine installs it — what userfaultfd does to a real vCPU.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::bitmap::DirtyBitmap;
use crate::destination::postcopy::{PostcopyError, PostcopyMemory};
use crate::memory::{GuestMemory, MemoryLayout, PAGE_SIZE};

struct Pages {
    /// Pages that fault until installed.
    missing: Option<DirtyBitmap>,
    faults: VecDeque<(usize, u64)>,
    /// Readers that saw a missing page (each read counts once).
    faulted_reads: u64,
}

/// The software installer over one VM's memory.
///
/// It holds the host addresses of the VM's memory: test equipment, the VM
/// must outlive every use of it (a test keeps both until the end).
pub struct SoftPager {
    regions: Vec<(usize, u64)>, // host address, pages
    pages: Mutex<Pages>,
    changed: Condvar,
    fault: Condvar,
}

impl SoftPager {
    /// An installer over `memory` (laid out as `layout`).
    pub fn new(memory: &dyn GuestMemory, layout: &MemoryLayout) -> Arc<Self> {
        let host = memory.regions();
        let regions = layout
            .regions()
            .iter()
            .map(|r| {
                let h = host
                    .iter()
                    .find(|h| h.guest_addr == r.guest_addr)
                    .expect("region mapped");
                (h.host as usize, r.pages())
            })
            .collect();
        Arc::new(SoftPager {
            regions,
            pages: Mutex::new(Pages {
                missing: None,
                faults: VecDeque::new(),
                faulted_reads: 0,
            }),
            changed: Condvar::new(),
            fault: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Pages> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ptr(&self, region: usize, page: u64, npages: u64) -> Result<*mut u8, PostcopyError> {
        match self.regions.get(region) {
            Some(&(host, pages)) if page.checked_add(npages).is_some_and(|e| e <= pages) => {
                Ok((host + (page * PAGE_SIZE) as usize) as *mut u8)
            }
            _ => Err(PostcopyError::Other(format!(
                "pages {page}+{npages} of region {region} are outside memory"
            ))),
        }
    }

    /// A "vCPU" reads a page: blocks while it is missing (its fault is
    /// queued for the engine once), for at most `timeout`; `None` if it is
    /// still missing then.
    pub fn read(&self, region: usize, page: u64, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = self.lock();
        let mut faulted = false;
        while st.missing.as_ref().is_some_and(|m| m.is_set(region, page)) {
            if !faulted {
                faulted = true;
                st.faulted_reads += 1;
                st.faults.push_back((region, page));
                self.fault.notify_all();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(st);
        let p = self.ptr(region, page, 1).ok()?;
        let mut out = vec![0u8; PAGE_SIZE as usize];
        // SAFETY: `ptr` checked the page is inside the region's mapping,
        // which the VM keeps alive (see the type's docs).
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
        Some(out)
    }

    /// Whether [`PostcopyMemory::arm`] was called.
    pub fn armed(&self) -> bool {
        self.lock().missing.is_some()
    }

    /// Pages still missing.
    pub fn missing(&self) -> u64 {
        self.lock().missing.as_ref().map_or(0, |m| m.count())
    }

    /// Faults not yet taken by [`PostcopyMemory::next_fault`].
    pub fn pending_faults(&self) -> usize {
        self.lock().faults.len()
    }

    /// The last missing page (in layout order), if any.
    pub fn last_missing(&self) -> Option<(usize, u64)> {
        let st = self.lock();
        let m = st.missing.as_ref()?;
        (0..m.num_regions()).rev().find_map(|region| {
            let end = m.region_pages(region);
            m.runs_in(region, 0, end, u64::MAX)
                .last()
                .map(|r| (region, r.first_page + r.npages - 1))
        })
    }

    /// Reads that found their page missing.
    pub fn faulted_reads(&self) -> u64 {
        self.lock().faulted_reads
    }

    fn mark_present(&self, region: usize, page: u64, npages: u64) {
        let mut st = self.lock();
        if let Some(m) = st.missing.as_mut() {
            for p in page..page + npages {
                m.unset(region, p);
            }
        }
        drop(st);
        self.changed.notify_all();
    }
}

impl SoftPager {
    /// What a real installer does to pages it makes missing: their stale
    /// contents are dropped (here: overwritten with a poison byte, so a
    /// read that bypassed the fault would be caught by the content check).
    fn poison(&self, pages: &DirtyBitmap) -> Result<(), PostcopyError> {
        for region in 0..pages.num_regions() {
            let end = pages.region_pages(region);
            for r in pages.runs_in(region, 0, end, u64::MAX) {
                let p = self.ptr(region, r.first_page, r.npages)?;
                // SAFETY: inside the mapping (checked); the VM is not running.
                unsafe { std::ptr::write_bytes(p, 0xEE, (r.npages * PAGE_SIZE) as usize) };
            }
        }
        Ok(())
    }
}

impl PostcopyMemory for SoftPager {
    fn arm(&self, missing: &DirtyBitmap) -> Result<(), PostcopyError> {
        let mut st = self.lock();
        if st.missing.is_some() {
            return Err(PostcopyError::Other("armed twice".into()));
        }
        self.poison(missing)?;
        st.missing = Some(missing.clone());
        Ok(())
    }

    fn discard(&self, more: &DirtyBitmap) -> Result<(), PostcopyError> {
        let mut st = self.lock();
        let Some(missing) = st.missing.as_mut() else {
            return Err(PostcopyError::Other("discard before arm".into()));
        };
        self.poison(more)?;
        for region in 0..more.num_regions() {
            let end = more.region_pages(region);
            for r in more.runs_in(region, 0, end, u64::MAX) {
                missing.set_range(region, r.first_page, r.npages);
            }
        }
        Ok(())
    }

    fn next_fault(&self, timeout: Duration) -> Result<Option<(usize, u64)>, PostcopyError> {
        let mut st = self.lock();
        if st.faults.is_empty() {
            st = self
                .fault
                .wait_timeout(st, timeout)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(st.faults.pop_front())
    }

    fn install(&self, region: usize, page: u64, data: &[u8]) -> Result<(), PostcopyError> {
        let npages = data.len() as u64 / PAGE_SIZE;
        let p = self.ptr(region, page, npages)?;
        // SAFETY: inside the mapping (checked); readers of these pages are
        // blocked until `mark_present` below.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        self.mark_present(region, page, npages);
        Ok(())
    }

    fn install_zero(&self, region: usize, page: u64, npages: u64) -> Result<(), PostcopyError> {
        let p = self.ptr(region, page, npages)?;
        // SAFETY: as in `install`.
        unsafe { std::ptr::write_bytes(p, 0, (npages * PAGE_SIZE) as usize) };
        self.mark_present(region, page, npages);
        Ok(())
    }

    fn wake(&self, _region: usize, _page: u64) -> Result<(), PostcopyError> {
        self.changed.notify_all();
        Ok(())
    }
}

// SAFETY: the raw host addresses are only dereferenced inside the checked
// ranges of the VM's mappings, which outlive the pager (type docs); all
// other state is behind a mutex.
unsafe impl Send for SoftPager {}
// SAFETY: as for Send; concurrent installs touch disjoint pages (the engine
// installs each page once) and readers wait for `mark_present`.
unsafe impl Sync for SoftPager {}
