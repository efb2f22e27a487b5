//! The hypervisor image descriptor: what an update image declares about
//! itself (architecture, handover ABI range, version, size, checksum), so a
//! running hypervisor can refuse a bad image before anything changes.
//!
//! The descriptor is 104 bytes, 8-byte aligned, within the first 64 KiB of
//! the image file (right after the 64-byte header in an arm64 Image). All
//! integers little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `HVLUIMG\0` |
//! | 8 | 4 | descriptor version (1) |
//! | 12 | 4 | architecture: 1 aarch64, 2 x86_64 |
//! | 16 | 4 | lowest handover ABI the image reads |
//! | 20 | 4 | highest handover ABI the image reads (and writes) |
//! | 24 | 8 | image size in bytes (the whole file) |
//! | 32 | 4 | CRC-32 (kho's) of the file with these 4 bytes zeroed |
//! | 36 | 4 | entry: x86_64 the handover entry the kexec enters; aarch64 the brownout entry (`kho/ABI.md` §5.3); 0 if none |
//! | 40 | 32 | version, NUL-padded UTF-8 |
//! | 72 | 32 | build id, NUL-padded UTF-8 |
//!
//! The image is built with size and checksum 0; the launcher seals it
//! ([`seal`]) after linking.
//!
//! The handover entry (offset 36) is where a live update enters an x86_64
//! image: in 64-bit mode, paging on with the low 4 GiB identity-mapped,
//! interrupts off, RDI = the handover's physical address, RSI = the
//! multiboot2 information's, RDX = the TSC at the jump (`kho/ABI.md`
//! §4.6). Images with 0 there cannot be live-updated into on x86_64. The
//! aarch64 kexec enters the image at its load address (x0 = DTB, x1 =
//! handover); there the field names the brownout entry, which the running
//! image calls to let the new one prepare itself before the freeze
//! (`kho/ABI.md` §5.3), and 0 means the image is entered unprepared.

use crate::bytes::{le32, le64};
use core::fmt;

pub const MAGIC: &[u8; 8] = b"HVLUIMG\0";
pub const DESCRIPTOR_VERSION: u32 = 1;
pub const DESCRIPTOR_LEN: usize = 104;
/// How far into the image the descriptor may be.
pub const SEARCH_LIMIT: usize = 64 << 10;
const OFF_ARCH: usize = 12;
const OFF_ABI_MIN: usize = 16;
const OFF_ABI_MAX: usize = 20;
const OFF_SIZE: usize = 24;
const OFF_CRC: usize = 32;
const OFF_HANDOVER_ENTRY: usize = 36;
const OFF_VERSION: usize = 40;
const OFF_BUILD: usize = 72;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ImageArch {
    Aarch64 = 1,
    X86_64 = 2,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageError {
    Truncated,
    NoDescriptor,
    BadDescriptorVersion(u32),
    WrongArch { expected: ImageArch, found: u32 },
    AbiMismatch { running: u32, min: u32, max: u32 },
    SizeMismatch { declared: u64, actual: u64 },
    ChecksumMismatch { declared: u32, actual: u32 },
    TooLarge { size: u64, limit: u64 },
    NotSealed,
}

impl ImageError {
    /// A short token for `hv: update-refused reason=...`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::NoDescriptor => "no-descriptor",
            Self::BadDescriptorVersion(_) => "descriptor-version",
            Self::WrongArch { .. } => "wrong-arch",
            Self::AbiMismatch { .. } => "incompatible-abi",
            Self::SizeMismatch { .. } => "size-mismatch",
            Self::ChecksumMismatch { .. } => "bad-checksum",
            Self::TooLarge { .. } => "too-large",
            Self::NotSealed => "not-sealed",
        }
    }
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => write!(f, "image shorter than its descriptor"),
            Self::NoDescriptor => write!(f, "no HVLUIMG descriptor in the first 64 KiB"),
            Self::BadDescriptorVersion(v) => write!(f, "descriptor version {v} unknown"),
            Self::WrongArch { expected, found } => write!(f, "image is for arch {found}, not {expected:?}"),
            Self::AbiMismatch { running, min, max } => {
                write!(f, "image reads handover ABI {min}..={max}, running ABI is {running}")
            }
            Self::SizeMismatch { declared, actual } => {
                write!(f, "descriptor says {declared} bytes, image has {actual}")
            }
            Self::ChecksumMismatch { declared, actual } => {
                write!(f, "checksum {actual:#010x} does not match the declared {declared:#010x}")
            }
            Self::TooLarge { size, limit } => write!(f, "image of {size} bytes exceeds the {limit}-byte limit"),
            Self::NotSealed => write!(f, "image was never sealed (size 0)"),
        }
    }
}

