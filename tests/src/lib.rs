//! The one launcher: builds hypervisor images, wraps them for their boot
//! protocol (arm64 Image, GRUB multiboot2 ISO), starts QEMU or Bochs under
//! a timeout with the serial port captured to a log, and parses the serial
//! event protocol (`shared/DESIGN.md` §7). `scripts/run` (through the
//! `hvrun` binary) and the integration tests both use it, so the demo and
//! the tests boot exactly the same way.

pub mod emulator;
pub mod events;
pub mod guests;
pub mod hostile;
pub mod image;
pub mod launch;
pub mod linux;
pub mod soak;
pub mod summary;

use std::fmt;
use std::path::PathBuf;

/// Target architecture of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Aarch64,
    X86_64,
}

impl Arch {
    pub fn triple(self) -> &'static str {
        match self {
            Arch::Aarch64 => "aarch64-unknown-none",
            Arch::X86_64 => "x86_64-unknown-none",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Aarch64 => "aarch64",
            Arch::X86_64 => "x86_64",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "aarch64" | "arm64" => Some(Arch::Aarch64),
            "x86_64" | "x86-64" | "amd64" => Some(Arch::X86_64),
            _ => None,
        }
    }
}

/// Which emulator runs the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    /// QEMU with TCG (aarch64 `virt` at EL2; x86_64 q35 without VMX).
    Qemu,
    /// Bochs with VMX (x86_64 only).
    Bochs,
    /// QEMU with KVM on an Intel host with nested VMX (x86_64 only).
    Kvm,
}

impl Machine {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "qemu" => Some(Machine::Qemu),
            "bochs" => Some(Machine::Bochs),
            "kvm" => Some(Machine::Kvm),
            _ => None,
        }
    }

    /// The default machine for an architecture.
    pub fn default_for(arch: Arch) -> Self {
        match arch {
            Arch::Aarch64 => Machine::Qemu,
            Arch::X86_64 => Machine::Bochs,
        }
    }
}

/// How the emulated machine starts the hypervisor (aarch64 QEMU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Firmware {
    /// QEMU loads the arm64 Image itself (`-kernel`) and hands it a DTB.
    #[default]
    Dtb,
    /// aarch64: edk2 (`-bios QEMU_EFI.fd`) starts the same image as an
    /// EFI application and describes the machine with ACPI, no DTB.
    /// x86_64 under QEMU: OVMF starts GRUB's EFI build from the same ISO,
    /// which loads the multiboot2 image as GRUB for BIOS does.
    Uefi,
}

impl Firmware {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "dtb" => Some(Firmware::Dtb),
            "uefi" => Some(Firmware::Uefi),
            _ => None,
        }
    }
}

/// edk2 for aarch64 QEMU (Debian `qemu-efi-aarch64`, `scripts/setup`).
pub const AARCH64_UEFI_FIRMWARE: &str = "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd";
/// OVMF for x86_64 QEMU q35 (Debian `ovmf`): the code, read-only, and the
/// variable store each run gets a copy of.
pub const X86_64_UEFI_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const X86_64_UEFI_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// Launcher errors, each with a message meant for the user.
#[derive(Debug)]
pub enum LaunchError {
    Io { what: String, err: std::io::Error },
    Build(String),
    Image(String),
    Unsupported(String),
}

impl fmt::Display for LaunchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LaunchError::Io { what, err } => write!(f, "{what}: {err}"),
            LaunchError::Build(m) | LaunchError::Image(m) | LaunchError::Unsupported(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for LaunchError {}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LaunchError {
    let what = what.into();
    move |err| LaunchError::Io { what, err }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// reader (an emulator, a parallel test) never sees a half-written file.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<(), LaunchError> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io_err(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io_err(format!("renaming {}", path.display())))
}

/// The workspace root (the launcher lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map_or(manifest.clone(), std::path::Path::to_path_buf)
}

/// Where images, ISOs and logs go.
pub fn out_dir() -> PathBuf {
    workspace_root().join("target").join("hv")
}
