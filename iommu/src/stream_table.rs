//! The stream table (§3.3 "Data structures and translation procedure",
//! §5.1 "Level 1 Stream Table Descriptor", §6.3 SMMU_STRTAB_BASE_CFG):
//! linear, or two levels with L2 arrays of 2^SPLIT STEs created on first
//! use. Every STE the driver creates starts as abort; an L1 descriptor with
//! Span = 0 has no L2 array, and the SMMU terminates its streams
//! (C_BAD_STREAMID), so unassigned streams abort either way.

use alloc::collections::BTreeMap;
use core::sync::atomic::{fence, Ordering};

use crate::bits::{address_field, Field};
use crate::error::{AdoptError, Error, Region};
use crate::memory::{alignment_for, alloc_run, read_word, write_word, FrameSource, PageRun, PhysToVirt, WORD_BYTES};
use crate::regs::{
    STRTAB_BASE_RA, STRTAB_CFG_FMT, STRTAB_CFG_LOG2SIZE, STRTAB_CFG_SPLIT, STRTAB_FMT_LINEAR, STRTAB_FMT_TWO_LEVEL,
};
use crate::state::Claims;
use crate::ste::{SteConfig, STE_BYTES, STE_WORDS};

/// StreamID bits resolved by an L2 array: 2^8 STEs = 16 KiB per array.
pub const SPLIT: u8 = 8;

/// L1 descriptor (§5.1): Span, bits [4:0]; L2Ptr, bits [51:6].
const L1_SPAN: Field = Field::new(0, 5);
const L1_L2PTR: u64 = address_field(6);
const L1_DESCRIPTOR_BYTES: u64 = 8;
/// Span = SPLIT + 1: the L2 array holds 2^(Span - 1) = 2^SPLIT STEs.
const L2_SPAN: u64 = SPLIT as u64 + 1;
/// STEs, and bytes, in one L2 array.
const L2_STES: u64 = 1 << SPLIT;
const L2_BYTES: u64 = L2_STES * STE_BYTES;

/// Layout of the stream table (SMMU_STRTAB_BASE_CFG.FMT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamTableFormat {
    /// One array of 2^LOG2SIZE STEs.
    Linear,
    /// An L1 array of descriptors, each for 2^SPLIT StreamIDs.
    TwoLevel,
}

impl StreamTableFormat {
    /// The STRTAB_BASE_CFG.FMT encoding.
    pub fn encoding(self) -> u8 {
        match self {
            StreamTableFormat::Linear => STRTAB_FMT_LINEAR as u8,
            StreamTableFormat::TwoLevel => STRTAB_FMT_TWO_LEVEL as u8,
        }
    }

    /// The STRTAB_BASE_CFG.SPLIT this driver uses with the format.
    pub fn split(self) -> u8 {
        match self {
            StreamTableFormat::Linear => 0,
            StreamTableFormat::TwoLevel => SPLIT,
        }
    }
}

#[derive(Debug)]
pub(crate) struct StreamTable {
    format: StreamTableFormat,
    /// The linear array, or the L1 array.
    run: PageRun,
    log2size: u8,
    /// L1 index to the L2 array behind it.
    l2: BTreeMap<u32, PageRun>,
}

impl StreamTable {
    /// The format for `log2size` StreamID bits: two levels only if offered
    /// and if there is more than one L2 array's worth of StreamIDs.
    pub(crate) fn choose_format(offered: StreamTableFormat, log2size: u8) -> StreamTableFormat {
        if offered == StreamTableFormat::TwoLevel && log2size > SPLIT {
            StreamTableFormat::TwoLevel
        } else {
            StreamTableFormat::Linear
        }
    }

    /// Bytes of the linear array or L1 array.
    pub(crate) fn table_bytes(format: StreamTableFormat, log2size: u8) -> u64 {
        match format {
            StreamTableFormat::Linear => STE_BYTES << log2size,
            StreamTableFormat::TwoLevel => L1_DESCRIPTOR_BYTES << (log2size - SPLIT),
        }
    }

    /// Builds an empty table: every linear STE aborts, every L1 descriptor
    /// is invalid.
    pub(crate) fn create<F: FrameSource + ?Sized, P: PhysToVirt + ?Sized>(
        frames: &mut F,
        phys: &P,
        format: StreamTableFormat,
        log2size: u8,
        limit: u64,
    ) -> Result<StreamTable, Error> {
        let bytes = Self::table_bytes(format, log2size);
        let run = alloc_run(frames, bytes, limit)?;
        match format {
            StreamTableFormat::Linear => write_abort_stes(phys, run.base, 1 << log2size),
            StreamTableFormat::TwoLevel => {
                for offset in (0..bytes).step_by(L1_DESCRIPTOR_BYTES as usize) {
                    write_word(phys, run.base + offset, 0);
                }
            }
        }
        Ok(StreamTable { format, run, log2size, l2: BTreeMap::new() })
    }

    /// Gives the table back to the frame source; only before the SMMU has
    /// been told about it.
    pub(crate) fn free<F: FrameSource + ?Sized>(self, frames: &mut F) {
        for run in self.runs() {
            frames.free_pages(run.base, run.count);
        }
    }

    pub(crate) fn format(&self) -> StreamTableFormat {
        self.format
    }

    pub(crate) fn log2size(&self) -> u8 {
        self.log2size
    }

    pub(crate) fn base(&self) -> u64 {
        self.run.base
    }

    /// SMMU_STRTAB_BASE.
    pub(crate) fn base_register(&self) -> u64 {
        STRTAB_BASE_RA | self.run.base
    }

