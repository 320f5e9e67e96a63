//! Host-side parser for the guest's serial output, and heartbeat statistics.

use std::time::{Duration, Instant};

use crate::Rate;

/// Longest line kept; a longer run of bytes without a newline is reported as [`Event::Other`]
/// in pieces of this size, so garbage on the serial line cannot grow the buffer without bound.
pub const MAX_LINE: usize = 4096;

/// One thing the guest said on its serial line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `READY ws=<MiB> rate=<n|max>`: the guest finished booting and starts its main loop.
    Ready {
        /// Working-set size in MiB.
        ws: u64,
        /// Pages written per heartbeat period.
        rate: Rate,
    },
    /// One heartbeat (a `.` byte), with the arrival time of the chunk that carried it.
    Heartbeat(Instant),
    /// `T <heartbeats> <pages_written> <pages_verified> <corrupt>`: counters since boot, printed
    /// after every 1000th heartbeat.
    Tline {
        /// Heartbeats printed so far.
        heartbeats: u64,
        /// Pages written so far.
        pages_written: u64,
        /// Pages verified so far.
        pages_verified: u64,
        /// Corrupt pages found so far.
        corrupt: u64,
    },
    /// `CORRUPT page=<n> got=<hex> want=<hex>`: the verifier found a page whose contents differ
    /// from what the guest last wrote (the first differing qword).
    Corrupt {
        /// Working-set page number.
        page: u64,
        /// The qword read.
        got: u64,
        /// The qword expected.
        want: u64,
    },
    /// `STATUS hb=<n> written=<n> verified=<n> corrupt=<n> rx=<n> tx=<n>`: the guest's answer
    /// to a `status` line typed on its serial console (counters since boot; `rx`/`tx` are the
    /// frames its network driver received and sent, 0 without a NIC).
    Status {
        /// Heartbeats printed so far.
        heartbeats: u64,
        /// Pages written so far.
        pages_written: u64,
        /// Pages verified so far.
        pages_verified: u64,
        /// Corrupt pages found so far.
        corrupt: u64,
        /// Frames received.
        rx: u64,
        /// Frames sent.
        tx: u64,
    },
    /// `CPU <k> written=<n> verified=<n> corrupt=<n>`: with `smp=` above 1, one line per
    /// running CPU after each `STATUS` line (CPU 0 is the boot processor): that CPU's own
    /// counters since boot (the `STATUS`/`T` counters are their sums).
    Cpu {
        /// CPU index (0 = boot processor).
        cpu: u64,
        /// Pages this CPU wrote.
        pages_written: u64,
        /// Pages this CPU verified.
        pages_verified: u64,
        /// Corrupt pages this CPU found.
        corrupt: u64,
    },
    /// `GAP <µs>`: with `gap=` on the command line, the boot processor saw more than that many
    /// microseconds pass between two iterations of its main loop (a pause, a migration's
    /// switchover, a host stall), measured with its own TSC.
    Gap {
        /// The stall, in microseconds.
        us: u64,
    },
    /// Any other complete, non-empty line (e.g. `INFO ...`, `ERROR ...`, firmware output).
    Other(String),
}

impl Event {
    /// Parses one complete line (without its newline). Lines that do not match `READY`, `T`,
    /// `CORRUPT`, `STATUS`, `CPU` or `GAP` exactly become [`Event::Other`].
    #[must_use]
    pub fn from_line(line: &str) -> Event {
        parse_ready(line)
            .or_else(|| parse_tline(line))
            .or_else(|| parse_corrupt(line))
            .or_else(|| parse_status(line))
            .or_else(|| parse_cpu(line))
            .or_else(|| parse_gap(line))
            .unwrap_or_else(|| Event::Other(line.to_string()))
    }
}

/// The value of `key=` in a whitespace-separated token.
fn value<'a>(token: Option<&'a str>, key: &str) -> Option<&'a str> {
    token?.strip_prefix(key)?.strip_prefix('=')
}

