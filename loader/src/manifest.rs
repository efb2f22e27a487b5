//! The boot manifest: which guests to run, written by the launcher next to
//! the guest images in RAM, found through `manifest=<addr>` on the
//! hypervisor's command line.
//!
//! Text, one record per line, NUL-terminated:
//!
//! ```text
//! hvmanifest 1
//! guest name=hb image=0x5e000000 image_size=0x3000 format=flat mem_mib=16 vcpus=1 privileged=0 cmdline=ticks=40
//! ```
//!
//! `cmdline=` is last and takes the rest of the line. Optional keys:
//! `initrd=<addr> initrd_size=<bytes>`.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::fmt::Write;

use crate::PhysRange;

pub const MAGIC_LINE: &str = "hvmanifest 1";
/// Largest manifest accepted.
pub const MAX_MANIFEST_SIZE: usize = 64 << 10;
pub const MAX_GUESTS: usize = 16;
pub const MAX_VCPUS: u32 = 8;
pub const MAX_GUEST_MEM_MIB: u64 = 16 << 10;
const MAX_NAME: usize = 32;
const MAX_CMDLINE: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// Raw bytes, entered at their first byte.
    Flat,
    /// arm64 Linux `Image` (header with `ARM\x64` magic).
    Arm64Image,
    Elf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestSpec {
    pub name: String,
    pub image: PhysRange,
    pub format: ImageFormat,
    pub mem_mib: u64,
    pub vcpus: u32,
    pub privileged: bool,
    pub initrd: Option<PhysRange>,
    /// PCI functions assigned to the guest, as (bus, device, function).
    pub devices: Vec<(u8, u8, u8)>,
    pub cmdline: String,
}

/// Most PCI functions one guest may be given.
pub const MAX_DEVICES: usize = 4;

/// Parses a PCI address `BB:DD.F` (hex, as `lspci` prints it).
pub fn parse_bdf(s: &str) -> Option<(u8, u8, u8)> {
    let (bus, rest) = s.split_once(':')?;
    let (dev, func) = rest.split_once('.')?;
    Some((
        u8::from_str_radix(bus, 16).ok()?,
        u8::from_str_radix(dev, 16).ok().filter(|&d| d < 32)?,
        u8::from_str_radix(func, 16).ok().filter(|&f| f < 8)?,
    ))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestError {
    NotTerminated,
    NotUtf8,
    BadMagic,
    UnknownRecord { line: usize },
    MissingKey { line: usize, key: &'static str },
    UnknownKey { line: usize, key: String },
    BadValue { line: usize, key: &'static str },
    TooManyGuests,
    NoGuests,
    DuplicateName { line: usize },
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotTerminated => write!(f, "no NUL terminator within {MAX_MANIFEST_SIZE} bytes"),
            Self::NotUtf8 => write!(f, "not UTF-8"),
            Self::BadMagic => write!(f, "first line is not '{MAGIC_LINE}'"),
            Self::UnknownRecord { line } => write!(f, "line {line}: unknown record"),
            Self::MissingKey { line, key } => write!(f, "line {line}: missing {key}="),
            Self::UnknownKey { line, key } => write!(f, "line {line}: unknown key {key}"),
            Self::BadValue { line, key } => write!(f, "line {line}: bad value for {key}"),
            Self::TooManyGuests => write!(f, "more than {MAX_GUESTS} guests"),
            Self::NoGuests => write!(f, "no guests"),
            Self::DuplicateName { line } => write!(f, "line {line}: duplicate guest name"),
        }
    }
}

fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

fn guest(line_no: usize, rest: &str) -> Result<GuestSpec, ManifestError> {
    let (fields, cmdline) = match rest.find("cmdline=") {
        Some(i) => (&rest[..i], &rest[i + "cmdline=".len()..]),
        None => (rest, ""),
    };
    if cmdline.len() > MAX_CMDLINE {
        return Err(ManifestError::BadValue { line: line_no, key: "cmdline" });
    }
    let mut name = None;
    let (mut image, mut image_size, mut format, mut mem, mut vcpus) = (None, None, None, None, 1u32);
    let (mut privileged, mut initrd, mut initrd_size) = (false, None, None);
    let mut devices = Vec::new();
    for word in fields.split_ascii_whitespace() {
        let bad = |key| ManifestError::BadValue { line: line_no, key };
        let (k, v) = word.split_once('=').ok_or(bad("field"))?;
        match k {
            "name" => {
                let ok = !v.is_empty()
                    && v.len() <= MAX_NAME
                    && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                name = Some(ok.then(|| v.to_string()).ok_or(bad("name"))?);
            }
            "image" => image = Some(number(v).ok_or(bad("image"))?),
            "image_size" => image_size = Some(number(v).filter(|&s| s > 0).ok_or(bad("image_size"))?),
            "format" => {
                format = Some(match v {
                    "flat" => ImageFormat::Flat,
                    "image" => ImageFormat::Arm64Image,
                    "elf" => ImageFormat::Elf,
                    _ => return Err(bad("format")),
                });
            }
            "mem_mib" => mem = Some(number(v).filter(|&m| (1..=MAX_GUEST_MEM_MIB).contains(&m)).ok_or(bad("mem_mib"))?),
            "vcpus" => {
                vcpus = number(v)
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|n| (1..=MAX_VCPUS).contains(n))
                    .ok_or(bad("vcpus"))?;
            }
            "privileged" => {
                privileged = match v {
                    "0" => false,
                    "1" => true,
                    _ => return Err(bad("privileged")),
                };
            }
            "initrd" => initrd = Some(number(v).ok_or(bad("initrd"))?),
            "initrd_size" => initrd_size = Some(number(v).ok_or(bad("initrd_size"))?),
            "device" => {
                if devices.len() == MAX_DEVICES {
                    return Err(bad("device"));
                }
                devices.push(parse_bdf(v).ok_or(bad("device"))?);
            }
            other => return Err(ManifestError::UnknownKey { line: line_no, key: other.to_string() }),
        }
    }
    let missing = |key| ManifestError::MissingKey { line: line_no, key };
    let image = PhysRange::new(image.ok_or(missing("image"))?, image_size.ok_or(missing("image_size"))?);
    if image.end().is_none() {
        return Err(ManifestError::BadValue { line: line_no, key: "image" });
    }
    let initrd = match (initrd, initrd_size) {
        (Some(base), Some(size)) if size > 0 && base.checked_add(size).is_some() => Some(PhysRange::new(base, size)),
        (None, None) => None,
        _ => return Err(ManifestError::BadValue { line: line_no, key: "initrd" }),
    };
    Ok(GuestSpec {
        name: name.ok_or(missing("name"))?,
        image,
        format: format.ok_or(missing("format"))?,
        mem_mib: mem.ok_or(missing("mem_mib"))?,
        vcpus,
        privileged,
        initrd,
        devices,
        cmdline: cmdline.trim_end().to_string(),
    })
}

