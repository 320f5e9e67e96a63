//! The same-host hand-over (`migrate_local` / `receive_local`) with the
//! software VM over memfd memory that both "processes" map: only the state
//! travels, the destination sees the guest's bytes through its own mapping,
//! and nothing refused or failed ever writes the shared memory.
// `migrate`/`receive` (deprecated wrappers) stay tested here, beside the
// local entry points.
#![allow(deprecated)]

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::Duration;

use livemig::destination::local::receive_local;
use livemig::local::{LocalError, LocalIdentity};
use livemig::memory::{Backing, GuestMemory, HostRegion};
use livemig::source::local::migrate_local;
use livemig::state::Section;
use livemig::testing::hooked::HookedVm;
use livemig::testing::soft::{SoftConfig, SoftTracking, SoftVm};
use livemig::transport::mem;
use livemig::vm::SourceVm;
use livemig::{migrate, receive, CancelToken, ErrorKind, MigrationConfig, ReceiveConfig};

/// One region: a shared mapping of part of a file.
struct Region {
    guest_addr: u64,
    ptr: *mut u8,
    len: u64,
    file: Arc<File>,
    offset: u64,
}

/// Guest memory over memfds, mapped `MAP_SHARED` (or, for the refusal
/// tests, private anonymous memory).
struct Shared {
    regions: Vec<Region>,
    anonymous: bool,
}

// SAFETY: the struct owns its mappings; nothing about them is thread-bound.
unsafe impl Send for Shared {}
// SAFETY: as above; `&self` only hands out the addresses.
unsafe impl Sync for Shared {}

const LAYOUT: [(u64, u64); 2] = [(0, 4 << 20), (1 << 30, 2 << 20)];

fn memfd(len: u64) -> Arc<File> {
    // SAFETY: a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"local-handover".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a fresh descriptor nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    Arc::new(f)
}

fn map(len: u64, fd: Option<(&File, u64)>) -> *mut u8 {
    let (flags, fd, off) = match fd {
        Some((f, off)) => (libc::MAP_SHARED, f.as_raw_fd(), off),
        None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0),
    };
    // SAFETY: a new mapping; the result is checked.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            off as libc::off_t,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED, "mmap");
    ptr.cast()
}

impl Shared {
    /// Fresh memfd memory: one file, each region at its own offset.
    fn new() -> Shared {
        let total: u64 = LAYOUT.iter().map(|r| r.1).sum();
        let file = memfd(total);
        let mut offset = 0;
        let regions = LAYOUT
            .iter()
            .map(|&(guest_addr, len)| {
                let r = Region {
                    guest_addr,
                    ptr: map(len, Some((&file, offset))),
                    len,
                    file: file.clone(),
                    offset,
                };
                offset += len;
                r
            })
            .collect();
        Shared {
            regions,
            anonymous: false,
        }
    }

    /// The same files mapped a second time (what the destination process
    /// does with the descriptors it received).
    fn map_again(&self) -> Shared {
        let regions = self
            .regions
            .iter()
            .map(|r| Region {
                guest_addr: r.guest_addr,
                ptr: map(r.len, Some((&r.file, r.offset))),
                len: r.len,
                file: r.file.clone(),
                offset: r.offset,
            })
            .collect();
        Shared {
            regions,
            anonymous: false,
        }
    }

    /// Private anonymous memory of the same layout.
    fn anonymous() -> Shared {
        let regions = LAYOUT
            .iter()
            .map(|&(guest_addr, len)| Region {
                guest_addr,
                ptr: map(len, None),
                len,
                file: memfd(4096),
                offset: 0,
            })
            .collect();
        Shared {
            regions,
            anonymous: true,
        }
    }

    fn poison(&self, byte: u8) {
        for r in &self.regions {
            // SAFETY: the whole mapping, which `self` owns.
            unsafe { std::ptr::write_bytes(r.ptr, byte, r.len as usize) };
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        for r in &self.regions {
            // SAFETY: exactly what mmap returned; the engine's borrow is over.
            unsafe { libc::munmap(r.ptr.cast(), r.len as usize) };
        }
    }
}

// SAFETY: every region is a live read-write mapping owned by `self`, page
// aligned (mmap), sorted by guest address (LAYOUT is), the file kept open.
unsafe impl GuestMemory for Shared {
    fn regions(&self) -> Vec<HostRegion<'_>> {
        self.regions
            .iter()
            .map(|r| {
                let backing = if self.anonymous {
                    Backing::PrivateAnonymous
                } else {
                    Backing::SharedFile {
                        fd: r.file.as_fd(),
                        offset: r.offset,
                    }
                };
                HostRegion::new(r.guest_addr, r.ptr, r.len, backing)
            })
            .collect()
    }

