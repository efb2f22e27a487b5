//! VM exits on x86_64 under VT-x: the exit reason (Intel SDM Vol. 3C
//! ch. 28, Appendix C) becomes a call on the machine (hypercall, HLT) or
//! is handled by the arch's own guest policy (CPUID, the MSR allow-list,
//! the local APIC's MSRs, control and debug registers, COM1 port I/O,
//! exceptions to inject); anything else is a fault that stops the
//! partition.

use alloc::string::String;
use core::fmt::Write as _;

use hvcall::PartitionState;
use hypervisor::arch::x86_64::cpuid::{guest_cpuid, CpuidRegs, GuestCpuidInfo};
use hypervisor::arch::x86_64::cr::{cr0, cr4, CrContext, PagingChange};
use hypervisor::arch::x86_64::debug::{self, DebugReg, DrDecision};
use hypervisor::arch::x86_64::emulate::{self, Access, CodeSize, Paging};
use hypervisor::arch::x86_64::lapic::{self, Ipi, StartupIpi, StartupKind, WriteEffect};
use hypervisor::arch::x86_64::msr::{check_write, GuestMsr, MsrHome, WriteContext, EFER_LMA};
use hypervisor::arch::x86_64::vmx_caps::entry as entry_ctl;
use hypervisor::arch::x86_64::vmx_exit::{
    inject_exception, vector, CrAccess, DrAccess, EptViolation, Exit, ExitReason, Gpr, Interruption, InterruptionType,
    IoAccess,
};
use hypervisor::arch::x86_64::GpFault;
use hypervisor::hypercall::{HostMemory, IdentityMemory};
use hypervisor::machine::{Arch, Machine, Next};
use hypervisor::partition::GuestRam;
use hypervisor::sched::VcpuState;
use hypervisor::{hv_event, hv_event_to};
use x86::msr::{rdmsr, wrmsr};
use x86::vmx::vmcs::{control, guest, ro};

use super::platform::X86;
use super::vcpu::Vcpu;
use super::{smp, tsc, vcpu, vmcs};
use vmcs::VmcsError;

/// Interruptibility state: blocking by STI (bit 0) and by MOV SS (bit 1)
/// end with the instruction a handler skips (§25.4.2, Table 25-3).
const BLOCKING_STI_MOVSS: u64 = 0b11;
/// CR8 holds a 4-bit priority, TPR bits 7:4; bits 63:4 are reserved
/// (SDM Vol. 3A §11.8.6.1).
const CR8_RESERVED: u64 = !0xf;
const CR8_TPR_SHIFT: u32 = 4;
/// RFLAGS.IF (SDM Vol. 1 §3.4.3.3).
pub const RFLAGS_IF: u64 = 1 << 9;
/// Guest-physical PDPTE fields (§25.4.2): PDPTE0..3.
const GUEST_PDPTES: [u32; 4] = [guest::PDPTE0_FULL, guest::PDPTE1_FULL, guest::PDPTE2_FULL, guest::PDPTE3_FULL];
/// CR3 bits 31:5 locate the PDPT with PAE paging (SDM Vol. 3A §5.4.1).
const PAE_PDPT_MASK: u64 = 0xffff_ffe0;
/// Segment access rights (SDM §25.4.1, Table 25-2): DPL (6:5), L (13).
const AR_DPL_SHIFT: u32 = 5;
const AR_DPL_MASK: u64 = 0x3;
const AR_LONG: u64 = 1 << 13;
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

/// Stops the partition of `v` for a fault, naming the guest's RIP.
pub fn fault(m: &mut Machine<X86>, v: usize, kind: &str, addr: u64) {
    m.fault(v, kind, addr, ("rip", vmcs::read(guest::RIP).unwrap_or(0)));
}

/// What to do after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
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
    step_to(rip.wrapping_add(len))
}

