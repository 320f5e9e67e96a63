//! The source side: handshake → pre-copy rounds → stop-and-copy → state →
//! completion. See [`migrate`].

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{ErrorKind, InternalError, MigrationError, PeerError, Phase};
use crate::memory::PAGE_SIZE;
use crate::policy::MigrationConfig;
use crate::protocol::{
    state_frames, ErrorMsg, FrameReader, FrameWriter, Hello, HelloReply, Message, MsgKind,
    PageBatch, ProtocolError, StreamHello, MAX_FRAME_PAYLOAD, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION, STREAM_CHUNK_PAGES,
};
use crate::ram::HostRam;
use crate::report::{Progress, Report, Status};
use crate::transport::{StreamOpener, Transport};
use crate::vm::{SourceVm, VmError};

mod cancel;
mod handshake;
mod precopy;
mod rounds;
mod sender;
mod streams;
mod switchover;
mod throttle;

pub use cancel::CancelToken;
use handshake::{check_old_peer, measure_state};
use precopy::precopy_and_switch;
use sender::{keepalive_every, Counts, Pacer, PageSender};
use streams::{stream_worker, StreamPool};
use throttle::Throttler;

/// Pages per dirty-log chunk: in manual-protect mode each chunk is
/// re-protected (`clear`) just before its pages are read.
pub const CHUNK_PAGES: u64 = STREAM_CHUNK_PAGES;

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Reads the next frame, turning a peer `Error` frame into an error.
/// `timeout` is the read timeout set on `fr`, for the error message.
pub(super) fn expect(
    fr: &mut FrameReader<Box<dyn Transport>>,
    want: MsgKind,
    phase: Phase,
    timeout: Duration,
) -> Result<Vec<u8>, MigrationError> {
    let f = fr.read_frame().map_err(|e| {
        if e.is_timeout() {
            MigrationError::new(
                phase,
                ErrorKind::Timeout {
                    waiting_for: want.name(),
                    after: timeout,
                },
            )
        } else {
            MigrationError::new(phase, e)
        }
    })?;
    if f.kind == want {
        return Ok(f.payload.to_vec());
    }
    if f.kind == MsgKind::Error {
        let e = ErrorMsg::decode(f.payload).map_err(|e| MigrationError::new(phase, e))?;
        return Err(MigrationError::new(
            phase,
            ErrorKind::Remote {
                phase: e.phase,
                message: e.message,
            },
        ));
    }
    Err(MigrationError::new(
        phase,
        ErrorKind::Unexpected {
            got: format!("{:?}", f.kind),
            expected: want.name(),
        },
    ))
}

