//! A shaped link between two "hosts": two network namespaces joined by a
//! link with a bandwidth limit and a round-trip time, for migrating between
//! two VMMs as between two machines (issue 16, "Real links").
//!
//! Each namespace has one TAP device, [`LINK_DEV`], with a private address
//! ([`ShapedLink::addr`]); nothing is routed anywhere else. This machine's
//! kernel has no `netem` (nor `fq`/`etf`), only `htb`/`tbf`, so the link is
//! built from two parts:
//!
//! * **rate**: an `htb` qdisc on each TAP's egress (one class at `rate`,
//!   `ceil` = `rate`, a `bfifo` leaf of [`ShapedLink::queue_limit_bytes`]):
//!   what leaves a host is serialised at the link's rate and queued (then
//!   dropped) like at a switch port. `tc -s qdisc` shows what it carried
//!   ([`ShapedLink::qdisc_stats`]).
//! * **delay**: this process forwards every frame between the two TAPs
//!   (both opened with `IFF_VNET_HDR` and TSO/checksum offloads, so a
//!   frame is a TCP segment of up to 64 KiB, as on a veth) and holds each
//!   one for half the RTT before writing it to the other side: a delay
//!   line, in both directions. A frame never leaves before its time; under
//!   load it can leave later, so the RTT is at least the configured one.
//!
//! The forwarder costs CPU in the process that owns the link (the test or
//! the bench): what one TCP stream really reaches over the link is
//! [`ShapedLink::tcp_throughput`], measured, never assumed.
//!
//! Everything (namespaces, TAPs, forwarder threads) is removed on drop,
//! also after a panic. Needs root, iproute2 (`ip`, `tc` with `htb`) and
//! `/dev/net/tun`; [`ShapedLink::new`] answers [`LinkError::Unavailable`]
//! with the reason when something is missing, for callers to skip loudly.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::Vmm;

/// The link's device in both namespaces.
pub const LINK_DEV: &str = "lnk0";

/// The two hosts' addresses (a /24 that exists only inside the namespaces).
const ADDRS: [&str; 2] = ["10.77.0.1", "10.77.0.2"];

/// Largest frame read from a TAP: the virtio-net header plus a 64 KiB
/// TSO segment and its Ethernet header.
const FRAME_MAX: usize = 65_536 + 256;

/// How often the forwarder's readers look at the stop flag.
const STOP_POLL_MS: i32 = 50;

/// One of the link's two hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The first namespace (`addr_a`).
    A,
    /// The second namespace (`addr_b`).
    B,
}

impl Side {
    /// The other host.
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }

    fn index(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
}

