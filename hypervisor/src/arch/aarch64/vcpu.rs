//! A virtual CPU's context: the register frame the exit path saves (layout
//! shared with entry.S), the EL1 system registers and the virtual timer
//! (switched only when another vCPU takes this physical CPU), and the
//! virtual GIC state.

use core::arch::asm;

use hypervisor::arch::aarch64::ptimer::PhysTimer;

use super::gic::{VgicState, MAX_LRS};

/// Saved by entry.S on every exit. Offsets are fixed: x0-x30 at 0,
/// ELR at 248, SPSR at 256, q0-q31 at 272, FPCR/FPSR at 784.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug)]
pub struct GuestRegs {
    pub x: [u64; 31],
    pub elr: u64,
    pub spsr: u64,
    pad: u64,
    pub q: [u128; 32],
    pub fpcr: u64,
    pub fpsr: u64,
}

const _: () = {
    assert!(core::mem::offset_of!(GuestRegs, elr) == 248);
    assert!(core::mem::offset_of!(GuestRegs, q) == 272);
    assert!(core::mem::offset_of!(GuestRegs, fpcr) == 784);
};

/// SPSR_EL2 for entering a guest: EL1h, DAIF masked (Arm ARM C5.2.19).
pub const SPSR_EL1H_MASKED: u64 = 0x3c5;
/// SCTLR_EL1 reset-like value: MMU and caches off, RES1 bits set
/// (Arm ARM D19.2.118).
pub const SCTLR_EL1_RESET: u64 = 0x30d0_0800;
/// CNTV_CTL_EL0: ENABLE (bit 0), IMASK (bit 1), ISTATUS (bit 2).
pub const CNTV_ENABLE: u64 = 1 << 0;
pub const CNTV_IMASK: u64 = 1 << 1;

impl GuestRegs {
    pub fn at_entry(pc: u64, x0: u64) -> Self {
        let mut x = [0; 31];
        x[0] = x0;
        Self { x, elr: pc, spsr: SPSR_EL1H_MASKED, pad: 0, q: [0; 32], fpcr: 0, fpsr: 0 }
    }
}

macro_rules! el1_sysregs {
    ($($field:ident => $reg:literal),* $(,)?) => {
        /// The guest's EL1 (and EL0) system registers.
        #[derive(Clone, Copy, Debug, Default)]
        pub struct El1Sysregs {
            $(pub $field: u64,)*
        }

        impl El1Sysregs {
            pub const WORDS: usize = [$(stringify!($field)),*].len();

            fn words(&self) -> [u64; Self::WORDS] {
                [$(self.$field),*]
            }

            fn from_words(w: &[u64]) -> Self {
                let mut it = w.iter().copied();
                Self { $($field: it.next().unwrap_or(0),)* }
            }

            pub fn save(&mut self) {
                $(
                    // SAFETY: reading a guest system register at EL2 has no side effects.
                    unsafe { asm!(concat!("mrs {0}, ", $reg), out(reg) self.$field, options(nomem, nostack)) };
                )*
            }

            pub fn restore(&self) {
                $(
                    // SAFETY: loading this vCPU's own EL1 state; EL2 does not use it.
                    unsafe { asm!(concat!("msr ", $reg, ", {0}"), in(reg) self.$field, options(nomem, nostack)) };
                )*
                // SAFETY: synchronizes the writes above before the guest runs.
                unsafe { asm!("isb", options(nomem, nostack)) };
            }
        }
    };
}

el1_sysregs! {
    sctlr => "sctlr_el1",
    ttbr0 => "ttbr0_el1",
    ttbr1 => "ttbr1_el1",
    tcr => "tcr_el1",
    mair => "mair_el1",
    amair => "amair_el1",
    vbar => "vbar_el1",
    contextidr => "contextidr_el1",
    tpidr_el0 => "tpidr_el0",
    tpidrro_el0 => "tpidrro_el0",
    tpidr_el1 => "tpidr_el1",
    sp_el0 => "sp_el0",
    sp_el1 => "sp_el1",
    elr_el1 => "elr_el1",
    spsr_el1 => "spsr_el1",
    esr_el1 => "esr_el1",
    far_el1 => "far_el1",
    afsr0 => "afsr0_el1",
    afsr1 => "afsr1_el1",
    par => "par_el1",
    cpacr => "cpacr_el1",
    cntkctl => "cntkctl_el1",
    csselr => "csselr_el1",
    mdscr => "mdscr_el1",
    vmpidr => "vmpidr_el2",
    cntv_cval => "cntv_cval_el0",
    cntv_ctl => "cntv_ctl_el0",
}

