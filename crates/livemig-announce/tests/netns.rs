//! Announcing into a real Linux bridge, in network namespaces this test
//! creates and always removes.
//!
//! Topology (per test, names made unique with the process id):
//!
//! ```text
//!   namespace lmA-<pid>-<t>                    namespace lmC-<pid>-<t>
//!   ┌──────────────────────────────┐           ┌──────────────┐
//!   │ TAP "dst" ─┐                 │           │              │
//!   │            br0 ── veth "vA" ─┼───────────┼─ veth "vC"   │ (the "client")
//!   └──────────────────────────────┘           └──────────────┘
//! ```
//!
//! Needs root (`CAP_NET_ADMIN`, `CAP_NET_RAW`, `CAP_SYS_ADMIN` for setns),
//! `ip` and `bridge` from iproute2, and `/dev/net/tun`; skipped (loudly)
//! otherwise, or failed if `LIVEMIG_REQUIRE_NETNS=1` (for CI).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use livemig_announce::{
    announce, format_mac, open_tap, parse_announce, rarp_frame, AnnounceKind, FrameSender, Nic,
    PacketSender, Schedule, SendError, TapSender,
};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0x01];
const CLIENT_SIDE_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0x02];
const NEVER_ANNOUNCED: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0x99];
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
/// fd77::2, the guest's IPv6 address in the neighbour-cache test.
const GUEST_IP6: [u8; 16] = [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
/// Where the client's neighbour cache says fd77::2 is before the announce
/// (the guest's old location, as seen by the client).
const OLD_LLADDR: &str = "02:00:00:00:00:66";

/// Whether this machine can run the test; prints why not.
fn can_run(test: &str) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_string());
    }
    for tool in ["ip", "bridge"] {
        if !Command::new(tool)
            .arg("-V")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
        {
            missing.push(format!("the `{tool}` command (iproute2)"));
        }
    }
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun".to_string());
    }
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("LIVEMIG_REQUIRE_NETNS").is_some_and(|v| v == "1") {
        panic!(
            "{test}: LIVEMIG_REQUIRE_NETNS=1 but this machine lacks {}",
            missing.join(", ")
        );
    }
    // Straight to stderr, not eprintln!: the test harness would swallow it.
    let bar = "!".repeat(72);
    let _ = writeln!(
        io::stderr().lock(),
        "\n{bar}\n!! SKIPPED {test}: needs {}\n{bar}",
        missing.join(", ")
    );
    false
}

/// Run a command, panicking with its output if it fails.
fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Network namespaces created by the test, deleted on drop (also when the
/// test panics). Deleting a namespace destroys the bridge, the veth pairs
/// and the TAP devices in it.
struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    fn create(names: &[String]) -> Self {
        let mut guard = Namespaces { names: Vec::new() };
        for name in names {
            // A leftover from a killed earlier run with the same pid.
            let _ = Command::new("ip").args(["netns", "del", name]).output();
            run(&["ip", "netns", "add", name]);
            guard.names.push(name.clone());
        }
        guard
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            match Command::new("ip").args(["netns", "del", name]).output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "warning: ip netns del {name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) => eprintln!("warning: ip netns del {name}: {e}"),
            }
        }
    }
}

/// Run `f` on a thread that entered the network namespace `ns`.
/// Descriptors it opens (TAP, sockets) stay in that namespace.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: `file` is an open namespace file; setns only changes this
        // thread's network namespace.
        let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(ret, 0, "setns {path}: {}", io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: `c` is a valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(index, 0, "no interface {name}");
    index
}

/// Reads a bridge's forwarding database over rtnetlink (`RTM_GETNEIGH`,
/// `AF_BRIDGE`), from a socket opened in the bridge's namespace: cheap enough
/// to poll every millisecond.
struct FdbReader {
    fd: OwnedFd,
    seq: u32,
}

const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NDA_LLADDR: u16 = 2;

