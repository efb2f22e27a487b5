//! An in-place sparse radix bitmap over physical frames, one tree per page
//! order, that a later hypervisor image can adopt by root address.
//!
//! Every node of a tree is one 4 KiB physical page taken from a caller's
//! [`FrameSource`] and reached through a caller's [`PhysToVirt`]. Interior
//! nodes hold the physical addresses of their children; leaves are
//! 32,768-bit bitmaps. A tree keyed by block number at order `k` covers the
//! whole 52-bit physical address space in blocks of `4 KiB << k`.
//!
//! - [`SparseBitmap`] is one tree at one order, with exact bit semantics.
//! - [`MultiOrderBitmap`] keeps one tree per [`PageSize`] (4 KiB, 2 MiB and
//!   1 GiB) and treats them together as a set of 4 KiB frames, recording
//!   each block at the largest order that fits, so a 1 GiB block costs one bit.
//!
//! The node layout is a cross-image ABI; `README.md` documents it together
//! with the validation rules of [`SparseBitmap::adopt`] and
//! [`MultiOrderBitmap::adopt`] (shared/DESIGN.md §3–4).
//!
//! ```
//! use sparse_bitmap::testing::Arena;
//! use sparse_bitmap::{Fit, MultiOrderBitmap, PageSize};
//!
//! const GIB: u64 = 1 << 30;
//! // Simulated physical memory for the nodes, at 256 GiB.
//! let memory = Arena::new(0x40_0000_0000, 64);
//! let mut map = MultiOrderBitmap::new(&memory);
//! map.insert_range(&mut &memory, GIB..3 * GIB + 4096, Fit::Largest)?;
//! assert_eq!(map.tree(PageSize::Size1GiB).count(), 2);
//! assert_eq!(map.tree(PageSize::Size4KiB).count(), 1);
//!
//! // The next image finds the same pages and adopts the roots.
//! let next = memory.handover();
//! let adopted = next.adopt_map(map.roots(), &[next.ram()])?;
//! assert_eq!(adopted.runs().collect::<Vec<_>>(), [GIB..3 * GIB + 4096]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![no_std]

#[cfg(feature = "arena")]
extern crate alloc;

mod adopt;
mod error;
mod geometry;
mod iter;
mod memory;
mod multi;
mod node;
mod tree;

#[cfg(feature = "arena")]
pub mod testing;

pub use error::{AdoptError, Error};
pub use iter::{MergedRuns, NodePages, Runs};
pub use memory::{FrameSource, PhysToVirt};
pub use multi::{Fit, MultiOrderBitmap, PageSize};
pub use tree::SparseBitmap;

/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
/// Size of a frame at order 0 and of every node: 4 KiB.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Width of the physical address space the trees cover.
pub const PHYS_ADDR_BITS: u32 = 52;
/// First physical address past the covered space.
pub const PHYS_ADDR_LIMIT: u64 = 1 << PHYS_ADDR_BITS;
/// Child addresses held by one interior node (512 × 8 bytes = one page).
pub const ENTRIES_PER_NODE: usize = 512;
/// Bits held by one leaf (4096 bytes × 8).
pub const BITS_PER_LEAF: u64 = PAGE_SIZE * 8;
/// Largest order a [`SparseBitmap`] accepts: its root is then a single leaf.
pub const MAX_ORDER: u32 = PHYS_ADDR_BITS - PAGE_SHIFT - geometry::LEAF_SHIFT;
