//! The update state machine, driven with fake participants that write and
//! read real handover records.

use std::cell::RefCell;
use std::rc::Rc;

use kho::{
    HandoverError, HandoverReader, HandoverWriter, RecordError, ScratchPlan, UpdateError, UpdateEvent,
    UpdateParticipant, UpdateState, UpdateStateMachine,
};

use crate::fixtures::{self, v2, MIB};

type Log = Rc<RefCell<Vec<String>>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Prepare,
    Freeze,
    Restore,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum FakeError {
    Refused(Step),
    Handover(HandoverError),
    Record(RecordError),
    MissingRecord,
}

/// A partition-like subsystem: records itself under `partitions/<id>` when
/// frozen and checks the record when restored.
struct FakePartition {
    name: &'static str,
    id: u32,
    fail_at: Option<Step>,
    log: Log,
}

impl FakePartition {
    fn boxed(
        name: &'static str,
        id: u32,
        fail_at: Option<Step>,
        log: &Log,
    ) -> Box<dyn UpdateParticipant<Error = FakeError>> {
        Box::new(Self { name, id, fail_at, log: Rc::clone(log) })
    }

    fn step(&self, step: Step, what: &str) -> Result<(), FakeError> {
        self.log.borrow_mut().push(format!("{}:{what}", self.name));
        if self.fail_at == Some(step) {
            return Err(FakeError::Refused(step));
        }
        Ok(())
    }

    fn record(&self) -> v2::PartitionRecord {
        v2::PartitionRecord {
            partition_id: self.id,
            memory_bytes: 64 * MIB,
            stage2_root: fixtures::stage2_root(self.id),
            vcpu_count: 2,
        }
    }
}

impl UpdateParticipant for FakePartition {
    type Error = FakeError;

    fn name(&self) -> &'static str {
        self.name
    }

    fn prepare(&mut self, handover: &mut HandoverWriter) -> Result<(), FakeError> {
        self.step(Step::Prepare, "prepare")?;
        handover
            .subsystem(&format!("partitions/{}", self.id))
            .and_then(|mut node| {
                node.add_pages("stage2-root", &[fixtures::range(fixtures::stage2_root(self.id), 0x1000)])
            })
            .map_err(FakeError::Handover)
    }

    fn freeze(&mut self, handover: &mut HandoverWriter) -> Result<(), FakeError> {
        self.step(Step::Freeze, "freeze")?;
        handover
            .subsystem(&format!("partitions/{}", self.id))
            .and_then(|mut node| node.add_record(&self.record()))
            .map_err(FakeError::Handover)
    }

    fn unfreeze(&mut self) {
        self.log.borrow_mut().push(format!("{}:unfreeze", self.name));
    }

    fn restore(&mut self, handover: &HandoverReader<'_>) -> Result<(), FakeError> {
        self.step(Step::Restore, "restore")?;
        let node = handover.subsystem(&format!("partitions/{}", self.id)).ok_or(FakeError::MissingRecord)?;
        let record =
            node.record::<v2::PartitionRecord>().map_err(FakeError::Record)?.ok_or(FakeError::MissingRecord)?;
        assert_eq!(record, self.record());
        Ok(())
    }

    fn resume(&mut self) {
        self.log.borrow_mut().push(format!("{}:resume", self.name));
    }

    fn finish(&mut self) {
        self.log.borrow_mut().push(format!("{}:finish", self.name));
    }
}

fn new_log() -> Log {
    Rc::new(RefCell::new(Vec::new()))
}

fn taken(log: &Log) -> Vec<String> {
    log.borrow_mut().drain(..).collect()
}

fn writer() -> HandoverWriter {
    fixtures::writer(&fixtures::identity("0.2.0", 1))
}

/// An outgoing machine with participants a, b, c (ids 0, 1, 2).
fn outgoing<'p>(fail: Option<(&'static str, Step)>, log: &Log) -> UpdateStateMachine<'p, FakeError> {
    let mut machine = UpdateStateMachine::new();
    for (id, name) in ["a", "b", "c"].into_iter().enumerate() {
        let fail_at = fail.filter(|(who, _)| *who == name).map(|(_, step)| step);
        machine.register(FakePartition::boxed(name, id as u32, fail_at, log)).unwrap();
    }
    machine
}

fn illegal(from: UpdateState, event: UpdateEvent) -> UpdateError<FakeError> {
    UpdateError::IllegalTransition { from, event }
}

