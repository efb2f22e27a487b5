//! ELF64 image validation and loading (System V gABI, "Program Header").
//!
//! Used for the hypervisor's own images: by the launcher, to turn the
//! aarch64 build into a flat arm64 Image, and (later) by a running
//! hypervisor to check an update image before anything changes.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use elf::abi::{EM_AARCH64, EM_X86_64, ET_EXEC, PT_LOAD};
use elf::endian::LittleEndian;
use elf::ElfBytes;

/// Largest image accepted: an image must fit in the scratch area.
pub const MAX_IMAGE_SPAN: u64 = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    Aarch64,
    X86_64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ElfError {
    Parse,
    NotExecutable(u16),
    WrongMachine { expected: Machine, found: u16 },
    NoSegments,
    SegmentOutOfFile { index: usize },
    BadSegment { index: usize },
    OverlappingSegments,
    TooLarge(u64),
    EntryOutsideImage(u64),
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Parse => write!(f, "not a little-endian ELF64 file"),
            Self::NotExecutable(t) => write!(f, "ELF type {t} is not ET_EXEC"),
            Self::WrongMachine { expected, found } => write!(f, "ELF machine {found} is not {expected:?}"),
            Self::NoSegments => write!(f, "no PT_LOAD segment"),
            Self::SegmentOutOfFile { index } => write!(f, "segment {index} lies outside the file"),
            Self::BadSegment { index } => write!(f, "segment {index} has memsz < filesz or wraps"),
            Self::OverlappingSegments => write!(f, "PT_LOAD segments overlap"),
            Self::TooLarge(s) => write!(f, "image spans {s} bytes, more than {MAX_IMAGE_SPAN}"),
            Self::EntryOutsideImage(e) => write!(f, "entry point {e:#x} outside the image"),
        }
    }
}

/// One validated PT_LOAD segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSegment {
    pub paddr: u64,
    pub file_offset: u64,
    pub file_size: u64,
    pub mem_size: u64,
}

/// A validated executable: its segments sorted by physical address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub entry: u64,
    pub segments: Vec<LoadSegment>,
}

impl Image {
    /// Lowest load address.
    pub fn base(&self) -> u64 {
        self.segments.first().map_or(0, |s| s.paddr)
    }

    /// One past the highest byte in memory (file data plus zero fill).
    pub fn end(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.paddr + s.mem_size)
    }
}

/// Parses and validates `bytes` as an executable for `machine`.
pub fn parse(bytes: &[u8], machine: Machine) -> Result<Image, ElfError> {
    let file = ElfBytes::<LittleEndian>::minimal_parse(bytes).map_err(|_| ElfError::Parse)?;
    let hdr = &file.ehdr;
    if hdr.class != elf::file::Class::ELF64 {
        return Err(ElfError::Parse);
    }
    if hdr.e_type != ET_EXEC {
        return Err(ElfError::NotExecutable(hdr.e_type));
    }
    let want = match machine {
        Machine::Aarch64 => EM_AARCH64,
        Machine::X86_64 => EM_X86_64,
    };
    if hdr.e_machine != want {
        return Err(ElfError::WrongMachine { expected: machine, found: hdr.e_machine });
    }
    let phdrs = file.segments().ok_or(ElfError::NoSegments)?;
    let mut segments = Vec::new();
    for (index, ph) in phdrs.iter().enumerate() {
        if ph.p_type != PT_LOAD || ph.p_memsz == 0 {
            continue;
        }
        let file_end = ph.p_offset.checked_add(ph.p_filesz).ok_or(ElfError::SegmentOutOfFile { index })?;
        if file_end > bytes.len() as u64 {
            return Err(ElfError::SegmentOutOfFile { index });
        }
        if ph.p_memsz < ph.p_filesz || ph.p_paddr.checked_add(ph.p_memsz).is_none() {
            return Err(ElfError::BadSegment { index });
        }
        segments.push(LoadSegment {
            paddr: ph.p_paddr,
            file_offset: ph.p_offset,
            file_size: ph.p_filesz,
            mem_size: ph.p_memsz,
        });
    }
    if segments.is_empty() {
        return Err(ElfError::NoSegments);
    }
    segments.sort_unstable_by_key(|s| s.paddr);
    if segments.windows(2).any(|w| w[0].paddr + w[0].mem_size > w[1].paddr) {
        return Err(ElfError::OverlappingSegments);
    }
    let image = Image { entry: hdr.e_entry, segments };
    let span = image.end() - image.base();
    if span > MAX_IMAGE_SPAN {
        return Err(ElfError::TooLarge(span));
    }
    if hdr.e_entry < image.base() || hdr.e_entry >= image.end() {
        return Err(ElfError::EntryOutsideImage(hdr.e_entry));
    }
    Ok(image)
}

