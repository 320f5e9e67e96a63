//! The migration guard refuses operator commands that would undo the
//! split-brain protection: `resume`/`pause` while a migration runs (here:
//! during the stop-and-copy) and for good after it committed or became
//! ambiguous, and a second `migrate` while one runs.
// The 0.1 entry points (`migrate`, `receive`, ...) are deprecated thin
// wrappers over `Migration`/`Reception`; these tests keep exercising them.
#![allow(deprecated)]

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use livemig::memory::MemoryLayout;
use livemig::protocol::HelloReply;
use livemig::testing::soft::{SoftConfig, SoftVm};
use livemig::transport::mem;
use livemig::{
    receive, CancelToken, ErrorKind, GuardError, GuardState, MigrationConfig, MigrationError,
    MigrationGuard, Progress, ReceiveConfig, Report,
};

mod common;
use common::{hand_destination, one_region, running_source};

fn layout() -> MemoryLayout {
    one_region(2 << 20)
}

fn source() -> Arc<SoftVm> {
    running_source(&layout(), &SoftConfig::default(), 7)
}

fn destination(t: mem::MemTransport) -> std::thread::JoinHandle<Option<SoftVm>> {
    std::thread::spawn(move || {
        receive(Box::new(t), &ReceiveConfig::default(), |d| {
            SoftVm::new(&d.layout, &SoftConfig::idle())
        })
        .ok()
        .map(|(vm, _)| vm)
    })
}

/// `guard.migrate` of `src` over `t`, default configuration, no
/// cancellation, no progress callback.
fn migrate_through(
    guard: &MigrationGuard,
    src: &SoftVm,
    t: mem::MemTransport,
) -> Result<Report, MigrationError> {
    guard.migrate(
        src,
        Box::new(t),
        &MigrationConfig::default(),
        &CancelToken::new(),
        &mut |_| {},
    )
}

fn paused(vm: &SoftVm) -> bool {
    vm.writes_none_during(Duration::from_millis(100))
}

/// An operator `resume` (from another thread) while the source is paused
/// for the stop-and-copy is refused, so the guest cannot write pages that
/// are never sent; after the success, `resume`, `pause` and another
/// `migrate` are refused for good.
#[test]
fn resume_during_stop_and_copy_and_after_success_is_refused() {
    let src = source();
    let guard = Arc::new(MigrationGuard::new());
    let (a, b) = mem::pair();
    let dest = destination(b);
    let mut during: Option<Result<(), GuardError>> = None;
    let (g2, s2) = (guard.clone(), src.clone());
    let r = guard.migrate(
        &*src,
        Box::new(a),
        &MigrationConfig::default(),
        &CancelToken::new(),
        &mut |p| {
            if let Progress::Paused { .. } = p {
                let (g, s) = (g2.clone(), s2.clone());
                let op = std::thread::spawn(move || g.resume(&*s));
                during = Some(op.join().unwrap());
            }
        },
    );
    r.expect("the migration succeeds");
    let dst = dest
        .join()
        .unwrap()
        .expect("the destination runs the guest");
    match during {
        Some(Err(GuardError::Migrating)) => {}
        other => panic!("resume during the stop-and-copy: {other:?}"),
    }
    assert_eq!(guard.state(), GuardState::Migrated);
    assert!(matches!(guard.resume(&*src), Err(GuardError::Migrated)));
    assert!(matches!(guard.pause(&*src), Err(GuardError::Migrated)));
    assert!(paused(&src), "the source runs after a successful migration");
    let (a, _b) = mem::pair();
    let e = migrate_through(&guard, &src, a).expect_err("a second migration of a migrated VM");
    assert!(
        matches!(e.kind, ErrorKind::Guard(GuardError::Migrated)),
        "{e}"
    );
    drop(dst);
}

/// Two `migrate` requests at once: the second is refused while the first
/// runs (held here in its handshake), without touching the VM.
#[test]
fn a_second_concurrent_migrate_is_refused() {
    let src = source();
    let guard = Arc::new(MigrationGuard::new());
    let (a, b) = mem::pair();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    // A destination that holds the first migration in its handshake until
    // told, then refuses it.
    let dest = std::thread::spawn(move || {
        let (_, _fr, mut fw) = hand_destination(Box::new(b), None);
        go_rx.recv().unwrap();
        fw.send(&HelloReply::refused("test over".into())).unwrap();
        fw.flush().unwrap();
    });
    let (g1, s1) = (guard.clone(), src.clone());
    let first = std::thread::spawn(move || migrate_through(&g1, &s1, a));
    let deadline = Instant::now() + Duration::from_secs(10);
    while guard.state() != GuardState::Migrating {
        assert!(
            Instant::now() < deadline,
            "the first migration did not start"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let (a2, _b2) = mem::pair();
    let e = migrate_through(&guard, &src, a2).expect_err("the second migration must be refused");
    assert!(
        matches!(e.kind, ErrorKind::Guard(GuardError::Migrating)),
        "{e}"
    );
    assert!(matches!(guard.pause(&*src), Err(GuardError::Migrating)));
    go_tx.send(()).unwrap();
    let e = first
        .join()
        .unwrap()
        .expect_err("refused by the destination");
    assert!(e.to_string().contains("test over"), "{e}");
    dest.join().unwrap();
    // The first migration failed safely: commands pass again.
    assert_eq!(guard.state(), GuardState::Idle);
    guard.pause(&*src).unwrap();
    guard.resume(&*src).unwrap();
}
