//! Integration tests of the handover: round trips, validation, golden-blob
//! compatibility, the update state machine, and a bounded fuzz of the reader.

mod compat;
mod corpus;
mod fixtures;
mod fuzz;
mod state_machine;
mod validation;
