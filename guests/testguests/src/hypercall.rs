//! Hypercall requests and results (`hypervisor/HYPERCALLS.md`; encoding in
//! `hvcall`).

use hvcall::{call, Control, Status, MAX_REP};

/// Result word layout (HYPERCALLS.md "Result"; TLFS v6.0b §3.8).
const STATUS_MASK: u64 = 0xffff;
const REPS_SHIFT: u32 = 32;

/// One hypercall: the control word and the input/output operands (GPAs,
/// or values for fast calls).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub control: u64,
    pub input: u64,
    pub output: u64,
}

impl Request {
    /// A fast call with an input value.
    pub const fn fast(code: u16, input: u64) -> Self {
        Self { control: Control::new(code).fast().encode(), input, output: 0 }
    }

    /// `CONSOLE_WRITE` of `len` bytes at `gpa` (a rep call, one rep per
    /// byte; `len` is capped at the 12-bit rep count).
    pub fn console_write(gpa: u64, len: usize) -> Self {
        let reps = u16::try_from(len).map_or(MAX_REP, |n| n.min(MAX_REP));
        let control = Control { rep_count: reps, ..Control::new(call::CONSOLE_WRITE) };
        Self { control: control.encode(), input: gpa, output: 0 }
    }

    /// A memory call (not fast, no reps) with GPA operands.
    pub const fn memory(code: u16, input: u64, output: u64) -> Self {
        Self { control: Control::new(code).encode(), input, output }
    }

    /// `SHUTDOWN_SELF`.
    pub const fn shutdown_self() -> Self {
        Self::fast(call::SHUTDOWN_SELF, 0)
    }
}

/// What a hypercall returned: the result word and, for fast calls, the
/// output value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub result: u64,
    pub output: u64,
}

impl Outcome {
    /// The raw status code (bits 15:0).
    pub const fn status_code(&self) -> u16 {
        (self.result & STATUS_MASK) as u16
    }

    /// The status, if it is one the ABI defines.
    pub fn status(&self) -> Option<Status> {
        Status::from_raw(self.status_code())
    }

    /// Reps completed (bits 43:32).
    pub const fn reps(&self) -> u16 {
        ((self.result >> REPS_SHIFT) as u16) & MAX_REP
    }

    /// Builds a result word, as the hypervisor does.
    pub const fn from_status(status: u16, reps: u16, output: u64) -> Self {
        Self { result: status as u64 | (((reps & MAX_REP) as u64) << REPS_SHIFT), output }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_write_is_a_rep_call_with_the_length() {
        let r = Request::console_write(0x4000_1000, 12);
        let c = Control::decode(r.control).unwrap();
        assert_eq!((c.code, c.fast, c.rep_count, c.rep_start), (call::CONSOLE_WRITE, false, 12, 0));
        assert_eq!(r.input, 0x4000_1000);
        let long = Control::decode(Request::console_write(0, 1 << 20).control).unwrap();
        assert_eq!(long.rep_count, MAX_REP);
    }

    #[test]
    fn result_word_fields() {
        let o = Outcome { result: 0x0000_0123_0000_0005 | (0xabcd << 16), output: 9 };
        assert_eq!(o.status_code(), 5);
        assert_eq!(o.status(), Some(Status::InvalidParameter));
        assert_eq!(o.reps(), 0x123);
        assert_eq!(Outcome::from_status(3, 7, 0).result, 3 | (7 << 32));
        assert_eq!(Outcome::from_status(1, 0, 0).status(), None);
    }

    #[test]
    fn shutdown_is_fast() {
        let c = Control::decode(Request::shutdown_self().control).unwrap();
        assert_eq!((c.code, c.fast), (call::SHUTDOWN_SELF, true));
    }
}
