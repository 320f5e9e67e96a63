//! The engine end to end on the software VM (no KVM needed): memory plus
//! writer threads, dirty tracking through bitmaps, an in-memory transport.
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livemig::bitmap::DirtyBitmap;
use livemig::memory::{MemoryLayout, RegionDesc};
use livemig::testing::fault::{At, Fault, FaultTransport};
use livemig::testing::hooked::HookedVm;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::{mem, Transport};
use livemig::vm::{DirtyTracker, Rearm, SourceVm, VmError};
use livemig::{
    migrate, receive, CancelToken, ErrorKind, Migration, MigrationConfig, Phase, ReceiveConfig,
    SOURCE_CANCEL_GRACE,
};

mod common;
use common::{assert_heard_the_cancel, migrate_with_defaults, soft_destination};

fn layout(mib: u64) -> MemoryLayout {
    MemoryLayout::new(vec![
        RegionDesc {
            guest_addr: 0,
            size: mib << 20,
        },
        RegionDesc {
            guest_addr: 4 << 30,
            size: 4 << 20,
        },
    ])
    .unwrap()
}

/// Migrates `src` to a fresh destination whose writers stay idle, returns
/// (source result, destination VM or error).
fn run<V: SourceVm + ?Sized>(
    src: &V,
    config: &MigrationConfig,
    wrap: impl FnOnce(Box<dyn Transport>) -> Box<dyn Transport>,
) -> (
    Result<livemig::Report, livemig::MigrationError>,
    Result<SoftVm, livemig::MigrationError>,
) {
    let (a, b) = mem::pair();
    let a = wrap(Box::new(a));
    let dst_layout = MemoryLayout::of(src.memory()).unwrap();
    let dest = std::thread::spawn(move || {
        let cfg = ReceiveConfig {
            io_timeout: Duration::from_secs(5),
        };
        receive(Box::new(b), &cfg, |desc| {
            assert_eq!(desc.layout, dst_layout);
            // Writers of the destination never start (0 writers), so its memory
            // stays exactly what was received.
            SoftVm::new(&desc.layout, &SoftConfig::idle())
        })
        .map(|(vm, _)| vm)
    });
    let r = migrate(src, a, config, &CancelToken::new(), &mut |p| {
        eprintln!("{}", serde_json::to_string(p).unwrap())
    });
    (r, dest.join().unwrap())
}

#[test]
fn idle_vm_memory_identical() {
    let src = SoftVm::new(&layout(32), &SoftConfig::idle()).unwrap();
    // Some content, including a page that will be all-zero again later.
    use vm_memory::{Bytes, GuestAddress};
    for i in 0..1000u64 {
        src.ram()
            .expect("vm-memory")
            .write_obj(i * 7 + 1, GuestAddress(i * 4096 * 3))
            .unwrap();
    }
    src.ram()
        .expect("vm-memory")
        .write_obj(0xfeedu64, GuestAddress((4 << 30) + 8))
        .unwrap();
    src.start();
    let (r, dst) = run(&src, &MigrationConfig::default(), |t| t);
    let report = r.expect("migration");
    let dst = dst.expect("destination");
    assert_eq!(report.status, livemig::report::Status::Completed);
    assert!(report.pages_sent >= 1001, "{}", report.pages_sent);
    assert_eq!(src.snapshot(), dst.snapshot());
}

#[test]
fn busy_vm_converges_and_memory_identical() {
    let cfg = SoftConfig {
        guest_writers: 2,
        device_writers: 1,
        pages_per_ms: 5,
    };
    let src = SoftVm::new(&layout(64), &cfg).unwrap();
    src.fill(1);
    src.start();
    std::thread::sleep(Duration::from_millis(50));
    let mc = MigrationConfig {
        downtime_limit: Duration::from_millis(200),
        ..Default::default()
    };
    let (r, dst) = run(&src, &mc, |t| t);
    let report = r.expect("migration");
    let dst = dst.expect("destination");
    // The source is paused after a successful migration: compare.
    assert!(src.writes() > 0);
    assert_eq!(
        src.snapshot(),
        dst.snapshot(),
        "memory differs after migration"
    );
    assert!(!report.rounds.is_empty());
    println!("{}", report.to_json());
}

