//! What an x86_64 test guest learns at boot: the multiboot2 boot
//! information the hypervisor hands over as a boot loader would
//! (Multiboot2 Specification 2.0, §3.2 machine state, §3.6 boot
//! information): its RAM from the memory map (§3.6.8), and the
//! conventional memory at 0 where a guest with more than one vCPU puts
//! their start-up code, and its arguments from the command line (§3.6.3). The structure is untrusted input,
//! validated here; the runtime reads it through a bounded slice.

use core::fmt;

use crate::{Line, Region};

/// EAX at entry (§3.2).
pub const BOOTLOADER_MAGIC: u32 = 0x36d7_6289;
/// The fixed part: total_size and reserved (§3.6.1).
pub const HEADER_LEN: usize = 8;
/// The hypervisor keeps the boot information within 8 KiB; anything
/// larger is refused before it is read.
pub const MAX_INFO_SIZE: usize = 0x2000;
const TAG_END: u32 = 0;
const TAG_CMDLINE: u32 = 1;
const TAG_MMAP: u32 = 6;
const MMAP_AVAILABLE: u32 = 1;
/// A memory map entry: base_addr u64, length u64, type u32, reserved u32.
const MMAP_ENTRY_MIN: usize = 24;
const TAG_ALIGN: usize = 8;
/// Conventional memory ends at 1 MiB: what lies above is no use to the
/// start-up code of a SIPI (000VV000H).
const CONVENTIONAL_LIMIT: u64 = 1 << 20;

/// Why the boot information was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MultibootError {
    /// EAX at entry was not [`BOOTLOADER_MAGIC`].
    BadMagic(u32),
    /// EBX was not an 8-byte aligned address outside the image.
    BadAddress(u64),
    /// total_size is not a multiple of 8 within bounds.
    BadSize,
    /// A tag runs past the end, or has a size below 8.
    BadTag,
    NoEndTag,
    /// The command line is not NUL-terminated UTF-8.
    BadCmdline,
    /// No available memory region contains the guest's image.
    NoRam,
}

impl MultibootError {
    /// `boot error=<kind> ...`, the guest's last line before it stops.
    pub fn line(&self) -> Line {
        let mut line = Line::event("boot");
        match self {
            Self::BadMagic(magic) => line.field("error", "mb2-bad-magic").hex("eax", u64::from(*magic)),
            Self::BadAddress(addr) => line.field("error", "mb2-bad-address").hex("addr", *addr),
            other => line.field("error", other),
        };
        line
    }
}

impl fmt::Display for MultibootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BadMagic(_) => "mb2-bad-magic",
            Self::BadAddress(_) => "mb2-bad-address",
            Self::BadSize => "mb2-bad-size",
            Self::BadTag => "mb2-bad-tag",
            Self::NoEndTag => "mb2-no-end-tag",
            Self::BadCmdline => "mb2-bad-cmdline",
            Self::NoRam => "mb2-no-ram",
        })
    }
}

/// What the boot information tells a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo<'a> {
    /// The available memory region that holds the image.
    pub ram: Region,
    /// The available memory region that starts at 0, if any
    /// (conventional memory, below 1 MiB).
    pub conventional: Option<Region>,
    /// The command line, empty if absent.
    pub cmdline: &'a str,
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from(le32(b, at)?) | (u64::from(le32(b, at + 4)?) << 32))
}

/// The structure's total size from its first word, checked before the
/// rest is read.
pub fn total_size(header: &[u8; HEADER_LEN]) -> Result<usize, MultibootError> {
    let size = le32(header, 0).ok_or(MultibootError::BadSize)? as usize;
    if !(HEADER_LEN + 8..=MAX_INFO_SIZE).contains(&size) || !size.is_multiple_of(TAG_ALIGN) {
        return Err(MultibootError::BadSize);
    }
    Ok(size)
}

/// Parses the boot information `bytes` (exactly `total_size` long); the
/// RAM reported is the available region that contains `image`.
pub fn parse(bytes: &[u8], image: Region) -> Result<BootInfo<'_>, MultibootError> {
    let mut cmdline = "";
    let mut ram = None;
    let mut conventional = None;
    let mut at = HEADER_LEN;
    loop {
        let (Some(tag), Some(size)) = (le32(bytes, at), le32(bytes, at + 4)) else {
            return Err(MultibootError::NoEndTag);
        };
        let size = size as usize;
        let body = at
            .checked_add(size)
            .filter(|_| size >= 8)
            .and_then(|end| bytes.get(at + 8..end))
            .ok_or(MultibootError::BadTag)?;
        match tag {
            TAG_END => break,
            TAG_CMDLINE => {
                let end = body.iter().position(|&b| b == 0).ok_or(MultibootError::BadCmdline)?;
                cmdline = core::str::from_utf8(&body[..end]).map_err(|_| MultibootError::BadCmdline)?;
            }
            TAG_MMAP => {
                let entry_size = le32(body, 0).ok_or(MultibootError::BadTag)? as usize;
                if entry_size < MMAP_ENTRY_MIN {
                    return Err(MultibootError::BadTag);
                }
                for entry in body.get(8..).unwrap_or_default().chunks_exact(entry_size) {
                    let (Some(base), Some(len), Some(kind)) = (le64(entry, 0), le64(entry, 8), le32(entry, 16)) else {
                        return Err(MultibootError::BadTag);
                    };
                    let Some(end) = base.checked_add(len) else { continue };
                    if kind == MMAP_AVAILABLE && base <= image.start && image.end <= end {
                        ram = Some(Region::new(base, end));
                    }
                    if kind == MMAP_AVAILABLE && base == 0 && len != 0 {
                        conventional = Some(Region::new(0, end.min(CONVENTIONAL_LIMIT)));
                    }
                }
            }
            _ => {}
        }
        at = at.checked_add(size.next_multiple_of(TAG_ALIGN)).ok_or(MultibootError::BadTag)?;
    }
    Ok(BootInfo { ram: ram.ok_or(MultibootError::NoRam)?, conventional, cmdline })
}

