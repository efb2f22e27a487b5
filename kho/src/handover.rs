//! The handover flattened device tree (`shared/DESIGN.md` §4, `kho/ABI.md`).
//!
//! The outgoing image builds the handover with a [`HandoverWriter`] and writes
//! it into preserved memory; the incoming image validates all of it with
//! [`HandoverReader::new`] before using any of it. The writer re-reads what it
//! wrote with the same reader, so it can never emit a blob the reader refuses.

use alloc::borrow::ToOwned;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use dtoolkit::error::FdtParseError;
use dtoolkit::fdt::Fdt;

use crate::fdt_out;
use crate::memory::{align_up, MemoryError, PhysRange, RamMap, PAGE_SIZE};
use crate::record::{record_name_is_valid, RecordError, RecordHeader, StateRecord};
use crate::scratch::{ScratchError, ScratchKind, ScratchPlan, ScratchRegion, MAX_SCRATCH_REGIONS};

/// The root `compatible` string. Any change to the layout or meaning of the
/// handover bumps it.
pub const HANDOVER_COMPATIBLE: &str = "hvkho-v1";
/// The handover ABI version the compatible string names; update images
/// declare the range of versions they can read.
pub const HANDOVER_ABI: u32 = 1;

/// Largest handover blob either side accepts.
pub const MAX_HANDOVER_BYTES: usize = 16 << 20;

/// Most subsystem nodes (every node below the root, intermediate ones
/// included).
pub const MAX_NODES: usize = 1024;

/// Deepest subsystem node: `partitions/0` is depth 2.
pub const MAX_NODE_DEPTH: usize = 4;

/// Most (base, size) pairs in one `pages-<name>` property.
pub const MAX_RANGES_PER_PROPERTY: usize = 256;

/// Highest page order a preserved-memory bitmap may track (order `n` tracks
/// blocks of `PAGE_SIZE << n` bytes; 18 is 1 GiB).
pub const MAX_PAGE_ORDER: u32 = 30;

/// Longest `previous-version` or `previous-build-id`, without its NUL.
const MAX_IDENTITY_LEN: usize = 63;

/// FDT header magic (Devicetree Specification v0.4, §5.2).
const FDT_MAGIC: u32 = 0xd00d_feed;

/// FDT header size (Devicetree Specification v0.4, §5.2).
const FDT_HEADER_LEN: usize = 40;

const PROP_COMPATIBLE: &str = "compatible";
const PROP_UPDATE_COUNT: &str = "update-count";
const PROP_PREVIOUS_VERSION: &str = "previous-version";
const PROP_PREVIOUS_BUILD_ID: &str = "previous-build-id";
const PROP_SCRATCH: &str = "scratch";
const PROP_MEMORY_MAP: &str = "preserved-memory-map";
const RECORD_PREFIX: &str = "record-";
const PAGES_PREFIX: &str = "pages-";

/// Bytes per `scratch` entry: base, size, kind.
const SCRATCH_ENTRY_LEN: usize = 24;
/// Bytes per `preserved-memory-map` entry: order, root.
const MEMORY_MAP_ENTRY_LEN: usize = 16;
/// Bytes per `pages-<name>` entry: base, size.
const PAGES_ENTRY_LEN: usize = 16;

/// An error writing or reading the handover. Node paths are written without
/// the leading `/`; the root is the empty path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandoverError {
    /// The blob does not start with the FDT magic.
    BadMagic,
    /// The blob is shorter than an FDT header.
    BlobTooSmall {
        /// Its length.
        len: usize,
    },
    /// The blob is larger than [`MAX_HANDOVER_BYTES`].
    TooLarge {
        /// Its length (or, when writing, a bound on it).
        bytes: usize,
    },
    /// The FDT header declares more bytes than were provided.
    Truncated {
        /// Declared total size.
        totalsize: usize,
        /// Bytes provided.
        available: usize,
    },
    /// The FDT structure itself is malformed.
    MalformedFdt(FdtParseError),
    /// The structure block does not walk as the FDT header describes it
    /// (at byte `offset` of the block).
    BadStructure { offset: usize },
    /// The FDT memory reservation block is not empty; the handover never uses
    /// it.
    MemoryReservations,
    /// The root `compatible` is not exactly [`HANDOVER_COMPATIBLE`].
    WrongCompatible,
    /// A required root property is absent.
    MissingProperty {
        /// The property.
        property: &'static str,
    },
    /// A property the format does not define.
    UnknownProperty {
        /// Node path.
        node: String,
        /// Property name.
        property: String,
    },
    /// The same property twice in one node.
    DuplicateProperty {
        /// Node path.
        node: String,
        /// Property name.
        property: String,
    },
    /// Two sibling nodes with the same name.
    DuplicateNode {
        /// Path of the second one.
        path: String,
    },
    /// A property's length does not fit its encoding or its bounds.
    BadLength {
        /// Node path.
        node: String,
        /// Property name.
        property: String,
        /// Its length in bytes.
        len: usize,
    },
    /// `previous-version` or `previous-build-id` is not 1 to 63 printable
    /// ASCII characters without spaces, NUL-terminated.
    InvalidIdentity {
        /// The property.
        property: &'static str,
    },
    /// `update-count` is zero.
    InvalidUpdateCount,
    /// A scratch entry has a kind this reader does not know.
    UnknownScratchKind {
        /// The kind cell.
        code: u64,
    },
    /// A bitmap order above [`MAX_PAGE_ORDER`], or orders not strictly
    /// increasing.
    BitmapOrder {
        /// The offending order.
        order: u64,
    },
    /// A preserved range is empty, overflows or is not page-aligned.
    InvalidRange {
        /// Node path.
        node: String,
        /// Property name.
        property: String,
        /// What is wrong with it.
        error: MemoryError,
    },
    /// The blob's physical address is not page-aligned, or its pages
    /// overflow the address space.
    BlobPlacement(MemoryError),
    /// A preserved range is not entirely inside RAM.
    OutsideRam {
        /// The range.
        range: PhysRange,
    },
    /// Two preserved ranges overlap.
    Overlap {
        /// The lower one.
        first: PhysRange,
        /// The one overlapping it.
        second: PhysRange,
    },
    /// Scratch regions are invalid, or a preserved range overlaps one.
    Scratch(ScratchError),
    /// A state record failed verification or decoding.
    Record {
        /// Node path.
        node: String,
        /// Property name.
        property: String,
        /// What is wrong with it.
        error: RecordError,
    },
    /// A node deeper than [`MAX_NODE_DEPTH`].
    TooDeep {
        /// Its path.
        path: String,
    },
    /// More nodes than [`MAX_NODES`].
    TooManyNodes,
    /// A node path, record name or pages name the format does not allow.
    InvalidName {
        /// The name.
        name: String,
    },
    /// The preserved buffer cannot hold the blob.
    BufferTooSmall {
        /// Bytes the blob needs.
        need: usize,
        /// Bytes the buffer has.
        have: usize,
    },
}

