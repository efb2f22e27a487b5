//! exerciser: calls every hypercall, valid and invalid, and checks each
//! status against `hypervisor/HYPERCALLS.md`.
//!
//! Lines: `exerciser start=1 privileged=<0|1>` (written by the console
//! check itself), `partition id=<n>`, `info version=<v> build=<b>
//! update_count=<n> cpus=<n> abi=<n>`, one `hypercall check=<name>
//! status=<s> expected=<e> ok=<0|1>` per check, then `exerciser ok=<0|1>
//! checks=<n> failed=<n>`.

use hvcall::{call, Control, HvInfo, PartitionState, Status, HV_INFO_ALIGN, HV_INFO_SIZE};

use crate::hypercall::Request;
use crate::{Env, Guest, Line, Outcome};
use Operand as O;
use Status as S;

/// A call code no version of the ABI defines.
pub const UNKNOWN_CODE: u16 = 0x7777;
/// A reserved control-word bit (bits 31:17 must be zero; TLFS §3.7).
const RESERVED_BIT: u64 = 1 << 17;
/// A partition id no hypervisor hands out.
const NO_SUCH_PARTITION: u64 = 0xffff;
/// How far past RAM the "outside RAM" addresses are.
const PAST_RAM: u64 = 64 << 20;

/// How a check fills its rep fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reps {
    None,
    /// rep count = the console line's length.
    LineLength,
    /// rep count = the line's length, rep start one past it.
    StartPastCount,
}

/// An input or output operand, resolved against the guest at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operand {
    Zero,
    /// The console line's GPA.
    Line,
    /// 64 MiB past the end of RAM.
    PastRam,
    /// 8 bytes before the end of RAM, so a line runs off its end.
    StraddlingRamEnd,
    /// The end of RAM (8-byte aligned, first byte outside).
    RamEnd,
    /// The aligned `HvInfo` buffer.
    Info,
    /// The `HvInfo` buffer plus one.
    InfoMisaligned,
    /// This partition's id, from `GET_PARTITION_ID`.
    OwnId,
    Value(u64),
}

/// What a successful call must also have produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Effect {
    None,
    /// Output = the caller's partition id (remembered for later checks).
    PartitionId,
    /// An `HvInfo` in the buffer.
    HvInfo,
    /// Output = `PartitionState::Running`.
    Running,
}

/// One row of the expectations table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    code: u16,
    fast: bool,
    reps: Reps,
    extra_bits: u64,
    input: Operand,
    output: Operand,
    effect: Effect,
    /// Expected status from an unprivileged and from a privileged guest.
    unprivileged: Status,
    privileged: Status,
}

impl Check {
    const fn new(name: &'static str, code: u16, fast: bool, expected: Status) -> Self {
        Self {
            name,
            code,
            fast,
            reps: Reps::None,
            extra_bits: 0,
            input: Operand::Zero,
            output: Operand::Zero,
            effect: Effect::None,
            unprivileged: expected,
            privileged: expected,
        }
    }

    const fn reps(self, reps: Reps) -> Self {
        Self { reps, ..self }
    }

    const fn input(self, input: Operand) -> Self {
        Self { input, ..self }
    }

    const fn output(self, output: Operand) -> Self {
        Self { output, ..self }
    }

    const fn effect(self, effect: Effect) -> Self {
        Self { effect, ..self }
    }

    const fn extra_bits(self, extra_bits: u64) -> Self {
        Self { extra_bits, ..self }
    }

    const fn when_privileged(self, privileged: Status) -> Self {
        Self { privileged, ..self }
    }

    /// The status this check expects.
    pub const fn expected(&self, privileged: bool) -> Status {
        if privileged {
            self.privileged
        } else {
            self.unprivileged
        }
    }

    fn control(&self, line_len: u16) -> u64 {
        let mut control = Control::new(self.code);
        control.fast = self.fast;
        match self.reps {
            Reps::None => {}
            Reps::LineLength => control.rep_count = line_len,
            Reps::StartPastCount => {
                control.rep_count = line_len;
                control.rep_start = line_len + 1;
            }
        }
        control.encode() | self.extra_bits
    }
}

