//! The virtual GICv3 of an aarch64 partition (Arm IHI 0069H): a
//! distributor (§12.9) and one redistributor per vCPU (§12.10, §12.11),
//! emulated on the guest's trapped accesses, and the choice of what goes
//! into the hardware's list registers (§12.5.9 ICH_LR<n>_EL2) on every
//! entry. The CPU interface itself is the hardware's virtual one: the guest
//! acknowledges and ends interrupts through ICC_* without exiting.
//!
//! Model, and where it departs from a physical GIC:
//! - one security state (GICD_CTLR.DS = 1), affinity routing always on
//!   (ARE RAO/WI); every interrupt is delivered as Group 1 (the virtual CPU
//!   interface signals it as a virtual IRQ); IGROUPR is stored and read
//!   back;
//! - SGIs are permanently enabled (an implementation choice §12.11.7
//!   allows), PPIs and SPIs only once the guest enables them, and nothing
//!   is forwarded while GICD_CTLR.EnableGrp1 is clear;
//! - [`SPIS`] SPIs, INTIDs 32..64; no LPIs, no ITS;
//! - an interrupt in a list register is "in flight" here: the hardware
//!   holds its pending/active state until the guest completes it, and the
//!   next entry reads the list registers back before refilling them.
//!
//! Everything is pure state, host-tested; the image's arch code decodes
//! the trap, calls [`Vgic::read`]/[`Vgic::write`], and moves list register
//! values in and out.

use alloc::vec::Vec;

/// SPIs each partition has (INTIDs 32 to 32 + SPIS - 1).
pub const SPIS: usize = 32;
/// Private interrupts per vCPU: SGIs 0-15 and PPIs 16-31.
pub const PRIVATE: usize = 32;
/// Size of the distributor frame, and of each redistributor (RD and SGI
/// frames, 64 KiB each: §12.10).
pub const GICD_SIZE: u64 = 0x1_0000;
pub const GICR_STRIDE: u64 = 0x2_0000;
const GICR_SGI_FRAME: u64 = 0x1_0000;

/// Distributor registers (§12.9).
const GICD_CTLR: u64 = 0x0000;
const GICD_TYPER: u64 = 0x0004;
const GICD_IIDR: u64 = 0x0008;
const GICD_IGROUPR: u64 = 0x0080;
const GICD_ISENABLER: u64 = 0x0100;
const GICD_ICENABLER: u64 = 0x0180;
const GICD_ISPENDR: u64 = 0x0200;
const GICD_ICPENDR: u64 = 0x0280;
const GICD_ISACTIVER: u64 = 0x0300;
const GICD_ICACTIVER: u64 = 0x0380;
const GICD_IPRIORITYR: u64 = 0x0400;
const GICD_ICFGR: u64 = 0x0c00;
const GICD_IROUTER: u64 = 0x6000;
const GICD_PIDR2: u64 = 0xffe8;
/// GICD_CTLR: EnableGrp0 (0), EnableGrp1 (1), ARE (4), DS (6), RWP (31).
const CTLR_ENABLE_GRP0: u32 = 1 << 0;
const CTLR_ENABLE_GRP1: u32 = 1 << 1;
const CTLR_ARE: u32 = 1 << 4;
const CTLR_DS: u32 = 1 << 6;
/// GICD_TYPER: ITLinesNumber [4:0] (32 * (N + 1) INTIDs), IDbits [23:19]
/// (INTID bits - 1).
const TYPER_IT_LINES: u32 = (SPIS / 32) as u32;
const TYPER_ID_BITS: u32 = 9 << 19;
/// GICD_IIDR / GICR_IIDR: implementer 0x43b (Arm), product 0.
const IIDR: u32 = 0x0000_043b;
/// GICD_PIDR2 / GICR_PIDR2: ArchRev [7:4] = 3 (GICv3).
const PIDR2_GICV3: u32 = 0x3b;

/// Redistributor RD frame (§12.10) and SGI frame (§12.11) registers.
const GICR_CTLR: u64 = 0x0000;
const GICR_IIDR: u64 = 0x0004;
const GICR_TYPER: u64 = 0x0008;
const GICR_WAKER: u64 = 0x0014;
const GICR_PIDR2: u64 = 0xffe8;
/// GICR_TYPER: Processor_Number [23:8], Last [4], Affinity [63:32].
const GICR_TYPER_LAST: u64 = 1 << 4;
const GICR_TYPER_PROC_SHIFT: u32 = 8;
const GICR_TYPER_AFF_SHIFT: u32 = 32;
/// GICR_WAKER: ProcessorSleep (1), ChildrenAsleep (2).
const WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
const WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;

/// List register fields (§12.5.9): State [63:62], HW [61], Group [60],
/// Priority [55:48], vINTID [31:0].
const LR_STATE_SHIFT: u32 = 62;
const LR_STATE_MASK: u64 = 0b11;
const LR_STATE_PENDING: u64 = 0b01;
const LR_STATE_ACTIVE: u64 = 0b10;
const LR_GROUP1: u64 = 1 << 60;
const LR_PRIORITY_SHIFT: u32 = 48;
const LR_INTID_MASK: u64 = 0xffff_ffff;

