//! Live update, the arch-neutral parts (`shared/DESIGN.md` §3-5): the state
//! records that cross the update, the preserved-memory map, and how an
//! update request is checked.
//!
//! The records are `kho` state records: versioned, checksummed, fields
//! declared once. The arch code fills a vCPU's register context into an
//! opaque byte array with its own format number, so this module needs no
//! arch knowledge.

use core::fmt;
use core::ops::Range;

use kho::state_record;
use loader::image_desc::{self, Descriptor, ImageArch, ImageError};
use sparse_bitmap::{Fit, MultiOrderBitmap, PageSize};

use crate::frames::{FrameAllocator, PAGE_SIZE};
use crate::stage2;

/// Bytes reserved for a vCPU's register context in [`VcpuRecord`].
pub const CONTEXT_BYTES: usize = 2048;
/// Bytes of a partition's command line kept for SYSTEM_RESET.
pub const CMDLINE_BYTES: usize = 256;

state_record! {
    /// The hypervisor-wide state: when the blackout started and what the
    /// outgoing image measured.
    pub struct HvRecord {
        const ID = 0x0001_0001;
        const NAME = "hv";
        const VERSION = 1;
        const MIN_READER_VERSION = 1;
        /// Counter value (CNTVCT / TSC) when the first vCPU was stopped.
        pub freeze_counter: u64 [since 1],
        /// The counter's frequency in Hz.
        pub counter_hz: u64 [since 1],
        pub cpus: u32 [since 1],
        pub partitions: u32 [since 1],
        pub vcpus: u32 [since 1],
        /// Guest images that must not be freed (SYSTEM_RESET reloads them).
        pub images_preserved: bool [since 1],
    }
}

state_record! {
    /// One partition.
    pub struct PartitionRecord {
        const ID = 0x0001_0002;
        const NAME = "partition";
        const VERSION = 1;
        const MIN_READER_VERSION = 1;
        pub id: u32 [since 1],
        pub name: [u8; 32] [since 1],
        pub privileged: bool [since 1],
        /// `hvcall::PartitionState` as its wire value.
        pub state: u32 [since 1],
        pub ram_host_base: u64 [since 1],
        pub ram_size: u64 [since 1],
        pub stage2_root: u64 [since 1],
        pub vmid: u32 [since 1],
        pub vcpus: u32 [since 1],
        /// `loader::manifest::ImageFormat` as 0 flat, 1 arm64 Image, 2 ELF.
        pub image_format: u32 [since 1],
        pub image_base: u64 [since 1],
        pub image_size: u64 [since 1],
        pub initrd_base: u64 [since 1],
        pub initrd_size: u64 [since 1],
        pub cmdline_len: u32 [since 1],
        pub cmdline: [u8; CMDLINE_BYTES] [since 1],
    }
}

state_record! {
    /// One vCPU: scheduling state plus the arch register context.
    pub struct VcpuRecord {
        const ID = 0x0001_0003;
        const NAME = "vcpu";
        const VERSION = 1;
        const MIN_READER_VERSION = 1;
        pub partition: u32 [since 1],
        pub index: u32 [since 1],
        /// Physical CPU it is pinned to.
        pub pcpu: u32 [since 1],
        /// `sched::VcpuState` as 0 off, 1 runnable, 2 waiting, 3 stopped.
        pub state: u32 [since 1],
        /// Virtual interrupts not yet injected.
        pub pending: u32 [since 1],
        /// Identifies the layout of `context` (arch and version).
        pub context_format: u32 [since 1],
        pub context_len: u32 [since 1],
        pub context: [u8; CONTEXT_BYTES] [since 1],
    }
}

/// Most SMMU stream assignments the handover carries.
pub const MAX_IOMMU_ASSIGNMENTS: usize = 16;
/// Bytes per assignment in [`IommuRecord::assignments`]: stream id (u32),
/// VMID (u16), 2 reserved, stage-2 root (u64); little-endian.
const ASSIGNMENT_BYTES: usize = 16;

