//! Guests for a run: parsing `--guest FILE[,mem=SIZE][,vcpus=N][,privileged]
//! [,initrd=FILE][,cmdline="..."]`, building the default test guests, and
//! laying the images and the boot manifest out in the machine's RAM.

use std::fmt::{self, Write as _};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use loader::elf::{self, Machine as ElfMachine};
use loader::manifest::{ImageFormat, MAX_GUEST_MEM_MIB, MAX_VCPUS};

use crate::emulator::RunOutcome;
use crate::image::IsoModule;
use crate::{io_err, out_dir, workspace_root, write_atomic, Arch, Firmware, LaunchError};

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

/// The shortest pause the x86 blackout meter reports: two time slices
/// (shorter ones are its CPU's other vCPUs taking their turn).
pub const X86_GAP_REPORT_US: u64 = 20_000;

/// The keys a `--guest` value may carry after its file.
pub const GUEST_KEYS: [&str; 7] = ["mem", "vcpus", "privileged", "initrd", "device", "cmdline", "name"];

/// Why a `--guest` value was refused. The launcher prefixes the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestSpecError {
    NoFile,
    UnbalancedQuote,
    EmptyField,
    UnknownKey(String),
    Repeated(&'static str),
    BadValue { key: &'static str, value: String, want: &'static str },
}

impl fmt::Display for GuestSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoFile => write!(f, "no file before the first comma"),
            Self::UnbalancedQuote => write!(f, "a double quote is not closed"),
            Self::EmptyField => write!(f, "an empty field (a stray comma?)"),
            Self::UnknownKey(k) => write!(f, "unknown key '{k}' (keys: {})", GUEST_KEYS.join(", ")),
            Self::Repeated(k) => write!(f, "{k}= given twice"),
            Self::BadValue { key, value, want } => write!(f, "bad {key}='{value}' (want {want})"),
        }
    }
}

impl std::error::Error for GuestSpecError {}

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
    num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult)).filter(|&n| n > 0)
}

/// Splits on commas outside double quotes, dropping the quotes.
fn split_fields(spec: &str) -> Result<Vec<String>, GuestSpecError> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    for c in spec.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(String::new()),
            _ => out.last_mut().map_or((), |s| s.push(c)),
        }
    }
    if quoted {
        return Err(GuestSpecError::UnbalancedQuote);
    }
    Ok(out)
}

/// A guest name the boot manifest and the multiboot2 module line accept
/// (`loader::manifest`, `loader::guest_modules`).
fn valid_name(v: &str) -> bool {
    !v.is_empty() && v.len() <= 32 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl GuestArg {
    /// Parses the value of one `--guest` flag: the file, then `key=value`
    /// fields (`privileged` may stand alone). Every key at most once,
    /// except `device`.
    pub fn parse(spec: &str) -> Result<Self, GuestSpecError> {
        let fields = split_fields(spec)?;
        let (first, rest) = fields.split_first().ok_or(GuestSpecError::NoFile)?;
        if first.trim().is_empty() {
            return Err(GuestSpecError::NoFile);
        }
        let file = PathBuf::from(first.trim());
        let stem = file.file_stem().map_or(String::new(), |s| s.to_string_lossy().into_owned());
        let name: String = stem
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' })
            .take(32)
            .collect();
        let mut g = GuestArg {
            file,
            name: if name.is_empty() { "guest".into() } else { name },
            mem_mib: 16,
            vcpus: 1,
            privileged: false,
            initrd: None,
            devices: Vec::new(),
            cmdline: String::new(),
        };
        let mut seen: Vec<&'static str> = Vec::new();
        for f in rest {
            let (k, v) = f.split_once('=').map_or((f.trim(), None), |(k, v)| (k.trim(), Some(v)));
            if k.is_empty() {
                return Err(GuestSpecError::EmptyField);
            }
            let key = GUEST_KEYS.into_iter().find(|&known| known == k).ok_or(GuestSpecError::UnknownKey(k.into()))?;
            if key != "device" && seen.contains(&key) {
                return Err(GuestSpecError::Repeated(key));
            }
            seen.push(key);
            let bad = |want| GuestSpecError::BadValue { key, value: v.unwrap_or("").to_string(), want };
            match key {
                "mem" => {
                    g.mem_mib = v
                        .and_then(parse_size_mib)
                        .filter(|&m| m <= MAX_GUEST_MEM_MIB)
                        .ok_or_else(|| bad("MiB, or a size with an M or G suffix, at most 16G"))?;
                }
                "vcpus" => {
                    g.vcpus = v
                        .and_then(|v| v.parse().ok())
                        .filter(|n| (1..=MAX_VCPUS).contains(n))
                        .ok_or_else(|| bad("1 to 8"))?;
                }
                "privileged" => {
                    g.privileged = match v {
                        None | Some("1") => true,
                        Some("0") => false,
                        Some(_) => return Err(bad("privileged, privileged=1 or privileged=0")),
                    };
                }
                "initrd" => {
                    g.initrd = Some(v.filter(|v| !v.is_empty()).map(PathBuf::from).ok_or_else(|| bad("a file"))?);
                }
                "device" => {
                    let d = v.filter(|v| loader::manifest::parse_bdf(v).is_some()).ok_or_else(|| bad("BB:DD.F"))?;
                    g.devices.push(d.to_string());
                }
                "cmdline" => g.cmdline = v.ok_or_else(|| bad("cmdline=\"...\""))?.to_string(),
                _ => {
                    g.name =
                        v.filter(|v| valid_name(v)).ok_or_else(|| bad("1 to 32 of A-Z a-z 0-9 - _ ."))?.to_string();
                }
            }
        }
        Ok(g)
    }
}

/// The default set of test guests for `arch`, their images in `dir`: the
/// heartbeat, memcheck, blackout meter, hypercall exerciser (privileged)
/// and isolation probe.
pub fn default_guest_specs(arch: Arch, dir: &Path) -> Vec<GuestArg> {
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
    match arch {
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
            g("blackout", 4, false, &format!("seconds=2 gap_report_us={X86_GAP_REPORT_US}")),
            g("exerciser", 4, true, "privileged=1"),
            g("isolation", 4, false, ""),
        ],
    }
}