impl FdbReader {
    fn open() -> Self {
        // SAFETY: plain socket(2) call, checked below.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        assert!(raw >= 0, "netlink socket: {}", io::Error::last_os_error());
        // SAFETY: fresh descriptor owned by nobody else.
        FdbReader {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
            seq: 0,
        }
    }

    /// Every (MAC, port ifindex) in the bridge fdbs of the namespace.
    fn entries(&mut self) -> Vec<([u8; 6], u32)> {
        self.seq += 1;
        let mut req = Vec::with_capacity(28);
        req.extend_from_slice(&28u32.to_ne_bytes()); // nlmsg_len
        req.extend_from_slice(&RTM_GETNEIGH.to_ne_bytes());
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        req.extend_from_slice(&flags.to_ne_bytes());
        req.extend_from_slice(&self.seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes()); // pid
        req.push(libc::AF_BRIDGE as u8); // ndm_family
        req.extend_from_slice(&[0u8; 11]); // rest of struct ndmsg
                                           // SAFETY: `req` is valid for its length; the socket is open.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
        assert_eq!(n, 28, "netlink send: {}", io::Error::last_os_error());

        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(n > 0, "netlink recv: {}", io::Error::last_os_error());
            let mut msgs = &buf[..n as usize];
            while msgs.len() >= 16 {
                let len = u32::from_ne_bytes(msgs[0..4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(msgs[4..6].try_into().unwrap());
                if len < 16 || len > msgs.len() {
                    break;
                }
                match kind {
                    NLMSG_DONE => return out,
                    NLMSG_ERROR => panic!("netlink error reply"),
                    RTM_NEWNEIGH if len >= 28 => {
                        let index = i32::from_ne_bytes(msgs[20..24].try_into().unwrap());
                        let mut attrs = &msgs[28..len];
                        while attrs.len() >= 4 {
                            let alen = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
                            let atype = u16::from_ne_bytes([attrs[2], attrs[3]]);
                            if alen < 4 || alen > attrs.len() {
                                break;
                            }
                            if atype == NDA_LLADDR && alen == 10 {
                                let mac: [u8; 6] = attrs[4..10].try_into().unwrap();
                                out.push((mac, index as u32));
                            }
                            attrs = &attrs[((alen + 3) & !3).min(attrs.len())..];
                        }
                    }
                    _ => {}
                }
                msgs = &msgs[((len + 3) & !3).min(msgs.len())..];
            }
        }
    }

    fn has(&mut self, mac: &[u8; 6], port: u32) -> bool {
        self.entries()
            .iter()
            .any(|(m, index)| m == mac && *index == port)
    }
}

/// `bridge fdb show br br0` in `ns`, as text.
fn fdb_show(ns: &str) -> String {
    run(&[
        "ip", "netns", "exec", ns, "bridge", "fdb", "show", "br", "br0",
    ])
}

/// Whether `bridge fdb show` lists `mac` on port `dev`.
fn fdb_lists(fdb: &str, mac: &[u8; 6], dev: &str) -> bool {
    let mac = format_mac(mac);
    fdb.lines().any(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        words.first() == Some(&mac.as_str()) && words.windows(2).any(|w| w == ["dev", dev])
    })
}

/// Build the topology; returns (ns A, ns C) names.
fn build(ns: &Namespaces) -> (String, String) {
    let a = ns.names[0].clone();
    let c = ns.names[1].clone();
    run(&["ip", "-n", &a, "link", "add", "br0", "type", "bridge"]);
    run(&[
        "ip", "-n", &a, "link", "add", "vA", "type", "veth", "peer", "name", "vC", "netns", &c,
    ]);
    run(&["ip", "-n", &a, "link", "set", "vA", "master", "br0", "up"]);
    run(&["ip", "-n", &a, "link", "set", "br0", "up"]);
    run(&["ip", "-n", &c, "link", "set", "vC", "up"]);
    (a, c)
}

