//! The two entry points, `Migration` (source) and `Reception`
//! (destination): settings refused before anything happens, page streams
//! only with an opener, cancel and progress on both sides (never a
//! destination callback while the guest is paused), and setup failures as
//! `MigrationError`s.

mod common;

use std::io::Read;
use std::sync::{Arc, Mutex};

use livemig::memory::{GuestMemory, MemoryLayout, RegionDesc};
use livemig::state::Section;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::{mem, Transport};
use livemig::vm::{DestinationVm, SourceVm, VmError};
use livemig::{
    CancelToken, ErrorKind, Migration, MigrationConfig, MigrationError, Phase, Progress,
    ReceiveProgress, Reception,
};

fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: 4 << 20,
    }])
    .unwrap()
}

fn running_source() -> SoftVm {
    let vm = SoftVm::new(&layout(), &SoftConfig::default()).unwrap();
    vm.fill(7);
    vm.start();
    vm
}

fn soft_destination(
    t: mem::MemTransport,
) -> std::thread::JoinHandle<Result<SoftVm, MigrationError>> {
    std::thread::spawn(move || {
        Reception::new(Box::new(t))
            .run(|d| SoftVm::new(&d.layout, &SoftConfig::idle()))
            .map(|(vm, _)| vm)
    })
}

/// `streams > 1` through the config, without an opener: a `Config` error
/// naming the field, and not a byte on the wire (the peer reads end of
/// file once the transport is dropped).
#[test]
fn streams_without_an_opener_are_refused_before_anything() {
    let src = running_source();
    let (a, mut b) = mem::pair();
    let config = MigrationConfig {
        streams: 4,
        ..Default::default()
    };
    let e = Migration::new(&src)
        .config(config)
        .run(Box::new(a))
        .expect_err("refused");
    assert_eq!(e.phase, Phase::Handshake, "{e}");
    match &e.kind {
        ErrorKind::Config(c) => assert_eq!(c.field, "streams", "{e}"),
        other => panic!("not a Config error: {other}"),
    }
    let mut buf = [0u8; 1];
    assert_eq!(b.read(&mut buf).unwrap(), 0, "something was sent");
    assert!(!src.is_paused(), "the source stopped running");
}

/// `streams(n, opener)` overrides the config's count in either order, and
/// the destination with an acceptor grants them.
#[test]
fn streams_with_an_opener_are_used() {
    let src = running_source();
    let (a, b) = mem::pair();
    let (opener, acceptor) = mem::streams();
    let dest = common::soft_destination_with_streams(b, acceptor);
    let report = Migration::new(&src)
        .streams(3, opener)
        .config(MigrationConfig::default()) // streams: 1, overridden
        .run(Box::new(a))
        .expect("migrates");
    let (guest, received) = dest.join().unwrap().expect("received");
    assert_eq!(report.streams, 3);
    assert_eq!(received.streams, 3);
    guest.stop();
    assert_eq!(guest.snapshot(), src.snapshot());
}

/// What each side's callback saw, and whether the source VM was paused then.
type Seen<T> = Arc<Mutex<Vec<(T, bool)>>>;

