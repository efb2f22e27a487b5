//! Live update on aarch64 (`shared/DESIGN.md` §5): stop every vCPU at an
//! exit boundary on every CPU, write the handover, and kexec into the new
//! image, which adopts guest RAM, the stage-2 tables and the vCPU state in
//! place. The orchestration follows `kho::UpdateStateMachine`; the
//! participants are the CPU stopper, the test fault injector and the
//! state saver.

use alloc::boxed::Box;
use alloc::format;
use alloc::vec::Vec;
use core::arch::{asm, global_asm};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use hvcall::{PartitionState, Status};
use hypervisor::frames::{self, FrameAllocator, PAGE_SIZE};
use hypervisor::guest_console::LineBuffer;
use hypervisor::guest_dtb::{self, GuestDtbSpec};
use hypervisor::guest_image;
use hypervisor::partition::{GuestRam, PartitionInfo};
use hypervisor::sched::VcpuState;
use hypervisor::stage2::{ArmStage2, LinearMap, Stage2Table};
use hypervisor::update::{
    self, field_text, text_field, HvRecord, IdentityPages, PartitionRecord, PreservedMap, VcpuRecord, CMDLINE_BYTES,
    CONTEXT_BYTES,
};
use hypervisor::{hv_event, println, BUILD_ID, VERSION};
use kho::{
    BitmapRoot, HandoverIdentity, HandoverReader, HandoverWriter, RamMap, ScratchKind, ScratchPlan, UpdateParticipant,
    UpdateStateMachine,
};
use loader::dtb::DtbPlatform;
use loader::image_desc::ImageArch;
use loader::manifest::ImageFormat;
use loader::{BootInfo, PhysRange};
use sparse_bitmap::{MultiOrderBitmap, PageSize};

use super::devices::PciHost;
use super::guests::{self, Machine, Partition, Smmu, VcpuSlot, CPU_MPIDR, MACHINE};
use super::vcpu::{Vcpu, CONTEXT_FORMAT};
use super::{gic, psci, MAX_CPUS};

global_asm!(include_str!("kexec.S"));

extern "C" {
    static kexec_trampoline_start: u8;
    static kexec_trampoline_end: u8;
    fn kexec_jump(dtb: u64, handover: u64, src: u64, dst: u64, len: u64, entry: u64, trampoline: u64, at: u64) -> !;
}

const FREEZE_NONE: u8 = 0;
const FREEZE_REQUESTED: u8 = 1;
const FREEZE_KEXEC: u8 = 2;
/// How long the requesting CPU waits for the others to stop, or go off.
const STOP_TIMEOUT_MS: u64 = 1000;
/// Room for the handover blob (records are ~1 KiB per vCPU).
const HANDOVER_BYTES: u64 = 256 << 10;
/// PSCI CPU_OFF and AFFINITY_INFO (DEN0022E §5.1); AFFINITY_INFO returns 1
/// for OFF.
const PSCI_CPU_OFF: u64 = 0x8400_0002;
const PSCI_AFFINITY_INFO_64: u64 = 0xc400_0004;
const PSCI_AFFINITY_OFF: i64 = 1;

static FREEZE: AtomicU8 = AtomicU8::new(FREEZE_NONE);
static FROZEN: AtomicUsize = AtomicUsize::new(0);
static IN_PROGRESS: AtomicBool = AtomicBool::new(false);
/// Restore side: the freeze counter from the handover (0: no update), and
/// how many CPUs have re-entered guests since.
static RESUME_FROM: AtomicU64 = AtomicU64::new(0);
static RESUMED: AtomicUsize = AtomicUsize::new(0);
static RESUME_CPUS: AtomicUsize = AtomicUsize::new(0);
static DONE_COUNT: AtomicU64 = AtomicU64::new(0);
static DONE_HANDOVER_BYTES: AtomicU64 = AtomicU64::new(0);
static DONE_PRESERVED_PAGES: AtomicU64 = AtomicU64::new(0);
/// Counter values of the phases after the freeze: the kexec jump, the new
/// image's first instruction of Rust, and the end of restore.
static PHASE_KEXEC: AtomicU64 = AtomicU64::new(0);
static PHASE_ENTRY: AtomicU64 = AtomicU64::new(0);
static PHASE_RESTORED: AtomicU64 = AtomicU64::new(0);

