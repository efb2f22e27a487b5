//! smp on x86_64: the hypervisor's INIT-SIPI-SIPI with two vCPUs, the
//! way a bootstrap processor starts an application processor (Intel SDM
//! Vol. 3A §9.4.4: INIT, 10 ms, start-up IPI, 200 µs, start-up IPI, each
//! an x2APIC ICR write, §11.6.1, §11.12.9).
//!
//! vCPU 0 (APIC ID 0) places the real-mode start-up code below 1 MiB,
//! sends INIT-SIPI-SIPI to an APIC ID the partition does not have (nothing
//! starts, no error is latched), then to vCPU 1, which enters long mode,
//! reads its x2APIC ID (MSR 0x802) and reports; a SIPI while vCPU 1 runs,
//! and one after it halted with interrupts off (not waiting for a SIPI),
//! are both ignored; INIT then SIPI starts it again. Every vCPU entry
//! into the start-up code is counted, so a SIPI that should have been
//! ignored shows.
//!
//! The two vCPUs run on different physical CPUs at the same time; they
//! share only words that each side writes and the other reads (acquire
//! and release), never a read-modify-write, except the start-up count,
//! which only vCPU 1's start-up code increments.
//!
//! With `updates=<n>` on its command line (n ≥ 3) the guest spreads its
//! vCPU 1 over live updates instead ([`ACROSS_UPDATES`]): vCPU 1 waits
//! for its SIPI across one update, runs across the next, is halted across
//! the third, and INIT-SIPI starts it again after that; the hypervisor's
//! update count (`GET_HV_INFO`) says when each update has happened.
//!
//! Lines, the same grammar as the PSCI smp workload: one
//! `sipi check=<name> result=<r> expected=<e> ok=<0|1>` per check; from
//! vCPU 1 at each start, `smp cpu=<id> context=0x.. apic_id=0x.. ok=<0|1>`;
//! then `smp ok=<0|1> checks=<n> failed=<n>`. vCPU 1 never let go by
//! vCPU 0: `smp cpu=1 error=no-go`.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::updater::hv_info;
use crate::{Env, Guest, Line};

/// The x2APIC ID of vCPU 1 (the vCPU index).
pub const SECONDARY: u64 = 1;
/// An x2APIC ID a two-vCPU partition does not have.
pub const ABSENT: u64 = 7;
/// The context vCPU 1 must find: the start-up code passes it on.
pub const SECONDARY_CONTEXT: u64 = 0x5a5a;
/// The SIPI vector: the start-up code's page, 0x8000 (000VV000H).
pub const STARTUP_VECTOR: u8 = 0x08;

/// ICR fields (SDM Vol. 3A §11.12.9, Figure 11-28): delivery modes INIT
/// (101b) and start-up (110b) in bits 10:8, level assert (14), trigger
/// mode level (15), destination in bits 63:32.
const ICR_INIT: u64 = 0b101 << 8;
const ICR_STARTUP: u64 = 0b110 << 8;
const ICR_LEVEL_ASSERT: u64 = 1 << 14;
const ICR_TRIGGER_LEVEL: u64 = 1 << 15;
const ICR_DEST_SHIFT: u32 = 32;

/// How long either vCPU waits for the other before giving up.
const WAIT_SECONDS: u64 = 2;
/// The SDM's delays (§9.4.4): after INIT, and between the two SIPIs.
const INIT_DELAY_US: u64 = 10_000;
const SIPI_DELAY_US: u64 = 200;
/// How long a check waits for a vCPU that should not start.
const QUIET_US: u64 = 50_000;
/// Across updates: how long either vCPU waits for the next update (or
/// for the other) before giving up, and how often vCPU 0 looks.
const UPDATE_WAIT_SECONDS: u64 = 60;
const UPDATE_POLL_US: u64 = 10_000;
/// A wait for an update that did not come.
pub const NO_UPDATE: i64 = -2;

