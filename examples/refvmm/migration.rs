//! Both migration drivers of refvmm: the source's (a `migrate` API request
//! runs the engine on this VMM's machine) and the destination's
//! (`refvmm receive`: wait for one incoming migration, then run the guest).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use livemig::policy::{MigrationConfig, OnLimit};
use livemig::source::postcopy::{PostcopyConfig, SwitchRequest};
use livemig::transport::{
    connect, listen, Dialer, Endpoint, OwnedAcceptor, StreamAcceptor, StreamOpener, Transport,
};
use livemig::vm::VmError;
use livemig::{Migration, Progress, ReceiveConfig, Reception};
use livemig_kvm::serial::SerialOutput;
use livemig_kvm::{check_compatible, check_properties};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::api::ApiSocket;
use crate::api_state::ApiState;
use crate::cli::{
    parse_dirty, parse_memory_options, parse_serial, parse_size, runtime, usage, Fail, ReceiveArgs,
};
use crate::monitor::MigrationMonitor;
use crate::net;
use crate::postcopy::{classify, open_fault, uffd_pager, First};
use crate::postcopy_recovery::{Notify, ResumeGate, SourceRecovery};
use crate::postcopy_resume::{new_token, wait_for_resume, Token};
use crate::run::{bind_api, open_console, open_nets, run_machine};
use crate::socket_path::Listener;
use crate::vmm::{DestMachine, Machine, MachineConfig};

// ---- source ----

/// What a finished migration means for the client and the main loop.
pub(crate) enum Outcome {
    /// The guest runs on the destination.
    Migrated(Value),
    /// The source kept the guest (`None`), or the outcome is unknown
    /// (`Some`: the main loop must exit without resuming).
    Failed(Value, Option<String>),
}

pub(crate) fn setup_error(msg: String) -> Outcome {
    Outcome::Failed(
        json!({"result":"error","phase":"setup","status":"failed","error":msg}),
        None,
    )
}

/// The options of one outgoing migration, defined once: they are the
/// `refvmm migrate` flags (clap), the fields of the API `migrate` request
/// (serde: the client serializes them, the source deserializes them), and
/// [`MigrateOptions::config`] turns them into the engine's configuration.
/// A new option is a field here and, if the engine needs it, a line in
/// `config`.
#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MigrateOptions {
    /// Destination: tcp:HOST:PORT, unix:PATH, or `auto` to choose one
    /// of --hosts for the VM described by --vm (see docs/placement.md).
    #[arg(long)]
    pub to: String,
    /// Longest acceptable downtime in milliseconds (default 20).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit_ms: Option<u64>,
    /// Bandwidth cap in MiB/s (default, or 0: none).
    #[arg(long = "max-bandwidth", value_name = "MIB_PER_S")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_mib: Option<u64>,
    /// Most pre-copy rounds before the limit policy applies (default 30;
    /// clamped to 1..=10000).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rounds: Option<u64>,
    /// Extra pre-copy rounds once the expected downtime fits the limit,
    /// run while each is expected to cut it by at least 1 ms and a quarter
    /// (default 3; 0: switch over at the first round that fits).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polish_rounds: Option<u32>,
    /// Switch over when a cap is reached instead of giving up.
    #[arg(long)]
    #[serde(default)]
    pub force: bool,
    /// Page streams: spread each round's pages over this many extra
    /// connections, one sender thread each (1..=16, default 1 = all on
    /// the one connection). The destination may grant fewer.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<u32>,
    /// LZ4 for page frames where it pays: `--compress` or `--compress
    /// true` allows it (the engine's default: on only while the link, not
    /// the CPU, holds the pages back and they shrink), `--compress false`
    /// never compresses. Without the flag, the engine's default.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress: Option<bool>,
    /// Send page data straight from guest memory (`PagesGather` frames,
    /// where the destination grants them; off by default: no gain measured
    /// on the development machine, see docs/benchmarks.md).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "is_false")]
    pub zero_copy: bool,
    /// Offer the switchover probe: time the control connection's hops and
    /// the state's burst after each round and count them in the expected
    /// downtime (without it, offered only where the transport cannot tell
    /// its round trip, e.g. a Unix socket; see docs/protocol.md).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "is_false")]
    pub switchover_probe: bool,
    /// Pure post-copy: no pre-copy round; the guest runs on the
    /// destination as soon as its vCPU and device state arrived, its
    /// memory follows (on demand and pushed). See docs/postcopy.md.
    #[arg(long, conflicts_with = "postcopy_after_rounds")]
    #[serde(default, skip_serializing_if = "is_false")]
    pub postcopy: bool,
    /// Switch to post-copy after N pre-copy rounds (unless pre-copy
    /// converged first).
    #[arg(long, value_name = "N")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_after_rounds: Option<u32>,
    /// Switch to post-copy when pre-copy is predicted not to converge
    /// (instead of throttling the guest with auto-converge).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "is_false")]
    pub postcopy_auto: bool,
    /// Offer post-copy and switch when an API `migrate-postcopy` request
    /// arrives (the other post-copy options imply it).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "is_false")]
    pub postcopy_on_request: bool,
    /// After a link break during post-copy, reconnect to the destination
    /// by itself for this long (seconds; default 30, 0: not at all); then
    /// wait for `migrate --resume` (see docs/postcopy.md).
    #[arg(long = "postcopy-retry-for", value_name = "SECS")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_retry_for: Option<u64>,
    /// Continue the post-copy migration that waits for resume (its
    /// automatic retries ran out), to --to (API `migrate-resume`).
    #[arg(long)]
    #[serde(skip)]
    pub resume: bool,
    #[command(flatten)]
    #[serde(default, skip_serializing_if = "MigrateTls::is_empty")]
    pub tls: MigrateTls,
    /// Stay after the guest left, paused, so that tests can compare the
    /// source's memory with the destination's (API only).
    #[arg(skip)]
    #[serde(default)]
    pub keep_source: bool,
    /// A same-host hand-over (`--to unix:PATH` only): pass the guest
    /// memory's memfds and the NICs' TAP descriptors to the destination,
    /// which maps the same memory; no page is copied. Needs a VMM started
    /// with `--memory-backend memfd`.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "is_false")]
    pub local: bool,
    /// `refvmm upgrade`: the binary the source starts as the destination
    /// (`receive --listen` at `--to`) before the local hand-over (API only).
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_binary: Option<PathBuf>,
}

