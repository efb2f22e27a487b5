//! Each physical CPU's life as the hypervisor on x86_64, under VT-x or
//! SVM: the scheduling loop over the machine's run queue, bringing the
//! vCPUs' local APICs up to date (IPIs, timers), carrying out a start-up
//! IPI another vCPU sent (the vCPU reset into real mode), making a
//! vCPU's VMCS current (built on first use, SDM Vol. 3C ch. 25) or
//! building its VMCB (`svm.rs`), injecting its APIC's interrupt, running
//! it with its slice and the next APIC timer of this CPU bounded (the
//! VMX-preemption timer, or the host's local APIC timer under SVM), and
//! acting on how the entry ended.

use core::fmt::Write as _;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};

use hypervisor::arch::x86_64::cr::GuestCrPolicy;
use hypervisor::arch::x86_64::debug::DR7_INIT;
use hypervisor::arch::x86_64::lapic::Lapic;
use hypervisor::arch::x86_64::msr::PAT_DEFAULT;
use hypervisor::arch::x86_64::startup::{self, Segment, Startup};
use hypervisor::arch::x86_64::vmx_caps::proc as proc_ctl;
use hypervisor::arch::x86_64::vmx_exit::Gpr;
use hypervisor::arch::x86_64::vmx_exit::{inject_interrupt, is_valid_interruption};
use hypervisor::live_update::HANDSHAKE;
use hypervisor::machine::Machine;
use hypervisor::sched::VcpuState;
use hypervisor::{hv_event, hv_event_to, println};
use x86::vmx::vmcs::{control, guest, host, ro};

use super::cpu::{self, HostState};
use super::exits::{fault, handle_exit, sync_ia32e_mode, Step, RFLAGS_IF};
use super::guest::Vmcb;
use super::platform::{register_cpu, Backend, MACHINE, X86};
use super::vcpu::{self, RunResult, Vcpu};
use super::vmcs::{self, VmcsError};
use super::{svm, tsc};

/// Scheduling time slice.
const SLICE_MS: u64 = 10;
/// While a live update is staged, no entry lasts longer than this: the
/// CPU then sees the freeze request within it even if the kick IPI is not
/// taken (Bochs does not deliver it while the guest runs with RFLAGS.IF
/// clear; on hardware external-interrupt exiting takes it at once).
const STAGING_ENTRY_US: u64 = 200;
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
/// A TSS limit for the placeholder TR (VM entry needs a usable busy TSS
/// outside IA-32e mode, SDM §27.3.1.2).
const TR_LIMIT: u64 = 0xff;
/// RFLAGS bit 1 is reserved and reads as 1.
const RFLAGS_FIXED: u64 = 1 << 1;
/// The VMCS link pointer must be all ones when unused (§27.3.1.5).
const VMCS_LINK_NONE: u64 = u64::MAX;
/// Interruptibility state: blocking by STI (bit 0) and by MOV SS (bit 1)
/// hold off external interrupts (§25.4.2, Table 25-3; §26.7.5).
const BLOCKING_STI_MOVSS: u64 = 0b11;
/// `VcpuSlot::pending` on x86_64: the vCPU's local APIC has an interrupt
/// to deliver (a waiting vCPU may run).
pub const PENDING_APIC: u32 = 1;

/// Set by the boot CPU once the machine exists: the others may schedule.
static STARTED: AtomicBool = AtomicBool::new(false);

/// Lets the other CPUs into the scheduler.
pub fn release_secondaries() {
    STARTED.store(true, Ordering::Release);
}

/// Whether the boot CPU has released the others into the scheduler.
pub fn started() -> bool {
    STARTED.load(Ordering::Acquire)
}

