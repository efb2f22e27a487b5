//! Versioned state records: the kstate / QEMU `VMState` idea
//! (`shared/DESIGN.md` §4, `kho/ABI.md` "State records").
//!
//! A record is a 16-byte header (id, version, minimum reader version,
//! payload length, CRC-32) followed by its fields in declaration order, each
//! big-endian and fixed-size. Fields are only ever appended, and each field
//! names the version that added it, so:
//!
//! - a reader that knows a newer version than the writer fills the fields the
//!   writer did not have with their declared defaults;
//! - a reader that knows an older version reads the fields it knows and
//!   ignores the trailing ones, provided the writer's minimum reader version
//!   allows it; otherwise it refuses with [`RecordError::TooNew`].
//!
//! Fields are declared once, with [`state_record!`](crate::state_record), and
//! both encode and decode are generated from that declaration.

use alloc::vec::Vec;
use core::fmt;

use crate::checksum::Crc32;

/// Length of the record header in bytes.
pub const RECORD_HEADER_LEN: usize = 16;

/// Largest payload a record may carry.
pub const MAX_RECORD_PAYLOAD: usize = 64 * 1024;

/// Longest record name: the handover stores a record in the property
/// `record-<name>`, and property names are at most 31 characters.
pub const MAX_RECORD_NAME_LEN: usize = 24;

/// Offset of the checksum inside the header; the CRC covers the bytes before
/// it and the payload after the header.
const CHECKSUM_OFFSET: usize = 12;

/// An error decoding a state record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer bytes than a record header.
    Truncated {
        /// How many bytes there were.
        len: usize,
    },
    /// The header declares a payload larger than [`MAX_RECORD_PAYLOAD`].
    PayloadTooLarge {
        /// Record id.
        id: u32,
        /// Declared payload length.
        declared: u32,
    },
    /// The bytes after the header are not as long as the header declares.
    SizeMismatch {
        /// Record id.
        id: u32,
        /// Declared payload length.
        declared: u32,
        /// Bytes actually present after the header.
        actual: usize,
    },
    /// The CRC-32 in the header does not match the record's bytes.
    ChecksumMismatch {
        /// Record id.
        id: u32,
        /// Checksum stored in the header.
        stored: u32,
        /// Checksum computed over the record.
        computed: u32,
    },
    /// Version 0, or a minimum reader version of 0 or above the version.
    InvalidVersion {
        /// Record id.
        id: u32,
        /// Version in the header.
        version: u16,
        /// Minimum reader version in the header.
        min_reader_version: u16,
    },
    /// The record has another id than the type it was decoded as.
    WrongId {
        /// Id of the type being decoded.
        expected: u32,
        /// Id in the header.
        found: u32,
    },
    /// The record needs a newer reader than this one.
    TooNew {
        /// Record id.
        id: u32,
        /// Version that wrote the record.
        version: u16,
        /// Oldest reader version able to read it.
        min_reader_version: u16,
        /// Version this reader knows.
        reader_version: u16,
    },
    /// The payload length does not fit the fields of the writer's version.
    PayloadLength {
        /// Record id.
        id: u32,
        /// Version that wrote the record.
        version: u16,
        /// Bytes the known fields of that version occupy.
        expected: usize,
        /// Bytes in the payload.
        found: usize,
    },
    /// The payload ends inside a field.
    FieldTruncated {
        /// Record id.
        id: u32,
        /// The field.
        field: &'static str,
    },
    /// A field holds a value its type does not allow.
    InvalidField {
        /// Record id.
        id: u32,
        /// The field.
        field: &'static str,
    },
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { len } => write!(f, "record of {len} bytes has no whole header"),
            Self::PayloadTooLarge { id, declared } => {
                write!(f, "record {id:#x} declares a {declared}-byte payload")
            }
            Self::SizeMismatch {
                id,
                declared,
                actual,
            } => write!(
                f,
                "record {id:#x} declares {declared} payload bytes, has {actual}"
            ),
            Self::ChecksumMismatch {
                id,
                stored,
                computed,
            } => write!(
                f,
                "record {id:#x} checksum {stored:#010x}, computed {computed:#010x}"
            ),
            Self::InvalidVersion {
                id,
                version,
                min_reader_version,
            } => write!(
                f,
                "record {id:#x} has version {version} and minimum reader version {min_reader_version}"
            ),
            Self::WrongId { expected, found } => {
                write!(f, "expected record {expected:#x}, found {found:#x}")
            }
            Self::TooNew {
                id,
                version,
                min_reader_version,
                reader_version,
            } => write!(
                f,
                "record {id:#x} version {version} needs reader version {min_reader_version}, this reader knows {reader_version}"
            ),
            Self::PayloadLength {
                id,
                version,
                expected,
                found,
            } => write!(
                f,
                "record {id:#x} version {version} should carry {expected} payload bytes, has {found}"
            ),
            Self::FieldTruncated { id, field } => {
                write!(f, "record {id:#x} ends inside field {field}")
            }
            Self::InvalidField { id, field } => {
                write!(f, "record {id:#x} field {field} holds an invalid value")
            }
        }
    }
}

