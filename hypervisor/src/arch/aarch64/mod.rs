//! aarch64 at EL2 (non-VHE): entry, console, PSCI, the EL2 stage-1 map.

mod cpu;
mod devices;
mod efi;
mod exits;
mod gic;
mod live_update;
mod mmu;
mod partitions;
mod pl011;
mod platform;
mod prepare;

pub use prepare::PREPARE_ENTRY;
mod psci;
mod smmu;
mod vcpu;

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use alloc::boxed::Box;
use hypervisor::live_update::rollback::Reason;
use hypervisor::{hv_event, println, BUILD_ID, VERSION};
use loader::dtb::{self, DtbPlatform, PsciConduit};
use loader::uefi::MemorySummary;
use loader::{BootInfo, PhysRange};

global_asm!(include_str!("entry.S"));
global_asm!(include_str!("mem.S"));

/// Must match `MAX_CPUS` and `STACK_SIZE` in entry.S.
const MAX_CPUS: usize = 8;
const STACK_SIZE: usize = 0x1_0000;
/// How long the boot CPU waits for a secondary to come up.
const CPU_ON_TIMEOUT_MS: u64 = 1000;

extern "C" {
    static __image_start: u8;
    static __text_end: u8;
    static __rodata_end: u8;
    static __image_end: u8;
    static __stacks_bottom: u8;
    static __stacks_top: u8;
    fn secondary_entry();
}

static CPUS_ONLINE: AtomicUsize = AtomicUsize::new(1);
/// Bit per CPU index that came up (the boot CPU's is set at boot).
static ONLINE_MASK: AtomicU32 = AtomicU32::new(0);

/// The indices of the CPUs that came up, in order.
fn online_cpus() -> alloc::vec::Vec<usize> {
    let mask = ONLINE_MASK.load(Ordering::Acquire);
    (0..MAX_CPUS).filter(|&i| mask & (1 << i) != 0).collect()
}

fn sym(s: &u8) -> u64 {
    core::ptr::from_ref(s) as u64
}

/// Stops this CPU for good.
pub(crate) fn park() -> ! {
    loop {
        // SAFETY: wfe only waits for an event.
        unsafe { asm!("wfe", options(nomem, nostack)) };
    }
}

/// Powers the machine off (PSCI SYSTEM_OFF); parks if PSCI is unavailable.
pub fn shutdown(_ok: bool) -> ! {
    hypervisor::console::flush();
    let _ = psci::call(psci::SYSTEM_OFF, 0, 0, 0);
    park()
}

