//! Per-partition console: bytes a guest writes are collected into lines and
//! printed whole, prefixed `guest<id>: ` (the serial event protocol).

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

impl LineBuffer {
    /// Appends bytes; calls `emit` with every completed line (without the
    /// newline). Carriage returns and other control bytes are dropped so a
    /// guest cannot forge other lines or escape sequences.
    pub fn push(&mut self, bytes: &[u8], emit: &mut dyn FnMut(&str)) {
        for &b in bytes {
            if b == b'\n' {
                self.flush(emit);
            } else if b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80 {
                if self.len == LINE_MAX {
                    self.flush(emit);
                }
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn flush(&mut self, emit: &mut dyn FnMut(&str)) {
        let text = match core::str::from_utf8(&self.buf[..self.len]) {
            Ok(s) => s,
            Err(e) => core::str::from_utf8(&self.buf[..e.valid_up_to()]).unwrap_or(""),
        };
        emit(text);
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
    fn strips_control_bytes_and_splits_long_lines() {
        assert_eq!(lines(&[b"a\rb\x1b[2Jc\n"]), ["ab[2Jc"]);
        let long = [b'x'; LINE_MAX + 10];
        let out = lines(&[&long, b"\n"]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].len(), LINE_MAX);
        assert_eq!(out[1].len(), 10);
    }
}
