//! `refvmm evacuate`: move every VM of this host (a list of API sockets)
//! to other hosts, each to a destination chosen from live facts, at most N
//! at a time, shortest predicted migration first (docs/operations.md says
//! why), with a summary table at the end. A VM that cannot move is
//! reported with its reason and left running.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use livemig_placement::{predict, PredictLimits};

use crate::auto::{attempt, plan, Attempts, Driver};
use crate::cli::TlsArgs;
use crate::live::{gather_hosts, measure_vm, HostFacts, HostSources, MeasuredVm};
use crate::migrate_client::Session;
use crate::migration::MigrateOptions;

/// `refvmm evacuate` options.
#[derive(clap::Args, Clone)]
pub struct EvacuateArgs {
    /// The API sockets of the VMs to move (comma-separated).
    #[arg(long, value_delimiter = ',', required = true)]
    api_sockets: Vec<PathBuf>,
    /// Candidate hosts (a JSON array; entries may name their `agent`).
    #[arg(long)]
    hosts: Option<PathBuf>,
    /// Agents to ask (comma-separated endpoints of `refvmm agent`).
    #[arg(long, value_delimiter = ',')]
    agents: Vec<String>,
    /// Most migrations at once.
    #[arg(long, default_value_t = 2)]
    parallel: usize,
    /// Most hosts tried per VM.
    #[arg(long, default_value_t = 3)]
    max_attempts: usize,
    /// The dirty-rate measuring window per VM, ms.
    #[arg(long, default_value_t = crate::dirty_rate::DEFAULT_WINDOW_MS)]
    dirty_rate_window_ms: u64,
    /// Longest acceptable downtime per VM, ms (default 20).
    #[arg(long)]
    downtime_limit_ms: Option<u64>,
    /// Bandwidth cap per migration, MiB/s.
    #[arg(long = "max-bandwidth", value_name = "MIB_PER_S")]
    max_bandwidth_mib: Option<u64>,
    /// Switch over when a cap is reached instead of giving up.
    #[arg(long)]
    force: bool,
    /// Mutual TLS for the agents and the migrations.
    #[command(flatten)]
    tls: TlsArgs,
}

/// One VM's line of the summary.
#[derive(Clone)]
struct Row {
    order: usize,
    api: PathBuf,
    vm: Option<MeasuredVm>,
    predicted_s: Option<f64>,
    result: String,
    moved: bool,
    seconds: f64,
}

/// What the workers share: the VMs still to move, the placement lock, and
/// what has landed on static hosts (agents count their own).
struct Shared {
    queue: Mutex<VecDeque<usize>>,
    rows: Mutex<Vec<Row>>,
    placing: Mutex<()>,
    landed: Mutex<BTreeMap<String, (u64, u32)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl EvacuateArgs {
    fn options(&self) -> MigrateOptions {
        let mut o = MigrateOptions {
            to: "auto".into(),
            downtime_limit_ms: self.downtime_limit_ms,
            max_bandwidth_mib: self.max_bandwidth_mib,
            force: self.force,
            ..Default::default()
        };
        o.tls.cert = self.tls.tls_cert.clone();
        o.tls.key = self.tls.tls_key.clone();
        o.tls.ca = self.tls.tls_ca.clone();
        o
    }
}

/// Static hosts carry what this evacuation has put on them so far.
fn with_landed(mut hosts: Vec<HostFacts>, landed: &BTreeMap<String, (u64, u32)>) -> Vec<HostFacts> {
    for h in &mut hosts {
        if h.agent.is_some() {
            continue;
        }
        if let Some((mem, vcpus)) = landed.get(&h.host.name) {
            h.host.memory_free_mib = h.host.memory_free_mib.saturating_sub(*mem);
            h.host.vcpus_allocated = h.host.vcpus_allocated.saturating_add(*vcpus);
            h.origin = format!(
                "{} minus {mem} MiB / {vcpus} vCPUs evacuated there",
                h.origin
            );
        }
    }
    hosts
}

/// The order: shortest predicted migration first (at the best link), VMs
/// that would not converge last, then by name.
fn order(rows: &mut [Row], best_link: f64, limits: &PredictLimits) {
    for r in rows.iter_mut() {
        r.predicted_s = r.vm.as_ref().map(|m| {
            let p = predict(m.vm.memory_mib as f64, m.dirty_mib_s, best_link, limits);
            if p.converges {
                p.total_s
            } else {
                f64::INFINITY
            }
        });
    }
    // Unmeasured VMs (not moved) after every measured one.
    rows.sort_by(|a, b| {
        let key = |r: &Row| {
            (
                r.predicted_s.is_none(),
                r.predicted_s.unwrap_or(f64::INFINITY),
            )
        };
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0)
            .then_with(|| ka.1.total_cmp(&kb.1))
            .then_with(|| a.api.cmp(&b.api))
    });
    for (i, r) in rows.iter_mut().enumerate() {
        r.order = i + 1;
    }
}