impl core::error::Error for RecordError {}

/// The header of a record whose length and checksum have been verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Which record type this is.
    pub id: u32,
    /// Version of the record type that wrote it.
    pub version: u16,
    /// Oldest reader version that can read it.
    pub min_reader_version: u16,
    /// Length of the payload after the header.
    pub payload_len: u32,
    /// CRC-32 over the header's first 12 bytes and the payload.
    pub checksum: u32,
}

impl RecordHeader {
    /// Parses a whole record and verifies everything that does not depend on
    /// its type: length, checksum and version fields. Returns the header and
    /// the payload.
    pub fn parse(bytes: &[u8]) -> Result<(Self, &[u8]), RecordError> {
        let Some((head, payload)) = bytes.split_first_chunk::<RECORD_HEADER_LEN>() else {
            return Err(RecordError::Truncated { len: bytes.len() });
        };
        let [i0, i1, i2, i3, v0, v1, m0, m1, l0, l1, l2, l3, c0, c1, c2, c3] = *head;
        let header = Self {
            id: u32::from_be_bytes([i0, i1, i2, i3]),
            version: u16::from_be_bytes([v0, v1]),
            min_reader_version: u16::from_be_bytes([m0, m1]),
            payload_len: u32::from_be_bytes([l0, l1, l2, l3]),
            checksum: u32::from_be_bytes([c0, c1, c2, c3]),
        };
        let id = header.id;
        if header.payload_len as usize > MAX_RECORD_PAYLOAD {
            return Err(RecordError::PayloadTooLarge { id, declared: header.payload_len });
        }
        if payload.len() != header.payload_len as usize {
            return Err(RecordError::SizeMismatch { id, declared: header.payload_len, actual: payload.len() });
        }
        let computed = record_checksum(&head[..CHECKSUM_OFFSET], payload);
        if computed != header.checksum {
            return Err(RecordError::ChecksumMismatch { id, stored: header.checksum, computed });
        }
        if header.version == 0 || header.min_reader_version == 0 || header.min_reader_version > header.version {
            return Err(RecordError::InvalidVersion {
                id,
                version: header.version,
                min_reader_version: header.min_reader_version,
            });
        }
        Ok((header, payload))
    }
}

fn record_checksum(head: &[u8], payload: &[u8]) -> u32 {
    let mut crc = Crc32::new();
    crc.update(head);
    crc.update(payload);
    crc.finish()
}

/// One declared field of a record type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldSpec {
    /// Field name.
    pub name: &'static str,
    /// Record version that added the field.
    pub since: u16,
    /// Encoded size in bytes.
    pub size: usize,
}

/// Bytes the fields present in `version` occupy.
const fn payload_len(fields: &[FieldSpec], version: u16) -> usize {
    let mut len = 0;
    let mut index = 0;
    while index < fields.len() {
        if fields[index].since <= version {
            len += fields[index].size;
        }
        index += 1;
    }
    len
}

/// Whether `name` can follow `record-` (or `pages-`) in a subsystem node's
/// property name: 1 to [`MAX_RECORD_NAME_LEN`] lowercase ASCII letters,
/// digits, `-` and `_`.
pub(crate) const fn record_name_is_valid(name: &str) -> bool {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_RECORD_NAME_LEN {
        return false;
    }
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        if !(byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' || byte == b'_') {
            return false;
        }
        index += 1;
    }
    true
}

