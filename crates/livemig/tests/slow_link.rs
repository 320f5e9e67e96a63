//! A slow, deep link: the source's bytes wait in a queue that a link
//! drains at a fixed rate, and the transport says how many are still
//! queued and what the round trip is (as TCP does through `SIOCOUTQ` and
//! `TCP_INFO`). The engine must not pause the guest while the last round's
//! pages are still queued (the final copy would wait behind them), and its
//! expected downtime must count the link's round trips.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use livemig::memory::{MemoryLayout, RegionDesc};
use livemig::policy::DRAIN_BYTES;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::{mem, Transport};
use livemig::{Migration, MigrationConfig, Progress, Reception, Report};

/// The queue of a slow link: at most `cap` bytes wait; a thread moves them
/// to the real connection at `rate` bytes per second.
struct Queue {
    bytes: Mutex<VecDeque<u8>>,
    room: Condvar,
    cap: usize,
    /// Bytes written and not yet delivered (queued or being delivered).
    unacked: AtomicU64,
}

/// One end of a connection whose outgoing bytes go through a [`Queue`];
/// incoming bytes arrive at once.
struct SlowLink {
    inner: Box<dyn Transport>,
    queue: Arc<Queue>,
    rtt: Duration,
    /// The queue stands for the destination's receive buffer, whose bytes
    /// the destination's kernel has acknowledged (and the destination's
    /// engine reads at the link's rate): [`Transport::unacked_bytes`]
    /// says 0.
    kernel_acked: bool,
}

impl SlowLink {
    /// Wraps `inner`; starts the thread that delivers the queue at `rate`.
    fn new(inner: Box<dyn Transport>, cap: usize, rate: u64, rtt: Duration) -> Self {
        let queue = Arc::new(Queue {
            bytes: Mutex::new(VecDeque::new()),
            room: Condvar::new(),
            cap,
            unacked: AtomicU64::new(0),
        });
        let mut out = inner.try_clone().expect("clone");
        let q = queue.clone();
        std::thread::spawn(move || {
            let tick = Duration::from_millis(1);
            let per_tick = (rate / 1000).max(1) as usize;
            loop {
                let chunk: Vec<u8> = {
                    let mut b = q.bytes.lock().unwrap();
                    let n = b.len().min(per_tick);
                    b.drain(..n).collect()
                };
                q.room.notify_all();
                if chunk.is_empty() {
                    // Only this thread holds the queue: every handle is gone.
                    if Arc::strong_count(&q) == 1 {
                        return;
                    }
                } else if out.write_all(&chunk).and_then(|_| out.flush()).is_err() {
                    return;
                }
                q.unacked.fetch_sub(chunk.len() as u64, Ordering::SeqCst);
                std::thread::sleep(tick);
            }
        });
        SlowLink {
            inner,
            queue,
            rtt,
            kernel_acked: false,
        }
    }
}

impl Read for SlowLink {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for SlowLink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut b = self.queue.bytes.lock().unwrap();
        while b.len() >= self.queue.cap {
            b = self.queue.room.wait(b).unwrap();
        }
        let n = buf.len().min(self.queue.cap - b.len());
        b.extend(&buf[..n]);
        self.queue.unacked.fetch_add(n as u64, Ordering::SeqCst);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for SlowLink {
    fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.inner.set_read_timeout(t)
    }

    fn set_write_timeout(&mut self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }

    fn shutdown(&self) -> io::Result<()> {
        self.inner.shutdown()
    }

    fn peer(&self) -> String {
        "slow link".into()
    }

    fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(SlowLink {
            inner: self.inner.try_clone()?,
            queue: self.queue.clone(),
            rtt: self.rtt,
            kernel_acked: self.kernel_acked,
        }))
    }

    fn unacked_bytes(&self) -> Option<u64> {
        if self.kernel_acked {
            return Some(0);
        }
        Some(self.queue.unacked.load(Ordering::SeqCst))
    }

    fn round_trip(&self) -> Option<Duration> {
        Some(self.rtt)
    }
}

/// Migrates an idle 8 MiB guest whose every page holds data over a link
/// that queues 2 MiB and carries 64 MB/s, with `rtt` and a downtime limit
/// of 1 s; returns the report and the bytes still queued when the guest was
/// paused.
fn migrate_over_slow_link(rtt: Duration) -> (Report, u64) {
    migrate_over(SlowLinkKind {
        cap: 2 << 20,
        rtt,
        kernel_acked: false,
    })
}

/// The link of [`migrate_over`].
struct SlowLinkKind {
    /// Bytes the queue holds.
    cap: usize,
    rtt: Duration,
    /// See [`SlowLink::kernel_acked`].
    kernel_acked: bool,
}

