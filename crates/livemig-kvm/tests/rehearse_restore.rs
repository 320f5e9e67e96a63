//! `KvmVm`'s `DestinationVm::rehearse_restore`: it times a save and a restore of the
//! VM's own state and leaves the VM as it found it — the vCPUs' registers
//! unchanged and the guest running from where it would have started.

mod common;
use common::{kvm_or_skip, Ignore};

use std::sync::Arc;
use std::time::{Duration, Instant};

use livemig::vm::DestinationVm;
use livemig_kvm::{KvmVm, VmConfig};
use vm_memory::{Bytes, GuestAddress};

/// Where the guest counts.
const COUNTER: u64 = 0x2000;

/// Two vCPUs; vCPU 0's real-mode guest at 0x1000 increments the byte at
/// [`COUNTER`] forever, with `rbx` set to a marker.
fn counting_vm() -> KvmVm {
    let config = VmConfig {
        memory: 2 << 20,
        vcpus: 2,
        nics: vec![],
        dirty_mode: None,
    };
    let vm = KvmVm::create(&config, Arc::new(Ignore), vec![]).expect("create VM");
    // inc byte [0x2000]; jmp back to the inc
    vm.ram()
        .write_slice(&[0xFE, 0x06, 0x00, 0x20, 0xEB, 0xFA], GuestAddress(0x1000))
        .unwrap();
    vm.with_vcpu(0, |fd| {
        let mut s = fd.get_sregs().unwrap();
        s.cs.base = 0;
        s.cs.selector = 0;
        s.ds.base = 0;
        s.ds.selector = 0;
        fd.set_sregs(&s).unwrap();
        fd.set_regs(&kvm_bindings::kvm_regs {
            rip: 0x1000,
            rbx: 0x5EED,
            rflags: 0x2,
            ..Default::default()
        })
        .unwrap();
    })
    .unwrap();
    vm
}

fn regs(vm: &KvmVm, i: usize) -> (kvm_bindings::kvm_regs, kvm_bindings::kvm_sregs) {
    vm.with_vcpu(i, |fd| (fd.get_regs().unwrap(), fd.get_sregs().unwrap()))
        .unwrap()
}

#[test]
fn a_rehearsed_restore_is_timed_and_changes_nothing() {
    let Some(_g) = kvm_or_skip("a_rehearsed_restore_is_timed_and_changes_nothing") else {
        return;
    };
    let mut vm = counting_vm();
    let before: Vec<_> = (0..2).map(|i| regs(&vm, i)).collect();
    let t = Instant::now();
    let cost = vm
        .rehearse_restore()
        .expect("rehearsal")
        .expect("KvmVm measures its save and restore");
    assert!(cost.save > Duration::ZERO, "{cost:?}");
    assert!(cost.restore > Duration::ZERO, "{cost:?}");
    assert!(cost.save + cost.restore <= t.elapsed(), "{cost:?}");
    for (i, (r, s)) in before.iter().enumerate() {
        let (r2, s2) = regs(&vm, i);
        assert_eq!(
            (r.rip, r.rbx, r.rflags, r.rsp),
            (r2.rip, r2.rbx, r2.rflags, r2.rsp),
            "vCPU {i}"
        );
        assert_eq!(
            (s.cs.base, s.cs.selector, s.cr0, s.cr3, s.cr4, s.efer),
            (s2.cs.base, s2.cs.selector, s2.cr0, s2.cr3, s2.cr4, s2.efer),
            "vCPU {i}"
        );
    }
    assert_eq!(vm.ram().read_obj::<u8>(GuestAddress(COUNTER)).unwrap(), 0);
    // The guest still starts where it was set up to and counts.
    DestinationVm::resume(&mut vm).expect("resume");
    let deadline = Instant::now() + Duration::from_secs(5);
    while vm.ram().read_obj::<u8>(GuestAddress(COUNTER)).unwrap() == 0 {
        assert!(Instant::now() < deadline, "the guest never counted");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(vm.vcpus().fatal().is_none());
}
