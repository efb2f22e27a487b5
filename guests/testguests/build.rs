//! Links the guest images at guest RAM (0x4000_0000) with the linker script
//! of their architecture; host builds (stub binaries) link normally.
use std::env;

fn main() {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "none" && (arch == "aarch64" || arch == "x86_64") {
        let dir = env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
        let script = format!("{dir}/src/arch/{arch}/linker.ld");
        println!("cargo:rerun-if-changed={script}");
        println!("cargo:rerun-if-changed={dir}/src/arch/{arch}/entry.S");
        println!("cargo:rustc-link-arg-bins=-T{script}");
    }
}
