//! Tunables: filter thresholds and score weights.

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;

/// Relative weights of the four score terms.
///
/// Weights are relative: the score divides by their sum, so `{1, 1, 1, 1}`
/// and `{0.25, 0.25, 0.25, 0.25}` rank identically and the score always lies
/// in `0.0 ..= 1.0`. A weight of 0 switches a term off. The defaults sum to 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Weights {
    /// Weight of the free-memory-after-placement term (default 0.3).
    pub free_memory: f64,
    /// Weight of the CPU-headroom-after-placement term (default 0.3).
    pub cpu_headroom: f64,
    /// Weight of the estimated-migration-time term (default 0.2).
    pub migration_time: f64,
    /// Weight of the cluster-balance-after-the-move term (default 0.2).
    pub balance: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            free_memory: 0.3,
            cpu_headroom: 0.3,
            migration_time: 0.2,
            balance: 0.2,
        }
    }
}

impl Weights {
    /// The sum of the four weights.
    pub fn sum(&self) -> f64 {
        self.free_memory + self.cpu_headroom + self.migration_time + self.balance
    }
}

/// Placement configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementConfig {
    /// Memory that must stay free on the destination after the VM lands, in
    /// MiB (default 1024). The memory filter requires
    /// `memory_free_mib >= vm.memory_mib + memory_headroom_mib`.
    pub memory_headroom_mib: u64,
    /// Most vCPUs per physical CPU (default 4.0). The overcommit filter
    /// requires `vcpus_allocated + vm.vcpus <= cpus * vcpu_overcommit_ratio`.
    pub vcpu_overcommit_ratio: f64,
    /// Migration time, in seconds, that scores 0.5 on the migration-time
    /// term (default 60). The term is `t_ref / (t_ref + t)`.
    pub migration_time_reference_s: f64,
    /// Score weights.
    pub weights: Weights,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig {
            memory_headroom_mib: 1024,
            vcpu_overcommit_ratio: 4.0,
            migration_time_reference_s: 60.0,
            weights: Weights::default(),
        }
    }
}

fn config_error(field: &str, problem: String) -> ValidationError {
    ValidationError {
        subject: "config".to_string(),
        field: field.to_string(),
        problem,
    }
}

impl PlacementConfig {
    /// Checks that every number is usable: the ratio and the reference time
    /// are finite and positive, the weights finite and non-negative with a
    /// positive sum.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let r = self.vcpu_overcommit_ratio;
        if !(r.is_finite() && r > 0.0) {
            return Err(config_error(
                "vcpu_overcommit_ratio",
                format!("must be a finite number greater than 0, got {r}"),
            ));
        }
        let t = self.migration_time_reference_s;
        if !(t.is_finite() && t > 0.0) {
            return Err(config_error(
                "migration_time_reference_s",
                format!("must be a finite number greater than 0, got {t}"),
            ));
        }
        let w = &self.weights;
        for (field, v) in [
            ("weights.free_memory", w.free_memory),
            ("weights.cpu_headroom", w.cpu_headroom),
            ("weights.migration_time", w.migration_time),
            ("weights.balance", w.balance),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(config_error(
                    field,
                    format!("must be a finite number >= 0, got {v}"),
                ));
            }
        }
        let sum = w.sum();
        if !(sum.is_finite() && sum > 0.0) {
            return Err(config_error(
                "weights",
                format!("must have a finite sum greater than 0, got {sum}"),
            ));
        }
        Ok(())
    }
}
