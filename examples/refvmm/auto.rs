//! `refvmm migrate --to auto`: choose a destination from live facts, show
//! the decision (every candidate's filter verdicts, score terms, predicted
//! migration time and downtime), and migrate, trying the next-ranked host
//! when the chosen one refuses or fails before the switchover. The outcome
//! is always "migrated to H (why H)" or "not migrated" with every host's
//! reason and a non-zero exit code.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use livemig::transport::Endpoint;
use livemig_placement::filter::check;
use livemig_placement::{evaluate, predict, Candidate, PlacementConfig, PredictLimits};
use serde_json::{json, Value};

use crate::agent::AgentClient;
use crate::live::{
    gather_hosts, measure_vm, vm_from_file, CliError, HostFacts, HostSources, MeasuredVm,
    Unreachable,
};
use crate::migrate_client::{api_request, print_migrated, ClientFail, Session, EXIT_CANCELLED};
use crate::migration::MigrateOptions;

/// The `--to auto` options of `refvmm migrate`.
#[derive(clap::Args, Clone, Default)]
pub struct AutoArgs {
    /// With `--to auto`: the candidate hosts (a JSON array); an entry may
    /// name its `agent`, asked for live facts first.
    #[arg(long)]
    pub hosts: Option<PathBuf>,
    /// With `--to auto`: agents to ask (comma-separated endpoints of
    /// `refvmm agent`).
    #[arg(long, value_delimiter = ',')]
    pub agents: Vec<String>,
    /// With `--to auto`: the VM's facts from this file instead of measuring
    /// them (memory, vCPUs and dirty rate come from the source otherwise).
    #[arg(long)]
    pub vm: Option<PathBuf>,
    /// With `--to auto`: the dirty-rate measuring window, ms.
    #[arg(long, default_value_t = crate::dirty_rate::DEFAULT_WINDOW_MS)]
    pub dirty_rate_window_ms: u64,
    /// With `--to auto`: most hosts tried, best-ranked first.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: usize,
}

impl AutoArgs {
    fn given(&self) -> bool {
        self.hosts.is_some() || self.vm.is_some() || !self.agents.is_empty()
    }

    /// The host sources; agents are reached with the migration's TLS.
    pub fn sources(&self, tls: Option<livemig_tls::TlsConfig>) -> HostSources {
        HostSources {
            file: self.hosts.clone(),
            agents: self.agents.clone(),
            client: AgentClient { tls },
        }
    }
}

/// One line per candidate's facts, verdicts, score and prediction.
pub struct Plan {
    /// Eligible hosts, best first, with their facts.
    pub ranking: Vec<(Candidate, HostFacts)>,
    /// Every host not eligible, with its reasons.
    pub excluded: Vec<(String, Vec<String>)>,
    /// The decision as text.
    pub text: String,
}

fn limits(opts: &MigrateOptions) -> PredictLimits {
    let d = PredictLimits::default();
    PredictLimits {
        downtime_limit_ms: opts
            .downtime_limit_ms
            .map_or(d.downtime_limit_ms, |v| v as f64),
        max_rounds: opts
            .max_rounds
            .map_or(d.max_rounds, |r| r.clamp(1, 10_000) as u32),
    }
}

fn prediction_text(vm: &MeasuredVm, h: &HostFacts, l: &PredictLimits) -> String {
    let p = predict(
        vm.vm.memory_mib as f64,
        vm.dirty_mib_s,
        h.host.link_bandwidth_mib_s as f64,
        l,
    );
    if p.converges {
        format!(
            "{} round(s), {:.2} s, downtime {:.1} ms (link {} MiB/s)",
            p.rounds, p.total_s, p.downtime_ms, h.host.link_bandwidth_mib_s
        )
    } else {
        format!(
            "does not converge in {} rounds (link {} MiB/s, dirty {:.1} MiB/s): gives up unless --force, then downtime {:.0} ms",
            p.rounds, h.host.link_bandwidth_mib_s, vm.dirty_mib_s, p.downtime_ms
        )
    }
}

const FILTERS: [&str; 6] = [
    "current_host",
    "maintenance",
    "memory",
    "vcpu_overcommit",
    "cpu_features",
    "anti_affinity",
];

