//! The x86_64 runtime of the test guests, under our hypervisor's VT-x.
//!
//! `entry.S` takes the multiboot2 hand-over (32-bit protected mode), sets
//! up identity paging for the low 4 GiB and long mode, and calls
//! [`start`]. The guest's own page tables sit on top of the hypervisor's
//! EPT, so both translation stages are exercised. Hypercalls are `vmcall`
//! (RCX control, RDX input, R8 output, RAX result).
//!
//! Interrupts come from the hypervisor's virtual local APIC in x2APIC
//! mode (MSRs 0x800-0x8ff): the periodic tick is its timer (counting at
//! the rate CPUID leaf 0x4000_0010 EBX gives), self-interrupts go through
//! the SELF_IPI register, `hlt` waits for the next one, and each handler
//! ends with an EOI. Exceptions are reported through the same IDT and
//! stop the guest.
//!
//! Other vCPUs start the x86 way: vCPU 0 copies the real-mode start-up
//! code (`ap_trampoline` in `entry.S`) to conventional memory and sends
//! INIT-SIPI-SIPI through its x2APIC ([`ApicStartup`]); the started vCPU
//! enters long mode on vCPU 0's page tables and runs the secondary
//! workload.

use core::arch::x86_64::{__cpuid, _rdtsc, CpuidResult};
use core::arch::{asm, global_asm};
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::fault_test::FaultTest;
use super::multiboot::{self, MultibootError, BOOTLOADER_MAGIC, HEADER_LEN};
use crate::args::Args;
use crate::boot::{BootError, Region};
use crate::psci::{Call, NOT_SUPPORTED};
use crate::sipi::ApicStartup;
use crate::{Env, Guest, InterruptCounts, Line, Outcome, Psci, Request, SecondaryWorkload, Workload};

global_asm!(include_str!("entry.S"), options(att_syntax));

/// Defines the guest's entry points: `_start` in `entry.S` calls
/// `testguest_main` with the multiboot2 magic and boot information, and
/// the start-up code of a vCPU started by INIT-SIPI-SIPI calls
/// `testguest_secondary` with the context vCPU 0 left for it. Without a
/// secondary workload such a vCPU halts.
#[macro_export]
macro_rules! entry {
    ($workload:path) => {
        #[no_mangle]
        extern "C" fn testguest_main(magic: u32, info: u64) -> ! {
            $crate::arch::x86_64::runtime::start(magic, info, $workload)
        }

        #[no_mangle]
        extern "C" fn testguest_secondary(_context: u64) -> ! {
            $crate::arch::x86_64::runtime::park()
        }
    };
    ($workload:path, secondary = $secondary:path) => {
        #[no_mangle]
        extern "C" fn testguest_main(magic: u32, info: u64) -> ! {
            $crate::arch::x86_64::runtime::start(magic, info, $workload)
        }

        #[no_mangle]
        extern "C" fn testguest_secondary(context: u64) -> ! {
            $crate::arch::x86_64::runtime::start_secondary(context, $secondary)
        }
    };
}

