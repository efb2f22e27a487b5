//! Runtimes that implement [`crate::Guest`] on real (virtual) machines.

pub mod aarch64;
