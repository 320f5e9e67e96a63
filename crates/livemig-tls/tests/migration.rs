//! Migrations of the software VM over mutual TLS on TCP loopback, and the
//! ways an unauthenticated or tampering peer is stopped.
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use livemig::memory::{MemoryLayout, RegionDesc};
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::{Endpoint, Transport};
use livemig::{migrate, receive, CancelToken, ErrorKind, MigrationConfig, ReceiveConfig};
use livemig_tls::{connect_tls, TlsConfig, TlsError, TlsIdentity, TlsListener};

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

type DestResult = Result<SoftVm, livemig::MigrationError>;

/// Receives one migration on a thread: accept, handshake, `receive`.
fn destination(listener: TlsListener) -> std::thread::JoinHandle<Result<DestResult, TlsError>> {
    std::thread::spawn(move || {
        let transport = listener.accept()?;
        let cfg = ReceiveConfig {
            io_timeout: Duration::from_secs(5),
        };
        Ok(receive(transport, &cfg, |desc| {
            SoftVm::new(&desc.layout, &SoftConfig::idle())
        })
        .map(|(vm, _)| vm))
    })
}

fn migrate_over_tls(src: &SoftVm, config: &MigrationConfig, ep: Endpoint, id: &TlsIdentity) {
    let dst_id = id.clone();
    let listener = TlsListener::bind(&ep, &dst_id).unwrap();
    let ep = listener.local_endpoint().clone();
    let dest = destination(listener);
    let transport = connect_tls(&ep, id, Some(TIMEOUT)).unwrap();
    let t0 = Instant::now();
    let report = migrate(src, transport, config, &CancelToken::new(), &mut |_| {})
        .expect("migration over TLS");
    let dst = dest
        .join()
        .unwrap()
        .expect("TLS accept")
        .expect("destination");
    assert_eq!(report.status, livemig::report::Status::Completed);
    assert!(
        src.snapshot() == dst.snapshot(),
        "memory differs after migration"
    );
    eprintln!(
        "{ep}: {} pages, {} rounds, {:?}",
        report.pages_sent,
        report.rounds.len(),
        t0.elapsed()
    );
}

#[test]
fn idle_vm_migrates_over_tls() {
    let pki = Pki::new("idle");
    let src = SoftVm::new(&layout(32), &SoftConfig::idle()).unwrap();
    src.fill(7);
    src.start();
    migrate_over_tls(
        &src,
        &MigrationConfig::default(),
        loopback(),
        &pki.identity("host"),
    );
}

#[test]
fn busy_vm_migrates_over_tls() {
    let pki = Pki::new("busy");
    let cfg = SoftConfig {
        guest_writers: 2,
        device_writers: 1,
        pages_per_ms: 5,
    };
    let src = SoftVm::new(&layout(32), &cfg).unwrap();
    src.fill(1);
    src.start();
    std::thread::sleep(Duration::from_millis(50));
    let mc = MigrationConfig {
        downtime_limit: Duration::from_millis(200),
        ..Default::default()
    };
    migrate_over_tls(&src, &mc, loopback(), &pki.identity("host"));
    assert!(src.writes() > 0);
}

#[test]
fn migrates_over_a_unix_socket_with_server_name() {
    let pki = Pki::new("unixmig");
    let src = SoftVm::new(&layout(8), &SoftConfig::idle()).unwrap();
    src.fill(3);
    src.start();
    let id = TlsConfig {
        server_name: Some("localhost".into()),
        ..pki.host("host")
    }
    .load()
    .unwrap();
    let ep = Endpoint::Unix(pki.dir.path().join("mig.sock"));
    migrate_over_tls(&src, &MigrationConfig::default(), ep, &id);
}

