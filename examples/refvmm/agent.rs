//! `refvmm agent`: a host answers for itself.
//!
//! A small server a cluster runs on every host. It speaks JSON lines (one
//! request, one reply, on as many lines as the client likes) on a
//! transport endpoint (`tcp:HOST:PORT` or `unix:PATH`), over mutual TLS
//! when given `--tls-cert/--tls-key/--tls-ca` (the migration endpoint's
//! TLS, `livemig-tls`).
//!
//! | request | reply |
//! |---|---|
//! | `{"cmd":"capacity"}` | `{"result":"ok","host":{...},"accepting":true\|false,"refusal":...,"incoming":[...]}`: `host` has the fields of a hosts-file entry (without `migration_address`); `refusal` says why not accepting |
//! | `{"cmd":"prepare-receive","vm":NAME,"memory_mib":M,"memory_bytes":B,"vcpus":V}` | starts `refvmm receive --memory B --vcpus V` for one incoming migration of that size (`memory_bytes` optional, default M MiB); `{"result":"ok","id":ID,"migration_address":EP,"api_socket":PATH,"tls":bool}`, or `{"result":"error","refused":true,"error":WHY}` |
//! | `{"cmd":"release","id":ID}` | stops a receiver that has not received its guest (a migration that failed or was not started) |
//! | `{"cmd":"set-maintenance","on":true}` | enters/leaves maintenance: `accepting` false, `prepare-receive` refused |
//!
//! Facts, each read when asked: memory from `--memory-mib` (a budget for
//! guests) minus the memory of the guests this agent started receivers for,
//! or else `/proc/meminfo` (`MemTotal`, and `MemAvailable` minus the memory
//! of receivers still waiting for their guest); CPUs from the scheduler's
//! CPU set; load from `/proc/loadavg` (1 minute); CPU model and feature
//! flags from `/proc/cpuinfo`; vCPUs allocated = those of this agent's live
//! receivers. The link bandwidth is what the operator says
//! (`--link-bandwidth`), not measured.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use livemig::transport::{connect, listen, Endpoint, Transport};
use serde_json::{json, Value};

use crate::cli::{runtime, usage, Fail, TlsArgs};

/// `refvmm agent` options.
#[derive(clap::Args, Clone)]
pub struct AgentArgs {
    /// Where to answer: tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    listen: String,
    /// This host's name (default: the kernel's hostname).
    #[arg(long)]
    name: Option<String>,
    /// Start in maintenance (no migrations accepted).
    #[arg(long)]
    maintenance: bool,
    /// Memory for guests, MiB (default: /proc/meminfo).
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Bandwidth of the migration link to this host, MiB/s.
    #[arg(long, default_value_t = 1100)]
    link_bandwidth: u64,
    /// Labels (comma-separated), e.g. `rack:r1`.
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// The address receivers listen on (a free port is taken each time).
    #[arg(long, default_value = "127.0.0.1")]
    receive_host: String,
    /// Where receivers' API sockets and serial logs go (default: a new
    /// directory under the temp dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Most receivers waiting for their guest at once.
    #[arg(long, default_value_t = 4)]
    max_incoming: usize,
    #[command(flatten)]
    tls: TlsArgs,
}

/// The state of one receiver the agent started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxState {
    Waiting,
    Running,
    Exited,
}

struct Receiver {
    id: String,
    vm: String,
    memory_mib: u64,
    vcpus: u32,
    address: String,
    api_socket: PathBuf,
    child: Child,
    state: Arc<Mutex<RxState>>,
}

impl Receiver {
    fn state(&mut self) -> RxState {
        if let Ok(Some(_)) = self.child.try_wait() {
            *lock(&self.state) = RxState::Exited;
        }
        *lock(&self.state)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Agent {
    args: AgentArgs,
    name: String,
    work_dir: PathBuf,
    maintenance: AtomicBool,
    next_id: AtomicU64,
    receivers: Mutex<Vec<Receiver>>,
}

fn meminfo_mib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kb / 1024)
    })
}