    /// Nothing: the soft VM logs its own device writes.
    fn take_vmm_dirty(&self, _region: usize, _words: &mut [u64]) {}
}

fn soft(mem: Shared, config: &SoftConfig) -> SoftVm {
    SoftVm::with_guest_memory(Box::new(mem), config, SoftTracking::Bitmap).expect("soft VM")
}

fn busy() -> SoftConfig {
    SoftConfig {
        guest_writers: 2,
        device_writers: 1,
        pages_per_ms: 5,
    }
}

fn receive_cfg() -> ReceiveConfig {
    ReceiveConfig {
        io_timeout: Duration::from_secs(5),
    }
}

fn config() -> MigrationConfig {
    MigrationConfig {
        io_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

#[test]
fn a_local_hand_over_moves_state_only_and_the_destination_sees_the_guest() {
    let mem = Shared::new();
    let again = mem.map_again();
    let src = soft(mem, &busy());
    src.fill(9);
    // The writers change memory while the hand-over runs.
    let idle = SoftConfig::idle();
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        receive_local(Box::new(b), &receive_cfg(), |_| Ok(soft(again, &idle)))
    });
    src.start();
    std::thread::sleep(Duration::from_millis(20));
    let report = migrate_local(
        &src,
        Box::new(a),
        &config(),
        &CancelToken::new(),
        &mut |_| {},
    )
    .expect("local hand-over");
    let (dst, received) = dest.join().unwrap().expect("destination");
    assert!(src.is_paused(), "the source stays paused after Go");
    assert_eq!(report.pages_sent, 0, "no page travels");
    assert_eq!(report.final_pages, 0);
    assert!(report.rounds.is_empty(), "no pre-copy round");
    assert_eq!(received.pages + received.zero_pages, 0);
    assert!(received.running);
    dst.stop();
    let (s, d) = (src.snapshot(), dst.snapshot());
    assert!(s == d, "the destination's mapping shows other bytes");
    assert!(
        d.iter().filter(|b| **b != 0).count() > d.len() / 2,
        "the fill is there"
    );
    // The state travelled: the destination continues the writers' count.
    assert_eq!(dst.writes(), src.writes());
    println!(
        "local hand-over: downtime {:.3} ms, total {:.3} ms, {} state bytes",
        report.downtime_ms, report.total_ms, report.state_bytes
    );
}

#[test]
fn another_file_is_refused_and_the_source_memory_is_untouched() {
    let src = soft(Shared::new(), &SoftConfig::idle());
    src.fill(7);
    src.start();
    let before = src.snapshot();
    let other = Shared::new();
    other.poison(0x5A);
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        receive_local(Box::new(b), &receive_cfg(), |_| {
            Ok(soft(other, &SoftConfig::idle()))
        })
        .map(|_| ())
    });
    let e = migrate_local(
        &src,
        Box::new(a),
        &config(),
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("is not the source's memory"), "{e}");
    let de = dest.join().unwrap().unwrap_err();
    assert!(
        de.to_string().contains("is not the source's memory"),
        "{de}"
    );
    assert!(!src.is_paused(), "the source runs as before");
    assert!(src.snapshot() == before, "source memory changed");
}

#[test]
fn private_memory_on_the_destination_is_refused() {
    let src = soft(Shared::new(), &SoftConfig::idle());
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        receive_local(Box::new(b), &receive_cfg(), |_| {
            Ok(soft(Shared::anonymous(), &SoftConfig::idle()))
        })
        .map(|_| ())
    });
    let e = migrate_local(
        &src,
        Box::new(a),
        &config(),
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("private anonymous"), "{e}");
    assert!(dest.join().unwrap().is_err());
}

#[test]
fn private_memory_on_the_source_is_refused_before_anything_is_sent() {
    let src = soft(Shared::anonymous(), &SoftConfig::idle());
    src.start();
    let (a, mut b) = mem::pair();
    let e = migrate_local(
        &src,
        Box::new(a),
        &config(),
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(
            e.kind,
            ErrorKind::Local(LocalError::NotShared { index: 0, .. })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("private anonymous"), "{e}");
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut b, &mut buf).unwrap();
    assert!(buf.is_empty(), "{} bytes were sent", buf.len());
    assert!(!src.is_paused());
}

