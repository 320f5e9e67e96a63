//! What every KVM test of this crate shares.

use std::sync::{Mutex, MutexGuard};

/// One VM per test at a time: each spins a host core.
static KVM_LOCK: Mutex<()> = Mutex::new(());

/// The KVM lock's guard if `/dev/kvm` is there; otherwise says loudly that
/// `test` is skipped and returns `None`, or panics where
/// `LIVEMIG_REQUIRE_KVM` is set (CI).
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

/// An exit handler for guests that do no I/O that matters: port and MMIO
/// reads see all ones, writes are dropped.
// Not every test file that includes this module runs a guest.
#[allow(dead_code)]
pub struct Ignore;

impl livemig_kvm::ExitHandler for Ignore {
    fn pio_read(&self, _: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&self, _: u16, _: &[u8]) {}
    fn mmio_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, _: u64, _: &[u8]) {}
}

/// A 2 MiB, 1-vCPU VM whose (real-mode) guest spins on `jmp $` at 0x1000,
/// its vCPU parked (not yet resumed).
#[allow(dead_code)]
pub fn spinning_vm() -> livemig_kvm::KvmVm {
    use vm_memory::{Bytes, GuestAddress};
    let config = livemig_kvm::VmConfig {
        memory: 2 << 20,
        vcpus: 1,
        nics: vec![],
        dirty_mode: None,
    };
    let vm = livemig_kvm::KvmVm::create(&config, std::sync::Arc::new(Ignore), vec![])
        .expect("create VM");
    vm.ram()
        .write_slice(&[0xEB, 0xFE], GuestAddress(0x1000))
        .expect("guest code");
    vm.with_vcpu(0, |fd| {
        let mut s = fd.get_sregs().expect("sregs");
        s.cs.base = 0;
        s.cs.selector = 0;
        fd.set_sregs(&s).expect("set sregs");
        fd.set_regs(&kvm_bindings::kvm_regs {
            rip: 0x1000,
            rflags: 0x2,
            ..Default::default()
        })
        .expect("set regs");
    })
    .expect("vCPU 0");
    vm
}
