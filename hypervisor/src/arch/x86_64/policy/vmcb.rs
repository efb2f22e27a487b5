//! The VMCB, AMD SVM's in-memory guest state (AMD64 APM Vol. 2 Appendix B,
//! "Layout of VMCB": Table B-1 the control area, Table B-2 the state-save
//! area at offset 0x400), and how an intercept's exit code decodes
//! (Appendix C, "SVM Intercept Exit Codes"). Unlike Intel's VMCS the
//! VMCB is an architectural memory format: software reads and writes it
//! as plain memory between VMRUNs.

/// Control area offsets (Table B-1).
pub mod control {
    /// Intercept vectors: CR reads/writes (0x00), DR reads/writes (0x04),
    /// exceptions (0x08), then the "misc 1" (0x0c), "misc 2" (0x10) and
    /// "misc 3" (0x14) instruction intercepts.
    pub const INTERCEPT_CR: usize = 0x000;
    pub const INTERCEPT_DR: usize = 0x004;
    pub const INTERCEPT_EXCEPTIONS: usize = 0x008;
    pub const INTERCEPT_MISC1: usize = 0x00c;
    pub const INTERCEPT_MISC2: usize = 0x010;
    pub const IOPM_BASE_PA: usize = 0x040;
    pub const MSRPM_BASE_PA: usize = 0x048;
    pub const TSC_OFFSET: usize = 0x050;
    /// Guest ASID (bits 31:0) and TLB_CONTROL (bits 39:32).
    pub const GUEST_ASID: usize = 0x058;
    pub const TLB_CONTROL: usize = 0x05c;
    /// V_TPR, V_IRQ, V_INTR_PRIO, V_IGN_TPR, V_INTR_MASKING (bit 24),
    /// V_INTR_VECTOR (bits 39:32).
    pub const V_INTR: usize = 0x060;
    pub const INTERRUPT_SHADOW: usize = 0x068;
    pub const EXITCODE: usize = 0x070;
    pub const EXITINFO1: usize = 0x078;
    pub const EXITINFO2: usize = 0x080;
    pub const EXITINTINFO: usize = 0x088;
    /// Bit 0: NP_ENABLE.
    pub const NP_ENABLE: usize = 0x090;
    pub const EVENTINJ: usize = 0x0a8;
    /// The nested page table root (nCR3).
    pub const N_CR3: usize = 0x0b0;
    pub const VMCB_CLEAN: usize = 0x0c0;
    /// The next RIP, when the processor offers NRIP_SAVE.
    pub const NRIP: usize = 0x0c8;
}

/// State-save area offsets (Table B-2), from the start of the VMCB.
pub mod save {
    /// Segment registers: 16 bytes each (selector u16, attrib u16,
    /// limit u32, base u64).
    pub const ES: usize = 0x400;
    pub const CS: usize = 0x410;
    pub const SS: usize = 0x420;
    pub const DS: usize = 0x430;
    pub const FS: usize = 0x440;
    pub const GS: usize = 0x450;
    pub const GDTR: usize = 0x460;
    pub const LDTR: usize = 0x470;
    pub const IDTR: usize = 0x480;
    pub const TR: usize = 0x490;
    pub const CPL: usize = 0x4cb;
    pub const EFER: usize = 0x4d0;
    pub const CR4: usize = 0x548;
    pub const CR3: usize = 0x550;
    pub const CR0: usize = 0x558;
    pub const DR7: usize = 0x560;
    pub const DR6: usize = 0x568;
    pub const RFLAGS: usize = 0x570;
    pub const RIP: usize = 0x578;
    pub const RSP: usize = 0x5d8;
    pub const RAX: usize = 0x5f8;
    pub const CR2: usize = 0x640;
    pub const G_PAT: usize = 0x668;
}

/// A segment's fields within its 16 bytes.
pub const SEG_SELECTOR: usize = 0;
pub const SEG_ATTRIB: usize = 2;
pub const SEG_LIMIT: usize = 4;
pub const SEG_BASE: usize = 8;

/// The bytes of a VMCB: one 4 KiB page.
pub const VMCB_BYTES: usize = 4096;

/// Misc-1 intercepts (offset 0x0c, Table B-1).
pub mod misc1 {
    pub const INTR: u32 = 1 << 0;
    pub const NMI: u32 = 1 << 1;
    pub const CPUID: u32 = 1 << 18;
    pub const HLT: u32 = 1 << 24;
    pub const IOIO_PROT: u32 = 1 << 27;
    pub const MSR_PROT: u32 = 1 << 28;
    pub const SHUTDOWN: u32 = 1 << 31;
}

/// Misc-2 intercepts (offset 0x10, Table B-1). VMRUN must be intercepted,
/// or VMRUN fails with VMEXIT_INVALID (§15.5.1).
pub mod misc2 {
    pub const VMRUN: u32 = 1 << 0;
    pub const VMMCALL: u32 = 1 << 1;
}

/// EFER.SVME (bit 12): a guest's EFER must have it, or VMRUN fails (§15.5.1).
pub const EFER_SVME: u64 = 1 << 12;

