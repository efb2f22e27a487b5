//! smp: the hypervisor's guest PSCI (Arm DEN0022E, PSCI 1.1) with two
//! vCPUs.
//!
//! vCPU 0 checks PSCI_VERSION, PSCI_FEATURES and AFFINITY_INFO, starts
//! vCPU 1 with CPU_ON (refused first for a vCPU that does not exist, and
//! again while vCPU 1 is on), lets vCPU 1 turn itself off with CPU_OFF,
//! waits for AFFINITY_INFO to say so, and stops the partition with
//! SYSTEM_OFF. vCPU 1 checks the context id and its MPIDR_EL1.
//!
//! vCPU 1 may run on another physical CPU at the same time as vCPU 0. The
//! MMU is off, so all memory is Device memory, where exclusives are not
//! guaranteed: the two share only a handshake of words that each side
//! writes with plain release stores and the other reads with acquire loads
//! (STLR/LDAR on aarch64), never a read-modify-write.
//!
//! Lines: one `psci check=<name> result=<r> expected=<e> ok=<0|1>` per
//! check; from vCPU 1, `smp cpu=1 context=0x.. mpidr=0x.. ok=<0|1>`;
//! then `smp ok=<0|1> checks=<n> failed=<n>`. A call that should not
//! return but did: `psci call=<cpu-off|system-off> result=<r>`; vCPU 1
//! never let go by vCPU 0: `smp cpu=1 error=no-go`.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::psci::{self, Call, Psci};
use crate::{Env, Guest, Line};

/// `target_cpu` of vCPU 1 (MPIDR_EL1 0x8000_0001: Aff0 = 1).
pub const SECONDARY: u64 = 1;
/// `target_cpu` of a vCPU a two-vCPU partition does not have (Aff0 = 7).
pub const ABSENT: u64 = 7;
/// The CPU_ON context id vCPU 1 must find in x0.
pub const SECONDARY_CONTEXT: u64 = 0x5a5a;
/// A function id in the PSCI range that PSCI 1.1 does not define.
pub const UNKNOWN_FUNCTION: u32 = 0x8400_1234;
/// How long either vCPU waits for the other before giving up.
const WAIT_SECONDS: u64 = 2;
/// How often vCPU 0 asks AFFINITY_INFO while waiting for vCPU 1 to stop.
const POLLS_PER_SECOND: u64 = 1000;

/// What vCPU 1 reported, in [`Handshake::report`].
const REPORT_NONE: u64 = 0;
const REPORT_OK: u64 = 1;
const REPORT_FAILED: u64 = 2;
/// `secondary-report` results: vCPU 1's checks passed, failed, or vCPU 1
/// said nothing in time.
pub const REPORTED_OK: i64 = 1;
pub const REPORTED_FAILED: i64 = 0;
pub const NOT_REPORTED: i64 = -1;

/// The words vCPU 0 and vCPU 1 share; each has exactly one writer.
#[derive(Debug)]
struct Handshake {
    /// Written by vCPU 1, once it has printed its line.
    report: AtomicU64,
    /// Written by vCPU 0: vCPU 1 may turn itself off.
    go: AtomicBool,
}

impl Handshake {
    const fn new() -> Self {
        Self { report: AtomicU64::new(REPORT_NONE), go: AtomicBool::new(false) }
    }

    fn report(&self, ok: bool) {
        self.report.store(if ok { REPORT_OK } else { REPORT_FAILED }, Ordering::Release);
    }

    fn reported(&self) -> i64 {
        match self.report.load(Ordering::Acquire) {
            REPORT_NONE => NOT_REPORTED,
            REPORT_OK => REPORTED_OK,
            _ => REPORTED_FAILED,
        }
    }

    fn release(&self) {
        self.go.store(true, Ordering::Release);
    }

    fn released(&self) -> bool {
        self.go.load(Ordering::Acquire)
    }
}

/// The handshake of the real guest: in bss, zeroed by the boot vCPU
/// before it starts the other.
static HANDSHAKE: Handshake = Handshake::new();

/// What one check does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// One PSCI call; the result is its return value.
    Call(Call),
    /// CPU_ON of vCPU 1 with [`SECONDARY_CONTEXT`]; when it succeeds, also
    /// waits for vCPU 1's report, so its line always comes before this
    /// check's.
    StartSecondary,
    /// What vCPU 1 reported (no PSCI call).
    SecondaryReport,
    /// Lets vCPU 1 turn itself off, then asks AFFINITY_INFO until it says
    /// OFF or [`WAIT_SECONDS`] pass; the result is the last answer.
    ReleaseAndAwaitOff,
}

