//! Drive `refvmm` processes: spawn, watch the test guest's serial protocol
//! (each chunk timestamped when it arrives), talk to the API socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livemig_testguest::{Event, OutputParser};
use serde_json::{json, Value};

/// Path of the `refvmm` binary: `$REFVMM`, else `examples/refvmm` next to
/// the running test/bench binary's profile directory, else the running
/// binary itself if it is refvmm.
pub fn refvmm_path() -> PathBuf {
    if let Some(p) = std::env::var_os("REFVMM") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    if exe.file_name().is_some_and(|n| n == "refvmm") {
        return exe;
    }
    // target/<profile>/deps/<test> → target/<profile>/examples/refvmm
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("examples").join("refvmm")
}

/// A `T` line with the time it arrived.
#[derive(Debug, Clone, Copy)]
pub struct TLine {
    /// Arrival time.
    pub at: Instant,
    /// Heartbeats so far.
    pub heartbeats: u64,
    /// Pages written so far.
    pub pages_written: u64,
    /// Pages verified so far.
    pub pages_verified: u64,
    /// Corruptions so far.
    pub corrupt: u64,
}

/// A `STATUS` line (the answer to `status` typed on the console) with the time it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusLine {
    /// Arrival time.
    pub at: Instant,
    /// Heartbeats so far.
    pub heartbeats: u64,
    /// Pages written so far.
    pub pages_written: u64,
    /// Pages verified so far.
    pub pages_verified: u64,
    /// Corruptions so far.
    pub corrupt: u64,
    /// Frames the guest's NIC driver received.
    pub rx: u64,
    /// Frames it sent.
    pub tx: u64,
}

/// A `CPU` line (per-CPU counters after a `STATUS` line, with `smp=`) with the time it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuLine {
    /// Arrival time.
    pub at: Instant,
    /// CPU index (0 = boot processor).
    pub cpu: u64,
    /// Pages this CPU wrote.
    pub pages_written: u64,
    /// Pages this CPU verified.
    pub pages_verified: u64,
    /// Corrupt pages this CPU found.
    pub corrupt: u64,
}

/// Everything the guest said, parsed.
#[derive(Debug, Default)]
pub struct GuestLog {
    /// `READY` seen.
    pub ready: bool,
    /// Arrival time of every heartbeat.
    pub heartbeats: Vec<Instant>,
    /// Every `T` line.
    pub tlines: Vec<TLine>,
    /// Every `CORRUPT` line, verbatim.
    pub corrupt: Vec<String>,
    /// Every other line.
    pub other: Vec<String>,
    /// The `CORRUPT` pages, in order.
    pub corrupt_pages: Vec<u64>,
    /// Every `STATUS` line.
    pub status: Vec<StatusLine>,
    /// Every `CPU` line.
    pub cpus: Vec<CpuLine>,
    /// Every `GAP` line (`gap=` on the command line): when it arrived, and the stall the guest
    /// measured with its own TSC.
    pub gaps: Vec<(Instant, Duration)>,
    /// Every byte, as it came.
    pub raw: Vec<u8>,
}

