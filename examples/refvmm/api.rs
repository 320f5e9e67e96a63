//! The API socket: line-delimited JSON requests on a Unix socket, each
//! client served on its own thread. Each request is one JSON object on one line; each
//! reply is one or more JSON lines, the last with a `"result"` field.
//!
//! | request | reply |
//! |---|---|
//! | `{"cmd":"status"}` | `{"result":"ok","version":...,"pid":...,"running":true,"migration":"idle","vcpus":1,"memory":...,"settings":{...}}` (`migration`: `idle`, `migrating`, `migrated` or `ambiguous`; `settings`: the `run`/`receive` options an `upgrade` carries, carry.rs; `huge_pages`: every region is a hugetlb memfd) |
//! | `{"cmd":"pause"}` / `{"cmd":"resume"}` | `{"result":"ok"}`; refused with `{"result":"error","error":"refused: ..."}` while a migration runs and for good after one succeeded or became ambiguous (`livemig::MigrationGuard`) |
//! | `{"cmd":"migrate","to":"tcp:HOST:PORT","downtime_limit_ms":20,"max_bandwidth_mib":0,"keep_source":false}` | progress lines `{"event":...}`, then `{"result":"ok","report":{...}}` or `{"result":"error","phase":...,"status":"failed"\|"cancelled"\|"ambiguous","error":...,"cancelled_by":...}`; the last request on its connection (the VMM closes it after the result). The fields are `MigrateOptions` (migration.rs), the same as the `refvmm migrate` flags; an unknown field is refused |
//! | `... "tls":{"cert":P,"key":P,"ca":P,"server_name":S}` in `migrate` | migrate over mutual TLS |
//! | `... "streams":N` in `migrate` | spread the pages over N extra connections (1..=16) |
//! | `... "compress":false` in `migrate` | never LZ4-compress page frames (`true`, the default: where it pays) |
//! | `... "zero_copy":true` in `migrate` | send page data straight from guest memory (`PagesGather`, where granted) |
//! | `... "polish_rounds":N` in `migrate` | at most N extra pre-copy rounds once the expected downtime fits the limit, each run only when expected to cut it by at least 1 ms and a quarter (default 3; 0: switch over at the first round that fits) |
//! | `... "switchover_probe":true` in `migrate` | time the control connection's hops before the switchover and count them in the expected downtime (docs/protocol.md, "The switchover probe") |
//! | a second `migrate` while one runs, or after one succeeded or became ambiguous | `{"result":"error","phase":"setup","error":"... refused: ..."}` |
//! | `{"cmd":"migrate-status"}` (or `query-migrate`), from any client | the running migration, else the last one's outcome, else `"status":"none"`: `status` (`setup`, `active`, `cancelling`, `device` = paused for the switchover, `postcopy-recover` / `postcopy-paused` = a post-copy's link broke, reconnecting / waiting for `migrate-resume` (with `postcopy-recovery`), then `completed`, `failed`, `cancelled`, `ambiguous` or `postcopy-interrupted`), `phase`, `round`, `total-time`, `setup-time`, `expected-downtime`, `downtime` (ms), `cpu-throttle-percentage`, `ram` {`total`, `transferred`, `remaining`, `mbps`, `dirty-pages-rate`, `dirty-sync-count`, `normal`, `duplicate`, `page-size`}, `cancel-requested-by`, `error-desc` (see docs/operations.md) |
//! | `{"cmd":"migrate-postcopy"}`, from any client (or in band, answered `{"event":"postcopy-requested"}`) | `{"result":"ok","status":"switching"}`: the running migration switches to post-copy after its current pre-copy round; refused when none runs, when it was started without a post-copy option (`postcopy`, `postcopy_after_rounds`, `postcopy_auto`, `postcopy_on_request`) or when it is past its rounds |
//! | `{"cmd":"migrate-cancel"}`, from any client | `{"result":"ok","status":"cancelling"}`; `{"result":"error",...}` when no migration runs or its switchover has begun; `{"result":"ok","status":"giving-up"}` for a post-copy whose link broke (status `postcopy-recover` or `postcopy-paused`): it gives the migration up, the source exits without resuming the guest |
//! | `{"cmd":"migrate-resume"}` (optional `"to":ENDPOINT`), from any client | `{"result":"ok","status":"resuming"}`: a post-copy whose automatic retries ran out (status `postcopy-paused`) reconnects to its destination (or `to`) and continues; the asking client gets the outcome as before (events `postcopy-interrupted`, `postcopy-paused`, `postcopy-resuming`, `postcopy-resumed`, `postcopy-given-up`); refused otherwise |
//!
//! While a migration runs, its own connection takes two requests, answered
//! as events: `migrate-cancel` (`{"event":"cancelling"}` or
//! `{"event":"cancel-refused","error":...}`; an optional `"reason"` is
//! recorded) and `migrate-status` (`{"event":"status",...}`). If that
//! connection closes (the peer hangs up; closing only its writing side does
//! not count), the migration is cancelled unless its switchover has begun.
//!
//! | request | reply |
//! |---|---|
//! | `{"cmd":"write-memory","gpa":N,"value":N}` | writes a u64 through vm-memory (tracked as a VMM write) |
//! | `{"cmd":"read-memory","gpa":N,"len":N}` | `{"result":"ok","hex":"..."}` (at most 4096 bytes) |
//! | `{"cmd":"vcpu-regs"}` | RIP, RSP, RFLAGS, CS, CR0, EFER, APIC base and MP state of every vCPU (pauses briefly) |
//! | `{"cmd":"net-stats"}` | per NIC: frames the virtio-net device read from its TAP (`rx_frames`, delivered or dropped) and how many were unicast to the guest MAC, frames delivered to / dropped for the guest, frames the guest sent |
//! | `{"cmd":"announce-self"}` | one RARP (+ gratuitous ARP) per NIC now, like QEMU's `announce-self` |
//! | `{"cmd":"memory-hash"}` | FNV-1a hash of each memory region (pause first for a stable answer) |
//! | `{"cmd":"dirty-rate","window-ms":500}` (or `calc-dirty-rate`) | `{"result":"ok","dirty-rate-mib-s":R,"dirty-pages":N,"window-ms":W,"memory":B,...}`: distinct pages the vCPUs wrote in the window (a tracker of its own; refused while a migration runs, and a migration is refused while it runs) |
//! | `{"cmd":"quit"}` | `{"result":"ok"}`, then the VMM exits |
//!
//! A `receive` serves its API socket before the guest arrives (`api_state.rs`): while it
//! waits for a migration, `status` answers `{"result":"ok","version":...,"pid":...,"running":false,"migration":"waiting","listen":ENDPOINT}`,
//! `quit` ends it (once a migration arrived, it waits for the guest), `migrate-status` answers `"status":"none"` and the other `migrate-*`
//! requests are refused; once a migration arrived, `status` waits up to 2 s for the guest, else
//! answers `"migration":"incoming"`, `migrate-status` answers at once with the migration arriving
//! (`{"result":"ok","status":"receiving","direction":"incoming","round":N,"total-time":MS,"ram":{"total":B,"transferred":B}}`:
//! the last pre-copy round the source ended, `null` before the first, and the bytes read by then;
//! `total-time` and `ram` are `null` until the destination built its VM for the source; once a
//! reception that switched to post-copy runs the guest here, until every page is in, `status` is
//! `postcopy-active` with `"postcopy":{"missing-pages":N}`, `round` the last pre-copy round
//! (`null` in pure post-copy) and `transferred` growing as the pages arrive;
//! `round` stays `null` in a local hand-over, which moves no memory by rounds);
//! every other request is answered when the guest is here.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use livemig::memory::GuestRam;
use livemig::Progress;
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::api_state::{ApiState, Early, Ready};
use crate::migration::{do_migrate, setup_error, MigrateOptions, Outcome};
use crate::monitor::MigrationMonitor;
use crate::socket_path::Listener;
use crate::vmm::Machine;

