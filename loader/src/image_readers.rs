//! What an update image can read: a table, next to the image descriptor
//! (`image_desc`), of the state-record versions and vCPU-context layouts
//! the image reads. The running image checks it before the freeze, record
//! by record, so it never hands over what the next image cannot read
//! (`kho/ABI.md` §7).
//!
//! The table is 140 bytes, 8-byte aligned, within the first 64 KiB of the
//! image file; all integers little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `HVLURDR\0` |
//! | 8 | 4 | entries used (at most 16) |
//! | 12 | 8 each | entry: id (u32), lowest version read (u16), highest (u16) |
//!
//! An id is a state record's (`kho` record ids), or a vCPU-context family
//! (`0xc000_0000` | the context format's upper 16 bits) whose versions are
//! the layouts (the format's lower 16 bits). Images from before the table
//! have none; they read version 1 of every record and layout 1 of every
//! context.

use crate::image_desc::SEARCH_LIMIT;

pub const MAGIC: &[u8; 8] = b"HVLURDR\0";
/// Most entries a table holds.
pub const MAX_ENTRIES: usize = 16;
pub const TABLE_LEN: usize = 12 + MAX_ENTRIES * 8;
/// The id bit that marks a vCPU-context family.
pub const CONTEXT_FAMILY: u32 = 0xc000_0000;

/// One id's readable versions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadRange {
    pub id: u32,
    pub min: u16,
    pub max: u16,
}

/// The table's bytes, for the image to embed (`entries` beyond
/// [`MAX_ENTRIES`] are dropped: a build with that many fails its tests).
pub const fn table(entries: &[ReadRange]) -> [u8; TABLE_LEN] {
    let mut out = [0u8; TABLE_LEN];
    let mut pos = 0;
    while pos < 8 {
        out[pos] = MAGIC[pos];
        pos += 1;
    }
    let used = if entries.len() < MAX_ENTRIES { entries.len() } else { MAX_ENTRIES };
    let count = (used as u32).to_le_bytes();
    let mut byte = 0;
    while byte < 4 {
        out[8 + byte] = count[byte];
        byte += 1;
    }
    let mut entry = 0;
    while entry < used {
        let at = 12 + 8 * entry;
        let id = entries[entry].id.to_le_bytes();
        let min = entries[entry].min.to_le_bytes();
        let max = entries[entry].max.to_le_bytes();
        let mut k = 0;
        while k < 4 {
            out[at + k] = id[k];
            k += 1;
        }
        out[at + 4] = min[0];
        out[at + 5] = min[1];
        out[at + 6] = max[0];
        out[at + 7] = max[1];
        entry += 1;
    }
    out
}

/// A table found in an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Readers {
    entries: [ReadRange; MAX_ENTRIES],
    count: usize,
}

/// Why a table is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadersError {
    /// More entries than the table holds, or the table runs past the image.
    Malformed,
}

impl core::fmt::Display for ReadersError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("bad-reader-table")
    }
}

impl Readers {
    /// The range an image reads for `id`, if its table names it.
    pub fn range(&self, id: u32) -> Option<ReadRange> {
        self.entries[..self.count].iter().copied().find(|r| r.id == id)
    }

    /// Whether the image reads version `version` of record `id`.
    pub fn reads(&self, id: u32, version: u16) -> bool {
        self.range(id).is_some_and(|r| (r.min..=r.max).contains(&version))
    }
}

/// Finds the table in `image`: `Ok(None)` if it has none (an image from
/// before tables).
pub fn find(image: &[u8]) -> Result<Option<Readers>, ReadersError> {
    let window = &image[..image.len().min(SEARCH_LIMIT)];
    let Some(offset) = (0..window.len().saturating_sub(7)).step_by(8).find(|&o| &window[o..o + 8] == MAGIC) else {
        return Ok(None);
    };
    let body = image.get(offset..offset + TABLE_LEN).ok_or(ReadersError::Malformed)?;
    let count = u32::from_le_bytes([body[8], body[9], body[10], body[11]]) as usize;
    if count > MAX_ENTRIES {
        return Err(ReadersError::Malformed);
    }
    let mut entries = [ReadRange::default(); MAX_ENTRIES];
    for (e, entry) in entries.iter_mut().enumerate().take(count) {
        let at = 12 + 8 * e;
        *entry = ReadRange {
            id: u32::from_le_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]),
            min: u16::from_le_bytes([body[at + 4], body[at + 5]]),
            max: u16::from_le_bytes([body[at + 6], body[at + 7]]),
        };
    }
    Ok(Some(Readers { entries, count }))
}

/// What the running image will write: a record's id, name and the oldest
/// reader version it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    pub id: u32,
    pub name: &'static str,
    pub min_reader: u16,
}

/// Why the next image cannot take the handover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreadable {
    /// It reads record `name` only up to `reads`; it needs `needs`.
    Record { name: &'static str, needs: u16, reads: u16 },
    /// It does not read vCPU-context layout `layout`.
    Context { layout: u16 },
}

