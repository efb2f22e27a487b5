//! Running partitions on x86_64 under VT-x: building them from the boot
//! modules, scheduling their vCPUs on the physical CPUs (the VMX-preemption
//! timer ends every time slice), and handling every VM exit. Guests are
//! confined by their own EPT tree and VPID; each vCPU has its own VMCS,
//! pinned to one physical CPU.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hvcall::PartitionState;
use hypervisor::frames::FrameAllocator;
use hypervisor::guest_console::LineBuffer;
use hypervisor::hypercall::{self, Action, HostMemory, IdentityMemory, RunningHv};
use hypervisor::live_update;
use hypervisor::partition::{GuestRam, PartitionInfo, GUEST_RAM_BASE};
use hypervisor::sched::{pick_next, VcpuState};
use hypervisor::stage2::{Attrs, BlockSize, Ept, FrameSource, LinearMap, Perms, Stage2Table};
use hypervisor::update::{IdentityPages, PreservedMap, PreservingFrames};
use hypervisor::vmx_caps::{entry as entry_ctl, VmcsControls, VmxCaps};
use hypervisor::vmx_exit::{
    inject_exception, vector, CrAccess, DrAccess, EptViolation, Exit, ExitReason, Gpr, Interruption, InterruptionType,
    IoAccess,
};
use hypervisor::x86_guest::boot::{self as guest_boot, BootLayout, BOOTLOADER_MAGIC};
use hypervisor::x86_guest::cpuid::{guest_cpuid, CpuidRegs, GuestCpuidInfo};
use hypervisor::x86_guest::cr::{cr0, CrContext, GuestCrPolicy, PagingChange};
use hypervisor::x86_guest::msr::{check_write, GuestMsr, MsrHome, WriteContext, EFER_LMA, PAT_DEFAULT};
use hypervisor::x86_guest::GpFault;
use hypervisor::{hv_event, hv_event_to, println};
use kho::ScratchPlan;
use loader::manifest::GuestSpec;
use loader::PhysRange;
use spin::Mutex;
use x86::msr::{rdmsr, wrmsr};
use x86::vmx::vmcs::{control, guest, host, ro};

use super::cpu::{self, HostState};
use super::vcpu::{self, RunResult, Vcpu};
use super::vmcs::{self, VmcsError};
use super::{smp, tsc, MAPPED_LIMIT, MAX_CPUS};

/// Scheduling time slice.
const SLICE_MS: u64 = 10;
/// Guest segment state as a multiboot2 loader leaves it (Multiboot2 spec
/// §3.3): flat 4 GiB 32-bit code and data. Selectors are the usual GDT
/// slots; the guest loads its own GDT before reloading any of them.
const GUEST_SEL_CODE: u64 = 0x08;
const GUEST_SEL_DATA: u64 = 0x10;
const FLAT_LIMIT: u64 = 0xffff_ffff;
/// Segment access rights in the VMCS format (SDM §25.4.1, Table 25-2):
/// type (3:0), S (4), DPL (6:5), P (7), L (13), D/B (14), G (15),
/// unusable (16).
const AR_CODE32: u64 = 0xc09b;
const AR_DATA32: u64 = 0xc093;
const AR_TSS32_BUSY: u64 = 0x008b;
const AR_UNUSABLE: u64 = 1 << 16;
const AR_DPL_SHIFT: u32 = 5;
const AR_DPL_MASK: u64 = 0x3;
const AR_LONG: u64 = 1 << 13;
/// A TSS limit for the placeholder TR (VM entry needs a usable busy TSS
/// outside IA-32e mode, SDM §27.3.1.2).
const TR_LIMIT: u64 = 0xff;
/// RFLAGS bit 1 is reserved and reads as 1.
const RFLAGS_FIXED: u64 = 1 << 1;
/// DR7's reset value (SDM Vol. 3A §19.2.4) and DR6's.
const DR7_INIT: u64 = 0x400;
const DR6_INIT: u64 = 0xffff_0ff0;
/// DR7 bits 63:32 are reserved.
const DR7_RESERVED_HIGH: u64 = 0xffff_ffff_0000_0000;
/// The VMCS link pointer must be all ones when unused (§27.3.1.5).
const VMCS_LINK_NONE: u64 = u64::MAX;
/// Interruptibility state: blocking by STI (bit 0) and by MOV SS (bit 1)
/// end with the instruction a handler skips (§25.4.2, Table 25-3).
const BLOCKING_STI_MOVSS: u64 = 0b11;
/// CR8 holds a 4-bit priority; bits 63:4 are reserved (SDM Vol. 3A §11.8.6.1).
const CR8_RESERVED: u64 = !0xf;
/// Guest-physical PDPTE fields (§25.4.2): PDPTE0..3.
const GUEST_PDPTES: [u32; 4] = [guest::PDPTE0_FULL, guest::PDPTE1_FULL, guest::PDPTE2_FULL, guest::PDPTE3_FULL];
/// CR3 bits 31:5 locate the PDPT with PAE paging (SDM Vol. 3A §5.4.1).
const PAE_PDPT_MASK: u64 = 0xffff_ffe0;
/// COM1's registers (16550): data (THR/RBR, divisor low with DLAB),
/// line control (bit 7: DLAB) and line status (THR empty, transmitter
/// empty: always ready).
const COM1: u16 = 0x3f8;
const COM1_LAST: u16 = COM1 + 7;
const UART_THR: u16 = COM1;
const UART_LCR: u16 = COM1 + 3;
const UART_LSR: u16 = COM1 + 5;
const UART_LCR_DLAB: u8 = 1 << 7;
const UART_LSR_IDLE: u64 = 0x60;

/// A partition at run time.
pub(super) struct Partition {
    pub(super) info: PartitionInfo,
    pub(super) state: PartitionState,
    pub(super) ept: Stage2Table<Ept, LinearMap>,
    pub(super) vpid: u16,
    console: LineBuffer,
    vcpus: Vec<usize>,
    /// The emulated COM1's line control register (for DLAB).
    uart_lcr: u8,
    /// Complete console lines (and this partition's rate-limited events)
    /// not yet printed: they go out after the machine lock is released, so
    /// a slow serial port delays only the CPU that prints, not the other
    /// CPUs' exits.
    output: Vec<String>,
    /// #GP faults injected so far.
    gp_injected: u64,
}

impl Partition {
    fn eptp(&self) -> u64 {
        Ept::eptp(self.ept.root())
    }
}

/// A vCPU's scheduling record. The context behind `ctx` is touched only by
/// the physical CPU the vCPU is pinned to.
pub(super) struct VcpuSlot {
    pub(super) ctx: NonNull<Vcpu>,
    pub(super) partition: usize,
    pub(super) index: u32,
    pub(super) pcpu: usize,
    pub(super) state: VcpuState,
}

// SAFETY: a slot's context is only dereferenced by its owning physical CPU
// (`pcpu`), under the machine lock or while that CPU runs the vCPU.
unsafe impl Send for VcpuSlot {}

