//! First boot on both architectures: the printed values must match what
//! the emulator was told.

use std::sync::Mutex;
use std::time::Duration;

use hv_tests::emulator::{self, RunOutcome, RunSpec};
use hv_tests::image::{self, BuiltImage, ImageSpec};
use hv_tests::{Arch, Firmware, Machine};

/// One emulator at a time: the machine has two cores, and Bochs's RFB
/// display listens on a fixed port.
static EMULATOR: Mutex<()> = Mutex::new(());

fn build(arch: Arch) -> BuiltImage {
    image::build(&ImageSpec { arch, version: None, slot: 0 }).unwrap_or_else(|e| panic!("building {arch:?}: {e}"))
}

fn boot(arch: Arch, machine: Machine, cpus: u32, mem_mib: u32) -> RunOutcome {
    boot_with(arch, machine, cpus, mem_mib, false)
}

fn boot_with(arch: Arch, machine: Machine, cpus: u32, mem_mib: u32, devices: bool) -> RunOutcome {
    boot_from(arch, machine, cpus, mem_mib, devices, Firmware::Dtb)
}

/// `firmware`: `Uefi` starts the machine from UEFI firmware (x86_64 QEMU:
/// OVMF, which starts GRUB's EFI build from the ISO).
fn boot_from(arch: Arch, machine: Machine, cpus: u32, mem_mib: u32, devices: bool, firmware: Firmware) -> RunOutcome {
    let image = build(arch);
    let _one = EMULATOR.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let name = format!("test-{}-{machine:?}-{cpus}cpu-{mem_mib}m-{firmware:?}", arch.name());
    let mut spec = RunSpec::new(&name, machine);
    spec.firmware = firmware;
    spec.cpus = cpus;
    spec.mem_mib = mem_mib;
    spec.devices = devices;
    spec.timeout = Duration::from_secs(90);
    emulator::run(&image, &spec).unwrap_or_else(|e| panic!("running {arch:?} on {machine:?}: {e}"))
}

/// The single `hv: <name>` event, or a failure with the log's tail.
fn one<'a>(run: &'a RunOutcome, name: &str) -> &'a hv_tests::events::Event {
    let found = run.hv(name);
    assert!(found.len() == 1, "{}", run.failure(&format!("expected one `hv: {name}` event, got {}", found.len())));
    found[0]
}

fn check(run: &RunOutcome, ok: bool, what: &str) {
    assert!(ok, "{}", run.failure(what));
}

fn check_boot(run: &RunOutcome, arch: &str, cpus: u32) -> u64 {
    check(run, run.clean_shutdown(), "no `hv: shutdown status=ok`");
    let boot = one(run, "boot");
    check(run, boot.get("arch") == Some(arch), "boot arch");
    check(run, boot.get("version").is_some_and(|v| !v.is_empty()), "boot version");
    check(run, boot.get("build").is_some_and(|v| !v.is_empty()), "boot build");
    check(run, boot.num("cpus") == Some(u64::from(cpus)), &format!("boot cpus != {cpus}"));
    boot.num("mem_mib").unwrap_or(0)
}

#[test]
fn aarch64_qemu_two_cpus_512m() {
    let run = boot(Arch::Aarch64, Machine::Qemu, 2, 512);
    let mem = check_boot(&run, "aarch64", 2);
    check(&run, mem == 512, "mem_mib != 512");
    let online = one(&run, "cpu-online");
    check(&run, online.num("mpidr") == Some(1), "secondary MPIDR");
    let plat = one(&run, "platform");
    check(&run, plat.get("psci") == Some("smc") && plat.num("el") == Some(2), "platform psci/el");
}

#[test]
fn aarch64_qemu_values_follow_the_machine() {
    let run = boot(Arch::Aarch64, Machine::Qemu, 1, 256);
    let mem = check_boot(&run, "aarch64", 1);
    check(&run, mem == 256, "mem_mib != 256");
    check(&run, run.hv("cpu-online").is_empty(), "no secondary CPU expected");
}

