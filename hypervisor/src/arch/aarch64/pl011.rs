//! Arm PrimeCell UART (PL011), Technical Reference Manual r1p5 §3.3:
//! UARTDR at 0x000, UARTFR at 0x018 (TXFF = bit 5). QEMU's PL011 needs no
//! initialisation; on hardware firmware has set the baud rate.

use hypervisor::console::Uart;

const UARTDR: usize = 0x000;
const UARTFR: usize = 0x018;
const UARTFR_TXFF: u32 = 1 << 5;

pub struct Pl011 {
    base: usize,
}

impl Pl011 {
    /// # Safety
    /// `base` must be the address of a PL011's registers, mapped as device
    /// memory (or the MMU off), and not used by anything else.
    pub const unsafe fn new(base: usize) -> Self {
        Self { base }
    }
}

impl Uart for Pl011 {
    fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            // SAFETY: `new`'s contract: base is a PL011 register block.
            unsafe {
                while core::ptr::read_volatile((self.base + UARTFR) as *const u32) & UARTFR_TXFF != 0 {
                    core::hint::spin_loop();
                }
                core::ptr::write_volatile((self.base + UARTDR) as *mut u32, u32::from(b));
            }
        }
    }
}
