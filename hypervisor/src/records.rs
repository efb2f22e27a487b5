//! The state records the machine writes into the handover and reads back
//! in the next image (`kho/ABI.md`): `kho` state records, versioned and
//! checksummed, fields declared once. The arch code fills a vCPU's register
//! context into an opaque byte array with its own format number, so these
//! records need no arch knowledge.

use hvcall::PartitionState;
use kho::state_record;
use loader::manifest::ImageFormat;

use crate::sched::VcpuState;

/// The vCPU-context formats the architectures write (upper 16 bits the
/// arch, lower the layout): `kho/ABI.md` §4.6 gives the layouts.
pub const AARCH64_CONTEXT_FORMAT: u32 = 0x0a64_0002;
pub const X86_64_CONTEXT_FORMAT: u32 = 0x8664_0001;

/// Bytes reserved for a vCPU's register context in [`VcpuRecord`].
pub const CONTEXT_BYTES: usize = 2048;
/// Bytes of a partition's command line kept for SYSTEM_RESET.
pub const CMDLINE_BYTES: usize = 256;

state_record! {
    /// The hypervisor-wide state: when the blackout started and what the
    /// outgoing image measured.
    pub struct HvRecord {
        const ID = 0x0001_0001;
        const NAME = "hv";
        const VERSION = 1;
        const MIN_READER_VERSION = 1;
        /// Counter value (CNTVCT / TSC) when the first vCPU was stopped.
        pub freeze_counter: u64 [since 1],
        /// The counter's frequency in Hz.
        pub counter_hz: u64 [since 1],
        pub cpus: u32 [since 1],
        pub partitions: u32 [since 1],
        pub vcpus: u32 [since 1],
        /// Guest images that must not be freed (SYSTEM_RESET reloads them).
        pub images_preserved: bool [since 1],
    }
}

state_record! {
    /// One partition.
    pub struct PartitionRecord {
        const ID = 0x0001_0002;
        const NAME = "partition";
        const VERSION = 1;
        const MIN_READER_VERSION = 1;
        pub id: u32 [since 1],
        pub name: [u8; 32] [since 1],
        pub privileged: bool [since 1],
        /// `hvcall::PartitionState` as its wire value.
        pub state: u32 [since 1],
        pub ram_host_base: u64 [since 1],
        pub ram_size: u64 [since 1],
        pub stage2_root: u64 [since 1],
        pub vmid: u32 [since 1],
        pub vcpus: u32 [since 1],
        /// `loader::manifest::ImageFormat` as 0 flat, 1 arm64 Image, 2 ELF.
        pub image_format: u32 [since 1],
        pub image_base: u64 [since 1],
        pub image_size: u64 [since 1],
        pub initrd_base: u64 [since 1],
        pub initrd_size: u64 [since 1],
        pub cmdline_len: u32 [since 1],
        pub cmdline: [u8; CMDLINE_BYTES] [since 1],
    }
}

state_record! {
    /// One vCPU: scheduling state plus the arch register context.
    /// Version 2 adds `pending_private`; version-1 readers still read
    /// `pending`, which keeps its version-1 meaning.
    pub struct VcpuRecord {
        const ID = 0x0001_0003;
        const NAME = "vcpu";
        const VERSION = 2;
        const MIN_READER_VERSION = 1;
        pub partition: u32 [since 1],
        pub index: u32 [since 1],
        /// Physical CPU it is pinned to.
        pub pcpu: u32 [since 1],
        /// `sched::VcpuState` as 0 off, 1 runnable, 2 waiting, 3 stopped.
        pub state: u32 [since 1],
        /// Virtual interrupts not yet injected, in version 1's terms (on
        /// aarch64: bits 0-15 SGIs, bit 16 the virtual timer).
        pub pending: u32 [since 1],
        /// Identifies the layout of `context` (arch and version).
        pub context_format: u32 [since 1],
        pub context_len: u32 [since 1],
        pub context: [u8; CONTEXT_BYTES] [since 1],
        /// The same, in the machine's terms (on aarch64 a bit per private
        /// INTID: SGIs 0-15, PPIs 16-31).
        pub pending_private: u32 [since 2],
    }
}

