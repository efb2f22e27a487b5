//! Decoding of the VMX capability MSRs (Intel SDM Vol. 3D, Appendix A), and
//! the VMCS control values this hypervisor runs guests with, resolved
//! against them. Pure logic, so it is tested on the host; the x86_64 arch
//! code reads the MSRs and hands the raw values here.

use core::fmt;

/// Raw values of the capability MSRs this decoder reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxMsrs {
    /// IA32_VMX_BASIC (0x480).
    pub basic: u64,
    /// IA32_VMX_PINBASED_CTLS (0x481), or IA32_VMX_TRUE_PINBASED_CTLS
    /// (0x48D) when IA32_VMX_BASIC bit 55 says the TRUE MSRs exist.
    pub pinbased: u64,
    /// IA32_VMX_PROCBASED_CTLS (0x482), or the TRUE variant (0x48E).
    pub procbased: u64,
    /// IA32_VMX_PROCBASED_CTLS2 (0x48B); 0 if secondary controls are not
    /// allowed.
    pub procbased2: u64,
    /// IA32_VMX_EXIT_CTLS (0x483), or the TRUE variant (0x48F).
    pub exit: u64,
    /// IA32_VMX_ENTRY_CTLS (0x484), or the TRUE variant (0x490).
    pub entry: u64,
    /// IA32_VMX_MISC (0x485).
    pub misc: u64,
    /// IA32_VMX_EPT_VPID_CAP (0x48C); 0 if neither EPT nor VPID.
    pub ept_vpid: u64,
    /// IA32_VMX_CR0_FIXED0/1 (0x486/0x487) and CR4_FIXED0/1 (0x488/0x489).
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
}

/// IA32_VMX_BASIC bit 55: the TRUE_*_CTLS MSRs exist (SDM A.1).
pub const BASIC_TRUE_CTLS: u64 = 1 << 55;
/// IA32_VMX_BASIC bits 53:50: memory type for the VMCS and the structures
/// it points to; 6 is write-back (SDM A.1).
const BASIC_MEMTYPE_SHIFT: u32 = 50;
const BASIC_MEMTYPE_MASK: u64 = 0xf;
const MEMTYPE_WB: u64 = 6;
/// IA32_VMX_MISC bits 4:0: the VMX-preemption timer counts down by one
/// every 2^X TSC ticks (SDM A.6).
const MISC_PREEMPTION_RATE_MASK: u64 = 0x1f;

/// Pin-based VM-execution controls (SDM §25.6.1, Table 25-5).
pub mod pin {
    pub const EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
    pub const NMI_EXITING: u32 = 1 << 3;
    pub const PREEMPTION_TIMER: u32 = 1 << 6;
    pub const POSTED_INTERRUPTS: u32 = 1 << 7;
}

/// Primary processor-based VM-execution controls (SDM §25.6.2, Table 25-6).
pub mod proc {
    pub const INTERRUPT_WINDOW_EXITING: u32 = 1 << 2;
    pub const TSC_OFFSETTING: u32 = 1 << 3;
    pub const HLT_EXITING: u32 = 1 << 7;
    pub const INVLPG_EXITING: u32 = 1 << 9;
    pub const MWAIT_EXITING: u32 = 1 << 10;
    pub const RDPMC_EXITING: u32 = 1 << 11;
    pub const RDTSC_EXITING: u32 = 1 << 12;
    pub const CR3_LOAD_EXITING: u32 = 1 << 15;
    pub const CR3_STORE_EXITING: u32 = 1 << 16;
    pub const CR8_LOAD_EXITING: u32 = 1 << 19;
    pub const CR8_STORE_EXITING: u32 = 1 << 20;
    pub const USE_TPR_SHADOW: u32 = 1 << 21;
    pub const NMI_WINDOW_EXITING: u32 = 1 << 22;
    pub const MOV_DR_EXITING: u32 = 1 << 23;
    pub const UNCONDITIONAL_IO_EXITING: u32 = 1 << 24;
    pub const USE_IO_BITMAPS: u32 = 1 << 25;
    pub const MONITOR_TRAP_FLAG: u32 = 1 << 27;
    pub const USE_MSR_BITMAPS: u32 = 1 << 28;
    pub const MONITOR_EXITING: u32 = 1 << 29;
    pub const PAUSE_EXITING: u32 = 1 << 30;
    pub const ACTIVATE_SECONDARY: u32 = 1 << 31;
}

