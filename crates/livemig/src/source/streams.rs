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

/// Starts one thread per page stream, each writing with its own sender.
pub(super) fn spawn<'scope, 'a: 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    senders: Vec<PageSender<'a>>,
) -> Result<StreamPool, MigrationError> {
    let failed = Arc::new(AtomicBool::new(false));
    let first_failed = Arc::new(AtomicU32::new(u32::MAX));
    let mut pool = StreamPool {
        jobs: Vec::new(),
        done: Vec::new(),
        failed: failed.clone(),
        first_failed: first_failed.clone(),
    };
    for (i, sender) in senders.into_iter().enumerate() {
        let (jtx, jrx) = crossbeam_channel::bounded(4);
        let (dtx, drx) = crossbeam_channel::bounded(1);
        let worker = Worker {
            index: i as u32,
            sender,
            done: dtx,
            failed: failed.clone(),
            first_failed: first_failed.clone(),
            error: None,
            reported: Counts::default(),
        };
        std::thread::Builder::new()
            .name(format!("livemig-stream{i}"))
            .spawn_scoped(scope, move || worker.run(jrx))
            .map_err(|source| {
                let what = "page stream";
                MigrationError::new(Phase::Handshake, InternalError::Spawn { what, source })
            })?;
        pool.jobs.push(jtx);
        pool.done.push(drx);
    }
    Ok(pool)
}

/// One page-stream thread: sends what it is given on its own connection.
struct Worker<'a> {
    index: u32,
    sender: PageSender<'a>,
    done: crossbeam_channel::Sender<Result<Counts, ProtocolError>>,
    failed: Arc<AtomicBool>,
    first_failed: Arc<AtomicU32>,
    /// The first failure: later work is dropped, the next barrier hears it.
    error: Option<ProtocolError>,
    /// The counts at the last report.
    reported: Counts,
}

impl Worker<'_> {
    fn run(mut self, jobs: crossbeam_channel::Receiver<Job>) {
        loop {
            let job = match jobs.recv_timeout(self.sender.alive_every) {
                Ok(j) => j,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    self.keepalive();
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            };
            match job {
                Job::Runs {
                    region,
                    runs,
                    skip_zero,
                } => self.send_runs(region, runs, skip_zero),
                Job::Flush => {
                    if !self.flush_and_report(false) {
                        return;
                    }
                }
                Job::Finish => {
                    self.flush_and_report(true);
                    return;
                }
            }
        }
    }

    /// Records the first failure of any stream.
    fn fail(&mut self, e: ProtocolError) {
        if !self.failed.swap(true, Ordering::SeqCst) {
            self.first_failed.store(self.index, Ordering::SeqCst);
        }
        self.error = Some(e);
    }

    fn keepalive(&mut self) {
        if self.error.is_none() {
            let fw = &mut self.sender.fw;
            if let Err(e) = fw
                .write_frame(MsgKind::Keepalive, &[])
                .and_then(|_| fw.flush())
            {
                self.fail(e);
            }
        }
    }

    fn send_runs(&mut self, region: usize, runs: Vec<(u64, u64)>, skip_zero: bool) {
        if self.error.is_some() {
            return;
        }
        self.sender.skip_zero = skip_zero;
        for (first, n) in runs {
            if let Err(e) = self.sender.send_run(region, first, n) {
                self.fail(e);
                return;
            }
        }
    }

    /// Flushes (with `finish`, ends the stream with `Complete`) and reports
    /// the counts since the last report, or the failure; whether the thread
    /// goes on.
    fn flush_and_report(&mut self, finish: bool) -> bool {
        if self.error.is_none() {
            let mut r = self.sender.flush();
            if finish {
                r = r.and_then(|_| self.sender.fw.write_frame(MsgKind::Complete, &[]));
            }
            if let Err(e) = r.and_then(|_| self.sender.fw.flush()) {
                self.fail(e);
            }
        }
        if let Some(e) = self.error.take() {
            // Report once; later barriers see the thread gone.
            let _ = self.done.send(Err(e));
            return false;
        }
        let c = self.sender.counts;
        let delta = c.since(&self.reported);
        self.reported = c;
        // The round ended: the wait for the next one is not the link's.
        self.sender.pause_lz4_window();
        self.done.send(Ok(delta)).is_ok()
    }
}