/// Bring the TAP `dst` (created in `a` by `open_tap`) into the bridge.
fn attach_tap(a: &str) {
    run(&["ip", "-n", a, "link", "set", "dst", "master", "br0", "up"]);
}

/// A receiving AF_PACKET socket on `vC` in the client namespace.
fn client_capture(c: &str) -> OwnedFd {
    in_netns(c, || {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call, checked below.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::c_int::from(proto),
            )
        };
        assert!(raw >= 0, "capture socket: {}", io::Error::last_os_error());
        // SAFETY: fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: all-zero sockaddr_ll is valid; fields set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex("vC") as i32;
        // SAFETY: `addr` is a valid sockaddr_ll of the size given.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(ret, 0, "bind capture: {}", io::Error::last_os_error());
        fd
    })
}

/// Every frame waiting on the capture socket.
fn drain(fd: &OwnedFd) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            return frames;
        }
        frames.push(buf[..n as usize].to_vec());
    }
}

/// Wraps a sender to note when its first frame was written.
struct Timed<S> {
    inner: S,
    first: Arc<Mutex<Option<Instant>>>,
}

impl<S: FrameSender> FrameSender for Timed<S> {
    fn send(&mut self, frame: &[u8]) -> Result<(), SendError> {
        let result = self.inner.send(frame);
        let mut first = self.first.lock().unwrap();
        if first.is_none() {
            *first = Some(Instant::now());
        }
        result
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[test]
fn tap_announce_teaches_the_bridge() {
    if !can_run("tap_announce_teaches_the_bridge") {
        return;
    }
    let pid = std::process::id();
    let ns = Namespaces::create(&[format!("lmA-{pid}-tap"), format!("lmC-{pid}-tap")]);
    let (a, c) = build(&ns);
    // Create the TAP inside namespace A: the descriptor keeps it there.
    let tap_fd = in_netns(&a, || open_tap("dst")).expect("open_tap");
    attach_tap(&a);
    let dst_port = in_netns(&a, || ifindex("dst"));
    let mut fdb = in_netns(&a, FdbReader::open);
    let capture = client_capture(&c);
    drain(&capture);

    assert!(
        !fdb.has(&GUEST_MAC, dst_port),
        "guest MAC known before announcing"
    );

    // As a VMM does: the announce gets a duplicate of the descriptor its
    // virtio-net backend keeps (a TAP without descriptors disappears).
    let sender = TapSender::dup_from(tap_fd.as_fd()).expect("TapSender");
    assert_eq!(sender.name(), "dst");
    let first_send = Arc::new(Mutex::new(None));
    let timed = Timed {
        inner: sender,
        first: Arc::clone(&first_send),
    };
    let nic = Nic::new(GUEST_MAC, Box::new(timed)).with_ipv4(GUEST_IP);

    // From announce() to the bridge having learned the MAC on the TAP port.
    let t0 = Instant::now();
    let handle = announce(vec![nic], &Schedule::default());
    let returned = t0.elapsed();
    let mut polls = 0u32;
    let learned = loop {
        polls += 1;
        if fdb.has(&GUEST_MAC, dst_port) {
            break t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "MAC never learned");
        thread::sleep(Duration::from_millis(1));
    };
    let sent = first_send.lock().unwrap().expect("nothing sent") - t0;
    println!(
        "announce() returned after {returned:?}; first RARP written at {sent:?}; fdb showed {} \
         on dst at {learned:?}, {:?} after the write ({polls} netlink polls, every 1 ms)",
        format_mac(&GUEST_MAC),
        learned.saturating_sub(sent)
    );

    let report = handle.join();
    println!("report: {}", serde_json::to_string(&report).unwrap());
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.nics[0].rarp_sent, 5);
    assert_eq!(report.nics[0].garp_sent, 5);

    // The same through the bridge tool, as an operator would check.
    let shown = fdb_show(&a);
    println!("bridge fdb show br br0:\n{shown}");
    assert!(fdb_lists(&shown, &GUEST_MAC, "dst"), "{shown}");
    // Negative: a MAC never announced is not there, on any port.
    assert!(!shown.contains(&format_mac(&NEVER_ANNOUNCED)), "{shown}");
    assert!(!fdb.entries().iter().any(|(m, _)| *m == NEVER_ANNOUNCED));

    // The broadcast frames reached the client side of the bridge unchanged.
    let got: Vec<_> = drain(&capture)
        .iter()
        .filter_map(|f| parse_announce(f).map(|a| (a, f.len())))
        .filter(|(a, _)| a.mac == GUEST_MAC)
        .collect();
    let rarps = got.iter().filter(|(a, _)| a.kind == AnnounceKind::Rarp);
    let garps = got.iter().filter(|(a, _)| a.kind == AnnounceKind::Garp);
    assert_eq!(rarps.count(), 5, "{got:?}");
    assert_eq!(garps.clone().count(), 5, "{got:?}");
    assert!(garps.clone().all(|(a, _)| a.ip == Some(GUEST_IP)));
    assert!(got.iter().all(|(_, len)| *len == 60));
}

#[test]
fn direct_tap_write_latency() {
    if !can_run("direct_tap_write_latency") {
        return;
    }
    let pid = std::process::id();
    let ns = Namespaces::create(&[format!("lmA-{pid}-lat"), format!("lmC-{pid}-lat")]);
    let (a, _c) = build(&ns);
    let tap_fd = in_netns(&a, || open_tap("dst")).expect("open_tap");
    attach_tap(&a);
    let dst_port = in_netns(&a, || ifindex("dst"));
    let mut fdb = in_netns(&a, FdbReader::open);
    let mut sender = TapSender::new(tap_fd).expect("TapSender");

    let mut times = Vec::new();
    for i in 0..20u8 {
        let mac = [0x52, 0x54, 0x00, 0xcc, 0x00, i];
        assert!(!fdb.has(&mac, dst_port));
        let t0 = Instant::now();
        sender.send(&rarp_frame(&mac)).expect("send");
        let sent = t0.elapsed();
        let learned = loop {
            if fdb.has(&mac, dst_port) {
                break t0.elapsed();
            }
            assert!(t0.elapsed() < Duration::from_secs(2), "MAC never learned");
            thread::sleep(Duration::from_millis(1));
        };
        times.push((sent, learned));
    }
    times.sort_by_key(|t| t.1);
    println!(
        "write(2) to the TAP then fdb: min {:?}, median {:?}, max {:?} (write itself: {:?})",
        times[0].1, times[10].1, times[19].1, times[10].0
    );
}

/// Drop CAP_NET_RAW from this thread's effective capabilities.
fn drop_net_raw() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_RAW: u32 = 13;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a v3 header writes two `Data` entries.
    let ret = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    assert_eq!(ret, 0, "capget: {}", io::Error::last_os_error());
    data[0].effective &= !(1 << CAP_NET_RAW);
    // SAFETY: capset with a v3 header reads two `Data` entries; it changes
    // this thread's capabilities only.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    assert_eq!(ret, 0, "capset: {}", io::Error::last_os_error());
}

