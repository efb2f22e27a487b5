//! Physical address ranges and the RAM map every handover address is checked
//! against (`shared/DESIGN.md` §3).

use alloc::vec::Vec;
use core::fmt;

/// The page granule the handover tracks preserved memory in.
pub const PAGE_SIZE: u64 = 4096;

/// DMA-limited devices can only address memory below this boundary.
pub const FOUR_GIB: u64 = 1 << 32;

/// Most RAM ranges a [`RamMap`] holds; firmware maps are far smaller.
pub const MAX_RAM_RANGES: usize = 128;

/// An error building a [`PhysRange`] or a [`RamMap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryError {
    /// A range of zero bytes.
    EmptyRange {
        /// Its base address.
        base: u64,
    },
    /// `base + size` does not fit in 64 bits.
    AddressOverflow {
        /// Base address.
        base: u64,
        /// Size in bytes.
        size: u64,
    },
    /// A base or size is not a multiple of the required alignment.
    Unaligned {
        /// Base address.
        base: u64,
        /// Size in bytes.
        size: u64,
        /// Required alignment in bytes.
        alignment: u64,
    },
    /// More RAM ranges than [`MAX_RAM_RANGES`].
    TooManyRamRanges {
        /// How many were given.
        count: usize,
    },
    /// Two RAM ranges overlap.
    OverlappingRam {
        /// The lower range.
        first: PhysRange,
        /// The range overlapping it.
        second: PhysRange,
    },
    /// No whole page of RAM is left after trimming to page boundaries.
    NoRam,
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EmptyRange { base } => write!(f, "empty range at {base:#x}"),
            Self::AddressOverflow { base, size } => {
                write!(f, "range {base:#x}+{size:#x} overflows 64 bits")
            }
            Self::Unaligned { base, size, alignment } => {
                write!(f, "range {base:#x}+{size:#x} is not aligned to {alignment:#x}")
            }
            Self::TooManyRamRanges { count } => {
                write!(f, "{count} RAM ranges, at most {MAX_RAM_RANGES}")
            }
            Self::OverlappingRam { first, second } => {
                write!(f, "RAM ranges {first} and {second} overlap")
            }
            Self::NoRam => f.write_str("no whole page of RAM"),
        }
    }
}

impl core::error::Error for MemoryError {}

/// A non-empty range of physical addresses `[base, base + size)` whose end
/// fits in 64 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PhysRange {
    base: u64,
    size: u64,
}

impl PhysRange {
    /// The range `[base, base + size)`.
    pub const fn new(base: u64, size: u64) -> Result<Self, MemoryError> {
        if size == 0 {
            return Err(MemoryError::EmptyRange { base });
        }
        if base.checked_add(size).is_none() {
            return Err(MemoryError::AddressOverflow { base, size });
        }
        Ok(Self { base, size })
    }

    /// The range `[base, base + size)`, whose base and size must both be
    /// multiples of [`PAGE_SIZE`].
    pub const fn pages(base: u64, size: u64) -> Result<Self, MemoryError> {
        match Self::new(base, size) {
            Ok(range) if range.is_aligned(PAGE_SIZE) => Ok(range),
            Ok(_) => Err(MemoryError::Unaligned { base, size, alignment: PAGE_SIZE }),
            Err(error) => Err(error),
        }
    }

    /// First address of the range.
    pub const fn base(self) -> u64 {
        self.base
    }

    /// Length in bytes (never zero).
    pub const fn size(self) -> u64 {
        self.size
    }

    /// First address past the range (never overflows).
    pub const fn end(self) -> u64 {
        self.base + self.size
    }

    /// Whether base and size are multiples of `alignment` (a power of two).
    pub const fn is_aligned(self, alignment: u64) -> bool {
        self.base.is_multiple_of(alignment) && self.size.is_multiple_of(alignment)
    }

    /// Whether the two ranges share at least one byte.
    pub const fn overlaps(self, other: Self) -> bool {
        self.base < other.end() && other.base < self.end()
    }

    /// Whether `other` lies entirely inside this range.
    pub const fn contains(self, other: Self) -> bool {
        other.base >= self.base && other.end() <= self.end()
    }
}

impl fmt::Display for PhysRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.base, self.end())
    }
}