fn load_1min() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The first processor's model name and flags.
fn cpuinfo() -> (String, BTreeSet<String>) {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        text.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    (field("model name"), flags)
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Agent {
    /// Live receivers' memory and vCPUs: (all, waiting) memory, vCPUs,
    /// waiting count, list.
    fn census(&self) -> (u64, u64, u32, usize, Vec<Value>) {
        let mut rx = lock(&self.receivers);
        let mut out = (0, 0, 0, 0, Vec::new());
        rx.retain_mut(|r| r.state() != RxState::Exited);
        for r in rx.iter_mut() {
            let st = r.state();
            out.0 += r.memory_mib;
            out.2 += r.vcpus;
            if st == RxState::Waiting {
                out.1 += r.memory_mib;
                out.3 += 1;
            }
            out.4
                .push(json!({"id": r.id, "vm": r.vm, "memory_mib": r.memory_mib,
                "vcpus": r.vcpus, "migration_address": r.address,
                "api_socket": r.api_socket, "state": format!("{st:?}").to_lowercase()}));
        }
        out
    }

    fn host_facts(&self) -> (Value, usize) {
        let (mem_all, mem_waiting, vcpus, waiting, _) = self.census();
        let (total, free) = match self.args.memory_mib {
            Some(budget) => (budget.max(1), budget.saturating_sub(mem_all)),
            None => {
                let total = meminfo_mib("MemTotal").unwrap_or(1).max(1);
                let avail = meminfo_mib("MemAvailable").unwrap_or(0);
                (total, avail.saturating_sub(mem_waiting).min(total))
            }
        };
        let (model, features) = cpuinfo();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let host = json!({
            "name": self.name,
            "memory_total_mib": total,
            "memory_free_mib": free,
            "cpus": cpus,
            "cpu_load": load_1min(),
            "vcpus_allocated": vcpus,
            "cpu_model": model,
            "cpu_features": features,
            "link_bandwidth_mib_s": self.args.link_bandwidth.max(1),
            "labels": self.args.labels,
            "maintenance": self.maintenance.load(Ordering::SeqCst),
        });
        (host, waiting)
    }

    /// Why this host takes no migration now, if it does not.
    fn refusal(&self, waiting: usize) -> Option<String> {
        if self.maintenance.load(Ordering::SeqCst) {
            return Some("the host is in maintenance".into());
        }
        if waiting >= self.args.max_incoming {
            return Some(format!(
                "{waiting} incoming migrations already waiting (at most {})",
                self.args.max_incoming
            ));
        }
        None
    }

    fn capacity(&self) -> Value {
        let (host, waiting) = self.host_facts();
        let refusal = self.refusal(waiting);
        let (.., list) = self.census();
        json!({"result":"ok","host":host,"accepting":refusal.is_none(),
               "refusal":refusal,"incoming":list})
    }

    fn prepare(&self, req: &Value) -> Value {
        let refuse = |why: String| json!({"result":"error","refused":true,"error":why});
        let (Some(memory_mib), Some(vcpus)) = (req["memory_mib"].as_u64(), req["vcpus"].as_u64())
        else {
            return json!({"result":"error","error":"prepare-receive needs memory_mib and vcpus"});
        };
        let vm = req["vm"].as_str().unwrap_or("").to_string();
        // The exact size, when given (the handshake refuses another one).
        let bytes = req["memory_bytes"].as_u64().unwrap_or(memory_mib << 20);
        if bytes == 0 || !bytes.is_multiple_of(4096) || bytes.div_ceil(1 << 20) != memory_mib {
            return json!({"result":"error","error":format!("memory_bytes {bytes} does not match memory_mib {memory_mib}")});
        }
        let (host, waiting) = self.host_facts();
        if let Some(why) = self.refusal(waiting) {
            return refuse(why);
        }
        let free = host["memory_free_mib"].as_u64().unwrap_or(0);
        if free < memory_mib {
            return refuse(format!(
                "not enough memory: {memory_mib} MiB asked, {free} MiB free"
            ));
        }
        match self.spawn_receiver(&vm, bytes, vcpus as u32) {
            Ok(v) => v,
            Err(e) => json!({"result":"error","error":e}),
        }
    }

    fn spawn_receiver(&self, vm: &str, bytes: u64, vcpus: u32) -> Result<Value, String> {
        let memory_mib = bytes.div_ceil(1 << 20);
        let n = self.next_id.fetch_add(1, Ordering::SeqCst);
        let id = format!("rx-{n}");
        let api = self.work_dir.join(format!("{id}.api"));
        let serial = self.work_dir.join(format!("{id}.serial"));
        let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.args(["receive", "--listen"])
            .arg(format!("tcp:{}:0", self.args.receive_host))
            .arg("--memory")
            .arg(format!("{}K", bytes / 1024))
            .arg("--vcpus")
            .arg(vcpus.to_string())
            .arg("--api-socket")
            .arg(&api)
            .arg("--serial")
            .arg(format!("file:{}", serial.display()));
        let t = &self.args.tls;
        if let (Some(c), Some(k), Some(a)) = (&t.tls_cert, &t.tls_key, &t.tls_ca) {
            cmd.arg("--tls-cert").arg(c);
            cmd.arg("--tls-key").arg(k);
            cmd.arg("--tls-ca").arg(a);
        }
        unblock_stop_signals_on_exec(&mut cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting refvmm receive: {e}"))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let state = Arc::new(Mutex::new(RxState::Waiting));
        let (tx, rx) = std::sync::mpsc::channel();
        let log = self.work_dir.join(format!("{id}.log"));
        spawn_stderr_watch(stderr, log, state.clone(), tx);
        let address = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "refvmm receive did not start listening (see {id}.log in {})",
                    self.work_dir.display()
                ));
            }
        };
        eprintln!("refvmm agent: {id}: waiting for VM `{vm}` ({memory_mib} MiB, {vcpus} vCPUs) on {address}");
        let reply = json!({"result":"ok","id":id,"migration_address":address,
            "api_socket":api,"tls":self.args.tls.tls_cert.is_some()});
        lock(&self.receivers).push(Receiver {
            id,
            vm: vm.to_string(),
            memory_mib,
            vcpus,
            address,
            api_socket: api,
            child,
            state,
        });
        Ok(reply)
    }

    fn release(&self, req: &Value) -> Value {
        let id = req["id"].as_str().unwrap_or("");
        let mut rx = lock(&self.receivers);
        let Some(r) = rx.iter_mut().find(|r| r.id == id) else {
            return json!({"result":"ok","note":"no such receiver (it exited)"});
        };
        match r.state() {
            RxState::Waiting => {
                let _ = r.child.kill();
                let _ = r.child.wait();
                *lock(&r.state) = RxState::Exited;
                eprintln!("refvmm agent: {id}: released");
                json!({"result":"ok"})
            }
            RxState::Exited => json!({"result":"ok"}),
            RxState::Running => {
                json!({"result":"error","error":"it has received its guest: not released"})
            }
        }
    }

    fn answer(&self, line: &str) -> Value {
        let req: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => return json!({"result":"error","error":format!("bad request: {e}")}),
        };
        match req["cmd"].as_str().unwrap_or("") {
            "capacity" => self.capacity(),
            "prepare-receive" => self.prepare(&req),
            "release" => self.release(&req),
            "set-maintenance" => {
                let on = req["on"].as_bool().unwrap_or(true);
                self.maintenance.store(on, Ordering::SeqCst);
                eprintln!(
                    "refvmm agent: maintenance {}",
                    if on { "on" } else { "off" }
                );
                json!({"result":"ok","maintenance":on})
            }
            other => json!({"result":"error","error":format!("unknown command '{other}'")}),
        }
    }

    /// Kills the receivers still waiting for a guest (those with a guest
    /// run on: they are VMs now).
    fn stop_waiting(&self) {
        for r in lock(&self.receivers).iter_mut() {
            if r.state() == RxState::Waiting {
                let _ = r.child.kill();
                let _ = r.child.wait();
            }
        }
    }
}

