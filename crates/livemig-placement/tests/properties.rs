//! Property tests: the placement contract holds for arbitrary clusters.
//!
//! * a chosen (or ranked) host passes every filter — checked against an
//!   independent, naive re-implementation of the filters;
//! * an explicit request never ends without a host unless no host passes,
//!   and then the error lists every host;
//! * the explanation covers every host exactly once;
//! * the result is deterministic and independent of the input order;
//! * the ranking follows the documented order and formula.

use std::collections::BTreeSet;

use livemig_placement::{
    advise_rebalance, choose_destination, evaluate, Advice, Decision, Evaluation, Host,
    PlacementConfig, PlacementError, RebalancePolicy, Vm, Weights,
};
use proptest::prelude::*;
use proptest::sample::subsequence;

const FEATURES: [&str; 4] = ["aes", "avx2", "avx512f", "sse4_2"];
const LABELS: [&str; 4] = ["group:web", "group:db", "rack:r1", "rack:r2"];

fn set(items: Vec<&str>) -> BTreeSet<String> {
    items.into_iter().map(str::to_string).collect()
}

prop_compose! {
    fn host(index: usize)(
        letter in prop::char::range('a', 'z'),
        total in 1u64..=262_144,
        free_permille in 0u64..=1000,
        cpus in 1u32..=128,
        load_tenths in 0u32..=2000,
        vcpus_allocated in 0u32..=600,
        features in subsequence(FEATURES.to_vec(), 0..=4),
        bandwidth in 1u64..=5000,
        labels in subsequence(LABELS.to_vec(), 0..=2),
        maintenance in prop::bool::weighted(0.1),
    ) -> Host {
        Host {
            // Unique (the index) but not sorted (the random letter).
            name: format!("{letter}{index:03}"),
            migration_address: format!("tcp:10.0.{}.{}:4444", index / 256, index % 256),
            memory_total_mib: total,
            memory_free_mib: total * free_permille / 1000,
            cpus,
            cpu_load: f64::from(load_tenths) / 10.0,
            vcpus_allocated,
            cpu_model: String::new(),
            cpu_features: set(features),
            link_bandwidth_mib_s: bandwidth,
            labels: set(labels),
            maintenance,
            agent: None,
        }
    }
}

fn hosts() -> impl Strategy<Value = Vec<Host>> {
    (0usize..40).prop_flat_map(|n| (0..n).map(host).collect::<Vec<_>>())
}

fn vm(hosts: &[Host]) -> impl Strategy<Value = Vm> {
    let names: Vec<String> = hosts
        .iter()
        .map(|h| h.name.clone())
        .chain(std::iter::once("elsewhere".to_string()))
        .collect();
    (
        1u64..=131_072,
        1u32..=64,
        subsequence(FEATURES.to_vec(), 0..=2),
        0u64..=3000,
        subsequence(LABELS.to_vec(), 0..=1),
        prop::sample::select(names),
    )
        .prop_map(|(memory_mib, vcpus, req, dirty, anti, current)| Vm {
            name: "vm".to_string(),
            memory_mib,
            vcpus,
            required_cpu_features: set(req),
            dirty_rate_mib_s: dirty,
            anti_affinity: set(anti),
            current_host: current,
        })
}

fn config() -> impl Strategy<Value = PlacementConfig> {
    (
        0u64..=4096,
        1u32..=80,
        1u32..=600,
        (0u32..=10, 0u32..=10, 0u32..=10, 0u32..=10),
    )
        .prop_map(
            |(headroom, ratio_tenths, tref, (a, b, c, d))| PlacementConfig {
                memory_headroom_mib: headroom,
                vcpu_overcommit_ratio: f64::from(ratio_tenths) / 10.0,
                migration_time_reference_s: f64::from(tref),
                weights: Weights {
                    // +1 on the first keeps the sum positive.
                    free_memory: f64::from(a + 1),
                    cpu_headroom: f64::from(b),
                    migration_time: f64::from(c),
                    balance: f64::from(d),
                },
            },
        )
}

/// Hosts (as generated, and shuffled), a VM and a configuration.
fn scenario() -> impl Strategy<Value = (Vec<Host>, Vec<Host>, Vm, PlacementConfig)> {
    hosts().prop_flat_map(|hs| {
        let shuffled = Just(hs.clone()).prop_shuffle();
        (Just(hs.clone()), shuffled, vm(&hs), config())
    })
}