pub(crate) fn counter() -> (u64, u64) {
    let (cnt, freq): (u64, u64);
    // SAFETY: reading the generic timer's counter and frequency has no side effects.
    unsafe {
        asm!("isb", "mrs {0}, cntpct_el0", "mrs {1}, cntfrq_el0", out(reg) cnt, out(reg) freq, options(nomem, nostack));
    }
    (cnt, freq)
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

/// A panic while the old image prepares this one in the brownout: back
/// to the old image, which goes on without the preparation. Returns if
/// this image is not preparing.
pub fn abort_if_preparing() {
    prepare::abort_if_preparing();
}

/// A panic in a new image before it committed: the machine goes back to
/// the old image (returns if there is no way back).
pub fn give_back_on_panic(info: &core::panic::PanicInfo<'_>) {
    live_update::give_back(Reason::Panic, info);
}

/// What the boot CPU starts from: the DTB read, the CRC-32 instructions
/// checked, and the EL2 map if it is already built.
struct Start {
    parsed: Result<(BootInfo, DtbPlatform, Option<MemorySummary>), DescribeError>,
    crc32_instructions: bool,
    map: Option<mmu::HostMap>,
    /// Taken from a brownout preparation (`prepare.rs`).
    prepared: bool,
}

/// After a live update the previous image may have prepared this one in
/// the brownout (the DTB read, the EL2 map built): taken if it was made for
/// this DTB. Otherwise the heap, the CRC-32 instructions and the DTB now.
fn start(dtb_phys: u64, handover_phys: u64) -> Start {
    if let Some(p) = (handover_phys != 0).then(|| prepare::take(dtb_phys)).flatten() {
        return Start {
            parsed: Ok((p.info, p.platform, None)),
            crc32_instructions: p.crc32_instructions,
            map: Some(p.map),
            prepared: true,
        };
    }
    crate::heap::init();
    let crc32_instructions = enable_crc32_instructions();
    let parsed = describe(dtb_phys);
    Start { parsed, crc32_instructions, map: None, prepared: false }
}

/// Why the machine description at entry cannot be used.
/// (Nothing can report it: the console is in the description.)
#[derive(Debug)]
pub(crate) enum DescribeError {
    Dtb,
    Uefi,
}

/// The machine as the boot protocol's x0 describes it: a DTB, or the UEFI
/// boot record the EFI entry left (`efi.rs`; so after every live update
/// that followed a UEFI boot), with what its memory map gave.
pub(crate) fn describe(phys: u64) -> Result<(BootInfo, DtbPlatform, Option<MemorySummary>), DescribeError> {
    if efi::is_record(phys) {
        return efi::describe(phys)
            .map(|(info, platform, m)| (info, platform, Some(m)))
            .map_err(|_| DescribeError::Uefi);
    }
    dtb_blob(phys)
        .ok_or(dtb::DtbError::TooShort)
        .and_then(|blob| dtb::parse(blob, phys))
        .map(|(info, platform)| (info, platform, None))
        .map_err(|_| DescribeError::Dtb)
}

/// `rollback`: the old image's rollback entry, if the live update that
/// started this image carried one (`kho/ABI.md` §5.2), else 0.
#[no_mangle]
extern "C" fn hv_primary_main(dtb_phys: u64, handover_phys: u64, kexec_counter: u64, rollback: u64) -> ! {
    if handover_phys != 0 {
        live_update::note_entry(kexec_counter);
        live_update::arm_give_back(rollback);
    }
    let Start { parsed, crc32_instructions, map, prepared } = start(dtb_phys, handover_phys);
    live_update::set_dtb(dtb_phys);
    if handover_phys != 0 {
        live_update::mark("dtb");
    }
    // Without a DTB there is no known console; nothing can be reported.
    let Ok((info, platform, uefi_memory)) = parsed else { park() };
    let Some(uart) = platform.uart else { park() };
    // SAFETY: the DTB names this PL011; nothing else drives it.
    let console = Box::leak(Box::new(unsafe { pl011::Pl011::new(uart.base as usize) }));
    hypervisor::console::set_uart(console);
    if handover_phys != 0 {
        // The guests are paused: what the restore prints goes out once
        // they run again.
        hypervisor::console::hold();
    }
    println!("hypervisor {VERSION} ({BUILD_ID}) starting at EL2");
    if handover_phys != 0 {
        hv_event!("update-entry", prepared = u8::from(prepared));
    }
    match platform.psci {
        Some(PsciConduit::Smc) => psci::enable_smc(),
        Some(PsciConduit::Hvc) => fail("psci-conduit-hvc-unusable-at-el2"),
        None => fail("no-psci"),
    }
    match map.map_or_else(|| build_host_map(&info, &platform), Ok) {
        Ok(map) => {
            forget_stale_lines(prepared);
            map.activate();
        }
        Err(reason) => fail(reason),
    }
    if handover_phys != 0 {
        live_update::mark("host-map");
    }
    for (i, &c) in platform.cpus.iter().enumerate().take(MAX_CPUS) {
        platform::set_cpu(i, c);
    }
    ONLINE_MASK.fetch_or(1 << boot_cpu_index(&platform), Ordering::AcqRel);
    if handover_phys == 0 {
        start_secondaries(&platform, None);
    }
    let Some(gic) = platform.gic else { fail("no-gic") };
    gic::init_distributor(gic.distributor.base, gic.redistributors.base, gic.redistributors.size);
    if handover_phys != 0 {
        // A live update brought us here: adopt instead of booting afresh.
        let mut reserved = info.reserved.clone();
        reserved.extend(image_slots());
        let start_cpus = |handoff: Option<&live_update::Parked>| {
            start_secondaries(&platform, handoff);
            online_cpus()
        };
        match live_update::restore(handover_phys, &info, &platform, start_cpus, reserved) {
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
        cpu::release_secondaries();
        cpu::run_cpu(boot_cpu_index(&platform), 0)
    }
    report_boot(dtb_phys, &info, &platform, crc32_instructions, uefi_memory);
    let Some(manifest_addr) = loader::manifest::address_from_cmdline(&info.cmdline) else {
        hv_event!("no-guests", reason = "no-manifest-on-command-line");
        hv_event!("shutdown", status = "ok");
        shutdown(true)
    };
    let started = match start_guests(manifest_addr, &info, &platform) {
        Ok(n) => n,
        Err(reason) => fail(reason),
    };
    if started == 0 {
        fail("no-guest-could-start");
    }
    cpu::release_secondaries();
    cpu::run_cpu(boot_cpu_index(&platform), 0)
}

/// The first boot's events: `boot`, what a UEFI memory map gave (if the
/// machine was described by the UEFI boot record at `dtb_phys`), and the
/// platform.
fn report_boot(
    dtb_phys: u64,
    info: &BootInfo,
    platform: &DtbPlatform,
    crc32_instructions: bool,
    uefi_memory: Option<MemorySummary>,
) {
    hv_event!(
        "boot",
        arch = "aarch64",
        version = VERSION,
        build = BUILD_ID,
        cpus = CPUS_ONLINE.load(Ordering::Acquire),
        mem_mib = info.ram_mib(),
        crc32 = if crc32_instructions { "instructions" } else { "tables" },
        firmware = if uefi_memory.is_some() { "uefi" } else { "dtb" },
    );
    if let Some(m) = uefi_memory {
        // The boot-time plan of a UEFI boot: what the memory map gave.
        hv_event!(
            "uefi-memory",
            record = format_args!("{dtb_phys:#x}"),
            descriptors = m.descriptors,
            usable_mib = m.usable >> 20,
            firmware_kib = m.firmware >> 10,
            other_kib = m.other >> 10,
            reserved = info.reserved.len(),
            exit_attempts = efi::exit_attempts().unwrap_or(0),
        );
    }
    hv_event!(
        "platform",
        cpus_described = platform.cpus.len(),
        uart = format_args!("{:#x}", platform.uart.map_or(0, |u| u.base)),
        gicd = format_args!("{:#x}", platform.gic.map_or(0, |g| g.distributor.base)),
        psci = "smc",
        el = 2,
    );
}

/// The running image's physical extent (text to the end of bss).
fn image_range() -> PhysRange {
    // SAFETY: linker-script symbols; only their addresses are used.
    let (start, end) = unsafe { (sym(&__image_start), sym(&__image_end)) };
    PhysRange::new(start, end - start)
}

/// The image's code and read-only data (what the handoff record hashes).
fn code_range() -> PhysRange {
    // SAFETY: linker-script symbols; only their addresses are used.
    let (start, end) = unsafe { (sym(&__image_start), sym(&__rodata_end)) };
    PhysRange::new(start, end - start)
}

/// The image slots (`hypervisor::slots`): reserved for hypervisor images
/// at every boot, so a live update stages the next image in the one this
/// image does not run from, and may load a larger image (up to a slot)
/// without touching anything else.
fn image_slots() -> [PhysRange; 2] {
    hypervisor::slots::AARCH64.ranges()
}

fn boot_cpu_index(platform: &DtbPlatform) -> usize {
    let me = mpidr() & 0xff_00ff_ffff;
    platform.cpus.iter().position(|&c| c == me).unwrap_or(0)
}

/// Why the first boot cannot start the guests or map the hypervisor.
#[derive(Debug)]
enum BootError {
    ManifestOutsideRam,
    Manifest(loader::manifest::ManifestError),
    /// Something the platform reserved lies in the image slot.
    ImageSlotNotFree,
    GuestModuleInImageSlot,
    NoRoomForScratch,
    /// The EL2 stage-1 map could not map `what`.
    HostMap {
        what: &'static str,
        error: aarch64_paging::MapError,
    },
}

impl core::fmt::Display for BootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::ManifestOutsideRam => f.write_str("manifest-outside-ram"),
            Self::Manifest(e) if f.alternate() => write!(f, "bad-manifest: {e}"),
            Self::Manifest(_) => f.write_str("bad-manifest"),
            Self::ImageSlotNotFree => f.write_str("image-slot-not-free"),
            Self::GuestModuleInImageSlot => f.write_str("guest-module-in-image-slot"),
            Self::NoRoomForScratch => f.write_str("no-room-for-scratch"),
            Self::HostMap { what, error } if f.alternate() => write!(f, "map-{what}: {error}"),
            Self::HostMap { what, .. } => write!(f, "map-{what}"),
        }
    }
}

