//! The state of the vCPU that just exited, as the shared exit handlers
//! (`exits.rs`) read and change it, whichever backend ran it: under VT-x
//! the fields of the current VMCS (VMREAD/VMWRITE, Intel SDM Vol. 3C
//! §25.4), under SVM the vCPU's VMCB, plain memory in the processor's
//! architectural layout (AMD64 APM Vol. 2 Appendix B). Values are in one
//! convention, VMX's: segment access rights in the VMCS format, events
//! in its interruption-information format (which EVENTINJ shares), and
//! IA32_EFER as the guest sees it (without the SVME bit every SVM guest's
//! VMCB must carry).

use hypervisor::arch::x86_64::msr::{GuestMsr, MsrHome};
use hypervisor::arch::x86_64::vmcb::{
    self, control, save, vintr, vmx_ar_from_attrib, EFER_SVME, EVENT_ERROR_VALID, EVENT_VALID, INTERRUPT_SHADOW_ACTIVE,
    SEG_ATTRIB, SEG_BASE,
};
use x86::msr::{rdmsr, wrmsr};
use x86::vmx::vmcs::{control as vmx_control, guest, ro};

use super::vcpu;
use super::vmcs::{self, VmcsError};

/// A guest-state value both backends hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Rip,
    Rsp,
    Rflags,
    /// CR0 and CR4 as the processor holds them, and as the guest reads
    /// them (VMX's read shadows; under SVM the same registers).
    Cr0,
    Cr4,
    Cr0Shadow,
    Cr4Shadow,
    Cr3,
    Efer,
    Dr7,
    CsBase,
    /// Access rights in the VMCS format (SDM Table 25-2).
    CsRights,
    SsRights,
    /// Blocking by STI or MOV SS (bits 1:0 of VMX's interruptibility
    /// state; SVM's interrupt shadow reads as blocking by STI).
    Interruptibility,
}

/// The vCPU's state: the current VMCS, or the VMCB at this address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guest {
    Vmx,
    Svm(Vmcb),
}

/// A vCPU's VMCB, by its (identity-mapped) address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vmcb(u64);

impl Vmcb {
    /// # Safety
    /// `pa` is a 4 KiB VMCB page of a vCPU pinned to the calling CPU, not
    /// in a VMRUN, identity-mapped; only that CPU uses the handle.
    pub unsafe fn new(pa: u64) -> Self {
        Self(pa)
    }

    pub fn address(self) -> u64 {
        self.0
    }

    pub fn get(self, offset: usize) -> u64 {
        debug_assert!(offset + 8 <= vmcb::VMCB_BYTES && offset.is_multiple_of(8));
        // SAFETY: inside the VMCB page (`new`'s contract), 8-byte aligned:
        // every offset passed is a VMCB field of the APM's layout.
        unsafe { core::ptr::read_volatile((self.0 + offset as u64) as *const u64) }
    }

    pub fn set(self, offset: usize, value: u64) {
        debug_assert!(offset + 8 <= vmcb::VMCB_BYTES && offset.is_multiple_of(8));
        // SAFETY: as in `get`; the processor reads the VMCB only in VMRUN,
        // which this CPU is not in.
        unsafe { core::ptr::write_volatile((self.0 + offset as u64) as *mut u64, value) }
    }

    /// A 16-bit segment attribute (at `seg + 2`).
    fn attrib(self, seg: usize) -> u16 {
        // SAFETY: as in `get`; the attribute is 2-byte aligned.
        unsafe { core::ptr::read_volatile((self.0 + (seg + SEG_ATTRIB) as u64) as *const u16) }
    }

    /// The 32-bit half of a control-area word (the intercept vectors).
    pub fn set32(self, offset: usize, value: u32) {
        debug_assert!(offset + 4 <= vmcb::VMCB_BYTES && offset.is_multiple_of(4));
        // SAFETY: as in `set`; 4-byte aligned.
        unsafe { core::ptr::write_volatile((self.0 + offset as u64) as *mut u32, value) }
    }

    pub fn get32(self, offset: usize) -> u32 {
        debug_assert!(offset + 4 <= vmcb::VMCB_BYTES && offset.is_multiple_of(4));
        // SAFETY: as in `get`; 4-byte aligned.
        unsafe { core::ptr::read_volatile((self.0 + offset as u64) as *const u32) }
    }

    /// The VMCB offset of a field, where it is one 64-bit word.
    fn offset(field: Field) -> Option<usize> {
        Some(match field {
            Field::Rip => save::RIP,
            Field::Rsp => save::RSP,
            Field::Rflags => save::RFLAGS,
            Field::Cr0 | Field::Cr0Shadow => save::CR0,
            Field::Cr4 | Field::Cr4Shadow => save::CR4,
            Field::Cr3 => save::CR3,
            Field::Efer => save::EFER,
            Field::Dr7 => save::DR7,
            Field::CsBase => save::CS + SEG_BASE,
            Field::CsRights | Field::SsRights | Field::Interruptibility => return None,
        })
    }

