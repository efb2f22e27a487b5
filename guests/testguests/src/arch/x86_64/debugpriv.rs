//! debugpriv (x86_64): debug registers are each guest's own. Two
//! partitions run it on the same physical CPU, yielding to each other:
//! - `arm=1` (guest A) sets an instruction breakpoint (DR0) on
//!   [`probe_target`] and an 8-byte read/write watchpoint (DR1) on
//!   [`PROBE_DATA`], enabled in DR7 (SDM Vol. 3B §19.2.4), never touches
//!   either while yielding, then checks its registers kept their values
//!   and that its watchpoint still fires in its own hands: one read of
//!   [`PROBE_DATA`] must trap once, with DR6.B1 set;
//! - otherwise (guest B) reads DR0-DR3, DR6 and DR7 (it must see their
//!   reset values), arms DR0/DR1 on addresses of its own that it never
//!   touches (so a CPU that kept B's registers for A would break A's
//!   check), then calls [`probe_target`] and reads [`PROBE_DATA`] over
//!   and over. A breakpoint of A's firing here would be a #DB the runtime
//!   reports (`exception vector=#DB`) before it stops.
//!
//! Both also report the performance-monitoring version CPUID leaf 0xA
//! gives (`pmu=`): the hypervisor offers no PMU, so there are no counters
//! to program and RDPMC and the PMU MSRs are #GP.
//!
//! Lines: `debugpriv role=arm rounds=<n> kept=<0|1> fired=<n> b1=<0|1>
//! pmu=<v>` and `debugpriv role=probe rounds=<n> foreign=<0|1> pmu=<v>`.
//! `passes=` sets the rounds (default 200).

use core::arch::asm;
use core::arch::x86_64::__cpuid;

use hvcall::call;

use super::runtime::{catch_debug_traps, debug_traps, VmxGuest};
use crate::{Env, Guest, Line, Request};

/// Rounds of yielding (and, for the probe, touching the watched places).
const DEFAULT_ROUNDS: u64 = 200;
/// DR7 (§19.2.4): L0 (0), L1 (2), LE (8), bit 10 (reads as 1); R/W1 =
/// 0b11 (reads and writes, 21:20), LEN1 = 0b10 (8 bytes, 23:22); R/W0 and
/// LEN0 0 (instruction execution).
const DR7_ARMED: u64 = 1 | (1 << 2) | (1 << 8) | (1 << 10) | (0b11 << 20) | (0b10 << 22);
/// DR6 and DR7 after reset (§19.2.3-19.2.4).
const DR6_INIT: u64 = 0xffff_0ff0;
const DR7_INIT: u64 = 0x400;
/// DR6.B1: breakpoint 1's condition was met.
const DR6_B1: u64 = 1 << 1;
/// CPUID leaf 0xA (architectural performance monitoring): EAX[7:0] is
/// the version, 0 when there is none.
const PMU_LEAF: u32 = 0xa;

/// What guest A watches and guest B reads: the same address in both (they
/// are the same image at the same guest-physical address).
static PROBE_DATA: [u64; 1] = [0x5eed];
/// What guest B watches and nobody touches.
static OWN_DATA: [u64; 1] = [0xb0b];

/// What guest A's breakpoint points at and guest B calls.
#[inline(never)]
fn probe_target(x: u64) -> u64 {
    core::hint::black_box(x.wrapping_mul(3))
}

/// What guest B's breakpoint points at; never called.
#[inline(never)]
fn own_target(x: u64) -> u64 {
    core::hint::black_box(x.wrapping_add(7))
}

fn yield_cpu(g: &mut VmxGuest) {
    g.hypercall(Request::fast(call::YIELD, 0));
}

/// DR0-DR3, DR6, DR7.
fn read_debug_registers() -> [u64; 6] {
    let (d0, d1, d2, d3, d6, d7): (u64, u64, u64, u64, u64, u64);
    // SAFETY: reading debug registers at CPL 0 has no side effects (each
    // exits to the hypervisor, which answers from this vCPU's state).
    unsafe {
        asm!(
            "mov {0}, dr0", "mov {1}, dr1", "mov {2}, dr2", "mov {3}, dr3", "mov {4}, dr6", "mov {5}, dr7",
            out(reg) d0, out(reg) d1, out(reg) d2, out(reg) d3, out(reg) d6, out(reg) d7,
            options(nomem, nostack)
        );
    }
    [d0, d1, d2, d3, d6, d7]
}

/// Arms DR0 on `code` and DR1 on `data`.
fn arm(code: u64, data: u64) {
    // SAFETY: sets this vCPU's own breakpoints; the caller never executes
    // `code` or touches `data` unless it has a handler for the #DB.
    unsafe {
        asm!(
            "mov dr0, {0}", "mov dr1, {1}", "mov dr7, {2}",
            in(reg) code, in(reg) data, in(reg) DR7_ARMED, options(nomem, nostack)
        );
    }
}

/// Disarms every breakpoint and clears DR6.
fn disarm() {
    // SAFETY: this vCPU's own debug registers, set to their reset values.
    unsafe { asm!("mov dr7, {0}", "mov dr6, {1}", in(reg) DR7_INIT, in(reg) DR6_INIT, options(nomem, nostack)) };
}

/// The architectural PMU version this vCPU is offered.
fn pmu_version() -> u64 {
    let max = __cpuid(0).eax;
    if max < PMU_LEAF {
        return 0;
    }
    u64::from(__cpuid(PMU_LEAF).eax & 0xff)
}

/// The debugpriv workload.
pub fn run(g: &mut VmxGuest, env: &Env) {
    let args = env.args();
    let rounds = args.passes.unwrap_or(DEFAULT_ROUNDS);
    let pmu = pmu_version();
    let target = probe_target as *const () as u64;
    let data = PROBE_DATA.as_ptr() as u64;
    if args.arm {
        arm(target, data);
        for _ in 0..rounds {
            yield_cpu(g);
        }
        let regs = read_debug_registers();
        let kept = regs[0] == target && regs[1] == data && regs[5] == DR7_ARMED;
        // The watchpoint is a trap: the read completes, then #DB.
        catch_debug_traps();
        let before = debug_traps();
        // SAFETY: a read of this guest's own static.
        core::hint::black_box(unsafe { core::ptr::read_volatile(PROBE_DATA.as_ptr()) });
        let fired = debug_traps() - before;
        let b1 = read_debug_registers()[4] & DR6_B1 != 0;
        disarm();
        g.write_line(
            Line::event("debugpriv")
                .field("role", "arm")
                .field("rounds", rounds)
                .flag("kept", kept)
                .field("fired", fired)
                .flag("b1", b1)
                .field("pmu", pmu),
        );
    } else {
        let regs = read_debug_registers();
        let foreign = regs != [0, 0, 0, 0, DR6_INIT, DR7_INIT];
        arm(own_target as *const () as u64, OWN_DATA.as_ptr() as u64);
        let mut sum = 0u64;
        for i in 0..rounds {
            sum = sum.wrapping_add(probe_target(i));
            // SAFETY: a read of this guest's own static.
            sum = sum.wrapping_add(unsafe { core::ptr::read_volatile(PROBE_DATA.as_ptr()) });
            yield_cpu(g);
        }
        core::hint::black_box(sum);
        disarm();
        g.write_line(
            Line::event("debugpriv")
                .field("role", "probe")
                .field("rounds", rounds)
                .flag("foreign", foreign)
                .field("pmu", pmu),
        );
    }
}