#[test]
fn full_update_runs_every_callback_in_order() {
    let log = new_log();
    let mut machine = outgoing(None, &log);
    let mut handover = writer();
    assert_eq!(machine.state(), UpdateState::Idle);
    machine.prepare(&mut handover).unwrap();
    assert_eq!(machine.state(), UpdateState::Prepared);
    machine.freeze(&mut handover).unwrap();
    assert_eq!(machine.state(), UpdateState::Frozen);
    let blob = fixtures::finish(&handover);

    // (kexec) The incoming image registers its own participants.
    let mut incoming = UpdateStateMachine::after_kexec();
    assert_eq!(incoming.state(), UpdateState::Frozen);
    for (id, name) in ["a", "b", "c"].into_iter().enumerate() {
        incoming.register(FakePartition::boxed(name, id as u32, None, &log)).unwrap();
    }
    let reader = fixtures::read(&blob).unwrap();
    incoming.restore(&reader).unwrap();
    assert_eq!(incoming.state(), UpdateState::Restored);
    incoming.resume().unwrap();
    assert_eq!(incoming.state(), UpdateState::Resumed);
    incoming.finish().unwrap();
    assert_eq!(incoming.state(), UpdateState::Finished);
    assert_eq!(
        taken(&log),
        [
            "a:prepare",
            "b:prepare",
            "c:prepare",
            "a:freeze",
            "b:freeze",
            "c:freeze",
            "a:restore",
            "b:restore",
            "c:restore",
            "a:resume",
            "b:resume",
            "c:resume",
            "a:finish",
            "b:finish",
            "c:finish"
        ]
    );
}

#[test]
fn failing_freeze_unfreezes_the_frozen_in_reverse_and_cancels() {
    let log = new_log();
    let mut machine = outgoing(Some(("c", Step::Freeze)), &log);
    let mut handover = writer();
    machine.prepare(&mut handover).unwrap();
    taken(&log);
    assert_eq!(
        machine.freeze(&mut handover),
        Err(UpdateError::FreezeFailed { participant: "c", error: FakeError::Refused(Step::Freeze) })
    );
    assert_eq!(machine.state(), UpdateState::Idle);
    assert_eq!(taken(&log), ["a:freeze", "b:freeze", "c:freeze", "b:unfreeze", "a:unfreeze"]);
    // The failed update leaves the machine ready for the next attempt.
    machine.prepare(&mut writer()).unwrap();
    assert_eq!(machine.state(), UpdateState::Prepared);
}

#[test]
fn failing_first_freeze_unfreezes_nobody() {
    let log = new_log();
    let mut machine = outgoing(Some(("a", Step::Freeze)), &log);
    let mut handover = writer();
    machine.prepare(&mut handover).unwrap();
    taken(&log);
    assert!(matches!(machine.freeze(&mut handover), Err(UpdateError::FreezeFailed { participant: "a", .. })));
    assert_eq!(taken(&log), ["a:freeze"]);
}

#[test]
fn failing_prepare_returns_to_idle() {
    let log = new_log();
    let mut machine = outgoing(Some(("b", Step::Prepare)), &log);
    assert_eq!(
        machine.prepare(&mut writer()),
        Err(UpdateError::PrepareFailed { participant: "b", error: FakeError::Refused(Step::Prepare) })
    );
    assert_eq!(machine.state(), UpdateState::Idle);
    assert_eq!(taken(&log), ["a:prepare", "b:prepare"]);
}

#[test]
fn cancel_from_prepared_and_from_frozen() {
    let log = new_log();
    let mut machine = outgoing(None, &log);
    let mut handover = writer();
    machine.prepare(&mut handover).unwrap();
    machine.cancel().unwrap();
    assert_eq!(machine.state(), UpdateState::Idle);

    let mut handover = writer();
    machine.prepare(&mut handover).unwrap();
    machine.freeze(&mut handover).unwrap();
    taken(&log);
    machine.cancel().unwrap();
    assert_eq!(machine.state(), UpdateState::Idle);
    assert_eq!(taken(&log), ["c:unfreeze", "b:unfreeze", "a:unfreeze"]);
}

#[test]
fn illegal_transitions_are_errors() {
    let log = new_log();
    let mut machine = outgoing(None, &log);
    let mut handover = writer();
    let reader_blob = fixtures::write_v2();
    let reader = fixtures::read(&reader_blob).unwrap();

    assert_eq!(machine.freeze(&mut handover), Err(illegal(UpdateState::Idle, UpdateEvent::Freeze)));
    assert_eq!(machine.cancel(), Err(illegal(UpdateState::Idle, UpdateEvent::Cancel)));
    assert_eq!(machine.restore(&reader), Err(illegal(UpdateState::Idle, UpdateEvent::Restore)));
    assert_eq!(machine.resume(), Err(illegal(UpdateState::Idle, UpdateEvent::Resume)));
    assert_eq!(machine.finish(), Err(illegal(UpdateState::Idle, UpdateEvent::Finish)));

    machine.prepare(&mut handover).unwrap();
    assert_eq!(machine.prepare(&mut handover), Err(illegal(UpdateState::Prepared, UpdateEvent::Prepare)));
    assert_eq!(machine.restore(&reader), Err(illegal(UpdateState::Prepared, UpdateEvent::Restore)));
    assert_eq!(
        machine.register(FakePartition::boxed("d", 3, None, &log)),
        Err(illegal(UpdateState::Prepared, UpdateEvent::Register))
    );

    machine.freeze(&mut handover).unwrap();
    assert_eq!(machine.freeze(&mut handover), Err(illegal(UpdateState::Frozen, UpdateEvent::Freeze)));
    // Restoring is for the incoming image, not the frozen outgoing one.
    assert_eq!(machine.restore(&reader), Err(illegal(UpdateState::Frozen, UpdateEvent::Restore)));
    assert_eq!(machine.resume(), Err(illegal(UpdateState::Frozen, UpdateEvent::Resume)));
    assert_eq!(
        machine.register(FakePartition::boxed("d", 3, None, &log)),
        Err(illegal(UpdateState::Frozen, UpdateEvent::Register))
    );
}

