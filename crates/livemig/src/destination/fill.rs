//! Fresh destination memory filled by `UFFDIO_COPY`: a page the
//! destination never wrote is installed with its data in one step, instead
//! of the kernel first faulting in and zeroing a page that the copy then
//! overwrites (about half of round 0 into fresh anonymous memory).
//!
//! [`Fill::new`] registers the regions that allow it (private anonymous
//! memory, shared files other than hugetlbfs: [`HostRam::fillable`]) with
//! a userfaultfd in missing-page mode, after the scrub. Nothing reads that
//! userfaultfd, so **while a region is registered nothing may touch a page
//! of it that is not present**: a user-mode access would wait until the
//! page is filled or the region released (the descriptor is opened
//! `UFFD_USER_MODE_ONLY`, so a kernel access — KVM, a `read()` into the
//! page — fails with `EFAULT` instead of waiting). The memory phase keeps
//! to that: data records for pages not written yet go through
//! [`Fill::copy`]; a zero record on such a page does nothing (it reads as
//! zero already); a zero record, or data, on a page written before touches
//! a present page; the direct receive path (`destination::direct`, which
//! reads from the socket into guest pages) is off while the fill is on.
//! A page found present (`EEXIST`: something mapped it after the scrub) is
//! copied plainly: writing a present page never raises a missing fault.
//!
//! The fill is a guard: the regions are unregistered and the descriptor
//! closed when it is dropped — at the end of the memory phase, before the
//! state is restored and before the guest can run, on success and on every
//! error (the memory phase owns it). A thread of the VMM that touched a
//! missing page meanwhile is woken then. Post-copy arms its own
//! userfaultfd on the same memory: [`Fill::release`] unregisters first.
//!
//! A region whose pages the kernel would fault in as transparent huge
//! pages (advised `MADV_HUGEPAGE`, or the host's setting `always`) is not
//! filled: `UFFDIO_COPY` installs 4 KiB pages, which would cost the guest
//! its huge pages, and a 2 MiB fault is cheap per byte already.
//!
//! Where userfaultfd is unavailable (`vm.unprivileged_userfaultfd = 0`
//! without `CAP_SYS_PTRACE` and with `/dev/userfaultfd` closed to the
//! process, seccomp, an old kernel, the `uffd-fill` feature off) pages are
//! copied plainly (logged once at debug level). [`crate::Reception::fresh_fill`]
//! turns it off.

use crate::ram::HostRam;

pub(super) use imp::Fill;

#[cfg(feature = "uffd-fill")]
mod thp;

