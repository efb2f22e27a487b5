//! isolation guest: reads and writes an IPA outside its RAM
//! (`testguests::isolation`): an abort on aarch64, all ones read and the
//! write dropped on x86_64.
//!
//! Bootargs: `addr=<ipa>` (default: RAM end + 64 MiB).
//! Lines: `probe addr=0x.. kind=<outside-ram|inside-ram>`, and
//! `probe survived=1 addr=0x.. value=0x.. reread=0x..` only if the
//! accesses returned.
#![cfg_attr(target_os = "none", no_std, no_main)]

/// On the host this is only a stub: the guest is built with
/// `--target aarch64-unknown-none` and booted by the hypervisor.
#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
testguests::entry!(testguests::isolation::run);
