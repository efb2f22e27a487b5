//! The ID registers a guest reads (Arm ARM D19.2, "ID_AA64*_EL1"): reads
//! of the whole ID space (Op0 = 3, Op1 = 0, CRn = 0, CRm = 1-7) trap to
//! EL2 (HCR_EL2.TID3) and return the hardware's value with every feature
//! the hypervisor does not context-switch hidden. A guest therefore never
//! uses a feature whose state would leak between partitions or whose
//! instructions would trap: SVE and SME (their registers are not
//! switched), pointer authentication (its keys are not switched), the PMU,
//! SPE, trace and the activity monitors (their counters are not
//! switched), MTE, RAS, MPAM, VHE, nested virtualisation and Secure EL2,
//! and WFE/WFI with timeout.
//!
//! Offered (switched per vCPU or architecturally private): the base ISA,
//! FP/AdvSIMD (Q0-Q31, FPCR, FPSR), the EL1 translation regime, the
//! generic timer's virtual view, the GICv3 CPU interface (its virtual
//! interface), BTI and SSBS.

/// An ID register's encoding: CRm (1-7) and Op2 (0-7), with Op0 = 3,
/// Op1 = 0, CRn = 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdReg {
    pub crm: u8,
    pub op2: u8,
}

impl IdReg {
    pub const AA64PFR0: Self = Self { crm: 4, op2: 0 };
    pub const AA64PFR1: Self = Self { crm: 4, op2: 1 };
    pub const AA64ZFR0: Self = Self { crm: 4, op2: 4 };
    pub const AA64SMFR0: Self = Self { crm: 4, op2: 5 };
    pub const AA64DFR0: Self = Self { crm: 5, op2: 0 };
    pub const AA64DFR1: Self = Self { crm: 5, op2: 1 };
    pub const AA64ISAR0: Self = Self { crm: 6, op2: 0 };
    pub const AA64ISAR1: Self = Self { crm: 6, op2: 1 };
    pub const AA64ISAR2: Self = Self { crm: 6, op2: 2 };
    pub const AA64MMFR0: Self = Self { crm: 7, op2: 0 };
    pub const AA64MMFR1: Self = Self { crm: 7, op2: 1 };
    pub const AA64MMFR2: Self = Self { crm: 7, op2: 2 };
}

/// ISS of a trapped MSR/MRS (ESR_EL2, EC 0x18, D19.2.40): Op0 [21:20],
/// Op2 [19:17], Op1 [16:14], CRn [13:10], Rt [9:5], CRm [4:1], Dir [0].
const ISS_OP0_SHIFT: u32 = 20;
const ISS_OP2_SHIFT: u32 = 17;
const ISS_OP1_SHIFT: u32 = 14;
const ISS_CRN_SHIFT: u32 = 10;
const ISS_CRM_SHIFT: u32 = 1;

/// The ID register a trapped MRS reads, if it is one: Op0 = 3, Op1 = 0,
/// CRn = 0, CRm 1-7, and a read (Dir = 1).
pub fn decode(iss: u64) -> Option<IdReg> {
    let field = |shift: u32, bits: u32| ((iss >> shift) & ((1 << bits) - 1)) as u8;
    let (op0, op1, crn, crm, op2) = (
        field(ISS_OP0_SHIFT, 2),
        field(ISS_OP1_SHIFT, 3),
        field(ISS_CRN_SHIFT, 4),
        field(ISS_CRM_SHIFT, 4),
        field(ISS_OP2_SHIFT, 3),
    );
    (iss & 1 == 1 && op0 == 3 && op1 == 0 && crn == 0 && (1..=7).contains(&crm)).then_some(IdReg { crm, op2 })
}

/// A 4-bit ID field at `shift`.
const fn field(shift: u32) -> u64 {
    0xf << shift
}

