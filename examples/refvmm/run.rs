//! Running a machine: the `run` command (boot a kernel), and the main loop
//! `run` and `receive` share (serve the API and the console until the
//! guest dies, migrates away, or the VMM is told to quit).

use std::path::Path;
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use livemig_kvm::x86_layout;

use crate::api::{ApiEvent, ApiSocket};
use crate::api_state::ApiState;
use crate::cli::{
    parse_dirty, parse_memory_options, parse_serial, parse_size, runtime, usage, Fail, RunArgs,
};
use crate::socket_path::Listener;
use crate::vmm::{Machine, MachineConfig};
use crate::{console, console_server, multiboot, net};

/// Checks every `--net` (usage errors first), then KVM, then opens the TAPs.
pub(crate) fn open_nets(specs: &[String]) -> Result<Vec<net::NetBackend>, Fail> {
    for spec in specs {
        net::parse_spec(spec).map_err(usage)?;
    }
    require_kvm()?;
    specs
        .iter()
        .map(|spec| net::NetBackend::open(spec).map_err(runtime))
        .collect()
}

pub(crate) fn require_kvm() -> Result<(), Fail> {
    if !livemig_kvm::kvm_available() {
        return Err(runtime(
            "cannot open /dev/kvm: KVM is not available here (or not permitted)",
        ));
    }
    Ok(())
}

/// The console socket of a machine (`--console`), bound before the machine
/// is created: `run` binds PATH, `receive` a temporary path it takes PATH
/// over with when the guest resumes.
pub(crate) fn open_console(
    spec: Option<&str>,
    takeover: bool,
) -> Result<Option<(Listener, Arc<console_server::ConsoleLog>)>, Fail> {
    let Some(spec) = spec else { return Ok(None) };
    let path = console_server::parse_console(spec).map_err(usage)?;
    let listener = if takeover {
        Listener::bind_for_takeover("console socket", &path)
    } else {
        Listener::bind("console socket", &path)
    }
    .map_err(runtime)?;
    Ok(Some((listener, Arc::default())))
}

/// The API socket of `run` (and of a `receive` that could not bind its
/// path while it waited), bound at its path and served from now on; its
/// requests wait for the machine.
pub(crate) fn bind_api(path: Option<&Path>) -> Result<Option<ApiSocket>, Fail> {
    let Some(p) = path else { return Ok(None) };
    let listener = Listener::bind("API socket", p).map_err(runtime)?;
    ApiSocket::start(listener, ApiState::coming())
        .map(Some)
        .map_err(runtime)
}

/// Runs the machine until it dies, migrates away, or is told to quit,
/// serving the API on `api`. At exit, the API and console socket paths are
/// removed if they still name this VMM's sockets (after a local hand-over
/// the new VMM has taken them over already: they stay).
pub(crate) fn run_machine(
    machine: Machine,
    api: Option<ApiSocket>,
    start: bool,
    console: Option<(Listener, Arc<console_server::ConsoleLog>)>,
) -> Result<(), Fail> {
    let machine = Arc::new(machine);
    match &console {
        Some((listener, log)) => {
            console_server::serve(listener, log.clone(), Arc::downgrade(&machine))
                .map_err(runtime)?;
        }
        None => console::forward_stdin(&machine),
    }
    let (tx, rx) = channel();
    if let Some(a) = &api {
        a.state.ready(machine.clone(), tx.clone());
    }
    // The guest is this VMM's now: supervisors follow the pid file.
    let pid_file = crate::carry::recorded().and_then(|s| s.pid_file());
    if let Some(p) = pid_file {
        crate::pidfile::write(p, std::process::id()).map_err(runtime)?;
    }
    if start {
        machine.start();
    }
    let result = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(ApiEvent::Migrated) => {
                // Frames that reached this host's TAPs after the pause were
                // never delivered to the guest: say so, do not pretend.
                let queued = machine.drop_queued_frames();
                let dropped: u64 = machine
                    .nic_counters
                    .iter()
                    .map(|c| c.snapshot().rx_dropped)
                    .sum();
                if !machine.nic_counters.is_empty() {
                    eprintln!(
                        "refvmm: {queued} frame(s) still queued on this host's TAPs at exit; {dropped} received frame(s) in all were never delivered to the guest"
                    );
                }
                eprintln!("refvmm: guest migrated; source exits");
                break Ok(());
            }
            Ok(ApiEvent::HandedOver) => {
                eprintln!("refvmm: guest handed over to the VMM on this host; exits");
                break Ok(());
            }
            Ok(ApiEvent::Quit) => break Ok(()),
            Ok(ApiEvent::Ambiguous(msg)) => {
                break Err(Fail(
                    3,
                    format!("{msg}; exiting without resuming the guest"),
                ))
            }
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {}
        }
        if let Some(e) = machine.vm.vcpus().fatal() {
            break Err(runtime(format!("guest stopped: {e}")));
        }
    };
    // Only our own socket: after a hand-over the new VMM owns the path.
    drop(api);
    if let Some(p) = pid_file {
        crate::pidfile::remove_if_ours(p);
    }
    // Stop the vCPUs before the process exits so no thread runs the guest
    // while the process tears down.
    let _ = machine.vm.pause_vcpus();
    // Console clients get all of the output, then `Moved` (the guest
    // migrated) or the end of the session.
    if let Some((_listener, log)) = &console {
        log.close("the VMM exits", Duration::from_secs(2));
    }
    result
}

