//! `refvmm console PATH`: attach standard input and output to a VMM's
//! console socket, and follow the guest when it migrates.
//!
//! Typed bytes are kept until the VMM acknowledges that the guest's UART
//! took them. When the VMM says the guest moved (after sending all of the
//! guest's output there), the client reconnects to PATH — which the
//! destination took over — asks for the destination's output from its
//! first byte, and sends again whatever input the source did not take. It
//! waits up to [`FOLLOW_TIMEOUT`] for a VMM that has the guest.
//!
//! End of file on standard input only ends the input: the client keeps
//! printing the guest's output until the VMM ends the session (it exits, or
//! another client attaches) or the client is interrupted.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::console_proto::{Decoder, Frame, FROM_NOW, MAX_PAYLOAD};

/// How long the client looks for the VMM the guest moved to.
pub const FOLLOW_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts while following.
const RETRY: Duration = Duration::from_millis(5);

/// Input not yet acknowledged, and the connection it goes to.
#[derive(Default)]
struct Input {
    /// Typed bytes the guest has not taken yet (sent or not).
    unacked: VecDeque<u8>,
    /// The current connection's acknowledgement so far.
    acked: u64,
    /// Where new input goes (none while following the guest).
    conn: Option<UnixStream>,
}

impl Input {
    /// Drops the bytes the VMM says the guest took (`total` on this
    /// connection).
    fn ack(&mut self, total: u64) {
        let newly = usize::try_from(total.saturating_sub(self.acked)).unwrap_or(usize::MAX);
        let newly = newly.min(self.unacked.len());
        self.unacked.drain(..newly);
        self.acked = self.acked.max(total);
    }

    /// Sends `bytes` on the current connection, if any (a failed write is
    /// noticed by the reader).
    fn send(&mut self, bytes: &[u8]) {
        if let Some(c) = self.conn.as_mut() {
            for chunk in bytes.chunks(MAX_PAYLOAD) {
                if Frame::Input(chunk.to_vec()).write_to(c).is_err() {
                    return;
                }
            }
        }
    }

    /// A new connection: attach at `from`, then everything unacknowledged.
    fn attach(&mut self, mut conn: UnixStream, from: u64) -> Result<(), String> {
        Frame::Attach(from)
            .write_to(&mut conn)
            .map_err(|e| e.to_string())?;
        self.conn = Some(conn);
        self.acked = 0;
        let again: Vec<u8> = self.unacked.iter().copied().collect();
        self.send(&again);
        Ok(())
    }
}

fn lock(m: &Mutex<Input>) -> MutexGuard<'_, Input> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Standard input into `input`, until end of file.
fn pump_stdin(input: Arc<Mutex<Input>>) {
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut i = lock(&input);
        i.unacked.extend(&buf[..n]);
        i.send(&buf[..n]);
    }
}

/// How a connection ended.
enum Outcome {
    /// The guest moved: follow it. `attached` says whether this VMM had
    /// the guest (it welcomed us) or was one it had already left.
    Moved { attached: bool },
    /// The VMM ended the session.
    End(String),
}

/// Relays one connection's frames until it ends.
fn relay(conn: &mut UnixStream, input: &Mutex<Input>) -> Result<Outcome, String> {
    let mut decoder = Decoder::default();
    let mut out = std::io::stdout();
    let mut attached = false;
    loop {
        while let Some(frame) = decoder.next_frame().map_err(|e| e.to_string())? {
            match frame {
                Frame::Output(bytes) => {
                    out.write_all(&bytes)
                        .and_then(|()| out.flush())
                        .map_err(|e| format!("standard output: {e}"))?;
                }
                Frame::Welcome { lost, .. } => {
                    attached = true;
                    if lost > 0 {
                        eprintln!("refvmm console: {lost} bytes of output were no longer kept");
                    }
                }
                Frame::Ack(n) => lock(input).ack(n),
                Frame::Moved(n) => {
                    let mut i = lock(input);
                    i.ack(n);
                    i.conn = None;
                    return Ok(Outcome::Moved { attached });
                }
                Frame::End(reason) => return Ok(Outcome::End(reason)),
                other => log::debug!("console: ignored {other:?}"),
            }
        }
        if !decoder.fill(conn).map_err(|e| e.to_string())? {
            return Err("the console connection closed without a word (did the VMM die?)".into());
        }
    }
}

/// Connects to `path`; while following a guest, retries until `deadline`.
fn connect(path: &Path, deadline: Option<Instant>) -> Result<UnixStream, String> {
    loop {
        match UnixStream::connect(path) {
            Ok(c) => return Ok(c),
            Err(e) => match deadline {
                Some(d) if Instant::now() < d => std::thread::sleep(RETRY),
                _ => return Err(format!("console {}: {e}", path.display())),
            },
        }
    }
}

/// `refvmm console PATH [--from-start]`.
pub fn run(path: PathBuf, from_start: bool) -> Result<(), String> {
    let input = Arc::new(Mutex::new(Input::default()));
    let mut from = if from_start { 0 } else { FROM_NOW };
    let mut following: Option<Instant> = None;
    let mut conn = connect(&path, None)?;
    let pump = input.clone();
    std::thread::Builder::new()
        .name("console-stdin".into())
        .spawn(move || pump_stdin(pump))
        .map_err(|e| format!("console input thread: {e}"))?;
    loop {
        let writer = conn.try_clone().map_err(|e| e.to_string())?;
        lock(&input).attach(writer, from)?;
        match relay(&mut conn, &input)? {
            Outcome::End(reason) => {
                eprintln!("refvmm console: {reason}");
                return Ok(());
            }
            Outcome::Moved { attached } => {
                if attached {
                    following = None;
                }
                let deadline = *following.get_or_insert_with(|| Instant::now() + FOLLOW_TIMEOUT);
                if Instant::now() > deadline {
                    return Err(format!(
                        "the guest migrated, but no VMM took over {} within {FOLLOW_TIMEOUT:?} \
                         (was the destination given --console unix:{0}?)",
                        path.display()
                    ));
                }
                // The destination's output, from its first byte.
                from = 0;
                std::thread::sleep(RETRY);
                conn = connect(&path, Some(deadline)).map_err(|e| {
                    format!("the guest migrated, but its console was not found: {e}")
                })?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_drop_exactly_the_taken_bytes() {
        let mut i = Input::default();
        i.unacked.extend(b"status\nq1\n");
        i.ack(3);
        assert_eq!(i.unacked.iter().copied().collect::<Vec<u8>>(), b"tus\nq1\n");
        // Acks are cumulative per connection; a repeated one changes nothing.
        i.ack(3);
        i.ack(7);
        assert_eq!(i.unacked.iter().copied().collect::<Vec<u8>>(), b"q1\n");
        // A new connection counts from 0 again.
        i.acked = 0;
        i.ack(1);
        assert_eq!(i.unacked.iter().copied().collect::<Vec<u8>>(), b"1\n");
    }
}
