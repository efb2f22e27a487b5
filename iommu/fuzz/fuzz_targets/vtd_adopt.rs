//! Fuzz target `vtd_adopt`: see `iommu::testing::vtd_adopt_arbitrary`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| iommu::testing::vtd_adopt_arbitrary(data));