/// One interrupt's state: the GIC's own per-INTID bits.
#[allow(clippy::struct_excessive_bools)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Irq {
    pub enabled: bool,
    pub pending: bool,
    pub active: bool,
    pub group1: bool,
    /// Edge-triggered (ICFGR 0b10) rather than level.
    pub edge: bool,
    pub priority: u8,
    /// In a list register: the hardware holds its state.
    pub in_lr: bool,
}

impl Irq {
    fn bits(self) -> u8 {
        u8::from(self.enabled)
            | u8::from(self.pending) << 1
            | u8::from(self.active) << 2
            | u8::from(self.group1) << 3
            | u8::from(self.edge) << 4
            | u8::from(self.in_lr) << 5
    }

    fn from_bits(bits: u8, priority: u8) -> Self {
        Self {
            enabled: bits & 1 != 0,
            pending: bits & 2 != 0,
            active: bits & 4 != 0,
            group1: bits & 8 != 0,
            edge: bits & 16 != 0,
            in_lr: bits & 32 != 0,
            priority,
        }
    }
}

/// A vCPU's redistributor: its SGIs and PPIs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redistributor {
    pub irqs: [Irq; PRIVATE],
    pub sleep: bool,
}

impl Default for Redistributor {
    fn default() -> Self {
        let mut irqs = [Irq::default(); PRIVATE];
        for (i, irq) in irqs.iter_mut().enumerate() {
            // SGIs: permanently enabled, edge (§12.11.7, §12.11.10).
            irq.enabled = i < 16;
            irq.edge = i < 16;
        }
        Self { irqs, sleep: true }
    }
}

/// Bytes of [`Redistributor::encode`].
pub const REDIST_BYTES: usize = 1 + 2 * PRIVATE;

impl Redistributor {
    /// The state as bytes for the vCPU context: sleep, then per INTID its
    /// flags and priority.
    pub fn encode(&self) -> [u8; REDIST_BYTES] {
        let mut out = [0u8; REDIST_BYTES];
        out[0] = u8::from(self.sleep);
        for (i, irq) in self.irqs.iter().enumerate() {
            out[1 + 2 * i] = irq.bits();
            out[2 + 2 * i] = irq.priority;
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes = bytes.get(..REDIST_BYTES)?;
        let mut r = Self { sleep: bytes[0] != 0, ..Self::default() };
        for (i, irq) in r.irqs.iter_mut().enumerate() {
            *irq = Irq::from_bits(bytes[1 + 2 * i], bytes[2 + 2 * i]);
        }
        Some(r)
    }
}

/// The distributor: its control register and the SPIs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Distributor {
    pub ctlr: u32,
    pub spis: [Irq; SPIS],
    /// IROUTER of each SPI: the target vCPU's Aff0 (Interrupt_Routing_Mode
    /// 1, "any", is stored as bit 31 and delivered to vCPU 0).
    pub route: [u32; SPIS],
}

impl Default for Distributor {
    fn default() -> Self {
        Self { ctlr: 0, spis: [Irq::default(); SPIS], route: [0; SPIS] }
    }
}

/// Bytes of [`Distributor::encode`].
pub const DIST_BYTES: usize = 4 + 6 * SPIS;

impl Distributor {
    /// The state as bytes for the handover record: CTLR, then per SPI its
    /// flags, priority and route.
    pub fn encode(&self) -> [u8; DIST_BYTES] {
        let mut out = [0u8; DIST_BYTES];
        out[..4].copy_from_slice(&self.ctlr.to_le_bytes());
        for (i, irq) in self.spis.iter().enumerate() {
            let at = 4 + 6 * i;
            out[at] = irq.bits();
            out[at + 1] = irq.priority;
            out[at + 2..at + 6].copy_from_slice(&self.route[i].to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes = bytes.get(..DIST_BYTES)?;
        let mut d = Self { ctlr: u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]), ..Self::default() };
        for i in 0..SPIS {
            let at = 4 + 6 * i;
            d.spis[i] = Irq::from_bits(bytes[at], bytes[at + 1]);
            d.route[i] = u32::from_le_bytes([bytes[at + 2], bytes[at + 3], bytes[at + 4], bytes[at + 5]]);
        }
        Some(d)
    }
}

/// Where a trapped access landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    Distributor {
        offset: u64,
    },
    /// Redistributor of vCPU `vcpu`; `offset` within its 128 KiB.
    Redistributor {
        vcpu: usize,
        offset: u64,
    },
}

/// Decodes a guest-physical address against the partition's frames.
pub fn frame(ipa: u64, distributor: u64, redistributors: u64, vcpus: usize) -> Option<Frame> {
    if (distributor..distributor + GICD_SIZE).contains(&ipa) {
        return Some(Frame::Distributor { offset: ipa - distributor });
    }
    let off = ipa.checked_sub(redistributors)?;
    let vcpu = usize::try_from(off / GICR_STRIDE).ok()?;
    (vcpu < vcpus).then_some(Frame::Redistributor { vcpu, offset: off % GICR_STRIDE })
}

/// Which interrupts a guest write made deliverable: the arch code kicks
/// the vCPUs whose bit is set.
pub type Wakeups = u64;

/// Register-array helpers: which INTIDs a 32-bit bitmap register at
/// `offset` from `base` covers.
fn bitmap_index(offset: u64, base: u64) -> Option<usize> {
    (offset >= base && offset < base + 0x80).then(|| ((offset - base) / 4) as usize * 32)
}