/// Every filter's verdict on `h`, then whether its agent accepts.
fn verdicts(h: &HostFacts, vm: &MeasuredVm, cfg: &PlacementConfig) -> (Vec<String>, Vec<String>) {
    let failed = check(&h.host, &vm.vm, cfg);
    let mut all = Vec::new();
    let mut reasons = Vec::new();
    let (hf, v) = (&h.host, &vm.vm);
    for f in FILTERS {
        match failed.iter().find(|r| r.kind() == f) {
            Some(r) => {
                all.push(format!("{r} FAIL"));
                reasons.push(r.to_string());
            }
            None if f == "memory" => all.push(format!(
                "memory ok ({} MiB free >= {} MiB VM + {} MiB headroom)",
                hf.memory_free_mib, v.memory_mib, cfg.memory_headroom_mib
            )),
            None if f == "vcpu_overcommit" => all.push(format!(
                "vcpu_overcommit ok ({} + {} vCPUs <= {} CPUs x {})",
                hf.vcpus_allocated, v.vcpus, hf.cpus, cfg.vcpu_overcommit_ratio
            )),
            None => all.push(format!("{f} ok")),
        }
    }
    match &h.refusal {
        // Maintenance is the filter's verdict already.
        Some(_) if hf.maintenance => {}
        Some(why) => {
            all.push(format!("accepting: {why} FAIL"));
            reasons.push(format!("accepting: {why}"));
        }
        None if h.agent.is_none() => all.push("accepting not asked (static facts)".into()),
        None => all.push("accepting ok".into()),
    }
    (all, reasons)
}

/// Filters, scores and ranks `hosts` for `vm`, and writes the decision.
pub fn plan(
    vm: &MeasuredVm,
    hosts: &[HostFacts],
    unreachable: &[Unreachable],
    opts: &MigrateOptions,
) -> Result<Plan, CliError> {
    let cfg = PlacementConfig::default();
    let lim = limits(opts);
    let list: Vec<_> = hosts.iter().map(|h| h.host.clone()).collect();
    let e = evaluate(&list, &vm.vm, &cfg).map_err(|e| (2, e.to_string()))?;
    let mut text = String::new();
    let v = &vm.vm;
    let _ = writeln!(
        text,
        "VM `{}` on `{}`: {} MiB, {} vCPU(s), dirty rate {:.2} MiB/s ({})",
        v.name, v.current_host, v.memory_mib, v.vcpus, vm.dirty_mib_s, vm.origin
    );
    let w = &cfg.weights;
    let s = w.sum();
    let _ = writeln!(
        text,
        "score = {:.2} x free_memory + {:.2} x cpu_headroom + {:.2} x migration_time + {:.2} x balance; \
         predicted with downtime limit {} ms, at most {} rounds",
        w.free_memory / s, w.cpu_headroom / s, w.migration_time / s, w.balance / s,
        lim.downtime_limit_ms, lim.max_rounds
    );
    let mut ranking = Vec::new();
    let mut excluded = Vec::new();
    let by_name = |n: &str| hosts.iter().find(|h| h.host.name == n);
    for h in hosts {
        let hf = &h.host;
        let (all, reasons) = verdicts(h, vm, &cfg);
        let _ = writeln!(
            text,
            "\n  {}: {}\n    facts: {}/{} MiB free, {} CPUs, load {:.2}, {} vCPUs allocated, link {} MiB/s{}",
            hf.name, h.origin, hf.memory_free_mib, hf.memory_total_mib, hf.cpus, hf.cpu_load,
            hf.vcpus_allocated, hf.link_bandwidth_mib_s,
            if hf.maintenance { ", in maintenance" } else { "" }
        );
        let _ = writeln!(text, "    filters: {}", all.join("; "));
        if let Some(c) = e.ranking.iter().find(|c| c.name == hf.name) {
            let t = &c.terms;
            let _ = writeln!(
                text,
                "    score {:.6} = free_memory {:.4} x {:.4} + cpu_headroom {:.4} x {:.4} + migration_time {:.4} x {:.4} + balance {:.4} x {:.4}",
                c.score, t.free_memory.weight, t.free_memory.value, t.cpu_headroom.weight,
                t.cpu_headroom.value, t.migration_time.weight, t.migration_time.value,
                t.balance.weight, t.balance.value
            );
        }
        let _ = writeln!(text, "    predicted: {}", prediction_text(vm, h, &lim));
        if !reasons.is_empty() {
            excluded.push((hf.name.clone(), reasons));
        }
    }
    for u in unreachable {
        let _ = writeln!(
            text,
            "\n  agent {}: did not answer: {}",
            u.endpoint, u.error
        );
        excluded.push((
            format!("agent {}", u.endpoint),
            vec![format!("unreachable: {}", u.error)],
        ));
    }
    for c in &e.ranking {
        if let Some(h) = by_name(&c.name).filter(|h| h.refusal.is_none()) {
            let mut c = c.clone();
            c.rank = ranking.len() + 1;
            ranking.push((c, h.clone()));
        }
    }
    let _ = writeln!(
        text,
        "\nranking ({} eligible of {}):",
        ranking.len(),
        hosts.len() + unreachable.len()
    );
    for (c, h) in &ranking {
        let _ = writeln!(
            text,
            "  #{} {} score {:.6}, predicted {}",
            c.rank,
            c.name,
            c.score,
            prediction_text(vm, h, &lim)
        );
    }
    for (name, reasons) in &excluded {
        let _ = writeln!(text, "  excluded {name}: {}", reasons.join("; "));
    }
    Ok(Plan {
        ranking,
        excluded,
        text,
    })
}

