//! The x86_64 side of VT-d (issue 20, item 4, first step): the remapping
//! unit the DMAR names is brought up with translation on and every device
//! blocked (`iommu::vtd`), and a probe shows it: the `edu` test device, if
//! there is one, is made to read RAM by DMA, which the unit must block and
//! record against the device's requester id.
//!
//! Then the table-sharing question (issue 20, item 6) is tried on the
//! unit: VT-d's second-level tables have the EPT shape (VT-d §9.8, SDM
//! §29.3.2), so `edu` is assigned a table the hypervisor's EPT engine
//! built (`stage2::Ept`, the one that builds the guests' EPT on VT-x),
//! and its DMA goes through it: a read and a write that the table maps,
//! a write to a page it maps read-only (fault reason 5), a read of a page
//! it does not map (reason 6).
//!
//! That much runs where no guest runs, with pages from a throw-away
//! allocator. With guests (issue 20, item 4; [`bring_up`], [`device_bar`],
//! [`poll_faults`]) the unit's pages and every table it reads come from
//! the machine's preserved frames, a device named by a guest's `device=`
//! gets that guest's own second-level table (the EPT format, built by the
//! same engine beside the guest's NPT, which has another format), its BAR
//! is mapped into the guest, and faults are reported against the guest
//! that owns the requester id. Across a live update (item 5) the unit is
//! adopted without stopping ([`adopt`], the `vtd` record), with every
//! table it reads.

use core::ptr::NonNull;

use alloc::string::String;
use core::fmt::Write as _;

use hypervisor::frames::{FrameAllocator, PAGE_SIZE};
use hypervisor::machine::Machine;
use hypervisor::records::{VtdAssignment, VtdRecord};
use hypervisor::stage2::{Attrs, Ept, Perms, Stage2Table};
use hypervisor::{hv_event, hv_event_to};
use iommu::vtd::{Bdf, MmioVtd, Vtd};
use iommu::LinearMap;
use x86::io::{inl, outl};

/// Legacy PCI configuration mechanism #1 (PCI Local Bus spec 3.0, §3.2.2.3.2).
const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;
/// The `edu` device (QEMU `docs/specs/edu.rst`): vendor 0x1234, device
/// 0x11e8; BAR0 registers: DMA source 0x80, destination 0x88, count 0x90,
/// command 0x98 (bit 0 start/busy, bit 1 direction: 0 RAM to device). Its
/// buffer is at 0x40000 in its own address space.
const EDU_ID: u32 = 0x11e8_1234;
const EDU_DMA_SRC: usize = 0x80;
const EDU_DMA_DST: usize = 0x88;
const EDU_DMA_COUNT: usize = 0x90;
const EDU_DMA_CMD: usize = 0x98;
const EDU_BUFFER: u64 = 0x4_0000;
const EDU_DMA_START: u64 = 1;
/// The I/O address the probe's DMA names: below edu's 28-bit DMA mask,
/// inside no mapping (nothing is mapped).
const PROBE_IOVA: u64 = 0x12_3000;
/// EDU_DMA_CMD bit 1: from the device's buffer to RAM.
const EDU_DMA_TO_RAM: u64 = 1 << 1;
/// The I/O addresses of the translated probe (one 2 MiB region): a page
/// mapped read/write, one mapped read-only, one not mapped.
const IOVA_RW: u64 = 0x20_0000;
const IOVA_RO: u64 = 0x20_1000;
const IOVA_NONE: u64 = 0x20_2000;
/// Domain id of the probe's table.
const PROBE_DOMAIN: u16 = 1;
/// What the probe puts in RAM for edu to read.
const PATTERN: u64 = 0x1122_3344_5566_7788;
/// PCI command register: memory space (bit 1) and bus master (bit 2).
const PCI_COMMAND_MEMORY: u32 = 1 << 1;
const PCI_COMMAND_MASTER: u32 = 1 << 2;
/// How long the probe waits for edu's DMA to end (it completes on a QEMU
/// timer, about 100 ms later), in `delay_us` steps of 1 ms.
const PROBE_WAIT_MS: u32 = 3000;

fn config_read(bdf: u16, offset: u8) -> u32 {
    let address = 0x8000_0000 | (u32::from(bdf) << 8) | u32::from(offset & 0xfc);
    // SAFETY: the configuration-space ports; reading a register of a
    // function has no side effect the hypervisor relies on.
    unsafe {
        outl(CONFIG_ADDRESS, address);
        inl(CONFIG_DATA)
    }
}

