//! Pure post-copy of a real KVM guest into userfaultfd-armed memory: the
//! destination vCPU starts with every page missing (its code page too), its
//! `KVM_RUN` blocks on each until the engine installs it (by request or
//! push), and the values it reads from two data pages and writes to I/O
//! ports are checked: never a zero, never anything but the source's bytes.
// The free post-copy reception functions (deprecated wrappers of
// `Reception::postcopy`) stay tested here for the release that keeps them.
#![allow(deprecated)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livemig::destination::postcopy::{receive_postcopy, PostcopyMemory};
use livemig::memory::MemoryLayout;
use livemig::source::postcopy::{migrate_postcopy, PostcopyConfig};
use livemig::transport::mem;
use livemig::vm::{DestinationVm, SourceVm, VmError};
use livemig::{CancelToken, MigrationConfig, ReceiveConfig};
use livemig_kvm::{ExitHandler, KvmVm, VmConfig};
use livemig_uffd::{HostRegion, UffdPager};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

// Near the end of the 4 MiB (the push starts at the beginning), reached
// from real mode through segment bases set directly ("unreal" mode).
const CODE: u64 = 0x3E_0000;
const DATA_BASE: u64 = 0x3F_0000;
const DATA_A: u64 = DATA_BASE + 0x8000;
const DATA_B: u64 = DATA_BASE + 0x9000;
const VALUE_A: u16 = 0x1234;
const VALUE_B: u16 = 0x5678;

/// Records every 16-bit `out` to ports 0x80 and 0x82.
#[derive(Default)]
struct Ports(Mutex<Vec<(u16, u16)>>);

impl ExitHandler for Ports {
    fn pio_read(&self, _: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        if data.len() == 2 {
            let v = u16::from_le_bytes([data[0], data[1]]);
            self.0.lock().unwrap().push((port, v));
        }
    }
    fn mmio_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, _: u64, _: &[u8]) {}
}

fn config() -> VmConfig {
    VmConfig {
        memory: 4 << 20,
        vcpus: 1,
        nics: vec![],
        dirty_mode: None,
    }
}

/// A real-mode guest at `CODE`: forever `out 0x80, ds:[0x8000]; out 0x82,
/// ds:[0x9000]` with DS based at `DATA_BASE`.
fn source(ports: Arc<Ports>) -> KvmVm {
    let vm = KvmVm::create(&config(), ports, vec![]).expect("create VM");
    let mem = vm.ram();
    // Every page holds data (zero pages travel as 24-byte markers, which
    // the bandwidth cap would hardly slow down).
    let filler = vec![0xA5u8; 4 << 20];
    mem.write_slice(&filler, GuestAddress(0)).unwrap();
    // mov ax,[0x8000]; out 0x80,ax; mov ax,[0x9000]; out 0x82,ax; jmp -12
    let code = [
        0xA1, 0x00, 0x80, 0xE7, 0x80, 0xA1, 0x00, 0x90, 0xE7, 0x82, 0xEB, 0xF4,
    ];
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    mem.write_slice(&VALUE_A.to_le_bytes(), GuestAddress(DATA_A))
        .unwrap();
    mem.write_slice(&VALUE_B.to_le_bytes(), GuestAddress(DATA_B))
        .unwrap();
    vm.with_vcpu(0, |fd| {
        let mut s = fd.get_sregs().unwrap();
        s.cs.base = CODE;
        s.cs.selector = (CODE >> 4) as u16;
        s.ds.base = DATA_BASE;
        s.ds.selector = (DATA_BASE >> 4) as u16;
        fd.set_sregs(&s).unwrap();
        fd.set_regs(&kvm_bindings::kvm_regs {
            rip: 0,
            rflags: 0x2,
            ..Default::default()
        })
        .unwrap();
    })
    .unwrap();
    vm
}

fn uffd_pager(vm: &KvmVm, layout: &MemoryLayout) -> Result<Box<dyn PostcopyMemory>, VmError> {
    let mem = vm.ram();
    let regions = layout
        .regions()
        .iter()
        .map(|r| HostRegion {
            addr: mem.get_host_address(GuestAddress(r.guest_addr)).unwrap() as usize,
            pages: r.pages(),
        })
        .collect();
    // SAFETY: KvmVm's default memory is private anonymous and lives as long
    // as the VM, which outlives the pager (receive_postcopy drops it first).
    let pager = unsafe { UffdPager::new(regions) }.map_err(|e| VmError::Create(e.to_string()))?;
    Ok(Box::new(pager))
}

#[test]
fn pure_postcopy_of_a_kvm_guest_into_userfaultfd_memory() {
    if !livemig_kvm::kvm_available() {
        assert!(
            std::env::var_os("LIVEMIG_REQUIRE_KVM").is_none(),
            "/dev/kvm is not available but LIVEMIG_REQUIRE_KVM is set"
        );
        eprintln!("SKIPPED: /dev/kvm is not available");
        return;
    }
    let src_ports = Arc::new(Ports::default());
    let src = source(src_ports.clone());
    src.resume().unwrap();
    // The guest runs on the source first.
    let t = Instant::now();
    while src_ports.0.lock().unwrap().len() < 4 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the guest does not run"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let (a, b) = mem::pair();
    let (fa, fb) = mem::pair();
    let dst_ports = Arc::new(Ports::default());
    let dp = dst_ports.clone();
    let dest = std::thread::spawn(move || {
        receive_postcopy(
            Box::new(b),
            Box::new(fb),
            &ReceiveConfig::default(),
            move |_desc| {
                KvmVm::create(&config(), dp, vec![]).map_err(|e| VmError::Create(e.to_string()))
            },
            uffd_pager,
        )
    });
    let pc = PostcopyConfig {
        after_rounds: 0,
        on_non_convergence: false,
        ..Default::default()
    };
    // The push is capped at 8 MiB/s, so the guest's pages near the end of
    // memory come late and its faults are served by requests (in practice:
    // not asserted, that would assert timing; the counts are printed).
    let config = MigrationConfig {
        max_bandwidth: Some(8 << 20),
        ..Default::default()
    };
    let report = migrate_postcopy(
        &src,
        Box::new(a),
        Box::new(fa),
        &pc,
        &config,
        &CancelToken::new(),
        &mut |_| {},
    )
    .expect("source");
    let (dst, received) = dest.join().unwrap().expect("destination");
    assert!(received.running);
    // The guest goes on on the destination.
    let t = Instant::now();
    while dst_ports.0.lock().unwrap().len() < 100 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the guest does not run here"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = DestinationVm::memory(&dst);
    let seen = dst_ports.0.lock().unwrap().clone();
    for (port, v) in &seen {
        let want = if *port == 0x80 { VALUE_A } else { VALUE_B };
        assert_eq!(*v, want, "port {port:#x}: the guest read {v:#x}");
    }
    let st = received.postcopy.expect("post-copy stats");
    assert_eq!(st.requested_pages + st.pushed_pages, st.discard_pages);
    eprintln!(
        "KVM post-copy of 4 MiB: {} faults (median {} us, p99 {} us, max {} us), blocked {:.2} ms, \
         switch to last page {:.1} ms, downtime {:.2} ms; source {:?}",
        st.faults,
        st.fault_latency.median_us,
        st.fault_latency.p99_us,
        st.fault_latency.max_us,
        st.blocked_ms,
        st.switch_to_last_page_ms,
        report.downtime_ms,
        report.postcopy
    );
}