/// `--postcopy-retry-for`'s default, in seconds.
pub(crate) const DEFAULT_POSTCOPY_RETRY_S: u64 = 30;

fn is_false(b: &bool) -> bool {
    !*b
}

/// Mutual TLS for the migration: our certificate chain and key, and the CA
/// that must have signed the destination's certificate (all three or
/// none). In the API request: `"tls":{"cert","key","ca","server_name"}`.
#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MigrateTls {
    /// PEM certificate chain presented to the destination.
    #[arg(long = "tls-cert", value_name = "PATH", requires_all = ["key", "ca"])]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    #[arg(long = "tls-key", value_name = "PATH", requires_all = ["cert", "ca"])]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// PEM CA certificate(s) the destination's certificate must chain to.
    #[arg(long = "tls-ca", value_name = "PATH", requires_all = ["cert", "key"])]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Name the destination's certificate must carry (default: the host
    /// part of --to).
    #[arg(long = "tls-server-name")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

impl MigrateTls {
    fn is_empty(&self) -> bool {
        *self == MigrateTls::default()
    }

    /// The TLS configuration, if TLS was asked for.
    pub(crate) fn config(&self) -> Result<Option<livemig_tls::TlsConfig>, String> {
        match (&self.cert, &self.key, &self.ca) {
            (Some(c), Some(k), Some(a)) => Ok(Some(livemig_tls::TlsConfig {
                cert_chain: c.clone(),
                key: k.clone(),
                ca: a.clone(),
                server_name: self.server_name.clone(),
            })),
            (None, None, None) => Ok(None),
            _ => Err("tls needs cert, key and ca".into()),
        }
    }
}

impl MigrateOptions {
    /// Whether any post-copy option was given (the migration then offers
    /// post-copy and opens the fault connection).
    pub fn wants_postcopy(&self) -> bool {
        self.postcopy
            || self.postcopy_after_rounds.is_some()
            || self.postcopy_auto
            || self.postcopy_on_request
    }

    /// When to switch to post-copy, if asked for (`request` is the
    /// `migrate-postcopy` API request's handle).
    pub fn postcopy_config(&self, request: SwitchRequest) -> Option<PostcopyConfig> {
        if !self.wants_postcopy() {
            return None;
        }
        let after_rounds = if self.postcopy {
            0
        } else {
            self.postcopy_after_rounds.unwrap_or(u32::MAX)
        };
        Some(PostcopyConfig {
            after_rounds,
            on_non_convergence: self.postcopy_auto,
            request,
        })
    }

    /// How long a post-copy source reconnects by itself after a break.
    pub fn postcopy_retry(&self) -> Duration {
        Duration::from_secs(self.postcopy_retry_for.unwrap_or(DEFAULT_POSTCOPY_RETRY_S))
    }

    /// The options of an API `migrate` request (its `cmd` aside); unknown
    /// fields are refused.
    pub fn from_request(req: &Value) -> Result<MigrateOptions, String> {
        let mut fields = req.clone();
        if let Some(o) = fields.as_object_mut() {
            o.remove("cmd");
        }
        serde_json::from_value(fields).map_err(|e| format!("bad migrate request: {e}"))
    }

    /// The API `migrate` request for these options.
    pub fn to_request(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or_else(|_| json!({}));
        v["cmd"] = json!("migrate");
        v
    }

    /// The destination endpoint.
    pub fn endpoint(&self) -> Result<Endpoint, String> {
        self.to.parse().map_err(|e| format!("{e}"))
    }

