//! PSCI calls to the firmware (Arm DEN0022E, Power State Coordination
//! Interface): function ids of §5.1, SMC64 calling convention.
//!
//! Only the SMC conduit is usable from EL2: an `hvc` from EL2 traps to the
//! hypervisor's own vectors.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub const CPU_ON_64: u64 = 0xc400_0003;
pub const SYSTEM_OFF: u64 = 0x8400_0008;

/// PSCI return codes (DEN0022E §5.2.2).
pub const SUCCESS: i64 = 0;

static SMC_AVAILABLE: AtomicBool = AtomicBool::new(false);
/// Calls made into the firmware by this image (a live update with a
/// direct CPU handover makes none).
static CALLS: AtomicU64 = AtomicU64::new(0);

/// How many PSCI calls this image has made.
pub fn calls() -> u64 {
    CALLS.load(Ordering::Relaxed)
}

/// Records that the DTB declared `method = "smc"`.
pub fn enable_smc() {
    SMC_AVAILABLE.store(true, Ordering::Relaxed);
}

/// Makes a PSCI call; `None` if the firmware offers no SMC conduit.
pub fn call(function: u64, a1: u64, a2: u64, a3: u64) -> Option<i64> {
    if !SMC_AVAILABLE.load(Ordering::Relaxed) {
        return None;
    }
    CALLS.fetch_add(1, Ordering::Relaxed);
    let mut x0 = function;
    // SAFETY: a PSCI call per DEN0022E; the firmware preserves all
    // registers but x0-x3 (SMCCC v1.1 §2.6), which are declared clobbered.
    unsafe {
        asm!("smc #0", inout("x0") x0, inout("x1") a1 => _, inout("x2") a2 => _, inout("x3") a3 => _,
             options(nostack));
    }
    Some(x0.cast_signed())
}
