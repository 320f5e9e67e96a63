//! Live facts for placement: the VM measured through its API socket, and
//! the candidate hosts asked through their agents (`refvmm agent`), with
//! the static hosts file as the fallback.

use std::path::Path;

use livemig_placement::{load_hosts, load_vm, Host, Vm};
use serde_json::{json, Value};

use crate::agent::{hostname, AgentClient};
use crate::migrate_client::api_request;

/// An error as (process exit code, one-line message).
pub type CliError = (u8, String);

/// The VM being migrated, as measured (or as the `--vm` file says).
#[derive(Debug, Clone)]
pub struct MeasuredVm {
    /// The placement input.
    pub vm: Vm,
    /// The measured dirty rate, MiB/s, unrounded (`vm.dirty_rate_mib_s` is
    /// its ceiling).
    pub dirty_mib_s: f64,
    /// Guest memory in bytes (the destination must match it exactly;
    /// `vm.memory_mib` is rounded up).
    pub memory_bytes: u64,
    /// How the facts were obtained, for the report.
    pub origin: String,
}

/// Measures the VM behind `api`: memory and vCPUs from `status`, the dirty
/// rate from `dirty-rate` over `window_ms`. `name` defaults to the API
/// socket's file name; the current host is this machine's hostname.
pub fn measure_vm(api: &Path, name: Option<&str>, window_ms: u64) -> Result<MeasuredVm, CliError> {
    let status = api_request(api, &json!({"cmd":"status"})).map_err(|e| (1, e))?;
    if status["result"] != "ok" {
        return Err((1, format!("{}: status: {status}", api.display())));
    }
    if status["migration"] != "idle" {
        return Err((
            1,
            format!(
                "{}: the VM is not idle (migration: {}): nothing to place",
                api.display(),
                status["migration"]
            ),
        ));
    }
    let memory = status["memory"].as_u64().unwrap_or(0);
    let vcpus = status["vcpus"].as_u64().unwrap_or(1) as u32;
    let rate =
        api_request(api, &json!({"cmd":"dirty-rate","window-ms":window_ms})).map_err(|e| (1, e))?;
    if rate["result"] != "ok" {
        return Err((
            1,
            format!(
                "{}: dirty-rate: {}",
                api.display(),
                rate["error"].as_str().unwrap_or("?")
            ),
        ));
    }
    let dirty = rate["dirty-rate-mib-s"].as_f64().unwrap_or(0.0);
    let name = name.map(str::to_string).unwrap_or_else(|| {
        api.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    Ok(MeasuredVm {
        vm: Vm {
            name,
            memory_mib: memory.div_ceil(1 << 20).max(1),
            vcpus: vcpus.max(1),
            required_cpu_features: Default::default(),
            dirty_rate_mib_s: dirty.ceil() as u64,
            anti_affinity: Default::default(),
            current_host: hostname(),
        },
        dirty_mib_s: dirty,
        memory_bytes: memory,
        origin: format!(
            "measured: status + dirty-rate ({} pages in {:.0} ms, {})",
            rate["dirty-pages"],
            rate["window-ms"].as_f64().unwrap_or(0.0),
            rate["mode"].as_str().unwrap_or("?")
        ),
    })
}

/// The VM from a `--vm` file (overrides the measurement).
pub fn vm_from_file(path: &Path) -> Result<MeasuredVm, CliError> {
    let vm = load_vm(path).map_err(|e| (2, e.to_string()))?;
    Ok(MeasuredVm {
        dirty_mib_s: vm.dirty_rate_mib_s as f64,
        memory_bytes: vm.memory_mib << 20,
        origin: format!("from {}", path.display()),
        vm,
    })
}

/// The TLS identity for agents: the migration's certificate, key and CA;
/// the server name is each agent endpoint's host (`--tls-server-name`
/// names the migration's destination only).
pub fn agent_tls(
    tls: &crate::migration::MigrateTls,
) -> Result<Option<livemig_tls::TlsConfig>, CliError> {
    let cfg = tls.config().map_err(|e| (2, e))?;
    Ok(cfg.map(|c| livemig_tls::TlsConfig {
        server_name: None,
        ..c
    }))
}

/// One candidate host and where its facts came from.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// The placement input (for an agent's host, `migration_address` is
    /// `agent:ENDPOINT`: the address comes from `prepare-receive`).
    pub host: Host,
    /// `agent tcp:...` (live), `hosts file`, or `hosts file (agent ... did
    /// not answer: ...)`.
    pub origin: String,
    /// The agent to ask for a receiver, when it answered.
    pub agent: Option<String>,
    /// The agent answered that it accepts no migration now (and why).
    pub refusal: Option<String>,
}

/// A host that could not be asked and has no static facts.
#[derive(Debug, Clone)]
pub struct Unreachable {
    /// The agent endpoint.
    pub endpoint: String,
    /// Why.
    pub error: String,
}

/// Where the candidates come from.
#[derive(Clone, Default)]
pub struct HostSources {
    /// The static hosts file (entries may name their `agent`).
    pub file: Option<std::path::PathBuf>,
    /// Agent endpoints to ask.
    pub agents: Vec<String>,
    /// How to reach agents.
    pub client: AgentClient,
}

impl HostSources {
    /// Whether any source was given.
    pub fn is_empty(&self) -> bool {
        self.file.is_none() && self.agents.is_empty()
    }
}

/// Asks `endpoint` for its capacity: the host's facts and whether it
/// accepts migrations now.
pub fn ask_agent(client: &AgentClient, endpoint: &str) -> Result<(Host, Option<String>), String> {
    let v = client.request(endpoint, &json!({"cmd":"capacity"}))?;
    if v["result"] != "ok" {
        return Err(v["error"].as_str().unwrap_or("?").to_string());
    }
    let mut h: Value = v["host"].clone();
    h["migration_address"] = json!(format!("agent:{endpoint}"));
    h["agent"] = json!(endpoint);
    let host: Host = serde_json::from_value(h).map_err(|e| format!("bad capacity reply: {e}"))?;
    let refusal = if v["accepting"] == false {
        Some(v["refusal"].as_str().unwrap_or("not accepting").to_string())
    } else {
        None
    };
    Ok((host, refusal))
}

/// Gathers the candidates: every hosts-file entry (asking its agent if it
/// names one, its static facts if that agent does not answer) and every
/// `--agents` endpoint. `cap_mib_s` (a `--max-bandwidth`) lowers every
/// link's bandwidth to the cap the migration will run at.
pub fn gather_hosts(
    src: &HostSources,
    cap_mib_s: Option<u64>,
) -> Result<(Vec<HostFacts>, Vec<Unreachable>), CliError> {
    let mut out = Vec::new();
    let mut unreachable = Vec::new();
    if let Some(file) = &src.file {
        for h in load_hosts(file).map_err(|e| (2, e.to_string()))? {
            out.push(from_file_entry(&src.client, h));
        }
    }
    for ep in &src.agents {
        match ask_agent(&src.client, ep) {
            Ok((host, refusal)) => out.push(HostFacts {
                origin: format!("agent {ep} (live)"),
                agent: Some(ep.clone()),
                refusal,
                host,
            }),
            Err(error) => unreachable.push(Unreachable {
                endpoint: ep.clone(),
                error,
            }),
        }
    }
    // One entry per name: a host listed twice (file and --agents) keeps
    // the live one.
    out.sort_by(|a, b| {
        a.host
            .name
            .cmp(&b.host.name)
            .then(b.agent.is_some().cmp(&a.agent.is_some()))
    });
    out.dedup_by(|a, b| a.host.name == b.host.name);
    if let Some(cap) = cap_mib_s.filter(|c| *c > 0) {
        for h in &mut out {
            h.host.link_bandwidth_mib_s = h.host.link_bandwidth_mib_s.min(cap);
        }
    }
    Ok((out, unreachable))
}

/// A hosts-file entry: live facts from its agent if it names one and the
/// agent answers; the entry's name, link bandwidth and labels stay.
fn from_file_entry(client: &AgentClient, h: Host) -> HostFacts {
    let Some(ep) = h.agent.clone() else {
        return HostFacts {
            origin: "hosts file".into(),
            agent: None,
            refusal: None,
            host: h,
        };
    };
    match ask_agent(client, &ep) {
        Ok((live, refusal)) => {
            let mut labels = h.labels.clone();
            labels.extend(live.labels.iter().cloned());
            let host = Host {
                name: h.name,
                link_bandwidth_mib_s: h.link_bandwidth_mib_s,
                labels,
                ..live
            };
            HostFacts {
                origin: format!("agent {ep} (live)"),
                agent: Some(ep),
                refusal,
                host,
            }
        }
        Err(e) => HostFacts {
            origin: format!("hosts file (agent {ep} did not answer: {e})"),
            agent: None,
            refusal: None,
            host: Host { agent: None, ..h },
        },
    }
}