/// Bytes of a virtual GIC's state in [`VgicRecord`]: the distributor and
/// up to 8 redistributors (`arch::aarch64::vgic` encodings).
pub const VGIC_STATE_BYTES: usize = 1024;

state_record! {
    /// A partition's virtual GICv3 (aarch64): the distributor's encoding,
    /// then each vCPU's redistributor in vCPU order.
    pub struct VgicRecord {
        const ID = 0x0001_0005;
        const NAME = "vgic";
        const VERSION = 1;
        const MIN_READER_VERSION = 1;
        pub vcpus: u32 [since 1],
        pub len: u32 [since 1],
        pub state: [u8; VGIC_STATE_BYTES] [since 1],
    }
}

/// Most SMMU stream assignments the handover carries.
pub const MAX_IOMMU_ASSIGNMENTS: usize = 16;
/// Bytes per assignment in [`IommuRecord::assignments`]: stream id (u32),
/// VMID (u16), 2 reserved, stage-2 root (u64); little-endian.
const ASSIGNMENT_BYTES: usize = 16;

state_record! {
    /// The SMMUv3 driver's state (`iommu::SmmuState`): where its stream
    /// table and queues are, and which streams are assigned. The next image
    /// adopts the running SMMU from it without resetting it.
    pub struct IommuRecord {
        const ID = 0x0001_0004;
        const NAME = "smmu";
        const VERSION = 1;
        const MIN_READER_VERSION = 1;
        pub strtab_base: u64 [since 1],
        pub strtab_format: u32 [since 1],
        pub strtab_split: u32 [since 1],
        pub strtab_log2size: u32 [since 1],
        pub cmdq_base: u64 [since 1],
        pub cmdq_log2size: u32 [since 1],
        pub cmdq_prod: u32 [since 1],
        pub cmdq_cons: u32 [since 1],
        pub evtq_base: u64 [since 1],
        pub evtq_log2size: u32 [since 1],
        pub evtq_cons: u32 [since 1],
        pub assignment_count: u32 [since 1],
        pub assignments: [u8; MAX_IOMMU_ASSIGNMENTS * ASSIGNMENT_BYTES] [since 1],
    }
}

impl IommuRecord {
    /// Encodes the driver state; `None` if it has too many assignments.
    pub fn from_state(s: &iommu::SmmuState) -> Option<Self> {
        if s.assignments.len() > MAX_IOMMU_ASSIGNMENTS {
            return None;
        }
        let mut assignments = [0u8; MAX_IOMMU_ASSIGNMENTS * ASSIGNMENT_BYTES];
        for (a, chunk) in s.assignments.iter().zip(assignments.chunks_exact_mut(ASSIGNMENT_BYTES)) {
            chunk[..4].copy_from_slice(&a.stream_id.to_le_bytes());
            chunk[4..6].copy_from_slice(&a.vmid.to_le_bytes());
            chunk[8..].copy_from_slice(&a.s2_root.to_le_bytes());
        }
        Some(Self {
            strtab_base: s.strtab_base,
            strtab_format: u32::from(s.strtab_format),
            strtab_split: u32::from(s.strtab_split),
            strtab_log2size: u32::from(s.strtab_log2size),
            cmdq_base: s.cmdq_base,
            cmdq_log2size: u32::from(s.cmdq_log2size),
            cmdq_prod: s.cmdq_prod,
            cmdq_cons: s.cmdq_cons,
            evtq_base: s.evtq_base,
            evtq_log2size: u32::from(s.evtq_log2size),
            evtq_cons: s.evtq_cons,
            assignment_count: s.assignments.len() as u32,
            assignments,
        })
    }

