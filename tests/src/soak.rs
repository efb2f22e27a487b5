//! The soak: many live updates in a row with the test guests running
//! throughout (`hvsoak`, `scripts/soak`), and what must hold across all of
//! them. Every update done, in order; memcheck clean; heartbeat ticks only
//! increasing and every self-interrupt received; the old image intact
//! after every update; and nothing leaking: the hypervisor's free frames
//! once each update has finished, the handover size and the preserved
//! pages the same after every update as after the first. On aarch64 a
//! DMA guest moves and verifies data through the SMMU across every update.

use crate::emulator::RunOutcome;
use crate::events::Source;
use crate::{guests, launch, Arch};

/// Boots the demo set-up of `scripts/run` (the test guests, sized to
/// outlive the updates, and the updater alternating between two images)
/// for `updates` updates on `arch`, and checks it ([`check`]). The timeout
/// is a safety net: the run takes about 0.9 s of guest time per update.
pub fn run(arch: Arch, updates: u32) -> Result<(SoakReport, RunOutcome), String> {
    let timeout = 600 + u64::from(updates) * if arch == Arch::X86_64 { 30 } else { 3 };
    let line = format!("--arch {} --updates {updates} --timeout {timeout}", arch.name());
    let mut words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    if arch == Arch::Aarch64 {
        // DMA through the SMMU all along: the edu device assigned to the
        // dma guest, which transfers and verifies until it has seen every
        // update (capped at 20 transfers per update), beside the test
        // guests. The run still ends when every guest has stopped.
        let dir = guests::build_test_guests(arch).map_err(|e| e.to_string())?;
        let dma = format!(
            "{},device=00:02.0,cmdline=updates={updates} transfers={}",
            dir.join("dma.bin").display(),
            u64::from(updates) * 20 + 10
        );
        words.extend(["--with-test-guests".into(), "--guest".into(), dma, "--linger".into(), timeout.to_string()]);
    }
    let o = launch::options(&words).map_err(|e| e.to_string())?.ok_or("no options")?;
    let prepared = launch::prepare(&o, &format!("soak-{}", arch.name())).map_err(|e| e.to_string())?;
    let outcome = launch::run(&prepared).map_err(|e| e.to_string())?;
    let report = check(&outcome, updates as usize)?;
    Ok((report, outcome))
}

/// What a soak run showed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SoakReport {
    pub updates: usize,
    /// Free frames after the first and the last update (equal when the
    /// check passed).
    pub free_frames: (u64, u64),
    pub handover_bytes: (u64, u64),
    pub preserved_pages: (u64, u64),
    pub memcheck_passes: usize,
    pub heartbeat_ticks: u64,
    /// Median and largest blackout.
    pub blackout_us: (u64, u64),
    /// DMA transfers verified by the dma guest (aarch64, through the SMMU).
    pub dma_transfers: Option<u64>,
}

impl SoakReport {
    /// The `SOAK` line `hvsoak` prints.
    pub fn line(&self) -> String {
        format!(
            "SOAK updates={} free_frames_first={} free_frames_last={} handover_bytes_first={} handover_bytes_last={} \
             preserved_pages_first={} preserved_pages_last={} memcheck_passes={} heartbeat_ticks={} \
             blackout_median_us={} blackout_max_us={} dma_transfers={}",
            self.updates,
            self.free_frames.0,
            self.free_frames.1,
            self.handover_bytes.0,
            self.handover_bytes.1,
            self.preserved_pages.0,
            self.preserved_pages.1,
            self.memcheck_passes,
            self.heartbeat_ticks,
            self.blackout_us.0,
            self.blackout_us.1,
            self.dma_transfers.map_or_else(|| "none".into(), |n| n.to_string()),
        )
    }
}

/// The id of the guest named `name`.
fn id_of(run: &RunOutcome, name: &str) -> Option<u32> {
    let e = run.hv("guest-start").into_iter().find(|e| e.get("name") == Some(name))?;
    u32::try_from(e.num("id")?).ok()
}