pub(super) struct Machine {
    pub(super) partitions: Vec<Partition>,
    pub(super) vcpus: Vec<VcpuSlot>,
    queues: [Vec<usize>; MAX_CPUS],
    /// The vCPU whose VMCS is current and whose state is in each CPU.
    loaded: [Option<usize>; MAX_CPUS],
    /// When each CPU's time slice ends (TSC).
    slice_end: [u64; MAX_CPUS],
    pub(super) frames: FrameAllocator,
    pub(super) preserved: PreservedMap<IdentityPages>,
    pub(super) cpus: usize,
    controls: VmcsControls,
    cr_policy: GuestCrPolicy,
    caps: VmxCaps,
    pub(super) tsc_hz: u64,
    /// RAM and the scratch plan (where an update image is staged).
    pub(super) ram: Vec<PhysRange>,
    pub(super) scratch: ScratchPlan,
    /// Updates so far in this run.
    pub(super) update_count: u64,
    /// The preserved copy of the multiboot2 information, handed to each
    /// new image (it names RAM, the reserved ranges and the ACPI RSDP).
    pub(super) mbi: PhysRange,
    /// Test hook: the next update's freeze fails.
    fail_next_freeze: bool,
    /// A live update requested by the vCPU that just exited on each CPU
    /// (that vCPU, the image's address and size), run once the machine
    /// lock is released.
    update_request: [Option<(usize, u64, u64)>; MAX_CPUS],
}

static MACHINE: Mutex<Option<Machine>> = Mutex::new(None);
static STARTED: AtomicBool = AtomicBool::new(false);
static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);
/// The calibrated TSC frequency, for the update's timeouts.
static TSC_HZ: AtomicU64 = AtomicU64::new(0);

/// What the machine-wide set-up needs from boot.
pub struct MachineSpec<'a> {
    pub specs: &'a [GuestSpec],
    pub ram: &'a [PhysRange],
    pub frames: FrameAllocator,
    /// Indices of the CPUs that run guests.
    pub cpus: &'a [usize],
    pub caps: VmxCaps,
    pub controls: VmcsControls,
    pub cr_policy: GuestCrPolicy,
    pub tsc_hz: u64,
    pub scratch: ScratchPlan,
    /// The multiboot2 information's copy, preserved across updates.
    pub mbi: PhysRange,
}

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

