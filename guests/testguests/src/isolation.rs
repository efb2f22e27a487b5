//! isolation: touches memory outside its RAM (read, write the complement,
//! read again, restore). On aarch64 the hypervisor injects a synchronous
//! external abort (the runtime prints an `exception` line and shuts
//! down) or stops the guest; on x86_64 it completes the accesses as a PC
//! would: both reads return all ones and the write lands nowhere.
//!
//! Lines: `probe addr=0x.. kind=<outside-ram|inside-ram>`, then, only if
//! the accesses came back, `probe survived=1 addr=0x.. value=0x..
//! reread=0x..` (what the two reads returned).
//!
//! With `at_staging=1` (a fault during an update, issue 15 item 5): polls
//! `GET_UPDATE_PHASE` until a live update is being staged, prints `probe
//! staging=1 polls=<n>`, and makes an access the hypervisor does not
//! emulate ([`Guest::unemulated_access`]), which stops this guest while
//! the update is in brownout; `probe survived=1 unemulated=1` if it came
//! back, `probe staging=0 ...` if no update came within
//! [`STAGING_WAIT_S`] of guest time.

use hvcall::{call, Status, UPDATE_PHASE_STAGING};

use crate::{Env, Guest, Line, Request};

/// Default probe: this far past the end of RAM.
pub const PAST_RAM: u64 = 64 << 20;
/// `at_staging=1`: guest seconds to wait for an update to be staged.
pub const STAGING_WAIT_S: u64 = 300;

/// The address probed: `addr=` if given, else 64 MiB past RAM; aligned
/// down to 8 bytes (the access is one 64-bit word).
pub fn probe_address(env: &Env) -> u64 {
    env.args().addr.unwrap_or_else(|| env.ram().end.saturating_add(PAST_RAM)) & !7
}

/// The isolation workload (`addr=` overrides the probed IPA).
pub fn run<G: Guest>(g: &mut G, env: &Env) {
    if env.args().at_staging {
        return fault_while_staging(g);
    }
    let addr = probe_address(env);
    let kind = if env.ram().contains(addr) { "inside-ram" } else { "outside-ram" };
    g.write_line(Line::event("probe").hex("addr", addr).field("kind", kind));
    let [value, reread] = g.probe(addr);
    g.write_line(
        Line::event("probe").flag("survived", true).hex("addr", addr).hex("value", value).hex("reread", reread),
    );
}

fn fault_while_staging<G: Guest>(g: &mut G) {
    let deadline = g.counter().saturating_add(g.counter_frequency().saturating_mul(STAGING_WAIT_S));
    let mut polls = 0u64;
    let staging = loop {
        let out = g.hypercall(Request::fast(call::GET_UPDATE_PHASE, 0));
        polls += 1;
        if out.status() == Some(Status::Success) && out.output == UPDATE_PHASE_STAGING {
            break true;
        }
        if g.counter() > deadline {
            break false;
        }
    };
    g.write_line(Line::event("probe").flag("staging", staging).field("polls", polls));
    if staging {
        g.unemulated_access();
        g.write_line(Line::event("probe").flag("survived", true).flag("unemulated", true));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Args;
    use crate::fake::FakeGuest;
    use crate::Region;

    const RAM: Region = Region::new(0x4000_0000, 0x4100_0000);

    #[test]
    fn probes_past_ram_by_default() {
        let env = Env::new(RAM, [Region::default(); 2], Args::default());
        let mut g = FakeGuest::new();
        run(&mut g, &env);
        assert_eq!(g.probes, [0x4500_0000]);
        assert_eq!(
            g.lines,
            [
                "probe addr=0x45000000 kind=outside-ram",
                "probe survived=1 addr=0x45000000 value=0xffffffffffffffff reread=0xffffffffffffffff"
            ]
        );
    }

    #[test]
    fn at_staging_faults_only_once_an_update_is_being_staged() {
        let args = Args { at_staging: true, ..Args::default() };
        let mut g = FakeGuest::new();
        g.staging_from_call = Some(5);
        run(&mut g, &Env::new(RAM, [Region::default(); 2], args));
        assert_eq!((g.phase_calls, g.unemulated_accesses), (5, 1));
        assert_eq!(g.lines, ["probe staging=1 polls=5", "probe survived=1 unemulated=1"]);
        assert!(g.probes.is_empty());

        // No update: gives up after STAGING_WAIT_S of guest time, no access.
        let mut g = FakeGuest::new();
        g.counter_step = 1_000_000;
        run(&mut g, &Env::new(RAM, [Region::default(); 2], args));
        assert_eq!(g.unemulated_accesses, 0);
        assert_eq!(g.lines, [std::format!("probe staging=0 polls={}", STAGING_WAIT_S + 1)]);
    }

    #[test]
    fn addr_argument_overrides_and_is_aligned() {
        let args = Args { addr: Some(0x8000_0003), ..Args::default() };
        let mut g = FakeGuest::new();
        run(&mut g, &Env::new(RAM, [Region::default(); 2], args));
        assert_eq!(g.probes, [0x8000_0000]);
        assert_eq!(g.lines[0], "probe addr=0x80000000 kind=outside-ram");

        let inside = Args { addr: Some(0x4080_0000), ..Args::default() };
        assert_eq!(probe_address(&Env::new(RAM, [Region::default(); 2], inside)), 0x4080_0000);
        let mut g = FakeGuest::new();
        run(&mut g, &Env::new(RAM, [Region::default(); 2], inside));
        assert_eq!(g.lines[0], "probe addr=0x40800000 kind=inside-ram");
    }
}
