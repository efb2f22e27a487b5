//! The aarch64 platform from ACPI instead of a DTB (issue 21, item 2):
//! the same [`DtbPlatform`] the DTB path gives the hypervisor, read from
//! the tables an Arm server's firmware publishes. Each table's bytes
//! (header included; the caller found it through the XSDT and checked its
//! checksum) are validated here as untrusted input:
//! - MADT (ACPI 6.5 §5.2.12): the CPUs' MPIDRs from the enabled GICC
//!   structures, the GICv3 distributor (GICD) and redistributor range
//!   (GICR);
//! - SPCR (Microsoft "Serial Port Console Redirection Table", rev. 2+): the
//!   PL011 console;
//! - FADT (§5.2.9, ARM_BOOT_ARCH at byte 129): the PSCI conduit;
//! - MCFG (PCI Firmware Spec 3.3 §4.1.2): the ECAM window of segment 0;
//! - IORT ([`crate::iort`]): the SMMUv3 and the requester-to-stream-id map.
//!
//! What ACPI keeps in AML (the PCI host bridge's memory windows, in the
//! DSDT's `_CRS`) is not read: `PcieHost::mmio32` stays `None`.

use crate::bytes::{acpi_table, le16, le32, le64};
use alloc::vec::Vec;
use core::fmt;

use crate::dtb::{DtbPlatform, GicV3, IommuMap, PcieHost, PsciConduit, MAX_CPUS};
use crate::iort::{Iort, NodeKind};
use crate::PhysRange;

/// MADT: structures start after the header, the local interrupt
/// controller address and the flags; each is type (u8), length (u8).
const MADT_STRUCTURES_AT: usize = 44;
const MADT_GICC: u8 = 0x0b;
const MADT_GICD: u8 = 0x0c;
const MADT_GICR: u8 = 0x0e;
/// GICC (Table 5.37): flags at 12 (bit 0 enabled, bit 3 online capable),
/// MPIDR at 68; 80 bytes from ACPI 6.0.
const GICC_FLAGS_AT: usize = 12;
const GICC_MPIDR_AT: usize = 68;
const GICC_MIN_LEN: usize = 76;
const GICC_ENABLED: u32 = 1 << 0;
const GICC_ONLINE_CAPABLE: u32 = 1 << 3;
/// GICD (Table 5.39): base at 8, GIC version at 20 (3 = GICv3; 0 =
/// "discover from the hardware").
const GICD_BASE_AT: usize = 8;
const GICD_VERSION_AT: usize = 20;
const GICD_LEN: usize = 24;
/// A GICv3 distributor's register frame (GICv3 spec §12.1.2: 64 KiB).
const GICD_SIZE: u64 = 0x1_0000;
/// GICR (Table 5.41): discovery range base at 4, length at 12.
const GICR_BASE_AT: usize = 4;
const GICR_LENGTH_AT: usize = 12;
const GICR_LEN: usize = 16;
/// SPCR: interface type at 36 (3 = PL011, 0x0e = SBSA generic UART, a
/// PL011 subset), the base address as a Generic Address Structure at 40
/// (address space 0 = system memory, address at 44).
const SPCR_TYPE_AT: usize = 36;
const SPCR_SPACE_AT: usize = 40;
const SPCR_ADDRESS_AT: usize = 44;
const SPCR_MIN_LEN: usize = 52;
const SPCR_PL011: u8 = 0x03;
const SPCR_SBSA: u8 = 0x0e;
const PL011_SIZE: u64 = 0x1000;
/// FADT ARM_BOOT_ARCH (§5.2.9 Table 5.11): bit 0 PSCI compliant, bit 1
/// PSCI calls through HVC instead of SMC.
const FADT_ARM_BOOT_ARCH_AT: usize = 129;
const PSCI_COMPLIANT: u16 = 1 << 0;
const PSCI_USE_HVC: u16 = 1 << 1;
/// MCFG: allocation structures (16 bytes: base, segment, start and end
/// bus) after the header and 8 reserved bytes.
const MCFG_ENTRIES_AT: usize = 44;
const MCFG_ENTRY: usize = 16;
/// An SMMUv3's two 64 KiB register pages (SMMUv3 spec §6.1).
const SMMU_V3_SIZE: u64 = 0x2_0000;

