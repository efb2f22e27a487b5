//! [`Stage2Table`]: one guest's second-stage tree, and the edits on it.

use alloc::collections::BTreeSet;
use core::fmt;
use core::marker::PhantomData;

use super::adopt;
use super::memory::{publish, read_entry, write_entry, FrameReserve, FrameSource, PhysToVirt, ReserveError};
use super::{
    child_level, decode_entry, entry_index, entry_span, AdoptError, Attrs, BlockSize, DescriptorError, Entry,
    Stage2Format, ADDRESS_LIMIT, ENTRIES_PER_TABLE, INVALID_DESCRIPTOR, PAGE_SIZE, ROOT_LEVEL,
};

/// Why a map or unmap was refused. A refused edit changes nothing, except
/// [`MapError::Corrupt`], which means the tree was changed under the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// The size is zero.
    ZeroSize,
    /// An address or the size is not a multiple of 4 KiB.
    Misaligned { value: u64 },
    /// The range `[addr, addr + size)` reaches past [`ADDRESS_LIMIT`].
    OutOfRange { addr: u64, size: u64 },
    /// The guest-physical range is already mapped at `ipa`.
    Overlap { ipa: u64 },
    /// The frame source has no page left for a table.
    OutOfFrames,
    /// The frame source handed out a page that is misaligned or beyond
    /// [`ADDRESS_LIMIT`]; it was given back.
    UnusableFrame { pa: u64 },
    /// A descriptor on the way to `ipa` does not decode.
    Corrupt { level: u8, ipa: u64, reason: DescriptorError },
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapError::ZeroSize => f.write_str("zero-sized range"),
            MapError::Misaligned { value } => write!(f, "{value:#x} is not a multiple of 4 KiB"),
            MapError::OutOfRange { addr, size } => {
                write!(f, "range {addr:#x}+{size:#x} reaches past the {ADDRESS_LIMIT:#x} address limit")
            }
            MapError::Overlap { ipa } => write!(f, "guest-physical {ipa:#x} is already mapped"),
            MapError::OutOfFrames => f.write_str("no free page for a table"),
            MapError::UnusableFrame { pa } => write!(f, "frame source returned unusable page {pa:#x}"),
            MapError::Corrupt { level, ipa, reason } => {
                write!(f, "corrupt descriptor at level {level} for guest-physical {ipa:#x}: {reason}")
            }
        }
    }
}

impl From<ReserveError> for MapError {
    fn from(e: ReserveError) -> MapError {
        match e {
            ReserveError::Exhausted => MapError::OutOfFrames,
            ReserveError::Unusable(pa) => MapError::UnusableFrame { pa },
        }
    }
}

/// Where one guest-physical address goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The host-physical address of the byte at the translated IPA.
    pub pa: u64,
    pub attrs: Attrs,
    /// The size of the leaf that maps it.
    pub size: BlockSize,
}

/// One leaf of the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub ipa: u64,
    pub pa: u64,
    pub size: BlockSize,
    pub attrs: Attrs,
}

/// A second-stage translation tree in format `F`, whose pages are reached
/// through `P`.
///
/// The tree owns its table pages but not through `Drop`: the pages are
/// preserved across live updates and given back only by [`free`](Self::free).
/// Edits are not atomic with respect to running vCPUs: the caller
/// serialises them, and invalidates the VMID's (or EPTP's) TLB entries after
/// an unmap. Splitting a block while vCPUs of the guest run breaks Arm's
/// break-before-make rule (Arm ARM chapter D8, "Using break-before-make when
/// updating translation table entries"), so the caller stops them and
/// invalidates before they resume.
pub struct Stage2Table<F, P> {
    root: u64,
    phys: P,
    /// Every table page, the root included.
    tables: BTreeSet<u64>,
    /// Leaves per size, indexed like [`BlockSize::ALL`].
    leaves: [u64; 3],
    max_block: BlockSize,
    format: PhantomData<fn() -> F>,
}

impl<F: Stage2Format, P> fmt::Debug for Stage2Table<F, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stage2Table")
            .field("format", &F::NAME)
            .field("root", &format_args!("{:#x}", self.root))
            .field("tables", &self.tables.len())
            .field("leaves", &self.leaves)
            .field("max_block", &self.max_block)
            .finish_non_exhaustive()
    }
}

/// A half-open guest-physical range.
#[derive(Clone, Copy)]
struct Span {
    start: u64,
    end: u64,
}

/// The part of a [`Span`] that falls into one descriptor of a table.
struct Piece {
    index: usize,
    span: Span,
    /// The piece covers the descriptor's whole span.
    whole: bool,
}

