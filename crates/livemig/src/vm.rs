//! The VM seams: what the engine needs from the VM on each side.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::bitmap::DirtyBitmap;
use crate::memory::{GuestMemory, MemoryLayout};
use crate::state::{Section, StateError};

/// Errors reported by a VM implementation.
///
/// The message variants ([`VmError::Pause`], ...) carry text; when a failure
/// comes from an underlying error (an ioctl's errno, an I/O error, the
/// implementation's own error type), [`VmError::Failed`] keeps that error as
/// its [`source`](std::error::Error::source) so a caller can walk the chain
/// or downcast it. [`VmError::op`] tells what failed for either kind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmError {
    /// Pausing the vCPUs (or devices) failed.
    #[error("pause failed: {0}")]
    Pause(String),
    /// Resuming failed.
    #[error("resume failed: {0}")]
    Resume(String),
    /// Dirty tracking failed.
    #[error("dirty tracking: {0}")]
    DirtyLog(String),
    /// Saving or restoring state failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Creating the destination VM failed.
    #[error("creating the VM failed: {0}")]
    Create(String),
    /// The destination cannot host a VM of this shape.
    #[error("incompatible VM: {0}")]
    Incompatible(String),
    /// An operation failed because of an underlying error, kept as the
    /// source.
    #[error("{op}: {context}: {source}")]
    Failed {
        /// What failed.
        op: VmOp,
        /// The call or object that failed (for example
        /// `KVM_GET_DIRTY_LOG slot 0`).
        context: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

/// What a VM implementation was doing when it failed: the variant of
/// [`VmError`] for message errors, the `op` of [`VmError::Failed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmOp {
    /// Pausing the vCPUs or devices ([`VmError::Pause`]).
    Pause,
    /// Resuming ([`VmError::Resume`]).
    Resume,
    /// Dirty tracking ([`VmError::DirtyLog`]).
    DirtyLog,
    /// Saving or restoring state ([`VmError::State`]).
    State,
    /// Creating the destination VM ([`VmError::Create`]).
    Create,
    /// Checking that this host can run the VM ([`VmError::Incompatible`]).
    Incompatible,
}

impl std::fmt::Display for VmOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmOp::Pause => "pause failed",
            VmOp::Resume => "resume failed",
            VmOp::DirtyLog => "dirty tracking",
            VmOp::State => "state",
            VmOp::Create => "creating the VM failed",
            VmOp::Incompatible => "incompatible VM",
        })
    }
}

impl VmError {
    /// A [`VmError::Failed`]: `op` failed at `context` because of `source`.
    pub fn failed(
        op: VmOp,
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        VmError::Failed {
            op,
            context: context.into(),
            source: source.into(),
        }
    }

    /// What failed, whichever variant carries it.
    pub fn op(&self) -> VmOp {
        match self {
            VmError::Pause(_) => VmOp::Pause,
            VmError::Resume(_) => VmOp::Resume,
            VmError::DirtyLog(_) => VmOp::DirtyLog,
            VmError::State(_) => VmOp::State,
            VmError::Create(_) => VmOp::Create,
            VmError::Incompatible(_) => VmOp::Incompatible,
            VmError::Failed { op, .. } => *op,
        }
    }
}

/// A network interface of the VM, announced on the destination after
/// switchover so the network learns where the guest now lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicInfo {
    /// The guest NIC's MAC address.
    pub mac: [u8; 6],
    /// The guest's IPv4 address, if the VMM knows it.
    pub ipv4: Option<[u8; 4]>,
}

/// The shape of a VM: everything the destination must agree to before a
/// single page is sent. Sent by the source in the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    /// Guest-physical memory layout.
    pub layout: MemoryLayout,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The VM's NICs.
    pub nics: Vec<NicInfo>,
    /// Further properties that must match or be satisfiable on the destination
    /// (for example `cpu.vendor`); interpreted by the VM implementations.
    pub properties: BTreeMap<String, String>,
}