/// Records when the new image was entered (and when the old one jumped).
pub fn note_entry(kexec_counter: u64) {
    let (now, _) = super::counter();
    PHASE_KEXEC.store(kexec_counter, Ordering::Relaxed);
    PHASE_ENTRY.store(now, Ordering::Relaxed);
}
/// Platform DTB address, handed to the next image in x0.
static DTB_PHYS: AtomicU64 = AtomicU64::new(0);

pub fn set_dtb(pa: u64) {
    DTB_PHYS.store(pa, Ordering::Relaxed);
}

pub fn freeze_requested() -> bool {
    FREEZE.load(Ordering::Acquire) == FREEZE_REQUESTED
}

fn sev() {
    // SAFETY: SEV wakes CPUs waiting in WFE; no other effect.
    unsafe { asm!("dsb ish", "sev", options(nomem, nostack)) };
}

fn wfe() {
    // SAFETY: waits for an event.
    unsafe { asm!("wfe", options(nomem, nostack)) };
}

/// A non-requesting CPU, at an exit boundary: saves its vCPU, reports
/// frozen, and waits to be thawed or to go off for the kexec.
pub fn freeze_this_cpu(cpu: usize) {
    {
        let mut guard = MACHINE.lock();
        if let Some(m) = guard.as_mut() {
            if let Some(v) = m.loaded[cpu].take() {
                // SAFETY: `v` was loaded on this CPU.
                unsafe { m.vcpus[v].ctx.as_mut() }.put();
            }
        }
    }
    FROZEN.fetch_add(1, Ordering::AcqRel);
    loop {
        match FREEZE.load(Ordering::Acquire) {
            FREEZE_REQUESTED => wfe(),
            FREEZE_KEXEC => {
                // The new image restarts this CPU with PSCI CPU_ON.
                let _ = psci::call(PSCI_CPU_OFF, 0, 0, 0);
                super::park();
            }
            _ => {
                FROZEN.fetch_sub(1, Ordering::AcqRel);
                return;
            }
        }
    }
}

fn set_result(v: usize, status: Status) {
    let mut guard = MACHINE.lock();
    if let Some(m) = guard.as_mut() {
        // SAFETY: the requesting vCPU exited on this CPU; its register frame
        // is only touched here until it runs again.
        unsafe { m.vcpus[v].ctx.as_mut() }.regs.x[0] = status as u64;
    }
}

fn staging(scratch: &ScratchPlan) -> Option<PhysRange> {
    scratch
        .regions()
        .iter()
        .find(|r| r.kind == ScratchKind::Global)
        .map(|r| PhysRange::new(r.range.base(), r.range.size()))
}

fn elapsed_ms(t0: u64) -> u64 {
    let (now, freq) = super::counter();
    update::blackout_us(t0, now, freq) / 1000
}

/// Stops the other CPUs at exit boundaries (blackout starts here).
struct CpuStopper {
    cpu: usize,
    cpus: usize,
}

impl UpdateParticipant for CpuStopper {
    type Error = &'static str;

    fn name(&self) -> &'static str {
        "cpus"
    }

    fn prepare(&mut self, _: &mut HandoverWriter) -> Result<(), Self::Error> {
        Ok(())
    }

    fn freeze(&mut self, _: &mut HandoverWriter) -> Result<(), Self::Error> {
        FROZEN.store(0, Ordering::Release);
        FREEZE.store(FREEZE_REQUESTED, Ordering::Release);
        for (i, m) in CPU_MPIDR.iter().enumerate().take(self.cpus) {
            if i != self.cpu {
                gic::kick(m.load(Ordering::Relaxed) & 0xff);
            }
        }
        {
            let mut guard = MACHINE.lock();
            let m = guard.as_mut().ok_or("no-machine")?;
            if let Some(v) = m.loaded[self.cpu].take() {
                // SAFETY: loaded on this CPU.
                unsafe { m.vcpus[v].ctx.as_mut() }.put();
            }
        }
        let (t0, _) = super::counter();
        while FROZEN.load(Ordering::Acquire) + 1 < self.cpus {
            if elapsed_ms(t0) > STOP_TIMEOUT_MS {
                return Err("cpus-did-not-stop");
            }
            core::hint::spin_loop();
        }
        Ok(())
    }

    fn unfreeze(&mut self) {
        FREEZE.store(FREEZE_NONE, Ordering::Release);
        sev();
    }

    fn restore(&mut self, _: &HandoverReader<'_>) -> Result<(), Self::Error> {
        Ok(())
    }

    fn finish(&mut self) {}
}

