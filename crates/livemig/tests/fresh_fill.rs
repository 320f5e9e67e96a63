//! The destination's fresh-memory fill (`Reception::fresh_fill`): pages it
//! never wrote are installed by `UFFDIO_COPY` through a userfaultfd that
//! nothing reads. What must hold: the memory holds the source's bytes with
//! the fill on and off, into private anonymous and memfd memory, over one
//! and several page streams, with pages mapped behind the engine's back
//! (`EEXIST`: copied plainly); and after a migration — successful, or cut
//! in the middle of round 0 — every page can be read from another thread
//! within a bounded time (a page left registered with no reader would
//! block that thread forever).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use livemig::memory::{Backing, GuestMemory, HostRegion, MemoryLayout, RegionDesc};
use livemig::protocol::MsgKind;
use livemig::report::ReceiveProgress;
use livemig::testing::fault::{At, Fault, FaultTransport};
use livemig::testing::soft::{SoftConfig, SoftTracking, SoftVm};
use livemig::transport::mem;
use livemig::vm_memory::{Bytes, GuestAddress};
use livemig::{Migration, MigrationConfig, ReceiveConfig, ReceiveReport, Reception};

const PAGE: usize = 4096;

/// One mapping, unmapped when the last handle goes.
struct Region {
    guest_addr: u64,
    ptr: *mut u8,
    len: usize,
    file: Option<File>,
}

