//! Replays the loader's fuzz corpora and crash reproducers on stable: every
//! file under `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` goes
//! through the same body the cargo-fuzz target runs (`fuzz/targets.rs`),
//! so an input that once crashed a parser stays fixed, and the inputs the
//! fuzzer found interesting keep exercising every `cargo test`.

#[path = "../fuzz/targets.rs"]
mod targets;

use std::path::Path;

#[test]
fn every_corpus_and_regression_input_is_handled() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for (name, body) in targets::ALL {
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else { continue };
            for entry in entries.flatten() {
                let data = std::fs::read(entry.path()).unwrap_or_else(|e| panic!("{}: {e}", entry.path().display()));
                body(&data);
                replayed += 1;
            }
        }
    }
    // The corpora are committed: an empty replay means they went missing.
    assert!(replayed >= targets::ALL.len(), "only {replayed} inputs replayed from {}", root.display());
}

#[test]
fn the_platform_tables_of_the_tests_go_through_every_table_target() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten() {
        let data = std::fs::read(entry.path()).unwrap_or_else(|e| panic!("{}: {e}", entry.path().display()));
        targets::dtb(&data);
        targets::dmar(&data);
        targets::gtdt(&data);
        targets::iort(&data);
        targets::uefi(&data);
    }
}
