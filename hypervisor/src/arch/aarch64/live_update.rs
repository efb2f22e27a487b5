//! Live update on aarch64, the arch side of `hypervisor::live_update`
//! (`shared/DESIGN.md` §5): SGIs and WFE/SEV between CPUs; the new image
//! staged in the other image slot before the freeze (`hypervisor::slots`)
//! and entered there directly, with the frozen CPUs parked in this
//! image's code until the new image releases them (no PSCI CPU_OFF /
//! CPU_ON); for an image linked for the running slot, the old path (PSCI
//! CPU_OFF, and a trampoline in scratch that copies the image over this
//! one). On the restore side: the SMMU adopted in place, the parked CPUs
//! released, the machine installed.

use alloc::vec::Vec;
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hvcall::Status;
use hypervisor::frames::PAGE_SIZE;
use hypervisor::live_update::handshake::{Generation, Handshake};
use hypervisor::live_update::incoming::{self, AdoptSpec};
use hypervisor::live_update::rollback::{self, break_mode, Break, Reason, GIVE_BACK};
use hypervisor::live_update::{self, Cancel, HandoffPlan, Ready, Request, UpdatePlatform, HANDSHAKE, REPORT};
use hypervisor::machine::{Machine, MachineLock, RestoreError};
use hypervisor::preserved::IdentityPages;
use hypervisor::records::{HandoffRecord, IommuRecord};
use hypervisor::slots::{self, Placement};
use hypervisor::{hv_event, println};
use kho::HandoverReader;
use loader::dtb::DtbPlatform;
use loader::image_desc::{Descriptor, ImageArch};
use loader::{BootInfo, PhysRange};

use super::devices::PciHost;
use super::platform::{self, adopt_smmu, phys_bytes, Aarch64, CPU_MPIDR, MACHINE};
use super::psci;

global_asm!(include_str!("kexec.S"));

extern "C" {
    static kexec_trampoline_start: u8;
    static kexec_trampoline_end: u8;
    fn kexec_jump(dtb: u64, handover: u64, src: u64, dst: u64, len: u64, entry: u64, trampoline: u64, at: u64) -> !;
    fn kexec_enter(dtb: u64, handover: u64, at: u64, entry: u64, rollback: u64) -> !;
    fn park_in_mailbox(word: u64, index: u64) -> !;
    /// `entry.S`: where a failed new image gives the machine back, and
    /// where the CPUs parked for it rejoin this image. Addresses only.
    fn rollback_entry();
    fn rejoin_entry();
}

/// The stack top of the CPU that left for a new image, for
/// `rollback_entry` (which reads it with the MMU off: cleaned to memory
/// before the jump).
#[export_name = "hv_rollback_sp"]
static ROLLBACK_SP: AtomicU64 = AtomicU64::new(0);

/// What this image needs to take the machine back if the new image fails
/// before the guests resume (`kho/ABI.md` §5.2): set at the jump, taken
/// by [`hv_rollback`].
#[derive(Debug)]
struct Away {
    generation: Generation,
    /// The CPU that jumped, its stack slot, and the vCPU that asked.
    cpu: usize,
    slot: usize,
    requester: usize,
    handover: PhysRange,
    /// The CPUs parked in [`MAILBOX`] (bit n: CPU n).
    parked: u64,
    /// The counter at the jump.
    left_at: u64,
}

static AWAY: spin::Mutex<Option<Away>> = spin::Mutex::new(None);

/// How long a new image has to commit (adopt the machine) before its
/// boot CPU is interrupted and gives the machine back: a restore takes
/// milliseconds (-icount) to a few hundred (TCG on a busy host).
pub const GIVE_BACK_DEADLINE_MS: u64 = 5000;

/// Where the frozen CPUs wait for the new image (`HandoffRecord::mailbox`):
/// one word per CPU index, 0 until the new image writes its secondary
/// entry there. A cache line of its own.
#[repr(C, align(64))]
struct Mailbox([AtomicU64; super::MAX_CPUS]);

static MAILBOX: Mailbox = Mailbox([const { AtomicU64::new(0) }; super::MAX_CPUS]);
/// Set by the requesting CPU before it releases the frozen ones: park in
/// [`MAILBOX`] rather than leave through PSCI CPU_OFF.
static PARK: AtomicBool = AtomicBool::new(false);
/// How much of the new image `place` copies (or clears) between yields.
const STAGE_CHUNK: usize = 64 << 10;
/// The arm64 Image header's text_offset (byte 8): where in RAM, from
/// slot 0's base, the image is linked (`linker.ld`).
const TEXT_OFFSET_OFFSET: usize = 8;