#[test]
fn refused_handshake_sends_no_page() {
    let src = SoftVm::new(&layout(8), &SoftConfig::idle()).unwrap();
    src.start();
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        receive::<SoftVm, _>(Box::new(b), &ReceiveConfig::default(), |_| {
            Err(livemig::vm::VmError::Incompatible(
                "memory differs: test".into(),
            ))
        })
    });
    let e = migrate_with_defaults(&src, a).unwrap_err();
    assert_eq!(e.phase, Phase::Handshake);
    assert!(
        matches!(e.kind, ErrorKind::Refused(ref r) if r.contains("memory differs")),
        "{e}"
    );
    let de = dest.join().unwrap().err().unwrap();
    assert_eq!(de.phase, Phase::Handshake);
}

/// A transport that breaks (drops the connection) after `limit` bytes written.
struct Breaker {
    inner: Box<dyn Transport>,
    written: u64,
    limit: u64,
    flip: bool,
}

impl Read for Breaker {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(b)
    }
}

impl Write for Breaker {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.written >= self.limit {
            if self.flip {
                // Corrupt one byte, then carry on as if nothing happened.
                let mut v = b.to_vec();
                v[0] ^= 0x40;
                self.flip = false;
                let n = self.inner.write(&v)?;
                self.written += n as u64;
                return Ok(n);
            }
            if !self.flip {
                let _ = self.inner.shutdown();
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
        }
        let n = (b.len() as u64).min(self.limit.saturating_sub(self.written).max(1)) as usize;
        let n = self.inner.write(&b[..n])?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Transport for Breaker {
    fn set_read_timeout(&mut self, t: Option<Duration>) -> std::io::Result<()> {
        self.inner.set_read_timeout(t)
    }
    fn set_write_timeout(&mut self, t: Option<Duration>) -> std::io::Result<()> {
        self.inner.set_write_timeout(t)
    }
    fn shutdown(&self) -> std::io::Result<()> {
        self.inner.shutdown()
    }
    fn peer(&self) -> String {
        "breaker".into()
    }
    fn try_clone(&self) -> std::io::Result<Box<dyn Transport>> {
        self.inner.try_clone()
    }
}

#[test]
fn broken_connection_mid_transfer_keeps_source_running() {
    let cfg = SoftConfig {
        guest_writers: 1,
        device_writers: 0,
        pages_per_ms: 10,
    };
    let src = SoftVm::new(&layout(32), &cfg).unwrap();
    src.fill(2);
    src.start();
    std::thread::sleep(Duration::from_millis(20));
    let (r, dst) = run(&src, &MigrationConfig::default(), |t| {
        Box::new(Breaker {
            inner: t,
            written: 0,
            limit: 8 << 20,
            flip: false,
        })
    });
    let e = r.unwrap_err();
    assert!(matches!(e.phase, Phase::Precopy(_)), "{e}");
    assert!(dst.is_err());
    // The source still runs: writes continue.
    let w = src.writes();
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        src.writes() > w,
        "source writers stopped after a failed migration"
    );
    // And a second attempt succeeds.
    let (r, dst) = run(&src, &MigrationConfig::default(), |t| t);
    r.expect("second migration");
    assert_eq!(src.snapshot(), dst.unwrap().snapshot());
}

#[test]
fn flipped_byte_is_detected_and_source_keeps_running() {
    let src = SoftVm::new(&layout(16), &SoftConfig::default()).unwrap();
    src.fill(3);
    src.start();
    let (r, dst) = run(&src, &MigrationConfig::default(), |t| {
        Box::new(Breaker {
            inner: t,
            written: 0,
            limit: 3 << 20,
            flip: true,
        })
    });
    let de = dst
        .err()
        .expect("destination must refuse a corrupted stream");
    // The flip lands in a header or a payload: either way a frame check fails.
    assert!(matches!(de.kind, ErrorKind::Protocol(_)), "{de}");
    let e = r.unwrap_err();
    assert!(!e.is_ambiguous());
    let w = src.writes();
    std::thread::sleep(Duration::from_millis(50));
    assert!(src.writes() > w);
}

/// An operator's cancel on the source keeps the guest running there and
/// reaches the destination as the source's reason ("cancelled"), not as a
/// connection that closed: the source stops between two frames and says
/// why before it closes.
#[test]
fn cancel_keeps_source_running_and_tells_the_destination() {
    let src = SoftVm::new(&layout(64), &SoftConfig::default()).unwrap();
    src.fill(4);
    src.start();
    let (a, b) = mem::pair();
    let cancel = CancelToken::new();
    let c2 = cancel.clone();
    let dest = soft_destination(b, ReceiveConfig::default());
    let mc = MigrationConfig {
        max_bandwidth: Some(50 << 20),
        ..Default::default()
    };
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        let at = Instant::now();
        c2.cancel();
        at
    });
    let e = migrate(&src, Box::new(a), &mc, &cancel, &mut |_| {}).unwrap_err();
    let took = canceller.join().unwrap().elapsed();
    assert!(matches!(e.kind, ErrorKind::Cancelled), "{e}");
    let Err(de) = dest.join().unwrap() else {
        panic!("the destination completed a cancelled migration");
    };
    assert_heard_the_cancel(&de, took);
    let w = src.writes();
    std::thread::sleep(Duration::from_millis(50));
    assert!(src.writes() > w);
}

