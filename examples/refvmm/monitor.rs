//! What every API client may know about this VMM's outgoing migration, and
//! the one way to cancel it.
//!
//! The engine reports a migration through its progress callback
//! ([`livemig::report::Progress`]: handshake accepted, each pre-copy round,
//! paused for the stop-and-copy, completed). Between rounds (a round may take
//! seconds on a capped link) the bytes written so far come from
//! [`CountingTransport`], which wraps every connection of the migration.
//!
//! Cancel is refused once the engine reported `Paused`: from the
//! stop-and-copy on, the source is about to send `Go`, and shutting its
//! connections down after `Go` would turn a finished migration into an
//! unknown outcome. Before that, [`CancelToken::cancel`] leaves the guest on
//! the source as it was.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use livemig::report::{Progress, Report, RoundReport};
use livemig::transport::{StreamOpener, Transport};
use livemig::{CancelToken, MigrationConfig, MigrationError};
use serde_json::{json, Value};

const PAGE_SIZE: f64 = 4096.0;

/// Where a running migration is, in QEMU's `query-migrate` words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Connecting and the handshake.
    Setup,
    /// Pre-copy rounds: the guest runs; cancel is possible.
    Active,
    /// Cancel requested, not yet finished.
    Cancelling,
    /// Paused for the stop-and-copy and the switchover (QEMU's `device`).
    Device,
}

impl Stage {
    fn status(self) -> &'static str {
        match self {
            Stage::Setup => "setup",
            Stage::Active => "active",
            Stage::Cancelling => "cancelling",
            Stage::Device => "device",
        }
    }
}

/// Why a cancel was not done.
#[derive(Debug, thiserror::Error)]
pub enum CancelRefused {
    /// Nothing to cancel.
    #[error("no migration is running")]
    NotRunning,
    /// The switchover has begun.
    #[error("too late to cancel: the guest is paused for the switchover, which completes or fails on its own")]
    Switchover,
}

/// A running migration.
struct Running {
    cancel: CancelToken,
    /// Post-copy's switch request, when the migration offers post-copy.
    switch: Option<livemig::source::postcopy::SwitchRequest>,
    /// Why the migration switched to post-copy, once it did.
    postcopy: Option<String>,
    /// Post-copy's recovery from a broken link, when it offers post-copy.
    resume: Option<crate::postcopy_recovery::ResumeGate>,
    cancelled_by: Option<String>,
    stage: Stage,
    started: Instant,
    setup_ms: Option<f64>,
    memory_bytes: u64,
    config: Limits,
    /// Bytes written on all of the migration's connections.
    sent: Arc<AtomicU64>,
    /// The round now running (0 = the full pass).
    round: u32,
    round_started: Instant,
    sent_at_round_start: u64,
    last_round: Option<RoundReport>,
    pages: u64,
    zero_pages: u64,
    paused_remaining: Option<u64>,
}

/// The limits asked for, echoed in the status.
#[derive(Debug, Clone, Copy)]
struct Limits {
    downtime_limit_ms: f64,
    max_bandwidth: Option<u64>,
}

/// The running migration and the last one's final status, shared by every
/// API client of the VMM.
#[derive(Default)]
pub struct MigrationMonitor {
    running: Mutex<Option<Running>>,
    last: Mutex<Option<Value>>,
    /// A `dirty-rate` measurement runs (it has its own dirty tracker):
    /// a migration must not start meanwhile, nor it during a migration.
    measuring: std::sync::atomic::AtomicBool,
}

/// Held while a `dirty-rate` measurement runs; ends it when dropped.
pub struct Measuring<'a>(&'a MigrationMonitor);

impl Drop for Measuring<'_> {
    fn drop(&mut self) {
        self.0.measuring.store(false, Ordering::SeqCst);
    }
}

/// Held by the thread that runs a migration; ends it in the monitor when
/// dropped.
pub struct Active<'a> {
    monitor: &'a MigrationMonitor,
    /// The token the engine watches.
    pub cancel: CancelToken,
    sent: Arc<AtomicU64>,
    finished: bool,
}