/// Fields cleared ("not implemented") in each register.
fn hidden(reg: IdReg) -> u64 {
    match reg {
        // EL2 [11:8], EL3 [15:12], RAS [31:28], SVE [35:32], SEL2 [39:36],
        // MPAM [43:40], AMU [47:44].
        IdReg::AA64PFR0 => field(8) | field(12) | field(28) | field(32) | field(36) | field(40) | field(44),
        // Everything but BT [3:0] and SSBS [7:4]: MTE, RAS_frac, MPAM_frac,
        // SME, RNDR_trap, CSV2_frac, NMI, MTE_frac, GCS, THE, MTEX, DF2, PFAR.
        IdReg::AA64PFR1 => !0xff,
        // SVE and SME feature registers, and AA64DFR1 (SPE, BRBE and PMU
        // extensions): nothing.
        IdReg::AA64ZFR0 | IdReg::AA64SMFR0 | IdReg::AA64DFR1 => u64::MAX,
        // TraceVer [7:4], PMUVer [11:8], PMSVer [35:32], TraceFilt [43:40],
        // TraceBuffer [47:44], MTPMU [51:48], BRBE [55:52].
        IdReg::AA64DFR0 => field(4) | field(8) | field(32) | field(40) | field(44) | field(48) | field(52),
        // APA [7:4], API [11:8], GPA [27:24], GPI [31:28].
        IdReg::AA64ISAR1 => field(4) | field(8) | field(24) | field(28),
        // WFxT [3:0], GPA3 [11:8], APA3 [15:12].
        IdReg::AA64ISAR2 => field(0) | field(8) | field(12),
        // VH [11:8].
        IdReg::AA64MMFR1 => field(8),
        // NV [27:24].
        IdReg::AA64MMFR2 => field(24),
        _ => 0,
    }
}

/// The value a guest reads for `reg`, given the hardware's.
pub fn guest_value(reg: IdReg, hardware: u64) -> u64 {
    hardware & !hidden(reg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ISS of an MRS of S3_0_C0_C<crm>_<op2> into x5.
    fn mrs(crm: u64, op2: u64) -> u64 {
        (3 << ISS_OP0_SHIFT) | (op2 << ISS_OP2_SHIFT) | (5 << 5) | (crm << ISS_CRM_SHIFT) | 1
    }

    #[test]
    fn only_reads_of_the_id_space_decode() {
        assert_eq!(decode(mrs(4, 0)), Some(IdReg::AA64PFR0));
        assert_eq!(decode(mrs(6, 1)), Some(IdReg::AA64ISAR1));
        assert_eq!(decode(mrs(4, 0) & !1), None, "a write");
        assert_eq!(decode(mrs(0, 0)), None, "CRm 0 is MIDR/MPIDR, not trapped by TID3");
        assert_eq!(decode(mrs(4, 0) | (1 << ISS_OP1_SHIFT)), None, "Op1 != 0");
        assert_eq!(decode(mrs(4, 0) | (1 << ISS_CRN_SHIFT)), None, "CRn != 0");
    }

    /// The QEMU `-cpu max` values these tests hold the policy to.
    const PFR0: u64 = 0x1201_1111_1111_2222;
    const ISAR1: u64 = 0x0011_2120_1021_1152;

    #[test]
    fn what_is_not_switched_is_hidden() {
        let pfr0 = guest_value(IdReg::AA64PFR0, PFR0);
        assert_eq!((pfr0 >> 32) & 0xf, 0, "no SVE");
        assert_eq!((pfr0 >> 8) & 0xf, 0, "no EL2 for the guest");
        assert_eq!((pfr0 >> 28) & 0xf, 0, "no RAS");
        assert_eq!((pfr0 >> 24) & 0xf, PFR0 >> 24 & 0xf, "GICv3 system registers stay");
        assert_eq!(pfr0 & 0xff, PFR0 & 0xff, "EL0 and EL1 stay");
        assert_eq!(pfr0 & 0xf_0000, PFR0 & 0xf_0000, "FP stays");
        let isar1 = guest_value(IdReg::AA64ISAR1, ISAR1);
        for shift in [4, 8, 24, 28] {
            assert_eq!((isar1 >> shift) & 0xf, 0, "pointer authentication field at {shift}");
        }
        assert_eq!(isar1 & 0xf, ISAR1 & 0xf, "DPB stays");
        assert_eq!(guest_value(IdReg::AA64ZFR0, u64::MAX), 0);
        assert_eq!(guest_value(IdReg::AA64SMFR0, u64::MAX), 0);
        assert_eq!((guest_value(IdReg::AA64DFR0, u64::MAX) >> 8) & 0xf, 0, "no PMU");
        assert_eq!(guest_value(IdReg::AA64DFR0, u64::MAX) & 0xf, 0xf, "DebugVer stays");
        assert_eq!(guest_value(IdReg::AA64PFR1, u64::MAX), 0xff, "BT and SSBS only");
        assert_eq!((guest_value(IdReg::AA64MMFR1, u64::MAX) >> 8) & 0xf, 0, "no VHE");
        assert_eq!(guest_value(IdReg::AA64ISAR0, 0x1234), 0x1234, "the base ISA as it is");
    }
}
