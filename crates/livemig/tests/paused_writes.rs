//! A device that `SourceVm::pause` does not stop keeps writing guest
//! memory through the VMM's tracked path (vm-memory) while the VM is
//! paused. A write after the final dirty sync is not sent, so the
//! destination would run with an older copy of the page: the source checks
//! its VMM's dirty bits once more just before `Go` and fails the migration
//! instead (the guest stays on the source and runs again). Before that
//! check this migration "succeeded" with the page different on the two
//! sides.
//!
//! The device's write is ordered, not timed: the destination's
//! `restore_state` (after the final pages and the state were sent, before
//! `Ready`) asks the source's device to write and waits until it did.
#![allow(deprecated)]

use std::sync::mpsc;
use std::sync::Arc;

use livemig::memory::GuestMemory;
use livemig::state::Section;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::mem;
use livemig::vm::{DestinationVm, SourceVm, VmError};
use livemig::{receive, ErrorKind, ReceiveConfig};
use vm_memory::{Bytes, GuestAddress};

mod common;
use common::{migrate_with_defaults, one_region};

/// Where the device writes: page 5 of region 0.
const GPA: u64 = 5 * 4096 + 8;
const WRITTEN: u64 = 0xD0_0000_0001;

/// A soft destination that, at `restore_state`, has the source's device
/// write (through `poke`) and waits for it.
struct Dest {
    vm: SoftVm,
    poke: mpsc::Sender<mpsc::Sender<()>>,
}

impl DestinationVm for Dest {
    fn memory(&self) -> &dyn GuestMemory {
        DestinationVm::memory(&self.vm)
    }
    fn restore_state(&mut self, sections: &[Section]) -> Result<(), VmError> {
        let (done, wait) = mpsc::channel();
        self.poke
            .send(done)
            .map_err(|e| VmError::Create(e.to_string()))?;
        wait.recv().map_err(|e| VmError::Create(e.to_string()))?;
        self.vm.restore_state(sections)
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.vm.resume()
    }
}

#[test]
fn a_write_while_paused_after_the_final_sync_fails_before_go() {
    let layout = one_region(2 << 20);
    let src = Arc::new(SoftVm::new(&layout, &SoftConfig::idle()).unwrap());
    src.fill(3);
    src.start();
    // The source's device: writes once when asked (the VM is paused then).
    // One request at most: the destination keeps its sender if it runs the
    // guest.
    let (poke, pokes) = mpsc::channel::<mpsc::Sender<()>>();
    let device = {
        let vm = src.clone();
        std::thread::spawn(move || {
            if let Ok(done) = pokes.recv() {
                assert!(vm.is_paused(), "asked to write while the VM runs");
                let ram = vm.ram().expect("vm-memory");
                ram.write_obj(WRITTEN, GuestAddress(GPA)).expect("write");
                let _ = done.send(());
            }
        })
    };
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        receive(Box::new(b), &ReceiveConfig::default(), |d| {
            Ok(Dest {
                vm: SoftVm::new(&d.layout, &SoftConfig::idle())?,
                poke,
            })
        })
    });
    let result = migrate_with_defaults(&*src, a);
    let dest = dest.join().unwrap();
    device.join().unwrap();
    match result {
        Err(e) => {
            assert!(
                matches!(
                    e.kind,
                    ErrorKind::WrittenWhilePaused {
                        pages: 1,
                        region: 0,
                        page: 5
                    }
                ),
                "{e}"
            );
            assert!(!e.is_ambiguous(), "{e}");
            assert!(!src.is_paused(), "the source did not resume its guest");
            assert!(dest.is_err(), "the destination ran the guest");
        }
        Ok(_) => {
            let (dst, _) = dest.expect("received");
            let got: u64 = dst.vm.ram().unwrap().read_obj(GuestAddress(GPA)).unwrap();
            panic!(
                "migrated although the device wrote after the final sync: the destination \
                 has {got:#x}, the source {WRITTEN:#x}"
            );
        }
    }
}