/// The aarch64 DMA guest given QEMU's edu (00:02.0, behind the SMMUv3):
/// verified DMA through its stage-2 table, paced by edu (~100 ms each).
pub fn dma_guest(dir: &Path) -> GuestArg {
    GuestArg {
        file: dir.join("dma.bin"),
        name: "dma".to_string(),
        mem_mib: 16,
        vcpus: 1,
        privileged: false,
        initrd: None,
        devices: vec!["00:02.0".to_string()],
        cmdline: "transfers=20".to_string(),
    }
}

/// Builds the test guests and returns the default set for `arch`
/// ([`default_guest_specs`]).
pub fn default_guests(arch: Arch) -> Result<Vec<GuestArg>, LaunchError> {
    let dir = build_test_guests(arch)?;
    Ok(default_guest_specs(arch, &dir))
}

/// Characters GRUB's configuration language treats specially (quoting,
/// variables, command separators, comments); a guest command line with
/// any of them, or a control character, cannot be passed through
/// `module2` verbatim.
const GRUB_SPECIAL: &str = "$\"'\\;{}|&<>#`";

/// Why `g` cannot be an x86_64 guest (a multiboot2 module), if it cannot.
pub fn x86_64_refusal(g: &GuestArg) -> Option<String> {
    if g.initrd.is_some() {
        return Some("an initrd is not supported on x86_64".into());
    }
    if g.cmdline.chars().any(|c| c.is_control() || GRUB_SPECIAL.contains(c)) {
        return Some(format!(
            "the command line may not contain control characters or any of {GRUB_SPECIAL} on x86_64 (GRUB module line)"
        ));
    }
    None
}

