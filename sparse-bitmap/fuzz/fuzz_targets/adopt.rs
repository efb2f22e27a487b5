//! Feeds arbitrary bytes to `MultiOrderBitmap::adopt` as a previous image's
//! memory; `adopt_arbitrary` panics if an accepted map misbehaves.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sparse_bitmap::testing::adopt_arbitrary(data);
});
