//! Partitions on aarch64: the default test guests run concurrently on both
//! physical CPUs under their own stage-2 tables, and every event they
//! print is checked.

use std::time::Duration;

use hv_tests::emulator::{self, RunOutcome, RunSpec};
use hv_tests::events::Event;
use hv_tests::guests::{self, GuestArg};
use hv_tests::image::{self, ImageSpec};
use hv_tests::{Arch, Machine};

fn run_guests(name: &str, list: &[GuestArg]) -> RunOutcome {
    let image =
        image::build(&ImageSpec { arch: Arch::Aarch64, version: None, slot: 0 }).unwrap_or_else(|e| panic!("{e}"));
    let mut spec = RunSpec::new(name, Machine::Qemu);
    spec.timeout = Duration::from_secs(90);
    let dir = emulator::run_dir(&spec);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let placed = guests::place(list, u64::from(spec.mem_mib), &dir).unwrap_or_else(|e| panic!("{e}"));
    spec.blobs = placed.blobs;
    spec.cmdline = Some(placed.cmdline);
    emulator::run(&image, &spec).unwrap_or_else(|e| panic!("{e}"))
}

fn check(run: &RunOutcome, ok: bool, what: &str) {
    assert!(ok, "{}", run.failure(what));
}

/// The partition id the hypervisor gave the guest named `name`.
fn id_of(run: &RunOutcome, name: &str) -> u32 {
    let started = run.hv("guest-start");
    let e = started.iter().find(|e| e.get("name") == Some(name));
    check(run, e.is_some(), &format!("no guest-start for {name}"));
    e.and_then(|e| e.num("id")).map_or(0, |id| id as u32)
}

fn last<'a>(events: &[&'a Event]) -> Option<&'a Event> {
    events.last().copied()
}

