//! The handshake: `Hello` → `HelloReply`, the extra page streams, and the
//! state measured before any page is sent. Ends in [`Accepted`] and a
//! [`StateEstimate`].

use std::time::{Duration, Instant};

use super::session::Session;
use crate::bitmap::DirtyBitmap;
use crate::control::{self, ControlReader, ControlWriter};
use crate::error::{ErrorKind, MigrationError, PeerError, Phase};
use crate::protocol::{
    FrameWriter, Hello, HelloReply, Message, ProtocolError, State, StateFrames, StreamHello,
    MAX_FRAME_PAYLOAD, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use crate::transport::{StreamOpener, Transport};
use crate::vm::{RestoreRehearsal, SourceVm, VmDescription};

/// The destination accepted the migration.
pub(super) struct Accepted {
    /// The control connection.
    pub(super) control: ControlReader,
    /// Its writer.
    pub(super) fw: ControlWriter,
    /// The extra page streams (none when one stream was granted).
    pub(super) streams: Vec<FrameWriter<Box<dyn Transport>>>,
    /// Every connection, for the paused phase's watchdog.
    pub(super) links: Vec<Box<dyn Transport>>,
    /// The protocol version the destination chose.
    pub(super) version: u32,
    /// Page streams granted.
    pub(super) granted: u32,
    /// Post-copy granted.
    pub(super) postcopy: bool,
    /// With `postcopy`: its preparation before the pause granted too.
    pub(super) postcopy_prepare: bool,
    /// Round 0's pages (every page), built while the destination made its
    /// VM: at 64 GiB, writing its 2 MiB of fresh words takes about 1 ms.
    pub(super) round0: DirtyBitmap,
    /// The switchover probe granted.
    pub(super) probe: bool,
    /// The destination's save and restore as it timed them in the
    /// handshake (`None`: not measured, or a destination that does not know
    /// the request).
    pub(super) restore_cost: Option<RestoreRehearsal>,
    /// `PagesGather` frames granted.
    pub(super) pages_gather: bool,
    /// The destination said its VM starts the guest before it wakes the
    /// vCPU threads (`HelloReply::started_before_wake`): its resume is
    /// counted as none.
    pub(super) started_before_wake: bool,
    /// The read count granted: rounds end once the destination has read
    /// them (`source::read_count`).
    pub(super) read_count: bool,
}

/// What the switchover will cost beyond memory, part by part, measured
/// before any page (see [`measure_state`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StateParts {
    /// Pausing the vCPUs (at most 2 ms).
    pub(crate) pause: Duration,
    /// Saving the state.
    pub(crate) save: Duration,
    /// The destination's restore: its rehearsed restore, or as long as the
    /// save when it sent none.
    pub(crate) restore: Duration,
    /// Whether [`StateParts::restore`] is the destination's rehearsed
    /// restore.
    pub(crate) restore_measured: bool,
    /// The destination's rehearsal, as it sent it.
    pub(crate) rehearsal: Option<RestoreRehearsal>,
    /// The destination's resume (`Go` → its guest started): none when
    /// [`StateParts::started_before_wake`], else as long as this side's
    /// resume.
    pub(crate) resume: Duration,
    /// Whether the destination said its VM starts the guest before it
    /// wakes the vCPU threads, so that [`StateParts::resume`] is zero.
    pub(crate) started_before_wake: bool,
    /// Framing the saved state for the wire, as the switchover does it
    /// ([`StateFrames`] and the frames' CRCs), timed on the measured state
    /// ([`time_state_frames`]).
    pub(crate) encode: Duration,
    /// The destination's read and decode of those frames, as this side
    /// runs the destination's code on them ([`time_state_frames`]).
    pub(crate) decode: Duration,
}

impl StateParts {
    /// Pause, save, restore, resume, and the state's framing and decode
    /// together.
    pub(crate) fn total(&self) -> Duration {
        self.pause + self.save + self.restore + self.resume + self.encode + self.decode
    }
}

