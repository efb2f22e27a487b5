//! Flattened device tree (DTB) input: the arm64 boot protocol hands the
//! hypervisor a DTB in x0 (Linux `Documentation/arch/arm64/booting.rst`).
//!
//! The `fdt` crate does the lookups, but it panics on some malformed
//! structure blocks, so every blob is first walked by [`validate`], which
//! checks the header and every token against the Devicetree Specification
//! v0.4 §5 (flattened format) before `fdt` sees it.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use fdt::Fdt;

use crate::{sort_disjoint, BootInfo, BootModule, PhysRange};

/// DTSpec §5.2: header magic.
const FDT_MAGIC: u32 = 0xd00d_feed;
/// DTSpec §5.4.1: structure block tokens.
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;
/// Header size in bytes (DTSpec §5.2, version 17).
const HEADER_LEN: usize = 40;
/// Deepest node nesting accepted; real trees are < 10 deep.
const MAX_DEPTH: usize = 32;
/// Largest blob accepted (the arm64 boot protocol caps the DTB at 2 MiB).
pub const MAX_DTB_SIZE: usize = 2 << 20;
/// Most CPUs accepted.
pub const MAX_CPUS: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DtbError {
    TooShort,
    BadMagic(u32),
    BadTotalSize(u32),
    BlockOutOfBounds(&'static str),
    BadToken {
        offset: usize,
        token: u32,
    },
    BadName {
        offset: usize,
    },
    BadPropName {
        offset: usize,
    },
    PropOutOfBounds {
        offset: usize,
    },
    TooDeep,
    Unbalanced,
    /// `fdt` rejected the header.
    Fdt,
    MissingNode(&'static str),
    MissingProperty {
        node: &'static str,
        prop: &'static str,
    },
    BadCells {
        node: String,
    },
    BadReg {
        node: String,
    },
    NoRam,
    OverlappingRam(PhysRange),
    TooManyCpus,
    BadPsciMethod,
    BadBootargs,
}

impl fmt::Display for DtbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort => write!(f, "blob shorter than the FDT header"),
            Self::BadMagic(m) => write!(f, "bad FDT magic {m:#x}"),
            Self::BadTotalSize(s) => write!(f, "bad FDT totalsize {s}"),
            Self::BlockOutOfBounds(b) => write!(f, "FDT {b} block out of bounds"),
            Self::BadToken { offset, token } => {
                write!(f, "bad FDT token {token:#x} at structure offset {offset:#x}")
            }
            Self::BadName { offset } => write!(f, "bad node name at structure offset {offset:#x}"),
            Self::BadPropName { offset } => write!(f, "bad property name at {offset:#x}"),
            Self::PropOutOfBounds { offset } => write!(f, "property at {offset:#x} out of bounds"),
            Self::TooDeep => write!(f, "FDT nesting deeper than {MAX_DEPTH}"),
            Self::Unbalanced => write!(f, "FDT begin/end nodes unbalanced"),
            Self::Fdt => write!(f, "fdt crate rejected the header"),
            Self::MissingNode(n) => write!(f, "missing node {n}"),
            Self::MissingProperty { node, prop } => write!(f, "node {node} lacks property {prop}"),
            Self::BadCells { node } => write!(f, "bad #address-cells/#size-cells in {node}"),
            Self::BadReg { node } => write!(f, "bad reg property in {node}"),
            Self::NoRam => write!(f, "no memory node with RAM"),
            Self::OverlappingRam(r) => write!(f, "RAM range {:#x}+{:#x} overlaps another", r.base, r.size),
            Self::TooManyCpus => write!(f, "more than {MAX_CPUS} CPUs"),
            Self::BadPsciMethod => write!(f, "PSCI method is neither smc nor hvc"),
            Self::BadBootargs => write!(f, "bootargs is not a UTF-8 string"),
        }
    }
}

fn be32(b: &[u8], off: usize) -> Option<u32> {
    let bytes = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// A DTB [`validate`] accepted: the blob trimmed to its `totalsize`, and
/// its structure and strings blocks.
struct Blocks<'a> {
    blob: &'a [u8],
    structure: &'a [u8],
    strings: &'a [u8],
}