/// When the pages a [`DirtyTracker::sync`] reports are tracked again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rearm {
    /// `sync` re-arms what it reports: a write after a `sync` is reported
    /// by the next one (KVM's `KVM_GET_DIRTY_LOG` without manual protect,
    /// the dirty ring). The engine never calls [`DirtyTracker::rearm`].
    OnSync,
    /// Reported pages stay unarmed (writes to them go unrecorded) until the
    /// engine calls [`DirtyTracker::rearm`] for them, which it does for
    /// each stretch of pages just before it reads them (KVM's manual
    /// protect: re-arming late makes a page written often cost one write
    /// fault per round instead of one per write). Such a tracker may report
    /// pages that were not written (manual protect with `INITIALLY_SET`
    /// reports every page until it is re-armed).
    BeforeRead,
}

/// Dirty-page tracking provided by the hypervisor (for KVM: the dirty log):
/// the pages the *guest* writes. The VMM's own writes come from
/// [`GuestMemory::take_vmm_dirty`], which the engine merges into every sync.
///
/// Pages are the engine's 4 KiB pages ([`crate::memory::PAGE_SIZE`]),
/// region indices those of the layout.
pub trait DirtyTracker: Send {
    /// Starts tracking. Afterwards every page the guest writes is reported by
    /// a later `sync` (for a [`Rearm::BeforeRead`] tracker: once the page
    /// has been re-armed).
    fn start(&mut self) -> Result<(), VmError>;

    /// Like [`DirtyTracker::start`], for the regions marked in `regions`
    /// (one flag per region, in layout order) only: the others stay
    /// untracked until [`DirtyTracker::start_region`]. An untracked region
    /// reports nothing on `sync`, and the engine does not re-arm it. The
    /// engine asks for this only for memory it watches otherwise: a
    /// [`Rearm::BeforeRead`] tracker's regions the guest never populated,
    /// which it scans for populated pages at every sync (`source/unarmed.rs`)
    /// and starts before it re-arms any page of them. Turning tracking on
    /// and off costs the hypervisor in proportion to the region's size
    /// (KVM on a shadow-paging host: 36 ms on and 47 ms off for a 61 GiB
    /// slot), so an untouched region then costs nothing. The default starts
    /// every region.
    fn start_regions(&mut self, regions: &[bool]) -> Result<(), VmError> {
        let _ = regions;
        self.start()
    }

    /// Starts tracking `region`, which [`DirtyTracker::start_regions`] left
    /// out; from then on it is tracked as if it had been started with the
    /// others (for a [`Rearm::BeforeRead`] tracker: every page of it
    /// reported until re-armed). Nothing to do for a region already
    /// tracked. The default does nothing (the default `start_regions`
    /// starts every region).
    fn start_region(&mut self, region: usize) -> Result<(), VmError> {
        let _ = region;
        Ok(())
    }

    /// ORs every page written since `start` or the previous `sync` into
    /// `bitmap` (one bit per page per region, in layout order).
    fn sync(&mut self, bitmap: &mut DirtyBitmap) -> Result<(), VmError>;

    /// Whether `sync` re-arms what it reports or leaves that to
    /// [`DirtyTracker::rearm`].
    fn rearm_mode(&self) -> Rearm;

    /// Re-arms tracking for the pages set in `dirty` among pages
    /// `first_page .. first_page + npages` of region `region` (clipped to
    /// the region), and for no other page: the engine reads these pages
    /// right after this call, and may already have read the others, so
    /// re-arming one of those would lose a write made since. Any range is
    /// allowed; a mechanism that works on aligned blocks rounds itself and
    /// masks out the pages outside the range (KVM's `KVM_CLEAR_DIRTY_LOG`
    /// takes 64-page-aligned blocks: `livemig_kvm`'s tracker does this).
    ///
    /// Called only for [`Rearm::BeforeRead`] trackers. The default fails,
    /// so a tracker that says `BeforeRead` and forgets this method makes
    /// the migration fail instead of losing writes.
    fn rearm(
        &mut self,
        region: usize,
        first_page: u64,
        npages: u64,
        dirty: &DirtyBitmap,
    ) -> Result<(), VmError> {
        let _ = (region, first_page, npages, dirty);
        Err(VmError::DirtyLog(format!(
            "{}: rearm is not implemented",
            self.describe()
        )))
    }

    /// Stops tracking (also called when a migration fails or is cancelled).
    fn stop(&mut self) -> Result<(), VmError>;

