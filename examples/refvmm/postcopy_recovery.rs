//! The source's recovery from a link broken during post-copy: retries
//! within a deadline (`--postcopy-retry-for`), then waiting for an
//! operator's `migrate-resume` (or `migrate-cancel`, which gives up).
//!
//! The engine calls [`SourceRecovery::reconnect`] when a connection broke
//! after `Go`; it returns a new pair (the engine continues the copy) or
//! `None` (the engine fails with `PostcopyInterrupted`: the source stays
//! paused and exits without resuming the guest). Meanwhile the guest waits
//! on the destination, and the source keeps its memory.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use livemig::transport::{Endpoint, Transport};
use serde_json::{json, Value};

use crate::postcopy_resume::{reconnect_once, Pair, Token};

/// Where the recovery is.
#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// No break (or the copy continues on new connections).
    Running,
    /// Reconnecting by itself until the deadline.
    Retrying,
    /// The retries ran out: waiting for `migrate-resume`.
    Waiting,
    /// An operator asked to resume (to this endpoint, if given).
    ResumeAsked(Option<Endpoint>),
    /// An operator gave up.
    GiveUp(String),
}

struct State {
    phase: Phase,
    /// Why the link broke or the last attempt failed.
    last_error: Option<String>,
    /// Breaks the copy recovered from.
    resumes: u32,
}

/// What the API and the migration share about a post-copy's recovery.
#[derive(Clone)]
pub(crate) struct ResumeGate(Arc<(Mutex<State>, Condvar)>);

impl Default for ResumeGate {
    fn default() -> Self {
        ResumeGate(Arc::new((
            Mutex::new(State {
                phase: Phase::Running,
                last_error: None,
                resumes: 0,
            }),
            Condvar::new(),
        )))
    }
}

impl ResumeGate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    fn set(&self, phase: Phase, error: Option<String>) {
        let mut st = self.lock();
        st.phase = phase;
        if error.is_some() {
            st.last_error = error;
        }
        drop(st);
        self.0 .1.notify_all();
    }

    /// Moves to `to` unless an operator gave up meanwhile (which wins);
    /// records `error` either way.
    fn move_to(&self, to: Phase, error: Option<String>) {
        let mut st = self.lock();
        if error.is_some() {
            st.last_error = error;
        }
        if !matches!(st.phase, Phase::GiveUp(_)) {
            st.phase = to;
        }
        drop(st);
        self.0 .1.notify_all();
    }

    /// API `migrate-resume`: continue a post-copy whose retries ran out,
    /// to `to` (default: the endpoint it used).
    pub(crate) fn request_resume(&self, to: Option<Endpoint>) -> Result<(), &'static str> {
        let mut st = self.lock();
        match st.phase {
            Phase::Waiting => {
                st.phase = Phase::ResumeAsked(to);
                drop(st);
                self.0 .1.notify_all();
                Ok(())
            }
            Phase::Retrying | Phase::ResumeAsked(_) => {
                Err("the source is reconnecting already (migrate-status shows how it goes)")
            }
            _ => Err("no post-copy is waiting for resume"),
        }
    }

    /// API `migrate-cancel` while waiting for resume: the source gives up
    /// (it stays paused and exits; the guest cannot run anywhere).
    pub(crate) fn give_up(&self, by: &str) -> Result<(), &'static str> {
        let mut st = self.lock();
        match st.phase {
            Phase::Waiting | Phase::Retrying => {
                st.phase = Phase::GiveUp(by.to_string());
                drop(st);
                self.0 .1.notify_all();
                Ok(())
            }
            _ => Err("no post-copy is waiting for resume"),
        }
    }

    /// The `migrate-status` fields of the recovery: (status, description),
    /// while the link is broken.
    pub(crate) fn status(&self) -> Option<(&'static str, String)> {
        let st = self.lock();
        let why = st.last_error.clone().unwrap_or_default();
        match st.phase {
            Phase::Running | Phase::GiveUp(_) => None,
            Phase::Retrying | Phase::ResumeAsked(_) => Some((
                "postcopy-recover",
                format!("post-copy interrupted, reconnecting (last error: {why})"),
            )),
            Phase::Waiting => Some((
                "postcopy-paused",
                format!(
                    "post-copy interrupted, waiting for resume (last error: {why}; \
                     `refvmm migrate --resume` continues, `refvmm migrate-cancel` gives up)"
                ),
            )),
        }
    }

    /// Breaks the copy recovered from.
    pub(crate) fn resumes(&self) -> u32 {
        self.lock().resumes
    }

    /// Waits while retrying is not over: returns the operator's choice.
    fn wait_for_operator(&self) -> Phase {
        let mut st = self.lock();
        while st.phase == Phase::Waiting {
            st = self.0 .1.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.phase.clone()
    }
}

/// Sends one event line to the client that asked for the migration.
pub(crate) type Notify = Arc<dyn Fn(&Value) + Send + Sync>;

/// Wraps a new connection as the migration's first ones are (counted).
pub(crate) type Wrap = Box<dyn Fn(Box<dyn Transport>) -> Box<dyn Transport> + Send>;

/// The engine's `reconnect` on the source.
pub(crate) struct SourceRecovery {
    pub(crate) endpoint: Endpoint,
    pub(crate) token: Token,
    pub(crate) retry_for: Duration,
    pub(crate) gate: ResumeGate,
    pub(crate) notify: Notify,
    pub(crate) wrap: Wrap,
}