fn parse_ready(line: &str) -> Option<Event> {
    let mut t = line.split_whitespace();
    if t.next()? != "READY" {
        return None;
    }
    let ws = value(t.next(), "ws")?.parse().ok()?;
    let rate = match value(t.next(), "rate")? {
        "max" => Rate::Max,
        n => Rate::Pages(n.parse().ok()?),
    };
    Some(Event::Ready { ws, rate })
}

fn parse_tline(line: &str) -> Option<Event> {
    let mut t = line.split_whitespace();
    if t.next()? != "T" {
        return None;
    }
    let mut n = [0u64; 4];
    for v in &mut n {
        *v = t.next()?.parse().ok()?;
    }
    if t.next().is_some() {
        return None;
    }
    Some(Event::Tline {
        heartbeats: n[0],
        pages_written: n[1],
        pages_verified: n[2],
        corrupt: n[3],
    })
}

fn parse_corrupt(line: &str) -> Option<Event> {
    let mut t = line.split_whitespace();
    if t.next()? != "CORRUPT" {
        return None;
    }
    let page = value(t.next(), "page")?.parse().ok()?;
    let got = u64::from_str_radix(value(t.next(), "got")?, 16).ok()?;
    let want = u64::from_str_radix(value(t.next(), "want")?, 16).ok()?;
    Some(Event::Corrupt { page, got, want })
}

fn parse_status(line: &str) -> Option<Event> {
    let mut t = line.split_whitespace();
    if t.next()? != "STATUS" {
        return None;
    }
    let mut n = [0u64; 6];
    for (v, key) in n
        .iter_mut()
        .zip(["hb", "written", "verified", "corrupt", "rx", "tx"])
    {
        *v = value(t.next(), key)?.parse().ok()?;
    }
    if t.next().is_some() {
        return None;
    }
    Some(Event::Status {
        heartbeats: n[0],
        pages_written: n[1],
        pages_verified: n[2],
        corrupt: n[3],
        rx: n[4],
        tx: n[5],
    })
}

fn parse_cpu(line: &str) -> Option<Event> {
    let mut t = line.split_whitespace();
    if t.next()? != "CPU" {
        return None;
    }
    let cpu = t.next()?.parse().ok()?;
    let mut n = [0u64; 3];
    for (v, key) in n.iter_mut().zip(["written", "verified", "corrupt"]) {
        *v = value(t.next(), key)?.parse().ok()?;
    }
    if t.next().is_some() {
        return None;
    }
    Some(Event::Cpu {
        cpu,
        pages_written: n[0],
        pages_verified: n[1],
        corrupt: n[2],
    })
}

fn parse_gap(line: &str) -> Option<Event> {
    let mut t = line.split_whitespace();
    if t.next()? != "GAP" {
        return None;
    }
    let us = t.next()?.parse().ok()?;
    if t.next().is_some() {
        return None;
    }
    Some(Event::Gap { us })
}

/// Incremental parser of the guest's serial output.
///
/// Feed it the bytes read from the serial port in chunks, each with the time it was read. A `.`
/// that arrives while no line is in progress is a heartbeat; any other byte starts (or
/// continues) a line, which is parsed at its `\n` ([`Event::from_line`]). `\r` bytes and empty
/// lines are ignored. Lines may be split across chunks arbitrarily.
#[derive(Debug, Default, Clone)]
pub struct OutputParser {
    line: Vec<u8>,
}

impl OutputParser {
    /// A parser with nothing buffered.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a chunk read at `at` and returns the events it completed.
    pub fn feed(&mut self, bytes: &[u8], at: Instant) -> Vec<Event> {
        let mut out = Vec::new();
        self.feed_into(bytes, at, &mut out);
        out
    }

    /// Like [`feed`](Self::feed), appending the events to `out`.
    pub fn feed_into(&mut self, bytes: &[u8], at: Instant, out: &mut Vec<Event>) {
        for &b in bytes {
            match b {
                b'.' if self.line.is_empty() => out.push(Event::Heartbeat(at)),
                b'\n' => {
                    if let Some(e) = self.take_line() {
                        out.push(e);
                    }
                }
                b'\r' => {}
                _ => {
                    self.line.push(b);
                    if self.line.len() >= MAX_LINE {
                        if let Some(e) = self.take_line() {
                            out.push(e);
                        }
                    }
                }
            }
        }
    }

