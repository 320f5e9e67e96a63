//! The same-host hand-over as the source runs it (`migrate --local`), and
//! `refvmm upgrade`: the source VMM starts the new binary as a local
//! destination with its own settings (`carry.rs`), hands the guest over,
//! writes the new VMM's pid to its pid file, and exits; the new VMM takes over the API socket path,
//! the console socket and the NICs (their TAP descriptors travelled).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use livemig::policy::MigrationConfig;
use livemig::transport::{Endpoint, UnixTransport};
use livemig::Progress;
use serde_json::json;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::cli::{usage, Fail};
use crate::migration::{outcome_of, setup_error, MigrateOptions, Outcome};
use crate::monitor::MigrationMonitor;
use crate::vmm::Machine;

/// How long the new VMM may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a local hand-over (`opts.local`) to `endpoint`, first starting the
/// new VMM there for `upgrade`.
pub(crate) fn do_local(
    opts: &MigrateOptions,
    endpoint: &Endpoint,
    cfg: MigrationConfig,
    m: &Arc<Machine>,
    monitor: &MigrationMonitor,
    progress: &mut dyn FnMut(&Progress),
) -> Outcome {
    if let Err(e) = crate::local::check_shareable(m) {
        return setup_error(e);
    }
    let Endpoint::Unix(path) = endpoint else {
        return setup_error(format!(
            "--local hands the guest over on this host through a Unix socket: --to unix:PATH, not {endpoint}"
        ));
    };
    if cfg.streams > 1 || opts.tls.config().ok().flatten().is_some() || opts.compress == Some(true)
    {
        return setup_error("--local sends no pages: no --streams, --compress or TLS".into());
    }
    let memory = m.vm.ram().iter().map(|r| r.len()).sum::<u64>();
    let active = match monitor.begin(memory, &cfg) {
        Ok(a) => a,
        Err(e) => return setup_error(e.into()),
    };
    let mut child = match &opts.upgrade_binary {
        Some(bin) => match start_new(bin, path) {
            Ok(c) => Some(c),
            Err(e) => {
                active.abort(&e);
                return setup_error(e);
            }
        },
        None => None,
    };
    let sock = match connect(path, child.as_mut()).and_then(|s| {
        crate::local::send_handover(&s, m)?;
        Ok(s)
    }) {
        Ok(s) => s,
        Err(e) => {
            kill(child);
            active.abort(&e);
            return setup_error(e);
        }
    };
    let transport = Box::new(UnixTransport::new(sock, path));
    let result = livemig::Migration::new(&**m)
        .guard(&m.guard)
        .config(cfg.clone())
        .cancel(active.cancel.clone())
        .progress(|p: &Progress| {
            active.progress(p);
            progress(p);
        })
        .local()
        .run(active.count(transport));
    let cancelled_by = active.cancelled_by();
    active.finish(&result);
    match &result {
        // The new VMM runs the guest: its pid goes into the pid file before
        // this VMM exits (supervisors that follow the file see no gap).
        Ok(_) => {
            if let (Some(c), Some(p)) =
                (&child, crate::carry::recorded().and_then(|s| s.pid_file()))
            {
                if let Err(e) = crate::pidfile::write(p, c.id()) {
                    eprintln!("refvmm: {e}");
                }
            }
        }
        // The new VMM may run the guest (ambiguous); it stays.
        Err(e) if e.is_ambiguous() => {}
        Err(_) => kill(child),
    }
    outcome_of(result, cancelled_by)
}

/// Connects to the destination's socket, waiting for a new VMM we started
/// to listen (and failing if it exits first).
fn connect(
    path: &Path,
    mut child: Option<&mut Child>,
) -> Result<std::os::unix::net::UnixStream, String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if child.is_none() || Instant::now() > deadline => {
                return Err(format!("connecting to {}: {e}", path.display()))
            }
            Err(_) => {}
        }
        if let Some(c) = child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                return Err(format!("the new VMM exited before listening ({status})"));
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts `bin` as `receive --listen unix:PATH` with this VMM's settings
/// (`carry.rs`), in a session of its own; it inherits standard input,
/// output and error (so `--serial stdio` goes where it went, and console
/// input keeps coming from the same place once this VMM is gone).
///
/// Its own session and process group: a signal meant for the old VMM's
/// group (a terminal's Ctrl-C or hang-up, a supervisor's kill of the job)
/// does not reach it, and a terminal does not stop it (SIGTTIN) for
/// reading once the old VMM's job is gone. It stays this VMM's child until
/// this VMM exits; supervisors follow the pid file (`--pid-file`).
fn start_new(bin: &Path, path: &Path) -> Result<Child, String> {
    let settings = crate::carry::recorded().ok_or("this VMM does not know how it was started")?;
    let _ = std::fs::remove_file(path);
    let mut cmd = Command::new(bin);
    cmd.arg("receive")
        .arg("--listen")
        .arg(format!("unix:{}", path.display()))
        .args(settings.receive_args()?);
    // SAFETY: the closure runs in the forked child before exec and calls
    // only setsid(2), which is async-signal-safe; the child is not a
    // process group leader (its group is ours), so setsid succeeds.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))
}

/// Stops a new VMM that did not get the guest.
fn kill(child: Option<Child>) {
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// `refvmm upgrade --api-socket S --binary NEW`: asks the VMM at S to hand
/// its guest over to NEW (started by that VMM) and exit.
pub(crate) fn cmd_upgrade(api_socket: &Path, binary: &Path) -> Result<(), Fail> {
    let binary = std::fs::canonicalize(binary)
        .map_err(|e| usage(format!("--binary {}: {e}", binary.display())))?;
    let mut private = api_socket.as_os_str().to_owned();
    private.push(".upgrade");
    let opts = MigrateOptions {
        to: format!("unix:{}", PathBuf::from(private).display()),
        local: true,
        upgrade_binary: Some(binary),
        ..MigrateOptions::default()
    };
    let req = opts.to_request();
    crate::migrate_client::migrate(api_socket, &req).map_err(|f| Fail(f.0, f.1))?;
    // The new VMM answers on the same path once it took it over.
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let st = crate::migrate_client::api_request(api_socket, &json!({"cmd":"status"}));
        match st {
            // The old VMM says "migrated" until it is gone; the new one
            // took the path over.
            Ok(v) if v["migration"] == "idle" => {
                eprintln!(
                    "refvmm: upgraded: version {} pid {} now serves {}",
                    v["version"].as_str().unwrap_or("?"),
                    v["pid"],
                    api_socket.display()
                );
                return Ok(());
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(Fail(
                1,
                format!(
                    "the guest was handed over, but no new VMM answers on {} yet",
                    api_socket.display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