fn config_write(bdf: u16, offset: u8, value: u32) {
    let address = 0x8000_0000 | (u32::from(bdf) << 8) | u32::from(offset & 0xfc);
    // SAFETY: as in `config_read`; only the probe device's command register
    // is written.
    unsafe {
        outl(CONFIG_ADDRESS, address);
        outl(CONFIG_DATA, value);
    }
}

/// Turns on memory decoding and bus mastering of `bdf` (SeaBIOS leaves
/// edu's off); returns the command register to restore.
fn enable_bus_master(bdf: u16) -> u32 {
    let command = config_read(bdf, 0x04);
    config_write(bdf, 0x04, (command & 0xffff) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    command
}

/// The first `edu` function on bus 0, and its BAR0.
fn find_edu() -> Option<(u16, u64)> {
    (0..32u16).map(|dev| dev << 3).find(|&bdf| config_read(bdf, 0) == EDU_ID).map(|bdf| {
        let bar0 = u64::from(config_read(bdf, 0x10) & !0xf);
        (bdf, bar0)
    })
}

/// Brings the unit at `base` (its register set `bytes` long) up (translation on, everything blocked) with
/// pages from `frames`, reports it (`hv: vtd ...`), and probes it with an
/// `edu` DMA (`hv: vtd-probe ...`, and `hv: fault kind=iommu ...` for each
/// fault the unit recorded).
pub fn bring_up_and_probe(base: u64, bytes: u64, frames: &mut FrameAllocator) {
    let Some(regs) = NonNull::new(base as *mut u8) else { return };
    let below_4g = base.checked_add(bytes).is_some_and(|end| end <= super::MAPPED_LIMIT);
    let Ok(len) = usize::try_from(bytes) else { return };
    if !below_4g {
        hv_event!("vtd", base = format_args!("{base:#x}"), enabled = 0, reason = "registers-above-4gib");
        return;
    }
    // SAFETY: the DRHD's register set, below 4 GiB (identity-mapped),
    // driven by nothing else.
    let regs = unsafe { MmioVtd::new(regs, len) };
    // SAFETY: RAM is identity-mapped.
    let phys = unsafe { LinearMap::new(0) };
    let (mut vtd, up) = match Vtd::init(regs, phys, frames, Vtd::<MmioVtd, LinearMap>::DEFAULT_SPIN_BUDGET) {
        Ok(v) => v,
        Err(e) => {
            hv_event!("vtd", base = format_args!("{base:#x}"), enabled = 0, reason = e);
            return;
        }
    };
    hv_event!(
        "vtd",
        base = format_args!("{base:#x}"),
        enabled = 1,
        version = format_args!("{:#x}", up.version),
        translating = u8::from(vtd.translating()),
        root = format_args!("{:#x}", up.root),
        queue = format_args!("{:#x}", up.queue),
        invalidations = up.invalidations,
        coherent = u8::from(up.ecap.coherent()),
        fault_records = up.cap.fault_records(),
        mgaw = up.cap.mgaw(),
    );
    probe(&mut vtd);
    probe_shared_table(&mut vtd, frames);
}

/// Has `edu` read 8 bytes of RAM at [`PROBE_IOVA`]; the unit must block
/// the read and record it.
fn probe(vtd: &mut Vtd<MmioVtd, LinearMap>) {
    let Some((bdf, bar0)) = find_edu() else {
        hv_event!("vtd-probe", device = "none");
        return;
    };
    let command = enable_bus_master(bdf);
    let done = Edu { bar0 }.dma(PROBE_IOVA, false);
    let (faults, overflow) = vtd.take_faults();
    let blocked = faults.iter().any(|f| f.source == bdf && f.read);
    hv_event!(
        "vtd-probe",
        device = Bdf(bdf),
        iova = format_args!("{PROBE_IOVA:#x}"),
        done = u8::from(done),
        dma = if blocked { "blocked" } else { "not-recorded" },
        faults = faults.len(),
        overflow = u8::from(overflow),
    );
    report_faults(&faults);
    config_write(bdf, 0x04, command & 0xffff);
}

/// The unit with guests' devices assigned to it: (requester id,
/// partition id) of each.
pub struct Unit {
    pub vtd: Vtd<MmioVtd, LinearMap>,
    /// The register set's base (the DMAR's DRHD).
    pub base: u64,
    pub assigned: alloc::vec::Vec<VtdAssignment>,
}

/// Maps the unit's register set at `base` (`bytes` long), if below 4 GiB.
fn registers(base: u64, bytes: u64) -> Option<MmioVtd> {
    let regs = NonNull::new(base as *mut u8)?;
    let below_4g = base.checked_add(bytes).is_some_and(|end| end <= super::MAPPED_LIMIT);
    let len = usize::try_from(bytes).ok()?;
    if !below_4g {
        hv_event!("vtd", base = format_args!("{base:#x}"), enabled = 0, reason = "registers-above-4gib");
        return None;
    }
    // SAFETY: the DRHD's register set, below 4 GiB (identity-mapped),
    // driven by nothing else.
    Some(unsafe { MmioVtd::new(regs, len) })
}

/// Takes over the unit a previous image left translating (its `vtd`
/// record: `iommu::vtd::Vtd::adopt` checks the registers against it and
/// that the queue still answers), with its assignments, each of a
/// partition the handover has. Translation never stops.
pub fn adopt(rec: &VtdRecord, (base, bytes): (u64, u64), ram: &[(u64, u64)]) -> Result<Unit, &'static str> {
    if rec.register_base != base {
        return Err("vtd-unit-moved");
    }
    let assigned = rec.decode_assignments().ok_or("vtd-assignment-count")?;
    let regs = registers(base, bytes).ok_or("vtd-registers")?;
    // SAFETY: RAM is identity-mapped.
    let phys = unsafe { LinearMap::new(0) };
    let (vtd, _) =
        Vtd::adopt(regs, phys, &rec.state(), ram, Vtd::<MmioVtd, LinearMap>::DEFAULT_SPIN_BUDGET).map_err(|e| {
            hypervisor::println!("vtd adopt: {e}");
            "vtd-adopt"
        })?;
    Ok(Unit { vtd, base, assigned })
}

