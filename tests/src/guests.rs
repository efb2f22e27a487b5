//! Guests for a run: parsing `--guest FILE[,mem=SIZE][,vcpus=N][,privileged]
//! [,initrd=FILE][,cmdline="..."]`, building the default test guests, and
//! laying the images and the boot manifest out in the machine's RAM.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use loader::elf::{self, Machine as ElfMachine};

use crate::image::IsoModule;
use crate::{io_err, out_dir, workspace_root, write_atomic, Arch, LaunchError};

/// Guest RAM base of the QEMU `virt` machine (and of every guest).
pub const VIRT_RAM_BASE: u64 = 0x4000_0000;
const MIB: u64 = 1 << 20;
const BLOB_ALIGN: u64 = 0x1000;

/// One guest as the user (or the default set) describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestArg {
    pub file: PathBuf,
    pub name: String,
    pub mem_mib: u64,
    pub vcpus: u32,
    pub privileged: bool,
    pub initrd: Option<PathBuf>,
    /// PCI functions (`BB:DD.F`) assigned to the guest.
    pub devices: Vec<String>,
    pub cmdline: String,
}

fn parse_size_mib(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1),
        Some((i, _)) => {
            let mult = match &s[i..].to_ascii_lowercase()[..] {
                "m" | "mib" | "mb" => 1,
                "g" | "gib" | "gb" => 1024,
                _ => return None,
            };
            (&s[..i], mult)
        }
    };
    num.parse::<u64>().ok().map(|n| n * mult).filter(|&n| n > 0)
}

/// Splits on commas outside double quotes.
fn split_fields(spec: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    for c in spec.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(String::new()),
            _ => out.last_mut().map_or((), |s| s.push(c)),
        }
    }
    out
}

impl GuestArg {
    /// Parses the value of one `--guest` flag.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let fields = split_fields(spec);
        let file = PathBuf::from(fields[0].trim());
        if fields[0].trim().is_empty() {
            return Err(format!("--guest '{spec}': no file"));
        }
        let stem = file.file_stem().map_or("guest".into(), |s| s.to_string_lossy().into_owned());
        let name: String = stem
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' })
            .take(32)
            .collect();
        let mut g = GuestArg {
            file,
            name,
            mem_mib: 16,
            vcpus: 1,
            privileged: false,
            initrd: None,
            devices: Vec::new(),
            cmdline: String::new(),
        };
        for f in &fields[1..] {
            let (k, v) = f.split_once('=').map_or((f.as_str(), ""), |(k, v)| (k, v));
            match k.trim() {
                "mem" => g.mem_mib = parse_size_mib(v).ok_or(format!("--guest: bad mem '{v}'"))?,
                "vcpus" => {
                    g.vcpus =
                        v.parse().ok().filter(|n| (1..=8).contains(n)).ok_or(format!("--guest: bad vcpus '{v}'"))?;
                }
                "privileged" => g.privileged = true,
                "initrd" => g.initrd = Some(PathBuf::from(v)),
                "device" => {
                    if loader::manifest::parse_bdf(v).is_none() {
                        return Err(format!("--guest: bad device '{v}' (want BB:DD.F)"));
                    }
                    g.devices.push(v.to_string());
                }
                "cmdline" => g.cmdline = v.to_string(),
                "name" => g.name = v.to_string(),
                other => return Err(format!("--guest: unknown option '{other}'")),
            }
        }
        Ok(g)
    }
}

