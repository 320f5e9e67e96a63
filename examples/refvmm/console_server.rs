//! `--console unix:PATH`: the guest's serial console on a Unix socket, and
//! a session that follows the guest when it migrates.
//!
//! How a session survives a migration (protocol in [`crate::console_proto`]):
//!
//! * The VMM keeps the guest's output in a [`ConsoleLog`] (the last
//!   [`KEEP_BYTES`] bytes, numbered from 0 = the first byte the guest wrote
//!   on this VMM) and streams it to the attached client.
//! * Input from the client goes into the UART's receive FIFO only while the
//!   machine runs (never once it is paused for a migration, see
//!   `Machine::console_input`); the VMM acknowledges how many input bytes
//!   the UART took, and the client keeps the rest.
//! * When the migration completes the guest's output here is final (its
//!   vCPUs stopped before the state was saved). The VMM sends everything
//!   the client has not seen, then `Moved(n)`: `n` input bytes reached the
//!   guest here (they are in the UART's FIFO, which migrates, or were read
//!   by the guest); the rest did not.
//! * `refvmm receive --console unix:PATH` with the *same* PATH binds a
//!   temporary socket next to it and renames it over PATH when the guest
//!   resumes there (before the source learns that the migration completed).
//!   The client reattaches to PATH asking for the destination's output from
//!   offset 0 and sends its unacknowledged input again. Nothing is lost and
//!   nothing is delivered twice, in either direction.
//!
//! PATH is a host-local socket: the session follows a guest between VMMs
//! that share the path (the same host, as in the tests); across hosts the
//! client would need a relay to the destination host's PATH.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use livemig_kvm::serial::SerialOutput;

use crate::console_proto::{Decoder, Frame, ProtoError, FROM_NOW, MAX_PAYLOAD};
pub use crate::socket_path::Listener;
use crate::vmm::Machine;

/// Guest output kept for a client that attaches (or reattaches after a
/// migration) later: the last 1 MiB.
pub const KEEP_BYTES: usize = 1 << 20;
/// How long a connection waits for its attach frame.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(5);
/// Read timeout of a connection: the pace at which it checks for output.
const POLL: Duration = Duration::from_millis(2);
/// A client that does not take output for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Input read from a client but not yet taken by the UART, at most.
const MAX_PENDING_INPUT: usize = 4096;

/// Parses `--console unix:PATH`.
pub fn parse_console(spec: &str) -> Result<PathBuf, String> {
    match spec.strip_prefix("unix:") {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err(format!("--console '{spec}': expected unix:<PATH>")),
    }
}

/// What the connections are told to do.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// The guest runs (or is paused) here.
    Here,
    /// The guest migrated away: send the rest of the output, then `Moved`.
    Left,
    /// The VMM exits: send the rest of the output, then `End`.
    Closing(String),
}

struct LogState {
    buf: VecDeque<u8>,
    /// Offset of `buf[0]`.
    start: u64,
    phase: Phase,
    /// Id of the newest connection (older ones are told to leave).
    newest: u64,
    /// Connections still being served.
    live: usize,
}

/// The guest's console output on this VMM, and the session's phase.
pub struct ConsoleLog {
    state: Mutex<LogState>,
    idle: Condvar,
}

impl Default for ConsoleLog {
    fn default() -> Self {
        ConsoleLog {
            state: Mutex::new(LogState {
                buf: VecDeque::new(),
                start: 0,
                phase: Phase::Here,
                newest: 0,
                live: 0,
            }),
            idle: Condvar::new(),
        }
    }
}

impl ConsoleLog {
    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records guest output (the oldest bytes beyond [`KEEP_BYTES`] go).
    pub fn append(&self, bytes: &[u8]) {
        let mut s = self.lock();
        s.buf.extend(bytes);
        let over = s.buf.len().saturating_sub(KEEP_BYTES);
        if over > 0 {
            s.buf.drain(..over);
            s.start += over as u64;
        }
    }

    /// Offset one past the last byte written.
    fn end(s: &LogState) -> u64 {
        s.start + s.buf.len() as u64
    }

    /// Where a client asking for `from` starts, and how many bytes it
    /// asked for that are no longer kept.
    fn clamp(&self, from: u64) -> (u64, u64) {
        let s = self.lock();
        if from == FROM_NOW || from > Self::end(&s) {
            return (Self::end(&s), 0);
        }
        if from < s.start {
            return (s.start, s.start - from);
        }
        (from, 0)
    }