/// Test hook: fails the freeze once when armed (`TEST_FAIL_NEXT_FREEZE`).
struct FaultInjector;

impl UpdateParticipant for FaultInjector {
    type Error = &'static str;

    fn name(&self) -> &'static str {
        "fault-injector"
    }

    fn prepare(&mut self, _: &mut HandoverWriter) -> Result<(), Self::Error> {
        Ok(())
    }

    fn freeze(&mut self, _: &mut HandoverWriter) -> Result<(), Self::Error> {
        let mut guard = MACHINE.lock();
        let m = guard.as_mut().ok_or("no-machine")?;
        if core::mem::take(&mut m.fail_next_freeze) {
            return Err("injected-freeze-failure");
        }
        Ok(())
    }

    fn unfreeze(&mut self) {}

    fn restore(&mut self, _: &HandoverReader<'_>) -> Result<(), Self::Error> {
        Ok(())
    }

    fn finish(&mut self) {}
}

fn format_code(f: ImageFormat) -> u32 {
    match f {
        ImageFormat::Flat => 0,
        ImageFormat::Arm64Image => 1,
        ImageFormat::Elf => 2,
    }
}

fn format_of(code: u32) -> Option<ImageFormat> {
    match code {
        0 => Some(ImageFormat::Flat),
        1 => Some(ImageFormat::Arm64Image),
        2 => Some(ImageFormat::Elf),
        _ => None,
    }
}

fn state_code(s: VcpuState) -> u32 {
    match s {
        VcpuState::Off => 0,
        VcpuState::Runnable => 1,
        VcpuState::Waiting => 2,
        VcpuState::Stopped => 3,
    }
}

fn state_of(code: u32) -> Option<VcpuState> {
    match code {
        0 => Some(VcpuState::Off),
        1 => Some(VcpuState::Runnable),
        2 => Some(VcpuState::Waiting),
        3 => Some(VcpuState::Stopped),
        _ => None,
    }
}

fn partition_state_of(code: u32) -> Option<PartitionState> {
    match code {
        0 => Some(PartitionState::Running),
        1 => Some(PartitionState::Stopped),
        2 => Some(PartitionState::Faulted),
        _ => None,
    }
}

/// Records partitions, vCPUs and the preserved map into the handover.
struct StateSaver {
    freeze_counter: u64,
}

impl UpdateParticipant for StateSaver {
    type Error = &'static str;

    fn name(&self) -> &'static str {
        "partitions"
    }

    fn prepare(&mut self, _: &mut HandoverWriter) -> Result<(), Self::Error> {
        Ok(())
    }

    fn freeze(&mut self, w: &mut HandoverWriter) -> Result<(), Self::Error> {
        let mut guard = MACHINE.lock();
        let m = guard.as_mut().ok_or("no-machine")?;
        let (_, hz) = super::counter();
        let hv = HvRecord {
            freeze_counter: self.freeze_counter,
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
            w.subsystem(&format!("partitions/{}", p.info.id))
                .and_then(|mut s| s.add_record(&rec))
                .map_err(|_| "partition-record")?;
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
            w.subsystem(&format!("vcpus/{n}")).and_then(|mut s| s.add_record(&rec)).map_err(|_| "vcpu-record")?;
        }
        if let Some(smmu) = m.smmu.as_ref() {
            let rec = update::IommuRecord::from_state(&smmu.state()).ok_or("too-many-iommu-assignments")?;
            w.subsystem("iommu").and_then(|mut s| s.add_record(&rec)).map_err(|_| "iommu-record")?;
        }
        for (size, root) in PageSize::ALL.iter().zip(m.preserved.bitmap.roots()) {
            if root != 0 {
                w.add_bitmap_root(BitmapRoot { order: size.order(), root }).map_err(|_| "bitmap-root")?;
            }
        }
        Ok(())
    }

    fn unfreeze(&mut self) {}

    fn restore(&mut self, _: &HandoverReader<'_>) -> Result<(), Self::Error> {
        Ok(())
    }

    fn finish(&mut self) {}
}