/// Runs a handshake between a client and a server identity; returns both
/// sides' errors (each `None` if that side succeeded).
fn handshake(client: &TlsIdentity, server: &TlsIdentity) -> (Option<TlsError>, Option<TlsError>) {
    let l = TlsListener::bind(&loopback(), server).unwrap();
    let ep = l.local_endpoint().clone();
    let s = std::thread::spawn(move || l.accept().err());
    let c = connect_tls(&ep, client, Some(TIMEOUT)).err();
    (c, s.join().unwrap())
}

#[test]
fn client_certificate_from_another_ca_is_refused() {
    let ours = Pki::new("ours");
    let theirs = Pki::new("theirs");
    // The intruder trusts our CA (so it accepts our server) but its own
    // certificate is signed by another CA.
    let intruder = TlsConfig {
        ca: ours.ca_file.clone(),
        ..theirs.host("intruder")
    }
    .load()
    .unwrap();
    let (c, s) = handshake(&intruder, &ours.identity("dst"));
    let s = s.expect("server must refuse");
    let msg = s.to_string();
    eprintln!("destination: {msg}");
    assert!(
        msg.starts_with("TLS handshake with tcp:127.0.0.1:"),
        "{msg}"
    );
    assert!(
        msg.contains("invalid peer certificate: UnknownIssuer"),
        "{msg}"
    );
    assert!(msg.contains("not signed by our CA"), "{msg}");
    // The source learns it in connect_tls, before migrate could send
    // anything.
    let c = c.expect("client must see the refusal");
    let msg = c.to_string();
    eprintln!("source: {msg}");
    assert!(
        msg.starts_with("TLS handshake with tcp:127.0.0.1:"),
        "{msg}"
    );
    assert!(
        msg.contains("the server refused our client certificate"),
        "{msg}"
    );
    assert!(msg.contains("UnknownCA"), "{msg}");
    assert!(!c.is_timeout());
}

#[test]
fn server_certificate_from_another_ca_is_refused() {
    let ours = Pki::new("ours2");
    let theirs = Pki::new("theirs2");
    // A rogue destination that accepts our certificate but presents one
    // signed by another CA.
    let rogue = TlsConfig {
        ca: ours.ca_file.clone(),
        ..theirs.host("rogue")
    }
    .load()
    .unwrap();
    let (c, s) = handshake(&ours.identity("src"), &rogue);
    let c = c.expect("client must refuse");
    let msg = c.to_string();
    eprintln!("source: {msg}");
    assert!(
        msg.starts_with("TLS handshake with tcp:127.0.0.1:")
            && msg.contains("failed: invalid peer certificate: UnknownIssuer"),
        "{msg}"
    );
    let s = s.expect("server sees the refusal");
    eprintln!("rogue destination: {s}");
    assert!(
        s.to_string()
            .contains("the client refused our server certificate"),
        "{s}"
    );
}

#[test]
fn server_certificate_for_another_name_is_refused() {
    let pki = Pki::new("name");
    let (cert_chain, key) = pki.issue("other", &["other.example"]);
    let other = TlsConfig {
        cert_chain,
        key,
        ca: pki.ca_file.clone(),
        server_name: None,
    }
    .load()
    .unwrap();
    let (c, _s) = handshake(&pki.identity("src"), &other);
    let msg = c.expect("client must refuse").to_string();
    eprintln!("source: {msg}");
    assert!(msg.contains("invalid peer certificate"), "{msg}");
    assert!(msg.contains("127.0.0.1"), "{msg}");
}

#[test]
fn client_without_certificate_is_refused() {
    let pki = Pki::new("nocert");
    let l = TlsListener::bind(&loopback(), &pki.identity("dst")).unwrap();
    let Endpoint::Tcp(addr) = l.local_endpoint().clone() else {
        panic!("not tcp")
    };
    let s = std::thread::spawn(move || l.accept().err());

    // A well-behaved TLS 1.3 client that trusts the CA but has no
    // certificate of its own.
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(&pki.ca_file).unwrap();
    for c in CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"livemig".to_vec()];
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    let sock = TcpStream::connect(&addr).unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    // TLS 1.3 lets the client finish its side; the refusal arrives next.
    let _ = tls.write_all(b"LMIG");
    let mut buf = [0u8; 16];
    let e = tls.read(&mut buf).unwrap_err();
    eprintln!("certificate-less client: {e}");
    assert!(e.to_string().contains("CertificateRequired"), "{e}");

    let msg = s.join().unwrap().expect("server must refuse").to_string();
    eprintln!("destination: {msg}");
    assert!(msg.contains("sent no certificate"), "{msg}");
}

