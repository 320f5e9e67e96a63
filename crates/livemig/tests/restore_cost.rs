//! The destination's restore in the expected downtime: a destination
//! that times a save and a restore of its own state in the handshake
//! (`DestinationVm::rehearse_restore`) sends both in `HelloReply`, and the
//! source counts that restore instead of a restore as long as its own
//! save.
//!
//! The software VMs are told how long their save and restore take (sleeps:
//! a sleep never ends early, so every bound below is a lower bound that
//! holds on a loaded machine; nothing asserts an upper bound on a time).

use std::time::{Duration, Instant};

use livemig::memory::GuestMemory;
use livemig::state::Section;
use livemig::testing::hooked::HookedVm;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::mem;
use livemig::vm::{DestinationVm, RestoreRehearsal, SourceVm, VmError};
use livemig::{Migration, MigrationConfig, Reception, Report};

mod common;
use common::{one_region, started_source};

/// The source's save.
const SAVE: Duration = Duration::from_millis(10);
/// The destination's restore: three times the save.
const RESTORE: Duration = Duration::from_millis(30);
/// A first rehearsal's restore that took longer than the restore does.
const OUTLIER: Duration = Duration::from_millis(35);

/// A running idle soft VM whose save takes at least [`SAVE`].
fn slow_saving_source() -> HookedVm<'static, SoftVm> {
    let vm = started_source(&one_region(1 << 20), &SoftConfig::idle(), 7);
    HookedVm::new(vm).on_save_state(|vm| {
        std::thread::sleep(SAVE);
        vm.save_state()
    })
}

/// How the destination answers `rehearse_restore`.
#[derive(Clone, Copy)]
enum Rehearsal {
    /// Reports the save and restore it was told to take ([`SAVE`],
    /// [`RESTORE`]): a ratio of exactly 3.
    Told,
    /// Times a save that sleeps [`SAVE`] and its slow restore.
    Timed,
    /// Like [`Rehearsal::Told`], but the first rehearsal's restore took
    /// [`OUTLIER`] (a thread pool started on first use, a restore that
    /// lost its CPU for a while).
    FirstSlow,
    /// Reports a save three times the source's ([`RESTORE`], as long as
    /// its restore): the destination's own save is slower than the
    /// source's (on real KVM a never-run VM's save took 1.3–2 times the
    /// running source's at 64 vCPUs, 2026-12-03).
    SlowSave,
    /// The trait's default: not measured.
    Default,
    /// Fails.
    Fails,
}

/// A soft destination whose restore takes at least [`RESTORE`].
struct SlowRestore {
    vm: SoftVm,
    rehearsal: Rehearsal,
    /// Calls of `rehearse_restore`.
    rehearsals: u32,
}

impl DestinationVm for SlowRestore {
    fn memory(&self) -> &dyn GuestMemory {
        DestinationVm::memory(&self.vm)
    }

    fn restore_state(&mut self, sections: &[Section]) -> Result<(), VmError> {
        std::thread::sleep(RESTORE);
        self.vm.restore_state(sections)
    }

    fn rehearse_restore(&mut self) -> Result<Option<RestoreRehearsal>, VmError> {
        self.rehearsals += 1;
        match self.rehearsal {
            Rehearsal::Told => Ok(Some(RestoreRehearsal {
                save: SAVE,
                restore: RESTORE,
            })),
            Rehearsal::Timed => {
                let t = Instant::now();
                std::thread::sleep(SAVE);
                let sections = SourceVm::save_state(&self.vm)?;
                let save = t.elapsed();
                let t = Instant::now();
                self.restore_state(&sections)?;
                Ok(Some(RestoreRehearsal {
                    save,
                    restore: t.elapsed(),
                }))
            }
            Rehearsal::FirstSlow => Ok(Some(RestoreRehearsal {
                save: SAVE,
                restore: if self.rehearsals == 1 {
                    OUTLIER
                } else {
                    RESTORE
                },
            })),
            Rehearsal::SlowSave => Ok(Some(RestoreRehearsal {
                save: RESTORE,
                restore: RESTORE,
            })),
            Rehearsal::Default => Ok(None),
            Rehearsal::Fails => Err(VmError::State(livemig::state::StateError::Missing(
                "rehearsal".into(),
            ))),
        }
    }

