//! `hvqualify FROM TO`: qualifies a live update between two revisions.
//! Builds the hypervisor at both (git work trees under
//! `target/qualify/<commit>`), boots FROM with FROM's test guests, and has the
//! updater alternate TO, FROM, TO ... so that every update crosses between
//! the two versions in one direction or the other; then checks every
//! update and the guests, prints a verdict per direction, and writes the
//! same as a Markdown report a release process can keep.
//! `scripts/qualify` is a thin wrapper.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use hv_tests::emulator::{self, RunOutcome, RunSpec};
use hv_tests::guests;
use hv_tests::image::{self, BuiltImage, ImageSpec};
use hv_tests::{out_dir, summary, workspace_root, Arch, Machine};

const USAGE: &str = "\
usage: scripts/qualify FROM TO [--arch A] [--updates N] [--golden FILE]

  FROM, TO         git revisions (commits, tags, HEAD, a line of releases.txt)
  --arch A         aarch64 (QEMU, the default) or x86_64 (Bochs, minutes)
  --updates N      live updates, alternating FROM->TO and TO->FROM (default 4,
                   at least 2 so that both directions are crossed)
  --golden FILE    also save the last handover FROM wrote, taken from guest RAM
                   after the run, to FILE (and where it lay to FILE.txt): a
                   golden handover for kho/testdata (kho/ABI.md §7.2); aarch64

Builds both revisions in work trees under target/qualify, boots FROM with the
test guests and updates FROM->TO->FROM..., and prints a verdict per direction;
the report is written to target/qualify/report-<from>-<to>-<arch>.md.
Exit status: 0 when every update and every guest check passed.";

struct Options {
    from: String,
    to: String,
    arch: Arch,
    updates: u32,
    golden: Option<PathBuf>,
}

fn parse(args: &[String]) -> Result<Option<Options>, String> {
    let mut revs = Vec::new();
    let mut arch = Arch::Aarch64;
    let mut updates = 4;
    let mut golden = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => return Ok(None),
            "--arch" => {
                let v = it.next().ok_or("--arch needs a value")?;
                arch = Arch::parse(v).ok_or_else(|| format!("--arch '{v}': want aarch64 or x86_64"))?;
            }
            "--updates" => {
                let v = it.next().ok_or("--updates needs a value")?;
                updates =
                    v.parse().ok().filter(|&n| n >= 2).ok_or_else(|| format!("--updates '{v}': want 2 or more"))?;
            }
            "--golden" => golden = Some(PathBuf::from(it.next().ok_or("--golden needs a file")?)),
            o if o.starts_with('-') => return Err(format!("unknown option '{o}'")),
            rev => revs.push(rev.to_string()),
        }
    }
    if arch != Arch::Aarch64 && golden.is_some() {
        return Err("--golden: RAM is saved through QEMU's monitor, so aarch64 only".into());
    }
    match <[String; 2]>::try_from(revs) {
        Ok([from, to]) => Ok(Some(Options { from, to, arch, updates, golden })),
        Err(_) => Err("want two revisions, FROM and TO".into()),
    }
}

