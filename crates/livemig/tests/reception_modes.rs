//! The destination's one entry point in its other two modes:
//! `Reception::postcopy` and `Reception::local` (with `Migration::local`
//! on the source), each with the builder's cancel and progress. A cancel
//! before `Go` gives the guest back to the source; one after `Go` is
//! ignored (the guest runs on the destination).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex};

use livemig::destination::postcopy::PostcopyMemory;
use livemig::memory::{Backing, GuestMemory, HostRegion, MemoryLayout, RegionDesc};
use livemig::protocol::MsgKind;
use livemig::source::postcopy::PostcopyConfig;
use livemig::state::Section;
use livemig::testing::fault::{At, Fault, FaultTransport};
use livemig::testing::postcopy::SoftPager;
use livemig::testing::soft::{SoftConfig, SoftTracking, SoftVm};
use livemig::transport::{mem, Transport};
use livemig::vm::{DestinationVm, SourceVm, VmError};
use livemig::{
    CancelToken, ErrorKind, GuardState, Migration, MigrationConfig, MigrationError, MigrationGuard,
    Phase, ReceiveProgress, ReceiveReport, Reception, Report,
};

const SIZE: u64 = 4 << 20;

fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: SIZE,
    }])
    .unwrap()
}

/// When the destination VM cancels its own reception.
#[derive(Clone, Copy, PartialEq)]
enum CancelAt {
    Never,
    /// In `restore_state`: before `Ready`, so before `Go`.
    Restore,
    /// In `resume`: after `Go`.
    Resume,
}

/// A soft destination VM that cancels `token` at `at`.
struct Dest {
    vm: SoftVm,
    token: CancelToken,
    at: CancelAt,
}

impl DestinationVm for Dest {
    fn memory(&self) -> &dyn GuestMemory {
        DestinationVm::memory(&self.vm)
    }
    fn restore_state(&mut self, sections: &[Section]) -> Result<(), VmError> {
        self.vm.restore_state(sections)?;
        if self.at == CancelAt::Restore {
            self.token.cancel();
        }
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        if self.at == CancelAt::Resume {
            self.token.cancel();
        }
        self.vm.resume()
    }
}

fn soft_pager(
    memory: &dyn GuestMemory,
    layout: &MemoryLayout,
) -> Result<Box<dyn PostcopyMemory>, VmError> {
    Ok(Box::new(SoftPager::new(memory, layout)))
}

type Events = Arc<Mutex<Vec<&'static str>>>;

fn record(events: &Events) -> impl FnMut(&ReceiveProgress) + 'static {
    let events = events.clone();
    move |p| {
        let name = match p {
            ReceiveProgress::Accepted { .. } => "accepted",
            ReceiveProgress::PostcopyActive { .. } => "postcopy-active",
            // The pages arriving, as often as the push goes: only the
            // last one (every page in) is kept.
            ReceiveProgress::PostcopyInstalled { missing_pages, .. } if *missing_pages > 0 => {
                return
            }
            ReceiveProgress::PostcopyInstalled { .. } => "all-in",
            ReceiveProgress::Completed { .. } => "completed",
            _ => "other",
        };
        events.lock().unwrap().push(name);
    }
}

type Received = Result<(Dest, ReceiveReport), MigrationError>;

/// A pure post-copy migration of a running soft VM into a `Reception`
/// with `.postcopy(..)`, cancelled by the destination VM at `at`.
fn postcopy(
    at: CancelAt,
    token: &CancelToken,
    events: &Events,
) -> (SoftVm, Result<Report, MigrationError>, Received) {
    let src = SoftVm::new(&layout(), &SoftConfig::default()).unwrap();
    src.fill(3);
    src.start();
    let (a, b) = mem::pair();
    let (fa, fb) = mem::pair();
    let (t, ev) = (token.clone(), events.clone());
    let dest = std::thread::spawn(move || {
        Reception::new(Box::new(b))
            .postcopy(Box::new(fb), soft_pager)
            .cancel(t.clone())
            .progress(record(&ev))
            .run(|d| {
                Ok(Dest {
                    vm: SoftVm::new(&d.layout, &SoftConfig::idle())?,
                    token: t,
                    at,
                })
            })
    });
    let pc = PostcopyConfig {
        after_rounds: 0,
        on_non_convergence: false,
        ..Default::default()
    };
    let r = Migration::new(&src)
        .postcopy(Box::new(fa), pc)
        .run(Box::new(a));
    (src, r, dest.join().unwrap())
}

