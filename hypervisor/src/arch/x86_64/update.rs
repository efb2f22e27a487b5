//! Live update on x86_64 (`shared/DESIGN.md` §5), the VMX side of
//! `hypervisor::live_update`: the request is staged in scratch and
//! validated as an x86_64 ELF with a handover entry, every CPU stops at a
//! VM-exit boundary (the VMX-preemption timer bounds the wait to one time
//! slice, SDM Vol. 3C §26.5.1) and VMCLEARs its vCPUs' VMCSs after reading
//! their guest state, the handover records partitions (EPT roots), vCPUs
//! and the preserved map, every CPU leaves VMX operation (VMXOFF; INIT is
//! blocked in VMX root operation, §24.8), and a trampoline in scratch
//! copies the new image's PT_LOAD segments to their physical addresses and
//! enters its handover entry in 64-bit mode.
//!
//! The new image adopts the EPT trees in place (same roots), restarts the
//! other CPUs with INIT-SIPI-SIPI, and rebuilds each VMCS from its vCPU
//! record in the same VMCS region: controls and host state are the new
//! image's own, the guest state is the record's.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

use hvcall::Status;
use hypervisor::frames::PAGE_SIZE;
use hypervisor::live_update::UpdatePlatform;
use hypervisor::live_update::{self, format_code, partition_state_of, state_code, state_of, Ready, Request};
use hypervisor::partition::{GuestRam, PartitionInfo};
use hypervisor::stage2::{Ept, LinearMap, Stage2Table};
use hypervisor::update::{
    field_text, text_field, HvRecord, PartitionRecord, PreservedMap, VcpuRecord, CMDLINE_BYTES, CONTEXT_BYTES,
};
use hypervisor::vmx_caps::{VmcsControls, VmxCaps};
use hypervisor::vmx_exit::Gpr;
use hypervisor::x86_guest::cr::GuestCrPolicy;
use hypervisor::{hv_event, println};
use kho::{HandoverReader, HandoverWriter};
use loader::elf::{self, Machine as ElfMachine};
use loader::image_desc::{Descriptor, ImageArch};
use loader::manifest::ImageFormat;
use loader::{BootInfo, PhysRange};

use super::guests::{self, AdoptedPartition, AdoptedVcpu, Adoption};
use super::vcpu::{Vcpu, CONTEXT_FORMAT, CONTEXT_LEN};
use super::{smp, tsc, vmx, KEXEC_WINDOW, MAPPED_LIMIT};

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
const PARAM_WORDS: usize = 6;
const MAX_SEGMENTS: usize = (PAGE_SIZE as usize / 8 - PARAM_WORDS) / 4;

core::arch::global_asm!(include_str!("kexec.S"), options(att_syntax));

extern "C" {
    static kexec_trampoline_start: u8;
    static kexec_trampoline_end: u8;
}

/// CPUs that left VMX operation and halted for the kexec.
static OFF_FOR_KEXEC: AtomicUsize = AtomicUsize::new(0);

/// The x86_64 side of [`UpdatePlatform`]: the requesting vCPU `v`; other
/// CPUs leave their guests at the next preemption-timer exit and spin
/// with PAUSE while frozen.
struct Vmx {
    v: usize,
}

impl UpdatePlatform for Vmx {
    fn counter(&self) -> (u64, u64) {
        (tsc::now(), guests::tsc_hz())
    }

    fn kick_others(&self, _cpu: usize, _cpus: usize) {
        // Every guest entry arms the VMX-preemption timer for at most one
        // slice (SDM Vol. 3C §26.5.1), so each CPU reaches an exit
        // boundary within SLICE_MS without an IPI.
    }

    fn put_loaded(&self, cpu: usize) -> Result<(), &'static str> {
        guests::put_loaded(cpu)
    }

    fn take_fail_next_freeze(&self) -> Result<bool, &'static str> {
        guests::take_fail_next_freeze()
    }

    fn save_state(&self, w: &mut HandoverWriter, freeze_counter: u64) -> Result<(), &'static str> {
        guests::with_machine(|m| save_state(m, w, freeze_counter))?
    }

    fn check_image(&self, staged: &[u8], desc: &Descriptor) -> Result<(), &'static str> {
        segments(staged, desc).map(|_| ())
    }

    fn set_status(&self, status: Status) {
        guests::set_guest_reg(self.v, Gpr::RAX, status as u64);
    }

    fn alloc_handover(&self, bytes: u64) -> Option<PhysRange> {
        guests::with_machine(|m| m.frames.alloc_block(bytes)).ok().flatten()
    }

    fn free_handover(&self, block: PhysRange) {
        let _ = guests::with_machine(|m| m.frames.free_block(block));
    }

    fn wait(&self) {
        core::hint::spin_loop();
    }

    fn wake(&self) {}

    fn relax(&self) {
        core::hint::spin_loop();
    }
}

