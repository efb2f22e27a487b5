//! Event records (§7.3 "Event records"): four little-endian 64-bit words,
//! the event number in word 0 bits [7:0].

use core::fmt;

use crate::bits::{address_field, Field};

/// Bytes in an event-queue entry.
pub const EVENT_BYTES: u64 = 32;
/// 64-bit words in an event record.
pub(crate) const EVENT_WORDS: usize = 4;

/// Word 0: event number, bits [7:0].
const EVT0_ID: Field = Field::new(0, 8);
/// Word 0: SSV, bit 11 — SubstreamID is valid.
const EVT0_SSV: u64 = 1 << 11;
/// Word 0: SubstreamID, bits [31:12].
const EVT0_SSID: Field = Field::new(12, 20);
/// Word 0: StreamID, bits [63:32].
const EVT0_SID: Field = Field::new(32, 32);
/// Word 1 of translation-class records: PnU (33), InD (34), RnW (35),
/// S2 (39), CLASS [41:40].
const EVT1_PNU: u64 = 1 << 33;
const EVT1_IND: u64 = 1 << 34;
const EVT1_RNW: u64 = 1 << 35;
const EVT1_S2: u64 = 1 << 39;
const EVT1_CLASS: Field = Field::new(40, 2);
/// Word 3 of translation-class records: the faulting IPA, bits [51:12],
/// when S2 = 1.
const EVT3_IPA: u64 = address_field(12);
/// Word 3 of fetch faults: FetchAddr, bits [51:3].
const EVT3_FETCH_ADDR: u64 = address_field(3);

/// Event numbers (§7.3).
const F_UUT: u8 = 0x01;
const C_BAD_STREAMID: u8 = 0x02;
const F_STE_FETCH: u8 = 0x03;
const C_BAD_STE: u8 = 0x04;
const F_BAD_ATS_TREQ: u8 = 0x05;
const F_STREAM_DISABLED: u8 = 0x06;
const F_TRANSL_FORBIDDEN: u8 = 0x07;
const C_BAD_SUBSTREAMID: u8 = 0x08;
const F_CD_FETCH: u8 = 0x09;
const C_BAD_CD: u8 = 0x0a;
const F_WALK_EABT: u8 = 0x0b;
const F_TRANSLATION: u8 = 0x10;
const F_ADDR_SIZE: u8 = 0x11;
const F_ACCESS: u8 = 0x12;
const F_PERMISSION: u8 = 0x13;
const F_TLB_CONFLICT: u8 = 0x20;
const F_CFG_CONFLICT: u8 = 0x21;
const E_PAGE_REQUEST: u8 = 0x24;
const F_VMS_FETCH: u8 = 0x25;

/// The event number, named as in §7.3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    UnsupportedUpstreamTransaction,
    BadStreamId,
    SteFetch,
    BadSte,
    BadAtsRequest,
    StreamDisabled,
    TranslationForbidden,
    BadSubstreamId,
    CdFetch,
    BadCd,
    WalkExternalAbort,
    Translation,
    AddressSize,
    Access,
    Permission,
    TlbConflict,
    ConfigConflict,
    PageRequest,
    VmsFetch,
    /// An implementation-defined or reserved event number.
    Other(u8),
}

impl EventKind {
    fn from_id(id: u8) -> EventKind {
        match id {
            F_UUT => EventKind::UnsupportedUpstreamTransaction,
            C_BAD_STREAMID => EventKind::BadStreamId,
            F_STE_FETCH => EventKind::SteFetch,
            C_BAD_STE => EventKind::BadSte,
            F_BAD_ATS_TREQ => EventKind::BadAtsRequest,
            F_STREAM_DISABLED => EventKind::StreamDisabled,
            F_TRANSL_FORBIDDEN => EventKind::TranslationForbidden,
            C_BAD_SUBSTREAMID => EventKind::BadSubstreamId,
            F_CD_FETCH => EventKind::CdFetch,
            C_BAD_CD => EventKind::BadCd,
            F_WALK_EABT => EventKind::WalkExternalAbort,
            F_TRANSLATION => EventKind::Translation,
            F_ADDR_SIZE => EventKind::AddressSize,
            F_ACCESS => EventKind::Access,
            F_PERMISSION => EventKind::Permission,
            F_TLB_CONFLICT => EventKind::TlbConflict,
            F_CFG_CONFLICT => EventKind::ConfigConflict,
            E_PAGE_REQUEST => EventKind::PageRequest,
            F_VMS_FETCH => EventKind::VmsFetch,
            other => EventKind::Other(other),
        }
    }

