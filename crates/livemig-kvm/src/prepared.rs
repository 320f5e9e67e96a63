//! The part of a VM that costs what the guest's *size* costs — the KVM VM,
//! its dirty-tracking mode, guest memory and its memory slots — made ahead
//! of the rest ([`PreparedVm`]).
//!
//! Registering a memory slot is where KVM allocates its per-page metadata
//! (on a shadow-paging MMU such as this project's PVM hosts, a reverse-map
//! entry per 4 KiB page): 27–165 ms for a 61 GiB slot measured on an idle
//! machine, over 500 ms on a busy one. A migration destination that knows
//! the guest's size before the source connects (`refvmm receive --memory`)
//! pays it before the connection instead of inside the source's set-up:
//! [`PreparedVm::new`] then, once the source's description is known,
//! [`crate::KvmVm::create_prepared`].

use kvm_ioctls::{Kvm, VmFd};
use livemig::memory::{GuestRam, MemoryLayout};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::dirty::{DirtyMode, Slot};
use crate::memfd::{allocate_memory, MemoryOptions};
use crate::setup::{create_vm, enable_dirty_mode};
use crate::vm::{x86_layout, KvmVmError};

/// A KVM VM with its guest memory registered as memory slots, and nothing
/// else yet (no irqchip, no vCPUs): what [`crate::KvmVm`] is built on.
pub struct PreparedVm {
    pub(crate) kvm: Kvm,
    pub(crate) vm: VmFd,
    pub(crate) memory: GuestRam,
    pub(crate) slots: Vec<Slot>,
    pub(crate) dirty_mode: DirtyMode,
    /// The mode asked for (`dirty_mode` is what KVM granted).
    pub(crate) asked: Option<DirtyMode>,
    pub(crate) bytes: u64,
}

impl std::fmt::Debug for PreparedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedVm")
            .field("bytes", &self.bytes)
            .field("slots", &self.slots)
            .field("dirty_mode", &self.dirty_mode)
            .finish_non_exhaustive()
    }
}

impl PreparedVm {
    /// Creates the VM, enables `dirty_mode` (`None`: manual-protect where
    /// KVM offers it), allocates `bytes` of guest memory in the standard
    /// x86 layout ([`x86_layout`]) as `memory` says (a
    /// [`crate::MemoryBackend`], advised for transparent huge pages, or
    /// [`MemoryOptions`]), and registers it.
    pub fn new(
        bytes: u64,
        memory: impl Into<MemoryOptions>,
        dirty_mode: Option<DirtyMode>,
    ) -> Result<Self, KvmVmError> {
        let layout = x86_layout(bytes)?;
        let options = memory.into();
        let (memory, pages) =
            allocate_memory(&layout, options).map_err(|e| KvmVmError::Memory(e.into()))?;
        log::info!(
            "guest memory: {}, THP {}: {pages:?} pages",
            options.backend,
            options.thp
        );
        Self::with_memory(bytes, memory, dirty_mode)
    }

    /// Like [`PreparedVm::new`], over `memory` the caller built; its layout
    /// must be [`x86_layout`]`(bytes)`'s. The memory is not written.
    pub fn with_memory(
        bytes: u64,
        memory: GuestRam,
        dirty_mode: Option<DirtyMode>,
    ) -> Result<Self, KvmVmError> {
        let layout = x86_layout(bytes)?;
        let have = MemoryLayout::of(&memory).map_err(|e| KvmVmError::Memory(e.into()))?;
        if have != layout {
            return Err(KvmVmError::Config(format!(
                "guest memory {:?} is not the layout of {bytes} bytes {:?}",
                have.regions(),
                layout.regions()
            )));
        }
        let kvm = Kvm::new().map_err(KvmVmError::OpenKvm)?;
        let vm = create_vm(&kvm)?;
        let dirty_mode_asked = dirty_mode;
        let dirty_mode = enable_dirty_mode(&vm, dirty_mode.unwrap_or(DirtyMode::ManualProtect))?;
        let t0 = std::time::Instant::now();
        let mut slots = Vec::new();
        for (i, r) in memory.iter().enumerate() {
            let host = memory
                .get_host_address(r.start_addr())
                .map_err(|e| KvmVmError::Memory(e.into()))?;
            let slot = Slot {
                slot: i as u32,
                guest_addr: r.start_addr().0,
                size: r.len(),
                host_addr: host as u64,
            };
            slot.register(&vm, 0).map_err(|source| KvmVmError::Kvm {
                op: "KVM_SET_USER_MEMORY_REGION",
                source,
            })?;
            slots.push(slot);
        }
        log::debug!(
            "{} memory slot(s) of {bytes} bytes registered in {:.2} ms",
            slots.len(),
            t0.elapsed().as_secs_f64() * 1000.0
        );
        Ok(PreparedVm {
            kvm,
            vm,
            memory,
            slots,
            dirty_mode,
            asked: dirty_mode_asked,
            bytes,
        })
    }

    /// Guest memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.bytes
    }

    /// The dirty-tracking mode KVM granted (for the one asked for, see
    /// [`crate::setup::enable_dirty_mode`]).
    pub fn dirty_mode(&self) -> DirtyMode {
        self.dirty_mode
    }
}
