//! PCI Express configuration through ECAM (PCIe Base Specification 6.0
//! §7.2.2): enumeration of bus 0, BAR sizing and assignment from the host
//! bridge's memory window, and command-register control. The access method
//! is a trait, so the logic is tested on a fake configuration space.

use alloc::vec::Vec;
use core::fmt;

use loader::PhysRange;

/// Type 0 header offsets (PCIe Base Spec §7.5.1).
pub const VENDOR_ID: u16 = 0x00;
pub const COMMAND: u16 = 0x04;
pub const CLASS_REV: u16 = 0x08;
pub const HEADER_TYPE: u16 = 0x0c;
pub const BAR0: u16 = 0x10;
/// Command register: Memory Space Enable, Bus Master Enable.
pub const CMD_MEMORY: u32 = 1 << 1;
pub const CMD_BUS_MASTER: u32 = 1 << 2;
/// BAR bits (§7.5.1.2.1): I/O space, 64-bit type, prefetchable.
const BAR_IO: u32 = 1 << 0;
const BAR_TYPE_MASK: u32 = 0b11 << 1;
const BAR_TYPE_64: u32 = 0b10 << 1;
const BAR_MEM_MASK: u32 = !0xf;
const HEADER_MULTIFUNCTION: u32 = 1 << 23;
const NO_DEVICE: u32 = 0xffff;

/// Bus, device, function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bdf {
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
}

impl Bdf {
    /// Parses `BB:DD.F` (hex, as `lspci` prints it).
    pub fn parse(s: &str) -> Option<Self> {
        loader::manifest::parse_bdf(s).map(Self::from)
    }

    /// The requester id (§2.2.6.2): bus[15:8] device[7:3] function[2:0].
    pub fn rid(self) -> u32 {
        (u32::from(self.bus) << 8) | (u32::from(self.dev) << 3) | u32::from(self.func)
    }

    /// Offset of this function's 4 KiB in the ECAM window (§7.2.2).
    pub fn ecam_offset(self, bus_start: u8) -> u64 {
        (u64::from(self.bus.wrapping_sub(bus_start)) << 20) | (u64::from(self.dev) << 15) | (u64::from(self.func) << 12)
    }
}

impl From<(u8, u8, u8)> for Bdf {
    fn from((bus, dev, func): (u8, u8, u8)) -> Self {
        Self { bus, dev, func }
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

/// Configuration-space access (32-bit, aligned offsets).
pub trait ConfigSpace {
    fn read32(&self, bdf: Bdf, offset: u16) -> u32;
    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32);
}

/// A function found on the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
}

/// Lists the functions on `bus`.
pub fn enumerate<C: ConfigSpace>(cfg: &C, bus: u8) -> Vec<Function> {
    let mut out = Vec::new();
    for dev in 0..32 {
        for func in 0..8 {
            let bdf = Bdf { bus, dev, func };
            let id = cfg.read32(bdf, VENDOR_ID);
            if id & 0xffff == NO_DEVICE {
                if func == 0 {
                    break;
                }
                continue;
            }
            out.push(Function {
                bdf,
                vendor: (id & 0xffff) as u16,
                device: (id >> 16) as u16,
                class: cfg.read32(bdf, CLASS_REV) >> 8,
            });
            if func == 0 && cfg.read32(bdf, HEADER_TYPE) & HEADER_MULTIFUNCTION == 0 {
                break;
            }
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciError {
    NoSuchFunction(Bdf),
    /// BAR `index` is I/O space, which this hypervisor does not assign.
    IoBar(u8),
    /// The memory window cannot hold the BAR.
    WindowFull {
        index: u8,
        size: u64,
    },
}

impl fmt::Display for PciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchFunction(b) => write!(f, "no PCI function at {b}"),
            Self::IoBar(i) => write!(f, "BAR{i} is I/O space"),
            Self::WindowFull { index, size } => write!(f, "no room for BAR{index} ({size:#x} bytes)"),
        }
    }
}

/// A memory BAR after assignment: its CPU physical range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AssignedBar {
    pub index: u8,
    pub cpu: PhysRange,
}

/// Hands out naturally aligned pieces of the host bridge's 32-bit window.
#[derive(Clone, Copy, Debug)]
pub struct BarWindow {
    /// PCI bus address of the window's start, and its CPU range.
    pub pci_base: u64,
    pub cpu: PhysRange,
    next: u64,
}

impl BarWindow {
    pub fn new(pci_base: u64, cpu: PhysRange) -> Self {
        Self { pci_base, cpu, next: 0 }
    }

    /// An aligned `size` bytes (a power of two): (PCI address, CPU address).
    fn take(&mut self, size: u64) -> Option<(u64, u64)> {
        let off = (self.pci_base + self.next).next_multiple_of(size) - self.pci_base;
        let end = off.checked_add(size)?;
        if end > self.cpu.size {
            return None;
        }
        self.next = end;
        Some((self.pci_base + off, self.cpu.base + off))
    }
}