    /// The engine configuration these options ask for; refused when out
    /// of range.
    pub fn config(&self) -> Result<MigrationConfig, String> {
        let mut cfg = MigrationConfig::default();
        if let Some(ms) = self.downtime_limit_ms {
            cfg.downtime_limit = Duration::from_millis(ms);
        }
        if let Some(mib) = self.max_bandwidth_mib.filter(|v| *v > 0) {
            cfg.max_bandwidth = Some(mib << 20);
        }
        if let Some(n) = self.polish_rounds {
            cfg.polish_rounds = n;
        }
        if let Some(r) = self.max_rounds {
            cfg.max_rounds = r.clamp(1, 10_000) as u32;
        }
        if self.force {
            cfg.on_limit = OnLimit::ForceSwitchover;
        }
        if let Some(n) = self.streams {
            if n == 0 || n > livemig::protocol::MAX_STREAMS {
                return Err(format!(
                    "streams {n} is outside 1..={}",
                    livemig::protocol::MAX_STREAMS
                ));
            }
            cfg.streams = n;
        }
        if let Some(c) = self.compress {
            cfg.compress = c;
        }
        cfg.zero_copy = self.zero_copy;
        cfg.switchover_probe = self.switchover_probe.then_some(true);
        let tls = self.tls.config()?;
        if self.wants_postcopy() {
            if cfg.streams > 1 {
                return Err("streams: post-copy uses one page stream (give no --streams)".into());
            }
            if tls.is_some() {
                return Err("post-copy over TLS is not built in refvmm".into());
            }
        }
        Ok(cfg)
    }
}

/// The control connection and the opener of the extra page streams.
type Connected = (Box<dyn Transport>, Box<dyn StreamOpener>);

/// Connects to the destination (over mutual TLS if asked for); returns the
/// control connection and the opener of extra page streams.
fn connect_to(opts: &MigrateOptions, endpoint: &Endpoint) -> Result<Connected, String> {
    let timeout = Some(Duration::from_secs(10));
    let Some(cfg) = opts.tls.config()? else {
        let t = connect(endpoint, timeout).map_err(|e| format!("connecting to {endpoint}: {e}"))?;
        let opener = Dialer {
            endpoint: endpoint.clone(),
            timeout,
        };
        return Ok((t, Box::new(opener)));
    };
    let id = cfg.load().map_err(|e| e.to_string())?;
    let t = livemig_tls::connect_tls(endpoint, &id, timeout)
        .map_err(|e| format!("connecting to {endpoint}: {e}"))?;
    let opener = livemig_tls::TlsDialer {
        endpoint: endpoint.clone(),
        id,
        timeout,
    };
    Ok((t, Box::new(opener)))
}

/// Runs the migration `opts` asks for on `m`, reported to `monitor` (for
/// every API client) and to `progress` (the engine's events, for the
/// asking client; `notify` sends it refvmm's own, from any thread).
pub(crate) fn do_migrate(
    opts: &MigrateOptions,
    m: &Arc<Machine>,
    monitor: &MigrationMonitor,
    progress: &mut dyn FnMut(&Progress),
    notify: Notify,
) -> Outcome {
    // Refuse before connecting anywhere (the engine's guard checks again).
    if let Err(e) = m.guard.check() {
        return setup_error(e.to_string());
    }
    let endpoint = match opts.endpoint() {
        Ok(e) => e,
        Err(e) => return setup_error(e),
    };
    let cfg = match opts.config() {
        Ok(c) => c,
        Err(e) => return setup_error(e),
    };
    if opts.local {
        return crate::upgrade::do_local(opts, &endpoint, cfg, m, monitor, progress);
    }
    let memory = m.vm.ram().iter().map(|r| r.len()).sum::<u64>();
    let active = match monitor.begin(memory, &cfg) {
        Ok(a) => a,
        Err(e) => return setup_error(e.into()),
    };
    // A post-copy source opens its fault connection first (postcopy.rs),
    // with the token that ties a later resume to this migration.
    let token = match new_token() {
        Ok(t) => t,
        Err(e) => {
            active.abort(&e);
            return setup_error(e);
        }
    };
    let fault = if opts.wants_postcopy() {
        match open_fault(&endpoint, &token) {
            Ok(f) => Some(f),
            Err(e) => {
                active.abort(&e);
                return setup_error(e);
            }
        }
    } else {
        None
    };
    let (transport, mut opener) = match connect_to(opts, &endpoint) {
        Ok(c) => c,
        Err(e) => {
            active.abort(&e);
            return setup_error(e);
        }
    };
    let switch = SwitchRequest::new();
    let streams = cfg.streams;
    let migration = Migration::new(&**m)
        .guard(&m.guard)
        .config(cfg)
        .cancel(active.cancel.clone())
        .progress(|p: &Progress| {
            active.progress(p);
            progress(p);
        });
    let result = match opts.postcopy_config(switch.clone()) {
        None => {
            let opener = active.count_opener(&mut *opener);
            migration
                .streams(streams, opener)
                .run(active.count(transport))
        }
        Some(pc) => {
            let Some(fault) = fault else {
                return setup_error("no fault connection".into());
            };
            active.allow_postcopy_request(switch);
            let gate = ResumeGate::default();
            active.allow_resume(gate.clone());
            let mut recovery = SourceRecovery {
                endpoint: endpoint.clone(),
                token,
                retry_for: opts.postcopy_retry(),
                gate,
                notify,
                wrap: Box::new(active.counter()),
            };
            migration
                .postcopy(active.count(fault), pc)
                .postcopy_reconnect(Box::new(move || recovery.reconnect()))
                .run(active.count(transport))
        }
    };
    let cancelled_by = active.cancelled_by();
    active.finish(&result);
    outcome_of(result, cancelled_by)
}

