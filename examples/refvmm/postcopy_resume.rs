//! Post-copy resume in refvmm, on the wire (docs/postcopy.md, "Resume in
//! refvmm"): the token that ties new connections to the migration, the
//! source's reconnection and the destination's acceptance of it.
//!
//! A post-copy source draws a random [`Token`] per migration and sends it
//! on the fault connection right after [`crate::postcopy::FAULT_MAGIC`].
//! After a break during post-copy the destination listens again on its
//! `--listen` endpoint (it closed its listener after the handshake), and
//! the source reconnects: first the fault connection, then the control
//! connection, each starting with [`RESUME_MAGIC`], the token and its role
//! byte. The destination drops any connection without the right magic and
//! token, and answers [`ACCEPTED`] on the control connection once it has
//! both; only then does the source hand the pair to the engine, which
//! continues the copy (`Migration::postcopy_reconnect`,
//! `Reception::postcopy_reconnect`).
//!
//! The token tells this migration's source from anyone else who connects;
//! it travels in clear (post-copy is refused over TLS in this build), so it
//! is no defence against an attacker who can read the link.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use livemig::transport::{connect, listen, Endpoint, Transport};

/// The first bytes of each connection of a resume.
pub(crate) const RESUME_MAGIC: [u8; 16] = *b"livemig-resume/1";
/// The destination's answer on the control connection of a resume once it
/// took both connections.
pub(crate) const ACCEPTED: u8 = b'A';
const ROLE_FAULT: u8 = b'F';
const ROLE_CONTROL: u8 = b'C';

/// Ties a resume's connections to the migration.
pub(crate) type Token = [u8; 16];

/// A fresh random token.
pub(crate) fn new_token() -> Result<Token, String> {
    let mut t = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut t))
        .map_err(|e| format!("reading /dev/urandom for the post-copy token: {e}"))?;
    Ok(t)
}

/// A (control, fault) pair of connections.
pub(crate) type Pair = (Box<dyn Transport>, Box<dyn Transport>);

const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn introduce(endpoint: &Endpoint, token: &Token, role: u8) -> Result<Box<dyn Transport>, String> {
    let mut t = connect(endpoint, Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut head = RESUME_MAGIC.to_vec();
    head.extend_from_slice(token);
    head.push(role);
    t.write_all(&head)
        .and_then(|_| t.flush())
        .map_err(|e| e.to_string())?;
    Ok(t)
}

/// The source's side: one attempt to open a resume's pair to `endpoint`.
pub(crate) fn reconnect_once(endpoint: &Endpoint, token: &Token) -> Result<Pair, String> {
    let fault = introduce(endpoint, token, ROLE_FAULT)?;
    let mut control = introduce(endpoint, token, ROLE_CONTROL)?;
    let mut ack = [0u8; 1];
    control
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|_| control.read_exact(&mut ack))
        .and_then(|_| control.set_read_timeout(None))
        .map_err(|e| format!("the destination did not take the connections: {e}"))?;
    if ack[0] != ACCEPTED {
        return Err(format!("the destination answered {:#04x}", ack[0]));
    }
    Ok((control, fault))
}

