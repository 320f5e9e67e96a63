//! Migrations of the software VM over mutual TLS on TCP loopback, and the
//! ways an unauthenticated or tampering peer is stopped.
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use livemig::memory::{MemoryLayout, RegionDesc};
use livemig::report::Progress;
use livemig::testing::fault::{FaultProbe, FaultTransport};
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::{Endpoint, StreamOpener, Transport};
use livemig::vm::{DestinationVm, SourceVm, VmError};
use livemig::{
    migrate, receive, CancelToken, ErrorKind, Migration, MigrationConfig, ReceiveConfig, Reception,
    SOURCE_CANCEL_GRACE,
};
use livemig_tls::{
    connect_tls, TlsAcceptor, TlsConfig, TlsDialer, TlsError, TlsIdentity, TlsListener,
};

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

/// An idle soft VM as a destination builds it, recording whether it was
/// ever resumed and whether it was dropped.
struct WatchedVm {
    vm: SoftVm,
    resumed: Arc<AtomicBool>,
    dropped: Arc<AtomicBool>,
}

impl DestinationVm for WatchedVm {
    fn memory(&self) -> &dyn livemig::memory::GuestMemory {
        DestinationVm::memory(&self.vm)
    }

    fn restore_state(&mut self, sections: &[livemig::state::Section]) -> Result<(), VmError> {
        self.vm.restore_state(sections)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.resumed.store(true, Ordering::SeqCst);
        DestinationVm::resume(&mut self.vm)
    }
}

impl Drop for WatchedVm {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

/// A stream opener that records the bytes written on every stream it
/// opened ([`FaultTransport`] without faults).
struct Counting<O> {
    inner: O,
    probes: Arc<Mutex<Vec<FaultProbe>>>,
}

impl<O: StreamOpener> StreamOpener for Counting<O> {
    fn open(&mut self) -> std::io::Result<Box<dyn Transport>> {
        let (t, probe) = FaultTransport::with_plan(self.inner.open()?, Vec::new());
        self.probes.lock().unwrap().push(probe);
        Ok(Box::new(t))
    }
}

/// What `rx` brings within 30 s; fails naming `what` if nothing comes.
fn within<T>(rx: &mpsc::Receiver<T>, what: &str) -> T {
    rx.recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{what} did not return within 30 s ({e})"))
}

/// An operator cancels a migration over mutual TLS in the middle of round
/// 0: with `streams` page streams (TLS too), a filled 68 MiB guest capped
/// at 16 MiB/s, once 8 MiB of pages went out. The source fails
/// `Cancelled` with its guest as it was (running, memory untouched); the
/// destination hears why — the source's `Error` "cancelled" — and runs
/// nothing; both return within a bound. (The source has no writers, so
/// that its memory can be compared byte for byte.)
fn cancel_in_round_0_over_tls(tag: &str, streams: u32) {
    let pki = Pki::new(tag);
    let id = pki.identity("host");
    let listener = TlsListener::bind(&loopback(), &id).unwrap();
    let ep = listener.local_endpoint().clone();
    let src = Arc::new(SoftVm::new(&layout(64), &SoftConfig::idle()).unwrap());
    src.fill(5);
    src.start();
    let before = src.snapshot();
    let (resumed, dropped) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (dest_tx, dest_rx) = mpsc::channel();
    let (r2, d2) = (resumed.clone(), dropped.clone());
    std::thread::spawn(move || {
        let accepted = listener.accept();
        let r = accepted.map(|t| {
            Reception::new(t)
                .accept_streams(TlsAcceptor(Some(listener)))
                .run(|d| {
                    let vm = SoftVm::new(&d.layout, &SoftConfig::idle())?;
                    let (resumed, dropped) = (r2, d2);
                    Ok(WatchedVm {
                        vm,
                        resumed,
                        dropped,
                    })
                })
                .map(|(_, report)| report)
        });
        let _ = dest_tx.send(r);
    });
    let probes = Arc::new(Mutex::new(Vec::new()));
    let control = connect_tls(&ep, &id, Some(TIMEOUT)).unwrap();
    let (control, probe) = FaultTransport::with_plan(control, Vec::new());
    probes.lock().unwrap().push(probe);
    let opener = Counting {
        inner: TlsDialer {
            endpoint: ep,
            id,
            timeout: Some(TIMEOUT),
        },
        probes: probes.clone(),
    };
    let cancel = CancelToken::new();
    let rounds = Arc::new(AtomicU32::new(0));
    let (done_tx, done_rx) = mpsc::channel();
    let (src2, c2, n2) = (src.clone(), cancel.clone(), rounds.clone());
    std::thread::spawn(move || {
        let mc = MigrationConfig {
            max_bandwidth: Some(16 << 20),
            ..Default::default()
        };
        let r = Migration::new(&*src2)
            .config(mc)
            .streams(streams, opener)
            .cancel(c2)
            .progress(move |p| {
                if let Progress::Round(_) = p {
                    n2.fetch_add(1, Ordering::SeqCst);
                }
            })
            .run(Box::new(control));
        let _ = done_tx.send(r);
    });
    let sent = || -> u64 {
        probes
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.bytes_written())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while sent() < 8 << 20 {
        assert!(Instant::now() < deadline, "8 MiB not sent within 30 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        rounds.load(Ordering::SeqCst),
        0,
        "round 0 ended before the cancel"
    );
    let connections = if streams > 1 { streams + 1 } else { 1 };
    assert_eq!(probes.lock().unwrap().len() as u32, connections);
    let t0 = Instant::now();
    cancel.cancel();
    let e = within(&done_rx, "the cancelled source").expect_err("the source completed");
    let took = t0.elapsed();
    assert!(matches!(e.kind, ErrorKind::Cancelled), "source: {e}");
    assert!(!e.is_ambiguous(), "source: {e}");
    assert!(!src.is_paused(), "the source's guest does not run again");
    assert!(
        src.snapshot() == before,
        "the migration changed the source's memory"
    );
    let de = within(&dest_rx, "the destination")
        .expect("TLS accept")
        .expect_err("the destination completed");
    println!("source: {e} ({took:?} after the cancel)\ndestination: {de}");
    match &de.kind {
        ErrorKind::Remote { message, .. } if message == "cancelled" => {}
        // The token shut the connections down: the source took longer
        // than its grace to stop (a loaded host), as documented.
        _ if took >= SOURCE_CANCEL_GRACE => {
            eprintln!("the source took {took:?} to stop: the destination saw its connections close")
        }
        _ => panic!("the destination did not hear that the source cancelled: {de}"),
    }
    assert!(
        !resumed.load(Ordering::SeqCst),
        "the destination ran the guest"
    );
    assert!(
        dropped.load(Ordering::SeqCst),
        "the destination kept its VM"
    );
}

#[test]
fn a_cancel_in_round_0_over_tls_tells_the_destination() {
    cancel_in_round_0_over_tls("cancel", 1);
}

#[test]
fn a_cancel_in_round_0_over_tls_with_four_streams_tells_the_destination() {
    cancel_in_round_0_over_tls("cancel4", 4);
}
