//! Fuzz target `stage2_adopt`: see `../targets.rs`.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::stage2_adopt(data));
