//! debugpriv guest: breakpoints and watchpoints stay each guest's own
//! (`arch::aarch64::debugpriv`, `arch::x86_64::debugpriv`).
#![cfg_attr(target_os = "none", no_std, no_main)]

/// On the host this is only a stub: the guest is built for a bare-metal
/// target and booted by the hypervisor.
#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(all(target_os = "none", target_arch = "aarch64"))]
testguests::entry!(testguests::arch::aarch64::debugpriv::run);

#[cfg(all(target_os = "none", target_arch = "x86_64"))]
testguests::entry!(testguests::arch::x86_64::debugpriv::run);
