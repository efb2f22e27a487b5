//! The ACPI DMA Remapping table (DMAR), which describes Intel VT-d
//! remapping hardware (Intel VT-d Architecture Specification rev. 4.1,
//! ch. 8 "BIOS Considerations": §8.1 the DMAR table, §8.3 DRHD, §8.3.1
//! device scope, §8.4 RMRR). The `acpi` crate has no DMAR parser; this
//! one takes the table's bytes (its header and checksum already checked,
//! `acpi::table`) and validates every structure and device scope before
//! anything uses it: a firmware table is untrusted input.

use crate::bytes::{le16, le64};
use alloc::vec::Vec;
use core::fmt;

/// The table header (36 bytes) then host address width, flags and 10
/// reserved bytes; the remapping structures start at 48.
const STRUCTURES_AT: usize = 48;
const HOST_ADDRESS_WIDTH_AT: usize = 36;
const FLAGS_AT: usize = 37;
/// Remapping structure types (§8.2, Table 8-2).
const TYPE_DRHD: u16 = 0;
const TYPE_RMRR: u16 = 1;
/// Fixed lengths before the device scopes (§8.3 Table 8-3, §8.4).
const DRHD_FIXED: usize = 16;
const RMRR_FIXED: usize = 24;
/// Every remapping structure starts with its type and length.
const STRUCTURE_HEADER: usize = 4;
/// DRHD flags bit 0: the unit covers every PCI device of its segment not
/// named by another unit (§8.3).
const DRHD_INCLUDE_PCI_ALL: u8 = 1 << 0;
/// A device scope's fixed part (type, length, reserved, enumeration id,
/// start bus) and each path entry (device, function) (§8.3.1).
const SCOPE_FIXED: usize = 6;
const PATH_ENTRY: usize = 2;
/// Bounds no real table comes near: units, reserved regions and scopes.
pub const MAX_UNITS: usize = 64;
pub const MAX_RMRRS: usize = 64;
pub const MAX_SCOPES: usize = 256;

/// Why a DMAR table is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmarError {
    /// Shorter than its fixed part.
    Truncated,
    /// A remapping structure's length is shorter than its kind needs, or
    /// runs past the table's end.
    BadStructure { offset: usize },
    /// A device scope's length is too short, odd in its path, or runs
    /// past its structure.
    BadScope { offset: usize },
    /// A register base that is not 4 KiB aligned (§8.3).
    MisalignedRegisters { offset: usize },
    /// More units, reserved regions or scopes than this parser keeps.
    TooMany,
    /// No DRHD: a DMAR must describe at least one unit.
    NoUnits,
}

impl fmt::Display for DmarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => write!(f, "DMAR shorter than its fixed part"),
            Self::BadStructure { offset } => write!(f, "DMAR structure at offset {offset} malformed"),
            Self::BadScope { offset } => write!(f, "DMAR device scope at offset {offset} malformed"),
            Self::MisalignedRegisters { offset } => {
                write!(f, "DMAR unit at offset {offset}: register base not 4 KiB aligned")
            }
            Self::TooMany => write!(f, "DMAR lists more units, regions or scopes than supported"),
            Self::NoUnits => write!(f, "DMAR lists no remapping unit"),
        }
    }
}

/// What a device scope names (§8.3.1, Table 8-4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeKind {
    PciEndpoint,
    PciSubHierarchy,
    IoApic,
    Hpet,
    AcpiNamespace,
    /// A type this parser does not know; kept, not interpreted.
    Other(u8),
}

impl ScopeKind {
    fn of(code: u8) -> ScopeKind {
        match code {
            1 => ScopeKind::PciEndpoint,
            2 => ScopeKind::PciSubHierarchy,
            3 => ScopeKind::IoApic,
            4 => ScopeKind::Hpet,
            5 => ScopeKind::AcpiNamespace,
            other => ScopeKind::Other(other),
        }
    }
}