impl fmt::Display for HandoverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic => f.write_str("handover is not an FDT (bad magic)"),
            Self::BlobTooSmall { len } => write!(f, "handover of {len} bytes has no FDT header"),
            Self::TooLarge { bytes } => {
                write!(f, "handover of {bytes} bytes, at most {MAX_HANDOVER_BYTES}")
            }
            Self::Truncated { totalsize, available } => {
                write!(f, "handover declares {totalsize} bytes, {available} available")
            }
            Self::MalformedFdt(error) => write!(f, "malformed handover FDT: {error}"),
            Self::BadStructure { offset } => write!(f, "handover FDT structure breaks at byte {offset}"),
            Self::MemoryReservations => f.write_str("handover has FDT memory reservations"),
            Self::WrongCompatible => {
                write!(f, "handover is not compatible with {HANDOVER_COMPATIBLE}")
            }
            Self::MissingProperty { property } => write!(f, "handover root lacks {property}"),
            Self::UnknownProperty { node, property } => {
                write!(f, "/{node}: unknown property {property}")
            }
            Self::DuplicateProperty { node, property } => {
                write!(f, "/{node}: duplicate property {property}")
            }
            Self::DuplicateNode { path } => write!(f, "duplicate node /{path}"),
            Self::BadLength { node, property, len } => write!(f, "/{node}: {property} has a bad length of {len} bytes"),
            Self::InvalidIdentity { property } => write!(f, "invalid {property}"),
            Self::InvalidUpdateCount => f.write_str("update-count is zero"),
            Self::UnknownScratchKind { code } => write!(f, "unknown scratch kind {code}"),
            Self::BitmapOrder { order } => {
                write!(f, "bitmap order {order} is out of range or out of order")
            }
            Self::InvalidRange { node, property, error } => write!(f, "/{node}: {property}: {error}"),
            Self::BlobPlacement(error) => write!(f, "handover blob placement: {error}"),
            Self::OutsideRam { range } => write!(f, "preserved range {range} is not in RAM"),
            Self::Overlap { first, second } => {
                write!(f, "preserved ranges {first} and {second} overlap")
            }
            Self::Scratch(error) => write!(f, "scratch: {error}"),
            Self::Record { node, property, error } => write!(f, "/{node}: {property}: {error}"),
            Self::TooDeep { path } => write!(f, "node /{path} is deeper than {MAX_NODE_DEPTH}"),
            Self::TooManyNodes => write!(f, "more than {MAX_NODES} nodes"),
            Self::InvalidName { name } => write!(f, "invalid name {name:?}"),
            Self::BufferTooSmall { need, have } => {
                write!(f, "handover needs {need} bytes, buffer has {have}")
            }
        }
    }
}

impl core::error::Error for HandoverError {}

impl From<ScratchError> for HandoverError {
    fn from(error: ScratchError) -> Self {
        Self::Scratch(error)
    }
}

/// The root of one order's preserved-memory bitmap (the sparse-bitmap crate
/// adopts the bitmap from it). The root occupies the page at `root`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BitmapRoot {
    /// Page order the bitmap tracks.
    pub order: u32,
    /// Physical address of the bitmap's root page.
    pub root: u64,
}

/// Who wrote a handover. The reader sees these as the `previous-*`
/// properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandoverIdentity<'a> {
    /// The writing image's version (semver), 1 to 63 printable ASCII
    /// characters without spaces.
    pub version: &'a str,
    /// The writing image's build id, same character rules.
    pub build_id: &'a str,
    /// Live updates so far, this one included: 1 for the first update, one
    /// more than the `update-count` the writing image was restored from.
    pub update_count: u64,
}

fn identity_is_valid(text: &str) -> bool {
    (1..=MAX_IDENTITY_LEN).contains(&text.len()) && text.bytes().all(|byte| byte.is_ascii_graphic())
}

/// Whether `name` is a valid node name: 1 to 31 characters from
/// `[A-Za-z0-9,._+-]` (the Devicetree node-name characters, without a unit
/// address).
fn node_name_is_valid(name: &str) -> bool {
    (1..=31).contains(&name.len()) && name.bytes().all(|byte| byte.is_ascii_alphanumeric() || b",._+-".contains(&byte))
}

/// Whether `path` is a valid subsystem node path: 1 to [`MAX_NODE_DEPTH`]
/// `/`-separated node names.
fn node_path_is_valid(path: &str) -> bool {
    path.split('/').all(node_name_is_valid) && path.split('/').count() <= MAX_NODE_DEPTH
}

/// The parent path of a node path; the root is `""`.
fn parent_path(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(parent, _)| parent)
}

fn join_path(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}/{name}")
    }
}

