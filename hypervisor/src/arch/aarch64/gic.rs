//! GICv3: the physical distributor, redistributors and EL2 CPU interface,
//! and the virtual CPU interface (list registers) through which guests get
//! their interrupts. Register offsets and bits: Arm IHI 0069H (GICv3/v4
//! architecture specification), §12.9 (GICD), §12.10-11 (GICR), §12.2-5
//! (ICC/ICH system registers).

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// INTIDs the hypervisor uses (Arm BSA: architected timer PPIs).
pub const SGI_KICK: u32 = 1;
pub const PPI_HYP_TIMER: u32 = 26;
/// The virtual CPU interface's maintenance interrupt (Arm BSA: PPI 9).
pub const PPI_MAINTENANCE: u32 = 25;
pub const PPI_VIRT_TIMER: u32 = 27;
/// ICC_IAR1_EL1 values from 1020 up are special (spurious, etc.).
pub const INTID_SPECIAL: u32 = 1020;

const GICD_CTLR: usize = 0x0000;
/// GICD_CTLR.EnableGrp0 (single security state, IHI 0069H §12.9.4).
const GICD_CTLR_ENABLE_GRP0: u32 = 1 << 0;
const GICD_CTLR_ENABLE_GRP1: u32 = 1 << 1;
const GICD_CTLR_ARE: u32 = 1 << 4;
const GICD_CTLR_RWP: u32 = 1 << 31;
const GICR_STRIDE: usize = 0x2_0000;
const GICR_TYPER: usize = 0x0008;
const GICR_TYPER_LAST: u64 = 1 << 4;
const GICR_WAKER: usize = 0x0014;
const GICR_WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
const GICR_WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;
/// The SGI/PPI frame follows the RD frame.
const GICR_SGI_FRAME: usize = 0x1_0000;
const GICR_IGROUPR0: usize = 0x0080;
const GICR_ISENABLER0: usize = 0x0100;
const GICR_IPRIORITYR: usize = 0x0400;
/// Priority of the interrupts the hypervisor takes; PMR admits all below 0xff.
const PRIORITY: u8 = 0xa0;

/// ICC_SRE_EL2: SRE (bit 0) system-register interface, Enable (bit 3)
/// lets EL1 use ICC_SRE_EL1.
const ICC_SRE_EL2_VALUE: u64 = (1 << 0) | (1 << 3);
/// ICH_HCR_EL2 (§12.5.5): En, the virtual CPU interface is enabled;
/// NPIE, a maintenance interrupt while no list register holds a pending
/// interrupt.
const ICH_HCR_EN: u64 = 1;
const ICH_HCR_NPIE: u64 = 1 << 3;
/// Most list registers used (the architecture allows 16; QEMU has 4).
pub const MAX_LRS: usize = 4;

static GICD_BASE: AtomicU64 = AtomicU64::new(0);
static GICR_BASE: AtomicU64 = AtomicU64::new(0);
static GICR_SIZE: AtomicU64 = AtomicU64::new(0);