/// Checks a soak run of `updates` updates; the reason if it failed.
pub fn check(run: &RunOutcome, updates: usize) -> Result<SoakReport, String> {
    let fail = |why: String| Err(run.failure(&why));
    if !run.clean_shutdown() {
        return fail("the run did not end with every guest stopped by itself".into());
    }
    let done = run.hv("update-done");
    if done.len() != updates {
        return fail(format!("{} of {updates} updates done", done.len()));
    }
    for (k, e) in done.iter().enumerate() {
        if e.num("count") != Some(k as u64 + 1) {
            return fail(format!("update {} reported count={:?}", k + 1, e.get("count")));
        }
    }
    // The same after every update as after the first: nothing leaks.
    let same = |key: &str| -> Result<(u64, u64), String> {
        let values: Vec<Option<u64>> = done.iter().map(|e| e.num(key)).collect();
        let first = values.first().copied().flatten().ok_or_else(|| format!("update-done without {key}"))?;
        match values.iter().position(|&v| v != Some(first)) {
            None => Ok((first, first)),
            Some(k) => Err(format!("{key} was {first} after update 1 but {:?} after update {}", values[k], k + 1)),
        }
    };
    let (free_frames, handover_bytes, preserved_pages) =
        match (same("free_frames"), same("handover_bytes"), same("preserved_pages")) {
            (Ok(f), Ok(h), Ok(p)) => (f, h, p),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return fail(e),
        };
    if free_frames.0 == 0 {
        return fail("free_frames=0 after an update".into());
    }
    let old = run.hv("old-image");
    if old.len() != updates || old.iter().any(|e| e.num("intact") != Some(1)) {
        return fail(format!(
            "old image intact after {} of {updates} updates",
            old.iter().filter(|e| e.num("intact") == Some(1)).count()
        ));
    }
    if !run.hv("fault").is_empty() {
        return fail("a guest faulted".into());
    }

    let mc = id_of(run, "memcheck").ok_or_else(|| run.failure("no memcheck guest"))?;
    let passes: Vec<_> = run.guest(mc, "memcheck").into_iter().filter(|e| e.get("pass").is_some()).collect();
    if passes.is_empty() || passes.iter().any(|e| e.num("ok") != Some(1)) {
        return fail(format!("memcheck: {} passes, not all ok=1", passes.len()));
    }
    let verdict = run.guest(mc, "memcheck").into_iter().find(|e| e.get("done").is_some());
    if verdict.is_none_or(|e| e.num("failed") != Some(0)) {
        return fail("memcheck did not finish clean".into());
    }
    // The last update landed while memcheck still ran: clean throughout.
    let lines: Vec<&str> = run.serial.lines().collect();
    let last_update = lines.iter().rposition(|l| l.starts_with("hv: update-done"));
    let mc_done = lines.iter().position(|l| l.starts_with(&format!("guest{mc}: memcheck done")));
    if !matches!((last_update, mc_done), (Some(u), Some(d)) if u < d) {
        return fail("memcheck ended before the last update".into());
    }

    let hb = id_of(run, "heartbeat").ok_or_else(|| run.failure("no heartbeat guest"))?;
    let ticks: Vec<u64> = run.guest(hb, "alive").iter().filter_map(|e| e.num("ticks")).collect();
    if ticks.is_empty() || ticks.windows(2).any(|w| w[0] >= w[1]) {
        return fail("heartbeat ticks did not only increase".into());
    }
    let beat = run.guest(hb, "heartbeat").into_iter().find(|e| e.get("done").is_some());
    if beat.is_none_or(|e| e.num("sgis_sent") != e.num("sgis_received")) {
        return fail("heartbeat lost a self-interrupt".into());
    }
    let hb_done = lines.iter().position(|l| l.starts_with(&format!("guest{hb}: heartbeat done")));
    if !matches!((last_update, hb_done), (Some(u), Some(d)) if u < d) {
        return fail("heartbeat ended before the last update".into());
    }
    if run.events.iter().any(|e| matches!(e.source, Source::Guest(_)) && e.num("ok") == Some(0)) {
        return fail("a guest reported ok=0".into());
    }

    let dma_transfers = match id_of(run, "dma") {
        None => None,
        Some(dma) => Some(check_dma(run, dma, updates).map_err(|why| run.failure(&why))?),
    };

    let mut blackouts: Vec<u64> = done.iter().filter_map(|e| e.num("blackout_us")).collect();
    blackouts.sort_unstable();
    Ok(SoakReport {
        updates,
        free_frames,
        handover_bytes,
        preserved_pages,
        memcheck_passes: passes.len(),
        heartbeat_ticks: ticks.last().copied().unwrap_or(0),
        blackout_us: (blackouts[blackouts.len() / 2], blackouts.last().copied().unwrap_or(0)),
        dma_transfers,
    })
}

