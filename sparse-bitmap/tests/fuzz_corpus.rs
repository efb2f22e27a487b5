//! Replays the `adopt` fuzz corpus and crash reproducers on stable: every
//! file under `fuzz/corpus/adopt/` and `fuzz/regressions/adopt/` goes
//! through `testing::adopt_arbitrary`, the body the cargo-fuzz target runs.

use std::path::Path;

#[test]
fn every_corpus_and_regression_input_is_handled() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join("adopt")) else { continue };
        for entry in entries.flatten() {
            let data = std::fs::read(entry.path()).unwrap_or_else(|e| panic!("{}: {e}", entry.path().display()));
            let _ = sparse_bitmap::testing::adopt_arbitrary(&data);
            replayed += 1;
        }
    }
    assert!(replayed > 0, "the committed corpus went missing from {}", root.display());
}
