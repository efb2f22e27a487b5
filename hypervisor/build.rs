//! Selects the linker script for the bare-metal image.
use std::env;

fn main() {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    println!("cargo:rerun-if-env-changed=HV_VERSION");
    println!("cargo:rerun-if-env-changed=HV_BUILD_ID");
    println!("cargo:rerun-if-env-changed=HV_TEST_BSS_PAD_MIB");
    println!("cargo:rerun-if-env-changed=HV_TEST_READS_CONTEXT_MAX");
    if os == "none" && (arch == "aarch64" || arch == "x86_64") {
        let dir = env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
        let script = format!("{dir}/src/arch/{arch}/linker.ld");
        println!("cargo:rerun-if-changed={script}");
        println!("cargo:rustc-link-arg-bins=-T{script}");
    }
}
