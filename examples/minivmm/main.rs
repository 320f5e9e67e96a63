//! minivmm: a second, deliberately small VMM that embeds livemig through its
//! public API only (docs/embedding.md, "A second VMM"). It shares no machine
//! code with refvmm: its own guest memory (a memfd it maps itself), its own
//! single-vCPU loop on kvm-ioctls, its own output-only serial port, its own
//! Multiboot loader. It boots the built-in test guest with one vCPU.
//!
//! ```text
//! minivmm run [--memory MiB] [--cmdline "ws=32 rate=10"]
//!             [--dirty-log|--dirty classic|manual|ring [--ring-entries 4096]]
//!             [--migrate-to tcp:HOST:PORT|unix:PATH [--after-ms N] [--downtime-limit-ms 20]
//!             [--max-bandwidth MiB/s]]
//! minivmm receive --listen tcp:HOST:PORT|unix:PATH [--memory MiB]
//! ```
//!
//! The guest's serial output goes to stdout (unbuffered), everything else
//! to stderr. `run` with `--migrate-to` migrates the guest after
//! `--after-ms` (or, without it, when a line arrives on stdin): once the
//! destination runs the guest it prints `minivmm: migrated: <report JSON>`
//! and exits 0; if the migration failed safely it says so and keeps running
//! the guest; if the outcome is ambiguous it keeps the guest paused and
//! exits 3. `receive` prints `minivmm: listening on EP`, then
//! `minivmm: received: <report JSON>`, and runs the guest until killed.

mod boot;
mod machine;
mod migration;
mod ram;
mod vcpu;

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use livemig::transport::Endpoint;
use livemig::MigrationConfig;
use livemig_kvm::DirtyMode;

use machine::Machine;

#[derive(Parser)]
#[command(
    name = "minivmm",
    about = "A minimal single-vCPU VMM embedding livemig"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Dirty {
    /// KVM_GET_DIRTY_LOG harvests and re-protects at once.
    Classic,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with chunked KVM_CLEAR_DIRTY_LOG.
    Manual,
    /// The vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING_ACQ_REL).
    Ring,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot the test guest; optionally migrate it away.
    Run {
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 128)]
        memory: u64,
        /// The test guest's command line (`tsc_khz=` is added).
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Dirty tracking mode for a migration (`--dirty` is the same).
        #[arg(long, visible_alias = "dirty", value_enum, default_value = "manual")]
        dirty_log: Dirty,
        /// Entries of the vCPU's dirty ring (`--dirty-log ring`): a power
        /// of two, at least 256.
        #[arg(long, default_value_t = livemig_kvm::dirty::DEFAULT_RING_ENTRIES)]
        ring_entries: u32,
        /// Migrate the guest to this endpoint.
        #[arg(long)]
        migrate_to: Option<Endpoint>,
        /// The engine's downtime limit in milliseconds.
        #[arg(long, default_value_t = 20)]
        downtime_limit_ms: u64,
        /// Cap on the pre-copy bandwidth, MiB/s (default: none).
        #[arg(long)]
        max_bandwidth: Option<u64>,
        /// Milliseconds to run before migrating (default: migrate when a
        /// line arrives on stdin).
        #[arg(long)]
        after_ms: Option<u64>,
    },
    /// Receive a guest and run it.
    Receive {
        /// Endpoint to listen on.
        #[arg(long)]
        listen: Endpoint,
        /// Guest RAM in MiB (must equal the source's).
        #[arg(long, default_value_t = 128)]
        memory: u64,
    },
}

fn main() {
    let code = match Cli::parse().cmd {
        Cmd::Run {
            memory,
            cmdline,
            dirty_log,
            ring_entries,
            migrate_to,
            downtime_limit_ms,
            max_bandwidth,
            after_ms,
        } => {
            let config = MigrationConfig {
                downtime_limit: Duration::from_millis(downtime_limit_ms),
                max_bandwidth: max_bandwidth.map(|m| m << 20),
                ..Default::default()
            };
            let to = migrate_to.map(|ep| (ep, config));
            let mode = match dirty_log {
                Dirty::Classic => DirtyMode::Classic,
                Dirty::Manual => DirtyMode::ManualProtect,
                Dirty::Ring => DirtyMode::Ring {
                    entries: ring_entries,
                },
            };
            run(memory << 20, &cmdline, mode, to, after_ms)
        }
        Cmd::Receive { listen, memory } => receive(&listen, memory << 20),
    };
    // Never tear the VM down under a running vCPU thread: exit directly.
    std::process::exit(code)
}

fn run(
    memory: u64,
    cmdline: &str,
    mode: DirtyMode,
    to: Option<(Endpoint, MigrationConfig)>,
    after_ms: Option<u64>,
) -> i32 {
    let m = match boot(memory, cmdline, mode) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("minivmm: {e}");
            return 1;
        }
    };
    m.kvm.gate().resume();
    let Some((to, config)) = to else { idle() };
    match after_ms {
        Some(ms) => std::thread::sleep(Duration::from_millis(ms)),
        None => {
            let _ = std::io::stdin().read_line(&mut String::new());
        }
    }
    match migration::migrate_to(&m, &to, &config) {
        Ok(report) => {
            if let Some(r) = &m.ring {
                eprintln!("minivmm: dirty ring full exits: {}", r.ring_full_exits());
            }
            eprintln!("minivmm: migrated: {}", json(&report));
            0
        }
        Err(e) if e.is_ambiguous() => {
            eprintln!("minivmm: migration outcome unknown, guest stays paused: {e}");
            let _ = m.kvm.pause();
            3
        }
        Err(e) => {
            eprintln!("minivmm: migration failed, the guest runs here: {e}");
            idle()
        }
    }
}

fn boot(memory: u64, cmdline: &str, mode: DirtyMode) -> Result<Machine, String> {
    let m = Machine::create(memory, mode).map_err(|e| e.to_string())?;
    let image = livemig_testguest::image().map_err(|e| e.to_string())?;
    let cmdline = format!("{cmdline} tsc_khz={}", m.kvm.tsc_khz());
    let entry = boot::load(&m.ram, &image, cmdline.trim(), memory).map_err(|e| e.to_string())?;
    // The vCPU thread owns the fd: it sets the registers, parked.
    let set = m
        .kvm
        .gate()
        .on_vcpu_threads(move |_, fd| boot::set_entry_state(fd, entry).map_err(|e| e.to_string()));
    set.map_err(|e| e.to_string())?
        .into_iter()
        .collect::<Result<(), _>>()?;
    Ok(m)
}

fn receive(listen: &Endpoint, memory: u64) -> i32 {
    match migration::receive_on(listen, memory) {
        Ok((_machine, report)) => {
            eprintln!("minivmm: received: {}", json(&report));
            idle()
        }
        Err(e) => {
            eprintln!("minivmm: receive failed: {e}");
            1
        }
    }
}

fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("(report: {e})"))
}

/// Lets the vCPU thread run the guest until the process is killed.
fn idle() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
