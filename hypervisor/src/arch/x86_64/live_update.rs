//! Live update on x86_64 (`shared/DESIGN.md` §5), the VMX side of
//! `hypervisor::live_update`: the request is staged in scratch and
//! validated as an x86_64 ELF with a handover entry, every CPU stops at a
//! VM-exit boundary (the VMX-preemption timer bounds the wait to one time
//! slice, SDM Vol. 3C §26.5.1) and VMCLEARs its vCPUs' VMCSs after reading
//! their guest state, the handover records partitions (EPT roots), vCPUs
//! and the preserved map, every CPU leaves VMX operation (VMXOFF; INIT is
//! blocked in VMX root operation, §24.8), and a trampoline in scratch
//! copies the new image's PT_LOAD segments to their physical addresses and
//! enters its handover entry in 64-bit mode. An image linked for the
//! other slot (`hypervisor::slots`) was put there before the freeze, and
//! the trampoline only enters it; the CPUs other than the BSP then park
//! in this image's code (a mailbox, as on aarch64) instead of halting for
//! INIT-SIPI-SIPI.
//!
//! The new image releases the parked CPUs into its own AP entry (others
//! it restarts with INIT-SIPI-SIPI), adopts the EPT trees in place (same
//! roots), and rebuilds each VMCS from its vCPU record in the same VMCS
//! region: controls and host state are the new image's own, the guest
//! state is the record's.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hvcall::Status;
use hypervisor::arch::x86_64::cr::GuestCrPolicy;
use hypervisor::arch::x86_64::svm_caps::SvmCaps;
use hypervisor::arch::x86_64::vmx_caps::{VmcsControls, VmxCaps};
use hypervisor::arch::x86_64::vmx_exit::Gpr;
use hypervisor::frames::PAGE_SIZE;
use hypervisor::live_update::handshake::{Generation, Handshake};
use hypervisor::live_update::incoming::{self, AdoptSpec};
use hypervisor::live_update::rollback::{self, break_mode, Break, Reason, GIVE_BACK};
use hypervisor::live_update::{self, Cancel, HandoffPlan, Ready, Request, UpdatePlatform, HANDSHAKE, REPORT};
use hypervisor::machine::{Arch, Machine, MachineLock, MAX_CPUS};
use hypervisor::preserved::IdentityPages;
use hypervisor::records::{SvmRecord, VtdRecord};
use hypervisor::slots::{self, Placement};
use hypervisor::{hv_event, println};
use kho::HandoverReader;
use kho::StateRecord as _;
use loader::elf::{self, Machine as ElfMachine};
use loader::image_desc::{Descriptor, ImageArch};
use loader::{BootInfo, PhysRange};

use super::platform::{tsc_hz, Backend, MACHINE, X86};
use super::{smp, tsc, vmcs, vmx, MAPPED_LIMIT};

/// Scratch after the staged image: the trampoline's code page, its
/// parameter page, and its page tables (PML4, PDPT, 4 PDs).
const TAIL_PAGES: u64 = 8;
const PARAMS_PAGE: u64 = 1;
const TABLES_PAGE: u64 = 2;
/// Page-table entry bits (SDM Vol. 3A §4.5): P | RW, and 2 MiB leaves
/// write-back (PS) or uncached (PS | PWT | PCD) for the top GiB (MMIO).
const PTE_P_RW: u64 = 0x3;
const PDE_2M_WB: u64 = 0x83;
const PDE_2M_UC: u64 = 0x9b;
/// Trampoline parameters (`kexec.S`): CR3, entry, handover, multiboot2
/// information, TSC, segment count, then (src, dst, filesz, memsz) each.
const PARAM_WORDS: usize = 7;
const MAX_SEGMENTS: usize = (PAGE_SIZE as usize / 8 - PARAM_WORDS) / 4;

core::arch::global_asm!(include_str!("kexec.S"), options(att_syntax));

extern "C" {
    static kexec_trampoline_start: u8;
    static kexec_trampoline_end: u8;
    fn park_in_mailbox(word: u64, index: u64, watch: u64) -> !;
    /// `entry.S`: where a failed new image gives the machine back, and
    /// where a parked CPU (re)enters this image. Addresses only.
    fn hv_rollback_entry();
    fn hv_ap_parked_entry() -> !;
}

/// What this image needs to take the machine back if the new image fails
/// before the guests resume (`kho/ABI.md` §5.2): set by the requesting
/// CPU before the CPUs leave, taken by [`hv_x86_rollback`].
#[derive(Debug)]
struct Away {
    generation: Generation,
    requester: usize,
    handover: PhysRange,
    /// The CPUs parked in [`MAILBOX`] (bit n: CPU n).
    parked: u64,
    /// The TSC when the CPUs were released to leave.
    left_at: u64,
}