/// An upper bound on what a property adds to the blob: its `FDT_PROP` header,
/// padded value and a (possibly shared) name in the strings block.
fn property_cost(name_len: usize, value_len: usize) -> usize {
    12 + value_len.next_multiple_of(4) + name_len + 1
}

/// What a node adds to the blob: `FDT_BEGIN_NODE`, padded name, `FDT_END_NODE`.
fn node_cost(name_len: usize) -> usize {
    8 + (name_len + 1).next_multiple_of(4)
}

/// A property's value as entries of `N` big-endian u64 cells; the caller has
/// checked that the length is a multiple of `8 * N`.
fn decode_entries<const N: usize>(value: &[u8]) -> Vec<[u64; N]> {
    let cells: Vec<u64> = value
        .chunks_exact(8)
        .filter_map(|chunk| chunk.first_chunk::<8>().map(|bytes| u64::from_be_bytes(*bytes)))
        .collect();
    cells.chunks_exact(N).filter_map(|entry| <[u64; N]>::try_from(entry).ok()).collect()
}

/// The contents a subsystem gave one node.
#[derive(Debug, Clone, Default)]
struct NodeContents {
    path: String,
    records: Vec<(String, Vec<u8>)>,
    pages: Vec<(String, Vec<PhysRange>)>,
}

/// Builds the handover of the outgoing image.
///
/// Every preserved range is checked when it is added (page-aligned, inside
/// RAM, not in scratch); [`Self::write_to`] then checks the blob's own
/// placement and that no two preserved ranges overlap, as a reader does.
#[derive(Debug, Clone)]
pub struct HandoverWriter {
    version: String,
    build_id: String,
    update_count: u64,
    ram: RamMap,
    scratch: ScratchPlan,
    bitmap_roots: Vec<BitmapRoot>,
    nodes: Vec<NodeContents>,
    /// Every node path, intermediate ones included, in sorted order: the
    /// order nodes are written in.
    paths: BTreeSet<String>,
    /// Upper bound on the blob size so far.
    size_bound: usize,
}

impl HandoverWriter {
    /// Starts a handover for the given writer identity, RAM and scratch.
    pub fn new(identity: &HandoverIdentity<'_>, ram: RamMap, scratch: &ScratchPlan) -> Result<Self, HandoverError> {
        if !identity_is_valid(identity.version) {
            return Err(HandoverError::InvalidIdentity { property: PROP_PREVIOUS_VERSION });
        }
        if !identity_is_valid(identity.build_id) {
            return Err(HandoverError::InvalidIdentity { property: PROP_PREVIOUS_BUILD_ID });
        }
        if identity.update_count == 0 {
            return Err(HandoverError::InvalidUpdateCount);
        }
        // The plan may have been made against another map: check it here.
        let scratch = ScratchPlan::adopt(scratch.regions(), &ram)?;
        let size_bound = FDT_HEADER_LEN
            + 16
            + node_cost(0)
            + 4
            + property_cost(PROP_COMPATIBLE.len(), HANDOVER_COMPATIBLE.len() + 1)
            + property_cost(PROP_UPDATE_COUNT.len(), 8)
            + property_cost(PROP_PREVIOUS_VERSION.len(), MAX_IDENTITY_LEN + 1)
            + property_cost(PROP_PREVIOUS_BUILD_ID.len(), MAX_IDENTITY_LEN + 1)
            + property_cost(PROP_SCRATCH.len(), MAX_SCRATCH_REGIONS * SCRATCH_ENTRY_LEN)
            + property_cost(PROP_MEMORY_MAP.len(), (MAX_PAGE_ORDER as usize + 1) * MEMORY_MAP_ENTRY_LEN);
        Ok(Self {
            version: identity.version.to_owned(),
            build_id: identity.build_id.to_owned(),
            update_count: identity.update_count,
            ram,
            scratch,
            bitmap_roots: Vec::new(),
            nodes: Vec::new(),
            paths: BTreeSet::new(),
            size_bound,
        })
    }

    /// The scratch regions this handover will carry.
    pub fn scratch(&self) -> &ScratchPlan {
        &self.scratch
    }

    /// Records the root of one order's preserved-memory bitmap.
    pub fn add_bitmap_root(&mut self, root: BitmapRoot) -> Result<(), HandoverError> {
        if root.order > MAX_PAGE_ORDER || self.bitmap_roots.iter().any(|known| known.order == root.order) {
            return Err(HandoverError::BitmapOrder { order: root.order.into() });
        }
        let page = PhysRange::pages(root.root, PAGE_SIZE).map_err(|error| HandoverError::InvalidRange {
            node: String::new(),
            property: PROP_MEMORY_MAP.to_owned(),
            error,
        })?;
        self.check_preserved(page)?;
        self.bitmap_roots.push(root);
        self.bitmap_roots.sort_unstable();
        Ok(())
    }