/// What the API tells the main loop.
pub enum ApiEvent {
    /// The guest now runs elsewhere: exit 0.
    Migrated,
    /// The guest was handed over to a VMM on this host (which shares its
    /// memory and TAPs): exit 0 without touching either.
    HandedOver,
    /// The guest's fate is unknown (split-brain guard): exit 3, never resume.
    Ambiguous(String),
    /// Asked to quit.
    Quit,
}

/// An API socket being served: its listener (whose path is removed when
/// dropped, if it is still this socket) and what its clients are answered
/// by.
pub struct ApiSocket {
    pub listener: Listener,
    pub state: Arc<ApiState>,
}

impl ApiSocket {
    /// Serves `listener` per `state` from now on.
    pub fn start(listener: Listener, state: Arc<ApiState>) -> Result<Self, String> {
        serve(&listener, state.clone())?;
        Ok(ApiSocket { listener, state })
    }
}

/// Starts the API server thread on `listener` (bound by the caller: `run`
/// at its path, `receive` at its path or beside it until it takes the path
/// over). Each client is answered per `state`: by the machine once it is
/// here, before that as `api_state.rs` says.
pub fn serve(listener: &Listener, state: Arc<ApiState>) -> Result<(), String> {
    let listener = listener.try_clone()?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            // One thread per client, so status/pause/write requests are
            // answered while a migration request runs.
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => {
                        let state = state.clone();
                        let spawned = std::thread::Builder::new().name("api-client".into()).spawn(
                            move || {
                                if let Err(e) = serve_client(c, &state) {
                                    log::warn!("API client: {e}");
                                }
                            },
                        );
                        if let Err(e) = spawned {
                            log::warn!("API client thread: {e}");
                        }
                    }
                    Err(e) => log::warn!("API accept: {e}"),
                }
            }
        })
        .map_err(|e| format!("API thread: {e}"))?;
    Ok(())
}

