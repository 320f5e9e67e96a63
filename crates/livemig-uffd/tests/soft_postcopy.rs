//! A whole post-copy migration into memory registered with userfaultfd:
//! the software VM as source (writers running), a software VM as
//! destination whose private anonymous memory is armed by `UffdPager`, and
//! a destination "vCPU" thread that reads missing pages through plain
//! loads (blocking in the kernel) while the rest is pushed. Every byte is
//! compared with the paused source.
// The free post-copy reception functions (deprecated wrappers of
// `Reception::postcopy`) stay tested here for the release that keeps them.
#![allow(deprecated)]

use std::sync::{Arc, Mutex};

use livemig::destination::postcopy::{receive_postcopy, PostcopyMemory};
use livemig::memory::{GuestMemory, MemoryLayout, RegionDesc, PAGE_SIZE};
use livemig::source::postcopy::{migrate_postcopy, PostcopyConfig};
use livemig::state::Section;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::mem;
use livemig::vm::{DestinationVm, VmError};
use livemig::{CancelToken, MigrationConfig, ReceiveConfig};
use livemig_uffd::{HostRegion, UffdPager};
use vm_memory::{GuestAddress, GuestMemoryBackend};

const MIB: u64 = 16;
/// Pages the "vCPU" reads, spread over memory from the end backwards (the
/// push starts at the beginning).
const READS: u64 = 64;

fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: MIB << 20,
    }])
    .unwrap()
}

/// The pages the "vCPU" read: (page, contents).
type Reads = Vec<(u64, Vec<u8>)>;

struct Dest {
    vm: SoftVm,
    reader: Option<std::thread::JoinHandle<Reads>>,
}

impl DestinationVm for Dest {
    fn memory(&self) -> &dyn GuestMemory {
        DestinationVm::memory(&self.vm)
    }
    fn restore_state(&mut self, sections: &[Section]) -> Result<(), VmError> {
        self.vm.restore_state(sections)
    }
    fn resume(&mut self) -> Result<(), VmError> {
        let base = self
            .vm
            .ram()
            .ok_or_else(|| VmError::Resume("not vm-memory".into()))?
            .get_host_address(GuestAddress(0))
            .map_err(|e| VmError::Resume(e.to_string()))? as usize;
        self.reader = Some(std::thread::spawn(move || {
            let pages = (MIB << 20) / PAGE_SIZE;
            let stride = pages / READS;
            (0..READS)
                .map(|i| {
                    let page = pages - 1 - i * stride;
                    let p = (base + (page * PAGE_SIZE) as usize) as *const u8;
                    // SAFETY: inside the VM's mapping, which the test keeps
                    // until the reader is joined; a missing page blocks in
                    // the kernel until the engine installs it.
                    let v = (0..PAGE_SIZE as usize)
                        .map(|o| unsafe { std::ptr::read_volatile(p.add(o)) })
                        .collect();
                    (page, v)
                })
                .collect()
        }));
        self.vm.resume()
    }
}

#[test]
fn pure_postcopy_into_userfaultfd_memory() {
    postcopy_into_userfaultfd_memory(0);
}

/// Round 0 first, received into fresh memory by the destination's own
/// fill (`Reception::fresh_fill`, a userfaultfd of its own over the same
/// memory): the fill is released before the installer arms (a range has
/// one userfaultfd at a time; arming would fail with `EBUSY`), and the
/// pages it installed stay.
#[test]
fn postcopy_after_a_round_filled_by_userfaultfd() {
    if let Some(report) = postcopy_into_userfaultfd_memory(1) {
        assert!(report.filled_pages > 0, "round 0 went through the fill");
    }
}

/// A post-copy migration after `after_rounds` rounds, checked byte for
/// byte; `None` where userfaultfd is unavailable.
fn postcopy_into_userfaultfd_memory(after_rounds: u32) -> Option<livemig::ReceiveReport> {
    // SAFETY: a plain syscall, closed at once.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if fd < 0 {
        assert!(
            std::env::var_os("LIVEMIG_REQUIRE_KVM").is_none(),
            "no userfaultfd"
        );
        eprintln!("SKIPPED: userfaultfd unavailable");
        return None;
    }
    // SAFETY: the fd we got.
    unsafe { libc::close(fd as i32) };

    let src = SoftVm::new(&layout(), &SoftConfig::default()).unwrap();
    src.fill(11);
    src.start();
    let (a, b) = mem::pair();
    let (fa, fb) = mem::pair();
    let armed: Arc<Mutex<bool>> = Arc::default();
    let armed2 = armed.clone();
    let dest = std::thread::spawn(move || {
        receive_postcopy(
            Box::new(b),
            Box::new(fb),
            &ReceiveConfig::default(),
            |desc| {
                Ok(Dest {
                    vm: SoftVm::new(&desc.layout, &SoftConfig::idle())?,
                    reader: None,
                })
            },
            move |vm: &Dest, layout: &MemoryLayout| {
                let mem = vm.vm.ram().expect("vm-memory");
                let regions = layout
                    .regions()
                    .iter()
                    .map(|r| HostRegion {
                        addr: mem.get_host_address(GuestAddress(r.guest_addr)).unwrap() as usize,
                        pages: r.pages(),
                    })
                    .collect();
                // SAFETY: the soft VM's memory is private anonymous and
                // lives as long as the VM, which outlives the pager
                // (receive_postcopy drops the pager before returning).
                let pager = unsafe { UffdPager::new(regions) }
                    .map_err(|e| VmError::Create(e.to_string()))?;
                *armed2.lock().unwrap() = true;
                Ok(Box::new(pager) as Box<dyn PostcopyMemory>)
            },
        )
    });
    let pc = PostcopyConfig {
        after_rounds,
        on_non_convergence: false,
        ..Default::default()
    };
    let report = migrate_postcopy(
        &src,
        Box::new(a),
        Box::new(fa),
        &pc,
        &MigrationConfig {
            // Never converged: the switch comes after `after_rounds`.
            downtime_limit: std::time::Duration::from_nanos(1),
            ..MigrationConfig::default()
        },
        &CancelToken::new(),
        &mut |_| {},
    )
    .expect("source");
    let (mut dest, received) = dest.join().unwrap().expect("destination");
    assert!(*armed.lock().unwrap());
    let want = src.snapshot();
    let reads = dest.reader.take().unwrap().join().unwrap();
    for (page, got) in &reads {
        let at = (page * PAGE_SIZE) as usize;
        assert!(
            got[..] == want[at..at + PAGE_SIZE as usize],
            "page {page} differs"
        );
    }
    dest.vm.stop();
    assert!(dest.vm.snapshot() == want, "destination memory differs");
    let st = received.postcopy.clone().expect("post-copy stats");
    assert_eq!(st.requested_pages + st.pushed_pages, st.discard_pages);
    eprintln!(
        "userfaultfd post-copy of {MIB} MiB: {} faults, latency median {} us, p99 {} us, max {} us, \
         blocked {:.2} ms, switch to last page {:.1} ms; source {:?}",
        st.faults,
        st.fault_latency.median_us,
        st.fault_latency.p99_us,
        st.fault_latency.max_us,
        st.blocked_ms,
        st.switch_to_last_page_ms,
        report.postcopy
    );
    Some(received)
}