/// The hypervisor's CPUID leaves (hypervisor/src/arch/x86_64/policy/cpuid.rs):
/// the signature leaf and the timing leaf (EAX = TSC kHz).
const HV_LEAF_BASE: u32 = 0x4000_0000;
const HV_LEAF_TIMING: u32 = 0x4000_0010;
const HV_SIGNATURE: &[u8; 12] = b"hvluhvluhvlu";
/// IA32_FEATURE_CONTROL (SDM Vol. 4 Table 2-2): not on the allow-list.
const IA32_FEATURE_CONTROL: u32 = 0x3a;
/// IDT gate (SDM Vol. 3A §7.14.1, Figure 7-8): a present 64-bit interrupt
/// gate, DPL 0, in the 64-bit code segment.
const IDT_GATE_INTERRUPT: u64 = 0x8e << 40;
/// Exceptions 0-31, then the interrupt vectors this runtime uses; the
/// rest are not present (one would be reported as #NP).
const IDT_ENTRIES: usize = 34;
const EXCEPTION_VECTORS: usize = 32;
const STUB_STRIDE: u64 = 16;
const SEL_CODE64: u64 = 0x08;
/// The interrupt vectors (`entry.S` has a stub for each): the APIC timer
/// and the self-IPI.
const TIMER_VECTOR: u64 = 0x20;
const IPI_VECTOR: u64 = 0x21;
/// CPUID leaf 1 ECX bit 21: x2APIC (SDM Vol. 2A, "CPUID").
const CPUID1_ECX_X2APIC: u32 = 1 << 21;
/// x2APIC registers (SDM Vol. 3A §11.12.1.2, Table 11-6) and their bits:
/// SVR software enable (8) with spurious vector 0xff; LVT timer periodic
/// mode (bits 18:17 = 01) and mask (16); divide configuration 0b1011 =
/// divide by 1 (§11.5.4).
const X2APIC_ID: u32 = 0x802;
const X2APIC_TPR: u32 = 0x808;
const X2APIC_EOI: u32 = 0x80b;
const X2APIC_IRR0: u32 = 0x820;
const X2APIC_ESR: u32 = 0x828;
const X2APIC_ICR: u32 = 0x830;
const X2APIC_CURRENT_COUNT: u32 = 0x839;
const X2APIC_SVR: u32 = 0x80f;
const X2APIC_LVT_TIMER: u32 = 0x832;
const X2APIC_INITIAL_COUNT: u32 = 0x838;
const X2APIC_DIVIDE: u32 = 0x83e;
const X2APIC_SELF_IPI: u32 = 0x83f;
const SVR_ENABLE_SPURIOUS_FF: u64 = 0x1ff;
const LVT_PERIODIC: u64 = 1 << 17;
const LVT_MASKED: u64 = 1 << 16;
const DIVIDE_BY_1: u64 = 0b1011;

/// Interrupts taken: timer ticks and self-IPIs.
static TICKS: AtomicU64 = AtomicU64::new(0);
static IPIS: AtomicU64 = AtomicU64::new(0);
/// Debug exceptions taken through [`catch_debug_traps`]'s handler.
static DEBUG_TRAPS: AtomicU64 = AtomicU64::new(0);
/// The #DB vector (SDM Vol. 3A Table 7-1).
const DEBUG_VECTOR: u64 = 1;
/// The local APIC is enabled and interrupts are unmasked.
static APIC_ON: AtomicBool = AtomicBool::new(false);
/// Set while an exception is being reported, so a fault in the report
/// itself parks the vCPU instead of recursing.
static REPORTING: AtomicBool = AtomicBool::new(false);
/// The end of conventional memory (0: none), from the memory map.
static CONVENTIONAL_END: AtomicU64 = AtomicU64::new(0);
/// Entries into the start-up code (`entry.S` increments it) and the
/// context it passes to `testguest_secondary`.
#[export_name = "ap_startups"]
static AP_STARTUPS: AtomicU64 = AtomicU64::new(0);
#[export_name = "ap_context"]
static AP_CONTEXT: AtomicU64 = AtomicU64::new(0);

#[repr(C, align(16))]
struct Idt([u64; 2 * IDT_ENTRIES]);

static mut IDT: Idt = Idt([0; 2 * IDT_ENTRIES]);

/// The operand of LIDT (SDM Vol. 3A §7.10).
#[repr(C, packed)]
struct Idtr {
    limit: u16,
    base: u64,
}

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
    /// The first exception stub in `entry.S`; only its address is used.
    fn exception_stubs();
    /// The interrupt stubs for [`TIMER_VECTOR`] and [`IPI_VECTOR`].
    fn interrupt_stubs();
    /// A #DB handler that counts the trap and returns.
    fn debug_trap_stub();
    /// The real-mode start-up code; only the addresses are used.
    static ap_trampoline: u8;
    static ap_trampoline_end: u8;
}

/// This vCPU, as the workloads see it.
#[derive(Debug)]
pub struct VmxGuest {
    _private: (),
}