/// The image's PT_LOAD segments, checked: each inside the kexec window
/// (memory reserved for hypervisor images since first boot, so no
/// preserved page is there), and the handover entry inside one.
fn segments(staged: &[u8], desc: &Descriptor) -> Result<Vec<elf::LoadSegment>, &'static str> {
    let image = elf::parse(staged, ElfMachine::X86_64).map_err(|_| "bad-elf")?;
    let window = super::image_range().base..super::image_range().base + KEXEC_WINDOW;
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
    Ok(image.segments)
}

fn save_state(m: &guests::Machine, w: &mut HandoverWriter, freeze_counter: u64) -> Result<(), &'static str> {
    let hv = HvRecord {
        freeze_counter,
        counter_hz: m.tsc_hz,
        cpus: m.cpus as u32,
        partitions: m.partitions.len() as u32,
        vcpus: m.vcpus.len() as u32,
        images_preserved: false,
    };
    w.subsystem("hv").and_then(|mut s| s.add_record(&hv)).map_err(|_| "hv-record")?;
    for p in &m.partitions {
        let rec = PartitionRecord {
            id: p.info.id,
            name: text_field(&p.info.name),
            privileged: p.info.privileged,
            state: p.state as u32,
            ram_host_base: p.info.ram.host_base,
            ram_size: p.info.ram.size,
            stage2_root: p.ept.root(),
            vmid: u32::from(p.vpid),
            vcpus: p.info.vcpus,
            image_format: format_code(ImageFormat::Flat),
            image_base: 0,
            image_size: 0,
            initrd_base: 0,
            initrd_size: 0,
            cmdline_len: 0,
            cmdline: [0; CMDLINE_BYTES],
        };
        live_update::add_partition(w, &rec)?;
    }
    for (n, slot) in m.vcpus.iter().enumerate() {
        let mut context = [0u8; CONTEXT_BYTES];
        // SAFETY: every CPU has put its vCPUs and captured their VMCS
        // state (all are frozen), so no context is changing.
        let len = unsafe { slot.ctx.as_ref() }.to_context(&mut context).ok_or("context-too-large")?;
        let rec = VcpuRecord {
            partition: m.partitions[slot.partition].info.id,
            index: slot.index,
            pcpu: slot.pcpu as u32,
            state: state_code(slot.state),
            pending: 0,
            context_format: CONTEXT_FORMAT,
            context_len: len as u32,
            context,
        };
        live_update::add_vcpu(w, n, &rec)?;
    }
    live_update::add_bitmap_roots(w, m.preserved.bitmap.roots())
}

/// A CPU other than the requester, at an exit boundary: frozen until the
/// update is cancelled, or off for the kexec.
pub fn freeze_this_cpu(cpu: usize) {
    live_update::freeze_this_cpu(&Vmx { v: 0 }, cpu, cpu_off);
}

/// Off for the kexec: the BSP enters the new image; any other CPU leaves
/// VMX operation (INIT is blocked in VMX root operation, SDM Vol. 3C
/// §24.8) and halts with interrupts off, so that the new image can restart
/// it with INIT-SIPI-SIPI.
fn cpu_off() -> ! {
    if smp::is_bsp() {
        jump()
    }
    vmx::disable();
    OFF_FOR_KEXEC.fetch_add(1, Ordering::AcqRel);
    super::halt_forever()
}

/// A CPU with nothing left to run. The BSP keeps answering freezes (it is
/// the one that enters a new image); another CPU leaves VMX operation and
/// halts for good, and freezes no longer wait for it.
pub fn idle() -> ! {
    if smp::is_bsp() {
        loop {
            if live_update::freeze_requested() {
                freeze_this_cpu(0);
            }
            core::hint::spin_loop();
        }
    }
    vmx::disable();
    live_update::note_parked();
    super::halt_forever()
}

/// Called by each CPU as it first enters a guest.
pub fn note_resumed() {
    live_update::note_resumed(tsc::now(), guests::tsc_hz());
}

