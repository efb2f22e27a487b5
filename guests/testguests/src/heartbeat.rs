//! heartbeat: a 10 ms timer tick, waiting in `wfi` between ticks. Each
//! tick sends this vCPU one self-interrupt (SGI 1 on aarch64) and the
//! runtime counts those received, so both the timer and the SGI paths of
//! the interrupt virtualization are exercised.
//!
//! Lines: `alive ticks=<total>` every 10 ticks, then
//! `heartbeat done=1 ticks=<n> sgis_sent=<s> sgis_received=<r>`.
//!
//! With `masked_wfi=1` it waits for each tick as an operating system's
//! idle loop does: interrupts masked while it checks for work, so the
//! tick comes before the WFI/HLT, which must then end at once.
//!
//! With `line_updates=<n>` it writes one long line in pieces across n live
//! updates instead ([`crate::longline`]).

use crate::{longline, Env, Guest, Line};

pub const DEFAULT_TICKS: u64 = 100;
/// 10 ms ticks.
const TICKS_PER_SECOND: u64 = 100;
const ALIVE_EVERY: u64 = 10;
/// How long to wait for the last self-interrupts after the final tick.
const DRAIN_DIVISOR: u64 = 10;

/// The heartbeat workload (`ticks=`, default 100), or the longline one
/// (`line_updates=`).
pub fn run<G: Guest>(g: &mut G, env: &Env) {
    if let Some(updates) = env.args().line_updates {
        longline::run(g, updates);
        return;
    }
    let ticks = env.args().ticks.unwrap_or(DEFAULT_TICKS);
    let frequency = g.counter_frequency();
    let period = frequency / TICKS_PER_SECOND;
    if period == 0 || !g.start_ticks(period) {
        g.write_line(Line::event("heartbeat").field("error", "no-timer"));
        return;
    }
    let mut seen = 0_u64;
    let mut sent = 0_u64;
    let masked = env.args().masked_wfi;
    while seen < ticks {
        if masked {
            // Long enough that the next tick comes while masked.
            g.wait_masked(g.counter().saturating_add(period + period / 2));
        } else {
            g.wait_for_interrupt();
        }
        let taken = g.interrupt_counts().ticks;
        while seen < taken && seen < ticks {
            seen += 1;
            if g.send_self_ipi() {
                sent += 1;
            }
            if seen.is_multiple_of(ALIVE_EVERY) {
                g.write_line(Line::event("alive").field("ticks", seen));
            }
        }
    }
    g.stop_ticks();
    let deadline = g.counter().saturating_add(frequency / DRAIN_DIVISOR);
    while g.interrupt_counts().ipis < sent && g.counter() < deadline {
        core::hint::spin_loop();
    }
    g.write_line(
        Line::event("heartbeat")
            .flag("done", true)
            .field("ticks", seen)
            .field("sgis_sent", sent)
            .field("sgis_received", g.interrupt_counts().ipis),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Args;
    use crate::fake::FakeGuest;
    use crate::Region;

    fn env(ticks: Option<u64>) -> Env {
        Env::new(Region::default(), [Region::default(); 2], Args { ticks, ..Args::default() })
    }

    #[test]
    fn ticks_sgis_and_alive_lines() {
        let mut g = FakeGuest::new();
        run(&mut g, &env(Some(25)));
        assert_eq!(
            g.lines,
            ["alive ticks=10", "alive ticks=20", "heartbeat done=1 ticks=25 sgis_sent=25 sgis_received=25"]
        );
        assert_eq!(g.tick_period, None, "the tick is stopped at the end");
        assert_eq!(g.waits, 25);
    }

    #[test]
    fn catches_up_on_several_ticks_per_wakeup_and_lost_sgis() {
        let mut g = FakeGuest::new();
        g.ticks_per_wakeup = 3;
        g.drop_ipis_after = Some(4);
        run(&mut g, &env(None));
        assert_eq!(g.lines.len(), 11);
        assert_eq!(g.lines[0], "alive ticks=10");
        assert_eq!(g.lines[9], "alive ticks=100");
        assert_eq!(g.lines[10], "heartbeat done=1 ticks=100 sgis_sent=100 sgis_received=4");
        assert_eq!(g.waits, 34);
    }

    #[test]
    fn masked_waits_span_a_tick_each() {
        let mut g = FakeGuest::new();
        let env = Env::new(
            Region::default(),
            [Region::default(); 2],
            Args { ticks: Some(12), masked_wfi: true, ..Args::default() },
        );
        let start = g.counter();
        run(&mut g, &env);
        assert_eq!(
            g.lines.last().map(core::convert::AsRef::as_ref),
            Some("heartbeat done=1 ticks=12 sgis_sent=12 sgis_received=12")
        );
        let period = g.counter_frequency() / TICKS_PER_SECOND;
        assert!(g.counter() - start >= 12 * (period + period / 2), "each wait spun past a tick first");
    }

    #[test]
    fn line_updates_selects_the_long_line() {
        let mut g = FakeGuest::new();
        g.update_period = Some(1);
        let env =
            Env::new(Region::default(), [Region::default(); 2], Args { line_updates: Some(1), ..Args::default() });
        run(&mut g, &env);
        assert_eq!(g.lines[0], longline::line(1).text());
        assert_eq!(g.tick_period, None, "no tick");
    }

    #[test]
    fn without_a_timer_it_says_so() {
        let mut g = FakeGuest::new();
        g.has_timer = false;
        run(&mut g, &env(Some(5)));
        assert_eq!(g.lines, ["heartbeat error=no-timer"]);
    }
}
