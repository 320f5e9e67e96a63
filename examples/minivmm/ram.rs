//! Guest memory that minivmm owns: one memfd, mapped `MAP_SHARED` once, at
//! guest-physical 0. The engine sees it through `livemig::memory::GuestRam`
//! (vm-memory), built over this mapping without vm-memory allocating or
//! mapping anything itself.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use livemig::memory::GuestRam;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

/// Errors setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// `memfd_create`, `ftruncate` or `mmap` failed.
    #[error("{0}: {1}")]
    Os(&'static str, std::io::Error),
    /// vm-memory refused the mapping.
    #[error("wrapping the mapping for the engine: {0}")]
    Wrap(String),
    /// The size is zero or not a multiple of 4 KiB.
    #[error("memory size {0} is not a non-zero multiple of 4 KiB")]
    Size(u64),
}

/// The mapping: unmapped on drop. The memfd stays open as long as the
/// `GuestRam` (which holds it through its `FileOffset`) lives.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; this struct only owns the
// right to unmap it, which needs no thread affinity.
unsafe impl Send for Mapping {}
// SAFETY: as above; `Mapping` offers no access through `&self`.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; nothing uses the
        // mapping any more (the GuestRam that borrows it is dropped first,
        // see the field order of `Ram`).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Guest RAM: `size` bytes at guest-physical 0.
pub struct Ram {
    /// The engine's view (declared first: dropped before the mapping).
    pub guest: GuestRam,
    mapping: Mapping,
}

impl Ram {
    /// Creates a memfd of `size` bytes and maps it shared.
    pub fn new(size: u64) -> Result<Ram, RamError> {
        if size == 0 || !size.is_multiple_of(4096) {
            return Err(RamError::Size(size));
        }
        let file = memfd(size)?;
        let len = size as usize;
        // SAFETY: a fresh shared mapping of our own memfd; the result is
        // checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(RamError::Os("mmap", std::io::Error::last_os_error()));
        }
        let mapping = Mapping {
            ptr: ptr.cast(),
            len,
        };
        let guest = wrap(&mapping, file)?;
        Ok(Ram { guest, mapping })
    }

    /// Host address of guest-physical 0.
    pub fn host_addr(&self) -> u64 {
        self.mapping.ptr as u64
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.mapping.len as u64
    }
}

fn memfd(size: u64) -> Result<File, RamError> {
    // SAFETY: the name is a NUL-terminated literal; the result is checked.
    let fd = unsafe { libc::memfd_create(c"minivmm-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(RamError::Os(
            "memfd_create",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| RamError::Os("ftruncate", e))?;
    Ok(file)
}

/// The engine's seam: a one-region `GuestRam` over our mapping. The
/// `FileOffset` and `MAP_SHARED` tell the engine the region is a shared
/// file, so it finds never-written pages with `SEEK_DATA`/`SEEK_HOLE` and
/// clears a destination's memory by punching holes.
fn wrap(m: &Mapping, file: File) -> Result<GuestRam, RamError> {
    let bitmap = AtomicBitmap::with_len(m.len);
    // SAFETY: ptr..ptr+len is one live mapping owned by `Ram`, which drops
    // the GuestRam before it unmaps.
    let region =
        unsafe { MmapRegionBuilder::new_with_bitmap(m.len, bitmap).with_raw_mmap_pointer(m.ptr) }
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::from_arc(Arc::new(file), 0))
            .build()
            .map_err(|e| RamError::Wrap(e.to_string()))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| RamError::Wrap("region wraps around".into()))?;
    GuestRam::from_regions(vec![region]).map_err(|e| RamError::Wrap(e.to_string()))
}
