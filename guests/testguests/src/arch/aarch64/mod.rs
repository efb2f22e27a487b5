//! The EL1 runtime of the aarch64 test guests.
//!
//! Entry and vectors are in `entry.S`. The MMU stays off, so addresses are
//! IPAs and every data access is Device memory: exclusives are not
//! guaranteed there, so state shared with the IRQ handler uses plain
//! loads and stores only (atomics with `load`/`store`, never
//! read-modify-write), and the handler is its only writer. The same goes
//! for state shared with a second vCPU (PSCI CPU_ON into
//! `secondary_start`), which may run on another physical CPU.
//!
//! Interrupts go through the GICv3 CPU interface system registers, which
//! the hypervisor backs with the virtual CPU interface; the distributor
//! and redistributors are never touched.

pub mod debugpriv;
pub mod physical_timer;
use core::arch::{asm, global_asm};
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hvcall::SMCCC_VENDOR_HYP_CALL;

use crate::boot::{dtb_total_size, BootError, BootLayout, FDT_HEADER_LEN};
use crate::gicv3::{
    self, acknowledged_intid, sgi1r_to_self, CNTV_CTL_ENABLE, HEARTBEAT_SGI, ICC_IGRPEN1_ENABLE, ICC_PMR_ALLOW_ALL,
    ICC_SRE_SRE, VIRTUAL_TIMER_INTID,
};
use crate::hostile::{Attack, Hostile, Isa, SCRATCH_BYTES};
use crate::psci::Call;
use crate::{Env, Guest, InterruptCounts, Line, Outcome, Psci, Region, Request, SecondaryWorkload, Workload};

global_asm!(include_str!("entry.S"));

/// Defines the guest's entry points: `_start` in `entry.S` calls
/// `testguest_main` with the DTB address to run the workload, and
/// `secondary_start` calls `testguest_secondary` with the CPU_ON context id
/// on a vCPU the workload started. Without a secondary workload such a
/// vCPU parks.
#[macro_export]
macro_rules! entry {
    ($workload:path) => {
        #[no_mangle]
        extern "C" fn testguest_main(dtb: usize) -> ! {
            $crate::arch::aarch64::start(dtb, $workload)
        }

        #[no_mangle]
        extern "C" fn testguest_secondary(_context: u64) -> ! {
            $crate::arch::aarch64::park()
        }
    };
    ($workload:path, secondary = $secondary:path) => {
        #[no_mangle]
        extern "C" fn testguest_main(dtb: usize) -> ! {
            $crate::arch::aarch64::start(dtb, $workload)
        }

        #[no_mangle]
        extern "C" fn testguest_secondary(context: u64) -> ! {
            $crate::arch::aarch64::start_secondary(context, $secondary)
        }
    };
}

/// Timer ticks and SGIs taken; written only by the IRQ handler.
static TICKS: AtomicU64 = AtomicU64::new(0);
static SGIS: AtomicU64 = AtomicU64::new(0);
/// EL1 physical timer interrupts taken, and the period to re-arm it with
/// (0: disable it); used by the physical-timer workload.
pub(crate) static PHYS_TICKS: AtomicU64 = AtomicU64::new(0);
pub(crate) static PHYS_PERIOD: AtomicU64 = AtomicU64::new(0);
/// The tick period in counter counts; 0 when the tick is stopped.
static TICK_PERIOD: AtomicU64 = AtomicU64::new(0);
/// Set while an exception is being reported, so a fault in the report
/// itself (an `hvc` that is undefined without EL2, say) parks the vCPU
/// instead of recursing.
static REPORTING: AtomicBool = AtomicBool::new(false);

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
    /// The secondary entry in `entry.S`; only its address is used.
    fn secondary_start();
}

/// During a hostile attack, the address a synchronous exception resumes
/// at (0: none; `sync_el1h` in `entry.S` clears it), and the ESR_EL1 of
/// the exception taken there with bit 63 set (0: none).
#[export_name = "probe_resume"]
static PROBE_RESUME: AtomicU64 = AtomicU64::new(0);
#[export_name = "probe_esr"]
static PROBE_ESR: AtomicU64 = AtomicU64::new(0);
const PROBE_TAKEN: u64 = 1 << 63;

