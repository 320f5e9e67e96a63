//! The API before the guest is here: a `receive` serves its API socket
//! from the start, not only once a migration has arrived.
//!
//! While no migration has arrived ([`Phase::Waiting`]), `status` answers
//! at once (`"running":false,"migration":"waiting"` and the endpoint it
//! listens on), `quit` ends the VMM (there is no guest to lose; once a
//! migration has arrived, a `quit` waits for the guest as below),
//! `migrate-status` says `none` and the other `migrate-*` requests are
//! refused. Once a migration has arrived, `status` waits up to
//! [`STATUS_WAIT`] for the guest, else answers `"migration":"incoming"`,
//! and `migrate-status` answers at once with the migration arriving
//! (`"status":"receiving"`, the last pre-copy round the source ended and
//! the bytes read by then).
//! Every other request waits until the guest is here and is then answered
//! as by any VMM that runs one; a reception that fails ends the process,
//! which closes the connection (the wait is as bounded as the
//! reception's own timeouts).

use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use livemig::ReceiveProgress;
use serde_json::{json, Value};

use crate::api::ApiEvent;
use crate::monitor::MigrationMonitor;
use crate::vmm::Machine;

/// What an API client is answered by: the machine, once it is here.
#[derive(Clone)]
pub struct Ready {
    pub machine: Arc<Machine>,
    pub events: Sender<ApiEvent>,
    pub monitor: Arc<MigrationMonitor>,
}

/// Where the VMM behind the API socket is.
enum Phase {
    /// A `receive` waiting for a migration on this endpoint.
    Waiting(String),
    /// A migration arrived, or the machine is being made: requests wait.
    Coming,
    /// The machine runs here.
    Ready(Ready),
}

/// What a `receive` knows of the migration arriving (the engine's
/// `ReceiveProgress`), for `migrate-status` before the guest is here.
#[derive(Default)]
struct Arriving {
    /// When the source's `Hello` was accepted.
    since: Option<Instant>,
    /// Guest memory, bytes.
    memory: u64,
    /// The last pre-copy round the source ended.
    round: Option<u32>,
    /// Bytes read when it ended (after a switch to post-copy: when the
    /// engine last reported the pages installed).
    bytes: u64,
    /// Pages still missing once the guest runs here in post-copy (from the
    /// engine's `PostcopyActive` on).
    missing: Option<u64>,
}

/// The API's view of its VMM, shared by its client threads.
pub struct ApiState {
    phase: Mutex<Phase>,
    arriving: Mutex<Arriving>,
    ready_cv: Condvar,
    /// Socket files a `quit` while waiting removes (each only if it is
    /// still the file this VMM bound: device and inode).
    cleanup: Mutex<Vec<(PathBuf, (u64, u64))>>,
}

impl ApiState {
    /// A `receive` waiting for a migration on `endpoint` (as given, until
    /// [`ApiState::listening_on`]).
    pub fn waiting(endpoint: String) -> Arc<Self> {
        Self::new(Phase::Waiting(endpoint))
    }

    /// A VMM whose machine is being made (`run`, or a `receive` that
    /// binds its API socket only once the guest arrived).
    pub fn coming() -> Arc<Self> {
        Self::new(Phase::Coming)
    }

