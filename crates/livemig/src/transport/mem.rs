//! An in-memory [`Transport`] pair for tests.
//!
//! Each direction is a bounded crossbeam channel of byte chunks, so a fast
//! writer blocks once [`CHANNEL_CHUNKS`] chunks of at most [`MAX_CHUNK`] bytes
//! are in flight instead of growing memory without limit.
//!
//! * Dropping every handle of one end gives the other end EOF on read (after
//!   the data already in flight) and `BrokenPipe` on write.
//! * [`Transport::shutdown`] on any handle of either end closes the whole
//!   connection at once: blocked reads return EOF and blocked writes fail with
//!   `BrokenPipe`, on both ends and all clones.
//! * Read and write timeouts return [`io::ErrorKind::TimedOut`].

use std::io::{self, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crossbeam_channel::{bounded, select, Receiver, Sender};

use super::Transport;

/// Largest chunk a single write puts into the channel.
pub const MAX_CHUNK: usize = 256 << 10;
/// Chunks that may be in flight per direction before writers block.
pub const CHANNEL_CHUNKS: usize = 16;

static NEXT_PIPE: AtomicU64 = AtomicU64::new(0);

/// State of the whole connection, shared by both ends.
struct Conn {
    id: u64,
    closed: AtomicBool,
    /// Dropped on shutdown, which wakes every `select!` waiting on the
    /// matching receiver.
    shutdown_tx: Mutex<Option<Sender<()>>>,
}

/// The partially consumed chunk of one end, shared by its clones so that
/// bytes are never lost or reordered when handles change hands.
#[derive(Default)]
struct ReadBuf {
    chunk: Vec<u8>,
    pos: usize,
}

/// State of one end, shared by its clones.
struct End {
    name: &'static str,
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
    read_buf: Mutex<ReadBuf>,
    read_timeout: Mutex<Option<Duration>>,
    write_timeout: Mutex<Option<Duration>>,
}

/// One end of an in-memory pipe. Clones are handles to the same end.
#[derive(Clone)]
pub struct MemTransport {
    conn: Arc<Conn>,
    end: Arc<End>,
    shutdown_rx: Receiver<()>,
}

impl std::fmt::Debug for MemTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemTransport")
            .field("pipe", &self.conn.id)
            .field("end", &self.end.name)
            .finish()
    }
}

/// Creates a connected pair of in-memory transports.
pub fn pair() -> (MemTransport, MemTransport) {
    let (a_tx, b_rx) = bounded(CHANNEL_CHUNKS);
    let (b_tx, a_rx) = bounded(CHANNEL_CHUNKS);
    let (shutdown_tx, shutdown_rx) = bounded(0);
    let conn = Arc::new(Conn {
        id: NEXT_PIPE.fetch_add(1, Ordering::Relaxed),
        closed: AtomicBool::new(false),
        shutdown_tx: Mutex::new(Some(shutdown_tx)),
    });
    let end = |name, tx, rx| {
        Arc::new(End {
            name,
            tx,
            rx,
            read_buf: Mutex::new(ReadBuf::default()),
            read_timeout: Mutex::new(None),
            write_timeout: Mutex::new(None),
        })
    };
    let a = MemTransport {
        conn: conn.clone(),
        end: end("a", a_tx, a_rx),
        shutdown_rx: shutdown_rx.clone(),
    };
    let b = MemTransport {
        conn,
        end: end("b", b_tx, b_rx),
        shutdown_rx,
    };
    (a, b)
}

/// Locks a mutex, ignoring poisoning (the data is plain state that a panic
/// cannot leave inconsistent).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn broken_pipe() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "in-memory pipe closed")
}

fn timed_out(what: &str, t: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("in-memory pipe: {what} timed out after {t:?}"),
    )
}

fn check_timeout(t: Option<Duration>) -> io::Result<()> {
    if t == Some(Duration::ZERO) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cannot set a zero duration timeout",
        ));
    }
    Ok(())
}

impl MemTransport {
    fn is_closed(&self) -> bool {
        self.conn.closed.load(Ordering::Acquire)
    }