/// Builds the test guests and returns the default set for `arch`: the
/// heartbeat, memcheck, blackout meter, hypercall exerciser (privileged)
/// and isolation probe.
pub fn default_guests(arch: Arch) -> Result<Vec<GuestArg>, LaunchError> {
    let dir = build_test_guests(arch)?;
    let g = |bin: &str, mem: u64, privileged: bool, cmdline: &str| GuestArg {
        file: dir.join(format!("{bin}.bin")),
        name: bin.to_string(),
        mem_mib: mem,
        vcpus: 1,
        privileged,
        initrd: None,
        devices: Vec::new(),
        cmdline: cmdline.to_string(),
    };
    Ok(match arch {
        Arch::Aarch64 => vec![
            g("heartbeat", 16, false, "ticks=100"),
            g("memcheck", 32, false, "passes=3"),
            g("blackout", 16, false, "seconds=2"),
            g("exerciser", 16, true, "privileged=1"),
            g("isolation", 16, false, ""),
        ],
        // Bochs emulates every instruction: smaller RAM for memcheck to
        // cover, and the same workloads otherwise.
        Arch::X86_64 => vec![
            g("heartbeat", 4, false, "ticks=100"),
            g("memcheck", 8, false, "passes=3"),
            // The serial port is slow under Bochs (each report costs
            // milliseconds): report only gaps longer than two time slices.
            g("blackout", 4, false, "seconds=2 gap_report_us=20000"),
            g("exerciser", 4, true, "privileged=1"),
            g("isolation", 4, false, ""),
        ],
    })
}

/// Characters GRUB's configuration language treats specially (quoting,
/// variables, command separators, comments); a guest command line with
/// any of them, or a control character, cannot be passed through
/// `module2` verbatim.
const GRUB_SPECIAL: &str = "$\"'\\;{}|&<>#`";

/// The multiboot2 modules for an x86_64 run: one per guest, its module
/// command line `name=.. mem=.. vcpus=.. privileged=.. [cmdline=...]`
/// (`loader::guest_modules`).
pub fn grub_modules(guests: &[GuestArg]) -> Result<Vec<IsoModule>, LaunchError> {
    let mut out = Vec::new();
    for g in guests {
        let refuse = |why: &str| Err(LaunchError::Image(format!("guest {}: {why} on x86_64", g.name)));
        if g.initrd.is_some() {
            return refuse("an initrd is not supported");
        }
        if !g.devices.is_empty() {
            return refuse("device passthrough is not supported");
        }
        if g.cmdline.chars().any(|c| c.is_control() || GRUB_SPECIAL.contains(c)) {
            return refuse(&format!("the command line may not contain control characters or any of {GRUB_SPECIAL}"));
        }
        let mut args = vec![
            format!("name={}", g.name),
            format!("mem={}", g.mem_mib),
            format!("vcpus={}", g.vcpus),
            format!("privileged={}", u8::from(g.privileged)),
        ];
        let mut words = g.cmdline.split_whitespace();
        if let Some(first) = words.next() {
            args.push(format!("cmdline={first}"));
            args.extend(words.map(str::to_string));
        }
        out.push(IsoModule { file: g.file.clone(), args });
    }
    Ok(out)
}

/// FNV-1a over the bundle, to name its file.
fn content_digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The default demo: the test guests, sized to keep running through the
/// updates, plus the updater guest carrying `update_images`.
pub fn demo_guests(arch: Arch, update_images: &[PathBuf], updates: u32) -> Result<Vec<GuestArg>, LaunchError> {
    let mut list = default_guests(arch)?;
    if updates == 0 || update_images.is_empty() {
        return Ok(list);
    }
    // Each update waits `delay_ms` first; the other guests must outlive
    // them all (ticks are 10 ms, memcheck passes take ~50 ms, blackout
    // counts seconds).
    let delay_ms = 250;
    let span_s = u64::from(updates) * (delay_ms + 150) / 1000 + 2;
    for g in &mut list {
        g.cmdline = match g.name.as_str() {
            "heartbeat" => format!("ticks={}", span_s * 100),
            "memcheck" => format!("passes={}", span_s * 15),
            // Keep the other options (x86_64 reports only long gaps).
            "blackout" => g
                .cmdline
                .split_whitespace()
                .map(|w| if w.starts_with("seconds=") { format!("seconds={span_s}") } else { w.to_string() })
                .collect::<Vec<_>>()
                .join(" "),
            _ => g.cmdline.clone(),
        };
    }
    list.push(updater_guest(arch, update_images, 16, &format!("updates={updates} delay_ms={delay_ms}"))?);
    Ok(list)
}