    /// The node at `path` (e.g. `partitions/0`, `iommu`), created on first
    /// use together with any missing parents.
    pub fn subsystem(&mut self, path: &str) -> Result<SubsystemWriter<'_>, HandoverError> {
        if !node_path_is_valid(path) {
            return Err(HandoverError::InvalidName { name: path.to_owned() });
        }
        if let Some(index) = self.nodes.iter().position(|node| node.path == path) {
            return Ok(SubsystemWriter { writer: self, index });
        }
        let mut new_paths = Vec::new();
        let mut prefix = path;
        while !prefix.is_empty() && !self.paths.contains(prefix) {
            new_paths.push(prefix);
            prefix = parent_path(prefix);
        }
        if self.paths.len() + new_paths.len() > MAX_NODES {
            return Err(HandoverError::TooManyNodes);
        }
        let cost: usize = new_paths.iter().map(|new| node_cost(new.len() - parent_path(new).len())).sum();
        self.grow(cost)?;
        self.paths.extend(new_paths.into_iter().map(ToOwned::to_owned));
        self.nodes.push(NodeContents { path: path.to_owned(), ..NodeContents::default() });
        Ok(SubsystemWriter { index: self.nodes.len() - 1, writer: self })
    }

    /// Writes the handover into `dest`, preserved memory at physical address
    /// `dest_phys`, and returns its length. The blob's placement and every
    /// preserved range are checked first as [`HandoverReader::new`] checks
    /// them (in RAM, outside scratch, no two overlapping); if that fails,
    /// `dest` is left untouched.
    pub fn write_to(&self, dest: &mut [u8], dest_phys: u64) -> Result<usize, HandoverError> {
        let update_count = self.update_count.to_be_bytes();
        let scratch: Vec<u64> = self
            .scratch
            .regions()
            .iter()
            .flat_map(|region| [region.range.base(), region.range.size(), region.kind.code()])
            .collect();
        let memory_map: Vec<u64> =
            self.bitmap_roots.iter().flat_map(|root| [u64::from(root.order), root.root]).collect();
        let root = |name| fdt_out::Name { prefix: "", rest: name };
        let tree = WriterTree {
            root_properties: [
                (root(PROP_COMPATIBLE), fdt_out::Value::Text(HANDOVER_COMPATIBLE)),
                (root(PROP_UPDATE_COUNT), fdt_out::Value::Bytes(&update_count)),
                (root(PROP_PREVIOUS_VERSION), fdt_out::Value::Text(&self.version)),
                (root(PROP_PREVIOUS_BUILD_ID), fdt_out::Value::Text(&self.build_id)),
                (root(PROP_SCRATCH), fdt_out::Value::Cells(&scratch)),
                (root(PROP_MEMORY_MAP), fdt_out::Value::Cells(&memory_map)),
            ],
            children: self.children(),
            contents: self.nodes.iter().map(|node| (node.path.as_str(), node)).collect(),
        };
        let mut layout = fdt_out::layout(&tree);
        let len = layout.total_len();
        if len > MAX_HANDOVER_BYTES {
            return Err(HandoverError::TooLarge { bytes: len });
        }
        let Some(target) = dest.get_mut(..len) else {
            return Err(HandoverError::BufferTooSmall { need: len, have: dest.len() });
        };
        // What a reader checks of the memory the handover names, on the
        // writer's own data and before writing, so a refused handover leaves
        // `dest` as it was. The blob is not parsed back: that cost the
        // blackout a second parse of every record, and the encoding is held
        // to the reader by the round-trip, golden and fuzz tests.
        let footprint = blob_footprint(len, dest_phys)?;
        let pages = self.nodes.iter().map(|node| node.pages.as_slice());
        check_preserved_ranges(
            preserved_ranges(footprint, &self.bitmap_roots, pages).collect(),
            &self.ram,
            &self.scratch,
        )?;
        fdt_out::write(&tree, &mut layout, target);
        Ok(len)
    }

    /// Each node's direct children, in name order (the paths are sorted,
    /// so each list is too).
    fn children(&self) -> BTreeMap<&str, Vec<&str>> {
        let mut children: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for path in &self.paths {
            children.entry(parent_path(path)).or_default().push(path);
        }
        children
    }

    /// Checks a preserved range against RAM and scratch.
    fn check_preserved(&self, range: PhysRange) -> Result<(), HandoverError> {
        if !self.ram.contains(range) {
            return Err(HandoverError::OutsideRam { range });
        }
        self.scratch.check_preserved(range)?;
        Ok(())
    }

    fn grow(&mut self, bytes: usize) -> Result<(), HandoverError> {
        let bound = self.size_bound.saturating_add(bytes);
        if bound > MAX_HANDOVER_BYTES {
            return Err(HandoverError::TooLarge { bytes: bound });
        }
        self.size_bound = bound;
        Ok(())
    }
}

/// The writer's nodes as the FDT writer walks them: the root's own
/// properties, then each node's records, page ranges and children.
struct WriterTree<'a> {
    root_properties: [(fdt_out::Name<'a>, fdt_out::Value<'a>); 6],
    children: BTreeMap<&'a str, Vec<&'a str>>,
    contents: BTreeMap<&'a str, &'a NodeContents>,
}

impl<'a> WriterTree<'a> {
    fn node(&self, path: &'a str, visit: &mut dyn FnMut(fdt_out::Event<'a>)) {
        let name = path.rsplit('/').next().unwrap_or(path);
        visit(fdt_out::Event::Begin(name));
        if let Some(contents) = self.contents.get(path) {
            for (name, bytes) in &contents.records {
                let name = fdt_out::Name { prefix: RECORD_PREFIX, rest: name };
                visit(fdt_out::Event::Property(name, fdt_out::Value::Bytes(bytes)));
            }
            for (name, ranges) in &contents.pages {
                let name = fdt_out::Name { prefix: PAGES_PREFIX, rest: name };
                visit(fdt_out::Event::Property(name, fdt_out::Value::Ranges(ranges)));
            }
        }
        for child in self.children.get(path).into_iter().flatten() {
            self.node(child, visit);
        }
        visit(fdt_out::Event::End);
    }
}

impl<'a> fdt_out::Tree<'a> for WriterTree<'a> {
    fn walk(&self, visit: &mut dyn FnMut(fdt_out::Event<'a>)) {
        visit(fdt_out::Event::Begin(""));
        for (name, value) in self.root_properties {
            visit(fdt_out::Event::Property(name, value));
        }
        for child in self.children.get("").into_iter().flatten() {
            self.node(child, visit);
        }
        visit(fdt_out::Event::End);
    }
}

/// Adds records and preserved page ranges to one subsystem node.
#[derive(Debug)]
pub struct SubsystemWriter<'w> {
    writer: &'w mut HandoverWriter,
    index: usize,
}

