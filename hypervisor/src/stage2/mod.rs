//! The second-stage page-table engine (`shared/DESIGN.md` §2).
//!
//! One engine builds, edits, walks and adopts the tables that confine a
//! guest: guest-physical (IPA) to host-physical. The descriptor layout is a
//! [`Stage2Format`], and two exist:
//!
//! - [`ArmStage2`]: VMSAv8-64 stage-2 descriptors (Arm ARM D8.3), 4 KiB
//!   granule, 48-bit IPA starting at level 0. SMMUv3 stage-2 uses the same
//!   format, so one table can serve the CPU and the guest's devices.
//! - [`Ept`]: Intel EPT (SDM Vol. 3C §29.3), 4-level. The VT-d second-level
//!   format has the same shape.
//! - [`Npt`]: AMD nested paging (APM Vol. 2 §15.25), the host's own 4-level
//!   long-mode format with U/S set at every level.
//!
//! The formats share the geometry: 512 entries of 8 bytes per 4 KiB table,
//! levels numbered 0 (root: Arm level 0, EPT PML4) to 3 (Arm level 3, EPT
//! page table), leaves allowed at level 1 (1 GiB), 2 (2 MiB) and 3 (4 KiB).
//!
//! Table pages come from a caller's [`FrameSource`] and are reached through a
//! caller's [`PhysToVirt`], so the same code runs in the hypervisor on real
//! pages and in host tests on an arena. Tables are preserved across live
//! updates (`shared/DESIGN.md` §3), so a [`Stage2Table`] has no `Drop`: the
//! next image rebuilds its handle with [`Stage2Table::adopt`], which walks and
//! validates the tree in place without copying it.
//!
//! The engine writes descriptors with single 64-bit volatile stores and
//! orders a new table's contents before the descriptor that links it. TLB
//! and walk-cache maintenance (TLBI by VMID, INVEPT) and the barriers around
//! it stay with the arch code that owns the VMID or EPTP.

mod adopt;
mod arm;
mod ept;
mod memory;
mod npt;
mod table;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

use core::fmt;

pub use adopt::AdoptError;
pub use arm::ArmStage2;
pub use ept::Ept;
pub use memory::{FrameSource, LinearMap, PhysToVirt};
pub use npt::Npt;
pub use table::{MapError, Mapping, Stage2Table, Translation};

/// Size of a translation granule and of every table page.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Descriptors per table page (4096 / 8).
pub const ENTRIES_PER_TABLE: usize = 1 << BITS_PER_LEVEL;
/// Width of guest-physical and host-physical addresses the engine handles.
pub const ADDRESS_BITS: u32 = 48;
/// First address the engine cannot map, on either side of a translation.
pub const ADDRESS_LIMIT: u64 = 1 << ADDRESS_BITS;
/// Level of the root table (Arm level 0, EPT PML4).
pub const ROOT_LEVEL: u8 = 0;
/// Level of the last table (Arm level 3, EPT page table): only leaves there.
pub const LEAF_LEVEL: u8 = 3;

const PAGE_SHIFT: u32 = 12;
const BITS_PER_LEVEL: u32 = 9;
/// The output-address field of table and 4 KiB descriptors, bits [47:12],
/// in both formats (Arm ARM D8.3.1, SDM Table 29-1).
const OUTPUT_ADDRESS_MASK: u64 = (ADDRESS_LIMIT - 1) & !(PAGE_SIZE - 1);
/// Both formats read an all-zero descriptor as invalid (Arm: bit 0 clear;
/// EPT: bits 2:0 clear), and the engine writes nothing else for "unmapped".
const INVALID_DESCRIPTOR: u64 = 0;

/// Bit position of the lowest address bit that indexes tables at `level`.
const fn level_shift(level: u8) -> u32 {
    PAGE_SHIFT + BITS_PER_LEVEL * (LEAF_LEVEL - level) as u32
}