// SAFETY: the unit's registers are MMIO any CPU may reach (identity-
// mapped below 4 GiB), and the unit lives in the machine, reached only
// under its lock.
unsafe impl Send for Unit {}

/// Brings the unit at `base` up for the guests (translation on, every
/// device blocked until assigned; at every boot with guests) with pages from `frames`, which keeps
/// them for as long as the unit translates, and reports it (`hv: vtd ...
/// guests=1`).
pub fn bring_up(base: u64, bytes: u64, frames: &mut impl iommu::FrameSource) -> Option<Unit> {
    let regs = registers(base, bytes)?;
    // SAFETY: RAM is identity-mapped.
    let phys = unsafe { LinearMap::new(0) };
    match Vtd::init(regs, phys, frames, Vtd::<MmioVtd, LinearMap>::DEFAULT_SPIN_BUDGET) {
        Ok((vtd, up)) => {
            hv_event!(
                "vtd",
                base = format_args!("{base:#x}"),
                enabled = 1,
                guests = 1,
                translating = u8::from(vtd.translating()),
                root = format_args!("{:#x}", up.root),
                invalidations = up.invalidations,
            );
            Some(Unit { vtd, base, assigned: alloc::vec::Vec::new() })
        }
        Err(e) => {
            hv_event!("vtd", base = format_args!("{base:#x}"), enabled = 0, reason = e);
            None
        }
    }
}

/// A PCI function's BAR0, for mapping into its guest.
#[derive(Clone, Copy, Debug)]
pub struct Bar {
    pub pa: u64,
    /// Bytes, a power of two of at least a page.
    pub size: u64,
}

/// PCI header (PCI Local Bus spec 3.0 §6.1, §6.2.5.1): vendor/device at
/// 0, command at 4, header type at 0xe, BAR0 at 0x10 (bit 0: I/O space;
/// bits 2:1: 10b a 64-bit memory BAR, its upper half at 0x14).
const PCI_VENDOR_NONE: u32 = 0xffff_ffff;
const PCI_BAR0: u8 = 0x10;
const PCI_BAR1: u8 = 0x14;
const BAR_IO: u32 = 1 << 0;
const BAR_TYPE_MASK: u32 = 0b110;
const BAR_TYPE_64: u32 = 0b100;
const BAR_ADDRESS_MASK: u32 = !0xf;

/// Why a device cannot be assigned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceError {
    NotPresent,
    IoBar,
    NoBar,
    BarAbove4Gib,
}

