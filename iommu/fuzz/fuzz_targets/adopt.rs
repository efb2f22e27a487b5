//! Fuzz target `adopt`: see `iommu::testing::adopt_arbitrary`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| iommu::testing::adopt_arbitrary(data));
