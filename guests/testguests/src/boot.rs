//! What a guest learns at boot: its RAM from the DTB `/memory` node, its
//! arguments from `/chosen` `bootargs`, and which of its pages are in use
//! (image, stack, DTB). The DTB is untrusted input, validated here.

use core::fmt;

use fdt::Fdt;

use crate::args::{ArgError, Args};
use crate::Line;

pub const PAGE_SIZE: u64 = 4096;

/// FDT header (Devicetree Specification v0.4 §5.2): big-endian `magic` at
/// offset 0 and `totalsize` at offset 4, in a 40-byte header.
pub const FDT_HEADER_LEN: usize = 40;
const FDT_MAGIC: u32 = 0xd00d_feed;
/// Generated guest DTBs are a few KiB; refuse anything absurd before
/// reading it.
pub const FDT_MAX_SIZE: usize = 2 << 20;

/// A half-open range of guest-physical addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
}

impl Region {
    pub const fn new(start: u64, end: u64) -> Self {
        Self { start, end }
    }

    pub const fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// Grown to whole pages.
    #[must_use]
    pub const fn pages_outward(&self) -> Self {
        Self { start: self.start & !(PAGE_SIZE - 1), end: self.end.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1) }
    }

    /// Shrunk to whole pages.
    #[must_use]
    pub const fn pages_inward(&self) -> Self {
        Self { start: self.start.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1), end: self.end & !(PAGE_SIZE - 1) }
    }
}

/// The pieces of a region left after removing holes: at most one more
/// piece than there are holes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionList {
    items: [Region; Self::CAPACITY],
    len: usize,
}

impl RegionList {
    pub const CAPACITY: usize = 4;

    /// `whole` minus `holes`, in address order, empty pieces dropped.
    /// Holes past the capacity are refused (`None`).
    pub fn subtract(whole: Region, holes: &[Region]) -> Option<Self> {
        if holes.len() >= Self::CAPACITY {
            return None;
        }
        let mut list = Self { items: [Region::default(); Self::CAPACITY], len: 0 };
        if !whole.is_empty() {
            list.items[0] = whole;
            list.len = 1;
        }
        for hole in holes.iter().filter(|h| !h.is_empty()) {
            let mut next = Self { items: [Region::default(); Self::CAPACITY], len: 0 };
            for piece in list.as_slice() {
                for part in [
                    Region::new(piece.start, hole.start.min(piece.end)),
                    Region::new(hole.end.max(piece.start), piece.end),
                ] {
                    if !part.is_empty() {
                        next.items[next.len] = part;
                        next.len += 1;
                    }
                }
            }
            list = next;
        }
        Some(list)
    }

    pub fn as_slice(&self) -> &[Region] {
        &self.items[..self.len]
    }

    /// Total bytes.
    pub fn bytes(&self) -> u64 {
        self.as_slice().iter().map(Region::len).sum()
    }
}

/// Why a DTB was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtbError {
    BadMagic,
    BadSize,
    Malformed,
    NoMemoryNode,
    NoMemoryReg,
}

impl fmt::Display for DtbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BadMagic => "dtb-bad-magic",
            Self::BadSize => "dtb-bad-size",
            Self::Malformed => "dtb-malformed",
            Self::NoMemoryNode => "dtb-no-memory-node",
            Self::NoMemoryReg => "dtb-no-memory-reg",
        })
    }
}

/// The DTB's total size from its header, checked before the rest of the
/// blob is read.
pub fn dtb_total_size(header: &[u8; FDT_HEADER_LEN]) -> Result<usize, DtbError> {
    let be32 = |at: usize| u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
    if be32(0) != FDT_MAGIC {
        return Err(DtbError::BadMagic);
    }
    let size = be32(4) as usize;
    if !(FDT_HEADER_LEN..=FDT_MAX_SIZE).contains(&size) {
        return Err(DtbError::BadSize);
    }
    Ok(size)
}

/// What the DTB tells a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DtbInfo<'a> {
    /// The first `/memory` region.
    pub ram: Region,
    /// `/chosen` `bootargs`, empty if absent.
    pub bootargs: &'a str,
}

/// Reads `/memory` and `/chosen` through `find_node` (the `fdt` crate's
/// `memory()` and `chosen()` panic when a node is missing).
pub fn parse_dtb(blob: &[u8]) -> Result<DtbInfo<'_>, DtbError> {
    let fdt = Fdt::new(blob).map_err(|_| DtbError::Malformed)?;
    let memory = fdt.find_node("/memory").ok_or(DtbError::NoMemoryNode)?;
    let first = memory.reg().and_then(|mut regs| regs.next()).ok_or(DtbError::NoMemoryReg)?;
    let start = first.starting_address as u64;
    let size = first.size.ok_or(DtbError::NoMemoryReg)? as u64;
    let end = start.checked_add(size).ok_or(DtbError::NoMemoryReg)?;
    let bootargs = fdt
        .find_node("/chosen")
        .and_then(|chosen| chosen.property("bootargs"))
        .and_then(fdt::node::NodeProperty::as_str)
        .unwrap_or("");
    Ok(DtbInfo { ram: Region::new(start, end), bootargs })
}