    /// Sends one chunk, honouring shutdown and the write timeout.
    fn send_chunk(&self, chunk: Vec<u8>) -> io::Result<()> {
        if self.is_closed() {
            return Err(broken_pipe());
        }
        let tx = &self.end.tx;
        let timeout = *lock(&self.end.write_timeout);
        match timeout {
            None => select! {
                send(tx, chunk) -> r => r.map_err(|_| broken_pipe()),
                recv(self.shutdown_rx) -> _ => Err(broken_pipe()),
            },
            Some(t) => select! {
                send(tx, chunk) -> r => r.map_err(|_| broken_pipe()),
                recv(self.shutdown_rx) -> _ => Err(broken_pipe()),
                default(t) => Err(timed_out("write", t)),
            },
        }
    }
}

impl Read for MemTransport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut rb = lock(&self.end.read_buf);
        loop {
            if self.is_closed() {
                return Ok(0);
            }
            if rb.pos < rb.chunk.len() {
                let n = buf.len().min(rb.chunk.len() - rb.pos);
                buf[..n].copy_from_slice(&rb.chunk[rb.pos..rb.pos + n]);
                rb.pos += n;
                return Ok(n);
            }
            let rx = &self.end.rx;
            let timeout = *lock(&self.end.read_timeout);
            // `None`: shut down; `Some(Err)`: every peer handle is gone.
            let got = match timeout {
                None => select! {
                    recv(rx) -> m => Some(m),
                    recv(self.shutdown_rx) -> _ => None,
                },
                Some(t) => select! {
                    recv(rx) -> m => Some(m),
                    recv(self.shutdown_rx) -> _ => None,
                    default(t) => return Err(timed_out("read", t)),
                },
            };
            match got {
                Some(Ok(chunk)) => {
                    rb.chunk = chunk;
                    rb.pos = 0;
                }
                Some(Err(_)) | None => return Ok(0),
            }
        }
    }
}

impl Write for MemTransport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min(MAX_CHUNK);
        self.send_chunk(buf[..n].to_vec())?;
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let n = total.min(MAX_CHUNK);
        if n == 0 {
            return Ok(0);
        }
        let mut chunk = Vec::with_capacity(n);
        for b in bufs {
            let take = b.len().min(n - chunk.len());
            chunk.extend_from_slice(&b[..take]);
            if chunk.len() == n {
                break;
            }
        }
        self.send_chunk(chunk)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.is_closed() {
            return Err(broken_pipe());
        }
        Ok(())
    }
}

