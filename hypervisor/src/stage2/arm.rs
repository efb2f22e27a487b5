//! Arm VMSAv8-64 stage-2 descriptors with the 4 KiB granule and 48-bit
//! input and output addresses (Arm ARM DDI 0487, D8.3 "Translation table
//! descriptor formats"; stage-2 attribute fields in D8.3 and the stage-2
//! memory type and permission sections of D8). SMMUv3 reads the same format
//! for stage 2 (SMMUv3 spec §5.2, STE.S2TTB), so one tree serves both.

use super::{
    Attrs, BlockSize, Descriptor, DescriptorError, MemType, Perms, Stage2Format, INVALID_DESCRIPTOR, LEAF_LEVEL,
    OUTPUT_ADDRESS_MASK,
};

/// The Arm stage-2 format. The walk starts at level 0 with a 48-bit IPA,
/// which the arch code selects with [`ArmStage2::VTCR_GEOMETRY`]; it needs
/// a PE whose PARange is at least 48 bits (QEMU `-cpu max` has 52).
#[derive(Clone, Copy, Debug, Default)]
pub struct ArmStage2;

/// Descriptor bits [1:0] (D8.3): bit 0 is the valid bit.
const DESC_VALID: u64 = 1 << 0;
const DESC_TYPE_MASK: u64 = 0b11;
/// A block descriptor, at level 1 (1 GiB) or level 2 (2 MiB). At level 0
/// (4 KiB granule, no FEAT_LPA2) and level 3 the encoding is reserved.
const DESC_BLOCK: u64 = 0b01;
/// A table descriptor at levels 0..=2; a page descriptor at level 3.
const DESC_TABLE_OR_PAGE: u64 = 0b11;

/// Stage-2 MemAttr, bits [5:2], as read with FEAT_S2FWB disabled:
/// MemAttr[3:2] the outer and MemAttr[1:0] the inner cacheability.
const MEMATTR_SHIFT: u32 = 2;
const MEMATTR_MASK: u64 = 0b1111 << MEMATTR_SHIFT;
/// Normal memory, outer and inner write-back cacheable.
const MEMATTR_NORMAL_WB: u64 = 0b1111 << MEMATTR_SHIFT;
/// Device-nGnRE.
const MEMATTR_DEVICE_NGNRE: u64 = 0b0001 << MEMATTR_SHIFT;
/// S2AP, bits [7:6]: bit 6 grants reads, bit 7 writes.
const S2AP_READ: u64 = 1 << 6;
const S2AP_WRITE: u64 = 1 << 7;
/// SH, bits [9:8]; 0b11 is inner shareable. Device memory is always
/// treated as outer shareable, so device leaves leave the field 0.
const SH_MASK: u64 = 0b11 << 8;
const SH_INNER: u64 = 0b11 << 8;
/// AF, bit 10: the access flag, set so the first access does not fault.
const AF: u64 = 1 << 10;
/// XN, bits [54:53] (XN[1:0] with FEAT_XNX; bit 54 alone without it).
const XN_MASK: u64 = 0b11 << 53;
/// XN[1:0] = 0b10: execute-never at EL1 and EL0, with or without FEAT_XNX.
const XN_EL1_EL0: u64 = 0b10 << 53;
/// Every attribute field a leaf written by this engine may use.
const LEAF_FIELDS: u64 = DESC_TYPE_MASK | MEMATTR_MASK | S2AP_READ | S2AP_WRITE | SH_MASK | AF | XN_MASK;

/// VTCR_EL2 fields (Arm ARM D23, VTCR_EL2).
const VTCR_T0SZ_48_BIT_IPA: u64 = 64 - 48;
const VTCR_SL0_SHIFT: u32 = 6;
/// SL0 = 0b10 with the 4 KiB granule: the walk starts at level 0.
const VTCR_SL0_LEVEL0: u64 = 0b10 << VTCR_SL0_SHIFT;
/// IRGN0/ORGN0 = 0b01: walks are normal write-back read/write-allocate.
const VTCR_IRGN0_WBWA: u64 = 0b01 << 8;
const VTCR_ORGN0_WBWA: u64 = 0b01 << 10;
/// SH0 = 0b11: walks are inner shareable.
const VTCR_SH0_INNER: u64 = 0b11 << 12;
/// TG0 = 0b00: 4 KiB granule.
const VTCR_TG0_4K: u64 = 0b00 << 14;

/// VTTBR_EL2.VMID, bits [63:48] (16-bit VMIDs with VTCR_EL2.VS = 1; bits
/// [55:48] otherwise).
const VTTBR_VMID_SHIFT: u32 = 48;

