//! Live update on aarch64: ten updates A -> B -> A ... with the guests
//! resident; bad images refused with the guests untouched; the cancel path.

use std::path::PathBuf;
use std::time::Duration;

use hv_tests::emulator::{self, RunOutcome, RunSpec};
use hv_tests::guests::{self, GuestArg};
use hv_tests::image::{self, BuiltImage, ImageSpec, UPDATE_B_VERSION};
use hv_tests::{Arch, Machine};
use loader::image_desc;

/// The boot image (no version given: slot 0) or an update image (linked
/// for slot 1, so an update from the boot image is staged there).
fn build(version: Option<&str>) -> BuiltImage {
    let slot = u8::from(version.is_some());
    image::build(&ImageSpec { arch: Arch::Aarch64, version: version.map(String::from), slot })
        .unwrap_or_else(|e| panic!("{e}"))
}

fn run(name: &str, image: &BuiltImage, list: &[GuestArg], extra: &[&str]) -> RunOutcome {
    let mut spec = RunSpec::new(name, Machine::Qemu);
    spec.timeout = Duration::from_secs(150);
    spec.extra_args = extra.iter().map(|s| (*s).to_string()).collect();
    let dir = emulator::run_dir(&spec);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let placed = guests::place(list, u64::from(spec.mem_mib), &dir).unwrap_or_else(|e| panic!("{e}"));
    spec.blobs = placed.blobs;
    spec.cmdline = Some(placed.cmdline);
    emulator::run(image, &spec).unwrap_or_else(|e| panic!("{e}"))
}

fn check(run: &RunOutcome, ok: bool, what: &str) {
    assert!(ok, "{}", run.failure(what));
}

fn id_of(run: &RunOutcome, name: &str) -> u32 {
    let e = run.hv("guest-start").into_iter().find(|e| e.get("name") == Some(name));
    check(run, e.is_some(), &format!("no guest-start for {name}"));
    e.and_then(|e| e.num("id")).map_or(0, |id| id as u32)
}

/// Index of the first serial line satisfying `pred` after line `from`.
fn line_after(run: &RunOutcome, from: usize, pred: impl Fn(&str) -> bool) -> Option<usize> {
    run.serial.lines().enumerate().skip(from).find(|(_, l)| pred(l)).map(|(i, _)| i)
}