/// What the switchover will cost beyond memory, measured before any page.
pub(super) struct StateEstimate {
    /// Pause, save, restore and resume (see [`measure_state`]).
    pub(super) parts: StateParts,
    /// The state's size on the wire (sections with their headers): what
    /// the policy adds to the remaining memory each round.
    pub(super) wire_bytes: u64,
}

/// `Hello`, the destination's answer, and the extra page streams: refuses
/// before a single page is sent.
pub(super) fn handshake<V: SourceVm + ?Sized>(
    s: &mut Session<'_, V>,
    transport: Box<dyn Transport>,
    opener: Option<&mut dyn StreamOpener>,
    desc: VmDescription,
) -> Result<Accepted, MigrationError> {
    let hs = Phase::Handshake;
    let config = s.config;
    let (mut control, mut fw) = control::open(transport, config.io_timeout)?;
    let mut links: Vec<Box<dyn Transport>> = Vec::new();
    links.extend(fw.get_ref().try_clone().ok());
    let layout = desc.layout.clone();
    let mut hello = Hello::new(desc);
    hello.streams = config.streams;
    hello.paused = s.paused;
    hello.postcopy = super::postcopy::offer(s);
    hello.postcopy_prepare = hello.postcopy;
    // Not with post-copy: its control messages are read elsewhere. By
    // default only where the transport cannot tell its round trip.
    let unknown_rtt = links.first().is_none_or(|l| l.round_trip().is_none());
    hello.probe = config.switchover_probe.unwrap_or(unknown_rtt) && s.postcopy.is_none();
    hello.restore_cost = true;
    // Not with post-copy: a page torn in pre-copy is sent again, but the
    // switch to post-copy does not check that it was (see
    // `destination::memory`'s check of torn pages).
    hello.pages_gather = config.zero_copy && !hello.postcopy;
    hello.started_before_wake = true;
    // Not with post-copy either: its reception answers no question.
    hello.read_count = s.postcopy.is_none();
    fw.send(&hello).map_err(|e| MigrationError::new(hs, e))?;
    // While the destination makes its VM: drop the VMM's writes recorded so
    // far. Round 0 reads every page that may hold data after this (and
    // after dirty logging is on), so each of them is in round 0; a VMM
    // write after this stays recorded for the round 0 sync. Round 0's
    // bitmap (every page) is built meanwhile too.
    let mut round0 = DirtyBitmap::new(&layout);
    super::rounds::merge_vmm_writes(s.vm, &mut round0);
    round0.set_all();
    let reply: HelloReply = control.recv(hs)?;
    log::debug!(
        "set-up: HelloReply at {:.2} ms",
        s.started.elapsed().as_secs_f64() * 1000.0
    );
    check_reply(&reply, config.streams)?;
    super::postcopy::check_grant(hello.postcopy, reply.postcopy)?;
    if reply.probe && !hello.probe {
        return Err(MigrationError::new(hs, PeerError::ProbeNotOffered));
    }
    if reply.restore_cost.is_some() && !hello.restore_cost {
        return Err(MigrationError::new(hs, PeerError::RestoreCostNotAsked));
    }
    if reply.pages_gather && !hello.pages_gather {
        return Err(MigrationError::new(hs, PeerError::PagesGatherNotAsked));
    }
    if reply.started_before_wake && !hello.started_before_wake {
        return Err(MigrationError::new(
            hs,
            PeerError::StartedBeforeWakeNotAsked,
        ));
    }
    if reply.read_count && !hello.read_count {
        return Err(MigrationError::new(hs, PeerError::ReadCountNotOffered));
    }
    let streams = if reply.streams > 1 {
        // `Migration::run` refused streams > 1 without an opener, and the
        // destination grants no more than asked for.
        let opener =
            opener.ok_or_else(|| MigrationError::new(hs, super::needs_opener(reply.streams)))?;
        open_streams(s, opener, &reply, &mut links)?
    } else {
        Vec::new()
    };
    (s.progress)(&crate::report::Progress::Accepted);
    Ok(Accepted {
        control,
        fw,
        streams,
        links,
        version: reply.version,
        granted: reply.streams,
        postcopy: reply.postcopy,
        postcopy_prepare: reply.postcopy && reply.postcopy_prepare,
        round0,
        probe: reply.probe,
        restore_cost: reply.restore_cost,
        pages_gather: reply.pages_gather,
        started_before_wake: reply.started_before_wake,
        read_count: reply.read_count,
    })
}