/// Every check, in the order run. `GET_PARTITION_ID` comes before the
/// checks that need the id.
pub const CHECKS: [Check; 17] = [
    Check::new("console-write", call::CONSOLE_WRITE, false, S::Success).reps(Reps::LineLength).input(O::Line),
    Check::new("partition-id", call::GET_PARTITION_ID, true, S::Success).effect(Effect::PartitionId),
    Check::new("hv-info", call::GET_HV_INFO, false, S::Success).output(O::Info).effect(Effect::HvInfo),
    Check::new("yield", call::YIELD, true, S::Success),
    Check::new("update-phase", call::GET_UPDATE_PHASE, true, S::Success),
    Check::new("update-phase-not-fast", call::GET_UPDATE_PHASE, false, S::InvalidHypercallInput),
    Check::new("unknown-code", UNKNOWN_CODE, true, S::InvalidHypercallCode),
    Check::new("reserved-bits", call::YIELD, true, S::InvalidHypercallInput).extra_bits(RESERVED_BIT),
    Check::new("partition-id-not-fast", call::GET_PARTITION_ID, false, S::InvalidHypercallInput),
    Check::new("console-fast", call::CONSOLE_WRITE, true, S::InvalidHypercallInput)
        .reps(Reps::LineLength)
        .input(O::Line),
    Check::new("console-rep-start-past-count", call::CONSOLE_WRITE, false, S::InvalidHypercallInput)
        .reps(Reps::StartPastCount)
        .input(O::Line),
    Check::new("console-outside-ram", call::CONSOLE_WRITE, false, S::InvalidParameter)
        .reps(Reps::LineLength)
        .input(O::PastRam),
    Check::new("console-straddles-ram-end", call::CONSOLE_WRITE, false, S::InvalidParameter)
        .reps(Reps::LineLength)
        .input(O::StraddlingRamEnd),
    Check::new("hv-info-misaligned", call::GET_HV_INFO, false, S::InvalidAlignment).output(O::InfoMisaligned),
    Check::new("hv-info-outside-ram", call::GET_HV_INFO, false, S::InvalidParameter).output(O::RamEnd),
    Check::new("partition-state", call::GET_PARTITION_STATE, true, S::AccessDenied)
        .input(O::OwnId)
        .effect(Effect::Running)
        .when_privileged(S::Success),
    Check::new("partition-state-missing", call::GET_PARTITION_STATE, true, S::AccessDenied)
        .input(O::Value(NO_SUCH_PARTITION))
        .when_privileged(S::InvalidParameter),
];

/// The `GET_HV_INFO` buffer: aligned, with room for a misaligned write to
/// stay inside it should a hypervisor wrongly accept one.
#[repr(C, align(8))]
struct InfoBuffer([u8; HV_INFO_SIZE + 2 * HV_INFO_ALIGN as usize]);

/// Run-time state the operands resolve against.
struct Context<'a> {
    line: &'a Line,
    info: &'a InfoBuffer,
    ram_end: u64,
    own_id: u64,
}

impl Context<'_> {
    fn resolve<G: Guest>(&self, g: &G, operand: Operand) -> u64 {
        match operand {
            O::Zero => 0,
            O::Line => g.gpa_of(self.line.as_bytes().as_ptr()),
            O::PastRam => self.ram_end.saturating_add(PAST_RAM),
            O::StraddlingRamEnd => self.ram_end.saturating_sub(8),
            O::RamEnd => self.ram_end,
            O::Info => g.gpa_of(self.info.0.as_ptr()),
            O::InfoMisaligned => g.gpa_of(self.info.0.as_ptr()) + 1,
            O::OwnId => self.own_id,
            O::Value(v) => v,
        }
    }
}