/// Firmware keeps part of the low MiB and the ACPI tables, so usable RAM
/// is a little under what Bochs/QEMU were given.
fn near(mem: u64, told: u32) -> bool {
    mem <= u64::from(told) && mem + 4 >= u64::from(told)
}

#[test]
fn x86_64_bochs_vmxon_on_both_cpus() {
    let run = boot(Arch::X86_64, Machine::Bochs, 2, 128);
    let mem = check_boot(&run, "x86_64", 2);
    check(&run, near(mem, 128), "mem_mib not within 4 MiB of 128");
    let vmx = one(&run, "vmx");
    for key in ["available", "ept", "vpid", "unrestricted"] {
        check(&run, vmx.num(key) == Some(1), &format!("vmx {key}=1 expected"));
    }
    check(&run, vmx.num("vmxon_cpus") == Some(2), "VMXON on both CPUs");
    check(&run, vmx.num("revision") == Some(0x2b), "Bochs VMCS revision 0x2b");
}

#[test]
fn x86_64_qemu_tcg_enables_svm_and_vt_d_blocks_dma_then_walks_an_ept_table() {
    let run = boot_with(Arch::X86_64, Machine::Qemu, 2, 256, true);
    let mem = check_boot(&run, "x86_64", 2);
    check(&run, near(mem, 256), "mem_mib not within 4 MiB of 256");
    let vmx = one(&run, "vmx");
    check(&run, vmx.num("available") == Some(0), "TCG has no VMX");
    // `-cpu max` is an AMD CPU with SVM: nested paging, 16 ASIDs, no
    // NRIP_SAVE (shared/EMULATORS.md).
    let svm = one(&run, "svm");
    check(&run, svm.num("available") == Some(1), "svm available=1 expected");
    check(&run, svm.num("npt") == Some(1) && svm.num("nrip") == Some(0), "NPT without NRIP_SAVE under TCG");
    check(&run, svm.num("asids") == Some(16), "16 ASIDs under TCG");
    check(&run, svm.get("guest_support") == Some("ok"), "nested paging and a guest ASID");
    check(&run, svm.num("svme_cpus") == Some(2), "EFER.SVME on both CPUs");
    // A real-mode guest under VMRUN with a nested table of the engine's NPT
    // format: CPUID and VMMCALL intercepted and stepped over by their known
    // lengths (no NRIP_SAVE), a read outside its one page stopped by a
    // nested page fault at that address, then HLT.
    let first = one(&run, "svm-first-guest");
    check(&run, first.get("exits") == Some("cpuid,vmmcall,npf,hlt"), "the first guest's exits, in order");
    check(&run, first.get("npf_gpa") == Some("0x3000"), "the nested page fault names the unmapped address");
    check(&run, first.get("halted_at") == Some("0x1008"), "it halted after its four instructions");
    let cpu1 = one(&run, "cpu-online");
    check(&run, cpu1.num("svme") == Some(1), "the second CPU enables SVM too");
    // `-device intel-iommu`: the DMAR names one VT-d unit with explicit
    // device scopes (the I/O APIC and the 7 PCI functions on bus 0).
    let dmar = one(&run, "dmar");
    check(&run, dmar.num("units") == Some(1) && dmar.get("base") == Some("0xfed90000"), "one unit at 0xfed90000");
    check(&run, dmar.num("width") == Some(48) && dmar.num("include_all") == Some(0), "48-bit, explicit scopes");
    check(&run, dmar.num("scopes") == Some(8), "8 device scopes");
    // The unit brought up with translation on and every device blocked
    // (a root table with no present entry), invalidated through its queue;
    // then `edu` made to read RAM: blocked and recorded against 00:03.0.
    let vtd = one(&run, "vtd");
    check(&run, vtd.num("enabled") == Some(1) && vtd.num("translating") == Some(1), "VT-d translating");
    check(&run, vtd.num("invalidations") == Some(3), "context-cache, IOTLB and wait descriptors");
    let probe = one(&run, "vtd-probe");
    check(&run, probe.get("device") == Some("00:03.0") && probe.num("done") == Some(1), "edu's DMA ran");
    check(&run, probe.get("dma") == Some("blocked") && probe.num("faults") == Some(1), "the DMA was blocked");
    let faults = run.hv("fault");
    check(&run, faults.len() == 3, "three DMA faults, all recorded");
    let fault = faults[0];
    check(&run, fault.get("kind") == Some("iommu") && fault.get("source") == Some("00:03.0"), "the fault names edu");
    check(&run, fault.get("reason") == Some("root-not-present") && fault.get("access") == Some("read"), "reason 1");
    check(&run, fault.get("addr") == Some("0x123000"), "the fault names the DMA's address");
    // Table sharing (item 6): edu given a table the EPT engine built. The
    // mapped page is read and written through it; a write to the page it
    // maps read-only and a read of a page it does not map are blocked.
    let shared = one(&run, "vtd-shared-table");
    check(&run, shared.get("table") == Some("ept") && shared.num("translated") == Some(1), "DMA through an EPT table");
    check(&run, shared.get("readonly_write") == Some("blocked"), "a write to a read-only page blocked");
    check(&run, shared.get("unmapped_read") == Some("blocked"), "a read of an unmapped page blocked");
    let reasons: Vec<&str> = faults[1..].iter().filter_map(|f| f.get("reason")).collect();
    check(&run, reasons == ["write-not-allowed", "read-not-allowed"], "reasons 5 and 6");
    check(&run, faults[1].get("addr") == Some("0x201000") && faults[2].get("addr") == Some("0x202000"), "their IOVAs");
    check(&run, run.exit_code == Some(0), "QEMU should exit 0 via ACPI S5");
    check(&run, one(&run, "boot").get("firmware") == Some("bios"), "SeaBIOS and GRUB for BIOS");
}