/// Checks the header and walks the whole structure block (DTSpec §5).
/// Returns the blob trimmed to its `totalsize`.
pub fn validate(blob: &[u8]) -> Result<&[u8], DtbError> {
    validate_blocks(blob).map(|b| b.blob)
}

fn validate_blocks(blob: &[u8]) -> Result<Blocks<'_>, DtbError> {
    let hdr = |i: usize| be32(blob, i * 4).ok_or(DtbError::TooShort);
    if blob.len() < HEADER_LEN {
        return Err(DtbError::TooShort);
    }
    let magic = hdr(0)?;
    if magic != FDT_MAGIC {
        return Err(DtbError::BadMagic(magic));
    }
    let total = hdr(1)?;
    let total_len = total as usize;
    if total_len < HEADER_LEN || total_len > blob.len() || total_len > MAX_DTB_SIZE {
        return Err(DtbError::BadTotalSize(total));
    }
    let blob = &blob[..total_len];
    let (off_struct, off_strings, off_rsvmap) = (hdr(2)? as usize, hdr(3)? as usize, hdr(4)? as usize);
    let (size_strings, size_struct) = (hdr(8)? as usize, hdr(9)? as usize);
    let in_bounds = |off: usize, len: usize| off.checked_add(len).is_some_and(|e| e <= total_len);
    if !in_bounds(off_struct, size_struct) || off_struct % 4 != 0 {
        return Err(DtbError::BlockOutOfBounds("structure"));
    }
    if !in_bounds(off_strings, size_strings) {
        return Err(DtbError::BlockOutOfBounds("strings"));
    }
    // Memory reservation block: (u64 address, u64 size) pairs ending in 0,0.
    let mut r = off_rsvmap;
    loop {
        if !in_bounds(r, 16) || r % 8 != 0 {
            return Err(DtbError::BlockOutOfBounds("memory reservation"));
        }
        if blob[r..r + 16].iter().all(|&b| b == 0) {
            break;
        }
        r += 16;
    }
    let structure = &blob[off_struct..off_struct + size_struct];
    let strings = &blob[off_strings..off_strings + size_strings];
    walk_structure(structure, strings)?;
    Ok(Blocks { blob, structure, strings })
}

fn cstr_len(bytes: &[u8]) -> Option<usize> {
    let len = bytes.iter().position(|&b| b == 0)?;
    bytes[..len].is_ascii().then_some(len)
}

/// Where a node is in its token sequence. DTSpec §5.4.1 puts a node's
/// properties before its child nodes; `fdt` 0.1.5 additionally asserts (and
/// so panics) unless `FDT_NOP` tokens come only right before `FDT_END_NODE`.
/// Blobs outside that shape are refused (dtc and QEMU never emit them).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Properties,
    Children,
    Nops,
}