#[test]
fn packet_sender_learning_and_errors() {
    if !can_run("packet_sender_learning_and_errors") {
        return;
    }
    let pid = std::process::id();
    let ns = Namespaces::create(&[format!("lmA-{pid}-pkt"), format!("lmC-{pid}-pkt")]);
    let (a, c) = build(&ns);
    let tap_fd = in_netns(&a, || open_tap("dst")).expect("open_tap");
    attach_tap(&a);
    let dst_port = in_netns(&a, || ifindex("dst"));
    let va_port = in_netns(&a, || ifindex("vA"));
    let mut fdb = in_netns(&a, FdbReader::open);
    // A second veth pair in the client namespace, left down.
    run(&[
        "ip", "-n", &c, "link", "add", "vDown", "type", "veth", "peer", "name", "vDown2",
    ]);

    // Interface errors name the interface.
    let missing = in_netns(&c, || PacketSender::new("nosuch0").map(|_| ()));
    match missing {
        Err(SendError::InterfaceNotFound { name }) => assert_eq!(name, "nosuch0"),
        other => panic!("expected InterfaceNotFound, got {other:?}"),
    }
    // Permission: without CAP_NET_RAW the socket cannot be opened.
    let denied = in_netns(&c, || {
        drop_net_raw();
        PacketSender::new("vC").map(|_| ())
    });
    let err = denied.expect_err("AF_PACKET without CAP_NET_RAW");
    println!("without CAP_NET_RAW: {err}");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    assert!(err.to_string().contains("\"vC\""), "{err}");

    let up = in_netns(&c, || PacketSender::new("vC")).expect("PacketSender vC");
    let down = in_netns(&c, || PacketSender::new("vDown")).expect("PacketSender vDown");
    assert_eq!(up.describe(), "interface \"vC\" (AF_PACKET)");
    let tap = TapSender::dup_from(tap_fd.as_fd()).expect("TapSender");

    // Three NICs, one on an interface that is down: its errors are reported
    // and the other two are announced in full.
    let schedule = Schedule {
        rounds: 3,
        ..Schedule::default()
    };
    let nics = vec![
        Nic::new(GUEST_MAC, Box::new(tap)).with_ipv4(GUEST_IP),
        Nic::new(NEVER_ANNOUNCED, Box::new(down)),
        Nic::new(CLIENT_SIDE_MAC, Box::new(up)),
    ];
    let report = announce(nics, &schedule).join();
    println!("report: {}", serde_json::to_string_pretty(&report).unwrap());
    assert_eq!(report.rounds_sent, 3);
    assert_eq!(report.nics[0].rarp_sent + report.nics[0].garp_sent, 6);
    assert_eq!(report.nics[2].rarp_sent, 3);
    assert_eq!(report.nics[1].failed, 3);
    assert_eq!(report.errors.len(), 3);
    for e in &report.errors {
        assert_eq!(e.nic, 1);
        assert_eq!(e.os_error, Some(libc::ENETDOWN), "{}", e.error);
        assert!(e.error.contains("vDown"), "{}", e.error);
    }

    assert!(fdb.has(&GUEST_MAC, dst_port));
    assert!(fdb.has(&CLIENT_SIDE_MAC, va_port));
    assert!(!fdb.entries().iter().any(|(m, _)| *m == NEVER_ANNOUNCED));
    let shown = fdb_show(&a);
    assert!(fdb_lists(&shown, &GUEST_MAC, "dst"), "{shown}");
    assert!(fdb_lists(&shown, &CLIENT_SIDE_MAC, "vA"), "{shown}");
    assert!(!shown.contains(&format_mac(&NEVER_ANNOUNCED)), "{shown}");
}

