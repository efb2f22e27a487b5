//! Rollback (`kho/ABI.md` §5.2): a new image that fails before the guests
//! resume gives the machine back to the old one, which was left intact in
//! its slot and takes the machine back from the same preserved state.
//!
//! The old image passes its rollback entry with the jump (x4 on aarch64,
//! tagged by "HVLUROLB" in x5). The new image arms [`GIVE_BACK`] with it
//! as it starts and commits once the machine is adopted, right before it
//! lets the parked CPUs go (from then on there is no way back: those CPUs
//! run its code). Until then a failed restore, a panic or an exception of
//! its own sends the boot CPU back through the entry with a [`Reason`].

use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Why a new image gave the machine back (the code it passes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The restore returned an error (the machine could not be adopted).
    RestoreFailed,
    /// The new image panicked.
    Panic,
    /// The new image took an exception of its own.
    Exception,
    /// The new image cannot read the handover (its header, version or
    /// checks).
    HandoverRefused,
    /// The new image did not commit by the old image's deadline.
    Deadline,
}

impl Reason {
    const ALL: [Reason; 5] =
        [Reason::RestoreFailed, Reason::Panic, Reason::Exception, Reason::HandoverRefused, Reason::Deadline];

    /// The code passed to the old image.
    pub fn code(self) -> u64 {
        match self {
            Reason::RestoreFailed => 1,
            Reason::Panic => 2,
            Reason::Exception => 3,
            Reason::HandoverRefused => 4,
            Reason::Deadline => 5,
        }
    }

    /// The reason for `code`; `None` for a code this image does not know
    /// (a newer image's), reported as such.
    pub fn from_code(code: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    pub fn name(self) -> &'static str {
        match self {
            Reason::RestoreFailed => "restore-failed",
            Reason::Panic => "panic",
            Reason::Exception => "exception",
            Reason::HandoverRefused => "handover-refused",
            Reason::Deadline => "deadline",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The old image, taking the machine back (`kho/ABI.md` §5.2): reports
/// it (`hv: update-rolled-back`, with the time since the jump at
/// `left_at`) and undoes the freeze as a cancel does
/// ([`super::undo_freeze`]). The caller lets its parked CPUs rejoin and
/// ends the update.
pub fn take_back<P: super::UpdatePlatform>(
    p: &P,
    code: u64,
    generation: super::handshake::Generation,
    handover: loader::PhysRange,
    left_at: u64,
    (now, hz): (u64, u64),
) {
    crate::hv_event!(
        "update-rolled-back",
        reason = Reason::from_code(code).map_or("unknown", Reason::name),
        code = code,
        away_us = super::blackout_us(left_at, now, hz),
    );
    super::undo_freeze(p, generation, handover);
}

/// `detail` on one line (newlines become spaces, double quotes single
/// ones): a panic message printed before `hv: restore-failed`.
#[derive(Clone, Copy)]
pub struct OneLine<'a>(pub &'a dyn fmt::Display);

impl fmt::Debug for OneLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OneLine(\"{self}\")")
    }
}

impl fmt::Display for OneLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Filter<'f, 'g>(&'f mut fmt::Formatter<'g>);
        impl fmt::Write for Filter<'_, '_> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                for c in s.chars() {
                    let c = match c {
                        '\n' | '\r' => ' ',
                        '"' => '\'',
                        c => c,
                    };
                    fmt::Write::write_char(self.0, c)?;
                }
                Ok(())
            }
        }
        fmt::write(&mut Filter(f), format_args!("{}", self.0))
    }
}

/// The incoming image's way back.
#[derive(Debug)]
pub struct GiveBack {
    entry: AtomicU64,
    committed: AtomicBool,
}

/// This image's way back, if a live update started it.
pub static GIVE_BACK: GiveBack = GiveBack::new();

impl Default for GiveBack {
    fn default() -> Self {
        Self::new()
    }
}

impl GiveBack {
    pub const fn new() -> Self {
        Self { entry: AtomicU64::new(0), committed: AtomicBool::new(false) }
    }

    /// The old image takes the machine back at `entry` (checked by the
    /// caller to lie in the old image's slot).
    pub fn arm(&self, entry: u64) {
        self.entry.store(entry, Ordering::Release);
    }

    /// The machine is this image's: no way back from here on.
    pub fn commit(&self) {
        self.committed.store(true, Ordering::Release);
    }

    /// A way back exists: armed and not committed.
    pub fn armed(&self) -> bool {
        !self.committed() && self.entry.load(Ordering::Acquire) != 0
    }

    pub fn committed(&self) -> bool {
        self.committed.load(Ordering::Acquire)
    }

