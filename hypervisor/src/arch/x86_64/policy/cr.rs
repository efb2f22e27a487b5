//! The guest's CR0 and CR4. A guest reads its control registers through
//! the read shadows and changes the bits outside the guest/host masks
//! natively (SDM Vol. 3C §25.6.6); writing a masked bit with a value that
//! differs from the shadow exits, and is emulated here. The masks cover
//! the bits VMX pins (CR0.NE, CR4.VMXE; the fixed-bit MSRs, with CR0.PE
//! and CR0.PG free under unrestricted guest) and every CR4 feature the
//! guest's CPUID does not offer, so setting one of those is a #GP, as on a
//! processor without the feature.

use super::msr::{EFER_LMA, EFER_LME};
use super::GpFault;
use crate::arch::x86_64::vmx_caps::{CrFixed, VmxMsrs};

/// CR0 bits (SDM Vol. 3A §2.5).
pub mod cr0 {
    pub const PE: u64 = 1 << 0;
    pub const ET: u64 = 1 << 4;
    pub const NE: u64 = 1 << 5;
    pub const NW: u64 = 1 << 29;
    pub const CD: u64 = 1 << 30;
    pub const PG: u64 = 1 << 31;
}

/// CR4 bits (SDM Vol. 3A §2.5).
pub mod cr4 {
    pub const VME: u64 = 1 << 0;
    pub const PVI: u64 = 1 << 1;
    pub const TSD: u64 = 1 << 2;
    pub const DE: u64 = 1 << 3;
    pub const PSE: u64 = 1 << 4;
    pub const PAE: u64 = 1 << 5;
    pub const MCE: u64 = 1 << 6;
    pub const PGE: u64 = 1 << 7;
    pub const PCE: u64 = 1 << 8;
    pub const OSFXSR: u64 = 1 << 9;
    pub const OSXMMEXCPT: u64 = 1 << 10;
    pub const UMIP: u64 = 1 << 11;
    pub const VMXE: u64 = 1 << 13;
    pub const FSGSBASE: u64 = 1 << 16;
    pub const SMEP: u64 = 1 << 20;
    pub const SMAP: u64 = 1 << 21;
}

/// CR4 bits a guest may set, if the processor has them: those whose
/// features the guest's CPUID offers and that need no hypervisor help.
/// Not VMXE/SMXE (no nested VMX or SMX), OSXSAVE/PKE (no XSAVE), PCIDE,
/// LA57, CET.
pub const CR4_GUEST_BITS: u64 = cr4::VME
    | cr4::PVI
    | cr4::TSD
    | cr4::DE
    | cr4::PSE
    | cr4::PAE
    | cr4::MCE
    | cr4::PGE
    | cr4::PCE
    | cr4::OSFXSR
    | cr4::OSXMMEXCPT
    | cr4::UMIP
    | cr4::FSGSBASE
    | cr4::SMEP
    | cr4::SMAP;

/// The CR4 bits of [`CR4_GUEST_BITS`] this processor has, from CPUID
/// leaf 1 EDX (VME 1, DE 2, PSE 3, PAE 6, MCE 7, PGE 13, FXSR 24, SSE 25)
/// and leaf 7 EBX/ECX (FSGSBASE EBX 0, SMEP EBX 7, SMAP EBX 20, UMIP ECX
/// 2) (SDM Vol. 3A §2.5, Table 2-2 maps each bit to its feature flag).
/// TSD and PCE need no feature.
pub fn cr4_supported(features1_d: u32, features7_b: u32, features7_c: u32) -> u64 {
    let has = |reg: u32, bit: u32| reg & (1 << bit) != 0;
    let mut bits = cr4::TSD | cr4::PCE;
    for (present, bit) in [
        (has(features1_d, 1), cr4::VME | cr4::PVI),
        (has(features1_d, 2), cr4::DE),
        (has(features1_d, 3), cr4::PSE),
        (has(features1_d, 6), cr4::PAE),
        (has(features1_d, 7), cr4::MCE),
        (has(features1_d, 13), cr4::PGE),
        (has(features1_d, 24), cr4::OSFXSR),
        (has(features1_d, 25), cr4::OSXMMEXCPT),
        (has(features7_b, 0), cr4::FSGSBASE),
        (has(features7_b, 7), cr4::SMEP),
        (has(features7_b, 20), cr4::SMAP),
        (has(features7_c, 2), cr4::UMIP),
    ] {
        if present {
            bits |= bit;
        }
    }
    bits
}