/// A partition's virtual GICv3.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vgic {
    pub dist: Distributor,
    pub cpus: Vec<Redistributor>,
}

impl Vgic {
    pub fn new(vcpus: usize) -> Self {
        Self { dist: Distributor::default(), cpus: alloc::vec![Redistributor::default(); vcpus] }
    }

    /// The GIC an image without a virtual GIC offered (the register frames
    /// read as zero and every interrupt was injected): the distributor on,
    /// the redistributors awake, every interrupt enabled in Group 1. Used
    /// when a handover from such an image has no `vgic` record.
    pub fn permissive(vcpus: usize) -> Self {
        let mut g = Self::new(vcpus);
        g.dist.ctlr = CTLR_ENABLE_GRP1;
        for irq in &mut g.dist.spis {
            irq.enabled = true;
            irq.group1 = true;
        }
        for cpu in &mut g.cpus {
            cpu.sleep = false;
            for irq in &mut cpu.irqs {
                irq.enabled = true;
                irq.group1 = true;
            }
        }
        g
    }

    /// The whole state as bytes (distributor, then each redistributor) in
    /// `out`; the length used, or `None` if `out` is too small.
    pub fn encode_into(&self, out: &mut [u8]) -> Option<usize> {
        let len = DIST_BYTES + REDIST_BYTES * self.cpus.len();
        let out = out.get_mut(..len)?;
        out[..DIST_BYTES].copy_from_slice(&self.dist.encode());
        for (chunk, cpu) in out[DIST_BYTES..].chunks_exact_mut(REDIST_BYTES).zip(&self.cpus) {
            chunk.copy_from_slice(&cpu.encode());
        }
        Some(len)
    }

    /// The state [`Self::encode_into`] wrote, for `vcpus` vCPUs.
    pub fn decode(bytes: &[u8], vcpus: usize) -> Option<Self> {
        let dist = Distributor::decode(bytes)?;
        let rest = bytes.get(DIST_BYTES..DIST_BYTES + REDIST_BYTES * vcpus)?;
        let cpus = rest.chunks_exact(REDIST_BYTES).map(Redistributor::decode).collect::<Option<Vec<_>>>()?;
        Some(Self { dist, cpus })
    }

    fn irq_mut(&mut self, vcpu: usize, intid: usize) -> Option<&mut Irq> {
        if intid < PRIVATE {
            self.cpus.get_mut(vcpu)?.irqs.get_mut(intid)
        } else {
            self.dist.spis.get_mut(intid - PRIVATE)
        }
    }

    fn irq(&self, vcpu: usize, intid: usize) -> Option<Irq> {
        if intid < PRIVATE {
            self.cpus.get(vcpu)?.irqs.get(intid).copied()
        } else {
            self.dist.spis.get(intid - PRIVATE).copied()
        }
    }

    /// The vCPU an SPI is routed to.
    pub fn spi_target(&self, intid: usize) -> usize {
        let route = self.dist.route.get(intid.wrapping_sub(PRIVATE)).copied().unwrap_or(0);
        let aff0 = (route & 0xff) as usize;
        if route & (1 << 31) != 0 || aff0 >= self.cpus.len() {
            0
        } else {
            aff0
        }
    }

    /// Makes private interrupt `intid` of `vcpu` pending (an SGI sent to
    /// it, its timer firing).
    pub fn set_private_pending(&mut self, vcpu: usize, intid: usize) {
        if let Some(irq) = self.cpus.get_mut(vcpu).and_then(|c| c.irqs.get_mut(intid)) {
            irq.pending = true;
        }
    }

    /// Makes SPI `intid` pending; returns the vCPU it goes to.
    pub fn set_spi_pending(&mut self, intid: usize) -> Option<usize> {
        let target = self.spi_target(intid);
        let irq = self.dist.spis.get_mut(intid.checked_sub(PRIVATE)?)?;
        irq.pending = true;
        Some(target)
    }

    /// Whether `irq` may be signalled now.
    fn deliverable(&self, vcpu: usize, irq: Irq) -> bool {
        irq.pending
            && irq.enabled
            && !irq.in_lr
            && self.dist.ctlr & CTLR_ENABLE_GRP1 != 0
            && self.cpus.get(vcpu).is_some_and(|c| !c.sleep)
    }

    /// Whether `vcpu` has an interrupt to be signalled (a waiting vCPU
    /// wakes for it).
    pub fn has_deliverable(&self, vcpu: usize) -> bool {
        let private = self.cpus.get(vcpu).is_some_and(|c| c.irqs.iter().any(|&i| self.deliverable(vcpu, i)));
        private
            || self
                .dist
                .spis
                .iter()
                .enumerate()
                .any(|(k, &i)| self.spi_target(PRIVATE + k) == vcpu && self.deliverable(vcpu, i))
    }

