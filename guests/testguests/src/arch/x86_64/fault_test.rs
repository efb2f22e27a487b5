//! Deliberate failures an x86_64 test guest can be asked for on its
//! command line, to test that the hypervisor contains them.

use crate::args::ArgError;

/// The boot argument that makes this guest fail on purpose before its
/// workload, for the integration tests of fault containment:
/// `fault_test=triple-fault` (an exception with no IDT) or
/// `fault_test=forbidden-msr` (RDMSR of IA32_FEATURE_CONTROL, which the
/// hypervisor answers with #GP), `fault_test=bad-apic` (illegal vectors
/// and an IPI to a vCPU it does not have, then a reserved TPR bit, which
/// the hypervisor answers with #GP), `fault_test=unbacked-rmw` (an ADD to
/// memory outside its RAM, which the hypervisor does not complete and
/// stops the guest for).
pub const FAULT_TEST_KEY: &str = "fault_test";

/// A deliberate failure (see [`FAULT_TEST_KEY`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultTest {
    TripleFault,
    ForbiddenMsr,
    BadApic,
    UnbackedRmw,
}

impl FaultTest {
    /// The last `fault_test=` of a command line, if any.
    pub fn from_cmdline(cmdline: &str) -> Result<Option<Self>, ArgError> {
        let mut test = None;
        for word in cmdline.split_ascii_whitespace() {
            let Some(value) = word.strip_prefix(FAULT_TEST_KEY).and_then(|v| v.strip_prefix('=')) else {
                continue;
            };
            test = Some(match value {
                "triple-fault" => Self::TripleFault,
                "forbidden-msr" => Self::ForbiddenMsr,
                "bad-apic" => Self::BadApic,
                "unbacked-rmw" => Self::UnbackedRmw,
                _ => return Err(ArgError::InvalidFlag { key: FAULT_TEST_KEY }),
            });
        }
        Ok(test)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::TripleFault => "triple-fault",
            Self::ForbiddenMsr => "forbidden-msr",
            Self::BadApic => "bad-apic",
            Self::UnbackedRmw => "unbacked-rmw",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_last_fault_test() {
        assert_eq!(FaultTest::from_cmdline("ticks=5"), Ok(None));
        assert_eq!(FaultTest::from_cmdline("fault_test=triple-fault"), Ok(Some(FaultTest::TripleFault)));
        let both = "fault_test=triple-fault x=1 fault_test=forbidden-msr";
        assert_eq!(FaultTest::from_cmdline(both), Ok(Some(FaultTest::ForbiddenMsr)));
        assert_eq!(FaultTest::from_cmdline("fault_test=oops"), Err(ArgError::InvalidFlag { key: FAULT_TEST_KEY }));
        assert_eq!(FaultTest::from_cmdline("fault_tests=1"), Ok(None));
        assert_eq!(FaultTest::ForbiddenMsr.name(), "forbidden-msr");
        assert_eq!(FaultTest::from_cmdline("fault_test=bad-apic"), Ok(Some(FaultTest::BadApic)));
        assert_eq!(FaultTest::BadApic.name(), "bad-apic");
        assert_eq!(FaultTest::from_cmdline("fault_test=unbacked-rmw"), Ok(Some(FaultTest::UnbackedRmw)));
        assert_eq!(FaultTest::UnbackedRmw.name(), "unbacked-rmw");
    }
}