#[test]
fn tap_that_is_down() {
    if !can_run("tap_that_is_down") {
        return;
    }
    let pid = std::process::id();
    let ns = Namespaces::create(&[format!("lmA-{pid}-down")]);
    let a = ns.names[0].clone();
    let tap_fd = in_netns(&a, || open_tap("dst")).expect("open_tap");
    let sender = TapSender::dup_from(tap_fd.as_fd()).expect("TapSender");
    // The TAP was never set up: the kernel refuses the write (EIO). The
    // error lands in the report; the announce itself does not fail.
    let schedule = Schedule {
        rounds: 2,
        ..Schedule::default()
    };
    let report = announce(vec![Nic::new(GUEST_MAC, Box::new(sender))], &schedule).join();
    println!("write to a TAP that is down: {:?}", report.errors.first());
    assert_eq!(report.rounds_sent, 2);
    assert_eq!(report.errors.len(), 2);
    assert_eq!(report.errors[0].os_error, Some(libc::EIO));
    assert!(report.errors[0].error.contains("tap \"dst\""));
    assert!(report.error.is_none());
}

/// The link-layer address `ip -6 neigh` shows for `addr` on `vC` in `c`.
fn client_neigh(c: &str, addr: &str) -> Option<String> {
    let out = run(&["ip", "-n", c, "-6", "neigh", "show", addr, "dev", "vC"]);
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "lladdr")
        .map(|w| w[1].to_string())
}

