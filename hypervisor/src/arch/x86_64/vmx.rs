//! Entering VMX root operation on a CPU (Intel SDM Vol. 3C §24.7-24.8):
//! check CPUID.1:ECX.VMX, IA32_FEATURE_CONTROL, apply the CR0/CR4 fixed
//! bits, set CR4.VMXE and execute VMXON on a per-CPU region.

use hypervisor::arch::x86_64::vmx_caps::{VmxCaps, VmxMsrs, BASIC_TRUE_CTLS};
use raw_cpuid::CpuId;
use x86::controlregs::{cr0, cr0_write, cr4, cr4_write, Cr0, Cr4};
use x86::msr::{
    rdmsr, wrmsr, IA32_FEATURE_CONTROL, IA32_VMX_BASIC, IA32_VMX_CR0_FIXED0, IA32_VMX_CR0_FIXED1, IA32_VMX_CR4_FIXED0,
    IA32_VMX_CR4_FIXED1, IA32_VMX_ENTRY_CTLS, IA32_VMX_EPT_VPID_CAP, IA32_VMX_EXIT_CTLS, IA32_VMX_MISC,
    IA32_VMX_PINBASED_CTLS, IA32_VMX_PROCBASED_CTLS, IA32_VMX_PROCBASED_CTLS2, IA32_VMX_TRUE_ENTRY_CTLS,
    IA32_VMX_TRUE_EXIT_CTLS, IA32_VMX_TRUE_PINBASED_CTLS, IA32_VMX_TRUE_PROCBASED_CTLS,
};

use super::MAX_CPUS;

/// IA32_FEATURE_CONTROL bits (SDM Vol. 4, Table 2-2).
const FC_LOCKED: u64 = 1 << 0;
const FC_VMX_OUTSIDE_SMX: u64 = 1 << 2;
const PROC_ACTIVATE_SECONDARY_ALLOWED: u64 = 1 << 63;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxError {
    /// CPUID.1:ECX.VMX is clear (e.g. QEMU TCG, or an AMD CPU).
    NoVmx,
    /// Firmware locked IA32_FEATURE_CONTROL with VMX disabled.
    DisabledByFirmware,
    /// The VMXON region would be too small for this CPU.
    RegionTooSmall,
    VmxonFailed,
}

impl VmxError {
    pub fn reason(self) -> &'static str {
        match self {
            Self::NoVmx => "cpuid-no-vmx",
            Self::DisabledByFirmware => "feature-control-locked-off",
            Self::RegionTooSmall => "vmxon-region-too-small",
            Self::VmxonFailed => "vmxon-failed",
        }
    }
}

#[repr(C, align(4096))]
struct VmxonRegion([u8; 4096]);

static mut VMXON_REGIONS: [VmxonRegion; MAX_CPUS] = [const { VmxonRegion([0; 4096]) }; MAX_CPUS];

/// Reads the capability MSRs, the TRUE control MSRs where IA32_VMX_BASIC
/// bit 55 says they exist (SDM A.1-A.10). Only call when CPUID reports VMX.
pub fn read_msrs() -> VmxMsrs {
    // SAFETY: VMX is present, so these MSRs exist (SDM Vol. 3D A.1-A.10);
    // the TRUE MSRs are read only when IA32_VMX_BASIC says they exist, and
    // the secondary/EPT MSRs only when their existence bits are set.
    unsafe {
        let basic = rdmsr(IA32_VMX_BASIC);
        let true_ctls = basic & BASIC_TRUE_CTLS != 0;
        let pick = |plain: u32, true_msr: u32| if true_ctls { rdmsr(true_msr) } else { rdmsr(plain) };
        let procbased = pick(IA32_VMX_PROCBASED_CTLS, IA32_VMX_TRUE_PROCBASED_CTLS);
        let procbased2 =
            if procbased & PROC_ACTIVATE_SECONDARY_ALLOWED != 0 { rdmsr(IA32_VMX_PROCBASED_CTLS2) } else { 0 };
        // EPT (bit 33) or VPID (bit 37) allowed-1 => IA32_VMX_EPT_VPID_CAP exists.
        let ept_vpid = if procbased2 & ((1 << 33) | (1 << 37)) != 0 { rdmsr(IA32_VMX_EPT_VPID_CAP) } else { 0 };
        VmxMsrs {
            basic,
            pinbased: pick(IA32_VMX_PINBASED_CTLS, IA32_VMX_TRUE_PINBASED_CTLS),
            procbased,
            procbased2,
            exit: pick(IA32_VMX_EXIT_CTLS, IA32_VMX_TRUE_EXIT_CTLS),
            entry: pick(IA32_VMX_ENTRY_CTLS, IA32_VMX_TRUE_ENTRY_CTLS),
            misc: rdmsr(IA32_VMX_MISC),
            ept_vpid,
            cr0_fixed0: rdmsr(IA32_VMX_CR0_FIXED0),
            cr0_fixed1: rdmsr(IA32_VMX_CR0_FIXED1),
            cr4_fixed0: rdmsr(IA32_VMX_CR4_FIXED0),
            cr4_fixed1: rdmsr(IA32_VMX_CR4_FIXED1),
        }
    }
}

