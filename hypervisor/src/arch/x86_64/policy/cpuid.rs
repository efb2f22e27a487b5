//! The CPUID a guest sees (SDM Vol. 2A, "CPUID"). CPUID always exits in VMX
//! non-root operation (SDM Vol. 3C §26.1.2); the arch code executes the
//! real instruction and passes its result through [`guest_cpuid`], which
//! keeps only features the hypervisor virtualizes completely: what a guest
//! can use without help (SSE through SSE4.2, AES, 1 GiB pages, SYSCALL,
//! SYSENTER, PAT, FSGSBASE, SMEP/SMAP ...), the virtual local APIC in
//! x2APIC mode with its TSC-deadline timer (`lapic.rs`), and nothing that
//! needs a virtual device or MSRs the allow-list refuses (no VMX,
//! XSAVE/AVX, MONITOR/MWAIT, MTRRs, machine checks, performance
//! counters). Leaves 0x4000_0000 and 0x4000_0010 identify the hypervisor
//! and give the TSC and APIC timer frequencies, as other hypervisors do.

/// The four result registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidRegs {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// First hypervisor leaf: EAX = the highest hypervisor leaf, EBX, ECX, EDX
/// = the signature.
pub const HV_LEAF_BASE: u32 = 0x4000_0000;
/// Timing leaf: EAX = TSC frequency in kHz, EBX = local APIC timer
/// frequency in kHz (the virtual APIC's timer counts at the TSC's rate).
pub const HV_LEAF_TIMING: u32 = 0x4000_0010;
/// The signature in EBX, ECX, EDX of [`HV_LEAF_BASE`].
pub const HV_SIGNATURE: &[u8; 12] = b"hvluhvluhvlu";

/// What the hypervisor leaves report and what depends on the vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestCpuidInfo {
    /// The vCPU's index, reported as its initial APIC ID.
    pub vcpu_index: u32,
    /// TSC frequency in kHz (0 if unknown).
    pub tsc_khz: u32,
}

/// Leaf 1 ECX features passed through: SSE3 (0), PCLMULQDQ (1), SSSE3 (9),
/// CX16 (13), SSE4.1 (19), SSE4.2 (20), MOVBE (22), POPCNT (23), AES (25),
/// RDRAND (30).
const LEAF1_ECX: u32 =
    (1 << 0) | (1 << 1) | (1 << 9) | (1 << 13) | (1 << 19) | (1 << 20) | (1 << 22) | (1 << 23) | (1 << 25) | (1 << 30);
/// Leaf 1 features of the virtual local APIC, whatever the host has:
/// ECX x2APIC (21), TSC-deadline timer (24); EDX APIC on chip (9).
const LEAF1_ECX_APIC: u32 = (1 << 21) | (1 << 24);
const LEAF1_EDX_APIC: u32 = 1 << 9;
/// Leaf 1 ECX bit 31: reserved for a hypervisor to say it is there.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX features passed through: FPU (0), VME (1), DE (2), PSE (3),
/// TSC (4), MSR (5), PAE (6), CX8 (8), SEP (11), PGE (13), CMOV (15),
/// PAT (16), PSE-36 (17), CLFSH (19), MMX (23), FXSR (24), SSE (25),
/// SSE2 (26).
const LEAF1_EDX: u32 = 0b111_1111
    | (1 << 8)
    | (1 << 11)
    | (1 << 13)
    | (1 << 15)
    | (1 << 16)
    | (1 << 17)
    | (1 << 19)
    | (1 << 23)
    | (1 << 24)
    | (1 << 25)
    | (1 << 26);
/// Leaf 1 EBX: bits 31:24 initial APIC ID, 23:16 logical processors per
/// package (valid with HTT, which is hidden; reported as 1).
const LEAF1_EBX_KEEP: u32 = 0x0000_ffff;
const LEAF1_EBX_APIC_ID_SHIFT: u32 = 24;
const LEAF1_EBX_ONE_LOGICAL: u32 = 1 << 16;
/// Leaf 7 subleaf 0 EBX features passed through: FSGSBASE (0), BMI1 (3),
/// SMEP (7), BMI2 (8), ERMS (9), ADX (19), SMAP (20), CLFLUSHOPT (23),
/// CLWB (24), SHA (29).
const LEAF7_EBX: u32 =
    1 | (1 << 3) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 19) | (1 << 20) | (1 << 23) | (1 << 24) | (1 << 29);
/// Extended leaf 0x8000_0001: ECX LAHF/SAHF (0), LZCNT (5), PREFETCHW (8);
/// EDX SYSCALL (11), NX (20), 1 GiB pages (26), long mode (29).
const EXT1_ECX: u32 = 1 | (1 << 5) | (1 << 8);
const EXT1_EDX: u32 = (1 << 11) | (1 << 20) | (1 << 26) | (1 << 29);
/// Extended leaf 0x8000_0007 EDX bit 8: invariant TSC.
const EXT7_EDX_INVARIANT_TSC: u32 = 1 << 8;
/// Extended leaf 0x8000_0008 EAX: physical and linear address widths.
const EXT8_EAX_ADDRESS_SIZES: u32 = 0xffff;

