//! `hvsoak`: many live updates in a row with the test guests running
//! throughout, then the checks of `hv_tests::soak` (every update done,
//! memcheck clean, ticks only increasing, the old image intact, and the
//! free frames, handover size and preserved pages the same after every
//! update). Prints a `SOAK` line and `BENCH` lines; exits 1 if a check
//! failed, with the reason and the tail of the serial log.
//!
//! Usage: `hvsoak [--arch aarch64|x86_64] [--updates N]` (default
//! aarch64, 1000 updates; x86_64 under Bochs, 20).

use std::process::ExitCode;

use hv_tests::{soak, Arch};

const USAGE: &str = "usage: hvsoak [--arch aarch64|x86_64] [--updates N]";

/// Arch and updates from the command line; every value checked.
fn parse(args: &[String]) -> Result<(Arch, u32), String> {
    let (mut arch, mut updates) = (Arch::Aarch64, None);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--arch" => arch = Arch::parse(value).ok_or_else(|| format!("--arch '{value}': want aarch64 or x86_64"))?,
            "--updates" => {
                updates = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| format!("--updates '{value}': want a number of updates, at least 1"))?,
                );
            }
            other => return Err(format!("unknown option '{other}'")),
        }
    }
    let default = if arch == Arch::X86_64 { 20 } else { 1000 };
    Ok((arch, updates.unwrap_or(default)))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let (arch, updates) = match parse(&args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("hvsoak: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    eprintln!("hvsoak: {updates} updates on {}", arch.name());
    match soak::run(arch, updates) {
        Ok((r, run)) => {
            println!("{}", r.line());
            println!(
                "BENCH name=soak_blackout_median_us arch={} updates={updates} value={} unit=us",
                arch.name(),
                r.blackout_us.0
            );
            println!(
                "BENCH name=soak_blackout_max_us arch={} updates={updates} value={} unit=us",
                arch.name(),
                r.blackout_us.1
            );
            eprintln!("hvsoak: passed in {:.0}s ({})", run.elapsed.as_secs_f64(), run.log_path.display());
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("hvsoak: {why}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_line(line: &str) -> Result<(Arch, u32), String> {
        parse(&line.split_whitespace().map(str::to_string).collect::<Vec<_>>())
    }

    #[test]
    fn values_are_checked_not_ignored() {
        assert_eq!(parse_line(""), Ok((Arch::Aarch64, 1000)));
        assert_eq!(parse_line("--arch x86_64"), Ok((Arch::X86_64, 20)));
        assert_eq!(parse_line("--updates 25"), Ok((Arch::Aarch64, 25)));
        assert!(parse_line("--updates 0").is_err());
        assert!(parse_line("--arch sparc").is_err());
    }
}