pub(crate) const fn fields_are_valid(fields: &[FieldSpec], version: u16, min_reader_version: u16) -> bool {
    if version == 0 || min_reader_version == 0 || min_reader_version > version {
        return false;
    }
    let mut previous_since = 1;
    let mut index = 0;
    while index < fields.len() {
        let since = fields[index].since;
        // Fields are appended only, each by a version this one includes.
        if since < previous_since || since > version {
            return false;
        }
        previous_since = since;
        index += 1;
    }
    payload_len(fields, version) <= MAX_RECORD_PAYLOAD
}

/// Whether a record declaration is consistent: versions ordered, every field
/// added by a version up to the current one and in non-decreasing order,
/// payload within bounds, name usable in a property name. The
/// [`state_record!`](crate::state_record) expansion asserts it at compile
/// time.
pub const fn declaration_is_valid<R: StateRecord>() -> bool {
    record_name_is_valid(R::NAME) && fields_are_valid(R::FIELDS, R::VERSION, R::MIN_READER_VERSION)
}

/// Appends encoded fields to a record payload.
#[derive(Debug)]
pub struct FieldWriter {
    bytes: Vec<u8>,
}

impl FieldWriter {
    /// Appends a field's encoded bytes.
    pub fn put_bytes(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }
}

/// Takes fields, in order, from a verified payload.
#[derive(Debug)]
pub struct FieldReader<'a> {
    id: u32,
    payload: &'a [u8],
}

impl<'a> FieldReader<'a> {
    fn new(id: u32, payload: &'a [u8]) -> Self {
        Self { id, payload }
    }

    /// Decodes the next field, named `field` in errors.
    pub fn take<T: RecordField>(&mut self, field: &'static str) -> Result<T, RecordError> {
        let id = self.id;
        let Some((bytes, rest)) = self.payload.split_at_checked(T::SIZE) else {
            return Err(RecordError::FieldTruncated { id, field });
        };
        self.payload = rest;
        T::read(bytes).ok_or(RecordError::InvalidField { id, field })
    }
}

/// A fixed-size, big-endian field type.
pub trait RecordField: Sized {
    /// Encoded size in bytes.
    const SIZE: usize;
    /// Value of the field in a record written before the field existed, unless
    /// the declaration names another default.
    const ABSENT: Self;
    /// Appends exactly [`Self::SIZE`] bytes.
    fn write(&self, out: &mut FieldWriter);
    /// Decodes exactly [`Self::SIZE`] bytes; `None` if they are not a valid
    /// value.
    fn read(bytes: &[u8]) -> Option<Self>;
}

macro_rules! integer_fields {
    ($($ty:ty),*) => {$(
        impl RecordField for $ty {
            const SIZE: usize = size_of::<$ty>();
            const ABSENT: Self = 0;
            fn write(&self, out: &mut FieldWriter) {
                out.put_bytes(&self.to_be_bytes());
            }
            fn read(bytes: &[u8]) -> Option<Self> {
                bytes.try_into().ok().map(<$ty>::from_be_bytes)
            }
        }
    )*};
}

integer_fields!(u8, u16, u32, u64, i32, i64);

impl RecordField for bool {
    const SIZE: usize = 1;
    const ABSENT: Self = false;
    fn write(&self, out: &mut FieldWriter) {
        out.put_bytes(&[u8::from(*self)]);
    }
    fn read(bytes: &[u8]) -> Option<Self> {
        match bytes {
            [0] => Some(false),
            [1] => Some(true),
            _ => None,
        }
    }
}

impl<const N: usize> RecordField for [u8; N] {
    const SIZE: usize = N;
    const ABSENT: Self = [0; N];
    fn write(&self, out: &mut FieldWriter) {
        out.put_bytes(self);
    }
    fn read(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok()
    }
}

/// A versioned state record type. Implemented only through
/// [`state_record!`](crate::state_record), which declares the fields once.
pub trait StateRecord: crate::__private::Sealed + Sized {
    /// Identifies the record type across versions; never reused.
    const ID: u32;
    /// Default property name suffix in a subsystem node (`record-<NAME>`).
    const NAME: &'static str;
    /// Version this code writes and reads.
    const VERSION: u16;
    /// Oldest reader version able to read what this code writes.
    const MIN_READER_VERSION: u16;
    /// The declared fields, in payload order.
    const FIELDS: &'static [FieldSpec];

