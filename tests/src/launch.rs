//! What `scripts/run` does, as a library: its options and their checks,
//! the guests of a run (the user's, the test guests, the updater), and the
//! run itself. `hvrun` is the command line around it, and the integration
//! tests call the same functions with the same arguments, so the demo and
//! the tests boot the same way (`shared/DESIGN.md` §8).
//!
//! Every option either takes effect or is refused with a one-line
//! [`OptionError`] naming it, before anything is built or booted.

use std::fmt;
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use crate::emulator::{self, RunOutcome, RunSpec};
use crate::guests::{self, GuestArg, GuestImageError, GuestSpecError};
use crate::image::{self, BuiltImage, ImageSpec, UPDATE_B_VERSION};
use crate::{Arch, Firmware, LaunchError, Machine};

pub const USAGE: &str = "\
usage: scripts/run [options] [-- emulator args...]

  --arch aarch64|x86_64      architecture (default: aarch64)
  --machine qemu|bochs|kvm   emulator (default: qemu for aarch64, bochs for x86_64)
                             x86_64: bochs = VT-x; qemu = TCG's AMD CPU, guests
                             under SVM with nested paging;
                             kvm = QEMU/KVM on an Intel host with nested VMX
  --firmware dtb|uefi        how QEMU starts the image. aarch64: dtb = QEMU loads it
                             and hands it a DTB (default); uefi = edk2 starts the same
                             image as an EFI application and describes the machine
                             with ACPI only, and the test guests include a DMA guest
                             given edu behind the SMMUv3. x86_64 (--machine qemu):
                             uefi = OVMF starts GRUB for EFI from the same ISO
                             (default: BIOS)
  --timeout SECONDS          stop the emulator after this long (default: 300)
  --cpus N                   CPUs, 1 to 8 (default: 2)
  --mem MIB                  RAM in MiB (default: 512 on QEMU, 128 on Bochs)
  --guest FILE[,mem=SIZE][,vcpus=N][,privileged][,name=NAME][,initrd=FILE][,device=BB:DD.F][,cmdline=\"...\"]
                             your own guest (repeatable): a flat binary, an ELF for
                             the architecture, or (aarch64) an arm64 Image. The
                             updater guest runs beside your guests and live-updates
                             the hypervisor under them (see --updates).
                             x86_64: no initrd; device= under --machine qemu only
                             (VT-d); vCPUs beyond the first wait for the guest's
                             INIT-SIPI-SIPI
  --linux                    (aarch64) run Debian's arm64 Linux kernel as a guest (2 vCPUs,
                             256 MiB; scripts/setup fetches it): it boots to userspace,
                             checks its memory and clock for 20 s while the updater
                             live-updates the hypervisor under it, and powers off
  --with-test-guests         also run the test guests (heartbeat, memcheck, blackout
                             meter, exerciser, isolation probe) beside yours
  --no-updater               no updater guest, so no live update (as --updates 0)
  --no-guests                boot the hypervisor alone
  --updates N                live updates the updater guest requests (default 10,
                             or 1 with --update-image), alternating between this
                             build (A) and a build with another version (B): A->B->A...
  --update-image FILE        hand the updater FILE instead of B (your own build, or a
                             deliberately bad one; A->FILE->A...) and report what
                             happens (aarch64: an arm64 Image; x86_64: a sealed ELF)
  --linger SECONDS           with your own guests: how long the run goes on after the
                             updater guest has stopped (default 3)
  -h, --help                 this text

Without --guest, the test guests run. A run ends when every guest has
stopped (`hv: shutdown status=ok`). Your own guests may never stop: with
them, the launcher also stops the machine --linger seconds after the
updater guest has stopped.
Everything after -- goes to the emulator's command line unchanged.
Exit status: 0 on `hv: shutdown status=ok`, or when the launcher stopped the
machine after the updater reported every update ok; 1 otherwise; 2 for an
option refused; 3 when --machine kvm cannot run on this host.";

/// Live updates the updater requests unless `--updates` says otherwise.
pub const DEFAULT_UPDATES: u32 = 10;
/// Seconds a run with the user's guests goes on after the updater stopped.
pub const DEFAULT_LINGER_S: u64 = 3;
/// The hypervisor brings up at most this many CPUs (`MAX_CPUS` in
/// `hypervisor/src/arch/*/mod.rs`); more would be silently idle.
pub const MAX_CPUS: u32 = 8;

/// The options of one run, as given and checked (one field per flag).
#[allow(clippy::struct_excessive_bools)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub arch: Arch,
    pub machine: Machine,
    pub timeout: u64,
    pub cpus: u32,
    pub mem: Option<u32>,
    /// The user's own guests (`--guest`).
    pub guests: Vec<GuestArg>,
    /// `--linux`: the stock Linux guest (`hv_tests::linux`) runs first.
    pub linux: bool,
    pub with_test_guests: bool,
    pub no_guests: bool,
    pub no_updater: bool,
    /// `--updates` as given.
    pub updates: Option<u32>,
    pub update_image: Option<PathBuf>,
    /// `--linger` as given.
    pub linger: Option<u64>,
    /// `--firmware`: how aarch64 QEMU starts the image.
    pub firmware: Firmware,
    pub extra: Vec<String>,
}

