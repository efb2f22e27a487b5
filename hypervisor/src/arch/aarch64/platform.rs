//! The aarch64 side of the machine (`hypervisor::machine::Arch`): vCPU
//! contexts at EL1, kicks by SGI, power-off by PSCI, each partition's
//! stage-2 table and guest image, and the SMMU's handover record.

use alloc::string::String;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use hypervisor::arch::aarch64::pl011::Pl011;
use hypervisor::arch::aarch64::vgic::{Vgic, DIST_BYTES, REDIST_BYTES};
use hypervisor::guest_dtb::{self, GuestDtbSpec};
use hypervisor::guest_image::{self, GuestLayout};
use hypervisor::machine::{Arch, Handover, Machine, MachineLock, Partition, RestoreError, SaveError};
use hypervisor::partition::GUEST_RAM_BASE;
use hypervisor::preserved::IdentityPages;
use hypervisor::records::{
    field_text, format_code, format_of, text_field, IommuRecord, PartitionRecord, VgicRecord, CMDLINE_BYTES,
    VGIC_STATE_BYTES,
};
use hypervisor::stage2::{ArmStage2, LinearMap, Stage2Table};
use kho::HandoverWriter;
use loader::manifest::ImageFormat;
use loader::PhysRange;
use sparse_bitmap::MultiOrderBitmap;

use super::devices::PciHost;
use super::gic::{self, PPI_VIRT_TIMER};
use super::vcpu::{Vcpu, CONTEXT_FORMAT, CONTEXT_FORMAT_V1, CONTEXT_LEN};
use super::MAX_CPUS;

/// The SMMUv3 driver on the real registers, identity-mapped tables.
pub type Smmu = iommu::Smmu<iommu::MmioRegs, iommu::LinearMap>;

/// Machine-wide aarch64 state: the SMMU confining assigned devices and the
/// PCIe host they sit behind, if the platform has them.
pub struct Aarch64 {
    pub smmu: Option<Smmu>,
    pub pci: Option<PciHost>,
}

/// The aarch64 part of a partition.
pub struct ArmPartition {
    pub stage2: Stage2Table<ArmStage2, LinearMap>,
    /// For SYSTEM_RESET and the handover: the image, its format, initrd
    /// and command line, and where they go.
    pub image: &'static [u8],
    pub format: ImageFormat,
    pub initrd: Option<PhysRange>,
    pub cmdline: String,
    pub layout: GuestLayout,
    /// The virtual GICv3 its vCPUs see.
    pub vgic: Vgic,
    /// The emulated PL011.
    pub uart: Pl011,
}

/// The virtual timer's bit in a version-1 `vcpu` record's `pending`.
const V1_PENDING_VTIMER: u32 = 1 << 16;

/// The one machine of this image (the access rule: `hypervisor::machine`).
pub static MACHINE: MachineLock<Aarch64> = MachineLock::new();

/// MPIDR of each physical CPU, by CPU index (the DTB order); written at
/// boot, before the other CPUs start.
pub static CPU_MPIDR: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(u64::MAX) }; MAX_CPUS];
const _: () = assert!(MAX_CPUS == hypervisor::machine::MAX_CPUS);

pub fn set_cpu(index: usize, mpidr: u64) {
    if let Some(slot) = CPU_MPIDR.get(index) {
        slot.store(mpidr & 0xff_00ff_ffff, Ordering::Relaxed);
    }
}

/// This CPU's index.
pub fn cpu_index() -> usize {
    let me = super::mpidr() & 0xff_00ff_ffff;
    CPU_MPIDR.iter().position(|m| m.load(Ordering::Relaxed) == me).unwrap_or(0)
}

/// Interrupts CPU `cpu` (an SGI), so it leaves its guest.
pub fn kick(cpu: usize) {
    if let Some(m) = CPU_MPIDR.get(cpu) {
        gic::kick(m.load(Ordering::Relaxed) & 0xff);
    }
}

/// The guest's device tree: derived from its RAM size, vCPUs, command line
/// and initrd, so it is rebuilt when needed (boot, SYSTEM_RESET) rather
/// than kept, or carried across a live update.
pub fn device_tree(
    ram_size: u64,
    vcpus: u32,
    bootargs: &str,
    layout: &GuestLayout,
    initrd: Option<PhysRange>,
) -> alloc::vec::Vec<u8> {
    guest_dtb::build(&GuestDtbSpec {
        ram_size,
        vcpus,
        bootargs,
        initrd: layout.initrd_offset.map(|o| GUEST_RAM_BASE + o).zip(initrd.map(|r| r.size)),
    })
}

