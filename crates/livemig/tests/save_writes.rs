//! A device whose `save()` writes guest memory through the VMM's tracked
//! path (vm-memory, as a device model completing a request at the pause
//! does): the switchover saves the state before the final dirty sync, so
//! that write travels with the final pages (issue 12 item 5; before, it
//! was written after the final pages were sent and lost).
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

use std::sync::atomic::{AtomicU64, Ordering};

use livemig::memory::{GuestRam, MemoryLayout, RegionDesc};
use livemig::state::Section;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::mem;
use livemig::vm::{DirtyTracker, SourceVm, VcpuThrottle, VmDescription, VmError};
use livemig::{migrate, receive, CancelToken, MigrationConfig, ReceiveConfig};
use vm_memory::{Bytes, GuestAddress};

/// Where the "device" writes on every save.
const GPA: u64 = 0x3000 + 0x40;

struct WritingDevice {
    vm: SoftVm,
    saves: AtomicU64,
}

impl SourceVm for WritingDevice {
    fn memory(&self) -> &GuestRam {
        SourceVm::memory(&self.vm)
    }
    fn describe(&self) -> Result<VmDescription, VmError> {
        self.vm.describe()
    }
    fn dirty_tracker(&self) -> Result<Box<dyn DirtyTracker + '_>, VmError> {
        self.vm.dirty_tracker()
    }
    fn pause(&self) -> Result<(), VmError> {
        SourceVm::pause(&self.vm)
    }
    fn resume(&self) -> Result<(), VmError> {
        SourceVm::resume(&self.vm)
    }
    fn is_paused(&self) -> bool {
        self.vm.is_paused()
    }
    fn save_state(&self) -> Result<Vec<Section>, VmError> {
        // Like a device flushing a completion into guest memory at save.
        let n = self.saves.fetch_add(1, Ordering::SeqCst) + 1;
        SourceVm::memory(&self.vm)
            .write_obj(0xC0DE_0000_0000_0000 | n, GuestAddress(GPA))
            .map_err(|e| VmError::Pause(e.to_string()))?;
        self.vm.save_state()
    }
    fn throttle(&self) -> Option<&dyn VcpuThrottle> {
        None
    }
}

#[test]
fn a_write_by_save_state_reaches_the_destination() {
    let layout = MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: 2 << 20,
    }])
    .unwrap();
    let src = WritingDevice {
        vm: SoftVm::new(&layout, &SoftConfig::idle()).unwrap(),
        saves: AtomicU64::new(0),
    };
    src.vm.fill(9);
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        receive(Box::new(b), &ReceiveConfig::default(), |d| {
            SoftVm::new(&d.layout, &SoftConfig::idle())
        })
    });
    migrate(
        &src,
        Box::new(a),
        &MigrationConfig::default(),
        &CancelToken::new(),
        &mut |_| {},
    )
    .expect("migrated");
    let (dst, _) = dest.join().unwrap().expect("received");
    let want: u64 = SourceVm::memory(&src.vm)
        .read_obj(GuestAddress(GPA))
        .unwrap();
    let got: u64 = livemig::vm::DestinationVm::memory(&dst)
        .read_obj(GuestAddress(GPA))
        .unwrap();
    assert_eq!(
        got,
        want,
        "the state save's write (save #{}) is missing on the destination",
        src.saves.load(Ordering::SeqCst)
    );
    assert!(src.vm.snapshot() == dst.snapshot(), "memory differs");
}