/// Copies the image and the boot information into the partition's RAM.
fn load_image(ram: GuestRam, image: &[u8], layout: &BootLayout, info: &[u8]) -> Result<(), &'static str> {
    for c in &layout.copies {
        let src = image
            .get(c.src_offset as usize..c.src_offset.saturating_add(c.len) as usize)
            .ok_or("image-shorter-than-its-segments")?;
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

fn build_partition(m: &mut Machine, id: u32, spec: &GuestSpec, ram_map: &[PhysRange]) -> Result<(), &'static str> {
    let image = module_bytes(spec.image, ram_map).ok_or("image-outside-ram")?;
    let mem = spec.mem_mib << 20;
    let layout = guest_boot::layout(spec.format, image, mem).map_err(|e| {
        println!("guest {}: {e}", spec.name);
        e.reason()
    })?;
    let info = guest_boot::boot_information(mem, &spec.cmdline).map_err(|e| e.reason())?;
    let vpid = u16::try_from(id).map_err(|_| "too-many-partitions")?;
    let block = m.frames.alloc_block(mem).ok_or("out-of-memory")?;
    if block.end().is_none_or(|e| e > MAPPED_LIMIT) {
        m.frames.free_block(block);
        return Err("ram-above-4gib");
    }
    // Guest RAM survives updates: record it now, at allocation.
    m.preserved.preserve(&mut m.frames, block.base..block.base + block.size).map_err(|_| "preserve-ram")?;
    let ram = GuestRam { host_base: block.base, size: mem };
    // SAFETY: the block was just allocated for this partition and is
    // identity-mapped below 4 GiB.
    unsafe { core::ptr::write_bytes(block.base as *mut u8, 0, mem as usize) };
    load_image(ram, image, &layout, &info)?;
    // SAFETY: RAM is identity-mapped, so physical = virtual.
    let phys = unsafe { LinearMap::new(0) };
    let mut frames = PreservingFrames { frames: &mut m.frames, map: &mut m.preserved };
    let mut ept = Stage2Table::<Ept, LinearMap>::new(&mut frames, phys).map_err(|_| "ept-alloc")?;
    let largest = match (m.caps.ept_1g, m.caps.ept_2m) {
        (true, _) => BlockSize::Size1G,
        (false, true) => BlockSize::Size2M,
        (false, false) => BlockSize::Size4K,
    };
    ept.set_max_block_size(largest);
    ept.map(GUEST_RAM_BASE, block.base, mem, Attrs::ram(Perms::ReadWriteExec), &mut frames).map_err(|_| "ept-map")?;
    let p = m.partitions.len();
    let mut vcpus = Vec::new();
    for i in 0..spec.vcpus {
        let vmcs_page = frames.alloc_frame().ok_or("out-of-memory")?;
        // SAFETY: a fresh page for this vCPU's VMCS; the region starts with
        // the revision identifier and is otherwise zero (SDM §25.2).
        unsafe {
            core::ptr::write_bytes(vmcs_page as *mut u8, 0, 4096);
            core::ptr::write_volatile(vmcs_page as *mut u32, m.caps.revision);
        }
        let ctx =
            Box::leak(Box::new(Vcpu::new(vmcs_page, layout.entry_gpa, u64::from(BOOTLOADER_MAGIC), layout.info_gpa())));
        let pcpu = m.vcpus.len() % m.cpus;
        let v = m.vcpus.len();
        m.vcpus.push(VcpuSlot {
            ctx: NonNull::from(ctx),
            partition: p,
            index: i,
            pcpu,
            // Only the boot vCPU starts; there is no INIT-SIPI emulation.
            state: if i == 0 { VcpuState::Runnable } else { VcpuState::Off },
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
        entry = format_args!("{:#x}", layout.entry_gpa),
        stage2_root = format_args!("{:#x}", ept.root()),
        ept_2m = ept.leaf_count(BlockSize::Size2M),
        ept_1g = ept.leaf_count(BlockSize::Size1G),
        vpid = vpid,
        cpu = m.vcpus[vcpus[0]].pcpu,
    );
    m.partitions.push(Partition {
        info: PartitionInfo { id, name: spec.name.clone(), privileged: spec.privileged, ram, vcpus: spec.vcpus },
        state: PartitionState::Running,
        ept,
        vpid,
        console: LineBuffer::default(),
        vcpus,
        uart_lcr: 0,
        output: Vec::new(),
        gp_injected: 0,
    });
    Ok(())
}

/// A partition adopted from a handover: its EPT tree in place.
pub(super) struct AdoptedPartition {
    pub info: PartitionInfo,
    pub state: PartitionState,
    pub ept: Stage2Table<Ept, LinearMap>,
    pub vpid: u16,
}

/// A vCPU adopted from a handover, pinned to `pcpu`.
pub(super) struct AdoptedVcpu {
    pub ctx: Vcpu,
    /// Index into the adopted partitions.
    pub partition: usize,
    pub index: u32,
    pub pcpu: usize,
    pub state: VcpuState,
}

/// Everything the restore side hands to the scheduler.
pub(super) struct Adoption {
    pub partitions: Vec<AdoptedPartition>,
    pub vcpus: Vec<AdoptedVcpu>,
    pub frames: FrameAllocator,
    pub preserved: PreservedMap<IdentityPages>,
    pub cpus: usize,
    pub caps: VmxCaps,
    pub controls: VmcsControls,
    pub cr_policy: GuestCrPolicy,
    pub tsc_hz: u64,
    pub ram: Vec<PhysRange>,
    pub scratch: ScratchPlan,
    pub update_count: u64,
    pub mbi: PhysRange,
}

/// Installs an adopted machine; its vCPUs' VMCSs are rebuilt from their
/// records on first entry. Returns how many CPUs have a vCPU to run.
pub(super) fn install_adopted(a: Adoption) -> usize {
    let mut m = Machine {
        partitions: Vec::new(),
        vcpus: Vec::new(),
        queues: Default::default(),
        loaded: [None; MAX_CPUS],
        slice_end: [0; MAX_CPUS],
        frames: a.frames,
        preserved: a.preserved,
        cpus: a.cpus,
        controls: a.controls,
        cr_policy: a.cr_policy,
        caps: a.caps,
        tsc_hz: a.tsc_hz,
        ram: a.ram,
        scratch: a.scratch,
        update_count: a.update_count,
        mbi: a.mbi,
        fail_next_freeze: false,
        update_request: [None; MAX_CPUS],
    };
    for p in a.partitions {
        m.partitions.push(Partition {
            info: p.info,
            state: p.state,
            ept: p.ept,
            vpid: p.vpid,
            console: LineBuffer::default(),
            vcpus: Vec::new(),
            uart_lcr: 0,
            output: Vec::new(),
            gp_injected: 0,
        });
    }
    for v in a.vcpus {
        let n = m.vcpus.len();
        m.partitions[v.partition].vcpus.push(n);
        m.queues[v.pcpu].push(n);
        m.vcpus.push(VcpuSlot {
            ctx: NonNull::from(Box::leak(Box::new(v.ctx))),
            partition: v.partition,
            index: v.index,
            pcpu: v.pcpu,
            state: v.state,
        });
    }
    let busy = m.queues.iter().filter(|q| q.iter().any(|&v| runnable(&m, v))).count();
    TSC_HZ.store(m.tsc_hz, Ordering::Relaxed);
    *MACHINE.lock() = Some(m);
    busy
}

/// Builds every partition. Returns how many started.
pub fn create(spec: MachineSpec<'_>) -> usize {
    let cpus = spec.cpus.len().clamp(1, MAX_CPUS);
    let mut m = Machine {
        partitions: Vec::new(),
        vcpus: Vec::new(),
        queues: Default::default(),
        loaded: [None; MAX_CPUS],
        slice_end: [0; MAX_CPUS],
        frames: spec.frames,
        preserved: PreservedMap::new(IdentityPages),
        cpus,
        controls: spec.controls,
        cr_policy: spec.cr_policy,
        caps: spec.caps,
        tsc_hz: spec.tsc_hz,
        ram: spec.ram.to_vec(),
        scratch: spec.scratch,
        update_count: 0,
        mbi: spec.mbi,
        fail_next_freeze: false,
        update_request: [None; MAX_CPUS],
    };
    if m.preserved.preserve(&mut m.frames, spec.mbi.base..spec.mbi.base + spec.mbi.size).is_err() {
        hv_event!("preserve-failed", what = "multiboot2-information");
    }
    TSC_HZ.store(spec.tsc_hz, Ordering::Relaxed);
    for (i, g) in spec.specs.iter().enumerate() {
        let id = i as u32 + 1;
        if let Err(reason) = build_partition(&mut m, id, g, spec.ram) {
            hv_event!("guest-refused", name = g.name, reason = reason);
        }
    }
    // Map queue slots to the CPUs that are online (indices need not be
    // contiguous if an AP failed to start).
    let mut queues: [Vec<usize>; MAX_CPUS] = Default::default();
    for (slot, q) in m.queues.iter_mut().enumerate().take(cpus) {
        let target = spec.cpus.get(slot).copied().unwrap_or(0).min(MAX_CPUS - 1);
        for &v in q.iter() {
            m.vcpus[v].pcpu = target;
        }
        queues[target].append(q);
    }
    m.queues = queues;
    let n = m.partitions.len();
    *MACHINE.lock() = Some(m);
    n
}

/// The calibrated TSC frequency in Hz.
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Runs `f` on the machine, under its lock.
pub(super) fn with_machine<R>(f: impl FnOnce(&mut Machine) -> R) -> Result<R, &'static str> {
    MACHINE.lock().as_mut().map(f).ok_or("no-machine")
}

/// At a freeze, on `cpu`: saves and unloads the loaded vCPU, then for
/// every vCPU pinned here whose VMCS was used, reads its guest state
/// (VMREAD needs the VMCS current on the CPU it is active on) and VMCLEARs
/// it, so its data is in memory and the CPU holds no VMCS state (SDM Vol.
/// 3C §25.11.1, §25.11.3). If the update is cancelled, the next entry is
/// a VMLAUNCH of the same, intact VMCS.
pub(super) fn put_loaded(cpu: usize) -> Result<(), &'static str> {
    with_machine(|m| {
        if let Some(v) = m.loaded[cpu].take() {
            // SAFETY: `v` was loaded on this CPU, the only one touching it.
            unsafe { m.vcpus[v].ctx.as_mut() }.put();
        }
        for slot in m.vcpus.iter_mut().filter(|s| s.pcpu == cpu) {
            // SAFETY: pinned to this CPU, and not running (this CPU is at
            // an exit boundary).
            let ctx = unsafe { slot.ctx.as_mut() };
            if !ctx.initialized {
                continue;
            }
            vmcs::load(ctx.vmcs).and_then(|()| ctx.capture()).and_then(|()| vmcs::clear(ctx.vmcs)).map_err(|e| {
                println!("freeze: vmcs {:#x}: {e}", ctx.vmcs);
                "vmcs-capture"
            })?;
            ctx.launched = false;
        }
        Ok(())
    })?
}

/// Takes (and disarms) the freeze-failure test hook.
pub(super) fn take_fail_next_freeze() -> Result<bool, &'static str> {
    with_machine(|m| core::mem::take(&mut m.fail_next_freeze))
}

/// Sets a register of vCPU `v`, which is not running (it exited on this
/// CPU and waits for the update's outcome).
pub(super) fn set_guest_reg(v: usize, r: Gpr, value: u64) {
    let _ = with_machine(|m| {
        if let Some(slot) = m.vcpus.get_mut(v) {
            // SAFETY: `v` exited on this CPU and is not entered again
            // before the update returns.
            unsafe { slot.ctx.as_mut() }.regs.set(r, value);
        }
    });
}