    /// Decodes the driver state; `None` if a field is out of range. The
    /// driver's `adopt` validates the addresses against the live SMMU.
    pub fn to_state(&self) -> Option<iommu::SmmuState> {
        let small = |v: u32| u8::try_from(v).ok();
        let count = usize::try_from(self.assignment_count).ok().filter(|&n| n <= MAX_IOMMU_ASSIGNMENTS)?;
        let assignments = self
            .assignments
            .chunks_exact(ASSIGNMENT_BYTES)
            .take(count)
            .map(|c| {
                let mut sid = [0u8; 4];
                let mut vmid = [0u8; 2];
                let mut root = [0u8; 8];
                sid.copy_from_slice(&c[..4]);
                vmid.copy_from_slice(&c[4..6]);
                root.copy_from_slice(&c[8..]);
                iommu::Assignment {
                    stream_id: u32::from_le_bytes(sid),
                    vmid: u16::from_le_bytes(vmid),
                    s2_root: u64::from_le_bytes(root),
                }
            })
            .collect();
        Some(iommu::SmmuState {
            strtab_base: self.strtab_base,
            strtab_format: small(self.strtab_format)?,
            strtab_split: small(self.strtab_split)?,
            strtab_log2size: small(self.strtab_log2size)?,
            cmdq_base: self.cmdq_base,
            cmdq_log2size: small(self.cmdq_log2size)?,
            cmdq_prod: self.cmdq_prod,
            cmdq_cons: self.cmdq_cons,
            evtq_base: self.evtq_base,
            evtq_log2size: small(self.evtq_log2size)?,
            evtq_cons: self.evtq_cons,
            assignments,
        })
    }
}

state_record! {
    /// The machine's state table (`crate::state_table`, `kho/ABI.md`
    /// §4.7): where every partition's and vCPU's entry is, in the
    /// preserved range the `hv` node names `pages-table`, and the CRC-32
    /// over it. Written instead of the `partitions/<id>` and `vcpus/<n>`
    /// nodes, and only for an image that reads it.
    pub struct StateTableRecord {
        const ID = 0x0001_000b;
        const NAME = "table";
        const VERSION = 1;
        const MIN_READER_VERSION = 1;
        /// The entries' layout (`state_table::LAYOUT`).
        pub layout: u32 [since 1],
        pub partitions: u32 [since 1],
        pub vcpus: u32 [since 1],
        /// Bytes from one partition entry to the next; the vCPU entries
        /// follow the last partition entry.
        pub partition_stride: u32 [since 1],
        pub vcpu_stride: u32 [since 1],
        /// Physical address of the table: the start of `pages-table`.
        pub base: u64 [since 1],
        /// Bytes of the table: partitions * partition_stride + vcpus *
        /// vcpu_stride.
        pub bytes: u64 [since 1],
        /// CRC-32 (§4.1) over those bytes.
        pub crc32: u32 [since 1],
    }
}

/// Bytes of a partition's unfinished console line in [`ConsoleRecord`].
pub const CONSOLE_LINE_BYTES: usize = 256;

state_record! {
    /// A partition's console line not yet ended (`guest_console::LineBuffer`):
    /// the bytes since its last newline, printed by the next image once
    /// the guest ends the line. Stored next to the partition's record.
    pub struct ConsoleRecord {
        const ID = 0x0001_0006;
        const NAME = "console";
        const VERSION = 1;
        const MIN_READER_VERSION = 1;
        /// Bytes of `line` in use (at most [`CONSOLE_LINE_BYTES`]).
        pub len: u32 [since 1],
        pub line: [u8; CONSOLE_LINE_BYTES] [since 1],
    }
}

/// Bytes of a partition's local APICs in [`LapicRecord`]: up to 12 vCPUs
/// of `arch::x86_64::lapic::STATE_LEN` bytes each.
pub const LAPIC_STATE_BYTES: usize = 2048;
/// Bytes of [`LapicRecord::startup`]: two per vCPU, up to 16 vCPUs.
pub const LAPIC_STARTUP_BYTES: usize = 32;

