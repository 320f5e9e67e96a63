//! Post-copy in refvmm (see docs/postcopy.md, "refvmm"): the second
//! (fault) connection on both sides and the destination's userfaultfd
//! installer.
//!
//! The fault connection goes to the destination's one listener (`--listen`,
//! the same endpoint as the control connection): the source opens it right
//! after the control connection and sends [`FAULT_MAGIC`] first. The
//! destination accepts it lazily, the first time the engine uses it (after
//! `Go`), and drops any connection that does not start with the magic. The
//! magic tells the fault connection from a stray; it is not a secret (this
//! build refuses post-copy over TLS, and TLS is what keeps attackers out).

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use livemig::destination::postcopy::PostcopyMemory;
use livemig::memory::{Backing, MemoryLayout, PAGE_SIZE};
use livemig::transport::{connect, Endpoint, Listener, StreamAcceptor, Transport};
use livemig::vm::{DestinationVm, VmError};
use livemig_uffd::{HostRegion, UffdPager};

/// The first bytes the source sends on the fault connection.
pub(crate) const FAULT_MAGIC: [u8; 16] = *b"livemig-fault/1\n";

/// How long the destination waits for the fault connection once it needs
/// it (the source opened it at the start: it is in the listen backlog).
const FAULT_ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The source's side: connects to `endpoint` and identifies the
/// connection as the fault connection.
pub(crate) fn open_fault(endpoint: &Endpoint) -> Result<Box<dyn Transport>, String> {
    let timeout = Some(Duration::from_secs(10));
    let mut t = connect(endpoint, timeout)
        .map_err(|e| format!("opening the post-copy fault connection to {endpoint}: {e}"))?;
    t.write_all(&FAULT_MAGIC)
        .and_then(|_| t.flush())
        .map_err(|e| format!("opening the post-copy fault connection to {endpoint}: {e}"))?;
    Ok(t)
}

/// The page-stream acceptor of a destination that also accepts the fault
/// connection from the same listener: `close` only gives up this handle
/// (the listener closes once the fault connection is accepted too, or the
/// migration ends).
pub(crate) struct SharedAcceptor(pub(crate) Option<Arc<Listener>>);

impl StreamAcceptor for SharedAcceptor {
    fn accept_stream(&mut self, timeout: Duration) -> io::Result<Box<dyn Transport>> {
        let l = self
            .0
            .as_ref()
            .ok_or_else(|| io::Error::other("the listener is closed"))?;
        l.accept_timeout(timeout).map_err(|e| {
            let kind = if e.is_timeout() {
                io::ErrorKind::TimedOut
            } else {
                io::ErrorKind::Other
            };
            io::Error::new(kind, e.to_string())
        })
    }

    fn close(&mut self) {
        self.0 = None;
    }
}

/// What the clones of a [`LazyFault`] share.
struct Lazy {
    listener: Mutex<Option<Arc<Listener>>>,
    conn: Mutex<Option<Box<dyn Transport>>>,
    shut: AtomicBool,
}

/// The destination's fault connection, accepted from the listener the
/// first time it is read or written (the engine uses it only after `Go`).
pub(crate) struct LazyFault {
    shared: Arc<Lazy>,
    mine: Option<Box<dyn Transport>>,
    read_timeout: Option<Option<Duration>>,
    write_timeout: Option<Option<Duration>>,
}

