//! Device assignment behind the SMMUv3 on aarch64 (QEMU `iommu=smmuv3`,
//! `-device edu`): DMA through the guest's stage-2 table, DMA isolation,
//! DMA that keeps flowing across ten live updates, and faults that come
//! while an update is under way.

use std::sync::Mutex;
use std::time::Duration;

use hv_tests::emulator::{self, RunOutcome, RunSpec};
use hv_tests::guests::{self, GuestArg};
use hv_tests::image::{self, BuiltImage, ImageSpec, UPDATE_B_VERSION};
use hv_tests::{Arch, Machine};

/// One emulator at a time: the machine has two cores, and the fault test
/// sizes its windows in guest time.
static EMULATOR: Mutex<()> = Mutex::new(());

fn guest(bin: &str, opts: &str) -> GuestArg {
    let dir = guests::build_test_guests(Arch::Aarch64).unwrap_or_else(|e| panic!("{e}"));
    GuestArg::parse(&format!("{}{opts}", dir.join(format!("{bin}.bin")).display())).unwrap_or_else(|e| panic!("{e}"))
}

fn boot(name: &str, list: &[GuestArg]) -> RunOutcome {
    let image =
        image::build(&ImageSpec { arch: Arch::Aarch64, version: None, slot: 0 }).unwrap_or_else(|e| panic!("{e}"));
    boot_image(name, &image, list, Duration::from_secs(150))
}