    fn resume(&mut self) -> Result<(), VmError> {
        DestinationVm::resume(&mut self.vm)
    }
}

/// A limit that this switchover (~40 ms of save and restore) fits.
fn config() -> MigrationConfig {
    MigrationConfig {
        downtime_limit: Duration::from_secs(1),
        ..Default::default()
    }
}

/// Migrates a [`slow_saving_source`] to a [`SlowRestore`] destination.
fn migrate(
    rehearsal: Rehearsal,
) -> (
    HookedVm<'static, SoftVm>,
    Result<Report, livemig::MigrationError>,
    Result<SlowRestore, livemig::MigrationError>,
) {
    let src = slow_saving_source();
    let (a, b) = mem::pair();
    let dest = std::thread::spawn(move || {
        Reception::new(Box::new(b)).run(|d| {
            Ok(SlowRestore {
                vm: SoftVm::new(&d.layout, &SoftConfig::idle())?,
                rehearsal,
                rehearsals: 0,
            })
        })
    });
    let report = Migration::new(&src).config(config()).run(Box::new(a));
    let dst = dest.join().expect("destination thread").map(|(vm, _)| vm);
    (src, report, dst)
}

/// A destination whose restore takes three times its save (and the
/// source's): the expected downtime covers the source's save and the
/// destination's rehearsed restore, and says the restore is the
/// rehearsal's. (Before the destination could tell, the
/// estimate counted a restore as long as the save: ~2 × 10 ms plus the
/// pause and resume, against at least 10 + 30 ms.)
#[test]
fn a_destination_restoring_three_times_slower_is_in_the_expected_downtime() {
    let (src, report, dst) = migrate(Rehearsal::Told);
    let report = report.expect("migrated");
    // Rehearsed three times (the fastest of each half is sent).
    assert_eq!(dst.expect("received").rehearsals, 3);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let e = &report.expected_breakdown;
    assert!(e.dest_restore_measured, "{}", report.to_json());
    assert_eq!(e.dest_rehearsal_save_ms, ms(SAVE), "{}", report.to_json());
    assert_eq!(
        e.dest_rehearsal_restore_ms,
        ms(RESTORE),
        "{}",
        report.to_json()
    );
    assert!(e.state_save_ms >= ms(SAVE), "{}", report.to_json());
    assert_eq!(e.dest_restore_ms, ms(RESTORE), "{}", report.to_json());
    // The switchover takes at least SAVE + RESTORE, and so does the
    // estimate (each of its parts is at least what the VMs were told).
    assert!(
        report.expected_downtime_ms >= ms(SAVE + RESTORE),
        "expected {:.2} ms for a save of {SAVE:?} and a restore of {RESTORE:?}: {}",
        report.expected_downtime_ms,
        report.to_json()
    );
    // The parts add up to the expected downtime.
    let sum = e.total_ms();
    assert!(
        (sum - report.expected_downtime_ms).abs() < 0.01,
        "parts {sum:.3} ms, expected {:.3} ms",
        report.expected_downtime_ms
    );
    assert!(report.downtime_breakdown.dest_restore_ms >= ms(RESTORE));
    assert!(src.is_paused(), "handed over: the source stays paused");
}