/// Issue 21 item 8: the same ISO started by OVMF (q35, QEMU TCG): GRUB's
/// EFI build loads the multiboot2 image, which finds ACPI through the RSDP
/// GRUB copied from the EFI configuration table, the VT-d unit in its
/// DMAR, and runs the SVM and VT-d probes as under SeaBIOS.
#[test]
fn x86_64_qemu_from_ovmf_finds_acpi_and_the_vt_d_unit() {
    let run = boot_from(Arch::X86_64, Machine::Qemu, 2, 256, true, Firmware::Uefi);
    check_boot(&run, "x86_64", 2);
    check(&run, one(&run, "boot").get("firmware") == Some("uefi"), "GRUB named the EFI system table");
    let dmar = one(&run, "dmar");
    check(&run, dmar.num("units") == Some(1) && dmar.get("base") == Some("0xfed90000"), "the DMAR through ACPI");
    check(&run, one(&run, "svm").num("svme_cpus") == Some(2), "both CPUs from the MADT, SVM on each");
    let vtd = one(&run, "vtd");
    check(&run, vtd.num("translating") == Some(1), "VT-d translating");
    check(&run, one(&run, "vtd-probe").get("dma") == Some("blocked"), "edu's DMA blocked");
    check(&run, one(&run, "vtd-shared-table").num("translated") == Some(1), "DMA through an EPT table");
}

#[test]
fn kvm_path_refuses_without_nested_vmx() {
    if let Err(why) = emulator::kvm_vmx_usable() {
        let image = build(Arch::X86_64);
        let spec = RunSpec::new("test-kvm-refusal", Machine::Kvm);
        let err = emulator::run(&image, &spec).expect_err("kvm must refuse here");
        let msg = err.to_string();
        assert!(msg.contains("--machine kvm refused") && msg.contains(&why), "unclear refusal: {msg}");
    } else {
        let run = boot(Arch::X86_64, Machine::Kvm, 2, 256);
        check_boot(&run, "x86_64", 2);
        check(&run, one(&run, "vmx").num("vmxon_cpus") == Some(2), "VMXON on both CPUs under KVM");
    }
}