/// The destination's answer: accepted, a version this side speaks, no more
/// streams than asked for.
pub(super) fn check_reply(reply: &HelloReply, asked: u32) -> Result<(), MigrationError> {
    let hs = Phase::Handshake;
    if !reply.accepted {
        return Err(MigrationError::new(
            hs,
            ErrorKind::Refused(reply.reason.clone()),
        ));
    }
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&reply.version) {
        let e = PeerError::Version {
            chosen: reply.version,
            min: MIN_PROTOCOL_VERSION,
            max: PROTOCOL_VERSION,
        };
        return Err(MigrationError::new(hs, e));
    }
    if reply.streams > asked {
        let e = PeerError::TooManyStreams {
            granted: reply.streams,
            asked,
        };
        return Err(MigrationError::new(hs, e));
    }
    Ok(())
}

/// Opens the granted page streams, each introduced by a `StreamHello`.
fn open_streams<V: SourceVm + ?Sized>(
    s: &Session<'_, V>,
    opener: &mut dyn StreamOpener,
    reply: &HelloReply,
    links: &mut Vec<Box<dyn Transport>>,
) -> Result<Vec<FrameWriter<Box<dyn Transport>>>, MigrationError> {
    let mut streams = Vec::new();
    for index in 0..reply.streams {
        let stream_err = |kind: ErrorKind| {
            let source = Box::new(kind);
            MigrationError::new(Phase::Handshake, ErrorKind::Stream { index, source })
        };
        let io = |e| stream_err(ProtocolError::Io(e).into());
        let mut t = opener.open().map_err(io)?;
        t.set_write_timeout(Some(s.config.io_timeout)).map_err(io)?;
        s.cancel.attach(t.try_clone().ok());
        links.extend(t.try_clone().ok());
        let mut w = FrameWriter::new(t);
        let hello = StreamHello {
            token: reply.token,
            index,
        };
        w.send(&hello)
            .and_then(|_| w.flush())
            .map_err(|e| stream_err(e.into()))?;
        streams.push(w);
    }
    Ok(streams)
}

/// Measures the state (see [`measure_state`]; the restore is the
/// destination's own measurement when it sent one, and the destination's
/// resume is none when it said it starts the guest before waking the vCPU
/// threads) and refuses now, not after the pause, a state that cannot
/// travel or an old peer that cannot take it.
pub(super) fn estimate_state<V: SourceVm + ?Sized>(
    s: &Session<'_, V>,
    accepted: &Accepted,
) -> Result<StateEstimate, MigrationError> {
    let hs = Phase::Handshake;
    let counts_resume = !accepted.started_before_wake;
    let limit = s.config.downtime_limit;
    let (mut parts, sections) = measure_state(s.vm, s.paused, limit, counts_resume)?;
    parts.rehearsal = accepted.restore_cost;
    if let Some(r) = accepted.restore_cost {
        parts.restore = r.restore;
        parts.restore_measured = true;
    }
    log::debug!(
        "state measured: pause {:.3} ms, save {:.3} ms, restore {:.3} ms ({}), resume {:.3} ms{}",
        super::session::ms(parts.pause),
        super::session::ms(parts.save),
        super::session::ms(parts.restore),
        match parts.rehearsal {
            Some(r) => format!(
                "the destination's rehearsal; its save {:.3} ms",
                super::session::ms(r.save)
            ),
            _ => "as the save".to_string(),
        },
        super::session::ms(parts.resume),
        if parts.started_before_wake {
            " (the destination starts the guest before it wakes the vCPUs)"
        } else {
            ""
        }
    );
    let wire_bytes = sections
        .iter()
        .map(|s| s.data.len() as u64 + s.name.len() as u64 + 16)
        .sum();
    let (frames, encode, decode) =
        time_state_frames(sections).map_err(|e| MigrationError::new(hs, e))?;
    parts.encode = encode;
    parts.decode = decode;
    log::debug!(
        "state frames: {frames} framed in {:.3} ms, read and decoded in {:.3} ms",
        super::session::ms(encode),
        super::session::ms(decode)
    );
    check_old_peer(accepted.version, s.paused, frames)?;
    Ok(StateEstimate { parts, wire_bytes })
}

