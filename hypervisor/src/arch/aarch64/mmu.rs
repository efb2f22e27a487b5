//! The hypervisor's own EL2 stage-1 translation: an identity map built with
//! `aarch64-paging`, with intention-named mappings (code, read-only data,
//! data, device).
//!
//! Register values: Arm ARM D19.2 (MAIR_EL2, TCR_EL2, SCTLR_EL2), non-VHE
//! (HCR_EL2.E2H = 0) layouts.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use aarch64_paging::descriptor::El23Attributes as Attr;
use aarch64_paging::idmap::IdMap;
use aarch64_paging::paging::{El2, MemoryRegion};
use aarch64_paging::MapError;
use alloc::boxed::Box;

/// MAIR_EL2 attribute 0: Normal, inner/outer write-back RW-allocate;
/// attribute 1: Device-nGnRE.
const MAIR_VALUE: u64 = 0xff | (0x04 << 8);
const NORMAL: Attr = Attr::ATTRIBUTE_INDEX_0.union(Attr::INNER_SHAREABLE);
const DEVICE: Attr = Attr::ATTRIBUTE_INDEX_1;
/// Attributes every valid EL2 leaf carries. AP[1] is RES1 in the EL2
/// regime (Arm ARM D8.4.1.2.1).
const LEAF: Attr = Attr::VALID.union(Attr::ACCESSED).union(Attr::USER_RES1);

/// TCR_EL2: T0SZ = 16 (48-bit VA), IRGN0/ORGN0 = WB RA WA, SH0 = inner,
/// TG0 = 4 KiB, RES1 bits 31 and 23; PS is filled in from PARange.
const TCR_T0SZ_48: u64 = 16;
const TCR_IRGN0_WB: u64 = 1 << 8;
const TCR_ORGN0_WB: u64 = 1 << 10;
const TCR_SH0_INNER: u64 = 3 << 12;
const TCR_RES1: u64 = (1 << 31) | (1 << 23);
const TCR_PS_SHIFT: u64 = 16;
/// PS encodes at most 48 bits (0b101) for a 48-bit VA with 4 KiB granule.
const PS_48_BITS: u64 = 0b101;

/// SCTLR_EL2: M (bit 0), C (bit 2), I (bit 12); RES1 bits 4, 5, 11, 16, 18,
/// 22, 23, 28, 29.
const SCTLR_M: u64 = 1 << 0;
const SCTLR_C: u64 = 1 << 2;
const SCTLR_I: u64 = 1 << 12;
const SCTLR_RES1: u64 = 0x30c5_0830;

/// Root level 0: 48-bit VA, enough for the high PCIe ECAM and RAM.
const ROOT_LEVEL: usize = 0;

static TTBR0: AtomicU64 = AtomicU64::new(0);
static TCR: AtomicU64 = AtomicU64::new(0);

/// The live map, once activated: [`set_executable`] changes it.
static LIVE: spin::Mutex<Option<LiveMap>> = spin::Mutex::new(None);

struct LiveMap(&'static mut IdMap<El2>);

// SAFETY: the map is only reached through `LIVE`'s lock; its tables are
// identity-mapped memory that any CPU may write under that lock.
unsafe impl Send for LiveMap {}

pub struct HostMap {
    map: IdMap<El2>,
}

// SAFETY: a map being built is owned by one CPU at a time (the brownout's
// `prepare` builds it, the boot CPU takes it at entry); its tables are
// heap memory of this image.
unsafe impl Send for HostMap {}

fn region(base: u64, size: u64) -> MemoryRegion {
    MemoryRegion::new(base as usize, (base + size) as usize)
}

impl HostMap {
    pub fn new() -> Self {
        Self { map: IdMap::new(ROOT_LEVEL, El2) }
    }

    pub fn map_code(&mut self, base: u64, size: u64) -> Result<(), MapError> {
        self.map.map_range(&region(base, size), LEAF | NORMAL | Attr::READ_ONLY)
    }

    pub fn map_rodata(&mut self, base: u64, size: u64) -> Result<(), MapError> {
        self.map.map_range(&region(base, size), LEAF | NORMAL | Attr::READ_ONLY | Attr::XN)
    }

    pub fn map_data(&mut self, base: u64, size: u64) -> Result<(), MapError> {
        self.map.map_range(&region(base, size), LEAF | NORMAL | Attr::XN)
    }

    pub fn map_device(&mut self, base: u64, size: u64) -> Result<(), MapError> {
        self.map.map_range(&region(base, size), LEAF | DEVICE | Attr::XN)
    }

    /// Programs MAIR/TCR/TTBR0_EL2 and turns the MMU and caches on for
    /// this CPU. The map lives for the rest of the image's life.
    pub fn activate(self) {
        let map = Box::leak(Box::new(self.map));
        let parange = parange();
        let tcr = TCR_T0SZ_48
            | TCR_IRGN0_WB
            | TCR_ORGN0_WB
            | TCR_SH0_INNER
            | TCR_RES1
            | (parange.min(PS_48_BITS) << TCR_PS_SHIFT);
        TCR.store(tcr, Ordering::Relaxed);
        // SAFETY: identity map: every address the image uses (image, stack,
        // heap, DTB, UART) maps to itself, so turning it on changes no
        // address; the table is leaked, so it is never freed while live.
        unsafe {
            write_mair_tcr(tcr);
            map.activate();
        }
        TTBR0.store(map.root_address().0 as u64, Ordering::Release);
        enable_mmu();
        *LIVE.lock() = Some(LiveMap(map));
    }
}

/// Why the live map could not be changed.
#[derive(Debug)]
pub enum LiveMapError {
    /// No map is active yet.
    NotActive,
    Map(MapError),
}

impl core::fmt::Display for LiveMapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotActive => f.write_str("no active map"),
            Self::Map(e) => write!(f, "{e}"),
        }
    }
}

