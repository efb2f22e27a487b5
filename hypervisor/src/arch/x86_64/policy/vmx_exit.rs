//! VM exits, decoded: the exit-reason field (Intel SDM Vol. 3C §25.9.1),
//! the basic exit reasons (Appendix C, Table C-1), the exit qualifications
//! the x86_64 arch code acts on (§28.2.1, Tables 28-1 to 28-7), and the
//! interruption-information format used to inject events (§25.8.3).
//! Pure decoding of values the processor wrote, tested on the host.

use core::fmt;

/// Exit-reason field bit 31: the exit is a VM-entry failure (§25.9.1).
const EXIT_REASON_ENTRY_FAILURE: u32 = 1 << 31;
/// Exit-reason field bits 15:0: the basic exit reason.
const EXIT_REASON_BASIC_MASK: u32 = 0xffff;

/// Defines [`ExitReason`] from one table: number, variant, event name.
macro_rules! exit_reasons {
    ($($number:literal => $variant:ident $name:literal,)*) => {
        /// A basic exit reason (SDM Appendix C, Table C-1).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum ExitReason {
            $($variant,)*
            /// A number Table C-1 does not define (a newer processor).
            Unknown(u16),
        }

        impl ExitReason {
            /// Decodes a basic exit reason.
            pub const fn from_basic(number: u16) -> Self {
                match number {
                    $($number => Self::$variant,)*
                    other => Self::Unknown(other),
                }
            }

            /// The basic exit reason's number.
            pub const fn number(self) -> u16 {
                match self {
                    $(Self::$variant => $number,)*
                    Self::Unknown(other) => other,
                }
            }

            /// A short name for events and logs.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                    Self::Unknown(_) => "unknown",
                }
            }
        }
    };
}

exit_reasons! {
    0 => ExceptionOrNmi "exception-or-nmi",
    1 => ExternalInterrupt "external-interrupt",
    2 => TripleFault "triple-fault",
    3 => InitSignal "init-signal",
    4 => StartupIpi "startup-ipi",
    5 => IoSmi "io-smi",
    6 => OtherSmi "other-smi",
    7 => InterruptWindow "interrupt-window",
    8 => NmiWindow "nmi-window",
    9 => TaskSwitch "task-switch",
    10 => Cpuid "cpuid",
    11 => Getsec "getsec",
    12 => Hlt "hlt",
    13 => Invd "invd",
    14 => Invlpg "invlpg",
    15 => Rdpmc "rdpmc",
    16 => Rdtsc "rdtsc",
    17 => Rsm "rsm",
    18 => Vmcall "vmcall",
    19 => Vmclear "vmclear",
    20 => Vmlaunch "vmlaunch",
    21 => Vmptrld "vmptrld",
    22 => Vmptrst "vmptrst",
    23 => Vmread "vmread",
    24 => Vmresume "vmresume",
    25 => Vmwrite "vmwrite",
    26 => Vmxoff "vmxoff",
    27 => Vmxon "vmxon",
    28 => CrAccess "cr-access",
    29 => DrAccess "dr-access",
    30 => IoInstruction "io-instruction",
    31 => Rdmsr "rdmsr",
    32 => Wrmsr "wrmsr",
    33 => EntryFailGuestState "entry-invalid-guest-state",
    34 => EntryFailMsrLoading "entry-msr-loading",
    36 => Mwait "mwait",
    37 => MonitorTrapFlag "monitor-trap-flag",
    39 => Monitor "monitor",
    40 => Pause "pause",
    41 => EntryFailMachineCheck "entry-machine-check",
    43 => TprBelowThreshold "tpr-below-threshold",
    44 => ApicAccess "apic-access",
    45 => VirtualizedEoi "virtualized-eoi",
    46 => GdtrIdtrAccess "gdtr-idtr-access",
    47 => LdtrTrAccess "ldtr-tr-access",
    48 => EptViolation "ept-violation",
    49 => EptMisconfig "ept-misconfig",
    50 => Invept "invept",
    51 => Rdtscp "rdtscp",
    52 => PreemptionTimer "preemption-timer",
    53 => Invvpid "invvpid",
    54 => Wbinvd "wbinvd",
    55 => Xsetbv "xsetbv",
    56 => ApicWrite "apic-write",
    57 => Rdrand "rdrand",
    58 => Invpcid "invpcid",
    59 => Vmfunc "vmfunc",
    60 => Encls "encls",
    61 => Rdseed "rdseed",
    62 => PmlFull "pml-full",
    63 => Xsaves "xsaves",
    64 => Xrstors "xrstors",
    65 => Pconfig "pconfig",
    66 => SppEvent "spp-event",
    67 => Umwait "umwait",
    68 => Tpause "tpause",
    69 => Loadiwkey "loadiwkey",
    70 => Enclv "enclv",
    72 => EnqcmdPasidFailure "enqcmd-pasid-failure",
    73 => EnqcmdsPasidFailure "enqcmds-pasid-failure",
    74 => BusLock "bus-lock",
    75 => InstructionTimeout "instruction-timeout",
    76 => Seamcall "seamcall",
    77 => Tdcall "tdcall",
}

