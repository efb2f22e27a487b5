//! The PL011 UART each aarch64 partition sees (PrimeCell UART, Arm DDI
//! 0183G): a transmitter that sends every byte at once, so its FIFO is
//! always empty, and a receiver that never receives. The registers a
//! driver programs read back; the PrimeCell IDs are those of r1p5, which
//! Linux's amba bus and `amba-pl011` driver match. The transmit interrupt
//! (UARTTXINTR, RIS bit 5) is asserted whenever the guest unmasks it, the
//! FIFO being empty: a level on SPI 1 of the partition's virtual GIC.

/// Register offsets (§3.2, Table 3-1).
pub const DR: u64 = 0x000;
pub const FR: u64 = 0x018;
pub const IBRD: u64 = 0x024;
pub const FBRD: u64 = 0x028;
pub const LCR_H: u64 = 0x02c;
pub const CR: u64 = 0x030;
pub const IFLS: u64 = 0x034;
pub const IMSC: u64 = 0x038;
pub const RIS: u64 = 0x03c;
pub const MIS: u64 = 0x040;
pub const ICR: u64 = 0x044;
pub const PERIPH_ID0: u64 = 0xfe0;
/// UARTPeriphID0-3 and UARTPCellID0-3 (§3.3.14-15): part 0x011,
/// designer 0x41, revision 1 (r1p5); PrimeCell 0xb105f00d.
const ID_BYTES: [u8; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];
/// UARTFR (§3.3.3): TXFE (7) transmit FIFO empty, RXFE (4) receive FIFO
/// empty.
pub const FR_IDLE: u64 = 0x90;
/// The transmit interrupt's bit in IMSC, RIS, MIS and ICR (§3.3.10-13).
pub const INT_TX: u32 = 1 << 5;
/// The interrupt bits the UART has (RIMIM .. OEIM, §3.3.10).
const INT_ALL: u32 = 0x7ff;
/// The raw interrupt status: the transmit FIFO is always empty, so the
/// transmit interrupt is always raw-pending; nothing else ever is.
const RAW: u32 = INT_TX;

/// What a guest write asks of the partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    None,
    /// A byte for the partition's console.
    Transmit(u8),
}

/// The registers a driver programs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pl011 {
    pub cr: u32,
    pub lcr_h: u32,
    pub ibrd: u32,
    pub fbrd: u32,
    pub imsc: u32,
    pub ifls: u32,
}

impl Pl011 {
    /// Whether UARTINTR is asserted (any unmasked raw interrupt).
    pub fn interrupt(self) -> bool {
        RAW & self.imsc != 0
    }

    /// A guest read at `offset`; reserved offsets read as zero.
    pub fn read(self, offset: u64) -> u64 {
        match offset {
            FR => FR_IDLE,
            IBRD => u64::from(self.ibrd),
            FBRD => u64::from(self.fbrd),
            LCR_H => u64::from(self.lcr_h),
            CR => u64::from(self.cr),
            IFLS => u64::from(self.ifls),
            IMSC => u64::from(self.imsc),
            RIS => u64::from(RAW),
            MIS => u64::from(RAW & self.imsc),
            o if (PERIPH_ID0..PERIPH_ID0 + 0x20).contains(&o) && o % 4 == 0 => {
                u64::from(ID_BYTES[((o - PERIPH_ID0) / 4) as usize])
            }
            _ => 0,
        }
    }

    /// A guest write at `offset`; fields are masked to their widths
    /// (§3.3), and ICR, DMACR and the rest take the write and do nothing
    /// (a raw transmit interrupt clears only to be raised again: the FIFO
    /// is still empty).
    pub fn write(&mut self, offset: u64, value: u64) -> Effect {
        let v = value as u32;
        match offset {
            DR => return Effect::Transmit(value as u8),
            IBRD => self.ibrd = v & 0xffff,
            FBRD => self.fbrd = v & 0x3f,
            LCR_H => self.lcr_h = v & 0xff,
            CR => self.cr = v & 0xffff,
            IFLS => self.ifls = v & 0x3f,
            IMSC => self.imsc = v & INT_ALL,
            _ => {}
        }
        Effect::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifies_as_a_primecell_pl011() {
        let u = Pl011::default();
        let id: u32 = (0..4).map(|k| (u.read(PERIPH_ID0 + 4 * k) as u32) << (8 * k)).sum();
        let cell: u32 = (4..8).map(|k| (u.read(PERIPH_ID0 + 4 * k) as u32) << (8 * (k - 4))).sum();
        assert_eq!(id & 0xfff, 0x011, "part number");
        assert_eq!((id >> 12) & 0xff, 0x41, "designer: Arm");
        assert_eq!(cell, 0xb105_f00d);
        assert_eq!(u.read(FR), FR_IDLE);
    }

    #[test]
    fn programmed_registers_read_back_masked() {
        let mut u = Pl011::default();
        for (reg, value, want) in [(IBRD, 0x1_0013, 0x13), (FBRD, 0xff, 0x3f), (LCR_H, 0x170, 0x70), (CR, 0x301, 0x301)]
        {
            assert_eq!(u.write(reg, value), Effect::None);
            assert_eq!(u.read(reg), want);
        }
        assert_eq!(u.write(DR, 0x141), Effect::Transmit(0x41));
        assert_eq!(u.read(0x800), 0, "reserved");
    }

    #[test]
    fn the_transmit_interrupt_is_a_level_while_unmasked() {
        let mut u = Pl011::default();
        assert!(!u.interrupt(), "masked at reset");
        assert_eq!(u.read(RIS) as u32, INT_TX, "raw: the FIFO is empty");
        assert_eq!(u.read(MIS), 0);
        u.write(IMSC, u64::from(INT_TX));
        assert!(u.interrupt());
        assert_eq!(u.read(MIS) as u32, INT_TX);
        u.write(ICR, u64::from(INT_TX));
        assert!(u.interrupt(), "still empty: raised again at once");
        u.write(IMSC, 0);
        assert!(!u.interrupt());
    }
}