/// Forwards `from` to `to`, flipping one bit of the bytes at the offsets
/// `flip` of the stream.
fn forward(mut from: TcpStream, mut to: TcpStream, flip: &[u64]) {
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &at in flip {
            if at >= pos && at < pos + n as u64 {
                buf[(at - pos) as usize] ^= 0x10;
            }
        }
        pos += n as u64;
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

#[test]
fn tampering_on_the_wire_is_detected() {
    let pki = Pki::new("mitm");
    let id = pki.identity("host");
    let listener = TlsListener::bind(&loopback(), &id).unwrap();
    let Endpoint::Tcp(server_addr) = listener.local_endpoint().clone() else {
        panic!("not tcp")
    };
    let dest = destination(listener);

    // An on-path attacker that relays everything but flips a bit 3 MiB into
    // the source's stream (in the middle of the page data), and another 100
    // bytes later (so that at least one lands inside a record, not in a
    // record header).
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_ep: Endpoint = format!("tcp:{}", proxy.local_addr().unwrap())
        .parse()
        .unwrap();
    let relay = std::thread::spawn(move || {
        let (client, _) = proxy.accept().unwrap();
        let server = TcpStream::connect(&server_addr).unwrap();
        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let back = std::thread::spawn(move || forward(s2, c2, &[]));
        forward(client, server, &[3 << 20, (3 << 20) + 100]);
        back.join().unwrap();
    });

    let src = SoftVm::new(&layout(16), &SoftConfig::idle()).unwrap();
    src.fill(9);
    src.start();
    let transport = connect_tls(&proxy_ep, &id, Some(TIMEOUT)).unwrap();
    let e = migrate(
        &src,
        transport,
        &MigrationConfig::default(),
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap_err();
    eprintln!("source: {e}");
    assert!(!e.is_ambiguous(), "{e}");
    let de = dest
        .join()
        .unwrap()
        .expect("TLS accept")
        .err()
        .expect("the destination must reject the tampered stream");
    eprintln!("destination: {de}");
    let dm = de.to_string();
    // Almost always "cannot decrypt peer's message"; a flip in a record
    // header is another TLS error.
    assert!(dm.contains("TLS error"), "{dm}");
    relay.join().unwrap();
}

#[test]
fn cancel_interrupts_a_migration_over_tls() {
    let pki = Pki::new("cancel");
    let id = pki.identity("host");
    let listener = TlsListener::bind(&loopback(), &id).unwrap();
    let ep = listener.local_endpoint().clone();
    let dest = destination(listener);
    let src = SoftVm::new(&layout(64), &SoftConfig::idle()).unwrap();
    src.fill(5);
    src.start();
    // Slow enough (8 MiB/s for 68 MiB) that the cancel lands mid-round.
    let mc = MigrationConfig {
        max_bandwidth: Some(8 << 20),
        ..Default::default()
    };
    let cancel = CancelToken::new();
    let c2 = cancel.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        c2.cancel();
    });
    let transport: Box<dyn Transport> = connect_tls(&ep, &id, Some(TIMEOUT)).unwrap();
    let t0 = Instant::now();
    let e = migrate(&src, transport, &mc, &cancel, &mut |_| {}).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::Cancelled), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    canceller.join().unwrap();
    let de = dest.join().unwrap().expect("TLS accept");
    assert!(de.is_err());
}