#[test]
fn ten_updates_alternate_and_guests_stay_resident() {
    let a = build(None);
    let b = build(Some(UPDATE_B_VERSION));
    let list = guests::demo_guests(Arch::Aarch64, &[b.bootable.clone(), a.bootable.clone()], 10)
        .unwrap_or_else(|e| panic!("{e}"));
    let run = run("test-update-ten", &a, &list, &[]);
    check(&run, run.clean_shutdown(), "clean shutdown after the updates");
    check(&run, run.hv("boot").len() == 1, "hv: boot printed once per run");

    let done = run.hv("update-done");
    check(&run, done.len() == 10, "ten updates");
    for (k, e) in done.iter().enumerate() {
        let want = if k % 2 == 0 { UPDATE_B_VERSION } else { hypervisor::VERSION };
        check(&run, e.num("count") == Some(k as u64 + 1), "update counts 1..=10");
        check(&run, e.get("version") == Some(want), "versions alternate A -> B -> A");
        for key in ["blackout_us", "handover_bytes", "preserved_pages"] {
            check(&run, e.num(key).is_some_and(|v| v > 0), &format!("update-done {key}"));
        }
    }

    // Same stage-2 roots (VTTBR) before and after every update.
    let started = run.hv("guest-start");
    for adopted in run.hv("guest-adopted") {
        let before = started.iter().find(|s| s.num("id") == adopted.num("id")).and_then(|s| s.get("stage2_root"));
        check(&run, before.is_some() && before == adopted.get("stage2_root"), "stage-2 root unchanged");
    }
    check(&run, run.hv("guest-adopted").len() == 60, "six partitions adopted by each of ten images");
    let restores = run.hv("update-restore");
    check(&run, restores.len() == 10, "ten restores");
    check(&run, restores.iter().all(|e| e.num("preserved_overlap") == Some(0)), "no preserved page in any allocator");
    check(&run, run.hv("cpu-online").len() == 11, "the second CPU comes back after every update");

    // Staged updates (`hypervisor::slots`): each new image was put in the
    // other slot before the freeze and entered there, nothing copied in
    // the blackout; the second CPU waited in the old image's code and no
    // CPU went through the firmware; the old image was intact after the
    // guests resumed, and the slots alternate.
    let begins = run.hv("update-begin");
    check(&run, begins.iter().all(|e| e.get("image") == Some("slot")), "every image staged in its slot");
    check(&run, begins.iter().all(|e| e.get("cpus") == Some("parked")), "every update parks the CPUs");
    for e in &done {
        check(&run, e.num("staged") == Some(1), "update-done staged=1: no image bytes copied in the blackout");
        check(&run, e.num("parked_cpus") == Some(1), "the other CPU was released from its parking place");
        check(&run, e.num("firmware_calls") == Some(0), "no firmware call (PSCI) by the new image");
        check(&run, e.num("cpu_restarts") == Some(0), "no CPU started with PSCI CPU_ON");
        // The partitions and vCPUs crossed in the state table (one block,
        // one checksum), not a handover node each.
        check(&run, e.get("state") == Some("table") && e.num("table_bytes").is_some_and(|b| b > 0), "state=table");
    }
    // Each new image prepared itself in the brownout (DTB parsed, EL2 map
    // built), and its entry used that instead of doing it in the blackout.
    let prepared = run.hv("update-prepared");
    check(&run, prepared.len() == 10 && prepared.iter().all(|e| e.get("status") == Some("yes")), "ten preparations");
    let entries = run.hv("update-entry");
    check(&run, entries.len() == 10 && entries.iter().all(|e| e.num("prepared") == Some(1)), "ten prepared entries");
    let old = run.hv("old-image");
    check(&run, old.len() == 10 && old.iter().all(|e| e.num("intact") == Some(1)), "the old image intact after resume");
    let bases: Vec<u64> = old.iter().filter_map(|e| e.num("base")).collect();
    let slots = hypervisor::slots::AARCH64.bases;
    let alternating = bases.iter().enumerate().all(|(k, &b)| b == slots[k % 2]);
    check(&run, alternating, &format!("old images alternate between the slots: {bases:x?}"));

    // The updater saw every update succeed, and the new version through the
    // info hypercall.
    let upd = id_of(&run, "updater");
    let reports: Vec<_> = run.guest(upd, "updater").into_iter().filter(|e| e.get("update").is_some()).collect();
    check(&run, reports.len() == 10, "ten updater reports");
    for (k, r) in reports.iter().enumerate() {
        check(&run, r.num("ok") == Some(1) && r.num("update_count") == Some(k as u64 + 1), "updater report");
        check(&run, r.get("to") == done[k].get("version"), "guest reads the new version");
    }

    // Guests: heartbeat ticks keep increasing, memcheck ok after each update.
    let hb = id_of(&run, "heartbeat");
    let ticks: Vec<u64> = run.guest(hb, "alive").iter().filter_map(|e| e.num("ticks")).collect();
    check(&run, ticks.windows(2).all(|w| w[0] < w[1]), "alive ticks strictly increase across updates");
    let verdict = run.guest(hb, "heartbeat");
    check(&run, verdict.last().is_some_and(|e| e.num("sgis_sent") == e.num("sgis_received")), "no SGI lost");
    let mc = id_of(&run, "memcheck");
    let mc_lines: Vec<_> = run.guest(mc, "memcheck").into_iter().filter(|e| e.get("pass").is_some()).collect();
    check(&run, mc_lines.iter().all(|e| e.num("ok") == Some(1)), "every memcheck pass ok");
    let lines: Vec<&str> = run.serial.lines().collect();
    for (k, _) in done.iter().enumerate().take(9) {
        let at = lines.iter().enumerate().filter(|(_, l)| l.starts_with("hv: update-done")).nth(k).map(|(i, _)| i);
        let next = at.and_then(|i| line_after(&run, i, |l| l.starts_with(&format!("guest{mc}: memcheck ok=1"))));
        check(&run, next.is_some(), &format!("memcheck ok=1 after update {}", k + 1));
    }

    // Both measurements of the blackout: the guests' meter saw pauses that
    // match what the hypervisor measured.
    let rows = hv_tests::summary::updates(&run.events);
    let bo = id_of(&run, "blackout");
    for r in &rows {
        let seen = r.guest_gap_us.get(&bo).copied().unwrap_or(0);
        check(&run, seen > 0 && seen * 2 >= r.blackout_us, &format!("guest-seen blackout for update {}", r.count));
    }
    check(&run, run.hv("fault").is_empty(), "no guest faulted (the isolation probe takes an abort)");
    check(&run, run.hv("inject").len() == 1, "one abort injected, into the isolation probe");
}