/// One device scope: a device reached from `start_bus` through a path of
/// (device, function) hops across bridges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceScope {
    pub kind: ScopeKind,
    pub enumeration_id: u8,
    pub start_bus: u8,
    pub path: Vec<(u8, u8)>,
}

impl DeviceScope {
    /// The requester id (bus << 8 | device << 3 | function) of a scope
    /// whose path is a single hop, as on a flat bus; `None` for paths
    /// through bridges, which need the bus numbers behind them.
    pub fn requester_id(&self) -> Option<u16> {
        match self.path.as_slice() {
            [(dev, func)] if *dev < 32 && *func < 8 => {
                Some(u16::from(self.start_bus) << 8 | u16::from(*dev) << 3 | u16::from(*func))
            }
            _ => None,
        }
    }
}

/// A DMA remapping hardware unit (DRHD, §8.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemappingUnit {
    pub segment: u16,
    /// Physical address of the unit's register set (4 KiB aligned).
    pub register_base: u64,
    /// Bytes of the register set: 2^N 4 KiB pages, N from the DRHD's Size
    /// field (byte 5, bits 3:0; 0 in tables that predate it, one page).
    pub register_bytes: u64,
    /// The unit covers every device of its segment no other unit names.
    pub include_pci_all: bool,
    pub scopes: Vec<DeviceScope>,
}

/// A reserved memory region some device keeps using (RMRR, §8.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservedRegion {
    pub segment: u16,
    pub base: u64,
    /// The last byte of the region (inclusive, as the table gives it).
    pub limit: u64,
    pub scopes: Vec<DeviceScope>,
}

/// The parsed table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dmar {
    /// DMA physical addressing width the platform supports (HAW + 1).
    pub host_address_width: u8,
    /// Bit 0 INTR_REMAP, bit 1 X2APIC_OPT_OUT, bit 2 DMA_CTRL_PLATFORM_OPT_IN.
    pub flags: u8,
    pub units: Vec<RemappingUnit>,
    pub reserved: Vec<ReservedRegion>,
    /// Structures of other kinds (ATSR, RHSA, ANDD, SATC, ...): counted,
    /// not interpreted.
    pub other_structures: usize,
}

/// The device scopes in `bytes` (the tail of a structure that starts at
/// `base` in the table, for error offsets).
fn scopes(bytes: &[u8], base: usize, count: &mut usize) -> Result<Vec<DeviceScope>, DmarError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let offset = base + at;
        let header = bytes.get(at..at + SCOPE_FIXED).ok_or(DmarError::BadScope { offset })?;
        let len = usize::from(header[1]);
        if len < SCOPE_FIXED || !(len - SCOPE_FIXED).is_multiple_of(PATH_ENTRY) {
            return Err(DmarError::BadScope { offset });
        }
        let scope = bytes.get(at..at + len).ok_or(DmarError::BadScope { offset })?;
        *count += 1;
        if *count > MAX_SCOPES {
            return Err(DmarError::TooMany);
        }
        let path = scope[SCOPE_FIXED..].chunks_exact(PATH_ENTRY).map(|p| (p[0], p[1])).collect();
        out.push(DeviceScope { kind: ScopeKind::of(header[0]), enumeration_id: header[4], start_bus: header[5], path });
        at += len;
    }
    Ok(out)
}