/// Lets the other CPUs into the scheduler.
pub fn release_secondaries() {
    STARTED.store(true, Ordering::Release);
}

/// Whether the boot CPU has released the others into the scheduler.
pub fn started() -> bool {
    STARTED.load(Ordering::Acquire)
}

fn runnable(m: &Machine, v: usize) -> bool {
    m.vcpus[v].state == VcpuState::Runnable
}

/// Writes the whole VMCS of a vCPU that has never run (SDM §25.4 guest
/// state, §25.5 host state, §25.6-25.8 controls), as a multiboot2 loader
/// would leave the machine.
fn init_vmcs(m: &Machine, v: usize, entry: u64, host: &HostState) -> Result<(), VmcsError> {
    let p = &m.partitions[m.vcpus[v].partition];
    let ctl = &m.controls;
    let cr0v = m.cr_policy.initial_cr0();
    let cr4v = m.cr_policy.initial_cr4();
    let set = vmcs::write;
    // Controls.
    set(control::PINBASED_EXEC_CONTROLS, u64::from(ctl.pin))?;
    set(control::PRIMARY_PROCBASED_EXEC_CONTROLS, u64::from(ctl.proc))?;
    set(control::SECONDARY_PROCBASED_EXEC_CONTROLS, u64::from(ctl.proc2))?;
    set(control::VMEXIT_CONTROLS, u64::from(ctl.exit))?;
    set(control::VMENTRY_CONTROLS, u64::from(ctl.entry))?;
    for field in [
        control::EXCEPTION_BITMAP,
        control::PAGE_FAULT_ERR_CODE_MASK,
        control::PAGE_FAULT_ERR_CODE_MATCH,
        control::CR3_TARGET_COUNT,
        control::VMEXIT_MSR_STORE_COUNT,
        control::VMEXIT_MSR_LOAD_COUNT,
        control::VMENTRY_MSR_LOAD_COUNT,
        control::VMENTRY_INTERRUPTION_INFO_FIELD,
    ] {
        set(field, 0)?;
    }
    set(control::CR0_GUEST_HOST_MASK, m.cr_policy.cr0_mask())?;
    set(control::CR4_GUEST_HOST_MASK, m.cr_policy.cr4_mask())?;
    set(control::CR0_READ_SHADOW, cr0v.shadow)?;
    set(control::CR4_READ_SHADOW, cr4v.shadow)?;
    set(control::EPTP_FULL, p.eptp())?;
    set(control::VPID, u64::from(p.vpid))?;
    // Host state: this CPU's.
    set(host::CR0, host.cr0)?;
    set(host::CR3, host.cr3)?;
    set(host::CR4, host.cr4)?;
    set(host::CS_SELECTOR, u64::from(cpu::SEL_CODE))?;
    for field in [host::SS_SELECTOR, host::DS_SELECTOR, host::ES_SELECTOR] {
        set(field, u64::from(cpu::SEL_DATA))?;
    }
    set(host::FS_SELECTOR, 0)?;
    set(host::GS_SELECTOR, 0)?;
    set(host::TR_SELECTOR, u64::from(cpu::SEL_TSS))?;
    set(host::FS_BASE, 0)?;
    set(host::GS_BASE, 0)?;
    set(host::TR_BASE, host.tr_base)?;
    set(host::GDTR_BASE, host.gdtr_base)?;
    set(host::IDTR_BASE, host.idtr_base)?;
    set(host::IA32_SYSENTER_CS, 0)?;
    set(host::IA32_SYSENTER_ESP, 0)?;
    set(host::IA32_SYSENTER_EIP, 0)?;
    set(host::IA32_EFER_FULL, host.efer)?;
    set(host::IA32_PAT_FULL, host.pat)?;
    set(host::RIP, vcpu::exit_stub_address())?;
    // Guest state: 32-bit protected mode, paging off (Multiboot2 §3.3).
    set(guest::CR0, cr0v.real)?;
    set(guest::CR3, 0)?;
    set(guest::CR4, cr4v.real)?;
    set(guest::DR7, DR7_INIT)?;
    set(guest::RSP, 0)?;
    set(guest::RIP, entry)?;
    set(guest::RFLAGS, RFLAGS_FIXED)?;
    let segments = [
        (guest::CS_SELECTOR, guest::CS_BASE, guest::CS_LIMIT, guest::CS_ACCESS_RIGHTS, GUEST_SEL_CODE, AR_CODE32),
        (guest::SS_SELECTOR, guest::SS_BASE, guest::SS_LIMIT, guest::SS_ACCESS_RIGHTS, GUEST_SEL_DATA, AR_DATA32),
        (guest::DS_SELECTOR, guest::DS_BASE, guest::DS_LIMIT, guest::DS_ACCESS_RIGHTS, GUEST_SEL_DATA, AR_DATA32),
        (guest::ES_SELECTOR, guest::ES_BASE, guest::ES_LIMIT, guest::ES_ACCESS_RIGHTS, GUEST_SEL_DATA, AR_DATA32),
        (guest::FS_SELECTOR, guest::FS_BASE, guest::FS_LIMIT, guest::FS_ACCESS_RIGHTS, GUEST_SEL_DATA, AR_DATA32),
        (guest::GS_SELECTOR, guest::GS_BASE, guest::GS_LIMIT, guest::GS_ACCESS_RIGHTS, GUEST_SEL_DATA, AR_DATA32),
    ];
    for (selector_field, base, limit, rights_field, selector, rights) in segments {
        set(selector_field, selector)?;
        set(base, 0)?;
        set(limit, FLAT_LIMIT)?;
        set(rights_field, rights)?;
    }
    set(guest::LDTR_SELECTOR, 0)?;
    set(guest::LDTR_BASE, 0)?;
    set(guest::LDTR_LIMIT, 0)?;
    set(guest::LDTR_ACCESS_RIGHTS, AR_UNUSABLE)?;
    set(guest::TR_SELECTOR, 0)?;
    set(guest::TR_BASE, 0)?;
    set(guest::TR_LIMIT, TR_LIMIT)?;
    set(guest::TR_ACCESS_RIGHTS, AR_TSS32_BUSY)?;
    for field in [guest::GDTR_BASE, guest::GDTR_LIMIT, guest::IDTR_BASE, guest::IDTR_LIMIT] {
        set(field, 0)?;
    }
    for field in [
        guest::INTERRUPTIBILITY_STATE,
        guest::ACTIVITY_STATE,
        guest::PENDING_DBG_EXCEPTIONS,
        guest::IA32_DEBUGCTL_FULL,
        guest::IA32_SYSENTER_CS,
        guest::IA32_SYSENTER_ESP,
        guest::IA32_SYSENTER_EIP,
        guest::IA32_EFER_FULL,
    ] {
        set(field, 0)?;
    }
    set(guest::IA32_PAT_FULL, PAT_DEFAULT)?;
    set(guest::LINK_PTR_FULL, VMCS_LINK_NONE)?;
    Ok(())
}

