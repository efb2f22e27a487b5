//! The stock Linux guest: Debian bookworm's arm64 kernel and a static
//! busybox (fetched from the Debian archive by `scripts/setup` into
//! `target/linux/debian`), and an initramfs built here around them with
//! `linuxcheck` (`guests/linuxcheck`): `/init` reports the CPUs Linux
//! brought up, runs the memory and clock check, and powers off.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::guests::GuestArg;
use crate::{io_err, out_dir, workspace_root, write_atomic, LaunchError};

/// Guest RAM and vCPUs of the Linux guest.
pub const LINUX_MEM_MIB: u64 = 256;
pub const LINUX_VCPUS: u32 = 2;
/// The guest's command line: the PL011 console, and earlycon until the
/// amba driver takes over.
pub const LINUX_CMDLINE: &str = "console=ttyAMA0 earlycon=pl011,0x09000000 quiet";
/// How long `linuxcheck` runs by default, in seconds of CLOCK_MONOTONIC.
pub const DEFAULT_CHECK_SECONDS: u32 = 20;

/// Where `scripts/setup` puts the Debian kernel (`Image`) and `busybox`.
pub fn debian_dir() -> PathBuf {
    workspace_root().join("target").join("linux").join("debian")
}

/// The `/init` script: what Linux runs once it has mounted the initramfs.
pub fn init_script(check_seconds: u32) -> String {
    format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         echo \"linux: userspace cpus=$(grep -c ^processor /proc/cpuinfo) uptime=$(cut -d' ' -f1 /proc/uptime)\"\n\
         /bin/linuxcheck {check_seconds}\n\
         echo \"linux: check-exit status=$?\"\n\
         poweroff -f\n"
    )
}

/// One entry of a `newc` cpio archive (the initramfs format:
/// `Documentation/driver-api/early-userspace/buffer-format.rst`).
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        0,
        0,
        1,
        0,
        data.len(),
        0,
        0,
        0,
        0,
        name.len() + 1,
        0
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

const DIR: u32 = 0o040_755;
const EXEC: u32 = 0o100_755;

/// The initramfs: directories, busybox, linuxcheck and `/init`.
pub fn initramfs_bytes(busybox: &[u8], linuxcheck: &[u8], check_seconds: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let init = init_script(check_seconds);
    let entries: [(&str, u32, &[u8]); 8] = [
        ("bin", DIR, &[]),
        ("dev", DIR, &[]),
        ("proc", DIR, &[]),
        ("sys", DIR, &[]),
        ("tmp", DIR, &[]),
        ("bin/busybox", EXEC, busybox),
        ("bin/linuxcheck", EXEC, linuxcheck),
        ("init", EXEC, init.as_bytes()),
    ];
    for (ino, (name, mode, data)) in (1..).zip(entries) {
        cpio_entry(&mut out, ino, name, mode, data);
    }
    cpio_entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

fn read(path: &Path, hint: &str) -> Result<Vec<u8>, LaunchError> {
    fs::read(path).map_err(|err| LaunchError::Io { what: format!("reading {} ({hint})", path.display()), err })
}

/// Builds `linuxcheck` for aarch64 and returns the ELF.
fn build_linuxcheck() -> Result<Vec<u8>, LaunchError> {
    let target_dir = out_dir().join("cargo").join("guests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let status = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "--quiet", "--release", "-p", "linuxcheck", "--target", "aarch64-unknown-none"])
        .env("CARGO_TARGET_DIR", &target_dir)
        .status()
        .map_err(io_err("running cargo build for linuxcheck"))?;
    if !status.success() {
        return Err(LaunchError::Build(format!("building linuxcheck failed ({status})")));
    }
    read(&target_dir.join("aarch64-unknown-none").join("release").join("linuxcheck"), "just built")
}

/// The Linux guest, ready to boot: its kernel, an initramfs running the
/// check for `check_seconds`, 256 MiB and two vCPUs.
pub fn linux_guest(check_seconds: u32) -> Result<GuestArg, LaunchError> {
    let dir = debian_dir();
    let kernel = dir.join("Image");
    let hint = "run scripts/setup as root: it fetches Debian's arm64 kernel";
    let busybox = read(&dir.join("busybox"), hint)?;
    if !kernel.is_file() {
        return Err(LaunchError::Unsupported(format!("no Linux kernel at {} ({hint})", kernel.display())));
    }
    let linuxcheck = build_linuxcheck()?;
    let out = out_dir().join("aarch64").join("linux");
    fs::create_dir_all(&out).map_err(io_err(format!("creating {}", out.display())))?;
    let initrd = out.join(format!("initramfs-{check_seconds}s.cpio"));
    write_atomic(&initrd, &initramfs_bytes(&busybox, &linuxcheck, check_seconds))?;
    Ok(GuestArg {
        file: kernel,
        name: "linux".into(),
        mem_mib: LINUX_MEM_MIB,
        vcpus: LINUX_VCPUS,
        privileged: false,
        initrd: Some(initrd),
        devices: Vec::new(),
        cmdline: LINUX_CMDLINE.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_initramfs_is_a_newc_archive_with_init_last_before_the_trailer() {
        let bytes = initramfs_bytes(b"BB", b"LC", 7);
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("bin/busybox") && text.contains("bin/linuxcheck"));
        assert!(text.contains("/bin/linuxcheck 7\n"), "the check's duration is its argument");
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!"));
        // Each header's name size counts the NUL.
        let first = &bytes[..110];
        assert_eq!(&first[94..102], b"00000004", "\"bin\" plus NUL");
    }
}
