//! Watches the test guest's serial output and reports heartbeat and throughput statistics.
//!
//! ```text
//! serial_stats [--secs N] [--gap-ms M] [-- COMMAND ARGS...]
//! ```
//!
//! With a command (e.g. `qemu-system-x86_64 ... -serial stdio`), runs it, reads its standard
//! output for N seconds (default 10), then interrupts it (SIGINT via `kill`); without one,
//! reads standard input until EOF. Prints the time from start to `READY`, every `T`, `CORRUPT`
//! and other line with its time, the pages written / verified per second between `T` lines, and
//! the heartbeat statistics (gaps above M ms, default 5).

use std::io::Read;
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use livemig_testguest::{Event, HeartbeatStats, OutputParser};

fn main() -> ExitCode {
    let mut secs = 10.0f64;
    let mut gap_ms = 5.0f64;
    let mut args = std::env::args().skip(1);
    let mut command = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--secs" => secs = args.next().and_then(|s| s.parse().ok()).unwrap_or(secs),
            "--gap-ms" => gap_ms = args.next().and_then(|s| s.parse().ok()).unwrap_or(gap_ms),
            "--" => command.extend(args.by_ref()),
            _ => {
                eprintln!("usage: serial_stats [--secs N] [--gap-ms M] [-- COMMAND ARGS...]");
                return ExitCode::from(2);
            }
        }
    }

    let start = Instant::now();
    let (tx, rx) = mpsc::channel::<(Vec<u8>, Instant)>();
    let mut child = None;
    let mut input: Box<dyn Read + Send> = if command.is_empty() {
        Box::new(std::io::stdin())
    } else {
        match Command::new(&command[0])
            .args(&command[1..])
            .stdout(Stdio::piped())
            .spawn()
        {
            Ok(mut c) => {
                let Some(out) = c.stdout.take() else {
                    eprintln!("no stdout pipe");
                    return ExitCode::FAILURE;
                };
                child = Some(c);
                Box::new(out)
            }
            Err(e) => {
                eprintln!("running {}: {e}", command[0]);
                return ExitCode::FAILURE;
            }
        }
    };
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = input.read(&mut buf) {
            if n == 0 || tx.send((buf[..n].to_vec(), Instant::now())).is_err() {
                break;
            }
        }
    });

    let deadline = (!command.is_empty()).then(|| start + Duration::from_secs_f64(secs));
    let mut parser = OutputParser::new();
    let mut stats = HeartbeatStats::new(Duration::from_secs_f64(gap_ms / 1000.0));
    let mut last_t: Option<(Instant, u64, u64)> = None;
    let mut gaps_us: Vec<f64> = Vec::new();
    let mut events = Vec::new();
    loop {
        let chunk = match deadline {
            Some(d) => match rx.recv_timeout(d.saturating_duration_since(Instant::now())) {
                Ok(c) => c,
                Err(_) => break,
            },
            None => match rx.recv() {
                Ok(c) => c,
                Err(_) => break,
            },
        };
        events.clear();
        parser.feed_into(&chunk.0, chunk.1, &mut events);
        for e in &events {
            let t = chunk.1.duration_since(start).as_secs_f64();
            match e {
                Event::Heartbeat(at) => {
                    if let Some(prev) = stats.last() {
                        gaps_us.push(at.duration_since(prev).as_secs_f64() * 1e6);
                    }
                    stats.record(*at);
                }
                Event::Tline {
                    heartbeats,
                    pages_written,
                    pages_verified,
                    corrupt,
                } => {
                    let rates = last_t.map(|(at, w, v)| {
                        let dt = chunk.1.duration_since(at).as_secs_f64();
                        (
                            (pages_written - w) as f64 / dt,
                            (pages_verified - v) as f64 / dt,
                        )
                    });
                    last_t = Some((chunk.1, *pages_written, *pages_verified));
                    print!("{t:9.3}s T hb={heartbeats} written={pages_written} verified={pages_verified} corrupt={corrupt}");
                    if let Some((w, v)) = rates {
                        print!("  [{w:.0} written/s, {v:.0} verified/s]");
                    }
                    println!();
                }
                other => println!("{t:9.3}s {other:?}"),
            }
        }
    }
    if let Some(mut c) = child {
        // SIGINT lets QEMU exit cleanly; fall back to kill().
        let _ = Command::new("kill")
            .args(["-INT", &c.id().to_string()])
            .status();
        std::thread::sleep(Duration::from_millis(300));
        let _ = c.kill();
        let _ = c.wait();
    }
    if let Some(e) = parser.finish() {
        println!("unterminated: {e:?}");
    }

    println!("heartbeats: {}", stats.count());
    if let Some(m) = stats.mean_interval() {
        println!("mean interval: {:.1} us", m.as_secs_f64() * 1e6);
    }
    gaps_us.sort_by(f64::total_cmp);
    if !gaps_us.is_empty() {
        let pct = |p: f64| gaps_us[((gaps_us.len() - 1) as f64 * p) as usize];
        println!(
            "gap percentiles (us): p1 {:.0}  p50 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
            pct(0.01),
            pct(0.5),
            pct(0.99),
            pct(0.999),
            pct(1.0)
        );
    }
    if let Some(g) = stats.largest_gap() {
        println!(
            "largest gap: {:.3} ms before heartbeat #{} (at {:.3}s)",
            g.len.as_secs_f64() * 1e3,
            g.index,
            g.end.duration_since(start).as_secs_f64()
        );
    }
    let gaps = stats.gaps_above_threshold();
    println!("gaps above {gap_ms} ms: {}", gaps.len());
    for g in gaps.iter().take(20) {
        println!(
            "  #{} at {:.3}s: {:.3} ms",
            g.index,
            g.end.duration_since(start).as_secs_f64(),
            g.len.as_secs_f64() * 1e3
        );
    }
    ExitCode::SUCCESS
}
