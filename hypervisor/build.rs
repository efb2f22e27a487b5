//! Selects the linker script for the bare-metal image and the image slot
//! it is linked for (`HV_SLOT`: 0, the default, or 1; `src/slot_bases.rs`).
use std::env;

include!("src/slot_bases.rs");

fn main() {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    println!("cargo:rerun-if-env-changed=HV_VERSION");
    println!("cargo:rerun-if-env-changed=HV_BUILD_ID");
    println!("cargo:rerun-if-env-changed=HV_SLOT");
    println!("cargo:rerun-if-env-changed=HV_TEST_BSS_PAD_MIB");
    println!("cargo:rerun-if-env-changed=HV_TEST_READS_CONTEXT_MAX");
    println!("cargo:rerun-if-changed=src/slot_bases.rs");
    if os == "none" && (arch == "aarch64" || arch == "x86_64") {
        let slot = match env::var("HV_SLOT").as_deref() {
            Err(_) | Ok("" | "0") => 0,
            Ok("1") => 1,
            Ok(other) => panic!("HV_SLOT must be 0 or 1, not {other:?}"),
        };
        let bases = if arch == "aarch64" { AARCH64_SLOT_BASES } else { X86_64_SLOT_BASES };
        let dir = env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
        let script = format!("{dir}/src/arch/{arch}/linker.ld");
        println!("cargo:rerun-if-changed={script}");
        println!("cargo:rustc-link-arg-bins=--defsym=HV_IMAGE_BASE={:#x}", bases[slot]);
        println!("cargo:rustc-link-arg-bins=--defsym=HV_SLOT0_BASE={:#x}", bases[0]);
        println!("cargo:rustc-link-arg-bins=-T{script}");
    }
}
