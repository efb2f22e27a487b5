//! `hvrun`: build the hypervisor, boot it in an emulator, stream its serial
//! output. `scripts/run` is a thin wrapper around this.

use std::process::ExitCode;
use std::time::Duration;

use hv_tests::emulator::{self, RunSpec};
use hv_tests::guests::{self, GuestArg};
use hv_tests::image::{self, BuiltImage, ImageSpec, UPDATE_B_VERSION};
use hv_tests::{Arch, Machine};

const USAGE: &str = "\
usage: scripts/run [options] [-- emulator args...]

  --arch aarch64|x86_64      architecture (default: aarch64)
  --machine qemu|bochs|kvm   emulator (default: qemu for aarch64, bochs for x86_64)
                             kvm = QEMU/KVM on an Intel host with nested VMX
  --timeout SECONDS          stop the emulator after this long (default: 300)
  --cpus N                   CPUs (default: 2)
  --mem MIB                  RAM in MiB (default: 512 on QEMU, 128 on Bochs)
  --guest FILE[,mem=SIZE][,vcpus=N][,privileged][,initrd=FILE][,device=BB:DD.F][,cmdline=\"...\"]
                             a guest to run (repeatable); without any, the
                             built-in test guests run (x86_64: as multiboot2
                             modules on the ISO; initrd and device are aarch64-only)
  --no-guests                boot the hypervisor alone
  --updates N                live updates the updater guest requests (default 10),
                             alternating between this build (A) and a build with
                             another version (B): A->B->A...
  --update-image FILE        stage FILE as the update image instead (your own build,
                             or a deliberately bad one) and report what happens
                             (aarch64: an arm64 Image; x86_64: a sealed ELF)
  -h, --help                 this text

Everything after -- goes to the emulator's command line unchanged.
Exit status: 0 when the hypervisor reports `hv: shutdown status=ok`.";

struct Options {
    arch: Arch,
    machine: Option<Machine>,
    timeout: u64,
    cpus: u32,
    mem: Option<u32>,
    guests: Vec<GuestArg>,
    no_guests: bool,
    updates: u32,
    update_image: Option<std::path::PathBuf>,
    extra: Vec<String>,
}

fn value<'a>(args: &mut impl Iterator<Item = &'a String>, flag: &str) -> Result<&'a String, String> {
    args.next().ok_or_else(|| format!("{flag} needs a value"))
}

fn number<T: std::str::FromStr>(s: &str, flag: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("{flag}: '{s}' is not a number"))
}

fn parse(args: &[String]) -> Result<Option<Options>, String> {
    let mut o = Options {
        arch: Arch::Aarch64,
        machine: None,
        timeout: 300,
        cpus: 2,
        mem: None,
        guests: Vec::new(),
        no_guests: false,
        updates: 10,
        update_image: None,
        extra: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => return Ok(None),
            "--arch" => {
                let v = value(&mut it, a)?;
                o.arch = Arch::parse(v).ok_or_else(|| format!("unknown --arch '{v}'"))?;
            }
            "--machine" => {
                let v = value(&mut it, a)?;
                o.machine = Some(Machine::parse(v).ok_or_else(|| format!("unknown --machine '{v}'"))?);
            }
            "--timeout" => o.timeout = number(value(&mut it, a)?, a)?,
            "--cpus" => o.cpus = number(value(&mut it, a)?, a)?,
            "--mem" => o.mem = Some(number(value(&mut it, a)?, a)?),
            "--guest" => {
                let v = value(&mut it, a)?;
                o.guests.push(GuestArg::parse(v).map_err(|e| format!("--guest {v}: {e}"))?);
            }
            "--no-guests" => o.no_guests = true,
            "--updates" => o.updates = number(value(&mut it, a)?, a)?,
            "--update-image" => o.update_image = Some(value(&mut it, a)?.into()),
            "--" => {
                o.extra = it.by_ref().cloned().collect();
            }
            other => return Err(format!("unknown option '{other}'")),
        }
    }
    Ok(Some(o))
}

