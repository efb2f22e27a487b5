//! x86_64 in long mode: multiboot2 entry, COM1 console, ACPI CPU
//! discovery, AP start-up and VMXON (or, on an AMD CPU without VT-x,
//! EFER.SVME) on every CPU, then the guests named by the multiboot2
//! modules, under VT-x with EPT or SVM with nested paging.

mod cpu;
mod exits;
mod guest;
mod live_update;
mod partitions;
mod platform;
mod run;
mod serial;
mod smp;
mod svm;
mod tsc;
mod vcpu;
mod vmcs;
mod vmx;
mod vtd;

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use alloc::boxed::Box;
use alloc::vec::Vec;
use hypervisor::arch::x86_64::cr::GuestCrPolicy;
use hypervisor::arch::x86_64::svm_caps::{SvmCaps, SvmError};
use hypervisor::arch::x86_64::vmx_caps::{ControlError, MissingFeature, VmcsControls, VmxCaps};
use hypervisor::live_update::rollback::Reason;
use hypervisor::{hv_event, println, BUILD_ID, VERSION};
use loader::acpi::{self, PhysMemory};
use loader::guest_modules::{self, detect_format};
use loader::manifest::ImageFormat;
use loader::PhysRange;
use loader::{multiboot2, BootInfo};
use platform::Backend;
use x86::io::{outb, outw};

global_asm!(
    include_str!("entry.S"),
    MAX_CPUS = const MAX_CPUS,
    AP_STACK_SIZE = const smp::STACK_SIZE,
    AP_STACKS = sym smp::AP_STACKS,
    options(att_syntax)
);

pub const MAX_CPUS: usize = 8;
/// Where a live update enters the image (`hv_handover_entry` in
/// `entry.S`, placed by `linker.ld` 0x100 into the image; named by the
/// image descriptor): in the slot the image is linked for (`HV_SLOT`).
pub const HANDOVER_ENTRY: u32 = {
    let slot = match option_env!("HV_SLOT") {
        Some(s) if !s.is_empty() && s.as_bytes()[0] == b'1' => 1,
        _ => 0,
    };
    (hypervisor::slots::X86_64.bases[slot] + 0x100) as u32
};
/// The boot page tables identity-map the low 4 GiB.
const MAPPED_LIMIT: u64 = 1 << 32;
/// Below 1 MiB live the real-mode IVT, the BIOS data areas and the AP
/// trampoline: never handed to guests.
const LOW_MEMORY: u64 = 1 << 20;
/// Room in scratch for a staged update image: a sealed x86_64 ELF with
/// its debug information is about 10 MiB.
const STAGING_BYTES: u64 = 16 << 20;
/// Bytes of a boot module read to tell its format.
const FORMAT_PROBE: u64 = 64;
/// The 8259A PICs' data ports: writing 0xff masks every line (OCW1), so
/// no legacy interrupt reaches the local APICs.
const PIC1_DATA: u16 = 0x21;
const PIC2_DATA: u16 = 0xa1;
const PIC_MASK_ALL: u8 = 0xff;

/// CPUs that executed VMXON successfully.
static VMXON_CPUS: AtomicUsize = AtomicUsize::new(0);
/// The boot CPU found no VT-x but SVM, and enabled it: the others enable
/// SVM too, and guests run under SVM.
static SVM_BACKEND: AtomicBool = AtomicBool::new(false);

/// Which devices the DMAR's first unit covers: all on its segment
/// (INCLUDE_PCI_ALL), or the single-hop PCI endpoints its device scopes
/// name (a scope behind a bridge needs bus numbers this image does not
/// enumerate, and is not counted: such a device is refused).
struct VtdScope {
    include_all: bool,
    endpoints: Vec<u16>,
}

static VTD_SCOPE: spin::Mutex<Option<VtdScope>> = spin::Mutex::new(None);

/// Whether the DMAR's first VT-d unit translates the DMA of requester id
/// `bdf` (VT-d spec §8.3: a DRHD covers the devices its scopes name, or
/// every device of its segment with INCLUDE_PCI_ALL).
pub(crate) fn vtd_covers(bdf: u16) -> bool {
    VTD_SCOPE.lock().as_ref().is_some_and(|s| s.include_all || s.endpoints.contains(&bdf))
}