/// Follows a receiver's stderr: its listen address, then whether it got
/// its guest; everything goes to `log`.
fn spawn_stderr_watch(
    stderr: impl Read + Send + 'static,
    log: PathBuf,
    state: Arc<Mutex<RxState>>,
    tx: std::sync::mpsc::Sender<String>,
) {
    std::thread::spawn(move || {
        let mut file = std::fs::File::create(&log).ok();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(f) = file.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            if let Some(ep) = line.strip_prefix("refvmm: waiting for a migration on ") {
                let _ = tx.send(ep.trim_end_matches(" (mutual TLS)").to_string());
            }
            if line.starts_with("refvmm: migration received") {
                *lock(&state) = RxState::Running;
            }
        }
        *lock(&state) = RxState::Exited;
    });
}

fn serve_conn(agent: &Agent, t: Box<dyn Transport>) {
    let Ok(mut w) = t.try_clone() else { return };
    for line in BufReader::new(t).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let reply = agent.answer(&line);
        if w.write_all(format!("{reply}\n").as_bytes()).is_err() {
            return;
        }
    }
}

/// `refvmm agent`: answers until killed (SIGTERM/SIGINT: receivers still
/// waiting are stopped; those with a guest keep running).
pub fn cmd_agent(args: AgentArgs) -> Result<(), Fail> {
    let endpoint: Endpoint = args
        .listen
        .parse()
        .map_err(|e| usage(format!("--listen: {e}")))?;
    let work_dir = match &args.work_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("refvmm-agent-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work_dir)
        .map_err(|e| runtime(format!("{}: {e}", work_dir.display())))?;
    let agent = Arc::new(Agent {
        name: args.name.clone().unwrap_or_else(hostname),
        maintenance: AtomicBool::new(args.maintenance),
        next_id: AtomicU64::new(1),
        receivers: Mutex::new(Vec::new()),
        work_dir,
        args,
    });
    let accept = listener(&agent.args, &endpoint)?;
    {
        let agent = agent.clone();
        on_stop_signal(move || agent.stop_waiting());
    }
    loop {
        match accept() {
            Ok(t) => {
                let agent = agent.clone();
                std::thread::spawn(move || serve_conn(&agent, t));
            }
            Err(e) => eprintln!("refvmm agent: refused a connection: {e}"),
        }
    }
}

type Accept = Box<dyn Fn() -> Result<Box<dyn Transport>, String>>;

/// Binds the endpoint (with TLS if asked for) and says where it listens.
fn listener(args: &AgentArgs, endpoint: &Endpoint) -> Result<Accept, Fail> {
    match args.tls.config(None) {
        Some(cfg) => {
            let id = cfg.load().map_err(|e| usage(e.to_string()))?;
            let l = livemig_tls::TlsListener::bind(endpoint, &id)
                .map_err(|e| runtime(e.to_string()))?;
            eprintln!(
                "refvmm agent: answering on {} (mutual TLS)",
                l.local_endpoint()
            );
            Ok(Box::new(move || l.accept().map_err(|e| e.to_string())))
        }
        None => {
            let l = listen(endpoint).map_err(|e| runtime(e.to_string()))?;
            eprintln!("refvmm agent: answering on {}", l.local_endpoint());
            Ok(Box::new(move || l.accept().map_err(|e| e.to_string())))
        }
    }
}

/// Makes `cmd`'s process start with SIGINT/SIGTERM unblocked: the agent's
/// threads block them (see [`on_stop_signal`]) and a blocked mask survives
/// exec, so a receiver would otherwise ignore SIGTERM.
fn unblock_stop_signals_on_exec(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls sigemptyset/sigaddset on a local set and pthread_sigmask, all
    // async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            match libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) {
                0 => Ok(()),
                e => Err(std::io::Error::from_raw_os_error(e)),
            }
        });
    }
}

