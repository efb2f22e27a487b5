//! Intel EPT paging structures, 4-level (Intel SDM Vol. 3C §29.3.2, Tables
//! 29-1 to 29-6). Level 0 of the engine is the PML4, 1 the PDPT, 2 the page
//! directory and 3 the page table. VT-d second-level tables have the same
//! shape (VT-d spec §9.8), so one tree serves the CPU and the devices.

use super::{
    Attrs, BlockSize, Descriptor, DescriptorError, MemType, Perms, Stage2Format, INVALID_DESCRIPTOR, LEAF_LEVEL,
    OUTPUT_ADDRESS_MASK, ROOT_LEVEL,
};

/// The EPT format.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ept;

/// Bits 0, 1, 2: read, write, execute (supervisor execute with mode-based
/// execute control). An entry with all three clear is not present.
const READ: u64 = 1 << 0;
const WRITE: u64 = 1 << 1;
const EXEC: u64 = 1 << 2;
const ACCESS_MASK: u64 = READ | WRITE | EXEC;
/// Bits 5:3 of a leaf: the EPT memory type (SDM §29.3.7).
const MEMTYPE_SHIFT: u32 = 3;
const MEMTYPE_MASK: u64 = 0b111 << MEMTYPE_SHIFT;
const MEMTYPE_UC: u64 = 0 << MEMTYPE_SHIFT;
const MEMTYPE_WB: u64 = 6 << MEMTYPE_SHIFT;
/// Bit 6 of a leaf: ignore the guest's PAT, so the memory type is exactly
/// the one the hypervisor chose.
const IGNORE_PAT: u64 = 1 << 6;
/// Bit 7: the entry maps a page (PDPTE: 1 GiB, PDE: 2 MiB). Reserved in a
/// PML4E, ignored in a PTE.
const LARGE_PAGE: u64 = 1 << 7;
/// Bit 8: accessed; bit 9 (leaves only): dirty. The processor sets them
/// when EPTP bit 6 enables accessed/dirty flags, so adopt tolerates them.
const ACCESSED: u64 = 1 << 8;
const DIRTY: u64 = 1 << 9;

/// EPTP (SDM §25.6.11): bits 2:0 memory type of the paging structures,
/// bits 5:3 the page-walk length minus one.
const EPTP_MEMTYPE_WB: u64 = 6;
const EPTP_WALK_LENGTH_SHIFT: u32 = 3;
const EPTP_WALK_LENGTH_4: u64 = (4 - 1) << EPTP_WALK_LENGTH_SHIFT;

impl Ept {
    /// The EPT pointer for the tree at `root`: write-back paging
    /// structures, 4-level walk, accessed/dirty flags disabled.
    pub const fn eptp(root: u64) -> u64 {
        (root & OUTPUT_ADDRESS_MASK) | EPTP_MEMTYPE_WB | EPTP_WALK_LENGTH_4
    }

    fn decode_leaf(entry: u64, size: BlockSize) -> Result<Descriptor, DescriptorError> {
        let address = OUTPUT_ADDRESS_MASK & !(size.bytes() - 1);
        let large = if size == BlockSize::Size4K { 0 } else { LARGE_PAGE };
        let fields = ACCESS_MASK | MEMTYPE_MASK | IGNORE_PAT | large | ACCESSED | DIRTY;
        if entry & !(address | fields) != 0 {
            return Err(DescriptorError::ReservedBits);
        }
        let mem = match entry & MEMTYPE_MASK {
            MEMTYPE_WB => MemType::Normal,
            MEMTYPE_UC => MemType::Device,
            _ => return Err(DescriptorError::UnsupportedAttributes),
        };
        // Write without read is a misconfiguration and execute-only needs a
        // capability; neither is a `Perms`.
        if entry & READ == 0 {
            return Err(DescriptorError::UnsupportedAttributes);
        }
        let attrs = Attrs { perms: Perms::new(entry & WRITE != 0, entry & EXEC != 0), mem };
        let pa = entry & address;
        // What is left to differ is the ignore-PAT bit: accept what we write.
        if Self::leaf_descriptor(pa, size, attrs) != entry & !(ACCESSED | DIRTY) {
            return Err(DescriptorError::UnsupportedAttributes);
        }
        Ok(Descriptor::Leaf { pa, attrs })
    }
}

impl Stage2Format for Ept {
    const NAME: &'static str = "ept";

    fn table_descriptor(next: u64) -> u64 {
        // Non-leaf rights restrict everything below; the leaves decide.
        (next & OUTPUT_ADDRESS_MASK) | ACCESS_MASK
    }

    fn leaf_descriptor(pa: u64, size: BlockSize, attrs: Attrs) -> u64 {
        let large = if size == BlockSize::Size4K { 0 } else { LARGE_PAGE };
        let memtype = match attrs.mem {
            MemType::Normal => MEMTYPE_WB,
            MemType::Device => MEMTYPE_UC,
        };
        let write = if attrs.perms.writable() { WRITE } else { 0 };
        let exec = if attrs.perms.executable() { EXEC } else { 0 };
        (pa & OUTPUT_ADDRESS_MASK & !(size.bytes() - 1)) | READ | write | exec | memtype | IGNORE_PAT | large
    }

    fn decode(entry: u64, level: u8) -> Result<Descriptor, DescriptorError> {
        if entry == INVALID_DESCRIPTOR {
            return Ok(Descriptor::Invalid);
        }
        if entry & ACCESS_MASK == 0 {
            // Not present; the processor ignores the rest, but this engine
            // never writes it.
            return Err(DescriptorError::ReservedBits);
        }
        if level == LEAF_LEVEL {
            return Self::decode_leaf(entry, BlockSize::Size4K);
        }
        if entry & LARGE_PAGE != 0 {
            return match BlockSize::at_level(level) {
                Some(size) if level != ROOT_LEVEL => Self::decode_leaf(entry, size),
                _ => Err(DescriptorError::ForbiddenLeaf),
            };
        }
        // Tables 29-1, 29-3, 29-5: bits 7:3 are reserved in a non-leaf entry.
        if entry & !(OUTPUT_ADDRESS_MASK | ACCESS_MASK | ACCESSED) != 0 {
            return Err(DescriptorError::ReservedBits);
        }
        if entry & ACCESS_MASK != ACCESS_MASK {
            return Err(DescriptorError::UnsupportedAttributes);
        }
        Ok(Descriptor::Table(entry & OUTPUT_ADDRESS_MASK))
    }
}