/// Parses a NUL-terminated manifest found at the start of `bytes`.
pub fn parse(bytes: &[u8]) -> Result<Vec<GuestSpec>, ManifestError> {
    let window = &bytes[..bytes.len().min(MAX_MANIFEST_SIZE)];
    let end = window.iter().position(|&b| b == 0).ok_or(ManifestError::NotTerminated)?;
    let text = core::str::from_utf8(&window[..end]).map_err(|_| ManifestError::NotUtf8)?;
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim()));
    if lines.next().map(|(_, l)| l) != Some(MAGIC_LINE) {
        return Err(ManifestError::BadMagic);
    }
    let mut guests: Vec<GuestSpec> = Vec::new();
    for (line_no, line) in lines {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix("guest ") else {
            return Err(ManifestError::UnknownRecord { line: line_no });
        };
        let g = guest(line_no, rest)?;
        if guests.iter().any(|o| o.name == g.name) {
            return Err(ManifestError::DuplicateName { line: line_no });
        }
        if guests.len() == MAX_GUESTS {
            return Err(ManifestError::TooManyGuests);
        }
        guests.push(g);
    }
    if guests.is_empty() {
        return Err(ManifestError::NoGuests);
    }
    Ok(guests)
}

/// Why an ESP manifest's files could not all be put in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResolveError<E> {
    /// A file name that is not a plain name (letters, digits, `.`, `-`,
    /// `_`; at most 64): no directories, nothing relative.
    BadFileName { line: usize },
    /// The loader could not load the file `name`.
    Load { line: usize, name: String, error: E },
}

impl<E: fmt::Display> fmt::Display for ResolveError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadFileName { line } => write!(f, "line {line}: a file= name must be a plain file name"),
            Self::Load { line, name, error } => write!(f, "line {line}: {name}: {error}"),
        }
    }
}

