//! What an x86_64 guest can reach, class by class, and the VMX
//! configuration that enforces it (`hypervisor/GUEST-MACHINE.md` holds the
//! same inventory for readers). Every class is *switched* per vCPU (by VM
//! entry and exit through the VMCS, or in software when another vCPU is
//! loaded), *emulated* (every access exits and the hypervisor answers),
//! *hidden* (CPUID says it is absent and its instructions or MSRs raise
//! #UD or #GP), or the time-stamp counter, a *clock* every guest reads
//! alike. Nothing passes through unswitched; the tests below hold the
//! controls, the MSR allow-list, CPUID and the CR4 rules to the table.

pub use crate::arch::Handling;

/// The inventory: every architectural register class a guest can reach.
pub const INVENTORY: [(&str, Handling); 21] = [
    ("general-purpose registers, RIP, RSP, RFLAGS", Handling::Switched),
    ("segment registers, GDTR, IDTR, LDTR, TR", Handling::Switched),
    ("control registers CR0, CR3, CR4 (VMCS; host-owned bits exit to policy::cr)", Handling::Switched),
    ("CR2", Handling::Switched),
    ("x87, MMX, SSE: the FXSAVE area (XMM0-15, MXCSR)", Handling::Switched),
    ("debug: DR0-DR3, DR6 (software), DR7 (VMCS)", Handling::Switched),
    ("VMCS MSRs: SYSENTER_CS/ESP/EIP, PAT, EFER, FS_BASE, GS_BASE", Handling::Switched),
    ("software-switched MSRs: STAR, LSTAR, CSTAR, FMASK, KERNEL_GS_BASE", Handling::Switched),
    ("CPUID", Handling::Emulated),
    ("local APIC: IA32_APIC_BASE, x2APIC MSRs 0x800-0x8ff, IA32_TSC_DEADLINE, CR8", Handling::Emulated),
    ("I/O ports: COM1 0x3f8-0x3ff, the rest read all ones", Handling::Emulated),
    ("time-stamp counter: RDTSC, IA32_TIME_STAMP_COUNTER reads", Handling::Clock),
    ("XSAVE state: XCR0, AVX/AVX-512 and other extended state", Handling::Hidden),
    ("PMU: RDPMC, PERFEVTSEL, PMC, fixed counters, PERF_GLOBAL_*", Handling::Hidden),
    ("IA32_DEBUGCTL, last-branch records, branch trace store", Handling::Hidden),
    ("MTRRs", Handling::Hidden),
    ("machine-check MSRs", Handling::Hidden),
    ("IA32_TSC_AUX: RDTSCP, RDPID", Handling::Hidden),
    ("VMX and SMX", Handling::Hidden),
    ("MONITOR/MWAIT", Handling::Hidden),
    ("every other MSR", Handling::Hidden),
];