impl core::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Record { name, .. } => write!(f, "unreadable-{name}-record"),
            Self::Context { .. } => f.write_str("unreadable-vcpu-context"),
        }
    }
}

/// Checks, before the freeze, that an image with `readers` (`None`: an
/// image from before tables) reads every record in `writes` and the vCPU
/// context of `context_format`. A record its table does not name is one it
/// does not know and ignores, which the versioning rules allow.
pub fn check(readers: Option<&Readers>, writes: &[Written], context_format: u32) -> Result<(), Unreadable> {
    for w in writes {
        let reads = match readers {
            None => 1,
            Some(t) => match t.range(w.id) {
                Some(r) => r.max,
                None => continue,
            },
        };
        if reads < w.min_reader {
            return Err(Unreadable::Record { name: w.name, needs: w.min_reader, reads });
        }
    }
    let family = CONTEXT_FAMILY | (context_format >> 16);
    let layout = (context_format & 0xffff) as u16;
    let range = match readers {
        None => Some(ReadRange { id: family, min: 1, max: 1 }),
        Some(t) => t.range(family),
    };
    if !range.is_some_and(|r| (r.min..=r.max).contains(&layout)) {
        return Err(Unreadable::Context { layout });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    const VCPU: u32 = 0x0001_0003;
    const A64: u32 = CONTEXT_FAMILY | 0x0a64;

    fn image_with(t: &[u8; TABLE_LEN], at: usize) -> alloc::vec::Vec<u8> {
        let mut img = alloc::vec![0u8; 8192 + TABLE_LEN];
        img[at..at + TABLE_LEN].copy_from_slice(t);
        img.truncate(8192.max(at + 8));
        img
    }

    #[test]
    fn reads_names_the_versions_in_range() {
        let t = table(&[ReadRange { id: VCPU, min: 1, max: 2 }]);
        let r = find(&image_with(&t, 64)).unwrap().unwrap();
        assert!(r.reads(VCPU, 1) && r.reads(VCPU, 2));
        assert!(!r.reads(VCPU, 3) && !r.reads(VCPU, 0) && !r.reads(A64, 1));
    }

    #[test]
    fn a_table_round_trips_through_an_image() {
        let t = table(&[ReadRange { id: VCPU, min: 1, max: 2 }, ReadRange { id: A64, min: 1, max: 2 }]);
        let r = find(&image_with(&t, 512)).expect("well formed").expect("present");
        assert_eq!(r.range(VCPU), Some(ReadRange { id: VCPU, min: 1, max: 2 }));
        assert_eq!(r.range(0x0001_0001), None);
        assert_eq!(find(&alloc::vec![0u8; 4096]), Ok(None), "no table: an older image");
        let mut bad = t;
        bad[8] = 17;
        assert_eq!(find(&image_with(&bad, 512)), Err(ReadersError::Malformed));
        assert_eq!(find(&image_with(&t, 8192 - 136)[..8192 - 8]), Err(ReadersError::Malformed), "cut short");
    }

    #[test]
    fn the_check_names_what_the_next_image_cannot_read() {
        let writes = [
            Written { id: VCPU, name: "vcpu", min_reader: 1 },
            Written { id: 0x0001_0099, name: "new", min_reader: 3 },
        ];
        let t = table(&[ReadRange { id: VCPU, min: 1, max: 2 }, ReadRange { id: A64, min: 1, max: 2 }]);
        let r = find(&image_with(&t, 0)).expect("ok").expect("present");
        assert_eq!(check(Some(&r), &writes, 0x0a64_0002), Ok(()), "an unknown record is ignored by its reader");
        assert_eq!(check(Some(&r), &writes, 0x0a64_0003), Err(Unreadable::Context { layout: 3 }));
        let needs2 = [Written { id: VCPU, name: "vcpu", min_reader: 3 }];
        assert_eq!(check(Some(&r), &needs2, 0x0a64_0002), Err(Unreadable::Record { name: "vcpu", needs: 3, reads: 2 }));
        assert_eq!(Unreadable::Record { name: "vcpu", needs: 3, reads: 2 }.to_string(), "unreadable-vcpu-record");
        // An image from before tables reads version 1 and layout 1 only.
        assert_eq!(check(None, &writes[..1], 0x0a64_0001), Ok(()));
        assert_eq!(check(None, &writes[..1], 0x0a64_0002), Err(Unreadable::Context { layout: 2 }));
        let x86 = CONTEXT_FAMILY | 0x8664;
        let only_x86 =
            find(&image_with(&table(&[ReadRange { id: x86, min: 1, max: 1 }]), 0)).expect("ok").expect("present");
        assert_eq!(
            check(Some(&only_x86), &[], 0x0a64_0001),
            Err(Unreadable::Context { layout: 1 }),
            "another arch's only"
        );
    }
}