/// The hostile workload's scratch buffer, and the two words an attack
/// runs from: the instruction, then `br x20` back to the caller.
#[repr(C, align(4096))]
struct Scratch([u8; SCRATCH_BYTES]);
static mut SCRATCH: Scratch = Scratch([0; SCRATCH_BYTES]);
#[repr(C, align(64))]
struct AttackCode([u32; 2]);
static mut ATTACK_CODE: AttackCode = AttackCode([0; 2]);
/// BR x20 (Arm ARM C6.2.38: 0xd61f0000 | Rn << 5).
const BR_X20: u32 = 0xd61f_0000 | (20 << 5);

/// Names of the 16 EL1 vectors, in VBAR_EL1 order.
const VECTORS: [&str; 16] = [
    "sync-el1t",
    "irq-el1t",
    "fiq-el1t",
    "serror-el1t",
    "sync-el1h",
    "irq-el1h",
    "fiq-el1h",
    "serror-el1h",
    "sync-lower64",
    "irq-lower64",
    "fiq-lower64",
    "serror-lower64",
    "sync-lower32",
    "irq-lower32",
    "fiq-lower32",
    "serror-lower32",
];

/// This vCPU, as the workloads see it.
#[derive(Debug)]
pub struct El1Guest {
    _private: (),
}

/// Runs `workload` on the boot environment described by the DTB at `dtb`,
/// then shuts the guest down.
pub fn start(dtb: usize, workload: Workload<El1Guest>) -> ! {
    let mut guest = El1Guest { _private: () };
    match boot_env(dtb as u64) {
        Ok(env) => workload(&mut guest, &env),
        Err(e) => guest.write_line(&e.line()),
    }
    shutdown(&mut guest)
}

/// Runs `workload` on a vCPU started by PSCI CPU_ON, called through
/// `testguest_secondary` with the context id; parks should it return.
pub fn start_secondary(context: u64, workload: SecondaryWorkload<El1Guest>) -> ! {
    enable_cpu_interface();
    let mut guest = El1Guest { _private: () };
    workload(&mut guest, context);
    park()
}

fn image() -> Region {
    // linker.ld defines both symbols; only their addresses are used.
    Region::new((&raw const __image_start) as u64, (&raw const __image_end) as u64)
}

fn boot_env(dtb: u64) -> Result<Env, BootError> {
    let image = image();
    if !dtb.is_multiple_of(8) || dtb < image.end {
        return Err(BootError::DtbAddress(dtb));
    }
    // SAFETY: the hypervisor puts the DTB in this guest's RAM, past the
    // image (checked above), and nothing writes it; with the MMU off the
    // IPA is the address. Only the fixed-size header is read here.
    let header = unsafe { &*(dtb as *const [u8; FDT_HEADER_LEN]) };
    let size = dtb_total_size(header)?;
    // SAFETY: as above, for the size the header gives (bounded by
    // FDT_MAX_SIZE); BootLayout checks the blob lies inside RAM.
    let blob = unsafe { core::slice::from_raw_parts(dtb as *const u8, size) };
    let layout = BootLayout::new(Region::new(dtb, dtb.saturating_add(size as u64)), blob, image)?;
    // SAFETY: the MMU is off, so RAM is identity-mapped; outside the image
    // (code, data, bss with the stack) and the DTB, nothing uses it.
    Ok(unsafe { Env::with_free_ram(layout.ram, layout.in_use, layout.args) })
}

/// Stops this guest with `SHUTDOWN_SELF`; parks should it return.
fn shutdown(guest: &mut El1Guest) -> ! {
    guest.hypercall(Request::shutdown_self());
    park()
}

/// Stops this vCPU for good: interrupts masked, waiting forever.
pub fn park() -> ! {
    loop {
        // SAFETY: masking interrupts and waiting only affect this vCPU.
        unsafe { asm!("msr daifset, #0xf", "wfi", options(nomem, nostack)) };
    }
}

fn mpidr() -> u64 {
    let mpidr: u64;
    // SAFETY: reads MPIDR_EL1 (this vCPU's affinity, from VMPIDR_EL2).
    unsafe { asm!("mrs {}, mpidr_el1", out(reg) mpidr, options(nomem, nostack)) };
    mpidr
}