/// Secondary processor-based VM-execution controls (SDM §25.6.2, Table 25-7).
pub mod proc2 {
    pub const ENABLE_EPT: u32 = 1 << 1;
    pub const ENABLE_VPID: u32 = 1 << 5;
    pub const UNRESTRICTED_GUEST: u32 = 1 << 7;
}

/// Primary VM-exit controls (SDM §25.7.1, Table 25-13).
pub mod exit {
    /// Save DR7 and IA32_DEBUGCTL into the guest-state area.
    pub const SAVE_DEBUG_CONTROLS: u32 = 1 << 2;
    pub const HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
    pub const ACK_INTERRUPT_ON_EXIT: u32 = 1 << 15;
    pub const SAVE_PAT: u32 = 1 << 18;
    pub const LOAD_PAT: u32 = 1 << 19;
    pub const SAVE_EFER: u32 = 1 << 20;
    pub const LOAD_EFER: u32 = 1 << 21;
}

/// VM-entry controls (SDM §25.8.1, Table 25-15).
pub mod entry {
    /// Load DR7 and IA32_DEBUGCTL from the guest-state area.
    pub const LOAD_DEBUG_CONTROLS: u32 = 1 << 2;
    pub const IA32E_MODE_GUEST: u32 = 1 << 9;
    pub const ENTRY_TO_SMM: u32 = 1 << 10;
    pub const LOAD_PAT: u32 = 1 << 14;
    pub const LOAD_EFER: u32 = 1 << 15;
}

/// IA32_VMX_EPT_VPID_CAP bits (SDM A.10).
const EPT_WALK_LENGTH_4: u64 = 1 << 6;
const EPT_WB: u64 = 1 << 14;
const EPT_2M_PAGES: u64 = 1 << 16;
const EPT_1G_PAGES: u64 = 1 << 17;
const EPT_INVEPT: u64 = 1 << 20;
const EPT_INVEPT_SINGLE_CONTEXT: u64 = 1 << 25;
const EPT_INVEPT_ALL_CONTEXT: u64 = 1 << 26;
const VPID_INVVPID: u64 = 1 << 32;
const VPID_INVVPID_SINGLE_CONTEXT: u64 = 1 << 41;
const VPID_INVVPID_ALL_CONTEXT: u64 = 1 << 42;

/// What the processor can do for us, decoded: one flag per capability bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)]
pub struct VmxCaps {
    /// VMCS revision identifier (IA32_VMX_BASIC bits 30:0).
    pub revision: u32,
    /// VMXON/VMCS region size in bytes (bits 44:32).
    pub region_size: u32,
    /// The VMCS may be write-back memory (bits 53:50 = 6).
    pub vmcs_write_back: bool,
    pub true_controls: bool,
    pub ept: bool,
    pub vpid: bool,
    pub unrestricted_guest: bool,
    pub ept_4_level: bool,
    pub ept_write_back: bool,
    pub ept_2m: bool,
    pub ept_1g: bool,
    pub invept: bool,
    pub invept_single: bool,
    pub invept_all: bool,
    pub invvpid: bool,
    pub invvpid_single: bool,
    pub invvpid_all: bool,
    /// log2 of the TSC ticks per VMX-preemption timer tick.
    pub preemption_timer_shift: u8,
}

/// A control is usable if its allowed-1 setting (high 32 bits) is set.
fn allowed1(msr: u64, bit: u32) -> bool {
    (msr >> 32) as u32 & bit != 0
}

