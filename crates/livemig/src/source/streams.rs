//! The page-stream threads of a multi-stream migration.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::sender::{Counts, PageSender};
use crate::error::{ErrorKind, InternalError, MigrationError, Phase};
use crate::protocol::{MsgKind, ProtocolError};

/// Work for one page-stream thread.
pub(super) enum Job {
    /// Send these runs `(first_page, npages)` of `region`.
    Runs {
        region: usize,
        runs: Vec<(u64, u64)>,
        skip_zero: bool,
    },
    /// Flush what is buffered, then report the counts since the last report.
    Flush,
    /// Flush, send `Complete` on the stream, report, and exit.
    Finish,
}

/// The page-stream threads of a multi-stream migration.
pub(super) struct StreamPool {
    pub(super) jobs: Vec<crossbeam_channel::Sender<Job>>,
    pub(super) done: Vec<crossbeam_channel::Receiver<Result<Counts, ProtocolError>>>,
    /// Set once a stream has failed (its thread then drops further work).
    pub(super) failed: Arc<AtomicBool>,
    /// Index of the stream that failed first (`u32::MAX`: none).
    pub(super) first_failed: Arc<AtomicU32>,
}

impl StreamPool {
    pub(super) fn dispatch(&self, index: u32, job: Job) -> Result<(), MigrationError> {
        self.jobs
            .get(index as usize)
            .and_then(|tx| tx.send(job).ok())
            .ok_or_else(|| MigrationError::new(Phase::Handshake, InternalError::StreamGone(index)))
    }

    /// Sends `job` (Flush or Finish) to every stream and collects the counts;
    /// `alive` is called at least every `every` while it waits (the
    /// control connection's keepalive: a paced stream may take long).
    pub(super) fn barrier(
        &self,
        finish: bool,
        phase: Phase,
        every: Duration,
        alive: &mut dyn FnMut() -> Result<(), ProtocolError>,
    ) -> Result<Counts, MigrationError> {
        for (i, tx) in self.jobs.iter().enumerate() {
            let job = if finish { Job::Finish } else { Job::Flush };
            if tx.send(job).is_err() {
                return Err(MigrationError::new(
                    phase,
                    ErrorKind::Stream {
                        index: i as u32,
                        source: Box::new(InternalError::Exited.into()),
                    },
                ));
            }
        }
        let mut total = Counts::default();
        let mut errors = Vec::new();
        for (i, rx) in self.done.iter().enumerate() {
            let got = loop {
                match rx.recv_timeout(every) {
                    Ok(r) => break Ok(r),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                        alive().map_err(|e| MigrationError::new(phase, e))?;
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break Err(()),
                }
            };
            match got {
                Ok(Ok(c)) => total.add(c),
                Ok(Err(e)) => errors.push((i, ErrorKind::Protocol(e))),
                Err(()) => errors.push((i, InternalError::Exited.into())),
            }
        }
        // Name the stream that failed first, not the ones that broke after.
        let first = self.first_failed.load(Ordering::SeqCst) as usize;
        let pick = errors.iter().position(|(i, _)| *i == first).unwrap_or(0);
        let first_err = (!errors.is_empty()).then(|| errors.swap_remove(pick));
        match first_err {
            None => Ok(total),
            Some((i, kind)) => Err(MigrationError::new(
                phase,
                ErrorKind::Stream {
                    index: i as u32,
                    source: Box::new(kind),
                },
            )),
        }
    }
}

/// One page-stream thread: sends what it is given on its own connection.
pub(super) fn stream_worker(
    index: u32,
    mut sender: PageSender<'_>,
    jobs: crossbeam_channel::Receiver<Job>,
    done: crossbeam_channel::Sender<Result<Counts, ProtocolError>>,
    failed: &AtomicBool,
    first_failed: &AtomicU32,
) {
    let fail = |e: ProtocolError| {
        if !failed.swap(true, Ordering::SeqCst) {
            first_failed.store(index, Ordering::SeqCst);
        }
        e
    };
    let mut error: Option<ProtocolError> = None;
    let mut reported = Counts::default();
    loop {
        let job = match jobs.recv_timeout(sender.alive_every) {
            Ok(j) => j,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if error.is_none() {
                    let r = sender
                        .fw
                        .write_frame(MsgKind::Keepalive, &[])
                        .and_then(|_| sender.fw.flush());
                    if let Err(e) = r {
                        error = Some(fail(e));
                    }
                }
                continue;
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        };
        let finish = matches!(job, Job::Finish);
        match job {
            Job::Runs {
                region,
                runs,
                skip_zero,
            } => {
                if error.is_none() {
                    sender.skip_zero = skip_zero;
                    for (first, n) in runs {
                        if let Err(e) = sender.send_run(region, first, n) {
                            error = Some(fail(e));
                            break;
                        }
                    }
                }
            }
            Job::Flush | Job::Finish => {
                if error.is_none() {
                    let mut r = sender.flush();
                    if finish {
                        r = r.and_then(|_| sender.fw.write_frame(MsgKind::Complete, &[]));
                    }
                    if let Err(e) = r.and_then(|_| sender.fw.flush()) {
                        error = Some(fail(e));
                    }
                }
                let reply = match error.take() {
                    Some(e) => {
                        // Report once; later barriers see the thread gone.
                        let _ = done.send(Err(e));
                        return;
                    }
                    None => {
                        let c = sender.counts;
                        let delta = Counts {
                            pages: c.pages - reported.pages,
                            zero: c.zero - reported.zero,
                            bytes: c.bytes - reported.bytes,
                        };
                        reported = c;
                        Ok(delta)
                    }
                };
                if done.send(reply).is_err() || finish {
                    return;
                }
            }
        }
    }
}