impl ExitReason {
    /// Exits caused by a VMX instruction, which guests may not use (no
    /// nested virtualization): the hypervisor answers them with #UD.
    pub const fn is_vmx_instruction(self) -> bool {
        matches!(
            self,
            Self::Vmclear
                | Self::Vmlaunch
                | Self::Vmptrld
                | Self::Vmptrst
                | Self::Vmread
                | Self::Vmresume
                | Self::Vmwrite
                | Self::Vmxoff
                | Self::Vmxon
                | Self::Invept
                | Self::Invvpid
                | Self::Vmfunc
        )
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The exit-reason field, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub reason: ExitReason,
    /// Bit 31: VM entry failed (reasons 33, 34, 41); guest state is as
    /// before the entry.
    pub entry_failure: bool,
}

impl Exit {
    pub const fn decode(raw: u32) -> Self {
        Self {
            reason: ExitReason::from_basic((raw & EXIT_REASON_BASIC_MASK) as u16),
            entry_failure: raw & EXIT_REASON_ENTRY_FAILURE != 0,
        }
    }
}

/// A general-purpose register as exit qualifications number them (Tables
/// 28-3, 28-4): 0 RAX, 1 RCX, 2 RDX, 3 RBX, 4 RSP, 5 RBP, 6 RSI, 7 RDI,
/// 8-15 R8-R15.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gpr(u8);

impl Gpr {
    pub const RAX: Gpr = Gpr(0);
    pub const RCX: Gpr = Gpr(1);
    pub const RDX: Gpr = Gpr(2);
    pub const RBX: Gpr = Gpr(3);
    pub const RSP: Gpr = Gpr(4);
    pub const R8: Gpr = Gpr(8);

    /// The register's number, 0..=15.
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// Register `n` (its low four bits) in the instruction encoding's
    /// numbering, which is the same (SDM Vol. 2A Table 2-2, REX.R/B as bit 3).
    pub const fn from_number(n: u8) -> Gpr {
        Gpr(n & 0xf)
    }

    const fn from_field(qualification: u64, shift: u32) -> Gpr {
        Gpr(((qualification >> shift) & 0xf) as u8)
    }
}

/// Exit qualification of a control-register access (Table 28-3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrAccess {
    MovToCr {
        cr: u8,
        gpr: Gpr,
    },
    MovFromCr {
        cr: u8,
        gpr: Gpr,
    },
    Clts,
    /// LMSW with its 16-bit source operand.
    Lmsw {
        source: u16,
    },
}

const CR_NUMBER_MASK: u64 = 0xf;
const CR_ACCESS_TYPE_SHIFT: u32 = 4;
const CR_ACCESS_TYPE_MASK: u64 = 0x3;
const CR_GPR_SHIFT: u32 = 8;
const CR_LMSW_SOURCE_SHIFT: u32 = 16;

impl CrAccess {
    pub const fn decode(qualification: u64) -> Self {
        let cr = (qualification & CR_NUMBER_MASK) as u8;
        let gpr = Gpr::from_field(qualification, CR_GPR_SHIFT);
        match (qualification >> CR_ACCESS_TYPE_SHIFT) & CR_ACCESS_TYPE_MASK {
            0 => Self::MovToCr { cr, gpr },
            1 => Self::MovFromCr { cr, gpr },
            2 => Self::Clts,
            _ => Self::Lmsw { source: (qualification >> CR_LMSW_SOURCE_SHIFT) as u16 },
        }
    }
}

/// Exit qualification of a MOV DR (Table 28-4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrAccess {
    pub dr: u8,
    /// MOV from DR (read) rather than MOV to DR.
    pub read: bool,
    pub gpr: Gpr,
}

const DR_NUMBER_MASK: u64 = 0x7;
const DR_DIRECTION_READ: u64 = 1 << 4;
const DR_GPR_SHIFT: u32 = 8;

impl DrAccess {
    pub const fn decode(qualification: u64) -> Self {
        Self {
            dr: (qualification & DR_NUMBER_MASK) as u8,
            read: qualification & DR_DIRECTION_READ != 0,
            gpr: Gpr::from_field(qualification, DR_GPR_SHIFT),
        }
    }
}

