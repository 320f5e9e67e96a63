//! Post-copy end to end on the software VM (docs/postcopy.md): the
//! destination runs from the state, a "vCPU" reading a missing page blocks
//! until the page it requested is installed, the rest is pushed, and every
//! byte is checked against the paused source.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use livemig::destination::postcopy::{receive_postcopy, PostcopyMemory};
use livemig::memory::{GuestRam, MemoryLayout, RegionDesc, PAGE_SIZE};
use livemig::source::postcopy::{migrate_postcopy, PostcopyConfig};
use livemig::state::Section;
use livemig::testing::postcopy::SoftPager;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::mem;
use livemig::vm::{DestinationVm, SourceVm, VmError};
use livemig::{CancelToken, MigrationConfig, ReceiveConfig, ReceiveReport, Report};

fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![
        RegionDesc {
            guest_addr: 0,
            size: 8 << 20,
        },
        RegionDesc {
            guest_addr: 4 << 30,
            size: 1 << 20,
        },
    ])
    .unwrap()
}

type Slot = Arc<Mutex<Option<Arc<SoftPager>>>>;

/// The destination VM: a soft VM whose `resume` first lets a "vCPU" touch
/// the last page of region 0 and returns only once that fault was taken by
/// the page server (so at least one page is requested, whatever the
/// timing: nothing is installed before `Resumed`).
struct Dest {
    vm: SoftVm,
    slot: Slot,
    reader: Option<std::thread::JoinHandle<Option<Vec<u8>>>>,
    /// The page the "vCPU" read (region, page).
    read: (usize, u64),
}

impl DestinationVm for Dest {
    fn memory(&self) -> &GuestRam {
        DestinationVm::memory(&self.vm)
    }
    fn restore_state(&mut self, sections: &[Section]) -> Result<(), VmError> {
        self.vm.restore_state(sections)
    }
    fn resume(&mut self) -> Result<(), VmError> {
        let pager = self.slot.lock().unwrap().clone().expect("armed before Go");
        let (region, page) = pager.last_missing().expect("a page to come");
        self.read = (region, page);
        let p = pager.clone();
        self.reader = Some(std::thread::spawn(move || {
            p.read(region, page, Duration::from_secs(30))
        }));
        while pager.faulted_reads() == 0 || pager.pending_faults() > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.vm.resume()
    }
}

fn pager_into(
    slot: Slot,
) -> impl FnOnce(&Dest, &MemoryLayout) -> Result<Box<dyn PostcopyMemory>, VmError> {
    move |vm, layout| {
        let p = SoftPager::new(DestinationVm::memory(&vm.vm), layout);
        *slot.lock().unwrap() = Some(p.clone());
        Ok(Box::new(p))
    }
}

struct Outcome {
    report: Report,
    received: ReceiveReport,
    dest: Dest,
}

fn migrate(src: &SoftVm, pc: PostcopyConfig, config: &MigrationConfig) -> Outcome {
    let (a, b) = mem::pair();
    let (fa, fb) = mem::pair();
    let slot: Slot = Arc::default();
    let pager = pager_into(slot.clone());
    let dest = std::thread::spawn(move || {
        receive_postcopy(
            Box::new(b),
            Box::new(fb),
            &ReceiveConfig::default(),
            |desc| {
                Ok(Dest {
                    vm: SoftVm::new(&desc.layout, &SoftConfig::idle())?,
                    slot,
                    reader: None,
                    read: (0, 0),
                })
            },
            pager,
        )
    });
    let report = migrate_postcopy(
        src,
        Box::new(a),
        Box::new(fa),
        &pc,
        config,
        &CancelToken::new(),
        &mut |_| {},
    )
    .expect("source");
    let (dest, received) = dest.join().unwrap().expect("destination");
    Outcome {
        report,
        received,
        dest,
    }
}

/// Every byte on the destination is the paused source's, including the
/// page the "vCPU" read while it was missing.
fn check(src: &SoftVm, mut o: Outcome) {
    o.dest.vm.stop();
    let want = src.snapshot();
    assert!(o.dest.vm.snapshot() == want, "destination memory differs");
    let read = o.dest.reader.take().unwrap().join().unwrap();
    let (region, page) = o.dest.read;
    let at = (layout().regions()[..region]
        .iter()
        .map(|r| r.size)
        .sum::<u64>()
        + page * PAGE_SIZE) as usize;
    let got = read.expect("the vCPU's page arrived");
    assert!(
        got[..] == want[at..at + PAGE_SIZE as usize],
        "the faulted page differs"
    );
}

#[test]
fn pure_postcopy_serves_a_fault_and_pushes_the_rest() {
    let src = SoftVm::new(&layout(), &SoftConfig::default()).unwrap();
    src.fill(7);
    src.start();
    let pc = PostcopyConfig {
        after_rounds: 0,
        on_non_convergence: false,
    };
    let o = migrate(&src, pc, &MigrationConfig::default());
    let rp = o.report.postcopy.clone().expect("switched to post-copy");
    assert_eq!(rp.rounds_before, 0);
    assert!(o.report.rounds.is_empty());
    let total = layout().total_bytes() / PAGE_SIZE;
    assert_eq!(rp.discard_pages, total);
    assert_eq!(rp.pushed_pages + rp.requested_pages, total, "{rp:?}");
    let st = o.received.postcopy.clone().expect("destination stats");
    assert!(st.faults >= 1, "{st:?}");
    assert_eq!(st.discard_pages, total);
    assert_eq!(
        st.requested_pages + st.pushed_pages,
        total,
        "each page installed once"
    );
    assert!(st.fault_latency.max_us >= st.fault_latency.median_us);
    check(&src, o);
}

#[test]
fn hybrid_switches_after_the_rounds_asked_for() {
    let src = SoftVm::new(&layout(), &SoftConfig::default()).unwrap();
    src.fill(3);
    src.start();
    let pc = PostcopyConfig {
        after_rounds: 2,
        on_non_convergence: false,
    };
    // A limit pre-copy cannot meet with writers running: it would go on.
    let config = MigrationConfig {
        downtime_limit: Duration::from_nanos(1),
        ..Default::default()
    };
    let o = migrate(&src, pc, &config);
    let rp = o.report.postcopy.clone().expect("switched to post-copy");
    assert_eq!(rp.rounds_before, 2, "{rp:?}");
    assert_eq!(o.report.rounds.len(), 2);
    assert!(rp.reason.contains("after 2"), "{}", rp.reason);
    let st = o.received.postcopy.clone().expect("destination stats");
    assert_eq!(st.discard_pages, rp.discard_pages);
    assert!(st.faults >= 1, "{st:?}");
    check(&src, o);
}
