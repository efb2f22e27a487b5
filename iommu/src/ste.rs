//! Stream table entries (§5.2 "Stream Table Entry").
//!
//! The driver writes two kinds: abort (every stream without an assignment)
//! and stage-2 translation through the guest's stage-2 table. It never
//! writes bypass.

use crate::bits::{address_field, Field};
use crate::probe::{AddressSize, Features};

/// Bytes in an STE.
pub const STE_BYTES: u64 = 64;
/// 64-bit words in an STE.
pub const STE_WORDS: usize = 8;

/// Word 0: V, bit 0 — the entry is valid.
const STE0_V: u64 = 1 << 0;
/// Word 0: Config, bits [3:1].
const STE0_CONFIG: Field = Field::new(1, 3);
/// Config 0b000: abort every transaction, silently (no event).
const CONFIG_ABORT: u64 = 0b000;
/// Config 0b110: stage 1 bypassed, stage 2 translates.
const CONFIG_S2_TRANSLATE: u64 = 0b110;

/// Word 1: SHCFG, bits [45:44] (STE bits [109:108]): shareability when
/// stage 1 is bypassed. 0b01 uses the incoming attribute, so the stage-2
/// descriptor's SH field decides, as for the CPU.
const STE1_SHCFG: Field = Field::new(44, 2);
const SHCFG_INCOMING: u64 = 0b01;

/// Word 2: S2VMID, bits [15:0].
const STE2_S2VMID: Field = Field::new(0, 16);
/// Word 2: the stage-2 VTCR fields, bits [50:32], laid out as VTCR_EL2
/// bits [18:0]: S2T0SZ, S2SL0, S2IR0, S2OR0, S2SH0, S2TG, S2PS.
const STE2_S2T0SZ: Field = Field::new(32, 6);
const STE2_S2SL0: Field = Field::new(38, 2);
const STE2_S2IR0: Field = Field::new(40, 2);
const STE2_S2OR0: Field = Field::new(42, 2);
const STE2_S2SH0: Field = Field::new(44, 2);
const STE2_S2TG: Field = Field::new(46, 2);
const STE2_S2PS: Field = Field::new(48, 3);
/// Word 2: S2AA64, bit 51 — the stage-2 table is AArch64 format.
const STE2_S2AA64: u64 = 1 << 51;
/// Word 2: S2R, bit 58 — record stage-2 faults in the event queue.
const STE2_S2R: u64 = 1 << 58;
/// Word 3: S2TTB, bits [51:4].
const STE3_S2TTB: u64 = address_field(4);

/// S2SL0 = 0b10 with the 4 KiB granule: the walk starts at level 0, as
/// `ArmStage2::VTCR_GEOMETRY` (VTCR_EL2.SL0) for the CPU.
const S2SL0_LEVEL0: u64 = 0b10;
/// S2IR0/S2OR0 = 0b01: walks are write-back read/write-allocate, and
/// S2SH0 = 0b11: inner shareable — both as VTCR_EL2.IRGN0/ORGN0/SH0.
const S2_WALK_CACHE_WBWA: u64 = 0b01;
const S2_WALK_SHARE_INNER: u64 = 0b11;
/// S2TG = 0b00: 4 KiB granule, as VTCR_EL2.TG0.
const S2TG_4K: u64 = 0b00;

/// The hypervisor's stage-2 tables map at most 48-bit IPAs and output
/// addresses (`hypervisor::stage2::ADDRESS_BITS`).
const STAGE2_TABLE_BITS: u8 = 48;
/// S2T0SZ is the input size subtracted from 64, as VTCR_EL2.T0SZ.
const TXSZ_FROM: u8 = 64;
/// Alignment of a stage-2 root: one 4 KiB table page.
pub(crate) const S2_ROOT_ALIGN: u64 = 1 << 12;