static AWAY: spin::Mutex<Option<Away>> = spin::Mutex::new(None);

/// The parked CPUs' rollback watch (`park_in_mailbox`): the TSC by which
/// the new image must have committed (0: no deadline, or the NMI was
/// sent), the BSP's APIC ID, and the local APIC's base.
#[repr(C, align(64))]
struct Watch([AtomicU64; 3]);

static WATCH: Watch = Watch([const { AtomicU64::new(0) }; 3]);

/// How long a new image has to commit before a parked CPU interrupts its
/// BSP with an NMI and it gives the machine back (`kho/ABI.md` §5.2).
pub const GIVE_BACK_DEADLINE_MS: u64 = 5000;

/// Where the frozen CPUs wait for the new image (`HandoffRecord::mailbox`):
/// one word per CPU index, 0 until the new image writes its AP entry
/// there. A cache line of its own.
#[repr(C, align(64))]
struct Mailbox([AtomicU64; MAX_CPUS]);

static MAILBOX: Mailbox = Mailbox([const { AtomicU64::new(0) }; MAX_CPUS]);
/// Set by the requesting CPU before it releases the frozen ones: park in
/// [`MAILBOX`] rather than halt for INIT-SIPI-SIPI.
static PARK: AtomicBool = AtomicBool::new(false);
/// The CPU index of the bootstrap processor, the one that enters the new
/// image (INIT sends the BSP back to the firmware, SDM Vol. 3A §9.1).
const BSP_INDEX: usize = 0;

/// The x86_64 side of [`UpdatePlatform`]: the requesting vCPU `v`; other
/// CPUs are kicked out of their guests and spin with PAUSE while frozen.
struct Vmx {
    v: usize,
}

impl UpdatePlatform for Vmx {
    type Arch = X86;

    fn machine(&self) -> &MachineLock<X86> {
        &MACHINE
    }

    fn handshake(&self) -> &Handshake {
        &HANDSHAKE
    }

    fn counter(&self) -> (u64, u64) {
        (tsc::now(), tsc_hz())
    }

    /// A kick IPI makes every other CPU leave its guest at once instead of
    /// at the end of its slice (the VMX-preemption timer, SDM Vol. 3C
    /// §26.5.1, which still bounds the wait).
    fn kick_others(&self, m: &Machine<X86>, cpu: usize) {
        for &c in m.online.iter().filter(|&&c| c != cpu) {
            m.arch.kick(c);
        }
    }

    fn freeze_cpu(&self, m: &mut Machine<X86>, cpu: usize) -> Result<(), &'static str> {
        freeze_cpu(m, cpu)
    }

    fn check_image(
        &self,
        staged: &[u8],
        desc: &Descriptor,
        readers: Option<&loader::image_readers::Readers>,
    ) -> Result<(), &'static str> {
        // With the VT-d unit on, the new image must adopt it (the `vtd`
        // record): one that does not read it would leave the unit
        // translating for guests it does not know. Refused before
        // anything is frozen.
        let vtd_on = MACHINE.with(|m| m.arch.vtd.is_some()).unwrap_or(false);
        let reads_vtd = readers.is_some_and(|r| r.reads(VtdRecord::ID, VtdRecord::VERSION));
        if vtd_on && !reads_vtd {
            return Err("new-image-does-not-adopt-vt-d");
        }
        segments(staged, desc).map(|_| ())
    }

    /// An image for the other slot: its segments copied there and the
    /// rest of each cleared now, while the guests run (the trampoline then
    /// only enters it). One for the running slot: copied by the
    /// trampoline during the blackout.
    fn place(&self, staged: &[u8], _: &Descriptor) -> Result<Placement, &'static str> {
        let desc = loader::image_desc::find(staged).map_err(|_| "no-descriptor")?;
        let (segs, placement) = segments(staged, &desc)?;
        if let Placement::Alternate { range, .. } = placement {
            let mbi = MACHINE.with(|m| m.arch.mbi).ok_or("no-machine")?;
            if mbi.overlaps(&range) {
                // The next image reads the multiboot2 information there.
                return Err("boot-information-in-image-slot");
            }
            for s in &segs {
                // The other slot is reserved for images since boot: nothing
                // lives or runs there; it is identity-mapped.
                // SAFETY: as above; `segments` checked each lies in it.
                unsafe {
                    let src = staged.as_ptr().add(s.file_offset as usize);
                    core::ptr::copy_nonoverlapping(src, s.paddr as *mut u8, s.file_size as usize);
                    let bss = (s.paddr + s.file_size) as *mut u8;
                    core::ptr::write_bytes(bss, 0, (s.mem_size - s.file_size) as usize);
                }
            }
        }
        Ok(placement)
    }

    fn handoff(&self) -> HandoffPlan {
        HandoffPlan { mailbox: MAILBOX.0.as_ptr() as u64, code: super::code_range(), enters: Some(BSP_INDEX) }
    }

    fn set_status(&self, m: &mut Machine<X86>, status: Status) {
        // SAFETY: the requesting vCPU exited on this CPU, its owner, and is
        // not entered again before the update returns.
        unsafe { m.ctx_mut(self.v) }.regs.set(Gpr::RAX, status as u64);
    }

    fn wait(&self) {
        core::hint::spin_loop();
    }

    fn wake(&self) {}

    fn relax(&self) {
        core::hint::spin_loop();
    }
}

