//! Building the partitions of the boot modules on x86_64: each guest's
//! RAM below 4 GiB (preserved at allocation), and the conventional memory
//! at guest-physical 0 of a guest with more than one vCPU (where its
//! application processors' start-up code goes), its image and multiboot2
//! boot information loaded, its nested table (EPT under VT-x, NPT under
//! SVM) and VPID or ASID, and one VMCS region or VMCB per vCPU
//! (preserved: the next image rebuilds the VMCS in place).

use alloc::vec::Vec;
use core::fmt;
use core::fmt::Write as _;

use hypervisor::arch::x86_64::boot::{self as guest_boot, BootError, BootLayout, BOOTLOADER_MAGIC};
use hypervisor::arch::x86_64::cr::GuestCrPolicy;
use hypervisor::frames::FrameAllocator;
use hypervisor::hv_event;
use hypervisor::machine::{BuildError, Machine, MachineMemory, Refusal};
use hypervisor::partition::{GuestRam, PartitionInfo, GUEST_RAM_BASE};
use hypervisor::preserved::{IdentityPages, PreservedMap, PreservingFrames};
use hypervisor::stage2::{
    Attrs, BlockSize, Ept, FrameSource, LinearMap, MapError, Npt, Perms, Stage2Format, Stage2Table,
};
use kho::ScratchPlan;
use loader::manifest::GuestSpec;
use loader::PhysRange;

use super::platform::{set_tsc_hz, Backend, NestedTable, X86Partition, MACHINE, X86};
use super::vcpu::Vcpu;
use super::{MAPPED_LIMIT, MAX_CPUS};

/// What the machine-wide set-up needs from boot.
pub struct MachineSpec<'a> {
    pub specs: &'a [GuestSpec],
    pub ram: &'a [PhysRange],
    pub frames: FrameAllocator,
    /// Indices of the CPUs that run guests.
    pub cpus: &'a [usize],
    pub backend: Backend,
    pub cr_policy: GuestCrPolicy,
    pub tsc_hz: u64,
    pub scratch: ScratchPlan,
    /// The multiboot2 information's copy, preserved across updates.
    pub mbi: PhysRange,
    /// The VT-d unit's register set (base, bytes), if the DMAR names one:
    /// brought up translating whenever guests run.
    pub vtd_unit: Option<(u64, u64)>,
}

/// Where a guest's assigned devices' BARs appear in its guest-physical
/// space: above its RAM, below the local APIC and I/O APIC (0xfec0_0000),
/// in the 4 GiB the guest identity-maps; each aligned to its size.
const GUEST_DEVICE_GPA: u64 = 0xe000_0000;
const GUEST_DEVICE_END: u64 = 0xfec0_0000;

/// A boot module's bytes, if they lie in RAM below the identity-mapped
/// 4 GiB.
fn module_bytes(range: PhysRange, ram: &[PhysRange]) -> Option<&'static [u8]> {
    let end = range.end()?;
    if end > MAPPED_LIMIT || !ram.iter().any(|r| r.contains(&range)) {
        return None;
    }
    // SAFETY: the range lies inside RAM below 4 GiB (identity-mapped), was
    // reserved from the frame allocator as a boot module, and is only read.
    Some(unsafe { core::slice::from_raw_parts(range.base as *const u8, usize::try_from(range.size).ok()?) })
}