impl VmxCaps {
    pub fn decode(m: &VmxMsrs) -> Self {
        let secondary = allowed1(m.procbased, proc::ACTIVATE_SECONDARY);
        let p2 = |bit| secondary && allowed1(m.procbased2, bit);
        let ept = p2(proc2::ENABLE_EPT);
        let vpid = p2(proc2::ENABLE_VPID);
        let cap = |bit: u64| (ept || vpid) && m.ept_vpid & bit != 0;
        let invept = ept && cap(EPT_INVEPT);
        let invvpid = vpid && cap(VPID_INVVPID);
        Self {
            revision: (m.basic & 0x7fff_ffff) as u32,
            region_size: ((m.basic >> 32) & 0x1fff) as u32,
            vmcs_write_back: (m.basic >> BASIC_MEMTYPE_SHIFT) & BASIC_MEMTYPE_MASK == MEMTYPE_WB,
            true_controls: m.basic & BASIC_TRUE_CTLS != 0,
            ept,
            vpid,
            // Unrestricted guest requires EPT (SDM 26.2.1.1).
            unrestricted_guest: ept && p2(proc2::UNRESTRICTED_GUEST),
            ept_4_level: ept && cap(EPT_WALK_LENGTH_4),
            ept_write_back: ept && cap(EPT_WB),
            ept_2m: ept && cap(EPT_2M_PAGES),
            ept_1g: ept && cap(EPT_1G_PAGES),
            invept,
            invept_single: invept && cap(EPT_INVEPT_SINGLE_CONTEXT),
            invept_all: invept && cap(EPT_INVEPT_ALL_CONTEXT),
            invvpid,
            invvpid_single: invvpid && cap(VPID_INVVPID_SINGLE_CONTEXT),
            invvpid_all: invvpid && cap(VPID_INVVPID_ALL_CONTEXT),
            preemption_timer_shift: (m.misc & MISC_PREEMPTION_RATE_MASK) as u8,
        }
    }

    /// What running guests needs beyond the controls: a 4 KiB write-back
    /// VMCS, a 4-level write-back EPT, and INVEPT/INVVPID for one context.
    pub fn check_guest_support(&self) -> Result<(), MissingFeature> {
        let needs = [
            (self.region_size <= 4096, MissingFeature::VmcsLargerThanAPage),
            (self.vmcs_write_back, MissingFeature::VmcsNotWriteBack),
            (self.ept_4_level && self.ept_write_back, MissingFeature::EptWalk),
            (self.invept_single, MissingFeature::InveptSingleContext),
            (self.invvpid_single, MissingFeature::InvvpidSingleContext),
        ];
        needs.into_iter().find(|(ok, _)| !ok).map_or(Ok(()), |(_, missing)| Err(missing))
    }
}

/// A capability guests cannot run without.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissingFeature {
    VmcsLargerThanAPage,
    VmcsNotWriteBack,
    /// No 4-level walk with write-back paging structures.
    EptWalk,
    InveptSingleContext,
    InvvpidSingleContext,
}

impl MissingFeature {
    pub fn reason(self) -> &'static str {
        match self {
            Self::VmcsLargerThanAPage => "vmcs-larger-than-4k",
            Self::VmcsNotWriteBack => "vmcs-not-write-back",
            Self::EptWalk => "no-4-level-write-back-ept",
            Self::InveptSingleContext => "no-single-context-invept",
            Self::InvvpidSingleContext => "no-single-context-invvpid",
        }
    }
}

/// The five VM-execution, exit and entry control fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlField {
    PinBased,
    PrimaryProcBased,
    SecondaryProcBased,
    Exit,
    Entry,
}

impl ControlField {
    pub fn name(self) -> &'static str {
        match self {
            Self::PinBased => "pin-based",
            Self::PrimaryProcBased => "primary-processor-based",
            Self::SecondaryProcBased => "secondary-processor-based",
            Self::Exit => "vm-exit",
            Self::Entry => "vm-entry",
        }
    }
}

/// Why a control field cannot be set the way the hypervisor needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlError {
    /// Controls we need whose allowed-1 setting is 0.
    Unsupported { field: ControlField, bits: u32 },
    /// Controls we cannot honour whose allowed-0 setting is 1.
    Forced { field: ControlField, bits: u32 },
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unsupported { field, bits } => write!(f, "{} controls {bits:#x} cannot be 1", field.name()),
            Self::Forced { field, bits } => write!(f, "{} controls {bits:#x} cannot be 0", field.name()),
        }
    }
}

/// Resolves one control field from its capability MSR (SDM A.3-A.5, and
/// §B.3 "Algorithms for Determining VMX Capabilities"): bits 31:0 are the
/// allowed 0-settings (a 1 there forces the control to 1), bits 63:32 the
/// allowed 1-settings (a 0 there forces it to 0). The result has every
/// `required` bit, every bit the processor forces to 1 and nothing else;
/// it is an error if a required bit cannot be 1 or a `forbidden` bit (one
/// whose behaviour the hypervisor does not implement) is forced to 1.
pub fn resolve_control(field: ControlField, msr: u64, required: u32, forbidden: u32) -> Result<u32, ControlError> {
    let must_be_one = msr as u32;
    let may_be_one = (msr >> 32) as u32;
    let unsupported = required & !may_be_one;
    if unsupported != 0 {
        return Err(ControlError::Unsupported { field, bits: unsupported });
    }
    let forced = must_be_one & forbidden;
    if forced != 0 {
        return Err(ControlError::Forced { field, bits: forced });
    }
    Ok(required | must_be_one)
}