/// What ended a VMRUN (Appendix C), for the intercepts the backend sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvmExit {
    /// Exception intercept (0x40 + vector): #UD is 0x46.
    Exception(u8),
    /// A physical interrupt (the host's timer ended the slice).
    Intr,
    Nmi,
    Cpuid,
    Hlt,
    /// IN/OUT: EXITINFO1 describes the access, EXITINFO2 is the next RIP.
    Ioio,
    /// RDMSR (EXITINFO1 = 0) or WRMSR (1).
    Msr,
    /// The guest hit a triple fault.
    Shutdown,
    Vmrun,
    Vmmcall,
    /// Nested page fault: EXITINFO1 the error code, EXITINFO2 the
    /// guest-physical address.
    Npf,
    /// The VMCB's guest state was invalid: the VMRUN did not enter.
    Invalid,
    /// An exit code the backend does not intercept.
    Other(u64),
}

impl SvmExit {
    /// Decodes EXITCODE. VMEXIT_INVALID is -1, which some implementations
    /// (QEMU's TCG among them) store as 0x0000_0000_FFFF_FFFF: its low 32
    /// bits are compared (`shared/EMULATORS.md`).
    pub fn decode(code: u64) -> SvmExit {
        if code as u32 == u32::MAX {
            return SvmExit::Invalid;
        }
        match code {
            0x40..=0x5f => SvmExit::Exception((code - 0x40) as u8),
            0x60 => SvmExit::Intr,
            0x61 => SvmExit::Nmi,
            0x72 => SvmExit::Cpuid,
            0x78 => SvmExit::Hlt,
            0x7b => SvmExit::Ioio,
            0x7c => SvmExit::Msr,
            0x7f => SvmExit::Shutdown,
            0x80 => SvmExit::Vmrun,
            0x81 => SvmExit::Vmmcall,
            0x400 => SvmExit::Npf,
            other => SvmExit::Other(other),
        }
    }
}

impl SvmExit {
    /// A short name for events.
    pub fn name(self) -> &'static str {
        match self {
            SvmExit::Exception(_) => "exception",
            SvmExit::Intr => "intr",
            SvmExit::Nmi => "nmi",
            SvmExit::Cpuid => "cpuid",
            SvmExit::Hlt => "hlt",
            SvmExit::Ioio => "ioio",
            SvmExit::Msr => "msr",
            SvmExit::Shutdown => "shutdown",
            SvmExit::Vmrun => "vmrun",
            SvmExit::Vmmcall => "vmmcall",
            SvmExit::Npf => "npf",
            SvmExit::Invalid => "invalid",
            SvmExit::Other(_) => "other",
        }
    }
}

/// Instruction lengths the backend needs where the CPU does not save the
/// next RIP (no NRIP_SAVE, as under QEMU's TCG): CPUID `0f a2`, VMMCALL
/// `0f 01 d9`, RDMSR/WRMSR `0f 32`/`0f 30`, HLT `f4`. (IN/OUT need none:
/// EXITINFO2 holds the next RIP.)
pub const fn instruction_len(exit: SvmExit) -> Option<u64> {
    match exit {
        SvmExit::Cpuid | SvmExit::Msr => Some(2),
        SvmExit::Vmmcall => Some(3),
        SvmExit::Hlt => Some(1),
        _ => None,
    }
}

/// A segment's attributes in the VMCB's packed form (Table B-2 note):
/// bits 7:0 are the descriptor's access byte (type, S, DPL, P) and bits
/// 11:8 its flags nibble (AVL, L, D/B, G), from the VMX access-rights
/// format (SDM Vol. 3C Table 25-2), where the flags sit at bits 15:12.
pub const fn attrib_from_vmx_ar(ar: u64) -> u16 {
    ((ar & 0xff) | ((ar >> 4) & 0xf00)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_decode_as_the_apm_lists_them() {
        assert_eq!(SvmExit::decode(0x46), SvmExit::Exception(6));
        assert_eq!(SvmExit::decode(0x72), SvmExit::Cpuid);
        assert_eq!(SvmExit::decode(0x81), SvmExit::Vmmcall);
        assert_eq!(SvmExit::decode(0x400), SvmExit::Npf);
        assert_eq!(SvmExit::decode(0x7f), SvmExit::Shutdown);
        assert_eq!(SvmExit::decode(0x60), SvmExit::Intr);
        assert_eq!(SvmExit::decode(0x8f), SvmExit::Other(0x8f));
    }

    #[test]
    fn vmexit_invalid_is_recognised_in_either_width() {
        assert_eq!(SvmExit::decode(u64::MAX), SvmExit::Invalid);
        assert_eq!(SvmExit::decode(0xffff_ffff), SvmExit::Invalid);
    }

    #[test]
    fn lengths_of_the_intercepted_instructions() {
        assert_eq!(instruction_len(SvmExit::Vmmcall), Some(3));
        assert_eq!(instruction_len(SvmExit::Cpuid), Some(2));
        assert_eq!(instruction_len(SvmExit::Hlt), Some(1));
        assert_eq!(instruction_len(SvmExit::Ioio), None);
    }

    #[test]
    fn vmx_access_rights_pack_into_the_vmcb_attrib() {
        // 32-bit code: type 0xb, S, P; D/B and G.
        assert_eq!(attrib_from_vmx_ar(0xc09b), 0xc9b);
        // 64-bit code: L instead of D/B.
        assert_eq!(attrib_from_vmx_ar(0xa09b), 0xa9b);
        // Real-mode data: type 3, S, P; no flags.
        assert_eq!(attrib_from_vmx_ar(0x93), 0x93);
    }

    #[test]
    fn the_save_area_follows_the_control_area() {
        assert_eq!(save::ES, 0x400);
        assert_eq!(save::TR + 16, 0x4a0);
        const { assert!(save::G_PAT + 8 <= VMCB_BYTES) };
    }
}