impl LazyFault {
    /// A fault connection to be accepted from `listener`.
    pub(crate) fn new(listener: Arc<Listener>) -> Self {
        LazyFault {
            shared: Arc::new(Lazy {
                listener: Mutex::new(Some(listener)),
                conn: Mutex::new(None),
                shut: AtomicBool::new(false),
            }),
            mine: None,
            read_timeout: None,
            write_timeout: None,
        }
    }

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This handle's connection, accepting it first if nobody has.
    fn conn(&mut self) -> io::Result<&mut Box<dyn Transport>> {
        if self.mine.is_none() {
            let mut conn = Self::lock(&self.shared.conn);
            if conn.is_none() {
                *conn = Some(self.accept()?);
            }
            let mut t = conn
                .as_ref()
                .ok_or_else(|| io::Error::other("no fault connection"))?
                .try_clone()?;
            drop(conn);
            if let Some(rt) = self.read_timeout {
                t.set_read_timeout(rt)?;
            }
            if let Some(wt) = self.write_timeout {
                t.set_write_timeout(wt)?;
            }
            self.mine = Some(t);
        }
        self.mine
            .as_mut()
            .ok_or_else(|| io::Error::other("no fault connection"))
    }

    /// Accepts connections until one starts with [`FAULT_MAGIC`]; then
    /// closes the listener.
    fn accept(&self) -> io::Result<Box<dyn Transport>> {
        let listener = Self::lock(&self.shared.listener)
            .take()
            .ok_or_else(|| io::Error::other("the fault connection's listener is closed"))?;
        let deadline = Instant::now() + FAULT_ACCEPT_TIMEOUT;
        loop {
            if self.shared.shut.load(Ordering::SeqCst) {
                return Err(io::Error::other("the fault connection was shut down"));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the source did not open the post-copy fault connection",
                ));
            }
            let mut t = match listener.accept_timeout(Duration::from_millis(50)) {
                Ok(t) => t,
                Err(e) if e.is_timeout() => continue,
                Err(e) => return Err(io::Error::other(e.to_string())),
            };
            let mut magic = [0u8; 16];
            let ok = t
                .set_read_timeout(Some(Duration::from_secs(1)))
                .and_then(|_| t.read_exact(&mut magic))
                .is_ok();
            if ok && magic == FAULT_MAGIC {
                t.set_read_timeout(None)?;
                return Ok(t);
            }
            eprintln!(
                "refvmm: dropped a connection from {} that is not the fault connection",
                t.peer()
            );
        }
    }
}

impl Read for LazyFault {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.conn()?.read(buf)
    }
}

impl Write for LazyFault {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.conn()?.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.conn()?.flush()
    }
}

impl Transport for LazyFault {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.read_timeout = Some(timeout);
        match self.mine.as_mut() {
            Some(t) => t.set_read_timeout(timeout),
            None => Ok(()),
        }
    }

    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.write_timeout = Some(timeout);
        match self.mine.as_mut() {
            Some(t) => t.set_write_timeout(timeout),
            None => Ok(()),
        }
    }

    fn shutdown(&self) -> io::Result<()> {
        self.shared.shut.store(true, Ordering::SeqCst);
        match Self::lock(&self.shared.conn).as_ref() {
            Some(t) => t.shutdown(),
            None => Ok(()),
        }
    }

    fn peer(&self) -> String {
        match Self::lock(&self.shared.conn).as_ref() {
            Some(t) => t.peer(),
            None => "the post-copy fault connection (not accepted yet)".into(),
        }
    }

    fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(LazyFault {
            shared: self.shared.clone(),
            mine: None,
            read_timeout: self.read_timeout,
            write_timeout: self.write_timeout,
        }))
    }
}

/// The userfaultfd installer over `vm`'s memory. Private anonymous memory
/// only: a `MAP_SHARED` memfd (`--memory-backend memfd`) is refused (refvmm
/// does not even grant post-copy with it; see `grants_postcopy`).
pub(crate) fn uffd_pager<V: DestinationVm>(
    vm: &V,
    layout: &MemoryLayout,
) -> Result<Box<dyn PostcopyMemory>, VmError> {
    let memory = vm.memory();
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
    // SAFETY: the regions are the VM's private anonymous mappings (checked
    // above), which live as long as the VM; the engine drops the pager
    // before it hands the VM back, and only the pager populates the
    // missing pages after `arm`.
    let pager = unsafe { UffdPager::new(host) }.map_err(|e| VmError::Create(e.to_string()))?;
    Ok(Box::new(pager))
}
