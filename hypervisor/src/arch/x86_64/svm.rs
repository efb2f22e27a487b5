//! Enabling AMD SVM on a CPU (AMD64 APM Vol. 2 §15.4 "Enabling SVM"):
//! check CPUID and VM_CR.SVMDIS, set EFER.SVME (and EFER.NXE, which nested
//! tables need for their no-execute bit, §15.25.5), and give the processor
//! a host save area (VM_HSAVE_PA, §15.30.4) in which VMRUN keeps the host
//! state. Then the first guest code under SVM ([`first_guest`]): a
//! real-mode guest of three instructions in a page the nested tables map,
//! entered with VMRUN (`svmentry.S`) until it halts, run when there are
//! no guests to show the machine works. Then the backend the partitions
//! run on under SVM: each vCPU's VMCB built as a multiboot2 loader leaves
//! the machine ([`init_vmcb`]) or as a start-up IPI does
//! ([`write_sipi_state`]), its local APIC's interrupt injected with
//! EVENTINJ or waited for with V_IRQ ([`inject_apic_interrupt`]), and
//! the slice bounded by this CPU's local APIC timer in TSC-deadline mode,
//! whose interrupt the INTR intercept turns into an exit
//! ([`arm_slice_timer`]).

use core::arch::global_asm;

use hypervisor::arch::x86_64::cr::GuestCrPolicy;
use hypervisor::arch::x86_64::debug::{DR6_INIT, DR7_INIT};
use hypervisor::arch::x86_64::lapic::Lapic;
use hypervisor::arch::x86_64::msr::PAT_DEFAULT;
use hypervisor::arch::x86_64::startup::{self, Segment};
use hypervisor::arch::x86_64::svm_caps::{SvmCaps, SvmCpuid, SvmError};
use hypervisor::arch::x86_64::vmcb::{
    attrib_from_vmx_ar, control, cr_write_intercept, instruction_len, misc1, misc2, save, vintr, SvmExit, DR_ALL,
    EFER_SVME, EVENT_VALID, EXCEPTION_UD, INTERRUPT_SHADOW_ACTIVE, IOPM_BYTES, MSRPM_BYTES, SEG_ATTRIB, SEG_BASE,
    SEG_LIMIT, SEG_SELECTOR, VMCB_BYTES,
};
use hypervisor::frames::FrameAllocator;
use hypervisor::stage2::{Attrs, LinearMap, Npt, Perms, Stage2Table};
use loader::PhysRange;
use x86::msr::{rdmsr, wrmsr, IA32_EFER};

use super::guest::Vmcb as VmcbRef;
use super::vcpu::GuestRegs;
use super::MAX_CPUS;

global_asm!(include_str!("svmentry.S"), options(att_syntax));

extern "C" {
    fn svm_run(regs: *mut GuestRegs, vmcb_pa: u64, host_area_pa: u64);
}

/// The VMRUN of a vCPU whose VMCB is at `vmcb_pa`, from CPU `cpu`: its
/// RAX goes in through the VMCB (VMRUN loads it from there), the other
/// registers through `regs`. Returns once it exits.
///
/// # Safety
/// SVM is enabled on this CPU, which is `cpu`; the VMCB is complete
/// ([`init_vmcb`]), identity-mapped, and belongs to a vCPU pinned here.
pub unsafe fn run_vcpu(regs: &mut GuestRegs, vmcb_pa: u64, cpu: usize) {
    // SAFETY: the caller's contract.
    let vmcb = unsafe { VmcbRef::new(vmcb_pa) };
    vmcb.set(save::RAX, regs.gpr[0]);
    // SAFETY: this CPU's own area, used only by `svm_run` on this CPU;
    // `cpu` < MAX_CPUS (it indexes the machine's run queues).
    let host_area = unsafe { core::ptr::addr_of_mut!(HOST_VMSAVE_AREAS[cpu.min(MAX_CPUS - 1)]) } as u64;
    // SAFETY: the caller's contract; VMRUN is intercepted, the ASID is
    // not 0 and the guest's EFER has SVME (`init_vmcb`).
    unsafe { svm_run(regs, vmcb_pa, host_area) };
    regs.gpr[0] = vmcb.get(save::RAX);
    // The first entry flushed the TLB (`init_vmcb`); later ones need not.
    vmcb.set(control::GUEST_ASID, vmcb.get(control::GUEST_ASID) & 0xffff_ffff);
}