/// The multiboot2 modules for an x86_64 run: one per guest, its module
/// command line `name=.. mem=.. vcpus=.. privileged=.. [cmdline=...]`
/// (`loader::guest_modules`).
pub fn grub_modules(guests: &[GuestArg]) -> Result<Vec<IsoModule>, LaunchError> {
    let mut out = Vec::new();
    for g in guests {
        if let Some(why) = x86_64_refusal(g) {
            return Err(LaunchError::Image(format!("guest {}: {why}", g.name)));
        }
        let mut args = vec![
            format!("name={}", g.name),
            format!("mem={}", g.mem_mib),
            format!("vcpus={}", g.vcpus),
            format!("privileged={}", u8::from(g.privileged)),
        ];
        // Assigned PCI functions, before the command line (the rest of
        // the line after `cmdline=` is the guest's).
        args.extend(g.devices.iter().map(|d| format!("device={d}")));
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

/// How long the updater waits before each update.
pub const UPDATE_DELAY_MS: u64 = 250;

/// The updater's command line for `updates` updates.
pub fn updater_cmdline(updates: u32) -> String {
    format!("updates={updates} delay_ms={UPDATE_DELAY_MS}")
}

/// Lengthens the test guests in `list` so they keep running through
/// `updates` updates (ticks are 10 ms, memcheck passes take ~50 ms,
/// blackout counts seconds; each update waits [`UPDATE_DELAY_MS`] first).
/// Guests that are not test guests are left alone.
pub fn sized_for_updates(arch: Arch, list: &mut [GuestArg], updates: u32) {
    if updates == 0 {
        return;
    }
    // Each update is the updater's delay plus its blackout in guest time.
    // Under QEMU TCG (aarch64) the guests' clock is the host's, so a busy
    // host stretches the blackout (100-250 ms seen): size for 600 ms, and
    // the guests outlive the last update when the other core is busy too.
    // Bochs's clock follows the instructions it ran: its blackouts are
    // ~220 ms of guest time (`update-done`); size for 400.
    let per_update_ms = match arch {
        Arch::Aarch64 => 600,
        Arch::X86_64 => 400,
    };
    let extra_s = match arch {
        Arch::Aarch64 => 3,
        Arch::X86_64 => 2,
    };
    let span_s = u64::from(updates) * (UPDATE_DELAY_MS + per_update_ms) / 1000 + extra_s;
    for g in list {
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
            // edu takes ~100 ms of virtual time per DMA.
            "dma" => format!("transfers={}", span_s * 10),
            _ => g.cmdline.clone(),
        };
    }
}

/// The default demo: the test guests, sized to keep running through the
/// updates, plus the updater guest carrying `update_images`.
pub fn demo_guests(arch: Arch, update_images: &[PathBuf], updates: u32) -> Result<Vec<GuestArg>, LaunchError> {
    let dir = build_test_guests(arch)?;
    demo_guests_in(arch, &dir, update_images, updates)
}

/// [`demo_guests`] with the test guests already built in `dir` (by
/// [`build_test_guests_from`], from another revision's tree).
pub fn demo_guests_in(
    arch: Arch,
    dir: &Path,
    update_images: &[PathBuf],
    updates: u32,
) -> Result<Vec<GuestArg>, LaunchError> {
    let mut list = default_guest_specs(arch, dir);
    if updates == 0 || update_images.is_empty() {
        return Ok(list);
    }
    sized_for_updates(arch, &mut list, updates);
    list.push(updater_guest_in(arch, dir, update_images, UPDATER_MEM_MIB, &updater_cmdline(updates))?);
    Ok(list)
}

/// A guest that writes one long console line two bytes at a time across
/// `updates` live updates (the heartbeat guest with `line_updates=`,
/// `guests/testguests/src/longline.rs`), named `name`.
pub fn longline_guest(arch: Arch, name: &str, updates: u32) -> Result<GuestArg, LaunchError> {
    let dir = build_test_guests(arch)?;
    let mut g = default_guest_specs(arch, &dir)
        .into_iter()
        .find(|g| g.name == "heartbeat")
        .ok_or_else(|| LaunchError::Image("no heartbeat guest".into()))?;
    g.name = name.to_string();
    g.cmdline = format!("line_updates={updates}");
    Ok(g)
}

/// The line a [`longline_guest`] writes, without the `guest<N>: ` prefix.
pub fn longline_text(updates: u32) -> String {
    let mut line = format!("longline updates={updates} text=");
    for k in 0..60 {
        let _ = write!(line, "{k:02}.");
    }
    line
}

/// Checks what the [`longline_guest`] with id `id` printed in `run`: its
/// line once, whole and in order, after the last image started (its
/// `hypervisor ... starting` banner; `hv: guest-adopted` and `hv:
/// update-done` may come later: they are printed once every CPU is back in
/// a guest), then its report of having seen all `updates`, and no other
/// line (a fragment of the line, even an empty one, would be one). The
/// reason if not.
pub fn check_longline(run: &RunOutcome, id: u32, updates: u32) -> Result<(), String> {
    let text = longline_text(updates);
    let lines: Vec<&str> = run.serial.lines().map(str::trim_end).collect();
    let adopted = format!("hv: guest-adopted id={id} ");
    let last_start = lines.iter().rposition(|l| l.starts_with("hypervisor ") && l.contains(" starting "));
    let adoptions = lines.iter().filter(|l| l.starts_with(&adopted)).count();
    if adoptions != updates as usize {
        return Err(format!("guest{id}: adopted {adoptions} times, not {updates}"));
    }
    let prefix = format!("guest{id}:");
    let own: Vec<(usize, &str)> = lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.strip_prefix(&prefix).map(|t| (i, t.strip_prefix(' ').unwrap_or(t))))
        .collect();
    let [(at, line), (_, report)] = own[..] else {
        return Err(format!("guest{id}: the long line and its report, nothing else: {own:?}"));
    };
    if line != text {
        return Err(format!("guest{id}: not every byte in order:\n  got  {line}\n  want {text}"));
    }
    if last_start.is_none_or(|u| at < u) {
        return Err(format!("guest{id}: the line ended before the last image started"));
    }
    let want = format!(
        "longline done=1 bytes={} pieces={} updates_seen={updates} stalled=0",
        text.len(),
        text.len().div_ceil(2)
    );
    if report != want {
        return Err(format!("guest{id}: report {report}, want {want}"));
    }
    Ok(())
}

