//! What the SMMU implements (§6.3: SMMU_IDR0, SMMU_IDR1, SMMU_IDR5) and whether this driver can use it.

use core::fmt;

use crate::regs::{
    SmmuRegs, IDR0, IDR0_COHACC, IDR0_S2P, IDR0_STALL_MODEL, IDR0_STALL_MODEL_FORCED, IDR0_ST_LEVEL,
    IDR0_ST_LEVEL_LINEAR, IDR0_ST_LEVEL_TWO, IDR0_TTENDIAN, IDR0_TTENDIAN_BIG_ONLY, IDR0_TTF, IDR0_TTF_AARCH32,
    IDR0_TTF_AARCH64, IDR0_VMID16, IDR1, IDR1_CMDQS, IDR1_EVENTQS, IDR1_QUEUES_PRESET, IDR1_REL, IDR1_SIDSIZE,
    IDR1_TABLES_PRESET, IDR5, IDR5_GRAN4K, IDR5_OAS,
};
use crate::stream_table::StreamTableFormat;

/// An address size as SMMU_IDR5.OAS and STE.S2PS encode it (§6.3, SMMU_IDR5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddressSize {
    Bits32,
    Bits36,
    Bits40,
    Bits42,
    Bits44,
    Bits48,
    Bits52,
}

impl AddressSize {
    /// Decodes the 3-bit OAS/PS encoding; 0b111 is reserved.
    pub const fn from_encoding(encoding: u64) -> Option<AddressSize> {
        Some(match encoding {
            0b000 => AddressSize::Bits32,
            0b001 => AddressSize::Bits36,
            0b010 => AddressSize::Bits40,
            0b011 => AddressSize::Bits42,
            0b100 => AddressSize::Bits44,
            0b101 => AddressSize::Bits48,
            0b110 => AddressSize::Bits52,
            _ => return None,
        })
    }

    /// The 3-bit OAS/PS encoding.
    pub const fn encoding(self) -> u64 {
        self as u64
    }

    /// Width in bits.
    pub const fn bits(self) -> u8 {
        match self {
            AddressSize::Bits32 => 32,
            AddressSize::Bits36 => 36,
            AddressSize::Bits40 => 40,
            AddressSize::Bits42 => 42,
            AddressSize::Bits44 => 44,
            AddressSize::Bits48 => 48,
            AddressSize::Bits52 => 52,
        }
    }

    /// First address this size cannot express.
    pub const fn limit(self) -> u64 {
        1 << self.bits()
    }
}

/// The probed capabilities the driver depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// Stream table format chosen from IDR0.ST_LEVEL: 2-level when offered.
    pub stream_table: StreamTableFormat,
    /// VMID width: 16 with IDR0.VMID16, else 8.
    pub vmid_bits: u8,
    /// StreamID width (IDR1.SIDSIZE).
    pub sid_bits: u8,
    /// Output address size (IDR5.OAS): every table, queue and stage-2
    /// output address must be below it.
    pub oas: AddressSize,
    /// Input (IPA) size: OAS, widened to 40 bits if AArch32 tables are
    /// supported (§3.4).
    pub ias_bits: u8,
    /// log2 of the largest command queue (IDR1.CMDQS).
    pub cmdq_max_log2: u8,
    /// log2 of the largest event queue (IDR1.EVENTQS).
    pub evtq_max_log2: u8,
}

/// Why the driver cannot use this SMMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeError {
    /// IDR0.S2P = 0: no stage-2 translation to confine devices with.
    NoStage2,
    /// IDR0.TTF lacks AArch64: the shared stage-2 table is AArch64 format.
    NoAArch64Tables,
    /// IDR0.TTENDIAN = big-endian only; the tables are little-endian.
    BigEndianWalksOnly,
    /// IDR0.COHACC = 0: the driver does no cache maintenance on its tables.
    NotCoherent,
    /// IDR0.STALL_MODEL = forced stall: faults would need CMD_RESUME.
    StallForced,
    /// IDR0.ST_LEVEL holds a reserved value.
    ReservedStreamTableLevel(u8),
    /// IDR1.TABLES_PRESET, QUEUES_PRESET or REL: fixed or relative bases.
    PresetBases,
    /// IDR1.SIDSIZE wider than the 32 bits a StreamID can have.
    StreamIdTooWide(u8),
    /// IDR1.CMDQS too small for the driver's longest command batch.
    CommandQueueTooSmall(u8),
    /// IDR5.OAS holds a reserved value.
    ReservedOas(u8),
    /// IDR5.GRAN4K = 0: the shared table uses the 4 KiB granule.
    NoGranule4K,
    /// IAS below the 40 bits a walk starting at level 0 needs.
    IpaTooSmall(u8),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::NoStage2 => write!(f, "SMMU has no stage-2 translation (IDR0.S2P = 0)"),
            ProbeError::NoAArch64Tables => write!(f, "SMMU cannot walk AArch64 translation tables (IDR0.TTF)"),
            ProbeError::BigEndianWalksOnly => write!(f, "SMMU walks big-endian tables only (IDR0.TTENDIAN)"),
            ProbeError::NotCoherent => write!(f, "SMMU table and queue accesses are not coherent (IDR0.COHACC = 0)"),
            ProbeError::StallForced => write!(f, "SMMU forces the stall fault model (IDR0.STALL_MODEL)"),
            ProbeError::ReservedStreamTableLevel(v) => write!(f, "reserved IDR0.ST_LEVEL {v:#b}"),
            ProbeError::PresetBases => write!(f, "SMMU table or queue bases are preset (IDR1)"),
            ProbeError::StreamIdTooWide(bits) => write!(f, "IDR1.SIDSIZE {bits} exceeds 32 bits"),
            ProbeError::CommandQueueTooSmall(log2) => write!(f, "command queue of 2^{log2} entries is too small"),
            ProbeError::ReservedOas(v) => write!(f, "reserved IDR5.OAS {v:#b}"),
            ProbeError::NoGranule4K => write!(f, "SMMU lacks the 4 KiB granule (IDR5.GRAN4K = 0)"),
            ProbeError::IpaTooSmall(bits) => write!(f, "{bits}-bit IPA cannot start a stage-2 walk at level 0"),
        }
    }
}