impl Transport for MemTransport {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        check_timeout(timeout)?;
        *lock(&self.end.read_timeout) = timeout;
        Ok(())
    }

    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        check_timeout(timeout)?;
        *lock(&self.end.write_timeout) = timeout;
        Ok(())
    }

    fn shutdown(&self) -> io::Result<()> {
        self.conn.closed.store(true, Ordering::Release);
        // Dropping the only sender disconnects the shutdown channel, which
        // wakes every blocked select! on either end.
        drop(lock(&self.conn.shutdown_tx).take());
        Ok(())
    }

    fn peer(&self) -> String {
        let other = if self.end.name == "a" { "b" } else { "a" };
        format!("mem:{}{}", self.conn.id, other)
    }

    fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(self.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::transport::*;
    use std::time::Instant;

    fn boxed() -> (Box<dyn Transport>, Box<dyn Transport>) {
        let (a, b) = pair();
        (Box::new(a), Box::new(b))
    }

    #[test]
    fn mem_carries_64mib() {
        let (a, b) = boxed();
        carries_64mib(a, b);
    }

    #[test]
    fn mem_both_directions_and_vectored() {
        let (mut a, mut b) = pair();
        let n = a
            .write_vectored(&[IoSlice::new(b"he"), IoSlice::new(b""), IoSlice::new(b"llo")])
            .unwrap();
        assert_eq!(n, 5);
        b.write_all(b"world").unwrap();
        let mut buf = [0u8; 5];
        b.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        a.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"world");
        assert!(a.peer().ends_with('b') && b.peer().ends_with('a'));
    }

    #[test]
    fn mem_read_timeout() {
        let (a, b) = boxed();
        read_timeout_fires(a, b);
    }

    #[test]
    fn mem_write_timeout_and_bounded() {
        let (a, mut b) = pair();
        b.set_write_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let chunk = vec![7u8; MAX_CHUNK];
        let mut sent = 0;
        let e = loop {
            match b.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) => break e,
            }
            assert!(sent <= MAX_CHUNK * (CHANNEL_CHUNKS + 1), "unbounded");
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(sent, MAX_CHUNK * CHANNEL_CHUNKS);
        assert!(b.set_write_timeout(Some(Duration::ZERO)).is_err());
        drop(a);
    }

    #[test]
    fn mem_shutdown_unblocks_reader() {
        let (a, b) = boxed();
        shutdown_unblocks_reader(a, b);
    }

    #[test]
    fn mem_shutdown_unblocks_writer_and_peer() {
        let (mut a, b) = pair();
        let mut w = b.clone();
        let t = std::thread::spawn(move || {
            let chunk = vec![0u8; MAX_CHUNK];
            loop {
                if let Err(e) = w.write(&chunk) {
                    return e.kind();
                }
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        a.shutdown().unwrap();
        assert_eq!(t.join().unwrap(), io::ErrorKind::BrokenPipe);
        let mut buf = [0u8; 4];
        assert_eq!(a.read(&mut buf).unwrap(), 0);
        assert_eq!(a.write(&buf).unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        drop(b);
    }

    #[test]
    fn mem_drop_gives_eof_after_data() {
        let (mut a, mut b) = pair();
        a.write_all(b"tail").unwrap();
        drop(a);
        let mut v = Vec::new();
        b.read_to_end(&mut v).unwrap();
        assert_eq!(v, b"tail");
        assert_eq!(b.write(b"x").unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn mem_clones_share_partial_chunk() {
        let (mut a, mut b) = pair();
        a.write_all(b"abcdef").unwrap();
        let mut c = b.try_clone().unwrap();
        let mut two = [0u8; 2];
        b.read_exact(&mut two).unwrap();
        assert_eq!(&two, b"ab");
        drop(b);
        let mut four = [0u8; 4];
        c.read_exact(&mut four).unwrap();
        assert_eq!(&four, b"cdef");
        // A timeout set on one clone applies to the connection end.
        c.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        let t0 = Instant::now();
        assert_eq!(
            c.read(&mut two).unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}

/// The source's half of [`streams`]: each [`StreamOpener::open`](super::StreamOpener::open) makes a new
/// in-memory pair and hands the other end to the [`MemAcceptor`].
#[derive(Debug, Clone)]
pub struct MemOpener {
    tx: crossbeam_channel::Sender<MemTransport>,
}

/// The destination's half of [`streams`].
#[derive(Debug)]
pub struct MemAcceptor {
    rx: Option<crossbeam_channel::Receiver<MemTransport>>,
}

/// A connected opener/acceptor pair for multi-stream migrations in one
/// process (tests, examples).
pub fn streams() -> (MemOpener, MemAcceptor) {
    let (tx, rx) = crossbeam_channel::unbounded();
    (MemOpener { tx }, MemAcceptor { rx: Some(rx) })
}

impl super::StreamOpener for MemOpener {
    fn open(&mut self) -> io::Result<Box<dyn super::Transport>> {
        let (a, b) = pair();
        self.tx
            .send(b)
            .map_err(|_| io::Error::new(io::ErrorKind::ConnectionRefused, "acceptor closed"))?;
        Ok(Box::new(a))
    }
}

impl super::StreamAcceptor for MemAcceptor {
    fn accept_stream(&mut self, timeout: Duration) -> io::Result<Box<dyn super::Transport>> {
        let rx = self
            .rx
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "acceptor closed"))?;
        match rx.recv_timeout(timeout) {
            Ok(t) => Ok(Box::new(t)),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no stream connected in time",
            )),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "opener dropped",
            )),
        }
    }

    fn close(&mut self) {
        self.rx = None;
    }
}
