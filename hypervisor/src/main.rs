//! The hypervisor image: arch entry points around the core in `lib.rs`.
//!
//! Built for `aarch64-unknown-none` (an arm64 Image entered at EL2) and
//! `x86_64-unknown-none` (a multiboot2 ELF). On the host this binary only
//! says how to build it; the core's tests run with `cargo test`.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod arch;
#[cfg(target_os = "none")]
mod heap;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "hypervisor {}: this is a bare-metal image; build it with --target aarch64-unknown-none \
         or --target x86_64-unknown-none, or boot it with scripts/run",
        hypervisor::VERSION
    );
    std::process::exit(2);
}

/// The image descriptor (`loader::image_desc`): update images are checked
/// against it before a live update. The launcher seals size and checksum.
#[cfg(target_os = "none")]
#[used]
#[link_section = ".hvlu_descriptor"]
static IMAGE_DESCRIPTOR: [u8; loader::image_desc::DESCRIPTOR_LEN] = loader::image_desc::with_handover_entry(
    loader::image_desc::descriptor(
        arch::IMAGE_ARCH,
        hypervisor::HANDOVER_ABI_MIN,
        hypervisor::HANDOVER_ABI_MAX,
        hypervisor::VERSION,
        hypervisor::BUILD_ID,
    ),
    arch::DESCRIPTOR_ENTRY,
);

/// What this image reads (`loader::image_readers`): the running image
/// checks it, record by record, before it freezes for an update to this one.
#[cfg(target_os = "none")]
#[used]
#[link_section = ".hvlu_readers"]
static READERS: [u8; loader::image_readers::TABLE_LEN] = loader::image_readers::table(&hypervisor::READS);

#[cfg(target_os = "none")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    // While the old image prepares this one in the brownout, a panic goes
    // back to it (and this image is entered unprepared, if at all).
    arch::abort_if_preparing();
    hypervisor::console::write_line_forced(format_args!("hv: panic {info}"));
    // A new image that panics before the guests resume gives the machine
    // back to the old one (`kho/ABI.md` §5.2); this returns otherwise.
    arch::give_back_on_panic(info);
    hypervisor::console::write_line_forced(format_args!("hv: shutdown status=error"));
    arch::shutdown(false)
}
