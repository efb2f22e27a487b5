//! Starting the application processors with INIT-SIPI-SIPI through the
//! local xAPIC (Intel SDM Vol. 3A §9.4.4 "MP Initialization Example",
//! §11.6.1 "Interrupt Command Register").

use core::sync::atomic::{AtomicUsize, Ordering};

use x86::msr::{rdmsr, IA32_APIC_BASE};

use super::{delay_us, MAX_CPUS};

/// Where the real-mode trampoline is copied: SIPI vector 0x08.
pub const TRAMPOLINE: u64 = 0x8000;
const SIPI_VECTOR: u32 = (TRAMPOLINE >> 12) as u32;
/// Local APIC register offsets (SDM Table 11-1).
const APIC_ID: usize = 0x20;
const ICR_LOW: usize = 0x300;
const ICR_HIGH: usize = 0x310;
const EOI: usize = 0x0b0;
/// Spurious-interrupt vector register: bit 8 enables the APIC in software
/// (SDM §11.9, §11.4.7.2). An AP comes out of INIT with it clear, and a
/// software-disabled APIC accepts no fixed interrupts, kicks included.
const SVR: usize = 0x0f0;
const SVR_ENABLE: u32 = 1 << 8;
/// ICR: delivery mode INIT (101b) / Start-Up (110b), level assert, and the
/// delivery-status bit (SDM Figure 11-12).
const ICR_INIT: u32 = 0x0000_4500;
const ICR_STARTUP: u32 = 0x0000_4600;
const ICR_BUSY: u32 = 1 << 12;
/// The kick: a fixed interrupt (delivery mode 000b, physical destination)
/// with a vector of the hypervisor's own. It only makes a CPU running a
/// guest exit (VMX: external-interrupt exiting, acknowledged on exit;
/// SVM: the INTR intercept, then taken by `hv_host_interrupt`); the
/// hypervisor otherwise runs with interrupts disabled.
pub const KICK_VECTOR: u32 = 0xf0;
/// How long a kick waits for an earlier IPI to leave the ICR.
const ICR_IDLE_POLLS: u32 = 1000;
/// Each AP's stack (`AP_STACKS`).
pub(crate) const STACK_SIZE: usize = 0x10000;
const APIC_BASE_BSP: u64 = 1 << 8;
const AP_WAIT_US: u64 = 200_000;

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static ap_cr3: u8;
    static ap_stack: u8;
    static ap_entry: u8;
    static ap_arg: u8;
}

#[repr(C, align(16))]
pub(crate) struct Stacks([[u8; STACK_SIZE]; MAX_CPUS]);

/// The APs' stacks, by CPU index (also found by `hv_ap_parked_entry` in
/// `entry.S`: index + 1 times [`STACK_SIZE`] from here is the top).
pub(crate) static mut AP_STACKS: Stacks = Stacks([[0; STACK_SIZE]; MAX_CPUS]);

/// CPUs running the hypervisor, the boot CPU included.
pub static ONLINE: AtomicUsize = AtomicUsize::new(1);

pub(crate) fn apic_base() -> usize {
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU.
    (unsafe { rdmsr(IA32_APIC_BASE) } & !0xfff) as usize
}

fn apic_read(reg: usize) -> u32 {
    // SAFETY: the local APIC page is identity-mapped uncached by the boot
    // page tables; reads of these registers have no side effects.
    unsafe { core::ptr::read_volatile((apic_base() + reg) as *const u32) }
}

fn apic_write(reg: usize, value: u32) {
    // SAFETY: as above; ICR writes send IPIs, which is the intent.
    unsafe { core::ptr::write_volatile((apic_base() + reg) as *mut u32, value) }
}

/// Reads a local APIC register (the SVM backend's slice timer).
pub(crate) fn apic_read_reg(reg: usize) -> u32 {
    apic_read(reg)
}

/// Writes a local APIC register (the SVM backend's slice timer).
pub(crate) fn apic_write_reg(reg: usize, value: u32) {
    apic_write(reg, value);
}

/// Signals the end of the interrupt in service at this CPU's local APIC
/// (SDM §11.8.5): any value written to the EOI register does.
pub fn apic_eoi() {
    apic_write(EOI, 0);
}

/// Whether this is the bootstrap processor: IA32_APIC_BASE bit 8 (SDM Vol.
/// 3A §11.4.4). INIT makes the BSP run the firmware again instead of
/// waiting for a SIPI, so only the BSP may enter a new image.
pub fn is_bsp() -> bool {
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU.
    unsafe { rdmsr(IA32_APIC_BASE) & APIC_BASE_BSP != 0 }
}