/// Exit qualification of an I/O instruction (Table 28-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoAccess {
    pub port: u16,
    /// Access size in bytes: 1, 2 or 4.
    pub size: u8,
    /// IN (rather than OUT).
    pub input: bool,
    /// INS/OUTS.
    pub string: bool,
    /// REP-prefixed.
    pub rep: bool,
}

const IO_SIZE_MASK: u64 = 0x7;
const IO_DIRECTION_IN: u64 = 1 << 3;
const IO_STRING: u64 = 1 << 4;
const IO_REP: u64 = 1 << 5;
const IO_PORT_SHIFT: u32 = 16;

impl IoAccess {
    pub const fn decode(qualification: u64) -> Self {
        Self {
            port: (qualification >> IO_PORT_SHIFT) as u16,
            // Bits 2:0 hold the size minus one (0, 1 or 3).
            size: (qualification & IO_SIZE_MASK) as u8 + 1,
            input: qualification & IO_DIRECTION_IN != 0,
            string: qualification & IO_STRING != 0,
            rep: qualification & IO_REP != 0,
        }
    }
}

/// Exit qualification of an EPT violation (Table 28-7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)]
pub struct EptViolation {
    pub read: bool,
    pub write: bool,
    pub fetch: bool,
    /// The guest-physical address was mapped at all (any of bits 5:3).
    pub mapped: bool,
    /// The guest linear address field is valid.
    pub linear_valid: bool,
}

const EPT_READ: u64 = 1 << 0;
const EPT_WRITE: u64 = 1 << 1;
const EPT_FETCH: u64 = 1 << 2;
const EPT_PERMISSIONS: u64 = 0b111 << 3;
const EPT_LINEAR_VALID: u64 = 1 << 7;

impl EptViolation {
    pub const fn decode(qualification: u64) -> Self {
        Self {
            read: qualification & EPT_READ != 0,
            write: qualification & EPT_WRITE != 0,
            fetch: qualification & EPT_FETCH != 0,
            mapped: qualification & EPT_PERMISSIONS != 0,
            linear_valid: qualification & EPT_LINEAR_VALID != 0,
        }
    }

    /// "read", "write" or "fetch", for the fault event.
    pub const fn access(&self) -> &'static str {
        if self.fetch {
            "fetch"
        } else if self.write {
            "write"
        } else {
            "read"
        }
    }
}

/// Interruption-information fields (§25.8.3 Table 25-17, §25.9.2 Table
/// 25-19): bits 7:0 vector, 10:8 type, 11 deliver error code, 31 valid.
const INTR_VECTOR_MASK: u32 = 0xff;
const INTR_TYPE_SHIFT: u32 = 8;
const INTR_TYPE_MASK: u32 = 0x7;
const INTR_DELIVER_ERROR_CODE: u32 = 1 << 11;
const INTR_VALID: u32 = 1 << 31;

/// The interruption types of Table 25-17.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptionType {
    ExternalInterrupt,
    Nmi,
    HardwareException,
    SoftwareInterrupt,
    PrivilegedSoftwareException,
    SoftwareException,
    Other,
    Reserved,
}

impl InterruptionType {
    const fn from_bits(bits: u32) -> Self {
        match bits {
            0 => Self::ExternalInterrupt,
            2 => Self::Nmi,
            3 => Self::HardwareException,
            4 => Self::SoftwareInterrupt,
            5 => Self::PrivilegedSoftwareException,
            6 => Self::SoftwareException,
            7 => Self::Other,
            _ => Self::Reserved,
        }
    }
}

/// A VM-exit interruption-information field, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interruption {
    pub vector: u8,
    pub kind: InterruptionType,
    pub has_error_code: bool,
}

impl Interruption {
    /// `None` if the valid bit is clear.
    pub const fn decode(raw: u32) -> Option<Self> {
        if raw & INTR_VALID == 0 {
            return None;
        }
        Some(Self {
            vector: (raw & INTR_VECTOR_MASK) as u8,
            kind: InterruptionType::from_bits((raw >> INTR_TYPE_SHIFT) & INTR_TYPE_MASK),
            has_error_code: raw & INTR_DELIVER_ERROR_CODE != 0,
        })
    }
}

/// Exception vectors the hypervisor injects (SDM Vol. 3A §7.15).
pub mod vector {
    /// Debug exception (a general detect, §19.2.4).
    pub const DB: u8 = 1;
    /// Invalid opcode.
    pub const UD: u8 = 6;
    /// General protection; pushes an error code.
    pub const GP: u8 = 13;
}