#[test]
fn another_host_is_refused() {
    let mem = Shared::new();
    let mut id = LocalIdentity::of(&mem).unwrap();
    assert!(id.check(&mem.map_again()).is_ok());
    id.boot_id = "00000000-0000-0000-0000-000000000000".into();
    let e = id.check(&mem).unwrap_err();
    assert!(matches!(e, LocalError::DifferentHost { .. }), "{e}");
    assert!(e.to_string().contains("another host"), "{e}");
}

#[test]
fn a_failure_before_go_leaves_the_source_running_with_its_memory() {
    // The destination cannot restore the state (a section it does not
    // know): it fails after reading it, before Ready.
    let src = HookedVm::new(soft(Shared::new(), &SoftConfig::idle())).on_save_state(|vm| {
        let mut s = vm.save_state()?;
        s.push(Section::new("unknown.device", 1, vec![1, 2, 3]));
        Ok(s)
    });
    src.vm().fill(3);
    src.vm().start();
    let before = src.vm().snapshot();
    // The destination maps the same files (read from the source's backing).
    let dst_mem = {
        let regions = src.vm().memory().regions();
        let Backing::SharedFile { fd, .. } = regions[0].backing else {
            panic!("shared memory")
        };
        let file = Arc::new(File::from(fd.try_clone_to_owned().unwrap()));
        let mut offset = 0;
        Shared {
            regions: LAYOUT
                .iter()
                .map(|&(guest_addr, len)| {
                    let r = Region {
                        guest_addr,
                        ptr: map(len, Some((&file, offset))),
                        len,
                        file: file.clone(),
                        offset,
                    };
                    offset += len;
                    r
                })
                .collect(),
            anonymous: false,
        }
    };
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        receive_local(Box::new(b), &receive_cfg(), |_| {
            Ok(soft(dst_mem, &SoftConfig::idle()))
        })
        .map(|_| ())
    });
    let e = migrate_local(
        &src,
        Box::new(a),
        &config(),
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(!e.is_ambiguous(), "{e}");
    assert!(e.to_string().contains("unknown.device"), "{e}");
    assert!(dest.join().unwrap().is_err());
    assert!(!src.vm().is_paused(), "the source runs again");
    assert!(src.vm().snapshot() == before, "source memory changed");
}

#[test]
fn a_copying_destination_never_scrubs_the_sources_shared_memory() {
    // The source asks for a local hand-over, but the destination is a
    // plain (copying) receiver whose memory is the source's file: it must
    // refuse, not zero the memory before the first page.
    let mem = Shared::new();
    let again = mem.map_again();
    let src = soft(mem, &SoftConfig::idle());
    src.fill(11);
    src.start();
    let before = src.snapshot();
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        receive(Box::new(b), &receive_cfg(), |_| {
            Ok(soft(again, &SoftConfig::idle()))
        })
        .map(|_| ())
    });
    let e = migrate_local(
        &src,
        Box::new(a),
        &config(),
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap_err();
    let _ = dest.join().unwrap();
    let zeroed = before
        .iter()
        .zip(src.snapshot())
        .filter(|(a, b)| **a != *b)
        .count();
    assert_eq!(
        zeroed, 0,
        "bytes of the shared memory were overwritten ({e})"
    );
    assert!(e.to_string().contains("source's own guest memory"), "{e}");
    assert!(!src.is_paused());
}

#[test]
fn a_copying_receiver_does_not_grant_a_local_hand_over() {
    // Own (private) memory on the destination: it would take a copy, but
    // the source asked for a hand-over and gets no grant.
    let src = soft(Shared::new(), &SoftConfig::idle());
    src.start();
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        receive(Box::new(b), &receive_cfg(), |_| {
            Ok(soft(Shared::anonymous(), &SoftConfig::idle()))
        })
        .map(|_| ())
    });
    let e = migrate_local(
        &src,
        Box::new(a),
        &config(),
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("did not grant a local hand-over"),
        "{e}"
    );
    assert!(dest.join().unwrap().is_err());
    assert!(!src.is_paused());
}

#[test]
fn a_local_receiver_refuses_a_copying_migration_without_writing() {
    let mem = Shared::new();
    let again = mem.map_again();
    let src = soft(mem, &SoftConfig::idle());
    src.fill(5);
    src.start();
    let before = src.snapshot();
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        receive_local(Box::new(b), &receive_cfg(), |_| {
            Ok(soft(again, &SoftConfig::idle()))
        })
        .map(|_| ())
    });
    let e = migrate(
        &src,
        Box::new(a),
        &config(),
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("takes only a local hand-over"),
        "{e}"
    );
    assert!(dest.join().unwrap().is_err());
    assert!(src.snapshot() == before);
    assert!(!src.is_paused());
}
