//! Trap decoding on aarch64: a guest's synchronous exception at EL2
//! (ESR_EL2, Arm ARM D19.2.40) becomes a call on the machine (hypercall,
//! PSCI, WFI, SGI) or an emulated access (the PL011 console, the GIC
//! frames), and anything else is a fault that stops the partition.

use core::arch::asm;
use core::fmt::Write as _;

use hvcall::{PartitionState, SMCCC_VENDOR_HYP_CALL};
use hypervisor::arch::aarch64::pl011::Effect;
use hypervisor::arch::aarch64::traps::{self, SysregClass};
use hypervisor::arch::aarch64::{id_regs, ptimer, vgic};
use hypervisor::guest_dtb::{GUEST_GICD, GUEST_GICR, GUEST_UART, GUEST_UART_SIZE, GUEST_UART_SPI};
use hypervisor::hypercall::IdentityMemory;
use hypervisor::machine::{Machine, Next};
use hypervisor::sched::VcpuState;

use super::partitions::reset_partition;
use super::platform::Aarch64;
use super::vcpu::Vcpu;

/// ESR_EL2.EC exception classes (Arm ARM D19.2.40, ESR_EL2).
const EC_WFX: u64 = 0x01;
const EC_PAUTH: u64 = 0x09;
const EC_SVE: u64 = 0x19;
const EC_HVC64: u64 = 0x16;
const EC_SMC64: u64 = 0x17;
const EC_SYSREG: u64 = 0x18;
const EC_IABT_LOWER: u64 = 0x20;
const EC_DABT_LOWER: u64 = 0x24;
/// ISS of a trapped MSR/MRS (D19.2.40): Op0, Op2, Op1, CRn, Rt, CRm, Dir.
const SYSREG_MASK: u64 = 0x3f_fc1e;
/// ICC_SGI1R_EL1 = S3_0_C12_C11_5 in that encoding.
const SYSREG_ICC_SGI1R: u64 = (3 << 20) | (5 << 17) | (12 << 10) | (11 << 1);
/// Data abort ISS: ISV (24), SAS (23:22), SRT (20:16), WnR (6).
const DABT_ISV: u64 = 1 << 24;
const DABT_WNR: u64 = 1 << 6;
/// ISS CM (bit 8): the data abort came from a cache maintenance or
/// address translation instruction (D19.2.40).
const DABT_CM: u64 = 1 << 8;
/// PSCI function ids (DEN0022E §5.1) and return codes (§5.2.2).
const PSCI_VERSION: u64 = 0x8400_0000;
const PSCI_CPU_OFF: u64 = 0x8400_0002;
const PSCI_CPU_ON_32: u64 = 0x8400_0003;
const PSCI_CPU_ON_64: u64 = 0xc400_0003;
const PSCI_AFFINITY_INFO_32: u64 = 0x8400_0004;
const PSCI_AFFINITY_INFO_64: u64 = 0xc400_0004;
const PSCI_SYSTEM_OFF: u64 = 0x8400_0008;
const PSCI_SYSTEM_RESET: u64 = 0x8400_0009;
const PSCI_FEATURES: u64 = 0x8400_000a;
const PSCI_1_1: i64 = 0x1_0001;
const PSCI_NOT_SUPPORTED: i64 = -1;
const PSCI_INVALID_PARAMETERS: i64 = -2;
const PSCI_ALREADY_ON: i64 = -4;
/// Data abort ISS: SAS [23:22], the access size as a power of two bytes.
const DABT_SAS_SHIFT: u32 = 22;
/// ESR_EL1 for an UNDEFINED instruction (D19.2.40): EC 0 (unknown
/// reason), IL (32-bit instruction).
const ESR_UNKNOWN_IL: u64 = 1 << 25;
const ESR_IL: u64 = 1 << 25;
const ESR_EC_SHIFT: u32 = 26;
/// The abort classes for an exception taken from the same EL (EL1):
/// one above the "lower EL" ones (0x20 -> 0x21, 0x24 -> 0x25).
const EC_SAME_EL_OFFSET: u64 = 1;
/// DFSC/IFSC 0b010000: synchronous external abort, not on a table walk
/// (D19.2.40, ISS encoding for an exception from a data abort).
const FSC_SYNC_EXTERNAL: u64 = 0b01_0000;
/// Aborts at one instruction in a row (no other synchronous exit of the
/// vCPU between them) after which the guest is stopped: its handler
/// returns to the access instead of handling it.
const ABORT_LOOP_LIMIT: u32 = 64;
/// Exception vector offsets from VBAR_EL1 (D1.10.2): current EL with
/// SP_EL0, current EL with SP_ELx, lower EL in AArch64.
const VECTOR_CURRENT_SP0: u64 = 0x000;
const VECTOR_CURRENT_SPX: u64 = 0x200;
const VECTOR_LOWER_A64: u64 = 0x400;
/// SPSR.M[3:0] values (C5.2.19): EL1t, EL1h.
const SPSR_M_MASK: u64 = 0xf;
const SPSR_EL1T: u64 = 0b0100;
const SPSR_EL1H: u64 = 0b0101;

