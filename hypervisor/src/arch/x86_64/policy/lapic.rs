//! A virtual local APIC in x2APIC mode (Intel SDM Vol. 3A ch. 11,
//! "Advanced Programmable Interrupt Controller"), as pure state the VM-exit
//! handlers drive: RDMSR/WRMSR of the x2APIC registers (§11.12.1.2,
//! Table 11-6), IA32_APIC_BASE and IA32_TSC_DEADLINE; the IRR/ISR
//! bookkeeping with priority classes (§11.8.3), EOI (§11.8.5); the timer in
//! one-shot, periodic and TSC-deadline modes (§11.5.4); IPIs through the
//! ICR and SELF_IPI (§11.6, §11.12.9-11). Time is a TSC value passed in:
//! the model never touches hardware. The timer counts at the TSC's rate
//! divided by the divide configuration (CPUID 0x4000_0010 EBX reports it).
//!
//! Misprogramming has one defined outcome each: a non-zero write to a
//! reserved bit, a write to a read-only register, a read of a write-only
//! one and any access to an address the x2APIC does not implement raise
//! #GP(0) (§11.12.1.3); vectors 0-15 are illegal: sent, they set ESR
//! "send illegal vector" and go nowhere, received, "receive illegal vector"
//! and are dropped (§11.5.3); IPIs to destinations that match no vCPU of
//! the partition are dropped. INIT and start-up IPIs (delivery modes 101b
//! and 110b) go to the caller, which runs the vCPUs' start-up protocol
//! (`startup`); NMI and SMI IPIs are not delivered. The APIC comes up
//! enabled in x2APIC mode,
//! as firmware may leave it (§11.12.5): leaving x2APIC mode (there is no
//! xAPIC MMIO page) is refused with #GP.

use super::GpFault;

/// MSR addresses (SDM Vol. 3A §11.12.1.2, Table 11-6; Vol. 4 Table 2-2).
pub mod msr {
    pub const IA32_APIC_BASE: u32 = 0x1b;
    pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
    pub const X2APIC_FIRST: u32 = 0x800;
    pub const X2APIC_LAST: u32 = 0x8ff;
    pub const ID: u32 = 0x802;
    pub const VERSION: u32 = 0x803;
    pub const TPR: u32 = 0x808;
    pub const PPR: u32 = 0x80a;
    pub const EOI: u32 = 0x80b;
    pub const LDR: u32 = 0x80d;
    pub const SVR: u32 = 0x80f;
    pub const ISR0: u32 = 0x810;
    pub const TMR0: u32 = 0x818;
    pub const IRR0: u32 = 0x820;
    pub const ESR: u32 = 0x828;
    pub const LVT_CMCI: u32 = 0x82f;
    pub const ICR: u32 = 0x830;
    pub const LVT_TIMER: u32 = 0x832;
    pub const LVT_THERMAL: u32 = 0x833;
    pub const LVT_PERFMON: u32 = 0x834;
    pub const LVT_LINT0: u32 = 0x835;
    pub const LVT_LINT1: u32 = 0x836;
    pub const LVT_ERROR: u32 = 0x837;
    pub const TIMER_INITIAL_COUNT: u32 = 0x838;
    pub const TIMER_CURRENT_COUNT: u32 = 0x839;
    pub const TIMER_DIVIDE: u32 = 0x83e;
    pub const SELF_IPI: u32 = 0x83f;
}

/// IA32_APIC_BASE (SDM Vol. 3A §11.4.4, Figure 11-5; §11.12.1): the
/// architectural base, BSP flag (8), x2APIC enable (10), global enable (11).
const APIC_BASE_DEFAULT: u64 = 0xfee0_0000;
const APIC_BASE_BSP: u64 = 1 << 8;
const APIC_BASE_EXTD: u64 = 1 << 10;
const APIC_BASE_EN: u64 = 1 << 11;
/// Bits 51:12 (the base) and the three flags; the rest is reserved.
const APIC_BASE_DEFINED: u64 = 0x000f_ffff_ffff_f000 | APIC_BASE_BSP | APIC_BASE_EXTD | APIC_BASE_EN;

/// Version register (§11.4.8, Figure 11-7): version 0x14 (integrated
/// APIC) in bits 7:0, Max LVT Entry (entries - 1) in bits 23:16.
const VERSION: u64 = 0x14 | (6 << 16);
/// LVT fields (§11.5.1, Figure 11-8): vector 7:0, delivery mode 10:8,
/// delivery status 12 (read-only), polarity 13, remote IRR 14 (read-only),
/// trigger mode 15, mask 16, timer mode 18:17.
const LVT_VECTOR: u32 = 0xff;
const LVT_DELIVERY_MODE: u32 = 0x7 << 8;
const LVT_POLARITY: u32 = 1 << 13;
const LVT_TRIGGER: u32 = 1 << 15;
const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_MODE_SHIFT: u32 = 17;
const LVT_TIMER_MODE: u32 = 0x3 << LVT_TIMER_MODE_SHIFT;
/// Writable bits of each LVT register, by register (Figure 11-8).
const LVT_TIMER_WRITABLE: u32 = LVT_VECTOR | LVT_MASKED | LVT_TIMER_MODE;
const LVT_LINT_WRITABLE: u32 = LVT_VECTOR | LVT_DELIVERY_MODE | LVT_POLARITY | LVT_TRIGGER | LVT_MASKED;
const LVT_ERROR_WRITABLE: u32 = LVT_VECTOR | LVT_MASKED;
const LVT_OTHER_WRITABLE: u32 = LVT_VECTOR | LVT_DELIVERY_MODE | LVT_MASKED;
/// SVR (§11.9, Figure 11-23): spurious vector 7:0, APIC software enable 8.
const SVR_VECTOR: u32 = 0xff;
const SVR_ENABLE: u32 = 1 << 8;
const SVR_RESET: u32 = 0xff;
/// TPR: priority in bits 7:0 (§11.8.3.1, Figure 11-18).
const TPR_WRITABLE: u32 = 0xff;
/// Divide configuration (§11.5.4, Figure 11-10): bits 0, 1 and 3.
const DIVIDE_WRITABLE: u32 = 0b1011;
/// ESR bits (§11.5.3, Figure 11-9).
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
/// ICR (§11.12.9, Figure 11-28): vector 7:0, delivery mode 10:8,
/// destination mode 11, level 14, trigger mode 15, shorthand 19:18,
/// destination 63:32; bits 12 (delivery status), 13, 17:16 and 31:20 are
/// reserved in x2APIC mode.
const ICR_WRITABLE: u64 = 0xffff_ffff_000c_cfff;
const ICR_DELIVERY_SHIFT: u32 = 8;
const ICR_DELIVERY_MASK: u64 = 0x7;
const ICR_LOGICAL: u64 = 1 << 11;
const ICR_SHORTHAND_SHIFT: u32 = 18;
const ICR_SHORTHAND_MASK: u64 = 0x3;
const ICR_DEST_SHIFT: u32 = 32;
/// Delivery modes (§11.6.1): fixed, lowest priority, INIT, start-up.
const DELIVERY_FIXED: u64 = 0;
const DELIVERY_LOWEST: u64 = 1;
const DELIVERY_INIT: u64 = 0b101;
const DELIVERY_STARTUP: u64 = 0b110;
/// ICR level (14) and trigger mode (15): an INIT with trigger mode level
/// and level de-assert is "INIT level de-assert", which the Pentium 4 and
/// later processors do not carry out (§11.6.1).
const ICR_LEVEL_ASSERT: u64 = 1 << 14;
const ICR_TRIGGER_LEVEL: u64 = 1 << 15;
/// The x2APIC broadcast destination (§11.12.9).
const BROADCAST: u32 = u32::MAX;
/// Vectors 0-15 are reserved for exceptions (§11.5.2).
const FIRST_LEGAL_VECTOR: u8 = 16;

