//! `refvmm` — the livemig reference VMM.
//!
//! A tiny KVM VMM that boots Multiboot v1 kernels with a COM1 serial console
//! (guest output on stdout, stdin forwarded to the guest as console input),
//! and migrates them live with livemig:
//!
//! ```text
//! refvmm run --memory 512M --kernel builtin:testguest --cmdline "ws=64 rate=100" --api-socket /tmp/a.sock
//! refvmm receive --listen tcp:127.0.0.1:4444 --api-socket /tmp/b.sock
//! refvmm migrate --api-socket /tmp/a.sock --to tcp:127.0.0.1:4444
//! refvmm demo          # all of the above on one machine, with a report
//! refvmm console /tmp/a.console   # with run/receive --console unix:/tmp/a.console
//! refvmm agent --listen tcp:0.0.0.0:7070      # on every host: capacity + receivers
//! refvmm migrate --api-socket /tmp/a.sock --to auto --agents tcp:node-b:7070,tcp:node-c:7070
//! refvmm evacuate --api-sockets /tmp/a.sock,/tmp/c.sock --agents tcp:node-b:7070
//! refvmm guest-image --out guest.elf
//! ```
//!
//! It uses only the public APIs of `livemig`, `livemig-kvm` and
//! `livemig-testguest`.

mod agent;
mod api;
mod auto;
mod console;
mod console_client;
mod console_proto;
mod console_server;
mod dirty_rate;
mod evacuate;
mod live;
mod migrate_client;
mod migration;
mod monitor;
mod multiboot;
mod net;
mod place;
mod vmm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use livemig_kvm::serial::SerialOutput;
use livemig_kvm::{x86_layout, DirtyMode};

use crate::api::ApiEvent;
use crate::migration::cmd_receive;
use crate::vmm::{Machine, MachineConfig};

#[derive(Parser)]
#[command(
    name = "refvmm",
    version,
    about = "livemig reference VMM: boots Multiboot kernels under KVM and migrates them live"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Serial console (COM1) output: `stdio`, `file:<PATH>` or `none`.
    /// Output is written through unbuffered, byte by byte.
    #[arg(long, default_value = "stdio")]
    serial: String,
    /// The serial console on a Unix socket: `unix:<PATH>`; attach with
    /// `refvmm console <PATH>`. The guest's output also still goes to
    /// --serial (give `--serial none` to keep it off the VMM's stdout), and
    /// standard input is then not forwarded. On `receive`, give the same
    /// PATH as the source: the destination takes the path over when the
    /// guest resumes there, and an attached `refvmm console` follows the
    /// guest without losing or repeating a byte.
    #[arg(long)]
    console: Option<String>,
    /// Unix socket for control requests (status, pause, resume, migrate, ...).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Dirty tracking: `auto` (manual-protect with chunked clear where KVM
    /// offers it), `manual`, `classic`, or `ring[:ENTRIES]` (the KVM dirty
    /// ring, ENTRIES a power of two from 256 to 65536, default 4096).
    #[arg(long, default_value = "auto")]
    dirty_log: String,
    /// Guest memory: `anonymous` (private anonymous mappings) or `memfd`
    /// (one memfd per region, mapped shared, with 2 MiB huge pages when
    /// every region is a multiple of 2 MiB and enough are free, else
    /// ordinary pages). Either side of a migration may use either.
    #[arg(long, default_value = "anonymous")]
    memory_backend: String,
    /// A NIC backed by a TAP device (opened, or created if missing):
    /// `tap=<IFNAME>,mac=<MAC>[,ip=<IPv4>][,ip6=<IPv6>]...` (`ip6=` may be
    /// repeated). Repeatable. NIC i is a
    /// virtio-net device (virtio-mmio) at 0xd0000000 + i*0x1000, GSI 5+i;
    /// for NIC 0 with an ip, `run` appends `net=mmio:0xd0000000:5,ip=<ip>`
    /// to a command line without a `net=` token. After a migration the
    /// destination announces each NIC's MAC (RARP, a gratuitous ARP when
    /// the IPv4 address is known, an unsolicited neighbour advertisement
    /// for each IPv6 address) on its TAP, and asks the guest driver to
    /// announce itself (VIRTIO_NET_F_GUEST_ANNOUNCE). The source's IPv4 and
    /// IPv6 addresses travel with the migration: a destination `--net`
    /// without them takes the source's.
    #[arg(long = "net")]
    net: Vec<String>,
}