/// A source cancelled while its write is blocked on a link that carries
/// nothing any more cannot stop between two frames: the cancel shuts the
/// connection down after its grace period, the write returns, and the
/// migration ends `Cancelled` with the guest running on the source.
#[test]
fn a_source_cancel_interrupts_a_stalled_write() {
    let src = std::sync::Arc::new(SoftVm::new(&layout(64), &SoftConfig::default()).unwrap());
    src.fill(4);
    src.start();
    let (a, b) = mem::pair();
    // The link carries nothing after 2 MiB: the write there is held until
    // the transport is shut down (an hour otherwise).
    let stall = Fault::Stall(Duration::from_secs(3600)).at(At::Byte(2 << 20));
    let (stalls, probe) = FaultTransport::new(Box::new(a), stall);
    let cancel = CancelToken::new();
    let c2 = cancel.clone();
    let dest = soft_destination(b, ReceiveConfig::default());
    // Not a scoped thread: if the cancel failed to interrupt the write, the
    // test must fail below, not wait for the thread for ever.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let src2 = src.clone();
    std::thread::spawn(move || {
        let mc = MigrationConfig::default();
        let r = migrate(&*src2, Box::new(stalls), &mc, &c2, &mut |_| {});
        let _ = done_tx.send(r.map(|_| ()));
    });
    // Cancel once the source is stuck in its write.
    while probe.fired().is_empty() {
        assert!(
            done_rx.try_recv().is_err(),
            "the migration ended before its write stalled"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    cancel.cancel();
    let e = done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the cancelled migration did not return")
        .unwrap_err();
    assert!(matches!(e.kind, ErrorKind::Cancelled), "{e}");
    assert!(dest.join().unwrap().is_err());
    let w = src.writes();
    std::thread::sleep(Duration::from_millis(50));
    assert!(src.writes() > w, "the source's guest runs on");
}

/// A dirty log whose hypervisor takes its time to turn it off (three times
/// `SOURCE_CANCEL_GRACE`; 256 MiB under PVM took 131 ms with the working
/// set re-armed), noting when it began: everything else is the soft VM's.
struct SlowStop<'a>(Box<dyn DirtyTracker + 'a>, Arc<Mutex<Option<Instant>>>);

impl DirtyTracker for SlowStop<'_> {
    fn start(&mut self) -> Result<(), VmError> {
        self.0.start()
    }
    fn start_regions(&mut self, regions: &[bool]) -> Result<(), VmError> {
        self.0.start_regions(regions)
    }
    fn start_region(&mut self, region: usize) -> Result<(), VmError> {
        self.0.start_region(region)
    }
    fn sync(&mut self, bitmap: &mut DirtyBitmap) -> Result<(), VmError> {
        self.0.sync(bitmap)
    }
    fn rearm_mode(&self) -> Rearm {
        self.0.rearm_mode()
    }
    fn rearm(
        &mut self,
        region: usize,
        first: u64,
        n: u64,
        dirty: &DirtyBitmap,
    ) -> Result<(), VmError> {
        self.0.rearm(region, first, n, dirty)
    }
    fn stop(&mut self) -> Result<(), VmError> {
        *self.1.lock().unwrap() = Some(Instant::now());
        std::thread::sleep(3 * SOURCE_CANCEL_GRACE);
        self.0.stop()
    }
    fn stop_migrated(&mut self) -> Result<(), VmError> {
        self.0.stop_migrated()
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
}

/// A cancelled source tells the destination why before it turns dirty
/// logging off: a hypervisor slow to do that (longer than
/// `SOURCE_CANCEL_GRACE`) must not turn the destination's "cancelled" into
/// a closed connection. (`tests/migrate_control.rs`
/// `a_cancel_in_round_0_over_four_page_streams` failed so under PVM: the
/// log of 256 MiB took 131 ms to turn off, the token shut the connections
/// down before the `Error` went out.)
#[test]
fn a_cancelled_source_says_why_before_a_slow_dirty_log_teardown() {
    let log_off = Arc::new(Mutex::new(None));
    let noted = log_off.clone();
    let src = HookedVm::new(SoftVm::new(&layout(64), &SoftConfig::idle()).unwrap())
        .on_dirty_tracker(move |vm| Ok(Box::new(SlowStop(vm.dirty_tracker()?, noted.clone()))));
    src.vm().fill(6);
    src.vm().start();
    let before = src.vm().snapshot();
    let (a, b) = mem::pair();
    let cancel = CancelToken::new();
    let dest = soft_destination(b, ReceiveConfig::default());
    let mc = MigrationConfig {
        max_bandwidth: Some(16 << 20),
        ..Default::default()
    };
    let (c2, cancelled) = (cancel.clone(), Arc::new(Mutex::new(None)));
    let at = cancelled.clone();
    let e = Migration::new(&src)
        .config(mc)
        .cancel(cancel)
        .progress(move |p| {
            // Round 0 begins (the handshake is done): cancel.
            if let livemig::Progress::Accepted = p {
                *at.lock().unwrap() = Some(Instant::now());
                c2.cancel();
            }
        })
        .run(Box::new(a))
        .unwrap_err();
    assert!(matches!(e.kind, ErrorKind::Cancelled), "{e}");
    assert!(!src.is_paused(), "the source's guest does not run again");
    assert!(
        src.vm().snapshot() == before,
        "the migration changed the source's memory"
    );
    let Err(de) = dest.join().unwrap() else {
        panic!("the destination completed a cancelled migration");
    };
    // The source had stopped by the time it began to turn the log off
    // (and, since session 9, had told the destination).
    let began = log_off
        .lock()
        .unwrap()
        .expect("dirty logging was never turned off");
    let cancelled_at = cancelled.lock().unwrap().expect("never cancelled");
    assert_heard_the_cancel(&de, began.duration_since(cancelled_at));
}

#[test]
fn not_converging_fails_by_policy_and_source_runs() {
    let cfg = SoftConfig {
        guest_writers: 2,
        device_writers: 0,
        pages_per_ms: 0,
    };
    let src = SoftVm::new(&layout(64), &cfg).unwrap();
    src.fill(5);
    src.start();
    let mc = MigrationConfig {
        downtime_limit: Duration::from_micros(1),
        max_rounds: 3,
        max_bandwidth: Some(200 << 20),
        ..Default::default()
    };
    let (r, dst) = run(&src, &mc, |t| t);
    let e = r.unwrap_err();
    assert!(
        matches!(e.kind, ErrorKind::NotConverged { rounds: 3, .. }),
        "{e}"
    );
    assert!(dst.is_err());
    let w = src.writes();
    std::thread::sleep(Duration::from_millis(50));
    assert!(src.writes() > w);
}

#[test]
fn newer_protocol_version_refused_before_any_page() {
    use livemig::protocol::{FrameReader, FrameWriter, Hello, HelloReply, Message, MsgKind};
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        receive::<SoftVm, _>(Box::new(b), &ReceiveConfig::default(), |_| {
            panic!("the VM must not be created for a refused stream")
        })
    });
    let src = SoftVm::new(&layout(8), &SoftConfig::idle()).unwrap();
    use livemig::vm::SourceVm;
    let mut hello = Hello::new(src.describe().unwrap());
    hello.protocol_version = 7;
    hello.min_protocol_version = 7;
    let rx: Box<dyn Transport> = a.try_clone().unwrap();
    let mut fw = FrameWriter::new(Box::new(a) as Box<dyn Transport>);
    fw.send(&hello).unwrap();
    let mut fr = FrameReader::new(rx);
    let f = fr.read_frame().unwrap();
    assert_eq!(f.kind, MsgKind::HelloReply);
    let reply = HelloReply::decode(f.payload).unwrap();
    assert!(!reply.accepted);
    assert!(
        reply.reason.contains('7'),
        "reason does not name the version: {}",
        reply.reason
    );
    let e = dest.join().unwrap().err().unwrap();
    assert_eq!(e.phase, Phase::Handshake);
    assert!(e.to_string().contains("version"), "{e}");
}

