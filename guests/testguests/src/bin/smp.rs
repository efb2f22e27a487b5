//! smp guest: a second vCPU started by the hypervisor's guest PSCI
//! (aarch64) or by INIT-SIPI-SIPI through the local APIC (x86_64); run it
//! with `vcpus=2`.
//!
//! Bootargs: none.
//! Lines: one check line per check (`psci check=...` on aarch64,
//! `sipi check=...` on x86_64: `<name> result=<r> expected=<e>
//! ok=<0|1>`), `smp cpu=1 context=0x5a5a mpidr=0x80000001 ok=<0|1>`
//! (aarch64) or `smp cpu=1 context=0x5a5a apic_id=0x1 ok=<0|1>` (x86_64)
//! from vCPU 1, then `smp ok=<0|1> checks=<n> failed=<n>`; ends with PSCI
//! SYSTEM_OFF (aarch64) or SHUTDOWN_SELF (x86_64).
#![cfg_attr(target_os = "none", no_std, no_main)]

/// On the host this is only a stub: the guest is built for
/// `aarch64-unknown-none` or `x86_64-unknown-none` and booted by the
/// hypervisor.
#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(all(target_os = "none", target_arch = "aarch64"))]
testguests::entry!(testguests::smp::run, secondary = testguests::smp::secondary);

#[cfg(all(target_os = "none", target_arch = "x86_64"))]
testguests::entry!(testguests::sipi::run, secondary = testguests::sipi::secondary);