/// Pause between two reconnection attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

impl SourceRecovery {
    /// A new pair of connections, or `None` when an operator gave up.
    pub(crate) fn reconnect(&mut self) -> Option<Pair> {
        let mut deadline = Instant::now() + self.retry_for;
        self.gate
            .move_to(Phase::Retrying, Some("the link broke".into()));
        self.event(
            "postcopy-interrupted",
            format!(
                "post-copy interrupted: reconnecting to {} for up to {} s",
                self.endpoint,
                self.retry_for.as_secs()
            ),
        );
        loop {
            match self.try_until(deadline) {
                Ok(pair) => return Some(pair),
                Err(Some(by)) => return self.gave_up(&by),
                Err(None) => {}
            }
            self.gate.move_to(Phase::Waiting, None);
            let msg = self.gate.status().map(|s| s.1).unwrap_or_default();
            eprintln!("refvmm: {msg}");
            self.event("postcopy-paused", msg);
            match self.gate.wait_for_operator() {
                Phase::ResumeAsked(to) => {
                    if let Some(to) = to {
                        self.endpoint = to;
                    }
                    deadline = Instant::now() + self.retry_for.max(Duration::from_secs(1));
                    self.gate.move_to(Phase::Retrying, None);
                    self.event(
                        "postcopy-resuming",
                        format!("resuming post-copy to {}", self.endpoint),
                    );
                }
                Phase::GiveUp(by) => return self.gave_up(&by),
                _ => {}
            }
        }
    }

    /// Attempts until `deadline`: the pair, or `Err(Some(by))` when an
    /// operator gave up meanwhile, `Err(None)` when the time ran out.
    fn try_until(&mut self, deadline: Instant) -> Result<Pair, Option<String>> {
        loop {
            if let Phase::GiveUp(by) = self.gate.lock().phase.clone() {
                return Err(Some(by));
            }
            match reconnect_once(&self.endpoint, &self.token) {
                Ok((control, fault)) => {
                    // Connected: too late to give up (the destination
                    // continues); the copy goes on.
                    let mut st = self.gate.lock();
                    st.phase = Phase::Running;
                    st.resumes += 1;
                    drop(st);
                    let msg = format!("post-copy resumed on new connections to {}", self.endpoint);
                    eprintln!("refvmm: {msg}");
                    self.event("postcopy-resumed", msg);
                    return Ok(((self.wrap)(control), (self.wrap)(fault)));
                }
                Err(e) => self.gate.move_to(Phase::Retrying, Some(e)),
            }
            if Instant::now() + RETRY_PAUSE > deadline {
                return Err(None);
            }
            std::thread::sleep(RETRY_PAUSE);
        }
    }

    fn gave_up(&self, by: &str) -> Option<Pair> {
        let msg = format!("post-copy given up by {by}: the guest is lost");
        eprintln!("refvmm: {msg}");
        self.event("postcopy-given-up", msg);
        None
    }

    fn event(&self, name: &str, message: String) {
        (self.notify)(&json!({"event": name, "message": message}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_and_give_up_are_taken_only_when_they_mean_something() {
        let g = ResumeGate::default();
        assert!(g.status().is_none());
        assert!(g.request_resume(None).is_err(), "nothing broke");
        assert!(g.give_up("x").is_err(), "nothing broke");
        g.set(Phase::Retrying, Some("reset".into()));
        assert_eq!(g.status().unwrap().0, "postcopy-recover");
        assert!(g.request_resume(None).is_err(), "retrying already");
        g.set(Phase::Waiting, None);
        let (status, desc) = g.status().unwrap();
        assert_eq!(status, "postcopy-paused");
        assert!(
            desc.contains("waiting for resume") && desc.contains("reset"),
            "{desc}"
        );
        g.request_resume(Some("tcp:h:1".parse().unwrap())).unwrap();
        assert!(matches!(g.wait_for_operator(), Phase::ResumeAsked(Some(_))));
        g.set(Phase::Waiting, None);
        g.give_up("op").unwrap();
        assert_eq!(g.wait_for_operator(), Phase::GiveUp("op".into()));
    }

    #[test]
    fn a_source_that_cannot_reconnect_waits_for_the_operator() {
        // Nobody listens there: every attempt fails at once.
        let probe = livemig::transport::listen(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let endpoint = probe.local_endpoint().clone();
        drop(probe);
        let gate = ResumeGate::default();
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let ev = events.clone();
        let mut r = SourceRecovery {
            endpoint,
            token: [7; 16],
            retry_for: Duration::ZERO,
            gate: gate.clone(),
            notify: Arc::new(move |v: &Value| ev.lock().unwrap().push(v.clone())),
            wrap: Box::new(|t| t),
        };
        let waiter = std::thread::spawn(move || r.reconnect().is_none());
        let t0 = Instant::now();
        while gate.status().map(|s| s.0) != Some("postcopy-paused") {
            assert!(t0.elapsed() < Duration::from_secs(20), "never waited");
            std::thread::sleep(Duration::from_millis(10));
        }
        gate.give_up("the test").unwrap();
        assert!(waiter.join().unwrap(), "gave up, so no pair");
        let names: Vec<String> = events
            .lock()
            .unwrap()
            .iter()
            .map(|e| e["event"].to_string())
            .collect();
        assert_eq!(
            names,
            [
                "\"postcopy-interrupted\"",
                "\"postcopy-paused\"",
                "\"postcopy-given-up\""
            ]
        );
    }
}