/// Names of the architectural exceptions (SDM Vol. 3A Table 7-1).
const EXCEPTIONS: [&str; 32] = [
    "de",
    "db",
    "nmi",
    "bp",
    "of",
    "br",
    "ud",
    "nm",
    "df",
    "mf-old",
    "ts",
    "np",
    "ss",
    "gp",
    "pf",
    "reserved15",
    "mf",
    "ac",
    "mc",
    "xm",
    "ve",
    "cp",
    "reserved22",
    "reserved23",
    "reserved24",
    "reserved25",
    "reserved26",
    "reserved27",
    "hv",
    "vc",
    "sx",
    "reserved31",
];

/// Runs `workload` with the boot environment from the multiboot2
/// information at `info`, then shuts the guest down.
pub fn start(magic: u32, info: u64, workload: Workload<VmxGuest>) -> ! {
    install_idt();
    let mut guest = VmxGuest { _private: () };
    match boot_env(magic, info) {
        Ok((env, fault_test)) => {
            if let Some(test) = fault_test {
                guest.write_line(Line::event("fault-test").field("kind", test.name()));
                match test {
                    FaultTest::TripleFault => triple_fault_now(),
                    FaultTest::ForbiddenMsr => read_forbidden_msr(),
                    FaultTest::BadApic => misprogram_apic(),
                    FaultTest::UnbackedRmw => add_to_nothing(env.ram().end + crate::isolation::PAST_RAM),
                }
            }
            workload(&mut guest, &env);
        }
        Err(e) => guest.write_line(&e.line()),
    }
    shutdown(&mut guest)
}

/// Runs `workload` on a vCPU started by INIT-SIPI-SIPI, called through
/// `testguest_secondary` with the context vCPU 0 left; halts with
/// interrupts off when it returns.
pub fn start_secondary(context: u64, workload: SecondaryWorkload<VmxGuest>) -> ! {
    load_idt();
    let mut guest = VmxGuest { _private: () };
    workload(&mut guest, context);
    park()
}

fn image() -> Region {
    // linker.ld defines both symbols; only their addresses are used.
    Region::new((&raw const __image_start) as u64, (&raw const __image_end) as u64)
}

/// Why the workload could not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StartError {
    Multiboot(MultibootError),
    Boot(BootError),
}

impl StartError {
    fn line(&self) -> Line {
        match self {
            Self::Multiboot(e) => e.line(),
            Self::Boot(e) => e.line(),
        }
    }
}

/// Reads the boot information: RAM, arguments, and a fault test to run.
fn boot_env(magic: u32, info: u64) -> Result<(Env, Option<FaultTest>), StartError> {
    if magic != BOOTLOADER_MAGIC {
        return Err(StartError::Multiboot(MultibootError::BadMagic(magic)));
    }
    let image = image();
    if !info.is_multiple_of(8) || (image.start..image.end).contains(&info) {
        return Err(StartError::Multiboot(MultibootError::BadAddress(info)));
    }
    // SAFETY: the hypervisor put the boot information in this guest's
    // RAM, outside the image (checked above), identity-mapped by entry.S;
    // nothing writes it. Only the fixed 8-byte header is read here.
    let header = unsafe { &*(info as *const [u8; HEADER_LEN]) };
    let size = multiboot::total_size(header).map_err(StartError::Multiboot)?;
    // SAFETY: as above, for the size the header gives (bounded by
    // MAX_INFO_SIZE); the parser checks every tag against it.
    let bytes = unsafe { core::slice::from_raw_parts(info as *const u8, size) };
    let boot = multiboot::parse(bytes, image).map_err(StartError::Multiboot)?;
    CONVENTIONAL_END.store(boot.conventional.map_or(0, |c| c.end), Ordering::Relaxed);
    let info_region = Region::new(info, info + size as u64);
    if info_region.start < boot.ram.start || info_region.end > boot.ram.end {
        return Err(StartError::Boot(BootError::OutsideRam(info_region)));
    }
    let args = Args::parse(boot.cmdline).map_err(|e| StartError::Boot(BootError::Args(e)))?;
    let fault_test = FaultTest::from_cmdline(boot.cmdline).map_err(|e| StartError::Boot(BootError::Args(e)))?;
    // SAFETY: entry.S identity-maps the low 4 GiB, which holds all of RAM;
    // outside the image (code, data, bss with stack and page tables) and
    // the boot information, nothing uses it.
    Ok((unsafe { Env::with_free_ram(boot.ram, [image, info_region], args) }, fault_test))
}

