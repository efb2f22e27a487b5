//! The current VMCS of this CPU: loading it, reading and writing its
//! fields (Intel SDM Vol. 3C §25.11.2 "VMREAD, VMWRITE", §31.3 for the
//! instructions' failure conventions), and the invalidations EPT and VPID
//! need (§29.4.3, INVEPT and INVVPID). Field encodings are the `x86`
//! crate's (SDM Appendix B).

use core::arch::asm;
use core::fmt;

use x86::bits64::vmx;
use x86::vmx::VmFail;

/// Why a VMX instruction failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmcsError {
    /// VMfailInvalid: no current VMCS, or a bad operand (§31.2).
    Invalid,
    /// VMfailValid, with the VM-instruction error number (§31.4).
    Valid { field: u32 },
}

impl fmt::Display for VmcsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid => f.write_str("vmfail-invalid"),
            Self::Valid { field } => write!(f, "vmfail-valid-field-{field:#x}"),
        }
    }
}

fn failed(e: &VmFail, field: u32) -> VmcsError {
    match e {
        VmFail::VmFailValid => VmcsError::Valid { field },
        VmFail::VmFailInvalid => VmcsError::Invalid,
    }
}

/// Reads a field of the current VMCS.
pub fn read(field: u32) -> Result<u64, VmcsError> {
    // SAFETY: VMREAD only reads the current VMCS; it fails (and the error
    // is returned) if there is none or the field does not exist. This CPU
    // is in VMX root operation at CPL 0.
    unsafe { vmx::vmread(field) }.map_err(|e| failed(&e, field))
}

/// Writes a field of the current VMCS.
pub fn write(field: u32, value: u64) -> Result<(), VmcsError> {
    // SAFETY: VMWRITE changes only the current VMCS, which belongs to the
    // vCPU this CPU is about to run; a bad field or value fails cleanly.
    unsafe { vmx::vmwrite(field, value) }.map_err(|e| failed(&e, field))
}

/// Reads a 32-bit field.
pub fn read32(field: u32) -> Result<u32, VmcsError> {
    read(field).map(|v| v as u32)
}

/// Makes the VMCS region at `pa` inactive and clear (launch state
/// "clear"), so it can be initialised and launched (§25.11.3).
pub fn clear(pa: u64) -> Result<(), VmcsError> {
    // SAFETY: `pa` is a 4 KiB page owned by one vCPU, starting with the
    // VMCS revision identifier; VMCLEAR writes only that page.
    unsafe { vmx::vmclear(pa) }.map_err(|e| failed(&e, 0))
}

/// Makes the VMCS region at `pa` current on this CPU.
pub fn load(pa: u64) -> Result<(), VmcsError> {
    // SAFETY: as for `clear`; the region is used on this CPU only (vCPUs
    // are pinned), so it is never active on two CPUs.
    unsafe { vmx::vmptrld(pa) }.map_err(|e| failed(&e, 0))
}

/// INVEPT and INVVPID type 1: single context (§31.3, the INVEPT and
/// INVVPID instruction references and their descriptor figures).
const SINGLE_CONTEXT: u64 = 1;

/// Converts the flags after INVEPT/INVVPID into a result (§31.2).
fn status(cf: u8, zf: u8) -> Result<(), VmcsError> {
    match (cf, zf) {
        (0, 0) => Ok(()),
        (_, 1) => Err(VmcsError::Valid { field: 0 }),
        _ => Err(VmcsError::Invalid),
    }
}

/// Invalidates the EPT-derived translations of the tree at `eptp`.
pub fn invept_single(eptp: u64) -> Result<(), VmcsError> {
    let descriptor: [u64; 2] = [eptp, 0];
    let (cf, zf): (u8, u8);
    // SAFETY: INVEPT only drops cached translations; the descriptor is a
    // 16-byte value on the stack, as the instruction requires.
    unsafe {
        asm!(
            "invept {ty}, [{desc}]",
            "setc {cf}",
            "setz {zf}",
            ty = in(reg) SINGLE_CONTEXT,
            desc = in(reg) descriptor.as_ptr(),
            cf = out(reg_byte) cf,
            zf = out(reg_byte) zf,
            options(nostack, readonly),
        );
    }
    status(cf, zf)
}

/// Invalidates the cached translations tagged with `vpid`.
pub fn invvpid_single(vpid: u16) -> Result<(), VmcsError> {
    let descriptor: [u64; 2] = [u64::from(vpid), 0];
    let (cf, zf): (u8, u8);
    // SAFETY: as for `invept_single`: only cached translations change.
    unsafe {
        asm!(
            "invvpid {ty}, [{desc}]",
            "setc {cf}",
            "setz {zf}",
            ty = in(reg) SINGLE_CONTEXT,
            desc = in(reg) descriptor.as_ptr(),
            cf = out(reg_byte) cf,
            zf = out(reg_byte) zf,
            options(nostack, readonly),
        );
    }
    status(cf, zf)
}