/// Writes the whole VMCS of a vCPU that has never run (SDM §25.4 guest
/// state, §25.5 host state, §25.6-25.8 controls), as a multiboot2 loader
/// would leave the machine.
fn init_vmcs(m: &Machine<X86>, v: usize, entry: u64, host: &HostState) -> Result<(), VmcsError> {
    let p = &m.partitions[m.vcpus[v].partition];
    let Backend::Vmx { controls: ref ctl, .. } = m.arch.backend else { return Err(VmcsError::Invalid) };
    let cr0v = m.arch.cr_policy.initial_cr0();
    let cr4v = m.arch.cr_policy.initial_cr4();
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
    set(control::CR0_GUEST_HOST_MASK, m.arch.cr_policy.cr0_mask())?;
    set(control::CR4_GUEST_HOST_MASK, m.arch.cr_policy.cr4_mask())?;
    set(control::CR0_READ_SHADOW, cr0v.shadow)?;
    set(control::CR4_READ_SHADOW, cr4v.shadow)?;
    set(control::EPTP_FULL, p.arch.eptp())?;
    set(control::VPID, u64::from(p.vmid))?;
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

/// Overwrites the guest state of a VMCS [`init_vmcs`] just wrote with
/// where a start-up IPI with `vector` starts a vCPU: real-address mode at
/// VV00:0000, the rest as INIT leaves it (`startup::sipi_state`; CR0 from
/// `GuestCrPolicy::reset_cr0`, which unrestricted guest allows). Returns
/// the EDX the vCPU starts with.
fn write_sipi_state(policy: &GuestCrPolicy, vector: u8) -> Result<u64, VmcsError> {
    let signature = raw_cpuid::cpuid!(1).eax;
    let s = startup::sipi_state(vector, signature);
    let set = vmcs::write;
    let cr0 = policy.reset_cr0();
    set(guest::CR0, cr0.real)?;
    set(control::CR0_READ_SHADOW, cr0.shadow)?;
    let segment = |fields: (u32, u32, u32, u32), seg: Segment| -> Result<(), VmcsError> {
        set(fields.0, u64::from(seg.selector))?;
        set(fields.1, seg.base)?;
        set(fields.2, u64::from(seg.limit))?;
        set(fields.3, u64::from(seg.rights))
    };
    segment((guest::CS_SELECTOR, guest::CS_BASE, guest::CS_LIMIT, guest::CS_ACCESS_RIGHTS), s.cs)?;
    for fields in [
        (guest::SS_SELECTOR, guest::SS_BASE, guest::SS_LIMIT, guest::SS_ACCESS_RIGHTS),
        (guest::DS_SELECTOR, guest::DS_BASE, guest::DS_LIMIT, guest::DS_ACCESS_RIGHTS),
        (guest::ES_SELECTOR, guest::ES_BASE, guest::ES_LIMIT, guest::ES_ACCESS_RIGHTS),
        (guest::FS_SELECTOR, guest::FS_BASE, guest::FS_LIMIT, guest::FS_ACCESS_RIGHTS),
        (guest::GS_SELECTOR, guest::GS_BASE, guest::GS_LIMIT, guest::GS_ACCESS_RIGHTS),
    ] {
        segment(fields, s.data)?;
    }
    segment((guest::LDTR_SELECTOR, guest::LDTR_BASE, guest::LDTR_LIMIT, guest::LDTR_ACCESS_RIGHTS), s.ldtr)?;
    segment((guest::TR_SELECTOR, guest::TR_BASE, guest::TR_LIMIT, guest::TR_ACCESS_RIGHTS), s.tr)?;
    set(guest::GDTR_LIMIT, u64::from(s.table_limit))?;
    set(guest::IDTR_LIMIT, u64::from(s.table_limit))?;
    set(guest::RIP, s.rip)?;
    set(guest::RFLAGS, s.rflags)?;
    set(guest::DR7, DR7_INIT)?;
    Ok(s.rdx)
}

/// Carries out a start-up IPI another vCPU sent `v` (pinned to this CPU)
/// since it last ran, if any: the vCPU is reset as INIT leaves it (its
/// x87/SSE state and MSRs saved first, as INIT keeps them; the IPIs left
/// for it dropped, as an APIC after INIT accepts none) and its VMCS is
/// rebuilt on this entry. Returns the SIPI's vector.
fn take_startup(m: &mut Machine<X86>, cpu: usize, v: usize) -> Option<u8> {
    let (p, index) = (m.vcpus[v].partition, m.vcpus[v].index);
    let vector = m.partitions[p].arch.take_sipi(index)?;
    if m.loaded[cpu] == Some(v) {
        m.put_loaded(cpu);
    }
    let _dropped = m.partitions[p].arch.take_inbox(index as usize);
    // SAFETY: `v` is pinned to this CPU, which is in the hypervisor.
    unsafe { m.ctx_mut(v) }.reset_for_startup(index);
    let mut line = alloc::string::String::new();
    let _ = hv_event_to!(
        line,
        "vcpu-start",
        guest = m.partitions[p].info.id,
        vcpu = index,
        cpu = cpu,
        vector = format_args!("{vector:#04x}"),
    );
    m.queue_line(p, alloc::string::String::from(line.trim_end()));
    Some(vector)
}

/// Makes `v` the vCPU of this CPU: its processor state loaded, its VMCS
/// current (initialised on first use, with its EPT and VPID translations
/// invalidated) or its VMCB built, its APIC's interrupt injected, and its
/// entry bounded by the rest of the slice or the next APIC timer of this
/// CPU (`apic_deadline`), whichever comes first (and, while an update is
/// staged, [`STAGING_ENTRY_US`] at most).
fn prepare_entry(
    m: &mut Machine<X86>,
    cpu: usize,
    v: usize,
    new_slice: bool,
    apic_deadline: Option<u64>,
    host: &HostState,
) -> Result<(), VmcsError> {
    let sipi = take_startup(m, cpu, v);
    if m.loaded[cpu] != Some(v) {
        m.put_loaded(cpu);
        // SAFETY: `v` is pinned to this CPU (it is in this CPU's queue).
        unsafe { m.ctx_mut(v) }.load();
        match m.arch.backend {
            Backend::Vmx { .. } => load_vmcs(m, v, sipi, host)?,
            Backend::Svm { iopm, msrpm, .. } => {
                let p = &m.partitions[m.vcpus[v].partition];
                let (asid, ncr3) = (u32::from(p.vmid), p.arch.nested.root());
                let policy = m.arch.cr_policy;
                // SAFETY: `v` is pinned to this CPU.
                let ctx = unsafe { m.ctx_mut(v) };
                if !ctx.initialized {
                    // SAFETY: the vCPU's own control page, pinned here and
                    // not in a VMRUN.
                    let vmcb = unsafe { Vmcb::new(ctx.vmcs) };
                    let spec = svm::VmcbSpec { asid, ncr3, iopm, msrpm, entry: ctx.entry };
                    if ctx.restored {
                        // Adopted from a handover: the VMCB in place.
                        svm::adopt_vmcb(vmcb, &spec);
                        ctx.restored = false;
                    } else {
                        svm::init_vmcb(vmcb, &spec, &policy);
                    }
                    if let Some(vector) = sipi {
                        let rdx = svm::write_sipi_state(vmcb, &policy, vector);
                        ctx.regs.set(Gpr::RDX, rdx);
                    }
                    ctx.initialized = true;
                }
            }
        }
        m.loaded[cpu] = Some(v);
    }
    if m.vcpus[v].state == VcpuState::Waiting {
        m.vcpus[v].state = VcpuState::Runnable;
    }
    let now = tsc::now();
    if new_slice || m.arch.slice_end[cpu] <= now {
        m.arch.slice_end[cpu] = now + m.arch.tsc_hz / 1000 * SLICE_MS;
    }
    let mut until = apic_deadline.map_or(m.arch.slice_end[cpu], |d| d.min(m.arch.slice_end[cpu]));
    if HANDSHAKE.in_progress() {
        until = until.min(now + m.arch.tsc_hz / 1_000_000 * STAGING_ENTRY_US);
    }
    match m.arch.backend {
        Backend::Vmx { caps, .. } => {
            // SAFETY: `v` is loaded on this CPU, which is in the hypervisor.
            inject_apic_interrupt(&mut unsafe { m.ctx_mut(v) }.lapic)?;
            let ticks = until.saturating_sub(now) >> caps.preemption_timer_shift;
            vmcs::write(guest::VMX_PREEMPTION_TIMER_VALUE, ticks.min(u64::from(u32::MAX)))
        }
        Backend::Svm { .. } => {
            // SAFETY: `v` is loaded on this CPU, which is in the hypervisor.
            let ctx = unsafe { m.ctx_mut(v) };
            // SAFETY: its own VMCB, pinned here and not in a VMRUN.
            svm::inject_apic_interrupt(unsafe { Vmcb::new(ctx.vmcs) }, &mut ctx.lapic);
            svm::arm_slice_timer(until, now, m.arch.tsc_hz);
            Ok(())
        }
    }
}

/// Makes `v`'s VMCS current on this CPU, building it on first use (then
/// writing back the guest state a handover brought, or the state a
/// start-up IPI with `sipi` starts it in).
fn load_vmcs(m: &mut Machine<X86>, v: usize, sipi: Option<u8>, host: &HostState) -> Result<(), VmcsError> {
    // SAFETY: `v` is pinned to this CPU (it is in this CPU's queue).
    let ctx = unsafe { m.ctx_mut(v) };
    if ctx.initialized {
        return vmcs::load(ctx.vmcs);
    }
    vmcs::clear(ctx.vmcs)?;
    vmcs::load(ctx.vmcs)?;
    init_vmcs(m, v, ctx.entry, host)?;
    if ctx.restored {
        // Adopted from a handover: the guest state it had.
        ctx.write_back()?;
        sync_ia32e_mode()?;
        ctx.restored = false;
    }
    if let Some(vector) = sipi {
        let rdx = write_sipi_state(&m.arch.cr_policy, vector)?;
        ctx.regs.set(Gpr::RDX, rdx);
        sync_ia32e_mode()?;
    }
    // Nothing cached under this EPTP or VPID may predate the tree (SDM
    // §29.4.3.1): frames and VPIDs can be reused.
    let p = &m.partitions[m.vcpus[v].partition];
    vmcs::invept_single(p.arch.eptp())?;
    vmcs::invvpid_single(p.vmid)?;
    ctx.initialized = true;
    Ok(())
}

/// Injects the interrupt the current vCPU's APIC would deliver now, as an
/// external interrupt through the VM-entry interruption-information
/// field (§27.6.1), when the guest can take it: RFLAGS.IF set, no STI or
/// MOV SS blocking, and no other event already being injected. Otherwise
/// interrupt-window exiting brings the vCPU back as soon as it can
/// (§26.7.5, §27.2).
fn inject_apic_interrupt(lapic: &mut Lapic) -> Result<(), VmcsError> {
    let mut window = false;
    if let Some(vector) = lapic.deliverable() {
        let busy = is_valid_interruption(vmcs::read32(control::VMENTRY_INTERRUPTION_INFO_FIELD)?);
        let open = vmcs::read(guest::RFLAGS)? & RFLAGS_IF != 0
            && vmcs::read(guest::INTERRUPTIBILITY_STATE)? & BLOCKING_STI_MOVSS == 0;
        if open && !busy {
            lapic.acknowledge(vector);
            vmcs::write(control::VMENTRY_INTERRUPTION_INFO_FIELD, u64::from(inject_interrupt(vector)))?;
        } else {
            window = true;
        }
    }
    let controls = vmcs::read(control::PRIMARY_PROCBASED_EXEC_CONTROLS)?;
    let want = if window {
        controls | u64::from(proc_ctl::INTERRUPT_WINDOW_EXITING)
    } else {
        controls & !u64::from(proc_ctl::INTERRUPT_WINDOW_EXITING)
    };
    if want != controls {
        vmcs::write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, want)?;
    }
    Ok(())
}

