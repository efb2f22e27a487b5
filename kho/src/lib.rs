//! Kexec handover (KHO) for the live-updating hypervisor.
//!
//! Everything that crosses a live update goes through this crate
//! (`shared/DESIGN.md` §3–5):
//!
//! - [`HandoverWriter`] and [`HandoverReader`]: the handover flattened device
//!   tree, written into preserved memory by the outgoing image and validated
//!   in full by the incoming one. The byte-level contract is `kho/ABI.md`.
//! - [`ScratchPlan`]: the scratch regions (one global, one below 4 GiB) that
//!   the incoming image lives in until it has read the preserved map, planned
//!   once at first boot and reused by every later update.
//! - [`StateRecord`] and [`state_record!`]: versioned, checksummed state
//!   records whose fields are declared once.
//! - [`UpdateStateMachine`]: Idle → Prepared → Frozen → (kexec) → Restored →
//!   Resumed → Finished, driving the registered [`UpdateParticipant`]s.
//!
//! Nothing in this crate panics on a malformed handover: every read returns a
//! typed error.

#![cfg_attr(not(test), no_std)]
// Nothing here needs `unsafe`: the handover is parsed from a slice the
// caller has mapped. The one exception is the aarch64 CRC32 instructions
// (`checksum::instructions`, allowed there alone).
#![deny(unsafe_code)]

extern crate alloc;

mod checksum;
mod fdt_out;
mod handover;
mod memory;
mod record;
mod scratch;
mod state_machine;

pub use checksum::{crc32, crc32_parts, use_crc32_instructions};
pub use handover::{
    BitmapRoot, HandoverError, HandoverIdentity, HandoverReader, HandoverWriter, SubsystemNode, SubsystemWriter,
    HANDOVER_ABI, HANDOVER_COMPATIBLE, MAX_HANDOVER_BYTES, MAX_NODES, MAX_NODE_DEPTH, MAX_PAGE_ORDER,
    MAX_RANGES_PER_PROPERTY,
};
pub use memory::{MemoryError, PhysRange, RamMap, FOUR_GIB, MAX_RAM_RANGES, PAGE_SIZE};
pub use record::{
    FieldReader, FieldSpec, FieldWriter, RecordError, RecordField, RecordHeader, StateRecord, MAX_RECORD_NAME_LEN,
    MAX_RECORD_PAYLOAD, RECORD_HEADER_LEN,
};
pub use scratch::{
    ScratchError, ScratchKind, ScratchNeeds, ScratchPlan, ScratchPolicy, ScratchRegion, MAX_SCRATCH_REGIONS,
};
pub use state_machine::{UpdateError, UpdateEvent, UpdateParticipant, UpdateState, UpdateStateMachine};

#[doc(hidden)]
pub mod __private {
    //! Items the [`state_record!`](crate::state_record) expansion names; not
    //! part of the public API.
    pub use crate::record::declaration_is_valid;

    /// Keeps [`StateRecord`](crate::StateRecord) implementations to the
    /// macro, so that every record's fields are declared exactly once.
    pub trait Sealed {}
}
