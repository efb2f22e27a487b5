//! Live update on aarch64 (`shared/DESIGN.md` §5): stop every vCPU at an
//! exit boundary on every CPU, write the handover, and kexec into the new
//! image, which adopts guest RAM, the stage-2 tables and the vCPU state in
//! place. The orchestration (`kho::UpdateStateMachine` with the CPU
//! stopper, the test fault injector and the state saver) is shared with
//! x86_64 in `hypervisor::live_update`; this is the aarch64 side: SGIs and
//! WFE/SEV between CPUs, PSCI CPU_OFF/CPU_ON, the EL2 kexec, and the
//! stage-2, vCPU and SMMU records.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::arch::{asm, global_asm};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use hvcall::Status;
use hypervisor::frames::PAGE_SIZE;
use hypervisor::guest_console::LineBuffer;
use hypervisor::guest_image;
use hypervisor::live_update::{self, format_code, format_of, partition_state_of, state_code, state_of, Ready, Request};
use hypervisor::partition::{GuestRam, PartitionInfo};
use hypervisor::stage2::{ArmStage2, LinearMap, Stage2Table};
use hypervisor::update::{
    self, field_text, text_field, HvRecord, PartitionRecord, PreservedMap, VcpuRecord, CMDLINE_BYTES, CONTEXT_BYTES,
};
use hypervisor::{hv_event, println};
use kho::{HandoverReader, HandoverWriter};
use loader::dtb::DtbPlatform;
use loader::image_desc::{Descriptor, ImageArch};
use loader::{BootInfo, PhysRange};

use super::devices::PciHost;
use super::guests::{self, Machine, Partition, Smmu, VcpuSlot, CPU_MPIDR, MACHINE};
use super::vcpu::{Vcpu, CONTEXT_FORMAT};
use super::{gic, psci, MAX_CPUS};

pub use hypervisor::live_update::{freeze_requested, plan_scratch};

global_asm!(include_str!("kexec.S"));

extern "C" {
    static kexec_trampoline_start: u8;
    static kexec_trampoline_end: u8;
    fn kexec_jump(dtb: u64, handover: u64, src: u64, dst: u64, len: u64, entry: u64, trampoline: u64, at: u64) -> !;
}

/// PSCI CPU_OFF and AFFINITY_INFO (DEN0022E §5.1); AFFINITY_INFO returns 1
/// for OFF.
const PSCI_CPU_OFF: u64 = 0x8400_0002;
const PSCI_AFFINITY_INFO_64: u64 = 0xc400_0004;
const PSCI_AFFINITY_OFF: i64 = 1;

/// Records when the new image was entered (and when the old one jumped).
pub fn note_entry(kexec_counter: u64) {
    let (now, _) = super::counter();
    live_update::note_entry(kexec_counter, now);
}
/// Platform DTB address, handed to the next image in x0.
static DTB_PHYS: AtomicU64 = AtomicU64::new(0);

pub fn set_dtb(pa: u64) {
    DTB_PHYS.store(pa, Ordering::Relaxed);
}

/// The aarch64 side of [`live_update::UpdatePlatform`]: the requesting
/// vCPU `v`, GIC SGIs to kick the other CPUs, WFE/SEV between them.
struct Arm {
    v: usize,
}

impl live_update::UpdatePlatform for Arm {
    fn counter(&self) -> (u64, u64) {
        super::counter()
    }

    fn kick_others(&self, cpu: usize, cpus: usize) {
        for (i, m) in CPU_MPIDR.iter().enumerate().take(cpus) {
            if i != cpu {
                gic::kick(m.load(Ordering::Relaxed) & 0xff);
            }
        }
    }

