//! Validation of a tree a previous image left behind, before the new image
//! trusts it (`shared/DESIGN.md` §5, Restore).
//!
//! The root address comes from the handover, so everything reached from it
//! is untrusted: each table page is checked to lie in RAM before it is read,
//! each page may be reached once only (no cycles, no sharing), the depth is
//! bounded by the level numbering, every descriptor must decode as one this
//! engine would write, leaves must map RAM or an allowed device region, and
//! no leaf may map a table page (a guest could rewrite its own tree).

use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use core::fmt;
use core::marker::PhantomData;

use super::memory::{next_nonzero, PhysToVirt};
use super::{decode_entry, entry_span, DescriptorError, Entry, Stage2Format, PAGE_SIZE, ROOT_LEVEL};

/// Why a tree was not adopted. Adoption reads but never writes, so a
/// refused tree is left as it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdoptError {
    /// A RAM or device range wraps around the address space.
    InvalidRange { base: u64, size: u64 },
    /// A table page (the root, at level 0) is not 4 KiB aligned.
    TableMisaligned { level: u8, pa: u64 },
    /// A table page is not inside the RAM ranges.
    TableOutsideRam { level: u8, pa: u64 },
    /// A table page is reached a second time: a cycle, or two parents
    /// sharing one child.
    TableRevisited { level: u8, pa: u64 },
    /// The descriptor for `ipa` in a table at `level` is malformed.
    BadEntry { level: u8, ipa: u64, entry: u64, reason: DescriptorError },
    /// A leaf maps memory that is neither RAM nor an allowed device range.
    LeafOutsideMemory { ipa: u64, pa: u64, size: u64 },
    /// A leaf maps one of the tree's own table pages (`ipa`: the
    /// guest-physical address that reaches it).
    LeafCoversTable { ipa: u64, table: u64 },
}

impl fmt::Display for AdoptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdoptError::InvalidRange { base, size } => write!(f, "memory range {base:#x}+{size:#x} wraps around"),
            AdoptError::TableMisaligned { level, pa } => {
                write!(f, "level {level} table at {pa:#x} is not 4 KiB aligned")
            }
            AdoptError::TableOutsideRam { level, pa } => write!(f, "level {level} table at {pa:#x} is outside RAM"),
            AdoptError::TableRevisited { level, pa } => {
                write!(f, "level {level} table at {pa:#x} is reached twice (cycle or shared table)")
            }
            AdoptError::BadEntry { level, ipa, entry, reason } => {
                write!(f, "level {level} descriptor {entry:#x} for guest-physical {ipa:#x}: {reason}")
            }
            AdoptError::LeafOutsideMemory { ipa, pa, size } => {
                write!(f, "guest-physical {ipa:#x} maps {pa:#x}+{size:#x}, outside RAM and devices")
            }
            AdoptError::LeafCoversTable { ipa, table } => {
                write!(f, "guest-physical {ipa:#x} maps the table page {table:#x}")
            }
        }
    }
}

/// What a validated tree holds.
pub(super) struct Validated {
    /// Every table page, the root included.
    pub(super) tables: BTreeSet<u64>,
    /// Leaves per size, indexed like `BlockSize::ALL`.
    pub(super) leaves: [u64; 3],
}

/// Walks and validates the tree at `root`; see the module documentation.
pub(super) fn validate<F: Stage2Format, P: PhysToVirt>(
    root: u64,
    ram: &[(u64, u64)],
    devices: &[(u64, u64)],
    phys: &P,
) -> Result<Validated, AdoptError> {
    let mut walk = Walk::<F, P> {
        phys,
        ram: Ranges::new(ram)?,
        devices: Ranges::new(devices)?,
        tables: BTreeSet::new(),
        leaves: [0; 3],
        runs: Vec::new(),
        format: PhantomData,
    };
    walk.table(root, ROOT_LEVEL, 0)?;
    walk.leaves_clear_of_tables()?;
    Ok(Validated { tables: walk.tables, leaves: walk.leaves })
}

/// Leaves next to each other in both guest-physical and physical space,
/// in IPA order: a linearly mapped guest is a handful of runs, so the
/// check that no leaf maps a table page costs one lookup per run instead
/// of a second walk of every descriptor.
struct LeafRun {
    ipa: u64,
    pa: u64,
    len: u64,
}

/// Sorted, merged, non-empty half-open ranges.
struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    fn new(list: &[(u64, u64)]) -> Result<Ranges, AdoptError> {
        let mut ranges = Vec::with_capacity(list.len());
        for &(base, size) in list {
            let end = base.checked_add(size).ok_or(AdoptError::InvalidRange { base, size })?;
            if size != 0 {
                ranges.push((base, end));
            }
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some((_, merged_end)) if start <= *merged_end => *merged_end = (*merged_end).max(end),
                _ => merged.push((start, end)),
            }
        }
        Ok(Ranges(merged))
    }

    /// Whether `[start, start + len)` lies inside one merged range.
    fn contains(&self, start: u64, len: u64) -> bool {
        self.limit(start, len).is_some()
    }

    /// The end of the merged range `[start, start + len)` lies in, if one.
    fn limit(&self, start: u64, len: u64) -> Option<u64> {
        let end = start.checked_add(len)?;
        // The last range starting at or below `start` is the only candidate.
        let after = self.0.partition_point(|&(base, _)| base <= start);
        after.checked_sub(1).and_then(|i| self.0.get(i)).map(|&(_, limit)| limit).filter(|&limit| end <= limit)
    }
}