/// The DMAR's first VT-d unit (register base, bytes), if there is one.
pub(crate) fn vtd_unit() -> Option<(u64, u64)> {
    match VTD_UNIT[0].load(Ordering::Relaxed) {
        0 => None,
        base => Some((base, VTD_UNIT[1].load(Ordering::Relaxed))),
    }
}

/// Whether guests run under SVM (else VT-x).
pub(crate) fn svm_backend() -> bool {
    SVM_BACKEND.load(Ordering::Acquire)
}
/// CPUs with EFER.SVME set and a host save area.
static SVME_CPUS: AtomicUsize = AtomicUsize::new(0);
/// The boot CPU is in VMX operation (a new image giving the machine back
/// leaves it first).
static BOOT_CPU_VMXON: AtomicBool = AtomicBool::new(false);

/// The BSP's local APIC ID, recorded as it starts (a parked CPU sends it
/// the rollback deadline's NMI).
static BSP_APIC_ID: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

pub(crate) fn bsp_apic_id() -> u32 {
    BSP_APIC_ID.load(Ordering::Relaxed)
}

/// CPUs parked for an update that was rolled back are about to come
/// back through `hv_ap_main`, which counts them online again.
pub(crate) fn rejoining(cpus: usize) {
    smp::ONLINE.fetch_sub(cpus, Ordering::AcqRel);
    VMXON_CPUS.fetch_sub(cpus, Ordering::AcqRel);
}

/// Whether the boot CPU entered VMX operation.
pub(crate) fn vmx_on_boot_cpu() -> bool {
    BOOT_CPU_VMXON.load(Ordering::Acquire)
}

/// A panic in a new image before it committed: the machine goes back to
/// the old image (returns if there is no way back).
pub fn give_back_on_panic(info: &core::panic::PanicInfo<'_>) {
    live_update::give_back(Reason::Panic, info);
}
/// Which CPU indices are up and in VMX root operation (the boot CPU is 0).
static CPU_READY: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

extern "C" {
    static __image_start: u8;
    static __rodata_end: u8;
    static __image_end: u8;
}

/// Bochs ends the simulation when "Shutdown" is written to port 0x8900.
const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;
/// QEMU's PIIX4/ICH9 ACPI PM1a control block: SLP_TYP=S5 | SLP_EN.
const QEMU_PM1A_CNT: u16 = 0x604;
const QEMU_S5: u16 = 0x2000;

/// Powers the emulator off; halts forever if neither exit port works.
pub fn shutdown(_ok: bool) -> ! {
    hypervisor::console::flush();
    // SAFETY: port writes to the emulators' power-off ports; on hardware
    // without them they are ignored.
    unsafe {
        for b in b"Shutdown" {
            outb(BOCHS_SHUTDOWN_PORT, *b);
        }
        outw(QEMU_PM1A_CNT, QEMU_S5);
    }
    halt_forever()
}