pub fn read_esr_far_hpfar() -> (u64, u64, u64) {
    let (esr, far, hpfar): (u64, u64, u64);
    // SAFETY: reading the syndrome registers of the exception being handled.
    unsafe {
        asm!("mrs {0}, esr_el2", "mrs {1}, far_el2", "mrs {2}, hpfar_el2", out(reg) esr, out(reg) far, out(reg) hpfar,
             options(nomem, nostack));
    }
    (esr, far, hpfar)
}

/// A guest register by number; 31 is XZR.
fn reg(ctx: &Vcpu, r: u64) -> u64 {
    if r < 31 {
        ctx.regs.x[r as usize]
    } else {
        0
    }
}

fn set_reg(ctx: &mut Vcpu, r: u64, value: u64) {
    if r < 31 {
        ctx.regs.x[r as usize] = value;
    }
}

fn resched(yes: bool) -> Next {
    if yes {
        Next::Reschedule
    } else {
        Next::Resume
    }
}

/// Handles a synchronous exit of `v`, which just ran on this CPU.
pub fn handle_sync(m: &mut Machine<Aarch64>, v: usize) -> Next {
    let (esr, far, hpfar) = read_esr_far_hpfar();
    let ec = esr >> 26;
    let p = m.vcpus[v].partition;
    // SAFETY: `v` exited on this CPU (its owner), which is in the hypervisor.
    let ctx = unsafe { m.ctx_mut(v) };
    if ec != EC_DABT_LOWER && ec != EC_IABT_LOWER {
        // The guest got past its last abort: a later one at the same
        // instruction is a new access, not a loop.
        ctx.abort_streak = 0;
    }
    match ec {
        EC_WFX => {
            ctx.regs.elr += 4;
            let index = m.vcpus[v].index as usize;
            if m.vcpus[v].pending == 0 && !m.partitions[p].arch.vgic.has_deliverable(index) {
                m.vcpus[v].state = VcpuState::Waiting;
            }
            Next::Reschedule
        }
        EC_SVE | EC_PAUTH => {
            // Hidden by the ID registers (`id_regs`): to the guest the
            // instruction does not exist.
            inject_undef(ctx);
            Next::Resume
        }
        EC_HVC64 | EC_SMC64 => {
            if ec == EC_SMC64 {
                // A trapped SMC leaves ELR at the SMC itself (D1.11.2).
                ctx.regs.elr += 4;
            }
            let function = ctx.regs.x[0];
            if function == SMCCC_VENDOR_HYP_CALL {
                let (control, input, output) = (ctx.regs.x[1], ctx.regs.x[2], ctx.regs.x[3]);
                // SAFETY: RAM is identity-mapped in the hypervisor, and
                // `dispatch` translates every guest address through the
                // caller's GuestRam first.
                let mut memory = unsafe { IdentityMemory::new() };
                let r = m.hypercall(v, control, input, output, &mut memory);
                // SAFETY: as above.
                let ctx = unsafe { m.ctx_mut(v) };
                ctx.regs.x[0] = r.result;
                if let Some(out) = r.fast_output {
                    ctx.regs.x[3] = out;
                }
                r.next
            } else {
                resched(psci_call(m, v, function))
            }
        }
        EC_SYSREG => {
            let rt = (esr >> 5) & 0x1f;
            let is_read = esr & 1 == 1;
            let iss = esr & 0x1ff_ffff;
            if esr & SYSREG_MASK == SYSREG_ICC_SGI1R && !is_read {
                let value = reg(ctx, rt);
                send_sgi(m, v, value);
            } else if let Some(id) = id_regs::decode(iss) {
                set_reg(ctx, rt, id_regs::guest_value(id, read_id_register(id)));
            } else if let Some(timer) = ptimer::decode(iss) {
                let now = super::counter().0;
                if is_read {
                    let value = ctx.ptimer.read(timer, now);
                    set_reg(ctx, rt, value);
                } else {
                    let value = reg(ctx, rt);
                    ctx.ptimer.write(timer, value, now);
                }
            } else if matches!(traps::classify(iss), SysregClass::Pmu | SysregClass::Trace) {
                // Hidden by the ID registers: UNDEFINED, as on a CPU
                // without them (the PC stays at the instruction).
                inject_undef(ctx);
                return Next::Resume;
            } else if is_read {
                // Other trapped registers (the OS lock and debug ROM
                // registers) read as zero and ignore writes.
                set_reg(ctx, rt, 0);
            }
            // SAFETY: as above (re-borrowed after `send_sgi`).
            unsafe { m.ctx_mut(v) }.regs.elr += 4;
            Next::Resume
        }
        EC_DABT_LOWER | EC_IABT_LOWER => {
            // HPFAR_EL2.FIPA holds IPA[51:12] in bits [43:4] (D19.2.55).
            let ipa = ((hpfar >> 4) << 12) | (far & 0xfff);
            if ec == EC_DABT_LOWER && esr & DABT_CM != 0 {
                // Cache maintenance by address on an IPA with no RAM (a
                // device or nothing): nothing of the guest's can be cached
                // there, so the operation is done by doing nothing (as KVM
                // does) rather than faulting a guest that is only being
                // careful.
                ctx.regs.elr += 4;
                return Next::Resume;
            }
            if ec == EC_DABT_LOWER && esr & DABT_ISV != 0 && emulate_mmio(m, v, p, ipa, esr) {
                // SAFETY: as above.
                unsafe { m.ctx_mut(v) }.regs.elr += 4;
                return Next::Resume;
            }
            let vcpus = m.partitions[p].vcpus.len();
            let device = (GUEST_UART..GUEST_UART + GUEST_UART_SIZE).contains(&ipa)
                || vgic::frame(ipa, GUEST_GICD, GUEST_GICR, vcpus).is_some();
            if device {
                // An emulated device the syndrome does not decode (no ISV:
                // a load/store pair, writeback, ...): nothing defined to do.
                m.fault(v, "undecodable-mmio", ipa, ("esr", esr));
                return Next::Reschedule;
            }
            // Nothing is at this address: a synchronous external abort, as
            // on a machine with nothing there.
            abort(m, v, ec, esr, far, ipa)
        }
        _ => {
            let elr = ctx.regs.elr;
            m.fault(v, "unexpected-exit", elr, ("esr", esr));
            Next::Reschedule
        }
    }
}

