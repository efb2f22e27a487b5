//! Starting an emulator on a built image under a timeout, with the serial
//! port captured to a log file (and optionally streamed to stdout).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::events::{parse_line, parse_log, Event, Source};
use crate::image::BuiltImage;
use crate::{guests, io_err, Arch, Firmware, LaunchError, Machine};

/// What to run.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub machine: Machine,
    pub cpus: u32,
    pub mem_mib: u32,
    pub timeout: Duration,
    /// Appended to the emulator's command line.
    pub extra_args: Vec<String>,
    /// Copy serial output to stdout as it arrives.
    pub stream: bool,
    /// Name for the run directory under `target/hv/runs`.
    pub name: String,
    /// Files to place in RAM at physical addresses (QEMU `-device loader`).
    pub blobs: Vec<(PathBuf, u64)>,
    /// The hypervisor's command line (QEMU `-append`, into /chosen/bootargs).
    pub cmdline: Option<String>,
    /// aarch64: add the SMMUv3 (`iommu=smmuv3`) and QEMU's `edu` device,
    /// for device assignment; x86_64 under QEMU: VT-d (`intel-iommu`) and
    /// `edu`.
    pub devices: bool,
    /// Stop the emulator this long after the updater guest has stopped
    /// (`hv: guest-stop` for the guest named [`guests::UPDATER`]): guests
    /// that never stop on their own would otherwise run to the timeout.
    pub stop_after_updater: Option<Duration>,
    /// aarch64 QEMU: after the hypervisor's `shutdown` event, save guest
    /// RAM (all of it, from 0x4000_0000) to this file through the QEMU
    /// monitor before the emulator exits (`-no-shutdown` keeps it there).
    pub ram_dump: Option<PathBuf>,
    /// aarch64 QEMU: boot through edk2 with ACPI instead of `-kernel`
    /// with a DTB.
    pub firmware: Firmware,
    /// aarch64 under UEFI: a directory QEMU presents as a FAT disk (the
    /// EFI system partition) that the firmware boots from
    /// (`EFI/BOOT/BOOTAA64.EFI`), instead of `-kernel`.
    pub esp: Option<PathBuf>,
}

impl RunSpec {
    pub fn new(name: &str, machine: Machine) -> Self {
        Self {
            machine,
            cpus: 2,
            mem_mib: 512,
            timeout: Duration::from_mins(2),
            extra_args: Vec::new(),
            stream: false,
            name: name.to_string(),
            blobs: Vec::new(),
            cmdline: None,
            devices: false,
            stop_after_updater: None,
            ram_dump: None,
            firmware: Firmware::Dtb,
            esp: None,
        }
    }
}

/// What happened.
#[derive(Debug)]
pub struct RunOutcome {
    pub serial: String,
    pub events: Vec<Event>,
    pub timed_out: bool,
    /// The launcher stopped the emulator after the updater guest stopped
    /// ([`RunSpec::stop_after_updater`]).
    pub stopped_after_updater: bool,
    pub exit_code: Option<i32>,
    pub log_path: PathBuf,
    pub elapsed: Duration,
}

impl RunOutcome {
    /// Events from guest `id` called `name`.
    pub fn guest(&self, id: u32, name: &str) -> Vec<&Event> {
        self.events.iter().filter(|e| e.source == Source::Guest(id) && e.name == name).collect()
    }

    /// Hypervisor events called `name`.
    pub fn hv(&self, name: &str) -> Vec<&Event> {
        self.events.iter().filter(|e| e.source == Source::Hypervisor && e.name == name).collect()
    }

    /// The last `n` lines of the serial log.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.serial.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whether the hypervisor reported a clean shutdown.
    pub fn clean_shutdown(&self) -> bool {
        self.hv("shutdown").iter().any(|e| e.get("status") == Some("ok"))
    }

