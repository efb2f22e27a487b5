//! Live update on x86_64, under VT-x in Bochs and under AMD SVM in QEMU
//! TCG (2 CPUs; every test on both, `bochs::` and `svm::`): successive
//! updates A -> B -> A ... with the guests resident (same EPT or NPT
//! roots; VMCSs rebuilt from the vCPU records, VMCBs adopted in place; the
//! second CPU parked in the old image and released by the new one); a two-vCPU guest's second vCPU waiting for its SIPI,
//! running and halted across updates; bad images refused with the guests
//! untouched; a failing freeze participant cancels the update with the
//! guests intact.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use hv_tests::emulator::{self, RunOutcome, RunSpec};
use hv_tests::guests::{self, GuestArg};
use hv_tests::image::{self, BuiltImage, ImageSpec, UPDATE_B_VERSION};
use hv_tests::{Arch, Machine};
use loader::image_desc;

/// One emulator at a time: the machine has two cores, and Bochs's RFB
/// display listens on a fixed port.
static EMULATOR: Mutex<()> = Mutex::new(());

/// The boot image (no version given: slot 0) or an update image (linked
/// for slot 1, so an update from the boot image is staged there).
fn build(version: Option<&str>) -> BuiltImage {
    let slot = u8::from(version.is_some());
    image::build(&ImageSpec { arch: Arch::X86_64, version: version.map(String::from), slot })
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs the guests in `machine`: Bochs (VT-x) or QEMU TCG (AMD SVM).
fn run(machine: Machine, name: &str, image: &BuiltImage, list: &[GuestArg], mem_mib: u32) -> RunOutcome {
    let name = if machine == Machine::Qemu { format!("{name}-svm") } else { name.to_string() };
    let mut spec = RunSpec::new(&name, machine);
    // QEMU's q35: a VT-d unit (in the ACPI DMAR) and edu, for `device=`.
    spec.devices = machine == Machine::Qemu;
    spec.cpus = 2;
    spec.mem_mib = mem_mib;
    // Safety net only, over 3x the longest quiet run: the ten-update test
    // took 330 s under Bochs on an idle 2-core machine (the others 15-75 s).
    spec.timeout = Duration::from_mins(20);
    let modules = guests::grub_modules(list).unwrap_or_else(|e| panic!("{e}"));
    let iso = image::iso_with_modules(image, &modules, &emulator::run_dir(&spec)).unwrap_or_else(|e| panic!("{e}"));
    let _one = EMULATOR.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    emulator::run(&iso, &spec).unwrap_or_else(|e| panic!("{e}"))
}

fn check(run: &RunOutcome, ok: bool, what: &str) {
    assert!(ok, "{}", run.failure(what));
}

/// Index of the first serial line satisfying `pred` after line `from`.
fn line_after(run: &RunOutcome, from: usize, pred: impl Fn(&str) -> bool) -> Option<usize> {
    run.serial.lines().enumerate().skip(from).find(|(_, l)| pred(l)).map(|(i, _)| i)
}

fn id_of(run: &RunOutcome, name: &str) -> u32 {
    let e = run.hv("guest-start").into_iter().find(|e| e.get("name") == Some(name));
    check(run, e.is_some(), &format!("no guest-start for {name}"));
    e.and_then(|e| e.num("id")).map_or(0, |id| id as u32)
}

/// heartbeat and memcheck, long enough to outlive the updater, and the
/// updater carrying `images` in 32 MiB of RAM.
fn guests_with_updater(images: &[PathBuf], cmdline: &str) -> Vec<GuestArg> {
    guests_with_updater_in(images, cmdline, 32)
}

fn guests_with_updater_in(images: &[PathBuf], cmdline: &str, updater_mib: u64) -> Vec<GuestArg> {
    guests::build_test_guests(Arch::X86_64).unwrap_or_else(|e| panic!("{e}"));
    let mut list = guests::default_guests(Arch::X86_64).unwrap_or_else(|e| panic!("{e}"));
    list.retain(|g| g.name == "memcheck" || g.name == "heartbeat");
    for g in &mut list {
        g.cmdline = if g.name == "memcheck" { "passes=6".into() } else { "ticks=150".into() };
    }
    list.push(guests::updater_guest(Arch::X86_64, images, updater_mib, cmdline).unwrap_or_else(|e| panic!("{e}")));
    list
}

fn memcheck_ok(run: &RunOutcome) {
    let mc = id_of(run, "memcheck");
    let passes: Vec<_> = run.guest(mc, "memcheck").into_iter().filter(|e| e.get("pass").is_some()).collect();
    check(run, !passes.is_empty() && passes.iter().all(|e| e.num("ok") == Some(1)), "memcheck unaffected");
    let hb = id_of(run, "heartbeat");
    let ticks: Vec<u64> = run.guest(hb, "alive").iter().filter_map(|e| e.num("ticks")).collect();
    check(run, !ticks.is_empty() && ticks.windows(2).all(|w| w[0] < w[1]), "heartbeat ticks increase");
}

/// How many updates one Bochs run performs.
const UPDATES: usize = 10;

fn ten_updates_alternate_and_guests_stay_resident(machine: Machine) {
    let a = build(None);
    let b = build(Some(UPDATE_B_VERSION));
    let list = guests::demo_guests(Arch::X86_64, &[b.update_image(), a.update_image()], UPDATES as u32)
        .unwrap_or_else(|e| panic!("{e}"));
    let run = run(machine, "test-x86_64-update-ten", &a, &list, 128);
    check(&run, run.clean_shutdown(), "clean shutdown after the updates");
    check(&run, run.hv("boot").len() == 1, "hv: boot printed once per run");

    let done = run.hv("update-done");
    check(&run, done.len() == UPDATES, "every update done");
    for (k, e) in done.iter().enumerate() {
        let want = if k % 2 == 0 { UPDATE_B_VERSION } else { hypervisor::VERSION };
        check(&run, e.num("count") == Some(k as u64 + 1), "update counts 1..=N");
        check(&run, e.get("version") == Some(want), "versions alternate A -> B -> A");
        for key in ["blackout_us", "handover_bytes", "preserved_pages"] {
            check(&run, e.num(key).is_some_and(|v| v > 0), &format!("update-done {key}"));
        }
    }
    check(&run, run.hv("update-phases").len() == UPDATES, "phases of every update");

    // Same EPT roots before and after every update.
    let started = run.hv("guest-start");
    let adopted = run.hv("guest-adopted");
    check(&run, adopted.len() == started.len() * UPDATES, "every partition adopted by every image");
    for e in &adopted {
        let before = started.iter().find(|s| s.num("id") == e.num("id")).and_then(|s| s.get("stage2_root"));
        check(&run, before.is_some() && before == e.get("stage2_root"), "EPT root unchanged");
    }
    let restores = run.hv("update-restore");
    check(&run, restores.len() == UPDATES, "a restore per update");
    check(&run, restores.iter().all(|e| e.num("preserved_overlap") == Some(0)), "no preserved page in any allocator");
    check(&run, run.hv("cpu-online").len() == UPDATES + 1, "the second CPU comes back after every update");

    let upd = id_of(&run, "updater");
    let reports: Vec<_> = run.guest(upd, "updater").into_iter().filter(|e| e.get("update").is_some()).collect();
    check(&run, reports.len() == UPDATES, "an updater report per update");
    for (k, r) in reports.iter().enumerate() {
        check(&run, r.num("ok") == Some(1) && r.num("update_count") == Some(k as u64 + 1), "updater report");
        check(&run, r.get("to") == done[k].get("version"), "guest reads the new version");
    }

    let hb = id_of(&run, "heartbeat");
    let ticks: Vec<u64> = run.guest(hb, "alive").iter().filter_map(|e| e.num("ticks")).collect();
    check(&run, ticks.windows(2).all(|w| w[0] < w[1]), "alive ticks strictly increase across updates");
    // The ticks are APIC timer interrupts: the timer's mode and deadline
    // and the pending and in-service vectors cross every update (the
    // `lapic` record), so it keeps ticking after the last one, and every
    // self-IPI sent arrives.
    let beat = run.guest(hb, "heartbeat").last().copied();
    check(&run, beat.is_some_and(|e| e.num("done") == Some(1)), "heartbeat finished");
    check(&run, beat.is_some_and(|e| e.num("sgis_sent") == e.num("ticks")), "one self-IPI per tick");
    check(&run, beat.is_some_and(|e| e.num("sgis_sent") == e.num("sgis_received")), "every self-IPI arrived");
    let last_done = run.serial.lines().enumerate().filter(|(_, l)| l.starts_with("hv: update-done")).last();
    let alive_after = last_done.and_then(|(i, _)| line_after(&run, i, |l| l.starts_with(&format!("guest{hb}: alive"))));
    check(&run, alive_after.is_some(), "heartbeat ticks after the last update");
    let mc = id_of(&run, "memcheck");
    let mc_lines: Vec<_> = run.guest(mc, "memcheck").into_iter().filter(|e| e.get("pass").is_some()).collect();
    check(&run, mc_lines.iter().all(|e| e.num("ok") == Some(1)), "every memcheck pass ok");
    let lines: Vec<&str> = run.serial.lines().collect();
    for k in 0..UPDATES - 1 {
        let at = lines.iter().enumerate().filter(|(_, l)| l.starts_with("hv: update-done")).nth(k).map(|(i, _)| i);
        let next = at.and_then(|i| line_after(&run, i, |l| l.starts_with(&format!("guest{mc}: memcheck ok=1"))));
        check(&run, next.is_some(), &format!("memcheck ok=1 after update {}", k + 1));
    }

    // The guests' blackout meter saw the pauses the hypervisor measured.
    // Under Bochs it reports only gaps of two time slices or more, and the
    // blackouts are shorter than that now (about 17 ms here): a blackout it
    // reports must match the hypervisor's, one under the threshold may go
    // unreported (the meter then ran just before and just after it), and
    // it must have seen at least one.
    let rows = hv_tests::summary::updates(&run.events);
    let bo = id_of(&run, "blackout");
    let mut seen_any = false;
    for r in &rows {
        let seen = r.guest_gap_us.get(&bo).copied().unwrap_or(0);
        seen_any |= seen > 0;
        let may_miss = seen == 0 && r.blackout_us < hv_tests::guests::X86_GAP_REPORT_US;
        check(&run, may_miss || seen * 2 >= r.blackout_us, &format!("guest-seen blackout for update {}", r.count));
    }
    check(&run, seen_any, "the blackout meter saw at least one update's pause");
    check(&run, run.hv("fault").is_empty(), "no guest faults (the isolation probe reads all ones)");

    // Staged updates: every image was put in the other slot before the
    // freeze (the trampoline copied nothing), and the old image was
    // intact after the guests resumed; the slots alternate.
    check(&run, run.hv("update-begin").iter().all(|e| e.get("image") == Some("slot")), "every image staged");
    check(&run, done.iter().all(|e| e.num("staged") == Some(1)), "update-done staged=1");
    check(&run, done.iter().all(|e| e.get("state") == Some("table")), "update-done state=table");
    // Direct CPU handover: the second CPU waited in the old image's
    // mailbox and was released into the new image; no CPU went through
    // INIT-SIPI-SIPI during an update.
    check(&run, run.hv("update-begin").iter().all(|e| e.get("cpus") == Some("parked")), "every update parks the CPUs");
    for e in &done {
        check(&run, e.num("parked_cpus") == Some(1), "the second CPU was released from the mailbox");
        check(&run, e.num("cpu_restarts") == Some(0), "no INIT-SIPI-SIPI by the new image");
    }
    check(&run, run.hv("ap-start-failed").is_empty(), "every CPU came back");
    let old = run.hv("old-image");
    check(&run, old.len() == UPDATES && old.iter().all(|e| e.num("intact") == Some(1)), "old image intact");
    let bases: Vec<u64> = old.iter().filter_map(|e| e.num("base")).collect();
    let slots = hypervisor::slots::X86_64.bases;
    check(&run, bases.iter().enumerate().all(|(k, &b)| b == slots[k % 2]), &format!("slots alternate: {bases:x?}"));
}

/// No console byte lost across updates: two guests each write one long
/// line two bytes per hypercall, 10 ms of guest time apart, spread over
/// the updates and ended after the last. Each line comes out once, whole
/// and in order, as one `guest<N>:` line after the last update.
fn a_console_line_written_across_updates_comes_out_whole(machine: Machine) {
    const LINE_UPDATES: u32 = 10;
    let a = build(None);
    let b = build(Some(UPDATE_B_VERSION));
    let names = ["longline-a", "longline-b"];
    let mut list: Vec<GuestArg> = names
        .iter()
        .map(|n| guests::longline_guest(Arch::X86_64, n, LINE_UPDATES).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let updater = guests::updater_guest(
        Arch::X86_64,
        &[b.update_image(), a.update_image()],
        32,
        &guests::updater_cmdline(LINE_UPDATES),
    );
    list.push(updater.unwrap_or_else(|e| panic!("{e}")));
    // About 15 s under Bochs (with only these three light guests an update
    // takes ~1.5 s); the timeout is only a safety net.
    let run = run(machine, "test-x86_64-update-console-line", &a, &list, 192);
    check(&run, run.clean_shutdown(), "clean shutdown: every guest ended by itself");
    check(&run, run.hv("update-done").len() == LINE_UPDATES as usize, "every update done");

    assert!(
        guests::longline_text(LINE_UPDATES).len() < hypervisor::guest_console::LINE_MAX,
        "the line is printed whole, not split"
    );
    for name in names {
        let id = id_of(&run, name);
        let verdict = guests::check_longline(&run, id, LINE_UPDATES);
        check(&run, verdict.is_ok(), &format!("{name}: {}", verdict.err().unwrap_or_default()));
    }
}

/// A two-vCPU guest across live updates (the smp guest with `updates=3`):
/// vCPU 1 waits for its SIPI across the first update (its place in the
/// INIT-SIPI protocol crosses in the `lapic` record) and INIT-SIPI-SIPI
/// then starts it on the other physical CPU; it runs across the second
/// (its guest state crosses in its vCPU record); it is halted across the
/// third, and INIT then SIPI start it again.
fn a_second_vcpu_waits_runs_and_restarts_across_updates(machine: Machine) {
    const SMP_UPDATES: u32 = 4;
    let a = build(None);
    let b = build(Some(UPDATE_B_VERSION));
    let dir = guests::build_test_guests(Arch::X86_64).unwrap_or_else(|e| panic!("{e}"));
    let spec = format!("{},vcpus=2,mem=4,cmdline=\"updates=3\"", dir.join("smp.bin").display());
    let smp = GuestArg::parse(&spec).unwrap_or_else(|e| panic!("{e}"));
    let updater = guests::updater_guest(
        Arch::X86_64,
        &[b.update_image(), a.update_image()],
        32,
        &guests::updater_cmdline(SMP_UPDATES),
    );
    let list = [smp, updater.unwrap_or_else(|e| panic!("{e}"))];
    let run = run(machine, "test-x86_64-update-smp", &a, &list, 192);
    check(&run, run.clean_shutdown(), "clean shutdown: both guests ended by themselves");
    let done = run.hv("update-done");
    check(&run, done.len() == SMP_UPDATES as usize, "every update done");

    let id = id_of(&run, "smp");
    let checks = run.guest(id, "sipi");
    check(&run, checks.len() == 7, "seven checks across updates");
    for c in &checks {
        check(&run, c.num("ok") == Some(1), &format!("sipi check {c:?}"));
    }
    let lines = run.guest(id, "smp");
    let verdict = lines.iter().find(|e| e.get("checks").is_some());
    check(&run, verdict.is_some_and(|e| e.num("ok") == Some(1)), "smp verdict");
    let secondary: Vec<_> = lines.iter().filter(|e| e.num("cpu") == Some(1)).collect();
    check(&run, secondary.len() == 2 && secondary.iter().all(|e| e.num("ok") == Some(1)), "vCPU 1 ran twice");

    // vCPU 1 started after the first update and again after the third,
    // each time on the CPU that is not vCPU 0's.
    let serial: Vec<&str> = run.serial.lines().collect();
    let at = |prefix: &str| -> Vec<usize> {
        serial.iter().enumerate().filter(|(_, l)| l.starts_with(prefix)).map(|(i, _)| i).collect()
    };
    let done_at = at("hv: update-done");
    let starts = at(&format!("hv: vcpu-start guest={id} vcpu=1 "));
    check(&run, starts.len() == 2, "two vcpu-start events");
    let ordered =
        matches!((&starts[..], &done_at[..]), ([first, second], [u1, _, u3, ..]) if u1 < first && u3 < second);
    check(&run, ordered, "vCPU 1 started after the first update, and again after the third");
    let bsp_cpu = run.hv("guest-start").iter().find(|e| e.num("id") == Some(u64::from(id))).and_then(|e| e.num("cpu"));
    let cpus: Vec<_> = run.hv("vcpu-start").iter().filter_map(|e| e.num("cpu")).collect();
    check(&run, bsp_cpu.is_some() && cpus.iter().all(|&c| Some(c) != bsp_cpu), "vCPU 1 on the other CPU");
    let adopted = run.hv("guest-adopted").into_iter().filter(|e| e.num("id") == Some(u64::from(id))).count();
    check(&run, adopted >= 3, "the smp guest was adopted by every image while it ran");
    check(&run, run.hv("fault").is_empty(), "no fault");
}

fn bad_images_are_refused_and_guests_continue(machine: Machine) {
    let a = build(None);
    let good = std::fs::read(a.update_image()).unwrap_or_else(|e| panic!("{e}"));
    let dir = hv_tests::out_dir().join("bad-images-x86_64");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("{e}"));
        p
    };
    let truncated = write("truncated.elf", &good[..good.len() / 2]);
    let arm =
        image::build(&ImageSpec { arch: Arch::Aarch64, version: None, slot: 0 }).unwrap_or_else(|e| panic!("{e}"));
    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x5a;
    let corrupt = write("corrupt.elf", &corrupt);
    let mut bad_abi = good.clone();
    let d = image_desc::find(&bad_abi).unwrap_or_else(|e| panic!("{e}"));
    bad_abi[d.offset + 16..d.offset + 24].copy_from_slice(&[2, 0, 0, 0, 2, 0, 0, 0]);
    image_desc::seal(&mut bad_abi).unwrap_or_else(|e| panic!("{e}"));
    let bad_abi = write("abi2.elf", &bad_abi);
    let mut huge = good.clone();
    huge.resize(33 << 20, 0);
    image_desc::seal(&mut huge).unwrap_or_else(|e| panic!("{e}"));
    let huge = write("huge.elf", &huge);
    let garbage = write("garbage.elf", &vec![0x41u8; 8192]);
    let mut no_entry = good.clone();
    no_entry[d.offset + 36..d.offset + 40].copy_from_slice(&[0; 4]);
    image_desc::seal(&mut no_entry).unwrap_or_else(|e| panic!("{e}"));
    let no_entry = write("no-entry.elf", &no_entry);

    let cases = [
        (truncated, "size-mismatch"),
        (arm.bootable.clone(), "wrong-arch"),
        (corrupt, "bad-checksum"),
        (bad_abi, "incompatible-abi"),
        (huge, "too-large"),
        (garbage, "no-descriptor"),
        (no_entry, "no-handover-entry"),
    ];
    let images: Vec<PathBuf> = cases.iter().map(|(p, _)| p.clone()).collect();
    let cmd = format!("updates={} delay_ms=50 expect_status=5", images.len());
    // The image too large for the 32 MiB scratch needs a larger updater.
    let list = guests_with_updater_in(&images, &cmd, 64);
    let run = run(machine, "test-x86_64-update-refused", &a, &list, 256);
    check(&run, run.clean_shutdown(), "clean shutdown");
    let refused = run.hv("update-refused");
    let reasons: Vec<&str> = refused.iter().filter_map(|e| e.get("reason")).collect();
    let want: Vec<&str> = cases.iter().map(|(_, r)| *r).collect();
    check(&run, reasons == want, &format!("refusal reasons {reasons:?} != {want:?}"));
    check(&run, run.hv("update-begin").is_empty() && run.hv("update-cancelled").is_empty(), "nothing started");
    let upd = id_of(&run, "updater");
    let verdict = run.guest(upd, "updater").into_iter().find(|e| e.get("done").is_some());
    check(&run, verdict.is_some_and(|e| e.num("ok") == Some(1)), "every refusal returned INVALID_PARAMETER");
    memcheck_ok(&run);
}

