//! The hypervisor console: one serial port shared by all CPUs.
//!
//! Output is line-atomic: a whole line is written under the lock, so event
//! lines from two CPUs never interleave (tests parse them).

use core::fmt::{self, Write};

use spin::Mutex;

/// A byte sink: a UART driver.
pub trait Uart: Send {
    fn write_bytes(&mut self, bytes: &[u8]);

    /// Waits until every written byte has left the transmitter.
    fn flush(&mut self) {}
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

/// Runs `f` on the console, trying the lock a bounded number of times: for
/// the panic and power-off paths, where the CPU that failed may hold it.
/// Gives up (and drops the output) rather than deadlock.
fn with_console_bounded(f: impl FnOnce(&mut Console)) {
    for _ in 0..1_000_000 {
        if let Some(mut console) = CONSOLE.try_lock() {
            f(&mut console);
            return;
        }
        core::hint::spin_loop();
    }
}

/// Writes a line without waiting indefinitely for the lock.
pub fn write_line_forced(args: fmt::Arguments<'_>) {
    with_console_bounded(|console| {
        let _ = console.write_fmt(args);
        let _ = console.write_str("\n");
    });
}

/// Waits for the UART to drain: call before powering off, or an emulator
/// may drop the last bytes.
pub fn flush() {
    with_console_bounded(|console| {
        if let Some(uart) = console.uart.as_mut() {
            uart.flush();
        }
    });
}

/// Prints a human-readable line.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::console::write_line(format_args!($($arg)*)) };
}