    /// Serial lines starting with `prefix` printed between the first and
    /// the last `hv: update-done`: a guest's progress across the updates.
    pub fn lines_between_updates(&self, prefix: &str) -> usize {
        let lines: Vec<&str> = self.serial.lines().collect();
        let first = lines.iter().position(|l| l.starts_with("hv: update-done"));
        let last = lines.iter().rposition(|l| l.starts_with("hv: update-done"));
        match (first, last) {
            (Some(f), Some(l)) => lines[f..l].iter().filter(|l| l.starts_with(prefix)).count(),
            _ => 0,
        }
    }

    /// A failure report: the reason, the tail of the log, and for each
    /// guest that started and never stopped, its last lines (a hung guest
    /// may have gone quiet long before the tail).
    pub fn failure(&self, reason: &str) -> String {
        format!(
            "{reason}\n  timed_out={} stopped_after_updater={} exit={:?} elapsed={:.1}s log={}\n\
             --- last serial lines ---\n{}\n---{}",
            self.timed_out,
            self.stopped_after_updater,
            self.exit_code,
            self.elapsed.as_secs_f64(),
            self.log_path.display(),
            self.tail(30),
            self.still_running() + &self.registers_at_timeout()
        )
    }

    /// Each CPU's PC (and PSTATE / RIP, RFLAGS) when the run timed out, from
    /// QEMU's monitor, and where the whole dump is.
    fn registers_at_timeout(&self) -> String {
        let path = self.log_path.with_file_name(REGISTERS_AT_TIMEOUT);
        let Ok(text) =
            fs::read_to_string(&path).map_err(|_| ()).and_then(|t| if self.timed_out { Ok(t) } else { Err(()) })
        else {
            return String::new();
        };
        let pcs: Vec<&str> =
            text.lines().map(str::trim).filter(|l| l.starts_with("PC=") || l.starts_with("RIP=")).collect();
        format!("\n--- CPUs at the timeout ({}) ---\n{}", path.display(), pcs.join("\n"))
    }

    /// The guests that started and did not stop, each with its last lines,
    /// and how many updates were done.
    fn still_running(&self) -> String {
        use std::fmt::Write as _;
        let stopped: Vec<u64> = self.hv("guest-stop").iter().filter_map(|e| e.num("id")).collect();
        let mut out = String::new();
        for start in self.hv("guest-start") {
            let Some(id) = start.num("id").filter(|id| !stopped.contains(id)) else { continue };
            let prefix = format!("guest{id}: ");
            let lines: Vec<(usize, &str)> =
                self.serial.lines().enumerate().filter(|(_, l)| l.starts_with(&prefix)).collect();
            let last: Vec<String> =
                lines[lines.len().saturating_sub(8)..].iter().map(|(n, l)| format!("{:>6}: {l}", n + 1)).collect();
            let _ = write!(
                out,
                "\n--- guest {id} ({}) did not stop; its last lines (line number in the log) ---\n{}",
                start.get("name").unwrap_or("?"),
                if last.is_empty() { "(none)".to_string() } else { last.join("\n") }
            );
        }
        if !out.is_empty() {
            let updates = self.hv("update-done").len();
            let _ = write!(out, "\n--- {updates} updates done ---");
        }
        out
    }
}

/// Whether this host can run VMX guests under KVM (Intel, nested VMX).
pub fn kvm_vmx_usable() -> Result<(), String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm does not exist".into());
    }
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !cpuinfo.lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "vmx")) {
        return Err("the host CPU does not expose VMX (no 'vmx' flag in /proc/cpuinfo), so KVM cannot \
                    give the guest VMX; this path needs an Intel host with nested virtualization"
            .into());
    }
    let nested = fs::read_to_string("/sys/module/kvm_intel/parameters/nested").unwrap_or_default();
    if !matches!(nested.trim(), "Y" | "1") {
        return Err("kvm_intel is not loaded with nested=1 (see /sys/module/kvm_intel/parameters/nested)".into());
    }
    Ok(())
}

