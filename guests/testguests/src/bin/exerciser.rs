//! exerciser guest: every hypercall, valid and invalid, with its status
//! checked.
//!
//! Bootargs: `privileged=1` when the guest is started privileged.
//! Lines: `hypercall check=<name> status=<s> expected=<e> ok=<0|1>` per
//! check, then `exerciser ok=<0|1> checks=<n> failed=<n>`.
#![cfg_attr(target_os = "none", no_std, no_main)]

/// On the host this is only a stub: the guest is built with
/// `--target aarch64-unknown-none` and booted by the hypervisor.
#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
testguests::entry!(testguests::exerciser::run);