    /// Called once, instead of [`DirtyTracker::stop`], when the migration
    /// completed: the guest runs on the destination and this VM never runs
    /// again here (a [`crate::guard::MigrationGuard`] refuses to resume
    /// it). A tracker whose `stop` is costly may leave the hypervisor's log
    /// as it is, for the VM's teardown to free, so the migration call
    /// returns without that work (turning KVM's dirty logging off walks the
    /// whole memory slot: 47 ms for a 61 GiB slot on a shadow-paging host).
    /// It must then turn the log off itself should the VM's vCPUs run again
    /// or a later tracker start (livemig-kvm's `KvmVm` does). After a
    /// failed, cancelled or ambiguous migration the engine calls `stop`,
    /// never this. The default stops tracking.
    fn stop_migrated(&mut self) -> Result<(), VmError> {
        self.stop()
    }

    /// A short human-readable name of the mechanism, for the report
    /// (for example `"get-dirty-log"`).
    fn describe(&self) -> String;
}

/// Slows a running guest down by parking its vCPUs for part of each time
/// slice (auto-converge). Only the vCPUs: devices keep running.
pub trait VcpuThrottle: Send + Sync {
    /// Parks every vCPU.
    fn pause_vcpus(&self) -> Result<(), VmError>;
    /// Lets the vCPUs run again.
    fn resume_vcpus(&self) -> Result<(), VmError>;
}

/// The VM on the source side.
///
/// Implementations must be usable from the migration thread while the VMM's
/// own threads keep running the guest.
///
/// The memory is a trait object (not an associated type) so that
/// `&dyn SourceVm` stays usable without naming the memory type, and the
/// engine is compiled once for every kind of memory; the engine asks for
/// the regions once per migration, not per page.
pub trait SourceVm: Send + Sync {
    /// Guest memory: its regions must be exactly those of
    /// [`SourceVm::describe`]'s layout (the migration fails in the
    /// handshake otherwise).
    fn memory(&self) -> &dyn GuestMemory;

    /// The VM's shape, for the handshake.
    fn describe(&self) -> Result<VmDescription, VmError>;

    /// A dirty tracker over all of guest memory.
    fn dirty_tracker(&self) -> Result<Box<dyn DirtyTracker + '_>, VmError>;

    /// Stops every vCPU and device that can write guest memory. Returns when
    /// they are all stopped.
    fn pause(&self) -> Result<(), VmError>;

    /// Lets a paused VM run again (used when a migration fails before the
    /// switchover, unless the VM was paused when it started).
    fn resume(&self) -> Result<(), VmError>;

    /// Whether the VM is paused now. The engine asks once, when a migration
    /// starts: a paused VM migrates paused (the engine never runs it,
    /// neither to measure its state nor after a failure, and the
    /// destination does not resume it).
    fn is_paused(&self) -> bool;

    /// Saves all non-memory state (vCPUs, VM-wide, devices) as sections.
    /// Called only while paused.
    fn save_state(&self) -> Result<Vec<Section>, VmError>;

    /// vCPU throttling for auto-converge, or `None` if this VM cannot be
    /// throttled (the report then says auto-converge was unavailable).
    fn throttle(&self) -> Option<&dyn VcpuThrottle>;
}

/// What [`DestinationVm::rehearse_restore`] measured: a save of the
/// destination VM's own state and the restore of exactly that state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreRehearsal {
    /// How long saving the state took.
    pub save: std::time::Duration,
    /// How long restoring it took.
    pub restore: std::time::Duration,
}

/// The VM on the destination side, created from the source's
/// [`VmDescription`] and not running until [`DestinationVm::resume`].
pub trait DestinationVm: Send {
    /// Guest memory. Whatever it holds before the migration is discarded:
    /// the engine makes every page read as zero in the handshake (dropping
    /// private anonymous pages, punching holes in a shared file, or, for
    /// any other backing, writing zeros) and then writes the source's
    /// contents. Do not put anything into it before `restore_state`.
    /// Its regions must be exactly the source's layout ([`check_layout`]).
    fn memory(&self) -> &dyn GuestMemory;

    /// Loads all non-memory state. Must refuse unknown sections or versions.
    fn restore_state(&mut self, sections: &[Section]) -> Result<(), VmError>;

