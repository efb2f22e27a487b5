//! Running partitions on aarch64: building them from the boot manifest,
//! scheduling their vCPUs on the physical CPUs, and handling every exit
//! (hypercalls, PSCI, WFI, SGIs, the emulated console, stage-2 faults and
//! interrupts). Guests are confined by their own stage-2 table and VMID.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::arch::asm;
use core::fmt::Write as _;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use hvcall::{PartitionState, SMCCC_VENDOR_HYP_CALL};
use hypervisor::frames::FrameAllocator;
use hypervisor::guest_console::LineBuffer;
use hypervisor::guest_dtb::{
    self, GuestDtbSpec, GUEST_GICD, GUEST_GICR, GUEST_GICR_STRIDE, GUEST_UART, GUEST_UART_SIZE,
};
use hypervisor::guest_image::{self, GuestLayout};
use hypervisor::hypercall::{self, Action, IdentityMemory, RunningHv};
use hypervisor::partition::{GuestRam, PartitionInfo, GUEST_RAM_BASE};
use hypervisor::sched::{pick_next, VcpuState};
use hypervisor::stage2::{ArmStage2, Attrs, LinearMap, Perms, Stage2Table};
use hypervisor::update::{IdentityPages, PreservedMap, PreservingFrames};
use hypervisor::{hv_event, println};
use kho::ScratchPlan;
use loader::manifest::{GuestSpec, ImageFormat};
use loader::PhysRange;
use spin::Mutex;

use super::devices::{self, PciHost, GUEST_DEVICE_IPA};
use super::gic::{self, PPI_HYP_TIMER, PPI_VIRT_TIMER};
use super::vcpu::{self, GuestRegs, Vcpu, CNTV_IMASK};
use super::MAX_CPUS;

/// HCR_EL2 for guests (Arm ARM D19.2.48): VM (stage 2 on), SWIO, FMO/IMO/
/// AMO (physical interrupts to EL2, virtual ones to the guest), TWI (trap
/// WFI), TSC (trap SMC), RW (EL1 is AArch64).
const HCR_GUEST: u64 = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 13) | (1 << 19) | (1 << 31);
/// VTCR_EL2 (D19.2.176): the stage-2 engine's geometry, RES1 bit 31, and
/// PS from PARange.
const VTCR_RES1: u64 = 1 << 31;
const VTCR_PS_SHIFT: u64 = 16;
/// CNTHCTL_EL2 (D19.2.25): EL1PCTEN = 1 (guest may read the physical
/// counter), EL1PCEN = 0 (the EL1 physical timer traps).
const CNTHCTL_GUEST: u64 = 1;
/// Scheduling time slice.
const SLICE_MS: u64 = 10;
/// Bit of `VcpuSlot::pending` for the virtual timer (bits 0-15 are SGIs).
const PENDING_VTIMER: u32 = 1 << 16;
/// ESR_EL2.EC exception classes (Arm ARM D19.2.40, ESR_EL2).
const EC_WFX: u64 = 0x01;
const EC_HVC64: u64 = 0x16;
const EC_SMC64: u64 = 0x17;
const EC_SYSREG: u64 = 0x18;
const EC_IABT_LOWER: u64 = 0x20;
const EC_DABT_LOWER: u64 = 0x24;
/// ISS of a trapped MSR/MRS (D19.2.40): Op0, Op2, Op1, CRn, Rt, CRm, Dir.
const SYSREG_MASK: u64 = 0x3f_fc1e;
/// ICC_SGI1R_EL1 = S3_0_C12_C11_5 in that encoding.
const SYSREG_ICC_SGI1R: u64 = (3 << 20) | (5 << 17) | (12 << 10) | (11 << 1);
/// Data abort ISS: ISV (24), SAS (23:22), SRT (20:16), WnR (6).
const DABT_ISV: u64 = 1 << 24;
const DABT_WNR: u64 = 1 << 6;
/// PSCI function ids (DEN0022E §5.1) and return codes (§5.2.2).
const PSCI_VERSION: u64 = 0x8400_0000;
const PSCI_CPU_OFF: u64 = 0x8400_0002;
const PSCI_CPU_ON_32: u64 = 0x8400_0003;
const PSCI_CPU_ON_64: u64 = 0xc400_0003;
const PSCI_AFFINITY_INFO_32: u64 = 0x8400_0004;
const PSCI_AFFINITY_INFO_64: u64 = 0xc400_0004;
const PSCI_SYSTEM_OFF: u64 = 0x8400_0008;
const PSCI_SYSTEM_RESET: u64 = 0x8400_0009;
const PSCI_FEATURES: u64 = 0x8400_000a;
const PSCI_1_1: i64 = 0x1_0001;
const PSCI_NOT_SUPPORTED: i64 = -1;
const PSCI_INVALID_PARAMETERS: i64 = -2;
const PSCI_ALREADY_ON: i64 = -4;
/// PL011 registers the console emulation implements: UARTDR, UARTFR.
const UART_DR: u64 = 0x000;
const UART_FR: u64 = 0x018;
/// UARTFR: TXFE | RXFE (transmit FIFO empty, nothing to receive).
const UART_FR_IDLE: u64 = 0x90;

/// A partition at run time.
pub(super) struct Partition {
    pub(super) info: PartitionInfo,
    pub(super) state: PartitionState,
    pub(super) stage2: Stage2Table<ArmStage2, LinearMap>,
    pub(super) vmid: u16,
    pub(super) console: LineBuffer,
    pub(super) vcpus: Vec<usize>,
    /// For SYSTEM_RESET and the handover: the image, its format, initrd
    /// and command line, and where they go.
    pub(super) image: &'static [u8],
    pub(super) format: ImageFormat,
    pub(super) initrd: Option<PhysRange>,
    pub(super) cmdline: String,
    pub(super) layout: GuestLayout,
}

