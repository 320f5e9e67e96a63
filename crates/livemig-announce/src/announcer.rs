//! Running the announce: every round of the schedule, on every NIC, on a
//! background thread.
//!
//! [`announce`] is meant to be called right after the destination's vCPUs are
//! running again: it spawns a thread and returns at once, so it never delays
//! the resume. Send errors (an interface that is down, a missing permission)
//! never stop the announce of the other NICs or the later rounds, and never
//! fail the migration: they are collected, with the time and the NIC, in the
//! [`AnnounceReport`] for the migration report.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::frames::{format_mac, garp_frame, na_frame, rarp_frame, AnnounceKind};
use crate::schedule::Schedule;
use crate::sender::FrameSender;

/// One guest NIC to announce.
pub struct Nic {
    /// The guest NIC's MAC address.
    pub mac: [u8; 6],
    /// The guest's IPv4 address on this NIC, if the VMM knows it: a
    /// gratuitous ARP is sent with each RARP when it is set.
    pub ipv4: Option<[u8; 4]>,
    /// The guest's IPv6 addresses on this NIC, if the VMM knows them: an
    /// unsolicited neighbour advertisement is sent for each, with each RARP.
    pub ipv6: Vec<[u8; 16]>,
    /// Where this NIC's frames go (its own backend).
    pub sender: Box<dyn FrameSender>,
}

impl Nic {
    /// A NIC with MAC `mac` whose frames go to `sender`, announced by RARP
    /// only.
    pub fn new(mac: [u8; 6], sender: Box<dyn FrameSender>) -> Self {
        Nic {
            mac,
            ipv4: None,
            ipv6: Vec::new(),
            sender,
        }
    }

    /// Also announce `ipv4` with a gratuitous ARP.
    pub fn with_ipv4(mut self, ipv4: [u8; 4]) -> Self {
        self.ipv4 = Some(ipv4);
        self
    }

    /// Also announce `ipv6` with an unsolicited neighbour advertisement
    /// (call once per address; duplicates are announced once).
    pub fn with_ipv6(mut self, ipv6: [u8; 16]) -> Self {
        if !self.ipv6.contains(&ipv6) {
            self.ipv6.push(ipv6);
        }
        self
    }

    /// Every frame of one round, in sending order: the RARP, the
    /// gratuitous ARP if the IPv4 address is known, then one neighbour
    /// advertisement per IPv6 address.
    fn frames(&self) -> Vec<(AnnounceKind, Vec<u8>)> {
        let mut frames = vec![(AnnounceKind::Rarp, rarp_frame(&self.mac).to_vec())];
        if let Some(ip) = self.ipv4 {
            frames.push((AnnounceKind::Garp, garp_frame(&self.mac, &ip).to_vec()));
        }
        for ip in &self.ipv6 {
            frames.push((
                AnnounceKind::UnsolicitedNa,
                na_frame(&self.mac, ip).to_vec(),
            ));
        }
        frames
    }
}

impl fmt::Debug for Nic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nic")
            .field("mac", &format_mac(&self.mac))
            .field("ipv4", &self.ipv4.map(Ipv4Addr::from))
            .field(
                "ipv6",
                &self
                    .ipv6
                    .iter()
                    .map(|a| Ipv6Addr::from(*a))
                    .collect::<Vec<_>>(),
            )
            .field("sender", &self.sender.describe())
            .finish()
    }
}

fn serialize_mac<S: serde::Serializer>(mac: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_mac(mac))
}

/// What was sent on one NIC.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NicReport {
    /// The NIC's position in the list given to [`announce`].
    pub nic: usize,
    /// Its MAC address (serialized as `52:54:00:12:34:56`).
    #[serde(serialize_with = "serialize_mac")]
    pub mac: [u8; 6],
    /// Its IPv4 address, if announced.
    pub ipv4: Option<Ipv4Addr>,
    /// Its IPv6 addresses, if announced.
    pub ipv6: Vec<Ipv6Addr>,
    /// The sender's description.
    pub sender: String,
    /// RARP frames sent.
    pub rarp_sent: u32,
    /// Gratuitous ARP frames sent.
    pub garp_sent: u32,
    /// Unsolicited neighbour advertisements sent (all addresses together).
    pub na_sent: u32,
    /// Sends that failed.
    pub failed: u32,
}