/// At a freeze, on `cpu`: saves and unloads the loaded vCPU, copies every
/// vCPU's local APIC for the `lapic` record, then for every vCPU pinned
/// here whose VMCS was used, reads its guest state
/// (VMREAD needs the VMCS current on the CPU it is active on) and VMCLEARs
/// it, so its data is in memory and the CPU holds no VMCS state (SDM Vol.
/// 3C §25.11.1, §25.11.3). If the update is cancelled, the next entry is
/// a VMLAUNCH of the same, intact VMCS.
fn freeze_cpu(m: &mut Machine<X86>, cpu: usize) -> Result<(), &'static str> {
    m.put_loaded(cpu);
    for k in 0..m.queues[cpu].len() {
        let v = m.queues[cpu][k];
        let (p, index) = (m.vcpus[v].partition, m.vcpus[v].index as usize);
        let inbox = m.partitions[p].arch.take_inbox(index);
        let apic = {
            // SAFETY: pinned to this CPU, and not running (this CPU is at
            // an exit boundary).
            let lapic = &mut unsafe { m.ctx_mut(v) }.lapic;
            // With the IPIs other vCPUs left for it, for the record.
            lapic.accept_all(&inbox);
            lapic.clone()
        };
        m.partitions[p].arch.stash_apic(index, &apic);
        // SAFETY: as above.
        let ctx = unsafe { m.ctx_mut(v) };
        // A VMCB is memory, complete since the vCPU's last exit: nothing
        // to capture or clear.
        if !ctx.initialized || super::svm_backend() {
            continue;
        }
        vmcs::load(ctx.vmcs).and_then(|()| ctx.capture()).and_then(|()| vmcs::clear(ctx.vmcs)).map_err(|e| {
            println!("freeze: vmcs {:#x}: {e}", ctx.vmcs);
            "vmcs-capture"
        })?;
        ctx.launched = false;
    }
    Ok(())
}

/// The image's PT_LOAD segments, checked: all inside the image slot the
/// image is linked for (memory reserved for hypervisor images since first
/// boot, so no preserved page is there), and the handover entry inside
/// one; and where the image goes.
fn segments(staged: &[u8], desc: &Descriptor) -> Result<(Vec<elf::LoadSegment>, Placement), &'static str> {
    let image = elf::parse(staged, ElfMachine::X86_64).map_err(|_| "bad-elf")?;
    let base = image.segments.iter().map(|s| s.paddr).min().ok_or("bad-elf")?;
    let end = image.segments.iter().filter_map(|s| s.paddr.checked_add(s.mem_size)).max().ok_or("bad-elf")?;
    let placement = slots::X86_64.place(super::image_range().base, base, end - base).map_err(|e| {
        println!("update: {e:?}");
        e.reason()
    })?;
    let slot = slots::X86_64.range(slots::X86_64.slot_of(base).unwrap_or(0));
    let window = slot.base..slot.base + slot.size;
    for s in &image.segments {
        let end = s.paddr.checked_add(s.mem_size).ok_or("bad-elf")?;
        let file_end = s.file_offset.checked_add(s.file_size).ok_or("bad-elf")?;
        if s.paddr < window.start || end > window.end {
            return Err("segment-outside-kexec-window");
        }
        if file_end > staged.len() as u64 || s.file_size > s.mem_size {
            return Err("bad-elf");
        }
    }
    if image.segments.len() > MAX_SEGMENTS {
        return Err("too-many-segments");
    }
    let entry = u64::from(desc.handover_entry);
    if entry == 0 {
        return Err("no-handover-entry");
    }
    if !image.segments.iter().any(|s| (s.paddr..s.paddr + s.file_size).contains(&entry)) {
        return Err("handover-entry-outside-image");
    }
    Ok((image.segments, placement))
}

