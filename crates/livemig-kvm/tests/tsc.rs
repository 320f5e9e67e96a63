//! The guest's TSC frequency travels in the VM description and a
//! destination that cannot give the guest that rate refuses the migration in
//! the handshake, before any page (issue 13, item 6).
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

mod common;
use common::{kvm_or_skip, spinning_vm, Ignore};

use std::sync::{Arc, Mutex};

use livemig::testing::hooked::HookedVm;
use livemig::vm::SourceVm;
use livemig::Phase;
use livemig_kvm::{check_properties, KvmVm, VmConfig, TSC_KHZ_PROPERTY};

fn config() -> VmConfig {
    VmConfig {
        memory: 2 << 20,
        vcpus: 1,
        nics: vec![],
        dirty_mode: None,
    }
}

fn vm() -> KvmVm {
    KvmVm::create(&config(), Arc::new(Ignore), vec![]).expect("create VM")
}

/// A source VM on a host with another TSC rate: `KvmVm` with its
/// description's TSC frequency replaced by `tsc_khz`.
fn other_host(vm: KvmVm, tsc_khz: u32) -> HookedVm<'static, KvmVm> {
    HookedVm::new(vm).on_describe(move |vm| {
        let mut d = vm.describe()?;
        d.properties
            .insert(TSC_KHZ_PROPERTY.to_string(), tsc_khz.to_string());
        Ok(d)
    })
}

#[test]
fn the_description_carries_the_tsc_frequency() {
    let Some(_g) = kvm_or_skip("the_description_carries_the_tsc_frequency") else {
        return;
    };
    let vm = spinning_vm();
    let khz = vm.tsc_khz().expect("KVM_GET_TSC_KHZ");
    let d = vm.describe().unwrap();
    assert_eq!(d.properties.get(TSC_KHZ_PROPERTY), Some(&khz.to_string()));
    // Answered while the vCPU runs (its fd is busy inside KVM_RUN).
    vm.resume_vcpus();
    assert_eq!(vm.tsc_khz().unwrap(), khz);
    check_properties(&vm.describe().unwrap()).expect("same host");
    assert!(vm.vcpus().fatal().is_none());
}

#[test]
fn a_destination_with_another_tsc_rate_refuses_in_the_handshake() {
    let Some(_g) = kvm_or_skip("a_destination_with_another_tsc_rate_refuses_in_the_handshake")
    else {
        return;
    };
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    if kvm.check_extension(kvm_ioctls::Cap::TscControl) {
        eprintln!("*** SKIPPED: this host's KVM can scale the TSC, so nothing is refused ***");
        return;
    }
    let source = other_host(spinning_vm(), 1_000_000);
    source.vm().resume_vcpus();
    let host = source.vm().tsc_khz().unwrap();
    let created = Arc::new(Mutex::new(false));
    let created2 = created.clone();
    let (to_dest, from_source) = livemig::transport::mem::pair();
    let dest = std::thread::spawn(move || {
        livemig::receive(
            Box::new(from_source),
            &livemig::ReceiveConfig::default(),
            move |desc| {
                check_properties(desc)?;
                *created2.lock().unwrap() = true;
                Ok(vm())
            },
        )
        .map(|_| ())
    });
    let err = livemig::migrate(
        &source,
        Box::new(to_dest),
        &livemig::MigrationConfig::default(),
        &livemig::CancelToken::new(),
        &mut |_| {},
    )
    .expect_err("a destination with another TSC rate must refuse");
    let dest_err = dest.join().unwrap().expect_err("the destination refused");
    assert_eq!(err.phase, Phase::Handshake, "{err}");
    let msg = err.to_string();
    eprintln!("refused: {msg}");
    for want in [
        "TSC frequency differs".to_string(),
        "source 1000000 kHz".to_string(),
        format!("destination {host} kHz"),
    ] {
        assert!(msg.contains(&want), "{want:?} missing from: {msg}");
    }
    assert!(
        dest_err.to_string().contains("TSC frequency differs"),
        "{dest_err}"
    );
    assert!(!*created.lock().unwrap(), "no destination VM was built");
    assert!(!source.vm().is_paused(), "the source runs on");
    assert!(source.vm().vcpus().fatal().is_none());
}

#[test]
fn adopt_tsc_khz_accepts_the_same_rate_and_refuses_another() {
    let Some(_g) = kvm_or_skip("adopt_tsc_khz_accepts_the_same_rate_and_refuses_another") else {
        return;
    };
    let source = vm();
    let dest = vm();
    let mut d = source.describe().unwrap();
    assert_eq!(
        dest.adopt_tsc_khz(&d).unwrap(),
        livemig_kvm::TscPlan::Matches
    );
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    if kvm.check_extension(kvm_ioctls::Cap::TscControl) {
        return;
    }
    d.properties
        .insert(TSC_KHZ_PROPERTY.to_string(), "1000000".to_string());
    let e = dest.adopt_tsc_khz(&d).unwrap_err();
    assert!(e.to_string().contains("source 1000000 kHz"), "{e}");
}