/// Why the tables do not describe a platform the hypervisor can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiPlatformError {
    /// A table shorter than its header says or than its fixed part, or
    /// with another signature (which table).
    BadTable(&'static str),
    /// A MADT structure whose length is too short for its type or runs
    /// past the table (at byte `offset`).
    BadMadtStructure {
        offset: usize,
    },
    TooManyCpus,
    NoCpus,
    /// No GICD, a GIC that is not v3, or no GICR range.
    NoGicV3,
    /// The console is not a PL011 in system memory.
    UnsupportedConsole,
}

impl fmt::Display for AcpiPlatformError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadTable(which) => write!(f, "{which} table malformed"),
            Self::BadMadtStructure { offset } => write!(f, "MADT structure at offset {offset} malformed"),
            Self::TooManyCpus => write!(f, "more than {MAX_CPUS} CPUs"),
            Self::NoCpus => f.write_str("MADT has no enabled CPU"),
            Self::NoGicV3 => f.write_str("MADT describes no GICv3 with a redistributor range"),
            Self::UnsupportedConsole => f.write_str("SPCR console is not a PL011 in memory"),
        }
    }
}

/// `table` cut to its header's length ([`acpi_table`]), as `which`.
fn body<'t>(
    table: &'t [u8],
    signature: [u8; 4],
    min: usize,
    which: &'static str,
) -> Result<&'t [u8], AcpiPlatformError> {
    acpi_table(table, signature, min).map_err(|_| AcpiPlatformError::BadTable(which))
}

/// The CPUs and the GICv3 from the MADT.
fn madt(table: &[u8]) -> Result<(Vec<u64>, GicV3), AcpiPlatformError> {
    let t = body(table, *b"APIC", MADT_STRUCTURES_AT, "MADT")?;
    let (mut cpus, mut distributor, mut redistributors) = (Vec::new(), None, None);
    let mut at = MADT_STRUCTURES_AT;
    while at < t.len() {
        let bad = AcpiPlatformError::BadMadtStructure { offset: at };
        let header = t.get(at..at + 2).ok_or(bad)?;
        let (kind, len) = (header[0], usize::from(header[1]));
        if len < 2 || at + len > t.len() {
            return Err(bad);
        }
        let s = &t[at..at + len];
        let needs = |min: usize| if len < min { Err(bad) } else { Ok(()) };
        match kind {
            MADT_GICC => {
                needs(GICC_MIN_LEN)?;
                if le32(s, GICC_FLAGS_AT) & (GICC_ENABLED | GICC_ONLINE_CAPABLE) != 0 {
                    if cpus.len() == MAX_CPUS {
                        return Err(AcpiPlatformError::TooManyCpus);
                    }
                    // The affinity fields only (Aff3, Aff2, Aff1, Aff0), as
                    // the DTB's `reg` of a CPU node gives them.
                    cpus.push(le64(s, GICC_MPIDR_AT) & 0xff_00ff_ffff);
                }
            }
            MADT_GICD if distributor.is_none() => {
                needs(GICD_LEN)?;
                distributor = Some((le64(s, GICD_BASE_AT), s[GICD_VERSION_AT]));
            }
            MADT_GICR if redistributors.is_none() => {
                needs(GICR_LEN)?;
                redistributors = Some(PhysRange::new(le64(s, GICR_BASE_AT), u64::from(le32(s, GICR_LENGTH_AT))));
            }
            _ => {}
        }
        at += len;
    }
    if cpus.is_empty() {
        return Err(AcpiPlatformError::NoCpus);
    }
    match (distributor, redistributors) {
        (Some((base, 0 | 3)), Some(gicr)) if gicr.size != 0 && gicr.end().is_some() => {
            Ok((cpus, GicV3 { distributor: PhysRange::new(base, GICD_SIZE), redistributors: gicr }))
        }
        _ => Err(AcpiPlatformError::NoGicV3),
    }
}

/// The PL011 console from the SPCR.
fn spcr(table: &[u8]) -> Result<PhysRange, AcpiPlatformError> {
    let t = body(table, *b"SPCR", SPCR_MIN_LEN, "SPCR")?;
    if !matches!(t[SPCR_TYPE_AT], SPCR_PL011 | SPCR_SBSA) || t[SPCR_SPACE_AT] != 0 {
        return Err(AcpiPlatformError::UnsupportedConsole);
    }
    Ok(PhysRange::new(le64(t, SPCR_ADDRESS_AT), PL011_SIZE))
}