    /// Reads back the list registers of `vcpu` after it ran: an interrupt
    /// whose register is empty was completed by the guest; one still
    /// active stays in flight.
    pub fn sync_lrs(&mut self, vcpu: usize, lrs: &[u64]) {
        let live: Vec<(usize, u64)> = lrs
            .iter()
            .filter(|&&lr| (lr >> LR_STATE_SHIFT) & LR_STATE_MASK != 0)
            .map(|&lr| ((lr & LR_INTID_MASK) as usize, (lr >> LR_STATE_SHIFT) & LR_STATE_MASK))
            .collect();
        for intid in 0..PRIVATE + SPIS {
            let mine = intid < PRIVATE || self.spi_target(intid) == vcpu;
            if !mine {
                continue;
            }
            let state = live.iter().find(|&&(i, _)| i == intid).map(|&(_, s)| s);
            if let Some(irq) = self.irq_mut(vcpu, intid) {
                if irq.in_lr {
                    irq.active = state.is_some_and(|s| s & LR_STATE_ACTIVE != 0);
                    irq.in_lr = state.is_some();
                }
            }
        }
    }

    /// Fills the free list registers of `vcpu` (value 0) with its
    /// deliverable interrupts, highest priority (lowest value) first.
    /// Returns whether any interrupt is still waiting for a register.
    pub fn fill_lrs(&mut self, vcpu: usize, lrs: &mut [u64]) -> bool {
        let mut candidates: Vec<(u8, usize)> = (0..PRIVATE + SPIS)
            .filter(|&intid| intid < PRIVATE || self.spi_target(intid) == vcpu)
            .filter_map(|intid| {
                self.irq(vcpu, intid).filter(|&i| self.deliverable(vcpu, i)).map(|i| (i.priority, intid))
            })
            .collect();
        candidates.sort_unstable();
        let mut next = candidates.into_iter();
        for lr in lrs.iter_mut().filter(|lr| (**lr >> LR_STATE_SHIFT) & LR_STATE_MASK == 0) {
            let Some((priority, intid)) = next.next() else { return false };
            *lr = (LR_STATE_PENDING << LR_STATE_SHIFT)
                | LR_GROUP1
                | (u64::from(priority) << LR_PRIORITY_SHIFT)
                | intid as u64;
            if let Some(irq) = self.irq_mut(vcpu, intid) {
                irq.in_lr = true;
                if irq.edge || intid < PRIVATE {
                    // The list register holds the pending state now.
                    irq.pending = false;
                }
            }
        }
        next.next().is_some()
    }

    /// A guest read of `width` bytes (1, 2, 4 or 8) at `frame`, from vCPU
    /// `vcpu`. Registers that do not exist read as zero.
    pub fn read(&self, frame: Frame, width: u8) -> u64 {
        match frame {
            Frame::Distributor { offset } => self.read_dist(offset, width),
            Frame::Redistributor { vcpu, offset } => self.read_redist(vcpu, offset, width),
        }
    }

    /// A guest write; returns the vCPUs (bit per index) that may now have
    /// something to take.
    pub fn write(&mut self, frame: Frame, width: u8, value: u64) -> Wakeups {
        match frame {
            Frame::Distributor { offset } => self.write_dist(offset, width, value),
            Frame::Redistributor { vcpu, offset } => self.write_redist(vcpu, offset, width, value),
        }
    }

    fn read_bits(&self, vcpu: usize, first: usize, get: impl Fn(Irq) -> bool) -> u64 {
        (0..32).filter(|&k| self.irq(vcpu, first + k).is_some_and(&get)).fold(0, |acc, k| acc | 1 << k)
    }

    fn write_bits(&mut self, vcpu: usize, first: usize, value: u64, set: impl Fn(&mut Irq)) {
        for k in (0..32).filter(|&k| value & (1 << k) != 0) {
            if let Some(irq) = self.irq_mut(vcpu, first + k) {
                set(irq);
            }
        }
    }

    /// The shared register arrays (IGROUPR, I[SC]ENABLER, I[SC]PENDR,
    /// I[SC]ACTIVER, IPRIORITYR, ICFGR) at `offset` for INTIDs based at
    /// `vcpu`'s view.
    fn read_array(&self, vcpu: usize, offset: u64, width: u8) -> Option<u64> {
        if let Some(first) = bitmap_index(offset, GICD_IGROUPR) {
            return Some(self.read_bits(vcpu, first, |i| i.group1));
        }
        for base in [GICD_ISENABLER, GICD_ICENABLER] {
            if let Some(first) = bitmap_index(offset, base) {
                return Some(self.read_bits(vcpu, first, |i| i.enabled));
            }
        }
        for base in [GICD_ISPENDR, GICD_ICPENDR] {
            if let Some(first) = bitmap_index(offset, base) {
                return Some(self.read_bits(vcpu, first, |i| i.pending || i.in_lr && !i.active));
            }
        }
        for base in [GICD_ISACTIVER, GICD_ICACTIVER] {
            if let Some(first) = bitmap_index(offset, base) {
                return Some(self.read_bits(vcpu, first, |i| i.active));
            }
        }
        if (GICD_IPRIORITYR..GICD_IPRIORITYR + 0x400).contains(&offset) {
            let first = (offset - GICD_IPRIORITYR) as usize;
            return Some(
                (0..usize::from(width.min(8)))
                    .fold(0, |acc, k| acc | u64::from(self.irq(vcpu, first + k).map_or(0, |i| i.priority)) << (8 * k)),
            );
        }
        if (GICD_ICFGR..GICD_ICFGR + 0x100).contains(&offset) {
            let first = ((offset - GICD_ICFGR) / 4) as usize * 16;
            return Some(
                (0..16).fold(0, |acc, k| {
                    acc | u64::from(self.irq(vcpu, first + k).is_some_and(|i| i.edge)) << (2 * k + 1)
                }),
            );
        }
        None
    }