/// Cuts `span` at the descriptor boundaries of a table at `level`.
fn pieces(span: Span, level: u8) -> impl Iterator<Item = Piece> {
    let size = entry_span(level);
    let mut addr = span.start;
    core::iter::from_fn(move || {
        if addr >= span.end {
            return None;
        }
        let entry_start = addr & !(size - 1);
        let entry_end = entry_start + size;
        let end = span.end.min(entry_end);
        let piece = Piece {
            index: entry_index(addr, level),
            span: Span { start: addr, end },
            whole: addr == entry_start && end == entry_end,
        };
        addr = end;
        Some(piece)
    })
}

/// Checks a range's alignment and bounds, returning its end.
fn check_range(addr: u64, size: u64) -> Result<u64, MapError> {
    if size == 0 {
        return Err(MapError::ZeroSize);
    }
    if !addr.is_multiple_of(PAGE_SIZE) {
        return Err(MapError::Misaligned { value: addr });
    }
    if !size.is_multiple_of(PAGE_SIZE) {
        return Err(MapError::Misaligned { value: size });
    }
    match addr.checked_add(size) {
        Some(end) if end <= ADDRESS_LIMIT => Ok(end),
        _ => Err(MapError::OutOfRange { addr, size }),
    }
}

impl<F: Stage2Format, P: PhysToVirt> Stage2Table<F, P> {
    /// An empty tree: one cleared root page from `frames`.
    pub fn new<S: FrameSource + ?Sized>(frames: &mut S, phys: P) -> Result<Self, MapError> {
        let mut reserve = FrameReserve::fill(frames, 1)?;
        let root = reserve.take(&phys);
        reserve.release(frames);
        let root = root.ok_or(MapError::OutOfFrames)?;
        Ok(Self::from_parts(root, phys, BTreeSet::from([root]), [0; 3]))
    }

    /// Rebuilds the handle of a tree a previous image built, from its root
    /// page, after validating every table page and descriptor (see
    /// [`AdoptError`]). Table pages must lie in `ram`; leaves must map into
    /// `ram` or `devices`; both are lists of `(base, size)`. Nothing is
    /// copied or written: the handle uses the same root and pages.
    pub fn adopt(root: u64, ram: &[(u64, u64)], devices: &[(u64, u64)], phys: P) -> Result<Self, AdoptError> {
        let found = adopt::validate::<F, P>(root, ram, devices, &phys)?;
        Ok(Self::from_parts(root, phys, found.tables, found.leaves))
    }

    fn from_parts(root: u64, phys: P, tables: BTreeSet<u64>, leaves: [u64; 3]) -> Self {
        Stage2Table { root, phys, tables, leaves, max_block: BlockSize::Size1G, format: PhantomData }
    }