#[test]
fn a_destination_cancel_during_a_postcopy_reception_before_go_resumes_the_source() {
    let token = CancelToken::new();
    let events = Events::default();
    let (src, r, received) = postcopy(CancelAt::Restore, &token, &events);
    let de = received.err().expect("the destination was cancelled");
    assert!(matches!(de.kind, ErrorKind::Cancelled), "{de}");
    let se = r.expect_err("the source does not migrate");
    // The cancel (before `Ready`) broke the connections: the source, which
    // paused for the switch but never sent `Go`, resumes.
    assert!(!se.source_must_stay_paused(), "{se}");
    assert!(se.phase != Phase::Postcopy, "{se}");
    assert!(!src.is_paused(), "the source runs its guest again: {se}");
    assert_eq!(*events.lock().unwrap(), vec!["accepted"]);
}

#[test]
fn a_destination_cancel_after_go_in_postcopy_is_ignored() {
    let token = CancelToken::new();
    let events = Events::default();
    let (src, report, received) = postcopy(CancelAt::Resume, &token, &events);
    let report = report.expect("source");
    let (dest, received) = received.expect("received despite the cancel");
    assert!(!token.is_cancelled(), "the cancel after Go was not ignored");
    assert!(report.postcopy.is_some(), "switched to post-copy");
    assert!(received.postcopy.is_some());
    assert!(src.is_paused());
    dest.vm.stop();
    assert!(dest.vm.snapshot() == src.snapshot());
    let want = vec!["accepted", "postcopy-active", "all-in", "completed"];
    assert_eq!(*events.lock().unwrap(), want);
}

#[test]
fn a_postcopy_reception_reports_progress() {
    let events = Events::default();
    let (_, r, received) = postcopy(CancelAt::Never, &CancelToken::new(), &events);
    r.expect("source");
    received.expect("received");
    let want = vec!["accepted", "postcopy-active", "all-in", "completed"];
    assert_eq!(*events.lock().unwrap(), want);
}

#[test]
fn a_cancelled_token_refuses_a_postcopy_reception_at_once() {
    let token = CancelToken::new();
    token.cancel();
    let (_, fb) = mem::pair();
    let (_a, b) = mem::pair();
    let e = Reception::new(Box::new(b))
        .postcopy(Box::new(fb), soft_pager)
        .cancel(token)
        .run(|d| SoftVm::new(&d.layout, &SoftConfig::idle()))
        .map(|_| ())
        .expect_err("cancelled");
    assert!(matches!(e.kind, ErrorKind::Cancelled), "{e}");
    assert_eq!(e.phase, Phase::Handshake);
}

// ---- the same-host hand-over ----

/// Guest memory on one memfd, mapped shared (each "process" maps it once).
struct Shared {
    ptr: *mut u8,
    file: Arc<File>,
}

// SAFETY: the struct owns its mapping; nothing about it is thread-bound.
unsafe impl Send for Shared {}
// SAFETY: as above; `&self` only hands out the address.
unsafe impl Sync for Shared {}

impl Shared {
    fn new() -> Shared {
        // SAFETY: a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"reception-modes".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(SIZE).unwrap();
        Shared::map(Arc::new(file))
    }

