//! The bodies of the loader's fuzz targets: each takes arbitrary bytes as
//! untrusted input (a platform DTB, a multiboot2 information structure,
//! ACPI tables and the VT-d DMAR among them, an ELF or update image, a boot
//! manifest, a module's command line) and must return a value or a typed
//! error, never panic, hang or allocate without bound. Shared by the cargo-fuzz binaries
//! (`fuzz_targets/*.rs`, nightly) and by `loader/tests/fuzz_corpus.rs`,
//! which replays the committed corpora and crash reproducers on stable.

#![allow(dead_code)]

use loader::acpi::{self, PhysMemory};
use loader::image_desc::{self, ImageArch};
use loader::manifest::ImageFormat;
use loader::multiboot2::{self, RsdpCopy};
use loader::{acpi_arm, dmar, dtb, elf, gtdt, guest_modules, image_readers, iort, manifest, uefi, PhysRange};

/// Where the fuzzed blob pretends to be in physical memory.
const BLOB_PHYS: u64 = 0x4000_0000;

/// The platform DTB (aarch64 boot): validation, then the one-pass walk.
pub fn dtb(data: &[u8]) {
    if let Ok((info, platform)) = dtb::parse(data, BLOB_PHYS) {
        // What was accepted is usable: no range wraps.
        for r in &info.ram {
            assert!(r.base.checked_add(r.size).is_some(), "a RAM range wraps: {r:?}");
        }
        let _ = (platform.cpus.len(), info.ram_bytes());
    }
}

/// The multiboot2 information structure GRUB hands the x86_64 image.
pub fn multiboot2(data: &[u8]) {
    let _ = multiboot2::parse(multiboot2::BOOTLOADER_MAGIC, data, 0x1_0000);
}

/// Physical memory made of the fuzzed bytes, at address 0.
struct Bytes<'a>(&'a [u8]);

impl PhysMemory for Bytes<'_> {
    fn bytes(&self, phys: u64, len: usize) -> Option<&[u8]> {
        let start = usize::try_from(phys).ok()?;
        self.0.get(start..start.checked_add(len)?)
    }
}

/// ACPI: the RSDP is the first 36 bytes (a 2.0 one if byte 15, its
/// revision, says so), the tables it points to anywhere in the rest.
pub fn acpi(data: &[u8]) {
    let Some(head) = data.get(..36) else { return };
    let rsdp = if head[15] >= 2 { RsdpCopy::V2(head.to_vec()) } else { RsdpCopy::V1(head[..20].to_vec()) };
    let _ = acpi::discover_cpus(&Bytes(data), Some(&rsdp));
    if let Ok(Some(table)) = acpi::find_table(&Bytes(data), Some(&rsdp), *b"DMAR") {
        dmar(table);
    }
}

/// The VT-d DMAR table (x86_64 boot), header included: what is accepted
/// names at least one unit, each with page-aligned registers.
pub fn dmar(data: &[u8]) {
    if let Ok(d) = dmar::parse(data) {
        assert!(!d.units.is_empty(), "a DMAR without units was accepted");
        assert!(d.units.iter().all(|u| u.register_base.is_multiple_of(0x1000)), "unaligned registers accepted");
        assert!(d.units.len() <= dmar::MAX_UNITS && d.reserved.len() <= dmar::MAX_RMRRS);
    }
}

/// The Arm GTDT (aarch64 boot from ACPI): what is accepted has its
/// hypervisor and guest timers on PPIs.
pub fn gtdt(data: &[u8]) {
    if let Ok(g) = gtdt::parse(data) {
        assert!((16..=31).contains(&g.el2.gsiv) && (16..=31).contains(&g.virtual_el1.gsiv), "a non-PPI timer accepted");
        assert!(g.platform_timers <= gtdt::MAX_PLATFORM_TIMERS);
    }
}

/// The Arm IORT (aarch64 boot from ACPI): what is accepted has every
/// mapping pointing at one of its nodes, and every requester's route
/// lookup answers.
pub fn iort(data: &[u8]) {
    if let Ok(t) = iort::parse(data) {
        assert!(t.nodes.len() <= iort::MAX_NODES as usize);
        for n in &t.nodes {
            assert!(n.mappings.iter().all(|m| t.nodes.iter().any(|o| o.offset == m.output_node)), "dangling output");
        }
        for rid in [0u16, 8, 0xff, 0x100, 0xffff] {
            let _ = t.stream_of(0, rid);
        }
    }
}