#[cfg(feature = "uffd-fill")]
mod imp {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Once, RwLock, RwLockReadGuard};

    use userfaultfd::{Error as UffdError, IoctlFlags, Uffd, UffdBuilder};

    use super::HostRam;
    use crate::memory::PAGE_SIZE;

    /// One registered region's host range.
    #[derive(Debug, Clone, Copy)]
    struct Range {
        addr: usize,
        len: usize,
    }

    /// The userfaultfd over the registered regions (see the module).
    pub(in crate::destination) struct Fill {
        uffd: Uffd,
        /// Per region of the layout: its registered range, `None` when it
        /// is not (not fillable, refused, or released). Copies hold the
        /// read lock, so a release waits for the copies under way.
        ranges: RwLock<Vec<Option<Range>>>,
        /// Pages installed by `UFFDIO_COPY`.
        filled: AtomicU64,
    }

    /// How many times a copy that made no progress (`EAGAIN`) is retried
    /// before the region is given up.
    const RETRIES: u32 = 16;

    impl Fill {
        /// Registers the fillable regions of `ram` (`regions` of them);
        /// `None` where none could be (or userfaultfd is unavailable).
        pub(in crate::destination) fn new(ram: &HostRam<'_>, regions: usize) -> Option<Fill> {
            let wanted: Vec<Option<Range>> = (0..regions)
                .map(|i| {
                    let (p, len) = ram.fillable(i)?;
                    let shared = ram.is_shared_file(i);
                    if super::thp::expects_huge_pages(p as usize, shared) {
                        log::debug!("region {i} takes transparent huge pages: not filled");
                        return None;
                    }
                    Some(Range {
                        addr: p as usize,
                        len,
                    })
                })
                .collect();
            if wanted.iter().all(Option::is_none) {
                return None;
            }
            let uffd = UffdBuilder::new()
                .close_on_exec(true)
                .non_blocking(true)
                .user_mode_only(true)
                .create();
            let uffd = match uffd {
                Ok(u) => u,
                Err(e) => {
                    unavailable(&e);
                    return None;
                }
            };
            let ranges: Vec<Option<Range>> = wanted
                .into_iter()
                .map(|w| w.filter(|r| register(&uffd, *r)))
                .collect();
            if ranges.iter().all(Option::is_none) {
                return None;
            }
            Some(Fill {
                uffd,
                ranges: RwLock::new(ranges),
                filled: AtomicU64::new(0),
            })
        }

        fn read(&self) -> RwLockReadGuard<'_, Vec<Option<Range>>> {
            self.ranges.read().unwrap_or_else(|e| e.into_inner())
        }

        /// Pages installed by `UFFDIO_COPY` so far.
        pub(in crate::destination) fn filled(&self) -> u64 {
            self.filled.load(Ordering::Relaxed)
        }

        /// Writes `data` (whole pages) at `page` of `region`, pages this
        /// memory phase never wrote: installed by `UFFDIO_COPY`, a page
        /// found present copied plainly. False where the region is not
        /// registered (any more): the caller copies plainly then (a page
        /// of an unregistered region faults in as usual), and also where
        /// the pages lie outside it (the caller reports that). An error
        /// only where a region could not be released after a failure.
        pub(in crate::destination) fn copy(
            &self,
            ram: &HostRam<'_>,
            region: usize,
            page: u64,
            data: &[u8],
        ) -> Result<bool, std::io::Error> {
            let ranges = self.read();
            if ranges.get(region).copied().flatten().is_none() {
                return Ok(false);
            }
            let npages = data.len() as u64 / PAGE_SIZE;
            let Some(dst) = ram.host_pages(region, page, npages) else {
                return Ok(false);
            };
            let (len, page_len) = (data.len(), PAGE_SIZE as usize);
            let (mut off, mut plain, mut tries) = (0usize, 0u64, 0u32);
            while off < len {
                let (s, d) = (data[off..].as_ptr(), dst.wrapping_add(off));
                // SAFETY: `d .. d + len - off` lies inside `region`
                // (`host_pages` checked), which is registered with this
                // userfaultfd (the read lock keeps it so); `s` is the rest
                // of `data`. The kernel copies whole pages into pages that
                // are not present and fails (`EEXIST`) on one that is.
                let r = unsafe { self.uffd.copy(s.cast(), d.cast(), len - off, true) };
                match r {
                    Ok(n) | Err(UffdError::PartiallyCopied(n))
                        if n > 0 && n <= len - off && n % page_len == 0 =>
                    {
                        off += n;
                        tries = 0;
                    }
                    Err(UffdError::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                        // SAFETY: this page is present (the kernel just
                        // said so), so writing it raises no missing fault;
                        // inside the region as above; `data` is a distinct
                        // buffer.
                        unsafe { std::ptr::copy_nonoverlapping(s, d, page_len) };
                        off += page_len;
                        plain += 1;
                    }
                    Err(UffdError::PartiallyCopied(_)) if tries < RETRIES => tries += 1,
                    other => {
                        drop(ranges);
                        let why = match other {
                            Err(e) => e.to_string(),
                            Ok(n) => format!("copied {n} of {} bytes", len - off),
                        };
                        self.give_up(region, &why)?;
                        return Ok(false);
                    }
                }
            }
            self.filled.fetch_add(npages - plain, Ordering::Relaxed);
            Ok(true)
        }

        /// A copy into `region` failed unexpectedly: the region is
        /// released (its pages then fault in as usual) and the migration
        /// goes on with plain copies there.
        fn give_up(&self, region: usize, why: &str) -> Result<(), std::io::Error> {
            log::warn!("UFFDIO_COPY into region {region}: {why}; plain copies from now on");
            let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
            match ranges.get_mut(region).and_then(Option::take) {
                Some(r) => self.unregister(r),
                None => Ok(()),
            }
        }

        /// Unregisters every region (waiting for the copies under way):
        /// from here on every page faults in as usual and [`Fill::copy`]
        /// returns false. Post-copy calls it before arming its own
        /// userfaultfd on the same memory.
        pub(in crate::destination) fn release(&self) -> Result<(), std::io::Error> {
            let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
            let mut result = Ok(());
            for r in ranges.iter_mut().filter_map(Option::take) {
                if let Err(e) = self.unregister(r) {
                    result = Err(e);
                }
            }
            result
        }

        fn unregister(&self, r: Range) -> Result<(), std::io::Error> {
            self.uffd
                .unregister(r.addr as *mut libc::c_void, r.len)
                .map_err(|e| std::io::Error::other(format!("UFFDIO_UNREGISTER: {e}")))
        }
    }

    impl Drop for Fill {
        fn drop(&mut self) {
            // Closing the descriptor (when `uffd` drops, next) releases
            // every region as well; unregistering first says so if the
            // kernel disagrees.
            if let Err(e) = self.release() {
                log::warn!("fresh-memory fill: {e}; closing the userfaultfd releases it");
            }
        }
    }

    /// Registers `r` in missing-page mode; false (logged at debug level)
    /// where the kernel refuses or offers no `UFFDIO_COPY` there.
    fn register(uffd: &Uffd, r: Range) -> bool {
        match uffd.register(r.addr as *mut libc::c_void, r.len) {
            Ok(ioctls) if ioctls.contains(IoctlFlags::COPY) => true,
            Ok(_) => {
                let _ = uffd.unregister(r.addr as *mut libc::c_void, r.len);
                log::debug!("userfaultfd offers no UFFDIO_COPY at {:#x}", r.addr);
                false
            }
            Err(e) => {
                log::debug!("UFFDIO_REGISTER at {:#x}: {e}; plain copies there", r.addr);
                false
            }
        }
    }

    /// Logs, once per process, that userfaultfd cannot be used.
    fn unavailable(e: &UffdError) {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            log::debug!("userfaultfd unavailable ({e}): fresh memory is filled by plain copies");
        });
    }
}

