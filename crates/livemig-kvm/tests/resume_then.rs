//! `KvmVm` as a migration's destination calls the engine's `started`
//! (which sends `Resumed`) before it wakes any vCPU thread, so a vCPU the
//! host schedules first holds nothing up and need not give way.

mod common;
use common::{kvm_or_skip, spinning_vm};

use livemig::vm::DestinationVm;

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