/// Reads the manifest, reserves what it points at, plans the scratch
/// regions, and builds the partitions. Returns how many started.
fn start_guests(manifest_addr: u64, info: &BootInfo, platform: &DtbPlatform) -> Result<usize, BootError> {
    let ram_end = info.ram.iter().find(|r| r.base <= manifest_addr && r.end().is_some_and(|e| e > manifest_addr));
    let Some(ram) = ram_end else { return Err(BootError::ManifestOutsideRam) };
    let window = (ram.base + ram.size - manifest_addr).min(loader::manifest::MAX_MANIFEST_SIZE as u64);
    // SAFETY: [manifest_addr, +window) lies inside RAM (checked above),
    // identity-mapped, and nothing writes it.
    let bytes = unsafe { core::slice::from_raw_parts(manifest_addr as *const u8, window as usize) };
    let specs = loader::manifest::parse(bytes).map_err(BootError::Manifest)?;
    let manifest_len = bytes.iter().position(|&b| b == 0).map_or(window, |n| n as u64 + 1);
    let image = image_range();
    let slots = image_slots();
    let in_slots = |r: &PhysRange| slots.iter().any(|s| r.overlaps(s));
    if let Some(dtb) = info.reserved.iter().find(|r| in_slots(r) && !r.overlaps(&image)) {
        hv_event!("image-slot-overlap", base = format_args!("{:#x}", dtb.base), size = dtb.size);
        return Err(BootError::ImageSlotNotFree);
    }
    if !slots.iter().all(|s| info.ram.iter().any(|r| r.contains(s))) {
        return Err(BootError::ImageSlotNotFree);
    }
    if specs.iter().any(|g| in_slots(&g.image) || g.initrd.as_ref().is_some_and(in_slots)) {
        return Err(BootError::GuestModuleInImageSlot);
    }
    let mut reserved = info.reserved.clone();
    reserved.extend(slots);
    reserved.push(PhysRange::new(manifest_addr, manifest_len));
    for g in &specs {
        reserved.push(g.image);
        reserved.extend(g.initrd);
    }
    let scratch = hypervisor::live_update::reserve_scratch(&info.ram, &mut reserved, image.size)
        .ok_or(BootError::NoRoomForScratch)?;
    let free = hypervisor::frames::subtract(&info.ram, &reserved);
    let frames = hypervisor::frames::FrameAllocator::new(&free);
    let pci = platform.pcie.as_ref().and_then(devices::PciHost::from_dtb);
    Ok(partitions::create(&specs, &info.ram, frames, scratch, &online_cpus(), (platform.smmu, pci)))
}