impl SubsystemWriter<'_> {
    /// The node's path.
    pub fn path(&self) -> &str {
        &self.writer.nodes[self.index].path
    }

    /// Adds `record` under its type's [`StateRecord::NAME`].
    pub fn add_record<R: StateRecord>(&mut self, record: &R) -> Result<(), HandoverError> {
        self.add_record_named(R::NAME, record)
    }

    /// Adds `record` under `name`, for nodes holding several records of one
    /// type.
    pub fn add_record_named<R: StateRecord>(&mut self, name: &str, record: &R) -> Result<(), HandoverError> {
        self.check_new_name(RECORD_PREFIX, name)?;
        let bytes = record.encode();
        self.writer.grow(property_cost(RECORD_PREFIX.len() + name.len(), bytes.len()))?;
        self.writer.nodes[self.index].records.push((name.to_owned(), bytes));
        Ok(())
    }

    /// Adds a named list of preserved page ranges (page tables, queues, vCPU
    /// pages...): each page-aligned, inside RAM and outside scratch.
    pub fn add_pages(&mut self, name: &str, ranges: &[PhysRange]) -> Result<(), HandoverError> {
        self.check_new_name(PAGES_PREFIX, name)?;
        let property = format!("{PAGES_PREFIX}{name}");
        if !(1..=MAX_RANGES_PER_PROPERTY).contains(&ranges.len()) {
            return Err(HandoverError::BadLength {
                node: self.path().to_owned(),
                property,
                len: ranges.len() * PAGES_ENTRY_LEN,
            });
        }
        for range in ranges {
            PhysRange::pages(range.base(), range.size()).map_err(|error| HandoverError::InvalidRange {
                node: self.path().to_owned(),
                property: property.clone(),
                error,
            })?;
            self.writer.check_preserved(*range)?;
        }
        self.writer.grow(property_cost(property.len(), ranges.len() * PAGES_ENTRY_LEN))?;
        self.writer.nodes[self.index].pages.push((name.to_owned(), ranges.to_vec()));
        Ok(())
    }

    fn check_new_name(&self, prefix: &str, name: &str) -> Result<(), HandoverError> {
        if !record_name_is_valid(name) {
            return Err(HandoverError::InvalidName { name: name.to_owned() });
        }
        let node = &self.writer.nodes[self.index];
        let taken = if prefix == RECORD_PREFIX {
            node.records.iter().any(|(known, _)| known == name)
        } else {
            node.pages.iter().any(|(known, _)| known == name)
        };
        if taken {
            return Err(HandoverError::DuplicateProperty {
                node: node.path.clone(),
                property: format!("{prefix}{name}"),
            });
        }
        Ok(())
    }
}

/// A record stored in a subsystem node, verified (length, checksum, version
/// fields) but not yet decoded: its header and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StoredRecord<'a> {
    name: &'a str,
    header: RecordHeader,
    payload: &'a [u8],
}

/// One subsystem node of a validated handover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsystemNode<'a> {
    path: String,
    records: Vec<StoredRecord<'a>>,
    pages: Vec<(&'a str, Vec<PhysRange>)>,
}

impl SubsystemNode<'_> {
    /// The node's path, e.g. `partitions/0`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Decodes the record stored under `R::NAME`; `None` if the writer
    /// stored none (it may predate the record type).
    pub fn record<R: StateRecord>(&self) -> Result<Option<R>, RecordError> {
        self.record_named(R::NAME)
    }

    /// Decodes the record stored under `name`.
    pub fn record_named<R: StateRecord>(&self, name: &str) -> Result<Option<R>, RecordError> {
        // `parse_node` verified each record's header and checksum: decode
        // the payload without checksumming it again.
        self.records
            .iter()
            .find(|record| record.name == name)
            .map(|record| R::decode_parsed(record.header, record.payload))
            .transpose()
    }

    /// Names and verified headers of the records in this node.
    pub fn records(&self) -> impl Iterator<Item = (&str, RecordHeader)> + '_ {
        self.records.iter().map(|record| (record.name, record.header))
    }

    /// The preserved ranges stored under `name`.
    pub fn pages(&self, name: &str) -> Option<&[PhysRange]> {
        self.pages.iter().find(|(known, _)| *known == name).map(|(_, ranges)| ranges.as_slice())
    }

    /// Every named list of preserved ranges in this node.
    pub fn all_pages(&self) -> impl Iterator<Item = (&str, &[PhysRange])> + '_ {
        self.pages.iter().map(|(name, ranges)| (*name, ranges.as_slice()))
    }
}

/// A handover blob validated in full: FDT structure, exact compatible, every
/// root property, every node, every record header and checksum, every
/// address (page-aligned, inside RAM, outside scratch, overlapping nothing
/// else), every size within bounds.
#[derive(Debug, Clone)]
pub struct HandoverReader<'a> {
    blob: &'a [u8],
    footprint: PhysRange,
    update_count: u64,
    previous_version: &'a str,
    previous_build_id: &'a str,
    scratch: ScratchPlan,
    bitmap_roots: Vec<BitmapRoot>,
    /// Sorted by path.
    nodes: Vec<SubsystemNode<'a>>,
}

/// The root properties, each seen at most once.
#[derive(Default)]
struct RootProperties<'a> {
    compatible: Option<&'a [u8]>,
    update_count: Option<&'a [u8]>,
    previous_version: Option<&'a [u8]>,
    previous_build_id: Option<&'a [u8]>,
    scratch: Option<&'a [u8]>,
    memory_map: Option<&'a [u8]>,
}

impl<'a> HandoverReader<'a> {
    /// The size of the handover whose first bytes are `prefix` (at least the
    /// 8 bytes of FDT magic and total size), so the incoming image can map
    /// exactly that much.
    pub fn blob_size(prefix: &[u8]) -> Result<usize, HandoverError> {
        let Some(([m0, m1, m2, m3, s0, s1, s2, s3], _)) = prefix.split_first_chunk::<8>() else {
            return Err(HandoverError::BlobTooSmall { len: prefix.len() });
        };
        if u32::from_be_bytes([*m0, *m1, *m2, *m3]) != FDT_MAGIC {
            return Err(HandoverError::BadMagic);
        }
        let size = u32::from_be_bytes([*s0, *s1, *s2, *s3]) as usize;
        if size < FDT_HEADER_LEN {
            return Err(HandoverError::BlobTooSmall { len: size });
        }
        if size > MAX_HANDOVER_BYTES {
            return Err(HandoverError::TooLarge { bytes: size });
        }
        Ok(size)
    }