pub fn my_apic_id() -> u32 {
    apic_read(APIC_ID) >> 24
}

fn send_ipi(apic_id: u32, low: u32) {
    apic_write(ICR_HIGH, apic_id << 24);
    apic_write(ICR_LOW, low);
    for _ in 0..1000 {
        if apic_read(ICR_LOW) & ICR_BUSY == 0 {
            break;
        }
        delay_us(1);
    }
}

/// Enables this CPU's local APIC in software, so that kicks reach it. The
/// LVT entries keep their masks, and the hypervisor runs with interrupts
/// disabled, so nothing else changes.
pub fn enable_local_apic() {
    apic_write(SVR, apic_read(SVR) | SVR_ENABLE);
}

/// Sends the kick to the CPU with `apic_id` (SDM §11.6.1). Does not wait
/// for delivery; an IPI still in the ICR is given a bounded time first.
pub fn send_kick(apic_id: u32) {
    for _ in 0..ICR_IDLE_POLLS {
        if apic_read(ICR_LOW) & ICR_BUSY == 0 {
            break;
        }
        core::hint::spin_loop();
    }
    apic_write(ICR_HIGH, apic_id << 24);
    apic_write(ICR_LOW, KICK_VECTOR);
}

fn sym(s: &u8) -> usize {
    core::ptr::from_ref(s) as usize
}

/// Copies the trampoline below 1 MiB and patches its parameters.
fn install_trampoline(cr3: u64, stack_top: u64, entry: u64, arg: u64) {
    // SAFETY: linker symbols; only their addresses are used.
    let (start, end, fields) = unsafe {
        (
            sym(&ap_trampoline_start),
            sym(&ap_trampoline_end),
            [(sym(&ap_cr3), cr3), (sym(&ap_stack), stack_top), (sym(&ap_entry), entry), (sym(&ap_arg), arg)],
        )
    };
    let dst = TRAMPOLINE as usize;
    // SAFETY: the caller checked that [TRAMPOLINE, +4 KiB) is free RAM not
    // used by anything else; it is identity-mapped, and the source is the
    // image's own text.
    unsafe {
        core::ptr::copy_nonoverlapping(start as *const u8, dst as *mut u8, end - start);
        for (field, value) in fields {
            core::ptr::write_unaligned((dst + field - start) as *mut u64, value);
        }
    }
}

/// Boots the AP with `apic_id` as CPU `index`; it runs `entry(index)`.
/// Returns whether it came online in time.
pub fn start_ap(apic_id: u32, index: usize, entry: extern "C" fn(u64) -> !) -> bool {
    if index >= MAX_CPUS {
        return false;
    }
    // SAFETY: each AP gets its own stack slot, indexed by `index`.
    let stack_top = unsafe { core::ptr::addr_of!(AP_STACKS.0[index]) as u64 } + STACK_SIZE as u64;
    let cr3: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { core::arch::asm!("mov {0}, cr3", out(reg) cr3, options(nomem, nostack)) };
    install_trampoline(cr3, stack_top, entry as *const () as u64, index as u64);
    let before = ONLINE.load(Ordering::Acquire);
    hypervisor::live_update::REPORT.note_cpu_restart();
    send_ipi(apic_id, ICR_INIT);
    delay_us(10_000);
    for _ in 0..2 {
        send_ipi(apic_id, ICR_STARTUP | SIPI_VECTOR);
        delay_us(200);
    }
    wait_online(before)
}

/// Waits until more than `before` CPUs are online; whether they came in
/// time.
fn wait_online(before: usize) -> bool {
    let mut waited = 0;
    while ONLINE.load(Ordering::Acquire) == before {
        if waited >= AP_WAIT_US {
            return false;
        }
        delay_us(10);
        waited += 10;
    }
    true
}

/// Lets the CPU the previous image parked at mailbox `word` go: it enters
/// `entry` with RDI = its index (a live update's direct handover). Returns
/// whether it came online in time.
pub fn release_parked(word: u64, entry: u64) -> bool {
    let before = ONLINE.load(Ordering::Acquire);
    // SAFETY: `word` is 8-aligned in the old image's slot (`Parked`
    // checked it), identity-mapped RAM this image does not use; the
    // parked CPU only reads it.
    unsafe { core::ptr::write_volatile(word as *mut u64, entry) };
    wait_online(before)
}