/// What can go wrong setting up or inspecting a link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Something the link needs is missing on this machine; callers skip
    /// and print this.
    #[error("shaped links need {0}")]
    Unavailable(String),
    /// A command failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr (or why it did not run).
        stderr: String,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `tc` printed something this module cannot read.
    #[error("unexpected `tc` output: {0}")]
    TcOutput(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> LinkError {
    let what = what.into();
    move |source| LinkError::Io { what, source }
}

/// Runs a command; its stdout, or [`LinkError::Command`].
fn run(args: &[&str]) -> Result<String, LinkError> {
    let command = args.join(" ");
    let (first, rest) = args.split_first().ok_or_else(|| LinkError::Command {
        command: command.clone(),
        stderr: "empty command".into(),
    })?;
    let out = Command::new(first)
        .args(rest)
        .output()
        .map_err(|e| LinkError::Command {
            command: command.clone(),
            stderr: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(LinkError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Root, `ip`, `tc` and `/dev/net/tun`: `Ok` if all are there, else what
/// is missing.
pub fn prerequisites() -> Result<(), LinkError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(LinkError::Unavailable(
            "root (network namespaces, TAP devices, tc)".into(),
        ));
    }
    for tool in ["ip", "tc"] {
        run(&[tool, "-V"])
            .map_err(|e| LinkError::Unavailable(format!("iproute2's `{tool}` ({e})")))?;
    }
    if !Path::new("/dev/net/tun").exists() {
        return Err(LinkError::Unavailable("/dev/net/tun".into()));
    }
    Ok(())
}

/// Frames and bytes the delay line delivered in one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// Frames written to the receiving side's TAP.
    pub frames: u64,
    /// Their bytes (Ethernet frames, without the virtio-net header).
    pub bytes: u64,
    /// Frames the receiving TAP refused (lost, as on a wire).
    pub write_errors: u64,
}

#[derive(Default)]
struct Counters {
    frames: AtomicU64,
    bytes: AtomicU64,
    write_errors: AtomicU64,
}

/// What a side's egress qdisc (the `htb` root) carried, from `tc -s`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QdiscStats {
    /// Bytes sent through the qdisc.
    pub bytes: u64,
    /// Packets (TSO segments count once) sent through it.
    pub packets: u64,
    /// Packets it dropped (queue full).
    pub drops: u64,
}

/// Two network namespaces joined by a shaped link (see the module docs).
pub struct ShapedLink {
    /// The first host's namespace.
    pub ns_a: String,
    /// The second host's namespace.
    pub ns_b: String,
    /// The first host's address (no prefix length).
    pub addr_a: String,
    /// The second host's address.
    pub addr_b: String,
    /// The rate limit in each direction, bits/s.
    pub rate_bps: u64,
    /// The round-trip time the delay line adds (half in each direction).
    pub rtt: Duration,
    /// Each direction's queue (the `bfifo` under the `htb` class), bytes.
    pub queue_limit_bytes: u64,
    stop: Arc<AtomicBool>,
    /// Index 0: A → B; 1: B → A.
    counters: [Arc<Counters>; 2],
    threads: Vec<JoinHandle<()>>,
    created: Vec<String>,
}

impl std::fmt::Debug for ShapedLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShapedLink")
            .field("ns_a", &self.ns_a)
            .field("ns_b", &self.ns_b)
            .field("rate_bps", &self.rate_bps)
            .field("rtt", &self.rtt)
            .finish_non_exhaustive()
    }
}

impl ShapedLink {
    /// Creates the namespaces `lm<name><pid>n<k>a`/`...b`, a TAP
    /// [`LINK_DEV`] in each with `addr_a`/`addr_b` (10.77.0.1 and .2, /24),
    /// an `htb` egress qdisc at `rate_bps` on each, and the delay line of
    /// `rtt` between them. `name` is a short tag (letters and digits).
    pub fn new(name: &str, rate_bps: u64, rtt: Duration) -> Result<ShapedLink, LinkError> {
        prerequisites()?;
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let tag: String = name
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(8)
            .collect();
        let base = format!("lm{tag}{}n{n}", std::process::id());
        let bdp = (rate_bps as f64 / 8.0 * rtt.as_secs_f64()) as u64;
        let mut link = ShapedLink {
            ns_a: format!("{base}a"),
            ns_b: format!("{base}b"),
            addr_a: ADDRS[0].into(),
            addr_b: ADDRS[1].into(),
            rate_bps,
            rtt,
            queue_limit_bytes: bdp.max(512 << 10),
            stop: Arc::new(AtomicBool::new(false)),
            counters: [Arc::default(), Arc::default()],
            threads: Vec::new(),
            created: Vec::new(),
        };
        // From here on, Drop removes whatever was made.
        let taps = [link.host(Side::A)?, link.host(Side::B)?];
        for side in [Side::A, Side::B] {
            link.shape(side)?;
        }
        link.start_delay_line(taps);
        Ok(link)
    }

    /// The namespace of `side`.
    pub fn ns(&self, side: Side) -> &str {
        match side {
            Side::A => &self.ns_a,
            Side::B => &self.ns_b,
        }
    }

    /// The address of `side`.
    pub fn addr(&self, side: Side) -> &str {
        match side {
            Side::A => &self.addr_a,
            Side::B => &self.addr_b,
        }
    }