/// What vCPU 1 reported, in [`Handshake::report`].
const REPORT_NONE: u64 = 0;
const REPORT_OK: u64 = 1;
const REPORT_FAILED: u64 = 2;
/// `secondary-report` results: vCPU 1's checks passed, failed, or it said
/// nothing in time.
pub const REPORTED_OK: i64 = 1;
pub const REPORTED_FAILED: i64 = 0;
pub const NOT_REPORTED: i64 = -1;

/// What the workload needs of an x86 vCPU: its x2APIC and a place for the
/// start-up code.
pub trait ApicStartup {
    /// Copies the real-mode start-up code to the page SIPI vector
    /// `vector` names, with `context` for the vCPU it starts; false if
    /// there is no conventional memory there.
    fn place_startup_code(&mut self, vector: u8, context: u64) -> bool;
    /// Writes the x2APIC interrupt command register (MSR 0x830).
    fn write_icr(&mut self, icr: u64);
    /// Latches and reads the error status register (MSR 0x828: a write,
    /// then a read, §11.5.3).
    fn apic_errors(&mut self) -> u64;
    /// This vCPU's x2APIC ID (MSR 0x802).
    fn apic_id(&mut self) -> u64;
    /// How many times a vCPU has entered the start-up code.
    fn startups(&self) -> u64;
}

/// The words vCPU 0 and vCPU 1 share; each has exactly one writer.
#[derive(Debug)]
pub struct Handshake {
    /// Written by vCPU 1 once it has printed its line.
    report: AtomicU64,
    /// Written by vCPU 0: vCPU 1 may halt.
    go: AtomicBool,
    /// Written by vCPU 1: the start-up count of the run that is about to
    /// halt.
    halted: AtomicU64,
    /// Written by vCPU 0 before it starts vCPU 1: wait for `go` across
    /// live updates, not just [`WAIT_SECONDS`].
    patient: AtomicBool,
    /// Written by vCPU 1: how many times it has looked for `go`.
    beats: AtomicU64,
}

