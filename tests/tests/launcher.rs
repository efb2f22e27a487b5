//! `scripts/run --guest FILE --updates 2`, through the code `scripts/run`
//! itself runs (`hv_tests::launch`), on aarch64 (QEMU) and x86_64 (Bochs):
//! the user's guest (here the heartbeat test guest's file, passed as one's
//! own kernel would be) runs beside the updater guest, two live updates
//! complete under it, it keeps printing after them, and the launcher ends
//! the run `--linger` seconds after the updater has stopped although the
//! guest never stops by itself.

use hv_tests::emulator::RunOutcome;
use hv_tests::launch;
use hv_tests::{guests, Arch};

fn check(run: &RunOutcome, ok: bool, what: &str) {
    assert!(ok, "{}", run.failure(what));
}

fn own_guest_keeps_running_through_two_updates(arch: Arch, mem: &str) {
    let dir = guests::build_test_guests(arch).unwrap_or_else(|e| panic!("{e}"));
    // 30 s of ticks: far longer than the run, so only the launcher ends it.
    let guest = format!("{},mem={mem},cmdline=ticks=3000", dir.join("heartbeat.bin").display());
    let args: Vec<String> =
        ["--arch", arch.name(), "--guest", &guest, "--updates", "2", "--linger", "2", "--timeout", "150"]
            .map(String::from)
            .to_vec();
    let o = launch::options(&args).unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|| panic!("no options"));
    let p = launch::prepare(&o, &format!("test-launcher-own-guest-{}", arch.name())).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = p.guests.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["heartbeat", "updater"], "the user's guest and the updater, nothing else");
    let updater = &p.guests[1];
    assert!(updater.privileged && updater.mem_mib == guests::UPDATER_MEM_MIB, "the updater as in the demo");
    let run = launch::run(&p).unwrap_or_else(|e| panic!("{e}"));

    check(&run, run.stopped_after_updater && !run.timed_out, "the launcher ends the run after the updater");
    let verdict = launch::verdict(&p, &run);
    check(&run, verdict.is_ok(), &format!("verdict: {verdict:?}"));
    let done = run.hv("update-done");
    check(&run, done.len() == 2, "two updates");
    check(&run, done.last().and_then(|e| e.num("count")) == Some(2), "hv: update-done count=2");

    // The guest's own output goes on after the second update.
    let started = run.hv("guest-start");
    let id = started.iter().find(|e| e.get("name") == Some("heartbeat")).and_then(|e| e.num("id"));
    check(&run, id == Some(1), "the user's guest is partition 1");
    let lines: Vec<&str> = run.serial.lines().collect();
    let last_update = lines.iter().rposition(|l| l.starts_with("hv: update-done count=2"));
    let after: Vec<&&str> = last_update
        .map(|at| lines[at..].iter().filter(|l| l.starts_with("guest1: alive")).collect())
        .unwrap_or_default();
    check(&run, after.len() >= 3, "the guest keeps printing after the second update");
    let ticks: Vec<u64> = run.guest(1, "alive").iter().filter_map(|e| e.num("ticks")).collect();
    check(&run, ticks.windows(2).all(|w| w[0] < w[1]), "its ticks keep increasing across the updates");
    check(&run, run.hv("guest-stop").iter().all(|e| e.num("id") != Some(1)), "the guest never stopped");

    let summary = launch::summary(&p, &run);
    check(&run, summary.contains("guest1 heartbeat  stopped=running"), &format!("summary:\n{summary}"));
    check(&run, summary.contains("    | alive ticks="), &format!("summary shows the guest's last lines:\n{summary}"));
    check(&run, summary.contains("updater    stopped=shutdown updates ok=2/2"), &format!("summary:\n{summary}"));
}

#[test]
fn aarch64_own_guest_keeps_running_through_two_updates() {
    own_guest_keeps_running_through_two_updates(Arch::Aarch64, "32");
}

/// About 25 s under Bochs: only the heartbeat and the updater run.
#[test]
fn x86_64_own_guest_keeps_running_through_two_updates() {
    own_guest_keeps_running_through_two_updates(Arch::X86_64, "4");
}