/// Bits 63:32 of CR0 and CR4 are reserved.
const CR_RESERVED_HIGH: u64 = 0xffff_ffff_0000_0000;

/// A control register as the processor holds it and as the guest reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrValue {
    pub real: u64,
    pub shadow: u64,
}

/// What else an emulated CR0 write changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingChange {
    None,
    /// Paging on with IA32_EFER.LME: IA32_EFER.LMA and the "IA-32e mode
    /// guest" entry control become 1.
    EnterLongMode,
    /// Paging off in compatibility mode: LMA and the control become 0.
    LeaveLongMode,
    /// Paging on with CR4.PAE and without LME: VM entry takes the four
    /// PDPTEs from the VMCS, so the hypervisor must load them (§27.3.2.4).
    EnterPae,
}

/// The outcome of an emulated CR0 write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cr0Write {
    pub value: CrValue,
    /// IA32_EFER after the write (LMA may change).
    pub efer: u64,
    pub paging: PagingChange,
}

/// The guest state a CR write is judged against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrContext {
    /// CR0 and CR4 as the guest sees them (the read shadows merged with
    /// the guest-owned bits).
    pub cr0: u64,
    pub cr4: u64,
    pub efer: u64,
    /// CS.L: the guest runs 64-bit code.
    pub cs_long: bool,
}

/// The CR0/CR4 rules for this processor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestCrPolicy {
    cr0: CrFixed,
    cr4: CrFixed,
    cr4_allowed: u64,
}

impl GuestCrPolicy {
    pub fn new(m: &VmxMsrs) -> Self {
        let cr4 = CrFixed { fixed0: m.cr4_fixed0, fixed1: m.cr4_fixed1, exempt: 0 };
        Self {
            // Unrestricted guest frees PE and PG (SDM §27.3.1.1).
            cr0: CrFixed { fixed0: m.cr0_fixed0, fixed1: m.cr0_fixed1, exempt: cr0::PE | cr0::PG },
            cr4,
            cr4_allowed: CR4_GUEST_BITS & m.cr4_fixed1 & !cr4.pinned(),
        }
    }

    /// The rules under AMD SVM, which pins no CR0 bit (a guest's CR0 and
    /// CR4 are the registers it reads, with no read shadows): a CR4 bit
    /// is refused when the processor lacks it (`cr4_supported`, from
    /// CPUID: [`cr4_supported`]) or the guest may not set it.
    pub fn unpinned(cr4_supported: u64) -> Self {
        let cr4 = CrFixed { fixed0: 0, fixed1: cr4_supported, exempt: 0 };
        Self {
            cr0: CrFixed { fixed0: 0, fixed1: u64::MAX, exempt: 0 },
            cr4,
            cr4_allowed: CR4_GUEST_BITS & cr4_supported & !cr4.pinned(),
        }
    }

    /// The CR0 guest/host mask: the bits VMX pins.
    pub fn cr0_mask(&self) -> u64 {
        self.cr0.pinned()
    }

    /// The CR4 guest/host mask: the pinned bits and every bit the guest may
    /// not set.
    pub fn cr4_mask(&self) -> u64 {
        (self.cr4.pinned() | !self.cr4_allowed) & !CR_RESERVED_HIGH
    }

    /// CR0 as a multiboot2 loader leaves it: protected mode, no paging
    /// (Multiboot2 spec §3.3). NE reads as 1 because it is 1: VMX pins it.
    pub fn initial_cr0(&self) -> CrValue {
        let shadow = cr0::PE | cr0::ET | cr0::NE;
        CrValue { real: self.cr0.apply(shadow), shadow }
    }

    /// CR0 after INIT, where a start-up IPI starts a vCPU (SDM Vol. 3A
    /// §10.1.1, Table 10-1: 60000010H): real mode, no paging, ET. CD and
    /// NW stay clear in the register, where the guest reads them: VM entry
    /// does not load them (SDM Vol. 3C §27.3.2.1), so the processor keeps
    /// caching on whatever the field says. NE reads as 0 (the shadow) and
    /// is 1: VMX pins it.
    pub fn reset_cr0(&self) -> CrValue {
        let shadow = cr0::ET;
        CrValue { real: self.cr0.apply(shadow), shadow }
    }