fn walk_structure(s: &[u8], strings: &[u8]) -> Result<(), DtbError> {
    // A strings block of ASCII that ends in NUL holds a name at every
    // offset inside it: checked once here instead of at every property.
    let every_name_ok = strings.last() == Some(&0) && strings.is_ascii();
    let mut off = 0usize;
    let mut depth = 0usize;
    let mut seen_root = false;
    let mut phases = [Phase::Properties; MAX_DEPTH + 1];
    loop {
        let token = be32(s, off).ok_or(DtbError::Unbalanced)?;
        let at = off;
        off += 4;
        let bad = DtbError::BadToken { offset: at, token };
        match token {
            FDT_BEGIN_NODE => {
                if depth == 0 && seen_root {
                    return Err(bad);
                }
                if depth > 0 {
                    if phases[depth] == Phase::Nops {
                        return Err(bad);
                    }
                    phases[depth] = Phase::Children;
                }
                seen_root = true;
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(DtbError::TooDeep);
                }
                phases[depth] = Phase::Properties;
                let name_len = s.get(off..).and_then(cstr_len).ok_or(DtbError::BadName { offset: at })?;
                off = (off + name_len + 1 + 3) & !3;
            }
            FDT_END_NODE => {
                depth = depth.checked_sub(1).ok_or(DtbError::Unbalanced)?;
            }
            FDT_PROP => {
                if depth == 0 || phases[depth] != Phase::Properties {
                    return Err(bad);
                }
                let len = be32(s, off).ok_or(DtbError::PropOutOfBounds { offset: at })? as usize;
                let nameoff = be32(s, off + 4).ok_or(DtbError::PropOutOfBounds { offset: at })? as usize;
                if !(every_name_ok && nameoff < strings.len()) {
                    strings.get(nameoff..).and_then(cstr_len).ok_or(DtbError::BadPropName { offset: at })?;
                }
                let value_end = (off + 8).checked_add(len).ok_or(DtbError::PropOutOfBounds { offset: at })?;
                if value_end > s.len() {
                    return Err(DtbError::PropOutOfBounds { offset: at });
                }
                off = (value_end + 3) & !3;
            }
            FDT_NOP => {
                if depth == 0 {
                    return Err(bad);
                }
                phases[depth] = Phase::Nops;
            }
            FDT_END => {
                return if depth == 0 && seen_root { Ok(()) } else { Err(DtbError::Unbalanced) };
            }
            _ => return Err(bad),
        }
    }
}

/// How PSCI calls are made (DTSpec binding `arm,psci`, property `method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciConduit {
    Smc,
    Hvc,
}

/// The GICv3 frames (binding `arm,gic-v3`: reg = GICD, GICR...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GicV3 {
    pub distributor: PhysRange,
    pub redistributors: PhysRange,
}

/// A generic ECAM PCIe host bridge (binding `pci-host-ecam-generic`,
/// Linux `Documentation/devicetree/bindings/pci/host-generic-pci.yaml`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PcieHost {
    /// The ECAM window: 1 MiB per bus (PCIe Base Spec §7.2.2).
    pub ecam: PhysRange,
    pub bus_start: u8,
    pub bus_end: u8,
    /// 32-bit memory window: (PCI bus address, CPU range).
    pub mmio32: Option<(u64, PhysRange)>,
    /// `iommu-map` entry (binding `pci-iommu.txt`): RIDs from `rid_base`
    /// map to stream ids from `sid_base`, `len` of them.
    pub iommu_map: Option<IommuMap>,
}

/// One `iommu-map` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IommuMap {
    pub rid_base: u32,
    pub iommu_phandle: u32,
    pub sid_base: u32,
    pub len: u32,
}

impl IommuMap {
    /// The stream id of requester id `rid`, if the map covers it.
    pub fn stream_id(&self, rid: u32) -> Option<u32> {
        let off = rid.checked_sub(self.rid_base).filter(|&o| o < self.len)?;
        self.sid_base.checked_add(off)
    }
}

/// What the aarch64 hypervisor needs from the platform DTB besides [`BootInfo`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DtbPlatform {
    /// MPIDR affinity values of the CPUs, in DTB order.
    pub cpus: Vec<u64>,
    /// PL011 console.
    pub uart: Option<PhysRange>,
    pub gic: Option<GicV3>,
    pub psci: Option<PsciConduit>,
    /// SMMUv3 register frame (binding `arm,smmu-v3`).
    pub smmu: Option<PhysRange>,
    pub pcie: Option<PcieHost>,
}

#[derive(Clone, Copy)]
struct Cells {
    address: usize,
    size: usize,
}

/// The properties a node is read for, gathered as [`collect`] passes
/// them (`fdt`'s `FdtNode::property` scanned every property, resolving
/// each name, on each lookup: reading QEMU virt's DTB that way was the
/// largest step of a live update's restore on aarch64).
#[derive(Clone, Copy, Default)]
struct Props<'a> {
    status: Option<&'a [u8]>,
    device_type: Option<&'a [u8]>,
    compatible: Option<&'a [u8]>,
    reg: Option<&'a [u8]>,
    address_cells: Option<&'a [u8]>,
    size_cells: Option<&'a [u8]>,
    bus_range: Option<&'a [u8]>,
    ranges: Option<&'a [u8]>,
    iommu_map: Option<&'a [u8]>,
    method: Option<&'a [u8]>,
    bootargs: Option<&'a [u8]>,
    initrd_start: Option<&'a [u8]>,
    initrd_end: Option<&'a [u8]>,
}