/// The result a guest gets for CPUID(`leaf`, `subleaf`), given what the
/// processor returned for the same inputs (`host`).
pub fn guest_cpuid(leaf: u32, subleaf: u32, host: CpuidRegs, info: GuestCpuidInfo) -> CpuidRegs {
    let zero = CpuidRegs::default();
    match leaf {
        // Vendor string and highest basic leaf; brand string; cache
        // descriptors and parameters; TSC and core crystal frequencies.
        0 | 2 | 4 | 0x15 | 0x16 | 0x8000_0000 | 0x8000_0002..=0x8000_0004 | 0x8000_0006 => host,
        1 => CpuidRegs {
            eax: host.eax,
            ebx: (host.ebx & LEAF1_EBX_KEEP) | LEAF1_EBX_ONE_LOGICAL | (info.vcpu_index << LEAF1_EBX_APIC_ID_SHIFT),
            ecx: (host.ecx & LEAF1_ECX) | LEAF1_ECX_APIC | LEAF1_ECX_HYPERVISOR,
            edx: (host.edx & LEAF1_EDX) | LEAF1_EDX_APIC,
        },
        7 if subleaf == 0 => CpuidRegs { ebx: host.ebx & LEAF7_EBX, ..zero },
        HV_LEAF_BASE => {
            let word = |i: usize| {
                u32::from_le_bytes([HV_SIGNATURE[i], HV_SIGNATURE[i + 1], HV_SIGNATURE[i + 2], HV_SIGNATURE[i + 3]])
            };
            CpuidRegs { eax: HV_LEAF_TIMING, ebx: word(0), ecx: word(4), edx: word(8) }
        }
        HV_LEAF_TIMING => CpuidRegs { eax: info.tsc_khz, ebx: info.tsc_khz, ..zero },
        0x8000_0001 => CpuidRegs { ecx: host.ecx & EXT1_ECX, edx: host.edx & EXT1_EDX, ..zero },
        0x8000_0007 => CpuidRegs { edx: host.edx & EXT7_EDX_INVARIANT_TSC, ..zero },
        0x8000_0008 => CpuidRegs { eax: host.eax & EXT8_EAX_ADDRESS_SIZES, ..zero },
        // Everything else, including the rest of the range Intel leaves to
        // software (0x4000_0000-0x4FFF_FFFF), reads as zeros: no such leaf.
        _ => zero,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: GuestCpuidInfo = GuestCpuidInfo { vcpu_index: 2, tsc_khz: 50_000 };
    const ALL: CpuidRegs = CpuidRegs { eax: u32::MAX, ebx: u32::MAX, ecx: u32::MAX, edx: u32::MAX };

    #[test]
    fn hypervisor_leaves_identify_us() {
        let r = guest_cpuid(HV_LEAF_BASE, 0, CpuidRegs::default(), INFO);
        assert_eq!(r.eax, HV_LEAF_TIMING);
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&r.ebx.to_le_bytes());
        sig[4..8].copy_from_slice(&r.ecx.to_le_bytes());
        sig[8..].copy_from_slice(&r.edx.to_le_bytes());
        assert_eq!(&sig, HV_SIGNATURE);
        assert_eq!(
            guest_cpuid(HV_LEAF_TIMING, 0, ALL, INFO),
            CpuidRegs { eax: 50_000, ebx: 50_000, ..CpuidRegs::default() }
        );
        assert_eq!(guest_cpuid(HV_LEAF_BASE + 1, 0, ALL, INFO), CpuidRegs::default());
    }

    #[test]
    fn leaf1_hides_vmx_xsave_offers_x2apic_and_sets_hypervisor() {
        let r = guest_cpuid(1, 0, ALL, INFO);
        assert_eq!(r.ecx & (1 << 5), 0, "VMX");
        let none = guest_cpuid(1, 0, CpuidRegs::default(), INFO);
        assert_ne!(none.ecx & (1 << 21), 0, "x2APIC, even if the host has none");
        assert_ne!(none.ecx & (1 << 24), 0, "TSC deadline");
        assert_ne!(none.edx & (1 << 9), 0, "local APIC");
        assert_eq!(r.ecx & (1 << 26), 0, "XSAVE");
        assert_eq!(r.ecx & (1 << 28), 0, "AVX");
        assert_eq!(r.ecx & (1 << 3), 0, "MONITOR");
        assert_ne!(r.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(r.edx & (1 << 12), 0, "MTRR");
        assert_ne!(r.edx & (1 << 24), 0, "FXSR");
        assert_eq!(r.ebx >> 24, 2, "initial APIC ID = vCPU index");
        assert_eq!(r.eax, u32::MAX, "family/model/stepping pass through");
    }

    #[test]
    fn leaf7_and_extended_leaves() {
        let r = guest_cpuid(7, 0, ALL, INFO);
        assert_eq!((r.eax, r.ebx, r.ecx, r.edx), (0, LEAF7_EBX, 0, 0));
        assert_eq!(guest_cpuid(7, 1, ALL, INFO), CpuidRegs::default());
        let e = guest_cpuid(0x8000_0001, 0, ALL, INFO);
        assert_ne!(e.edx & (1 << 29), 0, "long mode");
        assert_eq!(e.edx & (1 << 27), 0, "RDTSCP is not enabled");
        assert_eq!(guest_cpuid(0x8000_0008, 0, ALL, INFO).eax, 0xffff);
        assert_eq!(guest_cpuid(0xd, 0, ALL, INFO), CpuidRegs::default(), "no XSAVE leaf");
        assert_eq!(guest_cpuid(0, 0, ALL, INFO), ALL, "vendor passes through");
    }
}
