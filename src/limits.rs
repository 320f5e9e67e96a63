//! The physical limits the benchmarks compare against, measured in the same
//! run: memory copy bandwidth and one loopback TCP stream.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

/// Bytes per second copying one `bytes`-sized buffer into another (four
/// copies after one warm-up copy that faults both buffers in).
pub fn memcpy_rate(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src);
    let t = Instant::now();
    for _ in 0..4 {
        std::hint::black_box(&mut dst).copy_from_slice(std::hint::black_box(&src));
    }
    std::hint::black_box(&dst);
    (4 * bytes) as f64 / t.elapsed().as_secs_f64()
}

/// Bytes per second through one loopback TCP connection (1 MiB writes,
/// `total` bytes, a reader thread on the other end).
///
/// # Panics
///
/// If loopback TCP does not work (a benchmark cannot run without it).
pub fn loopback_tcp_rate(total: usize) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = l.local_addr().expect("local address");
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < total {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    });
    let mut s = TcpStream::connect(addr).expect("connect over loopback");
    let buf = vec![7u8; 1 << 20];
    let t = Instant::now();
    let mut sent = 0;
    while sent < total {
        s.write_all(&buf).expect("write over loopback");
        sent += buf.len();
    }
    drop(s);
    let _ = h.join();
    sent as f64 / t.elapsed().as_secs_f64()
}
