//! `max_bandwidth` caps the whole migration, every connection together (as
//! QEMU's max-bandwidth caps all its channels), while the guest runs: the
//! bytes written on the control connection and on every page stream are
//! counted as they are written, up to the pause (the final copy is
//! uncapped: every millisecond of it is downtime). Post-copy's push, after
//! the pause, is paced by the same budget.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livemig::destination::postcopy::PostcopyMemory;
use livemig::memory::MemoryLayout;
use livemig::protocol::STREAM_CHUNK_PAGES;
use livemig::source::postcopy::PostcopyConfig;
use livemig::testing::postcopy::SoftPager;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::{mem, StreamOpener, Transport};
use livemig::vm_memory::{Bytes, GuestAddress};
use livemig::{Migration, MigrationConfig, Progress, ReceiveConfig, Reception, Report};

#[allow(deprecated)]
mod common;
use common::one_region;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// The cap of these tests: 4 MiB/s, so that a few MiB of pages take
/// seconds and the pacing, not the machine, sets the pace.
const CAP: u64 = 4 * MIB;

/// What may legitimately go beyond `CAP` × elapsed on all connections
/// together: the page frame each connection writes before it waits for
/// it (at most `batch_pages`, 1 MiB, plus headers), and the control
/// messages (`Hello`, `StreamHello`s, `RoundEnd`s, keepalives: far below
/// 64 KiB here).
fn frames_allowance(connections: u64) -> u64 {
    connections * (MIB + 4096) + (64 << 10)
}

/// How far back the cap lets a connection catch up on time it did not
/// send (a burst after an idle stretch; the pacer forgets credit older
/// than this).
const BURST: Duration = Duration::from_secs(1);

/// One write: when, on which connection (0: control; 1..: page streams
/// in the order they were opened), how many bytes.
#[derive(Debug, Clone, Copy)]
struct Write1 {
    at: Instant,
    conn: usize,
    bytes: u64,
}

type Log = Arc<Mutex<Vec<Write1>>>;

/// A connection whose writes are logged.
struct Counted {
    inner: Box<dyn Transport>,
    conn: usize,
    log: Log,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.log.lock().unwrap().push(Write1 {
            at: Instant::now(),
            conn: self.conn,
            bytes: n as u64,
        });
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Transport for Counted {
    fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.inner.set_read_timeout(t)
    }

    fn set_write_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.inner.set_write_timeout(t)
    }

    fn shutdown(&self) -> io::Result<()> {
        self.inner.shutdown()
    }

    fn peer(&self) -> String {
        format!("counted connection {}", self.conn)
    }

    fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(Counted {
            inner: self.inner.try_clone()?,
            conn: self.conn,
            log: self.log.clone(),
        }))
    }
}

/// Opens in-memory page streams whose writes are logged.
struct CountingOpener {
    inner: mem::MemOpener,
    opened: usize,
    log: Log,
}

impl StreamOpener for CountingOpener {
    fn open(&mut self) -> io::Result<Box<dyn Transport>> {
        self.opened += 1;
        Ok(Box::new(Counted {
            inner: self.inner.open()?,
            conn: self.opened,
            log: self.log.clone(),
        }))
    }
}

/// What a migration wrote, up to the pause.
struct Run {
    report: Report,
    /// Every write up to the pause, in order.
    writes: Vec<Write1>,
    /// When `Migration::run` was called.
    start: Instant,
    /// When the source said it paused the guest.
    paused: Instant,
}

/// Migrates an idle soft VM with `layout`, its memory written by `fill`,
/// over `streams` page streams with the bandwidth capped at [`CAP`];
/// checks that the destination holds the source's memory.
fn migrate_capped(layout: &MemoryLayout, fill: impl Fn(&SoftVm), streams: u32) -> Run {
    let src = SoftVm::new(layout, &SoftConfig::idle()).unwrap();
    fill(&src);
    src.start();
    let log: Log = Arc::default();
    let (a, b) = mem::pair();
    let (opener, acceptor) = mem::streams();
    let dest = common::soft_destination_with_streams(b, acceptor);
    let paused = Arc::new(Mutex::new(None));
    let seen = paused.clone();
    let control = Counted {
        inner: Box::new(a),
        conn: 0,
        log: log.clone(),
    };
    let opener = CountingOpener {
        inner: opener,
        opened: 0,
        log: log.clone(),
    };
    let start = Instant::now();
    let report = Migration::new(&src)
        .config(MigrationConfig {
            max_bandwidth: Some(CAP),
            downtime_limit: Duration::from_millis(500),
            // The bytes counted are the pages' own (LZ4 is on under a cap).
            compress: false,
            ..Default::default()
        })
        .streams(streams, opener)
        .progress(move |p| {
            if let Progress::Paused { .. } = p {
                seen.lock().unwrap().get_or_insert_with(Instant::now);
            }
        })
        .run(Box::new(control))
        .expect("migrates");
    let (dst, _) = dest.join().unwrap().expect("received");
    dst.stop();
    assert_eq!(dst.snapshot(), src.snapshot(), "memory differs");
    assert_eq!(report.streams, streams, "streams granted");
    let paused = paused.lock().unwrap().expect("a Paused progress");
    let writes = log
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|w| w.at < paused)
        .collect();
    Run {
        report,
        writes,
        start,
        paused,
    }
}