#[test]
fn default_guests_run_isolated_on_both_cpus() {
    let list = guests::default_guests(Arch::Aarch64).unwrap_or_else(|e| panic!("{e}"));
    let run = run_guests("test-aarch64-guests", &list);
    check(&run, run.clean_shutdown(), "no clean shutdown");
    let started = run.hv("guest-start");
    check(&run, started.len() == 5, "five guests should start");
    let cpus: std::collections::BTreeSet<_> = started.iter().filter_map(|e| e.num("cpu")).collect();
    check(&run, cpus.len() == 2, "guests should be spread over both physical CPUs");
    let roots: std::collections::BTreeSet<_> = started.iter().filter_map(|e| e.get("stage2_root")).collect();
    check(&run, roots.len() == 5, "each guest has its own stage-2 root");

    // The hypercall exerciser: every status as documented.
    let ex = id_of(&run, "exerciser");
    let checks = run.guest(ex, "hypercall");
    check(&run, checks.len() == 17, "17 hypercall checks");
    for c in &checks {
        check(&run, c.num("ok") == Some(1) && c.get("status") == c.get("expected"), &format!("check {c:?}"));
    }
    let verdict = last(&run.guest(ex, "exerciser"));
    check(&run, verdict.is_some_and(|e| e.num("ok") == Some(1) && e.num("failed") == Some(0)), "exerciser verdict");
    let info = last(&run.guest(ex, "info"));
    check(&run, info.is_some_and(|e| e.num("cpus") == Some(2) && e.get("version").is_some()), "info line");

    // memcheck over all of its RAM, every pass ok.
    let mc = id_of(&run, "memcheck");
    let passes = run.guest(mc, "memcheck");
    let pass_lines: Vec<_> = passes.iter().filter(|e| e.get("pass").is_some()).collect();
    check(&run, pass_lines.len() == 3, "three memcheck passes");
    check(&run, pass_lines.iter().all(|e| e.num("ok") == Some(1) && e.num("pages").unwrap_or(0) > 7000), "memcheck ok");

    // heartbeat: virtual timer ticks and self-SGIs all delivered.
    let hb = id_of(&run, "heartbeat");
    let done = last(&run.guest(hb, "heartbeat"));
    check(&run, done.is_some_and(|e| e.num("ticks") == Some(100)), "heartbeat reached 100 ticks");
    check(&run, done.is_some_and(|e| e.num("sgis_sent") == e.num("sgis_received")), "every SGI arrived");
    let ticks: Vec<u64> = run.guest(hb, "alive").iter().filter_map(|e| e.num("ticks")).collect();
    check(&run, ticks.windows(2).all(|w| w[0] < w[1]) && ticks.len() == 10, "alive ticks increase");

    // The isolation probe's access has nothing behind it: the guest takes a
    // synchronous external abort at the probe's address in its own EL1
    // handler (as on hardware), which reports it and shuts the guest down.
    // Nobody else is touched, and nothing is a hypervisor fault.
    let iso = id_of(&run, "isolation");
    check(&run, run.hv("fault").is_empty(), "no guest is stopped by the hypervisor");
    let injected = run.hv("inject");
    check(&run, injected.len() == 1, "one abort injected");
    check(
        &run,
        injected[0].get("kind") == Some("sea") && injected[0].num("guest") == Some(u64::from(iso)),
        "inject event",
    );
    check(&run, injected[0].num("addr") == Some(0x4500_0000), "abort address = RAM end + 64 MiB");
    let exception = last(&run.guest(iso, "exception"));
    // ESR_EL1: EC 0x25 (data abort, same EL), DFSC 0b010000 (external).
    check(
        &run,
        exception.is_some_and(|e| e.num("esr").is_some_and(|esr| esr >> 26 == 0x25 && esr & 0x3f == 0x10)),
        "data abort, external",
    );
    check(&run, exception.is_some_and(|e| e.num("far") == Some(0x4500_0000)), "FAR_EL1 = the probed address");
    check(&run, run.guest(iso, "probe").iter().all(|e| e.get("survived").is_none()), "probe must not survive");
    let stopped = run.hv("guest-stop");
    check(&run, stopped.iter().all(|e| e.get("reason") != Some("fault")), "no guest stopped by a fault");
    check(&run, stopped.len() == 5, "every guest stopped");

    // The blackout meter spins with interrupts masked; a guest sharing its
    // CPU still progresses (the hypervisor's timer preempts the spinner).
    let bo = id_of(&run, "blackout");
    let cpu_of = |id: u32| started.iter().find(|e| e.num("id") == Some(u64::from(id))).and_then(|e| e.num("cpu"));
    check(&run, cpu_of(bo) == cpu_of(hb), "blackout and heartbeat share a CPU in the default layout");
    let lines: Vec<&str> = run.serial.lines().collect();
    let pos = |pred: &dyn Fn(&str) -> bool| lines.iter().position(|l| pred(l));
    let first_bo = pos(&|l| l.starts_with(&format!("guest{bo}: blackout")));
    let final_bo = pos(&|l| l.starts_with(&format!("guest{bo}: blackout")) && l.contains("final=1"));
    let alive_between = match (first_bo, final_bo) {
        (Some(a), Some(b)) => lines[a..b].iter().filter(|l| l.starts_with(&format!("guest{hb}: alive"))).count(),
        _ => 0,
    };
    check(&run, alive_between > 0, "heartbeat ticks while the blackout meter spins on the same CPU");
    let gap = last(&run.guest(bo, "blackout")).and_then(|e| e.num("max_gap_us"));
    check(&run, gap.is_some_and(|g| g > 0), "blackout meter reports a gap");
}

#[test]
fn psci_on_a_two_vcpu_guest() {
    guests::build_test_guests(Arch::Aarch64).unwrap_or_else(|e| panic!("{e}"));
    let dir = hv_tests::out_dir().join("aarch64").join("guests");
    let smp = GuestArg::parse(&format!("{},vcpus=2", dir.join("smp.bin").display())).unwrap_or_else(|e| panic!("{e}"));
    let run = run_guests("test-aarch64-psci", &[smp]);
    check(&run, run.clean_shutdown(), "clean shutdown");
    let id = id_of(&run, "smp");
    let checks = run.guest(id, "psci");
    check(&run, checks.len() == 10, "ten PSCI checks");
    for c in &checks {
        check(&run, c.num("ok") == Some(1), &format!("psci check {c:?}"));
    }
    let secondary = run.guest(id, "smp").into_iter().find(|e| e.num("cpu") == Some(1));
    check(&run, secondary.is_some_and(|e| e.num("ok") == Some(1) && e.num("context") == Some(0x5a5a)), "vCPU 1 ran");
    let stop = run.hv("guest-stop");
    check(&run, stop.len() == 1 && stop[0].get("reason") == Some("system-off"), "PSCI SYSTEM_OFF stops the guest");
}