/// The test guest binaries, as flat images in the returned directory.
pub const TEST_GUESTS: [&str; 9] =
    ["heartbeat", "memcheck", "blackout", "exerciser", "isolation", "smp", "updater", "reset", "dma"];

/// Magic at the start of the update bundle appended to the updater guest.
pub const BUNDLE_MAGIC: &[u8; 8] = b"HVUPDBND";
/// The bundle header: magic, count (u32), reserved (u32), then per image
/// (offset from the bundle start: u64, size: u64); images follow, each
/// 4 KiB aligned.
const BUNDLE_HEADER: usize = 4096;
const MAX_BUNDLE_IMAGES: usize = (BUNDLE_HEADER - 16) / 16;

/// Builds the privileged updater guest: its image (padded over its bss),
/// followed by a bundle of hypervisor images it hands to LIVE_UPDATE in
/// turn. `cmdline` carries `updates=N` and friends.
pub fn updater_guest(arch: Arch, images: &[PathBuf], mem_mib: u64, cmdline: &str) -> Result<GuestArg, LaunchError> {
    if images.is_empty() || images.len() > MAX_BUNDLE_IMAGES {
        return Err(LaunchError::Image(format!("the updater carries 1 to {MAX_BUNDLE_IMAGES} images")));
    }
    let dir = out_dir().join(arch.name()).join("guests");
    let base = dir.join("updater.bin");
    let mut out = fs::read(&base).map_err(io_err(format!("reading {}", base.display())))?;
    out.resize(out.len().next_multiple_of(BLOB_ALIGN as usize), 0);
    let mut header = vec![0u8; BUNDLE_HEADER];
    header[..8].copy_from_slice(BUNDLE_MAGIC);
    header[8..12].copy_from_slice(&(images.len() as u32).to_le_bytes());
    let mut body = Vec::new();
    for (i, path) in images.iter().enumerate() {
        let bytes = fs::read(path).map_err(io_err(format!("reading update image {}", path.display())))?;
        let offset = (BUNDLE_HEADER + body.len()) as u64;
        let at = 16 + i * 16;
        header[at..at + 8].copy_from_slice(&offset.to_le_bytes());
        header[at + 8..at + 16].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
        body.extend_from_slice(&bytes);
        body.resize(body.len().next_multiple_of(BLOB_ALIGN as usize), 0);
    }
    out.extend_from_slice(&header);
    out.extend_from_slice(&body);
    // Named by content: tests running in parallel build different bundles.
    let digest = content_digest(&out);
    let file = dir.join(format!("updater-{digest:016x}.bin"));
    write_atomic(&file, &out)?;
    Ok(GuestArg {
        file,
        name: "updater".into(),
        mem_mib,
        vcpus: 1,
        privileged: true,
        initrd: None,
        devices: Vec::new(),
        cmdline: cmdline.to_string(),
    })
}

