//! Checks any [`Transport`] implementation can run: carry 64 MiB intact,
//! honour read and write timeouts, unblock a reader on shutdown. Used by the
//! transports here and in other crates (for example livemig-tls). They panic
//! on failure: tests only.

use crate::transport::Transport;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// Deterministic test pattern.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends 64 MiB from `a` to `b` (in odd-sized writes) and checks it.
pub fn carries_64mib(mut a: Box<dyn Transport>, mut b: Box<dyn Transport>) {
    const LEN: usize = 64 << 20;
    let data = pattern(LEN, 42);
    let expected = data.clone();
    let writer = std::thread::spawn(move || {
        let mut off = 0;
        let mut step = 1;
        while off < data.len() {
            let end = (off + step).min(data.len());
            a.write_all(&data[off..end]).unwrap();
            off = end;
            step = (step * 7 + 3) % (1 << 20) + 1;
        }
        a.flush().unwrap();
        a
    });
    let mut got = vec![0u8; LEN];
    let t0 = Instant::now();
    b.read_exact(&mut got).unwrap();
    let elapsed = t0.elapsed();
    let a = writer.join().unwrap();
    assert!(got == expected, "64 MiB corrupted on {}", b.peer());
    eprintln!("{}: 64 MiB in {elapsed:?}", b.peer());
    // Closing the writer gives the reader EOF.
    drop(a);
    let mut one = [0u8; 1];
    assert_eq!(b.read(&mut one).unwrap(), 0);
}

/// A read with a timeout and nothing to read fails in about that time.
pub fn read_timeout_fires(_a: Box<dyn Transport>, mut b: Box<dyn Transport>) {
    b.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 8];
    let e = b.read(&mut buf).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ),
        "{e:?}"
    );
    let el = t0.elapsed();
    assert!(el >= Duration::from_millis(40), "{el:?}");
    assert!(el < Duration::from_secs(5), "{el:?}");
    b.set_read_timeout(None).unwrap();
}

/// A write timeout fires when the peer never reads.
pub fn write_timeout_fires(_a: Box<dyn Transport>, mut b: Box<dyn Transport>) {
    b.set_write_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let chunk = vec![0u8; 1 << 20];
    let t0 = Instant::now();
    loop {
        match b.write(&chunk) {
            Ok(n) => assert!(
                n > 0 && t0.elapsed() < Duration::from_secs(20),
                "never blocked"
            ),
            Err(e) => {
                assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                    ),
                    "{e:?}"
                );
                break;
            }
        }
    }
}

/// Shutdown from another thread (on a clone) unblocks a blocked reader.
/// Returns `a` (the peer of the end shut down), for checks of what the
/// peer sees.
pub fn shutdown_unblocks_reader(
    a: Box<dyn Transport>,
    b: Box<dyn Transport>,
) -> Box<dyn Transport> {
    let mut reader = b.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        let t0 = Instant::now();
        let r = reader.read(&mut buf);
        (r.map_err(|e| e.kind()), t0.elapsed())
    });
    std::thread::sleep(Duration::from_millis(100));
    b.shutdown().unwrap();
    let (r, el) = t.join().unwrap();
    // EOF (Ok(0)) or an error, but it returned.
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(el < Duration::from_secs(5));
    let mut b = b;
    assert!(b.write_all(&[1, 2, 3]).is_err(), "write after shutdown");
    a
}