/// The source's events in order; exactly one (`Paused`) arrives while the
/// source VM is paused before the commit. The destination's events,
/// `Accepted`, one `RoundReceived` per pre-copy round, then `Completed`.
#[test]
fn progress_on_both_sides_and_the_blackout() {
    let src = Arc::new(running_source());
    let (a, b) = mem::pair();
    let dest_seen: Seen<String> = Arc::default();
    let (seen, probe) = (dest_seen.clone(), src.clone());
    let dest = std::thread::spawn(move || {
        Reception::new(Box::new(b))
            .progress(move |p: &ReceiveProgress| {
                let name = match p {
                    ReceiveProgress::Accepted { .. } => "accepted".to_string(),
                    ReceiveProgress::Completed { running } => format!("completed {running}"),
                    ReceiveProgress::RoundReceived { round, bytes } => {
                        format!("round {round} {bytes}")
                    }
                    other => format!("{other:?}"),
                };
                seen.lock().unwrap().push((name, probe.is_paused()));
            })
            .run(|d| SoftVm::new(&d.layout, &SoftConfig::idle()))
    });
    let mut source_seen: Vec<(String, bool)> = Vec::new();
    Migration::new(&*src)
        .progress(|p: &Progress| {
            let name = match p {
                Progress::Accepted => "accepted",
                Progress::Round(_) => "round",
                Progress::Paused { .. } => "paused",
                Progress::Completed { .. } => "completed",
                _ => "other",
            };
            source_seen.push((name.to_string(), src.is_paused()));
        })
        .run(Box::new(a))
        .expect("migrates");
    let (_guest, received) = dest.join().unwrap().expect("received");
    assert!(received.running);

    let names: Vec<&str> = source_seen.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"accepted"), "{names:?}");
    assert!(names.contains(&"round"), "{names:?}");
    assert_eq!(
        &names[names.len() - 2..],
        ["paused", "completed"],
        "{names:?}"
    );
    let paused_before_commit: Vec<&str> = source_seen
        .iter()
        .filter(|(n, paused)| *paused && n != "completed")
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(paused_before_commit, ["paused"], "{source_seen:?}");

    let mut dest_seen = dest_seen.lock().unwrap().clone();
    // One `RoundReceived` per round the source reported, numbered from 0,
    // with the bytes read growing; the last may come once the source
    // paused (the source pauses as soon as the round is read).
    let rounds: Vec<(u32, u64)> = dest_seen
        .iter()
        .filter_map(|(n, _)| {
            let mut w = n.strip_prefix("round ")?.split(' ');
            Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
        })
        .collect();
    let source_rounds = names.iter().filter(|n| **n == "round").count();
    assert_eq!(rounds.len(), source_rounds, "{dest_seen:?} / {names:?}");
    for (i, w) in rounds.windows(2).enumerate() {
        assert_eq!((w[0].0, w[1].0), (i as u32, i as u32 + 1), "{rounds:?}");
        assert!(w[1].1 > w[0].1, "bytes read do not grow: {rounds:?}");
    }
    assert_eq!(rounds[0].0, 0, "{rounds:?}");
    assert!(
        rounds[0].1 > 4 << 20,
        "round 0 carried the memory: {rounds:?}"
    );
    dest_seen.retain(|(n, _)| !n.starts_with("round "));
    assert_eq!(
        dest_seen,
        [
            ("accepted".to_string(), false),
            // The source stays paused for good after a success: the guest
            // runs on the destination when `Completed` arrives.
            ("completed true".to_string(), true)
        ]
    );
}

/// A destination cancelled before `Go` (here: while it accepts) drops its
/// VM and fails `Cancelled`; the source keeps its guest running.
#[test]
fn destination_cancel_before_go_keeps_the_source() {
    let src = running_source();
    let (a, b) = mem::pair();
    let token = CancelToken::new();
    let t2 = token.clone();
    let dest = std::thread::spawn(move || {
        Reception::new(Box::new(b))
            .cancel(t2.clone())
            .progress(move |p: &ReceiveProgress| {
                if let ReceiveProgress::Accepted { .. } = p {
                    t2.cancel();
                }
            })
            .run(|d| SoftVm::new(&d.layout, &SoftConfig::idle()))
            .map(|_| ())
    });
    let e = Migration::new(&src).run(Box::new(a)).expect_err("fails");
    let de = dest.join().unwrap().expect_err("cancelled");
    assert!(matches!(de.kind, ErrorKind::Cancelled), "{de}");
    assert!(token.is_cancelled());
    assert!(!e.is_ambiguous(), "{e}");
    assert!(!src.is_paused(), "the source does not run its guest: {e}");
}