/// The guests to run: the user's, or the test guests plus the updater
/// carrying image B and this image A (or `--update-image`).
fn guest_list(o: &Options, image: &BuiltImage) -> Result<Vec<GuestArg>, hv_tests::LaunchError> {
    if !o.guests.is_empty() {
        return Ok(o.guests.clone());
    }
    eprintln!("hvrun: building the test guests");
    let images = match (&o.update_image, o.updates) {
        (_, 0) => Vec::new(),
        (Some(file), _) => vec![file.clone()],
        (None, _) => {
            eprintln!("hvrun: building update image B (version {UPDATE_B_VERSION})");
            let b = image::build(&ImageSpec { arch: o.arch, version: Some(UPDATE_B_VERSION.into()) })?;
            vec![b.update_image(), image.update_image()]
        }
    };
    let updates = if o.update_image.is_some() { o.updates.min(1) } else { o.updates };
    guests::demo_guests(o.arch, &images, updates)
}

/// The x86_64 ISO with the guests as multiboot2 modules: the user's, or
/// the test guests and the updater.
fn x86_iso(o: &Options, image: &BuiltImage, dir: &std::path::Path) -> Result<BuiltImage, hv_tests::LaunchError> {
    let list = guest_list(o, image)?;
    let modules = guests::grub_modules(&list)?;
    eprintln!("hvrun: guest modules:");
    for m in &modules {
        eprintln!("  module2 {} {}", m.file.display(), m.args.join(" "));
    }
    image::iso_with_modules(image, &modules, dir)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = match parse(&args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("hvrun: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let machine = o.machine.unwrap_or(Machine::default_for(o.arch));
    if machine == Machine::Kvm {
        if let Err(why) = emulator::kvm_vmx_usable() {
            eprintln!("hvrun: --machine kvm refused: {why}.\nUse --machine bochs (VMX emulated) on this host.");
            return ExitCode::from(3);
        }
    }
    eprintln!("hvrun: building the {} image", o.arch.name());
    let mut image = match image::build(&ImageSpec { arch: o.arch, version: None }) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("hvrun: {e}");
            return ExitCode::from(1);
        }
    };
    let mut spec = RunSpec::new(&format!("run-{}-{machine:?}", o.arch.name()).to_lowercase(), machine);
    spec.cpus = o.cpus;
    spec.mem_mib = o.mem.unwrap_or(if machine == Machine::Bochs { 128 } else { 512 });
    spec.timeout = Duration::from_secs(o.timeout);
    spec.extra_args.clone_from(&o.extra);
    spec.stream = true;
    let mut with_guest_summary = false;
    if o.arch == Arch::Aarch64 && !o.no_guests {
        let placed = guest_list(&o, &image).and_then(|list| {
            let dir = emulator::run_dir(&spec);
            std::fs::create_dir_all(&dir)
                .map_err(|e| hv_tests::LaunchError::Io { what: format!("creating {}", dir.display()), err: e })?;
            guests::place(&list, u64::from(spec.mem_mib), &dir)
        });
        match placed {
            Ok(p) => {
                eprint!("hvrun: manifest:\n{}", p.manifest_text);
                spec.blobs = p.blobs;
                spec.cmdline = Some(p.cmdline);
                spec.devices = p.needs_devices;
            }
            Err(e) => {
                eprintln!("hvrun: {e}");
                return ExitCode::from(1);
            }
        }
    } else if o.arch == Arch::X86_64 && !o.no_guests {
        match x86_iso(&o, &image, &emulator::run_dir(&spec)) {
            Ok(with_guests) => {
                image = with_guests;
                with_guest_summary = true;
            }
            Err(e) => {
                eprintln!("hvrun: {e}");
                return ExitCode::from(1);
            }
        }
    }
    eprintln!(
        "hvrun: booting {} on {machine:?} ({} CPUs, {} MiB, timeout {}s)",
        image.bootable.display(),
        spec.cpus,
        spec.mem_mib,
        o.timeout
    );
    let outcome = match emulator::run(&image, &spec) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hvrun: {e}");
            return ExitCode::from(1);
        }
    };
    if spec.cmdline.is_some() || with_guest_summary {
        print!("{}", hv_tests::summary::render(&outcome.events));
    }
    if outcome.clean_shutdown() {
        eprintln!(
            "hvrun: clean shutdown after {:.1}s; serial log: {}",
            outcome.elapsed.as_secs_f64(),
            outcome.log_path.display()
        );
        ExitCode::SUCCESS
    } else {
        eprintln!("hvrun: {}", outcome.failure("no `hv: shutdown status=ok` event"));
        ExitCode::from(1)
    }
}