/// Migrates `vm` over `transport`.
///
/// Runs on the calling thread while the VM's own threads keep running the
/// guest. On success the guest runs on the destination and the source VM is
/// left paused (the caller tears it down). On any error before the
/// switchover the source VM is running again and dirty logging is off; the
/// error names the phase. If the error [`MigrationError::is_ambiguous`], the
/// destination may be running the guest: the source stays paused.
///
/// `progress` is called after each round and at the switchover.
///
/// Everything travels on `transport`; [`MigrationConfig::streams`] must be 1
/// (see [`migrate_streams`]).
pub fn migrate<V: SourceVm + ?Sized>(
    vm: &V,
    transport: Box<dyn Transport>,
    config: &MigrationConfig,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, MigrationError> {
    migrate_streams(vm, transport, None, config, cancel, progress)
}

/// Like [`migrate`], with [`MigrationConfig::streams`] page streams opened
/// through `opener` (the control exchange stays on `transport`).
///
/// The destination may grant fewer streams than asked for (a destination
/// called without a [`crate::transport::StreamAcceptor`] grants one); with
/// one, `opener` is not used.
pub fn migrate_streams<V: SourceVm + ?Sized>(
    vm: &V,
    transport: Box<dyn Transport>,
    opener: Option<&mut dyn StreamOpener>,
    config: &MigrationConfig,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, MigrationError> {
    let started = Instant::now();
    let desc = vm
        .describe()
        .map_err(|e| MigrationError::new(Phase::Handshake, e))?;
    let layout = desc.layout.clone();
    let mut report = Report::new(layout.total_bytes(), ms(config.downtime_limit));
    cancel.attach(transport.try_clone().ok());
    // The operator's run state, kept from start to end (see
    // `SourceVm::is_paused`).
    let paused = vm.is_paused();
    let result = if let Err(e) = config.validate() {
        Err(MigrationError::new(Phase::Handshake, e))
    } else if config.streams > 1 && opener.is_none() {
        Err(MigrationError::new(
            Phase::Handshake,
            needs_opener(config.streams),
        ))
    } else {
        run_source(
            vm,
            transport,
            opener,
            config,
            cancel,
            progress,
            &mut report,
            started,
            desc,
            paused,
        )
    };
    cancel.detach_all();
    report.total_ms = ms(started.elapsed());
    match result {
        Ok(()) => {
            report.status = Status::Completed;
            Ok(report)
        }
        Err(mut e) => {
            // A cancel shuts the transport down; the I/O error it causes is
            // the cancel, not a failure.
            if cancel.is_cancelled() && !e.is_ambiguous() {
                e.kind = ErrorKind::Cancelled;
            }
            report.status = if matches!(e.kind, ErrorKind::Cancelled) {
                Status::Cancelled
            } else {
                Status::Failed
            };
            report.error = Some(e.to_string());
            log::warn!("{e}");
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_source<V: SourceVm + ?Sized>(
    vm: &V,
    transport: Box<dyn Transport>,
    opener: Option<&mut dyn StreamOpener>,
    config: &MigrationConfig,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&Progress),
    report: &mut Report,
    started: Instant,
    desc: crate::vm::VmDescription,
    paused: bool,
) -> Result<(), MigrationError> {
    let hs = Phase::Handshake;
    let layout = desc.layout.clone();
    let mut rx = transport
        .try_clone()
        .map_err(|e| MigrationError::new(hs, ProtocolError::Io(e)))?;
    rx.set_read_timeout(Some(config.io_timeout))
        .map_err(|e| MigrationError::new(hs, ProtocolError::Io(e)))?;
    let mut transport = transport;
    transport
        .set_write_timeout(Some(config.io_timeout))
        .map_err(|e| MigrationError::new(hs, ProtocolError::Io(e)))?;
    // Every connection, for the paused phase's watchdog.
    let mut links: Vec<Box<dyn Transport>> = Vec::new();
    links.extend(transport.try_clone().ok());
    let mut fr = FrameReader::new(rx);
    let mut fw = FrameWriter::new(transport);

    // Handshake: refuse before a single page is sent.
    let mut hello = Hello::new(desc);
    hello.streams = config.streams;
    hello.paused = paused;
    fw.send(&hello).map_err(|e| MigrationError::new(hs, e))?;
    let reply = HelloReply::decode(&expect(
        &mut fr,
        MsgKind::HelloReply,
        hs,
        config.io_timeout,
    )?)
    .map_err(|e| MigrationError::new(hs, e))?;
    if !reply.accepted {
        return Err(MigrationError::new(hs, ErrorKind::Refused(reply.reason)));
    }
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&reply.version) {
        return Err(MigrationError::new(
            hs,
            PeerError::Version {
                chosen: reply.version,
                min: MIN_PROTOCOL_VERSION,
                max: PROTOCOL_VERSION,
            },
        ));
    }
    if reply.streams > config.streams {
        return Err(MigrationError::new(
            hs,
            PeerError::TooManyStreams {
                granted: reply.streams,
                asked: config.streams,
            },
        ));
    }
    // Open the extra page streams (only when more than one was granted).
    let mut streams: Vec<FrameWriter<Box<dyn Transport>>> = Vec::new();
    if reply.streams > 1 {
        let Some(opener) = opener else {
            return Err(MigrationError::new(hs, needs_opener(reply.streams)));
        };
        for index in 0..reply.streams {
            let stream_err = |kind: ErrorKind| {
                MigrationError::new(
                    hs,
                    ErrorKind::Stream {
                        index,
                        source: Box::new(kind),
                    },
                )
            };
            let mut t = opener
                .open()
                .map_err(|e| stream_err(ProtocolError::Io(e).into()))?;
            t.set_write_timeout(Some(config.io_timeout))
                .map_err(|e| stream_err(ProtocolError::Io(e).into()))?;
            cancel.attach(t.try_clone().ok());
            links.extend(t.try_clone().ok());
            let mut w = FrameWriter::new(t);
            w.send(&StreamHello {
                token: reply.token,
                index,
            })
            .and_then(|_| w.flush())
            .map_err(|e| stream_err(e.into()))?;
            streams.push(w);
        }
    }
    report.streams = reply.streams;
    progress(&Progress::Accepted);

    // Measure the state (see `measure_state`).
    let (state_time, sections) = measure_state(vm, paused, config.downtime_limit)?;
    // A state that cannot travel is refused now, not after the pause.
    let frames = state_frames(sections.clone(), MAX_FRAME_PAYLOAD)
        .map_err(|e| MigrationError::new(hs, e))?;
    report.state_frames = frames.len() as u32;
    check_old_peer(reply.version, paused, frames.len())?;
    let state_bytes: u64 = sections
        .iter()
        .map(|s| s.data.len() as u64 + s.name.len() as u64 + 16)
        .sum();
    report.state_bytes = state_bytes;

    let ram = HostRam::new(vm.memory(), &layout).ok_or_else(|| {
        MigrationError::new(
            hs,
            VmError::Incompatible("guest memory is not one mapping per region".into()),
        )
    })?;
    let mut tracker = vm.dirty_tracker().map_err(|e| MigrationError::new(hs, e))?;
    report.dirty_tracking = tracker.describe();
    let lifted = Arc::new(AtomicBool::new(false));
    let new_sender = |fw, ram, rate| PageSender {
        fw,
        batch: PageBatch::with_capacity(
            (config.batch_pages.max(1) as usize) * PAGE_SIZE as usize + 4096,
        ),
        batch_pages: u64::from(config.batch_pages.max(1)),
        ram,
        layout: layout.clone(),
        pacer: Pacer::new(rate, lifted.clone()),
        counts: Counts::default(),
        skip_zero: true,
        skip_untouched: false,
        skipped: 0,
        pool: None,
        last_control: Instant::now(),
        lz4: config.compress.then(Vec::new),
        clear_time: Duration::ZERO,
        alive_every: keepalive_every(config.io_timeout),
    };
    let nstreams = streams.len() as u64;
    let per_stream_rate = config.max_bandwidth.map(|r| (r / nstreams.max(1)).max(1));
    let workers: Vec<PageSender<'_>> = streams
        .into_iter()
        .map(|w| new_sender(w, ram.clone(), per_stream_rate))
        .collect();
    let mut sender = new_sender(fw, ram, config.max_bandwidth);
    tracker.start().map_err(|e| MigrationError::new(hs, e))?;
    report.setup_ms = ms(started.elapsed());

    let throttler = Throttler::default();
    // An operator-paused VM is never throttled (the throttler resumes the
    // vCPUs it parked) — nor does it dirty memory.
    let throttle_target = if config.auto_converge && !paused {
        vm.throttle()
    } else {
        None
    };
    if config.auto_converge && throttle_target.is_none() {
        report.throttle_max_pct = None;
    }
    let failed = Arc::new(AtomicBool::new(false));
    let first_failed = Arc::new(AtomicU32::new(u32::MAX));
    let mut stream_bytes = 0u64;
    let outcome = std::thread::scope(|s| {
        if !workers.is_empty() {
            let mut pool = StreamPool {
                jobs: Vec::new(),
                done: Vec::new(),
                failed: failed.clone(),
                first_failed: first_failed.clone(),
            };
            for (i, w) in workers.into_iter().enumerate() {
                let (jtx, jrx) = crossbeam_channel::bounded(4);
                let (dtx, drx) = crossbeam_channel::bounded(1);
                let failed = &*failed;
                let first_failed = &*first_failed;
                let spawned = std::thread::Builder::new()
                    .name(format!("livemig-stream{i}"))
                    .spawn_scoped(s, move || {
                        stream_worker(i as u32, w, jrx, dtx, failed, first_failed)
                    });
                if let Err(e) = spawned {
                    return Err(MigrationError::new(
                        hs,
                        InternalError::Spawn {
                            what: "page stream",
                            source: e,
                        },
                    ));
                }
                pool.jobs.push(jtx);
                pool.done.push(drx);
            }
            sender.pool = Some(pool);
        }
        if let Some(t) = throttle_target {
            let th = &throttler;
            let spawned = std::thread::Builder::new()
                .name("livemig-throttle".into())
                .spawn_scoped(s, move || th.run(t));
            if let Err(e) = spawned {
                log::warn!("auto-converge unavailable: {e}");
                throttler.exited.store(true, Ordering::SeqCst);
            }
        } else {
            throttler.exited.store(true, Ordering::SeqCst);
        }
        let r = precopy_and_switch(
            vm,
            &mut *tracker,
            &mut sender,
            &mut fr,
            config,
            cancel,
            progress,
            report,
            state_time,
            state_bytes,
            &throttler,
            &links,
        );
        throttler.finish(true);
        // Stop the stream threads (on success they have already finished).
        if let Some(pool) = sender.pool.take() {
            drop(pool.jobs);
            for rx in &pool.done {
                while rx.recv().is_ok() {}
            }
        }
        stream_bytes = sender.counts.bytes;
        r
    });
    let committed = matches!(&outcome, Ok(())) || matches!(&outcome, Err(e) if e.is_ambiguous());
    if let Err(e) = tracker.stop() {
        log::error!("stopping dirty logging: {e}");
    }
    report.bytes_sent = if nstreams > 0 {
        // Pages went over the streams; add the control connection's bytes.
        stream_bytes + sender.fw.bytes_written()
    } else {
        sender.fw.bytes_written()
    };
    if let Err(e) = &outcome {
        if !committed {
            // Fail safe: the source keeps the guest, in the run state the
            // operator left it in.
            if !paused {
                if let Err(re) = vm.resume() {
                    log::error!("resuming the source after a failed migration: {re}");
                }
            }
            let msg = ErrorMsg {
                phase: e.phase.to_string(),
                message: e.kind.to_string(),
            };
            let _ = sender.fw.send(&msg);
            // A peer-side failure usually shows up here as a broken pipe;
            // fetch the peer's own reason if it sent one.
            if let ErrorKind::Protocol(pe) = &e.kind {
                if pe.is_disconnect() {
                    let _ = fr
                        .get_mut()
                        .set_read_timeout(Some(Duration::from_millis(200)));
                    if let Ok(f) = fr.read_frame() {
                        if f.kind == MsgKind::Error {
                            if let Ok(m) = ErrorMsg::decode(f.payload) {
                                return Err(MigrationError::new(
                                    e.phase,
                                    ErrorKind::Remote {
                                        phase: m.phase,
                                        message: m.message,
                                    },
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    outcome
}

/// `streams` page streams need a [`StreamOpener`]: a setting that does not
/// fit the call.
fn needs_opener(streams: u32) -> crate::policy::ConfigError {
    crate::policy::ConfigError {
        field: "streams",
        value: streams.to_string(),
        rule: "needs a StreamOpener (use migrate_streams)".into(),
    }
}