/// Why a boot module's guest is not built (`hv: guest-refused`); the
/// others run.
#[derive(Debug)]
pub enum GuestError {
    ImageOutsideRam,
    Boot(BootError),
    TooManyPartitions,
    Machine(BuildError),
    RamAbove4Gib,
    ImageShorterThanSegments,
    Ept(MapError),
    OutOfMemory,
    /// More partitions than the processor has SVM ASIDs for.
    OutOfAsids,
    /// `device=` with no VT-d unit to confine the device's DMA.
    NoIommu,
    /// `device=` naming a function another guest (or this one) has.
    DeviceTaken,
    /// `device=` naming a function the VT-d unit does not cover (its DMA
    /// would not be translated).
    DeviceNotBehindIommu,
    Device(super::vtd::DeviceError),
    /// The device's BAR does not fit above the guest's RAM below 4 GiB.
    NoRoomForDevice,
    Vtd(iommu::vtd::VtdError),
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ImageOutsideRam => f.write_str("image-outside-ram"),
            Self::Boot(e) => f.write_str(e.reason()),
            Self::TooManyPartitions => f.write_str("too-many-partitions"),
            Self::Machine(e) => write!(f, "{e}"),
            Self::RamAbove4Gib => f.write_str("ram-above-4gib"),
            Self::ImageShorterThanSegments => f.write_str("image-shorter-than-its-segments"),
            Self::Ept(_) => f.write_str("ept-map"),
            Self::OutOfMemory => f.write_str("out-of-memory"),
            Self::OutOfAsids => f.write_str("out-of-asids"),
            Self::NoIommu => f.write_str("device-without-vt-d"),
            Self::DeviceTaken => f.write_str("device-already-assigned"),
            Self::DeviceNotBehindIommu => f.write_str("device-not-behind-the-vt-d-unit"),
            Self::Device(e) => write!(f, "{e}"),
            Self::NoRoomForDevice => f.write_str("no-room-for-device-bar"),
            Self::Vtd(_) => f.write_str("vt-d-assign"),
        }
    }
}

impl Refusal for GuestError {
    fn cause(&self) -> Option<&dyn fmt::Display> {
        match self {
            Self::Boot(e) => Some(e),
            Self::Machine(e) => Some(e),
            Self::Ept(e) => Some(e),
            Self::Vtd(e) => Some(e),
            _ => None,
        }
    }
}

/// Copies the image and the boot information into the partition's RAM.
fn load_image(ram: GuestRam, image: &[u8], layout: &BootLayout, info: &[u8]) -> Result<(), GuestError> {
    for c in &layout.copies {
        let src = image
            .get(c.src_offset as usize..c.src_offset.saturating_add(c.len) as usize)
            .ok_or(GuestError::ImageShorterThanSegments)?;
        let dst = ram.host_base + c.ram_offset;
        // SAFETY: `guest_boot::layout` checked every copy against the RAM
        // size (and below the boot information slot); the RAM block
        // belongs to this partition only and is identity-mapped.
        unsafe {
            core::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len());
            core::ptr::write_bytes((dst + c.len) as *mut u8, 0, c.mem_len.saturating_sub(c.len) as usize);
        }
    }
    // SAFETY: the boot information is at most BOOT_INFO_SLOT bytes
    // (`boot_information` checks) and its slot is the top of RAM.
    unsafe {
        core::ptr::copy_nonoverlapping(info.as_ptr(), (ram.host_base + layout.info_offset) as *mut u8, info.len());
    }
    Ok(())
}

