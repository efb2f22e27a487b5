//! Typed errors of the driver and of adopt.

use core::fmt;

use crate::probe::ProbeError;

/// Which queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QueueKind {
    Command,
    Event,
}

impl fmt::Display for QueueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QueueKind::Command => "command queue",
            QueueKind::Event => "event queue",
        })
    }
}

/// What the driver was waiting for when its spin budget ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Wait {
    /// SMMU_CR0ACK to show these enables.
    Cr0Ack { want: u32 },
    /// SMMU_GBPA.UPDATE to clear.
    GbpaUpdate,
    /// Room in the command queue.
    CommandSpace,
    /// SMMU_CMDQ_CONS to pass the CMD_SYNC.
    CommandSync,
}

/// A command-queue error (SMMU_CMDQ_CONS.ERR, §7.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CommandError {
    /// CERROR_ILL: illegal command.
    Illegal,
    /// CERROR_ABT: the command could not be read.
    Abort,
    /// CERROR_ATC_INV_SYNC: an ATS invalidation did not complete.
    AtcInvalidationSync,
    /// A reserved or implementation-defined code.
    Other(u8),
}

/// CERROR codes (§7.1).
const CERROR_ILL: u8 = 0x01;
const CERROR_ABT: u8 = 0x02;
const CERROR_ATC_INV_SYNC: u8 = 0x03;

impl CommandError {
    pub(crate) fn from_code(code: u8) -> CommandError {
        match code {
            CERROR_ILL => CommandError::Illegal,
            CERROR_ABT => CommandError::Abort,
            CERROR_ATC_INV_SYNC => CommandError::AtcInvalidationSync,
            other => CommandError::Other(other),
        }
    }

    /// The CERROR code.
    pub fn code(self) -> u8 {
        match self {
            CommandError::Illegal => CERROR_ILL,
            CommandError::Abort => CERROR_ABT,
            CommandError::AtcInvalidationSync => CERROR_ATC_INV_SYNC,
            CommandError::Other(code) => code,
        }
    }
}

/// A failure of a running driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    Probe(ProbeError),
    /// A configured queue size outside what the SMMU and driver support.
    QueueSize {
        queue: QueueKind,
        log2: u8,
        min: u8,
        max: u8,
    },
    /// The frame source has no run of this many pages.
    OutOfMemory {
        pages: usize,
    },
    /// The frame source handed out a misaligned run, or one the SMMU cannot
    /// address; it was given back.
    UnusableFrames {
        pa: u64,
    },
    StreamIdOutOfRange {
        stream_id: u32,
        bits: u8,
    },
    VmidOutOfRange {
        vmid: u16,
        bits: u8,
    },
    /// A stage-2 root that is misaligned or beyond the output address size.
    BadStage2Root {
        s2_root: u64,
    },
    Timeout(Wait),
    /// The SMMU rejected the command at queue index `index`; the entry was
    /// replaced by a CMD_SYNC and the error acknowledged, so the queue runs
    /// on.
    CommandRejected {
        error: CommandError,
        index: u32,
    },
    /// SMMU_GERROR.SFM_ERR: the SMMU entered service failure mode.
    ServiceFailure,
    /// A queue pointer the SMMU reported is impossible: corrupt hardware
    /// state or a second driver.
    QueueInconsistent {
        queue: QueueKind,
        prod: u32,
        cons: u32,
    },
}

impl From<ProbeError> for Error {
    fn from(e: ProbeError) -> Error {
        Error::Probe(e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Probe(e) => write!(f, "unsupported SMMU: {e}"),
            Error::QueueSize { queue, log2, min, max } => {
                write!(f, "{queue} of 2^{log2} entries is outside 2^{min}..=2^{max}")
            }
            Error::OutOfMemory { pages } => write!(f, "no run of {pages} contiguous pages left"),
            Error::UnusableFrames { pa } => write!(f, "frame source returned unusable run at {pa:#x}"),
            Error::StreamIdOutOfRange { stream_id, bits } => {
                write!(f, "StreamID {stream_id:#x} does not fit the {bits}-bit stream table")
            }
            Error::VmidOutOfRange { vmid, bits } => write!(f, "VMID {vmid} does not fit {bits} bits"),
            Error::BadStage2Root { s2_root } => write!(f, "stage-2 root {s2_root:#x} is misaligned or out of range"),
            Error::Timeout(wait) => write!(f, "SMMU did not respond in time ({wait:?})"),
            Error::CommandRejected { error, index } => {
                write!(f, "SMMU rejected command {index}: CERROR {:#04x} ({error:?})", error.code())
            }
            Error::ServiceFailure => write!(f, "SMMU entered service failure mode (GERROR.SFM_ERR)"),
            Error::QueueInconsistent { queue, prod, cons } => {
                write!(f, "{queue} pointers are inconsistent: prod {prod:#x}, cons {cons:#x}")
            }
        }
    }
}

/// A register adopt compares with the preserved state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Register {
    StrtabBase,
    StrtabBaseCfg,
    CmdqBase,
    CmdqProd,
    CmdqCons,
    EventqBase,
    EventqCons,
}