/// Bytes of address space one descriptor at `level` covers.
const fn entry_span(level: u8) -> u64 {
    1 << level_shift(level)
}

/// Index of the descriptor covering `addr` in a table at `level`.
const fn entry_index(addr: u64, level: u8) -> usize {
    ((addr >> level_shift(level)) as usize) & (ENTRIES_PER_TABLE - 1)
}

/// The size one leaf descriptor maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BlockSize {
    /// A 4 KiB page at level 3.
    Size4K,
    /// A 2 MiB block at level 2 (Arm block, EPT large PDE).
    Size2M,
    /// A 1 GiB block at level 1 (Arm block, EPT large PDPTE).
    Size1G,
}

impl BlockSize {
    /// Every size, smallest first.
    pub const ALL: [BlockSize; 3] = [BlockSize::Size4K, BlockSize::Size2M, BlockSize::Size1G];

    /// Bytes mapped by one leaf of this size.
    pub const fn bytes(self) -> u64 {
        entry_span(self.level())
    }

    /// The table level whose leaves have this size.
    pub const fn level(self) -> u8 {
        match self {
            BlockSize::Size4K => LEAF_LEVEL,
            BlockSize::Size2M => LEAF_LEVEL - 1,
            BlockSize::Size1G => LEAF_LEVEL - 2,
        }
    }

    /// The leaf size at `level`, or `None` where no leaf may sit (level 0).
    pub const fn at_level(level: u8) -> Option<BlockSize> {
        match level {
            3 => Some(BlockSize::Size4K),
            2 => Some(BlockSize::Size2M),
            1 => Some(BlockSize::Size1G),
            _ => None,
        }
    }

    /// The next smaller size, which a split of this size produces.
    pub const fn smaller(self) -> Option<BlockSize> {
        match self {
            BlockSize::Size4K => None,
            BlockSize::Size2M => Some(BlockSize::Size4K),
            BlockSize::Size1G => Some(BlockSize::Size2M),
        }
    }

    /// Index of this size in [`BlockSize::ALL`].
    const fn index(self) -> usize {
        match self {
            BlockSize::Size4K => 0,
            BlockSize::Size2M => 1,
            BlockSize::Size1G => 2,
        }
    }
}

impl fmt::Display for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockSize::Size4K => "4KiB",
            BlockSize::Size2M => "2MiB",
            BlockSize::Size1G => "1GiB",
        })
    }
}

/// Guest access rights of a mapping. Every mapping is readable: EPT cannot
/// express write-only (SDM §29.3.3.1, an EPT misconfiguration) nor, without
/// an optional capability, execute-only, and no guest needs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Perms {
    ReadOnly,
    ReadWrite,
    ReadExec,
    ReadWriteExec,
}

impl Perms {
    /// The rights with the given write and execute permission.
    pub const fn new(write: bool, exec: bool) -> Perms {
        match (write, exec) {
            (false, false) => Perms::ReadOnly,
            (true, false) => Perms::ReadWrite,
            (false, true) => Perms::ReadExec,
            (true, true) => Perms::ReadWriteExec,
        }
    }

    /// Whether the guest may write.
    pub const fn writable(self) -> bool {
        matches!(self, Perms::ReadWrite | Perms::ReadWriteExec)
    }

    /// Whether the guest may execute.
    pub const fn executable(self) -> bool {
        matches!(self, Perms::ReadExec | Perms::ReadWriteExec)
    }
}

/// The memory type the hypervisor imposes on a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemType {
    /// Guest RAM: normal write-back cacheable, inner shareable on Arm.
    Normal,
    /// Device registers: Arm Device-nGnRE, EPT uncacheable.
    Device,
}

/// Everything a leaf says besides its output address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Attrs {
    pub perms: Perms,
    pub mem: MemType,
}

impl Attrs {
    /// Guest RAM with the given rights.
    pub const fn ram(perms: Perms) -> Attrs {
        Attrs { perms, mem: MemType::Normal }
    }