/// The I/O and MSR permission maps every VMCB points at: all ones, so
/// every port and MSR access is intercepted (APM Vol. 2 §15.10.1,
/// §15.11), as VMX runs without I/O or MSR bitmaps. Filled by
/// [`permission_maps`] at boot.
#[repr(C, align(4096))]
struct PermissionMaps {
    iopm: [u8; IOPM_BYTES],
    msrpm: [u8; MSRPM_BYTES],
}

static mut PERMISSION_MAPS: PermissionMaps = PermissionMaps { iopm: [0; IOPM_BYTES], msrpm: [0; MSRPM_BYTES] };

/// Fills the permission maps (once, on the boot CPU before any guest
/// runs) and returns their addresses: (IOPM, MSRPM).
pub fn permission_maps() -> (u64, u64) {
    // SAFETY: called once on the boot CPU before any VMRUN reads the maps
    // and before the other CPUs run guests; afterwards only read.
    let maps = unsafe { &mut *core::ptr::addr_of_mut!(PERMISSION_MAPS) };
    maps.iopm.fill(0xff);
    maps.msrpm.fill(0xff);
    (core::ptr::addr_of!(maps.iopm) as u64, core::ptr::addr_of!(maps.msrpm) as u64)
}

/// Guest segment state as a multiboot2 loader leaves it (Multiboot2 spec
/// §3.3): flat 4 GiB 32-bit code (selector 0x08) and data (0x10), in VMX
/// access rights converted to the VMCB's attrib; LDTR unusable, TR a busy
/// 32-bit TSS (SVM checks neither, but a guest reading them sees what
/// VMX shows).
const GUEST_SEL_CODE: u16 = 0x08;
const GUEST_SEL_DATA: u16 = 0x10;
const FLAT_LIMIT: u32 = 0xffff_ffff;
const AR_CODE32: u64 = 0xc09b;
const AR_DATA32: u64 = 0xc093;
const AR_TSS32_BUSY: u64 = 0x008b;
const TR_LIMIT: u32 = 0xff;

/// Writes one segment of a VMCB: selector, attrib and limit share the
/// first 8 bytes (Table B-2), the base the next.
fn put_segment(vmcb: VmcbRef, at: usize, seg: Segment) {
    let word = u64::from(seg.selector)
        | (u64::from(attrib_from_vmx_ar(u64::from(seg.rights))) << 16)
        | (u64::from(seg.limit) << 32);
    vmcb.set(at + SEG_SELECTOR, word);
    vmcb.set(at + SEG_BASE, seg.base);
}

const _: () = assert!(SEG_ATTRIB == 2 && SEG_LIMIT == 4 && SEG_SELECTOR == 0);

/// What a vCPU's VMCB is built from.
pub struct VmcbSpec {
    pub asid: u32,
    /// The partition's NPT root (nCR3).
    pub ncr3: u64,
    pub iopm: u64,
    pub msrpm: u64,
    /// Where the vCPU starts (guest-physical).
    pub entry: u64,
}