impl Partition {
    /// The guest's device tree: derived from its RAM size, vCPUs, command
    /// line and initrd, so it is rebuilt when needed (boot, SYSTEM_RESET)
    /// rather than kept, or carried across a live update.
    pub(super) fn device_tree(&self) -> Vec<u8> {
        device_tree(self.info.ram.size, self.info.vcpus, &self.cmdline, &self.layout, self.initrd)
    }
}

fn device_tree(ram_size: u64, vcpus: u32, bootargs: &str, layout: &GuestLayout, initrd: Option<PhysRange>) -> Vec<u8> {
    guest_dtb::build(&GuestDtbSpec {
        ram_size,
        vcpus,
        bootargs,
        initrd: layout.initrd_offset.map(|o| GUEST_RAM_BASE + o).zip(initrd.map(|r| r.size)),
    })
}

/// A vCPU's scheduling record. The context behind `ctx` is touched only by
/// the physical CPU the vCPU is pinned to.
pub(super) struct VcpuSlot {
    pub(super) ctx: NonNull<Vcpu>,
    pub(super) partition: usize,
    pub(super) index: u32,
    pub(super) pcpu: usize,
    pub(super) state: VcpuState,
    /// Virtual interrupts to inject: bits 0-15 SGIs, [`PENDING_VTIMER`].
    pub(super) pending: u32,
    /// A (pc, x0) to start from, applied by the owning CPU (PSCI CPU_ON,
    /// SYSTEM_RESET), so no CPU writes another CPU's loaded context.
    pub(super) start: Option<(u64, u64)>,
}

// SAFETY: a slot's context is only dereferenced by its owning physical CPU
// (`pcpu`), under the machine lock or while that CPU runs the vCPU.
unsafe impl Send for VcpuSlot {}

pub(super) struct Machine {
    pub(super) partitions: Vec<Partition>,
    pub(super) vcpus: Vec<VcpuSlot>,
    pub(super) queues: [Vec<usize>; MAX_CPUS],
    /// The vCPU whose state is in each CPU's registers.
    pub(super) loaded: [Option<usize>; MAX_CPUS],
    pub(super) frames: FrameAllocator,
    pub(super) cpus: usize,
    /// Everything that survives a live update, recorded as it is allocated.
    pub(super) preserved: PreservedMap<IdentityPages>,
    /// Where the next image is staged; the same regions on every update.
    pub(super) scratch: ScratchPlan,
    /// The machine's RAM.
    pub(super) ram: Vec<PhysRange>,
    pub(super) update_count: u64,
    /// Test hook: the next update's freeze fails.
    pub(super) fail_next_freeze: bool,
    /// The SMMU confining assigned devices, if the platform has one.
    pub(super) smmu: Option<Smmu>,
    pub(super) pci: Option<PciHost>,
}

/// The SMMUv3 driver on the real registers, identity-mapped tables.
pub(super) type Smmu = iommu::Smmu<iommu::MmioRegs, iommu::LinearMap>;

pub(super) static MACHINE: Mutex<Option<Machine>> = Mutex::new(None);
static STARTED: AtomicBool = AtomicBool::new(false);
static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);
/// MPIDR of each physical CPU, by CPU index (the DTB order).
pub(super) static CPU_MPIDR: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(u64::MAX) }; MAX_CPUS];
/// Stack top of each CPU, for re-entering guests with an empty stack.
static STACK_TOP: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];

extern "C" {
    fn guest_enter(frame: *mut GuestRegs, stack_top: usize) -> !;
}

pub fn set_cpu(index: usize, mpidr: u64) {
    if let Some(slot) = CPU_MPIDR.get(index) {
        slot.store(mpidr & 0xff_00ff_ffff, Ordering::Relaxed);
    }
}

pub(super) fn cpu_index() -> usize {
    let me = super::mpidr() & 0xff_00ff_ffff;
    CPU_MPIDR.iter().position(|m| m.load(Ordering::Relaxed) == me).unwrap_or(0)
}

