//! Both migration drivers of refvmm: the source's (a `migrate` API request
//! runs the engine on this VMM's machine) and the destination's
//! (`refvmm receive`: wait for one incoming migration, then run the guest).

use std::sync::Arc;
use std::time::Duration;

use livemig::policy::{MigrationConfig, OnLimit};
use livemig::transport::{
    connect, listen, Dialer, Endpoint, OwnedAcceptor, StreamAcceptor, StreamOpener, Transport,
};
use livemig::vm::{SourceVm, VmError};
use livemig::{receive_streams, ReceiveConfig};
use livemig_kvm::serial::SerialOutput;
use livemig_kvm::{check_compatible, check_properties};
use serde_json::{json, Value};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::api::{peer_gone, ClientLine, VANISHED};
use crate::monitor::MigrationMonitor;
use crate::vmm::{DestMachine, Machine, MachineConfig};
use crate::{
    net, open_console, open_nets, parse_dirty, parse_memory_backend, parse_serial, parse_size,
    run_machine, runtime, usage, Common, Fail,
};

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

/// The engine configuration a `migrate` request asks for.
fn migrate_config(req: &Value) -> Result<MigrationConfig, String> {
    let mut cfg = MigrationConfig::default();
    if let Some(ms) = req["downtime_limit_ms"].as_u64() {
        cfg.downtime_limit = Duration::from_millis(ms);
    }
    if let Some(mib) = req["max_bandwidth_mib"].as_u64().filter(|v| *v > 0) {
        cfg.max_bandwidth = Some(mib << 20);
    }
    if let Some(r) = req["max_rounds"].as_u64() {
        cfg.max_rounds = r.clamp(1, 10_000) as u32;
    }
    if req["force"].as_bool() == Some(true) {
        cfg.on_limit = OnLimit::ForceSwitchover;
    }
    if let Some(n) = req["streams"].as_u64() {
        if n == 0 || n > u64::from(livemig::protocol::MAX_STREAMS) {
            return Err(format!(
                "streams {n} is outside 1..={}",
                livemig::protocol::MAX_STREAMS
            ));
        }
        cfg.streams = n as u32;
    }
    cfg.compress = req["compress"].as_bool() == Some(true);
    Ok(cfg)
}

/// The control connection and the opener of the extra page streams.
type Connected = (Box<dyn Transport>, Box<dyn StreamOpener>);

