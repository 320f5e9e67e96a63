//! Adaptive LZ4 decides within a round, not only after it: a long round 0
//! whose pages LZ4 cannot shrink stops compressing after the first window
//! of page data (`LZ4_WINDOW_BYTES`, 8 MiB), instead of compressing the
//! whole round and deciding only for round 1.

use livemig::policy::COMPRESS_SAMPLE;
use livemig::report::Report;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::mem;
use livemig::vm_memory::{Bytes, GuestAddress};
use livemig::{Migration, MigrationConfig, Reception};

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
        .run(Box::new(a))
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