/// How STEs describe the shared stage-2 table on this SMMU.
///
/// The CPU walks the table with a 48-bit IPA from level 0. The SMMU can
/// only take an input size up to its IAS (QEMU: OAS = IAS = 44 bits), so
/// S2T0SZ = 64 - min(48, IAS) with the walk still starting at level 0: the
/// SMMU indexes the same root with fewer IPA bits and reaches the same
/// leaves for every IPA below 2^min(48, IAS); IPAs above fault. S2PS is
/// min(48, OAS) bits: the table's output addresses are 48-bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stage2Geometry {
    ipa_bits: u8,
    output_size: AddressSize,
}

impl Stage2Geometry {
    /// The geometry for a probed SMMU.
    pub fn new(features: Features) -> Stage2Geometry {
        let output_size = features.oas.min(AddressSize::Bits48);
        Stage2Geometry { ipa_bits: features.ias_bits.min(STAGE2_TABLE_BITS), output_size }
    }

    /// Input (IPA) bits the SMMU translates.
    pub fn ipa_bits(self) -> u8 {
        self.ipa_bits
    }

    /// Output address size (S2PS).
    pub fn output_size(self) -> AddressSize {
        self.output_size
    }

    /// Word 2 apart from the VMID: the walk geometry, attributes and flags.
    fn word2(self) -> u64 {
        STE2_S2T0SZ.place(u64::from(TXSZ_FROM - self.ipa_bits))
            | STE2_S2SL0.place(S2SL0_LEVEL0)
            | STE2_S2IR0.place(S2_WALK_CACHE_WBWA)
            | STE2_S2OR0.place(S2_WALK_CACHE_WBWA)
            | STE2_S2SH0.place(S2_WALK_SHARE_INNER)
            | STE2_S2TG.place(S2TG_4K)
            | STE2_S2PS.place(self.output_size.encoding())
            | STE2_S2AA64
            | STE2_S2R
    }
}

/// What an STE does with a stream's transactions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SteConfig {
    /// V = 1, Config = abort: every transaction is terminated.
    Abort,
    /// V = 1, Config = stage-2 translate through the table at `s2_root`,
    /// tagged with `vmid`.
    Stage2 { vmid: u16, s2_root: u64 },
}

impl SteConfig {
    /// The eight words of the STE. Word 0 carries V and Config, so writing
    /// it last (and alone) switches the entry between configurations.
    pub fn encode(self, geometry: Stage2Geometry) -> [u64; STE_WORDS] {
        let mut words = [0; STE_WORDS];
        match self {
            SteConfig::Abort => words[0] = STE0_V | STE0_CONFIG.place(CONFIG_ABORT),
            SteConfig::Stage2 { vmid, s2_root } => {
                words[0] = STE0_V | STE0_CONFIG.place(CONFIG_S2_TRANSLATE);
                words[1] = STE1_SHCFG.place(SHCFG_INCOMING);
                words[2] = STE2_S2VMID.place(u64::from(vmid)) | geometry.word2();
                words[3] = s2_root & STE3_S2TTB;
            }
        }
        words
    }

    /// Reads back an STE this driver wrote, or `None` if it is anything
    /// else (invalid, bypass, stage 1, or a stage-2 entry with fields this
    /// driver would not write). An abort entry is recognised from word 0
    /// alone, as the SMMU ignores the rest.
    pub fn decode(words: &[u64; STE_WORDS], geometry: Stage2Geometry) -> Option<SteConfig> {
        if words[0] == Self::abort_word0() {
            return Some(SteConfig::Abort);
        }
        let config = SteConfig::Stage2 { vmid: STE2_S2VMID.get(words[2]) as u16, s2_root: words[3] & STE3_S2TTB };
        (config.encode(geometry) == *words).then_some(config)
    }

    /// Word 0 of an abort entry.
    pub(crate) fn abort_word0() -> u64 {
        STE0_V | STE0_CONFIG.place(CONFIG_ABORT)
    }
}
