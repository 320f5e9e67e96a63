//! The page-stream half of the handshake: the token and accepting the
//! extra connections.

use std::time::{Duration, Instant};

use crate::error::{ErrorKind, MigrationError, Phase};
use crate::protocol::{FrameReader, Message, MsgKind, ProtocolError, StreamHello};
use crate::transport::{StreamAcceptor, Transport};

/// Random bytes for the stream token (from the kernel; never fails in
/// practice, and the token only keeps stray connections out — TLS is what
/// keeps attackers out).
pub(super) fn random_token() -> [u8; 16] {
    use std::io::Read;
    let mut t = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut t))
        .is_ok();
    if !ok {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let x = now ^ (u128::from(std::process::id()) << 64);
        t = x.to_le_bytes();
    }
    t
}

/// How long an accepted page-stream connection may take to send its
/// `StreamHello` (the source sends it right after connecting) before it is
/// dropped as a stray.
pub const STREAM_HELLO_TIMEOUT: Duration = Duration::from_secs(1);

/// Accepts the `n` page streams of a migration.
pub(super) fn accept_streams(
    acceptor: &mut dyn StreamAcceptor,
    n: u32,
    token: [u8; 16],
    timeout: Duration,
) -> Result<Vec<FrameReader<Box<dyn Transport>>>, MigrationError> {
    let hs = Phase::Handshake;
    let deadline = Instant::now() + timeout;
    let mut slots: Vec<Option<FrameReader<Box<dyn Transport>>>> = (0..n).map(|_| None).collect();
    let mut have = 0;
    while have < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(MigrationError::new(
                hs,
                ErrorKind::Timeout {
                    waiting_for: "page stream connections",
                    after: timeout,
                },
            ));
        }
        let mut t = match acceptor.accept_stream(left) {
            Ok(t) => t,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                ) =>
            {
                continue; // the deadline check above reports it
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                // One bad connection (say, a failed TLS handshake): keep waiting.
                log::warn!("refused a page stream connection: {e}");
                continue;
            }
            Err(e) => return Err(MigrationError::new(hs, ProtocolError::Io(e))),
        };
        let peer = t.peer();
        // A connection gets a short time to say who it is, so a stray that
        // sends nothing cannot hold the real streams off.
        let hello_wait = left.min(STREAM_HELLO_TIMEOUT).max(Duration::from_millis(1));
        if let Err(e) = t.set_read_timeout(Some(hello_wait)) {
            log::warn!("page stream from {peer}: {e}; dropped");
            continue;
        }
        let mut r = FrameReader::new(t);
        let hello = match r.read_frame() {
            Ok(f) if f.kind == MsgKind::StreamHello => StreamHello::decode(f.payload),
            Ok(f) => {
                log::warn!(
                    "connection from {peer} sent {:?} instead of StreamHello; dropped",
                    f.kind
                );
                continue;
            }
            Err(e) => {
                log::warn!("connection from {peer}: {e}; dropped");
                continue;
            }
        };
        match hello {
            Ok(h) if h.token == token && h.index < n => {
                let slot = &mut slots[h.index as usize];
                if slot.is_some() {
                    log::warn!("page stream {} from {peer} a second time; dropped", h.index);
                    continue;
                }
                if let Err(e) = r.get_mut().set_read_timeout(Some(timeout)) {
                    return Err(MigrationError::new(hs, ProtocolError::Io(e)));
                }
                *slot = Some(r);
                have += 1;
            }
            Ok(h) => log::warn!(
                "connection from {peer}: wrong token or stream index {} (of {n}); dropped",
                h.index
            ),
            Err(e) => log::warn!("connection from {peer}: {e}; dropped"),
        }
    }
    Ok(slots.into_iter().flatten().collect())
}