/// The emulated PL011 and virtual GICv3 frames. Returns whether the
/// access was emulated.
fn emulate_mmio(m: &mut Machine<Aarch64>, v: usize, p: usize, ipa: u64, esr: u64) -> bool {
    let rt = (esr >> 16) & 0x1f;
    let write = esr & DABT_WNR != 0;
    let width = 1u8 << ((esr >> DABT_SAS_SHIFT) & 0b11);
    // SAFETY: `v` exited on this CPU.
    let value = reg(unsafe { m.ctx_mut(v) }, rt);
    if (GUEST_UART..GUEST_UART + GUEST_UART_SIZE).contains(&ipa) {
        let off = ipa - GUEST_UART;
        if write {
            uart_write(m, p, off, value);
        } else {
            let read = m.partitions[p].arch.uart.read(off);
            // SAFETY: as above.
            set_reg(unsafe { m.ctx_mut(v) }, rt, read);
        }
        return true;
    }
    let vcpus = m.partitions[p].vcpus.len();
    let Some(frame) = vgic::frame(ipa, GUEST_GICD, GUEST_GICR, vcpus) else { return false };
    if write {
        let wake = m.partitions[p].arch.vgic.write(frame, width, value);
        for k in (0..vcpus).filter(|&k| wake & (1 << k) != 0) {
            let t = m.partitions[p].vcpus[k];
            if m.vcpus[t].state != VcpuState::Stopped {
                m.post(t, 0);
            }
        }
    } else {
        let read = m.partitions[p].arch.vgic.read(frame, width);
        // SAFETY: as above.
        set_reg(unsafe { m.ctx_mut(v) }, rt, read);
    }
    true
}