/// One client: answered by the machine once it is here, before that per
/// [`ApiState::answer_early`].
fn serve_client(conn: UnixStream, state: &ApiState) -> Result<(), String> {
    let mut w = conn.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(conn.try_clone().map_err(|e| e.to_string())?);
    loop {
        if let Some(r) = state.ready_now() {
            return handle(conn, reader, None, &r);
        }
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let cmd = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v["cmd"].as_str().map(str::to_string))
            .unwrap_or_default();
        match state.answer_early(&cmd) {
            Early::Reply(v) => send(&mut w, &v).map_err(|e| e.to_string())?,
            later => {
                if let Early::Quit = later {
                    // Returns only if a migration arrived meanwhile.
                    state.quit_if_waiting(&mut || {
                        let _ = send(&mut w, &json!({"result": "ok"}));
                    });
                }
                let r = state.wait_ready();
                return handle(conn, reader, Some(line), &r);
            }
        }
    }
}

fn send(w: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    w.write_all(line.as_bytes())
}

/// Whether every region of `m`'s guest memory is a hugetlb memfd.
fn huge_pages(m: &Machine) -> bool {
    m.vm.ram().iter().all(|r| {
        r.file_offset()
            .is_some_and(|f| livemig_kvm::memfd::is_hugetlb(f.file()))
    })
}

