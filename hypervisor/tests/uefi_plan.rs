//! The first boot's memory plan on memory maps edk2 really gave
//! (`loader/testdata/edk2-*-record.bin`, written by the EFI entry under
//! QEMU): what the firmware keeps (runtime services, ACPI) and what is not
//! RAM is never handed to guests, scratch, the image slots or the frame
//! allocator (issue 21, item 3).

use std::path::Path;

use hypervisor::frames::subtract;
use hypervisor::live_update::reserve_scratch;
use loader::uefi::{self, MemoryClass};
use loader::PhysRange;

fn record(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../loader/testdata").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn what_edk2_keeps_is_never_allocated() {
    for (name, phys) in [
        ("edk2-qemu-virt-512m-record.bin", 0x5bf1_8000u64),
        ("edk2-qemu-virt-smmuv3-edu-4g-4cpu-record.bin", 0x1_3bf1_8000),
    ] {
        let bytes = record(name);
        let rec = uefi::read(&bytes).expect("edk2 record");
        let (info, _) = uefi::memory(&rec, phys).expect("edk2 map");
        // What the boot path reserves besides the map's own (mod.rs
        // start_guests): the image slots; then the scratch regions.
        let mut reserved = info.reserved.clone();
        reserved.extend(hypervisor::slots::AARCH64.ranges());
        let scratch = reserve_scratch(&info.ram, &mut reserved, 0x51_7000).expect("room for scratch");
        let free = subtract(&info.ram, &reserved);

        let kept: Vec<PhysRange> = rec
            .descriptors()
            .filter(|d| uefi::class_of(d.kind) != MemoryClass::Usable && d.range.size != 0)
            .map(|d| d.range)
            .collect();
        assert!(kept.len() >= 5, "{name}: runtime, ACPI and MMIO descriptors");
        for k in &kept {
            assert!(!free.iter().any(|f| f.overlaps(k)), "{name}: {k:x?} handed to the frame allocator");
            assert!(
                !scratch.regions().iter().any(|s| PhysRange::new(s.range.base(), s.range.size()).overlaps(k)),
                "{name}: {k:x?} in scratch"
            );
            let slots = hypervisor::slots::AARCH64.ranges();
            assert!(!slots.iter().any(|s| s.overlaps(k)), "{name}: {k:x?} in an image slot");
        }
        assert!(!free.iter().any(|f| f.overlaps(&PhysRange::new(phys, 0x1000))), "{name}: the record is kept");
        // And nearly all the rest is there for guests.
        let free_bytes: u64 = free.iter().map(|f| f.size).sum();
        assert!(free_bytes > info.ram_bytes() / 10 * 8, "{name}: {free_bytes:#x} free");
    }
}
