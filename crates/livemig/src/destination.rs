//! The destination side: handshake → memory → state → `Ready` → `Go` →
//! resume → `Resumed`. See [`receive`].
//!
//! The stream is hostile until proven otherwise: every frame is checked
//! (length bound before allocation, sequence number, crc32c), every page
//! range is checked against the memory layout before a byte is written, and
//! the VM is only resumed after the state restored cleanly *and* the source
//! committed with `Go`. On any error the VM is dropped without ever running.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{ErrorKind, MigrationError, Phase};
use crate::protocol::{
    page_records, ErrorMsg, FrameReader, FrameWriter, Hello, HelloReply, Message, MsgKind,
    ProtocolError, Ready, Resumed, RoundEnd, State,
};
use crate::ram::HostRam;
use crate::state::Section;
use crate::transport::Transport;
use crate::vm::{check_layout, DestinationVm, VmDescription, VmError};

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
    /// Time to restore the state, ms.
    pub restore_ms: f64,
    /// Time to resume the vCPUs, ms.
    pub resume_ms: f64,
    /// From the handshake to the resume, ms.
    pub total_ms: f64,
}

/// Destination settings.
#[derive(Debug, Clone)]
pub struct ReceiveConfig {
    /// Timeout of every blocking read (the source sends continuously during
    /// rounds, so a silent source for this long is a dead source).
    pub io_timeout: Duration,
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
/// VM is returned running; on error it has been dropped without running.
pub fn receive<V, F>(
    transport: Box<dyn Transport>,
    config: &ReceiveConfig,
    create: F,
) -> Result<(V, ReceiveReport), MigrationError>
where
    V: DestinationVm,
    F: FnOnce(&VmDescription) -> Result<V, VmError>,
{
    let hs = Phase::Handshake;
    let mut rx = transport
        .try_clone()
        .map_err(|e| MigrationError::new(hs, ProtocolError::Io(e)))?;
    rx.set_read_timeout(Some(config.io_timeout))
        .map_err(|e| MigrationError::new(hs, ProtocolError::Io(e)))?;
    let mut fr = FrameReader::new(rx);
    let mut fw = FrameWriter::new(transport);
    let mut phase = hs;
    let result = run_destination(&mut fr, &mut fw, create, &mut phase);
    if let Err(e) = &result {
        // Tell the source why (best effort), unless the source itself failed.
        if !matches!(e.kind, ErrorKind::Remote { .. } | ErrorKind::Cancelled) {
            let msg = ErrorMsg {
                phase: e.phase.to_string(),
                message: e.kind.to_string(),
            };
            let _ = fw.send(&msg);
            let _ = fw.flush();
        }
        log::warn!("{e}");
    }
    result
}

fn run_destination<V, F>(
    fr: &mut FrameReader<Box<dyn Transport>>,
    fw: &mut FrameWriter<Box<dyn Transport>>,
    create: F,
    phase: &mut Phase,
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
        let r = HelloReply {
            accepted: false,
            reason: reason.clone(),
        };
        let _ = fw.send(&r);
        let _ = fw.flush();
        MigrationError::new(hs, ErrorKind::Refused(reason))
    };
    let hello = match Hello::decode(f.payload) {
        Ok(h) => h,
        Err(e) => return Err(refuse(fw, e.to_string())),
    };
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
    fw.send(&HelloReply {
        accepted: true,
        reason: String::new(),
    })
    .and_then(|_| fw.flush())
    .map_err(|e| MigrationError::new(hs, e))?;

    // Memory and state. `written` records which pages received data: the
    // fresh memory is zero, so a zero marker for a page never written costs
    // nothing (and must not touch, i.e. allocate, the page).
    let mut written = crate::bitmap::DirtyBitmap::new(&layout);
    *phase = Phase::Precopy(0);
    let mut sections: Option<Vec<Section>> = None;
    loop {
        let f = fr
            .read_frame()
            .map_err(|e| MigrationError::new(*phase, e))?;
        match f.kind {
            MsgKind::Pages => {
                for rec in page_records(f.payload) {
                    let rec = rec.map_err(|e| MigrationError::new(*phase, e))?;
                    let (region, page) = rec
                        .check(&layout)
                        .map_err(|e| MigrationError::new(*phase, e))?;
                    let n = u64::from(rec.npages);
                    let ok = match rec.data {
                        Some(data) => {
                            report.pages += n;
                            written.set_range(region, page, n);
                            ram.write_pages(region, page, data)
                        }
                        None => {
                            report.zero_pages += n;
                            let mut ok = true;
                            for p in page..page + n {
                                if written.is_set(region, p) {
                                    ok &= ram.zero_pages(region, p, 1);
                                    written.unset(region, p);
                                }
                            }
                            ok
                        }
                    };
                    if !ok {
                        return Err(MigrationError::new(
                            *phase,
                            ErrorKind::Invalid(format!(
                                "pages 0x{:x}+{} do not fit guest memory",
                                rec.gpa, rec.npages
                            )),
                        ));
                    }
                }
            }
            MsgKind::RoundEnd => {
                let r = RoundEnd::decode(f.payload).map_err(|e| MigrationError::new(*phase, e))?;
                report.rounds = r.round.saturating_add(1);
                *phase = Phase::Precopy(r.round.saturating_add(1));
            }
            MsgKind::State => {
                *phase = Phase::State;
                if sections.is_some() {
                    return Err(MigrationError::new(
                        *phase,
                        ErrorKind::Invalid("a second State frame".into()),
                    ));
                }
                let s = State::decode(f.payload).map_err(|e| MigrationError::new(*phase, e))?;
                sections = Some(s.sections);
            }
            MsgKind::Complete => break,
            MsgKind::Error => {
                let m = ErrorMsg::decode(f.payload).map_err(|e| MigrationError::new(*phase, e))?;
                return Err(MigrationError::new(
                    *phase,
                    ErrorKind::Remote {
                        phase: m.phase,
                        message: m.message,
                    },
                ));
            }
            MsgKind::Cancel => return Err(MigrationError::new(*phase, ErrorKind::Cancelled)),
            other => {
                return Err(MigrationError::new(
                    *phase,
                    ErrorKind::Unexpected {
                        got: format!("{other:?}"),
                        expected: "Pages, RoundEnd, State or Complete",
                    },
                ))
            }
        }
    }

    // Restore, then wait for the source's commitment before running.
    *phase = Phase::State;
    let sections = sections.ok_or_else(|| {
        MigrationError::new(
            Phase::State,
            ErrorKind::Invalid("Complete before any State".into()),
        )
    })?;
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
    vm.resume().map_err(|e| MigrationError::new(cp, e))?;
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
    report.bytes = fr.bytes_read();
    report.total_ms = ms(started.elapsed());
    Ok((vm, report))
}
