//! refvmm migrations over mutual TLS: accepted with certificates from the
//! configured CA, refused (and the source keeps running) with a stranger's.

mod common;

#[path = "../crates/livemig-tls/tests/common/mod.rs"]
mod pki;

use std::time::{Duration, Instant};

use livemig_suite::harness::{log_of, migrate, scratch_dir, start_source, Vmm};
use serde_json::json;

fn receiver(dir: &std::path::Path, name: &str, cfg: &livemig_tls::TlsConfig) -> (Vmm, String) {
    let api = dir.join(format!("{name}.sock"));
    let args: Vec<String> = [
        "receive",
        "--listen",
        "tcp:127.0.0.1:0",
        "--api-socket",
        &api.to_string_lossy(),
        "--tls-cert",
        &cfg.cert_chain.to_string_lossy(),
        "--tls-key",
        &cfg.key.to_string_lossy(),
        "--tls-ca",
        &cfg.ca.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut v = Vmm::spawn(name, &args, api).unwrap();
    let ep = v.listen_endpoint(Duration::from_secs(20)).unwrap();
    (v, ep)
}

fn tls_json(cfg: &livemig_tls::TlsConfig) -> serde_json::Value {
    json!({"cert": cfg.cert_chain, "key": cfg.key, "ca": cfg.ca})
}

#[test]
fn migrate_over_mutual_tls_and_refuse_a_stranger() {
    let Some(_kvm) = common::kvm_or_skip("migrate_over_mutual_tls_and_refuse_a_stranger") else {
        return;
    };
    let dir = scratch_dir("tls");
    let ours = pki::Pki::new("refvmm-ours");
    let theirs = pki::Pki::new("refvmm-theirs");
    let mut src = start_source(&dir, "src", "128M", 1, "ws=16 rate=10").unwrap();
    src.wait_ready(Duration::from_secs(30)).unwrap();
    let (mut dst, ep) = receiver(&dir, "dst", &ours.host("dst"));

    // A source whose certificate comes from another CA is refused; the
    // destination keeps waiting and the source keeps running.
    let err = migrate(
        &src,
        &ep,
        json!({"tls": tls_json(&theirs.host("intruder"))}),
    )
    .unwrap_err();
    let msg = err["error"].as_str().unwrap_or("").to_string();
    assert!(msg.contains("TLS") || msg.contains("certificate"), "{err}");
    src.wait_heartbeats(200, Duration::from_secs(10)).unwrap();
    assert!(
        dst.is_running(),
        "the destination gave up after refusing a stranger"
    );

    // The real source gets through.
    let t0 = Instant::now();
    let report = migrate(&src, &ep, json!({"tls": tls_json(&ours.host("src"))})).unwrap();
    assert_eq!(report["status"], "completed");
    dst.wait_for("a T line", Duration::from_secs(30), |g| {
        !g.tlines.is_empty()
    })
    .unwrap();
    assert!(log_of(&dst).corrupt.is_empty());
    assert!(
        dst.wait_stderr("refused a connection", Duration::from_secs(5)),
        "{}",
        dst.stderr()
    );
    eprintln!("tls: migrated in {:?}", t0.elapsed());
}
