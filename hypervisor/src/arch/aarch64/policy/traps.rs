//! What an aarch64 guest can reach, class by class, and the EL2 trap
//! configuration that enforces it (`hypervisor/GUEST-MACHINE.md` holds the
//! same inventory for readers). Every class is *switched* per vCPU (its
//! state saved and loaded when another vCPU takes the CPU), *emulated*
//! (every access traps and the hypervisor answers), or *hidden* (the ID
//! registers say it is absent and its accesses trap to an UNDEFINED
//! exception in the guest); the counters are a *clock* every guest reads
//! alike. Nothing passes through unswitched; the tests below hold the trap
//! bits to the table.

pub use crate::arch::Handling;

/// The inventory: every architectural register class an EL1 guest can
/// reach.
pub const INVENTORY: [(&str, Handling); 18] = [
    ("general-purpose registers, PC, PSTATE", Handling::Switched),
    ("FP/AdvSIMD: Q0-Q31, FPCR, FPSR", Handling::Switched),
    ("EL1 system registers: SCTLR, TTBR0/1, TCR, MAIR, AMAIR, VBAR, CONTEXTIDR, TPIDRs, SP_EL0/1, ELR/SPSR/ESR/FAR, AFSRs, PAR, CPACR, CNTKCTL, CSSELR", Handling::Switched),
    ("virtual timer: CNTV_CTL, CNTV_CVAL", Handling::Switched),
    ("counters: CNTPCT, CNTVCT (CNTVOFF 0)", Handling::Clock),
    ("debug: MDSCR_EL1, DBGBVR/DBGBCR/DBGWVR/DBGWCR", Handling::Switched),
    ("GICv3 CPU interface (virtual: ICH_LR, ICH_VMCR, ICH_AP1R)", Handling::Switched),
    ("ID registers (ID_AA64*, the ID space)", Handling::Emulated),
    ("EL1 physical timer: CNTP_CTL, CNTP_CVAL, CNTP_TVAL", Handling::Emulated),
    ("ICC_SGI1R_EL1 (SGIs)", Handling::Emulated),
    ("OS lock and debug ROM: OSLAR, OSLSR, OSDLR, MDRAR", Handling::Emulated),
    ("GIC distributor and redistributors, PL011 (MMIO)", Handling::Emulated),
    ("PMU: PMCR, PMCNTEN*, PMEV*, PMCCNTR, PMSELR, PMUSERENR, PMINTEN*", Handling::Hidden),
    ("SVE and SME state (Z, P, FFR, ZCR, SMCR, ZA)", Handling::Hidden),
    ("pointer authentication keys", Handling::Hidden),
    ("trace: TRFCR and the trace unit", Handling::Hidden),
    ("statistical profiling (SPE)", Handling::Hidden),
    ("activity monitors (AMU)", Handling::Hidden),
];

/// HCR_EL2 for guests (D19.2.48): VM (0, stage 2), SWIO (1), FMO/IMO/AMO
/// (3-5: physical interrupts to EL2, virtual ones to the guest), TWI (13,
/// trap WFI), TID3 (18, trap the ID space), TSC (19, trap SMC), RW (31,
/// EL1 is AArch64). API (41) and APK (40) stay 0: pointer authentication
/// traps.
pub const HCR_GUEST: u64 =
    (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 13) | (1 << 18) | (1 << 19) | (1 << 31);
pub const HCR_TID3: u64 = 1 << 18;
pub const HCR_API: u64 = 1 << 41;
pub const HCR_APK: u64 = 1 << 40;