    fn read(self, field: Field) -> u64 {
        match field {
            Field::CsRights => vmx_ar_from_attrib(self.attrib(save::CS)),
            Field::SsRights => vmx_ar_from_attrib(self.attrib(save::SS)),
            Field::Interruptibility => u64::from(self.get(control::INTERRUPT_SHADOW) & INTERRUPT_SHADOW_ACTIVE != 0),
            Field::Efer => self.get(save::EFER) & !EFER_SVME,
            other => Self::offset(other).map_or(0, |o| self.get(o)),
        }
    }

    fn write(self, field: Field, value: u64) {
        match field {
            Field::Interruptibility => {
                let shadow = self.get(control::INTERRUPT_SHADOW);
                let want = if value == 0 { shadow & !INTERRUPT_SHADOW_ACTIVE } else { shadow | 1 };
                self.set(control::INTERRUPT_SHADOW, want);
            }
            // VMRUN requires EFER.SVME in the guest's EFER (§15.5.1).
            Field::Efer => self.set(save::EFER, value | EFER_SVME),
            // Segment rights are not changed by any handler.
            Field::CsRights | Field::SsRights => {}
            other => {
                if let Some(o) = Self::offset(other) {
                    self.set(o, value);
                }
            }
        }
    }

    /// The VMCB field of an MSR: all of the allow-list's live there (the
    /// SYSCALL ones and KernelGSBase switched by VMLOAD/VMSAVE).
    fn msr_offset(msr: GuestMsr) -> Option<usize> {
        Some(match msr {
            GuestMsr::SysenterCs => save::SYSENTER_CS,
            GuestMsr::SysenterEsp => save::SYSENTER_ESP,
            GuestMsr::SysenterEip => save::SYSENTER_EIP,
            GuestMsr::Pat => save::G_PAT,
            GuestMsr::Efer => save::EFER,
            GuestMsr::Star => save::STAR,
            GuestMsr::Lstar => save::LSTAR,
            GuestMsr::Cstar => save::CSTAR,
            GuestMsr::Fmask => save::SFMASK,
            GuestMsr::FsBase => save::FS + SEG_BASE,
            GuestMsr::GsBase => save::GS + SEG_BASE,
            GuestMsr::KernelGsBase => save::KERNEL_GS_BASE,
            GuestMsr::TimeStampCounter => return None,
        })
    }
}

/// The VMCS field of each [`Field`].
const fn vmcs_field(field: Field) -> u32 {
    match field {
        Field::Rip => guest::RIP,
        Field::Rsp => guest::RSP,
        Field::Rflags => guest::RFLAGS,
        Field::Cr0 => guest::CR0,
        Field::Cr4 => guest::CR4,
        Field::Cr0Shadow => vmx_control::CR0_READ_SHADOW,
        Field::Cr4Shadow => vmx_control::CR4_READ_SHADOW,
        Field::Cr3 => guest::CR3,
        Field::Efer => guest::IA32_EFER_FULL,
        Field::Dr7 => guest::DR7,
        Field::CsBase => guest::CS_BASE,
        Field::CsRights => guest::CS_ACCESS_RIGHTS,
        Field::SsRights => guest::SS_ACCESS_RIGHTS,
        Field::Interruptibility => guest::INTERRUPTIBILITY_STATE,
    }
}

/// The VMCS guest-state field of an MSR that lives there (§25.4.1-2).
const fn msr_vmcs_field(msr: GuestMsr) -> u32 {
    match msr {
        GuestMsr::SysenterCs => guest::IA32_SYSENTER_CS,
        GuestMsr::SysenterEsp => guest::IA32_SYSENTER_ESP,
        GuestMsr::SysenterEip => guest::IA32_SYSENTER_EIP,
        GuestMsr::Pat => guest::IA32_PAT_FULL,
        GuestMsr::FsBase => guest::FS_BASE,
        GuestMsr::GsBase => guest::GS_BASE,
        // Efer and, defensively, anything else classified as VMCS-homed.
        _ => guest::IA32_EFER_FULL,
    }
}

impl Guest {
    pub fn is_svm(self) -> bool {
        matches!(self, Guest::Svm(_))
    }

    pub fn get(self, field: Field) -> Result<u64, VmcsError> {
        match self {
            Guest::Vmx => vmcs::read(vmcs_field(field)),
            Guest::Svm(v) => Ok(v.read(field)),
        }
    }

    pub fn set(self, field: Field, value: u64) -> Result<(), VmcsError> {
        match self {
            Guest::Vmx => vmcs::write(vmcs_field(field), value),
            Guest::Svm(v) => {
                v.write(field, value);
                Ok(())
            }
        }
    }

