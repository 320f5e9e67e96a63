//! `refvmm place` and `refvmm migrate --to auto`: choosing a destination
//! host with `livemig-placement` (see docs/placement.md).
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

/// `refvmm migrate --to auto`: chooses the destination exactly as `place`
/// does, reports the choice and the ranked table on stderr, and returns
/// the chosen host's name and migration address.
pub fn choose_address(hosts: &Path, vm: &Path) -> Result<(String, String), CliError> {
    let (hosts, vm) = load(hosts, vm)?;
    let decision = choose(&hosts, &vm, |e| {
        if let PlacementError::NoEligibleHost { excluded, .. } = e {
            eprint!("{}", render_exclusions(excluded));
        }
    })?;
    eprint!("{}", render_decision(&decision, false));
    Ok((decision.chosen.name, decision.chosen.migration_address))
}

/// Resolves `migrate --to`: `auto` (which needs `--hosts` and `--vm`)
/// chooses with [`choose_address`]; any other value is used as given, and
/// then `--hosts`/`--vm` must be absent.
pub fn resolve_destination(
    to: &str,
    hosts: Option<&Path>,
    vm: Option<&Path>,
) -> Result<String, CliError> {
    match (to, hosts, vm) {
        ("auto", Some(h), Some(v)) => {
            let (name, address) = choose_address(h, v)?;
            eprintln!("refvmm: --to auto: migrating to host `{name}` at {address}");
            Ok(address)
        }
        ("auto", _, _) => Err((
            2,
            "--to auto needs --hosts <hosts.json> and --vm <vm.json>".to_string(),
        )),
        (_, None, None) => Ok(to.to_string()),
        _ => Err((
            2,
            "--hosts and --vm are only used with --to auto".to_string(),
        )),
    }
}