impl MigrationMonitor {
    fn lock(&self) -> MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_last(&self) -> MutexGuard<'_, Option<Value>> {
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a migration of `memory_bytes` about to start; refused
    /// while another one runs.
    pub fn begin(
        &self,
        memory_bytes: u64,
        cfg: &MigrationConfig,
    ) -> Result<Active<'_>, &'static str> {
        let mut g = self.lock();
        if g.is_some() {
            return Err("refused: a migration of this VM is running");
        }
        if self.measuring.load(Ordering::SeqCst) {
            return Err(
                "refused: a dirty-rate measurement of this VM is running; try again when it ends",
            );
        }
        let cancel = CancelToken::new();
        let sent = Arc::new(AtomicU64::new(0));
        let now = Instant::now();
        *g = Some(Running {
            cancel: cancel.clone(),
            switch: None,
            postcopy: None,
            resume: None,
            cancelled_by: None,
            stage: Stage::Setup,
            started: now,
            setup_ms: None,
            memory_bytes,
            config: Limits {
                downtime_limit_ms: cfg.downtime_limit.as_secs_f64() * 1e3,
                max_bandwidth: cfg.max_bandwidth,
            },
            sent: sent.clone(),
            round: 0,
            round_started: now,
            sent_at_round_start: 0,
            last_round: None,
            pages: 0,
            zero_pages: 0,
            paused_remaining: None,
        });
        Ok(Active {
            monitor: self,
            cancel,
            sent,
            finished: false,
        })
    }

    /// Registers a dirty-rate measurement; refused while a migration or
    /// another measurement runs.
    pub fn begin_measure(&self) -> Result<Measuring<'_>, &'static str> {
        let g = self.lock();
        if g.is_some() {
            return Err("refused: a migration of this VM is running");
        }
        if self.measuring.swap(true, Ordering::SeqCst) {
            return Err("refused: a dirty-rate measurement of this VM is already running");
        }
        drop(g);
        Ok(Measuring(self))
    }

    /// Cancels the running migration on behalf of `by` (said in the status
    /// and the result), unless the switchover has begun.
    pub fn cancel(&self, by: &str) -> Result<(), CancelRefused> {
        let mut g = self.lock();
        let r = g.as_mut().ok_or(CancelRefused::NotRunning)?;
        match r.stage {
            Stage::Device => Err(CancelRefused::Switchover),
            Stage::Cancelling => Ok(()),
            Stage::Setup | Stage::Active => {
                // Under the lock: the progress callback cannot report
                // `Paused` before the token is cancelled, and the engine
                // looks at the token after the pause, before `Go`.
                r.cancel.cancel();
                r.stage = Stage::Cancelling;
                r.cancelled_by = Some(by.to_string());
                Ok(())
            }
        }
    }

    /// Asks the running migration to switch to post-copy after its
    /// current pre-copy round (API `migrate-postcopy`).
    pub fn request_postcopy(&self) -> Result<(), &'static str> {
        let g = self.lock();
        let r = g.as_ref().ok_or("no migration is running")?;
        let switch = r.switch.as_ref().ok_or(
            "this migration does not offer post-copy (start it with --postcopy-on-request, \
             --postcopy-auto or --postcopy-after-rounds)",
        )?;
        if !matches!(r.stage, Stage::Setup | Stage::Active) {
            return Err("too late: the migration is past its pre-copy rounds");
        }
        switch.request();
        Ok(())
    }

    /// API `migrate-resume`: continues a post-copy that waits for resume
    /// (its retries ran out), to `to` if given.
    pub fn request_resume(
        &self,
        to: Option<livemig::transport::Endpoint>,
    ) -> Result<(), &'static str> {
        let g = self.lock();
        let gate = g.as_ref().and_then(|r| r.resume.as_ref());
        gate.ok_or("no post-copy is waiting for resume")?
            .request_resume(to)
    }

    /// API `migrate-cancel` (from an API client, not the asking client's
    /// Ctrl-C or hang-up) while a post-copy waits for resume: gives it up.
    pub fn give_up_postcopy(&self, by: &str) -> Result<(), &'static str> {
        let g = self.lock();
        let gate = g.as_ref().and_then(|r| r.resume.as_ref());
        gate.ok_or("no post-copy is waiting for resume")?
            .give_up(by)
    }

    /// The `migrate-status` reply: the running migration, else the last
    /// one's final status, else `none`.
    pub fn status(&self) -> Value {
        if let Some(r) = self.lock().as_ref() {
            return r.status();
        }
        self.lock_last()
            .clone()
            .unwrap_or_else(|| json!({"result":"ok","status":"none"}))
    }
}