fn a_failing_freeze_cancels_and_the_next_update_succeeds(machine: Machine) {
    let a = build(None);
    let b = build(Some(UPDATE_B_VERSION));
    let list = guests_with_updater(&[b.update_image()], "updates=1 delay_ms=200 fail_freeze=1");
    let run = run(machine, "test-x86_64-update-cancel", &a, &list, 192);
    check(&run, run.clean_shutdown(), "clean shutdown");
    check(&run, run.hv("boot").len() == 1, "hv: boot once");
    let cancelled = run.hv("update-cancelled");
    let reasons: Vec<&str> = cancelled.iter().filter_map(|e| e.get("reason")).collect();
    check(&run, reasons == ["injected-freeze-failure"], &format!("cancel reasons {reasons:?}"));
    let done = run.hv("update-done");
    check(&run, done.len() == 1 && done[0].get("version") == Some(UPDATE_B_VERSION), "then one update to B");
    let upd = id_of(&run, "updater");
    let lines = run.guest(upd, "updater");
    check(&run, lines.iter().any(|e| e.num("cancel_check") == Some(1) && e.num("ok") == Some(1)), "status 8");
    check(&run, lines.iter().any(|e| e.get("done").is_some() && e.num("ok") == Some(1)), "updater verdict");
    memcheck_ok(&run);
    check(&run, run.hv("fault").is_empty(), "no guest faulted");
}

