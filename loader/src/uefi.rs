//! The UEFI boot record (issue 21; `kho/ABI.md` §8): what the hypervisor
//! keeps of the firmware once it has left boot services, and what every
//! later image reads instead of a DTB.
//!
//! The EFI entry writes it, before `ExitBootServices`, into pages it
//! allocated as `EfiLoaderData`: the command line (the image's load
//! options), the RSDP's address, the PCI host bridge's 32-bit window (from
//! the firmware's root bridge protocol; ACPI keeps it in AML), and the
//! final memory map. The boot CPU is then entered with the record's
//! address in x0 where the arm64 boot protocol has the DTB, and so is every
//! image a live update starts: the record stays where it is, reserved, for
//! as long as the machine runs, as the DTB does on the DTB path.
//!
//! All of it is untrusted here: the firmware wrote the map and the tables,
//! and a later image reads the record after any number of updates.
//!
//! Layout (little-endian), version 1:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `HVUEFIBR` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | header length (80) |
//! | 16 | 4 | total length (header, command line, padding, map) |
//! | 20 | 4 | command line length (ASCII, no terminator) |
//! | 24 | 8 | RSDP physical address (0: none) |
//! | 32 | 4 | memory map length in bytes |
//! | 36 | 4 | memory descriptor size |
//! | 40 | 4 | memory descriptor version (1) |
//! | 44 | 4 | flags (0) |
//! | 48 | 8 | PCI 32-bit window: bus address |
//! | 56 | 8 | PCI 32-bit window: CPU address |
//! | 64 | 8 | PCI 32-bit window: size (0: unknown) |
//! | 72 | 8 | reserved (0) |
//! | 80 | n | command line, then zeroes to an 8-byte boundary |
//! | 80 + align8(n) | m | the memory map as `GetMemoryMap` wrote it |
//!
//! Memory descriptors: UEFI 2.10 §7.2.3 (`EFI_MEMORY_DESCRIPTOR`: type at
//! 0, physical start at 8, number of 4 KiB pages at 24; the firmware's
//! descriptor size may be larger than the 40 bytes defined).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::acpi::{self, AcpiError, PhysMemory};
use crate::acpi_arm::{self, AcpiPlatformError};
use crate::bytes::{le32, le64};
use crate::dtb::DtbPlatform;
use crate::gtdt::{self, GtdtError};
use crate::iort::{self, IortError};
use crate::multiboot2::RsdpCopy;
use crate::{BootInfo, PhysRange};

pub const MAGIC: [u8; 8] = *b"HVUEFIBR";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 80;
/// `EFI_MEMORY_DESCRIPTOR_VERSION` (UEFI 2.10 §7.2.3).
pub const DESCRIPTOR_VERSION: u32 = 1;
/// The fields of `EFI_MEMORY_DESCRIPTOR` read here end at byte 32; the
/// structure is 40 bytes.
pub const MIN_DESCRIPTOR_SIZE: u32 = 40;
/// Largest record accepted (a real map is a few KiB; 1 MiB is generous).
pub const MAX_RECORD_LEN: usize = 1 << 20;
/// Longest command line kept.
pub const MAX_CMDLINE_LEN: usize = 4096;
const PAGE: u64 = 4096;
/// The timer interrupts the hypervisor uses: the Arm Base System
/// Architecture's PPIs for the EL2 physical and the EL1 virtual timer.
pub const BSA_EL2_TIMER_PPI: u32 = 26;
pub const BSA_VIRTUAL_TIMER_PPI: u32 = 27;

/// `EFI_MEMORY_TYPE` (UEFI 2.10 Table 7.6).
pub mod memory_type {
    pub const RESERVED: u32 = 0;
    pub const LOADER_CODE: u32 = 1;
    pub const LOADER_DATA: u32 = 2;
    pub const BOOT_SERVICES_CODE: u32 = 3;
    pub const BOOT_SERVICES_DATA: u32 = 4;
    pub const RUNTIME_SERVICES_CODE: u32 = 5;
    pub const RUNTIME_SERVICES_DATA: u32 = 6;
    pub const CONVENTIONAL: u32 = 7;
    pub const UNUSABLE: u32 = 8;
    pub const ACPI_RECLAIM: u32 = 9;
    pub const ACPI_NVS: u32 = 10;
    pub const MMIO: u32 = 11;
}