fn bochsrc(image: &BuiltImage, spec: &RunSpec, serial: &Path, dir: &Path) -> String {
    format!(
        "megs: {mem}\n\
         cpu: model=corei7_skylake_x, count={cpus}, ips=50000000\n\
         romimage: file=/usr/share/bochs/BIOS-bochs-latest\n\
         vgaromimage: file=/usr/share/vgabios/vgabios.bin\n\
         ata0-master: type=cdrom, path={iso}, status=inserted\n\
         boot: cdrom\n\
         display_library: rfb, options=\"timeout=0\"\n\
         com1: enabled=1, mode=file, dev={serial}\n\
         log: {log}\n\
         panic: action=fatal\n\
         error: action=report\n\
         info: action=ignore\n\
         debug: action=ignore\n\
         clock: sync=none, time0=local\n\
         sound: driver=dummy\n\
         speaker: enabled=0\n",
        mem = spec.mem_mib,
        cpus = spec.cpus,
        iso = image.bootable.display(),
        serial = serial.display(),
        log = dir.join("bochs.log").display(),
    )
}

fn command(image: &BuiltImage, spec: &RunSpec, serial: &Path, dir: &Path) -> Result<Command, LaunchError> {
    let mut cmd = match (image.arch, spec.machine) {
        (Arch::Aarch64, Machine::Qemu) => {
            let mut c = Command::new("qemu-system-aarch64");
            if spec.devices {
                // edu's default DMA mask is 28 bits; guest IPAs start at 1 GiB.
                c.args(["-M", "virt,virtualization=on,gic-version=3,iommu=smmuv3", "-cpu", "max"]);
                c.args(["-device", "edu,dma_mask=0xffffffffff"]);
            } else {
                c.args(["-M", "virt,virtualization=on,gic-version=3", "-cpu", "max"]);
            }
            if spec.firmware == Firmware::Uefi {
                // edk2 loads the same Image as a PE32+ EFI application and
                // passes -append as its load options. (The network card
                // stays, so PCI functions sit where they do without
                // firmware; `wait` stops a failed start before edk2 goes
                // on to network boot.)
                c.args(["-bios", crate::AARCH64_UEFI_FIRMWARE]);
            }
            match &spec.esp {
                Some(esp) if spec.firmware == Firmware::Uefi => {
                    c.arg("-drive").arg(format!("file=fat:rw:{},format=raw,if=virtio", esp.display()));
                    c.args(["-boot", "menu=on,splash-time=0"]);
                }
                _ => {
                    c.arg("-kernel").arg(&image.bootable);
                }
            }
            for (file, addr) in &spec.blobs {
                c.arg("-device").arg(format!("loader,file={},addr={addr:#x},force-raw=on", file.display()));
            }
            if let Some(cmdline) = &spec.cmdline {
                c.arg("-append").arg(cmdline);
            }
            c
        }
        (Arch::X86_64, Machine::Qemu) => {
            let mut c = Command::new("qemu-system-x86_64");
            c.args(["-M", "q35", "-cpu", "max"]);
            if spec.firmware == Firmware::Uefi {
                // OVMF boots the ISO's EFI El Torito image (GRUB for
                // x86_64-efi); its variable store is the run's own copy.
                let vars = dir.join("OVMF_VARS.fd");
                fs::copy(crate::X86_64_UEFI_VARS, &vars)
                    .map_err(io_err(format!("copying {} (run scripts/setup)", crate::X86_64_UEFI_VARS)))?;
                c.arg("-drive").arg(format!("if=pflash,format=raw,readonly=on,file={}", crate::X86_64_UEFI_CODE));
                c.arg("-drive").arg(format!("if=pflash,format=raw,file={}", vars.display()));
            }
            if spec.devices {
                // VT-d (an ACPI DMAR names it) before the device it covers.
                // edu's default DMA mask is 28 bits; guest RAM starts at
                // 1 GiB, and guests DMA at their own addresses.
                c.args(["-device", "intel-iommu", "-device", "edu,dma_mask=0xffffffffff"]);
            }
            c.arg("-cdrom").arg(&image.bootable);
            c
        }
        (Arch::X86_64, Machine::Kvm) => {
            kvm_vmx_usable().map_err(|why| {
                LaunchError::Unsupported(format!("--machine kvm refused: {why}. Use --machine bochs on this host."))
            })?;
            let mut c = Command::new("qemu-system-x86_64");
            c.args(["-M", "q35", "-accel", "kvm", "-cpu", "host"]);
            c.arg("-cdrom").arg(&image.bootable);
            c
        }
        (Arch::X86_64, Machine::Bochs) => {
            let rc = dir.join("bochsrc");
            fs::write(&rc, bochsrc(image, spec, serial, dir)).map_err(io_err("writing bochsrc"))?;
            // The built-in debugger stops at a prompt: continue, then quit.
            let dbg = dir.join("bochs-debugger.rc");
            fs::write(&dbg, "c\nquit\n").map_err(io_err("writing the Bochs debugger script"))?;
            let mut c = Command::new("bochs");
            c.arg("-q").arg("-f").arg(&rc).arg("-rc").arg(&dbg);
            c.args(&spec.extra_args);
            return Ok(c);
        }
        (arch, machine) => {
            return Err(LaunchError::Unsupported(format!(
                "{machine:?} cannot run {} images (aarch64: qemu; x86_64: bochs, qemu, kvm)",
                arch.name()
            )))
        }
    };
    cmd.arg("-smp").arg(spec.cpus.to_string());
    cmd.arg("-m").arg(format!("{}M", spec.mem_mib));
    cmd.args(["-display", "none", "-no-reboot"]);
    if spec.ram_dump.is_some() {
        cmd.arg("-monitor").arg(format!("unix:{},server=on,wait=off", dir.join("monitor.sock").display()));
        cmd.arg("-no-shutdown");
    } else {
        // Asked for every CPU's registers if the run times out.
        cmd.arg("-monitor").arg(format!("unix:{},server=on,wait=off", dir.join("monitor.sock").display()));
    }
    cmd.arg("-serial").arg(format!("file:{}", serial.display()));
    cmd.args(&spec.extra_args);
    Ok(cmd)
}

