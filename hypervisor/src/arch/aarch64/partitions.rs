//! Building the partitions of the boot manifest on aarch64: each guest's
//! RAM (preserved at allocation), its image, initrd and device tree loaded,
//! its stage-2 table and VMID, its assigned PCI functions behind the SMMU,
//! and its vCPU contexts; and SYSTEM_RESET, which loads them again.

use alloc::vec::Vec;
use core::arch::asm;
use core::fmt::{self, Write as _};

use hypervisor::arch::aarch64::pl011::Pl011;
use hypervisor::arch::aarch64::vgic::Vgic;
use hypervisor::frames::FrameAllocator;
use hypervisor::guest_image::{self, GuestLayout, LayoutError};
use hypervisor::machine::{BuildError, Machine, MachineMemory, Refusal};
use hypervisor::partition::{GuestRam, PartitionInfo, GUEST_RAM_BASE};
use hypervisor::preserved::{IdentityPages, PreserveError, PreservedMap};
use hypervisor::sched::VcpuState;
use hypervisor::stage2::{ArmStage2, Attrs, LinearMap, MapError, Perms, Stage2Table};
use hypervisor::{hv_event, println};
use kho::ScratchPlan;
use loader::manifest::GuestSpec;
use loader::PhysRange;

use super::devices::{self, AssignError, PciHost, GUEST_DEVICE_IPA};
use super::platform::{device_tree, phys_bytes, Aarch64, ArmPartition, Smmu, MACHINE};
use super::vcpu::Vcpu;

/// Cleans the data cache to the point of coherency and invalidates the
/// instruction cache for memory handed to a guest running with its MMU off
/// (Arm ARM D7.5.9): the guest's accesses are then non-cacheable.
fn clean_for_guest(base: u64, len: u64) {
    let mut a = base & !63;
    while a < base + len {
        // SAFETY: cache maintenance by VA on identity-mapped RAM we own.
        unsafe { asm!("dc cvac, {0}", in(reg) a, options(nostack)) };
        a += 64;
    }
    // SAFETY: completes the cleaning and invalidates stale instructions.
    unsafe { asm!("dsb ish", "ic iallu", "dsb ish", "isb", options(nostack)) };
}

/// Copies the image (and DTB) into the partition's RAM.
pub fn load_image(ram: GuestRam, image: &[u8], layout: &GuestLayout, dtb: &[u8]) {
    for c in &layout.copies {
        let dst = ram.host_base + c.ram_offset;
        let src = &image[c.src_offset as usize..(c.src_offset + c.len) as usize];
        // SAFETY: `layout` checked every copy against the RAM size, and the
        // source range against the image file, in `guest_image::layout`;
        // the RAM block belongs to this partition only.
        unsafe {
            core::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len());
            core::ptr::write_bytes((dst + c.len) as *mut u8, 0, (c.mem_len - c.len) as usize);
        }
    }
    // SAFETY: the DTB slot at `dtb_offset` is inside RAM (layout) and the
    // blob is at most the slot's size (`check_dtb`).
    unsafe { core::ptr::copy_nonoverlapping(dtb.as_ptr(), (ram.host_base + layout.dtb_offset) as *mut u8, dtb.len()) };
    clean_for_guest(ram.host_base, ram.size);
}

/// Why a partition of the manifest is not built (`hv: guest-refused`);
/// the others run.
#[derive(Debug)]
pub enum GuestError {
    ImageOutsideRam,
    InitrdOutsideRam,
    Layout(LayoutError),
    TooManyPartitions,
    Machine(BuildError),
    PreserveImage(PreserveError),
    DeviceWithoutIommu,
    NoPciHost,
    Assign(AssignError),
    DtbTooLarge(LayoutError),
    Stage2(MapError),
    Smmu(iommu::Error),
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ImageOutsideRam => f.write_str("image-outside-ram"),
            Self::InitrdOutsideRam => f.write_str("initrd-outside-ram"),
            Self::Layout(_) => f.write_str("bad-image-layout"),
            Self::TooManyPartitions => f.write_str("too-many-partitions"),
            Self::Machine(e) => write!(f, "{e}"),
            Self::PreserveImage(_) => f.write_str("preserve-image"),
            Self::DeviceWithoutIommu => f.write_str("device-without-iommu"),
            Self::NoPciHost => f.write_str("no-pci-host"),
            Self::Assign(e) => write!(f, "{e}"),
            Self::DtbTooLarge(_) => f.write_str("dtb-too-large"),
            Self::Stage2(_) => f.write_str("stage2-map"),
            Self::Smmu(_) => f.write_str("smmu-assign"),
        }
    }
}

