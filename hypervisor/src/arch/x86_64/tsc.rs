//! The TSC's frequency, measured against the 8254 PIT (channel 2, gated
//! through port 0x61, the classic PC calibration loop): the guests' TSC
//! runs unscaled, the VMX-preemption timer counts TSC ticks, and guests
//! learn the frequency from CPUID leaf 0x4000_0010.

use core::arch::x86_64::_rdtsc;

use x86::io::{inb, outb};

/// The PIT's input clock (Intel 8254 data sheet; PC/AT).
const PIT_HZ: u64 = 1_193_182;
/// Measure over 10 ms.
const CALIBRATION_HZ: u64 = 100;
const PIT_COUNT: u64 = PIT_HZ / CALIBRATION_HZ;
/// PIT command port and channel 2 data port.
const PIT_COMMAND: u16 = 0x43;
const PIT_CHANNEL2: u16 = 0x42;
/// Channel 2, low then high byte, mode 0 (interrupt on terminal count),
/// binary.
const PIT_CH2_MODE0: u8 = 0b1011_0000;
/// Port 0x61 (PC/AT system control port B): bit 0 gates channel 2, bit 1
/// drives the speaker, bit 5 reads channel 2's output.
const PORT_B: u16 = 0x61;
const PORT_B_GATE2: u8 = 1 << 0;
const PORT_B_SPEAKER: u8 = 1 << 1;
const PORT_B_OUT2: u8 = 1 << 5;
/// Give up if the output never rises (no PIT).
const MAX_POLLS: u64 = 100_000_000;

/// Reads the time-stamp counter.
pub fn now() -> u64 {
    // SAFETY: RDTSC has no side effects; CR4.TSD is clear in VMX root.
    unsafe { _rdtsc() }
}

/// The TSC frequency in Hz, or `None` if the PIT did not count.
pub fn calibrate() -> Option<u64> {
    // SAFETY: the PIT and port 0x61 belong to the hypervisor (guests'
    // I/O instructions all exit); the speaker stays off and port B's other
    // bits are restored.
    unsafe {
        let saved = inb(PORT_B);
        outb(PORT_B, (saved & !PORT_B_SPEAKER) | PORT_B_GATE2);
        outb(PIT_COMMAND, PIT_CH2_MODE0);
        outb(PIT_CHANNEL2, (PIT_COUNT & 0xff) as u8);
        outb(PIT_CHANNEL2, (PIT_COUNT >> 8) as u8);
        let start = now();
        let mut polls = 0;
        while inb(PORT_B) & PORT_B_OUT2 == 0 {
            polls += 1;
            if polls == MAX_POLLS {
                outb(PORT_B, saved);
                return None;
            }
        }
        let end = now();
        outb(PORT_B, saved);
        Some(end.wrapping_sub(start).saturating_mul(CALIBRATION_HZ)).filter(|&hz| hz > 0)
    }
}