/// One failed send.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnnounceFailure {
    /// The NIC's position in the list given to [`announce`].
    pub nic: usize,
    /// Its MAC address (serialized as `52:54:00:12:34:56`).
    #[serde(serialize_with = "serialize_mac")]
    pub mac: [u8; 6],
    /// The sender's description.
    pub sender: String,
    /// The round (0-based).
    pub round: u32,
    /// The frame that could not be sent.
    pub kind: AnnounceKind,
    /// When, in ms after the resume.
    pub at_ms: f64,
    /// The error message.
    pub error: String,
    /// The OS error number, if any (e.g. 100 = `ENETDOWN`, 1 = `EPERM`).
    pub os_error: Option<i32>,
}

/// The outcome of an announce, for the migration report.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AnnounceReport {
    /// Rounds in the schedule.
    pub rounds_planned: u32,
    /// Rounds sent (every NIC tried).
    pub rounds_sent: u32,
    /// Whether [`AnnounceHandle::cancel`] stopped it early.
    pub cancelled: bool,
    /// Whether the announce thread is done.
    pub finished: bool,
    /// When the last round went out, ms after the resume.
    pub last_round_ms: f64,
    /// Per-NIC counts, in the order the NICs were given.
    pub nics: Vec<NicReport>,
    /// Every failed send, in order.
    pub errors: Vec<AnnounceFailure>,
    /// Set if the announce thread could not start or died.
    pub error: Option<String>,
}

impl AnnounceReport {
    /// Frames sent successfully, all NICs together.
    pub fn frames_sent(&self) -> u32 {
        self.nics
            .iter()
            .map(|n| n.rarp_sent + n.garp_sent + n.na_sent)
            .sum()
    }

    /// Whether everything planned was sent without an error.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
            && self.error.is_none()
            && !self.cancelled
            && self.rounds_sent == self.rounds_planned
    }
}

/// State shared between the announce thread and its handle.
#[derive(Default)]
struct Shared {
    cancelled: Mutex<bool>,
    wake: Condvar,
    report: Mutex<AnnounceReport>,
}