impl<'a> Props<'a> {
    /// Keeps `value` if the property name at the start of `at` (the
    /// strings block from the name's offset: the name, NUL, and whatever
    /// follows) is one the hypervisor reads. Names are told apart by their
    /// first byte before any is compared whole, and no name is scanned for
    /// its end (this runs for every property of the DTB, in the blackout).
    fn set(&mut self, at: &[u8], value: &'a [u8]) {
        let is = |name: &[u8]| at.get(name.len()) == Some(&0) && at.starts_with(name);
        let slot = match at.first() {
            Some(b's') if is(b"status") => &mut self.status,
            Some(b'd') if is(b"device_type") => &mut self.device_type,
            Some(b'c') if is(b"compatible") => &mut self.compatible,
            Some(b'r') if is(b"reg") => &mut self.reg,
            Some(b'r') if is(b"ranges") => &mut self.ranges,
            Some(b'#') if is(b"#address-cells") => &mut self.address_cells,
            Some(b'#') if is(b"#size-cells") => &mut self.size_cells,
            Some(b'b') if is(b"bus-range") => &mut self.bus_range,
            Some(b'b') if is(b"bootargs") => &mut self.bootargs,
            Some(b'i') if is(b"iommu-map") => &mut self.iommu_map,
            Some(b'm') if is(b"method") => &mut self.method,
            Some(b'l') if is(b"linux,initrd-start") => &mut self.initrd_start,
            Some(b'l') if is(b"linux,initrd-end") => &mut self.initrd_end,
            _ => return,
        };
        // The first of duplicates, as a lookup by name finds it.
        slot.get_or_insert(value);
    }
}

fn cells_from(props: &Props<'_>, name: &str) -> Result<Cells, DtbError> {
    let read = |value: Option<&[u8]>, default: usize| -> Result<usize, DtbError> {
        match value {
            None => Ok(default),
            Some(v) => match be32(v, 0) {
                // PCI buses use 3 address cells; no binding needs more.
                Some(c @ 0..=3) if v.len() == 4 => Ok(c as usize),
                _ => Err(DtbError::BadCells { node: String::from(name) }),
            },
        }
    };
    // DTSpec §2.3.5: defaults are 2 address cells and 1 size cell.
    Ok(Cells { address: read(props.address_cells, 2)?, size: read(props.size_cells, 1)? })
}

fn read_cells(value: &[u8], off: usize, n: usize) -> Option<u64> {
    if n > 2 {
        return None;
    }
    (0..n).try_fold(0u64, |acc, i| Some((acc << 32) | u64::from(be32(value, off + 4 * i)?)))
}

/// Decodes a `reg` property with the parent's cell sizes.
fn reg_from(reg: Option<&[u8]>, name: &str, parent: Cells) -> Result<Vec<PhysRange>, DtbError> {
    let bad = || DtbError::BadReg { node: String::from(name) };
    let Some(value) = reg else {
        return Ok(Vec::new());
    };
    let entry = 4 * (parent.address + parent.size);
    if entry == 0 || value.len() % entry != 0 {
        return Err(bad());
    }
    let mut out = Vec::new();
    for chunk in value.chunks_exact(entry) {
        let base = read_cells(chunk, 0, parent.address).ok_or_else(bad)?;
        let size = read_cells(chunk, 4 * parent.address, parent.size).ok_or_else(bad)?;
        let range = PhysRange::new(base, size);
        if range.end().is_none() {
            return Err(bad());
        }
        out.push(range);
    }
    Ok(out)
}

fn compatible_with(value: Option<&[u8]>, with: &str) -> bool {
    value.is_some_and(|v| v.split(|&b| b == 0).any(|s| s == with.as_bytes()))
}

fn str_of(v: &[u8]) -> Option<&str> {
    let s = v.strip_suffix(&[0]).unwrap_or(v);
    core::str::from_utf8(s).ok()
}