/// MDCR_EL2 for guests (D19.2.87): TPMCR (5) and TPM (6) trap the PMU,
/// TDOSA (10) the OS lock registers, TDRA (11) the debug ROM address,
/// TPMS (14) SPE, TTRF (19) trace filter control. TDA (9) stays 0: the
/// breakpoint and watchpoint registers are the guest's own, switched per
/// vCPU. HPMN (4:0) is set from PMCR_EL0.N at run time.
pub const MDCR_TPMCR: u64 = 1 << 5;
pub const MDCR_TPM: u64 = 1 << 6;
pub const MDCR_TDA: u64 = 1 << 9;
pub const MDCR_TDOSA: u64 = 1 << 10;
pub const MDCR_TDRA: u64 = 1 << 11;
pub const MDCR_TPMS: u64 = 1 << 14;
pub const MDCR_TTRF: u64 = 1 << 19;
pub const MDCR_GUEST: u64 = MDCR_TPMCR | MDCR_TPM | MDCR_TDOSA | MDCR_TDRA | MDCR_TPMS | MDCR_TTRF;

/// CPTR_EL2 for guests (non-VHE layout, D19.2.31): RES1 bits 13, 9 and
/// 7:0, TZ (8, trap SVE), TSM (12, trap SME), TTA (20, trap trace), TAM
/// (30, trap AMU); TFP (10) clear, FP/AdvSIMD is switched.
pub const CPTR_TZ: u64 = 1 << 8;
pub const CPTR_TFP: u64 = 1 << 10;
pub const CPTR_TSM: u64 = 1 << 12;
pub const CPTR_TTA: u64 = 1 << 20;
pub const CPTR_TAM: u64 = 1 << 30;
pub const CPTR_GUEST: u64 = 0x23ff | CPTR_TZ | CPTR_TSM | CPTR_TTA | CPTR_TAM;

/// CNTHCTL_EL2 (D19.2.25): EL1PCTEN (0) lets the guest read the physical
/// counter; EL1PCEN (1) clear traps the EL1 physical timer (emulated).
pub const CNTHCTL_EL1PCTEN: u64 = 1 << 0;
pub const CNTHCTL_EL1PCEN: u64 = 1 << 1;
pub const CNTHCTL_GUEST: u64 = CNTHCTL_EL1PCTEN;

/// A trapped system-register access (ESR_EL2 EC 0x18) the hypervisor
/// answers, by what it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SysregClass {
    /// A PMU register: the PMU is hidden, so UNDEFINED.
    Pmu,
    /// Trace filter control (TRFCR_EL1): hidden, UNDEFINED.
    Trace,
    /// The OS lock, OS double lock and debug ROM registers: RAZ/WI.
    OsLock,
    Other,
}