state_record! {
    /// The SMMUv3 driver's state (`iommu::SmmuState`): where its stream
    /// table and queues are, and which streams are assigned. The next image
    /// adopts the running SMMU from it without resetting it.
    pub struct IommuRecord {
        const ID = 0x0001_0004;
        const NAME = "smmu";
        const VERSION = 1;
        const MIN_READER_VERSION = 1;
        pub strtab_base: u64 [since 1],
        pub strtab_format: u32 [since 1],
        pub strtab_split: u32 [since 1],
        pub strtab_log2size: u32 [since 1],
        pub cmdq_base: u64 [since 1],
        pub cmdq_log2size: u32 [since 1],
        pub cmdq_prod: u32 [since 1],
        pub cmdq_cons: u32 [since 1],
        pub evtq_base: u64 [since 1],
        pub evtq_log2size: u32 [since 1],
        pub evtq_cons: u32 [since 1],
        pub assignment_count: u32 [since 1],
        pub assignments: [u8; MAX_IOMMU_ASSIGNMENTS * ASSIGNMENT_BYTES] [since 1],
    }
}

impl IommuRecord {
    /// Encodes the driver state; `None` if it has too many assignments.
    pub fn from_state(s: &iommu::SmmuState) -> Option<Self> {
        if s.assignments.len() > MAX_IOMMU_ASSIGNMENTS {
            return None;
        }
        let mut assignments = [0u8; MAX_IOMMU_ASSIGNMENTS * ASSIGNMENT_BYTES];
        for (a, chunk) in s.assignments.iter().zip(assignments.chunks_exact_mut(ASSIGNMENT_BYTES)) {
            chunk[..4].copy_from_slice(&a.stream_id.to_le_bytes());
            chunk[4..6].copy_from_slice(&a.vmid.to_le_bytes());
            chunk[8..].copy_from_slice(&a.s2_root.to_le_bytes());
        }
        Some(Self {
            strtab_base: s.strtab_base,
            strtab_format: u32::from(s.strtab_format),
            strtab_split: u32::from(s.strtab_split),
            strtab_log2size: u32::from(s.strtab_log2size),
            cmdq_base: s.cmdq_base,
            cmdq_log2size: u32::from(s.cmdq_log2size),
            cmdq_prod: s.cmdq_prod,
            cmdq_cons: s.cmdq_cons,
            evtq_base: s.evtq_base,
            evtq_log2size: u32::from(s.evtq_log2size),
            evtq_cons: s.evtq_cons,
            assignment_count: s.assignments.len() as u32,
            assignments,
        })
    }

    /// Decodes the driver state; `None` if a field is out of range. The
    /// driver's `adopt` validates the addresses against the live SMMU.
    pub fn to_state(&self) -> Option<iommu::SmmuState> {
        let small = |v: u32| u8::try_from(v).ok();
        let count = usize::try_from(self.assignment_count).ok().filter(|&n| n <= MAX_IOMMU_ASSIGNMENTS)?;
        let assignments = self
            .assignments
            .chunks_exact(ASSIGNMENT_BYTES)
            .take(count)
            .map(|c| {
                let mut sid = [0u8; 4];
                let mut vmid = [0u8; 2];
                let mut root = [0u8; 8];
                sid.copy_from_slice(&c[..4]);
                vmid.copy_from_slice(&c[4..6]);
                root.copy_from_slice(&c[8..]);
                iommu::Assignment {
                    stream_id: u32::from_le_bytes(sid),
                    vmid: u16::from_le_bytes(vmid),
                    s2_root: u64::from_le_bytes(root),
                }
            })
            .collect();
        Some(iommu::SmmuState {
            strtab_base: self.strtab_base,
            strtab_format: small(self.strtab_format)?,
            strtab_split: small(self.strtab_split)?,
            strtab_log2size: small(self.strtab_log2size)?,
            cmdq_base: self.cmdq_base,
            cmdq_log2size: small(self.cmdq_log2size)?,
            cmdq_prod: self.cmdq_prod,
            cmdq_cons: self.cmdq_cons,
            evtq_base: self.evtq_base,
            evtq_log2size: small(self.evtq_log2size)?,
            evtq_cons: self.evtq_cons,
            assignments,
        })
    }
}

