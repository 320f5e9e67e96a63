//! Shared helpers of the end-to-end tests.
#![allow(dead_code)]

pub mod netns;
pub mod proxy;

use std::sync::{Mutex, MutexGuard};

/// KVM tests in one binary run one at a time: each VM spins a host core and
/// this machine has two.
static KVM_LOCK: Mutex<()> = Mutex::new(());

/// Returns the lock guard if `/dev/kvm` is usable; otherwise says so loudly
/// and returns None (the test then skips). With `LIVEMIG_REQUIRE_KVM=1`
/// (set in CI) a missing `/dev/kvm` fails the test instead.
pub fn kvm_or_skip(test: &str) -> Option<MutexGuard<'static, ()>> {
    if !livemig_kvm::kvm_available() {
        if std::env::var_os("LIVEMIG_REQUIRE_KVM").is_some() {
            panic!("{test}: /dev/kvm is not available but LIVEMIG_REQUIRE_KVM is set");
        }
        eprintln!("\n*** SKIPPED {test}: /dev/kvm is not available on this machine ***\n");
        return None;
    }
    Some(KVM_LOCK.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Neither side of a migration saw a wrong byte, and the guest did not
/// start over on the destination.
pub fn assert_no_corruption(
    src: &livemig_suite::harness::Vmm,
    dst: &livemig_suite::harness::Vmm,
    what: &str,
) {
    let s = livemig_suite::harness::log_of(src);
    let d = livemig_suite::harness::log_of(dst);
    assert!(
        s.corrupt.is_empty(),
        "{what}: source CORRUPT {:?}",
        s.corrupt
    );
    assert!(
        d.corrupt.is_empty(),
        "{what}: {} pages CORRUPT on the destination, first {:?}",
        d.corrupt.len(),
        &d.corrupt[..d.corrupt.len().min(5)]
    );
    assert!(!d.ready, "{what}: the destination guest rebooted (READY)");
}