/// Parses a DMAR table: `table` is the whole table, header included,
/// whose length and checksum the caller checked.
pub fn parse(table: &[u8]) -> Result<Dmar, DmarError> {
    if table.len() < STRUCTURES_AT {
        return Err(DmarError::Truncated);
    }
    let mut dmar = Dmar {
        host_address_width: table[HOST_ADDRESS_WIDTH_AT].saturating_add(1),
        flags: table[FLAGS_AT],
        units: Vec::new(),
        reserved: Vec::new(),
        other_structures: 0,
    };
    let mut scope_count = 0;
    let mut at = STRUCTURES_AT;
    while at < table.len() {
        let head = table.get(at..at + STRUCTURE_HEADER).ok_or(DmarError::BadStructure { offset: at })?;
        let (kind, len) = (le16(head, 0), usize::from(le16(head, 2)));
        let fixed = match kind {
            TYPE_DRHD => DRHD_FIXED,
            TYPE_RMRR => RMRR_FIXED,
            _ => STRUCTURE_HEADER,
        };
        if len < fixed {
            return Err(DmarError::BadStructure { offset: at });
        }
        let s = table.get(at..at + len).ok_or(DmarError::BadStructure { offset: at })?;
        match kind {
            TYPE_DRHD => {
                let register_base = le64(s, 8);
                if !register_base.is_multiple_of(0x1000) {
                    return Err(DmarError::MisalignedRegisters { offset: at });
                }
                if dmar.units.len() == MAX_UNITS {
                    return Err(DmarError::TooMany);
                }
                dmar.units.push(RemappingUnit {
                    segment: le16(s, 6),
                    register_base,
                    register_bytes: 0x1000 << (s[5] & 0xf),
                    include_pci_all: s[4] & DRHD_INCLUDE_PCI_ALL != 0,
                    scopes: scopes(&s[DRHD_FIXED..], at + DRHD_FIXED, &mut scope_count)?,
                });
            }
            TYPE_RMRR => {
                if dmar.reserved.len() == MAX_RMRRS {
                    return Err(DmarError::TooMany);
                }
                dmar.reserved.push(ReservedRegion {
                    segment: le16(s, 6),
                    base: le64(s, 8),
                    limit: le64(s, 16),
                    scopes: scopes(&s[RMRR_FIXED..], at + RMRR_FIXED, &mut scope_count)?,
                });
            }
            _ => dmar.other_structures += 1,
        }
        at += len;
    }
    if dmar.units.is_empty() {
        return Err(DmarError::NoUnits);
    }
    Ok(dmar)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// QEMU 10's DMAR for `-M q35 -device intel-iommu -device edu`, as the
    /// hypervisor read it from the firmware's tables.
    const QEMU_Q35: &[u8] = include_bytes!("../testdata/qemu-q35-intel-iommu-dmar.bin");

    fn endpoint(dev: u8, func: u8) -> DeviceScope {
        DeviceScope { kind: ScopeKind::PciEndpoint, enumeration_id: 0, start_bus: 0, path: vec![(dev, func)] }
    }

    #[test]
    fn qemu_q35_has_one_unit_with_explicit_scopes() {
        let d = parse(QEMU_Q35).unwrap();
        assert_eq!((d.host_address_width, d.flags), (48, 1), "48-bit DMA, interrupt remapping");
        assert_eq!(d.units.len(), 1);
        let u = &d.units[0];
        assert_eq!((u.segment, u.register_base, u.include_pci_all), (0, 0xfed9_0000, false));
        assert_eq!(u.register_bytes, 0x1000, "one page of registers");
        let ioapic = DeviceScope { kind: ScopeKind::IoApic, enumeration_id: 0, start_bus: 0xff, path: vec![(0, 0)] };
        let want = [
            ioapic,
            endpoint(0, 0),
            endpoint(1, 0),
            endpoint(2, 0),
            endpoint(3, 0),
            endpoint(0x1f, 0),
            endpoint(0x1f, 2),
            endpoint(0x1f, 3),
        ];
        assert_eq!(u.scopes, want);
        // edu at 00:03.0.
        assert_eq!(u.scopes[4].requester_id(), Some(0x18));
        assert!(d.reserved.is_empty() && d.other_structures == 0);
    }

    /// A table with the QEMU header and the given structures.
    fn table(structures: &[u8]) -> Vec<u8> {
        let mut t = QEMU_Q35[..STRUCTURES_AT].to_vec();
        t.extend_from_slice(structures);
        t
    }

    fn drhd(flags: u8, base: u64, scopes: &[u8]) -> Vec<u8> {
        let mut s = vec![0, 0, 0, 0, flags, 0, 0, 0];
        s.extend_from_slice(&base.to_le_bytes());
        s.extend_from_slice(scopes);
        let len = s.len() as u16;
        s[2..4].copy_from_slice(&len.to_le_bytes());
        s
    }

    #[test]
    fn reserved_regions_and_other_structures() {
        let mut rmrr = vec![1, 0, 32, 0, 0, 0, 0, 0];
        rmrr.extend_from_slice(&0xe_8000u64.to_le_bytes());
        rmrr.extend_from_slice(&0xe_ffffu64.to_le_bytes());
        rmrr.extend_from_slice(&[1, 8, 0, 0, 0, 0, 0x14, 0]);
        let atsr = [2, 0, 8, 0, 0, 0, 0, 0];
        let mut t = table(&drhd(1, 0xfed9_0000, &[]));
        t.extend_from_slice(&rmrr);
        t.extend_from_slice(&atsr);
        let d = parse(&t).unwrap();
        assert!(d.units[0].include_pci_all && d.units[0].scopes.is_empty());
        assert_eq!((d.reserved[0].base, d.reserved[0].limit), (0xe_8000, 0xe_ffff));
        assert_eq!(d.reserved[0].scopes, [endpoint(0x14, 0)]);
        assert_eq!(d.other_structures, 1);
    }

    #[test]
    fn malformed_tables_are_refused() {
        assert_eq!(parse(&QEMU_Q35[..40]), Err(DmarError::Truncated));
        assert_eq!(parse(&table(&[])), Err(DmarError::NoUnits));
        // A structure shorter than its header, or than a DRHD: no endless loop.
        assert_eq!(parse(&table(&[5, 0, 0, 0])), Err(DmarError::BadStructure { offset: 48 }));
        assert_eq!(parse(&table(&[0, 0, 8, 0, 0, 0, 0, 0])), Err(DmarError::BadStructure { offset: 48 }));
        // Running past the table.
        let mut long = drhd(0, 0xfed9_0000, &[]);
        long[2] = 200;
        assert_eq!(parse(&table(&long)), Err(DmarError::BadStructure { offset: 48 }));
        // Registers not page aligned.
        assert_eq!(parse(&table(&drhd(0, 0xfed9_0010, &[]))), Err(DmarError::MisalignedRegisters { offset: 48 }));
        // Scopes: too short, an odd path, past the structure.
        for bad in [&[1u8, 4, 0, 0][..], &[1, 7, 0, 0, 0, 0, 3][..], &[1, 10, 0, 0, 0, 0, 3, 0][..]] {
            assert_eq!(parse(&table(&drhd(0, 0xfed9_0000, bad))), Err(DmarError::BadScope { offset: 64 }), "{bad:?}");
        }
    }

    #[test]
    fn counts_are_bounded() {
        let scope = [1u8, 8, 0, 0, 0, 0, 1, 0];
        let many: Vec<u8> = scope.iter().copied().cycle().take(8 * (MAX_SCOPES + 1)).collect();
        let mut t = table(&[]);
        // Split over units so that no structure exceeds its 16-bit length.
        for chunk in many.chunks(8 * 64) {
            t.extend_from_slice(&drhd(0, 0xfed9_0000, chunk));
        }
        assert_eq!(parse(&t), Err(DmarError::TooMany));
        let units: Vec<u8> = (0..=MAX_UNITS).flat_map(|_| drhd(0, 0xfed9_0000, &[])).collect();
        assert_eq!(parse(&table(&units)), Err(DmarError::TooMany));
    }

    #[test]
    fn requester_ids_only_for_one_hop() {
        let mut s = endpoint(3, 0);
        assert_eq!(s.requester_id(), Some(0x18));
        s.start_bus = 2;
        assert_eq!(s.requester_id(), Some(0x218));
        s.path.push((0, 0));
        assert_eq!(s.requester_id(), None, "behind a bridge: the bus is not known here");
        s.path = vec![(32, 0)];
        assert_eq!(s.requester_id(), None);
    }
}