/// Everything a vCPU needs to run. The register frame comes first: the
/// exit path finds it through TPIDR_EL2.
#[repr(C)]
#[derive(Debug)]
pub struct Vcpu {
    pub regs: GuestRegs,
    pub sys: El1Sysregs,
    pub vgic: VgicState,
    /// The hypervisor set CNTV_CTL.IMASK when it injected the timer
    /// interrupt; cleared once the guest has taken it.
    pub timer_masked_by_hv: bool,
    /// Breakpoint and watchpoint registers: the guest's own.
    pub debug: DebugRegs,
    /// The emulated EL1 physical timer.
    pub ptimer: PhysTimer,
    /// Synchronous external aborts injected: where the last one was, how
    /// many in a row there, and how many in all (not handed over).
    pub abort_elr: u64,
    pub abort_streak: u32,
    pub aborts: u64,
}

/// Most breakpoints and watchpoints switched (ID_AA64DFR0_EL1.BRPs and
/// WRPs allow 16 each).
pub const MAX_DEBUG_PAIRS: usize = 16;

/// DBGBVR<n>_EL1, DBGBCR<n>_EL1, DBGWVR<n>_EL1, DBGWCR<n>_EL1 (D19.3):
/// switched per vCPU (MDCR_EL2.TDA is clear), so one guest's breakpoints
/// and watchpoints never arm in another.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DebugRegs {
    pub bvr: [u64; MAX_DEBUG_PAIRS],
    pub bcr: [u64; MAX_DEBUG_PAIRS],
    pub wvr: [u64; MAX_DEBUG_PAIRS],
    pub wcr: [u64; MAX_DEBUG_PAIRS],
}

/// Breakpoints and watchpoints this CPU implements (ID_AA64DFR0_EL1.BRPs
/// [15:12] and WRPs [23:20], each the count minus one).
fn debug_pairs() -> (usize, usize) {
    let dfr0: u64;
    // SAFETY: reading an ID register has no side effects.
    unsafe { asm!("mrs {0}, id_aa64dfr0_el1", out(reg) dfr0, options(nomem, nostack)) };
    ((((dfr0 >> 12) & 0xf) + 1) as usize, (((dfr0 >> 20) & 0xf) + 1) as usize)
}

macro_rules! debug_regs {
    ($($n:literal),*) => {
        impl DebugRegs {
            /// Saves the CPU's first `brps` breakpoints and `wrps` watchpoints.
            fn save(&mut self, brps: usize, wrps: usize) {
                $(
                    if $n < brps {
                        // SAFETY: reading a guest debug register at EL2 has
                        // no side effects; register $n is implemented.
                        unsafe {
                            asm!(concat!("mrs {0}, dbgbvr", $n, "_el1"), out(reg) self.bvr[$n], options(nomem, nostack));
                            asm!(concat!("mrs {0}, dbgbcr", $n, "_el1"), out(reg) self.bcr[$n], options(nomem, nostack));
                        }
                    }
                    if $n < wrps {
                        // SAFETY: as above, for watchpoint $n.
                        unsafe {
                            asm!(concat!("mrs {0}, dbgwvr", $n, "_el1"), out(reg) self.wvr[$n], options(nomem, nostack));
                            asm!(concat!("mrs {0}, dbgwcr", $n, "_el1"), out(reg) self.wcr[$n], options(nomem, nostack));
                        }
                    }
                )*
            }

            /// Loads this vCPU's breakpoints and watchpoints into the CPU.
            fn restore(&self, brps: usize, wrps: usize) {
                $(
                    if $n < brps {
                        // SAFETY: this vCPU's own debug state; EL2 does not
                        // use the EL1 breakpoints.
                        unsafe {
                            asm!(concat!("msr dbgbvr", $n, "_el1, {0}"), in(reg) self.bvr[$n], options(nomem, nostack));
                            asm!(concat!("msr dbgbcr", $n, "_el1, {0}"), in(reg) self.bcr[$n], options(nomem, nostack));
                        }
                    }
                    if $n < wrps {
                        // SAFETY: as above, for watchpoint $n.
                        unsafe {
                            asm!(concat!("msr dbgwvr", $n, "_el1, {0}"), in(reg) self.wvr[$n], options(nomem, nostack));
                            asm!(concat!("msr dbgwcr", $n, "_el1, {0}"), in(reg) self.wcr[$n], options(nomem, nostack));
                        }
                    }
                )*
            }
        }
    };
}

