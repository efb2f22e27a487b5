//! Guest exits on x86_64, under VT-x or SVM: each backend decodes its
//! exit (the VMX exit reason and qualification, Intel SDM Vol. 3C ch. 28
//! and Appendix C; the SVM exit code and EXITINFO, AMD64 APM Vol. 2
//! §15.7-15.13 and Appendix C) into one [`GuestExit`], and one set of
//! handlers acts on it through the vCPU's [`Guest`] state: a call on the
//! machine (hypercall, HLT), or the arch's own guest policy (CPUID, the
//! MSR allow-list, the local APIC's MSRs, control and debug registers,
//! COM1 port I/O, exceptions to inject); anything else is a fault that
//! stops the partition.

use alloc::string::String;
use core::fmt::Write as _;

use hvcall::PartitionState;
use hypervisor::arch::x86_64::cpuid::{guest_cpuid, CpuidRegs, GuestCpuidInfo};
use hypervisor::arch::x86_64::cr::{cr0, cr4, CrContext, PagingChange};
use hypervisor::arch::x86_64::debug::{self, DebugReg, DrDecision};
use hypervisor::arch::x86_64::emulate::{self, Access, CodeSize, Paging};
use hypervisor::arch::x86_64::lapic::{self, Ipi, StartupIpi, StartupKind, WriteEffect};
use hypervisor::arch::x86_64::msr::{check_write, GuestMsr, MsrHome, WriteContext, EFER_LMA};
use hypervisor::arch::x86_64::svm_exit::{self, MovCrDr};
use hypervisor::arch::x86_64::vmcb::{control as svm_control, instruction_len, SvmExit};
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
use x86::vmx::vmcs::{control, guest, ro};

use super::guest::{Field, Guest, Vmcb};
use super::platform::{NestedTable, X86};
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

/// A guest exit, whichever backend took it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// VMCALL (VMX; under SVM its #UD), or SVM's VMMCALL.
    Hypercall,
    Cpuid,
    Rdmsr,
    Wrmsr,
    Cr(CrAccess),
    Dr(DrAccess),
    Io(IoAccess),
    Hlt,
    Invd,
    /// The guest can take the interrupt its APIC holds.
    InterruptWindow,
    /// A physical interrupt (a kick); `acknowledged` when VMX took it
    /// from the APIC at exit, which then wants its EOI.
    ExternalInterrupt {
        acknowledged: bool,
    },
    /// The slice's timer (VMX's preemption timer; under SVM every
    /// physical interrupt, the host's slice timer or a kick, exits so).
    SliceTimer,
    NestedFault {
        gpa: u64,
        violation: EptViolation,
    },
    NestedMisconfig {
        gpa: u64,
    },
    TripleFault,
    Nmi,
    Rdpmc,
    /// An instruction the guest's CPUID does not offer: #UD.
    Undefined,
    /// The entry itself failed.
    EntryFailed {
        reason: &'static str,
        qualification: u64,
    },
    Unexpected {
        reason: &'static str,
        number: u64,
        qualification: u64,
    },
}

/// The state handle of vCPU `v`, which just exited on this CPU.
pub fn guest_of(m: &mut Machine<X86>, v: usize) -> Guest {
    if m.arch.is_svm() {
        // SAFETY: `v` exited on this CPU, to which it is pinned; its
        // control page is its VMCB under SVM.
        Guest::Svm(unsafe { Vmcb::new(m.ctx_mut(v).vmcs) })
    } else {
        Guest::Vmx
    }
}

/// Stops the partition of `v` for a fault, naming the guest's RIP.
pub fn fault(m: &mut Machine<X86>, v: usize, kind: &str, addr: u64) {
    let rip = guest_of(m, v).get(Field::Rip).unwrap_or(0);
    m.fault(v, kind, addr, ("rip", rip));
}

/// What to do after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Resume,
    Reschedule,
    /// Resume with a #GP(0) injected, for this reason.
    InjectGp(GpFault),
}

/// Skips the instruction that exited (`len` bytes), ending STI/MOV SS
/// blocking as the processor would (§25.4.2).
fn advance_rip(g: Guest, len: u64) -> Result<(), VmcsError> {
    let rip = g.get(Field::Rip)?;
    step_to(g, rip.wrapping_add(len))
}