struct Collected {
    ram: Vec<PhysRange>,
    cpus: Vec<u64>,
    uart: Option<PhysRange>,
    gic: Option<GicV3>,
    smmu: Option<PhysRange>,
    pcie: Option<PcieHost>,
}

/// PCI `ranges` space code (phys.hi bits 25:24, IEEE 1275 PCI binding):
/// 0b10 = 32-bit memory.
const PCI_SPACE_MMIO32: u32 = 0b10;

fn u32_cells(value: &[u8]) -> Vec<u32> {
    value.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Decodes a generic ECAM host bridge: `reg` with the parent's cells,
/// `ranges` with 3 PCI address cells, `bus-range`, `iommu-map`.
fn pcie_host(name: &str, props: &Props<'_>, parent: Cells) -> Result<PcieHost, DtbError> {
    let bad = || DtbError::BadReg { node: String::from(name) };
    let ecam = *reg_from(props.reg, name, parent)?.first().ok_or_else(bad)?;
    let (bus_start, bus_end) = match props.bus_range.map(u32_cells) {
        Some(v) if v.len() == 2 && v[0] <= v[1] && v[1] <= 0xff => (v[0] as u8, v[1] as u8),
        Some(_) => return Err(bad()),
        None => (0, 0xff),
    };
    if ecam.size < (u64::from(bus_end - bus_start) + 1) << 20 {
        return Err(bad());
    }
    // ranges: (pci.hi, pci.mid, pci.lo, cpu address (parent cells), size (own size cells)).
    let own = cells_from(props, name)?;
    let mut mmio32 = None;
    if let Some(ranges) = props.ranges {
        let stride = 3 + parent.address + own.size;
        let cells = u32_cells(ranges);
        if own.address != 3 || stride == 0 || !cells.len().is_multiple_of(stride) {
            return Err(bad());
        }
        for e in cells.chunks_exact(stride) {
            let space = (e[0] >> 24) & 0b11;
            let pci = (u64::from(e[1]) << 32) | u64::from(e[2]);
            let cpu = e[3..3 + parent.address].iter().fold(0u64, |a, &c| (a << 32) | u64::from(c));
            let size = e[3 + parent.address..].iter().fold(0u64, |a, &c| (a << 32) | u64::from(c));
            let range = PhysRange::new(cpu, size);
            if range.end().is_none() {
                return Err(bad());
            }
            if space == PCI_SPACE_MMIO32 && mmio32.is_none() {
                mmio32 = Some((pci, range));
            }
        }
    }
    let iommu_map = match props.iommu_map.map(u32_cells) {
        Some(v) if v.len() >= 4 => Some(IommuMap { rid_base: v[0], iommu_phandle: v[1], sid_base: v[2], len: v[3] }),
        Some(_) => return Err(bad()),
        None => None,
    };
    Ok(PcieHost { ecam, bus_start, bus_end, mmio32, iommu_map })
}

/// Acts on a node whose properties are all read: RAM, a CPU, or a device
/// the hypervisor drives. `depth` 1 is a child of the root.
fn visit(name: &str, props: &Props<'_>, parent: Cells, depth: usize, out: &mut Collected) -> Result<(), DtbError> {
    let base_name = name.split('@').next().unwrap_or(name);
    let reg = || reg_from(props.reg, name, parent);
    let okay = props.status.and_then(str_of).is_none_or(|s| s == "okay");
    let device_type = props.device_type.and_then(str_of);
    let compatible = |with| compatible_with(props.compatible, with);
    let is_memory = device_type == Some("memory") || (depth == 1 && base_name == "memory");
    if is_memory && okay {
        out.ram.extend(reg()?.into_iter().filter(|r| r.size != 0));
    } else if depth == 2 && device_type == Some("cpu") {
        let regs = reg()?;
        let mpidr = regs.first().ok_or_else(|| DtbError::BadReg { node: String::from(name) })?;
        if out.cpus.len() >= MAX_CPUS {
            return Err(DtbError::TooManyCpus);
        }
        // For CPU nodes #size-cells is 0, so the "base" is the MPIDR value.
        out.cpus.push(mpidr.base);
    } else if out.uart.is_none() && okay && compatible("arm,pl011") {
        out.uart = reg()?.first().copied();
    } else if out.smmu.is_none() && okay && compatible("arm,smmu-v3") {
        out.smmu = reg()?.first().copied();
    } else if out.pcie.is_none() && okay && compatible("pci-host-ecam-generic") {
        out.pcie = Some(pcie_host(name, props, parent)?);
    } else if out.gic.is_none() && compatible("arm,gic-v3") {
        if let [d, r, ..] = reg()?[..] {
            out.gic = Some(GicV3 { distributor: d, redistributors: r });
        } else {
            return Err(DtbError::BadReg { node: String::from(name) });
        }
    }
    Ok(())
}

/// A node being read.
struct Open<'a> {
    name: &'a str,
    depth: usize,
    /// The parent's cell sizes, for this node's `reg`.
    parent: Cells,
    props: Props<'a>,
    /// This node's own cell sizes, once its properties are all read.
    own: Option<Cells>,
}

