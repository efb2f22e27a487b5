//! ACPI discovery of the CPUs (ACPI 6.5 §5.2.5 RSDP, §5.2.7-8 RSDT/XSDT,
//! §5.2.12 MADT).
//!
//! The `acpi` crate walks the root table and finds the MADT. It trusts the
//! lengths it reads, so [`discover_cpus`] first walks the same tables
//! itself, through a fallible [`PhysMemory`] view, checking every header,
//! length, checksum and MADT entry; only then does it hand them to `acpi`.

use crate::bytes::{le32, le64};
use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::ptr::NonNull;

use acpi::madt::{Madt, MadtEntry};
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};

use crate::multiboot2::RsdpCopy;

/// Largest ACPI table accepted (real MADTs are a few KiB).
pub const MAX_TABLE_LEN: usize = 1 << 20;
const SDT_HEADER_LEN: usize = 36;
/// §5.2.12: the MADT's fixed part (header + local APIC address + flags).
const MADT_FIXED_LEN: usize = SDT_HEADER_LEN + 8;
/// §5.2.12.2 / §5.2.12.12: Processor Local APIC and x2APIC structure types.
const MADT_LOCAL_APIC: u8 = 0;
const MADT_LOCAL_X2APIC: u8 = 9;
/// Local APIC flags bit 0: Enabled; bit 1: Online Capable (§5.2.12.2).
const LAPIC_ENABLED: u32 = 1 << 0;
const LAPIC_ONLINE_CAPABLE: u32 = 1 << 1;

/// Read-only access to physical memory that may fail (unmapped, out of RAM).
pub trait PhysMemory {
    fn bytes(&self, phys: u64, len: usize) -> Option<&[u8]>;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcpiError {
    NoRsdp,
    BadRsdpSignature,
    BadRsdpChecksum,
    /// A table is not readable at the address its parent gives.
    Unreadable {
        signature: [u8; 4],
        phys: u64,
    },
    BadLength {
        signature: [u8; 4],
        len: u32,
    },
    BadChecksum {
        signature: [u8; 4],
    },
    BadSignature {
        expected: [u8; 4],
        found: [u8; 4],
    },
    NoMadt,
    BadMadtEntry {
        offset: usize,
    },
    /// The `acpi` crate refused what the walk accepted.
    Crate,
    NoCpus,
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sig = |s: &[u8; 4]| core::str::from_utf8(s).unwrap_or("????").chars().collect::<alloc::string::String>();
        match self {
            Self::NoRsdp => write!(f, "no ACPI RSDP from the boot loader"),
            Self::BadRsdpSignature => write!(f, "RSDP signature is not 'RSD PTR '"),
            Self::BadRsdpChecksum => write!(f, "RSDP checksum mismatch"),
            Self::Unreadable { signature, phys } => write!(f, "{} table at {phys:#x} not readable", sig(signature)),
            Self::BadLength { signature, len } => write!(f, "{} table length {len} invalid", sig(signature)),
            Self::BadChecksum { signature } => write!(f, "{} table checksum mismatch", sig(signature)),
            Self::BadSignature { expected, found } => {
                write!(f, "expected {} table, found {}", sig(expected), sig(found))
            }
            Self::NoMadt => write!(f, "no MADT (APIC) table"),
            Self::BadMadtEntry { offset } => write!(f, "malformed MADT entry at offset {offset}"),
            Self::Crate => write!(f, "acpi crate rejected validated tables"),
            Self::NoCpus => write!(f, "MADT lists no usable CPU"),
        }
    }
}

/// The CPUs and interrupt controller the MADT describes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MadtCpus {
    pub local_apic_phys: u32,
    /// APIC ids of enabled (or online-capable) processors, MADT order.
    pub apic_ids: Vec<u32>,
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

/// The root table the RSDP points at: (revision, address); revision 0
/// means an RSDT of 32-bit pointers, 2+ an XSDT of 64-bit pointers.
pub fn parse_rsdp(copy: &RsdpCopy) -> Result<(u8, u64), AcpiError> {
    let b = match copy {
        RsdpCopy::V1(b) | RsdpCopy::V2(b) => b.as_slice(),
    };
    if b.len() < 20 || &b[..8] != b"RSD PTR " {
        return Err(AcpiError::BadRsdpSignature);
    }
    if sum(&b[..20]) != 0 {
        return Err(AcpiError::BadRsdpChecksum);
    }
    let revision = b[15];
    if revision >= 2 && b.len() >= 36 {
        if sum(&b[..36]) != 0 {
            return Err(AcpiError::BadRsdpChecksum);
        }
        Ok((revision, le64(b, 24)))
    } else {
        Ok((0, u64::from(le32(b, 16))))
    }
}