    fn put_loaded(&self, cpu: usize) -> Result<(), &'static str> {
        let mut guard = MACHINE.lock();
        let m = guard.as_mut().ok_or("no-machine")?;
        if let Some(v) = m.loaded[cpu].take() {
            // SAFETY: `v` was loaded on this CPU.
            unsafe { m.vcpus[v].ctx.as_mut() }.put();
        }
        Ok(())
    }

    fn take_fail_next_freeze(&self) -> Result<bool, &'static str> {
        let mut guard = MACHINE.lock();
        let m = guard.as_mut().ok_or("no-machine")?;
        Ok(core::mem::take(&mut m.fail_next_freeze))
    }

    fn save_state(&self, w: &mut HandoverWriter, freeze_counter: u64) -> Result<(), &'static str> {
        save_state(w, freeze_counter)
    }

    fn check_image(&self, _: &[u8], _: &Descriptor) -> Result<(), &'static str> {
        Ok(())
    }

    fn set_status(&self, status: Status) {
        let mut guard = MACHINE.lock();
        if let Some(m) = guard.as_mut() {
            // SAFETY: the requesting vCPU exited on this CPU; its register
            // frame is only touched here until it runs again.
            unsafe { m.vcpus[self.v].ctx.as_mut() }.regs.x[0] = status as u64;
        }
    }

    fn alloc_handover(&self, bytes: u64) -> Option<PhysRange> {
        MACHINE.lock().as_mut().and_then(|m| m.frames.alloc_block(bytes))
    }

    fn free_handover(&self, block: PhysRange) {
        if let Some(m) = MACHINE.lock().as_mut() {
            m.frames.free_block(block);
        }
    }

    fn wait(&self) {
        // SAFETY: waits for an event.
        unsafe { asm!("wfe", options(nomem, nostack)) };
    }

    fn wake(&self) {
        // SAFETY: SEV wakes CPUs waiting in WFE; no other effect.
        unsafe { asm!("dsb ish", "sev", options(nomem, nostack)) };
    }

    fn relax(&self) {
        // SAFETY: YIELD is a hint with no architectural effect. (Rust's
        // spin_loop is ISB on aarch64, which QEMU's round-robin TCG does not
        // treat as a reason to run another CPU.)
        unsafe { asm!("yield", options(nomem, nostack)) };
    }
}

/// A non-requesting CPU, at an exit boundary: saves its vCPU, reports
/// frozen, and waits to be thawed or to go off for the kexec (the new
/// image restarts it with PSCI CPU_ON).
pub fn freeze_this_cpu(cpu: usize) {
    live_update::freeze_this_cpu(&Arm { v: 0 }, cpu, cpu_off);
}

fn cpu_off() -> ! {
    let _ = psci::call(PSCI_CPU_OFF, 0, 0, 0);
    super::park()
}

/// Records partitions, vCPUs, the SMMU and the preserved map into the
/// handover.
fn save_state(w: &mut HandoverWriter, freeze_counter: u64) -> Result<(), &'static str> {
    let mut guard = MACHINE.lock();
    let m = guard.as_mut().ok_or("no-machine")?;
    let (_, hz) = super::counter();
    let hv = HvRecord {
        freeze_counter,
        counter_hz: hz,
        cpus: m.cpus as u32,
        partitions: m.partitions.len() as u32,
        vcpus: m.vcpus.len() as u32,
        images_preserved: true,
    };
    w.subsystem("hv").and_then(|mut s| s.add_record(&hv)).map_err(|_| "hv-record")?;
    for p in &m.partitions {
        let cmd = p.cmdline.as_bytes();
        let rec = PartitionRecord {
            id: p.info.id,
            name: text_field(&p.info.name),
            privileged: p.info.privileged,
            state: p.state as u32,
            ram_host_base: p.info.ram.host_base,
            ram_size: p.info.ram.size,
            stage2_root: p.stage2.root(),
            vmid: u32::from(p.vmid),
            vcpus: p.info.vcpus,
            image_format: format_code(p.format),
            image_base: p.image.as_ptr() as u64,
            image_size: p.image.len() as u64,
            initrd_base: p.initrd.map_or(0, |r| r.base),
            initrd_size: p.initrd.map_or(0, |r| r.size),
            cmdline_len: cmd.len().min(CMDLINE_BYTES) as u32,
            cmdline: text_field(&p.cmdline),
        };
        live_update::add_partition(w, &rec)?;
    }
    for (n, slot) in m.vcpus.iter().enumerate() {
        let mut context = [0u8; CONTEXT_BYTES];
        // SAFETY: every CPU has put its vCPU (all are frozen), so no
        // context is loaded or changing.
        let len = unsafe { slot.ctx.as_ref() }.to_context(&mut context).ok_or("context-too-large")?;
        let rec = VcpuRecord {
            partition: m.partitions[slot.partition].info.id,
            index: slot.index,
            pcpu: slot.pcpu as u32,
            state: state_code(slot.state),
            pending: slot.pending,
            context_format: CONTEXT_FORMAT,
            context_len: len as u32,
            context,
        };
        live_update::add_vcpu(w, n, &rec)?;
    }
    if let Some(smmu) = m.smmu.as_ref() {
        let rec = update::IommuRecord::from_state(&smmu.state()).ok_or("too-many-iommu-assignments")?;
        w.subsystem("iommu").and_then(|mut s| s.add_record(&rec)).map_err(|_| "iommu-record")?;
    }
    live_update::add_bitmap_roots(w, m.preserved.bitmap.roots())
}