/// Mutual TLS (rustls): our certificate chain and key, and the CA that
/// must have signed the peer's certificate. All three or none.
#[derive(clap::Args, Clone, Default)]
struct TlsArgs {
    /// PEM certificate chain presented to the peer.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) the peer's certificate must chain to.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    fn config(&self, server_name: Option<String>) -> Option<livemig_tls::TlsConfig> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(c), Some(k), Some(a)) => Some(livemig_tls::TlsConfig {
                cert_chain: c.clone(),
                key: k.clone(),
                ca: a.clone(),
                server_name,
            }),
            _ => None,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a Multiboot v1 kernel and run it.
    Run {
        /// Guest memory, e.g. 512M, 2G (a bare number is MiB).
        #[arg(long)]
        memory: String,
        /// The kernel: a Multiboot v1 ELF32 (or a.out-kludge) file, or
        /// `builtin:testguest` for livemig's self-verifying test guest.
        #[arg(long)]
        kernel: String,
        /// Kernel command line. For the test guest: ws=<MiB> rate=<pages per
        /// heartbeat>|max hb=<us> pattern=seq|rand (tsc_khz is added).
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Number of vCPUs (the application processors stay parked until the
        /// guest starts them).
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[command(flatten)]
        common: Common,
    },
    /// Wait for one incoming migration, then run the migrated guest.
    Receive {
        /// Where to listen: tcp:HOST:PORT or unix:PATH.
        #[arg(long)]
        listen: String,
        /// Expected guest memory; if given, a source with a different size is
        /// refused in the handshake (default: take it from the stream).
        #[arg(long)]
        memory: Option<String>,
        /// Expected vCPU count (default: take it from the stream).
        #[arg(long)]
        vcpus: Option<u32>,
        /// Seconds without data from the source before giving up.
        #[arg(long, default_value_t = 10)]
        io_timeout: u64,
        /// Do not announce the NICs after the switchover (for tests that
        /// show what happens without the announce): turns off both the
        /// VMM's RARP / gratuitous-ARP announce and the guest announce
        /// request (virtio-net VIRTIO_NET_S_ANNOUNCE).
        #[arg(long)]
        no_announce: bool,
        /// Leave the migrated guest paused until an API `resume` (for
        /// comparing memory with a source kept by `keep_source`).
        #[arg(long)]
        start_paused: bool,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        common: Common,
    },
    /// Tell a running refvmm (through its API socket) to migrate its guest.
    /// Progress goes to stderr (a status line on a terminal, plain lines
    /// otherwise), the JSON report to stdout. Ctrl-C (SIGINT) or SIGTERM
    /// cancels the migration unless its switchover has begun; a second one
    /// leaves at once. Exit codes: 0 migrated, 1 failed, 2 usage, 3 outcome
    /// unknown, 4 cancelled (the guest stays on the source), 130 left
    /// without the outcome.
    Migrate {
        /// The source VMM's API socket.
        #[arg(long)]
        api_socket: PathBuf,
        #[command(flatten)]
        auto: auto::AutoArgs,
        #[command(flatten)]
        opts: migration::MigrateOptions,
    },
    /// Show the progress of the migration a running refvmm is doing (or the
    /// outcome of its last one), as JSON (QEMU `query-migrate` field names).
    MigrateStatus {
        /// The source VMM's API socket.
        #[arg(long)]
        api_socket: PathBuf,
    },
    /// Cancel the migration a running refvmm is doing: the guest stays on
    /// the source. Refused (exit 1) when none runs or its switchover has
    /// begun.
    MigrateCancel {
        /// The source VMM's API socket.
        #[arg(long)]
        api_socket: PathBuf,
    },
    /// Choose a destination host for a VM among candidate hosts, and
    /// explain the choice (see docs/placement.md).
    Place {
        /// The candidate hosts (a JSON array).
        #[arg(long)]
        hosts: PathBuf,
        /// The VM to place (a JSON object).
        #[arg(long)]
        vm: PathBuf,
        /// Also print the filters, the formula and each score's breakdown.
        #[arg(long)]
        explain: bool,
        /// Print the decision (or the exclusions) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Live-migrate the test guest between two refvmm processes on this
    /// machine over loopback TCP, and print the report and the
    /// guest-observed blackout.
    Demo(livemig_suite::demo::DemoArgs),
    /// Attach standard input and output to a VMM's serial console socket
    /// (`run`/`receive --console unix:PATH`); follows the guest when it
    /// migrates to a VMM that took over PATH.
    Console {
        /// The console socket.
        path: PathBuf,
        /// Print the guest output the VMM still keeps (up to 1 MiB) before
        /// the live output (default: only output from now on).
        #[arg(long)]
        from_start: bool,
    },
    /// A host agent: answers capacity queries (free memory, CPU load, CPU
    /// features, maintenance, accepting now) and starts a `refvmm receive`
    /// per incoming migration (see docs/placement.md).
    Agent(agent::AgentArgs),
    /// Move every VM of this host (their API sockets) to hosts chosen from
    /// live facts, at most N at a time (see docs/operations.md).
    Evacuate(evacuate::EvacuateArgs),
    /// Write the built-in test guest image (a Multiboot v1 ELF32) to a file,
    /// e.g. to boot it with `qemu-system-x86_64 -kernel`.
    GuestImage {
        /// Output path.
        #[arg(long)]
        out: PathBuf,
    },
}

/// An error with the process exit code it maps to.
struct Fail(u8, String);

fn usage(msg: impl Into<String>) -> Fail {
    Fail(2, msg.into())
}

fn runtime(msg: impl Into<String>) -> Fail {
    Fail(1, msg.into())
}

fn parse_size(s: &str) -> Result<u64, Fail> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => {
                    return Err(usage(format!(
                        "memory size '{s}': unknown suffix '{c}' (use K, M or G)"
                    )))
                }
            };
            (&t[..i], m)
        }
        _ => (t, 1 << 20),
    };
    let n: u64 = num.parse().map_err(|_| {
        usage(format!(
            "memory size '{s}' is not a number with an optional K/M/G suffix"
        ))
    })?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| usage(format!("memory size '{s}' is too large")))?;
    if bytes == 0 {
        return Err(usage("memory size must be greater than 0"));
    }
    if bytes % 4096 != 0 {
        return Err(usage(format!(
            "memory size '{s}' is not a multiple of 4 KiB"
        )));
    }
    if bytes > (1 << 40) {
        return Err(usage(format!("memory size '{s}' exceeds 1 TiB")));
    }
    Ok(bytes)
}