/// The image as one flat byte array starting at [`Image::base`], with
/// gaps zero-filled and trailing zero-fill (bss) omitted: the layout of
/// an arm64 `Image`.
pub fn flatten(bytes: &[u8], image: &Image) -> Vec<u8> {
    let file_end =
        image.segments.iter().filter(|s| s.file_size != 0).map(|s| s.paddr + s.file_size).max().unwrap_or(image.base());
    let mut out = vec![0u8; (file_end - image.base()) as usize];
    for s in image.segments.iter().filter(|s| s.file_size != 0) {
        let dst = (s.paddr - image.base()) as usize;
        let src = s.file_offset as usize;
        let n = s.file_size as usize;
        out[dst..dst + n].copy_from_slice(&bytes[src..src + n]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal ELF64 with one PT_LOAD of `code` at `paddr`.
    fn tiny_elf(machine: u16, paddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // ELFCLASS64
        b[5] = 1; // little endian
        b[6] = 1; // EV_CURRENT
        b[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
        b[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        b[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        b[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        b[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 64;
        b[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        b[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
        b[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        b[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
        b[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        b[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        b[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        b.extend_from_slice(code);
        b
    }

    #[test]
    fn parse_and_flatten() {
        let elf = tiny_elf(EM_AARCH64, 0x4020_0000, &[1, 2, 3, 4], 0x1000);
        let img = parse(&elf, Machine::Aarch64).unwrap();
        assert_eq!(img.base(), 0x4020_0000);
        assert_eq!(img.end(), 0x4020_1000);
        assert_eq!(flatten(&elf, &img), [1, 2, 3, 4]);
    }

    #[test]
    fn wrong_machine_truncated_and_huge() {
        let elf = tiny_elf(EM_AARCH64, 0x4020_0000, &[0; 16], 16);
        assert_eq!(
            parse(&elf, Machine::X86_64),
            Err(ElfError::WrongMachine { expected: Machine::X86_64, found: EM_AARCH64 })
        );
        assert_eq!(parse(&elf[..elf.len() - 8], Machine::Aarch64), Err(ElfError::SegmentOutOfFile { index: 0 }));
        let huge = tiny_elf(EM_X86_64, 0x20_0000, &[0; 16], MAX_IMAGE_SPAN + 1);
        assert_eq!(parse(&huge, Machine::X86_64), Err(ElfError::TooLarge(MAX_IMAGE_SPAN + 1)));
        let wrap = tiny_elf(EM_X86_64, u64::MAX - 4, &[0; 16], 16);
        assert_eq!(parse(&wrap, Machine::X86_64), Err(ElfError::BadSegment { index: 0 }));
        assert_eq!(parse(b"not an elf", Machine::X86_64), Err(ElfError::Parse));
    }

    proptest! {
        #[test]
        fn mutated_elf_never_panics(flips in proptest::collection::vec((0usize..136, any::<u8>()), 1..6)) {
            let mut elf = tiny_elf(EM_X86_64, 0x20_0000, &[0x90; 16], 0x100);
            for (at, byte) in flips {
                elf[at] = byte;
            }
            if let Ok(img) = parse(&elf, Machine::X86_64) {
                let _ = flatten(&elf, &img);
            }
        }
    }
}
