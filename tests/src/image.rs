//! Building hypervisor images and wrapping them for their boot protocol.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use loader::elf::{self, Machine as ElfMachine};
use loader::image_desc;

use crate::{io_err, out_dir, workspace_root, write_atomic, Arch, LaunchError};

/// The version string of the second image live updates alternate with.
pub const UPDATE_B_VERSION: &str = "0.1.1";

/// How to build one image.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    pub arch: Arch,
    /// Overrides the version the image reports (`HV_VERSION`).
    pub version: Option<String>,
    /// The image slot it is linked for (`HV_SLOT`, `hypervisor::slots`):
    /// images boot from slot 0; a live update stages an image linked for
    /// the other slot before the freeze.
    pub slot: u8,
}

/// The slot update images (the B side of A -> B -> A ...) are built for:
/// slot 1, since images boot from slot 0, so every update of an
/// A -> B -> A ... sequence is staged in the slot not running.
pub fn update_slot(_arch: Arch) -> u8 {
    1
}

/// A bootable artefact.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    pub arch: Arch,
    /// The ELF the linker produced.
    pub elf: PathBuf,
    /// What the emulator boots: an arm64 Image, or a GRUB ISO.
    pub bootable: PathBuf,
}

impl BuiltImage {
    /// What a live update hands over: the arm64 Image, or the sealed
    /// x86_64 ELF (`hv.elf` next to the ISO).
    pub fn update_image(&self) -> PathBuf {
        match self.arch {
            Arch::Aarch64 => self.bootable.clone(),
            Arch::X86_64 => self.bootable.parent().map(|d| d.join("hv.elf")).unwrap_or_default(),
        }
    }
}

/// The git revision of the work tree, for `HV_BUILD_ID`.
pub fn build_id() -> String {
    build_id_of(&workspace_root())
}

/// The git revision checked out at `src`.
pub fn build_id_of(src: &Path) -> String {
    let out = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).current_dir(src).output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => "unknown".to_string(),
    }
}

/// Runs `cargo build` for the image. Images get their own target dir so a
/// build from inside `cargo test` does not wait on the outer cargo's lock.
fn cargo_build(
    spec: &ImageSpec,
    src: &Path,
    target_dir: &Path,
    test_env: &[(&str, &str)],
) -> Result<PathBuf, LaunchError> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(src)
        .args(["build", "--quiet", "--release", "-p", "hypervisor", "--bin", "hypervisor", "--target"])
        .arg(spec.arch.triple())
        .env("CARGO_TARGET_DIR", target_dir)
        .env("HV_BUILD_ID", build_id_of(src));
    for var in TEST_ENV {
        cmd.env_remove(var);
    }
    for (var, value) in test_env {
        cmd.env(var, value);
    }
    match &spec.version {
        Some(v) => cmd.env("HV_VERSION", v),
        None => cmd.env_remove("HV_VERSION"),
    };
    cmd.env("HV_SLOT", spec.slot.to_string());
    let status = cmd.status().map_err(io_err("running cargo build"))?;
    if !status.success() {
        return Err(LaunchError::Build(format!("cargo build for {} failed ({status})", spec.arch.triple())));
    }
    Ok(target_dir.join(spec.arch.triple()).join("release").join("hypervisor"))
}