    /// `ip netns exec <ns of side>`: prefix a command to run it on `side`.
    pub fn exec_prefix(&self, side: Side) -> Vec<String> {
        ["ip", "netns", "exec", self.ns(side)]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// Spawns `refvmm <args> --api-socket <dir>/<name>.sock` on `side`
    /// (inside its namespace); the API socket is a file, reachable from
    /// any namespace.
    pub fn refvmm(&self, side: Side, dir: &Path, name: &str, args: &[&str]) -> Result<Vmm, String> {
        let api = dir.join(format!("{name}.sock"));
        let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        a.extend(["--api-socket".into(), api.to_string_lossy().into_owned()]);
        Vmm::spawn_prefixed(name, &self.exec_prefix(side), &a, api)
    }

    /// The namespace of `side`, its loopback up, and its TAP opened there.
    fn host(&mut self, side: Side) -> Result<File, LinkError> {
        let ns = self.ns(side).to_string();
        run(&["ip", "netns", "add", &ns])
            .map_err(|e| LinkError::Unavailable(format!("network namespaces ({e})")))?;
        self.created.push(ns.clone());
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        let tap = in_netns(&ns, || open_tap(LINK_DEV))?;
        let cidr = format!("{}/24", self.addr(side));
        run(&["ip", "-n", &ns, "addr", "add", &cidr, "dev", LINK_DEV])?;
        run(&[
            "ip",
            "-n",
            &ns,
            "link",
            "set",
            LINK_DEV,
            "txqueuelen",
            "1000",
            "up",
        ])?;
        Ok(tap)
    }

    /// The `htb` rate limit on `side`'s egress.
    fn shape(&self, side: Side) -> Result<(), LinkError> {
        let ns = self.ns(side);
        let rate = format!("{}bit", self.rate_bps);
        // A burst of a quarter millisecond at the rate, at least two TSO
        // segments: htb cannot serialise a segment larger than its burst.
        let burst = format!("{}b", (self.rate_bps / 8 / 4000).max(160 << 10));
        let limit = self.queue_limit_bytes.to_string();
        let d = LINK_DEV;
        run(&[
            "tc", "-n", ns, "qdisc", "add", "dev", d, "root", "handle", "1:", "htb", "default", "1",
        ])
        .map_err(|e| LinkError::Unavailable(format!("the htb qdisc ({e})")))?;
        run(&[
            "tc", "-n", ns, "class", "add", "dev", d, "parent", "1:", "classid", "1:1", "htb",
            "rate", &rate, "ceil", &rate, "burst", &burst, "cburst", &burst, "quantum", "65536",
        ])?;
        run(&[
            "tc", "-n", ns, "qdisc", "add", "dev", d, "parent", "1:1", "handle", "10:", "bfifo",
            "limit", &limit,
        ])?;
        Ok(())
    }

    /// Four threads: per direction a reader (TAP → queue, stamped with
    /// the time the frame may leave) and a writer (queue → other TAP).
    fn start_delay_line(&mut self, taps: [File; 2]) {
        let [a, b] = taps.map(Arc::new);
        let one_way = self.rtt / 2;
        for (from, to, c) in [
            (a.clone(), b.clone(), self.counters[0].clone()),
            (b, a, self.counters[1].clone()),
        ] {
            let (tx, rx) = mpsc::channel();
            let (free_tx, free_rx) = mpsc::channel();
            let stop = self.stop.clone();
            self.threads.push(std::thread::spawn(move || {
                read_frames(&from, one_way, &tx, &free_rx, &stop)
            }));
            self.threads.push(std::thread::spawn(move || {
                write_frames(&to, &rx, &free_tx, &c)
            }));
        }
    }

    /// What the delay line delivered from `from` to the other side so far.
    pub fn forwarded(&self, from: Side) -> Forwarded {
        let c = &self.counters[from.index()];
        Forwarded {
            frames: c.frames.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            write_errors: c.write_errors.load(Ordering::Relaxed),
        }
    }

    /// What `side`'s egress `htb` qdisc carried so far (`tc -s -j qdisc`).
    pub fn qdisc_stats(&self, side: Side) -> Result<QdiscStats, LinkError> {
        let out = run(&[
            "tc",
            "-s",
            "-j",
            "-n",
            self.ns(side),
            "qdisc",
            "show",
            "dev",
            LINK_DEV,
        ])?;
        parse_htb_stats(&out)
    }

    /// The rate of `side`'s `htb` class as `tc` reports it, bits/s.
    pub fn class_rate_bps(&self, side: Side) -> Result<u64, LinkError> {
        let out = run(&["tc", "-n", self.ns(side), "class", "show", "dev", LINK_DEV])?;
        parse_class_rate(&out)
    }

    /// The time a TCP connect from `from` to the other side takes (SYN →
    /// SYN-ACK, the first one after ARP too): at least the link's RTT.
    pub fn connect_time(&self, from: Side) -> Result<Duration, LinkError> {
        let (listener, to) = self.listener(from.other())?;
        let (_stream, took) = in_netns(self.ns(from), move || {
            let t = Instant::now();
            let s = TcpStream::connect(to)?;
            Ok((s, t.elapsed()))
        })?;
        drop(listener);
        Ok(took)
    }

    /// One TCP stream from `from` to the other side sending `bytes`:
    /// the rate it reached, bytes/s (first write → last byte read).
    pub fn tcp_throughput(&self, from: Side, bytes: u64) -> Result<f64, LinkError> {
        let (listener, to) = self.listener(from.other())?;
        let sink = std::thread::spawn(move || -> io::Result<u64> {
            let (mut s, _) = listener.accept()?;
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0u64;
            loop {
                match s.read(&mut buf)? {
                    0 => return Ok(got),
                    n => got += n as u64,
                }
            }
        });
        let mut s = in_netns(self.ns(from), move || TcpStream::connect(to))?;
        let chunk = vec![0x5au8; 1 << 20];
        let t = Instant::now();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            s.write_all(&chunk[..n])
                .map_err(io_err("link throughput: write"))?;
            left -= n as u64;
        }
        drop(s);
        let got = sink
            .join()
            .map_err(|_| LinkError::TcOutput("link throughput: the reader panicked".into()))?
            .map_err(io_err("link throughput: read"))?;
        let secs = t.elapsed().as_secs_f64();
        if got != bytes {
            return Err(LinkError::Io {
                what: format!("link throughput: {got} of {bytes} bytes arrived"),
                source: io::Error::from(io::ErrorKind::UnexpectedEof),
            });
        }
        Ok(bytes as f64 / secs)
    }