/// A write to the emulated PL011: data goes to the partition's console;
/// an unmasked transmit interrupt is asserted on its SPI at once.
fn uart_write(m: &mut Machine<Aarch64>, p: usize, off: u64, value: u64) {
    if let Effect::Transmit(byte) = m.partitions[p].arch.uart.write(off, value) {
        m.console_bytes(p, &[byte]);
    }
    if m.partitions[p].arch.uart.interrupt() {
        assert_uart_interrupt(m, p);
    }
}

/// Makes the UART's SPI pending and wakes the vCPU it is routed to.
pub fn assert_uart_interrupt(m: &mut Machine<Aarch64>, p: usize) {
    let intid = vgic::PRIVATE + GUEST_UART_SPI as usize;
    let vgic = &mut m.partitions[p].arch.vgic;
    let spi = vgic.dist.spis[GUEST_UART_SPI as usize];
    if spi.pending || spi.in_lr {
        return;
    }
    if let Some(target) = vgic.set_spi_pending(intid) {
        if let Some(&t) = m.partitions[p].vcpus.get(target) {
            m.post(t, 0);
        }
    }
}

/// Delivers a synchronous external abort for an access to `ipa`, where
/// nothing is (no RAM, no device): ESR_EL1 says data or instruction
/// abort, external, not on a walk; FAR_EL1 is the faulting address. A
/// guest that takes it at the same instruction over and over is stopped
/// (`hv: fault kind=abort-loop`). The first, second, fourth ... abort of a
/// vCPU is reported (`hv: inject kind=sea`).
fn abort(m: &mut Machine<Aarch64>, v: usize, ec: u64, esr: u64, far: u64, ipa: u64) -> Next {
    let p = m.vcpus[v].partition;
    let (id, index) = (m.partitions[p].info.id, m.vcpus[v].index);
    // SAFETY: `v` exited on this CPU.
    let ctx = unsafe { m.ctx_mut(v) };
    if ctx.abort_elr == ctx.regs.elr {
        ctx.abort_streak += 1;
    } else {
        ctx.abort_elr = ctx.regs.elr;
        ctx.abort_streak = 1;
    }
    if ctx.abort_streak > ABORT_LOOP_LIMIT {
        m.fault(v, "abort-loop", ipa, ("esr", esr));
        return Next::Reschedule;
    }
    ctx.aborts += 1;
    let aborts = ctx.aborts;
    let from_el1 = matches!(ctx.regs.spsr & SPSR_M_MASK, SPSR_EL1T | SPSR_EL1H);
    let class = if from_el1 { ec + EC_SAME_EL_OFFSET } else { ec };
    // A data abort keeps WnR; the fault status says "external".
    let wnr = if ec == EC_DABT_LOWER { esr & DABT_WNR } else { 0 };
    inject_sync(ctx, (class << ESR_EC_SHIFT) | ESR_IL | wnr | FSC_SYNC_EXTERNAL, Some(far));
    if aborts.is_power_of_two() {
        let mut line = alloc::string::String::new();
        let _ = hypervisor::hv_event_to!(
            line,
            "inject",
            kind = "sea",
            guest = id,
            vcpu = index,
            addr = format_args!("{ipa:#x}"),
            count = aborts
        );
        m.queue_line(p, alloc::string::String::from(line.trim_end()));
    }
    Next::Resume
}

