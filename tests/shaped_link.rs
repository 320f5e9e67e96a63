//! Migration over a shaped link between two network namespaces (issue 16,
//! "Real links"): the source refvmm on one "host", the destination on the
//! other, joined by a 1 Gbit/s link with a 2 ms RTT
//! (`livemig_suite::link::ShapedLink`: an htb rate limit on each side's
//! egress, a delay line between the two TAPs).
//!
//! The link itself is checked first (no KVM needed): tc shows the htb class
//! at the rate asked for, a TCP handshake takes at least the RTT, and one
//! TCP stream cannot get more than the rate through. Then a dirtying test
//! guest migrates across it: no CORRUPT, and the migration's bytes went
//! through the shaped qdisc and the delay line (not some other path).
//!
//! Needs root, iproute2 (`ip`, `tc` with htb) and /dev/net/tun (skips
//! loudly otherwise; `LIVEMIG_REQUIRE_NETNS=1` turns the skip into a
//! failure), and /dev/kvm for the migration.

mod common;

use std::time::Duration;

use common::netns::shaped_link_or_skip;
use livemig_suite::harness::{migrate, scratch_dir, Vmm};
use livemig_suite::link::{ShapedLink, Side};
use serde_json::json;

const GBIT: u64 = 1_000_000_000;
const RTT: Duration = Duration::from_millis(2);
const T: Duration = Duration::from_secs(30);

#[test]
fn the_link_is_shaped() {
    let Some(link) = shaped_link_or_skip("the_link_is_shaped", GBIT, RTT) else {
        return;
    };
    for side in [Side::A, Side::B] {
        assert_eq!(link.class_rate_bps(side).unwrap(), GBIT, "{side:?}");
    }
    let took = link.connect_time(Side::A).unwrap();
    assert!(
        took >= RTT,
        "a TCP handshake over a {RTT:?} link took {took:?}"
    );
    // 16 MB at 1 Gbit/s takes at least 128 ms: the shaper lets at most
    // the rate (plus one burst of 160 KiB) through, however idle the machine.
    let bytes = 16_000_000;
    let rate = link.tcp_throughput(Side::A, bytes).unwrap();
    let ceiling = (bytes + (160 << 10)) as f64 / (bytes as f64 * 8.0 / GBIT as f64);
    assert!(
        rate <= ceiling,
        "one TCP stream got {:.0} MB/s through a 1 Gbit/s link",
        rate / 1e6
    );
    eprintln!("handshake {took:?}, one TCP stream {:.0} MB/s", rate / 1e6);
    let q = link.qdisc_stats(Side::A).unwrap();
    assert!(q.bytes >= bytes, "the htb qdisc carried {} bytes", q.bytes);
    let f = link.forwarded(Side::A);
    assert!(f.bytes >= bytes, "the delay line carried {f:?}");
}

fn vmm_on(link: &ShapedLink, side: Side, dir: &std::path::Path, name: &str, args: &[&str]) -> Vmm {
    link.refvmm(side, dir, name, args).unwrap()
}

#[test]
fn a_dirtying_guest_migrates_over_a_1gbit_2ms_link() {
    let test = "a_dirtying_guest_migrates_over_a_1gbit_2ms_link";
    let Some(_kvm) = common::kvm_or_skip(test) else {
        return;
    };
    let Some(link) = shaped_link_or_skip(test, GBIT, RTT) else {
        return;
    };
    let dir = scratch_dir("shaped-link");
    // 32 MiB working set rewritten at ~20 MB/s (20 pages per 1 ms beat).
    let mut src = vmm_on(
        &link,
        Side::A,
        &dir,
        "src",
        &[
            "run",
            "--memory",
            "256M",
            "--kernel",
            "builtin:testguest",
            "--cmdline",
            "ws=32 rate=5 hb=1000",
        ],
    );
    src.wait_api(T).unwrap();
    src.wait_ready(T).unwrap();
    src.wait_heartbeats(1500, T).unwrap();
    let listen = format!("tcp:{}:0", link.addr_b);
    let mut dst = vmm_on(
        &link,
        Side::B,
        &dir,
        "dst",
        &["receive", "--listen", &listen],
    );
    let ep = dst.listen_endpoint(T).unwrap();
    assert!(ep.starts_with(&format!("tcp:{}:", link.addr_b)), "{ep}");
    let before = link.qdisc_stats(Side::A).unwrap();
    let fwd_before = link.forwarded(Side::A);
    let report = migrate(&src, &ep, json!({"streams": 2})).unwrap();
    dst.wait_heartbeats(200, T).unwrap();
    common::assert_no_corruption(&src, &dst, test);
    let sent = report["bytes_sent"].as_u64().unwrap();
    assert!(sent > 24 << 20, "the working set was sent: {report}");
    let after = link.qdisc_stats(Side::A).unwrap();
    let fwd = link.forwarded(Side::A);
    assert!(
        after.bytes - before.bytes >= sent,
        "the migration's {sent} bytes went through the shaped qdisc: it carried {}",
        after.bytes - before.bytes
    );
    assert!(
        fwd.bytes - fwd_before.bytes >= sent,
        "the migration's {sent} bytes went through the delay line: it carried {}",
        fwd.bytes - fwd_before.bytes
    );
    eprintln!(
        "over 1 Gbit/s, 2 ms RTT: total {} ms, downtime {} ms, {} MB, {} rounds, qdisc drops {}",
        report["total_ms"],
        report["downtime_ms"],
        sent as f64 / 1e6,
        report["rounds"].as_array().map_or(0, |r| r.len()),
        after.drops
    );
    let _ = std::fs::remove_dir_all(&dir);
}