fn parse_serial(s: &str) -> Result<SerialOutput, Fail> {
    match s {
        "stdio" => Ok(SerialOutput::Stdout),
        "none" => Ok(SerialOutput::None),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialOutput::File(PathBuf::from(p))),
            _ => Err(usage(format!(
                "--serial '{s}': expected stdio, file:<PATH> or none"
            ))),
        },
    }
}

fn parse_memory_backend(s: &str) -> Result<livemig_kvm::MemoryBackend, Fail> {
    s.parse()
        .map_err(|e: livemig_kvm::memfd::MemfdError| usage(format!("--memory-backend: {e}")))
}

fn parse_dirty(s: &str) -> Result<Option<DirtyMode>, Fail> {
    match s {
        "auto" => Ok(None),
        "manual" => Ok(Some(DirtyMode::ManualProtect)),
        "classic" => Ok(Some(DirtyMode::Classic)),
        "ring" => Ok(Some(DirtyMode::Ring {
            entries: livemig_kvm::dirty::DEFAULT_RING_ENTRIES,
        })),
        _ => match s.strip_prefix("ring:").map(str::parse::<u32>) {
            Some(Ok(entries)) if entries.is_power_of_two() && entries >= 256 => {
                Ok(Some(DirtyMode::Ring { entries }))
            }
            Some(_) => Err(usage(format!(
                "--dirty-log '{s}': ring entries must be a power of two, at least 256"
            ))),
            None => Err(usage(format!(
                "--dirty-log '{s}': expected auto, manual, classic or ring[:ENTRIES]"
            ))),
        },
    }
}

