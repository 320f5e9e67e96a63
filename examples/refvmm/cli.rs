//! `refvmm`'s command line: the subcommands and their options (clap), the
//! parsers of option values, and [`Fail`], an error with its exit code.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use livemig_kvm::serial::SerialOutput;
use livemig_kvm::DirtyMode;
use serde::Serialize;

use crate::migration;

#[derive(Parser)]
#[command(
    name = "refvmm",
    version,
    about = "livemig reference VMM: boots Multiboot kernels under KVM and migrates them live"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

/// The options of `run` and `receive`. Every field but `net` is a setting
/// `upgrade` gives the new VMM as the same option (`carry.rs`: a new field
/// here is carried without more code; mark it `#[serde(skip)]` if it must
/// not be).
#[derive(clap::Args, Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Common {
    /// Serial console (COM1) output: `stdio`, `file:<PATH>` (created or
    /// truncated), `append:<PATH>` (appended to; what `upgrade` gives the
    /// new VMM for a `file:` console) or `none`. Output is written through
    /// unbuffered, byte by byte.
    #[arg(long, default_value = "stdio")]
    pub(crate) serial: String,
    /// The serial console on a Unix socket: `unix:<PATH>`; attach with
    /// `refvmm console <PATH>`. The guest's output also still goes to
    /// --serial (give `--serial none` to keep it off the VMM's stdout), and
    /// standard input is then not forwarded. On `receive`, give the same
    /// PATH as the source: the destination takes the path over when the
    /// guest resumes there, and an attached `refvmm console` follows the
    /// guest without losing or repeating a byte.
    #[arg(long)]
    pub(crate) console: Option<String>,
    /// Unix socket for control requests (status, pause, resume, migrate, ...).
    #[arg(long)]
    pub(crate) api_socket: Option<PathBuf>,
    /// Dirty tracking: `auto` (manual-protect with chunked clear where KVM
    /// offers it), `manual`, `classic`, or `ring[:ENTRIES]` (the KVM dirty
    /// ring, ENTRIES a power of two from 256 to 65536, default 4096).
    #[arg(long, default_value = "auto")]
    pub(crate) dirty_log: String,
    /// Guest memory: `anonymous` (private anonymous mappings), `memfd` (one
    /// memfd per region, mapped shared: what a same-host hand-over needs)
    /// or `memfd,hugetlb` (the same with 2 MiB huge pages, reserved at
    /// start: refused with the host's free count where too few are free,
    /// or where the memory size is not whole 2 MiB). Either side of a
    /// migration may use any.
    #[arg(long, default_value = "anonymous")]
    pub(crate) memory_backend: String,
    /// Transparent huge pages for `anonymous` and `memfd` guest memory:
    /// `host` (the default) gives no advice, so the host's
    /// /sys/kernel/mm/transparent_hugepage settings decide (`enabled` for
    /// anonymous memory, `shmem_enabled` for memfd); `on` advises the
    /// kernel to back each aligned 2 MiB with one huge page
    /// (`madvise(MADV_HUGEPAGE)`, as QEMU and Cloud Hypervisor do): fewer
    /// faults, but memory held in 2 MiB steps of what the guest touched
    /// (and on this project's development VM, real migrations were slower:
    /// docs/benchmarks.md); `off` keeps 4 KiB pages (`MADV_NOHUGEPAGE`).
    /// Never a failure. Ignored for `memfd,hugetlb`.
    #[arg(long, default_value = "host")]
    pub(crate) thp: String,
    /// Write this VMM's pid to PATH (a temporary file renamed over it) once
    /// it runs a guest: `run` at boot, `receive` when the guest arrived.
    /// After an `upgrade` the old VMM writes the new VMM's pid there before
    /// it exits (systemd's `PIDFile=` follows that); a VMM removes the file
    /// when it exits only if it still names it.
    #[arg(long, value_name = "PATH")]
    pub(crate) pid_file: Option<PathBuf>,
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
    // Not an option of the new VMM after an upgrade: the TAP descriptors
    // and their specs travel with the hand-over.
    #[serde(skip)]
    pub(crate) net: Vec<String>,
}