/// Points IDT entries 0-31 at the exception stubs in `entry.S` and the
/// next ones at its interrupt stubs (SDM Vol. 3A §7.14.1).
fn install_idt() {
    let exceptions = exception_stubs as *const () as u64;
    let interrupts = interrupt_stubs as *const () as u64;
    for vector in 0..IDT_ENTRIES {
        let handler = if vector < EXCEPTION_VECTORS {
            exceptions + STUB_STRIDE * vector as u64
        } else {
            interrupts + STUB_STRIDE * (vector - EXCEPTION_VECTORS) as u64
        };
        set_gate(vector, handler);
    }
    load_idt();
}

/// Loads the IDT [`install_idt`] filled (on every vCPU: IDTR is per CPU).
fn load_idt() {
    let base = core::ptr::addr_of!(IDT) as u64;
    let idtr = Idtr { limit: (core::mem::size_of::<Idt>() - 1) as u16, base };
    // SAFETY: the IDT is static and complete (vCPU 0 filled it before it
    // started any other); LIDT only reads the operand.
    unsafe { asm!("lidt [{0}]", in(reg) &raw const idtr, options(nostack, readonly)) };
}

/// Points IDT entry `vector` at `handler`: a 64-bit interrupt gate.
fn set_gate(vector: usize, handler: u64) {
    // SAFETY: only vCPU 0 writes the IDT (another vCPU only loads it), one
    // gate while no exception of that vector can be in delivery (at start,
    // or from a workload before it sets the condition the gate handles).
    let idt = unsafe { &mut *core::ptr::addr_of_mut!(IDT) };
    if let Some(gate) = idt.0.get_mut(2 * vector..2 * vector + 2) {
        gate[0] = (handler & 0xffff) | (SEL_CODE64 << 16) | IDT_GATE_INTERRUPT | ((handler >> 16) & 0xffff) << 48;
        gate[1] = handler >> 32;
    }
}

/// From now on a debug exception is counted ([`debug_traps`]) and the
/// guest goes on, instead of being reported and stopped. For traps
/// (data breakpoints): a fault-class #DB would be taken again and again.
pub fn catch_debug_traps() {
    set_gate(DEBUG_VECTOR as usize, debug_trap_stub as *const () as u64);
}

/// Debug exceptions taken since [`catch_debug_traps`].
pub fn debug_traps() -> u64 {
    DEBUG_TRAPS.load(Ordering::Relaxed)
}

/// Makes an exception undeliverable: an empty IDT turns #UD into #GP,
/// then #DF, then a triple fault (SDM Vol. 3A §7.15, "Interrupt 8").
fn triple_fault_now() -> ! {
    let idtr = Idtr { limit: 0, base: 0 };
    // SAFETY: deliberately unrecoverable: the hypervisor sees the triple
    // fault and stops this guest. Nothing else runs here.
    unsafe {
        asm!("lidt [{0}]", "ud2", in(reg) &raw const idtr, options(nostack, noreturn));
    }
}

/// Reads an MSR the hypervisor does not allow: the #GP it injects is
/// reported by the exception handler, which stops the guest.
/// An ADD to memory where nothing is: a read-modify-write the hypervisor
/// does not complete, so it stops the guest (`undecodable-mmio`).
fn add_to_nothing(gpa: u64) -> ! {
    // SAFETY: the address is outside this guest's RAM (nothing of this
    // program is there); under our hypervisor the access exits and the
    // partition is stopped.
    unsafe { asm!("add qword ptr [{0}], 1", in(reg) gpa, options(nostack)) };
    let mut guest = VmxGuest { _private: () };
    guest.write_line(Line::event("fault-test").field("kind", "unbacked-rmw").flag("survived", true));
    shutdown(&mut guest)
}

fn read_forbidden_msr() -> ! {
    // SAFETY: RDMSR at CPL 0; under our hypervisor it exits and is
    // answered with #GP, which the IDT reports before shutting down.
    unsafe {
        asm!("rdmsr", in("ecx") IA32_FEATURE_CONTROL, out("eax") _, out("edx") _, options(nomem, nostack));
    }
    let mut guest = VmxGuest { _private: () };
    guest.write_line(Line::event("fault-test").field("kind", "forbidden-msr").flag("survived", true));
    shutdown(&mut guest)
}

