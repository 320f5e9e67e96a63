//! The worked examples of docs/placement.md, and the two named cases:
//! the host with the most free CPU excluded for memory, and a tie broken by
//! the documented rule.

use std::path::PathBuf;

use livemig_placement::report::render_decision;
use livemig_placement::{
    advise_rebalance, choose_destination, evaluate, load_hosts, load_vm, Advice, Host,
    PlacementConfig, PlacementError, RebalancePolicy, Vm,
};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples-data")
        .join(name)
}

fn example() -> (Vec<Host>, Vm) {
    let hosts = load_hosts(&data("hosts.json")).expect("hosts.json");
    let vm = load_vm(&data("vm.json")).expect("vm.json");
    (hosts, vm)
}

fn kinds(d: &livemig_placement::Evaluation, host: &str) -> Vec<&'static str> {
    d.excluded
        .iter()
        .find(|e| e.name == host)
        .map(|e| e.reasons.iter().map(|r| r.kind()).collect())
        .unwrap_or_default()
}

#[test]
fn worked_example_chooses_delta_and_explains_every_host() {
    let (hosts, vm) = example();
    let d = choose_destination(&hosts, &vm, &PlacementConfig::default()).expect("a destination");
    assert_eq!(d.chosen.name, "delta");
    assert_eq!(d.chosen.migration_address, "tcp:10.0.0.4:4444");
    let ranked: Vec<&str> = d
        .evaluation
        .ranking
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(ranked, ["delta", "charlie"]);
    assert_eq!(d.chosen, d.evaluation.ranking[0]);

    let e = &d.evaluation;
    assert_eq!(kinds(e, "alpha"), ["current_host", "anti_affinity"]);
    assert_eq!(kinds(e, "bravo"), ["memory"]);
    assert_eq!(kinds(e, "echo"), ["maintenance"]);
    assert_eq!(kinds(e, "foxtrot"), ["anti_affinity"]);
    assert_eq!(kinds(e, "golf"), ["cpu_features"]);
    assert_eq!(kinds(e, "hotel"), ["vcpu_overcommit"]);
    assert_eq!(e.ranking.len() + e.excluded.len(), hosts.len());
}

#[test]
fn most_free_cpu_but_too_little_memory_is_excluded_for_memory() {
    let (hosts, vm) = example();
    // bravo has by far the most idle CPUs of all hosts...
    let idle = |h: &Host| f64::from(h.cpus) - h.cpu_load;
    let most_idle = hosts
        .iter()
        .max_by(|a, b| idle(a).total_cmp(&idle(b)))
        .expect("hosts");
    assert_eq!(most_idle.name, "bravo");
    // ...but only 6144 MiB free for an 8192 MiB VM.
    let e = evaluate(&hosts, &vm, &PlacementConfig::default()).expect("valid");
    let bravo = e
        .excluded
        .iter()
        .find(|x| x.name == "bravo")
        .expect("excluded");
    assert_eq!(bravo.reasons.len(), 1);
    assert_eq!(bravo.reasons[0].kind(), "memory");
    assert_eq!(
        bravo.reasons[0].to_string(),
        "memory: needs 9216 MiB free (8192 MiB VM + 1024 MiB headroom), has 6144 MiB"
    );
    assert!(e.ranking.iter().all(|c| c.name != "bravo"));
}

#[test]
fn tie_is_broken_by_host_name() {
    let hosts = load_hosts(&data("tie-hosts.json")).expect("tie-hosts.json");
    let vm = load_vm(&data("tie-vm.json")).expect("tie-vm.json");
    // node-b comes first in the file; node-a and node-b are identical.
    assert_eq!(hosts[0].name, "node-b");
    let d = choose_destination(&hosts, &vm, &PlacementConfig::default()).expect("a destination");
    let r = &d.evaluation.ranking;
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].score, r[1].score, "the two hosts must tie");
    assert_eq!(r[0].name, "node-a");
    assert_eq!(r[1].name, "node-b");
    assert_eq!(d.chosen.name, "node-a");
    // The same with the file order reversed.
    let mut rev = hosts.clone();
    rev.reverse();
    let d2 = choose_destination(&rev, &vm, &PlacementConfig::default()).expect("a destination");
    assert_eq!(d2, d);
}