/// A structure adopt validates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Region {
    /// The linear table, or the L1 table of a 2-level one.
    StreamTable,
    /// The L2 table behind L1 descriptor `index`.
    L2Table {
        index: u32,
    },
    CommandQueue,
    EventQueue,
    /// The stage-2 root of an assigned stream.
    Stage2Root {
        stream_id: u32,
    },
}

/// Why preserved SMMU state cannot be adopted. Adopt never changes the
/// SMMU, so after any of these it keeps running as the previous image left
/// it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdoptError {
    Probe(ProbeError),
    /// SMMU_CR0ACK lacks SMMUEN, CMDQEN or EVENTQEN (or sets PRIQEN).
    Disabled {
        cr0ack: u32,
    },
    /// SMMU_GBPA would let traffic bypass the SMMU while disabled.
    GlobalBypass {
        gbpa: u32,
    },
    /// GERROR shows an unacknowledged command-queue error or service
    /// failure.
    GlobalError {
        active: u32,
    },
    /// A live register disagrees with the preserved state.
    RegisterMismatch {
        register: Register,
        expected: u64,
        found: u64,
    },
    /// The stream-table format, split or size is one this driver does not
    /// build.
    StreamTableFormat {
        format: u8,
        split: u8,
        log2size: u8,
    },
    /// A queue size outside what the SMMU supports.
    QueueSize {
        queue: QueueKind,
        log2: u8,
    },
    /// A queue pointer with bits beyond its wrap flag.
    QueuePointer {
        queue: QueueKind,
        value: u32,
    },
    /// Commands were still outstanding when the state was taken.
    CommandQueueBusy {
        prod: u32,
        cons: u32,
    },
    Misaligned {
        region: Region,
        pa: u64,
        align: u64,
    },
    OutsideRam {
        region: Region,
        pa: u64,
        bytes: u64,
    },
    Overlap {
        first: Region,
        second: Region,
    },
    /// A level-1 stream-table descriptor the driver would not write.
    BadL1Descriptor {
        index: u32,
        value: u64,
    },
    /// An STE that is neither abort nor the driver's stage-2 encoding.
    BadSte {
        stream_id: u32,
    },
    /// The table translates a stream the state does not assign, or
    /// differently.
    UnexpectedSte {
        stream_id: u32,
    },
    /// The state assigns a stream the table aborts.
    MissingSte {
        stream_id: u32,
    },
    DuplicateAssignment {
        stream_id: u32,
    },
    StreamIdOutOfRange {
        stream_id: u32,
    },
    VmidOutOfRange {
        vmid: u16,
    },
}

impl From<ProbeError> for AdoptError {
    fn from(e: ProbeError) -> AdoptError {
        AdoptError::Probe(e)
    }
}

impl fmt::Display for AdoptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdoptError::Probe(e) => write!(f, "unsupported SMMU: {e}"),
            AdoptError::Disabled { cr0ack } => write!(f, "SMMU is not fully enabled (CR0ACK {cr0ack:#x})"),
            AdoptError::GlobalBypass { gbpa } => write!(f, "SMMU_GBPA {gbpa:#x} allows global bypass"),
            AdoptError::GlobalError { active } => write!(f, "SMMU has active global errors {active:#x}"),
            AdoptError::RegisterMismatch { register, expected, found } => {
                write!(f, "{register:?} is {found:#x}, preserved state says {expected:#x}")
            }
            AdoptError::StreamTableFormat { format, split, log2size } => {
                write!(f, "unsupported stream table: format {format}, split {split}, log2size {log2size}")
            }
            AdoptError::QueueSize { queue, log2 } => write!(f, "{queue} of 2^{log2} entries is unsupported"),
            AdoptError::QueuePointer { queue, value } => write!(f, "{queue} pointer {value:#x} is malformed"),
            AdoptError::CommandQueueBusy { prod, cons } => {
                write!(f, "command queue was not drained (prod {prod:#x}, cons {cons:#x})")
            }
            AdoptError::Misaligned { region, pa, align } => {
                write!(f, "{region:?} at {pa:#x} is not {align:#x}-aligned")
            }
            AdoptError::OutsideRam { region, pa, bytes } => {
                write!(f, "{region:?} at {pa:#x} (+{bytes:#x}) is not inside RAM")
            }
            AdoptError::Overlap { first, second } => write!(f, "{first:?} overlaps {second:?}"),
            AdoptError::BadL1Descriptor { index, value } => {
                write!(f, "L1 stream table descriptor {index} is malformed: {value:#x}")
            }
            AdoptError::BadSte { stream_id } => write!(f, "STE for StreamID {stream_id:#x} is malformed"),
            AdoptError::UnexpectedSte { stream_id } => {
                write!(f, "STE for StreamID {stream_id:#x} does not match the preserved assignments")
            }
            AdoptError::MissingSte { stream_id } => {
                write!(f, "StreamID {stream_id:#x} is assigned but its STE does not translate")
            }
            AdoptError::DuplicateAssignment { stream_id } => {
                write!(f, "StreamID {stream_id:#x} is assigned twice")
            }
            AdoptError::StreamIdOutOfRange { stream_id } => {
                write!(f, "StreamID {stream_id:#x} is outside the stream table")
            }
            AdoptError::VmidOutOfRange { vmid } => write!(f, "VMID {vmid} is wider than the SMMU supports"),
        }
    }
}