/// The dma guest (`dma updates=<n>`): every transfer verified, it saw
/// every update, and it reported progress between the first and the last
/// update, so DMA flowed through the SMMU across them. Its transfers.
fn check_dma(run: &RunOutcome, dma: u32, updates: usize) -> Result<u64, String> {
    let done = run.guest(dma, "dma").into_iter().find(|e| e.num("done") == Some(1));
    let Some(done) = done else { return Err("the dma guest did not finish".into()) };
    let (ok, bad) = (done.num("ok").unwrap_or(0), done.num("bad").unwrap_or(1));
    if bad != 0 || ok == 0 {
        return Err(format!("dma: ok={ok} bad={bad}"));
    }
    if done.num("stalled") != Some(0) || done.num("updates_seen") < Some(updates as u64) {
        return Err(format!("dma saw {:?} of {updates} updates", done.get("updates_seen")));
    }
    let lines: Vec<&str> = run.serial.lines().collect();
    let first = lines.iter().position(|l| l.starts_with("hv: update-done"));
    let last = lines.iter().rposition(|l| l.starts_with("hv: update-done"));
    let progress = format!("guest{dma}: dma transfers=");
    let between = match (first, last) {
        (Some(f), Some(l)) => lines[f..l].iter().filter(|l| l.starts_with(&progress)).count(),
        _ => 0,
    };
    if updates > 1 && between == 0 {
        return Err("no DMA progress between the first and the last update".into());
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::events::parse_log;

    fn run_of(serial: &str) -> RunOutcome {
        RunOutcome {
            events: parse_log(serial),
            serial: serial.to_string(),
            timed_out: false,
            stopped_after_updater: false,
            exit_code: Some(0),
            log_path: PathBuf::from("serial.log"),
            elapsed: Duration::from_secs(1),
        }
    }

    fn log(free_after_second: u64) -> String {
        let done = |n: u64, free: u64| {
            format!(
                "hv: update-done count={n} blackout_us={} handover_bytes=8369 preserved_pages=20748 free_frames={free}\n\
                 hv: old-image intact=1 base=0x40080000 bytes=1\n",
                900 + n
            )
        };
        format!(
            "hv: guest-start id=1 name=heartbeat\nhv: guest-start id=2 name=memcheck\n\
             guest1: alive ticks=10\nguest2: memcheck ok=1 pages=10 pass=1\n{}\
             guest1: alive ticks=20\n{}guest2: memcheck ok=1 pages=10 pass=2\nguest1: alive ticks=30\n\
             guest2: memcheck done=1 passes=2 failed=0\nguest1: heartbeat done=1 ticks=30 sgis_sent=30 sgis_received=30\n\
             hv: shutdown status=ok\n",
            done(1, 5000),
            done(2, free_after_second)
        )
    }

    #[test]
    fn a_clean_soak_reports_its_figures() {
        let r = check(&run_of(&log(5000)), 2).expect("clean");
        assert_eq!((r.updates, r.free_frames, r.handover_bytes), (2, (5000, 5000), (8369, 8369)));
        assert_eq!((r.memcheck_passes, r.heartbeat_ticks, r.blackout_us), (2, 30, (902, 902)));
        assert!(r.line().starts_with("SOAK updates=2 free_frames_first=5000 free_frames_last=5000"));
    }

    #[test]
    fn a_frame_lost_in_an_update_fails_the_soak() {
        let e = check(&run_of(&log(4999)), 2).expect_err("a leak");
        assert!(e.starts_with("free_frames was 5000 after update 1 but Some(4999) after update 2"), "{e}");
    }

    #[test]
    fn missing_updates_and_decreasing_ticks_fail_the_soak() {
        assert!(check(&run_of(&log(5000)), 3).is_err_and(|e| e.starts_with("2 of 3 updates done")));
        let backwards = log(5000).replace("alive ticks=30", "alive ticks=15");
        assert!(check(&run_of(&backwards), 2).is_err_and(|e| e.starts_with("heartbeat ticks did not only increase")));
    }
}