/// The most bytes written by all connections together in any stretch of
/// `run`'s writes, beyond what `rate` allows over that stretch:
/// max over i ≤ j of (bytes of writes i..=j) − rate × (t_j − t_i).
fn worst_excess(run: &Run, rate: u64) -> f64 {
    let rate = rate as f64;
    let mut sent = 0.0;
    // min over i of (bytes before write i − rate × t_i)
    let mut low = f64::INFINITY;
    let mut worst = 0.0_f64;
    for w in &run.writes {
        let t = w.at.duration_since(run.start).as_secs_f64();
        low = low.min(sent - rate * t);
        sent += w.bytes as f64;
        worst = worst.max(sent - rate * t - low);
    }
    worst
}

/// Bytes written on connection `conn` up to the pause.
fn bytes_on(run: &Run, conn: usize) -> u64 {
    run.writes
        .iter()
        .filter(|w| w.conn == conn)
        .map(|w| w.bytes)
        .sum()
}

/// Fills every page with data (no page is all zero).
fn fill_all(vm: &SoftVm) {
    vm.fill(11);
}

#[test]
fn three_streams_stay_within_the_cap_together() {
    // 12 MiB of pages at 4 MiB/s: about three seconds of round 0, spread
    // over three page streams.
    let layout = one_region(12 * MIB);
    let run = migrate_capped(&layout, fill_all, 3);
    let before: u64 = run.writes.iter().map(|w| w.bytes).sum();
    let elapsed = run.paused.duration_since(run.start).as_secs_f64();
    assert!(before >= 12 * MIB, "{before} bytes before the pause");
    let excess = worst_excess(&run, CAP);
    println!(
        "4 connections: {before} bytes in {elapsed:.2} s before the pause ({:.2} MiB/s, \
         cap {} MiB/s); worst stretch {excess:.0} bytes beyond the cap",
        before as f64 / elapsed / MIB as f64,
        CAP / MIB
    );
    // Over the whole run up to the pause...
    let allowance = frames_allowance(4) as f64;
    let limit = CAP as f64 * elapsed + allowance;
    assert!(
        (before as f64) <= limit,
        "{before} bytes on 4 connections in {elapsed:.2} s: more than {CAP} B/s × elapsed \
         + {allowance} ({limit:.0}): {}",
        run.report.to_json()
    );
    // ...and in any stretch of it, allowing one burst of BURST.
    let burst = CAP as f64 * BURST.as_secs_f64() + allowance;
    assert!(
        excess <= burst,
        "some stretch carried {excess:.0} bytes more than {CAP} B/s allows \
         (at most one burst, {burst:.0})"
    );
}

/// Writes pages into the stream chunks ([`STREAM_CHUNK_PAGES`]) that go
/// to page stream 0 of 2 (chunks 0, 2, 4; 12 MiB), none into the others.
fn fill_stream0_chunks(vm: &SoftVm) {
    let page = vec![0x5au8; PAGE as usize];
    for chunk in [0, 2, 4] {
        for p in chunk * STREAM_CHUNK_PAGES..(chunk + 1) * STREAM_CHUNK_PAGES {
            vm.ram()
                .expect("vm-memory")
                .write_slice(&page, GuestAddress(p * PAGE))
                .unwrap();
        }
    }
}