/// Why the chosen host: its rank and score, and what it beat.
fn why(c: &Candidate, plan: &Plan, failed_before: &[(String, String)]) -> String {
    let n = plan.ranking.len();
    let t = &c.terms;
    let mut s = format!(
        "ranked #{} of {n} eligible, score {:.6} (free_memory {:.3}, cpu_headroom {:.3}, migration_time {:.3}, balance {:.3})",
        c.rank, c.score, t.free_memory.value, t.cpu_headroom.value, t.migration_time.value, t.balance.value
    );
    if let Some((next, _)) = plan.ranking.get(c.rank) {
        let _ = write!(s, " against {:.6} for `{}`", next.score, next.name);
    }
    if !failed_before.is_empty() {
        let names: Vec<_> = failed_before
            .iter()
            .map(|(h, _)| format!("`{h}`"))
            .collect();
        let _ = write!(s, "; tried after {} failed", names.join(", "));
    }
    s
}

/// How a sequence of attempts ended.
pub enum Attempts {
    /// The guest runs on `host`.
    Migrated {
        /// The destination host.
        host: String,
        /// Why it was chosen.
        why: String,
        /// The engine's report.
        report: Value,
    },
    /// The guest stays on the source (or, with code 3, its fate is
    /// unknown); every host's reason.
    NotMigrated {
        /// Exit code.
        code: u8,
        /// (host, reason) for every host.
        reasons: Vec<(String, String)>,
    },
}

/// Where to send the migration to `h`: its static address, or a receiver
/// its agent starts for this VM.
fn address_for(
    h: &HostFacts,
    vm: &MeasuredVm,
    client: &AgentClient,
) -> Result<(String, Option<(String, String)>), String> {
    let Some(ep) = &h.agent else {
        h.host
            .migration_address
            .parse::<Endpoint>()
            .map_err(|e| format!("migration_address {}: {e}", h.host.migration_address))?;
        return Ok((h.host.migration_address.clone(), None));
    };
    let req = json!({"cmd":"prepare-receive","vm":vm.vm.name,
                     "memory_mib":vm.vm.memory_mib,"memory_bytes":vm.memory_bytes,
                     "vcpus":vm.vm.vcpus});
    let v = client
        .request(ep, &req)
        .map_err(|e| format!("its agent {ep}: {e}"))?;
    if v["result"] != "ok" {
        return Err(format!(
            "refused by its agent: {}",
            v["error"].as_str().unwrap_or("?")
        ));
    }
    let addr = v["migration_address"].as_str().unwrap_or("").to_string();
    let id = v["id"].as_str().unwrap_or("").to_string();
    Ok((addr, Some((ep.clone(), id))))
}

fn release(client: &AgentClient, rx: &Option<(String, String)>) {
    if let Some((ep, id)) = rx {
        if let Err(e) = client.request(ep, &json!({"cmd":"release","id":id})) {
            eprintln!("refvmm: could not release receiver {id} at {ep}: {e}");
        }
    }
}

/// Whether the source still has its guest, idle (safe to try elsewhere).
fn source_idle(api: &Path) -> bool {
    api_request(api, &json!({"cmd":"status"}))
        .map(|s| s["migration"] == "idle")
        .unwrap_or(false)
}

/// How [`attempt`] drives the migrations: the client session, the
/// options, the agents' client, the attempt bound, the label that
/// prefixes its lines and whether a progress bar is drawn.
pub struct Driver<'a> {
    /// The client session (signals, progress).
    pub session: &'a Session,
    /// The migration's options.
    pub opts: &'a MigrateOptions,
    /// How to reach the agents.
    pub client: &'a AgentClient,
    /// At most this many hosts are tried.
    pub max_attempts: usize,
    /// Prefix of every line (evacuate names the VM).
    pub label: &'a str,
    /// Whether to draw a progress bar.
    pub bar: bool,
}

