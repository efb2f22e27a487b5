//! debugpriv guest (aarch64): breakpoints and watchpoints stay each
//! guest's own (`arch::aarch64::debugpriv`). On x86_64 it only says it does
//! not apply there.
#![cfg_attr(target_os = "none", no_std, no_main)]

/// On the host this is only a stub: the guest is built with
/// `--target aarch64-unknown-none` and booted by the hypervisor.
#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(all(target_os = "none", target_arch = "aarch64"))]
testguests::entry!(testguests::arch::aarch64::debugpriv::run);

#[cfg(all(target_os = "none", target_arch = "x86_64"))]
fn unsupported<G: testguests::Guest>(g: &mut G, _: &testguests::Env) {
    g.write_line(testguests::Line::event("debugpriv").field("unsupported", "aarch64-only"));
}

#[cfg(all(target_os = "none", target_arch = "x86_64"))]
testguests::entry!(unsupported);
