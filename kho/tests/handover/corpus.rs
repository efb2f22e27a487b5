//! Replays the reader's fuzz corpus and crash reproducers on stable: every
//! file under `kho/fuzz/corpus/reader/` and `kho/fuzz/regressions/reader/`
//! goes through the body the cargo-fuzz target runs.

#[path = "../../fuzz/targets.rs"]
mod targets;

use std::path::Path;

#[test]
fn every_corpus_and_regression_input_is_handled() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join("reader")) else { continue };
        for entry in entries.flatten() {
            let data = std::fs::read(entry.path()).unwrap_or_else(|e| panic!("{}: {e}", entry.path().display()));
            targets::reader(&data);
            replayed += 1;
        }
    }
    assert!(replayed > 0, "the committed corpus went missing from {}", root.display());
}
