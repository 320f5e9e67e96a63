//! Reading hosts and VMs from JSON, with errors that name the file and field.
//!
//! A hosts document is a JSON array of [`Host`] objects; a VM document is one
//! [`Vm`] object. Parsing rejects unknown keys, missing required fields and
//! wrong types (a negative memory size does not fit the unsigned field), and
//! then [`validate_hosts`] / [`validate_vm`] check what the types cannot:
//! free memory within total, at least one CPU, a finite non-negative load, a
//! non-zero link bandwidth, unique host names.

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;

use crate::error::{InputError, ValidationError};
use crate::model::{Host, Vm};

/// Parses and validates a hosts document (a JSON array of hosts).
///
/// `origin` names the text in errors (usually the file name).
pub fn parse_hosts(text: &str, origin: &str) -> Result<Vec<Host>, InputError> {
    let hosts: Vec<Host> = parse(text, origin, "hosts")?;
    validate_hosts(&hosts).map_err(|source| InputError::Invalid {
        origin: origin.to_string(),
        source,
    })?;
    Ok(hosts)
}

/// Parses and validates a VM document (one JSON object).
///
/// `origin` names the text in errors (usually the file name).
pub fn parse_vm(text: &str, origin: &str) -> Result<Vm, InputError> {
    let vm: Vm = parse(text, origin, "vm")?;
    validate_vm(&vm).map_err(|source| InputError::Invalid {
        origin: origin.to_string(),
        source,
    })?;
    Ok(vm)
}

/// Reads, parses and validates a hosts file.
pub fn load_hosts(path: &Path) -> Result<Vec<Host>, InputError> {
    parse_hosts(&read(path)?, &path.display().to_string())
}

/// Reads, parses and validates a VM file.
pub fn load_vm(path: &Path) -> Result<Vm, InputError> {
    parse_vm(&read(path)?, &path.display().to_string())
}

fn read(path: &Path) -> Result<String, InputError> {
    std::fs::read_to_string(path).map_err(|source| InputError::Read {
        file: path.to_path_buf(),
        source,
    })
}

fn parse<T: DeserializeOwned>(text: &str, origin: &str, root: &str) -> Result<T, InputError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value: T =
        serde_path_to_error::deserialize(&mut de).map_err(|e| path_error(e, text, origin, root))?;
    // Reject trailing content after the document, like serde_json::from_str.
    de.end().map_err(|e| InputError::Parse {
        origin: origin.to_string(),
        path: String::new(),
        host: None,
        message: e.to_string(),
    })?;
    Ok(value)
}

fn path_error(
    e: serde_path_to_error::Error<serde_json::Error>,
    text: &str,
    origin: &str,
    root: &str,
) -> InputError {
    let message = e.inner().to_string();
    let segments: Vec<&Segment> = e.path().iter().collect();
    let syntax = matches!(
        e.inner().classify(),
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof
    );
    if syntax {
        return InputError::Parse {
            origin: origin.to_string(),
            path: String::new(),
            host: None,
            message,
        };
    }
    let mut path = root.to_string();
    for s in &segments {
        match s {
            Segment::Seq { index } => path.push_str(&format!("[{index}]")),
            Segment::Map { key } => {
                path.push('.');
                path.push_str(key);
            }
            Segment::Enum { variant } => {
                path.push('.');
                path.push_str(variant);
            }
            Segment::Unknown => path.push_str(".?"),
        }
    }
    // serde reports a missing field at the enclosing object: name it.
    if let Some(field) = backticked_after(&message, "missing field `") {
        path.push('.');
        path.push_str(field);
    }
    // The host the field belongs to, by its index in the array.
    let host = match segments.first() {
        Some(Segment::Seq { index }) if root == "hosts" => host_name_at(text, *index),
        _ => None,
    };
    InputError::Parse {
        origin: origin.to_string(),
        path,
        host,
        message,
    }
}

/// The text between `prefix` and the next backtick, if `msg` starts with
/// `prefix`.
fn backticked_after<'a>(msg: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = msg.strip_prefix(prefix)?;
    rest.split('`').next()
}

/// The `name` string of element `index` of a JSON array, if any.
fn host_name_at(text: &str, index: usize) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let name = v.get(index)?.get("name")?.as_str()?;
    Some(name.to_string())
}

fn host_subject(host: &Host, index: usize) -> String {
    if host.name.is_empty() {
        format!("hosts[{index}]")
    } else {
        format!("host `{}` (hosts[{index}])", host.name)
    }
}

fn invalid(subject: &str, field: &str, problem: String) -> ValidationError {
    ValidationError {
        subject: subject.to_string(),
        field: field.to_string(),
        problem,
    }
}

/// Checks one host's values.
pub fn validate_host(host: &Host, index: usize) -> Result<(), ValidationError> {
    let subject = host_subject(host, index);
    let s = subject.as_str();
    if host.name.trim().is_empty() {
        return Err(invalid(s, "name", "must not be empty".into()));
    }
    if host.migration_address.trim().is_empty() {
        return Err(invalid(s, "migration_address", "must not be empty".into()));
    }
    if host.memory_total_mib == 0 {
        return Err(invalid(s, "memory_total_mib", "must be at least 1".into()));
    }
    if host.memory_free_mib > host.memory_total_mib {
        return Err(invalid(
            s,
            "memory_free_mib",
            format!(
                "{} MiB exceeds memory_total_mib ({} MiB)",
                host.memory_free_mib, host.memory_total_mib
            ),
        ));
    }
    if host.cpus == 0 {
        return Err(invalid(s, "cpus", "must be at least 1".into()));
    }
    if !(host.cpu_load.is_finite() && host.cpu_load >= 0.0) {
        return Err(invalid(
            s,
            "cpu_load",
            format!("must be a finite number >= 0, got {}", host.cpu_load),
        ));
    }
    if host.link_bandwidth_mib_s == 0 {
        return Err(invalid(
            s,
            "link_bandwidth_mib_s",
            "must be at least 1".into(),
        ));
    }
    Ok(())
}

/// Checks every host and that host names are unique.
pub fn validate_hosts(hosts: &[Host]) -> Result<(), ValidationError> {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, h) in hosts.iter().enumerate() {
        validate_host(h, i)?;
        if let Some(first) = seen.insert(h.name.as_str(), i) {
            return Err(invalid(
                &host_subject(h, i),
                "name",
                format!("duplicate host name (also hosts[{first}])"),
            ));
        }
    }
    Ok(())
}

/// Checks the VM's values.
pub fn validate_vm(vm: &Vm) -> Result<(), ValidationError> {
    if vm.memory_mib == 0 {
        return Err(invalid("vm", "memory_mib", "must be at least 1".into()));
    }
    if vm.vcpus == 0 {
        return Err(invalid("vm", "vcpus", "must be at least 1".into()));
    }
    if vm.current_host.trim().is_empty() {
        return Err(invalid("vm", "current_host", "must not be empty".into()));
    }
    Ok(())
}