/// The test guest binaries, as flat images in the returned directory.
pub const TEST_GUESTS: [&str; 12] = [
    "heartbeat",
    "memcheck",
    "blackout",
    "exerciser",
    "isolation",
    "smp",
    "updater",
    "reset",
    "dma",
    "debugpriv",
    "ptimer",
    "hostile",
];

/// The updater guest's name (the launcher ends a run on its stop).
pub const UPDATER: &str = "updater";
/// The updater's RAM in the demo; more when its bundle needs it.
pub const UPDATER_MEM_MIB: u64 = 16;

/// Magic at the start of the update bundle appended to the updater guest.
pub const BUNDLE_MAGIC: &[u8; 8] = b"HVUPDBND";
/// The bundle header: magic, count (u32), reserved (u32), then per image
/// (offset from the bundle start: u64, size: u64); images follow, each
/// 4 KiB aligned.
const BUNDLE_HEADER: usize = 4096;
const MAX_BUNDLE_IMAGES: usize = (BUNDLE_HEADER - 16) / 16;
/// The largest update image the launcher hands the updater: the
/// hypervisor stages an image in scratch and accepts none larger than
/// this (`loader::elf::MAX_IMAGE_SPAN`).
pub const MAX_UPDATE_IMAGE: u64 = loader::elf::MAX_IMAGE_SPAN;

/// Writes the updater guest's file: its image (padded over its bss),
/// followed by a bundle of `images`, in `dir` (where the test guests were
/// built). Returns the file and its length.
fn updater_bundle(dir: &Path, images: &[PathBuf]) -> Result<(PathBuf, u64), LaunchError> {
    if images.is_empty() || images.len() > MAX_BUNDLE_IMAGES {
        return Err(LaunchError::Image(format!("the updater carries 1 to {MAX_BUNDLE_IMAGES} images")));
    }
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
    Ok((file, out.len() as u64))
}

fn updater_arg(file: PathBuf, mem_mib: u64, cmdline: &str) -> GuestArg {
    GuestArg {
        file,
        name: UPDATER.into(),
        mem_mib,
        vcpus: 1,
        privileged: true,
        initrd: None,
        devices: Vec::new(),
        cmdline: cmdline.to_string(),
    }
}

/// Builds the privileged updater guest with `mem_mib` of RAM: its image
/// followed by a bundle of hypervisor images it hands to LIVE_UPDATE in
/// turn. `cmdline` carries `updates=N` and friends. Refused if the bundle
/// does not fit in that RAM (the guest would only report `bad-bundle`).
pub fn updater_guest(arch: Arch, images: &[PathBuf], mem_mib: u64, cmdline: &str) -> Result<GuestArg, LaunchError> {
    updater_guest_in(arch, &guests_dir(arch), images, mem_mib, cmdline)
}

/// [`updater_guest`] with the updater built in `dir`.
fn updater_guest_in(
    arch: Arch,
    dir: &Path,
    images: &[PathBuf],
    mem_mib: u64,
    cmdline: &str,
) -> Result<GuestArg, LaunchError> {
    let (file, len) = updater_bundle(dir, images)?;
    if len > usable_ram(arch, mem_mib) {
        return Err(LaunchError::Image(format!(
            "the updater's {mem_mib} MiB of RAM cannot carry its image and bundle ({} KiB)",
            len.div_ceil(1024)
        )));
    }
    Ok(updater_arg(file, mem_mib, cmdline))
}

/// The updater guest as the demo runs it ([`UPDATER_MEM_MIB`] of RAM), with
/// more RAM when its bundle needs it (a large `--update-image`).
pub fn updater_guest_sized(arch: Arch, images: &[PathBuf], cmdline: &str) -> Result<GuestArg, LaunchError> {
    let (file, len) = updater_bundle(&guests_dir(arch), images)?;
    let needed = (len + reserved_top(arch)).div_ceil(MIB);
    Ok(updater_arg(file, needed.max(UPDATER_MEM_MIB), cmdline))
}

/// What the hypervisor keeps at the top of a guest's RAM: the device tree
/// slot on aarch64 (`hypervisor/src/guest_image.rs`), the multiboot2
/// information slot on x86_64 (`hypervisor/src/x86_guest/boot.rs`).
fn reserved_top(arch: Arch) -> u64 {
    match arch {
        Arch::Aarch64 => 2 * MIB,
        Arch::X86_64 => 0x2000,
    }
}

