//! `hvbench`: live-update blackout against guest memory size, on aarch64
//! under QEMU with `-icount shift=0,sleep=off` (guest time = instruction
//! count, so the figures are reproducible). For each size, one guest of that
//! size (the blackout meter) and the updater run; the updater performs
//! several updates A -> B -> A. Prints `BENCH` lines:
//!
//! ```text
//! BENCH name=update_blackout_us guest_mib=64 value=11713 unit=us
//! BENCH name=update_handover_bytes guest_mib=64 value=... unit=bytes
//! ```
//!
//! `--arch x86_64` runs the same under Bochs (`clock: sync=none`: guest
//! time follows the emulated instruction count, so it is reproducible too)
//! with the guest as a multiboot2 module, and also prints the blackout of
//! each update:
//!
//! ```text
//! BENCH name=update_blackout_us arch=x86_64 guest_mib=16 update=1 value=210000 unit=us
//! ```
//!
//! `--arch x86_64 --machine qemu` runs it under QEMU TCG instead, where the
//! guests run under AMD SVM with nested paging, with the same `--clock`
//! choice as aarch64 (`clock=icount` or `clock=tcg` in the tags; Bochs
//! runs are tagged `clock=bochs`).
//!
//! `--guests 1,4,8` runs that many blackout meters of each size (spread
//! over both CPUs) and tags every line `guests=N`. `--clock tcg` (aarch64)
//! runs QEMU without `-icount`: guest time is host time, so the figures
//! show what a host's load and TCG's translation cost add; under the
//! default `--clock icount` one guest microsecond is 1000 instructions
//! (`shift=0`), and the phase lines carry `insns=`.
//!
//! Usage: `hvbench [--arch aarch64|x86_64] [--machine qemu|bochs]
//! [--sizes 64,1024] [--guests 1] [--clock icount|tcg] [--updates N]`.

use std::process::ExitCode;
use std::time::Duration;

use hv_tests::emulator::{self, RunSpec};
use hv_tests::guests::{self, GuestArg};
use hv_tests::image::{self, ImageSpec, UPDATE_B_VERSION};
use hv_tests::{Arch, LaunchError, Machine};

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// How guest time runs under QEMU (aarch64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Clock {
    /// `-icount shift=0,sleep=off`: one instruction per nanosecond.
    Icount,
    /// Plain TCG: guest time is host time.
    Tcg,
}

impl Clock {
    fn name(self) -> &'static str {
        match self {
            Clock::Icount => "icount",
            Clock::Tcg => "tcg",
        }
    }
}

/// One configuration: `guests` meters of `size_mib` each.
#[derive(Clone, Copy, Debug)]
struct Case {
    arch: Arch,
    /// x86_64: Bochs (VT-x) or QEMU (SVM); aarch64: QEMU.
    machine: Machine,
    size_mib: u64,
    guests: u64,
    clock: Clock,
    updates: u32,
}

/// Runs the x86_64 guests `list` on image `a` in `machine`: Bochs, or
/// QEMU (SVM) under `clock`.
fn x86_64_run(
    a: &image::BuiltImage,
    list: &[GuestArg],
    machine: Machine,
    clock: Clock,
    size_mib: u64,
    meters: u64,
) -> Result<emulator::RunOutcome, LaunchError> {
    let bochs = machine == Machine::Bochs;
    // RAM: the guests, the 32 MiB scratch and the 16 MiB kexec window,
    // below 4 GiB.
    let name = if bochs {
        format!("bench-x86_64-update-{size_mib}m-{meters}g")
    } else {
        format!("bench-x86_64-svm-update-{size_mib}m-{meters}g-{}", clock.name())
    };
    let mut spec = RunSpec::new(&name, machine);
    spec.mem_mib = u32::try_from((size_mib * meters).next_power_of_two() * 2 + 128).unwrap_or(u32::MAX);
    spec.timeout = Duration::from_mins(10);
    if !bochs && clock == Clock::Icount {
        spec.extra_args = vec!["-icount".into(), "shift=0,sleep=off".into()];
    }
    let modules = guests::grub_modules(list)?;
    let iso = image::iso_with_modules(a, &modules, &emulator::run_dir(&spec))?;
    emulator::run(&iso, &spec)
}