fn read32(addr: usize) -> u32 {
    // SAFETY: `addr` is inside a GIC frame the DTB described, mapped as
    // device memory by the host map.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn write32(addr: usize, v: u32) {
    // SAFETY: as for `read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

fn read64(addr: usize) -> u64 {
    // SAFETY: as for `read32`; GICR_TYPER is a 64-bit register.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

/// Enables the distributor (affinity routing, group 1). Boot CPU, once.
pub fn init_distributor(distributor: u64, redistributors: u64, redistributors_size: u64) {
    GICD_BASE.store(distributor, Ordering::Relaxed);
    GICR_BASE.store(redistributors, Ordering::Relaxed);
    GICR_SIZE.store(redistributors_size, Ordering::Relaxed);
    let d = distributor as usize;
    write32(d + GICD_CTLR, read32(d + GICD_CTLR) | GICD_CTLR_ARE | GICD_CTLR_ENABLE_GRP1);
    while read32(d + GICD_CTLR) & GICD_CTLR_RWP != 0 {
        core::hint::spin_loop();
    }
}

/// Finds this CPU's redistributor by affinity (GICR_TYPER[63:32]).
fn my_redistributor(mpidr: u64) -> Option<usize> {
    let base = GICR_BASE.load(Ordering::Relaxed) as usize;
    let size = GICR_SIZE.load(Ordering::Relaxed) as usize;
    let aff = ((mpidr >> 32) & 0xff) << 24 | (mpidr & 0xff_ffff);
    let mut off = 0;
    while off + GICR_STRIDE <= size {
        let typer = read64(base + off + GICR_TYPER);
        if typer >> 32 == aff {
            return Some(base + off);
        }
        if typer & GICR_TYPER_LAST != 0 {
            break;
        }
        off += GICR_STRIDE;
    }
    None
}

/// Wakes this CPU's redistributor, enables the hypervisor's PPIs/SGIs, and
/// turns on the EL2 system-register interface and the virtual interface.
pub fn init_cpu(mpidr: u64) -> Result<(), &'static str> {
    let rd = my_redistributor(mpidr).ok_or("no-redistributor-for-cpu")?;
    write32(rd + GICR_WAKER, read32(rd + GICR_WAKER) & !GICR_WAKER_PROCESSOR_SLEEP);
    while read32(rd + GICR_WAKER) & GICR_WAKER_CHILDREN_ASLEEP != 0 {
        core::hint::spin_loop();
    }
    let sgi = rd + GICR_SGI_FRAME;
    let ours = (1u32 << SGI_KICK) | (1 << PPI_HYP_TIMER) | (1 << PPI_VIRT_TIMER) | (1 << PPI_MAINTENANCE);
    write32(sgi + GICR_IGROUPR0, read32(sgi + GICR_IGROUPR0) | ours);
    for intid in [SGI_KICK, PPI_HYP_TIMER, PPI_VIRT_TIMER, PPI_MAINTENANCE] {
        let reg = sgi + GICR_IPRIORITYR + (intid as usize & !3);
        let shift = (intid % 4) * 8;
        write32(reg, (read32(reg) & !(0xff << shift)) | (u32::from(PRIORITY) << shift));
    }
    write32(sgi + GICR_ISENABLER0, ours);
    // SAFETY: GICv3 system registers at EL2 (IHI 0069H §12.2): enabling the
    // system-register interface, unmasking all priorities, enabling group 1
    // and the virtual CPU interface. No memory is touched.
    unsafe {
        asm!(
            "msr icc_sre_el2, {sre}",
            "isb",
            "msr icc_pmr_el1, {pmr}",
            "msr icc_bpr1_el1, xzr",
            "msr icc_igrpen1_el1, {one}",
            "msr ich_hcr_el2, {hcr}",
            "isb",
            sre = in(reg) ICC_SRE_EL2_VALUE,
            pmr = in(reg) 0xffu64,
            one = in(reg) 1u64,
            hcr = in(reg) ICH_HCR_EN,
            options(nostack),
        );
    }
    Ok(())
}

/// The rollback watchdog (`kho/ABI.md` §5.2): with `on`, this CPU's
/// hypervisor timer (PPI 26) becomes a Group 0 interrupt, which a GIC
/// with one security state signals as FIQ (IHI 0069H §4.6): a new image
/// keeps FIQs unmasked until it commits, so one that hangs is interrupted
/// at the deadline and gives the machine back. Off: Group 1 again, as
/// `init_cpu` leaves it.
pub fn timer_as_fiq(mpidr: u64, on: bool) {
    let Some(rd) = my_redistributor(mpidr) else { return };
    let sgi = rd + GICR_SGI_FRAME;
    let group = read32(sgi + GICR_IGROUPR0);
    let timer = 1u32 << PPI_HYP_TIMER;
    write32(sgi + GICR_IGROUPR0, if on { group & !timer } else { group | timer });
    if on {
        let d = GICD_BASE.load(Ordering::Relaxed) as usize;
        write32(d + GICD_CTLR, read32(d + GICD_CTLR) | GICD_CTLR_ENABLE_GRP0);
        while read32(d + GICD_CTLR) & GICD_CTLR_RWP != 0 {
            core::hint::spin_loop();
        }
    }
    // SAFETY: enables or disables Group 0 at this CPU's interface (IHI
    // 0069H §12.2.13); only PPI 26 is ever Group 0.
    unsafe { asm!("msr icc_igrpen0_el1, {0}", "isb", in(reg) u64::from(on), options(nomem, nostack)) };
}

/// Acknowledges the highest-priority pending interrupt (INTID, or >= 1020).
pub fn ack() -> u32 {
    let v: u64;
    // SAFETY: reading ICC_IAR1_EL1 acknowledges an interrupt; the caller
    // ends it with `end`.
    unsafe { asm!("mrs {0}, icc_iar1_el1", out(reg) v, options(nostack)) };
    (v & 0xff_ffff) as u32
}

/// Drops priority and deactivates (ICC_CTLR_EL1.EOImode = 0).
pub fn end(intid: u32) {
    // SAFETY: ends an interrupt this CPU acknowledged.
    unsafe { asm!("msr icc_eoir1_el1, {0}", "isb", in(reg) u64::from(intid), options(nostack)) };
}

/// Asks for a maintenance interrupt once the guest has taken every
/// pending interrupt in the list registers (`more_waiting`: the virtual
/// GIC has more than fit), so they are refilled without waiting for the
/// next time slice.
pub fn refill_when_drained(more_waiting: bool) {
    let hcr = ICH_HCR_EN | if more_waiting { ICH_HCR_NPIE } else { 0 };
    // SAFETY: ICH_HCR_EL2 configures this CPU's virtual CPU interface; En
    // stays set, only the maintenance condition changes.
    unsafe { asm!("msr ich_hcr_el2, {0}", "isb", in(reg) hcr, options(nomem, nostack)) };
}

/// Sends the kick SGI to the physical CPU with affinity-0 `aff0`
/// (ICC_SGI1R_EL1: TargetList[15:0], INTID[27:24]).
pub fn kick(aff0: u64) {
    let v = (1u64 << (aff0 & 0xf)) | (u64::from(SGI_KICK) << 24);
    // SAFETY: generating an SGI has no memory effects.
    unsafe { asm!("dsb ishst", "msr icc_sgi1r_el1, {0}", "isb", in(reg) v, options(nostack)) };
}

/// Number of list registers implemented (ICH_VTR_EL2.ListRegs + 1).
pub fn lr_count() -> usize {
    let vtr: u64;
    // SAFETY: reading an ID-like register.
    unsafe { asm!("mrs {0}, ich_vtr_el2", out(reg) vtr, options(nomem, nostack)) };
    (((vtr & 0x1f) + 1) as usize).min(MAX_LRS)
}

macro_rules! lr_access {
    ($($n:literal => $reg:literal),*) => {
        pub fn read_lr(n: usize) -> u64 {
            let v: u64;
            match n {
                // SAFETY: reading a list register of the virtual interface.
                $($n => unsafe { asm!(concat!("mrs {0}, ", $reg), out(reg) v, options(nomem, nostack)) },)*
                _ => v = 0,
            }
            v
        }

        pub fn write_lr(n: usize, v: u64) {
            match n {
                // SAFETY: list registers only affect the guest's virtual interrupts.
                $($n => unsafe { asm!(concat!("msr ", $reg, ", {0}"), in(reg) v, options(nomem, nostack)) },)*
                _ => {}
            }
        }
    };
}

lr_access!(0 => "ich_lr0_el2", 1 => "ich_lr1_el2", 2 => "ich_lr2_el2", 3 => "ich_lr3_el2");

/// The guest's virtual CPU interface state, saved while another vCPU runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct VgicState {
    pub lrs: [u64; MAX_LRS],
    pub vmcr: u64,
    pub ap1r0: u64,
}

impl VgicState {
    pub fn save(&mut self) {
        for (i, lr) in self.lrs.iter_mut().enumerate().take(lr_count()) {
            *lr = read_lr(i);
        }
        // SAFETY: reading the virtual interface's control state.
        unsafe {
            asm!("mrs {0}, ich_vmcr_el2", "mrs {1}, ich_ap1r0_el2", out(reg) self.vmcr, out(reg) self.ap1r0,
                 options(nomem, nostack));
        }
    }

    pub fn restore(&self) {
        for (i, &lr) in self.lrs.iter().enumerate().take(lr_count()) {
            write_lr(i, lr);
        }
        // SAFETY: loading this vCPU's own virtual interface state.
        unsafe {
            asm!("msr ich_vmcr_el2, {0}", "msr ich_ap1r0_el2, {1}", in(reg) self.vmcr, in(reg) self.ap1r0,
                 options(nomem, nostack));
        }
    }
}