/// Mutual TLS (rustls): our certificate chain and key, and the CA that
/// must have signed the peer's certificate. All three or none.
#[derive(clap::Args, Clone, Default)]
pub(crate) struct TlsArgs {
    /// PEM certificate chain presented to the peer.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub(crate) tls_cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    pub(crate) tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) the peer's certificate must chain to.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub(crate) tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    pub(crate) fn config(&self, server_name: Option<String>) -> Option<livemig_tls::TlsConfig> {
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

/// `refvmm run`: boot a Multiboot v1 kernel and run it.
#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// Guest memory, e.g. 512M, 2G (a bare number is MiB).
    #[arg(long)]
    pub(crate) memory: String,
    /// The kernel: a Multiboot v1 ELF32 (or a.out-kludge) file, or
    /// `builtin:testguest` for livemig's self-verifying test guest.
    #[arg(long)]
    pub(crate) kernel: String,
    /// Kernel command line. For the test guest: ws=<MiB> rate=<pages per
    /// heartbeat>|max hb=<us> pattern=seq|rand (tsc_khz is added).
    #[arg(long, default_value = "")]
    pub(crate) cmdline: String,
    /// Number of vCPUs (the application processors stay parked until the
    /// guest starts them).
    #[arg(long, default_value_t = 1)]
    pub(crate) vcpus: u32,
    #[command(flatten)]
    pub(crate) common: Common,
}

/// `refvmm receive`: wait for one incoming migration, then run the
/// migrated guest.
#[derive(clap::Args)]
pub(crate) struct ReceiveArgs {
    /// Where to listen: tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    pub(crate) listen: String,
    /// Expected guest memory; if given, a source with a different size is
    /// refused in the handshake, and the KVM VM with its memory slots is
    /// made before listening, outside the source's set-up (default: take
    /// the size from the stream and make the VM then).
    #[arg(long)]
    pub(crate) memory: Option<String>,
    /// Expected vCPU count (default: take it from the stream).
    #[arg(long)]
    pub(crate) vcpus: Option<u32>,
    #[command(flatten)]
    pub(crate) settings: ReceiveSettings,
    /// Leave the migrated guest paused until an API `resume` (for
    /// comparing memory with a source kept by `keep_source`).
    #[arg(long)]
    pub(crate) start_paused: bool,
    /// Receive buffer of each accepted TCP connection (`SO_RCVBUF`), in
    /// bytes (or with a K/M/G suffix), or `auto` for the kernel's autotuning
    /// (default: the engine's 1 MiB, `livemig::transport::DEFAULT_RECEIVE_BUFFER`;
    /// see docs/operations.md).
    #[arg(long, value_name = "BYTES|auto")]
    pub(crate) receive_buffer: Option<String>,
    /// After a link break during post-copy, wait at most this long
    /// (seconds) for the source to resume, then give the guest up (default:
    /// wait without limit; the guest waits for its missing pages meanwhile).
    #[arg(long, value_name = "SECS")]
    pub(crate) postcopy_resume_timeout: Option<u64>,
    #[command(flatten)]
    pub(crate) tls: TlsArgs,
    #[command(flatten)]
    pub(crate) common: Common,
}

/// The options only `receive` has that `upgrade` carries to the new VMM
/// (which is a `receive`); a VMM started by `run` has the defaults. A new
/// field here is carried without more code (`carry.rs`). Not here, and not
/// carried: `--listen` (the new VMM listens on a private socket),
/// `--memory`/`--vcpus` (they come with the guest), `--start-paused` (the
/// guest's paused or running state comes with it), TLS (no connection
/// but the local one).
#[derive(clap::Args, Clone, Debug, PartialEq, Serialize)]
pub(crate) struct ReceiveSettings {
    /// Seconds without data from the source before giving up.
    #[arg(long, default_value_t = 10)]
    pub(crate) io_timeout: u64,
    /// Do not announce the NICs after the switchover (for tests that
    /// show what happens without the announce): turns off both the
    /// VMM's RARP / gratuitous-ARP announce and the guest announce
    /// request (virtio-net VIRTIO_NET_S_ANNOUNCE).
    #[arg(long)]
    pub(crate) no_announce: bool,
}

