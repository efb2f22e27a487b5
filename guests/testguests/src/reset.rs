//! reset: PSCI SYSTEM_RESET. The hypervisor reloads the image and device
//! tree and restarts vCPU 0, but RAM outside them keeps its contents, so the
//! guest leaves a mark in the middle of its RAM before resetting and finds
//! it after the restart.
//!
//! Lines: `reset step=1` before SYSTEM_RESET, then `reset step=2 ok=1`
//! after the restart; ends with PSCI SYSTEM_OFF.

use crate::psci::{Call, Psci};
use crate::{Env, Guest, Line};

/// What the first boot leaves behind.
const MARK: u64 = 0x5245_5345_545f_4f4b;

/// Where the mark goes: the middle of RAM, away from the image (at the
/// bottom) and the device tree (at the top).
pub fn mark_address(env: &Env) -> u64 {
    let ram = env.ram();
    (ram.start + ram.len() / 2) & !7
}

/// The reset workload.
pub fn run<G: Guest + Psci>(g: &mut G, env: &Env) {
    let at = mark_address(env) as *mut u64;
    // SAFETY: `at` is an aligned address in the middle of this guest's own
    // RAM, outside its image and device tree, identity-mapped, and used by
    // nothing else.
    let seen = unsafe { core::ptr::read_volatile(at) };
    if seen == MARK {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(at, 0) };
        g.write_line(Line::event("reset").field("step", 2).flag("ok", true));
        g.psci(Call::SystemOff);
    } else {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(at, MARK) };
        g.write_line(Line::event("reset").field("step", 1));
        g.psci(Call::SystemReset);
        g.write_line(Line::event("reset").field("step", 2).flag("ok", false).field("error", "reset-returned"));
    }
}