state_record! {
    /// A partition's virtual local APICs (x86_64), each vCPU's encoding in
    /// vCPU order (`arch::x86_64::lapic::Lapic::encode`). Stored next to
    /// the partition's record. Version 2 adds where each vCPU is in the
    /// INIT-SIPI protocol; a version-1 reader ignores it (its image starts
    /// no vCPU but the first).
    pub struct LapicRecord {
        const ID = 0x0001_0007;
        const NAME = "lapic";
        const VERSION = 2;
        const MIN_READER_VERSION = 1;
        pub vcpus: u32 [since 1],
        pub len: u32 [since 1],
        pub state: [u8; LAPIC_STATE_BYTES] [since 1],
        /// Per vCPU, in vCPU order, `arch::x86_64::startup::Startup::encode`:
        /// a state (1 running, 2 waiting for a SIPI, 3 a SIPI received and
        /// not yet carried out) and the SIPI's vector; all zero from a
        /// version-1 writer, and beyond `vcpus`.
        pub startup: [u8; LAPIC_STARTUP_BYTES] [since 2],
    }
}

state_record! {
    /// The x86_64 SVM backend's machine-wide state, written only by an
    /// image running its guests under AMD SVM: its presence says the vCPU
    /// contexts' control-page word is a VMCB, adopted in place, and its
    /// absence that it is a VMCS region. The reader refuses a handover
    /// from the other backend.
    pub struct SvmRecord {
        const ID = 0x0001_0009;
        const NAME = "svm";
        const VERSION = 1;
        const MIN_READER_VERSION = 1;
        /// How the host's local APIC timer bounds time slices: its rate in
        /// Hz in one-shot mode, or `u64::MAX` for TSC-deadline mode
        /// (measured at first boot; the blackout has no time to measure).
        pub apic_timer_hz: u64 [since 1],
    }
}

/// Most VT-d assignments the handover carries.
pub const MAX_VTD_ASSIGNMENTS: usize = 16;
/// Bytes per assignment in [`VtdRecord::assignments`]: requester id
/// (u16), domain (u16), partition id (u32), second-level table root
/// (u64), BAR0 address (u64) and size (u64); little-endian.
pub const VTD_ASSIGNMENT_BYTES: usize = 32;

state_record! {
    /// The x86_64 VT-d unit's state (`iommu::vtd::VtdState`) and its
    /// assignments: the next image adopts the translating unit without
    /// stopping it, and each guest's second-level table and BAR mapping.
    /// Written only while the unit is on (a guest has a device).
    pub struct VtdRecord {
        const ID = 0x0001_000a;
        const NAME = "vtd";
        const VERSION = 1;
        const MIN_READER_VERSION = 1;
        /// The unit's register set (its DMAR DRHD base).
        pub register_base: u64 [since 1],
        pub root: u64 [since 1],
        pub queue: u64 [since 1],
        pub status: u64 [since 1],
        /// The invalidation queue's tail (descriptor index).
        pub tail: u32 [since 1],
        pub assignment_count: u32 [since 1],
        pub assignments: [u8; MAX_VTD_ASSIGNMENTS * VTD_ASSIGNMENT_BYTES] [since 1],
    }
}

/// One VT-d assignment, as [`VtdRecord`] carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VtdAssignment {
    pub source: u16,
    pub domain: u16,
    pub partition: u32,
    pub table: u64,
    pub bar_base: u64,
    pub bar_size: u64,
}

