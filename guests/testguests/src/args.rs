//! Guest arguments from the DTB `/chosen` `bootargs`: space-separated
//! `key=value` words. Unknown words are ignored (a command line may carry
//! options for other programs); a known key with a bad value is an error,
//! so a mistyped test setting fails loudly instead of running defaults.

use core::fmt;

/// The settings the test guests understand. `None` means "use the
/// workload's default".
// Flags of unrelated workloads, each its own `key=0|1`.
#[allow(clippy::struct_excessive_bools)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Args {
    /// heartbeat: timer ticks to run for.
    pub ticks: Option<u64>,
    /// memcheck: write/verify passes.
    pub passes: Option<u64>,
    /// blackout: seconds to measure for.
    pub seconds: Option<u64>,
    /// exerciser: the guest was started privileged (`privileged=1`).
    pub privileged: bool,
    /// isolation: the IPA to probe.
    pub addr: Option<u64>,
    /// blackout: report every gap at least this long (microseconds).
    pub gap_report_us: Option<u64>,
    /// dma: guest-physical address of the assigned device's BAR (the
    /// hypervisor appends `dev0=`).
    pub dev0: Option<u64>,
    /// dma: transfers to make.
    pub transfers: Option<u64>,
    /// dma: DMA into this address instead (an isolation probe).
    pub dma_addr: Option<u64>,
    /// updater: live updates to request. smp (x86_64): spread the second
    /// vCPU's start, run and restart over live updates (`sipi`).
    pub updates: Option<u64>,
    /// updater: milliseconds to wait before each update.
    pub delay_ms: Option<u64>,
    /// updater: the status each update must return (default 0).
    pub expect_status: Option<u64>,
    /// updater: arm the freeze-failure test hook first and expect the first
    /// update to be cancelled.
    pub fail_freeze: bool,
    /// debugpriv: arm the breakpoints (`arm=1`) rather than probe them.
    pub arm: bool,
    /// heartbeat: instead of ticking, write one long console line in
    /// pieces across this many live updates (`longline`).
    pub line_updates: Option<u64>,
    /// heartbeat: wait for each tick as an operating system's idle loop
    /// does: interrupts masked while it checks for work (long enough for
    /// the tick to come meanwhile), then WFI/HLT (`masked_wfi=1`).
    pub masked_wfi: bool,
    /// updater: the bundle's odd-numbered images are broken builds whose
    /// updates must be rolled back (`rollbacks=1`).
    pub rollbacks: bool,
    /// hostile: the random generator's seed.
    pub seed: Option<u64>,
    /// hostile: attacks to make.
    pub ops: Option<u64>,
    /// isolation: wait until a live update is being staged, then make an
    /// access the hypervisor does not emulate (`at_staging=1`).
    pub at_staging: bool,
}

/// Why the bootargs were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgError {
    /// Not a decimal or `0x` hexadecimal u64.
    InvalidNumber { key: &'static str },
    /// Not `0` or `1`.
    InvalidFlag { key: &'static str },
}

impl ArgError {
    /// The key whose value was refused.
    pub fn key(&self) -> &'static str {
        match self {
            Self::InvalidNumber { key } | Self::InvalidFlag { key } => key,
        }
    }
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InvalidNumber { .. } => "invalid-number",
            Self::InvalidFlag { .. } => "invalid-flag",
        })
    }
}

