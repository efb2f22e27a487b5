//! ptimer guest (aarch64): the emulated EL1 physical timer raises its
//! interrupt (`arch::aarch64::physical_timer`). On x86_64 it only says it
//! does not apply there.
#![cfg_attr(target_os = "none", no_std, no_main)]

/// On the host this is only a stub: the guest is built with
/// `--target aarch64-unknown-none` and booted by the hypervisor.
#[cfg(not(target_os = "none"))]
fn main() {}

#[cfg(all(target_os = "none", target_arch = "aarch64"))]
testguests::entry!(testguests::arch::aarch64::physical_timer::run);

#[cfg(all(target_os = "none", target_arch = "x86_64"))]
fn unsupported<G: testguests::Guest>(g: &mut G, _: &testguests::Env) {
    g.write_line(testguests::Line::event("ptimer").field("unsupported", "aarch64-only"));
}

#[cfg(all(target_os = "none", target_arch = "x86_64"))]
testguests::entry!(unsupported);