/// Classifies a trapped access by its ISS (Op0 [21:20], Op2 [19:17], Op1
/// [16:14], CRn [13:10], CRm [4:1]).
pub fn classify(iss: u64) -> SysregClass {
    let field = |shift: u32, bits: u32| (iss >> shift) & ((1 << bits) - 1);
    let (op0, op2, op1, crn, crm) = (field(20, 2), field(17, 3), field(14, 3), field(10, 4), field(1, 4));
    match (op0, op1, crn, crm, op2) {
        // PMCR..PMCCNTR, PMXEVTYPER/CNTR, PMUSERENR, PMOVSSET (C9, C12-C14;
        // Op1 3), PMEVCNTR<n>/PMEVTYPER<n> (C14, C8-C15; Op1 3),
        // PMINTENSET/CLR_EL1 (Op1 0, C9, C14, Op2 1-2), PMMIR_EL1.
        (3, 3, 9, 12..=14, _) | (3, 3, 14, 8..=15, _) | (3, 0, 9, 14, 1 | 2 | 6) => SysregClass::Pmu,
        // TRFCR_EL1: S3_0_C1_C2_1.
        (3, 0, 1, 2, 1) => SysregClass::Trace,
        // MDRAR_EL1 (S2_0_C1_C0_0), OSLAR (C1_C0_4), OSLSR (C1_C1_4),
        // OSDLR (C1_C3_4).
        (2, 0, 1, 0, 0 | 4) | (2, 0, 1, 1 | 3, 4) => SysregClass::OsLock,
        _ => SysregClass::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iss(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
        (op0 << 20) | (op2 << 17) | (op1 << 14) | (crn << 10) | (crm << 1)
    }

    fn handling(prefix: &str) -> Handling {
        INVENTORY.iter().find(|(n, _)| n.starts_with(prefix)).map(|&(_, h)| h).expect("in the inventory")
    }

    #[test]
    fn the_trap_bits_enforce_the_inventory() {
        assert_eq!(handling("PMU"), Handling::Hidden);
        assert_ne!(MDCR_GUEST & MDCR_TPM, 0, "PMU registers trap");
        assert_ne!(MDCR_GUEST & MDCR_TPMCR, 0, "PMCR traps");
        assert_eq!(handling("debug"), Handling::Switched);
        assert_eq!(MDCR_GUEST & MDCR_TDA, 0, "breakpoints and watchpoints are switched, not trapped");
        assert_eq!(handling("OS lock"), Handling::Emulated);
        assert_ne!(MDCR_GUEST & MDCR_TDOSA, 0);
        assert_ne!(MDCR_GUEST & MDCR_TDRA, 0);
        assert_eq!(handling("trace"), Handling::Hidden);
        assert_ne!(MDCR_GUEST & MDCR_TTRF, 0);
        assert_ne!(CPTR_GUEST & CPTR_TTA, 0);
        assert_eq!(handling("statistical profiling"), Handling::Hidden);
        assert_ne!(MDCR_GUEST & MDCR_TPMS, 0);
        assert_eq!(handling("activity monitors"), Handling::Hidden);
        assert_ne!(CPTR_GUEST & CPTR_TAM, 0);
        assert_eq!(handling("SVE"), Handling::Hidden);
        assert_ne!(CPTR_GUEST & CPTR_TZ, 0);
        assert_ne!(CPTR_GUEST & CPTR_TSM, 0);
        assert_eq!(handling("FP"), Handling::Switched);
        assert_eq!(CPTR_GUEST & CPTR_TFP, 0, "FP is the guest's, switched");
        assert_eq!(handling("pointer"), Handling::Hidden);
        assert_eq!(HCR_GUEST & (HCR_API | HCR_APK), 0, "pointer authentication traps");
        assert_eq!(handling("ID registers"), Handling::Emulated);
        assert_ne!(HCR_GUEST & HCR_TID3, 0);
        assert_eq!(handling("EL1 physical timer"), Handling::Emulated);
        assert_eq!(CNTHCTL_GUEST & CNTHCTL_EL1PCEN, 0, "the EL1 physical timer traps");
        assert_ne!(CNTHCTL_GUEST & CNTHCTL_EL1PCTEN, 0, "the physical counter is readable");
    }

    #[test]
    fn trapped_accesses_are_classified() {
        assert_eq!(classify(iss(3, 3, 9, 12, 0)), SysregClass::Pmu, "PMCR_EL0");
        assert_eq!(classify(iss(3, 3, 9, 13, 0)), SysregClass::Pmu, "PMCCNTR_EL0");
        assert_eq!(classify(iss(3, 3, 14, 8, 3)), SysregClass::Pmu, "PMEVCNTR3_EL0");
        assert_eq!(classify(iss(3, 3, 14, 15, 7)), SysregClass::Pmu, "PMCCFILTR_EL0");
        assert_eq!(classify(iss(3, 0, 9, 14, 1)), SysregClass::Pmu, "PMINTENSET_EL1");
        assert_eq!(classify(iss(3, 0, 1, 2, 1)), SysregClass::Trace, "TRFCR_EL1");
        assert_eq!(classify(iss(2, 0, 1, 0, 4)), SysregClass::OsLock, "OSLAR_EL1");
        assert_eq!(classify(iss(2, 0, 1, 1, 4)), SysregClass::OsLock, "OSLSR_EL1");
        assert_eq!(classify(iss(2, 0, 1, 0, 0)), SysregClass::OsLock, "MDRAR_EL1");
        assert_eq!(classify(iss(3, 3, 14, 2, 1)), SysregClass::Other, "CNTP_CTL_EL0 is the timer's");
        assert_eq!(classify(iss(2, 0, 0, 0, 4)), SysregClass::Other, "DBGBVR0_EL1 is not trapped");
    }
}