/// A destination VM that cancels its own reception from `resume` — after
/// `Go`, where a cancel must be ignored.
struct CancelsOnResume {
    vm: SoftVm,
    token: CancelToken,
}

impl DestinationVm for CancelsOnResume {
    fn memory(&self) -> &dyn GuestMemory {
        DestinationVm::memory(&self.vm)
    }

    fn restore_state(&mut self, sections: &[Section]) -> Result<(), VmError> {
        self.vm.restore_state(sections)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.token.cancel();
        self.vm.resume()
    }
}

/// Once the destination read `Go` a cancel is ignored: the guest runs
/// there and the source hears `Resumed` (not an ambiguous outcome).
#[test]
fn destination_cancel_after_go_is_ignored() {
    let src = running_source();
    let (a, b) = mem::pair();
    let token = CancelToken::new();
    let t2 = token.clone();
    let dest = std::thread::spawn(move || {
        Reception::new(Box::new(b)).cancel(t2.clone()).run(|d| {
            let vm = SoftVm::new(&d.layout, &SoftConfig::idle())?;
            Ok(CancelsOnResume { vm, token: t2 })
        })
    });
    let report = Migration::new(&src).run(Box::new(a));
    let (guest, received) = dest.join().unwrap().expect("received despite the cancel");
    report.expect("the source heard Resumed");
    assert!(received.running);
    assert!(!token.is_cancelled(), "the cancel after Go was not ignored");
    guest.vm.stop();
    assert_eq!(guest.vm.snapshot(), src.snapshot());
}

/// A token cancelled before the reception starts: refused at once, the VM
/// is never built.
#[test]
fn destination_cancelled_before_start() {
    let (_a, b) = mem::pair();
    let token = CancelToken::new();
    token.cancel();
    let e = Reception::new(Box::new(b))
        .cancel(token)
        .run(|d| -> Result<SoftVm, VmError> { panic!("built a VM for {d:?}") })
        .map(|_| ())
        .expect_err("cancelled");
    assert!(matches!(e.kind, ErrorKind::Cancelled), "{e}");
}

/// Connecting fails: `?` turns the transport error into a `MigrationError`
/// of the handshake phase, matchable as a link failure.
#[test]
#[cfg(feature = "net")]
fn a_transport_error_is_a_link_failure() {
    fn connect_and_migrate(vm: &SoftVm) -> Result<(), MigrationError> {
        let ep = "unix:/nonexistent/livemig-builder-test.sock".parse()?;
        let t: Box<dyn Transport> = livemig::transport::connect(&ep, None)?;
        Migration::new(vm).run(t)?;
        Ok(())
    }
    let src = running_source();
    let e = connect_and_migrate(&src).expect_err("no such socket");
    assert_eq!(e.phase, Phase::Handshake);
    assert!(matches!(e.kind, ErrorKind::Transport(_)), "{e}");
    assert!(e.is_link_failure() && !e.is_peer_fault(), "{e}");
}

/// A source migrating under a guard that already migrated is refused
/// before it touches the VM or the transport.
#[test]
fn the_guard_refuses_a_second_migration() {
    let src = running_source();
    let guard = livemig::MigrationGuard::new();
    let (a, b) = mem::pair();
    let dest = soft_destination(b);
    Migration::new(&src)
        .guard(&guard)
        .run(Box::new(a))
        .expect("migrates");
    dest.join().unwrap().expect("received");
    assert_eq!(guard.state(), livemig::GuardState::Migrated);
    let (a, mut b) = mem::pair();
    let e = Migration::new(&src)
        .guard(&guard)
        .run(Box::new(a))
        .expect_err("refused");
    assert!(matches!(e.kind, ErrorKind::Guard(_)), "{e}");
    let mut buf = [0u8; 1];
    assert_eq!(b.read(&mut buf).unwrap(), 0, "something was sent");
}

