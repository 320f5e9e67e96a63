//! The score: four terms in `0.0 ..= 1.0`, combined by normalised weights.
//!
//! For an eligible host `h` and the VM `v` (sizes in MiB, rates in MiB/s):
//!
//! | term | value |
//! |---|---|
//! | `free_memory` | `(h.memory_free_mib - v.memory_mib) / h.memory_total_mib` |
//! | `cpu_headroom` | `clamp((h.cpus - h.cpu_load - v.vcpus) / h.cpus, 0, 1)` (the VM counted as fully busy) |
//! | `migration_time` | `t_ref / (t_ref + t)` with `t = v.memory_mib / (h.link_bandwidth_mib_s - v.dirty_rate_mib_s)`; 0 when the dirty rate is not below the bandwidth (pre-copy would not converge) |
//! | `balance` | `clamp(1 - 2 * sigma, 0, 1)`, `sigma` the standard deviation of memory utilisation (`used / total`) over all listed hosts after the move |
//!
//! `score = sum(w_k * term_k) / sum(w_k)`, rounded to 6 decimals.

use serde::{Deserialize, Serialize};

use crate::config::PlacementConfig;
use crate::model::{Host, Vm};

/// One score term: its value, its normalised weight and their product.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Term {
    /// The term's value, `0.0 ..= 1.0` (higher is better).
    pub value: f64,
    /// The term's weight divided by the sum of all weights.
    pub weight: f64,
    /// `weight * value`: this term's share of the score.
    pub contribution: f64,
}

impl Term {
    fn new(value: f64, weight: f64, weight_sum: f64) -> Term {
        let weight = weight / weight_sum;
        Term {
            value,
            weight,
            contribution: weight * value,
        }
    }
}

/// The four terms of a host's score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Terms {
    /// Free memory after placement, as a fraction of the host's memory.
    pub free_memory: Term,
    /// Idle CPUs after placement, as a fraction of the host's CPUs.
    pub cpu_headroom: Term,
    /// Estimated migration time, mapped to `t_ref / (t_ref + t)`.
    pub migration_time: Term,
    /// Cluster memory balance after the move.
    pub balance: Term,
}

impl Terms {
    /// The unrounded score: the sum of the contributions.
    pub fn sum(&self) -> f64 {
        self.free_memory.contribution
            + self.cpu_headroom.contribution
            + self.migration_time.contribution
            + self.balance.contribution
    }
}

/// The quantities behind the terms, in operator units.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Facts {
    /// Free memory left on the host after the VM lands, MiB.
    pub free_memory_after_mib: u64,
    /// Idle CPUs left after the VM lands (negative when overloaded).
    pub cpu_headroom_after: f64,
    /// Estimated migration time in seconds; `None` when the VM dirties
    /// memory at least as fast as the link carries it.
    pub migration_time_s: Option<f64>,
    /// Standard deviation of memory utilisation over all hosts after the move.
    pub cluster_imbalance_after: f64,
}

/// Memory utilisation sums over the whole cluster, for O(1) balance scoring.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cluster {
    n: f64,
    s1: f64,
    s2: f64,
}

fn utilisation(used_mib: u64, total_mib: u64) -> f64 {
    if total_mib == 0 {
        return 0.0;
    }
    (used_mib.min(total_mib) as f64 / total_mib as f64).clamp(0.0, 1.0)
}

fn used(h: &Host) -> u64 {
    h.memory_total_mib.saturating_sub(h.memory_free_mib)
}

fn stddev(s1: f64, s2: f64, n: f64) -> f64 {
    if n <= 0.0 {
        return 0.0;
    }
    let mean = s1 / n;
    (s2 / n - mean * mean).max(0.0).sqrt()
}