/// Makes `v` the vCPU of this CPU: its processor state loaded, its VMCS
/// current (initialised on first use, with its EPT and VPID translations
/// invalidated), and the preemption timer set to the rest of the slice.
fn prepare_entry(m: &mut Machine, cpu: usize, v: usize, new_slice: bool, host: &HostState) -> Result<(), VmcsError> {
    if m.loaded[cpu] != Some(v) {
        if let Some(old) = m.loaded[cpu].take() {
            // SAFETY: `old` was loaded on this CPU, so it is pinned here.
            unsafe { m.vcpus[old].ctx.as_mut() }.put();
        }
        // SAFETY: `v` is pinned to this CPU (it is in this CPU's queue).
        let ctx = unsafe { m.vcpus[v].ctx.as_mut() };
        ctx.load();
        if ctx.initialized {
            vmcs::load(ctx.vmcs)?;
        } else {
            vmcs::clear(ctx.vmcs)?;
            vmcs::load(ctx.vmcs)?;
            init_vmcs(m, v, ctx.entry, host)?;
            if ctx.restored {
                // Adopted from a handover: the guest state it had.
                ctx.write_back()?;
                sync_ia32e_mode()?;
                ctx.restored = false;
            }
            // Nothing cached under this EPTP or VPID may predate the
            // tree (SDM §29.4.3.1): frames and VPIDs can be reused.
            let p = &m.partitions[m.vcpus[v].partition];
            vmcs::invept_single(p.eptp())?;
            vmcs::invvpid_single(p.vpid)?;
            ctx.initialized = true;
        }
        m.loaded[cpu] = Some(v);
    }
    let now = tsc::now();
    if new_slice || m.slice_end[cpu] <= now {
        m.slice_end[cpu] = now + m.tsc_hz / 1000 * SLICE_MS;
    }
    let ticks = (m.slice_end[cpu] - now) >> m.caps.preemption_timer_shift;
    vmcs::write(guest::VMX_PREEMPTION_TIMER_VALUE, ticks.min(u64::from(u32::MAX)))
}

/// Chooses what this CPU runs next and prepares it. `None` when nothing
/// on this CPU can ever run again (x86 vCPUs that are off or stopped are
/// never woken).
fn schedule(cpu: usize, yield_now: bool, host: &HostState) -> Option<NonNull<Vcpu>> {
    loop {
        if live_update::freeze_requested() {
            super::update::freeze_this_cpu(cpu);
        }
        let mut guard = MACHINE.lock();
        let m = guard.as_mut()?;
        if SHUTTING_DOWN.load(Ordering::Acquire) {
            return None;
        }
        let current = m.loaded[cpu].filter(|&v| runnable(m, v));
        let next = if yield_now || current.is_none() {
            pick_next(&m.queues[cpu], m.loaded[cpu], |v| runnable(m, v))
        } else {
            current
        };
        let v = next?;
        match prepare_entry(m, cpu, v, yield_now || next != current, host) {
            Ok(()) => return Some(m.vcpus[v].ctx),
            Err(e) => {
                fault(m, v, "vmcs-setup", 0);
                println!("vcpu {v}: {e}");
            }
        }
    }
}

/// Per-CPU set-up, then the scheduler. Never returns.
pub fn run_cpu(cpu: usize) -> ! {
    let host = cpu::init(cpu);
    let mut yield_now = false;
    let mut first = true;
    loop {
        let Some(mut ctx) = schedule(cpu, yield_now, &host) else { super::update::idle() };
        if core::mem::take(&mut first) {
            super::update::note_resumed();
        }
        // SAFETY: `schedule` returned this CPU's loaded vCPU, whose VMCS is
        // current; only this CPU touches its context.
        let result = unsafe { ctx.as_mut() }.run();
        let mut guard = MACHINE.lock();
        let Some(m) = guard.as_mut() else { super::halt_forever() };
        let Some(v) = m.loaded[cpu] else { super::halt_forever() };
        yield_now = handle_run(m, v, result);
        let lines = take_output(m);
        let update = m.update_request[cpu].take();
        drop(guard);
        for line in lines {
            println!("{line}");
        }
        if let Some((requester, image_pa, size)) = update {
            // Returns once the update was refused or cancelled; the
            // requester resumes with the status.
            super::update::run(cpu, requester, image_pa, size);
        }
    }
}

/// Acts on how a guest entry ended; returns whether to reschedule.
fn handle_run(m: &mut Machine, v: usize, result: RunResult) -> bool {
    match result {
        RunResult::Exited => match handle_exit(m, v) {
            Ok(next) => next == Next::Reschedule,
            Err(e) => {
                println!("vcpu {v}: {e}");
                fault(m, v, "vmcs-access", 0);
                true
            }
        },
        RunResult::EntryFailed { valid } => {
            let error = if valid { vmcs::read(ro::VM_INSTRUCTION_ERROR).unwrap_or(0) } else { 0 };
            hv_event!("vm-entry-failed", vcpu = v, vm_instruction_error = error);
            fault(m, v, "vm-entry-failed", error);
            true
        }
    }
}

/// Stops every vCPU of partition `p`, and the machine when none is left.
/// vCPUs running on another CPU leave at their next exit (the preemption
/// timer bounds the wait to one slice).
fn stop_partition(m: &mut Machine, p: usize, state: PartitionState, reason: &str) {
    if m.partitions[p].state != PartitionState::Running {
        return;
    }
    m.partitions[p].state = state;
    hv_event!("guest-stop", id = m.partitions[p].info.id, reason = reason);
    for k in 0..m.partitions[p].vcpus.len() {
        let v = m.partitions[p].vcpus[k];
        m.vcpus[v].state = VcpuState::Stopped;
    }
    if m.partitions.iter().all(|p| p.state != PartitionState::Running) && !SHUTTING_DOWN.swap(true, Ordering::AcqRel) {
        let faulted = m.partitions.iter().filter(|p| p.state == PartitionState::Faulted).count();
        hv_event!("all-guests-stopped", guests = m.partitions.len(), faulted = faulted);
        hv_event!("shutdown", status = "ok");
        super::shutdown(true);
    }
}

fn fault(m: &mut Machine, v: usize, kind: &str, addr: u64) {
    let p = m.vcpus[v].partition;
    hv_event!(
        "fault",
        kind = kind,
        guest = m.partitions[p].info.id,
        addr = format_args!("{addr:#x}"),
        vcpu = m.vcpus[v].index,
        rip = format_args!("{:#x}", vmcs::read(guest::RIP).unwrap_or(0)),
    );
    stop_partition(m, p, PartitionState::Faulted, "fault");
}

fn console_bytes(m: &mut Machine, p: usize, bytes: &[u8]) {
    let part = &mut m.partitions[p];
    let id = part.info.id;
    let output = &mut part.output;
    part.console.push(bytes, &mut |line| output.push(format!("guest{id}: {line}")));
}

/// Takes every partition's complete console lines, to print unlocked.
fn take_output(m: &mut Machine) -> Vec<String> {
    m.partitions.iter_mut().flat_map(|p| core::mem::take(&mut p.output)).collect()
}

/// What to do after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    Resume,
    Reschedule,
    /// Resume with a #GP(0) injected, for this reason.
    InjectGp(GpFault),
}

