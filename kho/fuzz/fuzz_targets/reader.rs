//! Feeds arbitrary bytes to the handover reader: it must return a value or a
//! typed error, never panic. Seed it with the goldens:
//! `cargo +nightly fuzz run reader corpus/reader ../testdata`.

#![no_main]

use kho::{HandoverReader, PhysRange, RamMap};
use libfuzzer_sys::fuzz_target;

const GIB: u64 = 1 << 30;

/// The RAM map of the golden blobs (`tests/handover/fixtures.rs`), so that
/// mutations of them get past the address checks.
fn ram() -> Option<RamMap> {
    let low = PhysRange::new(GIB, GIB).ok()?;
    let high = PhysRange::new(4 * GIB, GIB).ok()?;
    RamMap::new(&[low, high]).ok()
}

fuzz_target!(|blob: &[u8]| {
    let Some(ram) = ram() else {
        return;
    };
    let Ok(reader) = HandoverReader::new(blob, GIB, &ram) else {
        return;
    };
    let _ = reader.preserved_ranges().count();
    for node in reader.subsystems() {
        let _ = reader.children(node.path()).count();
        let _ = node.all_pages().count() + node.records().count();
    }
});