fn bench(case: Case) -> Result<(), LaunchError> {
    let Case { arch, machine, size_mib, guests: meters, clock, updates } = case;
    let bochs = machine == Machine::Bochs;
    let a = image::build(&ImageSpec { arch, version: None, slot: 0 })?;
    let b = image::build(&ImageSpec { arch, version: Some(UPDATE_B_VERSION.into()), slot: image::update_slot(arch) })?;
    let dir = guests::build_test_guests(arch)?;
    let meter = |k: u64| GuestArg {
        file: dir.join("blackout.bin"),
        name: if k == 0 { "blackout".into() } else { format!("blackout{k}") },
        mem_mib: size_mib,
        vcpus: 1,
        privileged: false,
        initrd: None,
        devices: Vec::new(),
        // Under Bochs each serial report costs milliseconds: report only
        // gaps longer than two time slices there.
        cmdline: if bochs {
            format!("seconds={} gap_report_us=20000", u64::from(updates) / 2 + 3)
        } else {
            format!("seconds={}", u64::from(updates) / 2 + 3)
        },
    };
    let cmd = format!("updates={updates} delay_ms=300");
    let driver = guests::updater_guest(arch, &[b.update_image(), a.update_image()], 16, &cmd)?;
    let mut list: Vec<GuestArg> = (0..meters).map(meter).collect();
    list.push(driver);
    let total_mib = size_mib * meters;
    let run = match arch {
        Arch::Aarch64 => {
            // RAM: the guest block is aligned to its size, and the blobs sit
            // at the top, so leave room for an aligned block above 2 GiB.
            let ram_mib = (total_mib * 2).max(512) + 1024;
            let name = format!("bench-update-{size_mib}m-{meters}g-{}", clock.name());
            let mut spec = RunSpec::new(&name, Machine::Qemu);
            spec.mem_mib = u32::try_from(ram_mib).unwrap_or(u32::MAX);
            spec.timeout = Duration::from_mins(10);
            if clock == Clock::Icount {
                spec.extra_args = vec!["-icount".into(), "shift=0,sleep=off".into()];
            }
            let run_dir = emulator::run_dir(&spec);
            std::fs::create_dir_all(&run_dir).map_err(|err| LaunchError::Io { what: "run dir".into(), err })?;
            let placed = guests::place(&list, ram_mib, &run_dir)?;
            spec.blobs = placed.blobs;
            spec.cmdline = Some(placed.cmdline);
            emulator::run(&a, &spec)?
        }
        Arch::X86_64 => x86_64_run(&a, &list, machine, clock, size_mib, meters)?,
    };
    let done = run.hv("update-done");
    if done.len() != updates as usize || !run.clean_shutdown() {
        return Err(LaunchError::Image(run.failure(&format!("{} of {updates} updates done", done.len()))));
    }
    let field = |k: &str| done.iter().filter_map(|e| e.num(k)).collect::<Vec<u64>>();
    let rows = hv_tests::summary::updates(&run.events);
    let seen: Vec<u64> = rows.iter().filter_map(|r| r.guest_gap_us.values().max().copied()).collect();
    let phases = run.hv("update-phases");
    let phase = |k: &str| median(phases.iter().filter_map(|e| e.num(k)).collect());
    // Every line: the arch, the size, the number of meters and the clock.
    let tags = format!(
        "arch={} guest_mib={size_mib} guests={meters} clock={}",
        arch.name(),
        if bochs { "bochs" } else { clock.name() }
    );
    if arch == Arch::X86_64 {
        for (k, us) in field("blackout_us").iter().enumerate() {
            println!("BENCH name=update_blackout_us {tags} update={} value={us} unit=us", k + 1);
        }
    }
    // Under icount (shift=0) a microsecond of guest time is 1000
    // instructions of the CPU that ran it.
    let insns = |us: u64| {
        if !bochs && clock == Clock::Icount {
            format!(" insns={}", us * 1000)
        } else {
            String::new()
        }
    };
    let blackout = median(field("blackout_us"));
    println!("BENCH name=update_blackout_us {tags} value={blackout} unit=us{}", insns(blackout));
    println!("BENCH name=update_blackout_guest_seen_us {tags} value={} unit=us", median(seen));
    println!("BENCH name=update_handover_bytes {tags} value={} unit=bytes", median(field("handover_bytes")));
    println!("BENCH name=update_preserved_pages {tags} value={} unit=pages", median(field("preserved_pages")));
    for k in ["freeze_to_kexec_us", "kexec_to_entry_us", "entry_to_restored_us", "restored_to_resumed_us"] {
        let us = phase(k);
        println!("BENCH name=update_phase_{k} {tags} value={us} unit=us{}", insns(us));
    }
    // The brownout preparation of each new image (aarch64: the old image
    // calls the new one's brownout entry; guests run meanwhile, and under
    // icount the other CPU's guest time is in this figure too).
    let prepared = run.hv("update-prepared");
    if !prepared.is_empty() {
        let us = median(prepared.iter().filter_map(|e| e.num("us")).collect());
        println!("BENCH name=update_brownout_prepare_us {tags} value={us} unit=us");
    }
    // The restore's steps (boot CPU) and when each CPU was back in a guest.
    for (line, prefix) in [("update-steps", "update_step_"), ("update-cpus", "update_resume_")] {
        let events = run.hv(line);
        let keys: std::collections::BTreeSet<&String> = events.iter().flat_map(|e| e.fields.keys()).collect();
        for k in keys {
            let us = median(events.iter().filter_map(|e| e.num(k)).collect());
            println!("BENCH name={prefix}{k} {tags} value={us} unit=us{}", insns(us));
        }
    }
    Ok(())
}

const USAGE: &str = "usage: hvbench [--arch aarch64|x86_64] [--machine qemu|bochs] [--sizes 64,1024] \
                     [--guests 1,4,8] [--clock icount|tcg] [--updates N]";

