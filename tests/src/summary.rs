//! The end-of-run summary `scripts/run` prints: per update, the versions,
//! the blackout as the hypervisor measured it and as each guest's blackout
//! meter saw it, and the handover size; per guest, its memcheck results and
//! heartbeat ticks.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::events::{Event, Source};

/// One live update as the log tells it.
#[derive(Clone, Debug, PartialEq)]
pub struct UpdateRow {
    pub count: u64,
    pub from: String,
    pub to: String,
    pub blackout_us: u64,
    /// Largest pause each guest's blackout meter saw during this update.
    pub guest_gap_us: BTreeMap<u32, u64>,
    pub handover_bytes: u64,
    pub preserved_pages: u64,
}

/// Matches every `update-done` with its `update-begin` and with the gaps
/// (`guest<N>: blackout gap_us=.. start=..`) that overlap its blackout.
pub fn updates(events: &[Event]) -> Vec<UpdateRow> {
    let mut rows = Vec::new();
    let mut begin: Option<&Event> = None;
    for e in events.iter().filter(|e| e.source == Source::Hypervisor) {
        match e.name.as_str() {
            "update-begin" => begin = Some(e),
            "update-done" => {
                let (freeze, resume, hz) = (e.num("freeze_at"), e.num("resume_at"), e.num("counter_hz"));
                let mut guest_gap_us = BTreeMap::new();
                if let (Some(freeze), Some(resume), Some(hz)) = (freeze, resume, hz.filter(|&h| h > 0)) {
                    for g in events.iter().filter(|g| g.name == "blackout") {
                        let Source::Guest(id) = g.source else { continue };
                        let (Some(gap_us), Some(start)) = (g.num("gap_us"), g.num("start")) else { continue };
                        let end = start + (u128::from(gap_us) * u128::from(hz) / 1_000_000) as u64;
                        if start <= resume && end >= freeze {
                            let best = guest_gap_us.entry(id).or_insert(0);
                            *best = (*best).max(gap_us);
                        }
                    }
                }
                rows.push(UpdateRow {
                    count: e.num("count").unwrap_or(0),
                    from: begin.and_then(|b| b.get("from")).unwrap_or("?").to_string(),
                    to: e.get("version").unwrap_or("?").to_string(),
                    blackout_us: e.num("blackout_us").unwrap_or(0),
                    guest_gap_us,
                    handover_bytes: e.num("handover_bytes").unwrap_or(0),
                    preserved_pages: e.num("preserved_pages").unwrap_or(0),
                });
                begin = None;
            }
            _ => {}
        }
    }
    rows
}

fn ms(us: u64) -> String {
    format!("{}.{} ms", us / 1000, (us % 1000) / 100)
}

/// How many console lines of each of the user's guests the summary shows.
pub const LAST_LINES: usize = 3;

/// The last `n` console lines of guest `id` (without the `guest<N>: `
/// prefix).
pub fn last_lines(serial: &str, id: u64, n: usize) -> Vec<&str> {
    let prefix = format!("guest{id}: ");
    let mine: Vec<&str> = serial.lines().filter_map(|l| l.trim_end_matches('\r').strip_prefix(&prefix)).collect();
    mine[mine.len().saturating_sub(n)..].to_vec()
}