    /// The bytes of the line in progress (not yet terminated by `\n`).
    #[must_use]
    pub fn partial_line(&self) -> &[u8] {
        &self.line
    }

    /// Ends the stream: returns the line in progress, if any, as an event.
    pub fn finish(&mut self) -> Option<Event> {
        self.take_line()
    }

    fn take_line(&mut self) -> Option<Event> {
        if self.line.is_empty() {
            return None;
        }
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        Some(Event::from_line(&line))
    }
}

/// A gap between two consecutive heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// Number (0-based, in the order recorded) of the heartbeat that ended the gap.
    pub index: u64,
    /// Arrival time of the heartbeat before the gap.
    pub start: Instant,
    /// Arrival time of the heartbeat that ended the gap.
    pub end: Instant,
    /// `end - start`.
    pub len: Duration,
}

/// Statistics over heartbeat arrival times: count, largest gap, and every gap above a
/// threshold (e.g. the longest pause a migration caused).
#[derive(Debug, Clone)]
pub struct HeartbeatStats {
    threshold: Duration,
    count: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    largest: Option<Gap>,
    above: Vec<Gap>,
}

impl HeartbeatStats {
    /// Empty statistics that list every gap longer than `threshold`.
    #[must_use]
    pub fn new(threshold: Duration) -> Self {
        HeartbeatStats {
            threshold,
            count: 0,
            first: None,
            last: None,
            largest: None,
            above: Vec::new(),
        }
    }

    /// Records one heartbeat that arrived at `at` (arrival times are expected in order; an
    /// earlier time than the previous one counts as a zero gap).
    pub fn record(&mut self, at: Instant) {
        if let Some(prev) = self.last {
            let gap = Gap {
                index: self.count,
                start: prev,
                end: at,
                len: at.saturating_duration_since(prev),
            };
            if !matches!(self.largest, Some(g) if g.len >= gap.len) {
                self.largest = Some(gap);
            }
            if gap.len > self.threshold {
                self.above.push(gap);
            }
        } else {
            self.first = Some(at);
        }
        self.last = Some(at);
        self.count += 1;
    }

    /// Records the event if it is an [`Event::Heartbeat`]; returns whether it was.
    pub fn record_event(&mut self, event: &Event) -> bool {
        if let Event::Heartbeat(at) = event {
            self.record(*at);
            true
        } else {
            false
        }
    }

    /// Number of heartbeats recorded.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Arrival time of the first heartbeat.
    #[must_use]
    pub fn first(&self) -> Option<Instant> {
        self.first
    }

    /// Arrival time of the last heartbeat.
    #[must_use]
    pub fn last(&self) -> Option<Instant> {
        self.last
    }

    /// The largest gap between consecutive heartbeats (the earliest of equal ones).
    #[must_use]
    pub fn largest_gap(&self) -> Option<Gap> {
        self.largest
    }

    /// Every gap longer than the threshold, in order.
    #[must_use]
    pub fn gaps_above_threshold(&self) -> &[Gap] {
        &self.above
    }

    /// The threshold given to [`new`](Self::new).
    #[must_use]
    pub fn threshold(&self) -> Duration {
        self.threshold
    }