fn to_kho(r: &PhysRange) -> Option<kho::PhysRange> {
    kho::PhysRange::new(r.base, r.size).ok()
}

fn ram_map(ram: &[PhysRange]) -> Option<RamMap> {
    let ranges: Vec<kho::PhysRange> = ram.iter().filter_map(to_kho).collect();
    RamMap::new(&ranges).ok()
}

/// Plans the scratch regions at first boot (`kho::ScratchPlan`): room for
/// the next image, never used for anything preserved.
pub fn plan_scratch(ram: &[PhysRange], occupied: &[PhysRange], image_bytes: u64) -> Option<ScratchPlan> {
    let needs = kho::ScratchNeeds { image_bytes, heap_bytes: 0, dma32_bytes: 0 };
    let occupied: Vec<kho::PhysRange> = occupied.iter().filter_map(to_kho).collect();
    ScratchPlan::plan(&ram_map(ram)?, &needs, &kho::ScratchPolicy::default(), &occupied).ok()
}

/// Runs a live update requested by the vCPU loaded on `cpu`. Returns only
/// if the update was refused or cancelled (the guest then gets the status).
pub fn run(cpu: usize, image_pa: u64, size: u64) {
    let requester = {
        let guard = MACHINE.lock();
        guard.as_ref().and_then(|m| m.loaded[cpu])
    };
    let Some(v) = requester else { return };
    if IN_PROGRESS.swap(true, Ordering::AcqRel) {
        set_result(v, Status::OperationDenied);
        return;
    }
    match prepare_and_freeze(cpu, v, image_pa, size) {
        Ok(ready) => kexec(&ready),
        Err(()) => IN_PROGRESS.store(false, Ordering::Release),
    }
}

/// Everything the kexec needs, once the guests are frozen.
struct Ready {
    /// The staged image in scratch and its length.
    stage: PhysRange,
    image_len: u64,
    /// The handover blob in preserved memory and its length.
    handover: PhysRange,
    handover_len: u64,
}