/// The exerciser workload (`privileged=1` when the guest is privileged).
pub fn run<G: Guest>(g: &mut G, env: &Env) {
    let privileged = env.args().privileged;
    let mut start = Line::event("exerciser");
    start.flag("start", true).flag("privileged", privileged);
    let info = InfoBuffer([0; HV_INFO_SIZE + 2 * HV_INFO_ALIGN as usize]);
    let mut ctx = Context { line: &start, info: &info, ram_end: env.ram().end, own_id: 0 };
    let line_len = start.as_bytes().len() as u16;
    let mut failed = 0_u32;
    for check in &CHECKS {
        let request = Request {
            control: check.control(line_len),
            input: ctx.resolve(g, check.input),
            output: ctx.resolve(g, check.output),
        };
        let outcome = g.hypercall(request);
        let expected = check.expected(privileged);
        let mut ok = outcome.status_code() == expected as u16;
        if ok && expected == S::Success {
            ok = effect(g, check.effect, &outcome, &mut ctx);
        }
        failed += u32::from(!ok);
        g.write_line(
            Line::event("hypercall")
                .field("check", check.name)
                .field("status", outcome.status_code())
                .field("expected", expected as u16)
                .flag("ok", ok),
        );
    }
    g.write_line(
        Line::event("exerciser").flag("ok", failed == 0).field("checks", CHECKS.len()).field("failed", failed),
    );
}

/// Reports and checks what a successful call produced.
fn effect<G: Guest>(g: &mut G, effect: Effect, outcome: &Outcome, ctx: &mut Context<'_>) -> bool {
    match effect {
        Effect::None => true,
        Effect::PartitionId => {
            ctx.own_id = outcome.output;
            g.write_line(Line::event("partition").field("id", outcome.output));
            true
        }
        Effect::HvInfo => {
            // SAFETY: the buffer is a live local; a volatile read because the
            // hypervisor wrote it behind the compiler's back.
            let bytes = unsafe { core::ptr::read_volatile(&raw const ctx.info.0) };
            let mut wire = [0; HV_INFO_SIZE];
            wire.copy_from_slice(&bytes[..HV_INFO_SIZE]);
            let info = HvInfo::from_bytes(&wire);
            g.write_line(
                Line::event("info")
                    .field("version", text_or_unknown(&info.version))
                    .field("build", text_or_unknown(&info.build))
                    .field("update_count", info.update_count)
                    .field("cpus", info.cpus)
                    .field("abi", info.abi_version),
            );
            info.abi_version == hvcall::ABI_VERSION
        }
        Effect::Running => outcome.output == PartitionState::Running as u64,
    }
}