/// A CPU other than the requester, at an exit boundary: frozen until the
/// update is cancelled, or off for the kexec.
pub fn freeze_this_cpu(cpu: usize) {
    live_update::freeze_this_cpu(&Vmx { v: 0 }, cpu, cpu_off);
}

fn cpu_off(generation: Generation) -> ! {
    leave(smp_index(), generation)
}

/// This CPU's index among the machine's.
fn smp_index() -> usize {
    MACHINE.with(|m| hypervisor::machine::Arch::this_cpu(&m.arch)).unwrap_or(0)
}

/// Off for the kexec: the BSP enters the new image; any other CPU leaves
/// VMX operation and waits in the mailbox for the new image to release it
/// (a staged update), or halts with interrupts off so that the new image
/// can restart it with INIT-SIPI-SIPI (INIT is blocked in VMX root
/// operation, SDM Vol. 3C §24.8).
fn leave(cpu: usize, generation: Generation) -> ! {
    if smp::is_bsp() {
        jump(cpu, generation)
    }
    vmx::disable();
    HANDSHAKE.left(cpu, generation);
    if let Some(word) = PARK.load(Ordering::Acquire).then(|| MAILBOX.0.get(cpu)).flatten() {
        // The code, page tables, GDT and stack it waits on are this image's,
        // intact until the new image (in the other slot) resumed the guests.
        // SAFETY: as above; the word is this CPU's in the handoff mailbox.
        unsafe { park_in_mailbox(word.as_ptr() as u64, cpu as u64, WATCH.0.as_ptr() as u64) }
    }
    super::halt_forever()
}

/// A CPU with nothing left to run keeps answering freezes: the BSP is the
/// one that enters a new image, and another CPU takes part in the update
/// as any other (it parks in the mailbox of a staged update, where it
/// watches the new image's deadline: without it a machine whose other
/// CPUs all went idle would have no watcher, and a new image that hangs
/// would hang it). The BSP spins; another CPU sleeps in HLT with
/// interrupts enabled until a kick (the freeze request's IPI, taken by
/// `hv_host_interrupt`) or its stale slice timer wakes it. STI's one-
/// instruction shadow makes the check and the HLT one step: a kick that
/// came after the check is taken at the HLT and ends it.
pub fn idle(cpu: usize) -> ! {
    let bsp = smp::is_bsp();
    loop {
        if HANDSHAKE.freeze_requested() {
            freeze_this_cpu(cpu);
        }
        if bsp {
            hypervisor::console::drain();
            core::hint::spin_loop();
        } else {
            // SAFETY: every vector from 32 up has a handler that only
            // EOIs (`host_interrupt`), and exceptions have theirs; the
            // hypervisor's state is consistent here (no lock held).
            unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
        }
    }
}

/// Records that the BSP finished a restore step (`hv: update-steps`).
pub fn mark(step: &'static str) {
    REPORT.mark(step, tsc::now());
}

/// Called by each CPU as it first enters a guest.
pub fn note_resumed(cpu: usize) {
    incoming::cpu_resumed(cpu, tsc::now(), tsc_hz());
}

/// Runs a live update requested by vCPU `v` on `cpu`; returns only if it
/// was refused or cancelled, with the guest's status set.
pub fn run(cpu: usize, v: usize, image_pa: u64, size: u64) {
    let platform = Vmx { v };
    let req = Request { cpu, image_pa, size, arch: ImageArch::X86_64, tail_bytes: TAIL_PAGES * PAGE_SIZE };
    let Ok(ready) = live_update::prepare_and_freeze(&platform, &req) else { return };
    let online = MACHINE.with(|m| m.online.clone()).unwrap_or_default();
    match prepare_jump(&ready, online) {
        Ok(j) => {
            let parked = if ready.park {
                j.online.iter().filter(|&&c| c != BSP_INDEX).fold(0u64, |m, &c| m | (1 << c))
            } else {
                0
            };
            *AWAY.lock() = Some(Away {
                generation: ready.generation,
                requester: v,
                handover: ready.handover,
                parked,
                left_at: tsc::now(),
            });
            // A staged image can give the machine back: the parked CPUs
            // watch for it to commit in time.
            let deadline = if matches!(ready.placement, Placement::Alternate { .. }) {
                tsc::now() + tsc_hz() / 1000 * GIVE_BACK_DEADLINE_MS
            } else {
                0
            };
            WATCH.0[1].store(u64::from(super::bsp_apic_id()), Ordering::Relaxed);
            WATCH.0[2].store(smp::apic_base() as u64, Ordering::Relaxed);
            WATCH.0[0].store(deadline, Ordering::Release);
            *JUMP.lock() = Some(j);
            if ready.park {
                for word in &MAILBOX.0 {
                    word.store(0, Ordering::Relaxed);
                }
            }
            PARK.store(ready.park, Ordering::Release);
            HANDSHAKE.release_for_kexec(ready.generation);
            leave(cpu, ready.generation)
        }
        Err(reason) => live_update::cancel_after_freeze(&platform, &ready, &Cancel::Kexec(reason)),
    }
}