/// Skips the instruction that exited, ending STI/MOV SS blocking as the
/// processor would (§25.4.2).
fn advance_rip() -> Result<(), VmcsError> {
    let rip = vmcs::read(guest::RIP)?;
    let len = vmcs::read(ro::VMEXIT_INSTRUCTION_LEN)?;
    vmcs::write(guest::RIP, rip.wrapping_add(len))?;
    let blocking = vmcs::read(guest::INTERRUPTIBILITY_STATE)?;
    if blocking & BLOCKING_STI_MOVSS != 0 {
        vmcs::write(guest::INTERRUPTIBILITY_STATE, blocking & !BLOCKING_STI_MOVSS)?;
    }
    Ok(())
}

/// Injects a hardware exception at the next entry (§27.6.1); the
/// instruction is not skipped (faults re-execute). An error code is
/// delivered only in protected mode (§27.2.1.3).
fn inject(vector: u8, error_code: Option<u32>) -> Result<Next, VmcsError> {
    let protected = vmcs::read(guest::CR0)? & cr0::PE != 0;
    let with_code = error_code.is_some() && protected;
    vmcs::write(control::VMENTRY_INTERRUPTION_INFO_FIELD, u64::from(inject_exception(vector, with_code)))?;
    if with_code {
        vmcs::write(control::VMENTRY_EXCEPTION_ERR_CODE, u64::from(error_code.unwrap_or(0)))?;
    }
    Ok(Next::Resume)
}

/// Notes a #GP the policy decided on: an `hv: inject` event for the 1st,
/// 2nd, 4th, 8th ... of each partition (a guest that provokes them in a
/// loop cannot flood the console), printed after the lock is released.
fn note_gp(m: &mut Machine, v: usize, reason: GpFault) {
    let part = &mut m.partitions[m.vcpus[v].partition];
    part.gp_injected += 1;
    if part.gp_injected.is_power_of_two() {
        let mut line = String::new();
        let _ = hv_event_to!(
            line,
            "inject",
            vector = "gp",
            reason = reason.reason(),
            guest = part.info.id,
            count = part.gp_injected
        );
        part.output.push(String::from(line.trim_end()));
    }
}

/// A register by exit-qualification number; RSP lives in the VMCS.
fn reg(ctx: &Vcpu, r: Gpr) -> Result<u64, VmcsError> {
    if r == Gpr::RSP {
        vmcs::read(guest::RSP)
    } else {
        Ok(ctx.regs.get(r))
    }
}

fn set_reg(ctx: &mut Vcpu, r: Gpr, value: u64) -> Result<(), VmcsError> {
    if r == Gpr::RSP {
        vmcs::write(guest::RSP, value)
    } else {
        ctx.regs.set(r, value);
        Ok(())
    }
}

/// The guest's current privilege level: SS.DPL (SDM Vol. 3A §5.5).
fn guest_cpl() -> Result<u64, VmcsError> {
    Ok((vmcs::read(guest::SS_ACCESS_RIGHTS)? >> AR_DPL_SHIFT) & AR_DPL_MASK)
}

/// A control register as the guest sees it: its own bits, and the read
/// shadow for the bits the hypervisor owns.
fn guest_view(field: u32, shadow: u32, mask: u64) -> Result<u64, VmcsError> {
    Ok((vmcs::read(field)? & !mask) | (vmcs::read(shadow)? & mask))
}

/// Keeps the "IA-32e mode guest" entry control equal to IA32_EFER.LMA,
/// which a guest changes natively when it enables paging (§27.3.1.1).
fn sync_ia32e_mode() -> Result<(), VmcsError> {
    let efer = vmcs::read(guest::IA32_EFER_FULL)?;
    let entry = vmcs::read(control::VMENTRY_CONTROLS)?;
    let want = if efer & EFER_LMA != 0 {
        entry | u64::from(entry_ctl::IA32E_MODE_GUEST)
    } else {
        entry & !u64::from(entry_ctl::IA32E_MODE_GUEST)
    };
    if want != entry {
        vmcs::write(control::VMENTRY_CONTROLS, want)?;
    }
    Ok(())
}

/// Re-injects an event whose delivery the exit interrupted (§28.2.4,
/// §27.6.1.1), so resuming does not lose it.
fn reinject_interrupted_event() -> Result<(), VmcsError> {
    let info = vmcs::read32(ro::IDT_VECTORING_INFO)?;
    if Interruption::decode(info).is_none() {
        return Ok(());
    }
    vmcs::write(control::VMENTRY_INTERRUPTION_INFO_FIELD, u64::from(info))?;
    vmcs::write(control::VMENTRY_EXCEPTION_ERR_CODE, vmcs::read(ro::IDT_VECTORING_ERR_CODE)?)?;
    vmcs::write(control::VMENTRY_INSTRUCTION_LEN, vmcs::read(ro::VMEXIT_INSTRUCTION_LEN)?)
}

