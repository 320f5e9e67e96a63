//! [`DuplexTransport`]: a [`Transport`] from a reader, a writer and a way
//! to abort them — for links that are not sockets (RDMA, vsock, a QUIC
//! stream, a pipe pair).
//!
//! Such a link usually has a receive half and a send half, and some way to
//! tear the connection down (close the QUIC stream, disconnect the queue
//! pair), but no read or write timeouts and no `dup`. The adapter adds
//! what the engine asks of a [`Transport`] on top, without asking the
//! halves for anything but [`Read`], [`Write`] and the abort:
//!
//! * reads: a pump thread reads the receive half into a bounded queue (16
//!   chunks of at most 64 KiB); a read waits on the queue for at most the
//!   read timeout, so a timed-out read loses nothing and the connection
//!   stays usable (the engine resumes the partial frame);
//! * writes: a watchdog thread calls the abort when a write or flush takes
//!   longer than the write timeout; the write then fails with
//!   [`io::ErrorKind::TimedOut`] (a timed-out write leaves the stream at an
//!   unknown position, so the connection is abandoned, as with a socket);
//! * [`Transport::shutdown`]: the abort, and every later read sees end of
//!   file, every later write fails;
//! * [`Transport::try_clone`]: another handle on the same halves.
//!
//! Dropping the last handle calls the abort too, which must make a read or
//! write blocked in the halves return: the pump thread then ends.
//!
//! ```
//! use std::os::unix::net::UnixStream;
//! use livemig::transport::duplex::DuplexTransport;
//! use livemig::transport::Transport;
//!
//! // Any Read + Write halves and an abort that unblocks them.
//! let (mine, _theirs) = UnixStream::pair()?;
//! let reader = mine.try_clone()?;
//! let closer = mine.try_clone()?;
//! let t = DuplexTransport::new(reader, mine, move || {
//!     let _ = closer.shutdown(std::net::Shutdown::Both);
//! }, "pair:0")?;
//! let _boxed: Box<dyn Transport> = Box::new(t);
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io::{self, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::Transport;

/// Largest chunk the pump thread reads at once.
const CHUNK: usize = 64 << 10;
/// Chunks queued before the pump thread waits for the engine.
const QUEUE: usize = 16;

/// Tears a connection down so that a read or write blocked on either half
/// returns (with end of file or an error). Called from any thread, maybe
/// more than once.
pub trait Abort: Send + Sync {
    /// Tears the connection down.
    fn abort(&self);
}

impl<F: Fn() + Send + Sync> Abort for F {
    fn abort(&self) {
        self()
    }
}

/// What the pump thread queues.
enum Chunk {
    Data(Vec<u8>),
    /// End of file (or a wake-up after a shutdown).
    End,
    Failed(io::Error),
}

/// The receive side of all handles: the queue and the chunk being read.
struct Rx {
    queue: Receiver<Chunk>,
    buf: Vec<u8>,
    pos: usize,
    /// The pump ended: `None` for end of file, else the error's kind.
    ended: Option<Option<io::ErrorKind>>,
}

/// The write watchdog's state.
#[derive(Default)]
struct Watch {
    /// The running write's deadline.
    deadline: Option<Instant>,
    /// The deadline passed during a write (the abort was called).
    fired: bool,
    /// The last handle is gone: the watchdog ends.
    stop: bool,
}

struct WatchShared {
    watch: Mutex<Watch>,
    cv: Condvar,
}

struct Inner {
    rx: Mutex<Rx>,
    tx: Mutex<Box<dyn Write + Send>>,
    wake: Sender<Chunk>,
    abort: Arc<dyn Abort>,
    closed: AtomicBool,
    watch: Arc<WatchShared>,
    peer: String,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.abort.abort();
        lock(&self.watch.watch).stop = true;
        self.watch.cv.notify_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A [`Transport`] over a reader, a writer and an [`Abort`]. See the
/// [module documentation](self).
pub struct DuplexTransport {
    inner: Arc<Inner>,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

impl std::fmt::Debug for DuplexTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DuplexTransport")
            .field("peer", &self.inner.peer)
            .finish()
    }
}

impl DuplexTransport {
    /// A transport reading `reader`, writing `writer`, torn down by
    /// `abort`; `peer` names the other end in error messages. Starts the
    /// pump and watchdog threads (an error if they cannot start).
    pub fn new(
        reader: impl Read + Send + 'static,
        writer: impl Write + Send + 'static,
        abort: impl Abort + 'static,
        peer: impl Into<String>,
    ) -> io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let abort: Arc<dyn Abort> = Arc::new(abort);
        let watch = Arc::new(WatchShared {
            watch: Mutex::new(Watch::default()),
            cv: Condvar::new(),
        });
        let pump_tx = tx.clone();
        std::thread::Builder::new()
            .name("livemig-duplex-rx".into())
            .spawn(move || pump(reader, &pump_tx))?;
        let (w, a) = (watch.clone(), abort.clone());
        let spawned = std::thread::Builder::new()
            .name("livemig-duplex-wd".into())
            .spawn(move || watchdog(&w, &*a));
        if let Err(e) = spawned {
            abort.abort(); // ends the pump
            return Err(e);
        }
        let inner = Inner {
            rx: Mutex::new(Rx {
                queue: rx,
                buf: Vec::new(),
                pos: 0,
                ended: None,
            }),
            tx: Mutex::new(Box::new(writer)),
            wake: tx,
            abort,
            closed: AtomicBool::new(false),
            watch,
            peer: peer.into(),
        };
        Ok(DuplexTransport {
            inner: Arc::new(inner),
            read_timeout: None,
            write_timeout: None,
        })
    }

    /// Runs `op` on the writer under the write timeout.
    fn with_deadline<T>(&self, op: impl FnOnce(&mut dyn Write) -> io::Result<T>) -> io::Result<T> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the connection was shut down",
            ));
        }
        let mut w = lock(&self.inner.tx);
        let shared = &self.inner.watch;
        {
            let mut g = lock(&shared.watch);
            if g.fired {
                return Err(timed_out());
            }
            g.deadline = self.write_timeout.map(|t| Instant::now() + t);
        }
        shared.cv.notify_all();
        let r = op(&mut **w);
        let fired = {
            let mut g = lock(&shared.watch);
            g.deadline = None;
            g.fired
        };
        match r {
            Err(_) if fired => Err(timed_out()),
            r => r,
        }
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "write timed out")
}

