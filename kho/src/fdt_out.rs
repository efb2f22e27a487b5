//! Writes a handover's flattened device tree straight into its destination
//! (Devicetree Specification v0.4, ch. 5: header, memory reservation
//! block, structure block, strings block).
//!
//! The handover is written inside the blackout, so the writer does not
//! build a tree model first: a sizing pass computes the layout (and the
//! strings block), then one pass writes the tokens in place. The layout is
//! the one `dtc` and `dtoolkit`'s model writer produce (properties in the
//! order added, children in name order, each property name in the strings
//! block once, in order of first use), so the bytes are the same as
//! before; the golden blobs in `kho/testdata` hold it to that.

use alloc::vec::Vec;

use crate::memory::PhysRange;

/// Structure block tokens (Devicetree Specification §5.4.1).
const FDT_BEGIN_NODE: u32 = 0x1;
const FDT_END_NODE: u32 = 0x2;
const FDT_PROP: u32 = 0x3;
const FDT_END: u32 = 0x9;
const FDT_MAGIC: u32 = 0xd00d_feed;
/// Header fields (§5.2): version 17, compatible back to 16.
const FDT_VERSION: u32 = 17;
const FDT_LAST_COMP_VERSION: u32 = 16;
pub(crate) const HEADER_LEN: usize = 40;
/// The memory reservation block holds only its terminating entry (§5.3).
const RESERVATION_TERMINATOR_LEN: usize = 16;

/// A property name as the handover spells it: a prefix (`record-`,
/// `pages-`, or empty for the root's own) and the rest, kept apart so
/// that no name is formatted into a new string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Name<'a> {
    pub prefix: &'a str,
    pub rest: &'a str,
}

impl Name<'_> {
    fn len(&self) -> usize {
        self.prefix.len() + self.rest.len()
    }
}

/// A property's value: bytes as they are, or big-endian u64 cells.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Value<'a> {
    Bytes(&'a [u8]),
    /// A string and its terminating NUL.
    Text(&'a str),
    Cells(&'a [u64]),
    /// Each range as two cells, base and size.
    Ranges(&'a [PhysRange]),
}

impl Value<'_> {
    fn len(&self) -> usize {
        match self {
            Value::Bytes(b) => b.len(),
            Value::Text(s) => s.len() + 1,
            Value::Cells(c) => c.len() * 8,
            Value::Ranges(r) => r.len() * 16,
        }
    }
}

/// What the writer emits, in order: a node opens, properties, nested
/// nodes, the node closes.
pub(crate) trait Tree<'a> {
    /// Calls `visit` for every event of the tree, in order.
    fn walk(&self, visit: &mut dyn FnMut(Event<'a>));
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Event<'a> {
    Begin(&'a str),
    Property(Name<'a>, Value<'a>),
    End,
}

/// The strings block: each name once, in order of first use.
struct Strings<'a> {
    names: Vec<(Name<'a>, u32)>,
    len: usize,
}

impl<'a> Strings<'a> {
    fn offset_or_insert(&mut self, name: Name<'a>) -> u32 {
        if let Some(&(_, offset)) = self.names.iter().find(|(known, _)| *known == name) {
            return offset;
        }
        // The caller bounds the whole blob (`MAX_HANDOVER_BYTES`) below
        // u32::MAX before writing.
        let offset = self.len as u32;
        self.names.push((name, offset));
        self.len += name.len() + 1;
        offset
    }
}

/// The blob's layout: its length and where the blocks go.
pub(crate) struct Layout<'a> {
    strings: Strings<'a>,
    struct_len: usize,
}

impl Layout<'_> {
    pub(crate) fn total_len(&self) -> usize {
        HEADER_LEN + RESERVATION_TERMINATOR_LEN + self.struct_len + self.strings.len
    }
}

/// Sizes the blob of `tree`.
pub(crate) fn layout<'a>(tree: &impl Tree<'a>) -> Layout<'a> {
    let mut strings = Strings { names: Vec::new(), len: 0 };
    let mut struct_len = 4; // FDT_END
    tree.walk(&mut |event| match event {
        Event::Begin(name) => struct_len += 4 + (name.len() + 1).next_multiple_of(4),
        Event::Property(name, value) => {
            strings.offset_or_insert(name);
            struct_len += 12 + value.len().next_multiple_of(4);
        }
        Event::End => struct_len += 4,
    });
    Layout { strings, struct_len }
}