/// The VM-entry interruption-information value that injects hardware
/// exception `vector`, with an error code when `error_code` is true
/// (Table 25-17; the code itself goes in its own field).
pub const fn inject_exception(vector: u8, error_code: bool) -> u32 {
    const HARDWARE_EXCEPTION: u32 = 3;
    INTR_VALID
        | (HARDWARE_EXCEPTION << INTR_TYPE_SHIFT)
        | if error_code { INTR_DELIVER_ERROR_CODE } else { 0 }
        | vector as u32
}

/// The VM-entry interruption-information value that injects external
/// interrupt `vector` (Table 25-17, type 0), as a virtual local APIC
/// delivers it (§27.6.1).
pub const fn inject_interrupt(vector: u8) -> u32 {
    INTR_VALID | vector as u32
}

/// Whether a VM-entry interruption-information value has an event to
/// inject (its valid bit, §25.8.3).
pub const fn is_valid_interruption(raw: u32) -> bool {
    raw & INTR_VALID != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reasons_round_trip() {
        for n in 0..=80u16 {
            let r = ExitReason::from_basic(n);
            assert_eq!(r.number(), n);
        }
        assert_eq!(ExitReason::from_basic(18), ExitReason::Vmcall);
        assert_eq!(ExitReason::from_basic(48), ExitReason::EptViolation);
        assert_eq!(ExitReason::from_basic(52), ExitReason::PreemptionTimer);
        assert_eq!(ExitReason::from_basic(35), ExitReason::Unknown(35));
        assert_eq!(ExitReason::TripleFault.name(), "triple-fault");
        assert!(ExitReason::Vmxon.is_vmx_instruction() && !ExitReason::Vmcall.is_vmx_instruction());
    }

    #[test]
    fn entry_failure_bit() {
        let e = Exit::decode(0x8000_0021);
        assert_eq!(e, Exit { reason: ExitReason::EntryFailGuestState, entry_failure: true });
        assert_eq!(Exit::decode(30), Exit { reason: ExitReason::IoInstruction, entry_failure: false });
    }

    #[test]
    fn cr_access() {
        // mov %rbx, %cr0
        assert_eq!(CrAccess::decode(0x300), CrAccess::MovToCr { cr: 0, gpr: Gpr::RBX });
        // mov %cr8, %r9
        assert_eq!(CrAccess::decode(0x918), CrAccess::MovFromCr { cr: 8, gpr: Gpr(9) });
        assert_eq!(CrAccess::decode(0x20), CrAccess::Clts);
        assert_eq!(CrAccess::decode(0x0011_0030), CrAccess::Lmsw { source: 0x11 });
    }

    #[test]
    fn dr_access() {
        assert_eq!(DrAccess::decode(0x217), DrAccess { dr: 7, read: true, gpr: Gpr::RDX });
        assert_eq!(DrAccess::decode(0x0), DrAccess { dr: 0, read: false, gpr: Gpr::RAX });
    }

    #[test]
    fn io_access() {
        // out %al, $0x80 ... here: outb to 0x3f8 via dx.
        let out = IoAccess::decode(0x03f8_0000);
        assert_eq!(out, IoAccess { port: 0x3f8, size: 1, input: false, string: false, rep: false });
        let ins = IoAccess::decode(0x0060_003b);
        assert_eq!(ins, IoAccess { port: 0x60, size: 4, input: true, string: true, rep: true });
    }

    #[test]
    fn ept_violation() {
        let v = EptViolation::decode(0x182);
        assert!(v.write && !v.read && !v.fetch && !v.mapped && v.linear_valid);
        assert_eq!(v.access(), "write");
        assert_eq!(EptViolation::decode(0x81).access(), "read");
        assert_eq!(EptViolation::decode(0x84).access(), "fetch");
        assert!(EptViolation::decode(0x0a).mapped);
    }

    #[test]
    fn interruption_info() {
        assert_eq!(inject_exception(vector::GP, true), 0x8000_0b0d);
        assert_eq!(inject_exception(vector::UD, false), 0x8000_0306);
        assert_eq!(inject_interrupt(0x20), 0x8000_0020);
        assert!(is_valid_interruption(inject_interrupt(0x20)) && !is_valid_interruption(0x20));
        let ext = Interruption::decode(0x8000_00f0).unwrap();
        assert_eq!((ext.vector, ext.kind, ext.has_error_code), (0xf0, InterruptionType::ExternalInterrupt, false));
        assert_eq!(Interruption::decode(0x8000_0202).unwrap().kind, InterruptionType::Nmi);
        assert_eq!(Interruption::decode(0x0000_0202), None);
    }
}
