//! blackout: reads the counter in a tight loop with interrupts masked and
//! tracks the largest gap between two consecutive reads. Any time the vCPU
//! does not run (preemption, a live update) shows up as a gap; that the
//! loop never yields also proves a spinning guest cannot starve others.
//!
//! Lines: `blackout max_gap_us=<n> samples=<n>` every 0.5 s, then the same
//! with `final=1`; and `blackout gap_us=<n> start=<counter>` for every gap
//! of at least `gap_report_us=` (default 2000), so each pause can be matched
//! to what the hypervisor did at that time (counters are not offset). The
//! reports' own console hypercalls count towards the gaps (a few µs): left
//! out, they would hide a pause that happens while the guest reports.

use crate::{Env, Guest, Line};

pub const DEFAULT_SECONDS: u64 = 2;
/// Gaps at least this long are reported one by one.
pub const DEFAULT_GAP_REPORT_US: u64 = 2000;
/// Reports per second.
const REPORTS_PER_SECOND: u64 = 2;

/// The largest difference between consecutive counter reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GapTracker {
    last: u64,
    max_gap: u64,
    samples: u64,
}

impl GapTracker {
    pub const fn new(now: u64) -> Self {
        Self { last: now, max_gap: 0, samples: 0 }
    }

    /// Records one read and returns the gap since the previous one. A
    /// counter that went backwards counts as no gap.
    pub fn record(&mut self, now: u64) -> u64 {
        let gap = now.saturating_sub(self.last);
        if gap > self.max_gap {
            self.max_gap = gap;
        }
        self.last = now;
        self.samples += 1;
        gap
    }

    /// Largest gap in counts.
    pub const fn max_gap(&self) -> u64 {
        self.max_gap
    }

    pub const fn samples(&self) -> u64 {
        self.samples
    }
}

/// `counts` of a `frequency` Hz counter in microseconds, rounded down; 0
/// for a zero frequency.
pub fn counts_to_us(counts: u64, frequency: u64) -> u64 {
    if frequency == 0 {
        return 0;
    }
    let us = u128::from(counts) * 1_000_000 / u128::from(frequency);
    u64::try_from(us).unwrap_or(u64::MAX)
}

/// The blackout workload (`seconds=`, default 2).
pub fn run<G: Guest>(g: &mut G, env: &Env) {
    let frequency = g.counter_frequency();
    let report_every = frequency / REPORTS_PER_SECOND;
    if report_every == 0 {
        g.write_line(Line::event("blackout").field("error", "no-counter-frequency"));
        return;
    }
    let duration = env.args().seconds.unwrap_or(DEFAULT_SECONDS).saturating_mul(frequency);
    let report_gap = env.args().gap_report_us.unwrap_or(DEFAULT_GAP_REPORT_US).saturating_mul(frequency) / 1_000_000;
    let start = g.counter();
    let mut tracker = GapTracker::new(start);
    let mut next_report = start.saturating_add(report_every);
    loop {
        let now = g.counter();
        let gap = tracker.record(now);
        if gap >= report_gap.max(1) {
            g.write_line(
                Line::event("blackout").field("gap_us", counts_to_us(gap, frequency)).field("start", now - gap),
            );
        }
        if now < next_report {
            continue;
        }
        let done = now.saturating_sub(start) >= duration;
        let mut line = Line::event("blackout");
        line.field("max_gap_us", counts_to_us(tracker.max_gap(), frequency)).field("samples", tracker.samples());
        if done {
            line.flag("final", true);
        }
        g.write_line(&line);
        if done {
            return;
        }
        next_report = next_report.saturating_add(report_every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Args;
    use crate::fake::FakeGuest;
    use crate::Region;

    #[test]
    fn tracker_keeps_the_largest_gap() {
        let mut t = GapTracker::new(100);
        for now in [101, 105, 106, 140, 141, 130, 131] {
            t.record(now);
        }
        assert_eq!((t.max_gap(), t.samples()), (34, 7));
    }

    #[test]
    fn converts_to_microseconds() {
        assert_eq!(counts_to_us(62_500, 62_500_000), 1000);
        assert_eq!(counts_to_us(1, 62_500_000), 0);
        assert_eq!(counts_to_us(u64::MAX, 1), u64::MAX);
        assert_eq!(counts_to_us(5, 0), 0);
    }

    #[test]
    fn run_reports_twice_a_second_and_sees_a_pause() {
        let mut g = FakeGuest::new();
        g.frequency = 1000;
        g.counter_step = 1;
        // The vCPU stops for 30 ms at read 700 (a live update).
        g.counter_jumps = std::vec![(700, 30)];
        let env = Env::new(Region::default(), [Region::default(); 2], Args { seconds: Some(1), ..Args::default() });
        run(&mut g, &env);
        assert_eq!(
            g.lines,
            [
                "blackout max_gap_us=1000 samples=500",
                "blackout gap_us=31000 start=700",
                "blackout max_gap_us=31000 samples=970 final=1"
            ]
        );
    }

    #[test]
    fn run_without_a_frequency_stops() {
        let mut g = FakeGuest::new();
        g.frequency = 1;
        run(&mut g, &Env::new(Region::default(), [Region::default(); 2], Args::default()));
        assert_eq!(g.lines, ["blackout error=no-counter-frequency"]);
    }
}
