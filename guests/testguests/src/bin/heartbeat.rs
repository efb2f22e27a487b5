//! heartbeat guest: a 10 ms virtual-timer tick and one self-SGI per tick.
//!
//! Bootargs: `ticks=<n>` (default 100).
//! Lines: `alive ticks=<total>` every 10 ticks, then
//! `heartbeat done=1 ticks=<n> sgis_sent=<s> sgis_received=<r>`.
#![cfg_attr(target_os = "none", no_std, no_main)]

/// On the host this is only a stub: the guest is built with
/// `--target aarch64-unknown-none` and booted by the hypervisor.
#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
testguests::entry!(testguests::heartbeat::run);