/// The outcome of an engine call, for the API client and the main loop.
pub(crate) fn outcome_of(
    result: Result<livemig::Report, livemig::MigrationError>,
    cancelled_by: Option<String>,
) -> Outcome {
    match result {
        Ok(report) => match serde_json::to_value(&report) {
            Ok(v) => Outcome::Migrated(v),
            Err(e) => Outcome::Migrated(json!({"error": e.to_string()})),
        },
        Err(e) => {
            // A post-copy that broke after `Go`: the guest ran on the
            // destination, so this side must never resume it.
            let interrupted = matches!(e.kind, livemig::ErrorKind::PostcopyInterrupted { .. });
            let ambiguous = e.source_must_stay_paused().then(|| e.to_string());
            let status = if interrupted {
                "postcopy-interrupted"
            } else if ambiguous.is_some() {
                "ambiguous"
            } else if matches!(e.kind, livemig::ErrorKind::Cancelled) {
                "cancelled"
            } else {
                "failed"
            };
            let v = json!({
                "result": "error",
                "phase": e.phase.to_string(),
                "status": status,
                "error": e.to_string(),
                "cancelled_by": cancelled_by,
            });
            Outcome::Failed(v, ambiguous)
        }
    }
}

// ---- destination ----

/// The first connection of `receive`: a migration (its transport and the
/// acceptor of its page streams), or on a Unix socket a same-host hand-over
/// (its transport, the memory and NICs it brought).
enum Incoming {
    /// The control connection, the page-stream acceptor and, from a
    /// post-copy source, its fault connection (which came first).
    Remote(Box<dyn Transport>, Box<dyn StreamAcceptor>, Option<Fault>),
    Local(Box<dyn Transport>, crate::local::Received),
}

/// A post-copy source's fault connection, its resume token (`None` from a
/// source of the first build) and where a resume connects (the listening
/// endpoint, resolved).
struct Fault {
    t: Box<dyn Transport>,
    token: Option<Token>,
    listen: Endpoint,
}

/// A control connection and, from a post-copy source, its fault connection.
type ControlAndFault = (Box<dyn Transport>, Option<Fault>);

/// The control connection and, from a post-copy source, its fault
/// connection: such a source connects the fault connection first (told
/// apart by its first bytes) and the control connection next (`next`).
fn control_and_fault(
    first: Box<dyn Transport>,
    listen: &Endpoint,
    next: impl FnOnce() -> Result<Box<dyn Transport>, Fail>,
) -> Result<ControlAndFault, Fail> {
    match classify(first).map_err(runtime)? {
        First::Control(t) => Ok((t, None)),
        First::Fault(t, token) => {
            let fault = Fault {
                t,
                token,
                listen: listen.clone(),
            };
            Ok((next()?, Some(fault)))
        }
    }
}

/// Listens on `endpoint` (telling `listening` where, once bound) and
/// takes the first migration or local hand-over.
fn accept_incoming(
    endpoint: &Endpoint,
    tls: Option<livemig_tls::TlsConfig>,
    receive_buffer: Option<Option<usize>>,
    listening: &dyn Fn(String),
) -> Result<Incoming, Fail> {
    match (tls, endpoint) {
        (Some(cfg), _) => {
            let id = cfg.load().map_err(|e| usage(e.to_string()))?;
            let mut listener = livemig_tls::TlsListener::bind(endpoint, &id)
                .map_err(|e| runtime(e.to_string()))?;
            if let Some(bytes) = receive_buffer {
                listener.set_receive_buffer(bytes);
            }
            listening(listener.local_endpoint().to_string());
            eprintln!(
                "refvmm: waiting for a migration on {} (mutual TLS)",
                listener.local_endpoint()
            );
            // A peer that fails the TLS handshake is refused; keep waiting.
            let t = loop {
                match listener.accept() {
                    Ok(t) => break t,
                    Err(e) => eprintln!("refvmm: refused a connection: {e}"),
                }
            };
            Ok(Incoming::Remote(
                t,
                Box::new(livemig_tls::TlsAcceptor(Some(listener))),
                None,
            ))
        }
        (None, Endpoint::Unix(path)) => {
            let acceptor = crate::local::UnixAcceptor::bind(path).map_err(runtime)?;
            // Either a migration or a local hand-over (told apart by the
            // first bytes); the line is the one `receive` always prints.
            listening(endpoint.to_string());
            eprintln!("refvmm: waiting for a migration on {endpoint}");
            let s = acceptor.accept().map_err(runtime)?;
            if !crate::local::is_handover(&s, Duration::from_secs(10)).map_err(runtime)? {
                let (t, fault) = control_and_fault(acceptor.transport(s), endpoint, || {
                    let s = acceptor.accept().map_err(runtime)?;
                    Ok(acceptor.transport(s))
                })?;
                return Ok(Incoming::Remote(t, Box::new(acceptor), fault));
            }
            let received = crate::local::recv_handover(&s).map_err(runtime)?;
            let t = acceptor.transport(s);
            // One hand-over: nobody else connects.
            drop(acceptor);
            Ok(Incoming::Local(t, received))
        }
        (None, _) => {
            let mut listener = listen(endpoint).map_err(|e| runtime(e.to_string()))?;
            if let Some(bytes) = receive_buffer {
                listener.set_receive_buffer(bytes);
            }
            listening(listener.local_endpoint().to_string());
            eprintln!(
                "refvmm: waiting for a migration on {}",
                listener.local_endpoint()
            );
            let t = listener.accept().map_err(|e| runtime(e.to_string()))?;
            let at = listener.local_endpoint().clone();
            let (t, fault) = control_and_fault(t, &at, || {
                listener.accept().map_err(|e| runtime(e.to_string()))
            })?;
            Ok(Incoming::Remote(
                t,
                Box::new(OwnedAcceptor(Some(listener))),
                fault,
            ))
        }
    }
}