    /// Validates the handover at the start of `blob`, which lives at
    /// physical address `blob_phys`, against the machine's RAM.
    pub fn new(blob: &'a [u8], blob_phys: u64, ram: &RamMap) -> Result<Self, HandoverError> {
        let size = Self::blob_size(blob)?;
        let blob = blob.get(..size).ok_or(HandoverError::Truncated { totalsize: size, available: blob.len() })?;
        let fdt = Fdt::new(blob).map_err(HandoverError::MalformedFdt)?;
        if fdt.memory_reservations().next().is_some() {
            return Err(HandoverError::MemoryReservations);
        }
        let footprint = blob_footprint(size, blob_phys)?;

        let (properties, nodes) = walk_structure(blob)?;
        let compatible = properties.compatible.ok_or(HandoverError::MissingProperty { property: PROP_COMPATIBLE })?;
        if compatible != format!("{HANDOVER_COMPATIBLE}\0").as_bytes() {
            return Err(HandoverError::WrongCompatible);
        }
        let update_count = parse_update_count(properties.update_count)?;
        let previous_version = parse_identity(properties.previous_version, PROP_PREVIOUS_VERSION)?;
        let previous_build_id = parse_identity(properties.previous_build_id, PROP_PREVIOUS_BUILD_ID)?;
        let scratch = parse_scratch(properties.scratch, ram)?;
        let bitmap_roots = parse_memory_map(properties.memory_map)?;
        let nodes = nodes?;

        let reader =
            Self { blob, footprint, update_count, previous_version, previous_build_id, scratch, bitmap_roots, nodes };
        check_preserved_ranges(reader.preserved_ranges().collect(), ram, &reader.scratch)?;
        Ok(reader)
    }

    /// The blob itself, exactly `totalsize` bytes.
    pub fn blob(&self) -> &'a [u8] {
        self.blob
    }

    /// The pages the blob occupies.
    pub fn footprint(&self) -> PhysRange {
        self.footprint
    }

    /// Live updates so far, the one that wrote this handover included.
    pub fn update_count(&self) -> u64 {
        self.update_count
    }

    /// Version of the image that wrote this handover.
    pub fn previous_version(&self) -> &'a str {
        self.previous_version
    }

    /// Build id of the image that wrote this handover.
    pub fn previous_build_id(&self) -> &'a str {
        self.previous_build_id
    }

    /// The scratch regions, to be reused with [`ScratchPlan::reuse`].
    pub fn scratch(&self) -> &ScratchPlan {
        &self.scratch
    }

    /// The preserved-memory bitmap roots, by increasing order.
    pub fn bitmap_roots(&self) -> &[BitmapRoot] {
        &self.bitmap_roots
    }

    /// The bitmap root for `order`, if any.
    pub fn bitmap_root(&self, order: u32) -> Option<u64> {
        self.bitmap_roots.iter().find(|root| root.order == order).map(|root| root.root)
    }

    /// The subsystem node at `path` (e.g. `partitions/0`).
    pub fn subsystem(&self, path: &str) -> Option<&SubsystemNode<'a>> {
        self.nodes.binary_search_by(|node| node.path.as_str().cmp(path)).ok().and_then(|index| self.nodes.get(index))
    }

    /// Every subsystem node, intermediate ones included, sorted by path.
    pub fn subsystems(&self) -> &[SubsystemNode<'a>] {
        &self.nodes
    }

    /// The direct children of the node at `path` (`""` for the root).
    pub fn children<'s>(&'s self, path: &'s str) -> impl Iterator<Item = &'s SubsystemNode<'a>> {
        self.nodes.iter().filter(move |node| parent_path(&node.path) == path)
    }

    /// Every range the handover marks preserved outside the bitmaps: the
    /// blob's own pages, the bitmap root pages and every `pages-*` range. The
    /// incoming image reserves these before allocating anything outside
    /// scratch.
    pub fn preserved_ranges(&self) -> impl Iterator<Item = PhysRange> + '_ {
        preserved_ranges(self.footprint, &self.bitmap_roots, self.nodes.iter().map(|node| node.pages.as_slice()))
    }
}

fn bad_root_length(property: &str, len: usize) -> HandoverError {
    HandoverError::BadLength { node: String::new(), property: property.to_owned(), len }
}

fn parse_update_count(value: Option<&[u8]>) -> Result<u64, HandoverError> {
    let value = value.ok_or(HandoverError::MissingProperty { property: PROP_UPDATE_COUNT })?;
    let bytes: [u8; 8] = value.try_into().map_err(|_| bad_root_length(PROP_UPDATE_COUNT, value.len()))?;
    match u64::from_be_bytes(bytes) {
        0 => Err(HandoverError::InvalidUpdateCount),
        count => Ok(count),
    }
}

fn parse_identity<'a>(value: Option<&'a [u8]>, property: &'static str) -> Result<&'a str, HandoverError> {
    let value = value.ok_or(HandoverError::MissingProperty { property })?;
    let invalid = HandoverError::InvalidIdentity { property };
    let Some((0, text)) = value.split_last() else {
        return Err(invalid);
    };
    match core::str::from_utf8(text) {
        Ok(text) if identity_is_valid(text) => Ok(text),
        _ => Err(invalid),
    }
}