#[cfg(test)]
mod tests {
    use std::vec::Vec;

    use super::*;

    fn build(tags: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = std::vec![0u8; 8];
        for (t, body) in tags.iter().chain(core::iter::once(&(TAG_END, Vec::new()))) {
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&((body.len() + 8) as u32).to_le_bytes());
            out.extend_from_slice(body);
            out.resize(out.len().next_multiple_of(8), 0);
        }
        let total = out.len() as u32;
        out[..4].copy_from_slice(&total.to_le_bytes());
        out
    }

    fn mmap(entries: &[(u64, u64, u32)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&24u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for &(base, len, kind) in entries {
            b.extend_from_slice(&base.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(&kind.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
        }
        b
    }

    const IMAGE: Region = Region::new(0x4000_0000, 0x4002_0000);

    #[test]
    fn reads_ram_and_cmdline() {
        let info = build(&[
            (TAG_CMDLINE, b"ticks=40 triple_fault=1\0".to_vec()),
            (2, b"hvlu\0".to_vec()),
            (TAG_MMAP, mmap(&[(0, 0x9f000, 1), (0x4000_0000, 0x100_0000, 1)])),
        ]);
        let header: [u8; 8] = info[..8].try_into().unwrap();
        assert_eq!(total_size(&header), Ok(info.len()));
        let b = parse(&info, IMAGE).unwrap();
        assert_eq!(b.ram, Region::new(0x4000_0000, 0x4100_0000));
        assert_eq!(b.conventional, Some(Region::new(0, 0x9f000)));
        assert_eq!(b.cmdline, "ticks=40 triple_fault=1");
        let one = build(&[(TAG_MMAP, mmap(&[(0x4000_0000, 0x100_0000, 1)]))]);
        assert_eq!(parse(&one, IMAGE).unwrap().conventional, None, "a one-vCPU guest has none");
        let reserved_low = build(&[(TAG_MMAP, mmap(&[(0, 0x8_0000, 2), (0x4000_0000, 0x100_0000, 1)]))]);
        assert_eq!(parse(&reserved_low, IMAGE).unwrap().conventional, None);
        let big = build(&[(TAG_MMAP, mmap(&[(0, 0x4100_0000, 1)]))]);
        assert_eq!(parse(&big, IMAGE).unwrap().conventional, Some(Region::new(0, 1 << 20)), "up to 1 MiB");
    }

    #[test]
    fn refuses_bad_structures() {
        let no_ram = build(&[(TAG_MMAP, mmap(&[(0x4000_0000, 0x1_0000, 1), (0x4000_0000, 0x100_0000, 2)]))]);
        assert_eq!(parse(&no_ram, IMAGE), Err(MultibootError::NoRam));
        let bad_cmdline = build(&[(TAG_CMDLINE, b"abc".to_vec())]);
        assert_eq!(parse(&bad_cmdline, IMAGE), Err(MultibootError::BadCmdline));
        let mut truncated = build(&[(TAG_CMDLINE, b"x\0".to_vec())]);
        truncated.truncate(16);
        assert_eq!(parse(&truncated, IMAGE), Err(MultibootError::BadTag));
        let mut short_tag = build(&[]);
        short_tag[12..16].copy_from_slice(&4u32.to_le_bytes());
        assert_eq!(parse(&short_tag, IMAGE), Err(MultibootError::BadTag));
        assert_eq!(parse(&[0u8; 8], IMAGE), Err(MultibootError::NoEndTag));
        let small_entries = build(&[(TAG_MMAP, std::vec![8, 0, 0, 0, 0, 0, 0, 0])]);
        assert_eq!(parse(&small_entries, IMAGE), Err(MultibootError::BadTag));
        assert_eq!(total_size(&[0x10, 0x40, 0, 0, 0, 0, 0, 0]), Err(MultibootError::BadSize));
        assert_eq!(total_size(&[12, 0, 0, 0, 0, 0, 0, 0]), Err(MultibootError::BadSize));
    }

    #[test]
    fn error_lines() {
        assert_eq!(MultibootError::BadMagic(7).line().text(), "boot error=mb2-bad-magic eax=0x7");
        assert_eq!(MultibootError::NoRam.line().text(), "boot error=mb2-no-ram");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x1234_5678_u64;
        for _ in 0..2000 {
            let mut info = build(&[(TAG_CMDLINE, b"a=1\0".to_vec()), (TAG_MMAP, mmap(&[(0x4000_0000, 1 << 24, 1)]))]);
            for _ in 0..4 {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let at = (seed >> 33) as usize % info.len();
                info[at] = (seed >> 17) as u8;
            }
            let _ = parse(&info, IMAGE);
        }
    }
}
