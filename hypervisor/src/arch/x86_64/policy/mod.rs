//! The x86_64 policy, as pure logic the image's VMX code applies: what
//! VT-x offers and which controls the hypervisor runs with
//! ([`vmx_caps`]), how a VM exit is decoded ([`vmx_exit`]), and what a
//! guest sees of the machine: CPUID ([`cpuid`]), the MSR allow-list
//! ([`msr`]), the control-register bits it may change ([`cr`]), its debug
//! registers ([`debug`]), its local APIC ([`lapic`]), how its vCPUs start
//! with INIT and start-up IPIs ([`startup`]), and how it is loaded and
//! handed over to, the way a
//! multiboot2 boot loader would ([`boot`]). Everything here takes guest-
//! or hardware-controlled values and is host-tested.

pub mod boot;
pub mod cpuid;
pub mod cr;
pub mod debug;
pub mod emulate;
pub mod lapic;
pub mod msr;
pub mod startup;
pub mod svm_caps;
pub mod svm_exit;
pub mod traps;
pub mod vmcb;
pub mod vmx_caps;
pub mod vmx_exit;

/// Why a guest's instruction is answered with a general-protection fault
/// (#GP(0)) instead of being carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpFault {
    /// The MSR is not on the allow-list.
    MsrNotAllowed,
    /// The MSR is read-only.
    MsrReadOnly,
    /// Reserved bits set, or a value the register cannot hold.
    ReservedBits,
    /// An address that is not canonical (bits 63:47 not all equal).
    NonCanonical,
    /// A change the architecture forbids in the current mode (IA32_EFER.LME
    /// with paging on, CR0.PG without CR0.PE, clearing CR4.PAE in long mode).
    InvalidTransition,
    /// A feature the guest's CPUID does not offer (CR4.VMXE, CR4.OSXSAVE ...).
    HiddenFeature,
}

impl GpFault {
    pub fn reason(self) -> &'static str {
        match self {
            Self::MsrNotAllowed => "msr-not-allowed",
            Self::MsrReadOnly => "msr-read-only",
            Self::ReservedBits => "reserved-bits",
            Self::NonCanonical => "non-canonical",
            Self::InvalidTransition => "invalid-transition",
            Self::HiddenFeature => "hidden-feature",
        }
    }
}

/// Whether `value` is a canonical 48-bit linear address (SDM Vol. 1 §3.3.7.1).
pub const fn is_canonical(value: u64) -> bool {
    let top = value.cast_signed() >> 47;
    top == 0 || top == -1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_addresses() {
        assert!(is_canonical(0));
        assert!(is_canonical(0x0000_7fff_ffff_ffff));
        assert!(is_canonical(0xffff_8000_0000_0000));
        assert!(!is_canonical(0x0000_8000_0000_0000));
        assert!(!is_canonical(0x1234_0000_0000_0000));
    }
}