    /// Up to [`MAX_PAYLOAD`] bytes from `pos`; the new position and any
    /// bytes skipped because they were no longer kept.
    fn read_from(&self, pos: u64) -> (Vec<u8>, u64, u64) {
        let s = self.lock();
        let (pos, lost) = if pos < s.start {
            (s.start, s.start - pos)
        } else {
            (pos, 0)
        };
        let skip = usize::try_from(pos - s.start).unwrap_or(usize::MAX);
        let bytes: Vec<u8> = s.buf.iter().skip(skip).take(MAX_PAYLOAD).copied().collect();
        let next = pos + bytes.len() as u64;
        (bytes, next, lost)
    }

    /// The guest migrated away: every client is sent the rest of the output
    /// and told to follow it.
    pub fn guest_left(&self) {
        self.lock().phase = Phase::Left;
    }

    /// The VMM exits: every client gets the rest of the output and `reason`
    /// (unless the guest left, which they are told instead). Then waits up
    /// to `timeout` for the connections to finish.
    pub fn close(&self, reason: &str, timeout: Duration) {
        let mut s = self.lock();
        if s.phase == Phase::Here {
            s.phase = Phase::Closing(reason.to_string());
        }
        let deadline = Instant::now() + timeout;
        while s.live > 0 {
            let now = Instant::now();
            if now >= deadline {
                log::warn!("console: {} client(s) still being served at exit", s.live);
                return;
            }
            s = self
                .idle
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn phase(&self) -> Phase {
        self.lock().phase.clone()
    }

    /// Registers a new connection; it becomes the newest.
    fn connected(&self) -> u64 {
        let mut s = self.lock();
        s.newest += 1;
        s.live += 1;
        s.newest
    }

    fn is_newest(&self, id: u64) -> bool {
        self.lock().newest == id
    }

    fn disconnected(&self) {
        let mut s = self.lock();
        s.live = s.live.saturating_sub(1);
        self.idle.notify_all();
    }
}

/// The UART's output sink with `--console`: every byte goes to the
/// [`ConsoleLog`] and to the `--serial` output.
struct Tee {
    log: Arc<ConsoleLog>,
    other: Box<dyn Write + Send>,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.log.append(buf);
        // The console has the bytes; a failing --serial output must not
        // make the UART retry them.
        if let Err(e) = self.other.write_all(buf) {
            log::debug!("serial output: {e}");
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.other.flush()
    }
}

/// The serial output for a machine with a console: `serial` as
/// `SerialDevice::new` would open it, teed into `log`.
pub fn teed_output(serial: SerialOutput, log: Arc<ConsoleLog>) -> io::Result<SerialOutput> {
    let other: Box<dyn Write + Send> = match serial {
        // One write(2) per byte, as SerialDevice does for stdout.
        SerialOutput::Stdout => Box::new(File::from(io::stdout().as_fd().try_clone_to_owned()?)),
        SerialOutput::File(path) => Box::new(File::create(path)?),
        SerialOutput::None => Box::new(io::sink()),
        SerialOutput::Writer(w) => w,
    };
    Ok(SerialOutput::Writer(Box::new(Tee { log, other })))
}

/// Starts accepting console clients on `listener` for `machine`.
pub fn serve(
    listener: &Listener,
    log: Arc<ConsoleLog>,
    machine: Weak<Machine>,
) -> Result<(), String> {
    let accept = listener.try_clone()?;
    let path = listener.path().to_path_buf();
    std::thread::Builder::new()
        .name("console-accept".into())
        .spawn(move || {
            for conn in accept.incoming() {
                let Ok(conn) = conn else { continue };
                let id = log.connected();
                let (log, machine) = (log.clone(), machine.clone());
                let spawned = std::thread::Builder::new()
                    .name("console".into())
                    .spawn(move || {
                        if let Err(e) = Session::new(conn, &log, id).run(&machine) {
                            log::info!("console client {id}: {e}");
                        }
                        log.disconnected();
                    });
                if let Err(e) = spawned {
                    log::warn!("console on {}: {e}", path.display());
                }
            }
        })
        .map(|_| ())
        .map_err(|e| format!("console thread: {e}"))
}

/// One client connection.
struct Session<'a> {
    conn: UnixStream,
    log: &'a ConsoleLog,
    id: u64,
    decoder: Decoder,
    /// Next output offset to send.
    pos: u64,
    /// Input read but not yet taken by the UART.
    pending: VecDeque<u8>,
    /// Input bytes of this connection the UART took.
    consumed: u64,
}

impl<'a> Session<'a> {
    fn new(conn: UnixStream, log: &'a ConsoleLog, id: u64) -> Self {
        Session {
            conn,
            log,
            id,
            decoder: Decoder::default(),
            pos: 0,
            pending: VecDeque::new(),
            consumed: 0,
        }
    }

