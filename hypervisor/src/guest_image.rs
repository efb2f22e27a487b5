//! Where a guest's image, initrd and device tree go in its RAM, and where
//! it is entered. The image comes from the boot manifest and is untrusted:
//! every placement is checked against the guest's RAM.

use alloc::vec::Vec;
use core::fmt;

use loader::elf::{self, Machine};
use loader::manifest::ImageFormat;

use crate::partition::GUEST_RAM_BASE;

/// arm64 `Image` header (Linux `Documentation/arch/arm64/booting.rst`):
/// text_offset at 8, image_size at 16, magic `ARM\x64` at 56.
const ARM64_MAGIC_OFFSET: usize = 56;
const ARM64_HEADER_LEN: usize = 64;
/// The DTB goes in the top 2 MiB of RAM (it may be at most 2 MiB).
const DTB_SLOT: u64 = 2 << 20;
/// initrds are placed 2 MiB-aligned below the DTB slot.
const INITRD_ALIGN: u64 = 2 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayoutError {
    RamTooSmall,
    NotArm64Image,
    Elf(elf::ElfError),
    SegmentOutsideRam { ipa: u64, size: u64 },
    ImageOverlapsDtb,
    InitrdDoesNotFit,
    DtbTooLarge,
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RamTooSmall => write!(f, "guest RAM smaller than 4 MiB"),
            Self::NotArm64Image => write!(f, "format=image but no arm64 Image header"),
            Self::Elf(e) => write!(f, "ELF image: {e}"),
            Self::SegmentOutsideRam { ipa, size } => {
                write!(f, "image segment {ipa:#x}+{size:#x} outside guest RAM")
            }
            Self::ImageOverlapsDtb => write!(f, "image reaches into the device-tree slot at the top of RAM"),
            Self::InitrdDoesNotFit => write!(f, "initrd does not fit between the image and the device tree"),
            Self::DtbTooLarge => write!(f, "device tree larger than 2 MiB"),
        }
    }
}

/// One copy into guest RAM: `len` bytes from `src_offset` in the image
/// file to guest offset `ram_offset` (the rest of `mem_len` is zeroed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copy {
    pub ram_offset: u64,
    pub src_offset: u64,
    pub len: u64,
    pub mem_len: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestLayout {
    pub copies: Vec<Copy>,
    pub entry_ipa: u64,
    /// Offset of the DTB in RAM (its IPA is `GUEST_RAM_BASE + this`).
    pub dtb_offset: u64,
    /// Offset of the initrd in RAM, if any.
    pub initrd_offset: Option<u64>,
}

impl GuestLayout {
    pub fn dtb_ipa(&self) -> u64 {
        GUEST_RAM_BASE + self.dtb_offset
    }
}

/// Computes the layout for an image of `format` in `ram_size` bytes.
pub fn layout(
    format: ImageFormat,
    image: &[u8],
    ram_size: u64,
    initrd_len: Option<u64>,
) -> Result<GuestLayout, LayoutError> {
    if ram_size < 2 * DTB_SLOT {
        return Err(LayoutError::RamTooSmall);
    }
    let dtb_offset = ram_size - DTB_SLOT;
    let (copies, entry_ipa) = match format {
        ImageFormat::Flat => {
            let len = image.len() as u64;
            (alloc::vec![Copy { ram_offset: 0, src_offset: 0, len, mem_len: len }], GUEST_RAM_BASE)
        }
        ImageFormat::Arm64Image => {
            if image.len() < ARM64_HEADER_LEN || &image[ARM64_MAGIC_OFFSET..ARM64_MAGIC_OFFSET + 4] != b"ARM\x64" {
                return Err(LayoutError::NotArm64Image);
            }
            let word = |at: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&image[at..at + 8]);
                u64::from_le_bytes(w)
            };
            let text_offset = word(8);
            // image_size covers bss; 0 means "unknown" in old kernels.
            let mem_len = word(16).max(image.len() as u64);
            let c = Copy { ram_offset: text_offset, src_offset: 0, len: image.len() as u64, mem_len };
            (alloc::vec![c], GUEST_RAM_BASE.saturating_add(text_offset))
        }
        ImageFormat::Elf => {
            let img = elf::parse(image, Machine::Aarch64).map_err(LayoutError::Elf)?;
            let mut copies = Vec::new();
            for s in &img.segments {
                let ram_offset = s
                    .paddr
                    .checked_sub(GUEST_RAM_BASE)
                    .ok_or(LayoutError::SegmentOutsideRam { ipa: s.paddr, size: s.mem_size })?;
                copies.push(Copy { ram_offset, src_offset: s.file_offset, len: s.file_size, mem_len: s.mem_size });
            }
            (copies, img.entry)
        }
    };
    let mut image_end = 0u64;
    for c in &copies {
        let end =
            c.ram_offset.checked_add(c.mem_len).filter(|&e| e <= ram_size).ok_or(LayoutError::SegmentOutsideRam {
                ipa: GUEST_RAM_BASE.saturating_add(c.ram_offset),
                size: c.mem_len,
            })?;
        image_end = image_end.max(end);
    }
    if image_end > dtb_offset {
        return Err(LayoutError::ImageOverlapsDtb);
    }
    let initrd_offset = match initrd_len {
        None => None,
        Some(len) => {
            let span = len.checked_next_multiple_of(INITRD_ALIGN).ok_or(LayoutError::InitrdDoesNotFit)?;
            let at = dtb_offset.checked_sub(span).ok_or(LayoutError::InitrdDoesNotFit)?;
            if at < image_end.next_multiple_of(INITRD_ALIGN) {
                return Err(LayoutError::InitrdDoesNotFit);
            }
            Some(at)
        }
    };
    Ok(GuestLayout { copies, entry_ipa, dtb_offset, initrd_offset })
}