/// MSRs of the hidden classes (SDM Vol. 4, Table 2-2), for the tests: the
/// allow-list must refuse each.
#[cfg(test)]
const HIDDEN_MSRS: [(u32, &str); 20] = [
    (0xc1, "IA32_PMC0"),
    (0xc2, "IA32_PMC1"),
    (0x186, "IA32_PERFEVTSEL0"),
    (0x187, "IA32_PERFEVTSEL1"),
    (0x309, "IA32_FIXED_CTR0"),
    (0x38d, "IA32_FIXED_CTR_CTRL"),
    (0x38e, "IA32_PERF_GLOBAL_STATUS"),
    (0x38f, "IA32_PERF_GLOBAL_CTRL"),
    (0x390, "IA32_PERF_GLOBAL_OVF_CTRL"),
    (0x4c1, "IA32_A_PMC0"),
    (0x1d9, "IA32_DEBUGCTL"),
    (0x680, "MSR_LASTBRANCH_0_FROM_IP"),
    (0x600, "IA32_DS_AREA"),
    (0xfe, "IA32_MTRRCAP"),
    (0x2ff, "IA32_MTRR_DEF_TYPE"),
    (0x179, "IA32_MCG_CAP"),
    (0x400, "IA32_MC0_CTL"),
    (0xc000_0103, "IA32_TSC_AUX"),
    (0xda0, "IA32_XSS"),
    (0x3a, "IA32_FEATURE_CONTROL"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::cpuid::{guest_cpuid, CpuidRegs, GuestCpuidInfo};
    use crate::arch::x86_64::cr::{cr4, CR4_GUEST_BITS};
    use crate::arch::x86_64::msr::{GuestMsr, MsrHome};
    use crate::arch::x86_64::vmx_caps::{entry, exit, proc, proc2, VmcsControls};
    use crate::arch::x86_64::GpFault;

    const INFO: GuestCpuidInfo = GuestCpuidInfo { vcpu_index: 0, tsc_khz: 1 };
    const ALL: CpuidRegs = CpuidRegs { eax: u32::MAX, ebx: u32::MAX, ecx: u32::MAX, edx: u32::MAX };

    fn handling(prefix: &str) -> Handling {
        INVENTORY.iter().find(|(n, _)| n.starts_with(prefix)).map(|&(_, h)| h).expect("in the inventory")
    }

    /// A processor that allows every control either way: what the
    /// hypervisor asks for is then exactly what it gets.
    fn controls() -> VmcsControls {
        let any = 0xffff_ffff_0000_0000;
        let m = crate::arch::x86_64::vmx_caps::VmxMsrs {
            basic: 0,
            pinbased: any,
            procbased: any,
            procbased2: any,
            exit: any,
            entry: any,
            misc: 0,
            ept_vpid: 0,
            cr0_fixed0: 0,
            cr0_fixed1: u64::MAX,
            cr4_fixed0: 0,
            cr4_fixed1: u64::MAX,
        };
        VmcsControls::resolve(&m).expect("every control allowed")
    }

    #[test]
    fn every_msr_and_instruction_that_could_pass_through_exits() {
        let c = controls();
        // No MSR bitmap: every RDMSR/WRMSR exits to the allow-list (SDM
        // §25.6.9); no I/O bitmap and unconditional I/O exiting.
        assert_eq!(c.proc & proc::USE_MSR_BITMAPS, 0);
        assert_eq!(c.proc & proc::USE_IO_BITMAPS, 0);
        assert_ne!(c.proc & proc::UNCONDITIONAL_IO_EXITING, 0);
        assert_eq!(handling("I/O ports"), Handling::Emulated);
        // MOV DR exits; DR7 and DEBUGCTL are switched by entry and exit.
        assert_eq!(handling("debug"), Handling::Switched);
        assert_ne!(c.proc & proc::MOV_DR_EXITING, 0);
        assert_ne!(c.exit & exit::SAVE_DEBUG_CONTROLS, 0);
        assert_ne!(c.entry & entry::LOAD_DEBUG_CONTROLS, 0);
        // PAT and EFER are VMCS-switched.
        assert_eq!(handling("VMCS MSRs"), Handling::Switched);
        assert_ne!(c.exit & (exit::SAVE_PAT | exit::SAVE_EFER), 0);
        assert_ne!(c.entry & (entry::LOAD_PAT | entry::LOAD_EFER), 0);
        // CR8 goes to the APIC model; RDPMC to #GP; MONITOR/MWAIT to #UD.
        assert_eq!(handling("local APIC"), Handling::Emulated);
        assert_ne!(c.proc & proc::CR8_LOAD_EXITING, 0);
        assert_ne!(c.proc & proc::CR8_STORE_EXITING, 0);
        assert_ne!(c.proc & proc::RDPMC_EXITING, 0);
        assert_ne!(c.proc & (proc::MONITOR_EXITING | proc::MWAIT_EXITING), 0);
        // Secondary controls: EPT, VPID, unrestricted guest and nothing
        // else, so RDTSCP, INVPCID, XSAVES and the rest stay #UD.
        assert_eq!(c.proc2, proc2::ENABLE_EPT | proc2::ENABLE_VPID | proc2::UNRESTRICTED_GUEST);
        // RDTSC runs natively: the clock.
        assert_eq!(c.proc & proc::RDTSC_EXITING, 0);
        assert_eq!(handling("time-stamp counter"), Handling::Clock);
    }

    #[test]
    fn the_allow_list_holds_only_switched_msrs_and_the_clock() {
        assert_eq!(handling("software-switched MSRs"), Handling::Switched);
        for msr in GuestMsr::ALL {
            let home = msr.home();
            match home {
                MsrHome::Switched => assert!(GuestMsr::SWITCHED.contains(&msr), "{msr:?}"),
                MsrHome::Counter => assert_eq!(msr, GuestMsr::TimeStampCounter),
                MsrHome::Vmcs => assert!(!GuestMsr::SWITCHED.contains(&msr), "{msr:?}"),
            }
        }
        for (index, name) in HIDDEN_MSRS {
            assert_eq!(GuestMsr::from_index(index), Err(GpFault::MsrNotAllowed), "{name}");
        }
        assert_eq!(handling("PMU"), Handling::Hidden);
        assert_eq!(handling("IA32_DEBUGCTL"), Handling::Hidden);
        assert_eq!(handling("every other MSR"), Handling::Hidden);
    }

    #[test]
    fn cpuid_says_the_hidden_classes_are_absent() {
        assert_eq!(guest_cpuid(0xa, 0, ALL, INFO), CpuidRegs::default(), "no architectural PMU");
        assert_eq!(guest_cpuid(0xd, 0, ALL, INFO), CpuidRegs::default(), "no XSAVE leaf");
        let l1 = guest_cpuid(1, 0, ALL, INFO);
        for (bit, what) in [(2, "DTES64"), (4, "DS-CPL"), (5, "VMX"), (6, "SMX"), (15, "PDCM"), (26, "XSAVE")] {
            assert_eq!(l1.ecx & (1 << bit), 0, "{what}");
        }
        for (bit, what) in [(27, "OSXSAVE"), (28, "AVX"), (3, "MONITOR")] {
            assert_eq!(l1.ecx & (1 << bit), 0, "{what}");
        }
        for (bit, what) in [(7, "MCE"), (12, "MTRR"), (14, "MCA"), (21, "DS")] {
            assert_eq!(l1.edx & (1 << bit), 0, "{what}");
        }
        assert_eq!(guest_cpuid(7, 0, ALL, INFO).ecx & (1 << 22), 0, "RDPID");
        assert_eq!(guest_cpuid(0x8000_0001, 0, ALL, INFO).edx & (1 << 27), 0, "RDTSCP");
        assert_eq!(handling("XSAVE"), Handling::Hidden);
        assert_eq!(handling("MTRRs"), Handling::Hidden);
        assert_eq!(handling("machine-check"), Handling::Hidden);
        assert_eq!(handling("IA32_TSC_AUX"), Handling::Hidden);
        assert_eq!(handling("VMX and SMX"), Handling::Hidden);
    }

    #[test]
    fn cr4_refuses_what_cpuid_hides() {
        // VMXE (13), SMXE (14), PCIDE (17), OSXSAVE (18), PKE (22), CET
        // (23), LA57 (12).
        for bit in [12, 13, 14, 17, 18, 22, 23] {
            assert_eq!(CR4_GUEST_BITS & (1 << bit), 0, "CR4 bit {bit}");
        }
        assert_ne!(CR4_GUEST_BITS & cr4::DE, 0, "debugging extensions (DR4/DR5 #UD) are the guest's");
    }

    #[test]
    fn every_class_is_named_once() {
        for (i, (a, _)) in INVENTORY.iter().enumerate() {
            assert!(INVENTORY[i + 1..].iter().all(|(b, _)| a != b), "{a}");
        }
    }
}