impl Refusal for GuestError {
    fn cause(&self) -> Option<&dyn fmt::Display> {
        match self {
            Self::Layout(e) | Self::DtbTooLarge(e) => Some(e),
            Self::Machine(e) => Some(e),
            Self::PreserveImage(e) => Some(e),
            Self::Assign(e) => e.cause(),
            Self::Stage2(e) => Some(e),
            Self::Smmu(e) => Some(e),
            _ => None,
        }
    }
}

fn build_partition(m: &mut Machine<Aarch64>, id: u32, spec: &GuestSpec) -> Result<(), GuestError> {
    let image = phys_bytes(spec.image, &m.ram).ok_or(GuestError::ImageOutsideRam)?;
    let initrd = match spec.initrd {
        Some(r) => Some(phys_bytes(r, &m.ram).ok_or(GuestError::InitrdOutsideRam)?),
        None => None,
    };
    let mem = spec.mem_mib << 20;
    let layout =
        guest_image::layout(spec.format, image, mem, initrd.map(|i| i.len() as u64)).map_err(GuestError::Layout)?;
    let vmid = u16::try_from(id).map_err(|_| GuestError::TooManyPartitions)?;
    let block = m.alloc_guest_ram(mem).map_err(GuestError::Machine)?;
    // The image (SYSTEM_RESET reloads it) and the initrd survive updates
    // too: record them now, at allocation, not at update time.
    for r in core::iter::once(spec.image).chain(spec.initrd) {
        m.preserved.preserve(&mut m.frames, r.base..r.base + r.size).map_err(GuestError::PreserveImage)?;
    }
    let ram = GuestRam { host_base: block.base, size: mem };
    // SAFETY: the block was just allocated for this partition.
    unsafe { core::ptr::write_bytes(block.base as *mut u8, 0, mem as usize) };
    if let (Some(bytes), Some(off)) = (initrd, layout.initrd_offset) {
        // SAFETY: `layout` placed the initrd inside RAM below the DTB slot.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), (block.base + off) as *mut u8, bytes.len()) };
    }
    // Devices: only behind the SMMU (DMA must be confined like the CPU).
    let mut assigned = Vec::new();
    let mut next_ipa = GUEST_DEVICE_IPA;
    let mut cmdline = spec.cmdline.clone();
    for &bdf in &spec.devices {
        if m.arch.smmu.is_none() {
            return Err(GuestError::DeviceWithoutIommu);
        }
        let host = m.arch.pci.as_mut().ok_or(GuestError::NoPciHost)?;
        let a = devices::assign(host, bdf.into(), &mut next_ipa).map_err(GuestError::Assign)?;
        // The guest learns where each BAR is from its command line:
        // dev0=<IPA> dev1=<IPA> ... in assignment order.
        let before = assigned.iter().map(|x: &devices::Assigned| x.ipas.len()).sum::<usize>();
        for (k, ipa) in a.ipas.iter().enumerate() {
            let _ = write!(cmdline, " dev{}={ipa:#x}", before + k);
        }
        assigned.push(a);
    }
    let dtb = device_tree(mem, spec.vcpus, &cmdline, &layout, spec.initrd);
    guest_image::check_dtb(dtb.len()).map_err(GuestError::DtbTooLarge)?;
    load_image(ram, image, &layout, &dtb);
    // SAFETY: RAM is identity-mapped at EL2, so physical = virtual.
    let phys = unsafe { LinearMap::new(0) };
    let Machine { frames, preserved, arch, .. } = m;
    let mut frames = hypervisor::preserved::PreservingFrames { frames, map: preserved };
    let mut stage2 = Stage2Table::<ArmStage2, LinearMap>::new(&mut frames, phys).map_err(GuestError::Stage2)?;
    stage2
        .map(GUEST_RAM_BASE, block.base, mem, Attrs::ram(Perms::new(true, true)), &mut frames)
        .map_err(GuestError::Stage2)?;
    for a in &assigned {
        for (bar, &ipa) in a.bars.iter().zip(&a.ipas) {
            stage2.map(ipa, bar.cpu.base, bar.cpu.size, Attrs::device(), &mut frames).map_err(GuestError::Stage2)?;
        }
        let smmu = arch.smmu.as_mut().ok_or(GuestError::DeviceWithoutIommu)?;
        smmu.assign(&mut frames, a.stream_id, vmid, stage2.root()).map_err(GuestError::Smmu)?;
        hv_event!(
            "device-assigned",
            guest = id,
            bdf = a.bdf,
            bar0 = format_args!("{:#x}", a.bars.first().map_or(0, |b| b.cpu.base)),
            ipa = format_args!("{:#x}", a.ipas.first().copied().unwrap_or(0)),
            stream = format_args!("{:#x}", a.stream_id),
        );
    }
    // Virtual MPIDR: RES1 bit 31, Aff0 = vCPU index.
    let contexts =
        (0..spec.vcpus).map(|i| Vcpu::new(layout.entry_ipa, layout.dtb_ipa(), (1 << 31) | u64::from(i))).collect();
    let root = stage2.root();
    let entry = layout.entry_ipa;
    let vgic = Vgic::new(spec.vcpus as usize);
    let part = ArmPartition {
        stage2,
        image,
        format: spec.format,
        initrd: spec.initrd,
        cmdline,
        layout,
        vgic,
        uart: Pl011::default(),
    };
    let info = PartitionInfo { id, name: spec.name.clone(), privileged: spec.privileged, ram, vcpus: spec.vcpus };
    let p = m.add_partition(info, vmid, part, contexts).map_err(GuestError::Machine)?;
    hv_event!(
        "guest-start",
        id = id,
        name = spec.name,
        mem_mib = spec.mem_mib,
        vcpus = spec.vcpus,
        privileged = u8::from(spec.privileged),
        entry = format_args!("{entry:#x}"),
        stage2_root = format_args!("{root:#x}"),
        cpu = m.vcpus[m.partitions[p].vcpus[0]].pcpu,
        ram = format_args!("{:#x}", block.base),
    );
    Ok(())
}