impl Active<'_> {
    /// Wraps the migration's main connection so its bytes are counted.
    pub fn count(&self, t: Box<dyn Transport>) -> Box<dyn Transport> {
        Box::new(CountingTransport {
            inner: t,
            sent: self.sent.clone(),
        })
    }

    /// Wraps the opener of the extra page streams likewise.
    pub fn count_opener<'o>(&self, o: &'o mut dyn StreamOpener) -> CountingOpener<'o> {
        CountingOpener {
            inner: o,
            sent: self.sent.clone(),
        }
    }

    /// Lets API `migrate-postcopy` requests reach this migration.
    pub fn allow_postcopy_request(&self, switch: livemig::source::postcopy::SwitchRequest) {
        if let Some(r) = self.monitor.lock().as_mut() {
            r.switch = Some(switch);
        }
    }

    /// Lets API `migrate-resume` requests reach this migration.
    pub fn allow_resume(&self, gate: crate::postcopy_recovery::ResumeGate) {
        if let Some(r) = self.monitor.lock().as_mut() {
            r.resume = Some(gate);
        }
    }

    /// Wraps a connection opened later (a post-copy resume) so its bytes
    /// are counted, from any thread.
    pub fn counter(&self) -> impl Fn(Box<dyn Transport>) -> Box<dyn Transport> + Send + 'static {
        let sent = self.sent.clone();
        move |t| {
            Box::new(CountingTransport {
                inner: t,
                sent: sent.clone(),
            }) as Box<dyn Transport>
        }
    }

    /// Records an engine progress event.
    pub fn progress(&self, p: &Progress) {
        let mut g = self.monitor.lock();
        if let Some(r) = g.as_mut() {
            r.progress(p);
        }
    }

    /// Who cancelled, if anyone did.
    pub fn cancelled_by(&self) -> Option<String> {
        self.monitor.lock().as_ref()?.cancelled_by.clone()
    }

    /// Ends a migration that failed before the engine ran (connecting to
    /// the destination): the final status says why.
    pub fn abort(mut self, why: &str) {
        self.end_failed(why);
    }

    fn end_failed(&mut self, why: &str) {
        self.finished = true;
        let last = self.monitor.lock().take().map(|r| {
            let mut v = r.status();
            v["status"] = json!("failed");
            v["error-desc"] = json!(why);
            v
        });
        *self.monitor.lock_last() = last;
    }

    /// Ends the migration in the monitor with its outcome; the final
    /// status stays readable until the next migration.
    pub fn finish(mut self, outcome: &Result<Report, MigrationError>) {
        self.finished = true;
        let last = self.monitor.lock().take().map(|r| r.final_status(outcome));
        *self.monitor.lock_last() = last;
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.end_failed("the migration ended before it reached the engine");
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Running {
    fn progress(&mut self, p: &Progress) {
        match p {
            Progress::Accepted => {
                self.setup_ms = Some(ms(self.started.elapsed()));
                self.round_started = Instant::now();
                self.sent_at_round_start = self.sent.load(Ordering::Relaxed);
                if self.stage == Stage::Setup {
                    self.stage = Stage::Active;
                }
            }
            Progress::Round(rr) => {
                self.pages += rr.pages;
                self.zero_pages += rr.zero_pages;
                self.round = rr.round + 1;
                self.round_started = Instant::now();
                self.sent_at_round_start = self.sent.load(Ordering::Relaxed);
                self.last_round = Some(rr.clone());
            }
            Progress::Paused { remaining_pages } => {
                self.stage = Stage::Device;
                self.paused_remaining = Some(remaining_pages * PAGE_SIZE as u64);
            }
            Progress::Postcopy { reason } => self.postcopy = Some(reason.clone()),
            // Completed, and events of later releases.
            _ => {}
        }
    }

    /// Bytes still to send: what the last round left dirty (all of memory
    /// before the first round: an upper bound, as pages the guest never
    /// touched are skipped), less what this round has sent so far.
    fn remaining(&self, sent_in_round: u64) -> u64 {
        if let Some(p) = self.paused_remaining {
            return p;
        }
        let to_send = match &self.last_round {
            Some(rr) => rr.dirty_pages_after * PAGE_SIZE as u64,
            None => self.memory_bytes,
        };
        to_send.saturating_sub(sent_in_round)
    }

    /// Megabits per second written in this round so far (the last round's
    /// rate in its first 100 ms).
    fn mbps(&self, sent_in_round: u64) -> Option<f64> {
        let t = self.round_started.elapsed();
        if t >= Duration::from_millis(100) && self.stage != Stage::Setup {
            return Some(sent_in_round as f64 * 8.0 / t.as_secs_f64() / 1e6);
        }
        self.last_round.as_ref().map(|rr| rr.bandwidth_mbps * 8.0)
    }

    fn status(&self) -> Value {
        let sent = self.sent.load(Ordering::Relaxed);
        let in_round = sent.saturating_sub(self.sent_at_round_start);
        let lr = self.last_round.as_ref();
        let mut v = json!({
            "result": "ok",
            "status": self.stage.status(),
            "phase": match (self.stage, &self.postcopy) {
                (Stage::Setup, _) => "handshake",
                (Stage::Active | Stage::Cancelling, _) => "pre-copy",
                (Stage::Device, None) => "stop-and-copy",
                (Stage::Device, Some(_)) => "post-copy",
            },
            "postcopy-reason": self.postcopy,
            "round": self.round,
            "total-time": ms(self.started.elapsed()),
            "setup-time": self.setup_ms,
            "expected-downtime": lr.map(|r| r.expected_downtime_ms),
            "downtime-limit": self.config.downtime_limit_ms,
            "max-bandwidth": self.config.max_bandwidth,
            "cpu-throttle-percentage": lr.map_or(0, |r| r.throttle_pct),
            "ram": {
                "total": self.memory_bytes,
                "transferred": sent,
                "remaining": self.remaining(in_round),
                "mbps": self.mbps(in_round),
                "dirty-pages-rate": lr.map(|r| r.dirty_rate_mbps * 1e6 / PAGE_SIZE),
                "dirty-sync-count": self.last_round.as_ref().map_or(0, |r| r.round + 1),
                "normal": self.pages,
                "duplicate": self.zero_pages,
                "page-size": PAGE_SIZE as u64,
            },
            "cancel-requested-by": self.cancelled_by,
        });
        if let Some((status, desc)) = self.resume.as_ref().and_then(|g| g.status()) {
            v["status"] = json!(status);
            v["postcopy-recovery"] = json!(desc);
        }
        if let Some(n) = self.resume.as_ref().map(|g| g.resumes()).filter(|n| *n > 0) {
            v["postcopy-resumes"] = json!(n);
        }
        v
    }

    fn final_status(&self, outcome: &Result<Report, MigrationError>) -> Value {
        let mut v = self.status();
        let (status, error) = match outcome {
            Ok(report) => {
                v["downtime"] = json!(report.downtime_ms);
                v["ram"]["remaining"] = json!(0);
                ("completed", None)
            }
            Err(e) if e.is_ambiguous() => ("ambiguous", Some(e.to_string())),
            Err(e) if matches!(e.kind, livemig::ErrorKind::PostcopyInterrupted { .. }) => {
                ("postcopy-interrupted", Some(e.to_string()))
            }
            Err(e) if matches!(e.kind, livemig::ErrorKind::Cancelled) => {
                let by = self.cancelled_by.as_deref().unwrap_or("the engine");
                ("cancelled", Some(format!("cancelled by {by}")))
            }
            Err(e) => ("failed", Some(e.to_string())),
        };
        v["status"] = json!(status);
        v["error-desc"] = json!(error);
        v
    }
}

/// A [`Transport`] that counts the bytes written through it (and through
/// its clones) into a shared counter.
pub struct CountingTransport {
    inner: Box<dyn Transport>,
    sent: Arc<AtomicU64>,
}

impl io::Read for CountingTransport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl io::Write for CountingTransport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    /// Forwarded, so that a frame's header and payload (every slice the
    /// frame writer gathers) go out in one call, as on the bare transport.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let n = self.inner.write_vectored(bufs)?;
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Transport for CountingTransport {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.inner.set_read_timeout(timeout)
    }

    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.inner.set_write_timeout(timeout)
    }

    fn shutdown(&self) -> io::Result<()> {
        self.inner.shutdown()
    }

    fn peer(&self) -> String {
        self.inner.peer()
    }

    fn try_clone(&self) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(CountingTransport {
            inner: self.inner.try_clone()?,
            sent: self.sent.clone(),
        }))
    }

    fn unacked_bytes(&self) -> Option<u64> {
        self.inner.unacked_bytes()
    }

    fn round_trip(&self) -> Option<Duration> {
        self.inner.round_trip()
    }
}

