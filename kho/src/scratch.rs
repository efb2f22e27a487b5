//! Scratch regions (`shared/DESIGN.md` §3): memory reserved at first boot that
//! the incoming image runs in until it has read the preserved map.
//!
//! Scratch is planned once, at first boot, from the image's needs times a
//! headroom factor, and then reused unchanged by every later update: the
//! handover carries the regions, and [`ScratchPlan::reuse`] adopts them. The
//! second region, below 4 GiB, exists for devices that can only DMA there
//! (the KHO/swiotlb problem: scratch taken from high memory starves them).
//! Nothing preserved may ever overlap scratch; [`ScratchPlan::check_preserved`]
//! is the check every preserved allocation goes through.

use alloc::vec::Vec;
use core::fmt;

use crate::memory::{align_down, align_up, PhysRange, RamMap, FOUR_GIB, PAGE_SIZE};

/// Most scratch regions a plan holds: one of each [`ScratchKind`].
pub const MAX_SCRATCH_REGIONS: usize = 2;

/// What a scratch region is for. The handover encodes it as [`Self::code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ScratchKind {
    /// The incoming image's text, data, stacks and heap.
    Global,
    /// Memory below 4 GiB for devices that can only address that much.
    Dma32,
}

impl ScratchKind {
    /// The value of the `kind` cell in the handover's `scratch` property.
    pub const fn code(self) -> u64 {
        match self {
            Self::Global => 1,
            Self::Dma32 => 2,
        }
    }

    /// The kind a `kind` cell names, if any.
    pub const fn from_code(code: u64) -> Option<Self> {
        match code {
            1 => Some(Self::Global),
            2 => Some(Self::Dma32),
            _ => None,
        }
    }
}

/// One scratch region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScratchRegion {
    /// Where it is.
    pub range: PhysRange,
    /// What it is for.
    pub kind: ScratchKind,
}

impl fmt::Display for ScratchRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} scratch {}", self.kind, self.range)
    }
}

/// What the image needs from scratch, before headroom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScratchNeeds {
    /// Loaded image size (text, data, bss, stacks).
    pub image_bytes: u64,
    /// Heap the image allocates before it has adopted preserved memory.
    pub heap_bytes: u64,
    /// Memory below 4 GiB that DMA-limited devices need (0: no such region).
    pub dma32_bytes: u64,
}

/// How needs turn into region sizes at first boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScratchPolicy {
    /// Headroom factor in percent applied to every need (200 = twice the
    /// need), so later, larger images still fit in the same regions.
    pub factor_percent: u32,
    /// Lower bound for the global region.
    pub min_global_bytes: u64,
    /// Alignment of region bases and sizes: a power of two, at least
    /// [`PAGE_SIZE`]. 2 MiB lets both architectures map scratch with blocks.
    pub alignment: u64,
}

impl Default for ScratchPolicy {
    fn default() -> Self {
        Self { factor_percent: 200, min_global_bytes: 16 << 20, alignment: 2 << 20 }
    }
}

impl ScratchPolicy {
    fn validate(&self) -> Result<(), ScratchError> {
        if self.factor_percent < 100 || !self.alignment.is_power_of_two() || self.alignment < PAGE_SIZE {
            return Err(ScratchError::InvalidPolicy);
        }
        Ok(())
    }

    /// `bytes` times the factor, rounded up to the alignment.
    fn scaled(&self, bytes: u64) -> Result<u64, ScratchError> {
        let scaled = (u128::from(bytes) * u128::from(self.factor_percent)).div_ceil(100);
        u64::try_from(scaled).ok().and_then(|scaled| align_up(scaled, self.alignment)).ok_or(ScratchError::SizeOverflow)
    }
}

