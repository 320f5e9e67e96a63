//! Engine throughput probe: migrates an idle software VM whose memory is all
//! non-zero over loopback TCP between two threads of this process, and
//! prints the achieved page rate next to the raw loopback bandwidth.
//!
//! Run: `cargo run --release -p livemig --example throughput -- [MiB] [streams] [prefault]`
//!
//! With `prefault`, the destination populates its memory
//! (`MADV_POPULATE_WRITE`) while it creates the VM, before round 0 starts:
//! this separates the engine's own copy rate from the kernel's cost of
//! faulting in fresh anonymous memory on the destination.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use livemig::memory::{MemoryLayout, RegionDesc};
use livemig::soft::{SoftConfig, SoftVm};
use livemig::transport::{self, Endpoint};
use livemig::transport::{Dialer, OwnedAcceptor};
use livemig::{migrate_streams, receive_streams, CancelToken, MigrationConfig, ReceiveConfig};

fn loopback_bandwidth(bytes: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let r = s.read(&mut buf)?;
            if r == 0 {
                return Ok(n);
            }
            n += r as u64;
        }
    });
    let mut s = std::net::TcpStream::connect(addr)?;
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len());
        s.write_all(&buf[..n])?;
        left -= n;
    }
    drop(s);
    let got = reader.join().map_err(|_| "reader panicked")??;
    Ok(got as f64 / t.elapsed().as_secs_f64())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let streams: u32 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let prefault = args.get(3).is_some_and(|s| s == "prefault");
    let layout = MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: mib << 20,
    }])?;
    let idle = SoftConfig::idle();
    let source = SoftVm::new(&layout, &idle)?;
    source.fill(7);
    source.start();

    let bw = loopback_bandwidth((mib as usize) << 20)?;
    let listener = transport::listen(&"tcp:127.0.0.1:0".parse::<Endpoint>()?)?;
    let ep = listener.local_endpoint().clone();
    let dest = std::thread::spawn(move || {
        let t = listener.accept()?;
        let mut acceptor = OwnedAcceptor(Some(listener));
        receive_streams(t, Some(&mut acceptor), &ReceiveConfig::default(), |desc| {
            let vm = SoftVm::new(&desc.layout, &idle)?;
            if prefault {
                use vm_memory::GuestMemoryBackend;
                for r in desc.layout.regions() {
                    if let Ok(p) = vm
                        .ram()
                        .get_host_address(vm_memory::GuestAddress(r.guest_addr))
                    {
                        // SAFETY: p..p+size is the region's own mapping.
                        unsafe {
                            libc::madvise(p.cast(), r.size as usize, libc::MADV_POPULATE_WRITE)
                        };
                    }
                }
            }
            Ok(vm)
        })
        .map(|(_, r)| r)
        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
    });
    let t = transport::connect(&ep, Some(Duration::from_secs(5)))?;
    let config = MigrationConfig {
        streams,
        ..Default::default()
    };
    let mut dialer = Dialer {
        endpoint: ep,
        timeout: Some(Duration::from_secs(5)),
    };
    let report = migrate_streams(
        &source,
        t,
        Some(&mut dialer),
        &config,
        &CancelToken::new(),
        &mut |_| {},
    )?;
    if let Err(e) = dest.join().map_err(|_| "destination panicked")? {
        eprintln!("destination: {e}");
    }
    let r0 = &report.rounds[0];
    let rate = r0.bytes as f64 / (r0.duration_ms / 1000.0);
    println!(
        "{mib} MiB, {streams} stream(s): round 0 {:.1} ms, {:.2} GB/s = {:.0} % of loopback {:.2} GB/s; downtime {:.2} ms, total {:.1} ms",
        r0.duration_ms,
        rate / 1e9,
        100.0 * rate / bw,
        bw / 1e9,
        report.downtime_ms,
        report.total_ms
    );
    Ok(())
}
