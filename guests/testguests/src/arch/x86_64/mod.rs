//! The x86_64 runtime of the test guests: the boot information parser and
//! the fault tests (host-tested) and, on the bare-metal target, the
//! runtime itself.

#[cfg(target_os = "none")]
pub mod debugpriv;
pub mod fault_test;
#[cfg(target_os = "none")]
pub mod hostile;
pub mod multiboot;
#[cfg(target_os = "none")]
pub mod runtime;