debug_regs!(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);

impl Vcpu {
    /// A vCPU that will start at `pc` with `x0`, with virtual MPIDR `mpidr`.
    pub fn new(pc: u64, x0: u64, mpidr: u64) -> Self {
        let sys = El1Sysregs { sctlr: SCTLR_EL1_RESET, vmpidr: mpidr, ..El1Sysregs::default() };
        Self {
            regs: GuestRegs::at_entry(pc, x0),
            sys,
            vgic: VgicState::default(),
            timer_masked_by_hv: false,
            debug: DebugRegs::default(),
            ptimer: PhysTimer::default(),
            abort_elr: 0,
            abort_streak: 0,
            aborts: 0,
        }
    }

    /// Resets to a fresh start at `pc` (PSCI CPU_ON, SYSTEM_RESET).
    pub fn reset(&mut self, pc: u64, x0: u64) {
        let mpidr = self.sys.vmpidr;
        *self = Self::new(pc, x0, mpidr);
    }

    /// Loads the switched state into the CPU.
    pub fn load(&self) {
        self.sys.restore();
        self.vgic.restore();
        let (brps, wrps) = debug_pairs();
        self.debug.restore(brps, wrps);
    }

    /// Saves the switched state and disarms the guest's timer, so it does
    /// not fire while another vCPU runs.
    pub fn put(&mut self) {
        self.sys.save();
        self.vgic.save();
        let (brps, wrps) = debug_pairs();
        self.debug.save(brps, wrps);
        // Nothing of this guest's stays armed for the next one.
        DebugRegs::default().restore(brps, wrps);
        // SAFETY: CNTV_CTL_EL0 belongs to the vCPU that was just saved.
        unsafe { asm!("msr cntv_ctl_el0, xzr", "isb", options(nomem, nostack)) };
    }
}

/// Identifies the layout [`Vcpu::to_context`] writes: arch aarch64 (0xa64),
/// layout version 2 (version 1 without the debug registers and the
/// physical timer, which [`Vcpu::from_context`] still reads).
pub const CONTEXT_FORMAT: u32 = hypervisor::records::AARCH64_CONTEXT_FORMAT;
pub const CONTEXT_FORMAT_V1: u32 = 0x0a64_0001;
/// Words layout 2 adds: the debug registers, then CNTP_CTL and CNTP_CVAL.
const CONTEXT_V2_WORDS: usize = 4 * MAX_DEBUG_PAIRS + 2;
/// Words in the layout: x0-x30, ELR, SPSR, q0-q31 (two words each), FPCR,
/// FPSR, the EL1 system registers, the list registers, VMCR, AP1R0, and
/// the timer-mask flag.
const CONTEXT_WORDS: usize = 31 + 2 + 64 + 2 + El1Sysregs::WORDS + MAX_LRS + 2 + 1;
const CONTEXT_WORDS_V2: usize = CONTEXT_WORDS + CONTEXT_V2_WORDS;
/// Bytes [`Vcpu::to_context`] writes.
pub const CONTEXT_LEN: usize = CONTEXT_WORDS_V2 * 8;