/// PSCI CPU_OFF and AFFINITY_INFO (DEN0022E §5.1); AFFINITY_INFO returns 1
/// for OFF.
const PSCI_CPU_OFF: u64 = 0x8400_0002;
const PSCI_AFFINITY_INFO_64: u64 = 0xc400_0004;
const PSCI_AFFINITY_OFF: i64 = 1;
/// The arm64 Image header's effective image size, bss and stacks included
/// (Linux `Documentation/arch/arm64/booting.rst`), at byte 16.
const IMAGE_SIZE_OFFSET: usize = 16;

/// Memory from the image's load address reserved for hypervisor images
/// since first boot: the kexec loads the next image there, so an image
/// whose footprint (file, bss, stacks) is larger is refused before the
/// freeze, and nothing preserved is ever allocated in the slot.
pub const IMAGE_SLOT: u64 = 16 << 20;

/// Records that the boot CPU finished a restore step (`hv: update-steps`).
pub fn mark(step: &'static str) {
    REPORT.mark(step, super::counter().0);
}

/// Records when the new image was entered (and when the old one jumped).
pub fn note_entry(kexec_counter: u64) {
    let (now, _) = super::counter();
    REPORT.note_entry(kexec_counter, now);
}

/// Platform DTB address, handed to the next image in x0.
static DTB_PHYS: AtomicU64 = AtomicU64::new(0);

pub fn set_dtb(pa: u64) {
    DTB_PHYS.store(pa, Ordering::Relaxed);
}

impl Arm {
    /// Copies the image file into its slot and clears the rest of its
    /// footprint (bss, stacks), with the caches cleaned for an entry with
    /// the MMU off. In chunks, with a YIELD between them: the guests on the
    /// other CPUs run meanwhile, and an emulator that runs CPUs round-robin
    /// (QEMU -icount) lets them. `check_image` made sure the file is no
    /// longer than the footprint, which fits the slot.
    fn copy_to_slot(&self, staged: &[u8], range: PhysRange, footprint: u64) {
        let footprint = footprint as usize;
        for at in (0..footprint).step_by(STAGE_CHUNK) {
            let end = (at + STAGE_CHUNK).min(footprint);
            let dst = range.base as usize + at;
            let from_file = staged.get(at..end.min(staged.len())).unwrap_or(&[]);
            // The other slot is reserved for images since boot: nothing
            // lives or runs there; it is identity-mapped.
            // SAFETY: as above; `end` is within the footprint and slot.
            unsafe {
                core::ptr::copy_nonoverlapping(from_file.as_ptr(), dst as *mut u8, from_file.len());
                core::ptr::write_bytes((dst + from_file.len()) as *mut u8, 0, end - at - from_file.len());
            }
            // The new image starts with the MMU and caches off: its bytes
            // must be in memory, and no stale instruction of whatever ran
            // there before may be fetched (Arm ARM D7.5.9, D7.5.10).
            clean(dst as u64, (range.base as usize + end) as u64);
            self.relax();
        }
        // SAFETY: invalidates instruction caches; no other effect.
        unsafe { asm!("ic ialluis", "dsb ish", "isb", options(nostack)) };
    }
}

/// The aarch64 side of [`UpdatePlatform`]: the requesting vCPU `v`, GIC
/// SGIs to kick the other CPUs, WFE/SEV between them.
struct Arm {
    v: usize,
}

/// The arm64 Image's declared footprint.
fn image_footprint(staged: &[u8]) -> Option<u64> {
    let bytes = staged.get(IMAGE_SIZE_OFFSET..IMAGE_SIZE_OFFSET + 8)?;
    let mut b = [0u8; 8];
    b.copy_from_slice(bytes);
    Some(u64::from_le_bytes(b))
}

impl UpdatePlatform for Arm {
    type Arch = Aarch64;

    fn machine(&self) -> &MachineLock<Aarch64> {
        &MACHINE
    }

    fn handshake(&self) -> &Handshake {
        &HANDSHAKE
    }

