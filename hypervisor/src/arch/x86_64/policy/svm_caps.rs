//! What AMD SVM offers (AMD64 APM Vol. 2 ch. 15; Vol. 3 Appendix E,
//! CPUID Fn8000_0001 and Fn8000_000A), decoded from CPUID and VM_CR, and
//! whether it is enough to run guests the way the SVM backend will: nested
//! paging and at least one ASID besides the host's.

/// CPUID Fn8000_0001 ECX bit 2: SVM.
const EXT_ECX_SVM: u32 = 1 << 2;
/// CPUID Fn8000_000A EDX feature bits (APM Vol. 3, E.4.9).
const EDX_NP: u32 = 1 << 0;
const EDX_NRIPS: u32 = 1 << 3;
const EDX_VMCB_CLEAN: u32 = 1 << 5;
const EDX_FLUSH_BY_ASID: u32 = 1 << 6;
const EDX_DECODE_ASSISTS: u32 = 1 << 7;
const EDX_VGIF: u32 = 1 << 16;
/// VM_CR (MSR C001_0114) bit 4: SVMDIS, EFER.SVME cannot be set (APM Vol.
/// 2 §15.30.1); bit 3 LOCK says firmware made that final.
pub const VM_CR_SVMDIS: u64 = 1 << 4;

/// What the CPU's SVM offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvmCaps {
    /// SVM revision (Fn8000_000A EAX[7:0]).
    pub revision: u8,
    /// Address space identifiers, ASID 0 (the host's) included (EBX).
    pub asids: u32,
    /// The feature bits (EDX), read through the methods below.
    pub features: u32,
}

/// Why SVM cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvmError {
    /// CPUID Fn8000_0001 ECX.SVM is clear (or the leaf is missing).
    NoSvm,
    /// Firmware set VM_CR.SVMDIS.
    DisabledByFirmware,
    /// No nested paging: the backend confines guests with NPT only.
    NoNestedPaging,
    /// Fewer than two ASIDs: no guest ASID beside the host's 0.
    NoGuestAsid,
    /// A CPU index past the host save areas the image has.
    TooManyCpus,
}

impl SvmError {
    pub fn reason(self) -> &'static str {
        match self {
            Self::NoSvm => "cpuid-no-svm",
            Self::DisabledByFirmware => "vm-cr-svmdis",
            Self::NoNestedPaging => "no-nested-paging",
            Self::NoGuestAsid => "no-guest-asid",
            Self::TooManyCpus => "cpu-index-beyond-max-cpus",
        }
    }
}

/// The CPUID values SVM is read from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvmCpuid {
    /// Highest extended leaf (Fn8000_0000 EAX).
    pub max_extended_leaf: u32,
    /// Fn8000_0001 ECX.
    pub ext_features_ecx: u32,
    /// Fn8000_000A EAX, EBX, EDX.
    pub svm_eax: u32,
    pub svm_ebx: u32,
    pub svm_edx: u32,
}

impl SvmCaps {
    /// Decodes the capabilities; `vm_cr` is VM_CR's value (read only when
    /// CPUID reports SVM, as the MSR exists only then).
    pub fn decode(cpuid: SvmCpuid, vm_cr: impl FnOnce() -> u64) -> Result<SvmCaps, SvmError> {
        if cpuid.max_extended_leaf < 0x8000_000a || cpuid.ext_features_ecx & EXT_ECX_SVM == 0 {
            return Err(SvmError::NoSvm);
        }
        if vm_cr() & VM_CR_SVMDIS != 0 {
            return Err(SvmError::DisabledByFirmware);
        }
        Ok(SvmCaps { revision: (cpuid.svm_eax & 0xff) as u8, asids: cpuid.svm_ebx, features: cpuid.svm_edx })
    }

    /// Nested paging.
    pub fn npt(&self) -> bool {
        self.features & EDX_NP != 0
    }

