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

/// Call codes (bits 15:0 of the control word). `hypervisor/HYPERCALLS.md`
/// gives each call's inputs, outputs and statuses.
pub mod call {
    /// Rep call: write `rep_count` bytes at input GPA to the console.
    pub const CONSOLE_WRITE: u16 = 0x0001;
    /// Fast call: output = the caller's partition id.
    pub const GET_PARTITION_ID: u16 = 0x0002;
    /// Memory call: writes a [`super::HvInfo`] at the output GPA.
    pub const GET_HV_INFO: u16 = 0x0003;
    /// Fast call: give up the rest of this time slice.
    pub const YIELD: u16 = 0x0004;
    /// Fast call: stop the calling partition (all its vCPUs).
    pub const SHUTDOWN_SELF: u16 = 0x0005;
    /// Fast call, privileged: input = partition id, output = its
    /// [`super::PartitionState`].
    pub const GET_PARTITION_STATE: u16 = 0x0006;
    /// Fast call: output = the live update's phase as the running guests
    /// can see it ([`super::UPDATE_PHASE_IDLE`] or
    /// [`super::UPDATE_PHASE_STAGING`]).
    pub const GET_UPDATE_PHASE: u16 = 0x0007;
    /// Memory call, privileged: input = GPA of an [`super::UpdateRequest`]
    /// naming a new hypervisor image in the caller's RAM. Returns after the
    /// update (in the new image) or its refusal/cancellation.
    pub const LIVE_UPDATE: u16 = 0x0010;
    /// Fast call, privileged, test hook: the next live update's freeze
    /// phase fails, so the update is cancelled.
    pub const TEST_FAIL_NEXT_FREEZE: u16 = 0x0011;
}

/// `GET_UPDATE_PHASE`: no live update is under way.
pub const UPDATE_PHASE_IDLE: u64 = 0;
/// `GET_UPDATE_PHASE`: a live update was requested and is being staged
/// (the new image copied, checked and placed while the guests run); the
/// freeze follows, or a refusal. Guests never run in the later phases
/// (freeze, kexec, restore): the next thing they see is idle again, with
/// `update_count` one higher, or unchanged if the update did not happen.
pub const UPDATE_PHASE_STAGING: u64 = 1;

/// The input of `LIVE_UPDATE`, 16 bytes little-endian, 8-byte aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpdateRequest {
    /// GPA of the image (in the caller's RAM).
    pub image_gpa: u64,
    /// Image size in bytes.
    pub image_size: u64,
}

/// Size in bytes of [`UpdateRequest`].
pub const UPDATE_REQUEST_SIZE: usize = 16;

impl UpdateRequest {
    pub fn to_bytes(&self) -> [u8; UPDATE_REQUEST_SIZE] {
        let mut b = [0u8; UPDATE_REQUEST_SIZE];
        b[..8].copy_from_slice(&self.image_gpa.to_le_bytes());
        b[8..].copy_from_slice(&self.image_size.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; UPDATE_REQUEST_SIZE]) -> Self {
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo.copy_from_slice(&b[..8]);
        hi.copy_from_slice(&b[8..]);
        Self { image_gpa: u64::from_le_bytes(lo), image_size: u64::from_le_bytes(hi) }
    }
}

/// The output of `GET_HV_INFO`, 88 bytes, little-endian, 8-byte aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct HvInfo {
    /// Semantic version, NUL-padded UTF-8.
    pub version: [u8; 32],
    /// Build identifier, NUL-padded UTF-8.
    pub build: [u8; 32],
    /// Live updates performed since the first boot.
    pub update_count: u64,
    /// Hypercall ABI version: 1.
    pub abi_version: u64,
    /// Physical CPUs the hypervisor runs on.
    pub cpus: u64,
}

impl HvInfo {
    /// Fills a NUL-padded field from a string, truncating at 31 bytes.
    pub fn field(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        let n = s.len().min(31);
        out[..n].copy_from_slice(&s.as_bytes()[..n]);
        out
    }

    /// The little-endian wire layout.
    pub fn to_bytes(&self) -> [u8; HV_INFO_SIZE] {
        let mut b = [0u8; HV_INFO_SIZE];
        b[..32].copy_from_slice(&self.version);
        b[32..64].copy_from_slice(&self.build);
        b[64..72].copy_from_slice(&self.update_count.to_le_bytes());
        b[72..80].copy_from_slice(&self.abi_version.to_le_bytes());
        b[80..88].copy_from_slice(&self.cpus.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; HV_INFO_SIZE]) -> Self {
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let mut version = [0u8; 32];
        let mut build = [0u8; 32];
        version.copy_from_slice(&b[..32]);
        build.copy_from_slice(&b[32..64]);
        Self { version, build, update_count: word(64), abi_version: word(72), cpus: word(80) }
    }

    /// A NUL-padded field as a string (empty if not UTF-8).
    pub fn text(field: &[u8; 32]) -> &str {
        let end = field.iter().position(|&c| c == 0).unwrap_or(field.len());
        core::str::from_utf8(&field[..end]).unwrap_or("")
    }
}

/// Size in bytes of [`HvInfo`] as written to guest memory.
pub const HV_INFO_SIZE: usize = 88;
/// Required alignment of the `GET_HV_INFO` output GPA.
pub const HV_INFO_ALIGN: u64 = 8;
/// The ABI version reported in [`HvInfo::abi_version`].
pub const ABI_VERSION: u64 = 1;

/// Partition states reported by `GET_PARTITION_STATE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum PartitionState {
    Running = 0,
    /// Shut itself down.
    Stopped = 1,
    /// Stopped by the hypervisor after a fault.
    Faulted = 2,
}

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
    fn hv_info_wire_layout() {
        let info = HvInfo {
            version: HvInfo::field("0.2.0"),
            build: HvInfo::field("abc"),
            update_count: 3,
            abi_version: ABI_VERSION,
            cpus: 2,
        };
        let b = info.to_bytes();
        assert_eq!(&b[..5], b"0.2.0");
        assert_eq!(b[64], 3);
        assert_eq!(HvInfo::from_bytes(&b), info);
        assert_eq!(HvInfo::text(&info.version), "0.2.0");
        assert_eq!(HvInfo::text(&HvInfo::field(&"x".repeat(40))).len(), 31);
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