    fn send(&mut self, frame: &Frame) -> Result<(), ProtoError> {
        frame.write_to(&mut self.conn)
    }

    /// Waits for the client's attach frame; returns its offset.
    fn attach(&mut self) -> Result<u64, ProtoError> {
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            match self.decoder.next_frame()? {
                Some(Frame::Attach(from)) => return Ok(from),
                Some(other) => {
                    return Err(ProtoError::Io(io::Error::other(format!(
                        "expected an attach frame, got {other:?}"
                    ))))
                }
                None => {}
            }
            if Instant::now() > deadline || !self.decoder.fill(&mut self.conn)? {
                return Err(ProtoError::Io(io::Error::other("no attach frame")));
            }
        }
    }

    /// Sends all output from `pos` to the current end.
    fn send_output(&mut self) -> Result<(), ProtoError> {
        loop {
            let (bytes, next, lost) = self.log.read_from(self.pos);
            if lost > 0 {
                log::warn!(
                    "console client {}: {lost} output bytes were not kept",
                    self.id
                );
            }
            self.pos = next;
            if bytes.is_empty() {
                return Ok(());
            }
            self.send(&Frame::Output(bytes))?;
        }
    }

    /// Reads what the client sent (waiting at most [`POLL`]); `false` at
    /// end of file.
    fn read_input(&mut self) -> Result<bool, ProtoError> {
        if self.pending.len() >= MAX_PENDING_INPUT {
            std::thread::sleep(POLL);
            return Ok(true);
        }
        let open = self.decoder.fill(&mut self.conn)?;
        while let Some(frame) = self.decoder.next_frame()? {
            match frame {
                Frame::Input(bytes) => self.pending.extend(bytes),
                other => log::debug!("console client {}: ignored {other:?}", self.id),
            }
        }
        Ok(open)
    }

    /// Puts pending input into the UART, as much as it takes now.
    fn feed(&mut self, machine: &Weak<Machine>) -> Result<(), ProtoError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let Some(m) = machine.upgrade() else {
            return Ok(());
        };
        let bytes: Vec<u8> = self.pending.iter().take(64).copied().collect();
        let took = m.console_input(&bytes).map_err(io::Error::other)?;
        if took > 0 {
            self.pending.drain(..took);
            self.consumed += took as u64;
            self.send(&Frame::Ack(self.consumed))?;
        }
        Ok(())
    }

    fn run(mut self, machine: &Weak<Machine>) -> Result<(), ProtoError> {
        self.conn.set_read_timeout(Some(POLL))?;
        self.conn.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let from = self.attach()?;
        if self.log.phase() == Phase::Left {
            // A client following the guest reached this VMM before the new
            // one took the path over: none of the output here is for it.
            return self.send(&Frame::Moved(0));
        }
        let (start, lost) = self.log.clamp(from);
        self.pos = start;
        self.send(&Frame::Welcome { start, lost })?;
        loop {
            // The phase first: once it is not `Here`, the output is final.
            let phase = self.log.phase();
            self.send_output()?;
            match phase {
                Phase::Left => return self.send(&Frame::Moved(self.consumed)),
                Phase::Closing(reason) => return self.send(&Frame::End(reason)),
                Phase::Here => {}
            }
            if !self.log.is_newest(self.id) {
                return self.send(&Frame::End("another client attached".into()));
            }
            if !self.read_input()? {
                return Ok(());
            }
            self.feed(machine)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keeps_the_tail_and_counts_what_it_dropped() {
        let log = ConsoleLog::default();
        log.append(b"hello");
        assert_eq!(log.clamp(0), (0, 0));
        assert_eq!(log.clamp(FROM_NOW), (5, 0));
        assert_eq!(log.clamp(99), (5, 0));
        let (bytes, next, lost) = log.read_from(2);
        assert_eq!((bytes.as_slice(), next, lost), (&b"llo"[..], 5, 0));
        log.append(&vec![b'x'; KEEP_BYTES]);
        assert_eq!(log.clamp(0), (5, 5));
        let (bytes, next, lost) = log.read_from(0);
        assert_eq!(
            (bytes.len(), next, lost),
            (MAX_PAYLOAD, 5 + MAX_PAYLOAD as u64, 5)
        );
    }

    #[test]
    fn console_spec() {
        assert_eq!(
            parse_console("unix:/tmp/c").unwrap(),
            PathBuf::from("/tmp/c")
        );
        assert!(parse_console("unix:").is_err());
        assert!(parse_console("tcp:1.2.3.4:5").is_err());
    }
}
