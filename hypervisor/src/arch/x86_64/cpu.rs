//! Per-CPU host state for VMX root operation: a GDT with a 64-bit TSS
//! (VM entry requires a usable host TR, SDM Vol. 3C §27.2.3), an IDT that
//! reports any exception the hypervisor takes (`exceptions.S`), control
//! registers set up for FXSAVE, and the values of the VMCS host-state
//! area (§25.5), which VM exits load (§28.5).

use core::arch::{asm, global_asm};

use x86::controlregs::{cr0, cr0_write, cr3, cr4, cr4_write, Cr0, Cr4};
use x86::msr::{rdmsr, IA32_EFER, IA32_PAT};

use super::MAX_CPUS;

global_asm!(include_str!("exceptions.S"), options(att_syntax));

/// Selectors of the per-CPU GDT: the same code and data selectors as the
/// boot GDT, then the TSS (two slots: a 16-byte system descriptor).
pub const SEL_CODE: u16 = 0x08;
pub const SEL_DATA: u16 = 0x10;
pub const SEL_TSS: u16 = 0x18;
/// 64-bit code and flat data descriptors (SDM Vol. 3A §3.4.5): present,
/// DPL 0, L (code) / D/B and G (data).
const GDT_CODE64: u64 = 0x00af_9a00_0000_ffff;
const GDT_DATA: u64 = 0x00cf_9200_0000_ffff;
/// A 64-bit TSS is 104 bytes (SDM Vol. 3A §9.7, Figure 9-11); its I/O map
/// base at offset 102 points past the end: no I/O permission bitmap.
const TSS_SIZE: usize = 104;
const TSS_IOMAP_BASE: usize = 102;
/// TSS descriptor (SDM Vol. 3A §9.2.3, Figure 9-4): type 9 (available
/// 64-bit TSS) in bits 43:40, present at bit 47.
const TSS_TYPE_AVAILABLE: u64 = 0x9 << 40;
const DESC_PRESENT: u64 = 1 << 47;

/// IDT gates (SDM Vol. 3A §7.14.1, Figure 7-8): a present 64-bit
/// interrupt gate, DPL 0, in the code segment; one per exception vector,
/// pointing at the stubs, 16 bytes apart.
const IDT_GATE_INTERRUPT: u64 = 0x8e << 40;
const EXCEPTION_VECTORS: usize = 32;
const VECTORS: usize = 256;
const STUB_STRIDE: u64 = 16;

extern "C" {
    /// The first stub in `exceptions.S`; only its address is used.
    fn host_exception_stubs();
    /// The one handler of vectors 32-255 (`exceptions.S`).
    fn host_interrupt();
}

#[repr(C, align(16))]
struct Idt([u64; 2 * VECTORS]);

/// One IDT for every CPU, filled by the boot CPU before it starts the
/// others; afterwards only read.
static mut IDT: Idt = Idt([0; 2 * VECTORS]);

/// The operand of LGDT and LIDT: limit, then base (SDM Vol. 3A §3.5.1).
#[repr(C, packed)]
struct TableRegister {
    limit: u16,
    base: u64,
}

fn idtr() -> TableRegister {
    TableRegister { limit: (core::mem::size_of::<Idt>() - 1) as u16, base: core::ptr::addr_of!(IDT) as u64 }
}

/// Fills the IDT and loads it on the boot CPU. Call once, first thing,
/// before any other CPU runs.
pub fn install_idt() {
    let stubs = host_exception_stubs as *const () as u64;
    // SAFETY: called once on the boot CPU before the APs start, so nothing
    // else reads or writes the IDT meanwhile.
    let gates = unsafe { &mut (*core::ptr::addr_of_mut!(IDT)).0 };
    for (vector, gate) in gates.chunks_exact_mut(2).enumerate() {
        let handler = if vector < EXCEPTION_VECTORS {
            stubs + STUB_STRIDE * vector as u64
        } else {
            host_interrupt as *const () as u64
        };
        gate[0] =
            (handler & 0xffff) | (u64::from(SEL_CODE) << 16) | IDT_GATE_INTERRUPT | ((handler >> 16) & 0xffff) << 48;
        gate[1] = handler >> 32;
    }
    load_idt();
}

/// Loads the IDT the boot CPU filled (`install_idt`) on this CPU.
pub fn load_idt() {
    let idtr = idtr();
    // SAFETY: the IDT is complete and static; LIDT only reads the operand.
    unsafe { asm!("lidt [{0}]", in(reg) &raw const idtr, options(nostack, readonly)) };
}

