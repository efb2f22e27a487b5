//! The bodies of the hypervisor's fuzz targets: what a guest or a previous
//! image controls, driven with arbitrary bytes. A guest's hypercall
//! registers and buffers, its accesses to the emulated GIC and PL011, the
//! instruction bytes the x86 MMIO emulation decodes, and the stage-2/EPT
//! tables a previous image hands over must give a result or a typed error,
//! never a panic, and never reach host memory outside what they may.
//! Shared by the cargo-fuzz binaries (`fuzz_targets/*.rs`, nightly) and by
//! `hypervisor/tests/fuzz_corpus.rs`, which replays the committed corpora
//! and crash reproducers on stable.

#![allow(dead_code)]

use std::cell::RefCell;

use hvcall::PartitionState;
use hypervisor::arch::aarch64::pl011::Pl011;
use hypervisor::arch::aarch64::vgic::{self, Vgic};
use hypervisor::arch::x86_64::emulate::{self, CodeSize, Paging};
use hypervisor::arch::x86_64::lapic::{self, Lapic};
use hypervisor::arch::x86_64::svm_exit;
use hypervisor::guest_dtb::{GUEST_GICD, GUEST_GICR};
use hypervisor::hypercall::{self, HostMemory, HvContext};
use hypervisor::partition::{GuestRam, PartitionInfo, GUEST_RAM_BASE};
use hypervisor::records::StateTableRecord;
use hypervisor::stage2::{ArmStage2, Ept, PhysToVirt, Stage2Table};
use hypervisor::state_table::{self, Geometry, Table};

/// Little-endian words from the input, zero past its end.
struct Words<'a>(&'a [u8]);

impl Words<'_> {
    fn u64(&mut self) -> u64 {
        let n = self.0.len().min(8);
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        u64::from_le_bytes(b)
    }

    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else { return 0 };
        self.0 = rest;
        b
    }
}

/// The guest's RAM in host memory: 64 KiB at `HOST_BASE`. Every access
/// the hypercall layer makes must fall inside it.
const HOST_BASE: u64 = 0x8000_0000;
const GUEST_RAM: u64 = 64 << 10;

struct Ram(Vec<u8>);

impl Ram {
    fn at(&self, pa: u64, len: usize) -> std::ops::Range<usize> {
        let off = pa.checked_sub(HOST_BASE).expect("a host access below the guest's RAM") as usize;
        assert!(off + len <= self.0.len(), "a host access past the guest's RAM: {pa:#x}+{len}");
        off..off + len
    }
}

impl HostMemory for Ram {
    fn read(&self, pa: u64, out: &mut [u8]) {
        out.copy_from_slice(&self.0[self.at(pa, out.len())]);
    }

    fn write(&mut self, pa: u64, data: &[u8]) {
        let r = self.at(pa, data.len());
        self.0[r].copy_from_slice(data);
    }
}

struct Hv;

impl HvContext for Hv {
    fn version(&self) -> &'static str {
        "0.1.0"
    }
    fn build(&self) -> &'static str {
        "fuzz"
    }
    fn update_count(&self) -> u64 {
        3
    }
    fn cpus(&self) -> u64 {
        2
    }
    fn partition_state(&self, id: u64) -> Option<PartitionState> {
        (id == 1).then_some(PartitionState::Running)
    }
    fn update_staging(&self) -> bool {
        false
    }
}

/// Hypercalls: control, input and output words (any value: addresses in
/// and out of the caller's RAM, rep counts, reserved bits), a privileged
/// bit, then the RAM's first bytes (an update image, a console buffer).
pub fn hypercall(data: &[u8]) {
    let mut w = Words(data);
    let mut ram = Ram(vec![0; GUEST_RAM as usize]);
    for _ in 0..4 {
        let (control, input, output, privileged) = (w.u64(), w.u64(), w.u64(), w.u8() & 1 != 0);
        let n = w.0.len().min(ram.0.len());
        ram.0[..n].copy_from_slice(&w.0[..n]);
        let caller = PartitionInfo {
            id: 1,
            name: "fuzz".into(),
            privileged,
            ram: GuestRam { host_base: HOST_BASE, size: GUEST_RAM },
            vcpus: 1,
        };
        let mut printed = 0usize;
        let out = hypercall::dispatch(&caller, control, input, output, &Hv, &mut ram, &mut |b| printed += b.len());
        if let hypercall::Action::LiveUpdate { image_pa, size } = out.action {
            let _ = ram.at(image_pa, size as usize);
        }
        assert!(printed as u64 <= GUEST_RAM, "printed more than the guest has");
        let _ = (out.result_word(), GUEST_RAM_BASE);
    }
}