/// Why a guest could not start its workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootError {
    /// x0 at entry is not an 8-byte aligned address past the image.
    DtbAddress(u64),
    Dtb(DtbError),
    /// The DTB or the image is not inside the RAM the DTB describes.
    OutsideRam(Region),
    Args(ArgError),
}

impl From<DtbError> for BootError {
    fn from(e: DtbError) -> Self {
        Self::Dtb(e)
    }
}

impl From<ArgError> for BootError {
    fn from(e: ArgError) -> Self {
        Self::Args(e)
    }
}

impl BootError {
    /// `boot error=<kind> ...`, the guest's last line before it stops.
    pub fn line(&self) -> Line {
        let mut line = Line::event("boot");
        match self {
            Self::DtbAddress(addr) => line.field("error", "dtb-address").hex("addr", *addr),
            Self::Dtb(e) => line.field("error", e),
            Self::OutsideRam(r) => line.field("error", "outside-ram").hex("start", r.start).hex("end", r.end),
            Self::Args(e) => line.field("error", e).field("key", e.key()),
        };
        line
    }
}

/// The layout a workload runs in, checked: RAM from the DTB, which must
/// hold both the image and the DTB itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootLayout {
    pub ram: Region,
    /// The image (code, data, bss, stack) and the DTB.
    pub in_use: [Region; 2],
    pub args: Args,
}

impl BootLayout {
    /// `blob` is the DTB found at `dtb` (its header already checked with
    /// [`dtb_total_size`]); `image` is what the guest image occupies.
    pub fn new(dtb: Region, blob: &[u8], image: Region) -> Result<Self, BootError> {
        let info = parse_dtb(blob)?;
        for used in [dtb, image] {
            if used.start < info.ram.start || used.end > info.ram.end {
                return Err(BootError::OutsideRam(used));
            }
        }
        let args = Args::parse(info.bootargs)?;
        Ok(Self { ram: info.ram, in_use: [image, dtb], args })
    }
}

/// A workload's view of its guest: RAM, the parts of it in use, arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Env {
    ram: Region,
    in_use: [Region; 2],
    args: Args,
    owns_free_ram: bool,
}

impl Env {
    /// An environment whose free RAM workloads may not touch (memcheck
    /// refuses to run).
    pub fn new(ram: Region, in_use: [Region; 2], args: Args) -> Self {
        Self { ram, in_use, args, owns_free_ram: false }
    }

    /// An environment whose free RAM memcheck may overwrite.
    ///
    /// # Safety
    ///
    /// Every byte of `ram` outside the pages of `in_use` must be memory
    /// that is identity-mapped (address = guest-physical address), readable
    /// and writable, and used by nothing else for the life of the program.
    pub unsafe fn with_free_ram(ram: Region, in_use: [Region; 2], args: Args) -> Self {
        Self { ram, in_use, args, owns_free_ram: true }
    }

    pub fn ram(&self) -> Region {
        self.ram
    }

    /// The guest's own image (text to the end of bss).
    pub fn image(&self) -> Region {
        self.in_use[0]
    }

    pub fn args(&self) -> &Args {
        &self.args
    }