/// The smallest guest RAM the hypervisor accepts, in MiB.
fn min_guest_mib(arch: Arch) -> u64 {
    match arch {
        Arch::Aarch64 => 4,
        Arch::X86_64 => 1,
    }
}

/// Bytes of a guest's RAM an image may occupy.
fn usable_ram(arch: Arch, mem_mib: u64) -> u64 {
    (mem_mib * MIB).saturating_sub(reserved_top(arch))
}

/// Compression formats a guest file may arrive in, by magic number.
const COMPRESSED: [(&[u8], &str); 5] = [
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\0", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\x04\x22\x4d\x18", "lz4"),
];

/// Why a guest's file cannot boot on the chosen architecture.
#[derive(Debug)]
pub enum GuestImageError {
    Unreadable(std::io::Error),
    NotAFile,
    Empty,
    Compressed(&'static str),
    Text,
    LinuxBzImage,
    PeExecutable,
    Arm64ImageOnX86,
    Elf(elf::ElfError),
    ElfOutsideRam { paddr: u64, size: u64 },
    DoesNotFit { bytes: u64, mem_mib: u64, usable: u64 },
    RamTooSmall { mem_mib: u64, min_mib: u64 },
    InitrdUnreadable(std::io::Error),
    InitrdEmpty,
}

impl fmt::Display for GuestImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreadable(e) => write!(f, "cannot read the file: {e}"),
            Self::NotAFile => write!(f, "not a regular file"),
            Self::Empty => write!(f, "the file is empty"),
            Self::Compressed(what) => write!(f, "a {what}-compressed file: decompress it first"),
            Self::Text => write!(f, "looks like a text file, not a flat binary, ELF or arm64 Image"),
            Self::LinuxBzImage => {
                write!(f, "a Linux bzImage (x86 boot protocol), which the hypervisor does not boot: use an ELF or flat image")
            }
            Self::PeExecutable => write!(f, "a PE/COFF (EFI) executable, not a flat binary, ELF or arm64 Image"),
            Self::Arm64ImageOnX86 => write!(f, "an arm64 Image cannot boot on x86_64"),
            Self::Elf(e) => write!(f, "not an ELF this architecture can boot: {e}"),
            Self::ElfOutsideRam { paddr, size } => write!(
                f,
                "ELF segment {paddr:#x}+{size:#x} lies outside the guest's RAM (guest-physical {VIRT_RAM_BASE:#x} + mem)"
            ),
            Self::DoesNotFit { bytes, mem_mib, usable } => write!(
                f,
                "the image needs {} KiB, more than the {} KiB mem={mem_mib}M leaves for it: raise mem=",
                bytes.div_ceil(1024),
                usable / 1024
            ),
            Self::RamTooSmall { mem_mib, min_mib } => {
                write!(f, "mem={mem_mib}M is below the {min_mib} MiB a guest needs")
            }
            Self::InitrdUnreadable(e) => write!(f, "cannot read the initrd: {e}"),
            Self::InitrdEmpty => write!(f, "the initrd is empty"),
        }
    }
}

impl std::error::Error for GuestImageError {}

fn elf_machine(arch: Arch) -> ElfMachine {
    match arch {
        Arch::Aarch64 => ElfMachine::Aarch64,
        Arch::X86_64 => ElfMachine::X86_64,
    }
}

/// What kind of image `bytes` is, refusing what `arch` cannot boot.
fn classify(arch: Arch, bytes: &[u8]) -> Result<ImageFormat, GuestImageError> {
    if bytes.is_empty() {
        return Err(GuestImageError::Empty);
    }
    let format = loader::guest_modules::detect_format(bytes);
    match format {
        ImageFormat::Elf => {
            elf::parse(bytes, elf_machine(arch)).map_err(GuestImageError::Elf)?;
        }
        ImageFormat::Arm64Image if arch == Arch::X86_64 => return Err(GuestImageError::Arm64ImageOnX86),
        ImageFormat::Arm64Image => {}
        ImageFormat::Flat => {
            if let Some((_, what)) = COMPRESSED.iter().find(|(magic, _)| bytes.starts_with(magic)) {
                return Err(GuestImageError::Compressed(what));
            }
            // Linux x86 boot protocol: "HdrS" at 0x202.
            if bytes.get(0x202..0x206) == Some(b"HdrS".as_slice()) {
                return Err(GuestImageError::LinuxBzImage);
            }
            if bytes.starts_with(b"MZ") {
                return Err(GuestImageError::PeExecutable);
            }
            if looks_like_text(&bytes[..bytes.len().min(4096)]) {
                return Err(GuestImageError::Text);
            }
        }
    }
    Ok(format)
}

