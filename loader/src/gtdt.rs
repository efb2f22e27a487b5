//! The ACPI Generic Timer Description Table (GTDT, ACPI 6.5 §5.2.25), which
//! gives an Arm server's generic timer interrupts when it boots with ACPI
//! instead of a DTB (issue 21): the EL2 (hypervisor) timer and the EL1
//! virtual timer the guests use, as PPI interrupt ids, with their trigger
//! modes. The `acpi` crate knows only its signature; this parser takes the
//! table's bytes (header included) and validates them as untrusted input.
//! Platform timer structures (memory-mapped GT blocks, watchdogs) are
//! bounds-checked and counted, not interpreted.

use crate::bytes::{acpi_table, le32, le64, Framing};
use core::fmt;

/// Offsets in the table (§5.2.25, Table 5.121).
const SIGNATURE: &[u8; 4] = b"GTDT";
const REVISION_AT: usize = 8;
const CNT_CONTROL_BASE_AT: usize = 36;
const SECURE_EL1_AT: usize = 48;
const NONSECURE_EL1_AT: usize = 56;
const VIRTUAL_EL1_AT: usize = 64;
const EL2_AT: usize = 72;
const CNT_READ_BASE_AT: usize = 80;
const PLATFORM_COUNT_AT: usize = 88;
const PLATFORM_OFFSET_AT: usize = 92;
/// Revision 3 adds the virtual EL2 timer.
const VIRTUAL_EL2_AT: usize = 96;
/// The fixed part before and from revision 3.
const FIXED_V2: usize = 96;
const FIXED_V3: usize = 104;
/// A platform timer structure starts with its type (u8) and length (u16).
const PLATFORM_HEADER: usize = 3;
/// Bound on platform timer structures; real tables have a handful.
pub const MAX_PLATFORM_TIMERS: u32 = 64;
/// Private peripheral interrupts (GICv3 INTIDs 16-31): per-CPU timers
/// must be one.
const PPI: core::ops::RangeInclusive<u32> = 16..=31;

/// Why a GTDT is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GtdtError {
    /// Not a GTDT, or shorter than its revision's fixed part (or than its
    /// own length field).
    Truncated,
    BadSignature,
    /// A per-CPU timer the hypervisor needs is not a PPI: `which` timer.
    NotAPpi {
        which: &'static str,
        gsiv: u32,
    },
    /// The platform timer structures run past the table or overlap its
    /// fixed part.
    BadPlatformTimers,
}

impl fmt::Display for GtdtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("GTDT shorter than its fixed part"),
            Self::BadSignature => f.write_str("not a GTDT"),
            Self::NotAPpi { which, gsiv } => write!(f, "GTDT {which} timer interrupt {gsiv} is not a PPI"),
            Self::BadPlatformTimers => f.write_str("GTDT platform timer structures malformed"),
        }
    }
}

/// A per-CPU timer's interrupt (§5.2.25, Table 5.122 for the flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timer {
    /// The interrupt id (GSIV), 0 if the timer is not provided.
    pub gsiv: u32,
    pub flags: u32,
}

impl Timer {
    /// Edge-triggered (flags bit 0), else level.
    pub fn edge(self) -> bool {
        self.flags & 1 != 0
    }
    /// Active low (bit 1), else active high.
    pub fn active_low(self) -> bool {
        self.flags & 2 != 0
    }
    /// Keeps counting in low-power states (bit 2).
    pub fn always_on(self) -> bool {
        self.flags & 4 != 0
    }
}

/// The parsed table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gtdt {
    pub revision: u8,
    /// CNTControlBase (0xffff_ffff_ffff_ffff: not provided).
    pub cnt_control_base: u64,
    pub secure_el1: Timer,
    pub nonsecure_el1: Timer,
    pub virtual_el1: Timer,
    /// The EL2 physical timer: the hypervisor's own.
    pub el2: Timer,
    pub cnt_read_base: u64,
    /// Revision 3 and later.
    pub virtual_el2: Option<Timer>,
    pub platform_timers: u32,
}

fn timer(b: &[u8], at: usize) -> Timer {
    Timer { gsiv: le32(b, at), flags: le32(b, at + 4) }
}