/// Reads newly arrived bytes of the serial log, copies them to stdout
/// when streaming, and returns them.
fn pump(file: &mut Option<fs::File>, path: &Path, stream: bool) -> Vec<u8> {
    if file.is_none() {
        *file = fs::File::open(path).ok();
    }
    let mut buf = Vec::new();
    if let Some(f) = file.as_mut() {
        if f.read_to_end(&mut buf).is_ok() && !buf.is_empty() && stream {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&buf);
            let _ = out.flush();
        }
    }
    buf
}

/// Follows the serial output for the updater guest's stop: its id from
/// `hv: guest-start ... name=updater`, then `hv: guest-stop id=<that>`.
#[derive(Debug, Default)]
pub struct UpdaterWatch {
    partial: Vec<u8>,
    updater_id: Option<u64>,
    stopped: bool,
}

impl UpdaterWatch {
    /// Feeds serial bytes; true once the updater has stopped.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        self.partial.extend_from_slice(bytes);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let Some(e) = parse_line(&String::from_utf8_lossy(&line)).filter(|e| e.source == Source::Hypervisor) else {
                continue;
            };
            match e.name.as_str() {
                "guest-start" if e.get("name") == Some(guests::UPDATER) => self.updater_id = e.num("id"),
                "guest-stop" if self.updater_id.is_some() && e.num("id") == self.updater_id => self.stopped = true,
                _ => {}
            }
        }
        self.stopped
    }
}

/// How the emulator process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    Exited(Option<i32>),
    TimedOut,
    StoppedAfterUpdater,
    /// The image gave up under UEFI firmware (`hv: boot-failed
    /// firmware=uefi`), which would go on to its other boot options and
    /// its shell: stopped there.
    StoppedAfterFirmwareBootFailure,
}

/// The aarch64 `virt` machine's RAM base.
const AARCH64_RAM_BASE: u64 = 0x4000_0000;

