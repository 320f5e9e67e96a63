//! A device whose `save()` writes guest memory through the VMM's tracked
//! path (vm-memory, as a device model completing a request at the pause
//! does): the switchover saves the state before the final dirty sync, so
//! that write travels with the final pages (issue 12 item 5; before, it
//! was written after the final pages were sent and lost).
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

use std::sync::atomic::{AtomicU64, Ordering};

use livemig::memory::{MemoryLayout, RegionDesc};
use livemig::testing::hooked::HookedVm;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::mem;
use livemig::vm::{SourceVm, VmError};
use livemig::ReceiveConfig;
use vm_memory::{Bytes, GuestAddress};

mod common;
use common::{migrate_with_defaults, soft_destination};

/// Where the "device" writes on every save.
const GPA: u64 = 0x3000 + 0x40;

#[test]
fn a_write_by_save_state_reaches_the_destination() {
    let layout = MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: 2 << 20,
    }])
    .unwrap();
    let saves = AtomicU64::new(0);
    // Like a device flushing a completion into guest memory at save.
    let src = HookedVm::new(SoftVm::new(&layout, &SoftConfig::idle()).unwrap())
        .on_save_state(|vm| {
            let n = saves.fetch_add(1, Ordering::SeqCst) + 1;
            vm.ram()
                .ok_or(VmError::Pause("not vm-memory".into()))?
                .write_obj(0xC0DE_0000_0000_0000 | n, GuestAddress(GPA))
                .map_err(|e| VmError::Pause(e.to_string()))?;
            vm.save_state()
        })
        .without_throttle();
    src.vm().fill(9);
    let (a, b) = mem::pair();
    let dest = soft_destination(b, ReceiveConfig::default());
    migrate_with_defaults(&src, a).expect("migrated");
    let (dst, _) = dest.join().unwrap().expect("received");
    let want: u64 = src.vm().ram().unwrap().read_obj(GuestAddress(GPA)).unwrap();
    let got: u64 = dst.ram().unwrap().read_obj(GuestAddress(GPA)).unwrap();
    assert_eq!(
        got,
        want,
        "the state save's write (save #{}) is missing on the destination",
        saves.load(Ordering::SeqCst)
    );
    assert!(src.vm().snapshot() == dst.snapshot(), "memory differs");
}
