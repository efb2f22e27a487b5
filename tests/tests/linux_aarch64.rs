//! A stock Debian arm64 Linux kernel as a guest (`hv_tests::linux`): it
//! boots to userspace with two vCPUs on the virtual GICv3 and PL011,
//! runs its memory and clock check while the updater performs ten live
//! updates beside the test guests, and powers itself off; the check
//! passes and its largest clock gap matches the blackout the hypervisor
//! measured.

use std::time::Duration;

use hv_tests::emulator::{self, RunOutcome, RunSpec};
use hv_tests::guests::{self, UPDATER};
use hv_tests::image::{self, ImageSpec, UPDATE_B_VERSION};
use hv_tests::{linux, Arch, Machine};

fn check(run: &RunOutcome, ok: bool, what: &str) {
    assert!(ok, "{}", run.failure(what));
}

/// `key=value` of a `guest<id>: linux: <what> ...` line.
fn linux_value(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

#[test]
fn linux_boots_on_two_vcpus_and_keeps_running_through_ten_updates() {
    let a = image::build(&ImageSpec { arch: Arch::Aarch64, version: None, slot: 0 }).unwrap_or_else(|e| panic!("{e}"));
    let b = image::build(&ImageSpec { arch: Arch::Aarch64, version: Some(UPDATE_B_VERSION.into()), slot: 1 })
        .unwrap_or_else(|e| panic!("{e}"));
    let linux = linux::linux_guest(24).unwrap_or_else(|e| panic!("{e}"));
    let mut list = guests::demo_guests(Arch::Aarch64, &[b.bootable.clone(), a.bootable.clone()], 10)
        .unwrap_or_else(|e| panic!("{e}"));
    // Updates 1.5 s apart in the updater's time: most land while Linux
    // runs its check (it reaches userspace 2-8 s in, later on a busy host).
    for g in list.iter_mut().filter(|g| g.name == UPDATER) {
        g.cmdline = "updates=10 delay_ms=1500".into();
    }
    list.insert(0, linux);

    let mut spec = RunSpec::new("test-linux-updates", Machine::Qemu);
    spec.mem_mib = 1024;
    // About 40 s quiet; the timeout only guards against a hang.
    spec.timeout = Duration::from_secs(400);
    let dir = emulator::run_dir(&spec);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let placed = guests::place(&list, u64::from(spec.mem_mib), &dir).unwrap_or_else(|e| panic!("{e}"));
    spec.blobs = placed.blobs;
    spec.cmdline = Some(placed.cmdline);
    let run = emulator::run(&a, &spec).unwrap_or_else(|e| panic!("{e}"));

    check(&run, run.clean_shutdown(), "every guest stopped by itself and the machine powered off");
    let lines: Vec<&str> = run.serial.lines().collect();
    let userspace = lines.iter().find(|l| l.starts_with("guest1: linux: userspace"));
    check(&run, userspace.and_then(|l| linux_value(l, "cpus")) == Some(2), "Linux reached userspace with 2 CPUs");

    let done = run.hv("update-done");
    check(&run, done.len() == 10, "ten updates");
    let last_update = lines.iter().rposition(|l| l.starts_with("hv: update-done count=10"));
    let after: Vec<&&str> = last_update
        .map(|at| lines[at..].iter().filter(|l| l.starts_with("guest1: linux: memcheck pass=")).collect())
        .unwrap_or_default();
    check(&run, !after.is_empty(), "Linux's check goes on after the tenth update");
    let passes: Vec<&&str> = lines.iter().filter(|l| l.starts_with("guest1: linux: memcheck pass=")).collect();
    check(&run, passes.iter().all(|l| linux_value(l, "ok") == Some(1)), "every pass verified its memory");
    let verdict = lines.iter().find(|l| l.starts_with("guest1: linux: memcheck done"));
    check(&run, verdict.and_then(|l| linux_value(l, "ok")) == Some(1), "the check passed");
    check(&run, lines.iter().any(|l| l.starts_with("guest1: linux: check-exit status=0")), "and exited 0");

    // The largest gap Linux's CLOCK_MONOTONIC showed during its check is a
    // blackout the hypervisor measured: compare with the shortest update
    // that landed while the check ran (on a busy host Linux boots later in
    // guest time, and the updates may all land during its boot). The check
    // runs from its start line (printed after its first clock read): an
    // update between "userspace" and that line, while the program is
    // being started, is not in its measurement.
    let linux_gap = verdict.and_then(|l| linux_value(l, "max_gap_us")).unwrap_or(0);
    let check_lines = lines.iter().position(|l| l.starts_with("guest1: linux: memcheck start"));
    let check_end = lines.iter().position(|l| l.starts_with("guest1: linux: memcheck done"));
    check(&run, check_lines.is_some(), "linuxcheck printed its start line");
    let during: Vec<u64> = match (check_lines, check_end) {
        (Some(from), Some(to)) => lines[from..to]
            .iter()
            .filter(|l| l.starts_with("hv: update-done"))
            .filter_map(|l| linux_value(l, "blackout_us"))
            .collect(),
        _ => Vec::new(),
    };
    println!("BENCH name=linux_max_clock_gap value={linux_gap} unit=us");
    println!("BENCH name=linux_updates_during_check value={} unit=updates", during.len());
    if let Some(&shortest) = during.iter().min() {
        println!("BENCH name=hv_blackout_shortest_during_check value={shortest} unit=us");
        check(
            &run,
            linux_gap * 2 >= shortest,
            &format!("Linux saw a gap of {linux_gap} us; blackouts >= {shortest} us"),
        );
    }

    let stops = run.hv("guest-stop");
    let linux_stop = stops.iter().find(|e| e.num("id") == Some(1));
    check(&run, linux_stop.and_then(|e| e.get("reason")) == Some("system-off"), "Linux powered itself off");
    check(&run, run.hv("fault").is_empty(), "no guest faulted (the isolation probe takes an abort)");
}