/// Rounds `value` up to a multiple of `alignment` (a power of two); `None` on
/// overflow.
pub(crate) const fn align_up(value: u64, alignment: u64) -> Option<u64> {
    match value.checked_add(alignment - 1) {
        Some(bumped) => Some(bumped & !(alignment - 1)),
        None => None,
    }
}

/// Rounds `value` down to a multiple of `alignment` (a power of two).
pub(crate) const fn align_down(value: u64, alignment: u64) -> u64 {
    value & !(alignment - 1)
}

/// The usable RAM of the machine: sorted, disjoint, page-aligned ranges, with
/// touching ranges merged so that a range spanning them counts as inside RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamMap {
    ranges: Vec<PhysRange>,
}

impl RamMap {
    /// Builds the map from firmware-reported RAM ranges in any order.
    ///
    /// Each range is trimmed inwards to whole pages (firmware maps are not
    /// always page-aligned); ranges with no whole page left are dropped.
    pub fn new(ranges: &[PhysRange]) -> Result<Self, MemoryError> {
        if ranges.len() > MAX_RAM_RANGES {
            return Err(MemoryError::TooManyRamRanges { count: ranges.len() });
        }
        let mut sorted = ranges.to_vec();
        sorted.sort_unstable();
        for pair in sorted.windows(2) {
            if pair[0].overlaps(pair[1]) {
                return Err(MemoryError::OverlappingRam { first: pair[0], second: pair[1] });
            }
        }
        let mut merged: Vec<PhysRange> = Vec::with_capacity(sorted.len());
        for range in sorted {
            // A base that cannot be rounded up lies in the last partial page
            // of the address space, which holds no whole page.
            let Some(base) = align_up(range.base(), PAGE_SIZE) else {
                continue;
            };
            let end = align_down(range.end(), PAGE_SIZE);
            if end <= base {
                continue;
            }
            let trimmed = PhysRange { base, size: end - base };
            match merged.last_mut() {
                Some(last) if last.end() == trimmed.base() => {
                    last.size += trimmed.size();
                }
                _ => merged.push(trimmed),
            }
        }
        if merged.is_empty() {
            return Err(MemoryError::NoRam);
        }
        Ok(Self { ranges: merged })
    }

    /// The RAM ranges, sorted by address.
    pub fn ranges(&self) -> &[PhysRange] {
        &self.ranges
    }

    /// Whether `range` lies entirely inside RAM.
    pub fn contains(&self, range: PhysRange) -> bool {
        self.ranges.iter().any(|ram| ram.contains(range))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(base: u64, size: u64) -> PhysRange {
        PhysRange::new(base, size).unwrap()
    }

    #[test]
    fn ranges_reject_empty_and_overflowing() {
        assert_eq!(PhysRange::new(0x1000, 0), Err(MemoryError::EmptyRange { base: 0x1000 }));
        assert_eq!(PhysRange::new(u64::MAX, 1), Err(MemoryError::AddressOverflow { base: u64::MAX, size: 1 }));
        assert!(matches!(PhysRange::pages(0x1001, 0x1000), Err(MemoryError::Unaligned { .. })));
    }

    #[test]
    fn overlap_and_containment() {
        let a = range(0x1000, 0x2000);
        assert!(a.overlaps(range(0x2fff, 1)));
        assert!(!a.overlaps(range(0x3000, 1)));
        assert!(!a.overlaps(range(0, 0x1000)));
        assert!(a.contains(range(0x1000, 0x2000)));
        assert!(!a.contains(range(0x1000, 0x2001)));
    }

    #[test]
    fn ram_map_sorts_trims_and_merges() {
        let ram =
            RamMap::new(&[range(0x10_0000, 0x10_0000), range(0x800, 0x9_f000), range(0x20_0000, 0x20_0000)]).unwrap();
        assert_eq!(ram.ranges(), &[range(0x1000, 0x9_e000), range(0x10_0000, 0x30_0000)]);
        assert!(ram.contains(range(0x1f_f000, 0x2000)));
        assert!(!ram.contains(range(0xa_0000, 0x1000)));
    }

    #[test]
    fn ram_map_rejects_overlap_and_emptiness() {
        assert!(matches!(
            RamMap::new(&[range(0, 0x2000), range(0x1000, 0x2000)]),
            Err(MemoryError::OverlappingRam { .. })
        ));
        assert_eq!(RamMap::new(&[range(0x10, 0x100)]), Err(MemoryError::NoRam));
    }
}