/// Identity map of the low 4 GiB with 2 MiB pages (the top GiB uncached)
/// at `tables`: PML4, PDPT, then four PDs.
fn build_tables(tables: u64) {
    let page = |k: u64| tables + k * PAGE_SIZE;
    let entries = |pa: u64| pa as *mut u64;
    // SAFETY: six pages of scratch after the staged image, reserved for
    // the trampoline (the size check left TAIL_PAGES); identity-mapped.
    unsafe {
        core::ptr::write_bytes(page(0) as *mut u8, 0, 2 * PAGE_SIZE as usize);
        entries(page(0)).write(page(1) | PTE_P_RW);
        for gib in 0..4u64 {
            entries(page(1)).add(gib as usize).write(page(2 + gib) | PTE_P_RW);
            for k in 0..512u64 {
                let pa = (gib << 30) | (k << 21);
                let flags = if gib == 3 { PDE_2M_UC } else { PDE_2M_WB };
                entries(page(2 + gib)).add(k as usize).write(pa | flags);
            }
        }
    }
}

/// The prepared kexec: the trampoline and its parameter page in scratch,
/// and how many CPUs must be off before the jump.
#[derive(Clone, Debug)]
struct Jump {
    tramp: u64,
    params: u64,
    online: Vec<usize>,
}

/// Set by the requesting CPU once the guests are frozen; taken by the BSP.
static JUMP: spin::Mutex<Option<Jump>> = spin::Mutex::new(None);

/// Builds the trampoline, its page tables and its parameters in scratch
/// after the staged image. Any CPU may do this; only the BSP jumps.
fn prepare_jump(ready: &Ready, online: Vec<usize>) -> Result<Jump, &'static str> {
    // SAFETY: the staged copy in scratch, checked by `prepare_and_freeze`.
    let staged = unsafe { core::slice::from_raw_parts(ready.stage.base as *const u8, ready.image_len as usize) };
    let desc = loader::image_desc::find(staged).map_err(|_| "no-descriptor")?;
    let (segs, _) = segments(staged, &desc)?;
    // A staged image is in place already: the trampoline copies nothing.
    let segs = if matches!(ready.placement, Placement::Alternate { .. }) { Vec::new() } else { segs };
    let mbi = MACHINE.with(|m| m.arch.mbi.base).ok_or("no-machine")?;
    let tramp = (ready.stage.base + ready.image_len).next_multiple_of(PAGE_SIZE);
    let params = tramp + PARAMS_PAGE * PAGE_SIZE;
    let tables = tramp + TABLES_PAGE * PAGE_SIZE;
    build_tables(tables);
    let (t_start, t_end) =
        (core::ptr::addr_of!(kexec_trampoline_start) as u64, core::ptr::addr_of!(kexec_trampoline_end) as u64);
    // A staged image can give the machine back: this image stays intact.
    let back =
        if matches!(ready.placement, Placement::Alternate { .. }) { hv_rollback_entry as *const () as u64 } else { 0 };
    let head = [tables, u64::from(desc.handover_entry), ready.handover.base, mbi, 0, back, segs.len() as u64];
    // SAFETY: the trampoline's code and parameter pages lie in scratch
    // right after the staged image (the size check left TAIL_PAGES), and
    // the code is the image's own position-independent text.
    unsafe {
        core::ptr::copy_nonoverlapping(t_start as *const u8, tramp as *mut u8, (t_end - t_start) as usize);
        let words = params as *mut u64;
        for (k, w) in head.iter().enumerate() {
            words.add(k).write(*w);
        }
        for (k, s) in segs.iter().enumerate() {
            let at = words.add(PARAM_WORDS + 4 * k);
            at.write(ready.stage.base + s.file_offset);
            at.add(1).write(s.paddr);
            at.add(2).write(s.file_size);
            at.add(3).write(s.mem_size);
        }
    }
    Ok(Jump { tramp, params, online })
}

