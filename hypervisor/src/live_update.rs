//! The arch-neutral half of a live update (`shared/DESIGN.md` §5), shared
//! by aarch64 and x86_64: the freeze handshake between the physical CPUs,
//! the update participants (CPU stopper, test fault injector, state saver)
//! driven by `kho::UpdateStateMachine`, staging and validating the new
//! image, writing the handover, and on the restore side adopting the
//! preserved map and reporting the blackout. The arch code supplies what
//! differs behind [`UpdatePlatform`]: how to kick a CPU out of its guest,
//! how a vCPU is put away, the counter, and the arch's own records.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use hvcall::{PartitionState, Status};
use kho::{HandoverIdentity, HandoverReader, HandoverWriter, RamMap, ScratchKind, ScratchPlan, UpdateParticipant};
use kho::{UpdateError, UpdateStateMachine};
use loader::image_desc::{Descriptor, ImageArch};
use loader::manifest::ImageFormat;
use loader::PhysRange;
use sparse_bitmap::MultiOrderBitmap;

use crate::frames::{self, FrameAllocator, PAGE_SIZE};
use crate::sched::VcpuState;
use crate::update::{self, IdentityPages, PartitionRecord, VcpuRecord};
use crate::{hv_event, println, BUILD_ID, VERSION};

/// How long the requesting CPU waits for the others to stop.
pub const STOP_TIMEOUT_MS: u64 = 1000;
/// Room for the handover blob (records are ~1 KiB per vCPU).
pub const HANDOVER_BYTES: u64 = 256 << 10;

const FREEZE_NONE: u8 = 0;
const FREEZE_REQUESTED: u8 = 1;
const FREEZE_KEXEC: u8 = 2;

static FREEZE: AtomicU8 = AtomicU8::new(FREEZE_NONE);
static FROZEN: AtomicUsize = AtomicUsize::new(0);
/// CPUs with nothing left to run, halted for good: they hold no vCPU and
/// are not waited for.
static PARKED: AtomicUsize = AtomicUsize::new(0);
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

/// What a live update needs from the architecture.
pub trait UpdatePlatform {
    /// The free-running counter and its frequency in Hz.
    fn counter(&self) -> (u64, u64);
    /// Makes every CPU but `cpu` leave its guest soon (an IPI, or the next
    /// time-slice end), so that it reaches an exit boundary.
    fn kick_others(&self, cpu: usize, cpus: usize);
    /// Saves and unloads the vCPU loaded on `cpu`, if any.
    fn put_loaded(&self, cpu: usize) -> Result<(), &'static str>;
    /// Takes (and disarms) the `TEST_FAIL_NEXT_FREEZE` hook.
    fn take_fail_next_freeze(&self) -> Result<bool, &'static str>;
    /// Writes the arch's records (hv, partitions, vCPUs, devices, bitmap
    /// roots) while every CPU is frozen.
    fn save_state(&self, w: &mut HandoverWriter, freeze_counter: u64) -> Result<(), &'static str>;
    /// Arch checks of a staged image that passed the descriptor's (for
    /// x86_64: its ELF segments and handover entry); a refusal reason.
    fn check_image(&self, staged: &[u8], desc: &Descriptor) -> Result<(), &'static str>;
    /// Sets the hypercall status the requesting vCPU sees when it next runs.
    fn set_status(&self, status: Status);
    /// Allocates and frees the handover block (outside the preserved map).
    fn alloc_handover(&self, bytes: u64) -> Option<PhysRange>;
    fn free_handover(&self, block: PhysRange);
    /// Waits for, and sends, a wake-up between CPUs (WFE/SEV, PAUSE).
    fn wait(&self);
    fn wake(&self);
    /// One turn of a busy-wait for another CPU (YIELD on aarch64: an
    /// emulator that runs CPUs round-robin then switches to the CPU being
    /// waited for instead of spinning out its time slice).
    fn relax(&self);
}

/// Whether the other CPUs have been asked to stop at an exit boundary.
pub fn freeze_requested() -> bool {
    FREEZE.load(Ordering::Acquire) == FREEZE_REQUESTED
}

/// A CPU stops for good (nothing left to run on it): freezes no longer
/// wait for it.
pub fn note_parked() {
    PARKED.fetch_add(1, Ordering::AcqRel);
}