/// What [`collect`] found besides [`Collected`]: the first `/psci` and
/// `/chosen` nodes' properties.
#[derive(Default)]
struct Special<'a> {
    psci: Option<Props<'a>>,
    chosen: Option<Props<'a>>,
}

/// Reads the structure block `s` of a blob [`validate`] accepted, in one
/// pass: each node is acted on once its properties are read (DTSpec §5.4.1
/// puts them before its children, and `validate` holds blobs to it).
fn collect<'a>(s: &'a [u8], strings: &'a [u8], out: &mut Collected) -> Result<Special<'a>, DtbError> {
    let mut stack: Vec<Open<'a>> = Vec::new();
    let mut special = Special::default();
    let mut off = 0usize;
    // The root's reg (if any) is decoded with the defaults.
    let defaults = Cells { address: 2, size: 1 };
    let finish = |node: &mut Open<'a>, out: &mut Collected| -> Result<Cells, DtbError> {
        if let Some(own) = node.own {
            return Ok(own);
        }
        if node.depth > 0 {
            visit(node.name, &node.props, node.parent, node.depth, out)?;
        }
        let own = cells_from(&node.props, if node.depth == 0 { "/" } else { node.name })?;
        node.own = Some(own);
        Ok(own)
    };
    loop {
        let at = off;
        let token = be32(s, off).ok_or(DtbError::Unbalanced)?;
        off += 4;
        match token {
            FDT_BEGIN_NODE => {
                let len = s.get(off..).and_then(cstr_len).ok_or(DtbError::BadName { offset: at })?;
                let name = core::str::from_utf8(&s[off..off + len]).map_err(|_| DtbError::BadName { offset: at })?;
                off = (off + len + 1 + 3) & !3;
                let parent = match stack.last_mut() {
                    Some(p) => finish(p, out)?,
                    None => defaults,
                };
                if stack.len() > MAX_DEPTH {
                    return Err(DtbError::TooDeep);
                }
                stack.push(Open { name, depth: stack.len(), parent, props: Props::default(), own: None });
            }
            FDT_PROP => {
                let bad = || DtbError::PropOutOfBounds { offset: at };
                let len = be32(s, off).ok_or_else(bad)? as usize;
                let nameoff = be32(s, off + 4).ok_or_else(bad)? as usize;
                let value = s.get(off + 8..).and_then(|v| v.get(..len)).ok_or_else(bad)?;
                off = (off + 8 + len + 3) & !3;
                let name_at = strings.get(nameoff..).unwrap_or(&[]);
                stack.last_mut().ok_or(DtbError::BadToken { offset: at, token })?.props.set(name_at, value);
            }
            FDT_END_NODE => {
                let mut node = stack.pop().ok_or(DtbError::Unbalanced)?;
                finish(&mut node, out)?;
                if node.depth == 1 {
                    match node.name.split('@').next() {
                        Some("psci") if special.psci.is_none() => special.psci = Some(node.props),
                        Some("chosen") if special.chosen.is_none() => special.chosen = Some(node.props),
                        _ => {}
                    }
                }
            }
            FDT_NOP => {}
            FDT_END => return Ok(special),
            _ => return Err(DtbError::BadToken { offset: at, token }),
        }
    }
}