/// The descriptor bytes an image embeds (size and checksum left 0 for
/// [`seal`]). Strings longer than 31 bytes are truncated.
pub const fn descriptor(
    arch: ImageArch,
    abi_min: u32,
    abi_max: u32,
    version: &str,
    build: &str,
) -> [u8; DESCRIPTOR_LEN] {
    let mut out = [0u8; DESCRIPTOR_LEN];
    let mut pos = 0;
    while pos < MAGIC.len() {
        out[pos] = MAGIC[pos];
        pos += 1;
    }
    let words = [(8, DESCRIPTOR_VERSION), (OFF_ARCH, arch as u32), (OFF_ABI_MIN, abi_min), (OFF_ABI_MAX, abi_max)];
    let mut word = 0;
    while word < words.len() {
        let (at, value) = words[word];
        let bytes = value.to_le_bytes();
        let mut byte = 0;
        while byte < bytes.len() {
            out[at + byte] = bytes[byte];
            byte += 1;
        }
        word += 1;
    }
    let texts = [(OFF_VERSION, version.as_bytes()), (OFF_BUILD, build.as_bytes())];
    let mut text_index = 0;
    while text_index < texts.len() {
        let (at, bytes) = texts[text_index];
        let mut byte = 0;
        while byte < bytes.len() && byte < 31 {
            out[at + byte] = bytes[byte];
            byte += 1;
        }
        text_index += 1;
    }
    out
}

/// `desc` with its handover entry (offset 36) set to `entry`.
pub const fn with_handover_entry(mut desc: [u8; DESCRIPTOR_LEN], entry: u32) -> [u8; DESCRIPTOR_LEN] {
    let bytes = entry.to_le_bytes();
    let mut byte = 0;
    while byte < bytes.len() {
        desc[OFF_HANDOVER_ENTRY + byte] = bytes[byte];
        byte += 1;
    }
    desc
}

/// A validated descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub offset: usize,
    pub arch: u32,
    pub abi_min: u32,
    pub abi_max: u32,
    pub size: u64,
    pub crc: u32,
    /// Physical address of the image's entry for a live update, 0 if none:
    /// the 64-bit handover entry on x86_64, the brownout entry on aarch64.
    pub handover_entry: u32,
    pub version: [u8; 32],
    pub build: [u8; 32],
}

impl Descriptor {
    pub fn version_str(&self) -> &str {
        text(&self.version)
    }

    pub fn build_str(&self) -> &str {
        text(&self.build)
    }
}

fn text(field: &[u8; 32]) -> &str {
    let end = field.iter().position(|&b| b == 0).unwrap_or(32);
    core::str::from_utf8(&field[..end]).unwrap_or("")
}

/// Finds and decodes the descriptor (no checks beyond its own layout).
pub fn find(image: &[u8]) -> Result<Descriptor, ImageError> {
    let window = &image[..image.len().min(SEARCH_LIMIT)];
    let offset = (0..window.len().saturating_sub(DESCRIPTOR_LEN - 1))
        .step_by(8)
        .find(|&o| &window[o..o + 8] == MAGIC)
        .ok_or(ImageError::NoDescriptor)?;
    let d = &image[offset..offset + DESCRIPTOR_LEN];
    let version = le32(d, 8);
    if version != DESCRIPTOR_VERSION {
        return Err(ImageError::BadDescriptorVersion(version));
    }
    let mut v = [0u8; 32];
    let mut b = [0u8; 32];
    v.copy_from_slice(&d[OFF_VERSION..OFF_VERSION + 32]);
    b.copy_from_slice(&d[OFF_BUILD..OFF_BUILD + 32]);
    Ok(Descriptor {
        offset,
        arch: le32(d, OFF_ARCH),
        abi_min: le32(d, OFF_ABI_MIN),
        abi_max: le32(d, OFF_ABI_MAX),
        size: le64(d, OFF_SIZE),
        crc: le32(d, OFF_CRC),
        handover_entry: le32(d, OFF_HANDOVER_ENTRY),
        version: v,
        build: b,
    })
}

fn checksum(image: &[u8], offset: usize) -> u32 {
    let crc_at = offset + OFF_CRC;
    // CRC over the file with the checksum field read as zero, without
    // copying the image: the three pieces are fed in order.
    kho::crc32_parts(&[&image[..crc_at], &[0u8; 4], &image[crc_at + 4..]])
}