/// Frames `sections` as the switchover will (refusing, before any page, a
/// state that cannot be sent) and times the work the switchover does on
/// the state's bytes besides moving them: this side's framing
/// ([`StateFrames::new`] and each frame's CRC, which the writer computes
/// as it writes), and the destination's: each frame's payload copied into
/// a fresh buffer (the destination's reader fills one from the
/// connection), its CRC checked and [`State::decode`]d into sections.
/// Returns the number of frames and the two times. Both are mostly the
/// first touch of fresh memory, not the arithmetic: run while the guest
/// runs, they cost it nothing.
pub(super) fn time_state_frames(
    sections: Vec<crate::state::Section>,
) -> Result<(usize, Duration, Duration), ProtocolError> {
    let t = Instant::now();
    let frames = StateFrames::new(sections, MAX_FRAME_PAYLOAD)?;
    let crcs = (0..frames.len()).fold(0, |a, i| a ^ frames.crc(i, i as u32));
    std::hint::black_box(crcs);
    let encode = t.elapsed();
    let mut decode = Duration::ZERO;
    for i in 0..frames.len() {
        let t = Instant::now();
        let payload = frames.encoded(i);
        std::hint::black_box(crc32c::crc32c(&payload));
        let state = State::decode(&payload)?;
        decode += t.elapsed();
        // Dropping them is not the destination's work in the pause.
        drop(state);
    }
    Ok((frames.len(), encode, decode))
}

/// What a destination that speaks only protocol version 2 (release 0.1.0)
/// cannot do, refused before any page: keep a paused VM paused (it would
/// resume it), and read a state of several `State` frames.
pub(super) fn check_old_peer(
    version: u32,
    paused: bool,
    state_frames: usize,
) -> Result<(), MigrationError> {
    if version >= 3 {
        return Ok(());
    }
    let why = if paused {
        "the VM is paused, and a destination speaking protocol version 2 would resume it"
            .to_string()
    } else if state_frames > 1 {
        format!(
            "the device state needs {state_frames} State frames; a destination speaking \
             protocol version 2 reads one"
        )
    } else {
        return Ok(());
    };
    Err(MigrationError::new(
        Phase::Handshake,
        ErrorKind::Refused(why),
    ))
}

