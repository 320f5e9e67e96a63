//! Device state larger than one frame travels in several `State` frames;
//! state that cannot travel at all (a section over the section limit) is
//! refused at the handshake, before the guest was ever paused for the
//! switchover.
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

use std::sync::Mutex;

use livemig::memory::{GuestMemory, MemoryLayout, RegionDesc};
use livemig::state::Section;
use livemig::testing::hooked::HookedVm;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::mem;
use livemig::vm::{DestinationVm, SourceVm, VmError};
use livemig::{migrate, receive, CancelToken, MigrationConfig, Phase, ReceiveConfig};

mod common;
use common::soft_destination;

fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: 1 << 20,
    }])
    .unwrap()
}

fn big(i: usize, len: usize) -> Section {
    let data = (0..len).map(|j| (i * 31 + j * 7) as u8).collect();
    Section::new(format!("big.{i}"), 1, data)
}

/// A soft VM with `n` extra device sections of `len` bytes each.
fn big_state(n: usize, len: usize) -> HookedVm<'static, SoftVm> {
    HookedVm::new(SoftVm::new(&layout(), &SoftConfig::default()).unwrap())
        .on_save_state(move |vm| {
            let mut s = vm.save_state()?;
            s.extend((0..n).map(|i| big(i, len)));
            Ok(s)
        })
        .without_throttle()
}

/// The destination side: checks the extra sections byte for byte.
struct BigDest {
    vm: SoftVm,
    got: Mutex<Vec<String>>,
    len: usize,
}

impl DestinationVm for BigDest {
    fn memory(&self) -> &dyn GuestMemory {
        DestinationVm::memory(&self.vm)
    }
    fn restore_state(&mut self, sections: &[Section]) -> Result<(), VmError> {
        let (extra, soft): (Vec<Section>, Vec<Section>) = sections
            .iter()
            .cloned()
            .partition(|s| s.name.starts_with("big."));
        for s in &extra {
            let i: usize = s.name[4..]
                .parse()
                .map_err(|_| VmError::Create(s.name.clone()))?;
            if *s != big(i, self.len) {
                return Err(VmError::Create(format!("{} differs", s.name)));
            }
            self.got.lock().unwrap().push(s.name.clone());
        }
        self.vm.restore_state(&soft)
    }
    fn resume(&mut self) -> Result<(), VmError> {
        DestinationVm::resume(&mut self.vm)
    }
}

/// 12 sections of 1 MiB: 12 MiB of state, more than one 8 MiB frame.
#[test]
fn state_larger_than_a_frame_migrates_in_several_frames() {
    let (n, len) = (12, 1 << 20);
    let src = big_state(n, len);
    src.vm().fill(5);
    src.vm().start();
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        receive(Box::new(b), &ReceiveConfig::default(), |d| {
            Ok(BigDest {
                vm: SoftVm::new(&d.layout, &SoftConfig::idle())?,
                got: Mutex::new(Vec::new()),
                len,
            })
        })
    });
    // 12 MiB of state never fits a 20 ms downtime: force the switchover.
    let cfg = MigrationConfig {
        max_rounds: 2,
        on_limit: livemig::OnLimit::ForceSwitchover,
        ..Default::default()
    };
    let report =
        migrate(&src, Box::new(a), &cfg, &CancelToken::new(), &mut |_| {}).expect("migrated");
    let (dst, _) = dest.join().unwrap().expect("received");
    assert!(
        report.state_frames >= 2,
        "{} State frames",
        report.state_frames
    );
    assert_eq!(dst.got.lock().unwrap().len(), n);
    assert!(src.vm().snapshot() == dst.vm.snapshot());
}

/// A section over the section limit (1 MiB) cannot travel: refused at the
/// handshake (before, the migration failed only after the guest was paused
/// for the switchover), and the source keeps running.
#[test]
fn state_that_cannot_travel_is_refused_at_the_handshake() {
    let src = big_state(1, 2 << 20);
    src.vm().start();
    let (a, b) = mem::pair();
    let dest = soft_destination(b, ReceiveConfig::default());
    let mut paused_for_switchover = false;
    let e = migrate(
        &src,
        Box::new(a),
        &MigrationConfig::default(),
        &CancelToken::new(),
        &mut |p| paused_for_switchover |= matches!(p, livemig::Progress::Paused { .. }),
    )
    .expect_err("refused");
    let _ = dest.join();
    eprintln!("{e}");
    assert_eq!(e.phase, Phase::Handshake, "{e}");
    assert!(e.to_string().contains("big.0"), "{e}");
    assert!(!paused_for_switchover);
    assert!(!src.is_paused(), "the source does not run");
}