/// No console byte lost across updates: two guests each write one long
/// line two bytes per hypercall, 10 ms of guest time apart, spread over
/// ten updates and ended after the last. Each line comes out once, whole
/// and in order, as one `guest<N>:` line after the tenth update; nothing
/// of it appears before.
#[test]
fn a_console_line_written_across_ten_updates_comes_out_whole() {
    const UPDATES: u32 = 10;
    let a = build(None);
    let b = build(Some(UPDATE_B_VERSION));
    let names = ["longline-a", "longline-b"];
    let mut list: Vec<GuestArg> = names
        .iter()
        .map(|n| guests::longline_guest(Arch::Aarch64, n, UPDATES).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let updater = guests::updater_guest(
        Arch::Aarch64,
        &[b.bootable.clone(), a.bootable.clone()],
        guests::UPDATER_MEM_MIB,
        &guests::updater_cmdline(UPDATES),
    );
    list.push(updater.unwrap_or_else(|e| panic!("{e}")));
    let run = run("test-update-console-line", &a, &list, &[]);
    check(&run, run.clean_shutdown(), "clean shutdown: every guest ended by itself");
    let done = run.hv("update-done");
    check(&run, done.len() == UPDATES as usize, "ten updates");

    assert!(
        guests::longline_text(UPDATES).len() < hypervisor::guest_console::LINE_MAX,
        "the line is printed whole, not split"
    );
    for name in names {
        let id = id_of(&run, name);
        let verdict = guests::check_longline(&run, id, UPDATES);
        check(&run, verdict.is_ok(), &format!("{name}: {}", verdict.err().unwrap_or_default()));
    }
}

fn refuse_run(name: &str, images: &[PathBuf]) -> RunOutcome {
    let a = build(None);
    guests::build_test_guests(Arch::Aarch64).unwrap_or_else(|e| panic!("{e}"));
    let cmd = format!("updates={} delay_ms=50 expect_status=5", images.len());
    let mut list = guests::default_guests(Arch::Aarch64).unwrap_or_else(|e| panic!("{e}"));
    list.retain(|g| g.name == "memcheck" || g.name == "heartbeat");
    list.push(guests::updater_guest(Arch::Aarch64, images, 64, &cmd).unwrap_or_else(|e| panic!("{e}")));
    run(name, &a, &list, &[])
}

#[test]
fn bad_images_are_refused_and_guests_continue() {
    let a = build(None);
    let good = std::fs::read(&a.bootable).unwrap_or_else(|e| panic!("{e}"));
    let dir = hv_tests::out_dir().join("bad-images");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("{e}"));
        p
    };
    let truncated = write("truncated.img", &good[..good.len() / 2]);
    let x86 = image::build(&ImageSpec { arch: Arch::X86_64, version: None, slot: 0 }).unwrap_or_else(|e| panic!("{e}"));
    let wrong_arch = x86.bootable.parent().map(|d| d.join("hv.elf")).unwrap_or_default();
    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x5a;
    let corrupt = write("corrupt.img", &corrupt);
    let mut bad_abi = good.clone();
    let d = image_desc::find(&bad_abi).unwrap_or_else(|e| panic!("{e}"));
    bad_abi[d.offset + 16..d.offset + 24].copy_from_slice(&[2, 0, 0, 0, 2, 0, 0, 0]);
    image_desc::seal(&mut bad_abi).unwrap_or_else(|e| panic!("{e}"));
    let bad_abi = write("abi2.img", &bad_abi);
    let mut huge = good.clone();
    huge.resize(20 << 20, 0);
    image_desc::seal(&mut huge).unwrap_or_else(|e| panic!("{e}"));
    let huge = write("huge.img", &huge);
    let garbage = write("garbage.img", &vec![0x41u8; 8192]);

    let cases = [
        (truncated, "size-mismatch"),
        (wrong_arch, "wrong-arch"),
        (corrupt, "bad-checksum"),
        (bad_abi, "incompatible-abi"),
        (huge, "too-large"),
        (garbage, "no-descriptor"),
    ];
    let images: Vec<PathBuf> = cases.iter().map(|(p, _)| p.clone()).collect();
    let run = refuse_run("test-update-refused", &images);
    check(&run, run.clean_shutdown(), "clean shutdown");
    let refused = run.hv("update-refused");
    let reasons: Vec<&str> = refused.iter().filter_map(|e| e.get("reason")).collect();
    let want: Vec<&str> = cases.iter().map(|(_, r)| *r).collect();
    check(&run, reasons == want, &format!("refusal reasons {reasons:?} != {want:?}"));
    check(&run, run.hv("update-done").is_empty() && run.hv("update-begin").is_empty(), "nothing started");
    let upd = id_of(&run, "updater");
    let verdict = run.guest(upd, "updater").into_iter().find(|e| e.get("done").is_some());
    check(&run, verdict.is_some_and(|e| e.num("ok") == Some(1)), "every refusal returned INVALID_PARAMETER");
    let mc = id_of(&run, "memcheck");
    let passes: Vec<_> = run.guest(mc, "memcheck").into_iter().filter(|e| e.get("pass").is_some()).collect();
    check(&run, !passes.is_empty() && passes.iter().all(|e| e.num("ok") == Some(1)), "memcheck unaffected");
}

