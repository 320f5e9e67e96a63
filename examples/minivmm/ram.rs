//! Guest memory that minivmm owns: one memfd, mapped `MAP_SHARED` once, at
//! guest-physical 0. The engine sees it through `livemig::memory::GuestMemory`,
//! implemented right here (no vm-memory).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};

use livemig::memory::{Backing, GuestMemory, HostRegion};

/// Errors setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// `memfd_create`, `ftruncate` or `mmap` failed.
    #[error("{0}: {1}")]
    Os(&'static str, std::io::Error),
    /// A write outside guest memory.
    #[error("guest range 0x{0:x}+0x{1:x} is outside RAM")]
    Outside(u64, usize),
    /// The size is zero or not a multiple of 4 KiB.
    #[error("memory size {0} is not a non-zero multiple of 4 KiB")]
    Size(u64),
}

/// The mapping: unmapped on drop.
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
        // mapping any more (the engine borrows the `Ram` that owns this).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Guest RAM: `size` bytes at guest-physical 0.
pub struct Ram {
    mapping: Mapping,
    file: File,
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
        Ok(Ram { mapping, file })
    }

    /// Copies `data` into guest memory at `gpa` (the boot loader's writes,
    /// before the guest runs).
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), RamError> {
        let end = gpa.checked_add(data.len() as u64);
        if end.is_none_or(|e| e > self.size()) {
            return Err(RamError::Outside(gpa, data.len()));
        }
        // SAFETY: gpa..gpa+len lies inside the mapping (checked above).
        unsafe {
            let dst = self.mapping.ptr.add(gpa as usize);
            std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len());
        }
        Ok(())
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

// SAFETY: one region, the whole mapping, which lives (mapped read-write,
// never remapped) as long as `Ram`; mmap returns page-aligned addresses.
// It is a `MAP_SHARED` mapping of `file` from offset 0, which `Ram` keeps
// open, so the engine finds never-written pages with SEEK_DATA/SEEK_HOLE
// and clears a destination's memory by punching holes.
unsafe impl GuestMemory for Ram {
    fn regions(&self) -> Vec<HostRegion<'_>> {
        let (fd, offset) = (self.file.as_fd(), 0);
        let backing = Backing::SharedFile { fd, offset };
        vec![HostRegion::new(0, self.mapping.ptr, self.size(), backing)]
    }

    /// Nothing to add: minivmm's devices never write guest memory (its
    /// serial port has no DMA), and the boot loader writes before dirty
    /// tracking starts.
    fn take_vmm_dirty(&self, _region: usize, _words: &mut [u64]) {}
}