    fn write_array(&mut self, vcpu: usize, offset: u64, width: u8, value: u64) -> Option<Wakeups> {
        let all = (1u64 << self.cpus.len()) - 1;
        if let Some(first) = bitmap_index(offset, GICD_IGROUPR) {
            for k in 0..32 {
                if let Some(irq) = self.irq_mut(vcpu, first + k) {
                    irq.group1 = value & (1 << k) != 0;
                }
            }
            return Some(0);
        }
        if let Some(first) = bitmap_index(offset, GICD_ISENABLER) {
            self.write_bits(vcpu, first, value, |i| i.enabled = true);
            return Some(all);
        }
        if let Some(first) = bitmap_index(offset, GICD_ICENABLER) {
            // SGIs stay enabled (§12.11.7: an implementation may fix them).
            let value = if first == 0 { value & !0xffff } else { value };
            self.write_bits(vcpu, first, value, |i| i.enabled = false);
            return Some(0);
        }
        if let Some(first) = bitmap_index(offset, GICD_ISPENDR) {
            self.write_bits(vcpu, first, value, |i| i.pending = true);
            return Some(all);
        }
        if let Some(first) = bitmap_index(offset, GICD_ICPENDR) {
            self.write_bits(vcpu, first, value, |i| i.pending = false);
            return Some(0);
        }
        if let Some(first) = bitmap_index(offset, GICD_ISACTIVER) {
            self.write_bits(vcpu, first, value, |i| i.active = true);
            return Some(0);
        }
        if let Some(first) = bitmap_index(offset, GICD_ICACTIVER) {
            self.write_bits(vcpu, first, value, |i| i.active = false);
            return Some(all);
        }
        if (GICD_IPRIORITYR..GICD_IPRIORITYR + 0x400).contains(&offset) {
            let first = (offset - GICD_IPRIORITYR) as usize;
            for k in 0..usize::from(width.min(8)) {
                if let Some(irq) = self.irq_mut(vcpu, first + k) {
                    irq.priority = (value >> (8 * k)) as u8;
                }
            }
            return Some(0);
        }
        if (GICD_ICFGR..GICD_ICFGR + 0x100).contains(&offset) {
            let first = ((offset - GICD_ICFGR) / 4) as usize * 16;
            for k in 0..16 {
                // SGIs are edge-triggered, read-only (§12.11.10).
                if first + k >= 16 {
                    if let Some(irq) = self.irq_mut(vcpu, first + k) {
                        irq.edge = value & (1 << (2 * k + 1)) != 0;
                    }
                }
            }
            return Some(0);
        }
        None
    }

    fn read_dist(&self, offset: u64, width: u8) -> u64 {
        match offset {
            GICD_CTLR => u64::from(self.dist.ctlr | CTLR_ARE | CTLR_DS),
            GICD_TYPER => u64::from(TYPER_IT_LINES | TYPER_ID_BITS),
            GICD_IIDR => u64::from(IIDR),
            GICD_PIDR2 => u64::from(PIDR2_GICV3),
            o if (GICD_IROUTER + 8 * PRIVATE as u64..GICD_IROUTER + 8 * (PRIVATE + SPIS) as u64).contains(&o) => {
                let spi = ((o - GICD_IROUTER) / 8) as usize - PRIVATE;
                let route = u64::from(self.dist.route[spi]);
                // Aff0 in [7:0], Interrupt_Routing_Mode in bit 31.
                let word = (route & 0xff) | ((route >> 31) << 31);
                if o % 8 == 4 {
                    0
                } else {
                    word
                }
            }
            // The private INTIDs are the redistributors' when ARE is set:
            // RAZ/WI here (§12.9).
            o if Self::private_in_dist(o) => 0,
            o => self.read_array(0, o, width).unwrap_or(0),
        }
    }

    /// Offsets of the distributor's arrays that would name INTIDs 0-31.
    fn private_in_dist(offset: u64) -> bool {
        [GICD_IGROUPR, GICD_ISENABLER, GICD_ICENABLER, GICD_ISPENDR, GICD_ICPENDR, GICD_ISACTIVER, GICD_ICACTIVER]
            .contains(&offset)
            || (GICD_IPRIORITYR..GICD_IPRIORITYR + 32).contains(&offset)
            || (GICD_ICFGR..GICD_ICFGR + 8).contains(&offset)
    }

    fn write_dist(&mut self, offset: u64, width: u8, value: u64) -> Wakeups {
        let all = (1u64 << self.cpus.len()) - 1;
        match offset {
            GICD_CTLR => {
                self.dist.ctlr = (value as u32) & (CTLR_ENABLE_GRP0 | CTLR_ENABLE_GRP1);
                all
            }
            o if (GICD_IROUTER + 8 * PRIVATE as u64..GICD_IROUTER + 8 * (PRIVATE + SPIS) as u64).contains(&o) => {
                let spi = ((o - GICD_IROUTER) / 8) as usize - PRIVATE;
                if o % 8 == 0 {
                    self.dist.route[spi] = (value as u32) & (0xff | 1 << 31);
                }
                all
            }
            o if Self::private_in_dist(o) => 0,
            o => self.write_array(0, o, width, value).unwrap_or(0),
        }
    }

