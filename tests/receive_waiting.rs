//! `refvmm receive` serves its API socket while it waits for a migration
//! (an operator can ask what it is doing and stop it, as with any VMM),
//! not only once a guest has arrived. Needs /dev/kvm (skipped loudly
//! where absent).

mod common;

use std::time::Duration;

use livemig_suite::harness::{api_request, migrate, scratch_dir, start_destination, start_source};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// While waiting: `status` says so at once; a request that needs the
/// guest waits for it and is answered by the VMM once it runs the guest.
#[test]
fn a_waiting_receive_answers_status_and_holds_other_requests_for_the_guest() {
    let Some(_kvm) = common::kvm_or_skip("a_waiting_receive_answers_status") else {
        return;
    };
    let dir = scratch_dir("rx-wait");
    let (dst, ep) = start_destination(&dir, "dst", &[]).unwrap();
    let st = api_request(&dst.api, &json!({"cmd": "status"}), |_| {})
        .unwrap_or_else(|e| panic!("no API while waiting: {e}\n{}", dst.stderr()));
    assert_eq!(st["result"], "ok", "{st}");
    assert_eq!(st["migration"], "waiting", "{st}");
    assert_eq!(st["running"], false, "{st}");
    assert_eq!(st["pid"], json!(dst.pid()), "{st}");
    assert_eq!(st["listen"], json!(ep), "the endpoint bound: {st}");
    // No outgoing migration to report or cancel: answered at once.
    let ms = api_request(&dst.api, &json!({"cmd": "migrate-status"}), |_| {}).unwrap();
    assert_eq!(ms["status"], "none", "{ms}");
    let mc = api_request(&dst.api, &json!({"cmd": "migrate-cancel"}), |_| {}).unwrap();
    assert_eq!(mc["result"], "error", "{mc}");
    // A request for the guest's memory, asked before the guest is here.
    let api = dst.api.clone();
    let held =
        std::thread::spawn(move || api_request(&api, &json!({"cmd": "memory-hash"}), |_| {}));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!held.is_finished(), "answered before the guest arrived");
    let mut src = start_source(&dir, "src", "256M", 1, "hb=1000").unwrap();
    src.wait_ready(T).unwrap();
    let report = migrate(&src, &ep, json!({})).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report["status"], "completed", "{report}");
    let r = held.join().unwrap().unwrap();
    assert_eq!(r["result"], "ok", "{r}");
    assert!(
        r["regions"].as_array().is_some_and(|a| !a.is_empty()),
        "{r}"
    );
    let st = api_request(&dst.api, &json!({"cmd": "status"}), |_| {}).unwrap();
    assert_eq!(st["running"], true, "{st}");
    assert_eq!(st["migration"], "idle", "{st}");
    let _ = api_request(&dst.api, &json!({"cmd": "quit"}), |_| {});
    let _ = src.wait_exit(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

/// While a migration arrives, the destination's `migrate-status` follows
/// it: `receiving`, the pre-copy rounds the source ended and the bytes
/// read by then, growing (before, it waited for the guest: an operator of
/// the destination saw nothing until the end).
#[test]
fn a_receive_reports_the_migration_arriving() {
    let Some(_kvm) = common::kvm_or_skip("a_receive_reports_the_migration_arriving") else {
        return;
    };
    let (report, _, postcopy) = watch_arrival("rx-progress", json!({}), None);
    assert!(report["postcopy"].is_null(), "{report}");
    assert!(postcopy.is_empty(), "{postcopy:?}");
}

/// The same for a source that offers post-copy (here
/// `--postcopy-on-request`; `--postcopy-after-rounds N` and
/// `--postcopy-auto` offer it alike): refvmm's reception may then switch to
/// post-copy, and until the switch it reports the rounds and bytes as a
/// pre-copy reception does (before, `round`, `total-time` and `ram` stayed
/// null throughout). The test asks for the switch (`migrate-postcopy`) once
/// the destination has reported two rounds. From the resume on, until
/// every page is in, the destination answers `postcopy-active` with the
/// pages still missing and the bytes growing (before, it kept answering
/// `receiving` with the last round's bytes). The guest writes faster than
/// the 16 MiB/s cap lets pages through, so much of its working set is
/// still missing at the switch: the push takes about a second, and the
/// destination is asked every 20 ms.
#[test]
fn a_receive_reports_a_migration_that_may_switch_to_postcopy() {
    let Some(_kvm) =
        common::kvm_or_skip("a_receive_reports_a_migration_that_may_switch_to_postcopy")
    else {
        return;
    };
    // A downtime limit pre-copy cannot meet: it runs rounds until asked.
    let opts = json!({"postcopy_on_request": true, "downtime_limit_ms": 1});
    let (report, rounds, postcopy) = watch_arrival("rx-progress-pc", opts, Some(2));
    let pc = &report["postcopy"];
    assert!(
        pc["reason"]
            .as_str()
            .is_some_and(|r| r.contains("requested")),
        "{report}"
    );
    assert!(
        pc["rounds_before"].as_u64().is_some_and(|n| n >= 2),
        "{report}"
    );
    // Two rounds were seen before the switch, and the bytes grew.
    let (first, last) = (rounds[0], rounds[rounds.len() - 1]);
    assert!(last.0 > first.0 && last.1 > first.1, "{rounds:?}");
    // The guest ran here while pages were missing, and they arrived.
    assert!(
        !postcopy.is_empty(),
        "never answered postcopy-active; rounds seen: {rounds:?}"
    );
    // The round is the last pre-copy round (one seen, or one after it).
    assert!(
        postcopy
            .iter()
            .all(|p| p.0 == postcopy[0].0 && p.0 >= last.0),
        "{rounds:?} then {postcopy:?}"
    );
    assert!(postcopy[0].1 >= last.1, "{rounds:?} then {postcopy:?}");
    assert!(
        postcopy
            .windows(2)
            .all(|w| w[1].1 >= w[0].1 && w[1].2 <= w[0].2),
        "bytes went back or missing pages grew: {postcopy:?}"
    );
    eprintln!("(round, bytes, missing pages) seen in post-copy: {postcopy:?}");
}

/// A `postcopy-active` answer of the destination: the round, the bytes
/// read and the pages still missing.
type Postcopy = (u64, u64, u64);

/// Migrates a guest that keeps writing, capped at 16 MiB/s, from a new
/// source to a new destination with `opts` (the API `migrate` request's
/// fields), asking the destination's `migrate-status` every 20 ms while it
/// arrives; with `switch_after`, asks the source for post-copy once the
/// destination has reported that many different rounds. Checks every
/// `receiving` answer and returns the source's report, the (round, bytes)
/// pairs seen, which never go back, round 0 carrying the working set, and
/// the (round, bytes, missing pages) of the `postcopy-active` answers,
/// which come after every `receiving` one.
fn watch_arrival(
    name: &str,
    opts: serde_json::Value,
    switch_after: Option<usize>,
) -> (serde_json::Value, Vec<(u64, u64)>, Vec<Postcopy>) {
    let dir = scratch_dir(name);
    let (dst, ep) = start_destination(&dir, "dst", &[]).unwrap();
    let mut src = start_source(&dir, "src", "256M", 1, "ws=32 rate=8 hb=1000").unwrap();
    src.wait_ready(T).unwrap();
    // Every page of the working set written once (the guest's `T` lines).
    src.wait_pages_written(32 * 256, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    // Capped at 16 MiB/s: round 0 (the 32 MiB working set) takes about two
    // seconds, and each later round what the guest keeps writing.
    let mut req = json!({"max_bandwidth_mib": 16});
    if let (Some(r), Some(more)) = (req.as_object_mut(), opts.as_object()) {
        r.extend(more.clone());
    }
    let going = std::thread::scope(|scope| {
        let m = scope.spawn(|| migrate(&src, &ep, req));
        let mut seen = Vec::new();
        let mut rounds_seen = std::collections::BTreeSet::new();
        let mut switch_after = switch_after;
        while !m.is_finished() {
            if let Ok(r) = api_request(&dst.api, &json!({"cmd": "migrate-status"}), |_| {}) {
                if r["status"] == "receiving" || r["status"] == "postcopy-active" {
                    rounds_seen.extend(r["round"].as_u64());
                    seen.push(r);
                }
            }
            if switch_after.is_some_and(|n| rounds_seen.len() >= n) {
                switch_after = None;
                let r = api_request(&src.api, &json!({"cmd": "migrate-postcopy"}), |_| {});
                let r = r.unwrap_or_else(|e| panic!("migrate-postcopy: {e}"));
                assert_eq!(r["result"], "ok", "migrate-postcopy: {r}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let report = m.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
        (report, seen)
    });
    let (report, seen) = going;
    assert_eq!(report["status"], "completed", "{report}");
    assert!(
        !seen.is_empty(),
        "never answered receiving while it arrived"
    );
    // Until the destination built its VM (the engine's `Accepted`) it
    // knows nothing of the migration yet: `total-time` and `ram` are null.
    for r in &seen {
        assert_eq!(r["result"], "ok", "{r}");
        assert_eq!(r["direction"], "incoming", "{r}");
        if r["total-time"].is_null() {
            assert!(r["ram"]["total"].is_null() && r["round"].is_null(), "{r}");
        } else {
            assert_eq!(r["ram"]["total"], json!(256u64 << 20), "{r}");
        }
    }
    let active = seen
        .iter()
        .position(|r| r["status"] == "postcopy-active")
        .unwrap_or(seen.len());
    let (seen, active) = seen.split_at(active);
    let postcopy: Vec<Postcopy> = active
        .iter()
        .map(|r| {
            assert_eq!(
                r["status"], "postcopy-active",
                "receiving after postcopy-active: {r}"
            );
            let n = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("{r}"));
            let missing = &r["postcopy"]["missing-pages"];
            (n(&r["round"]), n(&r["ram"]["transferred"]), n(missing))
        })
        .collect();
    let mut rounds: Vec<(u64, u64)> = seen
        .iter()
        .filter_map(|r| Some((r["round"].as_u64()?, r["ram"]["transferred"].as_u64()?)))
        .collect();
    assert!(
        !rounds.is_empty(),
        "no round reported in {} answers; the last: {}",
        seen.len(),
        seen[seen.len() - 1]
    );
    assert!(
        rounds.windows(2).all(|w| w[1] >= w[0]),
        "rounds or bytes went back: {rounds:?}"
    );
    // Round 0 carried the working set the guest wrote.
    assert!(rounds[0].1 >= 16 << 20, "{rounds:?}");
    rounds.dedup();
    eprintln!("{name}: (round, bytes) seen: {rounds:?}");
    let _ = api_request(&dst.api, &json!({"cmd": "quit"}), |_| {});
    let _ = src.wait_exit(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
    (report, rounds, postcopy)
}

/// `quit` while waiting ends the VMM with status 0 and removes its API
/// socket.
#[test]
fn quit_stops_a_waiting_receive_and_removes_its_socket() {
    let Some(_kvm) = common::kvm_or_skip("quit_stops_a_waiting_receive") else {
        return;
    };
    let dir = scratch_dir("rx-quit");
    let (mut dst, _ep) = start_destination(&dir, "dst", &[]).unwrap();
    let r = api_request(&dst.api, &json!({"cmd": "quit"}), |_| {})
        .unwrap_or_else(|e| panic!("no API while waiting: {e}\n{}", dst.stderr()));
    assert_eq!(r["result"], "ok", "{r}");
    let st = dst.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(st.success(), "exit {st}: {}", dst.stderr());
    assert!(!dst.api.exists(), "the API socket is left behind");
    assert!(
        dst.stderr().contains("asked to quit while waiting"),
        "{}",
        dst.stderr()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
