//! CRC-32 as used by every state record (`ABI.md`, "Checksum").
//!
//! The ISO-HDLC / IEEE 802.3 variant (zlib's `crc32`): reflected polynomial
//! `0xEDB8_8320`, initial value and final XOR `0xFFFF_FFFF`. Chosen because a
//! reader in any language has it in its standard library.

/// Reflected CRC-32 polynomial (IEEE 802.3).
const POLYNOMIAL: u32 = 0xEDB8_8320;

/// One lookup entry per byte value, built at compile time.
const TABLE: [u32; 256] = build_table();
/// Slicing-by-8 (Kounavis and Berry, "A Systematic Approach to Building
/// High Performance Software-based CRC Generators", 2005): `SLICES[k][b]`
/// is the CRC of byte `b` followed by `k` zero bytes, so eight bytes are
/// folded with eight independent lookups instead of eight dependent ones.
/// The live-update blackout checksums every record twice (written, then
/// read), which bytewise cost ~10 instructions a byte.
const SLICES: [[u32; 256]; 8] = build_slices();

const fn build_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut crc = byte as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ POLYNOMIAL } else { crc >> 1 };
            bit += 1;
        }
        table[byte] = crc;
        byte += 1;
    }
    table
}

const fn build_slices() -> [[u32; 256]; 8] {
    let mut slices = [[0u32; 256]; 8];
    slices[0] = build_table();
    let mut byte = 0;
    while byte < 256 {
        let mut k = 1;
        while k < 8 {
            let prev = slices[k - 1][byte];
            slices[k][byte] = (prev >> 8) ^ slices[0][(prev & 0xff) as usize];
            k += 1;
        }
        byte += 1;
    }
    slices
}

/// Running CRC-32 state, for checksums over more than one slice.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Crc32(u32);

impl Crc32 {
    pub(crate) const fn new() -> Self {
        Self(u32::MAX)
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        #[cfg(target_arch = "aarch64")]
        if instructions::ENABLED.load(core::sync::atomic::Ordering::Relaxed) {
            #[allow(unsafe_code)]
            // SAFETY: `ENABLED` is set only by `use_crc32_instructions`,
            // whose caller has seen FEAT_CRC32 in ID_AA64ISAR0_EL1.
            let crc = unsafe { instructions::update(self.0, bytes) };
            self.0 = crc;
            return;
        }
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ self.0;
            let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
            let at = |k: usize, word: u32, shift: u32| SLICES[k][((word >> shift) & 0xff) as usize];
            self.0 = at(7, lo, 0)
                ^ at(6, lo, 8)
                ^ at(5, lo, 16)
                ^ at(4, lo, 24)
                ^ at(3, hi, 0)
                ^ at(2, hi, 8)
                ^ at(1, hi, 16)
                ^ at(0, hi, 24);
        }
        self.update_bytewise(chunks.remainder());
    }

    fn update_bytewise(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            let index = usize::from((self.0 as u8) ^ byte);
            self.0 = (self.0 >> 8) ^ TABLE[index];
        }
    }

    pub(crate) const fn finish(self) -> u32 {
        !self.0
    }
}

/// The Armv8 CRC32 instructions (FEAT_CRC32, Arm ARM C6.2 "CRC32B,
/// CRC32H, CRC32W, CRC32X"): the same CRC-32 (polynomial 0x04C1_1DB7,
/// reflected, as this module's tables), eight bytes an instruction instead
/// of about thirty instructions for eight bytes.
#[cfg(target_arch = "aarch64")]
#[allow(unsafe_code)]
pub(crate) mod instructions {
    use core::arch::aarch64::{__crc32b, __crc32d};
    use core::sync::atomic::{AtomicBool, Ordering};

    use super::Crc32;

    pub(super) static ENABLED: AtomicBool = AtomicBool::new(false);

