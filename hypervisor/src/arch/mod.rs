//! Per-architecture code: entry, registers, instructions, exceptions.

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "aarch64")]
pub use aarch64::{give_back_on_panic, shutdown};
#[cfg(target_arch = "aarch64")]
pub const IMAGE_ARCH: loader::image_desc::ImageArch = loader::image_desc::ImageArch::Aarch64;
/// The aarch64 kexec enters the image at its load address: no separate
/// handover entry.
#[cfg(target_arch = "aarch64")]
pub const HANDOVER_ENTRY: u32 = 0;

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::{give_back_on_panic, shutdown};
#[cfg(target_arch = "x86_64")]
pub const IMAGE_ARCH: loader::image_desc::ImageArch = loader::image_desc::ImageArch::X86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::HANDOVER_ENTRY;