    /// A TCP listener on `side`'s address (any port) and its address.
    fn listener(&self, side: Side) -> Result<(TcpListener, SocketAddr), LinkError> {
        let addr = format!("{}:0", self.addr(side));
        let l = in_netns(self.ns(side), move || TcpListener::bind(addr.as_str()))?;
        let a = l.local_addr().map_err(io_err("listener address"))?;
        Ok((l, a))
    }
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for ns in self.created.drain(..) {
            let _ = run(&["ip", "netns", "del", &ns]);
        }
    }
}

/// Runs `f` on a thread inside namespace `ns`; sockets and TAPs it
/// creates stay in `ns` after it returns.
pub fn in_netns<T: Send>(
    ns: &str,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> Result<T, LinkError> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).map_err(io_err(format!("opening {path}")))?;
    let joined = std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: `file` is an open network-namespace file; setns with
            // CLONE_NEWNET moves only this thread (which ends after `f`)
            // into it.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
        .join()
    });
    match joined {
        Ok(r) => r.map_err(io_err(format!("in namespace {ns}"))),
        Err(_) => Err(LinkError::Io {
            what: format!("in namespace {ns}"),
            source: io::Error::other("the thread panicked"),
        }),
    }
}

/// Opens (creating) the TAP `name` in the calling thread's namespace with
/// `IFF_VNET_HDR` and checksum/TSO offloads, so that TCP segments of up to
/// 64 KiB cross it whole.
fn open_tap(name: &str) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    // SAFETY: `ifreq` is a plain C struct (a byte array and a union of
    // integers, arrays and a pointer): all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= ifr.ifr_name.len() {
        return Err(io::Error::other(format!(
            "interface name {name:?} too long"
        )));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: `file` is an open /dev/net/tun; TUNSETIFF reads and writes
    // the `ifreq` it is given, which lives for the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let offloads = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    // SAFETY: TUNSETOFFLOAD takes its flags by value; `file` is the TAP.
    if unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            offloads as libc::c_ulong,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Waits up to `ms` for `f` to be readable.