/// Starts a thread that reads a guest's serial output from `out` until EOF,
/// timestamps every chunk the moment `read` returns it (the pipe is
/// unbuffered on the VMM side: each guest byte is written as it is sent),
/// and parses it into `log`.
pub fn spawn_serial_reader(
    mut out: impl Read + Send + 'static,
    log: Arc<Mutex<GuestLog>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut parser = OutputParser::new();
        let mut buf = [0u8; 4096];
        let mut events = Vec::new();
        loop {
            let n = match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let at = Instant::now();
            events.clear();
            parser.feed_into(&buf[..n], at, &mut events);
            let mut g = lock(&log);
            g.raw.extend_from_slice(&buf[..n]);
            for e in events.drain(..) {
                match e {
                    Event::Ready { .. } => g.ready = true,
                    Event::Heartbeat(t) => g.heartbeats.push(t),
                    Event::Tline {
                        heartbeats,
                        pages_written,
                        pages_verified,
                        corrupt,
                    } => g.tlines.push(TLine {
                        at,
                        heartbeats,
                        pages_written,
                        pages_verified,
                        corrupt,
                    }),
                    Event::Corrupt { page, got, want } => {
                        g.corrupt_pages.push(page);
                        g.corrupt.push(format!(
                            "CORRUPT page={page} got={got:016x} want={want:016x}"
                        ))
                    }
                    Event::Status {
                        heartbeats,
                        pages_written,
                        pages_verified,
                        corrupt,
                        rx,
                        tx,
                    } => g.status.push(StatusLine {
                        at,
                        heartbeats,
                        pages_written,
                        pages_verified,
                        corrupt,
                        rx,
                        tx,
                    }),
                    Event::Cpu {
                        cpu,
                        pages_written,
                        pages_verified,
                        corrupt,
                    } => g.cpus.push(CpuLine {
                        at,
                        cpu,
                        pages_written,
                        pages_verified,
                        corrupt,
                    }),
                    Event::Gap { us } => g.gaps.push((at, Duration::from_micros(us))),
                    Event::Other(s) => g.other.push(s),
                }
            }
        }
    })
}

/// Starts a thread that appends every line of `err` to `sink` (and echoes
/// it as `[tag] line` when `LIVEMIG_ECHO` is set).
pub fn spawn_stderr_reader(
    err: impl Read + Send + 'static,
    sink: Arc<Mutex<String>>,
    tag: &'static str,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let r = BufReader::new(err);
        for line in r.lines() {
            let Ok(line) = line else { break };
            if std::env::var_os("LIVEMIG_ECHO").is_some() {
                eprintln!("[{tag}] {line}");
            }
            let mut s = lock(&sink);
            s.push_str(&line);
            s.push('\n');
        }
    })
}

