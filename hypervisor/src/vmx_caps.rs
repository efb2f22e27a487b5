//! Decoding of the VMX capability MSRs (Intel SDM Vol. 3D, Appendix A).
//! Pure logic, so it is tested on the host; the x86_64 arch code reads the
//! MSRs and hands the raw values here.

/// Raw values of the capability MSRs this decoder reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxMsrs {
    /// IA32_VMX_BASIC (0x480).
    pub basic: u64,
    /// IA32_VMX_PROCBASED_CTLS (0x482), or the TRUE variant (0x48E) when
    /// IA32_VMX_BASIC bit 55 says it exists.
    pub procbased: u64,
    /// IA32_VMX_PROCBASED_CTLS2 (0x48B); 0 if secondary controls are not
    /// allowed.
    pub procbased2: u64,
    /// IA32_VMX_EPT_VPID_CAP (0x48C); 0 if neither EPT nor VPID.
    pub ept_vpid: u64,
}

/// IA32_VMX_BASIC bit 55: the TRUE_*_CTLS MSRs exist (SDM A.1).
pub const BASIC_TRUE_CTLS: u64 = 1 << 55;
/// Primary processor-based control bit 31: activate secondary controls (SDM 25.6.2).
const PROC_ACTIVATE_SECONDARY: u32 = 1 << 31;
/// Secondary processor-based controls (SDM Table 25-7).
const PROC2_ENABLE_EPT: u32 = 1 << 1;
const PROC2_ENABLE_VPID: u32 = 1 << 5;
const PROC2_UNRESTRICTED_GUEST: u32 = 1 << 7;
/// IA32_VMX_EPT_VPID_CAP bits (SDM A.10).
const EPT_WALK_LENGTH_4: u64 = 1 << 6;
const EPT_WB: u64 = 1 << 14;
const EPT_2M_PAGES: u64 = 1 << 16;
const EPT_1G_PAGES: u64 = 1 << 17;
const EPT_INVEPT: u64 = 1 << 20;
const VPID_INVVPID: u64 = 1 << 32;

/// What the processor can do for us, decoded: one flag per capability bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)]
pub struct VmxCaps {
    /// VMCS revision identifier (IA32_VMX_BASIC bits 30:0).
    pub revision: u32,
    /// VMXON/VMCS region size in bytes (bits 44:32).
    pub region_size: u32,
    pub true_controls: bool,
    pub ept: bool,
    pub vpid: bool,
    pub unrestricted_guest: bool,
    pub ept_4_level: bool,
    pub ept_write_back: bool,
    pub ept_2m: bool,
    pub ept_1g: bool,
    pub invept: bool,
    pub invvpid: bool,
}

/// A control is usable if its allowed-1 setting (high 32 bits) is set.
fn allowed1(msr: u64, bit: u32) -> bool {
    (msr >> 32) as u32 & bit != 0
}

impl VmxCaps {
    pub fn decode(m: &VmxMsrs) -> Self {
        let secondary = allowed1(m.procbased, PROC_ACTIVATE_SECONDARY);
        let p2 = |bit| secondary && allowed1(m.procbased2, bit);
        let ept = p2(PROC2_ENABLE_EPT);
        let vpid = p2(PROC2_ENABLE_VPID);
        let cap = |bit: u64| (ept || vpid) && m.ept_vpid & bit != 0;
        Self {
            revision: (m.basic & 0x7fff_ffff) as u32,
            region_size: ((m.basic >> 32) & 0x1fff) as u32,
            true_controls: m.basic & BASIC_TRUE_CTLS != 0,
            ept,
            vpid,
            // Unrestricted guest requires EPT (SDM 26.2.1.1).
            unrestricted_guest: ept && p2(PROC2_UNRESTRICTED_GUEST),
            ept_4_level: ept && cap(EPT_WALK_LENGTH_4),
            ept_write_back: ept && cap(EPT_WB),
            ept_2m: ept && cap(EPT_2M_PAGES),
            ept_1g: ept && cap(EPT_1G_PAGES),
            invept: ept && cap(EPT_INVEPT),
            invvpid: vpid && cap(VPID_INVVPID),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values Bochs 2.7 reports for `cpu: model=corei7_skylake_x`, as the
    /// image prints them in its `hv: vmx-msrs` event.
    const SKYLAKE_X: VmxMsrs = VmxMsrs {
        basic: 0x00d8_1000_0000_002b,
        procbased: 0xf7f9_fffe_0400_6172,
        procbased2: 0x0217_7fff_0000_0000,
        ept_vpid: 0x0000_0f01_0633_4141,
    };

    #[test]
    fn skylake_x_has_ept_vpid_unrestricted() {
        let c = VmxCaps::decode(&SKYLAKE_X);
        assert_eq!(c.revision, 0x2b);
        assert_eq!(c.region_size, 4096);
        assert!(c.true_controls && c.ept && c.vpid && c.unrestricted_guest);
        assert!(c.ept_4_level && c.ept_write_back && c.ept_2m && c.ept_1g && c.invept && c.invvpid);
    }

    #[test]
    fn no_secondary_controls_means_no_ept() {
        let m = VmxMsrs { procbased: SKYLAKE_X.procbased & !(1 << 63), ..SKYLAKE_X };
        let c = VmxCaps::decode(&m);
        assert!(!c.ept && !c.vpid && !c.unrestricted_guest && !c.ept_2m);
    }

    #[test]
    fn unrestricted_needs_ept() {
        let m = VmxMsrs { procbased2: u64::from(PROC2_UNRESTRICTED_GUEST) << 32, ..SKYLAKE_X };
        let c = VmxCaps::decode(&m);
        assert!(!c.ept && !c.unrestricted_guest);
    }
}