impl Args {
    /// Parses a command line; later words override earlier ones.
    pub fn parse(bootargs: &str) -> Result<Self, ArgError> {
        let mut args = Self::default();
        for word in bootargs.split_ascii_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            match key {
                "ticks" => args.ticks = Some(number("ticks", value)?),
                "passes" => args.passes = Some(number("passes", value)?),
                "seconds" => args.seconds = Some(number("seconds", value)?),
                "addr" => args.addr = Some(number("addr", value)?),
                "updates" => args.updates = Some(number("updates", value)?),
                "dev0" => args.dev0 = Some(number("dev0", value)?),
                "transfers" => args.transfers = Some(number("transfers", value)?),
                "dma_addr" => args.dma_addr = Some(number("dma_addr", value)?),
                "gap_report_us" => args.gap_report_us = Some(number("gap_report_us", value)?),
                "delay_ms" => args.delay_ms = Some(number("delay_ms", value)?),
                "expect_status" => args.expect_status = Some(number("expect_status", value)?),
                "line_updates" => args.line_updates = Some(number("line_updates", value)?),
                "seed" => args.seed = Some(number("seed", value)?),
                "ops" => args.ops = Some(number("ops", value)?),
                "arm" => {
                    args.arm = match value {
                        "1" => true,
                        "0" => false,
                        _ => return Err(ArgError::InvalidFlag { key: "arm" }),
                    }
                }
                "at_staging" => args.at_staging = flag("at_staging", value)?,
                "masked_wfi" => {
                    args.masked_wfi = match value {
                        "1" => true,
                        "0" => false,
                        _ => return Err(ArgError::InvalidFlag { key: "masked_wfi" }),
                    }
                }
                "rollbacks" => {
                    args.rollbacks = match value {
                        "1" => true,
                        "0" => false,
                        _ => return Err(ArgError::InvalidFlag { key: "rollbacks" }),
                    }
                }
                "fail_freeze" => {
                    args.fail_freeze = match value {
                        "1" => true,
                        "0" => false,
                        _ => return Err(ArgError::InvalidFlag { key: "fail_freeze" }),
                    }
                }
                "privileged" => {
                    args.privileged = match value {
                        "1" => true,
                        "0" => false,
                        _ => return Err(ArgError::InvalidFlag { key: "privileged" }),
                    }
                }
                _ => {}
            }
        }
        Ok(args)
    }
}

fn flag(key: &'static str, value: &str) -> Result<bool, ArgError> {
    match value {
        "1" => Ok(true),
        "0" => Ok(false),
        _ => Err(ArgError::InvalidFlag { key }),
    }
}

fn number(key: &'static str, value: &str) -> Result<u64, ArgError> {
    parse_u64(value).ok_or(ArgError::InvalidNumber { key })
}

/// Decimal, or hexadecimal with a `0x` prefix; `_` separators allowed.
pub fn parse_u64(text: &str) -> Option<u64> {
    let (digits, radix) = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    let mut value: u64 = 0;
    let mut any = false;
    for c in digits.chars() {
        if c == '_' {
            continue;
        }
        let d = c.to_digit(radix)?;
        value = value.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
        any = true;
    }
    any.then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_keys_and_ignores_the_rest() {
        let a = Args::parse("console=hvc0 ticks=40  passes=3 seconds=2 quiet privileged=1 addr=0x8000_0000").unwrap();
        assert_eq!(
            a,
            Args {
                ticks: Some(40),
                passes: Some(3),
                seconds: Some(2),
                privileged: true,
                addr: Some(0x8000_0000),
                ..Args::default()
            }
        );
        assert_eq!(Args::parse("").unwrap(), Args::default());
        assert_eq!(Args::parse("ticks=1 ticks=2").unwrap().ticks, Some(2));
        assert!(!Args::parse("privileged=1 privileged=0").unwrap().privileged);
    }

    #[test]
    fn refuses_bad_values_of_known_keys() {
        assert_eq!(Args::parse("ticks=ten"), Err(ArgError::InvalidNumber { key: "ticks" }));
        assert_eq!(Args::parse("passes="), Err(ArgError::InvalidNumber { key: "passes" }));
        assert_eq!(Args::parse("seconds"), Err(ArgError::InvalidNumber { key: "seconds" }));
        assert_eq!(Args::parse("addr=0x"), Err(ArgError::InvalidNumber { key: "addr" }));
        assert_eq!(Args::parse("line_updates=x"), Err(ArgError::InvalidNumber { key: "line_updates" }));
        assert_eq!(Args::parse("line_updates=10").unwrap().line_updates, Some(10));
        assert_eq!(Args::parse("privileged=yes"), Err(ArgError::InvalidFlag { key: "privileged" }));
        let e = Args::parse("ticks=99999999999999999999").unwrap_err();
        assert_eq!((e.key(), std::format!("{e}")), ("ticks", "invalid-number".into()));
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_u64("0"), Some(0));
        assert_eq!(parse_u64("1_000"), Some(1000));
        assert_eq!(parse_u64("0XfF"), Some(255));
        assert_eq!(parse_u64("0xffffffffffffffff"), Some(u64::MAX));
        assert_eq!(parse_u64("0x1_0000_0000_0000_0000"), None);
        assert_eq!(parse_u64("-1"), None);
        assert_eq!(parse_u64("_"), None);
        assert_eq!(parse_u64("12a"), None);
    }
}