/// The timer's mode (LVT timer bits 18:17, §11.5.4.1 Table 11-2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
}

impl TimerMode {
    fn of(lvt: u32) -> Option<Self> {
        match (lvt & LVT_TIMER_MODE) >> LVT_TIMER_MODE_SHIFT {
            0 => Some(Self::OneShot),
            1 => Some(Self::Periodic),
            2 => Some(Self::TscDeadline),
            _ => None,
        }
    }
}

/// Where an IPI goes, among the sender's partition (APIC ID = vCPU index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Physical x2APIC ID; [`BROADCAST`] is every vCPU.
    Physical(u32),
    /// Logical x2APIC: cluster in bits 31:16, a bit per member in 15:0
    /// (§11.12.10.2).
    Logical(u32),
    /// Shorthand "all excluding self".
    AllButSelf,
}

impl Destination {
    /// Whether the vCPU with x2APIC ID `id` is addressed. The sender's
    /// own part is delivered by [`Lapic::write`] itself.
    pub fn includes(self, id: u32, sender: u32) -> bool {
        match self {
            Self::Physical(BROADCAST) | Self::Logical(BROADCAST) => true,
            Self::Physical(d) => d == id,
            Self::Logical(d) => logical_id(id) & d != 0 && (logical_id(id) >> 16) == (d >> 16),
            Self::AllButSelf => id != sender,
        }
    }
}

/// A fixed IPI for other vCPUs of the partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipi {
    pub vector: u8,
    pub destination: Destination,
}

/// The logical x2APIC ID derived from the x2APIC ID (§11.12.10.2):
/// cluster = id[19:4] in bits 31:16, bit id[3:0] in bits 15:0.
pub const fn logical_id(id: u32) -> u32 {
    ((id >> 4) << 16) | (1 << (id & 0xf))
}

/// A 256-bit interrupt register (IRR, ISR, TMR): 8 words of 32 bits,
/// vector v in bit v % 32 of word v / 32 (§11.8.4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VectorSet(pub [u32; 8]);

impl VectorSet {
    pub fn set(&mut self, v: u8) {
        self.0[usize::from(v / 32)] |= 1 << (v % 32);
    }
    pub fn clear(&mut self, v: u8) {
        self.0[usize::from(v / 32)] &= !(1 << (v % 32));
    }
    pub fn contains(&self, v: u8) -> bool {
        self.0[usize::from(v / 32)] & (1 << (v % 32)) != 0
    }
    /// The highest vector in the set.
    pub fn highest(&self) -> Option<u8> {
        (0..8usize).rev().find(|&w| self.0[w] != 0).map(|w| (w as u32 * 32 + 31 - self.0[w].leading_zeros()) as u8)
    }
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }
    /// Adds every vector of `other`.
    pub fn merge(&mut self, other: &VectorSet) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a |= b;
        }
    }
}

/// What an INIT or start-up IPI asks of the vCPUs it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartupKind {
    /// INIT (delivery mode 101b, level assert): back to wait-for-SIPI.
    Init,
    /// Start-up (delivery mode 110b) with this vector: start in real mode
    /// at VV00:0000 if waiting for it.
    Sipi(u8),
}

/// An INIT or start-up IPI for other vCPUs of the partition. The sender
/// is never among them: "self" is not a valid shorthand for either
/// (§11.6.1, the valid ICR combinations: its outcome is undefined), and
/// an "all including self" one reaches only the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartupIpi {
    pub kind: StartupKind,
    pub destination: Destination,
}

/// What a write asks of the caller beyond the APIC itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteEffect {
    None,
    /// Deliver this IPI to the other vCPUs it names.
    Ipi(Ipi),
    /// Carry out this INIT or start-up IPI on the other vCPUs it names.
    Startup(StartupIpi),
}

/// One vCPU's local APIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lapic {
    /// x2APIC ID: the vCPU index.
    pub id: u32,
    pub tpr: u32,
    pub svr: u32,
    pub irr: VectorSet,
    pub isr: VectorSet,
    /// The ESR as last latched by a write, and errors since.
    pub esr: u32,
    pub esr_pending: u32,
    pub icr: u64,
    /// LVT: CMCI, timer, thermal, performance counters, LINT0, LINT1,
    /// error (in [`Lvt`] order).
    pub lvt: [u32; 7],
    pub initial_count: u32,
    pub divide: u32,
    /// One-shot/periodic: when the count reaches zero next (TSC).
    pub timer_expiry: Option<u64>,
    /// IA32_TSC_DEADLINE (0: disarmed).
    pub tsc_deadline: u64,
}

/// Indices into [`Lapic::lvt`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lvt {
    Cmci = 0,
    Timer = 1,
    Thermal = 2,
    Perfmon = 3,
    Lint0 = 4,
    Lint1 = 5,
    Error = 6,
}

impl Lvt {
    fn of(msr: u32) -> Option<Self> {
        Some(match msr {
            msr::LVT_CMCI => Self::Cmci,
            msr::LVT_TIMER => Self::Timer,
            msr::LVT_THERMAL => Self::Thermal,
            msr::LVT_PERFMON => Self::Perfmon,
            msr::LVT_LINT0 => Self::Lint0,
            msr::LVT_LINT1 => Self::Lint1,
            msr::LVT_ERROR => Self::Error,
            _ => return None,
        })
    }

