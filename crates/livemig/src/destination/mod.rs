//! The destination side: handshake → memory → state → `Ready` → `Go` →
//! resume → `Resumed`. See [`receive`].
//!
//! The stream is hostile until proven otherwise: every frame is checked
//! (length bound before allocation, sequence number, crc32c), every page
//! range is checked against the memory layout before a byte is written, and
//! the VM is only resumed after the state restored cleanly *and* the source
//! committed with `Go`. On any error the VM is dropped without ever running.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{ErrorKind, InternalError, MigrationError, Phase};
use crate::protocol::{
    Abandoned, ErrorMsg, FrameReader, FrameWriter, Hello, HelloReply, Message, MsgKind,
    ProtocolError, Ready, Resumed, MAX_STREAMS, PROTOCOL_VERSION,
};
use crate::ram::HostRam;
use crate::transport::{StreamAcceptor, Transport};
use crate::vm::{check_layout, DestinationVm, VmDescription, VmError};

mod handshake;
mod memory;

pub use handshake::STREAM_HELLO_TIMEOUT;
use handshake::{accept_streams, random_token};
use memory::{receive_memory, stream_reader, StreamShared};

/// What the destination saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReceiveReport {
    /// Pages received with data.
    pub pages: u64,
    /// Zero-page markers received.
    pub zero_pages: u64,
    /// Bytes read from the transport.
    pub bytes: u64,
    /// Rounds announced by the source.
    pub rounds: u32,
    /// Page streams used (1 = pages on the control connection).
    pub streams: u32,
    /// Time to restore the state, ms.
    pub restore_ms: f64,
    /// Time to resume the vCPUs, ms.
    pub resume_ms: f64,
    /// From the handshake to the resume, ms.
    pub total_ms: f64,
    /// The protocol version spoken.
    pub version: u32,
    /// Whether the VM was resumed: false when the source VM was paused
    /// (by its operator) when the migration started; the VM is then
    /// returned paused and [`DestinationVm::resume`] was not called.
    pub running: bool,
}

/// Destination settings.
#[derive(Debug, Clone)]
pub struct ReceiveConfig {
    /// Timeout of every blocking read and write (the source sends
    /// continuously during rounds, or a keepalive at least every second, so
    /// a silent source for this long is a dead source). It also bounds the
    /// wait for `Go` after `Ready`: then the destination drops the VM and
    /// answers `Abandoned`.
    pub io_timeout: Duration,
}

impl ReceiveConfig {
    /// Checks the settings (`receive` calls it before reading anything):
    /// `io_timeout` must be more than 0 and at most
    /// [`crate::policy::MAX_DURATION`].
    pub fn validate(&self) -> Result<(), crate::policy::ConfigError> {
        crate::policy::check_timeout("io_timeout", self.io_timeout)
    }
}