/// Saves guest RAM to `out` through the QEMU monitor at `sock`, then quits
/// QEMU. Errors go to the run's emulator output; the caller sees a missing
/// or short file.
fn dump_ram(sock: &Path, mem_mib: u32, out: &Path) -> Result<(), String> {
    use std::os::unix::net::UnixStream;
    let mut s = UnixStream::connect(sock).map_err(|e| format!("monitor {}: {e}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_mins(1))).map_err(|e| e.to_string())?;
    let cmd = format!("pmemsave {AARCH64_RAM_BASE:#x} {:#x} \"{}\"\nquit\n", u64::from(mem_mib) << 20, out.display());
    s.write_all(cmd.as_bytes()).map_err(|e| format!("monitor: {e}"))?;
    // QEMU closes the socket when it quits, after the save.
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    Ok(())
}

/// The file, beside the serial log, that holds every CPU's registers as
/// QEMU's monitor gave them when a run timed out.
pub const REGISTERS_AT_TIMEOUT: &str = "registers-at-timeout.txt";

/// Sends one command to QEMU's monitor and returns what it printed within
/// two seconds; `None` if there is no monitor (Bochs) or it did not answer.
fn monitor_query(sock: &Path, command: &str) -> Option<String> {
    use std::os::unix::net::UnixStream;
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
    s.write_all(format!("{command}\n").as_bytes()).ok()?;
    let mut out = Vec::new();
    let until = Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; 4096];
    while Instant::now() < until {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) if !out.is_empty() => break,
            Err(_) => {}
        }
    }
    (!out.is_empty()).then(|| String::from_utf8_lossy(&out).into_owned())
}

fn wait(child: &mut Child, spec: &RunSpec, serial: &Path) -> Ended {
    let start = Instant::now();
    let mut file = None;
    let mut seen = String::new();
    let mut dumped = false;
    let mut watch = UpdaterWatch::default();
    let mut stop_at: Option<Instant> = None;
    let stop = |child: &mut Child, file: &mut Option<fs::File>| {
        let _ = child.kill();
        let _ = child.wait();
        pump(file, serial, spec.stream);
    };
    loop {
        let fresh = pump(&mut file, serial, spec.stream);
        // The fresh bytes after the end of what came before, so a line
        // split across two reads is still found.
        seen.push_str(&String::from_utf8_lossy(&fresh));
        let shutdown = seen.contains("hv: shutdown ");
        let gave_up = spec.firmware == Firmware::Uefi && seen.contains("hv: boot-failed firmware=uefi");
        let keep = seen.len().saturating_sub(64);
        seen = seen.split_off(seen.ceil_char_boundary(keep));
        if gave_up {
            // The rest of the line, then the firmware is stopped.
            std::thread::sleep(Duration::from_millis(200));
            stop(child, &mut file);
            return Ended::StoppedAfterFirmwareBootFailure;
        }
        if let (Some(out), false) = (&spec.ram_dump, dumped) {
            if shutdown {
                dumped = true;
                // The hypervisor powers off right after the event; QEMU
                // then stops (-no-shutdown) with RAM as it was.
                std::thread::sleep(Duration::from_millis(500));
                let sock = serial.with_file_name("monitor.sock");
                if let Err(e) = dump_ram(&sock, spec.mem_mib, out) {
                    eprintln!("ram dump: {e}");
                }
            }
        }
        if let Some(grace) = spec.stop_after_updater {
            if stop_at.is_none() && watch.feed(&fresh) {
                stop_at = Some(Instant::now() + grace);
            }
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                pump(&mut file, serial, spec.stream);
                return Ended::Exited(status.code());
            }
            Ok(None) if stop_at.is_some_and(|t| Instant::now() >= t) => {
                stop(child, &mut file);
                return Ended::StoppedAfterUpdater;
            }
            Ok(None) if start.elapsed() >= spec.timeout => {
                // Where each CPU is, for the failure report.
                let sock = serial.with_file_name("monitor.sock");
                if let Some(regs) = monitor_query(&sock, "info registers -a") {
                    let _ = fs::write(serial.with_file_name(REGISTERS_AT_TIMEOUT), regs);
                }
                stop(child, &mut file);
                return Ended::TimedOut;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => return Ended::Exited(None),
        }
    }
}