    const fn writable(self) -> u32 {
        match self {
            Self::Timer => LVT_TIMER_WRITABLE,
            Self::Lint0 | Self::Lint1 => LVT_LINT_WRITABLE,
            Self::Error => LVT_ERROR_WRITABLE,
            Self::Cmci | Self::Thermal | Self::Perfmon => LVT_OTHER_WRITABLE,
        }
    }
}

/// Whether `msr` is one the local APIC answers.
pub const fn is_apic_msr(msr: u32) -> bool {
    matches!(msr, msr::IA32_APIC_BASE | msr::IA32_TSC_DEADLINE | msr::X2APIC_FIRST..=msr::X2APIC_LAST)
}

/// TSC cycles per timer count for a divide configuration (§11.5.4,
/// Figure 11-10): bits 3,1:0 = 0b111 divide by 1, else by 2^(value + 1).
const fn divisor(divide: u32) -> u64 {
    let v = ((divide & 0b1000) >> 1) | (divide & 0b11);
    if v == 0b111 {
        1
    } else {
        1 << (v + 1)
    }
}

impl Lapic {
    /// The state after reset (§11.4.7.1): software-disabled, every LVT
    /// masked, timer stopped; ID = `id`.
    pub fn new(id: u32) -> Self {
        Self {
            id,
            tpr: 0,
            svr: SVR_RESET,
            irr: VectorSet::default(),
            isr: VectorSet::default(),
            esr: 0,
            esr_pending: 0,
            icr: 0,
            lvt: [LVT_MASKED; 7],
            initial_count: 0,
            divide: 0,
            timer_expiry: None,
            tsc_deadline: 0,
        }
    }

    fn enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    fn timer_mode(&self) -> TimerMode {
        TimerMode::of(self.lvt[Lvt::Timer as usize]).unwrap_or(TimerMode::OneShot)
    }

    /// The processor priority (§11.8.3.1).
    pub fn ppr(&self) -> u32 {
        let isrv = self.isr.highest().map_or(0, u32::from);
        if (self.tpr >> 4) >= (isrv >> 4) {
            self.tpr
        } else {
            isrv & 0xf0
        }
    }