impl Shared {
    fn report(&self) -> MutexGuard<'_, AnnounceReport> {
        self.report.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sleep until `deadline` (`None`: forever); returns `true` if cancelled.
    fn wait_until(&self, deadline: Option<Instant>) -> bool {
        let mut cancelled = self
            .cancelled
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if *cancelled {
                return true;
            }
            let now = Instant::now();
            match deadline {
                Some(deadline) if now >= deadline => return false,
                Some(deadline) => {
                    cancelled = self
                        .wake
                        .wait_timeout(cancelled, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                None => {
                    cancelled = self
                        .wake
                        .wait(cancelled)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }

    fn cancel(&self) {
        *self
            .cancelled
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        self.wake.notify_all();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The announce thread's loop.
fn run(mut nics: Vec<Nic>, offsets: Vec<Duration>, resumed_at: Instant, shared: &Shared) {
    for (round, offset) in offsets.iter().enumerate() {
        let round = u32::try_from(round).unwrap_or(u32::MAX);
        if shared.wait_until(resumed_at.checked_add(*offset)) {
            shared.report().cancelled = true;
            break;
        }
        for (index, nic) in nics.iter_mut().enumerate() {
            for (kind, frame) in nic.frames() {
                let result = nic.sender.send(&frame);
                let at_ms = ms(resumed_at.elapsed());
                let mut report = shared.report();
                let Some(counts) = report.nics.get_mut(index) else {
                    continue;
                };
                match result {
                    Ok(()) => match kind {
                        AnnounceKind::Rarp => counts.rarp_sent += 1,
                        AnnounceKind::Garp => counts.garp_sent += 1,
                        AnnounceKind::UnsolicitedNa => counts.na_sent += 1,
                    },
                    Err(e) => {
                        counts.failed += 1;
                        log::warn!(
                            "announce round {round}: {kind} for {} failed: {e}",
                            format_mac(&nic.mac)
                        );
                        let failure = AnnounceFailure {
                            nic: index,
                            mac: nic.mac,
                            sender: counts.sender.clone(),
                            round,
                            kind,
                            at_ms,
                            error: e.to_string(),
                            os_error: e.raw_os_error(),
                        };
                        report.errors.push(failure);
                    }
                }
            }
        }
        let mut report = shared.report();
        report.rounds_sent = round.saturating_add(1);
        report.last_round_ms = ms(resumed_at.elapsed());
        log::debug!(
            "announce round {round} sent at {:.1} ms after resume",
            report.last_round_ms
        );
    }
}

/// A running announce (see [`announce`]).
///
/// Dropping the handle lets the announce finish on its own.
pub struct AnnounceHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    resumed_at: Instant,
}

impl fmt::Debug for AnnounceHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnnounceHandle")
            .field("resumed_at", &self.resumed_at)
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl AnnounceHandle {
    /// Stop before the next round (a round in progress completes).
    pub fn cancel(&self) {
        self.shared.cancel();
    }

    /// Whether the announce is over.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// The report so far, without waiting.
    pub fn snapshot(&self) -> AnnounceReport {
        self.shared.report().clone()
    }

    /// The instant the schedule's offsets count from.
    pub fn resumed_at(&self) -> Instant {
        self.resumed_at
    }

    /// Wait for the last round (or the cancellation) and return the report.
    pub fn join(mut self) -> AnnounceReport {
        let died = match self.thread.take() {
            Some(thread) => thread.join().is_err(),
            None => false,
        };
        let mut report = self.shared.report().clone();
        if died && report.error.is_none() {
            report.error = Some("the announce thread panicked".to_string());
        }
        report.finished = true;
        report
    }

    /// [`cancel`](Self::cancel), then [`join`](Self::join).
    pub fn cancel_and_join(self) -> AnnounceReport {
        self.cancel();
        self.join()
    }
}

/// Announce every NIC on its own sender following `schedule`, counting the
/// offsets from now (call it right after the destination's vCPUs run).
///
/// Returns at once; the frames are sent by a background thread. Each round
/// sends, on every NIC in turn, a RARP, then a gratuitous ARP when the NIC's
/// IPv4 address is known, then an unsolicited neighbour advertisement for
/// each of its IPv6 addresses.
pub fn announce(nics: Vec<Nic>, schedule: &Schedule) -> AnnounceHandle {
    announce_from(nics, schedule, Instant::now())
}

/// [`announce`] with the offsets counted from `resumed_at`, the moment the
/// vCPUs resumed. Rounds already due when the thread starts go out at once
/// (none is skipped).
pub fn announce_from(nics: Vec<Nic>, schedule: &Schedule, resumed_at: Instant) -> AnnounceHandle {
    let offsets = schedule.offsets();
    let report = AnnounceReport {
        rounds_planned: schedule.rounds,
        nics: nics
            .iter()
            .enumerate()
            .map(|(nic, n)| NicReport {
                nic,
                mac: n.mac,
                ipv4: n.ipv4.map(Ipv4Addr::from),
                ipv6: n.ipv6.iter().map(|a| Ipv6Addr::from(*a)).collect(),
                sender: n.sender.describe(),
                rarp_sent: 0,
                garp_sent: 0,
                na_sent: 0,
                failed: 0,
            })
            .collect(),
        ..AnnounceReport::default()
    };
    let shared = Arc::new(Shared {
        report: Mutex::new(report),
        ..Shared::default()
    });
    let thread_shared = Arc::clone(&shared);
    let spawned = thread::Builder::new()
        .name("livemig-announce".to_string())
        .spawn(move || {
            run(nics, offsets, resumed_at, &thread_shared);
            thread_shared.report().finished = true;
        });
    let thread = match spawned {
        Ok(thread) => Some(thread),
        Err(e) => {
            log::warn!("could not start the announce thread: {e}");
            let mut report = shared.report();
            report.error = Some(format!("could not start the announce thread: {e}"));
            report.finished = true;
            None
        }
    };
    AnnounceHandle {
        shared,
        thread,
        resumed_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::frames::parse_announce;
    use crate::sender::{RecordingSender, SendError};

    const MAC_A: [u8; 6] = [0x52, 0x54, 0x00, 0, 0, 0x0a];
    const MAC_B: [u8; 6] = [0x52, 0x54, 0x00, 0, 0, 0x0b];

    #[test]
    fn follows_the_schedule() {
        let a = RecordingSender::new("a");
        let b = RecordingSender::new("b");
        let (log_a, log_b) = (a.log(), b.log());
        let nics = vec![
            Nic::new(MAC_A, Box::new(a)),
            Nic::new(MAC_B, Box::new(b)).with_ipv4([10, 0, 0, 2]),
        ];
        let start = Instant::now();
        let handle = announce_from(nics, &Schedule::default(), start);
        let report = handle.join();
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.rounds_sent, 5);
        assert_eq!(report.frames_sent(), 15);
        assert_eq!(report.nics[0].rarp_sent, 5);
        assert_eq!(report.nics[0].garp_sent, 0);
        assert_eq!(report.nics[1].rarp_sent, 5);
        assert_eq!(report.nics[1].garp_sent, 5);

        let log_a = log_a.lock().unwrap();
        let log_b = log_b.lock().unwrap();
        assert_eq!(log_a.len(), 5);
        assert_eq!(log_b.len(), 10);
        let mut worst = Duration::ZERO;
        for (i, expected) in Schedule::default().offsets().into_iter().enumerate() {
            let got = log_a[i].at - start;
            // Never early; how late is measured, not asserted (a loaded
            // machine makes it late).
            assert!(got >= expected, "round {i}: {got:?} < {expected:?}");
            worst = worst.max(got - expected);
            assert_eq!(log_a[i].frame, rarp_frame(&MAC_A));
            // NIC b: RARP then GARP, in the same round.
            assert_eq!(log_b[2 * i].frame, rarp_frame(&MAC_B));
            assert_eq!(log_b[2 * i + 1].frame, garp_frame(&MAC_B, &[10, 0, 0, 2]));
            assert!(log_b[2 * i].at - start >= expected);
            let parsed = parse_announce(&log_b[2 * i + 1].frame).unwrap();
            assert_eq!(parsed.ip, Some([10, 0, 0, 2]));
        }
        println!("worst lateness over 5 rounds: {worst:?}");
    }

    #[test]
    fn errors_are_collected_and_do_not_stop_other_nics() {
        let good = RecordingSender::new("good");
        let log = good.log();
        let nics = vec![
            Nic::new(
                MAC_A,
                Box::new(RecordingSender::failing("bad", libc::ENETDOWN)),
            )
            .with_ipv4([10, 0, 0, 1]),
            Nic::new(MAC_B, Box::new(good)),
        ];
        let report = announce(nics, &Schedule::default()).join();
        assert!(!report.is_clean());
        assert!(report.error.is_none());
        assert_eq!(report.rounds_sent, 5);
        assert_eq!(log.lock().unwrap().len(), 5);
        assert_eq!(report.nics[1].rarp_sent, 5);
        assert_eq!(report.nics[0].failed, 10);
        assert_eq!(report.errors.len(), 10);
        for (i, e) in report.errors.iter().enumerate() {
            assert_eq!(e.nic, 0);
            assert_eq!(e.mac, MAC_A);
            assert_eq!(e.round, u32::try_from(i / 2).unwrap());
            let kind = if i % 2 == 0 {
                AnnounceKind::Rarp
            } else {
                AnnounceKind::Garp
            };
            assert_eq!(e.kind, kind);
            assert_eq!(e.os_error, Some(libc::ENETDOWN));
            assert!(e.error.contains("recording \"bad\""), "{}", e.error);
        }
        // Times are after resume and increase with the rounds.
        assert!(report.errors[8].at_ms >= 800.0);
        assert!(report.errors[0].at_ms <= report.errors[2].at_ms);
    }

    /// A sender whose first send waits until the test says `announce()`
    /// has returned (at most 10 s, so a blocking `announce()` fails the test
    /// instead of hanging it), then sleeps 300 ms on every send.
    struct Gate {
        returned: std::sync::mpsc::Receiver<()>,
        saw_return: std::sync::Arc<std::sync::atomic::AtomicBool>,
        first: bool,
    }

    impl FrameSender for Gate {
        fn send(&mut self, _frame: &[u8]) -> Result<(), SendError> {
            if std::mem::take(&mut self.first) {
                let ok = self.returned.recv_timeout(Duration::from_secs(10)).is_ok();
                self.saw_return
                    .store(ok, std::sync::atomic::Ordering::SeqCst);
            }
            thread::sleep(Duration::from_millis(300));
            Ok(())
        }

        fn describe(&self) -> String {
            "gate".to_string()
        }
    }

    #[test]
    fn starting_does_not_block() {
        let (tx, rx) = std::sync::mpsc::channel();
        let saw_return = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gate = Gate {
            returned: rx,
            saw_return: saw_return.clone(),
            first: true,
        };
        let handle = announce(vec![Nic::new(MAC_A, Box::new(gate))], &Schedule::default());
        // announce() returned while its first send is still waiting.
        tx.send(()).unwrap();
        assert!(!handle.is_finished());
        // Cancel while round 0 is being sent: that round completes, no other.
        thread::sleep(Duration::from_millis(100));
        let report = handle.cancel_and_join();
        assert!(saw_return.load(std::sync::atomic::Ordering::SeqCst));
        assert!(report.cancelled);
        assert_eq!(report.rounds_sent, 1);
    }

    #[test]
    fn cancel_stops_early() {
        let rec = RecordingSender::new("r");
        let log = rec.log();
        let handle = announce(vec![Nic::new(MAC_A, Box::new(rec))], &Schedule::default());
        thread::sleep(Duration::from_millis(100));
        handle.cancel();
        let report = handle.join();
        assert!(report.cancelled && report.finished);
        assert_eq!(report.rounds_sent, 2);
        assert_eq!(log.lock().unwrap().len(), 2);
    }

    #[test]
    fn snapshot_and_empty_schedule() {
        let handle = announce(
            vec![Nic::new(MAC_A, Box::new(RecordingSender::new("r")))],
            &Schedule::disabled(),
        );
        let report = handle.join();
        assert!(report.is_clean());
        assert_eq!(report.frames_sent(), 0);
        assert_eq!(report.nics.len(), 1);

        let handle = announce(Vec::new(), &Schedule::default());
        let snap = handle.snapshot();
        assert_eq!(snap.rounds_planned, 5);
        let report = handle.join();
        assert_eq!(report.rounds_sent, 5);
    }

    #[test]
    fn late_start_catches_up() {
        let rec = RecordingSender::new("r");
        let log = rec.log();
        let resumed = Instant::now()
            .checked_sub(Duration::from_millis(300))
            .unwrap();
        let report = announce_from(
            vec![Nic::new(MAC_A, Box::new(rec))],
            &Schedule::default(),
            resumed,
        )
        .join();
        assert_eq!(report.rounds_sent, 5);
        let log = log.lock().unwrap();
        // Rounds at 0, 50 and 200 ms were due already: sent as one burst,
        // closer together than the wait for round 3 (due 150 ms later).
        assert!(log[2].at - log[0].at < log[3].at - log[2].at);
        assert!(log[3].at - resumed >= Duration::from_millis(450));
        assert!(log[4].at - resumed >= Duration::from_millis(800));
    }

    #[test]
    fn report_serializes() {
        let nics = vec![Nic::new(
            MAC_A,
            Box::new(RecordingSender::failing("bad", libc::EPERM)),
        )
        .with_ipv4([10, 0, 0, 1])];
        let schedule = Schedule {
            rounds: 1,
            ..Schedule::default()
        };
        let report = announce(nics, &schedule).join();
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["nics"][0]["mac"], "52:54:00:00:00:0a");
        assert_eq!(json["nics"][0]["ipv4"], "10.0.0.1");
        assert_eq!(json["errors"][0]["kind"], "rarp");
        assert_eq!(json["errors"][0]["os_error"], libc::EPERM);
        assert_eq!(json["errors"][1]["kind"], "garp");
    }

    #[test]
    fn ipv6_addresses_are_advertised_each_round() {
        const GLOBAL: [u8; 16] = [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        const LINK: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let rec = RecordingSender::new("r");
        let log = rec.log();
        let nic = Nic::new(MAC_A, Box::new(rec))
            .with_ipv4([10, 0, 0, 2])
            .with_ipv6(GLOBAL)
            .with_ipv6(LINK)
            .with_ipv6(GLOBAL);
        let report = announce(vec![nic], &Schedule::default()).join();
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.nics[0].na_sent, 10);
        assert_eq!(report.frames_sent(), 20);
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 20);
        for round in log.chunks(4) {
            let kinds: Vec<_> = round
                .iter()
                .map(|r| parse_announce(&r.frame).unwrap())
                .collect();
            assert_eq!(kinds[0].kind, AnnounceKind::Rarp);
            assert_eq!(kinds[1].kind, AnnounceKind::Garp);
            assert_eq!(kinds[2].kind, AnnounceKind::UnsolicitedNa);
            assert_eq!((kinds[2].mac, kinds[2].ipv6), (MAC_A, Some(GLOBAL)));
            assert_eq!((kinds[3].mac, kinds[3].ipv6), (MAC_A, Some(LINK)));
            // One round's frames go out together, in this order (the log's
            // order); rounds are never early.
        }
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["nics"][0]["ipv6"][0], "fd77::2");
        assert_eq!(json["nics"][0]["ipv6"][1], "fe80::2");
        assert_eq!(json["nics"][0]["na_sent"], 10);
    }

    #[test]
    fn nic_debug() {
        let nic = Nic::new(MAC_A, Box::new(RecordingSender::new("r"))).with_ipv4([1, 2, 3, 4]);
        let text = format!("{nic:?}");
        assert!(
            text.contains("52:54:00:00:00:0a") && text.contains("1.2.3.4"),
            "{text}"
        );
    }
}