/// How many CPUs have stopped for good.
pub fn parked() -> usize {
    PARKED.load(Ordering::Acquire)
}

/// Claims the update: false if one is already running.
pub fn begin() -> bool {
    !IN_PROGRESS.swap(true, Ordering::AcqRel)
}

/// Ends a refused or cancelled update.
pub fn end() {
    IN_PROGRESS.store(false, Ordering::Release);
}

/// Tells the frozen CPUs to leave for the kexec.
pub fn release_for_kexec<P: UpdatePlatform>(p: &P) {
    FREEZE.store(FREEZE_KEXEC, Ordering::Release);
    p.wake();
}

/// A non-requesting CPU, at an exit boundary: saves its vCPU, reports
/// frozen, and waits to be thawed (returns) or to go off for the kexec
/// (`off`, which does not return).
pub fn freeze_this_cpu<P: UpdatePlatform>(p: &P, cpu: usize, off: fn() -> !) {
    if let Err(e) = p.put_loaded(cpu) {
        println!("update: cpu {cpu}: {e}");
    }
    FROZEN.fetch_add(1, Ordering::AcqRel);
    loop {
        match FREEZE.load(Ordering::Acquire) {
            FREEZE_REQUESTED => p.wait(),
            FREEZE_KEXEC => off(),
            _ => {
                FROZEN.fetch_sub(1, Ordering::AcqRel);
                return;
            }
        }
    }
}

fn elapsed_ms<P: UpdatePlatform>(p: &P, t0: u64) -> u64 {
    let (now, hz) = p.counter();
    update::blackout_us(t0, now, hz) / 1000
}

/// Stops the other CPUs at exit boundaries (blackout starts here).
struct CpuStopper<'a, P> {
    platform: &'a P,
    cpu: usize,
    cpus: usize,
}

impl<P: UpdatePlatform> UpdateParticipant for CpuStopper<'_, P> {
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
        self.platform.kick_others(self.cpu, self.cpus);
        self.platform.put_loaded(self.cpu)?;
        let (t0, _) = self.platform.counter();
        while FROZEN.load(Ordering::Acquire) + PARKED.load(Ordering::Acquire) + 1 < self.cpus {
            if elapsed_ms(self.platform, t0) > STOP_TIMEOUT_MS {
                return Err("cpus-did-not-stop");
            }
            self.platform.relax();
        }
        Ok(())
    }

    fn unfreeze(&mut self) {
        FREEZE.store(FREEZE_NONE, Ordering::Release);
        self.platform.wake();
    }

    fn restore(&mut self, _: &HandoverReader<'_>) -> Result<(), Self::Error> {
        Ok(())
    }

    fn finish(&mut self) {}
}

/// Test hook: fails the freeze once when armed (`TEST_FAIL_NEXT_FREEZE`).
struct FaultInjector<'a, P> {
    platform: &'a P,
}

impl<P: UpdatePlatform> UpdateParticipant for FaultInjector<'_, P> {
    type Error = &'static str;

    fn name(&self) -> &'static str {
        "fault-injector"
    }

    fn prepare(&mut self, _: &mut HandoverWriter) -> Result<(), Self::Error> {
        Ok(())
    }

    fn freeze(&mut self, _: &mut HandoverWriter) -> Result<(), Self::Error> {
        if self.platform.take_fail_next_freeze()? {
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

/// Records partitions, vCPUs and the preserved map into the handover.
struct StateSaver<'a, P> {
    platform: &'a P,
    freeze_counter: u64,
}

impl<P: UpdatePlatform> UpdateParticipant for StateSaver<'_, P> {
    type Error = &'static str;

    fn name(&self) -> &'static str {
        "partitions"
    }

    fn prepare(&mut self, _: &mut HandoverWriter) -> Result<(), Self::Error> {
        Ok(())
    }

    fn freeze(&mut self, w: &mut HandoverWriter) -> Result<(), Self::Error> {
        self.platform.save_state(w, self.freeze_counter)
    }

    fn unfreeze(&mut self) {}

    fn restore(&mut self, _: &HandoverReader<'_>) -> Result<(), Self::Error> {
        Ok(())
    }

    fn finish(&mut self) {}
}