/// The PSCI conduit from the FADT, if it says PSCI is there.
fn fadt(table: &[u8]) -> Result<Option<PsciConduit>, AcpiPlatformError> {
    let t = body(table, *b"FACP", FADT_ARM_BOOT_ARCH_AT + 2, "FADT")?;
    let flags = le16(t, FADT_ARM_BOOT_ARCH_AT);
    Ok((flags & PSCI_COMPLIANT != 0).then_some(if flags & PSCI_USE_HVC != 0 {
        PsciConduit::Hvc
    } else {
        PsciConduit::Smc
    }))
}

/// Segment 0's ECAM window from the MCFG.
fn mcfg(table: &[u8]) -> Result<Option<(PhysRange, u8, u8)>, AcpiPlatformError> {
    let t = body(table, *b"MCFG", MCFG_ENTRIES_AT, "MCFG")?;
    let entries = &t[MCFG_ENTRIES_AT..];
    if !entries.len().is_multiple_of(MCFG_ENTRY) {
        return Err(AcpiPlatformError::BadTable("MCFG"));
    }
    for e in entries.chunks_exact(MCFG_ENTRY) {
        let (base, segment, start, end) = (le64(e, 0), le16(e, 8), e[10], e[11]);
        if segment != 0 {
            continue;
        }
        if end < start {
            return Err(AcpiPlatformError::BadTable("MCFG"));
        }
        // The base is that of bus 0; the window starts at bus `start`.
        let first = base.checked_add(u64::from(start) << 20).ok_or(AcpiPlatformError::BadTable("MCFG"))?;
        let ecam = PhysRange::new(first, (u64::from(end - start) + 1) << 20);
        if ecam.end().is_none() {
            return Err(AcpiPlatformError::BadTable("MCFG"));
        }
        return Ok(Some((ecam, start, end)));
    }
    Ok(None)
}