/// Why an update request is refused before anything changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestError {
    Image(ImageError),
    /// The image does not fit the scratch staging area.
    NoScratch,
}

impl RequestError {
    /// Token for `hv: update-refused reason=...`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Image(e) => e.reason(),
            Self::NoScratch => "no-scratch",
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Image(e) => write!(f, "{e}"),
            Self::NoScratch => write!(f, "no scratch region to stage the image in"),
        }
    }
}

/// Checks a new image (copied out of guest memory) against what is running.
pub fn check_request(image: &[u8], arch: ImageArch, staging_bytes: u64) -> Result<Descriptor, RequestError> {
    if staging_bytes == 0 {
        return Err(RequestError::NoScratch);
    }
    image_desc::validate(image, arch, crate::HANDOVER_ABI_MAX, staging_bytes).map_err(RequestError::Image)
}

/// The blackout in microseconds between two counter values.
pub fn blackout_us(start: u64, end: u64, hz: u64) -> u64 {
    if hz == 0 {
        return 0;
    }
    (u128::from(end.wrapping_sub(start)) * 1_000_000 / u128::from(hz)) as u64
}

/// Fixed-size text field from a string (truncated, NUL-padded).
pub fn text_field<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let n = s.len().min(N);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
    out
}

/// The string in a NUL-padded field (empty if not UTF-8).
pub fn field_text(field: &[u8]) -> &str {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    core::str::from_utf8(&field[..end]).unwrap_or("")
}

/// Identity phys→virt for the bitmap: the hypervisor maps RAM 1:1.
#[derive(Clone, Copy, Debug)]
pub struct IdentityPages;

// SAFETY: RAM is identity-mapped read-write at EL2/long mode for the
// hypervisor's whole life, and bitmap node pages come from the frame
// allocator (or the preserved map), which hands each page to one owner.
unsafe impl sparse_bitmap::PhysToVirt for IdentityPages {
    fn phys_to_virt(&self, pa: u64) -> *mut u8 {
        pa as *mut u8
    }
}

// SAFETY: as for `stage2::FrameSource`: each frame is free RAM handed to one
// owner at a time.
unsafe impl sparse_bitmap::FrameSource for FrameAllocator {
    fn alloc_frame(&mut self) -> Option<u64> {
        <Self as stage2::FrameSource>::alloc_frame(self)
    }

    fn free_frame(&mut self, pa: u64) {
        <Self as stage2::FrameSource>::free_frame(self, pa);
    }
}

/// Errors recording preserved memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreserveError(pub sparse_bitmap::Error);

impl fmt::Display for PreserveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "preserved-memory map: {:?}", self.0)
    }
}

/// Everything that must survive an update, recorded when it is allocated
/// (never in a pass at update time): guest RAM at the largest orders, one
/// bit per stage-2 table page, guest images.
pub struct PreservedMap<M: sparse_bitmap::PhysToVirt + Clone> {
    pub bitmap: MultiOrderBitmap<M>,
}

impl<M: sparse_bitmap::PhysToVirt + Clone> fmt::Debug for PreservedMap<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreservedMap").field("frames", &self.bitmap.frame_count()).finish_non_exhaustive()
    }
}

impl<M: sparse_bitmap::PhysToVirt + Clone> PreservedMap<M> {
    pub fn new(mapper: M) -> Self {
        Self { bitmap: MultiOrderBitmap::new(mapper) }
    }

    /// Records `range` (page-rounded outwards) at the largest orders.
    pub fn preserve<F: sparse_bitmap::FrameSource + ?Sized>(
        &mut self,
        frames: &mut F,
        range: Range<u64>,
    ) -> Result<(), PreserveError> {
        let start = range.start & !(PAGE_SIZE - 1);
        let end = range.end.next_multiple_of(PAGE_SIZE);
        self.bitmap.insert_range(frames, start..end, Fit::Largest).map_err(PreserveError)
    }