impl ArmStage2 {
    /// The VTCR_EL2 fields this tree's geometry fixes: 48-bit IPA (T0SZ),
    /// start at level 0 (SL0), 4 KiB granule (TG0), cacheable inner
    /// shareable walks. The arch code adds PS (from ID_AA64MMFR0_EL1
    /// PARange), VS and the RES1 bits.
    pub const VTCR_GEOMETRY: u64 =
        VTCR_T0SZ_48_BIT_IPA | VTCR_SL0_LEVEL0 | VTCR_IRGN0_WBWA | VTCR_ORGN0_WBWA | VTCR_SH0_INNER | VTCR_TG0_4K;

    /// VTTBR_EL2 for the tree at `root` and guest `vmid`.
    pub const fn vttbr(root: u64, vmid: u16) -> u64 {
        (root & OUTPUT_ADDRESS_MASK) | ((vmid as u64) << VTTBR_VMID_SHIFT)
    }

    fn decode_leaf(entry: u64, size: BlockSize) -> Result<Descriptor, DescriptorError> {
        let address = OUTPUT_ADDRESS_MASK & !(size.bytes() - 1);
        if entry & !(address | LEAF_FIELDS) != 0 {
            return Err(DescriptorError::ReservedBits);
        }
        let mem = match entry & MEMATTR_MASK {
            MEMATTR_NORMAL_WB => MemType::Normal,
            MEMATTR_DEVICE_NGNRE => MemType::Device,
            _ => return Err(DescriptorError::UnsupportedAttributes),
        };
        if entry & S2AP_READ == 0 {
            return Err(DescriptorError::UnsupportedAttributes);
        }
        let exec = match entry & XN_MASK {
            0 => true,
            XN_EL1_EL0 => false,
            _ => return Err(DescriptorError::UnsupportedAttributes),
        };
        let attrs = Attrs { perms: Perms::new(entry & S2AP_WRITE != 0, exec), mem };
        let pa = entry & address;
        // What is left to differ is SH and AF: accept only what we write.
        if Self::leaf_descriptor(pa, size, attrs) != entry {
            return Err(DescriptorError::UnsupportedAttributes);
        }
        Ok(Descriptor::Leaf { pa, attrs })
    }
}

impl Stage2Format for ArmStage2 {
    const NAME: &'static str = "arm-stage2";

    fn table_descriptor(next: u64) -> u64 {
        // Stage-2 table descriptors carry no attributes (D8.3).
        (next & OUTPUT_ADDRESS_MASK) | DESC_TABLE_OR_PAGE
    }

    fn leaf_descriptor(pa: u64, size: BlockSize, attrs: Attrs) -> u64 {
        let kind = if size == BlockSize::Size4K { DESC_TABLE_OR_PAGE } else { DESC_BLOCK };
        let mem = match attrs.mem {
            MemType::Normal => MEMATTR_NORMAL_WB | SH_INNER,
            MemType::Device => MEMATTR_DEVICE_NGNRE,
        };
        let write = if attrs.perms.writable() { S2AP_WRITE } else { 0 };
        let xn = if attrs.perms.executable() { 0 } else { XN_EL1_EL0 };
        (pa & OUTPUT_ADDRESS_MASK & !(size.bytes() - 1)) | kind | mem | S2AP_READ | write | AF | xn
    }

    fn decode(entry: u64, level: u8) -> Result<Descriptor, DescriptorError> {
        if entry == INVALID_DESCRIPTOR {
            return Ok(Descriptor::Invalid);
        }
        if entry & DESC_VALID == 0 {
            // The hardware ignores the other bits of an invalid descriptor,
            // but this engine never sets them: garbage, not a mapping.
            return Err(DescriptorError::ReservedBits);
        }
        if entry & DESC_TYPE_MASK == DESC_BLOCK {
            return match BlockSize::at_level(level) {
                Some(size) if size != BlockSize::Size4K => Self::decode_leaf(entry, size),
                _ => Err(DescriptorError::ForbiddenLeaf),
            };
        }
        if level == LEAF_LEVEL {
            return Self::decode_leaf(entry, BlockSize::Size4K);
        }
        if entry & !(OUTPUT_ADDRESS_MASK | DESC_TYPE_MASK) != 0 {
            return Err(DescriptorError::ReservedBits);
        }
        Ok(Descriptor::Table(entry & OUTPUT_ADDRESS_MASK))
    }
}