/// Reads and checks one table (header, length bound, checksum).
fn table<M: PhysMemory>(mem: &M, phys: u64, expected: Option<[u8; 4]>) -> Result<&[u8], AcpiError> {
    let want = expected.unwrap_or(*b"????");
    let header = mem.bytes(phys, SDT_HEADER_LEN).ok_or(AcpiError::Unreadable { signature: want, phys })?;
    let mut signature = [0u8; 4];
    signature.copy_from_slice(&header[..4]);
    if let Some(e) = expected {
        if signature != e {
            return Err(AcpiError::BadSignature { expected: e, found: signature });
        }
    }
    let len = le32(header, 4);
    if (len as usize) < SDT_HEADER_LEN || len as usize > MAX_TABLE_LEN {
        return Err(AcpiError::BadLength { signature, len });
    }
    let body = mem.bytes(phys, len as usize).ok_or(AcpiError::Unreadable { signature, phys })?;
    if sum(body) != 0 {
        return Err(AcpiError::BadChecksum { signature });
    }
    Ok(body)
}

/// Checks every MADT entry: at least a 2-byte header, long enough for its
/// type, inside the table. Zero-length entries would loop forever.
fn check_madt_entries(madt: &[u8]) -> Result<(), AcpiError> {
    if madt.len() < MADT_FIXED_LEN {
        return Err(AcpiError::BadLength { signature: *b"APIC", len: madt.len() as u32 });
    }
    let mut off = MADT_FIXED_LEN;
    while off < madt.len() {
        let (Some(&kind), Some(&len)) = (madt.get(off), madt.get(off + 1)) else {
            return Err(AcpiError::BadMadtEntry { offset: off });
        };
        // Minimum lengths of the types the acpi crate decodes (§5.2.12.2-20).
        let min = match kind {
            4 => 6,
            MADT_LOCAL_APIC | 3 => 8,
            2 => 10,
            1 | 5 | 10 => 12,
            7 => 17,
            15 => 20,
            12 => 24,
            11 => 80,
            6 | 8 | MADT_LOCAL_X2APIC | 13 | 14 | 16 => 16,
            _ => 2,
        };
        let len = len as usize;
        if len < min || off + len > madt.len() {
            return Err(AcpiError::BadMadtEntry { offset: off });
        }
        off += len;
    }
    Ok(())
}

/// Walks RSDT/XSDT and every table it lists; returns the MADT's address.
fn validate<M: PhysMemory>(mem: &M, revision: u8, root: u64) -> Result<u64, AcpiError> {
    let (sig, ptr_len) = if revision == 0 { (*b"RSDT", 4) } else { (*b"XSDT", 8) };
    let root_table = table(mem, root, Some(sig))?;
    let mut madt = None;
    for entry in root_table[SDT_HEADER_LEN..].chunks_exact(ptr_len) {
        let phys = if ptr_len == 4 { u64::from(le32(entry, 0)) } else { le64(entry, 0) };
        let t = table(mem, phys, None)?;
        if &t[..4] == b"APIC" && madt.is_none() {
            check_madt_entries(t)?;
            madt = Some(phys);
        }
    }
    madt.ok_or(AcpiError::NoMadt)
}

/// `acpi` handler over a [`PhysMemory`] view. Requests are only made after
/// [`validate`] has read the same ranges, so they are always readable.
struct Window<'m, M: PhysMemory>(&'m M);

impl<M: PhysMemory> Clone for Window<'_, M> {
    fn clone(&self) -> Self {
        Window(self.0)
    }
}

