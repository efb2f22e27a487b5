//! The arch-independent core of the hypervisor.
//!
//! Everything here builds for the host as well as for the bare-metal
//! targets, so it is unit-tested with `cargo test`. The image itself
//! (`src/main.rs` and `src/arch/<arch>/`) supplies the registers,
//! instructions and exception entry, and calls into this core.
#![no_std]

extern crate alloc;

pub mod console;
pub mod events;
pub mod frames;
pub mod guest_console;
pub mod guest_dtb;
pub mod guest_image;
pub mod hypercall;
pub mod live_update;
pub mod machine;
pub mod partition;
pub mod pci;
pub mod preserved;
pub mod records;
pub mod sched;
pub mod stage2;

/// Each architecture's guest policy that is pure logic, host-tested here:
/// the image's arch code (`src/arch/<arch>/`, built only into the image)
/// applies it. The files live with the rest of their arch.
pub mod arch {
    /// aarch64: the virtual GICv3 and the ID registers a guest sees.
    #[path = "aarch64/policy/mod.rs"]
    pub mod aarch64;
    /// x86_64: VMX capabilities and controls, exit decoding, and what a
    /// guest sees (CPUID, MSRs, control registers, its boot protocol).
    #[path = "x86_64/policy/mod.rs"]
    pub mod x86_64;
}

/// The version this image reports in `hv: boot` and to guests. The
/// launcher overrides it (`HV_VERSION`) to build distinct update images.
pub const VERSION: &str = match option_env!("HV_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// Build identifier (the launcher passes the git revision as `HV_BUILD_ID`).
pub const BUILD_ID: &str = match option_env!("HV_BUILD_ID") {
    Some(v) => v,
    None => "dev",
};

/// What this image writes into a handover, record by record (id, name,
/// the oldest reader version it needs), for the check before the freeze
/// (`loader::image_readers`).
pub const WRITES: [loader::image_readers::Written; 7] = {
    use kho::StateRecord;
    use loader::image_readers::Written;
    use records::{ConsoleRecord, HvRecord, IommuRecord, LapicRecord, PartitionRecord, VcpuRecord, VgicRecord};
    [
        Written { id: HvRecord::ID, name: HvRecord::NAME, min_reader: HvRecord::MIN_READER_VERSION },
        Written {
            id: PartitionRecord::ID,
            name: PartitionRecord::NAME,
            min_reader: PartitionRecord::MIN_READER_VERSION,
        },
        Written { id: VcpuRecord::ID, name: VcpuRecord::NAME, min_reader: VcpuRecord::MIN_READER_VERSION },
        Written { id: IommuRecord::ID, name: IommuRecord::NAME, min_reader: IommuRecord::MIN_READER_VERSION },
        Written { id: VgicRecord::ID, name: VgicRecord::NAME, min_reader: VgicRecord::MIN_READER_VERSION },
        Written { id: ConsoleRecord::ID, name: ConsoleRecord::NAME, min_reader: ConsoleRecord::MIN_READER_VERSION },
        Written { id: LapicRecord::ID, name: LapicRecord::NAME, min_reader: LapicRecord::MIN_READER_VERSION },
    ]
};

/// What this image reads, as the table it embeds next to its descriptor
/// (`loader::image_readers`): each record from version 1 to the version it
/// writes, and the vCPU-context layouts of both architectures.
pub const READS: [loader::image_readers::ReadRange; 9] = {
    use kho::StateRecord;
    use loader::image_readers::{ReadRange, CONTEXT_FAMILY};
    use records::{ConsoleRecord, HvRecord, IommuRecord, LapicRecord, PartitionRecord, VcpuRecord, VgicRecord};
    [
        ReadRange { id: HvRecord::ID, min: 1, max: HvRecord::VERSION },
        ReadRange { id: PartitionRecord::ID, min: 1, max: PartitionRecord::VERSION },
        ReadRange { id: VcpuRecord::ID, min: 1, max: VcpuRecord::VERSION },
        ReadRange { id: IommuRecord::ID, min: 1, max: IommuRecord::VERSION },
        ReadRange { id: VgicRecord::ID, min: 1, max: VgicRecord::VERSION },
        ReadRange { id: ConsoleRecord::ID, min: 1, max: ConsoleRecord::VERSION },
        ReadRange { id: LapicRecord::ID, min: 1, max: LapicRecord::VERSION },
        ReadRange {
            id: CONTEXT_FAMILY | (records::AARCH64_CONTEXT_FORMAT >> 16),
            min: 1,
            max: match option_env!("HV_TEST_READS_CONTEXT_MAX") {
                // Test builds only: an image that claims to read fewer
                // layouts, for the check before the freeze.
                Some(_) => 1,
                None => (records::AARCH64_CONTEXT_FORMAT & 0xffff) as u16,
            },
        },
        ReadRange {
            id: CONTEXT_FAMILY | (records::X86_64_CONTEXT_FORMAT >> 16),
            min: 1,
            max: (records::X86_64_CONTEXT_FORMAT & 0xffff) as u16,
        },
    ]
};

/// The handover ABI versions this image reads. It writes the newest.
pub const HANDOVER_ABI_MIN: u32 = 1;
pub const HANDOVER_ABI_MAX: u32 = kho::HANDOVER_ABI;