    /// [`Self::take`], and if there is a way back, says why the machine
    /// goes back (`restore failed: <detail>`, `hv: restore-failed
    /// reason=<reason> give_back=1`) and flushes the console first.
    pub fn take_announced(&self, reason: Reason, detail: &dyn fmt::Display) -> Option<u64> {
        let entry = self.take()?;
        crate::console::write_line_forced(format_args!("restore failed: {}", OneLine(detail)));
        crate::console::write_line_forced(format_args!("hv: restore-failed reason={reason} give_back=1"));
        crate::console::flush();
        Some(entry)
    }

    /// The entry to give the machine back through, if armed and not
    /// committed. Taken once: a failure while giving back does not try
    /// again.
    pub fn take(&self) -> Option<u64> {
        if self.committed() {
            return None;
        }
        Some(self.entry.swap(0, Ordering::AcqRel)).filter(|&e| e != 0)
    }
}

/// How a test build misbehaves on purpose: fails its restore (the
/// rollback tests) or stretches the update (the fault tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Break {
    /// As an image that cannot read the handover's version.
    RefuseHandover,
    Panic,
    /// An EL2 data abort.
    Fault,
    /// An error after adopting the machine.
    Fail,
    /// A loop that never ends, after adopting the machine.
    Hang,
    /// Not a failure: [`SLOW_MS`] more of brownout when this image stages
    /// the next one (after `hv: update-begin`, guests on the other CPUs
    /// running), and of blackout when it restores (before it adopts the
    /// SMMU, DMA in flight landing meanwhile): windows wide enough for a
    /// test to put a guest fault and an SMMU event in them.
    Slow,
    /// Not a failure of the restore: the brownout preparation panics
    /// (`prepare-panic`, aarch64): the old image must go on and enter this
    /// image unprepared.
    PreparePanic,
    /// Not a failure of the restore (aarch64, first boot from UEFI): the
    /// EFI entry's first `ExitBootServices` is given a stale map key, so
    /// the firmware refuses it and the entry must read the map again and
    /// retry (`stale-map-key`).
    StaleMapKey,
}

/// How much longer [`Break::Slow`] makes the brownout and the blackout.
pub const SLOW_MS: u64 = 400;

/// Spins for `ms` of `counter` (a free-running count and its frequency in
/// Hz), `relax` once per turn: [`Break::Slow`]'s delay.
pub fn spin_ms(ms: u64, counter: impl Fn() -> (u64, u64), relax: impl Fn()) {
    let (t0, hz) = counter();
    while hz != 0 && super::blackout_us(t0, counter().0, hz) < ms.saturating_mul(1000) {
        relax();
    }
}

/// Test builds only (`HV_TEST_BREAK_RESTORE=1`): the marker the test
/// launcher patches to pick the failure (`tests/src/image.rs`,
/// `with_break_mode`; the image is resealed), so one build per slot
/// serves every mode: `HVLU-BREAK:` and the mode's name, NUL-padded.
#[used]
static BREAK_MARKER: [u8; 32] = *b"HVLU-BREAK:none\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

pub fn break_mode() -> Option<Break> {
    option_env!("HV_TEST_BREAK_RESTORE")?;
    // SAFETY: reads this image's own static; volatile, because the test
    // launcher patches the bytes in the image after the build.
    let marker = unsafe { core::ptr::read_volatile(&raw const BREAK_MARKER) };
    let mode = marker.strip_prefix(b"HVLU-BREAK:")?;
    let end = mode.iter().position(|&b| b == 0).unwrap_or(mode.len());
    match &mode[..end] {
        b"refuse-handover" => Some(Break::RefuseHandover),
        b"panic" => Some(Break::Panic),
        b"fault" => Some(Break::Fault),
        b"fail" => Some(Break::Fail),
        b"hang" => Some(Break::Hang),
        b"slow" => Some(Break::Slow),
        b"prepare-panic" => Some(Break::PreparePanic),
        b"stale-map-key" => Some(Break::StaleMapKey),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_codes_are_none() {
        for r in Reason::ALL {
            assert_eq!(Reason::from_code(r.code()), Some(r));
        }
        assert_eq!(Reason::from_code(0), None);
        assert_eq!(Reason::from_code(99), None);
        assert_eq!(alloc::format!("{}", Reason::HandoverRefused), "handover-refused");
    }

    #[test]
    fn details_are_one_line_without_double_quotes() {
        let text = "panicked at x.rs:1:2:\nsaid \"no\"";
        assert_eq!(alloc::format!("{}", OneLine(&text)), "panicked at x.rs:1:2: said 'no'");
    }

    #[test]
    fn the_way_back_is_taken_once_and_closes_on_commit() {
        let g = GiveBack::new();
        assert_eq!(g.take(), None, "not armed");
        g.arm(0x4100_0000);
        assert_eq!(g.take(), Some(0x4100_0000));
        assert_eq!(g.take(), None, "taken once");
        let g = GiveBack::new();
        g.arm(0x4100_0000);
        g.commit();
        assert_eq!(g.take(), None, "committed: no way back");
    }
}