impl Options {
    /// The live updates the updater guest requests; 0 when no updater runs.
    pub fn updates(&self) -> u32 {
        if self.no_guests || self.no_updater {
            return 0;
        }
        self.updates.unwrap_or(if self.update_image.is_some() { 1 } else { DEFAULT_UPDATES })
    }

    /// Whether the test guests run: without `--guest` or `--linux`, or
    /// with `--with-test-guests`.
    pub fn runs_test_guests(&self) -> bool {
        !self.no_guests && ((self.guests.is_empty() && !self.linux) || self.with_test_guests)
    }

    /// How long the run goes on after the updater stopped, when the user's
    /// guests run beside it (they may never stop on their own).
    pub fn stop_after_updater(&self) -> Option<Duration> {
        (self.updates() > 0 && !self.guests.is_empty())
            .then(|| Duration::from_secs(self.linger.unwrap_or(DEFAULT_LINGER_S)))
    }

    /// The machine's RAM in MiB (1 GiB with the Linux guest).
    pub fn mem_mib(&self) -> u32 {
        let default = match (self.machine, self.linux) {
            (Machine::Bochs, _) => 128,
            (_, true) => 1024,
            (_, false) => 512,
        };
        self.mem.unwrap_or(default)
    }
}

/// Why an update image was refused.
#[derive(Debug)]
pub enum UpdateImageError {
    Unreadable(std::io::Error),
    NotAFile,
    Empty,
    TooLarge(u64),
}

impl fmt::Display for UpdateImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreadable(e) => write!(f, "cannot read the file: {e}"),
            Self::NotAFile => write!(f, "not a regular file"),
            Self::Empty => write!(f, "the file is empty: the updater would have nothing to hand over"),
            Self::TooLarge(bytes) => write!(
                f,
                "{} MiB, more than the {} MiB an update image may have (the updater carries it in its RAM)",
                bytes.div_ceil(1 << 20),
                guests::MAX_UPDATE_IMAGE >> 20
            ),
        }
    }
}

/// An option refused, with what to do instead. Displayed as one line that
/// names the option.
#[derive(Debug)]
pub enum OptionError {
    Unknown(String),
    MissingValue(&'static str),
    Repeated(&'static str),
    BadValue {
        flag: &'static str,
        value: String,
        want: &'static str,
    },
    Guest {
        spec: String,
        err: GuestSpecError,
    },
    GuestImage {
        file: PathBuf,
        err: GuestImageError,
    },
    UpdateImage {
        file: PathBuf,
        err: UpdateImageError,
    },
    /// `flag` would have no effect, or contradicts another option.
    NoEffect {
        flag: String,
        why: String,
    },
    DuplicateName {
        file: PathBuf,
        name: String,
        taken_by: &'static str,
    },
    TooManyGuests(usize),
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(o) => write!(f, "unknown option '{o}' (scripts/run --help lists them)"),
            Self::MissingValue(flag) => write!(f, "{flag} needs a value"),
            Self::Repeated(flag) => write!(f, "{flag} given twice"),
            Self::BadValue { flag, value, want } => write!(f, "{flag} '{value}': want {want}"),
            Self::Guest { spec, err } => write!(f, "--guest {spec}: {err}"),
            Self::GuestImage { file, err } => write!(f, "--guest {}: {err}", file.display()),
            Self::UpdateImage { file, err } => write!(f, "--update-image {}: {err}", file.display()),
            Self::NoEffect { flag, why } => write!(f, "{flag}: {why}"),
            Self::DuplicateName { file, name, taken_by } => write!(
                f,
                "--guest {}: {taken_by} is already named '{name}'; give this guest another name with ,name=...",
                file.display()
            ),
            Self::TooManyGuests(n) => write!(
                f,
                "--guest: {n} guests in all (with the test guests and the updater), more than the {} the hypervisor runs",
                loader::manifest::MAX_GUESTS
            ),
        }
    }
}

impl std::error::Error for OptionError {}

/// Every flag `parse` knows.
const FLAGS: [&str; 16] = [
    "--arch",
    "--firmware",
    "--linux",
    "--machine",
    "--timeout",
    "--cpus",
    "--mem",
    "--guest",
    "--with-test-guests",
    "--no-updater",
    "--no-guests",
    "--updates",
    "--update-image",
    "--linger",
    "-h",
    "--help",
];

fn number<T: std::str::FromStr + PartialOrd + Copy>(
    flag: &'static str,
    v: &str,
    min: T,
    max: Option<T>,
    want: &'static str,
) -> Result<T, OptionError> {
    v.parse::<T>()
        .ok()
        .filter(|n| *n >= min && max.as_ref().is_none_or(|m| n <= m))
        .ok_or_else(|| OptionError::BadValue { flag, value: v.to_string(), want })
}