fn hash_regions(mem: &GuestRam) -> Vec<Value> {
    let mut out = Vec::new();
    for r in mem.iter() {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        while off < r.len() {
            let n = (r.len() - off).min(buf.len() as u64) as usize;
            if mem
                .read_slice(&mut buf[..n], GuestAddress(r.start_addr().0 + off))
                .is_err()
            {
                break;
            }
            for b in &buf[..n] {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            off += n as u64;
        }
        out.push(json!({"gpa": r.start_addr().0, "size": r.len(), "fnv1a": format!("{h:016x}")}));
    }
    out
}

/// Answers `conn`'s requests with the machine of `r`, starting with
/// `first` (a line already read from `reader`) if given.
fn handle(
    conn: UnixStream,
    mut reader: BufReader<UnixStream>,
    mut first: Option<String>,
    r: &Ready,
) -> Result<(), String> {
    let (m, monitor, events) = (&r.machine, &*r.monitor, &r.events);
    let mut w = conn.try_clone().map_err(|e| e.to_string())?;
    loop {
        let mut line = String::new();
        match first.take() {
            Some(l) => line = l,
            None => {
                if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                    return Ok(());
                }
            }
        }
        if line.trim().is_empty() {
            continue;
        }
        let req: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                send(
                    &mut w,
                    &json!({"result":"error","error":format!("bad request: {e}")}),
                )
                .map_err(|e| e.to_string())?;
                continue;
            }
        };
        let reply = match req["cmd"].as_str().unwrap_or("") {
            "status" => json!({
                "result": "ok",
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "running": m.vm.vcpus().is_running(),
                "migration": m.guard.state().name(),
                "vcpus": m.vm.vcpus().len(),
                "memory": m.vm.ram().iter().map(|r| r.len()).sum::<u64>(),
                "settings": crate::carry::recorded().map(crate::carry::Settings::to_json),
                "huge_pages": huge_pages(m),
            }),
            // Through the migration guard: refused while a migration runs
            // and for good after one committed or became ambiguous.
            "pause" => match m.guard.pause(&**m) {
                Ok(()) => json!({"result":"ok"}),
                Err(e) => json!({"result":"error","error":e.to_string()}),
            },
            "resume" => match m.guard.resume(&**m) {
                Ok(()) => json!({"result":"ok"}),
                Err(e) => json!({"result":"error","error":e.to_string()}),
            },
            "write-memory" => {
                let gpa = req["gpa"].as_u64();
                let value = req["value"].as_u64();
                match (gpa, value) {
                    (Some(gpa), Some(value)) => match m.device_write(gpa, value) {
                        Ok(()) => json!({"result":"ok"}),
                        Err(e) => json!({"result":"error","error":e}),
                    },
                    _ => {
                        json!({"result":"error","error":"write-memory needs numeric gpa and value"})
                    }
                }
            }
            "vcpu-regs" => {
                // Debug aid: pause, read every vCPU's RIP/RSP/RFLAGS/CR0/EFER/APIC base/mp_state,
                // resume if it ran.
                let was_running = m.vm.vcpus().is_running();
                let mut out = Vec::new();
                if m.vm.pause_vcpus().is_ok() {
                    for i in 0..m.vm.vcpus().len() {
                        let r = m.vm.with_vcpu(i, |fd| {
                            let regs = fd.get_regs().ok();
                            let sregs = fd.get_sregs().ok();
                            let mp = fd.get_mp_state().ok();
                            json!({
                                "rip": regs.map(|r| format!("0x{:x}", r.rip)),
                                "rsp": regs.map(|r| format!("0x{:x}", r.rsp)),
                                "rflags": regs.map(|r| format!("0x{:x}", r.rflags)),
                                "cs": sregs.map(|s| format!("0x{:x}", s.cs.selector)),
                                "cr0": sregs.map(|s| format!("0x{:x}", s.cr0)),
                                "efer": sregs.map(|s| format!("0x{:x}", s.efer)),
                                "apic_base": sregs.map(|s| format!("0x{:x}", s.apic_base)),
                                "mp_state": mp.map(|m| m.mp_state),
                            })
                        });
                        out.push(r.unwrap_or_else(|e| json!({"error": e.to_string()})));
                    }
                    if was_running {
                        m.vm.resume_vcpus();
                    }
                }
                json!({"result":"ok","vcpus": out})
            }
            "read-memory" => {
                let gpa = req["gpa"].as_u64().unwrap_or(0);
                let len = req["len"].as_u64().unwrap_or(8).min(4096) as usize;
                let mut buf = vec![0u8; len];
                match m.vm.ram().read_slice(&mut buf, GuestAddress(gpa)) {
                    Ok(()) => {
                        json!({"result":"ok","hex": buf.iter().map(|b| format!("{b:02x}")).collect::<String>()})
                    }
                    Err(e) => json!({"result":"error","error":format!("read at 0x{gpa:x}: {e}")}),
                }
            }
            "net-stats" => {
                let nics: Vec<Value> = m
                    .nets
                    .iter()
                    .zip(&m.nic_counters)
                    .map(|(n, c)| {
                        let s = c.snapshot();
                        json!({
                            "tap": n.tap,
                            "mac": livemig_announce::format_mac(&n.mac),
                            "rx_frames": s.backend_rx,
                            "rx_to_guest_mac": s.backend_rx_to_mac,
                            "rx_delivered": s.rx_delivered,
                            "rx_dropped": s.rx_dropped,
                            "tx_frames": s.tx_frames,
                            "tx_dropped": s.tx_dropped,
                        })
                    })
                    .collect();
                json!({"result":"ok","nics": nics})
            }
            "announce-self" => {
                // Like QEMU's announce-self: one RARP (+ gratuitous ARP) per NIC now.
                let one = livemig_announce::Schedule {
                    rounds: 1,
                    ..Default::default()
                };
                match crate::net::start_announce(&m.nets, &one, std::time::Instant::now()) {
                    Ok(h) => {
                        json!({"result":"ok","report": serde_json::to_value(h.join()).unwrap_or_default()})
                    }
                    Err(e) => json!({"result":"error","error":e}),
                }
            }
            "memory-hash" => json!({"result":"ok","regions": hash_regions(m.vm.ram())}),
            "quit" => {
                send(&mut w, &json!({"result":"ok"})).map_err(|e| e.to_string())?;
                let _ = events.send(ApiEvent::Quit);
                return Ok(());
            }
            "migrate" => {
                // The reader goes to the watcher with whatever it has
                // already read past the request (a pipelined cancel).
                return migrate_request(&req, m, monitor, reader, &conn, events);
            }
            "migrate-status" | "query-migrate" => monitor.status(),
            "dirty-rate" | "calc-dirty-rate" => crate::dirty_rate::request(&req, m, monitor),
            "migrate-postcopy" => match monitor.request_postcopy() {
                Ok(()) => json!({"result":"ok","status":"switching"}),
                Err(e) => json!({"result":"error","error":e}),
            },
            "migrate-cancel" => match monitor.cancel("an API client's migrate-cancel") {
                Ok(()) => json!({"result":"ok","status":"cancelling"}),
                // A post-copy waiting for resume: this cancel gives it up.
                Err(e) => match monitor.give_up_postcopy("an API client's migrate-cancel") {
                    Ok(()) => json!({"result":"ok","status":"giving-up"}),
                    Err(_) => json!({"result":"error","error":e.to_string()}),
                },
            },
            "migrate-resume" => resume_request(&req, monitor),
            other => json!({"result":"error","error":format!("unknown command '{other}'")}),
        };
        send(&mut w, &reply).map_err(|e| e.to_string())?;
    }
}