/// Most descriptors read from a PCI root bridge's resource list.
pub const MAX_PCI_RESOURCES: usize = 64;
/// ACPI 6.5 §6.4.3.5.1: QWORD Address Space Descriptor (tag 0x8a, 0x2b
/// bytes after the 3-byte header): resource type at 3 (0 = memory),
/// granularity at 6, minimum at 14, translation offset at 30, length at 38.
pub const QWORD_TAG: u8 = 0x8a;
const QWORD_LEN: usize = 3 + 0x2b;
/// §6.4.2.9: End Tag.
pub const END_TAG: u8 = 0x79;

/// The 32-bit memory window in a PCI root bridge's resources as
/// `EFI_PCI_ROOT_BRIDGE_IO_PROTOCOL.Configuration()` gives them (UEFI
/// 2.10 §14.2): the first memory descriptor of 32-bit granularity, as
/// (bus address, CPU range). Anything malformed gives `None`.
pub fn pci_window(list: &[u8]) -> Option<PciWindow> {
    let mut rest = list;
    for _ in 0..MAX_PCI_RESOURCES {
        // The End tag, or any other descriptor, ends the search.
        if *rest.first()? != QWORD_TAG {
            return None;
        }
        let len = 3 + usize::from(u16::from_le_bytes([*rest.get(1)?, *rest.get(2)?]));
        let d = rest.get(..len).filter(|_| len >= QWORD_LEN)?;
        let (min, translation, size) = (le64(d, 14), le64(d, 30), le64(d, 38));
        if d[3] == 0 && le64(d, 6) == 32 && size != 0 {
            let cpu = PhysRange::new(min.checked_add(translation)?, size);
            return cpu.end().map(|_| (min, cpu));
        }
        rest = &rest[len..];
    }
    None
}

/// What the hypervisor makes of a memory type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryClass {
    /// Free once boot services are gone: the loader's pages, boot
    /// services' code and data, conventional memory.
    Usable,
    /// RAM the firmware keeps: runtime services' code and data, ACPI
    /// tables and NVS. Mapped (the tables are read after every update),
    /// never allocated.
    Firmware,
    /// Not RAM the hypervisor touches: reserved, unusable, MMIO,
    /// persistent memory, and any type this version does not know.
    Other,
}

pub fn class_of(kind: u32) -> MemoryClass {
    use memory_type::{
        ACPI_NVS, ACPI_RECLAIM, BOOT_SERVICES_CODE, BOOT_SERVICES_DATA, CONVENTIONAL, LOADER_CODE, LOADER_DATA,
        RUNTIME_SERVICES_CODE, RUNTIME_SERVICES_DATA,
    };
    match kind {
        LOADER_CODE | LOADER_DATA | BOOT_SERVICES_CODE | BOOT_SERVICES_DATA | CONVENTIONAL => MemoryClass::Usable,
        RUNTIME_SERVICES_CODE | RUNTIME_SERVICES_DATA | ACPI_RECLAIM | ACPI_NVS => MemoryClass::Firmware,
        _ => MemoryClass::Other,
    }
}

/// Why a UEFI boot record, its memory map or the tables it points at
/// cannot describe the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UefiError {
    TooShort,
    BadMagic,
    UnsupportedVersion(u32),
    /// A length or offset in the header that does not fit the record.
    BadLayout,
    BadDescriptor {
        size: u32,
        version: u32,
    },
    /// A descriptor whose range wraps the address space or is not page
    /// aligned (index into the map).
    BadRange(usize),
    /// Two descriptors that overlap.
    Overlapping(PhysRange),
    NoRam,
    BadCmdline,
    NoRsdp,
    Acpi(AcpiError),
    /// MADT, SPCR or GTDT is not in the tables.
    MissingTable(&'static str),
    Iort(IortError),
    Gtdt(GtdtError),
    /// The GTDT gives timer interrupts other than the BSA's (EL2, virtual).
    Timers {
        el2: u32,
        virtual_el1: u32,
    },
    Platform(AcpiPlatformError),
}