/// `llvm-objcopy` from the Rust toolchain's `llvm-tools` (installed by
/// `scripts/setup`), else the `objcopy` on PATH.
fn objcopy() -> PathBuf {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let out =
        |args: &[&str]| Command::new(&rustc).args(args).output().ok().filter(|o| o.status.success()).map(|o| o.stdout);
    let sysroot = out(&["--print", "sysroot"]).map(|s| String::from_utf8_lossy(&s).trim().to_string());
    let host = out(&["-vV"])
        .and_then(|v| String::from_utf8_lossy(&v).lines().find_map(|l| l.strip_prefix("host: ").map(str::to_string)));
    sysroot
        .zip(host)
        .map(|(root, host)| Path::new(&root).join("lib/rustlib").join(host).join("bin/llvm-objcopy"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("objcopy"))
}

/// Copies `elf` without its debug sections to `out` and returns the bytes.
fn strip_debug(elf: &Path, out: &Path) -> Result<Vec<u8>, LaunchError> {
    let status = Command::new(objcopy())
        .arg("--strip-debug")
        .arg(elf)
        .arg(out)
        .status()
        .map_err(io_err("running objcopy --strip-debug"))?;
    if !status.success() {
        return Err(LaunchError::Build(format!("objcopy --strip-debug {} failed ({status})", elf.display())));
    }
    fs::read(out).map_err(io_err(format!("reading {}", out.display())))
}

/// Builds the image and wraps it: a flat arm64 Image for aarch64, a GRUB
/// multiboot2 ISO for x86_64.
pub fn build(spec: &ImageSpec) -> Result<BuiltImage, LaunchError> {
    build_padded(spec, 0)
}

/// The test-only build variables of the hypervisor: `HV_TEST_BSS_PAD_MIB`
/// (more bss: a larger footprint) and `HV_TEST_READS_CONTEXT_MAX` (an image
/// that claims to read only vCPU-context layout 1).
const TEST_ENV: [&str; 3] = ["HV_TEST_BSS_PAD_MIB", "HV_TEST_READS_CONTEXT_MAX", "HV_TEST_BREAK_RESTORE"];

/// [`build`], with `bss_pad_mib` MiB more bss (`HV_TEST_BSS_PAD_MIB`): the
/// same code with a larger footprint, for tests of the image-slot check.
pub fn build_padded(spec: &ImageSpec, bss_pad_mib: u32) -> Result<BuiltImage, LaunchError> {
    if bss_pad_mib == 0 {
        return build_variant(spec, "", &[]);
    }
    build_variant(spec, &format!("-pad{bss_pad_mib}"), &[("HV_TEST_BSS_PAD_MIB", &bss_pad_mib.to_string())])
}

/// [`build`] with test-only build variables (`TEST_ENV`), in a directory
/// and target dir of its own (`tag` is appended to the version's).
pub fn build_variant(spec: &ImageSpec, tag: &str, test_env: &[(&str, &str)]) -> Result<BuiltImage, LaunchError> {
    let version = spec.version.as_deref().unwrap_or("default");
    let slot = if spec.slot == 0 { String::new() } else { format!("-slot{}", spec.slot) };
    let tag = format!("{version}{slot}{tag}");
    let dir = out_dir().join(spec.arch.name()).join(&tag);
    // One target dir per version: the version is baked in at compile time.
    let target_dir = out_dir().join("cargo").join(&tag);
    build_from(spec, &workspace_root(), &dir, &target_dir, test_env)
}

/// The marker a test build (`HV_TEST_BREAK_RESTORE=1`) reads its restore
/// failure from (`hypervisor/src/arch/aarch64/live_update.rs`).
const BREAK_MARKER: &[u8] = b"HVLU-BREAK:";
const BREAK_MARKER_LEN: usize = 32;

/// A copy of `image`'s update image (a build with
/// `HV_TEST_BREAK_RESTORE=1`) whose restore fails on purpose in `mode`
/// (`refuse-handover`, `panic`, `fault`, `fail`, `hang`, `slow`, `prepare-panic` or
/// `stale-map-key`, see `hypervisor::live_update::rollback::Break`; x86_64 has the
/// first, second and fourth): the marker patched and the image resealed,
/// written beside it as `hv-<mode>.img` (aarch64) or `.elf`. One build per
/// slot serves every mode.
pub fn with_break_mode(image: &BuiltImage, mode: &str) -> Result<PathBuf, LaunchError> {
    let source = image.update_image();
    let mut bytes = fs::read(&source).map_err(io_err(format!("reading {}", source.display())))?;
    let at = bytes
        .windows(BREAK_MARKER.len())
        .position(|w| w == BREAK_MARKER)
        .ok_or_else(|| LaunchError::Image(format!("{}: no break marker", source.display())))?;
    let field = at + BREAK_MARKER.len()..at + BREAK_MARKER_LEN;
    if mode.len() >= field.len() || bytes.len() < field.end {
        return Err(LaunchError::Image(format!("break mode {mode}: too long")));
    }
    bytes[field.clone()].fill(0);
    bytes[field.start..field.start + mode.len()].copy_from_slice(mode.as_bytes());
    image_desc::seal(&mut bytes).map_err(|e| LaunchError::Image(format!("resealing the image: {e}")))?;
    let ext = source.extension().and_then(|e| e.to_str()).unwrap_or("img");
    let path = source.with_file_name(format!("hv-{mode}.{ext}"));
    write_atomic(&path, &bytes)?;
    Ok(path)
}

/// The test build of `slot` (`HV_TEST_BREAK_RESTORE=1`, version 0.1.8)
/// that [`with_break_mode`] and [`break_mode_image`] patch: one per slot
/// serves every mode.
pub fn break_build(arch: Arch, slot: u8) -> Result<BuiltImage, LaunchError> {
    let spec = ImageSpec { arch, version: Some("0.1.8".into()), slot };
    build_variant(&spec, "-break", &[("HV_TEST_BREAK_RESTORE", "1")])
}

/// [`with_break_mode`] as an image to boot: on aarch64 the patched Image;
/// on x86_64 the patched ELF as `hv.elf` in a directory of its own (`<mode>/`
/// beside the build), where [`iso_with_modules`] finds it and puts the ISO.
pub fn break_mode_image(image: &BuiltImage, mode: &str) -> Result<BuiltImage, LaunchError> {
    let patched = with_break_mode(image, mode)?;
    let bootable = match image.arch {
        Arch::Aarch64 => patched,
        Arch::X86_64 => {
            let dir = patched.with_file_name(mode);
            fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
            let elf = dir.join("hv.elf");
            fs::copy(&patched, &elf).map_err(io_err(format!("copying to {}", elf.display())))?;
            dir.join("hv.iso")
        }
    };
    Ok(BuiltImage { arch: image.arch, elf: image.elf.clone(), bootable })
}

/// Builds the image of the source tree at `src` (another revision's work
/// tree, say) into `dir`, compiling in `target_dir`; sealed and wrapped by
/// this launcher, whose formats every revision shares.
pub fn build_from(
    spec: &ImageSpec,
    src: &Path,
    dir: &Path,
    target_dir: &Path,
    test_env: &[(&str, &str)],
) -> Result<BuiltImage, LaunchError> {
    fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let elf_path = cargo_build(spec, src, target_dir, test_env)?;
    let bytes = fs::read(&elf_path).map_err(io_err(format!("reading {}", elf_path.display())))?;
    let bootable = match spec.arch {
        Arch::Aarch64 => {
            let image = elf::parse(&bytes, ElfMachine::Aarch64)
                .map_err(|e| LaunchError::Image(format!("{}: {e}", elf_path.display())))?;
            let mut flat = elf::flatten(&bytes, &image);
            if flat.get(56..60) != Some(b"ARM\x64".as_slice()) {
                return Err(LaunchError::Image("aarch64 build lacks the arm64 Image header".into()));
            }
            image_desc::seal(&mut flat).map_err(|e| LaunchError::Image(format!("sealing the image: {e}")))?;
            let path = dir.join("hv.img");
            write_atomic(&path, &flat)?;
            path
        }
        Arch::X86_64 => {
            elf::parse(&bytes, ElfMachine::X86_64)
                .map_err(|e| LaunchError::Image(format!("{}: {e}", elf_path.display())))?;
            // Without its debug information the ELF is ~0.2 MiB instead of
            // ~10: GRUB loads it (and an updater carries it) much faster
            // under Bochs. `elf` keeps the symbols.
            let mut sealed = strip_debug(&elf_path, &dir.join("hv-stripped.elf"))?;
            image_desc::seal(&mut sealed).map_err(|e| LaunchError::Image(format!("sealing the image: {e}")))?;
            let sealed_path = dir.join("hv.elf");
            write_atomic(&sealed_path, &sealed)?;
            grub_iso(&sealed_path, dir, &[])?
        }
    };
    Ok(BuiltImage { arch: spec.arch, elf: elf_path, bootable })
}

/// One multiboot2 module of an x86_64 ISO: a file, and the words of its
/// module command line (`loader::guest_modules` reads them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IsoModule {
    pub file: PathBuf,
    pub args: Vec<String>,
}