#[test]
fn a_failing_freeze_cancels_and_the_next_update_succeeds() {
    let a = build(None);
    let b = build(Some(UPDATE_B_VERSION));
    guests::build_test_guests(Arch::Aarch64).unwrap_or_else(|e| panic!("{e}"));
    let mut list = guests::default_guests(Arch::Aarch64).unwrap_or_else(|e| panic!("{e}"));
    list.retain(|g| g.name == "memcheck" || g.name == "heartbeat");
    for g in &mut list {
        g.cmdline = if g.name == "memcheck" { "passes=30".into() } else { "ticks=300".into() };
    }
    let cmd = "updates=1 delay_ms=200 fail_freeze=1";
    list.push(
        guests::updater_guest(Arch::Aarch64, std::slice::from_ref(&b.bootable), 16, cmd)
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let run = run("test-update-cancel", &a, &list, &[]);
    check(&run, run.clean_shutdown(), "clean shutdown");
    let cancelled = run.hv("update-cancelled");
    check(&run, cancelled.len() == 1, "one cancelled update");
    check(&run, cancelled[0].get("reason") == Some("injected-freeze-failure"), "cancel reason");
    let done = run.hv("update-done");
    check(&run, done.len() == 1 && done[0].get("version") == Some(UPDATE_B_VERSION), "then one update to B");
    let upd = id_of(&run, "updater");
    let lines = run.guest(upd, "updater");
    check(&run, lines.iter().any(|e| e.num("cancel_check") == Some(1) && e.num("ok") == Some(1)), "status 8");
    let mc = id_of(&run, "memcheck");
    let passes: Vec<_> = run.guest(mc, "memcheck").into_iter().filter(|e| e.get("pass").is_some()).collect();
    check(&run, passes.iter().all(|e| e.num("ok") == Some(1)), "memcheck ok through cancel and update");
}

/// An image whose footprint (bss and stacks included) is larger than the
/// slot reserved for hypervisor images would be loaded over whatever
/// follows the running image: it is refused before the freeze, and the
/// guests never notice.
#[test]
fn an_image_larger_than_its_slot_is_refused_before_the_freeze() {
    let big = image::build_padded(&ImageSpec { arch: Arch::Aarch64, version: Some("0.1.9".into()), slot: 0 }, 16)
        .unwrap_or_else(|e| panic!("{e}"));
    let bytes = std::fs::read(&big.bootable).unwrap_or_else(|e| panic!("{e}"));
    let footprint = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or([0; 8]));
    assert!(footprint > 16 << 20, "the padded image declares {footprint:#x} bytes");
    assert!(bytes.len() < 16 << 20, "the file itself is small: only bss grew");
    let run = refuse_run("test-update-too-big", std::slice::from_ref(&big.bootable));
    check(&run, run.clean_shutdown(), "clean shutdown");
    let reasons: Vec<&str> = run.hv("update-refused").iter().filter_map(|e| e.get("reason")).collect();
    check(&run, reasons == ["image-larger-than-slot"], &format!("refusal reasons {reasons:?}"));
    check(&run, run.hv("update-begin").is_empty() && run.hv("update-done").is_empty(), "no freeze, no kexec");
    let upd = id_of(&run, "updater");
    let verdict = run.guest(upd, "updater").into_iter().find(|e| e.get("done").is_some());
    check(&run, verdict.is_some_and(|e| e.num("ok") == Some(1)), "the requester got INVALID_PARAMETER");
    let mc = id_of(&run, "memcheck");
    let passes: Vec<_> = run.guest(mc, "memcheck").into_iter().filter(|e| e.get("pass").is_some()).collect();
    check(&run, !passes.is_empty() && passes.iter().all(|e| e.num("ok") == Some(1)), "memcheck unaffected");
}

