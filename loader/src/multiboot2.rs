//! Multiboot2 boot information (the Multiboot2 Specification, version 2.0,
//! §3.6 "Boot information format"), as GRUB leaves it for the first boot on
//! x86_64. Parsing is bounds-checked throughout: a malformed structure is a
//! [`Mb2Error`], never a panic.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::{sort_disjoint, BootInfo, BootModule, PhysRange};

/// §3.2: the value in EAX when a Multiboot2 loader enters the image.
pub const BOOTLOADER_MAGIC: u32 = 0x36d7_6289;
/// §3.1.1: header magic, placed in the image.
pub const HEADER_MAGIC: u32 = 0xe852_50d6;

const TAG_END: u32 = 0;
const TAG_CMDLINE: u32 = 1;
const TAG_MODULE: u32 = 3;
const TAG_MMAP: u32 = 6;
const TAG_ACPI_OLD: u32 = 14;
const TAG_ACPI_NEW: u32 = 15;
/// §3.6.12: the EFI 64-bit system table pointer: the boot loader was an
/// EFI application (GRUB on UEFI firmware), which left boot services
/// before the jump unless asked not to (this image does not ask).
const TAG_EFI64: u32 = 12;
/// §3.6.8: memory map entry types.
const MMAP_AVAILABLE: u32 = 1;
/// Largest boot information structure accepted.
pub const MAX_MBI_SIZE: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mb2Error {
    BadBootloaderMagic(u32),
    TooShort,
    BadTotalSize(u32),
    TagOutOfBounds { offset: usize },
    BadTagSize { offset: usize, tag: u32 },
    NoEndTag,
    BadString { tag: u32 },
    BadMmapEntrySize(u32),
    NoMemoryMap,
    NoRam,
    OverlappingRam(PhysRange),
    BadModule { start: u32, end: u32 },
}

impl fmt::Display for Mb2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadBootloaderMagic(m) => write!(f, "not entered by a multiboot2 loader (eax={m:#x})"),
            Self::TooShort => write!(f, "boot information shorter than its header"),
            Self::BadTotalSize(s) => write!(f, "bad boot information total_size {s}"),
            Self::TagOutOfBounds { offset } => write!(f, "tag at {offset:#x} runs past the end"),
            Self::BadTagSize { offset, tag } => write!(f, "tag {tag} at {offset:#x} has a bad size"),
            Self::NoEndTag => write!(f, "no end tag"),
            Self::BadString { tag } => write!(f, "tag {tag} string is not NUL-terminated UTF-8"),
            Self::BadMmapEntrySize(s) => write!(f, "memory map entry size {s} unsupported"),
            Self::NoMemoryMap => write!(f, "no memory map tag"),
            Self::NoRam => write!(f, "memory map has no available RAM"),
            Self::OverlappingRam(r) => write!(f, "RAM range {:#x}+{:#x} overlaps another", r.base, r.size),
            Self::BadModule { start, end } => write!(f, "module {start:#x}..{end:#x} is empty or reversed"),
        }
    }
}

/// The ACPI root pointer GRUB copied into the boot information (§3.6.13-14).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RsdpCopy {
    /// ACPI 1.0 RSDP (20 bytes).
    V1(Vec<u8>),
    /// ACPI 2.0+ RSDP (36 bytes).
    V2(Vec<u8>),
}

/// What x86_64 needs from the boot information besides [`BootInfo`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mb2Platform {
    pub rsdp: Option<RsdpCopy>,
    /// Every memory-map entry (all types), for diagnostics and the RAM top.
    pub memory_map: Vec<(PhysRange, u32)>,
    /// The EFI system table's address, if the boot loader ran on UEFI
    /// firmware (it is only reported: boot services are gone).
    pub efi_system_table: Option<u64>,
}

fn le32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from(le32(b, off)?) | (u64::from(le32(b, off + 4)?) << 32))
}

fn c_string(bytes: &[u8], tag: u32) -> Result<String, Mb2Error> {
    let end = bytes.iter().position(|&b| b == 0).ok_or(Mb2Error::BadString { tag })?;
    core::str::from_utf8(&bytes[..end]).map(String::from).map_err(|_| Mb2Error::BadString { tag })
}