fn worker(
    shared: &Shared,
    session: &Session,
    sources: &HostSources,
    opts: &MigrateOptions,
    args: &EvacuateArgs,
) {
    loop {
        let Some(i) = lock(&shared.queue).pop_front() else {
            return;
        };
        let row = lock(&shared.rows)[i].clone();
        let Some(vm) = row.vm.clone() else { continue };
        let label = format!("[{}] ", vm.vm.name);
        let t0 = Instant::now();
        let held = lock(&shared.placing);
        let gathered = gather_hosts(sources, opts.max_bandwidth_mib)
            .map(|(h, u)| (with_landed(h, &lock(&shared.landed)), u));
        let (hosts, unreachable) = match gathered {
            Ok(g) => g,
            Err((_, e)) => {
                lock(&shared.rows)[i].result = format!("not moved: {e}");
                continue;
            }
        };
        let p = match plan(&vm, &hosts, &unreachable, opts) {
            Ok(p) => p,
            Err((_, e)) => {
                lock(&shared.rows)[i].result = format!("not moved: {e}");
                continue;
            }
        };
        for l in p.text.lines() {
            eprintln!("{label}{l}");
        }
        // Count the best-ranked static host as taken while the VM moves, so
        // the next VM's plan sees it; undone if the VM goes elsewhere.
        let first = p
            .ranking
            .first()
            .filter(|(_, h)| h.agent.is_none())
            .map(|(c, _)| c.name.clone());
        if let Some(h) = &first {
            let mut l = lock(&shared.landed);
            let e = l.entry(h.clone()).or_default();
            e.0 += vm.vm.memory_mib;
            e.1 += vm.vm.vcpus;
        }
        let driver = Driver {
            session,
            opts,
            client: &sources.client,
            max_attempts: args.max_attempts,
            label: &label,
            bar: false,
        };
        let out = attempt(&driver, &row.api, &vm, &p, Some(held));
        let mut l = lock(&shared.landed);
        if let Some(h) = &first {
            if let Some(e) = l.get_mut(h) {
                e.0 -= vm.vm.memory_mib;
                e.1 -= vm.vm.vcpus;
            }
        }
        let mut rows = lock(&shared.rows);
        rows[i].seconds = t0.elapsed().as_secs_f64();
        match out {
            Attempts::Migrated { host, why, .. } => {
                if hosts
                    .iter()
                    .any(|h| h.host.name == host && h.agent.is_none())
                {
                    let e = l.entry(host.clone()).or_default();
                    e.0 += vm.vm.memory_mib;
                    e.1 += vm.vm.vcpus;
                }
                eprintln!("{label}refvmm: migrated to `{host}` ({why})");
                rows[i].result = format!("migrated to {host} ({why})");
                rows[i].moved = true;
            }
            Attempts::NotMigrated { reasons, .. } => {
                let text = crate::auto::not_migrated_text(&vm.vm.name, &reasons);
                eprintln!("{label}refvmm: {text}");
                let why: Vec<_> = reasons.iter().map(|(h, r)| format!("{h}: {r}")).collect();
                rows[i].result = format!("not moved (left running): {}", why.join(" | "));
            }
        }
    }
}