/// Parses and validates a GTDT (`table`: header included).
pub fn parse(table: &[u8]) -> Result<Gtdt, GtdtError> {
    let t = acpi_table(table, *SIGNATURE, FIXED_V2).map_err(|e| match e {
        Framing::Short => GtdtError::Truncated,
        Framing::Signature => GtdtError::BadSignature,
    })?;
    let revision = t[REVISION_AT];
    let fixed = if revision >= 3 { FIXED_V3 } else { FIXED_V2 };
    if t.len() < fixed {
        return Err(GtdtError::Truncated);
    }
    let gtdt = Gtdt {
        revision,
        cnt_control_base: le64(t, CNT_CONTROL_BASE_AT),
        secure_el1: timer(t, SECURE_EL1_AT),
        nonsecure_el1: timer(t, NONSECURE_EL1_AT),
        virtual_el1: timer(t, VIRTUAL_EL1_AT),
        el2: timer(t, EL2_AT),
        cnt_read_base: le64(t, CNT_READ_BASE_AT),
        virtual_el2: (revision >= 3).then(|| timer(t, VIRTUAL_EL2_AT)),
        platform_timers: le32(t, PLATFORM_COUNT_AT),
    };
    for (which, timer) in [("virtual EL1", gtdt.virtual_el1), ("EL2", gtdt.el2), ("non-secure EL1", gtdt.nonsecure_el1)]
    {
        if !PPI.contains(&timer.gsiv) {
            return Err(GtdtError::NotAPpi { which, gsiv: timer.gsiv });
        }
    }
    check_platform_timers(t, fixed, gtdt.platform_timers, le32(t, PLATFORM_OFFSET_AT) as usize)?;
    Ok(gtdt)
}

/// Walks the platform timer structures: each within the table, after the
/// fixed part, no longer than what is left, at most
/// [`MAX_PLATFORM_TIMERS`].
fn check_platform_timers(t: &[u8], fixed: usize, count: u32, offset: usize) -> Result<(), GtdtError> {
    if count == 0 {
        return Ok(());
    }
    if count > MAX_PLATFORM_TIMERS || offset < fixed {
        return Err(GtdtError::BadPlatformTimers);
    }
    let mut at = offset;
    for _ in 0..count {
        let header = t.get(at..at + PLATFORM_HEADER).ok_or(GtdtError::BadPlatformTimers)?;
        let len = usize::from(u16::from_le_bytes([header[1], header[2]]));
        if len < PLATFORM_HEADER || at + len > t.len() {
            return Err(GtdtError::BadPlatformTimers);
        }
        at += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// QEMU 10's GTDT (`-M virt,virtualization=on,gic-version=3` under
    /// edk2, dumped from the firmware's tables).
    const QEMU_VIRT: &[u8] = include_bytes!("../testdata/qemu-virt-gtdt.bin");

    #[test]
    fn qemu_virt_timers() {
        let g = parse(QEMU_VIRT).unwrap();
        assert_eq!(g.revision, 3);
        assert_eq!((g.secure_el1.gsiv, g.nonsecure_el1.gsiv, g.virtual_el1.gsiv, g.el2.gsiv), (29, 30, 27, 26));
        assert_eq!(g.virtual_el2.map(|t| t.gsiv), Some(28));
        assert!(g.nonsecure_el1.always_on() && !g.el2.edge() && !g.el2.active_low(), "level, active high");
        assert_eq!(g.cnt_control_base, u64::MAX, "no memory-mapped counter");
        assert_eq!(g.platform_timers, 0);
    }

    fn patched(at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut t = QEMU_VIRT.to_vec();
        t[at..at + bytes.len()].copy_from_slice(bytes);
        t
    }

    #[test]
    fn bad_tables_are_refused() {
        assert_eq!(parse(&QEMU_VIRT[..95]), Err(GtdtError::Truncated));
        assert_eq!(parse(&patched(0, b"XTDT")), Err(GtdtError::BadSignature));
        assert_eq!(parse(&patched(4, &200u32.to_le_bytes())), Err(GtdtError::Truncated), "longer than given");
        assert_eq!(parse(&patched(4, &100u32.to_le_bytes())), Err(GtdtError::Truncated), "rev 3 below 104");
        assert_eq!(parse(&patched(EL2_AT, &40u32.to_le_bytes())), Err(GtdtError::NotAPpi { which: "EL2", gsiv: 40 }));
        let count = patched(PLATFORM_COUNT_AT, &1u32.to_le_bytes());
        assert_eq!(parse(&count), Err(GtdtError::BadPlatformTimers), "offset 0, inside the fixed part");
        let mut t = patched(PLATFORM_COUNT_AT, &1u32.to_le_bytes());
        t[PLATFORM_OFFSET_AT..PLATFORM_OFFSET_AT + 4].copy_from_slice(&100u32.to_le_bytes());
        assert_eq!(parse(&t), Err(GtdtError::BadPlatformTimers), "past the end");
    }
}
