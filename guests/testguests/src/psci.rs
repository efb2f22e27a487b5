//! PSCI as a guest calls it (Arm DEN0022E, PSCI 1.1): function ids
//! (§5.1), return codes (§5.2.2), and the SMC Calling Convention rules
//! (Arm DEN0028) for reading a result. The conduit is `hvc #0`, as the
//! guest DTB's `psci` node says (`method = "hvc"`).

/// Function ids. Bit 30 set = SMC64 calling convention (DEN0028,
/// "Function Identifier"); the 64-bit variants take 64-bit addresses.
pub const PSCI_VERSION: u32 = 0x8400_0000;
pub const CPU_OFF: u32 = 0x8400_0002;
pub const CPU_ON: u32 = 0xc400_0003;
pub const AFFINITY_INFO: u32 = 0xc400_0004;
pub const SYSTEM_OFF: u32 = 0x8400_0008;
pub const SYSTEM_RESET: u32 = 0x8400_0009;
pub const PSCI_FEATURES: u32 = 0x8400_000a;

/// PSCI_VERSION: major in bits 31:16, minor in bits 15:0; 1.1.
pub const VERSION_1_1: i64 = 0x1_0001;

/// Return codes (§5.2.2).
pub const SUCCESS: i64 = 0;
pub const NOT_SUPPORTED: i64 = -1;
pub const INVALID_PARAMETERS: i64 = -2;
pub const ALREADY_ON: i64 = -4;

/// AFFINITY_INFO results: the target is on, or off.
pub const AFFINITY_ON: i64 = 0;
pub const AFFINITY_OFF: i64 = 1;
/// AFFINITY_INFO `lowest_affinity_level`: 0, the target is one PE.
pub const AFFINITY_LEVEL_PE: u64 = 0;

/// The SMC64 bit of a function id (DEN0028).
const SMC64: u32 = 1 << 30;
/// `target_cpu` (CPU_ON, AFFINITY_INFO) holds the MPIDR affinity fields
/// Aff3 (39:32) and Aff2-Aff0 (23:0); every other bit must be zero, so
/// MPIDR_EL1 bit 31 (RES1) and the MT/U bits are cleared.
const TARGET_CPU_MASK: u64 = 0xff_00ff_ffff;

/// The `target_cpu` argument that names the PE whose MPIDR_EL1 is `mpidr`.
pub const fn target_cpu(mpidr: u64) -> u64 {
    mpidr & TARGET_CPU_MASK
}

/// Aff0 of an MPIDR_EL1 value (bits 7:0): the vCPU index under our
/// hypervisor.
pub const fn aff0(mpidr: u64) -> u64 {
    mpidr & 0xff
}

/// The signed result of `function` from the caller's x0: an SMC32 call
/// returns it in W0 and leaves the upper half of X0 unspecified
/// (DEN0028), so only the low 32 bits count there.
pub const fn result(function: u32, x0: u64) -> i64 {
    if function & SMC64 != 0 {
        x0.cast_signed()
    } else {
        (x0 as u32).cast_signed() as i64
    }
}

/// A PSCI call a workload may make. CPU_ON takes no entry point: a vCPU
/// only ever starts at the runtime's secondary entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Version,
    /// PSCI_FEATURES of a function id.
    Features(u32),
    /// CPU_ON of `target` (a `target_cpu`), with `context` for its x0.
    CpuOn {
        target: u64,
        context: u64,
    },
    CpuOff,
    /// AFFINITY_INFO of one PE (a `target_cpu`).
    AffinityInfo(u64),
    SystemOff,
    SystemReset,
}

impl Call {
    /// The function id (x0).
    pub const fn function(self) -> u32 {
        match self {
            Self::Version => PSCI_VERSION,
            Self::Features(_) => PSCI_FEATURES,
            Self::CpuOn { .. } => CPU_ON,
            Self::CpuOff => CPU_OFF,
            Self::AffinityInfo(_) => AFFINITY_INFO,
            Self::SystemOff => SYSTEM_OFF,
            Self::SystemReset => SYSTEM_RESET,
        }
    }