/// Stages and checks the image, allocates the handover (brownout), freezes,
/// and writes the handover. On refusal or cancel the requester's status is
/// set and the guests continue.
fn prepare_and_freeze(cpu: usize, v: usize, image_pa: u64, size: u64) -> Result<Ready, ()> {
    let (stage, ram, scratch, update_count, cpus) = {
        let guard = MACHINE.lock();
        let m = guard.as_ref().ok_or(())?;
        let stage = staging(&m.scratch).unwrap_or(PhysRange::new(0, 0));
        (stage, m.ram.clone(), m.scratch.clone(), m.update_count, m.cpus)
    };
    // Copy first, then validate the copy: the guest cannot change what was
    // checked. The trampoline takes one page after the image.
    let limit = stage.size.saturating_sub(PAGE_SIZE);
    let refuse = |reason: &str| {
        hv_event!("update-refused", reason = reason);
        set_result(v, Status::InvalidParameter);
    };
    if size > limit {
        refuse("too-large");
        return Err(());
    }
    // SAFETY: `image_pa..+size` was checked to lie in the caller's RAM (the
    // hypercall layer), the staging area is scratch that nothing else uses,
    // and both are identity-mapped.
    let staged = unsafe {
        core::ptr::copy_nonoverlapping(image_pa as *const u8, stage.base as *mut u8, size as usize);
        core::slice::from_raw_parts(stage.base as *const u8, size as usize)
    };
    let desc = match update::check_request(staged, ImageArch::Aarch64, limit) {
        Ok(d) => d,
        Err(e) => {
            println!("update: {e}");
            refuse(e.reason());
            return Err(());
        }
    };
    hv_event!("update-begin", from = VERSION, to = desc.version_str(), image_bytes = size, count = update_count + 1);
    let identity = HandoverIdentity { version: VERSION, build_id: BUILD_ID, update_count: update_count + 1 };
    let ram_map = ram_map(&ram).ok_or(())?;
    let mut writer = HandoverWriter::new(&identity, ram_map, &scratch).map_err(|_| refuse("handover-writer"))?;
    let handover = MACHINE.lock().as_mut().and_then(|m| m.frames.alloc_block(HANDOVER_BYTES));
    let Some(handover) = handover else {
        refuse("no-memory-for-handover");
        return Err(());
    };
    let release = |why: &str| {
        if let Some(m) = MACHINE.lock().as_mut() {
            m.frames.free_block(handover);
        }
        hv_event!("update-cancelled", reason = why);
        set_result(v, Status::OperationDenied);
    };
    // The requester sees SUCCESS when it runs again, in the new image.
    set_result(v, Status::Success);
    let (freeze_counter, _) = super::counter();
    let mut sm: UpdateStateMachine<'_, &'static str> = UpdateStateMachine::new();
    let registered = sm
        .register(Box::new(CpuStopper { cpu, cpus }))
        .and_then(|()| sm.register(Box::new(FaultInjector)))
        .and_then(|()| sm.register(Box::new(StateSaver { freeze_counter })));
    let result = registered.and_then(|()| sm.prepare(&mut writer)).and_then(|()| sm.freeze(&mut writer));
    if let Err(e) = result {
        let reason = match e {
            kho::UpdateError::FreezeFailed { error, .. } | kho::UpdateError::PrepareFailed { error, .. } => error,
            _ => "state-machine",
        };
        let _ = sm.cancel();
        release(reason);
        return Err(());
    }
    // SAFETY: a block just allocated for the handover; identity-mapped.
    let blob_out = unsafe { core::slice::from_raw_parts_mut(handover.base as *mut u8, handover.size as usize) };
    match writer.write_to(blob_out, handover.base) {
        Ok(n) => Ok(Ready { stage, image_len: size, handover, handover_len: n as u64 }),
        Err(e) => {
            println!("update: handover: {e}");
            let _ = sm.cancel();
            release("handover-write");
            Err(())
        }
    }
}

