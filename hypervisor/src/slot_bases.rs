// Where hypervisor images are linked: two slots per architecture, used
// alternately by live updates (`slots.rs`). Shared by `build.rs`, which
// links the image at the slot `HV_SLOT` names, and the library.

/// aarch64: QEMU's `-kernel` loads an arm64 Image at RAM base + 2 MiB +
/// text_offset on the `virt` machine; slot 0 is where text_offset 0 puts
/// it, slot 1 the next 16 MiB.
pub const AARCH64_SLOT_BASES: [u64; 2] = [0x4020_0000, 0x4120_0000];
/// x86_64: GRUB loads the multiboot2 ELF at its physical addresses.
pub const X86_64_SLOT_BASES: [u64; 2] = [0x20_0000, 0x120_0000];
/// Each slot's size: an image's whole footprint (file, bss, stacks) must
/// fit.
pub const SLOT_SIZE: u64 = 16 << 20;
