//! Adaptive LZ4 decides within a round, not only after it: a long round 0
//! whose pages LZ4 cannot shrink stops compressing after the first window
//! of page data (`LZ4_WINDOW_BYTES`, 8 MiB), instead of compressing the
//! whole round and deciding only for round 1.

use std::io::{self, Read, Write};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use livemig::policy::COMPRESS_SAMPLE;
use livemig::report::Report;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::{mem, Transport};
use livemig::vm_memory::{Bytes, GuestAddress};
use livemig::{Migration, MigrationConfig, Reception};
use serde_json::json;

// The shared set-ups still use the deprecated free functions.
#[allow(deprecated)]
mod common;
use common::one_region;

const MIB: u64 = 1 << 20;

/// Fills `pages` pages from guest address 0 with xorshift bytes: nothing
/// LZ4 can shrink.
fn fill_random(vm: &SoftVm, pages: u64) {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut page = vec![0u8; 4096];
    for p in 0..pages {
        for c in page.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        vm.ram()
            .expect("vm-memory")
            .write_slice(&page, GuestAddress(p * 4096))
            .unwrap();
    }
}

/// Migrates an idle soft VM of `size` bytes, filled by `fill`, with LZ4
/// allowed and the bandwidth capped at `cap`; checks that the destination
/// holds the source's memory.
fn migrate_compressing(size: u64, fill: fn(&SoftVm, u64), cap: Option<u64>) -> Report {
    migrate_compressing_over(size, fill, cap, |a| Box::new(a))
}

/// [`migrate_compressing`] over the source's end of an in-memory pair as
/// `link` wraps it.
fn migrate_compressing_over(
    size: u64,
    fill: fn(&SoftVm, u64),
    cap: Option<u64>,
    link: fn(mem::MemTransport) -> Box<dyn Transport>,
) -> Report {
    let src = SoftVm::new(&one_region(size), &SoftConfig::idle()).unwrap();
    fill(&src, size / 4096);
    src.start();
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        Reception::new(Box::new(b)).run(|d| SoftVm::new(&d.layout, &SoftConfig::idle()))
    });
    let report = Migration::new(&src)
        .config(MigrationConfig {
            compress: true,
            max_bandwidth: cap,
            ..Default::default()
        })
        .run(link(a))
        .expect("migrates");
    let (dst, _) = dest.join().unwrap().expect("received");
    dst.stop();
    assert_eq!(dst.snapshot(), src.snapshot());
    report
}

#[test]
fn lz4_that_cannot_pay_stops_within_round_zero() {
    let size = 64 * MIB;
    let report = migrate_compressing(size, fill_random, None);

    let r0 = &report.rounds[0];
    let data = r0.pages * 4096;
    assert!(data >= 60 * MIB, "round 0 sent {data} bytes of pages");
    // Random pages do not shrink: LZ4 never paid, so the first window
    // decided "off". Before the in-round decision every byte of round 0
    // went through LZ4 (input = data); now the first 8 MiB window does,
    // then one frame in COMPRESS_SAMPLE (a few windows of slack for
    // frame boundaries).
    let bound = 16 * MIB + data / COMPRESS_SAMPLE;
    assert!(
        r0.lz4_input_bytes <= bound,
        "round 0 gave LZ4 {} of {data} bytes (bound {bound})",
        r0.lz4_input_bytes
    );
    assert!(r0.lz4_input_bytes > 0, "LZ4 started on in round 0");
    assert!(
        r0.lz4_output_bytes >= r0.lz4_input_bytes,
        "random pages did not grow under LZ4?"
    );
}

/// Fills `pages` pages with text-like bytes: a short line repeated with the
/// page number in it, which LZ4 shrinks several times over.
fn fill_text(vm: &SoftVm, pages: u64) {
    for p in 0..pages {
        let line = format!("page {p:08} of the guest's page cache, nothing random here. ");
        let page: Vec<u8> = line.bytes().cycle().take(4096).collect();
        vm.ram()
            .expect("vm-memory")
            .write_slice(&page, GuestAddress(p * 4096))
            .unwrap();
    }
}

#[test]
fn lz4_that_pays_on_a_capped_link_stays_on_for_every_window() {
    let size = 32 * MIB;
    // The cap makes the link the bottleneck: the sender waits for it most
    // of every window, and LZ4 (far faster than 64 MB/s) pays.
    let report = migrate_compressing(size, fill_text, Some(64_000_000));

    let r0 = &report.rounds[0];
    let data = r0.pages * 4096;
    assert!(data >= 30 * MIB, "round 0 sent {data} bytes of pages");
    assert!(r0.compressed, "round 0 compressed");
    // Every frame of round 0 went through LZ4 (none fell back to one in
    // COMPRESS_SAMPLE), and what went out is a fraction of the data.
    assert!(
        r0.lz4_input_bytes >= data - data / 16,
        "LZ4 saw {} of {data} bytes: it was switched off",
        r0.lz4_input_bytes
    );
    assert!(
        r0.lz4_output_bytes * 4 < r0.lz4_input_bytes,
        "text pages shrank to {} of {}",
        r0.lz4_output_bytes,
        r0.lz4_input_bytes
    );
}

