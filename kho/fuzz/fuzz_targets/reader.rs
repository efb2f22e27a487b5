//! Fuzz target `reader`: see `../targets.rs`. `scripts/fuzz` seeds it with
//! the golden blobs in `kho/testdata`.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::reader(data));