/// Runs `f` on the first SIGTERM/SIGINT, then exits (code 0).
fn on_stop_signal(f: impl FnOnce() + Send + 'static) {
    // SAFETY: the set is a local, initialised by sigemptyset before use;
    // pthread_sigmask only changes this thread's mask (inherited by the
    // threads started afterwards, so the signals wait for sigwait).
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is initialised; `sig` is a valid out pointer.
        unsafe { libc::sigwait(&set, &mut sig) };
        f();
        eprintln!("refvmm agent: stopped");
        std::process::exit(0);
    });
}

// ---- client side ----

/// How to reach agents: TLS identity (if any) and a timeout.
#[derive(Clone, Default)]
pub struct AgentClient {
    /// Mutual TLS for the agent connection.
    pub tls: Option<livemig_tls::TlsConfig>,
}

impl AgentClient {
    /// One request, one reply, within 5 s.
    pub fn request(&self, endpoint: &str, req: &Value) -> Result<Value, String> {
        let ep: Endpoint = endpoint.parse().map_err(|e| format!("{endpoint}: {e}"))?;
        let timeout = Some(Duration::from_secs(5));
        let mut t: Box<dyn Transport> = match &self.tls {
            Some(cfg) => {
                let id = cfg.load().map_err(|e| e.to_string())?;
                livemig_tls::connect_tls(&ep, &id, timeout).map_err(|e| e.to_string())?
            }
            None => connect(&ep, timeout).map_err(|e| e.to_string())?,
        };
        t.set_read_timeout(Some(Duration::from_secs(15)))
            .map_err(|e| e.to_string())?;
        t.write_all(format!("{req}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(t)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if line.is_empty() {
            return Err("the agent closed the connection without a reply".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("bad reply '{}': {e}", line.trim()))
    }
}
