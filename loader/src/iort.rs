//! The ACPI IO Remapping Table (IORT, Arm DEN 0049E), which on an Arm
//! server booted with ACPI says what the DTB's `iommu-map` says otherwise
//! (issue 21): which SMMUv3 a PCI requester's DMA goes through, under which
//! stream id, and where its MSIs go. The `acpi` crate knows only its
//! signature; this parser takes the table's bytes (header included) and
//! validates every node and ID mapping as untrusted input: nodes inside the
//! table and inside their own length, mappings inside their node, every
//! output reference naming a node of the table that can take IDs (an ITS
//! group or an SMMU), ranges that do not wrap.

use crate::bytes::{acpi_table, le16, le32, le64, Framing};
use alloc::vec::Vec;
use core::fmt;

const SIGNATURE: &[u8; 4] = b"IORT";
const REVISION_AT: usize = 8;
/// After the 36-byte header: node count, offset of the node array,
/// reserved (§3.2, Table 3).
const NODE_COUNT_AT: usize = 36;
const NODE_OFFSET_AT: usize = 40;
const FIXED: usize = 48;
/// Every node starts with type (u8), length (u16), revision (u8),
/// identifier (u32; reserved before revision 3), number of ID mappings and
/// the offset of their array (§3.1.1, Table 4).
const NODE_HEADER: usize = 16;
/// An ID mapping: input base, number of IDs minus one, output base, output
/// reference, flags (§3.1.1.1, Table 5).
const MAPPING_BYTES: usize = 20;
/// Node types (Table 4).
const TYPE_ITS_GROUP: u8 = 0;
const TYPE_NAMED_COMPONENT: u8 = 1;
const TYPE_ROOT_COMPLEX: u8 = 2;
const TYPE_SMMU_V1_V2: u8 = 3;
const TYPE_SMMU_V3: u8 = 4;
/// Fixed bytes after the node header each parsed type needs: an ITS
/// group's count (§3.1.1.2); a named component's flags, memory access
/// properties and address size limit (§3.1.1.3); a root complex's memory
/// access properties, ATS attribute and segment (§3.1.1.5); an SMMUv3's
/// registers through its device-ID mapping index (§3.1.1.6, Table 18).
const ITS_GROUP_FIXED: usize = 4;
const NAMED_COMPONENT_FIXED: usize = 13;
const ROOT_COMPLEX_FIXED: usize = 16;
const SMMU_V3_FIXED: usize = 52;
/// SMMUv3 register frames are 64 KiB aligned (SMMUv3 spec §6.1).
const SMMU_V3_ALIGN: u64 = 0x1_0000;
/// Bounds no real table comes near.
pub const MAX_NODES: u32 = 128;
pub const MAX_MAPPINGS: u32 = 256;
pub const MAX_ITS_IDS: u32 = 64;

/// Why an IORT is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IortError {
    Truncated,
    BadSignature,
    /// More nodes, mappings or ITS ids than this parser keeps.
    TooMany,
    /// A node is shorter than its type needs, or runs past the table, or
    /// its mappings run past it (at byte `offset` of the table).
    BadNode {
        offset: usize,
    },
    /// An ID mapping whose range wraps, or whose output reference names
    /// no node that takes IDs.
    BadMapping {
        node: usize,
    },
    /// An SMMUv3 node whose registers are not 64 KiB aligned.
    MisalignedSmmu {
        node: usize,
    },
}

impl fmt::Display for IortError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("IORT shorter than its fixed part"),
            Self::BadSignature => f.write_str("not an IORT"),
            Self::TooMany => f.write_str("IORT has more nodes or mappings than supported"),
            Self::BadNode { offset } => write!(f, "IORT node at offset {offset} malformed"),
            Self::BadMapping { node } => write!(f, "IORT node at offset {node} has a bad ID mapping"),
            Self::MisalignedSmmu { node } => write!(f, "IORT SMMUv3 node at offset {node} misaligned"),
        }
    }
}

