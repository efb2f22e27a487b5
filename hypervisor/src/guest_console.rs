//! Per-partition console: bytes a guest writes are collected into lines and
//! printed whole, prefixed `guest<id>: ` (the serial event protocol). A
//! line not yet ended when a live update begins crosses it in the
//! partition's `console` record ([`LineBuffer::pending`],
//! [`LineBuffer::with_pending`]).

use core::fmt;

/// Longest line kept; longer lines are printed in pieces.
pub const LINE_MAX: usize = 256;

#[derive(Debug)]
pub struct LineBuffer {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl Default for LineBuffer {
    fn default() -> Self {
        Self { buf: [0; LINE_MAX], len: 0 }
    }
}

/// Why bytes from a handover cannot be a partition's pending line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PendingLineError {
    /// More bytes than a line holds.
    TooLong { len: usize },
    /// A byte [`LineBuffer::push`] never keeps (a newline or another
    /// control byte): printed later, it could forge a line.
    Byte { at: usize, byte: u8 },
}

impl fmt::Display for PendingLineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLong { len } => write!(f, "pending line of {len} bytes, at most {LINE_MAX}"),
            Self::Byte { at, byte } => write!(f, "pending line byte {at} is {byte:#04x}"),
        }
    }
}

/// Whether a line keeps `b`: tab, printable ASCII and UTF-8 bytes.
fn kept(b: u8) -> bool {
    b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80
}

impl LineBuffer {
    /// A buffer holding `bytes` as its unfinished line, as
    /// [`Self::pending`] gave them in the previous image: checked to be
    /// what `push` could have kept.
    pub fn with_pending(bytes: &[u8]) -> Result<Self, PendingLineError> {
        if bytes.len() > LINE_MAX {
            return Err(PendingLineError::TooLong { len: bytes.len() });
        }
        if let Some((at, &byte)) = bytes.iter().enumerate().find(|(_, &b)| !kept(b)) {
            return Err(PendingLineError::Byte { at, byte });
        }
        let mut lb = Self::default();
        lb.buf[..bytes.len()].copy_from_slice(bytes);
        lb.len = bytes.len();
        Ok(lb)
    }

    /// The bytes of the line not yet ended.
    pub fn pending(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Appends bytes; calls `emit` with every completed line (without the
    /// newline). Carriage returns and other control bytes are dropped so a
    /// guest cannot forge other lines or escape sequences.
    pub fn push(&mut self, bytes: &[u8], emit: &mut dyn FnMut(&str)) {
        for &b in bytes {
            if b == b'\n' {
                self.flush(emit);
            } else if kept(b) {
                if self.len == LINE_MAX {
                    self.flush(emit);
                }
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    /// Emits the line. Bytes that are not UTF-8 each become U+FFFD, as
    /// `String::from_utf8_lossy` does: the rest of the line is kept.
    fn flush(&mut self, emit: &mut dyn FnMut(&str)) {
        emit(&alloc::string::String::from_utf8_lossy(&self.buf[..self.len]));
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::string::{String, ToString};
    use std::vec::Vec;

    use super::*;

    fn lines(chunks: &[&[u8]]) -> Vec<String> {
        let mut lb = LineBuffer::default();
        let mut out = Vec::new();
        for c in chunks {
            lb.push(c, &mut |l| out.push(l.to_string()));
        }
        out
    }

    #[test]
    fn joins_partial_writes() {
        assert_eq!(lines(&[b"alive ", b"ticks=1\nmem", b"check ok=1\n"]), ["alive ticks=1", "memcheck ok=1"]);
    }

    #[test]
    fn bytes_that_are_not_utf8_do_not_cost_the_rest_of_the_line() {
        // A hostile guest's random bytes, then a line of its own: the
        // invalid bytes become U+FFFD and everything after them is kept.
        assert_eq!(lines(&[b"@\xff\xfe", b"hostile done=1\n"]), ["@\u{fffd}\u{fffd}hostile done=1"]);
        assert_eq!(lines(&[b"caf\xc3\xa9 \xc3\n"]), ["caf\u{e9} \u{fffd}"]);
    }

    #[test]
    fn strips_control_bytes_and_splits_long_lines() {
        assert_eq!(lines(&[b"a\rb\x1b[2Jc\n"]), ["ab[2Jc"]);
        let long = [b'x'; LINE_MAX + 10];
        let out = lines(&[&long, b"\n"]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].len(), LINE_MAX);
        assert_eq!(out[1].len(), 10);
    }

    #[test]
    fn a_pending_line_is_taken_up_where_it_stopped() {
        let mut lb = LineBuffer::default();
        let mut out = Vec::new();
        lb.push(b"done\nhalf a \tli", &mut |l| out.push(l.to_string()));
        assert_eq!(lb.pending(), b"half a \tli");
        let mut next = LineBuffer::with_pending(lb.pending()).unwrap();
        next.push(b"ne\n", &mut |l| out.push(l.to_string()));
        assert_eq!(out, ["done", "half a \tline"]);
        assert!(next.pending().is_empty());
        let full = [b'y'; LINE_MAX];
        assert_eq!(LineBuffer::with_pending(&full).unwrap().pending(), full);
    }

    #[test]
    fn a_pending_line_is_checked() {
        let long = [b'x'; LINE_MAX + 1];
        assert_eq!(LineBuffer::with_pending(&long).unwrap_err(), PendingLineError::TooLong { len: LINE_MAX + 1 });
        assert_eq!(LineBuffer::with_pending(b"ok\nforged").unwrap_err(), PendingLineError::Byte { at: 2, byte: b'\n' });
        assert_eq!(LineBuffer::with_pending(b"\x1b[2J").unwrap_err(), PendingLineError::Byte { at: 0, byte: 0x1b });
        assert_eq!(
            std::format!("{}", PendingLineError::TooLong { len: 300 }),
            "pending line of 300 bytes, at most 256"
        );
    }
}