impl GuestLog {
    /// The TSC frequency the guest reported in its `INFO tsc_khz=<n> ...`
    /// line (the value refvmm passed it, from `KVM_GET_TSC_KHZ`).
    pub fn tsc_khz(&self) -> Option<u64> {
        self.other.iter().find_map(|l| {
            l.strip_prefix("INFO tsc_khz=")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
    }
}

/// A running `refvmm` process.
pub struct Vmm {
    child: Child,
    stdin: Option<ChildStdin>,
    /// API socket path.
    pub api: PathBuf,
    /// The guest's serial output, parsed.
    pub log: Arc<Mutex<GuestLog>>,
    /// The VMM's stderr, captured.
    pub stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    /// Name for messages.
    pub name: String,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Vmm {
    /// Spawns `refvmm <args>` with the serial console (output and input) on pipes.
    pub fn spawn(name: &str, args: &[String], api: PathBuf) -> Result<Vmm, String> {
        Self::spawn_prefixed(name, &[], args, api)
    }

    /// Spawns `<prefix...> refvmm <args>` (e.g. `ip netns exec NS`).
    pub fn spawn_prefixed(
        name: &str,
        prefix: &[String],
        args: &[String],
        api: PathBuf,
    ) -> Result<Vmm, String> {
        Self::spawn_binary(name, &refvmm_path(), prefix, args, api)
    }

    /// Spawns `<prefix...> <bin> <args>`: a refvmm other than
    /// [`refvmm_path`], e.g. a previous release (tests/compat.rs).
    pub fn spawn_binary(
        name: &str,
        bin: &Path,
        prefix: &[String],
        args: &[String],
        api: PathBuf,
    ) -> Result<Vmm, String> {
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(args).stdin(Stdio::piped());
        let c = spawn_captured(&mut cmd, &bin.display().to_string(), "vmm")?;
        Ok(Vmm {
            child: c.child,
            stdin: c.stdin,
            api,
            log: c.log,
            stderr: c.stderr,
            readers: c.readers,
            name: name.to_string(),
        })
    }

    /// Waits until `pred(log)` holds, or fails after `timeout` (or if the
    /// process exits first).
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&GuestLog) -> bool,
    ) -> Result<(), String> {
        wait_for_log(
            &self.name,
            &mut self.child,
            &self.log,
            &self.stderr,
            what,
            timeout,
            pred,
        )
    }

    /// Waits for `n` more heartbeats (a migrated guest prints no `READY`).
    pub fn wait_heartbeats(&mut self, n: usize, timeout: Duration) -> Result<(), String> {
        let have = lock(&self.log).heartbeats.len();
        self.wait_for(&format!("{n} heartbeats"), timeout, |g| {
            g.heartbeats.len() >= have + n
        })
    }

    /// Waits until a `T` line reports at least `pages` pages written since
    /// boot (`T` lines come every 1000th heartbeat).
    pub fn wait_pages_written(&mut self, pages: u64, timeout: Duration) -> Result<(), String> {
        self.wait_for(
            &format!("a T line with {pages} pages written"),
            timeout,
            |g| g.tlines.last().is_some_and(|t| t.pages_written >= pages),
        )
    }

    /// Types `text` on the guest's serial console (refvmm forwards its stdin to the UART).
    pub fn console_write(&mut self, text: &str) -> Result<(), String> {
        let w = self
            .stdin
            .as_mut()
            .ok_or_else(|| format!("{}: console input is closed", self.name))?;
        w.write_all(text.as_bytes())
            .and_then(|()| w.flush())
            .map_err(|e| format!("{}: console input: {e}", self.name))
    }

    /// Closes the console input (refvmm sees end of file).
    pub fn console_close(&mut self) {
        self.stdin = None;
    }

    /// Types `status` on the console and waits (up to `timeout`) for the `STATUS` answer.
    pub fn query_status(&mut self, timeout: Duration) -> Result<StatusLine, String> {
        let have = lock(&self.log).status.len();
        self.console_write("status\n")?;
        self.wait_status(have, timeout)
    }

    /// Waits for a `STATUS` line beyond the first `seen` ones and returns it.
    pub fn wait_status(&mut self, seen: usize, timeout: Duration) -> Result<StatusLine, String> {
        self.wait_for("a STATUS line", timeout, |g| g.status.len() > seen)?;
        lock(&self.log)
            .status
            .get(seen)
            .copied()
            .ok_or_else(|| format!("{}: STATUS line vanished", self.name))
    }

    /// Number of `STATUS` lines seen.
    pub fn status_count(&self) -> usize {
        lock(&self.log).status.len()
    }

    /// Waits for `READY`.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        self.wait_for("READY", timeout, |g| g.ready)
    }

    /// Waits (up to `timeout`) until the captured stderr contains `needle`;
    /// the pipe may still be draining after the process exited.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.stderr().contains(needle) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Captured stderr so far.
    pub fn stderr(&self) -> String {
        lock(&self.stderr).clone()
    }

    /// Number of heartbeats seen.
    pub fn heartbeat_count(&self) -> usize {
        lock(&self.log).heartbeats.len()
    }

    /// One API request; returns the final reply, progress lines go to `on_event`.
    pub fn api(&self, req: &Value, on_event: impl FnMut(&Value)) -> Result<Value, String> {
        api_request(&self.api, req, on_event)
    }