    /// The spec's name (`F_TRANSLATION`, `C_BAD_STE`, ...), for log lines.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::UnsupportedUpstreamTransaction => "F_UUT",
            EventKind::BadStreamId => "C_BAD_STREAMID",
            EventKind::SteFetch => "F_STE_FETCH",
            EventKind::BadSte => "C_BAD_STE",
            EventKind::BadAtsRequest => "F_BAD_ATS_TREQ",
            EventKind::StreamDisabled => "F_STREAM_DISABLED",
            EventKind::TranslationForbidden => "F_TRANSL_FORBIDDEN",
            EventKind::BadSubstreamId => "C_BAD_SUBSTREAMID",
            EventKind::CdFetch => "F_CD_FETCH",
            EventKind::BadCd => "C_BAD_CD",
            EventKind::WalkExternalAbort => "F_WALK_EABT",
            EventKind::Translation => "F_TRANSLATION",
            EventKind::AddressSize => "F_ADDR_SIZE",
            EventKind::Access => "F_ACCESS",
            EventKind::Permission => "F_PERMISSION",
            EventKind::TlbConflict => "F_TLB_CONFLICT",
            EventKind::ConfigConflict => "F_CFG_CONFLICT",
            EventKind::PageRequest => "E_PAGE_REQUEST",
            EventKind::VmsFetch => "F_VMS_FETCH",
            EventKind::Other(_) => "IMPDEF",
        }
    }

    /// Translation-class faults (F_WALK_EABT, F_TRANSLATION, F_ADDR_SIZE,
    /// F_ACCESS, F_PERMISSION; §7.3) share one record layout.
    fn is_translation_class(self) -> bool {
        matches!(
            self,
            EventKind::WalkExternalAbort
                | EventKind::Translation
                | EventKind::AddressSize
                | EventKind::Access
                | EventKind::Permission
        )
    }

    /// Records whose word 2 is the transaction's input address.
    fn has_input_address(self) -> bool {
        self.is_translation_class()
            || matches!(
                self,
                EventKind::UnsupportedUpstreamTransaction | EventKind::BadAtsRequest | EventKind::TranslationForbidden
            )
    }

    /// Records whose word 3 is the address of a failed structure fetch.
    fn has_fetch_address(self) -> bool {
        matches!(self, EventKind::SteFetch | EventKind::CdFetch | EventKind::WalkExternalAbort)
    }
}

/// Which fetch a translation-class fault hit (word 1 CLASS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultClass {
    /// 0b00: fetching a context descriptor.
    ContextDescriptor,
    /// 0b01: fetching a translation table entry.
    TranslationTable,
    /// 0b10: the input address itself.
    Input,
    /// 0b11: reserved.
    Reserved,
}

/// Read or write (word 1 RnW).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Read,
    Write,
}

/// The access a translation-class fault was for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FaultAccess {
    pub direction: Direction,
    /// InD = 1.
    pub instruction: bool,
    /// PnU = 1.
    pub privileged: bool,
    /// S2 = 1: stage 2 faulted.
    pub stage2: bool,
    pub class: FaultClass,
}

/// One decoded event record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Event {
    pub kind: EventKind,
    pub stream_id: u32,
    /// Present when SSV = 1.
    pub substream_id: Option<u32>,
    /// The transaction's input address: for the driver's stage-2-only
    /// streams, the IPA the device used.
    pub input_addr: Option<u64>,
    /// For stage-2 translation-class faults, the IPA word 3 reports.
    pub ipa: Option<u64>,
    /// For fetch faults, the structure address that could not be read.
    pub fetch_addr: Option<u64>,
    pub access: Option<FaultAccess>,
    /// The record as read, for anything not decoded above.
    pub raw: [u64; EVENT_WORDS],
}

impl Event {
    /// Decodes a record. Never fails: unknown event numbers come back as
    /// [`EventKind::Other`] with only the StreamID decoded.
    pub fn decode(raw: [u64; EVENT_WORDS]) -> Event {
        let kind = EventKind::from_id(EVT0_ID.get(raw[0]) as u8);
        let substream_id = (raw[0] & EVT0_SSV != 0).then(|| EVT0_SSID.get(raw[0]) as u32);
        let access = kind.is_translation_class().then(|| FaultAccess {
            direction: if raw[1] & EVT1_RNW != 0 { Direction::Read } else { Direction::Write },
            instruction: raw[1] & EVT1_IND != 0,
            privileged: raw[1] & EVT1_PNU != 0,
            stage2: raw[1] & EVT1_S2 != 0,
            class: match EVT1_CLASS.get(raw[1]) {
                0b00 => FaultClass::ContextDescriptor,
                0b01 => FaultClass::TranslationTable,
                0b10 => FaultClass::Input,
                _ => FaultClass::Reserved,
            },
        });
        let stage2_fault = access.is_some_and(|a| a.stage2);
        Event {
            kind,
            stream_id: EVT0_SID.get(raw[0]) as u32,
            substream_id,
            input_addr: kind.has_input_address().then_some(raw[2]),
            ipa: (stage2_fault && kind != EventKind::WalkExternalAbort).then_some(raw[3] & EVT3_IPA),
            fetch_addr: kind.has_fetch_address().then_some(raw[3] & EVT3_FETCH_ADDR),
            access,
            raw,
        }
    }

    /// The most useful address to report: the input address (the IPA for
    /// stage-2-only streams), else the failed fetch address, else 0.
    pub fn address(&self) -> u64 {
        self.input_addr.or(self.fetch_addr).unwrap_or(0)
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "event={} sid={:#x} addr={:#x}", self.kind.name(), self.stream_id, self.address())
    }
}
