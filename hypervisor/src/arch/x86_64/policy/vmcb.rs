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
    /// The MSRs VMLOAD and VMSAVE switch, and the SYSENTER ones.
    pub const STAR: usize = 0x600;
    pub const LSTAR: usize = 0x608;
    pub const CSTAR: usize = 0x610;
    pub const SFMASK: usize = 0x618;
    pub const KERNEL_GS_BASE: usize = 0x620;
    pub const SYSENTER_CS: usize = 0x628;
    pub const SYSENTER_ESP: usize = 0x630;
    pub const SYSENTER_EIP: usize = 0x638;
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
    /// The guest is ready for the virtual interrupt V_IRQ asks for: the
    /// interrupt window.
    pub const VINTR: u32 = 1 << 4;
    pub const RDPMC: u32 = 1 << 15;
    pub const CPUID: u32 = 1 << 18;
    pub const INVD: u32 = 1 << 22;
    pub const HLT: u32 = 1 << 24;
    pub const INVLPGA: u32 = 1 << 26;
    pub const IOIO_PROT: u32 = 1 << 27;
    pub const MSR_PROT: u32 = 1 << 28;
    pub const SHUTDOWN: u32 = 1 << 31;
}

/// The V_INTR word (offset 0x60, Table B-1): V_TPR (bits 3:0), V_IRQ
/// (8), V_IGN_TPR (20), V_INTR_MASKING (24); V_INTR_VECTOR (39:32).
pub mod vintr {
    pub const TPR_MASK: u64 = 0xf;
    pub const IRQ: u64 = 1 << 8;
    pub const IGN_TPR: u64 = 1 << 20;
    pub const INTR_MASKING: u64 = 1 << 24;
}

/// EVENTINJ and EXITINTINFO (§15.20, Figure 15-4): vector (7:0), type
/// (10:8: 0 external interrupt, 2 NMI, 3 exception, 4 software
/// interrupt), EV (11, an error code in 63:32), V (31). The low 32 bits
/// are laid out as VMX's interruption-information fields (SDM Vol. 3C
/// Table 25-17), so one encoder serves both.
pub const EVENT_VALID: u64 = 1 << 31;
pub const EVENT_ERROR_VALID: u64 = 1 << 11;

/// The interrupt shadow (offset 0x68, bit 0): the guest is in an STI or
/// MOV SS shadow.
pub const INTERRUPT_SHADOW_ACTIVE: u64 = 1;

/// Misc-2 intercepts (offset 0x10, Table B-1). VMRUN must be intercepted,
/// or VMRUN fails with VMEXIT_INVALID (§15.5.1).
pub mod misc2 {
    pub const VMRUN: u32 = 1 << 0;
    pub const VMMCALL: u32 = 1 << 1;
    pub const VMLOAD: u32 = 1 << 2;
    pub const VMSAVE: u32 = 1 << 3;
    pub const STGI: u32 = 1 << 4;
    pub const CLGI: u32 = 1 << 5;
    pub const SKINIT: u32 = 1 << 6;
    pub const MONITOR: u32 = 1 << 10;
    pub const MWAIT: u32 = 1 << 11;
    pub const MWAIT_ARMED: u32 = 1 << 12;
    pub const XSETBV: u32 = 1 << 13;
}

/// The CR intercept word (offset 0, Table B-1): reads of CRn at bit n,
/// writes at bit 16 + n.
pub const fn cr_write_intercept(cr: u32) -> u32 {
    1 << (16 + cr)
}

/// Every DR read and write intercepted (offset 4: reads bits 15:0,
/// writes bits 31:16).
pub const DR_ALL: u32 = u32::MAX;

/// Exception intercept bit for #UD (offset 8, bit = vector).
pub const EXCEPTION_UD: u32 = 1 << 6;

/// The I/O permission map is 12 KiB and the MSR permission map 8 KiB
/// (§15.10.1, §15.11): a set bit intercepts.
pub const IOPM_BYTES: usize = 12 * 1024;
pub const MSRPM_BYTES: usize = 8 * 1024;

/// EFER.SVME (bit 12): a guest's EFER must have it, or VMRUN fails (§15.5.1).
pub const EFER_SVME: u64 = 1 << 12;

/// What ended a VMRUN (Appendix C), for the intercepts the backend sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvmExit {
    /// MOV from CRn (0x00 + n) and MOV to CRn (0x10 + n).
    CrRead(u8),
    CrWrite(u8),
    /// MOV from DRn (0x20 + n) and MOV to DRn (0x30 + n).
    DrRead(u8),
    DrWrite(u8),
    /// Exception intercept (0x40 + vector): #UD is 0x46.
    Exception(u8),
    /// The guest can take the virtual interrupt (V_IRQ).
    Vintr,
    Rdpmc,
    Invd,
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
    /// VMLOAD, VMSAVE, STGI, CLGI, SKINIT, INVLPGA, MONITOR, MWAIT and
    /// XSETBV: instructions the guest's CPUID does not offer (#UD).
    Hidden(u64),
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
            0x00..=0x0f => SvmExit::CrRead(code as u8),
            0x10..=0x1f => SvmExit::CrWrite((code - 0x10) as u8),
            0x20..=0x2f => SvmExit::DrRead((code - 0x20) as u8),
            0x30..=0x3f => SvmExit::DrWrite((code - 0x30) as u8),
            0x40..=0x5f => SvmExit::Exception((code - 0x40) as u8),
            0x60 => SvmExit::Intr,
            0x61 => SvmExit::Nmi,
            0x64 => SvmExit::Vintr,
            0x6f => SvmExit::Rdpmc,
            0x76 => SvmExit::Invd,
            0x7a | 0x82..=0x86 | 0x8a..=0x8d => SvmExit::Hidden(code),
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
            SvmExit::CrRead(_) => "cr-read",
            SvmExit::CrWrite(_) => "cr-write",
            SvmExit::DrRead(_) => "dr-read",
            SvmExit::DrWrite(_) => "dr-write",
            SvmExit::Exception(_) => "exception",
            SvmExit::Vintr => "vintr",
            SvmExit::Rdpmc => "rdpmc",
            SvmExit::Invd => "invd",
            SvmExit::Hidden(_) => "hidden-instruction",
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
        SvmExit::Cpuid | SvmExit::Msr | SvmExit::Invd => Some(2),
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

/// The inverse of [`attrib_from_vmx_ar`]: a VMCB attrib in VMX's
/// access-rights format, which the shared exit handlers read.
pub const fn vmx_ar_from_attrib(attrib: u16) -> u64 {
    let a = attrib as u64;
    (a & 0xff) | ((a & 0xf00) << 4)
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
    fn cr_dr_and_hidden_instruction_codes() {
        assert_eq!(SvmExit::decode(0x10), SvmExit::CrWrite(0));
        assert_eq!(SvmExit::decode(0x14), SvmExit::CrWrite(4));
        assert_eq!(SvmExit::decode(0x27), SvmExit::DrRead(7));
        assert_eq!(SvmExit::decode(0x33), SvmExit::DrWrite(3));
        assert_eq!(SvmExit::decode(0x64), SvmExit::Vintr);
        for code in [0x7a, 0x82, 0x86, 0x8a, 0x8d] {
            assert_eq!(SvmExit::decode(code), SvmExit::Hidden(code));
        }
    }

    #[test]
    fn attrib_round_trips_through_vmx_access_rights() {
        for ar in [0xc09b, 0xa09b, 0x93, 0x8b, 0x82, 0xc0f3] {
            assert_eq!(vmx_ar_from_attrib(attrib_from_vmx_ar(ar)), ar);
        }
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