/// A manifest read from a file system instead of memory (a UEFI boot from
/// the EFI system partition): guest lines name their image and initrd
/// files (`file=NAME`, `initrd_file=NAME`, in the manifest's directory)
/// instead of giving addresses. `load` puts a file in memory and returns
/// where; the result is the same manifest with `image=`/`image_size=` and
/// `initrd=`/`initrd_size=` in their place, for [`parse`]. Every other
/// word, line and the `cmdline=` tail are kept as they are.
pub fn resolve_files<E>(
    text: &str,
    mut load: impl FnMut(&str) -> Result<PhysRange, E>,
) -> Result<String, ResolveError<E>> {
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let Some(rest) = line.trim().strip_prefix("guest ") else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let (fields, cmdline) = match rest.find("cmdline=") {
            Some(at) => (&rest[..at], Some(&rest[at..])),
            None => (rest, None),
        };
        out.push_str("guest");
        for word in fields.split_ascii_whitespace() {
            let file = word.strip_prefix("file=").map(|n| (n, "image"));
            let file = file.or_else(|| word.strip_prefix("initrd_file=").map(|n| (n, "initrd")));
            let Some((name, key)) = file else {
                out.push(' ');
                out.push_str(word);
                continue;
            };
            let plain = !name.is_empty()
                && name.len() <= 64
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && name != "."
                && name != "..";
            if !plain {
                return Err(ResolveError::BadFileName { line: line_no });
            }
            let at = load(name).map_err(|error| ResolveError::Load { line: line_no, name: name.to_string(), error })?;
            // Writing to a String cannot fail.
            let _ = write!(out, " {key}={:#x} {key}_size={:#x}", at.base, at.size);
        }
        if let Some(c) = cmdline {
            out.push(' ');
            out.push_str(c);
        }
        out.push('\n');
    }
    Ok(out)
}