    /// The processor saves the next RIP on intercepts (NRIP_SAVE). QEMU's
    /// TCG does not offer it: the backend must know instruction lengths.
    pub fn nrip(&self) -> bool {
        self.features & EDX_NRIPS != 0
    }

    /// VMCB clean bits.
    pub fn vmcb_clean(&self) -> bool {
        self.features & EDX_VMCB_CLEAN != 0
    }

    /// TLB_CONTROL can flush one ASID's entries.
    pub fn flush_by_asid(&self) -> bool {
        self.features & EDX_FLUSH_BY_ASID != 0
    }

    /// Intercepts report the instruction's decoded operands.
    pub fn decode_assists(&self) -> bool {
        self.features & EDX_DECODE_ASSISTS != 0
    }

    /// Virtual global interrupt flag.
    pub fn vgif(&self) -> bool {
        self.features & EDX_VGIF != 0
    }

    /// Whether guests can run: nested paging, and an ASID for them.
    pub fn check_guest_support(&self) -> Result<(), SvmError> {
        if !self.npt() {
            return Err(SvmError::NoNestedPaging);
        }
        if self.asids < 2 {
            return Err(SvmError::NoGuestAsid);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fn8000_000A as QEMU 10's `-cpu max` reports it under TCG (seen in
    /// `boot::x86_64_qemu_tcg_enables_svm_on_both_cpus_and_finds_the_vt_d_unit`:
    /// revision 1, 16 ASIDs, EDX 0x10010001 = NP, VGIF, bit 28; no
    /// NRIP_SAVE); of Fn8000_0001 ECX only bit 2 (SVM) matters here.
    const QEMU_MAX: SvmCpuid = SvmCpuid {
        max_extended_leaf: 0x8000_0023,
        ext_features_ecx: 0x0000_0025,
        svm_eax: 0x1,
        svm_ebx: 16,
        svm_edx: (1 << 0) | (1 << 16) | (1 << 28),
    };

    #[test]
    fn qemu_tcg_offers_nested_paging_without_nrip() {
        let caps = SvmCaps::decode(QEMU_MAX, || 0).unwrap();
        assert_eq!((caps.revision, caps.asids), (1, 16));
        assert!(caps.npt() && caps.vgif());
        assert!(!caps.nrip() && !caps.vmcb_clean() && !caps.flush_by_asid() && !caps.decode_assists());
        assert_eq!(caps.check_guest_support(), Ok(()));
    }

    #[test]
    fn vm_cr_is_read_only_when_cpuid_reports_svm() {
        let none = SvmCpuid { ext_features_ecx: 0, ..QEMU_MAX };
        assert_eq!(SvmCaps::decode(none, || unreachable!("no SVM: VM_CR does not exist")), Err(SvmError::NoSvm));
        let short = SvmCpuid { max_extended_leaf: 0x8000_0008, ..QEMU_MAX };
        assert_eq!(SvmCaps::decode(short, || unreachable!("no leaf 0x8000000a")), Err(SvmError::NoSvm));
        assert_eq!(SvmCaps::decode(QEMU_MAX, || VM_CR_SVMDIS | (1 << 3)), Err(SvmError::DisabledByFirmware));
    }

    #[test]
    fn guests_need_nested_paging_and_an_asid() {
        let no_np = SvmCaps::decode(SvmCpuid { svm_edx: 1 << 16, ..QEMU_MAX }, || 0).unwrap();
        assert_eq!(no_np.check_guest_support(), Err(SvmError::NoNestedPaging));
        let one_asid = SvmCaps::decode(SvmCpuid { svm_ebx: 1, ..QEMU_MAX }, || 0).unwrap();
        assert_eq!(one_asid.check_guest_support(), Err(SvmError::NoGuestAsid));
        for e in [SvmError::NoSvm, SvmError::DisabledByFirmware, SvmError::NoNestedPaging, SvmError::NoGuestAsid] {
            assert!(!e.reason().is_empty());
        }
    }
}