/// Turns on the distributor and this vCPU's redistributor as a GICv3
/// driver does: affinity routing and Group 1 forwarding, the
/// redistributor awake, its interrupts in Group 1 and the virtual timer's
/// PPI enabled (SGIs are always enabled).
fn enable_gic() {
    let rd = gicv3::redistributor(mpidr() & 0xff);
    // SAFETY: MMIO to this partition's GICv3 frames at the addresses its
    // device tree gives (the hypervisor emulates them); the MMU is off, so
    // the accesses are Device-nGnRnE.
    unsafe {
        let ctlr = (gicv3::GICD_BASE + gicv3::GICD_CTLR) as *mut u32;
        ctlr.write_volatile(ctlr.read_volatile() | gicv3::GICD_CTLR_ENABLE_GRP1_ARE);
        ((rd + gicv3::GICR_WAKER) as *mut u32).write_volatile(0);
        while ((rd + gicv3::GICR_WAKER) as *const u32).read_volatile() & gicv3::GICR_WAKER_CHILDREN_ASLEEP != 0 {}
        ((rd + gicv3::GICR_SGI_IGROUPR0) as *mut u32).write_volatile(u32::MAX);
        ((rd + gicv3::GICR_SGI_ISENABLER0) as *mut u32).write_volatile(1 << VIRTUAL_TIMER_INTID);
    }
}

/// Enables this vCPU's GICv3 CPU interface: system registers, every
/// priority, Group 1. Interrupts stay masked in PSTATE.
fn enable_cpu_interface() {
    enable_gic();
    // SAFETY: enables this vCPU's GICv3 CPU interface through its system
    // registers (SRE first, then isb before the other ICC_* accesses),
    // lets every priority through and enables Group 1.
    unsafe {
        asm!(
            "msr icc_sre_el1, {sre}",
            "isb",
            "msr icc_pmr_el1, {pmr}",
            "msr icc_igrpen1_el1, {grpen}",
            "isb",
            sre = in(reg) ICC_SRE_SRE,
            pmr = in(reg) ICC_PMR_ALLOW_ALL,
            grpen = in(reg) ICC_IGRPEN1_ENABLE,
            options(nomem, nostack),
        );
    }
}

fn counter() -> u64 {
    let count: u64;
    // SAFETY: reads CNTVCT_EL0; the isb keeps the read from being
    // speculated ahead of earlier instructions.
    unsafe { asm!("isb", "mrs {}, cntvct_el0", out(reg) count, options(nomem, nostack)) };
    count
}

/// Programs the virtual timer to fire `period` counts from now, unmasked
/// (the hypervisor may have set CNTV_CTL_EL0.IMASK while injecting).
fn arm_virtual_timer(period: u64) {
    // SAFETY: CNTV_TVAL_EL0/CNTV_CTL_EL0 belong to this vCPU's virtual timer.
    unsafe {
        asm!(
            "msr cntv_tval_el0, {period}",
            "msr cntv_ctl_el0, {ctl}",
            "isb",
            period = in(reg) period,
            ctl = in(reg) CNTV_CTL_ENABLE,
            options(nomem, nostack),
        );
    }
}

fn disarm_virtual_timer() {
    // SAFETY: disabling this vCPU's virtual timer.
    unsafe { asm!("msr cntv_ctl_el0, xzr", "isb", options(nomem, nostack)) };
}