/// Finds `manifest=<addr>` in a command line.
pub fn address_from_cmdline(cmdline: &str) -> Option<u64> {
    cmdline.split_ascii_whitespace().find_map(|w| w.strip_prefix("manifest=")).and_then(number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &[u8] = b"hvmanifest 1\n\
        guest name=hb image=0x5e000000 image_size=0x3000 format=flat mem_mib=16 vcpus=2 cmdline=ticks=40 x=y\n\
        # comment\n\
        guest name=root image=0x5e100000 image_size=4096 format=elf mem_mib=64 privileged=1 initrd=0x5f000000 initrd_size=0x1000\n\0junk";

    #[test]
    fn parses_two_guests() {
        let g = parse(GOOD).unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].name, "hb");
        assert_eq!(g[0].image, PhysRange::new(0x5e00_0000, 0x3000));
        assert_eq!((g[0].mem_mib, g[0].vcpus, g[0].privileged), (16, 2, false));
        assert_eq!(g[0].cmdline, "ticks=40 x=y");
        assert_eq!(g[1].format, ImageFormat::Elf);
        assert!(g[1].privileged);
        assert_eq!(g[1].initrd, Some(PhysRange::new(0x5f00_0000, 0x1000)));
        assert_eq!(g[1].cmdline, "");
    }

    #[test]
    fn errors_are_specific() {
        assert_eq!(parse(b"hvmanifest 1\n"), Err(ManifestError::NotTerminated));
        assert_eq!(parse(b"hvmanifest 2\n\0"), Err(ManifestError::BadMagic));
        assert_eq!(parse(b"hvmanifest 1\n\0"), Err(ManifestError::NoGuests));
        assert_eq!(parse(b"hvmanifest 1\nvm x\n\0"), Err(ManifestError::UnknownRecord { line: 2 }));
        let e = parse(b"hvmanifest 1\nguest name=a image=1 image_size=1 format=flat\n\0");
        assert_eq!(e, Err(ManifestError::MissingKey { line: 2, key: "mem_mib" }));
        let e = parse(b"hvmanifest 1\nguest name=a image=1 image_size=1 format=flat mem_mib=1 vcpus=99\n\0");
        assert_eq!(e, Err(ManifestError::BadValue { line: 2, key: "vcpus" }));
        let e = parse(b"hvmanifest 1\nguest name=a/b image=1 image_size=1 format=flat mem_mib=1\n\0");
        assert_eq!(e, Err(ManifestError::BadValue { line: 2, key: "name" }));
        let e = parse(b"hvmanifest 1\nguest name=a image=0xffffffffffffffff image_size=2 format=flat mem_mib=1\n\0");
        assert_eq!(e, Err(ManifestError::BadValue { line: 2, key: "image" }));
        let e = parse(b"hvmanifest 1\nguest name=a image=1 image_size=1 format=flat mem_mib=1 colour=red\n\0");
        assert!(matches!(e, Err(ManifestError::UnknownKey { line: 2, .. })));
        let two = b"hvmanifest 1\nguest name=a image=1 image_size=1 format=flat mem_mib=1\n\
                    guest name=a image=1 image_size=1 format=flat mem_mib=1\n\0";
        assert_eq!(parse(two), Err(ManifestError::DuplicateName { line: 3 }));
    }

    #[test]
    fn devices() {
        let g =
            parse(b"hvmanifest 1\nguest name=d image=1 image_size=1 format=flat mem_mib=1 device=00:02.0\n\0").unwrap();
        assert_eq!(g[0].devices, [(0, 2, 0)]);
        let e = parse(b"hvmanifest 1\nguest name=d image=1 image_size=1 format=flat mem_mib=1 device=00:40.0\n\0");
        assert_eq!(e, Err(ManifestError::BadValue { line: 2, key: "device" }));
        assert_eq!(parse_bdf("0a:1f.7"), Some((10, 31, 7)));
        assert_eq!(parse_bdf("0a:1f"), None);
    }

    #[test]
    fn cmdline_address() {
        assert_eq!(address_from_cmdline("console=x manifest=0x5f000000 y"), Some(0x5f00_0000));
        assert_eq!(address_from_cmdline("manifest=zz"), None);
        assert_eq!(address_from_cmdline(""), None);
    }

    proptest! {
        #[test]
        fn random_manifests_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn mutated_manifest_never_panics(flips in proptest::collection::vec((0usize..GOOD.len(), any::<u8>()), 1..6)) {
            let mut m = GOOD.to_vec();
            for (at, b) in flips {
                m[at] = b;
            }
            let _ = parse(&m);
        }
    }

    #[test]
    fn esp_manifests_name_files_that_become_addresses() {
        let text = "hvmanifest 1\n\
            # from the ESP\n\
            guest name=hb file=heartbeat.bin format=flat mem_mib=16 cmdline=ticks=40 file=not-this\n\
            guest name=linux file=Image format=image mem_mib=256 initrd_file=initrd.cpio vcpus=2\n";
        let mut next = 0x4800_0000u64;
        let mut loaded = Vec::new();
        let out = resolve_files(text, |name| -> Result<PhysRange, &str> {
            loaded.push(name.to_string());
            next += 0x10_0000;
            Ok(PhysRange::new(next, 0x1234))
        })
        .expect("resolved");
        assert_eq!(loaded, ["heartbeat.bin", "Image", "initrd.cpio"]);
        let mut bytes = out.into_bytes();
        bytes.push(0);
        let guests = parse(&bytes).expect("a manifest parse accepts");
        assert_eq!(guests[0].image, PhysRange::new(0x4810_0000, 0x1234));
        assert_eq!(guests[0].cmdline, "ticks=40 file=not-this");
        assert_eq!(guests[1].image, PhysRange::new(0x4820_0000, 0x1234));
        assert_eq!(guests[1].initrd, Some(PhysRange::new(0x4830_0000, 0x1234)));
        assert_eq!(guests[1].vcpus, 2);
    }

    #[test]
    fn esp_file_names_are_plain_and_load_errors_name_the_file() {
        let never = |_: &str| -> Result<PhysRange, &str> { panic!("not loaded") };
        for bad in ["../x", "\\EFI\\x", "a/b", "..", ""] {
            let text = alloc::format!("hvmanifest 1\nguest name=a file={bad} format=flat mem_mib=1\n");
            assert_eq!(resolve_files(&text, never), Err(ResolveError::BadFileName { line: 2 }), "{bad}");
        }
        let text = "hvmanifest 1\nguest name=a file=gone.bin format=flat mem_mib=1\n";
        let err = resolve_files(text, |_| Err("not found")).unwrap_err();
        assert_eq!(err, ResolveError::Load { line: 2, name: "gone.bin".into(), error: "not found" });
        assert_eq!(err.to_string(), "line 2: gone.bin: not found");
    }
}
