//! What an SVM intercept means, where the processor offers neither decode
//! assists nor NRIP_SAVE (QEMU's TCG, `shared/EMULATORS.md`): the exit
//! code and EXITINFO1/2 (AMD64 APM Vol. 2 §15.7-15.13, §15.25.6) become
//! the same accesses the VMX exit qualifications decode to
//! ([`super::vmx_exit`]), so one set of handlers serves both backends. A
//! MOV to or from a control or debug register, and an Intel VMCALL (a #UD
//! on AMD), are read from the guest's instruction bytes.

use super::emulate::CodeSize;
use super::vmx_exit::{CrAccess, DrAccess, EptViolation, Gpr, IoAccess};

/// IOIO EXITINFO1 (§15.10.2, Figure 15-2): TYPE (0, 1 = IN), STR (2),
/// REP (3), SZ8/SZ16/SZ32 (4, 5, 6), PORT (31:16).
const IO_IN: u64 = 1 << 0;
const IO_STR: u64 = 1 << 2;
const IO_REP: u64 = 1 << 3;
const IO_SZ16: u64 = 1 << 5;
const IO_SZ32: u64 = 1 << 6;
const IO_PORT_SHIFT: u32 = 16;

/// An IN/OUT intercept's access, as VMX's exit qualification gives it.
pub const fn io_access(exitinfo1: u64) -> IoAccess {
    let size = if exitinfo1 & IO_SZ32 != 0 {
        4
    } else if exitinfo1 & IO_SZ16 != 0 {
        2
    } else {
        1
    };
    IoAccess {
        port: (exitinfo1 >> IO_PORT_SHIFT) as u16,
        size,
        input: exitinfo1 & IO_IN != 0,
        string: exitinfo1 & IO_STR != 0,
        rep: exitinfo1 & IO_REP != 0,
    }
}

/// Nested page fault EXITINFO1 (§15.25.6, the #PF error code): P (0),
/// RW (1), RSV (3), ID (4).
const NPF_PRESENT: u64 = 1 << 0;
const NPF_WRITE: u64 = 1 << 1;
const NPF_RESERVED: u64 = 1 << 3;
const NPF_FETCH: u64 = 1 << 4;

/// A nested page fault as the EPT violation it corresponds to.
pub const fn npf_access(exitinfo1: u64) -> EptViolation {
    let write = exitinfo1 & NPF_WRITE != 0;
    let fetch = exitinfo1 & NPF_FETCH != 0;
    EptViolation { read: !write && !fetch, write, fetch, mapped: exitinfo1 & NPF_PRESENT != 0, linear_valid: false }
}

/// The nested table had a reserved bit set: the EPT misconfiguration's
/// counterpart.
pub const fn npf_reserved(exitinfo1: u64) -> bool {
    exitinfo1 & NPF_RESERVED != 0
}

/// A MOV to or from CRn or DRn, decoded from its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MovCrDr {
    Cr(CrAccess),
    Dr(DrAccess),
}

/// Why the bytes at the guest's RIP are not the MOV the intercept named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the instruction needs (a page did not translate).
    Truncated,
    /// Something else: the guest changed its code, or a prefix this
    /// decoder does not take.
    NotMovCrDr,
}

impl DecodeError {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::NotMovCrDr => "not-mov-cr-dr",
        }
    }
}

/// Decodes MOV CRn/DRn (`0f 20`/`0f 22` and `0f 21`/`0f 23` /r, SDM Vol.
/// 2B "MOV—Move to/from Control Registers", "MOV—Move to/from Debug
/// Registers"): ModRM.reg names the control or debug register (REX.R
/// adds 8; on AMD a LOCK prefix does too for CR8 outside 64-bit mode,
/// APM Vol. 3 "MOV CRn"), ModRM.rm the general-purpose register (REX.B
/// adds 8), whatever ModRM.mod says. Returns the access and the length.
pub fn decode_mov_cr_dr(bytes: &[u8], code: CodeSize) -> Result<(MovCrDr, u64), DecodeError> {
    let mut at = 0;
    let (mut rex_r, mut rex_b, mut lock) = (0u8, 0u8, false);
    loop {
        let b = *bytes.get(at).ok_or(DecodeError::Truncated)?;
        match b {
            0xf0 => lock = true,
            // Operand- and address-size prefixes do not change MOV CR/DR.
            0x66 | 0x67 => {}
            0x40..=0x4f if code == CodeSize::Bits64 => {
                rex_r = (b >> 2) & 1;
                rex_b = b & 1;
                at += 1;
                break;
            }
            _ => break,
        }
        at += 1;
        if at > 4 {
            return Err(DecodeError::NotMovCrDr);
        }
    }
    let escape = *bytes.get(at).ok_or(DecodeError::Truncated)?;
    let op = *bytes.get(at + 1).ok_or(DecodeError::Truncated)?;
    let modrm = *bytes.get(at + 2).ok_or(DecodeError::Truncated)?;
    if escape != 0x0f {
        return Err(DecodeError::NotMovCrDr);
    }
    let reg = ((modrm >> 3) & 7) | (rex_r << 3) | if lock { 8 } else { 0 };
    let gpr = Gpr::from_number((modrm & 7) | (rex_b << 3));
    let access = match op {
        0x20 => MovCrDr::Cr(CrAccess::MovFromCr { cr: reg, gpr }),
        0x22 => MovCrDr::Cr(CrAccess::MovToCr { cr: reg, gpr }),
        0x21 if !lock => MovCrDr::Dr(DrAccess { dr: reg, read: true, gpr }),
        0x23 if !lock => MovCrDr::Dr(DrAccess { dr: reg, read: false, gpr }),
        _ => return Err(DecodeError::NotMovCrDr),
    };
    Ok((access, at as u64 + 3))
}