/// The platform from the ACPI tables (each `None` if the firmware has not
/// got it): MADT and SPCR are required, as the DTB path requires a GIC and
/// a console; without a FADT PSCI flag, `psci` is `None`.
pub fn platform(
    madt_table: &[u8],
    spcr_table: &[u8],
    fadt_table: Option<&[u8]>,
    mcfg_table: Option<&[u8]>,
    iort: Option<&Iort>,
) -> Result<DtbPlatform, AcpiPlatformError> {
    let (cpus, gic) = madt(madt_table)?;
    let uart = spcr(spcr_table)?;
    let psci = fadt_table.map(fadt).transpose()?.flatten();
    let smmu = iort.and_then(|t| {
        t.nodes.iter().find_map(|n| match n.kind {
            NodeKind::SmmuV3 { base, .. } => Some(PhysRange::new(base, SMMU_V3_SIZE)),
            _ => None,
        })
    });
    let pcie = mcfg_table.map(mcfg).transpose()?.flatten().map(|(ecam, bus_start, bus_end)| {
        // The root complex mapping of segment 0 into the SMMUv3, as the
        // DTB's `iommu-map` gives it.
        let iommu_map = iort.and_then(|t| {
            let root = t.nodes.iter().find(|n| matches!(n.kind, NodeKind::RootComplex { segment: 0, .. }))?;
            root.mappings.iter().find_map(|m| {
                let to_smmu =
                    t.nodes.iter().any(|n| n.offset == m.output_node && matches!(n.kind, NodeKind::SmmuV3 { .. }));
                (to_smmu && !m.single).then(|| IommuMap {
                    rid_base: m.input_base,
                    iommu_phandle: 0,
                    sid_base: m.output_base,
                    len: u32::try_from(m.count).unwrap_or(u32::MAX),
                })
            })
        });
        PcieHost { ecam, bus_start, bus_end, mmio32: None, iommu_map }
    });
    Ok(DtbPlatform { cpus, uart: Some(uart), gic: Some(gic), psci, smmu, pcie })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MADT: &[u8] = include_bytes!("../testdata/qemu-virt-madt.bin");
    const SPCR: &[u8] = include_bytes!("../testdata/qemu-virt-spcr.bin");
    const FADT: &[u8] = include_bytes!("../testdata/qemu-virt-fadt.bin");
    const MCFG: &[u8] = include_bytes!("../testdata/qemu-virt-mcfg.bin");
    const IORT: &[u8] = include_bytes!("../testdata/qemu-virt-smmuv3-iort.bin");
    /// The DTB of the same machine (`-M virt,...,iommu=smmuv3 -smp 2`).
    const DTB: &[u8] = include_bytes!("../testdata/qemu-virt-smmuv3-edu.dtb");

    #[test]
    fn qemu_virt_from_acpi_is_what_its_dtb_says() {
        let iort = crate::iort::parse(IORT).unwrap();
        let acpi = platform(MADT, SPCR, Some(FADT), Some(MCFG), Some(&iort)).unwrap();
        assert_eq!(acpi.cpus, [0, 1]);
        assert_eq!(acpi.uart, Some(PhysRange::new(0x0900_0000, 0x1000)));
        assert_eq!(acpi.psci, Some(PsciConduit::Smc));
        let gic = acpi.gic.unwrap();
        assert_eq!(gic.distributor, PhysRange::new(0x0800_0000, 0x1_0000));
        assert_eq!(gic.redistributors, PhysRange::new(0x080a_0000, 0xf6_0000));
        assert_eq!(acpi.smmu, Some(PhysRange::new(0x0905_0000, 0x2_0000)));
        let pcie = acpi.pcie.unwrap();
        assert_eq!((pcie.ecam, pcie.bus_start, pcie.bus_end), (PhysRange::new(0x40_1000_0000, 0x1000_0000), 0, 0xff));
        let map = pcie.iommu_map.unwrap();
        assert_eq!((map.stream_id(0x10), map.stream_id(0x100)), (Some(0x10), None));
        // The DTB of the same machine says the same (but for the PCI
        // memory window, which ACPI keeps in AML).
        let (_, dtb) = crate::dtb::parse(DTB, 0x4800_0000).unwrap();
        assert_eq!((dtb.cpus, dtb.uart, dtb.psci, dtb.smmu), (acpi.cpus, acpi.uart, acpi.psci, acpi.smmu));
        assert_eq!(dtb.gic.map(|g| g.redistributors), Some(gic.redistributors));
        assert_eq!(dtb.gic.map(|g| g.distributor.base), Some(gic.distributor.base));
        assert_eq!(dtb.pcie.map(|p| p.ecam), Some(pcie.ecam));
    }

    fn patched(table: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut t = table.to_vec();
        t[at..at + bytes.len()].copy_from_slice(bytes);
        t
    }

    #[test]
    fn tables_that_describe_no_usable_platform_are_refused() {
        let p = |madt: &[u8], spcr: &[u8]| platform(madt, spcr, Some(FADT), Some(MCFG), None).err();
        assert_eq!(p(&MADT[..40], SPCR), Some(AcpiPlatformError::BadTable("MADT")));
        assert_eq!(p(SPCR, SPCR), Some(AcpiPlatformError::BadTable("MADT")), "wrong signature");
        // The first GICC (at 0x44) with a length that runs past the table.
        assert_eq!(p(&patched(MADT, 0x45, &[0xff]), SPCR), Some(AcpiPlatformError::BadMadtStructure { offset: 0x44 }));
        // Both GICCs disabled.
        let none = patched(&patched(MADT, 0x44 + 12, &[0]), 0x94 + 12, &[0]);
        assert_eq!(p(&none, SPCR), Some(AcpiPlatformError::NoCpus));
        // A GICv2 distributor.
        assert_eq!(p(&patched(MADT, 0x2c + 20, &[2]), SPCR), Some(AcpiPlatformError::NoGicV3));
        // A 16550 console, or one in I/O space.
        assert_eq!(p(MADT, &patched(SPCR, 36, &[0])), Some(AcpiPlatformError::UnsupportedConsole));
        assert_eq!(p(MADT, &patched(SPCR, 40, &[1])), Some(AcpiPlatformError::UnsupportedConsole));
        // No PSCI in the FADT, or PSCI over HVC.
        let no_psci = patched(FADT, 129, &[0]);
        assert_eq!(platform(MADT, SPCR, Some(&no_psci), None, None).map(|p| p.psci), Ok(None));
        let hvc = patched(FADT, 129, &[3]);
        assert_eq!(platform(MADT, SPCR, Some(&hvc), None, None).map(|p| p.psci), Ok(Some(PsciConduit::Hvc)));
        // An MCFG whose bus range runs backwards.
        let backwards = patched(MCFG, 44 + 10, &[5, 1]);
        assert_eq!(platform(MADT, SPCR, None, Some(&backwards), None).err(), Some(AcpiPlatformError::BadTable("MCFG")));
    }
}