/// The control area this image owns in a vCPU's VMCB: the intercepts,
/// the permission maps, the ASID (with a TLB flush on the next VMRUN),
/// V_INTR_MASKING and nested paging. Everything the guest's execution
/// left there (EVENTINJ, V_TPR and V_IRQ, the interrupt shadow) and the
/// state-save area are kept. VMCB clean bits are all clear: the
/// processor caches nothing of the VMCB across this change.
fn write_controls(vmcb: VmcbRef, spec: &VmcbSpec) {
    vmcb.set32(control::INTERCEPT_CR, cr_write_intercept(0) | cr_write_intercept(4));
    vmcb.set32(control::INTERCEPT_DR, DR_ALL);
    vmcb.set32(control::INTERCEPT_EXCEPTIONS, EXCEPTION_UD);
    vmcb.set32(
        control::INTERCEPT_MISC1,
        misc1::INTR
            | misc1::NMI
            | misc1::RDPMC
            | misc1::CPUID
            | misc1::INVD
            | misc1::HLT
            | misc1::INVLPGA
            | misc1::IOIO_PROT
            | misc1::MSR_PROT
            | misc1::SHUTDOWN,
    );
    vmcb.set32(
        control::INTERCEPT_MISC2,
        misc2::VMRUN
            | misc2::VMMCALL
            | misc2::VMLOAD
            | misc2::VMSAVE
            | misc2::STGI
            | misc2::CLGI
            | misc2::SKINIT
            | misc2::MONITOR
            | misc2::MWAIT
            | misc2::MWAIT_ARMED
            | misc2::XSETBV,
    );
    vmcb.set(control::IOPM_BASE_PA, spec.iopm);
    vmcb.set(control::MSRPM_BASE_PA, spec.msrpm);
    // TLB_CONTROL 1 (bits 39:32 of the ASID word): flush every ASID's
    // entries on this VMRUN, the only flush without FLUSH_BY_ASID; the
    // ASID's entries may predate the tree (ASIDs are reused).
    vmcb.set(control::GUEST_ASID, u64::from(spec.asid) | (1 << 32));
    vmcb.set(control::V_INTR, vmcb.get(control::V_INTR) | vintr::INTR_MASKING);
    vmcb.set(control::VMCB_CLEAN, 0);
    vmcb.set(control::NP_ENABLE, 1);
    vmcb.set(control::N_CR3, spec.ncr3);
}

/// Adopts a VMCB a previous image left (its vCPU's guest state, in the
/// processor's architectural format, stays where it is: nothing is
/// copied): this image's control area is written over the old one's
/// (its permission maps live in this image, and the ASID is this
/// partition's), the rest kept.
pub fn adopt_vmcb(vmcb: VmcbRef, spec: &VmcbSpec) {
    write_controls(vmcb, spec);
    // The guest's EFER must keep SVME (§15.5.1); a handover cannot clear
    // it for us to trip over at VMRUN.
    vmcb.set(save::EFER, vmcb.get(save::EFER) | EFER_SVME);
}

/// Builds a vCPU's VMCB from zero (APM Vol. 2 Appendix B): the intercepts
/// that give the guest the same policy as VMX does (CPUID, every MSR and
/// port, CR0/CR4 writes, every DR access, HLT, INVD, RDPMC, #UD for
/// Intel's VMCALL, the SVM and other hidden instructions, shutdown, and
/// INTR and NMI, which end the slice), its ASID with a TLB flush on the
/// first VMRUN, nested paging with its NPT, V_INTR_MASKING (so CR8 is
/// V_TPR and the host's RFLAGS.IF masks physical interrupts), and the
/// guest state as a multiboot2 loader leaves it: 32-bit protected mode,
/// paging off.
pub fn init_vmcb(vmcb: VmcbRef, spec: &VmcbSpec, policy: &GuestCrPolicy) {
    // SAFETY: `VmcbRef`'s contract: a whole page of this vCPU's, not in
    // a VMRUN.
    unsafe { core::ptr::write_bytes(vmcb.address() as *mut u8, 0, VMCB_BYTES) };
    write_controls(vmcb, spec);
    let code = Segment { selector: GUEST_SEL_CODE, base: 0, limit: FLAT_LIMIT, rights: AR_CODE32 as u32 };
    let data = Segment { selector: GUEST_SEL_DATA, base: 0, limit: FLAT_LIMIT, rights: AR_DATA32 as u32 };
    put_segment(vmcb, save::CS, code);
    for at in [save::SS, save::DS, save::ES, save::FS, save::GS] {
        put_segment(vmcb, at, data);
    }
    put_segment(vmcb, save::TR, Segment { selector: 0, base: 0, limit: TR_LIMIT, rights: AR_TSS32_BUSY as u32 });
    vmcb.set(save::CR0, policy.initial_cr0().real);
    vmcb.set(save::CR4, policy.initial_cr4().real);
    vmcb.set(save::EFER, EFER_SVME);
    vmcb.set(save::RFLAGS, RFLAGS_FIXED);
    vmcb.set(save::RIP, spec.entry);
    vmcb.set(save::DR6, DR6_INIT);
    vmcb.set(save::DR7, DR7_INIT);
    vmcb.set(save::G_PAT, PAT_DEFAULT);
}