/// A link that is only a reader, a writer and an abort (no timeouts, no
/// clones): one end of a socket pair used as plain halves.
fn duplex_end(s: std::os::unix::net::UnixStream, name: &str) -> Box<dyn Transport> {
    use livemig::transport::duplex::DuplexTransport;
    let reader = s.try_clone().unwrap();
    let closer = s.try_clone().unwrap();
    let abort = move || {
        let _ = closer.shutdown(std::net::Shutdown::Both);
    };
    Box::new(DuplexTransport::new(reader, s, abort, name).unwrap())
}

/// The engine migrates over `DuplexTransport`s, with page streams too.
#[test]
fn migrates_over_reader_writer_pairs() {
    struct Opener(crossbeam_channel::Sender<Box<dyn Transport>>);
    impl livemig::transport::StreamOpener for Opener {
        fn open(&mut self) -> std::io::Result<Box<dyn Transport>> {
            let (a, b) = std::os::unix::net::UnixStream::pair()?;
            let _ = self.0.send(duplex_end(b, "duplex:stream-dst"));
            Ok(duplex_end(a, "duplex:stream-src"))
        }
    }
    struct Acceptor(crossbeam_channel::Receiver<Box<dyn Transport>>);
    impl livemig::transport::StreamAcceptor for Acceptor {
        fn accept_stream(
            &mut self,
            timeout: std::time::Duration,
        ) -> std::io::Result<Box<dyn Transport>> {
            self.0
                .recv_timeout(timeout)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::TimedOut, e.to_string()))
        }
    }
    let src = running_source();
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    let control = duplex_end(b, "duplex:dst");
    let dest = std::thread::spawn(move || {
        Reception::new(control)
            .accept_streams(Acceptor(rx))
            .run(|d| SoftVm::new(&d.layout, &SoftConfig::idle()))
    });
    let report = Migration::new(&src)
        .streams(2, Opener(tx))
        .run(duplex_end(a, "duplex:src"))
        .expect("migrates");
    let (guest, received) = dest.join().unwrap().expect("received");
    assert_eq!((report.streams, received.streams), (2, 2));
    guest.stop();
    assert_eq!(guest.snapshot(), src.snapshot());
}

/// A destination waiting for page streams that never come (the source's
/// opener connects nowhere) is cancelled: it returns `Cancelled` instead
/// of waiting out its hour-long `io_timeout`.
#[test]
fn destination_cancel_while_accepting_streams() {
    /// Opens streams whose other end goes nowhere.
    struct Nowhere(Vec<mem::MemTransport>);
    impl livemig::transport::StreamOpener for Nowhere {
        fn open(&mut self) -> std::io::Result<Box<dyn Transport>> {
            let (a, b) = mem::pair();
            self.0.push(b);
            Ok(Box::new(a))
        }
    }
    let src = running_source();
    let (a, b) = mem::pair();
    let (_opener, acceptor) = mem::streams();
    let token = CancelToken::new();
    let (t2, t3) = (token.clone(), token.clone());
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let r = Reception::new(Box::new(b))
            .config(livemig::ReceiveConfig {
                io_timeout: std::time::Duration::from_secs(3600),
            })
            .accept_streams(acceptor)
            .cancel(t2)
            .progress(move |p: &ReceiveProgress| {
                if let ReceiveProgress::Accepted { .. } = p {
                    // Cancel once the acceptor is waiting.
                    let t = t3.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(std::time::Duration::from_millis(200));
                        t.cancel();
                    });
                }
            })
            .run(|d| SoftVm::new(&d.layout, &SoftConfig::idle()))
            .map(|_| ());
        let _ = done_tx.send(r);
    });
    let config = MigrationConfig {
        io_timeout: std::time::Duration::from_secs(3600),
        ..Default::default()
    };
    let source_token = CancelToken::new();
    let s2 = source_token.clone();
    let src_result = std::thread::scope(|s| {
        let h = s.spawn(|| {
            Migration::new(&src)
                .config(config)
                .streams(2, Nowhere(Vec::new()))
                .cancel(s2)
                .run(Box::new(a))
        });
        let r = done_rx.recv_timeout(std::time::Duration::from_secs(60));
        source_token.cancel(); // in case the source still waits
        (r, h.join().unwrap())
    });
    let (dest, source) = src_result;
    let dest = dest.expect("the destination did not return after the cancel");
    let e = dest.expect_err("cancelled");
    assert!(matches!(e.kind, ErrorKind::Cancelled), "{e}");
    assert!(token.is_cancelled());
    let se = source.expect_err("the source does not migrate");
    assert!(!se.is_ambiguous(), "{se}");
    assert!(!src.is_paused(), "the source does not run its guest: {se}");
}