/// Delivers an UNDEFINED instruction exception to the guest's EL1.
fn inject_undef(ctx: &mut Vcpu) {
    inject_sync(ctx, ESR_UNKNOWN_IL, None);
}

/// Delivers a synchronous exception with syndrome `esr` (and fault
/// address `far`) to the guest's EL1 (Arm ARM D1.10): ESR_EL1, FAR_EL1,
/// ELR_EL1 and SPSR_EL1 as the hardware would set them, and the guest
/// resumes at its vector with interrupts masked. The vCPU is loaded, so
/// its EL1 registers are the CPU's.
fn inject_sync(ctx: &mut Vcpu, esr: u64, far: Option<u64>) {
    if let Some(far) = far {
        // SAFETY: the exiting vCPU's FAR_EL1 is live on this CPU.
        unsafe { asm!("msr far_el1, {0}", in(reg) far, options(nomem, nostack)) };
    }
    let from = ctx.regs.spsr & SPSR_M_MASK;
    let offset = match from {
        SPSR_EL1T => VECTOR_CURRENT_SP0,
        SPSR_EL1H => VECTOR_CURRENT_SPX,
        _ => VECTOR_LOWER_A64,
    };
    let vbar: u64;
    // SAFETY: the exiting vCPU's EL1 registers are live on this CPU; this
    // writes the exception state the architecture would and reads VBAR_EL1.
    unsafe {
        asm!(
            "msr esr_el1, {esr}",
            "msr elr_el1, {elr}",
            "msr spsr_el1, {spsr}",
            "mrs {vbar}, vbar_el1",
            esr = in(reg) esr,
            elr = in(reg) ctx.regs.elr,
            spsr = in(reg) ctx.regs.spsr,
            vbar = out(reg) vbar,
            options(nomem, nostack),
        );
    }
    ctx.regs.elr = vbar + offset;
    ctx.regs.spsr = super::vcpu::SPSR_EL1H_MASKED;
}

/// Reads the hardware's ID register `id` (S3_0_C0_C<crm>_<op2>).
fn read_id_register(id: id_regs::IdReg) -> u64 {
    macro_rules! read {
        ($($crm:literal: [$($op2:literal),*]),*) => {
            match (id.crm, id.op2) {
                $($(($crm, $op2) => {
                    let v: u64;
                    // SAFETY: reading an ID register has no side effects.
                    unsafe { asm!(concat!("mrs {0}, S3_0_C0_C", $crm, "_", $op2), out(reg) v, options(nomem, nostack)) };
                    v
                })*)*
                _ => 0,
            }
        };
    }
    read!(1: [0, 1, 2, 3, 4, 5, 6, 7], 2: [0, 1, 2, 3, 4, 5, 6, 7], 3: [0, 1, 2, 3, 4, 5, 6, 7],
          4: [0, 1, 2, 3, 4, 5, 6, 7], 5: [0, 1, 2, 3, 4, 5, 6, 7], 6: [0, 1, 2, 3, 4, 5, 6, 7],
          7: [0, 1, 2, 3, 4, 5, 6, 7])
}