/// Overwrites the guest state of a VMCB [`init_vmcb`] just built with
/// where a start-up IPI with `vector` starts a vCPU: real-address mode at
/// VV00:0000, the rest as INIT leaves it (`startup::sipi_state`), which
/// SVM runs natively under nested paging. Returns the EDX the vCPU
/// starts with.
pub fn write_sipi_state(vmcb: VmcbRef, policy: &GuestCrPolicy, vector: u8) -> u64 {
    let signature = raw_cpuid::cpuid!(1).eax;
    let s = startup::sipi_state(vector, signature);
    vmcb.set(save::CR0, policy.reset_cr0().real);
    put_segment(vmcb, save::CS, s.cs);
    for at in [save::SS, save::DS, save::ES, save::FS, save::GS] {
        put_segment(vmcb, at, s.data);
    }
    put_segment(vmcb, save::LDTR, s.ldtr);
    put_segment(vmcb, save::TR, s.tr);
    let table = Segment { selector: 0, base: 0, limit: s.table_limit, rights: 0 };
    put_segment(vmcb, save::GDTR, table);
    put_segment(vmcb, save::IDTR, table);
    vmcb.set(save::RIP, s.rip);
    vmcb.set(save::RFLAGS, s.rflags);
    vmcb.set(save::DR7, DR7_INIT);
    s.rdx
}

/// RFLAGS.IF (SDM Vol. 1 §3.4.3.3).
const RFLAGS_IF: u64 = 1 << 9;

/// Injects the interrupt the vCPU's APIC would deliver now, through
/// EVENTINJ as an external interrupt (APM Vol. 2 §15.20), when the guest
/// can take it: RFLAGS.IF set, no interrupt shadow, no event already
/// being injected. Otherwise V_IRQ with the VINTR intercept brings the
/// vCPU back as soon as it can (§15.21.4, the interrupt window). V_TPR
/// carries the APIC's TPR class, which guest CR8 accesses read and write.
pub fn inject_apic_interrupt(vmcb: VmcbRef, lapic: &mut Lapic) {
    let mut window = false;
    if let Some(vector) = lapic.deliverable() {
        let busy = vmcb.get(control::EVENTINJ) & EVENT_VALID != 0;
        let open = vmcb.get(save::RFLAGS) & RFLAGS_IF != 0
            && vmcb.get(control::INTERRUPT_SHADOW) & INTERRUPT_SHADOW_ACTIVE == 0;
        if open && !busy {
            lapic.acknowledge(vector);
            // Type 0: an external interrupt.
            vmcb.set(control::EVENTINJ, u64::from(vector) | EVENT_VALID);
        } else {
            window = true;
        }
    }
    let tpr = u64::from(lapic.tpr >> 4) & vintr::TPR_MASK;
    let mut v_intr = (vmcb.get(control::V_INTR) & !(vintr::TPR_MASK | vintr::IRQ | vintr::IGN_TPR)) | tpr;
    let mut misc = vmcb.get32(control::INTERCEPT_MISC1) & !misc1::VINTR;
    if window {
        v_intr |= vintr::IRQ | vintr::IGN_TPR;
        misc |= misc1::VINTR;
    }
    vmcb.set(control::V_INTR, v_intr);
    vmcb.set32(control::INTERCEPT_MISC1, misc);
}

/// The local APIC timer (SDM Vol. 3A §11.5.4): the LVT timer register,
/// its initial and current counts, and the divide configuration (1011b:
/// divide by 1). TSC-deadline mode (LVT mode 10b, §11.5.4.1) where the
/// CPU has it; else one-shot mode (00b) counting the APIC's own clock,
/// whose rate is measured against the TSC at boot.
const LVT_TIMER: usize = 0x320;
const TIMER_INITIAL: usize = 0x380;
const TIMER_CURRENT: usize = 0x390;
const TIMER_DIVIDE: usize = 0x3e0;
const DIVIDE_BY_1: u32 = 0b1011;
const LVT_TSC_DEADLINE: u32 = 0b10 << 17;
const LVT_MASKED: u32 = 1 << 16;
pub const SLICE_VECTOR: u32 = 0xef;
const IA32_TSC_DEADLINE: u32 = 0x6e0;
/// CPUID.01H:ECX bit 24: TSC-deadline mode.
const CPUID_TSC_DEADLINE: u32 = 1 << 24;
/// How long the APIC timer is measured for.
const CALIBRATION_US: u64 = 10_000;