/// With `--memory` the VM's size is known before the source connects: the
/// KVM VM is made and its memory registered now, outside the source's
/// set-up (KVM's slot registration costs what the guest's size costs:
/// 27–534 ms for 61 GiB on this project's hosts). `None` without
/// `--memory`, or when that fails (logged; the VM is then made for the
/// source's description as without `--memory`, which refuses it with the
/// reason).
fn prepare_vm(
    memory: Option<u64>,
    backend: livemig_kvm::MemoryOptions,
    dirty_mode: Option<livemig_kvm::DirtyMode>,
) -> Option<livemig_kvm::PreparedVm> {
    let bytes = memory?;
    let t0 = std::time::Instant::now();
    match livemig_kvm::PreparedVm::new(bytes, backend, dirty_mode) {
        Ok(p) => {
            eprintln!(
                "refvmm: VM of {} MiB made before the source connects ({:.1} ms)",
                bytes >> 20,
                t0.elapsed().as_secs_f64() * 1000.0
            );
            Some(p)
        }
        Err(e) => {
            eprintln!("refvmm: making the VM ahead: {e}; it is made when the source connects");
            None
        }
    }
}

/// The API socket of a `receive`, served while it waits for a migration
/// (`api_state.rs`), when its path is free; `None` without `--api-socket`
/// or when a VMM listens there (an upgrade's old VMM: the socket is then
/// bound once the hand-over arrives). A `quit` while waiting removes it and
/// the console's socket.
fn waiting_api(
    path: Option<&std::path::Path>,
    listen: &str,
    console: Option<&(Listener, Arc<crate::console_server::ConsoleLog>)>,
) -> Result<Option<ApiSocket>, Fail> {
    let Some(path) = path else { return Ok(None) };
    let Some(listener) = Listener::bind_if_free("API socket", path).map_err(runtime)? else {
        return Ok(None);
    };
    let state = ApiState::waiting(listen.to_string());
    let (p, id) = listener.bound_file();
    state.remove_on_quit(p, id);
    if let Some((c, _)) = console {
        let (p, id) = c.bound_file();
        state.remove_on_quit(p, id);
    }
    ApiSocket::start(listener, state).map(Some).map_err(runtime)
}

/// `--receive-buffer`: `auto` (the kernel's autotuning: `None`), a byte
/// count, or a size with a K/M/G suffix.
fn parse_receive_buffer(s: &str) -> Result<Option<usize>, Fail> {
    if s == "auto" {
        return Ok(None);
    }
    let bad = || {
        usage(format!(
            "--receive-buffer: {s:?} is neither a size nor auto"
        ))
    };
    // A bare number is bytes here (`parse_size` reads it as MiB).
    let bytes = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => parse_size(s).map_err(|_| bad())?,
        _ => s.parse::<u64>().map_err(|_| bad())?,
    };
    match usize::try_from(bytes) {
        Ok(b) if b > 0 => Ok(Some(b)),
        _ => Err(usage(format!(
            "--receive-buffer: {s:?} is not a usable size"
        ))),
    }
}

