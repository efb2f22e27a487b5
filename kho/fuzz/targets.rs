//! The body of the handover reader's fuzz target: arbitrary bytes as a
//! previous image's handover blob must give a value or a typed error, never
//! a panic. Shared by the cargo-fuzz binary (`fuzz_targets/reader.rs`,
//! nightly) and `kho/tests/handover/corpus.rs`, which replays the committed
//! corpus and reproducers on stable.

#![allow(dead_code)]

use kho::{HandoverReader, PhysRange, RamMap};

const GIB: u64 = 1 << 30;

/// The RAM map of the golden blobs (`tests/handover/fixtures.rs`), so that
/// mutations of them get past the address checks.
fn ram() -> Option<RamMap> {
    let low = PhysRange::new(GIB, GIB).ok()?;
    let high = PhysRange::new(4 * GIB, GIB).ok()?;
    RamMap::new(&[low, high]).ok()
}

/// The handover reader on an arbitrary blob: every accessor of whatever it
/// accepts.
pub fn reader(blob: &[u8]) {
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
}