fn build_partition(m: &mut Machine<X86>, id: u32, spec: &GuestSpec) -> Result<(), GuestError> {
    let image = module_bytes(spec.image, &m.ram).ok_or(GuestError::ImageOutsideRam)?;
    let mem = spec.mem_mib << 20;
    let layout = guest_boot::layout(spec.format, image, mem).map_err(GuestError::Boot)?;
    let conventional = guest_boot::conventional_memory(spec.vcpus);
    let (devices, cmdline) = plan_devices(m, spec, mem)?;
    let info = guest_boot::boot_information(mem, conventional, &cmdline).map_err(GuestError::Boot)?;
    let vpid = u16::try_from(id).map_err(|_| GuestError::TooManyPartitions)?;
    let (largest, revision, is_svm) = table_layout(&m.arch.backend, vpid)?;
    let block = m.alloc_guest_ram(mem).map_err(GuestError::Machine)?;
    if block.end().is_none_or(|e| e > MAPPED_LIMIT) {
        m.free_guest_ram(block);
        return Err(GuestError::RamAbove4Gib);
    }
    let ram = GuestRam { host_base: block.base, size: mem };
    // SAFETY: the block was just allocated for this partition and is
    // identity-mapped below 4 GiB.
    unsafe { core::ptr::write_bytes(block.base as *mut u8, 0, mem as usize) };
    load_image(ram, image, &layout, &info)?;
    // Conventional memory is preserved like the rest of its RAM; only the
    // EPT names it, so the next image keeps it mapped without a record.
    let low = if conventional == 0 {
        None
    } else {
        let low = m.alloc_guest_ram(conventional).map_err(GuestError::Machine)?;
        if low.end().is_none_or(|e| e > MAPPED_LIMIT) {
            m.free_guest_ram(low);
            return Err(GuestError::RamAbove4Gib);
        }
        // SAFETY: the block was just allocated for this partition and is
        // identity-mapped below 4 GiB.
        unsafe { core::ptr::write_bytes(low.base as *mut u8, 0, conventional as usize) };
        Some(low)
    };
    // The VT-d unit, if this guest has devices, outside the machine while
    // the frames (borrowed from it) build the tables; put back below on
    // every path.
    let mut unit = if devices.is_empty() { None } else { Some(m.arch.vtd.take().ok_or(GuestError::NoIommu)?) };
    let mut frames = PreservingFrames { frames: &mut m.frames, map: &mut m.preserved };
    let built = build_tables(&mut frames, is_svm, ram, low, largest, &devices, unit.as_mut(), (vpid, id));
    if unit.is_some() {
        m.arch.vtd = unit;
    }
    let (nested, dma_table) = built?;
    let (mib2, gib1) = match &nested {
        NestedTable::Ept(t) => (t.leaf_count(BlockSize::Size2M), t.leaf_count(BlockSize::Size1G)),
        NestedTable::Npt(t) => (t.leaf_count(BlockSize::Size2M), t.leaf_count(BlockSize::Size1G)),
    };
    let mut frames = m.preserving_frames();
    let mut contexts = Vec::new();
    for index in 0..spec.vcpus {
        let page = frames.alloc_frame().ok_or(GuestError::OutOfMemory)?;
        // SAFETY: a fresh page for this vCPU's VMCS or VMCB, zeroed; a
        // VMCS region starts with the revision identifier (SDM §25.2).
        unsafe {
            core::ptr::write_bytes(page as *mut u8, 0, 4096);
            if let Some(revision) = revision {
                core::ptr::write_volatile(page as *mut u32, revision);
            }
        }
        contexts.push(Vcpu::new(index, page, layout.entry_gpa, u64::from(BOOTLOADER_MAGIC), layout.info_gpa()));
    }
    let root = nested.root();
    let info = PartitionInfo { id, name: spec.name.clone(), privileged: spec.privileged, ram, vcpus: spec.vcpus };
    let mut part = X86Partition::new(nested, spec.vcpus);
    part.dma_table = dma_table;
    let p = m.add_partition(info, vpid, part, contexts).map_err(GuestError::Machine)?;
    hv_event!(
        "guest-start",
        id = id,
        name = spec.name,
        mem_mib = spec.mem_mib,
        vcpus = spec.vcpus,
        privileged = u8::from(spec.privileged),
        entry = format_args!("{:#x}", layout.entry_gpa),
        stage2_root = format_args!("{root:#x}"),
        ram = format_args!("{:#x}", ram.host_base),
        ept_2m = mib2,
        ept_1g = gib1,
        vpid = vpid,
        cpu = m.vcpus[m.partitions[p].vcpus[0]].pcpu,
        conventional_kib = conventional >> 10,
    );
    for d in &devices {
        hv_event!(
            "device-assigned",
            guest = id,
            device = iommu::vtd::Bdf(d.bdf),
            bar = format_args!("{:#x}", d.bar.pa),
            size = d.bar.size,
            gpa = format_args!("{:#x}", d.gpa),
            iommu = "vt-d",
        );
    }
    Ok(())
}