impl core::fmt::Display for DeviceError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::NotPresent => "device-not-present",
            Self::IoBar => "device-bar0-is-io",
            Self::NoBar => "device-has-no-bar0",
            Self::BarAbove4Gib => "device-bar0-above-4gib",
        })
    }
}

/// Function `bdf`'s BAR0 (sized by writing all ones and reading back,
/// then restored, with decoding off meanwhile).
pub fn device_bar(bdf: u16) -> Result<Bar, DeviceError> {
    if config_read(bdf, 0) == PCI_VENDOR_NONE {
        return Err(DeviceError::NotPresent);
    }
    let low = config_read(bdf, PCI_BAR0);
    if low & BAR_IO != 0 {
        return Err(DeviceError::IoBar);
    }
    let high = if low & BAR_TYPE_MASK == BAR_TYPE_64 { config_read(bdf, PCI_BAR1) } else { 0 };
    if high != 0 {
        return Err(DeviceError::BarAbove4Gib);
    }
    let command = config_read(bdf, 0x04);
    // Decoding off while the BAR reads back its size mask.
    config_write(bdf, 0x04, command & 0xffff & !PCI_COMMAND_MEMORY);
    config_write(bdf, PCI_BAR0, u32::MAX);
    let mask = config_read(bdf, PCI_BAR0) & BAR_ADDRESS_MASK;
    config_write(bdf, PCI_BAR0, low);
    let pa = u64::from(low & BAR_ADDRESS_MASK);
    if mask == 0 || pa == 0 {
        config_write(bdf, 0x04, command & 0xffff);
        return Err(DeviceError::NoBar);
    }
    // Decoding as it was: turned on with bus mastering only once the
    // device's DMA is translated for its guest (`enable_device`).
    config_write(bdf, 0x04, command & 0xffff);
    let size = u64::from(!mask).wrapping_add(1).max(PAGE_SIZE);
    Ok(Bar { pa, size })
}

/// Turns on `bdf`'s memory decoding and bus mastering, once it is
/// assigned (its DMA goes through its guest's table).
pub fn enable_device(bdf: u16) {
    enable_bus_master(bdf);
}

/// Reports the faults the unit recorded: each against the guest that owns
/// its requester id (`hv: fault kind=iommu guest=N ...`, queued on that
/// guest's console so it goes out in order with its lines), the DMA
/// blocked and the guest running on. Called on scheduling decisions.
pub fn poll_faults(m: &mut Machine<super::platform::X86>) {
    let Some(unit) = m.arch.vtd.as_mut() else { return };
    let (faults, overflow) = unit.vtd.take_faults();
    if faults.is_empty() && !overflow {
        return;
    }
    let owners: alloc::vec::Vec<Option<u32>> =
        faults.iter().map(|f| unit.assigned.iter().find(|a| a.source == f.source).map(|a| a.partition)).collect();
    if overflow {
        hv_event!("vtd-fault-overflow", faults = faults.len());
    }
    for (f, owner) in faults.iter().zip(owners) {
        let p = owner.and_then(|id| m.partitions.iter().position(|p| p.info.id == id));
        let mut line = String::new();
        let _ = hv_event_to!(
            line,
            "fault",
            kind = "iommu",
            guest = owner.unwrap_or(0),
            source = Bdf(f.source),
            reason = f.reason_name(),
            code = f.reason,
            access = if f.read { "read" } else { "write" },
            addr = format_args!("{:#x}", f.addr),
        );
        match p {
            Some(p) => m.queue_line(p, String::from(line.trim_end())),
            None => hypervisor::println!("{}", line.trim_end()),
        }
    }
}

fn report_faults(faults: &[iommu::vtd::Fault]) {
    for f in faults {
        hv_event!(
            "fault",
            kind = "iommu",
            source = Bdf(f.source),
            reason = f.reason_name(),
            code = f.reason,
            access = if f.read { "read" } else { "write" },
            addr = format_args!("{:#x}", f.addr),
            guest = "none",
        );
    }
}

/// edu's BAR0 registers.
struct Edu {
    bar0: u64,
}

impl Edu {
    fn reg(&self, offset: usize) -> *mut u64 {
        (self.bar0 as usize + offset) as *mut u64
    }

