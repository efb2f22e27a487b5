//! Handovers that released hypervisors really wrote, taken from guest RAM
//! after a real run (`scripts/qualify R R --updates 2 --golden ...`, see
//! `kho/ABI.md` §7.2), must stay readable by this reader: the blob
//! validates, and every record in it decodes with this image's record
//! types at a version this image says it reads (`hypervisor::READS`).
//! Every release in `releases.txt` has one.

use std::path::{Path, PathBuf};

use hypervisor::arch::aarch64::vgic::Vgic;
use hypervisor::records::{
    field_text, ConsoleRecord, HvRecord, IommuRecord, PartitionRecord, VcpuRecord, VgicRecord, CONTEXT_BYTES,
    VGIC_STATE_BYTES,
};
use kho::{HandoverReader, PhysRange, RamMap};
use loader::image_readers::CONTEXT_FAMILY;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where a golden lay in the run's RAM (its `.txt` sidecar).
struct Meta {
    writer: String,
    phys: u64,
    ram_base: u64,
    ram_bytes: u64,
    update_count: u64,
}

fn meta(path: &Path) -> Meta {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let field = |key: &str| -> String {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .unwrap_or_else(|| panic!("{}: no {key}=", path.display()))
            .to_string()
    };
    let num = |key: &str| -> u64 {
        let v = field(key);
        let parsed = match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => v.parse(),
        };
        parsed.unwrap_or_else(|e| panic!("{}: {key}={v}: {e}", path.display()))
    };
    Meta {
        writer: field("writer"),
        phys: num("phys"),
        ram_base: num("ram_base"),
        ram_bytes: num("ram_bytes"),
        update_count: num("update_count"),
    }
}

/// The versions `releases.txt` lists.
fn releases() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("releases.txt")).expect("releases.txt");
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
        .collect()
}

/// Whether this image reads a record `id` of `version` that needs reader
/// version `needs` (§4.3: the newest version it reads is at least `needs`),
/// by the table it embeds for the check before the freeze.
fn reads(id: u32, needs: u16, version: u16) -> bool {
    hypervisor::READS.iter().any(|r| r.id == id && needs <= r.max && version >= r.min)
}

fn check_golden(version: &str) {
    let dir = root().join("kho").join("testdata");
    let blob_path = dir.join(format!("real-{version}-aarch64.dtb"));
    let blob = std::fs::read(&blob_path).unwrap_or_else(|e| panic!("{}: {e}", blob_path.display()));
    let m = meta(&dir.join(format!("real-{version}-aarch64.dtb.txt")));
    let ram = RamMap::new(&[PhysRange::new(m.ram_base, m.ram_bytes).expect("ram range")]).expect("ram map");
    let reader = HandoverReader::new(&blob, m.phys, &ram).unwrap_or_else(|e| panic!("{version}: {e:?}"));
    assert_eq!(reader.previous_version(), m.writer, "{version}: writer");
    assert_eq!(reader.update_count(), m.update_count, "{version}: update count");

    // Every record in every node is one this image reads, at its version.
    let mut records = 0;
    for node in reader.subsystems() {
        for (name, header) in node.records() {
            assert!(
                reads(header.id, header.min_reader_version, header.version),
                "{version}: {}/{name}: id {:#x} version {} not read",
                node.path(),
                header.id,
                header.version
            );
            records += 1;
        }
    }

    let hv: HvRecord = reader.subsystem("hv").and_then(|n| n.record().ok().flatten()).expect("hv record");
    assert!(hv.counter_hz > 0 && hv.cpus > 0, "{version}: hv record {hv:?}");
    let mut partitions = Vec::new();
    for node in reader.children("partitions") {
        let p: PartitionRecord = node.record().ok().flatten().expect("partition record");
        assert!(!field_text(&p.name).is_empty(), "{version}: partition {} unnamed", p.id);
        let end = p.ram_host_base + p.ram_size;
        assert!(
            p.ram_size > 0 && p.ram_host_base >= m.ram_base && end <= m.ram_base + m.ram_bytes,
            "{version}: partition {} RAM outside the machine's",
            p.id
        );
        // The virtual GIC state decodes for the partition's vCPUs (a
        // handover from before the virtual GIC has none).
        if let Some(v) = node.record::<VgicRecord>().expect("vgic record") {
            let len = (v.len as usize).min(VGIC_STATE_BYTES);
            assert!(Vgic::decode(&v.state[..len], v.vcpus as usize).is_some(), "{version}: vgic of {}", p.id);
        }
        if let Some(c) = node.record::<ConsoleRecord>().expect("console record") {
            assert!(c.len as usize <= c.line.len(), "{version}: console of {}", p.id);
        }
        partitions.push(p);
    }
    assert_eq!(partitions.len(), hv.partitions as usize, "{version}: partitions");
    assert!(partitions.len() >= 2, "{version}: a run with the test guests has several partitions");

    let mut vcpus = 0;
    for node in reader.children("vcpus") {
        let v: VcpuRecord = node.record().ok().flatten().expect("vcpu record");
        assert!(partitions.iter().any(|p| p.id == v.partition), "{version}: vCPU of unknown partition");
        let family = CONTEXT_FAMILY | (v.context_format >> 16);
        assert!(
            reads(family, (v.context_format & 0xffff) as u16, (v.context_format & 0xffff) as u16),
            "{version}: vCPU context format {:#x} not read",
            v.context_format
        );
        assert!(v.context_len > 0 && v.context_len as usize <= CONTEXT_BYTES, "{version}: context length");
        vcpus += 1;
    }
    assert_eq!(vcpus, hv.vcpus, "{version}: vCPUs");
    if let Some(node) = reader.subsystem("iommu") {
        let _: IommuRecord = node.record().ok().flatten().expect("iommu record");
    }
    // The hv record, then a partition record and a vCPU record at least per partition.
    assert!(records > 2 * partitions.len(), "{version}: {records} records");
}

#[test]
fn every_release_has_a_golden_handover_this_reader_reads() {
    let releases = releases();
    assert!(!releases.is_empty(), "releases.txt lists no release");
    for version in &releases {
        check_golden(version);
    }
}

#[test]
fn a_golden_with_a_flipped_byte_is_refused() {
    let releases = releases();
    let version = releases.last().expect("a release");
    let dir = root().join("kho").join("testdata");
    let mut blob = std::fs::read(dir.join(format!("real-{version}-aarch64.dtb"))).expect("golden");
    let m = meta(&dir.join(format!("real-{version}-aarch64.dtb.txt")));
    let ram = RamMap::new(&[PhysRange::new(m.ram_base, m.ram_bytes).expect("ram range")]).expect("ram map");
    // In the records (the vCPU contexts fill most of the blob), which the
    // reader checks by CRC when it opens the handover.
    let at = blob.len() / 2;
    blob[at] ^= 0x40;
    let refused = HandoverReader::new(&blob, m.phys, &ram).is_err();
    assert!(refused, "{version}: a corrupted golden must not read as valid");
}