/// Before the boot CPU turns its MMU on: invalidates what it wrote with
/// the MMU off (`mmu::invalidate_to_poc`): the image's data, bss and the
/// boot stack; the heap too unless the image was prepared (then the heap
/// was written with the caches on, in the brownout, and cleaned, and
/// nothing was allocated since: the entry does not allocate before its map
/// is on). Unprepared, the heap holds the page tables the MMU is about to
/// walk.
///
/// Prepared, the heap and the other CPUs' stacks are left out: wherever the
/// linker put them among the bss's input sections (their order is not
/// fixed), everything else from the data to the image's end is
/// invalidated, and the boot stack after it. No allocation: the heap must
/// not be written with the MMU off.
fn forget_stale_lines(prepared: bool) {
    // SAFETY: linker-script symbols; only their addresses are used.
    let (data, end) = unsafe { (sym(&__rodata_end), sym(&__image_end)) };
    if prepared {
        // SAFETY: as above.
        let stacks = unsafe { (sym(&__stacks_bottom), sym(&__stacks_top)) };
        let mut holes = [crate::heap::area(), stacks];
        holes.sort_unstable();
        let mut at = data;
        for (lo, hi) in holes {
            if lo > at {
                mmu::invalidate_to_poc(at, lo.min(end));
            }
            at = at.max(hi);
        }
        if at < end {
            mmu::invalidate_to_poc(at, end);
        }
        let (stack, stack_top) = stack_slot(0);
        mmu::invalidate_to_poc(stack, stack_top);
    } else {
        mmu::invalidate_to_poc(data, end);
    }
}