/// Parses the command line: `Ok(None)` for `--help`. Checks every option
/// and how they combine, but reads no file (see [`check_files`]).
pub fn parse(args: &[String]) -> Result<Option<Options>, OptionError> {
    let mut arch = Arch::Aarch64;
    let mut machine = None;
    let mut o = Options {
        arch,
        machine: Machine::Qemu,
        timeout: 300,
        cpus: 2,
        mem: None,
        guests: Vec::new(),
        linux: false,
        with_test_guests: false,
        no_guests: false,
        no_updater: false,
        updates: None,
        update_image: None,
        linger: None,
        firmware: Firmware::Dtb,
        extra: Vec::new(),
    };
    let mut seen: Vec<&'static str> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            o.extra = it.by_ref().cloned().collect();
            break;
        }
        let flag = FLAGS.into_iter().find(|f| f == a).ok_or_else(|| OptionError::Unknown(a.clone()))?;
        if flag != "--guest" && seen.contains(&flag) {
            return Err(OptionError::Repeated(flag));
        }
        seen.push(flag);
        let mut value = || it.next().map(String::as_str).ok_or(OptionError::MissingValue(flag));
        match flag {
            "-h" | "--help" => return Ok(None),
            "--arch" => {
                let v = value()?;
                arch = Arch::parse(v).ok_or_else(|| OptionError::BadValue {
                    flag,
                    value: v.into(),
                    want: "aarch64 or x86_64",
                })?;
            }
            "--machine" => {
                let v = value()?;
                machine = Some(Machine::parse(v).ok_or_else(|| OptionError::BadValue {
                    flag,
                    value: v.into(),
                    want: "qemu, bochs or kvm",
                })?);
            }
            "--firmware" => {
                let v = value()?;
                o.firmware = Firmware::parse(v).ok_or_else(|| OptionError::BadValue {
                    flag,
                    value: v.into(),
                    want: "dtb or uefi",
                })?;
            }
            "--timeout" => o.timeout = number(flag, value()?, 1, None, "a number of seconds, at least 1")?,
            "--cpus" => o.cpus = number(flag, value()?, 1, Some(MAX_CPUS), "1 to 8 (the hypervisor runs at most 8)")?,
            "--mem" => o.mem = Some(number(flag, value()?, 1, None, "a number of MiB")?),
            "--guest" => {
                let v = value()?;
                o.guests.push(GuestArg::parse(v).map_err(|err| OptionError::Guest { spec: v.into(), err })?);
            }
            "--with-test-guests" => o.with_test_guests = true,
            "--linux" => o.linux = true,
            "--no-updater" => o.no_updater = true,
            "--no-guests" => o.no_guests = true,
            "--updates" => o.updates = Some(number(flag, value()?, 0, None, "a number of updates")?),
            "--update-image" => {
                let v = value()?;
                if v.is_empty() {
                    return Err(OptionError::MissingValue(flag));
                }
                o.update_image = Some(v.into());
            }
            _ => o.linger = Some(number(flag, value()?, 0, None, "a number of seconds")?),
        }
    }
    o.arch = arch;
    o.machine = machine.unwrap_or(Machine::default_for(arch));
    check_combination(&o)?;
    check_guests(&o)?;
    Ok(Some(o))
}

fn no_effect(flag: &str, why: &str) -> OptionError {
    OptionError::NoEffect { flag: flag.to_string(), why: why.to_string() }
}

/// Refuses options that would have no effect together.
fn check_combination(o: &Options) -> Result<(), OptionError> {
    match (o.arch, o.machine) {
        (Arch::Aarch64, Machine::Qemu) | (Arch::X86_64, _) => {}
        (Arch::Aarch64, m) => {
            return Err(no_effect(&format!("--machine {m:?}").to_lowercase(), "aarch64 runs under qemu only"));
        }
    }
    if o.firmware == Firmware::Uefi && o.arch == Arch::X86_64 && o.machine != Machine::Qemu {
        return Err(no_effect(
            "--firmware uefi",
            "x86_64 starts from UEFI (OVMF) under --machine qemu only: Bochs with OVMF has no ACPI tables",
        ));
    }
    let updates = o.updates.map(|n| format!("--updates {n}"));
    let image = o.update_image.as_ref().map(|f| format!("--update-image {}", f.display()));
    let linger = o.linger.map(|s| format!("--linger {s}"));
    let first_guest = o.guests.first().map(|g| format!("--guest {}", g.file.display()));
    if o.no_guests {
        let why = "--no-guests boots the hypervisor alone";
        if o.linux {
            return Err(no_effect("--linux", why));
        }
        let explicit = [first_guest, updates.filter(|_| o.updates != Some(0)), image, linger];
        if let Some(flag) = explicit.into_iter().flatten().next() {
            return Err(no_effect(&flag, why));
        }
        for (set, flag) in [(o.with_test_guests, "--with-test-guests"), (o.no_updater, "--no-updater")] {
            if set {
                return Err(no_effect(flag, why));
            }
        }
        return Ok(());
    }
    if o.linux && o.arch != Arch::Aarch64 {
        return Err(no_effect("--linux", "the Linux guest is Debian's arm64 kernel: it runs with --arch aarch64"));
    }
    if o.with_test_guests && o.guests.is_empty() && !o.linux {
        return Err(no_effect(
            "--with-test-guests",
            "adds the test guests beside your --guest ones, and none is given",
        ));
    }
    if o.no_updater {
        if let Some(flag) = updates.filter(|_| o.updates != Some(0)) {
            return Err(no_effect(&flag, "--no-updater leaves out the updater guest, so nothing would request them"));
        }
        if let Some(flag) = image {
            return Err(no_effect(&flag, "--no-updater leaves out the updater guest that would hand it over"));
        }
    }
    if o.updates == Some(0) {
        if let Some(flag) = image {
            return Err(no_effect(&flag, "--updates 0 requests no update that would use it"));
        }
    }
    if let Some(flag) = linger {
        if o.updates() == 0 {
            return Err(no_effect(&flag, "no updater runs, so no run ends after it"));
        }
        if o.guests.is_empty() {
            return Err(no_effect(
                &flag,
                "the test guests alone end the run by themselves; --linger is for your own guests",
            ));
        }
    }
    Ok(())
}

