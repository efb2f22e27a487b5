//! The MSRs a guest may read and write. Guests run without an MSR bitmap,
//! so every RDMSR and WRMSR exits (SDM Vol. 3C §25.6.9); the handlers look
//! the MSR up here. Anything not on the list, and any write this module
//! refuses, is answered with #GP(0), as an absent MSR would be.
//!
//! Where the guest's value lives is the [`MsrHome`]: a VMCS guest-state
//! field (loaded and saved by VM entry and exit), or the physical MSR while
//! the vCPU is loaded (switched in software when another vCPU is loaded on
//! the CPU; the hypervisor itself never uses SYSCALL or SWAPGS).

use super::{is_canonical, GpFault};

/// MSR addresses (SDM Vol. 4, Table 2-2).
pub mod index {
    pub const IA32_TIME_STAMP_COUNTER: u32 = 0x10;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_PAT: u32 = 0x277;
    pub const IA32_EFER: u32 = 0xc000_0080;
    pub const IA32_STAR: u32 = 0xc000_0081;
    pub const IA32_LSTAR: u32 = 0xc000_0082;
    pub const IA32_CSTAR: u32 = 0xc000_0083;
    pub const IA32_FMASK: u32 = 0xc000_0084;
    pub const IA32_FS_BASE: u32 = 0xc000_0100;
    pub const IA32_GS_BASE: u32 = 0xc000_0101;
    pub const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// IA32_EFER bits (SDM Vol. 3A §2.2.1): SYSCALL enable, long mode enable,
/// long mode active (read-only), execute-disable enable.
pub const EFER_SCE: u64 = 1 << 0;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;
/// IA32_FMASK: bits 63:32 are reserved.
const FMASK_RESERVED: u64 = 0xffff_ffff_0000_0000;
/// IA32_SYSENTER_CS: the VMCS field is 32 bits wide (SDM §25.4.2).
const SYSENTER_CS_BITS: u64 = 0xffff_ffff;
/// The PAT's power-on value (SDM Vol. 3A §13.12.4).
pub const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;

/// An MSR on the allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMsr {
    TimeStampCounter,
    SysenterCs,
    SysenterEsp,
    SysenterEip,
    Pat,
    Efer,
    Star,
    Lstar,
    Cstar,
    Fmask,
    FsBase,
    GsBase,
    KernelGsBase,
}

/// Where a guest MSR's value lives while the guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrHome {
    /// A VMCS guest-state field.
    Vmcs,
    /// The physical MSR, switched in software between vCPUs.
    Switched,
    /// The time-stamp counter: read from the processor, never written.
    Counter,
}

impl GuestMsr {
    /// The MSRs switched in software, in the order vCPU contexts keep them.
    pub const SWITCHED: [GuestMsr; 5] =
        [GuestMsr::Star, GuestMsr::Lstar, GuestMsr::Cstar, GuestMsr::Fmask, GuestMsr::KernelGsBase];

    /// Every MSR on the allow-list.
    pub const ALL: [GuestMsr; 13] = [
        GuestMsr::TimeStampCounter,
        GuestMsr::SysenterCs,
        GuestMsr::SysenterEsp,
        GuestMsr::SysenterEip,
        GuestMsr::Pat,
        GuestMsr::Efer,
        GuestMsr::Star,
        GuestMsr::Lstar,
        GuestMsr::Cstar,
        GuestMsr::Fmask,
        GuestMsr::FsBase,
        GuestMsr::GsBase,
        GuestMsr::KernelGsBase,
    ];

    /// Looks an MSR up; `Err` means #GP.
    pub fn from_index(msr: u32) -> Result<Self, GpFault> {
        Self::ALL.into_iter().find(|m| m.index() == msr).ok_or(GpFault::MsrNotAllowed)
    }

    pub const fn index(self) -> u32 {
        match self {
            Self::TimeStampCounter => index::IA32_TIME_STAMP_COUNTER,
            Self::SysenterCs => index::IA32_SYSENTER_CS,
            Self::SysenterEsp => index::IA32_SYSENTER_ESP,
            Self::SysenterEip => index::IA32_SYSENTER_EIP,
            Self::Pat => index::IA32_PAT,
            Self::Efer => index::IA32_EFER,
            Self::Star => index::IA32_STAR,
            Self::Lstar => index::IA32_LSTAR,
            Self::Cstar => index::IA32_CSTAR,
            Self::Fmask => index::IA32_FMASK,
            Self::FsBase => index::IA32_FS_BASE,
            Self::GsBase => index::IA32_GS_BASE,
            Self::KernelGsBase => index::IA32_KERNEL_GS_BASE,
        }
    }

    pub const fn home(self) -> MsrHome {
        match self {
            Self::TimeStampCounter => MsrHome::Counter,
            Self::Star | Self::Lstar | Self::Cstar | Self::Fmask | Self::KernelGsBase => MsrHome::Switched,
            _ => MsrHome::Vmcs,
        }
    }
}

/// The guest state a write is judged against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteContext {
    /// The guest's IA32_EFER.
    pub efer: u64,
    /// CR0.PG is set.
    pub paging: bool,
}

