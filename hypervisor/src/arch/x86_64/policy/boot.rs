//! Loading an x86_64 guest the way a multiboot2 boot loader would
//! (Multiboot2 Specification, version 2.0): the image is copied into the
//! guest's RAM, a boot information structure (§3.6) goes in the top pages
//! of RAM, and the guest starts in the state of §3.3 "I386 machine state":
//! 32-bit protected mode with paging off, flat 4 GiB code and data
//! segments, interrupts off, EAX = [`BOOTLOADER_MAGIC`] and EBX = the
//! boot information's guest-physical address. The guest sets up its own
//! GDT, IDT, stack and paging, and may switch to long mode.
//!
//! Guest RAM is [`GUEST_RAM_BASE`]..+size, as on aarch64, so the hypercall
//! ABI's address checks are the same on both architectures. A guest with
//! more than one vCPU also gets [`CONVENTIONAL_MEMORY`] bytes at
//! guest-physical 0, in the memory map as available RAM: a start-up IPI
//! starts a vCPU at a page below 1 MiB (SDM Vol. 3A §9.4.4, 000VV000H),
//! so that is where its start-up code must be.

use alloc::vec::Vec;
use core::fmt;

use loader::elf::{self, Machine};
use loader::manifest::ImageFormat;

use crate::guest_image::Copy;
use crate::partition::GUEST_RAM_BASE;

/// EAX at entry (§3.2).
pub const BOOTLOADER_MAGIC: u32 = 0x36d7_6289;
/// The boot information lives in this many bytes at the top of RAM.
pub const BOOT_INFO_SLOT: u64 = 0x2000;
/// Smallest guest RAM accepted: an image, its page tables and stack, and
/// the boot information.
pub const MIN_RAM: u64 = 1 << 20;
/// Boot information tags (§3.6): end, command line, boot loader name,
/// memory map; memory map entry type 1 is available RAM.
const TAG_END: u32 = 0;
const TAG_CMDLINE: u32 = 1;
const TAG_LOADER_NAME: u32 = 2;
const TAG_MMAP: u32 = 6;
const MMAP_ENTRY_SIZE: u32 = 24;
const MMAP_ENTRY_VERSION: u32 = 0;
const MMAP_AVAILABLE: u32 = 1;
/// Tags start at 8-byte boundaries (§3.6.1).
const TAG_ALIGN: usize = 8;
/// What the boot information names as its loader.
pub const LOADER_NAME: &str = "hvlu";
/// Conventional memory at guest-physical 0 of a guest with more than one
/// vCPU, for its application processors' start-up code: 512 KiB, SIPI
/// vectors 00H-7FH.
pub const CONVENTIONAL_MEMORY: u64 = 0x8_0000;

/// The conventional memory a guest with `vcpus` vCPUs gets (0: none).
pub const fn conventional_memory(vcpus: u32) -> u64 {
    if vcpus > 1 {
        CONVENTIONAL_MEMORY
    } else {
        0
    }
}

/// Why a guest cannot be laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootError {
    RamTooSmall {
        min: u64,
    },
    /// arm64 `Image` files do not run on x86_64.
    WrongFormat,
    Elf(elf::ElfError),
    SegmentOutsideRam {
        gpa: u64,
        size: u64,
    },
    /// The image reaches into the boot information slot at the top of RAM.
    ImageOverlapsBootInfo,
    /// The command line does not fit the boot information slot.
    CmdlineTooLong,
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RamTooSmall { min } => write!(f, "guest RAM smaller than {min:#x} bytes"),
            Self::WrongFormat => write!(f, "an arm64 Image cannot boot on x86_64"),
            Self::Elf(e) => write!(f, "ELF image: {e}"),
            Self::SegmentOutsideRam { gpa, size } => write!(f, "image segment {gpa:#x}+{size:#x} outside guest RAM"),
            Self::ImageOverlapsBootInfo => write!(f, "image reaches into the boot information at the top of RAM"),
            Self::CmdlineTooLong => write!(f, "command line does not fit the boot information"),
        }
    }
}

impl BootError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::RamTooSmall { .. } => "ram-too-small",
            Self::WrongFormat => "wrong-image-format",
            Self::Elf(_) => "bad-elf",
            Self::SegmentOutsideRam { .. } => "segment-outside-ram",
            Self::ImageOverlapsBootInfo => "image-overlaps-boot-info",
            Self::CmdlineTooLong => "cmdline-too-long",
        }
    }
}

/// Where everything goes in a guest's RAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootLayout {
    pub copies: Vec<Copy>,
    pub entry_gpa: u64,
    /// Offset of the boot information in RAM.
    pub info_offset: u64,
}

impl BootLayout {
    pub fn info_gpa(&self) -> u64 {
        GUEST_RAM_BASE + self.info_offset
    }
}

/// Lays out `image` in `ram_size` bytes of guest RAM: a flat image at the
/// start of RAM, entered at its first byte, or an ELF64 for x86_64 whose
/// segments' physical addresses lie in RAM, entered at its entry point.
pub fn layout(format: ImageFormat, image: &[u8], ram_size: u64) -> Result<BootLayout, BootError> {
    if ram_size < MIN_RAM {
        return Err(BootError::RamTooSmall { min: MIN_RAM });
    }
    let info_offset = ram_size - BOOT_INFO_SLOT;
    let (copies, entry_gpa) = match format {
        ImageFormat::Flat => {
            let len = image.len() as u64;
            (alloc::vec![Copy { ram_offset: 0, src_offset: 0, len, mem_len: len }], GUEST_RAM_BASE)
        }
        ImageFormat::Arm64Image => return Err(BootError::WrongFormat),
        ImageFormat::Elf => {
            let img = elf::parse(image, Machine::X86_64).map_err(BootError::Elf)?;
            let mut copies = Vec::new();
            for s in &img.segments {
                let outside = BootError::SegmentOutsideRam { gpa: s.paddr, size: s.mem_size };
                let ram_offset = s.paddr.checked_sub(GUEST_RAM_BASE).ok_or(outside.clone())?;
                if ram_offset.checked_add(s.mem_size).is_none_or(|end| end > ram_size) {
                    return Err(outside);
                }
                copies.push(Copy { ram_offset, src_offset: s.file_offset, len: s.file_size, mem_len: s.mem_size });
            }
            (copies, img.entry)
        }
    };
    for c in &copies {
        let end = c.ram_offset.checked_add(c.mem_len).ok_or(BootError::ImageOverlapsBootInfo)?;
        if end > info_offset {
            return Err(BootError::ImageOverlapsBootInfo);
        }
    }
    Ok(BootLayout { copies, entry_gpa, info_offset })
}

