//! A [`SourceVm`] that passes every call to another source VM except the
//! ones a test replaces with a hook, so a test that needs one odd behaviour
//! (a pause that fails once, a slow save, a save that writes guest memory,
//! another host's description) writes that behaviour and nothing else.
//!
//! ```
//! use std::sync::atomic::{AtomicBool, Ordering};
//!
//! use livemig::memory::{MemoryLayout, RegionDesc};
//! use livemig::testing::hooked::HookedVm;
//! use livemig::testing::soft::{SoftConfig, SoftVm};
//! use livemig::vm::{SourceVm, VmError};
//!
//! let layout = MemoryLayout::new(vec![RegionDesc { guest_addr: 0, size: 1 << 20 }]).unwrap();
//! let failed = AtomicBool::new(false);
//! // The first pause fails after the VM stopped; later ones succeed.
//! let vm = HookedVm::new(SoftVm::new(&layout, &SoftConfig::idle()).unwrap()).on_pause(|vm| {
//!     SourceVm::pause(vm)?;
//!     if failed.swap(true, Ordering::SeqCst) {
//!         Ok(())
//!     } else {
//!         Err(VmError::Pause("injected".into()))
//!     }
//! });
//! assert!(SourceVm::pause(&vm).is_err());
//! assert!(SourceVm::pause(&vm).is_ok());
//! assert!(vm.vm().is_paused());
//! ```

use crate::memory::GuestMemory;
use crate::state::Section;
use crate::vm::{DirtyTracker, SourceVm, VcpuThrottle, VmDescription, VmError};

/// A hook: the whole call, given the wrapped VM (a hook that wants the
/// wrapped VM's own behaviour calls it).
type Hook<'a, V, T> = Box<dyn Fn(&V) -> Result<T, VmError> + Send + Sync + 'a>;

/// A dirty-tracker hook: the tracker it returns borrows the wrapped VM.
type TrackerHook<'a, V> =
    Box<dyn for<'v> Fn(&'v V) -> Result<Box<dyn DirtyTracker + 'v>, VmError> + Send + Sync + 'a>;

/// A source VM that delegates to `V`, except for the calls given a hook
/// (`describe`, `dirty_tracker`, `pause`, `resume`, `save_state`) and,
/// after [`HookedVm::without_throttle`], the throttle.
pub struct HookedVm<'a, V> {
    vm: V,
    describe: Option<Hook<'a, V, VmDescription>>,
    dirty_tracker: Option<TrackerHook<'a, V>>,
    pause: Option<Hook<'a, V, ()>>,
    resume: Option<Hook<'a, V, ()>>,
    save_state: Option<Hook<'a, V, Vec<Section>>>,
    throttle: bool,
}

impl<'a, V: SourceVm> HookedVm<'a, V> {
    /// Wraps `vm` with no hooks: every call goes to `vm`.
    pub fn new(vm: V) -> Self {
        HookedVm {
            vm,
            describe: None,
            dirty_tracker: None,
            pause: None,
            resume: None,
            save_state: None,
            throttle: true,
        }
    }

    /// The wrapped VM.
    pub fn vm(&self) -> &V {
        &self.vm
    }

    /// `describe` calls `f` instead.
    pub fn on_describe(
        mut self,
        f: impl Fn(&V) -> Result<VmDescription, VmError> + Send + Sync + 'a,
    ) -> Self {
        self.describe = Some(Box::new(f));
        self
    }

    /// `dirty_tracker` calls `f` instead (to wrap the wrapped VM's own
    /// tracker, say: a slow `stop`, a `sync` that loses pages).
    pub fn on_dirty_tracker(
        mut self,
        f: impl for<'v> Fn(&'v V) -> Result<Box<dyn DirtyTracker + 'v>, VmError> + Send + Sync + 'a,
    ) -> Self {
        self.dirty_tracker = Some(Box::new(f));
        self
    }

    /// `pause` calls `f` instead.
    pub fn on_pause(mut self, f: impl Fn(&V) -> Result<(), VmError> + Send + Sync + 'a) -> Self {
        self.pause = Some(Box::new(f));
        self
    }

    /// `resume` calls `f` instead.
    pub fn on_resume(mut self, f: impl Fn(&V) -> Result<(), VmError> + Send + Sync + 'a) -> Self {
        self.resume = Some(Box::new(f));
        self
    }

    /// `save_state` calls `f` instead.
    pub fn on_save_state(
        mut self,
        f: impl Fn(&V) -> Result<Vec<Section>, VmError> + Send + Sync + 'a,
    ) -> Self {
        self.save_state = Some(Box::new(f));
        self
    }

    /// `throttle` returns `None`: the VM cannot be throttled, whatever `V`
    /// can do.
    pub fn without_throttle(mut self) -> Self {
        self.throttle = false;
        self
    }
}

/// Calls `hook` if there is one, else `inner`.
fn call<V, T>(
    vm: &V,
    hook: &Option<Hook<'_, V, T>>,
    inner: impl FnOnce(&V) -> Result<T, VmError>,
) -> Result<T, VmError> {
    match hook {
        Some(f) => f(vm),
        None => inner(vm),
    }
}

impl<V: SourceVm> SourceVm for HookedVm<'_, V> {
    fn memory(&self) -> &dyn GuestMemory {
        self.vm.memory()
    }
    fn describe(&self) -> Result<VmDescription, VmError> {
        call(&self.vm, &self.describe, V::describe)
    }
    fn dirty_tracker(&self) -> Result<Box<dyn DirtyTracker + '_>, VmError> {
        match &self.dirty_tracker {
            Some(f) => f(&self.vm),
            None => self.vm.dirty_tracker(),
        }
    }
    fn pause(&self) -> Result<(), VmError> {
        call(&self.vm, &self.pause, V::pause)
    }
    fn resume(&self) -> Result<(), VmError> {
        call(&self.vm, &self.resume, V::resume)
    }
    fn is_paused(&self) -> bool {
        self.vm.is_paused()
    }
    fn save_state(&self) -> Result<Vec<Section>, VmError> {
        call(&self.vm, &self.save_state, V::save_state)
    }
    fn throttle(&self) -> Option<&dyn VcpuThrottle> {
        if self.throttle {
            self.vm.throttle()
        } else {
            None
        }
    }
}
