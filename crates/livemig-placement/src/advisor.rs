//! The optional "should we rebalance?" advisor.
//!
//! This is a different question from [`choose_destination`]: nobody asked
//! for a migration, so "stay" is a legitimate answer. It uses the same
//! filters and score, and says "move" when the VM's current host is in
//! maintenance, or when moving the VM to the best-ranked host would lower the
//! cluster's memory imbalance by at least
//! [`RebalancePolicy::min_imbalance_reduction`].
//!
//! [`choose_destination`]: crate::choose_destination

use serde::{Deserialize, Serialize};

use crate::config::PlacementConfig;
use crate::engine::{decide, evaluate, Decision};
use crate::error::PlacementError;
use crate::model::{Host, Vm};

/// When the advisor recommends a move.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RebalancePolicy {
    /// Smallest drop of the cluster's memory imbalance (standard deviation
    /// of utilisation, `0.0 ..= 0.5`) worth a migration (default 0.02).
    pub min_imbalance_reduction: f64,
}

impl Default for RebalancePolicy {
    fn default() -> Self {
        RebalancePolicy {
            min_imbalance_reduction: 0.02,
        }
    }
}

/// The advisor's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "advice", rename_all = "snake_case")]
pub enum Advice {
    /// Leave the VM where it is.
    Stay {
        /// Why.
        reason: String,
    },
    /// Migrate the VM to `decision.chosen`.
    Move {
        /// Why.
        reason: String,
        /// The destination and its explanation.
        decision: Box<Decision>,
    },
}

/// Advises whether to move `vm` at all. See the module documentation.
pub fn advise_rebalance(
    hosts: &[Host],
    vm: &Vm,
    config: &PlacementConfig,
    policy: &RebalancePolicy,
) -> Result<Advice, PlacementError> {
    let min = policy.min_imbalance_reduction;
    if !(min.is_finite() && min >= 0.0) {
        return Err(crate::error::ValidationError {
            subject: "rebalance policy".to_string(),
            field: "min_imbalance_reduction".to_string(),
            problem: format!("must be a finite number >= 0, got {min}"),
        }
        .into());
    }
    let evaluation = evaluate(hosts, vm, config)?;
    let now = evaluation.cluster_imbalance_now;
    let in_maintenance = hosts
        .iter()
        .any(|h| h.name == vm.current_host && h.maintenance);
    let decision = match decide(evaluation, vm) {
        Ok(d) => d,
        Err(e @ PlacementError::NoEligibleHost { .. })
        | Err(e @ PlacementError::NoHosts { .. }) => {
            return Ok(Advice::Stay {
                reason: e.to_string(),
            })
        }
        Err(e) => return Err(e),
    };
    let after = decision.chosen.facts.cluster_imbalance_after;
    if in_maintenance {
        return Ok(Advice::Move {
            reason: format!("the current host `{}` is in maintenance", vm.current_host),
            decision: Box::new(decision),
        });
    }
    let reduction = now - after;
    if reduction >= min {
        Ok(Advice::Move {
            reason: format!(
                "moving to `{}` lowers the memory imbalance from {now:.4} to {after:.4} (by at least {min})",
                decision.chosen.name
            ),
            decision: Box::new(decision),
        })
    } else {
        Ok(Advice::Stay {
            reason: format!(
                "the best move (to `{}`) would change the memory imbalance from {now:.4} to {after:.4}, less than the {min} reduction worth a migration",
                decision.chosen.name
            ),
        })
    }
}
