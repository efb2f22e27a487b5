//! The hypercall ABI (`shared/DESIGN.md` §6, documented in
//! `hypervisor/HYPERCALLS.md`), shared by the hypervisor and the guests.
//!
//! Shaped after the Hyper-V TLFS (v6.0b §3.7 "Hypercall Inputs", §3.8
//! "Hypercall Outputs"): a 64-bit control word selects the call, and the
//! result carries a TLFS-style status code.
#![no_std]

use core::fmt;

/// Control word bit layout (TLFS §3.7, Table 2).
const CODE_MASK: u64 = 0xffff;
const FAST_BIT: u64 = 1 << 16;
const REP_COUNT_SHIFT: u32 = 32;
const REP_START_SHIFT: u32 = 48;
/// Rep count and rep start index are 12 bits each.
pub const MAX_REP: u16 = 0xfff;
/// Bits that must be zero: 31:17, 47:44, 63:60.
const RESERVED: u64 = (0x7fff << 17) | (0xf << 44) | (0xf << 60);

/// aarch64 conduit: `hvc #0` with x0 = this SMCCC function id (fast call,
/// SMC64, owner 6 = vendor-specific hypervisor service; SMCCC v1.4
/// §2.5 Table 2-1 and §6.1), x1 = control word, x2/x3 = input/output.
pub const SMCCC_VENDOR_HYP_CALL: u64 = 0xc600_0001;

/// A decoded control word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Control {
    pub code: u16,
    /// Input and output in registers rather than memory.
    pub fast: bool,
    pub rep_count: u16,
    pub rep_start: u16,
}

impl Control {
    pub const fn new(code: u16) -> Self {
        Self { code, fast: false, rep_count: 0, rep_start: 0 }
    }

    #[must_use]
    pub const fn fast(self) -> Self {
        Self { fast: true, ..self }
    }

    /// Encodes the word; rep fields are truncated to 12 bits.
    pub const fn encode(self) -> u64 {
        (self.code as u64)
            | if self.fast { FAST_BIT } else { 0 }
            | (((self.rep_count & MAX_REP) as u64) << REP_COUNT_SHIFT)
            | (((self.rep_start & MAX_REP) as u64) << REP_START_SHIFT)
    }

    /// Decodes a guest-supplied word; reserved bits set or a rep start past
    /// the rep count are [`Status::InvalidHypercallInput`].
    pub fn decode(word: u64) -> Result<Self, Status> {
        if word & RESERVED != 0 {
            return Err(Status::InvalidHypercallInput);
        }
        let c = Self {
            code: (word & CODE_MASK) as u16,
            fast: word & FAST_BIT != 0,
            rep_count: ((word >> REP_COUNT_SHIFT) as u16) & MAX_REP,
            rep_start: ((word >> REP_START_SHIFT) as u16) & MAX_REP,
        };
        if c.rep_start > c.rep_count {
            return Err(Status::InvalidHypercallInput);
        }
        Ok(c)
    }
}

/// Hypercall status codes (TLFS Appendix B, "Hypercall Status Codes").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Status {
    Success = 0,
    InvalidHypercallCode = 2,
    InvalidHypercallInput = 3,
    InvalidAlignment = 4,
    InvalidParameter = 5,
    AccessDenied = 6,
    InvalidPartitionState = 7,
    OperationDenied = 8,
    InsufficientMemory = 11,
}

impl Status {
    pub fn from_raw(raw: u16) -> Option<Self> {
        Some(match raw {
            0 => Self::Success,
            2 => Self::InvalidHypercallCode,
            3 => Self::InvalidHypercallInput,
            4 => Self::InvalidAlignment,
            5 => Self::InvalidParameter,
            6 => Self::AccessDenied,
            7 => Self::InvalidPartitionState,
            8 => Self::OperationDenied,
            11 => Self::InsufficientMemory,
            _ => return None,
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Success => "success",
            Self::InvalidHypercallCode => "invalid-hypercall-code",
            Self::InvalidHypercallInput => "invalid-hypercall-input",
            Self::InvalidAlignment => "invalid-alignment",
            Self::InvalidParameter => "invalid-parameter",
            Self::AccessDenied => "access-denied",
            Self::InvalidPartitionState => "invalid-partition-state",
            Self::OperationDenied => "operation-denied",
            Self::InsufficientMemory => "insufficient-memory",
        };
        f.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let c = Control { code: 0x12, fast: true, rep_count: 7, rep_start: 3 };
        assert_eq!(c.encode(), 0x12 | (1 << 16) | (7 << 32) | (3 << 48));
        assert_eq!(Control::decode(c.encode()), Ok(c));
        assert_eq!(Control::decode(Control::new(5).encode()), Ok(Control::new(5)));
    }

    #[test]
    fn reserved_bits_and_rep_start_are_refused() {
        assert_eq!(Control::decode(1 << 20), Err(Status::InvalidHypercallInput));
        assert_eq!(Control::decode(1 << 63), Err(Status::InvalidHypercallInput));
        assert_eq!(Control::decode(1 << 45), Err(Status::InvalidHypercallInput));
        let bad = Control { code: 1, fast: false, rep_count: 1, rep_start: 2 }.encode();
        assert_eq!(Control::decode(bad), Err(Status::InvalidHypercallInput));
    }

    #[test]
    fn every_status_round_trips() {
        for raw in 0..=u16::MAX {
            if let Some(s) = Status::from_raw(raw) {
                assert_eq!(s as u16, raw);
            }
        }
        assert_eq!(Status::from_raw(1), None);
    }
}