impl<M: PhysMemory> AcpiHandler for Window<'_, M> {
    unsafe fn map_physical_region<T>(&self, physical_address: usize, size: usize) -> PhysicalMapping<Self, T> {
        let ptr = match self.0.bytes(physical_address as u64, size) {
            Some(bytes) => NonNull::from(bytes).cast::<T>(),
            // Not reached after `validate`; if it were, acpi sees zeroes and
            // reports a bad signature instead of reading unmapped memory.
            None => NonNull::from(Box::leak(vec![0u8; size].into_boxed_slice())).cast::<T>(),
        };
        // SAFETY: `ptr` points to `size` readable bytes that outlive the
        // mapping (borrowed from the memory view, or leaked); the acpi
        // table types are `repr(C, packed)`, so any address is aligned.
        unsafe { PhysicalMapping::new(physical_address, ptr, size, size, self.clone()) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// The table with `signature` that the root table lists, checked like
/// every table `validate` reads (header, length, checksum), or `None`.
pub fn find_table<'m, M: PhysMemory>(
    mem: &'m M,
    rsdp: Option<&RsdpCopy>,
    signature: [u8; 4],
) -> Result<Option<&'m [u8]>, AcpiError> {
    let (revision, root) = parse_rsdp(rsdp.ok_or(AcpiError::NoRsdp)?)?;
    let (sig, ptr_len) = if revision == 0 { (*b"RSDT", 4) } else { (*b"XSDT", 8) };
    let root_table = table(mem, root, Some(sig))?;
    for entry in root_table[SDT_HEADER_LEN..].chunks_exact(ptr_len) {
        let phys = if ptr_len == 4 { u64::from(le32(entry, 0)) } else { le64(entry, 0) };
        let header = mem.bytes(phys, 4).ok_or(AcpiError::Unreadable { signature, phys })?;
        if header == signature {
            return table(mem, phys, Some(signature)).map(Some);
        }
    }
    Ok(None)
}