/// An error planning, adopting or checking against scratch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScratchError {
    /// The policy's factor is below 100 % or its alignment is not a power of
    /// two of at least a page.
    InvalidPolicy,
    /// A size computation overflowed 64 bits.
    SizeOverflow,
    /// No free RAM can hold a region of this kind and size.
    NoFit {
        /// The region that did not fit.
        kind: ScratchKind,
        /// Its size in bytes.
        size: u64,
    },
    /// More regions than [`MAX_SCRATCH_REGIONS`].
    TooManyRegions {
        /// How many were given.
        count: usize,
    },
    /// Two regions of the same kind.
    DuplicateKind(ScratchKind),
    /// A required region is absent.
    MissingRegion(ScratchKind),
    /// A region's base or size is not page-aligned.
    Unaligned(ScratchRegion),
    /// A region is not entirely inside RAM.
    OutsideRam(ScratchRegion),
    /// The DMA32 region ends above 4 GiB.
    Dma32AboveFourGib(ScratchRegion),
    /// Two regions overlap.
    Overlap {
        /// One region.
        first: ScratchRegion,
        /// The region overlapping it.
        second: ScratchRegion,
    },
    /// A reused region is smaller than the image now needs.
    TooSmall {
        /// The region's kind.
        kind: ScratchKind,
        /// Its size.
        have: u64,
        /// What the image needs.
        need: u64,
    },
    /// A preserved allocation overlaps scratch.
    PreservedOverlapsScratch {
        /// The preserved range that was refused.
        preserved: PhysRange,
        /// The scratch region it overlaps.
        scratch: ScratchRegion,
    },
}

impl fmt::Display for ScratchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidPolicy => f.write_str("invalid scratch policy"),
            Self::SizeOverflow => f.write_str("scratch size overflows 64 bits"),
            Self::NoFit { kind, size } => {
                write!(f, "no free RAM for {size:#x} bytes of {kind:?} scratch")
            }
            Self::TooManyRegions { count } => {
                write!(f, "{count} scratch regions, at most {MAX_SCRATCH_REGIONS}")
            }
            Self::DuplicateKind(kind) => write!(f, "two {kind:?} scratch regions"),
            Self::MissingRegion(kind) => write!(f, "no {kind:?} scratch region"),
            Self::Unaligned(region) => write!(f, "{region} is not page-aligned"),
            Self::OutsideRam(region) => write!(f, "{region} is not inside RAM"),
            Self::Dma32AboveFourGib(region) => write!(f, "{region} ends above 4 GiB"),
            Self::Overlap { first, second } => write!(f, "{first} overlaps {second}"),
            Self::TooSmall { kind, have, need } => {
                write!(f, "{kind:?} scratch holds {have:#x} bytes, the image needs {need:#x}")
            }
            Self::PreservedOverlapsScratch { preserved, scratch } => {
                write!(f, "preserved range {preserved} overlaps {scratch}")
            }
        }
    }
}

impl core::error::Error for ScratchError {}

/// The scratch regions of this machine: validated, at most one per kind,
/// always with a global region, ordered by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScratchPlan {
    regions: Vec<ScratchRegion>,
}

impl ScratchPlan {
    /// Plans scratch at first boot.
    ///
    /// Each region is `need × factor`, rounded up to the alignment (the global
    /// one at least `min_global_bytes`), placed at the highest aligned address
    /// of RAM that avoids `occupied` (the running image, firmware tables,
    /// anything already preserved). The DMA32 region is placed first, below
    /// 4 GiB, and only when `needs.dma32_bytes` is non-zero.
    pub fn plan(
        ram: &RamMap,
        needs: &ScratchNeeds,
        policy: &ScratchPolicy,
        occupied: &[PhysRange],
    ) -> Result<Self, ScratchError> {
        policy.validate()?;
        let global_need = needs.image_bytes.checked_add(needs.heap_bytes).ok_or(ScratchError::SizeOverflow)?;
        let global_size = policy
            .scaled(global_need)?
            .max(align_up(policy.min_global_bytes, policy.alignment).ok_or(ScratchError::SizeOverflow)?);

        let mut taken = occupied.to_vec();
        let mut regions = Vec::with_capacity(MAX_SCRATCH_REGIONS);
        // The scarcer low memory first; the global region then lands above
        // 4 GiB whenever RAM there allows.
        if needs.dma32_bytes > 0 {
            let size = policy.scaled(needs.dma32_bytes)?;
            let range = highest_fit(ram, &taken, size, policy.alignment, FOUR_GIB)
                .ok_or(ScratchError::NoFit { kind: ScratchKind::Dma32, size })?;
            taken.push(range);
            regions.push(ScratchRegion { range, kind: ScratchKind::Dma32 });
        }
        let global = highest_fit(ram, &taken, global_size, policy.alignment, u64::MAX)
            .ok_or(ScratchError::NoFit { kind: ScratchKind::Global, size: global_size })?;
        regions.insert(0, ScratchRegion { range: global, kind: ScratchKind::Global });
        Self::adopt(&regions, ram)
    }

