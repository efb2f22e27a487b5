//! The incoming image's half of the update state machine (`kho`'s
//! `UpdateStateMachine::after_kexec`): Frozen, as the image starts, then
//! Restored (the machine adopted from the handover and installed), Resumed
//! (the last CPU re-entered a guest: the blackout is reported), and
//! Finished (the consumed handover blob goes back to the allocator).
//!
//! # Ownership
//! The state machine lives in [`INCOMING`] from the restore until the last
//! CPU resumes; the boot CPU puts it there before it releases the others,
//! and the CPU that resumes last takes it out and finishes it.

use alloc::boxed::Box;
use alloc::vec::Vec;

use kho::{HandoverReader, HandoverWriter, UpdateParticipant, UpdateStateMachine};
use loader::PhysRange;

use super::report::RestoreFigures;
use super::{AdoptFailure, REPORT};
use crate::hv_event;
use crate::machine::{Arch, Handover, MachineLock};

/// The state machine between the restore and the end of the blackout.
struct Incoming(UpdateStateMachine<'static, AdoptFailure>);

// SAFETY: the participants hold only `'static` references to the machine
// lock and the report, and plain values; the state machine is reached
// only under `INCOMING`'s lock, by one CPU at a time.
unsafe impl Send for Incoming {}

static INCOMING: spin::Mutex<Option<Incoming>> = spin::Mutex::new(None);

/// Adopts the machine (the preserved map, then partitions, second-stage
/// tables and vCPUs) and installs it; frees the consumed blob at Finish.
struct Adoption<A: Handover + 'static> {
    lock: &'static MachineLock<A>,
    arch: Option<(A, A::Pages)>,
    ram: Vec<PhysRange>,
    reserved: Vec<PhysRange>,
    online: Vec<usize>,
    counter: fn() -> u64,
    /// The consumed handover blob, released at Finish.
    blob: Option<PhysRange>,
}

impl<A: Handover + 'static> UpdateParticipant for Adoption<A> {
    type Error = AdoptFailure;

    fn name(&self) -> &'static str {
        "machine"
    }

    fn prepare(&mut self, _: &mut HandoverWriter) -> Result<(), AdoptFailure> {
        Ok(())
    }

    fn freeze(&mut self, _: &mut HandoverWriter) -> Result<(), AdoptFailure> {
        Ok(())
    }

    fn unfreeze(&mut self) {}

    fn restore(&mut self, reader: &HandoverReader<'_>) -> Result<(), AdoptFailure> {
        let Some((arch, pages)) = self.arch.take() else { return Err(AdoptFailure::NoGlobalScratch) };
        let reserved = core::mem::take(&mut self.reserved);
        // SAFETY: `adopt`'s contract: `pages` reaches RAM and only this CPU
        // is up.
        let (m, figures) = unsafe { super::restore(reader, &self.ram, reserved, pages, arch, &self.online) }?;
        for p in &m.partitions {
            hv_event!(
                "guest-adopted",
                id = p.info.id,
                name = p.info.name,
                stage2_root = format_args!("{:#x}", A::stage2_root(&p.arch)),
                ram = format_args!("{:#x}", p.info.ram.host_base),
            );
        }
        let footprint = reader.footprint();
        self.blob = Some(PhysRange::new(footprint.base(), footprint.size()));
        REPORT.note_restored(RestoreFigures { resume_cpus: m.cpus_with_runnable(), ..figures }, (self.counter)());
        self.lock.install(m);
        Ok(())
    }

    fn resume(&mut self) {}

    fn finish(&mut self) {
        // Everything the blob said now lives in the machine; it is not in
        // the preserved map, so it is free memory again.
        if let Some(blob) = self.blob.take() {
            self.lock.with(|m| m.frames.add_free(blob));
        }
    }
}

/// Ends the blackout: prints what the report measured.
struct Blackout;

impl UpdateParticipant for Blackout {
    type Error = AdoptFailure;

    fn name(&self) -> &'static str {
        "blackout"
    }

    fn prepare(&mut self, _: &mut HandoverWriter) -> Result<(), AdoptFailure> {
        Ok(())
    }

    fn freeze(&mut self, _: &mut HandoverWriter) -> Result<(), AdoptFailure> {
        Ok(())
    }

    fn unfreeze(&mut self) {}

    fn restore(&mut self, _: &HandoverReader<'_>) -> Result<(), AdoptFailure> {
        Ok(())
    }

    fn resume(&mut self) {
        REPORT.print();
    }

    fn finish(&mut self) {}
}

/// What the arch hands the incoming side.
#[derive(Debug)]
pub struct AdoptSpec<'a> {
    pub ram: &'a [PhysRange],
    /// What the platform and the image slot occupy.
    pub reserved: Vec<PhysRange>,
    /// The CPUs that came up, by index.
    pub online: &'a [usize],
    /// The free-running counter (for the report's restore phase).
    pub counter: fn() -> u64,
}

/// Frozen → Restored: adopts the machine described by `reader` into
/// `lock`. Returns how many partitions were adopted.
///
/// # Safety
/// `pages` reaches the RAM the handover's bitmap lives in, and only this
/// CPU is up.
pub unsafe fn adopt<A: Handover + 'static>(
    reader: &HandoverReader<'_>,
    lock: &'static MachineLock<A>,
    arch: A,
    pages: <A as Arch>::Pages,
    spec: AdoptSpec<'_>,
) -> Result<usize, AdoptFailure> {
    let adoption = Adoption {
        lock,
        arch: Some((arch, pages)),
        ram: spec.ram.to_vec(),
        reserved: spec.reserved,
        online: spec.online.to_vec(),
        counter: spec.counter,
        blob: None,
    };
    let mut sm: UpdateStateMachine<'static, AdoptFailure> = UpdateStateMachine::after_kexec();
    let registered = sm.register(Box::new(adoption)).and_then(|()| sm.register(Box::new(Blackout)));
    registered.map_err(|_| AdoptFailure::StateMachine)?;
    sm.restore(reader).map_err(|e| match e {
        kho::UpdateError::RestoreFailed { error, .. } => error,
        _ => AdoptFailure::StateMachine,
    })?;
    let partitions = lock.with(|m| m.partitions.len()).unwrap_or(0);
    *INCOMING.lock() = Some(Incoming(sm));
    Ok(partitions)
}

/// Called by each CPU as it first enters a guest. The last one after an
/// update drives Restored → Resumed → Finished.
pub fn cpu_resumed(now: u64, hz: u64) {
    if !REPORT.note_resumed(now, hz) {
        return;
    }
    let Some(Incoming(mut sm)) = INCOMING.lock().take() else { return };
    if sm.resume().and_then(|()| sm.finish()).is_err() {
        hv_event!("update-state-machine", error = "resume-or-finish-refused");
    }
}
