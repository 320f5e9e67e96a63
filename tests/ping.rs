//! The check operators run: ping the guest every 20 ms while it live-migrates.
//!
//! A Linux bridge (in a namespace this test creates and always removes) has
//! two TAP ports, one per "host", and a veth to a client namespace. The test
//! guest's virtio-net driver answers ARP and ICMP echo; the client pings it
//! every 20 ms while refvmm migrates it five times back and forth between
//! the two ports (the guest also dirtying memory). Each source is kept
//! (paused) until its migration completed, so its TAP port stays on the
//! bridge as a real source host's would: only the announce (the VMM's RARP
//! and the guest's own gratuitous ARP) moves the guest's MAC to the new port.
//! With announces, at most one reply per migration is lost; without them
//! (`--no-announce`), the replies after the switchover go to the old port.
//!
//! Needs root, iproute2, python3 (the pinger is a small raw-socket script
//! that also checks every reply's ICMP checksum and payload),
//! /dev/net/tun and /dev/kvm.

mod common;

use common::netns::{prerequisites, Bridge};

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use livemig_suite::harness::{blackout, log_of, migrate, scratch_dir, Vmm};
use serde_json::json;

const MAC: &str = "52:54:00:4c:50:01";
const PREFIX: &str = "10.78.0";
const T: Duration = Duration::from_secs(30);
const INTERVAL_S: f64 = 0.02;

/// CLOCK_MONOTONIC in seconds: the clock Python's `time.monotonic()` reads,
/// so the pinger's times and the test's can be compared.
fn monotonic() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively
    // borrowed `ts`; CLOCK_MONOTONIC always exists on Linux.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(r, 0, "clock_gettime");
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

type Net = Bridge;

/// The source and destination VMMs of this test, on the bridge.
impl Bridge {
    /// `refvmm run` with the test guest on TAP `tap`, on the bridge.
    fn source(&self, dir: &Path, tap: &str, cmdline: &str) -> Vmm {
        let netspec = format!("tap={tap},mac={MAC},ip={PREFIX}.2");
        let mut v = self.vmm(
            dir,
            "src",
            &[
                "run",
                "--memory",
                "256M",
                "--kernel",
                "builtin:testguest",
                "--cmdline",
                cmdline,
                "--net",
                &netspec,
            ],
        );
        v.wait_api(T).unwrap();
        self.enslave(tap).unwrap();
        v
    }

    /// `refvmm receive` on TAP `tap`, on the bridge; returns it and its endpoint.
    fn destination(&self, dir: &Path, name: &str, tap: &str, announce: bool) -> (Vmm, String) {
        let netspec = format!("tap={tap},mac={MAC}");
        let mut args = vec!["receive", "--listen", "tcp:127.0.0.1:0", "--net", &netspec];
        if !announce {
            args.push("--no-announce");
        }
        let mut v = self.vmm(dir, name, &args);
        let ep = v.listen_endpoint(T).unwrap();
        self.enslave(tap).unwrap();
        (v, ep)
    }
}

/// The pinger: an ICMP echo request every `interval` seconds until the stop
/// file exists, then one more second for late replies. Writes one line per
/// request: `seq sent_at replied_at|-` (CLOCK_MONOTONIC seconds); a reply
/// with a bad ICMP checksum or a payload other than the request's is counted
/// in a final `bad <n>` line and not taken as a reply.
const PINGER: &str = r#"
import os, select, socket, struct, sys, time
dst, interval, stop, out = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident = os.getpid() & 0xffff
def csum(b):
    if len(b) % 2: b += b'\0'
    t = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    t = (t >> 16) + (t & 0xffff); t += t >> 16
    return (~t) & 0xffff
