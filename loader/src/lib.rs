//! Boot protocols in, next image out.
//!
//! Every boot path (arm64 Image + DTB, multiboot2 + ACPI, and later the
//! handover entry of a live update) is parsed here into one arch-neutral
//! [`BootInfo`]. All input is untrusted: parsers validate and return typed
//! errors, and never panic on malformed blobs.
#![no_std]

extern crate alloc;

pub mod acpi;
pub mod acpi_arm;
mod bytes;
pub mod dmar;
pub mod dtb;
pub mod elf;
pub mod gtdt;
pub mod guest_modules;
pub mod image_desc;
pub mod image_readers;
pub mod iort;
pub mod manifest;
pub mod multiboot2;
pub mod uefi;

use alloc::string::String;
use alloc::vec::Vec;

/// A physical address range `[base, base + size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PhysRange {
    pub base: u64,
    pub size: u64,
}

impl PhysRange {
    pub const fn new(base: u64, size: u64) -> Self {
        Self { base, size }
    }

    /// One past the last byte; `None` if the range wraps the address space.
    pub const fn end(&self) -> Option<u64> {
        self.base.checked_add(self.size)
    }

    pub fn overlaps(&self, other: &PhysRange) -> bool {
        let (Some(a_end), Some(b_end)) = (self.end(), other.end()) else {
            return true;
        };
        self.base < b_end && other.base < a_end
    }

    pub fn contains(&self, other: &PhysRange) -> bool {
        match (self.end(), other.end()) {
            (Some(a_end), Some(b_end)) => other.base >= self.base && b_end <= a_end,
            _ => false,
        }
    }
}

/// A blob handed to the hypervisor by the boot protocol (a multiboot2 module,
/// or an initrd-like blob on arm64).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootModule {
    pub range: PhysRange,
    /// The module's command line (multiboot2) or name.
    pub name: String,
}

/// The one value every boot path hands to the hypervisor core.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// Usable RAM, sorted by base, non-overlapping.
    pub ram: Vec<PhysRange>,
    /// Ranges inside RAM that must not be allocated (firmware reservations,
    /// the DTB / boot information itself, modules).
    pub reserved: Vec<PhysRange>,
    pub cmdline: String,
    pub modules: Vec<BootModule>,
    /// Physical address of a KHO handover blob left by a previous image.
    pub handover: Option<u64>,
}

impl BootInfo {
    /// Total usable RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram.iter().fold(0u64, |acc, r| acc.saturating_add(r.size))
    }

    /// Total usable RAM in MiB, rounded down.
    pub fn ram_mib(&self) -> u64 {
        self.ram_bytes() >> 20
    }
}

/// Sorts ranges by base and checks that none overlap or wrap.
fn sort_disjoint(ranges: &mut [PhysRange]) -> Result<(), PhysRange> {
    ranges.sort_unstable();
    for r in ranges.iter() {
        if r.end().is_none() {
            return Err(*r);
        }
    }
    for pair in ranges.windows(2) {
        if pair[0].overlaps(&pair[1]) {
            return Err(pair[1]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_and_contains() {
        let a = PhysRange::new(0x1000, 0x1000);
        let b = PhysRange::new(0x1800, 0x1000);
        let c = PhysRange::new(0x2000, 0x10);
        assert!(a.overlaps(&b));
        assert!(!a.overlaps(&c));
        assert!(PhysRange::new(0, 0x3000).contains(&b));
        assert!(!a.contains(&b));
        let wrap = PhysRange::new(u64::MAX, 2);
        assert!(wrap.end().is_none());
        assert!(wrap.overlaps(&a));
    }

    #[test]
    fn sort_rejects_overlap() {
        let mut v = [PhysRange::new(0x2000, 0x1000), PhysRange::new(0x0, 0x2001)];
        assert_eq!(sort_disjoint(&mut v), Err(PhysRange::new(0x2000, 0x1000)));
        let mut ok = [PhysRange::new(0x2000, 0x1000), PhysRange::new(0x0, 0x2000)];
        assert_eq!(sort_disjoint(&mut ok), Ok(()));
        assert_eq!(ok[0].base, 0);
    }
}