/// A live-update request, as the arch code saw it.
#[derive(Debug)]
pub struct Request<'a> {
    /// The requesting CPU and how many CPUs run guests.
    pub cpu: usize,
    pub cpus: usize,
    /// The image in the caller's RAM (checked by the hypercall layer).
    pub image_pa: u64,
    pub size: u64,
    pub arch: ImageArch,
    /// Scratch kept free after the staged image (the kexec trampoline).
    pub tail_bytes: u64,
    pub ram: &'a [PhysRange],
    pub scratch: &'a ScratchPlan,
    pub update_count: u64,
}

/// Why an update stopped before the kexec; the guests continue either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    /// The request or the image was refused (`hv: update-refused`).
    Refused(&'static str),
    /// A participant failed after the freeze began (`hv: update-cancelled`).
    Cancelled(&'static str),
}

/// Everything the kexec needs, once the guests are frozen.
#[derive(Clone, Copy, Debug)]
pub struct Ready {
    /// The staged image in scratch and its length.
    pub stage: PhysRange,
    pub image_len: u64,
    /// The handover blob in preserved memory and its length.
    pub handover: PhysRange,
    pub handover_len: u64,
}

/// Stages and checks the image, allocates the handover (brownout), freezes
/// every CPU through the participants, and writes the handover. On refusal
/// (`hv: update-refused`) or cancel (`hv: update-cancelled`) the
/// requester's status is set, the other CPUs are thawed, and the guests
/// continue.
pub fn prepare_and_freeze<P: UpdatePlatform>(p: &P, req: &Request<'_>) -> Result<Ready, Abort> {
    let stage = staging(req.scratch).unwrap_or(PhysRange::new(0, 0));
    // Copy first, then validate the copy: the guest cannot change what was
    // checked. The trampoline takes the tail after the image.
    let limit = stage.size.saturating_sub(req.tail_bytes.next_multiple_of(PAGE_SIZE));
    let refuse = |reason: &'static str| {
        hv_event!("update-refused", reason = reason);
        p.set_status(Status::InvalidParameter);
        Abort::Refused(reason)
    };
    let len = usize::try_from(req.size).map_err(|_| refuse("too-large"))?;
    if req.size > limit {
        return Err(refuse("too-large"));
    }
    // SAFETY: `image_pa..+size` was checked to lie in the caller's RAM (the
    // hypercall layer), the staging area is scratch that nothing else uses,
    // and both are identity-mapped.
    let staged = unsafe {
        core::ptr::copy_nonoverlapping(req.image_pa as *const u8, stage.base as *mut u8, len);
        core::slice::from_raw_parts(stage.base as *const u8, len)
    };
    let desc = match update::check_request(staged, req.arch, limit) {
        Ok(d) => d,
        Err(e) => {
            println!("update: {e}");
            return Err(refuse(e.reason()));
        }
    };
    p.check_image(staged, &desc).map_err(refuse)?;
    let count = req.update_count + 1;
    hv_event!("update-begin", from = VERSION, to = desc.version_str(), image_bytes = req.size, count = count);
    let identity = HandoverIdentity { version: VERSION, build_id: BUILD_ID, update_count: count };
    let ram_map = ram_map(req.ram).ok_or_else(|| refuse("ram-map"))?;
    let mut writer = HandoverWriter::new(&identity, ram_map, req.scratch).map_err(|_| refuse("handover-writer"))?;
    let Some(handover) = p.alloc_handover(HANDOVER_BYTES) else {
        return Err(refuse("no-memory-for-handover"));
    };
    let release = |why: &'static str| {
        p.free_handover(handover);
        hv_event!("update-cancelled", reason = why);
        p.set_status(Status::OperationDenied);
        Abort::Cancelled(why)
    };
    // The requester sees SUCCESS when it runs again, in the new image.
    p.set_status(Status::Success);
    let (freeze_counter, _) = p.counter();
    let mut sm: UpdateStateMachine<'_, &'static str> = UpdateStateMachine::new();
    let registered = sm
        .register(Box::new(CpuStopper { platform: p, cpu: req.cpu, cpus: req.cpus }))
        .and_then(|()| sm.register(Box::new(FaultInjector { platform: p })))
        .and_then(|()| sm.register(Box::new(StateSaver { platform: p, freeze_counter })));
    let result = registered.and_then(|()| sm.prepare(&mut writer)).and_then(|()| sm.freeze(&mut writer));
    if let Err(e) = result {
        let _ = sm.cancel();
        return Err(release(failure_reason(&e)));
    }
    // SAFETY: a block just allocated for the handover; identity-mapped.
    let blob_out = unsafe { core::slice::from_raw_parts_mut(handover.base as *mut u8, handover.size as usize) };
    match writer.write_to(blob_out, handover.base) {
        Ok(n) => Ok(Ready { stage, image_len: req.size, handover, handover_len: n as u64 }),
        Err(e) => {
            println!("update: handover: {e}");
            let _ = sm.cancel();
            Err(release("handover-write"))
        }
    }
}