pub(crate) fn cmd_run(args: RunArgs) -> Result<(), Fail> {
    let RunArgs {
        memory,
        kernel,
        cmdline,
        vcpus,
        common,
    } = args;
    crate::carry::record(&common, &crate::cli::ReceiveSettings::default());
    let memory = parse_size(&memory)?;
    let serial = parse_serial(&common.serial)?;
    let dirty_mode = parse_dirty(&common.dirty_log)?;
    let memory_options = parse_memory_options(&common)?;
    if vcpus == 0 || vcpus > livemig_kvm::vm::MAX_VCPUS {
        return Err(usage(format!(
            "--vcpus {vcpus}: must be between 1 and {}",
            livemig_kvm::vm::MAX_VCPUS
        )));
    }
    let image = if kernel == "builtin:testguest" {
        livemig_testguest::image().map_err(|e| runtime(format!("building the test guest: {e}")))?
    } else {
        std::fs::read(&kernel).map_err(|e| usage(format!("cannot read kernel '{kernel}': {e}")))?
    };
    // Validate the image against a scratch memory of the same size first, so
    // a bad kernel is a usage error even where KVM is missing.
    let layout = x86_layout(memory).map_err(|e| usage(e.to_string()))?;
    {
        let scratch = livemig::memory::allocate(&layout).map_err(|e| runtime(e.to_string()))?;
        multiboot::load(&scratch, &image, &cmdline)
            .map_err(|e| usage(format!("kernel '{kernel}': {e}")))?;
    }
    let nets = open_nets(&common.net)?;
    let console = open_console(common.console.as_deref(), false)?;
    let machine = Machine::create(MachineConfig {
        memory,
        vcpus,
        serial,
        nets,
        dirty_mode,
        console: console.as_ref().map(|(_, log)| log.clone()),
        memory_options,
        shared_memory: None,
        prepared: None,
    })
    .map_err(runtime)?;
    let mut cmdline = cmdline;
    cmdline = net::with_net_token(&cmdline, machine.nets.first().and_then(|n| n.ip));
    if !cmdline
        .split_whitespace()
        .any(|w| w.starts_with("tsc_khz="))
    {
        if let Ok(khz) = machine.vm.tsc_khz() {
            cmdline = format!("{cmdline} tsc_khz={khz}").trim().to_string();
        }
    }
    let loaded = multiboot::load(machine.vm.ram(), &image, &cmdline)
        .map_err(|e| usage(format!("kernel '{kernel}': {e}")))?;
    log::info!(
        "kernel entry 0x{:x}, info at 0x{:x}",
        loaded.entry,
        loaded.info_addr
    );
    machine.set_multiboot_entry(&loaded).map_err(runtime)?;
    let api = bind_api(common.api_socket.as_deref())?;
    run_machine(machine, api, true, console)
}
