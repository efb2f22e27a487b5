//! Device assignment behind the SMMUv3 on aarch64 (QEMU `iommu=smmuv3`,
//! `-device edu`): DMA through the guest's stage-2 table, DMA isolation,
//! and DMA that keeps flowing across ten live updates.

use std::time::Duration;

use hv_tests::emulator::{self, RunOutcome, RunSpec};
use hv_tests::guests::{self, GuestArg};
use hv_tests::image::{self, ImageSpec, UPDATE_B_VERSION};
use hv_tests::{Arch, Machine};

fn guest(bin: &str, opts: &str) -> GuestArg {
    let dir = guests::build_test_guests(Arch::Aarch64).unwrap_or_else(|e| panic!("{e}"));
    GuestArg::parse(&format!("{}{opts}", dir.join(format!("{bin}.bin")).display())).unwrap_or_else(|e| panic!("{e}"))
}

fn boot(name: &str, list: &[GuestArg]) -> RunOutcome {
    let image =
        image::build(&ImageSpec { arch: Arch::Aarch64, version: None, slot: 0 }).unwrap_or_else(|e| panic!("{e}"));
    let mut spec = RunSpec::new(name, Machine::Qemu);
    spec.timeout = Duration::from_secs(150);
    let dir = emulator::run_dir(&spec);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let placed = guests::place(list, u64::from(spec.mem_mib), &dir).unwrap_or_else(|e| panic!("{e}"));
    spec.blobs = placed.blobs;
    spec.cmdline = Some(placed.cmdline);
    spec.devices = placed.needs_devices;
    emulator::run(&image, &spec).unwrap_or_else(|e| panic!("{e}"))
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
    let lines: Vec<&str> = run.serial.lines().collect();
    let first_update = lines.iter().position(|l| l.starts_with("hv: update-done"));
    let last_update = lines.iter().rposition(|l| l.starts_with("hv: update-done"));
    let during = match (first_update, last_update) {
        (Some(f), Some(l)) => {
            lines[f..l].iter().filter(|l| l.starts_with(&format!("guest{dma_id}: dma transfers="))).count()
        }
        _ => 0,
    };
    check(&run, during >= 2, "DMA progress between the first and the last update");
    check(&run, run.hv("fault").is_empty(), "no SMMU fault");
}
