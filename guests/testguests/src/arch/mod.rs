//! Runtimes that implement [`crate::Guest`] on real (virtual) machines.

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub mod aarch64;
#[cfg(any(test, all(target_arch = "x86_64", target_os = "none")))]
pub mod x86_64;
