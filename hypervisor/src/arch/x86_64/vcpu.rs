//! A vCPU's state outside the VMCS: the general-purpose registers VM entry
//! does not load (`vmentry.S`), CR2, the x87/SSE state (FXSAVE format,
//! SDM Vol. 1 §10.5.1), the MSRs switched in software, and what the
//! exit handlers emulate (the local APIC with CR8 as its TPR, DR0-DR3).

use core::arch::{asm, global_asm};

use hypervisor::arch::x86_64::debug::DR6_INIT;
use hypervisor::arch::x86_64::lapic::Lapic;
use hypervisor::arch::x86_64::msr::GuestMsr;
use hypervisor::arch::x86_64::vmx_exit::Gpr;
use x86::msr::{rdmsr, wrmsr};
use x86::vmx::vmcs::{control, guest};

use super::vmcs::{self, VmcsError};

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

/// The VMCS fields that carry a vCPU across a live update: the whole
/// guest-state area a running guest can change (SDM Vol. 3C §25.4), the
/// CR0/CR4 read shadows and a pending event injection (§25.8.3). The new
/// image rebuilds the VMCS (its own controls, host state, EPTP, VPID),
/// writes these back, and derives "IA-32e mode guest" from IA32_EFER.LMA.
pub const SAVED_FIELDS: [u32; 54] = [
    guest::ES_SELECTOR,
    guest::CS_SELECTOR,
    guest::SS_SELECTOR,
    guest::DS_SELECTOR,
    guest::FS_SELECTOR,
    guest::GS_SELECTOR,
    guest::LDTR_SELECTOR,
    guest::TR_SELECTOR,
    guest::ES_LIMIT,
    guest::CS_LIMIT,
    guest::SS_LIMIT,
    guest::DS_LIMIT,
    guest::FS_LIMIT,
    guest::GS_LIMIT,
    guest::LDTR_LIMIT,
    guest::TR_LIMIT,
    guest::GDTR_LIMIT,
    guest::IDTR_LIMIT,
    guest::ES_ACCESS_RIGHTS,
    guest::CS_ACCESS_RIGHTS,
    guest::SS_ACCESS_RIGHTS,
    guest::DS_ACCESS_RIGHTS,
    guest::FS_ACCESS_RIGHTS,
    guest::GS_ACCESS_RIGHTS,
    guest::LDTR_ACCESS_RIGHTS,
    guest::TR_ACCESS_RIGHTS,
    guest::ES_BASE,
    guest::CS_BASE,
    guest::SS_BASE,
    guest::DS_BASE,
    guest::FS_BASE,
    guest::GS_BASE,
    guest::LDTR_BASE,
    guest::TR_BASE,
    guest::GDTR_BASE,
    guest::IDTR_BASE,
    guest::CR0,
    guest::CR3,
    guest::CR4,
    guest::DR7,
    guest::RSP,
    guest::RIP,
    guest::RFLAGS,
    guest::PENDING_DBG_EXCEPTIONS,
    guest::INTERRUPTIBILITY_STATE,
    guest::ACTIVITY_STATE,
    guest::IA32_DEBUGCTL_FULL,
    guest::IA32_SYSENTER_CS,
    guest::IA32_SYSENTER_ESP,
    guest::IA32_SYSENTER_EIP,
    guest::IA32_PAT_FULL,
    guest::IA32_EFER_FULL,
    control::CR0_READ_SHADOW,
    control::CR4_READ_SHADOW,
];

/// Fields saved only when they hold something: an event to inject at the
/// next entry and the PAE PDPTEs (§25.4.2).
const OPTIONAL_FIELDS: [u32; 7] = [
    control::VMENTRY_INTERRUPTION_INFO_FIELD,
    control::VMENTRY_EXCEPTION_ERR_CODE,
    control::VMENTRY_INSTRUCTION_LEN,
    guest::PDPTE0_FULL,
    guest::PDPTE1_FULL,
    guest::PDPTE2_FULL,
    guest::PDPTE3_FULL,
];

