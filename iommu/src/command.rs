//! Commands (§4 "Commands"): each is two little-endian 64-bit words with
//! the opcode in word 0 bits [7:0] (§4.1).

use core::fmt;

use crate::bits::Field;

/// Bytes in a command-queue entry.
pub const COMMAND_BYTES: u64 = 16;

/// Word 0: opcode, bits [7:0].
const OPCODE: Field = Field::new(0, 8);
/// CMD_CFGI_STE (§4.3, configuration invalidation).
const OP_CFGI_STE: u64 = 0x03;
/// CMD_CFGI_STE_RANGE (§4.3); CMD_CFGI_ALL is this opcode with Range = 31.
const OP_CFGI_STE_RANGE: u64 = 0x04;
/// CMD_TLBI_S12_VMALL (§4.4, TLB invalidation).
const OP_TLBI_S12_VMALL: u64 = 0x28;
/// CMD_TLBI_NSNH_ALL (§4.4).
const OP_TLBI_NSNH_ALL: u64 = 0x30;
/// CMD_SYNC (§4.7).
const OP_SYNC: u64 = 0x46;

/// CFGI_STE / CFGI_STE_RANGE word 0: StreamID, bits [63:32].
const CFGI_SID: Field = Field::new(32, 32);
/// CFGI_STE word 1: Leaf, bit 0 — only the STE, not the L1 descriptor.
const CFGI_LEAF: u64 = 1 << 0;
/// CFGI_STE_RANGE word 1: Range, bits [4:0]: 2^(Range+1) StreamIDs.
const CFGI_RANGE: Field = Field::new(0, 5);
/// Range 31 covers every StreamID: CMD_CFGI_ALL (§4.3).
const CFGI_RANGE_ALL: u64 = 31;
/// TLBI word 0: VMID, bits [47:32].
const TLBI_VMID: Field = Field::new(32, 16);
/// CMD_SYNC word 0: CS, bits [13:12]. 0b00 SIG_NONE: completion is
/// observed only through CMDQ_CONS moving past the CMD_SYNC — the SMMU in
/// QEMU `virt` has no MSIs (IDR0.MSI = 0), and polling needs none.
const SYNC_CS: Field = Field::new(12, 2);
const SYNC_CS_SIG_NONE: u64 = 0b00;

/// A command the driver issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// Invalidate cached copies of one STE; without `leaf`, also of the
    /// level-1 descriptor that leads to it.
    CfgiSte { stream_id: u32, leaf: bool },
    /// Invalidate every cached STE and L1 descriptor.
    CfgiAll,
    /// Invalidate every stage-1 and stage-2 TLB entry tagged with `vmid`.
    TlbiS12Vmall { vmid: u16 },
    /// Invalidate every non-secure, non-hypervisor TLB entry.
    TlbiNsnhAll,
    /// Completes once every earlier command has (SIG_NONE: no signal).
    Sync,
}

/// Why two words are not a command this driver issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandDecodeError {
    /// An opcode the driver never issues.
    UnknownOpcode(u8),
    /// The opcode is known but a field holds something the driver never
    /// writes (a reserved bit, a partial range, a signalled CMD_SYNC).
    UnexpectedFields,
}

impl fmt::Display for CommandDecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandDecodeError::UnknownOpcode(op) => write!(f, "unknown command opcode {op:#04x}"),
            CommandDecodeError::UnexpectedFields => write!(f, "command fields the driver never writes"),
        }
    }
}

impl Command {
    /// The two words of the queue entry.
    pub fn encode(self) -> [u64; 2] {
        match self {
            Command::CfgiSte { stream_id, leaf } => {
                [OPCODE.place(OP_CFGI_STE) | CFGI_SID.place(u64::from(stream_id)), if leaf { CFGI_LEAF } else { 0 }]
            }
            Command::CfgiAll => [OPCODE.place(OP_CFGI_STE_RANGE), CFGI_RANGE.place(CFGI_RANGE_ALL)],
            Command::TlbiS12Vmall { vmid } => [OPCODE.place(OP_TLBI_S12_VMALL) | TLBI_VMID.place(u64::from(vmid)), 0],
            Command::TlbiNsnhAll => [OPCODE.place(OP_TLBI_NSNH_ALL), 0],
            Command::Sync => [OPCODE.place(OP_SYNC) | SYNC_CS.place(SYNC_CS_SIG_NONE), 0],
        }
    }

    /// Parses an entry, accepting exactly what [`encode`](Self::encode)
    /// produces (the fake SMMU uses this to consume the driver's queue).
    pub fn decode(words: [u64; 2]) -> Result<Command, CommandDecodeError> {
        let command = match OPCODE.get(words[0]) {
            OP_CFGI_STE => {
                Command::CfgiSte { stream_id: CFGI_SID.get(words[0]) as u32, leaf: words[1] & CFGI_LEAF != 0 }
            }
            OP_CFGI_STE_RANGE => Command::CfgiAll,
            OP_TLBI_S12_VMALL => Command::TlbiS12Vmall { vmid: TLBI_VMID.get(words[0]) as u16 },
            OP_TLBI_NSNH_ALL => Command::TlbiNsnhAll,
            OP_SYNC => Command::Sync,
            other => return Err(CommandDecodeError::UnknownOpcode(other as u8)),
        };
        if command.encode() == words {
            Ok(command)
        } else {
            Err(CommandDecodeError::UnexpectedFields)
        }
    }
}
