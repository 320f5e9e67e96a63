//! Drive QEMU as the peer to compare with: a source and a destination
//! `qemu-system-x86_64` booting the same test guest (Multiboot `-kernel`),
//! the guest's serial output on a pipe timestamped byte by byte exactly as
//! [`crate::harness`] does for `refvmm`, and migration through QMP on a Unix
//! socket (`migrate-set-parameters`, `migrate`, `query-migrate`).
//!
//! Everything here is optional equipment: [`qemu_path`] says whether QEMU is
//! installed, and callers skip (with a printed reason) when it is not.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{lock, spawn_captured, wait_for_log, Captured, GuestLog};

/// The QEMU binary: `$QEMU` if set, else `qemu-system-x86_64` found on
/// `$PATH`; `None` when neither exists.
pub fn qemu_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("QEMU") {
        let p = PathBuf::from(p);
        return p.exists().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}

/// The first line of `qemu --version` (e.g. `QEMU emulator version 7.2.22 (...)`).
pub fn qemu_version(qemu: &Path) -> Result<String, String> {
    let out = Command::new(qemu)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{} --version: {e}", qemu.display()))?;
    let s = String::from_utf8_lossy(&out.stdout);
    s.lines()
        .next()
        .map(str::to_string)
        .ok_or_else(|| format!("{} --version printed nothing", qemu.display()))
}

/// qboot, the fast BIOS (Debian's `qemu-system-data`), when installed.
pub fn qboot_path() -> Option<PathBuf> {
    [
        "/usr/share/qemu/qboot.rom",
        "/usr/share/qemu-system-data/qboot.rom",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// Writes the test guest's Multiboot ELF (as `refvmm guest-image` does) to
/// `dir/guest.elf` and returns its path.
pub fn write_guest_image(dir: &Path) -> Result<PathBuf, String> {
    let img = livemig_testguest::image().map_err(|e| format!("guest image: {e}"))?;
    let p = dir.join("guest.elf");
    std::fs::write(&p, img).map_err(|e| format!("writing {}: {e}", p.display()))?;
    Ok(p)
}

/// How to start a QEMU VM. Source and destination must use the same config.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The Multiboot kernel (see [`write_guest_image`]).
    pub kernel: PathBuf,
    /// The guest's command line (`-append`).
    pub cmdline: String,
    /// Guest memory in MiB (`-m`, in a `memory-backend-ram` with `reserve=off`).
    pub memory_mib: u64,
    /// Number of vCPUs (`-smp`).
    pub vcpus: u32,
    /// The BIOS (`-bios`); `None` keeps QEMU's default (SeaBIOS, slower to boot).
    pub bios: Option<PathBuf>,
}

impl QemuConfig {
    /// The command line shared by source and destination.
    fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "-enable-kvm",
            // Plain `-cpu host` aborts on PVM (MSR 0x10a cannot be set).
            "-cpu",
            "host,-arch-capabilities",
            "-machine",
            "pc,memory-backend=ram0",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-chardev",
            "stdio,id=ser0,signal=off",
            "-serial",
            "chardev:ser0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend([
            // The RAM as a backend with `reserve=off` (`MAP_NORESERVE`), as refvmm maps its
            // RAM: a guest larger than the host's memory and swap (a sparse 64 GiB guest on a
            // 24 GiB host) starts, where plain `-m` fails "Cannot allocate memory" under the
            // kernel's default overcommit heuristic. Same memory otherwise.
            "-object".into(),
            format!(
                "memory-backend-ram,id=ram0,size={}M,reserve=off",
                self.memory_mib
            ),
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-smp".into(),
            self.vcpus.to_string(),
            "-kernel".into(),
            self.kernel.to_string_lossy().into_owned(),
            "-append".into(),
            self.cmdline.clone(),
        ]);
        if let Some(b) = &self.bios {
            a.extend(["-bios".into(), b.to_string_lossy().into_owned()]);
        }
        a
    }
}