impl Default for ReceiveConfig {
    fn default() -> Self {
        ReceiveConfig {
            io_timeout: Duration::from_secs(10),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Receives one migration from `transport`.
///
/// `create` is called with the source's [`VmDescription`] once the handshake
/// passed the protocol checks; it builds the (paused) destination VM or
/// refuses with a [`VmError`] whose message is sent back to the source. The
/// VM is returned running — or paused, without [`DestinationVm::resume`]
/// having been called, when the source VM was paused when its migration
/// started ([`ReceiveReport::running`]); on error it has been dropped
/// without running.
///
/// A source asking for several page streams is granted one (everything on
/// `transport`); see [`receive_streams`].
pub fn receive<V, F>(
    transport: Box<dyn Transport>,
    config: &ReceiveConfig,
    create: F,
) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
{
    receive_streams(transport, None, config, create)
}

/// Like [`receive`], granting a source's request for several page streams
/// and accepting them through `acceptor`.
///
/// Each extra connection must start with a [`StreamHello`] carrying the
/// random token sent in the [`HelloReply`] (connections that do not are
/// dropped); all must arrive within [`ReceiveConfig::io_timeout`].
/// `acceptor.close()` is called once they are all there (or right after the
/// handshake when one stream suffices).
pub fn receive_streams<V, F>(
    transport: Box<dyn Transport>,
    acceptor: Option<&mut dyn StreamAcceptor>,
    config: &ReceiveConfig,
    create: F,
) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
{
    let hs = Phase::Handshake;
    config.validate().map_err(|e| MigrationError::new(hs, e))?;
    let mut rx = transport
        .try_clone()
        .map_err(|e| MigrationError::new(hs, ProtocolError::Io(e)))?;
    rx.set_read_timeout(Some(config.io_timeout))
        .map_err(|e| MigrationError::new(hs, ProtocolError::Io(e)))?;
    let mut transport = transport;
    transport
        .set_write_timeout(Some(config.io_timeout))
        .map_err(|e| MigrationError::new(hs, ProtocolError::Io(e)))?;
    let mut fr = FrameReader::new(rx);
    let mut fw = FrameWriter::new(transport);
    let mut phase = hs;
    let mut version = PROTOCOL_VERSION;
    let result = run_destination(
        &mut fr,
        &mut fw,
        acceptor,
        config,
        create,
        &mut phase,
        &mut version,
    );
    if let Err(e) = &result {
        // Tell the source why (best effort), unless the source itself failed.
        if !matches!(e.kind, ErrorKind::Remote { .. } | ErrorKind::Cancelled) {
            let msg = ErrorMsg {
                phase: e.phase.to_string(),
                message: e.kind.to_string(),
            };
            // In the completion phase (`Ready` sent or being sent) the source
            // may have sent `Go` already: say that the VM is gone for good
            // (it was dropped when `run_destination` returned), so that the
            // source resumes instead of staying paused as ambiguous.
            // A version-2 source knows no `Abandoned`: it gets the `Error`.
            let _ = if e.phase == Phase::Completion && version >= 3 {
                fw.send(&Abandoned(msg))
            } else {
                fw.send(&msg)
            };
            let _ = fw.flush();
        }
        log::warn!("{e}");
    }
    result
}

fn run_destination<V, F>(
    fr: &mut FrameReader<Box<dyn Transport>>,
    fw: &mut FrameWriter<Box<dyn Transport>>,
    acceptor: Option<&mut dyn StreamAcceptor>,
    config: &ReceiveConfig,
    create: F,
    phase: &mut Phase,
    chosen: &mut u32,
) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
{
    let started = Instant::now();
    let mut report = ReceiveReport::default();
    let hs = Phase::Handshake;

    let f = fr.read_frame().map_err(|e| MigrationError::new(hs, e))?;
    if f.kind != MsgKind::Hello {
        return Err(MigrationError::new(
            hs,
            ErrorKind::Unexpected {
                got: format!("{:?}", f.kind),
                expected: "Hello",
            },
        ));
    }
    let refuse = |fw: &mut FrameWriter<Box<dyn Transport>>, reason: String| {
        let r = HelloReply::refused(reason.clone());
        let _ = fw.send(&r);
        let _ = fw.flush();
        MigrationError::new(hs, ErrorKind::Refused(reason))
    };
    let hello = match Hello::decode(f.payload) {
        Ok(h) => h,
        Err(e) => return Err(refuse(fw, e.to_string())),
    };
    let version = match hello.negotiated_version() {
        Ok(v) => v,
        Err(e) => return Err(refuse(fw, e.to_string())),
    };
    report.version = version;
    *chosen = version;
    report.running = !hello.paused;
    let desc = hello.desc;
    let mut vm = match create(&desc) {
        Ok(vm) => vm,
        Err(e) => return Err(refuse(fw, e.to_string())),
    };
    if let Err(e) = check_layout(vm.memory(), &desc) {
        return Err(refuse(fw, e.to_string()));
    }
    let layout = desc.layout.clone();
    let ram = HostRam::new(vm.memory(), &layout).ok_or_else(|| {
        refuse(
            fw,
            "destination memory is not one mapping per region".into(),
        )
    })?;
    // The source leaves out pages that read as zero there: make every page
    // here read as zero first, whatever the VMM put in it before.
    let t_scrub = Instant::now();
    match ram.scrub() {
        Ok(0) => {}
        Ok(n) => log::warn!(
            "zeroed {n} region(s) of destination memory by writing ({:.1} ms): \
             their backing cannot drop pages",
            ms(t_scrub.elapsed())
        ),
        Err(e) => return Err(refuse(fw, format!("cannot zero destination memory: {e}"))),
    }
    let streams = if acceptor.is_some() {
        hello.streams.clamp(1, MAX_STREAMS)
    } else {
        1
    };
    let token = if streams > 1 { random_token() } else { [0; 16] };
    // The newest version in both ranges (`Hello::decode` refused ranges
    // that do not overlap): 3, or 2 with a source of release 0.1.0.
    let mut reply = HelloReply::accepted(streams, token);
    reply.version = version;
    fw.send(&reply)
        .and_then(|_| fw.flush())
        .map_err(|e| MigrationError::new(hs, e))?;
    report.streams = streams;
    let readers = match acceptor {
        Some(a) if streams > 1 => {
            let r = accept_streams(a, streams, token, config.io_timeout);
            a.close();
            r?
        }
        Some(a) => {
            a.close();
            Vec::new()
        }
        None => Vec::new(),
    };
    let control = fr
        .get_ref()
        .try_clone()
        .map_err(|e| MigrationError::new(hs, ProtocolError::Io(e)))?;
    let shared = StreamShared {
        error: Mutex::new(None),
        abort: AtomicBool::new(false),
    };
    let stream_handles: Vec<Box<dyn Transport>> = readers
        .iter()
        .filter_map(|r| r.get_ref().try_clone().ok())
        .collect();
    let ram_ref = &ram;
    let layout_ref = &layout;
    let shared_ref = &shared;
    let outcome = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (i, r) in readers.into_iter().enumerate() {
            let control_clone = control.try_clone().ok();
            let h = std::thread::Builder::new()
                .name(format!("livemig-rx{i}"))
                .spawn_scoped(s, move || {
                    stream_reader(
                        i as u32,
                        streams,
                        r,
                        layout_ref,
                        ram_ref,
                        shared_ref,
                        control_clone,
                    )
                });
            match h {
                Ok(h) => handles.push(h),
                Err(e) => {
                    shared.abort.store(true, Ordering::SeqCst);
                    for t in &stream_handles {
                        let _ = t.shutdown();
                    }
                    return Err(MigrationError::new(
                        hs,
                        InternalError::Spawn {
                            what: "page stream",
                            source: e,
                        },
                    ));
                }
            }
        }
        let r = receive_memory(fr, &layout, &ram, &mut report, phase);
        if r.is_err() {
            shared.abort.store(true, Ordering::SeqCst);
            for t in &stream_handles {
                let _ = t.shutdown();
            }
        }
        for h in handles {
            match h.join() {
                Ok((pages, zero, bytes)) => {
                    report.pages += pages;
                    report.zero_pages += zero;
                    report.bytes += bytes;
                }
                Err(_) => {
                    if let Ok(mut g) = shared.error.lock() {
                        g.get_or_insert((u32::MAX, InternalError::Panicked.into()));
                    }
                }
            }
        }
        // A stream's failure is the real cause of whatever the control
        // connection saw (the stream shut it down).
        if let Some((index, kind)) = shared.error.lock().ok().and_then(|mut g| g.take()) {
            return Err(MigrationError::new(
                *phase,
                ErrorKind::Stream {
                    index,
                    source: Box::new(kind),
                },
            ));
        }
        r
    });
    let sections = outcome?;

    // Restore, then wait for the source's commitment before running.
    *phase = Phase::State;
    let t = Instant::now();
    vm.restore_state(&sections)
        .map_err(|e| MigrationError::new(Phase::State, e))?;
    let restore = t.elapsed();
    report.restore_ms = ms(restore);
    *phase = Phase::Completion;
    let cp = Phase::Completion;
    fw.send(&Ready {
        restore_us: restore.as_micros() as u64,
    })
    .and_then(|_| fw.flush())
    .map_err(|e| MigrationError::new(cp, e))?;
    let f = fr.read_frame().map_err(|e| MigrationError::new(cp, e))?;
    match f.kind {
        MsgKind::Go => {}
        MsgKind::Error => {
            let m = ErrorMsg::decode(f.payload).map_err(|e| MigrationError::new(cp, e))?;
            return Err(MigrationError::new(
                cp,
                ErrorKind::Remote {
                    phase: m.phase,
                    message: m.message,
                },
            ));
        }
        other => {
            return Err(MigrationError::new(
                cp,
                ErrorKind::Unexpected {
                    got: format!("{other:?}"),
                    expected: "Go",
                },
            ))
        }
    }
    let t = Instant::now();
    if report.running {
        vm.resume().map_err(|e| MigrationError::new(cp, e))?;
    }
    let resume = t.elapsed();
    report.resume_ms = ms(resume);
    // The guest runs here now. If the acknowledgement cannot be sent the
    // source stays paused (it committed with Go), so keep running.
    if let Err(e) = fw
        .send(&Resumed {
            resume_us: resume.as_micros() as u64,
        })
        .and_then(|_| fw.flush())
    {
        log::warn!("guest resumed but the acknowledgement could not be sent: {e}");
    }
    report.bytes += fr.bytes_read();
    report.total_ms = ms(started.elapsed());
    Ok((vm, report))
}