/// Checks a generated DTB fits its slot.
pub fn check_dtb(len: usize) -> Result<(), LayoutError> {
    if len as u64 > DTB_SLOT {
        Err(LayoutError::DtbTooLarge)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn flat_image_at_ram_base() {
        let l = layout(ImageFormat::Flat, &[0u8; 0x3000], 16 * MIB, None).unwrap();
        assert_eq!(l.entry_ipa, GUEST_RAM_BASE);
        assert_eq!(l.copies, [Copy { ram_offset: 0, src_offset: 0, len: 0x3000, mem_len: 0x3000 }]);
        assert_eq!(l.dtb_ipa(), GUEST_RAM_BASE + 14 * MIB);
    }

    #[test]
    fn arm64_image_uses_header() {
        let mut img = [0u8; 0x1000];
        img[8..16].copy_from_slice(&0x8_0000u64.to_le_bytes());
        img[16..24].copy_from_slice(&0x20_0000u64.to_le_bytes());
        img[56..60].copy_from_slice(b"ARM\x64");
        let l = layout(ImageFormat::Arm64Image, &img, 16 * MIB, Some(3 * MIB)).unwrap();
        assert_eq!(l.entry_ipa, GUEST_RAM_BASE + 0x8_0000);
        assert_eq!(l.copies[0].mem_len, 0x20_0000);
        assert_eq!(l.initrd_offset, Some(10 * MIB));
        assert_eq!(layout(ImageFormat::Arm64Image, &[0u8; 64], 16 * MIB, None), Err(LayoutError::NotArm64Image));
    }

    #[test]
    fn refuses_what_does_not_fit() {
        assert_eq!(layout(ImageFormat::Flat, &[0u8; 16], 2 * MIB, None), Err(LayoutError::RamTooSmall));
        let big = alloc::vec![0u8; (15 * MIB) as usize];
        assert_eq!(layout(ImageFormat::Flat, &big, 16 * MIB, None), Err(LayoutError::ImageOverlapsDtb));
        assert_eq!(layout(ImageFormat::Flat, &[0u8; 16], 16 * MIB, Some(14 * MIB)), Err(LayoutError::InitrdDoesNotFit));
        assert_eq!(layout(ImageFormat::Flat, &[0u8; 16], 16 * MIB, Some(u64::MAX)), Err(LayoutError::InitrdDoesNotFit));
        let mut img = [0u8; 64];
        img[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        img[56..60].copy_from_slice(b"ARM\x64");
        assert!(matches!(
            layout(ImageFormat::Arm64Image, &img, 16 * MIB, None),
            Err(LayoutError::SegmentOutsideRam { .. })
        ));
        assert!(matches!(layout(ImageFormat::Elf, b"nope", 16 * MIB, None), Err(LayoutError::Elf(_))));
        assert!(check_dtb(4096).is_ok());
    }
}