/// One ID mapping of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdMapping {
    pub input_base: u32,
    /// How many IDs (the table's field plus one).
    pub count: u64,
    pub output_base: u32,
    /// The offset (in the table) of the node the IDs go to.
    pub output_node: u32,
    /// Single mapping (flags bit 0): the node's own ID, not a range.
    pub single: bool,
}

impl IdMapping {
    /// The output id of `input`, if this mapping covers it.
    pub fn map(&self, input: u32) -> Option<u32> {
        let offset = u64::from(input.checked_sub(self.input_base)?);
        (offset < self.count).then(|| self.output_base.wrapping_add(offset as u32))
    }
}

/// What a node is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    ItsGroup {
        its_ids: Vec<u32>,
    },
    NamedComponent,
    RootComplex {
        segment: u32,
        ats: bool,
    },
    SmmuV1V2,
    SmmuV3 {
        base: u64,
        model: u32,
        event_gsiv: u32,
        gerr_gsiv: u32,
        sync_gsiv: u32,
        pri_gsiv: u32,
    },
    /// A type this parser does not interpret (PMCG, RMR, ...).
    Other(u8),
}

/// One node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Where it starts in the table: what output references name.
    pub offset: u32,
    pub revision: u8,
    pub identifier: u32,
    pub kind: NodeKind,
    pub mappings: Vec<IdMapping>,
}

/// The parsed table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iort {
    pub revision: u8,
    pub nodes: Vec<Node>,
}

/// Where a PCI requester's DMA goes: its SMMUv3 and stream id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamRoute {
    pub smmu_base: u64,
    pub stream_id: u32,
}

impl Iort {
    fn node_at(&self, offset: u32) -> Option<&Node> {
        self.nodes.iter().find(|n| n.offset == offset)
    }

    /// The SMMUv3 and stream id of requester `rid` on PCI segment
    /// `segment`: through the segment's root complex mapping that covers
    /// it. `None` if no mapping does, or it goes straight to an ITS (no
    /// SMMU between).
    pub fn stream_of(&self, segment: u32, rid: u16) -> Option<StreamRoute> {
        let root =
            self.nodes.iter().find(|n| matches!(n.kind, NodeKind::RootComplex { segment: s, .. } if s == segment))?;
        let m = root.mappings.iter().find(|m| !m.single && m.map(u32::from(rid)).is_some())?;
        let stream_id = m.map(u32::from(rid))?;
        match self.node_at(m.output_node)?.kind {
            NodeKind::SmmuV3 { base, .. } => Some(StreamRoute { smmu_base: base, stream_id }),
            _ => None,
        }
    }
}

/// Parses and validates an IORT (`table`: header included).
pub fn parse(table: &[u8]) -> Result<Iort, IortError> {
    let t = acpi_table(table, *SIGNATURE, FIXED).map_err(|e| match e {
        Framing::Short => IortError::Truncated,
        Framing::Signature => IortError::BadSignature,
    })?;
    let count = le32(t, NODE_COUNT_AT);
    if count > MAX_NODES {
        return Err(IortError::TooMany);
    }
    let mut at = le32(t, NODE_OFFSET_AT) as usize;
    if count > 0 && at < FIXED {
        return Err(IortError::BadNode { offset: at });
    }
    let mut nodes = Vec::new();
    for _ in 0..count {
        let (node, next) = parse_node(t, at)?;
        nodes.push(node);
        at = next;
    }
    let iort = Iort { revision: t[REVISION_AT], nodes };
    // Every output reference names a node that takes IDs.
    for node in &iort.nodes {
        for m in &node.mappings {
            let target = iort.node_at(m.output_node).map(|n| &n.kind);
            let takes_ids =
                matches!(target, Some(NodeKind::ItsGroup { .. } | NodeKind::SmmuV1V2 | NodeKind::SmmuV3 { .. }));
            if !takes_ids || m.output_node == node.offset {
                return Err(IortError::BadMapping { node: node.offset as usize });
            }
        }
    }
    Ok(iort)
}

