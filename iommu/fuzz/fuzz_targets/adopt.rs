//! Fuzz target `adopt`: see `iommu::testing::adopt_arbitrary`. The
//! running SMMUs it starts from are built once per process.
#![no_main]

std::thread_local! {
    static SETUPS: iommu::testing::AdoptSetups = iommu::testing::AdoptSetups::new();
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| SETUPS.with(|setups| iommu::testing::adopt_arbitrary(setups, data)));