/// The directory a run keeps its logs and generated files in.
pub fn run_dir(spec: &RunSpec) -> PathBuf {
    crate::out_dir().join("runs").join(&spec.name)
}

/// One emulator at a time in a process: the machines this runs on have two
/// cores, and the emulator tests size their workloads in guest time, which
/// a second emulator in the same test binary (`--test-threads=2`) would
/// only slow down and make flaky.
static ONE_EMULATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Boots `image` as `spec` says and collects the serial output (waiting
/// for any other emulator this process runs to finish first).
pub fn run(image: &BuiltImage, spec: &RunSpec) -> Result<RunOutcome, LaunchError> {
    let _one = ONE_EMULATOR.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = run_dir(spec);
    fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let serial = dir.join("serial.log");
    fs::write(&serial, b"").map_err(io_err("creating the serial log"))?;
    let _ = fs::remove_file(dir.join(REGISTERS_AT_TIMEOUT));
    let mut cmd = command(image, spec, &serial, &dir)?;
    let emulator_out = fs::File::create(dir.join("emulator.out")).map_err(io_err("creating emulator.out"))?;
    let emulator_err = emulator_out.try_clone().map_err(io_err("creating emulator.out"))?;
    cmd.stdin(Stdio::null()).stdout(emulator_out).stderr(emulator_err);
    let start = Instant::now();
    let program = cmd.get_program().to_string_lossy().to_string();
    let mut child = cmd.spawn().map_err(io_err(format!("starting {program} (run scripts/setup to install it)")))?;
    let ended = wait(&mut child, spec, &serial);
    let elapsed = start.elapsed();
    let bytes = fs::read(&serial).map_err(io_err("reading the serial log"))?;
    let serial_text = String::from_utf8_lossy(&bytes).replace('\r', "");
    Ok(RunOutcome {
        events: parse_log(&serial_text),
        serial: serial_text,
        timed_out: ended == Ended::TimedOut,
        stopped_after_updater: ended == Ended::StoppedAfterUpdater,
        exit_code: match ended {
            Ended::Exited(code) => code,
            Ended::TimedOut | Ended::StoppedAfterUpdater | Ended::StoppedAfterFirmwareBootFailure => None,
        },
        log_path: serial,
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updater_watch_waits_for_the_updaters_own_stop() {
        let mut w = UpdaterWatch::default();
        assert!(!w.feed(b"hv: guest-start id=1 name=kernel mem_mib=16 vcpus=1\r\nhv: guest-start id=2 na"));
        assert!(!w.feed(b"me=updater mem_mib=16 vcpus=1\nhv: guest-stop id=1 reason=shutdown\n"));
        assert!(!w.feed(b"guest2: updater done=1 ok=1 updates=2 failed=0\nhv: guest-stop id=2 reason=shut"));
        assert!(w.feed(b"down\n"));
        let mut none = UpdaterWatch::default();
        assert!(!none.feed(b"hv: guest-stop id=2 reason=shutdown\n"));
    }

    #[test]
    fn a_failure_names_the_guests_that_never_stopped_with_their_last_lines() {
        let serial = "hv: guest-start id=1 name=linux cpu=0\nhv: guest-start id=2 name=heartbeat cpu=0\n\
                      guest1: linux: memcheck pass=3 ok=1\nhv: update-done count=1\nguest2: alive ticks=10\n\
                      hv: guest-stop id=2 reason=shutdown\n"
            .to_string();
        let run = RunOutcome {
            events: parse_log(&serial),
            serial,
            timed_out: true,
            stopped_after_updater: false,
            exit_code: None,
            log_path: PathBuf::from("serial.log"),
            elapsed: Duration::from_secs(1),
        };
        let report = run.failure("hung");
        assert!(report.contains("guest 1 (linux) did not stop"), "{report}");
        assert!(report.contains("     3: guest1: linux: memcheck pass=3 ok=1"), "{report}");
        assert!(!report.contains("guest 2 (heartbeat) did not stop"), "{report}");
        assert!(report.ends_with("--- 1 updates done ---"), "{report}");
    }
}
