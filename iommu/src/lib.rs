//! SMMUv3 driver logic for the live-updating hypervisor (`shared/DESIGN.md`
//! §1–3, issue 9), written against the Arm System Memory Management Unit
//! Architecture Specification, SMMU architecture version 3 (Arm IHI 0070);
//! section numbers below refer to it.
//!
//! The driver confines guest devices with stage-2 translation only
//! (STE.Config = "stage 1 bypass, stage 2 translate", §5.2) and points every
//! assigned stream at the guest's own stage-2 table, the one the hypervisor's
//! stage-2 engine builds for the CPU (`ArmStage2`: 4 KiB granule, walk from
//! level 0). Sharing the table ("hap pt share") halves what a live update
//! must pin and keeps device and CPU views of guest memory identical.
//!
//! - [`SmmuRegs`] is how the driver reaches the register file: [`MmioRegs`]
//!   on hardware, [`testing::FakeSmmu`] in host tests (feature `testing`).
//! - [`FrameSource`] and [`PhysToVirt`] are how it gets and reaches memory
//!   for its stream table and queues.
//! - [`Smmu::init`] probes ([`probe`]), builds the tables and queues and runs
//!   the enable sequence; [`Smmu::assign`], [`Smmu::unassign`] and
//!   [`Smmu::invalidate_vmid`] manage streams; [`Smmu::poll_events`] drains
//!   faults.
//! - [`Smmu::state`] exports, and [`Smmu::adopt`] validates and takes over,
//!   a running SMMU across a live update without resetting it: translation
//!   stays enabled and DMA keeps flowing.
//!
//! There is no global bypass: SMMU_GBPA.ABORT is set before anything else,
//! and every stream without an assignment aborts.

#![cfg_attr(not(test), no_std)]

extern crate alloc;

mod bits;
mod command;
mod error;
mod event;
mod memory;
mod probe;
mod queue;
pub mod regs;
mod smmu;
mod state;
mod ste;
mod stream_table;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;
pub mod vtd;

pub use command::{Command, CommandDecodeError, COMMAND_BYTES};
pub use error::{AdoptError, CommandError, Error, QueueKind, Region, Register, Wait};
pub use event::{Direction, Event, EventKind, FaultAccess, FaultClass, EVENT_BYTES};
pub use memory::{FrameSource, LinearMap, PageRun, PhysToVirt, PAGE_SIZE};
pub use probe::{probe, AddressSize, Features, ProbeError};
pub use queue::Ring;
pub use regs::{MmioRegs, SmmuRegs};
pub use smmu::{EventSummary, Smmu, SmmuConfig};
pub use state::{Assignment, SmmuState};
pub use ste::{Stage2Geometry, SteConfig, STE_BYTES, STE_WORDS};
pub use stream_table::{StreamTableFormat, SPLIT};