/// GRUB's configuration: boot the hypervisor with `multiboot2`, each
/// module with `module2 /boot/guests/<n>.bin <args...>`. GRUB joins the
/// words with single spaces into the module's command line.
pub fn grub_cfg(modules: &[IsoModule]) -> String {
    let mut cfg = String::from("set timeout=0\nset default=0\nmenuentry \"hypervisor\" {\n  multiboot2 /boot/hv.elf\n");
    for (i, m) in modules.iter().enumerate() {
        let _ = write!(cfg, "  module2 /boot/guests/{i}.bin");
        for word in &m.args {
            cfg.push(' ');
            cfg.push_str(word);
        }
        cfg.push('\n');
    }
    cfg.push_str("  boot\n}\n");
    cfg
}

/// The x86_64 image of `image` on an ISO of its own, under `dir`, with
/// `modules` (the guests) next to it.
pub fn iso_with_modules(image: &BuiltImage, modules: &[IsoModule], dir: &Path) -> Result<BuiltImage, LaunchError> {
    if image.arch != Arch::X86_64 {
        return Err(LaunchError::Unsupported("multiboot2 modules are for x86_64 images".into()));
    }
    // `build` writes the sealed ELF next to the ISO.
    let sealed = image.bootable.with_file_name("hv.elf");
    fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let bootable = grub_iso(&sealed, dir, modules)?;
    Ok(BuiltImage { arch: image.arch, elf: image.elf.clone(), bootable })
}