/// Waits up to `timeout` for the client's entry for `addr` to show `want`.
fn wait_neigh(c: &str, addr: &str, want: &str, timeout: Duration) -> Option<String> {
    let t = Instant::now();
    loop {
        let got = client_neigh(c, addr);
        if got.as_deref() == Some(want) || t.elapsed() > timeout {
            return got;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn unsolicited_na_updates_the_clients_neighbour_cache() {
    if !can_run("unsolicited_na_updates_the_clients_neighbour_cache") {
        return;
    }
    let pid = std::process::id();
    let ns = Namespaces::create(&[format!("lmA-{pid}-na"), format!("lmC-{pid}-na")]);
    let (a, c) = build(&ns);
    let tap_fd = in_netns(&a, || open_tap("dst")).expect("open_tap");
    attach_tap(&a);
    // The client is on fd77::/64 and believes fd77::2 is at OLD_LLADDR.
    run(&[
        "ip",
        "-n",
        &c,
        "addr",
        "add",
        "fd77::1/64",
        "dev",
        "vC",
        "nodad",
    ]);
    run(&[
        "ip", "-n", &c, "-6", "neigh", "replace", "fd77::2", "lladdr", OLD_LLADDR, "dev", "vC",
        "nud", "stale",
    ]);
    assert_eq!(client_neigh(&c, "fd77::2").as_deref(), Some(OLD_LLADDR));
    let capture = client_capture(&c);
    drain(&capture);
    let schedule = Schedule {
        rounds: 2,
        ..Schedule::default()
    };
    let guest = format_mac(&GUEST_MAC);

    // Control: RARP and gratuitous ARP alone leave the IPv6 entry alone.
    let tap = TapSender::dup_from(tap_fd.as_fd()).expect("TapSender");
    let nic = Nic::new(GUEST_MAC, Box::new(tap)).with_ipv4(GUEST_IP);
    assert!(announce(vec![nic], &schedule).join().is_clean());
    let unchanged = wait_neigh(&c, "fd77::2", &guest, Duration::from_millis(300));
    assert_eq!(
        unchanged.as_deref(),
        Some(OLD_LLADDR),
        "changed without an NA"
    );

    // With the IPv6 address: the NA reaches the client through the bridge
    // and its kernel takes the new link-layer address.
    let tap = TapSender::dup_from(tap_fd.as_fd()).expect("TapSender");
    let nic = Nic::new(GUEST_MAC, Box::new(tap)).with_ipv6(GUEST_IP6);
    let report = announce(vec![nic], &schedule).join();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.nics[0].na_sent, 2);
    let updated = wait_neigh(&c, "fd77::2", &guest, Duration::from_secs(2));
    println!(
        "ip -6 neigh: {}",
        run(&["ip", "-n", &c, "-6", "neigh", "show", "dev", "vC"]).trim()
    );
    assert_eq!(updated.as_deref(), Some(guest.as_str()));

    let nas: Vec<_> = drain(&capture)
        .iter()
        .filter_map(|f| parse_announce(f))
        .filter(|a| a.kind == AnnounceKind::UnsolicitedNa)
        .collect();
    assert_eq!(nas.len(), 2, "{nas:?}");
    assert!(nas
        .iter()
        .all(|a| a.mac == GUEST_MAC && a.ipv6 == Some(GUEST_IP6)));
}