/// The control fields every guest VMCS starts with. Entry control
/// [`entry::IA32E_MODE_GUEST`] is left clear: guests start in 32-bit
/// protected mode and the arch code tracks IA32_EFER.LMA per exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmcsControls {
    pub pin: u32,
    pub proc: u32,
    pub proc2: u32,
    pub exit: u32,
    pub entry: u32,
}

impl VmcsControls {
    /// External interrupts and NMIs exit (guests never see host
    /// interrupts); the preemption timer bounds every time slice.
    const PIN: u32 = pin::EXTERNAL_INTERRUPT_EXITING | pin::NMI_EXITING | pin::PREEMPTION_TIMER;
    /// HLT, MWAIT/MONITOR, RDPMC, CR8, MOV DR and every I/O instruction
    /// exit. Without "use MSR bitmaps" every RDMSR/WRMSR exits (SDM
    /// §25.6.9), which is what the allow-list needs. RDTSC runs natively,
    /// without offsetting, so the guests' blackout meters see real time.
    const PROC: u32 = proc::HLT_EXITING
        | proc::MWAIT_EXITING
        | proc::RDPMC_EXITING
        | proc::CR8_LOAD_EXITING
        | proc::CR8_STORE_EXITING
        | proc::MOV_DR_EXITING
        | proc::UNCONDITIONAL_IO_EXITING
        | proc::MONITOR_EXITING
        | proc::ACTIVATE_SECONDARY;
    /// What the hypervisor does not implement or must not have: exits for
    /// CR3 accesses and INVLPG (EPT makes them unnecessary), PAUSE, RDTSC,
    /// NMI windows and the monitor trap flag; a TPR shadow; TSC offsetting
    /// (it would hide pauses from the guests' meters).
    const PROC_FORBIDDEN: u32 = proc::CR3_LOAD_EXITING
        | proc::CR3_STORE_EXITING
        | proc::INVLPG_EXITING
        | proc::PAUSE_EXITING
        | proc::USE_TPR_SHADOW
        | proc::RDTSC_EXITING
        | proc::TSC_OFFSETTING
        | proc::NMI_WINDOW_EXITING
        | proc::MONITOR_TRAP_FLAG;
    /// Set and cleared per entry, so they must be allowed both ways:
    /// interrupt-window exiting, armed while a virtual interrupt waits for
    /// the guest to accept it (SDM Vol. 3C §26.7.5).
    pub const PROC_TOGGLED: u32 = proc::INTERRUPT_WINDOW_EXITING;
    const PROC2: u32 = proc2::ENABLE_EPT | proc2::ENABLE_VPID | proc2::UNRESTRICTED_GUEST;
    /// Return to a 64-bit host, acknowledge the interrupt that caused an
    /// exit (so it does not stay pending), and switch PAT, EFER, DR7 and
    /// IA32_DEBUGCTL. The debug controls are default1 bits that the TRUE
    /// capability MSRs let be 0 (SDM A.4, A.5); without them DR7 is the
    /// host's while a guest runs and the guest's own DR7 is never armed.
    const EXIT: u32 = exit::SAVE_DEBUG_CONTROLS
        | exit::HOST_ADDRESS_SPACE_SIZE
        | exit::ACK_INTERRUPT_ON_EXIT
        | exit::SAVE_PAT
        | exit::LOAD_PAT
        | exit::SAVE_EFER
        | exit::LOAD_EFER;
    const ENTRY: u32 = entry::LOAD_DEBUG_CONTROLS | entry::LOAD_PAT | entry::LOAD_EFER;
    const ENTRY_FORBIDDEN: u32 = entry::IA32E_MODE_GUEST | entry::ENTRY_TO_SMM;

    /// Resolves every field against the capability MSRs (the TRUE ones
    /// where they exist; `VmxMsrs` holds whichever the CPU has).
    pub fn resolve(m: &VmxMsrs) -> Result<Self, ControlError> {
        Ok(Self {
            pin: resolve_control(ControlField::PinBased, m.pinbased, Self::PIN, pin::POSTED_INTERRUPTS)?,
            proc: resolve_control(
                ControlField::PrimaryProcBased,
                m.procbased,
                Self::PROC | Self::PROC_TOGGLED,
                Self::PROC_FORBIDDEN | Self::PROC_TOGGLED,
            )? & !Self::PROC_TOGGLED,
            proc2: resolve_control(ControlField::SecondaryProcBased, m.procbased2, Self::PROC2, 0)?,
            exit: resolve_control(ControlField::Exit, m.exit, Self::EXIT, 0)?,
            entry: resolve_control(ControlField::Entry, m.entry, Self::ENTRY, Self::ENTRY_FORBIDDEN)?,
        })
    }
}