    /// SMMU_STRTAB_BASE_CFG.
    pub(crate) fn base_cfg(&self) -> u32 {
        Self::cfg(self.format, self.log2size)
    }

    pub(crate) fn cfg(format: StreamTableFormat, log2size: u8) -> u32 {
        (STRTAB_CFG_LOG2SIZE.place(u64::from(log2size))
            | STRTAB_CFG_SPLIT.place(u64::from(format.split()))
            | STRTAB_CFG_FMT.place(u64::from(format.encoding()))) as u32
    }

    /// Physical address of the STE for `stream_id`, if its L2 array exists.
    /// `stream_id` must be below 2^log2size.
    pub(crate) fn ste_address(&self, stream_id: u32) -> Option<u64> {
        match self.format {
            StreamTableFormat::Linear => Some(self.run.base + u64::from(stream_id) * STE_BYTES),
            StreamTableFormat::TwoLevel => {
                self.l2.get(&(stream_id >> SPLIT)).map(|run| run.base + (u64::from(stream_id) % L2_STES) * STE_BYTES)
            }
        }
    }

    /// The STE address for `stream_id`, creating its L2 array (all abort)
    /// first if needed. Returns whether an L1 descriptor changed, which
    /// the caller must invalidate with a non-leaf CFGI_STE.
    pub(crate) fn prepare<F: FrameSource + ?Sized, P: PhysToVirt + ?Sized>(
        &mut self,
        frames: &mut F,
        phys: &P,
        stream_id: u32,
        limit: u64,
    ) -> Result<(u64, bool), Error> {
        if let Some(ste) = self.ste_address(stream_id) {
            return Ok((ste, false));
        }
        let index = stream_id >> SPLIT;
        let run = alloc_run(frames, L2_BYTES, limit)?;
        write_abort_stes(phys, run.base, L2_STES);
        // The SMMU may walk to the array as soon as the descriptor is
        // visible: its STEs must be visible first.
        fence(Ordering::Release);
        let descriptor = (run.base & L1_L2PTR) | L1_SPAN.place(L2_SPAN);
        write_word(phys, self.run.base + u64::from(index) * L1_DESCRIPTOR_BYTES, descriptor);
        self.l2.insert(index, run);
        let ste = run.base + (u64::from(stream_id) % L2_STES) * STE_BYTES;
        Ok((ste, true))
    }

    /// Every run of pages the table owns.
    pub(crate) fn runs(&self) -> impl Iterator<Item = PageRun> + '_ {
        core::iter::once(self.run).chain(self.l2.values().copied())
    }

    /// Every StreamID that has an STE, with the STE's address.
    pub(crate) fn stes(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        let linear = match self.format {
            StreamTableFormat::Linear => {
                Some((0..1u64 << self.log2size).map(|sid| (sid, self.run.base + sid * STE_BYTES)))
            }
            StreamTableFormat::TwoLevel => None,
        };
        let two_level = self.l2.iter().flat_map(|(&index, run)| {
            (0..L2_STES).map(move |offset| ((u64::from(index) << SPLIT) + offset, run.base + offset * STE_BYTES))
        });
        linear.into_iter().flatten().chain(two_level).map(|(sid, pa)| (sid as u32, pa))
    }

    /// Takes over a live table: the array or L1 array at `base`, and for two
    /// levels every L2 array its descriptors point to, each checked to be
    /// aligned, inside RAM and disjoint from everything else claimed.
    pub(crate) fn adopt<P: PhysToVirt + ?Sized>(
        phys: &P,
        base: u64,
        format: StreamTableFormat,
        log2size: u8,
        claims: &mut Claims<'_>,
    ) -> Result<StreamTable, AdoptError> {
        let bytes = Self::table_bytes(format, log2size);
        let run = claims.claim(Region::StreamTable, base, bytes, alignment_for(bytes))?;
        let mut l2 = BTreeMap::new();
        if format == StreamTableFormat::TwoLevel {
            let descriptors = 1u32 << (log2size - SPLIT);
            for index in 0..descriptors {
                let value = read_word(phys, base + u64::from(index) * L1_DESCRIPTOR_BYTES);
                if value == 0 {
                    continue;
                }
                if L1_SPAN.get(value) != L2_SPAN || value & !(L1_L2PTR | L1_SPAN.mask()) != 0 {
                    return Err(AdoptError::BadL1Descriptor { index, value });
                }
                let region = Region::L2Table { index };
                l2.insert(index, claims.claim(region, value & L1_L2PTR, L2_BYTES, L2_BYTES)?);
            }
        }
        Ok(StreamTable { format, run, log2size, l2 })
    }

    /// Reads the STE at `pa`.
    pub(crate) fn read_ste<P: PhysToVirt + ?Sized>(phys: &P, pa: u64) -> [u64; STE_WORDS] {
        core::array::from_fn(|word| read_word(phys, pa + word as u64 * WORD_BYTES))
    }
}

/// Fills `count` STEs from `base` with abort entries.
fn write_abort_stes<P: PhysToVirt + ?Sized>(phys: &P, base: u64, count: u64) {
    let words = STE_BYTES / WORD_BYTES;
    for ste in 0..count {
        let pa = base + ste * STE_BYTES;
        write_word(phys, pa, SteConfig::abort_word0());
        for word in 1..words {
            write_word(phys, pa + word * WORD_BYTES, 0);
        }
    }
}

/// Span and L2Ptr of an L1 descriptor, for the fake SMMU's walker.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn l1_descriptor_fields(value: u64) -> (u64, u64) {
    (L1_SPAN.get(value), value & L1_L2PTR)
}