    fn counter(&self) -> (u64, u64) {
        super::counter()
    }

    fn kick_others(&self, m: &Machine<Aarch64>, cpu: usize) {
        for &c in m.online.iter().filter(|&&c| c != cpu) {
            platform::kick(c);
        }
    }

    /// Puts the loaded vCPU away and applies every pending start (PSCI
    /// CPU_ON, SYSTEM_RESET) of the vCPUs pinned here to their contexts
    /// (`Machine::freeze_cpu_with_starts`).
    fn freeze_cpu(&self, m: &mut Machine<Aarch64>, cpu: usize) -> Result<(), &'static str> {
        m.freeze_cpu_with_starts(cpu, super::vcpu::Vcpu::reset);
        Ok(())
    }

    fn check_image(
        &self,
        staged: &[u8],
        _: &Descriptor,
        _: Option<&loader::image_readers::Readers>,
    ) -> Result<(), &'static str> {
        let footprint = image_footprint(staged).ok_or("truncated")?;
        if footprint < staged.len() as u64 || footprint > IMAGE_SLOT {
            println!("update: the image needs {footprint:#x} bytes; its slot has {IMAGE_SLOT:#x}");
            return Err("image-larger-than-slot");
        }
        Ok(())
    }

    fn place(&self, staged: &[u8], desc: &Descriptor) -> Result<Placement, &'static str> {
        let footprint = image_footprint(staged).ok_or("truncated")?;
        let offset = staged.get(TEXT_OFFSET_OFFSET..TEXT_OFFSET_OFFSET + 8).ok_or("truncated")?;
        let mut b = [0u8; 8];
        b.copy_from_slice(offset);
        let base = slots::AARCH64.bases[0].checked_add(u64::from_le_bytes(b)).ok_or("image-not-linked-for-a-slot")?;
        let running = super::image_range().base;
        let placement = slots::AARCH64.place(running, base, footprint).map_err(|e| {
            println!("update: {e:?}");
            e.reason()
        })?;
        if let Placement::Alternate { range, .. } = placement {
            self.copy_to_slot(staged, range, footprint);
            if !prepare_placed(staged, desc, range, footprint) {
                // Nothing of a failed preparation is kept: the image is
                // placed afresh and entered unprepared.
                self.copy_to_slot(staged, range, footprint);
            }
        }
        Ok(placement)
    }

    fn handoff(&self) -> HandoffPlan {
        let code = super::code_range();
        HandoffPlan { mailbox: MAILBOX.0.as_ptr() as u64, code, enters: None }
    }

    fn set_status(&self, m: &mut Machine<Aarch64>, status: Status) {
        // SAFETY: the requesting vCPU exited on this CPU, its owner; its
        // registers are only touched here until it runs again.
        unsafe { m.ctx_mut(self.v) }.regs.x[0] = status as u64;
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

fn cpu_off(generation: Generation) -> ! {
    let cpu = platform::cpu_index();
    if PARK.load(Ordering::Acquire) {
        let word = MAILBOX.0[cpu].as_ptr() as u64;
        HANDSHAKE.left(cpu, generation);
        // SAFETY: the word is this CPU's in the mailbox the handoff record
        // names; the code it waits in is this image's, which stays intact
        // until the new image has resumed the guests.
        unsafe { park_in_mailbox(word, cpu as u64) }
    }
    HANDSHAKE.left(cpu, generation);
    let _ = psci::call(PSCI_CPU_OFF, 0, 0, 0);
    super::park()
}

fn elapsed_ms(t0: u64) -> u64 {
    let (now, freq) = super::counter();
    live_update::blackout_us(t0, now, freq) / 1000
}

/// Runs a live update requested by the vCPU loaded on `cpu`. Returns only
/// if the update was refused or cancelled (the guest then gets the status).
pub fn run(cpu: usize, image_pa: u64, size: u64) {
    let Some(Some(v)) = MACHINE.with(|m| m.loaded[cpu]) else { return };
    let arm = Arm { v };
    let req = Request { cpu, image_pa, size, arch: ImageArch::Aarch64, tail_bytes: PAGE_SIZE };
    if let Ok(ready) = live_update::prepare_and_freeze(&arm, &req) {
        kexec(&arm, cpu, &ready);
    }
}

/// Sends the other CPUs off and jumps to the new image through the
/// trampoline. Never returns, unless a frozen CPU fails to leave, in which
/// case the update is cancelled.
fn kexec(arm: &Arm, cpu: usize, ready: &Ready) {
    let Some(online) = MACHINE.with(|m| m.online.clone()) else { return };
    if ready.park {
        for word in &MAILBOX.0 {
            word.store(0, Ordering::Relaxed);
        }
        let base = MAILBOX.0.as_ptr() as u64;
        clean(base, base + core::mem::size_of::<Mailbox>() as u64);
    }
    PARK.store(ready.park, Ordering::Release);
    HANDSHAKE.release_for_kexec(ready.generation);
    arm.wake();
    let (t0, _) = super::counter();
    let expired = || elapsed_ms(t0) > live_update::STOP_TIMEOUT_MS;
    if let Err(t) = HANDSHAKE.wait_left(ready.generation, cpu, &online, expired, || arm.relax()) {
        // Every CPU acknowledged the freeze, so none runs guest code; one
        // that never leaves it is still in this image's code, which the
        // kexec would overwrite.
        hv_event!("kexec-cpu-stuck", cpu = t.cpu);
        live_update::cancel_after_freeze(arm, ready, &Cancel::Kexec("cpu-did-not-leave"));
        return;
    }
    for &c in online.iter().filter(|&&c| c != cpu && !ready.park) {
        let target = CPU_MPIDR[c].load(Ordering::Relaxed);
        let (t0, _) = super::counter();
        while psci::call(PSCI_AFFINITY_INFO_64, target, 0, 0) != Some(PSCI_AFFINITY_OFF) {
            if elapsed_ms(t0) > live_update::STOP_TIMEOUT_MS {
                // It left the freeze and called CPU_OFF; the firmware is
                // still turning it off. Nothing of the guests runs there.
                hv_event!("kexec-cpu-off-slow", cpu = c);
                break;
            }
            arm.relax();
        }
    }
    let parked = if ready.park { online.iter().filter(|&&c| c != cpu).fold(0u64, |m, &c| m | (1 << c)) } else { 0 };
    jump(arm, cpu, ready, parked)
}

fn jump(arm: &Arm, cpu: usize, ready: &Ready, parked: u64) -> ! {
    let (stage, image_len, buf, len) = (ready.stage, ready.image_len, ready.handover, ready.handover_len);
    if let Placement::Alternate { range, .. } = ready.placement {
        // The rollback watchdog: this CPU's hypervisor timer fires as FIQ
        // at the deadline, which the new image takes unless it committed
        // by then (it keeps FIQs unmasked until it does).
        super::gic::timer_as_fiq(super::mpidr(), true);
        let (now, freq) = super::counter();
        let deadline = now + freq / 1000 * GIVE_BACK_DEADLINE_MS;
        // SAFETY: programs this CPU's hypervisor timer, which only the
        // hypervisor uses, for the deadline.
        unsafe {
            asm!("msr cnthp_cval_el2, {0}", "msr cnthp_ctl_el2, {1}", "isb", in(reg) deadline, in(reg) 1u64,
                 options(nomem, nostack));
        }
        // The new image reads the handover with its MMU off.
        clean_invalidate(buf.base, buf.base + len);
        if let Some(t) = ready.table {
            clean_invalidate(t.base, t.base + t.size);
        }
        let dtb = DTB_PHYS.load(Ordering::Relaxed);
        // This image stays intact in its slot: the new one may give the
        // machine back to it until the guests resume.
        let (top, slot) = super::cpu::stack_of(cpu);
        let (left_at, _) = super::counter();
        *AWAY.lock() = Some(Away {
            generation: ready.generation,
            cpu,
            slot,
            requester: arm.v,
            handover: ready.handover,
            parked,
            left_at,
        });
        ROLLBACK_SP.store(top, Ordering::Release);
        let sp = ROLLBACK_SP.as_ptr() as u64;
        clean(sp, sp + 8);
        let back = rollback_entry as *const () as u64;
        let (now, _) = super::counter();
        // SAFETY: the new image is complete in its slot since before the
        // freeze (`place`); this image stays where it is.
        unsafe { kexec_enter(dtb, buf.base, now, range.base, back) }
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
    // The trampoline enters the new image at its link address with x0 =
    // DTB, x1 = handover.
    // SAFETY: it copies the checked image (its footprint fits the image
    // slot) over this one; nothing of the old image is used after the jump.
    unsafe { kexec_jump(dtb, buf.base, stage.base, image_start, copy_len, image_start, tramp, now) }
}

/// Lets the image just placed in `slot` prepare itself while the guests
/// run (`prepare.rs`), if its descriptor names a brownout entry inside its
/// file (images from before the brownout entry have 0 there and are
/// entered unprepared): `hv: update-prepared status=...`. Returns false if
/// the preparation failed (the slot is then to be placed again).
fn prepare_placed(staged: &[u8], desc: &Descriptor, slot: PhysRange, footprint: u64) -> bool {
    let entry = u64::from(desc.handover_entry);
    let file = PhysRange::new(slot.base, staged.len() as u64);
    if entry == 0 || !entry.is_multiple_of(4) || !file.contains(&PhysRange::new(entry, 4)) {
        return true;
    }
    let (t0, hz) = super::counter();
    let status = super::prepare::call(entry, slot, footprint, DTB_PHYS.load(Ordering::Relaxed));
    let (t1, _) = super::counter();
    hv_event!(
        "update-prepared",
        status = super::prepare::Status::token(status),
        us = (t1 - t0).saturating_mul(1_000_000) / hz.max(1),
    );
    status == super::prepare::Status::Prepared as u64
}

/// Cleans `[base, end)` to the point of coherency (Arm ARM D7.5.9).
fn clean(base: u64, end: u64) {
    let mut a = base & !63;
    while a < end {
        // SAFETY: cache maintenance by VA on identity-mapped memory.
        unsafe { asm!("dc cvac, {0}", in(reg) a, options(nostack)) };
        a += 64;
    }
    // SAFETY: completes the maintenance.
    unsafe { asm!("dsb sy", options(nostack)) };
}

/// Cleans and invalidates `[base, end)` to the point of coherency.
pub(super) fn clean_invalidate(base: u64, end: u64) {
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
pub fn note_resumed(cpu: usize) {
    let (now, hz) = super::counter();
    incoming::cpu_resumed(cpu, now, hz);
}

pub use hypervisor::live_update::incoming::Parked;

/// Lets a CPU the previous image parked go: writes `entry` into its
/// mailbox word (which `Parked` checked lies in the old image's slot),
/// pushes it to memory (the CPU waits with its caches off) and wakes it.
pub fn release_parked(word: u64, entry: u64) {
    // SAFETY: `word` is 8-aligned in the old image's slot (`Parked`),
    // identity-mapped RAM this image does not use.
    unsafe { core::ptr::write_volatile(word as *mut u64, entry) };
    clean(word, word + 8);
    // SAFETY: wakes CPUs waiting in WFE; no other effect.
    unsafe { asm!("sev", options(nomem, nostack)) };
}

/// The slot this image does not run from: the previous image's.
fn other_slot() -> PhysRange {
    let running = super::image_range().base;
    let s = slots::AARCH64;
    s.range(usize::from(s.slot_of(running) != Some(1)))
}

/// The restore side: validates the handover at `handover_pa`, brings the
/// other CPUs up (`start_cpus`: the parked ones released, if the previous
/// image parked them; it returns the CPUs online), adopts the preserved
/// map, the SMMU, the stage-2 tables and every vCPU, and installs the
/// machine. Returns how many partitions were adopted. With a way back to
/// the old image (`kho/ABI.md` §5.2) the parked CPUs are released only
/// after the machine is adopted, and this image commits just before.
pub fn restore(
    handover_pa: u64,
    info: &BootInfo,
    platform: &DtbPlatform,
    mut start_cpus: impl FnMut(Option<&Parked>) -> Vec<usize>,
    reserved: Vec<PhysRange>,
) -> Result<usize, RestoreFailure> {
    let ram = &info.ram;
    let h = RestoreFailure::Handover;
    if break_mode() == Some(Break::RefuseHandover) {
        return Err(h("test-build-refuses-the-handover-version"));
    }
    let head = phys_bytes(PhysRange::new(handover_pa, 8), ram).ok_or(h("handover-outside-ram"))?;
    let size = HandoverReader::blob_size(head).map_err(|_| h("handover-header"))?;
    let blob = phys_bytes(PhysRange::new(handover_pa, size as u64), ram).ok_or(h("handover-outside-ram"))?;
    let ram_map = live_update::ram_map(ram).ok_or(h("ram-map"))?;
    let reader = HandoverReader::new(blob, handover_pa, &ram_map).map_err(|e| {
        println!("handover: {e}");
        h("handover-invalid")
    })?;
    mark("handover");
    let handoff = reader.subsystem("handoff").and_then(|n| n.record::<HandoffRecord>().ok().flatten());
    let old_slot = other_slot();
    let parked = handoff.as_ref().and_then(|r| Parked::from_record(r, old_slot, super::MAX_CPUS));
    // With a way back to the old image, the parked CPUs stay in its code
    // until the machine is adopted (once they run this image's code there
    // is no way back); the CPUs they will be are known from the record.
    let late = GIVE_BACK.armed() && parked.is_some();
    let online = if let (Some(p), true) = (&parked, late) {
        let me = platform::cpu_index();
        (0..super::MAX_CPUS).filter(|&c| c == me || p.word(c).is_some()).collect()
    } else {
        let online = start_cpus(parked.as_ref());
        mark("cpus");
        online
    };
    let staged = handoff.as_ref().is_some_and(|r| r.staged == 1);
    REPORT.note_handoff(staged, parked.map_or(0, |p| p.count()), psci::calls());
    if let Some(old) = handoff.as_ref().and_then(|r| incoming::old_image_of(r, old_slot)) {
        // SAFETY: `old_image_of` checked the range lies in the other slot,
        // identity-mapped RAM this image does not use.
        unsafe { incoming::expect_old_image(old) };
    }
    if break_mode() == Some(Break::Slow) {
        rollback::spin_ms(rollback::SLOW_MS, super::counter, || {});
    }
    let smmu = match reader.subsystem("iommu") {
        None => None,
        Some(node) => {
            let rec = node.record::<IommuRecord>().ok().flatten().ok_or(h("iommu-record"))?;
            let regs = platform.smmu.ok_or(h("handover-has-smmu-platform-has-none"))?;
            Some(adopt_smmu(&rec, regs, ram).map_err(RestoreFailure::Smmu)?)
        }
    };
    let pci = platform.pcie.as_ref().and_then(PciHost::from_dtb);
    mark("smmu");
    assert!(break_mode() != Some(Break::Panic), "test build (HV_TEST_BREAK_RESTORE): panics in the restore");
    if break_mode() == Some(Break::Fault) {
        // SAFETY: none: a test build's deliberate EL2 data abort (nothing
        // is mapped there).
        let _ = unsafe { core::ptr::read_volatile(0xdead_0000_0000 as *const u64) };
    }
    let spec = AdoptSpec { ram, reserved, online: &online, counter: || super::counter().0 };
    // SAFETY: RAM is identity-mapped, and only this CPU is up.
    let adopted =
        unsafe { incoming::adopt(&reader, &MACHINE, Aarch64 { smmu, pci }, IdentityPages, spec) }.map_err(|e| {
            println!("restore: {e:?}");
            RestoreFailure::Adopt(e)
        })?;
    if break_mode() == Some(Break::Fail) {
        return Err(RestoreFailure::Test("fails after adopting the machine"));
    }
    if break_mode() == Some(Break::Hang) {
        loop {
            core::hint::spin_loop();
        }
    }
    if late {
        // The machine is this image's from here on. FIQs masked and the
        // watchdog off first: a deadline that fires before this still
        // gives the machine back; none can arrive after the commit.
        // SAFETY: masks FIQs and stops this CPU's hypervisor timer (the
        // old image's deadline); `run_cpu` sets the timer again.
        unsafe { asm!("msr daifset, #1", "msr cnthp_ctl_el2, xzr", "isb", options(nomem, nostack)) };
        super::gic::timer_as_fiq(super::mpidr(), false);
        GIVE_BACK.commit();
        let came = start_cpus(parked.as_ref());
        mark("cpus");
        for &c in online.iter().filter(|c| !came.contains(c)) {
            hv_event!("cpu-did-not-rejoin", cpu = c);
        }
    }
    Ok(adopted)
}

/// Why the new image could not take the machine over.
#[derive(Debug)]
pub enum RestoreFailure {
    /// The handover blob itself (where it is, its header and checks).
    Handover(&'static str),
    Smmu(RestoreError),
    Adopt(live_update::AdoptFailure),
    /// A test build's deliberate failure (`HV_TEST_BREAK_RESTORE`).
    Test(&'static str),
}

impl core::fmt::Display for RestoreFailure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Handover(reason) => f.write_str(reason),
            Self::Smmu(e) => write!(f, "{e}"),
            Self::Adopt(e) => write!(f, "{e}"),
            Self::Test(what) => write!(f, "test build: {what}"),
        }
    }
}

/// The old image, taking the machine back from a new image that failed
/// before the guests resumed (`rollback_entry` in `entry.S`, on the CPU
/// that left, with its own stack): the MMU on again, then as a cancelled
/// update: the frozen CPUs thawed (the parked ones rejoin through
/// `rejoin_entry`), the handover freed, the requester told
/// OPERATION_DENIED, and this CPU back to its guests. Everything else of
/// this image is as it was at the jump: its slot was left alone, and the
/// preserved state is what it wrote.
#[no_mangle]
extern "C" fn hv_rollback(code: u64) -> ! {
    // What it wrote with its MMU off: the stack it took back
    // (`mmu::invalidate_to_poc`); its top was cleaned to memory before the
    // jump.
    let top = ROLLBACK_SP.load(Ordering::Acquire);
    super::mmu::invalidate_to_poc(top.saturating_sub(super::STACK_SIZE as u64), top);
    super::mmu::activate_secondary();
    // The watchdog is done with (`run_cpu` sets the timer again).
    // SAFETY: stops this CPU's hypervisor timer.
    unsafe { asm!("msr cnthp_ctl_el2, xzr", "isb", options(nomem, nostack)) };
    super::gic::timer_as_fiq(super::mpidr(), false);
    let Some(away) = AWAY.lock().take() else { super::park() };
    let (now, hz) = super::counter();
    rollback::take_back(&Arm { v: away.requester }, code, away.generation, away.handover, away.left_at, (now, hz));
    PARK.store(false, Ordering::Release);
    let entry = rejoin_entry as *const () as u64;
    for c in (0..super::MAX_CPUS).filter(|&c| away.parked & (1 << c) != 0) {
        release_parked(MAILBOX.0[c].as_ptr() as u64, entry);
    }
    HANDSHAKE.end();
    super::cpu::run_cpu(away.cpu, away.slot)
}

/// A CPU that was parked for an update that was rolled back: the MMU on
/// again, and back to its guests (it was counted online at boot).
#[no_mangle]
extern "C" fn hv_secondary_rejoin(index: u64) -> ! {
    // What it wrote with its MMU off: its stack (`mmu::invalidate_to_poc`).
    let (bottom, top) = super::stack_slot(index as usize + 1);
    super::mmu::invalidate_to_poc(bottom, top);
    super::mmu::activate_secondary();
    super::cpu::run_cpu(index as usize, index as usize + 1)
}

/// The new image: arms the way back if the jump carried the old image's
/// rollback entry, and it lies in the old image's slot.
pub fn arm_give_back(entry: u64) {
    if entry != 0 && entry.is_multiple_of(4) && other_slot().contains(&PhysRange::new(entry, 4)) {
        GIVE_BACK.arm(entry);
        // The old image's deadline arrives as FIQ: taken until the commit.
        // SAFETY: the vectors are installed (`el2_common_setup`); a FIQ
        // goes to `el2_exception`, which gives the machine back.
        unsafe { asm!("msr daifclr, #1", "isb", options(nomem, nostack)) };
    }
}

/// The new image, failing before it committed: gives the machine back to
/// the old image (`kho/ABI.md` §5.2) if the way back is armed. Returns if
/// it is not.
pub fn give_back(reason: Reason, detail: &dyn core::fmt::Display) {
    let Some(entry) = GIVE_BACK.take_announced(reason, detail) else { return };
    // SAFETY: stops this CPU's hypervisor timer before leaving.
    unsafe { asm!("msr cnthp_ctl_el2, xzr", "isb", options(nomem, nostack)) };
    // SAFETY: `entry` is the old image's rollback entry, in its slot
    // (`arm_give_back`), which this image has not touched; the old image
    // takes this CPU back with its own stack and page tables.
    unsafe { kexec_enter(reason.code(), 0, 0, entry, 0) }
}