/// A control register's fixed bits in VMX operation (SDM A.7, A.8): a bit
/// set in FIXED0 must be 1, a bit clear in FIXED1 must be 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrFixed {
    pub fixed0: u64,
    pub fixed1: u64,
    /// Bits exempt from the rule (CR0.PE and CR0.PG under unrestricted
    /// guest, SDM §27.3.1.1).
    pub exempt: u64,
}

/// Control registers are 64 bits wide, but only bits 31:0 are defined
/// for CR0 and CR4; the upper half must stay 0.
const CR_DEFINED: u64 = 0xffff_ffff;

impl CrFixed {
    /// The bits the processor pins to one value.
    pub fn pinned(&self) -> u64 {
        ((self.fixed0 | !self.fixed1) & !self.exempt) & CR_DEFINED
    }

    /// `value` with the pinned bits forced to what VMX requires.
    pub fn apply(&self, value: u64) -> u64 {
        ((value | (self.fixed0 & !self.exempt)) & (self.fixed1 | self.exempt)) & CR_DEFINED
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    /// Values Bochs 2.7 reports for `cpu: model=corei7_skylake_x`, as the
    /// image prints them in its `hv: vmx-msrs` event.
    const SKYLAKE_X: VmxMsrs = VmxMsrs {
        basic: 0x00d8_1000_0000_002b,
        pinbased: 0x0000_007f_0000_0016,
        procbased: 0xf7f9_fffe_0400_6172,
        procbased2: 0x0217_7fff_0000_0000,
        exit: 0x007f_ffff_0003_6dfb,
        entry: 0x0000_ffff_0000_11fb,
        misc: 0x6004_01e0,
        ept_vpid: 0x0000_0f01_0633_4141,
        cr0_fixed0: 0x8000_0021,
        cr0_fixed1: 0xffff_ffff,
        cr4_fixed0: 0x2000,
        cr4_fixed1: 0x0037_27ff,
    };

    #[test]
    fn skylake_x_has_ept_vpid_unrestricted() {
        let c = VmxCaps::decode(&SKYLAKE_X);
        assert_eq!(c.revision, 0x2b);
        assert_eq!(c.region_size, 4096);
        assert!(c.vmcs_write_back);
        assert!(c.true_controls && c.ept && c.vpid && c.unrestricted_guest);
        assert!(c.ept_4_level && c.ept_write_back && c.ept_2m && c.ept_1g && c.invept && c.invvpid);
        assert!(c.invept_single && c.invept_all && c.invvpid_single && c.invvpid_all);
        assert_eq!(c.preemption_timer_shift, 0);
        assert_eq!(c.check_guest_support(), Ok(()));
    }

    #[test]
    fn no_secondary_controls_means_no_ept() {
        let m = VmxMsrs { procbased: SKYLAKE_X.procbased & !(1 << 63), ..SKYLAKE_X };
        let c = VmxCaps::decode(&m);
        assert!(!c.ept && !c.vpid && !c.unrestricted_guest && !c.ept_2m);
        assert_eq!(c.check_guest_support(), Err(MissingFeature::EptWalk));
    }

    #[test]
    fn unrestricted_needs_ept() {
        let m = VmxMsrs { procbased2: u64::from(proc2::UNRESTRICTED_GUEST) << 32, ..SKYLAKE_X };
        let c = VmxCaps::decode(&m);
        assert!(!c.ept && !c.unrestricted_guest);
    }

    #[test]
    fn missing_invvpid_is_named() {
        let m = VmxMsrs { ept_vpid: SKYLAKE_X.ept_vpid & !VPID_INVVPID_SINGLE_CONTEXT, ..SKYLAKE_X };
        assert_eq!(VmxCaps::decode(&m).check_guest_support(), Err(MissingFeature::InvvpidSingleContext));
        assert_eq!(MissingFeature::InvvpidSingleContext.reason(), "no-single-context-invvpid");
    }

    #[test]
    fn resolve_sets_required_and_forced_bits() {
        // allowed-0 = 0x16 (bits 1, 2, 4 forced on); allowed-1 = 0x7f.
        let msr = 0x0000_007f_0000_0016;
        assert_eq!(resolve_control(ControlField::PinBased, msr, 0x49, 0), Ok(0x5f));
        assert_eq!(
            resolve_control(ControlField::PinBased, msr, 0x80, 0),
            Err(ControlError::Unsupported { field: ControlField::PinBased, bits: 0x80 })
        );
        assert_eq!(
            resolve_control(ControlField::PinBased, msr, 0x1, 0x4),
            Err(ControlError::Forced { field: ControlField::PinBased, bits: 0x4 })
        );
    }

    #[test]
    fn skylake_x_controls() {
        let c = VmcsControls::resolve(&SKYLAKE_X).unwrap();
        assert_eq!(c.pin, 0x5f);
        assert_eq!(c.proc & VmcsControls::PROC, VmcsControls::PROC);
        assert_eq!(c.proc & (proc::CR3_LOAD_EXITING | proc::USE_MSR_BITMAPS | proc::USE_IO_BITMAPS), 0);
        assert_eq!(c.proc2, proc2::ENABLE_EPT | proc2::ENABLE_VPID | proc2::UNRESTRICTED_GUEST);
        assert_eq!(c.exit & VmcsControls::EXIT, VmcsControls::EXIT);
        assert_eq!(c.entry & entry::IA32E_MODE_GUEST, 0);
        assert_eq!(c.entry & VmcsControls::ENTRY, VmcsControls::ENTRY);
    }

    /// Bochs's TRUE MSRs allow "save/load debug controls" to be 0, and
    /// before they were required they were: guests' DR7 never reached the
    /// processor. They are required now.
    #[test]
    fn debug_controls_are_switched_even_where_the_true_msrs_allow_0() {
        let m = SKYLAKE_X;
        assert_eq!(m.exit as u32 & exit::SAVE_DEBUG_CONTROLS, 0);
        assert_eq!(m.entry as u32 & entry::LOAD_DEBUG_CONTROLS, 0);
        let c = VmcsControls::resolve(&m).unwrap();
        assert_ne!(c.exit & exit::SAVE_DEBUG_CONTROLS, 0);
        assert_ne!(c.entry & entry::LOAD_DEBUG_CONTROLS, 0);
    }

    #[test]
    fn non_true_msrs_that_force_cr3_exiting_are_refused() {
        // IA32_VMX_PROCBASED_CTLS (not TRUE) has the CR3 exits as default1.
        let m = VmxMsrs { procbased: 0xf7f9_fffe_0401_e172, ..SKYLAKE_X };
        let e = VmcsControls::resolve(&m).unwrap_err();
        let bits = proc::CR3_LOAD_EXITING | proc::CR3_STORE_EXITING;
        assert_eq!(e, ControlError::Forced { field: ControlField::PrimaryProcBased, bits });
        assert!(std::format!("{e}").contains("primary-processor-based"));
    }

    #[test]
    fn secondary_without_ept_is_unsupported() {
        let m = VmxMsrs { procbased2: 0x0000_00a0_0000_0000, ..SKYLAKE_X };
        let e = VmcsControls::resolve(&m).unwrap_err();
        assert_eq!(e, ControlError::Unsupported { field: ControlField::SecondaryProcBased, bits: proc2::ENABLE_EPT });
    }

    #[test]
    fn cr_fixed_bits() {
        let cr0 = CrFixed { fixed0: SKYLAKE_X.cr0_fixed0, fixed1: SKYLAKE_X.cr0_fixed1, exempt: 0x8000_0001 };
        assert_eq!(cr0.pinned(), 0x20, "only NE is pinned once PE and PG are exempt");
        assert_eq!(cr0.apply(0x11), 0x31);
        assert_eq!(cr0.apply(0x8000_0011), 0x8000_0031);
        let cr4 = CrFixed { fixed0: SKYLAKE_X.cr4_fixed0, fixed1: SKYLAKE_X.cr4_fixed1, exempt: 0 };
        assert_eq!(cr4.pinned() & 0x2000, 0x2000, "VMXE is pinned to 1");
        assert_eq!(cr4.apply(0x20), 0x2020);
        assert_eq!(cr4.apply(1 << 23) & (1 << 23), 0, "bits clear in FIXED1 are forced to 0");
    }
}
