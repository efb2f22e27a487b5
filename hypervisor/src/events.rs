//! Machine-readable serial events (`shared/DESIGN.md` §7):
//! `hv: <event> key=value ...`, values without spaces.

use core::fmt::{self, Display};

/// An event value that is guaranteed to contain no whitespace: spaces in
/// the inner value are replaced by `_` when printed.
#[derive(Debug)]
pub struct Token<T>(pub T);

impl<T: Display> Display for Token<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct NoSpace<'a, 'b>(&'a mut fmt::Formatter<'b>);
        impl fmt::Write for NoSpace<'_, '_> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                for c in s.chars() {
                    self.0.write_char(if c.is_whitespace() { '_' } else { c })?;
                }
                Ok(())
            }
        }
        fmt::write(&mut NoSpace(f), format_args!("{}", self.0))
    }
}

/// Prints `hv: <name> k1=v1 k2=v2 ...` as one line. Values go through
/// [`Token`], so they never contain spaces.
#[macro_export]
macro_rules! hv_event {
    ($name:literal $(, $key:ident = $val:expr)* $(,)?) => {
        $crate::console::write_line(format_args!(
            concat!("hv: ", $name $(, " ", stringify!($key), "={}")*)
            $(, $crate::events::Token(&$val))*
        ))
    };
}

/// Formats the same line into any writer (used by host tests).
#[macro_export]
macro_rules! hv_event_to {
    ($w:expr, $name:literal $(, $key:ident = $val:expr)* $(,)?) => {
        writeln!($w, concat!("hv: ", $name $(, " ", stringify!($key), "={}")*)
            $(, $crate::events::Token(&$val))*)
    };
}

#[cfg(test)]
mod tests {
    extern crate std;
    use core::fmt::Write;
    use std::string::String;

    #[test]
    fn event_line_format() {
        let mut s = String::new();
        hv_event_to!(s, "boot", arch = "aarch64", cpus = 2, mem_mib = 512u64).unwrap();
        assert_eq!(s, "hv: boot arch=aarch64 cpus=2 mem_mib=512\n");
    }

    #[test]
    fn values_never_contain_spaces() {
        let mut s = String::new();
        hv_event_to!(s, "fault", kind = "bad thing\there", addr = format_args!("{:#x}", 0x1000)).unwrap();
        assert_eq!(s, "hv: fault kind=bad_thing_here addr=0x1000\n");
    }
}