/// Validates an update image for `arch` against the running handover ABI
/// and a size limit (the scratch space it must fit in).
pub fn validate(image: &[u8], arch: ImageArch, running_abi: u32, limit: u64) -> Result<Descriptor, ImageError> {
    if image.len() < DESCRIPTOR_LEN {
        return Err(ImageError::Truncated);
    }
    let d = find(image)?;
    if d.arch != arch as u32 {
        return Err(ImageError::WrongArch { expected: arch, found: d.arch });
    }
    if !(d.abi_min..=d.abi_max).contains(&running_abi) {
        return Err(ImageError::AbiMismatch { running: running_abi, min: d.abi_min, max: d.abi_max });
    }
    if d.size == 0 {
        return Err(ImageError::NotSealed);
    }
    if d.size != image.len() as u64 {
        return Err(ImageError::SizeMismatch { declared: d.size, actual: image.len() as u64 });
    }
    if d.size > limit {
        return Err(ImageError::TooLarge { size: d.size, limit });
    }
    let actual = checksum(image, d.offset);
    if actual != d.crc {
        return Err(ImageError::ChecksumMismatch { declared: d.crc, actual });
    }
    Ok(d)
}

/// Fills in size and checksum (the launcher does this after linking).
pub fn seal(image: &mut [u8]) -> Result<Descriptor, ImageError> {
    let d = find(image)?;
    let size = image.len() as u64;
    image[d.offset + OFF_SIZE..d.offset + OFF_SIZE + 8].copy_from_slice(&size.to_le_bytes());
    let crc = checksum(image, d.offset);
    image[d.offset + OFF_CRC..d.offset + OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    find(image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    fn image(arch: u32, abi: (u32, u32)) -> Vec<u8> {
        let mut img = vec![0xaau8; 4096];
        let a = if arch == 1 { ImageArch::Aarch64 } else { ImageArch::X86_64 };
        img[64..64 + DESCRIPTOR_LEN].copy_from_slice(&descriptor(a, abi.0, abi.1, "0.2.0", "abc"));
        img
    }

    #[test]
    fn sealed_image_validates() {
        let mut img = image(1, (1, 2));
        assert_eq!(validate(&img, ImageArch::Aarch64, 1, 1 << 20), Err(ImageError::NotSealed));
        let d = seal(&mut img).unwrap();
        assert_eq!(d.offset, 64);
        assert_eq!(d.version_str(), "0.2.0");
        assert_eq!(d.build_str(), "abc");
        assert_eq!(validate(&img, ImageArch::Aarch64, 1, 1 << 20).unwrap().size, 4096);
    }

    #[test]
    fn handover_entry_round_trips() {
        let mut img = image(2, (1, 1));
        assert_eq!(find(&img).unwrap().handover_entry, 0);
        let d = with_handover_entry(descriptor(ImageArch::X86_64, 1, 1, "0.2.0", "abc"), 0x20_0100);
        img[64..64 + DESCRIPTOR_LEN].copy_from_slice(&d);
        seal(&mut img).unwrap();
        assert_eq!(validate(&img, ImageArch::X86_64, 1, 1 << 20).unwrap().handover_entry, 0x20_0100);
    }

    #[test]
    fn every_refusal() {
        let mut img = image(1, (2, 3));
        seal(&mut img).unwrap();
        assert!(matches!(validate(&img, ImageArch::Aarch64, 1, 1 << 20), Err(ImageError::AbiMismatch { .. })));
        let mut img = image(2, (1, 1));
        seal(&mut img).unwrap();
        assert!(matches!(validate(&img, ImageArch::Aarch64, 1, 1 << 20), Err(ImageError::WrongArch { .. })));
        let mut img = image(1, (1, 1));
        seal(&mut img).unwrap();
        assert!(matches!(validate(&img, ImageArch::Aarch64, 1, 1024), Err(ImageError::TooLarge { .. })));
        assert!(matches!(validate(&img[..2048], ImageArch::Aarch64, 1, 1 << 20), Err(ImageError::SizeMismatch { .. })));
        let mut corrupt = img.clone();
        corrupt[3000] ^= 1;
        assert!(matches!(validate(&corrupt, ImageArch::Aarch64, 1, 1 << 20), Err(ImageError::ChecksumMismatch { .. })));
        assert_eq!(validate(&img[..50], ImageArch::Aarch64, 1, 1 << 20), Err(ImageError::Truncated));
        assert_eq!(validate(&[0u8; 4096], ImageArch::Aarch64, 1, 1 << 20), Err(ImageError::NoDescriptor));
    }

    proptest! {
        #[test]
        fn corrupted_images_never_panic(flips in proptest::collection::vec((0usize..4096, any::<u8>()), 1..6), cut in 0usize..4096) {
            let mut img = image(1, (1, 1));
            seal(&mut img).unwrap();
            for (at, b) in flips {
                img[at] = b;
            }
            let _ = validate(&img[..cut.max(1)], ImageArch::Aarch64, 1, 1 << 20);
            let _ = validate(&img, ImageArch::Aarch64, 1, 1 << 20);
        }
    }
}