/// Sends the other CPUs off and jumps to the new image through the
/// trampoline. Never returns.
fn kexec(ready: &Ready) -> ! {
    let (stage, image_len, buf, len) = (ready.stage, ready.image_len, ready.handover, ready.handover_len);
    let guard = MACHINE.lock();
    let Some(m) = guard.as_ref() else { super::park() };
    FREEZE.store(FREEZE_KEXEC, Ordering::Release);
    sev();
    let me = super::mpidr() & 0xff_00ff_ffff;
    for (i, mpidr) in CPU_MPIDR.iter().enumerate().take(m.cpus) {
        let target = mpidr.load(Ordering::Relaxed);
        if target == me || i >= MAX_CPUS {
            continue;
        }
        let (t0, _) = super::counter();
        while psci::call(PSCI_AFFINITY_INFO_64, target, 0, 0) != Some(PSCI_AFFINITY_OFF) {
            if elapsed_ms(t0) > STOP_TIMEOUT_MS {
                break;
            }
            core::hint::spin_loop();
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
    let t0 = RESUME_FROM.load(Ordering::Acquire);
    if t0 == 0 {
        return;
    }
    let n = RESUMED.fetch_add(1, Ordering::AcqRel) + 1;
    if n == RESUME_CPUS.load(Ordering::Acquire) {
        let (now, hz) = super::counter();
        hv_event!(
            "update-done",
            count = DONE_COUNT.load(Ordering::Relaxed),
            version = VERSION,
            blackout_us = update::blackout_us(t0, now, hz),
            handover_bytes = DONE_HANDOVER_BYTES.load(Ordering::Relaxed),
            preserved_pages = DONE_PRESERVED_PAGES.load(Ordering::Relaxed),
            freeze_at = t0,
            resume_at = now,
            counter_hz = hz,
        );
        let (kexec, entry, restored) = (
            PHASE_KEXEC.load(Ordering::Relaxed),
            PHASE_ENTRY.load(Ordering::Relaxed),
            PHASE_RESTORED.load(Ordering::Relaxed),
        );
        hv_event!(
            "update-phases",
            freeze_to_kexec_us = update::blackout_us(t0, kexec, hz),
            kexec_to_entry_us = update::blackout_us(kexec, entry, hz),
            entry_to_restored_us = update::blackout_us(entry, restored, hz),
            restored_to_resumed_us = update::blackout_us(restored, now, hz),
        );
        RESUME_FROM.store(0, Ordering::Release);
    }
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
    let ram_map = ram_map(ram).ok_or("ram-map")?;
    let reader = HandoverReader::new(blob, handover_pa, &ram_map).map_err(|e| {
        println!("handover: {e}");
        "handover-invalid"
    })?;
    let scratch = reader.scratch().clone();
    let staging = staging(&scratch).ok_or("no-global-scratch")?;
    // Until the preserved map is read, scratch is the only memory to use.
    let mut scratch_frames = FrameAllocator::new(&[staging]);
    let mut roots = [0u64; 3];
    for r in reader.bitmap_roots() {
        let slot = PageSize::ALL.iter().position(|s| s.order() == r.order).ok_or("bitmap-order")?;
        roots[slot] = r.root;
    }
    let ram_ranges: Vec<core::ops::Range<u64>> = ram.iter().map(|r| r.base..r.base + r.size).collect();
    // SAFETY: RAM is identity-mapped, and nothing else touches the bitmap
    // pages while adopt runs (only this CPU is up).
    let bitmap =
        unsafe { MultiOrderBitmap::adopt(IdentityPages, &mut scratch_frames, roots, &ram_ranges) }.map_err(|e| {
            println!("preserved map: {e:?}");
            "bitmap-adopt"
        })?;
    let preserved_pages = bitmap.frame_count();
    let mut reserved = info.reserved.clone();
    reserved.push(image);
    reserved.extend(scratch.regions().iter().map(|r| PhysRange::new(r.range.base(), r.range.size())));
    reserved.extend(reader.preserved_ranges().map(|r| PhysRange::new(r.base(), r.size())));
    reserved.extend(bitmap.runs().map(|r| PhysRange::new(r.start, r.end - r.start)));
    reserved.extend(bitmap.node_pages().map(|pa| PhysRange::new(pa, PAGE_SIZE)));
    let free = frames::subtract(ram, &reserved);
    // The allocator is built from `free` only: check that no preserved page
    // is in it (the event lets tests see it, on every update).
    let overlap = free.iter().filter(|r| bitmap.runs_in(r.base..r.base + r.size).next().is_some()).count();
    hv_event!(
        "update-restore",
        free_ranges = free.len(),
        preserved_overlap = overlap,
        bitmap_nodes = bitmap.node_count()
    );
    if overlap != 0 {
        return Err("preserved-pages-in-allocator");
    }
    let frames = FrameAllocator::new(&free);

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
        let dtb = guest_dtb::build(&GuestDtbSpec {
            ram_size: rec.ram_size,
            vcpus: rec.vcpus,
            bootargs: &cmdline,
            initrd: layout.initrd_offset.map(|o| hypervisor::partition::GUEST_RAM_BASE + o).zip(initrd.map(|r| r.size)),
        });
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
            dtb,
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
    DONE_COUNT.store(reader.update_count(), Ordering::Relaxed);
    DONE_HANDOVER_BYTES.store(size as u64, Ordering::Relaxed);
    DONE_PRESERVED_PAGES.store(preserved_pages, Ordering::Relaxed);
    RESUME_CPUS.store(cpus, Ordering::Relaxed);
    RESUME_FROM.store(hv.freeze_counter.max(1), Ordering::Release);
    let mut machine = machine;
    machine.frames.add_free(PhysRange::new(footprint.base(), footprint.size()));
    guests::install(machine);
    let (now, _) = super::counter();
    PHASE_RESTORED.store(now, Ordering::Relaxed);
    Ok(n)
}