fn self_stat() -> (u64, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    (rss, fds)
}

/// The engine in one process, 100 migrations: no growth in memory or fds.
#[test]
#[ignore]
fn soak_engine_100_migrations_no_leaks() {
    let cfg = SoftConfig {
        guest_writers: 2,
        device_writers: 1,
        pages_per_ms: 5,
    };
    let mut src = SoftVm::new(&layout(32), &cfg).unwrap();
    src.fill(9);
    src.start();
    let mut stats = Vec::new();
    for i in 0..100 {
        let (a, b) = mem::pair();
        let dest = std::thread::spawn(move || {
            receive(Box::new(b), &ReceiveConfig::default(), |d| {
                SoftVm::new(
                    &d.layout,
                    &SoftConfig {
                        guest_writers: 2,
                        device_writers: 1,
                        pages_per_ms: 5,
                    },
                )
            })
        });
        let mc = MigrationConfig {
            downtime_limit: Duration::from_millis(100),
            ..Default::default()
        };
        migrate(&src, Box::new(a), &mc, &CancelToken::new(), &mut |_| {})
            .unwrap_or_else(|e| panic!("{i}: {e}"));
        let (vm, _) = dest.join().unwrap().unwrap();
        src = vm;
        if i == 9 || i == 99 {
            stats.push(self_stat());
        }
    }
    eprintln!("soak (engine): after 10 and 100 migrations: {stats:?}");
    assert_eq!(stats[0].1, stats[1].1, "fds grew");
    assert!(stats[1].0 < stats[0].0 + 64 * 1024, "RSS grew: {stats:?}");
}