/// Connects to the destination (over mutual TLS if the request says so);
/// returns the control connection and the opener of extra page streams.
fn connect_to(req: &Value, endpoint: &Endpoint) -> Result<Connected, String> {
    let timeout = Some(Duration::from_secs(10));
    if !req["tls"].is_object() {
        let t = connect(endpoint, timeout).map_err(|e| format!("connecting to {endpoint}: {e}"))?;
        let opener = Dialer {
            endpoint: endpoint.clone(),
            timeout,
        };
        return Ok((t, Box::new(opener)));
    }
    let path = |k: &str| {
        req["tls"][k]
            .as_str()
            .map(std::path::PathBuf::from)
            .ok_or_else(|| format!("tls.{k} missing"))
    };
    let cfg = livemig_tls::TlsConfig {
        cert_chain: path("cert")?,
        key: path("key")?,
        ca: path("ca")?,
        server_name: req["tls"]["server_name"].as_str().map(str::to_string),
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

pub(crate) fn do_migrate(
    req: &Value,
    m: &Arc<Machine>,
    monitor: &MigrationMonitor,
    line: &ClientLine,
) -> Outcome {
    // Refuse before connecting anywhere (the engine's guard checks again).
    if let Err(e) = m.guard.check() {
        return setup_error(e.to_string());
    }
    let Some(to) = req["to"].as_str() else {
        return setup_error("migrate needs \"to\"".into());
    };
    let endpoint: Endpoint = match to.parse() {
        Ok(e) => e,
        Err(e) => return setup_error(format!("{e}")),
    };
    let cfg = match migrate_config(req) {
        Ok(c) => c,
        Err(e) => return setup_error(e),
    };
    let memory = m.vm.memory().iter().map(|r| r.len()).sum::<u64>();
    let active = match monitor.begin(memory, &cfg) {
        Ok(a) => a,
        Err(e) => return setup_error(e.into()),
    };
    let (transport, mut opener) = match connect_to(req, &endpoint) {
        Ok(c) => c,
        Err(e) => return setup_error(e),
    };
    let mut opener = active.count_opener(&mut *opener);
    let result = m.guard.migrate_streams(
        &**m,
        active.count(transport),
        Some(&mut opener),
        &cfg,
        &active.cancel.clone(),
        &mut |p| {
            active.progress(p);
            let sent = serde_json::to_value(p).map(|v| line.send(&v));
            if let Ok(Err(e)) = sent {
                if peer_gone(&e) {
                    let _ = monitor.cancel(VANISHED);
                }
            }
        },
    );
    let cancelled_by = active.cancelled_by();
    active.finish(&result);
    match result {
        Ok(report) => match serde_json::to_value(&report) {
            Ok(v) => Outcome::Migrated(v),
            Err(e) => Outcome::Migrated(json!({"error": e.to_string()})),
        },
        Err(e) => {
            let ambiguous = e.is_ambiguous().then(|| e.to_string());
            let status = if ambiguous.is_some() {
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

#[allow(clippy::too_many_arguments)] // one per CLI flag
pub(crate) fn cmd_receive(
    listen_at: String,
    memory: Option<String>,
    vcpus: Option<u32>,
    io_timeout: u64,
    announce: bool,
    start_paused: bool,
    tls: Option<livemig_tls::TlsConfig>,
    common: Common,
) -> Result<(), Fail> {
    let endpoint: Endpoint = listen_at
        .parse()
        .map_err(|e| usage(format!("--listen: {e}")))?;
    let memory = memory.as_deref().map(parse_size).transpose()?;
    let dirty_mode = parse_dirty(&common.dirty_log)?;
    let memory_backend = parse_memory_backend(&common.memory_backend)?;
    let serial = parse_serial(&common.serial)?;
    // Open the TAPs before accepting anything: a bad --net fails early.
    let nets = open_nets(&common.net)?;
    let mut console = open_console(common.console.as_deref(), true)?;
    let (transport, mut acceptor): (_, Box<dyn StreamAcceptor>) = match tls {
        Some(cfg) => {
            let id = cfg.load().map_err(|e| usage(e.to_string()))?;
            let listener = livemig_tls::TlsListener::bind(&endpoint, &id)
                .map_err(|e| runtime(e.to_string()))?;
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
            (t, Box::new(livemig_tls::TlsAcceptor(Some(listener))))
        }
        None => {
            let listener = listen(&endpoint).map_err(|e| runtime(e.to_string()))?;
            eprintln!(
                "refvmm: waiting for a migration on {}",
                listener.local_endpoint()
            );
            let t = listener.accept().map_err(|e| runtime(e.to_string()))?;
            (t, Box::new(OwnedAcceptor(Some(listener))))
        }
    };
    // One migration at a time: the engine closes the listener (through the
    // acceptor) as soon as the page streams the source asked for are
    // connected — right after the handshake with one stream — so a second
    // connection while this one runs is refused by the kernel.
    let cfg = ReceiveConfig {
        io_timeout: Duration::from_secs(io_timeout.max(1)),
    };
    let mut serial = Some(serial);
    let mut nets = Some(nets);
    let result = receive_streams(transport, Some(&mut *acceptor), &cfg, |desc| {
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
            memory_backend,
        })
        .map_err(VmError::Create)?;
        machine.vm.adopt_tsc_khz(desc)?;
        Ok(DestMachine {
            machine,
            start_paused,
            announce,
            console: console.take(),
        })
    });
    match result {
        Ok((
            DestMachine {
                machine, console, ..
            },
            report,
        )) => {
            // A guest that was paused on the source arrives paused
            // (`report.running` is false): it waits for an API resume.
            let run = !start_paused && report.running;
            eprintln!(
                "refvmm: migration received ({} pages, {} zero, {} rounds, restore {:.2} ms); guest {}",
                report.pages,
                report.zero_pages,
                report.rounds,
                report.restore_ms,
                if run { "running" } else { "paused" }
            );
            run_machine(machine, common.api_socket, run, console)
        }
        Err(e) => Err(runtime(format!("incoming {e}"))),
    }
}
