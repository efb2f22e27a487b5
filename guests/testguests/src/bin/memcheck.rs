//! memcheck guest: pattern write/verify over all of its free RAM.
//!
//! Bootargs: `passes=<n>` (default 3).
//! Lines: `memcheck ok=<0|1> pages=<n> pass=<k>` per pass (with
//! `bad_addr=0x..` on a mismatch), then `memcheck done=1 passes=<n> failed=<n>`.
#![cfg_attr(target_os = "none", no_std, no_main)]

/// On the host this is only a stub: the guest is built with
/// `--target aarch64-unknown-none` and booted by the hypervisor.
#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(target_os = "none")]
testguests::entry!(testguests::memcheck::run);