    /// x1-x3 (zero where unused), given the runtime's secondary entry.
    pub const fn arguments(self, secondary_entry: u64) -> [u64; 3] {
        match self {
            Self::Features(function) => [function as u64, 0, 0],
            Self::CpuOn { target, context } => [target, secondary_entry, context],
            Self::AffinityInfo(target) => [target, AFFINITY_LEVEL_PE, 0],
            Self::Version | Self::CpuOff | Self::SystemOff | Self::SystemReset => [0; 3],
        }
    }
}

/// A vCPU's PSCI conduit.
pub trait Psci {
    /// Makes `call`; returns the caller's x0 as it came back (see
    /// [`result`], or use [`Psci::psci`]). CPU_ON starts the target at
    /// the runtime's secondary entry, which runs the image's secondary
    /// workload with the context id.
    fn psci_call(&mut self, call: Call) -> u64;

    /// This vCPU's MPIDR_EL1.
    fn mpidr(&self) -> u64;

    /// Makes `call` and returns its signed result.
    fn psci(&mut self, call: Call) -> i64 {
        result(call.function(), self.psci_call(call))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smc32_results_are_the_low_word_sign_extended() {
        assert_eq!(result(PSCI_VERSION, 0x1_0001), VERSION_1_1);
        assert_eq!(result(PSCI_FEATURES, 0xffff_ffff), NOT_SUPPORTED);
        assert_eq!(result(PSCI_FEATURES, u64::MAX), NOT_SUPPORTED);
        assert_eq!(result(PSCI_FEATURES, 0xdead_beef_0000_0000), SUCCESS);
    }

    #[test]
    fn smc64_results_are_the_whole_register() {
        assert_eq!(result(CPU_ON, (-4_i64).cast_unsigned()), ALREADY_ON);
        assert_eq!(result(CPU_ON, 0xffff_fffe), 0xffff_fffe);
        assert_eq!(result(AFFINITY_INFO, 1), AFFINITY_OFF);
    }

    #[test]
    fn calling_conventions_of_the_ids() {
        for id in [CPU_ON, AFFINITY_INFO] {
            assert_ne!(id & SMC64, 0, "{id:#x} is SMC64");
        }
        for id in [PSCI_VERSION, CPU_OFF, SYSTEM_OFF, PSCI_FEATURES] {
            assert_eq!(id & SMC64, 0, "{id:#x} is SMC32");
        }
    }

    #[test]
    fn calls_in_registers() {
        let entry = 0x4000_08a0;
        let on = Call::CpuOn { target: 1, context: 0x5a5a };
        assert_eq!((on.function(), on.arguments(entry)), (0xc400_0003, [1, entry, 0x5a5a]));
        let features = Call::Features(CPU_ON);
        assert_eq!((features.function(), features.arguments(entry)), (0x8400_000a, [0xc400_0003, 0, 0]));
        let affinity = Call::AffinityInfo(7);
        assert_eq!((affinity.function(), affinity.arguments(entry)), (0xc400_0004, [7, 0, 0]));
        for (call, id) in [(Call::Version, 0x8400_0000), (Call::CpuOff, 0x8400_0002), (Call::SystemOff, 0x8400_0008)] {
            assert_eq!((call.function(), call.arguments(entry)), (id, [0; 3]));
        }
    }

    #[test]
    fn target_cpu_keeps_only_the_affinity_fields() {
        assert_eq!(target_cpu(0x8000_0001), 1);
        assert_eq!(target_cpu(0x8100_0203), 0x203);
        assert_eq!(target_cpu(0x7f_c1ab_cdef), 0x7f_00ab_cdef);
        assert_eq!(aff0(0x8000_0107), 7);
    }
}