/// Widest StreamID (§3.3: StreamIDs are up to 32 bits).
pub(crate) const MAX_SID_BITS: u8 = 32;
/// The driver's longest command batch is two commands and a CMD_SYNC, so
/// the command queue needs at least four entries.
pub(crate) const MIN_CMDQ_LOG2: u8 = 2;
/// A stage-2 walk from level 0 with the 4 KiB granule resolves IPA bits
/// [47:39] there, so the IPA needs at least 40 bits (S2T0SZ <= 24).
pub(crate) const MIN_IPA_BITS: u8 = 40;
/// IAS with AArch32 (LPAE) tables supported is at least 40 bits (§3.4).
const AARCH32_IAS_BITS: u8 = 40;

/// Reads IDR0, IDR1 and IDR5 and checks that the driver can use the SMMU.
pub fn probe<R: SmmuRegs + ?Sized>(regs: &R) -> Result<Features, ProbeError> {
    let idr0 = regs.read32(IDR0);
    let idr1 = regs.read32(IDR1);
    let idr5 = regs.read32(IDR5);
    let (idr0_bits, idr1_bits, idr5_bits) = (u64::from(idr0), u64::from(idr1), u64::from(idr5));

    if idr0 & IDR0_S2P == 0 {
        return Err(ProbeError::NoStage2);
    }
    let ttf = IDR0_TTF.get(idr0_bits);
    if ttf & IDR0_TTF_AARCH64 == 0 {
        return Err(ProbeError::NoAArch64Tables);
    }
    if IDR0_TTENDIAN.get(idr0_bits) == IDR0_TTENDIAN_BIG_ONLY {
        return Err(ProbeError::BigEndianWalksOnly);
    }
    if idr0 & IDR0_COHACC == 0 {
        return Err(ProbeError::NotCoherent);
    }
    if IDR0_STALL_MODEL.get(idr0_bits) == IDR0_STALL_MODEL_FORCED {
        return Err(ProbeError::StallForced);
    }
    let stream_table = match IDR0_ST_LEVEL.get(idr0_bits) {
        IDR0_ST_LEVEL_LINEAR => StreamTableFormat::Linear,
        IDR0_ST_LEVEL_TWO => StreamTableFormat::TwoLevel,
        other => return Err(ProbeError::ReservedStreamTableLevel(other as u8)),
    };
    let vmid_bits = if idr0 & IDR0_VMID16 != 0 { 16 } else { 8 };

    if idr1 & (IDR1_TABLES_PRESET | IDR1_QUEUES_PRESET | IDR1_REL) != 0 {
        return Err(ProbeError::PresetBases);
    }
    let sid_bits = IDR1_SIDSIZE.get(idr1_bits) as u8;
    if sid_bits > MAX_SID_BITS {
        return Err(ProbeError::StreamIdTooWide(sid_bits));
    }
    let cmdq_max_log2 = IDR1_CMDQS.get(idr1_bits) as u8;
    if cmdq_max_log2 < MIN_CMDQ_LOG2 {
        return Err(ProbeError::CommandQueueTooSmall(cmdq_max_log2));
    }
    let evtq_max_log2 = IDR1_EVENTQS.get(idr1_bits) as u8;

    let oas_encoding = IDR5_OAS.get(idr5_bits);
    let oas = AddressSize::from_encoding(oas_encoding).ok_or(ProbeError::ReservedOas(oas_encoding as u8))?;
    if idr5 & IDR5_GRAN4K == 0 {
        return Err(ProbeError::NoGranule4K);
    }
    let ias_bits = if ttf & IDR0_TTF_AARCH32 != 0 { oas.bits().max(AARCH32_IAS_BITS) } else { oas.bits() };
    if ias_bits < MIN_IPA_BITS {
        return Err(ProbeError::IpaTooSmall(ias_bits));
    }

    Ok(Features { stream_table, vmid_bits, sid_bits, oas, ias_bits, cmdq_max_log2, evtq_max_log2 })
}