/// Called by `host_interrupt`: an interrupt the SVM backend lets in after
/// a guest exit (the slice timer, a kick). Ends it at the local APIC; an
/// EOI with nothing in service (a spurious interrupt) changes nothing.
#[no_mangle]
extern "C" fn hv_host_interrupt() {
    super::smp::apic_eoi();
}

/// Called by `host_exception_common`: the hypervisor faulted.
#[no_mangle]
extern "C" fn hv_host_exception(vector: u64, error: u64, rip: u64, cr2: u64) -> ! {
    super::live_update::give_back(
        hypervisor::live_update::rollback::Reason::Exception,
        &format_args!("vector={vector} error={error:#x} rip={rip:#x} cr2={cr2:#x}"),
    );
    hypervisor::console::write_line_forced(format_args!(
        "hv: fault kind=host-exception vector={vector} error={error:#x} rip={rip:#x} cr2={cr2:#x}"
    ));
    hypervisor::console::write_line_forced(format_args!("hv: shutdown status=error"));
    super::shutdown(false)
}

#[repr(C, align(16))]
struct CpuTables {
    gdt: [u64; 5],
    tss: [u8; TSS_SIZE],
}

static mut TABLES: [CpuTables; MAX_CPUS] = [const { CpuTables { gdt: [0; 5], tss: [0; TSS_SIZE] } }; MAX_CPUS];

/// What the VMCS host-state area of every VMCS on this CPU holds.
#[derive(Clone, Copy, Debug)]
pub struct HostState {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub gdtr_base: u64,
    pub idtr_base: u64,
    pub tr_base: u64,
    pub efer: u64,
    pub pat: u64,
}

fn tss_descriptor(base: u64) -> [u64; 2] {
    let limit = (TSS_SIZE - 1) as u64;
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | TSS_TYPE_AVAILABLE
        | DESC_PRESENT
        | ((limit >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56;
    [low, base >> 32]
}

/// Loads this CPU's GDT and TSS, enables FXSAVE/SSE state handling (the
/// hypervisor itself never uses x87/SSE; vCPUs' state is switched with
/// FXSAVE64/FXRSTOR64), and returns the host state for its VMCSs.
pub fn init(cpu: usize) -> HostState {
    let cpu = cpu.min(MAX_CPUS - 1);
    // SAFETY: each CPU initialises only its own slot, once, before anything
    // else refers to it; afterwards the processor reads it (GDT, TSS).
    let tables = unsafe { &mut *core::ptr::addr_of_mut!(TABLES[cpu]) };
    tables.tss[TSS_IOMAP_BASE..].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    let tr_base = tables.tss.as_ptr() as u64;
    let [tss_low, tss_high] = tss_descriptor(tr_base);
    tables.gdt = [0, GDT_CODE64, GDT_DATA, tss_low, tss_high];
    let gdtr_base = tables.gdt.as_ptr() as u64;
    let gdtr = TableRegister { limit: (core::mem::size_of_val(&tables.gdt) - 1) as u16, base: gdtr_base };
    let idtr_base = idtr().base;
    // SAFETY: the new GDT has the same code and data descriptors at the
    // same selectors as the one in use, so reloading CS (far return), SS,
    // DS and ES keeps every segment as it was; LTR marks the TSS busy.
    unsafe {
        asm!(
            "lgdt [{gdtr}]",
            "push {code}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {data:x}",
            "mov es, {data:x}",
            "mov ss, {data:x}",
            "ltr {tss:x}",
            gdtr = in(reg) &raw const gdtr,
            code = in(reg) u64::from(SEL_CODE),
            tmp = out(reg) _,
            data = in(reg) u64::from(SEL_DATA),
            tss = in(reg) u64::from(SEL_TSS),
        );
    }
    // SAFETY: enabling FXSR/XMM exceptions and clearing CR0.EM/TS only
    // allows x87/SSE instructions without faults (SDM Vol. 3A §2.5); the
    // paging and protection bits are unchanged.
    unsafe {
        cr4_write(cr4() | Cr4::CR4_ENABLE_SSE | Cr4::CR4_UNMASKED_SSE);
        cr0_write((cr0() | Cr0::CR0_MONITOR_COPROCESSOR) - Cr0::CR0_EMULATE_COPROCESSOR - Cr0::CR0_TASK_SWITCHED);
    }
    // SAFETY: reading control registers and architectural MSRs.
    unsafe {
        HostState {
            cr0: cr0().bits() as u64,
            cr3: cr3(),
            cr4: cr4().bits() as u64,
            gdtr_base,
            idtr_base,
            tr_base,
            efer: rdmsr(IA32_EFER),
            pat: rdmsr(IA32_PAT),
        }
    }
}
