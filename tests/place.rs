//! `refvmm place`: the choice and its explanation, and bad input → exit 2
//! naming the field. No KVM needed.

use std::process::Command;

use livemig_suite::harness::{refvmm_path, scratch_dir};

const DATA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/crates/livemig-placement/examples-data"
);

fn place(hosts: &str, vm: &str, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(refvmm_path())
        .args(["place", "--hosts", hosts, "--vm", vm])
        .args(extra)
        .output()
        .expect("run refvmm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn place_chooses_and_explains() {
    let (code, out, err) = place(
        &format!("{DATA}/hosts.json"),
        &format!("{DATA}/vm.json"),
        &["--explain"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("chosen: delta -> tcp:10.0.0.4:4444"),
        "{out}"
    );
    // Every host is explained, the excluded ones with their reason.
    for h in ["alpha", "bravo", "delta"] {
        assert!(out.contains(h), "{h} missing from:\n{out}");
    }
    assert!(out.contains("memory"), "{out}");
    let (code, out, _) = place(
        &format!("{DATA}/hosts.json"),
        &format!("{DATA}/vm.json"),
        &["--json"],
    );
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON output");
    assert!(out.contains("delta"), "{v}");
}

#[test]
fn bad_placement_input_names_the_field() {
    let dir = scratch_dir("place");
    let hosts = std::fs::read_to_string(format!("{DATA}/hosts.json")).unwrap();
    assert!(hosts.contains("6144"), "sample data changed");
    let bad = dir.join("hosts.json");
    std::fs::write(&bad, hosts.replacen("6144", "-5", 1)).unwrap();
    let (code, _, err) = place(&bad.to_string_lossy(), &format!("{DATA}/vm.json"), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("memory_free_mib") && !err.contains("panicked"),
        "{err}"
    );
    let (code, _, err) = place("/nonexistent/hosts.json", &format!("{DATA}/vm.json"), &[]);
    assert_eq!(code, 2, "{err}");
    let _ = std::fs::remove_dir_all(dir);
}