/// What to measure.
#[derive(Debug, PartialEq, Eq)]
struct Options {
    arch: Arch,
    /// `--machine`; by default the arch's own (QEMU for aarch64, Bochs
    /// for x86_64).
    machine: Option<Machine>,
    sizes: Option<Vec<u64>>,
    guests: Vec<u64>,
    clock: Clock,
    updates: u32,
}

/// Parses the command line; every value is checked, none ignored.
fn parse(args: &[String]) -> Result<Options, String> {
    let mut o =
        Options { arch: Arch::Aarch64, machine: None, sizes: None, guests: vec![1], clock: Clock::Icount, updates: 4 };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--sizes" => {
                let sizes = value
                    .split(',')
                    .map(|s| s.parse().ok().filter(|&n: &u64| n > 0))
                    .collect::<Option<Vec<u64>>>()
                    .ok_or_else(|| format!("--sizes '{value}': want guest sizes in MiB, e.g. 64,1024"))?;
                o.sizes = Some(sizes);
            }
            "--guests" => {
                o.guests = value
                    .split(',')
                    .map(|s| s.parse().ok().filter(|n: &u64| (1..=8).contains(n)))
                    .collect::<Option<Vec<u64>>>()
                    .ok_or_else(|| format!("--guests '{value}': want guest counts from 1 to 8, e.g. 1,4,8"))?;
            }
            "--clock" => {
                o.clock = match value.as_str() {
                    "icount" => Clock::Icount,
                    "tcg" => Clock::Tcg,
                    _ => return Err(format!("--clock '{value}': want icount or tcg")),
                };
            }
            "--arch" => {
                o.arch = Arch::parse(value).ok_or_else(|| format!("--arch '{value}': want aarch64 or x86_64"))?;
            }
            "--machine" => {
                o.machine = Some(match value.as_str() {
                    "qemu" => Machine::Qemu,
                    "bochs" => Machine::Bochs,
                    _ => return Err(format!("--machine '{value}': want qemu or bochs")),
                });
            }
            "--updates" => {
                o.updates = value
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("--updates '{value}': want a number of updates, at least 1"))?;
            }
            other => return Err(format!("unknown option '{other}'")),
        }
    }
    match (o.arch, o.machine) {
        (Arch::Aarch64, Some(Machine::Qemu) | None) | (Arch::X86_64, Some(Machine::Qemu | Machine::Bochs) | None) => {}
        (a, Some(m)) => return Err(format!("--machine {m:?}: not for {}", a.name()).to_lowercase()),
    }
    Ok(o)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let Options { arch, machine, sizes, guests, clock, updates } = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("hvbench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let machine = machine.unwrap_or(Machine::default_for(arch));
    // Bochs emulates every instruction: smaller guests there.
    let sizes: Vec<u64> =
        sizes.unwrap_or_else(|| if machine == Machine::Bochs { vec![16, 64] } else { vec![64, 1024] });
    for size in sizes {
        for &n in &guests {
            eprintln!(
                "hvbench: {updates} updates with {n} guest(s) of {size} MiB on {} ({})",
                arch.name(),
                clock.name()
            );
            if let Err(e) = bench(Case { arch, machine, size_mib: size, guests: n, clock, updates }) {
                eprintln!("hvbench: {e}");
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_line(line: &str) -> Result<Options, String> {
        parse(&line.split_whitespace().map(str::to_string).collect::<Vec<_>>())
    }

    #[test]
    fn values_are_checked_not_ignored() {
        let default = Options {
            arch: Arch::Aarch64,
            machine: None,
            sizes: None,
            guests: vec![1],
            clock: Clock::Icount,
            updates: 4,
        };
        assert_eq!(parse_line(""), Ok(default));
        assert_eq!(
            parse_line("--arch x86_64 --sizes 16,64 --updates 2 --guests 1,4,8 --clock tcg"),
            Ok(Options {
                arch: Arch::X86_64,
                machine: None,
                sizes: Some(vec![16, 64]),
                guests: vec![1, 4, 8],
                clock: Clock::Tcg,
                updates: 2
            })
        );
        assert!(parse_line("--guests 9").is_err_and(|e| e.starts_with("--guests '9'")));
        assert_eq!(parse_line("--arch x86_64 --machine qemu").map(|o| o.machine), Ok(Some(Machine::Qemu)));
        assert!(parse_line("--machine bochs").is_err_and(|e| e.starts_with("--machine bochs")));
        assert!(parse_line("--machine vbox").is_err_and(|e| e.starts_with("--machine 'vbox'")));
        assert!(parse_line("--clock fast").is_err_and(|e| e.starts_with("--clock 'fast'")));
        assert!(parse_line("--sizes 64,lots").is_err_and(|e| e.starts_with("--sizes '64,lots'")));
        assert!(parse_line("--updates ten").is_err_and(|e| e.starts_with("--updates 'ten'")));
        assert!(parse_line("--updates 0").is_err());
        assert!(parse_line("--arch arm").is_err());
        assert!(parse_line("--updates").is_err_and(|e| e == "--updates needs a value"));
        assert!(parse_line("--colour red").is_err_and(|e| e == "unknown option '--colour'"));
    }
}