/// The pump thread: the receive half into the queue, until end of file, an
/// error, or every handle gone.
fn pump(mut reader: impl Read, tx: &Sender<Chunk>) {
    loop {
        let mut buf = vec![0u8; CHUNK];
        let chunk = match reader.read(&mut buf) {
            Ok(0) => Chunk::End,
            Ok(n) => {
                buf.truncate(n);
                Chunk::Data(buf)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Chunk::Failed(e),
        };
        let last = !matches!(chunk, Chunk::Data(_));
        if tx.send(chunk).is_err() || last {
            return;
        }
    }
}

/// The watchdog thread: aborts the connection when a write outlives its
/// deadline.
fn watchdog(s: &WatchShared, abort: &dyn Abort) {
    let mut g = lock(&s.watch);
    loop {
        if g.stop {
            return;
        }
        match g.deadline {
            Some(d) if Instant::now() >= d => {
                g.fired = true;
                g.deadline = None;
                drop(g);
                log::warn!("a write outlived its timeout: aborting the connection");
                abort.abort();
                g = lock(&s.watch);
            }
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                g =
                    s.cv.wait_timeout(g, left)
                        .map(|r| r.0)
                        .unwrap_or_else(|e| e.into_inner().0);
            }
            None => g = s.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
        }
    }
}

