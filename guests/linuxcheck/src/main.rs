//! `linuxcheck`: runs inside the Linux guest (from its initramfs) as a
//! static aarch64 executable without libc. It fills a buffer with a
//! pattern that changes every pass and verifies it, reading
//! CLOCK_MONOTONIC every 4 KiB, and reports the largest gap between two
//! reads: a live update shows up there as the blackout Linux saw.
//!
//! Output lines (the serial event protocol's guest side):
//! `linux: memcheck start seconds=<n>` once the clock is first read,
//! `linux: memcheck pass=<n> ok=<0|1> max_gap_us=<n>` about once a second and
//! `linux: memcheck done ok=<0|1> passes=<n> max_gap_us=<n>` at the end.
//! Argument: how many seconds to run (default 20), by CLOCK_MONOTONIC.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod linux;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("linuxcheck runs inside an aarch64 Linux guest: build it with --target aarch64-unknown-none");
    std::process::exit(2);
}