/// On the BSP: waits for the other CPUs to have left VMX operation,
/// leaves it too and jumps to the trampoline, which copies the new image
/// into place and enters it. Never returns.
fn jump(me: usize, generation: Generation) -> ! {
    let Some(j) = JUMP.lock().clone() else { super::halt_forever() };
    let (t0, hz) = (tsc::now(), tsc_hz());
    let expired = || live_update::blackout_us(t0, tsc::now(), hz) / 1000 > live_update::STOP_TIMEOUT_MS;
    if let Err(t) = HANDSHAKE.wait_left(generation, me, &j.online, expired, core::hint::spin_loop) {
        // It acknowledged the freeze, so it runs no guest code; it is late
        // leaving VMX operation, and the new image's INIT-SIPI may not
        // reach it. Its vCPUs are restored onto the CPUs that come up.
        hv_event!("kexec-cpu-slow", cpu = t.cpu);
    }
    // The next image resets the UART: whatever was queued since the
    // freeze (a slow CPU, above) goes out first.
    hypervisor::console::flush();
    vmx::disable();
    // SAFETY: the parameter page prepared by `prepare_jump`; word 4 is the
    // TSC at the jump.
    unsafe { (j.params as *mut u64).add(4).write(tsc::now()) };
    // The trampoline enters the new image's handover entry with RDI =
    // handover, RSI = multiboot2 information, RDX = the TSC at the jump.
    // SAFETY: interrupts off; the trampoline runs on its own page tables in
    // scratch and copies the checked segments over this image, none of
    // which is used after the jump.
    unsafe { core::arch::asm!("cli", "jmp {t}", t = in(reg) j.tramp, in("rdi") j.params, options(noreturn)) }
}

fn phys_bytes(range: PhysRange, ram: &[PhysRange]) -> Option<&'static [u8]> {
    let end = range.end()?;
    if end > MAPPED_LIMIT || !ram.iter().any(|r| r.contains(&range)) {
        return None;
    }
    // SAFETY: inside RAM below 4 GiB (identity-mapped); the handover is
    // only read, and nothing writes it while it is.
    Some(unsafe { core::slice::from_raw_parts(range.base as *const u8, usize::try_from(range.size).ok()?) })
}

/// The backend the new image found at its entry.
#[derive(Clone, Copy, Debug)]
pub enum BackendCaps {
    Vmx(VmxCaps),
    Svm(SvmCaps),
}

/// What the restore side needs from the new image's boot.
pub struct RestoreSpec<'a> {
    pub info: &'a BootInfo,
    /// Memory the image and the platform occupy.
    pub reserved: Vec<PhysRange>,
    pub caps: BackendCaps,
    pub mbi: PhysRange,
}

/// Why the new image could not take the machine over.
#[derive(Debug)]
pub enum RestoreFailure {
    /// The handover blob itself (where it is, its header and checks).
    Handover(&'static str),
    VmxControls,
    /// The handover was written under the other backend (VT-x vs SVM),
    /// or its `svm` record is unusable.
    Backend(&'static str),
    Adopt(live_update::AdoptFailure),
    /// A test build's deliberate failure (`HV_TEST_BREAK_RESTORE`).
    Test(&'static str),
}

impl core::fmt::Display for RestoreFailure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Handover(reason) => f.write_str(reason),
            Self::VmxControls => f.write_str("vmx-controls-unsupported"),
            Self::Backend(why) => f.write_str(why),
            Self::Adopt(e) => write!(f, "{e}"),
            Self::Test(what) => write!(f, "test build: {what}"),
        }
    }
}

/// The backend the handover was written under (its `svm` record says
/// SVM; the vCPU contexts' control pages are VMCBs only then), checked
/// against this CPU's (`caps`), and the VT-d unit adopted translating
/// from its `vtd` record, before the partitions, whose tables name its
/// devices' BARs.
fn adopt_backend(
    reader: &HandoverReader<'_>,
    caps: BackendCaps,
    ram: &[PhysRange],
) -> Result<(Backend, GuestCrPolicy, Option<super::vtd::Unit>), RestoreFailure> {
    // The `svm` record says which backend wrote the handover; the vCPU
    // contexts' control pages are VMCBs only if it is there.
    let svm_record = match reader.subsystem("svm") {
        None => None,
        Some(node) => match node.record::<SvmRecord>() {
            Ok(Some(r)) => Some(r),
            _ => return Err(RestoreFailure::Backend("svm-record")),
        },
    };
    let (backend, cr_policy) = match (caps, svm_record) {
        (BackendCaps::Vmx(caps), None) => {
            let msrs = vmx::read_msrs();
            let controls = VmcsControls::resolve(&msrs).map_err(|e| {
                println!("vmx controls: {e}");
                RestoreFailure::VmxControls
            })?;
            (Backend::Vmx { caps, controls }, GuestCrPolicy::new(&msrs))
        }
        (BackendCaps::Svm(caps), Some(r)) => {
            super::svm::adopt_slice_timer_rate(r.apic_timer_hz).map_err(RestoreFailure::Backend)?;
            super::svm_backend_of(caps, false)
        }
        (BackendCaps::Vmx(_), Some(_)) => return Err(RestoreFailure::Backend("svm-handover-on-vmx")),
        (BackendCaps::Svm(_), None) => return Err(RestoreFailure::Backend("vmx-handover-on-svm")),
    };
    // The VT-d unit, adopted translating (its `vtd` record) before the
    // partitions, whose tables name its devices' BARs.
    let vtd = match reader.subsystem("vtd") {
        None => None,
        Some(node) => match node.record::<VtdRecord>() {
            Ok(Some(r)) => {
                let unit = super::vtd_unit().ok_or(RestoreFailure::Backend("vtd-record-without-unit"))?;
                let ram_pairs: Vec<(u64, u64)> = ram.iter().map(|r| (r.base, r.size)).collect();
                let unit = super::vtd::adopt(&r, unit, &ram_pairs).map_err(RestoreFailure::Backend)?;
                hv_event!(
                    "vtd-adopted",
                    base = format_args!("{:#x}", unit.base),
                    root = format_args!("{:#x}", r.root),
                    queue = format_args!("{:#x}", r.queue),
                    translating = u8::from(unit.vtd.translating()),
                    assignments = unit.assigned.len(),
                );
                Some(unit)
            }
            _ => return Err(RestoreFailure::Backend("vtd-record")),
        },
    };
    Ok((backend, cr_policy, vtd))
}