    /// An allow-listed MSR's value (not the TSC, which has no home here).
    pub fn msr(self, msr: GuestMsr) -> Result<u64, VmcsError> {
        match self {
            Guest::Vmx => match msr.home() {
                // SAFETY: the switched MSRs hold this vCPU's values while
                // it is loaded; reading them has no side effects.
                MsrHome::Switched => Ok(unsafe { rdmsr(msr.index()) }),
                _ => vmcs::read(msr_vmcs_field(msr)),
            },
            Guest::Svm(v) => Ok(match msr {
                GuestMsr::Efer => v.read(Field::Efer),
                other => Vmcb::msr_offset(other).map_or(0, |o| v.get(o)),
            }),
        }
    }

    /// Sets an allow-listed MSR to a value the allow-list checked.
    pub fn set_msr(self, msr: GuestMsr, value: u64) -> Result<(), VmcsError> {
        match self {
            Guest::Vmx => match msr.home() {
                MsrHome::Switched => {
                    // SAFETY: the allow-list checked the value (canonical
                    // addresses, no reserved bits); these MSRs only affect
                    // SYSCALL and SWAPGS, which the hypervisor does not
                    // use, and are switched per vCPU.
                    unsafe { wrmsr(msr.index(), value) };
                    Ok(())
                }
                _ => vmcs::write(msr_vmcs_field(msr), value),
            },
            Guest::Svm(v) => {
                match msr {
                    GuestMsr::Efer => v.write(Field::Efer, value),
                    other => {
                        if let Some(o) = Vmcb::msr_offset(other) {
                            v.set(o, value);
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// DR6 as the guest has it: the processor's under VMX (loaded with the
    /// vCPU), the VMCB's under SVM (VMRUN loads it).
    pub fn dr6(self) -> u64 {
        match self {
            Guest::Vmx => vcpu::read_dr6(),
            Guest::Svm(v) => v.get(save::DR6),
        }
    }

    pub fn set_dr6(self, value: u64) {
        match self {
            Guest::Vmx => vcpu::write_debug_register(6, value),
            Guest::Svm(v) => v.set(save::DR6, value),
        }
    }

    /// An event (VMX interruption-information format) to deliver at the
    /// next entry, with its error code and, for VMX's software events,
    /// the instruction length.
    pub fn inject_event(self, info: u32, error_code: u64, instruction_len: u64) -> Result<(), VmcsError> {
        match self {
            Guest::Vmx => {
                vmcs::write(vmx_control::VMENTRY_INTERRUPTION_INFO_FIELD, u64::from(info))?;
                if u64::from(info) & EVENT_ERROR_VALID != 0 {
                    vmcs::write(vmx_control::VMENTRY_EXCEPTION_ERR_CODE, error_code)?;
                }
                if instruction_len != 0 {
                    vmcs::write(vmx_control::VMENTRY_INSTRUCTION_LEN, instruction_len)?;
                }
                Ok(())
            }
            Guest::Svm(v) => {
                v.set(control::EVENTINJ, u64::from(info) | (error_code << 32));
                Ok(())
            }
        }
    }

    /// The event whose delivery the exit interrupted (VMX's IDT-vectoring
    /// information, SVM's EXITINTINFO), re-injected so resuming does not
    /// lose it (SDM §28.2.4, §27.6.1.1; APM §15.7.2).
    pub fn reinject_interrupted_event(self) -> Result<(), VmcsError> {
        match self {
            Guest::Vmx => {
                let info = vmcs::read32(ro::IDT_VECTORING_INFO)?;
                if u64::from(info) & EVENT_VALID == 0 {
                    return Ok(());
                }
                vmcs::write(vmx_control::VMENTRY_INTERRUPTION_INFO_FIELD, u64::from(info))?;
                vmcs::write(vmx_control::VMENTRY_EXCEPTION_ERR_CODE, vmcs::read(ro::IDT_VECTORING_ERR_CODE)?)?;
                vmcs::write(vmx_control::VMENTRY_INSTRUCTION_LEN, vmcs::read(ro::VMEXIT_INSTRUCTION_LEN)?)
            }
            Guest::Svm(v) => {
                let info = v.get(control::EXITINTINFO);
                if info & EVENT_VALID != 0 {
                    v.set(control::EVENTINJ, info);
                }
                Ok(())
            }
        }
    }

    /// The guest's TPR class under SVM's V_INTR_MASKING (V_TPR, which
    /// guest CR8 accesses read and write without an exit).
    pub fn v_tpr(self) -> Option<u64> {
        match self {
            Guest::Vmx => None,
            Guest::Svm(v) => Some(v.get(control::V_INTR) & vintr::TPR_MASK),
        }
    }
}