    fn map(file: Arc<File>) -> Shared {
        // SAFETY: a new shared mapping of the whole file; checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap");
        Shared {
            ptr: ptr.cast(),
            file,
        }
    }

    fn map_again(&self) -> Shared {
        Shared::map(self.file.clone())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: exactly what mmap returned; the engine's borrow is over.
        unsafe { libc::munmap(self.ptr.cast(), SIZE as usize) };
    }
}

// SAFETY: one live read-write, page-aligned mapping owned by `self`, the
// file kept open.
unsafe impl GuestMemory for Shared {
    fn regions(&self) -> Vec<HostRegion<'_>> {
        let backing = Backing::SharedFile {
            fd: self.file.as_fd(),
            offset: 0,
        };
        vec![HostRegion::new(0, self.ptr, SIZE, backing)]
    }
    fn take_vmm_dirty(&self, _region: usize, _words: &mut [u64]) {}
}

fn shared_soft(mem: Shared, config: &SoftConfig) -> SoftVm {
    SoftVm::with_guest_memory(Box::new(mem), config, SoftTracking::Bitmap).expect("soft VM")
}

/// A local hand-over of a running soft VM, both sides through their
/// builders; the destination VM cancels at `at`.
fn local(
    at: CancelAt,
    token: &CancelToken,
    events: &Events,
    guard: &MigrationGuard,
) -> (SoftVm, Result<Report, MigrationError>, Received) {
    let mem = Shared::new();
    let again = mem.map_again();
    let src = shared_soft(mem, &SoftConfig::default());
    src.fill(5);
    src.start();
    let (a, b) = mem::pair();
    let (t, ev) = (token.clone(), events.clone());
    let dest = std::thread::spawn(move || {
        Reception::new(Box::new(b))
            .local()
            .cancel(t.clone())
            .progress(record(&ev))
            .run(|_| {
                Ok(Dest {
                    vm: shared_soft(again, &SoftConfig::idle()),
                    token: t,
                    at,
                })
            })
    });
    let r = Migration::new(&src).guard(guard).local().run(Box::new(a));
    (src, r, dest.join().unwrap())
}

#[test]
fn a_local_hand_over_through_both_builders() {
    let events = Events::default();
    let guard = MigrationGuard::new();
    let (src, r, received) = local(CancelAt::Never, &CancelToken::new(), &events, &guard);
    let report = r.expect("hand-over");
    let (dest, received) = received.expect("received");
    assert_eq!(report.pages_sent, 0);
    assert_eq!(received.pages + received.zero_pages, 0);
    assert!(received.running);
    assert_eq!(guard.state(), GuardState::Migrated);
    assert!(src.is_paused());
    dest.vm.stop();
    assert!(dest.vm.snapshot() == src.snapshot());
    assert_eq!(*events.lock().unwrap(), vec!["accepted", "completed"]);
}

#[test]
fn a_destination_cancel_during_a_local_hand_over_before_go_keeps_the_source() {
    let token = CancelToken::new();
    let events = Events::default();
    let guard = MigrationGuard::new();
    let (src, r, received) = local(CancelAt::Restore, &token, &events, &guard);
    let de = received.err().expect("the destination was cancelled");
    assert!(matches!(de.kind, ErrorKind::Cancelled), "{de}");
    let se = r.expect_err("the source does not hand over");
    assert!(!se.source_must_stay_paused(), "{se}");
    assert!(!src.is_paused(), "the source runs its guest again: {se}");
    assert_eq!(guard.state(), GuardState::Idle);
    assert_eq!(*events.lock().unwrap(), vec!["accepted"]);
}

#[test]
fn a_destination_cancel_after_go_in_a_local_hand_over_is_ignored() {
    let token = CancelToken::new();
    let guard = MigrationGuard::new();
    let (src, r, received) = local(CancelAt::Resume, &token, &Events::default(), &guard);
    r.expect("hand-over");
    received.expect("received despite the cancel");
    assert!(!token.is_cancelled(), "the cancel after Go was not ignored");
    assert!(src.is_paused());
}