    pub fn preserve_page<F: sparse_bitmap::FrameSource + ?Sized>(
        &mut self,
        frames: &mut F,
        pa: u64,
    ) -> Result<(), PreserveError> {
        self.bitmap.insert(frames, pa, PageSize::Size4KiB).map_err(PreserveError)
    }

    pub fn release_page<F: sparse_bitmap::FrameSource + ?Sized>(
        &mut self,
        frames: &mut F,
        pa: u64,
    ) -> Result<(), PreserveError> {
        self.bitmap.remove(frames, pa, PageSize::Size4KiB).map_err(PreserveError)
    }
}

/// A frame source for second-stage tables that records every page it hands
/// out in the preserved map, so the tables survive an update.
pub struct PreservingFrames<'a, M: sparse_bitmap::PhysToVirt + Clone> {
    pub frames: &'a mut FrameAllocator,
    pub map: &'a mut PreservedMap<M>,
}

impl<M: sparse_bitmap::PhysToVirt + Clone> fmt::Debug for PreservingFrames<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreservingFrames").finish_non_exhaustive()
    }
}

// SAFETY: forwards to the frame allocator (which upholds the contract) and
// only adds bookkeeping.
unsafe impl<M: sparse_bitmap::PhysToVirt + Clone> stage2::FrameSource for PreservingFrames<'_, M> {
    fn alloc_frame(&mut self) -> Option<u64> {
        let pa = <FrameAllocator as stage2::FrameSource>::alloc_frame(self.frames)?;
        if self.map.preserve_page(self.frames, pa).is_err() {
            <FrameAllocator as stage2::FrameSource>::free_frame(self.frames, pa);
            return None;
        }
        Some(pa)
    }

    fn free_frame(&mut self, pa: u64) {
        let _ = self.map.release_page(self.frames, pa);
        <FrameAllocator as stage2::FrameSource>::free_frame(self.frames, pa);
    }
}