/// Errors building a partition; the partition is skipped, the others run.
fn build_error(name: &str, reason: &str) {
    hv_event!("guest-refused", name = name, reason = reason);
}

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
pub(super) fn load_image(ram: GuestRam, image: &[u8], layout: &GuestLayout, dtb: &[u8]) {
    for c in &layout.copies {
        let dst = ram.host_base + c.ram_offset;
        let src = &image[c.src_offset as usize..(c.src_offset + c.len) as usize];
        // SAFETY: `layout` checked every copy against the RAM size, and the
        // source range against the image file, in `guest_image::layout` /
        // `build_partition`; the RAM block belongs to this partition only.
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

pub(super) fn image_bytes(range: PhysRange, ram: &[PhysRange]) -> Option<&'static [u8]> {
    if !ram.iter().any(|r| r.contains(&range)) {
        return None;
    }
    // SAFETY: the range lies inside RAM described by the DTB, is reserved
    // from the frame allocator, and is only read.
    Some(unsafe { core::slice::from_raw_parts(range.base as *const u8, usize::try_from(range.size).ok()?) })
}

#[allow(clippy::too_many_lines)]
fn build_partition(
    m: &mut Machine,
    id: u32,
    spec: &GuestSpec,
    ram_map: &[PhysRange],
    next_cpu: &mut usize,
) -> Result<(), &'static str> {
    let image = image_bytes(spec.image, ram_map).ok_or("image-outside-ram")?;
    let initrd = match spec.initrd {
        Some(r) => Some(image_bytes(r, ram_map).ok_or("initrd-outside-ram")?),
        None => None,
    };
    let mem = spec.mem_mib << 20;
    let layout = guest_image::layout(spec.format, image, mem, initrd.map(|i| i.len() as u64)).map_err(|e| {
        println!("guest {}: {e}", spec.name);
        "bad-image-layout"
    })?;
    let block = m.frames.alloc_block(mem).ok_or("out-of-memory")?;
    // Guest RAM, the image (SYSTEM_RESET reloads it) and the initrd survive
    // updates: record them now, at allocation, not at update time.
    m.preserved.preserve(&mut m.frames, block.base..block.base + block.size).map_err(|_| "preserve-ram")?;
    for r in core::iter::once(spec.image).chain(spec.initrd) {
        m.preserved.preserve(&mut m.frames, r.base..r.base + r.size).map_err(|_| "preserve-image")?;
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
        if m.smmu.is_none() {
            return Err("device-without-iommu");
        }
        let host = m.pci.as_mut().ok_or("no-pci-host")?;
        let a = devices::assign(host, bdf.into(), &mut next_ipa)?;
        // The guest learns where each BAR is from its command line:
        // dev0=<IPA> dev1=<IPA> ... in assignment order.
        let before = assigned.iter().map(|x: &devices::Assigned| x.ipas.len()).sum::<usize>();
        for (k, ipa) in a.ipas.iter().enumerate() {
            let _ = write!(cmdline, " dev{}={ipa:#x}", before + k);
        }
        assigned.push(a);
    }
    let dtb = device_tree(mem, spec.vcpus, &cmdline, &layout, spec.initrd);
    guest_image::check_dtb(dtb.len()).map_err(|_| "dtb-too-large")?;
    load_image(ram, image, &layout, &dtb);
    // SAFETY: RAM is identity-mapped at EL2, so physical = virtual.
    let phys = unsafe { LinearMap::new(0) };
    let smmu = &mut m.smmu;
    let mut frames = PreservingFrames { frames: &mut m.frames, map: &mut m.preserved };
    let mut stage2 = Stage2Table::<ArmStage2, LinearMap>::new(&mut frames, phys).map_err(|_| "stage2-alloc")?;
    stage2
        .map(GUEST_RAM_BASE, block.base, mem, Attrs::ram(Perms::new(true, true)), &mut frames)
        .map_err(|_| "stage2-map")?;
    let vmid = u16::try_from(id).map_err(|_| "too-many-partitions")?;
    for a in &assigned {
        for (bar, &ipa) in a.bars.iter().zip(&a.ipas) {
            stage2.map(ipa, bar.cpu.base, bar.cpu.size, Attrs::device(), &mut frames).map_err(|_| "stage2-map-bar")?;
        }
        let smmu = smmu.as_mut().ok_or("device-without-iommu")?;
        smmu.assign(&mut frames, a.stream_id, vmid, stage2.root()).map_err(|e| {
            println!("smmu: assigning stream {:#x}: {e}", a.stream_id);
            "smmu-assign"
        })?;
        hv_event!(
            "device-assigned",
            guest = id,
            bdf = a.bdf,
            bar0 = format_args!("{:#x}", a.bars.first().map_or(0, |b| b.cpu.base)),
            ipa = format_args!("{:#x}", a.ipas.first().copied().unwrap_or(0)),
            stream = format_args!("{:#x}", a.stream_id),
        );
    }
    let p = m.partitions.len();
    let mut vcpus = Vec::new();
    for i in 0..spec.vcpus {
        // Virtual MPIDR: RES1 bit 31, Aff0 = vCPU index.
        let ctx = Box::leak(Box::new(Vcpu::new(layout.entry_ipa, layout.dtb_ipa(), (1 << 31) | u64::from(i))));
        let pcpu = *next_cpu % m.cpus;
        *next_cpu += 1;
        let v = m.vcpus.len();
        m.vcpus.push(VcpuSlot {
            ctx: NonNull::from(ctx),
            partition: p,
            index: i,
            pcpu,
            state: if i == 0 { VcpuState::Runnable } else { VcpuState::Off },
            pending: 0,
            start: None,
        });
        m.queues[pcpu].push(v);
        vcpus.push(v);
    }
    hv_event!(
        "guest-start",
        id = id,
        name = spec.name,
        mem_mib = spec.mem_mib,
        vcpus = spec.vcpus,
        privileged = u8::from(spec.privileged),
        entry = format_args!("{:#x}", layout.entry_ipa),
        stage2_root = format_args!("{:#x}", stage2.root()),
        cpu = m.vcpus[vcpus[0]].pcpu,
        ram = format_args!("{:#x}", block.base),
    );
    m.partitions.push(Partition {
        info: PartitionInfo { id, name: spec.name.clone(), privileged: spec.privileged, ram, vcpus: spec.vcpus },
        state: PartitionState::Running,
        stage2,
        vmid,
        console: LineBuffer::default(),
        vcpus,
        image,
        format: spec.format,
        initrd: spec.initrd,
        cmdline,
        layout,
    });
    Ok(())
}