/// Refuses guest names that clash (the hypervisor refuses a manifest with
/// two guests of one name), too many guests, and what x86_64 cannot run.
fn check_guests(o: &Options) -> Result<(), OptionError> {
    if o.no_guests {
        return Ok(());
    }
    let tests: Vec<String> = if o.runs_test_guests() {
        guests::default_guest_specs(o.arch, std::path::Path::new("")).into_iter().map(|g| g.name).collect()
    } else {
        Vec::new()
    };
    for (k, g) in o.guests.iter().enumerate() {
        let taken_by = if o.guests[..k].iter().any(|other| other.name == g.name) {
            Some("another --guest")
        } else if tests.contains(&g.name) {
            Some("a test guest (--with-test-guests)")
        } else if o.updates() > 0 && g.name == guests::UPDATER {
            Some("the updater guest")
        } else {
            None
        };
        if let Some(taken_by) = taken_by {
            return Err(OptionError::DuplicateName { file: g.file.clone(), name: g.name.clone(), taken_by });
        }
        if o.arch == Arch::X86_64 {
            if let Some(why) = guests::x86_64_refusal(g) {
                return Err(no_effect(&format!("--guest {}", g.file.display()), &why));
            }
            if !g.devices.is_empty() && o.machine != Machine::Qemu {
                let why = "Bochs has no IOMMU to confine a device's DMA; use --machine qemu (VT-d)";
                return Err(no_effect(&format!("--guest {}", g.file.display()), why));
            }
        }
    }
    let total = o.guests.len() + tests.len() + usize::from(o.updates() > 0);
    if total > loader::manifest::MAX_GUESTS {
        return Err(OptionError::TooManyGuests(total));
    }
    Ok(())
}

/// Checks the files the options name: each `--guest` image (and initrd) is
/// something the architecture can boot in the RAM asked for, and the
/// `--update-image` is a non-empty file the updater can carry.
pub fn check_files(o: &Options) -> Result<(), OptionError> {
    for g in &o.guests {
        guests::check_image(o.arch, g).map_err(|err| OptionError::GuestImage { file: g.file.clone(), err })?;
    }
    if let Some(file) = &o.update_image {
        let refuse = |err| OptionError::UpdateImage { file: file.clone(), err };
        let meta = fs::metadata(file).map_err(|e| refuse(UpdateImageError::Unreadable(e)))?;
        if !meta.is_file() {
            return Err(refuse(UpdateImageError::NotAFile));
        }
        if meta.len() == 0 {
            return Err(refuse(UpdateImageError::Empty));
        }
        if meta.len() > guests::MAX_UPDATE_IMAGE {
            return Err(refuse(UpdateImageError::TooLarge(meta.len())));
        }
    }
    Ok(())
}

/// [`parse`] and then [`check_files`]: everything refused before a build.
pub fn options(args: &[String]) -> Result<Option<Options>, OptionError> {
    let Some(o) = parse(args)? else { return Ok(None) };
    check_files(&o)?;
    Ok(Some(o))
}

/// A run ready to start.
#[derive(Debug)]
pub struct Prepared {
    /// What the emulator boots (x86_64: the ISO with the guests on it).
    pub image: BuiltImage,
    pub spec: RunSpec,
    pub guests: Vec<GuestArg>,
    /// The names of the user's own guests.
    pub own: Vec<String>,
    /// The updates the updater requests (0: no updater).
    pub updates: u32,
}

