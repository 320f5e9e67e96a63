//! What every KVM test of this crate shares.

use std::sync::Mutex;

/// True if `/dev/kvm` is there; otherwise says loudly that `test` is
/// skipped, or panics where `LIVEMIG_REQUIRE_KVM` is set (CI).
pub fn kvm_or_skip(test: &str) -> bool {
    if livemig_kvm::kvm_available() {
        return true;
    }
    if std::env::var_os("LIVEMIG_REQUIRE_KVM").is_some() {
        panic!("{test}: /dev/kvm is not available but LIVEMIG_REQUIRE_KVM is set");
    }
    eprintln!("\n*** SKIPPED {test}: /dev/kvm is not available on this machine ***\n");
    false
}

/// One VM per test at a time: each spins a host core.
pub static KVM_LOCK: Mutex<()> = Mutex::new(());
