//! The API socket: line-delimited JSON requests on a Unix socket, one
//! client at a time. Each request is one JSON object on one line; each
//! reply is one or more JSON lines, the last with a `"result"` field.
//!
//! | request | reply |
//! |---|---|
//! | `{"cmd":"status"}` | `{"result":"ok","running":true,"migration":"idle","vcpus":1,"memory":...}` (`migration`: `idle`, `migrating`, `migrated` or `ambiguous`) |
//! | `{"cmd":"pause"}` / `{"cmd":"resume"}` | `{"result":"ok"}`; refused with `{"result":"error","error":"refused: ..."}` while a migration runs and for good after one succeeded or became ambiguous (`livemig::MigrationGuard`) |
//! | `{"cmd":"migrate","to":"tcp:HOST:PORT","downtime_limit_ms":20,"max_bandwidth_mib":0,"keep_source":false}` | progress lines `{"event":...}`, then `{"result":"ok","report":{...}}` or `{"result":"error","phase":...,"error":...}` |
//! | `... "tls":{"cert":P,"key":P,"ca":P,"server_name":S}` in `migrate` | migrate over mutual TLS |
//! | `... "streams":N` in `migrate` | spread the pages over N extra connections (1..=16) |
//! | `... "compress":true` in `migrate` | LZ4-compress page frames |
//! | a second `migrate` while one runs, or after one succeeded or became ambiguous | `{"result":"error","phase":"handshake","error":"... refused: ..."}` |
//! | `{"cmd":"write-memory","gpa":N,"value":N}` | writes a u64 through vm-memory (tracked as a VMM write) |
//! | `{"cmd":"read-memory","gpa":N,"len":N}` | `{"result":"ok","hex":"..."}` (at most 4096 bytes) |
//! | `{"cmd":"vcpu-regs"}` | RIP, RSP, RFLAGS, CS, CR0, EFER, APIC base and MP state of every vCPU (pauses briefly) |
//! | `{"cmd":"net-stats"}` | per NIC: frames the virtio-net device read from its TAP (`rx_frames`, delivered or dropped) and how many were unicast to the guest MAC, frames delivered to / dropped for the guest, frames the guest sent |
//! | `{"cmd":"announce-self"}` | one RARP (+ gratuitous ARP) per NIC now, like QEMU's `announce-self` |
//! | `{"cmd":"memory-hash"}` | FNV-1a hash of each memory region (pause first for a stable answer) |
//! | `{"cmd":"quit"}` | `{"result":"ok"}`, then the VMM exits |

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use livemig::memory::GuestRam;
use livemig::policy::{MigrationConfig, OnLimit};
use livemig::transport::{connect, Dialer, Endpoint, StreamOpener};
use livemig::vm::SourceVm;
use livemig::CancelToken;
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::vmm::Machine;

/// What the API tells the main loop.
pub enum ApiEvent {
    /// The guest now runs elsewhere: exit 0.
    Migrated,
    /// The guest's fate is unknown (split-brain guard): exit 3, never resume.
    Ambiguous(String),
    /// Asked to quit.
    Quit,
}

/// Starts the API server thread on `path`.
pub fn serve(path: &Path, machine: Arc<Machine>, events: Sender<ApiEvent>) -> Result<(), String> {
    if path.exists() {
        // A stale socket from an earlier run: refuse if someone listens on it.
        if UnixStream::connect(path).is_ok() {
            return Err(format!("API socket {} is in use", path.display()));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("API socket {}: {e}", path.display()))?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            // One thread per client, so status/pause/write requests are
            // answered while a migration request runs.
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => {
                        let machine = machine.clone();
                        let events = events.clone();
                        let spawned = std::thread::Builder::new().name("api-client".into()).spawn(
                            move || {
                                if let Err(e) = handle(c, &machine, &events) {
                                    log::warn!("API client: {e}");
                                }
                            },
                        );
                        if let Err(e) = spawned {
                            log::warn!("API client thread: {e}");
                        }
                    }
                    Err(e) => log::warn!("API accept: {e}"),
                }
            }
        })
        .map_err(|e| format!("API thread: {e}"))?;
    Ok(())
}

