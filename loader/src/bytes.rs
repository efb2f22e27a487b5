//! Little-endian fields of firmware tables and image headers, read after
//! the caller has checked the bounds (a read past them panics, which the
//! fuzz targets would find), and the framing every ACPI table shares.

/// The `u16` at `at`.
pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The `u32` at `at`.
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The `u64` at `at`.
pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

/// What is wrong with an ACPI table's framing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Shorter than `min` (or than the 36-byte header), by its bytes or by
    /// its header's length field, or that field says more than was given.
    Short,
    /// Another signature.
    Signature,
}

/// `table` cut to the length its header gives (ACPI 6.5 §5.2.6), if it
/// has `signature` and at least `min` bytes.
pub(crate) fn acpi_table(table: &[u8], signature: [u8; 4], min: usize) -> Result<&[u8], Framing> {
    let min = min.max(36);
    if table.len() < min {
        return Err(Framing::Short);
    }
    if table[..4] != signature {
        return Err(Framing::Signature);
    }
    let len = le32(table, 4) as usize;
    if len < min || len > table.len() {
        return Err(Framing::Short);
    }
    Ok(&table[..len])
}