/// Checks every `--net` (usage errors first), then KVM, then opens the TAPs.
fn open_nets(specs: &[String]) -> Result<Vec<net::NetBackend>, Fail> {
    for spec in specs {
        net::parse_spec(spec).map_err(usage)?;
    }
    require_kvm()?;
    specs
        .iter()
        .map(|spec| net::NetBackend::open(spec).map_err(runtime))
        .collect()
}

fn require_kvm() -> Result<(), Fail> {
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
fn open_console(
    spec: Option<&str>,
    takeover: bool,
) -> Result<Option<(console_server::Listener, Arc<console_server::ConsoleLog>)>, Fail> {
    let Some(spec) = spec else { return Ok(None) };
    let path = console_server::parse_console(spec).map_err(usage)?;
    let listener = if takeover {
        console_server::Listener::bind_for_takeover(&path)
    } else {
        console_server::Listener::bind(&path)
    }
    .map_err(runtime)?;
    Ok(Some((listener, Arc::default())))
}

/// Runs the machine until it dies, migrates away, or is told to quit.
fn run_machine(
    machine: Machine,
    api_socket: Option<PathBuf>,
    start: bool,
    console: Option<(console_server::Listener, Arc<console_server::ConsoleLog>)>,
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
    if let Some(p) = &api_socket {
        api::serve(p, machine.clone(), tx.clone()).map_err(runtime)?;
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
    if let Some(p) = &api_socket {
        let _ = std::fs::remove_file(p);
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

fn cmd_run(
    memory: String,
    kernel: String,
    cmdline: String,
    vcpus: u32,
    common: Common,
) -> Result<(), Fail> {
    let memory = parse_size(&memory)?;
    let serial = parse_serial(&common.serial)?;
    let dirty_mode = parse_dirty(&common.dirty_log)?;
    let memory_backend = parse_memory_backend(&common.memory_backend)?;
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
        memory_backend,
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
    run_machine(machine, common.api_socket, true, console)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run {
            memory,
            kernel,
            cmdline,
            vcpus,
            common,
        } => cmd_run(memory, kernel, cmdline, vcpus, common),
        Cmd::Receive {
            listen,
            memory,
            vcpus,
            io_timeout,
            no_announce,
            start_paused,
            tls,
            common,
        } => cmd_receive(
            listen,
            memory,
            vcpus,
            io_timeout,
            !no_announce,
            start_paused,
            tls.config(None),
            common,
        ),
        Cmd::Migrate {
            api_socket,
            auto,
            opts,
        } => auto::cmd_migrate(&api_socket, auto, opts).map_err(|(c, m)| Fail(c, m)),
        Cmd::Agent(args) => agent::cmd_agent(args),
        Cmd::Evacuate(args) => evacuate::cmd_evacuate(args).map_err(|(c, m)| Fail(c, m)),
        Cmd::MigrateStatus { api_socket } => {
            migrate_client::status(&api_socket).map_err(|f| Fail(f.0, f.1))
        }
        Cmd::MigrateCancel { api_socket } => {
            migrate_client::cancel(&api_socket).map_err(|f| Fail(f.0, f.1))
        }
        Cmd::Place {
            hosts,
            vm,
            explain,
            json,
        } => place::cmd_place(&hosts, &vm, explain, json).map_err(|(code, msg)| Fail(code, msg)),
        Cmd::Demo(args) => livemig_suite::demo::run(&args).map_err(runtime),
        Cmd::Console { path, from_start } => console_client::run(path, from_start).map_err(runtime),
        Cmd::GuestImage { out } => livemig_testguest::image()
            .map_err(|e| runtime(format!("building the test guest: {e}")))
            .and_then(|img| {
                std::fs::write(&out, img)
                    .map_err(|e| runtime(format!("writing {}: {e}", out.display())))
            }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            eprintln!("refvmm: error: {msg}");
            ExitCode::from(code)
        }
    }
}