/// Resumes the guest at `next`, past the instruction that exited.
fn step_to(g: Guest, next: u64) -> Result<(), VmcsError> {
    g.set(Field::Rip, next)?;
    let blocking = g.get(Field::Interruptibility)?;
    if blocking & BLOCKING_STI_MOVSS != 0 {
        g.set(Field::Interruptibility, blocking & !BLOCKING_STI_MOVSS)?;
    }
    Ok(())
}

/// Injects a hardware exception at the next entry (§27.6.1, APM
/// §15.20); the instruction is not skipped (faults re-execute). An error
/// code is delivered only in protected mode (§27.2.1.3).
fn inject(g: Guest, vector: u8, error_code: Option<u32>) -> Result<Step, VmcsError> {
    let protected = g.get(Field::Cr0)? & cr0::PE != 0;
    let with_code = error_code.is_some() && protected;
    g.inject_event(inject_exception(vector, with_code), u64::from(error_code.unwrap_or(0)), 0)?;
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

/// A register by instruction-encoding number; RSP lives in the VMCS or
/// VMCB.
fn reg(g: Guest, ctx: &Vcpu, r: Gpr) -> Result<u64, VmcsError> {
    if r == Gpr::RSP {
        g.get(Field::Rsp)
    } else {
        Ok(ctx.regs.get(r))
    }
}

fn set_reg(g: Guest, ctx: &mut Vcpu, r: Gpr, value: u64) -> Result<(), VmcsError> {
    if r == Gpr::RSP {
        g.set(Field::Rsp, value)
    } else {
        ctx.regs.set(r, value);
        Ok(())
    }
}

/// The guest's current privilege level: SS.DPL (SDM Vol. 3A §5.5).
fn guest_cpl(g: Guest) -> Result<u64, VmcsError> {
    Ok((g.get(Field::SsRights)? >> AR_DPL_SHIFT) & AR_DPL_MASK)
}

/// A control register as the guest sees it: its own bits, and the read
/// shadow for the bits the hypervisor owns.
fn guest_view(g: Guest, field: Field, shadow: Field, mask: u64) -> Result<u64, VmcsError> {
    Ok((g.get(field)? & !mask) | (g.get(shadow)? & mask))
}

/// Keeps VMX's "IA-32e mode guest" entry control equal to IA32_EFER.LMA,
/// which a guest changes natively when it enables paging (§27.3.1.1).
/// SVM has no such control: VMRUN takes LMA from the guest's EFER.
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

/// Decodes a VMX exit of the current VMCS, with the length of the
/// instruction that caused it.
fn decode_vmx() -> Result<(GuestExit, u64), VmcsError> {
    let exit = Exit::decode(vmcs::read32(ro::EXIT_REASON)?);
    let qualification = vmcs::read(ro::EXIT_QUALIFICATION)?;
    let len = vmcs::read(ro::VMEXIT_INSTRUCTION_LEN)?;
    if exit.entry_failure {
        return Ok((GuestExit::EntryFailed { reason: exit.reason.name(), qualification }, 0));
    }
    sync_ia32e_mode()?;
    let interruption = || -> Result<Option<Interruption>, VmcsError> {
        Ok(Interruption::decode(vmcs::read32(ro::VMEXIT_INTERRUPTION_INFO)?))
    };
    let decoded = match exit.reason {
        ExitReason::Vmcall => GuestExit::Hypercall,
        ExitReason::Cpuid => GuestExit::Cpuid,
        ExitReason::Rdmsr => GuestExit::Rdmsr,
        ExitReason::Wrmsr => GuestExit::Wrmsr,
        ExitReason::CrAccess => GuestExit::Cr(CrAccess::decode(qualification)),
        ExitReason::DrAccess => GuestExit::Dr(DrAccess::decode(qualification)),
        ExitReason::IoInstruction => GuestExit::Io(IoAccess::decode(qualification)),
        ExitReason::Hlt => GuestExit::Hlt,
        ExitReason::InterruptWindow => GuestExit::InterruptWindow,
        // Acknowledged on exit (exit control 15): its in-service bit is
        // set at the local APIC.
        ExitReason::ExternalInterrupt => GuestExit::ExternalInterrupt { acknowledged: interruption()?.is_some() },
        ExitReason::PreemptionTimer => GuestExit::SliceTimer,
        ExitReason::EptViolation => GuestExit::NestedFault {
            gpa: vmcs::read(ro::GUEST_PHYSICAL_ADDR_FULL)?,
            violation: EptViolation::decode(qualification),
        },
        ExitReason::EptMisconfig => GuestExit::NestedMisconfig { gpa: vmcs::read(ro::GUEST_PHYSICAL_ADDR_FULL)? },
        ExitReason::TripleFault => GuestExit::TripleFault,
        ExitReason::ExceptionOrNmi if interruption()?.is_some_and(|i| i.kind == InterruptionType::Nmi) => {
            GuestExit::Nmi
        }
        ExitReason::Invd => GuestExit::Invd,
        ExitReason::Rdpmc => GuestExit::Rdpmc,
        // No nested VMX, no SMX, no MONITOR/MWAIT, no XSAVE: the guest's
        // CPUID hides them, so they are invalid opcodes.
        r if r.is_vmx_instruction()
            || matches!(r, ExitReason::Getsec | ExitReason::Mwait | ExitReason::Monitor | ExitReason::Xsetbv) =>
        {
            GuestExit::Undefined
        }
        other => GuestExit::Unexpected { reason: other.name(), number: u64::from(other.number()), qualification },
    };
    Ok((decoded, len))
}

/// Decodes an SVM exit of `vmcb` (of a vCPU of the partition with
/// `nested` as its table),
/// with the length of the instruction that caused it: there is no
/// NRIP_SAVE under TCG, so lengths are known ([`instruction_len`]), read
/// from EXITINFO2 (IN/OUT: the next RIP), or decoded from the guest's
/// bytes (MOV CR/DR, and VMCALL's #UD), since there are no decode assists
/// either.
fn decode_svm(vmcb: Vmcb, nested: &NestedTable) -> Result<(GuestExit, u64), VmcsError> {
    let g = Guest::Svm(vmcb);
    let code = vmcb.get(svm_control::EXITCODE);
    let (info1, info2) = (vmcb.get(svm_control::EXITINFO1), vmcb.get(svm_control::EXITINFO2));
    let exit = SvmExit::decode(code);
    let len = instruction_len(exit).unwrap_or(0);
    let instruction = || -> Result<([u8; emulate::MAX_INSTRUCTION], usize), VmcsError> {
        let (paging, code_size, cs_base, rip) = code_context(g)?;
        Ok(fetch_instruction(nested, &paging, code_size, cs_base, rip))
    };
    let decoded = match exit {
        SvmExit::Vmmcall => GuestExit::Hypercall,
        SvmExit::Cpuid => GuestExit::Cpuid,
        SvmExit::Msr if info1 == 0 => GuestExit::Rdmsr,
        SvmExit::Msr => GuestExit::Wrmsr,
        SvmExit::Hlt => GuestExit::Hlt,
        SvmExit::Invd => GuestExit::Invd,
        SvmExit::Ioio => {
            let next = info2.wrapping_sub(g.get(Field::Rip)?);
            return Ok((GuestExit::Io(svm_exit::io_access(info1)), next));
        }
        SvmExit::CrRead(_) | SvmExit::CrWrite(_) | SvmExit::DrRead(_) | SvmExit::DrWrite(_) => {
            let (bytes, got) = instruction()?;
            let code_size = code_context(g)?.1;
            return Ok(match svm_exit::decode_mov_cr_dr(&bytes[..got], code_size) {
                Ok((MovCrDr::Cr(access), len)) => (GuestExit::Cr(access), len),
                Ok((MovCrDr::Dr(access), len)) => (GuestExit::Dr(access), len),
                Err(e) => (GuestExit::Unexpected { reason: e.reason(), number: code, qualification: got as u64 }, 0),
            });
        }
        SvmExit::Exception(vector::UD) => {
            let (bytes, got) = instruction()?;
            if svm_exit::is_vmcall(&bytes[..got]) {
                return Ok((GuestExit::Hypercall, svm_exit::VMCALL_LEN));
            }
            GuestExit::Undefined
        }
        SvmExit::Intr => GuestExit::SliceTimer,
        SvmExit::Vintr => GuestExit::InterruptWindow,
        SvmExit::Nmi => GuestExit::Nmi,
        SvmExit::Shutdown => GuestExit::TripleFault,
        SvmExit::Npf if svm_exit::npf_reserved(info1) => GuestExit::NestedMisconfig { gpa: info2 },
        SvmExit::Npf => GuestExit::NestedFault { gpa: info2, violation: svm_exit::npf_access(info1) },
        SvmExit::Rdpmc => GuestExit::Rdpmc,
        SvmExit::Hidden(_) | SvmExit::Vmrun => GuestExit::Undefined,
        SvmExit::Invalid => GuestExit::EntryFailed { reason: "vmexit-invalid", qualification: code },
        other => GuestExit::Unexpected { reason: other.name(), number: code, qualification: info1 },
    };
    Ok((decoded, len))
}

/// Handles the exit of vCPU `v`, which this CPU just ran.
pub fn handle_exit(m: &mut Machine<X86>, v: usize) -> Result<Step, VmcsError> {
    let g = guest_of(m, v);
    let (exit, len) = match g {
        Guest::Vmx => decode_vmx()?,
        Guest::Svm(vmcb) => {
            // SAFETY: `v` exited on this CPU. CR8 writes went to V_TPR
            // (V_INTR_MASKING): the APIC's TPR follows them.
            let ctx = unsafe { m.ctx_mut(v) };
            if let Some(class) = g.v_tpr() {
                if class != ctx.cr8 {
                    ctx.cr8 = class;
                    ctx.lapic.tpr = (class as u32) << CR8_TPR_SHIFT;
                }
            }
            decode_svm(vmcb, &m.partitions[m.vcpus[v].partition].arch.nested)?
        }
    };
    let next = act(m, v, g, exit, len)?;
    let next = match next {
        Step::InjectGp(reason) => {
            note_gp(m, v, reason);
            inject(g, vector::GP, Some(0))?
        }
        other => {
            if other == Step::Resume {
                g.reinject_interrupted_event()?;
            }
            other
        }
    };
    Ok(next)
}

/// Acts on a decoded exit of vCPU `v` (state `g`; the exiting
/// instruction `len` bytes long).
fn act(m: &mut Machine<X86>, v: usize, g: Guest, exit: GuestExit, len: u64) -> Result<Step, VmcsError> {
    // SAFETY: `v` is the vCPU that just exited on this CPU.
    let ctx = unsafe { m.ctx_mut(v) };
    Ok(match exit {
        GuestExit::EntryFailed { reason, qualification } => {
            hv_event!("vm-entry-failed", vcpu = v, reason = reason, qualification = qualification);
            fault(m, v, "vm-entry-failed", qualification);
            Step::Reschedule
        }
        GuestExit::Hypercall => hypercall_exit(m, v, g, len)?,
        GuestExit::Cpuid => cpuid_exit(m, v, g, len)?,
        GuestExit::Rdmsr => rdmsr_exit(ctx, g, len)?,
        GuestExit::Wrmsr => wrmsr_exit(m, v, g, len)?,
        GuestExit::Cr(access) => cr_exit(m, v, g, access, len)?,
        GuestExit::Dr(access) => dr_exit(ctx, g, access, len)?,
        GuestExit::Io(io) => io_exit(m, v, g, io, len)?,
        GuestExit::Hlt => {
            advance_rip(g, len)?;
            hlt_exit(m, v, g.get(Field::Rflags)? & RFLAGS_IF != 0);
            Step::Reschedule
        }
        // The guest can take the interrupt its APIC holds: the next entry
        // injects it (and clears the window exiting). NMIs exit (VMX
        // pin-based control 3, the SVM NMI intercept) and are not the
        // guest's.
        GuestExit::InterruptWindow | GuestExit::Nmi => Step::Resume,
        GuestExit::ExternalInterrupt { acknowledged } => {
            if acknowledged {
                smp::apic_eoi();
            }
            Step::Resume
        }
        // The slice ended, or a local APIC timer of this CPU is due.
        GuestExit::SliceTimer => {
            if tsc::now() >= m.arch.slice_end[m.vcpus[v].pcpu] {
                Step::Reschedule
            } else {
                Step::Resume
            }
        }
        GuestExit::NestedFault { gpa, violation } => {
            let p = m.vcpus[v].partition;
            if m.partitions[p].info.ram.contains_gpa(gpa) {
                // RAM is mapped with every permission: a fault there means
                // the tables are not what the hypervisor built.
                hv_event!("ept-violation", guest = m.partitions[p].info.id, access = violation.access());
                fault(m, v, "ept", gpa);
                Step::Reschedule
            } else {
                unbacked_access(m, v, g, gpa, violation)?
            }
        }
        GuestExit::NestedMisconfig { gpa } => {
            fault(m, v, "ept-misconfig", gpa);
            Step::Reschedule
        }
        GuestExit::TripleFault => {
            fault(m, v, "triple-fault", g.get(Field::Rip)?);
            Step::Reschedule
        }
        GuestExit::Invd => {
            // Write-back caches are coherent; dropping them would only lose
            // data. Completing INVD as a no-op is what WBINVD would leave.
            advance_rip(g, len)?;
            Step::Resume
        }
        GuestExit::Rdpmc => Step::InjectGp(GpFault::HiddenFeature),
        GuestExit::Undefined => inject(g, vector::UD, None)?,
        GuestExit::Unexpected { reason, number, qualification } => {
            hv_event!(
                "unexpected-exit",
                guest = m.partitions[m.vcpus[v].partition].info.id,
                reason = reason,
                number = number,
                qualification = format_args!("{qualification:#x}"),
            );
            fault(m, v, "unexpected-exit", qualification);
            Step::Reschedule
        }
    })
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
fn cpuid_exit(m: &mut Machine<X86>, v: usize, g: Guest, len: u64) -> Result<Step, VmcsError> {
    let tsc_khz = u32::try_from(m.arch.tsc_hz / 1000).unwrap_or(u32::MAX);
    let info = GuestCpuidInfo { vcpu_index: m.vcpus[v].index, tsc_khz };
    // SAFETY: `v` exited on this CPU.
    let ctx = unsafe { m.ctx_mut(v) };
    let (leaf, subleaf) = (ctx.regs.get(Gpr::RAX) as u32, ctx.regs.get(Gpr::RCX) as u32);
    let raw = raw_cpuid::cpuid!(leaf, subleaf);
    let host = CpuidRegs { eax: raw.eax, ebx: raw.ebx, ecx: raw.ecx, edx: raw.edx };
    let r = guest_cpuid(leaf, subleaf, host, info);
    for (reg, value) in [(Gpr::RAX, r.eax), (Gpr::RBX, r.ebx), (Gpr::RCX, r.ecx), (Gpr::RDX, r.edx)] {
        ctx.regs.set(reg, u64::from(value));
    }
    advance_rip(g, len)?;
    Ok(Step::Resume)
}

fn hypercall_exit(m: &mut Machine<X86>, v: usize, g: Guest, len: u64) -> Result<Step, VmcsError> {
    // Hypercalls are for the guest kernel only (TLFS §3.2: #UD at CPL > 0).
    if guest_cpl(g)? != 0 {
        return inject(g, vector::UD, None);
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
    advance_rip(g, len)?;
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

fn rdmsr_exit(ctx: &mut Vcpu, g: Guest, len: u64) -> Result<Step, VmcsError> {
    let index = ctx.regs.get(Gpr::RCX) as u32;
    let value = if lapic::is_apic_msr(index) {
        match ctx.lapic.read(index, tsc::now()) {
            Ok(value) => value,
            Err(e) => return Ok(Step::InjectGp(e)),
        }
    } else {
        let msr = match GuestMsr::from_index(index) {
            Ok(msr) => msr,
            Err(e) => return Ok(Step::InjectGp(e)),
        };
        match msr.home() {
            MsrHome::Counter => tsc::now(),
            MsrHome::Switched | MsrHome::Vmcs => g.msr(msr)?,
        }
    };
    ctx.regs.set(Gpr::RAX, value & 0xffff_ffff);
    ctx.regs.set(Gpr::RDX, value >> 32);
    advance_rip(g, len)?;
    Ok(Step::Resume)
}

fn wrmsr_exit(m: &mut Machine<X86>, v: usize, g: Guest, len: u64) -> Result<Step, VmcsError> {
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
        advance_rip(g, len)?;
        return Ok(Step::Resume);
    }
    let msr = match GuestMsr::from_index(index) {
        Ok(msr) => msr,
        Err(e) => return Ok(Step::InjectGp(e)),
    };
    let wctx = WriteContext { efer: g.get(Field::Efer)?, paging: g.get(Field::Cr0)? & cr0::PG != 0 };
    let value = match check_write(msr, value, wctx) {
        Ok(v) => v,
        Err(e) => return Ok(Step::InjectGp(e)),
    };
    match msr.home() {
        MsrHome::Counter => return Ok(Step::InjectGp(GpFault::MsrReadOnly)),
        MsrHome::Switched | MsrHome::Vmcs => g.set_msr(msr, value)?,
    }
    advance_rip(g, len)?;
    Ok(Step::Resume)
}

fn cr_exit(m: &mut Machine<X86>, v: usize, g: Guest, access: CrAccess, len: u64) -> Result<Step, VmcsError> {
    // SAFETY: `v` exited on this CPU.
    let ctx = unsafe { m.ctx_mut(v) };
    let policy = m.arch.cr_policy;
    let state = || -> Result<CrContext, VmcsError> {
        Ok(CrContext {
            cr0: guest_view(g, Field::Cr0, Field::Cr0Shadow, policy.cr0_mask())?,
            cr4: guest_view(g, Field::Cr4, Field::Cr4Shadow, policy.cr4_mask())?,
            efer: g.get(Field::Efer)?,
            cs_long: g.get(Field::CsRights)? & AR_LONG != 0,
        })
    };
    match access {
        CrAccess::MovToCr { cr: 0, gpr } => {
            let write = match policy.write_cr0(reg(g, ctx, gpr)?, state()?) {
                Ok(w) => w,
                Err(e) => return Ok(Step::InjectGp(e)),
            };
            // VM entry takes PAE PDPTEs from the VMCS (§27.3.2.4); SVM's
            // nested paging reads them from the guest's memory itself.
            if write.paging == PagingChange::EnterPae && !g.is_svm() {
                let ram = m.partitions[m.vcpus[v].partition].info.ram;
                let Some(pdptes) = read_pdptes(ram, g.get(Field::Cr3)?) else {
                    return Ok(Step::InjectGp(GpFault::InvalidTransition));
                };
                for (field, value) in GUEST_PDPTES.into_iter().zip(pdptes) {
                    vmcs::write(field, value)?;
                }
            }
            g.set(Field::Cr0, write.value.real)?;
            g.set(Field::Cr0Shadow, write.value.shadow)?;
            g.set(Field::Efer, write.efer)?;
            if !g.is_svm() {
                sync_ia32e_mode()?;
            }
        }
        CrAccess::MovToCr { cr: 4, gpr } => match policy.write_cr4(reg(g, ctx, gpr)?, state()?) {
            Ok(value) => {
                g.set(Field::Cr4, value.real)?;
                g.set(Field::Cr4Shadow, value.shadow)?;
            }
            Err(e) => return Ok(Step::InjectGp(e)),
        },
        CrAccess::MovToCr { cr: 8, gpr } => {
            let value = reg(g, ctx, gpr)?;
            if value & CR8_RESERVED != 0 {
                return Ok(Step::InjectGp(GpFault::ReservedBits));
            }
            // CR8 is the TPR's priority class (SDM Vol. 3A §11.8.6.1).
            ctx.cr8 = value;
            ctx.lapic.tpr = (value as u32) << CR8_TPR_SHIFT;
        }
        CrAccess::MovFromCr { cr: 8, gpr } => set_reg(g, ctx, gpr, u64::from(ctx.lapic.tpr >> CR8_TPR_SHIFT))?,
        other => {
            hv_event!("unexpected-cr-access", access = format_args!("{other:?}"));
            fault(m, v, "unexpected-exit", 0);
            return Ok(Step::Reschedule);
        }
    }
    advance_rip(g, len)?;
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

/// What locating the guest's current instruction needs: its paging, code
/// size, CS base (0 in 64-bit mode) and RIP.
fn code_context(g: Guest) -> Result<(Paging, CodeSize, u64, u64), VmcsError> {
    let (cr0v, efer) = (g.get(Field::Cr0)?, g.get(Field::Efer)?);
    let code = CodeSize::of(cr0v & cr0::PE != 0, efer & EFER_LMA != 0, g.get(Field::CsRights)?);
    let paging = Paging { cr0: cr0v, cr3: g.get(Field::Cr3)?, cr4: g.get(Field::Cr4)?, efer };
    let cs_base = if code == CodeSize::Bits64 { 0 } else { g.get(Field::CsBase)? };
    Ok((paging, code, cs_base, g.get(Field::Rip)?))
}

/// An access to a guest-physical address with nothing behind it (no RAM,
/// and x86 partitions have no emulated MMIO), completed as on a PC: a read
/// returns all ones, a write is dropped (`policy::emulate`). A fetch from
/// there would read 0xff bytes, an invalid opcode: #UD. An instruction
/// the decoder does not complete stops the partition.
fn unbacked_access(
    m: &mut Machine<X86>,
    v: usize,
    state: Guest,
    gpa: u64,
    violation: EptViolation,
) -> Result<Step, VmcsError> {
    let p = m.vcpus[v].partition;
    let part = &mut m.partitions[p];
    part.arch.unbacked += 1;
    let count = part.arch.unbacked;
    if count.is_power_of_two() {
        let mut line = String::new();
        let rip = state.get(Field::Rip)?;
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
        return inject(state, vector::UD, None);
    }
    let (paging, code, cs_base, rip) = code_context(state)?;
    let (bytes, len) = fetch_instruction(&m.partitions[p].arch.nested, &paging, code, cs_base, rip);
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
        let old = reg(state, ctx, dst.gpr)?;
        set_reg(state, ctx, dst.gpr, emulate::apply_load(old, dst, size, extend, u64::MAX))?;
    }
    let next = rip.wrapping_add(decoded.len as u64);
    let next = match code {
        CodeSize::Bits64 => next,
        CodeSize::Bits32 => next & 0xffff_ffff,
        CodeSize::Bits16 => next & 0xffff,
    };
    step_to(state, next)?;
    Ok(Step::Resume)
}

/// Up to 15 bytes of the instruction at CS:RIP, read through the guest's
/// paging from its memory (what its nested table maps: RAM, and the
/// conventional memory a real-mode vCPU runs in); fewer if a page of it
/// does not translate.
fn fetch_instruction(
    nested: &NestedTable,
    paging: &Paging,
    code: CodeSize,
    cs_base: u64,
    rip: u64,
) -> ([u8; emulate::MAX_INSTRUCTION], usize) {
    // SAFETY: every address read is translated through this partition's
    // nested table first, which maps only that partition's RAM.
    let memory = unsafe { IdentityMemory::new() };
    let read = |gpa: u64| {
        nested.translate(gpa, 8).map(|pa| {
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
        let Some(pa) = emulate::translate(linear, paging, read).ok().and_then(|gpa| nested.translate(gpa, n as u64))
        else {
            break;
        };
        memory.read(pa, &mut bytes[got..got + n]);
        got += n;
    }
    (bytes, got)
}

/// MOV DR (exits with VMX control 23, or every SVM DR intercept, so
/// guests never see each other's debug registers; `policy::debug`
/// decides). DR0-DR3 are this vCPU's own, in its context and in the
/// processor while it is loaded; DR6 and DR7 live with the backend
/// ([`Guest::dr6`]; DR7 in the VMCS or VMCB).
fn dr_exit(ctx: &mut Vcpu, g: Guest, a: DrAccess, len: u64) -> Result<Step, VmcsError> {
    let dr7 = g.get(Field::Dr7)?;
    let cr4_de = g.get(Field::Cr4)? & cr4::DE != 0;
    let target = match debug::decide(a.dr, cr4_de, dr7) {
        DrDecision::Access(reg) => reg,
        DrDecision::Undefined => return inject(g, vector::UD, None),
        DrDecision::GeneralDetect => {
            let (dr6, dr7) = debug::general_detect(g.dr6(), dr7);
            g.set_dr6(dr6);
            g.set(Field::Dr7, dr7)?;
            return inject(g, vector::DB, None);
        }
    };
    if a.read {
        let value = match target {
            DebugReg::Address(n) => ctx.dr[n],
            DebugReg::Status => g.dr6(),
            DebugReg::Control => dr7,
        };
        set_reg(g, ctx, a.gpr, value)?;
    } else {
        let value = match debug::write_value(target, reg(g, ctx, a.gpr)?) {
            Ok(value) => value,
            Err(gp) => return Ok(Step::InjectGp(gp)),
        };
        match target {
            DebugReg::Address(n) => {
                ctx.dr[n] = value;
                vcpu::write_debug_register(n, value);
            }
            DebugReg::Status => g.set_dr6(value),
            DebugReg::Control => g.set(Field::Dr7, value)?,
        }
    }
    advance_rip(g, len)?;
    Ok(Step::Resume)
}

/// Port I/O: COM1 is a transmit-only 16550 feeding the partition's
/// console; other ports read as all ones and ignore writes (nothing is
/// there). String I/O is not emulated.
fn io_exit(m: &mut Machine<X86>, v: usize, g: Guest, io: IoAccess, len: u64) -> Result<Step, VmcsError> {
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
    advance_rip(g, len)?;
    Ok(Step::Resume)
}