/// `migrate-resume`: continues a post-copy that waits for resume, to `to`
/// if given (else where it went).
fn resume_request(req: &Value, monitor: &MigrationMonitor) -> Value {
    let to = match req.get("to").and_then(Value::as_str).map(str::parse) {
        None => None,
        Some(Ok(ep)) => Some(ep),
        Some(Err(e)) => return json!({"result":"error","error":format!("to: {e}")}),
    };
    match monitor.request_resume(to) {
        Ok(()) => json!({"result":"ok","status":"resuming"}),
        Err(e) => json!({"result":"error","error":e}),
    }
}

/// The connection of the client that asked for a migration: progress lines
/// go to it while it listens.
struct ClientLine {
    w: Mutex<UnixStream>,
    /// Set once a write failed: no more progress lines.
    deaf: AtomicBool,
}

impl ClientLine {
    /// Sends one line; `Err` with the error once the client is gone
    /// (`BrokenPipe`/`ConnectionReset`) or stopped reading (timeout).
    fn send(&self, v: &Value) -> std::io::Result<()> {
        if self.deaf.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut w = self.w.lock().unwrap_or_else(|e| e.into_inner());
        let r = send(&mut w, v);
        if r.is_err() {
            self.deaf.store(true, Ordering::SeqCst);
        }
        r
    }
}

/// Whether a write error means the peer closed its connection.
fn peer_gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
    )
}

const VANISHED: &str = "the API client that asked for the migration, which went away";