/// Rollback on x86_64 (issue 15 item 4, `kho/ABI.md` §5.2): broken builds
/// staged in the other slot fail after the kexec and before the guests
/// resume: one refuses the handover's version, one panics in its restore,
/// one fails after adopting the machine, one hangs there (a parked AP
/// sends the BSP an NMI at the deadline). Each time the old image, intact
/// in its slot, takes the machine back on the BSP (VMX on again, the
/// parked AP rejoining): the update is reported rolled back, the updater
/// gets OPERATION_DENIED with the version and update count unchanged, the
/// guests run on, and the good update after each one goes through.
fn a_new_image_that_fails_before_the_guests_resume_gives_the_machine_back(machine: Machine) {
    let a = build(None);
    let b = build(Some(UPDATE_B_VERSION));
    let broken: Vec<BuiltImage> =
        (0..2).map(|slot| image::break_build(Arch::X86_64, slot).unwrap_or_else(|e| panic!("{e}"))).collect();
    let mode = |slot: usize, how: &str| image::with_break_mode(&broken[slot], how).unwrap_or_else(|e| panic!("{e}"));
    // A (slot 0) -> refuse (slot 1) back -> B (slot 1) -> panic (slot 0)
    // back -> A (slot 0) -> fail (slot 1) back -> B -> hang (slot 0),
    // back at the deadline (a parked AP's NMI) -> A.
    let images = [
        mode(1, "refuse-handover"),
        b.update_image(),
        mode(0, "panic"),
        a.update_image(),
        mode(1, "fail"),
        b.update_image(),
        mode(0, "hang"),
        a.update_image(),
    ];
    let list = guests_with_updater(&images, "updates=8 delay_ms=200 rollbacks=1");
    let run = run(machine, "test-x86_64-rollback", &a, &list, 192);
    check(&run, run.clean_shutdown(), "clean shutdown");
    let rolled: Vec<&str> = run.hv("update-rolled-back").iter().filter_map(|e| e.get("reason")).collect();
    let want = ["handover-refused", "panic", "restore-failed", "deadline"];
    check(&run, rolled == want, &format!("four rollbacks: {rolled:?}"));
    let gave = run.hv("restore-failed");
    check(&run, gave.len() == 4 && gave.iter().all(|e| e.num("give_back") == Some(1)), "each new image gave back");
    let versions: Vec<&str> = run.hv("update-done").iter().filter_map(|e| e.get("version")).collect();
    let good = [UPDATE_B_VERSION, hypervisor::VERSION, UPDATE_B_VERSION, hypervisor::VERSION];
    check(&run, versions == good, &format!("the good updates went through: {versions:?}"));
    let upd = id_of(&run, "updater");
    let reports: Vec<_> = run.guest(upd, "updater").into_iter().filter(|e| e.get("update").is_some()).collect();
    check(&run, reports.len() == 8 && reports.iter().all(|e| e.num("ok") == Some(1)), "every update as expected");
    let back: Vec<u64> = reports.iter().filter_map(|e| e.num("rolled_back")).collect();
    check(&run, back == [1, 0, 1, 0, 1, 0, 1, 0], "every other update rolled back");
    memcheck_ok(&run);
    check(&run, run.hv("fault").is_empty(), "no guest faulted");
}