/// The filters, re-implemented as plainly as possible from the docs.
fn naive_failures(h: &Host, vm: &Vm, c: &PlacementConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    if h.name == vm.current_host {
        out.push("current_host");
    }
    if h.maintenance {
        out.push("maintenance");
    }
    if (h.memory_free_mib as u128) < vm.memory_mib as u128 + c.memory_headroom_mib as u128 {
        out.push("memory");
    }
    if (h.vcpus_allocated as f64 + vm.vcpus as f64) > h.cpus as f64 * c.vcpu_overcommit_ratio {
        out.push("vcpu_overcommit");
    }
    if vm
        .required_cpu_features
        .iter()
        .any(|f| !h.cpu_features.contains(f))
    {
        out.push("cpu_features");
    }
    if vm.anti_affinity.iter().any(|l| h.labels.contains(l)) {
        out.push("anti_affinity");
    }
    out
}

fn host_named<'a>(hosts: &'a [Host], name: &str) -> &'a Host {
    hosts
        .iter()
        .find(|h| h.name == name)
        .expect("the host is in the input")
}

fn check_ranking(e: &Evaluation) {
    for (i, c) in e.ranking.iter().enumerate() {
        assert_eq!(c.rank, i + 1);
        let t = &c.terms;
        let mut wsum = 0.0;
        for term in [t.free_memory, t.cpu_headroom, t.migration_time, t.balance] {
            assert!((0.0..=1.0).contains(&term.value), "{term:?}");
            assert!((term.contribution - term.weight * term.value).abs() < 1e-12);
            wsum += term.weight;
        }
        assert!((wsum - 1.0).abs() < 1e-9, "normalised weights sum to 1");
        assert!((0.0..=1.0).contains(&c.score));
        assert!(
            (c.score - t.sum()).abs() <= 5e-7 + 1e-12,
            "score is the 6-decimal rounding of the sum"
        );
        assert_eq!(c.score, (c.score * 1e6).round() / 1e6);
    }
    for w in e.ranking.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        assert!(
            a.score > b.score || (a.score == b.score && a.name < b.name),
            "order: {} {} before {} {}",
            a.name,
            a.score,
            b.name,
            b.score
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // Failures print the minimal input; no regression files in the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn never_chooses_a_host_that_fails_a_filter((hosts, _, vm, cfg) in scenario()) {
        let e = evaluate(&hosts, &vm, &cfg).expect("generated input is valid");
        for c in &e.ranking {
            let failures = naive_failures(host_named(&hosts, &c.name), &vm, &cfg);
            prop_assert!(failures.is_empty(), "{} ranked but fails {failures:?}", c.name);
            prop_assert_ne!(&c.name, &vm.current_host);
        }
        for x in &e.excluded {
            let kinds: Vec<&str> = x.reasons.iter().map(|r| r.kind()).collect();
            prop_assert_eq!(kinds, naive_failures(host_named(&hosts, &x.name), &vm, &cfg));
        }
        if let Ok(d) = choose_destination(&hosts, &vm, &cfg) {
            prop_assert!(naive_failures(host_named(&hosts, &d.chosen.name), &vm, &cfg).is_empty());
        }
    }

    #[test]
    fn explicit_request_never_stays((hosts, _, vm, cfg) in scenario()) {
        let any_fits = hosts.iter().any(|h| naive_failures(h, &vm, &cfg).is_empty());
        match choose_destination(&hosts, &vm, &cfg) {
            Ok(Decision { chosen, evaluation }) => {
                prop_assert!(any_fits);
                prop_assert_eq!(&chosen, &evaluation.ranking[0]);
                prop_assert_eq!(&host_named(&hosts, &chosen.name).migration_address, &chosen.migration_address);
            }
            Err(PlacementError::NoEligibleHost { excluded, .. }) => {
                prop_assert!(!any_fits);
                let mut listed: Vec<&str> = excluded.iter().map(|x| x.name.as_str()).collect();
                let mut all: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
                listed.sort_unstable();
                all.sort_unstable();
                prop_assert_eq!(listed, all);
                prop_assert!(excluded.iter().all(|x| !x.reasons.is_empty()));
            }
            Err(PlacementError::NoHosts { .. }) => prop_assert!(hosts.is_empty()),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    #[test]
    fn explanation_covers_every_host((hosts, _, vm, cfg) in scenario()) {
        let e = evaluate(&hosts, &vm, &cfg).expect("valid");
        let mut seen: Vec<&str> = e
            .ranking
            .iter()
            .map(|c| c.name.as_str())
            .chain(e.excluded.iter().map(|x| x.name.as_str()))
            .collect();
        let mut all: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
        seen.sort_unstable();
        all.sort_unstable();
        prop_assert_eq!(seen, all);
        prop_assert!(e.excluded.iter().all(|x| !x.reasons.is_empty()));
        prop_assert!(e.excluded.windows(2).all(|w| w[0].name < w[1].name));
    }

    #[test]
    fn deterministic_and_independent_of_input_order((hosts, shuffled, vm, cfg) in scenario()) {
        let a = evaluate(&hosts, &vm, &cfg).expect("valid");
        let b = evaluate(&hosts, &vm, &cfg).expect("valid");
        let c = evaluate(&shuffled, &vm, &cfg).expect("valid");
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(&a, &c);
        prop_assert_eq!(
            choose_destination(&hosts, &vm, &cfg),
            choose_destination(&shuffled, &vm, &cfg)
        );
    }

    #[test]
    fn ranking_follows_the_documented_order((hosts, _, vm, cfg) in scenario()) {
        let e = evaluate(&hosts, &vm, &cfg).expect("valid");
        check_ranking(&e);
    }

    #[test]
    fn decisions_round_trip_through_json((hosts, _, vm, cfg) in scenario()) {
        if let Ok(d) = choose_destination(&hosts, &vm, &cfg) {
            let text = serde_json::to_string(&d).expect("serialize");
            let back: Decision = serde_json::from_str(&text).expect("deserialize");
            // serde_json (without its float_roundtrip feature) may read a
            // long float back one ulp off: compare everything else exactly.
            prop_assert_eq!(&back.chosen.name, &d.chosen.name);
            prop_assert_eq!(&back.evaluation.excluded, &d.evaluation.excluded);
            prop_assert_eq!(back.evaluation.ranking.len(), d.evaluation.ranking.len());
            for (x, y) in back.evaluation.ranking.iter().zip(&d.evaluation.ranking) {
                prop_assert_eq!((x.rank, &x.name, &x.migration_address), (y.rank, &y.name, &y.migration_address));
                prop_assert_eq!(x.score, y.score);
                prop_assert_eq!(x.facts.free_memory_after_mib, y.facts.free_memory_after_mib);
                prop_assert!((x.terms.sum() - y.terms.sum()).abs() < 1e-12);
            }
        }
        let text = serde_json::to_string(&hosts).expect("serialize");
        let back: Vec<Host> = serde_json::from_str(&text).expect("deserialize");
        prop_assert_eq!(back, hosts);
    }

    #[test]
    fn advisor_moves_only_to_eligible_hosts((hosts, _, vm, cfg) in scenario()) {
        match advise_rebalance(&hosts, &vm, &cfg, &RebalancePolicy::default()).expect("valid") {
            Advice::Move { decision, .. } => {
                prop_assert!(naive_failures(host_named(&hosts, &decision.chosen.name), &vm, &cfg).is_empty());
            }
            Advice::Stay { .. } => {}
        }
    }
}

/// 10,000 hosts: the contract still holds (the timing is in the bench).
#[test]
fn ten_thousand_hosts() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |m: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % m
    };
    let hosts: Vec<Host> = (0..10_000)
        .map(|i| {
            let total = 65_536 * (1 + next(4));
            Host {
                name: format!("host-{i:05}"),
                migration_address: format!("tcp:10.{}.{}.1:4444", i / 256, i % 256),
                memory_total_mib: total,
                memory_free_mib: total * next(1001) / 1000,
                cpus: 16 * (1 + next(4) as u32),
                cpu_load: next(640) as f64 / 10.0,
                vcpus_allocated: next(200) as u32,
                cpu_model: String::new(),
                cpu_features: set(vec!["aes", "avx2"]),
                link_bandwidth_mib_s: 500 + next(2000),
                labels: BTreeSet::new(),
                maintenance: next(50) == 0,
                agent: None,
            }
        })
        .collect();
    let vm = Vm {
        name: "big".into(),
        memory_mib: 16_384,
        vcpus: 8,
        required_cpu_features: set(vec!["avx2"]),
        dirty_rate_mib_s: 200,
        anti_affinity: BTreeSet::new(),
        current_host: "host-00000".into(),
    };
    let cfg = PlacementConfig::default();
    let d = choose_destination(&hosts, &vm, &cfg).expect("a destination");
    let e = &d.evaluation;
    assert_eq!(e.ranking.len() + e.excluded.len(), hosts.len());
    assert!(naive_failures(host_named(&hosts, &d.chosen.name), &vm, &cfg).is_empty());
    check_ranking(e);
    let mut rev = hosts.clone();
    rev.reverse();
    assert_eq!(
        choose_destination(&rev, &vm, &cfg).expect("a destination"),
        d
    );
}
