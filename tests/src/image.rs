//! Building hypervisor images and wrapping them for their boot protocol.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

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

/// The git revision of the work tree, for `HV_BUILD_ID`.
pub fn build_id() -> String {
    let out = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).current_dir(workspace_root()).output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => "unknown".to_string(),
    }
}

/// Runs `cargo build` for the image. Images get their own target dir so a
/// build from inside `cargo test` does not wait on the outer cargo's lock.
fn cargo_build(spec: &ImageSpec, target_dir: &Path) -> Result<PathBuf, LaunchError> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "--quiet", "--release", "-p", "hypervisor", "--bin", "hypervisor", "--target"])
        .arg(spec.arch.triple())
        .env("CARGO_TARGET_DIR", target_dir)
        .env("HV_BUILD_ID", build_id());
    match &spec.version {
        Some(v) => cmd.env("HV_VERSION", v),
        None => cmd.env_remove("HV_VERSION"),
    };
    let status = cmd.status().map_err(io_err("running cargo build"))?;
    if !status.success() {
        return Err(LaunchError::Build(format!("cargo build for {} failed ({status})", spec.arch.triple())));
    }
    Ok(target_dir.join(spec.arch.triple()).join("release").join("hypervisor"))
}

/// Builds the image and wraps it: a flat arm64 Image for aarch64, a GRUB
/// multiboot2 ISO for x86_64.
pub fn build(spec: &ImageSpec) -> Result<BuiltImage, LaunchError> {
    let tag = spec.version.as_deref().unwrap_or("default");
    let dir = out_dir().join(spec.arch.name()).join(tag);
    fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    // One target dir per version: the version is baked in at compile time.
    let target_dir = out_dir().join("cargo").join(tag);
    let elf_path = cargo_build(spec, &target_dir)?;
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
            let mut sealed = bytes;
            image_desc::seal(&mut sealed).map_err(|e| LaunchError::Image(format!("sealing the image: {e}")))?;
            let sealed_path = dir.join("hv.elf");
            write_atomic(&sealed_path, &sealed)?;
            grub_iso(&sealed_path, &dir)?
        }
    };
    Ok(BuiltImage { arch: spec.arch, elf: elf_path, bootable })
}

/// A GRUB rescue ISO that boots `elf` with `multiboot2`.
fn grub_iso(elf: &Path, dir: &Path) -> Result<PathBuf, LaunchError> {
    let root = dir.join("iso");
    let grub = root.join("boot").join("grub");
    fs::create_dir_all(&grub).map_err(io_err(format!("creating {}", grub.display())))?;
    fs::copy(elf, root.join("boot").join("hv.elf")).map_err(io_err("copying the image into the ISO tree"))?;
    let cfg = "set timeout=0\nset default=0\nmenuentry \"hypervisor\" {\n  multiboot2 /boot/hv.elf\n  boot\n}\n";
    fs::write(grub.join("grub.cfg"), cfg).map_err(io_err("writing grub.cfg"))?;
    let iso = dir.join("hv.iso");
    let out = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(&iso)
        .arg(&root)
        .output()
        .map_err(io_err("running grub-mkrescue (run scripts/setup)"))?;
    if !out.status.success() {
        return Err(LaunchError::Image(format!(
            "grub-mkrescue failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(iso)
}
