//! ptimer (aarch64): the EL1 physical timer works in a guest. The
//! hypervisor emulates CNTP_CTL/CVAL/TVAL per vCPU and raises PPI 30
//! through the virtual GIC (`hypervisor::arch::aarch64::ptimer`); this
//! workload enables the PPI, programs a 1 ms period with CNTP_TVAL_EL0,
//! takes `ticks=` interrupts (default 50), re-arming in its handler, and
//! reports how many it took and over how long.
//!
//! Line: `ptimer ticks=<n> wanted=<n> elapsed_us=<n> istatus_before=<0|1>`.

use core::arch::asm;
use core::sync::atomic::Ordering;

use super::{El1Guest, PHYS_PERIOD, PHYS_TICKS};
use crate::gicv3;
use crate::{Env, Guest, Line};

/// The non-secure EL1 physical timer's PPI (Arm BSA: INTID 30).
pub const PPI: u32 = 30;
/// CNTP_CTL_EL0: ENABLE (0), ISTATUS (2).
const CTL_ENABLE: u64 = 1;
const CTL_ISTATUS: u64 = 1 << 2;
const DEFAULT_TICKS: u64 = 50;

/// Re-arms the timer `period` counts from now, or disables it (0).
pub fn rearm(period: u64) {
    // SAFETY: programs this vCPU's EL1 physical timer (the hypervisor
    // emulates it).
    unsafe {
        if period == 0 {
            asm!("msr cntp_ctl_el0, xzr", "isb", options(nomem, nostack));
        } else {
            asm!("msr cntp_tval_el0, {0}", "msr cntp_ctl_el0, {1}", "isb", in(reg) period, in(reg) CTL_ENABLE,
                 options(nomem, nostack));
        }
    }
}

fn ctl() -> u64 {
    let v: u64;
    // SAFETY: reads this vCPU's EL1 physical timer control.
    unsafe { asm!("mrs {0}, cntp_ctl_el0", out(reg) v, options(nomem, nostack)) };
    v
}

/// The ptimer workload.
pub fn run(g: &mut El1Guest, env: &Env) {
    let wanted = env.args().ticks.unwrap_or(DEFAULT_TICKS);
    let period = (g.counter_frequency() / 1000).max(1);
    // Start with a deadline already past but the timer disabled: ISTATUS
    // must read 0 (the condition needs ENABLE).
    let istatus_before = ctl() & CTL_ISTATUS != 0;
    // Bring up the GIC with the virtual timer's PPI, then enable PPI 30.
    g.start_ticks(u64::MAX / 4);
    let rd = gicv3::redistributor(super::mpidr() & 0xff);
    // SAFETY: ISENABLER0 of this vCPU's redistributor (write 1 to enable).
    unsafe { ((rd + gicv3::GICR_SGI_ISENABLER0) as *mut u32).write_volatile(1 << PPI) };
    PHYS_PERIOD.store(period, Ordering::Relaxed);
    let start = g.counter();
    rearm(period);
    // Guest-time bound: a timer that never fires ends the run, reported.
    let limit = start + period * wanted * 100;
    while PHYS_TICKS.load(Ordering::Relaxed) < wanted && g.counter() < limit {
        g.wait_for_interrupt();
    }
    PHYS_PERIOD.store(0, Ordering::Relaxed);
    rearm(0);
    g.stop_ticks();
    let elapsed_us = (g.counter() - start) * 1_000_000 / g.counter_frequency().max(1);
    g.write_line(
        Line::event("ptimer")
            .field("ticks", PHYS_TICKS.load(Ordering::Relaxed))
            .field("wanted", wanted)
            .field("elapsed_us", elapsed_us)
            .flag("istatus_before", istatus_before),
    );
}