#[test]
fn local_and_postcopy_are_one_or_the_other() {
    let (_, fb) = mem::pair();
    let (_a, b) = mem::pair();
    let e = Reception::new(Box::new(b))
        .postcopy(Box::new(fb), soft_pager)
        .local()
        .run(|d| SoftVm::new(&d.layout, &SoftConfig::idle()))
        .map(|_| ())
        .expect_err("refused");
    assert!(
        matches!(&e.kind, ErrorKind::Config(c) if c.field == "mode"),
        "{e}"
    );

    let src = SoftVm::new(&layout(), &SoftConfig::idle()).unwrap();
    let (fa, _) = mem::pair();
    let (a, _b) = mem::pair();
    let e = Migration::new(&src)
        .postcopy(Box::new(fa), PostcopyConfig::default())
        .local()
        .run(Box::new(a) as Box<dyn Transport>)
        .expect_err("refused");
    assert!(
        matches!(&e.kind, ErrorKind::Config(c) if c.field == "mode"),
        "{e}"
    );
    let e = Migration::new(&src)
        .config(MigrationConfig {
            streams: 2,
            ..Default::default()
        })
        .local()
        .checked_config()
        .expect_err("refused");
    assert!(
        matches!(&e.kind, ErrorKind::Config(c) if c.field == "streams"),
        "{e}"
    );
}

/// A [`ReceiveProgress`] of a post-copy reception, as the test keeps it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Seen {
    Accepted,
    Round,
    Active {
        running: bool,
        missing: u64,
    },
    Installed {
        installed: u64,
        missing: u64,
        bytes: u64,
    },
    Completed,
}

fn seen(p: &ReceiveProgress) -> Option<Seen> {
    Some(match p {
        ReceiveProgress::Accepted { .. } => Seen::Accepted,
        ReceiveProgress::RoundReceived { .. } => Seen::Round,
        ReceiveProgress::PostcopyActive {
            running,
            missing_pages,
        } => Seen::Active {
            running: *running,
            missing: *missing_pages,
        },
        ReceiveProgress::PostcopyInstalled {
            installed_pages,
            missing_pages,
            bytes,
        } => Seen::Installed {
            installed: *installed_pages,
            missing: *missing_pages,
            bytes: *bytes,
        },
        ReceiveProgress::Completed { .. } => Seen::Completed,
        _ => return None,
    })
}

/// What [`follow_postcopy`] saw: the events, the pages missing at the
/// switch and the source's reconnections.
struct Followed {
    events: Vec<Seen>,
    total: u64,
    reconnects: u32,
}