/// Sizes every memory BAR of `bdf` (write ones, read back, §7.5.1.2.1),
/// places it in `window`, and enables memory decoding and bus mastering.
pub fn assign<C: ConfigSpace>(cfg: &mut C, bdf: Bdf, window: &mut BarWindow) -> Result<Vec<AssignedBar>, PciError> {
    if cfg.read32(bdf, VENDOR_ID) & 0xffff == NO_DEVICE {
        return Err(PciError::NoSuchFunction(bdf));
    }
    let cmd = cfg.read32(bdf, COMMAND);
    cfg.write32(bdf, COMMAND, cmd & !(CMD_MEMORY | CMD_BUS_MASTER));
    let mut bars = Vec::new();
    let mut index = 0u8;
    while index < 6 {
        let off = BAR0 + 4 * u16::from(index);
        let orig = cfg.read32(bdf, off);
        cfg.write32(bdf, off, u32::MAX);
        let probe = cfg.read32(bdf, off);
        cfg.write32(bdf, off, orig);
        if probe == 0 {
            index += 1;
            continue;
        }
        if probe & BAR_IO != 0 {
            return Err(PciError::IoBar(index));
        }
        let is64 = orig & BAR_TYPE_MASK == BAR_TYPE_64;
        let mut mask = u64::from(probe & BAR_MEM_MASK);
        if is64 {
            cfg.write32(bdf, off + 4, u32::MAX);
            mask |= u64::from(cfg.read32(bdf, off + 4)) << 32;
        } else {
            mask |= 0xffff_ffff_0000_0000;
        }
        let size = (!mask).wrapping_add(1);
        let (pci, cpu) = window.take(size).ok_or(PciError::WindowFull { index, size })?;
        cfg.write32(bdf, off, (pci as u32 & BAR_MEM_MASK) | (orig & !BAR_MEM_MASK));
        if is64 {
            cfg.write32(bdf, off + 4, (pci >> 32) as u32);
        }
        bars.push(AssignedBar { index, cpu: PhysRange::new(cpu, size) });
        index += if is64 { 2 } else { 1 };
    }
    cfg.write32(bdf, COMMAND, cmd | CMD_MEMORY | CMD_BUS_MASTER);
    Ok(bars)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::BTreeMap;

    use super::*;

    /// A bus with QEMU's host bridge at 00:00.0 and `edu` (1234:11e8) at
    /// 00:02.0: BAR0 is 1 MiB of 32-bit memory.
    struct Fake {
        regs: BTreeMap<(Bdf, u16), u32>,
        sizes: BTreeMap<(Bdf, u16), u32>,
    }

    const EDU: Bdf = Bdf { bus: 0, dev: 2, func: 0 };
    const HOST: Bdf = Bdf { bus: 0, dev: 0, func: 0 };

    impl Fake {
        fn new() -> Self {
            let mut regs = BTreeMap::new();
            regs.insert((HOST, VENDOR_ID), 0x0008_1b36);
            regs.insert((HOST, CLASS_REV), 0x0600_0000);
            regs.insert((EDU, VENDOR_ID), 0x11e8_1234);
            regs.insert((EDU, CLASS_REV), 0x00ff_0010);
            regs.insert((EDU, BAR0), 0);
            let mut sizes = BTreeMap::new();
            sizes.insert((EDU, BAR0), !(0x10_0000 - 1) & BAR_MEM_MASK);
            Self { regs, sizes }
        }
    }

    impl ConfigSpace for Fake {
        fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
            self.regs.get(&(bdf, offset)).copied().unwrap_or(if offset == VENDOR_ID { u32::MAX } else { 0 })
        }
        fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
            // Unimplemented BARs are hardwired to zero (§7.5.1.2.1).
            let is_bar = (BAR0..BAR0 + 24).contains(&offset);
            let v = match self.sizes.get(&(bdf, offset)) {
                Some(&mask) => value & mask,
                None if is_bar => 0,
                None => value,
            };
            self.regs.insert((bdf, offset), v);
        }
    }

    #[test]
    fn finds_edu_and_assigns_its_bar() {
        let mut cfg = Fake::new();
        let found = enumerate(&cfg, 0);
        assert_eq!(found.len(), 2);
        assert_eq!((found[1].bdf, found[1].vendor, found[1].device), (EDU, 0x1234, 0x11e8));
        let mut window = BarWindow::new(0x1000_0000, PhysRange::new(0x1000_0000, 0x2eff_0000));
        let bars = assign(&mut cfg, EDU, &mut window).unwrap();
        assert_eq!(bars, [AssignedBar { index: 0, cpu: PhysRange::new(0x1000_0000, 0x10_0000) }]);
        assert_eq!(cfg.read32(EDU, BAR0), 0x1000_0000);
        assert_eq!(cfg.read32(EDU, COMMAND) & (CMD_MEMORY | CMD_BUS_MASTER), CMD_MEMORY | CMD_BUS_MASTER);
        // The next assignment lands after it, aligned.
        assert_eq!(window.take(0x1000), Some((0x1010_0000, 0x1010_0000)));
    }

    #[test]
    fn errors_and_parsing() {
        let mut cfg = Fake::new();
        let mut tiny = BarWindow::new(0x1000_0000, PhysRange::new(0x1000_0000, 0x1000));
        assert_eq!(assign(&mut cfg, EDU, &mut tiny), Err(PciError::WindowFull { index: 0, size: 0x10_0000 }));
        let missing = Bdf { bus: 0, dev: 9, func: 0 };
        assert_eq!(assign(&mut cfg, missing, &mut tiny), Err(PciError::NoSuchFunction(missing)));
        assert_eq!(Bdf::parse("00:02.0"), Some(EDU));
        assert_eq!(EDU.rid(), 0x10);
        assert_eq!(EDU.ecam_offset(0), 0x1_0000);
        assert_eq!(Bdf::parse("00:20.0"), None);
        assert_eq!(Bdf::parse("00:02.8"), None);
        assert_eq!(Bdf::parse("zz:02.0"), None);
        assert_eq!(Bdf::parse("0002.0"), None);
    }
}
