//! `refvmm demo`: a complete live migration on one machine, with a report.
//!
//! Starts a source `refvmm run` with the test guest dirtying memory, a
//! destination `refvmm receive` on a loopback TCP port, migrates, then shows
//! the engine's report and what the guest saw: the switchover gap (last
//! heartbeat from the source → first from the destination, timestamped as
//! the serial bytes arrive) and the largest heartbeat gap during the whole
//! migration.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{
    blackout, largest_gap, log_of, migrate, scratch_dir, start_destination, start_source,
};

/// Options of `refvmm demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Guest memory.
    #[arg(long, default_value = "512M")]
    pub memory: String,
    /// Test guest working set, MiB.
    #[arg(long, default_value_t = 128)]
    pub ws: u64,
    /// Pages the guest dirties per heartbeat (0 = idle).
    #[arg(long, default_value_t = 20)]
    pub rate: u64,
    /// Heartbeat period, microseconds.
    #[arg(long, default_value_t = 1000)]
    pub hb: u64,
    /// Write pattern: seq or rand.
    #[arg(long, default_value = "seq")]
    pub pattern: String,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Downtime limit, ms.
    #[arg(long)]
    pub downtime_limit_ms: Option<u64>,
    /// Print only the JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs the demo.
pub fn run(a: &DemoArgs) -> Result<(), String> {
    let dir = scratch_dir("demo");
    let cmdline = format!(
        "ws={} rate={} hb={} pattern={}",
        a.ws, a.rate, a.hb, a.pattern
    );
    let say = |s: String| {
        if !a.json {
            eprintln!("{s}");
        }
    };
    say(format!(
        "demo: source: refvmm run --memory {} --kernel builtin:testguest --cmdline \"{cmdline}\"",
        a.memory
    ));
    let mut src = start_source(&dir, "source", &a.memory, a.vcpus, &cmdline)?;
    src.wait_ready(Duration::from_secs(60))?;
    src.wait_heartbeats(1000, Duration::from_secs(60))?;
    let (dst, endpoint) = start_destination(&dir, "destination", &[])?;
    say(format!(
        "demo: destination listening on {endpoint}; migrating"
    ));
    let t0 = Instant::now();
    let mut extra = json!({});
    if let Some(l) = a.downtime_limit_ms {
        extra["downtime_limit_ms"] = json!(l);
    }
    let report = match migrate(&src, &endpoint, extra) {
        Ok(r) => r,
        Err(e) => return Err(format!("migration failed: {e}")),
    };
    let t1 = Instant::now();
    let mut dst = dst;
    dst.wait_heartbeats(1000, Duration::from_secs(30))?;
    let src_log = log_of(&src);
    let dst_log = log_of(&dst);
    let b = blackout(&src_log, &dst_log, t0).ok_or("no heartbeats to measure")?;
    // Noise floor: the largest gap during an equally long stretch before.
    let span = t1 - t0;
    let floor = largest_gap(
        &src_log,
        t0.checked_sub(span.max(Duration::from_millis(500)))
            .unwrap_or(t0),
        t0,
    );
    let corrupt: Vec<String> = src_log
        .corrupt
        .iter()
        .chain(dst_log.corrupt.iter())
        .cloned()
        .collect();
    let last_src_t = src_log.tlines.last().map(|t| t.heartbeats);
    let first_dst_t = dst_log.tlines.first().map(|t| t.heartbeats);
    let summary = json!({
        "report": report,
        "guest": {
            "switchover_gap_ms": b.switchover_gap.as_secs_f64() * 1e3,
            "largest_gap_ms": b.largest_gap.as_secs_f64() * 1e3,
            "noise_floor_ms": floor.as_secs_f64() * 1e3,
            "heartbeats_source": src_log.heartbeats.len(),
            "heartbeats_destination": dst_log.heartbeats.len(),
            "last_T_on_source": last_src_t,
            "first_T_on_destination": first_dst_t,
            "corrupt": corrupt,
        }
    });
    drop(src_log);
    drop(dst_log);
    let _ = dst.api(&json!({"cmd": "quit"}), |_| {});
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        serde_json::to_string_pretty(&summary).unwrap_or_default()
    );
    if !a.json {
        eprintln!(
            "demo: downtime {:.2} ms (engine), switchover gap {:.2} ms, largest heartbeat gap {:.2} ms (noise floor {:.2} ms), total {:.0} ms, {} rounds, corrupt pages: {}",
            report["downtime_ms"].as_f64().unwrap_or(f64::NAN),
            b.switchover_gap.as_secs_f64() * 1e3,
            b.largest_gap.as_secs_f64() * 1e3,
            floor.as_secs_f64() * 1e3,
            report["total_ms"].as_f64().unwrap_or(f64::NAN),
            report["rounds"].as_array().map_or(0, |r| r.len()),
            summary["guest"]["corrupt"].as_array().map_or(0, |c| c.len())
        );
    }
    if !corrupt.is_empty() {
        return Err(format!("the guest reported corruption: {corrupt:?}"));
    }
    Ok(())
}