/// Thaws the other CPUs after a freeze that succeeded but cannot be
/// followed by a kexec: the update is cancelled with `reason`.
pub fn cancel_after_freeze<P: UpdatePlatform>(p: &P, ready: &Ready, reason: &str) {
    FREEZE.store(FREEZE_NONE, Ordering::Release);
    p.wake();
    p.free_handover(ready.handover);
    hv_event!("update-cancelled", reason = reason);
    p.set_status(Status::OperationDenied);
}

/// The participant's error behind a failed prepare or freeze.
pub fn failure_reason(e: &UpdateError<&'static str>) -> &'static str {
    match e {
        UpdateError::FreezeFailed { error, .. } | UpdateError::PrepareFailed { error, .. } => error,
        _ => "state-machine",
    }
}

/// The global scratch region: where the next image is staged.
pub fn staging(scratch: &ScratchPlan) -> Option<PhysRange> {
    scratch
        .regions()
        .iter()
        .find(|r| r.kind == ScratchKind::Global)
        .map(|r| PhysRange::new(r.range.base(), r.range.size()))
}

fn to_kho(r: &PhysRange) -> Option<kho::PhysRange> {
    kho::PhysRange::new(r.base, r.size).ok()
}

/// The RAM map in `kho`'s terms.
pub fn ram_map(ram: &[PhysRange]) -> Option<RamMap> {
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

/// Handover codes of the guest image formats.
/// Writes one partition's record at `partitions/<id>`.
pub fn add_partition(w: &mut HandoverWriter, rec: &PartitionRecord) -> Result<(), &'static str> {
    w.subsystem(&alloc::format!("partitions/{}", rec.id))
        .and_then(|mut s| s.add_record(rec))
        .map_err(|_| "partition-record")
}

/// Writes vCPU `n`'s record at `vcpus/<n>`.
pub fn add_vcpu(w: &mut HandoverWriter, n: usize, rec: &VcpuRecord) -> Result<(), &'static str> {
    w.subsystem(&alloc::format!("vcpus/{n}")).and_then(|mut s| s.add_record(rec)).map_err(|_| "vcpu-record")
}

/// Records the preserved map's non-empty roots (in `PageSize::ALL` order).
pub fn add_bitmap_roots(w: &mut HandoverWriter, roots: [u64; 3]) -> Result<(), &'static str> {
    for (size, root) in sparse_bitmap::PageSize::ALL.iter().zip(roots) {
        if root != 0 {
            w.add_bitmap_root(kho::BitmapRoot { order: size.order(), root }).map_err(|_| "bitmap-root")?;
        }
    }
    Ok(())
}

pub fn format_code(f: ImageFormat) -> u32 {
    match f {
        ImageFormat::Flat => 0,
        ImageFormat::Arm64Image => 1,
        ImageFormat::Elf => 2,
    }
}

pub fn format_of(code: u32) -> Option<ImageFormat> {
    match code {
        0 => Some(ImageFormat::Flat),
        1 => Some(ImageFormat::Arm64Image),
        2 => Some(ImageFormat::Elf),
        _ => None,
    }
}

/// Handover codes of the vCPU scheduling states.
pub fn state_code(s: VcpuState) -> u32 {
    match s {
        VcpuState::Off => 0,
        VcpuState::Runnable => 1,
        VcpuState::Waiting => 2,
        VcpuState::Stopped => 3,
    }
}

pub fn state_of(code: u32) -> Option<VcpuState> {
    match code {
        0 => Some(VcpuState::Off),
        1 => Some(VcpuState::Runnable),
        2 => Some(VcpuState::Waiting),
        3 => Some(VcpuState::Stopped),
        _ => None,
    }
}