    /// One DMA of 8 bytes between RAM at `iova` and edu's buffer, waited
    /// for; whether it completed.
    fn dma(&self, iova: u64, to_ram: bool) -> bool {
        let (src, dst, cmd) =
            if to_ram { (EDU_BUFFER, iova, EDU_DMA_START | EDU_DMA_TO_RAM) } else { (iova, EDU_BUFFER, EDU_DMA_START) };
        // SAFETY: edu's BAR0 registers (below 4 GiB, identity-mapped), which
        // only this probe drives.
        unsafe {
            self.reg(EDU_DMA_SRC).write_volatile(src);
            self.reg(EDU_DMA_DST).write_volatile(dst);
            self.reg(EDU_DMA_COUNT).write_volatile(8);
            self.reg(EDU_DMA_CMD).write_volatile(cmd);
        }
        for _ in 0..PROBE_WAIT_MS {
            // SAFETY: as above.
            if unsafe { self.reg(EDU_DMA_CMD).read_volatile() } & EDU_DMA_START == 0 {
                return true;
            }
            super::delay_us(1000);
        }
        false
    }
}

/// The word at `pa` (identity-mapped RAM the probe owns).
fn word(pa: u64) -> *mut u64 {
    pa as *mut u64
}

/// Assigns edu a table built by the EPT engine and checks each DMA: the
/// pattern read from the read/write page and written back 8 bytes further
/// (translated), a write to the read-only page blocked (reason 5) and the
/// page unchanged, a read of the unmapped page blocked (reason 6).
pub fn probe_shared_table(vtd: &mut Vtd<MmioVtd, LinearMap>, frames: &mut FrameAllocator) {
    let Some((bdf, bar0)) = find_edu() else { return };
    let (Some(rw), Some(ro)) = (frames.alloc_block(PAGE_SIZE), frames.alloc_block(PAGE_SIZE)) else { return };
    // SAFETY: two pages just allocated for the probe, identity-mapped.
    unsafe {
        core::ptr::write_bytes(rw.base as *mut u8, 0, PAGE_SIZE as usize);
        core::ptr::write_bytes(ro.base as *mut u8, 0xa5, PAGE_SIZE as usize);
        word(rw.base).write_volatile(PATTERN);
    }
    // SAFETY: RAM is identity-mapped.
    let phys = unsafe { hypervisor::stage2::LinearMap::new(0) };
    let built = Stage2Table::<Ept, _>::new(frames, phys).and_then(|mut ept| {
        ept.map(IOVA_RW, rw.base, PAGE_SIZE, Attrs::ram(Perms::ReadWrite), frames)?;
        ept.map(IOVA_RO, ro.base, PAGE_SIZE, Attrs::ram(Perms::ReadOnly), frames)?;
        Ok(ept)
    });
    let ept = match built {
        Ok(t) => t,
        Err(e) => {
            hv_event!("vtd-shared-table", refused = format_args!("{e}"));
            return;
        }
    };
    if let Err(e) = vtd.assign(bdf, PROBE_DOMAIN, ept.root(), frames) {
        hv_event!("vtd-shared-table", refused = e);
        return;
    }
    let command = enable_bus_master(bdf);
    let edu = Edu { bar0 };
    let read_ok = edu.dma(IOVA_RW, false) && edu.dma(IOVA_RW + 8, true);
    // SAFETY: the probe's pages (identity-mapped), written by edu's DMA.
    let copied = unsafe { word(rw.base + 8).read_volatile() } == PATTERN;
    let (first, _) = vtd.take_faults();
    let ro_done = edu.dma(IOVA_RO, true);
    // SAFETY: as above.
    let ro_intact = unsafe { word(ro.base).read_volatile() } == 0xa5a5_a5a5_a5a5_a5a5;
    let (ro_faults, _) = vtd.take_faults();
    let none_done = edu.dma(IOVA_NONE, false);
    let (none_faults, _) = vtd.take_faults();
    config_write(bdf, 0x04, command & 0xffff);
    hv_event!(
        "vtd-shared-table",
        device = Bdf(bdf),
        table = "ept",
        root = format_args!("{:#x}", ept.root()),
        domain = PROBE_DOMAIN,
        translated = u8::from(read_ok && copied && first.is_empty()),
        readonly_write = if ro_intact && ro_faults.iter().any(|f| f.reason == 5) { "blocked" } else { "not-blocked" },
        unmapped_read = if none_faults.iter().any(|f| f.reason == 6) { "blocked" } else { "not-blocked" },
        done = u8::from(ro_done && none_done),
    );
    report_faults(&ro_faults);
    report_faults(&none_faults);
}