fn text_or_unknown(field: &[u8; 32]) -> &str {
    match HvInfo::text(field) {
        "" => "unknown",
        text => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Args;
    use crate::fake::FakeGuest;
    use crate::Region;
    use std::string::String;
    use std::vec::Vec;

    /// Runs the exerciser with `privileged=` as given on its command line.
    fn exercise(g: &mut FakeGuest, privileged: bool) {
        let env = Env::new(g.ram, [Region::default(); 2], Args { privileged, ..Args::default() });
        run(g, &env);
    }

    fn check_lines(g: &FakeGuest) -> Vec<&String> {
        g.lines.iter().filter(|l| l.starts_with("hypercall ")).collect()
    }

    #[test]
    fn table_matches_the_abi_document() {
        let names: Vec<_> = CHECKS.iter().map(|c| c.name).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "check names are unique");
        let by_name = |n: &str| CHECKS.iter().find(|c| c.name == n).unwrap();
        assert_eq!(by_name("unknown-code").expected(false), S::InvalidHypercallCode);
        assert_eq!(by_name("reserved-bits").expected(true), S::InvalidHypercallInput);
        assert_eq!(by_name("partition-id-not-fast").expected(false), S::InvalidHypercallInput);
        assert_eq!(by_name("console-outside-ram").expected(false), S::InvalidParameter);
        assert_eq!(by_name("hv-info-misaligned").expected(false), S::InvalidAlignment);
        assert_eq!(by_name("hv-info-outside-ram").expected(false), S::InvalidParameter);
        assert_eq!(by_name("partition-state").expected(false), S::AccessDenied);
        assert_eq!(by_name("partition-state").expected(true), S::Success);
        assert_eq!(by_name("partition-state-missing").expected(true), S::InvalidParameter);
        let id = CHECKS.iter().position(|c| c.name == "partition-id").unwrap();
        let state = CHECKS.iter().position(|c| c.name == "partition-state").unwrap();
        assert!(id < state, "the own id is known before it is used");
    }

    #[test]
    fn control_words() {
        let by_name = |n: &str| CHECKS.iter().find(|c| c.name == n).unwrap();
        let reserved = by_name("reserved-bits").control(30);
        assert_eq!(Control::decode(reserved), Err(S::InvalidHypercallInput));
        let past = by_name("console-rep-start-past-count").control(30);
        assert_eq!(Control::decode(past), Err(S::InvalidHypercallInput));
        let write = Control::decode(by_name("console-write").control(30)).unwrap();
        assert_eq!((write.code, write.fast, write.rep_count, write.rep_start), (call::CONSOLE_WRITE, false, 30, 0));
        let unknown = Control::decode(by_name("unknown-code").control(30)).unwrap();
        assert_eq!((unknown.code, unknown.fast), (UNKNOWN_CODE, true));
    }

    #[test]
    fn all_pass_against_a_conforming_hypervisor() {
        for privileged in [false, true] {
            let mut g = FakeGuest::new();
            g.privileged = privileged;
            exercise(&mut g, privileged);
            let flag = u8::from(privileged);
            assert_eq!(g.lines[0], std::format!("exerciser start=1 privileged={flag}"));
            assert_eq!(g.lines[1], "hypercall check=console-write status=0 expected=0 ok=1");
            assert_eq!(g.lines[2], "partition id=3");
            assert!(g.lines.contains(&"hypercall check=partition-id status=0 expected=0 ok=1".into()));
            assert!(g.lines.contains(&"info version=0.2.0 build=test-build update_count=1 cpus=2 abi=1".into()));
            assert_eq!(check_lines(&g).len(), CHECKS.len());
            assert!(check_lines(&g).iter().all(|l| l.ends_with(" ok=1")), "{:?}", g.lines);
            assert_eq!(g.lines.last().unwrap(), &std::format!("exerciser ok=1 checks={} failed=0", CHECKS.len()));
            assert_eq!(g.yields, 1);
        }
        let mut g = FakeGuest::new();
        exercise(&mut g, false);
        assert!(g.lines.contains(&"hypercall check=partition-state status=6 expected=6 ok=1".into()));
        assert!(g.lines.contains(&"hypercall check=unknown-code status=2 expected=2 ok=1".into()));
    }

    #[test]
    fn wrong_statuses_and_outputs_are_failures() {
        let mut g = FakeGuest::new();
        g.override_status = Some((UNKNOWN_CODE, 0));
        exercise(&mut g, false);
        assert!(g.lines.contains(&"hypercall check=unknown-code status=0 expected=2 ok=0".into()));
        assert_eq!(g.lines.last().unwrap(), &std::format!("exerciser ok=0 checks={} failed=1", CHECKS.len()));

        // A privileged guest told by its command line it is not: the
        // hypervisor answers, the expectation is wrong, both checks fail.
        let mut g = FakeGuest::new();
        g.privileged = true;
        exercise(&mut g, false);
        assert!(g.lines.last().unwrap().ends_with("failed=2"));

        // A hypervisor that reports the caller as stopped.
        let mut g = FakeGuest::new();
        g.privileged = true;
        g.own_state = PartitionState::Stopped;
        exercise(&mut g, true);
        assert!(g.lines.contains(&"hypercall check=partition-state status=0 expected=0 ok=0".into()));
    }

    #[test]
    fn outside_ram_operands_are_relative_to_the_ram_end() {
        let mut g = FakeGuest::new();
        exercise(&mut g, false);
        let writes: Vec<_> =
            g.requests.iter().filter(|r| r.control & 0xffff == u64::from(call::CONSOLE_WRITE)).collect();
        assert!(writes.iter().any(|r| r.input == g.ram.end + PAST_RAM));
        assert!(writes.iter().any(|r| r.input == g.ram.end - 8));
        let infos: Vec<_> = g.requests.iter().filter(|r| r.control & 0xffff == u64::from(call::GET_HV_INFO)).collect();
        assert_eq!(infos.len(), 3);
        assert_eq!(infos[0].output % 8, 0);
        assert_eq!(infos[1].output, infos[0].output + 1);
        assert_eq!(infos[2].output, g.ram.end);
    }
}