#[test]
fn auto_converge_throttles_a_fast_writer_until_it_converges() {
    let cfg = SoftConfig {
        guest_writers: 2,
        device_writers: 0,
        pages_per_ms: 50,
    };
    let src = SoftVm::new(&layout(16), &cfg).unwrap();
    src.fill(11);
    src.start();
    // ~400 MB/s of writes against a 50 MiB/s link: hopeless without throttling.
    let mc = MigrationConfig {
        downtime_limit: Duration::from_millis(100),
        max_bandwidth: Some(50 << 20),
        max_rounds: 40,
        ..Default::default()
    };
    let (r, dst) = run(&src, &mc, |t| t);
    let report = r.expect("auto-converge should make it converge");
    assert!(
        report.throttle_max_pct.unwrap_or(0) >= 20,
        "{}",
        report.to_json()
    );
    assert!(report.rounds.iter().any(|r| r.throttle_pct > 0));
    assert_eq!(src.snapshot(), dst.unwrap().snapshot());
    eprintln!(
        "auto-converge: {} rounds, throttle up to {:?} %, downtime {:.1} ms",
        report.rounds.len(),
        report.throttle_max_pct,
        report.downtime_ms
    );

    // The same without auto-converge does not converge.
    let src2 = SoftVm::new(&layout(16), &cfg).unwrap();
    src2.fill(12);
    src2.start();
    let mc2 = MigrationConfig {
        auto_converge: false,
        max_rounds: 8,
        ..mc
    };
    let (r2, _) = run(&src2, &mc2, |t| t);
    assert!(matches!(
        r2.unwrap_err().kind,
        ErrorKind::NotConverged { .. }
    ));
}

/// The downtime the engine expects must count what a switchover costs
/// beyond the save: the destination's restore (as many ioctls as the save)
/// and its resume (as many vCPU threads to wake as the source's own resume
/// in the probe). It counted the save and the pause only.
#[test]
fn expected_downtime_counts_restore_and_resume() {
    let src = SoftVm::new(&layout(8), &SoftConfig::idle()).unwrap();
    // Pages to send, so round 0 measures a bandwidth.
    src.fill(7);
    src.start();
    let save = Duration::from_millis(3);
    let resume = Duration::from_millis(20);
    // A source whose state takes `save` to save and whose vCPUs take
    // `resume` to resume, as a VM with many vCPUs does.
    let vm = HookedVm::new(src)
        .on_save_state(|vm| {
            std::thread::sleep(save);
            vm.save_state()
        })
        .on_resume(|vm| {
            SourceVm::resume(vm)?;
            std::thread::sleep(resume);
            Ok(())
        })
        .without_throttle();
    let config = MigrationConfig {
        downtime_limit: Duration::from_millis(200),
        ..Default::default()
    };
    let (r, dst) = run(&vm, &config, |t| t);
    let report = r.expect("migration");
    dst.expect("destination");
    let floor = (2 * save + resume).as_secs_f64() * 1e3;
    assert!(
        report.expected_downtime_ms >= floor,
        "expected downtime {:.2} ms, but saving ({save:?}), restoring (as long) and resuming ({resume:?}) alone take {floor:.2} ms",
        report.expected_downtime_ms
    );
}
