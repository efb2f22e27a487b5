//! A short soak (`hv_tests::soak`; `scripts/soak` runs 1000 updates):
//! 25 live updates in a row on aarch64 with the test guests running
//! throughout. Every update done, memcheck clean, ticks only increasing,
//! the old image intact each time, and the hypervisor's free frames,
//! handover size and preserved pages the same after every update.

use hv_tests::{soak, Arch};

#[test]
fn twenty_five_updates_in_a_row_leak_nothing() {
    match soak::run(Arch::Aarch64, 25) {
        Ok((report, _)) => println!("{}", report.line()),
        Err(why) => panic!("{why}"),
    }
}