    fn new(phase: Phase) -> Arc<Self> {
        Arc::new(ApiState {
            phase: Mutex::new(phase),
            arriving: Mutex::new(Arriving::default()),
            ready_cv: Condvar::new(),
            cleanup: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The endpoint the `receive` listens on, once bound (a port 0 given
    /// becomes the port chosen).
    pub fn listening_on(&self, endpoint: String) {
        if let Phase::Waiting(e) = &mut *self.lock() {
            *e = endpoint;
        }
    }

    /// A migration arrived: from now on every request waits for the guest.
    pub fn incoming(&self) {
        let mut p = self.lock();
        if matches!(*p, Phase::Waiting(_)) {
            *p = Phase::Coming;
        }
    }

    /// The engine's progress of the migration arriving (the reception's
    /// callback: only a lock and a few fields, the engine waits for it).
    pub fn receive_progress(&self, p: &ReceiveProgress) {
        let mut a = self.arriving.lock().unwrap_or_else(|e| e.into_inner());
        match p {
            ReceiveProgress::Accepted { memory_bytes, .. } => {
                a.since = Some(Instant::now());
                a.memory = *memory_bytes;
            }
            ReceiveProgress::RoundReceived { round, bytes } => {
                a.round = Some(*round);
                a.bytes = *bytes;
            }
            ReceiveProgress::PostcopyActive { missing_pages, .. } => {
                a.missing = Some(*missing_pages);
            }
            ReceiveProgress::PostcopyInstalled {
                missing_pages,
                bytes,
                ..
            } => {
                a.missing = Some(*missing_pages);
                a.bytes = *bytes;
            }
            _ => {}
        }
    }

    /// `migrate-status` while a migration arrives: `receiving`, the last
    /// round the source ended and the bytes read by then (`null` until the
    /// engine's `Accepted`; no round in a local hand-over). After a switch
    /// to post-copy, once the guest runs here (the engine's
    /// `PostcopyActive`) until every page is in: `postcopy-active`, the
    /// last pre-copy round (`null` in pure post-copy), the bytes read as
    /// the pages arrive and `"postcopy":{"missing-pages":N}`.
    fn arriving_status(&self) -> Value {
        let a = self.arriving.lock().unwrap_or_else(|e| e.into_inner());
        let known = a.since.is_some();
        let mut v = json!({
            "result": "ok",
            "status": if a.missing.is_some() { "postcopy-active" } else { "receiving" },
            "direction": "incoming",
            "round": a.round,
            "total-time": a.since.map(|t| t.elapsed().as_secs_f64() * 1e3),
            "ram": {
                "total": known.then_some(a.memory),
                "transferred": known.then_some(a.bytes),
            },
        });
        if let Some(missing) = a.missing {
            v["postcopy"] = json!({ "missing-pages": missing });
        }
        v
    }

    /// The machine runs here: waiting requests are answered.
    pub fn ready(&self, machine: Arc<Machine>, events: Sender<ApiEvent>) {
        *self.lock() = Phase::Ready(Ready {
            machine,
            events,
            monitor: Arc::new(MigrationMonitor::default()),
        });
        self.ready_cv.notify_all();
    }

    /// Removes `path` (if it is still the file `id`) should a `quit` end
    /// this VMM while it waits.
    pub fn remove_on_quit(&self, path: PathBuf, id: (u64, u64)) {
        self.cleanup
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((path, id));
    }

    /// The machine, if it is here.
    pub fn ready_now(&self) -> Option<Ready> {
        match &*self.lock() {
            Phase::Ready(r) => Some(r.clone()),
            _ => None,
        }
    }

    /// Blocks until the machine is here.
    pub fn wait_ready(&self) -> Ready {
        let mut p = self.lock();
        loop {
            if let Phase::Ready(r) = &*p {
                return r.clone();
            }
            p = self.ready_cv.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// What to answer `cmd` with before the machine is here.
    pub fn answer_early(&self, cmd: &str) -> Early {
        let p = self.lock();
        match &*p {
            Phase::Ready(_) => Early::Guest,
            Phase::Waiting(endpoint) => match cmd {
                "status" => Early::Reply(status("waiting", Some(endpoint))),
                "quit" => Early::Quit,
                "migrate-status" | "query-migrate" => {
                    Early::Reply(json!({"result": "ok", "status": "none"}))
                }
                "migrate-cancel" | "migrate-postcopy" | "migrate-resume" => Early::Reply(json!({
                    "result": "error",
                    "error": "no migration runs from here: this VMM waits for an incoming one",
                })),
                _ => Early::Guest,
            },
            Phase::Coming if matches!(cmd, "migrate-status" | "query-migrate") => {
                Early::Reply(self.arriving_status())
            }
            Phase::Coming if cmd == "status" => {
                let (p, _) = self
                    .ready_cv
                    .wait_timeout_while(p, STATUS_WAIT, |p| !matches!(p, Phase::Ready(_)))
                    .unwrap_or_else(|e| e.into_inner());
                match &*p {
                    Phase::Ready(_) => Early::Guest,
                    _ => Early::Reply(status("incoming", None)),
                }
            }
            Phase::Coming => Early::Guest,
        }
    }

    /// A `quit`: while still waiting, calls `answer` (the `ok`), removes
    /// the socket files given to [`ApiState::remove_on_quit`] and ends the
    /// process, all under the phase's lock, so that a migration accepted
    /// meanwhile finds the process gone before anything was committed (its
    /// source keeps the guest). Returns once a migration has arrived: the
    /// `quit` then waits for the guest as any other request.
    pub fn quit_if_waiting(&self, answer: &mut dyn FnMut()) {
        let p = self.lock();
        if !matches!(*p, Phase::Waiting(_)) {
            return;
        }
        answer();
        eprintln!("refvmm: asked to quit while waiting for a migration; exits");
        for (path, id) in self
            .cleanup
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            crate::socket_path::remove_if_ours(path, *id);
        }
        std::process::exit(0)
    }
}

/// How long a `status` waits for a guest that is arriving before it says
/// so (`"migration":"incoming"`).
const STATUS_WAIT: Duration = Duration::from_secs(2);

/// What to do with a request that came before the machine.
pub enum Early {
    /// Send this answer.
    Reply(Value),
    /// [`ApiState::quit_if_waiting`], else as [`Early::Guest`].
    Quit,
    /// Wait for the machine and let it answer.
    Guest,
}

/// `status` before the machine is here.
fn status(migration: &str, listen: Option<&String>) -> Value {
    let mut v = json!({
        "result": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "running": false,
        "migration": migration,
    });
    if let Some(l) = listen {
        v["listen"] = json!(l);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_arriving_postcopy_is_reported_active_with_the_pages_missing() {
        let s = ApiState::coming();
        s.receive_progress(&ReceiveProgress::Accepted {
            memory_bytes: 1 << 30,
            vcpus: 1,
            streams_asked: 1,
        });
        s.receive_progress(&ReceiveProgress::RoundReceived {
            round: 2,
            bytes: 1000,
        });
        assert_eq!(s.arriving_status()["status"], "receiving");
        assert!(s.arriving_status()["postcopy"].is_null());
        s.receive_progress(&ReceiveProgress::PostcopyActive {
            running: true,
            missing_pages: 30,
        });
        let v = s.arriving_status();
        assert_eq!(v["status"], "postcopy-active", "{v}");
        assert_eq!(v["round"], 2, "{v}");
        assert_eq!(v["ram"]["transferred"], 1000, "{v}");
        assert_eq!(v["postcopy"]["missing-pages"], 30, "{v}");
        s.receive_progress(&ReceiveProgress::PostcopyInstalled {
            installed_pages: 20,
            missing_pages: 10,
            bytes: 90_000,
        });
        let v = s.arriving_status();
        assert_eq!(v["status"], "postcopy-active", "{v}");
        assert_eq!(v["ram"]["transferred"], 90_000, "{v}");
        assert_eq!(v["postcopy"]["missing-pages"], 10, "{v}");
    }
}