/// The guests of a run, in partition order: the user's, then the test
/// guests (sized to outlive the updates), then the updater carrying B and
/// A (or the `--update-image` and A).
fn guest_list(o: &Options, image: &BuiltImage) -> Result<Vec<GuestArg>, LaunchError> {
    let updates = o.updates();
    let mut list = o.guests.clone();
    if o.linux {
        eprintln!("hvrun: building the Linux guest's initramfs ({})", crate::linux::debian_dir().display());
        list.insert(0, crate::linux::linux_guest(crate::linux::DEFAULT_CHECK_SECONDS)?);
    }
    if o.runs_test_guests() || updates > 0 {
        eprintln!("hvrun: building the test guests");
        let dir = guests::build_test_guests(o.arch)?;
        if o.runs_test_guests() {
            let mut tests = guests::default_guest_specs(o.arch, &dir);
            if o.firmware == Firmware::Uefi && o.arch == Arch::Aarch64 {
                // The machine from ACPI: the SMMUv3 and the device's stream
                // id from the IORT, the BAR window from the firmware. First,
                // so the blackout meter and the updater stay on different
                // CPUs (guests go to the CPUs in turn): the meter would
                // otherwise count the updater's time slice after each update.
                tests.insert(0, guests::dma_guest(&dir));
            }
            guests::sized_for_updates(o.arch, &mut tests, updates);
            list.extend(tests);
        }
    }
    if updates > 0 {
        let other = if let Some(file) = &o.update_image {
            file.clone()
        } else {
            eprintln!("hvrun: building update image B (version {UPDATE_B_VERSION})");
            image::build(&ImageSpec {
                arch: o.arch,
                version: Some(UPDATE_B_VERSION.into()),
                slot: image::update_slot(o.arch),
            })?
            .update_image()
        };
        let images = [other, image.update_image()];
        // Beside Linux, updates 1.5 s apart land while its check runs
        // (it reaches userspace about 2 s in and checks for 20 s).
        let cmdline =
            if o.linux { format!("updates={updates} delay_ms=1500") } else { guests::updater_cmdline(updates) };
        list.push(guests::updater_guest_sized(o.arch, &images, &cmdline)?);
    }
    Ok(list)
}

/// Builds the image, the guests and their boot manifest (aarch64) or ISO
/// (x86_64), and sets up the emulator; `run_name` names the run directory
/// under `target/hv/runs`.
pub fn prepare(o: &Options, run_name: &str) -> Result<Prepared, LaunchError> {
    eprintln!("hvrun: building the {} image", o.arch.name());
    let mut image = image::build(&ImageSpec { arch: o.arch, version: None, slot: 0 })?;
    let mut spec = RunSpec::new(run_name, o.machine);
    spec.cpus = o.cpus;
    spec.mem_mib = o.mem_mib();
    spec.timeout = Duration::from_secs(o.timeout);
    spec.extra_args.clone_from(&o.extra);
    spec.stop_after_updater = o.stop_after_updater();
    spec.firmware = o.firmware;
    // x86_64 under QEMU: a q35 with a VT-d unit and edu, which the image
    // brings up and probes when it runs no guests (every device blocked,
    // then a table of its own).
    spec.devices = o.arch == Arch::X86_64 && o.machine == Machine::Qemu;
    let list = if o.no_guests { Vec::new() } else { guest_list(o, &image)? };
    let dir = emulator::run_dir(&spec);
    if !list.is_empty() {
        match o.arch {
            Arch::Aarch64 => {
                fs::create_dir_all(&dir)
                    .map_err(|err| LaunchError::Io { what: format!("creating {}", dir.display()), err })?;
                let placed = guests::place_for(&list, u64::from(spec.mem_mib), &dir, o.firmware)?;
                eprint!("hvrun: manifest:\n{}", placed.manifest_text);
                spec.blobs = placed.blobs;
                spec.cmdline = Some(placed.cmdline);
                spec.devices = placed.needs_devices;
            }
            Arch::X86_64 => {
                let modules = guests::grub_modules(&list)?;
                eprintln!("hvrun: guest modules:");
                for m in &modules {
                    eprintln!("  module2 {} {}", m.file.display(), m.args.join(" "));
                }
                image = image::iso_with_modules(&image, &modules, &dir)?;
            }
        }
    }
    Ok(Prepared {
        image,
        spec,
        own: o.guests.iter().map(|g| g.name.clone()).collect(),
        guests: list,
        updates: o.updates(),
    })
}

/// Boots the prepared run and collects its serial output.
pub fn run(p: &Prepared) -> Result<RunOutcome, LaunchError> {
    emulator::run(&p.image, &p.spec)
}

/// The summary printed after a run with guests.
pub fn summary(p: &Prepared, run: &RunOutcome) -> String {
    crate::summary::render(&run.events, &run.serial, &p.own)
}

