//! The live-update state machine (`shared/DESIGN.md` §5).
//!
//! ```text
//! outgoing image:  Idle -> Prepared -> Frozen --(kexec)--+
//!                   ^         |           |              |
//!                   +-cancel--+--cancel---+              |
//! incoming image:              Frozen <------------------+
//!                                 -> Restored -> Resumed -> Finished
//! ```
//!
//! The outgoing image's machine starts in [`UpdateState::Idle`]
//! ([`UpdateStateMachine::new`]); the incoming image's starts in
//! [`UpdateState::Frozen`], on the far side of the kexec
//! ([`UpdateStateMachine::after_kexec`]), where cancelling is no longer
//! possible. A finished machine may prepare the next update.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

use crate::handover::{HandoverReader, HandoverWriter};

/// Where an update stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpdateState {
    /// No update in progress.
    Idle,
    /// Brownout: the handover skeleton exists, subsystems have pre-recorded
    /// their state, guests still run.
    Prepared,
    /// Blackout: every participant is frozen. On the outgoing side the
    /// handover is final and the kexec is next; on the incoming side the
    /// image has just started.
    Frozen,
    /// The incoming image has adopted the handover's state.
    Restored,
    /// vCPUs run again: the blackout is over.
    Resumed,
    /// Deferred work is done.
    Finished,
}

/// A request made of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpdateEvent {
    /// Add a participant.
    Register,
    /// Start an update.
    Prepare,
    /// Start the blackout.
    Freeze,
    /// Abandon the update before the kexec.
    Cancel,
    /// Adopt the handover in the incoming image.
    Restore,
    /// End the blackout.
    Resume,
    /// Run deferred work.
    Finish,
}

/// A subsystem taking part in live updates (partitions, IOMMU, vCPUs...).
/// The same code runs on both sides of the kexec.
pub trait UpdateParticipant {
    /// What a callback can fail with.
    type Error;

    /// Names the participant in errors.
    fn name(&self) -> &'static str;

    /// Brownout: pre-record state into the handover while guests run.
    fn prepare(&mut self, handover: &mut HandoverWriter) -> Result<(), Self::Error>;

    /// Blackout: stop, and record final state into the handover.
    fn freeze(&mut self, handover: &mut HandoverWriter) -> Result<(), Self::Error>;

    /// Undo [`Self::freeze`]: the update was cancelled.
    fn unfreeze(&mut self);

    /// In the incoming image: adopt the state the handover carries.
    fn restore(&mut self, handover: &HandoverReader<'_>) -> Result<(), Self::Error>;

    /// In the incoming image, once every vCPU runs again: the blackout is
    /// over (report it, stop refusing what the blackout refused).
    fn resume(&mut self);

    /// After the blackout: deferred work (release what is no longer needed).
    fn finish(&mut self);
}

/// An error driving the update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateError<E> {
    /// The event is not allowed in the current state.
    IllegalTransition {
        /// The state the machine was in (and still is).
        from: UpdateState,
        /// What was asked of it.
        event: UpdateEvent,
    },
    /// A participant failed to prepare; the machine is back in
    /// [`UpdateState::Idle`].
    PrepareFailed {
        /// Which participant.
        participant: &'static str,
        /// Its error.
        error: E,
    },
    /// A participant failed to freeze; the ones already frozen were
    /// unfrozen and the machine is back in [`UpdateState::Idle`].
    FreezeFailed {
        /// Which participant.
        participant: &'static str,
        /// Its error.
        error: E,
    },
    /// A participant failed to restore; the machine stays in
    /// [`UpdateState::Frozen`].
    RestoreFailed {
        /// Which participant.
        participant: &'static str,
        /// Its error.
        error: E,
    },
}

impl<E: fmt::Display> fmt::Display for UpdateError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::IllegalTransition { from, event } => {
                write!(f, "{event:?} is not allowed in state {from:?}")
            }
            Self::PrepareFailed { participant, error } => {
                write!(f, "{participant} failed to prepare: {error}")
            }
            Self::FreezeFailed { participant, error } => {
                write!(f, "{participant} failed to freeze: {error}")
            }
            Self::RestoreFailed { participant, error } => {
                write!(f, "{participant} failed to restore: {error}")
            }
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for UpdateError<E> {}

/// A boxed participant whose callbacks fail with `E`.
type Participant<'p, E> = Box<dyn UpdateParticipant<Error = E> + 'p>;

/// Drives the registered participants through an update.
pub struct UpdateStateMachine<'p, E> {
    state: UpdateState,
    /// The machine reached [`UpdateState::Frozen`] through the kexec, not by
    /// freezing: there is nothing left to cancel.
    after_kexec: bool,
    participants: Vec<Participant<'p, E>>,
}

impl<E> fmt::Debug for UpdateStateMachine<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpdateStateMachine")
            .field("state", &self.state)
            .field("after_kexec", &self.after_kexec)
            .field("participants", &self.participants.iter().map(|participant| participant.name()).collect::<Vec<_>>())
            .finish()
    }
}

