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
use crate::records::HandoffRecord;

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
    /// The consumed handover blob and state table, released at Finish.
    blob: Option<PhysRange>,
    table: Option<PhysRange>,
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
        let (m, figures) =
            unsafe { super::restore(reader, &self.ram, reserved, pages, arch, &self.online, self.counter) }?;
        let footprint = reader.footprint();
        self.blob = Some(PhysRange::new(footprint.base(), footprint.size()));
        self.table = figures.table;
        REPORT.note_restored(RestoreFigures { resume_cpus: m.cpus_with_runnable(), ..figures }, (self.counter)());
        self.lock.install(m);
        Ok(())
    }

    /// The blackout is over (every CPU is back in a guest): what was
    /// adopted is reported now, not in it (formatting an event costs a
    /// partition about 6 us of blackout under icount).
    fn resume(&mut self) {
        self.lock.with(|m| {
            for p in &m.partitions {
                hv_event!(
                    "guest-adopted",
                    id = p.info.id,
                    name = p.info.name,
                    stage2_root = format_args!("{:#x}", A::stage2_root(&p.arch)),
                    ram = format_args!("{:#x}", p.info.ram.host_base),
                );
            }
        });
    }

    fn finish(&mut self) {
        // Everything the blob said now lives in the machine; it is not in
        // the preserved map, so it is free memory again.
        for range in [self.blob.take(), self.table.take()].into_iter().flatten() {
            self.lock.with(|m| m.frames.add_free(range));
        }
        if let Some(free) = self.lock.with(|m| m.frames.free_bytes() / crate::frames::PAGE_SIZE) {
            REPORT.note_free_frames(free);
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

    fn resume(&mut self) {}

    /// After the adoption's finish (registered first), which gives the
    /// consumed blob back and notes the free frames the report prints.
    fn finish(&mut self) {
        REPORT.print();
        check_old_image();
    }
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
        table: None,
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
pub fn cpu_resumed(cpu: usize, now: u64, hz: u64) {
    let last = REPORT.note_resumed(cpu, now, hz);
    if REPORT.waiting_for() == 0 {
        // The blackout is over (or none is being measured): what the
        // restore printed goes out now.
        crate::console::release();
    }
    if !last {
        return;
    }
    let Some(Incoming(mut sm)) = INCOMING.lock().take() else { return };
    if sm.resume().and_then(|()| sm.finish()).is_err() {
        hv_event!("update-state-machine", error = "resume-or-finish-refused");
    }
}

/// The previous image's code and read-only data, as its handoff record
/// describes them, to check once the guests have resumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OldImage {
    pub base: u64,
    pub len: u64,
    pub hash: u64,
}

static OLD_IMAGE: spin::Mutex<Option<OldImage>> = spin::Mutex::new(None);

/// Arms the check of the previous image (`hv: old-image intact=<0|1>`
/// after `hv: update-done`).
///
/// # Safety
/// `[base, base + len)` must be identity-mapped RAM that nothing of this
/// image uses (the other image slot), `len` a multiple of 8.
pub unsafe fn expect_old_image(old: OldImage) {
    *OLD_IMAGE.lock() = Some(old);
}

/// Hashes the previous image's code as it is now and reports whether it
/// is what that image hashed before the freeze: the new image must not
/// have touched it (it is what a rollback would return to). Runs after
/// the blackout ended; costs about a word's load and multiply per 8 bytes.
fn check_old_image() {
    let Some(old) = OLD_IMAGE.lock().take() else { return };
    // SAFETY: `expect_old_image`'s contract.
    let words = unsafe { core::slice::from_raw_parts(old.base as *const u64, (old.len / 8) as usize) };
    let hash = crate::records::code_hash(words.iter().copied());
    hv_event!(
        "old-image",
        intact = u8::from(hash == old.hash),
        base = format_args!("{:#x}", old.base),
        bytes = old.len,
    );
}

/// The CPUs a previous image parked for this one (its handoff record),
/// once the record's mailbox is known to lie in the old image's slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parked {
    mailbox: u64,
    mask: u64,
}

