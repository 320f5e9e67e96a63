//! The userfaultfd installer on plain anonymous memory (no KVM): a thread
//! reading a missing page blocks until the page is installed and then reads
//! exactly the installed bytes; pages outside the missing set keep their
//! contents (or read as zero) without a fault.

use std::time::Duration;

use livemig::bitmap::DirtyBitmap;
use livemig::destination::postcopy::PostcopyMemory;
use livemig::memory::{MemoryLayout, RegionDesc, PAGE_SIZE};
use livemig_uffd::{HostRegion, UffdPager};

const PAGES: u64 = 64;
const PS: usize = PAGE_SIZE as usize;

struct Anon(*mut u8);

impl Anon {
    fn new() -> Anon {
        // SAFETY: a fresh private anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGES as usize * PS,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Anon(p as *mut u8)
    }
    fn page(&self, i: u64) -> *mut u8 {
        // SAFETY: i < PAGES.
        unsafe { self.0.add(i as usize * PS) }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.0 as *mut libc::c_void, PAGES as usize * PS) };
    }
}

fn uffd_available() -> bool {
    // SAFETY: a plain syscall; the fd is closed at once.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        // CI machines have it (the same requirement as KVM post-copy).
        assert!(
            std::env::var_os("LIVEMIG_REQUIRE_KVM").is_none(),
            "userfaultfd unavailable: {e}"
        );
        eprintln!("SKIPPED: userfaultfd unavailable: {e}");
        return false;
    }
    // SAFETY: the fd we just got.
    unsafe { libc::close(fd as i32) };
    true
}

#[test]
fn a_reader_of_a_missing_page_waits_for_exactly_its_contents() {
    if !uffd_available() {
        return;
    }
    let mem = Anon::new();
    // Page 1 holds stale data (it will be dropped), page 2 holds data that
    // stays, page 3 was never written and stays zero.
    // SAFETY: inside the mapping.
    unsafe {
        std::ptr::write_bytes(mem.page(1), 0x11, PS);
        std::ptr::write_bytes(mem.page(2), 0x22, PS);
    }
    let layout = MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: PAGES * PAGE_SIZE,
    }])
    .unwrap();
    let mut missing = DirtyBitmap::new(&layout);
    missing.set(0, 1);
    missing.set(0, 5);
    missing.set(0, 6);
    let regions = vec![HostRegion {
        addr: mem.0 as usize,
        pages: PAGES,
    }];
    // SAFETY: `mem` outlives the pager (dropped after it, below).
    let pager = unsafe { UffdPager::new(regions) }.expect("userfaultfd");
    pager.arm(&missing).expect("arm");

    // A present page reads without a fault.
    // SAFETY: inside the mapping; present pages do not block.
    unsafe {
        assert_eq!(*mem.page(2), 0x22);
    }
    assert_eq!(pager.next_fault(Duration::from_millis(10)).unwrap(), None);
    // A never-touched page outside the missing set faults in the kernel;
    // the pager fills it with zeros itself and reports nothing.
    let addr = mem.page(3) as usize;
    let zero_reader = std::thread::spawn(move || {
        // SAFETY: inside the mapping.
        unsafe { std::ptr::read_volatile((addr as *const u8).add(9)) }
    });
    while !zero_reader.is_finished() {
        assert_eq!(pager.next_fault(Duration::from_millis(10)).unwrap(), None);
    }
    assert_eq!(zero_reader.join().unwrap(), 0);

    let addr = mem.page(1) as usize;
    let reader = std::thread::spawn(move || {
        let p = addr as *const u8;
        // SAFETY: inside the mapping; blocks until page 1 is installed.
        let v: Vec<u8> = (0..PS)
            .map(|i| unsafe { std::ptr::read_volatile(p.add(i)) })
            .collect();
        v
    });
    let fault = pager
        .next_fault(Duration::from_secs(10))
        .unwrap()
        .expect("the reader faulted");
    assert_eq!(fault, (0, 1));
    assert!(!reader.is_finished(), "the reader did not wait");
    let data: Vec<u8> = (0..PS).map(|i| (i % 251) as u8).collect();
    pager.install(0, 1, &data).unwrap();
    assert_eq!(
        reader.join().unwrap(),
        data,
        "the reader saw the installed page"
    );

    // Zero installation and a writer's fault.
    let addr = mem.page(5) as usize;
    let writer = std::thread::spawn(move || {
        // SAFETY: inside the mapping; blocks until page 5 is installed.
        unsafe { std::ptr::write_volatile((addr as *mut u8).add(7), 0x55) };
    });
    assert_eq!(
        pager.next_fault(Duration::from_secs(10)).unwrap(),
        Some((0, 5))
    );
    pager.install_zero(0, 5, 2).unwrap();
    writer.join().unwrap();
    // SAFETY: both pages installed.
    unsafe {
        assert_eq!(*mem.page(5).add(7), 0x55);
        assert_eq!(*mem.page(5), 0);
        assert_eq!(*mem.page(6), 0);
        // The page that stayed is untouched.
        assert_eq!(*mem.page(2).add(100), 0x22);
    }
    drop(pager);
}

