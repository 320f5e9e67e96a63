//! The TLS transport as a byte stream: bulk data, full duplex, timeouts,
//! shutdown, and handshake failures that are not about certificates.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use livemig::testing::transport::{
    carries_64mib, pattern, shutdown_unblocks_reader, write_timeout_fires,
};
use livemig::transport::{mem, Endpoint, Transport};
use livemig_tls::{connect_tls, TlsConfig, TlsError, TlsListener, TlsTransport};

#[test]
fn carries_64mib_intact_and_ends_cleanly() {
    let pki = Pki::new("bulk");
    let (a, b) = tls_pair(&pki.identity("src"), &pki.identity("dst"));
    assert!(b.peer().starts_with("tcp:127.0.0.1:"), "{}", b.peer());
    assert!(b.peer().ends_with("(TLS)"), "{}", b.peer());
    // Odd-sized writes, checked byte for byte; dropping the writer sends
    // close_notify, so the reader then sees a clean end of file.
    carries_64mib(a, b);
}

#[test]
fn full_duplex_from_two_threads() {
    // Each side writes 16 MiB while a clone on another thread reads 16 MiB.
    // Holding one lock across blocking I/O would deadlock here as soon as
    // both socket buffers fill up.
    let pki = Pki::new("duplex");
    let (a, b) = tls_pair(&pki.identity("src"), &pki.identity("dst"));
    const LEN: usize = 16 << 20;
    let mut threads = Vec::new();
    for (seed, t) in [(1u64, a), (2u64, b)] {
        let mut w = t;
        let mut r = w.try_clone().unwrap();
        r.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        threads.push(std::thread::spawn(move || {
            let data = pattern(LEN, seed);
            for chunk in data.chunks(100_003) {
                w.write_all(chunk).unwrap();
            }
            w.flush().unwrap();
            w
        }));
        threads.push(std::thread::spawn(move || {
            let mut got = vec![0u8; LEN];
            r.read_exact(&mut got).unwrap();
            assert!(got == pattern(LEN, 3 - seed), "corrupted");
            r
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn read_timeout_is_honoured_and_loses_nothing() {
    let pki = Pki::new("rto");
    let (mut a, mut b) = tls_pair(&pki.identity("src"), &pki.identity("dst"));
    let mut rx = b.try_clone().unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 8];
    let e = rx.read(&mut buf).unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock),
        "{e:?}"
    );
    let el = t0.elapsed();
    assert!(
        el >= Duration::from_millis(40) && el < Duration::from_secs(5),
        "{el:?}"
    );
    // The stream is intact after the timeout.
    a.write_all(b"after the timeout").unwrap();
    let mut got = [0u8; 17];
    rx.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"after the timeout");
    // And in the other direction, through the other handle.
    b.write_all(b"ok").unwrap();
    let mut two = [0u8; 2];
    a.read_exact(&mut two).unwrap();
    assert_eq!(&two, b"ok");
    assert!(rx.set_read_timeout(Some(Duration::ZERO)).is_err());
}

#[test]
fn write_timeout_fires_when_peer_never_reads() {
    let pki = Pki::new("wto");
    let (a, b) = tls_pair(&pki.identity("src"), &pki.identity("dst"));
    write_timeout_fires(a, b);
}

#[test]
fn shutdown_unblocks_a_blocked_reader() {
    let pki = Pki::new("shut");
    let (a, b) = tls_pair(&pki.identity("src"), &pki.identity("dst"));
    // The reader holds the reading half; shutdown must not wait for it.
    let mut a = shutdown_unblocks_reader(a, b);
    // The peer sees the connection end without close_notify: an error.
    let mut buf = [0u8; 4];
    a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let e = a.read(&mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{e}");
}

#[test]
fn tls_over_an_in_memory_pipe() {
    let pki = Pki::new("mem");
    let (c, s) = mem::pair();
    let sid = pki.identity("dst");
    let server = std::thread::spawn(move || TlsTransport::server(Box::new(s), &sid, TIMEOUT));
    let mut c =
        TlsTransport::client(Box::new(c), "localhost", &pki.identity("src"), TIMEOUT).unwrap();
    let mut s = server.join().unwrap().unwrap();
    c.write_all(b"hello over mem").unwrap();
    let mut buf = [0u8; 14];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello over mem");
    assert!(format!("{c:?}").contains("TlsTransport"));
}

#[test]
fn unix_socket_needs_a_server_name() {
    let pki = Pki::new("unix");
    let path = pki.dir.path().join("mig.sock");
    let ep = Endpoint::Unix(path);
    let l = TlsListener::bind(&ep, &pki.identity("dst")).unwrap();
    let e = connect_tls(&ep, &pki.identity("src"), Some(TIMEOUT))
        .err()
        .unwrap();
    assert!(matches!(e, TlsError::ServerName { .. }), "{e}");
    assert!(e.to_string().contains("set server_name"), "{e}");

    let id = TlsConfig {
        server_name: Some("localhost".into()),
        ..pki.host("src")
    }
    .load()
    .unwrap();
    let t = std::thread::spawn(move || connect_tls(&ep, &id, Some(TIMEOUT)).unwrap());
    let mut s = l.accept().unwrap();
    let mut c = t.join().unwrap();
    c.write_all(b"unix").unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"unix");
}

#[test]
fn silent_client_times_out_the_handshake() {
    let pki = Pki::new("silent");
    let mut l = TlsListener::bind(&loopback(), &pki.identity("dst")).unwrap();
    l.set_handshake_timeout(Duration::from_millis(200));
    assert_eq!(l.handshake_timeout(), Duration::from_millis(200));
    let Endpoint::Tcp(addr) = l.local_endpoint().clone() else {
        panic!("not tcp")
    };
    let _silent = TcpStream::connect(&addr).unwrap();
    let t0 = Instant::now();
    let e = l.accept().err().unwrap();
    assert!(e.is_timeout(), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(
        e.to_string().contains("TLS handshake with tcp:127.0.0.1:"),
        "{e}"
    );

    // Nobody connects: accept_timeout expires.
    let e = l.accept_timeout(Duration::from_millis(30)).err().unwrap();
    assert!(e.is_timeout(), "{e}");
}

#[test]
fn plain_tcp_peer_is_not_tls() {
    let pki = Pki::new("plain");
    let l = TlsListener::bind(&loopback(), &pki.identity("dst")).unwrap();
    let Endpoint::Tcp(addr) = l.local_endpoint().clone() else {
        panic!("not tcp")
    };
    let t = std::thread::spawn(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        let _ = s.write_all(b"LMIG hello, this is not TLS\r\n\r\n");
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    let e = l.accept().err().unwrap();
    assert!(!e.is_timeout(), "{e}");
    assert!(
        e.to_string()
            .starts_with("TLS handshake with tcp:127.0.0.1:"),
        "{e}"
    );
    eprintln!("{e}");
    t.join().unwrap();

    // A TLS client talking to a plain TCP server.
    let plain = livemig::transport::listen(&loopback()).unwrap();
    let ep = plain.local_endpoint().clone();
    let id = pki.identity("src");
    let t = std::thread::spawn(move || connect_tls(&ep, &id, Some(Duration::from_secs(2))));
    let mut s = plain.accept().unwrap();
    s.write_all(&[0u8; 64]).unwrap();
    let e = t.join().unwrap().err().unwrap();
    assert!(matches!(e, TlsError::Handshake { .. }), "{e}");
    eprintln!("{e}");
}

#[test]
fn connect_refused_names_the_endpoint() {
    let pki = Pki::new("refused");
    let l = livemig::transport::listen(&loopback()).unwrap();
    let ep = l.local_endpoint().clone();
    drop(l);
    let e = connect_tls(&ep, &pki.identity("src"), Some(TIMEOUT))
        .err()
        .unwrap();
    assert!(matches!(e, TlsError::Transport(_)), "{e}");
    assert!(e.to_string().contains(&ep.to_string()), "{e}");
}

#[test]
fn reports_the_tcp_send_queue_and_round_trip_under_it() {
    // Pre-copy waits for the send queue to drain at the end of a round and
    // counts the round trip in the expected downtime: a TLS connection must
    // pass the TCP connection's figures on (it reported none before).
    let pki = Pki::new("linkinfo");
    let (mut a, b) = tls_pair(&pki.identity("src"), &pki.identity("dst"));
    assert!(a.round_trip().is_some(), "no round trip over TLS on TCP");
    // 8 MiB that nobody reads: some of it stays queued on this side.
    a.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let chunk = vec![7u8; 64 << 10];
    for _ in 0..128 {
        if a.write_all(&chunk).and_then(|_| a.flush()).is_err() {
            break;
        }
    }
    let queued = a.unacked_bytes().expect("no send queue over TLS on TCP");
    assert!(queued > 0, "nothing queued with an unread peer");
    drop(b);
}