    /// Appends every field, in declaration order.
    fn encode_fields(&self, out: &mut FieldWriter);

    /// Decodes the fields a record of `writer_version` carries; fields added
    /// after it take their default.
    fn decode_fields(fields: &mut FieldReader<'_>, writer_version: u16) -> Result<Self, RecordError>;

    /// The record's bytes: header, then payload.
    fn encode(&self) -> Vec<u8> {
        let mut out =
            FieldWriter { bytes: Vec::with_capacity(RECORD_HEADER_LEN + payload_len(Self::FIELDS, Self::VERSION)) };
        out.put_bytes(&[0; RECORD_HEADER_LEN]);
        self.encode_fields(&mut out);
        let mut bytes = out.bytes;
        // The declaration check bounds the payload by MAX_RECORD_PAYLOAD.
        let payload_len = (bytes.len() - RECORD_HEADER_LEN) as u32;
        let (head, payload) = bytes.split_at_mut(RECORD_HEADER_LEN);
        head[0..4].copy_from_slice(&Self::ID.to_be_bytes());
        head[4..6].copy_from_slice(&Self::VERSION.to_be_bytes());
        head[6..8].copy_from_slice(&Self::MIN_READER_VERSION.to_be_bytes());
        head[8..12].copy_from_slice(&payload_len.to_be_bytes());
        let checksum = record_checksum(&head[..CHECKSUM_OFFSET], payload);
        head[12..16].copy_from_slice(&checksum.to_be_bytes());
        bytes
    }

    /// Verifies and decodes a record written by any version of this type.
    fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let (header, payload) = RecordHeader::parse(bytes)?;
        Self::decode_parsed(header, payload)
    }

    /// Decodes a record whose header [`RecordHeader::parse`] returned (its
    /// length, checksum and version fields verified) with its payload:
    /// checks the type and the payload length of that version, then takes
    /// the fields. A validated handover's nodes keep their records so, and
    /// do not checksum them a second time.
    fn decode_parsed(header: RecordHeader, payload: &[u8]) -> Result<Self, RecordError> {
        if header.id != Self::ID {
            return Err(RecordError::WrongId { expected: Self::ID, found: header.id });
        }
        if header.min_reader_version > Self::VERSION {
            return Err(RecordError::TooNew {
                id: header.id,
                version: header.version,
                min_reader_version: header.min_reader_version,
                reader_version: Self::VERSION,
            });
        }
        let expected = payload_len(Self::FIELDS, header.version.min(Self::VERSION));
        // A version this reader knows has an exact length; a newer one may
        // carry trailing fields this reader ignores.
        let length_ok =
            if header.version <= Self::VERSION { payload.len() == expected } else { payload.len() >= expected };
        if !length_ok {
            return Err(RecordError::PayloadLength {
                id: header.id,
                version: header.version,
                expected,
                found: payload.len(),
            });
        }
        Self::decode_fields(&mut FieldReader::new(header.id, payload), header.version)
    }
}