/// Makes the mapped leaves covering `[base, base + size)` executable or
/// not (XN, Arm ARM D8.4.1.2.1) in the live map: a permission change, which
/// needs no break-before-make (D8.16.1); `aarch64-paging` invalidates each
/// changed entry's TLB entries (TLBI VAE2IS). The range should be block-
/// aligned where it is mapped by blocks: a block is changed whole.
pub fn set_executable(base: u64, size: u64, executable: bool) -> Result<(), LiveMapError> {
    let mut live = LIVE.lock();
    let Some(LiveMap(map)) = live.as_mut() else { return Err(LiveMapError::NotActive) };
    map.modify_range(&region(base, size), &|_, d| {
        if d.is_table() || !d.flags().contains(Attr::VALID) {
            return Ok(());
        }
        let flags = if executable { d.flags() - Attr::XN } else { d.flags() | Attr::XN };
        d.set(d.output_address(), flags)
    })
    .map_err(LiveMapError::Map)?;
    // SAFETY: barriers only: the changed entries are visible to the walker
    // and to this CPU's next instruction fetch.
    unsafe { asm!("dsb ish", "isb", options(nostack)) };
    Ok(())
}

/// Invalidates `[base, end)` in the data caches to the point of coherency
/// (DC IVAC, Arm ARM D7.5.9), by the smallest line size CTR_EL0 reports.
///
/// For memory this image wrote with its MMU off (data accesses are then
/// Device-nGnRnE and do not look up the caches): a line of the same
/// address may sit in a cache, clean, from the previous image's cacheable
/// view of it (its copy, its speculative fills), and reading through the
/// map once it is on would then return that line instead of what was
/// written (mismatched attributes, Arm ARM B2.8). No dirty line can be
/// there: the previous image cleaned every line of this image's slot after
/// it last wrote it (`live_update::place`, `prepare::call`), and a boot
/// loader must hand the image over cleaned. Linux does the same for what
/// its `head.S` writes with the MMU off.
pub fn invalidate_to_poc(base: u64, end: u64) {
    let ctr: u64;
    // SAFETY: reading CTR_EL0 has no side effects.
    unsafe { asm!("mrs {0}, ctr_el0", out(reg) ctr, options(nomem, nostack)) };
    let line = 4u64 << ((ctr >> 16) & 0xf);
    let mut at = base & !(line - 1);
    while at < end {
        // SAFETY: cache maintenance by address on memory of this image;
        // no dirty line is lost (see above).
        unsafe { asm!("dc ivac, {0}", in(reg) at, options(nostack)) };
        at += line;
    }
    // SAFETY: completes the maintenance before the MMU is turned on.
    unsafe { asm!("dsb sy", options(nostack)) };
}

/// Turns on the boot CPU's map on a secondary CPU.
pub fn activate_secondary() {
    let ttbr = TTBR0.load(Ordering::Acquire);
    let tcr = TCR.load(Ordering::Relaxed);
    // SAFETY: same identity map as the boot CPU, already populated.
    unsafe {
        write_mair_tcr(tcr);
        asm!("msr ttbr0_el2, {0}", "isb", in(reg) ttbr, options(nostack));
    }
    enable_mmu();
}

/// ID_AA64MMFR0_EL1.PARange: the physical address size (D19.2.64).
pub fn parange() -> u64 {
    read_id_aa64mmfr0() & 0xf
}

fn read_id_aa64mmfr0() -> u64 {
    let v: u64;
    // SAFETY: reading an ID register has no side effects.
    unsafe { asm!("mrs {0}, id_aa64mmfr0_el1", out(reg) v, options(nomem, nostack)) };
    v
}

/// # Safety
/// The MMU must be off, or the new values describe the live map.
unsafe fn write_mair_tcr(tcr: u64) {
    // SAFETY: per the function contract.
    unsafe {
        asm!("msr mair_el2, {0}", "msr tcr_el2, {1}", "isb", in(reg) MAIR_VALUE, in(reg) tcr, options(nostack));
    }
}

fn enable_mmu() {
    // SAFETY: TTBR0/TCR/MAIR_EL2 hold an identity map of everything in use;
    // stale TLB entries are invalidated before the switch.
    unsafe {
        asm!(
            "dsb ish",
            "tlbi alle2",
            "dsb ish",
            "isb",
            "msr sctlr_el2, {0}",
            "isb",
            in(reg) SCTLR_RES1 | SCTLR_M | SCTLR_C | SCTLR_I,
            options(nostack),
        );
    }
}