/// How slices are timed on this machine: 0 until [`calibrate_slice_timer`]
/// ran, `u64::MAX` for TSC-deadline mode, else the APIC timer's rate in Hz.
static APIC_TIMER_HZ: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
const TSC_DEADLINE_MODE: u64 = u64::MAX;

/// The slice timer's rate for the handover's `svm` record
/// (`calibrate_slice_timer`'s value).
pub fn slice_timer_rate() -> u64 {
    APIC_TIMER_HZ.load(core::sync::atomic::Ordering::Relaxed)
}

/// Takes the slice timer's rate from a handover instead of measuring it
/// (the blackout has no 10 ms to spare). Refuses 0, and TSC-deadline
/// mode on a CPU without it.
pub fn adopt_slice_timer_rate(rate: u64) -> Result<(), &'static str> {
    let deadline = raw_cpuid::cpuid!(1).ecx & CPUID_TSC_DEADLINE != 0;
    match rate {
        0 => Err("svm-apic-timer-rate-zero"),
        TSC_DEADLINE_MODE if !deadline => Err("svm-tsc-deadline-missing"),
        _ => {
            APIC_TIMER_HZ.store(rate, core::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
    }
}

/// How the slice timer runs, for the boot event.
pub fn slice_timer_mode() -> &'static str {
    match APIC_TIMER_HZ.load(core::sync::atomic::Ordering::Relaxed) {
        0 => "none",
        TSC_DEADLINE_MODE => "tsc-deadline",
        _ => "apic-one-shot",
    }
}

/// Chooses the slice timer (on the boot CPU, before any guest runs):
/// TSC-deadline mode if CPUID offers it, else the one-shot APIC timer,
/// whose rate is measured here over [`CALIBRATION_US`] of the TSC
/// (`tsc_hz`). `None` if the APIC timer does not count.
pub fn calibrate_slice_timer(tsc_hz: u64) -> Option<u64> {
    use core::sync::atomic::Ordering;
    if raw_cpuid::cpuid!(1).ecx & CPUID_TSC_DEADLINE != 0 {
        APIC_TIMER_HZ.store(TSC_DEADLINE_MODE, Ordering::Relaxed);
        return Some(TSC_DEADLINE_MODE);
    }
    let smp = |reg, value| super::smp::apic_write_reg(reg, value);
    smp(TIMER_DIVIDE, DIVIDE_BY_1);
    smp(LVT_TIMER, LVT_MASKED | SLICE_VECTOR);
    smp(TIMER_INITIAL, u32::MAX);
    let start = super::tsc::now();
    let wait = tsc_hz / 1_000_000 * CALIBRATION_US;
    while super::tsc::now() - start < wait {
        core::hint::spin_loop();
    }
    let counted = u64::from(u32::MAX - super::smp::apic_read_reg(TIMER_CURRENT));
    let elapsed = super::tsc::now() - start;
    smp(TIMER_INITIAL, 0);
    let hz = u64::try_from(u128::from(counted) * u128::from(tsc_hz) / u128::from(elapsed.max(1))).ok()?;
    if hz == 0 {
        return None;
    }
    APIC_TIMER_HZ.store(hz, Ordering::Relaxed);
    Some(hz)
}

/// Puts this CPU's local APIC timer in the mode [`calibrate_slice_timer`]
/// chose, disarmed, with the slice vector.
pub fn init_slice_timer() {
    let deadline = APIC_TIMER_HZ.load(core::sync::atomic::Ordering::Relaxed) == TSC_DEADLINE_MODE;
    super::smp::apic_write_reg(TIMER_DIVIDE, DIVIDE_BY_1);
    super::smp::apic_write_reg(LVT_TIMER, if deadline { LVT_TSC_DEADLINE } else { 0 } | SLICE_VECTOR);
}

