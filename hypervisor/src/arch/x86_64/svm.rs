//! Enabling AMD SVM on a CPU (AMD64 APM Vol. 2 §15.4 "Enabling SVM"):
//! check CPUID and VM_CR.SVMDIS, set EFER.SVME (and EFER.NXE, which nested
//! tables need for their no-execute bit, §15.25.5), and give the processor
//! a host save area (VM_HSAVE_PA, §15.30.4) in which VMRUN keeps the host
//! state. The backend that runs guests with VMRUN is not built yet: a CPU
//! with SVM and no VT-x reports what it offers and runs no guest.

use hypervisor::arch::x86_64::svm_caps::{SvmCaps, SvmCpuid, SvmError};
use x86::msr::{rdmsr, wrmsr, IA32_EFER};

use super::MAX_CPUS;

/// VM_CR and VM_HSAVE_PA (APM Vol. 2 §15.30.1, §15.30.4).
const MSR_VM_CR: u32 = 0xc001_0114;
const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
/// EFER bits 11 (NXE) and 12 (SVME) (APM Vol. 2 §3.1.7).
const EFER_NXE: u64 = 1 << 11;
const EFER_SVME: u64 = 1 << 12;

/// A host save area per CPU: one 4 KiB page, its format the processor's own.
#[repr(C, align(4096))]
struct HostSaveArea([u8; 4096]);

static mut HOST_SAVE_AREAS: [HostSaveArea; MAX_CPUS] = [const { HostSaveArea([0; 4096]) }; MAX_CPUS];

/// The CPUID values SVM is described by, on the calling CPU.
pub fn read_cpuid() -> SvmCpuid {
    let max = raw_cpuid::cpuid!(0x8000_0000).eax;
    let ext = if max >= 0x8000_0001 { raw_cpuid::cpuid!(0x8000_0001).ecx } else { 0 };
    let mut out = SvmCpuid { max_extended_leaf: max, ext_features_ecx: ext, ..SvmCpuid::default() };
    if max >= 0x8000_000a {
        let svm = raw_cpuid::cpuid!(0x8000_000a);
        (out.svm_eax, out.svm_ebx, out.svm_edx) = (svm.eax, svm.ebx, svm.edx);
    }
    out
}

/// Enables SVM on the calling CPU, with host save area `cpu`.
pub fn enable(cpu: usize) -> Result<SvmCaps, SvmError> {
    if cpu >= MAX_CPUS {
        return Err(SvmError::NoSvm);
    }
    // SAFETY: VM_CR exists when CPUID reports SVM, and `decode` reads it
    // only then.
    let caps = SvmCaps::decode(read_cpuid(), || unsafe { rdmsr(MSR_VM_CR) })?;
    // SAFETY: each CPU uses only its own area (indexed by `cpu`); after
    // this the processor owns it.
    let area = unsafe { core::ptr::addr_of_mut!(HOST_SAVE_AREAS[cpu]) } as u64;
    // SAFETY: SVM exists and is not disabled (checked above), so setting
    // EFER.SVME is allowed; NXE only gives bit 63 of page-table entries its
    // meaning, and the host's own tables never set it. The save area is
    // 4 KiB aligned and identity-mapped (physical = virtual).
    unsafe {
        wrmsr(IA32_EFER, rdmsr(IA32_EFER) | EFER_SVME | EFER_NXE);
        wrmsr(MSR_VM_HSAVE_PA, area);
    }
    Ok(caps)
}