/// Tries the ranked hosts in order, at most `max_attempts`, reporting
/// every step on stderr (prefixed with `label`). `held` (a placement
/// lock) is released once the first host's receiver is prepared.
pub fn attempt(
    driver: &Driver<'_>,
    api: &Path,
    vm: &MeasuredVm,
    plan: &Plan,
    mut held: Option<std::sync::MutexGuard<'_, ()>>,
) -> Attempts {
    let &Driver {
        session,
        opts,
        client,
        max_attempts,
        label,
        bar,
    } = driver;
    let mut reasons: Vec<(String, String)> = plan
        .excluded
        .iter()
        .map(|(h, r)| (h.clone(), format!("excluded: {}", r.join("; "))))
        .collect();
    let mut failed = Vec::new();
    let bound = max_attempts.max(1);
    for (i, (c, h)) in plan.ranking.iter().enumerate() {
        if i >= bound {
            reasons.push((
                c.name.clone(),
                format!(
                    "not tried: at most {bound} attempts (--max-attempts), rank #{}",
                    c.rank
                ),
            ));
            continue;
        }
        eprintln!(
            "{label}refvmm: attempt {}/{}: host `{}` (rank #{}, score {:.6})",
            i + 1,
            bound.min(plan.ranking.len()),
            c.name,
            c.rank,
            c.score
        );
        let prepared = address_for(h, vm, client);
        // The caller's placement lock (evacuate) is held until the first
        // receiver is prepared, so the next VM's plan sees it.
        held.take();
        let (addr, rx) = match prepared {
            Ok(a) => a,
            Err(e) => {
                eprintln!(
                    "{label}refvmm: host `{}`: {e}; trying the next host",
                    c.name
                );
                failed.push((c.name.clone(), e));
                continue;
            }
        };
        eprintln!("{label}refvmm: migrating to `{}` at {addr}", c.name);
        let mut o = opts.clone();
        o.to = addr;
        match session.run(api, &o.to_request(), label, bar) {
            Ok(report) => {
                return Attempts::Migrated {
                    host: c.name.clone(),
                    why: why(c, plan, &failed),
                    report,
                }
            }
            Err(ClientFail(code, msg)) => {
                let retry = code == 1 && !session.interrupted() && source_idle(api);
                if code != 3 {
                    release(client, &rx);
                }
                failed.push((c.name.clone(), msg.clone()));
                if !retry {
                    let stop = if code == 1 {
                        "the source is not idle: no other host is tried"
                    } else {
                        "no other host is tried"
                    };
                    eprintln!("{label}refvmm: host `{}`: {msg}; {stop}", c.name);
                    reasons.extend(failed);
                    for (c2, _) in plan.ranking.iter().skip(i + 1) {
                        reasons.push((c2.name.clone(), format!("not tried: {stop}")));
                    }
                    return Attempts::NotMigrated { code, reasons };
                }
                eprintln!("{label}refvmm: host `{}` failed before the switchover: {msg}; trying the next host", c.name);
            }
        }
    }
    reasons.extend(failed);
    Attempts::NotMigrated { code: 1, reasons }
}

/// The final word on stderr: "migrated to H (why)" or "not migrated" with
/// every host's reason.
pub fn not_migrated_text(vm: &str, reasons: &[(String, String)]) -> String {
    let mut s = format!("not migrated: VM `{vm}` stays on the source; every host's reason:");
    if reasons.is_empty() {
        s.push_str("\n  (no candidate hosts)");
    }
    for (h, r) in reasons {
        let _ = write!(s, "\n  {h}: {r}");
    }
    s
}

/// `refvmm migrate` with `--to auto` (or a direct `--to`).
pub fn cmd_migrate(api: &Path, auto: AutoArgs, opts: MigrateOptions) -> Result<(), (u8, String)> {
    if opts.to != "auto" {
        if auto.given() {
            return Err((
                2,
                "--hosts, --agents and --vm are only used with --to auto".into(),
            ));
        }
        return crate::migrate_client::cmd_migrate(api, &opts).map_err(|f| (f.0, f.1));
    }
    let sources = auto.sources(crate::live::agent_tls(&opts.tls)?);
    if sources.is_empty() {
        return Err((
            2,
            "--to auto needs --hosts <hosts.json> and/or --agents <endpoints>".into(),
        ));
    }
    let mut probe = opts.clone();
    probe.to = "unix:/probe".into();
    probe.config().map_err(|e| (2, format!("--{e}")))?;
    let vm = match &auto.vm {
        Some(p) => vm_from_file(p)?,
        None => measure_vm(api, None, auto.dirty_rate_window_ms)?,
    };
    let (hosts, unreachable) = gather_hosts(&sources, opts.max_bandwidth_mib)?;
    let plan = plan(&vm, &hosts, &unreachable, &opts)?;
    eprint!("{}", plan.text);
    let session = Session::start();
    let driver = Driver {
        session: &session,
        opts: &opts,
        client: &sources.client,
        max_attempts: auto.max_attempts,
        label: "",
        bar: true,
    };
    match attempt(&driver, api, &vm, &plan, None) {
        Attempts::Migrated { host, why, report } => {
            print_migrated(&report, session.interrupted());
            eprintln!("refvmm: migrated to `{host}` ({why})");
            Ok(())
        }
        Attempts::NotMigrated { code, reasons } => {
            let code = if code == 0 { 1 } else { code };
            let code = if session.interrupted() && code == 1 {
                EXIT_CANCELLED
            } else {
                code
            };
            Err((code, not_migrated_text(&vm.vm.name, &reasons)))
        }
    }
}