/// Runs a live update requested by vCPU `v` on `cpu`; returns only if it
/// was refused or cancelled, with the guest's status set.
pub fn run(cpu: usize, v: usize, image_pa: u64, size: u64) {
    let platform = Vmx { v };
    if !live_update::begin() {
        platform.set_status(Status::OperationDenied);
        return;
    }
    let Ok((ram, scratch, update_count, cpus)) =
        guests::with_machine(|m| (m.ram.clone(), m.scratch.clone(), m.update_count, m.cpus))
    else {
        live_update::end();
        return;
    };
    let req = Request {
        cpu,
        cpus,
        image_pa,
        size,
        arch: ImageArch::X86_64,
        tail_bytes: TAIL_PAGES * PAGE_SIZE,
        ram: &ram,
        scratch: &scratch,
        update_count,
    };
    if let Ok(ready) = live_update::prepare_and_freeze(&platform, &req) {
        match prepare_jump(&ready, cpus) {
            Ok(j) => {
                *JUMP.lock() = Some(j);
                live_update::release_for_kexec(&platform);
                cpu_off()
            }
            Err(reason) => live_update::cancel_after_freeze(&platform, &ready, reason),
        }
    }
    live_update::end();
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
#[derive(Clone, Copy, Debug)]
struct Jump {
    tramp: u64,
    params: u64,
    cpus: usize,
}

/// Set by the requesting CPU once the guests are frozen; taken by the BSP.
static JUMP: spin::Mutex<Option<Jump>> = spin::Mutex::new(None);

/// Builds the trampoline, its page tables and its parameters in scratch
/// after the staged image. Any CPU may do this; only the BSP jumps.
fn prepare_jump(ready: &Ready, cpus: usize) -> Result<Jump, &'static str> {
    // SAFETY: the staged copy in scratch, checked by `prepare_and_freeze`.
    let staged = unsafe { core::slice::from_raw_parts(ready.stage.base as *const u8, ready.image_len as usize) };
    let desc = loader::image_desc::find(staged).map_err(|_| "no-descriptor")?;
    let segs = segments(staged, &desc)?;
    let mbi = guests::with_machine(|m| m.mbi.base)?;
    let tramp = (ready.stage.base + ready.image_len).next_multiple_of(PAGE_SIZE);
    let params = tramp + PARAMS_PAGE * PAGE_SIZE;
    let tables = tramp + TABLES_PAGE * PAGE_SIZE;
    build_tables(tables);
    let (t_start, t_end) =
        (core::ptr::addr_of!(kexec_trampoline_start) as u64, core::ptr::addr_of!(kexec_trampoline_end) as u64);
    let head = [tables, u64::from(desc.handover_entry), ready.handover.base, mbi, 0, segs.len() as u64];
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
    Ok(Jump { tramp, params, cpus })
}

/// On the BSP: waits for the other CPUs to be off, leaves VMX operation
/// and jumps to the trampoline, which copies the new image into place and
/// enters it. Never returns.
fn jump() -> ! {
    let Some(j) = *JUMP.lock() else { super::halt_forever() };
    let (t0, hz) = (tsc::now(), guests::tsc_hz());
    while OFF_FOR_KEXEC.load(Ordering::Acquire) + live_update::parked() + 1 < j.cpus {
        if hypervisor::update::blackout_us(t0, tsc::now(), hz) / 1000 > live_update::STOP_TIMEOUT_MS {
            break;
        }
        core::hint::spin_loop();
    }
    vmx::disable();
    // SAFETY: the parameter page prepared by `prepare_jump`; word 4 is the
    // TSC at the jump.
    unsafe { (j.params as *mut u64).add(4).write(tsc::now()) };
    // SAFETY: interrupts off; the trampoline switches to its own page
    // tables in scratch, copies the checked segments over this image
    // (nothing of which is used after the jump) and enters the new image's
    // handover entry with RDI = handover, RSI = multiboot2 information,
    // RDX = the TSC at the jump.
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

/// What the restore side needs from the new image's boot.
pub struct RestoreSpec<'a> {
    pub info: &'a BootInfo,
    /// Memory the image and the platform occupy.
    pub reserved: Vec<PhysRange>,
    pub cpus: &'a [usize],
    pub caps: VmxCaps,
    pub mbi: PhysRange,
}