    pub fn initial_cr4(&self) -> CrValue {
        CrValue { real: self.cr4.apply(0), shadow: 0 }
    }

    /// Emulates MOV to CR0 (SDM Vol. 2B "MOV—Move to/from Control
    /// Registers", its #GP(0) conditions, and Vol. 3A §10.8.5 for the
    /// switch into and out of IA-32e mode).
    pub fn write_cr0(&self, value: u64, ctx: CrContext) -> Result<Cr0Write, GpFault> {
        if value & CR_RESERVED_HIGH != 0 {
            return Err(GpFault::ReservedBits);
        }
        if (value & cr0::PG != 0 && value & cr0::PE == 0) || (value & cr0::NW != 0 && value & cr0::CD == 0) {
            return Err(GpFault::InvalidTransition);
        }
        let (was, now) = (ctx.cr0 & cr0::PG != 0, value & cr0::PG != 0);
        let (efer, paging) = match (was, now) {
            (false, true) if ctx.efer & EFER_LME != 0 => {
                if ctx.cr4 & cr4::PAE == 0 {
                    return Err(GpFault::InvalidTransition);
                }
                (ctx.efer | EFER_LMA, PagingChange::EnterLongMode)
            }
            (false, true) if ctx.cr4 & cr4::PAE != 0 => (ctx.efer, PagingChange::EnterPae),
            (true, false) if ctx.efer & EFER_LMA != 0 => {
                if ctx.cs_long {
                    return Err(GpFault::InvalidTransition);
                }
                (ctx.efer & !EFER_LMA, PagingChange::LeaveLongMode)
            }
            _ => (ctx.efer, PagingChange::None),
        };
        Ok(Cr0Write { value: CrValue { real: self.cr0.apply(value), shadow: value }, efer, paging })
    }

