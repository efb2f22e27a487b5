//! The hostile guest in emulator runs (issue 15 item 2,
//! `testguests::hostile`): its seed, its guest argument, and what a run
//! with it must show.

use crate::emulator::RunOutcome;
use crate::guests::{self, GuestArg};
use crate::{Arch, LaunchError};

/// Environment variable that replaces a test's fixed seed (decimal or
/// `0x` hexadecimal): to replay a failure, or to try other seeds.
pub const SEED_VAR: &str = "HV_HOSTILE_SEED";

/// The seed a test uses: `$HV_HOSTILE_SEED` if set and valid, else
/// `default`. Printed to stderr, so a failing run says how to replay it.
pub fn seed(default: u64) -> u64 {
    let seed = std::env::var(SEED_VAR).ok().and_then(|s| parse(&s)).unwrap_or(default);
    eprintln!("hostile guest seed={seed:#x} (replay with {SEED_VAR}={seed:#x})");
    seed
}

fn parse(text: &str) -> Option<u64> {
    let text = text.trim();
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// The hostile guest with `seed`, making `ops` attacks; privileged, it
/// may also ask for live updates (of random bytes).
pub fn guest(arch: Arch, seed: u64, ops: u64, privileged: bool) -> Result<GuestArg, LaunchError> {
    let dir = guests::build_test_guests(arch)?;
    let privileged = if privileged { ",privileged" } else { "" };
    let spec = format!("{}{privileged},cmdline=seed={seed} ops={ops}", dir.join("hostile.bin").display());
    GuestArg::parse(&spec).map_err(|e| LaunchError::Image(format!("hostile guest: {e}")))
}

/// What every run with the hostile guest must show: it made all `ops`
/// attacks with `seed` and stopped itself (the hypervisor never stopped
/// it), and no guest faulted. Returns the failure, seed included.
pub fn verdict(run: &RunOutcome, seed: u64, ops: u64) -> Result<(), String> {
    let fail = |what: &str| Err(format!("{what} (hostile seed={seed:#x}; replay with {SEED_VAR}={seed:#x})"));
    let Some(id) = run
        .hv("guest-start")
        .iter()
        .find(|e| e.get("name") == Some("hostile"))
        .and_then(|e| e.num("id"))
        .map(|id| id as u32)
    else {
        return fail("the hostile guest did not start");
    };
    let done = run.guest(id, "hostile").into_iter().find(|e| e.num("done") == Some(1));
    let Some(done) = done else { return fail("the hostile guest never finished its attacks") };
    if done.num("seed") != Some(seed) || done.num("ops") != Some(ops) {
        return fail(&format!("the hostile guest reported seed={:?} ops={:?}", done.get("seed"), done.get("ops")));
    }
    let stop = run.hv("guest-stop").into_iter().find(|e| e.num("id") == Some(u64::from(id)));
    if stop.and_then(|e| e.get("reason")) != Some("shutdown") {
        return fail(&format!("the hostile guest was stopped: {:?}", stop.and_then(|e| e.get("reason"))));
    }
    if let Some(f) = run.hv("fault").first() {
        return fail(&format!("a guest faulted: {f:?}"));
    }
    if !run.hv("panic").is_empty() {
        return fail("the hypervisor panicked");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_parse_in_decimal_and_hex() {
        assert_eq!(parse("42"), Some(42));
        assert_eq!(parse(" 0x2a "), Some(42));
        assert_eq!(parse("forty-two"), None);
    }
}