pub(crate) fn halt_forever() -> ! {
    loop {
        // SAFETY: cli; hlt stops this CPU; nothing is left to run.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Busy-waits roughly `us` microseconds: an I/O write to port 0x80 takes
/// about 1 µs on PC hardware (the classic ISA delay).
pub fn delay_us(us: u64) {
    for _ in 0..us {
        // SAFETY: port 0x80 is the POST diagnostic port; writes are harmless.
        unsafe { outb(0x80, 0) };
    }
}

/// Fails the boot with an event (its cause, if it has one, on the line
/// before: `{:#}`) and powers off.
fn fail(reason: impl core::fmt::Display) -> ! {
    // A new image that cannot come up gives the machine back, if it can.
    live_update::give_back(Reason::RestoreFailed, &reason);
    println!("boot failed: {reason:#}");
    hv_event!("boot-failed", reason = reason);
    hv_event!("shutdown", status = "error");
    shutdown(false)
}

/// Physical memory as the boot page tables map it: identity, low 4 GiB.
struct LowMemory;

impl PhysMemory for LowMemory {
    fn bytes(&self, phys: u64, len: usize) -> Option<&[u8]> {
        let end = phys.checked_add(len as u64)?;
        if phys == 0 || end > MAPPED_LIMIT {
            return None;
        }
        // SAFETY: [phys, end) is inside the identity-mapped low 4 GiB and
        // only read; firmware tables are not written by anyone while we run.
        Some(unsafe { core::slice::from_raw_parts(phys as *const u8, len) })
    }
}

/// Heap, exception vectors and the console: the first steps of both
/// entries.
fn early_init() {
    crate::heap::init();
    cpu::install_idt();
    BSP_APIC_ID.store(smp::my_apic_id(), Ordering::Relaxed);
    // No interrupt is wanted from the PICs (guests' I/O never reaches
    // them), and under SVM the host takes interrupts after each exit,
    // whose vectors must be its own (a BIOS's PIC delivers IRQ 0 at
    // vector 8).
    // SAFETY: port writes to the PICs' mask registers only.
    unsafe {
        outb(PIC1_DATA, PIC_MASK_ALL);
        outb(PIC2_DATA, PIC_MASK_ALL);
    }
    // SAFETY: the only COM1 owner.
    let console = Box::leak(Box::new(unsafe { serial::Com1::new() }));
    hypervisor::console::set_uart(console);
}

/// The multiboot2 information at `mbi_phys` (GRUB's, or the preserved
/// copy after an update), parsed, with the CPUs from the ACPI MADT.
fn platform(magic: u32, mbi_phys: u64, first_boot: bool) -> (BootInfo, acpi::MadtCpus, PhysRange) {
    let mbi_len = LowMemory.bytes(mbi_phys, 8).map_or(0, |h| u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize);
    let len = mbi_len.min(multiboot2::MAX_MBI_SIZE);
    let Some(mbi) = LowMemory.bytes(mbi_phys, len) else { fail("boot-information-unreadable") };
    let (info, platform) = match multiboot2::parse(magic, mbi, mbi_phys) {
        Ok(v) => v,
        Err(e) => {
            println!("multiboot2: {e}");
            fail("bad-multiboot2-information")
        }
    };
    let cpus = match acpi::discover_cpus(&LowMemory, platform.rsdp.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            println!("acpi: {e}");
            fail("acpi-madt")
        }
    };
    // After an update too: the VT-d unit a handover names is checked
    // against the DMAR's (reported at first boot only).
    report_dmar(platform.rsdp.as_ref(), first_boot);
    if first_boot {
        BOOTED_FROM_UEFI.store(platform.efi_system_table.is_some(), Ordering::Relaxed);
    }
    (info, cpus, PhysRange::new(mbi_phys, len as u64))
}

/// Whether the boot loader ran on UEFI firmware (the multiboot2
/// information names an EFI system table), for `hv: boot firmware=`.
static BOOTED_FROM_UEFI: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// The register base and size of the first VT-d unit the DMAR names
/// (base 0: none).
static VTD_UNIT: [core::sync::atomic::AtomicU64; 2] =
    [core::sync::atomic::AtomicU64::new(0), core::sync::atomic::AtomicU64::new(0)];

/// The VT-d remapping hardware the ACPI DMAR table describes (issue 20):
/// reported (if `report`), and its first unit kept for the guests' devices
/// and [`vtd::bring_up_and_probe`].
fn report_dmar(rsdp: Option<&loader::multiboot2::RsdpCopy>, report: bool) {
    let table = match acpi::find_table(&LowMemory, rsdp, *b"DMAR") {
        Ok(Some(t)) => t,
        Ok(None) => return,
        Err(e) => {
            println!("acpi: {e}");
            return;
        }
    };
    match loader::dmar::parse(table) {
        Ok(d) => {
            if let Some(u) = d.units.first() {
                VTD_UNIT[0].store(u.register_base, Ordering::Relaxed);
                VTD_UNIT[1].store(u.register_bytes, Ordering::Relaxed);
                let endpoints = u
                    .scopes
                    .iter()
                    .filter(|s| s.kind == loader::dmar::ScopeKind::PciEndpoint)
                    .filter_map(loader::dmar::DeviceScope::requester_id)
                    .collect();
                *VTD_SCOPE.lock() = Some(VtdScope { include_all: u.include_pci_all, endpoints });
            }
            if !report {
                return;
            }
            let scopes: usize = d.units.iter().map(|u| u.scopes.len()).sum();
            hv_event!(
                "dmar",
                width = d.host_address_width,
                flags = format_args!("{:#x}", d.flags),
                units = d.units.len(),
                base = format_args!("{:#x}", d.units.first().map_or(0, |u| u.register_base)),
                include_all = u8::from(d.units.first().is_some_and(|u| u.include_pci_all)),
                scopes = scopes,
                rmrrs = d.reserved.len(),
                other = d.other_structures,
            );
        }
        Err(e) => hv_event!("dmar", refused = e),
    }
}

/// Starts every other CPU (they run `hv_ap_main`): those the previous
/// image parked (a live update's direct handover) by writing
/// `hv_ap_parked_entry` into their mailbox word, the others with
/// INIT-SIPI-SIPI. CPU indices follow the MADT's order, as in every image.
fn start_aps(info: &BootInfo, cpus: &acpi::MadtCpus, parked: Option<&live_update::Parked>) {
    extern "C" {
        fn hv_ap_parked_entry() -> !;
    }
    let trampoline = PhysRange::new(smp::TRAMPOLINE, 0x1000);
    let trampoline_free =
        info.ram.iter().any(|r| r.contains(&trampoline)) && !info.reserved.iter().any(|r| r.overlaps(&trampoline));
    let me = smp::my_apic_id();
    for (index, &apic_id) in (1..).zip(cpus.apic_ids.iter().filter(|&&id| id != me)) {
        if let Some(word) = parked.and_then(|p| p.word(index)) {
            if !smp::release_parked(word, hv_ap_parked_entry as *const () as u64) {
                hv_event!("ap-start-failed", apic_id = apic_id, reason = "parked-cpu-timeout");
            }
            continue;
        }
        if !trampoline_free {
            hv_event!("ap-start-failed", apic_id = apic_id, reason = "trampoline-page-not-free");
            break;
        }
        if !smp::start_ap(apic_id, index, hv_ap_main) {
            hv_event!("ap-start-failed", apic_id = apic_id, reason = "timeout");
        }
    }
}

/// What the image and the platform occupy: never handed out.
fn reserved(info: &BootInfo) -> Vec<PhysRange> {
    let mut reserved = info.reserved.clone();
    // Both image slots (`hypervisor::slots`): a new image is put in one
    // of them, so copying it never touches anything preserved.
    reserved.extend(hypervisor::slots::X86_64.ranges());
    reserved.push(PhysRange::new(0, LOW_MEMORY));
    reserved.push(PhysRange::new(MAPPED_LIMIT, u64::MAX - MAPPED_LIMIT));
    reserved
}

/// The live-update entry (`hv_handover_entry` in `entry.S`): the previous
/// image kexeced into this one. Adopt its guests instead of booting them.
#[no_mangle]
extern "C" fn hv_x86_handover(handover: u64, mbi_phys: u64, kexec_tsc: u64, rollback: u64) -> ! {
    let entry_tsc = tsc::now();
    early_init();
    live_update::arm_give_back(rollback);
    // The guests are paused: what the restore prints goes out once they
    // run again (at 115200 baud a restore's lines take some 60 ms).
    hypervisor::console::hold();
    hypervisor::live_update::REPORT.note_entry(kexec_tsc, entry_tsc);
    println!("hypervisor {VERSION} ({BUILD_ID}) starting in long mode (live update)");
    live_update::mark("console");
    let (info, cpus, mbi) = platform(multiboot2::BOOTLOADER_MAGIC, mbi_phys, false);
    live_update::mark("platform");
    let caps = match vmx::enable(0) {
        Ok(caps) => {
            VMXON_CPUS.fetch_add(1, Ordering::AcqRel);
            BOOT_CPU_VMXON.store(true, Ordering::Release);
            live_update::BackendCaps::Vmx(caps)
        }
        Err(e) => match svm::enable(0) {
            Ok(caps) => {
                // Before the other CPUs start: they enable SVM too.
                SVM_BACKEND.store(true, Ordering::Release);
                SVME_CPUS.fetch_add(1, Ordering::AcqRel);
                live_update::BackendCaps::Svm(caps)
            }
            Err(s) => {
                println!("vmx: {}; svm: {}", e.reason(), s.reason());
                fail("vmx-unavailable-after-update")
            }
        },
    };
    CPU_READY[0].store(true, Ordering::Release);
    live_update::mark("vmx");
    let start_cpus = |parked: Option<&live_update::Parked>| {
        start_aps(&info, &cpus, parked);
        (0..MAX_CPUS).filter(|&c| CPU_READY[c].load(Ordering::Acquire)).collect()
    };
    let spec = live_update::RestoreSpec { info: &info, reserved: reserved(&info), caps, mbi };
    match live_update::restore(handover, spec, start_cpus) {
        Ok(0) => fail("handover-has-no-partitions"),
        Ok(_) => {}
        Err(reason) => {
            let why = match reason {
                live_update::RestoreFailure::Handover(_) => Reason::HandoverRefused,
                _ => Reason::RestoreFailed,
            };
            live_update::give_back(why, &reason);
            fail(reason)
        }
    }
    run::release_secondaries();
    run::run_cpu(0)
}

#[no_mangle]
extern "C" fn hv_x86_main(magic: u32, mbi_phys: u32) -> ! {
    early_init();
    println!("hypervisor {VERSION} ({BUILD_ID}) starting in long mode");
    let (info, cpus, mbi) = platform(magic, u64::from(mbi_phys), true);

    let vmx = vmx::enable(0);
    // Without VT-x, an AMD CPU's SVM: the other CPUs enable it as they
    // come up.
    let svm = vmx.is_err().then(|| svm::enable(0));
    if let Some(Ok(_)) = svm {
        SVM_BACKEND.store(true, Ordering::Release);
        SVME_CPUS.fetch_add(1, Ordering::AcqRel);
        CPU_READY[0].store(true, Ordering::Release);
    }
    if vmx.is_ok() {
        VMXON_CPUS.fetch_add(1, Ordering::AcqRel);
        CPU_READY[0].store(true, Ordering::Release);
        let m = vmx::read_msrs();
        hv_event!(
            "vmx-msrs",
            basic = format_args!("{:#x}", m.basic),
            procbased = format_args!("{:#x}", m.procbased),
            procbased2 = format_args!("{:#x}", m.procbased2),
            ept_vpid = format_args!("{:#x}", m.ept_vpid),
            pinbased = format_args!("{:#x}", m.pinbased),
            exit = format_args!("{:#x}", m.exit),
            entry = format_args!("{:#x}", m.entry),
            misc = format_args!("{:#x}", m.misc),
            cr0_fixed = format_args!("{:#x}/{:#x}", m.cr0_fixed0, m.cr0_fixed1),
            cr4_fixed = format_args!("{:#x}/{:#x}", m.cr4_fixed0, m.cr4_fixed1),
        );
    }

    start_aps(&info, &cpus, None);

    hv_event!(
        "boot",
        arch = "x86_64",
        version = VERSION,
        build = BUILD_ID,
        cpus = smp::ONLINE.load(Ordering::Acquire),
        mem_mib = info.ram_mib(),
        firmware = if BOOTED_FROM_UEFI.load(Ordering::Relaxed) { "uefi" } else { "bios" },
    );
    let caps = match vmx {
        Ok(caps) => {
            report_vmx(&caps);
            caps
        }
        Err(e) => {
            hv_event!("vmx", available = 0, reason = e.reason());
            let svm_caps = report_svm(svm);
            if let (Some(caps), false) = (svm_caps, info.modules.is_empty()) {
                match start_guests(&info, mbi, svm_backend_of(caps, true)) {
                    Ok(0) => fail("no-guest-could-start"),
                    Ok(_) => {}
                    Err(reason) => fail(reason),
                }
                run::release_secondaries();
                run::run_cpu(0)
            }
            if svm_caps.is_some() {
                report_first_svm_guest();
            }
            // No guests: the first SVM guest ran; the VT-d
            // unit is brought up blocking every device, and probed, with
            // throw-away pages.
            if svm_caps.is_none() && !info.modules.is_empty() {
                hv_event!("no-guests", reason = "no-vmx-or-svm");
            }
            let unit = VTD_UNIT[0].load(Ordering::Relaxed);
            if unit != 0 {
                let mut frames =
                    hypervisor::frames::FrameAllocator::new(&hypervisor::frames::subtract(&info.ram, &reserved(&info)));
                vtd::bring_up_and_probe(unit, VTD_UNIT[1].load(Ordering::Relaxed), &mut frames);
            }
            hv_event!("shutdown", status = "ok");
            shutdown(true)
        }
    };
    if info.modules.is_empty() {
        hv_event!("no-guests", reason = "no-boot-modules");
        vmx::disable();
        hv_event!("shutdown", status = "ok");
        shutdown(true)
    }
    match vmx_backend_of(&caps).and_then(|backend| start_guests(&info, mbi, backend)) {
        Ok(0) => fail("no-guest-could-start"),
        Ok(_) => {}
        Err(reason) => fail(reason),
    }
    run::release_secondaries();
    run::run_cpu(0)
}

/// The running image's physical extent (text to the end of bss).
pub(crate) fn image_range() -> PhysRange {
    // SAFETY: linker-script symbols; only their addresses are used.
    let (start, end) =
        unsafe { (core::ptr::from_ref(&__image_start) as u64, core::ptr::from_ref(&__image_end) as u64) };
    PhysRange::new(start, end - start)
}

/// The image's code and read-only data (what the handoff record hashes).
pub(crate) fn code_range() -> PhysRange {
    // SAFETY: linker-script symbols; only their addresses are used.
    let (start, end) =
        unsafe { (core::ptr::from_ref(&__image_start) as u64, core::ptr::from_ref(&__rodata_end) as u64) };
    PhysRange::new(start, end - start)
}

/// Reads the guests from the boot modules, checks what VMX offers against
/// what they need, and builds the partitions. Returns how many started.
/// Why the first boot cannot start the guests.
#[derive(Debug)]
enum BootError {
    Modules(guest_modules::ModuleError),
    MissingFeature(MissingFeature),
    VmxControls(ControlError),
    TscCalibration,
    NoRoomForScratch,
    OutOfMemory,
    /// The SVM backend bounds slices with the local APIC timer, which
    /// did not count.
    NoSliceTimer,
}

impl core::fmt::Display for BootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Modules(e) => f.write_str(e.reason()),
            Self::MissingFeature(m) => f.write_str(m.reason()),
            Self::VmxControls(e) if f.alternate() => write!(f, "vmx-controls-unsupported: {e}"),
            Self::VmxControls(_) => f.write_str("vmx-controls-unsupported"),
            Self::TscCalibration => f.write_str("tsc-calibration-failed"),
            Self::NoRoomForScratch => f.write_str("no-room-for-scratch"),
            Self::OutOfMemory => f.write_str("out-of-memory"),
            Self::NoSliceTimer => f.write_str("apic-timer-does-not-count"),
        }
    }
}

