//! Hypercall test guests (`shared/DESIGN.md` §6-7, issues 5 and 6).
//!
//! The workloads here are arch-neutral and run against the [`Guest`] trait:
//! console lines, raw hypercalls, a monotonic counter, and optionally a
//! periodic tick and a self-interrupt. `arch::aarch64` implements the trait
//! at EL1 under our hypervisor; host tests run the same workloads against a
//! fake guest that implements `hypervisor/HYPERCALLS.md`.
//!
//! Every guest prints machine-readable lines `<event> key=value ...` (the
//! hypervisor adds the `guest<N>: ` prefix) and ends with `SHUTDOWN_SELF`
//! (smp with PSCI `SYSTEM_OFF`). The smp workload also needs the
//! [`Psci`] conduit and runs a second vCPU; on x86_64 it is [`sipi`], which
//! starts the second vCPU with INIT-SIPI-SIPI through the local APIC.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod args;
pub mod blackout;
pub mod boot;
pub mod dma;
pub mod exerciser;
pub mod gicv3;
pub mod heartbeat;
pub mod hostile;
pub mod hypercall;
pub mod isolation;
pub mod line;
pub mod longline;
pub mod memcheck;
pub mod psci;
pub mod reset;
pub mod sipi;
pub mod smp;
pub mod updater;

#[cfg(any(test, all(any(target_arch = "aarch64", target_arch = "x86_64"), target_os = "none")))]
pub mod arch;

#[cfg(test)]
mod fake;

pub use boot::{Env, Region};
pub use hypercall::{Outcome, Request};
pub use line::Line;
pub use psci::Psci;

/// Interrupts taken so far, as counted by the runtime's interrupt handler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterruptCounts {
    /// Periodic timer ticks.
    pub ticks: u64,
    /// Self-interrupts (SGIs on aarch64) received.
    pub ipis: u64,
}

/// What a workload needs from the machine it runs on.
///
/// Interrupts stay masked until [`Guest::start_ticks`] is called, so a
/// workload that never starts the tick runs with interrupts masked.
pub trait Guest {
    /// Issues one hypercall (`hypervisor/HYPERCALLS.md`).
    fn hypercall(&mut self, request: Request) -> Outcome;

    /// The guest-physical address of a buffer in this guest's memory.
    fn gpa_of(&self, ptr: *const u8) -> u64;

    /// A monotonic counter (CNTVCT_EL0 on aarch64, the TSC on x86_64).
    fn counter(&self) -> u64;

    /// Counts per second of [`Guest::counter`].
    fn counter_frequency(&self) -> u64;

    /// Starts a periodic tick every `period` counts and unmasks interrupts;
    /// false if this guest has no timer interrupt.
    fn start_ticks(&mut self, period: u64) -> bool;

    /// Stops the periodic tick.
    fn stop_ticks(&mut self);

    /// Sends this vCPU one self-interrupt; false if unsupported.
    fn send_self_ipi(&mut self) -> bool;

    /// Sleeps until an interrupt arrives (`wfi`, `hlt`).
    fn wait_for_interrupt(&mut self);

    /// An operating system's idle entry: masks interrupts, spins until
    /// [`Guest::counter`] reaches `until` (checking for work; an interrupt
    /// that comes meanwhile stays pending), then waits for an interrupt
    /// and unmasks, taking it. The wait must end at once for the interrupt
    /// that came while interrupts were masked. (The default does not mask:
    /// for runtimes without interrupts.)
    fn wait_masked(&mut self, until: u64) {
        while self.counter() < until {
            core::hint::spin_loop();
        }
        self.wait_for_interrupt();
    }

    /// Interrupts taken since boot.
    fn interrupt_counts(&self) -> InterruptCounts;

    /// Reads the 64-bit word at `gpa`, writes its complement, reads it
    /// again and writes the first value back; returns both reads. The
    /// isolation probe: outside this guest's RAM the hypervisor stops the
    /// guest or injects an abort (aarch64), or completes it as a PC would,
    /// reads all ones and the write dropped (x86_64).
    fn probe(&mut self, gpa: u64) -> [u64; 2];

    /// An access the hypervisor does not emulate, so it stops this guest
    /// with `hv: fault` (aarch64: a load pair from the emulated PL011,
    /// which has no instruction syndrome; x86_64: string I/O). Returns
    /// only if the guest was not stopped (the default, for runtimes
    /// without one: nothing happens).
    fn unemulated_access(&mut self) {}

    /// Writes one console line through `CONSOLE_WRITE`. The status is
    /// ignored: a failing console has nowhere to report to.
    fn write_line(&mut self, line: &Line) {
        let bytes = line.as_bytes();
        let request = Request::console_write(self.gpa_of(bytes.as_ptr()), bytes.len());
        self.hypercall(request);
    }
}

/// A workload: runs to completion; the runtime then shuts the guest down.
pub type Workload<G> = fn(&mut G, &Env);

/// The workload of a vCPU started by PSCI CPU_ON (aarch64) or INIT-SIPI-SIPI
/// (x86_64), given its context id. It ends by turning its vCPU off; should
/// it return, the vCPU parks (on x86_64, halts with interrupts off).
pub type SecondaryWorkload<G> = fn(&mut G, u64);
