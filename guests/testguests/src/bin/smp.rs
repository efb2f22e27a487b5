//! smp guest: the hypervisor's guest PSCI with two vCPUs (run it with
//! `vcpus=2`).
//!
//! Bootargs: none.
//! Lines: `psci check=<name> result=<r> expected=<e> ok=<0|1>` per check,
//! `smp cpu=1 context=0x5a5a mpidr=0x80000001 ok=<0|1>` from vCPU 1, then
//! `smp ok=<0|1> checks=<n> failed=<n>`; ends with PSCI SYSTEM_OFF.
#![cfg_attr(target_os = "none", no_std, no_main)]

/// On the host this is only a stub: the guest is built with
/// `--target aarch64-unknown-none` and booted by the hypervisor.
#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
testguests::entry!(testguests::smp::run, secondary = testguests::smp::secondary);
