//! The same-host hand-over on the destination
//! ([`crate::Reception::local`]).
//!
//! The destination's memory *is* the source's guest memory (the same
//! shared file, mapped a second time). So this path never builds the
//! memory writer (`HostRam`): it cannot scrub, zero or write a page. It
//! reads the state and `Complete`, and refuses any page.

use std::time::Instant;

use super::{commit, handshake, memory, ms, Call, Link, ReceiveConfig, ReceiveReport};
use crate::control::{self, unexpected, ControlReader};
use crate::error::{ErrorKind, MigrationError, Phase};
use crate::protocol::{HelloReply, MsgKind, State};
use crate::report::ReceiveProgress;
use crate::state::Section;
use crate::transport::Transport;
use crate::vm::{DestinationVm, VmDescription, VmError};

/// Takes over a guest from a source on the same host whose memory
/// `create`'s VM maps: `Reception::new(transport).config(..).local()
/// .run(create)`.
///
/// Kept for one release so that callers keep compiling; use
/// [`crate::Reception::local`], which says what the hand-over checks and
/// also takes a cancel token and a progress callback.
#[deprecated(
    since = "0.2.0",
    note = "use livemig::Reception::new(transport).local()...run(create)"
)]
pub fn receive_local<V, F>(
    transport: Box<dyn Transport>,
    config: &ReceiveConfig,
    create: F,
) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
{
    crate::Reception::new(transport)
        .config(config.clone())
        .local()
        .run(create)
}

/// The hand-over ([`crate::Reception::local`]).
pub(super) fn receive<V, F>(
    transport: Box<dyn Transport>,
    call: Call<'_>,
    create: F,
) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
{
    let (config, cancel) = (call.config, call.cancel);
    super::on_checked_link(transport, config, cancel, |link| run(link, call, create))
}

/// Handshake (with the identity check), state, commit.
fn run<V, F>(
    link: &mut Link,
    call: Call<'_>,
    create: F,
) -> Result<(V, ReceiveReport), MigrationError>
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
    (call.progress)(&ReceiveProgress::Accepted {
        memory_bytes: hello.desc.layout.total_bytes(),
        vcpus: hello.desc.vcpus,
        streams_asked: hello.streams,
    });
    let mut reply = HelloReply::accepted(1, [0; 16]);
    reply.version = link.version;
    reply.local = true;
    control::send(&mut link.fw, &reply, Phase::Handshake)?;
    let sections = read_state(&mut link.control)?;
    let running = !hello.paused;
    let times = commit::commit(&mut vm, link, &sections, running, call.cancel)?;
    (call.progress)(&ReceiveProgress::Completed { running });
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