#[test]
fn psci_system_reset_restarts_the_guest() {
    guests::build_test_guests(Arch::Aarch64).unwrap_or_else(|e| panic!("{e}"));
    let dir = hv_tests::out_dir().join("aarch64").join("guests");
    let reset = GuestArg::parse(&dir.join("reset.bin").display().to_string()).unwrap_or_else(|e| panic!("{e}"));
    let run = run_guests("test-aarch64-reset", &[reset]);
    check(&run, run.clean_shutdown(), "clean shutdown");
    let id = id_of(&run, "reset");
    let steps: Vec<u64> = run.guest(id, "reset").iter().filter_map(|e| e.num("step")).collect();
    check(&run, steps == [1, 2], "step 1, reset, step 2");
    check(&run, run.guest(id, "reset").last().is_some_and(|e| e.num("ok") == Some(1)), "the mark survived the reset");
    check(&run, run.hv("guest-reset").len() == 1, "hv: guest-reset once");
}

/// Breakpoints and watchpoints are each guest's own: guest A arms them on
/// code and data guest B uses, on the same (only) physical CPU, and they
/// yield to each other; B sees its own reset values and takes no debug
/// exception, and A's registers are intact when it looks again.
#[test]
fn breakpoints_and_watchpoints_stay_with_their_guest() {
    let dir = guests::build_test_guests(Arch::Aarch64).unwrap_or_else(|e| panic!("{e}"));
    let guest = |name: &str, cmdline: &str| GuestArg {
        file: dir.join("debugpriv.bin"),
        name: name.into(),
        mem_mib: 16,
        vcpus: 1,
        privileged: false,
        initrd: None,
        devices: Vec::new(),
        cmdline: cmdline.into(),
    };
    let list = [guest("armer", "arm=1 passes=300"), guest("prober", "passes=300")];
    let image =
        image::build(&ImageSpec { arch: Arch::Aarch64, version: None, slot: 0 }).unwrap_or_else(|e| panic!("{e}"));
    let mut spec = RunSpec::new("test-aarch64-debug-privacy", Machine::Qemu);
    spec.cpus = 1;
    spec.timeout = Duration::from_secs(90);
    let dir = emulator::run_dir(&spec);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let placed = guests::place(&list, u64::from(spec.mem_mib), &dir).unwrap_or_else(|e| panic!("{e}"));
    spec.blobs = placed.blobs;
    spec.cmdline = Some(placed.cmdline);
    let run = emulator::run(&image, &spec).unwrap_or_else(|e| panic!("{e}"));
    check(&run, run.clean_shutdown(), "both guests finished");
    let (a, b) = (id_of(&run, "armer"), id_of(&run, "prober"));
    check(&run, run.guest(b, "exception").is_empty(), "the prober took no debug exception of the armer's");
    let probe = last(&run.guest(b, "debugpriv"));
    check(&run, probe.is_some_and(|e| e.num("foreign") == Some(0)), "the prober saw its own reset values");
    check(&run, probe.is_some_and(|e| e.num("rounds") == Some(300)), "the prober ran every round");
    let arm = last(&run.guest(a, "debugpriv"));
    check(&run, arm.is_some_and(|e| e.num("kept") == Some(1)), "the armer's registers were kept");
    check(&run, run.hv("fault").is_empty(), "no fault");
}