    /// The running state after `bytes`, as the table-driven update.
    ///
    /// # Safety
    /// The CPU implements FEAT_CRC32.
    ///
    /// The bytes before the first 8-byte boundary and after the last go
    /// one at a time; the words between are loaded whole. (The bare-metal
    /// targets forbid unaligned accesses, so `u64::from_le_bytes` of an
    /// arbitrary 8-byte chunk is eight byte loads and seven ORs: 19
    /// instructions per word instead of 3.)
    #[target_feature(enable = "crc")]
    pub(super) unsafe fn update(mut crc: u32, bytes: &[u8]) -> u32 {
        // SAFETY: every bit pattern is a valid u64, and `align_to` returns
        // a middle that is aligned and inside `bytes`.
        let (head, words, tail) = unsafe { bytes.align_to::<u64>() };
        for &b in head {
            crc = __crc32b(crc, b);
        }
        for &word in words {
            // CRC32X takes the eight bytes in little-endian order.
            crc = __crc32d(crc, u64::from_le(word));
        }
        for &b in tail {
            crc = __crc32b(crc, b);
        }
        crc
    }

    /// See [`crate::use_crc32_instructions`].
    ///
    /// # Safety
    /// The CPU implements FEAT_CRC32, or `implemented` is false.
    pub unsafe fn use_crc32_instructions(implemented: bool) -> bool {
        if !implemented {
            return false;
        }
        let check: [u8; 9] = *b"123456789";
        let mut table = Crc32::new();
        table.update(&check[..4]);
        table.update(&check[4..]);
        // SAFETY: the caller's contract: the instructions exist.
        let hw = unsafe { !update(update(u32::MAX, &check[..3]), &check[3..]) };
        // Whole words, with a head and a tail at every alignment.
        let data: [u64; 6] = core::array::from_fn(|i| 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i as u64 + 1));
        let bytes: [u8; 48] = core::array::from_fn(|i| data[i / 8].to_le_bytes()[i % 8]);
        let words_agree = (0..8).all(|start| {
            let part = &bytes[start..start + 37];
            let mut table = Crc32::new();
            table.update_bytewise(part);
            // SAFETY: as above.
            table.0 == unsafe { update(u32::MAX, part) }
        });
        let same = hw == table.finish() && hw == 0xCBF4_3926 && words_agree;
        ENABLED.store(same, Ordering::Relaxed);
        same
    }
}

/// Lets every checksum use the CPU's CRC32 instructions, after checking
/// that they give the table-driven results (the standard check value, over
/// a split update); returns whether they are used. Call it only once the
/// CPU is known to implement FEAT_CRC32 (aarch64 ID_AA64ISAR0_EL1.CRC32 =
/// 0b0001), before any other CPU checksums. Elsewhere it returns false.
///
/// # Safety
/// The CPU implements FEAT_CRC32, or `implemented` is false.
#[cfg(target_arch = "aarch64")]
pub use instructions::use_crc32_instructions;

/// Lets every checksum use the CPU's CRC32 instructions: on this
/// architecture there are none for this CRC, so it returns false.
#[cfg(not(target_arch = "aarch64"))]
pub fn use_crc32_instructions(implemented: bool) -> bool {
    let _ = implemented;
    false
}

/// CRC-32 (IEEE 802.3) of `bytes`.
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32_parts(&[bytes])
}

/// CRC-32 of the concatenation of `parts`, without copying them.
pub fn crc32_parts(parts: &[&[u8]]) -> u32 {
    let mut crc = Crc32::new();
    for p in parts {
        crc.update(p);
    }
    crc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32_parts(&[b"1234", b"", b"56789"]), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn eight_bytes_at_a_time_equals_one_byte_at_a_time() {
        // Every length up to 64 at every alignment, over bytes that are
        // not a pattern any table entry could hide.
        let data: [u8; 80] = core::array::from_fn(|i| (i as u8).wrapping_mul(97).wrapping_add(13) ^ 0x5a);
        for start in 0..8 {
            for len in 0..=64 {
                let bytes = &data[start..start + len];
                let (mut fast, mut slow) = (Crc32::new(), Crc32::new());
                fast.update(bytes);
                slow.update_bytewise(bytes);
                assert_eq!(fast.finish(), slow.finish(), "start {start} len {len}");
            }
        }
        // zlib's crc32 of 4 KiB of 0xff, and of 1000 zero bytes.
        assert_eq!(crc32(&[0xff; 4096]), 0xf154_670a);
        assert_eq!(crc32(&[0; 1000]), 0x060b_1780);
    }

    #[test]
    fn split_updates_equal_one_update() {
        let mut crc = Crc32::new();
        crc.update(b"1234");
        crc.update(b"56789");
        assert_eq!(crc.finish(), crc32(b"123456789"));
    }
}
