//! Links the bare-metal build as a static Linux executable at 0x400000.
use std::env;

fn main() {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "none" && arch == "aarch64" {
        let dir = env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
        let script = format!("{dir}/src/linker.ld");
        println!("cargo:rerun-if-changed={script}");
        println!("cargo:rustc-link-arg-bins=-T{script}");
    }
}