/// A GRUB rescue ISO that boots `elf` with `multiboot2`, and `modules`,
/// as `dir/hv.iso`. The ISO tree and the ISO are built under names of
/// their own and the ISO renamed into place, so tests building the same
/// image in parallel threads never see each other's half-written files.
fn grub_iso(elf: &Path, dir: &Path, modules: &[IsoModule]) -> Result<PathBuf, LaunchError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let unique = format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let root = dir.join(format!("iso-{unique}"));
    let result = grub_iso_in(elf, &root, &dir.join(format!("hv.iso.tmp{unique}")), modules);
    let _ = fs::remove_dir_all(&root);
    let iso = dir.join("hv.iso");
    fs::rename(result?, &iso).map_err(io_err(format!("renaming {}", iso.display())))?;
    Ok(iso)
}

/// Lays out the ISO tree under `root` and runs grub-mkrescue into `iso`.
fn grub_iso_in(elf: &Path, root: &Path, iso: &Path, modules: &[IsoModule]) -> Result<PathBuf, LaunchError> {
    let grub = root.join("boot").join("grub");
    fs::create_dir_all(&grub).map_err(io_err(format!("creating {}", grub.display())))?;
    fs::copy(elf, root.join("boot").join("hv.elf")).map_err(io_err("copying the image into the ISO tree"))?;
    let guests = root.join("boot").join("guests");
    if !modules.is_empty() {
        fs::create_dir_all(&guests).map_err(io_err(format!("creating {}", guests.display())))?;
    }
    for (i, m) in modules.iter().enumerate() {
        fs::copy(&m.file, guests.join(format!("{i}.bin")))
            .map_err(io_err(format!("copying {} into the ISO tree", m.file.display())))?;
    }
    fs::write(grub.join("grub.cfg"), grub_cfg(modules)).map_err(io_err("writing grub.cfg"))?;
    let out = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(iso)
        .arg(root)
        .output()
        .map_err(io_err("running grub-mkrescue (run scripts/setup)"))?;
    if !out.status.success() {
        let _ = fs::remove_file(iso);
        return Err(LaunchError::Image(format!(
            "grub-mkrescue failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(iso.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grub_cfg_without_and_with_modules() {
        let plain = grub_cfg(&[]);
        assert!(plain.contains("multiboot2 /boot/hv.elf\n  boot\n"));
        assert!(!plain.contains("module2"));
        let m =
            |args: &[&str]| IsoModule { file: "x.bin".into(), args: args.iter().map(|a| (*a).to_string()).collect() };
        let cfg = grub_cfg(&[m(&["name=hb", "mem=4", "cmdline=ticks=5"]), m(&["name=iso", "mem=4"])]);
        assert!(cfg.contains("  module2 /boot/guests/0.bin name=hb mem=4 cmdline=ticks=5\n"));
        assert!(cfg.contains("  module2 /boot/guests/1.bin name=iso mem=4\n  boot\n}"));
    }
}