/// The destination's side: listens on `endpoint` again and takes the
/// source's pair (right magic and token), until `deadline` (`None`: no
/// limit). Other connections are dropped. `None` when the deadline passed.
pub(crate) fn accept_resume(
    endpoint: &Endpoint,
    token: &Token,
    deadline: Option<Instant>,
) -> Option<Pair> {
    let left = || deadline.map(|d| d.saturating_duration_since(Instant::now()));
    let listener = loop {
        match listen(endpoint) {
            Ok(l) => break l,
            Err(e) => {
                eprintln!("refvmm: post-copy: listening for the resume: {e}; trying again");
                if left().is_some_and(|l| l.is_zero()) {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    let mut fault = None;
    loop {
        let wait = left().unwrap_or(Duration::from_secs(3600));
        if wait.is_zero() {
            return None;
        }
        let Ok(t) = listener.accept_timeout(wait) else {
            continue;
        };
        match classify_resume(t, token) {
            Ok((ROLE_FAULT, t)) => fault = Some(t),
            Ok((_, mut control)) => {
                let Some(f) = fault.take() else {
                    eprintln!("refvmm: post-copy: a control connection came before its fault connection: dropped");
                    continue;
                };
                if let Err(e) = control.write_all(&[ACCEPTED]).and_then(|_| control.flush()) {
                    eprintln!("refvmm: post-copy: the resume broke at once: {e}");
                    continue;
                }
                return Some((control, f));
            }
            Err(e) => eprintln!("refvmm: post-copy: refused a connection: {e}"),
        }
    }
}

/// The destination's `reconnect` for the engine: says that post-copy is
/// interrupted and waits for the source's resume on `endpoint` (for at
/// most `timeout`, `None`: without limit).
pub(crate) fn wait_for_resume(
    endpoint: &Endpoint,
    token: &Token,
    timeout: Option<Duration>,
) -> Option<Pair> {
    let limit = match timeout {
        Some(t) => format!("; giving up after {} s", t.as_secs()),
        None => String::new(),
    };
    eprintln!(
        "refvmm: post-copy interrupted, waiting for resume on {endpoint} (the source retries by \
         itself, or `refvmm migrate --resume` on the source){limit}; the guest waits for its \
         missing pages"
    );
    let pair = accept_resume(endpoint, token, timeout.map(|t| Instant::now() + t));
    match &pair {
        Some(_) => eprintln!("refvmm: post-copy resumed: the source reconnected"),
        None => eprintln!("refvmm: post-copy: no resume within the limit: giving up"),
    }
    pair
}

/// Reads a resume connection's introduction: its role, if the magic and
/// the token are right.
fn classify_resume(
    mut t: Box<dyn Transport>,
    token: &Token,
) -> Result<(u8, Box<dyn Transport>), String> {
    let mut head = [0u8; 33];
    t.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|_| t.read_exact(&mut head))
        .and_then(|_| t.set_read_timeout(None))
        .map_err(|e| format!("{}: {e}", t.peer()))?;
    if head[..16] != RESUME_MAGIC {
        return Err(format!("{}: not a post-copy resume", t.peer()));
    }
    if head[16..32] != token[..] {
        return Err(format!("{}: not this migration (wrong token)", t.peer()));
    }
    match head[32] {
        ROLE_FAULT | ROLE_CONTROL => Ok((head[32], t)),
        r => Err(format!("{}: unknown role {r:#04x}", t.peer())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_pair_with_the_token_is_taken_and_others_are_dropped() {
        let probe = listen(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let ep = probe.local_endpoint().clone();
        drop(probe);
        let token = new_token().unwrap();
        let (ep2, tok2) = (ep.clone(), token);
        let dest = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            accept_resume(&ep2, &tok2, Some(deadline))
        });
        let mut wrong = token;
        wrong[0] ^= 1;
        let mut pair = None;
        for _ in 0..100 {
            // A stranger first: refused, and the destination keeps waiting.
            if let Ok(mut t) = introduce(&ep, &wrong, ROLE_FAULT) {
                let mut b = [0u8; 1];
                assert_eq!(
                    t.read(&mut b).unwrap_or(0),
                    0,
                    "a wrong token got an answer"
                );
                pair = Some(reconnect_once(&ep, &token).unwrap());
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let (mut c, _f) = pair.expect("the destination listened");
        let (mut dc, _df) = dest.join().unwrap().expect("the destination took the pair");
        c.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        dc.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x", "the control connections are the same");
    }

    #[test]
    fn the_destination_gives_up_at_its_deadline() {
        let probe = listen(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let ep = probe.local_endpoint().clone();
        drop(probe);
        let deadline = Instant::now() + Duration::from_millis(200);
        assert!(accept_resume(&ep, &new_token().unwrap(), Some(deadline)).is_none());
    }
}