/// The EL1 physical timer is emulated per vCPU: a guest that programs
/// CNTP_TVAL_EL0 for a 1 ms period and enables PPI 30 takes every tick it
/// asked for through the virtual GIC, no faster than the period; before it
/// enables the timer, ISTATUS reads 0.
#[test]
fn the_el1_physical_timer_ticks_through_the_virtual_gic() {
    let dir = guests::build_test_guests(Arch::Aarch64).unwrap_or_else(|e| panic!("{e}"));
    let guest = GuestArg {
        file: dir.join("ptimer.bin"),
        name: "ptimer".into(),
        mem_mib: 16,
        vcpus: 1,
        privileged: false,
        initrd: None,
        devices: Vec::new(),
        cmdline: "ticks=40".into(),
    };
    let run = run_guests("test-aarch64-physical-timer", std::slice::from_ref(&guest));
    check(&run, run.clean_shutdown(), "the guest finished");
    let id = id_of(&run, "ptimer");
    let line = last(&run.guest(id, "ptimer"));
    check(&run, line.is_some_and(|e| e.num("ticks") == Some(40)), "every tick taken");
    check(&run, line.is_some_and(|e| e.num("elapsed_us").is_some_and(|us| us >= 40_000)), "no faster than 1 ms each");
    check(&run, line.is_some_and(|e| e.num("istatus_before") == Some(0)), "ISTATUS needs ENABLE");
    check(&run, run.hv("fault").is_empty(), "no fault");
}

/// The idle loop of an operating system masks interrupts, checks for
/// work and executes WFI. A tick that comes in between is injected while
/// PSTATE.I masks it, and the WFI must end for it (a WFI with a virtual
/// interrupt pending does not even trap: HCR_EL2.TWI traps only one that
/// would wait); the hypervisor keeps the timer masked until the guest has
/// taken the tick. Each wait here spins 1.5 ticks with IRQs masked.
#[test]
fn a_wfi_with_interrupts_masked_ends_for_the_interrupt_that_came_meanwhile() {
    let dir = guests::build_test_guests(Arch::Aarch64).unwrap_or_else(|e| panic!("{e}"));
    let guest = GuestArg {
        file: dir.join("heartbeat.bin"),
        name: "heartbeat".into(),
        mem_mib: 16,
        vcpus: 1,
        privileged: false,
        initrd: None,
        devices: Vec::new(),
        cmdline: "ticks=40 masked_wfi=1".into(),
    };
    let run = run_guests("test-aarch64-masked-wfi", std::slice::from_ref(&guest));
    check(&run, run.clean_shutdown(), "the guest finished: no WFI slept through a pending interrupt");
    let id = id_of(&run, "heartbeat");
    let done = last(&run.guest(id, "heartbeat"));
    check(&run, done.is_some_and(|e| e.num("ticks") == Some(40)), "every tick taken");
    check(&run, done.is_some_and(|e| e.num("sgis_received") == e.num("sgis_sent")), "every self-SGI taken");
    check(&run, run.hv("fault").is_empty(), "no fault");
}

/// A hostile guest (random hypercalls, live-update requests of random
/// bytes, system registers, SYS operations, HVC/SMC, undefined
/// instructions, MMIO to the virtual GIC and PL011 and to nothing) beside
/// the heartbeat and memcheck on one CPU each: the hypervisor never
/// stops it, and the others keep their ticks and memory.
#[test]
fn a_hostile_guest_harms_only_itself() {
    const OPS: u64 = 20_000;
    let seed = hv_tests::hostile::seed(0x15_0002);
    let mut list = guests::default_guests(Arch::Aarch64).unwrap_or_else(|e| panic!("{e}"));
    list.retain(|g| g.name == "heartbeat" || g.name == "memcheck");
    // Long enough to run all through the attacks (about 2 s of guest time).
    for g in &mut list {
        g.cmdline = if g.name == "memcheck" { "passes=8".into() } else { "ticks=400".into() };
    }
    list.push(hv_tests::hostile::guest(Arch::Aarch64, seed, OPS, true).unwrap_or_else(|e| panic!("{e}")));
    let run = run_guests("test-aarch64-hostile", &list);
    check(&run, run.clean_shutdown(), "clean shutdown");
    if let Err(why) = hv_tests::hostile::verdict(&run, seed, OPS) {
        check(&run, false, &why);
    }
    let hb = id_of(&run, "heartbeat");
    let verdict = last(&run.guest(hb, "heartbeat"));
    check(&run, verdict.is_some_and(|e| e.num("done") == Some(1)), "the heartbeat finished");
    check(&run, verdict.is_some_and(|e| e.num("sgis_sent") == e.num("sgis_received")), "no SGI lost");
    let mc = id_of(&run, "memcheck");
    let done = last(&run.guest(mc, "memcheck")).filter(|e| e.num("done") == Some(1));
    check(&run, done.is_some_and(|e| e.num("failed") == Some(0)), "memcheck clean");
}
