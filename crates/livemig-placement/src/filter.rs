//! The filters: hard requirements a destination must meet.
//!
//! Every filter is evaluated for every host (not just up to the first
//! failure), so an excluded host carries all of its reasons, in this order:
//!
//! 1. `current_host` — the VM already runs there;
//! 2. `maintenance` — the host is in maintenance;
//! 3. `memory` — `memory_free_mib < vm.memory_mib + memory_headroom_mib`;
//! 4. `vcpu_overcommit` — `vcpus_allocated + vm.vcpus > cpus * vcpu_overcommit_ratio`;
//! 5. `cpu_features` — the host lacks a feature the VM requires;
//! 6. `anti_affinity` — the host carries a label the VM's anti-affinity lists.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::PlacementConfig;
use crate::model::{Host, Vm};

/// One failed filter, with the numbers that made it fail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "filter", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reason {
    /// The host is the one the VM runs on.
    CurrentHost,
    /// The host is in maintenance.
    Maintenance,
    /// Not enough free memory for the VM plus the headroom.
    Memory {
        /// Free memory on the host, MiB.
        free_mib: u64,
        /// The VM's memory, MiB.
        vm_mib: u64,
        /// The configured headroom, MiB.
        headroom_mib: u64,
    },
    /// The VM's vCPUs would push the host over the overcommit ratio.
    VcpuOvercommit {
        /// vCPUs already on the host.
        allocated: u32,
        /// The VM's vCPUs.
        requested: u32,
        /// Physical CPUs of the host.
        cpus: u32,
        /// The configured ratio.
        ratio: f64,
    },
    /// The host lacks CPU features the VM requires.
    CpuFeatures {
        /// The missing features, sorted.
        missing: Vec<String>,
    },
    /// The host carries labels the VM must not share a host with.
    AntiAffinity {
        /// The conflicting labels, sorted.
        labels: Vec<String>,
    },
}

impl Reason {
    /// The filter's short name: `current_host`, `maintenance`, `memory`,
    /// `vcpu_overcommit`, `cpu_features` or `anti_affinity`.
    pub fn kind(&self) -> &'static str {
        match self {
            Reason::CurrentHost => "current_host",
            Reason::Maintenance => "maintenance",
            Reason::Memory { .. } => "memory",
            Reason::VcpuOvercommit { .. } => "vcpu_overcommit",
            Reason::CpuFeatures { .. } => "cpu_features",
            Reason::AntiAffinity { .. } => "anti_affinity",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind();
        match self {
            Reason::CurrentHost => write!(f, "{kind}: the VM runs there now"),
            Reason::Maintenance => write!(f, "{kind}: the host is in maintenance"),
            Reason::Memory {
                free_mib,
                vm_mib,
                headroom_mib,
            } => write!(
                f,
                "{kind}: needs {} MiB free ({vm_mib} MiB VM + {headroom_mib} MiB headroom), has {free_mib} MiB",
                vm_mib.saturating_add(*headroom_mib)
            ),
            Reason::VcpuOvercommit {
                allocated,
                requested,
                cpus,
                ratio,
            } => write!(
                f,
                "{kind}: {allocated} + {requested} vCPUs > {cpus} CPUs x {ratio} = {}",
                f64::from(*cpus) * ratio
            ),
            Reason::CpuFeatures { missing } => {
                write!(f, "{kind}: missing {}", missing.join(", "))
            }
            Reason::AntiAffinity { labels } => {
                write!(f, "{kind}: host has label {}", labels.join(", "))
            }
        }
    }
}

/// Runs every filter on `host`; an empty result means the host is eligible.
pub fn check(host: &Host, vm: &Vm, config: &PlacementConfig) -> Vec<Reason> {
    let mut reasons = Vec::new();
    if host.name == vm.current_host {
        reasons.push(Reason::CurrentHost);
    }
    if host.maintenance {
        reasons.push(Reason::Maintenance);
    }
    if host.memory_free_mib < vm.memory_mib.saturating_add(config.memory_headroom_mib) {
        reasons.push(Reason::Memory {
            free_mib: host.memory_free_mib,
            vm_mib: vm.memory_mib,
            headroom_mib: config.memory_headroom_mib,
        });
    }
    let wanted = u64::from(host.vcpus_allocated) + u64::from(vm.vcpus);
    if wanted as f64 > f64::from(host.cpus) * config.vcpu_overcommit_ratio {
        reasons.push(Reason::VcpuOvercommit {
            allocated: host.vcpus_allocated,
            requested: vm.vcpus,
            cpus: host.cpus,
            ratio: config.vcpu_overcommit_ratio,
        });
    }
    if !vm.required_cpu_features.is_subset(&host.cpu_features) {
        reasons.push(Reason::CpuFeatures {
            missing: vm
                .required_cpu_features
                .difference(&host.cpu_features)
                .cloned()
                .collect(),
        });
    }
    if !vm.anti_affinity.is_disjoint(&host.labels) {
        reasons.push(Reason::AntiAffinity {
            labels: vm
                .anti_affinity
                .intersection(&host.labels)
                .cloned()
                .collect(),
        });
    }
    reasons
}
