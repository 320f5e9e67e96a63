//! `KvmVm` as a migration's destination calls the engine's `started`
//! (which sends `Resumed`) before it wakes any vCPU thread, so a vCPU the
//! host schedules first holds nothing up and need not give way.

mod common;
use common::{kvm_or_skip, Ignore};

use std::sync::Arc;

use livemig::vm::DestinationVm;
use livemig_kvm::{KvmVm, VmConfig};
use vm_memory::{Bytes, GuestAddress};

/// A VM whose (real-mode) guest spins on `jmp $` at 0x1000, its vCPU parked.
fn spinning_vm() -> KvmVm {
    let config = VmConfig {
        memory: 2 << 20,
        vcpus: 1,
        nics: vec![],
        dirty_mode: None,
    };
    let vm = KvmVm::create(&config, Arc::new(Ignore), vec![]).expect("create VM");
    vm.ram()
        .write_slice(&[0xEB, 0xFE], GuestAddress(0x1000))
        .unwrap();
    vm.with_vcpu(0, |fd| {
        let mut s = fd.get_sregs().unwrap();
        s.cs.base = 0;
        s.cs.selector = 0;
        fd.set_sregs(&s).unwrap();
        fd.set_regs(&kvm_bindings::kvm_regs {
            rip: 0x1000,
            rflags: 0x2,
            ..Default::default()
        })
        .unwrap();
    })
    .unwrap();
    vm
}

#[test]
fn started_runs_before_the_vcpus_are_woken() {
    let Some(_g) = kvm_or_skip("started_runs_before_the_vcpus_are_woken") else {
        return;
    };
    let mut vm = spinning_vm();
    let gate = vm.vcpus().gate().clone();
    assert!(!gate.is_running(), "a new VM's vCPUs start parked");
    let mut seen = Vec::new();
    vm.resume_then(&mut || seen.push(gate.is_running()))
        .expect("resume");
    assert_eq!(
        seen,
        vec![false],
        "started once, with every vCPU still parked"
    );
    assert!(gate.is_running(), "running after resume_then");
    assert!(vm.vcpus().fatal().is_none());
}