/// A partition state from its handover code (`PartitionState as u32`).
pub fn partition_state_of(code: u32) -> Option<PartitionState> {
    match code {
        0 => Some(PartitionState::Running),
        1 => Some(PartitionState::Stopped),
        2 => Some(PartitionState::Faulted),
        _ => None,
    }
}

/// What the restore side adopted from the preserved map.
pub struct Adopted {
    pub bitmap: MultiOrderBitmap<IdentityPages>,
    /// The allocator: free RAM, with no preserved page in it.
    pub frames: FrameAllocator,
    pub preserved_pages: u64,
}

impl core::fmt::Debug for Adopted {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Adopted").field("preserved_pages", &self.preserved_pages).finish_non_exhaustive()
    }
}

/// Adopts the preserved map from the handover, allocating only from
/// scratch until it is read, and builds the allocator around everything
/// preserved, checking that no preserved page is in it (reported in
/// `hv: update-restore`). `reserved` is what the platform and the running
/// image occupy.
pub fn adopt_preserved(
    reader: &HandoverReader<'_>,
    ram: &[PhysRange],
    mut reserved: Vec<PhysRange>,
) -> Result<Adopted, &'static str> {
    let scratch = reader.scratch();
    let staging = staging(scratch).ok_or("no-global-scratch")?;
    let mut scratch_frames = FrameAllocator::new(&[staging]);
    let mut roots = [0u64; 3];
    for r in reader.bitmap_roots() {
        let slot = sparse_bitmap::PageSize::ALL.iter().position(|s| s.order() == r.order).ok_or("bitmap-order")?;
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
    reserved.extend(scratch.regions().iter().map(|r| PhysRange::new(r.range.base(), r.range.size())));
    reserved.extend(reader.preserved_ranges().map(|r| PhysRange::new(r.base(), r.size())));
    reserved.extend(bitmap.runs().map(|r| PhysRange::new(r.start, r.end - r.start)));
    reserved.extend(bitmap.node_pages().map(|pa| PhysRange::new(pa, PAGE_SIZE)));
    let free = frames::subtract(ram, &reserved);
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
    let preserved_pages = bitmap.frame_count();
    Ok(Adopted { bitmap, frames: FrameAllocator::new(&free), preserved_pages })
}

/// Records when the new image was entered (and when the old one jumped).
pub fn note_entry(kexec_counter: u64, now: u64) {
    PHASE_KEXEC.store(kexec_counter, Ordering::Relaxed);
    PHASE_ENTRY.store(now, Ordering::Relaxed);
}

/// Arms the blackout report once the machine is restored: `cpus` CPUs
/// must re-enter guests before `hv: update-done` is printed.
pub fn note_restored(
    reader: &HandoverReader<'_>,
    blob_bytes: u64,
    preserved_pages: u64,
    freeze_counter: u64,
    now: u64,
) {
    DONE_COUNT.store(reader.update_count(), Ordering::Relaxed);
    DONE_HANDOVER_BYTES.store(blob_bytes, Ordering::Relaxed);
    DONE_PRESERVED_PAGES.store(preserved_pages, Ordering::Relaxed);
    RESUMED.store(0, Ordering::Relaxed);
    RESUME_FROM.store(freeze_counter.max(1), Ordering::Release);
    PHASE_RESTORED.store(now, Ordering::Relaxed);
}

/// How many CPUs must resume guests before the blackout ends.
pub fn set_resume_cpus(cpus: usize) {
    RESUME_CPUS.store(cpus, Ordering::Relaxed);
}

