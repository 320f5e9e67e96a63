//! Embedding livemig: migrate a VM between two threads of one process.
//!
//! This uses the software VM (`livemig::testing::soft::SoftVm`) so it runs anywhere;
//! a KVM VMM passes its `livemig_kvm::KvmVm` (or its own wrapper that also
//! pauses its devices) instead — the calls are the same.
//!
//! Run: `cargo run -p livemig --example embed`

use std::time::Duration;

use livemig::memory::{MemoryLayout, RegionDesc};
use livemig::report::Progress;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::mem;
use livemig::{migrate, receive, CancelToken, MigrationConfig, ReceiveConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let layout = MemoryLayout::new(vec![RegionDesc {
        guest_addr: 0,
        size: 64 << 20,
    }])?;

    // The running source VM: two writer threads dirty memory.
    let source = SoftVm::new(
        &layout,
        &SoftConfig {
            guest_writers: 1,
            device_writers: 1,
            pages_per_ms: 5,
        },
    )?;
    source.fill(42);
    source.start();

    // A connected pair of transports; over the network this would be
    // `transport::connect(&"tcp:10.0.0.2:4444".parse()?, None)?` on the
    // source and `transport::listen(..)?.accept()?` on the destination.
    let (to_dest, from_source) = mem::pair();

    // Destination: builds its VM from the source's description, restores,
    // and returns it running.
    let destination = std::thread::spawn(move || {
        receive(Box::new(from_source), &ReceiveConfig::default(), |desc| {
            // Refuse here (Err(VmError::Incompatible(..))) if the VM cannot run on this host.
            SoftVm::new(&desc.layout, &SoftConfig::default())
        })
    });

    // Source: migrate with a 20 ms downtime limit, printing progress.
    let config = MigrationConfig {
        downtime_limit: Duration::from_millis(20),
        ..Default::default()
    };
    let cancel = CancelToken::new(); // cancel.cancel() from another thread aborts safely
    let report = migrate(&source, Box::new(to_dest), &config, &cancel, &mut |p| {
        if let Progress::Round(r) = p {
            eprintln!("{r}");
        }
    })?;
    let (dest_vm, dest_report) = destination.join().map_err(|_| "destination panicked")??;

    println!(
        "migrated {} MiB: downtime {:.2} ms, total {:.1} ms, {} rounds, {} pages received",
        report.memory_bytes >> 20,
        report.downtime_ms,
        report.total_ms,
        report.rounds.len(),
        dest_report.pages
    );
    drop(dest_vm);
    Ok(())
}
