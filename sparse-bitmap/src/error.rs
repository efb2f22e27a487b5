//! Typed errors of bitmap operations and of adopting a tree.

use core::fmt;

/// Why an operation on a bitmap failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The frame source had no page for a new node.
    OutOfFrames,
    /// The frame source returned an address that cannot be a node: zero,
    /// not page-aligned, or beyond the 52-bit space.
    BadFrame { pa: u64 },
    /// An address is not aligned to the block size of the order used.
    Misaligned { pa: u64 },
    /// An address lies beyond the 52-bit physical address space.
    OutOfRange { pa: u64 },
    /// The order is not one this bitmap supports.
    UnsupportedOrder(u32),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfFrames => write!(f, "no frame left for a bitmap node"),
            Self::BadFrame { pa } => write!(f, "frame source returned unusable page {pa:#x}"),
            Self::Misaligned { pa } => {
                write!(f, "address {pa:#x} is not aligned to the block size")
            }
            Self::OutOfRange { pa } => write!(f, "address {pa:#x} is beyond the 52-bit space"),
            Self::UnsupportedOrder(order) => write!(f, "page order {order} is not supported"),
        }
    }
}

impl core::error::Error for Error {}

/// Why a tree handed over by a previous image was rejected.
///
/// `pa` is always the offending node address as read from memory (or as
/// given for a root).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdoptError {
    /// The order is not one this bitmap supports.
    UnsupportedOrder(u32),
    /// A node address has bits set below the page size.
    MisalignedNode { pa: u64 },
    /// A node does not lie entirely inside one of the given RAM ranges.
    NodeOutsideRam { pa: u64 },
    /// A node is reachable along two paths (a cycle, or a page shared
    /// between subtrees or between trees).
    NodeReachedTwice { pa: u64 },
    /// A root entry beyond the key space of the order is not zero.
    EntryBeyondKeySpace { node: u64, index: usize },
    /// A node holds nothing (no child, or no bit set); the writer frees
    /// such nodes, so one can only come from corruption.
    EmptyNode { pa: u64 },
    /// A frame is covered by bits at two orders of a multi-order bitmap.
    OverlappingOrders { pa: u64 },
    /// Tracking the nodes seen during validation needed frames that the
    /// frame source could not supply.
    Tracking(Error),
}

impl fmt::Display for AdoptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnsupportedOrder(order) => write!(f, "page order {order} is not supported"),
            Self::MisalignedNode { pa } => write!(f, "node address {pa:#x} is not page-aligned"),
            Self::NodeOutsideRam { pa } => write!(f, "node {pa:#x} is outside RAM"),
            Self::NodeReachedTwice { pa } => write!(f, "node {pa:#x} is reached twice"),
            Self::EntryBeyondKeySpace { node, index } => {
                write!(f, "root {node:#x} has entry {index} beyond the key space")
            }
            Self::EmptyNode { pa } => write!(f, "node {pa:#x} is empty"),
            Self::OverlappingOrders { pa } => {
                write!(f, "frame {pa:#x} is covered at two page orders")
            }
            Self::Tracking(err) => write!(f, "tracking visited nodes failed: {err}"),
        }
    }
}

impl core::error::Error for AdoptError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Tracking(err) => Some(err),
            _ => None,
        }
    }
}
