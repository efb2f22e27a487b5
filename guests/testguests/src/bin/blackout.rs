//! blackout guest: the largest gap between consecutive CNTVCT reads,
//! spinning with IRQs masked.
//!
//! Bootargs: `seconds=<n>` (default 2).
//! Lines: `blackout max_gap_us=<n> samples=<n>` every 0.5 s, the last with
//! `final=1`.
#![cfg_attr(target_os = "none", no_std, no_main)]

/// On the host this is only a stub: the guest is built with
/// `--target aarch64-unknown-none` and booted by the hypervisor.
#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
testguests::entry!(testguests::blackout::run);