/// A [`StreamOpener`] whose connections count their bytes into the
/// migration's counter.
pub struct CountingOpener<'o> {
    inner: &'o mut dyn StreamOpener,
    sent: Arc<AtomicU64>,
}

impl StreamOpener for CountingOpener<'_> {
    fn open(&mut self) -> io::Result<Box<dyn Transport>> {
        let t = self.inner.open()?;
        Ok(Box::new(CountingTransport {
            inner: t,
            sent: self.sent.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame's header and payload (and a gathered frame's every part)
    /// leave in one `write_vectored` call: the engine's frame writer hands
    /// them over together, and a counting wrapper that took only the first
    /// slice per call (std's default) made every frame two or more writes,
    /// each its own TCP segment with Nagle off.
    #[test]
    fn counting_transport_writes_every_slice_in_one_call() {
        use std::io::{IoSlice, Write};
        let (a, _b) = livemig::transport::mem::pair();
        let sent = Arc::new(AtomicU64::new(0));
        let mut t = CountingTransport {
            inner: Box::new(a),
            sent: sent.clone(),
        };
        let bufs = [IoSlice::new(b"header"), IoSlice::new(b"payload")];
        assert_eq!(t.write_vectored(&bufs).unwrap(), 13);
        assert_eq!(sent.load(Ordering::Relaxed), 13);
    }

    #[test]
    fn cancel_is_refused_once_paused_and_without_a_migration() {
        let m = MigrationMonitor::default();
        assert!(matches!(m.cancel("t"), Err(CancelRefused::NotRunning)));
        let a = m.begin(1 << 20, &MigrationConfig::default()).unwrap();
        assert!(m.begin(1 << 20, &MigrationConfig::default()).is_err());
        a.progress(&Progress::Accepted);
        assert_eq!(m.status()["status"], "active");
        a.progress(&Progress::Paused { remaining_pages: 3 });
        assert!(matches!(m.cancel("t"), Err(CancelRefused::Switchover)));
        assert!(!a.cancel.is_cancelled());
        assert_eq!(m.status()["ram"]["remaining"], 3 * 4096);
        drop(a);
        assert_eq!(m.status()["status"], "failed");
    }

    #[test]
    fn a_postcopy_request_reaches_only_a_migration_that_offers_postcopy() {
        use livemig::source::postcopy::SwitchRequest;
        let m = MigrationMonitor::default();
        assert!(m.request_postcopy().is_err(), "no migration runs");
        let a = m.begin(1 << 20, &MigrationConfig::default()).unwrap();
        a.progress(&Progress::Accepted);
        let err = m.request_postcopy().unwrap_err();
        assert!(err.contains("does not offer post-copy"), "{err}");
        let switch = SwitchRequest::new();
        a.allow_postcopy_request(switch.clone());
        m.request_postcopy().unwrap();
        assert!(switch.is_requested());
        a.progress(&Progress::Postcopy {
            reason: "requested".into(),
        });
        a.progress(&Progress::Paused { remaining_pages: 0 });
        let s = m.status();
        assert_eq!(s["phase"], "post-copy", "{s}");
        assert_eq!(s["postcopy-reason"], "requested", "{s}");
        assert!(m.request_postcopy().unwrap_err().contains("too late"));
    }

    #[test]
    fn cancel_before_the_switchover_trips_the_token_and_names_the_canceller() {
        let m = MigrationMonitor::default();
        let a = m.begin(1 << 20, &MigrationConfig::default()).unwrap();
        a.progress(&Progress::Accepted);
        m.cancel("client 7").unwrap();
        assert!(a.cancel.is_cancelled());
        let s = m.status();
        assert_eq!(s["status"], "cancelling");
        assert_eq!(s["cancel-requested-by"], "client 7");
        // A Paused that races the cancel does not make it look refusable.
        assert_eq!(a.cancelled_by().as_deref(), Some("client 7"));
    }

    #[test]
    fn a_migration_that_never_reached_the_engine_says_why() {
        let m = MigrationMonitor::default();
        let a = m.begin(1 << 20, &MigrationConfig::default()).unwrap();
        a.abort("connecting to tcp:127.0.0.1:1: refused");
        let s = m.status();
        assert_eq!(s["status"], "failed", "{s}");
        assert_eq!(s["error-desc"], "connecting to tcp:127.0.0.1:1: refused");
        // The next migration may start.
        assert!(m.begin(1 << 20, &MigrationConfig::default()).is_ok());
    }
}