#[test]
fn a_stream_with_all_the_pages_gets_the_idle_streams_share() {
    // 6 stream chunks of 4 MiB: the odd ones (page stream 1's) stay zero,
    // so round 0 sends 12 MiB of pages, all on page stream 0.
    let layout = one_region(6 * STREAM_CHUNK_PAGES * PAGE);
    let run = migrate_capped(&layout, fill_stream0_chunks, 2);
    let (busy, idle) = (bytes_on(&run, 1), bytes_on(&run, 2));
    assert!(busy >= 12 * MIB, "page stream 0 carried {busy} bytes");
    assert!(idle < 64 << 10, "page stream 1 carried {idle} bytes");
    let elapsed = run.paused.duration_since(run.start).as_secs_f64();
    println!(
        "page stream 0: {busy} bytes in {elapsed:.2} s before the pause ({:.2} MiB/s, \
         cap {} MiB/s)",
        busy as f64 / elapsed / MIB as f64,
        CAP / MIB
    );
    // Within the cap, all connections together.
    let total: u64 = run.writes.iter().map(|w| w.bytes).sum();
    let limit = CAP as f64 * elapsed + frames_allowance(3) as f64;
    assert!((total as f64) <= limit, "{total} bytes in {elapsed:.2} s");
    // But the busy stream used more than its half of the cap could give
    // it: the idle stream's share was not lost. (Paced at CAP / 2 it
    // carries at most CAP / 2 × elapsed plus one frame; at the whole cap
    // about twice that.)
    let half = CAP as f64 / 2.0 * elapsed + frames_allowance(1) as f64;
    assert!(
        busy as f64 > half,
        "page stream 0 carried {busy} bytes in {elapsed:.2} s while page stream 1 idled: \
         no more than half the cap allows ({half:.0}): {}",
        run.report.to_json()
    );
}

#[test]
fn the_post_copy_push_stays_within_the_cap() {
    // Pure post-copy of 8 MiB of pages: no round, every page pushed on the
    // control connection after the switch, at 4 MiB/s: about two seconds.
    let layout = one_region(8 * MIB);
    let src = SoftVm::new(&layout, &SoftConfig::idle()).unwrap();
    fill_all(&src);
    src.start(); // running: a paused VM is never offered post-copy
    let log: Log = Arc::default();
    let (a, b) = mem::pair();
    let (fa, fb) = mem::pair();
    let dest = std::thread::spawn(move || {
        Reception::new(Box::new(b))
            .config(ReceiveConfig {
                io_timeout: Duration::from_secs(5),
            })
            .postcopy(Box::new(fb), |memory, layout| {
                Ok(Box::new(SoftPager::new(memory, layout)) as Box<dyn PostcopyMemory>)
            })
            .run(|desc| SoftVm::new(&desc.layout, &SoftConfig::idle()))
    });
    let control = Counted {
        inner: Box::new(a),
        conn: 0,
        log: log.clone(),
    };
    let pc = PostcopyConfig {
        after_rounds: 0,
        on_non_convergence: false,
        ..Default::default()
    };
    let start = Instant::now();
    let report = Migration::new(&src)
        .config(MigrationConfig {
            max_bandwidth: Some(CAP),
            compress: false,
            ..Default::default()
        })
        .postcopy(Box::new(fa), pc)
        .run(Box::new(control))
        .expect("migrates");
    let (dst, _) = dest.join().unwrap().expect("received");
    dst.stop();
    assert_eq!(dst.snapshot(), src.snapshot(), "memory differs");
    let pushed = report.postcopy.as_ref().expect("post-copy").pushed_pages;
    assert!(pushed * PAGE >= 8 * MIB, "{pushed} pages pushed");
    let run = Run {
        report,
        writes: log.lock().unwrap().clone(),
        start,
        paused: Instant::now(),
    };
    let total = bytes_on(&run, 0);
    let elapsed = start.elapsed().as_secs_f64();
    let excess = worst_excess(&run, CAP);
    println!(
        "post-copy: {total} bytes on the control connection in {elapsed:.2} s ({:.2} MiB/s, \
         cap {} MiB/s); worst stretch {excess:.0} bytes beyond the cap",
        total as f64 / elapsed / MIB as f64,
        CAP / MIB
    );
    let allowance = frames_allowance(1) as f64;
    let limit = CAP as f64 * elapsed + allowance;
    assert!((total as f64) <= limit, "{total} bytes in {elapsed:.2} s");
    let burst = CAP as f64 * BURST.as_secs_f64() + allowance;
    assert!(
        excess <= burst,
        "some stretch carried {excess:.0} bytes more than {CAP} B/s allows \
         (at most one burst, {burst:.0})"
    );
}