impl Default for ReceiveSettings {
    /// The clap defaults (a test checks they agree).
    fn default() -> Self {
        ReceiveSettings {
            io_timeout: 10,
            no_announce: false,
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Boot a Multiboot v1 kernel and run it.
    Run(RunArgs),
    /// Wait for one incoming migration, then run the migrated guest.
    Receive(ReceiveArgs),
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
        auto: crate::auto::AutoArgs,
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
    Agent(crate::agent::AgentArgs),
    /// Move every VM of this host (their API sockets) to hosts chosen from
    /// live facts, at most N at a time (see docs/operations.md).
    Evacuate(crate::evacuate::EvacuateArgs),
    /// Upgrade the VMM under a running guest: the VMM at --api-socket starts
    /// --binary as `receive` on a private Unix socket (with its own
    /// --serial, --console, --dirty-log and --api-socket), hands the guest
    /// over locally (memory memfds and TAP descriptors pass; no page is
    /// copied; needs `--memory-backend memfd`) and exits; the new VMM takes
    /// over the API socket path, the console socket and the NICs. On a
    /// failure before the switchover the old VMM keeps the guest and stops
    /// the new one. Exit codes as for `migrate`.
    Upgrade {
        /// The running VMM's API socket.
        #[arg(long)]
        api_socket: PathBuf,
        /// The new refvmm binary.
        #[arg(long)]
        binary: PathBuf,
    },
    /// Write the built-in test guest image (a Multiboot v1 ELF32) to a file,
    /// e.g. to boot it with `qemu-system-x86_64 -kernel`.
    GuestImage {
        /// Output path.
        #[arg(long)]
        out: PathBuf,
    },
}

/// An error with the process exit code it maps to.
pub(crate) struct Fail(pub(crate) u8, pub(crate) String);

pub(crate) fn usage(msg: impl Into<String>) -> Fail {
    Fail(2, msg.into())
}

pub(crate) fn runtime(msg: impl Into<String>) -> Fail {
    Fail(1, msg.into())
}

pub(crate) fn parse_size(s: &str) -> Result<u64, Fail> {
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

pub(crate) fn parse_serial(s: &str) -> Result<SerialOutput, Fail> {
    match s {
        "stdio" => Ok(SerialOutput::Stdout),
        "none" => Ok(SerialOutput::None),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialOutput::File(PathBuf::from(p))),
            _ => match s.strip_prefix("append:") {
                Some(p) if !p.is_empty() => std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(p)
                    .map(|f| SerialOutput::Writer(Box::new(f)))
                    .map_err(|e| usage(format!("--serial '{s}': {e}"))),
                _ => Err(usage(format!(
                    "--serial '{s}': expected stdio, file:<PATH>, append:<PATH> or none"
                ))),
            },
        },
    }
}

/// `--memory-backend` and `--thp` of `common`.
pub(crate) fn parse_memory_options(common: &Common) -> Result<livemig_kvm::MemoryOptions, Fail> {
    let backend = common
        .memory_backend
        .parse()
        .map_err(|e: livemig_kvm::memfd::MemfdError| usage(format!("--memory-backend: {e}")))?;
    let thp = common
        .thp
        .parse()
        .map_err(|e| usage(format!("--thp {e}")))?;
    Ok(livemig_kvm::MemoryOptions { backend, thp })
}

pub(crate) fn parse_dirty(s: &str) -> Result<Option<DirtyMode>, Fail> {
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
