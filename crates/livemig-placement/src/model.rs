//! The data: the candidate hosts and the VM to place (the input), and why a
//! host was excluded ([`Excluded`], [`Reason`]; the filters in
//! [`crate::filter`] produce them, errors and reports carry them).
//!
//! The input types are plain serde structs. Unknown keys are rejected
//! (`deny_unknown_fields`), sizes are unsigned integers in MiB and MiB/s, so
//! a negative number or a misspelt key is a parse error, not a silent zero.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A host that could receive the VM.
///
/// JSON example (optional fields shown with their defaults):
///
/// ```json
/// {
///   "name": "delta",
///   "migration_address": "tcp:10.0.0.4:4444",
///   "memory_total_mib": 65536,
///   "memory_free_mib": 40960,
///   "cpus": 32,
///   "cpu_load": 6.5,
///   "vcpus_allocated": 0,
///   "cpu_model": "",
///   "cpu_features": [],
///   "link_bandwidth_mib_s": 1200,
///   "labels": [],
///   "maintenance": false,
///   "agent": null
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// Unique host name.
    pub name: String,
    /// Where a migration to this host is sent, e.g. `tcp:10.0.0.2:4444`.
    pub migration_address: String,
    /// Total guest-usable memory of the host, in MiB.
    pub memory_total_mib: u64,
    /// Memory currently free on the host, in MiB (at most `memory_total_mib`).
    pub memory_free_mib: u64,
    /// Number of physical CPUs (hardware threads) of the host; at least 1.
    pub cpus: u32,
    /// Current CPU load, in busy CPUs (like a load average: `0.0` idle,
    /// `cpus` fully busy; it may exceed `cpus` on an overloaded host).
    pub cpu_load: f64,
    /// vCPUs of the VMs already placed on the host (for the overcommit
    /// filter). Default 0.
    #[serde(default)]
    pub vcpus_allocated: u32,
    /// CPU model name; informational only (shown in explanations).
    #[serde(default)]
    pub cpu_model: String,
    /// CPU feature flags the host offers to guests, e.g. `avx2`, `aes`.
    #[serde(default)]
    pub cpu_features: BTreeSet<String>,
    /// Bandwidth of the migration link from the VM's current host to this
    /// host, in MiB/s; at least 1.
    pub link_bandwidth_mib_s: u64,
    /// Free-form labels: typically the groups of VMs the host already runs
    /// (`group:db`) and its failure domains (`rack:r1`). Matched against the
    /// VM's anti-affinity labels.
    #[serde(default)]
    pub labels: BTreeSet<String>,
    /// The host is in maintenance and must not receive VMs. Default false.
    #[serde(default)]
    pub maintenance: bool,
    /// The endpoint of the host's capacity agent (`refvmm agent`), e.g.
    /// `tcp:10.0.0.4:7070`: refvmm asks it for live facts and uses this
    /// entry's values only when it does not answer. Placement itself
    /// ignores it. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

/// The VM to migrate.
///
/// JSON example (optional fields shown with their defaults):
///
/// ```json
/// {
///   "name": "",
///   "memory_mib": 8192,
///   "vcpus": 4,
///   "required_cpu_features": [],
///   "dirty_rate_mib_s": 150,
///   "anti_affinity": [],
///   "current_host": "alpha"
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// VM name; informational only. Default empty.
    #[serde(default)]
    pub name: String,
    /// Guest memory, in MiB; at least 1.
    pub memory_mib: u64,
    /// Number of vCPUs; at least 1.
    pub vcpus: u32,
    /// CPU features the guest needs; a host must offer all of them.
    #[serde(default)]
    pub required_cpu_features: BTreeSet<String>,
    /// Estimated rate at which the guest dirties memory, in MiB/s (0 for an
    /// idle guest).
    pub dirty_rate_mib_s: u64,
    /// Labels the VM must not share a host with: a host carrying any of them
    /// is excluded.
    #[serde(default)]
    pub anti_affinity: BTreeSet<String>,
    /// Name of the host the VM runs on now (never chosen as destination).
    pub current_host: String,
}

/// A host that failed at least one filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Excluded {
    /// Host name.
    pub name: String,
    /// Every filter it failed, in filter order (never empty).
    pub reasons: Vec<Reason>,
}

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