#[cfg(not(feature = "uffd-fill"))]
mod imp {
    use super::HostRam;

    /// Without the `uffd-fill` feature: never built.
    pub(in crate::destination) enum Fill {}

    impl Fill {
        pub(in crate::destination) fn new(_: &HostRam<'_>, _: usize) -> Option<Fill> {
            None
        }
        pub(in crate::destination) fn filled(&self) -> u64 {
            match *self {}
        }
        pub(in crate::destination) fn copy(
            &self,
            _: &HostRam<'_>,
            _: usize,
            _: u64,
            _: &[u8],
        ) -> Result<bool, std::io::Error> {
            match *self {}
        }
        pub(in crate::destination) fn release(&self) -> Result<(), std::io::Error> {
            match *self {}
        }
    }
}

#[cfg(all(test, feature = "uffd-fill", feature = "vm-memory"))]
mod tests {
    use super::*;
    use crate::memory::{allocate, MemoryLayout, RegionDesc, PAGE_SIZE};

    fn region(pages: u64) -> MemoryLayout {
        MemoryLayout::new(vec![RegionDesc {
            guest_addr: 0,
            size: pages * PAGE_SIZE,
        }])
        .unwrap()
    }

    /// A run across present pages: the missing ones are installed, the
    /// present ones (`EEXIST`) copied plainly, every byte lands.
    #[test]
    fn a_run_across_present_pages_lands_whole() {
        let layout = region(16);
        let mem = allocate(&layout).unwrap();
        let ram = HostRam::new(&mem, &layout).unwrap();
        // Present before the fill registers (touching a missing page of a
        // registered region would wait forever): written (3) and read
        // only (the zero page, 5).
        let base = ram.host_pages(0, 0, 16).unwrap();
        // SAFETY: inside the region, which nothing else uses.
        unsafe {
            std::ptr::write_volatile(base.add(3 * PAGE_SIZE as usize), 1u8);
            std::ptr::read_volatile(base.add(5 * PAGE_SIZE as usize));
        }
        let Some(fill) = Fill::new(&ram, 1) else {
            eprintln!("*** SKIPPED: userfaultfd unavailable ***");
            return;
        };
        let data: Vec<u8> = (0..8 * PAGE_SIZE).map(|i| (i % 251) as u8 + 1).collect();
        assert!(fill.copy(&ram, 0, 1, &data).unwrap());
        assert_eq!(fill.filled(), 6, "pages 3 and 5 were copied plainly");
        drop(fill);
        let mut got = vec![0u8; data.len()];
        assert!(ram.read_pages(0, 1, &mut got));
        assert!(got == data);
    }