    /// Records an error (§11.5.3); an unmasked LVT error entry with a
    /// legal vector raises it.
    fn error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let lvt = self.lvt[Lvt::Error as usize];
        let vector = (lvt & LVT_VECTOR) as u8;
        if lvt & LVT_MASKED == 0 && vector >= FIRST_LEGAL_VECTOR && self.enabled() {
            self.irr.set(vector);
        }
    }

    /// A fixed interrupt arrives (from an IPI, the timer or another LVT
    /// source). Illegal vectors set ESR and are dropped; a software-
    /// disabled APIC accepts nothing (as KVM does; §11.4.7.2).
    pub fn accept(&mut self, vector: u8) {
        if !self.enabled() {
            return;
        }
        if vector < FIRST_LEGAL_VECTOR {
            self.error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return;
        }
        self.irr.set(vector);
    }

    /// Accepts every vector of `set` (an inbox filled by other vCPUs).
    pub fn accept_all(&mut self, set: &VectorSet) {
        for (w, &word) in set.0.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let bit = bits.trailing_zeros();
                bits &= bits - 1;
                self.accept((w as u32 * 32 + bit) as u8);
            }
        }
    }

    /// The vector to deliver now, if any: the highest requested one whose
    /// priority class is above the PPR's (§11.8.3.1).
    pub fn deliverable(&self) -> Option<u8> {
        let v = self.irr.highest()?;
        (self.enabled() && (u32::from(v) >> 4) > (self.ppr() >> 4)).then_some(v)
    }

    /// The processor took `vector` (injected): it moves from IRR to ISR
    /// (§11.8.4).
    pub fn acknowledge(&mut self, vector: u8) {
        self.irr.clear(vector);
        self.isr.set(vector);
    }

    /// EOI: the highest in-service vector is done (§11.8.5).
    fn eoi(&mut self) {
        if let Some(v) = self.isr.highest() {
            self.isr.clear(v);
        }
    }

    /// Advances the timer to `now`, raising its interrupt if it expired.
    /// A periodic timer that missed several periods raises one interrupt
    /// (the IRR holds one bit per vector) and keeps its phase.
    pub fn advance(&mut self, now: u64) {
        let fired = match self.timer_mode() {
            TimerMode::TscDeadline => {
                let due = self.tsc_deadline != 0 && now >= self.tsc_deadline;
                if due {
                    self.tsc_deadline = 0;
                }
                due
            }
            mode => match self.timer_expiry {
                Some(expiry) if now >= expiry => {
                    let period = u64::from(self.initial_count) * divisor(self.divide);
                    self.timer_expiry = (mode == TimerMode::Periodic && period != 0)
                        .then(|| expiry + ((now - expiry) / period + 1) * period);
                    true
                }
                _ => false,
            },
        };
        let lvt = self.lvt[Lvt::Timer as usize];
        if fired && lvt & LVT_MASKED == 0 {
            self.accept((lvt & LVT_VECTOR) as u8);
        }
    }

    /// When the timer next needs [`Lapic::advance`] (TSC), if armed.
    pub fn next_deadline(&self) -> Option<u64> {
        match self.timer_mode() {
            TimerMode::TscDeadline => (self.tsc_deadline != 0).then_some(self.tsc_deadline),
            _ => self.timer_expiry,
        }
    }

    /// IA32_APIC_BASE as the guest reads it.
    fn apic_base(&self) -> u64 {
        APIC_BASE_DEFAULT | APIC_BASE_EN | APIC_BASE_EXTD | if self.id == 0 { APIC_BASE_BSP } else { 0 }
    }

    /// RDMSR of an APIC MSR at TSC `now`; `Err` is #GP(0).
    pub fn read(&mut self, index: u32, now: u64) -> Result<u64, GpFault> {
        self.advance(now);
        let value = match index {
            msr::IA32_APIC_BASE => return Ok(self.apic_base()),
            msr::IA32_TSC_DEADLINE => {
                if self.timer_mode() == TimerMode::TscDeadline {
                    self.tsc_deadline
                } else {
                    0
                }
            }
            msr::ID => u64::from(self.id),
            msr::VERSION => VERSION,
            msr::TPR => u64::from(self.tpr),
            msr::PPR => u64::from(self.ppr()),
            msr::LDR => u64::from(logical_id(self.id)),
            msr::SVR => u64::from(self.svr),
            msr::ISR0..=0x817 => u64::from(self.isr.0[(index - msr::ISR0) as usize]),
            // Every interrupt is edge-triggered: the TMR is clear.
            msr::TMR0..=0x81f => 0,
            msr::IRR0..=0x827 => u64::from(self.irr.0[(index - msr::IRR0) as usize]),
            msr::ESR => u64::from(self.esr),
            msr::ICR => self.icr,
            msr::TIMER_INITIAL_COUNT => u64::from(self.initial_count),
            msr::TIMER_CURRENT_COUNT => self.current_count(now),
            msr::TIMER_DIVIDE => u64::from(self.divide),
            other => match Lvt::of(other) {
                Some(l) => u64::from(self.lvt[l as usize]),
                // EOI and SELF_IPI are write-only; the rest is not there.
                None => return Err(GpFault::MsrNotAllowed),
            },
        };
        Ok(value)
    }

    fn current_count(&self, now: u64) -> u64 {
        match (self.timer_mode(), self.timer_expiry) {
            (TimerMode::TscDeadline, _) | (_, None) => 0,
            (_, Some(expiry)) => expiry.saturating_sub(now).div_ceil(divisor(self.divide)),
        }
    }

    /// WRMSR of an APIC MSR at TSC `now`; `Err` is #GP(0).
    pub fn write(&mut self, index: u32, value: u64, now: u64) -> Result<WriteEffect, GpFault> {
        self.advance(now);
        if index == msr::IA32_APIC_BASE {
            return self.write_apic_base(value);
        }
        if index == msr::IA32_TSC_DEADLINE {
            if self.timer_mode() == TimerMode::TscDeadline {
                self.tsc_deadline = value;
            }
            return Ok(WriteEffect::None);
        }
        if index == msr::ICR {
            if value & !ICR_WRITABLE != 0 {
                return Err(GpFault::ReservedBits);
            }
            self.icr = value;
            return Ok(self.send(value));
        }
        // Bits 63:32 of every other x2APIC register are reserved.
        let v = u32::try_from(value).map_err(|_| GpFault::ReservedBits)?;
        let check = |writable: u32| if v & !writable == 0 { Ok(v) } else { Err(GpFault::ReservedBits) };
        match index {
            msr::TPR => self.tpr = check(TPR_WRITABLE)?,
            msr::EOI => {
                check(0)?;
                self.eoi();
            }
            msr::SVR => {
                self.svr = check(SVR_VECTOR | SVR_ENABLE)?;
                if !self.enabled() {
                    for l in &mut self.lvt {
                        *l |= LVT_MASKED;
                    }
                }
            }
            msr::ESR => {
                check(0)?;
                self.esr = core::mem::take(&mut self.esr_pending);
            }
            msr::TIMER_INITIAL_COUNT => {
                self.initial_count = v;
                if self.timer_mode() != TimerMode::TscDeadline {
                    self.timer_expiry = (v != 0).then(|| now + u64::from(v) * divisor(self.divide));
                }
            }
            msr::TIMER_DIVIDE => self.divide = check(DIVIDE_WRITABLE)?,
            msr::SELF_IPI => {
                let vector = check(LVT_VECTOR)? as u8;
                if vector < FIRST_LEGAL_VECTOR {
                    self.error(ESR_SEND_ILLEGAL_VECTOR);
                } else {
                    self.accept(vector);
                }
            }
            other => {
                let Some(l) = Lvt::of(other) else { return Err(GpFault::MsrNotAllowed) };
                let mut v = check(l.writable())?;
                if l == Lvt::Timer {
                    let old = self.timer_mode();
                    let new = TimerMode::of(v).ok_or(GpFault::ReservedBits)?;
                    if new != old {
                        // A mode change disarms the timer (§11.5.4.1).
                        self.timer_expiry = None;
                        self.tsc_deadline = 0;
                    }
                }
                if !self.enabled() {
                    v |= LVT_MASKED;
                }
                self.lvt[l as usize] = v;
            }
        }
        Ok(WriteEffect::None)
    }

    /// IA32_APIC_BASE: the APIC stays enabled in x2APIC mode at the
    /// architectural base; writing that back (BSP flag ignored) is allowed.
    fn write_apic_base(&mut self, value: u64) -> Result<WriteEffect, GpFault> {
        if value & !APIC_BASE_DEFINED != 0 {
            return Err(GpFault::ReservedBits);
        }
        if (value ^ self.apic_base()) & !APIC_BASE_BSP != 0 {
            return Err(GpFault::InvalidTransition);
        }
        Ok(WriteEffect::None)
    }

    /// Carries out an ICR write: the part for this vCPU here, the rest for
    /// the caller.
    fn send(&mut self, icr: u64) -> WriteEffect {
        let vector = (icr & 0xff) as u8;
        let mode = (icr >> ICR_DELIVERY_SHIFT) & ICR_DELIVERY_MASK;
        let dest = (icr >> ICR_DEST_SHIFT) as u32;
        let (to_self, others) = match (icr >> ICR_SHORTHAND_SHIFT) & ICR_SHORTHAND_MASK {
            0 => {
                let d = if icr & ICR_LOGICAL != 0 { Destination::Logical(dest) } else { Destination::Physical(dest) };
                (d.includes(self.id, self.id), Some(d))
            }
            1 => (true, None),
            2 => (true, Some(Destination::AllButSelf)),
            _ => (false, Some(Destination::AllButSelf)),
        };
        let startup = match mode {
            DELIVERY_INIT if icr & (ICR_TRIGGER_LEVEL | ICR_LEVEL_ASSERT) == ICR_TRIGGER_LEVEL => {
                return WriteEffect::None
            }
            DELIVERY_INIT => StartupKind::Init,
            // The vector is a page number, not an interrupt: any is legal.
            DELIVERY_STARTUP => StartupKind::Sipi(vector),
            DELIVERY_FIXED | DELIVERY_LOWEST => {
                if vector < FIRST_LEGAL_VECTOR {
                    self.error(ESR_SEND_ILLEGAL_VECTOR);
                    return WriteEffect::None;
                }
                return self.send_fixed(vector, to_self, others);
            }
            _ => return WriteEffect::None,
        };
        match others {
            Some(destination) => WriteEffect::Startup(StartupIpi { kind: startup, destination }),
            None => WriteEffect::None,
        }
    }

    /// A fixed IPI: the part for this vCPU here, the rest for the caller.
    fn send_fixed(&mut self, vector: u8, to_self: bool, others: Option<Destination>) -> WriteEffect {
        if to_self {
            self.accept(vector);
        }
        match others {
            Some(destination) => WriteEffect::Ipi(Ipi { vector, destination }),
            None => WriteEffect::None,
        }
    }
}