    /// A device region passed through to the guest: read/write, never
    /// executable.
    pub const fn device() -> Attrs {
        Attrs { perms: Perms::ReadWrite, mem: MemType::Device }
    }
}

/// One descriptor, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Descriptor {
    /// Nothing mapped in this entry's span.
    Invalid,
    /// Points at the next-level table page at this physical address.
    Table(u64),
    /// Maps this entry's whole span to `pa` (aligned to the span).
    Leaf { pa: u64, attrs: Attrs },
}

/// Why a raw descriptor was rejected. The engine accepts exactly the
/// encodings it writes, plus bits the hardware sets on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescriptorError {
    /// A bit that is reserved, or that this engine never sets, is set.
    ReservedBits,
    /// A leaf where the format allows none at this level (a block at level
    /// 0, an Arm level-3 "block", an EPT PML4E with bit 7).
    ForbiddenLeaf,
    /// A well-formed descriptor with attributes this engine does not use
    /// (another memory type, no access flag, partial execute rights, ...).
    UnsupportedAttributes,
    /// A table descriptor at the last level, where only leaves may sit.
    TableAtLastLevel,
}

impl fmt::Display for DescriptorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DescriptorError::ReservedBits => "reserved bits set",
            DescriptorError::ForbiddenLeaf => "leaf not allowed at this level",
            DescriptorError::UnsupportedAttributes => "unsupported attributes",
            DescriptorError::TableAtLastLevel => "table descriptor at the last level",
        })
    }
}

/// A second-stage descriptor format: how a table pointer and a leaf are
/// encoded, and how a raw entry decodes. Levels follow the shared numbering
/// of this module (0 = root, 3 = 4 KiB pages).
pub trait Stage2Format {
    /// Name for logs and errors ("arm-stage2", "ept").
    const NAME: &'static str;

    /// Descriptor pointing at the table page at `next` (4 KiB aligned,
    /// below [`ADDRESS_LIMIT`]), for a table at level 0..=2.
    fn table_descriptor(next: u64) -> u64;

    /// Leaf mapping `size.bytes()` at `pa` (aligned to `size`, below
    /// [`ADDRESS_LIMIT`]) with `attrs`, for a table at `size.level()`.
    fn leaf_descriptor(pa: u64, size: BlockSize, attrs: Attrs) -> u64;

    /// Decodes a raw entry of a table at `level`. Should return neither
    /// [`Descriptor::Table`] at [`LEAF_LEVEL`] nor a leaf at level 0; the
    /// engine rejects both anyway.
    fn decode(entry: u64, level: u8) -> Result<Descriptor, DescriptorError>;
}

/// A decoded descriptor with the engine's level checks applied.
#[derive(Clone, Copy)]
enum Entry {
    Invalid,
    /// A table page at `next`, holding the entries of level `level`.
    Table {
        next: u64,
        level: u8,
    },
    Leaf {
        pa: u64,
        size: BlockSize,
        attrs: Attrs,
    },
}

/// The level below `level`, if there is one.
const fn child_level(level: u8) -> Option<u8> {
    if level < LEAF_LEVEL {
        Some(level + 1)
    } else {
        None
    }
}

/// Decodes `raw` from a table at `level`, bounding the depth of the tree
/// whatever the format returns.
fn decode_entry<F: Stage2Format>(raw: u64, level: u8) -> Result<Entry, DescriptorError> {
    match F::decode(raw, level)? {
        Descriptor::Invalid => Ok(Entry::Invalid),
        Descriptor::Table(next) => match child_level(level) {
            Some(level) => Ok(Entry::Table { next, level }),
            None => Err(DescriptorError::TableAtLastLevel),
        },
        Descriptor::Leaf { pa, attrs } => match BlockSize::at_level(level) {
            Some(size) => Ok(Entry::Leaf { pa, size, attrs }),
            None => Err(DescriptorError::ForbiddenLeaf),
        },
    }
}
