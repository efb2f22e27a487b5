//! The arch-independent core of the hypervisor.
//!
//! Everything here builds for the host as well as for the bare-metal
//! targets, so it is unit-tested with `cargo test`. The image itself
//! (`src/main.rs` and `src/arch/<arch>/`) supplies the registers,
//! instructions and exception entry, and calls into this core.
#![no_std]

extern crate alloc;

pub mod console;
pub mod events;
pub mod frames;
pub mod guest_console;
pub mod guest_dtb;
pub mod guest_image;
pub mod hypercall;
pub mod live_update;
pub mod machine;
pub mod partition;
pub mod pci;
pub mod preserved;
pub mod records;
pub mod sched;
pub mod stage2;

/// Each architecture's guest policy that is pure logic, host-tested here:
/// the image's arch code (`src/arch/<arch>/`, built only into the image)
/// applies it. The files live with the rest of their arch.
pub mod arch {
    /// aarch64: the virtual GICv3 and the ID registers a guest sees.
    #[path = "aarch64/policy/mod.rs"]
    pub mod aarch64;
    /// x86_64: VMX capabilities and controls, exit decoding, and what a
    /// guest sees (CPUID, MSRs, control registers, its boot protocol).
    #[path = "x86_64/policy/mod.rs"]
    pub mod x86_64;
}

/// The version this image reports in `hv: boot` and to guests. The
/// launcher overrides it (`HV_VERSION`) to build distinct update images.
pub const VERSION: &str = match option_env!("HV_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// Build identifier (the launcher passes the git revision as `HV_BUILD_ID`).
pub const BUILD_ID: &str = match option_env!("HV_BUILD_ID") {
    Some(v) => v,
    None => "dev",
};

/// The handover ABI versions this image reads. It writes the newest.
pub const HANDOVER_ABI_MIN: u32 = 1;
pub const HANDOVER_ABI_MAX: u32 = kho::HANDOVER_ABI;