/// Misprograms the local APIC (with interrupts off): a self-IPI and a
/// timer with vectors below 16 (the APIC drops them and sets ESR bits 5
/// and 6), an IPI to x2APIC ID 7, which this one-vCPU guest does not
/// have (dropped), then a TPR write with a reserved bit: the #GP the
/// hypervisor injects is reported by the IDT, which stops the guest.
fn misprogram_apic() -> ! {
    const ILLEGAL_VECTOR: u64 = 3;
    const ILLEGAL_TIMER_VECTOR: u64 = 2;
    const NO_SUCH_VCPU: u64 = 7;
    const TPR_RESERVED_BIT: u64 = 1 << 8;
    let mut guest = VmxGuest { _private: () };
    wrmsr(X2APIC_SVR, SVR_ENABLE_SPURIOUS_FF);
    wrmsr(X2APIC_SELF_IPI, ILLEGAL_VECTOR);
    wrmsr(X2APIC_ICR, IPI_VECTOR | (NO_SUCH_VCPU << 32));
    wrmsr(X2APIC_DIVIDE, DIVIDE_BY_1);
    wrmsr(X2APIC_LVT_TIMER, ILLEGAL_TIMER_VECTOR);
    wrmsr(X2APIC_INITIAL_COUNT, 1);
    while rdmsr(X2APIC_CURRENT_COUNT) != 0 {
        core::hint::spin_loop();
    }
    wrmsr(X2APIC_ESR, 0);
    let irr = (0..8).fold(0, |any, k| any | rdmsr(X2APIC_IRR0 + k));
    guest.write_line(Line::event("fault-test").field("kind", "bad-apic").hex("esr", rdmsr(X2APIC_ESR)).hex("irr", irr));
    wrmsr(X2APIC_TPR, TPR_RESERVED_BIT);
    guest.write_line(Line::event("fault-test").field("kind", "bad-apic").flag("survived", true));
    shutdown(&mut guest)
}

/// Stops this guest with `SHUTDOWN_SELF`; parks should it return.
fn shutdown(guest: &mut VmxGuest) -> ! {
    guest.hypercall(Request::shutdown_self());
    park()
}

/// Stops this vCPU for good: HLT with interrupts off (the hypervisor
/// treats it as the vCPU going off).
pub fn park() -> ! {
    loop {
        // SAFETY: halting only affects this vCPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// CPUID; under our hypervisor it exits and the CPUID policy answers.
fn cpuid(leaf: u32) -> CpuidResult {
    __cpuid(leaf)
}

/// WRMSR; the x2APIC registers exit to the hypervisor's APIC model.
fn wrmsr(msr: u32, value: u64) {
    // SAFETY: only ever called on the x2APIC registers, which affect this
    // vCPU's interrupts only; the hypervisor answers a bad write with #GP.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nomem, nostack));
    }
}

/// RDMSR of an x2APIC register.
fn rdmsr(msr: u32) -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: only ever called on the x2APIC registers, which have no read
    // side effects; the hypervisor answers a bad read with #GP.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high, options(nomem, nostack)) };
    (u64::from(high) << 32) | u64::from(low)
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC is allowed at CPL 0 and runs natively (no exit).
    unsafe { _rdtsc() }
}

/// Called by `exception_common` in `entry.S`: reports the exception and
/// stops the guest.
#[no_mangle]
extern "C" fn testguest_exception(vector: u64, error: u64, rip: u64, cr2: u64) -> ! {
    if REPORTING.load(Ordering::Relaxed) {
        park();
    }
    REPORTING.store(true, Ordering::Relaxed);
    let mut guest = VmxGuest { _private: () };
    let name = EXCEPTIONS.get(vector as usize).copied().unwrap_or("unknown");
    guest
        .write_line(Line::event("exception").field("vector", name).hex("error", error).hex("rip", rip).hex("cr2", cr2));
    shutdown(&mut guest)
}