fn readable(f: &File, ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, borrowed for the call.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    match r {
        r if r < 0 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

/// A frame in the delay line: when it may leave, its buffer (recycled,
/// [`FRAME_MAX`] long) and its length.
type Queued = (Instant, Vec<u8>, usize);

/// The delay line's intake: every frame `from` gives is read into a buffer
/// the output gave back (or a new one) and queued with the time it may
/// leave (now + `delay`), until `stop` or an error.
fn read_frames(
    from: &File,
    delay: Duration,
    tx: &mpsc::Sender<Queued>,
    free: &mpsc::Receiver<Vec<u8>>,
    stop: &AtomicBool,
) {
    let mut buf = vec![0u8; FRAME_MAX];
    while !stop.load(Ordering::Relaxed) {
        match readable(from, STOP_POLL_MS) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(_) => return,
        }
        let mut r = from;
        match r.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let next = free.try_recv().unwrap_or_else(|_| vec![0u8; FRAME_MAX]);
                let full = std::mem::replace(&mut buf, next);
                if tx.send((Instant::now() + delay, full, n)).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The delay line's output: writes each queued frame to `to` once its time
/// has come and gives its buffer back to the intake; ends when the intake
/// does.
fn write_frames(
    to: &File,
    rx: &mpsc::Receiver<Queued>,
    free: &mpsc::Sender<Vec<u8>>,
    c: &Counters,
) {
    const VNET_HDR_LEN: u64 = 10;
    while let Ok((at, buf, len)) = rx.recv() {
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        let frame = &buf[..len];
        let mut w = to;
        // A TAP takes a frame whole or not at all.
        match w.write(frame) {
            Ok(n) if n == frame.len() => {
                c.frames.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add(
                    (frame.len() as u64).saturating_sub(VNET_HDR_LEN),
                    Ordering::Relaxed,
                );
            }
            Ok(_) | Err(_) => {
                c.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        // The intake may have ended; the buffer is then simply dropped.
        let _ = free.send(buf);
    }
}

/// The `htb` root's counters in `tc -s -j qdisc show` output.
fn parse_htb_stats(json: &str) -> Result<QdiscStats, LinkError> {
    let v: Value =
        serde_json::from_str(json).map_err(|e| LinkError::TcOutput(format!("{e}: {json}")))?;
    let q = v
        .as_array()
        .and_then(|a| a.iter().find(|q| q["kind"] == "htb" && q["root"] == true))
        .ok_or_else(|| LinkError::TcOutput(format!("no htb root qdisc in {json}")))?;
    let num = |k: &str| {
        q[k].as_u64()
            .ok_or_else(|| LinkError::TcOutput(format!("no `{k}` in {q}")))
    };
    Ok(QdiscStats {
        bytes: num("bytes")?,
        packets: num("packets")?,
        drops: num("drops")?,
    })
}

/// The rate of the `htb` class 1:1 in `tc class show` output (tc 6.1
/// prints htb classes as text even with `-j`), bits/s.
fn parse_class_rate(text: &str) -> Result<u64, LinkError> {
    let line = text
        .lines()
        .find(|l| l.starts_with("class htb 1:1 "))
        .ok_or_else(|| LinkError::TcOutput(format!("no htb class 1:1 in {text:?}")))?;
    let mut words = line.split_whitespace();
    words
        .find(|w| *w == "rate")
        .and_then(|_| words.next())
        .and_then(parse_rate)
        .ok_or_else(|| LinkError::TcOutput(format!("no rate in {line:?}")))
}

/// `tc`'s rate notation (`1Gbit`, `500Mbit`, `64Kbit`, `100bit`), bits/s.
fn parse_rate(s: &str) -> Option<u64> {
    let num_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(num_end);
    let mult = match unit {
        "bit" => 1e0,
        "Kbit" => 1e3,
        "Mbit" => 1e6,
        "Gbit" => 1e9,
        "Tbit" => 1e12,
        _ => return None,
    };
    Some((num.parse::<f64>().ok()? * mult).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tc_output() {
        let q = r#"[{"kind":"htb","handle":"1:","root":true,"bytes":90,"packets":1,"drops":2},{"kind":"bfifo","handle":"10:","parent":"1:1","bytes":0,"packets":0,"drops":0}]"#;
        assert_eq!(
            parse_htb_stats(q).unwrap(),
            QdiscStats {
                bytes: 90,
                packets: 1,
                drops: 2
            }
        );
        assert!(parse_htb_stats(r#"[{"kind":"noqueue","root":true}]"#).is_err());
        let c = "class htb 1:1 root leaf 10: prio 0 rate 1Gbit ceil 1Gbit burst 163625b cburst 163625b \n";
        assert_eq!(parse_class_rate(c).unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("10Gbit"), Some(10_000_000_000));
        assert_eq!(parse_rate("2.5Mbit"), Some(2_500_000));
        assert_eq!(parse_rate("fast"), None);
    }
}