impl fmt::Display for UefiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort => f.write_str("UEFI boot record too short"),
            Self::BadMagic => f.write_str("not a UEFI boot record"),
            Self::UnsupportedVersion(v) => write!(f, "UEFI boot record version {v} not supported"),
            Self::BadLayout => f.write_str("UEFI boot record lengths do not fit"),
            Self::BadDescriptor { size, version } => {
                write!(f, "memory descriptors of {size} bytes, version {version}, not supported")
            }
            Self::BadRange(i) => write!(f, "memory descriptor {i} wraps or is not page-aligned"),
            Self::Overlapping(r) => write!(f, "memory descriptors overlap at {:#x}", r.base),
            Self::NoRam => f.write_str("the memory map has no usable RAM"),
            Self::BadCmdline => f.write_str("command line is not printable ASCII"),
            Self::NoRsdp => f.write_str("the firmware published no ACPI RSDP"),
            Self::Acpi(e) => write!(f, "ACPI: {e}"),
            Self::MissingTable(t) => write!(f, "no {t} table"),
            Self::Iort(e) => write!(f, "IORT: {e}"),
            Self::Gtdt(e) => write!(f, "GTDT: {e}"),
            Self::Timers { el2, virtual_el1 } => write!(
                f,
                "GTDT timer interrupts EL2={el2} virtual={virtual_el1}; the hypervisor uses the BSA's \
                 {BSA_EL2_TIMER_PPI} and {BSA_VIRTUAL_TIMER_PPI}"
            ),
            Self::Platform(e) => write!(f, "ACPI platform: {e}"),
        }
    }
}

/// The PCI host bridge's 32-bit memory window: (bus address, CPU range).
pub type PciWindow = (u64, PhysRange);

/// A record, read and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub cmdline: &'a str,
    pub rsdp: Option<u64>,
    pub pci_mmio32: Option<PciWindow>,
    map: &'a [u8],
    desc_size: usize,
    /// The record's own length.
    pub len: usize,
}

/// One memory descriptor: type and range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub kind: u32,
    /// Its range; the size wraps if `pages` is too large, which
    /// [`memory`] refuses.
    pub range: PhysRange,
    pub pages: u64,
}

impl<'a> Record<'a> {
    /// The memory map's descriptors, in the firmware's order.
    pub fn descriptors(&self) -> impl Iterator<Item = Descriptor> + 'a {
        self.map.chunks_exact(self.desc_size).map(|d| Descriptor {
            kind: le32(d, 0),
            range: PhysRange::new(le64(d, 8), le64(d, 24).wrapping_mul(PAGE)),
            pages: le64(d, 24),
        })
    }
}

/// Reads the header and checks that every length fits; `bytes` may run
/// past the record (its own length says where it ends).
pub fn read(bytes: &[u8]) -> Result<Record<'_>, UefiError> {
    if bytes.len() < HEADER_LEN {
        return Err(UefiError::TooShort);
    }
    if bytes[..8] != MAGIC {
        return Err(UefiError::BadMagic);
    }
    let version = le32(bytes, 8);
    if version != VERSION {
        return Err(UefiError::UnsupportedVersion(version));
    }
    let header_len = le32(bytes, 12) as usize;
    let total = le32(bytes, 16) as usize;
    let cmdline_len = le32(bytes, 20) as usize;
    let map_len = le32(bytes, 32) as usize;
    let (desc_size, desc_version) = (le32(bytes, 36), le32(bytes, 40));
    if header_len != HEADER_LEN || total > MAX_RECORD_LEN || total > bytes.len() || cmdline_len > MAX_CMDLINE_LEN {
        return Err(UefiError::BadLayout);
    }
    let map_at = HEADER_LEN + cmdline_len.next_multiple_of(8);
    if map_at.checked_add(map_len) != Some(total) {
        return Err(UefiError::BadLayout);
    }
    if desc_size < MIN_DESCRIPTOR_SIZE || desc_version != DESCRIPTOR_VERSION || !desc_size.is_multiple_of(8) {
        return Err(UefiError::BadDescriptor { size: desc_size, version: desc_version });
    }
    let desc_size = desc_size as usize;
    if !map_len.is_multiple_of(desc_size) {
        return Err(UefiError::BadLayout);
    }
    let cmdline = core::str::from_utf8(&bytes[HEADER_LEN..HEADER_LEN + cmdline_len])
        .ok()
        .filter(|s| s.bytes().all(|b| (0x20..0x7f).contains(&b)))
        .ok_or(UefiError::BadCmdline)?;
    let rsdp = Some(le64(bytes, 24)).filter(|&a| a != 0);
    let window_size = le64(bytes, 64);
    let pci_mmio32 = (window_size != 0).then(|| (le64(bytes, 48), PhysRange::new(le64(bytes, 56), window_size)));
    if pci_mmio32.is_some_and(|(_, r)| r.end().is_none()) {
        return Err(UefiError::BadLayout);
    }
    Ok(Record { cmdline, rsdp, pci_mmio32, map: &bytes[map_at..total], desc_size, len: total })
}