/// Called by `interrupt_common` in `entry.S` for an interrupt vector:
/// counts it and ends it at the APIC (EOI).
#[no_mangle]
extern "C" fn testguest_interrupt(vector: u64) {
    if vector == DEBUG_VECTOR {
        // An exception: nothing to end at the APIC.
        DEBUG_TRAPS.fetch_add(1, Ordering::Relaxed);
        return;
    }
    match vector {
        TIMER_VECTOR => TICKS.fetch_add(1, Ordering::Relaxed),
        IPI_VECTOR => IPIS.fetch_add(1, Ordering::Relaxed),
        _ => 0,
    };
    wrmsr(X2APIC_EOI, 0);
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    let mut guest = VmxGuest { _private: () };
    let mut line = Line::event("panic");
    if let Some(location) = info.location() {
        line.field("file", location.file()).field("line", location.line());
    }
    line.field("message", info.message());
    guest.write_line(&line);
    shutdown(&mut guest)
}

impl Guest for VmxGuest {
    fn hypercall(&mut self, request: Request) -> Outcome {
        let (result, output): (u64, u64);
        // SAFETY: `vmcall` exits to the hypervisor (HYPERCALLS.md), which
        // only touches guest memory at the request's GPAs, inside this
        // guest's RAM, and changes only RAX (result) and R8 (fast output).
        unsafe {
            asm!(
                "vmcall",
                inout("rcx") request.control => _,
                inout("rdx") request.input => _,
                inout("r8") request.output => output,
                out("rax") result,
                options(nostack),
            );
        }
        Outcome { result, output }
    }

    fn gpa_of(&self, ptr: *const u8) -> u64 {
        // entry.S identity-maps guest-physical memory.
        ptr as u64
    }

    fn counter(&self) -> u64 {
        rdtsc()
    }

    fn counter_frequency(&self) -> u64 {
        let base = cpuid(HV_LEAF_BASE);
        let mut signature = [0u8; 12];
        signature[..4].copy_from_slice(&base.ebx.to_le_bytes());
        signature[4..8].copy_from_slice(&base.ecx.to_le_bytes());
        signature[8..].copy_from_slice(&base.edx.to_le_bytes());
        if &signature != HV_SIGNATURE || base.eax < HV_LEAF_TIMING {
            return 0;
        }
        u64::from(cpuid(HV_LEAF_TIMING).eax) * 1000
    }

    /// The APIC timer in periodic mode, dividing by 1: its rate over the
    /// TSC's scales `period`. Interrupts stay enabled from here on.
    fn start_ticks(&mut self, period: u64) -> bool {
        let timing = cpuid(HV_LEAF_TIMING);
        if cpuid(1).ecx & CPUID1_ECX_X2APIC == 0 || timing.eax == 0 || self.counter_frequency() == 0 {
            return false;
        }
        let count = u128::from(period) * u128::from(timing.ebx) / u128::from(timing.eax);
        let Ok(count) = u32::try_from(count) else { return false };
        if count == 0 {
            return false;
        }
        wrmsr(X2APIC_SVR, SVR_ENABLE_SPURIOUS_FF);
        wrmsr(X2APIC_DIVIDE, DIVIDE_BY_1);
        wrmsr(X2APIC_LVT_TIMER, LVT_PERIODIC | TIMER_VECTOR);
        wrmsr(X2APIC_INITIAL_COUNT, u64::from(count));
        APIC_ON.store(true, Ordering::Relaxed);
        // SAFETY: the IDT has a handler for every vector the APIC raises.
        unsafe { asm!("sti", options(nomem, nostack)) };
        true
    }

    fn stop_ticks(&mut self) {
        if APIC_ON.load(Ordering::Relaxed) {
            wrmsr(X2APIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR);
            wrmsr(X2APIC_INITIAL_COUNT, 0);
        }
    }

    fn send_self_ipi(&mut self) -> bool {
        if !APIC_ON.load(Ordering::Relaxed) {
            return false;
        }
        wrmsr(X2APIC_SELF_IPI, IPI_VECTOR);
        true
    }