impl Cluster {
    /// Sums over `hosts`, then accounts for the VM leaving `source` (if it
    /// is listed). `hosts` must be in a canonical order (the engine passes
    /// them sorted by name) so the floating-point sums do not depend on the
    /// input order.
    pub(crate) fn new<'a>(
        hosts: impl Iterator<Item = &'a Host>,
        vm: &Vm,
        source: Option<&Host>,
    ) -> (Cluster, f64) {
        let mut c = Cluster {
            n: 0.0,
            s1: 0.0,
            s2: 0.0,
        };
        for h in hosts {
            let u = utilisation(used(h), h.memory_total_mib);
            c.n += 1.0;
            c.s1 += u;
            c.s2 += u * u;
        }
        let now = stddev(c.s1, c.s2, c.n);
        if let Some(s) = source {
            let before = utilisation(used(s), s.memory_total_mib);
            let after = utilisation(used(s).saturating_sub(vm.memory_mib), s.memory_total_mib);
            c.s1 += after - before;
            c.s2 += after * after - before * before;
        }
        (c, now)
    }

    /// The imbalance after the VM moves (from the source) to `dest`.
    fn imbalance_with(&self, dest: &Host, vm: &Vm) -> f64 {
        let before = utilisation(used(dest), dest.memory_total_mib);
        let after = utilisation(
            used(dest).saturating_add(vm.memory_mib),
            dest.memory_total_mib,
        );
        stddev(
            self.s1 + (after - before),
            self.s2 + (after * after - before * before),
            self.n,
        )
    }
}

/// The estimated pre-copy migration time, in seconds: the geometric series
/// `M/B * (1 + D/B + (D/B)^2 + ...) = M / (B - D)`, or `None` when `D >= B`.
pub fn migration_time_s(vm_mib: u64, bandwidth_mib_s: u64, dirty_mib_s: u64) -> Option<f64> {
    if dirty_mib_s >= bandwidth_mib_s {
        return None;
    }
    Some(vm_mib as f64 / (bandwidth_mib_s - dirty_mib_s) as f64)
}

/// Rounds a score to 6 decimals, as an integer count of millionths (the
/// ranking key).
pub(crate) fn micro(score: f64) -> u64 {
    let m = (score * 1e6).round();
    if m.is_finite() && m > 0.0 {
        m as u64
    } else {
        0
    }
}

