//! # livemig-placement — choose a destination host, and say why
//!
//! Given the candidate [`Host`]s and the [`Vm`] to migrate, placement runs
//! in three explainable steps:
//!
//! 1. **Filter** ([`filter`]): a host that fails any filter is out, with every
//!    reason ([`Reason`]): it is the current host, it is in maintenance, it
//!    lacks free memory for the VM plus a headroom, the VM's vCPUs would
//!    exceed the overcommit ratio, it lacks a required CPU feature, or it
//!    carries an anti-affinity label.
//! 2. **Score** ([`score`]): each remaining host gets four terms in
//!    `0.0 ..= 1.0` — free memory after placement, CPU headroom after
//!    placement, estimated migration time, cluster balance after the move —
//!    combined with configurable weights ([`Weights`]) into a score.
//! 3. **Rank**: by score (rounded to 6 decimals) descending; equal scores by
//!    host name ascending (byte order).
//!
//! [`choose_destination`] answers an explicit request: it returns a
//! [`Decision`] (a chosen host plus the full ranking and exclusions) or an
//! error; when no host qualifies, [`PlacementError::NoEligibleHost`] lists
//! every host and why it was excluded. It never answers "stay". The separate
//! [`advise_rebalance`] may.
//!
//! Everything is deterministic: the same hosts (in any order), VM and
//! configuration give the same result.
//!
//! ```
//! use livemig_placement::{choose_destination, parse_hosts, parse_vm, PlacementConfig};
//!
//! let hosts = parse_hosts(r#"[
//!   {"name": "a", "migration_address": "tcp:10.0.0.1:4444", "memory_total_mib": 16384,
//!    "memory_free_mib": 2048, "cpus": 8, "cpu_load": 1.0, "link_bandwidth_mib_s": 1000},
//!   {"name": "b", "migration_address": "tcp:10.0.0.2:4444", "memory_total_mib": 16384,
//!    "memory_free_mib": 12288, "cpus": 8, "cpu_load": 2.0, "link_bandwidth_mib_s": 1000}
//! ]"#, "hosts").unwrap();
//! let vm = parse_vm(r#"{"memory_mib": 4096, "vcpus": 2, "dirty_rate_mib_s": 50,
//!                      "current_host": "a"}"#, "vm").unwrap();
//! let d = choose_destination(&hosts, &vm, &PlacementConfig::default()).unwrap();
//! assert_eq!(d.chosen.name, "b");
//! assert_eq!(d.evaluation.excluded[0].reasons[0].kind(), "current_host");
//! ```
#![deny(missing_docs)]

pub mod advisor;
pub mod config;
pub mod engine;
pub mod error;
pub mod filter;
pub mod input;
pub mod model;
pub mod predict;
pub mod report;
pub mod score;

pub use advisor::{advise_rebalance, Advice, RebalancePolicy};
pub use config::{PlacementConfig, Weights};
pub use engine::{choose_destination, evaluate, Candidate, Decision, Evaluation, Excluded};
pub use error::{InputError, PlacementError, ValidationError};
pub use filter::Reason;
pub use input::{load_hosts, load_vm, parse_hosts, parse_vm, validate_hosts, validate_vm};
pub use model::{Host, Vm};
pub use predict::{predict, PredictLimits, Prediction};
pub use score::{Facts, Term, Terms};