/// UTF-8 without control characters other than tab and line ends (a
/// character cut at the end of `head` allowed): no code image looks so.
fn looks_like_text(head: &[u8]) -> bool {
    let valid = match std::str::from_utf8(head) {
        Ok(text) => text,
        Err(e) if e.error_len().is_none() => std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or_default(),
        Err(_) => return false,
    };
    !valid.is_empty() && valid.chars().all(|c| !c.is_control() || matches!(c, '\t' | '\n' | '\r'))
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    bytes.get(at..at + 8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes)
}

/// Whether an image of `format` fits in `mem_mib` of guest RAM below what
/// the hypervisor reserves at the top.
fn fits(arch: Arch, format: ImageFormat, bytes: &[u8], mem_mib: u64) -> Result<(), GuestImageError> {
    let min_mib = min_guest_mib(arch);
    if mem_mib < min_mib {
        return Err(GuestImageError::RamTooSmall { mem_mib, min_mib });
    }
    let usable = usable_ram(arch, mem_mib);
    let too_big = |bytes| GuestImageError::DoesNotFit { bytes, mem_mib, usable };
    let len = bytes.len() as u64;
    match format {
        ImageFormat::Flat if len > usable => Err(too_big(len)),
        ImageFormat::Flat => Ok(()),
        ImageFormat::Arm64Image => {
            // Linux arm64 booting.rst: text_offset at 8, image_size at 16
            // (0 in old kernels: the file's length then).
            let end = le_u64(bytes, 8).saturating_add(le_u64(bytes, 16).max(len));
            if end > usable {
                Err(too_big(end))
            } else {
                Ok(())
            }
        }
        ImageFormat::Elf => {
            let image = elf::parse(bytes, elf_machine(arch)).map_err(GuestImageError::Elf)?;
            for s in &image.segments {
                let end = s.paddr.checked_sub(VIRT_RAM_BASE).and_then(|o| o.checked_add(s.mem_size));
                if end.is_none_or(|e| e > usable) {
                    return Err(GuestImageError::ElfOutsideRam { paddr: s.paddr, size: s.mem_size });
                }
            }
            Ok(())
        }
    }
}

/// Checks that `g`'s file (and initrd) is something `arch` can boot in the
/// RAM `g` asks for, before anything is built or booted: a flat binary,
/// an ELF for `arch`, or (aarch64) an arm64 Image.
pub fn check_image(arch: Arch, g: &GuestArg) -> Result<ImageFormat, GuestImageError> {
    let meta = fs::metadata(&g.file).map_err(GuestImageError::Unreadable)?;
    if !meta.is_file() {
        return Err(GuestImageError::NotAFile);
    }
    let bytes = fs::read(&g.file).map_err(GuestImageError::Unreadable)?;
    let format = classify(arch, &bytes)?;
    fits(arch, format, &bytes, g.mem_mib)?;
    if let Some(initrd) = &g.initrd {
        let meta = fs::metadata(initrd).map_err(GuestImageError::InitrdUnreadable)?;
        if meta.len() == 0 {
            return Err(GuestImageError::InitrdEmpty);
        }
    }
    Ok(format)
}

/// Builds `guests/testguests` for `arch` and flattens each ELF.
pub fn build_test_guests(arch: Arch) -> Result<PathBuf, LaunchError> {
    build_test_guests_from(arch, &workspace_root(), &out_dir().join("cargo").join("guests"), &guests_dir(arch))?;
    Ok(guests_dir(arch))
}

/// Where [`build_test_guests`] puts the flat images.
fn guests_dir(arch: Arch) -> PathBuf {
    out_dir().join(arch.name()).join("guests")
}

