//! The aarch64 image started by UEFI firmware (edk2 in QEMU) with ACPI
//! and no DTB, then live-updated: the same image file QEMU's `-kernel`
//! boots with a DTB (issue 21).

use std::time::Duration;

use hv_tests::emulator::{self, RunOutcome, RunSpec};
use hv_tests::guests::{self, GuestArg};
use hv_tests::image::{self, BuiltImage, ImageSpec, UPDATE_B_VERSION};
use hv_tests::{Arch, Firmware, Machine};

fn build(version: Option<&str>) -> BuiltImage {
    let slot = u8::from(version.is_some());
    image::build(&ImageSpec { arch: Arch::Aarch64, version: version.map(String::from), slot })
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Boots `image` under edk2 with the blobs laid out for `placement`.
fn run(name: &str, image: &BuiltImage, list: &[GuestArg], placement: Firmware) -> RunOutcome {
    run_with(name, image, list, placement, &[])
}

fn run_with(name: &str, image: &BuiltImage, list: &[GuestArg], placement: Firmware, extra: &[&str]) -> RunOutcome {
    let mut spec = RunSpec::new(name, Machine::Qemu);
    spec.extra_args = extra.iter().map(|s| (*s).to_string()).collect();
    spec.firmware = Firmware::Uefi;
    // About 10 s quiet (edk2 takes ~2 s to start the image).
    spec.timeout = Duration::from_mins(2);
    let dir = emulator::run_dir(&spec);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let placed = guests::place_for(list, u64::from(spec.mem_mib), &dir, placement).unwrap_or_else(|e| panic!("{e}"));
    spec.blobs = placed.blobs;
    spec.cmdline = Some(placed.cmdline);
    spec.devices = placed.needs_devices;
    emulator::run(image, &spec).unwrap_or_else(|e| panic!("{e}"))
}

fn check(run: &RunOutcome, ok: bool, what: &str) {
    assert!(ok, "{}", run.failure(what));
}

/// The events on lines the firmware's console prefixed with its escape
/// sequences (`hv: efi-entry` goes out through ConOut).
fn efi_entry(run: &RunOutcome) -> Option<(u64, u64)> {
    let line = run.serial.lines().find_map(|l| l.find("hv: efi-entry ").map(|at| &l[at..]))?;
    let field = |key: &str| {
        let v = line.split_whitespace().find_map(|w| w.strip_prefix(key))?;
        u64::from_str_radix(v.trim_start_matches("0x"), 16).ok()
    };
    Some((field("loaded_at=")?, field("image=")?))
}

/// The test guests, the updater and a guest given edu behind the SMMUv3
/// (found through the IORT, its BAR window through the firmware's PCI
/// root bridge protocol) whose verified DMA runs through tables both new
/// images adopted (the transfers come after the updates: the DTB path's
/// `iommu_aarch64` test has DMA in flight across them).
#[test]
fn edk2_starts_the_image_with_acpi_and_it_live_updates_twice() {
    let a = build(None);
    let b = build(Some(UPDATE_B_VERSION));
    let mut list = guests::demo_guests(Arch::Aarch64, &[b.bootable.clone(), a.bootable.clone()], 2)
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = guests::build_test_guests(Arch::Aarch64).unwrap_or_else(|e| panic!("{e}"));
    let dma = format!("{},device=00:02.0,cmdline=\"transfers=20\"", dir.join("dma.bin").display());
    list.insert(0, GuestArg::parse(&dma).unwrap_or_else(|e| panic!("{e}")));
    let run = run("test-uefi-update", &a, &list, Firmware::Uefi);
    check(&run, run.clean_shutdown(), "clean shutdown after the updates");

    // The firmware put the PE image where it chose; the EFI entry moved it
    // to its link address (slot 0).
    let entry = efi_entry(&run);
    check(&run, entry.is_some(), "hv: efi-entry printed through the firmware's console");
    let (loaded_at, linked) = entry.unwrap_or_default();
    check(&run, linked == hypervisor::slots::AARCH64.bases[0], "linked at slot 0");
    check(&run, loaded_at != linked, "edk2 loaded the image elsewhere, so it moved itself");

    // The machine from ACPI and the memory from the UEFI memory map.
    let boot = run.hv("boot");
    check(&run, boot.len() == 1 && boot[0].get("firmware") == Some("uefi"), "boot firmware=uefi");
    check(&run, boot[0].num("cpus") == Some(2), "both CPUs up (MADT GICC entries, PSCI from the FADT)");
    let mem = run.hv("uefi-memory");
    check(&run, mem.len() == 1, "one uefi-memory event");
    check(&run, mem[0].num("descriptors").is_some_and(|n| n > 4), "a real memory map");
    check(&run, mem[0].num("firmware_kib").is_some_and(|n| n > 0), "runtime services and ACPI memory kept");
    check(&run, mem[0].num("exit_attempts") == Some(1), "boot services left at the first ExitBootServices");
    let platform = run.hv("platform");
    check(&run, platform.first().and_then(|e| e.get("uart")) == Some("0x9000000"), "the console from the SPCR");
    check(&run, platform.first().and_then(|e| e.get("gicd")) == Some("0x8000000"), "the GIC from the MADT");

    // Two staged, prepared updates with the guests resident: each new image
    // read the same UEFI boot record (x0) and ACPI tables again.
    let done = run.hv("update-done");
    check(&run, done.len() == 2, "two updates");
    check(&run, done.iter().all(|e| e.num("staged") == Some(1)), "staged in the other slot");
    let entries = run.hv("update-entry");
    check(&run, entries.iter().all(|e| e.num("prepared") == Some(1)), "prepared in the brownout from the record");
    check(&run, run.hv("guest-adopted").len() == 14, "seven partitions adopted by each new image");

    // DMA through the SMMU the IORT names, adopted by both new images.
    let assigned = run.hv("device-assigned");
    check(&run, assigned.len() == 1 && assigned[0].get("bdf") == Some("00:02.0"), "edu assigned");
    let adopted = run.hv("iommu-adopted");
    check(&run, adopted.len() == 2 && adopted.iter().all(|e| e.num("streams") == Some(1)), "the SMMU adopted twice");
    let dma = run.hv("guest-start").into_iter().find(|e| e.get("name") == Some("dma")).and_then(|e| e.num("id"));
    let done = run.guest(dma.unwrap_or(0) as u32, "dma").into_iter().find(|e| e.get("done").is_some());
    check(&run, done.is_some_and(|e| e.num("ok") == Some(20) && e.num("bad") == Some(0)), "20 verified DMAs");
    let mc = run.hv("guest-start").into_iter().find(|e| e.get("name") == Some("memcheck")).and_then(|e| e.num("id"));
    let passes = run.guest(mc.unwrap_or(0) as u32, "memcheck");
    check(&run, !passes.is_empty() && passes.iter().all(|e| e.num("ok") != Some(0)), "memcheck never failed");
    check(&run, run.hv("fault").is_empty(), "no guest faulted");
}

/// Blobs at the top of RAM, where edk2 keeps its own memory: the EFI entry
/// cannot claim the manifest and refuses to start, through the firmware's
/// console, instead of using memory the firmware owns.
#[test]
fn guest_blobs_in_firmware_memory_are_refused_before_boot_services_end() {
    let a = build(None);
    let list = guests::demo_guests(Arch::Aarch64, &[], 0).unwrap_or_else(|e| panic!("{e}"));
    let run = run("test-uefi-blobs-in-firmware-memory", &a, &list, Firmware::Dtb);
    let refused = run.serial.lines().any(|l| l.contains("hv: boot-failed firmware=uefi reason=manifest-not-free"));
    check(&run, refused, "hv: boot-failed firmware=uefi reason=manifest-not-free");
    check(&run, run.hv("boot").is_empty(), "the hypervisor did not start");
}

/// Firmware that starts the image at EL1 (QEMU `virt` without
/// virtualization): refused under the firmware, with the reason.
#[test]
fn an_image_started_below_el2_says_so_and_stops() {
    let a = build(None);
    let list = guests::demo_guests(Arch::Aarch64, &[], 0).unwrap_or_else(|e| panic!("{e}"));
    let run = run_with("test-uefi-at-el1", &a, &list, Firmware::Uefi, &["-M", "virtualization=off"]);
    let refused =
        run.serial.lines().any(|l| l.contains("hv: boot-failed firmware=uefi reason=not-started-at-el2 el=1"));
    check(&run, refused, "hv: boot-failed firmware=uefi reason=not-started-at-el2 el=1");
    check(&run, run.hv("boot").is_empty(), "the hypervisor did not start");
}

/// A stale map key (a test build hands the firmware one on purpose): edk2
/// refuses the first ExitBootServices, the entry reads the map again and
/// the second one succeeds; the machine then boots as usual.
#[test]
fn exit_boot_services_is_retried_with_a_fresh_map_key() {
    let build = image::break_build(Arch::Aarch64, 0).unwrap_or_else(|e| panic!("{e}"));
    let stale = image::break_mode_image(&build, "stale-map-key").unwrap_or_else(|e| panic!("{e}"));
    // No manifest: the hypervisor boots alone and powers off.
    let mut spec = RunSpec::new("test-uefi-stale-map-key", Machine::Qemu);
    spec.firmware = Firmware::Uefi;
    spec.timeout = Duration::from_mins(1);
    let run = emulator::run(&stale, &spec).unwrap_or_else(|e| panic!("{e}"));
    check(&run, run.clean_shutdown(), "boots alone and shuts down");
    let mem = run.hv("uefi-memory");
    check(&run, mem.len() == 1 && mem[0].num("exit_attempts") == Some(2), "uefi-memory exit_attempts=2");
}

/// Installed as on a server: the image on an EFI system partition as
/// `EFI/BOOT/BOOTAA64.EFI`, started by edk2's boot manager with no command
/// line, and the guests as files beside it named by `hvmanifest.txt`. The
/// EFI entry reads them into memory, then the machine runs and updates as
/// with `-kernel`.
#[test]
fn from_the_efi_system_partition_with_the_guests_as_files() {
    let a = build(None);
    let b = build(Some(UPDATE_B_VERSION));
    let list = guests::demo_guests(Arch::Aarch64, &[b.bootable.clone(), a.bootable.clone()], 2)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut spec = RunSpec::new("test-uefi-esp", Machine::Qemu);
    spec.firmware = Firmware::Uefi;
    spec.timeout = Duration::from_mins(2);
    let esp = emulator::run_dir(&spec).join("esp");
    let _ = std::fs::remove_dir_all(&esp);
    guests::esp_layout(&list, &esp).unwrap_or_else(|e| panic!("{e}"));
    std::fs::copy(&a.bootable, esp.join("EFI/BOOT/BOOTAA64.EFI")).unwrap_or_else(|e| panic!("{e}"));
    spec.esp = Some(esp);
    let run = emulator::run(&a, &spec).unwrap_or_else(|e| panic!("{e}"));
    check(&run, run.clean_shutdown(), "clean shutdown after the updates");
    let read = run.serial.lines().find_map(|l| l.find("hv: esp-manifest ").map(|at| l[at..].to_string()));
    check(&run, read.as_deref().is_some_and(|l| l.contains("files=6")), "hv: esp-manifest files=6");
    check(&run, run.hv("boot").first().and_then(|e| e.get("firmware")) == Some("uefi"), "boot firmware=uefi");
    check(&run, run.hv("guest-start").len() == 6, "the six guests from their files");
    check(&run, run.hv("update-done").len() == 2, "two updates");
    check(&run, run.hv("fault").is_empty(), "no guest faulted");
}