/// The largest leaf a partition's nested table may use, what a vCPU's
/// control page starts with (VMX's revision identifier, SDM §25.2; a VMCB
/// is built from zero), and whether the backend is SVM; refuses an ASID
/// the processor does not have (ASID 0 is the host's).
fn table_layout(backend: &Backend, vpid: u16) -> Result<(BlockSize, Option<u32>, bool), GuestError> {
    Ok(match *backend {
        Backend::Vmx { caps, .. } => (
            match (caps.ept_1g, caps.ept_2m) {
                (true, _) => BlockSize::Size1G,
                (false, true) => BlockSize::Size2M,
                (false, false) => BlockSize::Size4K,
            },
            Some(caps.revision),
            false,
        ),
        Backend::Svm { caps, .. } if u32::from(vpid) >= caps.asids => return Err(GuestError::OutOfAsids),
        Backend::Svm { .. } => (BlockSize::Size2M, None, true),
    })
}

/// A device assigned to a guest: its requester id, its BAR0 and where the
/// guest sees it.
struct PlannedDevice {
    bdf: u16,
    bar: super::vtd::Bar,
    gpa: u64,
}

/// The devices `spec` names (`device=BB:DD.F`): each present, not taken,
/// its BAR0 placed above the guest's RAM; and the guest's command line
/// with `dev0=<GPA> dev1=...` appended (as on aarch64).
fn plan_devices(
    m: &Machine<X86>,
    spec: &GuestSpec,
    mem: u64,
) -> Result<(Vec<PlannedDevice>, alloc::string::String), GuestError> {
    let mut cmdline = spec.cmdline.clone();
    let mut planned = Vec::new();
    let mut next = GUEST_DEVICE_GPA.max(GUEST_RAM_BASE + mem);
    for (k, &(bus, dev, func)) in spec.devices.iter().enumerate() {
        let unit = m.arch.vtd.as_ref().ok_or(GuestError::NoIommu)?;
        let bdf = (u16::from(bus) << 8) | (u16::from(dev) << 3) | u16::from(func);
        if unit.assigned.iter().any(|a| a.source == bdf) || planned.iter().any(|d: &PlannedDevice| d.bdf == bdf) {
            return Err(GuestError::DeviceTaken);
        }
        if !super::vtd_covers(bdf) {
            return Err(GuestError::DeviceNotBehindIommu);
        }
        let bar = super::vtd::device_bar(bdf).map_err(GuestError::Device)?;
        let gpa = next.next_multiple_of(bar.size);
        next = gpa.checked_add(bar.size).filter(|&e| e <= GUEST_DEVICE_END).ok_or(GuestError::NoRoomForDevice)?;
        let _ = write!(cmdline, " dev{k}={gpa:#x}");
        planned.push(PlannedDevice { bdf, bar, gpa });
    }
    Ok((planned, cmdline))
}