    /// RAM minus the pages in use, in whole pages; `None` unless built
    /// with [`Env::with_free_ram`].
    pub fn free_ram(&self) -> Option<RegionList> {
        if !self.owns_free_ram {
            return None;
        }
        let holes = self.in_use.map(|r| r.pages_outward());
        let list = RegionList::subtract(self.ram.pages_inward(), &holes)?;
        Some(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `testdata/guest.dts`, compiled with `dtc -O dtb`.
    const GUEST_DTB: &[u8] = include_bytes!("../testdata/guest.dtb");
    /// `testdata/bare.dts`: no `/chosen`, 32-bit cells.
    const BARE_DTB: &[u8] = include_bytes!("../testdata/bare.dtb");
    /// `testdata/no-memory.dts`.
    const NO_MEMORY_DTB: &[u8] = include_bytes!("../testdata/no-memory.dtb");

    fn header(blob: &[u8]) -> [u8; FDT_HEADER_LEN] {
        blob[..FDT_HEADER_LEN].try_into().unwrap()
    }

    #[test]
    fn reads_memory_and_bootargs() {
        assert_eq!(dtb_total_size(&header(GUEST_DTB)), Ok(GUEST_DTB.len()));
        let info = parse_dtb(GUEST_DTB).unwrap();
        assert_eq!(info.ram, Region::new(0x4000_0000, 0x4100_0000));
        assert_eq!(info.bootargs, "ticks=40 passes=2 privileged=1");
        assert_eq!(Args::parse(info.bootargs).unwrap().ticks, Some(40));
    }

    #[test]
    fn missing_chosen_means_no_arguments() {
        let info = parse_dtb(BARE_DTB).unwrap();
        assert_eq!(info.ram, Region::new(0x4000_0000, 0x4080_0000));
        assert_eq!(info.bootargs, "");
    }

    #[test]
    fn refuses_bad_blobs() {
        assert_eq!(parse_dtb(NO_MEMORY_DTB), Err(DtbError::NoMemoryNode));
        assert_eq!(parse_dtb(&GUEST_DTB[..GUEST_DTB.len() - 1]), Err(DtbError::Malformed));
        let mut bad = header(GUEST_DTB);
        bad[0] = 0;
        assert_eq!(dtb_total_size(&bad), Err(DtbError::BadMagic));
        let mut huge = header(GUEST_DTB);
        huge[4..8].copy_from_slice(&(64_u32 << 20).to_be_bytes());
        assert_eq!(dtb_total_size(&huge), Err(DtbError::BadSize));
        huge[4..8].copy_from_slice(&8_u32.to_be_bytes());
        assert_eq!(dtb_total_size(&huge), Err(DtbError::BadSize));
    }

    #[test]
    fn boot_layout_checks_what_the_guest_occupies() {
        let image = Region::new(0x4000_0000, 0x4002_3000);
        let dtb = Region::new(0x40ff_f000, 0x40ff_f000 + GUEST_DTB.len() as u64);
        let layout = BootLayout::new(dtb, GUEST_DTB, image).unwrap();
        assert_eq!(layout.ram, Region::new(0x4000_0000, 0x4100_0000));
        assert_eq!(layout.in_use, [image, dtb]);
        assert!(layout.args.privileged);

        let past_end = Region::new(0x4100_0000, 0x4100_1000);
        assert_eq!(BootLayout::new(past_end, GUEST_DTB, image), Err(BootError::OutsideRam(past_end)));
        let low_image = Region::new(0x3fff_f000, 0x4000_1000);
        assert_eq!(BootLayout::new(dtb, GUEST_DTB, low_image), Err(BootError::OutsideRam(low_image)));
        assert_eq!(BootLayout::new(dtb, NO_MEMORY_DTB, image), Err(BootError::Dtb(DtbError::NoMemoryNode)));
    }

    #[test]
    fn boot_error_lines() {
        assert_eq!(BootError::DtbAddress(3).line().text(), "boot error=dtb-address addr=0x3");
        assert_eq!(BootError::Dtb(DtbError::BadMagic).line().text(), "boot error=dtb-bad-magic");
        let args = BootError::from(Args::parse("ticks=x").unwrap_err());
        assert_eq!(args.line().text(), "boot error=invalid-number key=ticks");
        let outside = BootError::OutsideRam(Region::new(0x10, 0x20));
        assert_eq!(outside.line().text(), "boot error=outside-ram start=0x10 end=0x20");
    }

    #[test]
    fn page_rounding() {
        let r = Region::new(0x1001, 0x2fff);
        assert_eq!(r.pages_outward(), Region::new(0x1000, 0x3000));
        assert_eq!(r.pages_inward(), Region::new(0x2000, 0x2000));
        assert!(r.pages_inward().is_empty());
        assert_eq!(Region::new(5, 3).len(), 0);
        assert!(r.contains(0x1001) && !r.contains(0x2fff));
    }

    #[test]
    fn subtracts_holes() {
        let ram = Region::new(0x4000_0000, 0x4100_0000);
        let image = Region::new(0x4000_0000, 0x4002_3000);
        let dtb = Region::new(0x40ff_e000, 0x4100_0000);
        let free = RegionList::subtract(ram, &[image, dtb]).unwrap();
        assert_eq!(free.as_slice(), &[Region::new(0x4002_3000, 0x40ff_e000)]);
        assert_eq!(free.bytes(), 0x40ff_e000 - 0x4002_3000);

        let middle = RegionList::subtract(ram, &[Region::new(0x4010_0000, 0x4020_0000), Region::default()]).unwrap();
        assert_eq!(middle.as_slice(), &[Region::new(0x4000_0000, 0x4010_0000), Region::new(0x4020_0000, 0x4100_0000)]);

        let outside =
            RegionList::subtract(ram, &[Region::new(0, 0x1000), Region::new(0x5000_0000, 0x6000_0000)]).unwrap();
        assert_eq!(outside.as_slice(), &[ram]);

        let all = RegionList::subtract(ram, &[Region::new(0, u64::MAX)]).unwrap();
        assert!(all.as_slice().is_empty());

        let two =
            RegionList::subtract(ram, &[Region::new(0x4010_0000, 0x4011_0000), Region::new(0x4080_0000, 0x4081_0000)]);
        assert_eq!(two.unwrap().as_slice().len(), 3);
        assert_eq!(RegionList::subtract(ram, &[Region::default(); 4]), None);
    }

    #[test]
    fn free_ram_needs_ownership_and_rounds_holes_out() {
        let ram = Region::new(0x4000_0000, 0x4001_0000);
        let in_use = [Region::new(0x4000_0000, 0x4000_0800), Region::new(0x4000_f100, 0x4000_f200)];
        assert_eq!(Env::new(ram, in_use, Args::default()).free_ram(), None);
        // SAFETY: free_ram() only computes ranges; nothing is accessed.
        let env = unsafe { Env::with_free_ram(ram, in_use, Args::default()) };
        let free = env.free_ram().unwrap();
        assert_eq!(free.as_slice(), &[Region::new(0x4000_1000, 0x4000_f000)]);
    }
}