/// Arms the slice timer for TSC value `deadline` (the TSC now being
/// `now`, at `tsc_hz`): its interrupt makes the running guest exit (INTR
/// intercept), and is then taken by the host (`hv_host_interrupt`) once
/// `svm_run` sets GIF again. A deadline in the past fires at once.
pub fn arm_slice_timer(deadline: u64, now: u64, tsc_hz: u64) {
    let rate = APIC_TIMER_HZ.load(core::sync::atomic::Ordering::Relaxed);
    if rate == TSC_DEADLINE_MODE {
        // SAFETY: IA32_TSC_DEADLINE exists in TSC-deadline mode (CPUID,
        // `calibrate_slice_timer`); writing it only arms the timer.
        unsafe { wrmsr(IA32_TSC_DEADLINE, deadline.max(1)) };
        return;
    }
    let ticks = u128::from(deadline.saturating_sub(now)) * u128::from(rate) / u128::from(tsc_hz.max(1));
    let count = u32::try_from(ticks).unwrap_or(u32::MAX).max(1);
    super::smp::apic_write_reg(TIMER_INITIAL, count);
}

/// VM_CR and VM_HSAVE_PA (APM Vol. 2 §15.30.1, §15.30.4).
const MSR_VM_CR: u32 = 0xc001_0114;
const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
/// EFER bit 11, NXE (APM Vol. 2 §3.1.7); SVME is `vmcb::EFER_SVME`.
const EFER_NXE: u64 = 1 << 11;

/// A host save area per CPU: one 4 KiB page, its format the processor's own.
#[repr(C, align(4096))]
struct HostSaveArea([u8; 4096]);

static mut HOST_SAVE_AREAS: [HostSaveArea; MAX_CPUS] = [const { HostSaveArea([0; 4096]) }; MAX_CPUS];
/// Where VMSAVE keeps each CPU's FS, GS, TR, LDTR and syscall MSRs while
/// a guest runs (`svmentry.S`): a page in the VMCB's format.
static mut HOST_VMSAVE_AREAS: [HostSaveArea; MAX_CPUS] = [const { HostSaveArea([0; 4096]) }; MAX_CPUS];

/// The CPUID values SVM is described by, on the calling CPU.
pub fn read_cpuid() -> SvmCpuid {
    let max = raw_cpuid::cpuid!(0x8000_0000).eax;
    let ext = if max >= 0x8000_0001 { raw_cpuid::cpuid!(0x8000_0001).ecx } else { 0 };
    let mut out = SvmCpuid { max_extended_leaf: max, ext_features_ecx: ext, ..SvmCpuid::default() };
    if max >= 0x8000_000a {
        let svm = raw_cpuid::cpuid!(0x8000_000a);
        (out.svm_eax, out.svm_ebx, out.svm_edx) = (svm.eax, svm.ebx, svm.edx);
    }
    out
}

/// Enables SVM on the calling CPU, with host save area `cpu`.
pub fn enable(cpu: usize) -> Result<SvmCaps, SvmError> {
    if cpu >= MAX_CPUS {
        return Err(SvmError::TooManyCpus);
    }
    // SAFETY: VM_CR exists when CPUID reports SVM, and `decode` reads it
    // only then.
    let caps = SvmCaps::decode(read_cpuid(), || unsafe { rdmsr(MSR_VM_CR) })?;
    // SAFETY: each CPU uses only its own area (indexed by `cpu`); after
    // this the processor owns it.
    let area = unsafe { core::ptr::addr_of_mut!(HOST_SAVE_AREAS[cpu]) } as u64;
    // NXE only gives bit 63 of page-table entries its meaning, and the
    // host's own tables never set it.
    // SAFETY: SVM exists and is not disabled (checked above), so EFER.SVME
    // may be set; the save area is 4 KiB aligned and identity-mapped.
    unsafe {
        wrmsr(IA32_EFER, rdmsr(IA32_EFER) | EFER_SVME | EFER_NXE);
        wrmsr(MSR_VM_HSAVE_PA, area);
    }
    Ok(caps)
}

/// A VMCB page, written and read as the plain memory it is (APM Vol. 2
/// Appendix B).
#[repr(C, align(4096))]
struct Vmcb([u8; VMCB_BYTES]);

