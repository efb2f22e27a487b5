//! The hypervisor console: one serial port shared by all CPUs.
//!
//! Output is line-atomic: a whole line is written under the lock, so event
//! lines from two CPUs never interleave (tests parse them).
//!
//! While a live update's blackout lasts, lines are held in memory
//! ([`hold`]); once the guests run again ([`release`]) they go out a FIFO's
//! worth at a time, whenever a CPU passes by ([`drain`], on every VM
//! exit), and later lines queue behind them. A serial port at 115200 baud
//! takes about 87 µs a byte: written at once, the nine lines a restore
//! prints would cost the guests some 60 ms, in the blackout or right
//! after it. A UART that slow ([`Uart::queued`]) always goes through the
//! queue, so that no CPU waits on it: a CPU printing a guest's line when
//! an update asks it to freeze would otherwise answer some 8 ms late.

use core::fmt::{self, Write};

use spin::Mutex;

/// A byte sink: a UART driver.
pub trait Uart: Send {
    fn write_bytes(&mut self, bytes: &[u8]);

    /// Waits until every written byte has left the transmitter.
    fn flush(&mut self) {}

    /// Writes what the transmitter takes now without waiting; how many
    /// bytes. A UART that never makes a writer wait takes them all.
    fn try_write(&mut self, bytes: &[u8]) -> usize {
        self.write_bytes(bytes);
        bytes.len()
    }

    /// Whether every line should go through the queue ([`drain`]) rather
    /// than wait for this UART.
    fn queued(&self) -> bool {
        false
    }
}

struct Console {
    uart: Option<&'static mut dyn Uart>,
    held: Held,
    /// The UART is slow: lines always queue.
    queue_always: bool,
}

/// How many bytes of held lines are kept; when more come, the complete
/// lines held go out first (late rather than lost).
const HELD_BYTES: usize = 16 << 10;

/// Lines held back during a blackout, and then queued until the UART
/// has taken them, in order: `buf[sent..len]`.
struct Held {
    on: bool,
    buf: [u8; HELD_BYTES],
    len: usize,
    /// How much of `buf` the UART has taken.
    sent: usize,
    /// Where the line being written started.
    line_start: usize,
}

impl Held {
    const fn new() -> Self {
        Self { on: false, buf: [0; HELD_BYTES], len: 0, sent: 0, line_start: 0 }
    }

    /// Whether lines go to the queue rather than straight to the UART.
    fn queueing(&self) -> bool {
        self.on || self.sent < self.len
    }

    fn empty(&mut self) {
        (self.len, self.sent, self.line_start) = (0, 0, 0);
    }
}

impl Console {
    /// Stops holding: the queue drains from now on.
    fn release(&mut self) {
        self.held.on = false;
    }

    /// Writes the whole queue out, waiting for the UART.
    fn write_queue(&mut self) {
        self.held.on = false;
        if let Some(uart) = self.uart.as_mut() {
            uart.write_bytes(&self.held.buf[self.held.sent..self.held.len]);
        }
        self.held.empty();
    }

    /// Gives the UART what it takes now of the queue (not while holding).
    fn drain(&mut self) {
        let held = &mut self.held;
        if held.on || held.sent == held.len {
            return;
        }
        if let Some(uart) = self.uart.as_mut() {
            held.sent += uart.try_write(&held.buf[held.sent..held.len]).min(held.len - held.sent);
        }
        if held.sent == held.len {
            held.empty();
        }
    }

    /// Queues `bytes`; if they do not fit, the complete lines queued go
    /// out first (waiting for the UART), and a line longer than the buffer
    /// goes out as it comes.
    fn hold_bytes(&mut self, bytes: &[u8]) {
        let Some(uart) = self.uart.as_mut() else { return };
        let held = &mut self.held;
        if held.len + bytes.len() > HELD_BYTES {
            uart.write_bytes(&held.buf[held.sent..held.line_start]);
            held.buf.copy_within(held.line_start..held.len, 0);
            held.len -= held.line_start;
            (held.sent, held.line_start) = (0, 0);
        }
        if let Some(dst) = held.buf.get_mut(held.len..held.len + bytes.len()) {
            dst.copy_from_slice(bytes);
            held.len += bytes.len();
        } else {
            uart.write_bytes(&held.buf[held.sent..held.len]);
            uart.write_bytes(bytes);
            held.empty();
        }
    }

    /// Bytes of a line: to the queue while it is in use, else to the UART.
    fn put(&mut self, bytes: &[u8]) {
        if self.held.queueing() || self.queue_always {
            self.hold_bytes(bytes);
        } else if let Some(uart) = self.uart.as_mut() {
            uart.write_bytes(bytes);
        }
    }

    fn line(&mut self, args: fmt::Arguments<'_>) {
        self.held.line_start = self.held.len;
        let _ = self.write_fmt(args);
        let _ = self.write_str("\n");
        self.held.line_start = self.held.len;
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Serial terminals expect CRLF.
        for (i, line) in s.split('\n').enumerate() {
            if i > 0 {
                self.put(b"\r\n");
            }
            self.put(line.as_bytes());
        }
        Ok(())
    }
}

