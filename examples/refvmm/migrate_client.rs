//! The operator's side of a migration: `refvmm migrate` (progress, and
//! cancel on Ctrl-C), `refvmm migrate-status` and `refvmm migrate-cancel`.
//!
//! Exit codes of `refvmm migrate`: 0 the guest runs on the destination;
//! 1 the migration failed and the guest stays on the source; 2 usage;
//! 3 the outcome is unknown (the source stays paused); 4 cancelled, the
//! guest stays on the source as it was; 130 interrupted twice, the client
//! left without waiting for the outcome.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::cli::{usage, Fail};
use crate::migration::MigrateOptions;

/// Exit code: the migration was cancelled; the guest stays on the source.
pub const EXIT_CANCELLED: u8 = 4;
/// Exit code: the outcome is unknown.
pub const EXIT_AMBIGUOUS: u8 = 3;
/// Exit code: interrupted a second time, left without the outcome.
pub const EXIT_INTERRUPTED: u8 = 130;

/// How the client ended, with its exit code.
pub struct ClientFail(pub u8, pub String);

fn connect(api: &Path) -> Result<UnixStream, ClientFail> {
    UnixStream::connect(api).map_err(|e| {
        ClientFail(
            1,
            format!("cannot connect to API socket {}: {e}", api.display()),
        )
    })
}

fn send_line(mut c: &UnixStream, v: &Value) -> std::io::Result<()> {
    c.write_all(format!("{v}\n").as_bytes())
}

/// One request, one reply (no events).
fn one_request(api: &Path, req: &Value) -> Result<Value, ClientFail> {
    let c = connect(api)?;
    send_line(&c, req).map_err(|e| ClientFail(1, e.to_string()))?;
    let mut line = String::new();
    BufReader::new(c)
        .read_line(&mut line)
        .map_err(|e| ClientFail(1, e.to_string()))?;
    serde_json::from_str(&line).map_err(|e| ClientFail(1, format!("bad reply '{line}': {e}")))
}

/// One request, one reply, with the error as text.
pub fn api_request(api: &Path, req: &Value) -> Result<Value, String> {
    one_request(api, req).map_err(|f| f.1)
}

/// `refvmm migrate-status`: the source's view of its migration, as JSON.
pub fn status(api: &Path) -> Result<(), ClientFail> {
    let v = one_request(api, &json!({"cmd":"migrate-status"}))?;
    if v["result"] != "ok" {
        return Err(ClientFail(1, v["error"].as_str().unwrap_or("?").into()));
    }
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    Ok(())
}

/// `refvmm migrate-cancel`: asks the source to cancel; exits 1 if there is
/// nothing to cancel or the switchover has begun.
pub fn cancel(api: &Path) -> Result<(), ClientFail> {
    let v = one_request(api, &json!({"cmd":"migrate-cancel"}))?;
    if v["result"] != "ok" {
        return Err(ClientFail(1, v["error"].as_str().unwrap_or("?").into()));
    }
    eprintln!("refvmm: cancel requested; the guest stays on the source once the migration stops");
    Ok(())
}

/// Blocks SIGINT and SIGTERM in this thread (and the threads it starts
/// afterwards), and returns the set for `sigwait`.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: the set is a local, initialised by sigemptyset before use;
    // pthread_sigmask only changes this thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn signal_name(sig: i32) -> &'static str {
    if sig == libc::SIGTERM {
        "SIGTERM"
    } else {
        "SIGINT"
    }
}

/// The migrations this client runs, and whether it was interrupted: one
/// signal thread serves them all (`refvmm migrate --to auto` may try
/// several hosts in turn, `refvmm evacuate` runs several at once).
#[derive(Clone)]
pub struct Session {
    running: Arc<Mutex<Vec<UnixStream>>>,
    interrupted: Arc<AtomicBool>,
}

impl Session {
    /// Blocks SIGINT/SIGTERM and starts the thread that waits for them:
    /// the first asks the source of every running migration (on the
    /// migration's own connection) to cancel; the second leaves at once,
    /// which each source also takes as a cancel (before the switchover).
    pub fn start() -> Session {
        let set = block_stop_signals();
        let s = Session {
            running: Arc::new(Mutex::new(Vec::new())),
            interrupted: Arc::new(AtomicBool::new(false)),
        };
        let me = s.clone();
        std::thread::spawn(move || me.wait_signals(set));
        s
    }