/// Resumes the guest at `next`, past the instruction that exited.
fn step_to(next: u64) -> Result<(), VmcsError> {
    vmcs::write(guest::RIP, next)?;
    let blocking = vmcs::read(guest::INTERRUPTIBILITY_STATE)?;
    if blocking & BLOCKING_STI_MOVSS != 0 {
        vmcs::write(guest::INTERRUPTIBILITY_STATE, blocking & !BLOCKING_STI_MOVSS)?;
    }
    Ok(())
}

/// Injects a hardware exception at the next entry (§27.6.1); the
/// instruction is not skipped (faults re-execute). An error code is
/// delivered only in protected mode (§27.2.1.3).
fn inject(vector: u8, error_code: Option<u32>) -> Result<Step, VmcsError> {
    let protected = vmcs::read(guest::CR0)? & cr0::PE != 0;
    let with_code = error_code.is_some() && protected;
    vmcs::write(control::VMENTRY_INTERRUPTION_INFO_FIELD, u64::from(inject_exception(vector, with_code)))?;
    if with_code {
        vmcs::write(control::VMENTRY_EXCEPTION_ERR_CODE, u64::from(error_code.unwrap_or(0)))?;
    }
    Ok(Step::Resume)
}

/// Notes a #GP the policy decided on: an `hv: inject` event for the 1st,
/// 2nd, 4th, 8th ... of each partition (a guest that provokes them in a
/// loop cannot flood the console), printed after the lock is released.
fn note_gp(m: &mut Machine<X86>, v: usize, reason: GpFault) {
    let p = m.vcpus[v].partition;
    let part = &mut m.partitions[p];
    part.arch.gp_injected += 1;
    let count = part.arch.gp_injected;
    if count.is_power_of_two() {
        let mut line = String::new();
        let _ =
            hv_event_to!(line, "inject", vector = "gp", reason = reason.reason(), guest = part.info.id, count = count);
        m.queue_line(p, String::from(line.trim_end()));
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
pub fn sync_ia32e_mode() -> Result<(), VmcsError> {
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
pub fn handle_exit(m: &mut Machine<X86>, v: usize) -> Result<Step, VmcsError> {
    let exit = Exit::decode(vmcs::read32(ro::EXIT_REASON)?);
    let qualification = vmcs::read(ro::EXIT_QUALIFICATION)?;
    if exit.entry_failure {
        hv_event!("vm-entry-failed", vcpu = v, reason = exit.reason.name(), qualification = qualification);
        fault(m, v, "vm-entry-failed", qualification);
        return Ok(Step::Reschedule);
    }
    sync_ia32e_mode()?;
    // SAFETY: `v` is the vCPU that just exited on this CPU.
    let ctx = unsafe { m.ctx_mut(v) };
    let next = match exit.reason {
        ExitReason::Vmcall => hypercall_exit(m, v)?,
        ExitReason::Cpuid => cpuid_exit(m, v)?,
        ExitReason::Rdmsr => rdmsr_exit(ctx)?,
        ExitReason::Wrmsr => wrmsr_exit(m, v)?,
        ExitReason::CrAccess => cr_exit(m, v, qualification)?,
        ExitReason::DrAccess => dr_exit(ctx, qualification)?,
        ExitReason::IoInstruction => io_exit(m, v, qualification)?,
        ExitReason::Hlt => {
            advance_rip()?;
            hlt_exit(m, v, vmcs::read(guest::RFLAGS)? & RFLAGS_IF != 0);
            Step::Reschedule
        }
        // The guest can take the interrupt its APIC holds: the next entry
        // injects it (and clears the window exiting).
        ExitReason::InterruptWindow => Step::Resume,
        ExitReason::ExternalInterrupt => {
            // Acknowledged on exit (exit control 15): end it at the local
            // APIC, which holds its in-service bit.
            if Interruption::decode(vmcs::read32(ro::VMEXIT_INTERRUPTION_INFO)?).is_some() {
                smp::apic_eoi();
            }
            Step::Resume
        }
        // The slice ended, or a local APIC timer of this CPU is due.
        ExitReason::PreemptionTimer => {
            if tsc::now() >= m.arch.slice_end[m.vcpus[v].pcpu] {
                Step::Reschedule
            } else {
                Step::Resume
            }
        }
        ExitReason::EptViolation => {
            let gpa = vmcs::read(ro::GUEST_PHYSICAL_ADDR_FULL)?;
            let violation = EptViolation::decode(qualification);
            let p = m.vcpus[v].partition;
            if m.partitions[p].info.ram.contains_gpa(gpa) {
                // RAM is mapped with every permission: a violation there
                // means the tables are not what the hypervisor built.
                hv_event!("ept-violation", guest = m.partitions[p].info.id, access = violation.access());
                fault(m, v, "ept", gpa);
                Step::Reschedule
            } else {
                unbacked_access(m, v, gpa, violation)?
            }
        }
        ExitReason::EptMisconfig => {
            fault(m, v, "ept-misconfig", vmcs::read(ro::GUEST_PHYSICAL_ADDR_FULL)?);
            Step::Reschedule
        }
        ExitReason::TripleFault => {
            fault(m, v, "triple-fault", vmcs::read(guest::RIP)?);
            Step::Reschedule
        }
        ExitReason::ExceptionOrNmi
            if Interruption::decode(vmcs::read32(ro::VMEXIT_INTERRUPTION_INFO)?)
                .is_some_and(|i| i.kind == InterruptionType::Nmi) =>
        {
            // NMIs exit (pin-based control 3) and are not the guest's.
            Step::Resume
        }
        ExitReason::Invd => {
            // Write-back caches are coherent; dropping them would only lose
            // data. Completing INVD as a no-op is what WBINVD would leave.
            advance_rip()?;
            Step::Resume
        }
        ExitReason::Rdpmc => Step::InjectGp(GpFault::HiddenFeature),
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
            Step::Reschedule
        }
    };
    let next = match next {
        Step::InjectGp(reason) => {
            note_gp(m, v, reason);
            inject(vector::GP, Some(0))?
        }
        other => {
            if other == Step::Resume {
                reinject_interrupted_event()?;
            }
            other
        }
    };
    Ok(next)
}

/// HLT: with interrupts enabled the vCPU waits for its local APIC's next
/// interrupt (the scheduler runs it again once one can be delivered);
/// with them disabled only an INIT from another vCPU can (there is no NMI
/// to send), and a SIPI then restarts it, so it is off. A partition whose
/// vCPUs are all off has halted: none is left to send an INIT.
fn hlt_exit(m: &mut Machine<X86>, v: usize, interrupts_enabled: bool) {
    if interrupts_enabled {
        m.vcpus[v].state = VcpuState::Waiting;
        return;
    }
    m.vcpus[v].state = VcpuState::Off;
    let p = m.vcpus[v].partition;
    if m.partitions[p].vcpus.iter().all(|&k| matches!(m.vcpus[k].state, VcpuState::Off | VcpuState::Stopped)) {
        m.stop_partition(p, PartitionState::Stopped, "halted");
    }
}

/// Leaves a fixed IPI of vCPU `v` with every other vCPU of its partition
/// the destination names (x2APIC ID = vCPU index); IDs no vCPU has match
/// nothing and are dropped. A target on another CPU is kicked.
fn send_ipi(m: &mut Machine<X86>, v: usize, ipi: Ipi) {
    let p = m.vcpus[v].partition;
    let sender = m.vcpus[v].index;
    for k in 0..m.partitions[p].vcpus.len() {
        let target = m.partitions[p].vcpus[k];
        let id = m.vcpus[target].index;
        if id == sender || !ipi.destination.includes(id, sender) {
            continue;
        }
        m.partitions[p].arch.post_vector(id as usize, ipi.vector);
        let pcpu = m.vcpus[target].pcpu;
        if pcpu != m.vcpus[v].pcpu {
            m.arch.kick(pcpu);
        }
    }
}

/// INIT and start-up IPIs of vCPU `v` to the other vCPUs of its partition
/// the destination names (SDM Vol. 3A §9.4.4, §11.6.1). INIT sends a vCPU
/// to wait for a SIPI: off at once (its CPU is kicked, so it leaves the
/// guest), its context reset when a SIPI starts it. A SIPI starts a vCPU
/// that waits for one: runnable, and its own CPU resets it into real mode
/// at VV00:0000 before entering it (`run::prepare_entry`), as PSCI CPU_ON
/// does on aarch64; any other vCPU ignores it. IDs no vCPU has match
/// nothing and are dropped, as fixed IPIs are; other partitions are never
/// looked at.
fn send_startup(m: &mut Machine<X86>, v: usize, ipi: StartupIpi) {
    let p = m.vcpus[v].partition;
    let sender = m.vcpus[v].index;
    for k in 0..m.partitions[p].vcpus.len() {
        let target = m.partitions[p].vcpus[k];
        let id = m.vcpus[target].index;
        if id == sender || !ipi.destination.includes(id, sender) || m.vcpus[target].state == VcpuState::Stopped {
            continue;
        }
        match ipi.kind {
            StartupKind::Init => {
                m.partitions[p].arch.init_vcpu(id);
                m.vcpus[target].state = VcpuState::Off;
            }
            StartupKind::Sipi(vector) => {
                if !m.partitions[p].arch.sipi_vcpu(id, vector) {
                    continue;
                }
                m.vcpus[target].state = VcpuState::Runnable;
            }
        }
        m.post(target, 0);
    }
}

/// CPUID: the processor's answer, through the guest's CPUID policy.
fn cpuid_exit(m: &mut Machine<X86>, v: usize) -> Result<Step, VmcsError> {
    let tsc_khz = u32::try_from(m.arch.tsc_hz / 1000).unwrap_or(u32::MAX);
    let info = GuestCpuidInfo { vcpu_index: m.vcpus[v].index, tsc_khz };
    // SAFETY: `v` exited on this CPU.
    let ctx = unsafe { m.ctx_mut(v) };
    let (leaf, subleaf) = (ctx.regs.get(Gpr::RAX) as u32, ctx.regs.get(Gpr::RCX) as u32);
    let raw = raw_cpuid::cpuid!(leaf, subleaf);
    let host = CpuidRegs { eax: raw.eax, ebx: raw.ebx, ecx: raw.ecx, edx: raw.edx };
    let r = guest_cpuid(leaf, subleaf, host, info);
    for (g, value) in [(Gpr::RAX, r.eax), (Gpr::RBX, r.ebx), (Gpr::RCX, r.ecx), (Gpr::RDX, r.edx)] {
        ctx.regs.set(g, u64::from(value));
    }
    advance_rip()?;
    Ok(Step::Resume)
}

fn hypercall_exit(m: &mut Machine<X86>, v: usize) -> Result<Step, VmcsError> {
    // Hypercalls are for the guest kernel only (TLFS §3.2: #UD at CPL > 0).
    if guest_cpl()? != 0 {
        return inject(vector::UD, None);
    }
    let (control, input, output) = {
        // SAFETY: `v` exited on this CPU.
        let ctx = unsafe { m.ctx_mut(v) };
        (ctx.regs.get(Gpr::RCX), ctx.regs.get(Gpr::RDX), ctx.regs.get(Gpr::R8))
    };
    // SAFETY: RAM is identity-mapped in the hypervisor, and `dispatch`
    // translates every guest address through the caller's GuestRam first.
    let mut memory = unsafe { IdentityMemory::new() };
    let r = m.hypercall(v, control, input, output, &mut memory);
    // SAFETY: as above.
    let ctx = unsafe { m.ctx_mut(v) };
    ctx.regs.set(Gpr::RAX, r.result);
    if let Some(out) = r.fast_output {
        ctx.regs.set(Gpr::R8, out);
    }
    advance_rip()?;
    Ok(match r.next {
        Next::Resume => Step::Resume,
        Next::Reschedule => Step::Reschedule,
        Next::LiveUpdate { image_pa, size } => {
            let cpu = m.vcpus[v].pcpu;
            m.arch.update_request[cpu] = Some((v, image_pa, size));
            Step::Resume
        }
    })
}

fn rdmsr_exit(ctx: &mut Vcpu) -> Result<Step, VmcsError> {
    let index = ctx.regs.get(Gpr::RCX) as u32;
    if lapic::is_apic_msr(index) {
        let value = match ctx.lapic.read(index, tsc::now()) {
            Ok(value) => value,
            Err(e) => return Ok(Step::InjectGp(e)),
        };
        ctx.regs.set(Gpr::RAX, value & 0xffff_ffff);
        ctx.regs.set(Gpr::RDX, value >> 32);
        advance_rip()?;
        return Ok(Step::Resume);
    }
    let msr = match GuestMsr::from_index(index) {
        Ok(msr) => msr,
        Err(e) => return Ok(Step::InjectGp(e)),
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
    Ok(Step::Resume)
}

fn wrmsr_exit(m: &mut Machine<X86>, v: usize) -> Result<Step, VmcsError> {
    // SAFETY: `v` exited on this CPU.
    let ctx = unsafe { m.ctx_mut(v) };
    let index = ctx.regs.get(Gpr::RCX) as u32;
    let value = (ctx.regs.get(Gpr::RDX) << 32) | (ctx.regs.get(Gpr::RAX) & 0xffff_ffff);
    if lapic::is_apic_msr(index) {
        let effect = ctx.lapic.write(index, value, tsc::now());
        // CR8 mirrors the TPR's class (SDM Vol. 3A §11.8.6.1).
        ctx.cr8 = u64::from(ctx.lapic.tpr >> CR8_TPR_SHIFT);
        match effect {
            Ok(WriteEffect::None) => {}
            Ok(WriteEffect::Ipi(ipi)) => send_ipi(m, v, ipi),
            Ok(WriteEffect::Startup(ipi)) => send_startup(m, v, ipi),
            Err(e) => return Ok(Step::InjectGp(e)),
        }
        advance_rip()?;
        return Ok(Step::Resume);
    }
    let msr = match GuestMsr::from_index(index) {
        Ok(msr) => msr,
        Err(e) => return Ok(Step::InjectGp(e)),
    };
    let wctx =
        WriteContext { efer: vmcs::read(guest::IA32_EFER_FULL)?, paging: vmcs::read(guest::CR0)? & cr0::PG != 0 };
    let value = match check_write(msr, value, wctx) {
        Ok(v) => v,
        Err(e) => return Ok(Step::InjectGp(e)),
    };
    match msr.home() {
        // SAFETY: the allow-list checked the value (canonical addresses,
        // no reserved bits); these MSRs only affect SYSCALL and SWAPGS,
        // which the hypervisor does not use, and are switched per vCPU.
        MsrHome::Switched => unsafe { wrmsr(msr.index(), value) },
        MsrHome::Counter => return Ok(Step::InjectGp(GpFault::MsrReadOnly)),
        MsrHome::Vmcs => vmcs::write(msr_field(msr), value)?,
    }
    advance_rip()?;
    Ok(Step::Resume)
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

fn cr_exit(m: &mut Machine<X86>, v: usize, qualification: u64) -> Result<Step, VmcsError> {
    // SAFETY: `v` exited on this CPU.
    let ctx = unsafe { m.ctx_mut(v) };
    let policy = m.arch.cr_policy;
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
                Err(e) => return Ok(Step::InjectGp(e)),
            };
            if write.paging == PagingChange::EnterPae {
                let ram = m.partitions[m.vcpus[v].partition].info.ram;
                let Some(pdptes) = read_pdptes(ram, vmcs::read(guest::CR3)?) else {
                    return Ok(Step::InjectGp(GpFault::InvalidTransition));
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
            Err(e) => return Ok(Step::InjectGp(e)),
        },
        CrAccess::MovToCr { cr: 8, gpr } => {
            let value = reg(ctx, gpr)?;
            if value & CR8_RESERVED != 0 {
                return Ok(Step::InjectGp(GpFault::ReservedBits));
            }
            // CR8 is the TPR's priority class (SDM Vol. 3A §11.8.6.1).
            ctx.cr8 = value;
            ctx.lapic.tpr = (value as u32) << CR8_TPR_SHIFT;
        }
        CrAccess::MovFromCr { cr: 8, gpr } => set_reg(ctx, gpr, u64::from(ctx.lapic.tpr >> CR8_TPR_SHIFT))?,
        other => {
            hv_event!("unexpected-cr-access", access = format_args!("{other:?}"));
            fault(m, v, "unexpected-exit", qualification);
            return Ok(Step::Reschedule);
        }
    }
    advance_rip()?;
    Ok(Step::Resume)
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

/// An access to a guest-physical address with nothing behind it (no RAM,
/// and x86 partitions have no emulated MMIO), completed as on a PC: a read
/// returns all ones, a write is dropped (`policy::emulate`). A fetch from
/// there would read 0xff bytes, an invalid opcode: #UD. An instruction
/// the decoder does not complete stops the partition.
fn unbacked_access(m: &mut Machine<X86>, v: usize, gpa: u64, violation: EptViolation) -> Result<Step, VmcsError> {
    let p = m.vcpus[v].partition;
    let part = &mut m.partitions[p];
    part.arch.unbacked += 1;
    let count = part.arch.unbacked;
    if count.is_power_of_two() {
        let mut line = String::new();
        let rip = vmcs::read(guest::RIP)?;
        let _ = hv_event_to!(
            line,
            "unbacked-access",
            guest = part.info.id,
            access = violation.access(),
            addr = format_args!("{gpa:#x}"),
            rip = format_args!("{rip:#x}"),
            count = count
        );
        m.queue_line(p, String::from(line.trim_end()));
    }
    if violation.fetch {
        return inject(vector::UD, None);
    }
    let ram = m.partitions[p].info.ram;
    let code = CodeSize::of(
        vmcs::read(guest::CR0)? & cr0::PE != 0,
        vmcs::read(guest::IA32_EFER_FULL)? & EFER_LMA != 0,
        vmcs::read(guest::CS_ACCESS_RIGHTS)?,
    );
    let paging = Paging {
        cr0: vmcs::read(guest::CR0)?,
        cr3: vmcs::read(guest::CR3)?,
        cr4: vmcs::read(guest::CR4)?,
        efer: vmcs::read(guest::IA32_EFER_FULL)?,
    };
    let rip = vmcs::read(guest::RIP)?;
    let cs_base = if code == CodeSize::Bits64 { 0 } else { vmcs::read(guest::CS_BASE)? };
    let (bytes, len) = fetch_instruction(ram, &paging, code, cs_base, rip);
    let decoded = match emulate::decode(&bytes[..len], code) {
        Ok(d) => d,
        Err(e) => {
            hv_event!("undecodable-mmio", guest = m.partitions[p].info.id, reason = e.reason(), bytes = len);
            fault(m, v, "undecodable-mmio", gpa);
            return Ok(Step::Reschedule);
        }
    };
    if let Access::Load { dst, size, extend } = decoded.access {
        // SAFETY: `v` exited on this CPU.
        let ctx = unsafe { m.ctx_mut(v) };
        let old = reg(ctx, dst.gpr)?;
        set_reg(ctx, dst.gpr, emulate::apply_load(old, dst, size, extend, u64::MAX))?;
    }
    let next = rip.wrapping_add(decoded.len as u64);
    let next = match code {
        CodeSize::Bits64 => next,
        CodeSize::Bits32 => next & 0xffff_ffff,
        CodeSize::Bits16 => next & 0xffff,
    };
    step_to(next)?;
    Ok(Step::Resume)
}

/// Up to 15 bytes of the instruction at CS:RIP, read through the guest's
/// paging from its RAM; fewer if a page of it does not translate.
fn fetch_instruction(
    ram: GuestRam,
    paging: &Paging,
    code: CodeSize,
    cs_base: u64,
    rip: u64,
) -> ([u8; emulate::MAX_INSTRUCTION], usize) {
    // SAFETY: every address read is translated through this partition's
    // `GuestRam` first, so it is that partition's RAM.
    let memory = unsafe { IdentityMemory::new() };
    let read = |gpa: u64| {
        ram.translate(gpa, 8).map(|pa| {
            let mut b = [0u8; 8];
            memory.read(pa, &mut b);
            u64::from_le_bytes(b)
        })
    };
    let mut bytes = [0u8; emulate::MAX_INSTRUCTION];
    let mut got = 0;
    while got < bytes.len() {
        let mut linear = cs_base.wrapping_add(rip).wrapping_add(got as u64);
        if code != CodeSize::Bits64 {
            linear &= 0xffff_ffff;
        }
        let in_page = (0x1000 - (linear & 0xfff)) as usize;
        let n = in_page.min(bytes.len() - got);
        let Some(pa) = emulate::translate(linear, paging, read).ok().and_then(|gpa| ram.translate(gpa, n as u64))
        else {
            break;
        };
        memory.read(pa, &mut bytes[got..got + n]);
        got += n;
    }
    (bytes, got)
}

/// MOV DR (exits with control 23 so guests never see each other's debug
/// registers; `policy::debug` decides). DR0-DR3 and DR6 are this vCPU's
/// own, in its context and in the processor while it is loaded; DR7 lives
/// in the VMCS.
fn dr_exit(ctx: &mut Vcpu, qualification: u64) -> Result<Step, VmcsError> {
    let a = DrAccess::decode(qualification);
    let dr7 = vmcs::read(guest::DR7)?;
    let cr4_de = vmcs::read(guest::CR4)? & cr4::DE != 0;
    let target = match debug::decide(a.dr, cr4_de, dr7) {
        DrDecision::Access(reg) => reg,
        DrDecision::Undefined => return inject(vector::UD, None),
        DrDecision::GeneralDetect => {
            let (dr6, dr7) = debug::general_detect(vcpu::read_dr6(), dr7);
            vcpu::write_debug_register(6, dr6);
            vmcs::write(guest::DR7, dr7)?;
            return inject(vector::DB, None);
        }
    };
    if a.read {
        let value = match target {
            DebugReg::Address(n) => ctx.dr[n],
            DebugReg::Status => vcpu::read_dr6(),
            DebugReg::Control => dr7,
        };
        set_reg(ctx, a.gpr, value)?;
    } else {
        let value = match debug::write_value(target, reg(ctx, a.gpr)?) {
            Ok(value) => value,
            Err(gp) => return Ok(Step::InjectGp(gp)),
        };
        match target {
            DebugReg::Address(n) => {
                ctx.dr[n] = value;
                vcpu::write_debug_register(n, value);
            }
            DebugReg::Status => vcpu::write_debug_register(6, value),
            DebugReg::Control => vmcs::write(guest::DR7, value)?,
        }
    }
    advance_rip()?;
    Ok(Step::Resume)
}

/// Port I/O: COM1 is a transmit-only 16550 feeding the partition's
/// console; other ports read as all ones and ignore writes (nothing is
/// there). String I/O is not emulated.
fn io_exit(m: &mut Machine<X86>, v: usize, qualification: u64) -> Result<Step, VmcsError> {
    let io = IoAccess::decode(qualification);
    if io.string {
        hv_event!("unsupported-io", port = format_args!("{:#x}", io.port), rep = u8::from(io.rep));
        fault(m, v, "unsupported-io", u64::from(io.port));
        return Ok(Step::Reschedule);
    }
    let p = m.vcpus[v].partition;
    // SAFETY: `v` exited on this CPU.
    let ctx = unsafe { m.ctx_mut(v) };
    let width_mask = (1u64 << (u32::from(io.size) * 8)) - 1;
    let dlab = m.partitions[p].arch.uart_lcr & UART_LCR_DLAB != 0;
    if io.input {
        let value = match io.port {
            UART_LSR => UART_LSR_IDLE,
            UART_LCR => u64::from(m.partitions[p].arch.uart_lcr),
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
            UART_THR if !dlab => m.console_bytes(p, &[byte]),
            UART_LCR => m.partitions[p].arch.uart_lcr = byte,
            _ => {}
        }
    }
    advance_rip()?;
    Ok(Step::Resume)
}