impl Vcpu {
    /// Serializes the whole context (little-endian words) into `out`;
    /// returns the length used, or `None` if `out` is too small.
    pub fn to_context(&self, out: &mut [u8]) -> Option<usize> {
        let r = &self.regs;
        let mut words = [0u64; CONTEXT_WORDS_V2];
        let mut n = 0;
        let mut push = |w: u64| {
            words[n] = w;
            n += 1;
        };
        r.x.iter().for_each(|&w| push(w));
        push(r.elr);
        push(r.spsr);
        for q in &r.q {
            push(*q as u64);
            push((*q >> 64) as u64);
        }
        push(r.fpcr);
        push(r.fpsr);
        self.sys.words().iter().for_each(|&w| push(w));
        self.vgic.lrs.iter().for_each(|&w| push(w));
        push(self.vgic.vmcr);
        push(self.vgic.ap1r0);
        push(u64::from(self.timer_masked_by_hv));
        let d = &self.debug;
        d.bvr.iter().chain(&d.bcr).chain(&d.wvr).chain(&d.wcr).for_each(|&w| push(w));
        push(self.ptimer.ctl);
        push(self.ptimer.cval);
        let len = CONTEXT_WORDS_V2 * 8;
        let dst = out.get_mut(..len)?;
        for (chunk, w) in dst.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        Some(len)
    }

    /// Rebuilds a context written by [`Self::to_context`], of layout 2
    /// or (without debug registers and physical timer, which start reset)
    /// layout 1.
    pub fn from_context(format: u32, bytes: &[u8]) -> Option<Self> {
        let words_in = match format {
            CONTEXT_FORMAT => CONTEXT_WORDS_V2,
            CONTEXT_FORMAT_V1 => CONTEXT_WORDS,
            _ => return None,
        };
        let src = bytes.get(..words_in * 8)?;
        let mut words = [0u64; CONTEXT_WORDS_V2];
        for (w, chunk) in words.iter_mut().zip(src.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *w = u64::from_le_bytes(b);
        }
        let mut it = words.iter().copied();
        let mut next = || it.next().unwrap_or(0);
        let mut x = [0u64; 31];
        for w in &mut x {
            *w = next();
        }
        let (elr, spsr) = (next(), next());
        let mut q = [0u128; 32];
        for v in &mut q {
            let lo = next();
            *v = u128::from(lo) | (u128::from(next()) << 64);
        }
        let (fp_control, fp_status) = (next(), next());
        let sys_words: [u64; El1Sysregs::WORDS] = core::array::from_fn(|_| next());
        let sys = El1Sysregs::from_words(&sys_words);
        let lrs: [u64; MAX_LRS] = core::array::from_fn(|_| next());
        let (vmcr, ap1r0) = (next(), next());
        let timer_masked_by_hv = next() != 0;
        let mut debug = DebugRegs::default();
        for array in [&mut debug.bvr, &mut debug.bcr, &mut debug.wvr, &mut debug.wcr] {
            for w in array.iter_mut() {
                *w = next();
            }
        }
        let ptimer = PhysTimer { ctl: next(), cval: next() };
        Some(Self {
            regs: GuestRegs { x, elr, spsr, pad: 0, q, fpcr: fp_control, fpsr: fp_status },
            sys,
            vgic: VgicState { lrs, vmcr, ap1r0 },
            timer_masked_by_hv,
            debug,
            ptimer,
            abort_elr: 0,
            abort_streak: 0,
            aborts: 0,
        })
    }
}

pub fn read_cntv_ctl() -> u64 {
    let v: u64;
    // SAFETY: reading the loaded vCPU's timer control.
    unsafe { asm!("mrs {0}, cntv_ctl_el0", out(reg) v, options(nomem, nostack)) };
    v
}

pub fn write_cntv_ctl(v: u64) {
    // SAFETY: changes only the loaded vCPU's virtual timer.
    unsafe { asm!("msr cntv_ctl_el0, {0}", "isb", in(reg) v, options(nomem, nostack)) };
}

pub fn counter() -> u64 {
    let v: u64;
    // SAFETY: reading the virtual counter (CNTVOFF_EL2 = 0) has no side effects.
    unsafe { asm!("isb", "mrs {0}, cntvct_el0", out(reg) v, options(nomem, nostack)) };
    v
}