impl VtdRecord {
    /// Encodes `assignments` after the unit's fields; `None` if there are
    /// too many.
    pub fn encode(register_base: u64, state: &iommu::vtd::VtdState, assignments: &[VtdAssignment]) -> Option<Self> {
        if assignments.len() > MAX_VTD_ASSIGNMENTS {
            return None;
        }
        let mut bytes = [0u8; MAX_VTD_ASSIGNMENTS * VTD_ASSIGNMENT_BYTES];
        for (a, chunk) in assignments.iter().zip(bytes.chunks_exact_mut(VTD_ASSIGNMENT_BYTES)) {
            chunk[0..2].copy_from_slice(&a.source.to_le_bytes());
            chunk[2..4].copy_from_slice(&a.domain.to_le_bytes());
            chunk[4..8].copy_from_slice(&a.partition.to_le_bytes());
            chunk[8..16].copy_from_slice(&a.table.to_le_bytes());
            chunk[16..24].copy_from_slice(&a.bar_base.to_le_bytes());
            chunk[24..32].copy_from_slice(&a.bar_size.to_le_bytes());
        }
        Some(Self {
            register_base,
            root: state.root,
            queue: state.queue,
            status: state.status,
            tail: state.tail,
            assignment_count: assignments.len() as u32,
            assignments: bytes,
        })
    }

    /// The unit's state.
    pub fn state(&self) -> iommu::vtd::VtdState {
        iommu::vtd::VtdState { root: self.root, queue: self.queue, status: self.status, tail: self.tail }
    }

    /// The assignments; `None` if the count is out of range.
    pub fn decode_assignments(&self) -> Option<alloc::vec::Vec<VtdAssignment>> {
        let n = usize::try_from(self.assignment_count).ok().filter(|&n| n <= MAX_VTD_ASSIGNMENTS)?;
        let word = |c: &[u8], at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&c[at..at + 8]);
            u64::from_le_bytes(b)
        };
        Some(
            self.assignments
                .chunks_exact(VTD_ASSIGNMENT_BYTES)
                .take(n)
                .map(|c| VtdAssignment {
                    source: u16::from_le_bytes([c[0], c[1]]),
                    domain: u16::from_le_bytes([c[2], c[3]]),
                    partition: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                    table: word(c, 8),
                    bar_base: word(c, 16),
                    bar_size: word(c, 24),
                })
                .collect(),
        )
    }
}

state_record! {
    /// How the update that wrote this handover hands over what is not
    /// machine state: the CPUs parked in the old image's code, and the old
    /// image itself. Written only for an image whose reader table names
    /// it (so older images, which restart the CPUs through PSCI CPU_OFF /
    /// CPU_ON or INIT-SIPI, are not refused for lack of it).
    pub struct HandoffRecord {
        const ID = 0x0001_0008;
        const NAME = "handoff";
        const VERSION = 1;
        const MIN_READER_VERSION = 1;
        /// Where the parked CPUs wait: one u64 per CPU index, each 0
        /// until the new image writes the entry the CPU should jump to
        /// (with x0 / RDI = its index); 0 if no CPU is parked.
        pub mailbox: u64 [since 1],
        /// The CPU indices parked there (bit n: CPU n).
        pub parked: u64 [since 1],
        /// The old image's code and read-only data, and a hash of them
        /// taken before the freeze ([`code_hash`]): the new image checks
        /// them after the guests resume (the old image must stay intact).
        pub old_code_base: u64 [since 1],
        pub old_code_len: u64 [since 1],
        pub old_code_hash: u64 [since 1],
        /// 1 if the new image was staged in its own slot before the
        /// freeze (nothing copied in the blackout), 0 if it was copied
        /// over the old one.
        pub staged: u32 [since 1],
    }
}

/// A 64-bit hash of `words` (FNV-1a over 64-bit words): cheap enough to
/// run over an image's code after the guests resume, and any change to
/// the bytes changes it with overwhelming likelihood.
pub fn code_hash(words: impl IntoIterator<Item = u64>) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    words.into_iter().fold(OFFSET, |h, w| (h ^ w).wrapping_mul(PRIME))
}

/// Fixed-size text field from a string (truncated, NUL-padded).
pub fn text_field<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let n = s.len().min(N);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
    out
}

/// The string in a NUL-padded field (empty if not UTF-8).
pub fn field_text(field: &[u8]) -> &str {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    core::str::from_utf8(&field[..end]).unwrap_or("")
}