/// Bytes of RAM at `range`, if it lies wholly in `ram`.
pub fn phys_bytes(range: PhysRange, ram: &[PhysRange]) -> Option<&'static [u8]> {
    if !ram.iter().any(|r| r.contains(&range)) {
        return None;
    }
    // SAFETY: the range lies inside RAM described by the DTB, identity-
    // mapped; it is a boot module, a preserved guest image or the
    // handover, reserved from the frame allocator, and only read.
    Some(unsafe { core::slice::from_raw_parts(range.base as *const u8, usize::try_from(range.size).ok()?) })
}

impl Arch for Aarch64 {
    type Vcpu = Vcpu;
    type Partition = ArmPartition;
    type Pages = IdentityPages;
    const CONTEXT_FORMAT: u32 = CONTEXT_FORMAT;
    const CONTEXT_MAX: usize = CONTEXT_LEN;

    fn this_cpu(&self) -> usize {
        cpu_index()
    }

    fn kick(&self, cpu: usize) {
        kick(cpu);
    }

    fn put(&mut self, vcpu: &mut Vcpu) {
        vcpu.put();
        // No maintenance interrupt for list registers nobody runs on.
        gic::refill_when_drained(false);
    }

    fn power_off(&mut self, ok: bool) {
        super::shutdown(ok)
    }

    fn report_pending(m: &mut Machine<Self>) {
        super::smmu::poll_smmu(m);
    }

    /// Version 1 of the `vcpu` record had SGIs in bits 0-15 and the
    /// virtual timer in bit 16; now bit n is private INTID n.
    fn pending_to_v1(pending: u32) -> u32 {
        (pending & 0xffff) | if pending & (1 << PPI_VIRT_TIMER) != 0 { V1_PENDING_VTIMER } else { 0 }
    }

    fn pending_from_v1(pending: u32) -> u32 {
        (pending & 0xffff) | if pending & V1_PENDING_VTIMER != 0 { 1 << PPI_VIRT_TIMER } else { 0 }
    }

    fn reads_context_format(format: u32) -> bool {
        format == CONTEXT_FORMAT || format == CONTEXT_FORMAT_V1
    }

    fn stage2_root(p: &ArmPartition) -> u64 {
        p.stage2.root()
    }

    fn save_context(vcpu: &Vcpu, out: &mut [u8]) -> Option<usize> {
        vcpu.to_context(out)
    }
}

impl Handover for Aarch64 {
    const IMAGES_PRESERVED: bool = true;

    fn record_partition(p: &Partition<Self>, rec: &mut PartitionRecord) {
        let a = &p.arch;
        rec.stage2_root = a.stage2.root();
        rec.image_format = format_code(a.format);
        rec.image_base = a.image.as_ptr() as u64;
        rec.image_size = a.image.len() as u64;
        rec.initrd_base = a.initrd.map_or(0, |r| r.base);
        rec.initrd_size = a.initrd.map_or(0, |r| r.size);
        rec.cmdline_len = a.cmdline.len().min(CMDLINE_BYTES) as u32;
        rec.cmdline = text_field(&a.cmdline);
    }

    type PartitionState = VgicRecord;

    fn partition_state(p: &Partition<Self>) -> Result<Option<VgicRecord>, SaveError> {
        let mut rec = VgicRecord { vcpus: p.info.vcpus, len: 0, state: [0; VGIC_STATE_BYTES] };
        let len = p.arch.vgic.encode_into(&mut rec.state).ok_or(SaveError::Device("vgic-state-too-large"))?;
        rec.len = len as u32;
        Ok(Some(rec))
    }

    /// The `vgic` record's `state[..len]`: the distributor, then each
    /// vCPU's redistributor.
    const TABLE_STATE_LAYOUT: u32 = 1;

    fn table_state_len(p: &Partition<Self>) -> usize {
        DIST_BYTES + REDIST_BYTES * p.arch.vgic.cpus.len()
    }

    fn write_table_state(p: &Partition<Self>, out: &mut [u8]) -> Result<usize, SaveError> {
        p.arch.vgic.encode_into(out).ok_or(SaveError::Device("vgic-state-too-large"))
    }

    fn read_table_state(rec: &PartitionRecord, layout: u32, bytes: &[u8]) -> Result<VgicRecord, RestoreError> {
        if layout != Self::TABLE_STATE_LAYOUT {
            return Err(RestoreError::BadField("vgic-layout"));
        }
        let mut state = [0; VGIC_STATE_BYTES];
        state.get_mut(..bytes.len()).ok_or(RestoreError::BadField("vgic-state"))?.copy_from_slice(bytes);
        Ok(VgicRecord { vcpus: rec.vcpus, len: bytes.len() as u32, state })
    }

    fn record_devices(&self, w: &mut HandoverWriter) -> Result<(), SaveError> {
        if let Some(smmu) = self.smmu.as_ref() {
            let rec = IommuRecord::from_state(&smmu.state()).ok_or(SaveError::Device("too-many-iommu-assignments"))?;
            w.subsystem("iommu")
                .and_then(|mut s| s.add_record(&rec))
                .map_err(|error| SaveError::Handover { what: "iommu", error })?;
        }
        Ok(())
    }