    /// HLT with interrupts enabled: the hypervisor runs this vCPU again
    /// when its APIC has an interrupt for it. Without the APIC, a pause.
    fn wait_masked(&mut self, until: u64) {
        if !APIC_ON.load(Ordering::Relaxed) {
            self.wait_for_interrupt();
            return;
        }
        // SAFETY: masks interrupts; `wait_for_interrupt` unmasks them.
        unsafe { asm!("cli", options(nomem, nostack)) };
        while self.counter() < until {
            core::hint::spin_loop();
        }
        self.wait_for_interrupt();
    }

    fn wait_for_interrupt(&mut self) {
        if APIC_ON.load(Ordering::Relaxed) {
            // SAFETY: STI's shadow covers HLT, so an interrupt pending now
            // ends the HLT instead of being taken before it.
            unsafe { asm!("sti", "hlt", options(nomem, nostack)) };
        } else {
            core::hint::spin_loop();
        }
    }

    fn interrupt_counts(&self) -> InterruptCounts {
        InterruptCounts { ticks: TICKS.load(Ordering::Relaxed), ipis: IPIS.load(Ordering::Relaxed) }
    }

    fn probe(&mut self, gpa: u64) -> [u64; 2] {
        let (first, reread): (u64, u64);
        // The isolation probe touches `gpa` on purpose: outside this guest's
        // RAM the hypervisor completes the accesses as a PC would (reads
        // all ones, writes dropped).
        // SAFETY: the last store writes back the value first read, so even
        // an address in this program's memory ends unchanged (one vCPU).
        unsafe {
            asm!(
                "mov {first}, [{addr}]",
                "mov {t}, {first}",
                "not {t}",
                "mov [{addr}], {t}",
                "mov {reread}, [{addr}]",
                "mov [{addr}], {first}",
                addr = in(reg) gpa,
                first = out(reg) first,
                reread = out(reg) reread,
                t = out(reg) _,
                options(nostack),
            );
        }
        [first, reread]
    }

    fn unemulated_access(&mut self) {
        // String I/O from COM1, which the hypervisor does not emulate.
        let mut byte = 0u8;
        // SAFETY: `rep insb` of one byte from port 0x3f8 into `byte`, a
        // local this function owns; the direction flag is clear (the ABI
        // guarantees it at a call).
        unsafe {
            asm!(
                "rep insb",
                in("dx") 0x3f8u16,
                inout("rdi") &raw mut byte => _,
                inout("rcx") 1u64 => _,
                options(nostack, preserves_flags),
            );
        }
        core::hint::black_box(byte);
    }
}

impl ApicStartup for VmxGuest {
    /// Copies `entry.S`'s start-up code to page `vector` (000VV000H) of
    /// conventional memory. Page 0 is refused: it is where real-mode
    /// interrupt vectors live, and the null address.
    fn place_startup_code(&mut self, vector: u8, context: u64) -> bool {
        // linker-resolved symbols; only their addresses are used.
        let code = Region::new((&raw const ap_trampoline) as u64, (&raw const ap_trampoline_end) as u64);
        let page = u64::from(vector) << 12;
        if page == 0 || page + code.len() > CONVENTIONAL_END.load(Ordering::Relaxed) {
            return false;
        }
        AP_CONTEXT.store(context, Ordering::Release);
        // SAFETY: [page, page + len) lies in this guest's conventional
        // memory (the memory map says so; entry.S identity-maps it), which
        // nothing else uses; the source is the image's own code.
        unsafe { core::ptr::copy_nonoverlapping(code.start as *const u8, page as *mut u8, code.len() as usize) };
        true
    }

    fn write_icr(&mut self, icr: u64) {
        wrmsr(X2APIC_ICR, icr);
    }

    fn apic_errors(&mut self) -> u64 {
        wrmsr(X2APIC_ESR, 0);
        rdmsr(X2APIC_ESR)
    }

    fn apic_id(&mut self) -> u64 {
        rdmsr(X2APIC_ID)
    }

    fn startups(&self) -> u64 {
        AP_STARTUPS.load(Ordering::Acquire)
    }
}

/// There is no PSCI on x86_64: every call is NOT_SUPPORTED, so the
/// PSCI-based workloads report failures instead of not building.
impl Psci for VmxGuest {
    fn psci_call(&mut self, _call: Call) -> u64 {
        NOT_SUPPORTED.cast_unsigned()
    }

    fn mpidr(&self) -> u64 {
        0
    }
}
