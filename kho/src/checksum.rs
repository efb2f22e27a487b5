//! CRC-32 as used by every state record (`ABI.md`, "Checksum").
//!
//! The ISO-HDLC / IEEE 802.3 variant (zlib's `crc32`): reflected polynomial
//! `0xEDB8_8320`, initial value and final XOR `0xFFFF_FFFF`. Chosen because a
//! reader in any language has it in its standard library.

/// Reflected CRC-32 polynomial (IEEE 802.3).
const POLYNOMIAL: u32 = 0xEDB8_8320;

/// One lookup entry per byte value, built at compile time.
const TABLE: [u32; 256] = build_table();

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

/// Running CRC-32 state, for checksums over more than one slice.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Crc32(u32);

impl Crc32 {
    pub(crate) const fn new() -> Self {
        Self(u32::MAX)
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            let index = usize::from((self.0 as u8) ^ byte);
            self.0 = (self.0 >> 8) ^ TABLE[index];
        }
    }

    pub(crate) const fn finish(self) -> u32 {
        !self.0
    }
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
    fn split_updates_equal_one_update() {
        let mut crc = Crc32::new();
        crc.update(b"1234");
        crc.update(b"56789");
        assert_eq!(crc.finish(), crc32(b"123456789"));
    }
}