/// `discard` after `arm` (the source prepared, then paused): a page that
/// was present keeps no stale byte — a reader blocks on it and then reads
/// exactly what is installed; a page not discarded keeps its contents.
#[test]
fn a_page_discarded_after_arm_faults_until_installed() {
    if !uffd_available() {
        return;
    }
    let mem = Anon::new();
    // SAFETY: inside the mapping.
    unsafe {
        std::ptr::write_bytes(mem.page(7), 0x77, PS);
        std::ptr::write_bytes(mem.page(8), 0x88, PS);
    }
    let layout = MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: PAGES * PAGE_SIZE,
    }])
    .unwrap();
    let mut missing = DirtyBitmap::new(&layout);
    missing.set(0, 1);
    let regions = vec![HostRegion {
        addr: mem.0 as usize,
        pages: PAGES,
    }];
    // SAFETY: `mem` outlives the pager (dropped after it, below).
    let pager = unsafe { UffdPager::new(regions) }.expect("userfaultfd");
    pager.arm(&missing).expect("arm");
    let mut more = DirtyBitmap::new(&layout);
    more.set(0, 1); // missing already: stays missing
    more.set(0, 7);
    pager.discard(&more).expect("discard");

    // SAFETY: inside the mapping; page 8 is present.
    unsafe {
        assert_eq!(*mem.page(8), 0x88);
    }
    let addr = mem.page(7) as usize;
    let reader = std::thread::spawn(move || {
        let p = addr as *const u8;
        // SAFETY: inside the mapping; blocks until page 7 is installed.
        (0..PS)
            .map(|i| unsafe { std::ptr::read_volatile(p.add(i)) })
            .collect::<Vec<u8>>()
    });
    let fault = loop {
        if let Some(f) = pager.next_fault(Duration::from_millis(100)).unwrap() {
            break f;
        }
        assert!(
            !reader.is_finished(),
            "read a discarded page without a fault"
        );
    };
    assert_eq!(fault, (0, 7));
    pager.install(0, 7, &[0x5A; PS]).expect("install");
    let got = reader.join().unwrap();
    assert!(got.iter().all(|&b| b == 0x5A), "stale or zero bytes read");
    drop(pager);
}

/// Guest memory advised for transparent huge pages (livemig-kvm's default):
/// a page written before the switchover fills its whole 2 MiB huge page,
/// so the missing pages inside it are present (zero) until `arm` drops
/// them. They must still fault and wait for the engine — never read as
/// zero — and the huge page's other pages keep their data; a missing page
/// of a never-touched huge page faults too, and a never-touched page
/// outside the missing set reads as zero without being reported.
#[test]
fn missing_pages_inside_a_transparent_huge_page_still_fault() {
    if !uffd_available() {
        return;
    }
    const HUGE: usize = 2 << 20;
    const HP: u64 = (HUGE / PS) as u64;
    let pages = 4 * HP;
    let len = pages as usize * PS;
    // SAFETY: a fresh private anonymous mapping, one huge page larger so an
    // aligned range of `len` fits; unmapped at the end.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len + HUGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(raw, libc::MAP_FAILED);
    let base = (raw as usize).next_multiple_of(HUGE);
    // SAFETY: base .. base + len lies inside the mapping.
    assert_eq!(
        unsafe { libc::madvise(base as *mut libc::c_void, len, libc::MADV_HUGEPAGE) },
        0
    );
    let page = |i: u64| (base + i as usize * PS) as *mut u8;
    // Huge page 0: one page written (the kernel fills 2 MiB at once).
    // SAFETY: inside the mapping.
    unsafe { std::ptr::write_bytes(page(10), 0x10, PS) };
    let huge = std::fs::read_to_string("/proc/self/smaps_rollup")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("AnonHugePages:")
                .map(|v| v.trim().to_string())
        });
    eprintln!("AnonHugePages after one write: {huge:?}");
    let layout = MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: pages * PAGE_SIZE,
    }])
    .unwrap();
    let mut missing = DirtyBitmap::new(&layout);
    for p in [11, 300, 2 * HP + 5] {
        missing.set(0, p);
    }
    // SAFETY: the mapping outlives the pager (unmapped after it, below).
    let pager = unsafe { UffdPager::new(vec![HostRegion { addr: base, pages }]) }.expect("uffd");
    pager.arm(&missing).expect("arm");
    // The written page stays, its never-written neighbour reads zero, and
    // neither faults to the engine.
    // SAFETY: inside the mapping; present pages.
    unsafe {
        assert_eq!(*page(10).add(5), 0x10);
        assert_eq!(*page(12), 0);
    }
    let zero_at = page(3 * HP + 7) as usize;
    let zero_reader = std::thread::spawn(move || {
        // SAFETY: inside the mapping.
        unsafe { std::ptr::read_volatile(zero_at as *const u8) }
    });
    while !zero_reader.is_finished() {
        assert_eq!(pager.next_fault(Duration::from_millis(10)).unwrap(), None);
    }
    assert_eq!(zero_reader.join().unwrap(), 0);
    for p in [11u64, 300, 2 * HP + 5] {
        let at = page(p) as usize;
        let reader = std::thread::spawn(move || {
            // SAFETY: inside the mapping; blocks until installed.
            (0..PS)
                .map(|i| unsafe { std::ptr::read_volatile((at as *const u8).add(i)) })
                .collect::<Vec<u8>>()
        });
        let fault = loop {
            if let Some(f) = pager.next_fault(Duration::from_millis(100)).unwrap() {
                break f;
            }
            assert!(!reader.is_finished(), "page {p} read without a fault");
        };
        assert_eq!(fault, (0, p));
        pager.install(0, p, &[p as u8 | 1; PS]).expect("install");
        assert!(reader.join().unwrap().iter().all(|&b| b == p as u8 | 1));
    }
    // SAFETY: inside the mapping.
    unsafe { assert_eq!(*page(10), 0x10) };
    drop(pager);
    // SAFETY: our own mapping.
    unsafe { libc::munmap(raw, len + HUGE) };
}