/// The record's header for a command line of `cmdline_len` bytes and a map
/// of `map_len` bytes (the writer's side of [`read`]); the command line
/// and the map follow at [`cmdline_at`] and [`map_at`].
pub fn header(
    cmdline_len: usize,
    rsdp: u64,
    map_len: usize,
    desc_size: u32,
    pci_mmio32: Option<PciWindow>,
) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    let total = map_at(cmdline_len) + map_len;
    let (bus, cpu) = pci_mmio32.unwrap_or((0, PhysRange::new(0, 0)));
    h[..8].copy_from_slice(&MAGIC);
    let fields32 = [
        (8, VERSION),
        (12, HEADER_LEN as u32),
        (16, total as u32),
        (20, cmdline_len as u32),
        (32, map_len as u32),
        (36, desc_size),
        (40, DESCRIPTOR_VERSION),
    ];
    for (at, v) in fields32 {
        h[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    for (at, v) in [(24, rsdp), (48, bus), (56, cpu.base), (64, cpu.size)] {
        h[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    h
}

/// Where the command line starts.
pub const fn cmdline_at() -> usize {
    HEADER_LEN
}

/// Where the memory map starts, after a command line of `cmdline_len`.
pub const fn map_at(cmdline_len: usize) -> usize {
    HEADER_LEN + cmdline_len.next_multiple_of(8)
}

/// What the memory map gave, for the boot event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemorySummary {
    pub descriptors: usize,
    /// Bytes usable once boot services are gone.
    pub usable: u64,
    /// Bytes of runtime services and ACPI the firmware keeps.
    pub firmware: u64,
    /// Bytes of RAM-like types left alone (reserved, unusable, persistent).
    pub other: u64,
}

/// The memory map as [`BootInfo`]: `ram` is every usable or
/// firmware-kept range, merged where adjacent; `reserved` the
/// firmware-kept ones and the record itself (at `record_phys`).
pub fn memory(record: &Record<'_>, record_phys: u64) -> Result<(BootInfo, MemorySummary), UefiError> {
    let mut ranges: Vec<Descriptor> = Vec::new();
    let mut summary = MemorySummary::default();
    for (i, d) in record.descriptors().enumerate() {
        summary.descriptors += 1;
        if d.range.size == 0 {
            continue;
        }
        let whole = d.pages.checked_mul(PAGE) == Some(d.range.size);
        if !whole || d.range.end().is_none() || !d.range.base.is_multiple_of(PAGE) {
            return Err(UefiError::BadRange(i));
        }
        // Sums of ranges not yet known to be disjoint: saturating.
        match class_of(d.kind) {
            MemoryClass::Usable => summary.usable = summary.usable.saturating_add(d.range.size),
            MemoryClass::Firmware => summary.firmware = summary.firmware.saturating_add(d.range.size),
            MemoryClass::Other if d.kind != memory_type::MMIO => {
                summary.other = summary.other.saturating_add(d.range.size);
            }
            MemoryClass::Other => {}
        }
        ranges.push(d);
    }
    ranges.sort_unstable_by_key(|d| d.range.base);
    for w in ranges.windows(2) {
        if w[0].range.overlaps(&w[1].range) {
            return Err(UefiError::Overlapping(w[1].range));
        }
    }
    let mut info = BootInfo::default();
    for d in &ranges {
        let class = class_of(d.kind);
        if class == MemoryClass::Other {
            continue;
        }
        if class == MemoryClass::Firmware {
            info.reserved.push(d.range);
        }
        match info.ram.last_mut() {
            Some(last) if last.end() == Some(d.range.base) => last.size += d.range.size,
            _ => info.ram.push(d.range),
        }
    }
    if summary.usable == 0 {
        return Err(UefiError::NoRam);
    }
    let record_pages = (record.len as u64).next_multiple_of(PAGE);
    info.reserved.push(PhysRange::new(record_phys, record_pages));
    info.cmdline = String::from(record.cmdline);
    Ok((info, summary))
}

/// The platform from the ACPI tables at the record's RSDP, read through
/// `mem`: MADT, SPCR and GTDT required (the GTDT's timer interrupts must
/// be the ones the hypervisor uses); FADT, MCFG and IORT if present; the
/// PCI window from the record.
pub fn platform<M: PhysMemory>(record: &Record<'_>, mem: &M) -> Result<DtbPlatform, UefiError> {
    let rsdp_phys = record.rsdp.ok_or(UefiError::NoRsdp)?;
    // ACPI 6.5 §5.2.5.3: 20 bytes in revision 0, 36 from revision 2.
    let head = mem.bytes(rsdp_phys, 20).ok_or(UefiError::Acpi(AcpiError::BadRsdpSignature))?;
    let rsdp = if head[15] >= 2 {
        RsdpCopy::V2(mem.bytes(rsdp_phys, 36).ok_or(UefiError::Acpi(AcpiError::BadRsdpSignature))?.to_vec())
    } else {
        RsdpCopy::V1(head.to_vec())
    };
    let find = |sig: [u8; 4]| acpi::find_table(mem, Some(&rsdp), sig).map_err(UefiError::Acpi);
    let madt = find(*b"APIC")?.ok_or(UefiError::MissingTable("MADT"))?;
    let spcr = find(*b"SPCR")?.ok_or(UefiError::MissingTable("SPCR"))?;
    let timers = gtdt::parse(find(*b"GTDT")?.ok_or(UefiError::MissingTable("GTDT"))?).map_err(UefiError::Gtdt)?;
    if (timers.el2.gsiv, timers.virtual_el1.gsiv) != (BSA_EL2_TIMER_PPI, BSA_VIRTUAL_TIMER_PPI) {
        return Err(UefiError::Timers { el2: timers.el2.gsiv, virtual_el1: timers.virtual_el1.gsiv });
    }
    let fadt = find(*b"FACP")?;
    let mcfg = find(*b"MCFG")?;
    let iort = find(*b"IORT")?.map(iort::parse).transpose().map_err(UefiError::Iort)?;
    let mut platform = acpi_arm::platform(madt, spcr, fadt, mcfg, iort.as_ref()).map_err(UefiError::Platform)?;
    if let Some(pcie) = platform.pcie.as_mut() {
        pcie.mmio32 = record.pci_mmio32;
    }
    Ok(platform)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record of `descriptors` (type, base, pages) with 48-byte
    /// descriptors, as edk2 writes them.
    fn record(cmdline: &str, descriptors: &[(u32, u64, u64)]) -> Vec<u8> {
        let mut map = Vec::new();
        for &(kind, base, pages) in descriptors {
            let mut d = [0u8; 48];
            d[0..4].copy_from_slice(&kind.to_le_bytes());
            d[8..16].copy_from_slice(&base.to_le_bytes());
            d[24..32].copy_from_slice(&pages.to_le_bytes());
            map.extend_from_slice(&d);
        }
        let window = Some((0x1000_0000, PhysRange::new(0x1000_0000, 0x2eff_0000)));
        let mut r = header(cmdline.len(), 0x4_3b00_0018, map.len(), 48, window).to_vec();
        r.extend_from_slice(cmdline.as_bytes());
        r.resize(map_at(cmdline.len()), 0);
        r.extend_from_slice(&map);
        r
    }

    use memory_type::{
        ACPI_NVS, ACPI_RECLAIM, BOOT_SERVICES_DATA, CONVENTIONAL, LOADER_CODE, MMIO, RESERVED, RUNTIME_SERVICES_CODE,
        RUNTIME_SERVICES_DATA,
    };

    #[test]
    fn memory_map_becomes_ram_and_reservations() {
        let r = record(
            "manifest=0x48000000",
            &[
                (CONVENTIONAL, 0x4000_0000, 0x100),
                (LOADER_CODE, 0x4010_0000, 0x1000),
                (BOOT_SERVICES_DATA, 0x4110_0000, 0x10),
                (ACPI_RECLAIM, 0x4111_0000, 0x4),
                (RUNTIME_SERVICES_CODE, 0x4111_4000, 0x40),
                (CONVENTIONAL, 0x4115_4000, 0x100),
                (MMIO, 0x0400_0000, 0x400),
                (RESERVED, 0x5000_0000, 0x10),
                (CONVENTIONAL, 0x6000_0000, 0x10),
            ],
        );
        let rec = read(&r).expect("valid record");
        assert_eq!(rec.cmdline, "manifest=0x48000000");
        assert_eq!(rec.rsdp, Some(0x4_3b00_0018));
        let (info, summary) = memory(&rec, 0x4200_0000).expect("valid map");
        assert_eq!(info.ram, [PhysRange::new(0x4000_0000, 0x0125_4000), PhysRange::new(0x6000_0000, 0x10000)]);
        assert_eq!(
            info.reserved,
            [
                PhysRange::new(0x4111_0000, 0x4000),
                PhysRange::new(0x4111_4000, 0x40000),
                PhysRange::new(0x4200_0000, 0x1000)
            ]
        );
        assert_eq!(info.cmdline, "manifest=0x48000000");
        assert_eq!(summary.descriptors, 9);
        assert_eq!(summary.firmware, 0x44000);
        assert_eq!(summary.other, 0x10000);
    }

    #[test]
    fn overlapping_or_misaligned_descriptors_are_refused() {
        let r = record("", &[(CONVENTIONAL, 0x4000_0000, 0x100), (ACPI_NVS, 0x400f_f000, 2)]);
        assert_eq!(memory(&read(&r).unwrap(), 0), Err(UefiError::Overlapping(PhysRange::new(0x400f_f000, 0x2000))));
        let r = record("", &[(CONVENTIONAL, 0x4000_0800, 1)]);
        assert_eq!(memory(&read(&r).unwrap(), 0), Err(UefiError::BadRange(0)));
        let r = record("", &[(CONVENTIONAL, !0xfff, 2)]);
        assert_eq!(memory(&read(&r).unwrap(), 0), Err(UefiError::BadRange(0)));
        // A page count whose byte size wraps to one page.
        let r = record("", &[(CONVENTIONAL, 0x4000_0000, (1 << 52) + 1)]);
        assert_eq!(memory(&read(&r).unwrap(), 0), Err(UefiError::BadRange(0)));
        // Sizes whose sum overflows are summed saturating, then refused as
        // overlapping.
        let r = record("", &[(CONVENTIONAL, 0, 1 << 51), (CONVENTIONAL, 0x1000, (1 << 51) - 1)]);
        assert!(matches!(memory(&read(&r).unwrap(), 0), Err(UefiError::Overlapping(_))));
        let r = record("", &[(RUNTIME_SERVICES_DATA, 0x4000_0000, 1)]);
        assert_eq!(memory(&read(&r).unwrap(), 0), Err(UefiError::NoRam));
    }

    #[test]
    fn header_fields_are_checked() {
        let good = record("x", &[(CONVENTIONAL, 0x4000_0000, 1)]);
        assert!(read(&good).is_ok());
        assert_eq!(read(&good[..40]), Err(UefiError::TooShort));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(read(&bad), Err(UefiError::BadMagic));
        let mut bad = good.clone();
        bad[8] = 2;
        assert_eq!(read(&bad), Err(UefiError::UnsupportedVersion(2)));
        // The record claims more than it has.
        assert_eq!(read(&good[..good.len() - 8]), Err(UefiError::BadLayout));
        let mut bad = good.clone();
        bad[36] = 44;
        assert_eq!(read(&bad), Err(UefiError::BadDescriptor { size: 44, version: 1 }));
        let mut bad = good.clone();
        bad[HEADER_LEN] = 0x7f;
        assert_eq!(read(&bad), Err(UefiError::BadCmdline));
        let mut bad = good.clone();
        bad[20] = 9;
        assert_eq!(read(&bad), Err(UefiError::BadLayout));
    }

    #[test]
    fn a_longer_buffer_is_cut_to_the_record() {
        let mut r = record("a b", &[(CONVENTIONAL, 0x4000_0000, 1)]);
        let len = r.len();
        r.extend_from_slice(&[0xff; 100]);
        let rec = read(&r).expect("valid");
        assert_eq!(rec.len, len);
        assert_eq!(rec.descriptors().count(), 1);
        assert_eq!(rec.pci_mmio32, Some((0x1000_0000, PhysRange::new(0x1000_0000, 0x2eff_0000))));
    }

    proptest::proptest! {
        #[test]
        fn corrupted_records_never_panic(flips in proptest::collection::vec((0usize..300, proptest::prelude::any::<u8>()), 1..8)) {
            let mut r = record("manifest=0x48000000", &[(CONVENTIONAL, 0x4000_0000, 0x100), (ACPI_RECLAIM, 0x4010_0000, 4)]);
            r.resize(300, 0);
            for (at, byte) in flips {
                r[at] = byte;
            }
            if let Ok(rec) = read(&r) {
                let _ = memory(&rec, 0);
            }
        }
    }

    #[test]
    fn an_empty_map_has_no_ram() {
        let r = record("", &[]);
        assert_eq!(memory(&read(&r).unwrap(), 0), Err(UefiError::NoRam));
    }

    /// Tables at addresses of their own, like firmware memory.
    struct Arena(Vec<(u64, Vec<u8>)>);

    impl PhysMemory for Arena {
        fn bytes(&self, phys: u64, len: usize) -> Option<&[u8]> {
            self.0.iter().find_map(|(base, b)| {
                let off = usize::try_from(phys.checked_sub(*base)?).ok()?;
                b.get(off..off.checked_add(len)?)
            })
        }
    }

    fn checksummed(mut t: Vec<u8>, at: usize) -> Vec<u8> {
        let sum = t.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        t[at] = t[at].wrapping_sub(sum);
        t
    }

    /// QEMU's own tables (`testdata/README.md`), `edit` applied, behind an
    /// RSDP and XSDT built here.
    fn qemu_tables(edit: impl Fn(&mut Vec<u8>)) -> Arena {
        let tables: [&[u8]; 6] = [
            include_bytes!("../testdata/qemu-virt-madt.bin"),
            include_bytes!("../testdata/qemu-virt-gtdt.bin"),
            include_bytes!("../testdata/qemu-virt-spcr.bin"),
            include_bytes!("../testdata/qemu-virt-fadt.bin"),
            include_bytes!("../testdata/qemu-virt-mcfg.bin"),
            include_bytes!("../testdata/qemu-virt-smmuv3-iort.bin"),
        ];
        let mut arena = Vec::new();
        let mut xsdt = b"XSDT".to_vec();
        xsdt.extend_from_slice(&((36 + 8 * tables.len()) as u32).to_le_bytes());
        xsdt.resize(36, 1);
        for (i, t) in tables.iter().enumerate() {
            let at = 0x4_3b00_0000 + 0x1_0000 * (i as u64 + 1);
            xsdt.extend_from_slice(&at.to_le_bytes());
            let mut t = t.to_vec();
            edit(&mut t);
            t[9] = 0;
            arena.push((at, checksummed(t, 9)));
        }
        arena.push((0x4_3b00_0100, checksummed(xsdt, 9)));
        let mut rsdp = b"RSD PTR ".to_vec();
        rsdp.extend_from_slice(&[0, b'Q', b'E', b'M', b'U', b' ', b' ', 2, 0, 0, 0, 0]);
        rsdp.extend_from_slice(&36u32.to_le_bytes());
        rsdp.extend_from_slice(&0x4_3b00_0100u64.to_le_bytes());
        rsdp.extend_from_slice(&[0; 4]);
        // ACPI 6.5 §5.2.5.3: byte 8 sums the first 20 bytes, 32 all 36.
        rsdp[8] = checksummed(rsdp[..20].to_vec(), 8)[8];
        arena.push((0x4_3b00_0018, checksummed(rsdp, 32)));
        Arena(arena)
    }

    /// The record's RSDP leads to the platform the same machine's DTB
    /// describes.
    #[test]
    fn the_platform_from_the_records_rsdp() {
        let arena = qemu_tables(|_| {});
        let r = record("", &[(CONVENTIONAL, 0x4000_0000, 1)]);
        let p = platform(&read(&r).unwrap(), &arena).expect("the platform");
        assert_eq!(p.cpus, [0, 1]);
        assert_eq!(p.uart, Some(PhysRange::new(0x0900_0000, 0x1000)));
        assert_eq!(p.gic.map(|g| g.distributor.base), Some(0x0800_0000));
        assert_eq!(p.smmu, Some(PhysRange::new(0x0905_0000, 0x2_0000)));
        let pcie = p.pcie.expect("pcie");
        assert_eq!(pcie.mmio32, Some((0x1000_0000, PhysRange::new(0x1000_0000, 0x2eff_0000))));
        assert_eq!(pcie.iommu_map.and_then(|m| m.stream_id(0x10)), Some(0x10));
        let no_rsdp = header(0, 0, 0, 48, None);
        assert_eq!(platform(&read(&no_rsdp).unwrap(), &arena), Err(UefiError::NoRsdp));
    }

    /// A GTDT whose EL2 timer is not the BSA's PPI 26 is refused by name;
    /// a machine without a GTDT (its signature changed) too.
    #[test]
    fn timers_other_than_the_bsa_ones_are_refused() {
        let r = record("", &[(CONVENTIONAL, 0x4000_0000, 1)]);
        let moved = qemu_tables(|t| {
            if &t[..4] == b"GTDT" {
                t[72] = 30;
            }
        });
        assert_eq!(platform(&read(&r).unwrap(), &moved), Err(UefiError::Timers { el2: 30, virtual_el1: 27 }));
        let gone = qemu_tables(|t| {
            if &t[..4] == b"GTDT" {
                t[..4].copy_from_slice(b"XTDT");
            }
        });
        assert_eq!(platform(&read(&r).unwrap(), &gone), Err(UefiError::MissingTable("GTDT")));
    }

    /// Records the hypervisor's EFI entry wrote under edk2 (QEMU 10,
    /// Debian's `qemu-efi-aarch64`), saved from guest RAM with QEMU's
    /// `pmemsave` (`testdata/README.md`): 512 MiB with 2 CPUs, and 4 GiB
    /// with 4 CPUs, the SMMUv3 and edu.
    const EDK2_512M: &[u8] = include_bytes!("../testdata/edk2-qemu-virt-512m-record.bin");
    const EDK2_4G: &[u8] = include_bytes!("../testdata/edk2-qemu-virt-smmuv3-edu-4g-4cpu-record.bin");

    #[test]
    fn edk2_memory_maps() {
        for (bytes, phys, ram_mib) in [(EDK2_512M, 0x5bf1_8000u64, 512u64), (EDK2_4G, 0x1_3bf1_8000, 4096)] {
            let rec = read(bytes).expect("edk2 record");
            assert_eq!(rec.cmdline, "manifest=0x42200000");
            assert!(rec.rsdp.is_some());
            let (bus, cpu) = rec.pci_mmio32.expect("the root bridge's window");
            assert_eq!((bus, cpu.base), (0x1000_0000, 0x1000_0000));
            let (info, summary) = memory(&rec, phys).expect("edk2 map");
            assert_eq!(summary.descriptors, 34);
            // One RAM range: every descriptor in it is usable or kept by
            // the firmware; the two MMIO ones (flash, RTC) are not RAM.
            assert_eq!(info.ram, [PhysRange::new(0x4000_0000, ram_mib << 20)]);
            assert_eq!(summary.firmware, 7040 << 10);
            let firmware: Vec<Descriptor> =
                rec.descriptors().filter(|d| class_of(d.kind) == MemoryClass::Firmware).collect();
            assert!(firmware.iter().any(|d| d.kind == ACPI_RECLAIM));
            assert!(firmware.iter().any(|d| d.kind == RUNTIME_SERVICES_CODE));
            for d in &firmware {
                assert!(info.reserved.contains(&d.range), "{d:?} reserved");
            }
            assert!(info.reserved.contains(&PhysRange::new(phys, 0x1000)), "the record itself");
            let mmio: Vec<Descriptor> = rec.descriptors().filter(|d| d.kind == MMIO).collect();
            assert_eq!(mmio.len(), 2);
            assert!(mmio.iter().all(|d| !info.ram.iter().any(|r| r.overlaps(&d.range))));
        }
    }

    /// A QWORD memory descriptor (ACPI 6.5 §6.4.3.5.1).
    fn qword(kind: u8, granularity: u64, min: u64, translation: u64, len: u64) -> Vec<u8> {
        let mut d = alloc::vec![0u8; QWORD_LEN];
        d[0] = QWORD_TAG;
        d[1..3].copy_from_slice(&0x2bu16.to_le_bytes());
        d[3] = kind;
        for (at, v) in [(6, granularity), (14, min), (22, min + len - 1), (30, translation), (38, len)] {
            d[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        d
    }

    /// What edk2's root bridge gave on QEMU virt with edu: a bus-number
    /// range, the 32-bit window, then the End tag.
    #[test]
    fn the_pci_window_from_root_bridge_resources() {
        let mut list = qword(2, 0, 0, 0, 0x100);
        list.extend(qword(0, 32, 0x1000_0000, 0, 0x20_0000));
        list.extend(qword(0, 64, 0x80_0000_0000, 0, 0x1000));
        list.extend([END_TAG, 0]);
        assert_eq!(pci_window(&list), Some((0x1000_0000, PhysRange::new(0x1000_0000, 0x20_0000))));
        // A translated window: CPU address = bus address + offset.
        let moved = [qword(0, 32, 0x1000_0000, 0x3_0000_0000, 0x1000), alloc::vec![END_TAG, 0]].concat();
        assert_eq!(pci_window(&moved), Some((0x1000_0000, PhysRange::new(0x3_1000_0000, 0x1000))));
        // No 32-bit window, a truncated descriptor, a stray tag, wrapping.
        assert_eq!(pci_window(&[qword(2, 0, 0, 0, 0x100), alloc::vec![END_TAG, 0]].concat()), None);
        assert_eq!(pci_window(&list[..30]), None);
        assert_eq!(pci_window(&[0x47, 0, 0]), None);
        assert_eq!(pci_window(&qword(0, 32, 0x1000_0000, u64::MAX - 0x100, 0x1000)), None);
    }
}