/// One row of the expectations table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    step: Step,
    pub expected: i64,
}

impl Check {
    const fn new(name: &'static str, step: Step, expected: i64) -> Self {
        Self { name, step, expected }
    }
}

/// Every check, in the order run.
pub const CHECKS: [Check; 10] = [
    Check::new("version", Step::Call(Call::Version), psci::VERSION_1_1),
    Check::new("features-cpu-on", Step::Call(Call::Features(psci::CPU_ON)), psci::SUCCESS),
    Check::new("features-unknown", Step::Call(Call::Features(UNKNOWN_FUNCTION)), psci::NOT_SUPPORTED),
    Check::new("affinity-off", Step::Call(Call::AffinityInfo(SECONDARY)), psci::AFFINITY_OFF),
    Check::new("cpu-on-bad-mpidr", Step::Call(START_ABSENT), psci::INVALID_PARAMETERS),
    Check::new("cpu-on", Step::StartSecondary, psci::SUCCESS),
    Check::new("secondary-report", Step::SecondaryReport, REPORTED_OK),
    Check::new("cpu-on-again", Step::Call(START_SECONDARY), psci::ALREADY_ON),
    Check::new("affinity-on", Step::Call(Call::AffinityInfo(SECONDARY)), psci::AFFINITY_ON),
    Check::new("affinity-off-again", Step::ReleaseAndAwaitOff, psci::AFFINITY_OFF),
];

const START_SECONDARY: Call = Call::CpuOn { target: SECONDARY, context: SECONDARY_CONTEXT };
const START_ABSENT: Call = Call::CpuOn { target: ABSENT, context: SECONDARY_CONTEXT };

/// The smp workload of vCPU 0.
pub fn run<G: Guest + Psci>(g: &mut G, _env: &Env) {
    run_with(g, &HANDSHAKE);
}

/// The smp workload of vCPU 1, started by CPU_ON with `context` in x0.
pub fn secondary<G: Guest + Psci>(g: &mut G, context: u64) {
    secondary_with(g, context, &HANDSHAKE);
}

fn run_with<G: Guest + Psci>(g: &mut G, handshake: &Handshake) {
    let mut failed = 0_u32;
    for check in &CHECKS {
        let result = step(g, check.step, handshake);
        let ok = result == check.expected;
        failed += u32::from(!ok);
        g.write_line(
            Line::event("psci")
                .field("check", check.name)
                .field("result", result)
                .field("expected", check.expected)
                .flag("ok", ok),
        );
    }
    g.write_line(Line::event("smp").flag("ok", failed == 0).field("checks", CHECKS.len()).field("failed", failed));
    let result = g.psci(Call::SystemOff);
    g.write_line(Line::event("psci").field("call", "system-off").field("result", result));
}

fn step<G: Guest + Psci>(g: &mut G, step: Step, handshake: &Handshake) -> i64 {
    match step {
        Step::Call(call) => g.psci(call),
        Step::StartSecondary => {
            let result = g.psci(START_SECONDARY);
            if result == psci::SUCCESS {
                let deadline = deadline(g, WAIT_SECONDS);
                while handshake.reported() == NOT_REPORTED && g.counter() < deadline {
                    core::hint::spin_loop();
                }
            }
            result
        }
        Step::SecondaryReport => handshake.reported(),
        Step::ReleaseAndAwaitOff => {
            handshake.release();
            let deadline = deadline(g, WAIT_SECONDS);
            let interval = g.counter_frequency() / POLLS_PER_SECOND;
            loop {
                let state = g.psci(Call::AffinityInfo(SECONDARY));
                if state == psci::AFFINITY_OFF || g.counter() >= deadline {
                    return state;
                }
                let next = g.counter().saturating_add(interval);
                while g.counter() < next {
                    core::hint::spin_loop();
                }
            }
        }
    }
}

fn deadline<G: Guest>(g: &G, seconds: u64) -> u64 {
    g.counter().saturating_add(g.counter_frequency().saturating_mul(seconds))
}