fn push_tag(out: &mut Vec<u8>, tag: u32, body: &[u8]) {
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32 + 8).to_le_bytes());
    out.extend_from_slice(body);
    out.resize(out.len().next_multiple_of(TAG_ALIGN), 0);
}

fn c_string(s: &str) -> Vec<u8> {
    s.bytes().chain(core::iter::once(0)).collect()
}

/// The boot information for a guest with `ram_size` bytes of RAM at
/// [`GUEST_RAM_BASE`], `conventional` bytes at 0 (see
/// [`conventional_memory`]) and command line `cmdline` (§3.6.3, §3.6.4,
/// §3.6.8).
pub fn boot_information(ram_size: u64, conventional: u64, cmdline: &str) -> Result<Vec<u8>, BootError> {
    let mut out = alloc::vec![0u8; 8];
    push_tag(&mut out, TAG_CMDLINE, &c_string(cmdline));
    push_tag(&mut out, TAG_LOADER_NAME, &c_string(LOADER_NAME));
    let mut mmap = Vec::new();
    mmap.extend_from_slice(&MMAP_ENTRY_SIZE.to_le_bytes());
    mmap.extend_from_slice(&MMAP_ENTRY_VERSION.to_le_bytes());
    let regions = [(0, conventional), (GUEST_RAM_BASE, ram_size)];
    for (base, len) in regions.into_iter().filter(|&(_, len)| len != 0) {
        mmap.extend_from_slice(&base.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        mmap.extend_from_slice(&MMAP_AVAILABLE.to_le_bytes());
        mmap.extend_from_slice(&0u32.to_le_bytes());
    }
    push_tag(&mut out, TAG_MMAP, &mmap);
    push_tag(&mut out, TAG_END, &[]);
    if out.len() as u64 > BOOT_INFO_SLOT {
        return Err(BootError::CmdlineTooLong);
    }
    let total = out.len() as u32;
    out[..4].copy_from_slice(&total.to_le_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use loader::multiboot2;

    const MIB: u64 = 1 << 20;

    #[test]
    fn flat_image_enters_at_ram_base() {
        let l = layout(ImageFormat::Flat, &[0x90; 0x3000], 4 * MIB).unwrap();
        assert_eq!(l.entry_gpa, GUEST_RAM_BASE);
        assert_eq!(l.copies, [Copy { ram_offset: 0, src_offset: 0, len: 0x3000, mem_len: 0x3000 }]);
        assert_eq!(l.info_gpa(), GUEST_RAM_BASE + 4 * MIB - BOOT_INFO_SLOT);
    }

    #[test]
    fn refuses_what_does_not_fit() {
        assert_eq!(layout(ImageFormat::Flat, &[0; 16], MIB / 2), Err(BootError::RamTooSmall { min: MIN_RAM }));
        let big = alloc::vec![0u8; (MIB - BOOT_INFO_SLOT + 1) as usize];
        assert_eq!(layout(ImageFormat::Flat, &big, MIB), Err(BootError::ImageOverlapsBootInfo));
        assert_eq!(layout(ImageFormat::Arm64Image, &[0; 64], MIB), Err(BootError::WrongFormat));
        assert!(matches!(layout(ImageFormat::Elf, b"nope", MIB), Err(BootError::Elf(_))));
        assert_eq!(BootError::WrongFormat.reason(), "wrong-image-format");
    }

    #[test]
    fn boot_information_parses_as_multiboot2() {
        let info = boot_information(16 * MIB, conventional_memory(1), "ticks=40 passes=2").unwrap();
        assert!(info.len().is_multiple_of(8));
        let (boot, _) = multiboot2::parse(BOOTLOADER_MAGIC, &info, 0x1000).unwrap();
        assert_eq!(boot.cmdline, "ticks=40 passes=2");
        assert_eq!(boot.ram, [loader::PhysRange::new(GUEST_RAM_BASE, 16 * MIB)]);
        let long = "x".repeat(BOOT_INFO_SLOT as usize);
        assert_eq!(boot_information(MIB, 0, &long), Err(BootError::CmdlineTooLong));
    }

    #[test]
    fn more_than_one_vcpu_brings_conventional_memory_for_the_start_up_code() {
        assert_eq!((conventional_memory(1), conventional_memory(2)), (0, 0x8_0000));
        let info = boot_information(16 * MIB, conventional_memory(2), "").unwrap();
        let (boot, _) = multiboot2::parse(BOOTLOADER_MAGIC, &info, 0x1000).unwrap();
        assert_eq!(boot.ram, [loader::PhysRange::new(0, 0x8_0000), loader::PhysRange::new(GUEST_RAM_BASE, 16 * MIB)]);
        // SIPI vectors 00H-7FH address it (000VV000H).
        const { assert!(0x7f_000 + 0x1000 <= CONVENTIONAL_MEMORY) };
    }
}