/// Live updates while a hostile guest attacks (`testguests::hostile`,
/// unprivileged: its live-update requests are refused, the updater's go
/// through): its MSR, port, MMIO and VMX-instruction exits arrive between
/// and around the freezes, every update is done, memcheck and the
/// heartbeat are untouched, and the hypervisor never stops the attacker.
fn live_updates_go_through_while_a_hostile_guest_attacks(machine: Machine) {
    const OPS: u64 = 8_000;
    let seed = hv_tests::hostile::seed(0x15_0006);
    let a = build(None);
    let b = build(Some(UPDATE_B_VERSION));
    let mut list = guests_with_updater(&[b.update_image(), a.update_image()], "updates=3 delay_ms=100");
    list.push(hv_tests::hostile::guest(Arch::X86_64, seed, OPS, false).unwrap_or_else(|e| panic!("{e}")));
    let run = run(machine, "test-x86_64-update-hostile", &a, &list, 192);
    check(&run, run.clean_shutdown(), "clean shutdown");
    if let Err(why) = hv_tests::hostile::verdict(&run, seed, OPS) {
        check(&run, false, &why);
    }
    check(&run, run.hv("update-done").len() == 3, "three updates");
    let attacker = id_of(&run, "hostile");
    let lines: Vec<&str> = run.serial.lines().collect();
    let start = lines.iter().position(|l| l.starts_with(&format!("guest{attacker}: hostile start=1")));
    let end = lines.iter().position(|l| l.starts_with(&format!("guest{attacker}: hostile done=1")));
    let during = match (start, end) {
        (Some(from), Some(to)) => lines[from..to].iter().filter(|l| l.starts_with("hv: update-done")).count(),
        _ => 0,
    };
    check(&run, during > 0, "an update landed while the attacks ran");
    let upd = id_of(&run, "updater");
    let verdict = run.guest(upd, "updater").into_iter().find(|e| e.num("done") == Some(1));
    check(&run, verdict.is_some_and(|e| e.num("ok") == Some(1)), "the updater saw every update succeed");
    memcheck_ok(&run);
}