pub fn has_vmx() -> bool {
    CpuId::new().get_feature_info().is_some_and(|f| f.has_vmx())
}

/// Enters VMX root operation on the calling CPU, using region `cpu`.
pub fn enable(cpu: usize) -> Result<VmxCaps, VmxError> {
    if !has_vmx() || cpu >= MAX_CPUS {
        return Err(VmxError::NoVmx);
    }
    let caps = VmxCaps::decode(&read_msrs());
    if caps.region_size as usize > 4096 {
        return Err(VmxError::RegionTooSmall);
    }
    // SAFETY: VMX exists (CPUID), so IA32_FEATURE_CONTROL and the fixed-bit
    // MSRs exist; setting the fixed bits and CR4.VMXE keeps paging and
    // protection as they are (PE/PG/NE are among the fixed-1 bits).
    unsafe {
        let fc = rdmsr(IA32_FEATURE_CONTROL);
        if fc & FC_LOCKED == 0 {
            wrmsr(IA32_FEATURE_CONTROL, fc | FC_LOCKED | FC_VMX_OUTSIDE_SMX);
        } else if fc & FC_VMX_OUTSIDE_SMX == 0 {
            return Err(VmxError::DisabledByFirmware);
        }
        let c0 = (cr0().bits() as u64 | rdmsr(IA32_VMX_CR0_FIXED0)) & rdmsr(IA32_VMX_CR0_FIXED1);
        cr0_write(Cr0::from_bits_truncate(c0 as usize));
        let c4 = (cr4().bits() as u64 | rdmsr(IA32_VMX_CR4_FIXED0)) & rdmsr(IA32_VMX_CR4_FIXED1);
        cr4_write(Cr4::from_bits_truncate(c4 as usize) | Cr4::CR4_ENABLE_VMX);
    }
    // SAFETY: each CPU uses only its own region (indexed by `cpu`), and
    // only here, before VMXON hands it to the processor.
    let region = unsafe { &mut *core::ptr::addr_of_mut!(VMXON_REGIONS[cpu]) };
    region.0[..4].copy_from_slice(&caps.revision.to_le_bytes());
    let phys = core::ptr::from_mut(region) as u64;
    // SAFETY: the region is 4 KiB aligned, starts with the revision id, is
    // identity-mapped (physical = virtual), and CR0/CR4 satisfy the fixed
    // bits with CR4.VMXE set (SDM 24.7).
    unsafe { x86::bits64::vmx::vmxon(phys) }.map_err(|_| VmxError::VmxonFailed)?;
    Ok(caps)
}

/// Leaves VMX operation on the calling CPU (under SVM there is none to
/// leave: nothing to do).
pub fn disable() {
    if super::svm_backend() {
        return;
    }
    // SAFETY: VMXOFF in VMX root operation; outside it, it faults only if
    // CR4.VMXE is clear, which callers rule out by calling after `enable`.
    let _ = unsafe { x86::bits64::vmx::vmxoff() };
}