/// Runs one `migrate` request: the last request on its connection.
fn migrate_request(
    req: &Value,
    m: &Arc<Machine>,
    monitor: &MigrationMonitor,
    reader: BufReader<UnixStream>,
    conn: &UnixStream,
    events: &Sender<ApiEvent>,
) -> Result<(), String> {
    let w = conn.try_clone().map_err(|e| e.to_string())?;
    // A client that stops reading must not stall the migration.
    let _ = w.set_write_timeout(Some(Duration::from_secs(2)));
    let line = Arc::new(ClientLine {
        w: Mutex::new(w),
        deaf: AtomicBool::new(false),
    });
    let opts = match MigrateOptions::from_request(req) {
        Ok(o) => o,
        Err(e) => {
            finish_migrate(setup_error(e), &line, events, false, false, || {});
            return Ok(());
        }
    };
    let done = AtomicBool::new(false);
    let outcome = std::thread::scope(|s| {
        s.spawn(|| watch_client(reader, &line, monitor, &done));
        // Engine events go to the asking client; a broken pipe means it
        // is gone.
        let mut to_client = |p: &Progress| {
            let sent = serde_json::to_value(p).map(|v| line.send(&v));
            if let Ok(Err(e)) = sent {
                if peer_gone(&e) {
                    let _ = monitor.cancel(VANISHED);
                }
            }
        };
        let to_line = line.clone();
        let notify = Arc::new(move |v: &Value| {
            let _ = to_line.send(v);
        });
        let r = do_migrate(&opts, m, monitor, &mut to_client, notify);
        done.store(true, Ordering::SeqCst);
        // Wakes the watcher's read.
        let _ = conn.shutdown(std::net::Shutdown::Read);
        r
    });
    let local = opts.local;
    finish_migrate(outcome, &line, events, opts.keep_source, local, || {
        if local {
            m.handed_over()
        } else {
            m.migrated_away()
        }
    });
    Ok(())
}

/// Replies to the client, then tells the main loop. The reply is best
/// effort: a client that went away must not keep a source whose guest runs
/// on the destination alive (nor one whose outcome is unknown).
fn finish_migrate(
    outcome: Outcome,
    line: &ClientLine,
    events: &Sender<ApiEvent>,
    keep_source: bool,
    local: bool,
    migrated_away: impl FnOnce(),
) {
    line.deaf.store(false, Ordering::SeqCst);
    match outcome {
        Outcome::Migrated(report) => {
            // The guest runs on the destination now: the NICs here only
            // count what still arrives.
            migrated_away();
            if let Err(e) = line.send(&json!({"result":"ok","report":report})) {
                log::warn!("API client: the migration completed, but the reply was lost: {e}");
            }
            // keep_source (for tests): stay, paused, so the source memory
            // can be compared with the destination.
            if !keep_source {
                let _ = events.send(if local {
                    ApiEvent::HandedOver
                } else {
                    ApiEvent::Migrated
                });
            }
        }
        Outcome::Failed(v, ambiguous) => {
            if let Err(e) = line.send(&v) {
                log::warn!("API client: the migration failed, and the reply was lost: {e}");
            }
            if let Some(msg) = ambiguous {
                let _ = events.send(ApiEvent::Ambiguous(msg));
            }
        }
    }
}