/// Guest accesses to the virtual GICv3 (any address in its frames, any
/// width and value) and list-register traffic; then its handover record,
/// encoded and decoded, and arbitrary bytes as a record.
pub fn vgic(data: &[u8]) {
    let vcpus = usize::from(data.first().copied().unwrap_or(1) % 4) + 1;
    let _ = Vgic::decode(data, vcpus);
    let mut g = Vgic::new(vcpus);
    let mut w = Words(data.get(1..).unwrap_or(&[]));
    while !w.0.is_empty() {
        let op = w.u8();
        let addr = w.u64();
        let value = w.u64();
        let width = [1u8, 2, 4, 8][usize::from(op >> 1) & 3];
        let ipa = if op & 0x10 != 0 { GUEST_GICR } else { GUEST_GICD } + addr % (2 << 20);
        if op & 0x20 != 0 {
            let vcpu = usize::from(op >> 6) % vcpus;
            let mut lrs = [value, addr, 0, 0];
            g.sync_lrs(vcpu, &lrs);
            let _ = g.fill_lrs(vcpu, &mut lrs);
            continue;
        }
        let Some(frame) = vgic::frame(ipa, GUEST_GICD, GUEST_GICR, vcpus) else { continue };
        if op & 1 != 0 {
            let wake = g.write(frame, width, value);
            assert_eq!(wake >> vcpus, 0, "woke a vCPU that does not exist");
        } else {
            let _ = g.read(frame, width);
        }
    }
    let mut buf = vec![0u8; 4096];
    let n = g.encode_into(&mut buf).expect("a record of at most 4 vCPUs fits 4 KiB");
    assert_eq!(Vgic::decode(&buf[..n], vcpus), Some(g), "the record reads back");
}

/// A guest's x2APIC: MSR reads and writes of every index and value,
/// interrupts arriving, the processor taking the deliverable one, and the
/// clock advancing (never backwards), in any order. Nothing panics, an
/// accepted write leaves a state the handover record holds and reads back
/// the same, and the record decodes only for the right vCPU.
pub fn lapic(data: &[u8]) {
    let id = u32::from(data.first().copied().unwrap_or(0) % 4);
    let mut a = Lapic::new(id);
    let mut now = 0u64;
    let mut w = Words(data.get(1..).unwrap_or(&[]));
    while !w.0.is_empty() {
        let op = w.u8();
        now = now.saturating_add(u64::from(w.u8()) << (op >> 5));
        match op & 7 {
            0 | 1 => {
                // Mostly the APIC's own range (0x800-0x8ff), sometimes any.
                let index = if op & 8 != 0 { w.u64() as u32 } else { 0x800 | u32::from(w.u8()) };
                let value = w.u64();
                if op & 1 != 0 {
                    let _ = a.write(index, value, now);
                } else {
                    let _ = a.read(index, now);
                }
            }
            2 => a.accept(w.u8()),
            3 => {
                if let Some(v) = a.deliverable() {
                    a.acknowledge(v);
                }
            }
            4 => a.advance(now),
            _ => {
                if let Some(deadline) = a.next_deadline() {
                    now = now.max(deadline);
                    a.advance(now);
                }
            }
        }
        let _ = a.ppr();
    }
    let mut buf = [0u8; lapic::STATE_LEN];
    let n = a.encode(&mut buf).expect("STATE_LEN bytes hold the record");
    assert_eq!(Lapic::decode(&buf[..n], id).as_ref(), Ok(&a), "the record reads back");
    assert!(Lapic::decode(&buf[..n], id + 1).is_err(), "the record is the vCPU's own");
    let _ = Lapic::decode(data, id);
}

