//! Feeds arbitrary bytes to `MultiOrderBitmap::adopt` as a previous image's
//! memory; `adopt_arbitrary` panics if an accepted map misbehaves. One
//! arena per process, reset for each input.
#![no_main]

use libfuzzer_sys::fuzz_target;

std::thread_local! {
    static ARENA: sparse_bitmap::testing::Arena = sparse_bitmap::testing::fuzz_arena();
}

fuzz_target!(|data: &[u8]| {
    ARENA.with(|arena| sparse_bitmap::testing::adopt_arbitrary_in(arena, data));
});
