//! Post-copy in refvmm (see docs/postcopy.md, "refvmm"): the second
//! (fault) connection on both sides and the destination's userfaultfd
//! installer.
//!
//! The fault connection goes to the destination's one listener (`--listen`,
//! the same endpoint as the control connection): a source asking for
//! post-copy opens it *first*, sends [`FAULT_MAGIC`] and the migration's
//! resume token ([`crate::postcopy_resume`]) on it, then opens the control
//! connection. The destination reads the first 16 bytes of the
//! first connection it accepts: the magic makes it the fault connection
//! (and the next one the control connection), anything else is the control
//! connection (those bytes are the header of `Hello`, replayed to the
//! engine). The listener then closes after the handshake as before, so a
//! connection attempt during a migration is still refused. The magic tells
//! the fault connection from the control connection; it is not a secret
//! (this build refuses post-copy over TLS, and TLS is what keeps attackers
//! out).

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use livemig::destination::postcopy::PostcopyMemory;
use livemig::memory::{Backing, GuestMemory, MemoryLayout, PAGE_SIZE};
use livemig::transport::{connect, Endpoint, Transport};
use livemig::vm::VmError;
use livemig_uffd::{HostRegion, UffdPager};

use crate::postcopy_resume::Token;

/// The first bytes the source sends on the fault connection; the
/// migration's resume token follows.
pub(crate) const FAULT_MAGIC: [u8; 16] = *b"livemig-fault/2\n";
/// The first build's fault connection (no token follows): a source of that
/// build migrates, but cannot resume.
const FAULT_MAGIC_V1: [u8; 16] = *b"livemig-fault/1\n";

/// The source's side, before the control connection: connects to
/// `endpoint` and identifies the connection as the fault connection of the
/// migration `token` names.
pub(crate) fn open_fault(endpoint: &Endpoint, token: &Token) -> Result<Box<dyn Transport>, String> {
    let timeout = Some(Duration::from_secs(10));
    let mut t = connect(endpoint, timeout)
        .map_err(|e| format!("opening the post-copy fault connection to {endpoint}: {e}"))?;
    let mut head = FAULT_MAGIC.to_vec();
    head.extend_from_slice(token);
    t.write_all(&head)
        .and_then(|_| t.flush())
        .map_err(|e| format!("opening the post-copy fault connection to {endpoint}: {e}"))?;
    Ok(t)
}

/// The first connection a destination accepted: the fault connection of
/// a post-copy source (which opens it before the control connection), or
/// the control connection.
pub(crate) enum First {
    /// It started with [`FAULT_MAGIC`] (and the token, `None` from a
    /// source of the first build); the control connection follows.
    Fault(Box<dyn Transport>, Option<Token>),
    /// Anything else: the control connection, with the bytes read to tell
    /// replayed to the engine.
    Control(Box<dyn Transport>),
}

/// Reads the first 16 bytes of a new connection (the source sends them at
/// once: the magic, or the header of `Hello`) and tells which it is.
pub(crate) fn classify(mut t: Box<dyn Transport>) -> Result<First, String> {
    let mut head = [0u8; 16];
    t.set_read_timeout(Some(Duration::from_secs(10)))
        .and_then(|_| t.read_exact(&mut head))
        .and_then(|_| t.set_read_timeout(None))
        .map_err(|e| format!("reading the first bytes from {}: {e}", t.peer()))?;
    if head == FAULT_MAGIC_V1 {
        return Ok(First::Fault(t, None));
    }
    if head == FAULT_MAGIC {
        let mut token = [0u8; 16];
        t.set_read_timeout(Some(Duration::from_secs(10)))
            .and_then(|_| t.read_exact(&mut token))
            .and_then(|_| t.set_read_timeout(None))
            .map_err(|e| format!("reading the post-copy token from {}: {e}", t.peer()))?;
        return Ok(First::Fault(t, Some(token)));
    }
    Ok(First::Control(Box::new(Replay {
        head: Arc::new(Mutex::new(head.to_vec())),
        inner: t,
    })))
}

/// A connection whose first bytes were read already: reads return them
/// first (shared by the clones: whichever reads first gets them).
struct Replay {
    head: Arc<Mutex<Vec<u8>>>,
    inner: Box<dyn Transport>,
}

impl Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
        if head.is_empty() {
            drop(head);
            return self.inner.read(buf);
        }
        let n = head.len().min(buf.len());
        buf[..n].copy_from_slice(&head[..n]);
        head.drain(..n);
        Ok(n)
    }
}

impl Write for Replay {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Transport for Replay {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.inner.set_read_timeout(timeout)
    }

    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.inner.set_write_timeout(timeout)
    }

    fn shutdown(&self) -> io::Result<()> {
        self.inner.shutdown()
    }

    fn peer(&self) -> String {
        self.inner.peer()
    }

    fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(Replay {
            head: self.head.clone(),
            inner: self.inner.try_clone()?,
        }))
    }
}

/// The userfaultfd installer over the new VM's guest memory (the pager of
/// `Reception::postcopy`, which passes the VM's `DestinationVm::memory`).
/// Private anonymous memory only: a `MAP_SHARED` memfd (`--memory-backend
/// memfd`) is refused (refvmm does not even grant post-copy with it: see
/// `cmd_receive`).
pub(crate) fn uffd_pager(
    memory: &dyn GuestMemory,
    layout: &MemoryLayout,
) -> Result<Box<dyn PostcopyMemory>, VmError> {
    let regions = memory.regions();
    if regions.len() != layout.regions().len() {
        return Err(VmError::Create(format!(
            "post-copy: guest memory has {} regions, the layout {}",
            regions.len(),
            layout.regions().len()
        )));
    }
    let mut host = Vec::with_capacity(regions.len());
    for r in &regions {
        if !matches!(r.backing, Backing::PrivateAnonymous) {
            return Err(VmError::Create(
                "post-copy needs private anonymous guest memory (--memory-backend anonymous); \
                 a shared memfd mapping is not supported by the userfaultfd installer"
                    .into(),
            ));
        }
        host.push(HostRegion {
            addr: r.host as usize,
            pages: r.len / PAGE_SIZE,
        });
    }
    // SAFETY: the regions are the new VM's private anonymous mappings
    // (checked above; `Reception::postcopy` passes that VM's memory), which
    // live as long as the VM; the engine drops the pager before it hands
    // the VM back, and only the pager populates the missing pages after
    // `arm`.
    let pager = unsafe { UffdPager::new(host) }.map_err(|e| VmError::Create(e.to_string()))?;
    Ok(Box::new(pager))
}
