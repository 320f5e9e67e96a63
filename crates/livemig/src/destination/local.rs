//! The same-host hand-over on the destination ([`receive_local`]).
//!
//! The destination's memory *is* the source's guest memory (the same
//! shared file, mapped a second time). So this path never builds the
//! memory writer (`HostRam`): it cannot scrub, zero or write a page. It
//! reads the state and `Complete`, and refuses any page.

use std::time::Instant;

use super::{commit, handshake, memory, ms, Link, ReceiveConfig, ReceiveReport};
use crate::control::{self, unexpected, ControlReader};
use crate::error::{ErrorKind, MigrationError, Phase};
use crate::protocol::{HelloReply, MsgKind, State};
use crate::state::Section;
use crate::transport::Transport;
use crate::vm::{DestinationVm, VmDescription, VmError};

/// Takes over a guest from a source on the same host ([`migrate_local`]
/// there) whose memory `create`'s VM maps: the same shared files (memfds),
/// at the same offsets, as the source's `Hello` names them.
///
/// Refused in the handshake (with the reason sent back): a source that
/// does not ask for a local hand-over, one on another host (boot id), and
/// a VM whose memory is not the source's (another file, another offset,
/// memory that is not a shared file). No page is ever written: the VM's
/// memory is the source's, and the guest keeps running there if anything
/// fails before `Go`. Returns the VM as [`crate::receive`] does.
///
/// [`migrate_local`]: crate::source::local::migrate_local
pub fn receive_local<V, F>(
    transport: Box<dyn Transport>,
    config: &ReceiveConfig,
    create: F,
) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
{
    config
        .validate()
        .map_err(|e| MigrationError::new(Phase::Handshake, e))?;
    let never = crate::source::CancelToken::new();
    super::on_link(transport, config.io_timeout, &never, |link| {
        run(link, create)
    })
}

/// Handshake (with the identity check), state, commit.
fn run<V, F>(link: &mut Link, create: F) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
{
    let started = Instant::now();
    let hello = handshake::read_hello(link)?;
    let Some(identity) = hello.local.as_ref() else {
        let why = "this destination takes only a local hand-over (its memory is the \
                   source's), and the source asked for a migration that copies memory";
        return Err(handshake::refuse(&mut link.fw, why.to_string()));
    };
    if link.version < 3 {
        let why = format!(
            "a local hand-over needs protocol version 3 (chose {})",
            link.version
        );
        return Err(handshake::refuse(&mut link.fw, why));
    }
    let mut vm = handshake::create_vm(&mut link.fw, &hello.desc, create)?;
    if let Err(e) = identity.check(vm.memory()) {
        let why = format!("local hand-over: {e}");
        return Err(handshake::refuse(&mut link.fw, why));
    }
    let mut reply = HelloReply::accepted(1, [0; 16]);
    reply.version = link.version;
    reply.local = true;
    control::send(&mut link.fw, &reply, Phase::Handshake)?;
    let sections = read_state(&mut link.control)?;
    let running = !hello.paused;
    // No cancel token here yet (`Reception` does not offer the local
    // hand-over): this one is never cancelled.
    let never = crate::source::CancelToken::new();
    let times = commit::commit(&mut vm, link, &sections, running, &never)?;
    let report = ReceiveReport {
        bytes: link.control.bytes_read(),
        streams: 1,
        restore_ms: ms(times.restore),
        resume_ms: ms(times.resume),
        total_ms: ms(started.elapsed()),
        version: link.version,
        running,
        ..ReceiveReport::default()
    };
    Ok((vm, report))
}

/// The state frames until `Complete`; a page (or anything else) is refused.
fn read_state(control: &mut ControlReader) -> Result<Vec<Section>, MigrationError> {
    const EXPECTED: &str = "State or Complete (a local hand-over sends no page)";
    let st = Phase::State;
    let mut sections = None;
    let mut frames = 0;
    loop {
        let f = control.next(st, EXPECTED)?;
        match f.kind {
            MsgKind::State => {
                let state = <State as crate::protocol::Message>::decode(f.payload);
                memory::add_state(&mut sections, &mut frames, state)?;
            }
            MsgKind::Keepalive => {}
            MsgKind::Complete => break,
            MsgKind::Cancel => return Err(MigrationError::new(st, ErrorKind::Cancelled)),
            other => return Err(unexpected(other, EXPECTED, st)),
        }
    }
    let none = || MigrationError::new(st, crate::error::PeerError::NoState);
    sections.ok_or_else(none)
}