    /// Whether SIGINT/SIGTERM came.
    pub fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }

    fn wait_signals(&self, set: libc::sigset_t) {
        let mut count = 0;
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is an initialised sigset; `sig` is a valid out
            // pointer. The signals are blocked in every thread, so they wait
            // for this call.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            count += 1;
            if count > 1 {
                eprintln!(
                    "\nrefvmm: interrupted again: leaving without the outcome; the source cancels the migration unless its switchover has begun (check with `refvmm migrate-status`)"
                );
                std::process::exit(i32::from(EXIT_INTERRUPTED));
            }
            self.interrupted.store(true, Ordering::SeqCst);
            eprintln!(
                "\nrefvmm: {}: cancelling the migration (interrupt again to leave without waiting)",
                signal_name(sig)
            );
            let req = json!({"cmd":"migrate-cancel","reason":format!("interrupted by {}", signal_name(sig))});
            for conn in self
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
            {
                if let Err(e) = send_line(conn, &req) {
                    eprintln!("refvmm: could not ask for the cancel: {e}");
                }
            }
        }
    }

    /// Runs one migration: sends the request, shows progress (a status
    /// bar only with `bar` on a terminal; event lines prefixed with
    /// `label`), cancels on SIGINT/SIGTERM. Returns the report when the
    /// guest moved.
    pub fn run(
        &self,
        api: &Path,
        req: &Value,
        label: &str,
        bar: bool,
    ) -> Result<Value, ClientFail> {
        if self.interrupted() {
            return Err(ClientFail(
                EXIT_CANCELLED,
                "interrupted before the migration started: the guest stays on the source".into(),
            ));
        }
        let conn = connect(api)?;
        send_line(&conn, req).map_err(|e| ClientFail(1, e.to_string()))?;
        let sig_conn = conn.try_clone().map_err(|e| ClientFail(1, e.to_string()))?;
        let fd = sig_conn.as_raw_fd();
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(sig_conn);
        let tty = bar && std::io::stderr().is_terminal();
        let display = Arc::new(Mutex::new(Display {
            tty,
            drawn: false,
            label: label.to_string(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        if tty {
            spawn_poller(api.to_path_buf(), display.clone(), stop.clone());
        }
        let reply = read_result(conn, &display);
        stop.store(true, Ordering::SeqCst);
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|c| c.as_raw_fd() != fd);
        {
            // No status line after this: the outcome is the last word.
            let mut d = display.lock().unwrap_or_else(|e| e.into_inner());
            d.tty = false;
            if d.drawn {
                eprintln!();
            }
        }
        outcome(&reply?)
    }
}

/// The progress display: one line redrawn on a terminal, plain lines
/// otherwise.
struct Display {
    tty: bool,
    /// Prefix of event lines (the VM's name when several migrate).
    label: String,
    /// The status line is on screen (to clear before a plain line).
    drawn: bool,
}

impl Display {
    fn line(&mut self, text: &str) {
        let mut e = std::io::stderr().lock();
        if self.drawn {
            let _ = write!(e, "\r\x1b[2K");
            self.drawn = false;
        }
        let _ = writeln!(e, "{}{text}", self.label);
    }

    fn bar(&mut self, q: &Value) {
        if !self.tty || q["result"] != "ok" {
            return;
        }
        let mut e = std::io::stderr().lock();
        let _ = write!(e, "\r\x1b[2K{}", bar_text(q));
        let _ = e.flush();
        self.drawn = true;
    }
}

fn mib(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0) / f64::from(1u32 << 20)
}

/// One status line: `[#####-----] round 2  96/256 MiB sent  13 MiB left
/// 10.0 MiB/s  dirty 4.1 MiB/s  downtime ~12 ms  throttle 0%`.
pub fn bar_text(q: &Value) -> String {
    let ram = &q["ram"];
    let sent_round = ram["transferred"].as_f64().unwrap_or(0.0);
    let left = ram["remaining"].as_f64().unwrap_or(0.0);
    let total = ram["total"].as_f64().unwrap_or(0.0).max(1.0);
    let frac = (1.0 - left / total).clamp(0.0, 1.0);
    let filled = (frac * 20.0).round() as usize;
    let bar: String = "#".repeat(filled) + &"-".repeat(20 - filled);
    let rate = ram["mbps"].as_f64().map_or("-".into(), |m| {
        format!("{:.1} MiB/s", m * 1e6 / 8.0 / f64::from(1u32 << 20))
    });
    let dirty = ram["dirty-pages-rate"].as_f64().map_or("-".into(), |p| {
        format!("{:.1} MiB/s", p * 4096.0 / f64::from(1u32 << 20))
    });
    let down = q["expected-downtime"]
        .as_f64()
        .map_or("-".into(), |d| format!("~{d:.0} ms"));
    format!(
        "[{bar}] {} round {}  {:.0}/{:.0} MiB sent  {:.0} MiB left  {rate}  dirty {dirty}  downtime {down}  throttle {}%",
        q["status"].as_str().unwrap_or("?"),
        q["round"],
        sent_round / f64::from(1u32 << 20),
        mib(&ram["total"]),
        mib(&ram["remaining"]),
        q["cpu-throttle-percentage"].as_u64().unwrap_or(0),
    )
}

/// One engine event as a plain line.
fn event_text(ev: &Value) -> Option<String> {
    Some(match ev["event"].as_str()? {
        "round" => format!(
            "round {}: {} pages in {:.1} ms ({:.0} MB/s), dirty rate {:.0} MB/s, {} dirty pages left, expected downtime {:.1} ms",
            ev["round"], ev["pages"], ev["duration_ms"].as_f64().unwrap_or(0.0),
            ev["bandwidth_mbps"].as_f64().unwrap_or(0.0), ev["dirty_rate_mbps"].as_f64().unwrap_or(0.0),
            ev["dirty_pages_after"], ev["expected_downtime_ms"].as_f64().unwrap_or(0.0)
        ),
        "paused" => format!("paused: {} pages left to send", ev["remaining_pages"]),
        "cancelling" => "the source is cancelling the migration".into(),
        "cancel-refused" => format!(
            "the source did not cancel: {}",
            ev["error"].as_str().unwrap_or("?")
        ),
        "status" => return None,
        // refvmm's own events (post-copy recovery) say what they mean.
        _ if ev["message"].is_string() => ev["message"].as_str()?.to_string(),
        other => other.to_string(),
    })
}

/// On a terminal, asks for the status twice a second on a second
/// connection and redraws the status line, until `stop`.
fn spawn_poller(api: PathBuf, display: Arc<Mutex<Display>>, stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            if let Ok(q) = one_request(&api, &json!({"cmd":"migrate-status"})) {
                if !stop.load(Ordering::SeqCst) {
                    display.lock().unwrap_or_else(|e| e.into_inner()).bar(&q);
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
}

/// `refvmm migrate`: sends the request, shows progress, and cancels on
/// SIGINT/SIGTERM. Prints the report on stdout when the guest moved.
pub fn migrate(api: &Path, req: &Value) -> Result<(), ClientFail> {
    let session = Session::start();
    let report = session.run(api, req, "", true)?;
    print_migrated(&report, session.interrupted());
    Ok(())
}

/// The report on stdout and the outcome on stderr.
pub fn print_migrated(report: &Value, interrupted: bool) {
    println!(
        "{}",
        serde_json::to_string_pretty(report).unwrap_or_default()
    );
    let late = if interrupted {
        " (the interrupt came after the switchover had begun, too late to cancel)"
    } else {
        ""
    };
    eprintln!("refvmm: migrated: the guest runs on the destination{late}");
}

/// Reads event lines until the result.
fn read_result(conn: UnixStream, display: &Mutex<Display>) -> Result<Value, ClientFail> {
    for line in BufReader::new(conn).lines() {
        let line = line.map_err(|e| ClientFail(1, format!("API connection: {e}")))?;
        let v: Value =
            serde_json::from_str(&line).map_err(|e| ClientFail(1, format!("bad reply: {e}")))?;
        if v.get("result").is_some() {
            return Ok(v);
        }
        if let Some(t) = event_text(&v) {
            display.lock().unwrap_or_else(|e| e.into_inner()).line(&t);
        }
    }
    Err(ClientFail(
        1,
        "the VMM closed the API connection without a result: the outcome is unknown here; ask the source (`refvmm migrate-status`) or the destination".into(),
    ))
}

/// The report, or the exit code and message, for the source's final reply.
fn outcome(reply: &Value) -> Result<Value, ClientFail> {
    if reply["result"] == "ok" {
        return Ok(reply["report"].clone());
    }
    let phase = reply["phase"].as_str().unwrap_or("?");
    let error = reply["error"].as_str().unwrap_or("?");
    match reply["status"].as_str() {
        Some("cancelled") => {
            let by = reply["cancelled_by"].as_str().unwrap_or("the source");
            Err(ClientFail(
                EXIT_CANCELLED,
                format!("migration cancelled by {by} in its {phase} phase: the guest stays on the source, as it was before the migration"),
            ))
        }
        Some("postcopy-interrupted") => Err(ClientFail(EXIT_AMBIGUOUS, format!(
            "post-copy interrupted ({phase}): {error}; the guest ran on the destination and part of its memory is only on the source, which stays paused and must not resume it"
        ))),
        Some("ambiguous") => Err(ClientFail(EXIT_AMBIGUOUS, format!(
            "migration outcome unknown ({phase}): {error}; the source stays paused: check the destination before doing anything"
        ))),
        _ => Err(ClientFail(1, format!(
            "migration failed ({phase}): {error}; the guest stays on the source"
        ))),
    }
}

/// `refvmm migrate --resume`: asks the source to continue the post-copy
/// that waits for resume (its automatic retries ran out), to `opts.to`.
/// The outcome goes to the client that started the migration (and
/// `migrate-status`); this one only says whether the source took the
/// request.
pub(crate) fn cmd_resume(api_socket: &Path, opts: &MigrateOptions) -> Result<(), Fail> {
    let to = opts.endpoint().map_err(|e| usage(format!("--to: {e}")))?;
    let req = json!({"cmd":"migrate-resume","to":to.to_string()});
    let v = one_request(api_socket, &req).map_err(|f| Fail(f.0, f.1))?;
    if v["result"] != "ok" {
        return Err(Fail(1, v["error"].as_str().unwrap_or("?").into()));
    }
    eprintln!("refvmm: the source resumes its post-copy to {to}; `refvmm migrate-status` shows how it goes");
    Ok(())
}

/// `refvmm migrate` once its destination is known: checks the options as
/// the source will (a usage error, exit 2, before anything is sent), then
/// runs [`migrate`].
pub(crate) fn cmd_migrate(api_socket: &Path, opts: &MigrateOptions) -> Result<(), Fail> {
    opts.endpoint().map_err(|e| usage(format!("--to: {e}")))?;
    opts.config().map_err(|e| usage(format!("--{e}")))?;
    migrate(api_socket, &opts.to_request()).map_err(|f| Fail(f.0, f.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_outcome() {
        let code = |v: Value| outcome(&v).err().map(|f| f.0);
        assert_eq!(
            code(json!({"result":"error","status":"cancelled"})),
            Some(4)
        );
        assert_eq!(
            code(json!({"result":"error","status":"ambiguous"})),
            Some(3)
        );
        assert_eq!(code(json!({"result":"error","status":"failed"})), Some(1));
        assert_eq!(code(json!({"result":"error"})), Some(1));
    }

    #[test]
    fn bar_shows_the_status_fields() {
        let q = json!({"result":"ok","status":"active","round":2,"expected-downtime":12.4,
            "cpu-throttle-percentage":20,
            "ram":{"total":268435456u64,"transferred":104857600u64,"remaining":13631488u64,
                   "mbps":83.886_08,"dirty-pages-rate":1024.0}});
        let t = bar_text(&q);
        assert!(t.contains("round 2"), "{t}");
        assert!(t.contains("100/256 MiB sent"), "{t}");
        assert!(t.contains("13 MiB left"), "{t}");
        assert!(t.contains("10.0 MiB/s"), "{t}");
        assert!(t.contains("dirty 4.0 MiB/s"), "{t}");
        assert!(t.contains("~12 ms") && t.contains("throttle 20%"), "{t}");
    }
}
