//! Replays the fuzz corpus as an ordinary test.
//!
//! Every file under `fuzz/corpus/<target>/` goes through the same harness
//! function as the cargo-fuzz target `<target>` (the harness, `fuzz/src/lib.rs`,
//! is included here as a module), so an input that once crashed a target
//! keeps being checked without a fuzzer. A missing or empty corpus is
//! skipped with a note.

#[allow(dead_code)]
#[path = "../../../fuzz/src/lib.rs"]
mod harness;

use std::path::{Path, PathBuf};

use livemig::protocol::{FrameHeader, FRAME_HEADER_LEN};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

#[test]
fn replay_corpus() {
    let corpus = fuzz_dir().join("corpus");
    let mut total = 0usize;
    for target in harness::TARGETS {
        let dir = corpus.join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            eprintln!("{}: no corpus, skipped", dir.display());
            continue;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for f in &files {
            let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            eprintln!("{target}: {}", f.display());
            assert!(harness::run(target, &data), "unknown target {target}");
        }
        eprintln!("{target}: {} inputs replayed", files.len());
        total += files.len();
    }
    if total == 0 {
        eprintln!("the fuzz corpus is empty: nothing replayed");
    }
    // Every corpus directory belongs to a target.
    if let Ok(entries) = std::fs::read_dir(&corpus) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                harness::TARGETS.contains(&name.as_str()),
                "fuzz/corpus/{name} is not a fuzz target"
            );
        }
    }
}

/// The seeds run clean through every target (so the harness itself is
/// sound even with an empty corpus).
#[test]
fn seeds_run_clean() {
    let seeds = harness::seeds();
    for target in harness::TARGETS {
        assert!(
            seeds.iter().any(|(t, _, _)| t == target),
            "no seed for {target}"
        );
    }
    for (target, name, data) in seeds {
        assert!(harness::run(target, &data), "{target}/{name}");
    }
}

/// The valid stream migrates, and the memory model agrees with it.
#[test]
fn valid_stream_is_received() {
    let r = harness::receive_stream(&harness::valid_stream());
    let report = r.result.expect("a valid stream is received");
    assert!(r.created);
    assert_eq!(report.pages, 2 + 3 + 1);
    assert_eq!(report.rounds, 2);
    // HelloReply, Ready and Resumed went back.
    assert!(r.replied > 3 * 16, "{}", r.replied);
    // The script version of it, too.
    let (_, _, script) = harness::seeds()
        .into_iter()
        .find(|(t, n, _)| *t == "receive_frames" && n == "valid")
        .expect("script seed");
    let r = harness::receive_stream(&harness::frames_from_script(&script));
    r.result.expect("the valid script is received");
    // With the switchover probe offered and two probes answered: received,
    // and the answers (2 × 24 bytes) and the grant byte went back besides.
    let (_, _, script) = harness::seeds()
        .into_iter()
        .find(|(t, n, _)| *t == "receive_frames" && n == "probed")
        .expect("probed seed");
    let p = harness::receive_stream(&harness::frames_from_script(&script));
    let report = p.result.expect("the probed script is received");
    assert_eq!(report.rounds, 2);
    assert_eq!(p.replied, r.replied + 2 * 24 + 1, "two ProbeReply frames");
}

/// The independent CRC agrees with the frames livemig writes.
#[test]
fn harness_crc_matches_livemig() {
    let stream = harness::valid_stream();
    let h: &[u8; FRAME_HEADER_LEN] = stream[..FRAME_HEADER_LEN].try_into().unwrap();
    let header = FrameHeader::decode(h);
    let len = header.len as usize;
    assert_eq!(
        header.crc,
        harness::crc32c_software(&h[..12], &stream[16..16 + len])
    );
    // A stream built from a script with a corrupted crc is refused.
    let bad = harness::frames_from_script(&[0xc1, 0, 0]);
    let r = harness::receive_stream(&bad);
    let e = r.result.expect_err("corrupted crc accepted");
    assert!(e.to_string().contains("crc mismatch"), "{e}");
}

/// A `Pages` frame whose records are valid but whose CRC is not fails the
/// reception, and the harness's memory check then holds every page to
/// what the good frames wrote: a receiver that reads frames whole writes
/// nothing of a frame that fails (the check loosens only where
/// `PAGES_READ_INTO_GUEST_MEMORY` says pages are read into guest memory
/// before the CRC is known).
#[test]
fn a_pages_frame_with_a_bad_crc_writes_nothing() {
    let frames = harness::valid_frames();
    // Hello, round 0's Pages and RoundEnd, round 1's Pages: flip one byte
    // of the last frame's page data.
    let mut stream = harness::frames(&frames[..4]);
    let end = stream.len();
    stream[end - 100] ^= 0xff;
    let r = harness::receive_stream(&stream);
    let e = r.result.expect_err("a corrupted Pages frame was accepted");
    assert!(e.to_string().contains("crc mismatch"), "{e}");
    assert!(r.created);
}

/// Writes the seeds to `$LIVEMIG_SEED_DIR/<target>/seed-<name>` (used to
/// start a fuzzing campaign, see docs/fuzzing.md).
#[test]
#[ignore = "writes files; run by hand with LIVEMIG_SEED_DIR set"]
fn write_seeds() {
    let Some(dir) = std::env::var_os("LIVEMIG_SEED_DIR") else {
        eprintln!("LIVEMIG_SEED_DIR is not set: nothing written");
        return;
    };
    let dir = PathBuf::from(dir);
    for (target, name, data) in harness::seeds() {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("seed-{name}")), data).unwrap();
    }
}