/// Builds the test guests of the source tree at `root` (another
/// revision's work tree, for qualification) with `target_dir` as cargo's,
/// and writes their flat images to `dir`. A guest that tree does not have
/// yet is left out; a run that names it fails on the missing file.
pub fn build_test_guests_from(arch: Arch, root: &Path, target_dir: &Path, dir: &Path) -> Result<(), LaunchError> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let status = Command::new(cargo)
        .current_dir(root)
        .args(["build", "--quiet", "--release", "-p", "testguests", "--bins", "--target", arch.triple()])
        .env("CARGO_TARGET_DIR", target_dir)
        .status()
        .map_err(io_err("running cargo build for the test guests"))?;
    if !status.success() {
        return Err(LaunchError::Build(format!("building the test guests failed ({status})")));
    }
    let current = root == workspace_root();
    fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    for bin in TEST_GUESTS {
        let elf_path = target_dir.join(arch.triple()).join("release").join(bin);
        if !current && !elf_path.exists() {
            continue;
        }
        let bytes = fs::read(&elf_path).map_err(io_err(format!("reading {}", elf_path.display())))?;
        let image = elf::parse(&bytes, elf_machine(arch))
            .map_err(|e| LaunchError::Image(format!("{}: {e}", elf_path.display())))?;
        // Flat image padded over bss, so whatever is appended to it (the
        // updater's bundle) is not cleared by the guest's bss zeroing.
        let mut flat = elf::flatten(&bytes, &image);
        flat.resize(((image.end() - image.base()) as usize).next_multiple_of(BLOB_ALIGN as usize), 0);
        write_atomic(&dir.join(format!("{bin}.bin")), &flat)?;
    }
    Ok(())
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
    place_for(guests, ram_mib, run_dir, Firmware::Dtb)
}

/// One `guest` line of a boot manifest (`loader/src/manifest.rs`) for `g`
/// (its image `bytes`), with `image` and `initrd` saying where they are:
/// addresses in memory, or file names on an EFI system partition.
fn manifest_line(text: &mut String, g: &GuestArg, bytes: &[u8], image: &str, initrd: Option<&str>) {
    let _ = write!(
        text,
        "guest name={} {image} format={} mem_mib={} vcpus={} privileged={}",
        g.name,
        format_of(bytes),
        g.mem_mib,
        g.vcpus,
        u8::from(g.privileged)
    );
    for d in &g.devices {
        let _ = write!(text, " device={d}");
    }
    if let Some(i) = initrd {
        let _ = write!(text, " {i}");
    }
    let _ = writeln!(text, " cmdline={}", g.cmdline);
}

/// Lays the guests out on an EFI system partition at `esp`: the files in
/// `EFI/BOOT/` beside the image the firmware boots, and `hvmanifest.txt`
/// naming them (`file=`, `initrd_file=`), which the hypervisor's EFI entry
/// reads when its command line has no `manifest=`. Returns the manifest.
pub fn esp_layout(guests: &[GuestArg], esp: &Path) -> Result<String, LaunchError> {
    let boot = esp.join("EFI").join("BOOT");
    fs::create_dir_all(&boot).map_err(io_err(format!("creating {}", boot.display())))?;
    let mut text = String::from("hvmanifest 1\n");
    for (i, g) in guests.iter().enumerate() {
        let bytes = fs::read(&g.file).map_err(io_err(format!("reading {}", g.file.display())))?;
        let name = format!("guest{i}.bin");
        fs::write(boot.join(&name), &bytes).map_err(io_err(format!("writing {name}")))?;
        let mut initrd_file = None;
        if let Some(initrd) = &g.initrd {
            let initrd_name = format!("initrd{i}.bin");
            fs::copy(initrd, boot.join(&initrd_name)).map_err(io_err(format!("copying {}", initrd.display())))?;
            initrd_file = Some(format!("initrd_file={initrd_name}"));
        }
        manifest_line(&mut text, g, &bytes, &format!("file={name}"), initrd_file.as_deref());
    }
    fs::write(boot.join("hvmanifest.txt"), &text).map_err(io_err("writing hvmanifest.txt"))?;
    Ok(text)
}

/// The hypervisor's image slots (shared with `hypervisor::slots`).
mod slots {
    #![allow(dead_code)]
    include!("../../hypervisor/src/slot_bases.rs");
}