    fn read_redist(&self, vcpu: usize, offset: u64, width: u8) -> u64 {
        let Some(cpu) = self.cpus.get(vcpu) else { return 0 };
        if offset >= GICR_SGI_FRAME {
            let o = offset - GICR_SGI_FRAME;
            // Only the first register of each array exists here.
            let first_only =
                o % 0x80 < 4 || (GICD_IPRIORITYR..GICD_IPRIORITYR + 32).contains(&o) || o == GICD_ICFGR + 4;
            return if first_only || o == GICD_ICFGR { self.read_array(vcpu, o, width).unwrap_or(0) } else { 0 };
        }
        match offset {
            GICR_CTLR => 0,
            GICR_IIDR => u64::from(IIDR),
            GICR_TYPER => {
                let last = if vcpu + 1 == self.cpus.len() { GICR_TYPER_LAST } else { 0 };
                ((vcpu as u64) << GICR_TYPER_AFF_SHIFT) | ((vcpu as u64) << GICR_TYPER_PROC_SHIFT) | last
            }
            o if o == GICR_TYPER + 4 => vcpu as u64,
            GICR_WAKER if cpu.sleep => u64::from(WAKER_PROCESSOR_SLEEP | WAKER_CHILDREN_ASLEEP),
            GICR_PIDR2 => u64::from(PIDR2_GICV3),
            _ => 0,
        }
    }