fn parse_scratch(value: Option<&[u8]>, ram: &RamMap) -> Result<ScratchPlan, HandoverError> {
    let value = value.ok_or(HandoverError::MissingProperty { property: PROP_SCRATCH })?;
    if !value.len().is_multiple_of(SCRATCH_ENTRY_LEN) || value.len() > MAX_SCRATCH_REGIONS * SCRATCH_ENTRY_LEN {
        return Err(bad_root_length(PROP_SCRATCH, value.len()));
    }
    let mut regions = Vec::with_capacity(MAX_SCRATCH_REGIONS);
    for [base, size, code] in decode_entries::<3>(value) {
        let kind = ScratchKind::from_code(code).ok_or(HandoverError::UnknownScratchKind { code })?;
        let range = PhysRange::new(base, size).map_err(|error| HandoverError::InvalidRange {
            node: String::new(),
            property: PROP_SCRATCH.to_owned(),
            error,
        })?;
        regions.push(ScratchRegion { range, kind });
    }
    Ok(ScratchPlan::adopt(&regions, ram)?)
}

fn parse_memory_map(value: Option<&[u8]>) -> Result<Vec<BitmapRoot>, HandoverError> {
    let value = value.ok_or(HandoverError::MissingProperty { property: PROP_MEMORY_MAP })?;
    let max_len = (MAX_PAGE_ORDER as usize + 1) * MEMORY_MAP_ENTRY_LEN;
    if !value.len().is_multiple_of(MEMORY_MAP_ENTRY_LEN) || value.len() > max_len {
        return Err(bad_root_length(PROP_MEMORY_MAP, value.len()));
    }
    let mut roots: Vec<BitmapRoot> = Vec::with_capacity(value.len() / MEMORY_MAP_ENTRY_LEN);
    for [order, root] in decode_entries::<2>(value) {
        let in_order = roots.last().is_none_or(|previous| u64::from(previous.order) < order);
        let order_u32 = u32::try_from(order)
            .ok()
            .filter(|order| *order <= MAX_PAGE_ORDER && in_order)
            .ok_or(HandoverError::BitmapOrder { order })?;
        PhysRange::pages(root, PAGE_SIZE).map_err(|error| HandoverError::InvalidRange {
            node: String::new(),
            property: PROP_MEMORY_MAP.to_owned(),
            error,
        })?;
        roots.push(BitmapRoot { order: order_u32, root });
    }
    Ok(roots)
}

/// Every range a handover marks preserved: the blob's own pages
/// (`footprint`), the bitmap root pages and each node's `pages-*` ranges.
fn preserved_ranges<'a, N: 'a>(
    footprint: PhysRange,
    roots: &'a [BitmapRoot],
    pages: impl Iterator<Item = &'a [(N, Vec<PhysRange>)]> + 'a,
) -> impl Iterator<Item = PhysRange> + 'a {
    let roots = roots.iter().filter_map(|root| PhysRange::pages(root.root, PAGE_SIZE).ok());
    let pages = pages.flat_map(|named| named.iter()).flat_map(|(_, ranges)| ranges.iter().copied());
    core::iter::once(footprint).chain(roots).chain(pages)
}

/// The pages a blob of `size` bytes at `blob_phys` occupies.
fn blob_footprint(size: usize, blob_phys: u64) -> Result<PhysRange, HandoverError> {
    align_up(size as u64, PAGE_SIZE)
        .ok_or(MemoryError::AddressOverflow { base: blob_phys, size: size as u64 })
        .and_then(|pages| PhysRange::pages(blob_phys, pages))
        .map_err(HandoverError::BlobPlacement)
}

/// Every preserved range must be in RAM and outside scratch, and no two
/// may overlap: what a handover may name, for its writer and its reader
/// alike.
fn check_preserved_ranges(
    mut ranges: Vec<PhysRange>,
    ram: &RamMap,
    scratch: &ScratchPlan,
) -> Result<(), HandoverError> {
    for range in &ranges {
        if !ram.contains(*range) {
            return Err(HandoverError::OutsideRam { range: *range });
        }
        scratch.check_preserved(*range)?;
    }
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        if pair[0].overlaps(pair[1]) {
            return Err(HandoverError::Overlap { first: pair[0], second: pair[1] });
        }
    }
    Ok(())
}

/// Walks every node below the root with bounded depth and count.
/// FDT structure block tokens (Devicetree Specification v0.4, §5.4.1).
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;

/// A big-endian word of `bytes` at `at`.
fn be32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let word = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([word[0], word[1], word[2], word[3]]))
}

/// The NUL-terminated string at `at` of `bytes`, without its NUL.
fn cstr_at(bytes: &[u8], at: usize) -> Option<&str> {
    let rest = bytes.get(at..)?;
    let len = rest.iter().position(|&b| b == 0)?;
    core::str::from_utf8(&rest[..len]).ok()
}

/// A node being read by [`walk_structure`].
struct OpenNode<'a> {
    /// Its index in the node list (`None`: the root).
    index: Option<usize>,
    /// Names of its children and of its properties so far, for duplicates.
    children: BTreeSet<&'a str>,
    properties: BTreeSet<&'a str>,
}