impl<E> Default for UpdateStateMachine<'_, E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'p, E> UpdateStateMachine<'p, E> {
    /// The outgoing image's machine, [`UpdateState::Idle`].
    pub fn new() -> Self {
        Self { state: UpdateState::Idle, after_kexec: false, participants: Vec::new() }
    }

    /// The incoming image's machine: [`UpdateState::Frozen`], across the
    /// kexec, waiting for [`Self::restore`].
    pub fn after_kexec() -> Self {
        Self { state: UpdateState::Frozen, after_kexec: true, participants: Vec::new() }
    }

    /// The current state.
    pub fn state(&self) -> UpdateState {
        self.state
    }

    /// Adds a participant. Callbacks run in registration order; undoing
    /// (unfreeze) runs in reverse. Only allowed when no participant is in
    /// the middle of an update: Idle, Finished, or Frozen before restore in
    /// the incoming image.
    pub fn register(&mut self, participant: Box<dyn UpdateParticipant<Error = E> + 'p>) -> Result<(), UpdateError<E>> {
        let open = match self.state {
            UpdateState::Idle | UpdateState::Finished => true,
            UpdateState::Frozen => self.after_kexec,
            UpdateState::Prepared | UpdateState::Restored | UpdateState::Resumed => false,
        };
        if !open {
            return Err(self.illegal(UpdateEvent::Register));
        }
        self.participants.push(participant);
        Ok(())
    }

    /// Idle (or Finished) → Prepared: every participant pre-records its
    /// state. A failure leaves the machine Idle; the caller discards the
    /// handover.
    pub fn prepare(&mut self, handover: &mut HandoverWriter) -> Result<(), UpdateError<E>> {
        if !matches!(self.state, UpdateState::Idle | UpdateState::Finished) {
            return Err(self.illegal(UpdateEvent::Prepare));
        }
        self.state = UpdateState::Idle;
        self.after_kexec = false;
        for participant in &mut self.participants {
            participant
                .prepare(handover)
                .map_err(|error| UpdateError::PrepareFailed { participant: participant.name(), error })?;
        }
        self.state = UpdateState::Prepared;
        Ok(())
    }

    /// Prepared → Frozen: every participant stops and records its final
    /// state. If one fails, those already frozen are unfrozen (in reverse
    /// order) and the update is cancelled with that participant's error.
    pub fn freeze(&mut self, handover: &mut HandoverWriter) -> Result<(), UpdateError<E>> {
        if self.state != UpdateState::Prepared {
            return Err(self.illegal(UpdateEvent::Freeze));
        }
        for index in 0..self.participants.len() {
            let participant = &mut self.participants[index];
            if let Err(error) = participant.freeze(handover) {
                let name = participant.name();
                self.participants[..index].iter_mut().rev().for_each(|frozen| frozen.unfreeze());
                self.state = UpdateState::Idle;
                return Err(UpdateError::FreezeFailed { participant: name, error });
            }
        }
        self.state = UpdateState::Frozen;
        Ok(())
    }

    /// Prepared or Frozen (outgoing side) → Idle. From Frozen, every
    /// participant is unfrozen in reverse order; from Prepared there is
    /// nothing to undo but the handover, which the caller discards.
    pub fn cancel(&mut self) -> Result<(), UpdateError<E>> {
        match self.state {
            UpdateState::Prepared => {}
            UpdateState::Frozen if !self.after_kexec => {
                self.participants.iter_mut().rev().for_each(|participant| participant.unfreeze());
            }
            _ => return Err(self.illegal(UpdateEvent::Cancel)),
        }
        self.state = UpdateState::Idle;
        Ok(())
    }

    /// Frozen (incoming side) → Restored: every participant adopts its state
    /// from the validated handover. On failure the machine stays Frozen.
    pub fn restore(&mut self, handover: &HandoverReader<'_>) -> Result<(), UpdateError<E>> {
        if self.state != UpdateState::Frozen || !self.after_kexec {
            return Err(self.illegal(UpdateEvent::Restore));
        }
        for participant in &mut self.participants {
            participant
                .restore(handover)
                .map_err(|error| UpdateError::RestoreFailed { participant: participant.name(), error })?;
        }
        self.state = UpdateState::Restored;
        Ok(())
    }

    /// Restored → Resumed: vCPUs run again, the blackout is over.
    pub fn resume(&mut self) -> Result<(), UpdateError<E>> {
        if self.state != UpdateState::Restored {
            return Err(self.illegal(UpdateEvent::Resume));
        }
        self.participants.iter_mut().for_each(|participant| participant.resume());
        self.state = UpdateState::Resumed;
        Ok(())
    }

    /// Resumed → Finished: every participant runs its deferred work.
    pub fn finish(&mut self) -> Result<(), UpdateError<E>> {
        if self.state != UpdateState::Resumed {
            return Err(self.illegal(UpdateEvent::Finish));
        }
        self.participants.iter_mut().for_each(|participant| participant.finish());
        self.state = UpdateState::Finished;
        Ok(())
    }

    fn illegal(&self, event: UpdateEvent) -> UpdateError<E> {
        UpdateError::IllegalTransition { from: self.state, event }
    }
}