sent, got, payloads, bad = [], {}, {}, 0
nxt = time.monotonic(); end = None
while True:
    now = time.monotonic()
    if end is None and os.path.exists(stop): end = now + 1.0
    if end is not None and now >= end: break
    if end is None and now >= nxt:
        seq = len(sent)
        payload = struct.pack('!d', now) + bytes(range(48))
        h = struct.pack('!BBHHH', 8, 0, 0, ident, seq & 0xffff)
        pkt = struct.pack('!BBHHH', 8, 0, csum(h + payload), ident, seq & 0xffff) + payload
        payloads[seq & 0xffff] = payload
        s.sendto(pkt, (dst, 0)); sent.append(now)
        nxt += interval
        if nxt < now: nxt = now + interval
    wait = max(0.0, min(nxt, end if end is not None else nxt) - time.monotonic())
    r, _, _ = select.select([s], [], [], wait)
    if r:
        d = s.recv(4096); t = time.monotonic()
        ihl = (d[0] & 15) * 4; icmp = d[ihl:]
        if len(icmp) < 8: continue
        typ, code, _, i, sq = struct.unpack('!BBHHH', icmp[:8])
        if typ != 0 or i != ident: continue
        if csum(icmp) != 0 or icmp[8:] != payloads.get(sq):
            bad += 1; continue
        got.setdefault(sq, t)
with open(out, 'w') as f:
    for q, at in enumerate(sent):
        r = got.get(q & 0xffff)
        f.write('%d %.6f %s\n' % (q, at, '%.6f' % r if r is not None else '-'))
    f.write('bad %d\n' % bad)
"#;

/// One echo request: when it was sent, and when its reply came (if it did).
#[derive(Debug, Clone, Copy)]
struct Echo {
    seq: u64,
    sent: f64,
    reply: Option<f64>,
}

struct Pinger {
    child: Child,
    stop: PathBuf,
    out: PathBuf,
}

impl Pinger {
    fn start(net: &Net, dir: &Path) -> Pinger {
        let stop = dir.join("ping.stop");
        let out = dir.join("ping.txt");
        // A previous pinger's stop file would stop this one at once.
        let _ = std::fs::remove_file(&stop);
        let child = Command::new("ip")
            .args(["netns", "exec", &net.client, "python3", "-c", PINGER])
            .arg(format!("{PREFIX}.2"))
            .arg(INTERVAL_S.to_string())
            .arg(&stop)
            .arg(&out)
            .spawn()
            .unwrap();
        Pinger { child, stop, out }
    }

    /// Stops the pinger; returns every request and the number of bad replies.
    fn finish(mut self) -> (Vec<Echo>, u64) {
        std::fs::write(&self.stop, b"").unwrap();
        let st = self.child.wait().unwrap();
        assert!(st.success(), "pinger failed: {st}");
        let text = std::fs::read_to_string(&self.out).unwrap();
        let mut echoes = Vec::new();
        let mut bad = 0;
        for l in text.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                ["bad", n] => bad = n.parse().unwrap(),
                [q, s, r] => echoes.push(Echo {
                    seq: q.parse().unwrap(),
                    sent: s.parse().unwrap(),
                    reply: r.parse().ok(),
                }),
                _ => panic!("pinger output: {l}"),
            }
        }
        (echoes, bad)
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.stop, b"");
        let _ = self.child.wait();
    }
}

/// Lost replies and the longest reply gap among the requests sent in
/// `[from, to)`.
fn window(echoes: &[Echo], from: f64, to: f64) -> (Vec<u64>, usize, f64) {
    let inside: Vec<&Echo> = echoes
        .iter()
        .filter(|e| e.sent >= from && e.sent < to)
        .collect();
    let lost: Vec<u64> = inside
        .iter()
        .filter(|e| e.reply.is_none())
        .map(|e| e.seq)
        .collect();
    let mut replies: Vec<f64> = inside.iter().filter_map(|e| e.reply).collect();
    replies.sort_by(f64::total_cmp);
    let gap = replies.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    (lost, inside.len(), gap)
}

/// The guest answers on the source before any migration: the driver works.
fn wait_answering(src: &mut Vmm) {
    src.wait_for("NET up", T, |g| {
        g.other.iter().any(|l| l.starts_with("NET up"))
    })
    .unwrap();
    src.wait_ready(T).unwrap();
}

