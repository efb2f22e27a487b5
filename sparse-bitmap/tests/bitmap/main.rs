//! Integration tests of the sparse bitmap on a simulated physical memory.

mod adopt;
mod common;
mod model;
mod ops;