impl Parked {
    /// From an untrusted handoff record: `None` unless its mailbox (one
    /// word per CPU index up to `max_cpus`) is 8-aligned and lies wholly
    /// in `old_slot`, the slot this image does not run from.
    pub fn from_record(rec: &HandoffRecord, old_slot: PhysRange, max_cpus: usize) -> Option<Self> {
        let words = PhysRange::new(rec.mailbox, 8 * max_cpus as u64);
        let ok = rec.mailbox != 0 && rec.mailbox.is_multiple_of(8) && old_slot.contains(&words);
        let mask = if max_cpus >= 64 { rec.parked } else { rec.parked & ((1 << max_cpus) - 1) };
        ok.then_some(Self { mailbox: rec.mailbox, mask })
    }

    /// CPU `index`'s mailbox word, if it is parked there.
    pub fn word(&self, index: usize) -> Option<u64> {
        (index < 64 && self.mask & (1 << index) != 0).then(|| self.mailbox + 8 * index as u64)
    }

    pub fn count(&self) -> u64 {
        u64::from(self.mask.count_ones())
    }
}

/// The old image's code as an untrusted handoff record describes it, if
/// it was left in place (staged update) and lies wholly, 8-aligned, in
/// `old_slot`.
pub fn old_image_of(rec: &HandoffRecord, old_slot: PhysRange) -> Option<OldImage> {
    let code = PhysRange::new(rec.old_code_base, rec.old_code_len);
    let ok = rec.staged == 1
        && rec.old_code_base.is_multiple_of(8)
        && rec.old_code_len.is_multiple_of(8)
        && old_slot.contains(&code);
    ok.then_some(OldImage { base: rec.old_code_base, len: rec.old_code_len, hash: rec.old_code_hash })
}

#[cfg(test)]
mod handoff_tests {
    use super::*;

    fn rec(mailbox: u64, parked: u64) -> HandoffRecord {
        HandoffRecord {
            mailbox,
            parked,
            old_code_base: 0x4020_0000,
            old_code_len: 0x8_0000,
            old_code_hash: 7,
            staged: 1,
        }
    }

    #[test]
    fn parked_cpus_only_from_a_mailbox_in_the_old_slot() {
        let old = PhysRange::new(0x4020_0000, 16 << 20);
        let p = Parked::from_record(&rec(0x4030_0040, 0b1110), old, 8).unwrap();
        assert_eq!(p.word(0), None);
        assert_eq!(p.word(1), Some(0x4030_0048));
        assert_eq!(p.word(3), Some(0x4030_0058));
        assert_eq!(p.word(64), None);
        assert_eq!(p.count(), 3);
        // Bits past the CPUs this image has are ignored.
        assert_eq!(Parked::from_record(&rec(0x4030_0040, 1 << 9), old, 8).unwrap().count(), 0);
        for bad in [0, 0x4030_0041, 0x3fff_fff8, 0x4120_0000 - 8, 0x5000_0000, u64::MAX - 7] {
            assert_eq!(Parked::from_record(&rec(bad, 0b10), old, 8), None, "{bad:#x}");
        }
    }

    #[test]
    fn the_old_image_is_checked_only_inside_its_slot() {
        let old = PhysRange::new(0x4020_0000, 16 << 20);
        let o = old_image_of(&rec(0, 0), old).unwrap();
        assert_eq!((o.base, o.len, o.hash), (0x4020_0000, 0x8_0000, 7));
        let copied = HandoffRecord { staged: 0, ..rec(0, 0) };
        assert_eq!(old_image_of(&copied, old), None);
        let outside = HandoffRecord { old_code_len: 17 << 20, ..rec(0, 0) };
        assert_eq!(old_image_of(&outside, old), None);
        let wraps = HandoffRecord { old_code_base: u64::MAX - 7, old_code_len: 16, ..rec(0, 0) };
        assert_eq!(old_image_of(&wraps, old), None);
        let odd = HandoffRecord { old_code_len: 12, ..rec(0, 0) };
        assert_eq!(old_image_of(&odd, old), None);
    }
}
