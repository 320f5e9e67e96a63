//! Filter, score, rank: [`evaluate`] and [`choose_destination`].

use serde::{Deserialize, Serialize};

use crate::config::PlacementConfig;
use crate::error::PlacementError;
use crate::filter::check;
use crate::input::{validate_hosts, validate_vm};
pub use crate::model::Excluded;
use crate::model::{Host, Vm};
use crate::score::{score, Cluster, Facts, Terms};

/// An eligible host, scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    /// Position in the ranking, 1 = best.
    pub rank: usize,
    /// Host name.
    pub name: String,
    /// The host's migration address.
    pub migration_address: String,
    /// The score, `0.0 ..= 1.0`, rounded to 6 decimals; this rounded value
    /// is what the ranking compares.
    pub score: f64,
    /// The score broken down into its terms.
    pub terms: Terms,
    /// The quantities behind the terms.
    pub facts: Facts,
}

/// The full explanation: every host is either ranked or excluded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evaluation {
    /// The VM's name.
    pub vm: String,
    /// The host the VM runs on now.
    pub current_host: String,
    /// The configuration used.
    pub config: PlacementConfig,
    /// Standard deviation of memory utilisation over all hosts now.
    pub cluster_imbalance_now: f64,
    /// Eligible hosts, best first: by score (6 decimals) descending, then
    /// by name ascending (byte order).
    pub ranking: Vec<Candidate>,
    /// Hosts that failed a filter, by name ascending.
    pub excluded: Vec<Excluded>,
}

/// The answer to an explicit request: a chosen host, always.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The chosen host (the first of the ranking).
    pub chosen: Candidate,
    /// How it was chosen.
    #[serde(flatten)]
    pub evaluation: Evaluation,
}

fn vm_label(vm: &Vm) -> String {
    if vm.name.is_empty() {
        "the unnamed VM".to_string()
    } else {
        format!("VM `{}`", vm.name)
    }
}

/// Runs the filters on every host and scores and ranks the eligible ones.
///
/// Never fails for lack of an eligible host (the ranking is then empty);
/// fails only on invalid input. The result does not depend on the order of
/// `hosts`: they are processed in name order.
pub fn evaluate(
    hosts: &[Host],
    vm: &Vm,
    config: &PlacementConfig,
) -> Result<Evaluation, PlacementError> {
    config.validate()?;
    validate_vm(vm)?;
    validate_hosts(hosts)?;

    let mut order: Vec<&Host> = hosts.iter().collect();
    order.sort_unstable_by(|a, b| a.name.cmp(&b.name));

    let source = order
        .binary_search_by(|h| h.name.as_str().cmp(vm.current_host.as_str()))
        .ok()
        .and_then(|i| order.get(i).copied());
    let (cluster, imbalance_now) = Cluster::new(order.iter().copied(), vm, source);

    let mut ranked: Vec<(u64, Candidate)> = Vec::new();
    let mut excluded = Vec::new();
    for h in &order {
        let reasons = check(h, vm, config);
        if !reasons.is_empty() {
            excluded.push(Excluded {
                name: h.name.clone(),
                reasons,
            });
            continue;
        }
        let (terms, facts, m) = score(h, vm, config, &cluster);
        ranked.push((
            m,
            Candidate {
                rank: 0,
                name: h.name.clone(),
                migration_address: h.migration_address.clone(),
                score: m as f64 / 1e6,
                terms,
                facts,
            },
        ));
    }
    // Higher score first; equal (6-decimal) scores: name ascending. Names
    // are unique, so this is a total order and the sort is deterministic.
    ranked.sort_by(|(ma, a), (mb, b)| mb.cmp(ma).then_with(|| a.name.cmp(&b.name)));
    let ranking = ranked
        .into_iter()
        .enumerate()
        .map(|(i, (_, mut c))| {
            c.rank = i + 1;
            c
        })
        .collect();

    Ok(Evaluation {
        vm: vm.name.clone(),
        current_host: vm.current_host.clone(),
        config: *config,
        cluster_imbalance_now: imbalance_now,
        ranking,
        excluded,
    })
}

/// Chooses a destination for an explicit migration request.
///
/// Returns the best-ranked eligible host, or an error: never "no migration
/// needed". When no host is eligible the error is
/// [`PlacementError::NoEligibleHost`], which lists every host with every
/// filter it failed.
pub fn choose_destination(
    hosts: &[Host],
    vm: &Vm,
    config: &PlacementConfig,
) -> Result<Decision, PlacementError> {
    let evaluation = evaluate(hosts, vm, config)?;
    decide(evaluation, vm)
}

pub(crate) fn decide(evaluation: Evaluation, vm: &Vm) -> Result<Decision, PlacementError> {
    match evaluation.ranking.first() {
        Some(best) => Ok(Decision {
            chosen: best.clone(),
            evaluation,
        }),
        None if evaluation.excluded.is_empty() => Err(PlacementError::NoHosts { vm: vm_label(vm) }),
        None => Err(PlacementError::NoEligibleHost {
            vm: vm_label(vm),
            excluded: evaluation.excluded,
        }),
    }
}
