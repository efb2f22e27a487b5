//! The blackout report of the incoming image: when the old image froze,
//! jumped and the new one was entered and restored, and how many CPUs must
//! re-enter guests before the blackout ends (`hv: update-done`,
//! `hv: update-phases`).
//!
//! # Ownership
//! One [`BlackoutReport`] exists (`live_update::REPORT`). The boot CPU
//! writes it before it releases the other CPUs (entry, restore); after
//! that each CPU only counts itself in, and the last one prints.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::request::blackout_us;
use core::fmt::Write as _;

use crate::machine::MAX_CPUS;
use crate::{hv_event, VERSION};

/// Counter values and figures of the update being completed.
#[derive(Debug)]
pub struct BlackoutReport {
    /// The freeze counter from the handover (0: no update to report).
    resume_from: AtomicU64,
    resumed: AtomicUsize,
    resume_cpus: AtomicUsize,
    count: AtomicU64,
    handover_bytes: AtomicU64,
    preserved_pages: AtomicU64,
    /// Bytes of the state table's pages (0: the handover had a node per
    /// partition and vCPU instead).
    table_bytes: AtomicU64,
    /// The kexec jump, the new image's first Rust instruction, the end of
    /// the restore.
    kexec: AtomicU64,
    entry: AtomicU64,
    restored: AtomicU64,
    /// When the last CPU re-entered a guest, and the counter's frequency.
    resumed_at: AtomicU64,
    hz: AtomicU64,
    /// How the old image handed over: staged in its own slot (1) or
    /// copied over the old one (0); CPUs released from the parking
    /// mailbox; calls this image made into the firmware before resuming.
    staged: AtomicU64,
    parked_cpus: AtomicU64,
    firmware_calls: AtomicU64,
    /// CPUs this image started the old way (PSCI CPU_ON, INIT-SIPI-SIPI)
    /// rather than from the parking mailbox.
    cpu_restarts: AtomicU64,
    /// Free frames once the update finished (the consumed handover blob
    /// given back): the same after every update unless one leaks.
    free_frames: AtomicU64,
    /// When each CPU (by index) re-entered a guest.
    cpu_resumed_at: [AtomicU64; MAX_CPUS],
    /// Steps of the boot CPU between entry and the end of the restore
    /// ([`BlackoutReport::mark`]), in order.
    marks: spin::Mutex<[(&'static str, u64); MAX_MARKS]>,
}

/// How many restore steps the report keeps.
const MAX_MARKS: usize = 12;

impl Default for BlackoutReport {
    fn default() -> Self {
        Self::new()
    }
}

/// What the restore side measured, for [`BlackoutReport::note_restored`].
#[derive(Clone, Copy, Debug)]
pub struct RestoreFigures {
    pub update_count: u64,
    pub handover_bytes: u64,
    pub preserved_pages: u64,
    /// The state table's pages (`pages-table`), if the handover had one.
    pub table: Option<loader::PhysRange>,
    pub freeze_counter: u64,
    /// CPUs that must re-enter guests before the blackout ends.
    pub resume_cpus: usize,
}

impl BlackoutReport {
    pub const fn new() -> Self {
        Self {
            resume_from: AtomicU64::new(0),
            resumed: AtomicUsize::new(0),
            resume_cpus: AtomicUsize::new(0),
            count: AtomicU64::new(0),
            handover_bytes: AtomicU64::new(0),
            preserved_pages: AtomicU64::new(0),
            table_bytes: AtomicU64::new(0),
            kexec: AtomicU64::new(0),
            entry: AtomicU64::new(0),
            restored: AtomicU64::new(0),
            resumed_at: AtomicU64::new(0),
            hz: AtomicU64::new(0),
            staged: AtomicU64::new(0),
            parked_cpus: AtomicU64::new(0),
            firmware_calls: AtomicU64::new(0),
            cpu_restarts: AtomicU64::new(0),
            free_frames: AtomicU64::new(0),
            cpu_resumed_at: [const { AtomicU64::new(0) }; MAX_CPUS],
            marks: spin::Mutex::new([("", 0); MAX_MARKS]),
        }
    }

    /// Records that the boot CPU finished restore step `name` at `now`
    /// (printed as `hv: update-steps <name>_us=...`, each from the one
    /// before, the first from the entry). Steps past the twelfth are not
    /// kept.
    pub fn mark(&self, name: &'static str, now: u64) {
        let mut marks = self.marks.lock();
        if let Some(slot) = marks.iter_mut().find(|(n, _)| n.is_empty()) {
            *slot = (name, now);
        }
    }

    /// Records how the CPUs and the image were handed over.
    pub fn note_handoff(&self, staged: bool, parked_cpus: u64, firmware_calls: u64) {
        self.staged.store(u64::from(staged), Ordering::Relaxed);
        self.parked_cpus.store(parked_cpus, Ordering::Relaxed);
        self.firmware_calls.store(firmware_calls, Ordering::Relaxed);
    }

    /// Records that a CPU was started the old way (PSCI CPU_ON, INIT-SIPI-
    /// SIPI): it went back through the firmware or a reset.
    pub fn note_cpu_restart(&self) {
        self.cpu_restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the free frames once the update has finished.
    pub fn note_free_frames(&self, frames: u64) {
        self.free_frames.store(frames, Ordering::Relaxed);
    }

    /// Records when the new image was entered (and when the old one jumped).
    pub fn note_entry(&self, kexec_counter: u64, now: u64) {
        self.kexec.store(kexec_counter, Ordering::Relaxed);
        self.entry.store(now, Ordering::Relaxed);
    }

    /// Arms the report once the machine is restored.
    pub fn note_restored(&self, f: RestoreFigures, now: u64) {
        self.count.store(f.update_count, Ordering::Relaxed);
        self.handover_bytes.store(f.handover_bytes, Ordering::Relaxed);
        self.preserved_pages.store(f.preserved_pages, Ordering::Relaxed);
        self.table_bytes.store(f.table.map_or(0, |t| t.size), Ordering::Relaxed);
        self.resume_cpus.store(f.resume_cpus.max(1), Ordering::Relaxed);
        self.resumed.store(0, Ordering::Relaxed);
        for at in &self.cpu_resumed_at {
            at.store(0, Ordering::Relaxed);
        }
        self.restored.store(now, Ordering::Relaxed);
        self.resume_from.store(f.freeze_counter.max(1), Ordering::Release);
    }

    /// CPUs that have still to re-enter a guest before the blackout ends
    /// (0 when no update is being completed).
    pub fn waiting_for(&self) -> usize {
        if self.resume_from.load(Ordering::Acquire) == 0 {
            return 0;
        }
        self.resume_cpus.load(Ordering::Acquire).saturating_sub(self.resumed.load(Ordering::Acquire))
    }

    /// Called by each CPU as it first enters a guest: true for the last
    /// one to do so after an update, whose entry ends the blackout.
    pub fn note_resumed(&self, cpu: usize, now: u64, hz: u64) -> bool {
        if self.resume_from.load(Ordering::Acquire) == 0 {
            return false;
        }
        if let Some(at) = self.cpu_resumed_at.get(cpu) {
            at.store(now, Ordering::Relaxed);
        }
        let n = self.resumed.fetch_add(1, Ordering::AcqRel) + 1;
        if n != self.resume_cpus.load(Ordering::Acquire) {
            return false;
        }
        self.resumed_at.store(now, Ordering::Relaxed);
        self.hz.store(hz, Ordering::Relaxed);
        true
    }

    /// Prints the blackout (`hv: update-done`, `hv: update-phases`) once
    /// the last CPU has resumed, and disarms the report.
    pub fn print(&self) {
        let t0 = self.resume_from.swap(0, Ordering::AcqRel);
        if t0 == 0 {
            return;
        }
        let (now, hz) = (self.resumed_at.load(Ordering::Relaxed), self.hz.load(Ordering::Relaxed));
        hv_event!(
            "update-done",
            count = self.count.load(Ordering::Relaxed),
            version = VERSION,
            blackout_us = blackout_us(t0, now, hz),
            handover_bytes = self.handover_bytes.load(Ordering::Relaxed),
            preserved_pages = self.preserved_pages.load(Ordering::Relaxed),
            state = if self.table_bytes.load(Ordering::Relaxed) != 0 { "table" } else { "records" },
            table_bytes = self.table_bytes.load(Ordering::Relaxed),
            freeze_at = t0,
            resume_at = now,
            counter_hz = hz,
            staged = self.staged.load(Ordering::Relaxed),
            parked_cpus = self.parked_cpus.load(Ordering::Relaxed),
            firmware_calls = self.firmware_calls.load(Ordering::Relaxed),
            cpu_restarts = self.cpu_restarts.load(Ordering::Relaxed),
            free_frames = self.free_frames.load(Ordering::Relaxed),
        );
        let (kexec, entry, restored) = (
            self.kexec.load(Ordering::Relaxed),
            self.entry.load(Ordering::Relaxed),
            self.restored.load(Ordering::Relaxed),
        );
        hv_event!(
            "update-phases",
            freeze_to_kexec_us = blackout_us(t0, kexec, hz),
            kexec_to_entry_us = blackout_us(kexec, entry, hz),
            entry_to_restored_us = blackout_us(entry, restored, hz),
            restored_to_resumed_us = blackout_us(restored, now, hz),
        );
        // Per CPU: from the end of the restore to its first guest entry.
        let mut line = alloc::string::String::new();
        for (cpu, at) in self.cpu_resumed_at.iter().enumerate() {
            let at = at.load(Ordering::Relaxed);
            if at != 0 {
                let _ = write!(line, " cpu{cpu}_resumed_us={}", blackout_us(restored, at, hz));
            }
        }
        crate::println!("hv: update-cpus{line}");
        let mut steps = alloc::string::String::new();
        let mut before = entry;
        for (name, at) in core::mem::replace(&mut *self.marks.lock(), [("", 0); MAX_MARKS]) {
            if !name.is_empty() {
                let _ = write!(steps, " {name}_us={}", blackout_us(before, at, hz));
                before = at;
            }
        }
        crate::println!("hv: update-steps{steps}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_cpu_to_resume_reports_once() {
        let r = BlackoutReport::new();
        assert!(!r.note_resumed(0, 10, 1_000_000), "nothing armed on a first boot");
        let f = RestoreFigures {
            update_count: 1,
            handover_bytes: 4096,
            preserved_pages: 9,
            table: None,
            freeze_counter: 100,
            resume_cpus: 2,
        };
        r.note_restored(f, 150);
        assert!(!r.note_resumed(0, 200, 1_000_000));
        assert!(r.note_resumed(1, 210, 1_000_000));
        r.print();
        assert!(!r.note_resumed(0, 220, 1_000_000), "reported once");
    }
}