/// `hvcall::PartitionState` as its wire value in a partition record.
pub fn partition_state_code(s: PartitionState) -> u32 {
    s as u32
}

/// A partition state from its record code.
pub fn partition_state_of(code: u32) -> Option<PartitionState> {
    match code {
        0 => Some(PartitionState::Running),
        1 => Some(PartitionState::Stopped),
        2 => Some(PartitionState::Faulted),
        _ => None,
    }
}

/// Record codes of the vCPU scheduling states.
pub fn vcpu_state_code(s: VcpuState) -> u32 {
    match s {
        VcpuState::Off => 0,
        VcpuState::Runnable => 1,
        VcpuState::Waiting => 2,
        VcpuState::Stopped => 3,
    }
}

pub fn vcpu_state_of(code: u32) -> Option<VcpuState> {
    match code {
        0 => Some(VcpuState::Off),
        1 => Some(VcpuState::Runnable),
        2 => Some(VcpuState::Waiting),
        3 => Some(VcpuState::Stopped),
        _ => None,
    }
}

/// Record codes of the guest image formats.
pub fn format_code(f: ImageFormat) -> u32 {
    match f {
        ImageFormat::Flat => 0,
        ImageFormat::Arm64Image => 1,
        ImageFormat::Elf => 2,
    }
}

