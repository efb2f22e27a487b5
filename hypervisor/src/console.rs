//! The hypervisor console: one serial port shared by all CPUs.
//!
//! Output is line-atomic: a whole line is written under the lock, so event
//! lines from two CPUs never interleave (tests parse them).

use core::fmt::{self, Write};

use spin::Mutex;

/// A byte sink: a UART driver.
pub trait Uart: Send {
    fn write_bytes(&mut self, bytes: &[u8]);
}

struct Console {
    uart: Option<&'static mut dyn Uart>,
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if let Some(uart) = self.uart.as_mut() {
            // Serial terminals expect CRLF.
            for (i, line) in s.split('\n').enumerate() {
                if i > 0 {
                    uart.write_bytes(b"\r\n");
                }
                uart.write_bytes(line.as_bytes());
            }
        }
        Ok(())
    }
}

static CONSOLE: Mutex<Console> = Mutex::new(Console { uart: None });

/// Installs the UART all output goes to.
pub fn set_uart(uart: &'static mut dyn Uart) {
    CONSOLE.lock().uart = Some(uart);
}

/// Writes one line (the arguments plus a newline) atomically.
pub fn write_line(args: fmt::Arguments<'_>) {
    let mut console = CONSOLE.lock();
    let _ = console.write_fmt(args);
    let _ = console.write_str("\n");
}

/// Writes a line without waiting for the lock holder: for the panic path,
/// where the lock may be held by the CPU that panicked.
pub fn write_line_forced(args: fmt::Arguments<'_>) {
    // The CPU that panicked may hold the lock: try a bounded number of
    // times, and drop the message rather than deadlock.
    for _ in 0..1_000_000 {
        if let Some(mut console) = CONSOLE.try_lock() {
            let _ = console.write_fmt(args);
            let _ = console.write_str("\n");
            return;
        }
        core::hint::spin_loop();
    }
}

/// Prints a human-readable line.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::console::write_line(format_args!($($arg)*)) };
}
