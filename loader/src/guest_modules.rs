//! The x86_64 boot manifest: one multiboot2 module per guest, its module
//! command line carrying the guest's description (Multiboot2 spec §3.6.6).
//! In GRUB's configuration:
//!
//! ```text
//! module2 /boot/heartbeat.bin name=heartbeat mem=16 vcpus=1 privileged=0 cmdline=ticks=100
//! ```
//!
//! Words are `key=value`. `name=` and `mem=` (MiB, or with a `M`/`MiB`/`G`/
//! `GiB` suffix) are required; `vcpus=` (1) and `privileged=` (0) are
//! optional; `cmdline=` is last and takes the rest of the line (the
//! guest's own command line). GRUB puts the module's path first; a first
//! word without `=` is taken to be that path and skipped. The image
//! format comes from the module's bytes ([`detect_format`]). Everything is
//! validated: a malformed description is a typed error naming the module.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use crate::manifest::{GuestSpec, ImageFormat, MAX_GUESTS, MAX_GUEST_MEM_MIB, MAX_VCPUS};
use crate::{BootModule, PhysRange};

const MAX_NAME: usize = 32;
const MAX_CMDLINE: usize = 1024;
const CMDLINE_KEY: &str = "cmdline=";
/// ELF magic (ELF spec, e_ident[EI_MAG0..EI_MAG3]).
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// arm64 `Image` header magic at offset 56 (Linux arm64 booting.rst).
const ARM64_MAGIC: &[u8; 4] = b"ARM\x64";
const ARM64_MAGIC_OFFSET: usize = 56;

/// Why a module's description was refused. `module` counts from 1, in
/// boot-information order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModuleError {
    MissingKey { module: usize, key: &'static str },
    UnknownKey { module: usize, key: String },
    BadValue { module: usize, key: &'static str },
    DuplicateName { module: usize },
    TooManyGuests,
    NoGuests,
}

impl fmt::Display for ModuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingKey { module, key } => write!(f, "module {module}: missing {key}="),
            Self::UnknownKey { module, key } => write!(f, "module {module}: unknown key {key}"),
            Self::BadValue { module, key } => write!(f, "module {module}: bad value for {key}"),
            Self::DuplicateName { module } => write!(f, "module {module}: duplicate guest name"),
            Self::TooManyGuests => write!(f, "more than {MAX_GUESTS} guest modules"),
            Self::NoGuests => write!(f, "no guest modules"),
        }
    }
}

impl ModuleError {
    /// A short token for events.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingKey { .. } => "missing-key",
            Self::UnknownKey { .. } => "unknown-key",
            Self::BadValue { .. } => "bad-value",
            Self::DuplicateName { .. } => "duplicate-name",
            Self::TooManyGuests => "too-many-guests",
            Self::NoGuests => "no-guests",
        }
    }
}

/// The format of an image from its first bytes.
pub fn detect_format(head: &[u8]) -> ImageFormat {
    if head.starts_with(ELF_MAGIC) {
        ImageFormat::Elf
    } else if head.get(ARM64_MAGIC_OFFSET..ARM64_MAGIC_OFFSET + ARM64_MAGIC.len()) == Some(ARM64_MAGIC.as_slice()) {
        ImageFormat::Arm64Image
    } else {
        ImageFormat::Flat
    }
}

fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// MiB, with an optional binary-unit suffix.
fn mebibytes(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let scale = match unit {
        "" | "M" | "MiB" => 1,
        "G" | "GiB" => 1024,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(scale)
}

fn valid_name(v: &str) -> bool {
    !v.is_empty() && v.len() <= MAX_NAME && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Parses one module's command line into the guest it describes; `image`
/// is the module's memory and `format` its detected format.
pub fn parse_module(
    module: usize,
    text: &str,
    image: PhysRange,
    format: ImageFormat,
) -> Result<GuestSpec, ModuleError> {
    let (fields, cmdline) = match text.find(CMDLINE_KEY) {
        Some(i) => (&text[..i], text[i + CMDLINE_KEY.len()..].trim()),
        None => (text, ""),
    };
    if cmdline.len() > MAX_CMDLINE {
        return Err(ModuleError::BadValue { module, key: "cmdline" });
    }
    let bad = |key| ModuleError::BadValue { module, key };
    let (mut name, mut mem_mib, mut vcpus, mut privileged) = (None, None, 1u32, false);
    let mut devices = Vec::new();
    for (i, word) in fields.split_ascii_whitespace().enumerate() {
        let Some((key, value)) = word.split_once('=') else {
            if i == 0 {
                continue;
            }
            return Err(ModuleError::UnknownKey { module, key: word.to_string() });
        };
        match key {
            "name" => name = Some(valid_name(value).then(|| value.to_string()).ok_or(bad("name"))?),
            "mem" => {
                mem_mib = Some(mebibytes(value).filter(|m| (1..=MAX_GUEST_MEM_MIB).contains(m)).ok_or(bad("mem"))?);
            }
            "vcpus" => {
                vcpus = number(value)
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|n| (1..=MAX_VCPUS).contains(n))
                    .ok_or(bad("vcpus"))?;
            }
            "privileged" => {
                privileged = match value {
                    "0" => false,
                    "1" => true,
                    _ => return Err(bad("privileged")),
                };
            }
            // A PCI function assigned to the guest (BB:DD.F), as in the
            // aarch64 manifest; repeatable up to MAX_DEVICES.
            "device" => {
                if devices.len() == crate::manifest::MAX_DEVICES {
                    return Err(bad("device"));
                }
                devices.push(crate::manifest::parse_bdf(value).ok_or(bad("device"))?);
            }
            other => return Err(ModuleError::UnknownKey { module, key: other.to_string() }),
        }
    }
    Ok(GuestSpec {
        name: name.ok_or(ModuleError::MissingKey { module, key: "name" })?,
        image,
        format,
        mem_mib: mem_mib.ok_or(ModuleError::MissingKey { module, key: "mem" })?,
        vcpus,
        privileged,
        initrd: None,
        devices,
        cmdline: cmdline.to_string(),
    })
}

/// Every guest the boot modules describe, in module order. `format_of`
/// reads a module's first bytes (see [`detect_format`]).
pub fn guests_from_modules(
    modules: &[BootModule],
    mut format_of: impl FnMut(PhysRange) -> ImageFormat,
) -> Result<Vec<GuestSpec>, ModuleError> {
    if modules.is_empty() {
        return Err(ModuleError::NoGuests);
    }
    if modules.len() > MAX_GUESTS {
        return Err(ModuleError::TooManyGuests);
    }
    let mut guests: Vec<GuestSpec> = Vec::new();
    for (i, m) in modules.iter().enumerate() {
        let spec = parse_module(i + 1, &m.name, m.range, format_of(m.range))?;
        if guests.iter().any(|g| g.name == spec.name) {
            return Err(ModuleError::DuplicateName { module: i + 1 });
        }
        guests.push(spec);
    }
    Ok(guests)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const IMAGE: PhysRange = PhysRange::new(0x20_0000, 0x3000);

    fn parse(text: &str) -> Result<GuestSpec, ModuleError> {
        parse_module(1, text, IMAGE, ImageFormat::Flat)
    }

    #[test]
    fn grub_style_line_with_path_first() {
        let g = parse("/boot/hb.bin name=hb mem=16 vcpus=2 privileged=1 cmdline=ticks=40  x=y ").unwrap();
        assert_eq!(g.name, "hb");
        assert_eq!((g.mem_mib, g.vcpus, g.privileged), (16, 2, true));
        assert_eq!(g.cmdline, "ticks=40  x=y");
        assert_eq!(g.image, IMAGE);
        assert_eq!(g.initrd, None);
    }

    #[test]
    fn devices_are_assigned_by_bdf() {
        let g = parse("name=d mem=16 device=00:03.0 device=01:1f.7 cmdline=transfers=4").unwrap();
        assert_eq!(g.devices, [(0, 3, 0), (1, 0x1f, 7)]);
        assert_eq!(g.cmdline, "transfers=4");
        assert_eq!(parse("name=d mem=16 device=00:20.0"), Err(ModuleError::BadValue { module: 1, key: "device" }));
        let five = "name=d mem=16 device=00:01.0 device=00:02.0 device=00:03.0 device=00:04.0 device=00:05.0";
        assert_eq!(parse(five), Err(ModuleError::BadValue { module: 1, key: "device" }));
    }

    #[test]
    fn defaults_units_and_no_path() {
        let g = parse("name=a mem=1G").unwrap();
        assert_eq!((g.mem_mib, g.vcpus, g.privileged, g.cmdline.as_str()), (1024, 1, false, ""));
        assert_eq!(parse("name=a mem=8MiB").unwrap().mem_mib, 8);
        assert_eq!(parse("name=a mem=8M").unwrap().mem_mib, 8);
    }

    #[test]
    fn errors_are_specific() {
        assert_eq!(parse("/boot/x mem=4"), Err(ModuleError::MissingKey { module: 1, key: "name" }));
        assert_eq!(parse("name=a"), Err(ModuleError::MissingKey { module: 1, key: "mem" }));
        assert_eq!(parse("name=a mem=0"), Err(ModuleError::BadValue { module: 1, key: "mem" }));
        assert_eq!(parse("name=a mem=4T"), Err(ModuleError::BadValue { module: 1, key: "mem" }));
        assert_eq!(parse("name=a mem=99999999999999999999"), Err(ModuleError::BadValue { module: 1, key: "mem" }));
        assert_eq!(parse("name=a mem=4 vcpus=9"), Err(ModuleError::BadValue { module: 1, key: "vcpus" }));
        assert_eq!(parse("name=a/b mem=4"), Err(ModuleError::BadValue { module: 1, key: "name" }));
        assert_eq!(parse("name=a mem=4 privileged=yes"), Err(ModuleError::BadValue { module: 1, key: "privileged" }));
        assert_eq!(parse("name=a mem=4 colour=red"), Err(ModuleError::UnknownKey { module: 1, key: "colour".into() }));
        assert_eq!(
            parse("/boot/x stray name=a mem=4"),
            Err(ModuleError::UnknownKey { module: 1, key: "stray".into() })
        );
        let long = alloc::format!("name=a mem=4 cmdline={}", "x".repeat(MAX_CMDLINE + 1));
        assert_eq!(parse(&long), Err(ModuleError::BadValue { module: 1, key: "cmdline" }));
        assert_eq!(ModuleError::NoGuests.reason(), "no-guests");
    }

    #[test]
    fn module_lists() {
        let m = |name: &str| BootModule { range: IMAGE, name: name.into() };
        let two = [m("/boot/a name=a mem=4"), m("/boot/b name=b mem=8 cmdline=z=1")];
        let g = guests_from_modules(&two, |_| ImageFormat::Elf).unwrap();
        assert_eq!((g[0].name.as_str(), g[1].name.as_str(), g[1].cmdline.as_str()), ("a", "b", "z=1"));
        assert_eq!(g[0].format, ImageFormat::Elf);
        let dup = [m("name=a mem=4"), m("name=a mem=4")];
        assert_eq!(guests_from_modules(&dup, |_| ImageFormat::Flat), Err(ModuleError::DuplicateName { module: 2 }));
        assert_eq!(guests_from_modules(&[], |_| ImageFormat::Flat), Err(ModuleError::NoGuests));
        let many: Vec<_> = (0..=MAX_GUESTS).map(|i| m(&alloc::format!("name=g{i} mem=1"))).collect();
        assert_eq!(guests_from_modules(&many, |_| ImageFormat::Flat), Err(ModuleError::TooManyGuests));
        let bad = [m("name=a mem=4"), m("name=b")];
        assert_eq!(
            guests_from_modules(&bad, |_| ImageFormat::Flat),
            Err(ModuleError::MissingKey { module: 2, key: "mem" })
        );
    }

    #[test]
    fn formats() {
        assert_eq!(detect_format(b"\x7fELF\x02\x01"), ImageFormat::Elf);
        let mut arm = [0u8; 64];
        arm[56..60].copy_from_slice(b"ARM\x64");
        assert_eq!(detect_format(&arm), ImageFormat::Arm64Image);
        assert_eq!(detect_format(&[0xfa, 0xfc]), ImageFormat::Flat);
        assert_eq!(detect_format(&[]), ImageFormat::Flat);
    }

    proptest! {
        #[test]
        fn random_lines_never_panic(text in "\\PC{0,200}") {
            let _ = parse(&text);
        }

        #[test]
        fn random_words_never_panic(words in proptest::collection::vec("[a-z]{0,8}=?[0-9a-zA-Z/.]{0,8}", 0..8)) {
            let _ = parse(&words.join(" "));
        }
    }
}