pub(crate) fn cmd_receive(args: ReceiveArgs) -> Result<(), Fail> {
    let ReceiveArgs {
        listen: listen_at,
        memory,
        vcpus,
        settings,
        start_paused,
        receive_buffer,
        postcopy_resume_timeout,
        tls,
        common,
    } = args;
    let receive_buffer = receive_buffer
        .as_deref()
        .map(parse_receive_buffer)
        .transpose()?;
    let resume_timeout = postcopy_resume_timeout.map(Duration::from_secs);
    crate::carry::record(&common, &settings);
    let crate::cli::ReceiveSettings {
        io_timeout,
        no_announce,
    } = settings;
    let (announce, tls) = (!no_announce, tls.config(None));
    let endpoint: Endpoint = listen_at
        .parse()
        .map_err(|e| usage(format!("--listen: {e}")))?;
    let memory = memory.as_deref().map(parse_size).transpose()?;
    let dirty_mode = parse_dirty(&common.dirty_log)?;
    let memory_options = parse_memory_options(&common)?;
    let serial = parse_serial(&common.serial)?;
    // Open the TAPs before accepting anything: a bad --net fails early.
    let nets = open_nets(&common.net)?;
    let mut console = open_console(common.console.as_deref(), true)?;
    let tls_plain = tls.is_none();
    let mut prepared = prepare_vm(memory, memory_options, dirty_mode);
    let waiting = waiting_api(common.api_socket.as_deref(), &listen_at, console.as_ref())?;
    let incoming = accept_incoming(&endpoint, tls, receive_buffer, &|at| {
        if let Some(a) = &waiting {
            a.state.listening_on(at);
        }
    })?;
    if let Some(a) = &waiting {
        a.state.incoming();
    }
    let local = matches!(incoming, Incoming::Local(..));
    // A local hand-over to a VMM whose API socket path was in use while it
    // waited (an upgrade: the old VMM listens there): the socket is bound
    // now, beside the path, and renamed over the path when the guest
    // resumes here, before the old VMM learns that the hand-over completed
    // (and removes the path at exit if it still names its own socket).
    let mut api = match (&common.api_socket, local, &waiting) {
        (Some(p), true, None) => Some(
            Listener::bind_for_takeover("API socket", p)
                .and_then(|l| ApiSocket::start(l, ApiState::coming()))
                .map_err(runtime)?,
        ),
        _ => None,
    };
    let mut shared_memory = None;
    // Post-copy is granted to a source that offers it unless the guest
    // memory here is a shared memfd (the userfaultfd installer takes
    // private anonymous memory only) or the migration runs over TLS (the
    // fault connection is plain): such a source then migrates by pre-copy.
    let postcopy_ok =
        tls_plain && memory_options.backend == livemig_kvm::memfd::MemoryBackend::Anonymous;
    let mut nets = Some(nets);
    let (transport, acceptor, mut fault) = match incoming {
        Incoming::Remote(t, a, f) => (t, Some(a), f),
        Incoming::Local(t, received) => {
            if !common.net.is_empty() {
                return Err(usage(
                    "a local hand-over brings its NICs (the source's TAPs): give no --net",
                ));
            }
            shared_memory = Some(received.memory);
            prepared = None;
            nets = Some(received.nets);
            (t, None, None)
        }
    };
    if !postcopy_ok && fault.take().is_some() {
        eprintln!(
            "refvmm: post-copy not granted (memfd guest memory or TLS): the source migrates by pre-copy"
        );
    }
    // One migration at a time: the engine closes the listener (through the
    // acceptor) as soon as the page streams the source asked for are
    // connected — right after the handshake with one stream — so a second
    // connection while this one runs is refused by the kernel.
    // `..Default::default()`: ReceiveConfig grows in later releases.
    #[allow(clippy::needless_update)]
    let cfg = ReceiveConfig {
        io_timeout: Duration::from_secs(io_timeout.max(1)),
        ..Default::default()
    };
    let mut serial = Some(serial);
    let create = |desc: &livemig::vm::VmDescription| {
        let mut my_nets = nets.take().unwrap_or_default();
        net::reconcile(&desc.nics, &mut my_nets).map_err(VmError::Incompatible)?;
        net::reconcile_ipv6(&desc.properties, &mut my_nets).map_err(VmError::Incompatible)?;
        let want = livemig_kvm::VmConfig {
            memory: memory.unwrap_or(desc.layout.total_bytes()),
            vcpus: vcpus.unwrap_or(desc.vcpus),
            nics: desc.nics.clone(),
            dirty_mode,
        };
        check_compatible(desc, &want)?;
        check_properties(desc)?;
        let machine = Machine::create(MachineConfig {
            memory: want.memory,
            vcpus: want.vcpus,
            serial: serial.take().unwrap_or(SerialOutput::None),
            nets: my_nets,
            dirty_mode,
            console: console.as_ref().map(|(_, log)| log.clone()),
            memory_options,
            shared_memory: shared_memory.take(),
            prepared: prepared.take(),
        })
        .map_err(VmError::Create)?;
        machine.vm.adopt_tsc_khz(desc)?;
        Ok(DestMachine {
            machine,
            start_paused,
            announce,
            console: console.take(),
            api: api.take(),
            local,
        })
    };
    // The engine's progress of the arriving migration, for the waiting
    // API's `migrate-status` (a local hand-over's API comes later).
    let arriving = waiting.as_ref().map(|a| a.state.clone());
    let follow = move |p: &livemig::ReceiveProgress| {
        if let Some(s) = &arriving {
            s.receive_progress(p);
        }
    };
    // Every kind of reception reports its progress to the waiting API (one
    // that switches to post-copy its rounds, then the pages arriving while
    // the guest runs here).
    let reception = Reception::new(transport).config(cfg).progress(follow);
    let result = match (acceptor, fault) {
        (
            Some(a),
            Some(Fault {
                t: fault,
                token: Some(token),
                listen,
            }),
        ) => {
            // A post-copy source uses one page stream: the listener closes
            // now, as after any handshake, and opens again only to take the
            // source's resume after a break (postcopy_resume.rs).
            drop(a);
            reception
                .postcopy(fault, uffd_pager)
                .postcopy_reconnect(move || wait_for_resume(&listen, &token, resume_timeout))
                .run(create)
        }
        // A source of the first build: post-copy without resume.
        (Some(a), Some(Fault { t: fault, .. })) => reception
            .postcopy(fault, uffd_pager)
            .accept_streams(a)
            .run(create),
        (Some(a), None) => reception.accept_streams(a).run(create),
        (None, _) => reception.local().run(create),
    };
    match result {
        Ok((
            DestMachine {
                machine,
                console,
                api,
                ..
            },
            report,
        )) => {
            // A guest that was paused on the source arrives paused
            // (`report.running` is false): it waits for an API resume.
            let run = !start_paused && report.running;
            eprintln!(
                "refvmm: {} received ({} pages ({} by UFFDIO_COPY), {} zero, {} torn and sent again, {} rounds, restore {:.2} ms); guest {}",
                if local {
                    "local hand-over"
                } else {
                    "migration"
                },
                report.pages,
                report.filled_pages,
                report.zero_pages,
                report.torn_pages,
                report.rounds,
                report.restore_ms,
                if run { "running" } else { "paused" }
            );
            if let Some(pc) = &report.postcopy {
                eprintln!(
                    "refvmm: post-copy: {}",
                    serde_json::to_string(pc).unwrap_or_default()
                );
            }
            let api = match (api, waiting) {
                (Some(a), _) | (None, Some(a)) => Some(a),
                (None, None) => bind_api(common.api_socket.as_deref())?,
            };
            run_machine(machine, api, run, console)
        }
        Err(e) => Err(runtime(format!("incoming {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: MigrateOptions,
    }

    fn parse(args: &[&str]) -> MigrateOptions {
        Cli::try_parse_from(std::iter::once("refvmm").chain(args.iter().copied()))
            .unwrap()
            .opts
    }

    /// `--receive-buffer`: `auto` is the kernel's autotuning, a size is
    /// that many bytes, anything else (zero included) is a usage error.
    #[test]
    fn receive_buffer_is_auto_or_a_size() {
        assert_eq!(parse_receive_buffer("auto").ok(), Some(None));
        assert_eq!(parse_receive_buffer("4M").ok(), Some(Some(4 << 20)));
        assert_eq!(parse_receive_buffer("65536").ok(), Some(Some(65536)));
        for bad in ["0", "lots", "", "-1"] {
            assert!(parse_receive_buffer(bad).is_err(), "{bad:?}");
        }
    }

    /// LZ4: the engine's default (allowed) without the flag, allowed with
    /// `--compress`, never with `--compress false`; an API request without
    /// the field takes the default too.
    #[test]
    fn compress_is_the_engine_default_unless_given() {
        let cfg = |args: &[&str]| parse(args).config().unwrap().compress;
        assert!(MigrationConfig::default().compress);
        assert!(cfg(&["--to", "tcp:h:1"]));
        assert!(cfg(&["--to", "tcp:h:1", "--compress"]));
        assert!(cfg(&["--to", "tcp:h:1", "--compress", "true"]));
        assert!(!cfg(&["--to", "tcp:h:1", "--compress", "false"]));
        let off = parse(&["--to", "tcp:h:1", "--compress", "false"]).to_request();
        assert_eq!(off["compress"], false);
        let back = MigrateOptions::from_request(&off).unwrap();
        assert!(!back.config().unwrap().compress);
    }

    #[test]
    fn flags_become_the_api_request_the_source_reads() {
        let o = parse(&[
            "--to",
            "tcp:10.0.0.2:4444",
            "--downtime-limit-ms",
            "50",
            "--max-bandwidth",
            "30",
            "--max-rounds",
            "5",
            "--force",
            "--streams",
            "4",
            "--compress",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-ca",
            "ca.pem",
            "--tls-server-name",
            "dst",
        ]);
        let req = o.to_request();
        assert_eq!(
            req,
            json!({"cmd":"migrate","to":"tcp:10.0.0.2:4444","downtime_limit_ms":50,
                   "max_bandwidth_mib":30,"max_rounds":5,"force":true,"streams":4,
                   "compress":true,"keep_source":false,
                   "tls":{"cert":"c.pem","key":"k.pem","ca":"ca.pem","server_name":"dst"}})
        );
        let back = MigrateOptions::from_request(&req).unwrap();
        assert_eq!(back, o);
        let cfg = back.config().unwrap();
        assert_eq!(cfg.downtime_limit, Duration::from_millis(50));
        assert_eq!(cfg.max_bandwidth, Some(30 << 20));
        assert_eq!(cfg.max_rounds, 5);
        assert_eq!(cfg.on_limit, OnLimit::ForceSwitchover);
        assert_eq!(cfg.streams, 4);
        assert!(cfg.compress);
    }

    #[test]
    fn postcopy_flags_become_the_engine_postcopy_config() {
        let req = SwitchRequest::new;
        assert!(parse(&["--to", "tcp:h:1"]).postcopy_config(req()).is_none());
        let pure = parse(&["--to", "tcp:h:1", "--postcopy"]);
        assert_eq!(pure.to_request()["postcopy"], true);
        let pc = pure.postcopy_config(req()).unwrap();
        assert_eq!((pc.after_rounds, pc.on_non_convergence), (0, false));
        let o = parse(&[
            "--to",
            "tcp:h:1",
            "--postcopy-after-rounds",
            "3",
            "--postcopy-auto",
        ]);
        let back = MigrateOptions::from_request(&o.to_request()).unwrap();
        assert_eq!(back, o);
        let pc = back.postcopy_config(req()).unwrap();
        assert_eq!((pc.after_rounds, pc.on_non_convergence), (3, true));
        let o = parse(&["--to", "tcp:h:1", "--postcopy-on-request"]);
        let pc = o.postcopy_config(req()).unwrap();
        assert_eq!((pc.after_rounds, pc.on_non_convergence), (u32::MAX, false));
        assert!(Cli::try_parse_from([
            "refvmm",
            "--to",
            "x",
            "--postcopy",
            "--postcopy-after-rounds",
            "1"
        ])
        .is_err());
        let o = parse(&["--to", "tcp:h:1", "--postcopy", "--postcopy-retry-for", "5"]);
        assert_eq!(o.to_request()["postcopy_retry_for"], 5);
        let back = MigrateOptions::from_request(&o.to_request()).unwrap();
        assert_eq!(back.postcopy_retry(), Duration::from_secs(5));
        assert_eq!(
            pure.postcopy_retry(),
            Duration::from_secs(DEFAULT_POSTCOPY_RETRY_S)
        );
        // --resume is a different request (migrate-resume), never a field.
        let r = parse(&["--to", "tcp:h:1", "--resume"]);
        assert!(r.resume && r.to_request().get("resume").is_none());
        assert!(MigrateOptions::from_request(&json!({"to":"tcp:h:1","resume":true})).is_err());
        let bad = parse(&["--to", "tcp:h:1", "--postcopy", "--streams", "2"]);
        assert!(bad.config().unwrap_err().contains("one page stream"));
    }

    /// Every post-copy option with `--streams 2` is refused by the check
    /// both the CLI (usage error, exit 2) and the API's `migrate` request
    /// (an error before connecting) run; `--streams 1` is accepted.
    #[test]
    fn postcopy_with_page_streams_is_refused_on_the_cli_and_the_api() {
        let postcopy: [&[&str]; 4] = [
            &["--postcopy"],
            &["--postcopy-after-rounds", "1"],
            &["--postcopy-auto"],
            &["--postcopy-on-request"],
        ];
        for flags in postcopy {
            let args = |n: &'static str| {
                let mut a = vec!["--to", "tcp:h:1", "--streams", n];
                a.extend_from_slice(flags);
                a
            };
            let e = parse(&args("2")).config().unwrap_err();
            assert_eq!(
                e, "streams: post-copy uses one page stream (give no --streams)",
                "{flags:?}"
            );
            assert!(parse(&args("1")).config().is_ok(), "{flags:?}");
            let req = parse(&args("2")).to_request();
            assert_eq!(req["streams"], 2, "{req}");
            let e = MigrateOptions::from_request(&req).unwrap().config();
            assert!(e.unwrap_err().contains("one page stream"), "{flags:?}");
        }
        let api = json!({"cmd":"migrate","to":"tcp:h:1","postcopy_auto":true,"streams":2});
        let e = MigrateOptions::from_request(&api).unwrap().config();
        assert!(e.unwrap_err().contains("one page stream"));
    }

    #[test]
    fn a_minimal_request_takes_the_defaults() {
        let o = MigrateOptions::from_request(&json!({"cmd":"migrate","to":"unix:/x"})).unwrap();
        assert_eq!(
            o.to_request(),
            json!({"cmd":"migrate","to":"unix:/x","force":false,"keep_source":false})
        );
        let cfg = o.config().unwrap();
        let d = MigrationConfig::default();
        assert_eq!(
            (cfg.downtime_limit, cfg.max_bandwidth, cfg.streams),
            (d.downtime_limit, d.max_bandwidth, d.streams)
        );
        assert!(o.tls.config().unwrap().is_none());
    }

    #[test]
    fn local_travels_in_the_request_only_when_asked_for() {
        let o = parse(&["--to", "unix:/h.sock", "--local"]);
        let req = o.to_request();
        assert_eq!(req["local"], true, "{req}");
        assert!(req.get("upgrade_binary").is_none(), "{req}");
        assert_eq!(MigrateOptions::from_request(&req).unwrap(), o);
        let plain = parse(&["--to", "unix:/h.sock"]).to_request();
        assert!(plain.get("local").is_none(), "{plain}");
    }

    #[test]
    fn bad_requests_are_refused() {
        let bad = |v: Value| MigrateOptions::from_request(&v).and_then(|o| o.config());
        assert!(bad(json!({"to":"unix:/x","max_bandwith_mib":3}))
            .unwrap_err()
            .contains("unknown field"));
        assert!(bad(json!({"max_rounds":3})).is_err(), "to is required");
        assert!(bad(json!({"to":"unix:/x","streams":0}))
            .unwrap_err()
            .contains("outside"));
        assert!(bad(json!({"to":"unix:/x","streams":17})).is_err());
        assert!(bad(json!({"to":"unix:/x","tls":{"cert":"c"}}))
            .unwrap_err()
            .contains("cert, key and ca"));
        assert!(Cli::try_parse_from(["refvmm", "--to", "x", "--tls-cert", "c"]).is_err());
    }
}