/// A QMP connection (Unix socket, capabilities negotiated).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Asynchronous events received while waiting for replies.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects to `path` (retrying until `timeout`), reads the greeting and
    /// sends `qmp_capabilities`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("QMP {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let writer = s.try_clone().map_err(|e| e.to_string())?;
        let mut q = Qmp {
            reader: BufReader::new(s),
            writer,
            events: Vec::new(),
        };
        let greeting = q.read_msg()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("QMP: unexpected greeting {greeting}"));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_msg(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("QMP read: {e}"))?;
        if n == 0 {
            return Err("QMP: connection closed".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP: bad message '{}': {e}", line.trim()))
    }

    /// Turns on the `multifd` capability with `channels` channels (both
    /// sides need it, the destination before `migrate-incoming`).
    pub fn set_multifd(&mut self, channels: u32) -> Result<(), String> {
        self.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "multifd", "state": true}]}),
        )?;
        self.execute(
            "migrate-set-parameters",
            json!({ "multifd-channels": channels }),
        )?;
        Ok(())
    }

    /// Runs one command; returns its `return` value, or the QMP error as text.
    /// Events that arrive meanwhile are kept in [`Qmp::events`].
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let mut req = json!({ "execute": cmd });
        if args.as_object().is_some_and(|o| !o.is_empty()) {
            req["arguments"] = args;
        }
        let mut line = req.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let v = self.read_msg()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {cmd}: {e}"));
            }
            return Err(format!("QMP {cmd}: unexpected reply {v}"));
        }
    }
}

/// A running QEMU process with its guest's serial log and a QMP connection.
pub struct QemuVm {
    child: Child,
    qmp_path: PathBuf,
    /// The QMP connection.
    pub qmp: Qmp,
    /// The guest's serial output, parsed and timestamped.
    pub log: Arc<Mutex<GuestLog>>,
    /// QEMU's stderr, captured.
    pub stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    /// Name for messages.
    pub name: String,
}

impl QemuVm {
    /// Starts a QEMU that boots the guest.
    pub fn start_source(dir: &Path, name: &str, cfg: &QemuConfig) -> Result<QemuVm, String> {
        Self::spawn(dir, name, cfg, &[], &[])
    }

    /// Starts a QEMU that boots the guest, run as `<prefix...> qemu ...`
    /// (e.g. `ip netns exec NS`, see [`crate::link::ShapedLink::exec_prefix`]).
    pub fn start_source_in(
        dir: &Path,
        name: &str,
        cfg: &QemuConfig,
        prefix: &[String],
    ) -> Result<QemuVm, String> {
        Self::spawn(dir, name, cfg, prefix, &[])
    }

    /// Starts a QEMU that waits for an incoming migration and listens on a
    /// free loopback TCP port; returns it and the URI to migrate to.
    pub fn start_destination(
        dir: &Path,
        name: &str,
        cfg: &QemuConfig,
    ) -> Result<(QemuVm, String), String> {
        Self::start_destination_on(dir, name, cfg, &[], "127.0.0.1", None)
    }

