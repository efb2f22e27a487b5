//! A virtual CPU's context: the register frame the exit path saves (layout
//! shared with entry.S), the EL1 system registers and the virtual timer
//! (switched only when another vCPU takes this physical CPU), and the
//! virtual GIC state.

use core::arch::asm;

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
}

impl Vcpu {
    /// A vCPU that will start at `pc` with `x0`, with virtual MPIDR `mpidr`.
    pub fn new(pc: u64, x0: u64, mpidr: u64) -> Self {
        let sys = El1Sysregs { sctlr: SCTLR_EL1_RESET, vmpidr: mpidr, ..El1Sysregs::default() };
        Self { regs: GuestRegs::at_entry(pc, x0), sys, vgic: VgicState::default(), timer_masked_by_hv: false }
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
    }

    /// Saves the switched state and disarms the guest's timer, so it does
    /// not fire while another vCPU runs.
    pub fn put(&mut self) {
        self.sys.save();
        self.vgic.save();
        // SAFETY: CNTV_CTL_EL0 belongs to the vCPU that was just saved.
        unsafe { asm!("msr cntv_ctl_el0, xzr", "isb", options(nomem, nostack)) };
    }
}

/// Identifies the layout [`Vcpu::to_context`] writes: arch aarch64 (0xa64),
/// layout version 1.
pub const CONTEXT_FORMAT: u32 = 0x0a64_0001;
/// Words in the layout: x0-x30, ELR, SPSR, q0-q31 (two words each), FPCR,
/// FPSR, the EL1 system registers, the list registers, VMCR, AP1R0, and
/// the timer-mask flag.
const CONTEXT_WORDS: usize = 31 + 2 + 64 + 2 + El1Sysregs::WORDS + MAX_LRS + 2 + 1;

impl Vcpu {
    /// Serializes the whole context (little-endian words) into `out`;
    /// returns the length used, or `None` if `out` is too small.
    pub fn to_context(&self, out: &mut [u8]) -> Option<usize> {
        let r = &self.regs;
        let mut words = [0u64; CONTEXT_WORDS];
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
        let len = CONTEXT_WORDS * 8;
        let dst = out.get_mut(..len)?;
        for (chunk, w) in dst.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        Some(len)
    }

    /// Rebuilds a context written by [`Self::to_context`].
    pub fn from_context(bytes: &[u8]) -> Option<Self> {
        let src = bytes.get(..CONTEXT_WORDS * 8)?;
        let mut words = [0u64; CONTEXT_WORDS];
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
        Some(Self {
            regs: GuestRegs { x, elr, spsr, pad: 0, q, fpcr: fp_control, fpsr: fp_status },
            sys,
            vgic: VgicState { lrs, vmcr, ap1r0 },
            timer_masked_by_hv,
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