/// Pure post-copy of a filled, idle guest into a `Reception` with a
/// progress callback: every page is pushed after `Go`, at 1 MiB/s (the
/// 4 MiB take seconds: the push loop reads many frames and keepalives
/// while pages are still missing). With `cut`, the source's control
/// connection breaks before the third pushed `Pages` frame and both sides
/// continue on a new pair of connections.
fn follow_postcopy(cut: bool) -> Followed {
    let src = SoftVm::new(&layout(), &SoftConfig::idle()).unwrap();
    src.fill(5);
    src.start(); // running: a paused VM is never offered post-copy
    let (a, b) = mem::pair();
    let (fa, fb) = mem::pair();
    let (na, nb) = mem::pair();
    let (nfa, nfb) = mem::pair();
    let mut src_next = Some((Box::new(na) as Box<dyn Transport>, Box::new(nfa) as _));
    let mut dst_next = Some((Box::new(nb) as Box<dyn Transport>, Box::new(nfb) as _));
    let events: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let ev = events.clone();
    let dest = std::thread::spawn(move || {
        Reception::new(Box::new(b))
            .postcopy(Box::new(fb), soft_pager)
            .postcopy_reconnect(move || dst_next.take())
            .progress(move |p| ev.lock().unwrap().extend(seen(p)))
            .run(|d| SoftVm::new(&d.layout, &SoftConfig::idle()))
    });
    let pc = PostcopyConfig {
        after_rounds: 0,
        on_non_convergence: false,
        ..Default::default()
    };
    let config = MigrationConfig {
        max_bandwidth: Some(1 << 20),
        ..Default::default()
    };
    let a: Box<dyn Transport> = if cut {
        let spec = Fault::Drop.at(At::kind(MsgKind::Pages, 2));
        Box::new(FaultTransport::new(Box::new(a), spec).0)
    } else {
        Box::new(a)
    };
    let report = Migration::new(&src)
        .config(config)
        .postcopy(Box::new(fa), pc)
        .postcopy_reconnect(Box::new(move || src_next.take()))
        .run(a)
        .expect("source");
    let rp = report.postcopy.expect("switched to post-copy");
    let (dst, received) = dest.join().unwrap().expect("destination");
    dst.stop();
    assert!(dst.snapshot() == src.snapshot());
    let total = received.postcopy.expect("post-copy stats").discard_pages;
    assert!(total > 0, "pages were missing at the switch");
    let events = events.lock().unwrap().clone();
    Followed {
        events,
        total,
        reconnects: rp.reconnects,
    }
}

/// The event order of a post-copy reception: `Accepted`, rounds,
/// `PostcopyActive` with every page missing, `PostcopyInstalled` with the
/// installed pages and bytes growing and the missing pages reaching 0
/// once, `Completed`.
fn check_postcopy_events(f: &Followed) {
    let (events, total) = (&f.events, f.total);
    assert_eq!(events.first(), Some(&Seen::Accepted), "{events:?}");
    assert_eq!(events.last(), Some(&Seen::Completed), "{events:?}");
    let body = &events[1..events.len() - 1];
    let active = body
        .iter()
        .position(|e| matches!(e, Seen::Active { .. }))
        .unwrap_or_else(|| panic!("no PostcopyActive: {events:?}"));
    assert!(
        body[..active].iter().all(|e| *e == Seen::Round),
        "{events:?}"
    );
    let want = Seen::Active {
        running: true,
        missing: total,
    };
    assert_eq!(body[active], want, "every page missing at the resume");
    let installed: Vec<(u64, u64, u64)> = body[active + 1..]
        .iter()
        .map(|e| match e {
            Seen::Installed {
                installed,
                missing,
                bytes,
            } => (*installed, *missing, *bytes),
            other => panic!("{other:?} after PostcopyActive: {events:?}"),
        })
        .collect();
    assert!(installed.len() >= 2, "the push was followed: {events:?}");
    for w in installed.windows(2) {
        assert!(w[0].0 < w[1].0, "installed pages grow: {events:?}");
        assert!(w[0].2 <= w[1].2, "bytes grow: {events:?}");
    }
    for (i, m, _) in &installed {
        assert_eq!(i + m, total, "installed + missing = discarded: {events:?}");
    }
    let last = installed[installed.len() - 1];
    assert_eq!((last.0, last.1), (total, 0), "{events:?}");
    assert!(last.2 >= total * 4096, "every page's bytes: {events:?}");
    assert_eq!(
        installed.iter().filter(|(_, m, _)| *m == 0).count(),
        1,
        "one event when every page is in: {events:?}"
    );
}

#[test]
fn a_postcopy_reception_reports_the_guest_running_here_and_the_pages_arriving() {
    let f = follow_postcopy(false);
    assert_eq!(f.reconnects, 0);
    check_postcopy_events(&f);
}

#[test]
fn a_postcopy_reception_resumed_after_a_break_keeps_reporting_the_pages_arriving() {
    let f = follow_postcopy(true);
    assert_eq!(f.reconnects, 1, "the push broke and resumed");
    check_postcopy_events(&f);
}
