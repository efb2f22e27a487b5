//! A vCPU's state outside the VMCS: the general-purpose registers VM entry
//! does not load (`vmentry.S`), CR2, the x87/SSE state (FXSAVE format,
//! SDM Vol. 1 §10.5.1), the MSRs switched in software, and what the
//! exit handlers emulate (CR8, DR0-DR3).

use core::arch::{asm, global_asm};

use hypervisor::vmx_exit::Gpr;
use hypervisor::x86_guest::msr::GuestMsr;
use x86::msr::{rdmsr, wrmsr};

global_asm!(include_str!("vmentry.S"), options(att_syntax));

/// What `vmx_run` returns (`vmentry.S`).
const RUN_EXITED: u64 = 0;
const RUN_FAIL_VALID: u64 = 2;

extern "C" {
    fn vmx_run(regs: *mut GuestRegs, launched: u64) -> u64;
    /// The host RIP of every VMCS; only its address is used.
    fn vmx_exit_stub();
}

/// The host RIP for the VMCS.
pub fn exit_stub_address() -> u64 {
    vmx_exit_stub as *const () as u64
}

/// General-purpose registers in exit-qualification order (SDM Table
/// 28-3); the RSP slot is unused (RSP is in the VMCS).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct GuestRegs {
    pub gpr: [u64; 16],
}

impl GuestRegs {
    pub fn get(&self, r: Gpr) -> u64 {
        self.gpr[r.index()]
    }

    pub fn set(&mut self, r: Gpr, value: u64) {
        self.gpr[r.index()] = value;
    }
}

/// The 512-byte FXSAVE area, 16-byte aligned (SDM Vol. 1 Table 10-2).
#[derive(Clone, Copy)]
#[repr(C, align(16))]
pub struct FxArea([u8; 512]);

/// FXSAVE image offsets: FCW at 0, MXCSR at 24.
const FX_FCW: usize = 0;
const FX_MXCSR: usize = 24;
/// Power-on values: x87 control word 0x37f, MXCSR 0x1f80 (SDM Vol. 1
/// §8.1.5, §10.2.3.1); everything else 0.
const FCW_DEFAULT: u16 = 0x037f;
const MXCSR_DEFAULT: u32 = 0x1f80;

impl FxArea {
    fn initial() -> Self {
        let mut a = [0u8; 512];
        a[FX_FCW..FX_FCW + 2].copy_from_slice(&FCW_DEFAULT.to_le_bytes());
        a[FX_MXCSR..FX_MXCSR + 4].copy_from_slice(&MXCSR_DEFAULT.to_le_bytes());
        Self(a)
    }
}

/// How an entry attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunResult {
    /// The guest ran and exited; the exit fields say why.
    Exited,
    /// VMLAUNCH/VMRESUME failed before loading the guest: VMfailInvalid,
    /// or VMfailValid (the VM-instruction error field says why), or the
    /// host RSP could not be written.
    EntryFailed { valid: bool },
}

/// One vCPU. The register frame is first (`vmentry.S` takes a pointer to
/// it). Touched only by the physical CPU the vCPU is pinned to.
#[repr(C)]
pub struct Vcpu {
    pub regs: GuestRegs,
    pub fx: FxArea,
    pub cr2: u64,
    /// The guest's TPR as CR8 (CR8 accesses exit; SDM §26.1.3).
    pub cr8: u64,
    /// DR0-DR3 as the guest last wrote them. They are not loaded into the
    /// processor: guest breakpoints are accepted and never fire.
    pub dr: [u64; 4],
    /// Values of [`GuestMsr::SWITCHED`] while the vCPU is not loaded.
    pub msrs: [u64; 5],
    /// Physical address of the VMCS region (4 KiB, revision id first).
    pub vmcs: u64,
    /// Where the vCPU starts (guest-physical).
    pub entry: u64,
    /// The VMCS has been initialised (on the owning CPU).
    pub initialized: bool,
    /// VMLAUNCH succeeded once: later entries use VMRESUME (§27.1).
    pub launched: bool,
}

impl Vcpu {
    pub fn new(vmcs: u64, entry: u64, rax: u64, rbx: u64) -> Self {
        let mut regs = GuestRegs::default();
        regs.set(Gpr::RAX, rax);
        regs.set(Gpr::RBX, rbx);
        Self {
            regs,
            fx: FxArea::initial(),
            cr2: 0,
            cr8: 0,
            dr: [0; 4],
            msrs: [0; 5],
            vmcs,
            entry,
            initialized: false,
            launched: false,
        }
    }

    /// Enters the guest with the current VMCS (this vCPU's) and returns
    /// when it exits.
    pub fn run(&mut self) -> RunResult {
        // SAFETY: this vCPU's VMCS is current on this CPU and complete
        // (initialised by the owning CPU); `vmx_run` saves and restores the
        // callee-saved registers and returns through `vmx_exit_stub` on the
        // stack it was called on, with the guest registers in `regs`.
        let r = unsafe { vmx_run(&raw mut self.regs, u64::from(self.launched)) };
        match r {
            RUN_EXITED => {
                self.launched = true;
                RunResult::Exited
            }
            RUN_FAIL_VALID => RunResult::EntryFailed { valid: true },
            // VMfailInvalid, or the host RSP could not be written.
            _ => RunResult::EntryFailed { valid: false },
        }
    }

    /// Puts this vCPU's processor state (x87/SSE, CR2, switched MSRs) into
    /// the processor.
    pub fn load(&self) {
        // SAFETY: FXRSTOR64 reads 512 bytes from an aligned area that was
        // either the power-on image or written by FXSAVE64 (so MXCSR has no
        // reserved bits); CR4.OSFXSR is set. CR2 is only read by guests.
        // The switched MSRs exist on every x86_64 CPU and hold values the
        // allow-list accepted; the hypervisor itself does not use them.
        unsafe {
            asm!("fxrstor64 [{0}]", in(reg) &raw const self.fx, options(nostack, readonly));
            asm!("mov cr2, {0}", in(reg) self.cr2, options(nostack, nomem));
            for (msr, value) in GuestMsr::SWITCHED.iter().zip(self.msrs) {
                wrmsr(msr.index(), value);
            }
        }
    }

    /// Takes this vCPU's processor state back before another vCPU loads.
    pub fn put(&mut self) {
        let cr2: u64;
        // SAFETY: FXSAVE64 writes 512 bytes to this vCPU's aligned area;
        // reading CR2 and the switched MSRs has no side effects.
        unsafe {
            asm!("fxsave64 [{0}]", in(reg) &raw mut self.fx, options(nostack));
            asm!("mov {0}, cr2", out(reg) cr2, options(nostack, nomem));
            for (slot, msr) in self.msrs.iter_mut().zip(GuestMsr::SWITCHED) {
                *slot = rdmsr(msr.index());
            }
        }
        self.cr2 = cr2;
    }
}