// SAFETY: runs of pages come from the frame allocator (one owner each), are
// recorded as preserved, and are naturally aligned to at least `align`.
unsafe impl<M: sparse_bitmap::PhysToVirt + Clone> iommu::FrameSource for PreservingFrames<'_, M> {
    fn alloc_pages(&mut self, count: usize, align: u64) -> Option<u64> {
        let bytes = (count as u64).checked_mul(PAGE_SIZE)?.max(align);
        let block = self.frames.alloc_block(bytes)?;
        if self.map.preserve(self.frames, block.base..block.base + block.size).is_err() {
            self.frames.free_block(block);
            return None;
        }
        Some(block.base)
    }

    fn free_pages(&mut self, pa: u64, count: usize) {
        // Blocks are powers of two of at least `count` pages; `alloc_pages`
        // was asked for no stricter alignment than that by the driver.
        let size = (count as u64 * PAGE_SIZE).next_power_of_two();
        let _ = self.map.bitmap.remove_range(self.frames, pa..pa + size);
        self.frames.free_block(loader::PhysRange::new(pa, size));
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use kho::StateRecord;
    use loader::PhysRange;

    #[test]
    fn records_round_trip() {
        let mut v = VcpuRecord {
            partition: 2,
            index: 1,
            pcpu: 1,
            state: 2,
            pending: 1 << 16,
            context_format: 0xa64_0001,
            context_len: 3,
            context: [0; CONTEXT_BYTES],
        };
        v.context[..3].copy_from_slice(&[1, 2, 3]);
        let bytes = v.encode();
        assert_eq!(VcpuRecord::decode(&bytes).unwrap(), v);
        let p = PartitionRecord {
            id: 1,
            name: text_field("heartbeat"),
            privileged: true,
            state: 0,
            ram_host_base: 0x4900_0000,
            ram_size: 16 << 20,
            stage2_root: 0x5fe0_1000,
            vmid: 1,
            vcpus: 1,
            image_format: 0,
            image_base: 0x5fe1_0000,
            image_size: 0x3000,
            initrd_base: 0,
            initrd_size: 0,
            cmdline_len: 9,
            cmdline: text_field("ticks=100"),
        };
        let decoded = PartitionRecord::decode(&p.encode()).unwrap();
        assert_eq!(field_text(&decoded.name), "heartbeat");
        assert_eq!(field_text(&decoded.cmdline), "ticks=100");
    }

    #[test]
    fn iommu_record_round_trip() {
        let state = iommu::SmmuState {
            strtab_base: 0x4800_0000,
            strtab_format: 1,
            strtab_split: 8,
            strtab_log2size: 16,
            cmdq_base: 0x4801_0000,
            cmdq_log2size: 8,
            cmdq_prod: 5,
            cmdq_cons: 5,
            evtq_base: 0x4802_0000,
            evtq_log2size: 7,
            evtq_cons: 2,
            assignments: std::vec![iommu::Assignment { stream_id: 0x10, vmid: 7, s2_root: 0x5fc0_7000 }],
        };
        let rec = IommuRecord::from_state(&state).unwrap();
        let back = IommuRecord::decode(&rec.encode()).unwrap();
        assert_eq!(back.to_state().unwrap(), state);
        let bad = IommuRecord { strtab_split: 300, ..back.clone() };
        assert!(bad.to_state().is_none());
        let bad = IommuRecord { assignment_count: 99, ..back };
        assert!(bad.to_state().is_none());
    }

    #[test]
    fn blackout_arithmetic() {
        assert_eq!(blackout_us(1000, 63_500, 62_500_000), 1000);
        assert_eq!(blackout_us(u64::MAX - 10, 52, 1_000_000), 63);
        assert_eq!(blackout_us(0, 100, 0), 0);
    }

    #[test]
    fn request_refuses_bad_images() {
        let mut img = std::vec![0u8; 8192];
        img[64..64 + image_desc::DESCRIPTOR_LEN].copy_from_slice(&image_desc::descriptor(
            ImageArch::Aarch64,
            1,
            1,
            "9.9.9",
            "x",
        ));
        image_desc::seal(&mut img).unwrap();
        assert_eq!(check_request(&img, ImageArch::Aarch64, 1 << 20).unwrap().version_str(), "9.9.9");
        assert_eq!(check_request(&img, ImageArch::Aarch64, 0), Err(RequestError::NoScratch));
        assert_eq!(check_request(&img, ImageArch::X86_64, 1 << 20).unwrap_err().reason(), "wrong-arch");
        assert_eq!(check_request(&img[..4096], ImageArch::Aarch64, 1 << 20).unwrap_err().reason(), "size-mismatch");
        assert_eq!(check_request(&img, ImageArch::Aarch64, 4096).unwrap_err().reason(), "too-large");
    }

    #[test]
    fn stage2_pages_are_preserved_as_they_are_allocated() {
        let arena = sparse_bitmap::testing::Arena::new(0x4000_0000, (64 << 20) / 4096);
        let mapper = &arena;
        let mut frames = FrameAllocator::new(&[PhysRange::new(0x4000_0000, 64 << 20)]);
        let mut map = PreservedMap::new(mapper);
        let guest = frames.alloc_block(16 << 20).unwrap();
        map.preserve(&mut frames, guest.base..guest.base + guest.size).unwrap();
        let before = map.bitmap.frame_count();
        let mut pf = PreservingFrames { frames: &mut frames, map: &mut map };
        let a = stage2::FrameSource::alloc_frame(&mut pf).unwrap();
        let b = stage2::FrameSource::alloc_frame(&mut pf).unwrap();
        assert!(map.bitmap.contains(a) && map.bitmap.contains(b));
        assert_eq!(map.bitmap.frame_count(), before + 2);
        // 16 MiB of guest RAM costs 8 bits at 2 MiB order, not 4096.
        assert_eq!(map.bitmap.tree(PageSize::Size2MiB).count(), 8);
        let mut pf = PreservingFrames { frames: &mut frames, map: &mut map };
        stage2::FrameSource::free_frame(&mut pf, a);
        assert!(!map.bitmap.contains(a));
    }
}