/// [`place`] for a machine started by `firmware`: under UEFI the blobs go
/// low, right above the hypervisor's image slots, since edk2 allocates
/// from the top of RAM down (the hypervisor's EFI entry claims them from
/// the firmware and refuses to start if it cannot).
pub fn place_for(
    guests: &[GuestArg],
    ram_mib: u64,
    run_dir: &Path,
    firmware: Firmware,
) -> Result<Placement, LaunchError> {
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
    let start = match firmware {
        Firmware::Dtb => (ram_top - MIB).saturating_sub(total) & !(2 * MIB - 1),
        Firmware::Uefi => (slots::AARCH64_SLOT_BASES[1] + slots::SLOT_SIZE).next_multiple_of(2 * MIB),
    };
    let fits = match firmware {
        Firmware::Dtb => start >= VIRT_RAM_BASE + ram_mib * MIB / 2,
        Firmware::Uefi => start + total <= VIRT_RAM_BASE + ram_mib * MIB / 2,
    };
    if !fits {
        return Err(LaunchError::Image(format!(
            "guest images ({} MiB) do not fit in half of {ram_mib} MiB of RAM; use --mem",
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
        let image = format!("image={image_addr:#x} image_size={:#x}", bytes.len());
        let mut initrd = None;
        if let Some(i) = &g.initrd {
            let len = fs::metadata(i).map_err(io_err(format!("initrd {}", i.display())))?.len();
            initrd = Some(format!("initrd={at:#x} initrd_size={len:#x}"));
            blobs.push((i.clone(), at));
            at += len.next_multiple_of(BLOB_ALIGN);
        }
        manifest_line(&mut text, g, &bytes, &image, initrd.as_deref());
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
    fn guest_flag_values_are_all_checked() {
        let g = GuestArg::parse("dir/my kernel.bin,privileged=0,name=k-1,device=00:02.0,device=00:03.0").unwrap();
        assert_eq!((g.name.as_str(), g.privileged), ("k-1", false));
        assert_eq!(g.devices, ["00:02.0", "00:03.0"]);
        assert_eq!(GuestArg::parse("dir/my kernel.bin").unwrap().name, "my_kernel");
        assert!(GuestArg::parse("k,privileged=1").unwrap().privileged);
        assert_eq!(GuestArg::parse("k,cmdline=").unwrap().cmdline, "");
        let err = |spec: &str| GuestArg::parse(spec).unwrap_err();
        assert_eq!(
            err("k,privileged=no"),
            GuestSpecError::BadValue {
                key: "privileged",
                value: "no".into(),
                want: "privileged, privileged=1 or privileged=0"
            }
        );
        assert_eq!(err("k,vcpus=2,vcpus=3"), GuestSpecError::Repeated("vcpus"));
        assert_eq!(
            err("k,mem=32G"),
            GuestSpecError::BadValue {
                key: "mem",
                value: "32G".into(),
                want: "MiB, or a size with an M or G suffix, at most 16G"
            }
        );
        assert_eq!(
            err("k,mem=99999999999999999999G").to_string(),
            "bad mem='99999999999999999999G' (want MiB, or a size with an M or G suffix, at most 16G)"
        );
        assert_eq!(err("k,initrd="), GuestSpecError::BadValue { key: "initrd", value: String::new(), want: "a file" });
        assert_eq!(err("k,device=2"), GuestSpecError::BadValue { key: "device", value: "2".into(), want: "BB:DD.F" });
        assert_eq!(
            err("k,cmdline"),
            GuestSpecError::BadValue { key: "cmdline", value: String::new(), want: "cmdline=\"...\"" }
        );
        assert_eq!(err("k,,mem=4"), GuestSpecError::EmptyField);
        assert_eq!(err("k,cmdline=\"a,b"), GuestSpecError::UnbalancedQuote);
        assert_eq!(err(" ,mem=4"), GuestSpecError::NoFile);
        assert!(err("k,Mem=4").to_string().starts_with("unknown key 'Mem' (keys: mem, vcpus, privileged,"));
    }

    #[test]
    fn test_guests_are_lengthened_for_the_updates() {
        let mut list = default_guest_specs(Arch::Aarch64, Path::new("g"));
        list.push(GuestArg::parse("mine.bin,cmdline=ticks=5").unwrap());
        sized_for_updates(Arch::Aarch64, &mut list, 10);
        let cmd = |name: &str| list.iter().find(|g| g.name == name).map(|g| g.cmdline.clone()).unwrap();
        assert_eq!(cmd("heartbeat"), "ticks=1100");
        assert_eq!(cmd("memcheck"), "passes=165");
        assert_eq!(cmd("blackout"), "seconds=11");
        assert_eq!(cmd("mine"), "ticks=5", "guests that are not test guests are left alone");
        let mut x86 = default_guest_specs(Arch::X86_64, Path::new("g"));
        sized_for_updates(Arch::X86_64, &mut x86, 2);
        assert_eq!(x86[2].cmdline, "seconds=3 gap_report_us=20000");
        assert_eq!(updater_cmdline(3), "updates=3 delay_ms=250");
    }

    #[test]
    fn text_is_told_from_code() {
        assert!(looks_like_text(b"# Notes\n\tplain ASCII\r\n"));
        assert!(looks_like_text("a README \u{2014} with an em dash".as_bytes()));
        let cut = "ends in \u{2014}".as_bytes();
        assert!(looks_like_text(&cut[..cut.len() - 1]), "a character cut at the end of the window");
        assert!(!looks_like_text(b"\x00\x00\x00\x14"));
        assert!(!looks_like_text(b"text\x1b[0m with an escape"));
        assert!(!looks_like_text(b"\xd5\x03\x20\x1f\xff\xff"));
        assert!(!looks_like_text(b""));
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