/// Counts one more event; only the IRQ handler calls this, with IRQs
/// masked, so a plain load and store cannot lose an update.
fn bump(count: &AtomicU64) {
    count.store(count.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

/// Called by `irq_entry` in `entry.S` with IRQs masked: acknowledges and
/// handles every pending interrupt.
#[no_mangle]
extern "C" fn testguest_irq() {
    loop {
        let iar: u64;
        // SAFETY: acknowledging an interrupt at this vCPU's CPU interface.
        unsafe { asm!("mrs {}, icc_iar1_el1", out(reg) iar, options(nomem, nostack)) };
        let Some(intid) = acknowledged_intid(iar) else { break };
        match intid {
            VIRTUAL_TIMER_INTID => {
                bump(&TICKS);
                match TICK_PERIOD.load(Ordering::Relaxed) {
                    0 => disarm_virtual_timer(),
                    period => arm_virtual_timer(period),
                }
            }
            HEARTBEAT_SGI => bump(&SGIS),
            physical_timer::PPI => {
                bump(&PHYS_TICKS);
                physical_timer::rearm(PHYS_PERIOD.load(Ordering::Relaxed));
            }
            _ => {}
        }
        // SAFETY: ends the interrupt just acknowledged (priority drop and
        // deactivation, ICC_CTLR_EL1.EOImode = 0).
        unsafe { asm!("msr icc_eoir1_el1, {}", in(reg) u64::from(intid), options(nomem, nostack)) };
    }
}

/// Called by the exception vectors in `entry.S` for anything but an IRQ
/// from EL1h: reports it and stops the guest.
#[no_mangle]
extern "C" fn testguest_exception(vector: u64, esr: u64, elr: u64, far: u64) -> ! {
    if REPORTING.load(Ordering::Relaxed) {
        park();
    }
    REPORTING.store(true, Ordering::Relaxed);
    let mut guest = El1Guest { _private: () };
    let name = VECTORS.get(vector as usize).copied().unwrap_or("unknown");
    guest.write_line(Line::event("exception").hex("esr", esr).hex("elr", elr).hex("far", far).field("vector", name));
    shutdown(&mut guest)
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    let mut guest = El1Guest { _private: () };
    let mut line = Line::event("panic");
    if let Some(location) = info.location() {
        line.field("file", location.file()).field("line", location.line());
    }
    line.field("message", info.message());
    guest.write_line(&line);
    shutdown(&mut guest)
}

impl Guest for El1Guest {
    fn hypercall(&mut self, request: Request) -> Outcome {
        let (result, output): (u64, u64);
        // The hypervisor returns the result in x0 and a fast output in x3;
        // SMCCC allows it to clobber x4-x17.
        // SAFETY: `hvc #0` traps to the hypervisor (HYPERCALLS.md), which
        // touches guest memory only at the request's GPAs, in this guest's RAM.
        unsafe {
            asm!(
                "hvc #0",
                inout("x0") SMCCC_VENDOR_HYP_CALL => result,
                inout("x1") request.control => _,
                inout("x2") request.input => _,
                inout("x3") request.output => output,
                out("x4") _, out("x5") _, out("x6") _, out("x7") _,
                out("x8") _, out("x9") _, out("x10") _, out("x11") _,
                out("x12") _, out("x13") _, out("x14") _, out("x15") _,
                out("x16") _, out("x17") _,
                options(nostack),
            );
        }
        Outcome { result, output }
    }

    fn gpa_of(&self, ptr: *const u8) -> u64 {
        // The MMU is off: addresses are IPAs.
        ptr as u64
    }

    fn counter(&self) -> u64 {
        counter()
    }

    fn counter_frequency(&self) -> u64 {
        let frequency: u64;
        // SAFETY: reads CNTFRQ_EL0.
        unsafe { asm!("mrs {}, cntfrq_el0", out(reg) frequency, options(nomem, nostack)) };
        frequency
    }

    fn start_ticks(&mut self, period: u64) -> bool {
        TICK_PERIOD.store(period, Ordering::Relaxed);
        enable_cpu_interface();
        arm_virtual_timer(period);
        // SAFETY: unmasks IRQs; the vector table and handler are installed.
        unsafe { asm!("msr daifclr, #2", options(nomem, nostack)) };
        true
    }

    fn stop_ticks(&mut self) {
        TICK_PERIOD.store(0, Ordering::Relaxed);
        disarm_virtual_timer();
    }

    fn send_self_ipi(&mut self) -> bool {
        let sgi = sgi1r_to_self(mpidr(), HEARTBEAT_SGI);
        // SAFETY: generates a Group 1 SGI to this vCPU (trapped and
        // injected by the hypervisor).
        unsafe { asm!("msr icc_sgi1r_el1, {}", "isb", in(reg) sgi, options(nomem, nostack)) };
        true
    }

    fn wait_for_interrupt(&mut self) {
        // SAFETY: waits for an interrupt. Not `nomem`: the IRQ handler
        // updates the counts while this waits.
        unsafe { asm!("wfi", options(nostack)) };
    }

    fn wait_masked(&mut self, until: u64) {
        // SAFETY: masks IRQs; they are unmasked again below.
        unsafe { asm!("msr daifset, #2", "isb", options(nomem, nostack)) };
        while self.counter() < until {
            core::hint::spin_loop();
        }
        // SAFETY: waits for an interrupt (one pending ends the WFI although
        // PSTATE.I masks it), then unmasks IRQs and takes it. Not `nomem`:
        // the IRQ handler updates the counts.
        unsafe { asm!("wfi", "msr daifclr, #2", "isb", options(nostack)) };
    }

    fn interrupt_counts(&self) -> InterruptCounts {
        InterruptCounts { ticks: TICKS.load(Ordering::Relaxed), ipis: SGIS.load(Ordering::Relaxed) }
    }

    fn probe(&mut self, gpa: u64) -> [u64; 2] {
        let (first, reread): (u64, u64);
        // The isolation probe touches `gpa` on purpose: outside this guest's
        // RAM the hypervisor stops the guest or injects an abort, which the
        // vector table reports.
        // SAFETY: if the accesses return, the last store writes back the
        // value first read, so even an address in this program's memory
        // ends unchanged (this guest has one vCPU doing this).
        unsafe {
            asm!(
                "ldr {first}, [{addr}]",
                "mvn {t}, {first}",
                "str {t}, [{addr}]",
                "ldr {reread}, [{addr}]",
                "str {first}, [{addr}]",
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
        // The PL011 the hypervisor emulates (the guest DTB's, hypervisor
        // `GUEST_UART`): a load pair reports no instruction syndrome (ESR
        // ISV = 0), so the access cannot be emulated.
        const UART: u64 = 0x0900_0000;
        // SAFETY: reads two device registers into scratch registers; if the
        // hypervisor completed the access nothing else would change.
        unsafe {
            asm!("ldp {a}, {b}, [{uart}]", uart = in(reg) UART, a = out(reg) _, b = out(reg) _, options(nostack));
        }
    }
}

impl Psci for El1Guest {
    fn psci_call(&mut self, call: Call) -> u64 {
        // The MMU is off: the code address is its IPA.
        let entry = secondary_start as *const () as u64;
        let (function, args) = (call.function(), call.arguments(entry));
        let result: u64;
        // PSCI (DEN0022E) reads no guest memory; CPU_OFF and SYSTEM_OFF do
        // not return. Not `nomem`: another vCPU may start or stop and touch
        // shared memory. SMCCC lets the callee clobber x1-x17.
        // SAFETY: CPU_ON starts a vCPU only at `secondary_start`, which
        // gives vCPU 1 its own stack and parks any other.
        unsafe {
            asm!(
                "hvc #0",
                inout("x0") u64::from(function) => result,
                inout("x1") args[0] => _,
                inout("x2") args[1] => _,
                inout("x3") args[2] => _,
                out("x4") _, out("x5") _, out("x6") _, out("x7") _,
                out("x8") _, out("x9") _, out("x10") _, out("x11") _,
                out("x12") _, out("x13") _, out("x14") _, out("x15") _,
                out("x16") _, out("x17") _,
                options(nostack),
            );
        }
        result
    }

    fn mpidr(&self) -> u64 {
        mpidr()
    }
}

impl Hostile for El1Guest {
    fn isa(&self) -> Isa {
        Isa::Aarch64
    }

    fn scratch(&mut self) -> &mut [u8] {
        let buffer = (&raw mut SCRATCH).cast::<u8>();
        // SAFETY: the buffer is SCRATCH_BYTES long; only the hostile
        // workload, on this guest's one vCPU, uses it, and only through
        // this borrow of the guest.
        unsafe { core::slice::from_raw_parts_mut(buffer, SCRATCH_BYTES) }
    }

    fn attack(&mut self, attack: &Attack) -> Option<u64> {
        let Attack::Word { word, x } = *attack else { return None };
        let code = (&raw mut ATTACK_CODE).cast::<u32>();
        // SAFETY: the two words are this runtime's own, written before
        // they run; with the MMU off the stores reach memory, and the
        // instruction cache is invalidated for them (Arm ARM B2.4.4).
        unsafe {
            code.write_volatile(word);
            code.add(1).write_volatile(BR_X20);
            asm!("dc cvau, {0}", "dsb ish", "ic ivau, {0}", "dsb ish", "isb", in(reg) code, options(nostack));
        }
        PROBE_ESR.store(0, Ordering::Relaxed);
        PROBE_RESUME.store(code as u64 + 4, Ordering::Relaxed);
        // One generated instruction: it reads x0-x3 and may change x0 (MRS,
        // loads, calls), x16, x17 and x30 (pointer-authentication hints),
        // and a call the registers SMCCC lets the callee clobber; x20 holds
        // the way back, and an exception resumes at the `br x20`.
        // SAFETY: hostile::generate keeps out what would end or wedge this
        // guest; every register it may change is declared clobbered.
        unsafe {
            asm!(
                "adr x20, 2f",
                "br x9",
                "2:",
                in("x9") code,
                inout("x0") x[0] => _,
                inout("x1") x[1] => _,
                inout("x2") x[2] => _,
                inout("x3") x[3] => _,
                out("x20") _,
                clobber_abi("C"),
                options(nostack),
            );
        }
        PROBE_RESUME.store(0, Ordering::Relaxed);
        let esr = PROBE_ESR.load(Ordering::Relaxed);
        (esr & PROBE_TAKEN != 0).then_some(esr & !PROBE_TAKEN)
    }
}
