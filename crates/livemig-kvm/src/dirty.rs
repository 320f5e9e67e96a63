//! KVM dirty-page tracking: the classic `KVM_GET_DIRTY_LOG` (harvest and
//! re-protect in one call) and the manual-protect mode
//! (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`), where `KVM_GET_DIRTY_LOG` only reads
//! and `KVM_CLEAR_DIRTY_LOG` re-protects a chunk just before it is sent.

use kvm_bindings::{kvm_clear_dirty_log, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use livemig::bitmap::DirtyBitmap;
use livemig::vm::{DirtyTracker, VmError};
use vmm_sys_util::ioctl::ioctl_with_ref;

mod ioctls {
    #![allow(missing_docs)]
    use kvm_bindings::{kvm_clear_dirty_log, KVMIO};
    use vmm_sys_util::ioctl_iowr_nr;
    // kvm-ioctls has no wrapper for KVM_CLEAR_DIRTY_LOG (_IOWR(KVMIO, 0xc0)).
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
}
use ioctls::KVM_CLEAR_DIRTY_LOG;

/// How dirty pages are tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyMode {
    /// `KVM_GET_DIRTY_LOG` harvests and write-protects the whole slot at once.
    Classic,
    /// Manual protect: harvest without protecting, then `KVM_CLEAR_DIRTY_LOG`
    /// each chunk just before sending it (the guest pays for write faults
    /// only on pages already sent).
    ManualProtect,
}

/// A registered memory slot.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    /// KVM slot number (= region index).
    pub slot: u32,
    /// Guest-physical address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the mapping.
    pub host_addr: u64,
}

impl Slot {
    fn region(&self, flags: u32) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: self.slot,
            flags,
            guest_phys_addr: self.guest_addr,
            memory_size: self.size,
            userspace_addr: self.host_addr,
        }
    }

    /// Registers (or re-registers) the slot with `flags`.
    pub fn register(&self, vm: &VmFd, flags: u32) -> Result<(), kvm_ioctls::Error> {
        let region = self.region(flags);
        // SAFETY: host_addr..host_addr+size is a mapping owned by the VM's
        // GuestRam, which outlives the VmFd's use of the slot.
        unsafe { vm.set_user_memory_region(region) }
    }
}

/// The KVM dirty tracker over a VM's slots.
pub struct KvmDirtyTracker<'a> {
    vm: &'a VmFd,
    slots: &'a [Slot],
    mode: DirtyMode,
    active: bool,
    scratch: Vec<u64>,
}

impl<'a> KvmDirtyTracker<'a> {
    /// A tracker (not yet started).
    pub fn new(vm: &'a VmFd, slots: &'a [Slot], mode: DirtyMode) -> Self {
        KvmDirtyTracker {
            vm,
            slots,
            mode,
            active: false,
            scratch: Vec::new(),
        }
    }

    fn set_logging(&self, on: bool) -> Result<(), VmError> {
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        for s in self.slots {
            s.register(self.vm, flags).map_err(|e| {
                VmError::DirtyLog(format!(
                    "KVM_SET_USER_MEMORY_REGION slot {} (logging {}): {e}",
                    s.slot,
                    if on { "on" } else { "off" }
                ))
            })?;
        }
        Ok(())
    }
}

impl DirtyTracker for KvmDirtyTracker<'_> {
    fn start(&mut self) -> Result<(), VmError> {
        self.set_logging(true)?;
        self.active = true;
        // In manual-protect mode with KVM_DIRTY_LOG_INITIALLY_SET every page
        // starts dirty and unprotected; the engine sends every page in round
        // 0 and clears each chunk before reading it, so no extra work here.
        Ok(())
    }

    fn sync(&mut self, bitmap: &mut DirtyBitmap) -> Result<(), VmError> {
        for (i, s) in self.slots.iter().enumerate() {
            let words = self
                .vm
                .get_dirty_log(s.slot, s.size as usize)
                .map_err(|e| {
                    VmError::DirtyLog(format!("KVM_GET_DIRTY_LOG slot {}: {e}", s.slot))
                })?;
            bitmap.or_words(i, &words);
        }
        Ok(())
    }

    fn needs_clear(&self) -> bool {
        self.mode == DirtyMode::ManualProtect
    }

    fn clear(
        &mut self,
        region: usize,
        first_page: u64,
        npages: u64,
        bitmap: &DirtyBitmap,
    ) -> Result<(), VmError> {
        if self.mode != DirtyMode::ManualProtect {
            return Ok(());
        }
        let slot = self
            .slots
            .get(region)
            .ok_or_else(|| VmError::DirtyLog(format!("clear: no region {region}")))?;
        let slot_pages = slot.size / 4096;
        if !first_page.is_multiple_of(64) || first_page >= slot_pages {
            return Err(VmError::DirtyLog(format!(
                "clear: first page {first_page} of slot {} not 64-aligned or out of range",
                slot.slot
            )));
        }
        let npages = npages.min(slot_pages - first_page);
        let words = bitmap.words(region);
        let w0 = (first_page / 64) as usize;
        let wn = npages.div_ceil(64) as usize;
        self.scratch.clear();
        self.scratch
            .extend_from_slice(words.get(w0..(w0 + wn).min(words.len())).unwrap_or(&[]));
        if self.scratch.iter().all(|w| *w == 0) {
            return Ok(());
        }
        self.scratch.resize(wn, 0);
        // KVM wants num_pages a multiple of 64 unless the range ends the slot.
        let num_pages = if first_page + npages == slot_pages {
            npages
        } else {
            npages.div_ceil(64) * 64
        };
        let mut arg = kvm_clear_dirty_log {
            slot: slot.slot,
            num_pages: num_pages as u32,
            first_page,
            ..Default::default()
        };
        arg.__bindgen_anon_1.dirty_bitmap = self.scratch.as_mut_ptr() as *mut libc::c_void;
        // SAFETY: `arg` points at `scratch`, which holds num_pages bits
        // (rounded up to whole words) and lives across the call; KVM only
        // reads it.
        let ret = unsafe { ioctl_with_ref(self.vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
        if ret < 0 {
            return Err(VmError::DirtyLog(format!(
                "KVM_CLEAR_DIRTY_LOG slot {} pages {first_page}+{num_pages}: {}",
                slot.slot,
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), VmError> {
        if self.active {
            self.active = false;
            self.set_logging(false)?;
        }
        Ok(())
    }
}

impl Drop for KvmDirtyTracker<'_> {
    fn drop(&mut self) {
        if self.active {
            if let Err(e) = self.stop() {
                log::error!("turning dirty logging off: {e}");
            }
        }
    }
}