/// Builds every partition of the manifest and installs the machine.
/// Returns how many started.
pub fn create(
    specs: &[GuestSpec],
    ram: &[PhysRange],
    frames: FrameAllocator,
    scratch: ScratchPlan,
    online: &[usize],
    io: (Option<PhysRange>, Option<PciHost>),
) -> usize {
    let memory = MachineMemory { frames, preserved: PreservedMap::new(IdentityPages), scratch, ram: ram.to_vec() };
    let mut m = Machine::new(Aarch64 { smmu: None, pci: io.1 }, memory, online);
    if let Some(regs) = io.0 {
        m.arch.smmu = init_smmu(&mut m, regs);
    }
    let n = m.build_partitions(specs, build_partition);
    MACHINE.install(m);
    n
}

/// Brings up the SMMU: every stream aborts until a guest is given it.
fn init_smmu(m: &mut Machine<Aarch64>, regs: PhysRange) -> Option<Smmu> {
    let base = core::ptr::NonNull::new(regs.base as *mut u8)?;
    // SAFETY: the DTB's SMMU register frame, mapped as device memory by the
    // host map and used by this driver only.
    let mmio = unsafe { iommu::MmioRegs::new(base) };
    // SAFETY: RAM is identity-mapped at EL2.
    let phys = unsafe { iommu::LinearMap::new(0) };
    let mut frames = m.preserving_frames();
    match Smmu::init(mmio, phys, &mut frames, iommu::SmmuConfig::default()) {
        Ok(smmu) => {
            let st = smmu.state();
            hv_event!(
                "iommu",
                kind = "smmuv3",
                base = format_args!("{:#x}", regs.base),
                strtab = format_args!("{:#x}", st.strtab_base),
                cmdq = format_args!("{:#x}", st.cmdq_base),
                evtq = format_args!("{:#x}", st.evtq_base),
                unassigned_streams = "abort",
            );
            Some(smmu)
        }
        Err(e) => {
            println!("smmu: {e}");
            hv_event!("iommu-failed", reason = "init");
            None
        }
    }
}

/// SYSTEM_RESET: reload the image and device tree, restart vCPU 0, turn the
/// other vCPUs off. Each vCPU's owning CPU applies its own restart.
pub fn reset_partition(m: &mut Machine<Aarch64>, p: usize) {
    let part = &m.partitions[p];
    hv_event!("guest-reset", id = part.info.id);
    let a = &part.arch;
    let dtb = device_tree(part.info.ram.size, part.info.vcpus, &a.cmdline, &a.layout, a.initrd);
    load_image(part.info.ram, a.image, &a.layout, &dtb);
    let (entry, dtb_ipa) = (a.layout.entry_ipa, a.layout.dtb_ipa());
    // A reset GIC and UART, as on a machine that restarts.
    let vcpus = m.partitions[p].vcpus.len();
    m.partitions[p].arch.vgic = Vgic::new(vcpus);
    m.partitions[p].arch.uart = Pl011::default();
    for k in 0..m.partitions[p].vcpus.len() {
        let t = m.partitions[p].vcpus[k];
        let slot = &mut m.vcpus[t];
        slot.pending = 0;
        if slot.index == 0 {
            slot.start = Some((entry, dtb_ipa));
            slot.state = VcpuState::Runnable;
        } else {
            slot.state = VcpuState::Off;
        }
        m.post(t, 0);
    }
}