/// The node at `at`; returns it and where the next one starts.
fn parse_node(t: &[u8], at: usize) -> Result<(Node, usize), IortError> {
    let bad = IortError::BadNode { offset: at };
    let header = t.get(at..at + NODE_HEADER).ok_or(bad)?;
    let (kind, len, revision) = (header[0], usize::from(le16(header, 1)), header[3]);
    let (identifier, mapping_count, mapping_offset) = (le32(header, 4), le32(header, 8), le32(header, 12) as usize);
    if len < NODE_HEADER || at + len > t.len() {
        return Err(bad);
    }
    let n = &t[at..at + len];
    let needs = |fixed: usize| if len < NODE_HEADER + fixed { Err(bad) } else { Ok(()) };
    let kind = match kind {
        TYPE_ITS_GROUP => {
            needs(ITS_GROUP_FIXED)?;
            let ids = le32(n, NODE_HEADER);
            if ids > MAX_ITS_IDS {
                return Err(IortError::TooMany);
            }
            let ids_end = NODE_HEADER + ITS_GROUP_FIXED + 4 * ids as usize;
            if ids_end > len {
                return Err(bad);
            }
            let its_ids = (0..ids as usize).map(|k| le32(n, NODE_HEADER + ITS_GROUP_FIXED + 4 * k)).collect();
            NodeKind::ItsGroup { its_ids }
        }
        TYPE_NAMED_COMPONENT => {
            needs(NAMED_COMPONENT_FIXED)?;
            NodeKind::NamedComponent
        }
        TYPE_ROOT_COMPLEX => {
            needs(ROOT_COMPLEX_FIXED)?;
            NodeKind::RootComplex { segment: le32(n, NODE_HEADER + 12), ats: le32(n, NODE_HEADER + 8) & 1 != 0 }
        }
        TYPE_SMMU_V1_V2 => NodeKind::SmmuV1V2,
        TYPE_SMMU_V3 => {
            needs(SMMU_V3_FIXED)?;
            let base = le64(n, NODE_HEADER);
            if !base.is_multiple_of(SMMU_V3_ALIGN) {
                return Err(IortError::MisalignedSmmu { node: at });
            }
            NodeKind::SmmuV3 {
                base,
                model: le32(n, NODE_HEADER + 24),
                event_gsiv: le32(n, NODE_HEADER + 28),
                pri_gsiv: le32(n, NODE_HEADER + 32),
                gerr_gsiv: le32(n, NODE_HEADER + 36),
                sync_gsiv: le32(n, NODE_HEADER + 40),
            }
        }
        other => NodeKind::Other(other),
    };
    if mapping_count > MAX_MAPPINGS {
        return Err(IortError::TooMany);
    }
    let mut mappings = Vec::new();
    if mapping_count > 0 {
        let end = mapping_offset.checked_add(MAPPING_BYTES * mapping_count as usize).ok_or(bad)?;
        if mapping_offset < NODE_HEADER || end > len {
            return Err(bad);
        }
        for k in 0..mapping_count as usize {
            let m = &n[mapping_offset + MAPPING_BYTES * k..];
            let mapping = IdMapping {
                input_base: le32(m, 0),
                count: u64::from(le32(m, 4)) + 1,
                output_base: le32(m, 8),
                output_node: le32(m, 12),
                single: le32(m, 16) & 1 != 0,
            };
            let wraps = |base: u32| u64::from(base) + mapping.count > 1 << 32;
            if !mapping.single && (wraps(mapping.input_base) || wraps(mapping.output_base)) {
                return Err(IortError::BadMapping { node: at });
            }
            mappings.push(mapping);
        }
    }
    let offset = u32::try_from(at).map_err(|_| bad)?;
    Ok((Node { offset, revision, identifier, kind, mappings }, at + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU 10's IORT under edk2, `-M virt,virtualization=on,gic-version=3`
    /// without and with `iommu=smmuv3` (dumped from the firmware's tables).
    const QEMU_VIRT: &[u8] = include_bytes!("../testdata/qemu-virt-iort.bin");
    const QEMU_VIRT_SMMUV3: &[u8] = include_bytes!("../testdata/qemu-virt-smmuv3-iort.bin");

    #[test]
    fn qemu_virt_with_smmuv3() {
        let iort = parse(QEMU_VIRT_SMMUV3).unwrap();
        assert_eq!(iort.revision, 3);
        let kinds: Vec<u8> = iort
            .nodes
            .iter()
            .map(|n| match n.kind {
                NodeKind::ItsGroup { .. } => 0,
                NodeKind::RootComplex { .. } => 2,
                NodeKind::SmmuV3 { .. } => 4,
                _ => 9,
            })
            .collect();
        assert_eq!(kinds, [0, 4, 2], "an ITS group, the SMMUv3, the root complex");
        let NodeKind::SmmuV3 { base, event_gsiv, gerr_gsiv, sync_gsiv, .. } = iort.nodes[1].kind else { panic!() };
        assert_eq!((base, event_gsiv, gerr_gsiv, sync_gsiv), (0x0905_0000, 0x6a, 0x6d, 0x6c));
        // Requesters 0x00-0xff go through the SMMU, stream id = requester id
        // (the DTB's iommu-map says the same); the rest go to the ITS.
        assert_eq!(iort.stream_of(0, 0x0008), Some(StreamRoute { smmu_base: 0x0905_0000, stream_id: 8 }));
        assert_eq!(iort.stream_of(0, 0x00ff), Some(StreamRoute { smmu_base: 0x0905_0000, stream_id: 0xff }));
        assert_eq!(iort.stream_of(0, 0x0100), None, "straight to the ITS");
        assert_eq!(iort.stream_of(1, 0x0008), None, "no such segment");
    }

    #[test]
    fn qemu_virt_without_smmu_maps_requesters_to_the_its() {
        let iort = parse(QEMU_VIRT).unwrap();
        assert!(iort.nodes.iter().all(|n| !matches!(n.kind, NodeKind::SmmuV3 { .. })));
        assert_eq!(iort.stream_of(0, 8), None);
    }

    fn patched(at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut t = QEMU_VIRT_SMMUV3.to_vec();
        t[at..at + bytes.len()].copy_from_slice(bytes);
        t
    }

    #[test]
    fn bad_tables_are_refused() {
        assert_eq!(parse(&QEMU_VIRT_SMMUV3[..40]), Err(IortError::Truncated));
        assert_eq!(parse(&patched(0, b"TROI")), Err(IortError::BadSignature));
        assert_eq!(parse(&patched(NODE_COUNT_AT, &1000u32.to_le_bytes())), Err(IortError::TooMany));
        assert_eq!(parse(&patched(NODE_COUNT_AT, &4u32.to_le_bytes())), Err(IortError::BadNode { offset: 0xec }));
        // The SMMU node (at 0x48): its registers off 64 KiB.
        assert_eq!(
            parse(&patched(0x48 + 16, &0x0905_1000u32.to_le_bytes())),
            Err(IortError::MisalignedSmmu { node: 0x48 })
        );
        // The root complex (at 0xa0): its first mapping's output names the
        // root complex itself, then no node at all.
        let first_output = 0xa0 + 0x24 + 12;
        assert_eq!(parse(&patched(first_output, &0xa0u32.to_le_bytes())), Err(IortError::BadMapping { node: 0xa0 }));
        assert_eq!(parse(&patched(first_output, &0x44u32.to_le_bytes())), Err(IortError::BadMapping { node: 0xa0 }));
        // A range that wraps.
        assert_eq!(parse(&patched(0xa0 + 0x24, &u32::MAX.to_le_bytes())), Err(IortError::BadMapping { node: 0xa0 }));
        // A node length past the table.
        assert_eq!(parse(&patched(0xa0 + 1, &0x200u16.to_le_bytes())), Err(IortError::BadNode { offset: 0xa0 }));
    }
}