/// Intel's VMCALL (`0f 01 c1`), which raises #UD on AMD: the test guests'
/// hypercall instruction, carried out from the #UD intercept so they run
/// unchanged on both vendors. Its length.
pub const VMCALL: [u8; 3] = [0x0f, 0x01, 0xc1];
pub const VMCALL_LEN: u64 = VMCALL.len() as u64;

/// Whether the bytes at the faulting RIP are VMCALL.
pub fn is_vmcall(bytes: &[u8]) -> bool {
    bytes.starts_with(&VMCALL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioio_exitinfo1_decodes_as_the_apm_lays_it_out() {
        // `out dx, al` to 0x3f8; `in eax, dx` from 0xcfc; `rep outsw`.
        let out = io_access((0x3f8 << 16) | (1 << 4));
        assert_eq!(out, IoAccess { port: 0x3f8, size: 1, input: false, string: false, rep: false });
        let input = io_access((0xcfc << 16) | (1 << 6) | 1);
        assert_eq!(input, IoAccess { port: 0xcfc, size: 4, input: true, string: false, rep: false });
        let rep = io_access((0x80 << 16) | (1 << 5) | (1 << 3) | (1 << 2));
        assert_eq!(rep, IoAccess { port: 0x80, size: 2, input: false, string: true, rep: true });
    }

    #[test]
    fn nested_page_fault_error_codes() {
        let read = npf_access(0x1_0000_0004);
        assert!(read.read && !read.write && !read.fetch && !read.mapped);
        let write = npf_access(0x1_0000_0007);
        assert!(write.write && write.mapped && !write.read);
        let fetch = npf_access(0x1_0000_0014);
        assert!(fetch.fetch && !fetch.read);
        assert!(npf_reserved(0x9) && !npf_reserved(0x7));
    }

    #[test]
    fn mov_to_and_from_control_registers() {
        // mov cr0, eax (32-bit)
        assert_eq!(
            decode_mov_cr_dr(&[0x0f, 0x22, 0xc0], CodeSize::Bits32),
            Ok((MovCrDr::Cr(CrAccess::MovToCr { cr: 0, gpr: Gpr::RAX }), 3))
        );
        // mov rbx, cr4 (64-bit, no REX needed)
        assert_eq!(
            decode_mov_cr_dr(&[0x0f, 0x20, 0xe3], CodeSize::Bits64),
            Ok((MovCrDr::Cr(CrAccess::MovFromCr { cr: 4, gpr: Gpr::RBX }), 3))
        );
        // mov cr8, r9: REX.R and REX.B
        assert_eq!(
            decode_mov_cr_dr(&[0x45, 0x0f, 0x22, 0xc1], CodeSize::Bits64),
            Ok((MovCrDr::Cr(CrAccess::MovToCr { cr: 8, gpr: Gpr::from_number(9) }), 4))
        );
        // lock mov cr0, eax is CR8 on AMD outside 64-bit mode.
        assert_eq!(
            decode_mov_cr_dr(&[0xf0, 0x0f, 0x22, 0xc0], CodeSize::Bits32),
            Ok((MovCrDr::Cr(CrAccess::MovToCr { cr: 8, gpr: Gpr::RAX }), 4))
        );
        // 0x48 is `dec eax` outside 64-bit mode, not a REX prefix.
        assert_eq!(decode_mov_cr_dr(&[0x48, 0x0f, 0x22, 0xc0], CodeSize::Bits32), Err(DecodeError::NotMovCrDr));
    }

    #[test]
    fn mov_debug_registers() {
        // mov dr7, eax; mov ecx, dr6
        assert_eq!(
            decode_mov_cr_dr(&[0x0f, 0x23, 0xf8], CodeSize::Bits32),
            Ok((MovCrDr::Dr(DrAccess { dr: 7, read: false, gpr: Gpr::RAX }), 3))
        );
        assert_eq!(
            decode_mov_cr_dr(&[0x0f, 0x21, 0xf1], CodeSize::Bits32),
            Ok((MovCrDr::Dr(DrAccess { dr: 6, read: true, gpr: Gpr::RCX }), 3))
        );
    }

    #[test]
    fn anything_else_is_refused_not_guessed() {
        assert_eq!(decode_mov_cr_dr(&[], CodeSize::Bits64), Err(DecodeError::Truncated));
        assert_eq!(decode_mov_cr_dr(&[0x0f, 0x22], CodeSize::Bits64), Err(DecodeError::Truncated));
        assert_eq!(decode_mov_cr_dr(&[0x90, 0x0f, 0x22, 0xc0], CodeSize::Bits64), Err(DecodeError::NotMovCrDr));
        assert_eq!(decode_mov_cr_dr(&[0x0f, 0x01, 0xc1], CodeSize::Bits64), Err(DecodeError::NotMovCrDr));
        assert_eq!(decode_mov_cr_dr(&[0xf0; 15], CodeSize::Bits64), Err(DecodeError::NotMovCrDr));
        assert_eq!(decode_mov_cr_dr(&[0xf0, 0x0f, 0x23, 0xc0], CodeSize::Bits32), Err(DecodeError::NotMovCrDr));
    }

    #[test]
    fn vmcall_is_recognised_by_its_bytes() {
        assert!(is_vmcall(&[0x0f, 0x01, 0xc1, 0x90]));
        assert!(!is_vmcall(&[0x0f, 0x01, 0xd9]));
        assert!(!is_vmcall(&[0x0f, 0x01]));
    }
}