/// Scores an eligible host. Returns the terms, the facts and the score
/// (rounded to 6 decimals, in millionths).
pub(crate) fn score(
    host: &Host,
    vm: &Vm,
    config: &PlacementConfig,
    cluster: &Cluster,
) -> (Terms, Facts, u64) {
    let w = &config.weights;
    let wsum = w.sum();

    let free_after = host.memory_free_mib.saturating_sub(vm.memory_mib);
    let free_value = (free_after as f64 / host.memory_total_mib.max(1) as f64).clamp(0.0, 1.0);

    let cpus = f64::from(host.cpus.max(1));
    let headroom = cpus - host.cpu_load - f64::from(vm.vcpus);
    let cpu_value = (headroom / cpus).clamp(0.0, 1.0);

    let t = migration_time_s(
        vm.memory_mib,
        host.link_bandwidth_mib_s,
        vm.dirty_rate_mib_s,
    );
    let tref = config.migration_time_reference_s;
    let time_value = t.map_or(0.0, |t| (tref / (tref + t)).clamp(0.0, 1.0));

    let imbalance = cluster.imbalance_with(host, vm);
    let balance_value = (1.0 - 2.0 * imbalance).clamp(0.0, 1.0);

    let terms = Terms {
        free_memory: Term::new(free_value, w.free_memory, wsum),
        cpu_headroom: Term::new(cpu_value, w.cpu_headroom, wsum),
        migration_time: Term::new(time_value, w.migration_time, wsum),
        balance: Term::new(balance_value, w.balance, wsum),
    };
    let facts = Facts {
        free_memory_after_mib: free_after,
        cpu_headroom_after: headroom,
        migration_time_s: t,
        cluster_imbalance_after: imbalance,
    };
    let m = micro(terms.sum());
    (terms, facts, m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, total: u64, free: u64) -> Host {
        Host {
            name: name.to_string(),
            migration_address: format!("tcp:{name}:4444"),
            memory_total_mib: total,
            memory_free_mib: free,
            cpus: 8,
            cpu_load: 2.0,
            vcpus_allocated: 0,
            cpu_model: String::new(),
            cpu_features: Default::default(),
            link_bandwidth_mib_s: 1000,
            labels: Default::default(),
            maintenance: false,
            agent: None,
        }
    }

    fn vm(mem: u64, current: &str) -> Vm {
        Vm {
            name: String::new(),
            memory_mib: mem,
            vcpus: 2,
            required_cpu_features: Default::default(),
            dirty_rate_mib_s: 100,
            anti_affinity: Default::default(),
            current_host: current.to_string(),
        }
    }

    /// The standard deviation computed the slow, obvious way.
    fn naive_imbalance(hosts: &[Host], vm: &Vm, dest: &str) -> f64 {
        let us: Vec<f64> = hosts
            .iter()
            .map(|h| {
                let mut used = h.memory_total_mib - h.memory_free_mib;
                if h.name == vm.current_host {
                    used = used.saturating_sub(vm.memory_mib);
                }
                if h.name == dest {
                    used += vm.memory_mib;
                }
                used as f64 / h.memory_total_mib as f64
            })
            .collect();
        let n = us.len() as f64;
        let mean = us.iter().sum::<f64>() / n;
        (us.iter().map(|u| (u - mean) * (u - mean)).sum::<f64>() / n).sqrt()
    }

    #[test]
    fn migration_time_is_memory_over_spare_bandwidth() {
        assert_eq!(migration_time_s(8192, 1100, 100), Some(8.192));
        assert_eq!(migration_time_s(1000, 1000, 0), Some(1.0));
        assert_eq!(migration_time_s(1000, 1000, 1000), None);
        assert_eq!(migration_time_s(1000, 100, 5000), None);
    }

    #[test]
    fn incremental_balance_matches_naive_computation() {
        let hosts = vec![
            host("a", 65536, 12288),
            host("b", 32768, 6144),
            host("c", 131072, 65536),
            host("d", 65536, 32768),
        ];
        let v = vm(8192, "a");
        let (cluster, now) = Cluster::new(hosts.iter(), &v, hosts.first());
        let plain = naive_imbalance(&hosts, &vm(0, "none"), "none");
        assert!((now - plain).abs() < 1e-12, "{now} vs {plain}");
        for dest in &hosts[2..] {
            let fast = cluster.imbalance_with(dest, &v);
            let slow = naive_imbalance(&hosts, &v, &dest.name);
            assert!(
                (fast - slow).abs() < 1e-12,
                "{}: {fast} vs {slow}",
                dest.name
            );
        }
    }

    #[test]
    fn terms_follow_the_documented_formula() {
        let hosts = [host("a", 16384, 4096), host("b", 16384, 12288)];
        let v = vm(4096, "a");
        let cfg = PlacementConfig::default();
        let (cluster, _) = Cluster::new(hosts.iter(), &v, hosts.first());
        let (t, f, m) = score(&hosts[1], &v, &cfg, &cluster);
        // free: (12288 - 4096) / 16384
        assert_eq!(t.free_memory.value, 0.5);
        // cpu: (8 - 2 - 2) / 8
        assert_eq!(t.cpu_headroom.value, 0.5);
        // time: 4096 / (1000 - 100) s; 60 / (60 + t)
        let secs = 4096.0 / 900.0;
        assert_eq!(f.migration_time_s, Some(secs));
        assert!((t.migration_time.value - 60.0 / (60.0 + secs)).abs() < 1e-15);
        // balance: after the move both hosts are 50% used: sigma 0.
        assert_eq!(f.cluster_imbalance_after, 0.0);
        assert_eq!(t.balance.value, 1.0);
        assert_eq!(
            m,
            micro(0.3 * 0.5 + 0.3 * 0.5 + 0.2 * t.migration_time.value + 0.2)
        );
    }

    #[test]
    fn micro_rounds_and_never_wraps() {
        assert_eq!(micro(0.1234564), 123456);
        assert_eq!(micro(0.1234566), 123457);
        assert_eq!(micro(-1.0), 0);
        assert_eq!(micro(f64::NAN), 0);
    }
}