static CONSOLE: Mutex<Console> = Mutex::new(Console { uart: None, held: Held::new(), queue_always: false });

/// Installs the UART all output goes to.
pub fn set_uart(uart: &'static mut dyn Uart) {
    let mut console = CONSOLE.lock();
    console.queue_always = uart.queued();
    console.uart = Some(uart);
}

/// Writes one line (the arguments plus a newline) atomically.
pub fn write_line(args: fmt::Arguments<'_>) {
    CONSOLE.lock().line(args);
}

/// Holds lines in memory from now on, until [`release`] (or a forced line,
/// or [`flush`]): for the blackout of a live update.
pub fn hold() {
    CONSOLE.lock().held.on = true;
}

/// Stops holding: the held lines, and lines written after them, go out
/// as the UART takes them ([`drain`]).
pub fn release() {
    CONSOLE.lock().release();
}

/// Gives the UART what it takes now of the queued lines, without waiting
/// (for the lock either): called by every CPU on its way back to a guest.
pub fn drain() {
    if let Some(mut console) = CONSOLE.try_lock() {
        console.drain();
    }
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

/// Writes a line without waiting indefinitely for the lock (after the
/// queued lines, which it writes out first).
pub fn write_line_forced(args: fmt::Arguments<'_>) {
    with_console_bounded(|console| {
        console.write_queue();
        console.line(args);
    });
}

/// Writes the queued lines out and waits for the UART to drain: call
/// before powering off, or an emulator may drop the last bytes.
pub fn flush() {
    with_console_bounded(|console| {
        console.write_queue();
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

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::boxed::Box;
    use std::sync::{Arc, Mutex as StdMutex};
    use std::vec::Vec;

    /// A UART whose transmitter takes 4 bytes per `try_write`.
    struct Fake(Arc<StdMutex<Vec<u8>>>);

    impl Uart for Fake {
        fn write_bytes(&mut self, bytes: &[u8]) {
            self.0.lock().unwrap().extend_from_slice(bytes);
        }

        fn try_write(&mut self, bytes: &[u8]) -> usize {
            let n = bytes.len().min(4);
            self.write_bytes(&bytes[..n]);
            n
        }
    }

    fn console() -> (Box<Console>, Arc<StdMutex<Vec<u8>>>) {
        let out = Arc::new(StdMutex::new(Vec::new()));
        let uart: &'static mut dyn Uart = Box::leak(Box::new(Fake(out.clone())));
        (Box::new(Console { uart: Some(uart), held: Held::new(), queue_always: false }), out)
    }

    fn text(out: &Arc<StdMutex<Vec<u8>>>) -> std::string::String {
        std::string::String::from_utf8(out.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn held_lines_come_out_in_order_on_release_and_not_before() {
        let (mut c, out) = console();
        c.line(format_args!("before"));
        c.held.on = true;
        c.line(format_args!("one {}", 1));
        c.line(format_args!("two\nlines"));
        c.drain();
        assert_eq!(text(&out), "before\r\n", "nothing drains while held");
        c.release();
        c.drain();
        assert_eq!(text(&out), "before\r\none ", "a transmitter's worth at a time");
        // A line written while the queue drains goes behind it.
        c.line(format_args!("after"));
        for _ in 0..10 {
            c.drain();
        }
        assert_eq!(text(&out), "before\r\none 1\r\ntwo\r\nlines\r\nafter\r\n");
        // Drained: lines go straight out again.
        c.line(format_args!("direct"));
        assert!(text(&out).ends_with("after\r\ndirect\r\n"));
    }

    #[test]
    fn a_slow_uart_always_queues_and_never_makes_the_writer_wait() {
        let (mut c, out) = console();
        c.queue_always = true;
        c.line(format_args!("first"));
        c.line(format_args!("second"));
        assert_eq!(text(&out), "", "nothing written while printing");
        while c.held.queueing() {
            c.drain();
        }
        assert_eq!(text(&out), "first\r\nsecond\r\n");
        c.line(format_args!("third"));
        c.write_queue();
        assert_eq!(text(&out), "first\r\nsecond\r\nthird\r\n");
    }

    #[test]
    fn a_forced_line_or_a_flush_writes_the_queue_out_first() {
        let (mut c, out) = console();
        c.held.on = true;
        c.line(format_args!("held"));
        c.write_queue();
        c.line(format_args!("panic"));
        assert_eq!(text(&out), "held\r\npanic\r\n");
    }

    #[test]
    fn when_the_buffer_is_full_the_complete_lines_go_out_first_and_nothing_is_lost() {
        let (mut c, out) = console();
        c.held.on = true;
        let long = "x".repeat(HELD_BYTES - 10);
        c.line(format_args!("{long}"));
        c.line(format_args!("does not fit"));
        // The first line went out to make room; the second is held.
        assert_eq!(text(&out), std::format!("{long}\r\n"));
        let longer = "y".repeat(HELD_BYTES + 5);
        c.line(format_args!("{longer}"));
        c.line(format_args!("ok"));
        c.release();
        while c.held.queueing() {
            c.drain();
        }
        assert_eq!(text(&out), std::format!("{long}\r\ndoes not fit\r\n{longer}\r\nok\r\n"));
    }
}
