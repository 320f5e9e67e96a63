//! Bad input is refused with an error that names the file and the field.

use livemig_placement::{parse_hosts, parse_vm, InputError};

const HOST: &str = r#"{
    "name": "alpha",
    "migration_address": "tcp:10.0.0.1:4444",
    "memory_total_mib": 16384,
    "memory_free_mib": 8192,
    "cpus": 8,
    "cpu_load": 1.5,
    "link_bandwidth_mib_s": 1000
}"#;

const VM: &str = r#"{"memory_mib": 1024, "vcpus": 1, "dirty_rate_mib_s": 10, "current_host": "x"}"#;

/// `[HOST, <second>]`, the second host being HOST with `from` replaced.
fn hosts_with(from: &str, to: &str) -> String {
    let second = HOST
        .replace("alpha", "bravo")
        .replace("10.0.0.1", "10.0.0.2");
    assert!(second.contains(from), "{from}");
    format!("[{HOST}, {}]", second.replacen(from, to, 1))
}

fn host_error(from: &str, to: &str) -> (String, Option<String>) {
    match parse_hosts(&hosts_with(from, to), "hosts.json") {
        Ok(_) => panic!("{from} -> {to}: accepted"),
        Err(e) => (e.to_string(), e.field().map(str::to_string)),
    }
}

#[test]
fn valid_input_parses() {
    let hosts = parse_hosts(&format!("[{HOST}]"), "hosts.json").expect("valid");
    assert_eq!(hosts[0].name, "alpha");
    assert_eq!(hosts[0].vcpus_allocated, 0);
    assert!(!hosts[0].maintenance);
    let vm = parse_vm(VM, "vm.json").expect("valid");
    assert_eq!(vm.memory_mib, 1024);
}

#[test]
fn negative_memory_names_file_field_and_host() {
    let (msg, field) = host_error("\"memory_free_mib\": 8192", "\"memory_free_mib\": -5");
    assert_eq!(field.as_deref(), Some("hosts[1].memory_free_mib"));
    assert!(msg.starts_with("hosts.json: field `hosts[1].memory_free_mib` (host `bravo`): invalid value: integer `-5`, expected u64"), "{msg}");
}

#[test]
fn missing_field_is_named() {
    let (msg, field) = host_error("\"cpus\": 8,", "");
    assert_eq!(field.as_deref(), Some("hosts[1].cpus"));
    assert!(msg.contains("missing field `cpus`"), "{msg}");
    assert!(msg.contains("(host `bravo`)"), "{msg}");
}

#[test]
fn unknown_key_is_named() {
    let (msg, field) = host_error("\"cpus\": 8,", "\"cpus\": 8, \"colour\": \"red\",");
    assert_eq!(field.as_deref(), Some("hosts[1].colour"));
    assert!(msg.contains("unknown field `colour`"), "{msg}");
}

#[test]
fn wrong_type_is_named() {
    let (msg, field) = host_error("\"cpus\": 8", "\"cpus\": \"eight\"");
    assert_eq!(field.as_deref(), Some("hosts[1].cpus"));
    assert!(msg.contains("invalid type: string \"eight\""), "{msg}");
}

#[test]
fn semantic_errors_name_host_and_field() {
    let cases = [
        (
            "\"memory_free_mib\": 8192",
            "\"memory_free_mib\": 20000",
            "memory_free_mib",
            "exceeds memory_total_mib",
        ),
        (
            "\"memory_total_mib\": 16384",
            "\"memory_total_mib\": 0",
            "memory_total_mib",
            "at least 1",
        ),
        ("\"cpus\": 8", "\"cpus\": 0", "cpus", "at least 1"),
        (
            "\"cpu_load\": 1.5",
            "\"cpu_load\": -0.5",
            "cpu_load",
            ">= 0",
        ),
        (
            "\"link_bandwidth_mib_s\": 1000",
            "\"link_bandwidth_mib_s\": 0",
            "link_bandwidth_mib_s",
            "at least 1",
        ),
        (
            "\"migration_address\": \"tcp:10.0.0.2:4444\"",
            "\"migration_address\": \"\"",
            "migration_address",
            "empty",
        ),
        (
            "\"name\": \"bravo\"",
            "\"name\": \"alpha\"",
            "name",
            "duplicate host name (also hosts[0])",
        ),
    ];
    for (from, to, want_field, want_text) in cases {
        let (msg, field) = host_error(from, to);
        assert_eq!(field.as_deref(), Some(want_field), "{msg}");
        assert!(msg.starts_with("hosts.json: host `"), "{msg}");
        assert!(msg.contains("(hosts[1])"), "{msg}");
        assert!(msg.contains(&format!("field `{want_field}`")), "{msg}");
        assert!(msg.contains(want_text), "{msg}");
    }
}

#[test]
fn vm_errors_are_named() {
    let cases = [
        (VM.replace("1024", "-1"), "vm.memory_mib", "expected u64"),
        (
            VM.replace("\"vcpus\": 1, ", ""),
            "vm.vcpus",
            "missing field `vcpus`",
        ),
        (
            VM.replace("}", ", \"mem\": 3}"),
            "vm.mem",
            "unknown field `mem`",
        ),
        (
            VM.replace("\"vcpus\": 1", "\"vcpus\": 0"),
            "vcpus",
            "at least 1",
        ),
        (VM.replace("1024", "0"), "memory_mib", "at least 1"),
        (
            VM.replace("\"x\"", "\"\""),
            "current_host",
            "must not be empty",
        ),
    ];
    for (text, want_field, want_text) in cases {
        let e = parse_vm(&text, "vm.json").expect_err(&text);
        let msg = e.to_string();
        assert_eq!(e.field(), Some(want_field), "{msg}");
        assert!(msg.starts_with("vm.json: "), "{msg}");
        assert!(msg.contains(want_text), "{msg}");
    }
}

#[test]
fn syntax_errors_and_trailing_garbage_name_the_file() {
    for text in ["[", "[{]", "{}", "[] []", "nonsense"] {
        let e = parse_hosts(text, "hosts.json").expect_err(text);
        assert!(e.to_string().starts_with("hosts.json: "), "{e}");
        assert!(matches!(e, InputError::Parse { .. }), "{e:?}");
    }
}

#[test]
fn unreadable_file_is_named() {
    let e = livemig_placement::load_hosts(std::path::Path::new("/nonexistent/hosts.json"))
        .expect_err("no such file");
    assert!(
        e.to_string()
            .starts_with("/nonexistent/hosts.json: cannot read"),
        "{e}"
    );
}
