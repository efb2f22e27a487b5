//! debugpriv (aarch64): breakpoints and watchpoints are each guest's own.
//! Two partitions run it on the same physical CPU, yielding to each other:
//! - `arm=1` (guest A) arms breakpoint 0 on [`probe_target`] and
//!   watchpoint 0 on [`PROBE_DATA`] (DBGBVR0/DBGBCR0, DBGWVR0/DBGWCR0,
//!   Arm ARM D2.8-D2.9), enables debug exceptions at EL1 and never touches
//!   either address, then checks its registers kept their values;
//! - otherwise (guest B) reads the same registers (it must see its own
//!   reset values), enables debug exceptions too, and calls
//!   [`probe_target`] and reads [`PROBE_DATA`] over and over. A breakpoint
//!   or watchpoint of A's that fired here would be a debug exception:
//!   the runtime reports it (`exception ...`) and stops.
//!
//! Lines: `debugpriv role=arm rounds=<n> kept=<0|1>` and
//! `debugpriv role=probe rounds=<n> foreign=<0|1>`. `passes=` sets the
//! rounds (default 200).

use core::arch::asm;

use hvcall::call;

use super::El1Guest;
use crate::{Env, Guest, Line, Request};

/// Rounds of yielding (and, for the probe, touching the watched places).
const DEFAULT_ROUNDS: u64 = 200;
/// DBGBCR<n>_EL1 (D19.3.2): E (0), PMC [2:1] = 0b11 (EL1 and EL0), BAS
/// [8:5] = 0b1111 (the whole word).
const BCR_ARMED: u64 = 1 | (0b11 << 1) | (0b1111 << 5);
/// DBGWCR<n>_EL1 (D19.3.12): E (0), PAC [2:1] = 0b11, LSC [4:3] = 0b11
/// (loads and stores), BAS [12:5] = 0xff (eight bytes).
const WCR_ARMED: u64 = 1 | (0b11 << 1) | (0b11 << 3) | (0xff << 5);
/// MDSCR_EL1 (D19.3.21): KDE (13) and MDE (15), debug exceptions at EL1.
const MDSCR_KDE_MDE: u64 = (1 << 13) | (1 << 15);

/// What guest A watches and guest B reads: the same IPA in both (they are
/// the same image at the same guest-physical address).
static PROBE_DATA: [u64; 1] = [0x5eed];

/// What guest A's breakpoint points at and guest B calls.
#[inline(never)]
fn probe_target(x: u64) -> u64 {
    core::hint::black_box(x.wrapping_mul(3))
}

fn yield_cpu(g: &mut El1Guest) {
    g.hypercall(Request::fast(call::YIELD, 0));
}

/// The four registers of breakpoint 0 and watchpoint 0.
fn read_slot0() -> [u64; 4] {
    let (bvr, bcr, wvr, wcr): (u64, u64, u64, u64);
    // SAFETY: reading this vCPU's debug registers has no side effects.
    unsafe {
        asm!(
            "mrs {0}, dbgbvr0_el1", "mrs {1}, dbgbcr0_el1", "mrs {2}, dbgwvr0_el1", "mrs {3}, dbgwcr0_el1",
            out(reg) bvr, out(reg) bcr, out(reg) wvr, out(reg) wcr, options(nomem, nostack)
        );
    }
    [bvr, bcr, wvr, wcr]
}

/// Debug exceptions on at EL1 (MDSCR_EL1.KDE and MDE, PSTATE.D clear;
/// the OS lock is the hypervisor's, D2.5).
fn enable_debug_exceptions() {
    // SAFETY: changes only this vCPU's own debug configuration.
    unsafe {
        asm!(
            "mrs {t}, mdscr_el1", "orr {t}, {t}, {bits}", "msr mdscr_el1, {t}", "msr daifclr, #8", "isb",
            t = out(reg) _, bits = in(reg) MDSCR_KDE_MDE, options(nomem, nostack)
        );
    }
}

/// The debugpriv workload.
pub fn run(g: &mut El1Guest, env: &Env) {
    let args = env.args();
    let rounds = args.passes.unwrap_or(DEFAULT_ROUNDS);
    let target = probe_target as *const () as u64;
    let data = PROBE_DATA.as_ptr() as u64;
    if args.arm {
        let armed = [target, BCR_ARMED, data, WCR_ARMED];
        // SAFETY: arms this vCPU's own breakpoint 0 and watchpoint 0.
        unsafe {
            asm!(
                "msr dbgbvr0_el1, {0}", "msr dbgbcr0_el1, {1}", "msr dbgwvr0_el1, {2}", "msr dbgwcr0_el1, {3}", "isb",
                in(reg) armed[0], in(reg) armed[1], in(reg) armed[2], in(reg) armed[3], options(nomem, nostack)
            );
        }
        enable_debug_exceptions();
        for _ in 0..rounds {
            yield_cpu(g);
        }
        let kept = read_slot0() == armed;
        g.write_line(Line::event("debugpriv").field("role", "arm").field("rounds", rounds).flag("kept", kept));
    } else {
        let foreign = read_slot0() != [0; 4];
        enable_debug_exceptions();
        let mut sum = 0u64;
        for i in 0..rounds {
            sum = sum.wrapping_add(probe_target(i));
            // SAFETY: a read of this guest's own static.
            sum = sum.wrapping_add(unsafe { core::ptr::read_volatile(PROBE_DATA.as_ptr()) });
            yield_cpu(g);
        }
        core::hint::black_box(sum);
        g.write_line(Line::event("debugpriv").field("role", "probe").field("rounds", rounds).flag("foreign", foreign));
    }
}