/// Starts the pinger and returns once the guest received at least
/// `PRE_REQUESTS` more frames (a fixed sleep measured less under load: the
/// pinger's interpreter can take most of a second to start).
fn start_pinging(net: &Net, dir: &Path, vm: &mut Vmm) -> Pinger {
    let rx0 = vm.query_status(T).unwrap().rx;
    let pinger = Pinger::start(net, dir);
    let deadline = Instant::now() + T;
    loop {
        let st = vm.query_status(T).unwrap();
        if st.rx >= rx0 + PRE_REQUESTS {
            return pinger;
        }
        assert!(
            Instant::now() < deadline,
            "the guest received {} frames in {T:?} of pinging",
            st.rx - rx0
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Echo requests the guest must have received before a migration starts.
const PRE_REQUESTS: u64 = 30;

#[test]
fn ping_survives_five_ping_pong_migrations() {
    const TEST: &str = "ping_survives_five_ping_pong_migrations";
    let Some(_kvm) = common::kvm_or_skip(TEST) else {
        return;
    };
    if !prerequisites(TEST) {
        return;
    }
    let net = Net::new("lmP", "y", Some(&format!("{PREFIX}.1/24"))).unwrap();
    let dir = scratch_dir("ping-y");
    let taps = ["lmpa", "lmpb"];
    let mut cur = net.source(&dir, taps[0], "ws=64 rate=10 fresh=1");
    wait_answering(&mut cur);
    let pinger = start_pinging(&net, &dir, &mut cur);
    let before = cur.query_status(T).unwrap();
    assert!(before.rx > 0 && before.tx > 0, "{before:?}");

    let mut starts = Vec::new();
    let mut downtimes = Vec::new();
    let mut blackouts = Vec::new();
    let mut last_status = before;
    for hop in 1..=5 {
        let (mut dst, ep) = net.destination(&dir, &format!("dst{hop}"), taps[hop % 2], true);
        starts.push(monotonic());
        let t_hop = Instant::now();
        let report = migrate(
            &cur,
            &ep,
            json!({"keep_source": true, "downtime_limit_ms": 20}),
        )
        .unwrap_or_else(|e| panic!("migration {hop}: {e}"));
        assert_eq!(report["status"], "completed");
        downtimes.push(report["downtime_ms"].as_f64().unwrap_or(f64::MAX));
        eprintln!(
            "migration {hop}: downtime {} ms, total {} ms",
            report["downtime_ms"], report["total_ms"]
        );
        // Pings keep flowing for a while on the new port, with the old
        // source (and its port) still there.
        std::thread::sleep(Duration::from_millis(1500));
        let st = dst.query_status(T).unwrap();
        assert!(
            st.heartbeats > last_status.heartbeats
                && st.pages_written > last_status.pages_written
                && st.rx > last_status.rx
                && st.tx > last_status.tx
                && st.corrupt == 0,
            "migration {hop}: counters continue: {last_status:?} then {st:?}"
        );
        last_status = st;
        {
            let s = log_of(&cur);
            let d = log_of(&dst);
            // The guest's own blackout: its last heartbeat on the source to
            // its first on the destination.
            let b = blackout(&s, &d, t_hop).expect("heartbeats on both sides");
            blackouts.push(b.switchover_gap.as_secs_f64() * 1e3);
            assert!(s.corrupt.is_empty() && d.corrupt.is_empty());
            assert!(!d.ready, "migration {hop}: the guest rebooted");
            assert!(
                d.other.iter().any(|l| l == "NET announce"),
                "migration {hop}: the guest did not answer the announce request: {:?}",
                d.other
            );
        }
        // The old source leaves; its TAP disappears, the next hop reuses the name.
        let _ = cur.api(&json!({"cmd": "quit"}), |_| {});
        assert!(cur.wait_exit(Duration::from_secs(10)).is_some());
        cur = dst;
    }
    let end = monotonic();
    let (echoes, bad) = pinger.finish();
    assert_eq!(bad, 0, "replies with a bad checksum or payload");
    let pre = window(&echoes, 0.0, starts[0]);
    let mut rtt: Vec<f64> = echoes
        .iter()
        .filter(|e| e.sent < starts[0])
        .filter_map(|e| e.reply.map(|r| (r - e.sent) * 1e3))
        .collect();
    rtt.sort_by(f64::total_cmp);
    eprintln!(
        "before migrating: {} requests, {} lost, round trip median {:.3} ms, max {:.3} ms",
        pre.1,
        pre.0.len(),
        rtt.get(rtt.len() / 2).copied().unwrap_or(f64::NAN),
        rtt.last().copied().unwrap_or(f64::NAN)
    );
    assert!(pre.1 > 20 && pre.0.is_empty(), "{pre:?}");
    let mut total = 0;
    for (i, &from) in starts.iter().enumerate() {
        let to = starts.get(i + 1).copied().unwrap_or(end);
        let (lost, n, gap) = window(&echoes, from, to);
        eprintln!(
            "migration {}: {n} requests, {} lost {lost:?}, longest reply gap {:.1} ms, guest blackout {:.1} ms, engine downtime {:.1} ms",
            i + 1,
            lost.len(),
            gap * 1e3,
            blackouts[i],
            downtimes[i]
        );
        assert!(n > 50, "too few requests in the window: {n}");
        // Requests that reach the source while the guest is paused for the
        // switchover are lost with it; nothing else may be (the guest's
        // gratuitous ARP moves the bridge within a heartbeat of it running
        // on the destination). So: at most one when the guest's blackout
        // (heartbeat gap) stays under one ping interval, as it does when the
        // engine meets its 20 ms downtime limit; when a loaded host stretched
        // the blackout, at most the requests that fit in it.
        let interval_ms = INTERVAL_S * 1e3;
        let allowed = (((blackouts[i] + 2.0) / interval_ms).ceil() as usize).max(1);
        if allowed > 1 {
            eprintln!(
                "*** migration {}: guest blackout {:.1} ms (engine downtime {:.1} ms) is over one ping interval; allowing {allowed} lost ***",
                i + 1,
                blackouts[i],
                downtimes[i]
            );
        }
        assert!(
            lost.len() <= allowed,
            "migration {}: guest blackout {:.1} ms, engine downtime {:.1} ms, lost {lost:?}",
            i + 1,
            blackouts[i],
            downtimes[i]
        );
        total += lost.len();
    }
    eprintln!("five migrations: {total} replies lost of {}", echoes.len());
    drop(cur);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn without_announce_replies_go_to_the_old_port() {
    const TEST: &str = "without_announce_replies_go_to_the_old_port";
    let Some(_kvm) = common::kvm_or_skip(TEST) else {
        return;
    };
    if !prerequisites(TEST) {
        return;
    }
    let net = Net::new("lmP", "n", Some(&format!("{PREFIX}.1/24"))).unwrap();
    let dir = scratch_dir("ping-n");
    let mut src = net.source(&dir, "lmpa", "ws=64 rate=10");
    wait_answering(&mut src);
    let pinger = start_pinging(&net, &dir, &mut src);
    // No request may be in flight at the switchover: one that the source's
    // device put into the guest's receive ring just before the pause would
    // be answered from the destination after it, and that single reply
    // teaches the bridge the new port (which is how real networks recover
    // from a missing announce: any frame from the guest). Stop pinging
    // (`finish` waits a second for the last replies), migrate, then ping
    // again.
    let (before, bad) = pinger.finish();
    assert_eq!(bad, 0);
    let start = monotonic();
    std::thread::sleep(Duration::from_millis(100));
    let (mut dst, ep) = net.destination(&dir, "dst", "lmpb", false);
    let report = migrate(&src, &ep, json!({"keep_source": true})).unwrap();
    assert_eq!(report["status"], "completed");
    // The guest runs on the destination from here on.
    let switched = monotonic();
    let pinger = Pinger::start(&net, &dir);
    // The source stays (paused) with its port on the bridge, as a real
    // source host would until it is cleaned up. 3 s: on a loaded machine
    // the pinger (python3 in the client namespace) takes a while to start.
    std::thread::sleep(Duration::from_secs(3));
    let st = dst.query_status(T).unwrap();
    let end = monotonic();
    let (echoes, bad) = pinger.finish();
    assert_eq!(bad, 0);
    let (pre_lost, pre_n, _) = window(&before, 0.0, start);
    let (lost, n, gap) = window(&echoes, switched, end);
    eprintln!(
        "without announce: before {pre_n} requests {} lost; after the switchover {n} requests, {} lost, longest reply gap {:.1} ms; guest {st:?}",
        pre_lost.len(),
        lost.len(),
        gap * 1e3
    );
    assert!(pre_n > 20 && pre_lost.is_empty());
    assert!(
        n >= 20 && lost.len() > n / 2,
        "without any announce most replies after the switchover are lost: {} of {n}",
        lost.len()
    );
    {
        let d = log_of(&dst);
        assert!(d.corrupt.is_empty() && !d.ready);
        assert!(
            !d.other.iter().any(|l| l == "NET announce"),
            "no announce request reaches the guest with --no-announce"
        );
    }
    let _ = src.api(&json!({"cmd": "quit"}), |_| {});
    let _ = std::fs::remove_dir_all(dir);
}

/// Kills a process the test did not start itself (the upgraded VMM is the
/// old VMM's child) when the test ends, however it ends.
struct KillPid(Option<u32>);

impl Drop for KillPid {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill(2) on a pid; no memory is involved.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

#[test]
fn ping_across_a_local_upgrade_loses_no_reply() {
    const TEST: &str = "ping_across_a_local_upgrade_loses_no_reply";
    let Some(_kvm) = common::kvm_or_skip(TEST) else {
        return;
    };
    if !prerequisites(TEST) {
        return;
    }
    let net = Net::new("lmU", "u", Some(&format!("{PREFIX}.1/24"))).unwrap();
    let dir = scratch_dir("ping-u");
    let tap = "lmpu";
    let netspec = format!("tap={tap},mac={MAC},ip={PREFIX}.2");
    let mut src = net.vmm(
        &dir,
        "src",
        &[
            "run",
            "--memory",
            "256M",
            "--kernel",
            "builtin:testguest",
            "--cmdline",
            "ws=64 rate=10 fresh=1",
            "--memory-backend",
            "memfd",
            "--net",
            &netspec,
        ],
    );
    src.wait_api(T).unwrap();
    net.enslave(tap).unwrap();
    wait_answering(&mut src);
    let pinger = Pinger::start(&net, &dir);
    std::thread::sleep(Duration::from_secs(1));
    let start = monotonic();
    // The new VMM is started by the old one, inside its namespace, and
    // takes the same TAP (its descriptor travels): no bridge port changes.
    let out = Command::new(livemig_suite::harness::refvmm_path())
        .arg("upgrade")
        .arg("--api-socket")
        .arg(&src.api)
        .arg("--binary")
        .arg(livemig_suite::harness::refvmm_path())
        .output()
        .unwrap();
    let st = livemig_suite::harness::api_request(&src.api, &json!({"cmd": "status"}), |_| {});
    let _new = KillPid(
        st.as_ref()
            .ok()
            .and_then(|v| v["pid"].as_u64())
            .map(|p| p as u32),
    );
    assert!(
        out.status.success(),
        "upgrade: {}\nold VMM:\n{}",
        String::from_utf8_lossy(&out.stderr),
        src.stderr()
    );
    std::thread::sleep(Duration::from_millis(1500));
    let end = monotonic();
    let (echoes, bad) = pinger.finish();
    assert_eq!(bad, 0, "replies with a bad checksum or payload");
    let (lost, sent, gap) = window(&echoes, start, end);
    eprintln!(
        "ping across a local upgrade: {sent} requests, lost {lost:?}, longest reply gap {:.1} ms",
        gap * 1e3
    );
    assert!(sent > 50, "{sent} requests");
    assert!(lost.is_empty(), "replies lost across the upgrade: {lost:?}");
    assert!(log_of(&src).corrupt.is_empty());
    let _ = livemig_suite::harness::api_request(&src.api, &json!({"cmd": "quit"}), |_| {});
}