    /// Times a save and a restore like the switchover's, so that the source
    /// can count the restore as long as this VM takes it instead of as long
    /// as its own save (a restore issues other calls than a save, and this
    /// host may be slower or faster than the source's).
    ///
    /// Called in the handshake, right after the VM was built and before
    /// any page or state arrives, only when the source asked for it (a
    /// source of this build does): three times, and the fastest save and
    /// fastest restore are sent (once when it returns `Ok(None)`). An
    /// implementation saves the state
    /// this not-yet-running VM has now, timing the save, and restores
    /// exactly that, timing the restore: it must leave the VM as it found
    /// it (the switchover's [`DestinationVm::restore_state`] loads the
    /// source's state over it afterwards) and write no guest memory. The
    /// source counts the restore sent as the switchover's restore in its
    /// expected downtime (the save is reported beside it). An error
    /// refuses the migration before any page is sent: a VM that cannot
    /// restore its own state would fail the switchover's restore too.
    ///
    /// The default returns `Ok(None)`: not measured. The source then takes
    /// the restore as long as its own save, as sources did before this
    /// method existed.
    fn rehearse_restore(&mut self) -> Result<Option<RestoreRehearsal>, VmError> {
        Ok(None)
    }

    /// Starts the vCPUs. Called once, after `restore_state` succeeded and the
    /// source committed to the switchover — not at all when the source VM
    /// was paused (the VM is then handed back paused). On error no vCPU may
    /// be left running: the engine drops the VM and tells the source that
    /// the guest will never run here (the source then resumes it).
    ///
    /// A pre-copy switchover calls it through
    /// [`DestinationVm::resume_then`]; a post-copy switchover calls it
    /// directly and acknowledges after it returns.
    fn resume(&mut self) -> Result<(), VmError>;

    /// [`DestinationVm::resume`], calling `started` exactly once on success:
    /// the engine sends the source its `Resumed` acknowledgement (the end of
    /// the source's downtime) from `started`. On error `started` is not
    /// called and, as for `resume`, no vCPU may be left running.
    ///
    /// The default resumes, then calls `started`. An implementation whose
    /// last step cannot fail may call `started` right before that step (the
    /// wake-up of the vCPU threads): then a vCPU thread the host schedules
    /// ahead of the engine's thread neither holds up the acknowledgement nor
    /// has to give way to it, and the guest runs as soon as a CPU takes it.
    /// `KvmVm` does this. Calling `started` and then failing is a bug: the
    /// source, told the guest runs here, never runs it again.
    fn resume_then(&mut self, started: &mut dyn FnMut()) -> Result<(), VmError> {
        self.resume()?;
        started();
        Ok(())
    }

    /// Whether this VM's [`DestinationVm::resume_then`] calls `started`
    /// before the part of the resume that grows with the vCPUs (waking the
    /// vCPU threads), with nothing before `started` whose time grows with
    /// the guest (no call per vCPU, no wait for another thread).
    ///
    /// What for: the destination's share of the downtime is its resume
    /// from `Go` to `started` (it times it and sends it in `Resumed`). The
    /// source estimates its downtime before the switchover, and counts
    /// this resume as long as its own resume (as many vCPU threads to wake)
    /// unless the destination says `true` here: then it counts none. The
    /// copying reception asks once, in the handshake, for a source that
    /// asked, and sends the answer in `HelloReply` (post-copy's reception
    /// does not: its switchover resumes with [`DestinationVm::resume`] and
    /// acknowledges after it).
    ///
    /// Said, not measured: the steps before `started` cannot be timed
    /// before the switchover without starting the guest, and what an
    /// implementation can say honestly is its own order. So a `true` is
    /// counted as no time at all: say it only when the steps before
    /// `started` are a few calls whose time does not depend on the guest's
    /// size (`KvmVm`: a check that dirty logging is off).
    ///
    /// The default says `false`, as [`DestinationVm::resume_then`]'s
    /// default resumes before calling `started`. `KvmVm` says `true`.
    fn started_before_wake(&self) -> bool {
        false
    }
}

/// Checks a destination memory object against a description's layout.
pub fn check_layout(mem: &dyn GuestMemory, desc: &VmDescription) -> Result<(), VmError> {
    let have = MemoryLayout::of(mem).map_err(|e| VmError::Incompatible(e.to_string()))?;
    if have != desc.layout {
        return Err(VmError::Incompatible(format!(
            "memory layout differs: source {:?}, destination {:?}",
            desc.layout.regions(),
            have.regions()
        )));
    }
    Ok(())
}