/// Parses a platform DTB into the arch-neutral [`BootInfo`] and the
/// aarch64 platform description.
pub fn parse(blob: &[u8], blob_phys: u64) -> Result<(BootInfo, DtbPlatform), DtbError> {
    let Blocks { blob, structure, strings } = validate_blocks(blob)?;
    let fdt = Fdt::new(blob).map_err(|_| DtbError::Fdt)?;
    let mut c = Collected { ram: Vec::new(), cpus: Vec::new(), uart: None, gic: None, smmu: None, pcie: None };
    let special = collect(structure, strings, &mut c)?;
    if c.ram.is_empty() {
        return Err(DtbError::NoRam);
    }
    sort_disjoint(&mut c.ram).map_err(DtbError::OverlappingRam)?;

    let psci = match special.psci {
        None => None,
        Some(props) => match props.method.and_then(str_of) {
            Some("smc") => Some(PsciConduit::Smc),
            Some("hvc") => Some(PsciConduit::Hvc),
            _ => return Err(DtbError::BadPsciMethod),
        },
    };

    let mut info = BootInfo { ram: c.ram, ..BootInfo::default() };
    // The DTB itself and the /memreserve/ entries stay reserved.
    info.reserved.push(PhysRange::new(blob_phys, blob.len() as u64));
    info.reserved.extend(
        fdt.memory_reservations()
            .map(|r| PhysRange::new(r.address() as u64, r.size() as u64))
            .filter(|r| r.size != 0 && r.end().is_some()),
    );
    if let Some(chosen) = special.chosen {
        if let Some(bootargs) = chosen.bootargs {
            info.cmdline = String::from(str_of(bootargs).ok_or(DtbError::BadBootargs)?);
        }
        // linux,initrd-start/end: the one blob the arm64 boot protocol carries.
        let cell = |v: Option<&[u8]>| v.and_then(|v| read_cells(v, 0, v.len() / 4));
        if let (Some(start), Some(end)) = (cell(chosen.initrd_start), cell(chosen.initrd_end)) {
            if end > start {
                let range = PhysRange::new(start, end - start);
                info.reserved.push(range);
                info.modules.push(BootModule { range, name: String::from("initrd") });
            }
        }
    }
    let platform = DtbPlatform { cpus: c.cpus, uart: c.uart, gic: c.gic, psci, smmu: c.smmu, pcie: c.pcie };
    Ok((info, platform))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `qemu-system-aarch64 -M virt,virtualization=on,gic-version=3 -cpu max
    /// -smp 2 -m 512M -machine dumpdtb=...` (QEMU 10.0.2).
    const QEMU_VIRT: &[u8] = include_bytes!("../testdata/qemu-virt-gicv3-smp2-512m.dtb");

    #[test]
    fn qemu_virt_dtb() {
        let (info, plat) = parse(QEMU_VIRT, 0x4400_0000).expect("valid DTB");
        assert_eq!(info.ram, [PhysRange::new(0x4000_0000, 512 << 20)]);
        assert_eq!(info.ram_mib(), 512);
        assert_eq!(plat.cpus, [0, 1]);
        assert_eq!(plat.uart, Some(PhysRange::new(0x0900_0000, 0x1000)));
        assert_eq!(plat.psci, Some(PsciConduit::Smc));
        let gic = plat.gic.expect("gic");
        assert_eq!(gic.distributor.base, 0x0800_0000);
        assert_eq!(gic.redistributors.base, 0x080a_0000);
        assert!(info.reserved.contains(&PhysRange::new(0x4400_0000, QEMU_VIRT.len() as u64)));
    }

    /// The same machine with `iommu=smmuv3` and `-device edu`.
    const QEMU_VIRT_SMMU: &[u8] = include_bytes!("../testdata/qemu-virt-smmuv3-edu.dtb");

    #[test]
    fn smmu_and_pcie_host() {
        let (_, plat) = parse(QEMU_VIRT_SMMU, 0x4800_0000).expect("valid DTB");
        assert_eq!(plat.smmu, Some(PhysRange::new(0x0905_0000, 0x2_0000)));
        let pcie = plat.pcie.expect("pcie");
        assert_eq!(pcie.ecam, PhysRange::new(0x40_1000_0000, 0x1000_0000));
        assert_eq!((pcie.bus_start, pcie.bus_end), (0, 0xff));
        assert_eq!(pcie.mmio32, Some((0x1000_0000, PhysRange::new(0x1000_0000, 0x2eff_0000))));
        let map = pcie.iommu_map.expect("iommu-map");
        assert_eq!(map.stream_id(0x10), Some(0x10));
        assert_eq!(map.stream_id(0x1_0000), None);
        let (_, plain) = parse(QEMU_VIRT, 0x4400_0000).expect("valid DTB");
        assert_eq!(plain.smmu, None);
        assert!(plain.pcie.is_some_and(|p| p.iommu_map.is_none()));
    }

    #[test]
    fn truncated_and_bad_magic() {
        assert_eq!(parse(&QEMU_VIRT[..10], 0), Err(DtbError::TooShort));
        let mut bad = QEMU_VIRT.to_vec();
        bad[0] = 0;
        assert!(matches!(parse(&bad, 0), Err(DtbError::BadMagic(_))));
        assert!(matches!(parse(&QEMU_VIRT[..QEMU_VIRT.len() / 2], 0), Err(DtbError::BadTotalSize(_))));
    }

    #[test]
    fn corrupt_structure_token() {
        let mut bad = QEMU_VIRT.to_vec();
        let off_struct = be32(&bad, 8).unwrap() as usize;
        // The first token after the root's BEGIN_NODE + empty name.
        bad[off_struct + 8..off_struct + 12].copy_from_slice(&0x77u32.to_be_bytes());
        assert!(matches!(parse(&bad, 0), Err(DtbError::BadToken { .. })));
    }

    #[test]
    fn oversized_property_length() {
        let mut bad = QEMU_VIRT.to_vec();
        let off_struct = be32(&bad, 8).unwrap() as usize;
        // Root node: BEGIN_NODE, "\0" padded to 4, then the first PROP's len.
        assert_eq!(be32(&bad, off_struct + 8), Some(FDT_PROP));
        bad[off_struct + 12..off_struct + 16].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
        assert!(matches!(parse(&bad, 0), Err(DtbError::PropOutOfBounds { .. })));
    }

    /// A property after a child node, or a NOP before a property: valid to
    /// the letter of DTSpec's token grammar in places, but `fdt` 0.1.5
    /// panics on them, so they are refused (a proptest found the first).
    #[test]
    fn token_order_fdt_cannot_parse_is_refused() {
        let off_struct = be32(QEMU_VIRT, 8).unwrap() as usize;
        // Root: BEGIN_NODE, "\0" padding, first PROP at +8. Turn that PROP
        // into a NOP followed by its own bytes: the next PROP then follows
        // a NOP.
        let mut nop_first = QEMU_VIRT.to_vec();
        let len = be32(&nop_first, off_struct + 12).unwrap() as usize;
        let words = (8 + len).div_ceil(4) + 1;
        for w in 0..words {
            let at = off_struct + 8 + 4 * w;
            nop_first[at..at + 4].copy_from_slice(&FDT_NOP.to_be_bytes());
        }
        assert!(matches!(parse(&nop_first, 0), Err(DtbError::BadToken { token: FDT_PROP, .. })));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
        /// Random byte corruption never panics; it parses or gives an error.
        #[test]
        fn mutated_blobs_never_panic(flips in proptest::collection::vec((0usize..QEMU_VIRT.len(), any::<u8>()), 1..8)) {
            let mut blob = QEMU_VIRT.to_vec();
            for (at, byte) in flips {
                blob[at] = byte;
            }
            let _ = parse(&blob, 0);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes, 0);
        }
    }
}