/// An image that cannot read what the running one hands over (here: it
/// claims to read vCPU-context layout 1 only, as images did before layout
/// 2) is refused before the freeze, naming what it cannot read; the guests
/// never notice.
#[test]
fn an_image_that_cannot_read_the_handover_is_refused_before_the_freeze() {
    let old = image::build_variant(
        &ImageSpec { arch: Arch::Aarch64, version: Some("0.1.7".into()), slot: 0 },
        "-reads-context-1",
        &[("HV_TEST_READS_CONTEXT_MAX", "1")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let run = refuse_run("test-update-unreadable", std::slice::from_ref(&old.bootable));
    check(&run, run.clean_shutdown(), "clean shutdown");
    let reasons: Vec<&str> = run.hv("update-refused").iter().filter_map(|e| e.get("reason")).collect();
    check(&run, reasons == ["unreadable-vcpu-context"], &format!("refusal reasons {reasons:?}"));
    check(&run, run.hv("update-begin").is_empty(), "refused before the freeze");
    let mc = id_of(&run, "memcheck");
    let passes: Vec<_> = run.guest(mc, "memcheck").into_iter().filter(|e| e.get("pass").is_some()).collect();
    check(&run, !passes.is_empty() && passes.iter().all(|e| e.num("ok") == Some(1)), "memcheck unaffected");
}

/// What the blackout handles does not grow with guest RAM: one update
/// with a 1 GiB and with a 4 GiB guest (the blackout meter) beside the
/// updater. The handover is the same size, and the preserved-memory map
/// the new image adopts has the same number of bitmap nodes and leaves
/// the same number of free ranges, while it covers four times the pages.
/// (Time is not compared: plain TCG's clock is the host's; `scripts/bench`
/// measures it under -icount.)
#[test]
fn the_blackout_work_does_not_grow_with_guest_ram() {
    let a = build(None);
    let b = build(Some(UPDATE_B_VERSION));
    let dir = guests::build_test_guests(Arch::Aarch64).unwrap_or_else(|e| panic!("{e}"));
    let mut figures = Vec::new();
    for gib in [1u64, 4] {
        let meter = GuestArg {
            file: dir.join("blackout.bin"),
            name: "blackout".into(),
            mem_mib: gib << 10,
            vcpus: 1,
            privileged: false,
            initrd: None,
            devices: Vec::new(),
            cmdline: "seconds=3".into(),
        };
        let updater = guests::updater_guest(Arch::Aarch64, &[b.update_image()], 16, "updates=1 delay_ms=300")
            .unwrap_or_else(|e| panic!("{e}"));
        // The guest block is aligned to its size; the blobs sit at the top.
        let mut spec = RunSpec::new(&format!("test-update-flat-{gib}g"), Machine::Qemu);
        spec.mem_mib = u32::try_from((gib << 11) + 1024).unwrap_or(u32::MAX);
        spec.timeout = Duration::from_secs(150);
        let run_dir = emulator::run_dir(&spec);
        std::fs::create_dir_all(&run_dir).unwrap_or_else(|e| panic!("{e}"));
        let placed =
            guests::place(&[meter, updater], u64::from(spec.mem_mib), &run_dir).unwrap_or_else(|e| panic!("{e}"));
        spec.blobs = placed.blobs;
        spec.cmdline = Some(placed.cmdline);
        let run = emulator::run(&a, &spec).unwrap_or_else(|e| panic!("{e}"));
        check(&run, run.clean_shutdown() && run.hv("update-done").len() == 1, "one update, clean shutdown");
        let done = run.hv("update-done")[0].clone();
        let restore = run.hv("update-restore").first().map(|e| (*e).clone());
        check(&run, restore.is_some(), "hv: update-restore");
        let field = |e: &hv_tests::events::Event, k: &str| e.num(k).unwrap_or(u64::MAX);
        let restore = restore.unwrap_or_else(|| done.clone());
        figures.push((
            field(&done, "handover_bytes"),
            field(&restore, "bitmap_nodes"),
            field(&restore, "free_ranges"),
            field(&done, "preserved_pages"),
            run,
        ));
    }
    let (one, four) = (&figures[0], &figures[1]);
    println!(
        "flat: handover {} / {} B, bitmap nodes {} / {}, free ranges {} / {}, preserved pages {} / {}",
        one.0, four.0, one.1, four.1, one.2, four.2, one.3, four.3
    );
    check(&four.4, one.0 == four.0, "the handover is the same size at 1 and 4 GiB");
    check(&four.4, one.1 == four.1, "the preserved map has as many bitmap nodes at 4 GiB as at 1 GiB");
    check(&four.4, one.2 == four.2, "as many free ranges");
    check(&four.4, four.3 > one.3 + (3 << 18) - 1, "while it covers the 3 GiB more (786432 pages)");
}

/// Live updates while a hostile guest attacks (`testguests::hostile`,
/// unprivileged here: its live-update requests are refused, so the
/// updater's own go through): its traps arrive in brownout and between
/// freezes, every update is done, the other guests keep their memory and
/// ticks, and the hypervisor never stops the attacker.
#[test]
fn live_updates_go_through_while_a_hostile_guest_attacks() {
    const OPS: u64 = 40_000;
    let seed = hv_tests::hostile::seed(0x15_0005);
    let a = build(None);
    let b = build(Some(UPDATE_B_VERSION));
    let mut list = guests::demo_guests(Arch::Aarch64, &[b.bootable.clone(), a.bootable.clone()], 4)
        .unwrap_or_else(|e| panic!("{e}"));
    // The updates come 100 ms apart in the updater's time, while the
    // attacks run (about 4 s of guest time).
    for g in list.iter_mut().filter(|g| g.name == guests::UPDATER) {
        g.cmdline = "updates=4 delay_ms=100".into();
    }
    list.push(hv_tests::hostile::guest(Arch::Aarch64, seed, OPS, false).unwrap_or_else(|e| panic!("{e}")));
    let run = run("test-update-hostile", &a, &list, &[]);
    check(&run, run.clean_shutdown(), "clean shutdown");
    if let Err(why) = hv_tests::hostile::verdict(&run, seed, OPS) {
        check(&run, false, &why);
    }
    check(&run, run.hv("update-done").len() == 4, "four updates");
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
    let hb = id_of(&run, "heartbeat");
    let ticks: Vec<u64> = run.guest(hb, "alive").iter().filter_map(|e| e.num("ticks")).collect();
    check(&run, ticks.windows(2).all(|w| w[0] < w[1]), "heartbeat ticks strictly increase");
    let mc = id_of(&run, "memcheck");
    let passes: Vec<_> = run.guest(mc, "memcheck").into_iter().filter(|e| e.get("pass").is_some()).collect();
    check(&run, !passes.is_empty() && passes.iter().all(|e| e.num("ok") == Some(1)), "every memcheck pass ok");
}

/// Rollback (issue 15 item 4, `kho/ABI.md` §5.2): deliberately broken
/// builds, each staged in the slot the running image is not in, fail
/// after the kexec and before the guests resume: one refuses the
/// handover's version, one panics in its restore, one takes an EL2 data
/// abort, one fails after adopting the machine, one hangs there (and is
/// interrupted at the old image's deadline). Each time the old image,
/// left intact in its slot, takes the machine back from the same
/// preserved state: the update is reported rolled back with the new
/// image's reason, the updater gets OPERATION_DENIED with the version and
/// update count unchanged, the parked CPU rejoins, the guests see only a
/// blackout, and the good update after each one goes through.
#[test]
fn a_new_image_that_fails_before_the_guests_resume_gives_the_machine_back() {
    let a = build(None);
    let b = build(Some(UPDATE_B_VERSION));
    // One build per slot; each mode is a patched, resealed copy.
    let broken: Vec<BuiltImage> =
        (0..2).map(|slot| image::break_build(Arch::Aarch64, slot).unwrap_or_else(|e| panic!("{e}"))).collect();
    let mode = |slot: usize, how: &str| image::with_break_mode(&broken[slot], how).unwrap_or_else(|e| panic!("{e}"));
    // A (slot 0) -> broken (slot 1), rolled back -> B (slot 1) -> broken
    // (slot 0), rolled back -> A (slot 0) -> ...
    let modes = ["refuse-handover", "panic", "fault", "fail", "hang"];
    let mut images = Vec::new();
    for (k, how) in modes.iter().enumerate() {
        let slot = usize::from(k % 2 == 0);
        images.push(mode(slot, how));
        images.push(if slot == 1 { b.bootable.clone() } else { a.bootable.clone() });
    }
    let updates = images.len();
    let mut list = guests::demo_guests(Arch::Aarch64, &images, updates as u32).unwrap_or_else(|e| panic!("{e}"));
    for g in list.iter_mut().filter(|g| g.name == guests::UPDATER) {
        g.cmdline = format!("updates={updates} rollbacks=1");
    }
    let run = run("test-update-rollback", &a, &list, &[]);
    check(&run, run.clean_shutdown(), "clean shutdown");

    let rolled: Vec<&str> = run.hv("update-rolled-back").iter().filter_map(|e| e.get("reason")).collect();
    let want = ["handover-refused", "panic", "exception", "restore-failed", "deadline"];
    check(&run, rolled == want, &format!("five rollbacks: {rolled:?}"));
    let gave = run.hv("restore-failed");
    check(&run, gave.len() == 5 && gave.iter().all(|e| e.num("give_back") == Some(1)), "each new image gave back");
    let done = run.hv("update-done");
    let versions: Vec<&str> = done.iter().filter_map(|e| e.get("version")).collect();
    let good: Vec<&str> = (0..5).map(|k| if k % 2 == 0 { UPDATE_B_VERSION } else { hypervisor::VERSION }).collect();
    check(&run, versions == good, &format!("the good updates went through: {versions:?}"));
    check(
        &run,
        done.iter().enumerate().all(|(k, e)| e.num("count") == Some(k as u64 + 1)),
        "a rolled-back update does not count",
    );

    let upd = id_of(&run, "updater");
    let reports: Vec<_> = run.guest(upd, "updater").into_iter().filter(|e| e.get("update").is_some()).collect();
    check(&run, reports.len() == updates && reports.iter().all(|e| e.num("ok") == Some(1)), "every update as expected");
    let back: Vec<u64> = reports.iter().filter_map(|e| e.num("rolled_back")).collect();
    check(&run, back == [1, 0, 1, 0, 1, 0, 1, 0, 1, 0], "every other update rolled back");

    let hb = id_of(&run, "heartbeat");
    let ticks: Vec<u64> = run.guest(hb, "alive").iter().filter_map(|e| e.num("ticks")).collect();
    check(&run, ticks.windows(2).all(|w| w[0] < w[1]), "heartbeat ticks strictly increase");
    let verdict = run.guest(hb, "heartbeat");
    check(&run, verdict.last().is_some_and(|e| e.num("sgis_sent") == e.num("sgis_received")), "no SGI lost");
    let mc = id_of(&run, "memcheck");
    let passes: Vec<_> = run.guest(mc, "memcheck").into_iter().filter(|e| e.get("pass").is_some()).collect();
    check(&run, !passes.is_empty() && passes.iter().all(|e| e.num("ok") == Some(1)), "every memcheck pass ok");
    check(&run, run.hv("fault").is_empty(), "no guest faulted");
}

/// A new image whose brownout preparation panics: the panic comes back to
/// the old image (which keeps running its guests), the image is placed
/// afresh and entered unprepared, and the update goes through; the next
/// update, to a sound image, is prepared again.
#[test]
fn a_preparation_that_panics_leaves_the_update_to_an_unprepared_entry() {
    let a = build(None);
    let broken = image::break_build(Arch::Aarch64, 1).unwrap_or_else(|e| panic!("{e}"));
    let panics = image::with_break_mode(&broken, "prepare-panic").unwrap_or_else(|e| panic!("{e}"));
    let images = [panics, a.bootable.clone()];
    let list = guests::demo_guests(Arch::Aarch64, &images, 2).unwrap_or_else(|e| panic!("{e}"));
    let run = run("test-update-prepare-panic", &a, &list, &[]);
    check(&run, run.clean_shutdown(), "clean shutdown");
    let statuses: Vec<&str> = run.hv("update-prepared").iter().filter_map(|e| e.get("status")).collect();
    check(&run, statuses == ["panicked", "yes"], &format!("the first preparation panicked: {statuses:?}"));
    let entries: Vec<u64> = run.hv("update-entry").iter().filter_map(|e| e.num("prepared")).collect();
    check(&run, entries == [0, 1], &format!("entered unprepared, then prepared: {entries:?}"));
    let done = run.hv("update-done");
    check(&run, done.len() == 2, "both updates done");
    check(&run, run.hv("update-rolled-back").is_empty(), "nothing rolled back");
    check(&run, !run.serial.contains("hv: panic"), "the preparation's panic printed nothing");
    let mc = id_of(&run, "memcheck");
    let passes: Vec<_> = run.guest(mc, "memcheck").into_iter().filter(|e| e.get("pass").is_some()).collect();
    check(&run, !passes.is_empty() && passes.iter().all(|e| e.num("ok") == Some(1)), "every memcheck pass ok");
    check(&run, run.hv("fault").is_empty(), "no guest faulted");
}