fn elapsed_ms(t0: u64) -> u64 {
    let (now, freq) = super::counter();
    update::blackout_us(t0, now, freq) / 1000
}

/// Runs a live update requested by the vCPU loaded on `cpu`. Returns only
/// if the update was refused or cancelled (the guest then gets the status).
pub fn run(cpu: usize, image_pa: u64, size: u64) {
    let requester = {
        let guard = MACHINE.lock();
        guard.as_ref().and_then(|m| m.loaded[cpu])
    };
    let Some(v) = requester else { return };
    let arm = Arm { v };
    if !live_update::begin() {
        live_update::UpdatePlatform::set_status(&arm, Status::OperationDenied);
        return;
    }
    let state = {
        let guard = MACHINE.lock();
        guard.as_ref().map(|m| (m.ram.clone(), m.scratch.clone(), m.update_count, m.cpus))
    };
    let Some((ram, scratch, update_count, cpus)) = state else {
        live_update::end();
        return;
    };
    let req = Request {
        cpu,
        cpus,
        image_pa,
        size,
        arch: ImageArch::Aarch64,
        tail_bytes: PAGE_SIZE,
        ram: &ram,
        scratch: &scratch,
        update_count,
    };
    match live_update::prepare_and_freeze(&arm, &req) {
        Ok(ready) => kexec(&arm, &ready),
        Err(_) => live_update::end(),
    }
}

/// Sends the other CPUs off and jumps to the new image through the
/// trampoline. Never returns.
fn kexec(arm: &Arm, ready: &Ready) -> ! {
    let (stage, image_len, buf, len) = (ready.stage, ready.image_len, ready.handover, ready.handover_len);
    let guard = MACHINE.lock();
    let Some(m) = guard.as_ref() else { super::park() };
    live_update::release_for_kexec(arm);
    let me = super::mpidr() & 0xff_00ff_ffff;
    for (i, mpidr) in CPU_MPIDR.iter().enumerate().take(m.cpus) {
        let target = mpidr.load(Ordering::Relaxed);
        if target == me || i >= MAX_CPUS {
            continue;
        }
        let (t0, _) = super::counter();
        while psci::call(PSCI_AFFINITY_INFO_64, target, 0, 0) != Some(PSCI_AFFINITY_OFF) {
            if elapsed_ms(t0) > live_update::STOP_TIMEOUT_MS {
                break;
            }
            live_update::UpdatePlatform::relax(arm);
        }
    }
    let (t_start, t_end, image_start, image_end) = (
        core::ptr::addr_of!(kexec_trampoline_start) as u64,
        core::ptr::addr_of!(kexec_trampoline_end) as u64,
        core::ptr::addr_of!(super::__image_start) as u64,
        core::ptr::addr_of!(super::__image_end) as u64,
    );
    let tramp = (stage.base + image_len).next_multiple_of(PAGE_SIZE);
    // SAFETY: the trampoline page lies in scratch right after the staged
    // image (the size check left a page for it).
    unsafe { core::ptr::copy_nonoverlapping(t_start as *const u8, tramp as *mut u8, (t_end - t_start) as usize) };
    // SAFETY: stops this CPU's hypervisor timer before leaving.
    unsafe { asm!("msr cnthp_ctl_el2, xzr", "isb", options(nomem, nostack)) };
    // With the MMU about to go off, write back everything the new image or
    // the trampoline reads, and drop the old image's lines so none is
    // written back over the new one (Arm ARM D7.5.9).
    for (base, end) in [(image_start, image_end), (stage.base, tramp + PAGE_SIZE), (buf.base, buf.base + len)] {
        clean_invalidate(base, end);
    }
    let dtb = DTB_PHYS.load(Ordering::Relaxed);
    let copy_len = image_len.next_multiple_of(8);
    let (now, _) = super::counter();
    // SAFETY: the trampoline copies the checked image over this one and
    // enters it at its link address with x0 = DTB, x1 = handover; nothing of
    // the old image is used after the jump.
    unsafe { kexec_jump(dtb, buf.base, stage.base, image_start, copy_len, image_start, tramp, now) }
}