/// What [`update_apics`] found on a CPU.
struct ApicScan {
    /// A waiting vCPU has an interrupt to take now.
    woke: bool,
    /// The earliest armed APIC timer.
    deadline: Option<u64>,
    /// Some vCPU waits for an interrupt.
    waiting: bool,
}

/// Brings the local APICs of this CPU's vCPUs up to date: the APIC a
/// vCPU adopted from a handover had, the IPIs other vCPUs left for them,
/// timers that expired (whether or not the vCPU is loaded, as aarch64's
/// soft timers). A vCPU whose APIC has an interrupt to deliver is marked
/// [`PENDING_APIC`], which lets a waiting one run.
fn update_apics(m: &mut Machine<X86>, cpu: usize) -> ApicScan {
    let now = tsc::now();
    let mut scan = ApicScan { woke: false, deadline: None, waiting: false };
    for k in 0..m.queues[cpu].len() {
        let v = m.queues[cpu][k];
        let (p, index) = (m.vcpus[v].partition, m.vcpus[v].index as usize);
        // SAFETY: `v` is pinned to this CPU, which is in the hypervisor.
        if unsafe { m.ctx_mut(v) }.restored {
            // Adopted from a handover: the APIC it had there.
            if let Some(apic) = m.partitions[p].arch.take_apic(index) {
                // SAFETY: as above.
                unsafe { m.ctx_mut(v) }.lapic = apic;
            }
        }
        let state = m.vcpus[v].state;
        if matches!(state, VcpuState::Off | VcpuState::Stopped) {
            continue;
        }
        let inbox = m.partitions[p].arch.take_inbox(index);
        let (ready, deadline) = {
            // SAFETY: `v` is pinned to this CPU, which is in the
            // hypervisor; no other reference to the context is live.
            let lapic = &mut unsafe { m.ctx_mut(v) }.lapic;
            lapic.accept_all(&inbox);
            lapic.advance(now);
            (lapic.deliverable().is_some(), lapic.next_deadline())
        };
        let slot = &mut m.vcpus[v];
        if ready {
            scan.woke |= state == VcpuState::Waiting && slot.pending & PENDING_APIC == 0;
            slot.pending |= PENDING_APIC;
        } else {
            slot.pending &= !PENDING_APIC;
        }
        scan.waiting |= state == VcpuState::Waiting;
        scan.deadline = match (scan.deadline, deadline) {
            (Some(earliest), Some(this)) => Some(earliest.min(this)),
            (earliest, this) => earliest.or(this),
        };
    }
    scan
}