/// Reads the structure block of a blob `Fdt::new` accepted in one pass:
/// the root's properties (each known name once, nothing else), and every
/// subsystem node below it with its records (header and checksum verified)
/// and page lists. A node error is returned second, so that what is wrong
/// with the root properties is reported first, as they are checked first.
#[allow(clippy::type_complexity)]
fn walk_structure(
    blob: &[u8],
) -> Result<(RootProperties<'_>, Result<Vec<SubsystemNode<'_>>, HandoverError>), HandoverError> {
    let header = |at| be32_at(blob, at).map(|v| v as usize).ok_or(HandoverError::BadStructure { offset: 0 });
    let (struct_off, strings_off, strings_len, struct_len) = (header(8)?, header(12)?, header(32)?, header(36)?);
    let structure =
        blob.get(struct_off..struct_off.saturating_add(struct_len)).ok_or(HandoverError::BadStructure { offset: 0 })?;
    let strings = blob.get(strings_off..strings_off.saturating_add(strings_len)).unwrap_or(&[]);
    let mut root = RootProperties::default();
    let mut nodes: Vec<SubsystemNode<'_>> = Vec::new();
    let mut open: Vec<OpenNode<'_>> = Vec::new();
    let mut root_seen = false;
    let mut off = 0;
    let walked = loop {
        let at = off;
        let bad = HandoverError::BadStructure { offset: at };
        let Some(token) = be32_at(structure, off) else { break Err(bad) };
        off += 4;
        match token {
            FDT_BEGIN_NODE => {
                let Some(name) = cstr_at(structure, off) else { break Err(bad) };
                off = (off + name.len() + 1).next_multiple_of(4);
                let depth = open.len();
                let Some(parent) = open.last_mut() else {
                    // The root, once.
                    if core::mem::replace(&mut root_seen, true) {
                        break Err(bad);
                    }
                    open.push(OpenNode { index: None, children: BTreeSet::new(), properties: BTreeSet::new() });
                    continue;
                };
                let parent_path = parent.index.and_then(|i| nodes.get(i)).map_or("", |n| n.path.as_str());
                let path = join_path(parent_path, name);
                if depth > MAX_NODE_DEPTH {
                    break Err(HandoverError::TooDeep { path });
                }
                if !node_name_is_valid(name) {
                    break Err(HandoverError::InvalidName { name: path });
                }
                if !parent.children.insert(name) {
                    break Err(HandoverError::DuplicateNode { path });
                }
                if nodes.len() >= MAX_NODES {
                    break Err(HandoverError::TooManyNodes);
                }
                open.push(OpenNode {
                    index: Some(nodes.len()),
                    children: BTreeSet::new(),
                    properties: BTreeSet::new(),
                });
                nodes.push(SubsystemNode { path, records: Vec::new(), pages: Vec::new() });
            }
            FDT_PROP => {
                let (Some(len), Some(name_off)) = (be32_at(structure, off), be32_at(structure, off + 4)) else {
                    break Err(bad);
                };
                let start = off + 8;
                let Some(value) = structure.get(start..start.saturating_add(len as usize)) else { break Err(bad) };
                off = (start + value.len()).next_multiple_of(4);
                let (Some(name), Some(node)) = (cstr_at(strings, name_off as usize), open.last_mut()) else {
                    break Err(bad);
                };
                let Some(index) = node.index else {
                    root_property(&mut root, name, value)?;
                    continue;
                };
                let Some(parsed) = nodes.get_mut(index) else { break Err(bad) };
                if !node.properties.insert(name) {
                    break Err(HandoverError::DuplicateProperty {
                        node: parsed.path.clone(),
                        property: name.to_owned(),
                    });
                }
                if let Err(e) = node_property(parsed, name, value) {
                    break Err(e);
                }
            }
            FDT_END_NODE => {
                if open.pop().is_none() {
                    break Err(bad);
                }
            }
            FDT_NOP => {}
            FDT_END if open.is_empty() && root_seen => break Ok(()),
            _ => break Err(bad),
        }
    };
    Ok((
        root,
        walked.map(|()| {
            nodes.sort_unstable_by(|a, b| a.path.cmp(&b.path));
            nodes
        }),
    ))
}

/// A root property: one of the known names, once.
fn root_property<'a>(root: &mut RootProperties<'a>, name: &str, value: &'a [u8]) -> Result<(), HandoverError> {
    let slot = match name {
        PROP_COMPATIBLE => &mut root.compatible,
        PROP_UPDATE_COUNT => &mut root.update_count,
        PROP_PREVIOUS_VERSION => &mut root.previous_version,
        PROP_PREVIOUS_BUILD_ID => &mut root.previous_build_id,
        PROP_SCRATCH => &mut root.scratch,
        PROP_MEMORY_MAP => &mut root.memory_map,
        other => return Err(HandoverError::UnknownProperty { node: String::new(), property: other.to_owned() }),
    };
    if slot.replace(value).is_some() {
        return Err(HandoverError::DuplicateProperty { node: String::new(), property: name.to_owned() });
    }
    Ok(())
}

/// A subsystem node's property: a record (header and checksum verified)
/// or a list of preserved pages.
fn node_property<'a>(parsed: &mut SubsystemNode<'a>, property: &'a str, value: &'a [u8]) -> Result<(), HandoverError> {
    if let Some(name) = property.strip_prefix(RECORD_PREFIX).filter(|name| record_name_is_valid(name)) {
        let (header, payload) = RecordHeader::parse(value).map_err(|error| HandoverError::Record {
            node: parsed.path.clone(),
            property: property.to_owned(),
            error,
        })?;
        parsed.records.push(StoredRecord { name, header, payload });
    } else if let Some(name) = property.strip_prefix(PAGES_PREFIX).filter(|name| record_name_is_valid(name)) {
        let ranges = parse_pages(&parsed.path, property, value)?;
        parsed.pages.push((name, ranges));
    } else {
        return Err(HandoverError::UnknownProperty { node: parsed.path.clone(), property: property.to_owned() });
    }
    Ok(())
}

fn parse_pages(node: &str, property: &str, value: &[u8]) -> Result<Vec<PhysRange>, HandoverError> {
    let count = value.len() / PAGES_ENTRY_LEN;
    if !value.len().is_multiple_of(PAGES_ENTRY_LEN) || !(1..=MAX_RANGES_PER_PROPERTY).contains(&count) {
        return Err(HandoverError::BadLength {
            node: node.to_owned(),
            property: property.to_owned(),
            len: value.len(),
        });
    }
    decode_entries::<2>(value)
        .into_iter()
        .map(|[base, size]| PhysRange::pages(base, size))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| HandoverError::InvalidRange { node: node.to_owned(), property: property.to_owned(), error })
}