fn send(w: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    w.write_all(line.as_bytes())
}

fn hash_regions(mem: &GuestRam) -> Vec<Value> {
    let mut out = Vec::new();
    for r in mem.iter() {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        while off < r.len() {
            let n = (r.len() - off).min(buf.len() as u64) as usize;
            if mem
                .read_slice(&mut buf[..n], GuestAddress(r.start_addr().0 + off))
                .is_err()
            {
                break;
            }
            for b in &buf[..n] {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            off += n as u64;
        }
        out.push(json!({"gpa": r.start_addr().0, "size": r.len(), "fnv1a": format!("{h:016x}")}));
    }
    out
}

fn handle(conn: UnixStream, m: &Arc<Machine>, events: &Sender<ApiEvent>) -> Result<(), String> {
    let mut w = conn.try_clone().map_err(|e| e.to_string())?;
    let reader = BufReader::new(conn);
    for line in reader.lines() {
        let line = line.map_err(|e| e.to_string())?;
        if line.trim().is_empty() {
            continue;
        }
        let req: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                send(
                    &mut w,
                    &json!({"result":"error","error":format!("bad request: {e}")}),
                )
                .map_err(|e| e.to_string())?;
                continue;
            }
        };
        let reply = match req["cmd"].as_str().unwrap_or("") {
            "status" => json!({
                "result": "ok",
                "running": m.vm.vcpus().is_running(),
                "migration": match m.guard.state() {
                    livemig::GuardState::Idle => "idle",
                    livemig::GuardState::Migrating => "migrating",
                    livemig::GuardState::Migrated => "migrated",
                    livemig::GuardState::Ambiguous => "ambiguous",
                },
                "vcpus": m.vm.vcpus().len(),
                "memory": m.vm.memory().iter().map(|r| r.len()).sum::<u64>(),
            }),
            // Through the migration guard: refused while a migration runs
            // and for good after one committed or became ambiguous.
            "pause" => match m.guard.pause(&**m) {
                Ok(()) => json!({"result":"ok"}),
                Err(e) => json!({"result":"error","error":e.to_string()}),
            },
            "resume" => match m.guard.resume(&**m) {
                Ok(()) => json!({"result":"ok"}),
                Err(e) => json!({"result":"error","error":e.to_string()}),
            },
            "write-memory" => {
                let gpa = req["gpa"].as_u64();
                let value = req["value"].as_u64();
                match (gpa, value) {
                    (Some(gpa), Some(value)) => match m.device_write(gpa, value) {
                        Ok(()) => json!({"result":"ok"}),
                        Err(e) => json!({"result":"error","error":e}),
                    },
                    _ => {
                        json!({"result":"error","error":"write-memory needs numeric gpa and value"})
                    }
                }
            }
            "vcpu-regs" => {
                // Debug aid: pause, read every vCPU's RIP/RSP/RFLAGS/CR0/EFER/APIC base/mp_state,
                // resume if it ran.
                let was_running = m.vm.vcpus().is_running();
                let mut out = Vec::new();
                if m.vm.pause_vcpus().is_ok() {
                    for i in 0..m.vm.vcpus().len() {
                        let r = m.vm.with_vcpu(i, |fd| {
                            let regs = fd.get_regs().ok();
                            let sregs = fd.get_sregs().ok();
                            let mp = fd.get_mp_state().ok();
                            json!({
                                "rip": regs.map(|r| format!("0x{:x}", r.rip)),
                                "rsp": regs.map(|r| format!("0x{:x}", r.rsp)),
                                "rflags": regs.map(|r| format!("0x{:x}", r.rflags)),
                                "cs": sregs.map(|s| format!("0x{:x}", s.cs.selector)),
                                "cr0": sregs.map(|s| format!("0x{:x}", s.cr0)),
                                "efer": sregs.map(|s| format!("0x{:x}", s.efer)),
                                "apic_base": sregs.map(|s| format!("0x{:x}", s.apic_base)),
                                "mp_state": mp.map(|m| m.mp_state),
                            })
                        });
                        out.push(r.unwrap_or_else(|e| json!({"error": e.to_string()})));
                    }
                    if was_running {
                        m.vm.resume_vcpus();
                    }
                }
                json!({"result":"ok","vcpus": out})
            }
            "read-memory" => {
                let gpa = req["gpa"].as_u64().unwrap_or(0);
                let len = req["len"].as_u64().unwrap_or(8).min(4096) as usize;
                let mut buf = vec![0u8; len];
                match m.vm.memory().read_slice(&mut buf, GuestAddress(gpa)) {
                    Ok(()) => {
                        json!({"result":"ok","hex": buf.iter().map(|b| format!("{b:02x}")).collect::<String>()})
                    }
                    Err(e) => json!({"result":"error","error":format!("read at 0x{gpa:x}: {e}")}),
                }
            }
            "net-stats" => {
                let nics: Vec<Value> = m
                    .nets
                    .iter()
                    .zip(&m.nic_counters)
                    .map(|(n, c)| {
                        let s = c.snapshot();
                        json!({
                            "tap": n.tap,
                            "mac": livemig_announce::format_mac(&n.mac),
                            "rx_frames": s.backend_rx,
                            "rx_to_guest_mac": s.backend_rx_to_mac,
                            "rx_delivered": s.rx_delivered,
                            "rx_dropped": s.rx_dropped,
                            "tx_frames": s.tx_frames,
                            "tx_dropped": s.tx_dropped,
                        })
                    })
                    .collect();
                json!({"result":"ok","nics": nics})
            }
            "announce-self" => {
                // Like QEMU's announce-self: one RARP (+ gratuitous ARP) per NIC now.
                let one = livemig_announce::Schedule {
                    rounds: 1,
                    ..Default::default()
                };
                match crate::net::start_announce(&m.nets, &one, std::time::Instant::now()) {
                    Ok(h) => {
                        json!({"result":"ok","report": serde_json::to_value(h.join()).unwrap_or_default()})
                    }
                    Err(e) => json!({"result":"error","error":e}),
                }
            }
            "memory-hash" => json!({"result":"ok","regions": hash_regions(m.vm.memory())}),
            "quit" => {
                send(&mut w, &json!({"result":"ok"})).map_err(|e| e.to_string())?;
                let _ = events.send(ApiEvent::Quit);
                return Ok(());
            }
            "migrate" => {
                let r = do_migrate(&req, m, &mut w);
                match r {
                    Ok(report) => {
                        // The guest runs on the destination now: the NICs
                        // here only count what still arrives.
                        m.migrated_away();
                        send(&mut w, &json!({"result":"ok","report":report}))
                            .map_err(|e| e.to_string())?;
                        // keep_source (for tests): stay, paused, so the
                        // source memory can be compared with the destination.
                        if req["keep_source"].as_bool() != Some(true) {
                            let _ = events.send(ApiEvent::Migrated);
                        }
                        return Ok(());
                    }
                    Err((v, ambiguous)) => {
                        send(&mut w, &v).map_err(|e| e.to_string())?;
                        if let Some(msg) = ambiguous {
                            let _ = events.send(ApiEvent::Ambiguous(msg));
                        }
                        continue;
                    }
                }
            }
            other => json!({"result":"error","error":format!("unknown command '{other}'")}),
        };
        send(&mut w, &reply).map_err(|e| e.to_string())?;
    }
    Ok(())
}

