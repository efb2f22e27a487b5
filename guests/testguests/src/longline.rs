//! longline: one long console line written a few bytes per `CONSOLE_WRITE`,
//! with pauses in guest time, while live updates happen. The hypervisor
//! prints a guest's line only once it ends, so the bytes written before
//! each update are in that update's handover (the `console` record,
//! `kho/ABI.md` §4.6), and the line must still come out whole.
//!
//! The heartbeat guest runs this instead of its tick when its bootargs
//! carry `line_updates=<n>`: the line ends only once the hypervisor's
//! update count (`GET_HV_INFO`) has risen by n, and its pieces are spread
//! over those updates (piece k of p waits for k·n/p of them), so every
//! update finds part of the line written and not yet ended.
//!
//! Lines: `longline updates=<n> text=00.01.02. ... 59.`, written
//! [`PIECE_BYTES`] at a time, then `longline done=1 bytes=<b> pieces=<p>
//! updates_seen=<k> stalled=<0|1>` (`stalled=1`: no update came for
//! [`STALL_SECONDS`], so the line was ended early).

use core::fmt::{self, Display};

use crate::hypercall::Request;
use crate::updater::{hv_info, wait_ms};
use crate::{Guest, Line};

/// Bytes per console write.
pub const PIECE_BYTES: usize = 2;
/// Guest time between two writes, and between two looks at the update
/// count while a piece waits for its update.
pub const PAUSE_MS: u64 = 10;
/// How long a piece waits for the next update before the line is ended
/// anyway (the updater stopped early): guest time.
pub const STALL_SECONDS: u64 = 60;
/// Two-digit tokens in the text.
pub const TOKENS: u32 = 60;

/// The text after `text=`: `00.01.02. ... 59.`.
struct Tokens;

impl Display for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (0..TOKENS).try_for_each(|k| write!(f, "{k:02}."))
    }
}

/// The whole line, newline included.
pub fn line(updates: u64) -> Line {
    let mut line = Line::event("longline");
    line.field("updates", updates).field("text", Tokens);
    line
}

/// Live updates since `start`, as the hypervisor counts them; `None` if
/// it cannot tell.
fn updates_since<G: Guest>(g: &mut G, start: u64) -> Option<u64> {
    hv_info(g).map(|i| i.update_count.saturating_sub(start))
}

/// Waits until `want` updates happened since `start`, looking every
/// [`PAUSE_MS`]; false if none came for [`STALL_SECONDS`].
fn wait_for_updates<G: Guest>(g: &mut G, start: u64, want: u64, seen: &mut u64) -> bool {
    let stall = g.counter_frequency().saturating_mul(STALL_SECONDS);
    let mut since = g.counter();
    while *seen < want {
        wait_ms(g, PAUSE_MS);
        let now = updates_since(g, start).unwrap_or(*seen);
        if now > *seen {
            *seen = now;
            since = g.counter();
        } else if g.counter().saturating_sub(since) > stall {
            return false;
        }
    }
    true
}

/// The longline workload over `updates` live updates.
pub fn run<G: Guest>(g: &mut G, updates: u64) {
    let line = line(updates);
    let bytes = line.as_bytes();
    let Some((newline, text)) = bytes.split_last() else { return };
    let start = hv_info(g).map_or(0, |i| i.update_count);
    let pieces = text.len().div_ceil(PIECE_BYTES) as u64;
    let mut seen = 0;
    let mut stalled = false;
    for (k, piece) in (0_u64..).zip(text.chunks(PIECE_BYTES)) {
        if !stalled {
            stalled = !wait_for_updates(g, start, k * updates / pieces, &mut seen);
        }
        g.hypercall(Request::console_write(g.gpa_of(piece.as_ptr()), piece.len()));
        wait_ms(g, PAUSE_MS);
    }
    if !stalled {
        stalled = !wait_for_updates(g, start, updates, &mut seen);
    }
    g.hypercall(Request::console_write(g.gpa_of(newline), 1));
    let seen = updates_since(g, start).unwrap_or(seen);
    g.write_line(
        Line::event("longline")
            .flag("done", true)
            .field("bytes", text.len())
            .field("pieces", pieces)
            .field("updates_seen", seen)
            .flag("stalled", stalled),
    );
}

#[cfg(test)]
mod tests {
    use std::vec::Vec;

    use hvcall::{call, Control};

    use super::*;
    use crate::fake::FakeGuest;

    #[test]
    fn the_line_is_documented_and_fits_the_console() {
        let l = line(10);
        assert!(l.text().starts_with("longline updates=10 text=00.01.02."));
        assert!(l.text().ends_with("58.59."));
        assert_eq!(l.text().len(), 25 + 3 * TOKENS as usize);
        assert!(!l.truncated());
    }

    /// (update count, bytes) of every console write.
    fn writes(g: &FakeGuest) -> Vec<(u64, u16)> {
        g.requests
            .iter()
            .zip(&g.update_counts)
            .filter_map(|(r, &n)| {
                let c = Control::decode(r.control).ok()?;
                (c.code == call::CONSOLE_WRITE).then_some((n, c.rep_count))
            })
            .collect()
    }

    #[test]
    fn pieces_are_spread_over_the_updates_and_the_line_ends_after_the_last() {
        let mut g = FakeGuest::new();
        g.counter_step = 100;
        g.update_period = Some(g.frequency / 4);
        run(&mut g, 10);
        assert_eq!(g.lines[0], line(10).text());
        assert_eq!(g.lines[1], "longline done=1 bytes=205 pieces=103 updates_seen=10 stalled=0");
        let w = writes(&g);
        let (last, pieces) = w.split_last().unwrap();
        let (newline, pieces) = pieces.split_last().unwrap();
        assert_eq!(pieces.len(), 103);
        assert!(pieces.iter().all(|&(_, n)| n as usize <= PIECE_BYTES));
        assert_eq!(pieces[0].0, 1, "the line starts before the first update");
        for u in 0..10 {
            assert!(pieces.iter().any(|&(at, _)| at == 1 + u), "bytes written between updates {u} and {}", u + 1);
        }
        assert_eq!(*newline, (11, 1), "ended after the tenth update");
        assert_eq!(last.0, 11);
    }

    #[test]
    fn without_updates_the_line_ends_after_the_stall() {
        let mut g = FakeGuest::new();
        g.counter_step = 5_000;
        run(&mut g, 3);
        assert_eq!(g.lines[0], line(3).text());
        assert_eq!(g.lines[1], "longline done=1 bytes=204 pieces=102 updates_seen=0 stalled=1");
    }
}