#[test]
fn weights_change_the_answer_in_the_documented_way() {
    let (hosts, vm) = example();
    // Memory only: charlie keeps 57344 of 131072 MiB free (0.4375) against
    // delta's 24576 of 65536 (0.375).
    let mut cfg = PlacementConfig::default();
    cfg.weights.free_memory = 1.0;
    cfg.weights.cpu_headroom = 0.0;
    cfg.weights.migration_time = 0.0;
    cfg.weights.balance = 0.0;
    let d = choose_destination(&hosts, &vm, &cfg).expect("a destination");
    assert_eq!(d.chosen.name, "charlie");
    assert_eq!(d.chosen.score, 0.4375);
}

#[test]
fn no_eligible_host_lists_every_host() {
    let (hosts, mut vm) = example();
    vm.memory_mib = 600_000;
    match choose_destination(&hosts, &vm, &PlacementConfig::default()) {
        Err(PlacementError::NoEligibleHost { excluded, .. }) => {
            let names: Vec<&str> = excluded.iter().map(|e| e.name.as_str()).collect();
            assert_eq!(
                names,
                ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
            );
            assert!(excluded
                .iter()
                .all(|e| e.reasons.iter().any(|r| r.kind() == "memory")));
        }
        other => panic!("expected NoEligibleHost, got {other:?}"),
    }
}

#[test]
fn empty_host_list_is_an_error_not_a_stay() {
    let (_, vm) = example();
    assert!(matches!(
        choose_destination(&[], &vm, &PlacementConfig::default()),
        Err(PlacementError::NoHosts { .. })
    ));
}

#[test]
fn only_the_advisor_may_say_stay() {
    let hosts = load_hosts(&data("tie-hosts.json")).expect("tie-hosts.json");
    let vm = load_vm(&data("tie-vm.json")).expect("tie-vm.json");
    let cfg = PlacementConfig::default();
    // A demanding threshold: the advisor says stay...
    let strict = RebalancePolicy {
        min_imbalance_reduction: 0.4,
    };
    assert!(matches!(
        advise_rebalance(&hosts, &vm, &cfg, &strict),
        Ok(Advice::Stay { .. })
    ));
    // ...the explicit request still gets a host.
    assert!(choose_destination(&hosts, &vm, &cfg).is_ok());
    // node-c is 75% used, the others 25%: moving 4 GiB away balances it.
    match advise_rebalance(&hosts, &vm, &cfg, &RebalancePolicy::default()) {
        Ok(Advice::Move { decision, .. }) => assert_eq!(decision.chosen.name, "node-a"),
        other => panic!("expected Move, got {other:?}"),
    }
}

#[test]
fn advisor_moves_off_a_host_in_maintenance() {
    let mut hosts = load_hosts(&data("tie-hosts.json")).expect("tie-hosts.json");
    let vm = load_vm(&data("tie-vm.json")).expect("tie-vm.json");
    for h in &mut hosts {
        if h.name == "node-c" {
            h.maintenance = true;
        }
    }
    let never = RebalancePolicy {
        min_imbalance_reduction: 1.0,
    };
    assert!(matches!(
        advise_rebalance(&hosts, &vm, &PlacementConfig::default(), &never),
        Ok(Advice::Move { .. })
    ));
}

/// The output shown in docs/placement.md is the real output.
#[test]
fn docs_show_the_real_output() {
    let doc_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/placement.md");
    let doc = std::fs::read_to_string(&doc_path).expect("docs/placement.md");
    let (hosts, vm) = example();
    let d = choose_destination(&hosts, &vm, &PlacementConfig::default()).expect("a destination");
    for explain in [false, true] {
        let text = render_decision(&d, explain);
        assert!(
            doc.contains(&text),
            "docs/placement.md does not show the current output (explain={explain}):\n{text}"
        );
    }
    let hosts = load_hosts(&data("tie-hosts.json")).expect("tie-hosts.json");
    let vm = load_vm(&data("tie-vm.json")).expect("tie-vm.json");
    let d = choose_destination(&hosts, &vm, &PlacementConfig::default()).expect("a destination");
    let text = render_decision(&d, false);
    assert!(doc.contains(&text), "tie example output changed:\n{text}");
}