/// Called by each CPU as it first enters a guest: the last one to do so
/// after an update ends the blackout and reports it (`hv: update-done`,
/// `hv: update-phases`).
pub fn note_resumed(now: u64, hz: u64) {
    let t0 = RESUME_FROM.load(Ordering::Acquire);
    if t0 == 0 {
        return;
    }
    let n = RESUMED.fetch_add(1, Ordering::AcqRel) + 1;
    if n == RESUME_CPUS.load(Ordering::Acquire) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::Cell;

    #[test]
    fn codes_round_trip() {
        for f in [ImageFormat::Flat, ImageFormat::Arm64Image, ImageFormat::Elf] {
            assert_eq!(format_of(format_code(f)), Some(f));
        }
        for s in [VcpuState::Off, VcpuState::Runnable, VcpuState::Waiting, VcpuState::Stopped] {
            assert_eq!(state_of(state_code(s)), Some(s));
        }
        for s in [PartitionState::Running, PartitionState::Stopped, PartitionState::Faulted] {
            assert_eq!(partition_state_of(s as u32), Some(s));
        }
        assert_eq!(format_of(3), None);
        assert_eq!(state_of(4), None);
        assert_eq!(partition_state_of(3), None);
    }

    #[test]
    fn scratch_plan_has_a_global_staging_region_outside_occupied_memory() {
        let ram = [PhysRange::new(0x4000_0000, 512 << 20)];
        let occupied = [PhysRange::new(0x4000_0000, 16 << 20)];
        let plan = plan_scratch(&ram, &occupied, 4 << 20).expect("plan");
        let stage = staging(&plan).expect("global scratch");
        assert!(stage.size >= 4 << 20);
        assert!(!stage.overlaps(&occupied[0]));
        assert!(ram[0].contains(&stage));
        assert!(plan_scratch(&ram, &occupied, 1 << 40).is_none());
    }

    /// A one-CPU platform for the participants.
    #[derive(Default)]
    struct Fake {
        fail: Cell<bool>,
        puts: Cell<u32>,
        saved: Cell<u32>,
        woken: Cell<u32>,
    }

    impl UpdatePlatform for Fake {
        fn counter(&self) -> (u64, u64) {
            (1, 1_000_000)
        }
        fn kick_others(&self, _: usize, _: usize) {}
        fn put_loaded(&self, _: usize) -> Result<(), &'static str> {
            self.puts.set(self.puts.get() + 1);
            Ok(())
        }
        fn take_fail_next_freeze(&self) -> Result<bool, &'static str> {
            Ok(self.fail.replace(false))
        }
        fn save_state(&self, _: &mut HandoverWriter, _: u64) -> Result<(), &'static str> {
            self.saved.set(self.saved.get() + 1);
            Ok(())
        }
        fn check_image(&self, _: &[u8], _: &Descriptor) -> Result<(), &'static str> {
            Ok(())
        }
        fn set_status(&self, _: Status) {}
        fn alloc_handover(&self, _: u64) -> Option<PhysRange> {
            None
        }
        fn free_handover(&self, _: PhysRange) {}
        fn wait(&self) {}
        fn relax(&self) {}
        fn wake(&self) {
            self.woken.set(self.woken.get() + 1);
        }
    }

    fn freeze_with(fake: &Fake) -> Result<(), &'static str> {
        let ram = [PhysRange::new(0x4000_0000, 512 << 20)];
        let plan = plan_scratch(&ram, &[], 4 << 20).expect("plan");
        let identity = HandoverIdentity { version: "t", build_id: "t", update_count: 1 };
        let mut w = HandoverWriter::new(&identity, ram_map(&ram).expect("ram"), &plan).expect("writer");
        let mut sm: UpdateStateMachine<'_, &'static str> = UpdateStateMachine::new();
        sm.register(Box::new(CpuStopper { platform: fake, cpu: 0, cpus: 1 })).expect("register");
        sm.register(Box::new(FaultInjector { platform: fake })).expect("register");
        sm.register(Box::new(StateSaver { platform: fake, freeze_counter: 1 })).expect("register");
        let r = sm.prepare(&mut w).and_then(|()| sm.freeze(&mut w));
        r.map_err(|e| {
            let _ = sm.cancel();
            failure_reason(&e)
        })
    }

    #[test]
    fn participants_freeze_save_and_cancel_on_an_injected_failure() {
        let fake = Fake::default();
        assert_eq!(freeze_with(&fake), Ok(()));
        assert_eq!((fake.puts.get(), fake.saved.get()), (1, 1));
        assert!(freeze_requested());

        let fake = Fake::default();
        fake.fail.set(true);
        assert_eq!(freeze_with(&fake), Err("injected-freeze-failure"));
        assert_eq!(fake.saved.get(), 0, "the state saver never ran");
        assert!(fake.woken.get() >= 1, "the stopped CPUs were thawed");
        assert!(!freeze_requested());
        assert_eq!(freeze_with(&fake), Ok(()), "the hook fires once");
    }

    #[test]
    fn one_update_at_a_time() {
        assert!(begin());
        assert!(!begin());
        end();
        assert!(begin());
        end();
    }
}