#[test]
fn incoming_side_cannot_cancel_and_only_moves_forward() {
    let log = new_log();
    let blob = fixtures::write_v2();
    let reader = fixtures::read(&blob).unwrap();
    let mut incoming: UpdateStateMachine<'_, FakeError> = UpdateStateMachine::after_kexec();
    assert_eq!(incoming.cancel(), Err(illegal(UpdateState::Frozen, UpdateEvent::Cancel)));
    assert_eq!(incoming.prepare(&mut writer()), Err(illegal(UpdateState::Frozen, UpdateEvent::Prepare)));
    assert_eq!(incoming.finish(), Err(illegal(UpdateState::Frozen, UpdateEvent::Finish)));
    incoming.restore(&reader).unwrap();
    assert_eq!(incoming.cancel(), Err(illegal(UpdateState::Restored, UpdateEvent::Cancel)));
    assert_eq!(
        incoming.register(FakePartition::boxed("late", 9, None, &log)),
        Err(illegal(UpdateState::Restored, UpdateEvent::Register))
    );
    assert_eq!(incoming.finish(), Err(illegal(UpdateState::Restored, UpdateEvent::Finish)));
    incoming.resume().unwrap();
    assert_eq!(incoming.resume(), Err(illegal(UpdateState::Resumed, UpdateEvent::Resume)));
    assert_eq!(incoming.cancel(), Err(illegal(UpdateState::Resumed, UpdateEvent::Cancel)));
    incoming.finish().unwrap();
    assert_eq!(incoming.finish(), Err(illegal(UpdateState::Finished, UpdateEvent::Finish)));
    assert_eq!(incoming.cancel(), Err(illegal(UpdateState::Finished, UpdateEvent::Cancel)));
}

#[test]
fn failing_restore_stays_frozen() {
    let log = new_log();
    let blob = fixtures::write_v2();
    let reader = fixtures::read(&blob).unwrap();
    let mut incoming = UpdateStateMachine::after_kexec();
    incoming.register(FakePartition::boxed("a", 0, Some(Step::Restore), &log)).unwrap();
    assert_eq!(
        incoming.restore(&reader),
        Err(UpdateError::RestoreFailed { participant: "a", error: FakeError::Refused(Step::Restore) })
    );
    assert_eq!(incoming.state(), UpdateState::Frozen);

    // A participant whose record is missing fails the same way.
    let mut incoming = UpdateStateMachine::after_kexec();
    incoming.register(FakePartition::boxed("z", 7, None, &log)).unwrap();
    assert_eq!(
        incoming.restore(&reader),
        Err(UpdateError::RestoreFailed { participant: "z", error: FakeError::MissingRecord })
    );
}

#[test]
fn repeated_updates_reuse_scratch_and_count_up() {
    let log = new_log();
    let ram = fixtures::ram();
    let first_scratch = fixtures::scratch();
    let mut scratch = first_scratch.clone();
    let mut previous: Option<Vec<u8>> = None;
    for generation in 1..=4_u64 {
        let version = ["0.1.0", "0.2.0", "0.1.0", "0.3.0"][generation as usize - 1];
        let mut machine: UpdateStateMachine<'_, FakeError> = match &previous {
            // The image restored from the previous generation's handover
            // drives this update, on the same (finished) machine.
            Some(blob) => {
                let reader = HandoverReader::new(blob, fixtures::HANDOVER_PHYS, &ram).unwrap();
                assert_eq!(reader.update_count(), generation - 1);
                scratch = ScratchPlan::reuse(reader.scratch().regions(), &ram, &fixtures::needs()).unwrap();
                let mut incoming = UpdateStateMachine::after_kexec();
                incoming.register(FakePartition::boxed("a", 0, None, &log)).unwrap();
                incoming.restore(&reader).unwrap();
                incoming.resume().unwrap();
                incoming.finish().unwrap();
                incoming
            }
            None => outgoing(None, &log),
        };
        assert_eq!(scratch, first_scratch, "generation {generation}");
        let identity = fixtures::identity(version, generation);
        let mut handover = HandoverWriter::new(&identity, ram.clone(), &scratch).unwrap();
        machine.prepare(&mut handover).unwrap();
        machine.freeze(&mut handover).unwrap();
        let blob = fixtures::finish(&handover);
        assert_eq!(fixtures::read(&blob).unwrap().previous_version(), version);
        previous = Some(blob);
    }
}
