//! Partitions (guests): identity, privilege, RAM, and state.
//!
//! A partition's RAM is one physically contiguous block mapped at a fixed
//! guest-physical base; every guest address the hypervisor is handed is
//! checked against it before it is translated.

use hvcall::PartitionState;

/// Guest-physical base of every partition's RAM (the QEMU `virt` layout,
/// so unmodified kernels find RAM where they expect it).
pub const GUEST_RAM_BASE: u64 = 0x4000_0000;

/// A partition's RAM: `size` bytes at guest-physical [`GUEST_RAM_BASE`],
/// backed by host-physical `host_base`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRam {
    pub host_base: u64,
    pub size: u64,
}

impl GuestRam {
    /// Host-physical address of `[gpa, gpa + len)`, if it lies wholly in RAM.
    pub fn translate(&self, gpa: u64, len: u64) -> Option<u64> {
        let off = gpa.checked_sub(GUEST_RAM_BASE)?;
        let end = off.checked_add(len)?;
        (end <= self.size).then(|| self.host_base + off)
    }

    pub fn contains_gpa(&self, gpa: u64) -> bool {
        self.translate(gpa, 1).is_some()
    }
}

/// Static description of a partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionInfo {
    pub id: u32,
    pub name: alloc::string::String,
    pub privileged: bool,
    pub ram: GuestRam,
    pub vcpus: u32,
}

/// Converts the hypercall ABI's state to its wire value.
pub fn state_code(s: PartitionState) -> u64 {
    s as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translate_checks_bounds() {
        let ram = GuestRam { host_base: 0x8000_0000, size: 0x100_0000 };
        assert_eq!(ram.translate(GUEST_RAM_BASE, 16), Some(0x8000_0000));
        assert_eq!(ram.translate(GUEST_RAM_BASE + 0xff_fff0, 16), Some(0x80ff_fff0));
        assert_eq!(ram.translate(GUEST_RAM_BASE + 0xff_fff1, 16), None);
        assert_eq!(ram.translate(GUEST_RAM_BASE - 1, 1), None);
        assert_eq!(ram.translate(u64::MAX, 2), None);
        assert!(!ram.contains_gpa(0));
    }
}