/// The VT-x backend: what VMX offers checked against what the guests
/// need, and the VMCS controls resolved.
fn vmx_backend_of(caps: &VmxCaps) -> Result<(Backend, GuestCrPolicy), BootError> {
    caps.check_guest_support().map_err(BootError::MissingFeature)?;
    let msrs = vmx::read_msrs();
    let controls = VmcsControls::resolve(&msrs).map_err(BootError::VmxControls)?;
    hv_event!(
        "vmcs-controls",
        pin = format_args!("{:#x}", controls.pin),
        proc = format_args!("{:#x}", controls.proc),
        proc2 = format_args!("{:#x}", controls.proc2),
        exit = format_args!("{:#x}", controls.exit),
        entry = format_args!("{:#x}", controls.entry),
    );
    Ok((Backend::Vmx { caps: *caps, controls }, GuestCrPolicy::new(&msrs)))
}

/// The SVM backend: the permission maps, and the CR rules of a processor
/// that pins no CR0 bit, with the CR4 bits its CPUID offers (reported if
/// `report`).
pub(crate) fn svm_backend_of(caps: SvmCaps, report: bool) -> (Backend, GuestCrPolicy) {
    let (iopm, msrpm) = svm::permission_maps();
    let leaf1 = raw_cpuid::cpuid!(1);
    let leaf7 = raw_cpuid::cpuid!(7, 0);
    let cr4 = hypervisor::arch::x86_64::cr::cr4_supported(leaf1.edx, leaf7.ebx, leaf7.ecx);
    // Reported at first boot only: a restore's lines wait for the guests.
    if report {
        hv_event!("svm-backend", asids = caps.asids, cr4_supported = format_args!("{cr4:#x}"));
    }
    (Backend::Svm { caps, iopm, msrpm }, GuestCrPolicy::unpinned(cr4))
}