    fn write_redist(&mut self, vcpu: usize, offset: u64, width: u8, value: u64) -> Wakeups {
        if vcpu >= self.cpus.len() {
            return 0;
        }
        let me = 1u64 << vcpu;
        if offset >= GICR_SGI_FRAME {
            let o = offset - GICR_SGI_FRAME;
            let first_only =
                o % 0x80 < 4 || (GICD_IPRIORITYR..GICD_IPRIORITYR + 32).contains(&o) || o == GICD_ICFGR + 4;
            if first_only || o == GICD_ICFGR {
                return self.write_array(vcpu, o, width, value).map_or(0, |w| w & me);
            }
            return 0;
        }
        if offset == GICR_WAKER {
            self.cpus[vcpu].sleep = value as u32 & WAKER_PROCESSOR_SLEEP != 0;
            return me;
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GICD: u64 = 0x0800_0000;
    const GICR: u64 = 0x080a_0000;

    fn d(offset: u64) -> Frame {
        Frame::Distributor { offset }
    }

    fn r(vcpu: usize, offset: u64) -> Frame {
        Frame::Redistributor { vcpu, offset }
    }

    /// What Linux's GICv3 driver and our test guests do at boot.
    fn initialised(vcpus: usize) -> Vgic {
        let mut g = Vgic::new(vcpus);
        g.write(d(GICD_CTLR), 4, u64::from(CTLR_ENABLE_GRP1));
        for v in 0..vcpus {
            g.write(r(v, GICR_WAKER), 4, 0);
            g.write(r(v, GICR_SGI_FRAME + GICD_IGROUPR), 4, 0xffff_ffff);
            g.write(r(v, GICR_SGI_FRAME + GICD_ISENABLER), 4, 1 << 27);
        }
        g
    }

    #[test]
    fn frames_decode_by_vcpu() {
        assert_eq!(frame(GICD + 0x100, GICD, GICR, 2), Some(d(0x100)));
        assert_eq!(frame(GICR + GICR_STRIDE + 0x10080, GICD, GICR, 2), Some(r(1, 0x10080)));
        assert_eq!(frame(GICR + 2 * GICR_STRIDE, GICD, GICR, 2), None, "past the last redistributor");
        assert_eq!(frame(0x0900_0000, GICD, GICR, 2), None);
    }

    #[test]
    fn redistributors_describe_themselves() {
        let g = Vgic::new(3);
        for v in 0..3 {
            let typer = g.read(r(v, GICR_TYPER), 8);
            assert_eq!(typer >> 32, v as u64, "affinity of vCPU {v}");
            assert_eq!(typer & GICR_TYPER_LAST != 0, v == 2, "Last only on the final one");
            assert_eq!((typer >> 8) & 0xffff, v as u64);
            assert_eq!(g.read(r(v, GICR_TYPER + 4), 4), v as u64, "upper half by a 32-bit read");
            assert_eq!(g.read(r(v, GICR_PIDR2), 4) >> 4 & 0xf, 3);
        }
        let mut g = g;
        assert_eq!(g.read(r(1, GICR_WAKER), 4), u64::from(WAKER_PROCESSOR_SLEEP | WAKER_CHILDREN_ASLEEP));
        g.write(r(1, GICR_WAKER), 4, 0);
        assert_eq!(g.read(r(1, GICR_WAKER), 4), 0, "awake: ChildrenAsleep clears at once");
    }

    #[test]
    fn distributor_identifies_as_gicv3_with_affinity_routing() {
        let mut g = Vgic::new(1);
        assert_eq!(g.read(d(GICD_TYPER), 4) & 0x1f, (SPIS / 32) as u64);
        assert_eq!((g.read(d(GICD_TYPER), 4) >> 19) & 0x1f, 9);
        assert_eq!(g.read(d(GICD_PIDR2), 4), 0x3b);
        g.write(d(GICD_CTLR), 4, 0xffff_ffff);
        assert_eq!(g.read(d(GICD_CTLR), 4), u64::from(CTLR_ENABLE_GRP0 | CTLR_ENABLE_GRP1 | CTLR_ARE | CTLR_DS));
        g.write(d(GICD_CTLR), 4, 0);
        assert_eq!(g.read(d(GICD_CTLR), 4) as u32 & CTLR_ARE, CTLR_ARE, "ARE is RAO/WI");
    }

    #[test]
    fn state_written_reads_back_and_private_state_is_per_vcpu() {
        let mut g = initialised(2);
        g.write(r(1, GICR_SGI_FRAME + GICD_IPRIORITYR + 24), 4, 0xa0b0_c0d0);
        assert_eq!(g.read(r(1, GICR_SGI_FRAME + GICD_IPRIORITYR + 24), 4), 0xa0b0_c0d0);
        assert_eq!(g.read(r(1, GICR_SGI_FRAME + GICD_IPRIORITYR + 27), 1), 0xa0);
        assert_eq!(g.read(r(0, GICR_SGI_FRAME + GICD_IPRIORITYR + 24), 4), 0, "vCPU 0 untouched");
        g.write(d(GICD_ISENABLER + 4), 4, 0b101);
        assert_eq!(g.read(d(GICD_ISENABLER + 4), 4), 0b101);
        g.write(d(GICD_ICENABLER + 4), 4, 0b1);
        assert_eq!(g.read(d(GICD_ISENABLER + 4), 4), 0b100);
        g.write(d(GICD_ISPENDR + 4), 4, 0b10);
        assert_eq!(g.read(d(GICD_ISPENDR + 4), 4), 0b10);
        // SGIs stay enabled; the distributor's view of private INTIDs is RAZ/WI.
        g.write(r(0, GICR_SGI_FRAME + GICD_ICENABLER), 4, 0xffff_ffff);
        assert_eq!(g.read(r(0, GICR_SGI_FRAME + GICD_ISENABLER), 4), 0xffff);
        g.write(d(GICD_ISENABLER), 4, 0xffff_ffff);
        assert_eq!(g.read(d(GICD_ISENABLER), 4), 0);
        // IROUTER of SPI 33 to vCPU 1, read back; a target past the last
        // vCPU falls back to vCPU 0.
        g.write(d(GICD_IROUTER + 8 * 33), 8, 1);
        assert_eq!(g.read(d(GICD_IROUTER + 8 * 33), 8), 1);
        assert_eq!(g.spi_target(33), 1);
        g.write(d(GICD_IROUTER + 8 * 33), 8, 7);
        assert_eq!(g.spi_target(33), 0);
        // Nonsense offsets read as zero and change nothing.
        let before = g.clone();
        g.write(d(0x7ff0), 4, u64::MAX);
        g.write(r(5, GICR_WAKER), 4, 0);
        assert_eq!(g, before);
        assert_eq!(g.read(d(0x7ff0), 4), 0);
    }

    #[test]
    fn list_registers_take_the_highest_priority_first_and_the_rest_wait() {
        let mut g = initialised(1);
        for (intid, prio) in [(1usize, 0x80u8), (2, 0x10), (3, 0x40), (27, 0x20)] {
            g.cpus[0].irqs[intid].priority = prio;
            g.set_private_pending(0, intid);
        }
        let mut lrs = [0u64; 2];
        assert!(g.fill_lrs(0, &mut lrs), "two wait for a free register");
        let intids: Vec<u64> = lrs.iter().map(|lr| lr & LR_INTID_MASK).collect();
        assert_eq!(intids, [2, 27]);
        assert_eq!(lrs[0] >> LR_STATE_SHIFT, LR_STATE_PENDING);
        assert_eq!((lrs[1] >> LR_PRIORITY_SHIFT) & 0xff, 0x20);
        // The guest completes INTID 2 (its register empties); 27 is active.
        lrs[0] = 0;
        lrs[1] = (lrs[1] & !(LR_STATE_MASK << LR_STATE_SHIFT)) | (LR_STATE_ACTIVE << LR_STATE_SHIFT);
        g.sync_lrs(0, &lrs);
        assert!(!g.cpus[0].irqs[2].in_lr && g.cpus[0].irqs[27].active);
        assert!(g.fill_lrs(0, &mut lrs));
        assert_eq!(lrs[0] & LR_INTID_MASK, 3, "next by priority");
        lrs = [0; 2];
        g.sync_lrs(0, &lrs);
        assert!(!g.fill_lrs(0, &mut lrs));
        assert_eq!(lrs[0] & LR_INTID_MASK, 1);
        assert!(!g.has_deliverable(0));
    }

    #[test]
    fn an_upgrade_from_an_image_without_a_vgic_keeps_interrupts_flowing() {
        let mut g = Vgic::permissive(2);
        g.set_private_pending(1, 27);
        g.set_private_pending(1, 3);
        assert!(g.has_deliverable(1), "the timer and SGIs go on without the guest touching the GIC");
        let mut lrs = [0u64; 4];
        g.fill_lrs(1, &mut lrs);
        assert_eq!(lrs.iter().filter(|&&l| l != 0).count(), 2);
    }

    #[test]
    fn nothing_is_delivered_disabled_asleep_or_with_the_distributor_off() {
        let mut g = Vgic::new(1);
        g.set_private_pending(0, 27);
        g.set_private_pending(0, 3);
        assert!(!g.has_deliverable(0), "asleep, distributor off, PPI disabled");
        g.write(r(0, GICR_WAKER), 4, 0);
        assert!(!g.has_deliverable(0), "distributor off");
        g.write(d(GICD_CTLR), 4, u64::from(CTLR_ENABLE_GRP1));
        let mut lrs = [0u64; 4];
        g.fill_lrs(0, &mut lrs);
        assert_eq!(lrs.iter().filter(|&&l| l != 0).count(), 1, "the SGI only; PPI 27 is not enabled");
        g.write(r(0, GICR_SGI_FRAME + GICD_ISENABLER), 4, 1 << 27);
        assert!(g.has_deliverable(0));
    }

    #[test]
    fn spis_go_to_their_routed_vcpu() {
        let mut g = initialised(2);
        g.write(d(GICD_ISENABLER + 4), 4, 1 << 1);
        g.write(d(GICD_IROUTER + 8 * 33), 8, 1);
        assert_eq!(g.set_spi_pending(33), Some(1));
        assert_eq!(g.set_spi_pending(200), None);
        let mut lrs0 = [0u64; 4];
        g.fill_lrs(0, &mut lrs0);
        assert!(lrs0.iter().all(|&l| l == 0), "not vCPU 0's");
        let mut lrs1 = [0u64; 4];
        g.fill_lrs(1, &mut lrs1);
        assert_eq!(lrs1[0] & LR_INTID_MASK, 33);
    }

    #[test]
    fn state_round_trips_through_its_bytes() {
        let mut g = initialised(2);
        g.write(d(GICD_IROUTER + 8 * 40), 8, 1);
        g.write(d(GICD_ISENABLER + 4), 4, 0xdead_beef);
        g.cpus[1].irqs[27].priority = 0x42;
        g.set_private_pending(1, 27);
        let d2 = Distributor::decode(&g.dist.encode()).expect("distributor");
        assert_eq!(d2, g.dist);
        let r1 = Redistributor::decode(&g.cpus[1].encode()).expect("redistributor");
        assert_eq!(r1, g.cpus[1]);
        assert!(Distributor::decode(&[0; 3]).is_none());
        let mut buf = [0u8; 1024];
        let n = g.encode_into(&mut buf).expect("fits");
        assert_eq!(Vgic::decode(&buf[..n], 2), Some(g.clone()));
        assert_eq!(Vgic::decode(&buf[..n - 1], 2), None, "truncated");
        assert!(g.encode_into(&mut [0u8; 10]).is_none());
        assert!(Redistributor::decode(&[0; 10]).is_none());
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn access() -> impl Strategy<Value = (bool, usize, u64, u8, u64)> {
            // Offsets cluster on the registers, with some anywhere.
            let offset = prop_oneof![0..0x1000u64, 0x6000..0x6200u64, 0x1_0000..0x1_1000u64, 0..0x2_0000u64];
            (any::<bool>(), 0..4usize, offset, prop_oneof![Just(1u8), Just(2), Just(4), Just(8), 0..16u8], any::<u64>())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            /// A guest can write anything anywhere in its GIC frames, and
            /// fill and complete list registers in any order: nothing
            /// panics, state stays within the model, and it survives its
            /// own encoding.
            #[test]
            fn arbitrary_guest_accesses_keep_the_model_sound(
                accesses in proptest::collection::vec(access(), 0..64),
                vcpus in 1..4usize,
                lr_ops in proptest::collection::vec((0..4usize, any::<u64>()), 0..16),
            ) {
                let mut g = Vgic::new(vcpus);
                for (dist, vcpu, offset, width, value) in accesses {
                    let frame = if dist {
                        Frame::Distributor { offset: offset % GICD_SIZE }
                    } else {
                        Frame::Redistributor { vcpu, offset: offset % GICR_STRIDE }
                    };
                    let wake = g.write(frame, width, value);
                    prop_assert_eq!(wake >> vcpus, 0, "wakes only vCPUs that exist");
                    let _ = g.read(frame, width);
                }
                for (vcpu, lr) in lr_ops {
                    let vcpu = vcpu % vcpus;
                    let mut lrs = [lr, 0, 0, 0];
                    g.sync_lrs(vcpu, &lrs);
                    let _ = g.fill_lrs(vcpu, &mut lrs);
                    // What the model wrote (the first register is the
                    // guest's arbitrary value, left alone unless free).
                    for (k, l) in lrs.iter().enumerate().filter(|&(k, &l)| (l >> LR_STATE_SHIFT) & LR_STATE_MASK != 0 && (k > 0 || l != lr)) {
                        prop_assert!((l & LR_INTID_MASK) < (PRIVATE + SPIS) as u64, "only our INTIDs go out (register {})", k);
                    }
                }
                prop_assert_eq!(g.read(Frame::Distributor { offset: GICD_CTLR }, 4) as u32 & CTLR_ARE, CTLR_ARE);
                let mut buf = [0u8; 1024];
                let n = g.encode_into(&mut buf).expect("fits");
                prop_assert_eq!(Vgic::decode(&buf[..n], vcpus), Some(g));
            }

            /// Any bytes decode to a model or to nothing, never a panic.
            #[test]
            fn arbitrary_records_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..700), vcpus in 0..9usize) {
                let _ = Vgic::decode(&bytes, vcpus);
            }
        }
    }
}
