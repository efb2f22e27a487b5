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
pub mod slots;
pub mod stage2;
pub mod state_table;

/// Each architecture's guest policy that is pure logic, host-tested here:
/// the image's arch code (`src/arch/<arch>/`, built only into the image)
/// applies it. The files live with the rest of their arch.
pub mod arch {
    /// How a class of registers a guest can reach is handled, in each
    /// arch's inventory (`aarch64::traps`, `x86_64::traps`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Handling {
        /// The guest's own: saved and loaded when another vCPU takes the
        /// CPU (or switched by the hardware on entry and exit).
        Switched,
        /// Every access traps and the hypervisor answers.
        Emulated,
        /// Absent: the ID registers / CPUID say so, and accesses raise the
        /// architecture's exception (UNDEFINED, #UD or #GP) in the guest.
        Hidden,
        /// A clock every guest reads alike and none can write: it holds no
        /// guest state.
        Clock,
    }

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

/// The state records this image writes and reads, listed once for
/// [`WRITES`] and [`READS`].
macro_rules! handover_records {
    ($($r:ident),* $(,)?) => {
        /// What this image writes into a handover, record by record (id,
        /// name, the oldest reader version it needs), for the check before
        /// the freeze (`loader::image_readers`).
        pub const WRITES: [loader::image_readers::Written; [$(<records::$r as kho::StateRecord>::ID),*].len()] = {
            use kho::StateRecord;
            [$(loader::image_readers::Written {
                id: records::$r::ID,
                name: records::$r::NAME,
                min_reader: records::$r::MIN_READER_VERSION,
            }),*]
        };
        /// The records' part of [`READS`]: each from version 1 to the
        /// version this image writes.
        const RECORD_READS: [loader::image_readers::ReadRange; WRITES.len()] = {
            use kho::StateRecord;
            [$(loader::image_readers::ReadRange { id: records::$r::ID, min: 1, max: records::$r::VERSION }),*]
        };
    };
}

handover_records!(HvRecord, PartitionRecord, VcpuRecord, IommuRecord, VgicRecord, ConsoleRecord, LapicRecord);

/// What this image reads, as the table it embeds next to its descriptor
/// (`loader::image_readers`): each record from version 1 to the version it
/// writes, the handoff record (written only for images that read it), and
/// the vCPU-context layouts of both architectures.
pub const READS: [loader::image_readers::ReadRange; RECORD_READS.len() + 6] = {
    use kho::StateRecord;
    use loader::image_readers::{ReadRange, CONTEXT_FAMILY};
    let extra = [
        // Written only for an image that reads it (`live_update`).
        ReadRange { id: records::HandoffRecord::ID, min: 1, max: records::HandoffRecord::VERSION },
        // Written only under the x86_64 SVM backend.
        ReadRange { id: records::SvmRecord::ID, min: 1, max: records::SvmRecord::VERSION },
        // Written only while a VT-d unit translates guests' DMA, and then
        // only for an image that reads it (`live_update`).
        ReadRange { id: records::VtdRecord::ID, min: 1, max: records::VtdRecord::VERSION },
        // Written instead of the partition and vCPU nodes, only for an
        // image that reads it (`live_update`).
        ReadRange { id: records::StateTableRecord::ID, min: 1, max: records::StateTableRecord::VERSION },
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
    ];
    let mut out = [ReadRange { id: 0, min: 0, max: 0 }; RECORD_READS.len() + 6];
    let mut i = 0;
    while i < out.len() {
        out[i] = if i < RECORD_READS.len() { RECORD_READS[i] } else { extra[i - RECORD_READS.len()] };
        i += 1;
    }
    out
};

/// The handover ABI versions this image reads. It writes the newest.
pub const HANDOVER_ABI_MIN: u32 = 1;
pub const HANDOVER_ABI_MAX: u32 = kho::HANDOVER_ABI;