/// The aarch64 platform from ACPI: the input is five tables (MADT, SPCR,
/// FADT, MCFG, IORT), each after a 2-byte little-endian length. What is
/// accepted has CPUs, a GICv3 and a console, as the DTB path requires.
pub fn acpi_arm(data: &[u8]) {
    let mut rest = data;
    let mut tables: [&[u8]; 5] = [&[]; 5];
    for t in &mut tables {
        let Some((len, tail)) = rest.split_first_chunk::<2>() else { break };
        let len = usize::from(u16::from_le_bytes(*len)).min(tail.len());
        let (table, tail) = tail.split_at(len);
        *t = table;
        rest = tail;
    }
    let iort = iort::parse(tables[4]).ok();
    if let Ok(p) = acpi_arm::platform(tables[0], tables[1], Some(tables[2]), Some(tables[3]), iort.as_ref()) {
        assert!(!p.cpus.is_empty() && p.cpus.len() <= dtb::MAX_CPUS, "CPUs out of bounds accepted");
        assert!(p.gic.is_some() && p.uart.is_some(), "a platform without GIC or console accepted");
    }
}

/// The UEFI boot record (every aarch64 image after a UEFI boot reads it):
/// the header, the memory map, then the ACPI platform through the
/// record's RSDP, with the fuzzed bytes as all of physical memory. What is
/// accepted has page-aligned RAM that does not wrap, and keeps the record
/// itself reserved.
pub fn uefi(data: &[u8]) {
    // The same bytes as a PCI root bridge's resource descriptors.
    if let Some((_, cpu)) = uefi::pci_window(data) {
        assert!(cpu.end().is_some() && cpu.size != 0, "a window that wraps accepted");
    }
    let Ok(record) = uefi::read(data) else { return };
    if let Ok((info, _)) = uefi::memory(&record, 0) {
        for r in &info.ram {
            assert!(r.end().is_some() && r.base.is_multiple_of(4096), "bad RAM accepted: {r:?}");
        }
        assert!(info.reserved.iter().any(|r| r.base == 0 && r.size >= record.len as u64), "the record not kept");
    }
    let _ = uefi::platform(&record, &Bytes(data));
}

/// ELF images (guest kernels, the x86_64 hypervisor) for both machines,
/// flattened when accepted.
pub fn elf(data: &[u8]) {
    for machine in [elf::Machine::Aarch64, elf::Machine::X86_64] {
        if let Ok(image) = elf::parse(data, machine) {
            let flat = elf::flatten(data, &image);
            assert!(flat.len() as u64 <= image.end() - image.base(), "flattened past the image's end");
        }
    }
}

/// An update image: its descriptor and its table of record readers.
pub fn update_image(data: &[u8]) {
    let _ = image_desc::find(data);
    for arch in [ImageArch::Aarch64, ImageArch::X86_64] {
        let _ = image_desc::validate(data, arch, 1, 16 << 20);
    }
    let _ = image_readers::find(data);
}

/// The boot manifest (aarch64 guests) and one boot module's command line
/// (x86_64 guests).
pub fn manifest(data: &[u8]) {
    let _ = manifest::parse(data);
    let text = String::from_utf8_lossy(data);
    let _ = manifest::address_from_cmdline(&text);
    for format in [ImageFormat::Flat, ImageFormat::Arm64Image, ImageFormat::Elf] {
        let _ = guest_modules::parse_module(0, &text, PhysRange::new(0x100_0000, 0x10_0000), format);
    }
    let _ = guest_modules::detect_format(data);
    // As a manifest on the EFI system partition: every file it names
    // "loads" at a fresh address; what comes out is a manifest `parse`
    // reads, or refuses with an error.
    let mut next = 0x4800_0000u64;
    let resolved = manifest::resolve_files(&text, |name| -> Result<PhysRange, ()> {
        assert!(!name.contains(['/', '\\']) && name != "..", "a path accepted as a file name: {name}");
        next += 0x10_0000;
        Ok(PhysRange::new(next, 0x1000))
    });
    if let Ok(out) = resolved {
        let mut bytes = out.into_bytes();
        bytes.push(0);
        let _ = manifest::parse(&bytes);
    }
}

/// A target's body.
pub type Body = fn(&[u8]);

/// Every target by name, for the corpus replay.
pub const ALL: &[(&str, Body)] = &[
    ("dtb", dtb),
    ("multiboot2", multiboot2),
    ("acpi", acpi),
    ("dmar", dmar),
    ("gtdt", gtdt),
    ("iort", iort),
    ("acpi_arm", acpi_arm),
    ("uefi", uefi),
    ("elf", elf),
    ("update_image", update_image),
    ("manifest", manifest),
];