    /// Emulates MOV to CR4.
    pub fn write_cr4(&self, value: u64, ctx: CrContext) -> Result<CrValue, GpFault> {
        if value & CR_RESERVED_HIGH != 0 {
            return Err(GpFault::ReservedBits);
        }
        if value & !self.cr4_allowed != 0 {
            return Err(GpFault::HiddenFeature);
        }
        if ctx.efer & EFER_LMA != 0 && value & cr4::PAE == 0 {
            return Err(GpFault::InvalidTransition);
        }
        Ok(CrValue { real: self.cr4.apply(value), shadow: value })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bochs 2.7 `corei7_skylake_x`.
    fn policy() -> GuestCrPolicy {
        GuestCrPolicy::new(&VmxMsrs {
            cr0_fixed0: 0x8000_0021,
            cr0_fixed1: 0xffff_ffff,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x0037_27ff,
            ..VmxMsrs::default()
        })
    }

    fn ctx(cr0: u64, cr4: u64, efer: u64) -> CrContext {
        CrContext { cr0, cr4, efer, cs_long: false }
    }

    #[test]
    fn masks_and_initial_values() {
        let p = policy();
        assert_eq!(p.cr0_mask(), cr0::NE);
        let mask = p.cr4_mask();
        assert_ne!(mask & cr4::VMXE, 0);
        assert_ne!(mask & (1 << 18), 0, "OSXSAVE is the guest's to never set");
        assert_ne!(mask & cr4::UMIP, 0, "this processor has no UMIP");
        assert_eq!(mask & (cr4::PAE | cr4::OSFXSR | cr4::SMEP), 0);
        assert_eq!(p.initial_cr0(), CrValue { real: 0x31, shadow: 0x31 });
        assert_eq!(p.initial_cr4(), CrValue { real: cr4::VMXE, shadow: 0 });
        // After INIT: real mode (PE and PG clear, which unrestricted guest
        // allows), NE pinned in the register and 0 in what the guest reads.
        assert_eq!(p.reset_cr0(), CrValue { real: cr0::ET | cr0::NE, shadow: cr0::ET });
    }

    #[test]
    fn cr0_paging_transitions() {
        let p = policy();
        let pm = cr0::PE | cr0::ET;
        let long = p.write_cr0(pm | cr0::PG, ctx(pm, cr4::PAE, EFER_LME)).unwrap();
        assert_eq!(long.paging, PagingChange::EnterLongMode);
        assert_eq!(long.efer, EFER_LME | EFER_LMA);
        assert_eq!(long.value, CrValue { real: pm | cr0::PG | cr0::NE, shadow: pm | cr0::PG });
        let pae = p.write_cr0(pm | cr0::PG, ctx(pm, cr4::PAE, 0)).unwrap();
        assert_eq!(pae.paging, PagingChange::EnterPae);
        let flat = p.write_cr0(pm | cr0::PG, ctx(pm, 0, 0)).unwrap();
        assert_eq!(flat.paging, PagingChange::None);
        let lma = EFER_LME | EFER_LMA;
        let out = p.write_cr0(pm, ctx(pm | cr0::PG, cr4::PAE, lma)).unwrap();
        assert_eq!((out.paging, out.efer), (PagingChange::LeaveLongMode, EFER_LME));
        let in64 = CrContext { cs_long: true, ..ctx(pm | cr0::PG, cr4::PAE, lma) };
        assert_eq!(p.write_cr0(pm, in64), Err(GpFault::InvalidTransition));
    }

    #[test]
    fn cr0_faults() {
        let p = policy();
        let c = ctx(cr0::PE, 0, 0);
        assert_eq!(p.write_cr0(cr0::PG, c), Err(GpFault::InvalidTransition));
        assert_eq!(p.write_cr0(cr0::PE | cr0::NW, c), Err(GpFault::InvalidTransition));
        assert_eq!(p.write_cr0(1 << 32, c), Err(GpFault::ReservedBits));
        assert_eq!(p.write_cr0(cr0::PE | cr0::PG, ctx(cr0::PE, 0, EFER_LME)), Err(GpFault::InvalidTransition));
        // Clearing NE: the guest reads 0, the processor keeps 1.
        let w = p.write_cr0(cr0::PE, c).unwrap();
        assert_eq!(w.value, CrValue { real: cr0::PE | cr0::NE, shadow: cr0::PE });
    }

    #[test]
    fn cr4_rules() {
        let p = policy();
        assert_eq!(p.write_cr4(cr4::VMXE, ctx(0, 0, 0)), Err(GpFault::HiddenFeature));
        assert_eq!(p.write_cr4(1 << 18, ctx(0, 0, 0)), Err(GpFault::HiddenFeature));
        assert_eq!(p.write_cr4(1 << 40, ctx(0, 0, 0)), Err(GpFault::ReservedBits));
        assert_eq!(p.write_cr4(0, ctx(0, cr4::PAE, EFER_LMA)), Err(GpFault::InvalidTransition));
        let v = p.write_cr4(cr4::PAE | cr4::OSFXSR, ctx(0, 0, 0)).unwrap();
        assert_eq!(v, CrValue { real: cr4::PAE | cr4::OSFXSR | cr4::VMXE, shadow: cr4::PAE | cr4::OSFXSR });
    }

    #[test]
    fn unpinned_rules_pin_nothing_and_refuse_missing_cr4_features() {
        // PAE, PSE, FXSR, SSE; no SMEP, no UMIP.
        let supported = cr4_supported((1 << 3) | (1 << 6) | (1 << 24) | (1 << 25), 0, 0);
        assert_eq!(supported, cr4::TSD | cr4::PCE | cr4::PSE | cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT);
        let p = GuestCrPolicy::unpinned(supported);
        assert_eq!(p.initial_cr0().real, p.initial_cr0().shadow);
        assert_eq!(p.reset_cr0(), CrValue { real: cr0::ET, shadow: cr0::ET });
        assert_eq!(p.initial_cr4(), CrValue { real: 0, shadow: 0 });
        assert_eq!(p.cr0_mask(), 0);
        let ctx = CrContext { cr0: cr0::PE | cr0::ET, cr4: 0, efer: 0, cs_long: false };
        assert_eq!(p.write_cr4(cr4::PAE, ctx), Ok(CrValue { real: cr4::PAE, shadow: cr4::PAE }));
        assert_eq!(p.write_cr4(cr4::SMEP, ctx), Err(GpFault::HiddenFeature));
        assert_eq!(p.write_cr4(cr4::VMXE, ctx), Err(GpFault::HiddenFeature));
        // CD and NW are the guest's to set under SVM.
        let w = p.write_cr0(cr0::PE | cr0::CD | cr0::NW, ctx).unwrap();
        assert_eq!(w.value.real, w.value.shadow);
    }
}