/// Issue 15 item 5 on x86_64: a guest fault while an update is staged.
/// The images are test builds in the `slow` mode (400 ms more of
/// brownout, `HV_TEST_BREAK_RESTORE`); an isolation guest on CPU 1 waits
/// until an update is being staged (GET_UPDATE_PHASE) and does string
/// I/O, which the hypervisor stops it for. The update goes through, the
/// stopped guest stays stopped in every later image, and the others run
/// on untouched.
fn a_guest_fault_while_an_update_is_staged_stops_only_that_guest(machine: Machine) {
    let slow: Vec<BuiltImage> = (0..2)
        .map(|slot| image::break_build(Arch::X86_64, slot).and_then(|b| image::break_mode_image(&b, "slow")))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e}"));
    let images = [slow[1].update_image(), slow[0].update_image()];
    // heartbeat, memcheck, updater, then the faulter: vCPU n runs on CPU
    // n mod 2, so the faulter is on CPU 1, the updater on CPU 0.
    let mut list = guests_with_updater(&images, "updates=2 delay_ms=100");
    let dir = guests::build_test_guests(Arch::X86_64).unwrap_or_else(|e| panic!("{e}"));
    let spec = format!("{},mem=4,cmdline=\"at_staging=1\"", dir.join("isolation.bin").display());
    list.push(GuestArg::parse(&spec).unwrap_or_else(|e| panic!("{e}")));
    let run = run(machine, "test-x86_64-update-fault", &slow[0], &list, 192);
    check(&run, run.clean_shutdown(), "clean shutdown");
    check(&run, run.hv("update-done").len() == 2, "both updates done");
    let f = id_of(&run, "isolation");
    let probe = run.guest(f, "probe");
    check(&run, probe.iter().any(|e| e.num("staging") == Some(1)), "the faulter saw an update being staged");
    check(&run, !probe.iter().any(|e| e.get("survived").is_some()), "the string I/O did not come back");
    let faults = run.hv("fault");
    check(
        &run,
        faults.len() == 1
            && faults[0].get("kind") == Some("unsupported-io")
            && faults[0].num("guest") == Some(u64::from(f)),
        "one fault, the faulter's",
    );
    let lines: Vec<&str> = run.serial.lines().collect();
    let own_stop = |l: &&str| l.starts_with("hv: guest-stop") && l.contains(&format!("id={f} "));
    let stop = lines.iter().position(own_stop);
    let first_done = lines.iter().position(|l| l.starts_with("hv: update-done"));
    check(
        &run,
        matches!((stop, first_done), (Some(s), Some(d)) if s < d),
        "stopped while the first update was staged, before it was done",
    );
    check(&run, lines.iter().filter(|l| own_stop(l)).count() == 1, "stopped once: no later image runs it again");
    memcheck_ok(&run);
}