/// Writes the blob of `tree`, laid out as `layout` says, into `out`
/// (exactly `layout.total_len()` bytes).
pub(crate) fn write<'a>(tree: &impl Tree<'a>, layout: &mut Layout<'a>, out: &mut [u8]) {
    let struct_at = HEADER_LEN + RESERVATION_TERMINATOR_LEN;
    let strings_at = struct_at + layout.struct_len;
    let total = strings_at + layout.strings.len;
    let header = [
        FDT_MAGIC,
        total as u32,
        struct_at as u32,
        strings_at as u32,
        HEADER_LEN as u32,
        FDT_VERSION,
        FDT_LAST_COMP_VERSION,
        0, // boot_cpuid_phys
        layout.strings.len as u32,
        layout.struct_len as u32,
    ];
    let mut w = Cursor { out, at: 0 };
    for field in header {
        w.u32(field);
    }
    w.zeros(RESERVATION_TERMINATOR_LEN);
    let strings = &mut layout.strings;
    tree.walk(&mut |event| match event {
        Event::Begin(name) => {
            w.u32(FDT_BEGIN_NODE);
            w.bytes(name.as_bytes());
            w.zeros(1);
            w.pad();
        }
        Event::Property(name, value) => {
            w.u32(FDT_PROP);
            w.u32(value.len() as u32);
            w.u32(strings.offset_or_insert(name));
            match value {
                Value::Bytes(b) => w.bytes(b),
                Value::Text(s) => {
                    w.bytes(s.as_bytes());
                    w.zeros(1);
                }
                Value::Cells(cells) => {
                    for cell in cells {
                        w.bytes(&cell.to_be_bytes());
                    }
                }
                Value::Ranges(ranges) => {
                    for range in ranges {
                        w.bytes(&range.base().to_be_bytes());
                        w.bytes(&range.size().to_be_bytes());
                    }
                }
            }
            w.pad();
        }
        Event::End => w.u32(FDT_END_NODE),
    });
    w.u32(FDT_END);
    for (name, _) in &strings.names {
        w.bytes(name.prefix.as_bytes());
        w.bytes(name.rest.as_bytes());
        w.zeros(1);
    }
    debug_assert_eq!(w.at, total);
}

/// Writes forward through the destination; the layout pass sized it.
struct Cursor<'o> {
    out: &'o mut [u8],
    at: usize,
}

impl Cursor<'_> {
    fn bytes(&mut self, bytes: &[u8]) {
        let end = self.at + bytes.len();
        if let Some(dest) = self.out.get_mut(self.at..end) {
            dest.copy_from_slice(bytes);
        }
        self.at = end;
    }

    fn u32(&mut self, value: u32) {
        self.bytes(&value.to_be_bytes());
    }

    fn zeros(&mut self, n: usize) {
        let end = self.at + n;
        if let Some(dest) = self.out.get_mut(self.at..end) {
            dest.fill(0);
        }
        self.at = end;
    }

    /// Pads with zeros to the next 4-byte boundary (§5.4.2).
    fn pad(&mut self) {
        let n = self.at.next_multiple_of(4) - self.at;
        self.zeros(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dtoolkit::fdt::Fdt;
    use dtoolkit::{Node, Property};

    struct Two;

    impl<'a> Tree<'a> for Two {
        fn walk(&self, visit: &mut dyn FnMut(Event<'a>)) {
            let record = |rest| Name { prefix: "record-", rest };
            visit(Event::Begin(""));
            visit(Event::Property(Name { prefix: "", rest: "compatible" }, Value::Text("x")));
            for child in ["a", "b"] {
                visit(Event::Begin(child));
                visit(Event::Property(record("one"), Value::Bytes(&[1, 2, 3])));
                visit(Event::Property(record("two"), Value::Cells(&[0x0102_0304_0506_0708])));
                visit(Event::End);
            }
            visit(Event::End);
        }
    }

    #[test]
    fn the_blob_parses_and_names_each_string_once() {
        let mut layout = layout(&Two);
        let mut out = alloc::vec![0xaa; layout.total_len()];
        write(&Two, &mut layout, &mut out);
        let fdt = Fdt::new(&out).expect("a valid FDT");
        let root = fdt.root();
        let children: Vec<_> = root.children().map(|c| c.name()).collect();
        assert_eq!(children, ["a", "b"]);
        for child in root.children() {
            let props: Vec<_> = child.properties().map(|p| (p.name().len(), p.value().to_vec())).collect();
            assert_eq!(props, [(10, alloc::vec![1, 2, 3]), (10, alloc::vec![1, 2, 3, 4, 5, 6, 7, 8])]);
        }
        // compatible, record-one, record-two: each once, NUL-terminated.
        let strings = b"compatible\0record-one\0record-two\0";
        assert!(out.ends_with(strings), "strings block in order of first use, no repeats");
    }
}