/// Migrates an idle 8 MiB guest whose every page holds data over `kind`
/// at 64 MB/s with a downtime limit of 1 s; returns the report and the
/// bytes still queued when the guest was paused.
fn migrate_over(kind: SlowLinkKind) -> (Report, u64) {
    let layout = MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: 8 << 20,
    }])
    .expect("layout");
    let src = SoftVm::new(&layout, &SoftConfig::idle()).expect("source VM");
    src.fill(3);
    src.start();
    let (a, b) = mem::pair();
    let mut link = SlowLink::new(Box::new(a), kind.cap, 64_000_000, kind.rtt);
    link.kernel_acked = kind.kernel_acked;
    let queued = link.queue.clone();
    let dest = std::thread::spawn(move || {
        Reception::new(Box::new(b)).run(|desc| SoftVm::new(&desc.layout, &SoftConfig::idle()))
    });
    let at_pause = Arc::new(AtomicU64::new(u64::MAX));
    let seen = at_pause.clone();
    let config = MigrationConfig {
        downtime_limit: Duration::from_secs(1),
        ..Default::default()
    };
    let report = Migration::new(&src)
        .config(config)
        .progress(move |p| {
            if let Progress::Paused { .. } = p {
                seen.store(queued.unacked.load(Ordering::SeqCst), Ordering::SeqCst);
            }
        })
        .run(Box::new(link))
        .expect("migration");
    let (dst, _) = dest.join().expect("destination thread").expect("received");
    assert_eq!(src.snapshot(), dst.snapshot());
    (report, at_pause.load(Ordering::SeqCst))
}

/// Round 0 queues the guest's 8 MiB; the last 2 MiB are still on the link
/// when the round ends. Nothing is left to send and the limit is generous,
/// so the engine switches over after round 0 — but only once the queue has
/// drained: the final copy must not wait behind it.
#[test]
fn the_guest_is_paused_only_after_the_queue_drained() {
    let (report, at_pause) = migrate_over_slow_link(Duration::from_millis(1));
    assert_ne!(at_pause, u64::MAX, "no Paused progress");
    assert!(
        at_pause <= DRAIN_BYTES,
        "{at_pause} bytes still queued on the link when the guest was paused \
         (at most {DRAIN_BYTES}): {}",
        report.to_json()
    );
}

/// The same, where the queue is the destination's receive buffer: its
/// kernel acknowledged every byte (the source's send queue is empty at
/// once), but the destination's engine reads them at the link's rate (a
/// destination that fell behind, whose receive buffer grew: found with a
/// 64 GiB guest on 2026-12-03, docs/benchmarks.md "Session of 2026-12-03
/// (6)"). The guest must not be paused before the destination has read
/// the rounds: the final copy and the state would wait behind them.
#[test]
fn the_guest_is_paused_only_after_the_destination_read_the_rounds() {
    let (report, at_pause) = migrate_over(SlowLinkKind {
        cap: 16 << 20,
        rtt: Duration::from_millis(1),
        kernel_acked: true,
    });
    assert_ne!(at_pause, u64::MAX, "no Paused progress");
    assert!(
        at_pause <= DRAIN_BYTES,
        "{at_pause} bytes not yet read by the destination when the guest was paused \
         (at most {DRAIN_BYTES}): {}",
        report.to_json()
    ); // Every round said what the destination had not read.
    assert!(
        report.rounds.iter().all(|r| r.unread_bytes.is_some()),
        "{}",
        report.to_json()
    );
}

/// The expected downtime counts one and a half round trips of the link: the
/// final data reaches the destination and `Ready` comes back, `Go` reaches
/// the destination (which then starts the guest; `Resumed` comes back after
/// the downtime).
#[test]
fn the_expected_downtime_counts_the_round_trips() {
    let rtt = Duration::from_millis(40);
    let (report, _) = migrate_over_slow_link(rtt);
    let floor = 1.5 * rtt.as_secs_f64() * 1e3;
    assert!(
        report.expected_downtime_ms >= floor,
        "expected downtime {:.2} ms, but 1.5 {rtt:?} round trips alone take {floor} ms: {}",
        report.expected_downtime_ms,
        report.to_json()
    );
}

/// A transport whose queue never drains (it always reports 16 MiB
/// unacknowledged): each round's wait is bounded, the queue counts in the
/// expected downtime, and the migration fails by policy after its rounds
/// instead of waiting forever.
#[test]
fn a_queue_that_never_drains_is_counted_not_waited_for() {
    struct Stuck(Box<dyn Transport>);
    impl Read for Stuck {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }
    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.0.flush()
        }
    }
    impl Transport for Stuck {
        fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
            self.0.set_read_timeout(t)
        }
        fn set_write_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
            self.0.set_write_timeout(t)
        }
        fn shutdown(&self) -> io::Result<()> {
            self.0.shutdown()
        }
        fn peer(&self) -> String {
            "stuck".into()
        }
        fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
            Ok(Box::new(Stuck(self.0.try_clone()?)))
        }
        fn unacked_bytes(&self) -> Option<u64> {
            Some(16 << 20)
        }
    }
    let layout = MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: 4 << 20,
    }])
    .expect("layout");
    let src = SoftVm::new(&layout, &SoftConfig::idle()).expect("source VM");
    src.fill(5);
    src.start();
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        Reception::new(Box::new(b)).run(|desc| SoftVm::new(&desc.layout, &SoftConfig::idle()))
    });
    let config = MigrationConfig {
        max_rounds: 3,
        // Keepalive interval, and so the bound of each round's wait: 100 ms.
        io_timeout: Duration::from_millis(400),
        ..Default::default()
    };
    let e = Migration::new(&src)
        .config(config)
        .run(Box::new(Stuck(Box::new(a))))
        .expect_err("16 MiB never leave the queue: over the 20 ms limit");
    assert!(
        matches!(e.kind, livemig::ErrorKind::NotConverged { rounds: 3, .. }),
        "{e}"
    );
    let _ = dest.join();
}