fn git(args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(workspace_root())
        .output()
        .map_err(|e| format!("running git {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!("git {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The commit a revision names, and a work tree checked out at it.
fn work_tree(rev: &str) -> Result<(String, PathBuf), String> {
    let commit = git(&["rev-parse", "--short=12", &format!("{rev}^{{commit}}")])?;
    let dir = workspace_root().join("target").join("qualify").join(&commit);
    if !dir.join("Cargo.toml").exists() {
        let path = dir.display().to_string();
        git(&["worktree", "add", "--detach", "--force", &path, &commit])?;
    }
    Ok((commit, dir))
}

/// The image of `commit` (checked out at `src`), its version string naming
/// the commit so the two sides of every update are told apart.
fn build(arch: Arch, commit: &str, src: &Path, slot: u8) -> Result<BuiltImage, String> {
    eprintln!("hvqualify: building {commit} (slot {slot})");
    let spec = ImageSpec { arch, version: Some(format!("q-{}", &commit[..8.min(commit.len())])), slot };
    let dir = out_dir().join("qualify").join(commit).join(format!("{}-slot{slot}", arch.name()));
    let target = out_dir().join("qualify").join("cargo").join(format!("{commit}-slot{slot}"));
    image::build_from(&spec, src, &dir, &target, &[]).map_err(|e| e.to_string())
}

/// One direction's verdict.
struct Direction {
    name: String,
    updates: Vec<u64>,
    blackouts_us: Vec<u64>,
    failures: Vec<String>,
}

/// Microseconds as milliseconds with one decimal.
fn ms(us: u64) -> String {
    format!("{}.{}", us / 1000, (us % 1000) / 100)
}

fn median(v: &[u64]) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len() / 2).copied().unwrap_or(0)
}

/// Checks every update of the run and the guests' health after it.
fn verdicts(run: &RunOutcome, from: &str, to: &str, updates: u32) -> (Vec<Direction>, Vec<String>) {
    let version = |c: &str| format!("q-{}", &c[..8.min(c.len())]);
    let mut dirs = vec![
        Direction {
            name: format!("{from} -> {to}"),
            updates: Vec::new(),
            blackouts_us: Vec::new(),
            failures: Vec::new(),
        },
        Direction {
            name: format!("{to} -> {from}"),
            updates: Vec::new(),
            blackouts_us: Vec::new(),
            failures: Vec::new(),
        },
    ];
    let done = run.hv("update-done");
    for k in 1..=u64::from(updates) {
        let d = &mut dirs[usize::from(k % 2 == 0)];
        let want = if k % 2 == 1 { version(to) } else { version(from) };
        d.updates.push(k);
        match done.iter().find(|e| e.num("count") == Some(k)) {
            Some(e) if e.get("version") == Some(want.as_str()) => {
                d.blackouts_us.push(e.num("blackout_us").unwrap_or(0));
            }
            Some(e) => d.failures.push(format!("update {k} came up as {:?}, not {want}", e.get("version"))),
            None => d.failures.push(format!("update {k} never completed")),
        }
    }
    for e in run.hv("update-refused").iter().chain(&run.hv("update-cancelled")) {
        let reason = e.get("reason").unwrap_or("?");
        dirs[0].failures.push(format!("an update was {} ({reason})", e.name));
    }
    let mut guest_failures = Vec::new();
    if !run.clean_shutdown() {
        guest_failures.push("no clean shutdown: a guest or the machine did not finish".to_string());
    }
    for e in run.hv("boot-failed") {
        guest_failures.push(format!("a new image failed to boot: {}", e.get("reason").unwrap_or("?")));
    }
    // The isolation probe reaches outside its RAM on purpose: on x86_64
    // the hypervisor stops it with an EPT fault (on aarch64 it takes an
    // external abort and shuts down). Any other fault is a failure.
    let probes: Vec<u64> = run
        .hv("guest-start")
        .iter()
        .filter(|e| e.get("name") == Some("isolation"))
        .filter_map(|e| e.num("id"))
        .collect();
    let faults = run
        .hv("fault")
        .iter()
        .filter(|e| !(e.get("kind") == Some("ept") && e.num("guest").is_some_and(|g| probes.contains(&g))))
        .count();
    if faults > 0 {
        guest_failures.push(format!("{faults} guest fault(s)"));
    }
    let bad_passes = run.events.iter().filter(|e| e.name == "memcheck" && e.num("ok") == Some(0)).count();
    if bad_passes > 0 {
        guest_failures.push(format!("{bad_passes} memcheck pass(es) found their memory changed"));
    }
    (dirs, guest_failures)
}

fn report(o: &Options, from: &str, to: &str, dirs: &[Direction], guests: &[String], run: &RunOutcome) -> String {
    let mut r = String::new();
    let _ = writeln!(r, "# Live-update qualification: {from} <-> {to} ({})\n", o.arch.name());
    let _ = writeln!(r, "FROM `{}` = {from}, TO `{}` = {to}; {} updates, alternating.\n", o.from, o.to, o.updates);
    let _ = writeln!(r, "| direction | updates | verdict | blackout (median) | notes |");
    let _ = writeln!(r, "|---|---|---|---|---|");
    for d in dirs {
        let verdict = if d.failures.is_empty() && guests.is_empty() { "pass" } else { "FAIL" };
        let updates: Vec<String> = d.updates.iter().map(u64::to_string).collect();
        let _ = writeln!(
            r,
            "| {} | {} | {verdict} | {} ms | {} |",
            d.name,
            updates.join(", "),
            ms(median(&d.blackouts_us)),
            if d.failures.is_empty() { "-".to_string() } else { d.failures.join("; ") }
        );
    }
    let _ = writeln!(
        r,
        "\nGuests: {}.",
        if guests.is_empty() {
            "every check passed (clean shutdown, no fault, memory intact)".to_string()
        } else {
            guests.join("; ")
        }
    );
    let rows = summary::updates(&run.events);
    if !rows.is_empty() {
        let _ = writeln!(r, "\n| update | from | to | blackout | handover |\n|---|---|---|---|---|");
        for row in rows {
            let _ = writeln!(
                r,
                "| {} | {} | {} | {} ms | {} B |",
                row.count,
                row.from,
                row.to,
                ms(row.blackout_us),
                row.handover_bytes
            );
        }
    }
    let _ = writeln!(r, "\nSerial log: `{}`", run.log_path.display());
    r
}

fn qualify(o: &Options) -> Result<bool, String> {
    let (from, from_dir) = work_tree(&o.from)?;
    let (to, to_dir) = work_tree(&o.to)?;
    // FROM boots from slot 0. TO is linked for slot 1 (staged there before
    // the freeze) when both revisions know image slots; an older FROM
    // copies TO over itself, so TO must then be linked where FROM runs.
    let has_slots = |dir: &Path| dir.join("hypervisor/src/slot_bases.rs").exists();
    let to_slot = if has_slots(&from_dir) && has_slots(&to_dir) { image::update_slot(o.arch) } else { 0 };
    let a = build(o.arch, &from, &from_dir, 0)?;
    let b = build(o.arch, &to, &to_dir, to_slot)?;
    // FROM's own test guests (and updater): a guest from a newer tree may
    // use what FROM does not offer.
    eprintln!("hvqualify: building {from}'s test guests");
    let guests_dir = out_dir().join("qualify").join(&from).join(o.arch.name()).join("guests");
    let guests_target = out_dir().join("qualify").join("cargo").join(format!("{from}-guests"));
    guests::build_test_guests_from(o.arch, &from_dir, &guests_target, &guests_dir).map_err(|e| e.to_string())?;
    let list = guests::demo_guests_in(o.arch, &guests_dir, &[b.update_image(), a.update_image()], o.updates)
        .map_err(|e| e.to_string())?;
    eprintln!("hvqualify: booting {from} with its test guests; updates {from} -> {to} -> {from} ...");
    let run = match o.arch {
        Arch::Aarch64 => {
            let mut spec = RunSpec::new(&format!("qualify-{from}-{to}"), Machine::Qemu);
            spec.timeout = Duration::from_mins(5);
            let dir = emulator::run_dir(&spec);
            std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            let placed = guests::place(&list, u64::from(spec.mem_mib), &dir).map_err(|e| e.to_string())?;
            spec.blobs = placed.blobs;
            spec.cmdline = Some(placed.cmdline);
            let ram = dir.join("ram.bin");
            if o.golden.is_some() {
                let _ = std::fs::remove_file(&ram);
                spec.ram_dump = Some(ram.clone());
            }
            let run = emulator::run(&a, &spec).map_err(|e| e.to_string())?;
            if let Some(out) = &o.golden {
                save_golden(&ram, &format!("q-{}", &from[..8.min(from.len())]), out)?;
            }
            run
        }
        Arch::X86_64 => {
            // As tests/tests/update_x86_64.rs runs it: Bochs, two CPUs,
            // the guests as multiboot2 modules on a GRUB ISO. Bochs's
            // clock follows its instructions: the timeout is a safety net.
            let mut spec = RunSpec::new(&format!("qualify-{from}-{to}-x86_64"), Machine::Bochs);
            spec.mem_mib = 128;
            spec.timeout = Duration::from_mins(20);
            let modules = guests::grub_modules(&list).map_err(|e| e.to_string())?;
            let iso = image::iso_with_modules(&a, &modules, &emulator::run_dir(&spec)).map_err(|e| e.to_string())?;
            emulator::run(&iso, &spec).map_err(|e| e.to_string())?
        }
    };
    let (dirs, guest_failures) = verdicts(&run, &from, &to, o.updates);
    let text = report(o, &from, &to, &dirs, &guest_failures, &run);
    let path = workspace_root().join("target").join("qualify").join(format!("report-{from}-{to}-{}.md", o.arch.name()));
    std::fs::write(&path, &text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!("{text}");
    println!("hvqualify: report written to {}", path.display());
    let ok = guest_failures.is_empty() && dirs.iter().all(|d| d.failures.is_empty());
    if !ok {
        eprintln!("{}", run.failure("qualification failed"));
    }
    Ok(ok)
}

/// RAM base of the aarch64 `virt` machine, where the dump starts.
const RAM_BASE: u64 = 0x4000_0000;

/// Finds, in a dump of guest RAM, the handover blobs that `writer` wrote
/// and that a reader still accepts (freed ones may be partly overwritten);
/// returns (physical address, update count, blob) of the latest.
fn last_handover<'a>(ram: &'a [u8], writer: &str) -> Option<(u64, u64, &'a [u8])> {
    let map = kho::RamMap::new(&[kho::PhysRange::new(RAM_BASE, ram.len() as u64).ok()?]).ok()?;
    let mut best: Option<(u64, u64, &[u8])> = None;
    // Handovers are page-aligned blocks (FDT magic 0xd00dfeed, big-endian).
    for off in (0..ram.len().saturating_sub(8)).step_by(4096) {
        if ram[off..off + 4] != [0xd0, 0x0d, 0xfe, 0xed] {
            continue;
        }
        let size = u32::from_be_bytes([ram[off + 4], ram[off + 5], ram[off + 6], ram[off + 7]]) as usize;
        let Some(blob) = ram.get(off..off + size) else { continue };
        let phys = RAM_BASE + off as u64;
        let Ok(reader) = kho::HandoverReader::new(blob, phys, &map) else { continue };
        if reader.previous_version() == writer && best.is_none_or(|(_, n, _)| reader.update_count() > n) {
            best = Some((phys, reader.update_count(), blob));
        }
    }
    best
}

fn save_golden(ram: &Path, writer: &str, out: &Path) -> Result<(), String> {
    let bytes = std::fs::read(ram).map_err(|e| format!("reading the RAM dump {}: {e}", ram.display()))?;
    let (phys, count, blob) = last_handover(&bytes, writer)
        .ok_or_else(|| format!("no readable handover written by {writer} in {}", ram.display()))?;
    std::fs::write(out, blob).map_err(|e| format!("writing {}: {e}", out.display()))?;
    let meta = format!(
        "writer={writer} arch=aarch64 phys={phys:#x} ram_base={RAM_BASE:#x} ram_bytes={:#x} update_count={count}\n",
        bytes.len()
    );
    let side = PathBuf::from(format!("{}.txt", out.display()));
    std::fs::write(&side, meta).map_err(|e| format!("writing {}: {e}", side.display()))?;
    eprintln!("hvqualify: golden handover ({} bytes, update {count}) written to {}", blob.len(), out.display());
    // The dump is as large as guest RAM.
    let _ = std::fs::remove_file(ram);
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse(&args) {
        Ok(None) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hvqualify: {e}\n{USAGE}");
            ExitCode::from(2)
        }
        Ok(Some(o)) => match qualify(&o) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("hvqualify: {e}");
                ExitCode::from(1)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn options_need_two_revisions_and_both_directions() {
        let o = parse(&args("v1 HEAD")).expect("parse").expect("options");
        assert_eq!((o.from.as_str(), o.to.as_str(), o.updates), ("v1", "HEAD", 4));
        assert!(parse(&args("v1")).is_err());
        assert!(parse(&args("a b c")).is_err());
        assert!(parse(&args("a b --updates 1")).is_err(), "one update crosses one direction only");
        assert!(parse(&args("a b --arch x86_64")).is_ok());
        assert!(parse(&args("a b --arch x86_64 --golden g")).is_err(), "goldens come from QEMU");
        assert!(parse(&args("a b --frobnicate")).is_err());
        assert!(parse(&args("--help")).expect("help").is_none());
        let g = parse(&args("a b --golden g.dtb")).expect("parse").expect("options");
        assert_eq!(g.golden.as_deref(), Some(Path::new("g.dtb")));
        assert!(parse(&args("a b --golden")).is_err());
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3, 1, 2]), 2);
        assert_eq!(median(&[]), 0);
        assert_eq!(ms(131_456), "131.4");
    }
}