fn boot_image(name: &str, image: &BuiltImage, list: &[GuestArg], timeout: Duration) -> RunOutcome {
    let mut spec = RunSpec::new(name, Machine::Qemu);
    spec.timeout = timeout;
    let dir = emulator::run_dir(&spec);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let placed = guests::place(list, u64::from(spec.mem_mib), &dir).unwrap_or_else(|e| panic!("{e}"));
    spec.blobs = placed.blobs;
    spec.cmdline = Some(placed.cmdline);
    spec.devices = placed.needs_devices;
    let _one = EMULATOR.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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

#[test]
fn dma_through_the_smmu_and_isolation() {
    let mc = guest("memcheck", ",mem=32M,cmdline=\"passes=20\"");
    let dma = guest("dma", ",device=00:02.0,cmdline=\"transfers=5\"");
    let run = boot("test-iommu-dma", &[mc, dma]);
    check(&run, run.clean_shutdown(), "clean shutdown");
    check(&run, run.hv("iommu").len() == 1, "SMMU brought up");
    let assigned = run.hv("device-assigned");
    check(&run, assigned.len() == 1 && assigned[0].get("bdf") == Some("00:02.0"), "edu assigned");
    let dma_id = id_of(&run, "dma");
    let done = run.guest(dma_id, "dma").into_iter().find(|e| e.get("done").is_some());
    check(&run, done.is_some_and(|e| e.num("ok") == Some(5) && e.num("bad") == Some(0)), "five verified DMAs");
    check(&run, run.hv("fault").is_empty(), "no fault for DMA inside the guest's RAM");

    // Now DMA straight at the memcheck guest's RAM (its host address).
    let mc_ram = run.hv("guest-start").iter().find(|e| e.get("name") == Some("memcheck")).and_then(|e| e.num("ram"));
    let target = mc_ram.unwrap_or(0x4200_0000);
    let mc = guest("memcheck", ",mem=32M,cmdline=\"passes=20\"");
    let probe = guest("dma", &format!(",device=00:02.0,cmdline=\"dma_addr={target:#x}\""));
    let run = boot("test-iommu-isolation", &[mc, probe]);
    check(&run, run.clean_shutdown(), "clean shutdown");
    let dma_id = id_of(&run, "dma");
    let faults = run.hv("fault");
    check(&run, !faults.is_empty(), "the SMMU reports the blocked DMA");
    for f in &faults {
        check(
            &run,
            f.get("kind") == Some("smmu") && f.num("guest") == Some(u64::from(dma_id)),
            "smmu fault of the dma guest",
        );
    }
    check(&run, faults[0].num("addr") == Some(target), "fault address is the DMA target");
    let m = id_of(&run, "memcheck");
    let passes: Vec<_> = run.guest(m, "memcheck").into_iter().filter(|e| e.get("pass").is_some()).collect();
    check(
        &run,
        passes.len() == 20 && passes.iter().all(|e| e.num("ok") == Some(1)),
        "the other guest's memcheck stays ok",
    );
}

#[test]
fn dma_keeps_flowing_across_ten_updates() {
    let image_a =
        image::build(&ImageSpec { arch: Arch::Aarch64, version: None, slot: 0 }).unwrap_or_else(|e| panic!("{e}"));
    let image_b = image::build(&ImageSpec { arch: Arch::Aarch64, version: Some(UPDATE_B_VERSION.into()), slot: 1 })
        .unwrap_or_else(|e| panic!("{e}"));
    guests::build_test_guests(Arch::Aarch64).unwrap_or_else(|e| panic!("{e}"));
    let dma = guest("dma", ",device=00:02.0,cmdline=\"transfers=30\"");
    let upd = guests::updater_guest(
        Arch::Aarch64,
        &[image_b.bootable, image_a.bootable.clone()],
        16,
        "updates=10 delay_ms=300",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let run = boot("test-iommu-updates", &[dma, upd]);
    check(&run, run.clean_shutdown(), "clean shutdown");
    check(&run, run.hv("update-done").len() == 10, "ten updates");
    let first = run.hv("iommu");
    check(&run, first.len() == 1, "one SMMU bring-up, at first boot only");
    let adopted = run.hv("iommu-adopted");
    check(&run, adopted.len() == 10, "every new image adopts the SMMU");
    for a in &adopted {
        for key in ["strtab", "cmdq", "evtq"] {
            check(&run, a.get(key) == first[0].get(key), &format!("SMMU {key} stays at the same address"));
        }
        check(&run, a.num("streams") == Some(1), "the assignment survives");
    }
    let dma_id = id_of(&run, "dma");
    let done = run.guest(dma_id, "dma").into_iter().find(|e| e.get("done").is_some());
    check(
        &run,
        done.is_some_and(|e| e.num("ok") == Some(30) && e.num("bad") == Some(0)),
        "30 DMAs, none lost or misdirected",
    );
    // The DMA loop spans the updates: transfers were reported between them.
    let during = run.lines_between_updates(&format!("guest{dma_id}: dma transfers="));
    check(&run, during >= 2, "DMA progress between the first and the last update");
    check(&run, run.hv("fault").is_empty(), "no SMMU fault");
}

/// Issue 15 item 5: faults while an update is under way. The images are
/// test builds in the `slow` mode (`HV_TEST_BREAK_RESTORE`): 400 ms more
/// of brownout when staging the next image and of blackout before the
/// SMMU is adopted. Guests: CPU 0 the updater and a memcheck; CPU 1 a
/// guest that waits until an update is being staged (GET_UPDATE_PHASE)
/// and then makes an access the hypervisor stops it for, and a dma guest
/// that DMAs outside its RAM, one blocked DMA always in flight, so that
/// some complete while the machine is in the blackout.
///
/// The fault stops its guest in the first update's brownout; the update
/// goes through and the guest stays stopped in every later image. Every
/// blocked DMA is reported exactly once, against the dma guest, by the
/// image that was running when it was polled; those of the blackout
/// wait in the event queue (`iommu-adopted events_waiting=`) for the new
/// image. The other guests' memory is untouched.
#[test]
fn faults_in_the_brownout_and_dma_faults_in_the_blackout_leave_updates_consistent() {
    const UPDATES: u64 = 4;
    let slow: Vec<BuiltImage> = (0..2)
        .map(|slot| image::break_build(Arch::Aarch64, slot).and_then(|b| image::break_mode_image(&b, "slow")))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e}"));
    guests::build_test_guests(Arch::Aarch64).unwrap_or_else(|e| panic!("{e}"));
    let images: Vec<_> = (0..UPDATES as usize).map(|k| slow[(k + 1) % 2].bootable.clone()).collect();
    let upd = guests::updater_guest(Arch::Aarch64, &images, 16, &format!("updates={UPDATES} delay_ms=100"))
        .unwrap_or_else(|e| panic!("{e}"));
    // vCPU n runs on CPU n mod 2, in the order of the list.
    let target = 0x7000_0000u64;
    let dma = guest("dma", &format!(",device=00:02.0,cmdline=\"dma_addr={target:#x} updates={UPDATES}\""));
    let mc = guest("memcheck", ",mem=16M,cmdline=\"passes=40\"");
    let faulter = guest("isolation", ",cmdline=\"at_staging=1\"");
    let run = boot_image("test-iommu-update-faults", &slow[0], &[upd, dma, mc, faulter], Duration::from_secs(400));
    check(&run, run.clean_shutdown(), "clean shutdown");
    let done = run.hv("update-done");
    check(&run, done.len() == UPDATES as usize, "every update done");

    // The guest fault: in the first update's brownout, one stop, for good.
    let f = id_of(&run, "isolation");
    let probe = run.guest(f, "probe");
    check(&run, probe.iter().any(|e| e.num("staging") == Some(1)), "the faulter saw an update being staged");
    check(&run, !probe.iter().any(|e| e.get("survived").is_some()), "the access did not come back");
    let faults: Vec<_> = run.hv("fault").into_iter().filter(|e| e.num("guest") == Some(u64::from(f))).collect();
    check(&run, faults.len() == 1 && faults[0].get("kind") == Some("undecodable-mmio"), "one fault stops the faulter");
    let lines: Vec<&str> = run.serial.lines().collect();
    let at = |prefix: &str| lines.iter().position(|l| l.starts_with(prefix));
    let stop = lines.iter().position(|l| l.starts_with("hv: guest-stop") && l.contains(&format!("id={f} ")));
    // GET_UPDATE_PHASE says staging from the request on, before `hv:
    // update-begin` (printed once the image is placed).
    check(
        &run,
        matches!((stop, at("hv: update-done")), (Some(s), Some(d)) if s < d),
        "the faulter stopped while the first update was staged, before it was done",
    );
    let stops = lines.iter().filter(|l| l.starts_with("hv: guest-stop") && l.contains(&format!("id={f} "))).count();
    check(&run, stops == 1, "stopped once: no later image runs it again");
    let own = format!("guest{f}: ");
    check(
        &run,
        stop.is_some_and(|s| !lines[s..].iter().any(|l| l.starts_with(&own))),
        "nothing from the faulter after its stop",
    );

    // The SMMU events: some waited through a blackout, each reported once.
    let adopted = run.hv("iommu-adopted");
    let waiting: Vec<u64> = adopted.iter().filter_map(|e| e.num("events_waiting")).collect();
    eprintln!("events waiting at each adopt: {waiting:?}");
    check(&run, waiting.len() == UPDATES as usize, "every new image adopts the SMMU and counts its events");
    // One blocked DMA is always in flight on CPU 1 and takes ~100 ms of
    // virtual time; the blackout is 400 ms longer than usual.
    check(&run, waiting.iter().all(|&n| n >= 1), "a blocked DMA landed in every blackout");
    let d = id_of(&run, "dma");
    let verdict = run.guest(d, "dma").into_iter().find(|e| e.num("probes").is_some());
    let probes = verdict.and_then(|e| e.num("probes")).unwrap_or(0);
    check(&run, verdict.is_some_and(|e| e.num("updates_seen") == Some(UPDATES)), "the DMAs spanned every update");
    let smmu: Vec<_> = run.hv("fault").into_iter().filter(|e| e.get("kind") == Some("smmu")).collect();
    check(
        &run,
        smmu.iter().all(|e| e.num("guest") == Some(u64::from(d)) && e.num("addr") == Some(target)),
        "every SMMU fault is the dma guest's, at its target",
    );
    let reported: u64 = smmu.iter().filter_map(|e| e.num("count")).sum();
    eprintln!("blocked DMAs: {probes}, SMMU faults reported: {reported}");
    check(&run, probes > 0 && reported == probes, "every blocked DMA reported exactly once");

    let m = id_of(&run, "memcheck");
    let passes: Vec<_> = run.guest(m, "memcheck").into_iter().filter(|e| e.get("pass").is_some()).collect();
    check(&run, !passes.is_empty() && passes.iter().all(|e| e.num("ok") == Some(1)), "every memcheck pass ok");
}