/// The layout of an x86_64 vCPU record's context (`VcpuRecord`,
/// `kho/ABI.md` §4.5): little-endian u64 words, in order: the 16 GPRs,
/// CR2, CR8, DR0-3, the 5 switched MSRs, the VMCS region address, the
/// entry point, then [`SAVED_FIELDS`] and the optional fields, then the
/// 512-byte FXSAVE area.
pub const CONTEXT_FORMAT: u32 = hypervisor::records::X86_64_CONTEXT_FORMAT;
const CONTEXT_WORDS: usize = 16 + 2 + 4 + 5 + 2 + SAVED_FIELDS.len() + OPTIONAL_FIELDS.len();
pub const CONTEXT_LEN: usize = CONTEXT_WORDS * 8 + 512;

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
    /// The class of the local APIC's TPR, as CR8 reads it (CR8 accesses
    /// exit, SDM §26.1.3, and go to the APIC; this copy is the context
    /// record's CR8 word).
    pub cr8: u64,
    /// DR0-DR3 as the guest last wrote them, loaded into the processor
    /// with the vCPU (`policy::debug`); DR7 is in the VMCS.
    pub dr: [u64; 4],
    /// DR6 while the vCPU is not loaded. Not in the context record: a
    /// handover restores it to its reset value.
    pub dr6: u64,
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
    /// The VMCS fields ([`SAVED_FIELDS`], then the optional ones) captured
    /// at a freeze or read from a handover, written back after the VMCS is
    /// rebuilt (`restored` says they are pending).
    pub fields: [u64; SAVED_FIELDS.len() + OPTIONAL_FIELDS.len()],
    pub restored: bool,
    /// The virtual local APIC (x2APIC ID = the vCPU index).
    pub lapic: Lapic,
}

impl Vcpu {
    /// vCPU `index` of its partition, starting at `entry` with RAX and RBX.
    pub fn new(index: u32, vmcs: u64, entry: u64, rax: u64, rbx: u64) -> Self {
        let mut regs = GuestRegs::default();
        regs.set(Gpr::RAX, rax);
        regs.set(Gpr::RBX, rbx);
        Self {
            regs,
            fx: FxArea::initial(),
            cr2: 0,
            cr8: 0,
            dr: [0; 4],
            dr6: DR6_INIT,
            msrs: [0; 5],
            vmcs,
            entry,
            initialized: false,
            launched: false,
            fields: [0; SAVED_FIELDS.len() + OPTIONAL_FIELDS.len()],
            restored: false,
            lapic: Lapic::new(index),
        }
    }

    /// Resets the vCPU for a start-up IPI, after INIT (SDM Vol. 3A
    /// §10.1.1, Table 10-1): general-purpose registers, CR2, CR8 and DR0-3
    /// clear, DR6 at its reset value, the local APIC as at power-on with
    /// x2APIC ID `index`
    /// (§11.4.7.3), and the VMCS to be built afresh (its guest state is
    /// written on first entry). The x87/SSE state and the switched MSRs
    /// are kept, as INIT keeps them; the VMCS region stays the same.
    pub fn reset_for_startup(&mut self, index: u32) {
        self.regs = GuestRegs::default();
        self.cr2 = 0;
        self.cr8 = 0;
        self.dr = [0; 4];
        self.dr6 = DR6_INIT;
        self.initialized = false;
        self.launched = false;
        self.fields = [0; SAVED_FIELDS.len() + OPTIONAL_FIELDS.len()];
        self.restored = false;
        self.lapic = Lapic::new(index);
    }

    /// Reads the saved fields from this vCPU's VMCS, which must be
    /// current on this CPU.
    pub fn capture(&mut self) -> Result<(), VmcsError> {
        for (slot, &field) in self.fields.iter_mut().zip(SAVED_FIELDS.iter().chain(OPTIONAL_FIELDS.iter())) {
            *slot = vmcs::read(field)?;
        }
        Ok(())
    }

    /// Writes the captured fields into this vCPU's VMCS (current, and just
    /// rebuilt), optional ones only when set.
    pub fn write_back(&self) -> Result<(), VmcsError> {
        for (k, (&value, &field)) in
            self.fields.iter().zip(SAVED_FIELDS.iter().chain(OPTIONAL_FIELDS.iter())).enumerate()
        {
            if k < SAVED_FIELDS.len() || value != 0 {
                vmcs::write(field, value)?;
            }
        }
        Ok(())
    }

    /// Serialises the vCPU ([`CONTEXT_FORMAT`]); `None` if `out` is short.
    pub fn to_context(&self, out: &mut [u8]) -> Option<usize> {
        let out = out.get_mut(..CONTEXT_LEN)?;
        let words = self
            .regs
            .gpr
            .iter()
            .copied()
            .chain([self.cr2, self.cr8])
            .chain(self.dr)
            .chain(self.msrs)
            .chain([self.vmcs, self.entry])
            .chain(self.fields);
        for (chunk, w) in out.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        out[CONTEXT_WORDS * 8..].copy_from_slice(&self.fx.0);
        Some(CONTEXT_LEN)
    }