    /// Validates regions read from a handover (or planned): each page-aligned
    /// and inside RAM, the DMA32 one below 4 GiB, no two of a kind, a global
    /// one present, none overlapping.
    pub fn adopt(regions: &[ScratchRegion], ram: &RamMap) -> Result<Self, ScratchError> {
        if regions.len() > MAX_SCRATCH_REGIONS {
            return Err(ScratchError::TooManyRegions { count: regions.len() });
        }
        for (index, region) in regions.iter().enumerate() {
            if !region.range.is_aligned(PAGE_SIZE) {
                return Err(ScratchError::Unaligned(*region));
            }
            if !ram.contains(region.range) {
                return Err(ScratchError::OutsideRam(*region));
            }
            if region.kind == ScratchKind::Dma32 && region.range.end() > FOUR_GIB {
                return Err(ScratchError::Dma32AboveFourGib(*region));
            }
            for earlier in &regions[..index] {
                if earlier.kind == region.kind {
                    return Err(ScratchError::DuplicateKind(region.kind));
                }
                if earlier.range.overlaps(region.range) {
                    return Err(ScratchError::Overlap { first: *earlier, second: *region });
                }
            }
        }
        if !regions.iter().any(|r| r.kind == ScratchKind::Global) {
            return Err(ScratchError::MissingRegion(ScratchKind::Global));
        }
        let mut regions = regions.to_vec();
        regions.sort_unstable_by_key(|region| region.kind);
        Ok(Self { regions })
    }

    /// Reuses the regions of a previous handover for a later image: the same
    /// regions, validated, provided they still hold the image's needs
    /// (without headroom: the factor was spent at first boot).
    pub fn reuse(previous: &[ScratchRegion], ram: &RamMap, needs: &ScratchNeeds) -> Result<Self, ScratchError> {
        let plan = Self::adopt(previous, ram)?;
        let global_need = needs.image_bytes.checked_add(needs.heap_bytes).ok_or(ScratchError::SizeOverflow)?;
        plan.check_capacity(ScratchKind::Global, global_need)?;
        if needs.dma32_bytes > 0 {
            plan.check_capacity(ScratchKind::Dma32, needs.dma32_bytes)?;
        }
        Ok(plan)
    }

    fn check_capacity(&self, kind: ScratchKind, need: u64) -> Result<(), ScratchError> {
        let region = self.region(kind).ok_or(ScratchError::MissingRegion(kind))?;
        if region.range.size() < need {
            return Err(ScratchError::TooSmall { kind, have: region.range.size(), need });
        }
        Ok(())
    }

    /// The regions, global first.
    pub fn regions(&self) -> &[ScratchRegion] {
        &self.regions
    }

    /// The region of `kind`, if planned.
    pub fn region(&self, kind: ScratchKind) -> Option<ScratchRegion> {
        self.regions.iter().copied().find(|r| r.kind == kind)
    }

    /// Refuses a preserved allocation that overlaps any scratch region.
    /// Preserved memory is never silently moved (`DESIGN.md` §3).
    pub fn check_preserved(&self, preserved: PhysRange) -> Result<(), ScratchError> {
        match self.regions.iter().find(|r| r.range.overlaps(preserved)) {
            Some(scratch) => Err(ScratchError::PreservedOverlapsScratch { preserved, scratch: *scratch }),
            None => Ok(()),
        }
    }
}

