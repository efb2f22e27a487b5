//! COM1 console through `uart_16550`.

use hypervisor::console::Uart;
use uart_16550::SerialPort;
use x86::io::inb;

/// The PC's first serial port (I/O base 0x3f8).
const COM1: u16 = 0x3f8;
/// Line status register and its "transmitter empty" bit (16550 data sheet).
const LSR: u16 = COM1 + 5;
const LSR_TEMT: u8 = 1 << 6;
const FLUSH_SPINS: u32 = 1_000_000;

pub struct Com1(SerialPort);

impl Com1 {
    /// # Safety
    /// Only one `Com1` may exist: it owns the port's I/O registers.
    pub unsafe fn new() -> Self {
        // SAFETY: per the contract, we own COM1's registers.
        let mut port = unsafe { SerialPort::new(COM1) };
        port.init();
        Self(port)
    }
}

impl Uart for Com1 {
    fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0.send_raw(b);
        }
    }

    fn flush(&mut self) {
        for _ in 0..FLUSH_SPINS {
            // SAFETY: reading the LSR of the port this value owns.
            if unsafe { inb(LSR) } & LSR_TEMT != 0 {
                return;
            }
            core::hint::spin_loop();
        }
    }
}