    /// Starts a QEMU that waits for an incoming migration, run as
    /// `<prefix...> qemu ...`, listening on `host` (any port); with
    /// `multifd_channels`, the `multifd` capability and that many channels
    /// are set before it listens (the source must use the same). Returns
    /// it and the URI to migrate to.
    pub fn start_destination_on(
        dir: &Path,
        name: &str,
        cfg: &QemuConfig,
        prefix: &[String],
        host: &str,
        multifd_channels: Option<u32>,
    ) -> Result<(QemuVm, String), String> {
        let mut vm = Self::spawn(
            dir,
            name,
            cfg,
            prefix,
            &["-incoming".into(), "defer".into()],
        )?;
        if let Some(n) = multifd_channels {
            vm.qmp.set_multifd(n)?;
        }
        vm.qmp.execute(
            "migrate-incoming",
            json!({ "uri": format!("tcp:{host}:0") }),
        )?;
        let q = vm.qmp.execute("query-migrate", json!({}))?;
        let port = q["socket-address"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["type"] == "inet"))
            .and_then(|s| s["port"].as_str().map(str::to_string))
            .ok_or_else(|| format!("{name}: no listening port in {q}"))?;
        Ok((vm, format!("tcp:{host}:{port}")))
    }

    fn spawn(
        dir: &Path,
        name: &str,
        cfg: &QemuConfig,
        prefix: &[String],
        extra: &[String],
    ) -> Result<QemuVm, String> {
        let qmp_path = dir.join(format!("{name}.qmp"));
        let _ = std::fs::remove_file(&qmp_path);
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&cfg.qemu);
                c
            }
            None => Command::new(&cfg.qemu),
        };
        cmd.args(cfg.args())
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .args(extra)
            .stdin(Stdio::null());
        let Captured {
            mut child,
            log,
            stderr,
            readers,
            ..
        } = spawn_captured(&mut cmd, &cfg.qemu.display().to_string(), "qemu")?;
        let qmp = match Qmp::connect(&qmp_path, Duration::from_secs(20)) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                for r in readers {
                    let _ = r.join();
                }
                let _ = std::fs::remove_file(&qmp_path);
                return Err(format!("{name}: {e}; stderr:\n{}", lock(&stderr)));
            }
        };
        Ok(QemuVm {
            child,
            qmp_path,
            qmp,
            log,
            stderr,
            readers,
            name: name.to_string(),
        })
    }

    /// Captured stderr so far.
    pub fn stderr(&self) -> String {
        lock(&self.stderr).clone()
    }

    /// Number of heartbeats seen.
    pub fn heartbeat_count(&self) -> usize {
        lock(&self.log).heartbeats.len()
    }

    /// The guest's parsed serial log.
    pub fn log(&self) -> std::sync::MutexGuard<'_, GuestLog> {
        lock(&self.log)
    }

    /// Waits until `pred(log)` holds, or fails after `timeout` (or if QEMU exits;
    /// a last look at the log after 50 ms for what it printed last).
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&GuestLog) -> bool,
    ) -> Result<(), String> {
        wait_for_log(
            &self.name,
            &mut self.child,
            &self.log,
            &self.stderr,
            what,
            timeout,
            pred,
        )
    }

    /// Waits for `READY`.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        self.wait_for("READY", timeout, |g| g.ready)
    }

    /// Waits for `n` more heartbeats.
    pub fn wait_heartbeats(&mut self, n: usize, timeout: Duration) -> Result<(), String> {
        let have = self.heartbeat_count();
        self.wait_for(&format!("{n} heartbeats"), timeout, |g| {
            g.heartbeats.len() >= have + n
        })
    }

    /// Migrates this (source) VM to `uri` with QEMU's own precopy:
    /// sets the parameters, starts `migrate`, and polls `query-migrate`
    /// every `poll` until the status is final. Returns QEMU's figures.
    pub fn migrate(&mut self, uri: &str, params: &QemuMigrateParams) -> Result<QemuReport, String> {
        let mut p = json!({});
        if let Some(ms) = params.downtime_limit_ms {
            p["downtime-limit"] = json!(ms);
        }
        if let Some(b) = params.max_bandwidth {
            p["max-bandwidth"] = json!(b);
        }
        if p.as_object().is_some_and(|o| !o.is_empty()) {
            self.qmp.execute("migrate-set-parameters", p)?;
        }
        if let Some(n) = params.multifd_channels {
            self.qmp.set_multifd(n)?;
        }
        let effective = self.qmp.execute("query-migrate-parameters", json!({}))?;
        self.qmp.execute("migrate", json!({ "uri": uri }))?;
        let deadline = Instant::now() + params.timeout;
        let mut ended = None;
        loop {
            let q = self.qmp.execute("query-migrate", json!({}))?;
            let status = q["status"].as_str().unwrap_or("").to_string();
            match status.as_str() {
                // QEMU 7.2 sets `completed` before it computes `total-time`
                // and `downtime` (`migration_completion`, then
                // `migration_calculate_complete`): a poll in between reads
                // both as 0 (seen once in 2026-12-04's runs). Poll on until
                // they are there; the completion is when it was first seen.
                "completed" => {
                    let at = *ended.get_or_insert_with(Instant::now);
                    if QemuReport::times_are_set(&q) {
                        return Ok(QemuReport::from_query(&q, &effective, at));
                    }
                }
                "failed" | "cancelled" => {
                    return Err(format!(
                        "{}: migration {status}: {}",
                        self.name,
                        q["error-desc"].as_str().unwrap_or("(no description)")
                    ));
                }
                _ => {}
            }
            if Instant::now() > deadline && ended.is_some() {
                return Err(format!(
                    "{}: migration completed but QEMU reported no total time and downtime within \
                     {:?} (last: {q}): not a measurement",
                    self.name, params.timeout
                ));
            }
            if Instant::now() > deadline {
                let _ = self.qmp.execute("migrate_cancel", json!({}));
                return Err(format!(
                    "{}: migration not complete after {:?} (last status {status}: {q})",
                    self.name, params.timeout
                ));
            }
            std::thread::sleep(params.poll);
        }
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let _ = std::fs::remove_file(&self.qmp_path);
    }
}

