//! Device assignment on aarch64: the ECAM configuration space of the PCIe
//! host bridge the DTB describes, BAR placement, and mapping a device's
//! BARs into its guest's stage 2.

use alloc::vec::Vec;

use hypervisor::pci::{self, AssignedBar, BarWindow, Bdf, ConfigSpace};
use loader::dtb::{IommuMap, PcieHost};
use loader::PhysRange;

/// Guest-physical address of a guest's first assigned BAR (the QEMU
/// `virt` 32-bit PCI window starts here too).
pub const GUEST_DEVICE_IPA: u64 = 0x1000_0000;

/// ECAM access (PCIe Base Spec §7.2.2), identity-mapped as device memory.
pub struct Ecam {
    base: u64,
    bus_start: u8,
    bus_end: u8,
}

impl Ecam {
    fn address(&self, bdf: Bdf, offset: u16) -> Option<u64> {
        if bdf.bus < self.bus_start || bdf.bus > self.bus_end || offset >= 0x1000 || !offset.is_multiple_of(4) {
            return None;
        }
        Some(self.base + bdf.ecam_offset(self.bus_start) + u64::from(offset))
    }
}

impl ConfigSpace for Ecam {
    fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
        match self.address(bdf, offset) {
            // SAFETY: inside the ECAM window from the DTB, mapped as device
            // memory by the host map.
            Some(a) => unsafe { core::ptr::read_volatile(a as *const u32) },
            None => u32::MAX,
        }
    }

    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
        if let Some(a) = self.address(bdf, offset) {
            // SAFETY: as in `read32`.
            unsafe { core::ptr::write_volatile(a as *mut u32, value) };
        }
    }
}

/// The host bridge: configuration access and its 32-bit BAR window.
pub struct PciHost {
    pub ecam: Ecam,
    pub window: BarWindow,
    pub mmio32: PhysRange,
    pub iommu_map: Option<IommuMap>,
}

impl PciHost {
    pub fn from_dtb(host: &PcieHost) -> Option<Self> {
        let (pci_base, cpu) = host.mmio32?;
        Some(Self {
            ecam: Ecam { base: host.ecam.base, bus_start: host.bus_start, bus_end: host.bus_end },
            window: BarWindow::new(pci_base, cpu),
            mmio32: cpu,
            iommu_map: host.iommu_map,
        })
    }
}

/// One device given to a guest.
pub struct Assigned {
    pub bdf: Bdf,
    pub bars: Vec<AssignedBar>,
    /// The device's SMMU stream id (`iommu-map`).
    pub stream_id: u32,
    /// Guest-physical address of each BAR, in `bars` order.
    pub ipas: Vec<u64>,
}

/// Why a PCI function cannot be given to a guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AssignError {
    /// The DTB's host bridge has no `iommu-map`.
    NoIommuMap,
    /// The `iommu-map` does not cover the function's requester id.
    NotBehindIommu(Bdf),
    Bars(pci::PciError),
}

impl core::fmt::Display for AssignError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::NoIommuMap => "no-iommu-map",
            Self::NotBehindIommu(_) => "device-not-behind-the-iommu",
            Self::Bars(_) => "bar-assignment",
        })
    }
}

impl AssignError {
    /// The cause, for a human-readable line.
    pub fn cause(&self) -> Option<&dyn core::fmt::Display> {
        match self {
            Self::NotBehindIommu(bdf) => Some(bdf),
            Self::Bars(e) => Some(e),
            Self::NoIommuMap => None,
        }
    }
}

/// Places the BARs of `bdf`, enables it, and picks guest addresses for the
/// BARs from `next_ipa` up.
pub fn assign(host: &mut PciHost, bdf: Bdf, next_ipa: &mut u64) -> Result<Assigned, AssignError> {
    let map = host.iommu_map.ok_or(AssignError::NoIommuMap)?;
    let stream_id = map.stream_id(bdf.rid()).ok_or(AssignError::NotBehindIommu(bdf))?;
    let bars = pci::assign(&mut host.ecam, bdf, &mut host.window).map_err(AssignError::Bars)?;
    let mut ipas = Vec::new();
    for bar in &bars {
        let ipa = next_ipa.next_multiple_of(bar.cpu.size.max(0x1000));
        ipas.push(ipa);
        *next_ipa = ipa + bar.cpu.size;
    }
    Ok(Assigned { bdf, bars, stream_id, ipas })
}