/// Reads the guests from the boot modules and builds their partitions
/// under `backend`. Returns how many started.
fn start_guests(
    info: &BootInfo,
    mbi: PhysRange,
    (backend, cr_policy): (Backend, GuestCrPolicy),
) -> Result<usize, BootError> {
    let specs = guest_modules::guests_from_modules(&info.modules, |range| {
        LowMemory.bytes(range.base, range.size.min(FORMAT_PROBE) as usize).map_or(ImageFormat::Flat, detect_format)
    })
    .map_err(|e| {
        println!("boot modules: {e}");
        BootError::Modules(e)
    })?;
    let tsc_hz = tsc::calibrate().ok_or(BootError::TscCalibration)?;
    match backend {
        Backend::Vmx { caps, .. } => {
            hv_event!("tsc", hz = tsc_hz, preemption_timer_shift = caps.preemption_timer_shift);
        }
        Backend::Svm { .. } => {
            let apic_hz = svm::calibrate_slice_timer(tsc_hz).ok_or(BootError::NoSliceTimer)?;
            hv_event!("tsc", hz = tsc_hz, slice_timer = svm::slice_timer_mode(), apic_timer_hz = apic_hz);
        }
    }
    let mut reserved = reserved(info);
    // Scratch: where an update image is staged, never preserved.
    let scratch = hypervisor::live_update::reserve_scratch(&info.ram, &mut reserved, STAGING_BYTES)
        .ok_or(BootError::NoRoomForScratch)?;
    let free = hypervisor::frames::subtract(&info.ram, &reserved);
    let mut frames = hypervisor::frames::FrameAllocator::new(&free);
    // The multiboot2 information goes with every update (RAM map, ACPI):
    // GRUB left it in memory nobody keeps, so it gets a preserved copy.
    let mbi_copy =
        frames.alloc_block(mbi.size.next_multiple_of(hypervisor::frames::PAGE_SIZE)).ok_or(BootError::OutOfMemory)?;
    // SAFETY: GRUB's information (read-only, identity-mapped) into a block
    // just allocated for it.
    unsafe { core::ptr::copy_nonoverlapping(mbi.base as *const u8, mbi_copy.base as *mut u8, mbi.size as usize) };
    let cpus: Vec<usize> = (0..MAX_CPUS).filter(|&c| CPU_READY[c].load(Ordering::Acquire)).collect();
    Ok(partitions::create(partitions::MachineSpec {
        specs: &specs,
        ram: &info.ram,
        frames,
        cpus: &cpus,
        backend,
        cr_policy,
        tsc_hz,
        scratch,
        mbi: mbi_copy,
        vtd_unit: vtd_unit(),
    }))
}