fn summary(rows: &[Row]) -> String {
    let mut s = String::from("\nevacuation summary (in the order moved):\n");
    let _ = writeln!(
        s,
        "{:>3}  {:<12} {:>8} {:>10} {:>10} {:>8}  result",
        "#", "vm", "mem MiB", "dirty MiB/s", "pred. s", "took s"
    );
    for r in rows {
        let (name, mem, dirty) = match &r.vm {
            Some(m) => (
                m.vm.name.clone(),
                m.vm.memory_mib.to_string(),
                format!("{:.2}", m.dirty_mib_s),
            ),
            None => (r.api.display().to_string(), "-".into(), "-".into()),
        };
        let pred = r.predicted_s.map_or("-".into(), |p| {
            if p.is_finite() {
                format!("{p:.2}")
            } else {
                "never".into()
            }
        });
        let _ = writeln!(
            s,
            "{:>3}  {:<12} {:>8} {:>10} {:>10} {:>8.2}  {}",
            r.order, name, mem, dirty, pred, r.seconds, r.result
        );
    }
    let moved = rows.iter().filter(|r| r.moved).count();
    let _ = writeln!(s, "{moved} of {} VMs moved", rows.len());
    s
}

/// `refvmm evacuate`.
pub fn cmd_evacuate(args: EvacuateArgs) -> Result<(), (u8, String)> {
    let opts = args.options();
    let sources = HostSources {
        file: args.hosts.clone(),
        agents: args.agents.clone(),
        client: crate::agent::AgentClient {
            tls: crate::live::agent_tls(&opts.tls)?,
        },
    };
    if sources.is_empty() {
        return Err((
            2,
            "evacuate needs --hosts <hosts.json> and/or --agents <endpoints>".into(),
        ));
    }
    let mut probe = opts.clone();
    probe.to = "unix:/probe".into();
    probe.config().map_err(|e| (2, format!("--{e}")))?;
    // Measure every VM first: the order depends on it.
    let mut rows: Vec<Row> = args
        .api_sockets
        .iter()
        .map(|api| {
            let (vm, result) = match measure_vm(api, None, args.dirty_rate_window_ms) {
                Ok(m) => (Some(m), String::new()),
                Err((_, e)) => (None, format!("not moved (cannot measure): {e}")),
            };
            if let Some(m) = &vm {
                eprintln!(
                    "refvmm: {}: {} MiB, {} vCPU(s), dirty rate {:.2} MiB/s",
                    m.vm.name, m.vm.memory_mib, m.vm.vcpus, m.dirty_mib_s
                );
            }
            Row {
                order: 0,
                api: api.clone(),
                vm,
                predicted_s: None,
                result,
                moved: false,
                seconds: 0.0,
            }
        })
        .collect();
    let (hosts, _) = gather_hosts(&sources, opts.max_bandwidth_mib)?;
    let best_link = hosts
        .iter()
        .map(|h| h.host.link_bandwidth_mib_s)
        .max()
        .unwrap_or(1) as f64;
    let limits = PredictLimits {
        downtime_limit_ms: opts.downtime_limit_ms.map_or(20.0, |v| v as f64),
        ..Default::default()
    };
    order(&mut rows, best_link, &limits);
    let names: Vec<_> = rows
        .iter()
        .filter_map(|r| r.vm.as_ref().map(|m| m.vm.name.clone()))
        .collect();
    eprintln!(
        "refvmm: evacuating {} VMs, at most {} at a time, shortest predicted migration first: {}",
        rows.len(),
        args.parallel.max(1),
        names.join(", ")
    );
    let queue = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.vm.is_some())
        .map(|(i, _)| i)
        .collect();
    let shared = Shared {
        queue: Mutex::new(queue),
        rows: Mutex::new(rows),
        placing: Mutex::new(()),
        landed: Mutex::new(BTreeMap::new()),
    };
    let session = Session::start();
    std::thread::scope(|s| {
        for _ in 0..args.parallel.max(1) {
            s.spawn(|| worker(&shared, &session, &sources, &opts, &args));
        }
    });
    let rows = shared.rows.into_inner().unwrap_or_else(|e| e.into_inner());
    eprint!("{}", summary(&rows));
    let left = rows.iter().filter(|r| !r.moved).count();
    if left == 0 {
        Ok(())
    } else {
        Err((
            1,
            format!(
                "{left} of {} VMs not moved (reasons in the summary); they run on here",
                rows.len()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemig_placement::Vm;

    fn row(name: &str, memory_mib: u64, dirty: f64) -> Row {
        Row {
            order: 0,
            api: PathBuf::from(format!("/run/{name}.api")),
            vm: Some(MeasuredVm {
                vm: Vm {
                    name: name.into(),
                    memory_mib,
                    vcpus: 1,
                    required_cpu_features: Default::default(),
                    dirty_rate_mib_s: dirty.ceil() as u64,
                    anti_affinity: Default::default(),
                    current_host: "here".into(),
                },
                dirty_mib_s: dirty,
                memory_bytes: memory_mib << 20,
                origin: String::new(),
            }),
            predicted_s: None,
            result: String::new(),
            moved: false,
            seconds: 0.0,
        }
    }

    fn static_host(name: &str, free: u64) -> HostFacts {
        HostFacts {
            host: livemig_placement::Host {
                name: name.into(),
                migration_address: "tcp:10.0.0.1:4444".into(),
                memory_total_mib: 8192,
                memory_free_mib: free,
                cpus: 8,
                cpu_load: 0.0,
                vcpus_allocated: 2,
                cpu_model: String::new(),
                cpu_features: Default::default(),
                link_bandwidth_mib_s: 1000,
                labels: Default::default(),
                maintenance: false,
                agent: None,
            },
            origin: "hosts file".into(),
            agent: None,
            refusal: None,
        }
    }

    #[test]
    fn static_hosts_carry_what_landed_agents_count_themselves() {
        let mut agent = static_host("b", 4096);
        agent.agent = Some("tcp:10.0.0.2:7070".into());
        let landed = BTreeMap::from([("a".to_string(), (1024, 3)), ("b".to_string(), (512, 1))]);
        let hosts = with_landed(vec![static_host("a", 4096), agent], &landed);
        assert_eq!(
            (hosts[0].host.memory_free_mib, hosts[0].host.vcpus_allocated),
            (3072, 5)
        );
        assert!(
            hosts[0].origin.contains("minus 1024 MiB"),
            "{}",
            hosts[0].origin
        );
        // The agent's answer already counts its receivers.
        assert_eq!(
            (hosts[1].host.memory_free_mib, hosts[1].host.vcpus_allocated),
            (4096, 2)
        );
    }

    #[test]
    fn shortest_predicted_migration_first_non_converging_last() {
        let mut rows = vec![
            row("big", 8192, 10.0),
            row("hot", 1024, 2000.0),
            row("busy", 1024, 500.0),
            row("quiet", 1024, 0.0),
            Row {
                vm: None,
                ..row("gone", 1, 0.0)
            },
        ];
        order(&mut rows, 1000.0, &PredictLimits::default());
        let names: Vec<_> = rows
            .iter()
            .map(|r| r.vm.as_ref().map_or("-".to_string(), |m| m.vm.name.clone()))
            .collect();
        // quiet: 1.0 s; busy: 1024 / (1000 - 500) ~ 2 s; big: 8192 / 990 ~
        // 8.3 s; hot never converges; the unmeasured one last.
        assert_eq!(names, ["quiet", "busy", "big", "hot", "-"]);
        assert_eq!(rows[3].predicted_s, Some(f64::INFINITY));
        assert_eq!(
            rows.iter().map(|r| r.order).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
    }
}