    /// Waits for the API socket to appear.
    pub fn wait_api(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while UnixStream::connect(&self.api).is_err() {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!(
                    "{}: exited ({st}); stderr:\n{}",
                    self.name,
                    self.stderr()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("{}: API socket never appeared", self.name));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The endpoint a `receive` process listens on (parsed from its stderr).
    pub fn listen_endpoint(&mut self, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.stderr().lines().find_map(|l| {
                l.strip_prefix("refvmm: waiting for a migration on ")
                    .map(|r| r.trim_end_matches(" (mutual TLS)").to_string())
            }) {
                return Ok(l);
            }
            if !self.is_running() || Instant::now() > deadline {
                return Err(format!(
                    "{}: no listen endpoint; stderr:\n{}",
                    self.name,
                    self.stderr()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// How long dropping a [`Vmm`] waits for its output readers after the kill.
const READER_WAIT: Duration = Duration::from_secs(5);

impl Drop for Vmm {
    /// Kills the process and waits, at most `READER_WAIT` (5 s), for its output
    /// readers to see the end of its pipes. A process this one started and
    /// that outlived it (an upgraded VMM inherits the serial pipe) keeps
    /// them open: the readers are then left behind rather than waited for
    /// for ever (a failed upgrade test hung here instead of failing).
    fn drop(&mut self) {
        self.stdin = None;
        self.kill();
        let _ = std::fs::remove_file(&self.api);
        let deadline = Instant::now() + READER_WAIT;
        for r in self.readers.drain(..) {
            while !r.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if r.is_finished() {
                let _ = r.join();
            } else {
                eprintln!(
                    "*** {}: an output reader still runs {READER_WAIT:?} after the kill \
                     (another process holds the pipe); left behind",
                    self.name
                );
            }
        }
    }
}

/// One API request over a Unix socket (see the refvmm API docs).
pub fn api_request(
    path: &Path,
    req: &Value,
    mut on_event: impl FnMut(&Value),
) -> Result<Value, String> {
    let mut c = UnixStream::connect(path).map_err(|e| format!("API {}: {e}", path.display()))?;
    let mut line = req.to_string();
    line.push('\n');
    c.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
    for l in BufReader::new(c).lines() {
        let l = l.map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&l).map_err(|e| format!("bad API reply '{l}': {e}"))?;
        if v.get("result").is_some() {
            return Ok(v);
        }
        on_event(&v);
    }
    Err("API connection closed without a result".into())
}

/// A fresh scratch directory under the system temp dir.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let d = std::env::temp_dir().join(format!("livemig-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::create_dir_all(&d);
    d
}

/// Starts `refvmm run` with the built-in test guest.
pub fn start_source(
    dir: &Path,
    name: &str,
    memory: &str,
    vcpus: u32,
    cmdline: &str,
) -> Result<Vmm, String> {
    start_source_with(dir, name, memory, vcpus, cmdline, &[])
}

/// Like [`start_source`], with `extra` options for `refvmm run` (for
/// example `["--dirty-log", "ring"]`).
pub fn start_source_with(
    dir: &Path,
    name: &str,
    memory: &str,
    vcpus: u32,
    cmdline: &str,
    extra: &[&str],
) -> Result<Vmm, String> {
    let api = dir.join(format!("{name}.sock"));
    let mut args: Vec<String> = [
        "run",
        "--memory",
        memory,
        "--kernel",
        "builtin:testguest",
        "--cmdline",
        cmdline,
        "--vcpus",
        &vcpus.to_string(),
        "--api-socket",
        &api.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut v = Vmm::spawn(name, &args, api)?;
    v.wait_api(Duration::from_secs(20))?;
    Ok(v)
}

/// Starts `refvmm receive` on a free loopback TCP port; returns it and its endpoint.
pub fn start_destination(dir: &Path, name: &str, extra: &[&str]) -> Result<(Vmm, String), String> {
    let api = dir.join(format!("{name}.sock"));
    let mut args: Vec<String> = vec![
        "receive".into(),
        "--listen".into(),
        "tcp:127.0.0.1:0".into(),
        "--api-socket".into(),
        api.to_string_lossy().into_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut v = Vmm::spawn(name, &args, api)?;
    let ep = v.listen_endpoint(Duration::from_secs(20))?;
    Ok((v, ep))
}

/// Asks `src` to migrate to `to`; returns the report (JSON) or the error reply.
pub fn migrate(src: &Vmm, to: &str, extra: Value) -> Result<Value, Value> {
    let mut req = json!({"cmd": "migrate", "to": to});
    if let (Some(obj), Some(more)) = (req.as_object_mut(), extra.as_object()) {
        for (k, v) in more {
            obj.insert(k.clone(), v.clone());
        }
    }
    match src.api(&req, |_| {}) {
        Ok(v) if v["result"] == "ok" => Ok(v["report"].clone()),
        Ok(v) => Err(v),
        Err(e) => Err(json!({"result": "error", "error": e})),
    }
}

/// Heartbeat gaps across a migration.
#[derive(Debug, Clone, Copy)]
pub struct Blackout {
    /// Last source heartbeat → first destination heartbeat.
    pub switchover_gap: Duration,
    /// Largest gap between consecutive heartbeats (source then destination,
    /// merged) from `from` on.
    pub largest_gap: Duration,
}

/// Computes the blackout from the source's and destination's heartbeats;
/// `None` when a side has none, or when the destination's first heartbeat
/// arrived before the source's last (then no gap can be told).
pub fn blackout(src: &GuestLog, dst: &GuestLog, from: Instant) -> Option<Blackout> {
    let last_src = *src.heartbeats.last()?;
    let first_dst = *dst.heartbeats.first()?;
    let mut all: Vec<Instant> = src
        .heartbeats
        .iter()
        .chain(dst.heartbeats.iter())
        .copied()
        .filter(|t| *t >= from)
        .collect();
    all.sort();
    let largest = all
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    // A destination beat that arrived first means a reader ran late: no
    // gap can be told, and 0 would be a made-up number.
    if first_dst <= last_src {
        return None;
    }
    Some(Blackout {
        switchover_gap: first_dst - last_src,
        largest_gap: largest,
    })
}

/// Largest heartbeat gap within `[from, to]`.
pub fn largest_gap(log: &GuestLog, from: Instant, to: Instant) -> Duration {
    largest_gap_in(&log.heartbeats, from, to)
}

/// Largest gap between consecutive (sorted) instants within `[from, to]`.
pub fn largest_gap_in(heartbeats: &[Instant], from: Instant, to: Instant) -> Duration {
    let v: Vec<Instant> = heartbeats
        .iter()
        .copied()
        .filter(|t| *t >= from && *t <= to)
        .collect();
    v.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
}

/// Locks a log.
pub fn log_of(v: &Vmm) -> std::sync::MutexGuard<'_, GuestLog> {
    lock(&v.log)
}

/// Polls `pred` on a guest's log until it holds. Fails when the process
/// (refvmm or QEMU) exits first — after giving the readers 50 ms to drain
/// what it printed last — or after `timeout`; the error carries its stderr.
/// A spawned program whose standard output is parsed as the guest's serial
/// output and whose standard error is captured.
pub(crate) struct Captured {
    pub(crate) child: Child,
    pub(crate) stdin: Option<ChildStdin>,
    pub(crate) log: Arc<Mutex<GuestLog>>,
    pub(crate) stderr: Arc<Mutex<String>>,
    pub(crate) readers: Vec<JoinHandle<()>>,
}

/// Spawns `cmd` with standard output and error piped (standard input as
/// the caller set it): a reader thread parses the output into the log,
/// another collects standard error (its lines logged as `tag`). `what`
/// names the program in the error.
pub(crate) fn spawn_captured(
    cmd: &mut Command,
    what: &str,
    tag: &'static str,
) -> Result<Captured, String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning {what}: {e}"))?;
    let log = Arc::new(Mutex::new(GuestLog::default()));
    let stderr = Arc::new(Mutex::new(String::new()));
    let stdin = child.stdin.take();
    let out = child.stdout.take().ok_or("no stdout")?;
    let err = child.stderr.take().ok_or("no stderr")?;
    let readers = vec![
        spawn_serial_reader(out, log.clone()),
        spawn_stderr_reader(err, stderr.clone(), tag),
    ];
    Ok(Captured {
        child,
        stdin,
        log,
        stderr,
        readers,
    })
}

pub(crate) fn wait_for_log(
    name: &str,
    child: &mut Child,
    log: &Mutex<GuestLog>,
    stderr: &Mutex<String>,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&GuestLog) -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if pred(&lock(log)) {
            return Ok(());
        }
        if let Ok(Some(st)) = child.try_wait() {
            std::thread::sleep(Duration::from_millis(50));
            if pred(&lock(log)) {
                return Ok(());
            }
            return Err(format!(
                "{name}: exited ({st}) while waiting for {what}; stderr:\n{}",
                lock(stderr)
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{name}: timed out after {timeout:?} waiting for {what}; stderr:\n{}",
                lock(stderr)
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A `refvmm console PATH` client: its standard input typed into, its
/// standard output (the guest's console output) parsed like a VMM's.
pub struct ConsoleClient {
    child: Child,
    /// The client's standard input (the guest's console input); take it
    /// to type from another thread.
    pub stdin: Option<ChildStdin>,
    /// What it printed, parsed.
    pub log: Arc<Mutex<GuestLog>>,
    /// Its stderr.
    pub stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl ConsoleClient {
    /// Attaches to the console socket `path` (`--from-start` if
    /// `from_start`: also the output the VMM still keeps).
    pub fn attach(path: &Path, from_start: bool) -> Result<ConsoleClient, String> {
        let bin = refvmm_path();
        let mut cmd = Command::new(&bin);
        cmd.arg("console").arg(path);
        if from_start {
            cmd.arg("--from-start");
        }
        cmd.stdin(Stdio::piped());
        let c = spawn_captured(&mut cmd, &format!("{} console", bin.display()), "console")?;
        Ok(ConsoleClient {
            stdin: c.stdin,
            child: c.child,
            log: c.log,
            stderr: c.stderr,
            readers: c.readers,
        })
    }

    /// Waits until `pred(log)` holds, or fails after `timeout` (or if the
    /// client exits first).
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&GuestLog) -> bool,
    ) -> Result<(), String> {
        wait_for_log(
            "console client",
            &mut self.child,
            &self.log,
            &self.stderr,
            what,
            timeout,
            pred,
        )
    }

    /// Waits for the client to exit; then for its output to be read.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> String {
        lock(&self.stderr).clone()
    }
}

impl Drop for ConsoleClient {
    fn drop(&mut self) {
        self.stdin = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

/// The switchover as the guest's own stall meter saw it (`gap=` on its
/// command line): the destination's first `GAP` line. The guest measures
/// the stall at its first TSC read on the destination (the top of a
/// main-loop iteration, or right after a heartbeat byte it was writing when
/// paused) and prints it at the top of the next iteration, so it arrives no
/// later than the destination's second heartbeat. It is the TSC time from
/// the guest's last TSC read on the source to its first on the destination:
/// free of the delay with which the serial reader runs, and of the
/// heartbeat period.
///
/// Fails — it never makes up a number — when the destination printed no
/// `GAP` line by its second heartbeat (then the switchover was shorter than
/// `gap=`, and a later line is another stall).
pub fn guest_switchover_gap(dst: &GuestLog) -> Result<Duration, String> {
    let &(at, gap) = dst.gaps.first().ok_or(
        "the destination's guest printed no GAP line (no gap= on its command line, or a switchover shorter than it)",
    )?;
    match dst.heartbeats.get(1) {
        Some(hb) if at <= *hb => Ok(gap),
        Some(_) => Err(format!(
            "the destination's first GAP line ({:.3} ms) came after its second heartbeat: the switchover was shorter than gap=",
            gap.as_secs_f64() * 1e3
        )),
        None => Err("fewer than two destination heartbeats".into()),
    }
}

/// The guest-observed figures of one migration, from the heartbeats'
/// arrival times: the same for refvmm and QEMU.
#[derive(Debug, Clone, Copy)]
pub struct SwitchoverGaps {
    /// Last source heartbeat → first destination heartbeat.
    pub switchover_gap: Duration,
    /// Largest heartbeat gap (source and destination merged) from `t0` to
    /// 50 ms after the later of `t1` and the destination's first heartbeat
    /// (QEMU reports completion when the source has sent everything, which
    /// can be well before the destination runs the guest).
    pub blackout: Duration,
    /// Largest source heartbeat gap over an equally long stretch (≥ 200 ms)
    /// before `t0`: what the machine alone does to the heartbeats.
    pub noise_floor: Duration,
}

/// Measures a migration that ran from `t0` (request sent) to `t1` (the VMM
/// said it completed) from the source's and the destination's heartbeats.
///
/// Fails — it never makes up a number — when a side has no heartbeat, when
/// the destination's first heartbeat arrived before the source's last
/// (a reader thread ran late: the arrival times no longer tell the gap),
/// or when the source has fewer than two heartbeats before `t0` (no noise
/// floor to set the figures against).
pub fn switchover_gaps(
    src: &[Instant],
    dst: &[Instant],
    t0: Instant,
    t1: Instant,
) -> Result<SwitchoverGaps, String> {
    let last_src = *src.last().ok_or("no source heartbeat")?;
    let first_dst = *dst.first().ok_or("no destination heartbeat")?;
    if first_dst <= last_src {
        return Err(format!(
            "the destination's first heartbeat arrived {:.2} ms before the source's last: \
             a serial reader ran late, the switchover gap cannot be measured",
            (last_src - first_dst).as_secs_f64() * 1e3
        ));
    }
    let span = (t1.saturating_duration_since(t0)).max(Duration::from_millis(200));
    let from = t0.checked_sub(span).unwrap_or(t0);
    if src.iter().filter(|t| **t >= from && **t <= t0).count() < 2 {
        return Err(format!(
            "fewer than two source heartbeats in the {:.0} ms before the migration: no noise floor",
            span.as_secs_f64() * 1e3
        ));
    }
    let mut all: Vec<Instant> = src.iter().chain(dst.iter()).copied().collect();
    all.sort();
    Ok(SwitchoverGaps {
        switchover_gap: first_dst - last_src,
        blackout: largest_gap_in(&all, t0, t1.max(first_dst) + Duration::from_millis(50)),
        noise_floor: largest_gap_in(src, from, t0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beats(start: Instant, from_ms: u64, to_ms: u64) -> Vec<Instant> {
        (from_ms..to_ms)
            .map(|m| start + Duration::from_millis(m))
            .collect()
    }

    #[test]
    fn gaps_of_a_plain_switchover() {
        let z = Instant::now();
        let src = beats(z, 0, 500);
        let dst = beats(z, 510, 600);
        let t0 = z + Duration::from_millis(300);
        let t1 = z + Duration::from_millis(509);
        let g = switchover_gaps(&src, &dst, t0, t1).unwrap();
        assert_eq!(g.switchover_gap, Duration::from_millis(11));
        assert_eq!(g.blackout, Duration::from_millis(11));
        assert_eq!(g.noise_floor, Duration::from_millis(1));
    }

    /// A destination heartbeat that arrived before the source's last one
    /// (a reader thread that ran late) must not become a gap of 0.00 ms.
    #[test]
    fn a_destination_beat_before_the_source_s_last_is_an_error() {
        let z = Instant::now();
        let src = beats(z, 0, 500);
        let dst = beats(z, 495, 600);
        let t0 = z + Duration::from_millis(300);
        let t1 = z + Duration::from_millis(499);
        let e = switchover_gaps(&src, &dst, t0, t1).map(|g| g.switchover_gap);
        assert!(e.is_err(), "measured {e:?}");
    }

    /// No heartbeats on one side, or none before the migration for the
    /// noise floor: no measurement, not a number.
    #[test]
    fn missing_heartbeats_are_an_error() {
        let z = Instant::now();
        let t0 = z + Duration::from_millis(300);
        let t1 = z + Duration::from_millis(500);
        let src = beats(z, 0, 500);
        let dst = beats(z, 510, 600);
        for (what, s, d) in [
            ("no destination heartbeat", &src[..], &[][..]),
            ("no source heartbeat", &[][..], &dst[..]),
            ("no source heartbeat before t0", &src[400..], &dst[..]),
        ] {
            let r = switchover_gaps(s, d, t0, t1);
            assert!(r.is_err(), "{what}: measured {r:?}");
        }
    }
}
