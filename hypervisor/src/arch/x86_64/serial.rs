//! COM1 console through `uart_16550`.

use hypervisor::console::Uart;
use uart_16550::SerialPort;
use x86::io::{inb, outb};

/// The PC's first serial port (I/O base 0x3f8).
const COM1: u16 = 0x3f8;
/// Line control register: DLAB (bit 7) exposes the divisor latch at
/// offsets 0 and 1; 0x03 is 8 data bits, no parity, 1 stop bit (16550
/// data sheet).
const LCR: u16 = COM1 + 3;
const LCR_DLAB: u8 = 1 << 7;
const LCR_8N1: u8 = 0x03;
const DIVISOR_LOW: u16 = COM1;
const DIVISOR_HIGH: u16 = COM1 + 1;
/// 115200 baud: the 1.8432 MHz clock / 16 / 1. Emulators time the
/// transmitter by the baud rate, so this is 3x faster than the 38400 baud
/// `uart_16550` sets up.
const DIVISOR_115200: u8 = 1;
/// Line status register and its "transmitter empty" bit (16550 data sheet).
const LSR: u16 = COM1 + 5;
const LSR_TEMT: u8 = 1 << 6;
/// "Transmitter holding register empty": with the FIFOs on (`uart_16550`
/// sets FCR = 0xc7), the transmit FIFO is empty and takes 16 bytes.
const LSR_THRE: u8 = 1 << 5;
const TX_FIFO_BYTES: usize = 16;
const FLUSH_SPINS: u32 = 1_000_000;

pub struct Com1(SerialPort);

impl Com1 {
    /// # Safety
    /// Only one `Com1` may exist: it owns the port's I/O registers.
    pub unsafe fn new() -> Self {
        // SAFETY: per the contract, we own COM1's registers.
        let mut port = unsafe { SerialPort::new(COM1) };
        port.init();
        // SAFETY: as above; the divisor latch is written with DLAB set,
        // then the line format uart_16550 chose is restored.
        unsafe {
            outb(LCR, LCR_DLAB | LCR_8N1);
            outb(DIVISOR_LOW, DIVISOR_115200);
            outb(DIVISOR_HIGH, 0);
            outb(LCR, LCR_8N1);
        }
        Self(port)
    }
}

impl Uart for Com1 {
    fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0.send_raw(b);
        }
    }

    fn try_write(&mut self, bytes: &[u8]) -> usize {
        // SAFETY: reading the LSR of the port this value owns.
        if unsafe { inb(LSR) } & LSR_THRE == 0 {
            return 0;
        }
        let n = bytes.len().min(TX_FIFO_BYTES);
        for &b in &bytes[..n] {
            // SAFETY: the transmit FIFO is empty (THRE) and takes these
            // bytes; the port is this value's.
            unsafe { outb(COM1, b) };
        }
        n
    }

    /// 115200 baud, ~87 µs a byte: no CPU should wait for it.
    fn queued(&self) -> bool {
        true
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