/// Issue 20, item 5: a guest driving QEMU's `edu` behind VT-d under SVM
/// through ten live updates: every new image adopts the unit without
/// stopping it (same root table and queue, the assignment kept, its
/// second-level table and BAR mapping adopted in place), and every
/// transfer, those during the updates included, is verified.
#[test]
fn svm_dma_through_vt_d_keeps_flowing_across_ten_updates() {
    let a = build(None);
    let b = build(Some(UPDATE_B_VERSION));
    guests::build_test_guests(Arch::X86_64).unwrap_or_else(|e| panic!("{e}"));
    let dir = guests::build_test_guests(Arch::X86_64).unwrap_or_else(|e| panic!("{e}"));
    let mut dma = guests::dma_guest(&dir);
    dma.devices = vec!["00:03.0".to_string()];
    dma.cmdline = "transfers=30".to_string();
    let upd = guests::updater_guest(Arch::X86_64, &[b.update_image(), a.update_image()], 32, "updates=10 delay_ms=300")
        .unwrap_or_else(|e| panic!("{e}"));
    let run = run(Machine::Qemu, "test-x86_64-vtd-updates", &a, &[dma, upd], 256);
    check(&run, run.clean_shutdown(), "clean shutdown");
    check(&run, run.hv("update-done").len() == 10, "ten updates");
    let first = run.hv("vtd");
    check(&run, first.len() == 1 && first[0].num("translating") == Some(1), "one VT-d bring-up, at first boot");
    let adopted = run.hv("vtd-adopted");
    check(&run, adopted.len() == 10, "every new image adopts the unit");
    for e in &adopted {
        check(&run, e.get("root") == first[0].get("root"), "the root table stays where it is");
        check(&run, e.num("translating") == Some(1) && e.num("assignments") == Some(1), "translating, edu assigned");
    }
    let dma_id = id_of(&run, "dma");
    let done = run.guest(dma_id, "dma").into_iter().find(|e| e.get("done").is_some());
    check(&run, done.is_some_and(|e| e.num("ok") == Some(30) && e.num("bad") == Some(0)), "30 verified DMAs");
    let during = run.lines_between_updates(&format!("guest{dma_id}: dma transfers="));
    check(&run, during >= 2, "DMA progress between the first and the last update");
    check(&run, run.hv("fault").is_empty(), "no VT-d fault");
}

/// Every test above, on both backends: VT-x in Bochs (`bochs::`), AMD SVM
/// with nested paging in QEMU TCG (`svm::`, issue 20: VMCBs adopted in
/// place, NPT roots adopted), the guests unchanged.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod bochs {
            $(#[test]
            fn $name() {
                super::$name(hv_tests::Machine::Bochs)
            })*
        }
        mod svm {
            $(#[test]
            fn $name() {
                super::$name(hv_tests::Machine::Qemu)
            })*
        }
    };
}

on_both_backends!(
    ten_updates_alternate_and_guests_stay_resident,
    a_console_line_written_across_updates_comes_out_whole,
    a_second_vcpu_waits_runs_and_restarts_across_updates,
    bad_images_are_refused_and_guests_continue,
    a_failing_freeze_cancels_and_the_next_update_succeeds,
    a_new_image_that_fails_before_the_guests_resume_gives_the_machine_back,
    live_updates_go_through_while_a_hostile_guest_attacks,
    a_guest_fault_while_an_update_is_staged_stops_only_that_guest,
);
