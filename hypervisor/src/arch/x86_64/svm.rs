//! Enabling AMD SVM on a CPU (AMD64 APM Vol. 2 §15.4 "Enabling SVM"):
//! check CPUID and VM_CR.SVMDIS, set EFER.SVME (and EFER.NXE, which nested
//! tables need for their no-execute bit, §15.25.5), and give the processor
//! a host save area (VM_HSAVE_PA, §15.30.4) in which VMRUN keeps the host
//! state. Then the first guest code under SVM ([`first_guest`]): a
//! real-mode guest of three instructions in a page the nested tables map,
//! entered with VMRUN (`svmentry.S`) until it halts. The backend that runs
//! the machine's partitions under SVM is not built yet: a CPU with SVM
//! and no VT-x reports what it offers, runs that guest, and runs no other.

use core::arch::global_asm;

use hypervisor::arch::x86_64::svm_caps::{SvmCaps, SvmCpuid, SvmError};
use hypervisor::arch::x86_64::vmcb::{
    control, instruction_len, misc1, misc2, save, SvmExit, EFER_SVME, SEG_ATTRIB, SEG_BASE, SEG_LIMIT, SEG_SELECTOR,
    VMCB_BYTES,
};
use hypervisor::frames::FrameAllocator;
use hypervisor::stage2::{Attrs, LinearMap, Npt, Perms, Stage2Table};
use loader::PhysRange;
use x86::msr::{rdmsr, wrmsr, IA32_EFER};

use super::vcpu::GuestRegs;
use super::MAX_CPUS;

global_asm!(include_str!("svmentry.S"), options(att_syntax));

extern "C" {
    fn svm_run(regs: *mut GuestRegs, vmcb_pa: u64, host_area_pa: u64);
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
/// The power-on PAT (APM Vol. 2 §7.8.2), for G_PAT under nested paging.
const PAT_POWER_ON: u64 = 0x0007_0406_0007_0406;
/// CR0.ET, RFLAGS bit 1, DR6 and DR7 at reset.
const CR0_ET: u64 = 1 << 4;
const RFLAGS_FIXED: u64 = 1 << 1;
const DR6_INIT: u64 = 0xffff_0ff0;
const DR7_INIT: u64 = 0x400;
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
    vmcb.set64(save::G_PAT, PAT_POWER_ON);

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