/// What the boot CPU found of SVM, on a machine without VT-x; with
/// nothing to run, the first SVM guest runs to show VMRUN works. Returns
/// the capabilities if guests can run under SVM.
fn report_svm(svm: Option<Result<SvmCaps, SvmError>>) -> Option<SvmCaps> {
    let svm = svm?;
    match svm {
        Ok(caps) => {
            hv_event!(
                "svm",
                available = 1,
                revision = caps.revision,
                asids = caps.asids,
                npt = u8::from(caps.npt()),
                nrip = u8::from(caps.nrip()),
                vmcb_clean = u8::from(caps.vmcb_clean()),
                flush_by_asid = u8::from(caps.flush_by_asid()),
                decode_assists = u8::from(caps.decode_assists()),
                vgif = u8::from(caps.vgif()),
                edx = format_args!("{:#x}", caps.features),
                guest_support = caps.check_guest_support().err().map_or("ok", SvmError::reason),
                svme_cpus = SVME_CPUS.load(Ordering::Acquire),
            );
            caps.check_guest_support().ok()?;
            Some(caps)
        }
        Err(e) => {
            hv_event!("svm", available = 0, reason = e.reason());
            None
        }
    }
}

/// The first SVM guest (`svm::first_guest`), reported.
fn report_first_svm_guest() {
    match svm::first_guest(0) {
        Ok(g) => {
            let mut exits = alloc::string::String::new();
            for (k, e) in g.exits.iter().flatten().enumerate() {
                exits.push_str(if k == 0 { "" } else { "," });
                exits.push_str(e.name());
            }
            hv_event!(
                "svm-first-guest",
                exits = exits,
                npf_gpa = format_args!("{:#x}", g.fault_gpa.unwrap_or(0)),
                halted_at = format_args!("{:#x}", g.halted_at.unwrap_or(0)),
            );
        }
        Err(why) => hv_event!("svm-first-guest", failed = why),
    }
}

