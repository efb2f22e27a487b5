//! Per-architecture code: entry, registers, instructions, exceptions.

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "aarch64")]
pub use aarch64::{abort_if_preparing, give_back_on_panic, shutdown};
#[cfg(target_arch = "aarch64")]
pub const IMAGE_ARCH: loader::image_desc::ImageArch = loader::image_desc::ImageArch::Aarch64;
/// The aarch64 kexec enters the image at its load address; the
/// descriptor's entry field names the brownout entry instead
/// (`aarch64/prepare.rs`).
#[cfg(target_arch = "aarch64")]
pub use aarch64::PREPARE_ENTRY as DESCRIPTOR_ENTRY;

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::{give_back_on_panic, shutdown};
/// x86_64 images are not prepared in the brownout.
#[cfg(target_arch = "x86_64")]
pub fn abort_if_preparing() {}
#[cfg(target_arch = "x86_64")]
pub const IMAGE_ARCH: loader::image_desc::ImageArch = loader::image_desc::ImageArch::X86_64;
/// The descriptor's entry field on x86_64: the handover entry.
#[cfg(target_arch = "x86_64")]
pub use x86_64::HANDOVER_ENTRY as DESCRIPTOR_ENTRY;