/// Checks a WRMSR of `value` and returns what to store, or the reason for
/// a #GP (SDM Vol. 4 §2.1 for each MSR's reserved bits).
pub fn check_write(msr: GuestMsr, value: u64, ctx: WriteContext) -> Result<u64, GpFault> {
    match msr {
        // Writing the TSC would need TSC offsetting, which would hide a
        // live update's pause from the guests' meters (DESIGN.md §5).
        GuestMsr::TimeStampCounter => Err(GpFault::MsrReadOnly),
        GuestMsr::Efer => {
            if value & !(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE) != 0 {
                return Err(GpFault::ReservedBits);
            }
            // LMA is read-only; LME may not change while paging is on
            // (SDM Vol. 3A §10.8.5).
            let new = (value & (EFER_SCE | EFER_LME | EFER_NXE)) | (ctx.efer & EFER_LMA);
            if ctx.paging && (new ^ ctx.efer) & EFER_LME != 0 {
                return Err(GpFault::InvalidTransition);
            }
            Ok(new)
        }
        GuestMsr::Pat => {
            // Each of the eight entries is a memory type: 0, 1, 4, 5, 6 or
            // 7 in bits 2:0, bits 7:3 reserved (SDM Vol. 3A §13.12.2).
            let valid = value.to_le_bytes().iter().all(|&t| t < 8 && t != 2 && t != 3);
            if valid {
                Ok(value)
            } else {
                Err(GpFault::ReservedBits)
            }
        }
        GuestMsr::SysenterEsp
        | GuestMsr::SysenterEip
        | GuestMsr::Lstar
        | GuestMsr::Cstar
        | GuestMsr::FsBase
        | GuestMsr::GsBase
        | GuestMsr::KernelGsBase => {
            if is_canonical(value) {
                Ok(value)
            } else {
                Err(GpFault::NonCanonical)
            }
        }
        GuestMsr::Fmask => {
            if value & FMASK_RESERVED == 0 {
                Ok(value)
            } else {
                Err(GpFault::ReservedBits)
            }
        }
        GuestMsr::SysenterCs => Ok(value & SYSENTER_CS_BITS),
        GuestMsr::Star => Ok(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFF: WriteContext = WriteContext { efer: 0, paging: false };

    #[test]
    fn allow_list_round_trips_and_refuses_the_rest() {
        for m in GuestMsr::ALL {
            assert_eq!(GuestMsr::from_index(m.index()), Ok(m));
        }
        // IA32_FEATURE_CONTROL, IA32_APIC_BASE, a VMX capability MSR, MTRRs.
        for msr in [0x3a, 0x1b, 0x480, 0x2ff, 0xffff_ffff] {
            assert_eq!(GuestMsr::from_index(msr), Err(GpFault::MsrNotAllowed));
        }
        assert_eq!(GuestMsr::Lstar.home(), MsrHome::Switched);
        assert_eq!(GuestMsr::Efer.home(), MsrHome::Vmcs);
        assert!(GuestMsr::SWITCHED.iter().all(|m| m.home() == MsrHome::Switched));
    }

    #[test]
    fn efer_rules() {
        assert_eq!(check_write(GuestMsr::Efer, EFER_LME | EFER_NXE, OFF), Ok(EFER_LME | EFER_NXE));
        assert_eq!(check_write(GuestMsr::Efer, 1 << 12, OFF), Err(GpFault::ReservedBits));
        // LMA cannot be written either way.
        assert_eq!(check_write(GuestMsr::Efer, EFER_LMA, OFF), Ok(0));
        let long = WriteContext { efer: EFER_LME | EFER_LMA, paging: true };
        assert_eq!(check_write(GuestMsr::Efer, EFER_LME | EFER_SCE, long), Ok(EFER_LME | EFER_LMA | EFER_SCE));
        assert_eq!(check_write(GuestMsr::Efer, 0, long), Err(GpFault::InvalidTransition));
    }

    #[test]
    fn value_checks() {
        assert_eq!(check_write(GuestMsr::Pat, PAT_DEFAULT, OFF), Ok(PAT_DEFAULT));
        assert_eq!(check_write(GuestMsr::Pat, 0x02, OFF), Err(GpFault::ReservedBits));
        assert_eq!(check_write(GuestMsr::Pat, 0x08, OFF), Err(GpFault::ReservedBits));
        assert_eq!(check_write(GuestMsr::Lstar, 0xffff_8000_0000_1000, OFF), Ok(0xffff_8000_0000_1000));
        assert_eq!(check_write(GuestMsr::FsBase, 0x8000_0000_0000, OFF), Err(GpFault::NonCanonical));
        assert_eq!(check_write(GuestMsr::Fmask, 1 << 40, OFF), Err(GpFault::ReservedBits));
        assert_eq!(check_write(GuestMsr::SysenterCs, 0x1_0000_0010, OFF), Ok(0x10));
        assert_eq!(check_write(GuestMsr::TimeStampCounter, 0, OFF), Err(GpFault::MsrReadOnly));
        assert_eq!(check_write(GuestMsr::Star, u64::MAX, OFF), Ok(u64::MAX));
    }
}