fn clean_invalidate(base: u64, end: u64) {
    let mut a = base & !63;
    while a < end {
        // SAFETY: cache maintenance by VA on identity-mapped memory.
        unsafe { asm!("dc civac, {0}", in(reg) a, options(nostack)) };
        a += 64;
    }
    // SAFETY: completes the maintenance.
    unsafe { asm!("dsb sy", options(nostack)) };
}

/// Called by each CPU as it first enters a guest: the last one to do so
/// after an update ends the blackout and reports it.
pub fn note_resumed() {
    let (now, hz) = super::counter();
    live_update::note_resumed(now, hz);
}

/// Adopts the running SMMU from its record: translation stays enabled, the
/// SMMU is not reset, and every structure is checked against the live
/// registers and RAM.
fn adopt_smmu(node: &kho::SubsystemNode<'_>, platform: &DtbPlatform, ram: &[(u64, u64)]) -> Result<Smmu, &'static str> {
    let rec = node.record::<update::IommuRecord>().ok().flatten().ok_or("iommu-record")?;
    let state = rec.to_state().ok_or("iommu-record-fields")?;
    let regs = platform.smmu.ok_or("handover-has-smmu-platform-has-none")?;
    let base = NonNull::new(regs.base as *mut u8).ok_or("smmu-address")?;
    // SAFETY: the DTB's SMMU register frame, mapped as device memory by the
    // host map and used by this driver only.
    let mmio = unsafe { iommu::MmioRegs::new(base) };
    // SAFETY: RAM is identity-mapped at EL2.
    let phys = unsafe { iommu::LinearMap::new(0) };
    let smmu = Smmu::adopt(mmio, phys, &state, ram, iommu::SmmuConfig::DEFAULT_SPIN_BUDGET).map_err(|e| {
        println!("smmu adopt: {e}");
        "smmu-adopt"
    })?;
    hv_event!(
        "iommu-adopted",
        strtab = format_args!("{:#x}", state.strtab_base),
        cmdq = format_args!("{:#x}", state.cmdq_base),
        evtq = format_args!("{:#x}", state.evtq_base),
        streams = state.assignments.len(),
    );
    Ok(smmu)
}

/// The restore side: validates the handover at `handover_pa`, adopts the
/// preserved map, the stage-2 tables and every vCPU, and installs the
/// machine. Returns how many partitions were adopted.
#[allow(clippy::too_many_lines)]
pub fn restore(
    handover_pa: u64,
    info: &BootInfo,
    platform: &DtbPlatform,
    cpus: usize,
    image: PhysRange,
) -> Result<usize, &'static str> {
    let ram = &info.ram;
    let head = guests::image_bytes(PhysRange::new(handover_pa, 8), ram).ok_or("handover-outside-ram")?;
    let size = HandoverReader::blob_size(head).map_err(|_| "handover-header")?;
    let blob = guests::image_bytes(PhysRange::new(handover_pa, size as u64), ram).ok_or("handover-outside-ram")?;
    let ram_map = live_update::ram_map(ram).ok_or("ram-map")?;
    let reader = HandoverReader::new(blob, handover_pa, &ram_map).map_err(|e| {
        println!("handover: {e}");
        "handover-invalid"
    })?;
    let scratch = reader.scratch().clone();
    let mut reserved = info.reserved.clone();
    reserved.push(image);
    let adopted = live_update::adopt_preserved(&reader, ram, reserved)?;
    let (bitmap, frames, preserved_pages) = (adopted.bitmap, adopted.frames, adopted.preserved_pages);

    let hv = reader.subsystem("hv").and_then(|n| n.record::<HvRecord>().ok().flatten()).ok_or("hv-record")?;
    let mut partitions: Vec<Partition> = Vec::new();
    let adopt_ram: Vec<(u64, u64)> = ram.iter().map(|r| (r.base, r.size)).collect();
    // Assigned BARs are stage-2 leaves outside RAM, inside the PCI window.
    let pci = platform.pcie.as_ref().and_then(PciHost::from_dtb);
    let adopt_devices: Vec<(u64, u64)> = pci.iter().map(|p| (p.mmio32.base, p.mmio32.size)).collect();
    for node in reader.children("partitions") {
        let rec = node.record::<PartitionRecord>().ok().flatten().ok_or("partition-record")?;
        if !bitmap.contains_range(rec.ram_host_base..rec.ram_host_base + rec.ram_size) {
            return Err("partition-ram-not-preserved");
        }
        // SAFETY: RAM is identity-mapped at EL2.
        let phys = unsafe { LinearMap::new(0) };
        let stage2 = Stage2Table::<ArmStage2, LinearMap>::adopt(rec.stage2_root, &adopt_ram, &adopt_devices, phys)
            .map_err(|e| {
                println!("stage-2 of partition {}: {e}", rec.id);
                "stage2-adopt"
            })?;
        let image = guests::image_bytes(PhysRange::new(rec.image_base, rec.image_size), ram).ok_or("image")?;
        let format = format_of(rec.image_format).ok_or("image-format")?;
        let initrd = (rec.initrd_size != 0).then(|| PhysRange::new(rec.initrd_base, rec.initrd_size));
        let cmdline =
            alloc::string::String::from(field_text(&rec.cmdline[..(rec.cmdline_len as usize).min(CMDLINE_BYTES)]));
        let layout = guest_image::layout(format, image, rec.ram_size, initrd.map(|r| r.size)).map_err(|_| "layout")?;
        partitions.push(Partition {
            info: PartitionInfo {
                id: rec.id,
                name: alloc::string::String::from(field_text(&rec.name)),
                privileged: rec.privileged,
                ram: GuestRam { host_base: rec.ram_host_base, size: rec.ram_size },
                vcpus: rec.vcpus,
            },
            state: partition_state_of(rec.state).ok_or("partition-state")?,
            stage2,
            vmid: u16::try_from(rec.vmid).map_err(|_| "vmid")?,
            console: LineBuffer::default(),
            vcpus: Vec::new(),
            image,
            format,
            initrd,
            cmdline,
            layout,
        });
    }
    let mut slots: Vec<VcpuSlot> = Vec::new();
    let mut queues: [Vec<usize>; MAX_CPUS] = Default::default();
    for node in reader.children("vcpus") {
        let rec = node.record::<VcpuRecord>().ok().flatten().ok_or("vcpu-record")?;
        if rec.context_format != CONTEXT_FORMAT {
            return Err("vcpu-context-format");
        }
        let p = partitions.iter().position(|p| p.info.id == rec.partition).ok_or("vcpu-partition")?;
        let ctx = Vcpu::from_context(&rec.context[..(rec.context_len as usize).min(CONTEXT_BYTES)]).ok_or("context")?;
        let pcpu = (rec.pcpu as usize).min(cpus.saturating_sub(1));
        let n = slots.len();
        partitions[p].vcpus.push(n);
        queues[pcpu].push(n);
        slots.push(VcpuSlot {
            ctx: NonNull::from(Box::leak(Box::new(ctx))),
            partition: p,
            index: rec.index,
            pcpu,
            state: state_of(rec.state).ok_or("vcpu-state")?,
            pending: rec.pending,
            start: None,
        });
    }
    let n = partitions.len();
    for p in &partitions {
        hv_event!(
            "guest-adopted",
            id = p.info.id,
            name = p.info.name,
            stage2_root = format_args!("{:#x}", p.stage2.root()),
            ram = format_args!("{:#x}", p.info.ram.host_base),
        );
    }
    let smmu = match reader.subsystem("iommu") {
        None => None,
        Some(node) => Some(adopt_smmu(node, platform, &adopt_ram)?),
    };
    let machine = Machine {
        partitions,
        vcpus: slots,
        queues,
        loaded: [None; MAX_CPUS],
        frames,
        cpus,
        preserved: PreservedMap { bitmap },
        scratch,
        ram: ram.clone(),
        update_count: reader.update_count(),
        fail_next_freeze: false,
        smmu,
        pci,
    };
    // The consumed handover is no longer needed once restored; it is not
    // in the preserved map, so it goes back to the allocator after resume.
    let footprint = reader.footprint();
    live_update::set_resume_cpus(cpus);
    let mut machine = machine;
    machine.frames.add_free(PhysRange::new(footprint.base(), footprint.size()));
    let (now, _) = super::counter();
    live_update::note_restored(&reader, size as u64, preserved_pages, hv.freeze_counter, now);
    guests::install(machine);
    Ok(n)
}