    /// Physical address of the root table (for VTTBR_EL2, the EPTP, the
    /// SMMU stream table entry or the VT-d context entry).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Every table page of the tree, the root included, in address order:
    /// the pages a live update must preserve.
    pub fn table_pages(&self) -> impl ExactSizeIterator<Item = u64> + '_ {
        self.tables.iter().copied()
    }

    /// Number of leaves of `size` in the tree.
    pub fn leaf_count(&self, size: BlockSize) -> u64 {
        self.leaves[size.index()]
    }

    /// The largest leaf [`map`](Self::map) uses (1 GiB unless lowered, e.g.
    /// on a CPU without 1 GiB EPT pages).
    pub fn max_block_size(&self) -> BlockSize {
        self.max_block
    }

    /// Caps the leaf size of later maps; existing leaves stay.
    pub fn set_max_block_size(&mut self, size: BlockSize) {
        self.max_block = size;
    }

    /// Maps `[ipa, ipa + size)` to `[pa, pa + size)` with `attrs`, using
    /// the largest leaves that the alignment of both addresses allows.
    /// Refuses, changing nothing, if any part of the range is mapped or the
    /// table pages it needs cannot all be had.
    pub fn map<S: FrameSource + ?Sized>(
        &mut self,
        ipa: u64,
        pa: u64,
        size: u64,
        attrs: Attrs,
        frames: &mut S,
    ) -> Result<(), MapError> {
        let end = check_range(ipa, size)?;
        check_range(pa, size)?;
        let span = Span { start: ipa, end };
        let delta = pa.wrapping_sub(ipa);
        let needed = self.plan_map(Some(self.root), ROOT_LEVEL, span, delta)?;
        let mut reserve = FrameReserve::fill(frames, needed)?;
        let result = self.apply_map(self.root, ROOT_LEVEL, span, delta, attrs, &mut reserve);
        reserve.release(frames);
        result
    }

    /// Unmaps whatever is mapped in `[ipa, ipa + size)`; holes are fine.
    /// A block that straddles an end of the range is split into smaller
    /// leaves first. Refuses, changing nothing, if the table pages for the
    /// splits cannot all be had.
    pub fn unmap<S: FrameSource + ?Sized>(&mut self, ipa: u64, size: u64, frames: &mut S) -> Result<(), MapError> {
        let end = check_range(ipa, size)?;
        let span = Span { start: ipa, end };
        let needed = self.plan_unmap(self.root, ROOT_LEVEL, span)?;
        let mut reserve = FrameReserve::fill(frames, needed)?;
        let result = self.apply_unmap(self.root, ROOT_LEVEL, span, &mut reserve);
        reserve.release(frames);
        result
    }

    /// Where `ipa` goes, or `None` if it is not mapped.
    pub fn translate(&self, ipa: u64) -> Option<Translation> {
        if ipa >= ADDRESS_LIMIT {
            return None;
        }
        let mut table = self.root;
        let mut level = ROOT_LEVEL;
        loop {
            match self.entry(table, level, ipa).ok()? {
                Entry::Invalid => return None,
                Entry::Table { next, level: child } => (table, level) = (next, child),
                Entry::Leaf { pa, size, attrs } => {
                    return Some(Translation { pa: pa + (ipa & (size.bytes() - 1)), attrs, size })
                }
            }
        }
    }

    /// Calls `f` for every leaf, in guest-physical order.
    pub fn for_each_leaf(&self, mut f: impl FnMut(Mapping)) {
        self.visit_leaves(self.root, ROOT_LEVEL, 0, &mut f);
    }

    /// Gives every table page back to `frames`. Only for a tree no
    /// hardware walks any more (the VMID or EPTP invalidated).
    pub fn free<S: FrameSource + ?Sized>(self, frames: &mut S) {
        for pa in self.tables {
            frames.free_frame(pa);
        }
    }

    /// The descriptor covering `ipa` in the table page `table` at `level`.
    fn entry(&self, table: u64, level: u8, ipa: u64) -> Result<Entry, MapError> {
        let raw = read_entry(&self.phys, table, entry_index(ipa, level));
        decode_entry::<F>(raw, level).map_err(|reason| MapError::Corrupt { level, ipa, reason })
    }

    /// The leaf size for `piece` at `level`, if one leaf can map it.
    fn leaf_fit(&self, level: u8, piece: &Piece, delta: u64) -> Option<BlockSize> {
        let size = BlockSize::at_level(level)?;
        let aligned = piece.span.start.wrapping_add(delta).is_multiple_of(size.bytes());
        (piece.whole && size <= self.max_block && aligned).then_some(size)
    }

    /// Checks that `span` is unmapped below `table` (`None`: a table still
    /// to be made) and counts the table pages mapping it will take.
    fn plan_map(&self, table: Option<u64>, level: u8, span: Span, delta: u64) -> Result<usize, MapError> {
        let mut needed = 0;
        for piece in pieces(span, level) {
            let entry = match table {
                Some(table) => self.entry(table, level, piece.span.start)?,
                None => Entry::Invalid,
            };
            match entry {
                Entry::Invalid if self.leaf_fit(level, &piece, delta).is_some() => {}
                Entry::Invalid => {
                    // Only a misaligned range misses a leaf at the last level.
                    let child = child_level(level).ok_or(MapError::Misaligned { value: piece.span.start })?;
                    needed += 1 + self.plan_map(None, child, piece.span, delta)?;
                }
                Entry::Table { next, level: child } => needed += self.plan_map(Some(next), child, piece.span, delta)?,
                Entry::Leaf { .. } => return Err(MapError::Overlap { ipa: piece.span.start }),
            }
        }
        Ok(needed)
    }

    fn apply_map(
        &mut self,
        table: u64,
        level: u8,
        span: Span,
        delta: u64,
        attrs: Attrs,
        reserve: &mut FrameReserve,
    ) -> Result<(), MapError> {
        for piece in pieces(span, level) {
            let fit = self.leaf_fit(level, &piece, delta);
            match (self.entry(table, level, piece.span.start)?, fit) {
                (Entry::Invalid, Some(size)) => {
                    let leaf = F::leaf_descriptor(piece.span.start.wrapping_add(delta), size, attrs);
                    write_entry(&self.phys, table, piece.index, leaf);
                    self.leaves[size.index()] += 1;
                }
                (Entry::Invalid, None) => {
                    let child = child_level(level).ok_or(MapError::Misaligned { value: piece.span.start })?;
                    let next = self.link_new_table(table, piece.index, reserve)?;
                    self.apply_map(next, child, piece.span, delta, attrs, reserve)?;
                }
                (Entry::Table { next, level: child }, _) => {
                    self.apply_map(next, child, piece.span, delta, attrs, reserve)?;
                }
                (Entry::Leaf { .. }, _) => return Err(MapError::Overlap { ipa: piece.span.start }),
            }
        }
        Ok(())
    }

    /// Counts the table pages that splitting straddled blocks will take.
    fn plan_unmap(&self, table: u64, level: u8, span: Span) -> Result<usize, MapError> {
        let mut needed = 0;
        for piece in pieces(span, level) {
            match self.entry(table, level, piece.span.start)? {
                Entry::Invalid => {}
                Entry::Table { next, level: child } => needed += self.plan_unmap(next, child, piece.span)?,
                Entry::Leaf { .. } if piece.whole => {}
                Entry::Leaf { size, .. } => needed += split_cost(size, piece.span)?,
            }
        }
        Ok(needed)
    }

    fn apply_unmap(&mut self, table: u64, level: u8, span: Span, reserve: &mut FrameReserve) -> Result<(), MapError> {
        for piece in pieces(span, level) {
            match self.entry(table, level, piece.span.start)? {
                Entry::Invalid => {}
                Entry::Table { next, level: child } => self.apply_unmap(next, child, piece.span, reserve)?,
                Entry::Leaf { size, .. } if piece.whole => {
                    write_entry(&self.phys, table, piece.index, INVALID_DESCRIPTOR);
                    self.leaves[size.index()] = self.leaves[size.index()].saturating_sub(1);
                }
                Entry::Leaf { pa, size, attrs } => {
                    let (next, child) =
                        self.split(table, piece.index, Mapping { ipa: piece.span.start, pa, size, attrs }, reserve)?;
                    self.apply_unmap(next, child, piece.span, reserve)?;
                }
            }
        }
        Ok(())
    }

    /// Replaces `leaf`, descriptor `index` of `table`, by a new table of
    /// 512 leaves of the next smaller size mapping the same memory the same
    /// way. Returns the new table and its level.
    fn split(
        &mut self,
        table: u64,
        index: usize,
        leaf: Mapping,
        reserve: &mut FrameReserve,
    ) -> Result<(u64, u8), MapError> {
        let child = leaf.size.smaller().ok_or(MapError::Misaligned { value: leaf.ipa })?;
        let next = reserve.take(&self.phys).ok_or(MapError::OutOfFrames)?;
        let mut pa = leaf.pa;
        for i in 0..ENTRIES_PER_TABLE {
            write_entry(&self.phys, next, i, F::leaf_descriptor(pa, child, leaf.attrs));
            pa += child.bytes();
        }
        self.tables.insert(next);
        self.leaves[child.index()] += ENTRIES_PER_TABLE as u64;
        self.leaves[leaf.size.index()] = self.leaves[leaf.size.index()].saturating_sub(1);
        publish();
        write_entry(&self.phys, table, index, F::table_descriptor(next));
        Ok((next, child.level()))
    }

    /// Takes a cleared page from `reserve` and links it as descriptor
    /// `index` of `table`.
    fn link_new_table(&mut self, table: u64, index: usize, reserve: &mut FrameReserve) -> Result<u64, MapError> {
        let next = reserve.take(&self.phys).ok_or(MapError::OutOfFrames)?;
        self.tables.insert(next);
        publish();
        write_entry(&self.phys, table, index, F::table_descriptor(next));
        Ok(next)
    }

    fn visit_leaves(&self, table: u64, level: u8, base: u64, f: &mut impl FnMut(Mapping)) {
        let span = entry_span(level);
        let mut ipa = base;
        for index in 0..ENTRIES_PER_TABLE {
            match decode_entry::<F>(read_entry(&self.phys, table, index), level) {
                Ok(Entry::Table { next, level: child }) => self.visit_leaves(next, child, ipa, f),
                Ok(Entry::Leaf { pa, size, attrs }) => f(Mapping { ipa, pa, size, attrs }),
                Ok(Entry::Invalid) | Err(_) => {}
            }
            ipa += span;
        }
    }
}

/// Table pages needed to carve `span` out of a leaf of `size` that it
/// covers only in part: one for the split, plus the splits of the smaller
/// leaves that `span` again covers only in part (at most one per end).
fn split_cost(size: BlockSize, span: Span) -> Result<usize, MapError> {
    let child = size.smaller().ok_or(MapError::Misaligned { value: span.start })?;
    let mut needed = 1;
    for piece in pieces(span, child.level()) {
        if !piece.whole {
            needed += split_cost(child, piece.span)?;
        }
    }
    Ok(needed)
}