    /// Mean interval between heartbeats (`(last - first) / (count - 1)`).
    #[must_use]
    pub fn mean_interval(&self) -> Option<Duration> {
        let (first, last) = (self.first?, self.last?);
        let n = u32::try_from(self.count.checked_sub(1)?).ok()?;
        if n == 0 {
            return None;
        }
        Some(last.saturating_duration_since(first) / n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn parses_whole_output() {
        let t = t0();
        let mut p = OutputParser::new();
        let ev = p.feed(
            b"INFO tsc_khz=2445404 hb=1000 pattern=seq\nREADY ws=64 rate=100\n...\nT 1000 5 6 0\n..\nCORRUPT page=12 got=00000000000000ff want=0000000c00000001\n.",
            t,
        );
        assert_eq!(
            ev,
            vec![
                Event::Other("INFO tsc_khz=2445404 hb=1000 pattern=seq".into()),
                Event::Ready {
                    ws: 64,
                    rate: Rate::Pages(100)
                },
                Event::Heartbeat(t),
                Event::Heartbeat(t),
                Event::Heartbeat(t),
                Event::Tline {
                    heartbeats: 1000,
                    pages_written: 5,
                    pages_verified: 6,
                    corrupt: 0
                },
                Event::Heartbeat(t),
                Event::Heartbeat(t),
                Event::Corrupt {
                    page: 12,
                    got: 0xff,
                    want: 0x0000_000c_0000_0001
                },
                Event::Heartbeat(t),
            ]
        );
        assert_eq!(p.finish(), None);
    }

    #[test]
    fn lines_split_across_chunks() {
        let t1 = t0();
        let t2 = t1 + Duration::from_millis(5);
        let t3 = t2 + Duration::from_millis(5);
        let mut p = OutputParser::new();
        assert_eq!(p.feed(b"REA", t1), vec![]);
        assert_eq!(p.partial_line(), b"REA");
        assert_eq!(
            p.feed(b"DY ws=16 rate=max\r\n.", t2),
            vec![
                Event::Ready {
                    ws: 16,
                    rate: Rate::Max
                },
                Event::Heartbeat(t2)
            ]
        );
        assert_eq!(p.feed(b".\nT 10", t3), vec![Event::Heartbeat(t3)]);
        assert_eq!(p.feed(b"00 1 2", t3), vec![]);
        assert_eq!(
            p.feed(b" 3\n", t3),
            vec![Event::Tline {
                heartbeats: 1000,
                pages_written: 1,
                pages_verified: 2,
                corrupt: 3
            }]
        );
    }

    #[test]
    fn byte_at_a_time_matches_whole() {
        let text: &[u8] = b"READY ws=1 rate=0\n....\nT 1000 0 99 0\n.\nCORRUPT page=0 got=0000000000000001 want=0000000000000000\nERROR x. y\n";
        let t = t0();
        let whole = OutputParser::new().feed(text, t);
        let mut p = OutputParser::new();
        let mut pieces = Vec::new();
        for b in text {
            p.feed_into(std::slice::from_ref(b), t, &mut pieces);
        }
        assert_eq!(whole, pieces);
        assert_eq!(whole.last(), Some(&Event::Other("ERROR x. y".into())));
    }

    #[test]
    fn dots_inside_a_line_are_text() {
        let t = t0();
        let mut p = OutputParser::new();
        assert_eq!(
            p.feed(b"..qboot 1.2\n", t),
            vec![
                Event::Heartbeat(t),
                Event::Heartbeat(t),
                Event::Other("qboot 1.2".into())
            ]
        );
        // A CORRUPT line right after dots, without the leading newline, still parses.
        let ev = p.feed(
            b"..CORRUPT page=3 got=0000000000000000 want=0000000300000002\n",
            t,
        );
        assert_eq!(ev.len(), 3);
        assert_eq!(
            ev[2],
            Event::Corrupt {
                page: 3,
                got: 0,
                want: 0x3_0000_0002
            }
        );
    }

    #[test]
    fn malformed_lines_are_other() {
        for l in [
            "READY ws=x rate=1",
            "READY ws=1",
            "T 1 2 3",
            "T 1 2 3 4 5",
            "T a b c d",
            "CORRUPT page=1 got=zz want=00",
            "TT 1 2 3 4",
        ] {
            assert_eq!(Event::from_line(l), Event::Other(l.into()), "{l}");
        }
        assert_eq!(
            Event::from_line("READY ws=8 rate=7 extra=1"),
            Event::Ready {
                ws: 8,
                rate: Rate::Pages(7)
            }
        );
    }

    #[test]
    fn cpu_lines() {
        assert_eq!(
            Event::from_line("CPU 1 written=15779 verified=2311220 corrupt=2"),
            Event::Cpu {
                cpu: 1,
                pages_written: 15779,
                pages_verified: 2_311_220,
                corrupt: 2
            }
        );
        for l in [
            "CPU x written=1 verified=2 corrupt=3",
            "CPU 1 written=1 verified=2",
            "CPU 1 written=1 verified=2 corrupt=3 x=4",
            "CPU 1 verified=2 written=1 corrupt=3",
            "SMP cpus=2",
        ] {
            assert_eq!(Event::from_line(l), Event::Other(l.into()), "{l}");
        }
    }

    #[test]
    fn gap_lines() {
        let t = t0();
        let mut p = OutputParser::new();
        assert_eq!(
            p.feed(b"..\nGAP 1234\n.", t),
            vec![
                Event::Heartbeat(t),
                Event::Heartbeat(t),
                Event::Gap { us: 1234 },
                Event::Heartbeat(t),
            ]
        );
        for l in ["GAP", "GAP x", "GAP -1", "GAP 1 2", "GAPS 1"] {
            assert_eq!(Event::from_line(l), Event::Other(l.into()), "{l}");
        }
    }

    #[test]
    fn status_lines() {
        let t = t0();
        let mut p = OutputParser::new();
        let ev = p.feed(
            b"..\nSTATUS hb=12 written=3 verified=45 corrupt=0 rx=7 tx=6\n.\n? statu\n",
            t,
        );
        assert_eq!(
            ev,
            vec![
                Event::Heartbeat(t),
                Event::Heartbeat(t),
                Event::Status {
                    heartbeats: 12,
                    pages_written: 3,
                    pages_verified: 45,
                    corrupt: 0,
                    rx: 7,
                    tx: 6
                },
                Event::Heartbeat(t),
                Event::Other("? statu".into()),
            ]
        );
        for l in [
            "STATUS hb=1 written=2 verified=3 corrupt=4 rx=5",
            "STATUS hb=1 written=2 verified=3 corrupt=4 rx=5 tx=6 x=7",
            "STATUS hb=1 written=2 verified=3 corrupt=4 tx=5 rx=6",
            "STATUS hb=x written=2 verified=3 corrupt=4 rx=5 tx=6",
            "STATUS hb=-1 written=2 verified=3 corrupt=4 rx=5 tx=6",
        ] {
            assert_eq!(Event::from_line(l), Event::Other(l.into()), "{l}");
        }
    }

    #[test]
    fn unterminated_line_and_overlong_line() {
        let t = t0();
        let mut p = OutputParser::new();
        assert!(p.feed(b"partial", t).is_empty());
        assert_eq!(p.finish(), Some(Event::Other("partial".into())));
        assert_eq!(p.finish(), None);
        let long = vec![b'x'; MAX_LINE + 10];
        let ev = p.feed(&long, t);
        assert_eq!(ev, vec![Event::Other("x".repeat(MAX_LINE))]);
        assert_eq!(p.partial_line().len(), 10);
    }

    #[test]
    fn heartbeat_stats() {
        let t = t0();
        let ms = Duration::from_millis;
        let mut s = HeartbeatStats::new(ms(5));
        assert_eq!(s.largest_gap(), None);
        assert_eq!(s.mean_interval(), None);
        for off in [0, 1, 2, 10, 11, 30, 31] {
            s.record(t + ms(off));
        }
        assert_eq!(s.count(), 7);
        let g = s.largest_gap().expect("gap");
        assert_eq!(
            (g.index, g.len, g.start, g.end),
            (5, ms(19), t + ms(11), t + ms(30))
        );
        let above: Vec<(u64, Duration)> = s
            .gaps_above_threshold()
            .iter()
            .map(|g| (g.index, g.len))
            .collect();
        assert_eq!(above, vec![(3, ms(8)), (5, ms(19))]);
        assert_eq!(s.mean_interval(), Some(ms(31) / 6));
        assert_eq!(s.first(), Some(t));
        assert_eq!(s.last(), Some(t + ms(31)));
        assert!(s.record_event(&Event::Heartbeat(t + ms(32))));
        assert!(!s.record_event(&Event::Other("x".into())));
        assert_eq!(s.count(), 8);
    }
}