/// The stack of slot `slot` (`entry.S`: slot 0 the boot CPU's, DTB CPU i
/// slot i + 1): (bottom, top).
pub(crate) fn stack_slot(slot: usize) -> (u64, u64) {
    // SAFETY: a linker-script symbol; only its address is used.
    let bottom = unsafe { sym(&__stacks_bottom) } + (slot * STACK_SIZE) as u64;
    (bottom, bottom + STACK_SIZE as u64)
}

/// The DTB at `dtb_phys`, as long as its header says (bounded by the arm64
/// boot protocol's 2 MiB; `dtb::parse` re-checks it).
fn dtb_blob(dtb_phys: u64) -> Option<&'static [u8]> {
    if dtb_phys == 0 || !dtb_phys.is_multiple_of(8) {
        return None;
    }
    // SAFETY: x0 at entry is the DTB address (arm64 boot protocol), in
    // RAM, identity-mapped (or the MMU is off); its header is 40 bytes.
    let header = unsafe { core::slice::from_raw_parts(dtb_phys as *const u8, 40) };
    let total = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    let len = total.clamp(40, dtb::MAX_DTB_SIZE);
    // SAFETY: as above; `len` is bounded by the 2 MiB DTB limit, and
    // validation rejects a lying totalsize.
    Some(unsafe { core::slice::from_raw_parts(dtb_phys as *const u8, len) })
}

/// Builds the EL2 identity map (not yet active).
fn build_host_map(info: &BootInfo, platform: &DtbPlatform) -> Result<mmu::HostMap, BootError> {
    let fail = |what: &'static str| move |error| BootError::HostMap { what, error };
    // SAFETY: linker-script symbols; only their addresses are used.
    let (start, text_end, ro_end, end) =
        unsafe { (sym(&__image_start), sym(&__text_end), sym(&__rodata_end), sym(&__image_end)) };
    let mut map = mmu::HostMap::new();
    for r in &info.ram {
        map.map_data(r.base, r.size).map_err(fail("ram"))?;
    }
    // The image: text executable, rodata read-only, the rest writable.
    map.map_code(start, text_end - start).map_err(fail("text"))?;
    map.map_rodata(text_end, ro_end - text_end).map_err(fail("rodata"))?;
    map.map_data(ro_end, end - ro_end).map_err(fail("data"))?;
    if let Some(uart) = platform.uart {
        map.map_device(uart.base, uart.size.max(0x1000)).map_err(fail("uart"))?;
    }
    if let Some(gic) = platform.gic {
        map.map_device(gic.distributor.base, gic.distributor.size).map_err(fail("gicd"))?;
        map.map_device(gic.redistributors.base, gic.redistributors.size).map_err(fail("gicr"))?;
    }
    if let Some(smmu) = platform.smmu {
        map.map_device(smmu.base, smmu.size).map_err(fail("smmu"))?;
    }
    if let Some(pcie) = platform.pcie {
        map.map_device(pcie.ecam.base, pcie.ecam.size).map_err(fail("ecam"))?;
    }
    Ok(map)
}

