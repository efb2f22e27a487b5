//! hostile guest: a seeded random attacker of the hypervisor
//! (`testguests::hostile`): hypercalls, system registers or MSRs, I/O
//! ports, MMIO and undefined instructions, each exception it raises
//! caught and counted.
//!
//! Bootargs: `seed=` (default: the counter at start), `ops=` (20000).
//! Lines: `hostile start=1 seed=0x.. ops=<n> isa=<isa>`, progress lines,
//! `hostile done=1 seed=0x.. ops=<n> exceptions=<e> <kind>=<n> ...`.
#![cfg_attr(target_os = "none", no_std, no_main)]

/// On the host this is only a stub: the guest is built for a bare-metal
/// target and booted by the hypervisor.
#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
testguests::entry!(testguests::hostile::run);
