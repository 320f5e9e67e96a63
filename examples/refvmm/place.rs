//! `refvmm place`: choosing a destination host from files with
//! `livemig-placement` (see docs/placement.md; `migrate --to auto` is in
//! auto.rs).
//!
//! All the logic lives in the library; this is the command-line glue:
//! reading the files, checking that every migration address is one refvmm
//! can use, printing, and mapping errors to exit codes (2 for bad input, 1
//! when no host is eligible).

use std::path::Path;

use livemig::transport::Endpoint;
use livemig_placement::report::{render_decision, render_exclusions};
use livemig_placement::{
    choose_destination, load_hosts, load_vm, Decision, Host, InputError, PlacementConfig,
    PlacementError, Vm,
};
use serde_json::json;

/// An error as (process exit code, one-line message).
pub type CliError = (u8, String);

/// Every input problem, an unreadable file included, is bad input (exit 2).
fn bad_input(e: InputError) -> CliError {
    (2, e.to_string())
}

/// Loads and validates both files, and checks that every host's
/// `migration_address` is a transport endpoint refvmm understands.
fn load(hosts_path: &Path, vm_path: &Path) -> Result<(Vec<Host>, Vm), CliError> {
    let hosts = load_hosts(hosts_path).map_err(bad_input)?;
    let vm = load_vm(vm_path).map_err(bad_input)?;
    for (i, h) in hosts.iter().enumerate() {
        if let Err(e) = h.migration_address.parse::<Endpoint>() {
            return Err((
                2,
                format!(
                    "{}: host `{}` (hosts[{i}]): field `migration_address`: {e}",
                    hosts_path.display(),
                    h.name
                ),
            ));
        }
    }
    Ok((hosts, vm))
}

/// Chooses with the default configuration; maps the library's errors.
/// `on_excluded` is called when no host is eligible, to print every host
/// with why it was excluded; the returned message then only summarises.
fn choose(
    hosts: &[Host],
    vm: &Vm,
    on_excluded: impl FnOnce(&PlacementError),
) -> Result<Decision, CliError> {
    choose_destination(hosts, vm, &PlacementConfig::default()).map_err(|e| match &e {
        PlacementError::Invalid(_) => (2, e.to_string()),
        PlacementError::NoHosts { .. } => (1, e.to_string()),
        PlacementError::NoEligibleHost { vm, excluded } => {
            on_excluded(&e);
            (
                1,
                format!(
                    "no eligible destination for {vm}: all {} hosts excluded (reasons above)",
                    excluded.len()
                ),
            )
        }
    })
}

/// `refvmm place`: prints the chosen host and the ranked table (with
/// `explain`, every score's breakdown too), or with `json` the whole
/// decision as JSON. When no host is eligible, prints every host with why it
/// was excluded (as JSON with `json`) and fails with exit code 1.
pub fn cmd_place(hosts: &Path, vm: &Path, explain: bool, json: bool) -> Result<(), CliError> {
    let (hosts, vm) = load(hosts, vm)?;
    let decision = choose(&hosts, &vm, |e| {
        let excluded = match e {
            PlacementError::NoEligibleHost { excluded, .. } => excluded.as_slice(),
            _ => &[],
        };
        if json {
            let out = json!({
                "error": e.to_string(),
                "excluded": excluded,
            });
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        } else if !excluded.is_empty() {
            print!("{}", render_exclusions(excluded));
        }
    })?;
    if json {
        let text = serde_json::to_string_pretty(&decision)
            .map_err(|e| (1, format!("encoding the decision as JSON: {e}")))?;
        println!("{text}");
    } else {
        print!("{}", render_decision(&decision, explain));
    }
    Ok(())
}