pub fn format_of(code: u32) -> Option<ImageFormat> {
    match code {
        0 => Some(ImageFormat::Flat),
        1 => Some(ImageFormat::Arm64Image),
        2 => Some(ImageFormat::Elf),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use kho::StateRecord;

    #[test]
    fn vtd_record_carries_the_unit_and_its_assignments() {
        let state = iommu::vtd::VtdState { root: 0x07fd_d000, queue: 0x07fd_e000, status: 0x07fd_f000, tail: 5 };
        let a = VtdAssignment {
            source: 0x18,
            domain: 2,
            partition: 2,
            table: 0x10_0000,
            bar_base: 0xfea0_0000,
            bar_size: 1 << 20,
        };
        let rec = VtdRecord::encode(0xfed9_0000, &state, &[a]).unwrap();
        assert_eq!(rec.state(), state);
        assert_eq!(rec.decode_assignments(), Some(alloc::vec![a]));
        assert!(VtdRecord::encode(0, &state, &[a; MAX_VTD_ASSIGNMENTS + 1]).is_none());
        // A count past the array is refused, not read past.
        let bad = VtdRecord { assignment_count: MAX_VTD_ASSIGNMENTS as u32 + 1, ..rec };
        assert_eq!(bad.decode_assignments(), None);
    }

    #[test]
    fn codes_round_trip() {
        for f in [ImageFormat::Flat, ImageFormat::Arm64Image, ImageFormat::Elf] {
            assert_eq!(format_of(format_code(f)), Some(f));
        }
        for s in [VcpuState::Off, VcpuState::Runnable, VcpuState::Waiting, VcpuState::Stopped] {
            assert_eq!(vcpu_state_of(vcpu_state_code(s)), Some(s));
        }
        for s in [PartitionState::Running, PartitionState::Stopped, PartitionState::Faulted] {
            assert_eq!(partition_state_of(partition_state_code(s)), Some(s));
        }
        assert_eq!(format_of(3), None);
        assert_eq!(vcpu_state_of(4), None);
        assert_eq!(partition_state_of(3), None);
    }

    #[test]
    fn records_round_trip() {
        let mut v = VcpuRecord {
            partition: 2,
            index: 1,
            pcpu: 1,
            state: 2,
            pending: 1 << 16,
            context_format: 0xa64_0001,
            context_len: 3,
            context: [0; CONTEXT_BYTES],
            pending_private: 1 << 27,
        };
        v.context[..3].copy_from_slice(&[1, 2, 3]);
        let bytes = v.encode();
        assert_eq!(VcpuRecord::decode(&bytes).unwrap(), v);
        let p = PartitionRecord {
            id: 1,
            name: text_field("heartbeat"),
            privileged: true,
            state: 0,
            ram_host_base: 0x4900_0000,
            ram_size: 16 << 20,
            stage2_root: 0x5fe0_1000,
            vmid: 1,
            vcpus: 1,
            image_format: 0,
            image_base: 0x5fe1_0000,
            image_size: 0x3000,
            initrd_base: 0,
            initrd_size: 0,
            cmdline_len: 9,
            cmdline: text_field("ticks=100"),
        };
        let decoded = PartitionRecord::decode(&p.encode()).unwrap();
        assert_eq!(field_text(&decoded.name), "heartbeat");
        assert_eq!(field_text(&decoded.cmdline), "ticks=100");
    }

    #[test]
    fn console_record_layout() {
        let mut line = [0u8; CONSOLE_LINE_BYTES];
        line[..3].copy_from_slice(b"abc");
        let rec = ConsoleRecord { len: 3, line };
        let bytes = rec.encode();
        assert_eq!(bytes.len(), 16 + 4 + CONSOLE_LINE_BYTES, "header, len, line");
        assert_eq!(bytes[..4], 0x0001_0006u32.to_be_bytes());
        assert_eq!(bytes[16..23], [0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(ConsoleRecord::decode(&bytes).unwrap(), rec);
    }

    #[test]
    fn lapic_record_version_2_reads_version_1_and_is_read_by_it() {
        let mut startup = [0u8; LAPIC_STARTUP_BYTES];
        startup[..4].copy_from_slice(&[1, 0, 3, 0x08]);
        let v2 = LapicRecord { vcpus: 2, len: 320, state: [7; LAPIC_STATE_BYTES], startup };
        let bytes = v2.encode();
        assert_eq!(LapicRecord::decode(&bytes).unwrap(), v2);
        // A version-1 record: the same header but version 1 and no startup
        // bytes, re-checksummed. Its startup reads as all zero.
        let payload = &bytes[16..bytes.len() - LAPIC_STARTUP_BYTES];
        let mut v1 = std::vec::Vec::new();
        v1.extend_from_slice(&LapicRecord::ID.to_be_bytes());
        v1.extend_from_slice(&1u16.to_be_bytes());
        v1.extend_from_slice(&1u16.to_be_bytes());
        v1.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        let mut crc_input = v1.clone();
        crc_input.extend_from_slice(payload);
        v1.extend_from_slice(&kho::crc32(&crc_input).to_be_bytes());
        v1.extend_from_slice(payload);
        let old = LapicRecord::decode(&v1).unwrap();
        assert_eq!((old.vcpus, old.len, old.startup), (2, 320, [0; LAPIC_STARTUP_BYTES]));
        assert_eq!(LapicRecord::MIN_READER_VERSION, 1, "a version-1 reader still reads version 2");
    }

    #[test]
    fn iommu_record_round_trip() {
        let state = iommu::SmmuState {
            strtab_base: 0x4800_0000,
            strtab_format: 1,
            strtab_split: 8,
            strtab_log2size: 16,
            cmdq_base: 0x4801_0000,
            cmdq_log2size: 8,
            cmdq_prod: 5,
            cmdq_cons: 5,
            evtq_base: 0x4802_0000,
            evtq_log2size: 7,
            evtq_cons: 2,
            assignments: std::vec![iommu::Assignment { stream_id: 0x10, vmid: 7, s2_root: 0x5fc0_7000 }],
        };
        let rec = IommuRecord::from_state(&state).unwrap();
        let back = IommuRecord::decode(&rec.encode()).unwrap();
        assert_eq!(back.to_state().unwrap(), state);
        let bad = IommuRecord { strtab_split: 300, ..back.clone() };
        assert!(bad.to_state().is_none());
        let bad = IommuRecord { assignment_count: 99, ..back };
        assert!(bad.to_state().is_none());
    }
}