/// Measures the state before any page is sent: a short pause now tells
/// what the switchover costs beyond memory, and proves the state can be
/// saved before anything is committed.
///
/// The estimate: the pause latency capped at 2 ms (one slow pause under
/// host load must not make the policy believe every switchover costs that
/// much and never converge), the save, the destination's restore (here
/// taken as long as the save; [`estimate_state`] puts in the destination's
/// rehearsed restore when it sent one) and the destination's resume: taken
/// as long as this resume (as many vCPUs to wake) when `counts_resume`,
/// else none (the destination said it starts the guest before it wakes its
/// vCPU threads; this resume is still timed and logged). A measurement
/// whose parts add up to over a quarter of `limit` is repeated (twice at most)
/// and the smallest kept, for the same reason — but with the first
/// measurement's pause: a repeat pauses right after a resume, before the
/// vCPU threads are back in the guest, and on real KVM its pause read ~0
/// where the switchover's took 1–2 ms (32–64 vCPUs). The state's bytes
/// are added at the measured bandwidth each round.
///
/// A VM the operator paused is only saved (never paused or resumed here,
/// nor resumed on the destination). If pausing a running VM fails, it is
/// resumed (a pause that failed half-way may have stopped some vCPUs), so
/// it runs as before.
pub(super) fn measure_state<V: SourceVm + ?Sized>(
    vm: &V,
    paused: bool,
    limit: Duration,
    counts_resume: bool,
) -> Result<(StateParts, Vec<crate::state::Section>), MigrationError> {
    let hs = Phase::Handshake;
    if paused {
        let t = Instant::now();
        let sections = vm.save_state().map_err(|e| MigrationError::new(hs, e))?;
        let save = t.elapsed();
        let parts = StateParts {
            save,
            restore: save,
            started_before_wake: !counts_resume,
            ..StateParts::default()
        };
        return Ok((parts, sections));
    }
    let mut best: Option<StateParts> = None;
    let mut first_pause = None;
    let mut sections = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        if let Err(e) = vm.pause() {
            if let Err(re) = vm.resume() {
                log::error!("resuming the source after a failed pause: {re}");
            }
            return Err(MigrationError::new(hs, e));
        }
        let t_paused = Instant::now();
        let saved = vm.save_state();
        let t_saved = Instant::now();
        let resumed = vm.resume();
        let t_resumed = Instant::now();
        let this = StateParts {
            pause: *first_pause.get_or_insert((t_paused - t).min(Duration::from_millis(2))),
            save: t_saved - t_paused,
            restore: t_saved - t_paused,
            restore_measured: false,
            rehearsal: None,
            resume: if counts_resume {
                t_resumed - t_saved
            } else {
                Duration::ZERO
            },
            started_before_wake: !counts_resume,
            ..StateParts::default()
        };
        log::debug!(
            "state measurement: pause {:.3} ms, save {:.3} ms, resume {:.3} ms",
            super::session::ms(t_paused - t),
            super::session::ms(this.save),
            super::session::ms(t_resumed - t_saved)
        );
        let kept = match best {
            Some(b) if b.total() <= this.total() => b,
            _ => this,
        };
        best = Some(kept);
        sections = saved.map_err(|e| MigrationError::new(hs, e))?;
        resumed.map_err(|e| MigrationError::new(hs, e))?;
        if kept.total() <= limit / 4 {
            break;
        }
    }
    Ok((best.unwrap_or_default(), sections))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_s_framing_and_decode_are_in_the_total() {
        let ms = Duration::from_millis;
        let parts = StateParts {
            pause: ms(1),
            save: ms(2),
            restore: ms(3),
            resume: ms(4),
            encode: ms(5),
            decode: ms(6),
            ..StateParts::default()
        };
        assert_eq!(parts.total(), ms(21));
    }

    #[test]
    fn the_state_frames_are_timed_or_refused() {
        use crate::state::Section;
        let sections: Vec<Section> = (0..3)
            .map(|i| Section::new(format!("vcpu.{i}"), 1, vec![i as u8; 7000]))
            .collect();
        let (frames, _, _) = time_state_frames(sections.clone()).unwrap();
        assert_eq!(frames, 1);
        // A state that cannot be sent is refused as the switchover would.
        let mut dup = sections;
        dup[1].name = dup[0].name.clone();
        let want = StateFrames::new(dup.clone(), MAX_FRAME_PAYLOAD)
            .unwrap_err()
            .to_string();
        assert_eq!(time_state_frames(dup).unwrap_err().to_string(), want);
    }
}