/// Reads the asking client's connection while its migration runs: a
/// `migrate-cancel` line cancels; a connection closed without a word
/// cancels too (before the switchover: see [`MigrationMonitor::cancel`]).
fn watch_client(
    mut r: BufReader<UnixStream>,
    line: &ClientLine,
    monitor: &MigrationMonitor,
    done: &AtomicBool,
) {
    let fd = r.get_ref().as_raw_fd();
    let mut buf = String::new();
    loop {
        buf.clear();
        match r.read_line(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if done.load(Ordering::SeqCst) {
            return;
        }
        let reply = in_band(&buf, monitor);
        let _ = line.send(&reply);
    }
    // End of input: the client either closed its writing side only (and
    // still reads), or is gone. Only a hang-up (both sides closed) is gone.
    if wait_hangup(fd, done) && !done.load(Ordering::SeqCst) {
        match monitor.cancel(VANISHED) {
            Ok(()) => log::warn!("API client went away: migration cancelled"),
            Err(e) => log::warn!("API client went away; not cancelled: {e}"),
        }
    }
}

/// A request on the connection of a running migration: only
/// `migrate-cancel` and `migrate-status` are answered, as events (a
/// `result` line would end the client's wait for the migration).
fn in_band(text: &str, monitor: &MigrationMonitor) -> Value {
    let req: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    match req["cmd"].as_str() {
        Some("migrate-cancel") => {
            let why = req["reason"].as_str().unwrap_or("a request");
            let by = format!("the client that asked for the migration ({why})");
            match monitor.cancel(&by) {
                Ok(()) => json!({"event":"cancelling"}),
                Err(e) => json!({"event":"cancel-refused","error":e.to_string()}),
            }
        }
        Some("migrate-postcopy") => match monitor.request_postcopy() {
            Ok(()) => json!({"event":"postcopy-requested"}),
            Err(e) => json!({"event":"postcopy-refused","error":e}),
        },
        Some("migrate-status" | "query-migrate") => {
            let mut v = monitor.status();
            v["event"] = json!("status");
            if let Some(o) = v.as_object_mut() {
                o.remove("result");
            }
            v
        }
        _ => {
            json!({"event":"ignored","error":"a migration runs on this connection: only migrate-cancel, migrate-postcopy and migrate-status are answered here"})
        }
    }
}

/// Waits until `fd`'s peer hung up (true) or `done` is set (false).
fn wait_hangup(fd: std::os::fd::RawFd, done: &AtomicBool) -> bool {
    while !done.load(Ordering::SeqCst) {
        let mut p = libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack; `fd` stays open (the
        // caller's UnixStream owns it) until this returns.
        let n = unsafe { libc::poll(&mut p, 1, 100) };
        if n > 0 && p.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            return true;
        }
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_to_a_vanished_client() -> ClientLine {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        ClientLine {
            w: Mutex::new(ours),
            deaf: AtomicBool::new(false),
        }
    }

    #[test]
    fn a_source_whose_client_went_away_still_exits_after_the_guest_left() {
        let line = line_to_a_vanished_client();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut away = false;
        finish_migrate(
            Outcome::Migrated(json!({})),
            &line,
            &tx,
            false,
            false,
            || away = true,
        );
        assert!(away);
        assert!(
            matches!(rx.try_recv(), Ok(ApiEvent::Migrated)),
            "the main loop was not told that the guest left"
        );
    }

    #[test]
    fn an_ambiguous_outcome_reaches_the_main_loop_without_a_client() {
        let line = line_to_a_vanished_client();
        let (tx, rx) = std::sync::mpsc::channel();
        finish_migrate(
            Outcome::Failed(json!({"result":"error"}), Some("unknown".into())),
            &line,
            &tx,
            false,
            false,
            || {},
        );
        assert!(matches!(rx.try_recv(), Ok(ApiEvent::Ambiguous(_))));
    }

    #[test]
    fn a_local_hand_over_tells_the_main_loop_to_leave_the_taps_alone() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (a, _b) = UnixStream::pair().unwrap();
        let line = ClientLine {
            w: Mutex::new(a),
            deaf: AtomicBool::new(false),
        };
        finish_migrate(Outcome::Migrated(json!({})), &line, &tx, false, true, || {});
        assert!(matches!(rx.try_recv(), Ok(ApiEvent::HandedOver)));
    }

    #[test]
    fn in_band_requests_are_answered_as_events() {
        let m = MigrationMonitor::default();
        let r = in_band("{\"cmd\":\"migrate-cancel\"}\n", &m);
        assert_eq!(r["event"], "cancel-refused", "{r}");
        assert!(r.get("result").is_none());
        let r = in_band("{\"cmd\":\"migrate-status\"}\n", &m);
        assert_eq!(r["event"], "status", "{r}");
        assert!(r.get("result").is_none(), "{r}");
        let r = in_band("{\"cmd\":\"pause\"}\n", &m);
        assert_eq!(r["event"], "ignored", "{r}");
    }
}