fn secondary_with<G: Guest + Psci>(g: &mut G, context: u64, handshake: &Handshake) {
    let mpidr = g.mpidr();
    let ok = context == SECONDARY_CONTEXT && psci::target_cpu(mpidr) == SECONDARY;
    g.write_line(
        Line::event("smp").field("cpu", psci::aff0(mpidr)).hex("context", context).hex("mpidr", mpidr).flag("ok", ok),
    );
    handshake.report(ok);
    let deadline = deadline(g, WAIT_SECONDS);
    while !handshake.released() {
        if g.counter() >= deadline {
            g.write_line(Line::event("smp").field("cpu", psci::aff0(mpidr)).field("error", "no-go"));
            break;
        }
        core::hint::spin_loop();
    }
    let result = g.psci(Call::CpuOff);
    g.write_line(Line::event("psci").field("call", "cpu-off").field("result", result));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeGuest;
    use crate::{InterruptCounts, Outcome, Request};
    use std::string::String;
    use std::sync::{Arc, Mutex};
    use std::thread::{self, JoinHandle};
    use std::time::Instant;
    use std::vec::Vec;

    /// The secondary entry of the fake runtime.
    const FAKE_ENTRY: u64 = 0x4000_0800;
    /// vCPUs of the fake partition.
    const VCPUS: usize = 2;

    /// A fake of the hypervisor's PSCI (`psci_call` in
    /// `hypervisor/src/arch/aarch64/guests.rs`) for a two-vCPU partition.
    /// A CPU_ON runs the secondary workload on a host thread.
    struct Firmware {
        on: [bool; VCPUS],
        /// (caller vCPU, function, x1-x3) of every call.
        calls: Vec<(usize, u32, [u64; 3])>,
        /// vCPU 1's thread, which returns its console lines.
        secondary: Option<JoinHandle<Vec<String>>>,
        /// CPU_ON runs the target; false: accepted, but it never runs.
        starts: bool,
        /// The context id the started vCPU gets; `None`: the caller's.
        context: Option<u64>,
        system_off: bool,
    }

    /// One fake vCPU: a real-time counter, the console of a [`FakeGuest`],
    /// and the shared firmware.
    struct Vcpu {
        index: usize,
        console: FakeGuest,
        firmware: Arc<Mutex<Firmware>>,
        handshake: Arc<Handshake>,
        clock: Instant,
        /// Counts per second the counter claims; it really counts
        /// nanoseconds, so less than 10^9 makes timeouts that much shorter.
        frequency: u64,
    }

    impl Vcpu {
        fn boot(firmware: Firmware, frequency: u64) -> Self {
            let mut firmware = firmware;
            firmware.on[0] = true;
            Self {
                index: 0,
                console: FakeGuest::new(),
                firmware: Arc::new(Mutex::new(firmware)),
                handshake: Arc::new(Handshake::new()),
                clock: Instant::now(),
                frequency,
            }
        }

        fn target(target_cpu: u64) -> Option<usize> {
            let aff0 = psci::aff0(target_cpu);
            (target_cpu & !0xff == 0 && aff0 < VCPUS as u64).then_some(aff0 as usize)
        }

        /// Starts vCPU `index` on a thread (the firmware is locked).
        fn start(&self, index: usize, context: u64) -> JoinHandle<Vec<String>> {
            let mut vcpu = Vcpu {
                index,
                console: FakeGuest::new(),
                firmware: Arc::clone(&self.firmware),
                handshake: Arc::clone(&self.handshake),
                clock: self.clock,
                frequency: self.frequency,
            };
            thread::spawn(move || {
                let handshake = Arc::clone(&vcpu.handshake);
                secondary_with(&mut vcpu, context, &handshake);
                vcpu.console.lines
            })
        }

        fn answer(&self, fw: &mut Firmware, function: u32, args: [u64; 3]) -> i64 {
            match function {
                psci::PSCI_VERSION => psci::VERSION_1_1,
                psci::PSCI_FEATURES => {
                    let implemented = [
                        psci::PSCI_VERSION,
                        psci::CPU_OFF,
                        psci::CPU_ON,
                        psci::AFFINITY_INFO,
                        psci::SYSTEM_OFF,
                        psci::PSCI_FEATURES,
                    ];
                    if implemented.iter().any(|&id| u64::from(id) == args[0]) {
                        psci::SUCCESS
                    } else {
                        psci::NOT_SUPPORTED
                    }
                }
                psci::CPU_ON => match Self::target(args[0]) {
                    None => psci::INVALID_PARAMETERS,
                    Some(t) if fw.on[t] => psci::ALREADY_ON,
                    Some(t) => {
                        fw.on[t] = true;
                        if fw.starts {
                            fw.secondary = Some(self.start(t, fw.context.unwrap_or(args[2])));
                        }
                        psci::SUCCESS
                    }
                },
                psci::CPU_OFF => {
                    fw.on[self.index] = false;
                    psci::SUCCESS
                }
                psci::AFFINITY_INFO => match Self::target(args[0]) {
                    None => psci::INVALID_PARAMETERS,
                    Some(t) => i64::from(!fw.on[t]),
                },
                psci::SYSTEM_OFF => {
                    fw.system_off = true;
                    psci::SUCCESS
                }
                _ => psci::NOT_SUPPORTED,
            }
        }
    }

    impl Psci for Vcpu {
        fn psci_call(&mut self, call: Call) -> u64 {
            let (function, args) = (call.function(), call.arguments(FAKE_ENTRY));
            let firmware = Arc::clone(&self.firmware);
            let mut fw = firmware.lock().unwrap();
            fw.calls.push((self.index, function, args));
            let result = self.answer(&mut fw, function, args);
            if function & (1 << 30) == 0 {
                // SMC32: only W0 is written; the upper half reads as zero.
                u64::from((result as i32).cast_unsigned())
            } else {
                result.cast_unsigned()
            }
        }

        fn mpidr(&self) -> u64 {
            0x8000_0000 | self.index as u64
        }
    }

    impl Guest for Vcpu {
        fn hypercall(&mut self, request: Request) -> Outcome {
            self.console.hypercall(request)
        }

        fn gpa_of(&self, ptr: *const u8) -> u64 {
            self.console.gpa_of(ptr)
        }

        fn counter(&self) -> u64 {
            self.clock.elapsed().as_nanos() as u64
        }

        fn counter_frequency(&self) -> u64 {
            self.frequency
        }

        fn start_ticks(&mut self, _period: u64) -> bool {
            false
        }

        fn stop_ticks(&mut self) {}

        fn send_self_ipi(&mut self) -> bool {
            false
        }

        fn wait_for_interrupt(&mut self) {
            unreachable!("smp never waits for an interrupt");
        }

        fn interrupt_counts(&self) -> InterruptCounts {
            InterruptCounts::default()
        }

        fn probe(&mut self, _gpa: u64) -> [u64; 2] {
            unreachable!("smp probes nothing");
        }
    }

    fn firmware() -> Firmware {
        Firmware {
            on: [false; VCPUS],
            calls: Vec::new(),
            secondary: None,
            starts: true,
            context: None,
            system_off: false,
        }
    }

    /// Runs vCPU 0 to the end; returns its lines, vCPU 1's lines and the
    /// firmware.
    fn run_smp(firmware: Firmware, frequency: u64) -> (Vec<String>, Vec<String>, Firmware) {
        let mut vcpu = Vcpu::boot(firmware, frequency);
        let handshake = Arc::clone(&vcpu.handshake);
        run_with(&mut vcpu, &handshake);
        let secondary = vcpu.firmware.lock().unwrap().secondary.take();
        let secondary_lines = secondary.map(|t| t.join().unwrap()).unwrap_or_default();
        let firmware = Arc::into_inner(vcpu.firmware).unwrap().into_inner().unwrap();
        (vcpu.console.lines, secondary_lines, firmware)
    }

    fn check_line(name: &str, result: i64, expected: i64) -> String {
        std::format!("psci check={name} result={result} expected={expected} ok={}", u8::from(result == expected))
    }

    #[test]
    fn table_follows_den0022e_and_the_plan() {
        let names: Vec<_> = CHECKS.iter().map(|c| c.name).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "check names are unique");
        let by_name = |n: &str| CHECKS.iter().find(|c| c.name == n).unwrap();
        let position = |n: &str| CHECKS.iter().position(|c| c.name == n).unwrap();
        assert_eq!(by_name("version").expected, 65537);
        assert_eq!(by_name("features-cpu-on").expected, 0);
        assert_eq!(by_name("features-unknown").expected, -1);
        assert_eq!(by_name("affinity-off").expected, 1);
        assert_eq!(by_name("cpu-on-bad-mpidr").expected, -2);
        assert_eq!(by_name("cpu-on").expected, 0);
        assert_eq!(by_name("cpu-on-again").expected, -4);
        assert_eq!(by_name("affinity-on").expected, 0);
        assert_eq!(by_name("affinity-off-again").expected, 1);
        assert!(position("affinity-off") < position("cpu-on"), "vCPU 1 is off before it is started");
        assert!(position("cpu-on") < position("secondary-report"));
        assert!(position("cpu-on-again") < position("affinity-off-again"), "refused while vCPU 1 is held on");
        assert!(position("affinity-on") < position("affinity-off-again"));
        assert_eq!(CHECKS.last().unwrap().name, "affinity-off-again", "vCPU 1 is released last");
    }

    #[test]
    fn all_pass_against_a_conforming_hypervisor() {
        let (lines, secondary, fw) = run_smp(firmware(), 1_000_000_000);
        let mut expected: Vec<String> = CHECKS.iter().map(|c| check_line(c.name, c.expected, c.expected)).collect();
        expected.push(std::format!("smp ok=1 checks={} failed=0", CHECKS.len()));
        // The fake's SYSTEM_OFF returns; the real one does not.
        expected.push("psci call=system-off result=0".into());
        assert_eq!(lines, expected);
        assert_eq!(secondary, ["smp cpu=1 context=0x5a5a mpidr=0x80000001 ok=1", "psci call=cpu-off result=0"]);
        assert!(fw.system_off);
        assert_eq!(fw.on, [true, false]);
        assert!(fw.calls.contains(&(0, psci::CPU_ON, [SECONDARY, FAKE_ENTRY, SECONDARY_CONTEXT])));
        assert!(fw.calls.contains(&(0, psci::CPU_ON, [ABSENT, FAKE_ENTRY, SECONDARY_CONTEXT])));
        assert!(fw.calls.contains(&(0, psci::PSCI_FEATURES, [u64::from(UNKNOWN_FUNCTION), 0, 0])));
        assert!(fw.calls.contains(&(1, psci::CPU_OFF, [0; 3])));
        assert_eq!(fw.calls.last(), Some(&(0, psci::SYSTEM_OFF, [0; 3])));
    }

    #[test]
    fn a_secondary_that_never_runs_fails_its_report_and_the_off_wait() {
        // Timeouts of a nominal 2 s take 2 ms.
        let (lines, secondary, fw) = run_smp(Firmware { starts: false, ..firmware() }, 1_000_000);
        assert!(secondary.is_empty());
        assert!(lines.contains(&check_line("cpu-on", 0, 0)));
        assert!(lines.contains(&check_line("secondary-report", NOT_REPORTED, REPORTED_OK)));
        assert!(lines.contains(&check_line("cpu-on-again", psci::ALREADY_ON, psci::ALREADY_ON)));
        assert!(lines.contains(&check_line("affinity-off-again", psci::AFFINITY_ON, psci::AFFINITY_OFF)));
        assert!(lines.contains(&std::format!("smp ok=0 checks={} failed=2", CHECKS.len())));
        assert!(fw.system_off, "SYSTEM_OFF even after failures");
    }

    #[test]
    fn a_wrong_context_id_fails_the_secondary_report() {
        let (lines, secondary, _) = run_smp(Firmware { context: Some(0x1234), ..firmware() }, 1_000_000_000);
        assert_eq!(secondary[0], "smp cpu=1 context=0x1234 mpidr=0x80000001 ok=0");
        assert!(lines.contains(&check_line("secondary-report", REPORTED_FAILED, REPORTED_OK)));
        assert!(lines.contains(&std::format!("smp ok=0 checks={} failed=1", CHECKS.len())));
    }

    #[test]
    fn a_secondary_left_waiting_says_so_and_still_turns_off() {
        let mut vcpu = Vcpu::boot(firmware(), 1_000_000);
        vcpu.index = 1;
        let handshake = Handshake::new();
        secondary_with(&mut vcpu, SECONDARY_CONTEXT, &handshake);
        assert_eq!(handshake.reported(), REPORTED_OK);
        assert_eq!(
            vcpu.console.lines,
            ["smp cpu=1 context=0x5a5a mpidr=0x80000001 ok=1", "smp cpu=1 error=no-go", "psci call=cpu-off result=0"]
        );
        assert!(vcpu.firmware.lock().unwrap().calls.contains(&(1, psci::CPU_OFF, [0; 3])));
    }
}