impl Vmcb {
    fn put(&mut self, offset: usize, bytes: &[u8]) {
        self.0[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    fn set16(&mut self, offset: usize, value: u16) {
        self.put(offset, &value.to_le_bytes());
    }

    fn set32(&mut self, offset: usize, value: u32) {
        self.put(offset, &value.to_le_bytes());
    }

    fn set64(&mut self, offset: usize, value: u64) {
        self.put(offset, &value.to_le_bytes());
    }

    fn get64(&self, offset: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[offset..offset + 8]);
        u64::from_le_bytes(b)
    }

    fn segment(&mut self, at: usize, selector: u16, attrib: u16, limit: u32, base: u64) {
        self.set16(at + SEG_SELECTOR, selector);
        self.set16(at + SEG_ATTRIB, attrib);
        self.set32(at + SEG_LIMIT, limit);
        self.set64(at + SEG_BASE, base);
    }
}

#[repr(C, align(4096))]
struct Page([u8; 4096]);

/// The first guest's VMCB, code page and nested-table pages.
static mut FIRST_VMCB: Vmcb = Vmcb([0; VMCB_BYTES]);
static mut FIRST_CODE: Page = Page([0; 4096]);
static mut FIRST_TABLES: [Page; 4] = [const { Page([0; 4096]) }; 4];

/// Guest-physical address of the first guest's code.
const FIRST_GPA: u64 = 0x1000;
/// `cpuid` (0f a2), `vmmcall` (0f 01 d9), `mov al, [0x3000]` (a0 00 30:
/// a read of a page the nested table does not map), `hlt` (f4): 16-bit
/// code.
const FIRST_CODE_BYTES: [u8; 9] =
    [0x0f, 0xa2, 0x0f, 0x01, 0xd9, 0xa0, FIRST_UNMAPPED as u8, (FIRST_UNMAPPED >> 8) as u8, 0xf4];
/// The unmapped guest-physical address the guest reads, and the length
/// of that instruction (skipped after the nested page fault).
const FIRST_UNMAPPED: u64 = 0x3000;
const FIRST_READ_LEN: u64 = 3;
/// Real-mode segment attributes in the VMCB's packed form (Table B-2):
/// present, S, code execute/read accessed (0x9b) or data read/write
/// accessed (0x93); LDTR present LDT (0x82); TR present busy 16-bit TSS
/// (0x83).
const REAL_CODE: u16 = 0x9b;
const REAL_DATA: u16 = 0x93;
const REAL_LDT: u16 = 0x82;
const REAL_TSS: u16 = 0x83;
/// CR0.ET and RFLAGS bit 1 at reset.
const CR0_ET: u64 = 1 << 4;
const RFLAGS_FIXED: u64 = 1 << 1;
/// The first guest's ASID: any but the host's 0.
const FIRST_ASID: u32 = 1;
/// Exits the first guest may take before it must have halted.
const FIRST_EXITS_MAX: usize = 8;

/// What the first guest did: its exits in order, the guest-physical
/// address of its nested page fault, and where it stopped.
pub struct FirstGuest {
    pub exits: [Option<SvmExit>; FIRST_EXITS_MAX],
    pub fault_gpa: Option<u64>,
    pub halted_at: Option<u64>,
}

/// Runs a guest of four instructions (CPUID, VMMCALL, a read outside its
/// memory, HLT) in real mode,
/// confined by a nested table of the engine's [`Npt`] format that maps
/// its one page, on the calling CPU (which enabled SVM, `cpu`): the first
/// VMRUNs, intercepts and RIP steps of this machine's SVM, without
/// NRIP_SAVE. Call once, on one CPU.
pub fn first_guest(cpu: usize) -> Result<FirstGuest, &'static str> {
    if cpu >= MAX_CPUS {
        return Err("cpu-index");
    }
    // SAFETY: called once, on one CPU: nothing else uses these pages.
    let (vmcb, code, tables) = unsafe {
        (
            &mut *core::ptr::addr_of_mut!(FIRST_VMCB),
            &mut *core::ptr::addr_of_mut!(FIRST_CODE),
            &mut *core::ptr::addr_of_mut!(FIRST_TABLES),
        )
    };
    code.0[..FIRST_CODE_BYTES.len()].copy_from_slice(&FIRST_CODE_BYTES);
    let code_pa = core::ptr::from_mut(code) as u64;
    let pool = core::ptr::from_mut(tables) as u64;
    let mut frames = FrameAllocator::new(&[PhysRange::new(pool, core::mem::size_of_val(tables) as u64)]);
    // SAFETY: the image is identity-mapped (physical = virtual), and the
    // pool pages are this table's alone.
    let phys = unsafe { LinearMap::new(0) };
    let mut npt = Stage2Table::<Npt, _>::new(&mut frames, phys).map_err(|_| "npt-root")?;
    npt.map(FIRST_GPA, code_pa, 0x1000, Attrs::ram(Perms::ReadWriteExec), &mut frames).map_err(|_| "npt-map")?;