pub use hypervisor::live_update::incoming::Parked;

/// The restore side: validates the handover at `handover_pa`, brings the
/// other CPUs up (`start_cpus`: the parked ones released, if the previous
/// image parked them; it returns the CPUs ready), adopts the preserved
/// map and each partition's EPT tree in place, rebuilds the vCPUs from
/// their records (each VMCS is rebuilt on first entry), and installs the
/// machine. Returns how many partitions were adopted.
pub fn restore(
    handover_pa: u64,
    spec: RestoreSpec<'_>,
    mut start_cpus: impl FnMut(Option<&Parked>) -> Vec<usize>,
) -> Result<usize, RestoreFailure> {
    let h = RestoreFailure::Handover;
    if break_mode() == Some(Break::RefuseHandover) {
        return Err(h("test-build-refuses-the-handover-version"));
    }
    let ram = &spec.info.ram;
    let head = phys_bytes(PhysRange::new(handover_pa, 8), ram).ok_or(h("handover-outside-ram"))?;
    let size = HandoverReader::blob_size(head).map_err(|_| h("handover-header"))?;
    let blob = phys_bytes(PhysRange::new(handover_pa, size as u64), ram).ok_or(h("handover-outside-ram"))?;
    let ram_map = live_update::ram_map(ram).ok_or(h("ram-map"))?;
    let reader = HandoverReader::new(blob, handover_pa, &ram_map).map_err(|e| {
        println!("handover: {e}");
        h("handover-invalid")
    })?;
    mark("handover");
    let handoff =
        reader.subsystem("handoff").and_then(|n| n.record::<hypervisor::records::HandoffRecord>().ok().flatten());
    let staged = handoff.as_ref().is_some_and(|r| r.staged == 1);
    let running = super::image_range().base;
    let old_slot = slots::X86_64.range(usize::from(slots::X86_64.slot_of(running) != Some(1)));
    let parked = handoff.as_ref().and_then(|r| Parked::from_record(r, old_slot, MAX_CPUS));
    // With a way back to the old image, the parked CPUs stay in its code
    // until the machine is adopted (`kho/ABI.md` §5.2).
    let late = GIVE_BACK.armed() && parked.is_some();
    let online = if let (Some(p), true) = (&parked, late) {
        (0..MAX_CPUS).filter(|&c| c == BSP_INDEX || p.word(c).is_some()).collect()
    } else {
        let online = start_cpus(parked.as_ref());
        mark("cpus");
        online
    };
    // No firmware call on x86_64; CPUs not parked were restarted with
    // INIT-SIPI-SIPI (`cpu_restarts`).
    REPORT.note_handoff(staged, parked.map_or(0, |p| p.count()), 0);
    if let Some(old) = handoff.as_ref().and_then(|r| incoming::old_image_of(r, old_slot)) {
        // SAFETY: `old_image_of` checked the range lies in the other slot,
        // identity-mapped RAM this image does not use.
        unsafe { incoming::expect_old_image(old) };
    }
    let (backend, cr_policy, vtd) = adopt_backend(&reader, spec.caps, ram)?;
    let hv_hz = reader
        .subsystem("hv")
        .and_then(|n| n.record::<hypervisor::records::HvRecord>().ok().flatten())
        .map_or(0, |r| r.counter_hz);
    let arch = X86 {
        backend,
        vtd,
        cr_policy,
        tsc_hz: hv_hz,
        mbi: spec.mbi,
        slice_end: [0; MAX_CPUS],
        update_request: [None; MAX_CPUS],
    };
    super::platform::set_tsc_hz(hv_hz);
    assert!(break_mode() != Some(Break::Panic), "test build (HV_TEST_BREAK_RESTORE): panics in the restore");
    let spec = AdoptSpec { ram, reserved: spec.reserved, online: &online, counter: tsc::now };
    // SAFETY: RAM below 4 GiB is identity-mapped, and only this CPU is up.
    let adopted = unsafe { incoming::adopt(&reader, &MACHINE, arch, IdentityPages, spec) }.map_err(|e| {
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
        // The machine is this image's from here on (a deadline NMI after
        // this is ignored, `hv_host_nmi`).
        GIVE_BACK.commit();
        let came = start_cpus(parked.as_ref());
        mark("cpus");
        for &c in online.iter().filter(|c| !came.contains(c)) {
            hv_event!("cpu-did-not-rejoin", cpu = c);
        }
    }
    Ok(adopted)
}

/// The old image, taking the machine back from a new image that failed
/// before the guests resumed (`hv_rollback_entry`, on the BSP, with its
/// own page tables, GDT and boot stack): VMX on again, then as a cancelled
/// update: the frozen CPUs thawed (the parked ones rejoin through
/// `hv_ap_parked_entry`, as a new image would release them), the handover
/// freed, the requester told OPERATION_DENIED, and the BSP back to its
/// guests. Everything else of this image is as it was at the jump.
#[no_mangle]
extern "C" fn hv_x86_rollback(code: u64) -> ! {
    super::cpu::load_idt();
    if super::svm_backend() {
        if let Err(e) = super::svm::enable(BSP_INDEX) {
            println!("svm: {}", e.reason());
            super::halt_forever()
        }
    } else if let Err(e) = vmx::enable(BSP_INDEX) {
        println!("vmx: {}", e.reason());
        super::halt_forever()
    }
    let Some(away) = AWAY.lock().take() else { super::halt_forever() };
    // The new image may have adopted the VT-d unit (a wait descriptor
    // through its queue) before it failed: this image's queue tail is
    // taken up from the unit.
    if let Some(Some(Err(e))) = MACHINE.with(|m| m.arch.vtd.as_mut().map(|u| u.vtd.resync_queue())) {
        println!("vtd: {e}");
    }
    WATCH.0[0].store(0, Ordering::Release);
    let platform = Vmx { v: away.requester };
    rollback::take_back(&platform, code, away.generation, away.handover, away.left_at, (tsc::now(), tsc_hz()));
    PARK.store(false, Ordering::Release);
    let entry = hv_ap_parked_entry as *const () as u64;
    super::rejoining(away.parked.count_ones() as usize);
    for c in (0..MAX_CPUS).filter(|&c| away.parked & (1 << c) != 0) {
        MAILBOX.0[c].store(entry, Ordering::Release);
    }
    HANDSHAKE.end();
    super::run::run_cpu(BSP_INDEX)
}

/// The new image: arms the way back if the jump carried the old image's
/// rollback entry, and it lies in the old image's slot.
pub fn arm_give_back(entry: u64) {
    let running = super::image_range().base;
    let old_slot = slots::X86_64.range(usize::from(slots::X86_64.slot_of(running) != Some(1)));
    if entry != 0 && old_slot.contains(&PhysRange::new(entry, 1)) {
        GIVE_BACK.arm(entry);
    }
}

/// The new image, failing before it committed: gives the machine back to
/// the old image (`kho/ABI.md` §5.2) if the way back is armed, on the BSP
/// with VMX off. Returns if it is not armed.
pub fn give_back(reason: Reason, detail: &dyn core::fmt::Display) {
    let Some(entry) = GIVE_BACK.take_announced(reason, detail) else { return };
    if super::vmx_on_boot_cpu() {
        vmx::disable();
    }
    // SAFETY: `entry` is the old image's rollback entry, in its slot
    // (`arm_give_back`), which this image has not touched; identity-mapped
    // in this image's tables, and it takes its own tables, GDT and stack.
    unsafe { core::arch::asm!("cli", "jmp {e}", e = in(reg) entry, in("rdi") reason.code(), options(noreturn)) }
}

/// An NMI on this image's CPU (`host_nmi` in `exceptions.S`): the old
/// image's deadline while this image has not committed gives the machine
/// back; any other NMI is ignored.
#[no_mangle]
extern "C" fn hv_host_nmi() {
    if GIVE_BACK.armed() {
        give_back(Reason::Deadline, &"the old image's deadline passed (NMI)");
    }
}