/// Parses the boot information at physical address `mbi_phys`, whose bytes
/// are `mbi` (at least `total_size` long; extra bytes are ignored).
pub fn parse(magic: u32, mbi: &[u8], mbi_phys: u64) -> Result<(BootInfo, Mb2Platform), Mb2Error> {
    if magic != BOOTLOADER_MAGIC {
        return Err(Mb2Error::BadBootloaderMagic(magic));
    }
    let total = le32(mbi, 0).ok_or(Mb2Error::TooShort)?;
    let total_len = total as usize;
    if total_len < 16 || total_len > mbi.len() || total_len > MAX_MBI_SIZE || !total_len.is_multiple_of(8) {
        return Err(Mb2Error::BadTotalSize(total));
    }
    let mbi = &mbi[..total_len];
    let mut info = BootInfo::default();
    let mut plat = Mb2Platform::default();
    info.reserved.push(PhysRange::new(mbi_phys, total_len as u64));
    let mut off = 8usize;
    let mut saw_mmap = false;
    loop {
        let (Some(tag), Some(size)) = (le32(mbi, off), le32(mbi, off + 4)) else {
            return Err(Mb2Error::NoEndTag);
        };
        let size = size as usize;
        if size < 8 {
            return Err(Mb2Error::BadTagSize { offset: off, tag });
        }
        let body = mbi.get(off + 8..off + size).ok_or(Mb2Error::TagOutOfBounds { offset: off })?;
        match tag {
            TAG_END => {
                if size != 8 {
                    return Err(Mb2Error::BadTagSize { offset: off, tag });
                }
                break;
            }
            TAG_CMDLINE => info.cmdline = c_string(body, tag)?,
            TAG_MODULE => {
                let (Some(start), Some(end)) = (le32(body, 0), le32(body, 4)) else {
                    return Err(Mb2Error::BadTagSize { offset: off, tag });
                };
                if end <= start {
                    return Err(Mb2Error::BadModule { start, end });
                }
                let range = PhysRange::new(u64::from(start), u64::from(end - start));
                let name = c_string(body.get(8..).unwrap_or_default(), tag)?;
                info.reserved.push(range);
                info.modules.push(BootModule { range, name });
            }
            TAG_MMAP => {
                saw_mmap = true;
                let entry_size = le32(body, 0).ok_or(Mb2Error::BadTagSize { offset: off, tag })?;
                if entry_size < 24 || entry_size % 8 != 0 {
                    return Err(Mb2Error::BadMmapEntrySize(entry_size));
                }
                let entries = body.get(8..).unwrap_or_default();
                for e in entries.chunks_exact(entry_size as usize) {
                    let (Some(base), Some(len), Some(kind)) = (le64(e, 0), le64(e, 8), le32(e, 16)) else {
                        return Err(Mb2Error::BadTagSize { offset: off, tag });
                    };
                    let range = PhysRange::new(base, len);
                    if len == 0 || range.end().is_none() {
                        continue;
                    }
                    plat.memory_map.push((range, kind));
                    if kind == MMAP_AVAILABLE {
                        info.ram.push(range);
                    }
                }
            }
            TAG_ACPI_OLD if body.len() >= 20 => plat.rsdp = Some(RsdpCopy::V1(body[..20].to_vec())),
            TAG_ACPI_NEW if body.len() >= 36 => plat.rsdp = Some(RsdpCopy::V2(body[..36].to_vec())),
            TAG_EFI64 => plat.efi_system_table = le64(body, 0),
            _ => {}
        }
        // §3.6.1: tags are padded to 8-byte alignment.
        off = off.checked_add((size + 7) & !7).ok_or(Mb2Error::TagOutOfBounds { offset: off })?;
    }
    if !saw_mmap {
        return Err(Mb2Error::NoMemoryMap);
    }
    if info.ram.is_empty() {
        return Err(Mb2Error::NoRam);
    }
    sort_disjoint(&mut info.ram).map_err(Mb2Error::OverlappingRam)?;
    Ok((info, plat))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Builds a boot information structure from (type, body) tags.
    pub(crate) fn build(tags: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = alloc::vec![0u8; 8];
        for (t, body) in tags.iter().chain(core::iter::once(&(TAG_END, Vec::new()))) {
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&((body.len() + 8) as u32).to_le_bytes());
            out.extend_from_slice(body);
            while !out.len().is_multiple_of(8) {
                out.push(0);
            }
        }
        let total = out.len() as u32;
        out[..4].copy_from_slice(&total.to_le_bytes());
        out
    }

    pub(crate) fn mmap(entries: &[(u64, u64, u32)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&24u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for (base, len, kind) in entries {
            b.extend_from_slice(&base.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(&kind.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
        }
        b
    }

    /// The memory map GRUB 2.06 reports on Bochs 2.7 with `memory: guest=128`.
    fn bochs_like() -> Vec<u8> {
        let mut module = Vec::new();
        module.extend_from_slice(&0x0020_0000u32.to_le_bytes());
        module.extend_from_slice(&0x0020_1000u32.to_le_bytes());
        module.extend_from_slice(b"guest.bin name=hello\0");
        let mut rsdp = b"RSD PTR ".to_vec();
        rsdp.resize(20, 0);
        build(&[
            (TAG_CMDLINE, b"hv.log=debug\0".to_vec()),
            (TAG_MODULE, module),
            (
                TAG_MMAP,
                mmap(&[
                    (0, 0x9_f000, 1),
                    (0x9_f000, 0x1000, 2),
                    (0xe_8000, 0x1_8000, 2),
                    (0x10_0000, 0x7ef_0000, 1),
                    (0x7ff_0000, 0x1_0000, 3),
                    (0xfffc_0000, 0x4_0000, 2),
                ]),
            ),
            (TAG_ACPI_OLD, rsdp),
        ])
    }

    #[test]
    fn parses_bochs_like_info() {
        let blob = bochs_like();
        let (info, plat) = parse(BOOTLOADER_MAGIC, &blob, 0x1_0000).unwrap();
        assert_eq!(info.cmdline, "hv.log=debug");
        assert_eq!(info.ram, [PhysRange::new(0, 0x9_f000), PhysRange::new(0x10_0000, 0x7ef_0000)]);
        assert_eq!(info.ram_mib(), 127);
        assert_eq!(info.modules[0].name, "guest.bin name=hello");
        assert_eq!(info.modules[0].range, PhysRange::new(0x20_0000, 0x1000));
        assert!(matches!(plat.rsdp, Some(RsdpCopy::V1(ref b)) if b.starts_with(b"RSD PTR ")));
        assert_eq!(plat.memory_map.len(), 6);
        assert_eq!(plat.efi_system_table, None, "BIOS GRUB has no EFI system table");
    }

    /// GRUB on UEFI firmware adds the EFI system table's address.
    #[test]
    fn grub_on_uefi_names_the_efi_system_table() {
        let blob = build(&[
            (TAG_MMAP, mmap(&[(0x10_0000, 0x7ef_0000, 1)])),
            (TAG_EFI64, 0x7f9e_e018u64.to_le_bytes().to_vec()),
        ]);
        let (_, plat) = parse(BOOTLOADER_MAGIC, &blob, 0).unwrap();
        assert_eq!(plat.efi_system_table, Some(0x7f9e_e018));
        let short = build(&[(TAG_MMAP, mmap(&[(0x10_0000, 0x7ef_0000, 1)])), (TAG_EFI64, alloc::vec![1, 2, 3])]);
        assert_eq!(parse(BOOTLOADER_MAGIC, &short, 0).unwrap().1.efi_system_table, None);
    }

    #[test]
    fn rejects_bad_magic_and_sizes() {
        let blob = bochs_like();
        assert_eq!(parse(0x2bad_b002, &blob, 0), Err(Mb2Error::BadBootloaderMagic(0x2bad_b002)));
        assert!(matches!(parse(BOOTLOADER_MAGIC, &blob[..4], 0), Err(Mb2Error::TooShort | Mb2Error::BadTotalSize(_))));
        assert!(matches!(parse(BOOTLOADER_MAGIC, &blob[..blob.len() - 8], 0), Err(Mb2Error::BadTotalSize(_))));
    }

    #[test]
    fn rejects_missing_end_and_overlap() {
        let mut blob = build(&[(TAG_MMAP, mmap(&[(0, 0x2000, 1), (0x1000, 0x2000, 1)]))]);
        assert!(matches!(parse(BOOTLOADER_MAGIC, &blob, 0), Err(Mb2Error::OverlappingRam(_))));
        // Turn the end tag into an unknown tag: the walk runs off the end.
        let end = blob.len() - 8;
        blob[end] = 0x55;
        assert_eq!(parse(BOOTLOADER_MAGIC, &blob, 0), Err(Mb2Error::NoEndTag));
    }

    #[test]
    fn rejects_no_map_and_bad_module() {
        let blob = build(&[(TAG_CMDLINE, b"x\0".to_vec())]);
        assert_eq!(parse(BOOTLOADER_MAGIC, &blob, 0), Err(Mb2Error::NoMemoryMap));
        let mut module = Vec::new();
        module.extend_from_slice(&0x3000u32.to_le_bytes());
        module.extend_from_slice(&0x2000u32.to_le_bytes());
        module.push(0);
        let blob = build(&[(TAG_MODULE, module), (TAG_MMAP, mmap(&[(0, 0x2000, 1)]))]);
        assert!(matches!(parse(BOOTLOADER_MAGIC, &blob, 0), Err(Mb2Error::BadModule { .. })));
        let blob = build(&[(TAG_CMDLINE, b"no-nul".to_vec()), (TAG_MMAP, mmap(&[(0, 0x2000, 1)]))]);
        assert_eq!(parse(BOOTLOADER_MAGIC, &blob, 0), Err(Mb2Error::BadString { tag: TAG_CMDLINE }));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
        #[test]
        fn mutated_info_never_panics(flips in proptest::collection::vec((0usize..256, any::<u8>()), 1..8)) {
            let mut blob = bochs_like();
            let len = blob.len();
            for (at, byte) in flips {
                blob[at % len] = byte;
            }
            let _ = parse(BOOTLOADER_MAGIC, &blob, 0);
        }
    }
}
