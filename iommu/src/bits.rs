//! Bit fields of registers, descriptors, commands and event records.

/// Bits `[shift + width - 1 : shift]` of a 64-bit word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Field {
    shift: u32,
    width: u32,
}

impl Field {
    pub(crate) const fn new(shift: u32, width: u32) -> Field {
        assert!(width > 0 && shift + width <= u64::BITS);
        Field { shift, width }
    }

    /// The largest value the field holds.
    pub(crate) const fn max(self) -> u64 {
        u64::MAX >> (u64::BITS - self.width)
    }

    /// The field's bits in place.
    pub(crate) const fn mask(self) -> u64 {
        self.max() << self.shift
    }

    /// The field's value in `word`.
    pub(crate) const fn get(self, word: u64) -> u64 {
        (word & self.mask()) >> self.shift
    }

    /// `value` moved into the field. Callers pass values that fit (checked
    /// constants, or values range-checked at the API boundary); the mask
    /// keeps a stray bit from ever reaching a neighbouring field.
    pub(crate) const fn place(self, value: u64) -> u64 {
        (value << self.shift) & self.mask()
    }
}

/// Bits `[51:low]`: the physical-address field of a descriptor or base
/// register whose address is `1 << low` aligned (SMMUv3 addresses are at
/// most 52 bits, §3.4).
pub(crate) const fn address_field(low: u32) -> u64 {
    ((1 << PHYS_ADDRESS_BITS) - 1) & !((1 << low) - 1)
}

/// Widest physical address any SMMUv3 structure can hold (§3.4).
pub(crate) const PHYS_ADDRESS_BITS: u32 = 52;