    /// After `release` the fill copies nothing and every page faults in
    /// as usual (a read of a page never written returns zero at once).
    #[test]
    fn after_release_pages_fault_in_as_usual() {
        let layout = region(4);
        let mem = allocate(&layout).unwrap();
        let ram = HostRam::new(&mem, &layout).unwrap();
        let Some(fill) = Fill::new(&ram, 1) else {
            eprintln!("*** SKIPPED: userfaultfd unavailable ***");
            return;
        };
        fill.release().unwrap();
        assert!(!fill.copy(&ram, 0, 0, &[7u8; PAGE_SIZE as usize]).unwrap());
        assert!(ram.is_zero(0, 2));
    }

    /// Memory advised for transparent huge pages (where the host gives
    /// them) is left to the kernel's 2 MiB faults: not registered.
    #[test]
    fn a_region_taking_huge_pages_is_not_filled() {
        let layout = region(1024);
        let mem = allocate(&layout).unwrap();
        let ram = HostRam::new(&mem, &layout).unwrap();
        let (p, len) = ram.fillable(0).unwrap();
        // SAFETY: advice on the region's own mapping; no contents change.
        assert_eq!(
            unsafe { libc::madvise(p.cast(), len, libc::MADV_HUGEPAGE) },
            0
        );
        if !thp::expects_huge_pages(p as usize, false) {
            eprintln!("*** SKIPPED: the host gives no transparent huge pages ***");
            return;
        }
        assert!(Fill::new(&ram, 1).is_none());
    }

    /// The copy rate into fresh memory, fill against plain copy (not a
    /// test of behaviour: run by hand with `--ignored --nocapture`).
    #[test]
    #[ignore]
    fn fill_rate() {
        let pages = 131072u64;
        let chunk = 256u64;
        let data = vec![0x5au8; (chunk * PAGE_SIZE) as usize];
        for round in 0..3 {
            for fill_on in [false, true] {
                let layout = region(pages);
                let mem = allocate(&layout).unwrap();
                let ram = HostRam::new(&mem, &layout).unwrap();
                let fill = if fill_on { Fill::new(&ram, 1) } else { None };
                let t = std::time::Instant::now();
                for p in (0..pages).step_by(chunk as usize) {
                    let done = match &fill {
                        Some(f) => f.copy(&ram, 0, p, &data).unwrap(),
                        None => false,
                    };
                    if !done {
                        assert!(ram.write_pages(0, p, &data));
                    }
                }
                let s = t.elapsed().as_secs_f64();
                let gbs = (pages * PAGE_SIZE) as f64 / s / 1e9;
                eprintln!("round {round} fill {fill_on}: {gbs:.2} GB/s");
            }
        }
    }
}
