//! AMD nested paging (NPT): the host's long-mode page-table format, 4-level
//! (AMD64 APM Vol. 2, §5.3.3 "4-Kbyte Page Translation" and the long-mode
//! entry formats of Figures 5-18 to 5-25; §15.25 "Nested Paging"). Level 0
//! of the engine is the PML4, 1 the PDP, 2 the page directory and 3 the
//! page table. The VMCB's N_CR3 holds the root.
//!
//! Unlike EPT this is the ordinary x86-64 format: present and writable
//! bits, no read bit (present means readable), no-execute in bit 63 (which
//! the processor honours in nested tables only with the host's EFER.NXE
//! set, §15.25.5, so the SVM backend sets it), and the memory type from
//! PWT/PCD/PAT through the host's PAT. Every entry sets U/S: a nested walk
//! is a user access (§15.25.5), and an entry without U/S faults the guest's
//! own page walks.

use super::{
    Attrs, BlockSize, Descriptor, DescriptorError, MemType, Perms, Stage2Format, INVALID_DESCRIPTOR, LEAF_LEVEL,
    OUTPUT_ADDRESS_MASK, ROOT_LEVEL,
};

/// The NPT format.
#[derive(Clone, Copy, Debug, Default)]
pub struct Npt;

/// Bit 0 present, bit 1 read/write, bit 2 user/supervisor.
const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
/// Bits 3 and 4: page-level write-through and cache disable. With bit 7 of
/// a PTE (bit 12 of a large page) clear they select PAT entry
/// `PCD * 2 + PWT`: entry 0 is write-back and entry 3 uncacheable in the
/// power-on PAT (APM Vol. 2 §7.8.2), which the hypervisor never changes.
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const MEMTYPE_MASK: u64 = PWT | PCD;
const MEMTYPE_WB: u64 = 0;
const MEMTYPE_UC: u64 = PWT | PCD;
/// Bit 5: accessed; bit 6 (leaves only): dirty. The processor sets both
/// during nested walks, so adopt tolerates them.
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
/// Bit 7 of a PDPE or PDE: the entry maps a 1 GiB or 2 MiB page. Reserved
/// (must be zero) in a PML4E; in a PTE it is the PAT bit, never set here.
const PAGE_SIZE_BIT: u64 = 1 << 7;
/// Bit 63: no execute.
const NO_EXECUTE: u64 = 1 << 63;

impl Npt {
    fn decode_leaf(entry: u64, size: BlockSize) -> Result<Descriptor, DescriptorError> {
        let address = OUTPUT_ADDRESS_MASK & !(size.bytes() - 1);
        let large = if size == BlockSize::Size4K { 0 } else { PAGE_SIZE_BIT };
        let fields = PRESENT | WRITABLE | USER | MEMTYPE_MASK | ACCESSED | DIRTY | large | NO_EXECUTE;
        // Bit 12 of a large page is its PAT bit, and bits 8-11 and 52-62
        // are global and available bits: none is ever written here.
        if entry & !(address | fields) != 0 {
            return Err(DescriptorError::ReservedBits);
        }
        let mem = match entry & MEMTYPE_MASK {
            MEMTYPE_WB => MemType::Normal,
            MEMTYPE_UC => MemType::Device,
            _ => return Err(DescriptorError::UnsupportedAttributes),
        };
        if entry & USER == 0 {
            return Err(DescriptorError::UnsupportedAttributes);
        }
        let attrs = Attrs { perms: Perms::new(entry & WRITABLE != 0, entry & NO_EXECUTE == 0), mem };
        Ok(Descriptor::Leaf { pa: entry & address, attrs })
    }
}

impl Stage2Format for Npt {
    const NAME: &'static str = "npt";

    fn table_descriptor(next: u64) -> u64 {
        // Rights in a non-leaf entry restrict everything below it: all
        // granted, the leaves decide.
        (next & OUTPUT_ADDRESS_MASK) | PRESENT | WRITABLE | USER
    }

    fn leaf_descriptor(pa: u64, size: BlockSize, attrs: Attrs) -> u64 {
        let large = if size == BlockSize::Size4K { 0 } else { PAGE_SIZE_BIT };
        let memtype = match attrs.mem {
            MemType::Normal => MEMTYPE_WB,
            MemType::Device => MEMTYPE_UC,
        };
        let write = if attrs.perms.writable() { WRITABLE } else { 0 };
        let no_exec = if attrs.perms.executable() { 0 } else { NO_EXECUTE };
        (pa & OUTPUT_ADDRESS_MASK & !(size.bytes() - 1)) | PRESENT | USER | write | memtype | large | no_exec
    }

    fn decode(entry: u64, level: u8) -> Result<Descriptor, DescriptorError> {
        if entry == INVALID_DESCRIPTOR {
            return Ok(Descriptor::Invalid);
        }
        if entry & PRESENT == 0 {
            // Not present; the processor ignores the rest, but this engine
            // never writes it.
            return Err(DescriptorError::ReservedBits);
        }
        if level == LEAF_LEVEL {
            return Self::decode_leaf(entry, BlockSize::Size4K);
        }
        if entry & PAGE_SIZE_BIT != 0 {
            return match BlockSize::at_level(level) {
                Some(size) if level != ROOT_LEVEL => Self::decode_leaf(entry, size),
                _ => Err(DescriptorError::ForbiddenLeaf),
            };
        }
        // A non-leaf entry: address, the three rights, accessed. Its dirty
        // bit is ignored by the processor and never written here.
        if entry & !(OUTPUT_ADDRESS_MASK | PRESENT | WRITABLE | USER | ACCESSED) != 0 {
            return Err(DescriptorError::ReservedBits);
        }
        if entry & (WRITABLE | USER) != WRITABLE | USER {
            return Err(DescriptorError::UnsupportedAttributes);
        }
        Ok(Descriptor::Table(entry & OUTPUT_ADDRESS_MASK))
    }
}