type MigrateError = (Value, Option<String>);

fn do_migrate(req: &Value, m: &Arc<Machine>, w: &mut UnixStream) -> Result<Value, MigrateError> {
    let err = |msg: String| (json!({"result":"error","phase":"setup","error":msg}), None);
    // Refuse before connecting anywhere (the engine's guard checks again).
    m.guard.check().map_err(|e| err(e.to_string()))?;
    let to = req["to"]
        .as_str()
        .ok_or_else(|| err("migrate needs \"to\"".into()))?;
    let endpoint: Endpoint = to.parse().map_err(|e| err(format!("{e}")))?;
    let mut cfg = MigrationConfig::default();
    if let Some(ms) = req["downtime_limit_ms"].as_u64() {
        cfg.downtime_limit = Duration::from_millis(ms);
    }
    if let Some(mib) = req["max_bandwidth_mib"].as_u64().filter(|v| *v > 0) {
        cfg.max_bandwidth = Some(mib << 20);
    }
    if let Some(r) = req["max_rounds"].as_u64() {
        cfg.max_rounds = r.clamp(1, 10_000) as u32;
    }
    if req["force"].as_bool() == Some(true) {
        cfg.on_limit = OnLimit::ForceSwitchover;
    }
    if let Some(n) = req["streams"].as_u64() {
        if n == 0 || n > u64::from(livemig::protocol::MAX_STREAMS) {
            return Err(err(format!(
                "streams {n} is outside 1..={}",
                livemig::protocol::MAX_STREAMS
            )));
        }
        cfg.streams = n as u32;
    }
    cfg.compress = req["compress"].as_bool() == Some(true);
    let mut opener: Box<dyn StreamOpener>;
    let transport = if req["tls"].is_object() {
        let path = |k: &str| {
            req["tls"][k]
                .as_str()
                .map(std::path::PathBuf::from)
                .ok_or_else(|| err(format!("tls.{k} missing")))
        };
        let cfg = livemig_tls::TlsConfig {
            cert_chain: path("cert")?,
            key: path("key")?,
            ca: path("ca")?,
            server_name: req["tls"]["server_name"].as_str().map(str::to_string),
        };
        let id = cfg.load().map_err(|e| err(e.to_string()))?;
        let t = livemig_tls::connect_tls(&endpoint, &id, Some(Duration::from_secs(10)))
            .map_err(|e| err(format!("connecting to {endpoint}: {e}")))?;
        opener = Box::new(livemig_tls::TlsDialer {
            endpoint: endpoint.clone(),
            id,
            timeout: Some(Duration::from_secs(10)),
        });
        t
    } else {
        opener = Box::new(Dialer {
            endpoint: endpoint.clone(),
            timeout: Some(Duration::from_secs(10)),
        });
        connect(&endpoint, Some(Duration::from_secs(10)))
            .map_err(|e| err(format!("connecting to {endpoint}: {e}")))?
    };
    let mut progress_out = w.try_clone().ok();
    let result = m.guard.migrate_streams(
        &**m,
        transport,
        Some(&mut *opener),
        &cfg,
        &CancelToken::new(),
        &mut |p| {
            if let Some(o) = progress_out.as_mut() {
                if let Ok(v) = serde_json::to_value(p) {
                    let _ = send(o, &v);
                }
            }
        },
    );
    match result {
        Ok(report) => serde_json::to_value(&report).map_err(|e| err(e.to_string())),
        Err(e) => {
            let ambiguous = e.is_ambiguous().then(|| e.to_string());
            Err((
                json!({"result":"error","phase":e.phase.to_string(),"error":e.to_string()}),
                ambiguous,
            ))
        }
    }
}

/// Client side: sends one request and returns every reply line; `on_line`
/// sees each as it arrives.
pub fn request(path: &Path, req: &Value, mut on_line: impl FnMut(&Value)) -> Result<Value, String> {
    let mut c = UnixStream::connect(path)
        .map_err(|e| format!("cannot connect to API socket {}: {e}", path.display()))?;
    send(&mut c, req).map_err(|e| e.to_string())?;
    let reader = BufReader::new(c);
    for line in reader.lines() {
        let line = line.map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&line).map_err(|e| format!("bad reply: {e}"))?;
        if v.get("result").is_some() {
            return Ok(v);
        }
        on_line(&v);
    }
    Err("the VMM closed the API connection without a result".into())
}