    vmcb.0.fill(0);
    vmcb.set32(control::INTERCEPT_MISC1, misc1::INTR | misc1::NMI | misc1::CPUID | misc1::HLT | misc1::SHUTDOWN);
    vmcb.set32(control::INTERCEPT_MISC2, misc2::VMRUN | misc2::VMMCALL);
    vmcb.set32(control::GUEST_ASID, FIRST_ASID);
    // TLB_CONTROL 1: flush every ASID's entries on this VMRUN (the only
    // flush without FLUSH_BY_ASID).
    vmcb.0[control::TLB_CONTROL] = 1;
    vmcb.set64(control::NP_ENABLE, 1);
    vmcb.set64(control::N_CR3, npt.root());
    for seg in [save::ES, save::SS, save::DS, save::FS, save::GS] {
        vmcb.segment(seg, 0, REAL_DATA, 0xffff, 0);
    }
    vmcb.segment(save::CS, 0, REAL_CODE, 0xffff, 0);
    vmcb.segment(save::GDTR, 0, 0, 0xffff, 0);
    vmcb.segment(save::IDTR, 0, 0, 0x3ff, 0);
    vmcb.segment(save::LDTR, 0, REAL_LDT, 0xffff, 0);
    vmcb.segment(save::TR, 0, REAL_TSS, 0xffff, 0);
    vmcb.set64(save::EFER, EFER_SVME);
    vmcb.set64(save::CR0, CR0_ET);
    vmcb.set64(save::RFLAGS, RFLAGS_FIXED);
    vmcb.set64(save::RIP, FIRST_GPA);
    vmcb.set64(save::DR6, DR6_INIT);
    vmcb.set64(save::DR7, DR7_INIT);
    vmcb.set64(save::G_PAT, PAT_DEFAULT);

    let vmcb_pa = core::ptr::from_mut(vmcb) as u64;
    // SAFETY: this CPU's own area (indexed by `cpu`), used only by
    // `svm_run` on this CPU.
    let host_area = unsafe { core::ptr::addr_of_mut!(HOST_VMSAVE_AREAS[cpu]) } as u64;
    let mut regs = GuestRegs::default();
    let mut report = FirstGuest { exits: [None; FIRST_EXITS_MAX], fault_gpa: None, halted_at: None };
    for slot in &mut report.exits {
        // The VMCB has VMRUN intercepted, a non-zero ASID and EFER.SVME in
        // the guest's EFER; the nested table confines it to one page.
        // SAFETY: SVM is enabled on this CPU (the caller's), and the VMCB
        // is 4 KiB aligned and identity-mapped.
        unsafe { svm_run(core::ptr::addr_of_mut!(regs), vmcb_pa, host_area) };
        let exit = SvmExit::decode(vmcb.get64(control::EXITCODE));
        *slot = Some(exit);
        let rip = vmcb.get64(save::RIP);
        // After the first entry, the TLB needs no flush.
        vmcb.0[control::TLB_CONTROL] = 0;
        match exit {
            SvmExit::Hlt => {
                report.halted_at = Some(rip);
                break;
            }
            SvmExit::Cpuid | SvmExit::Vmmcall => {
                // No NRIP_SAVE under TCG: the lengths are known.
                let len = instruction_len(exit).unwrap_or(0);
                vmcb.set64(save::RIP, rip + len);
            }
            SvmExit::Npf if report.fault_gpa.is_none() => {
                // EXITINFO2: the guest-physical address (§15.25.6). This
                // guest's only faulting instruction is its read.
                report.fault_gpa = Some(vmcb.get64(control::EXITINFO2));
                vmcb.set64(save::RIP, rip + FIRST_READ_LEN);
            }
            _ => break,
        }
    }
    Ok(report)
}