/// Builds every partition of the manifest. Returns how many started.
pub fn create(
    specs: &[GuestSpec],
    ram_map: &[PhysRange],
    frames: FrameAllocator,
    scratch: ScratchPlan,
    cpus: usize,
    io: (Option<PhysRange>, Option<PciHost>),
) -> usize {
    let mut m = Machine {
        partitions: Vec::new(),
        vcpus: Vec::new(),
        queues: Default::default(),
        loaded: [None; MAX_CPUS],
        frames,
        cpus: cpus.clamp(1, MAX_CPUS),
        preserved: PreservedMap::new(IdentityPages),
        scratch,
        ram: ram_map.to_vec(),
        update_count: 0,
        fail_next_freeze: false,
        smmu: None,
        pci: io.1,
    };
    if let Some(regs) = io.0 {
        m.smmu = init_smmu(&mut m, regs);
    }
    let mut next_cpu = 0;
    for (i, spec) in specs.iter().enumerate() {
        let id = i as u32 + 1;
        if let Err(reason) = build_partition(&mut m, id, spec, ram_map, &mut next_cpu) {
            build_error(&spec.name, reason);
        }
    }
    let n = m.partitions.len();
    *MACHINE.lock() = Some(m);
    n
}

/// Brings up the SMMU: every stream aborts until a guest is given it.
fn init_smmu(m: &mut Machine, regs: PhysRange) -> Option<Smmu> {
    let base = core::ptr::NonNull::new(regs.base as *mut u8)?;
    // SAFETY: the DTB's SMMU register frame, mapped as device memory by the
    // host map and used by this driver only.
    let mmio = unsafe { iommu::MmioRegs::new(base) };
    // SAFETY: RAM is identity-mapped at EL2.
    let phys = unsafe { iommu::LinearMap::new(0) };
    let mut frames = PreservingFrames { frames: &mut m.frames, map: &mut m.preserved };
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

/// Reports SMMU faults (polled on the scheduling tick): the DMA was
/// blocked; the guest keeps running. A device that faults on every word of
/// a transfer would flood the console, so consecutive events of one stream
/// and kind are reported once, with their first address and a count.
fn poll_smmu(m: &mut Machine) {
    let Some(smmu) = m.smmu.as_mut() else { return };
    let mut events: Vec<(iommu::Event, u64)> = Vec::new();
    let polled = smmu.poll_events(|e| match events.last_mut() {
        Some((last, n)) if last.stream_id == e.stream_id && last.kind == e.kind => *n += 1,
        _ => events.push((e, 1)),
    });
    if polled.is_err() {
        return;
    }
    for (e, count) in events {
        let vmid = smmu.assignment(e.stream_id).map(|a| a.vmid);
        let guest = m.partitions.iter().find(|p| Some(p.vmid) == vmid).map_or(0, |p| p.info.id);
        hv_event!(
            "fault",
            kind = "smmu",
            guest = guest,
            addr = format_args!("{:#x}", e.address()),
            stream = format_args!("{:#x}", e.stream_id),
            event = e.kind.name(),
            count = count,
        );
    }
}

/// Installs a machine rebuilt from a handover (live update).
pub(super) fn install(m: Machine) {
    *MACHINE.lock() = Some(m);
}

/// Lets the other CPUs into the scheduler.
pub fn release_secondaries() {
    STARTED.store(true, Ordering::Release);
    // SAFETY: SEV wakes CPUs waiting in WFE; no other effect.
    unsafe { asm!("dsb ish", "sev", options(nomem, nostack)) };
}

pub fn wait_for_start() {
    while !STARTED.load(Ordering::Acquire) {
        // SAFETY: waits for the boot CPU's SEV.
        unsafe { asm!("wfe", options(nomem, nostack)) };
    }
}

pub(super) fn arm_tick() {
    let (_, freq) = super::counter();
    // SAFETY: programs this CPU's EL2 physical timer (CNTHP), which only the
    // hypervisor uses.
    unsafe {
        asm!("msr cnthp_tval_el2, {0}", "msr cnthp_ctl_el2, {1}", "isb", in(reg) freq / 1000 * SLICE_MS, in(reg) 1u64,
             options(nomem, nostack));
    }
}

/// Per-CPU virtualization set-up, then the scheduler. Never returns.
pub fn run_cpu(cpu: usize, stack_slot: usize) -> ! {
    let bottom = core::ptr::addr_of!(super::__stacks_bottom) as usize;
    STACK_TOP[cpu].store(bottom + (stack_slot + 1) * super::STACK_SIZE, Ordering::Relaxed);
    let parange = super::mmu::parange();
    // SAFETY: EL2 configuration for running guests on this CPU (see the
    // constants); nothing runs at EL1 yet.
    unsafe {
        asm!(
            "msr hcr_el2, {hcr}",
            "msr vtcr_el2, {vtcr}",
            "msr cnthctl_el2, {cnthctl}",
            "msr cntvoff_el2, xzr",
            "msr cntv_ctl_el0, xzr",
            "isb",
            hcr = in(reg) HCR_GUEST,
            vtcr = in(reg) ArmStage2::VTCR_GEOMETRY | VTCR_RES1 | (parange.min(5) << VTCR_PS_SHIFT),
            cnthctl = in(reg) CNTHCTL_GUEST,
            options(nomem, nostack),
        );
    }
    if let Err(reason) = gic::init_cpu(super::mpidr()) {
        hv_event!("cpu-failed", cpu = cpu, reason = reason);
        super::park();
    }
    arm_tick();
    let next = schedule(cpu, false);
    super::update::note_resumed();
    // SAFETY: `next` is a live vCPU frame pinned to this CPU and loaded by
    // `schedule`; the stack top is this CPU's own stack.
    unsafe { guest_enter(next, STACK_TOP[cpu].load(Ordering::Relaxed)) }
}

/// Handles the physical interrupts pending on this CPU. Returns whether the
/// time slice ended.
fn handle_irqs(m: &mut Machine, cpu: usize) -> bool {
    let mut tick = false;
    loop {
        let intid = gic::ack();
        if intid >= gic::INTID_SPECIAL {
            break;
        }
        match intid {
            PPI_HYP_TIMER => {
                tick = true;
                arm_tick();
                poll_smmu(m);
            }
            PPI_VIRT_TIMER => {
                // The loaded vCPU's timer fired: mask it until the guest has
                // taken the virtual interrupt, then inject.
                vcpu::write_cntv_ctl(vcpu::read_cntv_ctl() | CNTV_IMASK);
                if let Some(v) = m.loaded[cpu] {
                    // SAFETY: the loaded vCPU belongs to this CPU.
                    unsafe { m.vcpus[v].ctx.as_mut() }.timer_masked_by_hv = true;
                    m.vcpus[v].pending |= PENDING_VTIMER;
                    wake(m, v);
                }
            }
            // SGI_KICK and anything else: the exit itself was the point.
            _ => {}
        }
        gic::end(intid);
    }
    tick
}

fn wake(m: &mut Machine, v: usize) {
    if m.vcpus[v].state == VcpuState::Waiting {
        m.vcpus[v].state = VcpuState::Runnable;
    }
}

/// Delivers a virtual interrupt to `v`, kicking its CPU if it runs elsewhere.
fn post(m: &mut Machine, v: usize, bit: u32) {
    m.vcpus[v].pending |= bit;
    wake(m, v);
    let pcpu = m.vcpus[v].pcpu;
    if pcpu != cpu_index() {
        gic::kick(CPU_MPIDR[pcpu].load(Ordering::Relaxed) & 0xff);
    }
}

/// Timers of vCPUs that are not loaded run in software.
fn check_soft_timers(m: &mut Machine, cpu: usize) {
    let now = vcpu::counter();
    for k in 0..m.queues[cpu].len() {
        let v = m.queues[cpu][k];
        if m.loaded[cpu] == Some(v) {
            continue;
        }
        // SAFETY: the vCPU is pinned to this CPU and not loaded.
        let ctx = unsafe { m.vcpus[v].ctx.as_mut() };
        let ctl = ctx.sys.cntv_ctl;
        if ctl & vcpu::CNTV_ENABLE != 0 && ctl & CNTV_IMASK == 0 && now >= ctx.sys.cntv_cval {
            ctx.sys.cntv_ctl |= CNTV_IMASK;
            ctx.timer_masked_by_hv = true;
            m.vcpus[v].pending |= PENDING_VTIMER;
            wake(m, v);
        }
    }
}

fn runnable(m: &Machine, v: usize) -> bool {
    let s = &m.vcpus[v];
    match s.state {
        VcpuState::Runnable => true,
        VcpuState::Waiting => s.pending != 0,
        VcpuState::Off | VcpuState::Stopped => false,
    }
}

/// Loads `v` on this CPU (if it is not already) and injects its pending
/// virtual interrupts into free list registers.
fn prepare_entry(m: &mut Machine, cpu: usize, v: usize) {
    if let Some((pc, x0)) = m.vcpus[v].start.take() {
        // SAFETY: `v` is pinned to this CPU; a loaded copy is dropped below.
        unsafe { m.vcpus[v].ctx.as_mut() }.reset(pc, x0);
        if m.loaded[cpu] == Some(v) {
            m.loaded[cpu] = None;
        }
    }
    if m.loaded[cpu] != Some(v) {
        if let Some(old) = m.loaded[cpu].take() {
            // SAFETY: `old` was loaded on this CPU, so it is pinned here.
            unsafe { m.vcpus[old].ctx.as_mut() }.put();
        }
        let p = &m.partitions[m.vcpus[v].partition];
        let vttbr = ArmStage2::vttbr(p.stage2.root(), p.vmid);
        // SAFETY: `v` is pinned to this CPU; its stage-2 table maps only its
        // partition's RAM, under its own VMID.
        unsafe {
            m.vcpus[v].ctx.as_ref().load();
            asm!("msr vttbr_el2, {0}", "isb", in(reg) vttbr, options(nomem, nostack));
        }
        m.loaded[cpu] = Some(v);
    }
    // SAFETY: `v` is loaded on this CPU.
    let ctx = unsafe { m.vcpus[v].ctx.as_mut() };
    let lrs = gic::lr_count();
    let live: Vec<u64> = (0..lrs).map(gic::read_lr).collect();
    if ctx.timer_masked_by_hv && !live.iter().any(|&lr| !gic::lr_free(lr) && gic::lr_intid(lr) == PPI_VIRT_TIMER) {
        vcpu::write_cntv_ctl(vcpu::read_cntv_ctl() & !CNTV_IMASK);
        ctx.timer_masked_by_hv = false;
    }
    let mut pending = m.vcpus[v].pending;
    for (i, &lr) in live.iter().enumerate() {
        if pending == 0 {
            break;
        }
        if !gic::lr_free(lr) {
            continue;
        }
        let bit = pending.trailing_zeros();
        let intid = if 1 << bit == PENDING_VTIMER { PPI_VIRT_TIMER } else { bit };
        gic::write_lr(i, gic::lr_pending(intid));
        pending &= !(1 << bit);
    }
    m.vcpus[v].pending = pending;
    if m.vcpus[v].state == VcpuState::Waiting {
        m.vcpus[v].state = VcpuState::Runnable;
    }
}

/// Chooses the vCPU to run on this CPU, idling (WFI, lock released) until
/// one is runnable. `yield_now` prefers another vCPU over the current one.
fn schedule(cpu: usize, yield_now: bool) -> *mut GuestRegs {
    loop {
        if super::update::freeze_requested() {
            super::update::freeze_this_cpu(cpu);
            continue;
        }
        {
            let mut guard = MACHINE.lock();
            let Some(m) = guard.as_mut() else { super::park() };
            if SHUTTING_DOWN.load(Ordering::Acquire) {
                drop(guard);
                super::park();
            }
            check_soft_timers(m, cpu);
            let current = m.loaded[cpu].filter(|&v| runnable(m, v));
            let next = if yield_now || current.is_none() {
                pick_next(&m.queues[cpu], m.loaded[cpu], |v| runnable(m, v))
            } else {
                current
            };
            if let Some(v) = next {
                prepare_entry(m, cpu, v);
                // The register frame is the first field of the repr(C) Vcpu.
                return m.vcpus[v].ctx.as_ptr().cast::<GuestRegs>();
            }
            if let Some(old) = m.loaded[cpu] {
                if matches!(m.vcpus[old].state, VcpuState::Off | VcpuState::Stopped) {
                    // SAFETY: `old` is loaded on this CPU.
                    unsafe { m.vcpus[old].ctx.as_mut() }.put();
                    m.loaded[cpu] = None;
                }
            }
        }
        // Nothing to run: wait for an interrupt (WFI wakes on a pending
        // interrupt even with PSTATE.I set), then take it.
        // SAFETY: WFI only waits.
        unsafe { asm!("wfi", options(nomem, nostack)) };
        let mut guard = MACHINE.lock();
        if let Some(m) = guard.as_mut() {
            handle_irqs(m, cpu);
        }
    }
}

/// Stops every vCPU of partition `p`, and the machine when none is left.
pub(super) fn stop_partition(m: &mut Machine, p: usize, state: PartitionState, reason: &str) {
    if m.partitions[p].state != PartitionState::Running {
        return;
    }
    m.partitions[p].state = state;
    hv_event!("guest-stop", id = m.partitions[p].info.id, reason = reason);
    for k in 0..m.partitions[p].vcpus.len() {
        let v = m.partitions[p].vcpus[k];
        m.vcpus[v].state = VcpuState::Stopped;
        let pcpu = m.vcpus[v].pcpu;
        if pcpu != cpu_index() {
            gic::kick(CPU_MPIDR[pcpu].load(Ordering::Relaxed) & 0xff);
        }
    }
    if m.partitions.iter().all(|p| p.state != PartitionState::Running) && !SHUTTING_DOWN.swap(true, Ordering::AcqRel) {
        let faulted = m.partitions.iter().filter(|p| p.state == PartitionState::Faulted).count();
        hv_event!("all-guests-stopped", guests = m.partitions.len(), faulted = faulted);
        hv_event!("shutdown", status = "ok");
        super::shutdown(true);
    }
}

fn fault(m: &mut Machine, v: usize, kind: &str, addr: u64, esr: u64) {
    let p = m.vcpus[v].partition;
    hv_event!(
        "fault",
        kind = kind,
        guest = m.partitions[p].info.id,
        addr = format_args!("{addr:#x}"),
        vcpu = m.vcpus[v].index,
        esr = format_args!("{esr:#x}"),
    );
    stop_partition(m, p, PartitionState::Faulted, "fault");
}

fn console_bytes(m: &mut Machine, p: usize, bytes: &[u8]) {
    let id = m.partitions[p].info.id;
    m.partitions[p].console.push(bytes, &mut |line| println!("guest{id}: {line}"));
}

fn read_esr_far_hpfar() -> (u64, u64, u64) {
    let (esr, far, hpfar): (u64, u64, u64);
    // SAFETY: reading the syndrome registers of the exception being handled.
    unsafe {
        asm!("mrs {0}, esr_el2", "mrs {1}, far_el2", "mrs {2}, hpfar_el2", out(reg) esr, out(reg) far, out(reg) hpfar,
             options(nomem, nostack));
    }
    (esr, far, hpfar)
}

/// A guest register by number; 31 is XZR.
fn reg(ctx: &Vcpu, r: u64) -> u64 {
    if r < 31 {
        ctx.regs.x[r as usize]
    } else {
        0
    }
}

fn set_reg(ctx: &mut Vcpu, r: u64, value: u64) {
    if r < 31 {
        ctx.regs.x[r as usize] = value;
    }
}

/// What to do after an exit.
enum Exit {
    Resume,
    Reschedule,
    /// Run a live update (outside the machine lock).
    LiveUpdate {
        image_pa: u64,
        size: u64,
    },
}

impl From<bool> for Exit {
    fn from(reschedule: bool) -> Self {
        if reschedule {
            Exit::Reschedule
        } else {
            Exit::Resume
        }
    }
}

/// Handles a synchronous exit.
fn handle_sync(m: &mut Machine, v: usize) -> Exit {
    let (esr, far, hpfar) = read_esr_far_hpfar();
    let ec = esr >> 26;
    let p = m.vcpus[v].partition;
    // SAFETY: `v` is the vCPU that just exited on this CPU.
    let ctx = unsafe { m.vcpus[v].ctx.as_mut() };
    match ec {
        EC_WFX => {
            ctx.regs.elr += 4;
            if m.vcpus[v].pending == 0 {
                m.vcpus[v].state = VcpuState::Waiting;
            }
            Exit::Reschedule
        }
        EC_HVC64 | EC_SMC64 => {
            if ec == EC_SMC64 {
                // A trapped SMC leaves ELR at the SMC itself (D1.11.2).
                ctx.regs.elr += 4;
            }
            let function = ctx.regs.x[0];
            if function == SMCCC_VENDOR_HYP_CALL {
                hypercall_exit(m, v)
            } else {
                psci_call(m, v, function).into()
            }
        }
        EC_SYSREG => {
            let rt = (esr >> 5) & 0x1f;
            let is_read = esr & 1 == 1;
            if esr & SYSREG_MASK == SYSREG_ICC_SGI1R && !is_read {
                send_sgi(m, v, reg(ctx, rt));
            } else if is_read {
                // Other trapped registers (the EL1 physical timer) read as zero
                // and ignore writes.
                set_reg(ctx, rt, 0);
            }
            // SAFETY: as above (re-borrow after `send_sgi`).
            unsafe { m.vcpus[v].ctx.as_mut() }.regs.elr += 4;
            Exit::Resume
        }
        EC_DABT_LOWER | EC_IABT_LOWER => {
            // HPFAR_EL2.FIPA holds IPA[51:12] in bits [43:4] (D19.2.55).
            let ipa = ((hpfar >> 4) << 12) | (far & 0xfff);
            if ec == EC_DABT_LOWER && esr & DABT_ISV != 0 && emulate_mmio(m, v, p, ipa, esr) {
                // SAFETY: as above.
                unsafe { m.vcpus[v].ctx.as_mut() }.regs.elr += 4;
                return Exit::Resume;
            }
            fault(m, v, "stage2", ipa, esr);
            Exit::Reschedule
        }
        _ => {
            fault(m, v, "unexpected-exit", ctx.regs.elr, esr);
            Exit::Reschedule
        }
    }
}

/// The emulated PL011 (transmit only) and RAZ/WI GIC frames. Returns
/// whether the access was emulated.
fn emulate_mmio(m: &mut Machine, v: usize, p: usize, ipa: u64, esr: u64) -> bool {
    let rt = (esr >> 16) & 0x1f;
    let write = esr & DABT_WNR != 0;
    // SAFETY: `v` exited on this CPU.
    let ctx = unsafe { m.vcpus[v].ctx.as_mut() };
    if (GUEST_UART..GUEST_UART + GUEST_UART_SIZE).contains(&ipa) {
        let off = ipa - GUEST_UART;
        if write && off == UART_DR {
            let byte = reg(ctx, rt) as u8;
            console_bytes(m, p, &[byte]);
        } else if !write {
            set_reg(ctx, rt, if off == UART_FR { UART_FR_IDLE } else { 0 });
        }
        return true;
    }
    let vcpus = u64::from(m.partitions[p].info.vcpus);
    let gic = (GUEST_GICD..GUEST_GICD + guest_dtb::GUEST_GICD_SIZE).contains(&ipa)
        || (GUEST_GICR..GUEST_GICR + GUEST_GICR_STRIDE * vcpus).contains(&ipa);
    if gic {
        if !write {
            set_reg(ctx, rt, 0);
        }
        return true;
    }
    false
}

/// Emulates a write to ICC_SGI1R_EL1 (IHI 0069H §12.2.22): TargetList
/// [15:0] (Aff0 bits), Aff1 [23:16], INTID [27:24], IRM [40].
fn send_sgi(m: &mut Machine, from: usize, value: u64) {
    let intid = ((value >> 24) & 0xf) as u32;
    let irm = value & (1 << 40) != 0;
    let higher_aff = value & 0x00ff_00ff_00ff_0000;
    let p = m.vcpus[from].partition;
    for k in 0..m.partitions[p].vcpus.len() {
        let t = m.partitions[p].vcpus[k];
        let aff0 = u64::from(m.vcpus[t].index);
        let hit = if irm { t != from } else { higher_aff == 0 && aff0 < 16 && value & (1 << aff0) != 0 };
        if hit && m.vcpus[t].state != VcpuState::Stopped {
            post(m, t, 1 << intid);
        }
    }
}

fn hypercall_exit(m: &mut Machine, v: usize) -> Exit {
    let p = m.vcpus[v].partition;
    let (control, input, output) = {
        // SAFETY: `v` exited on this CPU.
        let ctx = unsafe { m.vcpus[v].ctx.as_ref() };
        (ctx.regs.x[1], ctx.regs.x[2], ctx.regs.x[3])
    };
    let info = m.partitions[p].info.clone();
    let mut printed: Vec<u8> = Vec::new();
    let hv = RunningHv {
        update_count: m.update_count,
        cpus: m.cpus as u64,
        partition_state: |id: u64| m.partitions.iter().find(|p| u64::from(p.info.id) == id).map(|p| p.state),
    };
    // SAFETY: RAM is identity-mapped in the hypervisor, and `dispatch`
    // translates every guest address through the caller's GuestRam first.
    let mut memory = unsafe { IdentityMemory::new() };
    let outcome = hypercall::dispatch(&info, control, input, output, &hv, &mut memory, &mut |b| {
        printed.extend_from_slice(b);
    });
    console_bytes(m, p, &printed);
    // SAFETY: as above.
    let ctx = unsafe { m.vcpus[v].ctx.as_mut() };
    ctx.regs.x[0] = outcome.result_word();
    if let Some(out) = outcome.fast_output {
        ctx.regs.x[3] = out;
    }
    match outcome.action {
        Action::Resume => Exit::Resume,
        Action::Yield => Exit::Reschedule,
        Action::ShutdownSelf => {
            stop_partition(m, p, PartitionState::Stopped, "shutdown");
            Exit::Reschedule
        }
        Action::LiveUpdate { image_pa, size } => Exit::LiveUpdate { image_pa, size },
        Action::FailNextFreeze => {
            m.fail_next_freeze = true;
            Exit::Resume
        }
    }
}

/// Guest PSCI (DEN0022E), over HVC or a trapped SMC.
fn psci_call(m: &mut Machine, v: usize, function: u64) -> bool {
    let p = m.vcpus[v].partition;
    let (a1, a2, a3) = {
        // SAFETY: `v` exited on this CPU.
        let ctx = unsafe { m.vcpus[v].ctx.as_ref() };
        (ctx.regs.x[1], ctx.regs.x[2], ctx.regs.x[3])
    };
    let target = |m: &Machine, mpidr: u64| -> Option<usize> {
        // DEN0022E §5.1.4: bits [63:40] and [31:24] must be zero; our
        // vCPUs differ in Aff0 only.
        let aff0 = mpidr & 0xff;
        if mpidr & !0xff != 0 {
            return None;
        }
        m.partitions[p].vcpus.iter().copied().find(|&t| u64::from(m.vcpus[t].index) == aff0)
    };
    let mut resched = false;
    let ret: i64 = match function {
        PSCI_VERSION => PSCI_1_1,
        PSCI_FEATURES => match a1 {
            PSCI_VERSION
            | PSCI_CPU_OFF
            | PSCI_CPU_ON_32
            | PSCI_CPU_ON_64
            | PSCI_AFFINITY_INFO_32
            | PSCI_AFFINITY_INFO_64
            | PSCI_SYSTEM_OFF
            | PSCI_SYSTEM_RESET
            | PSCI_FEATURES => 0,
            _ => PSCI_NOT_SUPPORTED,
        },
        PSCI_CPU_ON_32 | PSCI_CPU_ON_64 => match target(m, a1) {
            None => PSCI_INVALID_PARAMETERS,
            Some(t) if m.vcpus[t].state != VcpuState::Off => PSCI_ALREADY_ON,
            Some(t) => {
                m.vcpus[t].start = Some((a2, a3));
                m.vcpus[t].state = VcpuState::Runnable;
                post(m, t, 0);
                0
            }
        },
        PSCI_CPU_OFF => {
            m.vcpus[v].state = VcpuState::Off;
            resched = true;
            0
        }
        PSCI_AFFINITY_INFO_32 | PSCI_AFFINITY_INFO_64 => match target(m, a1) {
            None => PSCI_INVALID_PARAMETERS,
            Some(t) => i64::from(matches!(m.vcpus[t].state, VcpuState::Off | VcpuState::Stopped)),
        },
        PSCI_SYSTEM_OFF => {
            stop_partition(m, p, PartitionState::Stopped, "system-off");
            return true;
        }
        PSCI_SYSTEM_RESET => {
            reset_partition(m, p);
            return true;
        }
        _ => PSCI_NOT_SUPPORTED,
    };
    // SAFETY: as above.
    unsafe { m.vcpus[v].ctx.as_mut() }.regs.x[0] = ret.cast_unsigned();
    resched
}

/// SYSTEM_RESET: reload the image and device tree, restart vCPU 0, turn the
/// other vCPUs off. Each vCPU's owning CPU applies its own restart.
fn reset_partition(m: &mut Machine, p: usize) {
    let part = &m.partitions[p];
    hv_event!("guest-reset", id = part.info.id);
    load_image(part.info.ram, part.image, &part.layout, &part.device_tree());
    let (entry, dtb) = (part.layout.entry_ipa, part.layout.dtb_ipa());
    for k in 0..m.partitions[p].vcpus.len() {
        let t = m.partitions[p].vcpus[k];
        let slot = &mut m.vcpus[t];
        slot.pending = 0;
        if slot.index == 0 {
            slot.start = Some((entry, dtb));
            slot.state = VcpuState::Runnable;
        } else {
            slot.state = VcpuState::Off;
        }
        post(m, t, 0);
    }
}

/// Called by entry.S on every guest exit with the exited vCPU's frame;
/// returns the frame to enter next.
#[no_mangle]
extern "C" fn hv_guest_exit(_frame: *mut GuestRegs, kind: u64) -> *mut GuestRegs {
    let cpu = cpu_index();
    let exit = {
        let mut guard = MACHINE.lock();
        let Some(m) = guard.as_mut() else { super::park() };
        let Some(v) = m.loaded[cpu] else { super::park() };
        match kind {
            0 => handle_sync(m, v),
            1 => handle_irqs(m, cpu).into(),
            _ => {
                let (esr, far, _) = read_esr_far_hpfar();
                fault(m, v, if kind == 3 { "serror" } else { "fiq" }, far, esr);
                Exit::Reschedule
            }
        }
    };
    match exit {
        Exit::Resume => schedule(cpu, false),
        Exit::Reschedule => schedule(cpu, true),
        Exit::LiveUpdate { image_pa, size } => {
            // Returns only if the update was refused or cancelled.
            super::update::run(cpu, image_pa, size);
            schedule(cpu, false)
        }
    }
}