impl Read for DuplexTransport {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let mut rx = lock(&self.inner.rx);
        loop {
            if self.inner.closed.load(Ordering::SeqCst) {
                return Ok(0);
            }
            if rx.pos < rx.buf.len() {
                let n = out.len().min(rx.buf.len() - rx.pos);
                out[..n].copy_from_slice(&rx.buf[rx.pos..rx.pos + n]);
                rx.pos += n;
                return Ok(n);
            }
            match rx.ended {
                Some(None) => return Ok(0),
                Some(Some(kind)) => return Err(io::Error::new(kind, "the connection failed")),
                None => {}
            }
            let next = match self.read_timeout {
                Some(t) => rx.queue.recv_timeout(t),
                None => rx.queue.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match next {
                Ok(Chunk::Data(d)) => {
                    rx.buf = d;
                    rx.pos = 0;
                }
                Ok(Chunk::End) | Err(RecvTimeoutError::Disconnected) => rx.ended = Some(None),
                Ok(Chunk::Failed(e)) => {
                    rx.ended = Some(Some(e.kind()));
                    return Err(e);
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "read timed out"))
                }
            }
        }
    }
}

impl Write for DuplexTransport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.with_deadline(|w| w.write(buf))
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.with_deadline(|w| w.write_vectored(bufs))
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.with_deadline(|w| w.write_all(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.with_deadline(|w| w.flush())
    }
}

fn check_timeout(t: Option<Duration>) -> io::Result<()> {
    if t == Some(Duration::ZERO) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a zero timeout is not allowed",
        ));
    }
    Ok(())
}

impl Transport for DuplexTransport {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        check_timeout(timeout)?;
        self.read_timeout = timeout;
        Ok(())
    }

    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        check_timeout(timeout)?;
        self.write_timeout = timeout;
        Ok(())
    }

    fn shutdown(&self) -> io::Result<()> {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.abort.abort();
        // Wake a reader waiting on an empty queue (a full queue has data,
        // and the reader checks `closed` before taking it).
        let _ = self.inner.wake.try_send(Chunk::End);
        Ok(())
    }

    fn peer(&self) -> String {
        self.inner.peer.clone()
    }

    fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(DuplexTransport {
            inner: self.inner.clone(),
            read_timeout: self.read_timeout,
            write_timeout: self.write_timeout,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::transport::{
        carries_64mib, read_timeout_fires, shutdown_unblocks_reader, write_timeout_fires,
    };
    use std::os::unix::net::UnixStream;

    /// One end of a socket pair, used only as plain halves: the adapter
    /// sets no socket option on it.
    fn duplex(s: UnixStream, name: &str) -> Box<dyn Transport> {
        let reader = s.try_clone().unwrap();
        let closer = s.try_clone().unwrap();
        let abort = move || {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        };
        Box::new(DuplexTransport::new(reader, s, abort, name).unwrap())
    }

    fn pair() -> (Box<dyn Transport>, Box<dyn Transport>) {
        let (a, b) = UnixStream::pair().unwrap();
        (duplex(a, "duplex:a"), duplex(b, "duplex:b"))
    }

    #[test]
    fn duplex_carries_64mib() {
        let (a, b) = pair();
        carries_64mib(a, b);
    }

    #[test]
    fn duplex_read_timeout_fires_and_loses_nothing() {
        let (mut a, b) = pair();
        let mut r = b.try_clone().unwrap();
        read_timeout_fires(a.try_clone().unwrap(), b);
        // The connection is still usable after the timed-out read.
        a.write_all(b"after").unwrap();
        r.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 5];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"after");
    }

    #[test]
    fn duplex_write_timeout_fires() {
        let (a, b) = pair();
        write_timeout_fires(a, b);
    }

    #[test]
    fn duplex_shutdown_unblocks_reader() {
        let (a, b) = pair();
        shutdown_unblocks_reader(a, b);
    }

    #[test]
    fn zero_timeouts_are_refused() {
        let (mut a, _b) = pair();
        assert!(a.set_read_timeout(Some(Duration::ZERO)).is_err());
        assert!(a.set_write_timeout(Some(Duration::ZERO)).is_err());
    }
}