    /// Rebuilds a vCPU from [`Vcpu::to_context`]'s bytes. Its VMCS is
    /// rebuilt on first entry, then the saved fields are written back.
    pub fn from_context(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != CONTEXT_LEN {
            return None;
        }
        let mut words = [0u64; CONTEXT_WORDS];
        for (w, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *w = u64::from_le_bytes(b);
        }
        let mut v = Self::new(0, words[27], words[28], 0, 0);
        v.regs.gpr.copy_from_slice(&words[..16]);
        v.cr2 = words[16];
        v.cr8 = words[17];
        v.dr.copy_from_slice(&words[18..22]);
        v.msrs.copy_from_slice(&words[22..27]);
        v.fields.copy_from_slice(&words[29..]);
        v.fx.0.copy_from_slice(&bytes[CONTEXT_WORDS * 8..]);
        v.restored = true;
        Some(v)
    }

    /// Enters the guest with the current VMCS (this vCPU's) and returns
    /// when it exits.
    pub fn run(&mut self) -> RunResult {
        // `vmx_run` saves and restores the callee-saved registers and
        // returns through `vmx_exit_stub` on the stack it was called on.
        // SAFETY: this vCPU's VMCS is current on this CPU and complete
        // (initialised by the owning CPU); guest registers go to `regs`.
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

    /// Runs the vCPU under SVM on CPU `cpu` with its VMCB (at the
    /// address VMX would keep its VMCS region) and returns when it exits;
    /// a VMRUN that could not enter exits with VMEXIT_INVALID, which the
    /// exit handler reports.
    pub fn run_svm(&mut self, cpu: usize) -> RunResult {
        // SAFETY: the caller (`run::run_cpu`) runs this vCPU on the CPU it
        // is pinned to, `cpu`, after `run::prepare_entry` built its VMCB.
        unsafe { super::svm::run_vcpu(&mut self.regs, self.vmcs, cpu) };
        RunResult::Exited
    }

    /// Puts this vCPU's processor state (x87/SSE, CR2, switched MSRs,
    /// DR0-DR3 and DR6) into the processor.
    pub fn load(&self) {
        // The FXRSTOR64 area is the power-on image or was written by
        // FXSAVE64, here or in the previous image (checksummed vCPU record),
        // so MXCSR has no reserved bits. CR2 is only read by guests. The
        // switched MSRs exist on every x86_64 CPU, hold values the allow-list
        // accepted, and are not used by the hypervisor itself.
        // SAFETY: 512 aligned bytes as above; CR4.OSFXSR is set.
        unsafe {
            asm!("fxrstor64 [{0}]", in(reg) &raw const self.fx, options(nostack, readonly));
            asm!("mov cr2, {0}", in(reg) self.cr2, options(nostack, nomem));
            for (msr, value) in GuestMsr::SWITCHED.iter().zip(self.msrs) {
                wrmsr(msr.index(), value);
            }
        }
        load_debug_registers(&self.dr, self.dr6);
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
        self.dr6 = read_dr6();
    }
}

/// Loads DR0-DR3 and DR6. The hypervisor sets no breakpoints of its own
/// and VM exit leaves DR7 = 0x400 (SDM §28.5.1), so in root operation
/// these values arm nothing; in the guest, its DR7 (from the VMCS) does.
pub fn load_debug_registers(dr: &[u64; 4], dr6: u64) {
    // SAFETY: writing debug registers at CPL 0 has no effect while DR7
    // enables nothing, which holds in root operation (above). DR6 holds a
    // value `policy::debug::write_value` produced or the processor set
    // (bits 63:32 clear, so no #GP).
    unsafe {
        asm!(
            "mov dr0, {0}", "mov dr1, {1}", "mov dr2, {2}", "mov dr3, {3}", "mov dr6, {4}",
            in(reg) dr[0], in(reg) dr[1], in(reg) dr[2], in(reg) dr[3], in(reg) dr6,
            options(nostack, nomem)
        );
    }
}

/// Writes one breakpoint address register (`n` < 4) or DR6 (`n` = 6);
/// other numbers are ignored.
pub fn write_debug_register(n: usize, value: u64) {
    // SAFETY: as in `load_debug_registers`.
    unsafe {
        match n {
            0 => asm!("mov dr0, {0}", in(reg) value, options(nostack, nomem)),
            1 => asm!("mov dr1, {0}", in(reg) value, options(nostack, nomem)),
            2 => asm!("mov dr2, {0}", in(reg) value, options(nostack, nomem)),
            3 => asm!("mov dr3, {0}", in(reg) value, options(nostack, nomem)),
            6 => asm!("mov dr6, {0}", in(reg) value, options(nostack, nomem)),
            _ => {}
        }
    }
}

/// The processor's DR6: the loaded vCPU's, updated by any #DB it took.
pub fn read_dr6() -> u64 {
    let v: u64;
    // SAFETY: reading DR6 at CPL 0 has no side effects.
    unsafe { asm!("mov {0}, dr6", out(reg) v, options(nostack, nomem)) };
    v
}