/// Declares a versioned state record: the struct, its [`StateRecord`]
/// implementation (encode and decode derived from the one field list), and
/// a compile-time check of the declaration.
///
/// Each field names the record version that added it; a field added later
/// than the writer's version takes `default` (or the type's
/// [`RecordField::ABSENT`]). Adding a field means appending it with
/// `since` = the bumped `VERSION`; raise `MIN_READER_VERSION` only when older
/// readers must not ignore the new field.
///
/// ```
/// kho::state_record! {
///     /// What a partition looked like when it was frozen.
///     pub struct PartitionRecord {
///         const ID = 0x0000_0100;
///         const NAME = "partition";
///         const VERSION = 2;
///         const MIN_READER_VERSION = 1;
///         /// Partition number.
///         pub partition_id: u32 [since 1],
///         /// Guest RAM in bytes.
///         pub memory_bytes: u64 [since 1],
///         /// Added in version 2; version-1 records read as 1 vCPU.
///         pub vcpu_count: u32 [since 2, default 1],
///     }
/// }
///
/// use kho::StateRecord;
/// let record = PartitionRecord { partition_id: 3, memory_bytes: 1 << 30, vcpu_count: 2 };
/// assert_eq!(PartitionRecord::decode(&record.encode()), Ok(record));
/// ```
#[macro_export]
macro_rules! state_record {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            const ID = $id:expr;
            const NAME = $record_name:expr;
            const VERSION = $version:expr;
            const MIN_READER_VERSION = $min_reader_version:expr;
            $(
                $(#[$field_meta:meta])*
                $field_vis:vis $field:ident: $ty:ty [since $since:literal $(, default $default:tt)?]
            ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        $vis struct $name {
            $(
                $(#[$field_meta])*
                $field_vis $field: $ty,
            )+
        }

        impl $crate::__private::Sealed for $name {}

        impl $crate::StateRecord for $name {
            const ID: u32 = $id;
            const NAME: &'static str = $record_name;
            const VERSION: u16 = $version;
            const MIN_READER_VERSION: u16 = $min_reader_version;
            const FIELDS: &'static [$crate::FieldSpec] = &[$(
                $crate::FieldSpec {
                    name: ::core::stringify!($field),
                    since: $since,
                    size: <$ty as $crate::RecordField>::SIZE,
                },
            )+];

            fn encode_fields(&self, out: &mut $crate::FieldWriter) {
                $( $crate::RecordField::write(&self.$field, out); )+
            }

            fn decode_fields(
                fields: &mut $crate::FieldReader<'_>,
                writer_version: u16,
            ) -> ::core::result::Result<Self, $crate::RecordError> {
                ::core::result::Result::Ok(Self {
                    $(
                        $field: if writer_version >= $since {
                            fields.take(::core::stringify!($field))?
                        } else {
                            $crate::__record_field_absent!($ty $(, $default)?)
                        },
                    )+
                })
            }
        }

        const _: () = ::core::assert!(
            $crate::__private::declaration_is_valid::<$name>(),
            ::core::concat!("inconsistent state_record! declaration: ", ::core::stringify!($name)),
        );
    };
}