impl Handshake {
    pub const fn new() -> Self {
        Self {
            report: AtomicU64::new(REPORT_NONE),
            go: AtomicBool::new(false),
            halted: AtomicU64::new(0),
            patient: AtomicBool::new(false),
            beats: AtomicU64::new(0),
        }
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
}

impl Default for Handshake {
    fn default() -> Self {
        Self::new()
    }
}

/// The handshake of the real guest: in bss, zeroed by vCPU 0 before it
/// starts the other.
static HANDSHAKE: Handshake = Handshake::new();

/// What one check does; each ends with a result to compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// This vCPU's x2APIC ID.
    OwnApicId,
    /// Places the start-up code: 1 if there was room.
    PlaceCode,
    /// INIT-SIPI-SIPI to [`ABSENT`], a quiet wait: the start-up count.
    StartAbsent,
    /// The ESR: what the sends so far latched.
    Errors,
    /// INIT-SIPI-SIPI to vCPU 1, then waits for its report: the ESR.
    StartSecondary,
    /// What vCPU 1 reported.
    SecondaryReport,
    /// The start-up count.
    Startups,
    /// A SIPI to vCPU 1 while it runs, a quiet wait: the start-up count.
    SipiWhileRunning,
    /// Lets vCPU 1 halt and waits for it: the start-up count it halted in.
    ReleaseAndAwaitHalt,
    /// A SIPI to the halted vCPU 1, a quiet wait: the start-up count.
    SipiWhileHalted,
    /// INIT then SIPI to vCPU 1, waits for it to halt again: the start-up
    /// count it halted in.
    Restart,
    /// Waits for the next live update ([`NO_UPDATE`] if none comes), then
    /// INIT-SIPI-SIPI to vCPU 1 and waits for its report.
    StartAfterUpdate,
    /// Waits for the next live update while vCPU 1 runs: 1 if vCPU 1
    /// still runs after it (its beats advance).
    RunAcrossUpdate,
    /// Waits for the next live update while vCPU 1 is halted, then INIT
    /// and SIPI: the start-up count it halted in again.
    RestartAfterUpdate,
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
pub const CHECKS: [Check; 12] = [
    Check::new("bsp-apic-id", Step::OwnApicId, 0),
    Check::new("startup-code", Step::PlaceCode, 1),
    Check::new("absent-not-started", Step::StartAbsent, 0),
    Check::new("absent-no-error", Step::Errors, 0),
    Check::new("init-sipi-sipi", Step::StartSecondary, 0),
    Check::new("secondary-report", Step::SecondaryReport, REPORTED_OK),
    Check::new("second-sipi-ignored", Step::Startups, 1),
    Check::new("sipi-while-running", Step::SipiWhileRunning, 1),
    Check::new("halted", Step::ReleaseAndAwaitHalt, 1),
    Check::new("sipi-while-halted", Step::SipiWhileHalted, 1),
    Check::new("init-restarts", Step::Restart, 2),
    Check::new("no-error", Step::Errors, 0),
];

/// The checks with `updates=<n>`: vCPU 1 waits for its SIPI across an
/// update, runs across one, and is halted across one.
pub const ACROSS_UPDATES: [Check; 7] = [
    Check::new("startup-code", Step::PlaceCode, 1),
    Check::new("start-after-update", Step::StartAfterUpdate, REPORTED_OK),
    Check::new("ran-across-update", Step::RunAcrossUpdate, 1),
    Check::new("halted", Step::ReleaseAndAwaitHalt, 1),
    Check::new("restart-after-update", Step::RestartAfterUpdate, 2),
    Check::new("startups", Step::Startups, 2),
    Check::new("no-error", Step::Errors, 0),
];

/// The smp workload of vCPU 0: [`CHECKS`], or [`ACROSS_UPDATES`] with
/// `updates=<n>`.
pub fn run<G: Guest + ApicStartup>(g: &mut G, env: &Env) {
    if env.args().updates.is_some() {
        run_checks(g, &HANDSHAKE, &ACROSS_UPDATES);
    } else {
        run_with(g, &HANDSHAKE);
    }
}

/// The smp workload of vCPU 1, started by a SIPI with `context` (the
/// start-up code passes it on). It returns to halt with interrupts off.
pub fn secondary<G: Guest + ApicStartup>(g: &mut G, context: u64) {
    secondary_with(g, context, &HANDSHAKE);
}

/// Runs every check of [`CHECKS`] and prints the verdict.
pub fn run_with<G: Guest + ApicStartup>(g: &mut G, handshake: &Handshake) {
    run_checks(g, handshake, &CHECKS);
}

fn run_checks<G: Guest + ApicStartup>(g: &mut G, handshake: &Handshake, checks: &[Check]) {
    let mut failed = 0_u32;
    for check in checks {
        let result = step(g, check.step, handshake);
        let ok = result == check.expected;
        failed += u32::from(!ok);
        g.write_line(
            Line::event("sipi")
                .field("check", check.name)
                .field("result", result)
                .field("expected", check.expected)
                .flag("ok", ok),
        );
    }
    g.write_line(Line::event("smp").flag("ok", failed == 0).field("checks", checks.len()).field("failed", failed));
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn step<G: Guest + ApicStartup>(g: &mut G, step: Step, handshake: &Handshake) -> i64 {
    match step {
        Step::OwnApicId => count(g.apic_id()),
        Step::PlaceCode => i64::from(g.place_startup_code(STARTUP_VECTOR, SECONDARY_CONTEXT)),
        Step::StartAbsent => {
            init_sipi_sipi(g, ABSENT);
            pause(g, QUIET_US);
            count(g.startups())
        }
        Step::Errors => count(g.apic_errors()),
        Step::StartSecondary => {
            init_sipi_sipi(g, SECONDARY);
            let errors = g.apic_errors();
            wait_until(g, WAIT_SECONDS, || handshake.reported() != NOT_REPORTED);
            count(errors)
        }
        Step::SecondaryReport => handshake.reported(),
        Step::Startups => count(g.startups()),
        Step::SipiWhileRunning | Step::SipiWhileHalted => {
            g.write_icr(sipi(SECONDARY));
            pause(g, QUIET_US);
            count(g.startups())
        }
        Step::ReleaseAndAwaitHalt => {
            handshake.go.store(true, Ordering::Release);
            wait_until(g, WAIT_SECONDS, || handshake.halted.load(Ordering::Acquire) != 0);
            // The halt itself follows the store by a few instructions.
            pause(g, QUIET_US);
            count(handshake.halted.load(Ordering::Acquire))
        }
        Step::Restart => restart(g, handshake),
        Step::StartAfterUpdate => {
            if !await_update(g) {
                return NO_UPDATE;
            }
            handshake.patient.store(true, Ordering::Release);
            init_sipi_sipi(g, SECONDARY);
            wait_until(g, WAIT_SECONDS, || handshake.reported() != NOT_REPORTED);
            handshake.reported()
        }
        Step::RunAcrossUpdate => {
            if !await_update(g) {
                return NO_UPDATE;
            }
            let before = handshake.beats.load(Ordering::Acquire);
            pause(g, QUIET_US);
            i64::from(handshake.beats.load(Ordering::Acquire) > before)
        }
        Step::RestartAfterUpdate => {
            if !await_update(g) {
                return NO_UPDATE;
            }
            restart(g, handshake)
        }
    }
}

/// INIT then SIPI to vCPU 1, and a wait for it to halt again: the
/// start-up count it halted in.
fn restart<G: Guest + ApicStartup>(g: &mut G, handshake: &Handshake) -> i64 {
    g.write_icr(init(SECONDARY));
    pause(g, INIT_DELAY_US);
    g.write_icr(sipi(SECONDARY));
    wait_until(g, WAIT_SECONDS, || handshake.halted.load(Ordering::Acquire) >= 2);
    count(handshake.halted.load(Ordering::Acquire))
}

/// Waits until the hypervisor's update count rises (looking every
/// [`UPDATE_POLL_US`]); false if it did not within
/// [`UPDATE_WAIT_SECONDS`] or cannot be read.
fn await_update<G: Guest>(g: &mut G) -> bool {
    let Some(start) = hv_info(g).map(|i| i.update_count) else { return false };
    let end = deadline(g, UPDATE_WAIT_SECONDS.saturating_mul(1_000_000));
    while g.counter() < end {
        pause(g, UPDATE_POLL_US);
        if hv_info(g).is_some_and(|i| i.update_count > start) {
            return true;
        }
    }
    false
}

const fn init(apic_id: u64) -> u64 {
    ICR_INIT | ICR_LEVEL_ASSERT | ICR_TRIGGER_LEVEL | (apic_id << ICR_DEST_SHIFT)
}

const fn sipi(apic_id: u64) -> u64 {
    ICR_STARTUP | ICR_LEVEL_ASSERT | STARTUP_VECTOR as u64 | (apic_id << ICR_DEST_SHIFT)
}

/// The SDM's sequence (§9.4.4), as Linux sends it in x2APIC mode: INIT
/// assert, INIT de-assert, then two SIPIs.
fn init_sipi_sipi<G: Guest + ApicStartup>(g: &mut G, apic_id: u64) {
    g.write_icr(init(apic_id));
    g.write_icr(ICR_INIT | ICR_TRIGGER_LEVEL | (apic_id << ICR_DEST_SHIFT));
    pause(g, INIT_DELAY_US);
    g.write_icr(sipi(apic_id));
    pause(g, SIPI_DELAY_US);
    g.write_icr(sipi(apic_id));
}

fn deadline<G: Guest>(g: &G, micros: u64) -> u64 {
    g.counter().saturating_add(g.counter_frequency().saturating_mul(micros) / 1_000_000)
}

fn pause<G: Guest>(g: &G, micros: u64) {
    let end = deadline(g, micros);
    while g.counter() < end {
        core::hint::spin_loop();
    }
}

fn wait_until<G: Guest>(g: &G, seconds: u64, done: impl Fn() -> bool) {
    let end = deadline(g, seconds.saturating_mul(1_000_000));
    while !done() && g.counter() < end {
        core::hint::spin_loop();
    }
}

/// vCPU 1: reports its x2APIC ID and the context, waits to be let go
/// (counting beats, across updates if vCPU 0 asked for patience), and
/// says it is about to halt.
pub fn secondary_with<G: Guest + ApicStartup>(g: &mut G, context: u64, handshake: &Handshake) {
    let id = g.apic_id();
    let ok = context == SECONDARY_CONTEXT && id == SECONDARY;
    g.write_line(Line::event("smp").field("cpu", id).hex("context", context).hex("apic_id", id).flag("ok", ok));
    handshake.report(ok);
    let seconds = if handshake.patient.load(Ordering::Acquire) { UPDATE_WAIT_SECONDS * 3 } else { WAIT_SECONDS };
    let end = deadline(g, seconds.saturating_mul(1_000_000));
    while !handshake.go.load(Ordering::Acquire) {
        // vCPU 1 is the only writer.
        handshake.beats.store(handshake.beats.load(Ordering::Relaxed).wrapping_add(1), Ordering::Release);
        if g.counter() >= end {
            g.write_line(Line::event("smp").field("cpu", id).field("error", "no-go"));
            break;
        }
        core::hint::spin_loop();
    }
    handshake.halted.store(g.startups(), Ordering::Release);
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

    /// Where a fake vCPU is in the INIT-SIPI protocol (as the
    /// hypervisor's `arch::x86_64::startup`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Cpu {
        Running,
        Halted,
        WaitForSipi,
    }

    /// A fake of the hypervisor's APIC bus for a two-vCPU partition: a
    /// SIPI to a waiting vCPU runs the secondary workload on a thread.
    struct Bus {
        cpus: [Cpu; 2],
        /// ICR writes by (sender, value).
        icrs: Vec<(u64, u64)>,
        startups: u64,
        code: Option<(u8, u64)>,
        /// vCPU 1's threads, which return their console lines.
        threads: Vec<JoinHandle<Vec<String>>>,
        /// A SIPI starts vCPU 1 whatever state it is in (a broken bus).
        sipi_always: bool,
        /// SIPIs start nothing.
        dead: bool,
    }

    struct Vcpu {
        id: u64,
        console: FakeGuest,
        bus: Arc<Mutex<Bus>>,
        handshake: Arc<Handshake>,
        clock: Instant,
        /// Counts per second the counter claims (it counts nanoseconds).
        frequency: u64,
    }

    impl Vcpu {
        fn boot(bus: Bus, frequency: u64) -> Self {
            Self {
                id: 0,
                console: FakeGuest::new(),
                bus: Arc::new(Mutex::new(bus)),
                handshake: Arc::new(Handshake::new()),
                clock: Instant::now(),
                frequency,
            }
        }

        fn start(&self, bus: &mut Bus) {
            bus.cpus[1] = Cpu::Running;
            bus.startups += 1;
            let context = bus.code.map_or(0, |(_, c)| c);
            let mut vcpu = Vcpu {
                id: 1,
                console: FakeGuest::new(),
                bus: Arc::clone(&self.bus),
                handshake: Arc::clone(&self.handshake),
                clock: self.clock,
                frequency: self.frequency,
            };
            bus.threads.push(thread::spawn(move || {
                let handshake = Arc::clone(&vcpu.handshake);
                secondary_with(&mut vcpu, context, &handshake);
                vcpu.bus.lock().unwrap().cpus[1] = Cpu::Halted;
                vcpu.console.lines
            }));
        }
    }

    impl ApicStartup for Vcpu {
        fn place_startup_code(&mut self, vector: u8, context: u64) -> bool {
            self.bus.lock().unwrap().code = Some((vector, context));
            true
        }

        fn write_icr(&mut self, icr: u64) {
            let bus = Arc::clone(&self.bus);
            let mut bus = bus.lock().unwrap();
            bus.icrs.push((self.id, icr));
            let dest = icr >> 32;
            if dest != 1 || self.id == 1 {
                return;
            }
            match (icr >> 8) & 0x7 {
                0b101 if icr & (3 << 14) != 1 << 15 => bus.cpus[1] = Cpu::WaitForSipi,
                0b110 if !bus.dead && (bus.cpus[1] == Cpu::WaitForSipi || bus.sipi_always) => {
                    let vector = (icr & 0xff) as u8;
                    if bus.code.is_some_and(|(v, _)| v == vector) {
                        self.start(&mut bus);
                    }
                }
                _ => {}
            }
        }

        fn apic_errors(&mut self) -> u64 {
            0
        }

        fn apic_id(&mut self) -> u64 {
            self.id
        }

        fn startups(&self) -> u64 {
            self.bus.lock().unwrap().startups
        }
    }

    impl Guest for Vcpu {
        /// Each hypercall advances the fake hypervisor's clock, so with
        /// `update_period` its update count rises as the guest polls it.
        fn hypercall(&mut self, request: Request) -> Outcome {
            let _ = self.console.counter();
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

    fn bus() -> Bus {
        Bus {
            cpus: [Cpu::Running, Cpu::WaitForSipi],
            icrs: Vec::new(),
            startups: 0,
            code: None,
            threads: Vec::new(),
            sipi_always: false,
            dead: false,
        }
    }

    /// Runs vCPU 0 to the end; returns its lines, vCPU 1's lines (every
    /// run) and the bus.
    fn run_smp(bus: Bus, frequency: u64) -> (Vec<String>, Vec<String>, Bus) {
        let mut vcpu = Vcpu::boot(bus, frequency);
        let handshake = Arc::clone(&vcpu.handshake);
        run_with(&mut vcpu, &handshake);
        let threads = core::mem::take(&mut vcpu.bus.lock().unwrap().threads);
        let secondary = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        let bus = Arc::into_inner(vcpu.bus).unwrap().into_inner().unwrap();
        (vcpu.console.lines, secondary, bus)
    }

    fn check_line(name: &str, result: i64, expected: i64) -> String {
        std::format!("sipi check={name} result={result} expected={expected} ok={}", u8::from(result == expected))
    }

    #[test]
    fn table_follows_the_sdm_and_the_plan() {
        let names: Vec<_> = CHECKS.iter().map(|c| c.name).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "check names are unique");
        let position = |n: &str| CHECKS.iter().position(|c| c.name == n).unwrap();
        assert!(position("startup-code") < position("absent-not-started"));
        assert!(position("absent-no-error") < position("init-sipi-sipi"), "the absent ID first");
        assert!(position("init-sipi-sipi") < position("secondary-report"));
        assert!(position("halted") < position("sipi-while-halted"));
        assert_eq!(CHECKS.last().unwrap().name, "no-error");
        // The ICR values of the SDM's example: INIT assert level, INIT
        // de-assert, SIPI with the vector of page 0x8000.
        assert_eq!(init(1), 0x0000_0001_0000_c500);
        assert_eq!(sipi(1), 0x0000_0001_0000_4608);
        assert_eq!(u64::from(STARTUP_VECTOR) << 12, 0x8000);
    }

    #[test]
    fn all_pass_against_a_conforming_hypervisor() {
        let (lines, secondary, bus) = run_smp(bus(), 1_000_000_000);
        let mut expected: Vec<String> = CHECKS.iter().map(|c| check_line(c.name, c.expected, c.expected)).collect();
        expected.push(std::format!("smp ok=1 checks={} failed=0", CHECKS.len()));
        assert_eq!(lines, expected);
        let ap = "smp cpu=1 context=0x5a5a apic_id=0x1 ok=1";
        assert_eq!(secondary, [ap, ap], "started twice: by INIT-SIPI-SIPI, and again after INIT-SIPI");
        assert_eq!(bus.startups, 2);
        assert_eq!(bus.cpus[1], Cpu::Halted);
        // INIT-SIPI-SIPI went to the absent ID first, then to vCPU 1.
        let to = |dest: u64| bus.icrs.iter().filter(|(_, icr)| icr >> 32 == dest).count();
        assert_eq!(to(ABSENT), 4);
        assert_eq!(to(SECONDARY), 4 + 1 + 1 + 2);
        assert!(bus.icrs.iter().all(|&(sender, _)| sender == 0));
    }

    #[test]
    fn a_bus_that_starts_nothing_fails_the_report_and_the_counts() {
        // Timeouts of a nominal 2 s take 2 ms.
        let (lines, secondary, _) = run_smp(Bus { dead: true, ..bus() }, 1_000_000);
        assert!(secondary.is_empty());
        assert!(lines.contains(&check_line("secondary-report", NOT_REPORTED, REPORTED_OK)));
        assert!(lines.contains(&check_line("second-sipi-ignored", 0, 1)));
        assert!(lines.contains(&check_line("init-restarts", 0, 2)));
        assert_eq!(lines.last().unwrap(), &std::format!("smp ok=0 checks={} failed=6", CHECKS.len()));
    }

    #[test]
    fn a_sipi_that_should_be_ignored_shows_in_the_count() {
        let (lines, _, _) = run_smp(Bus { sipi_always: true, ..bus() }, 1_000_000_000);
        assert!(lines.contains(&check_line("second-sipi-ignored", 2, 1)), "{lines:?}");
        assert!(lines.last().unwrap().starts_with("smp ok=0"));
    }

    /// Runs vCPU 0's across-updates checks with the fake hypervisor
    /// updating every `period` hypercalls (none: never).
    fn run_across(period: Option<u64>, frequency: u64) -> (Vec<String>, Vec<String>, Bus) {
        let mut vcpu = Vcpu::boot(bus(), frequency);
        vcpu.console.update_period = period;
        let handshake = Arc::clone(&vcpu.handshake);
        run_checks(&mut vcpu, &handshake, &ACROSS_UPDATES);
        let threads = core::mem::take(&mut vcpu.bus.lock().unwrap().threads);
        let secondary = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        let bus = Arc::into_inner(vcpu.bus).unwrap().into_inner().unwrap();
        (vcpu.console.lines, secondary, bus)
    }

    #[test]
    fn across_updates_vcpu_1_waits_runs_and_halts_over_one_update_each() {
        let (lines, secondary, bus) = run_across(Some(3), 1_000_000_000);
        let mut expected: Vec<String> =
            ACROSS_UPDATES.iter().map(|c| check_line(c.name, c.expected, c.expected)).collect();
        expected.push(std::format!("smp ok=1 checks={} failed=0", ACROSS_UPDATES.len()));
        assert_eq!(lines, expected);
        assert_eq!(secondary.len(), 2);
        assert_eq!(bus.startups, 2);
        // Nothing was sent before the first update, or to another ID.
        assert!(bus.icrs.iter().all(|(_, icr)| icr >> 32 == SECONDARY));
    }

    #[test]
    fn across_updates_without_updates_says_so() {
        // Timeouts of a nominal 60 s take 60 ms.
        let (lines, secondary, _) = run_across(None, 1_000_000);
        assert!(secondary.is_empty(), "vCPU 1 is not started before an update");
        assert!(lines.contains(&check_line("start-after-update", NO_UPDATE, REPORTED_OK)));
        assert!(lines.contains(&check_line("restart-after-update", NO_UPDATE, 2)));
        assert!(lines.last().unwrap().starts_with("smp ok=0"));
    }

    #[test]
    fn a_secondary_left_waiting_says_so_and_still_halts() {
        let mut vcpu = Vcpu::boot(bus(), 1_000_000);
        vcpu.id = 1;
        let handshake = Handshake::new();
        secondary_with(&mut vcpu, 0x1234, &handshake);
        assert_eq!(handshake.reported(), REPORTED_FAILED, "wrong context");
        assert_eq!(vcpu.console.lines, ["smp cpu=1 context=0x1234 apic_id=0x1 ok=0", "smp cpu=1 error=no-go"]);
        assert_eq!(handshake.halted.load(Ordering::Relaxed), 0);
    }
}