/// A partition's tables: its nested table (NPT under SVM, else EPT), with
/// its devices' BARs mapped, and, if it has devices, the second-level
/// table their DMA is translated by (the EPT format, VT-d §9.8, mapping
/// the guest's memory as the nested table does; on VT-x the EPT itself
/// could serve, but only SVM runs with a VT-d unit here), each device
/// assigned to it at `unit` under domain `vpid` and recorded for
/// partition `id`.
#[allow(clippy::too_many_arguments)]
fn build_tables(
    frames: &mut (impl FrameSource + iommu::FrameSource),
    is_svm: bool,
    ram: GuestRam,
    low: Option<PhysRange>,
    largest: BlockSize,
    devices: &[PlannedDevice],
    unit: Option<&mut super::vtd::Unit>,
    (vpid, id): (u16, u32),
) -> Result<(NestedTable, Option<Stage2Table<Ept, LinearMap>>), GuestError> {
    let mut nested = if is_svm {
        NestedTable::Npt(nested_table::<Npt>(ram, low, largest, frames)?)
    } else {
        NestedTable::Ept(nested_table::<Ept>(ram, low, largest, frames)?)
    };
    let Some(unit) = unit.filter(|_| !devices.is_empty()) else { return Ok((nested, None)) };
    let table = nested_table::<Ept>(ram, low, BlockSize::Size2M, frames)?;
    for d in devices {
        match &mut nested {
            NestedTable::Npt(t) => t.map(d.gpa, d.bar.pa, d.bar.size, Attrs::device(), frames),
            NestedTable::Ept(t) => t.map(d.gpa, d.bar.pa, d.bar.size, Attrs::device(), frames),
        }
        .map_err(GuestError::Ept)?;
        unit.vtd.assign(d.bdf, vpid, table.root(), frames).map_err(GuestError::Vtd)?;
        super::vtd::enable_device(d.bdf);
        unit.assigned.push(hypervisor::records::VtdAssignment {
            source: d.bdf,
            domain: vpid,
            partition: id,
            table: table.root(),
            bar_base: d.bar.pa,
            bar_size: d.bar.size,
        });
    }
    Ok((nested, Some(table)))
}

/// A partition's nested table of format `F` (EPT or NPT): its RAM at
/// [`GUEST_RAM_BASE`] and its conventional memory (if any) at 0, with
/// every permission, in leaves up to `largest`.
fn nested_table<F: Stage2Format>(
    ram: GuestRam,
    low: Option<PhysRange>,
    largest: BlockSize,
    frames: &mut impl FrameSource,
) -> Result<Stage2Table<F, LinearMap>, GuestError> {
    // SAFETY: RAM is identity-mapped, so physical = virtual.
    let phys = unsafe { LinearMap::new(0) };
    let mut t = Stage2Table::<F, LinearMap>::new(frames, phys).map_err(GuestError::Ept)?;
    t.set_max_block_size(largest);
    t.map(GUEST_RAM_BASE, ram.host_base, ram.size, Attrs::ram(Perms::ReadWriteExec), frames)
        .map_err(GuestError::Ept)?;
    if let Some(low) = low {
        t.map(0, low.base, low.size, Attrs::ram(Perms::ReadWriteExec), frames).map_err(GuestError::Ept)?;
    }
    Ok(t)
}

/// Builds every partition and installs the machine. Returns how many
/// started.
pub fn create(spec: MachineSpec<'_>) -> usize {
    let memory = MachineMemory {
        frames: spec.frames,
        preserved: PreservedMap::new(IdentityPages),
        scratch: spec.scratch,
        ram: spec.ram.to_vec(),
    };
    let arch = X86 {
        backend: spec.backend,
        vtd: None,
        cr_policy: spec.cr_policy,
        tsc_hz: spec.tsc_hz,
        mbi: spec.mbi,
        slice_end: [0; MAX_CPUS],
        update_request: [None; MAX_CPUS],
    };
    set_tsc_hz(spec.tsc_hz);
    let mut m = Machine::new(arch, memory, spec.cpus);
    if m.preserved.preserve(&mut m.frames, spec.mbi.base..spec.mbi.base + spec.mbi.size).is_err() {
        hv_event!("preserve-failed", what = "multiboot2-information");
    }
    // With a VT-d unit, translation is on and every device not assigned
    // to a guest is blocked (never passed through). Its tables come from
    // preserved frames: the unit reads them for as long as it translates,
    // across live updates too.
    if let Some((base, bytes)) = spec.vtd_unit {
        let unit = super::vtd::bring_up(base, bytes, &mut m.preserving_frames());
        m.arch.vtd = unit;
    }
    let n = m.build_partitions(spec.specs, build_partition);
    MACHINE.install(m);
    n
}