/// The source's end of a link that never keeps a writer waiting: writes
/// go to an unbounded queue that a thread forwards to the wrapped end, so
/// a sender is never link-bound whatever the destination's speed (the
/// in-memory pair blocks once 16 chunks are in flight). A write costs a
/// copy into a buffer the forwarder gave back (a fresh buffer per write
/// cost as much as LZ4 on some pages: the sender saw it as waiting).
struct Roomy {
    inner: Box<dyn Transport>,
    queue: mpsc::Sender<Vec<u8>>,
    spare: Arc<Mutex<mpsc::Receiver<Vec<u8>>>>,
}

impl Roomy {
    fn wrap(inner: mem::MemTransport) -> Box<dyn Transport> {
        let (queue, rx) = mpsc::channel::<Vec<u8>>();
        let (give_back, spare) = mpsc::channel::<Vec<u8>>();
        let mut out = inner.clone();
        std::thread::spawn(move || {
            // Ends when every handle is gone (or the peer hung up).
            for chunk in rx {
                if out.write_all(&chunk).is_err() {
                    return;
                }
                let _ = give_back.send(chunk);
            }
        });
        Box::new(Roomy {
            inner: Box::new(inner),
            queue,
            spare: Arc::new(Mutex::new(spare)),
        })
    }
}

impl Read for Roomy {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for Roomy {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let spare = self.spare.lock().unwrap().try_recv();
        let mut chunk = spare.unwrap_or_default();
        chunk.clear();
        chunk.extend_from_slice(buf);
        self.queue
            .send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "forwarder gone"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for Roomy {
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
        "roomy in-memory link".into()
    }

    fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(Roomy {
            inner: self.inner.try_clone()?,
            queue: self.queue.clone(),
            spare: self.spare.clone(),
        }))
    }
}

#[test]
fn lz4_on_pages_that_shrink_more_than_eightfold_decides_within_round_zero() {
    let size = 48 * MIB;
    // No cap and a link that never blocks the sender: LZ4, not the link,
    // is what limits the pages, and with no link rate known the first
    // window's decision is "off" (the policy then measures the link).
    let report = migrate_compressing_over(size, fill_text, None, Roomy::wrap);

    let r0 = &report.rounds[0];
    let data = r0.pages * 4096;
    assert!(data >= 46 * MIB, "round 0 sent {data} bytes of pages");
    // The premise: a window of 8 MiB of these pages puts less than
    // MIN_SAMPLE_BYTES (1 MiB) on the wire.
    assert!(
        r0.lz4_output_bytes * 8 < r0.lz4_input_bytes,
        "text pages shrank to {} of {}",
        r0.lz4_output_bytes,
        r0.lz4_input_bytes
    );
    // A window decided: the first one (LZ4 on, the sender never waiting
    // for the link) turns LZ4 off, so at least one window of 8 MiB of
    // pages went with only one frame in COMPRESS_SAMPLE through LZ4 (later
    // windows may turn it on again: while off, the in-memory link's copy
    // costs about what reading the pages does). Undecided, LZ4 compressed
    // every byte of the round.
    let bound = data - 4 * MIB;
    assert!(
        r0.lz4_input_bytes <= bound,
        "round 0 gave LZ4 {} of {data} bytes (bound {bound}): no window decided",
        r0.lz4_input_bytes
    );
}

/// On a link of unknown speed LZ4 starts off and only samples: pages it
/// cannot shrink, over a link that never keeps the sender waiting, never
/// go through LZ4 a whole window long (compression used to start on and
/// compress the first window of 8 MiB in full before it could decide;
/// over 10 Gbit/s that was most of LZ4 allowed's 60 % cost), no round is
/// marked compressed, and each round reports the decision and why.
#[test]
fn lz4_starts_off_and_only_samples_on_a_link_of_unknown_speed() {
    let size = 48 * MIB;
    let report = migrate_compressing_over(size, fill_random, None, Roomy::wrap);

    let r0 = &report.rounds[0];
    let data = r0.pages * 4096;
    assert!(data >= 46 * MIB, "round 0 sent {data} bytes of pages");
    let off = [json!("not-link-bound"), json!("incompressible")];
    for r in &report.rounds {
        assert!(!r.compressed, "round {} compressed: {r:?}", r.round);
        let lz4 = r.lz4.expect("LZ4 allowed: its decision is reported");
        assert!(!lz4.on, "round {}: {lz4:?}", r.round);
        let reason = serde_json::to_value(lz4.reason).unwrap();
        assert!(off.contains(&reason), "round {}: {lz4:?}", r.round);
    }
    // One frame in COMPRESS_SAMPLE at most (and one frame of slack).
    let bound = data / COMPRESS_SAMPLE + MIB;
    assert!(
        r0.lz4_input_bytes <= bound,
        "round 0 gave LZ4 {} of {data} bytes (bound {bound})",
        r0.lz4_input_bytes
    );
    let lz4 = r0.lz4.expect("reported");
    assert!(lz4.decisions >= 1, "no window decided in round 0: {lz4:?}");
    assert_eq!(lz4.switches, 0, "{lz4:?}");
}