/// Guest accesses to the emulated PL011.
pub fn pl011(data: &[u8]) {
    let mut u = Pl011::default();
    let mut w = Words(data);
    while !w.0.is_empty() {
        let op = w.u8();
        let offset = u64::from(w.u8()) * 4 + (u64::from(op >> 4) << 10);
        let value = w.u64();
        if op & 1 != 0 {
            let _ = u.write(offset & 0xfff, value);
        } else {
            let _ = u.read(offset & 0xfff);
        }
        let _ = u.interrupt();
    }
}

/// The x86 MMIO emulation and the SVM exits decoded without decode
/// assists: instruction bytes a guest left at its RIP, in every code size
/// (MMIO loads and stores, MOV CR/DR, VMCALL), the SVM EXITINFO1 words
/// of IN/OUT and nested page faults, and the guest page-table walk that
/// found the bytes (the tables are the input too).
pub fn x86_decode(data: &[u8]) {
    for code in [CodeSize::Bits16, CodeSize::Bits32, CodeSize::Bits64] {
        if let Ok(d) = emulate::decode(data, code) {
            assert!(d.len <= data.len().min(15), "decoded past the bytes given");
        }
        if let Ok((_, len)) = svm_exit::decode_mov_cr_dr(data, code) {
            assert!(len as usize <= data.len().min(15), "MOV CR/DR decoded past the bytes given");
        }
    }
    let _ = svm_exit::is_vmcall(data);
    if let Some(word) = data.get(..8) {
        let info1 = u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
        let io = svm_exit::io_access(info1);
        assert!(matches!(io.size, 1 | 2 | 4), "an I/O access of 1, 2 or 4 bytes");
        let npf = svm_exit::npf_access(info1);
        assert!(npf.read != (npf.write || npf.fetch), "a read is neither a write nor a fetch, and nothing is none");
    }
    let mut w = Words(data);
    let paging = Paging { cr0: w.u64(), cr3: w.u64(), cr4: w.u64(), efer: w.u64() };
    let linear = w.u64();
    let table = w.0;
    let _ = emulate::translate(linear, &paging, |gpa| {
        let off = usize::try_from(gpa % 4096).ok()?;
        let b = table.get(off..off + 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    });
}

/// The RAM a previous image's stage-2 tables are in: the input, page by
/// page, at `TABLE_BASE`. Pages outside it have no backing: the adopt
/// code must check an address lies in RAM before it reads there.
const TABLE_BASE: u64 = 0x4000_0000;

struct Pages(RefCell<Vec<[u64; 512]>>);

// SAFETY: every pointer handed out is to a live page of the vector, which
// is not resized while a table uses it; an address outside panics.
unsafe impl PhysToVirt for Pages {
    fn phys_to_virt(&self, pa: u64) -> *mut u64 {
        let index = pa.checked_sub(TABLE_BASE).map(|o| (o / 4096) as usize);
        let mut pages = self.0.borrow_mut();
        match index.and_then(|i| pages.get_mut(i)) {
            Some(page) => page.as_mut_ptr(),
            None => panic!("adopt read {pa:#x}, outside the RAM it was given"),
        }
    }
}

fn pages(data: &[u8]) -> Pages {
    let mut pages: Vec<[u64; 512]> = vec![[0; 512]; data.len().div_ceil(4096).clamp(1, 64)];
    for (i, chunk) in data.chunks(8).take(pages.len() * 512).enumerate() {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        pages[i / 512][i % 512] = u64::from_le_bytes(b);
    }
    Pages(RefCell::new(pages))
}

/// A previous image's stage-2 (aarch64) and EPT (x86_64) tables: whatever
/// adopt accepts translates without leaving RAM or the devices.
pub fn stage2_adopt(data: &[u8]) {
    let mem = pages(data);
    let len = mem.0.borrow().len() as u64 * 4096;
    let ram = [(TABLE_BASE, len)];
    let devices = [(0x0900_0000, 0x1000)];
    let inside = |pa: u64| (TABLE_BASE..TABLE_BASE + len).contains(&pa) || (0x0900_0000..0x0900_1000).contains(&pa);
    if let Ok(t) = Stage2Table::<ArmStage2, _>::adopt(TABLE_BASE, &ram, &devices, &mem) {
        for ipa in [0, GUEST_RAM_BASE, TABLE_BASE, 0x0900_0000, 1 << 39] {
            if let Some(tr) = t.translate(ipa) {
                assert!(inside(tr.pa), "translates {ipa:#x} outside RAM and devices: {tr:?}");
            }
        }
    }
    if let Ok(t) = Stage2Table::<Ept, _>::adopt(TABLE_BASE, &ram, &devices, &mem) {
        for ipa in [0, GUEST_RAM_BASE, TABLE_BASE, 0x0900_0000, 1 << 39] {
            if let Some(tr) = t.translate(ipa) {
                assert!(inside(tr.pa), "translates {ipa:#x} outside RAM and devices: {tr:?}");
            }
        }
    }
}

/// The state table a previous image hands over (`hypervisor::state_table`,
/// `kho/ABI.md` §4.7): any record and any bytes give a table or a typed
/// error, and every entry of a table that checks reads within its stride,
/// whatever its length fields say. The first 12 bytes pick the geometry
/// (small, so that tables parse) and whether the record's length and CRC
/// are made right (so the entries are reached) or taken as they come.
pub fn state_table(data: &[u8]) {
    let Some((head, pages)) = data.split_first_chunk::<12>() else { return };
    let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let flags = head[0];
    let geometry = Geometry {
        partitions: u32::from(head[1] % 8),
        vcpus: u32::from(head[2] % 8),
        partition_stride: if flags & 4 != 0 {
            word(4)
        } else {
            state_table::PARTITION_HEAD as u32 + u32::from(head[3])
        },
        vcpu_stride: if flags & 8 != 0 { word(8) } else { state_table::VCPU_HEAD as u32 + u32::from(head[4]) },
    };
    let bytes = match geometry.bytes() {
        Some(b) if flags & 1 == 0 => b as u64,
        _ => u64::from(word(8)),
    };
    let crc = if flags & 2 == 0 { kho::crc32(pages.get(..bytes as usize).unwrap_or(pages)) } else { word(4) };
    let rec = StateTableRecord {
        layout: if flags & 16 == 0 { state_table::LAYOUT } else { word(0) },
        partitions: geometry.partitions,
        vcpus: geometry.vcpus,
        partition_stride: geometry.partition_stride,
        vcpu_stride: geometry.vcpu_stride,
        base: 0,
        bytes,
        crc32: crc,
    };
    let Ok(t) = Table::parse(&rec, pages) else { return };
    let g = t.geometry();
    assert!(g.bytes().is_some_and(|b| b <= pages.len()), "a table that checks lies within its pages");
    for i in 0..g.partitions {
        if let Ok((e, arch)) = t.partition(i) {
            assert!(arch.len() + state_table::PARTITION_HEAD <= g.partition_stride as usize);
            assert_eq!(arch.len(), e.arch_len.get() as usize);
        }
    }
    for i in 0..g.vcpus {
        if let Ok((e, context)) = t.vcpu(i) {
            assert!(context.len() + state_table::VCPU_HEAD <= g.vcpu_stride as usize);
            assert_eq!(context.len(), e.context_len.get() as usize);
        }
    }
}

/// A target's body.
pub type Body = fn(&[u8]);

/// Every target by name, for the corpus replay.
pub const ALL: &[(&str, Body)] = &[
    ("hypercall", hypercall),
    ("vgic", vgic),
    ("pl011", pl011),
    ("x86_decode", x86_decode),
    ("stage2_adopt", stage2_adopt),
    ("lapic", lapic),
    ("state_table", state_table),
];