/// Descriptors that differ from the last leaf's only by the next output
/// address (its raw value plus the leaf's size, below 2^48 so no carry
/// reaches a bit above the address field in either format) decode as that
/// leaf does: same attributes, same checks. A linearly mapped guest is a
/// table of such leaves; each is then checked against the end of the
/// memory range the first one lay in, not decoded and searched for again.
#[derive(Clone, Copy)]
struct LastLeaf {
    raw: u64,
    pa: u64,
    bytes: u64,
    size_index: usize,
    /// End of the RAM or device range the leaf lies in.
    limit: u64,
}

impl LastLeaf {
    /// The leaf `raw` is, if it is this one's successor within its range.
    fn successor(self, raw: u64) -> Option<LastLeaf> {
        let pa = self.pa + self.bytes;
        let next = pa.checked_add(self.bytes)?;
        (raw == self.raw.wrapping_add(self.bytes) && next <= self.limit && next <= 1 << 48).then_some(LastLeaf {
            raw,
            pa,
            ..self
        })
    }
}

struct Walk<'a, F, P> {
    phys: &'a P,
    ram: Ranges,
    devices: Ranges,
    tables: BTreeSet<u64>,
    leaves: [u64; 3],
    runs: Vec<LeafRun>,
    format: PhantomData<fn() -> F>,
}

impl<F: Stage2Format, P: PhysToVirt> Walk<'_, F, P> {
    /// Validates the table page at `pa`, at `level`, covering the IPAs from
    /// `base`, and everything below it. Recursion depth is bounded by the
    /// level numbering: `decode_entry` returns no table at the last level.
    fn table(&mut self, pa: u64, level: u8, base: u64) -> Result<(), AdoptError> {
        if !pa.is_multiple_of(PAGE_SIZE) {
            return Err(AdoptError::TableMisaligned { level, pa });
        }
        if !self.ram.contains(pa, PAGE_SIZE) {
            return Err(AdoptError::TableOutsideRam { level, pa });
        }
        if !self.tables.insert(pa) {
            return Err(AdoptError::TableRevisited { level, pa });
        }
        let span = entry_span(level);
        // Only now, with `pa` known to be a RAM page, is it read. A zero
        // descriptor is not present in either format, and most are zero.
        let mut from = 0;
        let mut last: Option<LastLeaf> = None;
        while let Some((index, entry)) = next_nonzero(self.phys, pa, from) {
            let ipa = base + index as u64 * span;
            // The next descriptor in the table continuing the last leaf.
            let successor = last.filter(|_| index == from).and_then(|l| l.successor(entry));
            from = index + 1;
            let leaf = match successor {
                Some(leaf) => leaf,
                None => match decode_entry::<F>(entry, level) {
                    Err(reason) => return Err(AdoptError::BadEntry { level, ipa, entry, reason }),
                    Ok(Entry::Invalid) => {
                        last = None;
                        continue;
                    }
                    Ok(Entry::Table { next, level: child }) => {
                        last = None;
                        self.table(next, child, ipa)?;
                        continue;
                    }
                    Ok(Entry::Leaf { pa: out, size, .. }) => {
                        let bytes = size.bytes();
                        let limit = self.ram.limit(out, bytes).or_else(|| self.devices.limit(out, bytes));
                        let limit = limit.ok_or(AdoptError::LeafOutsideMemory { ipa, pa: out, size: bytes })?;
                        LastLeaf { raw: entry, pa: out, bytes, size_index: size.index(), limit }
                    }
                },
            };
            last = Some(leaf);
            self.leaves[leaf.size_index] += 1;
            match self.runs.last_mut() {
                Some(run) if run.ipa + run.len == ipa && run.pa + run.len == leaf.pa => run.len += leaf.bytes,
                _ => self.runs.push(LeafRun { ipa, pa: leaf.pa, len: leaf.bytes }),
            }
        }
        Ok(())
    }

    /// After the walk, with every table page known: no leaf maps one.
    /// The error names the guest-physical address that maps it.
    fn leaves_clear_of_tables(&self) -> Result<(), AdoptError> {
        for run in &self.runs {
            // In RAM or a device range (checked): no overflow.
            if let Some(&table) = self.tables.range(run.pa..run.pa + run.len).next() {
                return Err(AdoptError::LeafCoversTable { ipa: run.ipa + (table - run.pa), table });
            }
        }
        Ok(())
    }
}