/// Brings the other CPUs up: those the previous image parked (a live
/// update's direct handover) by writing this image's secondary entry into
/// their mailbox word, the others with PSCI CPU_ON.
fn start_secondaries(platform: &DtbPlatform, parked: Option<&live_update::Parked>) {
    let me = mpidr() & 0xff_00ff_ffff;
    let entry = secondary_entry as *const () as u64;
    for (index, &target) in platform.cpus.iter().enumerate().take(MAX_CPUS) {
        if target == me {
            continue;
        }
        let before = CPUS_ONLINE.load(Ordering::Acquire);
        if let Some(word) = parked.and_then(|p| p.word(index)) {
            live_update::release_parked(word, entry);
        } else {
            hypervisor::live_update::REPORT.note_cpu_restart();
            let status = psci::call(psci::CPU_ON_64, target, entry, index as u64);
            if status != Some(psci::SUCCESS) {
                hv_event!("cpu-on-failed", mpidr = format_args!("{target:#x}"), status = status.unwrap_or(i64::MIN));
                continue;
            }
        }
        let (t0, freq) = counter();
        while CPUS_ONLINE.load(Ordering::Acquire) == before {
            let (now, _) = counter();
            if now.wrapping_sub(t0) > freq / 1000 * CPU_ON_TIMEOUT_MS {
                hv_event!("cpu-on-timeout", mpidr = format_args!("{target:#x}"));
                break;
            }
            // SAFETY: YIELD is a hint with no architectural effect (an
            // emulator that runs CPUs round-robin switches to the one being
            // waited for; spin_loop's ISB does not make it switch).
            unsafe { asm!("yield", options(nomem, nostack)) };
        }
    }
}

pub(crate) fn mpidr() -> u64 {
    let v: u64;
    // SAFETY: reading MPIDR_EL1 has no side effects.
    unsafe { asm!("mrs {0}, mpidr_el1", out(reg) v, options(nomem, nostack)) };
    v
}

#[no_mangle]
extern "C" fn hv_secondary_main(index: u64) -> ! {
    // What this CPU wrote with its MMU off: its stack (see
    // `forget_stale_lines`).
    let (bottom, top) = stack_slot(index as usize + 1);
    mmu::invalidate_to_poc(bottom, top);
    mmu::activate_secondary();
    ONLINE_MASK.fetch_or(1 << index, Ordering::AcqRel);
    let online = CPUS_ONLINE.fetch_add(1, Ordering::AcqRel) + 1;
    hv_event!("cpu-online", cpu = index, mpidr = format_args!("{:#x}", mpidr() & 0xff_00ff_ffff), online = online);
    cpu::wait_for_start();
    cpu::run_cpu(index as usize, index as usize + 1)
}

/// Called from every EL2 vector: the hypervisor takes no exceptions of its
/// own yet, so any exception is a fault to report.
#[no_mangle]
extern "C" fn el2_exception(kind: u64, esr: u64, elr: u64, far: u64) -> ! {
    // A FIQ (vector 2 or 6) is the old image's deadline (`gic::timer_as_fiq`).
    let why = if kind % 4 == 2 { Reason::Deadline } else { Reason::Exception };
    live_update::give_back(why, &format_args!("vector={kind} esr={esr:#x} elr={elr:#x} far={far:#x}"));
    hypervisor::console::write_line_forced(format_args!(
        "hv: fault kind=el2-exception vector={kind} esr={esr:#x} elr={elr:#x} far={far:#x}"
    ));
    hypervisor::console::write_line_forced(format_args!("hv: shutdown status=error"));
    shutdown(false)
}

/// Has every handover checksum use the CRC32 instructions if this CPU has
/// them (ID_AA64ISAR0_EL1.CRC32, bits [19:16] = 0b0001: FEAT_CRC32, Arm ARM
/// D19.2.61; mandatory from Armv8.1): the records are checksummed when
/// written and when read, both in the blackout.
fn enable_crc32_instructions() -> bool {
    let isar0: u64;
    // SAFETY: reads an ID register, no side effects.
    unsafe { asm!("mrs {0}, id_aa64isar0_el1", out(reg) isar0, options(nomem, nostack)) };
    let implemented = (isar0 >> 16) & 0xf == 0b0001;
    // SAFETY: `implemented` is FEAT_CRC32 as the CPU reports it; no other
    // CPU is up yet to checksum meanwhile.
    unsafe { kho::use_crc32_instructions(implemented) }
}