fn report_vmx(caps: &VmxCaps) {
    hv_event!(
        "vmx",
        available = 1,
        ept = u8::from(caps.ept),
        vpid = u8::from(caps.vpid),
        unrestricted = u8::from(caps.unrestricted_guest),
        ept_2m = u8::from(caps.ept_2m),
        ept_1g = u8::from(caps.ept_1g),
        revision = format_args!("{:#x}", caps.revision),
        vmxon_cpus = VMXON_CPUS.load(Ordering::Acquire),
    );
}

/// An AP's start in this image, CPU `index`: from the INIT-SIPI-SIPI
/// trampoline or from a previous image's parking mailbox
/// (`hv_ap_parked_entry`).
#[no_mangle]
extern "C" fn hv_ap_main(index: u64) -> ! {
    cpu::load_idt();
    let cpu = index as usize;
    if SVM_BACKEND.load(Ordering::Acquire) {
        let svme = svm::enable(cpu).is_ok();
        if svme {
            SVME_CPUS.fetch_add(1, Ordering::AcqRel);
        }
        if let (true, Some(ready)) = (svme, CPU_READY.get(cpu)) {
            ready.store(true, Ordering::Release);
        }
        let online = smp::ONLINE.fetch_add(1, Ordering::AcqRel) + 1;
        hv_event!("cpu-online", cpu = index, apic_id = smp::my_apic_id(), online = online, svme = u8::from(svme));
        if !svme {
            halt_forever()
        }
        // Wait for the boot CPU to build the partitions (or power off).
        while !run::started() {
            core::hint::spin_loop();
        }
        run::run_cpu(cpu)
    }
    let vmx = vmx::enable(cpu);
    if vmx.is_ok() {
        VMXON_CPUS.fetch_add(1, Ordering::AcqRel);
        if let Some(ready) = CPU_READY.get(cpu) {
            ready.store(true, Ordering::Release);
        }
    }
    let online = smp::ONLINE.fetch_add(1, Ordering::AcqRel) + 1;
    hv_event!("cpu-online", cpu = index, apic_id = smp::my_apic_id(), online = online, vmxon = u8::from(vmx.is_ok()));
    if vmx.is_err() {
        halt_forever()
    }
    // Wait for the boot CPU to build the partitions (or power off).
    while !run::started() {
        core::hint::spin_loop();
    }
    run::run_cpu(cpu)
}