/// Bytes of one APIC's handover encoding ([`Lapic::encode`]).
pub const STATE_LEN: usize = 160;
/// The encoding's flags word: bit 0, a one-shot/periodic expiry is armed.
const STATE_TIMER_ARMED: u32 = 1;
/// The ESR's defined bits (§11.5.3, Figure 11-9).
const ESR_DEFINED: u32 = 0xff;

/// Why an APIC's handover encoding was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateError {
    /// Fewer than [`STATE_LEN`] bytes.
    Short,
    /// The x2APIC ID is not the vCPU's index.
    WrongId,
    /// A register holds bits the APIC never sets.
    ReservedBits(&'static str),
}

fn put_u32(out: &mut [u8], at: usize, v: u32) {
    out[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut [u8], at: usize, v: u64) {
    out[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn get_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

impl Lapic {
    /// The APIC's state for a live update (`kho/ABI.md`, `lapic` record):
    /// [`STATE_LEN`] little-endian bytes. u32 at 0: ID, TPR, SVR, ESR,
    /// errors not yet latched, initial count, divide configuration, flags
    /// (bit 0: `timer_expiry` armed); IRR words at 32, ISR words at 64,
    /// the seven LVT entries (CMCI, timer, thermal, perfmon, LINT0,
    /// LINT1, error) at 96, 0 at 124; u64 at 128: ICR, one-shot/periodic
    /// expiry (TSC), IA32_TSC_DEADLINE, 0. `None` if `out` is short.
    pub fn encode(&self, out: &mut [u8]) -> Option<usize> {
        let out = out.get_mut(..STATE_LEN)?;
        out.fill(0);
        let flags = if self.timer_expiry.is_some() { STATE_TIMER_ARMED } else { 0 };
        for (k, v) in [self.id, self.tpr, self.svr, self.esr, self.esr_pending, self.initial_count, self.divide, flags]
            .into_iter()
            .enumerate()
        {
            put_u32(out, 4 * k, v);
        }
        for k in 0..8 {
            put_u32(out, 32 + 4 * k, self.irr.0[k]);
            put_u32(out, 64 + 4 * k, self.isr.0[k]);
        }
        for (k, &v) in self.lvt.iter().enumerate() {
            put_u32(out, 96 + 4 * k, v);
        }
        put_u64(out, 128, self.icr);
        put_u64(out, 136, self.timer_expiry.unwrap_or(0));
        put_u64(out, 144, self.tsc_deadline);
        Some(STATE_LEN)
    }

    /// Reads [`Lapic::encode`]'s bytes for vCPU `id`, refusing anything a
    /// running APIC could not hold (so a bad handover cannot give a guest
    /// an impossible APIC).
    pub fn decode(bytes: &[u8], id: u32) -> Result<Self, StateError> {
        let b = bytes.get(..STATE_LEN).ok_or(StateError::Short)?;
        let word = |k: usize| get_u32(b, 4 * k);
        if word(0) != id {
            return Err(StateError::WrongId);
        }
        let mut a = Lapic::new(id);
        a.tpr = word(1);
        a.svr = word(2);
        a.esr = word(3);
        a.esr_pending = word(4);
        a.initial_count = word(5);
        a.divide = word(6);
        let flags = word(7);
        for k in 0..8 {
            a.irr.0[k] = get_u32(b, 32 + 4 * k);
            a.isr.0[k] = get_u32(b, 64 + 4 * k);
        }
        for (k, slot) in a.lvt.iter_mut().enumerate() {
            *slot = get_u32(b, 96 + 4 * k);
        }
        a.icr = get_u64(b, 128);
        a.timer_expiry = (flags & STATE_TIMER_ARMED != 0).then(|| get_u64(b, 136));
        a.tsc_deadline = get_u64(b, 144);
        let lvts = [Lvt::Cmci, Lvt::Timer, Lvt::Thermal, Lvt::Perfmon, Lvt::Lint0, Lvt::Lint1, Lvt::Error];
        let checks = [
            ("tpr", a.tpr & !TPR_WRITABLE == 0),
            ("svr", a.svr & !(SVR_VECTOR | SVR_ENABLE) == 0),
            ("esr", (a.esr | a.esr_pending) & !ESR_DEFINED == 0),
            ("divide", a.divide & !DIVIDE_WRITABLE == 0),
            ("flags", flags & !STATE_TIMER_ARMED == 0),
            ("illegal-vector", (a.irr.0[0] | a.isr.0[0]).trailing_zeros() >= u32::from(FIRST_LEGAL_VECTOR)),
            ("lvt", lvts.iter().zip(a.lvt).all(|(l, v)| v & !l.writable() == 0)),
            ("timer-mode", TimerMode::of(a.lvt[Lvt::Timer as usize]).is_some()),
            ("icr", a.icr & !ICR_WRITABLE == 0),
            ("padding", get_u32(b, 124) == 0 && get_u64(b, 152) == 0),
        ];
        match checks.iter().find(|(_, ok)| !ok) {
            Some((what, _)) => Err(StateError::ReservedBits(what)),
            None => Ok(a),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMER_VECTOR: u64 = 0x20;

    fn enabled(id: u32) -> Lapic {
        let mut a = Lapic::new(id);
        a.write(msr::SVR, u64::from(SVR_ENABLE | 0xff), 0).unwrap();
        a
    }

    #[test]
    fn identity_registers() {
        let mut a = Lapic::new(0x13);
        assert_eq!(a.read(msr::ID, 0), Ok(0x13));
        assert_eq!(a.read(msr::LDR, 0), Ok(0x0001_0008));
        assert_eq!(a.read(msr::VERSION, 0), Ok(0x0006_0014));
        assert_eq!(a.read(msr::SVR, 0), Ok(0xff));
        assert_eq!(a.read(msr::IA32_APIC_BASE, 0), Ok(0xfee0_0c00));
        assert_eq!(Lapic::new(0).read(msr::IA32_APIC_BASE, 0), Ok(0xfee0_0d00));
        assert_eq!(a.write(msr::IA32_APIC_BASE, 0xfee0_0d00, 0), Ok(WriteEffect::None), "BSP flag ignored");
        assert_eq!(a.write(msr::IA32_APIC_BASE, 0xfee0_0800, 0), Err(GpFault::InvalidTransition), "to xAPIC");
        assert_eq!(a.write(msr::IA32_APIC_BASE, 0, 0), Err(GpFault::InvalidTransition), "disable");
        assert_eq!(a.write(msr::IA32_APIC_BASE, 0xfee0_0c01, 0), Err(GpFault::ReservedBits));
        for ro in [msr::ID, msr::VERSION, msr::PPR, msr::LDR, msr::ISR0, msr::IRR0 + 7, msr::TMR0, 0x839] {
            assert_eq!(a.write(ro, 0, 0), Err(GpFault::MsrNotAllowed), "{ro:#x} is read-only");
        }
        // Write-only and absent registers (APR, RRD, DFR, ICR high).
        for index in [msr::EOI, msr::SELF_IPI, 0x809, 0x80c, 0x80e, 0x831, 0x8ff] {
            assert_eq!(a.read(index, 0), Err(GpFault::MsrNotAllowed), "{index:#x}");
        }
        assert!(is_apic_msr(0x1b) && is_apic_msr(0x6e0) && is_apic_msr(0x800) && is_apic_msr(0x8ff));
        assert!(!is_apic_msr(0x900) && !is_apic_msr(0x7ff));
    }

    #[test]
    fn reserved_bits_raise_gp() {
        let mut a = enabled(0);
        assert_eq!(a.write(msr::TPR, 0x100, 0), Err(GpFault::ReservedBits));
        assert_eq!(a.write(msr::TPR, 1 << 32, 0), Err(GpFault::ReservedBits));
        assert_eq!(a.write(msr::EOI, 1, 0), Err(GpFault::ReservedBits));
        assert_eq!(a.write(msr::ESR, 1, 0), Err(GpFault::ReservedBits));
        assert_eq!(a.write(msr::SVR, 0x1000, 0), Err(GpFault::ReservedBits));
        assert_eq!(a.write(msr::TIMER_DIVIDE, 0b100, 0), Err(GpFault::ReservedBits));
        assert_eq!(a.write(msr::SELF_IPI, 0x100, 0), Err(GpFault::ReservedBits));
        assert_eq!(a.write(msr::LVT_TIMER, 0x3 << 17, 0), Err(GpFault::ReservedBits), "timer mode 11");
        assert_eq!(a.write(msr::LVT_TIMER, 1 << 12, 0), Err(GpFault::ReservedBits), "delivery status");
        assert_eq!(a.write(msr::LVT_ERROR, 0x400, 0), Err(GpFault::ReservedBits), "no delivery mode");
        assert_eq!(a.write(msr::ICR, 1 << 12, 0), Err(GpFault::ReservedBits));
        assert_eq!(a.write(msr::ICR, 1 << 20, 0), Err(GpFault::ReservedBits));
        // Nothing changed.
        assert_eq!(a, enabled(0));
        assert_eq!(a.write(msr::LVT_LINT0, 0x1_a7ff, 0), Ok(WriteEffect::None));
        assert_eq!(a.read(msr::LVT_LINT0, 0), Ok(0x1_a7ff));
    }

    #[test]
    fn priorities_ack_and_eoi() {
        let mut a = enabled(0);
        a.accept(0x31);
        a.accept(0x52);
        a.accept(0x55);
        assert_eq!(a.read(msr::IRR0 + 2, 0), Ok(1 << 0x12 | 1 << 0x15));
        assert_eq!(a.deliverable(), Some(0x55));
        a.acknowledge(0x55);
        assert_eq!(a.read(msr::ISR0 + 2, 0), Ok(1 << 0x15));
        assert_eq!(a.read(msr::PPR, 0), Ok(0x50));
        // 0x52 is in the same class as the one in service: held.
        assert_eq!(a.deliverable(), None);
        a.write(msr::EOI, 0, 0).unwrap();
        assert_eq!(a.read(msr::PPR, 0), Ok(0));
        assert_eq!(a.deliverable(), Some(0x52));
        // TPR masks classes at or below it.
        a.write(msr::TPR, 0x52, 0).unwrap();
        assert_eq!(a.read(msr::PPR, 0), Ok(0x52));
        assert_eq!(a.deliverable(), None);
        a.write(msr::TPR, 0x40, 0).unwrap();
        assert_eq!(a.deliverable(), Some(0x52));
        a.acknowledge(0x52);
        a.acknowledge(0x31);
        a.write(msr::EOI, 0, 0).unwrap();
        assert_eq!(a.isr.highest(), Some(0x31), "EOI ends the highest in service");
        a.write(msr::EOI, 0, 0).unwrap();
        a.write(msr::EOI, 0, 0).unwrap();
        assert!(a.isr.is_empty(), "an EOI with nothing in service is ignored");
    }

    #[test]
    fn software_disabled_apic_accepts_nothing_and_keeps_lvts_masked() {
        let mut a = Lapic::new(0);
        a.accept(0x40);
        assert_eq!(a.deliverable(), None);
        assert!(a.irr.is_empty());
        a.write(msr::LVT_TIMER, TIMER_VECTOR, 0).unwrap();
        assert_eq!(a.read(msr::LVT_TIMER, 0), Ok(TIMER_VECTOR | u64::from(LVT_MASKED)));
        let mut b = enabled(0);
        b.write(msr::LVT_TIMER, TIMER_VECTOR, 0).unwrap();
        b.write(msr::SVR, 0xff, 0).unwrap();
        assert_eq!(b.read(msr::LVT_TIMER, 0), Ok(TIMER_VECTOR | u64::from(LVT_MASKED)));
    }

    #[test]
    fn illegal_vectors_set_esr_and_are_dropped() {
        let mut a = enabled(0);
        a.write(msr::SELF_IPI, 0x0e, 0).unwrap();
        a.write(msr::ICR, 0x05 | (1 << 18), 0).unwrap();
        a.write(msr::LVT_TIMER, 0x03, 0).unwrap();
        a.write(msr::TIMER_INITIAL_COUNT, 1, 0).unwrap();
        a.advance(100);
        assert!(a.irr.is_empty());
        assert_eq!(a.read(msr::ESR, 0), Ok(0), "ESR shows errors only after a write");
        a.write(msr::ESR, 0, 0).unwrap();
        let errors = u64::from(ESR_SEND_ILLEGAL_VECTOR | ESR_RECEIVE_ILLEGAL_VECTOR);
        assert_eq!(a.read(msr::ESR, 0), Ok(errors));
        a.write(msr::ESR, 0, 0).unwrap();
        assert_eq!(a.read(msr::ESR, 0), Ok(0));
        // An unmasked LVT error entry raises the error vector.
        a.write(msr::LVT_ERROR, 0xfe, 0).unwrap();
        a.write(msr::SELF_IPI, 0x01, 0).unwrap();
        assert_eq!(a.deliverable(), Some(0xfe));
    }

    #[test]
    fn one_shot_timer() {
        let mut a = enabled(0);
        a.write(msr::TIMER_DIVIDE, 0b0001, 0).unwrap(); // divide by 4
        a.write(msr::LVT_TIMER, TIMER_VECTOR, 0).unwrap();
        a.write(msr::TIMER_INITIAL_COUNT, 100, 1000).unwrap();
        assert_eq!(a.next_deadline(), Some(1400));
        assert_eq!(a.read(msr::TIMER_CURRENT_COUNT, 1200), Ok(50));
        assert_eq!(a.read(msr::TIMER_INITIAL_COUNT, 1200), Ok(100));
        a.advance(1399);
        assert_eq!(a.deliverable(), None);
        a.advance(1400);
        assert_eq!(a.deliverable(), Some(0x20));
        assert_eq!(a.next_deadline(), None, "one-shot stops");
        assert_eq!(a.read(msr::TIMER_CURRENT_COUNT, 1500), Ok(0));
        // Divide by 1, and writing 0 stops it.
        a.write(msr::TIMER_DIVIDE, 0b1011, 0).unwrap();
        a.write(msr::TIMER_INITIAL_COUNT, 10, 2000).unwrap();
        assert_eq!(a.next_deadline(), Some(2010));
        a.write(msr::TIMER_INITIAL_COUNT, 0, 2001).unwrap();
        assert_eq!(a.next_deadline(), None);
        // A masked timer still expires, silently.
        let mut b = enabled(0);
        b.write(msr::LVT_TIMER, TIMER_VECTOR | u64::from(LVT_MASKED), 0).unwrap();
        b.write(msr::TIMER_INITIAL_COUNT, 1, 0).unwrap();
        b.advance(10);
        assert_eq!((b.deliverable(), b.next_deadline()), (None, None));
    }

    #[test]
    fn periodic_timer_keeps_its_phase() {
        let mut a = enabled(0);
        a.write(msr::TIMER_DIVIDE, 0b1011, 0).unwrap();
        a.write(msr::LVT_TIMER, TIMER_VECTOR | (1 << 17), 0).unwrap();
        a.write(msr::TIMER_INITIAL_COUNT, 100, 0).unwrap();
        a.advance(100);
        assert_eq!(a.deliverable(), Some(0x20));
        assert_eq!(a.next_deadline(), Some(200));
        a.acknowledge(0x20);
        a.write(msr::EOI, 0, 0).unwrap();
        // Three periods missed: one interrupt, next on the grid.
        a.advance(450);
        assert_eq!(a.deliverable(), Some(0x20));
        assert_eq!(a.next_deadline(), Some(500));
        assert_eq!(a.read(msr::TIMER_CURRENT_COUNT, 460), Ok(40));
        // A mode change disarms it.
        a.write(msr::LVT_TIMER, TIMER_VECTOR, 460).unwrap();
        assert_eq!(a.next_deadline(), None);
    }

    #[test]
    fn tsc_deadline_timer() {
        let mut a = enabled(0);
        // Outside TSC-deadline mode the MSR ignores writes and reads 0.
        a.write(msr::IA32_TSC_DEADLINE, 5000, 0).unwrap();
        assert_eq!((a.read(msr::IA32_TSC_DEADLINE, 0), a.next_deadline()), (Ok(0), None));
        a.write(msr::LVT_TIMER, TIMER_VECTOR | (2 << 17), 0).unwrap();
        a.write(msr::IA32_TSC_DEADLINE, 5000, 0).unwrap();
        assert_eq!(a.read(msr::IA32_TSC_DEADLINE, 10), Ok(5000));
        // The initial count does nothing in this mode.
        a.write(msr::TIMER_INITIAL_COUNT, 1, 10).unwrap();
        assert_eq!(a.next_deadline(), Some(5000));
        assert_eq!(a.read(msr::TIMER_CURRENT_COUNT, 10), Ok(0));
        a.advance(4999);
        assert_eq!(a.deliverable(), None);
        a.advance(5000);
        assert_eq!(a.deliverable(), Some(0x20));
        assert_eq!(a.read(msr::IA32_TSC_DEADLINE, 5001), Ok(0), "fired: disarmed");
        // A deadline in the past fires at once; 0 disarms.
        a.write(msr::IA32_TSC_DEADLINE, 1, 6000).unwrap();
        assert_eq!(a.next_deadline(), Some(1));
        a.write(msr::IA32_TSC_DEADLINE, 0, 6000).unwrap();
        assert_eq!(a.next_deadline(), None);
    }

    #[test]
    fn ipis_and_destinations() {
        let mut a = enabled(1);
        assert_eq!(a.write(msr::SELF_IPI, 0x40, 0), Ok(WriteEffect::None));
        assert_eq!(a.deliverable(), Some(0x40));
        // Shorthand self.
        assert_eq!(a.write(msr::ICR, 0x41 | (1 << 18), 0), Ok(WriteEffect::None));
        assert!(a.irr.contains(0x41));
        assert_eq!(a.read(msr::ICR, 0), Ok(0x41 | (1 << 18)));
        // Physical destination 3.
        let ipi = a.write(msr::ICR, 0x42 | (3 << 32), 0).unwrap();
        assert_eq!(ipi, WriteEffect::Ipi(Ipi { vector: 0x42, destination: Destination::Physical(3) }));
        assert!(!a.irr.contains(0x42));
        // Physical destination self, and broadcast (includes self).
        let ipi = a.write(msr::ICR, 0x43 | (1 << 32), 0).unwrap();
        assert!(a.irr.contains(0x43));
        let WriteEffect::Ipi(ipi) = ipi else { panic!("{ipi:?}") };
        assert!(!(0..8).any(|id| id != 1 && ipi.destination.includes(id, 1)), "only self");
        a.write(msr::ICR, 0x44 | (u64::from(u32::MAX) << 32), 0).unwrap();
        assert!(a.irr.contains(0x44));
        // All including self / excluding self.
        assert_eq!(
            a.write(msr::ICR, 0x45 | (2 << 18), 0),
            Ok(WriteEffect::Ipi(Ipi { vector: 0x45, destination: Destination::AllButSelf }))
        );
        assert!(a.irr.contains(0x45));
        assert_eq!(
            a.write(msr::ICR, 0x46 | (3 << 18), 0),
            Ok(WriteEffect::Ipi(Ipi { vector: 0x46, destination: Destination::AllButSelf }))
        );
        assert!(!a.irr.contains(0x46));
        assert!(Destination::AllButSelf.includes(0, 1) && !Destination::AllButSelf.includes(1, 1));
        // Logical: cluster 0, members 0 and 2.
        let d = Destination::Logical(0b101);
        assert!(d.includes(0, 1) && d.includes(2, 1) && !d.includes(1, 1) && !d.includes(16, 1));
        assert!(Destination::Logical(0x0001_0001).includes(16, 1));
        // SMI and NMI are not delivered; INIT and SIPI to self go nowhere.
        for mode in [2u64, 4, 5, 6] {
            assert_eq!(a.write(msr::ICR, 0x50 | (mode << 8) | (1 << 18), 0), Ok(WriteEffect::None));
            assert!(!a.irr.contains(0x50));
        }
        assert_eq!(a.write(msr::ICR, 0x50 | (4 << 8) | (3 << 32), 0), Ok(WriteEffect::None), "NMI");
    }

    #[test]
    fn init_and_startup_ipis_go_to_the_caller() {
        let mut a = enabled(0);
        let startup = |kind, destination| Ok(WriteEffect::Startup(StartupIpi { kind, destination }));
        // INIT assert, as Linux and the SDM's example send it (level,
        // assert), and as an edge; a vector is ignored.
        let init = 0x0000_c500 | (1 << 32);
        assert_eq!(a.write(msr::ICR, init, 0), startup(StartupKind::Init, Destination::Physical(1)));
        assert_eq!(a.write(msr::ICR, 0x0000_4500 | (1 << 32), 0), startup(StartupKind::Init, Destination::Physical(1)));
        assert_eq!(a.write(msr::ICR, 0x0000_0512 | (1 << 32), 0), startup(StartupKind::Init, Destination::Physical(1)));
        // INIT level de-assert: nothing.
        assert_eq!(a.write(msr::ICR, 0x0000_8500 | (1 << 32), 0), Ok(WriteEffect::None));
        // SIPI vector 0x08 to ID 1; any vector, even below 16, is legal.
        let sipi = |v: u64, dest: u64| 0x0000_4600 | v | (dest << 32);
        assert_eq!(a.write(msr::ICR, sipi(0x08, 1), 0), startup(StartupKind::Sipi(0x08), Destination::Physical(1)));
        assert_eq!(a.write(msr::ICR, sipi(0x00, 2), 0), startup(StartupKind::Sipi(0x00), Destination::Physical(2)));
        assert_eq!(a.esr_pending, 0, "a SIPI vector is a page, not an interrupt vector");
        // Shorthands: all excluding self and all including self reach the
        // others only; logical destinations as for fixed IPIs.
        assert_eq!(a.write(msr::ICR, 0x0000_4500 | (3 << 18), 0), startup(StartupKind::Init, Destination::AllButSelf));
        assert_eq!(
            a.write(msr::ICR, sipi(0x9f, 0) | (2 << 18), 0),
            startup(StartupKind::Sipi(0x9f), Destination::AllButSelf)
        );
        assert_eq!(
            a.write(msr::ICR, 0x0000_4500 | ICR_LOGICAL | (0b110 << 32), 0),
            startup(StartupKind::Init, Destination::Logical(0b110))
        );
        assert!(a.irr.is_empty(), "nothing reaches the sender's own IRR");
        // An INIT or SIPI to an ID no vCPU has still goes to the caller,
        // which finds no vCPU to give it to.
        assert_eq!(a.write(msr::ICR, sipi(0x08, 7), 0), startup(StartupKind::Sipi(0x08), Destination::Physical(7)));
    }

    #[test]
    fn state_round_trips_and_bad_state_is_refused() {
        let mut a = enabled(3);
        a.write(msr::TPR, 0x20, 0).unwrap();
        a.write(msr::LVT_TIMER, TIMER_VECTOR | (1 << 17), 0).unwrap();
        a.write(msr::TIMER_INITIAL_COUNT, 1000, 50).unwrap();
        a.write(msr::ICR, 0x44 | (1 << 32), 0).unwrap();
        a.accept(0x60);
        a.acknowledge(0x60);
        a.accept(0x70);
        a.write(msr::SELF_IPI, 1, 0).unwrap();
        let mut bytes = [0u8; STATE_LEN];
        assert_eq!(a.encode(&mut bytes), Some(STATE_LEN));
        assert_eq!(a.encode(&mut [0u8; STATE_LEN - 1]), None);
        let b = Lapic::decode(&bytes, 3).unwrap();
        assert_eq!(b, a);
        assert_eq!(b.next_deadline(), Some(2050), "the timer's deadline and mode survive");
        assert_eq!(b.deliverable(), Some(0x70));
        let mut c = Lapic::new(0);
        c.write(msr::SVR, 0x1ff, 0).unwrap();
        c.write(msr::LVT_TIMER, TIMER_VECTOR | (2 << 17), 0).unwrap();
        c.write(msr::IA32_TSC_DEADLINE, 9999, 0).unwrap();
        c.encode(&mut bytes).unwrap();
        assert_eq!(Lapic::decode(&bytes, 0).map(|d| d.next_deadline()), Ok(Some(9999)));

        assert_eq!(Lapic::decode(&bytes[..STATE_LEN - 1], 0), Err(StateError::Short));
        assert_eq!(Lapic::decode(&bytes, 1), Err(StateError::WrongId));
        let bad = |at: usize, v: u32| {
            let mut b = bytes;
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
            Lapic::decode(&b, 0)
        };
        assert_eq!(bad(4, 0x100), Err(StateError::ReservedBits("tpr")));
        assert_eq!(bad(8, 0x1000), Err(StateError::ReservedBits("svr")));
        assert_eq!(bad(28, 2), Err(StateError::ReservedBits("flags")));
        assert_eq!(bad(32, 1), Err(StateError::ReservedBits("illegal-vector")));
        assert_eq!(bad(100, 3 << 17), Err(StateError::ReservedBits("timer-mode")));
        assert_eq!(bad(100, 1 << 12), Err(StateError::ReservedBits("lvt")));
        assert_eq!(bad(124, 1), Err(StateError::ReservedBits("padding")));
        assert_eq!(bad(128, 1 << 12), Err(StateError::ReservedBits("icr")));
    }

    #[test]
    fn inbox_merge() {
        let mut set = VectorSet::default();
        set.set(0x30);
        set.set(0x02);
        let mut other = VectorSet::default();
        other.set(0xff);
        set.merge(&other);
        let mut a = enabled(0);
        a.accept_all(&set);
        assert_eq!(a.irr.highest(), Some(0xff));
        assert!(a.irr.contains(0x30) && !a.irr.contains(0x02));
        assert_eq!(a.esr_pending, ESR_RECEIVE_ILLEGAL_VECTOR);
    }
}