/// Chooses what this CPU runs next and prepares it, spinning (lock
/// released) while its vCPUs only wait: for an interrupt, or, off, for
/// another vCPU of their partition to start them with INIT-SIPI. `None`
/// when nothing on this CPU can ever run again (every vCPU here stopped).
/// A waiting vCPU whose interrupt arrived goes before the current one.
fn schedule(cpu: usize, yield_now: bool, host: &HostState) -> Option<NonNull<Vcpu>> {
    loop {
        if HANDSHAKE.freeze_requested() {
            super::live_update::freeze_this_cpu(cpu);
            continue;
        }
        let mut guard = MACHINE.lock();
        let m = guard.as_mut()?;
        if m.shutting_down {
            return None;
        }
        let scan = update_apics(m, cpu);
        super::vtd::poll_faults(m);
        let yield_now = yield_now || scan.woke;
        let current = m.loaded[cpu].filter(|&v| m.runnable(v));
        let Some(v) = m.pick(cpu, yield_now) else {
            if !scan.waiting && !m.cpu_has_work(cpu) {
                return None;
            }
            drop(guard);
            hypervisor::console::drain();
            core::hint::spin_loop();
            continue;
        };
        match prepare_entry(m, cpu, v, yield_now || Some(v) != current, scan.deadline, host) {
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
    register_cpu(cpu);
    let svm = super::svm_backend();
    if svm {
        svm::init_slice_timer();
    }
    let mut yield_now = false;
    let mut first = true;
    loop {
        // Lines queued after a blackout go out a FIFO's worth at a time.
        hypervisor::console::drain();
        let Some(mut ctx) = schedule(cpu, yield_now, &host) else { super::live_update::idle(cpu) };
        if core::mem::take(&mut first) {
            super::live_update::note_resumed(cpu);
        }
        // SAFETY: `schedule` returned this CPU's loaded vCPU, whose VMCS is
        // current or whose VMCB is built; only this CPU touches its context.
        let result = if svm { unsafe { ctx.as_mut() }.run_svm(cpu) } else { unsafe { ctx.as_mut() }.run() };
        let mut guard = MACHINE.lock();
        let Some(m) = guard.as_mut() else { super::halt_forever() };
        let Some(v) = m.loaded[cpu] else { super::halt_forever() };
        yield_now = handle_run(m, v, result);
        let lines = m.take_output();
        let update = m.arch.update_request[cpu].take();
        drop(guard);
        for line in lines {
            println!("{line}");
        }
        if let Some((requester, image_pa, size)) = update {
            // Returns once the update was refused or cancelled; the
            // requester resumes with the status.
            super::live_update::run(cpu, requester, image_pa, size);
        }
    }
}

/// Acts on how a guest entry ended; returns whether to reschedule.
fn handle_run(m: &mut Machine<X86>, v: usize, result: RunResult) -> bool {
    match result {
        RunResult::Exited => match handle_exit(m, v) {
            Ok(next) => follow_startup(m, v) || next == Step::Reschedule,
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

/// An INIT or SIPI another vCPU sent `v` while it ran outranks what its
/// own exit asked (a HLT's wait, say): after INIT it is off, waiting for
/// a SIPI; after a SIPI it is runnable and starts afresh. Returns whether
/// that takes it off this CPU's current choice.
fn follow_startup(m: &mut Machine<X86>, v: usize) -> bool {
    let (p, index) = (m.vcpus[v].partition, m.vcpus[v].index);
    let state = match m.partitions[p].arch.startup(index) {
        Startup::Running => return false,
        Startup::WaitForSipi => VcpuState::Off,
        Startup::Sipi(_) => VcpuState::Runnable,
    };
    if m.vcpus[v].state != VcpuState::Stopped {
        m.vcpus[v].state = state;
    }
    true
}