/// Builds `guests/testguests` for `arch` and flattens each ELF.
pub fn build_test_guests(arch: Arch) -> Result<PathBuf, LaunchError> {
    let target_dir = out_dir().join("cargo").join("guests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let status = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "--quiet", "--release", "-p", "testguests", "--bins", "--target", arch.triple()])
        .env("CARGO_TARGET_DIR", &target_dir)
        .status()
        .map_err(io_err("running cargo build for the test guests"))?;
    if !status.success() {
        return Err(LaunchError::Build(format!("building the test guests failed ({status})")));
    }
    let dir = out_dir().join(arch.name()).join("guests");
    fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    for bin in TEST_GUESTS {
        let elf_path = target_dir.join(arch.triple()).join("release").join(bin);
        let bytes = fs::read(&elf_path).map_err(io_err(format!("reading {}", elf_path.display())))?;
        let machine = match arch {
            Arch::Aarch64 => ElfMachine::Aarch64,
            Arch::X86_64 => ElfMachine::X86_64,
        };
        let image =
            elf::parse(&bytes, machine).map_err(|e| LaunchError::Image(format!("{}: {e}", elf_path.display())))?;
        // Flat image padded over bss, so whatever is appended to it (the
        // updater's bundle) is not cleared by the guest's bss zeroing.
        let mut flat = elf::flatten(&bytes, &image);
        flat.resize(((image.end() - image.base()) as usize).next_multiple_of(BLOB_ALIGN as usize), 0);
        write_atomic(&dir.join(format!("{bin}.bin")), &flat)?;
    }
    Ok(dir)
}

fn format_of(bytes: &[u8]) -> &'static str {
    if bytes.starts_with(b"\x7fELF") {
        "elf"
    } else if bytes.get(56..60) == Some(b"ARM\x64".as_slice()) {
        "image"
    } else {
        "flat"
    }
}

/// Blobs to place in RAM and the hypervisor command line that finds them.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    /// (file, physical address) pairs for QEMU `-device loader`.
    pub blobs: Vec<(PathBuf, u64)>,
    pub cmdline: String,
    pub manifest_text: String,
    /// Some guest was given a PCI device: the machine needs the SMMU and
    /// the device.
    pub needs_devices: bool,
}

