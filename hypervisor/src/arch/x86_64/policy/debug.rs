//! The debug registers a guest reaches (SDM Vol. 3B ch. 19, "Debug,
//! Branch Profile, TSC, and Intel Resource Director Technology Features",
//! §19.2). Every MOV DR exits (primary processor-based control 23, "MOV-DR
//! exiting"), so the guest's values live with its vCPU and the hypervisor
//! decides each access here:
//! - DR0-DR3 (breakpoint addresses) and DR6 (status) are switched in
//!   software: loaded into the processor when the vCPU is loaded on a CPU,
//!   DR6 read back when it is put (a #DB the guest takes updates it);
//! - DR7 (control) is a VMCS guest-state field, loaded by VM entry and
//!   saved by VM exit ("load/save debug controls", `vmx_caps`);
//! - DR4 and DR5 alias DR6 and DR7 while CR4.DE is clear and are #UD when
//!   it is set (§19.2.2).
//!
//! A MOV DR while DR7.GD is set is a general-detect #DB (§19.2.4): the VM
//! exit takes priority over it, so the hypervisor raises it instead, with
//! DR6.BD set and DR7.GD cleared as the processor would on delivery.

use super::GpFault;

/// DR6 and DR7 after reset (§19.2.3, §19.2.4).
pub const DR6_INIT: u64 = 0xffff_0ff0;
pub const DR7_INIT: u64 = 0x400;
/// DR6 bits software may change: B0-B3 (3:0), BD (13), BS (14), BT (15).
/// The others read as their reset value.
const DR6_WRITABLE: u64 = 0xf | DR6_BD | (1 << 14) | (1 << 15);
/// DR6.BD: the debug exception was a general detect.
pub const DR6_BD: u64 = 1 << 13;
/// DR7 bit 10 reads as 1; bits 11, 12, 14 and 15 as 0.
const DR7_FIXED1: u64 = 1 << 10;
const DR7_FIXED0: u64 = (1 << 11) | (1 << 12) | (1 << 14) | (1 << 15);
/// DR7.GD: general detect enable.
pub const DR7_GD: u64 = 1 << 13;
/// DR6 and DR7 bits 63:32 are reserved: writing 1 there is #GP(0).
const UPPER_RESERVED: u64 = 0xffff_ffff_0000_0000;

/// The register a MOV DR names, once aliases are resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebugReg {
    /// DR0-DR3.
    Address(usize),
    Status,
    Control,
}

/// What a MOV DR becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrDecision {
    Access(DebugReg),
    /// #UD: DR4/DR5 with CR4.DE set, or a register number above 7.
    Undefined,
    /// #DB (general detect): DR7.GD is set.
    GeneralDetect,
}

/// Resolves `MOV DR<n>` for a guest whose CR4.DE is `cr4_de` and whose
/// DR7 is `dr7`.
pub fn decide(n: u8, cr4_de: bool, dr7: u64) -> DrDecision {
    let reg = match n {
        0..=3 => DebugReg::Address(usize::from(n)),
        4 | 5 if cr4_de => return DrDecision::Undefined,
        4 | 6 => DebugReg::Status,
        5 | 7 => DebugReg::Control,
        _ => return DrDecision::Undefined,
    };
    if dr7 & DR7_GD != 0 {
        return DrDecision::GeneralDetect;
    }
    DrDecision::Access(reg)
}

/// The value `MOV DR<reg>, value` leaves in the register, or the #GP(0)
/// it raises. Breakpoint addresses take any value (they are linear
/// addresses, compared as such).
pub fn write_value(reg: DebugReg, value: u64) -> Result<u64, GpFault> {
    match reg {
        DebugReg::Address(_) => Ok(value),
        _ if value & UPPER_RESERVED != 0 => Err(GpFault::ReservedBits),
        DebugReg::Status => Ok((value & DR6_WRITABLE) | (DR6_INIT & !DR6_WRITABLE)),
        DebugReg::Control => Ok((value & !DR7_FIXED0) | DR7_FIXED1),
    }
}

/// DR6 and DR7 after the hypervisor raises a general-detect #DB.
pub fn general_detect(dr6: u64, dr7: u64) -> (u64, u64) {
    (dr6 | DR6_BD, dr7 & !DR7_GD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dr4_and_dr5_alias_unless_cr4_de() {
        assert_eq!(decide(4, false, DR7_INIT), DrDecision::Access(DebugReg::Status));
        assert_eq!(decide(5, false, DR7_INIT), DrDecision::Access(DebugReg::Control));
        assert_eq!(decide(4, true, DR7_INIT), DrDecision::Undefined);
        assert_eq!(decide(5, true, DR7_INIT), DrDecision::Undefined);
        assert_eq!(decide(6, true, DR7_INIT), DrDecision::Access(DebugReg::Status));
        assert_eq!(decide(2, true, DR7_INIT), DrDecision::Access(DebugReg::Address(2)));
        assert_eq!(decide(8, false, DR7_INIT), DrDecision::Undefined);
        assert_eq!(decide(0xff, false, DR7_INIT), DrDecision::Undefined);
    }

    #[test]
    fn general_detect_comes_before_any_access() {
        assert_eq!(decide(0, false, DR7_INIT | DR7_GD), DrDecision::GeneralDetect);
        assert_eq!(decide(7, false, DR7_INIT | DR7_GD), DrDecision::GeneralDetect);
        // An undefined register is #UD whatever GD says (§19.2.4: the
        // general detect condition is checked for valid MOV DR only).
        assert_eq!(decide(5, true, DR7_INIT | DR7_GD), DrDecision::Undefined);
        assert_eq!(general_detect(DR6_INIT, DR7_INIT | DR7_GD | 1), (DR6_INIT | DR6_BD, DR7_INIT | 1));
    }

    #[test]
    fn writes_keep_fixed_bits_and_refuse_reserved_ones() {
        assert_eq!(write_value(DebugReg::Address(3), u64::MAX), Ok(u64::MAX));
        assert_eq!(write_value(DebugReg::Status, 0), Ok(DR6_INIT & !DR6_WRITABLE));
        assert_eq!(write_value(DebugReg::Status, 0x2), Ok(0xffff_0ff2));
        assert_eq!(write_value(DebugReg::Status, 1 << 32), Err(GpFault::ReservedBits));
        assert_eq!(write_value(DebugReg::Control, 0), Ok(DR7_INIT));
        assert_eq!(write_value(DebugReg::Control, 0xffff_ffff), Ok(0xffff_ffff & !DR7_FIXED0));
        assert_eq!(write_value(DebugReg::Control, 1 << 40), Err(GpFault::ReservedBits));
    }
}