impl Region {
    fn map(guest_addr: u64, len: usize, memfd: bool) -> Region {
        let file = memfd.then(|| {
            // SAFETY: a NUL-terminated name; the result is checked.
            let fd = unsafe { libc::memfd_create(c"fresh-fill".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0, "memfd_create");
            // SAFETY: a fresh descriptor nothing else owns.
            let f = unsafe { File::from_raw_fd(fd) };
            f.set_len(len as u64).unwrap();
            f
        });
        let (flags, fd) = match &file {
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a new mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap");
        Region {
            guest_addr,
            ptr: ptr.cast(),
            len,
            file,
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Guest memory the test keeps a handle on after the VM is gone.
#[derive(Clone)]
struct Shared(Arc<Vec<Region>>);

// SAFETY: a region is a plain mapping, usable from any thread.
unsafe impl Send for Region {}
// SAFETY: as above; `&self` only hands out its address.
unsafe impl Sync for Region {}

// SAFETY: each region is `len` bytes mapped read-write at `ptr` for as long
// as the Arc lives (at least as long as `self`), page aligned, sorted and
// disjoint; anonymous ones are MAP_PRIVATE | MAP_ANONYMOUS, memfd ones are
// MAP_SHARED at offset 0 of the file kept open here.
unsafe impl GuestMemory for Shared {
    fn regions(&self) -> Vec<HostRegion<'_>> {
        self.0
            .iter()
            .map(|r| {
                let backing = match &r.file {
                    Some(f) => Backing::SharedFile {
                        fd: f.as_fd(),
                        offset: 0,
                    },
                    None => Backing::PrivateAnonymous,
                };
                HostRegion::new(r.guest_addr, r.ptr, r.len as u64, backing)
            })
            .collect()
    }
    // The soft VM's device writers are in its own log.
    fn take_vmm_dirty(&self, _: usize, _: &mut [u64]) {}
}

/// 8 MiB of anonymous memory and 4 MiB of memfd.
const REGIONS: [(u64, usize, bool); 2] = [(0, 8 << 20, false), (1 << 30, 4 << 20, true)];

fn layout() -> MemoryLayout {
    MemoryLayout::new(
        REGIONS
            .iter()
            .map(|&(guest_addr, len, _)| RegionDesc {
                guest_addr,
                size: len as u64,
            })
            .collect(),
    )
    .unwrap()
}

fn fresh_memory() -> Shared {
    Shared(Arc::new(
        REGIONS
            .iter()
            .map(|&(a, l, m)| Region::map(a, l, m))
            .collect(),
    ))
}

impl Shared {
    /// Every byte, read by another thread; `None` if that thread did not
    /// finish within 10 s (it then stays blocked; the test fails).
    fn read_all_bounded(&self) -> Option<Vec<u8>> {
        let (tx, rx) = mpsc::channel();
        let me = self.clone();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            for r in me.0.iter() {
                for off in 0..r.len {
                    // SAFETY: inside the mapping, which `me` keeps.
                    out.push(unsafe { std::ptr::read_volatile(r.ptr.add(off)) });
                }
            }
            let _ = tx.send(out);
        });
        rx.recv_timeout(Duration::from_secs(10)).ok()
    }

    /// Pages mapped behind the engine's back after its scrub: every 3rd
    /// page read (the zero page, or a shmem page, gets mapped), every 5th
    /// written with zeros (what they hold already).
    fn touch_some(&self) {
        for r in self.0.iter() {
            for p in (0..r.len / PAGE).step_by(3) {
                // SAFETY: inside the mapping.
                unsafe { std::ptr::read_volatile(r.ptr.add(p * PAGE)) };
            }
            for p in (0..r.len / PAGE).step_by(5) {
                // SAFETY: inside the mapping.
                unsafe { std::ptr::write_volatile(r.ptr.add(p * PAGE + 8), 0u8) };
            }
        }
    }
}

/// Whether this process may create a userfaultfd (as the engine does:
/// user-mode faults only); without one the fill stays off by itself.
fn uffd_available() -> bool {
    const UFFD_USER_MODE_ONLY: i32 = 1;
    // SAFETY: a plain system call; the descriptor is closed at once.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | UFFD_USER_MODE_ONLY) };
    if fd < 0 {
        eprintln!("*** userfaultfd unavailable: only the plain copy is checked ***");
        return false;
    }
    // SAFETY: the descriptor just created.
    unsafe { libc::close(fd as i32) };
    true
}

/// How a test migration runs.
#[derive(Clone, Copy)]
struct Case {
    fill: bool,
    streams: u32,
    /// Map some pages after the scrub (in the `Accepted` callback).
    touch: bool,
}

/// A busy source filled with `seed`, running.
fn source(seed: u64) -> SoftVm {
    let writers = SoftConfig {
        guest_writers: 2,
        device_writers: 1,
        pages_per_ms: 5,
    };
    let src = SoftVm::new(&layout(), &writers).expect("source VM");
    src.fill(seed);
    // Whole zero pages: left out of round 0, so never written here unless
    // a writer dirties them (then they may come as data or zero markers).
    let ram = src.ram().expect("vm-memory");
    for p in (0..2048u64).step_by(7) {
        ram.write_slice(&[0u8; PAGE], GuestAddress(p * PAGE as u64))
            .unwrap();
    }
    src.start();
    src
}

/// Migrates `src` into `dst` memory; the destination's result.
fn migrate(
    src: &SoftVm,
    dst: &Shared,
    case: Case,
    fault: Option<At>,
) -> Result<(SoftVm, ReceiveReport), livemig::MigrationError> {
    let (a, b) = mem::pair();
    let (opener, acceptor) = mem::streams();
    let memory = dst.clone();
    let dest = std::thread::spawn(move || {
        let cfg = ReceiveConfig {
            io_timeout: Duration::from_secs(5),
        };
        let touch = memory.clone();
        let mut r = Reception::new(Box::new(b))
            .config(cfg)
            .fresh_fill(case.fill)
            .progress(move |p| {
                if case.touch && matches!(p, ReceiveProgress::Accepted { .. }) {
                    touch.touch_some();
                }
            });
        if case.streams > 1 {
            r = r.accept_streams(acceptor);
        }
        r.run(move |_| {
            SoftVm::with_guest_memory(Box::new(memory), &SoftConfig::idle(), SoftTracking::Bitmap)
        })
    });
    let transport: Box<dyn livemig::transport::Transport> = match fault {
        Some(at) => Box::new(FaultTransport::new(Box::new(a), Fault::Drop.at(at)).0),
        None => Box::new(a),
    };
    let config = MigrationConfig {
        downtime_limit: Duration::from_millis(200),
        ..Default::default()
    };
    let mut m = Migration::new(src).config(config);
    if case.streams > 1 {
        m = m.streams(case.streams, opener);
    }
    let sent = m.run(transport);
    let got = dest.join().expect("destination thread");
    assert_eq!(
        sent.is_ok(),
        got.is_ok(),
        "{sent:?} / {:?}",
        got.as_ref().err()
    );
    got
}

/// One migration of `case`, checked byte for byte (read from another
/// thread, bounded) and for how many pages the fill installed.
fn check(case: Case) {
    let available = uffd_available();
    let src = source(17);
    let dst = fresh_memory();
    let (vm, report) = migrate(&src, &dst, case, None).expect("migration");
    drop(vm);
    let got = dst
        .read_all_bounded()
        .expect("memory readable after the migration");
    assert!(
        got == src.snapshot(),
        "destination memory differs from the source"
    );
    if case.fill && available {
        assert!(report.filled_pages > 0, "the fill installed no page");
    } else {
        assert_eq!(report.filled_pages, 0);
    }
    assert!(report.filled_pages <= report.pages);
    if case.touch && case.fill && available {
        assert!(
            report.filled_pages < report.pages,
            "pages mapped after the scrub were copied plainly"
        );
    }
    eprintln!(
        "fill {} streams {} touch {}: {} of {} data pages filled",
        case.fill, case.streams, case.touch, report.filled_pages, report.pages
    );
}

#[test]
fn fresh_memory_holds_the_source_bytes_with_the_fill_on() {
    check(Case {
        fill: true,
        streams: 1,
        touch: false,
    });
}

#[test]
fn fresh_memory_holds_the_source_bytes_with_the_fill_off() {
    check(Case {
        fill: false,
        streams: 1,
        touch: false,
    });
}

#[test]
fn several_page_streams_fill_fresh_memory() {
    check(Case {
        fill: true,
        streams: 3,
        touch: false,
    });
}

#[test]
fn pages_mapped_after_the_scrub_are_copied_plainly() {
    check(Case {
        fill: true,
        streams: 1,
        touch: true,
    });
    check(Case {
        fill: true,
        streams: 2,
        touch: true,
    });
}

/// The connection breaks in the middle of round 0 (one stream: after some
/// `Pages` frames were applied, before the others; several streams: the
/// control connection at the end of round 0): the migration fails, and
/// every page — filled, and never sent — reads from another thread (the
/// registration went with the failed memory phase).
#[test]
fn memory_is_readable_after_a_connection_cut_in_round_0() {
    for (streams, at) in [
        (1, At::kind(MsgKind::Pages, 4)),
        (2, At::kind(MsgKind::RoundEnd, 0)),
    ] {
        let src = source(23);
        let dst = fresh_memory();
        let case = Case {
            fill: true,
            streams,
            touch: false,
        };
        let r = migrate(&src, &dst, case, Some(at));
        assert!(r.is_err(), "the cut migration failed");
        let got = dst
            .read_all_bounded()
            .expect("memory readable after the failed migration");
        assert_eq!(got.len(), src.snapshot().len());
        src.stop();
    }
}

/// A reader of a page the memory phase has not written yet waits (the
/// page is registered) and is woken when the phase ends — here by a
/// failure: bounded by the migration's own bounded waits.
#[test]
fn a_reader_during_the_memory_phase_is_released_at_its_end() {
    if !uffd_available() {
        return;
    }
    let src = source(29);
    let dst = fresh_memory();
    let seen: Arc<Mutex<Option<mpsc::Receiver<u8>>>> = Arc::default();
    let (a, b) = mem::pair();
    let (memory, seen2) = (dst.clone(), seen.clone());
    let dest = std::thread::spawn(move || {
        let last = memory.clone();
        Reception::new(Box::new(b))
            .config(ReceiveConfig {
                io_timeout: Duration::from_secs(5),
            })
            .run(move |_| {
                // The last page of the memfd region, read from another
                // thread as soon as the VM exists: the reader starts
                // before or after the registration; either way it ends.
                let (tx, rx) = mpsc::channel();
                *seen2.lock().unwrap() = Some(rx);
                let r = last.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(50));
                    let reg = &r.0[1];
                    // SAFETY: inside the mapping, which `r` keeps.
                    let v = unsafe { std::ptr::read_volatile(reg.ptr.add(reg.len - PAGE)) };
                    let _ = tx.send(v);
                });
                SoftVm::with_guest_memory(
                    Box::new(memory),
                    &SoftConfig::idle(),
                    SoftTracking::Bitmap,
                )
            })
    });
    // Cut after a few frames, while the reader may be waiting.
    let (t, _probe) = FaultTransport::new(Box::new(a), Fault::Drop.at(At::kind(MsgKind::Pages, 6)));
    let sent = Migration::new(&src).run(Box::new(t));
    assert!(sent.is_err());
    assert!(dest.join().unwrap().is_err());
    let rx = seen.lock().unwrap().take().expect("the VM was created");
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the reader finished after the memory phase ended");
}