/// The value of a field absent from an older record.
#[doc(hidden)]
#[macro_export]
macro_rules! __record_field_absent {
    ($ty:ty) => {
        <$ty as $crate::RecordField>::ABSENT
    };
    ($ty:ty, $default:tt) => {
        $default
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    mod v1 {
        crate::state_record! {
            /// Version 1 of the test record.
            pub struct Sample {
                const ID = 0x51;
                const NAME = "sample";
                const VERSION = 1;
                const MIN_READER_VERSION = 1;
                pub base: u64 [since 1],
                pub enabled: bool [since 1],
            }
        }
    }

    mod v2 {
        crate::state_record! {
            /// Version 2 adds two fields old readers may ignore.
            pub struct Sample {
                const ID = 0x51;
                const NAME = "sample";
                const VERSION = 2;
                const MIN_READER_VERSION = 1;
                pub base: u64 [since 1],
                pub enabled: bool [since 1],
                pub limit: u32 [since 2, default 0xffff],
                pub tag: [u8; 3] [since 2],
            }
        }
    }

    mod v3 {
        crate::state_record! {
            /// Version 3 adds a field old readers must not ignore.
            pub struct Sample {
                const ID = 0x51;
                const NAME = "sample";
                const VERSION = 3;
                const MIN_READER_VERSION = 3;
                pub base: u64 [since 1],
                pub enabled: bool [since 1],
                pub limit: u32 [since 2, default 0xffff],
                pub tag: [u8; 3] [since 2],
                pub mode: i32 [since 3],
            }
        }
    }

    fn sample_v1() -> v1::Sample {
        v1::Sample { base: 0x1234_5000, enabled: true }
    }

    fn sample_v2() -> v2::Sample {
        v2::Sample { base: 0x1234_5000, enabled: true, limit: 7, tag: *b"abc" }
    }

    #[test]
    fn header_layout_is_the_documented_one() {
        let bytes = sample_v1().encode();
        assert_eq!(
            bytes[..12],
            [0, 0, 0, 0x51, 0, 1, 0, 1, 0, 0, 0, 9],
            "id, version, min reader version, payload length"
        );
        assert_eq!(bytes[16..], [0, 0, 0, 0, 0x12, 0x34, 0x50, 0x00, 1]);
        let mut covered = bytes[..12].to_vec();
        covered.extend_from_slice(&bytes[16..]);
        assert_eq!(bytes[12..16], crate::crc32(&covered).to_be_bytes());
    }

    #[test]
    fn round_trips() {
        assert_eq!(v1::Sample::decode(&sample_v1().encode()), Ok(sample_v1()));
        assert_eq!(v2::Sample::decode(&sample_v2().encode()), Ok(sample_v2()));
    }

    #[test]
    fn newer_reader_fills_absent_fields_with_defaults() {
        let read = v2::Sample::decode(&sample_v1().encode()).unwrap();
        assert_eq!(read.base, 0x1234_5000);
        assert_eq!(read.limit, 0xffff, "declared default");
        assert_eq!(read.tag, [0; 3], "type's absent value");
    }

    #[test]
    fn older_reader_ignores_trailing_fields_when_allowed() {
        assert_eq!(v1::Sample::decode(&sample_v2().encode()), Ok(sample_v1()));
    }

    #[test]
    fn older_reader_refuses_records_needing_a_newer_reader() {
        let v3 = v3::Sample { base: 1, enabled: false, limit: 2, tag: [3; 3], mode: -4 };
        let bytes = v3.encode();
        assert_eq!(
            v2::Sample::decode(&bytes),
            Err(RecordError::TooNew { id: 0x51, version: 3, min_reader_version: 3, reader_version: 2 })
        );
        assert_eq!(v3::Sample::decode(&bytes), Ok(v3));
    }

    #[test]
    fn every_corruption_is_a_typed_error() {
        let bytes = sample_v1().encode();
        for index in 0..bytes.len() {
            let mut corrupt = bytes.clone();
            corrupt[index] ^= 0x40;
            assert!(v1::Sample::decode(&corrupt).is_err(), "flip at {index}");
        }
        assert_eq!(v1::Sample::decode(&bytes[..10]), Err(RecordError::Truncated { len: 10 }));
        assert!(matches!(v1::Sample::decode(&bytes[..bytes.len() - 1]), Err(RecordError::SizeMismatch { .. })));
    }

    /// Re-encodes `bytes` with a new payload and a correct checksum.
    fn with_payload(bytes: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut out = bytes[..RECORD_HEADER_LEN].to_vec();
        out[8..12].copy_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        let checksum = record_checksum(&out[..12], payload);
        out[12..16].copy_from_slice(&checksum.to_be_bytes());
        out
    }

    #[test]
    fn checks_lengths_and_values_behind_a_valid_checksum() {
        let bytes = sample_v1().encode();
        let long = with_payload(&bytes, &[0; 10]);
        assert_eq!(
            v1::Sample::decode(&long),
            Err(RecordError::PayloadLength { id: 0x51, version: 1, expected: 9, found: 10 })
        );
        let bad_bool = with_payload(&bytes, &[0, 0, 0, 0, 0, 0, 0, 0, 2]);
        assert_eq!(v1::Sample::decode(&bad_bool), Err(RecordError::InvalidField { id: 0x51, field: "enabled" }));
        let mut other = bytes.clone();
        other[3] = 0x52;
        let other = with_payload(&other, &bytes[16..]);
        assert_eq!(v1::Sample::decode(&other), Err(RecordError::WrongId { expected: 0x51, found: 0x52 }));
        let mut version_zero = bytes.clone();
        version_zero[5] = 0;
        let version_zero = with_payload(&version_zero, &bytes[16..]);
        assert!(matches!(RecordHeader::parse(&version_zero), Err(RecordError::InvalidVersion { version: 0, .. })));
    }

    #[test]
    fn declarations_are_checked() {
        let field = |since| FieldSpec { name: "f", since, size: 8 };
        assert!(fields_are_valid(&[field(1), field(2)], 2, 1));
        assert!(!fields_are_valid(&[field(1), field(3)], 2, 1), "field newer than version");
        assert!(!fields_are_valid(&[field(2), field(1)], 2, 1), "field inserted, not appended");
        assert!(!fields_are_valid(&[field(1)], 1, 2), "min reader above version");
        assert!(!fields_are_valid(&[field(0)], 1, 1));
        assert!(record_name_is_valid("vcpu-state_2"));
        assert!(!record_name_is_valid("Vcpu"));
        assert!(!record_name_is_valid(""));
        assert!(!record_name_is_valid("a-name-longer-than-24-chars"));
    }
}