/// Lays out the manifest and every image and initrd at the top of RAM
/// (QEMU puts the hypervisor image and its DTB at the bottom).
pub fn place(guests: &[GuestArg], ram_mib: u64, run_dir: &Path) -> Result<Placement, LaunchError> {
    let mut files: Vec<(PathBuf, u64)> = Vec::new();
    for g in guests {
        let len = fs::metadata(&g.file).map_err(io_err(format!("guest image {}", g.file.display())))?.len();
        files.push((g.file.clone(), len));
        if let Some(i) = &g.initrd {
            let len = fs::metadata(i).map_err(io_err(format!("initrd {}", i.display())))?.len();
            files.push((i.clone(), len));
        }
    }
    let manifest_slot = 64 * 1024;
    let total: u64 = files.iter().map(|(_, l)| l.next_multiple_of(BLOB_ALIGN)).sum::<u64>() + manifest_slot;
    let ram_top = VIRT_RAM_BASE + ram_mib * MIB;
    let start = (ram_top - MIB).saturating_sub(total) & !(2 * MIB - 1);
    if start < VIRT_RAM_BASE + ram_mib * MIB / 2 {
        return Err(LaunchError::Image(format!(
            "guest images ({} MiB) do not fit in the top half of {ram_mib} MiB of RAM; use --mem",
            total / MIB + 1
        )));
    }
    let manifest_addr = start;
    let mut at = start + manifest_slot;
    let mut text = String::from("hvmanifest 1\n");
    let mut blobs = Vec::new();
    for g in guests {
        let bytes = fs::read(&g.file).map_err(io_err(format!("reading {}", g.file.display())))?;
        let image_addr = at;
        at += (bytes.len() as u64).next_multiple_of(BLOB_ALIGN);
        blobs.push((g.file.clone(), image_addr));
        let _ = write!(
            text,
            "guest name={} image={image_addr:#x} image_size={:#x} format={} mem_mib={} vcpus={} privileged={}",
            g.name,
            bytes.len(),
            format_of(&bytes),
            g.mem_mib,
            g.vcpus,
            u8::from(g.privileged)
        );
        for d in &g.devices {
            let _ = write!(text, " device={d}");
        }
        if let Some(i) = &g.initrd {
            let len = fs::metadata(i).map_err(io_err(format!("initrd {}", i.display())))?.len();
            let _ = write!(text, " initrd={at:#x} initrd_size={len:#x}");
            blobs.push((i.clone(), at));
            at += len.next_multiple_of(BLOB_ALIGN);
        }
        let _ = writeln!(text, " cmdline={}", g.cmdline);
    }
    let manifest = run_dir.join("manifest.txt");
    let mut bytes = text.clone().into_bytes();
    bytes.push(0);
    fs::write(&manifest, bytes).map_err(io_err("writing the manifest"))?;
    blobs.push((manifest, manifest_addr));
    let needs_devices = guests.iter().any(|g| !g.devices.is_empty());
    Ok(Placement { blobs, cmdline: format!("manifest={manifest_addr:#x}"), manifest_text: text, needs_devices })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_guest_flag() {
        let g = GuestArg::parse("out/hb.bin,mem=64M,vcpus=2,privileged,cmdline=\"ticks=5 x=1,2\"").unwrap();
        assert_eq!(g.file, PathBuf::from("out/hb.bin"));
        assert_eq!((g.name.as_str(), g.mem_mib, g.vcpus, g.privileged), ("hb", 64, 2, true));
        assert_eq!(g.cmdline, "ticks=5 x=1,2");
        assert_eq!(GuestArg::parse("k,mem=1G").unwrap().mem_mib, 1024);
        assert!(GuestArg::parse("k,mem=lots").is_err());
        assert!(GuestArg::parse("k,vcpus=0").is_err());
        assert!(GuestArg::parse("k,colour=red").is_err());
        assert!(GuestArg::parse("").is_err());
    }

    #[test]
    fn grub_modules_carry_the_guest_spec() {
        let g = GuestArg::parse("out/hb.bin,mem=8M,privileged,cmdline=\"ticks=5  x=1\"").unwrap();
        let m = grub_modules(std::slice::from_ref(&g)).unwrap();
        assert_eq!(m[0].file, PathBuf::from("out/hb.bin"));
        assert_eq!(m[0].args, ["name=hb", "mem=8", "vcpus=1", "privileged=1", "cmdline=ticks=5", "x=1"]);
        let text = format!("/boot/guests/0.bin {}", m[0].args.join(" "));
        let spec = loader::guest_modules::parse_module(
            1,
            &text,
            loader::PhysRange::new(0x10_0000, 0x1000),
            loader::manifest::ImageFormat::Flat,
        )
        .unwrap();
        assert_eq!((spec.name.as_str(), spec.mem_mib, spec.privileged), ("hb", 8, true));
        assert_eq!(spec.cmdline, "ticks=5 x=1");
        let quoted = GuestArg { cmdline: "a=$x".into(), ..g.clone() };
        assert!(grub_modules(&[quoted]).is_err());
        let with_initrd = GuestArg { initrd: Some("i".into()), ..g };
        assert!(grub_modules(&[with_initrd]).is_err());
    }

    #[test]
    fn placement_is_in_the_top_half_and_aligned() {
        let dir = std::env::temp_dir().join(format!("hv-place-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let img = dir.join("a.bin");
        fs::write(&img, vec![0u8; 5000]).unwrap();
        let g = GuestArg::parse(img.to_str().unwrap()).unwrap();
        let p = place(&[g.clone(), GuestArg { name: "b".into(), ..g }], 512, &dir).unwrap();
        assert_eq!(p.blobs.len(), 3);
        let manifest_addr = p.blobs[2].1;
        assert_eq!(p.cmdline, format!("manifest={manifest_addr:#x}"));
        assert!(manifest_addr >= VIRT_RAM_BASE + 256 * MIB);
        assert_eq!(p.blobs[0].1, manifest_addr + 64 * 1024);
        assert_eq!(p.blobs[1].1, p.blobs[0].1 + 0x2000);
        let parsed = loader::manifest::parse(&[p.manifest_text.as_bytes(), b"\0"].concat()).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1].image.base, p.blobs[1].1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