/// The highest `alignment`-aligned range of `size` bytes inside RAM, ending at
/// or below `limit`, that overlaps nothing in `taken`.
fn highest_fit(ram: &RamMap, taken: &[PhysRange], size: u64, alignment: u64, limit: u64) -> Option<PhysRange> {
    let mut best: Option<u64> = None;
    for ram_range in ram.ranges() {
        let end = ram_range.end().min(limit);
        if ram_range.base() >= end {
            continue;
        }
        // Free intervals as [start, end) pairs: this RAM range minus `taken`.
        let mut free = Vec::from([(ram_range.base(), end)]);
        for used in taken {
            free = free
                .into_iter()
                .flat_map(|(start, end)| {
                    let left = (start, end.min(used.base()));
                    let right = (start.max(used.end()), end);
                    [left, right]
                })
                .filter(|(start, end)| start < end)
                .collect();
        }
        for (start, end) in free {
            let Some(candidate) = end.checked_sub(size).map(|c| align_down(c, alignment)) else {
                continue;
            };
            if candidate >= start && best.is_none_or(|b| candidate > b) {
                best = Some(candidate);
            }
        }
    }
    best.and_then(|base| PhysRange::new(base, size).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn range(base: u64, size: u64) -> PhysRange {
        PhysRange::new(base, size).unwrap()
    }

    /// RAM below and above 4 GiB, like a PC with a PCI hole.
    fn split_ram() -> RamMap {
        RamMap::new(&[range(MIB, 3 * GIB - MIB), range(4 * GIB, 4 * GIB)]).unwrap()
    }

    fn needs() -> ScratchNeeds {
        ScratchNeeds { image_bytes: 3 * MIB, heap_bytes: 13 * MIB, dma32_bytes: 8 * MIB }
    }

    #[test]
    fn plans_global_high_and_dma32_below_four_gib() {
        let plan = ScratchPlan::plan(&split_ram(), &needs(), &ScratchPolicy::default(), &[]).unwrap();
        let global = plan.region(ScratchKind::Global).unwrap();
        let dma32 = plan.region(ScratchKind::Dma32).unwrap();
        assert_eq!(global.range, range(8 * GIB - 32 * MIB, 32 * MIB));
        assert_eq!(dma32.range, range(3 * GIB - 16 * MIB, 16 * MIB));
        assert_eq!(plan.regions()[0].kind, ScratchKind::Global);
    }

    #[test]
    fn sizes_follow_the_factor_and_the_minimum() {
        let policy = ScratchPolicy { factor_percent: 150, min_global_bytes: 0, alignment: 2 * MIB };
        let plan = ScratchPlan::plan(&split_ram(), &needs(), &policy, &[]).unwrap();
        assert_eq!(plan.region(ScratchKind::Global).unwrap().range.size(), 24 * MIB);
        assert_eq!(plan.region(ScratchKind::Dma32).unwrap().range.size(), 12 * MIB);

        let small = ScratchNeeds { image_bytes: MIB, heap_bytes: 0, dma32_bytes: 0 };
        let plan = ScratchPlan::plan(&split_ram(), &small, &ScratchPolicy::default(), &[]).unwrap();
        assert_eq!(plan.region(ScratchKind::Global).unwrap().range.size(), 16 * MIB);
        assert_eq!(plan.region(ScratchKind::Dma32), None);
    }

    #[test]
    fn avoids_occupied_memory() {
        let occupied = [range(8 * GIB - 40 * MIB, 40 * MIB), range(3 * GIB - MIB, MIB)];
        let plan = ScratchPlan::plan(&split_ram(), &needs(), &ScratchPolicy::default(), &occupied).unwrap();
        for region in plan.regions() {
            assert!(occupied.iter().all(|o| !o.overlaps(region.range)));
        }
        assert_eq!(plan.region(ScratchKind::Dma32).unwrap().range, range(3 * GIB - 18 * MIB, 16 * MIB));
    }

    #[test]
    fn low_only_ram_keeps_regions_apart() {
        let ram = RamMap::new(&[range(GIB, GIB)]).unwrap();
        let plan = ScratchPlan::plan(&ram, &needs(), &ScratchPolicy::default(), &[]).unwrap();
        let global = plan.region(ScratchKind::Global).unwrap();
        let dma32 = plan.region(ScratchKind::Dma32).unwrap();
        assert!(!global.range.overlaps(dma32.range));
        assert!(ram.contains(global.range) && ram.contains(dma32.range));
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let ram = RamMap::new(&[range(5 * GIB, 64 * MIB)]).unwrap();
        assert_eq!(
            ScratchPlan::plan(&ram, &needs(), &ScratchPolicy::default(), &[]),
            Err(ScratchError::NoFit { kind: ScratchKind::Dma32, size: 16 * MIB })
        );
        let huge = ScratchNeeds { image_bytes: GIB, ..ScratchNeeds::default() };
        assert!(matches!(
            ScratchPlan::plan(&ram, &huge, &ScratchPolicy::default(), &[]),
            Err(ScratchError::NoFit { kind: ScratchKind::Global, .. })
        ));
        let bad = ScratchPolicy { factor_percent: 50, ..ScratchPolicy::default() };
        assert_eq!(ScratchPlan::plan(&ram, &needs(), &bad, &[]), Err(ScratchError::InvalidPolicy));
    }

    #[test]
    fn reuse_returns_the_same_regions() {
        let ram = split_ram();
        let first = ScratchPlan::plan(&ram, &needs(), &ScratchPolicy::default(), &[]).unwrap();
        let mut previous = first.regions().to_vec();
        for generation in 0..4 {
            // Later images grow, within the headroom the factor bought.
            let later = ScratchNeeds { image_bytes: needs().image_bytes + generation * MIB, ..needs() };
            let plan = ScratchPlan::reuse(&previous, &ram, &later).unwrap();
            assert_eq!(plan, first);
            previous = plan.regions().to_vec();
        }
    }

    #[test]
    fn reuse_refuses_regions_too_small_for_the_image() {
        let ram = split_ram();
        let first = ScratchPlan::plan(&ram, &needs(), &ScratchPolicy::default(), &[]).unwrap();
        let bigger = ScratchNeeds { image_bytes: 40 * MIB, ..needs() };
        assert_eq!(
            ScratchPlan::reuse(first.regions(), &ram, &bigger),
            Err(ScratchError::TooSmall { kind: ScratchKind::Global, have: 32 * MIB, need: 53 * MIB })
        );
    }

    #[test]
    fn adopt_validates_regions() {
        let ram = split_ram();
        let global = ScratchRegion { range: range(4 * GIB, 32 * MIB), kind: ScratchKind::Global };
        let high_dma = ScratchRegion { range: range(5 * GIB, 32 * MIB), kind: ScratchKind::Dma32 };
        assert_eq!(ScratchPlan::adopt(&[global, high_dma], &ram), Err(ScratchError::Dma32AboveFourGib(high_dma)));
        assert_eq!(ScratchPlan::adopt(&[global, global], &ram), Err(ScratchError::DuplicateKind(ScratchKind::Global)));
        let hole = ScratchRegion { range: range(3 * GIB, 32 * MIB), kind: ScratchKind::Global };
        assert_eq!(ScratchPlan::adopt(&[hole], &ram), Err(ScratchError::OutsideRam(hole)));
        assert_eq!(ScratchPlan::adopt(&[], &ram), Err(ScratchError::MissingRegion(ScratchKind::Global)));
        let low = ScratchRegion { range: range(GIB, 32 * MIB), kind: ScratchKind::Dma32 };
        let clash = ScratchRegion { range: range(GIB + MIB, 32 * MIB), kind: ScratchKind::Global };
        assert!(matches!(ScratchPlan::adopt(&[low, clash], &ram), Err(ScratchError::Overlap { .. })));
    }

    #[test]
    fn refuses_preserved_allocations_in_scratch() {
        let plan = ScratchPlan::plan(&split_ram(), &needs(), &ScratchPolicy::default(), &[]).unwrap();
        let global = plan.region(ScratchKind::Global).unwrap();
        let inside = range(global.range.base() + 0x1000, 0x1000);
        assert_eq!(
            plan.check_preserved(inside),
            Err(ScratchError::PreservedOverlapsScratch { preserved: inside, scratch: global })
        );
        let straddling = range(global.range.base() - 0x1000, 0x2000);
        assert!(plan.check_preserved(straddling).is_err());
        assert_eq!(plan.check_preserved(range(GIB, 0x1000)), Ok(()));
    }
}