    fn adopt_partition(
        &mut self,
        rec: &PartitionRecord,
        state: Option<VgicRecord>,
        ram: &[PhysRange],
    ) -> Result<ArmPartition, RestoreError> {
        let vcpus = rec.vcpus as usize;
        // A handover from an image without a virtual GIC: one that behaves
        // as that image did, every interrupt enabled and forwarded, so its
        // guests keep getting their interrupts.
        let vgic = match state {
            Some(v) => {
                let len = (v.len as usize).min(VGIC_STATE_BYTES);
                Vgic::decode(&v.state[..len], vcpus).ok_or(RestoreError::BadField("vgic-state"))?
            }
            None => Vgic::permissive(vcpus),
        };
        let adopt_ram: alloc::vec::Vec<(u64, u64)> = ram.iter().map(|r| (r.base, r.size)).collect();
        // Assigned BARs are stage-2 leaves outside RAM, inside the PCI window.
        let devices: alloc::vec::Vec<(u64, u64)> = self.pci.iter().map(|p| (p.mmio32.base, p.mmio32.size)).collect();
        // SAFETY: RAM is identity-mapped at EL2.
        let phys = unsafe { LinearMap::new(0) };
        let stage2 = Stage2Table::<ArmStage2, LinearMap>::adopt(rec.stage2_root, &adopt_ram, &devices, phys)
            .map_err(|error| RestoreError::Stage2 { id: rec.id, error })?;
        let image = phys_bytes(PhysRange::new(rec.image_base, rec.image_size), ram)
            .ok_or(RestoreError::BadField("image-outside-ram"))?;
        let format = format_of(rec.image_format).ok_or(RestoreError::BadField("image-format"))?;
        let initrd = (rec.initrd_size != 0).then(|| PhysRange::new(rec.initrd_base, rec.initrd_size));
        let cmdline = String::from(field_text(&rec.cmdline[..(rec.cmdline_len as usize).min(CMDLINE_BYTES)]));
        let layout = guest_image::layout(format, image, rec.ram_size, initrd.map(|r| r.size))
            .map_err(|_| RestoreError::BadField("image-layout"))?;
        Ok(ArmPartition { stage2, image, format, initrd, cmdline, layout, vgic, uart: Pl011::default() })
    }

    fn restore_context(
        &self,
        format: u32,
        bytes: &[u8],
        _: &MultiOrderBitmap<IdentityPages>,
    ) -> Result<Vcpu, RestoreError> {
        Vcpu::from_context(format, bytes).ok_or(RestoreError::Arch("vcpu-context"))
    }
}

/// Adopts the running SMMU from its record: translation stays enabled, the
/// SMMU is not reset, and every structure is checked against the live
/// registers and RAM.
pub fn adopt_smmu(rec: &IommuRecord, regs: PhysRange, ram: &[PhysRange]) -> Result<Smmu, RestoreError> {
    let state = rec.to_state().ok_or(RestoreError::BadField("iommu-record-fields"))?;
    let base = NonNull::new(regs.base as *mut u8).ok_or(RestoreError::Arch("smmu-address"))?;
    // SAFETY: the DTB's SMMU register frame, mapped as device memory by the
    // host map and used by this driver only.
    let mmio = unsafe { iommu::MmioRegs::new(base) };
    // SAFETY: RAM is identity-mapped at EL2.
    let phys = unsafe { iommu::LinearMap::new(0) };
    let adopt_ram: alloc::vec::Vec<(u64, u64)> = ram.iter().map(|r| (r.base, r.size)).collect();
    let smmu = Smmu::adopt(mmio, phys, &state, &adopt_ram, iommu::SmmuConfig::DEFAULT_SPIN_BUDGET).map_err(|e| {
        hypervisor::println!("smmu adopt: {e}");
        RestoreError::Arch("smmu-adopt")
    })?;
    hypervisor::hv_event!(
        "iommu-adopted",
        strtab = format_args!("{:#x}", state.strtab_base),
        cmdq = format_args!("{:#x}", state.cmdq_base),
        evtq = format_args!("{:#x}", state.evtq_base),
        streams = state.assignments.len(),
        // Faults recorded since the old image last polled (its blackout
        // included): the first poll reports them against their guests.
        events_waiting = EventsWaiting(smmu.events_waiting()),
    );
    Ok(smmu)
}

/// `events_waiting=` of `hv: iommu-adopted`: a count, or `inconsistent`.
struct EventsWaiting(Option<u32>);

impl core::fmt::Display for EventsWaiting {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("inconsistent"),
        }
    }
}