/// Handles the exit of vCPU `v`, which this CPU just ran.
fn handle_exit(m: &mut Machine, v: usize) -> Result<Next, VmcsError> {
    let exit = Exit::decode(vmcs::read32(ro::EXIT_REASON)?);
    let qualification = vmcs::read(ro::EXIT_QUALIFICATION)?;
    if exit.entry_failure {
        hv_event!("vm-entry-failed", vcpu = v, reason = exit.reason.name(), qualification = qualification);
        fault(m, v, "vm-entry-failed", qualification);
        return Ok(Next::Reschedule);
    }
    sync_ia32e_mode()?;
    // SAFETY: `v` is the vCPU that just exited on this CPU.
    let ctx = unsafe { m.vcpus[v].ctx.as_mut() };
    let next = match exit.reason {
        ExitReason::Vmcall => hypercall_exit(m, v)?,
        ExitReason::Cpuid => {
            let (leaf, subleaf) = (ctx.regs.get(Gpr::RAX) as u32, ctx.regs.get(Gpr::RCX) as u32);
            let raw = raw_cpuid::cpuid!(leaf, subleaf);
            let host = CpuidRegs { eax: raw.eax, ebx: raw.ebx, ecx: raw.ecx, edx: raw.edx };
            let tsc_khz = u32::try_from(m.tsc_hz / 1000).unwrap_or(u32::MAX);
            let r = guest_cpuid(leaf, subleaf, host, GuestCpuidInfo { vcpu_index: m.vcpus[v].index, tsc_khz });
            for (g, value) in [(Gpr::RAX, r.eax), (Gpr::RBX, r.ebx), (Gpr::RCX, r.ecx), (Gpr::RDX, r.edx)] {
                ctx.regs.set(g, u64::from(value));
            }
            advance_rip()?;
            Next::Resume
        }
        ExitReason::Rdmsr => rdmsr_exit(ctx)?,
        ExitReason::Wrmsr => wrmsr_exit(ctx)?,
        ExitReason::CrAccess => cr_exit(m, v, qualification)?,
        ExitReason::DrAccess => dr_exit(ctx, qualification)?,
        ExitReason::IoInstruction => io_exit(m, v, qualification)?,
        ExitReason::Hlt => {
            advance_rip()?;
            hlt_exit(m, v);
            Next::Reschedule
        }
        ExitReason::ExternalInterrupt => {
            // Acknowledged on exit (exit control 15): end it at the local
            // APIC, which holds its in-service bit.
            if Interruption::decode(vmcs::read32(ro::VMEXIT_INTERRUPTION_INFO)?).is_some() {
                smp::apic_eoi();
            }
            Next::Resume
        }
        ExitReason::PreemptionTimer => Next::Reschedule,
        ExitReason::EptViolation => {
            let gpa = vmcs::read(ro::GUEST_PHYSICAL_ADDR_FULL)?;
            let access = EptViolation::decode(qualification).access();
            hv_event!("ept-violation", guest = m.partitions[m.vcpus[v].partition].info.id, access = access);
            fault(m, v, "ept", gpa);
            Next::Reschedule
        }
        ExitReason::EptMisconfig => {
            fault(m, v, "ept-misconfig", vmcs::read(ro::GUEST_PHYSICAL_ADDR_FULL)?);
            Next::Reschedule
        }
        ExitReason::TripleFault => {
            fault(m, v, "triple-fault", vmcs::read(guest::RIP)?);
            Next::Reschedule
        }
        ExitReason::ExceptionOrNmi
            if Interruption::decode(vmcs::read32(ro::VMEXIT_INTERRUPTION_INFO)?)
                .is_some_and(|i| i.kind == InterruptionType::Nmi) =>
        {
            // NMIs exit (pin-based control 3) and are not the guest's.
            Next::Resume
        }
        ExitReason::Invd => {
            // Write-back caches are coherent; dropping them would only lose
            // data. Completing INVD as a no-op is what WBINVD would leave.
            advance_rip()?;
            Next::Resume
        }
        ExitReason::Rdpmc => Next::InjectGp(GpFault::HiddenFeature),
        // No nested VMX, no SMX, no MONITOR/MWAIT, no XSAVE: the guest's
        // CPUID hides them, so they are invalid opcodes.
        r if r.is_vmx_instruction()
            || matches!(r, ExitReason::Getsec | ExitReason::Mwait | ExitReason::Monitor | ExitReason::Xsetbv) =>
        {
            inject(vector::UD, None)?
        }
        other => {
            hv_event!(
                "unexpected-exit",
                guest = m.partitions[m.vcpus[v].partition].info.id,
                reason = other.name(),
                number = other.number(),
                qualification = format_args!("{qualification:#x}"),
            );
            fault(m, v, "unexpected-exit", qualification);
            Next::Reschedule
        }
    };
    let next = match next {
        Next::InjectGp(reason) => {
            note_gp(m, v, reason);
            inject(vector::GP, Some(0))?
        }
        other => {
            if other == Next::Resume {
                reinject_interrupted_event()?;
            }
            other
        }
    };
    Ok(next)
}

/// HLT: nothing will ever interrupt the vCPU (no virtual interrupts are
/// delivered), so it is off for good; a partition whose vCPUs are all off
/// has halted.
fn hlt_exit(m: &mut Machine, v: usize) {
    m.vcpus[v].state = VcpuState::Off;
    let p = m.vcpus[v].partition;
    if m.partitions[p].vcpus.iter().all(|&k| m.vcpus[k].state != VcpuState::Runnable) {
        stop_partition(m, p, PartitionState::Stopped, "halted");
    }
}