/// Parameters for [`QemuVm::migrate`].
#[derive(Debug, Clone)]
pub struct QemuMigrateParams {
    /// `downtime-limit` in ms; `None` keeps QEMU's default (300 ms).
    pub downtime_limit_ms: Option<u64>,
    /// `max-bandwidth` in bytes/s; `None` keeps QEMU's default (128 MiB/s in 7.2).
    pub max_bandwidth: Option<u64>,
    /// `multifd` with this many channels (the destination must have been
    /// started with the same, see [`QemuVm::start_destination_on`]);
    /// `None` leaves the capability as it is (off unless set earlier).
    pub multifd_channels: Option<u32>,
    /// Interval between `query-migrate` polls.
    pub poll: Duration,
    /// Give up (and `migrate_cancel`) after this long.
    pub timeout: Duration,
}

impl Default for QemuMigrateParams {
    fn default() -> Self {
        QemuMigrateParams {
            downtime_limit_ms: None,
            max_bandwidth: None,
            multifd_channels: None,
            poll: Duration::from_millis(5),
            timeout: Duration::from_secs(120),
        }
    }
}

/// What QEMU reported about a completed migration (`query-migrate`).
#[derive(Debug, Clone)]
pub struct QemuReport {
    /// When the bench saw the `completed` status.
    pub completed_at: Instant,
    /// `downtime` (ms): QEMU's own measure of the stop-and-copy phase.
    pub downtime_ms: f64,
    /// `total-time` (ms).
    pub total_ms: f64,
    /// `setup-time` (ms).
    pub setup_ms: f64,
    /// `ram.transferred` (bytes).
    pub ram_transferred: u64,
    /// `ram.total` (bytes).
    pub ram_total: u64,
    /// `ram.duplicate` (pages sent as "all zero").
    pub ram_duplicate_pages: u64,
    /// `ram.normal` (pages sent in full).
    pub ram_normal_pages: u64,
    /// `ram.dirty-sync-count` (bitmap syncs: about the number of rounds + 1).
    pub dirty_sync_count: u64,
    /// `ram.mbps` as QEMU computed it.
    pub mbps: f64,
    /// The downtime limit in effect (ms).
    pub downtime_limit_ms: u64,
    /// The bandwidth cap in effect (bytes/s).
    pub max_bandwidth: u64,
    /// The raw `query-migrate` reply.
    pub raw: Value,
}

impl QemuReport {
    /// Whether a `completed` reply carries its times (`total-time` above
    /// 0, `downtime` present): see [`QemuVm::migrate`].
    fn times_are_set(q: &Value) -> bool {
        q["total-time"].as_f64().is_some_and(|t| t > 0.0) && q["downtime"].as_f64().is_some()
    }

    fn from_query(q: &Value, params: &Value, completed_at: Instant) -> QemuReport {
        let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        let u = |v: &Value| v.as_u64().unwrap_or(0);
        QemuReport {
            completed_at,
            downtime_ms: f(&q["downtime"]),
            total_ms: f(&q["total-time"]),
            setup_ms: f(&q["setup-time"]),
            ram_transferred: u(&q["ram"]["transferred"]),
            ram_total: u(&q["ram"]["total"]),
            ram_duplicate_pages: u(&q["ram"]["duplicate"]),
            ram_normal_pages: u(&q["ram"]["normal"]),
            dirty_sync_count: u(&q["ram"]["dirty-sync-count"]),
            mbps: f(&q["ram"]["mbps"]),
            downtime_limit_ms: u(&params["downtime-limit"]),
            max_bandwidth: u(&params["max-bandwidth"]),
            raw: q.clone(),
        }
    }

    /// The figures as JSON (for summaries).
    pub fn to_json(&self) -> Value {
        json!({
            "downtime_ms": self.downtime_ms,
            "total_ms": self.total_ms,
            "setup_ms": self.setup_ms,
            "ram_transferred": self.ram_transferred,
            "ram_total": self.ram_total,
            "ram_duplicate_pages": self.ram_duplicate_pages,
            "ram_normal_pages": self.ram_normal_pages,
            "dirty_sync_count": self.dirty_sync_count,
            "mbps": self.mbps,
            "downtime_limit_ms": self.downtime_limit_ms,
            "max_bandwidth": self.max_bandwidth,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::QemuReport;
    use serde_json::json;

    /// QEMU 7.2 answers `completed` a moment before it fills in the times:
    /// that reply is no measurement; the one after it is.
    #[test]
    fn a_completed_reply_without_its_times_is_no_measurement() {
        let early = json!({"status":"completed","total-time":0,"downtime":0});
        let missing = json!({"status":"completed","total-time":5699});
        let full = json!({"status":"completed","total-time":5699,"downtime":6});
        assert!(!QemuReport::times_are_set(&early));
        assert!(!QemuReport::times_are_set(&missing));
        assert!(QemuReport::times_are_set(&full));
    }
}