/// Renders the summary. The guests named in `own` (the user's) also get
/// their last console lines.
pub fn render(events: &[Event], serial: &str, own: &[String]) -> String {
    let mut out = String::new();
    let names: BTreeMap<u64, &str> = events
        .iter()
        .filter(|e| e.source == Source::Hypervisor && e.name == "guest-start")
        .filter_map(|e| Some((e.num("id")?, e.get("name")?)))
        .collect();
    let rows = updates(events);
    let _ = writeln!(out, "== summary ==");
    for e in events.iter().filter(|e| e.source == Source::Hypervisor) {
        match e.name.as_str() {
            "update-refused" => {
                let _ = writeln!(out, "update refused: {}", e.get("reason").unwrap_or("?"));
            }
            "update-cancelled" => {
                let _ = writeln!(out, "update cancelled: {}", e.get("reason").unwrap_or("?"));
            }
            "guest-refused" => {
                let _ =
                    writeln!(out, "guest {} refused: {}", e.get("name").unwrap_or("?"), e.get("reason").unwrap_or("?"));
            }
            _ => {}
        }
    }
    if !rows.is_empty() {
        let _ = writeln!(
            out,
            "{:>3}  {:<16}  {:>12}  {:<28}  {:>9}  {:>10}",
            "#", "from -> to", "blackout hv", "blackout seen by guests", "handover", "preserved"
        );
        for r in &rows {
            let seen: Vec<String> = r
                .guest_gap_us
                .iter()
                .map(|(id, us)| format!("{}={}", names.get(&u64::from(*id)).copied().unwrap_or("?"), ms(*us)))
                .collect();
            let _ = writeln!(
                out,
                "{:>3}  {:<16}  {:>12}  {:<28}  {:>7} B  {:>4} pages",
                r.count,
                format!("{} -> {}", r.from, r.to),
                ms(r.blackout_us),
                if seen.is_empty() { "-".to_string() } else { seen.join(" ") },
                r.handover_bytes,
                r.preserved_pages
            );
        }
    }
    for (&id, name) in &names {
        let mine: Vec<&Event> = events.iter().filter(|e| e.source == Source::Guest(id as u32)).collect();
        let passes: Vec<&&Event> = mine.iter().filter(|e| e.name == "memcheck" && e.get("pass").is_some()).collect();
        let ok = passes.iter().filter(|e| e.num("ok") == Some(1)).count();
        let ticks = mine.iter().filter(|e| e.name == "alive").filter_map(|e| e.num("ticks")).max();
        let updater = mine.iter().find(|e| e.name == "updater" && e.get("done").is_some());
        let stop = events
            .iter()
            .find(|e| e.name == "guest-stop" && e.num("id") == Some(id))
            .and_then(|e| e.get("reason"))
            .unwrap_or("running");
        let mut line = format!("guest{id} {name:<10} stopped={stop}");
        if !passes.is_empty() {
            let _ = write!(line, " memcheck ok={ok}/{}", passes.len());
        }
        if let Some(t) = ticks {
            let _ = write!(line, " alive_ticks={t}");
        }
        if let Some(u) = updater {
            let (n, failed) = (u.num("updates").unwrap_or(0), u.num("failed").unwrap_or(0));
            let _ = write!(line, " updates ok={}/{n}", n.saturating_sub(failed));
        }
        let _ = writeln!(out, "{line}");
        if own.iter().any(|o| o == name) {
            let lines = last_lines(serial, id, LAST_LINES);
            if lines.is_empty() {
                let _ = writeln!(out, "    (no console output)");
            }
            for l in lines {
                let _ = writeln!(out, "    | {l}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::parse_log;

    const LOG: &str = "\
hv: guest-start id=3 name=blackout mem_mib=16 vcpus=1
hv: guest-start id=2 name=memcheck mem_mib=32 vcpus=1
guest2: memcheck ok=1 pages=10 pass=1
hv: update-begin from=0.1.0 to=0.1.1
guest3: blackout gap_us=5000 start=100
guest3: blackout gap_us=90000 start=1000000
hv: update-done count=1 version=0.1.1 blackout_us=88000 handover_bytes=15639 preserved_pages=9 freeze_at=1000100 resume_at=6500000 counter_hz=62500000
guest2: memcheck ok=1 pages=10 pass=2
hv: guest-stop id=2 reason=shutdown
";

    #[test]
    fn matches_guest_gaps_to_updates() {
        let rows = updates(&parse_log(LOG));
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].from.as_str(), rows[0].to.as_str()), ("0.1.0", "0.1.1"));
        assert_eq!(rows[0].guest_gap_us.get(&3), Some(&90000));
        let text = render(&parse_log(LOG), LOG, &[]);
        assert!(text.contains("0.1.0 -> 0.1.1"), "{text}");
        assert!(text.contains("blackout=90.0 ms"), "{text}");
        assert!(text.contains("guest2 memcheck   stopped=shutdown memcheck ok=2/2\n"), "{text}");
        assert!(!text.contains("    | "), "only the user's guests get their last lines: {text}");
    }

    #[test]
    fn the_users_guests_get_their_last_lines_and_the_updater_its_count() {
        let log = "\
hv: guest-start id=1 name=kernel mem_mib=64 vcpus=1
hv: guest-start id=2 name=quiet mem_mib=64 vcpus=1
hv: guest-start id=3 name=updater mem_mib=16 vcpus=1
hv: guest-refused name=broken reason=bad-elf
guest1: Booting
guest1: tick 1
hv: update-done count=1 version=0.1.1 blackout_us=9000 handover_bytes=1 preserved_pages=1
guest1: tick 2
guest1: tick 3
guest3: updater done=1 ok=1 updates=1 failed=0
hv: guest-stop id=3 reason=shutdown
";
        let own = ["kernel".to_string(), "quiet".to_string()];
        let text = render(&parse_log(log), log, &own);
        assert!(text.contains("guest broken refused: bad-elf\n"), "{text}");
        assert!(
            text.contains("guest1 kernel     stopped=running\n    | tick 1\n    | tick 2\n    | tick 3\n"),
            "{text}"
        );
        assert!(text.contains("guest2 quiet      stopped=running\n    (no console output)\n"), "{text}");
        assert!(text.contains("guest3 updater    stopped=shutdown updates ok=1/1\n"), "{text}");
        assert_eq!(last_lines(log, 1, 10), ["Booting", "tick 1", "tick 2", "tick 3"]);
    }
}
