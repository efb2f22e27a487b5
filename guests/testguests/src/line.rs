//! Event lines in a fixed buffer (`shared/DESIGN.md` §7): exactly
//! `<event> key=value ...\n`, values without spaces. Guests have no
//! allocator, so a line is formatted on the stack.

use core::fmt::{self, Display, Write};

/// The hypervisor console buffers at most 256 bytes per line
/// (HYPERCALLS.md); the last byte is always the newline.
pub const LINE_CAPACITY: usize = 256;

/// One console line under construction. Text past the capacity is dropped;
/// the line always ends with `\n`.
#[derive(Clone, Debug)]
pub struct Line {
    buf: [u8; LINE_CAPACITY],
    /// Bytes before the newline.
    len: usize,
    truncated: bool,
}

impl Line {
    /// Starts a line with its event name.
    pub fn event(name: &str) -> Self {
        let mut line = Self { buf: [0; LINE_CAPACITY], len: 0, truncated: false };
        line.buf[0] = b'\n';
        line.push_token(format_args!("{name}"));
        line
    }

    /// Appends ` key=value`. Whitespace and control characters in either
    /// become `_`, so a value never splits the line.
    pub fn field(&mut self, key: &str, value: impl Display) -> &mut Self {
        self.push_byte(b' ');
        self.push_token(format_args!("{key}="));
        self.push_token(format_args!("{value}"));
        self
    }

    /// Appends ` key=0x<hex>`.
    pub fn hex(&mut self, key: &str, value: u64) -> &mut Self {
        self.field(key, format_args!("{value:#x}"))
    }

    /// Appends ` key=1` or ` key=0`.
    pub fn flag(&mut self, key: &str, value: bool) -> &mut Self {
        self.field(key, u8::from(value))
    }

    /// The line including its trailing newline.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..=self.len]
    }

    /// The line without its newline (tests and diagnostics).
    pub fn text(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }

    /// Whether text was dropped for lack of room.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    fn push_token(&mut self, args: fmt::Arguments<'_>) {
        // Token never fails: it truncates instead.
        let _ = Token(self).write_fmt(args);
    }

    /// Appends one byte, keeping room for the newline.
    fn push_byte(&mut self, byte: u8) {
        if self.len + 1 < LINE_CAPACITY {
            self.buf[self.len] = byte;
            self.len += 1;
            self.buf[self.len] = b'\n';
        } else {
            self.truncated = true;
        }
    }
}

/// Writes into a line, replacing characters that would break the
/// `key=value` syntax. Multi-byte characters are kept only whole.
struct Token<'a>(&'a mut Line);

impl Write for Token<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            if c.is_whitespace() || c.is_control() {
                self.0.push_byte(b'_');
            } else {
                let mut utf8 = [0; 4];
                let encoded = c.encode_utf8(&mut utf8).as_bytes();
                if self.0.len + encoded.len() < LINE_CAPACITY {
                    for &b in encoded {
                        self.0.push_byte(b);
                    }
                } else {
                    self.0.truncated = true;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::String;

    #[test]
    fn formats_event_fields() {
        let mut line = Line::event("heartbeat");
        line.flag("done", true).field("ticks", 100_u64).hex("addr", 0x4000_0000).field("name", "a b\tc");
        assert_eq!(line.text(), "heartbeat done=1 ticks=100 addr=0x40000000 name=a_b_c");
        assert_eq!(line.as_bytes().last(), Some(&b'\n'));
        assert_eq!(line.as_bytes().len(), line.text().len() + 1);
        assert!(!line.truncated());
    }

    #[test]
    fn empty_event_is_just_a_newline() {
        assert_eq!(Line::event("").as_bytes(), b"\n");
    }

    #[test]
    fn truncates_at_capacity_and_keeps_the_newline() {
        let long: String = "x".repeat(400);
        let mut line = Line::event("e");
        line.field("k", &long);
        assert!(line.truncated());
        assert_eq!(line.as_bytes().len(), LINE_CAPACITY);
        assert_eq!(line.as_bytes()[LINE_CAPACITY - 1], b'\n');
        assert!(line.text().starts_with("e k=xxx"));
    }

    #[test]
    fn never_splits_a_multibyte_character() {
        let mut line = Line::event("e");
        line.field("k", "é".repeat(200));
        assert!(line.truncated());
        assert!(core::str::from_utf8(line.as_bytes()).is_ok());
        assert!(line.as_bytes().len() <= LINE_CAPACITY);
    }

    #[test]
    fn newline_in_a_value_is_replaced() {
        let mut line = Line::event("e");
        line.field("k", "a\nb");
        assert_eq!(line.text(), "e k=a_b");
    }
}