fn hypercall_exit(m: &mut Machine, v: usize) -> Result<Next, VmcsError> {
    // Hypercalls are for the guest kernel only (TLFS §3.2: #UD at CPL > 0).
    if guest_cpl()? != 0 {
        return inject(vector::UD, None);
    }
    let p = m.vcpus[v].partition;
    let (control, input, output) = {
        // SAFETY: `v` exited on this CPU.
        let ctx = unsafe { m.vcpus[v].ctx.as_ref() };
        (ctx.regs.get(Gpr::RCX), ctx.regs.get(Gpr::RDX), ctx.regs.get(Gpr::R8))
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
    ctx.regs.set(Gpr::RAX, outcome.result_word());
    if let Some(out) = outcome.fast_output {
        ctx.regs.set(Gpr::R8, out);
    }
    advance_rip()?;
    Ok(match outcome.action {
        Action::Resume => Next::Resume,
        Action::Yield => Next::Reschedule,
        Action::ShutdownSelf => {
            stop_partition(m, p, PartitionState::Stopped, "shutdown");
            Next::Reschedule
        }
        Action::LiveUpdate { image_pa, size } => {
            m.update_request[m.vcpus[v].pcpu] = Some((v, image_pa, size));
            Next::Resume
        }
        Action::FailNextFreeze => {
            m.fail_next_freeze = true;
            Next::Resume
        }
    })
}

fn rdmsr_exit(ctx: &mut Vcpu) -> Result<Next, VmcsError> {
    let msr = match GuestMsr::from_index(ctx.regs.get(Gpr::RCX) as u32) {
        Ok(msr) => msr,
        Err(e) => return Ok(Next::InjectGp(e)),
    };
    let value = match msr.home() {
        // SAFETY: the switched MSRs hold this vCPU's values while it is
        // loaded; reading them has no side effects.
        MsrHome::Switched => unsafe { rdmsr(msr.index()) },
        MsrHome::Counter => tsc::now(),
        MsrHome::Vmcs => vmcs::read(msr_field(msr))?,
    };
    ctx.regs.set(Gpr::RAX, value & 0xffff_ffff);
    ctx.regs.set(Gpr::RDX, value >> 32);
    advance_rip()?;
    Ok(Next::Resume)
}

fn wrmsr_exit(ctx: &mut Vcpu) -> Result<Next, VmcsError> {
    let msr = match GuestMsr::from_index(ctx.regs.get(Gpr::RCX) as u32) {
        Ok(msr) => msr,
        Err(e) => return Ok(Next::InjectGp(e)),
    };
    let value = (ctx.regs.get(Gpr::RDX) << 32) | (ctx.regs.get(Gpr::RAX) & 0xffff_ffff);
    let wctx =
        WriteContext { efer: vmcs::read(guest::IA32_EFER_FULL)?, paging: vmcs::read(guest::CR0)? & cr0::PG != 0 };
    let value = match check_write(msr, value, wctx) {
        Ok(v) => v,
        Err(e) => return Ok(Next::InjectGp(e)),
    };
    match msr.home() {
        // SAFETY: the allow-list checked the value (canonical addresses,
        // no reserved bits); these MSRs only affect SYSCALL and SWAPGS,
        // which the hypervisor does not use, and are switched per vCPU.
        MsrHome::Switched => unsafe { wrmsr(msr.index(), value) },
        MsrHome::Counter => return Ok(Next::InjectGp(GpFault::MsrReadOnly)),
        MsrHome::Vmcs => vmcs::write(msr_field(msr), value)?,
    }
    advance_rip()?;
    Ok(Next::Resume)
}

/// The VMCS guest-state field of an MSR that lives there (§25.4.1-2).
fn msr_field(msr: GuestMsr) -> u32 {
    match msr {
        GuestMsr::SysenterCs => guest::IA32_SYSENTER_CS,
        GuestMsr::SysenterEsp => guest::IA32_SYSENTER_ESP,
        GuestMsr::SysenterEip => guest::IA32_SYSENTER_EIP,
        GuestMsr::Pat => guest::IA32_PAT_FULL,
        GuestMsr::FsBase => guest::FS_BASE,
        GuestMsr::GsBase => guest::GS_BASE,
        // Efer and, defensively, anything else classified as VMCS-homed.
        _ => guest::IA32_EFER_FULL,
    }
}

fn cr_exit(m: &mut Machine, v: usize, qualification: u64) -> Result<Next, VmcsError> {
    // SAFETY: `v` exited on this CPU.
    let ctx = unsafe { m.vcpus[v].ctx.as_mut() };
    let policy = m.cr_policy;
    let state = || -> Result<CrContext, VmcsError> {
        Ok(CrContext {
            cr0: guest_view(guest::CR0, control::CR0_READ_SHADOW, policy.cr0_mask())?,
            cr4: guest_view(guest::CR4, control::CR4_READ_SHADOW, policy.cr4_mask())?,
            efer: vmcs::read(guest::IA32_EFER_FULL)?,
            cs_long: vmcs::read(guest::CS_ACCESS_RIGHTS)? & AR_LONG != 0,
        })
    };
    match CrAccess::decode(qualification) {
        CrAccess::MovToCr { cr: 0, gpr } => {
            let write = match policy.write_cr0(reg(ctx, gpr)?, state()?) {
                Ok(w) => w,
                Err(e) => return Ok(Next::InjectGp(e)),
            };
            if write.paging == PagingChange::EnterPae {
                let ram = m.partitions[m.vcpus[v].partition].info.ram;
                let Some(pdptes) = read_pdptes(ram, vmcs::read(guest::CR3)?) else {
                    return Ok(Next::InjectGp(GpFault::InvalidTransition));
                };
                for (field, value) in GUEST_PDPTES.into_iter().zip(pdptes) {
                    vmcs::write(field, value)?;
                }
            }
            vmcs::write(guest::CR0, write.value.real)?;
            vmcs::write(control::CR0_READ_SHADOW, write.value.shadow)?;
            vmcs::write(guest::IA32_EFER_FULL, write.efer)?;
            sync_ia32e_mode()?;
        }
        CrAccess::MovToCr { cr: 4, gpr } => match policy.write_cr4(reg(ctx, gpr)?, state()?) {
            Ok(value) => {
                vmcs::write(guest::CR4, value.real)?;
                vmcs::write(control::CR4_READ_SHADOW, value.shadow)?;
            }
            Err(e) => return Ok(Next::InjectGp(e)),
        },
        CrAccess::MovToCr { cr: 8, gpr } => {
            let value = reg(ctx, gpr)?;
            if value & CR8_RESERVED != 0 {
                return Ok(Next::InjectGp(GpFault::ReservedBits));
            }
            ctx.cr8 = value;
        }
        CrAccess::MovFromCr { cr: 8, gpr } => set_reg(ctx, gpr, ctx.cr8)?,
        other => {
            hv_event!("unexpected-cr-access", access = format_args!("{other:?}"));
            fault(m, v, "unexpected-exit", qualification);
            return Ok(Next::Reschedule);
        }
    }
    advance_rip()?;
    Ok(Next::Resume)
}

/// The four PAE PDPTEs the guest's CR3 points at, if they are in its RAM.
fn read_pdptes(ram: GuestRam, cr3: u64) -> Option<[u64; 4]> {
    let pa = ram.translate(cr3 & PAE_PDPT_MASK, 32)?;
    let mut bytes = [0u8; 32];
    // SAFETY: `pa` was translated through the guest's RAM just above.
    unsafe { IdentityMemory::new() }.read(pa, &mut bytes);
    let mut out = [0u64; 4];
    for (o, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *o = u64::from_le_bytes(b);
    }
    Some(out)
}

/// MOV DR (exits with control 23 so guests never see each other's debug
/// registers): DR0-DR3 are kept per vCPU but not armed, DR6 reads as its
/// reset value, DR7 lives in the VMCS.
fn dr_exit(ctx: &mut Vcpu, qualification: u64) -> Result<Next, VmcsError> {
    let a = DrAccess::decode(qualification);
    if a.read {
        let value = match a.dr {
            0..=3 => ctx.dr[a.dr as usize],
            6 => DR6_INIT,
            7 => vmcs::read(guest::DR7)?,
            _ => return inject(vector::UD, None),
        };
        set_reg(ctx, a.gpr, value)?;
    } else {
        let value = reg(ctx, a.gpr)?;
        match a.dr {
            0..=3 => ctx.dr[a.dr as usize] = value,
            6 => {}
            7 if value & DR7_RESERVED_HIGH != 0 => return Ok(Next::InjectGp(GpFault::ReservedBits)),
            7 => vmcs::write(guest::DR7, value)?,
            _ => return inject(vector::UD, None),
        }
    }
    advance_rip()?;
    Ok(Next::Resume)
}

/// Port I/O: COM1 is a transmit-only 16550 feeding the partition's
/// console; other ports read as all ones and ignore writes (nothing is
/// there). String I/O is not emulated.
fn io_exit(m: &mut Machine, v: usize, qualification: u64) -> Result<Next, VmcsError> {
    let io = IoAccess::decode(qualification);
    if io.string {
        hv_event!("unsupported-io", port = format_args!("{:#x}", io.port), rep = u8::from(io.rep));
        fault(m, v, "unsupported-io", u64::from(io.port));
        return Ok(Next::Reschedule);
    }
    let p = m.vcpus[v].partition;
    // SAFETY: `v` exited on this CPU.
    let ctx = unsafe { m.vcpus[v].ctx.as_mut() };
    let width_mask = (1u64 << (u32::from(io.size) * 8)) - 1;
    let dlab = m.partitions[p].uart_lcr & UART_LCR_DLAB != 0;
    if io.input {
        let value = match io.port {
            UART_LSR => UART_LSR_IDLE,
            UART_LCR => u64::from(m.partitions[p].uart_lcr),
            COM1..=COM1_LAST => 0,
            _ => width_mask,
        };
        let rax = ctx.regs.get(Gpr::RAX);
        // A 32-bit IN zero-extends into RAX; narrower ones merge.
        let merged = if io.size == 4 { value & width_mask } else { (rax & !width_mask) | (value & width_mask) };
        ctx.regs.set(Gpr::RAX, merged);
    } else {
        let byte = ctx.regs.get(Gpr::RAX) as u8;
        // The divisor latch (DLAB set), the interrupt enable register and
        // every other port take the write and do nothing with it.
        match io.port {
            UART_THR if !dlab => console_bytes(m, p, &[byte]),
            UART_LCR => m.partitions[p].uart_lcr = byte,
            _ => {}
        }
    }
    advance_rip()?;
    Ok(Next::Resume)
}