/// The restore side: validates the handover at `handover_pa`, adopts the
/// preserved map and each partition's EPT tree in place, rebuilds the
/// vCPUs from their records, and installs the machine. Returns how many
/// partitions were adopted.
pub fn restore(handover_pa: u64, spec: RestoreSpec<'_>) -> Result<usize, &'static str> {
    let ram = &spec.info.ram;
    let head = phys_bytes(PhysRange::new(handover_pa, 8), ram).ok_or("handover-outside-ram")?;
    let size = HandoverReader::blob_size(head).map_err(|_| "handover-header")?;
    let blob = phys_bytes(PhysRange::new(handover_pa, size as u64), ram).ok_or("handover-outside-ram")?;
    let ram_map = live_update::ram_map(ram).ok_or("ram-map")?;
    let reader = HandoverReader::new(blob, handover_pa, &ram_map).map_err(|e| {
        println!("handover: {e}");
        "handover-invalid"
    })?;
    let scratch = reader.scratch().clone();
    let adopted = live_update::adopt_preserved(&reader, ram, spec.reserved)?;
    let hv = reader.subsystem("hv").and_then(|n| n.record::<HvRecord>().ok().flatten()).ok_or("hv-record")?;
    let msrs = vmx::read_msrs();
    let controls = VmcsControls::resolve(&msrs).map_err(|e| {
        println!("vmx controls: {e}");
        "vmx-controls-unsupported"
    })?;
    let adopt_ram: Vec<(u64, u64)> = ram.iter().map(|r| (r.base, r.size)).collect();
    let mut partitions: Vec<AdoptedPartition> = Vec::new();
    for node in reader.children("partitions") {
        let rec = node.record::<PartitionRecord>().ok().flatten().ok_or("partition-record")?;
        if !adopted.bitmap.contains_range(rec.ram_host_base..rec.ram_host_base + rec.ram_size) {
            return Err("partition-ram-not-preserved");
        }
        // SAFETY: RAM is identity-mapped, so physical = virtual.
        let phys = unsafe { LinearMap::new(0) };
        let ept = Stage2Table::<Ept, LinearMap>::adopt(rec.stage2_root, &adopt_ram, &[], phys).map_err(|e| {
            println!("EPT of partition {}: {e}", rec.id);
            "ept-adopt"
        })?;
        partitions.push(AdoptedPartition {
            info: PartitionInfo {
                id: rec.id,
                name: alloc::string::String::from(field_text(&rec.name)),
                privileged: rec.privileged,
                ram: GuestRam { host_base: rec.ram_host_base, size: rec.ram_size },
                vcpus: rec.vcpus,
            },
            state: partition_state_of(rec.state).ok_or("partition-state")?,
            ept,
            vpid: u16::try_from(rec.vmid).map_err(|_| "vpid")?,
        });
    }
    let mut vcpus: Vec<AdoptedVcpu> = Vec::new();
    for node in reader.children("vcpus") {
        let rec = node.record::<VcpuRecord>().ok().flatten().ok_or("vcpu-record")?;
        if rec.context_format != CONTEXT_FORMAT || rec.context_len as usize != CONTEXT_LEN {
            return Err("vcpu-context-format");
        }
        let partition = partitions.iter().position(|p| p.info.id == rec.partition).ok_or("vcpu-partition")?;
        let ctx = Vcpu::from_context(rec.context.get(..CONTEXT_LEN).ok_or("context")?).ok_or("context")?;
        if !adopted.bitmap.contains_range(ctx.vmcs..ctx.vmcs + PAGE_SIZE) {
            return Err("vmcs-not-preserved");
        }
        let pcpu = spec.cpus.get(rec.pcpu as usize).copied().unwrap_or(0);
        vcpus.push(AdoptedVcpu {
            ctx,
            partition,
            index: rec.index,
            pcpu,
            state: state_of(rec.state).ok_or("vcpu-state")?,
        });
    }
    for p in &partitions {
        hv_event!(
            "guest-adopted",
            id = p.info.id,
            name = p.info.name,
            stage2_root = format_args!("{:#x}", p.ept.root()),
            ram = format_args!("{:#x}", p.info.ram.host_base),
        );
    }
    let n = partitions.len();
    let mut frames = adopted.frames;
    // The consumed handover is not in the preserved map: it goes back to
    // the allocator.
    let footprint = reader.footprint();
    frames.add_free(PhysRange::new(footprint.base(), footprint.size()));
    live_update::note_restored(&reader, size as u64, adopted.preserved_pages, hv.freeze_counter, tsc::now());
    let busy = guests::install_adopted(Adoption {
        partitions,
        vcpus,
        frames,
        preserved: PreservedMap { bitmap: adopted.bitmap },
        cpus: spec.cpus.len().max(1),
        caps: spec.caps,
        controls,
        cr_policy: GuestCrPolicy::new(&msrs),
        tsc_hz: hv.counter_hz,
        ram: ram.clone(),
        scratch,
        update_count: reader.update_count(),
        mbi: spec.mbi,
    });
    live_update::set_resume_cpus(busy);
    Ok(n)
}
