//! The test guest's `net=` token without a usable NIC: a malformed token or
//! an address where no virtio-mmio device answers is reported
//! (`ERROR net ...`) and the guest carries on without a network: heartbeats,
//! memory self-check and console as always, `rx=0 tx=0`.

mod common;

use std::time::Duration;

use livemig_suite::harness::{log_of, scratch_dir, start_source};

const T: Duration = Duration::from_secs(30);

#[test]
fn bad_net_tokens_are_reported_and_the_guest_runs_on() {
    let Some(_kvm) = common::kvm_or_skip("bad_net_tokens_are_reported_and_the_guest_runs_on")
    else {
        return;
    };
    let dir = scratch_dir("guest-net");
    for (token, want) in [
        // No device there: refvmm's bus reads unclaimed MMIO as all ones.
        (
            "net=mmio:0xd0000000:5,ip=10.9.0.2",
            "ERROR net no virtio-mmio device (bad magic)",
        ),
        (
            "net=mmio:3489660928:5,ip=10.9.0.2",
            "ERROR net no virtio-mmio device (bad magic)",
        ),
        ("net=mmio:0xd0000000:5,ip=10.9.0.256", "ERROR net bad token"),
        ("net=mmio:0xd0000000:5,ip=10.9.0", "ERROR net bad token"),
        ("net=mmio:0xd0000002:5,ip=10.9.0.2", "ERROR net bad token"),
        ("net=mmio:0x1000:5,ip=10.9.0.2", "ERROR net bad token"),
        ("net=mmio:0x200000000:5,ip=10.9.0.2", "ERROR net bad token"),
        ("net=mmio::5,ip=10.9.0.2", "ERROR net bad token"),
        ("net=pci:0:5,ip=10.9.0.2", "ERROR net bad token"),
        ("net=mmio:0xd0000000:5,ip=10.9.0.2x", "ERROR net bad token"),
    ] {
        let mut v = start_source(&dir, "g", "64M", 1, &format!("ws=8 rate=5 {token}")).unwrap();
        v.wait_ready(T).unwrap();
        v.wait_heartbeats(30, T).unwrap();
        let st = v.query_status(T).unwrap();
        let g = log_of(&v);
        assert!(
            g.other.iter().any(|l| l.starts_with(want)),
            "{token}: want '{want}', guest said {:?}",
            g.other
        );
        assert!(!g.other.iter().any(|l| l.starts_with("NET up")), "{token}");
        assert!(g.corrupt.is_empty(), "{token}: {:?}", g.corrupt);
        assert!(
            st.heartbeats >= 30 && st.pages_written > 0 && (st.rx, st.tx) == (0, 0),
            "{token}: {st:?}"
        );
        drop(g);
        drop(v);
    }
    let _ = std::fs::remove_dir_all(dir);
}