/// How the run went: `Ok` with a line for the user, or `Err` with the
/// reason and the tail of the log.
pub fn verdict(p: &Prepared, run: &RunOutcome) -> Result<String, String> {
    let secs = run.elapsed.as_secs_f64();
    if run.clean_shutdown() {
        return Ok(format!("clean shutdown after {secs:.1}s"));
    }
    if !run.stopped_after_updater {
        return Err(run.failure("no `hv: shutdown status=ok` event"));
    }
    let updater = run
        .hv("guest-start")
        .into_iter()
        .find(|e| e.get("name") == Some(guests::UPDATER))
        .and_then(|e| e.num("id"))
        .and_then(|id| u32::try_from(id).ok());
    let done = updater.and_then(|id| run.guest(id, "updater").into_iter().find(|e| e.get("done").is_some()));
    let updates_done = run.hv("update-done").len();
    match done {
        Some(e) if e.num("ok") == Some(1) => Ok(format!(
            "the updater guest finished ({updates_done} of {} updates done, every status as expected); \
             the launcher stopped the machine {}s later with your guests running, after {secs:.1}s",
            p.updates,
            p.spec.stop_after_updater.map_or(0, |d| d.as_secs())
        )),
        Some(e) => Err(run.failure(&format!(
            "the updater guest reported failed={} of updates={} ({updates_done} update-done events)",
            e.get("failed").unwrap_or("?"),
            e.get("updates").unwrap_or("?")
        ))),
        None => Err(run.failure("the updater guest stopped without reporting its updates")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_string).collect()
    }

    fn ok(line: &str) -> Options {
        match parse(&args(line)) {
            Ok(Some(o)) => o,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn err(line: &str) -> String {
        match parse(&args(line)) {
            Err(e) => e.to_string(),
            other => panic!("{line}: expected an error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_run_the_test_guests_and_ten_updates() {
        let o = ok("");
        assert_eq!((o.arch, o.machine, o.cpus, o.mem_mib(), o.timeout), (Arch::Aarch64, Machine::Qemu, 2, 512, 300));
        assert!(o.runs_test_guests());
        assert_eq!(o.updates(), 10);
        assert_eq!(o.stop_after_updater(), None, "the test guests end the run themselves");
        let x = ok("--arch x86_64");
        assert_eq!((x.machine, x.mem_mib()), (Machine::Bochs, 128));
        assert_eq!(parse(&args("--help")).ok(), Some(None));
    }

    #[test]
    fn own_guests_run_with_the_updater() {
        let o = ok("--guest k.bin,mem=256 --updates 2");
        assert_eq!(o.guests.len(), 1);
        assert_eq!(o.guests[0].mem_mib, 256);
        assert!(!o.runs_test_guests());
        assert_eq!(o.updates(), 2);
        assert_eq!(o.stop_after_updater(), Some(Duration::from_secs(DEFAULT_LINGER_S)));
        // The default number of updates applies to the user's guests too.
        assert_eq!(ok("--guest k.bin").updates(), 10);
        let no = ok("--guest k.bin --no-updater");
        assert_eq!((no.updates(), no.stop_after_updater()), (0, None));
        assert_eq!(ok("--guest k.bin --updates 0").updates(), 0);
        let mixed = ok("--guest k.bin --with-test-guests --updates 3 --linger 7");
        assert!(mixed.runs_test_guests());
        assert_eq!(mixed.stop_after_updater(), Some(Duration::from_secs(7)));
        // Same on x86_64 under Bochs.
        let x = ok("--arch x86_64 --guest k.bin,mem=4 --updates 2");
        assert_eq!((x.updates(), x.machine), (2, Machine::Bochs));
    }

    #[test]
    fn firmware_is_dtb_unless_uefi_is_asked_for_on_aarch64() {
        assert_eq!(ok("").firmware, Firmware::Dtb);
        assert_eq!(ok("--firmware uefi --updates 2").firmware, Firmware::Uefi);
        assert!(err("--firmware bios").contains("dtb or uefi"), "{}", err("--firmware bios"));
        assert!(err("--arch x86_64 --firmware uefi").contains("--machine qemu only"));
        assert_eq!(ok("--arch x86_64 --machine qemu --firmware uefi").firmware, Firmware::Uefi);
    }

    #[test]
    fn an_update_image_means_one_update_unless_told() {
        assert_eq!(ok("--update-image my.img").updates(), 1);
        assert_eq!(ok("--update-image my.img --updates 4").updates(), 4);
        assert_eq!(ok("--guest k.bin --update-image my.img").updates(), 1);
    }

    #[test]
    fn options_without_effect_are_refused_by_name() {
        let cases = [
            ("--guest k.bin --no-updater --updates 3", "--updates 3: --no-updater leaves out the updater guest"),
            ("--no-updater --updates 3", "--updates 3: --no-updater"),
            ("--no-guests --updates 3", "--updates 3: --no-guests boots the hypervisor alone"),
            ("--no-guests --guest k.bin", "--guest k.bin: --no-guests"),
            ("--no-guests --update-image x.img", "--update-image x.img: --no-guests"),
            ("--no-guests --no-updater", "--no-updater: --no-guests"),
            ("--no-updater --update-image x.img", "--update-image x.img: --no-updater leaves out the updater guest"),
            ("--updates 0 --update-image x.img", "--update-image x.img: --updates 0 requests no update"),
            ("--with-test-guests", "--with-test-guests: adds the test guests beside your --guest ones"),
            ("--linger 5", "--linger 5: the test guests alone end the run by themselves"),
            ("--guest k.bin --no-updater --linger 5", "--linger 5: no updater runs"),
            ("--machine bochs", "--machine bochs: aarch64 runs under qemu only"),
            ("--machine kvm", "--machine kvm: aarch64 runs under qemu only"),
        ];
        for (line, want) in cases {
            let e = err(line);
            assert!(e.starts_with(want), "{line}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        // x86_64 under QEMU TCG runs guests and updates under AMD SVM.
        assert_eq!(ok("--arch x86_64 --machine qemu --updates 2").updates(), 2);
        assert_eq!(ok("--arch x86_64 --machine qemu --guest k.bin").guests.len(), 1);
        // Saying the same thing twice is not refused: --no-guests with --updates 0.
        assert_eq!(ok("--no-guests --updates 0").updates(), 0);
        assert_eq!(ok("--guest k.bin --no-updater --updates 0").updates(), 0);
    }

    #[test]
    fn bad_values_and_unknown_options_are_refused() {
        let cases = [
            ("--colour red", "unknown option '--colour'"),
            ("--updates", "--updates needs a value"),
            ("--updates many", "--updates 'many': want a number of updates"),
            ("--updates -1", "--updates '-1'"),
            ("--cpus 0", "--cpus '0': want 1 to 8"),
            ("--cpus 9", "--cpus '9': want 1 to 8"),
            ("--timeout 0", "--timeout '0'"),
            ("--mem 0", "--mem '0'"),
            ("--arch sparc", "--arch 'sparc': want aarch64 or x86_64"),
            ("--machine vbox", "--machine 'vbox': want qemu, bochs or kvm"),
            ("--updates 1 --updates 2", "--updates given twice"),
            ("--arch x86_64 --arch aarch64", "--arch given twice"),
            ("--guest k.bin,colour=red", "--guest k.bin,colour=red: unknown key 'colour' (keys: mem, vcpus,"),
            ("--guest k.bin,mem=lots", "--guest k.bin,mem=lots: bad mem='lots'"),
            ("--guest k.bin,mem=64,mem=32", "--guest k.bin,mem=64,mem=32: mem= given twice"),
            ("--guest k.bin,privileged=yes", "--guest k.bin,privileged=yes: bad privileged='yes'"),
            ("--guest k.bin,", "--guest k.bin,: an empty field"),
            ("--guest ,mem=4", "--guest ,mem=4: no file"),
            ("--guest k.bin,cmdline=\"a", "--guest k.bin,cmdline=\"a: a double quote is not closed"),
            ("--guest k.bin,name=a/b", "--guest k.bin,name=a/b: bad name='a/b'"),
            ("--update-image", "--update-image needs a value"),
        ];
        for (line, want) in cases {
            let e = err(line);
            assert!(e.starts_with(want), "{line}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        // Everything after -- is the emulator's.
        assert_eq!(ok("-- -icount shift=0 --colour").extra, ["-icount", "shift=0", "--colour"]);
    }

    #[test]
    fn guest_names_must_not_clash() {
        let cases = [
            ("--guest a/k.bin --guest b/k.bin", "--guest b/k.bin: another --guest is already named 'k'"),
            ("--guest heartbeat.bin --with-test-guests", "--guest heartbeat.bin: a test guest (--with-test-guests)"),
            ("--guest updater.bin", "--guest updater.bin: the updater guest is already named 'updater'"),
        ];
        for (line, want) in cases {
            let e = err(line);
            assert!(e.starts_with(want), "{line}: {e}");
        }
        assert_eq!(ok("--guest a/k.bin --guest b/k.bin,name=k2").guests.len(), 2);
        assert_eq!(ok("--guest heartbeat.bin").guests[0].name, "heartbeat");
        assert_eq!(ok("--guest updater.bin --no-updater").guests[0].name, "updater");
        let many = (0..12).map(|i| format!("--guest g{i}.bin")).collect::<Vec<_>>().join(" ");
        assert!(err(&format!("{many} --with-test-guests")).starts_with("--guest: 18 guests in all"));
    }

    #[test]
    fn x86_64_refuses_what_a_multiboot2_module_cannot_carry() {
        let cases = [
            ("--arch x86_64 --guest k.bin,initrd=i.img", "--guest k.bin: an initrd is not supported on x86_64"),
            ("--arch x86_64 --guest k.bin,device=00:02.0", "--guest k.bin: Bochs has no IOMMU"),
            ("--arch x86_64 --guest k.bin,cmdline=a=$x", "--guest k.bin: the command line may not contain"),
        ];
        for (line, want) in cases {
            let e = err(line);
            assert!(e.starts_with(want), "{line}: {e}");
        }
        assert_eq!(ok("--guest k.bin,vcpus=2,initrd=i.img").guests[0].vcpus, 2);
        // Under QEMU (SVM) the q35's VT-d unit translates its DMA.
        assert_eq!(ok("--arch x86_64 --machine qemu --guest k.bin,device=00:03.0").guests[0].devices, ["00:03.0"]);
        // vCPUs beyond the first start with INIT-SIPI-SIPI from the guest.
        assert_eq!(ok("--arch x86_64 --guest k.bin,vcpus=2").guests[0].vcpus, 2);
    }

    /// A scratch directory for file checks, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("hv-launch-{tag}-{}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn file(&self, name: &str, bytes: &[u8]) -> String {
            let p = self.0.join(name);
            fs::write(&p, bytes).unwrap();
            p.display().to_string()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn file_err(line: &str) -> String {
        match options(&args(line)) {
            Err(e) => e.to_string(),
            other => panic!("{line}: expected an error, got {other:?}"),
        }
    }

    #[test]
    fn update_images_that_cannot_be_carried_are_refused() {
        let s = Scratch::new("update");
        let empty = s.file("empty.img", b"");
        let good = s.file("good.img", &[0x41; 4096]);
        let dir = s.0.display().to_string();
        assert!(file_err(&format!("--update-image {empty}"))
            .ends_with("empty.img: the file is empty: the updater would have nothing to hand over"));
        assert!(file_err(&format!("--update-image {dir}")).ends_with(": not a regular file"));
        assert!(file_err(&format!("--update-image {dir}/none.img")).contains("none.img: cannot read the file"));
        let big = fs::File::create(s.0.join("big.img")).unwrap();
        big.set_len(guests::MAX_UPDATE_IMAGE + 1).unwrap();
        let e = file_err(&format!("--update-image {dir}/big.img"));
        assert!(e.contains("big.img: 65 MiB, more than the 64 MiB"), "{e}");
        // Content is not judged: a deliberately bad image is for the
        // hypervisor to refuse, and the run reports how.
        assert!(options(&args(&format!("--update-image {good}"))).is_ok());
    }

    #[test]
    fn guest_files_the_arch_cannot_boot_are_refused() {
        let s = Scratch::new("guest");
        let mut flat = vec![0u8; 8192];
        flat[..4].copy_from_slice(&[0x00, 0x00, 0x00, 0x14]);
        let flat = s.file("flat.bin", &flat);
        let mut image = vec![0u8; 8192];
        image[56..60].copy_from_slice(b"ARM\x64");
        let image = s.file("Image", &image);
        let cases: Vec<(String, &str)> = vec![
            (format!("--guest {}", s.file("empty.bin", b"")), "empty.bin: the file is empty"),
            (format!("--guest {}/none.bin", s.0.display()), "none.bin: cannot read the file"),
            (format!("--guest {}", s.0.display()), ": not a regular file"),
            (format!("--guest {}", s.file("k.gz", b"\x1f\x8b\x08\0rest")), "k.gz: a gzip-compressed file"),
            (format!("--guest {}", s.file("notes.txt", b"#!/bin/sh\necho hi\n")), "notes.txt: looks like a text file"),
            (
                format!("--guest {}", s.file("README.md", "# Read me \u{2014} notes\n".as_bytes())),
                "README.md: looks like a text file",
            ),
            (format!("--guest {}", s.file("k.efi", b"MZ\x90\0\x03\0\0\0")), "k.efi: a PE/COFF (EFI) executable"),
            (
                format!("--guest {}", s.file("x.elf", b"\x7fELF\x02\x01\x01\0garbage")),
                "x.elf: not an ELF this architecture can boot",
            ),
            (format!("--arch x86_64 --guest {image},mem=4"), "Image: an arm64 Image cannot boot on x86_64"),
            (format!("--guest {flat},mem=2"), "flat.bin: mem=2M is below the 4 MiB"),
            (format!("--guest {flat},initrd={}/none.img", s.0.display()), "flat.bin: cannot read the initrd"),
        ];
        for (line, want) in &cases {
            let e = file_err(line);
            assert!(e.starts_with("--guest ") && e.contains(want), "{line}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        let mut bz = vec![0u8; 8192];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bz = s.file("bzImage", &bz);
        assert!(file_err(&format!("--arch x86_64 --guest {bz},mem=4")).contains("a Linux bzImage"));
        let big = s.file("big.bin", &vec![1u8; 3 << 20]);
        let e = file_err(&format!("--guest {big},mem=4"));
        assert!(e.contains("big.bin: the image needs 3072 KiB, more than the 2048 KiB mem=4M leaves for it"), "{e}");
        assert!(options(&args(&format!("--guest {flat},mem=4"))).is_ok());
        assert!(options(&args(&format!("--arch x86_64 --guest {big},mem=4"))).is_ok());
        assert!(options(&args(&format!("--guest {image},mem=16"))).is_ok());
    }
}