/// Finds the CPUs: validates the tables, then reads the MADT with `acpi`.
pub fn discover_cpus<M: PhysMemory>(mem: &M, rsdp: Option<&RsdpCopy>) -> Result<MadtCpus, AcpiError> {
    let (revision, root) = parse_rsdp(rsdp.ok_or(AcpiError::NoRsdp)?)?;
    validate(mem, revision, root)?;
    // SAFETY: `validate` read the root table and every table it lists
    // through `mem`, and the handler maps only through `mem`.
    let tables =
        unsafe { AcpiTables::from_rsdt(Window(mem), revision, root as usize) }.map_err(|_| AcpiError::Crate)?;
    let madt = tables.find_table::<Madt>().map_err(|_| AcpiError::NoMadt)?;
    let local_apic_phys = madt.get().local_apic_address;
    let mut apic_ids = Vec::new();
    for entry in madt.get().entries() {
        match entry {
            MadtEntry::LocalApic(e) if e.flags & (LAPIC_ENABLED | LAPIC_ONLINE_CAPABLE) != 0 => {
                apic_ids.push(u32::from(e.apic_id));
            }
            MadtEntry::LocalX2Apic(e) if e.flags & (LAPIC_ENABLED | LAPIC_ONLINE_CAPABLE) != 0 => {
                apic_ids.push(e.x2apic_id);
            }
            _ => {}
        }
    }
    if apic_ids.is_empty() {
        return Err(AcpiError::NoCpus);
    }
    Ok(MadtCpus { local_apic_phys, apic_ids })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Physical memory simulated by a byte vector at `base`.
    struct Arena {
        base: u64,
        bytes: Vec<u8>,
    }

    impl PhysMemory for Arena {
        fn bytes(&self, phys: u64, len: usize) -> Option<&[u8]> {
            let start = usize::try_from(phys.checked_sub(self.base)?).ok()?;
            self.bytes.get(start..start.checked_add(len)?)
        }
    }

    fn fix_checksum(t: &mut [u8], at: usize) {
        t[at] = 0;
        t[at] = 0u8.wrapping_sub(sum(t));
    }

    fn sdt(sig: [u8; 4], body: &[u8]) -> Vec<u8> {
        let mut t = vec![0u8; SDT_HEADER_LEN];
        t[..4].copy_from_slice(&sig);
        t[4..8].copy_from_slice(&((SDT_HEADER_LEN + body.len()) as u32).to_le_bytes());
        t[8] = 1;
        t[10..16].copy_from_slice(b"BOCHS ");
        t[16..24].copy_from_slice(b"BXPC    ");
        t.extend_from_slice(body);
        fix_checksum(&mut t, 9);
        t
    }

    /// A Bochs-like layout: RSDT at 0x7ff0000 listing a FACP-ish table and
    /// an MADT with two enabled local APICs and one disabled.
    const BASE: u64 = 0x7ff_0000;
    fn tables() -> (Arena, RsdpCopy) {
        let mut madt_body = Vec::new();
        madt_body.extend_from_slice(&0xfee0_0000u32.to_le_bytes());
        madt_body.extend_from_slice(&1u32.to_le_bytes());
        for (id, flags) in [(0u8, 1u32), (1, 1), (2, 0)] {
            madt_body.extend_from_slice(&[MADT_LOCAL_APIC, 8, id, id]);
            madt_body.extend_from_slice(&flags.to_le_bytes());
        }
        // An I/O APIC entry, skipped.
        madt_body.extend_from_slice(&[1, 12, 2, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]);
        let madt = sdt(*b"APIC", &madt_body);
        let other = sdt(*b"SSDT", &[0u8; 8]);
        let madt_at = BASE + 0x100;
        let other_at = BASE + 0x400;
        let mut rsdt_body = Vec::new();
        rsdt_body.extend_from_slice(&(other_at as u32).to_le_bytes());
        rsdt_body.extend_from_slice(&(madt_at as u32).to_le_bytes());
        let rsdt = sdt(*b"RSDT", &rsdt_body);
        let mut bytes = vec![0u8; 0x1000];
        bytes[..rsdt.len()].copy_from_slice(&rsdt);
        bytes[0x100..0x100 + madt.len()].copy_from_slice(&madt);
        bytes[0x400..0x400 + other.len()].copy_from_slice(&other);
        let mut root_pointer = b"RSD PTR ".to_vec();
        root_pointer.extend_from_slice(&[0, b'B', b'O', b'C', b'H', b'S', b' ', 0]);
        root_pointer.extend_from_slice(&(BASE as u32).to_le_bytes());
        fix_checksum(&mut root_pointer, 8);
        (Arena { base: BASE, bytes }, RsdpCopy::V1(root_pointer))
    }

    #[test]
    fn finds_enabled_cpus() {
        let (mem, rsdp) = tables();
        let cpus = discover_cpus(&mem, Some(&rsdp)).unwrap();
        assert_eq!(cpus.apic_ids, [0, 1]);
        assert_eq!(cpus.local_apic_phys, 0xfee0_0000);
    }

    #[test]
    fn rejects_bad_rsdp() {
        let (mem, rsdp) = tables();
        assert_eq!(discover_cpus(&mem, None), Err(AcpiError::NoRsdp));
        let RsdpCopy::V1(mut b) = rsdp else { unreachable!() };
        b[9] ^= 1;
        assert_eq!(discover_cpus(&mem, Some(&RsdpCopy::V1(b.clone()))), Err(AcpiError::BadRsdpChecksum));
        b[0] = b'X';
        assert_eq!(discover_cpus(&mem, Some(&RsdpCopy::V1(b))), Err(AcpiError::BadRsdpSignature));
    }

    #[test]
    fn rejects_zero_length_madt_entry() {
        let (mut mem, rsdp) = tables();
        // First entry's length byte, then re-checksum the MADT.
        let madt = 0x100;
        mem.bytes[madt + MADT_FIXED_LEN + 1] = 0;
        let len = le32(&mem.bytes, madt + 4) as usize;
        fix_checksum(&mut mem.bytes[madt..madt + len], 9);
        assert_eq!(discover_cpus(&mem, Some(&rsdp)), Err(AcpiError::BadMadtEntry { offset: MADT_FIXED_LEN }));
    }

    #[test]
    fn rejects_table_outside_memory_and_bad_checksum() {
        let (mut mem, rsdp) = tables();
        mem.bytes[0x100 + 20] ^= 0xff;
        assert_eq!(discover_cpus(&mem, Some(&rsdp)), Err(AcpiError::BadChecksum { signature: *b"APIC" }));
        let (mut mem, rsdp) = tables();
        // Point the RSDT's first entry far outside the arena.
        mem.bytes[SDT_HEADER_LEN..SDT_HEADER_LEN + 4].copy_from_slice(&0xdead_0000u32.to_le_bytes());
        let len = le32(&mem.bytes, 4) as usize;
        fix_checksum(&mut mem.bytes[..len], 9);
        assert!(matches!(discover_cpus(&mem, Some(&rsdp)), Err(AcpiError::Unreadable { .. })));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
        #[test]
        fn mutated_tables_never_panic(flips in proptest::collection::vec((0usize..0x500, any::<u8>()), 1..6)) {
            let (mut mem, rsdp) = tables();
            for (at, byte) in flips {
                mem.bytes[at] = byte;
            }
            let _ = discover_cpus(&mem, Some(&rsdp));
        }
    }
}