/// Emulates a write to ICC_SGI1R_EL1 (IHI 0069H §12.2.22): TargetList
/// [15:0] (Aff0 bits), Aff1 [23:16], INTID [27:24], IRM [40].
fn send_sgi(m: &mut Machine<Aarch64>, from: usize, value: u64) {
    let intid = ((value >> 24) & 0xf) as u32;
    let irm = value & (1 << 40) != 0;
    let higher_aff = value & 0x00ff_00ff_00ff_0000;
    let p = m.vcpus[from].partition;
    for k in 0..m.partitions[p].vcpus.len() {
        let t = m.partitions[p].vcpus[k];
        let aff0 = u64::from(m.vcpus[t].index);
        let hit = if irm { t != from } else { higher_aff == 0 && aff0 < 16 && value & (1 << aff0) != 0 };
        if hit && m.vcpus[t].state != VcpuState::Stopped {
            m.post(t, 1 << intid);
        }
    }
}

/// Guest PSCI (DEN0022E), over HVC or a trapped SMC. Returns whether to
/// reschedule.
fn psci_call(m: &mut Machine<Aarch64>, v: usize, function: u64) -> bool {
    let p = m.vcpus[v].partition;
    let (a1, a2, a3) = {
        // SAFETY: `v` exited on this CPU.
        let ctx = unsafe { m.ctx_mut(v) };
        (ctx.regs.x[1], ctx.regs.x[2], ctx.regs.x[3])
    };
    let target = |m: &Machine<Aarch64>, mpidr: u64| -> Option<usize> {
        // DEN0022E §5.1.4: bits [63:40] and [31:24] must be zero; our
        // vCPUs differ in Aff0 only.
        let aff0 = mpidr & 0xff;
        if mpidr & !0xff != 0 {
            return None;
        }
        m.partitions[p].vcpus.iter().copied().find(|&t| u64::from(m.vcpus[t].index) == aff0)
    };
    let mut resched = false;
    let ret: i64 = match function {
        PSCI_VERSION => PSCI_1_1,
        PSCI_FEATURES => match a1 {
            PSCI_VERSION
            | PSCI_CPU_OFF
            | PSCI_CPU_ON_32
            | PSCI_CPU_ON_64
            | PSCI_AFFINITY_INFO_32
            | PSCI_AFFINITY_INFO_64
            | PSCI_SYSTEM_OFF
            | PSCI_SYSTEM_RESET
            | PSCI_FEATURES => 0,
            _ => PSCI_NOT_SUPPORTED,
        },
        PSCI_CPU_ON_32 | PSCI_CPU_ON_64 => match target(m, a1) {
            None => PSCI_INVALID_PARAMETERS,
            Some(t) if m.vcpus[t].state != VcpuState::Off => PSCI_ALREADY_ON,
            Some(t) => {
                m.vcpus[t].start = Some((a2, a3));
                m.vcpus[t].state = VcpuState::Runnable;
                m.post(t, 0);
                0
            }
        },
        PSCI_CPU_OFF => {
            m.vcpus[v].state = VcpuState::Off;
            resched = true;
            0
        }
        PSCI_AFFINITY_INFO_32 | PSCI_AFFINITY_INFO_64 => match target(m, a1) {
            None => PSCI_INVALID_PARAMETERS,
            Some(t) => i64::from(matches!(m.vcpus[t].state, VcpuState::Off | VcpuState::Stopped)),
        },
        PSCI_SYSTEM_OFF => {
            m.stop_partition(p, PartitionState::Stopped, "system-off");
            return true;
        }
        PSCI_SYSTEM_RESET => {
            reset_partition(m, p);
            return true;
        }
        _ => PSCI_NOT_SUPPORTED,
    };
    // SAFETY: as above.
    unsafe { m.ctx_mut(v) }.regs.x[0] = ret.cast_unsigned();
    resched
}