/// A destination that times its rehearsal: the source gets both halves as
/// timed (each at least what the VM was told) and counts the restore.
#[test]
fn a_timed_rehearsal_is_the_expected_restore() {
    let (_src, report, dst) = migrate(Rehearsal::Timed);
    let report = report.expect("migrated");
    assert_eq!(dst.expect("received").rehearsals, 3);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let e = &report.expected_breakdown;
    assert!(e.dest_restore_measured, "{}", report.to_json());
    assert!(e.dest_rehearsal_save_ms >= ms(SAVE), "{}", report.to_json());
    assert!(
        e.dest_rehearsal_restore_ms >= ms(RESTORE),
        "{}",
        report.to_json()
    );
    // The report's times are rounded to µs.
    assert!(
        (e.dest_restore_ms - e.dest_rehearsal_restore_ms).abs() < 0.002,
        "{}",
        report.to_json()
    );
}

/// A destination that cannot time its restore (the trait's default): the
/// restore is estimated as long as the source's save, as before.
#[test]
fn without_the_destination_s_measurement_the_restore_is_the_save() {
    let (_src, report, dst) = migrate(Rehearsal::Default);
    let report = report.expect("migrated");
    // Asked once: a VM that cannot tell is not asked again.
    assert_eq!(dst.expect("received").rehearsals, 1);
    let e = &report.expected_breakdown;
    assert!(!e.dest_restore_measured, "{}", report.to_json());
    assert_eq!(e.dest_restore_ms, e.state_save_ms, "{}", report.to_json());
}

/// A destination VM that cannot restore its own state is refused in the
/// handshake, before any page; the source keeps running.
#[test]
fn a_failed_rehearsal_refuses_the_migration() {
    let (src, report, dst) = migrate(Rehearsal::Fails);
    let e = report.expect_err("refused");
    assert_eq!(e.phase, livemig::Phase::Handshake, "{e}");
    assert!(
        e.to_string().contains("cannot restore its own state"),
        "{e}"
    );
    assert!(dst.is_err());
    assert!(!SourceVm::is_paused(&src), "the source must run");
}

/// One slow rehearsal does not make the estimate: the destination
/// rehearses more than once and sends the fastest save and the fastest
/// restore, as the source keeps the fastest of its own state measurements.
/// (Measured on real KVM, 2026-12-03 13:43 UTC, 8–64 vCPUs: in 6 of 40 runs
/// one half of the single rehearsal took 2–6 times its usual time — the
/// restore in 3, where the expected downtime came out 2.1–3.1 times the
/// actual; the save in 3.)
#[test]
fn one_slow_rehearsal_does_not_make_the_estimate() {
    let (_src, report, dst) = migrate(Rehearsal::FirstSlow);
    let report = report.expect("migrated");
    assert!(dst.expect("received").rehearsals > 1);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let e = &report.expected_breakdown;
    assert_eq!(
        e.dest_rehearsal_restore_ms,
        ms(RESTORE),
        "the first rehearsal's {OUTLIER:?} restore was sent: {}",
        report.to_json()
    );
    assert_eq!(e.dest_rehearsal_save_ms, ms(SAVE), "{}", report.to_json());
}

/// The destination's rehearsed restore is the expected restore, whatever
/// its own save took: a destination whose save is slower than the
/// source's still restores in [`RESTORE`]. (Scaling the source's save by
/// the rehearsal's restore / save ratio, as the source did before,
/// expected ~10 ms here. On real KVM, 2026-12-03 16:40 UTC, 64 vCPUs: the destination's fastest rehearsed
/// restore was within 10 % of the actual restore in 8 of 10 runs, the
/// scaled one in 2 of 10.)
#[test]
fn a_destination_saving_slower_than_the_source_still_restores_as_rehearsed() {
    let (_src, report, dst) = migrate(Rehearsal::SlowSave);
    let report = report.expect("migrated");
    assert_eq!(dst.expect("received").rehearsals, 3);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let e = &report.expected_breakdown;
    assert!(e.dest_restore_measured, "{}", report.to_json());
    assert!(
        e.dest_restore_ms >= ms(RESTORE),
        "expected restore {:.2} ms for a destination that restores in {RESTORE:?}: {}",
        e.dest_restore_ms,
        report.to_json()
    );
    assert!(report.downtime_breakdown.dest_restore_ms >= ms(RESTORE));
}