/// A destination transport whose reads, once `slow` is set, each wait
/// 300 ms first (a slow link delivering `Go`).
struct SlowAfter {
    inner: Box<dyn Transport>,
    slow: Arc<std::sync::atomic::AtomicBool>,
}

impl std::io::Read for SlowAfter {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.slow.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        self.inner.read(buf)
    }
}

impl std::io::Write for SlowAfter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Transport for SlowAfter {
    fn set_read_timeout(&mut self, t: Option<std::time::Duration>) -> std::io::Result<()> {
        self.inner.set_read_timeout(t)
    }
    fn set_write_timeout(&mut self, t: Option<std::time::Duration>) -> std::io::Result<()> {
        self.inner.set_write_timeout(t)
    }
    fn shutdown(&self) -> std::io::Result<()> {
        self.inner.shutdown()
    }
    fn peer(&self) -> String {
        self.inner.peer()
    }
    fn try_clone(&self) -> std::io::Result<Box<dyn Transport>> {
        Ok(Box::new(SlowAfter {
            inner: self.inner.try_clone()?,
            slow: self.slow.clone(),
        }))
    }
}

/// A destination VM that, when its state is restored, slows its link and
/// has its reception cancelled 100 ms later — after `Ready`, while `Go`
/// is on its way.
struct CancelsAfterRestore {
    vm: SoftVm,
    token: CancelToken,
    slow: Arc<std::sync::atomic::AtomicBool>,
}

impl DestinationVm for CancelsAfterRestore {
    fn memory(&self) -> &dyn GuestMemory {
        DestinationVm::memory(&self.vm)
    }

    fn restore_state(&mut self, sections: &[Section]) -> Result<(), VmError> {
        self.vm.restore_state(sections)?;
        self.slow.store(true, std::sync::atomic::Ordering::SeqCst);
        let t = self.token.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            t.cancel();
        });
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.vm.resume()
    }
}

/// A destination cancelled between `Ready` and reading `Go` answers
/// `Abandoned`: its VM never runs and the source resumes its guest
/// instead of staying paused as ambiguous.
#[test]
fn destination_cancel_while_go_is_on_its_way_is_not_ambiguous() {
    let src = running_source();
    let (a, b) = mem::pair();
    let token = CancelToken::new();
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (t2, s2) = (token.clone(), slow.clone());
    let dest = std::thread::spawn(move || {
        let t = SlowAfter {
            inner: Box::new(b),
            slow: s2.clone(),
        };
        Reception::new(Box::new(t))
            .cancel(t2.clone())
            .run(|d| {
                let vm = SoftVm::new(&d.layout, &SoftConfig::idle())?;
                Ok(CancelsAfterRestore {
                    vm,
                    token: t2,
                    slow: s2,
                })
            })
            .map(|_| ())
    });
    let e = Migration::new(&src)
        .run(Box::new(a))
        .expect_err("abandoned");
    let de = dest.join().unwrap().expect_err("cancelled");
    assert!(matches!(de.kind, ErrorKind::Cancelled), "{de}");
    assert!(!e.is_ambiguous(), "the source was left ambiguous: {e}");
    assert!(matches!(e.kind, ErrorKind::Abandoned(_)), "{e}");
    assert!(!src.is_paused(), "the source does not run its guest: {e}");
}
