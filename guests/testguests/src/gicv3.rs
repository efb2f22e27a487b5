//! GICv3 CPU-interface and generic-timer register values, as pure
//! functions so they are tested on the host. The accesses themselves are
//! in `arch::aarch64`.
//!
//! Layouts: GICv3/v4 architecture specification (Arm IHI 0069), the
//! register descriptions of ICC_SGI1R_EL1, ICC_IAR1_EL1, ICC_SRE_EL1,
//! ICC_PMR_EL1 and ICC_IGRPEN1_EL1; Arm ARM (DDI 0487), "AArch64 System
//! Register Descriptions": MPIDR_EL1 and CNTV_CTL_EL0.

/// Virtual timer PPI (Arm BSA: PPI 11 = INTID 27, as in the guest DTB's
/// `arm,armv8-timer` node).
pub const VIRTUAL_TIMER_INTID: u32 = 27;
/// The SGI the heartbeat sends itself.
pub const HEARTBEAT_SGI: u32 = 1;

/// ICC_IAR1_EL1.INTID is bits 23:0; 1020-1023 are special (1023 =
/// spurious, no pending interrupt).
pub const IAR_INTID_MASK: u64 = 0xff_ffff;
pub const FIRST_SPECIAL_INTID: u32 = 1020;

/// Where the guest's distributor and redistributors are (the guest DTB's
/// `arm,gic-v3` node, as on QEMU `virt`), and the registers the test
/// guests program (IHI 0069H §12.9-12.11): GICD_CTLR ARE and
/// EnableGrp1, GICR_WAKER ProcessorSleep/ChildrenAsleep, and the SGI
/// frame's IGROUPR0 and ISENABLER0.
pub const GICD_BASE: usize = 0x0800_0000;
pub const GICR_BASE: usize = 0x080a_0000;
pub const GICR_STRIDE: usize = 0x2_0000;
pub const GICD_CTLR: usize = 0x0000;
pub const GICD_CTLR_ENABLE_GRP1_ARE: u32 = (1 << 1) | (1 << 4);
pub const GICR_WAKER: usize = 0x0014;
pub const GICR_WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;
pub const GICR_SGI_IGROUPR0: usize = 0x1_0080;
pub const GICR_SGI_ISENABLER0: usize = 0x1_0100;

/// The redistributor of the vCPU with affinity `aff0` (one frame pair
/// each, in vCPU order).
pub fn redistributor(aff0: u64) -> usize {
    GICR_BASE + aff0 as usize * GICR_STRIDE
}

/// ICC_SRE_EL1.SRE: use the system-register interface.
pub const ICC_SRE_SRE: u64 = 1 << 0;
/// ICC_PMR_EL1: lowest priority mask, every interrupt passes.
pub const ICC_PMR_ALLOW_ALL: u64 = 0xff;
/// ICC_IGRPEN1_EL1.Enable.
pub const ICC_IGRPEN1_ENABLE: u64 = 1 << 0;

/// CNTV_CTL_EL0: ENABLE (bit 0), IMASK (bit 1); ISTATUS (bit 2) is read-only.
pub const CNTV_CTL_ENABLE: u64 = 1 << 0;
pub const CNTV_CTL_IMASK: u64 = 1 << 1;

/// MPIDR_EL1 affinity fields: Aff0 7:0, Aff1 15:8, Aff2 23:16, Aff3 39:32.
const MPIDR_AFF0_SHIFT: u32 = 0;
const MPIDR_AFF1_SHIFT: u32 = 8;
const MPIDR_AFF2_SHIFT: u32 = 16;
const MPIDR_AFF3_SHIFT: u32 = 32;

/// ICC_SGI1R_EL1 fields: TargetList 15:0, Aff1 23:16, INTID 27:24,
/// Aff2 39:32, IRM 40 (0 = use the target list), RS 47:44 (which block of
/// 16 Aff0 values TargetList covers), Aff3 55:48.
const SGI1R_AFF1_SHIFT: u32 = 16;
const SGI1R_INTID_SHIFT: u32 = 24;
const SGI1R_INTID_MASK: u64 = 0xf;
const SGI1R_AFF2_SHIFT: u32 = 32;
const SGI1R_RS_SHIFT: u32 = 44;
const SGI1R_AFF3_SHIFT: u32 = 48;

fn affinity(mpidr: u64, shift: u32) -> u64 {
    (mpidr >> shift) & 0xff
}

/// The ICC_SGI1R_EL1 value that sends SGI `intid` to the PE whose
/// MPIDR_EL1 is `mpidr` (the caller itself, for a self-SGI).
pub fn sgi1r_to_self(mpidr: u64, intid: u32) -> u64 {
    let aff0 = affinity(mpidr, MPIDR_AFF0_SHIFT);
    let target_list = 1_u64 << (aff0 % 16);
    let range_selector = aff0 / 16;
    target_list
        | (affinity(mpidr, MPIDR_AFF1_SHIFT) << SGI1R_AFF1_SHIFT)
        | ((u64::from(intid) & SGI1R_INTID_MASK) << SGI1R_INTID_SHIFT)
        | (affinity(mpidr, MPIDR_AFF2_SHIFT) << SGI1R_AFF2_SHIFT)
        | (range_selector << SGI1R_RS_SHIFT)
        | (affinity(mpidr, MPIDR_AFF3_SHIFT) << SGI1R_AFF3_SHIFT)
}

/// The INTID acknowledged by an ICC_IAR1_EL1 read, `None` if spurious.
pub fn acknowledged_intid(iar: u64) -> Option<u32> {
    let intid = (iar & IAR_INTID_MASK) as u32;
    (intid < FIRST_SPECIAL_INTID).then_some(intid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgi_to_self_on_a_single_cluster() {
        // MPIDR_EL1 of vCPU 0 under KVM/QEMU: RES1 bit 31, Aff0 = 0.
        assert_eq!(sgi1r_to_self(0x8000_0000, 1), (1 << 24) | 1);
        assert_eq!(sgi1r_to_self(0x8000_0003, 1), (1 << 24) | (1 << 3));
    }

    #[test]
    fn sgi_to_self_with_all_affinity_levels() {
        let mpidr = (0x7_u64 << 32) | (0x5 << 16) | (0x4 << 8) | 0x12;
        let v = sgi1r_to_self(mpidr, 15);
        assert_eq!(v & 0xffff, 1 << 2, "Aff0 0x12 is bit 2 of block 1");
        assert_eq!((v >> 44) & 0xf, 1);
        assert_eq!((v >> 16) & 0xff, 4);
        assert_eq!((v >> 24) & 0xf, 15);
        assert_eq!((v >> 32) & 0xff, 5);
        assert_eq!((v >> 48) & 0xff, 7);
        assert_eq!(v & (1 << 40), 0, "IRM = 0: targeted");
    }

    #[test]
    fn spurious_interrupts_are_not_acknowledged() {
        assert_eq!(acknowledged_intid(27), Some(27));
        assert_eq!(acknowledged_intid(0xff00_0001), Some(1));
        assert_eq!(acknowledged_intid(1023), None);
        assert_eq!(acknowledged_intid(1020), None);
    }
}
